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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{emit, reserve, KeyIndex, KeySet, SourceError, SourceEvent};
use crate::config::RedisSourceConfig;
use crate::db::redis::{
    connect, connect_node, explain, in_slots, redacted, slot, Conn, Node, SLOTS,
};
use crate::keymap::KeyLayout;
use crate::mapper::{Change, ChangeKind};
use crate::retry::Reconnect;
use crate::stats::Stats;
use std::sync::Arc;

/// The notification classes the source needs: K keyspace, g generic (del,
/// rename, expire), $ string, h hash, x expired, e evicted, n new key.
pub const NEEDED_FLAGS: &str = "Kg$hxen";

/// Keys read per pipelined round trip.
const BATCH: usize = 512;

/// FLUSHDB, FLUSHALL and SWAPDB emit no per-key notification. The source
/// keeps a sentinel key of its own in the database and checks it this
/// often (one GET + SET round trip); when it is gone or not its own, the
/// database was flushed or swapped, and a full reconciliation emits the
/// deletes (and creates) that followed.
const SENTINEL_INTERVAL: Duration = Duration::from_secs(1);

/// The sentinel outlives a dead bridge by this long at most.
const SENTINEL_TTL_SECONDS: u64 = 30;

/// Prefix of the sentinel keys (one per running source).
pub const SENTINEL_PREFIX: &str = "__feedbridge_sentinel__:";

/// Reads a key's type and value in one call, for keys a plain GET cannot
/// read (hashes, other types), so a key that changes type in between
/// cannot confuse us.
const READ_SCRIPT: &str = "local t = redis.call('TYPE', KEYS[1])['ok'] \
if t == 'string' then return {t, redis.call('GET', KEYS[1])} end \
if t == 'hash' then return {t, redis.call('HGETALL', KEYS[1])} end \
return {t}";

/// A key as read after its notification.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Gone,
    Value(Vec<u8>),
    /// A type the bridge does not publish (list, set, zset, stream).
    Unsupported(String),
}

/// Which flags of `NEEDED_FLAGS` the setting `current` lacks (`A` stands
/// for `g$lshzxet`).
pub fn missing_flags(current: &str) -> String {
    let expanded = current.replace('A', "g$lshzxet");
    NEEDED_FLAGS
        .chars()
        .filter(|c| !expanded.contains(*c))
        .collect()
}

/// Seed of [`fingerprint`]: fixed, so runs are reproducible.
const FINGERPRINT_SEED: u64 = 0x6665_6564_6272_6964; // "feedbrid"

/// 64 bits standing for a value in the index: a new value is published
/// when its fingerprint differs (a collision, 2^-64, would hide a change).
fn fingerprint(value: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(FINGERPRINT_SEED).hash_one(value)
}

/// How long the pipeline may stay full before the source lets go of its
/// notifications (at 80,000 changes/s, about 16 MB of them queue meanwhile).
const BEHIND_AFTER: Duration = Duration::from_secs(1);

/// How late notifications may be read (measured with the sentinel's own)
/// before the source lets go of them and reconciles instead.
const NOTIFICATION_DELAY_MAX: Duration = Duration::from_secs(2);

/// Waits until the pipeline's queue is at most half full.
async fn wait_for_room(
    tx: &mpsc::Sender<SourceEvent>,
    shutdown: &CancellationToken,
) -> Result<(), super::Stopped> {
    while tx.capacity() < tx.max_capacity() / 2 {
        if tx.is_closed() {
            return Err(super::Stopped);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(super::Stopped),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    Ok(())
}

/// Escapes glob characters so a literal prefix can go in a MATCH pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn parse_read(v: Value) -> Read {
    let Value::Array(mut parts) = v else {
        return Read::Gone;
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    let kind = parts.first().map(text).unwrap_or_default();
    match (kind.as_str(), parts.len()) {
        ("string", 2) => match parts.pop() {
            Some(Value::BulkString(b)) => Read::Value(b),
            _ => Read::Gone,
        },
        ("hash", 2) => match parts.pop() {
            Some(Value::Array(fields)) => hash_value(&fields),
            _ => Read::Gone,
        },
        ("none", _) | ("", _) => Read::Gone,
        (other, _) => Read::Unsupported(other.to_owned()),
    }
}

/// A hash as the JSON object of its fields. A field or value that is not
/// UTF-8 is never altered: the raw bytes are returned instead (not UTF-8
/// either), so the mapper treats the hash like any undecodable value.
fn hash_value(fields: &[Value]) -> Read {
    let bytes = |v: &Value| match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        _ => Vec::new(),
    };
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = fields
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (bytes(&c[0]), bytes(&c[1])))
        .collect();
    if pairs.is_empty() {
        return Read::Gone;
    }
    let mut map = BTreeMap::new();
    for (field, value) in &pairs {
        match (std::str::from_utf8(field), std::str::from_utf8(value)) {
            (Ok(f), Ok(v)) => {
                map.insert(f, v);
            }
            _ => {
                return Read::Value(
                    pairs
                        .iter()
                        .flat_map(|(f, v)| [f, v])
                        .flatten()
                        .copied()
                        .collect(),
                )
            }
        }
    }
    Read::Value(serde_json::to_vec(&map).expect("strings serialize"))
}

