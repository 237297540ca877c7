//! The pipeline: source → mapper → publisher, its checkpointing and its
//! shutdown.
//!
//! One bounded channel sits between the source task and the publishing
//! loop; when the backend is slow the channel fills and the source stops
//! reading. Publishing retries with backoff until it succeeds, so a backend
//! outage delays updates but loses none. A checkpoint is saved only after
//! the publisher has flushed everything before it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::PubSub;
use crate::checkpoint::{self, CheckpointError};
use crate::config::advertised_uri;
use crate::config::{BackendConfig, Config, SourceConfig};
use crate::discovery::Registration;
use crate::ha::Leadership;
use crate::keymap::KeyLayout;
use crate::mapper::{Mapped, Mapper};
use crate::pubsub::{PublishError, Publisher};
use crate::retry::Reconnect;
use crate::service::MultiprocListener;
use crate::source::etcd::EtcdSource;
use crate::source::redis::RedisSource;
use crate::source::{SourceError, SourceEvent};
use crate::stats::Stats;
use crate::update::DbUpdate;

/// How often the checkpoint file is rewritten at most; bounds the replay
/// after a crash to about this much traffic.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Updates handed to the publisher at once when the queue holds more.
const MAX_BATCH: usize = 256;

/// Keys the bridge writes itself and must never republish: the etcd
/// backend's topics and the `publisher` table (etcd and Redis layouts).
pub const OWN_PREFIXES: [&str; 4] = [
    "/pubsub/",
    "/publisher/",
    "{publisher.",
    checkpoint::ETCD_CHECKPOINT_PREFIX,
];

/// Why the bridge stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The publisher could not be set up.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The source could not start.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The multiproc channel could not be opened.
    #[error("multiproc channel: {0}")]
    Multiproc(String),
    /// The admin listener could not bind.
    #[error("admin listener: {0}")]
    Admin(String),
    /// Leader election failed at start-up.
    #[error("high availability: {0}")]
    Ha(String),
    /// The publisher table could not be written.
    #[error("publisher discovery: {0}")]
    Discovery(String),
    /// Stopped at the shutdown deadline with updates the backend did not
    /// take (it was down).
    #[error("stopped after bridge.shutdown_timeout with {unpublished} updates unpublished (the backend did not take them); {replay}")]
    Unpublished {
        /// Updates read but not published.
        unpublished: usize,
        /// What becomes of them.
        replay: &'static str,
    },
}

type Producer = JoinHandle<Result<(), BridgeError>>;

/// Runs a producer; if it fails, stops the others so the bridge exits
/// with its error instead of running half.
fn spawn_producer<F>(stop: &CancellationToken, work: F) -> Producer
where
    F: std::future::Future<Output = Result<(), BridgeError>> + Send + 'static,
{
    let stop = stop.clone();
    tokio::spawn(async move {
        let result = work.await;
        if result.is_err() {
            stop.cancel();
        }
        result
    })
}

/// The bridge's publisher id: stable across restarts of the same service
/// on the same host (so subscribers can tell a restart), distinct for two
/// services (they differ in what they read or where they publish).
fn service_id(config: &Config) -> String {
    let backend = match &config.backend {
        BackendConfig::Zmq(c) => c.bind.clone(),
        BackendConfig::Redis(c) => crate::db::redis::redacted(&c.url),
        BackendConfig::Etcd(c) => c.endpoints.join(","),
    };
    let source = match &config.source {
        Some(SourceConfig::Etcd(c)) => format!("etcd:{}{}", c.endpoints.join(","), c.prefix),
        Some(SourceConfig::Redis(c)) => {
            format!("redis:{}", crate::db::redis::redacted(&c.url))
        }
        None => String::new(),
    };
    let multiproc = config
        .multiproc
        .as_ref()
        .map(|m| m.endpoint())
        .unwrap_or_default();
    crate::discovery::publisher_id(&format!("feedbridge:{backend}|{source}|{multiproc}"))
}

