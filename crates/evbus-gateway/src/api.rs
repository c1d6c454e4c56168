//! The HTTP API: routes, authentication, rate limiting, events, event types and keys.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Path, Request, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use evbus::binding::{self, HeaderStyle};
use evbus::bus::Emit;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tower_http::timeout::TimeoutLayer;

use crate::problem::{self, Problem};
use crate::store::{KeyRecord, PublishClaim, RateLimit, Revocation, WebhookChange};
use crate::{State, curation, openapi, stream, webhooks};

pub(crate) fn router(state: Arc<State>) -> Router {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.request_timeout;
    let authed = Router::new()
        .route("/v1/events", post(publish))
        .route("/v1/event-types", get(event_types))
        .route("/v1/webhooks", post(webhooks::create).get(webhooks::list))
        .route(
            "/v1/webhooks/{id}",
            get(webhooks::get)
                .patch(update_webhook)
                .delete(webhooks::delete),
        )
        .route("/v1/webhooks/{id}/rotate-secret", post(webhooks::rotate))
        .route("/v1/webhooks/{id}/attempts", get(webhooks::attempts))
        .route("/v1/webhooks/{id}/replay", post(webhooks::replay))
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/me", get(me))
        .route("/v1/keys/{id}", axum::routing::delete(revoke_key))
        .route("/metrics", get(metrics))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ));
    // Streams are long-lived: no request timeout.
    let streaming = Router::new().route("/v1/stream", get(stream::stream));
    let public = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi_doc))
        .merge(crate::portal::router());
    authed
        .merge(streaming)
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ))
        .merge(public)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::map_response(problem::normalise))
        .with_state(state)
}

/// The token of an `Authorization: Bearer <token>` header value. The scheme is matched
/// without regard to case (RFC 9110, section 11.1: `bearer` is `Bearer`).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Authenticates `Authorization: Bearer <key>` and applies the per-key rate limit.
async fn authenticate(
    AxState(state): AxState<Arc<State>>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let Some(presented) = presented else {
        return Problem::unauthorized().into_response();
    };
    let key = match state.authenticate(presented).await {
        Ok(Some(key)) => key,
        Ok(None) => return Problem::unauthorized().into_response(),
        Err(e) => return Problem::internal(e).into_response(),
    };
    if let Err(wait) = state.limiters.check(&key) {
        return Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit of this key exceeded",
        )
        .retry_after(wait.as_secs().max(1))
        .into_response();
    }
    request.extensions_mut().insert(key);
    next.run(request).await
}

/// Parses a JSON body; errors name the position and the kind of problem, never the input.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| {
        // Field names from the schema are said; nothing of the request is quoted (an
        // unknown field's own name is not repeated).
        let message = e.to_string();
        let shape = if let Some(rest) = message.strip_prefix("missing field `") {
            rest.split('`')
                .next()
                .map(|field| format!("lacks the field `{field}`"))
        } else if message.starts_with("unknown field `") {
            message
                .split_once(", expected ")
                .map(|(_, expected)| expected.split(" at line ").next().unwrap_or(expected))
                .map(|expected| {
                    format!("has a field this endpoint does not take (expected {expected})")
                })
        } else {
            None
        };
        let what = match e.classify() {
            serde_json::error::Category::Data if shape.is_some() => {
                shape.as_deref().unwrap_or_default()
            }
            serde_json::error::Category::Data => "does not have the expected fields and types",
            serde_json::error::Category::Syntax => "is not valid JSON",
            serde_json::error::Category::Eof => "ends too early",
            serde_json::error::Category::Io => "could not be read",
        };
        Problem::bad_request(format!(
            "the request body {what} (line {}, column {}); see GET /v1/openapi.json",
            e.line(),
            e.column()
        ))
    })
}

fn require_admin(key: &KeyRecord) -> Result<(), Problem> {
    if key.admin {
        Ok(())
    } else {
        Err(Problem::forbidden("this endpoint needs an admin key"))
    }
}

async fn healthz(AxState(state): AxState<Arc<State>>) -> Response {
    let health = state.bus.transport().health().await;
    let (status, text) = match &health {
        evbus::Health::Healthy => (StatusCode::OK, "ok".to_owned()),
        evbus::Health::Degraded(_) => (StatusCode::OK, "degraded".to_owned()),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable".to_owned()),
    };
    (status, Json(json!({"status": text}))).into_response()
}

