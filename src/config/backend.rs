//! `[backend]`: where updates are published.

use std::time::Duration;

use serde::Deserialize;

use super::auth::AuthConfig;
use super::common::{
    check_etcd_endpoints, check_redis_url, default_connect_timeout, default_etcd_endpoints,
    default_redis_url, Invalid, DEFAULT_ZMQ_BIND,
};
use crate::codec::Codec;

/// A publish backend, chosen by `type`.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// ZeroMQ PUB on a tcp (or ipc) endpoint: Dragonflow's channel.
    Zmq(ZmqBackendConfig),
    /// Redis `PUBLISH <topic> <payload>`.
    Redis(RedisBackendConfig),
    /// etcd `PUT /pubsub/<topic> <payload>`.
    Etcd(EtcdBackendConfig),
}

/// The ZeroMQ backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZmqBackendConfig {
    /// Endpoint the PUB socket binds (`tcp://HOST:PORT` or `ipc://PATH`).
    #[serde(default = "default_zmq_bind")]
    pub bind: String,
    /// Payload codec; `msgpack` is what Dragonflow subscribers decode.
    #[serde(default)]
    pub codec: Codec,
    /// Messages queued per subscriber before ZeroMQ drops for that
    /// subscriber: this, not the subscriber, bounds the bridge's memory.
    #[serde(default = "default_send_hwm")]
    pub send_hwm: i32,
    /// How long unsent messages are kept when the socket closes.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
    /// At start, how long publishing may wait for subscribers to rejoin.
    /// ZeroMQ drops what is published before a subscription arrives, and
    /// subscribers that stayed up through a restart reconnect within about
    /// 100 ms: the replay waits for them (ending early once their
    /// subscriptions have arrived and gone quiet), so it reaches them.
    #[serde(default = "default_rejoin_wait", with = "humantime_serde")]
    pub rejoin_wait: Duration,
    /// How long a peer may be silent before the connection is taken for
    /// dead. A subscriber that hears neither an update nor a heartbeat from
    /// a feedbridge publisher for this long says so, reconnects and
    /// delivers a `sync`. It is also the publisher's ZMTP heartbeat timeout
    /// and TTL (pings every second): the publisher frees a subscriber that
    /// stopped answering, and any libzmq subscriber (Dragonflow's too)
    /// drops a publisher that stopped sending and reconnects. Subscribers
    /// ping nothing themselves (a libzmq abort, see `zmq_socket`).
    #[serde(default = "default_silence_timeout", with = "humantime_serde")]
    pub silence_timeout: Duration,
}

/// The Redis PUBLISH backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisBackendConfig {
    /// `redis://[user:password@]host:port/db`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// Payload codec.
    #[serde(default)]
    pub codec: Codec,
    /// How long a connect attempt may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Publish with `SPUBLISH` (Redis ≥ 7) to the node owning the channel's
    /// slot, and subscribe with `SSUBSCRIBE` there: on a Redis Cluster the
    /// publish cost grows with the cluster instead of every message
    /// crossing every node. Dragonflow's Redis subscriber uses plain
    /// `SUBSCRIBE`, so the default is `PUBLISH`.
    #[serde(default)]
    pub sharded: bool,
    /// How long a subscriber may hear nothing (no update, no heartbeat)
    /// from a feedbridge publisher, or no answer to its own `PING` from
    /// Redis, before it takes the connection for dead: it says so,
    /// reconnects and delivers a `sync`. Publishers heartbeat
    /// every 500 ms; one that sends none (Dragonflow's) is never held to it.
    #[serde(default = "default_silence_timeout", with = "humantime_serde")]
    pub silence_timeout: Duration,
    /// Credentials and TLS (`[source.auth]` / `[backend.auth]`).
    #[serde(default)]
    pub auth: AuthConfig,
}

/// The etcd `/pubsub/<topic>` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdBackendConfig {
    /// Client URLs of the etcd cluster.
    #[serde(default = "default_etcd_endpoints")]
    pub endpoints: Vec<String>,
    /// Key prefix of the topics; Dragonflow's driver uses `/pubsub/`.
    #[serde(default = "default_pubsub_prefix")]
    pub prefix: String,
    /// Payload codec.
    #[serde(default)]
    pub codec: Codec,
    /// How long a connect attempt may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the subscriber's watch may stay unanswered before the
    /// connection is taken for dead: it asks etcd for progress every
    /// second, and reconnects (resuming from its revision) when nothing
    /// came back for this long.
    #[serde(default = "default_silence_timeout", with = "humantime_serde")]
    pub silence_timeout: Duration,
    /// Credentials and TLS (`[source.auth]` / `[backend.auth]`).
    #[serde(default)]
    pub auth: AuthConfig,
}

/// Four heartbeat intervals: shorter, and a live publisher would look dead.
const MIN_SILENCE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a subscriber may hear nothing from a publisher that sends
/// heartbeats before it takes the connection for dead, by default: ten
/// heartbeat intervals.
pub const DEFAULT_SILENCE_TIMEOUT: Duration = Duration::from_secs(5);

fn default_silence_timeout() -> Duration {
    DEFAULT_SILENCE_TIMEOUT
}

fn default_zmq_bind() -> String {
    DEFAULT_ZMQ_BIND.to_owned()
}
fn default_send_hwm() -> i32 {
    10_000
}
fn default_rejoin_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_linger() -> Duration {
    Duration::from_secs(1)
}
fn default_pubsub_prefix() -> String {
    "/pubsub/".to_owned()
}

impl BackendConfig {
    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.check_silence_timeout()?;
        match self {
            BackendConfig::Zmq(c) => {
                if !(c.bind.starts_with("tcp://") || c.bind.starts_with("ipc://")) {
                    return Err((
                        "backend.bind",
                        format!(
                            "{:?} is not a tcp://HOST:PORT or ipc://PATH endpoint",
                            c.bind
                        ),
                    ));
                }
                if c.send_hwm <= 0 {
                    return Err((
                        "backend.send_hwm",
                        "must be positive: 0 would let a stalled subscriber grow memory without bound".into(),
                    ));
                }
            }
            BackendConfig::Redis(c) => {
                check_redis_url(&c.url).map_err(|r| ("backend.url", r))?;
                c.auth.check().map_err(|r| ("backend.auth", r))?;
            }
            BackendConfig::Etcd(c) => {
                check_etcd_endpoints(&c.endpoints).map_err(|r| ("backend.endpoints", r))?;
                if !c.prefix.starts_with('/') || !c.prefix.ends_with('/') {
                    return Err((
                        "backend.prefix",
                        format!("{:?} must start and end with '/'", c.prefix),
                    ));
                }
                c.auth.check().map_err(|r| ("backend.auth", r))?;
            }
        }
        Ok(())
    }
}

impl BackendConfig {
    /// `silence_timeout` leaves a live publisher room for a few heartbeats.
    pub fn check_silence_timeout(&self) -> Result<(), Invalid> {
        let silence = match self {
            BackendConfig::Zmq(c) => c.silence_timeout,
            BackendConfig::Redis(c) => c.silence_timeout,
            BackendConfig::Etcd(c) => c.silence_timeout,
        };
        if silence < MIN_SILENCE_TIMEOUT {
            return Err((
                "backend.silence_timeout",
                format!(
                    "{} is too short: publishers heartbeat every 500 ms, so a live one would look dead; use at least {}",
                    humantime::format_duration(silence),
                    humantime::format_duration(MIN_SILENCE_TIMEOUT)
                ),
            ));
        }
        Ok(())
    }
}
