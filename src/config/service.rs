//! The sections around the pipeline: `[bridge]` limits, the publisher
//! service's `[multiproc]` channel and `[discovery]`, the `[admin]`
//! listener and `[ha]`.

use std::time::Duration;

use serde::Deserialize;

use super::auth::AuthConfig;
use super::common::{check_one_database, Invalid};
use crate::codec::Codec;

/// Limits of the source → publisher pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Changes buffered between source and publisher; when full the source
    /// stops reading (the database keeps the data) instead of growing memory.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Larger values are skipped and counted, not published.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
    /// How long shutdown may take to publish what is in flight.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Where the bridge answers subscribers that missed updates inside a
    /// run ("what came after revision R?") from its replay buffer, so a gap
    /// costs them no re-read. A ZeroMQ endpoint; port `*` picks a free one.
    /// Heartbeats announce it, so subscribers need no setting. `""` turns
    /// it off.
    #[serde(default = "default_replay_bind")]
    pub replay_bind: String,
    /// Updates the replay buffer keeps (the most recent; at most 64 MiB of
    /// values). A subscriber further behind re-reads (`sync`).
    #[serde(default = "default_replay_buffer")]
    pub replay_buffer: usize,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            queue_capacity: default_queue_capacity(),
            max_value_bytes: default_max_value_bytes(),
            shutdown_timeout: default_shutdown_timeout(),
            replay_bind: default_replay_bind(),
            replay_buffer: default_replay_buffer(),
        }
    }
}

/// The multiproc channel: local processes PUSH updates to this PULL socket
/// and the service republishes them through the backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiprocConfig {
    /// `ipc://PATH` (or a bare path, as Dragonflow's
    /// `publisher_multiproc_socket`).
    #[serde(default = "default_multiproc_socket")]
    pub socket: String,
    /// Payload codec of the local publishers (Dragonflow's is msgpack).
    #[serde(default)]
    pub codec: Codec,
}

impl MultiprocConfig {
    /// The socket as a ZeroMQ endpoint.
    pub fn endpoint(&self) -> String {
        if self.socket.starts_with("ipc://") {
            self.socket.clone()
        } else {
            format!("ipc://{}", self.socket)
        }
    }
}

