//! The etcd source: list-then-watch on a prefix, like a Kubernetes
//! reflector.
//!
//! It lists the prefix at a revision (building an index of key → mod
//! revision), then watches from the next revision with `prev_kv` and
//! progress notifications. A dropped stream resumes from the last revision
//! handed to the pipeline. When the resume revision was compacted away, it
//! re-lists at the current revision, diffs against the index and emits the
//! missed create / set / delete before watching on: never a silent restart.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{emit, KeyIndex, KeySet, SourceError, SourceEvent, Stopped};
use std::sync::Arc;

use crate::checkpoint;
use crate::config::EtcdSourceConfig;
use crate::db::etcd::{connect, kv_client, prefix_end, watch_client};
use crate::mapper::{Change, ChangeKind};
use crate::retry::Reconnect;

/// How often the watch asks etcd for its progress.
const PROGRESS_REQUEST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long the watch may hear nothing (its progress requests unanswered)
/// before the stream is taken for dead and resumed on a new connection.
const WATCH_SILENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The watch id etcd answers a progress request with (`InvalidWatchID`).
const REQUESTED_PROGRESS: i64 = -1;
use crate::stats::Stats;

/// Bytes a list page aims at: pages are bounded by bytes as well as keys,
/// sized from the average key-value size of the page before.
const LIST_PAGE_BYTES: usize = 2 << 20;

/// Keys in a list page at most, and in the first page that reads values
/// (its size is not known yet).
const LIST_PAGE_MAX_KEYS: i64 = 1000;
const LIST_FIRST_VALUE_PAGE: i64 = 16;

/// The size of the next list page: as many keys as fit [`LIST_PAGE_BYTES`]
/// at the average size of the page just read.
fn next_page_limit(bytes: usize, keys: usize) -> i64 {
    if keys == 0 {
        return LIST_PAGE_MAX_KEYS;
    }
    let average = (bytes / keys).max(1);
    ((LIST_PAGE_BYTES / average) as i64).clamp(1, LIST_PAGE_MAX_KEYS)
}

/// One key as listed.
struct Listed {
    key: Vec<u8>,
    value: Vec<u8>,
    mod_revision: i64,
    version: i64,
}

/// What a list read: the keys, the revision they were read at, and etcd's
/// head revision when the list began.
type ListResult = (Vec<Listed>, i64, i64);

/// Lists every key under `prefix` at `revision` (0: the current one), page
/// by page.
async fn list(
    client: &mut Client,
    prefix: &[u8],
    revision: i64,
    page_timeout: Duration,
    values: bool,
) -> Result<ListResult, etcd_client::Error> {
    let end = prefix_end(prefix);
    let mut start = prefix.to_vec();
    let mut at = revision;
    let mut head = 0;
    let mut out = Vec::new();
    let mut kv = kv_client(client);
    let mut limit = if values {
        LIST_FIRST_VALUE_PAGE
    } else {
        LIST_PAGE_MAX_KEYS
    };
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
        if !values {
            // Only the index is wanted: keys and revisions, not the values.
            opts = opts.with_keys_only();
        }
        if at > 0 {
            opts = opts.with_revision(at);
        }
        let mut resp = tokio::time::timeout(page_timeout, kv.get(start.clone(), Some(opts)))
            .await
            .map_err(|_| {
                etcd_client::Error::WatchError(format!(
                    "list page timed out after {page_timeout:?}"
                ))
            })??;
        if head == 0 {
            head = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        if at == 0 {
            at = head;
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        let Some(last) = kvs.last() else { break };
        start = last.key().to_vec();
        start.push(0);
        let bytes: usize = kvs.iter().map(|kv| kv.key().len() + kv.value().len()).sum();
        limit = next_page_limit(bytes, kvs.len());
        out.extend(kvs.into_iter().map(|kv| {
            let (mod_revision, version) = (kv.mod_revision(), kv.version());
            let (key, value) = kv.into_key_value();
            Listed {
                key,
                value,
                mod_revision,
                version,
            }
        }));
        if !more {
            break;
        }
    }
    Ok((out, at, head))
}

/// etcd refused the request itself (permissions, credentials, a bad
/// argument): trying again cannot help.
fn is_refusal(e: &etcd_client::Error) -> bool {
    // gRPC status codes (tonic's `Code` as numbers: tonic is not a direct
    // dependency): INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED.
    const REFUSALS: [i32; 3] = [3, 7, 16];
    matches!(e, etcd_client::Error::GRpcStatus(s) if REFUSALS.contains(&i32::from(s.code())))
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    e.to_string().contains("compacted")
}

/// Whether etcd still holds `revision` in its history, i.e. no compaction
/// has passed it. One point read at that revision: etcd refuses it when
/// the revision is compacted, before looking at any key.
pub(super) async fn in_history(
    client: &mut Client,
    key: &[u8],
    revision: i64,
    timeout: Duration,
) -> Result<bool, etcd_client::Error> {
    let opts = GetOptions::new()
        .with_revision(revision)
        .with_keys_only()
        .with_limit(1);
    match tokio::time::timeout(timeout, kv_client(client).get(key.to_vec(), Some(opts))).await {
        Err(_) => Err(etcd_client::Error::WatchError(format!(
            "the history check timed out after {timeout:?}"
        ))),
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) if is_compacted(&e) => Ok(false),
        // Not written yet: nothing before it can have been compacted.
        Ok(Err(e)) if e.to_string().contains("future revision") => Ok(true),
        Ok(Err(e)) => Err(e),
    }
}

