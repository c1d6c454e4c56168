// The README's examples of the management calls compile: the `ts` blocks of its "Manage …"
// sections, each section's blocks in order as one module (a reader runs them one after the
// other), are type-checked with `tsc --noEmit` against `src`. `bus` is the client the README's
// set-up block makes; `@evbus/client` is this package's `src/index.ts`.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";

// build/test/readme.test.js -> the package directory.
const packageDir = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const checkDir = join(packageDir, "build", "readme");
const tsc = createRequire(join(packageDir, "package.json")).resolve("typescript/bin/tsc");

const PRELUDE = `// The README's set-up block.
declare const bus: import("../../src/index.js").EvbusClient;
`;

/** The `ts` blocks of each `## Manage …` section (its `###` subsections included), by section title. */
function managementExamples(readme: string): Map<string, string[]> {
  const sections = new Map<string, string[]>();
  let current: string[] | undefined;
  let block: string[] | undefined;
  for (const line of readme.split("\n")) {
    if (block !== undefined) {
      if (line.startsWith("```")) {
        current?.push(block.join("\n"));
        block = undefined;
      } else {
        block.push(line);
      }
      continue;
    }
    if (line.startsWith("## ")) {
      current = line.startsWith("## Manage ") ? [] : undefined;
      if (current !== undefined) sections.set(line.slice(3).trim(), current);
    } else if (line.trim() === "```ts") {
      block = [];
    }
  }
  return sections;
}

describe("README examples of the management calls", () => {
  let sections: Map<string, string[]>;
  let errors: Map<string, string[]>;
  let output: string;

  before(async () => {
    sections = managementExamples(await readFile(join(packageDir, "README.md"), "utf8"));
    await rm(checkDir, { recursive: true, force: true });
    await mkdir(checkDir, { recursive: true });
    const files: string[] = [];
    for (const [title, blocks] of sections) {
      const file = join(checkDir, `${title.toLowerCase().replace(/[^a-z0-9]+/g, "-")}.ts`);
      const code = blocks.join("\n\n").replaceAll(`from "@evbus/client"`, `from "../../src/index.js"`);
      await writeFile(file, `${PRELUDE}\n${code}\n`);
      files.push(file);
    }
    const args = [
      tsc, "--noEmit", "--pretty", "false", "--strict", "--noUncheckedIndexedAccess", "--target", "es2022", "--module", "nodenext",
      "--moduleResolution", "nodenext", "--types", "node", "--skipLibCheck", ...files,
    ];
    output = await new Promise<string>((resolve) => {
      execFile(process.execPath, args, { cwd: packageDir, timeout: 120_000 }, (_error, stdout, stderr) => resolve(stdout + stderr));
    });
    errors = new Map();
    for (const line of output.split("\n")) {
      const m = /^(.+?)\(\d+,\d+\): error (TS\d+: .*)$/.exec(line);
      if (!m) continue;
      const file = relative(checkDir, join(packageDir, m[1]!));
      errors.set(file, [...(errors.get(file) ?? []), m[2]!]);
    }
  });

  after(async () => {
    await rm(checkDir, { recursive: true, force: true });
  });

  test("the README has both sections, with examples calling every management method", () => {
    assert.deepEqual([...sections.keys()], ["Manage webhooks", "Manage API keys"]);
    const code = [...sections.values()].flat().join("\n");
    for (const method of [
      "createWebhook", "listWebhooks", "getWebhook", "updateWebhook", "deleteWebhook", "rotateWebhookSecret", "listWebhookAttempts",
      "replayWebhook",
      "createKey", "listKeys", "revokeKey",
    ]) {
      assert.match(code, new RegExp(`\\.${method}\\(`), `an example calls ${method}`);
    }
  });

  test("every example compiles", () => {
    assert.equal(errors.size, 0, output);
    assert.doesNotMatch(output, /error TS/, output);
  });
});