/// Runs the bridge until `shutdown` fires, then publishes what is in flight
/// (within `bridge.shutdown_timeout`), saves the final checkpoint and returns.
/// With an `[ha]` section, it first waits to be elected, and goes back to
/// standing by whenever it loses leadership.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), BridgeError> {
    if let Some(listen) = &config.admin.listen {
        let addr = listen.parse().expect("validated config");
        crate::admin::serve(addr, stats.clone(), shutdown.clone())
            .await
            .map_err(BridgeError::Admin)?;
    }
    let Some(ha) = config.ha.clone() else {
        stats.leader.set(1);
        return run_once(&config, shutdown, stats, None).await;
    };
    let instance = ha
        .instance
        .clone()
        .unwrap_or_else(|| format!("{}-{}", crate::discovery::hostname(), std::process::id()));
    let service = service_id(&config);
    let mut reconnect = Reconnect::new("leader election");
    let mut first = true;
    loop {
        stats.leader.set(0);
        let lead = match crate::ha::campaign(&ha, &instance, &service, &shutdown).await {
            Ok(Some(lead)) => Arc::new(lead),
            Ok(None) => return Ok(()),
            Err(e) if first => {
                return Err(BridgeError::Ha(format!(
                    "{e} (check ha.endpoints {} / ha.url)",
                    crate::config::redact_endpoints(&ha.endpoints)
                )))
            }
            Err(e) => {
                if !reconnect.down(&e, &shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        first = false;
        reconnect.up();
        stats.leader.set(1);
        let stop = shutdown.child_token();
        {
            let (lost, stop) = (lead.lost(), stop.clone());
            tokio::spawn(async move {
                lost.cancelled().await;
                stop.cancel();
            });
        }
        let result = run_once(
            &config,
            stop,
            stats.clone(),
            Some((lead.clone(), instance.as_str())),
        )
        .await;
        if shutdown.is_cancelled() || (result.is_err() && lead.is_valid()) {
            lead.resign().await;
            return result;
        }
        stats.leader.set(0);
        tracing::warn!(%instance, "Leadership lost: stopped publishing; standing by again.");
    }
}

/// One term of publishing: the whole pipeline until `shutdown` (or, under
/// HA, until leadership is lost).
async fn run_once(
    config: &Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    lead: Option<(Arc<Leadership>, &str)>,
) -> Result<(), BridgeError> {
    let id = config
        .discovery
        .as_ref()
        .and_then(|d| d.id.clone())
        .unwrap_or_else(|| match &lead {
            // every instance its own sequence, so subscribers see who published
            Some((_, instance)) => {
                crate::discovery::publisher_id(&format!("{}|{instance}", service_id(config)))
            }
            None => service_id(config),
        });
    let lead = lead.map(|(l, _)| l);
    let mut pubsub = PubSub::new(config.backend.clone()).with_publisher_id(id);
    if let Some(lead) = lead.clone() {
        pubsub = pubsub.with_heartbeat_gate(move || lead.is_valid());
    }
    let publisher_id = pubsub.publisher_id();
    let publisher = pubsub.get_publisher().await?;
    let backend_name = match &config.backend {
        BackendConfig::Zmq(_) => "zmq",
        BackendConfig::Redis(_) => "redis",
        BackendConfig::Etcd(_) => "etcd",
    };
    stats.describe(backend_name, config.source.is_some());
    stats.backend.set_up(true, false);
    let (layout, topic_field, checkpoint_file) = match &config.source {
        Some(SourceConfig::Etcd(c)) => (
            c.layout.as_str(),
            c.topic_field.as_str(),
            c.checkpoint_file.clone(),
        ),
        Some(SourceConfig::Redis(c)) => (c.layout.as_str(), c.topic_field.as_str(), None),
        None => ("/{table}/{key}", "", None),
    };
    let mapper = Mapper::new(
        KeyLayout::parse(layout).expect("validated config"),
        Some(topic_field.to_owned()).filter(|f| !f.is_empty()),
        config.bridge.max_value_bytes,
        OWN_PREFIXES
            .iter()
            .map(|p| p.to_string())
            .chain(
                config
                    .ha
                    .as_ref()
                    .map(|h| format!("{}/", h.prefix.trim_end_matches('/'))),
            )
            .collect(),
    );
    // Without a file (and outside HA, which keeps it under the leader key)
    // an etcd source keeps its checkpoint in etcd: the config as shipped
    // resumes where it stopped.
    let mut checkpoint_etcd = match (&config.source, &lead, &checkpoint_file) {
        (Some(SourceConfig::Etcd(c)), None, None) => {
            let client = crate::db::etcd::connect(&c.endpoints, c.connect_timeout, &c.auth)
                .await
                .map_err(|e| {
                    SourceError {
                        source_name: "etcd",
                        message: format!(
                            "cannot connect to read the checkpoint: {e} (endpoints {}; is etcd running? check source.endpoints)",
                            crate::config::redact_endpoints(&c.endpoints)
                        ),
                    }
                })?;
            Some(checkpoint::EtcdStore::new(&client, &service_id(config)))
        }
        _ => None,
    };
    let resume = match (&lead, &checkpoint_file, &mut checkpoint_etcd) {
        (Some(lead), file, _) => match lead.load_checkpoint().await {
            Ok(Some(r)) => Some(r),
            Ok(None) => file.as_deref().map(checkpoint::load).transpose()?.flatten(),
            Err(e) => return Err(BridgeError::Ha(format!("cannot read the checkpoint: {e}"))),
        },
        (None, Some(p), _) => checkpoint::load(p)?,
        (None, None, Some(store)) => {
            let endpoints = match &config.source {
                Some(SourceConfig::Etcd(c)) => crate::config::redact_endpoints(&c.endpoints),
                _ => String::new(),
            };
            match store.load().await {
                Ok(r) => {
                    tracing::info!(key = store.key(), revision = ?r, "Checkpoint kept in etcd.");
                    r
                }
                Err(e) if e.to_string().contains("permission denied") => {
                    tracing::warn!(error = %e, "This etcd user may not keep the checkpoint in etcd: a restart starts from the current revision and loses what changed meanwhile. Set source.checkpoint_file, or grant the user read-write on /feedbridge/checkpoint/.");
                    checkpoint_etcd = None;
                    None
                }
                Err(e) => {
                    return Err(SourceError {
                        source_name: "etcd",
                        message: format!(
                            "{e} (endpoints {endpoints}; is etcd running? check source.endpoints and source.auth)"
                        ),
                    }
                    .into())
                }
            }
        }
        (None, None, None) => None,
    };

    // Everything stops with `shutdown`, or when a producer fails.
    let stop = shutdown.child_token();
    let (tx, rx) = mpsc::channel(config.bridge.queue_capacity);
    let mut producers: Vec<Producer> = Vec::new();
    if let Some(multiproc) = &config.multiproc {
        let listener = MultiprocListener::bind(multiproc).map_err(BridgeError::Multiproc)?;
        let (tx, stop, stats) = (tx.clone(), stop.clone(), stats.clone());
        let max_value_bytes = config.bridge.max_value_bytes;
        producers.push(spawn_producer(&stop.clone(), async move {
            listener
                .run(tx, stop, stats, max_value_bytes)
                .await
                .map_err(BridgeError::Multiproc)
        }));
    }
    match config.source.clone() {
        Some(SourceConfig::Etcd(c)) => {
            let source = EtcdSource::new(c, resume, stats.clone())
                .with_own_prefixes(mapper.excluded_prefixes())
                .run(tx.clone(), stop.clone());
            producers.push(spawn_producer(&stop, async move { Ok(source.await?) }));
        }
        Some(SourceConfig::Redis(c)) => {
            let mut source = RedisSource::new(c, stats.clone());
            if lead.is_some() {
                source = source.taking_over();
            }
            let source = source.run(tx.clone(), stop.clone());
            producers.push(spawn_producer(&stop, async move { Ok(source.await?) }));
        }
        None => {}
    }
    drop(tx); // the pipeline ends when every producer has ended
    let registration = match (&config.discovery, &config.backend) {
        (Some(d), BackendConfig::Zmq(z)) => {
            let uri =
                advertised_uri(&z.bind, d.local_ip.as_deref()).map_err(BridgeError::Discovery)?;
            let registration = Registration::start(d.clone(), publisher_id, uri).await;
            let registration = match registration {
                Ok(r) => r,
                Err(e) => {
                    stop.cancel();
                    let target = match &d.url {
                        Some(url) => format!("discovery.url {}", crate::config::redact_url(url)),
                        None => format!(
                            "discovery.endpoints {}",
                            crate::config::redact_endpoints(&d.endpoints)
                        ),
                    };
                    return Err(BridgeError::Discovery(format!(
                        "cannot register in the publisher table: {e} (check {target})"
                    )));
                }
            };
            Some(tokio::spawn(registration.run(stop.clone())))
        }
        _ => None,
    };

    // After a stop, in-flight updates get `shutdown_timeout` to go out.
    let give_up = CancellationToken::new();
    {
        let (stop, give_up, grace) = (
            stop.clone(),
            give_up.clone(),
            config.bridge.shutdown_timeout,
        );
        tokio::spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
            give_up.cancel();
        });
    }

    let mut pipeline = Pipeline {
        lead: lead.clone(),
        publisher: publisher.clone(),
        mapper,
        checkpoint_file,
        checkpoint_etcd,
        checkpoint_failing: false,
        published_revision: None,
        saved_revision: resume,
        last_save: Instant::now(),
        reconnect: Reconnect::new("publisher").with_state(stats.backend.clone()),
        stats,
        source_name: match &config.source {
            Some(SourceConfig::Etcd(_)) => "etcd",
            Some(SourceConfig::Redis(_)) => "redis",
            None => "multiproc",
        },
        give_up: give_up.clone(),
    };
    let unpublished = pipeline.drain(rx).await.err();
    stop.cancel();
    let mut result = Ok(());
    for producer in producers {
        let r = producer
            .await
            .unwrap_or_else(|e| Err(BridgeError::Multiproc(format!("task failed: {e}"))));
        if result.is_ok() {
            result = r;
        }
    }
    if let Some(r) = registration {
        let _ = r.await;
    }
    let deposed = lead.as_ref().is_some_and(|l| !l.is_valid());
    match unpublished {
        None => pipeline.save_checkpoint(true).await?,
        Some(n) if result.is_ok() && !deposed && shutdown.is_cancelled() => {
            result = Err(BridgeError::Unpublished {
                unpublished: n,
                replay: match &config.source {
                    Some(SourceConfig::Etcd(_)) => {
                        "they are replayed from the last checkpoint at the next start"
                    }
                    Some(SourceConfig::Redis(_)) => {
                        "Redis keeps no history: the next start reconciles every key and subscribers get a sync"
                    }
                    None => "the multiproc publishers' updates are lost; subscribers see the gap",
                },
            });
        }
        Some(n) => {
            tracing::warn!(unpublished = n, "Stopped publishing with updates unpublished; they are replayed from the last checkpoint.");
        }
    }
    let _ = publisher.close().await;
    give_up.cancel();
    result
}

