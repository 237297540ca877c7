//! What the bridge did, as Prometheus metrics (the `prometheus-client`
//! crate): shared by every task through an `Arc`, scraped at `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::mapper::Skip;
use crate::update::DbUpdate;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    source: String,
    table: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishedLabels {
    backend: String,
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnsweredLabels {
    from: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    connection: String,
}

/// Whether one connection is up, and how often it came back.
#[derive(Clone, Debug, Default)]
pub struct ConnState {
    up: Arc<AtomicBool>,
    /// Up at least once in this process (any HA term).
    reached: Arc<AtomicBool>,
    reconnects: Counter,
}

impl ConnState {
    /// Marks the connection up; counts a reconnect when it was down before.
    pub fn set_up(&self, up: bool, was_down: bool) {
        if up && was_down {
            self.reconnects.inc();
        }
        self.up.store(up, Relaxed);
        if up {
            self.reached.store(true, Relaxed);
        }
    }

    /// Whether the connection was up at least once in this process.
    pub fn reached(&self) -> bool {
        self.reached.load(Relaxed)
    }

    /// Whether the connection is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }
}

/// The bridge's metrics. Counters are named after what they count.
#[derive(Debug)]
pub struct Stats {
    registry: Registry,
    /// Changes read from the source (all tables).
    pub changes_read: Counter,
    read_by: Family<ReadLabels, Counter>,
    /// Updates the backend took.
    pub updates_published: Counter,
    published_by: Family<PublishedLabels, Counter>,
    /// Publish attempts that failed (each is retried).
    pub publish_errors: Counter,
    /// `sync` notices published (the source lost track, e.g. compaction).
    pub syncs_published: Counter,
    /// Redis FLUSHDB / FLUSHALL / SWAPDB detected (each answered by a full
    /// reconciliation).
    pub flushes_detected: Counter,
    /// etcd watches that moved past a compacted resume revision without a
    /// compaction notice (etcd-io/etcd#17529), each answered by a re-list.
    pub source_skips_caught: Counter,
    /// Times the Redis source let go of its notifications because it was
    /// behind: the pipeline stayed full, or notifications were read late
    /// (each followed by a reconciliation).
    pub source_paused: Counter,
    skipped: Family<ReasonLabels, Counter>,
    replay_answers: Family<AnsweredLabels, Counter>,
    reconnects: Family<ConnectionLabels, Counter>,
    /// 1 while the connection is up, by connection (set at each scrape).
    connected: Family<ConnectionLabels, Gauge>,
    /// The source database's latest revision seen (etcd).
    pub source_revision: Gauge,
    /// Last revision whose updates were all published.
    pub checkpoint_revision: Gauge,
    lag: Gauge,
    /// Changes waiting between source and publisher.
    pub queue_depth: Gauge,
    /// 1 while this instance publishes (always, without HA).
    pub leader: Gauge,
    /// Seconds since the pipeline last had published everything it read
    /// (0 while caught up): the lag in time, for any source.
    lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// When the pipeline was last caught up (Unix milliseconds).
    caught_up_ms: std::sync::atomic::AtomicU64,
    /// When the pipeline's loop last went round (Unix milliseconds; 0 while
    /// no pipeline runs: a standby, between terms).
    pipeline_beat_ms: std::sync::atomic::AtomicU64,
    /// When the source last heard from its database (Unix milliseconds).
    source_heard_ms: std::sync::atomic::AtomicU64,
    /// Seconds since the source last heard from its database.
    source_silent_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The process's resident memory, read at each scrape.
    resident_memory: Gauge,
    /// The source's connection.
    pub source: ConnState,
    /// The backend's connection.
    pub backend: ConnState,
    has_source: AtomicBool,
    backend_name: std::sync::OnceLock<String>,
}

impl Default for Stats {
    fn default() -> Self {
        let reconnects = Family::<ConnectionLabels, Counter>::default();
        let conn = |name: &str| ConnState {
            up: Arc::default(),
            reached: Arc::default(),
            reconnects: reconnects
                .get_or_create(&ConnectionLabels {
                    connection: name.into(),
                })
                .clone(),
        };
        let (source, backend) = (conn("source"), conn("backend"));
        let mut registry = Registry::with_prefix("feedbridge");
        let s = Stats {
            changes_read: Counter::default(),
            read_by: Family::default(),
            updates_published: Counter::default(),
            published_by: Family::default(),
            publish_errors: Counter::default(),
            syncs_published: Counter::default(),
            flushes_detected: Counter::default(),
            source_skips_caught: Counter::default(),
            source_paused: Counter::default(),
            skipped: Family::default(),
            replay_answers: Family::default(),
            reconnects,
            connected: Family::default(),
            source_revision: Gauge::default(),
            checkpoint_revision: Gauge::default(),
            lag: Gauge::default(),
            queue_depth: Gauge::default(),
            leader: Gauge::default(),
            lag_seconds: Gauge::default(),
            caught_up_ms: std::sync::atomic::AtomicU64::new(unix_ms()),
            pipeline_beat_ms: std::sync::atomic::AtomicU64::new(0),
            source_heard_ms: std::sync::atomic::AtomicU64::new(unix_ms()),
            source_silent_seconds: Gauge::default(),
            resident_memory: Gauge::default(),
            source,
            backend,
            has_source: AtomicBool::new(false),
            backend_name: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "updates_read",
            "Changes read from the source, by source, table and action",
            s.read_by.clone(),
        );
        registry.register(
            "updates_published",
            "Updates the backend took, by backend and topic",
            s.published_by.clone(),
        );
        registry.register("skipped", "Changes skipped, by reason", s.skipped.clone());
        registry.register(
            "replay_answers",
            "Subscribers' gap repairs answered, by where from (buffer, history) or gone (the subscriber re-reads)",
            s.replay_answers.clone(),
        );
        registry.register(
            "publish_errors",
            "Failed publish attempts (each is retried)",
            s.publish_errors.clone(),
        );
        registry.register(
            "syncs_published",
            "Sync notices published",
            s.syncs_published.clone(),
        );
        registry.register(
            "flushes_detected",
            "Redis FLUSHDB / FLUSHALL / SWAPDB detected and reconciled",
            s.flushes_detected.clone(),
        );
        registry.register(
            "source_skips_caught",
            "etcd watches that jumped past a compacted resume revision without a compaction notice (etcd-io/etcd#17529), each answered by a re-list",
            s.source_skips_caught.clone(),
        );
        registry.register(
            "source_paused",
            "Times the Redis source unsubscribed because it was behind (publishing stuck, or notifications read late), reconciling once it could keep up",
            s.source_paused.clone(),
        );
        registry.register(
            "reconnects",
            "Reconnections, by connection",
            s.reconnects.clone(),
        );
        registry.register(
            "source_revision",
            "Latest etcd revision seen by the source",
            s.source_revision.clone(),
        );
        registry.register(
            "checkpoint_revision",
            "Last revision whose updates were all published",
            s.checkpoint_revision.clone(),
        );
        registry.register(
            "lag_revisions",
            "source_revision minus checkpoint_revision; -1 while unknown (the source cannot hear its database)",
            s.lag.clone(),
        );
        registry.register(
            "source_silent_seconds",
            "Seconds since the source last heard from its database (it asks every second)",
            s.source_silent_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Changes waiting between source and publisher",
            s.queue_depth.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance publishes",
            s.leader.clone(),
        );
        registry.register(
            "connected",
            "1 while the connection is up, by connection",
            s.connected.clone(),
        );
        registry.register(
            "lag_seconds",
            "Seconds since everything read was last published (0 while caught up); while the source cannot hear its database, at least the time since it last did",
            s.lag_seconds.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident memory of the bridge process",
            s.resident_memory.clone(),
        );
        Stats { registry, ..s }
    }
}

/// How long a source may hear nothing from its database before the lag is
/// reported unknown (sources ask at least every second).
pub const SOURCE_BLIND_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// How long the pipeline's loop may stand still before the process
/// counts as wedged (see [`Stats::alive`]).
pub const WEDGED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counts equal items, in first-seen order (a batch holds few distinct
/// labels: a linear scan beats hashing).
fn tally<T: PartialEq>(items: impl Iterator<Item = T>) -> Vec<(T, u64)> {
    let mut counts: Vec<(T, u64)> = Vec::new();
    for item in items {
        match counts.iter_mut().find(|(seen, _)| *seen == item) {
            Some((_, n)) => *n += 1,
            None => counts.push((item, 1)),
        }
    }
    counts
}

impl Stats {
    /// Names the backend (for labels) and whether a source is configured
    /// (for readiness).
    pub fn describe(&self, backend: &str, has_source: bool) {
        let _ = self.backend_name.set(backend.to_owned());
        self.has_source.store(has_source, Relaxed);
    }

    /// Counts a change read from `source` that became `update`.
    pub fn read(&self, source: &str, update: &DbUpdate) {
        self.changes_read.inc();
        self.read_by
            .get_or_create(&ReadLabels {
                source: source.to_owned(),
                table: update.table.clone(),
                action: update.action.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts updates the backend took, one label lookup per topic of the
    /// batch rather than per update.
    pub fn published(&self, updates: &[DbUpdate]) {
        self.updates_published.inc_by(updates.len() as u64);
        let backend = self.backend_name.get().cloned().unwrap_or_default();
        for (topic, n) in tally(updates.iter().map(|u| u.topic.as_str())) {
            self.published_by
                .get_or_create(&PublishedLabels {
                    backend: backend.clone(),
                    topic: topic.to_owned(),
                })
                .inc_by(n);
        }
    }

    /// Counts changes read from `source` that became `updates`, one label
    /// lookup per (table, action) of the batch.
    pub fn read_batch<'a>(&self, source: &str, updates: impl Iterator<Item = &'a DbUpdate>) {
        let mut total = 0;
        for ((table, action), n) in tally(updates.map(|u| (u.table.as_str(), u.action.as_str()))) {
            total += n;
            self.read_by
                .get_or_create(&ReadLabels {
                    source: source.to_owned(),
                    table: table.to_owned(),
                    action: action.to_owned(),
                })
                .inc_by(n);
        }
        self.changes_read.inc_by(total);
    }

    /// Counts a change read and skipped for `kind`, logging the first of each kind.
    pub fn skip(&self, kind: Skip, key: &[u8]) {
        self.changes_read.inc();
        self.uncarried(kind, key);
    }

    /// Counts (and logs, the first time) a value not carried for `kind`,
    /// when the change itself is counted as read elsewhere.
    pub fn uncarried(&self, kind: Skip, key: &[u8]) {
        let n = self
            .skipped
            .get_or_create(&ReasonLabels {
                reason: kind.as_str().into(),
            })
            .inc();
        let key = String::from_utf8_lossy(key);
        // The bridge's own keys (checkpoint, pub/sub, publisher table) are
        // expected: counted, never a warning.
        if n == 0 && kind != Skip::OwnKey {
            tracing::warn!(reason = kind.as_str(), %key, "Skipped a change; later skips of this kind are logged at debug level.");
        } else {
            tracing::debug!(reason = kind.as_str(), %key, "Skipped a change.");
        }
    }

    /// Counts a gap repair answered `from` "buffer" or "history", or
    /// "gone".
    pub fn replay_answered(&self, from: &str) {
        self.replay_answers
            .get_or_create(&AnsweredLabels { from: from.into() })
            .inc();
    }

    /// Gap repairs answered `from` the buffer, the history, or gone.
    pub fn replay_answers(&self, from: &str) -> u64 {
        self.replay_answers
            .get_or_create(&AnsweredLabels { from: from.into() })
            .get()
    }

    /// How many changes were skipped for `kind`.
    pub fn skipped(&self, kind: Skip) -> u64 {
        self.skipped
            .get_or_create(&ReasonLabels {
                reason: kind.as_str().into(),
            })
            .get()
    }

    /// Ready, and in which role: a standby (HA) is ready to take over; a
    /// leader is ready when the source (if any) is connected and the
    /// backend ready.
    pub fn ready(&self) -> Result<&'static str, &'static str> {
        if self.leader.get() == 0 {
            return Ok("standby");
        }
        if self.has_source.load(Relaxed) && !self.source.is_up() {
            return Err("source not connected");
        }
        if !self.backend.is_up() {
            return Err("backend not ready");
        }
        Ok("leader")
    }

    /// Whether every database of the pipeline (the backend, and the
    /// source if there is one) was reached at least once in this process.
    pub fn databases_reached(&self) -> bool {
        self.backend.reached() && (!self.has_source.load(Relaxed) || self.source.reached())
    }

    /// The pipeline's loop went round (it does at least once a second,
    /// idle or not, and at every publish attempt).
    pub fn pipeline_beat(&self) {
        self.pipeline_beat_ms.store(unix_ms(), Relaxed);
    }

    /// No pipeline runs now (a term ended): nothing to be wedged.
    pub fn pipeline_ended(&self) {
        self.pipeline_beat_ms.store(0, Relaxed);
    }

    /// Alive unless the pipeline is wedged: it runs and its loop has not
    /// gone round for [`WEDGED_AFTER`] (a deadlock, a starved runtime). A
    /// database that is down is not wedged: the loop keeps retrying. What
    /// `/livez` and the systemd watchdog report.
    pub fn alive(&self) -> Result<(), String> {
        let beat = self.pipeline_beat_ms.load(Relaxed);
        let still = unix_ms().saturating_sub(beat);
        if beat == 0 || still < WEDGED_AFTER.as_millis() as u64 {
            return Ok(());
        }
        Err(format!("the pipeline has not moved for {} s", still / 1000))
    }

    /// The source heard from its database (any answer, change or progress
    /// notice): what it has read is current as of now.
    pub fn source_heard(&self) {
        self.source_heard_ms.store(unix_ms(), Relaxed);
    }

    /// Whether the lag is unknown: a source is configured and it is
    /// disconnected, or has heard nothing from its database for
    /// [`SOURCE_BLIND_AFTER`] although it asks every second. Then the
    /// database may have moved on unseen: the lag must not read 0.
    pub fn source_blind(&self) -> bool {
        self.has_source.load(Relaxed)
            && (!self.source.is_up()
                || self.source_silent_ms() > SOURCE_BLIND_AFTER.as_millis() as u64)
    }

    fn source_silent_ms(&self) -> u64 {
        unix_ms().saturating_sub(self.source_heard_ms.load(Relaxed))
    }

    /// The pipeline has published everything it read so far.
    pub fn caught_up(&self) {
        self.caught_up_ms.store(unix_ms(), Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        for (name, state) in [("source", &self.source), ("backend", &self.backend)] {
            if name == "backend" || self.has_source.load(Relaxed) {
                self.connected
                    .get_or_create(&ConnectionLabels {
                        connection: name.into(),
                    })
                    .set(state.is_up() as i64);
            }
        }
        let behind = self.queue_depth.get() > 0
            || self.source_revision.get() > self.checkpoint_revision.get();
        let since = unix_ms().saturating_sub(self.caught_up_ms.load(Relaxed));
        let blind = self.source_blind();
        let silent = if self.has_source.load(Relaxed) {
            self.source_silent_ms()
        } else {
            0
        };
        self.source_silent_seconds.set(silent as f64 / 1000.0);
        let mut lag_ms = if behind { since } else { 0 };
        if blind {
            lag_ms = lag_ms.max(silent);
        }
        self.lag_seconds.set(lag_ms as f64 / 1000.0);
        if let Some(kb) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            })
        {
            self.resident_memory.set(kb * 1024);
        }
        self.lag.set(if blind {
            -1
        } else {
            self.source_revision
                .get()
                .saturating_sub(self.checkpoint_revision.get())
                .max(0)
        });
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_pipeline_that_stands_still_is_wedged() {
        let stats = Stats::default();
        assert!(stats.alive().is_ok(), "no pipeline (a standby): alive");
        stats.pipeline_beat();
        assert!(stats.alive().is_ok());
        let long_ago = unix_ms() - WEDGED_AFTER.as_millis() as u64 - 1000;
        stats.pipeline_beat_ms.store(long_ago, Relaxed);
        assert!(stats.alive().unwrap_err().contains("has not moved"));
        stats.pipeline_ended();
        assert!(stats.alive().is_ok(), "a term that ended is not wedged");
    }
}
