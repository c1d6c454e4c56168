//! `GET /v1/stream`: Server-Sent Events of curated events from the event log.
//!
//! Each frame is `id: <cursor>`, `event: <type>`, `data: <curated structured CloudEvent>`,
//! after a first frame that is only `id: <cursor>`: the position the stream starts from, so
//! that a client that drops before any event resumes from there.
//! The cursor is the log position enciphered with a gateway secret (an 8-round Feistel
//! permutation keyed by HMAC-SHA256, plus an HMAC tag; the key lives in the store): it is
//! opaque, so the ids a key sees do not tell how many events of other types were logged in
//! between. A client reconnecting with `Last-Event-ID` (or `?last_event_id=`) resumes right
//! after that cursor (a value this gateway did not issue is answered 400), as long as the log
//! still holds it (see [`GatewayConfig::retention`](crate::GatewayConfig::retention)).
//!
//! A stream behind the log reads the store itself, a page at a time, only when the client has
//! taken the previous frames, so a slow client costs one page of memory, never a growing
//! buffer. A page is at most 100 events and 256 KiB of them (or one larger event), so a
//! stream's memory does not grow with the size of the events either. A stream that has caught
//! up takes the pages the [`fanout`] reads once for every stream, so open streams do not
//! multiply the store's work. The key is checked before every page read from the store, at
//! least every second while frames flow, at once on every revocation, and at the key's expiry
//! time even with no event to send, so a revoked or expired key's stream ends at once (not at
//! the next event).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Extension, Query, State as AxState};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use crate::problem::Problem;
use crate::store::{KeyRecord, StoredEvent};
use crate::{State, curation};

/// Events per page read from the log.
const PAGE: u32 = 100;
/// Bytes of event bodies per page (a page holds at least one event, however large): what
/// one stream that does not read holds, whatever the size of the events it is behind on.
const PAGE_BYTES: usize = 256 * 1024;

/// Whether a page read with [`PAGE`] and [`PAGE_BYTES`] ended because the log did: it is
/// short, and not cut by its byte bound.
fn reached_the_end(page: &[StoredEvent]) -> bool {
    page.len() < PAGE as usize && page.iter().map(|e| e.body.len()).sum::<usize>() < PAGE_BYTES
}

#[derive(Deserialize)]
pub(crate) struct StreamQuery {
    types: Option<String>,
    last_event_id: Option<String>,
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
    if query.types.is_some() && types.is_empty() {
        return Err(Problem::bad_request(
            "`types` names no event type: give a comma-separated list, or leave it out for \
             every type this key may subscribe to",
        ));
    }
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
    let cursor_key: Arc<[u8]> = state.store.stream_cursor_key().await?.into();
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().unwrap_or_default().trim().to_owned()),
        None => query.last_event_id.clone(),
    };
    let start = match resume {
        Some(id) => cursor::decode(&cursor_key, &id).ok_or_else(|| {
            Problem::bad_request(
                "Last-Event-ID is not a stream id this gateway issued; reconnect without it to start from now",
            )
        })?,
        None => state.store.latest_seq().await?,
    };
    // The key's share first, so a key at its limit never takes a global slot.
    let key_slot = KeySlot::take(&state, &key.id).ok_or_else(|| {
        let limit = state.config.max_streams_per_key;
        Problem::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            format!(
                "this key already has {limit} open streams, the most one key may hold (max_streams_per_key); close one of them before opening another"
            ),
        )
        .with("limit", json!(limit))
        .retry_after(5)
    })?;
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
    // The position the stream starts from, before any event: an `id` without data, which an
    // SSE client keeps as its last event id without dispatching anything. A stream started
    // from now that drops before its first event then resumes from where it started, not
    // from a later "now" (the events logged in between were lost). A fresh id each time
    // (see `cursor`), so that two opens do not tell whether anything was logged between them.
    let position = SseEvent::default().id(cursor::encode_fresh(&cursor_key, start));
    let events = frames(
        state,
        key,
        types,
        start,
        StreamPermit(permit, key_slot),
        cursor_key,
    );
    let events = futures::stream::once(std::future::ready(Ok(position))).chain(events);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keepalive))
        .into_response())
}

struct Cursor {
    state: Arc<State>,
    key_id: String,
    /// When the key stops working (refreshed at every key check).
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the key was last checked.
    checked_at: std::time::Instant,
    /// A revocation or the key's expiry asks for a check before anything else is sent.
    check_now: bool,
    types: Vec<String>,
    /// The position of the last frame queued (sent or in `ready`).
    after: i64,
    ready: std::collections::VecDeque<Arc<Frame>>,
    /// Whether the last read of the store found nothing new: the stream then takes the
    /// fan-out's pages instead of reading the store.
    live: bool,
    pages: tokio::sync::broadcast::Receiver<Arc<fanout::Page>>,
    revocations: tokio::sync::watch::Receiver<u64>,
    _permit: StreamPermit,
    /// The key of the SSE ids ([`cursor`]).
    cursor_key: Arc<[u8]>,
}

