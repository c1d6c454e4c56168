/**
 * Verifying webhook deliveries: Standard Webhooks (`webhook-id`, `webhook-timestamp`,
 * `webhook-signature` = `v1,` + base64 HMAC-SHA256 over `id.timestamp.body` with the `whsec_`
 * secret), checked by the `standardwebhooks` package. A delivery whose timestamp is more than
 * 5 minutes away from now is refused (replay protection), as is any change to the body or the
 * headers.
 */

import { Webhook, WebhookVerificationError } from "standardwebhooks";

import type { DeliveredEvent, DeliveredType } from "./cloudevent.js";
import { EvbusError } from "./errors.js";

export { WebhookVerificationError };

/** Request headers as Node's `http` gives them, a fetch `Headers`, or a plain record. */
export type HeadersLike = Headers | Record<string, string | string[] | undefined>;

function header(headers: HeadersLike, name: string): string | undefined {
  if (headers instanceof Headers) return headers.get(name) ?? undefined;
  for (const [key, value] of Object.entries(headers)) {
    if (key.toLowerCase() !== name) continue;
    return Array.isArray(value) ? value.join(", ") : value;
  }
  return undefined;
}

/**
 * A verifier for one webhook endpoint's secret (the `whsec_…` answered when the webhook was
 * registered or its secret rotated; during a rotation's overlap the gateway signs with both the
 * new and the previous secret, so the new one verifies at once).
 */
export class WebhookVerifier {
  readonly #webhook: Webhook;

  constructor(secret: string) {
    this.#webhook = new Webhook(secret);
  }

  /**
   * Verifies a delivery and returns the event it carries.
   *
   * @param body the raw request body, exactly as received (not re-serialised JSON)
   * @param headers the request headers
   * @throws WebhookVerificationError when a header is missing, the signature does not match or
   *   the timestamp is too old or too new
   * @throws EvbusError when the body is correctly signed but is not a JSON structured CloudEvent
   */
  verify<K extends DeliveredType = DeliveredType>(body: string | Uint8Array, headers: HeadersLike): DeliveredEvent<K> {
    const payload = typeof body === "string" ? body : Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    const signed: Record<string, string> = {};
    for (const name of ["webhook-id", "webhook-timestamp", "webhook-signature"]) {
      const value = header(headers, name);
      if (value !== undefined) signed[name] = value;
    }
    this.#webhook.verify(payload, signed, { jsonParse: false });
    let event: DeliveredEvent<K> | undefined;
    try {
      const text = payload.toString();
      event = text === "" ? undefined : (JSON.parse(text) as DeliveredEvent<K>);
    } catch (e) {
      throw new EvbusError("the webhook body is signed but is not JSON", { cause: e });
    }
    if (event === undefined || event === null || typeof event !== "object" || typeof event.type !== "string" || typeof event.id !== "string") {
      throw new EvbusError("the webhook body is signed but is not a structured CloudEvent");
    }
    return event;
  }
}

/** Verifies one delivery with `secret`; see {@link WebhookVerifier.verify}. */
export function verifyWebhook<K extends DeliveredType = DeliveredType>(
  secret: string,
  body: string | Uint8Array,
  headers: HeadersLike,
): DeliveredEvent<K> {
  return new WebhookVerifier(secret).verify<K>(body, headers);
}
