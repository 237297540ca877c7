//! The etcd client, one home for everything that talks to etcd (the
//! source, the backend, discovery, HA, the checkpoint): connections with
//! keep-alive, credentials and TLS, and KV / watch clients that accept
//! every response etcd may legally send.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::AuthConfig;

/// The largest response the client decodes: what etcd's gRPC server may
/// send (its send limit is `math.MaxInt32`). tonic's default of 4 MiB
/// refuses legal responses (a delete-range with previous values, a
/// catch-up after downtime), and a refused watch response is sent again on
/// every re-watch: the source would never get past it.
pub const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// A KV client of `client` that accepts every response etcd may send.
pub fn kv_client(client: &Client) -> etcd_client::KvClient {
    client
        .kv_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// A watch client of `client` that accepts every response etcd may send.
pub fn watch_client(client: &Client) -> etcd_client::WatchClient {
    client
        .watch_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// Connects an etcd client with keep-alive and require-leader, so a
/// partitioned member is noticed instead of silently serving nothing; with
/// the user, password and TLS files of `auth`.
pub async fn connect(
    endpoints: &[String],
    timeout: Duration,
    auth: &AuthConfig,
) -> Result<Client, etcd_client::Error> {
    let invalid = etcd_client::Error::InvalidArgs;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some(user) = &auth.user {
        let password = auth.password().map_err(invalid)?.unwrap_or_default();
        options = options.with_user(user.clone(), password);
    }
    let ca = AuthConfig::pem(&auth.ca_file, "ca_file").map_err(invalid)?;
    let cert = AuthConfig::pem(&auth.cert_file, "cert_file").map_err(invalid)?;
    let key = AuthConfig::pem(&auth.key_file, "key_file").map_err(invalid)?;
    if ca.is_some() || cert.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let (Some(cert), Some(key)) = (cert, key) {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    Client::connect(endpoints, Some(options)).await
}

/// The first key after every key that starts with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the empty prefix: every key
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/"), b"0");
        assert_eq!(prefix_end(b"/a"), b"/b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
