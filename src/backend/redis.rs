//! The Redis backend: `PUBLISH <topic> <payload>`, and a subscriber on the
//! topics' channels that resubscribes after a reconnect and then delivers a
//! `sync` (messages published while it was away are gone for good).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::db::redis::Conn;
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::registry::{Registration, Registry};
use super::sequence::{
    silence_reason, Dedup, GapTracker, Sequencer, Silence, HEARTBEAT_INTERVAL, HEARTBEAT_TOPIC,
};
use crate::codec::{Codec, Envelope};
use crate::config::RedisBackendConfig;
use crate::db::redis::{client, connect, redacted};
use crate::pubsub::{PublishError, Publisher, SubscribeError, Subscriber};
use crate::retry::Reconnect;
use crate::update::DbUpdate;

/// `PUBLISH` publisher. A failed command drops the connection; the next
/// send reconnects (the bridge retries with backoff).
pub struct RedisPublisher {
    client: redis::Client,
    codec: Codec,
    sequencer: Arc<Sequencer>,
    timeout: Duration,
    /// `SPUBLISH` instead of `PUBLISH`.
    sharded: bool,
    connection: Arc<Mutex<Option<Conn>>>,
    /// Under HA: the fence this term holds (see [`RedisPublisher::fenced`]).
    fence: Option<Arc<Fence>>,
    /// Stops the heartbeat task when the publisher goes away.
    _heartbeat: tokio_util::sync::DropGuard,
}

/// A fence key in Redis and the token of the term that set it: a publish
/// goes out only while the key still holds this term's token, so a
/// deposed leader's write that was already in the client's hands when the
/// process froze is refused by Redis, not delivered after the new
/// leader's (a local lease cannot stop it).
#[derive(Debug)]
struct Fence {
    key: String,
    token: String,
    /// Cancelled once a newer term is found holding the fence.
    fenced: CancellationToken,
}

impl Fence {
    /// A newer term holds the fence: this term can never publish again.
    fn lost(&self) {
        if !self.fenced.is_cancelled() {
            tracing::warn!(fence = %self.key, "A newer leader's term holds the publishing fence: this term can never publish again; standing down.");
            self.fenced.cancel();
        }
    }
}

/// PUBLISHes (topic, payload) pairs while the fence holds the token.
const FENCED_PUBLISH: &str = "if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end \
for i = 2, #ARGV, 2 do redis.call('publish', ARGV[i], ARGV[i + 1]) end return 1";

/// One fenced publish of `pairs`: `Ok(false)` when a newer term holds the
/// fence.
async fn publish_fenced(
    conn: &mut Conn,
    fence: &Fence,
    pairs: &[(&str, Vec<u8>)],
) -> redis::RedisResult<bool> {
    let mut eval = redis::cmd("EVAL");
    eval.arg(FENCED_PUBLISH)
        .arg(1)
        .arg(&fence.key)
        .arg(&fence.token);
    for (topic, payload) in pairs {
        eval.arg(*topic).arg(payload);
    }
    Ok(eval.query_async::<i64>(conn).await? == 1)
}

/// PUBLISHes a heartbeat on [`HEARTBEAT_TOPIC`] every
/// [`HEARTBEAT_INTERVAL`] (under the connection lock, so it follows the
/// numbers it announces), until `stop`. Not while the connection is down:
/// the next publish reconnects.
fn spawn_heartbeat(
    connection: Arc<Mutex<Option<Conn>>>,
    sequencer: Arc<Sequencer>,
    codec: Codec,
    sharded: bool,
    fence: Option<Arc<Fence>>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // The gate is asked under the lock, right before sending: a
            // heartbeat that waited for the lock while leadership was lost
            // (a paused process) is not sent late.
            let mut guard = connection.lock().await;
            let Some((update, envelope)) = sequencer.heartbeat() else {
                continue;
            };
            if let Some(conn) = guard.as_mut() {
                let payload = codec.encode(&update, &envelope);
                if let Some(fence) = &fence {
                    let pairs = [(HEARTBEAT_TOPIC, payload)];
                    let sent = publish_fenced(conn, fence, &pairs);
                    if let Ok(Ok(false)) = tokio::time::timeout(HEARTBEAT_INTERVAL, sent).await {
                        fence.lost();
                    }
                    continue;
                }
                let mut publish = redis::cmd(if sharded { "SPUBLISH" } else { "PUBLISH" });
                publish.arg(HEARTBEAT_TOPIC).arg(payload);
                let sent = publish.query_async::<()>(conn);
                let _ = tokio::time::timeout(HEARTBEAT_INTERVAL, sent).await;
            }
        }
    });
}

