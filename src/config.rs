//! Typed configuration (TOML): which source to tail, which backend to
//! publish through, and the pipeline's limits. Unknown fields are errors;
//! every field has a documented default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::Codec;
use crate::keymap::KeyLayout;

static NO_AUTH: AuthConfig = AuthConfig {
    user: None,
    password_env: None,
    password_file: None,
    ca_file: None,
    cert_file: None,
    key_file: None,
};

/// Dragonflow's publisher port.
pub const DEFAULT_ZMQ_BIND: &str = "tcp://127.0.0.1:8866";
/// etcd's client port on loopback.
pub const DEFAULT_ETCD_ENDPOINT: &str = "http://127.0.0.1:2379";
/// Redis on loopback, database 0.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// The whole configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The database whose changes are tailed; `None` for a publisher
    /// service that only forwards local processes' updates.
    pub source: Option<SourceConfig>,
    /// Where updates are published.
    pub backend: BackendConfig,
    /// Pipeline limits shared by every source and backend.
    pub bridge: BridgeConfig,
    /// The publisher service's local IPC channel (Dragonflow's multiproc).
    pub multiproc: Option<MultiprocConfig>,
    /// Registration in the database's `publisher` table.
    pub discovery: Option<DiscoveryConfig>,
    /// The admin HTTP listener (metrics, health).
    pub admin: AdminConfig,
    /// Active/standby instances elected through etcd.
    pub ha: Option<HaConfig>,
}

/// High availability: instances with the same config elect one publisher.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
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

/// Credentials and TLS of a database connection. Secrets come from the
/// environment or a file, never from the config file, and never appear in
/// logs or in `check` output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// User name (etcd user, Redis ACL user).
    #[serde(default)]
    pub user: Option<String>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate to verify the server (etcd `https://`, Redis `rediss://`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that require one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl AuthConfig {
    /// The password, read from its variable or file.
    pub fn password(&self) -> Result<Option<String>, String> {
        match (&self.password_env, &self.password_file) {
            (Some(_), Some(_)) => Err("set password_env or password_file, not both".into()),
            (Some(var), None) => std::env::var(var)
                .map(Some)
                .map_err(|_| format!("environment variable {var} (password_env) is not set")),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|p| Some(p.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read password_file {}: {e}", path.display())),
            (None, None) => Ok(None),
        }
    }

    /// Reads a PEM file named in this section.
    pub fn pem(path: &Option<PathBuf>, field: &str) -> Result<Option<Vec<u8>>, String> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| format!("cannot read {field} {}: {e}", p.display()))
            })
            .transpose()
    }

    /// Checks that secrets and files can be read, and that a client
    /// certificate comes with its key.
    pub fn check(&self) -> Result<(), String> {
        self.password()?;
        Self::pem(&self.ca_file, "ca_file")?;
        Self::pem(&self.cert_file, "cert_file")?;
        Self::pem(&self.key_file, "key_file")?;
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("cert_file and key_file go together".into());
        }
        Ok(())
    }
}

/// The admin HTTP listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `HOST:PORT` serving `/metrics`, `/healthz` and `/readyz`; off when
    /// unset. Use a loopback address unless scrapers live elsewhere.
    #[serde(default)]
    pub listen: Option<String>,
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

/// A change source, chosen by `type`.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// etcd watch (list-then-watch on a prefix).
    Etcd(EtcdSourceConfig),
    /// Redis keyspace notifications.
    Redis(RedisSourceConfig),
}

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
    /// How many keys one SCAN step asks for while reconciling.
    #[serde(default = "default_scan_count")]
    pub scan_count: usize,
    /// How long a connect attempt may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Credentials and TLS (`[source.auth]` / `[backend.auth]`).
    #[serde(default)]
    pub auth: AuthConfig,
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
    /// Credentials and TLS (`[source.auth]` / `[backend.auth]`).
    #[serde(default)]
    pub auth: AuthConfig,
}

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
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            queue_capacity: default_queue_capacity(),
            max_value_bytes: default_max_value_bytes(),
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
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
fn default_etcd_endpoints() -> Vec<String> {
    vec![DEFAULT_ETCD_ENDPOINT.to_owned()]
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
fn default_redis_url() -> String {
    DEFAULT_REDIS_URL.to_owned()
}
fn default_scan_count() -> usize {
    1000
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
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
fn default_queue_capacity() -> usize {
    1024
}
fn default_max_value_bytes() -> usize {
    1024 * 1024
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A config that cannot be used; the message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, or a field is unknown or of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the field, line and column).
        message: String,
    },
    /// A field parsed but its value cannot work.
    #[error("config file {path}: field `{field}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted path of the field, e.g. `source.layout`.
        field: &'static str,
        /// What is wrong and what would be right.
        reason: String,
    },
}

