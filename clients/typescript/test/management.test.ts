// The management calls against a real `evbus serve`: webhooks (register, list, get, change,
// delete, rotate the secret, delivery attempts, replay) with a key that may subscribe, and API
// keys (create, list, revoke) with an admin key; each with the gateway's refusals as typed
// errors. Deliveries go to a local node http server and are verified with the secrets answered.

import assert from "node:assert/strict";
import { createServer, type IncomingHttpHeaders, type Server } from "node:http";
import { after, before, describe, test } from "node:test";

import {
  ConnectionError,
  EvbusClient,
  EvbusError,
  GatewayError,
  WebhookVerificationError,
  WebhookVerifier,
  type KeyInfo,
  type NewKey,
  type NewWebhook,
  type ReplayResult,
  type RotatedSecret,
  type WebhookAttempt,
  type WebhookInfo,
} from "../src/index.js";
import { orderCreated, startGateway, uniqueId, waitFor, type Gateway } from "./helpers.js";

interface Delivery {
  path: string;
  body: Buffer;
  headers: IncomingHttpHeaders;
}

/** A receiver of deliveries: every POST is kept, with its path; the answer is `status`. */
class Receiver {
  readonly deliveries: Delivery[] = [];
  status = 204;
  readonly #server: Server;
  #base = "";

