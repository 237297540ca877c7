//! The Redis client, one home for everything that talks to Redis (the
//! source, the backend, discovery, HA): clients with credentials and TLS,
//! connections with a timeout that work the same on a standalone server
//! and on a Redis Cluster ([`Conn`]), the cluster's masters and key slots,
//! errors that say what to check, URLs without their secrets.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

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
    let info = info
        .set_redis_settings(settings)
        .set_tcp_settings(tcp_settings());
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

/// Every Redis connection's own liveness, so a server that vanished without
/// a word (a partition, a host powered off) is noticed even while the
/// connection only receives (a subscriber, a source between notifications):
/// keep-alive probes after 10 s idle, every 2 s, dead after 3 unanswered;
/// and a write left unacknowledged for 20 s (`TCP_USER_TIMEOUT`) fails the
/// connection instead of the kernel's ~15 minutes of retransmissions.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    redis::io::tcp::TcpSettings::default()
        .set_keepalive(keepalive)
        .set_user_timeout(Duration::from_secs(20))
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

/// Opens a connection to the one server `client` names, within `timeout`.
pub async fn connect_node(
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

/// A connection to a standalone Redis or to a Redis Cluster: a command on a
/// key reaches the node that owns it either way (a cluster connection
/// follows `MOVED` / `ASK` and the topology). A pipeline must stay within
/// one slot on a cluster.
#[derive(Clone)]
pub enum Conn {
    /// A standalone server (or one node).
    Single(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The nodes last seen in each cluster, by the address of the node a
/// config names: when that node is down later, the others are tried as
/// seeds, so "any node's URL" keeps working through its failure.
static KNOWN_NODES: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
> = std::sync::LazyLock::new(Default::default);

/// `client`'s node first, then the other nodes last seen in its cluster.
pub fn seeds(client: &redis::Client) -> Vec<redis::Client> {
    let named = addr_of(client);
    let known = KNOWN_NODES
        .lock()
        .expect("known nodes lock")
        .get(&named)
        .cloned()
        .unwrap_or_default();
    std::iter::once(client.clone())
        .chain(
            known
                .iter()
                .filter(|a| **a != named)
                .filter_map(|a| node_client(client, a).ok()),
        )
        .collect()
}

/// `host:port` of the server a client names.
pub fn addr_of(client: &redis::Client) -> String {
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        other => other.to_string(),
    }
}

/// Opens a connection within `timeout`: to the server `client` names, or,
/// when that server is a Redis Cluster node (`cluster_enabled:1`), to the
/// whole cluster. When the named node does not answer, the other nodes
/// last seen in its cluster are tried.
pub async fn connect(client: &redis::Client, timeout: Duration) -> Result<Conn, String> {
    let seeds = seeds(client);
    let mut first_error = None;
    for seed in &seeds {
        let mut node = match connect_node(seed, timeout).await {
            Ok(n) => n,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        // A user that may not run INFO (a restrictive ACL) talks to a
        // standalone server as before.
        let cluster = match cluster_enabled(&mut node).await {
            Ok(cluster) => cluster,
            Err(e) if e.is_io_error() || e.is_connection_dropped() => return Err(explain(&e)),
            Err(_) => false,
        };
        if !cluster {
            return Ok(Conn::Single(node));
        }
        let cluster = redis::cluster::ClusterClientBuilder::new(
            std::iter::once(seed)
                .chain(seeds.iter())
                .map(|c| c.get_connection_info().clone()),
        )
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .build()
        .map_err(|e| explain(&e))?;
        let mut conn = match tokio::time::timeout(timeout, cluster.get_async_connection()).await {
            Ok(Ok(c)) => Conn::Cluster(c),
            Ok(Err(e)) => return Err(format!("cluster: {}", explain(&e))),
            Err(_) => {
                return Err(format!(
                    "cluster: no answer within {}",
                    humantime::format_duration(timeout)
                ))
            }
        };
        remember_nodes(client, &mut conn).await;
        return Ok(conn);
    }
    Err(first_error.unwrap_or_else(|| "no node to connect to".into()))
}

/// Records the cluster's current nodes as seeds for `client`.
pub async fn remember_nodes(client: &redis::Client, conn: &mut Conn) {
    if let Ok(nodes) = nodes(conn, "").await {
        let addrs = nodes.into_iter().map(|n| n.addr).collect();
        KNOWN_NODES
            .lock()
            .expect("known nodes lock")
            .insert(addr_of(client), addrs);
    }
}

/// Whether the server is a Redis Cluster node (`INFO cluster`).
pub async fn cluster_enabled(conn: &mut impl ConnectionLike) -> redis::RedisResult<bool> {
    let info: String = redis::cmd("INFO").arg("cluster").query_async(conn).await?;
    Ok(info.lines().any(|l| l.trim() == "cluster_enabled:1"))
}

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part
/// between the first `{` and the next `}`, when not empty), else of the
/// whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// One node of a cluster, as `CLUSTER NODES` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    /// `host:port` clients connect to.
    pub addr: String,
    /// Whether it is a master (else a replica).
    pub master: bool,
    /// The slot ranges it serves (masters), inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// Whether `slot` lies in one of the inclusive `ranges`.
pub fn in_slots(slot: u16, ranges: &[(u16, u16)]) -> bool {
    ranges.iter().any(|&(a, b)| a <= slot && slot <= b)
}

/// The master serving `slot`, if any.
pub fn master_of(nodes: &[Node], slot: u16) -> Option<&Node> {
    nodes.iter().find(|n| n.master && in_slots(slot, &n.slots))
}

/// The cluster's nodes that are not failed, sorted; a standalone server is
/// one master of every slot at `standalone_addr`.
pub async fn nodes(conn: &mut Conn, standalone_addr: &str) -> redis::RedisResult<Vec<Node>> {
    if !conn.is_cluster() {
        return Ok(vec![Node {
            addr: standalone_addr.to_owned(),
            master: true,
            slots: vec![(0, SLOTS - 1)],
        }]);
    }
    let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
    Ok(parse_cluster_nodes(&text))
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <master>
/// <ping> <pong> <epoch> <link> <slot>...`; failed and handshaking nodes
/// are left out, and so are the migration markers (`[slot->-id]`).
pub fn parse_cluster_nodes(text: &str) -> Vec<Node> {
    let mut nodes: Vec<Node> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let flags = fields[2];
            if flags.contains("fail") || flags.contains("handshake") || flags.contains("noaddr") {
                return None;
            }
            let addr = fields[1].split(['@', ',']).next()?.to_owned();
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(Node {
                addr,
                master: flags.contains("master"),
                slots,
            })
        })
        .collect();
    nodes.sort();
    nodes
}

/// A direct connection to the master that serves `key` on the cluster
/// `conn` is connected to (`client` names any node of it): for commands
/// that are not routed by key, such as SCAN of one slot's keys.
pub async fn owner_of(
    conn: &mut Conn,
    client: &redis::Client,
    key: &[u8],
) -> Result<MultiplexedConnection, String> {
    let slot = slot(key);
    let nodes = nodes(conn, "").await.map_err(|e| explain(&e))?;
    let owner = master_of(&nodes, slot).ok_or_else(|| format!("no master serves slot {slot}"))?;
    connect_node(&node_client(client, &owner.addr)?, Duration::from_secs(5)).await
}

/// A client for one node `addr` (`host:port`) of the cluster `client`
/// belongs to, with the same credentials and TLS.
pub fn node_client(client: &redis::Client, addr: &str) -> Result<redis::Client, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("{addr} is not HOST:PORT"))?;
    let info = client.get_connection_info().clone();
    let node = match info.addr().clone() {
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            tls_params,
        },
        _ => redis::ConnectionAddr::Tcp(host, port),
    };
    redis::Client::open(info.set_addr(node)).map_err(|e| explain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from Redis' CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(
            slot(b"{}foo"),
            slot(b"{}foo"),
            "an empty tag hashes the key"
        );
        assert_ne!(slot(b"{}foo"), slot(b""));
        assert_eq!(slot(b"{lport.t1}p1"), slot(b"lport.t1"));
    }

    #[test]
    fn cluster_nodes_are_parsed() {
        let text = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922 [5461->-c3]
c3 127.0.0.1:7003@17003,host3 master - 0 0 3 connected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected
e5 127.0.0.1:7005@17005 master,fail - 0 0 4 disconnected
";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[1].slots, vec![(5461, 10922)]);
        assert_eq!(nodes[2].addr, "127.0.0.1:7003");
        assert!(!nodes[3].master);
    }
}