impl RedisPublisher {
    /// Connects now, so a wrong URL or a down server fails at start-up.
    pub async fn connect(
        config: &RedisBackendConfig,
        sequencer: Arc<Sequencer>,
    ) -> Result<Self, PublishError> {
        Self::fenced(config, sequencer, None).await
    }

    /// The same, for an HA term: with `fence_key`, this term first takes
    /// the fence (its token in that key), and every publish goes out only
    /// while Redis still holds it. Not with `sharded` (a script may not
    /// SPUBLISH to channels outside its key's slot).
    pub async fn fenced(
        config: &RedisBackendConfig,
        sequencer: Arc<Sequencer>,
        fence: Option<(String, CancellationToken)>,
    ) -> Result<Self, PublishError> {
        let setup = |message: String| PublishError::Setup {
            backend: "redis",
            message: format!("{} (check backend.url {})", message, redacted(&config.url)),
        };
        let client = client(&config.url, &config.auth).map_err(setup)?;
        let conn = connect(&client, config.connect_timeout)
            .await
            .map_err(|e| setup(format!("cannot connect: {e}")))?;
        tracing::info!(url = %redacted(&config.url), codec = %config.codec, "Redis publisher connected.");
        let mut conn = conn;
        let fence = match fence.filter(|_| !config.sharded) {
            Some((key, fenced)) => {
                // A term that is not (or no longer) valid must not take the
                // fence from the one that is: an election answered after
                // this instance's lease expired, a pause since.
                if !sequencer.gate_open() {
                    return Err(setup(format!(
                        "not taking the publishing fence {key}: leadership lost before publishing began"
                    )));
                }
                let token = format!("{}:{}", sequencer.id(), sequencer.epoch());
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| setup(format!("cannot take the publishing fence {key}: {e}")))?;
                Some(Arc::new(Fence { key, token, fenced }))
            }
            None => None,
        };
        let connection = Arc::new(Mutex::new(Some(conn)));
        let stop = CancellationToken::new();
        spawn_heartbeat(
            connection.clone(),
            sequencer.clone(),
            config.codec,
            config.sharded,
            fence.clone(),
            stop.clone(),
        );
        Ok(RedisPublisher {
            client,
            codec: config.codec,
            sequencer,
            timeout: config.connect_timeout,
            sharded: config.sharded,
            connection,
            fence,
            _heartbeat: stop.drop_guard(),
        })
    }
}

