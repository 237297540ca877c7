//! Publish backends, each with its publisher and subscriber side:
//! ZeroMQ ([`zmq`]), Redis PUBLISH ([`redis`]) and etcd `/pubsub` keys
//! ([`etcd`]); the [`PubSub`] manager that picks one from config; and what
//! they share: the subscriber [`registry`] and the [`sequence`] numbers,
//! gap tracking and heartbeats.

pub mod etcd;
pub mod redis;
pub mod registry;
pub mod replay;
pub mod sequence;
pub mod zmq;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use registry::{Registration, Registry};
pub use sequence::{
    Dedup, GapTracker, Gate, Heartbeat, Positions, Sequencer, Silence, HEARTBEAT_INTERVAL,
    HEARTBEAT_TOPIC,
};

use crate::config::BackendConfig;
use crate::pubsub::{PublishError, Publisher, Subscriber};

/// The manager: one backend config gives a publisher and subscribers
/// (Dragonflow's `PubSubApi.get_publisher / get_subscriber`).
#[derive(Clone)]
pub struct PubSub {
    config: BackendConfig,
    publisher_id: String,
    heartbeat_gate: Option<Gate>,
    positions: Option<Arc<Positions>>,
    fence: Option<(String, CancellationToken)>,
}

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field("config", &self.config)
            .field("publisher_id", &self.publisher_id)
            .finish_non_exhaustive()
    }
}

impl PubSub {
    /// A manager for one backend. Its publishers' default id is unique to
    /// this manager (host, process and a counter), so two publishers never
    /// share a sequence; a service that restarts sets a stable one with
    /// [`PubSub::with_publisher_id`] so that subscribers can tell a restart.
    pub fn new(config: BackendConfig) -> Self {
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("feedbridge-client#{}#{n}", std::process::id());
        PubSub {
            config,
            publisher_id: crate::discovery::publisher_id(&name),
            heartbeat_gate: None,
            positions: None,
            fence: None,
        }
    }

    /// Sets the id publishers stamp on their messages.
    pub fn with_publisher_id(mut self, id: impl Into<String>) -> Self {
        self.publisher_id = id.into();
        self
    }

    /// Heartbeats go out only while `gate` says so (checked right before
    /// each one): an HA leader's publisher falls silent the moment its
    /// leadership is in doubt, heartbeats included.
    pub fn with_heartbeat_gate(mut self, gate: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.heartbeat_gate = Some(Arc::new(gate));
        self
    }

    /// Heartbeats announce these positions (see [`Positions`]).
    pub fn with_positions(mut self, positions: Arc<Positions>) -> Self {
        self.positions = Some(positions);
        self
    }

    /// Publishers take this fence key at connect and publish only while
    /// they hold it (Redis backend, see
    /// [`RedisPublisher::fenced`](redis::RedisPublisher::fenced)); they
    /// cancel `fenced` when they find a newer term holds it: this term can
    /// never publish again, and its owner must stand down.
    pub fn with_fence(mut self, key: impl Into<String>, fenced: CancellationToken) -> Self {
        self.fence = Some((key.into(), fenced));
        self
    }

    /// The id publishers of this manager stamp on their messages.
    pub fn publisher_id(&self) -> String {
        self.publisher_id.clone()
    }

    /// Connects a publisher; fails fast when the backend cannot be set up.
    pub async fn get_publisher(&self) -> Result<Arc<dyn Publisher>, PublishError> {
        let mut sequencer = Sequencer::new(self.publisher_id());
        if let Some(gate) = &self.heartbeat_gate {
            sequencer = sequencer.with_heartbeat_gate(gate.clone());
        }
        if let Some(positions) = &self.positions {
            sequencer = sequencer.with_positions(positions.clone());
        }
        let sequencer = Arc::new(sequencer);
        Ok(match &self.config {
            BackendConfig::Zmq(c) => Arc::new(zmq::ZmqPublisher::bind(c, sequencer)?),
            BackendConfig::Redis(c) => {
                Arc::new(redis::RedisPublisher::fenced(c, sequencer, self.fence.clone()).await?)
            }
            BackendConfig::Etcd(c) => Arc::new(etcd::EtcdPublisher::connect(c, sequencer).await?),
        })
    }

    /// A subscriber of the same backend, registered on `D` (every
    /// update sent to all). For ZeroMQ it listens to the configured bind
    /// endpoint; more publishers are added with `register_listen_address`.
    pub fn get_subscriber(&self) -> Arc<dyn Subscriber> {
        let sub: Arc<dyn Subscriber> = match &self.config {
            BackendConfig::Zmq(c) => {
                let s = Arc::new(
                    zmq::ZmqSubscriber::new(c.codec).with_silence_timeout(c.silence_timeout),
                );
                if !c.bind.is_empty() {
                    s.register_listen_address(&c.bind);
                }
                s
            }
            BackendConfig::Redis(c) => Arc::new(redis::RedisSubscriber::new(c)),
            BackendConfig::Etcd(c) => Arc::new(etcd::EtcdSubscriber::new(c)),
        };
        sub.register_topic(crate::SEND_ALL_TOPIC);
        sub
    }
}
