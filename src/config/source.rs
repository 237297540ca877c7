//! `[source]`: which database is tailed, and how its keys map to rows.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::auth::AuthConfig;
use super::common::{
    check_etcd_endpoints, check_redis_url, default_connect_timeout, default_etcd_endpoints,
    default_redis_url, Invalid,
};
use crate::keymap::KeyLayout;

/// A change source, chosen by `type`.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// etcd watch (list-then-watch on a prefix).
    Etcd(EtcdSourceConfig),
    /// Redis keyspace notifications.
    Redis(RedisSourceConfig),
}

/// The etcd source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSourceConfig {
    /// Client URLs of the etcd cluster.
    #[serde(default = "default_etcd_endpoints")]
    pub endpoints: Vec<String>,
    /// Only keys under this prefix are watched.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// How keys split into table and key (and optionally topic).
    #[serde(default = "default_etcd_layout")]
    pub layout: String,
    /// The JSON field of a value that names its topic, when the layout has
    /// no `{topic}`; empty string disables the lookup.
    #[serde(default = "default_topic_field")]
    pub topic_field: String,
    /// Emit a `create` for every existing row at start (when no checkpoint
    /// is being resumed).
    #[serde(default)]
    pub snapshot: bool,
    /// File holding the last published revision; resumed at start.
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
    /// How long a connect attempt may take before it counts as failed.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Credentials and TLS (`[source.auth]` / `[backend.auth]`).
    #[serde(default)]
    pub auth: AuthConfig,
}

/// The Redis source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSourceConfig {
    /// `redis://[user:password@]host:port/db`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// How keys split into table, topic and key.
    #[serde(default = "default_redis_layout")]
    pub layout: String,
    /// As for etcd: the JSON field naming the topic when the key has none.
    #[serde(default = "default_topic_field")]
    pub topic_field: String,
    /// Emit a `create` for every existing row at start.
    #[serde(default)]
    pub snapshot: bool,
    /// File holding the last published position; the key index is saved
    /// beside it (`.index`) at a graceful stop, so that a restart
    /// publishes what changed while the bridge was down as ordinary
    /// updates, with no `sync` (see README, Guarantees).
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
    /// How many keys one SCAN step asks for while reconciling.
    #[serde(default = "default_scan_count")]
    pub scan_count: usize,
    /// Redis Cluster: only keys in these hash slots (`"0-8191"`,
    /// `"0-100,200"`), so several bridges can share a cluster whose change
    /// rate one process cannot carry; every slot by default.
    #[serde(default)]
    pub slots: Option<String>,
    /// How long a connect attempt may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Credentials and TLS (`[source.auth]` / `[backend.auth]`).
    #[serde(default)]
    pub auth: AuthConfig,
}

fn default_etcd_prefix() -> String {
    "/".to_owned()
}
fn default_etcd_layout() -> String {
    "/{table}/{key}".to_owned()
}
fn default_redis_layout() -> String {
    "{{table}.{topic}}{key}".to_owned()
}
fn default_topic_field() -> String {
    "topic".to_owned()
}
fn default_scan_count() -> usize {
    1000
}

impl RedisSourceConfig {
    /// The hash slots this bridge follows, as inclusive ranges.
    pub fn slot_ranges(&self) -> Result<Vec<(u16, u16)>, String> {
        let Some(text) = &self.slots else {
            return Ok(vec![(0, 16383)]);
        };
        let bad = |part: &str| {
            format!("{part:?} in {text:?} is not a slot or a range of slots within 0-16383, e.g. \"0-8191\"")
        };
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u16, u16) = match (a.trim().parse(), b.trim().parse()) {
                (Ok(a), Ok(b)) if a <= b && b <= 16383 => (a, b),
                _ => return Err(bad(part)),
            };
            ranges.push((a, b));
        }
        Ok(ranges)
    }
}

impl SourceConfig {
    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            SourceConfig::Etcd(c) => {
                KeyLayout::parse(&c.layout).map_err(|e| ("source.layout", e.to_string()))?;
                check_etcd_endpoints(&c.endpoints).map_err(|r| ("source.endpoints", r))?;
            }
            SourceConfig::Redis(c) => {
                KeyLayout::parse(&c.layout).map_err(|e| ("source.layout", e.to_string()))?;
                check_redis_url(&c.url).map_err(|r| ("source.url", r))?;
                if c.scan_count == 0 {
                    return Err(("source.scan_count", "must be at least 1".into()));
                }
                c.slot_ranges().map_err(|r| ("source.slots", r))?;
            }
        }
        self.auth().check().map_err(|r| ("source.auth", r))
    }

    /// The section's credentials.
    pub fn auth(&self) -> &AuthConfig {
        match self {
            SourceConfig::Etcd(c) => &c.auth,
            SourceConfig::Redis(c) => &c.auth,
        }
    }
}