/// The etcd source.
pub struct EtcdSource {
    config: EtcdSourceConfig,
    /// Revision to resume from (the last checkpoint), if any.
    resume_from: Option<i64>,
    /// key → mod revision of every key the subscribers know of.
    index: KeyIndex<i64>,
    /// Whether `index` is exactly what subscribers know (false after a
    /// resume whose revision was already compacted).
    index_complete: bool,
    /// The revision `index` reflects.
    indexed_revision: i64,
    /// After a resume from a checkpoint: etcd's head revision then. An
    /// earlier run (or the HA member before this one) may have published
    /// past the checkpoint, up to here, so subscribers may know rows the
    /// index does not until this run has read that far.
    resumed_head: i64,
    stats: Arc<Stats>,
    /// Prefixes of the bridge's own keys (checkpoint, pub/sub, election):
    /// a response holding only those is no reason for a new checkpoint,
    /// else saving one would wake the source to save another.
    own_prefixes: Vec<Vec<u8>>,
}

impl EtcdSource {
    /// Tells the source which keys are the bridge's own.
    pub fn with_own_prefixes(mut self, prefixes: Vec<String>) -> Self {
        self.own_prefixes = prefixes.into_iter().map(String::into_bytes).collect();
        self
    }

    /// A source that starts fresh, or resumes after `checkpoint`.
    pub fn new(config: EtcdSourceConfig, checkpoint: Option<i64>, stats: Arc<Stats>) -> Self {
        EtcdSource {
            config,
            resume_from: checkpoint,
            index: KeyIndex::default(),
            index_complete: true,
            indexed_revision: 0,
            resumed_head: 0,
            stats,
            own_prefixes: Vec::new(),
        }
    }

    /// Runs until `shutdown`; fails only when etcd cannot be reached at
    /// the process's start, or refuses the list (later outages, and one
    /// during the first list, are retried with backoff).
    pub async fn run(
        mut self,
        tx: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let endpoints = crate::config::redact_endpoints(&self.config.endpoints);
        let fail = |message: String| SourceError {
            source_name: "etcd",
            message: format!(
                "{message} (endpoints {endpoints}; is etcd running? check source.endpoints)"
            ),
        };
        let prefix = self.config.prefix.clone().into_bytes();
        let mut reconnect = Reconnect::new("etcd source").with_state(self.stats.source.clone());
        // Unreachable at the process's start: a clear error (a wrong
        // endpoint, etcd not running). Once reached (connected in this run,
        // or in an earlier HA term), an outage while connecting or listing
        // (etcd restarting) is retried like any later one, never an exit;
        // a refusal (permissions) stays an error.
        let mut reached = self.stats.source.reached();
        let (mut client, mut next) = loop {
            let error = match tokio::time::timeout(
                self.config.connect_timeout,
                connect(
                    &self.config.endpoints,
                    self.config.connect_timeout,
                    &self.config.auth,
                ),
            )
            .await
            {
                Err(_) => "connect timed out".to_string(),
                Ok(Err(e)) => format!("cannot connect: {e}"),
                Ok(Ok(mut client)) => {
                    reached = true;
                    tracing::debug!("Connected to etcd; listing the prefix.");
                    match self.start(&mut client, &prefix, &tx, &shutdown).await {
                        Ok(next) => break (client, next),
                        Err(StartError::Stopped) => {
                            self.index_complete = false; // stopped half-way: do not save it
                            self.save_index();
                            return Ok(());
                        }
                        Err(StartError::Etcd(e)) if is_refusal(&e) => {
                            return Err(fail(format!("initial list refused: {e}")))
                        }
                        Err(StartError::Etcd(e)) => format!("initial list failed: {e}"),
                    }
                }
            };
            if !reached {
                return Err(fail(error));
            }
            if !reconnect.down(&error, &shutdown).await {
                return Ok(());
            }
        };
        reconnect.up();
        self.follow(
            &mut client,
            &prefix,
            &mut next,
            &tx,
            &shutdown,
            &mut reconnect,
        )
        .await;
        self.save_index();
        Ok(())
    }

