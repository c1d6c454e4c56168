/**
 * The client of the evbus gateway's HTTP API (`evbus serve`).
 */

import { randomUUID } from "node:crypto";

import type { CloudEvent, DeliveredEvent, DeliveredType, ExtensionValue, PublishedType } from "./cloudevent.js";
import { ConnectionError, EvbusError, GatewayError, errorFromResponse } from "./errors.js";
import type { PublishedEvents } from "./generated/published.js";
import type {
  CreateKeyInput,
  CreateWebhookInput,
  KeyInfo,
  NewKey,
  NewWebhook,
  ReplayInput,
  ReplayResult,
  RequestOptions,
  RotateSecretOptions,
  RotatedSecret,
  UpdateWebhookInput,
  WebhookAttempt,
  WebhookInfo,
} from "./management.js";
import { SseParser } from "./sse.js";

/** A value sent as a header token (a stream id, an API key): visible ASCII characters. */
const HEADER_TOKEN = /^[\x21-\x7e]+$/;

/** How to reach the gateway. */
export interface ClientOptions {
  /**
   * The gateway's base URL, e.g. `http://127.0.0.1:8080`; a path is kept as a prefix
   * (`https://api.example.com/evbus` asks `https://api.example.com/evbus/v1/…`).
   */
  url: string | URL;
  /** An API key (`evb_<id>_<secret>`), sent as `Authorization: Bearer`. */
  apiKey: string;
  /**
   * The default CloudEvent `source` of published events (e.g. `/plugins/orders`). One of the API
   * key's `sources` must match it, otherwise a publish is answered 403.
   */
  source?: string;
  /** A `fetch` to use instead of the global one. */
  fetch?: typeof fetch;
}

/** An event to publish. `id` defaults to a random UUID, `time` to now. */
export interface PublishInput<K extends string = string, T = unknown> {
  type: K;
  data: T;
  /**
   * Defaults to the client's `source`; one of the two is required. One of the key's `sources`
   * must match it, otherwise 403.
   */
  source?: string;
  /** Unique per source: posting the same id and content again is idempotent (202, sent once). */
  id?: string;
  subject?: string;
  time?: string | Date;
  /** Ordering key (CloudEvents `partitionkey` extension). */
  partitionkey?: string;
  /**
   * Other extension attributes: names of 1 to 20 lowercase letters or digits. The gateway
   * checks them and does not forward them to the bus (trace context included): internal
   * consumers never read context an outside caller set.
   */
  extensions?: Record<string, ExtensionValue>;
}

/** Retrying a refused or failed request. */
export interface RetryOptions {
  /** Retries after the first try (default 3). */
  attempts?: number;
  /** First backoff when the gateway gives no `Retry-After` (default 250 ms; doubles each time). */
  baseDelayMs?: number;
  /**
   * Longest wait before a retry (default 30 s). A `Retry-After` longer than this is not waited
   * for: the error is thrown at once.
   */
  maxDelayMs?: number;
  /** Called before each wait. */
  onRetry?: (info: { attempt: number; delayMs: number; error: EvbusError }) => void;
}

/** How to publish. */
export interface PublishOptions {
  /** `structured` (default): `application/cloudevents+json`; `binary`: `ce-*` headers and the data as the body. */
  mode?: "structured" | "binary";
  /**
   * Retry the answers that may succeed later (408, 429, and 5xx but 501; `Retry-After` is
   * honoured) and connection failures. Off by default. Safe: a retry posts the same `id`, and
   * the gateway accepts an identical event once (an identical re-post is answered 202 and not
   * sent again), so a 408 or 5xx that does not say whether the event was taken is retried too.
   */
  retry?: boolean | RetryOptions;
  signal?: AbortSignal;
}

/** What `POST /v1/events` answered. */
export interface PublishResult {
  /** The event id (the one posted). */
  id: string;
}

/** One external version of a type, as `GET /v1/event-types` lists its history. */
export interface EventTypeVersionInfo {
  version: number;
  dataschema: string;
  description?: string | null;
  /** The curated JSON Schema of this version's data. */
  schema: Record<string, unknown>;
}

