//! The Redis client, one home for everything that talks to Redis (the
//! source, the backend, discovery, HA): clients with credentials and TLS,
//! connections with a timeout, errors that say what to check, URLs
//! without their secrets.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use crate::config::AuthConfig;

/// The URL without its password, for messages and logs.
pub fn redacted(url: &str) -> String {
    crate::config::redact_url(url)
}

/// A client for `url` with the user, password and TLS files of `auth`
/// (`rediss://` URLs use TLS; `ca_file` adds a CA to trust).
pub fn client(url: &str, auth: &AuthConfig) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo;
    install_tls_provider();
    let info = url.into_connection_info().map_err(|e| e.to_string())?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &auth.user {
        settings = settings.set_username(user);
    }
    if let Some(password) = auth.password()? {
        settings = settings.set_password(password);
    }
    let info = info.set_redis_settings(settings);
    let root_cert = AuthConfig::pem(&auth.ca_file, "ca_file")?;
    let client_tls = match (
        AuthConfig::pem(&auth.cert_file, "cert_file")?,
        AuthConfig::pem(&auth.key_file, "key_file")?,
    ) {
        (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    if root_cert.is_some() || client_tls.is_some() {
        redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
    } else {
        redis::Client::open(info)
    }
    .map_err(|e| e.to_string())
}

/// rustls needs one process-wide crypto provider; ring is the one built in.
pub(crate) fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A connection error with what to check: the credentials when Redis
/// refused them, the address when nothing answered.
pub fn explain(e: &redis::RedisError) -> String {
    let text = e.to_string();
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || ["WRONGPASS", "NOAUTH", "NOPERM"]
            .iter()
            .any(|code| text.contains(code))
    {
        format!("{text}: Redis refused the credentials; check the user and password (in the URL, or auth.user with auth.password_env / auth.password_file)")
    } else if e.is_io_error() || e.is_connection_refusal() {
        format!("{text}; is Redis running at this address?")
    } else {
        text
    }
}

/// Opens a multiplexed connection within `timeout`.
pub async fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> Result<MultiplexedConnection, String> {
    match tokio::time::timeout(timeout, client.get_multiplexed_async_connection()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(explain(&e)),
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}
