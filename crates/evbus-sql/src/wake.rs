//! Waking idle consumers when rows arrive: by destination key (`topic:<name>`,
//! `queue:<name>`), from this process's publishes and from PostgreSQL `NOTIFY`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The consumers' wake-up signals, one per destination key.
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    by_key: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Wakers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.by_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The signal of `key` (made on first use; dropped when no consumer holds it).
    pub(crate) fn get(&self, key: &str) -> Arc<Notify> {
        let mut map = self.lock();
        // Forget signals nobody waits on any more (bounded by the live consumers).
        if map.len() > 64 {
            map.retain(|_, notify| Arc::strong_count(notify) > 1);
        }
        Arc::clone(map.entry(key.to_owned()).or_default())
    }

    /// Wakes the consumers of `key`; an empty key wakes everyone.
    pub(crate) fn wake(&self, key: &str) {
        if key.is_empty() {
            return self.wake_all();
        }
        if let Some(notify) = self.lock().get(key) {
            notify.notify_waiters();
        }
    }

    /// Wakes every consumer (after a `LISTEN` connection was lost: notifications may have
    /// been missed).
    pub(crate) fn wake_all(&self) {
        for notify in self.lock().values() {
            notify.notify_waiters();
        }
    }
}
