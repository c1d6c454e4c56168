//! Webhook deliveries: the dispatcher that drains the outbox, one attempt, the retry
//! schedule, endpoint disabling; and the `/v1/webhooks` handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Extension, Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::problem::Problem;
use crate::ssrf::UrlRefusal;
use crate::store::{
    Attempt, Delivery, DeliveryOutcome, KeyRecord, ReplayBudget, ReplayLimits, Replayed,
    WebhookChange, WebhookRecord,
};
use crate::{State, curation, signing};

/// Longest response body read for the attempt log.
const RESPONSE_LOG_BYTES: usize = Attempt::MAX_RESPONSE_BYTES;

/// The dispatcher loop: claims due deliveries and runs them, bounded per endpoint, per owner
/// key (so one key's slow endpoints leave room for other keys) and in all. The bounds per
/// endpoint and per key count the leases of every instance sharing the store (the claim
/// counts them), so an endpoint gets its next delivery as soon as one of its attempts ends;
/// the bound in all is this instance's.
pub(crate) async fn dispatcher(state: Arc<State>) {
    // This instance's attempts running.
    let in_flight = Arc::new(AtomicU32::new(0));
    let cfg = &state.config;
    loop {
        if state.cancel.is_cancelled() {
            return;
        }
        let room = cfg
            .max_in_flight
            .saturating_sub(in_flight.load(Ordering::Acquire));
        if room > 0 {
            let now = State::now();
            let lease = now + chrono::Duration::from_std(lease(cfg)).unwrap_or_default();
            match state
                .store
                .claim_deliveries(
                    now,
                    lease,
                    &[],
                    cfg.max_in_flight_per_endpoint.max(1),
                    cfg.max_in_flight_per_key.max(1),
                    room,
                )
                .await
            {
                Ok(claimed) => {
                    for delivery in claimed {
                        let running = Running::start(&in_flight);
                        let st = Arc::clone(&state);
                        state.tasks.spawn(async move {
                            let webhook_id = delivery.webhook_id.clone();
                            if let Err(e) = attempt(&st, delivery).await {
                                tracing::warn!(webhook = %webhook_id, error = %e, "webhook delivery bookkeeping failed");
                            }
                            drop(running);
                            st.dispatch.notify_one();
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "claiming webhook deliveries failed"),
            }
        }
        let mut wait = cfg.poll_interval;
        if let Ok(Some(due)) = state.store.next_due().await {
            let until = (due - State::now()).to_std().unwrap_or(Duration::ZERO);
            wait = wait.min(until.max(Duration::from_millis(5)));
        }
        tokio::select! {
            _ = state.cancel.cancelled() => return,
            _ = state.dispatch.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One of this instance's attempts, counted in the dispatcher's `in_flight` until its task
/// ends, however it ends: an attempt that panics must not hold a slot for good.
struct Running(Arc<AtomicU32>);

impl Running {
    fn start(in_flight: &Arc<AtomicU32>) -> Self {
        in_flight.fetch_add(1, Ordering::AcqRel);
        Running(Arc::clone(in_flight))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a claimed delivery stays with this instance: the configured lease, at least twice
/// the delivery timeout plus 1 s (the request, then the response body, each bounded by it).
fn lease(cfg: &crate::GatewayConfig) -> Duration {
    cfg.delivery_lease
        .max(cfg.delivery_timeout * 2 + Duration::from_secs(1))
}

/// Drops old log entries once a minute.
pub(crate) async fn pruner(state: Arc<State>) {
    loop {
        let before =
            State::now() - chrono::Duration::from_std(state.config.retention).unwrap_or_default();
        if let Err(e) = state.store.prune(before).await {
            tracing::warn!(error = %e, "pruning the event log failed");
        }
        // Rate limit state of keys idle long enough to have a full bucket again.
        state.limiters.retain_recent();
        state.catch_up.retain_recent();
        state.publish_bytes.retain_recent();
        tokio::select! {
            _ = state.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// Whether the webhook's owner key still authorises delivering `ty`.
fn owner_allows(state: &State, owner: Option<&KeyRecord>, ty: &str) -> bool {
    owner.is_some_and(|k| k.is_active(State::now()) && state.visibility.may_subscribe(k, ty))
}

/// The wait before attempt `next` (0-based), jittered.
fn backoff(schedule: &[Duration], jitter: f64, next: usize) -> Option<Duration> {
    let base = *schedule.get(next)?;
    if base.is_zero() || jitter <= 0.0 {
        return Some(base);
    }
    let factor = 1.0 + rand::rng().random_range(-jitter..=jitter);
    Some(base.mul_f64(factor.max(0.0)))
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(value.trim()).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

/// One attempt of one claimed delivery, then its settlement.
async fn attempt(state: &State, delivery: Delivery) -> Result<(), crate::StoreError> {
    let store = &state.store;
    let cfg = &state.config;
    let Some(webhook) = store.get_webhook(&delivery.webhook_id).await? else {
        return store
            .finish_delivery(delivery.id, DeliveryOutcome::Failed)
            .await;
    };
    let Some(stored) = store.get_event(delivery.event_seq).await? else {
        return store
            .finish_delivery(delivery.id, DeliveryOutcome::Failed)
            .await;
    };
    let number = delivery.attempts + 1;
    let started = Instant::now();
    let now = State::now();
    let mut log = Attempt {
        id: 0,
        webhook_id: webhook.id.clone(),
        delivery_id: delivery.id,
        event_id: stored.id.clone(),
        attempt: number,
        at: now,
        status: None,
        latency_ms: 0,
        error: None,
        response: None,
    };
    let owner = store.get_key(&webhook.owner_key_id).await?;
    if !webhook.enabled || !owner_allows(state, owner.as_ref(), &stored.ty) {
        log.error = Some("not delivered: the endpoint is disabled or its key no longer authorises this event type".into());
        return store.finish_attempt(&log, DeliveryOutcome::Failed).await;
    }
    // The owner took the type off the webhook after the delivery was queued (a retry, or a
    // backlog): the change holds for what is queued too.
    if !webhook.event_types.contains(&stored.ty) {
        log.error =
            Some("not delivered: the webhook no longer subscribes to this event type".into());
        return store.finish_attempt(&log, DeliveryOutcome::Failed).await;
    }
    // Curated again on the way out (current rules; the webhook's narrower allow-list), off
    // the runtime's workers: a large event costs CPU that other keys' requests must not wait
    // behind.
    let (catalog, allow, raw) = (
        state.visibility.catalog.clone(),
        webhook.allow.clone(),
        stored.body.clone(),
    );
    let body = tokio::task::spawn_blocking(move || {
        evbus::Event::from_json(&raw)
            .ok()
            .and_then(|e| curation::curate_event(&catalog, &e, allow.as_deref()))
            .and_then(|e| e.to_json().ok())
    })
    .await
    .ok()
    .flatten();
    let Some(body) = body else {
        log.error = Some("not delivered: the event is no longer external".into());
        return store.finish_attempt(&log, DeliveryOutcome::Failed).await;
    };
    let timestamp = now.timestamp();
    let mut secrets = vec![webhook.secret.as_str()];
    if let (Some(prev), Some(until)) = (&webhook.previous_secret, webhook.previous_secret_until)
        && now < until
    {
        secrets.push(prev.as_str());
    }
    // Unique per event (an event id is unique only per source), the same on every attempt.
    let message_id = signing::message_id(&stored.source, &stored.id);
    let signature = signing::signature_header(secrets, &message_id, timestamp, body.as_bytes());

    // Checked again now (DNS can change); the client's resolver checks the connected address.
    let result = match cfg.outbound.check_url(&webhook.url).await {
        // The owner's attempt log names its own endpoint's host (request errors do not).
        Err(refusal) => Err(match &refusal {
            UrlRefusal::Forbidden { host, .. } | UrlRefusal::Unresolvable(host) => {
                format!("refused: {refusal} (host {host})")
            }
            _ => format!("refused: {refusal}"),
        }),
        Ok(_) => state
            .client
            .post(&webhook.url)
            .header("content-type", "application/cloudevents+json")
            .header("webhook-id", &message_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| describe(&e)),
    };
    log.latency_ms = started.elapsed().as_millis() as u64;
    let mut wait_at_least = None;
    let outcome_status = match result {
        Ok(mut response) => {
            let status = response.status();
            log.status = Some(status.as_u16());
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                wait_at_least = retry_after(response.headers()).map(|d| d.min(cfg.max_retry_after));
            }
            let mut kept = Vec::new();
            while kept.len() < RESPONSE_LOG_BYTES {
                match tokio::time::timeout(cfg.delivery_timeout, response.chunk()).await {
                    Ok(Ok(Some(chunk))) => kept.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            // Cut after decoding: an invalid byte decodes to 3 bytes (U+FFFD).
            log.response = Some(Attempt::response_excerpt(&kept));
            Some(status)
        }
        Err(error) => {
            log.error = Some(error);
            None
        }
    };
    let label = match outcome_status {
        Some(s) if s.is_success() => "delivered",
        Some(_) => "http_error",
        None => "no_response",
    };
    metrics::counter!("evbus_gateway_webhook_attempts_total", "outcome" => label).increment(1);
    metrics::histogram!("evbus_gateway_webhook_latency_seconds")
        .record(log.latency_ms as f64 / 1000.0);

    let outcome = match next_step(state, &webhook, outcome_status, now, number, wait_at_least).await
    {
        Ok(outcome) => outcome,
        Err(e) => {
            // The attempt was made: it is logged even so (the delivery comes back when its
            // lease expires).
            store.record_attempt(&log).await?;
            return Err(e);
        }
    };
    // The attempt's log row and its delivery's new state, together.
    store.finish_attempt(&log, outcome).await
}

/// What becomes of a delivery after an attempt that got `status` (`None`: no response), and
/// the endpoint's failure bookkeeping (`failing_since`, disabling).
///
/// The bookkeeping writes only its own columns ([`Store::webhook_succeeded`],
/// [`Store::webhook_failed`], [`Store::disable_webhook`]), never the record read before the
/// attempt: the owner may have rotated the secret, changed the event types or disabled the
/// endpoint during it, through this instance or another one, and that must stay.
///
/// [`Store::webhook_succeeded`]: crate::Store::webhook_succeeded
/// [`Store::webhook_failed`]: crate::Store::webhook_failed
/// [`Store::disable_webhook`]: crate::Store::disable_webhook
async fn next_step(
    state: &State,
    webhook: &WebhookRecord,
    status: Option<reqwest::StatusCode>,
    now: chrono::DateTime<chrono::Utc>,
    number: u32,
    wait_at_least: Option<Duration>,
) -> Result<DeliveryOutcome, crate::StoreError> {
    let store = &state.store;
    let cfg = &state.config;
    Ok(match status {
        Some(s) if s.is_success() => {
            if webhook.failing_since.is_some() {
                store.webhook_succeeded(&webhook.id).await?;
            }
            DeliveryOutcome::Delivered
        }
        Some(s) if s == reqwest::StatusCode::GONE => {
            disable(state, webhook, "the endpoint answered 410 Gone").await?;
            DeliveryOutcome::Failed
        }
        _ => {
            // `None`: the webhook was deleted during the attempt.
            let Some(since) = store.webhook_failed(&webhook.id, now).await? else {
                return Ok(DeliveryOutcome::Failed);
            };
            let limit = chrono::Duration::from_std(cfg.disable_after).unwrap_or_default();
            if now - since >= limit {
                let reason = format!(
                    "the endpoint kept failing for {} s",
                    cfg.disable_after.as_secs()
                );
                disable(state, webhook, &reason).await?;
                DeliveryOutcome::Failed
            } else {
                match backoff(&cfg.retry_schedule, cfg.retry_jitter, number as usize) {
                    None => DeliveryOutcome::Failed,
                    Some(wait) => {
                        let wait = wait_at_least.map_or(wait, |w| wait.max(w));
                        DeliveryOutcome::RetryAt(
                            State::now() + chrono::Duration::from_std(wait).unwrap_or_default(),
                        )
                    }
                }
            }
        }
    })
}

async fn disable(
    state: &State,
    webhook: &WebhookRecord,
    reason: &str,
) -> Result<(), crate::StoreError> {
    if state.store.disable_webhook(&webhook.id, reason).await? {
        tracing::warn!(webhook = %webhook.id, reason, "webhook endpoint disabled");
    }
    Ok(())
}

/// A transport error without the URL (it may carry a token in its query).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_request() {
        "request failed"
    } else {
        "failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

// ---- HTTP handlers -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateWebhook {
    url: String,
    event_types: Vec<String>,
    #[serde(default)]
    description: String,
    /// A narrower allow-list of JSON pointers.
    #[serde(default)]
    allow: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Replay {
    since: DateTime<Utc>,
}

fn view(w: &WebhookRecord) -> Value {
    json!({
        "id": w.id,
        "url": w.url,
        "event_types": w.event_types,
        "description": w.description,
        "allow": w.allow,
        "enabled": w.enabled,
        "disabled_reason": w.disabled_reason,
        "failing_since": w.failing_since,
        "created_at": w.created_at,
    })
}

/// The webhook if `key` owns it (or is admin); otherwise 404, whether or not it exists.
async fn owned(state: &State, key: &KeyRecord, id: &str) -> Result<WebhookRecord, Problem> {
    match state.store.get_webhook(id).await? {
        Some(w) if w.owner_key_id == key.id || key.admin => Ok(w),
        _ => Err(Problem::not_found("no such webhook")),
    }
}

/// Refuses a webhook `what` (registration, change) body over `max_webhook_body_bytes`.
pub(crate) fn check_body_size(
    cfg: &crate::GatewayConfig,
    body: &[u8],
    what: &str,
) -> Result<(), Problem> {
    if body.len() > cfg.max_webhook_body_bytes {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a webhook {what} may be at most {} bytes (max_webhook_body_bytes)",
                cfg.max_webhook_body_bytes
            ),
        )
        .with("limit", json!(cfg.max_webhook_body_bytes)));
    }
    Ok(())
}

pub(crate) async fn create(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    body: Bytes,
) -> Result<Response, Problem> {
    let cfg = &state.config;
    check_body_size(cfg, &body, "registration")?;
    let req: CreateWebhook = crate::api::parse_json(&body)?;
    if req.event_types.is_empty() {
        return Err(Problem::bad_request(
            "`event_types` must name at least one event type",
        ));
    }
    if req.event_types.len() > cfg.max_types_per_webhook {
        return Err(Problem::bad_request(format!(
            "`event_types` may name at most {} event types (max_types_per_webhook); register several webhooks or subscribe to fewer types",
            cfg.max_types_per_webhook
        ))
        .with("limit", json!(cfg.max_types_per_webhook)));
    }
    if req
        .allow
        .as_ref()
        .is_some_and(|a| a.len() > cfg.max_allow_per_webhook)
    {
        return Err(Problem::bad_request(format!(
            "`allow` may hold at most {} pointers (max_allow_per_webhook)",
            cfg.max_allow_per_webhook
        ))
        .with("limit", json!(cfg.max_allow_per_webhook)));
    }
    // Positions, not names: error bodies never quote request values.
    let denied: Vec<usize> = req
        .event_types
        .iter()
        .enumerate()
        .filter(|(_, t)| !state.visibility.may_subscribe(&key, t))
        .map(|(i, _)| i)
        .collect();
    if !denied.is_empty() {
        return Err(
            Problem::forbidden("this key may not subscribe to some of these event types")
                .with("denied_positions", json!(denied)),
        );
    }
    // Positions, not pointers: error bodies never quote request values.
    if let Some((position, refusal)) = req.allow.iter().flatten().enumerate().find_map(|(i, p)| {
        crate::curation::check_allow_pointer(p)
            .err()
            .map(|refusal| (i, refusal))
    }) {
        return Err(Problem::bad_request(refusal)
            .with("position", json!(position))
            .with(
                "max_pointer_bytes",
                json!(crate::curation::MAX_POINTER_BYTES),
            )
            .with(
                "max_pointer_levels",
                json!(crate::curation::MAX_POINTER_TOKENS),
            ));
    }
    if req.description.chars().count() > 1000 || req.url.chars().count() > 2000 {
        return Err(Problem::bad_request("`url` or `description` is too long"));
    }
    // Stored (and listed) as parsed: the URL deliveries go to, not one that reads otherwise
    // (`http://8.8.8.8\@127.0.0.1/` calls 8.8.8.8, and is stored as `http://8.8.8.8/@127.0.0.1/`).
    let url = state
        .config
        .outbound
        .check_url(&req.url)
        .await
        .map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?
        .to_string();
    // Percent-encoding may have lengthened it.
    if url.len() > 2000 {
        return Err(Problem::bad_request("`url` or `description` is too long"));
    }
    let mut types = req.event_types.clone();
    types.sort();
    types.dedup();
    let record = WebhookRecord {
        id: format!("wh_{}", uuid::Uuid::now_v7().simple()),
        owner_key_id: key.id.clone(),
        url,
        event_types: types,
        description: req.description,
        allow: req.allow,
        secret: signing::generate_secret(),
        previous_secret: None,
        previous_secret_until: None,
        enabled: true,
        disabled_reason: None,
        failing_since: None,
        // Milliseconds, as stored: the answer to the registration shows what a read shows.
        created_at: chrono::SubsecRound::trunc_subsecs(State::now(), 3),
    };
    // Counted and inserted in one step of the store, so concurrent registrations for one key
    // (on this instance or on others sharing the store) cannot pass the limit together.
    if !state
        .store
        .insert_webhook_within(&record, cfg.max_webhooks_per_key)
        .await?
    {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            format!(
                "this key already holds {} webhooks, the most one key may (max_webhooks_per_key); delete one before registering another",
                cfg.max_webhooks_per_key
            ),
        )
        .with("limit", json!(cfg.max_webhooks_per_key)));
    }
    let mut body = view(&record);
    body["secret"] = json!(record.secret);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(crate) async fn list(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
) -> Result<Json<Value>, Problem> {
    let owner = (!key.admin).then_some(key.id.as_str());
    let hooks = state.store.list_webhooks(owner).await?;
    Ok(Json(Value::Array(hooks.iter().map(view).collect())))
}

pub(crate) async fn get(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    Ok(Json(view(&owned(&state, &key, &id).await?)))
}

pub(crate) async fn delete(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    owned(&state, &key, &id).await?;
    state.store.delete_webhook(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/webhooks/{id}/rotate-secret` options.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateQuery {
    /// Rotate even while the previous secret still signs, stopping it at once.
    #[serde(default)]
    retire_previous: bool,
}

pub(crate) async fn rotate(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    Path(id): Path<String>,
    Query(query): Query<RotateQuery>,
) -> Result<Json<Value>, Problem> {
    let webhook = owned(&state, &key, &id).await?;
    // Only one previous secret signs beside the current one: rotating again during the
    // overlap would stop the oldest before the time the first rotation promised.
    let now = State::now();
    if let Some(until) = still_signing(&webhook, now)
        && !query.retire_previous
    {
        return Err(second_rotation(until));
    }
    let until = chrono::SubsecRound::trunc_subsecs(
        now + chrono::Duration::from_std(state.config.secret_overlap).unwrap_or_default(),
        3,
    );
    let secret = signing::generate_secret();
    // In place: whatever else changed meanwhile (on any instance) stays. Conditional, so that
    // of two rotations at once (here or on another instance) only one takes effect.
    let unless_signing_at = (!query.retire_previous).then_some(now);
    if !state
        .store
        .rotate_webhook_secret(&id, &secret, until, unless_signing_at)
        .await?
    {
        return match state.store.get_webhook(&id).await? {
            Some(raced) => Err(second_rotation(still_signing(&raced, now).unwrap_or(until))),
            None => Err(Problem::not_found("no such webhook")),
        };
    }
    Ok(Json(json!({
        "id": id,
        "secret": secret,
        "previous_secret_expires_at": until,
    })))
}

/// Until when `webhook`'s previous secret still signs, if it does at `now`.
fn still_signing(webhook: &WebhookRecord, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    webhook
        .previous_secret_until
        .filter(|until| webhook.previous_secret.is_some() && *until > now)
}

fn second_rotation(until: DateTime<Utc>) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "the previous signing secret still signs beside the current one; rotating again now \
         would stop it before `previous_secret_until`, breaking receivers that have not \
         switched yet. Rotate after that time, or add `?retire_previous=true` to stop it now \
         (after a leak)",
    )
    .with("previous_secret_until", json!(until))
}

pub(crate) async fn attempts(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    owned(&state, &key, &id).await?;
    let list = state.store.list_attempts(&id, 100).await?;
    // Without the store's row ids: they count every key's deliveries, a volume leak.
    let list: Vec<Value> = list
        .iter()
        .map(|a| {
            json!({
                "webhook_id": a.webhook_id,
                "event_id": a.event_id,
                "attempt": a.attempt,
                "at": a.at,
                "status": a.status,
                "latency_ms": a.latency_ms,
                "error": a.error,
                "response": a.response,
            })
        })
        .collect();
    Ok(Json(Value::Array(list)))
}

/// The bounds of one replay: `max_replay_events` per request, `max_replayed_per_day` per
/// webhook and window, and that times `max_webhooks_per_key` for all of a key's webhooks.
fn replay_limits(cfg: &crate::GatewayConfig) -> ReplayLimits {
    let per_webhook = u64::from(cfg.max_replayed_per_day.max(1));
    let webhooks = u64::try_from(cfg.max_webhooks_per_key.max(1)).unwrap_or(u64::MAX);
    ReplayLimits {
        per_replay: cfg.max_replay_events,
        per_webhook,
        per_key: per_webhook.saturating_mul(webhooks),
        window: chrono::Duration::from_std(crate::REPLAY_WINDOW).unwrap_or_default(),
    }
}

/// 429 for a replay that found its budget spent: which limit, and when budget frees up
/// (`resets_at`, and `Retry-After`).
fn budget_spent(limits: &ReplayLimits, done: &Replayed, now: DateTime<Utc>) -> Problem {
    let hours = limits.window.num_hours();
    let (detail, limit) = match done.exhausted {
        Some(ReplayBudget::Key) => (
            format!(
                "the webhooks of this key (deleted ones included) had {} events replayed within their {hours} h replay windows, the most one key may (max_replayed_per_day × max_webhooks_per_key); more can be replayed from `resets_at`",
                limits.per_key
            ),
            limits.per_key,
        ),
        _ => (
            format!(
                "this webhook had {} events replayed within its {hours} h replay window, the most one webhook may (max_replayed_per_day); more can be replayed from `resets_at`",
                limits.per_webhook
            ),
            limits.per_webhook,
        ),
    };
    let mut problem = Problem::new(StatusCode::TOO_MANY_REQUESTS, detail)
        .with("limit", json!(limit))
        .with("window_seconds", json!(limits.window.num_seconds()))
        .with("resets_at", json!(done.resets_at));
    if let Some(at) = done.resets_at {
        let millis = (at - now).num_milliseconds().max(0);
        problem = problem.retry_after(((millis + 999) / 1000).max(1) as u64);
    }
    problem
}

pub(crate) async fn replay(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let w = owned(&state, &key, &id).await?;
    let req: Replay = crate::api::parse_json(&body)?;
    // Idempotent: events with a delivery to this endpoint still pending are not queued
    // again, so repeating a replay (or replaying overlapping ranges) adds nothing twice.
    // Bounded: per request, and per webhook (and key) within the replay window, so replaying
    // delivered events again and again queues no more than the budget.
    let limits = replay_limits(&state.config);
    let now = State::now();
    let done = state.store.replay(&id, req.since, now, &limits).await?;
    if done.refused() {
        // Nothing changes, a disabled endpoint included.
        return Err(budget_spent(&limits, &done, now));
    }
    if !w.enabled {
        // A replay is the owner asking for deliveries again: the endpoint is re-enabled, in
        // place (the record read before the replay may be stale by now: a secret rotated
        // meanwhile on another instance stays rotated).
        let enable = WebhookChange {
            enabled: Some(true),
            ..WebhookChange::default()
        };
        state.store.change_webhook(&id, &enable).await?;
    }
    state.dispatch.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "replayed": done.queued,
            "budget_remaining": done.remaining,
            "budget_exhausted": done.exhausted.is_some(),
            "budget_resets_at": done.resets_at,
        })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_attempt_that_panics_gives_its_slot_back() {
        let in_flight = Arc::new(AtomicU32::new(0));
        let running = Running::start(&in_flight);
        assert_eq!(in_flight.load(Ordering::Acquire), 1);
        let task = tokio::spawn(async move {
            let _running = running;
            panic!("a bug in an attempt");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(in_flight.load(Ordering::Acquire), 0, "the slot came back");
    }

    #[test]
    fn backoff_follows_the_schedule_with_bounded_jitter() {
        let schedule = crate::default_retry_schedule();
        assert_eq!(backoff(&schedule, 0.2, 0), Some(Duration::ZERO));
        for _ in 0..100 {
            let d = backoff(&schedule, 0.2, 2).unwrap();
            assert!(
                d >= Duration::from_secs(240) && d <= Duration::from_secs(360),
                "{d:?}"
            );
        }
        assert_eq!(backoff(&schedule, 0.2, 8), None);
    }
}
