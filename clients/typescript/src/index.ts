/**
 * `@evbus/client`: the evbus gateway from Node services.
 *
 * - {@link EvbusClient.publish}: publish a CloudEvent (structured or binary mode);
 * - {@link EvbusClient.subscribe}: Server-Sent Events with automatic resume;
 * - {@link EvbusClient.createWebhook} and the other webhook calls: register, list, inspect,
 *   change, delete webhooks, rotate their secrets, read their delivery attempts, replay;
 * - {@link EvbusClient.createKey}, {@link EvbusClient.listKeys}, {@link EvbusClient.revokeKey}:
 *   API keys (an admin key);
 * - {@link verifyWebhook}: check a Standard Webhooks delivery;
 * - {@link Delivered} and {@link Published}: the typed payloads of the external event types.
 */

export { EvbusClient, Subscription } from "./client.js";
export type {
  ClientOptions,
  EventTypeInfo,
  EventTypeVersionInfo,
  PublishInput,
  PublishOptions,
  PublishResult,
  ReconnectOptions,
  RetryOptions,
  SubscribeOptions,
} from "./client.js";
export type { CloudEvent, DeliveredEvent, DeliveredType, ExtensionValue, PublishedType } from "./cloudevent.js";
export type {
  CreateKeyInput,
  CreateWebhookInput,
  KeyInfo,
  KeyPublishByteRate,
  KeyPublishByteRateInput,
  KeyRateLimit,
  KeyRateLimitInput,
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
export { ConnectionError, EvbusError, GatewayError } from "./errors.js";
export type { Problem, Violation } from "./errors.js";
export { SseParser } from "./sse.js";
export type { SseMessage } from "./sse.js";
export { WebhookVerificationError, WebhookVerifier, verifyWebhook } from "./webhooks.js";
export type { HeadersLike } from "./webhooks.js";
export type { DeliveredEvents } from "./generated/delivered.js";
export type { PublishedEvents } from "./generated/published.js";
export { DELIVERED_TYPES } from "./generated/delivered.js";
export { PUBLISHED_TYPES } from "./generated/published.js";
/** The data types of delivered (curated) events: `Delivered.AfterOrderCreate`, … */
export type * as Delivered from "./generated/delivered.js";
/** The data types of published events, as the catalogue validates them: `Published.AfterOrderCreate`, … */
export type * as Published from "./generated/published.js";