async fn read_values(conn: &mut Conn, keys: &[Vec<u8>]) -> redis::RedisResult<Vec<Read>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // Fast path: plain GETs (string keys, the common case, cost Redis no
    // more than any keyspace consumer), one pipeline on a standalone server;
    // on a cluster one command per key, sent at once and pipelined per node
    // by the connection, each following MOVED / ASK to the key's owner. A
    // key of another type answers WRONGTYPE; only those are read again with
    // the type-aware script.
    let values: Vec<Option<Value>> = match conn {
        Conn::Single(_) => {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for k in keys {
                pipe.cmd("GET").arg(k);
            }
            let values: Vec<Value> = pipe.query_async(&mut *conn).await?;
            values
                .into_iter()
                .map(|v| match v {
                    Value::BulkString(_) | Value::Nil => Some(v),
                    _ => None,
                })
                .collect()
        }
        Conn::Cluster(_) => {
            let gets = keys.iter().map(|k| {
                let mut c = conn.clone();
                async move { redis::cmd("GET").arg(k).query_async::<Value>(&mut c).await }
            });
            let mut values = Vec::with_capacity(keys.len());
            for v in futures_util::future::join_all(gets).await {
                match v {
                    Ok(v) => values.push(Some(v)),
                    Err(e) if e.code() == Some("WRONGTYPE") => values.push(None),
                    Err(e) => return Err(e),
                }
            }
            values
        }
    };
    let mut reads = Vec::with_capacity(keys.len());
    let mut typed = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        match v {
            Some(Value::BulkString(b)) => reads.push(Read::Value(b)),
            Some(_) => reads.push(Read::Gone),
            None => {
                reads.push(Read::Gone);
                typed.push(i);
            }
        }
    }
    for i in typed {
        let v: Value = redis::cmd("EVAL")
            .arg(READ_SCRIPT)
            .arg(1)
            .arg(&keys[i])
            .query_async(conn)
            .await?;
        reads[i] = parse_read(v);
    }
    Ok(reads)
}

/// One session's end: lost (retry with backoff), the cluster's masters
/// changed (start again at once), or stopped (return).
enum Ended {
    Stopped,
    Lost(String),
    Topology,
    /// The pipeline stayed full: the notifications were let go of.
    Behind,
}

impl From<redis::RedisError> for Ended {
    fn from(e: redis::RedisError) -> Self {
        Ended::Lost(e.to_string())
    }
}

impl From<super::Stopped> for Ended {
    fn from(_: super::Stopped) -> Self {
        Ended::Stopped
    }
}

/// The Redis source.
pub struct RedisSource {
    config: RedisSourceConfig,
    /// key → fingerprint of the value subscribers were last sent.
    index: KeyIndex<u64>,
    unsupported_logged: HashSet<String>,
    stats: Arc<Stats>,
    /// Taking over from another leader (HA): what it published is unknown.
    takeover: bool,
    /// This source's sentinel key and its value (see [`SENTINEL_INTERVAL`]).
    sentinel: (String, String),
    /// The sentinel cannot be written (read-only user): flushes are
    /// detected by the key count instead.
    sentinel_refused: bool,
    /// The hash slots followed (`source.slots`; all by default).
    slots: Vec<(u16, u16)>,
    /// Sentinel SETs whose keyspace notification has not come back yet,
    /// by sentinel key: when each was sent. The oldest one's age is how far
    /// behind the notifications are read (see [`NOTIFICATION_DELAY_MAX`]).
    sentinel_sent: HashMap<Vec<u8>, VecDeque<Instant>>,
}