  constructor() {
    this.#server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        this.deliveries.push({ path: req.url ?? "", body: Buffer.concat(chunks), headers: req.headers });
        res.writeHead(this.status).end();
      });
    });
  }

  async listen(): Promise<void> {
    await new Promise<void>((r) => this.#server.listen(0, "127.0.0.1", r));
    const address = this.#server.address();
    assert.ok(address !== null && typeof address === "object");
    this.#base = `http://127.0.0.1:${address.port}`;
  }

  /** A URL of this receiver under its own path. */
  url(path: string): string {
    return `${this.#base}/hooks/${path}`;
  }

  /** The deliveries to `path` of event `eventId` (the body's `id`; the `webhook-id` header is derived from it and the `source`). */
  of(path: string, eventId: string): Delivery[] {
    return this.deliveries.filter((d) => d.path === `/hooks/${path}` && (JSON.parse(d.body.toString("utf8")) as { id?: string }).id === eventId);
  }

  async close(): Promise<void> {
    this.#server.closeAllConnections();
    await new Promise((r) => this.#server.close(r));
  }
}

/** The GatewayError `promise` rejects with (fails if it resolves or rejects with anything else). */
async function gatewayError(promise: Promise<unknown>): Promise<GatewayError> {
  const error = await promise.then(
    (value: unknown) => new Error(`expected a GatewayError, the call answered ${JSON.stringify(value)}`),
    (e: unknown) => e,
  );
  assert.ok(error instanceof GatewayError, `expected a GatewayError, got ${String(error)}`);
  return error;
}

/** Reads until `ok` holds (the gateway writes some things just after the receiver saw them). */
async function eventually<T>(what: string, read: () => Promise<T>, ok: (value: T) => boolean, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await read();
    if (ok(value)) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last read: ${JSON.stringify(value)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * `record` with its `created_at` as a number of ms: a creation answers the time with the
 * clock's precision, later reads with the store's (ms), the same instant.
 */
function atMs<T extends { created_at: string }>(record: T): Omit<T, "created_at"> & { created_at: number } {
  return { ...record, created_at: Date.parse(record.created_at) };
}

function assertTime(value: unknown, what: string): number {
  assert.equal(typeof value, "string", what);
  const at = Date.parse(value as string);
  assert.ok(!Number.isNaN(at), `${what} is a date-time: ${String(value)}`);
  return at;
}

const UNKNOWN_WEBHOOK = "wh_0000000000000000000000000000000000";

describe("webhooks", () => {
  let gw: Gateway;
  let receiver: Receiver;
  /** subscribe and publish afterOrderCreate and afterOrderUpdate: registers and feeds webhooks. */
  let owner: EvbusClient;
  /** Another integrator: subscribe afterOrderCreate. */
  let other: EvbusClient;
  let admin: EvbusClient;

  before(async () => {
    gw = await startGateway();
    receiver = new Receiver();
    await receiver.listen();
    const types = ["afterOrderCreate", "afterOrderUpdate"];
    owner = new EvbusClient({
      url: gw.url,
      apiKey: await gw.createKey({ name: "owner", subscribe: types, publish: types, sources: ["/plugins/orders"] }),
      source: "/plugins/orders",
    });
    other = new EvbusClient({ url: gw.url, apiKey: await gw.createKey({ name: "other", subscribe: ["afterOrderCreate"] }) });
    admin = new EvbusClient({ url: gw.url, apiKey: await gw.createKey({ name: "admin", admin: true }) });
  });

  after(async () => {
    await gw?.stop();
    await receiver?.close();
  });

  test("createWebhook: 201 with every member and the secret; getWebhook and listWebhooks never show the secret", async () => {
    const created = await owner.createWebhook({
      url: receiver.url("create"),
      event_types: ["afterOrderUpdate", "afterOrderCreate", "afterOrderCreate"],
      description: "ERP order import",
    });
    const declared = {
      id: true, url: true, event_types: true, description: true, allow: true, enabled: true, disabled_reason: true, failing_since: true, created_at: true, secret: true,
    } satisfies Record<keyof NewWebhook, true>;
    assert.deepEqual(Object.keys(created).sort(), Object.keys(declared).sort());
    assert.match(created.id, /^wh_[0-9a-f]{32}$/);
    assert.match(created.secret, /^whsec_/);
    assert.equal(created.url, receiver.url("create"));
    assert.deepEqual(created.event_types, ["afterOrderCreate", "afterOrderUpdate"], "sorted, without duplicates");
    assert.equal(created.description, "ERP order import");
    assert.equal(created.allow, null);
    assert.equal(created.enabled, true);
    assert.equal(created.disabled_reason, null);
    assert.equal(created.failing_since, null);
    assert.ok(Math.abs(assertTime(created.created_at, "created_at") - Date.now()) < 60_000);

    const { secret: _secret, ...rest } = created;
    const info = atMs(rest satisfies WebhookInfo);
    const got = await owner.getWebhook(created.id);
    assert.deepEqual(atMs(got), info);
    assert.equal("secret" in got, false);

    const mine = await owner.listWebhooks();
    const listed = mine.find((w) => w.id === created.id);
    assert.ok(listed);
    assert.deepEqual(atMs(listed), info);
    assert.ok(mine.every((w) => !("secret" in w)));
    // Another key does not see it; an admin key sees every key's webhooks.
    assert.equal((await other.listWebhooks()).some((w) => w.id === created.id), false);
    const all = await admin.listWebhooks();
    assert.deepEqual(all.filter((w) => w.id === created.id).map(atMs), [info]);
    assert.deepEqual(atMs(await admin.getWebhook(created.id)), info);
  });

  test("createWebhook: an allow-list is kept; 400, 403 and 422 refusals", async () => {
    const narrow = await owner.createWebhook({ url: receiver.url("narrow"), event_types: ["afterOrderCreate"], allow: ["/order/referenceId"] });
    assert.deepEqual(narrow.allow, ["/order/referenceId"]);
    assert.equal(narrow.description, "");

    // 403: a type outside the key's subscribe scope, named by its position.
    const denied = await gatewayError(other.createWebhook({ url: receiver.url("x"), event_types: ["afterOrderCreate", "afterOrderUpdate"] }));
    assert.equal(denied.status, 403);
    assert.deepEqual(denied.problem.denied_positions, [1]);

    // 422: an address the gateway may not call (private, not in --webhook-allow), or not http(s).
    for (const url of ["http://10.11.12.13/hooks", "ftp://127.0.0.1/hooks", "not a url"]) {
      const refused = await gatewayError(owner.createWebhook({ url, event_types: ["afterOrderCreate"] }));
      assert.equal(refused.status, 422, `${url}: ${refused.message}`);
      assert.equal(refused.title, "Unprocessable Entity");
    }

    // 400: no event type, a member the endpoint does not take, a pointer that is not one.
    const empty = await gatewayError(owner.createWebhook({ url: receiver.url("x"), event_types: [] }));
    assert.equal(empty.status, 400);
    assert.match(empty.detail, /at least one event type/);
    const unknown = await gatewayError(owner.createWebhook({ url: receiver.url("x"), event_types: ["afterOrderCreate"], secret: "mine" } as never));
    assert.equal(unknown.status, 400);
    assert.match(unknown.detail, /a field this endpoint does not take/);
    const pointer = await gatewayError(owner.createWebhook({ url: receiver.url("x"), event_types: ["afterOrderCreate"], allow: ["order"] }));
    assert.equal(pointer.status, 400);
    assert.equal(pointer.problem.position, 0);

    // None of the refused ones was registered.
    assert.deepEqual((await owner.listWebhooks()).filter((w) => w.url === receiver.url("x")), []);
  });

  test("updateWebhook: event types, description, disable and re-enable; 400, 403 and 404", async () => {
    const hook = await owner.createWebhook({ url: receiver.url("update"), event_types: ["afterOrderCreate"], description: "before" });
    const changed = await owner.updateWebhook(hook.id, { event_types: ["afterOrderUpdate", "afterOrderCreate"], description: "after" });
    assert.deepEqual(changed.event_types, ["afterOrderCreate", "afterOrderUpdate"]);
    assert.equal(changed.description, "after");
    assert.equal(changed.url, hook.url, "what was not named stays");
    assert.deepEqual(await owner.getWebhook(hook.id), changed);

    const disabled = await owner.updateWebhook(hook.id, { enabled: false });
    assert.equal(disabled.enabled, false);
    assert.equal(disabled.disabled_reason, "disabled by its owner");
    assert.equal(disabled.description, "after");
    const enabled = await owner.updateWebhook(hook.id, { enabled: true });
    assert.equal(enabled.enabled, true);
    assert.equal(enabled.disabled_reason, null);

    const empty = await gatewayError(owner.updateWebhook(hook.id, { event_types: [] }));
    assert.equal(empty.status, 400);
    const url = await gatewayError(owner.updateWebhook(hook.id, { url: "http://127.0.0.1/elsewhere" } as never));
    assert.equal(url.status, 400);
    assert.match(url.detail, /only `event_types`, `description` and `enabled` can be changed/);
    const denied = await gatewayError(owner.updateWebhook(hook.id, { event_types: ["afterOrderCreate", "afterProductUpdate"] }));
    assert.equal(denied.status, 403);
    assert.deepEqual(denied.problem.denied_positions, [1]);
    assert.equal((await gatewayError(owner.updateWebhook(UNKNOWN_WEBHOOK, { description: "x" }))).status, 404);
    // Another key's webhook is not found either.
    assert.equal((await gatewayError(other.updateWebhook(hook.id, { enabled: false }))).status, 404);
    // Nothing of the refused changes was kept.
    assert.deepEqual(await owner.getWebhook(hook.id), enabled);
  });

  test("a disabled webhook is not queued events; re-enabled, a replay delivers what it missed", async () => {
    const paused = await owner.createWebhook({ url: receiver.url("paused"), event_types: ["afterOrderCreate"] });
    const control = await owner.createWebhook({ url: receiver.url("control"), event_types: ["afterOrderCreate"] });
    assert.equal((await owner.updateWebhook(paused.id, { enabled: false })).enabled, false);
    const since = new Date(Date.now() - 1);
    const id = uniqueId("missed");
    await owner.publish({ type: "afterOrderCreate", id, data: orderCreated(4) });
    // Deliveries are queued for every webhook when the event is logged: once the control has
    // it, the disabled one would have had it queued too.
    await waitFor("the control's delivery", () => receiver.of("control", id).length === 1);
    await eventually("the control's attempt", () => owner.listWebhookAttempts(control.id), (a) => a.length === 1);
    assert.deepEqual(await owner.listWebhookAttempts(paused.id), []);
    assert.equal(receiver.of("paused", id).length, 0);

    assert.equal((await owner.updateWebhook(paused.id, { enabled: true })).enabled, true);
    const replay = await owner.replayWebhook(paused.id, { since });
    assert.equal(replay.replayed, 1);
    await waitFor("the missed event, replayed", () => receiver.of("paused", id).length === 1);
    await owner.deleteWebhook(control.id);
  });

  test("deleteWebhook: gone from get and list; a second delete, another key's delete and unknown ids are 404", async () => {
    const hook = await owner.createWebhook({ url: receiver.url("delete"), event_types: ["afterOrderCreate"] });
    const foreign = await gatewayError(other.deleteWebhook(hook.id));
    assert.equal(foreign.status, 404);
    assert.match(foreign.detail, /no such webhook/);
    assert.equal((await owner.getWebhook(hook.id)).id, hook.id, "another key's delete changed nothing");

    assert.equal(await owner.deleteWebhook(hook.id), undefined);
    assert.equal((await gatewayError(owner.getWebhook(hook.id))).status, 404);
    assert.equal((await owner.listWebhooks()).some((w) => w.id === hook.id), false);
    assert.equal((await gatewayError(owner.deleteWebhook(hook.id))).status, 404);
    for (const call of [
      () => owner.getWebhook(UNKNOWN_WEBHOOK),
      () => owner.deleteWebhook(UNKNOWN_WEBHOOK),
      () => owner.rotateWebhookSecret(UNKNOWN_WEBHOOK),
      () => owner.listWebhookAttempts(UNKNOWN_WEBHOOK),
      () => owner.replayWebhook(UNKNOWN_WEBHOOK, { since: new Date() }),
    ]) {
      const error = await gatewayError(call());
      assert.equal(error.status, 404);
      assert.equal(error.title, "Not Found");
      // The route's own answer, not the router's 404 for a path it does not serve.
      assert.equal(error.detail, "no such webhook");
    }
  });

  test("rotateWebhookSecret: a new secret signs; a second rotation is 409 unless retirePrevious, which stops the oldest secret", async () => {
    const hook = await owner.createWebhook({ url: receiver.url("rotate"), event_types: ["afterOrderCreate"] });
    const first = await owner.rotateWebhookSecret(hook.id);
    const declared = { id: true, secret: true, previous_secret_expires_at: true } satisfies Record<keyof RotatedSecret, true>;
    assert.deepEqual(Object.keys(first).sort(), Object.keys(declared).sort());
    assert.equal(first.id, hook.id);
    assert.match(first.secret, /^whsec_/);
    assert.notEqual(first.secret, hook.secret);
    const overlapEnds = assertTime(first.previous_secret_expires_at, "previous_secret_expires_at");
    assert.ok(Math.abs(overlapEnds - (Date.now() + 24 * 3600 * 1000)) < 120_000, "the default overlap is 24 h");

    // Deliveries are now signed with both: the new secret and the registration's.
    const firstId = uniqueId("rotated");
    await owner.publish({ type: "afterOrderCreate", id: firstId, data: orderCreated(1) });
    await waitFor("the delivery after the first rotation", () => receiver.of("rotate", firstId).length >= 1);
    const firstDelivery = receiver.of("rotate", firstId)[0]!;
    assert.equal(new WebhookVerifier(first.secret).verify(firstDelivery.body, firstDelivery.headers).id, firstId);
    assert.equal(new WebhookVerifier(hook.secret).verify(firstDelivery.body, firstDelivery.headers).id, firstId);

    // 409: the registration's secret still signs, and was promised until previous_secret_expires_at.
    const conflict = await gatewayError(owner.rotateWebhookSecret(hook.id));
    assert.equal(conflict.status, 409);
    assert.equal(conflict.title, "Conflict");
    assert.match(conflict.detail, /retire_previous=true/);
    assert.equal(Date.parse(String(conflict.problem.previous_secret_until)), overlapEnds);
    assert.equal(conflict.retryable, false);

    // After a leak: rotate anyway, retiring the registration's secret at once.
    const second = await owner.rotateWebhookSecret(hook.id, { retirePrevious: true });
    assert.equal(second.id, hook.id);
    assert.ok(second.secret !== first.secret && second.secret !== hook.secret);
    assertTime(second.previous_secret_expires_at, "previous_secret_expires_at");

    const secondId = uniqueId("retired");
    await owner.publish({ type: "afterOrderCreate", id: secondId, data: orderCreated(2) });
    await waitFor("the delivery after the second rotation", () => receiver.of("rotate", secondId).length >= 1);
    const secondDelivery = receiver.of("rotate", secondId)[0]!;
    assert.equal(new WebhookVerifier(second.secret).verify(secondDelivery.body, secondDelivery.headers).id, secondId);
    assert.equal(new WebhookVerifier(first.secret).verify(secondDelivery.body, secondDelivery.headers).id, secondId, "the first rotation's secret is in its overlap");
    assert.throws(() => new WebhookVerifier(hook.secret).verify(secondDelivery.body, secondDelivery.headers), WebhookVerificationError, "the retired secret no longer signs");

    // Another key cannot rotate it.
    const foreign = await gatewayError(other.rotateWebhookSecret(hook.id, { retirePrevious: true }));
    assert.equal(foreign.status, 404);
    assert.equal(foreign.detail, "no such webhook");
  });

  test("listWebhookAttempts and replayWebhook: the attempt log, newest first, and a replay delivering again", async () => {
    const hook = await owner.createWebhook({ url: receiver.url("attempts"), event_types: ["afterOrderUpdate"] });
    assert.deepEqual(await owner.listWebhookAttempts(hook.id), []);

    const since = new Date(Date.now() - 1);
    const id = uniqueId("attempted");
    receiver.status = 500;
    await owner.publish({ type: "afterOrderUpdate", id, data: { order: orderCreated(3).order, updatedBy: "user-3" } });
    await waitFor("the first (failed) attempt", () => receiver.of("attempts", id).length >= 1);
    receiver.status = 204;
    const attempts = await eventually("the failed attempt in the log", () => owner.listWebhookAttempts(hook.id), (a) => a.length >= 1);
    assert.equal(attempts.length, 1);
    const failed = attempts[0]!;
    const declared = { webhook_id: true, event_id: true, attempt: true, at: true, status: true, latency_ms: true, error: true, response: true } satisfies Record<keyof WebhookAttempt, true>;
    assert.deepEqual(Object.keys(failed).sort(), Object.keys(declared).sort());
    assert.equal(failed.webhook_id, hook.id);
    assert.equal(failed.event_id, id);
    assert.equal(failed.attempt, 1);
    assert.equal(failed.status, 500);
    assert.equal(failed.error, null);
    assert.equal(typeof failed.latency_ms, "number");
    assert.equal(typeof failed.response, "string");
    assertTime(failed.at, "at");
    assert.notEqual((await owner.getWebhook(hook.id)).failing_since, null, "the endpoint is failing");

    // The retry (5 s later) succeeds; then a replay delivers the event once more.
    await waitFor("the retried delivery", () => receiver.of("attempts", id).length >= 2, 30_000);
    const delivered = await eventually("the delivered attempt in the log", () => owner.listWebhookAttempts(hook.id), (a) => a.some((x) => x.status === 204));
    assert.deepEqual(delivered.map((a) => [a.attempt, a.status]), [[2, 204], [1, 500]], "newest first");
    assert.equal((await owner.getWebhook(hook.id)).failing_since, null, "a success clears the failure state");

    const replayed = await owner.replayWebhook(hook.id, { since });
    const members = { replayed: true, budget_remaining: true, budget_exhausted: true, budget_resets_at: true } satisfies Record<keyof ReplayResult, true>;
    assert.deepEqual(Object.keys(replayed).sort(), Object.keys(members).sort());
    assert.equal(replayed.replayed, 1);
    assert.equal(replayed.budget_exhausted, false);
    assert.equal(replayed.budget_remaining, 30_000 - 1);
    assert.ok(assertTime(replayed.budget_resets_at, "budget_resets_at") > Date.now());
    await waitFor("the replayed delivery", () => receiver.of("attempts", id).length >= 3);
    const again = receiver.of("attempts", id)[2]!;
    assert.equal(new WebhookVerifier(hook.secret).verify(again.body, again.headers).id, id, "the same event, signed, same webhook-id");
    assert.equal(new Set(receiver.of("attempts", id).map((d) => d.headers["webhook-id"])).size, 1, "one webhook-id on every attempt and the replay");

    // A replay from now queues nothing; a `since` that is not a date-time is 400; another key's is 404.
    assert.equal((await owner.replayWebhook(hook.id, { since: new Date(Date.now() + 60_000).toISOString() })).replayed, 0);
    const bad = await gatewayError(owner.replayWebhook(hook.id, { since: "yesterday" }));
    assert.equal(bad.status, 400);
    assert.equal((await gatewayError(other.listWebhookAttempts(hook.id))).status, 404);
    assert.equal((await gatewayError(other.replayWebhook(hook.id, { since }))).status, 404);
    // An admin key may read any webhook's attempts.
    assert.equal((await admin.listWebhookAttempts(hook.id)).length >= 2, true);
  });

  test("ids: encoded as one path segment; empty, `.` and `..` refused before any request", async () => {
    // `a/b` reaches GET /v1/webhooks/{id} (a 404 of that route), not another path.
    const slash = await gatewayError(owner.getWebhook("a/b?x=1#y"));
    assert.equal(slash.status, 404);
    assert.match(slash.detail, /no such webhook/);
    const revoked = await gatewayError(admin.revokeKey("a/b"));
    assert.equal(revoked.status, 404);
    assert.match(revoked.detail, /no such active key/);

    let requests = 0;
    const counting = new EvbusClient({ url: gw.url, apiKey: "evb_x_y", fetch: (input, init) => (requests++, fetch(input, init)) });
    for (const id of ["", ".", ".."]) {
      for (const call of [
        () => counting.getWebhook(id),
        () => counting.updateWebhook(id, { enabled: true }),
        () => counting.deleteWebhook(id),
        () => counting.rotateWebhookSecret(id),
        () => counting.listWebhookAttempts(id),
        () => counting.replayWebhook(id, { since: new Date() }),
        () => counting.revokeKey(id),
      ]) {
        const error = await call().catch((e: unknown) => e);
        assert.ok(error instanceof EvbusError && !(error instanceof GatewayError) && !(error instanceof ConnectionError), String(error));
        assert.match(error.message, /is not an id/);
      }
    }
    assert.equal(requests, 0);
  });

  test("signal: an aborted call rejects with the signal's reason; 401 for an unknown key", async () => {
    const reason = new Error("stopped by the caller");
    for (const call of [
      () => owner.listWebhooks({ signal: AbortSignal.abort(reason) }),
      () => owner.createWebhook({ url: receiver.url("aborted"), event_types: ["afterOrderCreate"] }, { signal: AbortSignal.abort(reason) }),
      () => owner.rotateWebhookSecret(UNKNOWN_WEBHOOK, { signal: AbortSignal.abort(reason), retirePrevious: true }),
      () => admin.listKeys({ signal: AbortSignal.abort(reason) }),
    ]) {
      assert.equal(await call().catch((e: unknown) => e), reason);
    }
    assert.equal((await owner.listWebhooks()).some((w) => w.url === receiver.url("aborted")), false);

    const stranger = new EvbusClient({ url: gw.url, apiKey: `evb_${"0".repeat(16)}_${"0".repeat(64)}` });
    const denied = await gatewayError(stranger.listWebhooks());
    assert.equal(denied.status, 401);
  });
});

describe("webhook replay budget", () => {
  let gw: Gateway;
  let receiver: Receiver;

  before(async () => {
    gw = await startGateway({ args: ["--max-replayed-per-day", "1"] });
    receiver = new Receiver();
    await receiver.listen();
  });

  after(async () => {
    await gw?.stop();
    await receiver?.close();
  });

  test("a replay queues what the budget leaves; one finding nothing left is 429 with Retry-After and resets_at", async () => {
    const client = new EvbusClient({
      url: gw.url,
      apiKey: await gw.createKey({ name: "replayer", subscribe: ["afterOrderCreate"], publish: ["afterOrderCreate"], sources: ["/plugins/orders"] }),
      source: "/plugins/orders",
    });
    const hook = await client.createWebhook({ url: receiver.url("budget"), event_types: ["afterOrderCreate"] });
    const since = new Date(Date.now() - 1);
    const ids = [uniqueId("budget"), uniqueId("budget")];
    for (const [n, id] of ids.entries()) await client.publish({ type: "afterOrderCreate", id, data: orderCreated(n) });
    // Delivered, as the store says (a delivery still pending would not be replayed).
    await eventually("both deliveries in the log", () => client.listWebhookAttempts(hook.id), (a) => a.filter((x) => x.status === 204).length === 2);
    assert.ok(ids.every((id) => receiver.of("budget", id).length === 1));

    const first = await client.replayWebhook(hook.id, { since });
    assert.equal(first.replayed, 1, "the budget (1) leaves room for one of the two");
    assert.equal(first.budget_remaining, 0);
    assert.equal(first.budget_exhausted, true);
    const resetsAt = assertTime(first.budget_resets_at, "budget_resets_at");

    const spent = await gatewayError(client.replayWebhook(hook.id, { since }));
    assert.equal(spent.status, 429);
    assert.equal(spent.retryable, true);
    assert.ok(spent.retryAfter !== undefined && spent.retryAfter > 3600, `Retry-After: ${spent.retryAfter}`);
    assert.equal(spent.problem.limit, 1);
    assert.equal(Date.parse(String(spent.problem.resets_at)), resetsAt);
  });
});

describe("API keys", () => {
  let gw: Gateway;
  let adminKey: string;
  let admin: EvbusClient;
  let integrator: EvbusClient;

  before(async () => {
    gw = await startGateway();
    adminKey = await gw.createKey({ name: "root", admin: true });
    admin = new EvbusClient({ url: gw.url, apiKey: adminKey });
    integrator = new EvbusClient({ url: gw.url, apiKey: await gw.createKey({ name: "integrator", subscribe: ["afterOrderCreate"] }) });
  });

  after(async () => {
    await gw?.stop();
  });

  test("createKey: the key shown once, usable at once, with its scopes, sources, expiry and rate limit", async () => {
    const expires = new Date(Date.now() + 7 * 24 * 3600 * 1000);
    const created = await admin.createKey({
      name: "erp",
      subscribe: ["afterOrder*"],
      publish: ["afterOrderCreate"],
      // Kept as given: a comma is part of a source, not a separator.
      sources: ["/erp", "https://erp.example/a,b/*"],
      expires_at: expires,
      rate_limit: { per_second: 5 },
      publish_byte_rate: { bytes_per_second: 65536 },
    });
    const declared = {
      id: true, name: true, prefix: true, subscribe: true, publish: true, sources: true, admin: true, created_at: true, expires_at: true, revoked_at: true, rate_limit: true, publish_byte_rate: true, key: true,
      warnings: true,
    } satisfies Record<keyof NewKey, true>;
    assert.deepEqual(Object.keys(created).sort(), Object.keys(declared).sort());
    assert.match(created.id, /^[0-9a-f]{16}$/);
    assert.equal(created.prefix, `evb_${created.id}`);
    assert.match(created.key, new RegExp(`^evb_${created.id}_[0-9a-f]{64}$`));
    assert.equal(created.name, "erp");
    assert.deepEqual(created.subscribe, ["afterOrder*"]);
    assert.deepEqual(created.publish, ["afterOrderCreate"]);
    assert.deepEqual(created.sources, ["/erp", "https://erp.example/a,b/*"]);
    assert.equal(created.admin, false);
    assert.equal(Date.parse(created.expires_at ?? ""), expires.getTime());
    assert.equal(created.revoked_at, null);
    assert.deepEqual(created.rate_limit, { per_second: 5, burst: 10, default: false });
    assert.deepEqual(created.publish_byte_rate, { bytes_per_second: 65536, default: false });
    assert.deepEqual(created.warnings, []);
    assertTime(created.created_at, "created_at");

    // The key works, with the scopes it was given.
    const erp = new EvbusClient({ url: gw.url, apiKey: created.key });
    const types = await erp.eventTypes();
    assert.deepEqual(types.map((t) => [t.type, t.subscribe, t.publish]).sort(), [
      ["afterOrderCreate", true, true],
      ["afterOrderUpdate", true, false],
    ]);
    // It publishes under its sources (exact, or matching a pattern), and under no other.
    const erpData = orderCreated(1);
    assert.equal((await erp.publish({ type: "afterOrderCreate", id: "erp-1", source: "/erp", data: erpData })).id, "erp-1");
    const viaPattern = await erp.publish({ type: "afterOrderCreate", id: "erp-2", source: "https://erp.example/a,b/orders", data: erpData });
    assert.equal(viaPattern.id, "erp-2");
    for (const source of ["/plugins/orders", "/erp/eu", "https://erp.example/a"]) {
      const refused = await gatewayError(erp.publish({ type: "afterOrderCreate", id: "erp-3", source, data: erpData }));
      assert.equal(refused.status, 403, source);
      assert.match(refused.detail, /may not publish under this `source`/);
    }
    // The key sees its own record, the same as the admin's listing shows, never the key.
    const own = await erp.currentKey();
    const { key: _key, warnings: _warnings, ...record } = created;
    assert.deepEqual(own, record);

    // A scope matching no external type: a warning, and the key all the same.
    const typo = await admin.createKey({ name: "typo", subscribe: ["afterOrdr*"] });
    assert.deepEqual(typo.sources, [], "a key that may not publish needs no sources");
    assert.equal(typo.warnings.length, 1);
    assert.match(typo.key, /^evb_/);
    assert.deepEqual(typo.rate_limit, { per_second: 50, burst: 100, default: true });
    assert.deepEqual(typo.publish_byte_rate, { bytes_per_second: 8 * 1024 * 1024, default: true });
    assert.equal(typo.expires_at, null);
  });

  test("listKeys: every key's record, never the key itself", async () => {
    const created = await admin.createKey({ name: "listed", subscribe: ["afterOrderCreate"] });
    const keys = await admin.listKeys();
    const listed = keys.find((k) => k.id === created.id);
    assert.ok(listed);
    const declared = {
      id: true, name: true, prefix: true, subscribe: true, publish: true, sources: true, admin: true, created_at: true, expires_at: true, revoked_at: true, rate_limit: true, publish_byte_rate: true,
    } satisfies Record<keyof KeyInfo, true>;
    assert.deepEqual(Object.keys(listed).sort(), Object.keys(declared).sort());
    const { key: _key, warnings: _warnings, ...record } = created;
    assert.deepEqual(atMs(listed), atMs(record));
    assert.ok(keys.every((k) => !("key" in k)));
    assert.ok(!JSON.stringify(keys).includes(created.key.split("_")[2]!), "no key secret in the list");
    const root = keys.find((k) => adminKey.startsWith(`${k.prefix}_`));
    assert.ok(root, "the admin key created with `evbus keys create` is listed");
    assert.equal(root.admin, true);
    assert.equal(root.name, "root");
    assert.deepEqual(root.sources, []);

    // Sources given to `evbus keys create --source` (one flag each: no comma splitting), listed as given.
    const cli = await gw.createKey({ name: "cli publisher", publish: ["afterOrderCreate"], sources: ["/shop", "urn:shop:a,b:*"] });
    const cliListed = (await admin.listKeys()).find((k) => cli.startsWith(`${k.prefix}_`));
    assert.ok(cliListed);
    assert.deepEqual(cliListed.sources, ["/shop", "urn:shop:a,b:*"]);
  });

  test("revokeKey: the key is refused at once; revoking again or an unknown id is 404", async () => {
    const created = await admin.createKey({ name: "short-lived", subscribe: ["afterOrderCreate"] });
    const user = new EvbusClient({ url: gw.url, apiKey: created.key });
    assert.equal((await user.eventTypes()).length, 1);

    assert.equal(await admin.revokeKey(created.id), undefined);
    const refused = await gatewayError(user.eventTypes());
    assert.equal(refused.status, 401);
    const listed = (await admin.listKeys()).find((k) => k.id === created.id);
    assert.ok(listed && listed.revoked_at !== null);
    assert.ok(Math.abs(assertTime(listed.revoked_at, "revoked_at") - Date.now()) < 60_000);

    const again = await gatewayError(admin.revokeKey(created.id));
    assert.equal(again.status, 404);
    assert.match(again.detail, /no such active key/);
    assert.equal((await gatewayError(admin.revokeKey("0123456789abcdef"))).status, 404);
  });

  test("403: a key that is not an admin key may not create, list or revoke keys", async () => {
    const target = await admin.createKey({ name: "target" });
    for (const call of [() => integrator.createKey({ name: "sneaky", admin: true }), () => integrator.listKeys(), () => integrator.revokeKey(target.id)]) {
      const error = await gatewayError(call());
      assert.equal(error.status, 403);
      assert.equal(error.title, "Forbidden");
      assert.match(error.detail, /admin key/);
    }
    // Nothing was created or revoked.
    const keys = await admin.listKeys();
    assert.equal(keys.some((k) => k.name === "sneaky"), false);
    assert.equal(keys.find((k) => k.id === target.id)?.revoked_at, null);
  });

  test("400: a name of spaces, a scope that is no pattern, a wrong rate limit or byte rate, an unknown member", async () => {
    const before = (await admin.listKeys()).length;
    const spaces = await gatewayError(admin.createKey({ name: "   " }));
    assert.equal(spaces.status, 400);
    assert.match(spaces.detail, /`name` must be 1 to 200 characters/);
    const pattern = await gatewayError(admin.createKey({ name: "p", subscribe: ["afterOrderCreate", "no spaces please"] }));
    assert.equal(pattern.status, 400);
    assert.deepEqual(pattern.problem.invalid_positions, [1]);
    const rate = await gatewayError(admin.createKey({ name: "r", rate_limit: { per_second: 0 } }));
    assert.equal(rate.status, 400);
    assert.match(rate.detail, /rate_limit\.per_second/);
    const bytes = await gatewayError(admin.createKey({ name: "b", publish_byte_rate: { bytes_per_second: 0 } }));
    assert.equal(bytes.status, 400);
    assert.match(bytes.detail, /publish_byte_rate/);
    const unknown = await gatewayError(admin.createKey({ name: "u", scopes: ["*"] } as never));
    assert.equal(unknown.status, 400);
    assert.equal((await admin.listKeys()).length, before, "no key was created");
  });

  test("400: a key that may publish without sources, a source pattern that is not one", async () => {
    const before = (await admin.listKeys()).length;
    for (const sources of [undefined, []]) {
      const missing = await gatewayError(admin.createKey({ name: "unbound", publish: ["afterOrderCreate"], ...(sources ? { sources } : {}) }));
      assert.equal(missing.status, 400, JSON.stringify(sources));
      assert.equal(missing.title, "Bad Request");
      assert.match(missing.detail, /at least one source/);
      assert.equal(missing.problem.invalid_positions, undefined);
    }
    const bad = await gatewayError(
      admin.createKey({ name: "bad sources", publish: ["afterOrderCreate"], sources: ["/ok", "", "/line\nbreak", "s".repeat(2049), "é".repeat(2048)] }),
    );
    assert.equal(bad.status, 400);
    assert.match(bad.detail, /source pattern/);
    assert.deepEqual(bad.problem.invalid_positions, [1, 2, 3]);
    assert.equal((await admin.listKeys()).length, before, "no key was created");

    // A key that may not publish may be created without sources (as before), or with some.
    const reader = await admin.createKey({ name: "reader", subscribe: ["afterOrderCreate"], sources: ["/later"] });
    assert.deepEqual(reader.sources, ["/later"]);
  });

  test("409: the last active admin key cannot be revoked; with another admin key it can", async () => {
    const root = (await admin.listKeys()).find((k) => adminKey.startsWith(`${k.prefix}_`));
    assert.ok(root);
    const last = await gatewayError(admin.revokeKey(root.id));
    assert.equal(last.status, 409);
    assert.match(last.detail, /last active admin key/);

    const second = await admin.createKey({ name: "second admin", admin: true });
    assert.equal(second.admin, true);
    const successor = new EvbusClient({ url: gw.url, apiKey: second.key });
    await successor.revokeKey(root.id);
    assert.equal((await gatewayError(admin.listKeys())).status, 401, "the revoked admin key is refused");
    assert.equal((await gatewayError(successor.revokeKey(second.id))).status, 409, "now the successor is the last one");
  });
});
