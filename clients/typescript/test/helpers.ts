// Shared by the tests: a real gateway, sample payloads, a TCP proxy that can drop connections,
// and waiting for a condition (never a sleep as an assertion).

import { createServer, type Server, type Socket, connect } from "node:net";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";

import { startGateway } from "../scripts/evbus-process.mjs";
import type { Published } from "../src/index.js";

export { startGateway };
export type Gateway = Awaited<ReturnType<typeof startGateway>>;

/** A valid `afterOrderCreate` payload (the catalogue's full schema: email and phone included). */
export function orderCreated(n: number): Published.AfterOrderCreate {
  return {
    createdBy: `user-${n}`,
    order: {
      _id: `order-${n}`,
      referenceId: `REF-${1000 + n}`,
      shopId: "shop-1",
      accountId: null,
      email: `customer${n}@example.com`,
      status: "new",
      currencyCode: "EUR",
      items: [{ productId: "p-1", variantId: "v-1", quantity: 1 + (n % 3), price: 9.5 }],
      shippingAddress: { fullName: "A Customer", address1: "1 Main St", city: "Berlin", postal: "10115", country: "DE", phone: "+49 30 1234" },
      totals: { subtotal: 9.5, total: 9.5 },
      createdAt: "2026-11-30T10:00:00Z",
    },
  };
}

export function uniqueId(prefix: string): string {
  return `${prefix}-${randomUUID()}`;
}

/** Resolves when `check()` returns true; rejects with `what` after `timeoutMs`. */
export async function waitFor(what: string, check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A promise with its resolve function outside. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/**
 * A TCP proxy in front of the gateway that the test can cut: `cut()` destroys every open
 * connection and refuses (accepts and closes at once) new ones until `restore()`.
 */
export class CuttableProxy {
  readonly #target: URL;
  readonly #server: Server;
  readonly #open = new Set<Socket>();
  readonly #pairs: [client: Socket, upstream: Socket][] = [];
  #refusing = false;
  /** Connections accepted and forwarded so far. */
  forwarded = 0;
  /** Connections refused while cut. */
  refused = 0;

  constructor(target: string) {
    this.#target = new URL(target);
    this.#server = createServer((client) => {
      if (this.#refusing) {
        this.refused++;
        client.destroy();
        return;
      }
      this.forwarded++;
      const upstream = connect(Number(this.#target.port), this.#target.hostname);
      for (const s of [client, upstream]) {
        this.#open.add(s);
        s.on("close", () => this.#open.delete(s));
        s.on("error", () => undefined);
      }
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
      client.pipe(upstream);
      upstream.pipe(client);
      this.#pairs.push([client, upstream]);
    });
  }

  async listen(): Promise<string> {
    await new Promise<void>((r) => this.#server.listen(0, "127.0.0.1", r));
    const address = this.#server.address();
    if (address === null || typeof address === "string") throw new Error("the proxy has no TCP address");
    return `http://127.0.0.1:${address.port}`;
  }

  cut(): void {
    this.#refusing = true;
    for (const s of this.#open) s.destroy();
  }

  /**
   * The open connections go silent: nothing more from the gateway reaches the client, but
   * neither side is closed (a half-dead connection). New connections are forwarded as usual.
   */
  stall(): void {
    for (const [client, upstream] of this.#pairs.splice(0)) {
      if (client.destroyed) continue;
      upstream.unpipe(client);
      upstream.pause();
    }
  }

  restore(): void {
    this.#refusing = false;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((r) => this.#server.close(() => r()));
  }
}

/**
 * `seen` holds every expected id exactly once: nothing lost, nothing repeated. (Not the
 * publishing order: the gateway streams its log's order, and events published one after the
 * other without a partition key may be logged in another order.)
 */
export function assertEveryOnce(seen: string[], expected: string[], what = "every event once"): void {
  const repeated = seen.filter((id, i) => seen.indexOf(id) !== i);
  assert.deepEqual(repeated, [], `${what}: repeated ${repeated.length}`);
  const missing = expected.filter((id) => !seen.includes(id));
  assert.deepEqual(missing, [], `${what}: lost ${missing.length}`);
  const unexpected = seen.filter((id) => !expected.includes(id));
  assert.deepEqual(unexpected, [], `${what}: unexpected ${unexpected.length}`);
}