/// What one session follows: the data connection (a standalone server or
/// the whole cluster) and, for each master owning followed slots, a client
/// (its notifications) and a direct connection (SCAN, DBSIZE).
struct Topology {
    data: Conn,
    /// Every node, replicas too.
    nodes: Vec<Node>,
    masters: Vec<(Node, redis::Client, MultiplexedConnection)>,
}

/// One session's keyspace notifications (every followed master's, merged;
/// each stream ends with a `None`, so a dropped node ends the session) and
/// the keys they named that are still to be read. redis-rs queues what
/// arrives without limit until it is taken, so the session takes it often
/// (between batches, and between the pages of a reconciliation) into
/// `dirty`, where a key is held once however often it changes: memory is
/// bounded by the keys, not by the rate.
struct Notes {
    stream: futures_util::stream::SelectAll<
        futures_util::stream::BoxStream<'static, Option<redis::Msg>>,
    >,
    /// `__keyspace@<db>__:`
    channel_prefix: Vec<u8>,
    /// Keys to read, in the order they were first named...
    dirty: std::collections::VecDeque<Vec<u8>>,
    /// ...and the same keys, to hold each once.
    queued: KeySet,
    /// A stream ended: a node's notification connection closed.
    ended: bool,
}

impl Notes {
    /// Up to `n` keys to read, oldest first.
    fn take(&mut self, n: usize) -> Vec<Vec<u8>> {
        let n = n.min(self.dirty.len());
        let keys: Vec<Vec<u8>> = self.dirty.drain(..n).collect();
        for k in &keys {
            self.queued.remove(k);
        }
        keys
    }
}

/// Whether `node` is a master owning any of the followed `slots`.
fn followed(node: &Node, slots: &[(u16, u16)]) -> bool {
    node.master
        && node
            .slots
            .iter()
            .any(|&(a, b)| slots.iter().any(|&(c, d)| a <= d && c <= b))
}

/// The masters that own any of the followed slots, by address.
fn followed_masters(nodes: &[Node], slots: &[(u16, u16)]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| followed(n, slots))
        .map(|n| n.addr.clone())
        .collect()
}

/// `prefix{tag}suffix` with a hash tag whose slot is in `slots`, so the key
/// lives on the node serving them.
fn key_in_slots(prefix: &str, slots: &[(u16, u16)], suffix: &str) -> String {
    let tag = (0u32..)
        .map(|i| format!("fb{i}"))
        .find(|tag| slots.is_empty() || in_slots(slot(tag.as_bytes()), slots))
        .expect("some tag hashes into any non-empty range");
    format!("{prefix}{{{tag}}}{suffix}")
}

