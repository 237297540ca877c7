//! What several sections share: default endpoints and durations, endpoint
//! checks, and the redaction of credentials in URLs.

use std::time::Duration;

/// A field's dotted path and what is wrong with its value.
pub type Invalid = (&'static str, String);

/// Dragonflow's publisher port.
pub const DEFAULT_ZMQ_BIND: &str = "tcp://127.0.0.1:8866";
/// etcd's client port on loopback.
pub const DEFAULT_ETCD_ENDPOINT: &str = "http://127.0.0.1:2379";
/// Redis on loopback, database 0.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

pub(super) fn default_etcd_endpoints() -> Vec<String> {
    vec![DEFAULT_ETCD_ENDPOINT.to_owned()]
}
pub(super) fn default_redis_url() -> String {
    DEFAULT_REDIS_URL.to_owned()
}
pub(super) fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// The uri to register for a PUB bound at `bind`: a wildcard host needs
/// `local_ip`; a loopback host is replaced by it when given.
pub fn advertised_uri(bind: &str, local_ip: Option<&str>) -> Result<String, String> {
    let Some(rest) = bind.strip_prefix("tcp://") else {
        return Ok(bind.to_owned()); // ipc: local subscribers only
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{bind} has no port"))?;
    let wildcard = matches!(host, "*" | "0.0.0.0" | "::" | "[::]");
    let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
    match local_ip {
        Some(ip) if wildcard || loopback => Ok(format!("tcp://{ip}:{port}")),
        None if wildcard => Err(format!(
            "backend.bind {bind} listens on every address: set discovery.local_ip to the one remote subscribers should dial"
        )),
        _ => Ok(bind.to_owned()),
    }
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

pub(super) fn check_etcd_endpoints(endpoints: &[String]) -> Result<(), String> {
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

pub(super) fn check_redis_url(url: &str) -> Result<(), String> {
    redis::parse_redis_url(url)
        .map(|_| ())
        .ok_or_else(|| format!("{:?} is not a redis://HOST:PORT/DB URL", redact_url(url)))
}

/// Exactly one of etcd `endpoints` or a Redis `url` is set, and it is
/// well formed; `what` says what the database holds.
pub(super) fn check_one_database(
    endpoints: (&'static str, &[String]),
    url: (&'static str, &Option<String>),
    what: &str,
) -> Result<(), Invalid> {
    match (url.1, endpoints.1.is_empty()) {
        (Some(u), true) => check_redis_url(u).map_err(|r| (url.0, r)),
        (None, false) => check_etcd_endpoints(endpoints.1).map_err(|r| (endpoints.0, r)),
        _ => Err((
            endpoints.0,
            format!("set exactly one of `endpoints` (etcd) or `url` (Redis) for {what}"),
        )),
    }
}

/// Whether `host` is a wildcard address: every interface of the machine.
pub(super) fn binds_everything(host: &str) -> bool {
    matches!(
        host.trim_start_matches('[').trim_end_matches(']'),
        "0.0.0.0" | "*" | "::" | ""
    )
}