struct Pipeline {
    /// Under HA: publishing stops the moment this is no longer valid.
    lead: Option<Arc<Leadership>>,
    source_name: &'static str,
    publisher: Arc<dyn Publisher>,
    mapper: Mapper,
    stats: Arc<Stats>,
    checkpoint_file: Option<std::path::PathBuf>,
    checkpoint_etcd: Option<checkpoint::EtcdStore>,
    /// The last attempt to save the checkpoint failed (logged once).
    checkpoint_failing: bool,
    published_revision: Option<i64>,
    saved_revision: Option<i64>,
    last_save: Instant,
    reconnect: Reconnect,
    give_up: CancellationToken,
}

impl Pipeline {
    /// Publishes every event until the source ends; when it had to give up
    /// (the shutdown deadline, or leadership lost), how many updates were
    /// left unpublished.
    async fn drain(&mut self, mut rx: mpsc::Receiver<SourceEvent>) -> Result<(), usize> {
        let mut batch: Vec<DbUpdate> = Vec::with_capacity(MAX_BATCH);
        if self.drain_into(&mut rx, &mut batch).await {
            return Ok(());
        }
        let queued = std::iter::from_fn(|| rx.try_recv().ok())
            .filter(|e| matches!(e, SourceEvent::Change(_) | SourceEvent::Update(_)))
            .count();
        Err(batch.len() + queued)
    }

