/**
 * The shapes of the gateway's management API: webhooks (`/v1/webhooks…`, any key for its own
 * webhooks, an admin key for all) and API keys (`/v1/keys…`, admin keys only). Members are
 * named as on the wire (snake_case), as `GET /v1/openapi.json` names them; times are RFC 3339
 * strings as the gateway sends them.
 */

/** Options of a single request. */
export interface RequestOptions {
  /** Aborts the request: the call then rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** What `POST /v1/webhooks` takes (OpenAPI `CreateWebhook`). */
export interface CreateWebhookInput {
  /**
   * Where deliveries are POSTed: an http(s) URL without credentials whose host resolves only to
   * public addresses (or to ones the operator allows with `--webhook-allow`); otherwise 422.
   * At most 2000 characters.
   */
  url: string;
  /** The event types delivered: 1 to 50 (`max_types_per_webhook`), each in the key's subscribe scope (otherwise 403). */
  event_types: string[];
  /** A human description, at most 1000 characters (default ""). */
  description?: string;
  /**
   * JSON pointers (`/order/referenceId`; a `*` token is every element or member): a narrower
   * allow-list on top of the types' own curation (it cannot widen it). At most 100, each at most
   * 256 bytes and 16 levels.
   */
  allow?: string[] | null;
}

/** A webhook as the gateway shows it (OpenAPI `Webhook`): never its secret. */
export interface WebhookInfo {
  /** `wh_…` */
  id: string;
  url: string;
  /** Sorted, without duplicates. */
  event_types: string[];
  description: string;
  /** The webhook's own allow-list, or null for none. */
  allow: string[] | null;
  /** Whether deliveries run. */
  enabled: boolean;
  /** Why the endpoint was disabled (410 Gone, failing for too long, "disabled by its owner"); null while enabled. */
  disabled_reason: string | null;
  /** Start of the current run of failed deliveries; null while deliveries succeed. */
  failing_since: string | null;
  created_at: string;
}

/** What `POST /v1/webhooks` answers (OpenAPI `NewWebhook`): the webhook and its signing secret. */
export interface NewWebhook extends WebhookInfo {
  /**
   * The `whsec_…` signing secret. **Shown once**: the gateway never answers it again (not in
   * `getWebhook`, not in `listWebhooks`); keep it where the receiver reads it
   * (`WebhookVerifier`). Lost, it can only be replaced: `rotateWebhookSecret`.
   */
  secret: string;
}

/**
 * What `PATCH /v1/webhooks/{id}` takes (OpenAPI `PatchWebhook`): members left out stay as they
 * are. The URL and the allow-list cannot be changed: register another webhook.
 */
export interface UpdateWebhookInput {
  /** 1 to 50 event types, each in the key's subscribe scope; a type taken off is no longer delivered, queued retries included. */
  event_types?: string[];
  /** At most 1000 characters. */
  description?: string;
  /**
   * `false` disables the endpoint ("disabled by its owner": events logged meanwhile are not
   * queued for it; replay them after re-enabling); `true` re-enables it and clears its failure
   * state.
   */
  enabled?: boolean;
}

/** How to rotate a webhook's signing secret. */
export interface RotateSecretOptions extends RequestOptions {
  /**
   * Rotate even while an earlier rotation's previous secret still signs (otherwise 409), and
   * stop that secret at once: after a leak. Sent as `?retire_previous=true`.
   */
  retirePrevious?: boolean;
}

/** What `POST /v1/webhooks/{id}/rotate-secret` answers (OpenAPI `RotatedSecret`). */
export interface RotatedSecret {
  /** The webhook id. */
  id: string;
  /**
   * The new `whsec_…` signing secret. **Shown once**, like a registration's: the gateway never
   * answers it again.
   */
  secret: string;
  /** Until then the previous secret signs beside the new one (24 h by default): switch receivers within that time. */
  previous_secret_expires_at: string;
}

/** One delivery attempt (OpenAPI `Attempt`), as `GET /v1/webhooks/{id}/attempts` lists them. */
export interface WebhookAttempt {
  webhook_id: string;
  /** The event id (the CloudEvent `id` in the delivery's body; the `webhook-id` header is derived from it and the event's `source`). */
  event_id: string;
  /** 1 for a delivery's first attempt. */
  attempt: number;
  /** When it was made. */
  at: string;
  /** The receiver's HTTP status; null when no response came (see `error`). */
  status: number | null;
  /** How long the attempt took. */
  latency_ms: number;
  /** Why it failed without a response (timeout, connection, a refused address: `refused: …`), or why it was not sent (`not delivered: …`). */
  error: string | null;
  /** The first KiB of the receiver's response body, as text; null without a response. */
  response: string | null;
}

/** What `POST /v1/webhooks/{id}/replay` takes (OpenAPI `Replay`). */
export interface ReplayInput {
  /** Every logged event since this time is delivered again (the log keeps 72 h by default). */
  since: string | Date;
}

/** What `POST /v1/webhooks/{id}/replay` answers (OpenAPI `Replayed`). */
export interface ReplayResult {
  /** Deliveries queued (events with a delivery to this endpoint still pending are not queued again). */
  replayed: number;
  /** Events replays may still queue to this webhook before `budget_resets_at`. */
  budget_remaining: number;
  /** Nothing is left: the next replay before `budget_resets_at` is answered 429. */
  budget_exhausted: boolean;
  /** When more budget frees up; null when no replay window is open. */
  budget_resets_at: string | null;
}

/** A key's own request rate limit, in {@link CreateKeyInput}. */
export interface KeyRateLimitInput {
  /** Requests per second, sustained: 1 to 1,000,000. */
  per_second: number;
  /** Requests at once, 1 to 1,000,000; absent or null: twice `per_second`. */
  burst?: number | null;
}

/** What `POST /v1/keys` takes (OpenAPI `CreateKey`). */
export interface CreateKeyInput {
  /** 1 to 200 characters, not only spaces. */
  name: string;
  /** Event types (names or `*` patterns, `afterOrder*`) the key may subscribe to (streams, webhooks). */
  subscribe?: string[];
  /**
   * Event types (names or `*` patterns) the key may publish. A key that may publish must be
   * bound to at least one source (`sources`), otherwise 400.
   */
  publish?: string[];
  /**
   * The CloudEvents `source` values the key's published events may carry: each one exact
   * (`/plugins/orders`, matched whole: not `/plugins/orders/eu`), or a pattern where `*` stands
   * for any run of characters (`https://shop.example/*`; `*` alone: any source). 1 to 2048
   * characters each, no control characters (otherwise 400 with `problem.invalid_positions`);
   * `/`, `:`, `,` and `.` are plain characters (`*` covers `/` too: end a prefix with its
   * separator); no invisible formatting characters; at most 100. Required, at least one, when `publish` is not
   * empty (otherwise 400). An event whose `source` none of them matches is refused with a 403
   * before anything is kept: a key publishes only as the producers it was made for.
   */
  sources?: string[];
  /** Whether the key may manage keys (and see every webhook). */
  admin?: boolean;
  /** When the key stops working; null or absent: never. */
  expires_at?: string | Date | null;
  /** The key's own rate limit; null or absent: the gateway's default. */
  rate_limit?: KeyRateLimitInput | null;
  /**
   * The key's own publish byte rate (request-body bytes of `publish` per second, 1 to
   * 1,073,741,824; the burst is a second's worth, never less than the largest accepted body);
   * null or absent: the gateway's default (`evbus serve --publish-bytes-per-second`).
   */
  publish_byte_rate?: KeyPublishByteRateInput | null;
}

/** A key's own publish byte rate, at creation. */
export interface KeyPublishByteRateInput {
  bytes_per_second: number;
}

/** The publish byte rate a key is held to. */
export interface KeyPublishByteRate {
  bytes_per_second: number;
  /** True when this is the gateway's default (the key has no rate of its own). */
  default: boolean;
}

/** The limit a key is held to. */
export interface KeyRateLimit {
  per_second: number;
  burst: number;
  /** True when this is the gateway's default (the key has no limit of its own). */
  default: boolean;
}

/** An API key's record (OpenAPI `Key`): never the key itself. */
export interface KeyInfo {
  /** The public lookup id: the part of `evb_<id>_<secret>` between the underscores; `revokeKey` takes it. */
  id: string;
  name: string;
  /** `evb_<id>`: how the key starts, to recognise it. */
  prefix: string;
  subscribe: string[];
  publish: string[];
  /**
   * The `source` patterns its published events may carry, as given at creation (see
   * {@link CreateKeyInput.sources}; empty when none were given: a key that may not publish
   * needs none). Keys created before keys were bound to sources show `["*"]` (any source).
   */
  sources: string[];
  admin: boolean;
  created_at: string;
  /** null: never expires. */
  expires_at: string | null;
  /** null: not revoked. */
  revoked_at: string | null;
  rate_limit: KeyRateLimit;
  /** Over it, `publish` is answered 429 with `Retry-After`, the body unread. */
  publish_byte_rate: KeyPublishByteRate;
}

/** What `POST /v1/keys` answers (OpenAPI `NewKey`). */
export interface NewKey extends KeyInfo {
  /**
   * The API key, `evb_<id>_<secret>`. **Shown once**: the gateway keeps only a hash of its
   * secret and never answers it again; hand it over to its user now.
   */
  key: string;
  /** One line per scope pattern matching none of the external types served now (a misspelling?); the key is created all the same. */
  warnings: string[];
}
