/** CloudEvents 1.0 (JSON format) as the gateway sends and accepts them. */

import type { DeliveredEvents } from "./generated/delivered.js";
import type { PublishedEvents } from "./generated/published.js";

/** Values a CloudEvent extension attribute may hold. */
export type ExtensionValue = string | number | boolean;

/** A structured CloudEvent whose `data` is JSON. */
export interface CloudEvent<T = unknown, K extends string = string> {
  specversion: "1.0";
  /** Unique per `source` (the gateway refuses different content under a known source + id). */
  id: string;
  source: string;
  type: K;
  time?: string;
  subject?: string;
  datacontenttype?: string;
  dataschema?: string;
  data?: T;
  /** Extension attributes (the gateway sends none outside: they are internal). */
  [extension: string]: unknown;
}

/** The external event types a subscriber may receive. */
export type DeliveredType = keyof DeliveredEvents;
/** The external event types a publisher may send. */
export type PublishedType = keyof PublishedEvents;

/**
 * A delivered event of one of the types `K`: a union discriminated by `type`, so checking
 * `event.type` narrows `event.data`.
 */
export type DeliveredEvent<K extends DeliveredType = DeliveredType> = {
  [P in K]: CloudEvent<DeliveredEvents[P], P>;
}[K];
