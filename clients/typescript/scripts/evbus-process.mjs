// Starts a real `evbus serve` process for the tests and for `npm run generate`.
// It builds nothing: the binary comes from EVBUS_BIN, else $CARGO_TARGET_DIR/debug/evbus,
// else <repo>/target/debug/evbus; none of them existing is an error that says what to do.

import { spawn, execFile } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The package directory (clients/typescript), wherever this file was compiled to. */
function packageDir() {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "package.json"))) {
    const up = dirname(dir);
    if (up === dir) throw new Error("cannot find clients/typescript/package.json above " + fileURLToPath(import.meta.url));
    dir = up;
  }
  return dir;
}

/** The repository root (two levels above the package). */
export const repoRoot = resolve(packageDir(), "..", "..");
/** The example catalogue of the repository. */
export const exampleSchemas = join(repoRoot, "examples", "schemas");

/**
 * The evbus binary to run.
 * @returns {string}
 */
export function evbusBinary() {
  const tried = [];
  const fromEnv = process.env.EVBUS_BIN;
  if (fromEnv !== undefined && fromEnv !== "") {
    const path = resolve(fromEnv);
    if (existsSync(path)) return path;
    throw new Error(`EVBUS_BIN is ${fromEnv}, which does not exist; build it with \`cargo build -p evbus-cli\` or point EVBUS_BIN at an evbus binary`);
  }
  tried.push("EVBUS_BIN (not set)");
  if (process.env.CARGO_TARGET_DIR) {
    const path = resolve(process.env.CARGO_TARGET_DIR, "debug", "evbus");
    if (existsSync(path)) return path;
    tried.push(path);
  } else {
    tried.push("$CARGO_TARGET_DIR/debug/evbus (CARGO_TARGET_DIR not set)");
  }
  const local = join(repoRoot, "target", "debug", "evbus");
  if (existsSync(local)) return local;
  tried.push(local);
  throw new Error(
    `no evbus binary found; looked at: ${tried.join(", ")}. Build it with \`cargo build -p evbus-cli\` and set EVBUS_BIN to its path (the tests never build it themselves)`,
  );
}

/**
 * @typedef {{name: string, subscribe?: string[], publish?: string[], sources?: string[], admin?: boolean, expiresAt?: string}} KeySpec
 * `sources`: the CloudEvents `source` patterns the key may publish under, one `--source` each
 * (never joined: a source may hold a comma). A spec with `publish` but no `sources` gets `*`
 * (any source): a convenience of these tests only; the gateway itself requires sources.
 */

/**
 * Runs `evbus keys create` and returns the key it prints.
 * @param {string} bin
 * @param {string} dataDir
 * @param {KeySpec} spec
 * @returns {Promise<string>}
 */
export function createKey(bin, dataDir, spec) {
  const args = ["keys", "create", "--data-dir", dataDir, "--name", spec.name];
  if (spec.subscribe?.length) args.push("--subscribe", spec.subscribe.join(","));
  if (spec.publish?.length) args.push("--publish", spec.publish.join(","));
  const sources = spec.sources ?? (spec.publish?.length ? ["*"] : []);
  for (const source of sources) args.push("--source", source);
  if (spec.admin) args.push("--admin");
  if (spec.expiresAt) args.push("--expires-at", spec.expiresAt);
  return new Promise((resolvePromise, reject) => {
    execFile(bin, args, { timeout: 30_000 }, (error, stdout, stderr) => {
      if (error) {
        reject(new Error(`evbus keys create failed: ${error.message}\n${stderr}`));
        return;
      }
      const key = stdout.trim();
      if (!/^evb_[0-9a-f]+_[0-9a-f]+$/.test(key)) {
        reject(new Error(`evbus keys create printed no key (stdout: ${JSON.stringify(stdout)}, stderr: ${stderr})`));
        return;
      }
      resolvePromise(key);
    });
  });
}

/**
 * Starts `evbus serve` on a free port with a fresh data directory and an in-memory transport.
 * @param {{schemas?: string, args?: string[], bin?: string}} [options]
 */
export async function startGateway(options = {}) {
  const bin = options.bin ?? evbusBinary();
  const dataDir = await mkdtemp(join(tmpdir(), "evbus-ts-"));
  const args = [
    "serve",
    "--listen", "127.0.0.1:0",
    "--data-dir", dataDir,
    "--schemas", options.schemas ?? exampleSchemas,
    "--webhook-allow", "127.0.0.0/8",
    "--transport", "memory://",
    ...(options.args ?? []),
  ];
  const child = spawn(bin, args, {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, EVBUS_LOG: process.env.EVBUS_LOG ?? "warn" },
  });
  let log = "";
  const url = await new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`evbus serve did not say where it listens within 30 s; its stderr:\n${log}`));
    }, 30_000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (text) => {
      log += text;
      // A whole address: stderr may arrive cut in the middle of the line.
      const m = /evbus gateway listening on (http:\/\/\S+)\s/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolvePromise(m[1]);
      }
    });
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`evbus serve (${bin}) exited (code ${code}, signal ${signal}) before listening; its stderr:\n${log}`));
    });
    child.once("error", (error) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${bin}: ${error.message}`));
    });
  });
  child.removeAllListeners("exit");
  const exited = new Promise((r) => child.once("exit", r));
  // A test process that ends without stop() (a failure, a timeout) takes its gateway along.
  const reap = () => {
    child.kill("SIGKILL");
    rmSync(dataDir, { recursive: true, force: true });
  };
  process.once("exit", reap);
  child.once("exit", () => process.removeListener("exit", reap));
  return {
    /** Base URL, e.g. http://127.0.0.1:41234 */
    url,
    dataDir,
    bin,
    /** Everything the process wrote on stderr so far. */
    log: () => log,
    /** @param {KeySpec} spec */
    createKey: (spec) => createKey(bin, dataDir, spec),
    /** Stops the process (SIGINT, then SIGKILL after 5 s) and removes its data directory. */
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGINT");
        const killer = setTimeout(() => child.kill("SIGKILL"), 5_000);
        await exited;
        clearTimeout(killer);
      }
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}
