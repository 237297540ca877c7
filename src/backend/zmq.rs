//! The ZeroMQ backend on libzmq (the `zmq` crate): a PUB socket sending
//! two-frame `[topic, payload]` messages, and a SUB socket receiving them.
//!
//! libzmq sockets are blocking and not thread-safe, so each socket is owned
//! by one dedicated thread fed through a channel; the rest stays async.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::registry::{Registration, Registry};
use super::sequence::{GapTracker, Sequencer, HEARTBEAT_INTERVAL, HEARTBEAT_TOPIC};
use crate::codec::Codec;
use crate::config::ZmqBackendConfig;
use crate::pubsub::{PublishError, SubscribeError, Subscriber};
use crate::update::DbUpdate;
use crate::zmq_socket::{bind, CONTEXT};

/// How often the subscriber thread looks at registration changes and stop
/// requests while no message arrives.
const POLL_INTERVAL_MS: i64 = 50;

/// Commands to the publisher's socket thread.
enum Outgoing {
    /// Stamped and encoded on the socket thread, so sequence numbers leave
    /// in the order they were given.
    Update { update: DbUpdate, topic: String },
    /// Several updates on their own topics: one queue operation (and at
    /// most one wake-up of the socket thread) for a whole batch.
    Batch(Vec<DbUpdate>),
    /// Answered once everything queued before it went to the socket.
    Flush(oneshot::Sender<()>),
    /// Time to announce the last sequence numbers (see [`HEARTBEAT_TOPIC`]).
    Heartbeat,
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

/// Holds publishing back after a (re)start until the subscribers that stayed
/// up have rejoined: until their subscriptions have arrived and gone quiet
/// (at least [`REJOIN_MIN`]), or `max` at most when none arrive.
fn wait_for_rejoin(socket: &zmq::Socket, max: Duration, endpoint: &str) {
    let start = std::time::Instant::now();
    let mut last = None;
    let mut subscriptions = 0;
    while start.elapsed() < max {
        if let Some(t) = last {
            if start.elapsed() >= REJOIN_MIN && std::time::Instant::elapsed(&t) >= REJOIN_QUIET {
                break;
            }
        }
        if socket.poll(zmq::POLLIN, 20).unwrap_or(0) > 0 {
            let n = take_subscriptions(socket);
            if n > 0 {
                subscriptions += n;
                last = Some(std::time::Instant::now());
            }
        }
    }
    tracing::info!(%endpoint, subscriptions, waited_ms = start.elapsed().as_millis() as u64, "Publishing: subscribers had the chance to rejoin.");
}

/// A ZeroMQ publisher: a PUB socket bound for subscribers, or a PUSH socket
/// connected to the publisher service's multiproc channel.
#[derive(Debug)]
pub struct ZmqPublisher {
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
            .map_err(|e| setup_error(&endpoint, "cannot set options on", e))?;
        bind(&socket, &endpoint).map_err(|message| PublishError::Setup {
            backend: "zmq",
            message,
        })?;
        tracing::info!(%endpoint, codec = %config.codec, send_hwm = config.send_hwm, "ZeroMQ publisher bound.");
        Self::start(
            socket,
            endpoint,
            config.codec,
            Some((sequencer, config.rejoin_wait)),
            config.linger,
        )
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
        Self::start(socket, endpoint.to_owned(), codec, None, linger)
    }

