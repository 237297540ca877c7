//! The etcd backend: `PUT <prefix><topic> <payload>` (Dragonflow's etcd
//! pub/sub layout, prefix `/pubsub/`), and a subscriber that watches the
//! prefix and resumes from the last seen revision after a dropped stream,
//! so a burst of puts to one topic key arrives in full, not only its last
//! value.

use async_trait::async_trait;
use etcd_client::{Client, EventType, Txn, TxnOp, WatchOptions};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::registry::Registry;
use super::sequence::{Dedup, GapTracker, Sequencer};
use crate::codec::Codec;
use crate::config::EtcdBackendConfig;
use crate::db::etcd::{connect, prefix_end};
use crate::pubsub::{PublishError, Publisher, SubscribeError, Subscriber};
use crate::retry::Reconnect;
use crate::update::DbUpdate;

/// `PUT` publisher.
pub struct EtcdPublisher {
    client: Client,
    prefix: String,
    codec: Codec,
    sequencer: Arc<Sequencer>,
    /// Stamp and PUT happen under this lock so numbers go out in order.
    order: Mutex<()>,
}

impl EtcdPublisher {
    /// Connects now and checks the cluster answers, so a wrong endpoint
    /// fails at start-up.
    pub async fn connect(
        config: &EtcdBackendConfig,
        sequencer: Arc<Sequencer>,
    ) -> Result<Self, PublishError> {
        let setup = |message: String| PublishError::Setup {
            backend: "etcd",
            message: format!(
                "{message} (check backend.endpoints {})",
                crate::config::redact_endpoints(&config.endpoints)
            ),
        };
        let probe = async {
            let mut client =
                connect(&config.endpoints, config.connect_timeout, &config.auth).await?;
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        let client = tokio::time::timeout(config.connect_timeout, probe)
            .await
            .map_err(|_| setup("connect timed out".into()))?
            .map_err(|e| setup(format!("cannot connect: {e}")))?;
        tracing::info!(endpoints = %crate::config::redact_endpoints(&config.endpoints), prefix = %config.prefix, codec = %config.codec, "etcd publisher connected.");
        Ok(EtcdPublisher {
            client,
            prefix: config.prefix.clone(),
            codec: config.codec,
            sequencer,
            order: Mutex::new(()),
        })
    }
}

#[async_trait]
impl Publisher for EtcdPublisher {
    async fn send_event(&self, update: &DbUpdate, topic: Option<&str>) -> Result<(), PublishError> {
        let topic = topic.unwrap_or(&update.topic);
        let _order = self.order.lock().await;
        self.leading()?;
        let payload = self.codec.encode(update, &self.sequencer.stamp(topic));
        let key = format!("{}{}", self.prefix, topic);
        let result = self.client.clone().put(key, payload, None).await;
        result.map(drop).map_err(|e| {
            self.sequencer.rollback(topic);
            PublishError::Send {
                backend: "etcd",
                message: e.to_string(),
            }
        })
    }

    /// Updates on different topics share one transaction (etcd's default
    /// `--max-txn-ops` is 128), one round trip and one revision for them
    /// all; a transaction may not put one key twice, so a topic that comes
    /// again starts the next one, and the order per topic is kept. A
    /// stream on a single topic is still one PUT per update.
    async fn send_batch(&self, updates: &[DbUpdate]) -> Result<(), PublishError> {
        let _order = self.order.lock().await;
        self.leading()?;
        let mut rest = updates;
        while !rest.is_empty() {
            let mut topics: Vec<&str> = Vec::new();
            let mut ops = Vec::new();
            for update in rest {
                let topic = update.topic.as_str();
                if topics.len() == MAX_TXN_OPS || topics.contains(&topic) {
                    break;
                }
                topics.push(topic);
                let payload = self.codec.encode(update, &self.sequencer.stamp(topic));
                ops.push(TxnOp::put(format!("{}{topic}", self.prefix), payload, None));
            }
            let sent = self.client.clone().txn(Txn::new().and_then(ops)).await;
            if let Err(e) = sent {
                for topic in topics.iter().rev() {
                    self.sequencer.rollback(topic);
                }
                return Err(PublishError::Send {
                    backend: "etcd",
                    message: e.to_string(),
                });
            }
            rest = &rest[topics.len()..];
        }
        Ok(())
    }