/** An external type as `GET /v1/event-types` lists it. */
export interface EventTypeInfo {
  type: string;
  /** Whether this key may subscribe to the type (streams, webhooks). */
  subscribe: boolean;
  /** Whether this key may publish the type. */
  publish: boolean;
  /** The latest version. */
  version: number;
  dataschema: string;
  description?: string | null;
  /** The curated JSON Schema of the latest version's data. */
  schema: Record<string, unknown>;
  /** An example payload built from the curated schema (and curated). */
  example: unknown;
  /** The version history, oldest first: the external versions, each with its curated schema. */
  versions: EventTypeVersionInfo[];
}

/** Reconnecting a stream. */
export interface ReconnectOptions {
  /** First wait after a dropped connection (default 500 ms, or the stream's `retry` field); doubles up to `maxDelayMs`, with jitter. */
  initialDelayMs?: number;
  /** Longest wait between two connection attempts (default 30 s). */
  maxDelayMs?: number;
  /** Failed connection attempts in a row before the iterator throws (default: no limit). */
  maxAttempts?: number;
}

/** How to subscribe. */
export interface SubscribeOptions<K extends DeliveredType> {
  /** The event types (default: every type the key may subscribe to). */
  types?: readonly K[];
  /**
   * Resume after this stream id (a `lastEventId` kept from an earlier subscription); without
   * it the stream starts from now.
   */
  lastEventId?: string;
  /** Stops the subscription: the iterator then ends without an error. */
  signal?: AbortSignal;
  reconnect?: ReconnectOptions;
  /**
   * A connection that sends nothing (no event, no keep-alive) for this long is taken as dropped
   * and reconnected (default 45 s: three of the gateway's 15 s keep-alives).
   */
  idleTimeoutMs?: number;
  /** Called each time a connection is established (the first one and every reconnection). */
  onOpen?: (info: { reconnected: boolean; lastEventId: string | undefined }) => void;
  /** Called when a connection dropped or failed, before waiting `delayMs` to reconnect. */
  onReconnect?: (info: { attempt: number; delayMs: number; error: EvbusError }) => void;
}