/// Where and how the service registers itself as a publisher.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// etcd client URLs holding the `publisher` table (`/publisher/<id>`)...
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// ...or a Redis URL (`{publisher.}<id>` keys): exactly one of the two.
    #[serde(default)]
    pub url: Option<String>,
    /// Credentials and TLS of that database (`[discovery.auth]`).
    #[serde(default)]
    pub auth: AuthConfig,
    /// The address remote subscribers dial: replaces a wildcard or loopback
    /// host of `backend.bind` in the registered uri.
    #[serde(default)]
    pub local_ip: Option<String>,
    /// Fixed publisher id; by default a UUIDv5 of the host and bind
    /// endpoint, stable across restarts.
    #[serde(default)]
    pub id: Option<String>,
    /// Entries of other publishers older than this are removed
    /// (Dragonflow's default is 300 s).
    #[serde(default = "default_publisher_timeout", with = "humantime_serde")]
    pub publisher_timeout: Duration,
    /// How often the entry's `last_activity_timestamp` is refreshed and
    /// stale entries are looked for.
    #[serde(default = "default_refresh_interval", with = "humantime_serde")]
    pub refresh_interval: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`,
    /// `message` and the event's fields), for log shippers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: text or json")),
        }
    }
}

/// The admin HTTP listener, and how the process logs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// How log lines are written (`--log-format` overrides).
    #[serde(default)]
    pub log_format: LogFormat,
    /// `HOST:PORT` serving `/metrics`, `/healthz` and `/readyz`; off when
    /// unset. Use a loopback address unless scrapers live elsewhere.
    #[serde(default)]
    pub listen: Option<String>,
}

/// High availability: instances with the same config elect one publisher.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// The name every member of this HA group shares (required): the
    /// election, the shared checkpoint and the positions subscribers
    /// compare across members derive from it, never from how a member
    /// reaches its databases (two members with different endpoint URLs or
    /// bind addresses would otherwise elect a leader each).
    #[serde(default)]
    pub service: Option<String>,
    /// etcd client URLs for the election; default: the etcd source's...
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// ...or a Redis URL, for a lock in Redis itself (weaker: see the
    /// README); default with a Redis source: the source's.
    #[serde(default)]
    pub url: Option<String>,
    /// Key prefix of the election and of the shared checkpoint; the source
    /// never publishes keys under it.
    #[serde(default = "default_ha_prefix")]
    pub prefix: String,
    /// Lease time to live: a dead leader is replaced after about this long.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// This instance's name in the election (default: host name and pid).
    #[serde(default)]
    pub instance: Option<String>,
    /// Credentials and TLS for the election's etcd (default: the source's).
    #[serde(default)]
    pub auth: AuthConfig,
}

fn default_ha_prefix() -> String {
    "/feedbridge".to_owned()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_queue_capacity() -> usize {
    1024
}
fn default_max_value_bytes() -> usize {
    1024 * 1024
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_replay_bind() -> String {
    "tcp://127.0.0.1:*".into()
}
fn default_replay_buffer() -> usize {
    100_000
}
fn default_multiproc_socket() -> String {
    "ipc:///tmp/feedbridge-publisher.sock".to_owned()
}
fn default_publisher_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_refresh_interval() -> Duration {
    Duration::from_secs(30)
}

impl BridgeConfig {
    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.queue_capacity == 0 {
            return Err(("bridge.queue_capacity", "must be at least 1".into()));
        }
        if self.max_value_bytes == 0 {
            return Err(("bridge.max_value_bytes", "must be at least 1".into()));
        }
        if !(self.replay_bind.is_empty()
            || self.replay_bind.starts_with("tcp://")
            || self.replay_bind.starts_with("ipc://"))
        {
            return Err((
                "bridge.replay_bind",
                format!(
                    "{:?} is not a tcp://HOST:PORT (port * for any) or ipc://PATH endpoint, or \"\" for none",
                    self.replay_bind
                ),
            ));
        }
        Ok(())
    }
}

impl MultiprocConfig {
    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.endpoint().len() <= "ipc://".len() {
            return Err((
                "multiproc.socket",
                "needs a path, e.g. \"/var/run/feedbridge/publisher.sock\"".into(),
            ));
        }
        Ok(())
    }
}

impl DiscoveryConfig {
    /// Checks this section alone (its relation to the backend is checked
    /// where the sections are assembled).
    pub fn validate(&self) -> Result<(), Invalid> {
        check_one_database(
            ("discovery.endpoints", &self.endpoints),
            ("discovery.url", &self.url),
            "the publisher table",
        )?;
        if self.refresh_interval.is_zero() || self.refresh_interval >= self.publisher_timeout {
            return Err((
                "discovery.refresh_interval",
                "must be positive and shorter than publisher_timeout, or live publishers would be removed".into(),
            ));
        }
        self.auth.check().map_err(|r| ("discovery.auth", r))
    }
}

impl AdminConfig {
    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(listen) = &self.listen {
            listen.parse::<std::net::SocketAddr>().map_err(|e| {
                (
                    "admin.listen",
                    format!("{listen:?} is not HOST:PORT ({e}), e.g. \"127.0.0.1:9095\""),
                )
            })?;
        }
        Ok(())
    }
}

impl HaConfig {
    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.service.as_deref().is_none_or(|s| s.trim().is_empty()) {
            return Err((
                "ha.service",
                "required: the name every member of this HA group shares (their election, shared checkpoint and positions derive from it); give each member the same one".into(),
            ));
        }
        check_one_database(
            ("ha.endpoints", &self.endpoints),
            ("ha.url", &self.url),
            "the election (etcd) or the lock (Redis)",
        )?;
        if self.lease_ttl < Duration::from_secs(2) {
            return Err((
                "ha.lease_ttl",
                "must be at least 2s (etcd leases count whole seconds)".into(),
            ));
        }
        if !self.prefix.starts_with('/') {
            return Err((
                "ha.prefix",
                format!("{:?} must start with '/'", self.prefix),
            ));
        }
        self.auth.check().map_err(|r| ("ha.auth", r))
    }
}