    async fn close(&self) -> Result<(), PublishError> {
        Ok(())
    }
}

impl EtcdPublisher {
    /// Leadership, checked again under the order lock right before sending.
    fn leading(&self) -> Result<(), PublishError> {
        if self.sequencer.gate_open() {
            Ok(())
        } else {
            Err(PublishError::Send {
                backend: "etcd",
                message: "not the leader any more".into(),
            })
        }
    }
}

/// Operations in one transaction at most (etcd's default `--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// Watch subscriber of the topic keys.
pub struct EtcdSubscriber {
    config: EtcdBackendConfig,
    registry: Registry,
    stop: CancellationToken,
    gaps: Arc<AtomicU64>,
    positions: crate::backend::sequence::SharedPositions,
    silences: Arc<AtomicU64>,
}

/// How often the subscriber asks etcd for the watch's progress: an
/// answer, like any message, shows the stream is alive.
const PROGRESS_REQUEST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl EtcdSubscriber {
    /// A subscriber of the configured cluster (connects when run).
    pub fn new(config: &EtcdBackendConfig) -> Self {
        EtcdSubscriber {
            config: config.clone(),
            registry: Registry::default(),
            stop: CancellationToken::new(),
            gaps: Arc::default(),
            positions: Arc::default(),
            silences: Arc::default(),
        }
    }

    /// One watch stream from `from` (0: now). Returns the next revision to
    /// watch from and why it ended (`None` when stopped).
    async fn session(
        &self,
        from: i64,
        sink: &mpsc::Sender<DbUpdate>,
        reconnect: &mut Reconnect,
        tracker: &mut GapTracker,
        dedup: &mut Dedup,
    ) -> (i64, Option<String>) {
        let mut next = from;
        let result: Result<(), etcd_client::Error> = async {
            let client = connect(
                &self.config.endpoints,
                self.config.connect_timeout,
                &self.config.auth,
            )
            .await?;
            let prefix = self.config.prefix.as_bytes();
            // A catch-up after downtime batches many revisions in one
            // response: fragmented, and decoded whatever its size.
            let mut opts = WatchOptions::new()
                .with_range(prefix_end(prefix))
                .with_progress_notify()
                .with_fragment();
            if from > 0 {
                opts = opts.with_start_revision(from);
            }
            let mut stream = crate::db::etcd::watch_client(&client)
                .watch(prefix.to_vec(), Some(opts))
                .await?;
            let registration = self.registry.watch();
            // The stream's own liveness: etcd answers a progress request
            // even when nothing is published, so silence means the
            // connection (or the member) is gone, whatever TCP believes.
            let mut ask = tokio::time::interval(PROGRESS_REQUEST_INTERVAL);
            ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut heard = tokio::time::Instant::now();
            loop {
                let message = tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => return Ok(()),
                    m = stream.message() => m?,
                    _ = ask.tick() => {
                        let quiet = heard.elapsed();
                        if quiet > self.config.silence_timeout {
                            self.silences.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(quiet = ?quiet, timeout = ?self.config.silence_timeout, "The etcd watch answered nothing for the silence timeout: reconnecting (resuming from the last revision).");
                            return Err(etcd_client::Error::WatchError(format!(
                                "no answer from etcd for {:.1} s",
                                quiet.as_secs_f64()
                            )));
                        }
                        // A stalled connection may not take even the request:
                        // the next tick looks at the silence again.
                        if let Ok(sent) = tokio::time::timeout(PROGRESS_REQUEST_INTERVAL, stream.request_progress()).await {
                            sent?;
                        }
                        continue;
                    }
                };
                heard = tokio::time::Instant::now();
                let Some(resp) = message else {
                    return Err(etcd_client::Error::WatchError("watch stream closed".into()));
                };
                if resp.created() {
                    reconnect.up();
                    if next == 0 {
                        next = resp.header().map(|h| h.revision() + 1).unwrap_or(0);
                    }
                }
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        // Messages before the compaction are gone: say so.
                        next = 0;
                        if sink
                            .send(DbUpdate::sync("etcd pub/sub history was compacted"))
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                    return Err(etcd_client::Error::WatchError(format!(
                        "watch cancelled: {}",
                        resp.cancel_reason()
                    )));
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    next = kv.mod_revision() + 1;
                    if event.event_type() != EventType::Put {
                        continue;
                    }
                    let topic = String::from_utf8_lossy(&kv.key()[prefix.len()..]);
                    if !registration.borrow().wants(&topic) {
                        continue;
                    }
                    match self.config.codec.decode(kv.value()) {
                        Ok((update, envelope)) => {
                            if let Some(reason) = tracker.check(&topic, &envelope) {
                                if sink.send(DbUpdate::sync(reason)).await.is_err() {
                                    return Ok(());
                                }
                            }
                            if !dedup.fresh(&update) {
                                continue; // repeated by a run that resumed
                            }
                            if sink.send(update).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%topic, error = %e, "Dropped an undecodable message.")
                        }
                    }
                }
            }
        }
        .await;
        (next, result.err().map(|e| e.to_string()))
    }
}

#[async_trait]
impl Subscriber for EtcdSubscriber {
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
        let mut reconnect = Reconnect::new("etcd subscriber");
        let mut next = 0;
        // The watch resumes from its revision: a publisher's restart loses
        // nothing here, so only a real gap (compaction) makes a sync.
        let mut tracker = GapTracker::new(self.gaps.clone())
            .lossless()
            .showing(self.positions.clone());
        let mut dedup = Dedup::default();
        loop {
            let (n, error) = self
                .session(next, &sink, &mut reconnect, &mut tracker, &mut dedup)
                .await;
            next = n;
            match error {
                None => return Ok(()),
                Some(e) => {
                    if sink.is_closed() || !reconnect.down(&e, &self.stop).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}
