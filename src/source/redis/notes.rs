//! One session's keyspace notifications (every followed master's, merged)
//! and the set of keys they named that are still to be read.

use futures_util::{FutureExt, StreamExt};

use super::sentinels::SENTINEL_PREFIX;
use super::state::{Ended, RedisSource};
use super::topology::Topology;
use crate::source::KeySet;

/// One session's keyspace notifications (every followed master's, merged;
/// each stream ends with a `None`, so a dropped node ends the session) and
/// the keys they named that are still to be read. redis-rs queues what
/// arrives without limit until it is taken, so the session takes it often
/// (between batches, and between the pages of a reconciliation) into
/// `dirty`, where a key is held once however often it changes: memory is
/// bounded by the keys, not by the rate.
pub(super) struct Notes {
    pub(super) stream: futures_util::stream::SelectAll<
        futures_util::stream::BoxStream<'static, Option<redis::Msg>>,
    >,
    /// `__keyspace@<db>__:`
    pub(super) channel_prefix: Vec<u8>,
    /// Keys to read, in the order they were first named...
    pub(super) dirty: std::collections::VecDeque<Vec<u8>>,
    /// ...and the same keys, to hold each once.
    pub(super) queued: KeySet,
    /// A stream ended: a node's notification connection closed.
    pub(super) ended: bool,
}

impl Notes {
    /// Up to `n` keys to read, oldest first.
    pub(super) fn take(&mut self, n: usize) -> Vec<Vec<u8>> {
        let n = n.min(self.dirty.len());
        let keys: Vec<Vec<u8>> = self.dirty.drain(..n).collect();
        for k in &keys {
            self.queued.remove(k);
        }
        keys
    }

    /// Lets go of the subscriptions: dropping the streams stops redis-rs
    /// from queueing more.
    pub(super) fn let_go(&mut self) {
        self.stream = Default::default();
        self.ended = true;
    }
}

impl RedisSource {
    /// Subscribes to the keyspace notifications of every followed master.
    /// They are local to the node that owns the key: one subscription per
    /// master, merged; each stream ends with a `None`, so a dropped node
    /// ends the session.
    pub(super) async fn subscribe(
        &mut self,
        client: &redis::Client,
        topo: &Topology,
        prefix: &str,
    ) -> Result<Notes, Ended> {
        let channel_prefix = format!("__keyspace@{}__:", Self::db(client));
        let mut streams = Vec::with_capacity(topo.masters.len());
        self.sentinel_sent.clear();
        for (_, node_client, _) in &topo.masters {
            let mut pubsub = node_client.get_async_pubsub().await?;
            pubsub
                .psubscribe(format!("{channel_prefix}{prefix}*"))
                .await?;
            if !prefix.is_empty() {
                // The sentinels' own notifications measure the delay.
                pubsub
                    .psubscribe(format!("{channel_prefix}{SENTINEL_PREFIX}*"))
                    .await?;
            }
            streams.push(
                pubsub
                    .into_on_message()
                    .map(Some)
                    .chain(futures_util::stream::once(async { None }))
                    .boxed(),
            );
        }
        Ok(Notes {
            stream: futures_util::stream::select_all(streams),
            channel_prefix: channel_prefix.into_bytes(),
            dirty: Default::default(),
            queued: KeySet::default(),
            ended: false,
        })
    }

    /// Notes the followed key a notification names (once while it waits);
    /// a sentinel's own `set` settles its pending SET instead.
    pub(super) fn note(&mut self, notes: &mut Notes, m: redis::Msg) {
        let Ok(channel) = m.get_channel::<Vec<u8>>() else {
            return;
        };
        let Some(key) = channel.strip_prefix(notes.channel_prefix.as_slice()) else {
            return;
        };
        if key.starts_with(SENTINEL_PREFIX.as_bytes()) {
            // `SET … EX` also notifies `expire`: one per SET counts.
            if m.get_payload_bytes() == b"set" {
                self.sentinel_notified(key);
            }
            return;
        }
        if self.follows(key) && notes.queued.insert(key.to_vec()) {
            notes.dirty.push_back(key.to_vec());
        }
    }

    /// Takes every notification that has already arrived.
    pub(super) fn drain(&mut self, notes: &mut Notes) {
        while !notes.ended {
            match notes.stream.next().now_or_never() {
                Some(Some(Some(m))) => self.note(notes, m),
                Some(_) => notes.ended = true,
                None => break,
            }
        }
    }
}