impl Config {
    /// Reads, parses, applies environment overrides and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        config.apply_env(|name| std::env::var(name).ok());
        config.validate(path)?;
        Ok(config)
    }

    /// Parses TOML text; `path` is only used in messages.
    ///
    /// The `source` and `backend` tables are dispatched on their `type` by
    /// hand rather than by serde's internally tagged enums, which buffer the
    /// table and so lose the name of a field whose value is wrong.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let error = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let mut top: toml::Table = toml::from_str(text)
            .map_err(|e: toml::de::Error| error(e.to_string().trim_end().to_owned()))?;
        let mut section =
            |name: &str, required: bool| -> Result<Option<toml::Table>, ConfigError> {
                match top.remove(name) {
                    Some(toml::Value::Table(t)) => Ok(Some(t)),
                    Some(_) => Err(error(format!("`{name}` must be a table ([{name}])"))),
                    None if required => Err(error(format!("missing table [{name}]"))),
                    None => Ok(None),
                }
            };
        let source = section("source", false)?;
        let backend = section("backend", true)?.expect("required");
        let bridge = section("bridge", false)?;
        let multiproc = section("multiproc", false)?;
        let discovery = section("discovery", false)?;
        let admin = section("admin", false)?;
        let ha = section("ha", false)?;
        if let Some(key) = top.keys().next() {
            return Err(error(format!(
                "unknown table or field `{key}`, expected `source`, `backend`, `bridge`, `multiproc`, `discovery`, `admin` or `ha`"
            )));
        }
        let source = match source {
            None => None,
            Some(source) => Some(
                match tagged(source, "source", &["etcd", "redis"]).map_err(error)? {
                    ("etcd", t) => SourceConfig::Etcd(typed(t, "source").map_err(error)?),
                    (_, t) => SourceConfig::Redis(typed(t, "source").map_err(error)?),
                },
            ),
        };
        let multiproc = multiproc
            .map(|t| typed(t, "multiproc"))
            .transpose()
            .map_err(error)?;
        let discovery = discovery
            .map(|t| typed(t, "discovery"))
            .transpose()
            .map_err(error)?;
        let mut ha: Option<HaConfig> = ha.map(|t| typed(t, "ha")).transpose().map_err(error)?;
        if let Some(ha) = &mut ha {
            if ha.endpoints.is_empty() && ha.url.is_none() {
                let default_auth = ha.auth == AuthConfig::default();
                match &source {
                    Some(SourceConfig::Etcd(src)) => {
                        ha.endpoints = src.endpoints.clone();
                        if default_auth {
                            ha.auth = src.auth.clone();
                        }
                    }
                    Some(SourceConfig::Redis(src)) => {
                        ha.url = Some(src.url.clone());
                        if default_auth {
                            ha.auth = src.auth.clone();
                        }
                    }
                    None => {}
                }
            }
        }
        let admin: AdminConfig = admin
            .map(|t| typed(t, "admin"))
            .transpose()
            .map_err(error)?
            .unwrap_or_default();
        let backend = match tagged(backend, "backend", &["zmq", "redis", "etcd"]).map_err(error)? {
            ("zmq", t) => BackendConfig::Zmq(typed(t, "backend").map_err(error)?),
            ("redis", t) => BackendConfig::Redis(typed(t, "backend").map_err(error)?),
            (_, t) => BackendConfig::Etcd(typed(t, "backend").map_err(error)?),
        };
        let bridge = match bridge {
            Some(t) => typed(t, "bridge").map_err(error)?,
            None => BridgeConfig::default(),
        };
        Ok(Config {
            source,
            backend,
            bridge,
            multiproc,
            discovery,
            admin,
            ha,
        })
    }

    /// Overrides endpoints from `FEEDBRIDGE_ETCD_ENDPOINTS` (comma
    /// separated), `FEEDBRIDGE_REDIS_URL` and `FEEDBRIDGE_ZMQ_BIND`, so one
    /// config file serves several hosts or containers.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        let etcd = var("FEEDBRIDGE_ETCD_ENDPOINTS").map(|v| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .collect::<Vec<_>>()
        });
        let redis = var("FEEDBRIDGE_REDIS_URL");
        match &mut self.source {
            Some(SourceConfig::Etcd(c)) => {
                c.endpoints = etcd.clone().unwrap_or(c.endpoints.clone())
            }
            Some(SourceConfig::Redis(c)) => c.url = redis.clone().unwrap_or(c.url.clone()),
            None => {}
        }
        if let Some(listen) = var("FEEDBRIDGE_ADMIN_LISTEN") {
            self.admin.listen = Some(listen);
        }
        if let Some(d) = &mut self.discovery {
            if d.url.is_some() {
                d.url = redis.clone().or(d.url.take());
            } else if let Some(e) = &etcd {
                d.endpoints = e.clone();
            }
        }
        match &mut self.backend {
            BackendConfig::Zmq(c) => c.bind = var("FEEDBRIDGE_ZMQ_BIND").unwrap_or(c.bind.clone()),
            BackendConfig::Redis(c) => c.url = redis.unwrap_or(c.url.clone()),
            BackendConfig::Etcd(c) => c.endpoints = etcd.unwrap_or(c.endpoints.clone()),
        }
    }

    /// Checks what the types cannot: layouts parse, endpoints look right,
    /// limits are positive.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        if self.source.is_none() && self.multiproc.is_none() {
            return Err(invalid(
                "source",
                "nothing to publish: configure a [source], a [multiproc] channel, or both".into(),
            ));
        }
        match &self.source {
            None => {}
            Some(SourceConfig::Etcd(c)) => {
                KeyLayout::parse(&c.layout).map_err(|e| invalid("source.layout", e.to_string()))?;
                check_etcd_endpoints(&c.endpoints).map_err(|r| invalid("source.endpoints", r))?;
            }
            Some(SourceConfig::Redis(c)) => {
                KeyLayout::parse(&c.layout).map_err(|e| invalid("source.layout", e.to_string()))?;
                check_redis_url(&c.url).map_err(|r| invalid("source.url", r))?;
                if c.scan_count == 0 {
                    return Err(invalid("source.scan_count", "must be at least 1".into()));
                }
            }
        }
        match &self.backend {
            BackendConfig::Zmq(c) => {
                if !(c.bind.starts_with("tcp://") || c.bind.starts_with("ipc://")) {
                    return Err(invalid(
                        "backend.bind",
                        format!(
                            "{:?} is not a tcp://HOST:PORT or ipc://PATH endpoint",
                            c.bind
                        ),
                    ));
                }
                if c.send_hwm <= 0 {
                    return Err(invalid(
                        "backend.send_hwm",
                        "must be positive: 0 would let a stalled subscriber grow memory without bound".into(),
                    ));
                }
            }
            BackendConfig::Redis(c) => {
                check_redis_url(&c.url).map_err(|r| invalid("backend.url", r))?;
            }
            BackendConfig::Etcd(c) => {
                check_etcd_endpoints(&c.endpoints).map_err(|r| invalid("backend.endpoints", r))?;
                if !c.prefix.starts_with('/') || !c.prefix.ends_with('/') {
                    return Err(invalid(
                        "backend.prefix",
                        format!("{:?} must start and end with '/'", c.prefix),
                    ));
                }
            }
        }
        if let Some(m) = &self.multiproc {
            if m.endpoint().len() <= "ipc://".len() {
                return Err(invalid(
                    "multiproc.socket",
                    "needs a path, e.g. \"/var/run/feedbridge/publisher.sock\"".into(),
                ));
            }
        }
        if let Some(d) = &self.discovery {
            match (&d.url, d.endpoints.is_empty()) {
                (Some(url), true) => {
                    check_redis_url(url).map_err(|r| invalid("discovery.url", r))?
                }
                (None, false) => check_etcd_endpoints(&d.endpoints)
                    .map_err(|r| invalid("discovery.endpoints", r))?,
                _ => {
                    return Err(invalid(
                        "discovery.endpoints",
                        "set exactly one of `endpoints` (etcd) or `url` (Redis)".into(),
                    ))
                }
            }
            let BackendConfig::Zmq(z) = &self.backend else {
                return Err(invalid(
                    "discovery",
                    "publisher discovery needs the zmq backend: subscribers dial its endpoint"
                        .into(),
                ));
            };
            crate::discovery::advertised_uri(&z.bind, d.local_ip.as_deref())
                .map_err(|r| invalid("discovery.local_ip", r))?;
            if d.refresh_interval.is_zero() || d.refresh_interval >= d.publisher_timeout {
                return Err(invalid(
                    "discovery.refresh_interval",
                    "must be positive and shorter than publisher_timeout, or live publishers would be removed".into(),
                ));
            }
        }
        let auths: Vec<(&'static str, &AuthConfig)> = [
            self.source.as_ref().map(|s| match s {
                SourceConfig::Etcd(c) => ("source.auth", &c.auth),
                SourceConfig::Redis(c) => ("source.auth", &c.auth),
            }),
            Some(match &self.backend {
                BackendConfig::Zmq(_) => ("backend.auth", &NO_AUTH),
                BackendConfig::Redis(c) => ("backend.auth", &c.auth),
                BackendConfig::Etcd(c) => ("backend.auth", &c.auth),
            }),
            self.discovery.as_ref().map(|d| ("discovery.auth", &d.auth)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (field, auth) in auths {
            auth.check().map_err(|r| invalid(field, r))?;
        }
        if let Some(ha) = &self.ha {
            match (&ha.url, ha.endpoints.is_empty()) {
                (Some(url), true) => check_redis_url(url).map_err(|r| invalid("ha.url", r))?,
                (None, false) => {
                    check_etcd_endpoints(&ha.endpoints).map_err(|r| invalid("ha.endpoints", r))?
                }
                _ => {
                    return Err(invalid(
                        "ha.endpoints",
                        "set exactly one of `endpoints` (etcd election) or `url` (Redis lock)"
                            .into(),
                    ))
                }
            }
            if ha.lease_ttl < Duration::from_secs(2) {
                return Err(invalid(
                    "ha.lease_ttl",
                    "must be at least 2s (etcd leases count whole seconds)".into(),
                ));
            }
            if !ha.prefix.starts_with('/') {
                return Err(invalid(
                    "ha.prefix",
                    format!("{:?} must start with '/'", ha.prefix),
                ));
            }
            ha.auth.check().map_err(|r| invalid("ha.auth", r))?;
        }
        if let Some(listen) = &self.admin.listen {
            listen.parse::<std::net::SocketAddr>().map_err(|e| {
                invalid(
                    "admin.listen",
                    format!("{listen:?} is not HOST:PORT ({e}), e.g. \"127.0.0.1:9095\""),
                )
            })?;
        }
        if self.bridge.queue_capacity == 0 {
            return Err(invalid(
                "bridge.queue_capacity",
                "must be at least 1".into(),
            ));
        }
        if self.bridge.max_value_bytes == 0 {
            return Err(invalid(
                "bridge.max_value_bytes",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Splits the `type` field off a section and checks it is one of `kinds`.
fn tagged(
    mut table: toml::Table,
    section: &str,
    kinds: &[&'static str],
) -> Result<(&'static str, toml::Table), String> {
    let kind = match table.remove("type") {
        Some(toml::Value::String(s)) => s,
        Some(other) => {
            return Err(format!(
                "field `{section}.type`: expected a string, found {}",
                other.type_str()
            ))
        }
        None => {
            return Err(format!(
                "missing field `{section}.type` (one of {})",
                kinds.join(", ")
            ))
        }
    };
    kinds
        .iter()
        .find(|k| **k == kind)
        .map(|k| (*k, table))
        .ok_or_else(|| {
            format!(
                "field `{section}.type`: unknown {section} type `{kind}`, expected one of {}",
                kinds.join(", ")
            )
        })
}

/// Deserializes a section, naming the offending field on error.
fn typed<T: serde::de::DeserializeOwned>(table: toml::Table, section: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let field = e.path().to_string();
        if field == "." {
            format!("[{section}]: {}", e.inner())
        } else {
            format!("field `{section}.{field}`: {}", e.inner())
        }
    })
}

/// `url` with any credentials in it replaced by `***`, for logs and
/// errors. Textual, so it also hides them in a URL that does not parse.
pub fn redact_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    let scheme = url
        .find("://")
        .filter(|&i| i < at)
        .map(|i| &url[..i + 3])
        .unwrap_or("");
    format!("{scheme}***@{}", &url[at + 1..])
}

/// Endpoints joined with commas, credentials redacted.
pub fn redact_endpoints(endpoints: &[String]) -> String {
    endpoints
        .iter()
        .map(|e| redact_url(e))
        .collect::<Vec<_>>()
        .join(",")
}

fn check_etcd_endpoints(endpoints: &[String]) -> Result<(), String> {
    if endpoints.is_empty() {
        return Err("needs at least one endpoint, e.g. \"http://127.0.0.1:2379\"".into());
    }
    for e in endpoints {
        check_etcd_endpoint(e)?;
    }
    Ok(())
}

/// An etcd endpoint is `http(s)://HOST:PORT` (or `HOST:PORT`) and nothing
/// more: what would fail later as a DNS error is refused here.
fn check_etcd_endpoint(endpoint: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!(
            "{:?} is not an etcd endpoint ({why}); expected http://HOST:PORT or https://HOST:PORT",
            redact_url(endpoint)
        )
    };
    if endpoint.trim().is_empty() || endpoint.contains(char::is_whitespace) {
        return Err(bad("empty or has spaces"));
    }
    let full = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let url = url::Url::parse(&full).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if url.port().is_none() {
        return Err(bad("no port"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a path, query or fragment is not allowed"));
    }
    Ok(())
}

fn check_redis_url(url: &str) -> Result<(), String> {
    redis::parse_redis_url(url)
        .map(|_| ())
        .ok_or_else(|| format!("{:?} is not a redis://HOST:PORT/DB URL", redact_url(url)))
}

/// Whether `host` is a wildcard address: every interface of the machine.
fn binds_everything(host: &str) -> bool {
    matches!(
        host.trim_start_matches('[').trim_end_matches(']'),
        "0.0.0.0" | "*" | "::" | ""
    )
}

impl Config {
    /// What is valid but risky: listeners without authentication bound to
    /// every address. `check` prints these; `run` logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let BackendConfig::Zmq(z) = &self.backend {
            if let Some(addr) = z.bind.strip_prefix("tcp://") {
                let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
                if binds_everything(host) {
                    out.push(format!(
                        "backend.bind {:?} listens on every address without authentication: anyone who can reach it reads every update; bind a specific address or firewall it",
                        z.bind
                    ));
                }
            }
        }
        if let Some(listen) = &self.admin.listen {
            if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
                if addr.ip().is_unspecified() {
                    out.push(format!(
                        "admin.listen {listen:?} serves metrics on every address without authentication; bind a specific address or firewall it"
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let p = Path::new("test.toml");
        let c = Config::parse(text, p)?;
        c.validate(p)?;
        Ok(c)
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let c = Config::parse(&text, &path).unwrap();
                c.validate(&path).unwrap();
                n += 1;
            }
        }
        assert!(n >= 1, "no example configs found in {}", dir.display());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[source]\ntype = \"etcd\"\n[backend]\ntype = \"zmq\"\n").unwrap();
        let Some(SourceConfig::Etcd(s)) = c.source else {
            panic!()
        };
        assert_eq!(s.endpoints, vec![DEFAULT_ETCD_ENDPOINT]);
        assert_eq!(
            (s.prefix.as_str(), s.layout.as_str()),
            ("/", "/{table}/{key}")
        );
        let BackendConfig::Zmq(b) = c.backend else {
            panic!()
        };
        assert_eq!(
            (b.bind.as_str(), b.codec),
            (DEFAULT_ZMQ_BIND, Codec::Msgpack)
        );
        assert_eq!(b.linger, Duration::from_secs(1));
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse("[source]\ntype = \"etcd\"\nendpionts = []\n[backend]\ntype = \"zmq\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml") && e.contains("endpionts"), "{e}");
        let e = parse("[source]\ntype = \"kafka\"\n[backend]\ntype = \"zmq\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            (
                "[source]\ntype=\"etcd\"\nlayout=\"/{table}\"\n[backend]\ntype=\"zmq\"\n",
                "source.layout",
            ),
            (
                "[source]\ntype=\"etcd\"\n[backend]\ntype=\"zmq\"\nbind=\"127.0.0.1:1\"\n",
                "backend.bind",
            ),
            (
                "[source]\ntype=\"etcd\"\n[backend]\ntype=\"zmq\"\nsend_hwm=0\n",
                "backend.send_hwm",
            ),
            (
                "[source]\ntype=\"redis\"\nurl=\"http://x\"\n[backend]\ntype=\"zmq\"\n",
                "source.url",
            ),
            (
                "[source]\ntype=\"etcd\"\nendpoints=[]\n[backend]\ntype=\"zmq\"\n",
                "source.endpoints",
            ),
        ];
        for (text, field) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        }
        let e = parse(
            "[source]\ntype=\"etcd\"\nconnect_timeout=\"5 parsecs\"\n[backend]\ntype=\"zmq\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("connect_timeout"), "{e}");
    }

    #[test]
    fn secrets_come_from_env_or_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        std::env::set_var("FEEDBRIDGE_TEST_SECRET_7", "from-env");
        let env = AuthConfig {
            password_env: Some("FEEDBRIDGE_TEST_SECRET_7".into()),
            ..Default::default()
        };
        assert_eq!(env.password().unwrap().as_deref(), Some("from-env"));
        let from_file = AuthConfig {
            password_file: Some(file.clone()),
            ..Default::default()
        };
        assert_eq!(from_file.password().unwrap().as_deref(), Some("from-file"));
        let both = AuthConfig {
            password_file: Some(file),
            ..env.clone()
        };
        assert!(both.check().unwrap_err().contains("not both"));
        let unset = AuthConfig {
            password_env: Some("FEEDBRIDGE_TEST_UNSET_7".into()),
            ..Default::default()
        };
        assert!(unset
            .check()
            .unwrap_err()
            .contains("FEEDBRIDGE_TEST_UNSET_7"));
        let half = AuthConfig {
            cert_file: Some(dir.path().join("none")),
            ..Default::default()
        };
        assert!(half.check().is_err());
        // `check` names the field, never the secret
        let e = parse("[source]\ntype=\"etcd\"\n[source.auth]\npassword_env=\"FEEDBRIDGE_TEST_UNSET_7\"\n[backend]\ntype=\"zmq\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("source.auth"), "{e}");
    }

    #[test]
    fn env_overrides_endpoints() {
        let mut c = parse("[source]\ntype = \"etcd\"\n[backend]\ntype = \"zmq\"\n").unwrap();
        c.apply_env(|n| match n {
            "FEEDBRIDGE_ETCD_ENDPOINTS" => Some("http://a:1, http://b:2".into()),
            "FEEDBRIDGE_ZMQ_BIND" => Some("tcp://0.0.0.0:9".into()),
            _ => None,
        });
        let Some(SourceConfig::Etcd(s)) = &c.source else {
            panic!()
        };
        assert_eq!(s.endpoints, vec!["http://a:1", "http://b:2"]);
        let BackendConfig::Zmq(b) = &c.backend else {
            panic!()
        };
        assert_eq!(b.bind, "tcp://0.0.0.0:9");
    }
}
