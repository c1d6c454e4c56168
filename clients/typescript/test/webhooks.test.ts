// Verifying a real webhook delivery: `evbus serve` posts to a local node http server, and the
// delivery is checked with the endpoint's secret (valid), after a change (tampered), and
// signed correctly but with a timestamp outside the tolerance (expired, and from the future).

import assert from "node:assert/strict";
import { createHash, createHmac } from "node:crypto";
import { createServer, type IncomingHttpHeaders, type Server } from "node:http";
import { after, before, describe, test } from "node:test";

import { EvbusClient, EvbusError, WebhookVerificationError, WebhookVerifier, verifyWebhook } from "../src/index.js";
import { Webhook } from "standardwebhooks";
import { orderCreated, startGateway, uniqueId, waitFor, type Gateway } from "./helpers.js";

interface Delivery {
  body: Buffer;
  headers: IncomingHttpHeaders;
}

/**
 * The gateway's `webhook-id` of the event (`source`, `id`): `msg_` + the first 32 hex digits of
 * SHA-256 over the source's byte length (8 bytes, big endian), the source, then the id
 * (`crates/evbus-gateway/src/signing.rs`, `message_id`).
 */
function messageId(source: string, id: string): string {
  const length = Buffer.alloc(8);
  length.writeBigUInt64BE(BigInt(Buffer.byteLength(source, "utf8")));
  return `msg_${createHash("sha256").update(length).update(source, "utf8").update(id, "utf8").digest("hex").slice(0, 32)}`;
}

describe("webhook verification", () => {
  let gw: Gateway;
  let receiver: Server;
  const deliveries: Delivery[] = [];
  let secret: string;
  let delivery: Delivery;
  let eventId: string;

  before(async () => {
    gw = await startGateway();
    const key = await gw.createKey({ name: "hooks", subscribe: ["afterOrderCreate"], publish: ["afterOrderCreate"], sources: ["/plugins/orders"] });
    receiver = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        deliveries.push({ body: Buffer.concat(chunks), headers: req.headers });
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((r) => receiver.listen(0, "127.0.0.1", r));
    const address = receiver.address();
    assert.ok(address !== null && typeof address === "object");
    const registered = await fetch(new URL("/v1/webhooks", gw.url), {
      method: "POST",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
      body: JSON.stringify({ url: `http://127.0.0.1:${address.port}/hooks/evbus`, event_types: ["afterOrderCreate"] }),
    });
    assert.equal(registered.status, 201, await registered.clone().text());
    secret = ((await registered.json()) as { secret: string }).secret;
    assert.match(secret, /^whsec_/);

    eventId = uniqueId("hook");
    const client = new EvbusClient({ url: gw.url, apiKey: key, source: "/plugins/orders" });
    await client.publish({ type: "afterOrderCreate", id: eventId, data: orderCreated(1) });
    await waitFor("the webhook delivery", () => deliveries.length >= 1);
    delivery = deliveries[0]!;
  });

  after(async () => {
    await gw?.stop();
    await new Promise<void>((r) => (receiver ? receiver.close(() => r()) : r()));
  });

  test("valid: the delivery verifies and carries the curated event", () => {
    assert.equal(delivery.headers["webhook-id"], messageId("/plugins/orders", eventId));
    const event = verifyWebhook<"afterOrderCreate">(secret, delivery.body, delivery.headers);
    assert.equal(event.id, eventId);
    assert.equal(event.type, "afterOrderCreate");
    assert.equal(event.source, "/plugins/orders");
    assert.equal(event.data?.createdBy, "user-1");
    assert.equal("email" in (event.data?.order ?? {}), false, "the email is redacted");
    // The same with the body as a string and the headers as fetch Headers.
    const headers = new Headers();
    for (const name of ["webhook-id", "webhook-timestamp", "webhook-signature"]) headers.set(name, String(delivery.headers[name]));
    assert.equal(new WebhookVerifier(secret).verify(delivery.body.toString("utf8"), headers).id, eventId);
  });

  test("tampered: a changed body, id or signature is refused", () => {
    const body = delivery.body.toString("utf8").replace("user-1", "user-2");
    assert.notEqual(body, delivery.body.toString("utf8"));
    assert.throws(() => verifyWebhook(secret, body, delivery.headers), (e: unknown) => e instanceof WebhookVerificationError && /No matching signature/.test(e.message));
    assert.throws(
      () => verifyWebhook(secret, delivery.body, { ...delivery.headers, "webhook-id": `${eventId}x` }),
      (e: unknown) => e instanceof WebhookVerificationError && /No matching signature/.test(e.message),
    );
    const otherSecret = `whsec_${Buffer.alloc(32, 7).toString("base64")}`;
    assert.throws(() => verifyWebhook(otherSecret, delivery.body, delivery.headers), WebhookVerificationError);
    const { "webhook-signature": _dropped, ...unsigned } = delivery.headers;
    assert.throws(() => verifyWebhook(secret, delivery.body, unsigned), (e: unknown) => e instanceof WebhookVerificationError && /Missing required headers/.test(e.message));
  });

  test("expired timestamp: correctly signed, but older than the 5-minute tolerance", () => {
    // Replay of the real delivery 10 minutes later: re-signed with the endpoint's own secret,
    // so only the timestamp is wrong.
    const signer = new Webhook(secret);
    const old = new Date(Date.now() - 10 * 60 * 1000);
    const headers = {
      "webhook-id": eventId,
      "webhook-timestamp": String(Math.floor(old.getTime() / 1000)),
      "webhook-signature": signer.sign(eventId, old, delivery.body),
    };
    assert.throws(() => verifyWebhook(secret, delivery.body, headers), (e: unknown) => e instanceof WebhookVerificationError && /too old/.test(e.message));
    // Within the tolerance the same construction verifies: what failed was the age alone.
    const recent = new Date(Date.now() - 60 * 1000);
    const fresh = { ...headers, "webhook-timestamp": String(Math.floor(recent.getTime() / 1000)), "webhook-signature": signer.sign(eventId, recent, delivery.body) };
    assert.equal(verifyWebhook(secret, delivery.body, fresh).id, eventId);
    // From the future, too.
    const later = new Date(Date.now() + 10 * 60 * 1000);
    const future = { ...headers, "webhook-timestamp": String(Math.floor(later.getTime() / 1000)), "webhook-signature": signer.sign(eventId, later, delivery.body) };
    assert.throws(() => verifyWebhook(secret, delivery.body, future), (e: unknown) => e instanceof WebhookVerificationError && /too new/.test(e.message));
  });
});

describe("webhook verification: a signed body that is not an event", () => {
  const secret = `whsec_${Buffer.alloc(32, 9).toString("base64")}`;

  /** Signs `body` as the gateway does (`crates/evbus-gateway/src/signing.rs`). */
  function signed(body: Uint8Array): Record<string, string> {
    const timestamp = String(Math.floor(Date.now() / 1000));
    const mac = createHmac("sha256", Buffer.from(secret.slice("whsec_".length), "base64"));
    mac.update(`m1.${timestamp}.`).update(body);
    return { "webhook-id": "m1", "webhook-timestamp": timestamp, "webhook-signature": `v1,${mac.digest("base64")}` };
  }

  test("a signed body that is not JSON is an EvbusError, not a bare SyntaxError", () => {
    const body = Buffer.from("not json");
    assert.throws(
      () => verifyWebhook(secret, body, signed(body)),
      (e: unknown) => e instanceof EvbusError && !(e instanceof WebhookVerificationError) && /signed but is not JSON/.test(e.message),
    );
  });
});
