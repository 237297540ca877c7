//! Counters of what the bridge did, shared by every task through an `Arc`.
//! They back the log lines now and the metrics endpoint later.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::mapper::Skip;

/// Counters named after what they count.
#[derive(Debug, Default)]
pub struct Stats {
    /// Changes read from the source.
    pub changes_read: AtomicU64,
    /// Updates handed to the backend.
    pub updates_published: AtomicU64,
    /// Publish attempts that failed (each is retried).
    pub publish_errors: AtomicU64,
    /// Reconnections of any connection.
    pub reconnects: AtomicU64,
    /// `sync` notices published (source lost track, e.g. compaction).
    pub syncs_published: AtomicU64,
    /// Last etcd revision whose updates were all published.
    pub checkpoint_revision: AtomicU64,
    skipped: [AtomicU64; Skip::ALL.len()],
}

impl Stats {
    /// Counts a skipped change; logs the first of each kind as a warning
    /// (with the key) and later ones at debug level, so bad input cannot
    /// flood the log.
    pub fn skip(&self, kind: Skip, key: &[u8]) {
        let n = self.skipped[kind as usize].fetch_add(1, Relaxed);
        let key = String::from_utf8_lossy(key);
        if n == 0 {
            tracing::warn!(reason = kind.as_str(), %key, "Skipped a change; later skips of this kind are logged at debug level.");
        } else {
            tracing::debug!(reason = kind.as_str(), %key, "Skipped a change.");
        }
    }

    /// How many changes were skipped for `kind`.
    pub fn skipped(&self, kind: Skip) -> u64 {
        self.skipped[kind as usize].load(Relaxed)
    }

    /// Adds one to a counter.
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