/// How long a live stream goes on sending without checking its key again (a revocation or
/// the key's expiry ends it at once regardless).
const KEY_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// An open stream's global slot and its key's slot, given back when the stream ends.
struct StreamPermit(
    #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
    #[allow(dead_code)] KeySlot,
);

/// One of a key's [`max_streams_per_key`](crate::GatewayConfig::max_streams_per_key) slots.
struct KeySlot {
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    key_id: String,
}

impl KeySlot {
    /// Takes one of the key's slots; `None` when the key holds all of them.
    fn take(state: &State, key_id: &str) -> Option<KeySlot> {
        let mut open = state.key_streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key_id.to_owned()).or_default();
        if *n >= state.config.max_streams_per_key {
            return None;
        }
        *n += 1;
        Some(KeySlot {
            open: Arc::clone(&state.key_streams),
            key_id: key_id.to_owned(),
        })
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key_id);
            }
        }
    }
}

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
    permit: StreamPermit,
    cursor_key: Arc<[u8]>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let cursor = Cursor {
        // Subscribed before the first read of the store, so no page falls between the two.
        pages: state.fanout.subscribe(),
        revocations: state.revocations.subscribe(),
        state,
        key_id: key.id,
        expires_at: key.expires_at,
        checked_at: std::time::Instant::now(),
        check_now: false,
        types,
        after,
        ready: Default::default(),
        live: false,
        _permit: permit,
        cursor_key,
    };
    futures::stream::unfold(cursor, |mut c| async move {
        loop {
            // A revocation, the expiry time, or new frames after a quiet spell: the key is
            // checked before anything more is sent.
            if c.check_now && !key_still_allows(&mut c).await {
                return None;
            }
            if let Some(frame) = c.ready.pop_front() {
                let Some(data) = &frame.data else {
                    continue;
                };
                let event = SseEvent::default()
                    .id(&frame.id)
                    .event(&frame.ty)
                    .data(data);
                return Some((Ok(event), c));
            }
            if c.state.cancel.is_cancelled() {
                return None;
            }
            // Reading the store: the key before every page. Live: at most every KEY_RECHECK,
            // and at once on a revocation or at expiry.
            if (!c.live || c.checked_at.elapsed() >= KEY_RECHECK) && !key_still_allows(&mut c).await
            {
                return None;
            }
            if !c.live {
                // Everything up to here is in the store when it is read: a short page means
                // no event of our types up to it (so later pages of the fan-out fit on).
                let logged = *c.state.latest.borrow();
                match c
                    .state
                    .store
                    .events_after(c.after, &c.types, PAGE, PAGE_BYTES)
                    .await
                {
                    Ok(page) => {
                        fanout::count_read("stream");
                        // Catching up is a replay: paced per key (`catch_up`).
                        let bytes = page.iter().map(|e| e.body.len()).sum();
                        if !c
                            .state
                            .catch_up
                            .wait_for(&c.key_id, bytes, &c.state.cancel)
                            .await
                        {
                            return None;
                        }
                        if let Some(last) = page.last() {
                            c.after = last.seq;
                        }
                        let end = reached_the_end(&page);
                        if end {
                            c.after = c.after.max(logged);
                        }
                        let state = &c.state;
                        let key = &c.cursor_key;
                        c.ready = page
                            .iter()
                            .map(|e| Arc::new(Frame::of(state, key, e)))
                            .collect();
                        c.live = end;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "stream: reading the event log failed");
                        return None;
                    }
                }
            }
            let expiry = until(c.expires_at);
            tokio::select! {
                // Stopping, revocation and expiry before new pages: a revoked key gets nothing more.
                biased;
                _ = c.state.cancel.cancelled() => return None,
                r = c.revocations.changed() => {
                    if r.is_err() { return None }
                    c.check_now = true;
                }
                // Woken at expiry; the key check at the top of the loop then ends the stream.
                _ = expiry => c.check_now = true,
                page = c.pages.recv() => match page {
                    Ok(page) if page.after > c.after => {
                        // Events between our position and this page: read them from the store.
                        c.live = false;
                    }
                    Ok(page) => {
                        let types = &c.types;
                        let after = c.after;
                        c.ready.extend(
                            page.frames
                                .iter()
                                .filter(|f| f.seq > after && types.iter().any(|t| *t == f.ty))
                                .cloned(),
                        );
                        c.after = c.after.max(page.upto);
                        c.check_now = c.checked_at.elapsed() >= KEY_RECHECK;
                    }
                    // Pages were dropped while the client was slow: back to the store.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => c.live = false,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
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
    c.check_now = false;
    c.checked_at = std::time::Instant::now();
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

mod cursor;
mod fanout;

use fanout::Frame;
pub(crate) use fanout::{Fanout, run as fanout};
