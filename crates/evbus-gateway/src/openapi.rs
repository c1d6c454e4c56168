//! The OpenAPI 3.1 document served at `GET /v1/openapi.json`.
//!
//! Written beside the handlers, not derived from their types: the handlers read raw bodies
//! (so that their errors quote no request value), and the rules that matter to a client
//! (lengths, patterns, which statuses each route answers) live in their checks, not in
//! types. Exactness is tested instead: schemathesis runs every phase and check against a
//! real `evbus serve` (`cargo xtask test`), so an answer the document misses (a status, a
//! body that breaks its schema) or a request it allows that the gateway refuses fails the
//! build. The other way round is kept by reading: schemathesis never learns that a
//! documented status cannot be answered (`GET /v1/stream` has no request timeout, so no
//! 408), and `GET /v1/stream` itself is left out of its run (a stream does not end).

use serde_json::{Map, Value, json};

/// Every secured operation can answer these: no or a bad key (401), a request slower than
/// the deadline (408), the key's rate limit (429), a store failure (500), the gateway at its
/// connection limit (503).
const COMMON: &[&str] = &["401", "408", "429", "500", "503"];

fn problem() -> Value {
    json!({"$ref": "#/components/responses/Problem"})
}

/// An operation: `summary`, who may call it, its success answer, and the other statuses it
/// can answer besides [`COMMON`].
fn op(summary: &str, scope: &str, ok: (&str, Value), extra: &[&str]) -> Value {
    let mut responses = Map::new();
    responses.insert(ok.0.to_owned(), ok.1);
    for code in COMMON.iter().chain(extra) {
        responses.insert((*code).to_owned(), problem());
    }
    json!({
        "summary": summary,
        "description": format!("Needs: {scope}."),
        "responses": responses,
    })
}

/// `op` with its own `parameters`.
fn with_parameters(mut op: Value, parameters: Value) -> Value {
    op["parameters"] = parameters;
    op
}

/// `op` named `id` (its `operationId`, which links refer to).
fn named(mut op: Value, id: &str) -> Value {
    op["operationId"] = json!(id);
    op
}

/// Links from an answer whose body has an `id` to the operations that take it as `{id}`:
/// the stateful chain a client follows (key → webhook → attempts → replay).
fn links(mut op: Value, code: &str, targets: &[&str]) -> Value {
    let mut links = Map::new();
    for target in targets {
        links.insert(
            (*target).to_owned(),
            json!({"operationId": target, "parameters": {"id": "$response.body#/id"}}),
        );
    }
    op["responses"][code]["links"] = Value::Object(links);
    op
}

/// A JSON success answer of `schema`.
fn json_ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// A success answer without a body.
fn empty(description: &str) -> Value {
    json!({"description": description})
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn array_of(name: &str) -> Value {
    json!({"type": "array", "items": schema(name)})
}

/// `op` with a required JSON body of component `name`; such a body can also be malformed
/// (400) or too large (413).
fn with_body(mut op: Value, name: &str) -> Value {
    op["requestBody"] = json!({
        "required": true,
        "content": {"application/json": {"schema": schema(name)}}
    });
    for code in ["400", "413"] {
        op["responses"][code] = problem();
    }
    op
}

/// Visible text: no control character (C0, DEL, C1).
const NO_CONTROL: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";

/// A source: visible text without invisible formatting characters either
/// ([`keys::is_invisible_format`](crate::keys::is_invisible_format)).
const SOURCE_TEXT: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u061c\\u180e\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u206f\\ufeff\\ufff9-\\ufffb]*$";

