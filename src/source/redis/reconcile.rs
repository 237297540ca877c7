//! Reconciliation and the diff: SCAN every followed master, read what
//! differs from the index of what subscribers were sent, and emit the
//! missed create / set / delete.

use std::hash::BuildHasher;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::notes::Notes;
use super::reads::{read_values, Read};
use super::sentinels::SENTINEL_PREFIX;
use super::state::{Ended, RedisSource, BATCH};
use super::topology::Topology;
use crate::mapper::{Change, ChangeKind};
use crate::source::{emit, KeySet, SourceEvent};

/// Seed of [`fingerprint`]: fixed, so runs are reproducible.
pub(super) const FINGERPRINT_SEED: u64 = 0x6665_6564_6272_6964; // "feedbrid"

/// 64 bits standing for a value in the index: a new value is published
/// when its fingerprint differs (a collision, 2^-64, would hide a change).
pub(super) fn fingerprint(value: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(FINGERPRINT_SEED).hash_one(value)
}

/// Escapes glob characters so a literal prefix can go in a MATCH pattern.
pub(super) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisSource {
    /// SCANs every followed master for the layout's keys and emits what
    /// differs from the index (`emit_diff` false: only builds the index, on
    /// a first start without snapshot). A known key the scans did not see
    /// is read before it is called deleted: on a cluster it may have moved
    /// to another node meanwhile (slot migration), and a read follows it.
    pub(super) async fn reconcile(
        &mut self,
        topo: &mut Topology,
        pattern_prefix: &str,
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
        emit_diff: bool,
        notes: &mut Notes,
    ) -> Result<(), Ended> {
        let mut seen = KeySet::with_capacity_and_hasher(self.index.len(), Default::default());
        let mut emitted = 0u64;
        for m in 0..topo.masters.len() {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{pattern_prefix}*"))
                    .arg("COUNT")
                    .arg(self.config.scan_count)
                    .query_async(&mut topo.masters[m].2)
                    .await?;
                let keys: Vec<Vec<u8>> = keys
                    .into_iter()
                    .filter(|k| !k.starts_with(SENTINEL_PREFIX.as_bytes()) && self.follows(k))
                    .collect();
                seen.extend(keys.iter().cloned());
                emitted += self
                    .read_and_diff(topo, &keys, tx, shutdown, emit_diff)
                    .await?;
                // What was notified meanwhile waits as keys, not messages.
                self.drain(notes);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let unseen: Vec<Vec<u8>> = self
            .index
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        emitted += self
            .read_and_diff(topo, &unseen, tx, shutdown, emit_diff)
            .await?;
        tracing::info!(keys = self.index.len(), emitted, "Reconciled Redis keys.");
        self.restart_sentinel_clocks();
        Ok(())
    }

    /// Reads `keys` (in batches) and emits each change against the index,
    /// when `emit`; returns how many there were.
    pub(super) async fn read_and_diff(
        &mut self,
        topo: &mut Topology,
        keys: &[Vec<u8>],
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
        emit_changes: bool,
    ) -> Result<u64, Ended> {
        let mut emitted = 0;
        for chunk in keys.chunks(BATCH) {
            let reads = read_values(topo, chunk).await?;
            for (key, read) in chunk.iter().zip(reads) {
                if let Some(change) = self.diff(key.clone(), read) {
                    if emit_changes {
                        emitted += 1;
                        emit(tx, shutdown, SourceEvent::Change(change)).await?;
                    }
                }
            }
        }
        Ok(emitted)
    }

    /// The change implied by reading `key` now, given what was emitted
    /// before; the index takes it at once, so it counts as handed over
    /// until a position confirms it ([`RedisSource::confirm`]).
    pub(super) fn diff(&mut self, key: Vec<u8>, read: Read) -> Option<Change> {
        let change = self.diff_index(key, read);
        self.unconfirmed |= change.is_some();
        change
    }

    fn diff_index(&mut self, key: Vec<u8>, read: Read) -> Option<Change> {
        let value = match read {
            Read::Value(v) => v,
            Read::Unsupported(kind) => {
                if self.unsupported_logged.insert(kind.clone()) {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), %kind, "Ignoring keys of this type: only string and hash values are published.");
                }
                return self.index.remove(&key).map(|_| Change {
                    key,
                    value: None,
                    kind: ChangeKind::Delete,
                    revision: None,
                });
            }
            Read::Gone => {
                return self.index.remove(&key).map(|_| Change {
                    key,
                    value: None,
                    kind: ChangeKind::Delete,
                    revision: None,
                });
            }
        };
        let kind = match self.index.insert(key.clone(), fingerprint(&value)) {
            None => ChangeKind::Create,
            Some(old) if old == fingerprint(&value) => return None,
            Some(_) => ChangeKind::Set,
        };
        Some(Change {
            key,
            value: Some(value),
            kind,
            revision: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::redis::test_source;

    #[test]
    fn escapes_globs() {
        assert_eq!(glob_escape("{a*b?[c]}\\"), "{a\\*b\\?\\[c\\]}\\\\");
    }

    #[test]
    fn diff_follows_state() {
        let mut s = test_source();
        let k = b"{t.}k".to_vec();
        let kind = |c: Option<Change>| c.map(|c| c.kind);
        assert_eq!(kind(s.diff(k.clone(), Read::Gone)), None);
        assert_eq!(
            kind(s.diff(k.clone(), Read::Value(b"1".to_vec()))),
            Some(ChangeKind::Create)
        );
        assert_eq!(kind(s.diff(k.clone(), Read::Value(b"1".to_vec()))), None);
        assert_eq!(
            kind(s.diff(k.clone(), Read::Value(b"2".to_vec()))),
            Some(ChangeKind::Set)
        );
        assert_eq!(
            kind(s.diff(k.clone(), Read::Unsupported("list".into()))),
            Some(ChangeKind::Delete)
        );
        assert_eq!(kind(s.diff(k.clone(), Read::Gone)), None);
    }
}
