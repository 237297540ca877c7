//! Pausing when behind: redis-rs queues notifications without limit, so a
//! source that cannot hand its changes over (publishing stuck) or reads
//! its notifications late (short of CPU) lets go of them and reconciles
//! once it can keep up: each changed key once, with its newest value.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::notes::Notes;
use super::state::{Ended, RedisSource};
use crate::mapper::Change;
use crate::source::{reserve, SourceEvent, Stopped};

/// How long the pipeline may stay full before the source lets go of its
/// notifications (at 80,000 changes/s, about 16 MB of them queue meanwhile).
pub(super) const BEHIND_AFTER: Duration = Duration::from_secs(1);

/// Waits until the pipeline's queue is at most half full.
pub(super) async fn wait_for_room(
    tx: &mpsc::Sender<SourceEvent>,
    shutdown: &CancellationToken,
) -> Result<(), Stopped> {
    while tx.capacity() < tx.max_capacity() / 2 {
        if tx.is_closed() {
            return Err(Stopped);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(Stopped),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    Ok(())
}

impl RedisSource {
    /// Counts and logs letting go of the notifications (see [`Ended::Behind`]).
    pub(super) fn pause(&self, why: &str) {
        self.stats.source_paused.inc();
        tracing::warn!(why, "The Redis source is behind; unsubscribing until publishing has room, then reconciling (no change is lost; memory stays bounded).");
    }

    /// Hands `change` to the pipeline. While publishing has no room,
    /// notifications keep arriving: they are noted as keys meanwhile
    /// (redis-rs would queue them as messages, without limit). If it has
    /// had no room for [`BEHIND_AFTER`] (backend down), the source lets go
    /// of its subscriptions; the index already counts this change, so it
    /// is still handed over, and the rest is left to the reconciliation.
    pub(super) async fn hand_over(
        &mut self,
        change: Change,
        notes: &mut Notes,
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
    ) -> Result<(), Ended> {
        let deadline = tokio::time::Instant::now() + BEHIND_AFTER;
        loop {
            tokio::select! {
                biased;
                permit = reserve(tx, shutdown) => {
                    permit?.send(SourceEvent::Change(change));
                    return Ok(());
                }
                m = futures_util::StreamExt::next(&mut notes.stream), if !notes.ended => match m.flatten() {
                    Some(m) => self.note(notes, m),
                    None => notes.ended = true,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    notes.let_go();
                    self.pause("publishing has had no room for a second");
                    reserve(tx, shutdown).await?.send(SourceEvent::Change(change));
                    return Err(Ended::Behind);
                }
            }
        }
    }
}