/// The document.
pub(crate) fn document() -> Value {
    // An id that is not UTF-8 text once percent-decoded (`%FF`) is answered 400 by every
    // operation that takes one.
    let id_param = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"},
        "description": "percent-decoded, UTF-8 text (otherwise 400)"}]);
    let mut publish = op(
        "Publish one CloudEvent, validated against the catalogue",
        "a key whose publish scope covers the event type (an external type) and whose sources match the event's `source`",
        (
            "202",
            json_ok(
                "Accepted",
                json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}),
            ),
        ),
        &["400", "403", "409", "413", "415", "422"],
    );
    publish["description"] = json!(
        "Needs: a key whose publish scope covers the event type (an external type) and one of whose `sources` matches the event's `source` (otherwise 403, before anything is kept: a key cannot claim another producer's source and id). Structured mode is described here (Content-Type: application/cloudevents+json). Binary mode is also accepted: the ce-specversion, ce-id, ce-source and ce-type headers (and optional ce-subject, ce-partitionkey, other ce-* extensions), Content-Type application/json and the data as the body; any other request is answered 415. Besides its request rate, a key may publish so many bytes of request bodies per second (its own publish_byte_rate, else the gateway's publish_bytes_per_second): a body is charged with its length before it is parsed, and one over what is left is answered 429 with `limit` (the bytes per second) and Retry-After, unparsed."
    );
    publish["requestBody"] = json!({
        "required": true,
        "content": {"application/cloudevents+json": {"schema": schema("CloudEvent")}}
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "evbus gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "External access to the evbus event bus: API keys with scopes, curated payloads, signed webhooks (Standard Webhooks), Server-Sent Events. Errors are RFC 9457 problem details that quote no request value."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {
                "summary": "Liveness and broker health",
                "security": [],
                "responses": {
                    "200": json_ok("ok or degraded", schema("Health")),
                    "503": json_ok("the broker is unavailable", schema("Health"))
                }
            }},
            "/metrics": {"get": op(
                "Prometheus metrics",
                "an admin key",
                ("200", json!({"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}})),
                &["403"],
            )},
            "/v1/openapi.json": {"get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": json_ok("OpenAPI 3.1", json!({"type": "object"}))}
            }},
            "/v1/events": {"post": publish},
            "/v1/event-types": {"get": op(
                "External event types this key may subscribe to or publish, with curated schemas",
                "any valid key",
                ("200", json_ok("the types", array_of("EventType"))),
                &[],
            )},
            "/v1/stream": {"get": {
                "summary": "Server-Sent Events of curated events; resume with Last-Event-ID",
                "description": "Needs: a subscribe scope covering every type asked for. Each event: id (an opaque cursor), event (the type), data (a curated structured CloudEvent).",
                "parameters": [
                    {"name": "types", "in": "query", "schema": {"type": "string"}, "description": "comma-separated event types; default: every type the key may subscribe to"},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "the stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "400": problem(), "401": problem(), "403": problem(), "429": problem(),
                    "500": problem(), "503": problem()
                }
            }},
            "/v1/webhooks": {
                "post": links(named(with_body(
                    op(
                        "Register a webhook",
                        "a subscribe scope covering every event type",
                        ("201", json_ok("the webhook with its signing secret (shown once)", schema("NewWebhook"))),
                        &["403", "409", "422"],
                    ),
                    "CreateWebhook",
                ), "createWebhook"), "201", &["getWebhook", "updateWebhook", "listAttempts", "replayWebhook", "rotateSecret", "deleteWebhook"]),
                "get": named(op(
                    "This key's webhooks (all of them for an admin key)",
                    "any valid key",
                    ("200", json_ok("the webhooks", array_of("Webhook"))),
                    &[],
                ), "listWebhooks")
            },
            "/v1/webhooks/{id}": {
                "parameters": id_param,
                "get": named(op("One webhook", "the key that registered it, or an admin key", ("200", json_ok("the webhook", schema("Webhook"))), &["400", "404"]), "getWebhook"),
                "patch": named(with_body(
                    op(
                        "Change a webhook's event types or description, or enable or disable it (enabling clears its failure state; a type taken off is no longer delivered, queued retries included)",
                        "the key that registered it, or an admin key; a subscribe scope covering every event type named",
                        ("200", json_ok("the webhook", schema("Webhook"))),
                        &["403", "404"],
                    ),
                    "PatchWebhook",
                ), "updateWebhook"),
                "delete": named(op("Delete a webhook", "the key that registered it, or an admin key", ("204", empty("deleted")), &["400", "404"]), "deleteWebhook")
            },
            "/v1/webhooks/{id}/rotate-secret": {
                "parameters": id_param,
                "post": named(with_parameters(op(
                    "New signing secret; the previous one keeps signing during the overlap (409 while an earlier rotation's overlap runs, unless retire_previous=true)",
                    "the owner or an admin key",
                    ("200", json_ok("the new secret", schema("RotatedSecret"))),
                    &["400", "404", "409"],
                ), json!([
                    {"name": "retire_previous", "in": "query", "required": false, "schema": {"type": "boolean"},
                     "description": "rotate even while the previous secret still signs, stopping it at once (after a leak)"}
                ])), "rotateSecret")
            },
            "/v1/webhooks/{id}/attempts": {
                "parameters": id_param,
                "get": named(op(
                    "The latest delivery attempts, newest first",
                    "the owner or an admin key",
                    ("200", json_ok("the attempts", array_of("Attempt"))),
                    &["400", "404"],
                ), "listAttempts")
            },
            "/v1/webhooks/{id}/replay": {
                "parameters": id_param,
                "post": named(with_body(
                    op(
                        "Deliver again every logged event since a time (re-enables a disabled endpoint), within the webhook's replay budget",
                        "the owner or an admin key",
                        ("202", json_ok("how many deliveries were queued, and what the replay budget has left", schema("Replayed"))),
                        &["404"],
                    ),
                    "Replay",
                ), "replayWebhook")
            },
            "/v1/keys": {
                "post": links(named(with_body(
                    op(
                        "Create an API key (the key is shown once)",
                        "an admin key",
                        ("201", json_ok("the key record and the key", schema("NewKey"))),
                        &["403"],
                    ),
                    "CreateKey",
                ), "createKey"), "201", &["revokeKey"]),
                "get": named(op("Every key (never the key itself)", "an admin key", ("200", json_ok("the keys", array_of("Key"))), &["403"]), "listKeys")
            },
            "/v1/me": {
                "get": named(op("The key making the request: its scopes, sources and limits (never the key itself)", "any key", ("200", json_ok("the key's record", schema("Key"))), &[]), "currentKey")
            },
            "/v1/keys/{id}": {
                "parameters": id_param,
                "delete": named(op("Revoke a key, effective immediately", "an admin key", ("204", empty("revoked")), &["400", "403", "404", "409"]), "revokeKey")
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key: evb_<id>_<secret>"}},
            "responses": {"Problem": {"description": "RFC 9457 problem details", "content": {"application/problem+json": {"schema": schema("Problem")}}}},
            "schemas": schemas()
        }
    })
}

