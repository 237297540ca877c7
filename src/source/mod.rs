//! Change sources: [`etcd`] (watch) and [`redis`] (keyspace notifications).
//! A source only produces [`SourceEvent`]s into a bounded channel; when the
//! channel is full it stops reading, and the database keeps the data.

pub mod etcd;
pub mod etcd_history;
pub mod redis;

use std::collections::{HashMap, HashSet};

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
    reserve(tx, shutdown).await?.send(event);
    Ok(())
}

/// A slot in the pipeline's queue, unless shutdown comes first.
pub(crate) async fn reserve<'a>(
    tx: &'a mpsc::Sender<SourceEvent>,
    shutdown: &CancellationToken,
) -> Result<mpsc::Permit<'a, SourceEvent>, Stopped> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(Stopped),
        permit = tx.reserve() => permit.map_err(|_| Stopped),
    }
}

/// What a source knows per key (etcd: the mod revision; Redis: a value
/// fingerprint). Hashed with foldhash, randomly seeded per process: SipHash
/// cost more than the rest of the index update for every change.
pub(crate) type KeyIndex<V> = HashMap<Vec<u8>, V, foldhash::fast::RandomState>;

/// A set of keys, hashed like [`KeyIndex`].
pub(crate) type KeySet = HashSet<Vec<u8>, foldhash::fast::RandomState>;

/// Removes from `index` every key a re-list did not `seen`, and returns
/// them: the keys deleted while the source was not watching.
pub(crate) fn remove_unseen<V>(index: &mut KeyIndex<V>, seen: &KeySet) -> Vec<Vec<u8>> {
    let mut gone = Vec::new();
    index.retain(|key, _| {
        let keep = seen.contains(key);
        if !keep {
            gone.push(key.clone());
        }
        keep
    });
    gone
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

#[cfg(test)]
mod tests {
    use super::{KeyIndex, KeySet};

    #[test]
    fn remove_unseen_returns_exactly_the_missing_keys() {
        let mut index: KeyIndex<i64> = [(b"a".to_vec(), 1), (b"b".to_vec(), 2), (b"c".to_vec(), 3)]
            .into_iter()
            .collect();
        let seen: KeySet = [b"b".to_vec()].into_iter().collect();
        let mut gone = super::remove_unseen(&mut index, &seen);
        gone.sort();
        assert_eq!(gone, vec![b"a".to_vec(), b"c".to_vec()]);
        assert_eq!(index.keys().collect::<Vec<_>>(), vec![&b"b".to_vec()]);
    }
}
