//! Publisher discovery through the database, as Dragonflow does it: a
//! publisher registers itself in table `publisher` as JSON
//! `{"id", "uri", "last_activity_timestamp"}`, refreshes the timestamp while
//! it runs and removes other publishers' entries older than
//! `publisher_timeout`; subscribers watch the table and connect to every
//! publisher listed there.

/// The host's name: the kernel's, else `$HOSTNAME`, else `localhost`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A publisher id stable across restarts of the same service on the same
/// host: a UUIDv5 of `name` and the host name, like Dragonflow's (which
/// hashes the process name and FQDN). Two services on one host differ by
/// `name`, which feedbridge derives from the endpoint it binds.
pub fn publisher_id(name: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_DNS,
        format!("{name}.{}", hostname()).as_bytes(),
    )
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(
            publisher_id("feedbridge:tcp://127.0.0.1:1"),
            publisher_id("feedbridge:tcp://127.0.0.1:1")
        );
        assert_ne!(
            publisher_id("feedbridge:tcp://127.0.0.1:1"),
            publisher_id("feedbridge:tcp://127.0.0.1:2")
        );
        assert_eq!(publisher_id("x").len(), 36);
    }
}

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{AuthConfig, DiscoveryConfig};
use crate::keymap::KeyLayout;
use crate::pubsub::Subscriber;
use crate::retry::Reconnect;

/// The etcd prefix of Dragonflow's `publisher` table.
pub const ETCD_PREFIX: &str = "/publisher/";

/// One row of the `publisher` table, as Dragonflow writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublisherRecord {
    /// The publisher's id (also the row key).
    pub id: String,
    /// The endpoint subscribers dial, e.g. `tcp://10.0.0.5:8866`.
    pub uri: String,
    /// Unix seconds of the last refresh.
    pub last_activity_timestamp: f64,
}

/// Which database holds the `publisher` table.
#[derive(Debug, Clone)]
pub enum Target {
    /// etcd client URLs: rows at `/publisher/<id>`.
    Etcd(Vec<String>, AuthConfig),
    /// A Redis URL: rows at `{publisher.}<id>` (Dragonflow's Redis layout).
    Redis(String, AuthConfig),
}

impl Target {
    /// The target a discovery config names.
    pub fn of(config: &DiscoveryConfig) -> Target {
        match &config.url {
            Some(url) => Target::Redis(url.clone(), config.auth.clone()),
            None => Target::Etcd(config.endpoints.clone(), config.auth.clone()),
        }
    }

