// Publishing against a real `evbus serve`: structured and binary mode, what subscribers then
// receive, and the gateway's problem answers as typed errors.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { EvbusClient, GatewayError, ConnectionError, type DeliveredEvent } from "../src/index.js";
import { deferred, orderCreated, startGateway, uniqueId, waitFor, type Gateway } from "./helpers.js";

describe("publish", () => {
  let gw: Gateway;
  let client: EvbusClient;
  let received: DeliveredEvent<"afterOrderCreate">[];
  let stop: AbortController;
  let streaming: Promise<void>;

  before(async () => {
    gw = await startGateway();
    // Bound to the client's source and the sources under it (the binary-mode test's).
    const key = await gw.createKey({ name: "orders", subscribe: ["afterOrderCreate"], publish: ["afterOrderCreate"], sources: ["/plugins/orders", "/plugins/orders/*"] });
    client = new EvbusClient({ url: gw.url, apiKey: key, source: "/plugins/orders" });
    // Everything published here is read back from the stream.
    received = [];
    stop = new AbortController();
    const open = deferred();
    const sub = client.subscribe({ types: ["afterOrderCreate"], signal: stop.signal, onOpen: () => open.resolve() });
    streaming = (async () => {
      for await (const event of sub) received.push(event);
    })();
    await open.promise;
  });

  after(async () => {
    stop?.abort();
    await streaming;
    await gw?.stop();
  });

  async function delivered(id: string): Promise<DeliveredEvent<"afterOrderCreate">> {
    await waitFor(`event ${id} on the stream`, () => received.some((e) => e.id === id));
    return received.find((e) => e.id === id)!;
  }

  test("structured mode: accepted with the producer's id, delivered curated", async () => {
    const id = uniqueId("structured");
    const result = await client.publish({ type: "afterOrderCreate", id, subject: "order-1", data: orderCreated(1) });
    assert.equal(result.id, id);
    const event = await delivered(id);
    assert.equal(event.type, "afterOrderCreate");
    assert.equal(event.source, "/plugins/orders");
    assert.equal(event.subject, "order-1");
    assert.equal(event.data?.createdBy, "user-1");
    assert.equal(event.data?.order.referenceId, "REF-1001");
    // Curation: the catalogue redacts the customer's email and phone.
    assert.equal("email" in (event.data?.order ?? {}), false);
    assert.equal("phone" in (event.data?.order.shippingAddress ?? {}), false);
  });

  test("binary mode: ce-* headers (percent-encoded) and the data as the body", async () => {
    const id = uniqueId("binary");
    const source = "/plugins/orders/zürich shop";
    const result = await client.publish(
      { type: "afterOrderCreate", id, source, subject: "commande n°2", data: orderCreated(2) },
      { mode: "binary" },
    );
    assert.equal(result.id, id);
    const event = await delivered(id);
    assert.equal(event.source, source);
    assert.equal(event.subject, "commande n°2");
    assert.equal(event.data?.createdBy, "user-2");
  });

  test("the same event posted twice is accepted twice and delivered once", async () => {
    const id = uniqueId("twice");
    const event = { type: "afterOrderCreate" as const, id, time: "2026-11-30T10:00:00Z", data: orderCreated(3) };
    await client.publish(event);
    await client.publish(event, { mode: "binary" });
    // A later event on the same stream: once it is there, an earlier duplicate would be too.
    const marker = uniqueId("marker");
    await client.publish({ type: "afterOrderCreate", id: marker, data: orderCreated(4) });
    await delivered(marker);
    assert.equal(received.filter((e) => e.id === id).length, 1);
  });

  test("422: the violations by JSON pointer and rule", async () => {
    const data = orderCreated(5) as unknown as { order: Record<string, unknown> };
    delete data.order.email;
    data.order.currencyCode = "euro";
    const error = await client.publishEvent({ type: "afterOrderCreate", data }).catch((e: unknown) => e);
    assert.ok(error instanceof GatewayError, String(error));
    assert.equal(error.status, 422);
    assert.equal(error.title, "Unprocessable Entity");
    assert.match(error.detail, /breaks the schema/);
    const rules = error.violations.map((v) => `${v.pointer} ${v.keyword}`).sort();
    assert.deepEqual(rules, ["/order/currencyCode pattern", "/order/email required"]);
    assert.equal(error.problem.violations_total, 2);
  });

  test("409: different content under an id already accepted", async () => {
    const id = uniqueId("conflict");
    await client.publish({ type: "afterOrderCreate", id, data: orderCreated(6) });
    const error = await client.publish({ type: "afterOrderCreate", id, data: orderCreated(7) }).catch((e: unknown) => e);
    assert.ok(error instanceof GatewayError);
    assert.equal(error.status, 409);
    assert.equal(error.title, "Conflict");
  });

  test("413: an event far over the gateway's body limit, not a connection error, and not retried", async () => {
    // 8 MiB against the default 1 MiB: the gateway answered before reading the body and
    // closed the connection under the upload, which fetch reported as `write EPIPE` (a
    // ConnectionError, retried with `retry`) instead of the 413 (outside review).
    let retries = 0;
    const big = { ...orderCreated(8), padding: "x".repeat(8 * 1024 * 1024) };
    const error = await client
      .publish({ type: "afterOrderCreate", data: big as ReturnType<typeof orderCreated> }, { retry: { attempts: 3, baseDelayMs: 1, onRetry: () => retries++ } })
      .catch((e: unknown) => e);
    assert.ok(error instanceof GatewayError, String(error));
    assert.equal(error.status, 413);
    assert.match(error.detail, /max_body_bytes/);
    assert.equal(retries, 0);
  });

  test("403: a type outside the key's publish scope; 401: an unknown key", async () => {
    const error = await client
      .publish({ type: "afterOrderUpdate", data: { order: orderCreated(8).order, updatedBy: "u" } })
      .catch((e: unknown) => e);
    assert.ok(error instanceof GatewayError);
    assert.equal(error.status, 403);
    assert.match(error.detail, /may not publish/);

    const stranger = new EvbusClient({ url: gw.url, apiKey: `evb_${"0".repeat(16)}_${"0".repeat(64)}`, source: "/x" });
    const denied = await stranger.publish({ type: "afterOrderCreate", data: orderCreated(9) }).catch((e: unknown) => e);
    assert.ok(denied instanceof GatewayError);
    assert.equal(denied.status, 401);
    assert.equal(denied.retryable, false);
  });

  test("403: a source none of the key's sources matches, and nothing is delivered", async () => {
    // The key is bound to "/plugins/orders" and "/plugins/orders/*": a source is matched whole.
    const refused: string[] = [];
    for (const [n, source, mode] of [
      [20, "/plugins/payments", "structured"],
      [21, "/plugins/orders-eu", "structured"],
      [22, "/plugins", "binary"],
      [23, "https://shop.example/plugins/orders", "binary"],
    ] as const) {
      const id = uniqueId("wrong-source");
      const error = await client.publish({ type: "afterOrderCreate", id, source, data: orderCreated(n) }, { mode }).catch((e: unknown) => e);
      assert.ok(error instanceof GatewayError, `${source}: ${String(error)}`);
      assert.equal(error.status, 403, source);
      assert.equal(error.title, "Forbidden");
      assert.match(error.detail, /may not publish under this `source`/);
      assert.equal(error.retryable, false);
      refused.push(id);
    }
    // A later event under a source the key is bound to (by its pattern): once it is on the
    // stream, a refused event that had been kept would be there too.
    const marker = uniqueId("after-refusals");
    await client.publish({ type: "afterOrderCreate", id: marker, source: "/plugins/orders/eu", data: orderCreated(24) });
    assert.equal((await delivered(marker)).source, "/plugins/orders/eu");
    assert.deepEqual(received.filter((e) => refused.includes(e.id)).map((e) => e.id), [], "no refused event is delivered");
  });

  test("a gateway that is not there: ConnectionError", async () => {
    const nowhere = new EvbusClient({ url: "http://127.0.0.1:9", apiKey: "evb_x_y", source: "/x" });
    const error = await nowhere.publish({ type: "afterOrderCreate", data: orderCreated(10) }).catch((e: unknown) => e);
    assert.ok(error instanceof ConnectionError, String(error));
    assert.match(error.message, /POST \/v1\/events failed/);
  });
});

