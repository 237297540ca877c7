//! The ZeroMQ backend on libzmq (the `zmq` crate): a PUB socket sending
//! two-frame `[topic, payload]` messages, and a SUB socket receiving them.
//!
//! libzmq sockets are not thread-safe. The PUB socket never blocks (at its
//! high-water mark it drops for the slow subscriber), so it is used under a
//! mutex straight from the publishing task: no hand-off to another thread
//! per batch. A PUSH socket can block (no peer), so it is owned by a thread
//! fed through a channel, and so is each SUB socket.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::registry::{Registration, Registry};
use super::sequence::{
    silence_reason, Dedup, GapTracker, Sequencer, Silence, HEARTBEAT_INTERVAL, HEARTBEAT_TOPIC,
};
use crate::codec::Codec;
use crate::config::ZmqBackendConfig;
use crate::pubsub::{PublishError, SubscribeError, Subscriber};
use crate::update::DbUpdate;
use crate::zmq_socket::{bind, set_keepalive, set_liveness, CONTEXT};

/// How often the subscriber thread looks at registration changes and stop
/// requests while no message arrives.
const POLL_INTERVAL_MS: i64 = 50;

/// Commands to a PUSH publisher's socket thread.
enum Outgoing {
    /// One update on `topic`.
    Update { update: DbUpdate, topic: String },
    /// Several updates on their own topics: one queue operation (and at
    /// most one wake-up of the socket thread) for a whole batch.
    Batch(Vec<DbUpdate>),
    /// Answered once everything queued before it went to the socket.
    Flush(oneshot::Sender<()>),
}

/// A PUB (XPUB) socket shared by the publishing task and the heartbeat:
/// sequence numbers are stamped and messages sent under one lock, so they
/// leave in order and a heartbeat never announces a number not yet sent.
struct PubSocket {
    state: Mutex<PubState>,
    codec: Codec,
    sequencer: Arc<Sequencer>,
    endpoint: String,
    /// When the socket was bound and how long publishing may wait for
    /// subscribers to rejoin; `None` once that wait is over.
    rejoin: tokio::sync::Mutex<Option<(std::time::Instant, Duration)>>,
    rejoined: AtomicBool,
}

impl std::fmt::Debug for PubSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSocket")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

struct PubState {
    /// `None` once closed.
    socket: Option<zmq::Socket>,
    /// One buffer for every payload.
    buf: Vec<u8>,
}

impl PubSocket {
    /// Holds publishing back after a (re)start until the subscribers that
    /// stayed up have rejoined: until their subscriptions have arrived and
    /// gone quiet (at least [`REJOIN_MIN`]), or `rejoin_wait` at most when
    /// none arrive.
    async fn await_rejoin(&self) {
        if self.rejoined.load(Ordering::Acquire) {
            return;
        }
        let mut pending = self.rejoin.lock().await;
        let Some((start, max)) = *pending else {
            return;
        };
        let mut last = None;
        let mut subscriptions = 0;
        while start.elapsed() < max {
            if let Some(t) = last {
                if start.elapsed() >= REJOIN_MIN && std::time::Instant::elapsed(&t) >= REJOIN_QUIET
                {
                    break;
                }
            }
            let n = {
                let state = self.state.lock().expect("zmq socket lock");
                state.socket.as_ref().map(take_subscriptions).unwrap_or(0)
            };
            if n > 0 {
                subscriptions += n;
                last = Some(std::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(endpoint = %self.endpoint, subscriptions, waited_ms = start.elapsed().as_millis() as u64, "Publishing: subscribers had the chance to rejoin.");
        *pending = None;
        self.rejoined.store(true, Ordering::Release);
    }

    /// Stamps, encodes and sends `updates` (each on `topic`, or its own).
    fn send<'a>(
        &self,
        updates: impl Iterator<Item = &'a DbUpdate>,
        topic: Option<&str>,
    ) -> Result<(), PublishError> {
        let mut state = self.state.lock().expect("zmq socket lock");
        let PubState { socket, buf } = &mut *state;
        let socket = socket.as_ref().ok_or(PublishError::Closed)?;
        // Leadership, checked again under the lock right before sending.
        if !self.sequencer.gate_open() {
            return Err(PublishError::Send {
                backend: "zmq",
                message: "not the leader any more".into(),
            });
        }
        let id = self.sequencer.id();
        let epoch = self.sequencer.epoch();
        for update in updates {
            let topic = topic.unwrap_or(&update.topic);
            buf.clear();
            let seq = self.sequencer.next_seq(topic);
            self.codec
                .encode_into(update, Some(id), Some(epoch), Some(seq), buf);
            // PUB never blocks: at the high-water mark libzmq drops for
            // that subscriber, which bounds memory.
            if let Err(e) = socket.send_multipart([topic.as_bytes(), &buf[..]], zmq::DONTWAIT) {
                tracing::warn!(endpoint = %self.endpoint, error = %e, "ZeroMQ send failed; message dropped.");
            }
        }
        Ok(())
    }

    /// Reads arrived subscriptions and announces the last sequence numbers.
    fn heartbeat(&self) {
        let mut state = self.state.lock().expect("zmq socket lock");
        let PubState { socket, buf } = &mut *state;
        let Some(socket) = socket.as_ref() else {
            return;
        };
        take_subscriptions(socket);
        if let Some((update, envelope)) = self.sequencer.heartbeat() {
            buf.clear();
            self.codec.encode_into(
                &update,
                envelope.publisher.as_deref(),
                envelope.epoch,
                None,
                buf,
            );
            let _ = socket.send_multipart([HEARTBEAT_TOPIC.as_bytes(), &buf[..]], zmq::DONTWAIT);
        }
    }
}

/// Sends a heartbeat every [`HEARTBEAT_INTERVAL`] once subscribers had the
/// chance to rejoin, whether or not anything is published (an idle
/// publisher is still alive), while the publisher exists (it holds only a
/// weak reference).
fn spawn_pub_heartbeat(socket: std::sync::Weak<PubSocket>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        match socket.upgrade() {
            Some(socket) => socket.await_rejoin().await,
            None => return,
        }
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(socket) = socket.upgrade() else {
                return;
            };
            socket.heartbeat();
        }
    });
}

