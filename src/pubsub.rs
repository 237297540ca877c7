//! Dragonflow's pub/sub API in Rust: the [`Publisher`] and [`Subscriber`]
//! traits every backend implements. It imports no backend: the manager
//! that returns both for the backend a config selects is
//! [`PubSub`](crate::backend::PubSub).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::update::DbUpdate;

/// A publish that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The publisher was closed.
    #[error("publisher is closed")]
    Closed,
    /// The backend could not be set up (bad endpoint, port in use...).
    #[error("cannot set up the {backend} publisher: {message}")]
    Setup {
        /// Backend name.
        backend: &'static str,
        /// What failed.
        message: String,
    },
    /// The backend refused or could not be reached; worth retrying.
    #[error("{backend} publish failed: {message}")]
    Send {
        /// Backend name.
        backend: &'static str,
        /// What failed.
        message: String,
    },
}

/// A subscriber that could not run.
#[derive(Debug, thiserror::Error)]
#[error("{backend} subscriber: {message}")]
pub struct SubscribeError {
    /// Backend name.
    pub backend: &'static str,
    /// What failed.
    pub message: String,
}

/// Sends updates to subscribers (Dragonflow's `PublisherApi`).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one update on `topic`, or on `update.topic` when `None`.
    /// Returns once the backend has taken the message.
    async fn send_event(&self, update: &DbUpdate, topic: Option<&str>) -> Result<(), PublishError>;

    /// Publishes updates in order, each on its own topic. Backends that can
    /// pipeline (Redis) send them in one round trip.
    async fn send_batch(&self, updates: &[DbUpdate]) -> Result<(), PublishError> {
        for update in updates {
            self.send_event(update, None).await?;
        }
        Ok(())
    }

    /// Waits until every update sent so far has left this process. Backends
    /// whose `send_event` waits for the server already satisfy this.
    async fn flush(&self) -> Result<(), PublishError> {
        Ok(())
    }

    /// Sends what is queued and releases the connection.
    async fn close(&self) -> Result<(), PublishError>;
}

/// What a subscriber calls for every update it receives.
pub type Callback = Box<dyn FnMut(DbUpdate) + Send>;

/// Receives updates (Dragonflow's `SubscriberApi`). Topic and address
/// changes take effect while it runs. A subscriber delivers a `sync` update
/// whenever it may have missed some (reconnect, detected gap): the
/// application should then re-read its state from the database.
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Starts receiving `topic` (exact match; the empty topic means all).
    fn register_topic(&self, topic: &str);
    /// Stops receiving `topic`.
    fn unregister_topic(&self, topic: &str);
    /// Adds a publisher to receive from (ZeroMQ endpoints; others ignore it).
    fn register_listen_address(&self, uri: &str);
    /// Removes a publisher.
    fn unregister_listen_address(&self, uri: &str);
    /// Makes [`Subscriber::run`] return soon.
    fn stop(&self);

    /// How many gaps in publishers' sequences were detected (each one
    /// repaired from the publisher's replay buffer or etcd's history, or,
    /// when that history is gone, delivered as a `sync`).
    fn gaps(&self) -> u64 {
        0
    }

    /// How many times a connection was taken for dead because nothing was
    /// heard on it for the silence timeout (each one followed by a
    /// reconnect and a repair, or a `sync` when no repair is possible).
    fn silences(&self) -> u64 {
        0
    }

    /// By publisher service: the revision up to which this subscriber has
    /// received every update on its topics, the position it resumes from
    /// after a reconnect or a gap. Empty until a publisher's first
    /// heartbeat (at most half a second after its first contact): a
    /// subscriber cut off before it has no position, and delivers a `sync`.
    fn positions(&self) -> std::collections::BTreeMap<String, i64> {
        Default::default()
    }

    /// The backend's receive loop: sends every update into `sink` until
    /// stopped or until `sink` is closed.
    async fn pump(&self, sink: mpsc::Sender<DbUpdate>) -> Result<(), SubscribeError>;

    /// Calls `callback` for every update until stopped.
    async fn run(&self, mut callback: Callback) -> Result<(), SubscribeError> {
        let (tx, mut rx) = mpsc::channel(1024);
        let deliver = async move {
            while let Some(update) = rx.recv().await {
                callback(update);
            }
        };
        let (result, ()) = tokio::join!(self.pump(tx), deliver);
        result
    }

    /// Runs in a background task; `stop` ends it.
    fn daemonize(self: Arc<Self>, callback: Callback) -> JoinHandle<Result<(), SubscribeError>> {
        tokio::spawn(async move { self.run(callback).await })
    }

    /// Runs in a background task and returns the updates as a bounded
    /// channel: a slow reader slows the subscriber instead of growing memory.
    fn updates(
        self: Arc<Self>,
        capacity: usize,
    ) -> (
        mpsc::Receiver<DbUpdate>,
        JoinHandle<Result<(), SubscribeError>>,
    ) {
        let (tx, rx) = mpsc::channel(capacity);
        (rx, tokio::spawn(async move { self.pump(tx).await }))
    }
}
