//! Reading back etcd's own history: the changes under the source's prefix
//! after a revision, for a subscriber whose gap reaches further back than
//! the bridge's replay buffer (issue 21: repair from history, re-read only
//! past compaction).
//!
//! A watch from `after + 1` delivers the prefix's events in revision order,
//! but etcd never says "that was all": before 3.4.24 / 3.5.8 a progress
//! request is answered at once with the current revision, ahead of the
//! history still being sent, and a revision without events in the prefix
//! sends nothing. So every read ends at an *anchor*: a revision at which
//! the caller knows the prefix had an event (one it published). Everything
//! before the anchor has arrived once the anchor's own events have.

use std::time::Duration;

use etcd_client::{Client, WatchOptions};

use super::etcd::{change_of, in_history};
use crate::config::EtcdSourceConfig;
use crate::db::etcd::{connect, prefix_end, watch_client};
use crate::mapper::Change;

/// Where a history read ends: the revision of an event known to be under
/// the prefix, and whether that revision's own changes are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The revision of a known event.
    pub revision: i64,
    /// Take the changes at `revision` too (else only those before it).
    pub inclusive: bool,
}

/// Why a history read has no answer; `Compacted` is the `410 Gone` case.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// etcd no longer keeps the revisions asked for.
    #[error("etcd compacted its history to revision {0}")]
    Compacted(i64),
    /// More changes (or bytes of them) than one answer carries.
    #[error("more than {0} since then")]
    TooMany(String),
    /// The read did not end in time.
    #[error("etcd's history was not read within {0:?}")]
    Timeout(Duration),
    /// etcd could not be reached or refused the watch.
    #[error("cannot read etcd's history: {0}")]
    Etcd(String),
}

/// Reads the source prefix's history, on a connection of its own (made at
/// the first read and kept).
pub struct HistoryReader {
    config: EtcdSourceConfig,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for HistoryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryReader")
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl HistoryReader {
    /// A reader of the history under `config.prefix`.
    pub fn new(config: EtcdSourceConfig) -> Self {
        HistoryReader {
            config,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The changes after revision `after`, in order, up to `until`; at most
    /// `limit` of them and `max_bytes` of their keys and values; within
    /// `deadline`.
    pub async fn changes(
        &self,
        after: i64,
        until: Anchor,
        (limit, max_bytes): (usize, usize),
        deadline: Duration,
    ) -> Result<Vec<Change>, HistoryError> {
        if after + 1 > until.revision || (after + 1 == until.revision && !until.inclusive) {
            return Ok(Vec::new());
        }
        let read = async {
            let client = self.client().await?;
            let result = read(
                client,
                self.config.prefix.as_bytes(),
                after,
                until,
                (limit, max_bytes),
            )
            .await;
            if matches!(result, Err(HistoryError::Etcd(_))) {
                *self.client.lock().await = None; // a new connection next time
            }
            result
        };
        tokio::time::timeout(deadline, read)
            .await
            .unwrap_or(Err(HistoryError::Timeout(deadline)))
    }

    async fn client(&self) -> Result<Client, HistoryError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let c = &self.config;
        let client = connect(&c.endpoints, c.connect_timeout, &c.auth)
            .await
            .map_err(|e| HistoryError::Etcd(e.to_string()))?;
        *slot = Some(client.clone());
        Ok(client)
    }
}

/// How long the check that the read's start is still in etcd's history
/// may take (the read itself is bounded by its caller's deadline).
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

async fn read(
    client: Client,
    prefix: &[u8],
    after: i64,
    until: Anchor,
    (limit, max_bytes): (usize, usize),
) -> Result<Vec<Change>, HistoryError> {
    let etcd = |e: etcd_client::Error| HistoryError::Etcd(e.to_string());
    let opts = WatchOptions::new()
        .with_range(prefix_end(prefix))
        .with_start_revision(after + 1)
        .with_prev_key()
        .with_fragment();
    let mut watcher = watch_client(&client);
    let mut stream = watcher
        .watch(prefix.to_vec(), Some(opts))
        .await
        .map_err(etcd)?;
    let mut changes = Vec::new();
    let mut bytes = 0;
    loop {
        let Some(mut response) = stream.message().await.map_err(etcd)? else {
            return Err(HistoryError::Etcd("the watch stream closed".into()));
        };
        if response.canceled() {
            return Err(match response.compact_revision() {
                c if c > 0 => HistoryError::Compacted(c),
                _ => HistoryError::Etcd(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                )),
            });
        }
        let fragment = response.0.fragment;
        let mut reached = false;
        for event in std::mem::take(&mut response.0.events) {
            let Some(change) = change_of(event) else {
                continue;
            };
            let revision = change.revision.unwrap_or(i64::MAX);
            reached |= revision >= until.revision;
            if revision > until.revision || (revision == until.revision && !until.inclusive) {
                continue;
            }
            bytes += change.key.len() + change.value.as_ref().map_or(0, Vec::len);
            if changes.len() == limit {
                return Err(HistoryError::TooMany(format!("{limit} changes")));
            }
            if bytes > max_bytes {
                return Err(HistoryError::TooMany(format!(
                    "{max_bytes} bytes of changes"
                )));
            }
            changes.push(change);
        }
        // The anchor's revision may span fragments: done after its last.
        // Unless a compaction has passed the start since: etcd before
        // 3.4.31 / 3.5.13 may then have moved the watch on without the
        // notice, leaving a hole (etcd-io/etcd#17529). No compaction past
        // it now means none before either.
        if reached && !fragment {
            let mut client = client;
            return match in_history(&mut client, prefix, after + 1, CHECK_TIMEOUT).await {
                Ok(true) => Ok(changes),
                Ok(false) => Err(HistoryError::Compacted(after + 1)),
                Err(e) => Err(etcd(e)),
            };
        }
    }
}
