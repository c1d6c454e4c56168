//! AsyncAPI 3.0 export of the catalogue.
//!
//! One channel per event type (address = the type name), one message per schema version
//! (`<type>.v<n>`), one `send` operation per channel (the application emits the events). Message
//! payloads are the event schemas, with shared definitions under `components/schemas` and
//! referenced from there; message headers are the CloudEvents binary-mode attributes of the
//! chosen binding prefix (`ce_` by default: Kafka and Redis), with `ce_type` and
//! `ce_dataschema` fixed per message.

use serde_json::{Map, Value, json};

use super::catalog::{Catalog, EventVersion};
use super::resolve::{self, DocKey};
use super::{ALLOW_KEYWORD, EXTERNAL_KEYWORD, REDACT_KEYWORD, VERSION_KEYWORD, pointer};
use crate::error::{Error, ErrorKind};

/// Settings of an AsyncAPI export.
#[derive(Clone, Debug)]
pub struct AsyncApiOptions {
    /// `info.title` (default `evbus event catalogue`).
    pub title: String,
    /// `info.version`: the version of the catalogue document (default `1.0.0`).
    pub version: String,
    /// `info.description`.
    pub description: Option<String>,
    /// Prefix of CloudEvents attribute headers: `ce_` (Kafka, Redis; the default) or `ce-`
    /// (HTTP, NATS).
    pub header_prefix: String,
    /// Export only the event types marked `x-evbus-external` (what the gateway shows).
    pub external_only: bool,
}

impl Default for AsyncApiOptions {
    fn default() -> Self {
        AsyncApiOptions {
            title: "evbus event catalogue".to_owned(),
            version: "1.0.0".to_owned(),
            description: None,
            header_prefix: "ce_".to_owned(),
            external_only: false,
        }
    }
}

/// The top level, in the order people expect to read it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    asyncapi: &'static str,
    info: Value,
    default_content_type: &'static str,
    channels: Value,
    operations: Value,
    components: Value,
}

fn message_key(ty: &str, version: u32) -> String {
    format!("{ty}.v{version}")
}

fn operation_key(ty: &str) -> String {
    let mut chars = ty.chars();
    let first: String = chars
        .next()
        .map(|c| c.to_uppercase().collect())
        .unwrap_or_default();
    format!("emit{first}{}", chars.as_str())
}

impl Catalog {
    /// The catalogue as an AsyncAPI 3.0 document (a JSON value; object keys sorted).
    pub fn to_asyncapi(&self, options: &AsyncApiOptions) -> Value {
        serde_json::to_value(self.asyncapi_document(options)).unwrap_or(Value::Null)
    }

    fn asyncapi_document(&self, options: &AsyncApiOptions) -> Document {
        let mut channels = Map::new();
        let mut operations = Map::new();
        let mut messages = Map::new();
        let mut schemas = Map::new();

        for (name, def) in self.canonical_definitions() {
            schemas.insert(name.clone(), clean(&component_definition(name, def)));
        }
        let payload_key = |ty: &str, v: u32| -> String {
            let mut k = format!("{ty}.v{v}.payload");
            while self.definitions().contains_key(&k) {
                k = format!("evbus.{k}");
            }
            k
        };

        for t in self.event_types() {
            if options.external_only && !t.latest().external() {
                continue;
            }
            let ty = t.name();
            let mut channel_messages = Map::new();
            let mut op_messages = Vec::new();
            for v in t.versions() {
                let key = message_key(ty, v.version());
                let pk = payload_key(ty, v.version());
                schemas.insert(pk.clone(), clean(&component_payload(v, &pk)));
                messages.insert(key.clone(), message(v, &pk, options));
                channel_messages.insert(
                    key.clone(),
                    json!({"$ref": format!("#/components/messages/{key}")}),
                );
                op_messages.push(json!({
                    "$ref": format!("#/channels/{}/messages/{}", pointer::escape(ty), key)
                }));
            }
            let mut channel = Map::new();
            channel.insert("address".to_owned(), json!(ty));
            channel.insert("title".to_owned(), json!(ty));
            if let Some(d) = t.latest().description() {
                channel.insert("description".to_owned(), json!(d));
            }
            channel.insert("messages".to_owned(), Value::Object(channel_messages));
            channels.insert(ty.to_owned(), Value::Object(channel));
            operations.insert(
                operation_key(ty),
                json!({
                    "action": "send",
                    "title": format!("Emit {ty}"),
                    "channel": {"$ref": format!("#/channels/{}", pointer::escape(ty))},
                    "messages": op_messages,
                }),
            );
        }

        let mut info = Map::new();
        info.insert("title".to_owned(), json!(options.title));
        info.insert("version".to_owned(), json!(options.version));
        info.insert(
            "description".to_owned(),
            json!(options.description.clone().unwrap_or_else(|| format!(
                "Event types of an evbus catalogue. Events are CloudEvents 1.0 in binary mode: \
                 attributes travel as `{}*` headers, the JSON data as the message body.",
                options.header_prefix
            ))),
        );
        Document {
            asyncapi: "3.0.0",
            info: Value::Object(info),
            default_content_type: "application/json",
            channels: Value::Object(channels),
            operations: Value::Object(operations),
            components: json!({"messages": messages, "schemas": schemas}),
        }
    }