    /// Watches, re-watches and re-lists until shutdown.
    async fn follow(
        &mut self,
        client: &mut Client,
        prefix: &[u8],
        next: &mut i64,
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
        reconnect: &mut Reconnect,
    ) {
        loop {
            let end = self
                .watch(client, prefix, *next, tx, shutdown, reconnect)
                .await;
            if shutdown.is_cancelled() {
                return;
            }
            let error = match end {
                Ok(WatchEnd::Stopped) => return,
                Ok(WatchEnd::Gap(gap)) => {
                    *next = gap.resume_revision(&self.stats);
                    match self.resync(client, prefix, *next, tx, shutdown).await {
                        Ok(n) => {
                            *next = n;
                            continue;
                        }
                        Err(StartError::Stopped) => {
                            self.index_complete = false; // stopped half-way
                            return;
                        }
                        Err(StartError::Etcd(e)) => e,
                    }
                }
                Err((n, e)) => {
                    tracing::debug!(resume = n, error = %e, "The watch ended.");
                    *next = n;
                    e
                }
            };
            if !reconnect.down(&error, shutdown).await {
                return;
            }
        }
    }

    /// Where the index is saved at shutdown: beside the checkpoint.
    fn index_file(&self) -> Option<std::path::PathBuf> {
        self.config
            .checkpoint_file
            .as_ref()
            .map(|p| p.with_extension("index"))
    }

    /// Saves the index at shutdown, so that a restart whose checkpoint was
    /// compacted away can still tell which keys were deleted meanwhile. It
    /// is only used when its revision equals the checkpoint's.
    fn save_index(&self) {
        let Some(path) = self.index_file() else {
            return;
        };
        if !self.index_complete {
            let _ = std::fs::remove_file(&path);
            return;
        }
        match checkpoint::save_index(&path, self.indexed_revision, &self.index) {
            Ok(()) => {
                tracing::info!(revision = self.indexed_revision, keys = self.index.len(), path = %path.display(), "Saved the key index.")
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot save the key index; a restart after compaction will ask subscribers to re-sync.")
            }
        }
    }

    /// Lists the prefix (at the checkpoint when resuming), emits the
    /// snapshot if asked, and returns the revision to watch from.
    async fn start(
        &mut self,
        client: &mut Client,
        prefix: &[u8],
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
    ) -> Result<i64, StartError> {
        if let Some(checkpoint) = self.resume_from {
            match list(
                client,
                prefix,
                checkpoint,
                self.config.connect_timeout,
                false,
            )
            .await
            {
                Ok((kvs, _, head)) => {
                    self.resumed_head = head;
                    self.index = kvs
                        .into_iter()
                        .map(|kv| (kv.key, kv.mod_revision))
                        .collect();
                    tracing::info!(
                        checkpoint,
                        keys = self.index.len(),
                        "Resuming from checkpoint."
                    );
                    self.indexed_revision = checkpoint;
                    return Ok(checkpoint + 1);
                }
                Err(e) if is_compacted(&e) => {
                    match self
                        .index_file()
                        .map(|p| checkpoint::load_index(&p, checkpoint))
                    {
                        Some(Ok(Some(index))) => {
                            tracing::warn!(checkpoint, keys = index.len(), "Checkpoint revision was compacted; diffing against the index saved at shutdown.");
                            self.index = index;
                        }
                        other => {
                            if let Some(Err(e)) = other {
                                tracing::warn!(error = %e, "Cannot read the saved index.");
                            }
                            tracing::warn!(checkpoint, "Checkpoint revision was compacted and no index of that revision was saved (the bridge was killed); re-listing and asking subscribers to re-sync.");
                            self.index_complete = false;
                        }
                    }
                    return self
                        .resync(client, prefix, checkpoint + 1, tx, shutdown)
                        .await;
                }
                Err(e) => return Err(StartError::Etcd(e)),
            }
        }
        self.index.clear(); // a list that failed half-way is listed again
        let (kvs, at, _) = list(
            client,
            prefix,
            0,
            self.config.connect_timeout,
            self.config.snapshot,
        )
        .await?;
        tracing::info!(
            revision = at,
            keys = kvs.len(),
            snapshot = self.config.snapshot,
            "Listed the prefix; watching from the next revision."
        );
        for kv in kvs {
            self.index.insert(kv.key.clone(), kv.mod_revision);
            if self.config.snapshot {
                let change = Change {
                    key: kv.key,
                    value: Some(kv.value),
                    kind: ChangeKind::Create,
                    revision: Some(kv.mod_revision),
                };
                emit(tx, shutdown, SourceEvent::Change(change)).await?;
            }
        }
        self.indexed_revision = at;
        emit(tx, shutdown, SourceEvent::Checkpoint(at)).await?;
        Ok(at + 1)
    }