async fn openapi_doc() -> Json<Value> {
    Json(openapi::document())
}

async fn metrics(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
) -> Result<Response, Problem> {
    // Metrics name internal event types: admin only.
    require_admin(&key)?;
    let text = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn event_types(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
) -> Json<Value> {
    let visibility = &state.visibility;
    let catalog = &visibility.catalog;
    let list: Vec<Value> = visibility
        .usable(&key)
        .iter()
        .filter_map(|ty| catalog.get(ty))
        .map(|info| {
            let v = info.latest();
            let schema = curation::curate_schema(v);
            // Built from the curated schema, then curated like any outbound payload.
            let example = curation::curate_data(v, crate::portal::example::example(&schema), None);
            // The version history: external versions only, each curated by its own rules
            // and the latest version's (as its events are).
            let versions: Vec<Value> = info
                .versions()
                .iter()
                .filter(|old| old.external())
                .map(|old| {
                    json!({
                        "version": old.version(),
                        "dataschema": old.dataschema(),
                        "description": old.description(),
                        "schema": curation::curate_schema_of(info, old),
                    })
                })
                .collect();
            json!({
                "type": info.name(),
                "subscribe": visibility.may_subscribe(&key, info.name()),
                "publish": visibility.may_publish(&key, info.name()),
                "version": v.version(),
                "dataschema": v.dataschema(),
                "description": v.description(),
                "schema": schema,
                "example": example,
                "versions": versions,
            })
        })
        .collect();
    Json(Value::Array(list))
}

/// `POST /v1/events`: one CloudEvent, structured (`application/cloudevents+json`) or binary
/// (`ce-*` headers, data as the body). The body is charged to the key's publish byte
/// allowance before any of it is parsed ([`charged_body`]).
async fn publish(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    request: Request,
) -> Result<Response, Problem> {
    let (headers, body) = match charged_body(&state, &key, request).await {
        Ok(read) => read,
        Err(refused) => return Ok(refused),
    };
    publish_event(&state, &key, &headers, body).await
}

/// Reads a publish body charged to `key`'s allowance of published bytes
/// ([`GatewayConfig::publish_bytes_per_second`](crate::GatewayConfig::publish_bytes_per_second)):
/// with its `Content-Length` before a byte is read, and with the bytes read beyond it (all of
/// them for a body without one) before any is parsed. Over what is left: `429` with
/// `Retry-After`, and nothing of the body is decoded. A refused body with a
/// `Content-Length` is read and dropped (at most `max_body_bytes`, no parsing), so the client
/// gets the answer rather than a reset connection; unless the client waits for
/// `100 Continue`, in which case it never sends it. A body over `max_body_bytes` is charged
/// nothing and answered 413: one that says so in its `Content-Length` is read and dropped
/// first, up to [`OVERSIZED_DRAIN_FACTOR`] times the limit and as the key's byte allowance
/// pays for it, so that a client still writing it reads the 413 instead of a reset
/// connection (Node's `fetch` lost the answer, reported the gateway unreachable and retried
/// the upload); a larger one, or one the allowance does not cover, is answered and closed.
async fn charged_body(
    state: &State,
    key: &KeyRecord,
    request: Request,
) -> Result<(HeaderMap, Bytes), Response> {
    let max = state.config.max_body_bytes;
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(n) = length.filter(|n| *n > max) {
        let waits_for_continue = request
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        // Read only as the key's byte allowance pays for it: a key cannot make the gateway
        // read more than it may publish.
        if !waits_for_continue
            && n <= max.saturating_mul(OVERSIZED_DRAIN_FACTOR)
            && state.publish_bytes.take(key, n).is_ok()
        {
            // As long as a request's headers may take, at most: a slow sender is cut off.
            let _ = tokio::time::timeout(
                state.config.header_read_timeout,
                drop_body(request.into_body(), n),
            )
            .await;
        }
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is too large: at most {max} bytes (max_body_bytes)"),
        )
        .into_response());
    }
    let declared = length;
    let mut charged = 0;
    if let Some(n) = declared {
        if let Err(wait) = state.publish_bytes.take(key, n) {
            let waits_for_continue = request
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !waits_for_continue {
                drop_body(request.into_body(), n).await;
            }
            return Err(over_publish_bytes(state, key, wait));
        }
        charged = n;
    }
    let headers = request.headers().clone();
    // The body limit (`DefaultBodyLimit`) applies as to any extractor: 413 past it.
    let body = Bytes::from_request(request, &())
        .await
        .map_err(IntoResponse::into_response)?;
    if body.len() > charged
        && let Err(wait) = state.publish_bytes.take(key, body.len() - charged)
    {
        return Err(over_publish_bytes(state, key, wait));
    }
    Ok((headers, body))
}