    fn start(
        socket: zmq::Socket,
        endpoint: String,
        codec: Codec,
        publisher: Option<(Arc<Sequencer>, Duration)>,
        linger: Duration,
    ) -> Result<Self, PublishError> {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(1024);
        let name = endpoint;
        let closing = Arc::new(AtomicBool::new(false));
        let stop_retrying = closing.clone();
        let (sequencer, rejoin_wait) = match publisher {
            Some((s, wait)) => (Some(s), Some(wait)),
            None => (None, None),
        };
        if sequencer.is_some() {
            spawn_heartbeat(tx.downgrade());
        }
        let thread = thread::Builder::new()
            .name("zmq-publisher".into())
            .spawn(move || {
                if let Some(wait) = rejoin_wait {
                    wait_for_rejoin(&socket, wait, &name);
                }
                // One buffer for every payload; the id is borrowed.
                let mut buf = Vec::with_capacity(1024);
                let send = |update: &DbUpdate, topic: &str, buf: &mut Vec<u8>| {
                    buf.clear();
                    match &sequencer {
                        Some(s) => codec.encode_into(update, Some(s.id()), Some(s.epoch()), Some(s.next_seq(topic)), buf),
                        None => codec.encode_into(update, None, None, None, buf),
                    }
                    // PUB never blocks: at the high-water mark libzmq
                    // drops for that subscriber, which bounds memory. PUSH
                    // times out (EAGAIN) while no peer takes it: retried
                    // until close.
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
                        Outgoing::Heartbeat => {
                            take_subscriptions(&socket);
                            if let Some((update, envelope)) = sequencer.as_ref().and_then(|s| s.heartbeat()) {
                                let payload = codec.encode(&update, &envelope);
                                let _ = socket.send_multipart([HEARTBEAT_TOPIC.as_bytes(), &payload], zmq::DONTWAIT);
                            }
                        }
                        Outgoing::Update { update, topic } => {
                            send(&update, &topic, &mut buf);
                        }
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

/// Queues a heartbeat every [`HEARTBEAT_INTERVAL`] while the publisher is
/// open (it holds only a weak sender, so it never keeps the queue open).
/// Skipped when the queue is full: then data, with its numbers, is flowing.
fn spawn_heartbeat(queue: mpsc::WeakSender<Outgoing>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(queue) = queue.upgrade() else { return };
            let _ = queue.try_send(Outgoing::Heartbeat);
        }
    });
}

#[async_trait]
impl crate::pubsub::Publisher for ZmqPublisher {
    async fn send_event(&self, update: &DbUpdate, topic: Option<&str>) -> Result<(), PublishError> {
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
        self.sender()?
            .send(Outgoing::Batch(updates.to_vec()))
            .await
            .map_err(|_| PublishError::Closed)
    }

    async fn flush(&self) -> Result<(), PublishError> {
        self.flush_queue().await
    }

    async fn close(&self) -> Result<(), PublishError> {
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
    receive_hwm: i32,
}

impl ZmqSubscriber {
    /// A subscriber with no topics and no publishers yet.
    pub fn new(codec: Codec) -> Self {
        ZmqSubscriber {
            codec,
            registry: Registry::default(),
            stop: CancellationToken::new(),
            gaps: Arc::default(),
            receive_hwm: 1000,
        }
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

    async fn pump(&self, sink: mpsc::Sender<DbUpdate>) -> Result<(), SubscribeError> {
        let socket = CONTEXT
            .socket(zmq::SUB)
            .map_err(|e| sub_error(format!("cannot create a SUB socket: {e}")))?;
        socket
            .set_rcvhwm(self.receive_hwm)
            .map_err(|e| sub_error(format!("cannot set the receive high-water mark: {e}")))?;
        let mut registration = self.registry.watch();
        let stop = self.stop.clone();
        let codec = self.codec;
        let mut tracker = GapTracker::new(self.gaps.clone());
        let receive = move || -> Result<(), SubscribeError> {
            let mut applied = Registration::default();
            let mut wanted = registration.borrow_and_update().clone();
            apply(&socket, &mut applied, &wanted);
            let mut bad_frames = 0u64;
            loop {
                if stop.is_cancelled() || sink.is_closed() {
                    return Ok(());
                }
                if registration.has_changed().unwrap_or(false) {
                    wanted = registration.borrow_and_update().clone();
                    apply(&socket, &mut applied, &wanted);
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
                        if let Some(reason) =
                            tracker.heartbeat(&heartbeat, &envelope, |t| wanted.wants(t))
                        {
                            tracing::warn!(%reason, "Delivering a sync: updates may have been missed.");
                            if sink.blocking_send(DbUpdate::sync(reason)).is_err() {
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
                            if let Some(reason) = tracker.check(&topic, &envelope) {
                                tracing::warn!(%reason, "Delivering a sync: updates may have been missed.");
                                if sink.blocking_send(DbUpdate::sync(reason)).is_err() {
                                    return Ok(());
                                }
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