/// Subscriptions are taken as complete once none arrived for this long...
const REJOIN_QUIET: Duration = Duration::from_millis(150);
/// ...and at least this long after binding (libzmq's default reconnect
/// interval is 100 ms, plus the handshake).
const REJOIN_MIN: Duration = Duration::from_millis(250);

/// Reads the subscription messages an XPUB socket has queued; returns how
/// many arrived.
fn take_subscriptions(socket: &zmq::Socket) -> usize {
    let mut n = 0;
    while socket.recv_bytes(zmq::DONTWAIT).is_ok() {
        n += 1;
    }
    n
}

/// A ZeroMQ publisher: a PUB socket bound for subscribers, or a PUSH socket
/// connected to the publisher service's multiproc channel.
#[derive(Debug)]
pub struct ZmqPublisher {
    /// The PUB socket, used directly (`bind`); `None` for a PUSH publisher.
    direct: Option<Arc<PubSocket>>,
    linger: Duration,
    queue: Mutex<Option<mpsc::Sender<Outgoing>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
    /// Set at close: a PUSH with no peer stops retrying its last message.
    closing: Arc<AtomicBool>,
}

fn setup_error(endpoint: &str, what: &str, e: zmq::Error) -> PublishError {
    PublishError::Setup {
        backend: "zmq",
        message: format!("{what} {endpoint}: {e}"),
    }
}

fn millis(d: Duration) -> i32 {
    d.as_millis().try_into().unwrap_or(i32::MAX)
}

