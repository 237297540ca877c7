//! The pipeline: source → mapper → publisher, its checkpointing and its
//! shutdown.
//!
//! One bounded channel sits between the source task and the publishing
//! loop; when the backend is slow the channel fills and the source stops
//! reading. Publishing retries with backoff until it succeeds, so a backend
//! outage delays updates but loses none. A checkpoint is saved only after
//! the publisher has flushed everything before it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, CheckpointError};
use crate::config::{Config, SourceConfig};
use crate::keymap::KeyLayout;
use crate::mapper::Mapper;
use crate::pubsub::{PubSub, PublishError, Publisher};
use crate::retry::Reconnect;
use crate::source::etcd::EtcdSource;
use crate::source::redis::RedisSource;
use crate::source::{SourceError, SourceEvent};
use crate::stats::Stats;
use crate::update::DbUpdate;

/// How often the checkpoint file is rewritten at most; bounds the replay
/// after a crash to about this much traffic.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Keys the bridge writes itself and must never republish.
pub const OWN_PREFIXES: [&str; 2] = ["/pubsub/", "/publisher/"];

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
}

/// Runs the bridge until `shutdown` fires, then publishes what is in flight
/// (within `bridge.shutdown_timeout`), saves the final checkpoint and returns.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), BridgeError> {
    let publisher = PubSub::new(config.backend.clone()).get_publisher().await?;
    let (layout, topic_field, checkpoint_file) = match &config.source {
        SourceConfig::Etcd(c) => (&c.layout, &c.topic_field, c.checkpoint_file.clone()),
        SourceConfig::Redis(c) => (&c.layout, &c.topic_field, None),
    };
    let mapper = Mapper::new(
        KeyLayout::parse(layout).expect("validated config"),
        Some(topic_field.clone()).filter(|f| !f.is_empty()),
        config.bridge.max_value_bytes,
        OWN_PREFIXES.iter().map(|p| p.to_string()).collect(),
    );
    let resume = match &checkpoint_file {
        Some(p) => checkpoint::load(p)?,
        None => None,
    };

    let (tx, rx) = mpsc::channel(config.bridge.queue_capacity);
    let source_stop = shutdown.child_token();
    let source = match config.source.clone() {
        SourceConfig::Etcd(c) => tokio::spawn(EtcdSource::new(c, resume).run(tx, source_stop)),
        SourceConfig::Redis(c) => tokio::spawn(RedisSource::new(c).run(tx, source_stop)),
    };

    // After shutdown, in-flight updates get `shutdown_timeout` to go out.
    let give_up = CancellationToken::new();
    {
        let (shutdown, give_up, grace) = (
            shutdown.clone(),
            give_up.clone(),
            config.bridge.shutdown_timeout,
        );
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            give_up.cancel();
        });
    }

    let mut pipeline = Pipeline {
        publisher: publisher.clone(),
        mapper,
        stats,
        checkpoint_file,
        published_revision: None,
        saved_revision: resume,
        last_save: Instant::now(),
        reconnect: Reconnect::new("publisher"),
        give_up: give_up.clone(),
    };
    let drained = pipeline.drain(rx).await;
    let source_result = source.await.unwrap_or_else(|e| {
        Err(SourceError {
            source_name: "bridge",
            message: format!("source task failed: {e}"),
        })
    });
    if drained {
        pipeline.save_checkpoint(true).await?;
    } else {
        tracing::warn!("Shutdown timeout reached with updates unpublished; they will be replayed from the last checkpoint.");
    }
    let _ = publisher.close().await;
    give_up.cancel();
    source_result?;
    Ok(())
}

struct Pipeline {
    publisher: Arc<dyn Publisher>,
    mapper: Mapper,
    stats: Arc<Stats>,
    checkpoint_file: Option<std::path::PathBuf>,
    published_revision: Option<i64>,
    saved_revision: Option<i64>,
    last_save: Instant,
    reconnect: Reconnect,
    give_up: CancellationToken,
}

impl Pipeline {
    /// Publishes every event until the source ends; `false` when it had to
    /// give up at the shutdown deadline.
    async fn drain(&mut self, mut rx: mpsc::Receiver<SourceEvent>) -> bool {
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
                    if let Err(e) = self.save_checkpoint(false).await {
                        tracing::error!(error = %e, "Cannot save the checkpoint; will retry.");
                    }
                    continue;
                }
            };
            let Some(event) = event else { return true };
            let ok = match event {
                SourceEvent::Change(change) => {
                    Stats::incr(&self.stats.changes_read);
                    match self.mapper.map(&change) {
                        Ok(update) => self.publish(&update).await,
                        Err(skip) => {
                            self.stats.skip(skip, &change.key);
                            true
                        }
                    }
                }
                SourceEvent::Sync(reason) => {
                    tracing::warn!(%reason, "Publishing a sync notice: subscribers should re-read their state.");
                    Stats::incr(&self.stats.syncs_published);
                    self.publish(&DbUpdate::sync(reason)).await
                }
                SourceEvent::Checkpoint(revision) => {
                    self.published_revision = Some(revision);
                    if let Err(e) = self.save_checkpoint(false).await {
                        tracing::error!(error = %e, "Cannot save the checkpoint; will retry.");
                    }
                    true
                }
            };
            if !ok {
                return false;
            }
        }
    }

    /// Publishes with retries; `false` only when giving up at shutdown.
    async fn publish(&mut self, update: &DbUpdate) -> bool {
        loop {
            match self.publisher.send_event(update, None).await {
                Ok(()) => {
                    self.reconnect.up();
                    Stats::incr(&self.stats.updates_published);
                    return true;
                }
                Err(e) => {
                    Stats::incr(&self.stats.publish_errors);
                    if matches!(e, PublishError::Closed)
                        || !self.reconnect.down(&e, &self.give_up).await
                    {
                        return false;
                    }
                }
            }
        }
    }

    /// Saves the published revision when due (or `now`), after flushing the
    /// publisher so the file never runs ahead of what subscribers can get.
    async fn save_checkpoint(&mut self, now: bool) -> Result<(), CheckpointError> {
        let Some(revision) = self.published_revision else {
            return Ok(());
        };
        self.stats
            .checkpoint_revision
            .store(revision.max(0) as u64, Relaxed);
        let Some(path) = &self.checkpoint_file else {
            return Ok(());
        };
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
        checkpoint::save(path, revision)?;
        self.saved_revision = Some(revision);
        self.last_save = Instant::now();
        tracing::debug!(revision, "Checkpoint saved.");
        Ok(())
    }
}
