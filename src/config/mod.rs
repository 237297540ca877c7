//! Typed configuration (TOML): which source to tail, which backend to
//! publish through, and the pipeline's limits. Unknown fields are errors;
//! every field has a documented default.

use std::path::{Path, PathBuf};

mod auth;
mod backend;
mod common;
mod service;
mod source;

pub use auth::AuthConfig;
pub use backend::{
    BackendConfig, EtcdBackendConfig, RedisBackendConfig, ZmqBackendConfig, DEFAULT_SILENCE_TIMEOUT,
};
pub use common::{
    advertised_uri, redact_endpoints, redact_url, Invalid, DEFAULT_ETCD_ENDPOINT,
    DEFAULT_REDIS_URL, DEFAULT_ZMQ_BIND,
};
pub use service::{
    AdminConfig, BridgeConfig, DiscoveryConfig, HaConfig, LogFormat, MultiprocConfig,
};
pub use source::{EtcdSourceConfig, RedisSourceConfig, SourceConfig};

use common::binds_everything;

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
        // The election follows its database when it is the source's (the
        // default): the override moves both, or the HA instance would
        // campaign on a database the bridge no longer reads.
        if let (Some(ha), Some(source)) = (&mut self.ha, &self.source) {
            match source {
                SourceConfig::Etcd(c) if ha.endpoints == c.endpoints => {
                    if let Some(e) = &etcd {
                        ha.endpoints = e.clone();
                    }
                }
                SourceConfig::Redis(c) if ha.url.as_ref() == Some(&c.url) => {
                    if let Some(url) = &redis {
                        ha.url = Some(url.clone());
                    }
                }
                _ => {}
            }
        }
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

    /// Checks what the types cannot: each section checks itself; what
    /// relates two sections is checked here.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |(field, reason): Invalid| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        if self.source.is_none() && self.multiproc.is_none() {
            return Err(invalid((
                "source",
                "nothing to publish: configure a [source], a [multiproc] channel, or both".into(),
            )));
        }
        if let Some(source) = &self.source {
            source.validate().map_err(invalid)?;
        }
        self.backend.validate().map_err(invalid)?;
        if let Some(m) = &self.multiproc {
            m.validate().map_err(invalid)?;
        }
        if let Some(d) = &self.discovery {
            d.validate().map_err(invalid)?;
            let BackendConfig::Zmq(z) = &self.backend else {
                return Err(invalid((
                    "discovery",
                    "publisher discovery needs the zmq backend: subscribers dial its endpoint"
                        .into(),
                )));
            };
            advertised_uri(&z.bind, d.local_ip.as_deref())
                .map_err(|r| invalid(("discovery.local_ip", r)))?;
        }
        if let Some(ha) = &self.ha {
            ha.validate().map_err(invalid)?;
        }
        self.admin.validate().map_err(invalid)?;
        self.bridge.validate().map_err(invalid)
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
    use crate::codec::Codec;
    use std::time::Duration;

    #[test]
    fn advertised_uris() {
        assert_eq!(
            advertised_uri("tcp://0.0.0.0:8866", Some("10.0.0.5")).unwrap(),
            "tcp://10.0.0.5:8866"
        );
        assert_eq!(
            advertised_uri("tcp://127.0.0.1:8866", Some("10.0.0.5")).unwrap(),
            "tcp://10.0.0.5:8866"
        );
        assert_eq!(
            advertised_uri("tcp://127.0.0.1:8866", None).unwrap(),
            "tcp://127.0.0.1:8866"
        );
        assert_eq!(
            advertised_uri("tcp://10.1.1.1:1", Some("10.0.0.5")).unwrap(),
            "tcp://10.1.1.1:1"
        );
        assert!(advertised_uri("tcp://*:8866", None)
            .unwrap_err()
            .contains("local_ip"));
        assert_eq!(
            advertised_uri("ipc:///tmp/x", None).unwrap(),
            "ipc:///tmp/x"
        );
    }

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
    fn ha_needs_the_name_its_members_share() {
        let text = "[source]\ntype = \"etcd\"\n[backend]\ntype = \"zmq\"\n[ha]\n";
        let err = Config::parse(text, Path::new("t.toml"))
            .unwrap()
            .validate(Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ha.service"), "{err}");
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

    #[test]
    fn env_overrides_move_an_election_that_follows_the_source() {
        let env = |n: &str| match n {
            "FEEDBRIDGE_ETCD_ENDPOINTS" => Some("http://a:1".into()),
            "FEEDBRIDGE_REDIS_URL" => Some("redis://r:1/0".into()),
            _ => None,
        };
        let mut c =
            parse("[source]\ntype = \"etcd\"\n[backend]\ntype = \"zmq\"\n[ha]\nservice = \"s\"\n")
                .unwrap();
        c.apply_env(env);
        assert_eq!(c.ha.unwrap().endpoints, vec!["http://a:1"]);
        let mut c =
            parse("[source]\ntype = \"redis\"\n[backend]\ntype = \"zmq\"\n[ha]\nservice = \"s\"\n")
                .unwrap();
        c.apply_env(env);
        assert_eq!(c.ha.unwrap().url.as_deref(), Some("redis://r:1/0"));
        // An election elsewhere stays where it is.
        let mut c = parse("[source]\ntype = \"etcd\"\n[backend]\ntype = \"zmq\"\n[ha]\nservice = \"s\"\nendpoints = [\"http://e:1\"]\n").unwrap();
        c.apply_env(env);
        assert_eq!(c.ha.unwrap().endpoints, vec!["http://e:1"]);
    }
}