    /// The AsyncAPI 3.0 document as pretty-printed JSON.
    pub fn to_asyncapi_json(&self, options: &AsyncApiOptions) -> String {
        let mut s = serde_json::to_string_pretty(&self.asyncapi_document(options))
            .unwrap_or_else(|_| "{}".to_owned());
        s.push('\n');
        s
    }

    /// The AsyncAPI 3.0 document as YAML.
    pub fn to_asyncapi_yaml(&self, options: &AsyncApiOptions) -> Result<String, Error> {
        serde_norway::to_string(&self.asyncapi_document(options)).map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("cannot write AsyncAPI YAML: {e}"),
            )
            .with_source(e)
        })
    }
}

fn components_prefix(payload_key: &str) -> impl Fn(&DocKey) -> String + '_ {
    move |k: &DocKey| match k {
        DocKey::Event => format!("#/components/schemas/{}", pointer::escape(payload_key)),
        DocKey::Def(n) => format!("#/components/schemas/{}", pointer::escape(n)),
    }
}

/// A shared definition as a component schema: references re-pointed into components.
fn component_definition(name: &str, canonical: &Value) -> Value {
    let prefix = components_prefix(name);
    resolve::rewrite(canonical, &DocKey::Def(name.to_owned()), &prefix)
}

/// An event version's payload schema as a component: references re-pointed into components.
fn component_payload(v: &EventVersion, own_key: &str) -> Value {
    let prefix = components_prefix(own_key);
    let mut s = resolve::rewrite(v.canonical(), &DocKey::Event, &prefix);
    if let Some(o) = s.as_object_mut() {
        for k in [
            VERSION_KEYWORD,
            EXTERNAL_KEYWORD,
            REDACT_KEYWORD,
            ALLOW_KEYWORD,
        ] {
            o.remove(k);
        }
    }
    s
}

fn message(v: &EventVersion, payload_key: &str, options: &AsyncApiOptions) -> Value {
    let p = &options.header_prefix;
    let ty = v.event_type();
    let mut headers = Map::new();
    let mut prop = |name: &str, schema: Value| {
        headers.insert(format!("{p}{name}"), schema);
    };
    prop(
        "specversion",
        json!({"type": "string", "const": "1.0", "description": "CloudEvents spec version"}),
    );
    prop(
        "id",
        json!({"type": "string", "description": "Event id, unique per source (UUIDv7 by default)"}),
    );
    prop(
        "source",
        json!({"type": "string", "description": "URI-reference of the event's source"}),
    );
    prop(
        "type",
        json!({"type": "string", "const": ty, "description": "Event type"}),
    );
    prop(
        "time",
        json!({"type": "string", "format": "date-time", "description": "When the occurrence happened"}),
    );
    prop(
        "dataschema",
        json!({"type": "string", "const": v.dataschema(), "description": "Schema version the data was validated against"}),
    );
    prop(
        "subject",
        json!({"type": "string", "description": "Subject of the event in the context of its source"}),
    );
    prop(
        "partitionkey",
        json!({"type": "string", "description": "Partition (ordering) key"}),
    );
    prop(
        "traceparent",
        json!({"type": "string", "description": "W3C trace context traceparent"}),
    );
    prop(
        "tracestate",
        json!({"type": "string", "description": "W3C trace context tracestate"}),
    );
    let required: Vec<String> = ["specversion", "id", "source", "type"]
        .iter()
        .map(|n| format!("{p}{n}"))
        .collect();

    let mut m = Map::new();
    m.insert("name".to_owned(), json!(ty));
    m.insert("title".to_owned(), json!(format!("{ty} v{}", v.version())));
    if let Some(d) = v.description() {
        m.insert("summary".to_owned(), json!(first_sentence(d)));
        m.insert("description".to_owned(), json!(d));
    }
    m.insert("contentType".to_owned(), json!("application/json"));
    m.insert(
        "headers".to_owned(),
        json!({
            "type": "object",
            "description": "CloudEvents attributes (binary content mode)",
            "properties": headers,
            "required": required,
        }),
    );
    m.insert(
        "payload".to_owned(),
        json!({"$ref": format!("#/components/schemas/{}", pointer::escape(payload_key))}),
    );
    m.insert(VERSION_KEYWORD.to_owned(), json!(v.version()));
    m.insert(EXTERNAL_KEYWORD.to_owned(), json!(v.external()));
    if !v.redact().is_empty() {
        m.insert(REDACT_KEYWORD.to_owned(), json!(v.redact()));
    }
    if let Some(allow) = v.allow() {
        m.insert(ALLOW_KEYWORD.to_owned(), json!(allow));
    }
    Value::Object(m)
}

fn first_sentence(s: &str) -> String {
    match s.find(". ") {
        Some(i) => s[..=i].to_owned(),
        None => s.to_owned(),
    }
}

/// Drops keywords that only make sense at a document root.
fn clean(schema: &Value) -> Value {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut() {
        o.remove("$schema");
        o.remove("$id");
    }
    s
}