    /// The loop of [`Pipeline::drain`]; `false` when it gave up.
    async fn drain_into(
        &mut self,
        rx: &mut mpsc::Receiver<SourceEvent>,
        batch: &mut Vec<DbUpdate>,
    ) -> bool {
        // Saves a pending checkpoint when the stream goes quiet, so the
        // replay after a crash stays bounded by the interval.
        let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                biased;
                _ = self.give_up.cancelled() => return false,
                e = rx.recv() => e,
                _ = tick.tick() => {
                    self.try_checkpoint().await;
                    continue;
                }
            };
            let Some(event) = event else { return true };
            // Take what else is already queued: one batch, one round trip
            // for backends that can pipeline. Order is kept: a checkpoint
            // or sync first publishes everything before it.
            let mut next = Some(event);
            while let Some(event) = next.take() {
                match event {
                    SourceEvent::Change(change) => match self.mapper.map(&change) {
                        Mapped::Update(update) => {
                            self.stats.read(self.source_name, &update);
                            batch.push(update);
                        }
                        Mapped::Resync(update, skip) => {
                            self.stats.skip(skip, &change.key);
                            self.stats.syncs_published.inc();
                            batch.push(update);
                        }
                        Mapped::Skip(skip) => self.stats.skip(skip, &change.key),
                    },
                    SourceEvent::Update(update) => {
                        self.stats.read("multiproc", &update);
                        batch.push(update);
                    }
                    SourceEvent::Sync(reason) => {
                        tracing::warn!(%reason, "Publishing a sync notice: subscribers should re-read their state.");
                        self.stats.syncs_published.inc();
                        batch.push(DbUpdate::sync(reason));
                    }
                    SourceEvent::Checkpoint(revision) => {
                        if !self.publish(batch).await {
                            return false;
                        }
                        self.published_revision = Some(revision);
                        self.try_checkpoint().await;
                    }
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.stats
                .queue_depth
                .set((rx.max_capacity() - rx.capacity()) as i64);
            if !self.publish(batch).await {
                return false;
            }
        }
    }

