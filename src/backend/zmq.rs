//! The ZeroMQ backend on libzmq (the `zmq` crate): a PUB socket sending
//! two-frame `[topic, payload]` messages, and a SUB socket receiving them.
//!
//! libzmq sockets are blocking and not thread-safe, so each socket is owned
//! by one dedicated thread fed through a channel; the rest stays async.

use std::collections::BTreeSet;
use std::sync::{LazyLock, Mutex};
use std::thread;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Registration, Registry};
use crate::codec::{Codec, Envelope};
use crate::config::ZmqBackendConfig;
use crate::pubsub::{PublishError, SubscribeError, Subscriber};
use crate::update::DbUpdate;

/// One libzmq context (its I/O thread) for the whole process.
static CONTEXT: LazyLock<zmq::Context> = LazyLock::new(zmq::Context::new);

/// How often the subscriber thread looks at registration changes and stop
/// requests while no message arrives.
const POLL_INTERVAL_MS: i64 = 50;

/// Commands to the publisher's socket thread.
enum Outgoing {
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// Answered once everything queued before it went to the socket.
    Flush(oneshot::Sender<()>),
}

/// PUB socket publisher.
#[derive(Debug)]
pub struct ZmqPublisher {
    codec: Codec,
    endpoint: String,
    queue: Mutex<Option<mpsc::Sender<Outgoing>>>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

fn setup_error(endpoint: &str, what: &str, e: zmq::Error) -> PublishError {
    PublishError::Setup {
        backend: "zmq",
        message: format!("{what} {endpoint}: {e}"),
    }
}

impl ZmqPublisher {
    /// Binds the PUB socket now, so a taken port fails at start-up.
    pub fn bind(config: &ZmqBackendConfig) -> Result<Self, PublishError> {
        let endpoint = config.bind.clone();
        let socket = CONTEXT
            .socket(zmq::PUB)
            .map_err(|e| setup_error(&endpoint, "cannot create a PUB socket for", e))?;
        socket
            .set_sndhwm(config.send_hwm)
            .and_then(|()| {
                socket.set_linger(config.linger.as_millis().try_into().unwrap_or(i32::MAX))
            })
            .map_err(|e| setup_error(&endpoint, "cannot set options on", e))?;
        remove_stale_ipc_file(&endpoint);
        socket
            .bind(&endpoint)
            .map_err(|e| setup_error(&endpoint, "cannot bind", e))?;
        tracing::info!(%endpoint, codec = %config.codec, send_hwm = config.send_hwm, "ZeroMQ publisher bound.");
        let (tx, mut rx) = mpsc::channel::<Outgoing>(1024);
        let name = endpoint.clone();
        let thread = thread::Builder::new()
            .name("zmq-pub".into())
            .spawn(move || {
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Outgoing::Message { topic, payload } => {
                            // PUB never blocks: at the high-water mark libzmq
                            // drops for that subscriber, which bounds memory.
                            if let Err(e) = socket.send_multipart([topic.as_bytes(), &payload], 0) {
                                tracing::warn!(endpoint = %name, error = %e, "ZeroMQ send failed.");
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
            codec: config.codec,
            endpoint,
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The bound endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn sender(&self) -> Result<mpsc::Sender<Outgoing>, PublishError> {
        self.queue
            .lock()
            .expect("queue lock")
            .clone()
            .ok_or(PublishError::Closed)
    }

    /// Sends a payload that is already encoded (the publisher service
    /// forwards what local processes pushed).
    pub async fn send_raw(&self, topic: String, payload: Vec<u8>) -> Result<(), PublishError> {
        self.sender()?
            .send(Outgoing::Message { topic, payload })
            .await
            .map_err(|_| PublishError::Closed)
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

/// A crashed run leaves its ipc socket file behind; binding over it is safe
/// only because this process is about to own the endpoint.
fn remove_stale_ipc_file(endpoint: &str) {
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        if std::fs::remove_file(path).is_ok() {
            tracing::info!(%path, "Removed a stale ipc socket file.");
        }
    }
}

#[async_trait]
impl crate::pubsub::Publisher for ZmqPublisher {
    async fn send_event(&self, update: &DbUpdate, topic: Option<&str>) -> Result<(), PublishError> {
        let topic = topic.unwrap_or(&update.topic);
        let payload = self.codec.encode(update, &Envelope::default());
        self.send_raw(topic.to_owned(), payload).await
    }

    async fn flush(&self) -> Result<(), PublishError> {
        self.flush_queue().await
    }

    async fn close(&self) -> Result<(), PublishError> {
        let _ = self.flush_queue().await;
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
}

impl ZmqSubscriber {
    /// A subscriber with no topics and no publishers yet.
    pub fn new(codec: Codec) -> Self {
        ZmqSubscriber {
            codec,
            registry: Registry::default(),
            stop: CancellationToken::new(),
        }
    }
}

fn sub_error(message: String) -> SubscribeError {
    SubscribeError {
        backend: "zmq",
        message,
    }
}

/// Brings a SUB socket from the `applied` registration to `wanted`.
fn apply(socket: &zmq::Socket, applied: &mut Registration, wanted: &Registration) {
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

    async fn pump(&self, sink: mpsc::Sender<DbUpdate>) -> Result<(), SubscribeError> {
        let socket = CONTEXT
            .socket(zmq::SUB)
            .map_err(|e| sub_error(format!("cannot create a SUB socket: {e}")))?;
        let mut registration = self.registry.watch();
        let stop = self.stop.clone();
        let codec = self.codec;
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
                    if !wanted.wants(&topic) {
                        continue;
                    }
                    match codec.decode(payload) {
                        Ok((update, _envelope)) => {
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