/// How many times `max_body_bytes` a body that declares itself over the limit may be, and
/// still be read (and dropped) before its 413 is answered.
const OVERSIZED_DRAIN_FACTOR: usize = 16;

/// Reads and drops up to `at_most` bytes of a body, decoding nothing.
async fn drop_body(body: axum::body::Body, at_most: usize) {
    use futures::StreamExt;
    let mut chunks = body.into_data_stream();
    let mut read = 0;
    while read < at_most
        && let Some(Ok(chunk)) = chunks.next().await
    {
        read += chunk.len();
    }
}

/// The 429 of a publish over its key's byte allowance: like the request rate's, with the
/// rate (bytes per second) as `limit`.
fn over_publish_bytes(state: &State, key: &KeyRecord, wait: std::time::Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "publish byte rate of this key exceeded (its publish_byte_rate, or the gateway's publish_bytes_per_second); the body was not read as an event",
    )
    .with("limit", json!(state.publish_bytes.effective(key)))
    .retry_after(seconds.max(1))
    .into_response()
}

/// The rest of `POST /v1/events`, on a body already charged.
async fn publish_event(
    state: &State,
    key: &KeyRecord,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let event = if content_type.starts_with("application/cloudevents+json") {
        // A body that is not JSON at all is said so, with its position, before the
        // CloudEvents decoder's vaguer "an attribute is missing or malformed".
        parse_json::<serde::de::IgnoredAny>(&body)?;
        evbus::Event::from_json_slice(&body)
    } else if headers.contains_key("ce-type") {
        let pairs = headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())));
        binding::decode(pairs, body.clone(), HeaderStyle::HTTP)
    } else {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send a structured CloudEvent (Content-Type: application/cloudevents+json) or a binary-mode one (ce-specversion, ce-id, ce-source, ce-type headers)",
        ));
    };
    // The decoder's message may quote the request: only a standard attribute name is kept.
    let event = event.map_err(|e| Problem::invalid_cloudevent(e.message()))?;
    check_header_bound_attributes(&event)?;
    let ty = event.ty().to_owned();
    if !state.visibility.may_publish(key, &ty) {
        return Err(Problem::forbidden(
            "this key may not publish this event type, or it is no external event type \
             (GET /v1/event-types lists those this key may publish)",
        ));
    }
    // Before anything is claimed or decoded further: a key publishes only as the producers
    // it was made for, so its (`source`, `id`)s never touch another producer's.
    if !crate::keys::scope_allows(&key.sources, event.source()) {
        return Err(Problem::forbidden(
            "this key may not publish under this `source`: a key publishes only under the \
             sources its administrator bound it to (GET /v1/me lists them)",
        ));
    }
    if !event.is_json() {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the event data must be JSON (datacontenttype application/json)",
        ));
    }
    let data: Value = match event.data() {
        Some(bytes) => serde_json::from_slice(bytes)
            .map_err(|_| Problem::bad_request("the event data is not valid JSON"))?,
        None => Value::Null,
    };
    let info = state.visibility.catalog.get(&ty).map(|t| t.latest());
    if let Some(version) = info
        && let Err(errors) = version.validate(&data)
    {
        return Err(Problem::schema_violations(version, &errors));
    }
    let fingerprint = publish_fingerprint(&key.id, &event, &data);
    // The producer's id and source are kept (the decoder refused empty ones).
    let mut emit = Emit::new(ty, data)
        .id(event.id())
        .source(event.source())
        .extension("evbuskey", key.id.clone());
    if let Some(subject) = event.subject() {
        emit = emit.subject(subject);
    }
    if let Some(k) = event.partition_key() {
        emit = emit.key(k);
    }
    // The producer's own time is kept (the gateway's is the one in the log, `received_at`).
    if let Some(time) = event.time() {
        emit = emit.time(time);
    }
    // Events are unique per (source, id): an identical re-post is idempotent (answered 202
    // again, sent once), a different event under the same source and id is refused, never
    // dropped silently later as a "redelivery".
    // An identical post being sent by another request (a client's retry overlapping its
    // first attempt) is waited for a moment: it is answered as that one ends.
    let waiting_since = tokio::time::Instant::now();
    let claimed_at = loop {
        let at = State::now();
        match state
            .store
            .claim_publish(event.source(), event.id(), &fingerprint, at)
            .await?
        {
            PublishClaim::New | PublishClaim::Unsent => break at,
            PublishClaim::Sent => {
                return Ok((StatusCode::ACCEPTED, Json(json!({"id": event.id()}))).into_response());
            }
            PublishClaim::InFlight if waiting_since.elapsed() < IN_FLIGHT_WAIT => {
                tokio::time::sleep(IN_FLIGHT_POLL).await;
            }
            PublishClaim::InFlight => {
                return Err(Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "an identical event (same source and id) is being sent by another request; retry to learn whether it was accepted",
                )
                .retry_after(1));
            }
            PublishClaim::Conflict => {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "an event with this source and id was already accepted with different content; give every event a new id (unique per source)",
                ));
            }
        }
    };
    let sent = state.bus.send(emit).await;
    // Best effort: if this fails, the claim stays unsent and a retry sends again.
    let _ = state
        .store
        .settle_publish(event.source(), event.id(), claimed_at, sent.is_ok())
        .await;
    let id = sent.map_err(|e| {
        if e.kind() == evbus::ErrorKind::Validation {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the event breaks its schema",
            )
        } else if e.kind() == evbus::ErrorKind::InvalidEvent {
            Problem::bad_request("not a valid CloudEvent (its id and source must not be empty)")
        } else {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the bus did not accept the event; retry later",
            )
            .retry_after(1)
        }
    })?;
    metrics::counter!("evbus_gateway_published_total", "type" => event.ty().to_owned())
        .increment(1);
    Ok((StatusCode::ACCEPTED, Json(json!({"id": id}))).into_response())
}