impl RedisPublisher {
    /// PUBLISHes `(update, topic)` pairs in one pipelined round trip.
    /// Stamped under the connection lock, so numbers go out in order; a
    /// failure gives the numbers back for the retry.
    async fn publish_all(&self, items: &[(&DbUpdate, &str)]) -> Result<(), PublishError> {
        let send_error = |message: String| PublishError::Send {
            backend: "redis",
            message,
        };
        let mut guard = self.connection.lock().await;
        let conn = match guard.as_mut() {
            Some(c) => c,
            None => guard.insert(
                connect(&self.client, self.timeout)
                    .await
                    .map_err(send_error)?,
            ),
        };
        // Leadership is checked again here, under the lock and right before
        // sending: a batch that waited for the lock (or a process paused
        // after the pipeline's check) is not published late. A write the
        // client library already holds still goes out (README: HA).
        if !self.sequencer.gate_open() {
            return Err(send_error("not the leader any more".into()));
        }
        if let Some(fence) = &self.fence {
            // One script for the batch: Redis refuses it whole once a newer
            // term holds the fence, whenever it arrives.
            let pairs: Vec<(&str, Vec<u8>)> = items
                .iter()
                .map(|(update, topic)| {
                    (
                        *topic,
                        self.codec.encode(update, &self.sequencer.stamp(topic)),
                    )
                })
                .collect();
            let sent = tokio::time::timeout(self.timeout, publish_fenced(conn, fence, &pairs))
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "PUBLISH timed out",
                    )))
                });
            let failure = match sent {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    fence.lost();
                    "fenced: a newer leader's term holds the publishing fence".to_owned()
                }
                Err(e) => {
                    *guard = None;
                    e.to_string()
                }
            };
            for (_, topic) in items.iter().rev() {
                self.sequencer.rollback(topic);
            }
            return Err(send_error(failure));
        }
        // PUBLISH reaches every node of a cluster from any node: one
        // pipeline. SPUBLISH goes to the channel's slot owner: on a cluster
        // one pipeline per slot (a pipeline may not cross slots), sent at
        // once; the order within a topic is kept.
        let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        let mut pipes: Vec<(u16, redis::Pipeline)> = Vec::new();
        for (update, topic) in items {
            let payload = self.codec.encode(update, &self.sequencer.stamp(topic));
            let slot = if self.sharded && conn.is_cluster() {
                crate::db::redis::slot(topic.as_bytes())
            } else {
                0
            };
            let pipe = match pipes.iter_mut().position(|(s, _)| *s == slot) {
                Some(i) => &mut pipes[i].1,
                None => {
                    pipes.push((slot, redis::pipe()));
                    &mut pipes.last_mut().expect("just pushed").1
                }
            };
            pipe.cmd(command).arg(*topic).arg(payload).ignore();
        }
        let sends = pipes.iter().map(|(_, pipe)| {
            let mut conn = conn.clone();
            async move { pipe.query_async::<()>(&mut conn).await }
        });
        let sent: Result<(), _> =
            tokio::time::timeout(self.timeout, futures_util::future::try_join_all(sends))
                .await
                .map(|r| r.map(|_| ()))
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "PUBLISH timed out",
                    )))
                });
        sent.map_err(|e| {
            *guard = None;
            for (_, topic) in items.iter().rev() {
                self.sequencer.rollback(topic);
            }
            send_error(e.to_string())
        })
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn send_event(&self, update: &DbUpdate, topic: Option<&str>) -> Result<(), PublishError> {
        self.publish_all(&[(update, topic.unwrap_or(&update.topic))])
            .await
    }

    async fn send_batch(&self, updates: &[DbUpdate]) -> Result<(), PublishError> {
        let items: Vec<(&DbUpdate, &str)> = updates.iter().map(|u| (u, u.topic.as_str())).collect();
        self.publish_all(&items).await
    }

    async fn close(&self) -> Result<(), PublishError> {
        self.connection.lock().await.take();
        Ok(())
    }
}

/// Channel subscriber.
pub struct RedisSubscriber {
    client: Result<redis::Client, String>,
    url: String,
    codec: Codec,
    timeout: Duration,
    /// `SSUBSCRIBE` (a Redis Cluster) instead of `SUBSCRIBE`.
    sharded: bool,
    registry: Registry,
    stop: CancellationToken,
    gaps: Arc<AtomicU64>,
    positions: crate::backend::sequence::SharedPositions,
    silence_timeout: Duration,
    silences: Arc<AtomicU64>,
}

impl RedisSubscriber {
    /// A subscriber of the configured server (connects when run).
    pub fn new(config: &RedisBackendConfig) -> Self {
        RedisSubscriber {
            client: client(&config.url, &config.auth),
            url: redacted(&config.url),
            codec: config.codec,
            timeout: config.connect_timeout,
            sharded: config.sharded,
            registry: Registry::default(),
            stop: CancellationToken::new(),
            gaps: Arc::default(),
            positions: Arc::default(),
            silence_timeout: config.silence_timeout,
            silences: Arc::default(),
        }
    }

    /// A session's liveness checks: publishers that heartbeat and went
    /// silent end it (`Silent`), and so does a `PING` to Redis left
    /// unanswered for the silence timeout (`Lost`): a connection Redis
    /// dropped (its output buffer limit) while the goodbye was lost looks,
    /// from here, exactly like a quiet one.
    fn check_silence(&self, silence: &mut Silence) -> Result<(), Ended> {
        let silent = silence.silent();
        if silent.is_empty() {
            return Ok(());
        }
        Err(Ended::Silent(silence_reason(&silent), silent))
    }
}

/// What a subscriber keeps across its connections: the publishers' runs
/// and sequences, and the rows already delivered.
#[derive(Default)]
struct Tracking {
    gaps: GapTracker,
    dedup: Dedup,
    /// After a reconnect, the publishers owed a repair, with since when
    /// and why. Each is asked once its next heartbeat names where it
    /// answers now (a bridge that restarted meanwhile answers on a new
    /// endpoint); a `sync` when none comes within twice the silence
    /// timeout.
    owed: std::collections::HashMap<String, (std::time::Instant, String)>,
    /// Messages of owed publishers, held back until their repair so that
    /// each row's older updates still come first; with their bytes.
    held: std::collections::VecDeque<(String, DbUpdate, Envelope)>,
    held_bytes: usize,
}

