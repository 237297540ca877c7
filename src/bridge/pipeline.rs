//! The publishing loop: takes what the sources queued, maps it, publishes
//! it in batches with retries, and saves the checkpoint once everything
//! before it is out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::checkpoints::Checkpoints;
use crate::backend::replay::ReplayBuffer;
use crate::backend::Positions;
use crate::checkpoint::CheckpointError;
use crate::ha::Leadership;
use crate::mapper::{Mapped, Mapper};
use crate::pubsub::{PublishError, Publisher};
use crate::retry::Reconnect;
use crate::source::SourceEvent;
use crate::stats::Stats;
use crate::update::DbUpdate;

/// How often the checkpoint is rewritten at most; bounds the replay after
/// a crash to about this much traffic.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// At a graceful stop, how long the final checkpoint waits for a heartbeat
/// to announce the last position (heartbeats go out every 500 ms).
const FINAL_ANNOUNCEMENT_WAIT: Duration = Duration::from_millis(1500);

/// Updates handed to the publisher at once when the queue holds more.
const MAX_BATCH: usize = 256;

/// Where the current run of updates started in the batch, and where they
/// were read from (`None`: not counted as read, e.g. a sync).
type Run = (usize, Option<&'static str>);

pub(super) struct Pipeline {
    /// Under HA: publishing stops the moment this is no longer valid.
    pub(super) lead: Option<Arc<Leadership>>,
    pub(super) source_name: &'static str,
    pub(super) publisher: Arc<dyn Publisher>,
    pub(super) mapper: Mapper,
    pub(super) stats: Arc<Stats>,
    pub(super) checkpoints: Checkpoints,
    /// The last attempt to save the checkpoint failed (logged once).
    pub(super) checkpoint_failing: bool,
    pub(super) published_revision: Option<i64>,
    /// Announced by the publisher's heartbeats; caps the checkpoint.
    pub(super) positions: Arc<Positions>,
    /// What was published recently, for subscribers' gaps.
    pub(super) replay: Option<Arc<std::sync::Mutex<ReplayBuffer>>>,
    pub(super) saved_revision: Option<i64>,
    pub(super) last_save: Instant,
    pub(super) reconnect: Reconnect,
    pub(super) give_up: CancellationToken,
}

impl Pipeline {
    /// Publishes every event until the source ends; when it had to give up
    /// (the shutdown deadline, or leadership lost), how many updates were
    /// left unpublished.
    pub(super) async fn drain(&mut self, mut rx: mpsc::Receiver<SourceEvent>) -> Result<(), usize> {
        let mut batch: Vec<DbUpdate> = Vec::with_capacity(MAX_BATCH);
        let drained = self.drain_into(&mut rx, &mut batch).await;
        self.stats.pipeline_ended();
        if drained {
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
            self.stats.pipeline_beat();
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
            // Reads are counted per run of updates of one origin, not one
            // label lookup per update.
            let mut run: Run = (batch.len(), None);
            let mut checkpoint = None;
            while let Some(event) = next.take() {
                match event {
                    SourceEvent::Change(mut change) => match self.mapper.map(&mut change) {
                        Mapped::Update(update) => {
                            self.count_reads(batch, &mut run, Some(self.source_name));
                            batch.push(update);
                        }
                        Mapped::Resync(update, skip) => {
                            self.count_reads(batch, &mut run, None);
                            self.stats.skip(skip, &change.key);
                            self.stats.syncs_published.inc();
                            batch.push(update);
                        }
                        Mapped::Skip(skip) => self.stats.skip(skip, &change.key),
                    },
                    SourceEvent::Update(update) => {
                        self.count_reads(batch, &mut run, Some("multiproc"));
                        batch.push(update);
                    }
                    SourceEvent::Sync(reason) => {
                        self.count_reads(batch, &mut run, None);
                        tracing::warn!(%reason, "Publishing a sync notice: subscribers should re-read their state.");
                        self.stats.syncs_published.inc();
                        batch.push(DbUpdate::sync(reason));
                    }
                    // Everything before it is in the batch: once the batch
                    // is out, this revision is published. Publishing waits
                    // for the batch to fill (or the queue to empty), so a
                    // backend that is slower than the source gets whole
                    // batches, not one watch response at a time.
                    SourceEvent::Checkpoint(revision) => checkpoint = Some(revision),
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.count_reads(batch, &mut run, None);
            self.stats
                .queue_depth
                .set((rx.max_capacity() - rx.capacity()) as i64);
            if !self.publish(batch).await {
                return false;
            }
            if rx.is_empty() {
                self.stats.caught_up();
            }
            if let Some(revision) = checkpoint.take() {
                self.published_revision = Some(revision);
                self.positions.published(revision);
                if let Some(replay) = &self.replay {
                    replay
                        .lock()
                        .expect("replay buffer lock")
                        .published(revision);
                }
                self.try_checkpoint().await;
            }
        }
    }

    /// Ends the current run of updates read from one origin (counting them
    /// at once) when the next update's `origin` differs.
    fn count_reads(&self, batch: &[DbUpdate], run: &mut Run, origin: Option<&'static str>) {
        if run.1 == origin {
            return;
        }
        if let Some(source) = run.1 {
            self.stats.read_batch(source, batch[run.0..].iter());
        }
        *run = (batch.len(), origin);
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
            self.stats.pipeline_beat();
            if self.lead.as_ref().is_some_and(|l| !l.is_valid()) {
                return false; // a deposed leader must not publish
            }
            match self.publisher.send_batch(batch).await {
                Ok(()) => {
                    self.reconnect.up();
                    self.stats.published(batch);
                    // The buffer keeps the published updates themselves:
                    // moved, not copied.
                    match &self.replay {
                        Some(replay) => replay
                            .lock()
                            .expect("replay buffer lock")
                            .record(batch.drain(..)),
                        None => batch.clear(),
                    }
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
    pub(super) async fn save_checkpoint(&mut self, now: bool) -> Result<(), CheckpointError> {
        let Some(published) = self.published_revision else {
            return Ok(());
        };
        self.stats.checkpoint_revision.set(published);
        // Where heartbeats announce positions, the checkpoint never passes
        // one a subscriber has had a heartbeat interval to hear: a run that
        // resumes from it then starts at or before every subscriber's
        // position, and they need no re-read. At a graceful stop, the final
        // position is announced first.
        let revision = if self.positions.announcing() {
            if now {
                self.positions
                    .announced(published, FINAL_ANNOUNCEMENT_WAIT)
                    .await;
            }
            match self.positions.safe(now) {
                Some(safe) => safe.min(published),
                // The first checkpoint is saved at once (see below).
                None if self.saved_revision.is_none() => published,
                None => return Ok(()),
            }
        } else {
            published
        };
        if !self.checkpoints.is_kept() {
            return Ok(());
        }
        // The first checkpoint is saved at once: until one exists, a
        // restart would start from "now" and skip what is in flight.
        let due =
            now || self.saved_revision.is_none() || self.last_save.elapsed() >= CHECKPOINT_INTERVAL;
        if self.saved_revision == Some(revision) || !due {
            return Ok(());
        }
        if self.publisher.flush().await.is_err() {
            return Ok(()); // closed: keep the older checkpoint, replay is safe
        }
        self.checkpoints.save(revision).await?;
        self.saved_revision = Some(revision);
        self.last_save = Instant::now();
        tracing::debug!(revision, "Checkpoint saved.");
        Ok(())
    }
}
