//! `GET /v1/stream`: Server-Sent Events of curated events from the event log.
//!
//! Each frame is `id: <cursor>`, `event: <type>`, `data: <curated structured CloudEvent>`.
//! The cursor is the log position enciphered with a gateway secret (an 8-round Feistel
//! permutation keyed by HMAC-SHA256, plus an HMAC tag; the key lives in the store): it is
//! opaque, so the ids a key sees do not tell how many events of other types were logged in
//! between. A client reconnecting with `Last-Event-ID` (or `?last_event_id=`) resumes right
//! after that cursor (a value this gateway did not issue is answered 400), as long as the log
//! still holds it (see
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
    let events = frames(
        state,
        key,
        types,
        start,
        StreamPermit(permit, key_slot),
        cursor_key,
    );
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
    /// The key of the SSE ids ([`cursor`]).
    cursor_key: Arc<[u8]>,
}

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
        latest: state.latest.subscribe(),
        revocations: state.revocations.subscribe(),
        state,
        key_id: key.id,
        expires_at: key.expires_at,
        types,
        after,
        page: Default::default(),
        _permit: permit,
        cursor_key,
    };
    futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(stored) = c.page.pop_front() {
                c.after = stored.seq;
                let Some(data) = frame_data(&c.state.visibility.catalog, &stored) else {
                    continue;
                };
                let frame = SseEvent::default()
                    .id(cursor::encode(&c.cursor_key, stored.seq))
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

/// SSE ids: log positions enciphered so that they reveal neither the position nor the gaps
/// between the positions a stream sees. `encode` is a keyed permutation of the 64-bit
/// position (an 8-round Feistel network, HMAC-SHA256 as its round function) followed by a
/// 32-bit HMAC tag, written as 24 hex digits; `decode` refuses anything it did not issue.
mod cursor {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    const ROUNDS: u8 = 8;
    const TAG: u8 = 0xff;

    fn prf(key: &[u8], label: u8, data: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(&[label]);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    fn round(key: &[u8], i: u8, half: u32) -> u32 {
        let out = prf(key, i, &half.to_be_bytes());
        u32::from_be_bytes([out[0], out[1], out[2], out[3]])
    }

    fn tag(key: &[u8], block: u64) -> u32 {
        let out = prf(key, TAG, &block.to_be_bytes());
        u32::from_be_bytes([out[0], out[1], out[2], out[3]])
    }

    /// The SSE id of log position `seq`.
    pub(super) fn encode(key: &[u8], seq: i64) -> String {
        let v = seq.max(0) as u64;
        let (mut l, mut r) = ((v >> 32) as u32, v as u32);
        for i in 0..ROUNDS {
            (l, r) = (r, l ^ round(key, i, r));
        }
        let block = (u64::from(l) << 32) | u64::from(r);
        format!("{block:016x}{:08x}", tag(key, block))
    }

    /// The log position of an SSE id issued by [`encode`] with the same key.
    pub(super) fn decode(key: &[u8], id: &str) -> Option<i64> {
        if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let block = u64::from_str_radix(&id[..16], 16).ok()?;
        let given = u32::from_str_radix(&id[16..], 16).ok()?;
        let expected = tag(key, block);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&given, &expected)) {
            return None;
        }
        let (mut l, mut r) = ((block >> 32) as u32, block as u32);
        for i in (0..ROUNDS).rev() {
            (l, r) = (r ^ round(key, i, l), l);
        }
        i64::try_from((u64::from(l) << 32) | u64::from(r)).ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cursors_round_trip_hide_positions_and_refuse_forgeries() {
            let key = [7u8; 32];
            for seq in [0, 1, 2, 41, 1 << 31, i64::MAX] {
                let id = encode(&key, seq);
                assert_eq!(decode(&key, &id), Some(seq), "{id}");
                assert!(!id.contains(&seq.to_string()) || seq < 10, "{id}");
            }
            // Neighbouring positions give unrelated ids.
            let (a, b) = (encode(&key, 100), encode(&key, 101));
            let same = a
                .bytes()
                .zip(b.bytes())
                .take(16)
                .filter(|(x, y)| x == y)
                .count();
            assert!(same < 10, "{a} {b}");
            // Another key, a changed digit, a number: refused.
            assert_eq!(decode(&[8u8; 32], &a), None);
            let mut forged = a.clone().into_bytes();
            forged[3] = if forged[3] == b'0' { b'1' } else { b'0' };
            assert_eq!(decode(&key, std::str::from_utf8(&forged).unwrap()), None);
            assert_eq!(decode(&key, "100"), None);
        }
    }
}