/// How long `POST /v1/events` waits for an identical post that another request is sending
/// before it answers 503 (with `Retry-After`).
const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How often it looks whether that post has ended.
const IN_FLIGHT_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Longest accepted event `id`.
const MAX_ID_LEN: usize = 256;
/// Longest accepted `source`, `subject` or extension value.
const MAX_ATTRIBUTE_LEN: usize = 2048;

/// Refuses attributes that would poison a header on the way out (`ce-*` headers): the id
/// must be 1 to [`MAX_ID_LEN`] visible ASCII characters; `source`, `type`, `subject` and
/// extension values must hold no control characters and be at most [`MAX_ATTRIBUTE_LEN`]
/// characters. The error names the attribute, never its value (nor an extension's name).
fn check_header_bound_attributes(event: &evbus::Event) -> Result<(), Problem> {
    let id = event.id();
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Problem::bad_request(format!(
            "the CloudEvent `id` must be 1 to {MAX_ID_LEN} visible ASCII characters (no spaces, no control or non-ASCII characters)"
        )));
    }
    let bad = |v: &str| v.chars().count() > MAX_ATTRIBUTE_LEN || v.chars().any(char::is_control);
    if event.source().chars().any(crate::keys::is_invisible_format) {
        return Err(Problem::bad_request(
            "the CloudEvent `source` must hold no invisible formatting characters (zero-width, directional)",
        ));
    }
    for (name, value) in [
        ("source", Some(event.source())),
        ("type", Some(event.ty())),
        ("subject", event.subject()),
    ] {
        if value.is_some_and(bad) {
            return Err(Problem::bad_request(format!(
                "the CloudEvent `{name}` must hold no control characters and be at most {MAX_ATTRIBUTE_LEN} characters"
            )));
        }
    }
    if event.extensions().values().any(|v| bad(v)) {
        return Err(Problem::bad_request(format!(
            "a CloudEvent extension value holds control characters or is longer than {MAX_ATTRIBUTE_LEN} characters"
        )));
    }
    Ok(())
}

