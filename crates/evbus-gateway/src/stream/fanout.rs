//! One reader of the event log for every live stream.
//!
//! A stream that has caught up with the log does not read the store: the fan-out task reads
//! each new page of the log once, curates and enciphers each event once, and broadcasts the
//! page to every live stream, which only picks the frames of its types. A stream that falls
//! behind (its client reads slowly and the broadcast buffer wraps) or that sees a gap goes
//! back to reading the store from its own position, a page at a time, then rejoins. So an
//! event costs one log read and one curation however many streams are open, and a slow
//! client still holds at most a page of frames.
//!
//! The invariant everything here rests on: when `State::latest` says N, every position up to N
//! is readable in the store, and no position below N appears later. Within one process the
//! ingest moves `latest` after its commit. With a store shared by several instances, `latest`
//! also moves when another instance logs (`follow_store` in `lib.rs`: PostgreSQL `NOTIFY` after
//! the commit, or a poll of `latest_seq`), and the PostgreSQL store hands out positions in
//! commit order (its ingest takes a turn), so the invariant holds across instances too.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use super::{PAGE, PAGE_BYTES, cursor, frame_data};
use crate::State;
use crate::store::StoredEvent;

/// Counts a read of the event log by a stream (`reader="stream"`) or by the fan-out.
pub(super) fn count_read(reader: &'static str) {
    metrics::counter!("evbus_gateway_stream_log_reads_total", "reader" => reader).increment(1);
}

/// Every logged event with a position in `(after, upto]`, in order, ready to send.
pub(crate) struct Page {
    pub(super) after: i64,
    pub(super) upto: i64,
    pub(super) frames: Vec<Arc<Frame>>,
}

/// One logged event as a stream sends it.
pub(crate) struct Frame {
    pub(super) seq: i64,
    pub(super) ty: String,
    /// The SSE id ([`cursor::encode`]).
    pub(super) id: String,
    /// The curated structured CloudEvent; `None` if curation refuses the event now.
    pub(super) data: Option<String>,
}

impl Frame {
    pub(super) fn of(state: &State, cursor_key: &[u8], stored: &StoredEvent) -> Frame {
        Frame {
            seq: stored.seq,
            ty: stored.ty.clone(),
            id: cursor::encode(cursor_key, stored.seq),
            data: frame_data(&state.visibility.catalog, stored),
        }
    }
}

/// The broadcast of new log pages to live streams.
pub(crate) struct Fanout {
    pages: broadcast::Sender<Arc<Page>>,
    /// The log position when the gateway started: the fan-out's first page follows it.
    from: i64,
}

impl Fanout {
    /// Keeps `pages` pages for live streams that have not taken them yet
    /// ([`GatewayConfig::stream_buffer_pages`](crate::GatewayConfig::stream_buffer_pages)).
    /// The first page follows `from`, the log position before any event could be logged or
    /// any stream opened (not wherever the log is when the task first runs: a stream that
    /// went live before that would wait for the events in between forever).
    pub(crate) fn new(pages: usize, from: i64) -> Fanout {
        Fanout {
            pages: broadcast::channel(pages.max(1)).0,
            from,
        }
    }

    /// Pages logged from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<Page>> {
        self.pages.subscribe()
    }
}

/// The fan-out task: reads each new page of the log once while any stream is open.
pub(crate) async fn run(state: Arc<State>) {
    let cursor_key = loop {
        match state.store.stream_cursor_key().await {
            Ok(key) => break key,
            Err(e) => {
                tracing::warn!(error = %e, "stream fan-out: reading the cursor key failed; retrying");
                if pause(&state).await {
                    return;
                }
            }
        }
    };
    let types = state.visibility.external_types();
    let mut latest = state.latest.subscribe();
    let mut last = state.fanout.from;
    loop {
        // Taken (and marked seen) before counting streams and before reading, so an event
        // logged meanwhile wakes us again.
        let logged = *latest.borrow_and_update();
        if state.fanout.pages.receiver_count() == 0 {
            // No stream to feed. One that subscribes after this count reads the store itself
            // up to at least `logged` before it takes pages, so the pages may start there.
            last = last.max(logged);
        } else {
            match state
                .store
                .events_after(last, &types, PAGE, PAGE_BYTES)
                .await
            {
                Ok(events) if !events.is_empty() => {
                    count_read("fanout");
                    let upto = events.last().map_or(last, |e| e.seq);
                    let frames = events
                        .iter()
                        .map(|e| Arc::new(Frame::of(&state, &cursor_key, e)))
                        .collect();
                    let page = Page {
                        after: last,
                        upto,
                        frames,
                    };
                    // No receiver left is fine: they all closed since the count above.
                    let _ = state.fanout.pages.send(Arc::new(page));
                    last = upto;
                    continue;
                }
                Ok(_) => count_read("fanout"),
                Err(e) => {
                    tracing::warn!(error = %e, "stream fan-out: reading the event log failed; retrying");
                    if pause(&state).await {
                        return;
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = state.cancel.cancelled() => return,
            r = latest.changed() => if r.is_err() { return },
        }
    }
}

/// Waits a second before a retry; `true` if the gateway is stopping.
async fn pause(state: &State) -> bool {
    tokio::select! {
        _ = state.cancel.cancelled() => true,
        _ = tokio::time::sleep(Duration::from_secs(1)) => false,
    }
}
