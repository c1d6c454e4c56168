// Subscribing through Server-Sent Events against a real `evbus serve`: resume after a dropped
// connection (through a TCP proxy the test cuts), resume across subscriptions, stopping, and
// the answers that end a subscription.

import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";

import { ConnectionError, EvbusClient, EvbusError, GatewayError, type DeliveredEvent } from "../src/index.js";
import { assertEveryOnce, CuttableProxy, deferred, orderCreated, startGateway, uniqueId, waitFor, type Gateway } from "./helpers.js";

describe("subscribe", () => {
  let gw: Gateway;
  let key: string;
  let publisher: EvbusClient;

  before(async () => {
    gw = await startGateway();
    key = await gw.createKey({ name: "orders", subscribe: ["afterOrderCreate"], publish: ["afterOrderCreate"], sources: ["/plugins/orders"] });
    publisher = new EvbusClient({ url: gw.url, apiKey: key, source: "/plugins/orders" });
  });
  after(async () => {
    await gw?.stop();
  });

  async function publish(ids: string[]): Promise<void> {
    for (const [i, id] of ids.entries()) await publisher.publish({ type: "afterOrderCreate", id, data: orderCreated(i) });
  }

  /** A subscription through a proxy that can cut it, recording its opens and drops. */
  async function throughProxy() {
    const proxy = new CuttableProxy(gw.url);
    const url = await proxy.listen();
    const client = new EvbusClient({ url, apiKey: key });
    const opens: { reconnected: boolean; lastEventId: string | undefined }[] = [];
    const drops: string[] = [];
    const stop = new AbortController();
    const sub = client.subscribe({
      types: ["afterOrderCreate"],
      signal: stop.signal,
      reconnect: { initialDelayMs: 50, maxDelayMs: 200 },
      onOpen: (info) => opens.push(info),
      onReconnect: ({ error }) => drops.push(error.message),
    });
    return { proxy, opens, drops, stop, sub };
  }

  test("a subscription dropped before its first event gets what was published while it reconnected", async () => {
    const { proxy, opens, drops, stop, sub } = await throughProxy();
    const seen: string[] = [];
    const consuming = (async () => {
      for await (const event of sub) seen.push(event.id);
    })();
    // The gateway's first frame is the stream's start position.
    await waitFor("the start position", () => sub.lastEventId !== undefined);
    proxy.cut();
    await waitFor("the client to see the drop", () => drops.length >= 1);
    const away = Array.from({ length: 3 }, (_, i) => uniqueId(`away-${i}`));
    await publish(away);
    await waitFor("a refused reconnection attempt", () => proxy.refused >= 1);
    proxy.restore();
    await waitFor("the client to reconnect", () => opens.length >= 2);
    assert.notEqual(opens[1]?.lastEventId, undefined, "the reconnection resumes from a position");
    await waitFor("the events published while it was away", () => away.every((id) => seen.includes(id)));
    stop.abort();
    await consuming;
    await proxy.close();
    assert.deepEqual(seen.filter((id) => away.includes(id)).sort(), [...away].sort());
  });

  test("resumes after a dropped connection with no loss and no duplicate", async () => {
    const { proxy, opens, drops, stop, sub } = await throughProxy();
    const seen: string[] = [];
    const before = Array.from({ length: 40 }, (_, i) => uniqueId(`before-${i}`));
    const during = Array.from({ length: 10 }, (_, i) => uniqueId(`during-${i}`));
    const afterwards = Array.from({ length: 5 }, (_, i) => uniqueId(`after-${i}`));
    const cutDone = deferred();
    const consuming = (async () => {
      for await (const event of sub) {
        seen.push(event.id);
        // Mid-stream: the connection is cut while the burst is still flowing.
        if (seen.length === 15) {
          proxy.cut();
          cutDone.resolve();
        }
      }
    })();
    await waitFor("the stream to open", () => opens.length === 1);
    await publish(before);
    await cutDone.promise;
    await waitFor("the client to see the drop", () => drops.length >= 1);
    // Published while the client cannot connect: it must get them after it reconnects.
    await publish(during);
    await waitFor("a refused reconnection attempt", () => proxy.refused >= 1);
    proxy.restore();
    await waitFor("the client to reconnect", () => opens.length >= 2);
    await publish(afterwards);
    await waitFor("every event", () => seen.length >= before.length + during.length + afterwards.length);
    // A repeat would come before an event logged after all of them: wait for one.
    const marker = uniqueId("marker");
    await publish([marker]);
    await waitFor("the marker", () => seen.includes(marker));
    seen.splice(seen.indexOf(marker), 1);
    stop.abort();
    await consuming;
    await proxy.close();

    assertEveryOnce(seen, [...before, ...during, ...afterwards]);
    assert.equal(opens[0]!.reconnected, false);
    assert.equal(opens[1]!.reconnected, true);
    assert.ok(opens[1]!.lastEventId !== undefined, "the reconnection sent Last-Event-ID");
    assert.ok(proxy.forwarded >= 2);
  });

  test("a silent connection (no keep-alive) is taken as dropped and resumed", async () => {
    const proxy = new CuttableProxy(gw.url);
    const url = await proxy.listen();
    const client = new EvbusClient({ url, apiKey: key });
    const opens: (string | undefined)[] = [];
    const drops: string[] = [];
    const stop = new AbortController();
    const sub = client.subscribe({
      types: ["afterOrderCreate"],
      signal: stop.signal,
      idleTimeoutMs: 300,
      reconnect: { initialDelayMs: 20, maxDelayMs: 50 },
      onOpen: ({ lastEventId }) => opens.push(lastEventId),
      onReconnect: ({ error }) => drops.push(error.message),
    });
    const ids = Array.from({ length: 6 }, (_, i) => uniqueId(`silent-${i}`));
    const seen: string[] = [];
    const consuming = (async () => {
      for await (const event of sub) seen.push(event.id);
    })();
    await waitFor("the stream to open", () => opens.length === 1);
    await publish(ids.slice(0, 3));
    await waitFor("the first events", () => seen.length === 3);
    proxy.stall();
    await publish(ids.slice(3));
    await waitFor("every event", () => seen.length >= ids.length);
    const marker = uniqueId("marker");
    await publish([marker]);
    await waitFor("the marker", () => seen.includes(marker));
    seen.splice(seen.indexOf(marker), 1);
    stop.abort();
    await consuming;
    await proxy.close();
    assertEveryOnce(seen, ids);
    assert.ok(drops.some((m) => /sent nothing for 300 ms/.test(m)), `drops: ${drops}`);
    assert.ok(opens.length >= 2 && opens[1] !== undefined, "the reconnection sent Last-Event-ID");
  });

  test("a revoked key ends the subscription with GatewayError 401", async () => {
    const admin = await gw.createKey({ name: "admin", admin: true });
    const doomed = await gw.createKey({ name: "doomed", subscribe: ["afterOrderCreate"] });
    const client = new EvbusClient({ url: gw.url, apiKey: doomed });
    const open = deferred();
    let reconnects = 0;
    const sub = client.subscribe({ types: ["afterOrderCreate"], reconnect: { initialDelayMs: 10 }, onOpen: () => open.resolve(), onReconnect: () => reconnects++ });
    const ended = (async () => {
      for await (const _ of sub) assert.fail("no event expected");
    })().catch((e: unknown) => e);
    await open.promise;
    const id = /^evb_([0-9a-f]+)_/.exec(doomed)![1]!;
    const revoked = await fetch(new URL(`/v1/keys/${id}`, gw.url), { method: "DELETE", headers: { authorization: `Bearer ${admin}` } });
    assert.equal(revoked.status, 204);
    const error = await ended;
    assert.ok(error instanceof GatewayError, String(error));
    assert.equal(error.status, 401);
    // The gateway ended the stream, the client tried once more and was refused for good.
    assert.equal(reconnects, 1);
  });

  test("resumes from a kept lastEventId in a new subscription", async () => {
    const first = deferred();
    const stop = new AbortController();
    const sub = publisher.subscribe({ types: ["afterOrderCreate"], signal: stop.signal, onOpen: () => first.resolve() });
    const ids = Array.from({ length: 6 }, (_, i) => uniqueId(`kept-${i}`));
    const seen: string[] = [];
    const consuming = (async () => {
      for await (const event of sub) {
        seen.push(event.id);
        if (seen.length === 3) break; // leaving the loop closes the connection
      }
    })();
    await first.promise;
    await publish(ids.slice(0, 3));
    await consuming;
    const kept = sub.lastEventId;
    assert.ok(kept !== undefined);
    assertEveryOnce(seen, ids.slice(0, 3));

    // Published while nobody listens.
    await publish(ids.slice(3));
    const resumed: string[] = [];
    for await (const event of publisher.subscribe({ types: ["afterOrderCreate"], lastEventId: kept })) {
      resumed.push(event.id);
      if (resumed.length === 3) break;
    }
    assertEveryOnce(resumed, ids.slice(3));
  });

  test("typed events: checking `type` narrows `data`", async () => {
    const open = deferred();
    const id = uniqueId("typed");
    const sub = publisher.subscribe({ types: ["afterOrderCreate"], onOpen: () => open.resolve() });
    const iterator = sub[Symbol.asyncIterator]();
    const next = iterator.next();
    await open.promise;
    await publish([id]);
    const { value } = await next;
    await iterator.return();
    const event = value as DeliveredEvent;
    assert.equal(event.id, id);
    if (event.type === "afterOrderCreate") {
      const createdBy: string = event.data!.createdBy;
      assert.equal(createdBy, "user-0");
    } else {
      assert.fail(`unexpected type ${event.type}`);
    }
  });

  test("an AbortSignal ends an idle iteration without an error", async () => {
    const open = deferred();
    const stop = new AbortController();
    const sub = publisher.subscribe({ types: ["afterOrderCreate"], signal: stop.signal, onOpen: () => open.resolve() });
    const done = (async () => {
      let n = 0;
      for await (const _ of sub) n++;
      return n;
    })();
    await open.promise;
    stop.abort();
    assert.equal(await done, 0);
  });

  test("a Last-Event-ID the gateway did not issue: GatewayError 400, no retry", async () => {
    let retries = 0;
    const sub = publisher.subscribe({ types: ["afterOrderCreate"], lastEventId: "0123456789abcdef01234567", onReconnect: () => retries++ });
    const error = await (async () => {
      for await (const _ of sub) assert.fail("no event expected");
    })().catch((e: unknown) => e);
    assert.ok(error instanceof GatewayError, String(error));
    assert.equal(error.status, 400);
    assert.match(error.detail, /Last-Event-ID/);
    assert.equal(retries, 0);
  });

  test("a type outside the key's scope: GatewayError 403", async () => {
    const sub = publisher.subscribe({ types: ["afterProductUpdate"] });
    const error = await (async () => {
      for await (const _ of sub) assert.fail("no event expected");
    })().catch((e: unknown) => e);
    assert.ok(error instanceof GatewayError);
    assert.equal(error.status, 403);
  });

  test("a gateway that stays away: the iterator throws after maxAttempts", async () => {
    const proxy = new CuttableProxy(gw.url);
    const url = await proxy.listen();
    proxy.cut();
    const client = new EvbusClient({ url, apiKey: key });
    const attempts: number[] = [];
    const sub = client.subscribe({
      types: ["afterOrderCreate"],
      reconnect: { initialDelayMs: 10, maxDelayMs: 40, maxAttempts: 3 },
      onReconnect: ({ attempt }) => attempts.push(attempt),
    });
    const error = await (async () => {
      for await (const _ of sub) assert.fail("no event expected");
    })().catch((e: unknown) => e);
    await proxy.close();
    assert.ok(error instanceof Error && error.name === "ConnectionError", String(error));
    assert.deepEqual(attempts, [1, 2, 3]);
    assert.equal(proxy.refused, 4);
  });
});