    /// Publishes and empties `batch`, retrying with backoff until the
    /// backend takes it; `false` only when giving up at shutdown. A retried
    /// batch may repeat updates that went out before the failure
    /// (at-least-once).
    async fn publish(&mut self, batch: &mut Vec<DbUpdate>) -> bool {
        if batch.is_empty() {
            return true;
        }
        loop {
            if self.lead.as_ref().is_some_and(|l| !l.is_valid()) {
                return false; // a deposed leader must not publish
            }
            match self.publisher.send_batch(batch).await {
                Ok(()) => {
                    self.reconnect.up();
                    self.stats.published(batch);
                    batch.clear();
                    return true;
                }
                Err(e) => {
                    self.stats.publish_errors.inc();
                    if matches!(e, PublishError::Closed)
                        || !self.reconnect.down(&e, &self.give_up).await
                    {
                        return false;
                    }
                }
            }
        }
    }

    /// Saves the checkpoint when due; a failure is retried at the next
    /// tick and logged once until it succeeds again.
    async fn try_checkpoint(&mut self) {
        match self.save_checkpoint(false).await {
            Ok(()) => {
                if std::mem::take(&mut self.checkpoint_failing) {
                    tracing::info!("The checkpoint is saved again.");
                }
            }
            Err(e) if !self.checkpoint_failing => {
                self.checkpoint_failing = true;
                tracing::error!(error = %e, "Cannot save the checkpoint; retrying every second (a restart meanwhile replays from the last saved one).");
            }
            Err(e) => tracing::debug!(error = %e, "Cannot save the checkpoint."),
        }
    }

    /// Saves the published revision when due (or `now`), after flushing the
    /// publisher so the file never runs ahead of what subscribers can get.
    async fn save_checkpoint(&mut self, now: bool) -> Result<(), CheckpointError> {
        let Some(revision) = self.published_revision else {
            return Ok(());
        };
        self.stats.checkpoint_revision.set(revision);
        if self.checkpoint_file.is_none() && self.lead.is_none() && self.checkpoint_etcd.is_none() {
            return Ok(());
        }
        // The first checkpoint is saved at once: until a file exists, a
        // restart would start from "now" and skip what is in flight.
        let due =
            now || self.saved_revision.is_none() || self.last_save.elapsed() >= CHECKPOINT_INTERVAL;
        if self.saved_revision == Some(revision) || !due {
            return Ok(());
        }
        if self.publisher.flush().await.is_err() {
            return Ok(()); // closed: keep the older checkpoint, replay is safe
        }
        if let Some(path) = &self.checkpoint_file {
            checkpoint::save(path, revision)?;
        }
        if let Some(store) = &mut self.checkpoint_etcd {
            // Retried at the next tick; a replay from the older one is safe.
            store.save(revision).await?;
        }
        if let Some(lead) = self.lead.as_ref().filter(|l| l.is_valid()) {
            match lead.save_checkpoint(revision).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(revision, "Not leader any more: checkpoint not stored.")
                }
                Err(e) => {
                    tracing::warn!(revision, error = %e, "Cannot store the checkpoint in etcd; will retry.")
                }
            }
        }
        self.saved_revision = Some(revision);
        self.last_save = Instant::now();
        tracing::debug!(revision, "Checkpoint saved.");
        Ok(())
    }
}