const EXTENSION_NAME = /^[a-z0-9]{1,20}$/;
const RESERVED = new Set(["specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema", "data", "data_base64", "partitionkey"]);

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** CloudEvents HTTP binding §3.1.3.2: printable ASCII except space, `"` and `%` travels as is. */
function percentEncode(value: string): string {
  let out = "";
  for (const byte of new TextEncoder().encode(value)) {
    if (byte > 0x20 && byte < 0x7f && byte !== 0x22 && byte !== 0x25) out += String.fromCharCode(byte);
    else out += `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

/**
 * `id` as one path segment. An empty id, `.` or `..` cannot be one (URLs resolve the dot
 * segments away, asking another path): refused here rather than sent.
 */
function pathId(id: string, what: string): string {
  if (typeof id !== "string" || id === "" || id === "." || id === "..") {
    throw new EvbusError(`${what}: ${JSON.stringify(id)} is not an id`);
  }
  return encodeURIComponent(id);
}

function connectionError(error: unknown, what: string): ConnectionError {
  const cause = error instanceof Error && error.cause instanceof Error ? `: ${error.cause.message}` : "";
  const message = error instanceof Error ? error.message : String(error);
  return new ConnectionError(`${what}: ${message}${cause}`, { cause: error });
}

/**
 * A client of one gateway with one API key.
 *
 * ```ts
 * const bus = new EvbusClient({ url: "http://127.0.0.1:8080", apiKey: process.env.EVBUS_API_KEY!, source: "/plugins/orders" });
 * await bus.publish({ type: "afterOrderCreate", data: { createdBy, order } });
 * for await (const event of bus.subscribe({ types: ["afterOrderCreate"] })) { … }
 * ```
 */
export class EvbusClient {
  readonly #base: URL;
  readonly #apiKey: string;
  readonly #source: string | undefined;
  readonly #fetch: typeof fetch;

  constructor(options: ClientOptions) {
    this.#base = new URL(options.url);
    if (this.#base.protocol !== "http:" && this.#base.protocol !== "https:") {
      throw new EvbusError(`the gateway URL must be http(s), not ${this.#base.protocol}`);
    }
    if (this.#base.username !== "" || this.#base.password !== "") {
      // fetch refuses such URLs on every request; the key goes in `apiKey`.
      throw new EvbusError("the gateway URL must not hold credentials (user:password@); pass the API key as apiKey");
    }
    if (!options.apiKey) throw new EvbusError("an API key is required (apiKey)");
    if (!HEADER_TOKEN.test(options.apiKey)) throw new EvbusError("the API key must be visible ASCII characters");
    this.#apiKey = options.apiKey;
    this.#source = options.source;
    this.#fetch = options.fetch ?? globalThis.fetch;
  }

  /**
   * `path` (`/v1/…`) under the base URL, keeping the base's own path: a gateway behind a
   * reverse proxy at `https://api.example.com/evbus` is asked at `/evbus/v1/…`, not `/v1/…`.
   */
  #url(path: string): URL {
    const url = new URL(this.#base);
    url.pathname = url.pathname.replace(/\/+$/, "") + path;
    url.search = "";
    url.hash = "";
    return url;
  }

  async #request(path: string, init: RequestInit, query?: Record<string, string>): Promise<Response> {
    const headers = new Headers(init.headers);
    headers.set("authorization", `Bearer ${this.#apiKey}`);
    const url = this.#url(path);
    for (const [name, value] of Object.entries(query ?? {})) url.searchParams.set(name, value);
    let response: Response;
    try {
      response = await this.#fetch(url, { ...init, headers });
    } catch (error) {
      if (init.signal?.aborted) throw init.signal.reason;
      throw connectionError(error, `${init.method ?? "GET"} ${path} failed`);
    }
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }

  /**
   * Publishes one event of an external type, its data typed from the catalogue.
   *
   * @throws GatewayError with the gateway's problem (400 malformed, 403 not in the key's publish
   *   scope or a `source` none of the key's `sources` matches, 409 another event under this
   *   source and id, 415, 422 with `violations`, 429, 503)
   * @throws ConnectionError when the gateway could not be reached
   */
  publish<K extends PublishedType>(event: PublishInput<K, PublishedEvents[K]>, options?: PublishOptions): Promise<PublishResult> {
    return this.publishEvent(event, options);
  }

  /** Publishes one event of any type, its data unchecked here (the gateway validates it). */
  async publishEvent(event: PublishInput, options: PublishOptions = {}): Promise<PublishResult> {
    const source = event.source ?? this.#source;
    if (!source) throw new EvbusError("a CloudEvent needs a source: give `source` to the client or to the event");
    for (const name of Object.keys(event.extensions ?? {})) {
      if (!EXTENSION_NAME.test(name) || RESERVED.has(name)) {
        throw new EvbusError(`\`${name}\` cannot be an extension attribute: names are 1 to 20 lowercase letters or digits, and not a standard attribute`);
      }
    }
    const id = event.id ?? randomUUID();
    const time = event.time === undefined ? new Date().toISOString() : typeof event.time === "string" ? event.time : event.time.toISOString();
    const attributes: Record<string, ExtensionValue> = { specversion: "1.0", id, source, type: event.type, time };
    if (event.subject !== undefined) attributes.subject = event.subject;
    if (event.partitionkey !== undefined) attributes.partitionkey = event.partitionkey;
    Object.assign(attributes, event.extensions);
    const data = JSON.stringify(event.data);
    if (data === undefined) throw new EvbusError("the event data cannot be serialised as JSON");

    let headers: Record<string, string>;
    let body: string;
    if ((options.mode ?? "structured") === "binary") {
      headers = { "content-type": "application/json" };
      for (const [name, value] of Object.entries(attributes)) headers[`ce-${name}`] = percentEncode(String(value));
      body = data;
    } else {
      headers = { "content-type": "application/cloudevents+json" };
      body = JSON.stringify({ ...attributes, datacontenttype: "application/json", data: event.data });
    }

    const retry = options.retry === true ? {} : options.retry === false || options.retry === undefined ? undefined : options.retry;
    const attempts = retry?.attempts ?? 3;
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await this.#request("/v1/events", { method: "POST", headers, body, signal: options.signal });
        const answer = (await response.json()) as { id?: unknown };
        return { id: typeof answer.id === "string" ? answer.id : id };
      } catch (error) {
        if (retry === undefined || attempt >= attempts) throw error;
        if (!(error instanceof ConnectionError) && !(error instanceof GatewayError && error.retryable)) throw error;
        const maxDelay = retry.maxDelayMs ?? 30_000;
        const backoff = Math.min(maxDelay, (retry.baseDelayMs ?? 250) * 2 ** attempt);
        const delayMs = error instanceof GatewayError && error.retryAfter !== undefined ? error.retryAfter * 1000 : backoff;
        if (delayMs > maxDelay) throw error;
        retry.onRetry?.({ attempt: attempt + 1, delayMs, error });
        await sleep(delayMs, options.signal);
      }
    }
  }

  /** The external types this key may subscribe to or publish (`subscribe`, `publish`), with their curated schemas. */
  async eventTypes(options: RequestOptions = {}): Promise<EventTypeInfo[]> {
    const response = await this.#request("/v1/event-types", { signal: options.signal });
    return (await response.json()) as EventTypeInfo[];
  }

  /** A JSON request body: `POST`/`PATCH` with `content-type: application/json`. */
  async #send(method: string, path: string, body: unknown, options: RequestOptions): Promise<Response> {
    return this.#request(path, { method, headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal: options.signal });
  }

  // ---- Webhooks (`/v1/webhooks`): a key manages the webhooks it registered; an admin key, all of them.

  /**
   * Registers a webhook (`POST /v1/webhooks`): the gateway POSTs every curated event of
   * `event_types` to `url`, signed with Standard Webhooks.
   *
   * The answer holds the signing `secret` (`whsec_…`), **shown once**: the gateway never answers
   * it again. Keep it for the receiver (`WebhookVerifier`); a lost secret can only be replaced
   * ({@link EvbusClient.rotateWebhookSecret}).
   *
   * @throws GatewayError 400 (a malformed body: no type, too many types or `allow` pointers, a
   *   bad pointer, too long a `url` or `description`), 403 (a type outside the key's subscribe
   *   scope: `problem.denied_positions` lists their positions), 409 (the key already holds the
   *   most webhooks one key may: `problem.limit`), 413, 422 (the URL is not http(s), or its
   *   host is not a public address the gateway may call)
   */
  async createWebhook(webhook: CreateWebhookInput, options: RequestOptions = {}): Promise<NewWebhook> {
    const response = await this.#send("POST", "/v1/webhooks", webhook, options);
    return (await response.json()) as NewWebhook;
  }

  /**
   * The webhooks this key registered, oldest first (`GET /v1/webhooks`); for an admin key,
   * every key's. Secrets are never listed. The gateway answers the whole list (at most
   * `max_webhooks_per_key`, 25 by default, per key): there is no paging.
   */
  async listWebhooks(options: RequestOptions = {}): Promise<WebhookInfo[]> {
    const response = await this.#request("/v1/webhooks", { signal: options.signal });
    return (await response.json()) as WebhookInfo[];
  }

  /**
   * One webhook (`GET /v1/webhooks/{id}`), without its secret.
   *
   * @throws GatewayError 404 for an unknown id, or a webhook of another key (an admin key sees every one)
   */
  async getWebhook(id: string, options: RequestOptions = {}): Promise<WebhookInfo> {
    const response = await this.#request(`/v1/webhooks/${pathId(id, "getWebhook")}`, { signal: options.signal });
    return (await response.json()) as WebhookInfo;
  }

  /**
   * Changes a webhook's event types or description, or disables (`enabled: false`) or
   * re-enables it (`enabled: true`, which clears its failure state) (`PATCH /v1/webhooks/{id}`).
   * Members left out stay as they are. Answers the webhook as it now is.
   *
   * @throws GatewayError 400 (an empty `event_types`, a wrong type, too long a `description`),
   *   403 (a type outside the key's subscribe scope: `problem.denied_positions`), 404
   */
  async updateWebhook(id: string, change: UpdateWebhookInput, options: RequestOptions = {}): Promise<WebhookInfo> {
    const response = await this.#send("PATCH", `/v1/webhooks/${pathId(id, "updateWebhook")}`, change, options);
    return (await response.json()) as WebhookInfo;
  }

  /**
   * Deletes a webhook (`DELETE /v1/webhooks/{id}`); its pending deliveries are dropped.
   *
   * @throws GatewayError 404 for an unknown id (a second delete included)
   */
  async deleteWebhook(id: string, options: RequestOptions = {}): Promise<void> {
    const response = await this.#request(`/v1/webhooks/${pathId(id, "deleteWebhook")}`, { method: "DELETE", signal: options.signal });
    await response.body?.cancel();
  }

  /**
   * A new signing secret for a webhook (`POST /v1/webhooks/{id}/rotate-secret`). The previous
   * one keeps signing beside it until `previous_secret_expires_at` (24 h by default), so
   * receivers can switch at any time in that window. The new `secret` is **shown once**.
   *
   * @throws GatewayError 404; 409 while an earlier rotation's previous secret still signs
   *   (`problem.previous_secret_until` says until when): rotating again would stop it before
   *   the time promised. `{ retirePrevious: true }` rotates anyway and stops it at once (after
   *   a leak).
   */
  async rotateWebhookSecret(id: string, options: RotateSecretOptions = {}): Promise<RotatedSecret> {
    const path = `/v1/webhooks/${pathId(id, "rotateWebhookSecret")}/rotate-secret`;
    const query = options.retirePrevious === true ? { retire_previous: "true" } : undefined;
    const response = await this.#request(path, { method: "POST", signal: options.signal }, query);
    return (await response.json()) as RotatedSecret;
  }

  /**
   * A webhook's latest delivery attempts, newest first (`GET /v1/webhooks/{id}/attempts`): the
   * gateway answers the newest 100 (it keeps 1,000 per webhook); there is no paging.
   *
   * @throws GatewayError 404
   */
  async listWebhookAttempts(id: string, options: RequestOptions = {}): Promise<WebhookAttempt[]> {
    const response = await this.#request(`/v1/webhooks/${pathId(id, "listWebhookAttempts")}/attempts`, { signal: options.signal });
    return (await response.json()) as WebhookAttempt[];
  }

  /**
   * Delivers again every logged event since a time (`POST /v1/webhooks/{id}/replay`), and
   * re-enables a disabled endpoint. Idempotent: an event with a delivery to this endpoint still
   * pending is not queued again. Bounded by the webhook's replay budget (`budget_remaining`).
   *
   * @throws GatewayError 400 (`since` is not a date-time), 404, 429 when the replay budget is
   *   spent (`retryAfter`, and `problem.resets_at`, `problem.limit`)
   */
  async replayWebhook(id: string, replay: ReplayInput, options: RequestOptions = {}): Promise<ReplayResult> {
    const since = typeof replay.since === "string" ? replay.since : replay.since.toISOString();
    const response = await this.#send("POST", `/v1/webhooks/${pathId(id, "replayWebhook")}/replay`, { since }, options);
    return (await response.json()) as ReplayResult;
  }

  // ---- API keys (`/v1/keys`): an admin key only; any other key is answered 403.

  /**
   * Creates an API key (`POST /v1/keys`; an admin key). The answer's `key` (`evb_…`) is **shown
   * once**: the gateway keeps only a hash of its secret. `warnings` names each scope pattern
   * that matches none of the external types served now (the key is created all the same).
   *
   * A key that may publish (`publish` not empty) must be bound to at least one source
   * (`sources`: exact CloudEvents `source` values or `*` patterns): it may then publish only
   * events whose `source` one of them matches (others are answered 403).
   *
   * @throws GatewayError 400 (a `name` empty, only spaces or over 200 characters, a scope
   *   pattern that is not 1 to 200 letters, digits, `.`, `_`, `-` or `*`:
   *   `problem.invalid_positions`, `publish` without `sources`, a source pattern empty, over
   *   2048 characters or with a control character: `problem.invalid_positions` (positions in
   *   `sources`), a wrong `rate_limit`), 403 (not an admin key)
   */
  async createKey(key: CreateKeyInput, options: RequestOptions = {}): Promise<NewKey> {
    const body = key.expires_at instanceof Date ? { ...key, expires_at: key.expires_at.toISOString() } : key;
    const response = await this.#send("POST", "/v1/keys", body, options);
    return (await response.json()) as NewKey;
  }

  /** Every key's record, oldest first, revoked ones included (`GET /v1/keys`; an admin key); never a key itself. No paging. */
  async listKeys(options: RequestOptions = {}): Promise<KeyInfo[]> {
    const response = await this.#request("/v1/keys", { signal: options.signal });
    return (await response.json()) as KeyInfo[];
  }

  /**
   * The record of this client's own key (`GET /v1/me`; any key), never the key itself: the
   * types it may subscribe to and publish, the `sources` it may publish under, its rate limit,
   * publish byte rate and expiry.
   */
  async currentKey(options: RequestOptions = {}): Promise<KeyInfo> {
    const response = await this.#request("/v1/me", { signal: options.signal });
    return (await response.json()) as KeyInfo;
  }

  /**
   * Revokes a key at once (`DELETE /v1/keys/{id}`; an admin key): its requests are answered
   * 401 and its open streams end. `id` is the key's `id` (`KeyInfo.id`), not the key.
   *
   * @throws GatewayError 403 (not an admin key), 404 (no such key, or already revoked), 409
   *   (the last active admin key: create another admin key first)
   */
  async revokeKey(id: string, options: RequestOptions = {}): Promise<void> {
    const response = await this.#request(`/v1/keys/${pathId(id, "revokeKey")}`, { method: "DELETE", signal: options.signal });
    await response.body?.cancel();
  }

  /**
   * Subscribes through Server-Sent Events (`GET /v1/stream`). The subscription is an async
   * iterable of the curated events; a dropped connection is reconnected with `Last-Event-ID`
   * (after a backoff), so no event is lost or repeated as long as the gateway's log still holds
   * the position. Stop it with the `signal`, `close()`, or by leaving the `for await` loop.
   *
   * It throws (ending the iteration) on an answer that will not change by retrying: 400 (a
   * `lastEventId` this gateway did not issue), 401 (key revoked or expired), 403 (a type outside
   * the key's scope); or after `reconnect.maxAttempts` failed attempts in a row.
   */
  subscribe<K extends DeliveredType = DeliveredType>(options: SubscribeOptions<K> = {}): Subscription<DeliveredEvent<K>> {
    const subscription = new Subscription<DeliveredEvent<K>>((sub, signal) => this.#stream(sub, options, signal), options.signal);
    subscription.lastEventId = options.lastEventId;
    return subscription;
  }

  async *#stream<E>(sub: Subscription<E>, options: SubscribeOptions<DeliveredType>, signal: AbortSignal): AsyncGenerator<E, void, undefined> {
    const url = this.#url("/v1/stream");
    if (options.types !== undefined) {
      if (options.types.length === 0) throw new EvbusError("subscribe: `types` is empty (leave it out for every type the key may subscribe to)");
      url.searchParams.set("types", options.types.join(","));
    }
    const idleMs = options.idleTimeoutMs ?? 45_000;
    const reconnect = options.reconnect ?? {};
    const maxDelay = reconnect.maxDelayMs ?? 30_000;
    let streamRetry: number | undefined;
    let failures = 0;
    let opened = false;
    while (!signal.aborted) {
      const connection = new AbortController();
      const stop = () => connection.abort(signal.reason);
      signal.addEventListener("abort", stop, { once: true });
      let error: EvbusError;
      let retryAfter: number | undefined;
      let idle: NodeJS.Timeout | undefined;
      // Silence (no answer, no byte, not even a keep-alive) for idleMs: the connection is dropped.
      const armIdle = () => {
        clearTimeout(idle);
        idle = setTimeout(() => connection.abort(new ConnectionError(`the stream sent nothing for ${idleMs} ms`)), idleMs);
      };
      try {
        const headers: Record<string, string> = { authorization: `Bearer ${this.#apiKey}`, accept: "text/event-stream" };
        if (sub.lastEventId !== undefined) {
          // A corrupted saved cursor cannot be a header value: fetch would refuse it before
          // sending anything, on every reconnect, for ever. It is refused once instead.
          if (!HEADER_TOKEN.test(sub.lastEventId)) {
            throw new EvbusError("subscribe: `lastEventId` is not a stream id (visible ASCII characters); subscribe without it");
          }
          headers["last-event-id"] = sub.lastEventId;
        }
        let response: Response;
        armIdle();
        try {
          response = await this.#fetch(url, { headers, signal: connection.signal });
        } catch (e) {
          if (signal.aborted) return;
          const reason: unknown = connection.signal.reason;
          throw reason instanceof ConnectionError ? reason : connectionError(e, "GET /v1/stream failed");
        }
        if (!response.ok) throw await errorFromResponse(response);
        if (!(response.headers.get("content-type") ?? "").startsWith("text/event-stream") || response.body === null) {
          await response.body?.cancel();
          throw new EvbusError(`GET /v1/stream answered ${response.status} without an event stream`);
        }
        failures = 0;
        options.onOpen?.({ reconnected: opened, lastEventId: sub.lastEventId });
        opened = true;
        const parser = new SseParser();
        const decoder = new TextDecoder();
        const reader = response.body.getReader();
        try {
          for (;;) {
            let chunk: Awaited<ReturnType<typeof reader.read>>;
            try {
              chunk = await reader.read();
            } catch (e) {
              if (signal.aborted) return;
              const reason: unknown = connection.signal.reason;
              throw reason instanceof ConnectionError ? reason : connectionError(e, "the stream broke");
            }
            if (chunk.done) throw new ConnectionError("the gateway ended the stream");
            armIdle();
            for (const message of parser.feed(decoder.decode(chunk.value, { stream: true }))) {
              let event: E;
              try {
                event = JSON.parse(message.data) as E;
              } catch (e) {
                throw new EvbusError("the stream sent a frame that is not JSON", { cause: e });
              }
              // Advanced before the event is handed over: a consumer that keeps `lastEventId`
              // after handling an event resumes after it.
              if (message.lastEventId !== "") sub.lastEventId = message.lastEventId;
              // The consumer's time is not the connection's silence.
              clearTimeout(idle);
              // Stopped (the signal, `close()`) while handling the previous event: nothing
              // more of this chunk is handed over.
              if (signal.aborted) return;
              yield event;
              if (signal.aborted) return;
              armIdle();
            }
            // An `id` without data (a position, no event) moves the position too, as the
            // standard's reconnection does.
            if (parser.dispatchedLastEventId !== "") sub.lastEventId = parser.dispatchedLastEventId;
            streamRetry = parser.retry ?? streamRetry;
          }
        } finally {
          clearTimeout(idle);
          connection.abort();
          await reader.cancel().catch(() => undefined);
        }
      } catch (e) {
        clearTimeout(idle);
        if (signal.aborted) return;
        if (e instanceof GatewayError) {
          if (!e.retryable) throw e;
          retryAfter = e.retryAfter;
          error = e;
        } else if (e instanceof ConnectionError) {
          error = e;
        } else {
          throw e;
        }
      } finally {
        signal.removeEventListener("abort", stop);
      }
      failures++;
      if (reconnect.maxAttempts !== undefined && failures > reconnect.maxAttempts) throw error;
      const base = reconnect.initialDelayMs ?? streamRetry ?? 500;
      const backoff = Math.min(maxDelay, base * 2 ** (failures - 1));
      // Full jitter on the upper half, so many clients dropped at once do not return at once.
      const delayMs = retryAfter !== undefined ? retryAfter * 1000 : Math.round(backoff / 2 + (Math.random() * backoff) / 2);
      options.onReconnect?.({ attempt: failures, delayMs, error });
      try {
        await sleep(delayMs, signal);
      } catch {
        return;
      }
    }
  }
}