describe("subscribe: the stream position of an id without data", () => {
  test("a reconnection resumes from an `id` sent without data (the SSE standard's last event ID)", async () => {
    // A stand-in for a gateway that tells a fresh stream its position before any event (as
    // the evbus gateway does): `id` with no data, then the connection drops.
    const lastEventIds: (string | undefined)[] = [];
    const server = createServer((req, res) => {
      lastEventIds.push(req.headers["last-event-id"] as string | undefined);
      res.writeHead(200, { "content-type": "text/event-stream" });
      if (lastEventIds.length === 1) {
        res.end("id: position-1\n\n");
        return;
      }
      const event = { specversion: "1.0", id: "e1", source: "/s", type: "afterOrderCreate", data: orderCreated(1) };
      res.write(`id: position-2\nevent: afterOrderCreate\ndata: ${JSON.stringify(event)}\n\n`);
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const address = server.address();
    assert.ok(address !== null && typeof address === "object");
    try {
      const client = new EvbusClient({ url: `http://127.0.0.1:${address.port}`, apiKey: "evb_test_test" });
      const sub = client.subscribe({ types: ["afterOrderCreate"], reconnect: { initialDelayMs: 10 } });
      for await (const event of sub) {
        assert.equal(event.id, "e1");
        break;
      }
      assert.deepEqual(lastEventIds, [undefined, "position-1"]);
      assert.equal(sub.lastEventId, "position-2");
    } finally {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    }
  });
});

describe("subscribe: stopping and bad input (outside review)", () => {
  /** A stand-in gateway that sends `events` in one write on every stream, then stays open. */
  async function standIn(events: string[]) {
    let streams = 0;
    const server = createServer((_req, res) => {
      streams++;
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.write(
        events
          .map((id, i) => {
            const event = { specversion: "1.0", id, source: "/s", type: "afterOrderCreate", data: orderCreated(i) };
            return `id: p-${id}\nevent: afterOrderCreate\ndata: ${JSON.stringify(event)}\n\n`;
          })
          .join(""),
      );
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const address = server.address();
    assert.ok(address !== null && typeof address === "object");
    return {
      url: `http://127.0.0.1:${address.port}`,
      streams: () => streams,
      stop: async () => {
        server.closeAllConnections();
        await new Promise((r) => server.close(r));
      },
    };
  }

  test("after an abort, nothing more of the chunk being read is handed over", async () => {
    // Five events in one write: the consumer stops while handling the first. Before, the
    // loop handed over the other four.
    const gateway = await standIn(["e1", "e2", "e3", "e4", "e5"]);
    try {
      const stop = new AbortController();
      const sub = new EvbusClient({ url: gateway.url, apiKey: "evb_test_test" }).subscribe({ signal: stop.signal });
      const got: string[] = [];
      for await (const event of sub) {
        got.push(event.id);
        stop.abort();
      }
      assert.deepEqual(got, ["e1"]);
      const closed = new EvbusClient({ url: gateway.url, apiKey: "evb_test_test" }).subscribe({});
      const viaClose: string[] = [];
      for await (const event of closed) {
        viaClose.push(event.id);
        closed.close();
      }
      assert.deepEqual(viaClose, ["e1"]);
    } finally {
      await gateway.stop();
    }
  });

  test("ended subscriptions leave no listener on the caller's signal", async () => {
    // One process-wide signal, subscriptions ended by `break` and by an error: each left its
    // abort listener (and itself) on the signal, 15 after 15 subscriptions.
    const gateway = await standIn(["e1"]);
    try {
      const shutdown = new AbortController();
      const client = new EvbusClient({ url: gateway.url, apiKey: "evb_test_test" });
      for (let i = 0; i < 15; i++) {
        for await (const _ of client.subscribe({ signal: shutdown.signal })) break;
      }
      const refused = new EvbusClient({ url: "http://127.0.0.1:9", apiKey: "evb_test_test" });
      for (let i = 0; i < 3; i++) {
        const sub = refused.subscribe({ signal: shutdown.signal, reconnect: { initialDelayMs: 1, maxAttempts: 0 } });
        await (async () => {
          for await (const _ of sub) assert.fail("no event expected");
        })().catch(() => undefined);
      }
      assert.equal(getEventListeners(shutdown.signal, "abort").length, 0);
    } finally {
      await gateway.stop();
    }
  });

  test("a saved lastEventId that cannot be a header fails at once instead of reconnecting for ever", async () => {
    const gateway = await standIn(["e1"]);
    try {
      let reconnects = 0;
      const sub = new EvbusClient({ url: gateway.url, apiKey: "evb_test_test" }).subscribe({
        lastEventId: "curséur✓",
        reconnect: { initialDelayMs: 1 },
        onReconnect: () => reconnects++,
      });
      const error = await (async () => {
        for await (const _ of sub) assert.fail("no event expected");
      })().catch((e: unknown) => e);
      assert.ok(error instanceof EvbusError && !(error instanceof ConnectionError), String(error));
      assert.match(error.message, /lastEventId/);
      assert.equal(reconnects, 0);
      assert.equal(gateway.streams(), 0);
    } finally {
      await gateway.stop();
    }
  });

  test("a gateway URL with credentials or a key that cannot be a header is refused up front", () => {
    assert.throws(
      () => new EvbusClient({ url: "http://user:pw@127.0.0.1:8080", apiKey: "evb_a_b" }),
      (e: unknown) => e instanceof EvbusError && /credentials/.test(e.message) && !e.message.includes("pw"),
    );
    assert.throws(() => new EvbusClient({ url: "http://127.0.0.1:8080", apiKey: "évb_a_b" }), EvbusError);
  });
});
