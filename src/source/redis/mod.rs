//! The Redis source: keyspace notifications, with SCAN reconciliation.
//!
//! Keyspace notifications are fire-and-forget: whatever happens while the
//! bridge is disconnected is never told again. So on start and after every
//! reconnect the source subscribes first, then SCANs the layout's keys and
//! compares them with a per-key fingerprint of what it has already emitted,
//! emitting the missed create / set / delete. Notifications only say *which*
//! key changed: the value is read afterwards (pipelined, one round trip per
//! batch), and the action follows from what was read and what the
//! subscribers already know:
//!
//! | read now            | known before        | emitted  |
//! |---------------------|---------------------|----------|
//! | value               | no                  | `create` |
//! | value, different    | yes                 | `set`    |
//! | value, same         | yes                 | nothing (e.g. the `set` after a `new`) |
//! | gone / other type   | yes                 | `delete` |
//! | gone                | no                  | nothing  |
//!
//! This gives Redis' events their documented meaning (`new` → create;
//! `set`, `hset`, `hdel` → set; `del`, `unlink`, `expired`, `evicted` →
//! delete; `rename_from` / `rename_to` → delete + create) while never
//! publishing a `set` with no value, and it converges on the database's
//! real state whatever order reads and events interleave in.
//!
//! # Layout
//!
//! - this file: the source, its run loop and one session's loop;
//! - `enable`: keyspace notifications enabled (or verified) on every node;
//! - `topology`: the standalone server or the cluster masters followed;
//! - `notes`: the merged notification streams and the keys still to read;
//! - `reads`: reading values (GET pipelines, the type-aware script);
//! - `reconcile`: SCAN and the diff against the index;
//! - `sentinels`: FLUSHDB / FLUSHALL / SWAPDB detection, the notification
//!   delay clock;
//! - `behind`: letting go of the notifications when behind.

mod behind;
mod enable;
mod notes;
mod reads;
mod reconcile;
mod sentinels;
mod state;
mod topology;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use enable::{missing_flags, NEEDED_FLAGS};
pub use sentinels::SENTINEL_PREFIX;
pub use state::RedisSource;

use super::{emit, SourceError, SourceEvent};
use crate::config::RedisSourceConfig;
use crate::db::redis::{redacted, SLOTS};
use crate::keymap::KeyLayout;
use crate::retry::Reconnect;
use crate::source::KeyIndex;
use crate::stats::Stats;
use behind::wait_for_room;
use notes::Notes;
use reads::read_values;
use reconcile::glob_escape;
use sentinels::{NOTIFICATION_DELAY_MAX, SENTINEL_INTERVAL};
use state::{Ended, BATCH};
use topology::{followed_masters, Topology};

impl RedisSource {
    /// A source for one Redis database; `resume`, the position of a
    /// checkpoint whose index was saved with it ([`RedisSource::resumable`]),
    /// continues from that index.
    pub fn new(config: RedisSourceConfig, resume: Option<i64>, stats: Arc<Stats>) -> Self {
        let slots = config
            .slot_ranges()
            .unwrap_or_else(|_| vec![(0, SLOTS - 1)]);
        let saved = resume.and_then(|at| Some((at, Self::saved_index(&config, at)?)));
        let continuing = saved.is_some();
        let (position, index) = saved.unwrap_or_default();
        RedisSource {
            slots,
            config,
            index,
            position,
            unconfirmed: false,
            reconciled: false,
            continuing,
            unsupported_logged: HashSet::new(),
            stats,
            takeover: false,
            sentinel: {
                let token = format!(
                    "{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or_default()
                );
                (format!("{SENTINEL_PREFIX}{token}"), token)
            },
            sentinel_refused: false,
            sentinel_sent: HashMap::new(),
        }
    }

    /// The checkpoint `resume` when the key index saved with it at a
    /// graceful stop is there: a run from it publishes the difference and
    /// costs subscribers no `sync`. `None` otherwise (no checkpoint, a
    /// crash, a stop in the middle of a batch): Redis keeps no history, so
    /// subscribers must re-read.
    pub fn resumable(config: &RedisSourceConfig, resume: Option<i64>) -> Option<i64> {
        resume.filter(|at| Self::saved_index(config, *at).is_some())
    }

    fn index_file(config: &RedisSourceConfig) -> Option<std::path::PathBuf> {
        config
            .checkpoint_file
            .as_ref()
            .map(|p| p.with_extension("index"))
    }