/**
 * An open subscription: iterate it once with `for await`. `lastEventId` is the stream id of the
 * last event handed over; keep it to resume later (`subscribe({ lastEventId })`).
 */
export class Subscription<E> implements AsyncIterable<E> {
  /**
   * The stream id of the last event handed over; before the first one, the stream's starting
   * position (from its first frame), or the `lastEventId` it was opened with.
   */
  lastEventId: string | undefined;
  readonly #controller = new AbortController();
  readonly #run: (sub: Subscription<E>, signal: AbortSignal) => AsyncGenerator<E, void, undefined>;
  #iterating = false;

  /** @internal */
  constructor(run: (sub: Subscription<E>, signal: AbortSignal) => AsyncGenerator<E, void, undefined>, signal?: AbortSignal) {
    this.#run = run;
    if (signal !== undefined) {
      if (signal.aborted) this.#controller.abort(signal.reason);
      // Detached once the subscription ends (its own controller aborted): a caller's
      // long-lived signal does not collect a listener per subscription.
      else
        signal.addEventListener("abort", () => this.#controller.abort(signal.reason), {
          once: true,
          signal: this.#controller.signal,
        });
    }
  }

  /** Closes the connection; the iteration ends without an error. */
  close(): void {
    this.#controller.abort();
  }

  [Symbol.asyncIterator](): AsyncGenerator<E, void, undefined> {
    if (this.#iterating) throw new EvbusError("a subscription can be iterated once; subscribe again for another iterator");
    this.#iterating = true;
    const controller = this.#controller;
    const run = this.#run(this, controller.signal);
    // However the iteration ends (the stream gave up, an error, `break`, `close()`), the
    // subscription's controller is aborted: the connection closes and the listener on the
    // caller's signal goes.
    async function* iterate(): AsyncGenerator<E, void, undefined> {
      try {
        yield* run;
      } finally {
        controller.abort();
      }
    }
    const generator = iterate();
    // Leaving a `for await` loop (break, throw) closes the connection at once, even while
    // the stream waits for the next event.
    const inner = generator.return.bind(generator);
    generator.return = (value) => {
      controller.abort();
      return inner(value);
    };
    return generator;
  }
}
