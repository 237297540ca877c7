//! FLUSHDB, FLUSHALL and SWAPDB send no per-key notification: each
//! followed master holds a sentinel key of this source's, checked every
//! second; one gone or not its own means the database was flushed or
//! swapped. The sentinels' own notifications also clock how late the
//! notifications are read.

use std::time::{Duration, Instant};

use super::state::RedisSource;
use super::topology::{key_in_slots, Topology};

/// FLUSHDB, FLUSHALL and SWAPDB emit no per-key notification. The source
/// keeps a sentinel key of its own in the database and checks it this
/// often (one GET + SET round trip); when it is gone or not its own, the
/// database was flushed or swapped, and a full reconciliation emits the
/// deletes (and creates) that followed.
pub(super) const SENTINEL_INTERVAL: Duration = Duration::from_secs(1);

/// The sentinel outlives a dead bridge by this long at most.
pub(super) const SENTINEL_TTL_SECONDS: u64 = 30;

/// Prefix of the sentinel keys (one per running source).
pub const SENTINEL_PREFIX: &str = "__feedbridge_sentinel__:";

/// How late notifications may be read (measured with the sentinel's own)
/// before the source lets go of them and reconciles instead.
pub(super) const NOTIFICATION_DELAY_MAX: Duration = Duration::from_secs(2);

impl RedisSource {
    /// Refreshes the sentinels (one per followed master, each a key in
    /// that master's slots); `true` when one had vanished or been replaced
    /// since the last check: that database was flushed or swapped. Without
    /// write permission, a key count below the keys known to exist says the
    /// same (weaker: a refill before the check hides it).
    pub(super) async fn flushed(&mut self, topo: &mut Topology) -> redis::RedisResult<bool> {
        let token = self.sentinel.1.clone();
        if !self.sentinel_refused {
            let mut flushed = false;
            for (node, _, _) in &topo.masters {
                let key = key_in_slots(&self.sentinel.0, &node.slots, &token);
                let sent = Instant::now();
                let result: redis::RedisResult<(Option<String>, ())> = redis::pipe()
                    .cmd("GET")
                    .arg(&key)
                    .cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("EX")
                    .arg(SENTINEL_TTL_SECONDS)
                    .query_async(&mut topo.data)
                    .await;
                match result {
                    Ok((found, ())) => {
                        flushed |= found.as_deref() != Some(token.as_str());
                        self.sentinel_sent
                            .entry(key.into_bytes())
                            .or_default()
                            .push_back(sent);
                    }
                    Err(e) if e.is_io_error() || e.is_connection_dropped() => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot write the sentinel key that reveals FLUSHDB / FLUSHALL / SWAPDB; falling back to the key count, which a quick refill can hide. Allow SET on keys {SENTINEL_PREFIX}* for this user.");
                        self.sentinel_refused = true;
                        break;
                    }
                }
            }
            if !self.sentinel_refused {
                return Ok(flushed);
            }
        }
        let mut size = 0usize;
        for (_, _, conn) in &mut topo.masters {
            size += redis::cmd("DBSIZE").query_async::<usize>(conn).await?;
        }
        Ok(size < self.index.len())
    }

    /// A sentinel's notification came back: its SET is no longer pending.
    pub(super) fn sentinel_notified(&mut self, key: &[u8]) {
        if let Some(sent) = self.sentinel_sent.get_mut(key) {
            sent.pop_front();
        }
    }

    /// How long the oldest sentinel SET has waited for its notification:
    /// the delay of everything notified after it, queued unread.
    pub(super) fn notification_delay(&self) -> Duration {
        self.sentinel_sent
            .values()
            .filter_map(|sent| sent.front())
            .map(|t| t.elapsed())
            .max()
            .unwrap_or_default()
    }

    /// A reconciliation just ended: notifications queued while it ran are
    /// its own delay, not a backlog the reading cannot catch up with.
    pub(super) fn restart_sentinel_clocks(&mut self) {
        let now = Instant::now();
        for t in self.sentinel_sent.values_mut().flatten() {
            *t = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::redis::notes::Notes;
    use crate::source::redis::test_source;
    use crate::source::KeySet;
    use redis::Value;

    #[test]
    fn each_sentinel_set_is_settled_by_its_set_notification_only() {
        let mut s = test_source();
        let prefix = b"__keyspace@0__:";
        let key = format!("{SENTINEL_PREFIX}{{fb0}}token");
        let notification = |event: &str| {
            redis::Msg::from_owned_value(Value::Array(vec![
                Value::BulkString(b"pmessage".to_vec()),
                Value::BulkString(b"__keyspace@0__:*".to_vec()),
                Value::BulkString([&prefix[..], key.as_bytes()].concat()),
                Value::BulkString(event.as_bytes().to_vec()),
            ]))
            .unwrap()
        };
        let old = Instant::now() - Duration::from_secs(5);
        let pending = s.sentinel_sent.entry(key.clone().into_bytes()).or_default();
        pending.extend([old, old + Duration::from_secs(4)]);
        assert!(s.notification_delay() >= Duration::from_secs(5));
        let mut notes = Notes {
            stream: futures_util::stream::select_all(Vec::new()),
            channel_prefix: prefix.to_vec(),
            dirty: Default::default(),
            queued: KeySet::default(),
            ended: false,
        };
        // The first SET comes back: "set", then "expire".
        for event in ["set", "expire"] {
            s.note(&mut notes, notification(event));
        }
        let delay = s.notification_delay();
        assert!(
            delay >= Duration::from_secs(1) && delay < Duration::from_secs(2),
            "the second SET is still pending: {delay:?}"
        );
        assert!(notes.dirty.is_empty(), "a sentinel is never published");
        // A key named twice waits once.
        let row = |event: &str| {
            redis::Msg::from_owned_value(Value::Array(vec![
                Value::BulkString(b"pmessage".to_vec()),
                Value::BulkString(b"__keyspace@0__:*".to_vec()),
                Value::BulkString(b"__keyspace@0__:{t.}k".to_vec()),
                Value::BulkString(event.as_bytes().to_vec()),
            ]))
            .unwrap()
        };
        s.note(&mut notes, row("set"));
        s.note(&mut notes, row("set"));
        assert_eq!(notes.take(10), vec![b"{t.}k".to_vec()]);
        s.note(&mut notes, row("del"));
        assert_eq!(notes.dirty.len(), 1, "taken, then named again");
        s.restart_sentinel_clocks();
        assert!(s.notification_delay() < Duration::from_secs(1));
    }
}
