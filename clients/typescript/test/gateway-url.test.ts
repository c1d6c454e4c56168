// The client against a real `evbus serve`: a gateway behind a reverse proxy that serves it
// under a path prefix, and the shape of `GET /v1/event-types` compared with `EventTypeInfo`.

import assert from "node:assert/strict";
import { createServer, request, type Server } from "node:http";
import { after, before, describe, test } from "node:test";

import { EvbusClient, type EventTypeInfo } from "../src/index.js";
import { deferred, orderCreated, startGateway, uniqueId, waitFor, type Gateway } from "./helpers.js";

/** An HTTP reverse proxy that serves `target` under `prefix` and answers 404 to anything else. */
async function prefixProxy(target: string, prefix: string): Promise<{ url: string; server: Server }> {
  const upstream = new URL(target);
  const server = createServer((req, res) => {
    const path = req.url ?? "/";
    if (!path.startsWith(`${prefix}/`)) {
      res.writeHead(404, { "content-type": "text/plain" }).end("not under the prefix");
      return;
    }
    const forwarded = request(
      { host: upstream.hostname, port: upstream.port, method: req.method, path: path.slice(prefix.length), headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      },
    );
    forwarded.on("error", () => res.destroy());
    req.pipe(forwarded);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("the proxy has no TCP address");
  return { url: `http://127.0.0.1:${address.port}`, server };
}

describe("a gateway served under a path prefix", () => {
  let gw: Gateway;
  let proxy: { url: string; server: Server };
  let key: string;

  before(async () => {
    gw = await startGateway();
    key = await gw.createKey({ name: "prefixed", subscribe: ["afterOrderCreate"], publish: ["afterOrderCreate"], sources: ["/prefixed"] });
    proxy = await prefixProxy(gw.url, "/evbus");
  });

  after(async () => {
    proxy?.server.closeAllConnections();
    // No proxy when `before` failed: nothing to wait for (a promise never settled would hang the run).
    if (proxy) await new Promise((r) => proxy.server.close(r));
    await gw?.stop();
  });

  for (const base of ["/evbus", "/evbus/"]) {
    test(`url ending in ${base}: publish, subscribe and event types go under the prefix`, async () => {
      const client = new EvbusClient({ url: `${proxy.url}${base}`, apiKey: key, source: "/prefixed" });
      const types = await client.eventTypes();
      assert.deepEqual(types.map((t) => t.type), ["afterOrderCreate"]);

      const stop = new AbortController();
      const open = deferred();
      const received: string[] = [];
      const sub = client.subscribe({ types: ["afterOrderCreate"], signal: stop.signal, onOpen: () => open.resolve() });
      const streaming = (async () => {
        for await (const event of sub) received.push(event.id);
      })();
      await Promise.race([open.promise, streaming]);
      const id = uniqueId("prefixed");
      const answer = await client.publish({ type: "afterOrderCreate", id, data: orderCreated(1) });
      assert.equal(answer.id, id);
      await waitFor(`event ${id} on the stream`, () => received.includes(id));
      stop.abort();
      await streaming;
    });
  }
});

describe("GET /v1/event-types", () => {
  let gw: Gateway;

  before(async () => {
    gw = await startGateway();
  });

  after(async () => {
    await gw?.stop();
  });

  test("EventTypeInfo declares every member the gateway answers", async () => {
    const key = await gw.createKey({ name: "types", subscribe: ["afterOrderCreate"] });
    const [info] = await new EvbusClient({ url: gw.url, apiKey: key }).eventTypes();
    assert.ok(info);
    // Compiles only while EventTypeInfo has exactly these members.
    const declared = { type: true, subscribe: true, publish: true, version: true, dataschema: true, description: true, schema: true, example: true, versions: true } satisfies Record<
      keyof EventTypeInfo,
      true
    >;
    assert.deepEqual(Object.keys(info).sort(), Object.keys(declared).sort());
    // The typed members hold what their types say.
    const first = info.versions[0];
    assert.ok(first);
    assert.equal(typeof first.version, "number");
    assert.equal(typeof first.dataschema, "string");
    assert.equal(typeof first.schema, "object");
    assert.equal(typeof info.example, "object");
  });
});
