//! PostgreSQL `NOTIFY`: the wake-ups other processes' consumers get (through their `LISTEN`
//! connection) when this process publishes, sent by one task per transport after the
//! publishes commit, not inside them.
//!
//! A transaction that notifies holds PostgreSQL's notification lock from just before its
//! commit until the commit is done, so notifying publishers commit one at a time: with the
//! `NOTIFY` in every publish, 5 connections publishing to a topic reached half the commits per
//! second of the same inserts without it (`pgbench`, 2026-12-02). Publishes now only name
//! their destination here; the task sends one `NOTIFY` per destination named since its last
//! round, in one statement, so under load one notification covers many publishes. A wake-up is
//! a hint either way: consumers poll every `poll_interval`, which also covers a notification
//! lost with this process or its connection.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::transport::{Db, Shared};

/// NOTIFY payloads are limited to 8000 bytes: a longer key is sent as the empty payload,
/// which wakes every consumer.
const MAX_PAYLOAD: usize = 7000;

/// Most destinations one round names; beyond, the round wakes every consumer instead (and
/// the set takes no more keys).
const MAX_KEYS: usize = 1024;

/// The destinations published to since the last round.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    pending: Mutex<HashSet<String>>,
    wake: Notify,
}

impl Notifier {
    /// Asks for a wake-up of the consumers of `key` (`kind:name`) in every process.
    pub(crate) fn push(&self, key: &str) {
        let key = if key.len() < MAX_PAYLOAD { key } else { "" };
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if !pending.contains(key) {
                // Past the bound the round wakes everyone: one more key would change nothing,
                // so the set stays bounded however many destinations publishers name.
                let key = if pending.len() < MAX_KEYS { key } else { "" };
                pending.insert(key.to_owned());
            }
        }
        self.wake.notify_one();
    }

    /// The payloads of the next round.
    fn take(&self) -> Vec<String> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.contains("") {
            return vec![String::new()];
        }
        pending.into_iter().collect()
    }
}

/// Starts the notifying task of a PostgreSQL transport; it ends when the transport closes or
/// is dropped.
pub(crate) fn spawn(shared: &Arc<Shared>) {
    let Db::Postgres(pool) = &shared.db else {
        return;
    };
    let pool = pool.clone();
    let notifier = Arc::clone(&shared.notifier);
    let channel = shared.channel.clone();
    let stop = shared.stop_token();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = notifier.wake.notified() => {}
            }
            let payloads = notifier.take();
            if payloads.is_empty() {
                continue;
            }
            let sent = sqlx::query("SELECT pg_notify($1, k) FROM unnest($2::text[]) AS k")
                .bind(&channel)
                .bind(&payloads)
                .execute(&pool)
                .await;
            if let Err(e) = sent {
                // The consumers of those destinations find the rows at their next poll.
                tracing::debug!(error = %e, destinations = payloads.len(), "evbus-sql: NOTIFY failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_names_each_destination_once() {
        let notifier = Notifier::default();
        for _ in 0..50 {
            notifier.push("topic:orders");
            notifier.push("queue:mail");
        }
        let mut round = notifier.take();
        round.sort();
        assert_eq!(round, ["queue:mail", "topic:orders"]);
        assert!(notifier.take().is_empty(), "a round empties the set");
    }

    #[test]
    fn a_key_too_long_for_a_payload_or_too_many_keys_wake_everyone() {
        let notifier = Notifier::default();
        notifier.push("topic:orders");
        notifier.push(&format!("topic:{}", "x".repeat(MAX_PAYLOAD)));
        assert_eq!(notifier.take(), [""]);
        for n in 0..MAX_KEYS * 4 {
            notifier.push(&format!("topic:t{n}"));
        }
        assert_eq!(
            notifier.pending.lock().unwrap().len(),
            MAX_KEYS + 1,
            "the set stays bounded"
        );
        assert_eq!(notifier.take(), [""]);
    }
}
