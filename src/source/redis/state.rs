//! The source's state, shared by the jobs of the other files: its config,
//! the index of what subscribers were sent, the sentinels' bookkeeping; and
//! how one session ends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::config::RedisSourceConfig;
use crate::source::KeyIndex;
use crate::stats::Stats;

/// Keys read per pipelined round trip.
pub(super) const BATCH: usize = 512;

/// One session's end: lost (retry with backoff), the cluster's masters
/// changed (start again at once), or stopped (return).
pub(super) enum Ended {
    Stopped,
    Lost(String),
    Topology,
    /// The pipeline stayed full: the notifications were let go of.
    Behind,
}

impl From<redis::RedisError> for Ended {
    fn from(e: redis::RedisError) -> Self {
        Ended::Lost(e.to_string())
    }
}

impl From<crate::source::Stopped> for Ended {
    fn from(_: crate::source::Stopped) -> Self {
        Ended::Stopped
    }
}

/// The Redis source.
pub struct RedisSource {
    pub(super) config: RedisSourceConfig,
    /// key → fingerprint of the value subscribers were last sent.
    pub(super) index: KeyIndex<u64>,
    pub(super) unsupported_logged: HashSet<String>,
    pub(super) stats: Arc<Stats>,
    /// Taking over from another leader (HA): what it published is unknown.
    pub(super) takeover: bool,
    /// This source's sentinel key and its value (see [`SENTINEL_INTERVAL`](super::sentinels::SENTINEL_INTERVAL)).
    pub(super) sentinel: (String, String),
    /// The sentinel cannot be written (read-only user): flushes are
    /// detected by the key count instead.
    pub(super) sentinel_refused: bool,
    /// The hash slots followed (`source.slots`; all by default).
    pub(super) slots: Vec<(u16, u16)>,
    /// Sentinel SETs whose keyspace notification has not come back yet,
    /// by sentinel key: when each was sent. The oldest one's age is how far
    /// behind the notifications are read (see [`NOTIFICATION_DELAY_MAX`](super::sentinels::NOTIFICATION_DELAY_MAX)).
    pub(super) sentinel_sent: HashMap<Vec<u8>, VecDeque<Instant>>,
    /// The last position handed to the pipeline (see [`RedisSource::confirm`](super::RedisSource)).
    pub(super) position: i64,
    /// Changes were handed over since the last position.
    pub(super) unconfirmed: bool,
    /// A whole reconciliation finished in this run: the index is what
    /// subscribers were sent, and may be saved.
    pub(super) reconciled: bool,
    /// The index was loaded from a graceful stop: the first
    /// reconciliation publishes the difference.
    pub(super) continuing: bool,
}

impl RedisSource {
    pub(super) fn db(client: &redis::Client) -> i64 {
        client.get_connection_info().redis_settings().db()
    }
}