describe("publish under the rate limit", () => {
  let gw: Gateway;
  let key: string;

  before(async () => {
    // One request per second, no burst: the second request of a second is answered 429.
    gw = await startGateway({ args: ["--rate-limit", "1", "--rate-limit-burst", "1"] });
    key = await gw.createKey({ name: "slow", publish: ["afterOrderCreate"], sources: ["/plugins/orders"] });
  });
  after(async () => {
    await gw?.stop();
  });

  test("429 with Retry-After as a GatewayError, then honoured when retry is asked", async () => {
    const client = new EvbusClient({ url: gw.url, apiKey: key, source: "/plugins/orders" });
    await client.publish({ type: "afterOrderCreate", data: orderCreated(11) });
    const error = await client.publish({ type: "afterOrderCreate", data: orderCreated(12) }).catch((e: unknown) => e);
    assert.ok(error instanceof GatewayError);
    assert.equal(error.status, 429);
    assert.equal(error.retryable, true);
    assert.ok(error.retryAfter !== undefined && error.retryAfter >= 1, `Retry-After: ${error.retryAfter}`);

    const waits: number[] = [];
    const started = Date.now();
    const id = uniqueId("retried");
    const result = await client.publish(
      { type: "afterOrderCreate", id, data: orderCreated(13) },
      { retry: { attempts: 5, onRetry: ({ delayMs, error: e }) => waits.push(e instanceof GatewayError && e.status === 429 ? delayMs : -1) } },
    );
    assert.equal(result.id, id);
    assert.ok(waits.length >= 1, "the first try was refused, so there was a retry");
    assert.ok(waits.every((w) => w >= 1000), `every wait is the gateway's Retry-After: ${waits}`);
    assert.ok(Date.now() - started >= 1000);
  });

  test("a Retry-After longer than maxDelayMs is not waited for", async () => {
    const client = new EvbusClient({ url: gw.url, apiKey: key, source: "/plugins/orders" });
    // Use up this second's token, then ask with a ceiling below the gateway's Retry-After.
    await client.publish({ type: "afterOrderCreate", data: orderCreated(14) }, { retry: { attempts: 5 } });
    let retried = 0;
    const error = await client
      .publish({ type: "afterOrderCreate", data: orderCreated(15) }, { retry: { attempts: 5, maxDelayMs: 100, onRetry: () => retried++ } })
      .catch((e: unknown) => e);
    assert.ok(error instanceof GatewayError);
    assert.equal(error.status, 429);
    assert.equal(retried, 0);
  });
});