/// Held messages at most (bytes of values): past it the owed repairs are
/// given up for a `sync`.
const MAX_HELD_BYTES: usize = 64 << 20;

/// How often a subscriber pings Redis and looks for silent publishers.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// What ended one connection of the subscriber.
enum Ended {
    Stopped,
    Lost(String),
    /// Publishers that heartbeat went silent (with why, and who).
    Silent(String, Vec<(String, Duration)>),
    /// The application took no update for [`STUCK_AFTER`].
    Stuck,
}

/// How long the application may take no update before the subscriber lets
/// go of its connection. redis-rs reads pub/sub messages into a queue of
/// its own that has no limit, whether or not they are taken: a stalled
/// application would otherwise grow this process without bound (Redis' own
/// `client-output-buffer-limit` never sees the stall). Long enough for an
/// application that re-reads its state on a `sync`.
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// Hands `update` to the application: `Stopped` when it is gone, `Stuck`
/// when it took nothing for [`STUCK_AFTER`].
async fn hand_over(sink: &mpsc::Sender<DbUpdate>, update: DbUpdate) -> Result<(), Ended> {
    match tokio::time::timeout(STUCK_AFTER, sink.send(update)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ended::Stopped),
        Err(_) => Err(Ended::Stuck),
    }
}

impl RedisSubscriber {
    async fn session(
        &self,
        client: &redis::Client,
        sink: &mpsc::Sender<DbUpdate>,
        reconnect: &mut Reconnect,
        tracker: &mut Tracking,
        first: bool,
    ) -> Ended {
        let mut silence = Silence::new(self.silence_timeout);
        let pubsub = match tokio::time::timeout(self.timeout, client.get_async_pubsub()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Ended::Lost(e.to_string()),
            Err(_) => return Ended::Lost("connect timed out".into()),
        };
        let (mut sink_cmds, mut messages) = pubsub.split();
        let mut registration = self.registry.watch();
        // With the empty topic (all) registered, one PSUBSCRIBE * covers
        // everything: also subscribing to single channels would deliver
        // their messages twice.
        // Heartbeats come with any topic (and with PSUBSCRIBE * anyway).
        let channels = |r: &Registration| -> BTreeSet<String> {
            if r.topics.contains("") {
                BTreeSet::from([String::new()])
            } else if r.topics.is_empty() {
                BTreeSet::new()
            } else {
                let mut channels = r.topics.clone();
                channels.insert(HEARTBEAT_TOPIC.to_owned());
                channels
            }
        };
        let mut applied: BTreeSet<String> = BTreeSet::new();
        let mut wanted = registration.borrow_and_update().clone();
        macro_rules! apply {
            () => {
                let target = channels(&wanted);
                for t in target.difference(&applied) {
                    let r = if t.is_empty() {
                        tokio::time::timeout(self.timeout, sink_cmds.psubscribe("*")).await
                    } else {
                        tokio::time::timeout(self.timeout, sink_cmds.subscribe(t)).await
                    };
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Ended::Lost(e.to_string()),
                        Err(_) => return Ended::Lost("no answer to SUBSCRIBE".into()),
                    }
                }
                for t in applied.difference(&target) {
                    let r = if t.is_empty() {
                        sink_cmds.punsubscribe("*").await
                    } else {
                        sink_cmds.unsubscribe(t).await
                    };
                    if let Err(e) = r {
                        return Ended::Lost(e.to_string());
                    }
                }
                applied = target;
            };
        }
        apply!();
        let mut undecodable = 0u64;
        if let Err(e) = self
            .subscribed(reconnect, &wanted, first, tracker, sink)
            .await
        {
            return e;
        }
        let mut check = tokio::time::interval(LIVENESS_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ended::Stopped,
                changed = registration.changed() => {
                    if changed.is_ok() {
                        wanted = registration.borrow_and_update().clone();
                        apply!();
                    }
                }
                _ = check.tick() => {
                    if let Err(e) = self.check_silence(&mut silence) {
                        return e;
                    }
                    if let Err(e) = self.give_up_owed(tracker, false, &wanted, sink).await {
                        return e;
                    }
                    match tokio::time::timeout(self.silence_timeout, sink_cmds.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Ended::Lost(format!("PING failed: {e}")),
                        Err(_) => {
                            self.silences.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return Ended::Lost(format!(
                            "Redis did not answer PING within {}",
                            humantime::format_duration(self.silence_timeout)
                        ));
                        }
                    }
                }
                msg = messages.next() => {
                    let Some(msg) = msg else { return Ended::Lost("connection closed".into()) };
                    let delivered = self
                        .deliver(msg.get_channel_name(), msg.get_payload_bytes(), &wanted, tracker, &mut silence, sink, &mut undecodable)
                        .await;
                    if let Err(e) = delivered {
                        return e;
                    }
                }
            }
        }
    }

    /// Handles one message on `channel`: a heartbeat feeds the gap tracker,
    /// an update goes to `sink` (after a `sync` when a gap shows), through
    /// [`hand_over`].
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        channel: &str,
        payload: &[u8],
        wanted: &Registration,
        tracker: &mut Tracking,
        silence: &mut Silence,
        sink: &mpsc::Sender<DbUpdate>,
        undecodable: &mut u64,
    ) -> Result<(), Ended> {
        if channel == HEARTBEAT_TOPIC {
            let Ok((heartbeat, envelope)) = self.codec.decode(payload) else {
                return Ok(());
            };
            silence.heard(envelope.publisher.as_deref(), true);
            self.settle(tracker, &heartbeat, &envelope, wanted, sink)
                .await?;
            if let Some(reason) = tracker
                .gaps
                .heartbeat(&heartbeat, &envelope, |t| wanted.wants(t))
            {
                let publisher = envelope.publisher.unwrap_or_default();
                return self
                    .repair_or_sync(tracker, &publisher, wanted, reason, sink)
                    .await;
            }
            return Ok(());
        }
        // Redis' own keyspace / keyevent channels (seen with PSUBSCRIBE * on
        // a Redis that also serves data) are no publisher's messages.
        if !wanted.wants(channel)
            || channel.starts_with("__keyspace@")
            || channel.starts_with("__keyevent@")
        {
            return Ok(());
        }
        match self.codec.decode(payload) {
            Ok((update, envelope)) => {
                silence.heard(envelope.publisher.as_deref(), false);
                self.take(channel, update, envelope, wanted, tracker, sink)
                    .await
            }
            Err(e) => {
                *undecodable += 1;
                // Once per power of two: a shared Redis full of foreign
                // channels must not flood the log.
                if undecodable.is_power_of_two() {
                    tracing::warn!(%channel, error = %e, undecodable, "Dropped an undecodable message (logged at 1, 2, 4, 8... of them).");
                }
                Ok(())
            }
        }
    }

    /// A session of a sharded subscriber (`SSUBSCRIBE`): a RESP3 cluster
    /// connection subscribes each channel on its slot's owner and, after a
    /// failover or a slot move, subscribes it again on the new owner; every
    /// such re-subscription is delivered as a `sync` (messages published
    /// meanwhile are gone).
    async fn sharded_session(
        &self,
        client: &redis::Client,
        sink: &mpsc::Sender<DbUpdate>,
        reconnect: &mut Reconnect,
        tracker: &mut Tracking,
        first: bool,
    ) -> Ended {
        let mut silence = Silence::new(self.silence_timeout);
        let (push_tx, mut pushes) = mpsc::unbounded_channel::<redis::PushInfo>();
        let cluster = redis::cluster::ClusterClientBuilder::new(
            crate::db::redis::seeds(client)
                .iter()
                .map(|c| c.get_connection_info().clone()),
        )
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(push_tx)
        .connection_timeout(self.timeout)
        .build();
        let mut conn = match cluster {
            Ok(c) => match tokio::time::timeout(self.timeout, c.get_async_connection()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Ended::Lost(format!("sharded pub/sub needs a Redis Cluster: {e}"))
                }
                Err(_) => return Ended::Lost("connect timed out".into()),
            },
            Err(e) => return Ended::Lost(e.to_string()),
        };
        let mut registration = self.registry.watch();
        let mut wanted = registration.borrow_and_update().clone();
        if wanted.topics.contains("") {
            tracing::warn!("A sharded subscriber cannot subscribe to every channel (there is no sharded pattern subscription); register topics.");
        }
        let channels = |r: &Registration| -> BTreeSet<String> {
            let mut c: BTreeSet<String> =
                r.topics.iter().filter(|t| !t.is_empty()).cloned().collect();
            if !c.is_empty() {
                c.insert(HEARTBEAT_TOPIC.to_owned());
            }
            c
        };
        let mut applied = BTreeSet::new();
        let mut confirmed: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut undecodable = 0u64;
        if let Err(e) =
            resubscribe(&mut conn, &channels(&wanted), &mut applied, &mut confirmed).await
        {
            return Ended::Lost(e);
        }
        // Which node serves each channel: after a failover or a slot move
        // the subscription is made again from scratch on the new owner.
        let mut topology = Conn::Cluster(conn.clone());
        crate::db::redis::remember_nodes(client, &mut topology).await;
        let owners = |nodes: &[crate::db::redis::Node], channels: &BTreeSet<String>| {
            channels
                .iter()
                .map(|c| {
                    let slot = crate::db::redis::slot(c.as_bytes());
                    let owner = crate::db::redis::master_of(nodes, slot).map(|n| n.addr.clone());
                    (c.clone(), owner)
                })
                .collect::<BTreeMap<_, _>>()
        };
        let mut subscribed_at = match crate::db::redis::nodes(&mut topology, "").await {
            Ok(nodes) => owners(&nodes, &applied),
            Err(e) => return Ended::Lost(e.to_string()),
        };
        let mut check = tokio::time::interval(Duration::from_secs(1));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Err(e) = self
            .subscribed(reconnect, &wanted, first, tracker, sink)
            .await
        {
            return e;
        }
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ended::Stopped,
                changed = registration.changed() => {
                    if changed.is_ok() {
                        wanted = registration.borrow_and_update().clone();
                        if let Err(e) = resubscribe(&mut conn, &channels(&wanted), &mut applied, &mut confirmed).await {
                            return Ended::Lost(e);
                        }
                        if let Ok(nodes) = crate::db::redis::nodes(&mut topology, "").await {
                            subscribed_at = owners(&nodes, &applied);
                        }
                    }
                }
                _ = check.tick() => {
                    if let Err(e) = self.check_silence(&mut silence) {
                        return e;
                    }
                    if let Err(e) = self.give_up_owed(tracker, false, &wanted, sink).await {
                        return e;
                    }
                    // A node that cannot answer now is no news: the next tick asks again.
                    if let Ok(nodes) = crate::db::redis::nodes(&mut topology, "").await {
                        let now = owners(&nodes, &applied);
                        if now != subscribed_at {
                            if now.values().all(Option::is_some) {
                                return Ended::Lost("a sharded channel moved to another node".into());
                            }
                            subscribed_at = now;
                        }
                    }
                }
                push = pushes.recv() => {
                    let Some(push) = push else { return Ended::Lost("connection closed".into()) };
                    if push.kind == redis::PushKind::Disconnection {
                        return Ended::Lost("connection closed".into());
                    }
                    let text = |v: &redis::Value| match v {
                        redis::Value::BulkString(b) => b.clone(),
                        redis::Value::SimpleString(s) => s.clone().into_bytes(),
                        _ => Vec::new(),
                    };
                    match push.kind {
                        redis::PushKind::SMessage if push.data.len() >= 2 => {
                            let channel = String::from_utf8_lossy(&text(&push.data[0])).into_owned();
                            let payload = text(&push.data[1]);
                            if let Err(e) = self.deliver(&channel, &payload, &wanted, tracker, &mut silence, sink, &mut undecodable).await {
                                return e;
                            }
                        }
                        redis::PushKind::SSubscribe => {
                            // A channel confirmed a second time was
                            // subscribed again on a new owner.
                            let channel = push.data.first().map(text).unwrap_or_default();
                            if !confirmed.insert(channel.clone()) {
                                let reason = format!(
                                    "sharded channel {:?} moved to another node (failover or slot migration)",
                                    String::from_utf8_lossy(&channel)
                                );
                                tracing::warn!(%reason, "Delivering a sync: updates may have been missed.");
                                if let Err(e) = hand_over(sink, DbUpdate::sync(reason)).await {
                                    return e;
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

impl RedisSubscriber {
    /// A session is subscribed: the connection counts as up. After a
    /// reconnect, what was published while the subscriber was away is
    /// asked of each publisher's replay buffer; when one cannot answer (or
    /// no publisher is known yet) the subscriber delivers a `sync` instead.
    /// An `Err` ends the session (see [`hand_over`]).
    async fn subscribed(
        &self,
        reconnect: &mut Reconnect,
        wanted: &Registration,
        first: bool,
        tracker: &mut Tracking,
        sink: &mpsc::Sender<DbUpdate>,
    ) -> Result<(), Ended> {
        reconnect.up();
        tracing::info!(url = %self.url, topics = ?wanted.topics, sharded = self.sharded, "Redis subscriber subscribed.");
        if first {
            return Ok(());
        }
        let publishers = tracker.gaps.publishers();
        if publishers.is_empty() {
            return hand_over(sink, DbUpdate::sync("redis subscriber reconnected")).await;
        }
        let now = std::time::Instant::now();
        for publisher in publishers {
            tracker
                .owed
                .entry(publisher)
                .or_insert((now, "redis subscriber reconnected".into()));
        }
        Ok(())
    }

    /// A heartbeat from `publisher`: when it is owed a repair, asks it now
    /// (at the endpoint the heartbeat names), then lets its held messages
    /// through.
    async fn settle(
        &self,
        tracker: &mut Tracking,
        heartbeat: &DbUpdate,
        envelope: &Envelope,
        wanted: &Registration,
        sink: &mpsc::Sender<DbUpdate>,
    ) -> Result<(), Ended> {
        let Some(publisher) = envelope.publisher.as_deref() else {
            return Ok(());
        };
        let Some((_, reason)) = tracker.owed.remove(publisher) else {
            return Ok(());
        };
        tracker.gaps.learn(heartbeat, envelope);
        self.repair_or_sync(tracker, publisher, wanted, reason, sink)
            .await?;
        self.release(tracker, wanted, sink).await
    }

    /// Gives up the repairs owed for longer than twice the silence timeout
    /// (or all of them, `now`): a `sync` each, then the held messages.
    async fn give_up_owed(
        &self,
        tracker: &mut Tracking,
        now: bool,
        wanted: &Registration,
        sink: &mpsc::Sender<DbUpdate>,
    ) -> Result<(), Ended> {
        let late: Vec<String> = tracker
            .owed
            .iter()
            .filter(|(_, (since, _))| now || since.elapsed() > self.silence_timeout * 2)
            .map(|(p, _)| p.clone())
            .collect();
        for publisher in &late {
            let (_, reason) = tracker.owed.remove(publisher).expect("listed");
            tracker.gaps.resynced(publisher);
            let reason =
                format!("{reason}; publisher {publisher} was not heard again to repair it");
            tracing::warn!(%reason, "Delivering a sync: updates may have been missed.");
            hand_over(sink, DbUpdate::sync(reason)).await?;
        }
        if late.is_empty() {
            return Ok(());
        }
        self.release(tracker, wanted, sink).await
    }

    /// Delivers the held messages of publishers no longer owed a repair,
    /// in the order they came.
    async fn release(
        &self,
        tracker: &mut Tracking,
        wanted: &Registration,
        sink: &mpsc::Sender<DbUpdate>,
    ) -> Result<(), Ended> {
        let held = std::mem::take(&mut tracker.held);
        tracker.held_bytes = 0;
        for (channel, update, envelope) in held {
            self.take(&channel, update, envelope, wanted, tracker, sink)
                .await?;
        }
        Ok(())
    }

    /// One update of `channel`: held while its publisher is owed a repair,
    /// else checked for a gap (repaired first) and delivered unless it was
    /// already.
    async fn take(
        &self,
        channel: &str,
        update: DbUpdate,
        envelope: Envelope,
        wanted: &Registration,
        tracker: &mut Tracking,
        sink: &mpsc::Sender<DbUpdate>,
    ) -> Result<(), Ended> {
        if envelope
            .publisher
            .as_ref()
            .is_some_and(|p| tracker.owed.contains_key(p))
        {
            tracker.held_bytes += 64 + update.value.as_ref().map_or(0, String::len);
            tracker
                .held
                .push_back((channel.to_owned(), update, envelope));
            if tracker.held_bytes > MAX_HELD_BYTES {
                return Box::pin(self.give_up_owed(tracker, true, wanted, sink)).await;
            }
            return Ok(());
        }
        if let Some(reason) = tracker.gaps.check(channel, &envelope) {
            let publisher = envelope.publisher.clone().unwrap_or_default();
            self.repair_or_sync(tracker, &publisher, wanted, reason, sink)
                .await?;
        }
        if !tracker.dedup.fresh(&update) {
            return Ok(()); // repeated by a run that resumed
        }
        hand_over(sink, update).await
    }

    /// A gap of `publisher`'s: repaired from its replay buffer when it can
    /// be (the missed updates are delivered), else a `sync`.
    async fn repair_or_sync(
        &self,
        tracker: &mut Tracking,
        publisher: &str,
        wanted: &Registration,
        reason: String,
        sink: &mpsc::Sender<DbUpdate>,
    ) -> Result<(), Ended> {
        let point = tracker.gaps.repair_point(publisher);
        let asked = match point {
            Ok((service, after, endpoint)) => {
                let (topics, codec) = (super::replay::topics_of(wanted), self.codec);
                let answer = tokio::task::spawn_blocking(move || {
                    super::replay::ask(&endpoint, after, &topics, codec)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                answer.map(|(updates, to)| {
                    tracker.gaps.repaired(&service, to);
                    tracing::info!(%publisher, after, to, updates = updates.len(), "Repaired a gap from the publisher's replay buffer (no re-read).");
                    updates
                })
            }
            Err(why) => Err(why.into()),
        };
        match asked {
            Ok(updates) => {
                tracker.gaps.caught_up(publisher);
                for update in updates {
                    if tracker.dedup.fresh(&update) {
                        hand_over(sink, update).await?;
                    }
                }
                Ok(())
            }
            Err(why) => {
                tracker.gaps.resynced(publisher);
                tracing::warn!(%reason, repair = %why, "Delivering a sync: updates were missed and cannot be replayed.");
                hand_over(
                    sink,
                    DbUpdate::sync(format!("{reason} (not replayed: {why})")),
                )
                .await
            }
        }
    }
}

/// Brings a sharded subscription from `applied` to `target` channels.
async fn resubscribe(
    conn: &mut redis::cluster_async::ClusterConnection,
    target: &BTreeSet<String>,
    applied: &mut BTreeSet<String>,
    confirmed: &mut BTreeSet<Vec<u8>>,
) -> Result<(), String> {
    for t in target.difference(applied) {
        conn.ssubscribe(t).await.map_err(|e| e.to_string())?;
    }
    for t in applied.difference(target) {
        let _ = conn.sunsubscribe(t).await;
        confirmed.remove(t.as_bytes());
    }
    *applied = target.clone();
    Ok(())
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    fn register_topic(&self, topic: &str) {
        self.registry.topic(topic, true);
    }
    fn unregister_topic(&self, topic: &str) {
        self.registry.topic(topic, false);
    }
    fn register_listen_address(&self, _uri: &str) {}
    fn unregister_listen_address(&self, _uri: &str) {}
    fn stop(&self) {
        self.stop.cancel();
    }
    fn gaps(&self) -> u64 {
        self.gaps.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn silences(&self) -> u64 {
        self.silences.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn positions(&self) -> std::collections::BTreeMap<String, i64> {
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn pump(&self, sink: mpsc::Sender<DbUpdate>) -> Result<(), SubscribeError> {
        let client = self.client.as_ref().map_err(|e| SubscribeError {
            backend: "redis",
            message: format!("bad URL {}: {e}", self.url),
        })?;
        let mut reconnect = Reconnect::new(format!("redis subscriber {}", self.url));
        let mut first = true;
        let mut tracker = Tracking {
            gaps: GapTracker::new(self.gaps.clone()).showing(self.positions.clone()),
            ..Default::default()
        };
        loop {
            let session = if self.sharded {
                self.sharded_session(client, &sink, &mut reconnect, &mut tracker, first)
                    .await
            } else {
                self.session(client, &sink, &mut reconnect, &mut tracker, first)
                    .await
            };
            match session {
                Ended::Stopped => return Ok(()),
                Ended::Stuck => {
                    // Disconnected, so nothing queues meanwhile; back once
                    // the application takes updates again, with a `sync`.
                    tracing::warn!(url = %self.url, stuck_for = ?STUCK_AFTER, "The application takes no updates; unsubscribed until it does (messages published meanwhile are not kept; a sync follows).");
                    first = false;
                    tokio::select! {
                        _ = self.stop.cancelled() => return Ok(()),
                        permit = sink.reserve() => {
                            if permit.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                Ended::Silent(reason, silent) => {
                    // Reconnected at once: the server may be fine, and a
                    // new connection is the quickest way to know.
                    first = false;
                    self.silences
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(url = %self.url, %reason, timeout = ?self.silence_timeout, "No update and no heartbeat for the silence timeout: reconnecting; what was missed is asked of the publishers' replay buffers (a sync where they cannot answer).");
                    for (publisher, _) in &silent {
                        tracker.gaps.forget(publisher);
                    }
                }
                Ended::Lost(e) => {
                    first = false;
                    if !reconnect.down(&e, &self.stop).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}