impl ZmqPublisher {
    /// Binds the PUB socket now, so a taken port fails at start-up.
    pub fn bind(
        config: &ZmqBackendConfig,
        sequencer: Arc<Sequencer>,
    ) -> Result<Self, PublishError> {
        let endpoint = config.bind.clone();
        // XPUB: a PUB socket that also shows subscriptions arriving
        // (verbose: every one, not only the first of each topic).
        let socket = CONTEXT
            .socket(zmq::XPUB)
            .map_err(|e| setup_error(&endpoint, "cannot create a PUB socket for", e))?;
        socket
            .set_sndhwm(config.send_hwm)
            .and_then(|()| socket.set_linger(millis(config.linger)))
            .and_then(|()| socket.set_xpub_verbose(true))
            .and_then(|()| set_liveness(&socket, config.silence_timeout))
            .map_err(|e| setup_error(&endpoint, "cannot set options on", e))?;
        bind(&socket, &endpoint).map_err(|message| PublishError::Setup {
            backend: "zmq",
            message,
        })?;
        tracing::info!(%endpoint, codec = %config.codec, send_hwm = config.send_hwm, "ZeroMQ publisher bound.");
        let direct = Arc::new(PubSocket {
            state: Mutex::new(PubState {
                socket: Some(socket),
                buf: Vec::with_capacity(1024),
            }),
            codec: config.codec,
            sequencer,
            endpoint,
            rejoin: tokio::sync::Mutex::new(Some((std::time::Instant::now(), config.rejoin_wait))),
            rejoined: AtomicBool::new(false),
        });
        spawn_pub_heartbeat(Arc::downgrade(&direct));
        Ok(ZmqPublisher {
            direct: Some(direct),
            linger: config.linger,
            queue: Mutex::new(None),
            thread: Mutex::new(None),
            closing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A publisher that PUSHes to the publisher service's multiproc socket
    /// (`ipc://PATH`), as Dragonflow's multiproc publisher agent does. It
    /// reconnects by itself when the service restarts; while the service is
    /// away, up to `send_hwm` messages wait, then `send_event` waits too.
    pub fn push(
        endpoint: &str,
        codec: Codec,
        send_hwm: i32,
        linger: Duration,
    ) -> Result<Self, PublishError> {
        let socket = CONTEXT
            .socket(zmq::PUSH)
            .map_err(|e| setup_error(endpoint, "cannot create a PUSH socket for", e))?;
        socket
            .set_sndhwm(send_hwm)
            .and_then(|()| socket.set_linger(millis(linger)))
            .and_then(|()| socket.set_sndtimeo(100))
            .map_err(|e| setup_error(endpoint, "cannot set options on", e))?;
        socket
            .connect(endpoint)
            .map_err(|e| setup_error(endpoint, "cannot connect to", e))?;
        Self::start(socket, endpoint.to_owned(), codec, linger)
    }

    fn start(
        socket: zmq::Socket,
        endpoint: String,
        codec: Codec,
        linger: Duration,
    ) -> Result<Self, PublishError> {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(1024);
        let name = endpoint;
        let closing = Arc::new(AtomicBool::new(false));
        let stop_retrying = closing.clone();
        let thread = thread::Builder::new()
            .name("zmq-push".into())
            .spawn(move || {
                // One buffer for every payload.
                let mut buf = Vec::with_capacity(1024);
                let send = |update: &DbUpdate, topic: &str, buf: &mut Vec<u8>| {
                    buf.clear();
                    codec.encode_into(update, None, None, None, buf);
                    // PUSH times out (EAGAIN) while no peer takes it:
                    // retried until close.
                    loop {
                        match socket.send_multipart([topic.as_bytes(), &buf[..]], 0) {
                            Ok(()) => break,
                            Err(zmq::Error::EAGAIN) if !stop_retrying.load(Ordering::Relaxed) => continue,
                            Err(e) => {
                                tracing::warn!(endpoint = %name, error = %e, "ZeroMQ send failed; message dropped.");
                                break;
                            }
                        }
                    }
                };
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Outgoing::Update { update, topic } => send(&update, &topic, &mut buf),
                        Outgoing::Batch(updates) => {
                            for update in &updates {
                                send(update, &update.topic, &mut buf);
                            }
                        }
                        Outgoing::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
                // Dropping the socket here lets libzmq linger as configured.
            })
            .map_err(|e| PublishError::Setup {
                backend: "zmq",
                message: format!("cannot start the socket thread: {e}"),
            })?;
        Ok(ZmqPublisher {
            direct: None,
            linger,
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            closing,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Outgoing>, PublishError> {
        self.queue
            .lock()
            .expect("queue lock")
            .clone()
            .ok_or(PublishError::Closed)
    }

    /// Waits until everything queued so far was handed to libzmq.
    async fn flush_queue(&self) -> Result<(), PublishError> {
        let (done, wait) = oneshot::channel();
        self.sender()?
            .send(Outgoing::Flush(done))
            .await
            .map_err(|_| PublishError::Closed)?;
        wait.await.map_err(|_| PublishError::Closed)
    }
}

#[async_trait]
impl crate::pubsub::Publisher for ZmqPublisher {
    async fn send_event(&self, update: &DbUpdate, topic: Option<&str>) -> Result<(), PublishError> {
        if let Some(direct) = &self.direct {
            direct.await_rejoin().await;
            return direct.send(std::iter::once(update), topic);
        }
        let topic = topic.unwrap_or(&update.topic).to_owned();
        self.sender()?
            .send(Outgoing::Update {
                update: update.clone(),
                topic,
            })
            .await
            .map_err(|_| PublishError::Closed)
    }

    async fn send_batch(&self, updates: &[DbUpdate]) -> Result<(), PublishError> {
        if updates.is_empty() {
            return Ok(());
        }
        if let Some(direct) = &self.direct {
            direct.await_rejoin().await;
            return direct.send(updates.iter(), None);
        }
        self.sender()?
            .send(Outgoing::Batch(updates.to_vec()))
            .await
            .map_err(|_| PublishError::Closed)
    }

    async fn flush(&self) -> Result<(), PublishError> {
        if let Some(direct) = &self.direct {
            // Sends went to libzmq at once.
            let closed = direct
                .state
                .lock()
                .expect("zmq socket lock")
                .socket
                .is_none();
            return if closed {
                Err(PublishError::Closed)
            } else {
                Ok(())
            };
        }
        self.flush_queue().await
    }

    async fn close(&self) -> Result<(), PublishError> {
        if let Some(direct) = &self.direct {
            // Dropping the socket lets libzmq linger as configured.
            direct.state.lock().expect("zmq socket lock").socket.take();
            return Ok(());
        }
        // Give queued messages up to `linger` to leave, then stop retrying.
        let _ = tokio::time::timeout(self.linger, self.flush_queue()).await;
        self.closing.store(true, Ordering::Relaxed);
        self.queue.lock().expect("queue lock").take();
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(t) = thread {
            // The thread ends once the queue is closed; joining blocks for
            // at most the configured linger.
            tokio::task::spawn_blocking(move || t.join()).await.ok();
        }
        Ok(())
    }
}

/// SUB socket subscriber. Subscribes by prefix on the socket and then
/// filters exactly, so topic `t1` does not also deliver `t10`.
#[derive(Debug)]
pub struct ZmqSubscriber {
    codec: Codec,
    registry: Registry,
    stop: CancellationToken,
    gaps: Arc<AtomicU64>,
    positions: crate::backend::sequence::SharedPositions,
    silences: Arc<AtomicU64>,
    receive_hwm: i32,
    silence_timeout: Duration,
}

impl ZmqSubscriber {
    /// A subscriber with no topics and no publishers yet.
    pub fn new(codec: Codec) -> Self {
        ZmqSubscriber {
            codec,
            registry: Registry::default(),
            stop: CancellationToken::new(),
            gaps: Arc::default(),
            positions: Arc::default(),
            silences: Arc::default(),
            receive_hwm: 1000,
            silence_timeout: crate::config::DEFAULT_SILENCE_TIMEOUT,
        }
    }

    /// How long a publisher that heartbeats may be silent before the
    /// subscriber reconnects and delivers a `sync` (see
    /// [`ZmqBackendConfig::silence_timeout`]).
    pub fn with_silence_timeout(mut self, timeout: Duration) -> Self {
        self.silence_timeout = timeout;
        self
    }

    /// Sets the SUB socket's receive high-water mark (libzmq's default is
    /// 1000 messages); past it, libzmq drops, and gap detection says so.
    pub fn with_receive_hwm(mut self, hwm: i32) -> Self {
        self.receive_hwm = hwm;
        self
    }
}

fn sub_error(message: String) -> SubscribeError {
    SubscribeError {
        backend: "zmq",
        message,
    }
}

/// A gap of `publisher`'s: repaired from its replay buffer when it can be
/// (the missed updates are delivered), else a `sync`. `false` when the
/// application is gone.
fn repair_or_sync(
    tracker: &mut GapTracker,
    dedup: &mut Dedup,
    publisher: &str,
    wanted: &Registration,
    codec: Codec,
    reason: String,
    sink: &mpsc::Sender<DbUpdate>,
) -> bool {
    match super::replay::repair(tracker, publisher, &super::replay::topics_of(wanted), codec) {
        Ok(updates) => updates
            .into_iter()
            .filter(|u| dedup.fresh(u))
            .all(|u| sink.blocking_send(u).is_ok()),
        Err(why) => {
            tracing::warn!(%reason, repair = %why, "Delivering a sync: updates were missed and cannot be replayed.");
            sink.blocking_send(DbUpdate::sync(format!("{reason} (not replayed: {why})")))
                .is_ok()
        }
    }
}

/// A SUB socket: TCP keep-alive on its connections, no ZMTP heartbeat of
/// its own (see [`set_liveness`] for the libzmq abort that would cost an
/// application that stalls); the publishers' heartbeats, watched for
/// `silence`, tell the subscriber a connection died.
fn sub_socket(receive_hwm: i32) -> Result<zmq::Socket, SubscribeError> {
    let socket = CONTEXT
        .socket(zmq::SUB)
        .map_err(|e| sub_error(format!("cannot create a SUB socket: {e}")))?;
    socket
        .set_rcvhwm(receive_hwm)
        .map_err(|e| sub_error(format!("cannot set the receive high-water mark: {e}")))?;
    set_keepalive(&socket).map_err(|e| sub_error(format!("cannot set keep-alive: {e}")))?;
    Ok(socket)
}

/// Brings a SUB socket from the `applied` registration to `wanted`. A
/// subscriber of any topic also takes the publishers' heartbeats.
fn apply(socket: &zmq::Socket, applied: &mut Registration, wanted: &Registration) {
    let heartbeats = |r: &Registration| !r.topics.is_empty() && !r.topics.contains("");
    if heartbeats(wanted) && !heartbeats(applied) {
        let _ = socket.set_subscribe(HEARTBEAT_TOPIC.as_bytes());
    } else if !heartbeats(wanted) && heartbeats(applied) {
        let _ = socket.set_unsubscribe(HEARTBEAT_TOPIC.as_bytes());
    }
    for t in wanted.topics.difference(&applied.topics) {
        if let Err(e) = socket.set_subscribe(t.as_bytes()) {
            tracing::warn!(topic = %t, error = %e, "ZeroMQ subscribe failed.");
        }
    }
    for t in applied.topics.difference(&wanted.topics) {
        let _ = socket.set_unsubscribe(t.as_bytes());
    }
    let added: BTreeSet<_> = wanted.addresses.difference(&applied.addresses).collect();
    for a in added {
        match socket.connect(a) {
            Ok(()) => tracing::info!(address = %a, "Subscriber connecting to publisher."),
            Err(e) => {
                tracing::warn!(address = %a, error = %e, "Cannot connect to publisher; check the address.")
            }
        }
    }
    for a in applied.addresses.difference(&wanted.addresses) {
        let _ = socket.disconnect(a);
    }
    *applied = wanted.clone();
}

#[async_trait]
impl Subscriber for ZmqSubscriber {
    fn register_topic(&self, topic: &str) {
        self.registry.topic(topic, true);
    }
    fn unregister_topic(&self, topic: &str) {
        self.registry.topic(topic, false);
    }
    fn register_listen_address(&self, uri: &str) {
        self.registry.address(uri, true);
    }
    fn unregister_listen_address(&self, uri: &str) {
        self.registry.address(uri, false);
    }
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
        let (receive_hwm, silence_timeout) = (self.receive_hwm, self.silence_timeout);
        let mut socket = sub_socket(receive_hwm)?;
        let mut registration = self.registry.watch();
        let stop = self.stop.clone();
        let codec = self.codec;
        let mut tracker = GapTracker::new(self.gaps.clone()).showing(self.positions.clone());
        let silences = self.silences.clone();
        let receive = move || -> Result<(), SubscribeError> {
            let mut applied = Registration::default();
            let mut wanted = registration.borrow_and_update().clone();
            apply(&socket, &mut applied, &wanted);
            let mut bad_frames = 0u64;
            let mut silence = Silence::new(silence_timeout);
            let mut dedup = Dedup::default();
            // Publishers that went silent, owed a repair once heard again.
            let mut owed: std::collections::HashMap<String, (std::time::Instant, String)> =
                Default::default();
            loop {
                if stop.is_cancelled() || sink.is_closed() {
                    return Ok(());
                }
                if registration.has_changed().unwrap_or(false) {
                    wanted = registration.borrow_and_update().clone();
                    if wanted.addresses != applied.addresses {
                        // Which publisher is behind which address is not
                        // known: every one's next heartbeat is awaited afresh.
                        silence.reset();
                    }
                    apply(&socket, &mut applied, &wanted);
                }
                let silent = silence.silent();
                if !silent.is_empty() {
                    // A SUB socket only receives: a connection whose far end
                    // vanished (no RST, no FIN) looks just like a quiet one.
                    // A new socket connects afresh.
                    let reason = silence_reason(&silent);
                    silences.fetch_add(1, Ordering::Relaxed);
                    socket = sub_socket(receive_hwm)?;
                    applied = Registration::default();
                    apply(&socket, &mut applied, &wanted);
                    // A publisher with a replay endpoint is asked for what
                    // was missed once it is heard again (its heartbeat shows
                    // the gap); the others, and one that does not come
                    // back, mean a sync.
                    let mut unrepairable = false;
                    for (publisher, _) in &silent {
                        if tracker.repair_point(publisher).is_ok() {
                            owed.insert(
                                publisher.clone(),
                                (std::time::Instant::now(), reason.clone()),
                            );
                        } else {
                            tracker.forget(publisher);
                            unrepairable = true;
                        }
                    }
                    if unrepairable {
                        tracing::warn!(%reason, timeout = ?silence.timeout(), "No update and no heartbeat for the silence timeout: reconnecting, then delivering a sync.");
                        if sink.blocking_send(DbUpdate::sync(reason)).is_err() {
                            return Ok(());
                        }
                    } else {
                        tracing::warn!(%reason, timeout = ?silence.timeout(), "No update and no heartbeat for the silence timeout: reconnecting; what was missed is replayed once the publisher is heard again.");
                    }
                }
                let given_up: Vec<String> = owed
                    .iter()
                    .filter(|(_, (since, _))| since.elapsed() > silence_timeout * 2)
                    .map(|(p, _)| p.clone())
                    .collect();
                for publisher in given_up {
                    let (_, reason) = owed.remove(&publisher).expect("listed");
                    tracker.forget(&publisher);
                    let reason = format!("{reason}; it has not been heard again");
                    tracing::warn!(%reason, "Delivering a sync: updates may have been missed.");
                    if sink.blocking_send(DbUpdate::sync(reason)).is_err() {
                        return Ok(());
                    }
                }
                let ready = socket
                    .poll(zmq::POLLIN, POLL_INTERVAL_MS)
                    .map_err(|e| sub_error(format!("poll failed: {e}")))?;
                if ready == 0 {
                    continue;
                }
                while let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) {
                    let [topic, payload] = frames.as_slice() else {
                        bad_frames += 1;
                        tracing::warn!(
                            frames = frames.len(),
                            bad_frames,
                            "Dropped a message that is not [topic, payload]."
                        );
                        continue;
                    };
                    let topic = String::from_utf8_lossy(topic);
                    if topic == HEARTBEAT_TOPIC {
                        let Ok((heartbeat, envelope)) = codec.decode(payload) else {
                            continue;
                        };
                        silence.heard(envelope.publisher.as_deref(), true);
                        if let Some(p) = &envelope.publisher {
                            owed.remove(p);
                        }
                        if let Some(reason) =
                            tracker.heartbeat(&heartbeat, &envelope, |t| wanted.wants(t))
                        {
                            let publisher = envelope.publisher.as_deref().unwrap_or_default();
                            if !repair_or_sync(
                                &mut tracker,
                                &mut dedup,
                                publisher,
                                &wanted,
                                codec,
                                reason,
                                &sink,
                            ) {
                                return Ok(());
                            }
                        }
                        continue;
                    }
                    if !wanted.wants(&topic) {
                        continue;
                    }
                    match codec.decode(payload) {
                        Ok((update, envelope)) => {
                            silence.heard(envelope.publisher.as_deref(), false);
                            if let Some(reason) = tracker.check(&topic, &envelope) {
                                let publisher = envelope.publisher.as_deref().unwrap_or_default();
                                if !repair_or_sync(
                                    &mut tracker,
                                    &mut dedup,
                                    publisher,
                                    &wanted,
                                    codec,
                                    reason,
                                    &sink,
                                ) {
                                    return Ok(());
                                }
                            }
                            if !dedup.fresh(&update) {
                                continue; // repeated by a run that resumed
                            }
                            if sink.blocking_send(update).is_err() {
                                return Ok(());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%topic, error = %e, "Dropped an undecodable message.")
                        }
                    }
                }
            }
        };
        tokio::task::spawn_blocking(receive)
            .await
            .map_err(|e| sub_error(format!("receive thread failed: {e}")))?
    }
}