    /// `redis://...` or `rediss://...` is Redis; anything else an etcd URL.
    pub fn parse(endpoint: &str) -> Target {
        if endpoint.starts_with("redis://") || endpoint.starts_with("rediss://") {
            Target::Redis(endpoint.to_owned(), AuthConfig::default())
        } else {
            Target::Etcd(
                endpoint.split(',').map(str::to_owned).collect(),
                AuthConfig::default(),
            )
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn redis_layout() -> KeyLayout {
    KeyLayout::parse("{{table}.{topic}}{key}").expect("valid layout")
}

/// A connection to the `publisher` table.
pub enum PublisherTable {
    /// etcd (boxed: its client is large).
    Etcd(Box<etcd_client::Client>),
    /// Redis.
    /// Redis (standalone or cluster), with the client to reach single
    /// nodes: on a cluster the rows are listed on the node that owns their
    /// slot (they share the hash tag `{publisher.}`).
    Redis(crate::db::redis::Conn, Box<redis::Client>),
}

impl PublisherTable {
    /// Connects within `timeout`.
    pub async fn connect(target: &Target, timeout: Duration) -> Result<Self, String> {
        match target {
            Target::Etcd(endpoints, auth) => {
                let probe = async {
                    let mut c = crate::db::etcd::connect(endpoints, timeout, auth).await?;
                    c.status().await?;
                    Ok::<_, etcd_client::Error>(c)
                };
                match tokio::time::timeout(timeout, probe).await {
                    Ok(Ok(c)) => Ok(PublisherTable::Etcd(Box::new(c))),
                    Ok(Err(e)) => Err(format!(
                        "etcd {}: {e}",
                        crate::config::redact_endpoints(endpoints)
                    )),
                    Err(_) => Err(format!(
                        "etcd {}: connect timed out",
                        crate::config::redact_endpoints(endpoints)
                    )),
                }
            }
            Target::Redis(url, auth) => {
                let client = crate::db::redis::client(url, auth)?;
                let conn = crate::db::redis::connect(&client, timeout).await?;
                Ok(PublisherTable::Redis(conn, Box::new(client)))
            }
        }
    }

    /// Writes a row.
    pub async fn put(&mut self, record: &PublisherRecord) -> Result<(), String> {
        let json = serde_json::to_string(record).expect("record serializes");
        match self {
            PublisherTable::Etcd(c) => c
                .put(format!("{ETCD_PREFIX}{}", record.id), json, None)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            PublisherTable::Redis(c, _) => redis::cmd("SET")
                .arg(redis_layout().format("publisher", None, &record.id))
                .arg(json)
                .query_async::<()>(c)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Removes a row.
    pub async fn delete(&mut self, id: &str) -> Result<(), String> {
        match self {
            PublisherTable::Etcd(c) => c
                .delete(format!("{ETCD_PREFIX}{id}"), None)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            PublisherTable::Redis(c, _) => redis::cmd("DEL")
                .arg(redis_layout().format("publisher", None, id))
                .query_async::<()>(c)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Every row (unparsable rows are logged and left out), and for etcd
    /// the revision they were read at.
    pub async fn list(&mut self) -> Result<(Vec<PublisherRecord>, i64), String> {
        let (raw, revision): (Vec<Vec<u8>>, i64) = match self {
            PublisherTable::Etcd(c) => {
                let resp = c
                    .get(ETCD_PREFIX, Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(|e| e.to_string())?;
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                (
                    resp.kvs().iter().map(|kv| kv.value().to_vec()).collect(),
                    rev,
                )
            }
            PublisherTable::Redis(c, client) => {
                let mut keys: Vec<String> = Vec::new();
                let mut cursor = 0u64;
                let mut scanned = if c.is_cluster() {
                    let owner = crate::db::redis::owner_of(c, client, b"{publisher.}").await?;
                    crate::db::redis::Conn::Single(owner)
                } else {
                    c.clone()
                };
                loop {
                    let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg("{publisher.}*")
                        .query_async(&mut scanned)
                        .await
                        .map_err(|e| e.to_string())?;
                    keys.extend(page);
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
                let mut values = Vec::new();
                for k in keys {
                    let v: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&k)
                        .query_async(c)
                        .await
                        .map_err(|e| e.to_string())?;
                    values.extend(v);
                }
                (values, 0)
            }
        };
        let records = raw
            .iter()
            .filter_map(|v| match serde_json::from_slice::<PublisherRecord>(v) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "Ignoring a publisher entry that is not {{id, uri, last_activity_timestamp}}.");
                    None
                }
            })
            .collect();
        Ok((records, revision))
    }
}

/// This service's row in the `publisher` table.
pub struct Registration {
    config: DiscoveryConfig,
    target: Target,
    table: PublisherTable,
    id: String,
    uri: String,
}

const TABLE_TIMEOUT: Duration = Duration::from_secs(5);

impl Registration {
    /// Connects and writes the row now, so an unreachable database fails
    /// at start-up.
    pub async fn start(config: DiscoveryConfig, id: String, uri: String) -> Result<Self, String> {
        let target = Target::of(&config);
        let table = PublisherTable::connect(&target, TABLE_TIMEOUT).await?;
        let mut r = Registration {
            config,
            target,
            table,
            id,
            uri,
        };
        r.table.put(&r.record()).await?;
        tracing::info!(id = %r.id, uri = %r.uri, "Registered in the publisher table.");
        Ok(r)
    }

    fn record(&self) -> PublisherRecord {
        PublisherRecord {
            id: self.id.clone(),
            uri: self.uri.clone(),
            last_activity_timestamp: now(),
        }
    }

    /// Until `shutdown`: every `refresh_interval`, refreshes the row's
    /// `last_activity_timestamp` and removes other publishers' rows older
    /// than `publisher_timeout`. Then removes its own row.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut reconnect = Reconnect::new("publisher table");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.config.refresh_interval) => {}
            }
            match self.refresh().await {
                Ok(()) => reconnect.up(),
                Err(e) => {
                    if !reconnect.down(&e, &shutdown).await {
                        break;
                    }
                    if let Ok(t) = PublisherTable::connect(&self.target, TABLE_TIMEOUT).await {
                        self.table = t;
                    }
                }
            }
        }
        match self.table.delete(&self.id).await {
            Ok(()) => tracing::info!(id = %self.id, "Removed this publisher's entry."),
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "Cannot remove this publisher's entry; it expires after publisher_timeout.")
            }
        }
    }

