//! Change sources: [`etcd`] (watch) and [`redis`] (keyspace notifications).
//! A source only produces [`SourceEvent`]s into a bounded channel; when the
//! channel is full it stops reading, and the database keeps the data.

pub mod etcd;
pub mod redis;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mapper::Change;

/// What a source hands to the pipeline, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// One key changed.
    Change(Change),
    /// An update that is already made (from the multiproc channel).
    Update(crate::update::DbUpdate),
    /// Every change up to and including this revision has been emitted
    /// before this event: once it is published, it may be checkpointed.
    Checkpoint(i64),
    /// The source may have lost changes it cannot replay one by one;
    /// subscribers should re-read their state. Published as a `sync` update.
    Sync(String),
}

/// The source was told to stop, or the pipeline went away.
#[derive(Debug)]
pub(crate) struct Stopped;

/// Hands one event to the pipeline, unless shutdown comes first.
pub(crate) async fn emit(
    tx: &mpsc::Sender<SourceEvent>,
    shutdown: &CancellationToken,
    event: SourceEvent,
) -> Result<(), Stopped> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(Stopped),
        sent = tx.send(event) => sent.map_err(|_| Stopped),
    }
}

/// A source that cannot start; the message says what to check.
#[derive(Debug, thiserror::Error)]
#[error("{source_name} source: {message}")]
pub struct SourceError {
    /// `etcd` or `redis`.
    pub source_name: &'static str,
    /// What failed and what to do.
    pub message: String,
}
