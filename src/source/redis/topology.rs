//! What a session follows: a standalone server, or every master of a
//! Redis Cluster that owns followed slots (`source.slots`), each with a
//! client for its notifications and a direct connection for SCAN.

use redis::aio::MultiplexedConnection;

use super::state::RedisSource;
use crate::db::redis::{connect, connect_node, explain, in_slots, slot, Conn, Node, SLOTS};

/// What one session follows: the data connection (a standalone server or
/// the whole cluster) and, for each master owning followed slots, a client
/// (its notifications) and a direct connection (SCAN, DBSIZE).
pub(super) struct Topology {
    pub(super) data: Conn,
    /// Every node, replicas too.
    pub(super) nodes: Vec<Node>,
    pub(super) masters: Vec<(Node, redis::Client, MultiplexedConnection)>,
    /// The slots each of `masters` serves now, for routing reads: refreshed
    /// at each check, so a slot migration does not send its keys' reads
    /// through a redirect for the rest of the session. (The masters'
    /// `Node`s keep the slots of the session's start: they place the
    /// sentinels, which must not move.)
    pub(super) routes: Vec<Vec<(u16, u16)>>,
}

/// Whether `node` is a master owning any of the followed `slots`.
pub(super) fn followed(node: &Node, slots: &[(u16, u16)]) -> bool {
    node.master
        && node
            .slots
            .iter()
            .any(|&(a, b)| slots.iter().any(|&(c, d)| a <= d && c <= b))
}

/// The masters that own any of the followed slots, by address.
pub(super) fn followed_masters(nodes: &[Node], slots: &[(u16, u16)]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| followed(n, slots))
        .map(|n| n.addr.clone())
        .collect()
}

/// `prefix{tag}suffix` with a hash tag whose slot is in `slots`, so the key
/// lives on the node serving them.
pub(super) fn key_in_slots(prefix: &str, slots: &[(u16, u16)], suffix: &str) -> String {
    let tag = (0u32..)
        .map(|i| format!("fb{i}"))
        .find(|tag| slots.is_empty() || in_slots(slot(tag.as_bytes()), slots))
        .expect("some tag hashes into any non-empty range");
    format!("{prefix}{{{tag}}}{suffix}")
}

impl RedisSource {
    /// Whether this bridge follows `key` (its slot is in `source.slots`).
    pub(super) fn follows(&self, key: &[u8]) -> bool {
        self.slots == [(0, SLOTS - 1)] || in_slots(slot(key), &self.slots)
    }

    /// Connects for one session: the data connection (standalone, or the
    /// whole cluster), every node, and a direct connection to each master
    /// that owns followed slots.
    pub(super) async fn topology(&self, client: &redis::Client) -> Result<Topology, String> {
        let timeout = self.config.connect_timeout;
        let mut data = connect(client, timeout).await?;
        let nodes = crate::db::redis::nodes(&mut data, &crate::db::redis::addr_of(client))
            .await
            .map_err(|e| explain(&e))?;
        let mut masters = Vec::new();
        for node in nodes.iter().filter(|n| followed(n, &self.slots)) {
            let node_client = if data.is_cluster() {
                crate::db::redis::node_client(client, &node.addr)?
            } else {
                client.clone()
            };
            let conn = connect_node(&node_client, timeout)
                .await
                .map_err(|e| format!("master {}: {e}", node.addr))?;
            masters.push((node.clone(), node_client, conn));
        }
        if data.is_cluster() && masters.is_empty() {
            return Err("no master of the cluster serves the followed slots (source.slots)".into());
        }
        let routes = masters.iter().map(|(n, _, _)| n.slots.clone()).collect();
        Ok(Topology {
            data,
            nodes,
            masters,
            routes,
        })
    }

    /// Whether the cluster's masters changed since `followed` (a failover,
    /// nodes added or removed): the session then starts again. Refreshes
    /// the read routes (slots migrate between the same masters).
    pub(super) async fn masters_changed(
        &self,
        topo: &mut Topology,
        followed: &[String],
    ) -> redis::RedisResult<bool> {
        if !topo.data.is_cluster() {
            return Ok(false);
        }
        let nodes = crate::db::redis::nodes(&mut topo.data, "").await?;
        let now = followed_masters(&nodes, &self.slots);
        for ((master, _, _), route) in topo.masters.iter().zip(&mut topo.routes) {
            if let Some(n) = nodes.iter().find(|n| n.addr == master.addr) {
                route.clone_from(&n.slots);
            }
        }
        if now != followed {
            tracing::info!(was = ?followed, ?now, "The cluster's masters changed (failover, or nodes added or removed); subscribing to the new ones and reconciling.");
            return Ok(true);
        }
        Ok(false)
    }
}
