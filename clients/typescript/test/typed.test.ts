// The generated payload types reject what the schemas reject: `tsc --noEmit` over fixture
// files, one of which compiles (the control) while each other fails with the expected error.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { before, describe, test } from "node:test";

// build/test/typed.test.js -> the package directory.
const packageDir = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const fixtures = ["valid.ts", "missing-required.ts", "publish-missing-required.ts", "delivered-redacted.ts"].map((f) => join(packageDir, "test", "fixtures", f));
const tsc = createRequire(join(packageDir, "package.json")).resolve("typescript/bin/tsc");

/** tsc's errors by fixture file name: `TSnnnn message` lines. */
let errors: Map<string, string[]>;
let output: string;

describe("typed payloads (tsc --noEmit over fixtures)", () => {
  before(async () => {
    const args = [tsc, "--noEmit", "--pretty", "false", "--strict", "--target", "es2022", "--module", "nodenext", "--moduleResolution", "nodenext", "--types", "node", "--skipLibCheck", ...fixtures];
    output = await new Promise<string>((resolve) => {
      execFile(process.execPath, args, { cwd: packageDir, timeout: 120_000 }, (_error, stdout, stderr) => resolve(stdout + stderr));
    });
    errors = new Map();
    for (const line of output.split("\n")) {
      const m = /^(.+?)\(\d+,\d+\): error (TS\d+: .*)$/.exec(line);
      if (!m) continue;
      const file = relative(join(packageDir, "test", "fixtures"), join(packageDir, m[1]!));
      errors.set(file, [...(errors.get(file) ?? []), m[2]!]);
    }
    const unknown = [...errors.keys()].filter((f) => !fixtures.some((x) => x.endsWith(`/${f}`)));
    assert.deepEqual(unknown, [], `errors outside the fixtures:\n${output}`);
  });

  test("the control fixture compiles", () => {
    assert.deepEqual(errors.get("valid.ts") ?? [], []);
  });

  test("a payload without a required field does not compile", () => {
    const found = errors.get("missing-required.ts") ?? [];
    assert.equal(found.length, 1, output);
    assert.match(found[0]!, /^TS2741: Property 'createdBy' is missing in type .* but required in type 'AfterOrderCreate'\.$/);
  });

  test("publish() with data missing a required field does not compile", () => {
    const found = errors.get("publish-missing-required.ts") ?? [];
    assert.equal(found.length, 1, output);
    assert.match(found[0]!, /^TS2741: Property 'totals' is missing in type .* but required in type 'Order'\.$/);
  });

  test("a redacted field is not in the delivered type", () => {
    const found = errors.get("delivered-redacted.ts") ?? [];
    assert.equal(found.length, 1, output);
    assert.match(found[0]!, /^TS2339: Property 'email' does not exist on type 'Order'\.$/);
  });
});