impl RedisSource {
    /// A source for one Redis database.
    pub fn new(config: RedisSourceConfig, stats: Arc<Stats>) -> Self {
        let slots = config
            .slot_ranges()
            .unwrap_or_else(|_| vec![(0, SLOTS - 1)]);
        RedisSource {
            slots,
            config,
            index: KeyIndex::default(),
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

    /// Refreshes the sentinels (one per followed master, each a key in
    /// that master's slots); `true` when one had vanished or been replaced
    /// since the last check: that database was flushed or swapped. Without
    /// write permission, a key count below the keys known to exist says the
    /// same (weaker: a refill before the check hides it).
    async fn flushed(&mut self, topo: &mut Topology) -> redis::RedisResult<bool> {
        let token = self.sentinel.1.clone();
        if !self.sentinel_refused {
            let mut flushed = false;
            for (node, _, _) in &topo.masters {
                let key = key_in_slots(&self.sentinel.0, &node.slots, &token);
                let sent = Instant::now();
                let result: redis::RedisResult<(Option<String>, ())> = redis::pipe()
                    .cmd("GET")
                    .arg(&key)
                    .cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("EX")
                    .arg(SENTINEL_TTL_SECONDS)
                    .query_async(&mut topo.data)
                    .await;
                match result {
                    Ok((found, ())) => {
                        flushed |= found.as_deref() != Some(token.as_str());
                        self.sentinel_sent
                            .entry(key.into_bytes())
                            .or_default()
                            .push_back(sent);
                    }
                    Err(e) if e.is_io_error() || e.is_connection_dropped() => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot write the sentinel key that reveals FLUSHDB / FLUSHALL / SWAPDB; falling back to the key count, which a quick refill can hide. Allow SET on keys {SENTINEL_PREFIX}* for this user.");
                        self.sentinel_refused = true;
                        break;
                    }
                }
            }
            if !self.sentinel_refused {
                return Ok(flushed);
            }
        }
        let mut size = 0usize;
        for (_, _, conn) in &mut topo.masters {
            size += redis::cmd("DBSIZE").query_async::<usize>(conn).await?;
        }
        Ok(size < self.index.len())
    }

    /// A sentinel's notification came back: its SET is no longer pending.
    fn sentinel_notified(&mut self, key: &[u8]) {
        if let Some(sent) = self.sentinel_sent.get_mut(key) {
            sent.pop_front();
        }
    }

    /// How long the oldest sentinel SET has waited for its notification:
    /// the delay of everything notified after it, queued unread.
    fn notification_delay(&self) -> Duration {
        self.sentinel_sent
            .values()
            .filter_map(|sent| sent.front())
            .map(|t| t.elapsed())
            .max()
            .unwrap_or_default()
    }

    /// A reconciliation just ended: notifications queued while it ran are
    /// its own delay, not a backlog the reading cannot catch up with.
    fn restart_sentinel_clocks(&mut self) {
        let now = Instant::now();
        for t in self.sentinel_sent.values_mut().flatten() {
            *t = now;
        }
    }

    /// Counts and logs letting go of the notifications (see [`Ended::Behind`]).
    fn pause(&self, why: &str) {
        self.stats.source_paused.inc();
        tracing::warn!(why, "The Redis source is behind; unsubscribing until publishing has room, then reconciling (no change is lost; memory stays bounded).");
    }

    /// Whether this bridge follows `key` (its slot is in `source.slots`).
    fn follows(&self, key: &[u8]) -> bool {
        self.slots == [(0, SLOTS - 1)] || in_slots(slot(key), &self.slots)
    }

    /// Connects for one session: the data connection (standalone, or the
    /// whole cluster), every node, and a direct connection to each master
    /// that owns followed slots.
    async fn topology(&self, client: &redis::Client) -> Result<Topology, String> {
        let timeout = self.config.connect_timeout;
        let mut data = connect(client, timeout).await?;
        let nodes = crate::db::redis::nodes(&mut data, &crate::db::redis::addr_of(client))
            .await
            .map_err(|e| explain(&e))?;
        let mut masters = Vec::new();
        for node in nodes.iter().filter(|n| followed(n, &self.slots)) {
            let node_client = if data.is_cluster() {
                crate::db::redis::node_client(client, &node.addr)?
            } else {
                client.clone()
            };
            let conn = connect_node(&node_client, timeout)
                .await
                .map_err(|e| format!("master {}: {e}", node.addr))?;
            masters.push((node.clone(), node_client, conn));
        }
        if data.is_cluster() && masters.is_empty() {
            return Err("no master of the cluster serves the followed slots (source.slots)".into());
        }
        Ok(Topology {
            data,
            nodes,
            masters,
        })
    }

    /// Makes sure keyspace notifications are on for every node: masters,
    /// and replicas too (they become masters at a failover). An unreachable
    /// replica is only warned about.
    async fn ensure_all(&self, client: &redis::Client, topo: &mut Topology) -> Result<(), String> {
        for (node, node_client, conn) in &mut topo.masters {
            self.ensure_notifications(node_client, conn, &node.slots)
                .await
                .map_err(|e| format!("node {}: {e}", node.addr))?;
        }
        if !topo.data.is_cluster() {
            return Ok(());
        }
        for node in topo.nodes.iter().filter(|n| !n.master) {
            let result = async {
                let c = crate::db::redis::node_client(client, &node.addr)?;
                let mut conn = connect_node(&c, self.config.connect_timeout).await?;
                self.ensure_notifications(&c, &mut conn, &node.slots).await
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(node = %node.addr, error = %e, "Cannot check keyspace notifications on this replica; after it becomes a master the source checks again.");
            }
        }
        Ok(())
    }

    /// Marks a start that takes over from another (HA) leader: Redis keeps
    /// no history, so the first reconciliation publishes every key, after
    /// a `sync` for what may have been deleted meanwhile.
    pub fn taking_over(mut self) -> Self {
        self.takeover = true;
        self
    }

    /// Runs until `shutdown`. Fails at start-up when Redis cannot be reached
    /// or keyspace notifications cannot be enabled; later outages are
    /// retried with backoff and reconciled.
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
        // The first session uses these connections: no second round of
        // connecting to every master at start-up.
        let mut connected = Some(topo);
        let mut reconnect =
            Reconnect::new(format!("redis source {url}")).with_state(self.stats.source.clone());
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
                Ended::Stopped => return Ok(()),
                Ended::Topology => {
                    first = false;
                }
                Ended::Behind => {
                    first = false;
                    // Subscribe again only once publishing has room: until
                    // then nothing is buffered, and the reconciliation
                    // finds what changed meanwhile (each key once).
                    if wait_for_room(&tx, &shutdown).await.is_err() {
                        return Ok(());
                    }
                    tracing::info!("Publishing caught up; subscribing again and reconciling.");
                }
                Ended::Lost(e) => {
                    if shutdown.is_cancelled() || tx.is_closed() {
                        return Ok(());
                    }
                    first = false;
                    if !reconnect.down(&e, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn db(client: &redis::Client) -> i64 {
        client.get_connection_info().redis_settings().db()
    }

    /// Makes sure keyspace notifications carry what the source needs:
    /// enables them with CONFIG SET when allowed, else verifies them by
    /// writing a probe key, else says exactly which flags to set.
    async fn ensure_notifications(
        &self,
        client: &redis::Client,
        conn: &mut MultiplexedConnection,
        slots: &[(u16, u16)],
    ) -> Result<(), String> {
        let refuse = |why: String, missing: &str| {
            format!(
                "Redis keyspace notifications lack the classes feedbridge needs ({why}). \
                 Set `notify-keyspace-events {NEEDED_FLAGS}` (K keyspace, g generic, $ string, h hash, \
                 x expired, e evicted, n new key; missing here: {missing}) in redis.conf or your provider's \
                 settings, or allow CONFIG SET for this user"
            )
        };
        let current: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(conn)
            .await;
        match current {
            Ok(pair) if pair.len() == 2 => {
                let missing = missing_flags(&pair[1]);
                if missing.is_empty() {
                    return Ok(());
                }
                let wanted = format!("{}{}", pair[1], missing);
                let set: redis::RedisResult<()> = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("notify-keyspace-events")
                    .arg(&wanted)
                    .query_async(conn)
                    .await;
                match set {
                    Ok(()) => {
                        tracing::info!(was = %pair[1], now = %wanted, "Enabled Redis keyspace notifications.");
                        Ok(())
                    }
                    Err(e) => Err(refuse(format!("CONFIG SET refused: {e}"), &missing)),
                }
            }
            Ok(_) | Err(_) => {
                // CONFIG is renamed away or not allowed (managed Redis, ACL):
                // check by observation.
                match self.probe_notifications(client, conn, slots).await {
                    Ok(()) => {
                        tracing::info!("CONFIG is not available; a probe key showed keyspace notifications are on (expired/evicted cannot be verified this way).");
                        Ok(())
                    }
                    Err(missing) => Err(refuse(
                        "CONFIG is not available and a probe key produced no notifications".into(),
                        &missing,
                    )),
                }
            }
        }
    }

    /// Writes and deletes a probe key and waits for its `new`, `set`,
    /// `hset` and `del` notifications. Returns the flags not observed.
    async fn probe_notifications(
        &self,
        client: &redis::Client,
        conn: &mut MultiplexedConnection,
        slots: &[(u16, u16)],
    ) -> Result<(), String> {
        if slots.is_empty() {
            return Err(NEEDED_FLAGS.to_owned()); // a replica: nothing to write to
        }
        // A key this node serves (on a cluster, any other key is MOVED).
        let key = key_in_slots(
            "__feedbridge_probe__:",
            slots,
            &std::process::id().to_string(),
        );
        let mut pubsub = client
            .get_async_pubsub()
            .await
            .map_err(|_| NEEDED_FLAGS.to_owned())?;
        pubsub
            .subscribe(format!("__keyspace@{}__:{key}", Self::db(client)))
            .await
            .map_err(|_| NEEDED_FLAGS.to_owned())?;
        let writes: redis::RedisResult<()> = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg("1")
            .ignore()
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .cmd("HSET")
            .arg(&key)
            .arg("f")
            .arg("1")
            .ignore()
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .query_async(conn)
            .await;
        writes.map_err(|_| NEEDED_FLAGS.to_owned())?;
        let mut seen = HashSet::new();
        let mut messages = pubsub.on_message();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while seen.len() < 4 {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(m)) => {
                    seen.insert(String::from_utf8_lossy(m.get_payload_bytes()).into_owned());
                }
                _ => break,
            }
        }
        let missing: String = [("new", 'n'), ("set", '$'), ("hset", 'h'), ("del", 'g')]
            .iter()
            .filter(|(event, _)| !seen.contains(*event))
            .map(|(_, flag)| *flag)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else if seen.is_empty() {
            Err(NEEDED_FLAGS.to_owned())
        } else {
            Err(missing)
        }
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
                None => self.topology(client).await.map_err(Ended::Lost)?,
            };
            if !first {
                // A restarted Redis forgot a CONFIG SET made at runtime, and
                // a promoted replica may never have had it.
                self.ensure_all(client, &mut topo).await.map_err(Ended::Lost)?;
            }
            let prefix = glob_escape(KeyLayout::parse(&self.config.layout).map(|l| l.prefix().to_owned()).unwrap_or_default().as_str());
            let channel_prefix = format!("__keyspace@{}__:", Self::db(client));
            // Keyspace notifications are local to the node that owns the
            // key: one subscription per master, merged. Each stream ends
            // with a `None`, so a dropped node ends the session.
            let mut streams = Vec::with_capacity(topo.masters.len());
            self.sentinel_sent.clear();
            for (_, node_client, _) in &topo.masters {
                let mut pubsub = node_client.get_async_pubsub().await?;
                pubsub.psubscribe(format!("{channel_prefix}{prefix}*")).await?;
                if !prefix.is_empty() {
                    // The sentinels' own notifications measure the delay.
                    pubsub.psubscribe(format!("{channel_prefix}{SENTINEL_PREFIX}*")).await?;
                }
                streams.push(
                    pubsub
                        .into_on_message()
                        .map(Some)
                        .chain(futures_util::stream::once(async { None }))
                        .boxed(),
                );
            }
            let mut notes = Notes {
                stream: futures_util::stream::select_all(streams),
                channel_prefix: channel_prefix.clone().into_bytes(),
                dirty: Default::default(),
                queued: KeySet::default(),
                ended: false,
            };
            // Subscribed first, so nothing that changes during the scan is missed.
            let emit_diff = !first || self.config.snapshot || self.takeover;
            if first && self.takeover {
                let reason = "a new leader took over; Redis keeps no history of what changed meanwhile";
                emit(tx, shutdown, SourceEvent::Sync(reason.into())).await?;
            }
            self.flushed(&mut topo).await?; // places the sentinels
            self.reconcile(&mut topo, &prefix, tx, shutdown, emit_diff, &mut notes).await?;
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
                            None => return Err(Ended::Lost("a node's notification connection closed".into())),
                        },
                    }
                } else if shutdown.is_cancelled() {
                    return Err(Ended::Stopped);
                } else {
                    check.tick().now_or_never().is_some()
                };
                if check_due {
                    let flushed = self.flushed(&mut topo).await?;
                    self.stats.source_heard();
                    if flushed {
                        tracing::warn!(db = Self::db(client), "The database was flushed or swapped (FLUSHDB / FLUSHALL / SWAPDB send no per-key notification); reconciling every key.");
                        self.stats.flushes_detected.inc();
                        self.reconcile(&mut topo, &prefix, tx, shutdown, true, &mut notes).await?;
                    }
                    // Reading slower than Redis notifies (short of CPU):
                    // the client's queue would grow without limit.
                    let delay = self.notification_delay();
                    if delay > NOTIFICATION_DELAY_MAX {
                        self.pause(&format!("keyspace notifications are read {} s late", delay.as_secs()));
                        return Err(Ended::Behind);
                    }
                    if topo.data.is_cluster() {
                        let nodes = crate::db::redis::nodes(&mut topo.data, "").await?;
                        if followed_masters(&nodes, &self.slots) != followed {
                            tracing::info!(was = ?followed, now = ?followed_masters(&nodes, &self.slots), "The cluster's masters changed (failover, or nodes added or removed); subscribing to the new ones and reconciling.");
                            return Err(Ended::Topology);
                        }
                    }
                    continue;
                }
                // Take whatever else already arrived, then read one batch of
                // keys in one round trip.
                self.drain(&mut notes);
                if notes.ended {
                    // The next session's reconciliation covers what is dirty.
                    return Err(Ended::Lost("a node's notification connection closed".into()));
                }
                let keys = notes.take(BATCH);
                let reads = read_values(&mut topo.data, &keys).await?;
                for (key, read) in keys.into_iter().zip(reads) {
                    if let Some(change) = self.diff(key, read) {
                        // While publishing has no room, notifications keep
                        // arriving: they are noted as keys meanwhile (redis-rs
                        // would queue them as messages, without limit). If
                        // it has had no room for a second (backend down),
                        // let go of the subscriptions; the index already
                        // counts this change, so it is still handed over, and
                        // the rest is left to the reconciliation.
                        let deadline = tokio::time::Instant::now() + BEHIND_AFTER;
                        let permit = loop {
                            tokio::select! {
                                biased;
                                permit = reserve(tx, shutdown) => break permit?,
                                m = notes.stream.next(), if !notes.ended => match m.flatten() {
                                    Some(m) => self.note(&mut notes, m),
                                    None => notes.ended = true,
                                },
                                _ = tokio::time::sleep_until(deadline) => {
                                    drop(notes);
                                    self.pause("publishing has had no room for a second");
                                    reserve(tx, shutdown).await?.send(SourceEvent::Change(change));
                                    return Err(Ended::Behind);
                                }
                            }
                        };
                        permit.send(SourceEvent::Change(change));
                    }
                }
            }
        }
        .await;
        match result {
            Ok(()) => Ended::Stopped,
            Err(e) => e,
        }
    }

    /// Notes the followed key a notification names (once while it waits);
    /// a sentinel's own `set` settles its pending SET instead.
    fn note(&mut self, notes: &mut Notes, m: redis::Msg) {
        let Ok(channel) = m.get_channel::<Vec<u8>>() else {
            return;
        };
        let Some(key) = channel.strip_prefix(notes.channel_prefix.as_slice()) else {
            return;
        };
        if key.starts_with(SENTINEL_PREFIX.as_bytes()) {
            // `SET … EX` also notifies `expire`: one per SET counts.
            if m.get_payload_bytes() == b"set" {
                self.sentinel_notified(key);
            }
            return;
        }
        if self.follows(key) && notes.queued.insert(key.to_vec()) {
            notes.dirty.push_back(key.to_vec());
        }
    }

    /// Takes every notification that has already arrived.
    fn drain(&mut self, notes: &mut Notes) {
        while !notes.ended {
            match notes.stream.next().now_or_never() {
                Some(Some(Some(m))) => self.note(notes, m),
                Some(_) => notes.ended = true,
                None => break,
            }
        }
    }

    /// SCANs every followed master for the layout's keys and emits what
    /// differs from the index (`emit_diff` false: only builds the index, on
    /// a first start without snapshot). A known key the scans did not see
    /// is read before it is called deleted: on a cluster it may have moved
    /// to another node meanwhile (slot migration), and a read follows it.
    async fn reconcile(
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
                    .read_and_diff(&mut topo.data, &keys, tx, shutdown, emit_diff)
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
            .read_and_diff(&mut topo.data, &unseen, tx, shutdown, emit_diff)
            .await?;
        tracing::info!(keys = self.index.len(), emitted, "Reconciled Redis keys.");
        self.restart_sentinel_clocks();
        Ok(())
    }

    /// Reads `keys` (in batches) and emits each change against the index,
    /// when `emit`; returns how many there were.
    async fn read_and_diff(
        &mut self,
        data: &mut Conn,
        keys: &[Vec<u8>],
        tx: &mpsc::Sender<SourceEvent>,
        shutdown: &CancellationToken,
        emit_changes: bool,
    ) -> Result<u64, Ended> {
        let mut emitted = 0;
        for chunk in keys.chunks(BATCH) {
            let reads = read_values(data, chunk).await?;
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

    /// The change implied by reading `key` now, given what was emitted before.
    fn diff(&mut self, key: Vec<u8>, read: Read) -> Option<Change> {
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

    #[test]
    fn flags() {
        assert_eq!(missing_flags(""), NEEDED_FLAGS);
        assert_eq!(missing_flags("KA"), "n");
        assert_eq!(missing_flags("AKn"), "");
        assert_eq!(missing_flags("Ex"), "Kg$hen");
    }

    #[test]
    fn escapes_globs() {
        assert_eq!(glob_escape("{a*b?[c]}\\"), "{a\\*b\\?\\[c\\]}\\\\");
    }

    /// A source of the default layout, never connected.
    fn test_source() -> RedisSource {
        RedisSource::new(
            RedisSourceConfig {
                url: String::new(),
                layout: "{{table}.{topic}}{key}".into(),
                topic_field: String::new(),
                snapshot: false,
                scan_count: 10,
                slots: None,
                connect_timeout: Duration::from_secs(1),
                auth: Default::default(),
            },
            Arc::default(),
        )
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

    #[test]
    fn parses_reads() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            parse_read(Value::Array(vec![bulk("string"), bulk("v")])),
            Read::Value(b"v".to_vec())
        );
        assert_eq!(
            parse_read(Value::Array(vec![bulk("string"), Value::Nil])),
            Read::Gone
        );
        assert_eq!(parse_read(Value::Array(vec![bulk("none")])), Read::Gone);
        assert_eq!(
            parse_read(Value::Array(vec![bulk("list")])),
            Read::Unsupported("list".into())
        );
        let hash = Value::Array(vec![
            bulk("hash"),
            Value::Array(vec![bulk("b"), bulk("2"), bulk("a"), bulk("1")]),
        ]);
        assert_eq!(
            parse_read(hash),
            Read::Value(br#"{"a":"1","b":"2"}"#.to_vec())
        );
        let raw = Value::Array(vec![
            bulk("hash"),
            Value::Array(vec![bulk("f"), Value::BulkString(b"\xff".to_vec())]),
        ]);
        let Read::Value(v) = parse_read(raw) else {
            panic!("a hash is a value")
        };
        assert!(
            std::str::from_utf8(&v).is_err(),
            "non-UTF-8 bytes are kept, never replaced"
        );
    }

    #[test]
    fn each_sentinel_set_is_settled_by_its_set_notification_only() {
        let mut s = test_source();
        let prefix = b"__keyspace@0__:";
        let key = format!("{SENTINEL_PREFIX}{{fb0}}token");
        let notification = |event: &str| {
            redis::Msg::from_owned_value(Value::Array(vec![
                Value::BulkString(b"pmessage".to_vec()),
                Value::BulkString(b"__keyspace@0__:*".to_vec()),
                Value::BulkString([&prefix[..], key.as_bytes()].concat()),
                Value::BulkString(event.as_bytes().to_vec()),
            ]))
            .unwrap()
        };
        let old = Instant::now() - Duration::from_secs(5);
        let pending = s.sentinel_sent.entry(key.clone().into_bytes()).or_default();
        pending.extend([old, old + Duration::from_secs(4)]);
        assert!(s.notification_delay() >= Duration::from_secs(5));
        let mut notes = Notes {
            stream: futures_util::stream::select_all(Vec::new()),
            channel_prefix: prefix.to_vec(),
            dirty: Default::default(),
            queued: KeySet::default(),
            ended: false,
        };
        // The first SET comes back: "set", then "expire".
        for event in ["set", "expire"] {
            s.note(&mut notes, notification(event));
        }
        let delay = s.notification_delay();
        assert!(
            delay >= Duration::from_secs(1) && delay < Duration::from_secs(2),
            "the second SET is still pending: {delay:?}"
        );
        assert!(notes.dirty.is_empty(), "a sentinel is never published");
        // A key named twice waits once.
        let row = |event: &str| {
            redis::Msg::from_owned_value(Value::Array(vec![
                Value::BulkString(b"pmessage".to_vec()),
                Value::BulkString(b"__keyspace@0__:*".to_vec()),
                Value::BulkString(b"__keyspace@0__:{t.}k".to_vec()),
                Value::BulkString(event.as_bytes().to_vec()),
            ]))
            .unwrap()
        };
        s.note(&mut notes, row("set"));
        s.note(&mut notes, row("set"));
        assert_eq!(notes.take(10), vec![b"{t.}k".to_vec()]);
        s.note(&mut notes, row("del"));
        assert_eq!(notes.dirty.len(), 1, "taken, then named again");
        s.restart_sentinel_clocks();
        assert!(s.notification_delay() < Duration::from_secs(1));
    }
}