fn schemas() -> Value {
    let time = json!({"type": "string", "format": "date-time"});
    let opt_time = json!({"type": ["string", "null"], "format": "date-time"});
    let scope = json!({"type": "string", "pattern": "^[A-Za-z0-9._*-]{1,200}$", "description": "an event type name or a * pattern"});
    let visible = |max: u32| json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": NO_CONTROL});
    let mut source_pattern = visible(crate::keys::MAX_SOURCE_PATTERN_LEN as u32);
    source_pattern["pattern"] = json!(SOURCE_TEXT);
    source_pattern["description"] =
        json!("a CloudEvents source, or a pattern of one with * for any run of characters");
    json!({
        "Problem": {"type": "object", "required": ["title", "status"],
            "description": "RFC 9457 problem details. Members beyond the four standard ones appear where they explain the refusal; error bodies name positions in the request, never its values.",
            "properties": {
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"},
            "violations": {"type": "array", "items": {"type": "object"}, "description": "422: where the data breaks the schema (JSON pointer and message), at most 20"},
            "violations_total": {"type": "integer", "minimum": 0, "description": "422: how many violations there were in all"},
            "limit": {"type": "integer", "description": "the bound that was exceeded (a count, a size, a rate)"},
            "denied_positions": {"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "403: positions of the event types this key may not use"},
            "invalid_positions": {"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "400: positions of the scope patterns that are not valid"},
            "position": {"type": "integer", "minimum": 0, "description": "400: position of the refused item"},
            "max_pointer_bytes": {"type": "integer", "description": "400: the longest allow pointer accepted"},
            "previous_secret_until": time,
            "resets_at": opt_time,
            "window_seconds": {"type": "integer", "description": "the length of the window a limit counts in"}
        }},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"enum": ["ok", "degraded", "unavailable"]}}},
        "CloudEvent": {
            "type": "object",
            "description": "A structured CloudEvent 1.0 with JSON data. Extension attributes: lowercase letters and digits, at most 20, string, number or boolean values.",
            "required": ["specversion", "id", "source", "type"],
            "properties": {
                "specversion": {"const": "1.0"},
                "id": {"type": "string", "pattern": "^[!-~]{1,256}$", "description": "visible ASCII, unique per source"},
                "source": {"type": "string", "minLength": 1, "maxLength": 2048, "pattern": SOURCE_TEXT,
                    "description": "no control or invisible formatting characters; one of the key's sources must match it"},
                "type": visible(2048),
                "subject": {"type": ["string", "null"], "minLength": 1, "maxLength": 2048, "pattern": NO_CONTROL},
                "time": opt_time,
                "datacontenttype": {"type": ["string", "null"], "pattern": "^(application/json|text/json|[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*\\+json)( *;.*)?$", "description": "JSON only: application/json, text/json or a +json type"},
                "dataschema": {"type": ["string", "null"], "minLength": 1},
                "data": {}
            },
            "propertyNames": {"pattern": "^[a-z0-9]{1,20}$"},
            "examples": [{
                "specversion": "1.0", "id": "crm-2026-000042", "source": "/crm",
                "type": "afterProductUpdate", "datacontenttype": "application/json",
                "subject": "prod_1",
                "data": {"productId": "prod_1", "product": {"_id": "prod_1", "shopId": "shop_1", "title": "Linen shirt", "isVisible": true}}
            }],
            "additionalProperties": {"anyOf": [
                {"type": "string", "maxLength": 2048, "pattern": NO_CONTROL},
                {"type": ["number", "boolean", "null"]}
            ]}
        },
        "EventType": {"type": "object", "required": ["type", "subscribe", "publish", "version", "schema", "example", "versions"], "properties": {
            "type": {"type": "string"},
            "subscribe": {"type": "boolean", "description": "whether this key may subscribe to the type (stream, webhooks)"},
            "publish": {"type": "boolean", "description": "whether this key may publish the type"},
            "version": {"type": "integer"},
            "dataschema": {"type": ["string", "null"]}, "description": {"type": ["string", "null"]},
            "schema": {"type": "object", "description": "the latest version's curated JSON Schema"},
            "example": {"description": "an example payload built from the curated schema (and curated)"},
            "versions": {"type": "array", "description": "the version history, oldest first: the external versions, each with its own curated schema", "items": {
                "type": "object", "required": ["version", "dataschema", "schema"], "properties": {
                    "version": {"type": "integer"}, "dataschema": {"type": "string"},
                    "description": {"type": ["string", "null"]}, "schema": {"type": "object"}
                }
            }}
        }},
        "CreateWebhook": {"type": "object", "required": ["url", "event_types"], "additionalProperties": false,
            "examples": [{"url": "https://203.0.114.10/hooks/evbus", "event_types": ["afterOrderCreate"], "description": "ERP order import"}],
            "properties": {
            "url": {"type": "string", "maxLength": 2000, "description": "http(s) URL of a public address (or one the operator allows)"},
            "event_types": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 50},
            "description": {"type": "string", "maxLength": 1000},
            "allow": {"type": ["array", "null"], "maxItems": 100, "items": {"type": "string", "pattern": "^/"}, "description": "JSON pointers: a narrower allow-list for this webhook"}
        }},
        "Webhook": {"type": "object", "required": ["id", "url", "event_types", "description", "allow", "enabled", "disabled_reason", "failing_since", "created_at"], "properties": {
            "id": {"type": "string"}, "url": {"type": "string"},
            "event_types": {"type": "array", "items": {"type": "string"}},
            "description": {"type": "string"},
            "allow": {"type": ["array", "null"], "items": {"type": "string"}},
            "enabled": {"type": "boolean"},
            "disabled_reason": {"type": ["string", "null"]},
            "failing_since": opt_time,
            "created_at": time
        }},
        "PatchWebhook": {"type": "object", "additionalProperties": false,
            "description": "Members left out stay as they are.",
            "examples": [{"event_types": ["afterOrderCreate", "afterOrderUpdate"]}, {"enabled": true}],
            "properties": {
            "event_types": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 50},
            "description": {"type": "string", "maxLength": 1000},
            "enabled": {"type": "boolean", "description": "true re-enables a disabled endpoint (its failure state cleared); false disables it"}
        }},
        "NewWebhook": {"allOf": [schema("Webhook"), {"type": "object", "required": ["secret"], "properties": {"secret": {"type": "string"}}}]},
        "RotatedSecret": {"type": "object", "required": ["id", "secret", "previous_secret_expires_at"], "properties": {
            "id": {"type": "string"}, "secret": {"type": "string"}, "previous_secret_expires_at": time
        }},
        "Attempt": {"type": "object", "required": ["webhook_id", "event_id", "attempt", "at", "status", "latency_ms", "error", "response"], "properties": {
            "webhook_id": {"type": "string"}, "event_id": {"type": "string"},
            "attempt": {"type": "integer"}, "at": time,
            "status": {"type": ["integer", "null"]}, "latency_ms": {"type": "integer", "minimum": 0},
            "error": {"type": ["string", "null"]}, "response": {"type": ["string", "null"]}
        }},
        "Replay": {"type": "object", "required": ["since"], "additionalProperties": false,
            "examples": [{"since": "2026-11-30T00:00:00Z"}], "properties": {"since": time}},
        "Replayed": {"type": "object", "required": ["replayed", "budget_remaining", "budget_exhausted", "budget_resets_at"],
            "description": "Events replays may queue to one webhook are bounded per 24 h window (max_replayed_per_day; the window opens with the first replay that queues an event) and over all of its key's webhooks (that times max_webhooks_per_key). A replay queues at most what the budget leaves; one finding nothing left is answered 429 with `limit`, `resets_at` and Retry-After.",
            "properties": {
            "replayed": {"type": "integer", "minimum": 0, "description": "deliveries queued (events with a delivery to this endpoint still pending are not queued again)"},
            "budget_remaining": {"type": "integer", "minimum": 0, "description": "events replays may still queue to this webhook before budget_resets_at"},
            "budget_exhausted": {"type": "boolean", "description": "true when nothing is left: the next replay before budget_resets_at is answered 429"},
            "budget_resets_at": {"type": ["string", "null"], "format": "date-time", "description": "when more budget frees up (the webhook's window ends, or its key's first one); null when no window is open"}
        }},
        "CreateKey": {"type": "object", "required": ["name"], "additionalProperties": false,
            // A key that may publish is bound to at least one source: `publish` absent or
            // empty, or `sources` not empty.
            "anyOf": [
                {"properties": {"publish": {"maxItems": 0}}},
                {"required": ["sources"], "properties": {"sources": {"minItems": 1}}}
            ],
            "examples": [{"name": "erp", "subscribe": ["afterOrder*"], "publish": []},
                {"name": "shop", "publish": ["afterOrderCreate"], "sources": ["/shop", "https://shop.example/*"]}],
            "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "[^ \\t\\r\\n]", "description": "not only spaces"},
            "subscribe": {"type": "array", "items": scope, "maxItems": crate::keys::MAX_PATTERNS},
            "publish": {"type": "array", "items": scope, "maxItems": crate::keys::MAX_PATTERNS},
            "sources": {"type": "array", "items": source_pattern, "maxItems": crate::keys::MAX_PATTERNS,
                "description": "the CloudEvents `source` values the key's published events may carry: exact, or with `*` for any run of characters (`*` alone: any source); at least one is required when `publish` is not empty"},
            "admin": {"type": "boolean"},
            "expires_at": opt_time,
            "rate_limit": {"type": ["object", "null"], "required": ["per_second"], "additionalProperties": false,
                "description": "the key's own request rate limit (token bucket); without it, the gateway's default",
                "properties": {
                "per_second": {"type": "integer", "minimum": 1, "maximum": crate::RateLimit::MAX_PER_SECOND, "description": "requests per second, sustained"},
                "burst": {"type": ["integer", "null"], "minimum": 1, "maximum": crate::RateLimit::MAX_BURST, "description": "requests at once; absent or null: twice per_second"}
            }},
            "publish_byte_rate": {"type": ["object", "null"], "required": ["bytes_per_second"], "additionalProperties": false,
                "description": "the key's own publish byte rate (request-body bytes of POST /v1/events per second; the burst is a second's worth, never less than the largest accepted body); without it, the gateway's default (publish_bytes_per_second)",
                "properties": {
                "bytes_per_second": {"type": "integer", "minimum": 1, "maximum": crate::store::MAX_PUBLISH_BYTES_PER_SECOND}
            }}
        }},
        "Key": {"type": "object", "required": ["id", "name", "prefix", "subscribe", "publish", "sources", "admin", "created_at", "expires_at", "revoked_at", "rate_limit", "publish_byte_rate"], "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "prefix": {"type": "string"},
            "subscribe": {"type": "array", "items": {"type": "string"}},
            "publish": {"type": "array", "items": {"type": "string"}},
            "sources": {"type": "array", "items": {"type": "string"}, "description": "the sources the key may publish under (keys made before sources were bound: `*`)"},
            "admin": {"type": "boolean"}, "created_at": time,
            "expires_at": opt_time, "revoked_at": opt_time,
            "rate_limit": {"type": "object", "required": ["per_second", "burst", "default"],
                "description": "the limit the key is held to: its own, or the gateway's default (`default: true`)",
                "properties": {
                "per_second": {"type": "integer", "minimum": 1},
                "burst": {"type": "integer", "minimum": 1},
                "default": {"type": "boolean"}
            }},
            "publish_byte_rate": {"type": "object", "required": ["bytes_per_second", "default"],
                "description": "the publish byte rate the key is held to: its own, or the gateway's default (`default: true`)",
                "properties": {
                "bytes_per_second": {"type": "integer", "minimum": 1},
                "default": {"type": "boolean"}
            }}
        }},
        "NewKey": {"allOf": [schema("Key"), {"type": "object", "required": ["key", "warnings"], "properties": {
            "key": {"type": "string"},
            "warnings": {"type": "array", "items": {"type": "string"},
                "description": "one line for each scope pattern that matches none of the external event types served now (the key is created all the same)"}
        }}]}
    })
}