    /// Re-lists at the current revision and emits what differs from the
    /// index: creates, sets, and deletes of keys that are gone. The
    /// revisions from `unread` (the first one this source could not read)
    /// to the re-list's arrive as their difference: each row's state at
    /// the re-list, not the intermediate revisions etcd no longer has. The
    /// log line says which window that was (the nemesis' checker reads it).
    async fn resync(
        &mut self,
        client: &mut Client,
        prefix: &[u8],
        unread: i64,
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
    ) -> Result<i64, StartError> {
        let (kvs, at, _) = list(client, prefix, 0, self.config.connect_timeout, true).await?;
        // The difference is taken against the index: it tells a subscriber
        // of every row that changed, was created or was deleted, provided
        // the subscriber knew no row the index does not. Not so when the
        // index is incomplete, nor when the window reaches back into what
        // an earlier run may have published past its checkpoint: a row
        // it created there and that is gone now would get no delete.
        let reason = if !self.index_complete {
            Some(format!("etcd history before revision {at} was compacted"))
        } else if unread <= self.resumed_head {
            Some(format!(
                "etcd history before revision {at} was compacted before this run had re-read what the run before it may have published (up to revision {})",
                self.resumed_head
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            emit(tx, shutdown, SourceEvent::Sync(reason)).await?;
        }
        let mut seen = KeySet::with_capacity_and_hasher(kvs.len(), Default::default());
        let (mut created, mut set, mut deleted) = (0u64, 0u64, 0u64);
        for kv in kvs {
            seen.insert(kv.key.clone());
            let kind = match self.index.get(&kv.key) {
                Some(&r) if r == kv.mod_revision => continue,
                Some(_) => ChangeKind::Set,
                None if kv.version == 1 || self.index_complete => ChangeKind::Create,
                None => ChangeKind::Set,
            };
            match kind {
                ChangeKind::Create => created += 1,
                _ => set += 1,
            }
            self.index.insert(kv.key.clone(), kv.mod_revision);
            let change = Change {
                key: kv.key,
                value: Some(kv.value),
                kind,
                revision: Some(kv.mod_revision),
            };
            emit(tx, shutdown, SourceEvent::Change(change)).await?;
        }
        for key in super::remove_unseen(&mut self.index, &seen) {
            deleted += 1;
            let change = Change {
                key,
                value: None,
                kind: ChangeKind::Delete,
                revision: Some(at),
            };
            emit(tx, shutdown, SourceEvent::Change(change)).await?;
        }
        self.index_complete = true;
        tracing::info!(
            revision = at,
            coalesced_from = unread,
            created,
            set,
            deleted,
            "Re-list complete: what changed since the last revision read arrived as its difference; watching on."
        );
        self.indexed_revision = at;
        emit(tx, shutdown, SourceEvent::Checkpoint(at)).await?;
        Ok(at + 1)
    }

    /// Whether the watch may move past `next`: etcd still holds it, so no
    /// compaction can have made the watch skip it (see `Gap::Skipped`).
    async fn still_in_history(
        &self,
        client: &mut Client,
        prefix: &[u8],
        next: i64,
    ) -> Result<bool, (i64, etcd_client::Error)> {
        in_history(client, prefix, next, self.config.connect_timeout)
            .await
            .map_err(|e| (next, e))
    }

    /// Watches from `from` until the stream ends. Returns the revision to
    /// resume from with the error that ended it.
    async fn watch(
        &mut self,
        client: &mut Client,
        prefix: &[u8],
        from: i64,
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
        reconnect: &mut Reconnect,
    ) -> Result<WatchEnd, (i64, etcd_client::Error)> {
        let mut next = from;
        // Fragmented: etcd splits a response larger than its request
        // limit (a delete-range of many large values with their previous
        // values) into several; a revision is complete at the last one.
        let opts = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(from)
            .with_prev_key()
            .with_progress_notify()
            .with_fragment();
        let mut watcher = watch_client(client);
        let mut stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(WatchEnd::Stopped),
            s = watcher.watch(prefix.to_vec(), Some(opts)) => s.map_err(|e| (next, e))?,
        };
        // Liveness, and an honest lag: etcd answers a progress request even
        // on an idle prefix, so hearing nothing means the connection or the
        // member is gone, whatever TCP believes.
        let mut ask = tokio::time::interval(PROGRESS_REQUEST_INTERVAL);
        ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        loop {
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(WatchEnd::Stopped),
                m = stream.message() => m.map_err(|e| (next, e))?,
                _ = ask.tick() => {
                    if heard.elapsed() > WATCH_SILENCE_TIMEOUT {
                        let why = format!("no answer from etcd for {:.1} s", heard.elapsed().as_secs_f64());
                        return Err((next, etcd_client::Error::WatchError(why)));
                    }
                    // A stalled connection may not take even the request.
                    if let Ok(sent) = tokio::time::timeout(PROGRESS_REQUEST_INTERVAL, stream.request_progress()).await {
                        sent.map_err(|e| (next, e))?;
                    }
                    continue;
                }
            };
            heard = tokio::time::Instant::now();
            self.stats.source_heard();
            if let Some(h) = message.as_ref().and_then(|r| r.header()) {
                self.stats.source_revision.set(h.revision());
            }
            if message
                .as_ref()
                .is_some_and(|r| r.watch_id() == REQUESTED_PROGRESS)
            {
                // The answer to a progress request: liveness only. It is
                // not taken as a checkpoint (etcd before 3.4.24 / 3.5.8
                // could send it ahead of events still to come).
                continue;
            }
            let Some(mut resp) = message else {
                return Err((
                    next,
                    etcd_client::Error::WatchError("watch stream closed by the server".into()),
                ));
            };
            if resp.created() {
                reconnect.up();
                tracing::debug!(
                    from,
                    revision = resp.header().map(|h| h.revision()),
                    "Watch created."
                );
            }
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Ok(WatchEnd::Gap(Gap::Compacted {
                        resume: next,
                        at: resp.compact_revision(),
                    }));
                }
                let reason = format!("etcd cancelled the watch: {}", resp.cancel_reason());
                return Err((next, etcd_client::Error::WatchError(reason)));
            }
            let events = resp.events();
            if events.is_empty() {
                // A progress notification: everything up to the header's
                // revision has been sent, so it can be checkpointed.
                if !resp.created() {
                    if let Some(rev) = resp.header().map(|h| h.revision()) {
                        if rev >= next {
                            if !self.still_in_history(client, prefix, next).await? {
                                return Ok(WatchEnd::Gap(Gap::Skipped {
                                    resume: next,
                                    to: rev + 1,
                                }));
                            }
                            tracing::debug!(
                                from = next,
                                to = rev + 1,
                                "A progress notification moved the resume revision."
                            );
                            next = rev + 1;
                            self.indexed_revision = rev;
                            if tx.send(SourceEvent::Checkpoint(rev)).await.is_err() {
                                return Ok(WatchEnd::Stopped);
                            }
                        }
                    }
                }
                continue;
            }
            // Revisions between the resume revision and this response's
            // first one may hold no key of the prefix, or may have been
            // skipped by etcd (see `Gap::Skipped`).
            let first = events
                .first()
                .and_then(|e| e.kv())
                .map_or(next, |kv| kv.mod_revision());
            if first > next && !self.still_in_history(client, prefix, next).await? {
                return Ok(WatchEnd::Gap(Gap::Skipped {
                    resume: next,
                    to: first,
                }));
            }
            let mut last = next - 1;
            let only_own_keys = events.iter().all(|e| {
                e.kv()
                    .is_some_and(|kv| self.own_prefixes.iter().any(|p| kv.key().starts_with(p)))
            });
            let fragment = resp.0.fragment;
            tracing::trace!(
                events = events.len(),
                first,
                last = events
                    .last()
                    .and_then(|e| e.kv())
                    .map(|kv| kv.mod_revision()),
                header = resp.header().map(|h| h.revision()),
                fragment,
                next,
                "Watch response."
            );
            // The response's events are taken, not copied: key and value
            // move into the change.
            for event in std::mem::take(&mut resp.0.events) {
                let Some(change) = change_of(event) else {
                    continue;
                };
                let revision = change.revision.unwrap_or_default();
                if change.kind == ChangeKind::Delete {
                    self.index.remove(&change.key);
                } else {
                    self.index.insert(change.key.clone(), revision);
                }
                last = last.max(revision);
                self.indexed_revision = last;
                // Plain sends, not `emit`: at shutdown the current response
                // is still handed over whole, so the final checkpoint is the
                // last published revision. The pipeline drains until this
                // source ends, and drops the receiver if it gives up.
                if tx.send(SourceEvent::Change(change)).await.is_err() {
                    return Ok(WatchEnd::Stopped);
                }
            }
            if fragment {
                // More of this revision follows: not a checkpoint yet, and a
                // re-watch must start at this revision again.
                next = last;
                continue;
            }
            next = last + 1;
            if only_own_keys {
                continue;
            }
            if tx.send(SourceEvent::Checkpoint(last)).await.is_err() {
                return Ok(WatchEnd::Stopped);
            }
        }
    }
}

