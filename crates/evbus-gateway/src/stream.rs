//! `GET /v1/stream`: Server-Sent Events of curated events from the event log.
//!
//! Each frame is `id: <log position>`, `event: <type>`, `data: <curated structured
//! CloudEvent>`. A client reconnecting with `Last-Event-ID` (or `?last_event_id=`) resumes
//! right after that position, as long as the log still holds it (see
//! [`GatewayConfig::retention`](crate::GatewayConfig::retention)). The stream pulls from the
//! store a page at a time, only when the client has taken the previous frames, so a slow
//! client costs one page of memory, never a growing buffer. The key is checked again before
//! every page and on every revocation, and a stream waiting for events also wakes at the key's
//! expiry time, so a revoked or expired key's stream ends at once (not at the next event).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Extension, Query, State as AxState};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use serde_json::json;

use crate::problem::Problem;
use crate::store::{KeyRecord, StoredEvent};
use crate::{State, curation};

const PAGE: u32 = 100;

#[derive(Deserialize)]
pub(crate) struct StreamQuery {
    types: Option<String>,
    last_event_id: Option<i64>,
}

/// The SSE frame of one logged event (curated again with the current rules).
pub(crate) fn frame_data(catalog: &evbus::Catalog, stored: &StoredEvent) -> Option<String> {
    let event = evbus::Event::from_json(&stored.body).ok()?;
    curation::curate_event(catalog, &event, None)?
        .to_json()
        .ok()
}

pub(crate) async fn stream(
    AxState(state): AxState<Arc<State>>,
    Extension(key): Extension<KeyRecord>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let types: Vec<String> = match &query.types {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        None => state.visibility.subscribable(&key),
    };
    if types.is_empty() {
        return Err(Problem::forbidden(
            "this key may not subscribe to any event type",
        ));
    }
    // Positions, not names: error bodies never quote request values.
    let denied: Vec<usize> = types
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
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(query.last_event_id);
    let start = match resume {
        Some(seq) => seq.max(0),
        None => state.store.latest_seq().await?,
    };
    let permit = Arc::clone(&state.streams)
        .try_acquire_owned()
        .map_err(|_| {
            Problem::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "too many open streams; try again later",
            )
            .retry_after(5)
        })?;
    metrics::gauge!("evbus_gateway_streams").increment(1.0);
    let keepalive = state.config.stream_keepalive;
    let events = frames(state, key, types, start, permit);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keepalive))
        .into_response())
}

struct Cursor {
    state: Arc<State>,
    key_id: String,
    /// When the key stops working (refreshed at every key check).
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    types: Vec<String>,
    after: i64,
    page: std::collections::VecDeque<StoredEvent>,
    latest: tokio::sync::watch::Receiver<i64>,
    revocations: tokio::sync::watch::Receiver<u64>,
    _permit: StreamPermit,
}

struct StreamPermit(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        metrics::gauge!("evbus_gateway_streams").decrement(1.0);
    }
}

fn frames(
    state: Arc<State>,
    key: KeyRecord,
    types: Vec<String>,
    after: i64,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let cursor = Cursor {
        latest: state.latest.subscribe(),
        revocations: state.revocations.subscribe(),
        state,
        key_id: key.id,
        expires_at: key.expires_at,
        types,
        after,
        page: Default::default(),
        _permit: StreamPermit(permit),
    };
    futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(stored) = c.page.pop_front() {
                c.after = stored.seq;
                let Some(data) = frame_data(&c.state.visibility.catalog, &stored) else {
                    continue;
                };
                let frame = SseEvent::default()
                    .id(stored.seq.to_string())
                    .event(stored.ty.clone())
                    .data(data);
                return Some((Ok(frame), c));
            }
            if c.state.cancel.is_cancelled() || !key_still_allows(&mut c).await {
                return None;
            }
            // Marked seen before reading, so an event logged during the read wakes us again.
            c.latest.borrow_and_update();
            match c.state.store.events_after(c.after, &c.types, PAGE).await {
                Ok(page) if !page.is_empty() => {
                    c.page = page.into();
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "stream: reading the event log failed");
                    return None;
                }
            }
            let expiry = until(c.expires_at);
            tokio::select! {
                _ = c.state.cancel.cancelled() => return None,
                // Woken at expiry; the key check at the top of the loop then ends the stream.
                _ = expiry => {}
                r = c.latest.changed() => if r.is_err() { return None },
                r = c.revocations.changed() => if r.is_err() { return None },
            }
        }
    })
}

/// Sleeps until `at` (a moment past it, so the key check sees it expired); forever if `None`.
async fn until(at: Option<chrono::DateTime<chrono::Utc>>) {
    match at {
        Some(at) => {
            let left = (at - State::now()).to_std().unwrap_or_default();
            tokio::time::sleep(left + std::time::Duration::from_millis(1)).await;
        }
        None => std::future::pending().await,
    }
}

async fn key_still_allows(c: &mut Cursor) -> bool {
    match c.state.store.get_key(&c.key_id).await {
        Ok(Some(key)) => {
            c.expires_at = key.expires_at;
            key.is_active(State::now())
                && c.types
                    .iter()
                    .all(|t| c.state.visibility.may_subscribe(&key, t))
        }
        _ => false,
    }
}