    /// The index saved at position `at`, if that is the one saved.
    fn saved_index(config: &RedisSourceConfig, at: i64) -> Option<KeyIndex<u64>> {
        let path = Self::index_file(config)?;
        match crate::checkpoint::load_index(&path, at) {
            Ok(index) => index,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the saved key index; subscribers will re-read.");
                None
            }
        }
    }

    /// Saves the index with the last position at a stop, when it is what
    /// subscribers were sent up to that position; else removes a stale one.
    fn save_index(&self) {
        let Some(path) = Self::index_file(&self.config) else {
            return;
        };
        if !self.reconciled || self.unconfirmed {
            let _ = std::fs::remove_file(&path);
            return;
        }
        match crate::checkpoint::save_index(&path, self.position, &self.index) {
            Ok(()) => {
                tracing::info!(position = self.position, keys = self.index.len(), path = %path.display(), "Saved the key index.")
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot save the key index; a restart will ask subscribers to re-read.")
            }
        }
    }

    /// Hands the pipeline a position covering every change handed over so
    /// far (microseconds since the epoch, or one past the last: increasing
    /// across runs). Heartbeats announce it; a graceful stop saves the index
    /// with it.
    pub(super) async fn confirm(
        &mut self,
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
    ) -> Result<(), crate::source::Stopped> {
        if !self.unconfirmed {
            return Ok(());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or_default();
        let position = now.max(self.position + 1);
        emit(tx, shutdown, SourceEvent::Checkpoint(position)).await?;
        self.position = position;
        self.unconfirmed = false;
        Ok(())
    }

    /// Marks a start that takes over from another (HA) leader: Redis keeps
    /// no history, so the first reconciliation publishes every key, after
    /// a `sync` for what may have been deleted meanwhile.
    pub fn taking_over(mut self) -> Self {
        self.takeover = true;
        self
    }

    /// Runs until `shutdown`. Fails when Redis cannot be reached at the
    /// process's start or keyspace notifications cannot be enabled then;
    /// later outages (and one at the start of a later HA term, once Redis
    /// was reached) are retried with backoff and reconciled.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let url = redacted(&self.config.url);
        let fail = |message: String| SourceError {
            source_name: "redis",
            message: format!("{message} (url {url}; check source.url)"),
        };
        let client = crate::db::redis::client(&self.config.url, &self.config.auth).map_err(fail)?;
        let mut reconnect =
            Reconnect::new(format!("redis source {url}")).with_state(self.stats.source.clone());
        // The first session uses these connections: no second round of
        // connecting to every master at start-up.
        let start = async {
            let mut topo = self
                .topology(&client)
                .await
                .map_err(|e| fail(format!("cannot connect: {e}")))?;
            if topo.data.is_cluster() {
                tracing::info!(
                    masters = topo.masters.len(),
                    nodes = topo.nodes.len(),
                    "Redis Cluster: following the keyspace notifications of every master."
                );
            }
            self.ensure_all(&client, &mut topo)
                .await
                .map_err(|message| SourceError {
                    source_name: "redis",
                    message,
                })?;
            Ok::<_, SourceError>(topo)
        };
        let mut connected = match start.await {
            Ok(topo) => Some(topo),
            // Reached before (in an earlier HA term of this process): Redis
            // restarting is an outage like any later one, never an exit.
            Err(e) if self.stats.source.reached() => {
                if !reconnect.down(&e.message, &shutdown).await {
                    return Ok(());
                }
                None
            }
            Err(e) => return Err(e),
        };
        let mut first = true;
        loop {
            match self
                .session(
                    &client,
                    &tx,
                    &shutdown,
                    first,
                    &mut reconnect,
                    connected.take(),
                )
                .await
            {
                Ended::Stopped => break,
                Ended::Topology => {
                    first = false;
                }
                Ended::Behind => {
                    first = false;
                    // Subscribe again only once publishing has room: until
                    // then nothing is buffered, and the reconciliation
                    // finds what changed meanwhile (each key once).
                    if wait_for_room(&tx, &shutdown).await.is_err() {
                        break;
                    }
                    tracing::info!("Publishing caught up; subscribing again and reconciling.");
                }
                Ended::Lost(e) => {
                    if shutdown.is_cancelled() || tx.is_closed() {
                        break;
                    }
                    first = false;
                    if !reconnect.down(&e, &shutdown).await {
                        break;
                    }
                }
            }
        }
        self.save_index();
        Ok(())
    }

    /// One session: subscribe to every followed master, reconcile, then
    /// follow notifications until a connection drops or the cluster's
    /// masters change.
    async fn session(
        &mut self,
        client: &redis::Client,
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
        first: bool,
        reconnect: &mut Reconnect,
        connected: Option<Topology>,
    ) -> Ended {
        let result = async {
            let mut topo = match connected {
                Some(topo) => topo,
                None => {
                    let mut topo = self.topology(client).await.map_err(Ended::Lost)?;
                    // A restarted Redis forgot a CONFIG SET made at runtime,
                    // and a promoted replica may never have had it.
                    self.ensure_all(client, &mut topo)
                        .await
                        .map_err(Ended::Lost)?;
                    topo
                }
            };
            let prefix = glob_escape(
                KeyLayout::parse(&self.config.layout)
                    .map(|l| l.prefix().to_owned())
                    .unwrap_or_default()
                    .as_str(),
            );
            // Subscribed first, so nothing that changes during the scan is missed.
            let mut notes = self.subscribe(client, &topo, &prefix).await?;
            let emit_diff = !first || self.config.snapshot || self.takeover || self.continuing;
            if first && self.takeover {
                let reason =
                    "a new leader took over; Redis keeps no history of what changed meanwhile";
                emit(tx, shutdown, SourceEvent::Sync(reason.into())).await?;
            }
            self.flushed(&mut topo).await?; // places the sentinels
            self.reconcile(&mut topo, &prefix, tx, shutdown, emit_diff, &mut notes)
                .await?;
            self.reconciled = true;
            self.confirm(tx, shutdown).await?;
            // Up only once reconciled: a Redis that accepts connections
            // but fails the SCAN (still loading its data after a restart)
            // is one outage, logged once, not one per attempt.
            reconnect.up();
            let followed = followed_masters(&topo.nodes, &self.slots);
            let mut check = tokio::time::interval(SENTINEL_INTERVAL);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            check.tick().await;
            loop {
                // The check comes first: under a backlog there is always a
                // key or a notification ready, and it would starve.
                let check_due = if notes.dirty.is_empty() {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Err(Ended::Stopped),
                        _ = check.tick() => true,
                        m = notes.stream.next() => match m.flatten() {
                            Some(m) => {
                                self.note(&mut notes, m);
                                false
                            }
                            None => return Err(Ended::Lost(NOTIFICATIONS_CLOSED.into())),
                        },
                    }
                } else if shutdown.is_cancelled() {
                    return Err(Ended::Stopped);
                } else {
                    check.tick().now_or_never().is_some()
                };
                if check_due {
                    self.check(
                        client, &mut topo, &prefix, &followed, tx, shutdown, &mut notes,
                    )
                    .await?;
                    self.confirm(tx, shutdown).await?;
                    continue;
                }
                // Take whatever else already arrived, then read one batch of
                // keys in one round trip.
                self.drain(&mut notes);
                if notes.ended {
                    // The next session's reconciliation covers what is dirty.
                    return Err(Ended::Lost(NOTIFICATIONS_CLOSED.into()));
                }
                let keys = notes.take(BATCH);
                let reads = read_values(&mut topo, &keys).await?;
                for (key, read) in keys.into_iter().zip(reads) {
                    if let Some(change) = self.diff(key, read) {
                        self.hand_over(change, &mut notes, tx, shutdown).await?;
                    }
                }
                self.confirm(tx, shutdown).await?;
            }
        }
        .await;
        match result {
            Ok(()) => Ended::Stopped,
            Err(e) => e,
        }
    }

    /// The once-a-second check: the database answers (the lag is known),
    /// was not flushed or swapped (else every key is reconciled), the
    /// notifications are read in time, and the cluster's masters are the
    /// ones followed.
    #[allow(clippy::too_many_arguments)]
    async fn check(
        &mut self,
        client: &redis::Client,
        topo: &mut Topology,
        prefix: &str,
        followed: &[String],
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
        notes: &mut Notes,
    ) -> Result<(), Ended> {
        let flushed = self.flushed(topo).await?;
        self.stats.source_heard();
        if flushed {
            tracing::warn!(db = Self::db(client), "The database was flushed or swapped (FLUSHDB / FLUSHALL / SWAPDB send no per-key notification); reconciling every key.");
            self.stats.flushes_detected.inc();
            self.reconcile(topo, prefix, tx, shutdown, true, notes)
                .await?;
        }
        // Reading slower than Redis notifies (short of CPU): the client's
        // queue would grow without limit.
        let delay = self.notification_delay();
        if delay > NOTIFICATION_DELAY_MAX {
            self.pause(&format!(
                "keyspace notifications are read {} s late",
                delay.as_secs()
            ));
            return Err(Ended::Behind);
        }
        if self.masters_changed(topo, followed).await? {
            return Err(Ended::Topology);
        }
        Ok(())
    }
}

const NOTIFICATIONS_CLOSED: &str = "a node's notification connection closed";

/// A source of the default layout, never connected.
#[cfg(test)]
fn test_source() -> RedisSource {
    RedisSource::new(
        crate::config::RedisSourceConfig {
            url: String::new(),
            layout: "{{table}.{topic}}{key}".into(),
            topic_field: String::new(),
            snapshot: false,
            scan_count: 10,
            slots: None,
            connect_timeout: std::time::Duration::from_secs(1),
            auth: Default::default(),
            checkpoint_file: None,
        },
        None,
        std::sync::Arc::default(),
    )
}