/// The content digest of a posted event: what an identical re-post must repeat. It includes
/// the publishing key, so only that key's re-post is idempotent: another key's post under the
/// same `source` and `id` is a 409 whatever its content. Were the key left out, a key could
/// post guesses under another tenant's (`source`, `id`) and tell from 202 or 409 whether it
/// guessed the data curation withholds from it (a redacted field, say).
fn publish_fingerprint(key: &str, event: &evbus::Event, data: &Value) -> String {
    let data = serde_json::to_vec(data).unwrap_or_default();
    crate::store::fingerprint([
        key.as_bytes(),
        event.ty().as_bytes(),
        event.subject().unwrap_or_default().as_bytes(),
        event.partition_key().unwrap_or_default().as_bytes(),
        data.as_slice(),
    ])
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    /// Checked by [`crate::keys::check_sources`].
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    /// `{"per_second": N, "burst": M}` (`burst` optional), checked by [`key_rate_limit`].
    #[serde(default)]
    rate_limit: Option<Value>,
    /// `{"bytes_per_second": N}`, checked by [`key_publish_byte_rate`].
    #[serde(default)]
    publish_byte_rate: Option<Value>,
}

/// A JSON number that is a whole non-negative number, written as an integer or not (`5` and
/// `5.0` alike: JSON Schema's `integer`, which the OpenAPI document states); `1.5`, `-1` and
/// anything else: `None`.
fn whole_number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f))
            .map(|f| f as u64)
    })
}

/// A key's own publish byte rate from its creation request: an object with
/// `bytes_per_second` (1 to [`crate::store::MAX_PUBLISH_BYTES_PER_SECOND`]). Errors name the
/// field, never
/// the value.
fn key_publish_byte_rate(value: &Value) -> Result<u64, Problem> {
    let max = crate::store::MAX_PUBLISH_BYTES_PER_SECOND;
    let refused = || {
        Problem::bad_request(format!(
            "`publish_byte_rate` must be an object with `bytes_per_second`, a whole number from 1 to {max}"
        ))
    };
    let Value::Object(fields) = value else {
        return Err(refused());
    };
    if fields.keys().any(|k| k != "bytes_per_second") {
        return Err(refused());
    }
    fields
        .get("bytes_per_second")
        .and_then(whole_number)
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(refused)
}

/// A key's own rate limit from its creation request: an object with `per_second` (1 to
/// [`RateLimit::MAX_PER_SECOND`]) and optionally `burst` (1 to [`RateLimit::MAX_BURST`];
/// default two seconds' worth). Errors name the field, never the value.
fn key_rate_limit(value: &Value) -> Result<RateLimit, Problem> {
    let shape = || {
        Problem::bad_request(
            "`rate_limit` must be an object with `per_second` and optionally `burst`, whole numbers",
        )
    };
    let Value::Object(fields) = value else {
        return Err(shape());
    };
    if fields.keys().any(|k| k != "per_second" && k != "burst") {
        return Err(shape());
    }
    let number = |name: &str, max: u32| -> Result<Option<u64>, Problem> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => whole_number(v)
                .filter(|n| (1..=u64::from(max)).contains(n))
                .map(Some)
                .ok_or_else(|| {
                    Problem::bad_request(format!(
                        "`rate_limit.{name}` must be a whole number from 1 to {max}"
                    ))
                    .with("limit", json!(max))
                }),
        }
    };
    let per_second = number("per_second", RateLimit::MAX_PER_SECOND)?.ok_or_else(|| {
        Problem::bad_request("`rate_limit.per_second` is required when `rate_limit` is given")
    })?;
    let burst = number("burst", RateLimit::MAX_BURST)?
        .unwrap_or_else(|| RateLimit::default_burst(per_second));
    RateLimit::new(per_second, burst).map_err(Problem::bad_request)
}

fn key_view(state: &State, k: &KeyRecord) -> Value {
    let limit = state.limiters.effective(k);
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": crate::keys::display_prefix(&k.id),
        "subscribe": k.subscribe,
        "publish": k.publish,
        "sources": k.sources,
        "admin": k.admin,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
        "rate_limit": {
            "per_second": limit.per_second,
            "burst": limit.burst,
            "default": k.rate_limit.is_none(),
        },
        "publish_byte_rate": {
            "bytes_per_second": state.publish_bytes.effective(k),
            "default": k.publish_bytes_per_second.is_none(),
        },
    })
}