/// The change a watch event makes: key and value move into it; a delete
/// carries the previous value when etcd sent it.
pub(super) fn change_of(event: etcd_client::proto::PbEvent) -> Option<Change> {
    let kv = event.kv?;
    let revision = Some(kv.mod_revision);
    Some(if event.r#type == EventType::Delete as i32 {
        Change {
            key: kv.key,
            value: event.prev_kv.map(|p| p.value),
            kind: ChangeKind::Delete,
            revision,
        }
    } else {
        Change {
            key: kv.key,
            value: Some(kv.value),
            kind: if kv.version == 1 {
                ChangeKind::Create
            } else {
                ChangeKind::Set
            },
            revision,
        }
    })
}

enum WatchEnd {
    Stopped,
    /// The watch cannot go on from where it was: re-list.
    Gap(Gap),
}

/// Why a watch ended on a gap in etcd's history.
enum Gap {
    /// etcd cancelled the watch: `resume`, the first revision not read
    /// yet, was compacted (at `at`).
    Compacted { resume: i64, at: i64 },
    /// The watch moved on (to `to`) past `resume`, a revision no longer in
    /// etcd's history. etcd before 3.4.31 / 3.5.13 (etcd-io/etcd#17529)
    /// does this to a watcher that fell behind past a compaction while its
    /// stream was full: instead of the compaction notice, it jumps to the
    /// head and every change in between is lost without a word. Whether a
    /// jump hid changes cannot be told from the stream, so a jump from a
    /// compacted revision is handled as the notice would be: re-list and
    /// emit the difference.
    Skipped { resume: i64, to: i64 },
}