describe("publish: answers that do not say whether the event was taken", () => {
  test("408, 500 and 504 are retried with the same id when retry is asked, not otherwise", async () => {
    // A stand-in gateway: the first posts time out (408 from the gateway's request timeout,
    // then a 500, then a proxy's 504), the fourth is accepted.
    const { createServer } = await import("node:http");
    const answers = [408, 500, 504];
    const ids: string[] = [];
    const server = createServer((req, res) => {
      let body = "";
      req.on("data", (chunk: Buffer) => (body += chunk.toString()));
      req.on("end", () => {
        const id = (JSON.parse(body) as { id: string }).id;
        ids.push(id);
        const status = answers[ids.length - 1];
        if (status !== undefined) {
          res.writeHead(status, { "content-type": "application/problem+json" });
          res.end(JSON.stringify({ type: "about:blank", title: "failed", status }));
          return;
        }
        res.writeHead(202, { "content-type": "application/json" }).end(JSON.stringify({ id }));
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const address = server.address();
    assert.ok(address !== null && typeof address === "object");
    try {
      const client = new EvbusClient({ url: `http://127.0.0.1:${address.port}`, apiKey: "evb_test_test", source: "/s" });
      const statuses: number[] = [];
      const result = await client.publish(
        { type: "afterOrderCreate", data: orderCreated(1) },
        { retry: { attempts: 5, baseDelayMs: 1, onRetry: ({ error }) => statuses.push(error instanceof GatewayError ? error.status : 0) } },
      );
      assert.deepEqual(statuses, [408, 500, 504]);
      assert.equal(ids.length, 4);
      assert.ok(ids.every((id) => id === result.id), `one id for every try: ${ids.join(", ")}`);
      // Without retry the first 408 is thrown.
      answers.splice(0, answers.length, 408);
      ids.length = 0;
      const error = await client.publish({ type: "afterOrderCreate", data: orderCreated(2) }).catch((e: unknown) => e);
      assert.ok(error instanceof GatewayError && error.status === 408 && error.retryable, String(error));
      assert.equal(ids.length, 1);
    } finally {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    }
  });
});
