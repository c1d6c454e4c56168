// The committed generated types are what `npm run generate` makes from the catalogue now: a
// catalogue change without regeneration fails here.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

const packageDir = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

test("src/generated is up to date with the catalogue (npm run generate)", async () => {
  const out = await mkdtemp(join(tmpdir(), "evbus-ts-generated-"));
  try {
    const log = await new Promise<string>((resolve, reject) => {
      execFile(process.execPath, [join(packageDir, "scripts", "generate.mjs")], { cwd: packageDir, env: { ...process.env, EVBUS_GENERATE_OUT: out }, timeout: 120_000 }, (error, stdout, stderr) =>
        error ? reject(new Error(`npm run generate failed: ${error.message}\n${stdout}${stderr}`)) : resolve(stdout),
      );
    });
    assert.match(log, /generated .*delivered\.ts \(\d+ types\)/);
    for (const file of ["delivered.ts", "published.ts"]) {
      const fresh = await readFile(join(out, file), "utf8");
      const committed = await readFile(join(packageDir, "src", "generated", file), "utf8");
      assert.equal(committed, fresh, `src/generated/${file} is stale: run \`npm run generate\` in clients/typescript and commit the result`);
    }
  } finally {
    await rm(out, { recursive: true, force: true });
  }
});
