//! The OpenAPI 3.1 document served at `GET /v1/openapi.json`.

use serde_json::{Value, json};

fn op(summary: &str, scope: &str, ok: (&str, &str)) -> Value {
    json!({
        "summary": summary,
        "description": format!("Needs: {scope}."),
        "responses": {
            ok.0: {"description": ok.1},
            "400": {"$ref": "#/components/responses/Problem"},
            "401": {"$ref": "#/components/responses/Problem"},
            "403": {"$ref": "#/components/responses/Problem"},
            "429": {"$ref": "#/components/responses/Problem"}
        }
    })
}

fn with_body(mut op: Value, schema: &str) -> Value {
    op["requestBody"] = json!({
        "required": true,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    });
    op
}

/// The document.
pub(crate) fn document() -> Value {
    let id_param =
        json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let mut publish = op(
        "Publish one CloudEvent, validated against the catalogue",
        "a key whose publish scope covers the event type (an external type)",
        ("202", "Accepted: {\"id\": \"<event id>\"}"),
    );
    publish["requestBody"] = json!({
        "required": true,
        "description": "Structured mode (application/cloudevents+json) or binary mode (ce-* headers, the data as the body)",
        "content": {
            "application/cloudevents+json": {"schema": {"type": "object", "required": ["specversion", "id", "source", "type"]}},
            "application/json": {"schema": {}}
        }
    });
    publish["responses"]["422"] = json!({"$ref": "#/components/responses/Problem"});
    // The same (source, id) posted again with different content (CloudEvents uniqueness).
    publish["responses"]["409"] = json!({"$ref": "#/components/responses/Problem"});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "evbus gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "External access to the evbus event bus: API keys with scopes, curated payloads, signed webhooks (Standard Webhooks), Server-Sent Events. Errors are RFC 9457 problem details."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "Liveness and broker health", "security": [], "responses": {"200": {"description": "ok"}, "503": {"description": "the broker is unavailable"}}}},
            "/metrics": {"get": op("Prometheus metrics", "an admin key", ("200", "Prometheus text format"))},
            "/v1/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            "/v1/events": {"post": publish},
            "/v1/event-types": {"get": op("External event types this key may subscribe to, with curated schemas", "any valid key", ("200", "array of {type, version, dataschema, description, schema}"))},
            "/v1/stream": {"get": {
                "summary": "Server-Sent Events of curated events; resume with Last-Event-ID",
                "description": "Needs: a subscribe scope covering every type asked for.",
                "parameters": [
                    {"name": "types", "in": "query", "schema": {"type": "string"}, "description": "comma-separated event types; default: every type the key may subscribe to"},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "text/event-stream; each event: id (log position), event (type), data (curated structured CloudEvent)"}, "401": {"$ref": "#/components/responses/Problem"}, "403": {"$ref": "#/components/responses/Problem"}}
            }},
            "/v1/webhooks": {
                "post": with_body(op("Register a webhook", "a subscribe scope covering every event type", ("201", "the webhook with its signing secret (shown once)")), "CreateWebhook"),
                "get": op("This key's webhooks (all of them for an admin key)", "any valid key", ("200", "array of webhooks"))
            },
            "/v1/webhooks/{id}": {
                "parameters": id_param,
                "get": op("One webhook", "the key that registered it, or an admin key", ("200", "the webhook")),
                "delete": op("Delete a webhook", "the key that registered it, or an admin key", ("204", "deleted"))
            },
            "/v1/webhooks/{id}/rotate-secret": {"parameters": id_param, "post": op("New signing secret; the previous one keeps signing during the overlap", "the owner or an admin key", ("200", "{id, secret, previous_secret_expires_at}"))},
            "/v1/webhooks/{id}/attempts": {"parameters": id_param, "get": op("The latest delivery attempts, newest first", "the owner or an admin key", ("200", "array of attempts"))},
            "/v1/webhooks/{id}/replay": {"parameters": id_param, "post": with_body(op("Deliver again every logged event since a time (re-enables a disabled endpoint)", "the owner or an admin key", ("202", "{replayed: n}")), "Replay")},
            "/v1/keys": {
                "post": with_body(op("Create an API key (the key is shown once)", "an admin key", ("201", "{id, key, name, prefix, ...}")), "CreateKey"),
                "get": op("Every key (never the key itself)", "an admin key", ("200", "array of {id, name, prefix, subscribe, publish, admin, created_at, expires_at}"))
            },
            "/v1/keys/{id}": {"parameters": id_param, "delete": op("Revoke a key, effective immediately", "an admin key", ("204", "revoked"))}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key: evb_<id>_<secret>"}},
            "responses": {"Problem": {"description": "RFC 9457 problem details", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
            "schemas": {
                "Problem": {"type": "object", "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"}}},
                "CreateWebhook": {"type": "object", "required": ["url", "event_types"], "additionalProperties": false, "properties": {
                    "url": {"type": "string", "format": "uri"},
                    "event_types": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "description": {"type": "string"},
                    "allow": {"type": "array", "items": {"type": "string"}, "description": "JSON pointers: a narrower allow-list for this webhook"}
                }},
                "Replay": {"type": "object", "required": ["since"], "additionalProperties": false, "properties": {"since": {"type": "string", "format": "date-time"}}},
                "CreateKey": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                    "name": {"type": "string"},
                    "subscribe": {"type": "array", "items": {"type": "string"}, "description": "event type names or * patterns"},
                    "publish": {"type": "array", "items": {"type": "string"}},
                    "admin": {"type": "boolean"},
                    "expires_at": {"type": ["string", "null"], "format": "date-time"}
                }}
            }
        }
    })
}