    async fn refresh(&mut self) -> Result<(), String> {
        let record = self.record();
        self.table.put(&record).await?;
        let (rows, _) = self.table.list().await?;
        let timeout = self.config.publisher_timeout.as_secs_f64();
        for row in rows {
            let age = now() - row.last_activity_timestamp;
            if row.id != self.id && age > timeout {
                tracing::info!(id = %row.id, uri = %row.uri, age_s = age as u64, "Removing a stale publisher entry.");
                self.table.delete(&row.id).await?;
            }
        }
        Ok(())
    }
}

/// Registers with `subscriber` the uri of every publisher in the table,
/// and unregisters them as they go, until `shutdown`.
pub async fn follow_publishers(
    target: Target,
    subscriber: Arc<dyn Subscriber>,
    shutdown: CancellationToken,
) {
    let mut known: HashMap<String, String> = HashMap::new();
    let mut reconnect = Reconnect::new("publisher discovery");
    let apply = |known: &mut HashMap<String, String>, rows: Vec<PublisherRecord>| {
        let now: HashMap<String, String> = rows.into_iter().map(|r| (r.id, r.uri)).collect();
        for (id, uri) in known.iter() {
            if now.get(id) != Some(uri) {
                tracing::info!(%id, %uri, "Publisher gone.");
                subscriber.unregister_listen_address(uri);
            }
        }
        for (id, uri) in &now {
            if known.get(id) != Some(uri) {
                tracing::info!(%id, %uri, "Publisher discovered.");
                subscriber.register_listen_address(uri);
            }
        }
        *known = now;
    };
    while !shutdown.is_cancelled() {
        let result: Result<(), String> = async {
            let mut table = PublisherTable::connect(&target, Duration::from_secs(5)).await?;
            let (rows, revision) = table.list().await?;
            reconnect.up();
            apply(&mut known, rows);
            match &mut table {
                PublisherTable::Etcd(client) => {
                    let opts = WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1);
                    let mut stream = client
                        .watch(ETCD_PREFIX, Some(opts))
                        .await
                        .map_err(|e| e.to_string())?;
                    loop {
                        let msg = tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => return Ok(()),
                            m = stream.message() => m.map_err(|e| e.to_string())?,
                        };
                        let resp = msg.ok_or("watch closed")?;
                        if resp.canceled() {
                            return Err("watch cancelled".into());
                        }
                        let mut rows: HashMap<String, String> = known.clone();
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let id = String::from_utf8_lossy(&kv.key()[ETCD_PREFIX.len()..])
                                .into_owned();
                            match ev.event_type() {
                                EventType::Put => {
                                    if let Ok(r) =
                                        serde_json::from_slice::<PublisherRecord>(kv.value())
                                    {
                                        rows.insert(r.id, r.uri);
                                    }
                                }
                                EventType::Delete => {
                                    rows.remove(&id);
                                }
                            }
                        }
                        let rows = rows
                            .into_iter()
                            .map(|(id, uri)| PublisherRecord {
                                id,
                                uri,
                                last_activity_timestamp: 0.0,
                            })
                            .collect();
                        apply(&mut known, rows);
                    }
                }
                PublisherTable::Redis(..) => loop {
                    // Redis keyspace notifications may be off on this
                    // server: poll the small table instead.
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    let (rows, _) = table.list().await?;
                    apply(&mut known, rows);
                },
            }
        }
        .await;
        if let Err(e) = result {
            if !reconnect.down(&e, &shutdown).await {
                break;
            }
        }
    }
}

#[cfg(test)]
mod uri_tests {}
