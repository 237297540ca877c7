//! Keyspace notifications must carry what the source needs: enabled with
//! CONFIG SET where allowed, else verified with a probe key, else refused
//! with the exact flags to set; on every node, replicas included.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;

use super::state::RedisSource;
use super::topology::{key_in_slots, Topology};
use crate::db::redis::connect_node;

/// The notification classes the source needs: K keyspace, g generic (del,
/// rename, expire), $ string, h hash, x expired, e evicted, n new key.
pub const NEEDED_FLAGS: &str = "Kg$hxen";

/// Which flags of `NEEDED_FLAGS` the setting `current` lacks (`A` stands
/// for `g$lshzxet`).
pub fn missing_flags(current: &str) -> String {
    let expanded = current.replace('A', "g$lshzxet");
    NEEDED_FLAGS
        .chars()
        .filter(|c| !expanded.contains(*c))
        .collect()
}

impl RedisSource {
    /// Makes sure keyspace notifications are on for every node: masters,
    /// and replicas too (they become masters at a failover). An unreachable
    /// replica is only warned about.
    pub(super) async fn ensure_all(
        &self,
        client: &redis::Client,
        topo: &mut Topology,
    ) -> Result<(), String> {
        for (node, node_client, conn) in &mut topo.masters {
            self.ensure_notifications(node_client, conn, &node.slots)
                .await
                .map_err(|e| format!("node {}: {e}", node.addr))?;
        }
        if !topo.data.is_cluster() {
            return Ok(());
        }
        for node in topo.nodes.iter().filter(|n| !n.master) {
            let result = async {
                let c = crate::db::redis::node_client(client, &node.addr)?;
                let mut conn = connect_node(&c, self.config.connect_timeout).await?;
                self.ensure_notifications(&c, &mut conn, &node.slots).await
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(node = %node.addr, error = %e, "Cannot check keyspace notifications on this replica; after it becomes a master the source checks again.");
            }
        }
        Ok(())
    }

    /// Makes sure keyspace notifications carry what the source needs:
    /// enables them with CONFIG SET when allowed, else verifies them by
    /// writing a probe key, else says exactly which flags to set.
    pub(super) async fn ensure_notifications(
        &self,
        client: &redis::Client,
        conn: &mut MultiplexedConnection,
        slots: &[(u16, u16)],
    ) -> Result<(), String> {
        let refuse = |why: String, missing: &str| {
            format!(
                "Redis keyspace notifications lack the classes feedbridge needs ({why}). \
                 Set `notify-keyspace-events {NEEDED_FLAGS}` (K keyspace, g generic, $ string, h hash, \
                 x expired, e evicted, n new key; missing here: {missing}) in redis.conf or your provider's \
                 settings, or allow CONFIG SET for this user"
            )
        };
        let current: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(conn)
            .await;
        match current {
            Ok(pair) if pair.len() == 2 => {
                let missing = missing_flags(&pair[1]);
                if missing.is_empty() {
                    return Ok(());
                }
                let wanted = format!("{}{}", pair[1], missing);
                let set: redis::RedisResult<()> = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("notify-keyspace-events")
                    .arg(&wanted)
                    .query_async(conn)
                    .await;
                match set {
                    Ok(()) => {
                        tracing::info!(was = %pair[1], now = %wanted, "Enabled Redis keyspace notifications.");
                        Ok(())
                    }
                    Err(e) => Err(refuse(format!("CONFIG SET refused: {e}"), &missing)),
                }
            }
            Ok(_) | Err(_) => {
                // CONFIG is renamed away or not allowed (managed Redis, ACL):
                // check by observation.
                match self.probe_notifications(client, conn, slots).await {
                    Ok(()) => {
                        tracing::info!("CONFIG is not available; a probe key showed keyspace notifications are on (expired/evicted cannot be verified this way).");
                        Ok(())
                    }
                    Err(missing) => Err(refuse(
                        "CONFIG is not available and a probe key produced no notifications".into(),
                        &missing,
                    )),
                }
            }
        }
    }

    /// Writes and deletes a probe key and waits for its `new`, `set`,
    /// `hset` and `del` notifications. Returns the flags not observed.
    pub(super) async fn probe_notifications(
        &self,
        client: &redis::Client,
        conn: &mut MultiplexedConnection,
        slots: &[(u16, u16)],
    ) -> Result<(), String> {
        if slots.is_empty() {
            return Err(NEEDED_FLAGS.to_owned()); // a replica: nothing to write to
        }
        // A key this node serves (on a cluster, any other key is MOVED).
        let key = key_in_slots(
            "__feedbridge_probe__:",
            slots,
            &std::process::id().to_string(),
        );
        let mut pubsub = client
            .get_async_pubsub()
            .await
            .map_err(|_| NEEDED_FLAGS.to_owned())?;
        pubsub
            .subscribe(format!("__keyspace@{}__:{key}", Self::db(client)))
            .await
            .map_err(|_| NEEDED_FLAGS.to_owned())?;
        let writes: redis::RedisResult<()> = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg("1")
            .ignore()
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .cmd("HSET")
            .arg(&key)
            .arg("f")
            .arg("1")
            .ignore()
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .query_async(conn)
            .await;
        writes.map_err(|_| NEEDED_FLAGS.to_owned())?;
        let mut seen = HashSet::new();
        let mut messages = pubsub.on_message();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while seen.len() < 4 {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(m)) => {
                    seen.insert(String::from_utf8_lossy(m.get_payload_bytes()).into_owned());
                }
                _ => break,
            }
        }
        let missing: String = [("new", 'n'), ("set", '$'), ("hset", 'h'), ("del", 'g')]
            .iter()
            .filter(|(event, _)| !seen.contains(*event))
            .map(|(_, flag)| *flag)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else if seen.is_empty() {
            Err(NEEDED_FLAGS.to_owned())
        } else {
            Err(missing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        assert_eq!(missing_flags(""), NEEDED_FLAGS);
        assert_eq!(missing_flags("KA"), "n");
        assert_eq!(missing_flags("AKn"), "");
        assert_eq!(missing_flags("Ex"), "Kg$hen");
    }
}