async fn create_key(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    body: Bytes,
) -> Result<Response, Problem> {
    require_admin(&key)?;
    let req: CreateKey = parse_json(&body)?;
    // The rules the OpenAPI document states: 1 to 200 characters, not only spaces.
    let n = req.name.chars().count();
    if n == 0
        || n > 200
        || req
            .name
            .chars()
            .all(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))
    {
        return Err(Problem::bad_request(
            "`name` must be 1 to 200 characters, not only spaces",
        ));
    }
    for (field, list) in [("subscribe", &req.subscribe), ("publish", &req.publish)] {
        if list.len() > crate::keys::MAX_PATTERNS {
            return Err(Problem::bad_request(format!(
                "`{field}` holds more than {} scope patterns; use `*` patterns",
                crate::keys::MAX_PATTERNS
            )));
        }
        // Positions, not values: error bodies never quote request values.
        let bad: Vec<usize> = list
            .iter()
            .enumerate()
            .filter(|(_, p)| !crate::keys::is_valid_pattern(p))
            .map(|(i, _)| i)
            .collect();
        if !bad.is_empty() {
            return Err(Problem::bad_request(format!(
                "`{field}` holds scope patterns that are not 1 to 200 letters, digits, `.`, `_`, `-` or `*`"
            ))
            .with("invalid_positions", json!(bad)));
        }
    }
    if let Err(message) = crate::keys::check_sources(&req.publish, &req.sources) {
        // Positions, not values, as for scopes.
        let bad: Vec<usize> = req
            .sources
            .iter()
            .enumerate()
            .filter(|(_, p)| !crate::keys::is_valid_source_pattern(p))
            .map(|(i, _)| i)
            .collect();
        let problem = Problem::bad_request(message);
        return Err(if bad.is_empty() {
            problem
        } else {
            problem.with("invalid_positions", json!(bad))
        });
    }
    let rate_limit = match &req.rate_limit {
        None | Some(Value::Null) => None,
        Some(v) => Some(key_rate_limit(v)?),
    };
    let publish_bytes_per_second = match &req.publish_byte_rate {
        None | Some(Value::Null) => None,
        Some(v) => Some(key_publish_byte_rate(v)?),
    };
    let spec = crate::KeySpec {
        name: req.name,
        subscribe: req.subscribe,
        publish: req.publish,
        sources: req.sources,
        admin: req.admin,
        expires_at: req.expires_at,
        rate_limit,
        publish_bytes_per_second,
    };
    let (record, exposed) = crate::create_key(state.store.as_ref(), spec).await?;
    let mut body = key_view(&state, &record);
    body["key"] = json!(exposed);
    // Created all the same: the catalogue may gain the type later.
    body["warnings"] = json!(state.visibility.unmatched_scopes(&record));
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /v1/me`: the record of the key making the request (never the key itself), for any
/// key: what it may subscribe to and publish, the sources it may publish under, its limits
/// and its expiry. A limited key has no other way to see them (`GET /v1/keys` is for admin
/// keys).
async fn me(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
) -> Json<Value> {
    Json(key_view(&state, &key))
}

async fn list_keys(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
) -> Result<Json<Value>, Problem> {
    require_admin(&key)?;
    let keys = state.store.list_keys().await?;
    Ok(Json(Value::Array(
        keys.iter().map(|k| key_view(&state, k)).collect(),
    )))
}

async fn revoke_key(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    require_admin(&key)?;
    // Revoking the last active admin key would lock every administrator out (only
    // `evbus keys create` on the data directory could make another). Checked and done in one
    // step of the store: two admin keys revoking each other at once cannot both succeed.
    match state
        .store
        .revoke_key_keeping_an_admin(&id, State::now())
        .await?
    {
        Revocation::Revoked => {
            state.revocations.send_modify(|n| *n += 1);
            Ok(StatusCode::NO_CONTENT)
        }
        Revocation::LastAdmin => Err(Problem::new(
            StatusCode::CONFLICT,
            "this is the last active admin key: create another admin key before revoking it",
        )),
        _ => Err(Problem::not_found("no such active key")),
    }
}

/// `PATCH /v1/webhooks/{id}`: changes the event types, the description or whether the
/// endpoint is enabled (`true` re-enables a disabled endpoint and clears its failure state).
/// Absent members are left as they are; `null` is refused like any other wrong type.
async fn update_webhook(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let cfg = &state.config;
    crate::webhooks::check_body_size(cfg, &body, "change")?;
    // Ownership first (404 for a webhook of another key, whether or not it exists), through
    // the same check as `GET /v1/webhooks/{id}`.
    let _owned: Json<Value> = webhooks::get(
        AxState(Arc::clone(&state)),
        Extension(key.clone()),
        Path(id.clone()),
    )
    .await?;
    let Value::Object(mut change) = parse_json::<Value>(&body)? else {
        return Err(Problem::bad_request(
            "the request body must be a JSON object with `event_types`, `description` or `enabled`",
        ));
    };
    let event_types = change.remove("event_types");
    let description = change.remove("description");
    let enabled = change.remove("enabled");
    if !change.is_empty() {
        return Err(Problem::bad_request(
            "only `event_types`, `description` and `enabled` can be changed",
        ));
    }
    let event_types: Option<Vec<String>> = match event_types {
        None => None,
        Some(v) => Some(serde_json::from_value(v).map_err(|_| {
            Problem::bad_request("`event_types` must be an array of event type names")
        })?),
    };
    let description = match description {
        None => None,
        Some(Value::String(d)) if d.chars().count() <= 1000 => Some(d),
        Some(_) => {
            return Err(Problem::bad_request(
                "`description` must be a string of at most 1000 characters",
            ));
        }
    };
    let enabled = match enabled {
        None => None,
        Some(Value::Bool(b)) => Some(b),
        Some(_) => return Err(Problem::bad_request("`enabled` must be true or false")),
    };
    if let Some(types) = &event_types {
        if types.is_empty() {
            return Err(Problem::bad_request(
                "`event_types` must name at least one event type",
            ));
        }
        if types.len() > cfg.max_types_per_webhook {
            return Err(Problem::bad_request(format!(
                "`event_types` may name at most {} event types (max_types_per_webhook)",
                cfg.max_types_per_webhook
            ))
            .with("limit", json!(cfg.max_types_per_webhook)));
        }
        // Positions, not names: error bodies never quote request values.
        let denied: Vec<usize> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| !state.visibility.may_subscribe(&key, t))
            .map(|(i, _)| i)
            .collect();
        if !denied.is_empty() {
            return Err(Problem::forbidden(
                "this key may not subscribe to some of these event types",
            )
            .with("denied_positions", json!(denied)));
        }
    }
    let change = WebhookChange {
        event_types: event_types.map(|mut types| {
            types.sort();
            types.dedup();
            types
        }),
        description,
        enabled,
    };
    // In place, one statement: what is not named here (the secrets, failure tracking, or
    // a change made meanwhile on another instance) stays as the store has it.
    if !state.store.change_webhook(&id, &change).await? {
        return Err(Problem::not_found("no such webhook"));
    }
    // Never a 200 for a change the store did not keep (a store must write every field).
    let saved = state.store.get_webhook(&id).await?;
    let kept = saved.as_ref().is_some_and(|w| {
        change
            .event_types
            .as_ref()
            .is_none_or(|t| &w.event_types == t)
            && change
                .description
                .as_ref()
                .is_none_or(|d| &w.description == d)
            && change.enabled.is_none_or(|e| w.enabled == e)
    });
    if !kept {
        return Err(Problem::internal(crate::StoreError(
            "the store did not keep a webhook change (event types, description or enabled)".into(),
        )));
    }
    if saved.is_some_and(|w| w.enabled) {
        state.dispatch.notify_one();
    }
    webhooks::get(AxState(state), Extension(key), Path(id)).await
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        for value in ["Bearer evb_a_b", "bearer evb_a_b", "BEARER  evb_a_b "] {
            assert_eq!(bearer_token(value), Some("evb_a_b"), "{value}");
        }
        for value in [
            "Basic evb_a_b",
            "Bearer",
            "Bearer ",
            "Bearerevb_a_b",
            "evb_a_b",
        ] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }
}