impl Gap {
    /// Logs the gap and returns the first revision not read (where the
    /// re-list's window starts).
    fn resume_revision(&self, stats: &Stats) -> i64 {
        match *self {
            Gap::Compacted { resume, at } => {
                tracing::warn!(
                    resume_revision = resume,
                    compact_revision = at,
                    "Resume revision was compacted; re-listing and emitting the difference."
                );
                resume
            }
            Gap::Skipped { resume, to } => {
                stats.source_skips_caught.inc();
                tracing::warn!(
                    resume_revision = resume,
                    moved_to = to,
                    "etcd moved the watch past revisions it has compacted without saying so (etcd before 3.4.31 / 3.5.13, etcd-io/etcd#17529); re-listing and emitting the difference."
                );
                resume
            }
        }
    }
}

enum StartError {
    Stopped,
    Etcd(etcd_client::Error),
}

impl From<Stopped> for StartError {
    fn from(_: Stopped) -> Self {
        StartError::Stopped
    }
}

impl From<etcd_client::Error> for StartError {
    fn from(e: etcd_client::Error) -> Self {
        StartError::Etcd(e)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn list_pages_are_bounded_by_bytes() {
        use super::{next_page_limit, LIST_PAGE_MAX_KEYS};
        assert_eq!(next_page_limit(0, 0), LIST_PAGE_MAX_KEYS);
        assert_eq!(next_page_limit(100 * 16, 100), LIST_PAGE_MAX_KEYS);
        assert_eq!(
            next_page_limit(4 * 1_200_000, 4),
            1,
            "1.2 MB values: one a page"
        );
        assert_eq!(next_page_limit(10 * 8192, 10), 256);
    }
}
