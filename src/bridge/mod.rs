//! The bridge: source → mapper → publisher, run term by term (one term
//! without HA; one per leadership with it).
//!
//! A term is built in named steps ([`run_once`] reads as the list):
//! connect the publisher, build the mapper, open the checkpoint, start the
//! producers (the source and the multiproc channel), register for
//! discovery, then run the [`pipeline`] until stop and wind down.
//!
//! One bounded channel sits between the producers and the publishing
//! loop; when the backend is slow the channel fills and the source stops
//! reading. Publishing retries with backoff until it succeeds, so a backend
//! outage delays updates but loses none. A checkpoint is saved only after
//! the publisher has flushed everything before it ([`checkpoints`] says
//! where it lives).

mod checkpoints;
mod error;
mod history;
mod pipeline;

pub use error::BridgeError;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::replay::{ReplayBuffer, ReplayServer};
use crate::backend::{Positions, PubSub};
use crate::checkpoint;
use crate::config::advertised_uri;
use crate::config::{BackendConfig, Config, SourceConfig};
use crate::discovery::Registration;
use crate::ha::Leadership;
use crate::keymap::KeyLayout;
use crate::mapper::Mapper;
use crate::pubsub::Publisher;
use crate::retry::Reconnect;
use crate::service::MultiprocListener;
use crate::source::etcd::EtcdSource;
use crate::source::etcd_history::HistoryReader;
use crate::source::redis::RedisSource;
use crate::source::SourceEvent;
use crate::stats::Stats;
use checkpoints::Checkpoints;
use pipeline::Pipeline;

/// Keys the bridge writes itself and must never republish: the etcd
/// backend's topics and the `publisher` table (etcd and Redis layouts).
pub const OWN_PREFIXES: [&str; 4] = [
    "/pubsub/",
    "/publisher/",
    "{publisher.",
    checkpoint::ETCD_CHECKPOINT_PREFIX,
];

/// The runtime the bridge (and `feedbridge tail`) runs on: one thread.
///
/// The work per change is small and I/O bound; on a multi-thread runtime
/// every change crossed threads (the gRPC or RESP connection task, the
/// source, the publishing loop), and each crossing is a futex wake-up that
/// costs more than the work itself. One thread measured 10–15 % less CPU
/// per change (README, Performance). Blocking work has its own pool.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("feedbridge")
        .build()
}

type Producer = JoinHandle<Result<(), BridgeError>>;

/// Runs a producer; if it fails, stops the others so the bridge exits
/// with its error instead of running half.
fn spawn_producer<F>(stop: &CancellationToken, work: F) -> Producer
where
    F: std::future::Future<Output = Result<(), BridgeError>> + Send + 'static,
{
    let stop = stop.clone();
    tokio::spawn(async move {
        let result = work.await;
        if result.is_err() {
            stop.cancel();
        }
        result
    })
}

/// The bridge's publisher id: stable across restarts of the same service
/// on the same host (so subscribers can tell a restart), distinct for two
/// services (they differ in what they read or where they publish). Under
/// HA, the group's `ha.service`: members may reach the same databases by
/// different addresses.
fn service_id(config: &Config) -> String {
    if let Some(service) = config.ha.as_ref().and_then(|h| h.service.as_deref()) {
        return crate::discovery::publisher_id(&format!("feedbridge-ha:{service}"));
    }
    let backend = match &config.backend {
        BackendConfig::Zmq(c) => c.bind.clone(),
        BackendConfig::Redis(c) => crate::db::redis::redacted(&c.url),
        BackendConfig::Etcd(c) => c.endpoints.join(","),
    };
    let source = match &config.source {
        Some(SourceConfig::Etcd(c)) => format!("etcd:{}{}", c.endpoints.join(","), c.prefix),
        Some(SourceConfig::Redis(c)) => {
            format!("redis:{}", crate::db::redis::redacted(&c.url))
        }
        None => String::new(),
    };
    let multiproc = config
        .multiproc
        .as_ref()
        .map(|m| m.endpoint())
        .unwrap_or_default();
    crate::discovery::publisher_id(&format!("feedbridge:{backend}|{source}|{multiproc}"))
}

/// Runs the bridge until `shutdown` fires, then publishes what is in flight
/// (within `bridge.shutdown_timeout`), saves the final checkpoint and returns.
/// With an `[ha]` section, it first waits to be elected, and goes back to
/// standing by whenever it loses leadership.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), BridgeError> {
    if let Some(listen) = &config.admin.listen {
        let addr = listen.parse().expect("validated config");
        crate::admin::serve(addr, stats.clone(), shutdown.clone())
            .await
            .map_err(BridgeError::Admin)?;
    }
    let Some(ha) = config.ha.clone() else {
        stats.leader.set(1);
        return run_once(&config, shutdown, stats, None).await;
    };
    let instance = ha
        .instance
        .clone()
        .unwrap_or_else(|| format!("{}-{}", crate::discovery::hostname(), std::process::id()));
    let service = service_id(&config);
    // Unreachable at start: a clear error. Lost later (a restart of the
    // store while this instance stands by): retried, never an exit.
    crate::ha::reachable(&ha).await.map_err(|e| {
        BridgeError::Ha(format!(
            "{e} (check ha.endpoints {} / ha.url)",
            crate::config::redact_endpoints(&ha.endpoints)
        ))
    })?;
    let mut reconnect = Reconnect::new("leader election");
    let mut term_start = Reconnect::new("a term's databases");
    loop {
        stats.leader.set(0);
        let lead = match crate::ha::campaign(&ha, &instance, &service, &shutdown).await {
            Ok(Some(lead)) => Arc::new(lead),
            Ok(None) => return Ok(()),
            Err(e) => {
                if !reconnect.down(&e, &shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        reconnect.up();
        stats.leader.set(1);
        let stop = shutdown.child_token();
        // The moment leadership is in doubt this instance says it stands
        // by (readiness, `feedbridge_leader`), as it stops publishing then:
        // not once the term's last calls to the store have failed.
        let standing_down = {
            let (lost, stop, stats) = (lead.lost(), stop.clone(), stats.clone());
            tokio::spawn(async move {
                lost.cancelled().await;
                stats.leader.set(0);
                stop.cancel();
            })
        };
        let result = run_once(
            &config,
            stop,
            stats.clone(),
            Some((lead.clone(), instance.as_str())),
        )
        .await;
        standing_down.abort();
        // An outage at a term's start is one like any other: stand by,
        // give the election to a member that may reach the databases, and
        // campaign again, never exit. Either the election's store answered
        // the campaign, then failed the term's first call (the checkpoint:
        // etcd restarting), or a database this process published through
        // in an earlier term is out of reach now (the backend or the source
        // restarting). In the process's first term such an error is the
        // configuration's (a wrong address): the exit below says so.
        if let (Err(e), false) = (&result, shutdown.is_cancelled()) {
            let outage = match e {
                BridgeError::Ha(_) => Some(&mut reconnect),
                _ if lead.is_valid() && stats.databases_reached() => Some(&mut term_start),
                _ => None,
            };
            if let Some(retry) = outage {
                stats.leader.set(0);
                lead.release_quietly().await;
                if !retry.down(e, &shutdown).await {
                    return Ok(());
                }
                continue;
            }
        }
        term_start.up();
        if shutdown.is_cancelled() || (result.is_err() && lead.is_valid()) {
            lead.resign().await;
            return result;
        }
        stats.leader.set(0);
        tracing::warn!(%instance, "Leadership lost: stopped publishing; standing by again.");
        // A term that stood down while its lease still held (found fenced)
        // gives its key back, so the next election does not wait a TTL.
        lead.release_quietly().await;
    }
}

/// One term of publishing: the whole pipeline until `shutdown` (or, under
/// HA, until leadership is lost).
async fn run_once(
    config: &Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    lead: Option<(Arc<Leadership>, &str)>,
) -> Result<(), BridgeError> {
    let id = term_publisher_id(config, lead.as_ref().map(|(_, i)| *i));
    let lead = lead.map(|(l, _)| l);
    // Positions are the service's, the same for every run and HA member.
    let positions = Arc::new(Positions::new(service_id(config)));
    let publisher = connect_publisher(config, &id, lead.as_ref(), &positions, &stats).await?;
    let mapper = build_mapper(config);
    let (checkpoints, resume) =
        Checkpoints::open(config, lead.as_ref(), &service_id(config)).await?;
    // A Redis source resumes only with the index saved at that checkpoint.
    let resume = match &config.source {
        Some(SourceConfig::Redis(c)) => RedisSource::resumable(c, resume),
        _ => resume,
    };
    let (replay, _replay_server) = serve_replay(config, &positions, resume, &mapper, &stats)?;
    match resume {
        Some(resume) => positions.start_after(resume),
        None => positions.begin(),
    }
    // Everything stops with `shutdown`, or when a producer fails.
    let stop = shutdown.child_token();
    let (producers, rx) = start_producers(config, resume, &mapper, lead.is_some(), &stop, &stats)?;
    let registration = register(config, id, &stop).await?;
    let give_up = deadline_after_stop(&stop, config.bridge.shutdown_timeout);
    let mut pipeline = Pipeline {
        lead: lead.clone(),
        publisher: publisher.clone(),
        mapper,
        checkpoints,
        checkpoint_failing: false,
        published_revision: None,
        positions,
        replay,
        saved_revision: resume,
        last_save: Instant::now(),
        reconnect: Reconnect::new("publisher").with_state(stats.backend.clone()),
        stats,
        source_name: source_name(config),
        give_up: give_up.clone(),
    };
    let unpublished = pipeline.drain(rx).await.err();
    stop.cancel();
    let mut result = join(producers, registration).await;
    let deposed = lead.as_ref().is_some_and(|l| !l.is_valid());
    match unpublished {
        None => {
            if let Err(e) = pipeline.save_checkpoint(true).await {
                // Everything was published; an older checkpoint only means
                // a longer replay at the next start (at-least-once).
                tracing::warn!(error = %e, "Cannot save the final checkpoint; the next start replays from the last saved one.");
            }
        }
        Some(n) if result.is_ok() && !deposed && shutdown.is_cancelled() => {
            result = Err(BridgeError::Unpublished {
                unpublished: n,
                replay: what_becomes_of_unpublished(config),
            });
        }
        Some(n) => {
            tracing::warn!(unpublished = n, "Stopped publishing with updates unpublished; they are replayed from the last checkpoint.");
        }
    }
    let _ = publisher.close().await;
    give_up.cancel();
    result
}

/// The replay buffer and the endpoint answering from it (and, past it,
/// from etcd's history, mapped by `mapper`), for an etcd source (positions
/// are its revisions) over a backend that can lose messages (ZeroMQ,
/// Redis); announced in heartbeats.
#[allow(clippy::type_complexity)]
fn serve_replay(
    config: &Config,
    positions: &Arc<Positions>,
    resume: Option<i64>,
    mapper: &Mapper,
    stats: &Arc<Stats>,
) -> Result<(Option<Arc<Mutex<ReplayBuffer>>>, Option<ReplayServer>), BridgeError> {
    let codec = match &config.backend {
        BackendConfig::Zmq(c) => c.codec,
        BackendConfig::Redis(c) => c.codec,
        BackendConfig::Etcd(_) => return Ok((None, None)),
    };
    let source = match &config.source {
        Some(SourceConfig::Etcd(source)) if !config.bridge.replay_bind.is_empty() => source,
        _ => return Ok((None, None)),
    };
    let history = history::EtcdHistory {
        reader: HistoryReader::new(source.clone()),
        mapper: mapper.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let mut buffer = ReplayBuffer::new(config.bridge.replay_buffer);
    if let Some(resume) = resume {
        buffer.published(resume);
    }
    let buffer = Arc::new(Mutex::new(buffer));
    let server = ReplayServer::bind(
        &config.bridge.replay_bind,
        buffer.clone(),
        positions.clone(),
        codec,
        Some(Arc::new(history)),
        stats.clone(),
    )
    .map_err(|message| BridgeError::Replay(format!("{message} (check bridge.replay_bind)")))?;
    positions.set_replay(server.endpoint());
    Ok((Some(buffer), Some(server)))
}

/// The id this term's publisher stamps: the configured one, else the
/// service's stable id; under HA each instance its own, so subscribers see
/// who published.
fn term_publisher_id(config: &Config, instance: Option<&str>) -> String {
    config
        .discovery
        .as_ref()
        .and_then(|d| d.id.clone())
        .unwrap_or_else(|| match instance {
            Some(instance) => {
                crate::discovery::publisher_id(&format!("{}|{instance}", service_id(config)))
            }
            None => service_id(config),
        })
}

/// Connects (or binds) the backend's publisher; under HA its heartbeats
/// stop the moment leadership is in doubt.
async fn connect_publisher(
    config: &Config,
    id: &str,
    lead: Option<&Arc<Leadership>>,
    positions: &Arc<Positions>,
    stats: &Stats,
) -> Result<Arc<dyn Publisher>, BridgeError> {
    let mut pubsub = PubSub::new(config.backend.clone())
        .with_publisher_id(id)
        .with_positions(positions.clone());
    if let Some(lead) = lead.cloned() {
        let lost = lead.lost();
        pubsub = pubsub.with_heartbeat_gate(move || lead.is_valid());
        // A term's writes that the client already held when the process
        // froze are refused by Redis once the next term took the fence.
        // Found fenced, the term stands down (its leadership counts as
        // lost) and campaigns again: retrying could never succeed.
        pubsub = pubsub.with_fence(format!("{{feedbridge:{}}}:fence", service_id(config)), lost);
    }
    let publisher = pubsub.get_publisher().await?;
    let backend_name = match &config.backend {
        BackendConfig::Zmq(_) => "zmq",
        BackendConfig::Redis(_) => "redis",
        BackendConfig::Etcd(_) => "etcd",
    };
    stats.describe(backend_name, config.source.is_some());
    stats.backend.set_up(true, false);
    Ok(publisher)
}

/// The mapper of the source's layout; the bridge's own keys (and the HA
/// prefix) are never rows.
fn build_mapper(config: &Config) -> Mapper {
    let (layout, topic_field) = match &config.source {
        Some(SourceConfig::Etcd(c)) => (c.layout.as_str(), c.topic_field.as_str()),
        Some(SourceConfig::Redis(c)) => (c.layout.as_str(), c.topic_field.as_str()),
        None => ("/{table}/{key}", ""),
    };
    Mapper::new(
        KeyLayout::parse(layout).expect("validated config"),
        Some(topic_field.to_owned()).filter(|f| !f.is_empty()),
        config.bridge.max_value_bytes,
        OWN_PREFIXES
            .iter()
            .map(|p| p.to_string())
            .chain(config.ha.iter().flat_map(|h| {
                // the election's keys: `/feedbridge/…` in etcd,
                // `{feedbridge:…}` in Redis
                let prefix = h.prefix.trim_matches('/');
                [format!("/{prefix}/"), format!("{{{prefix}:")]
            }))
            .collect(),
    )
}

/// Starts the multiproc channel and the source, feeding one bounded queue;
/// the queue ends when every producer has ended.
fn start_producers(
    config: &Config,
    resume: Option<i64>,
    mapper: &Mapper,
    taking_over: bool,
    stop: &CancellationToken,
    stats: &Arc<Stats>,
) -> Result<(Vec<Producer>, mpsc::Receiver<SourceEvent>), BridgeError> {
    let (tx, rx) = mpsc::channel(config.bridge.queue_capacity);
    let mut producers: Vec<Producer> = Vec::new();
    if let Some(multiproc) = &config.multiproc {
        let listener = MultiprocListener::bind(multiproc).map_err(BridgeError::Multiproc)?;
        let (tx, stop, stats) = (tx.clone(), stop.clone(), stats.clone());
        let max_value_bytes = config.bridge.max_value_bytes;
        producers.push(spawn_producer(&stop.clone(), async move {
            listener
                .run(tx, stop, stats, max_value_bytes)
                .await
                .map_err(BridgeError::Multiproc)
        }));
    }
    match config.source.clone() {
        Some(SourceConfig::Etcd(c)) => {
            let source = EtcdSource::new(c, resume, stats.clone())
                .with_own_prefixes(mapper.excluded_prefixes())
                .run(tx, stop.clone());
            producers.push(spawn_producer(stop, async move { Ok(source.await?) }));
        }
        Some(SourceConfig::Redis(c)) => {
            let mut source = RedisSource::new(c, resume, stats.clone());
            if taking_over {
                source = source.taking_over();
            }
            let source = source.run(tx, stop.clone());
            producers.push(spawn_producer(stop, async move { Ok(source.await?) }));
        }
        None => {}
    }
    Ok((producers, rx))
}

/// Registers in the `publisher` table when discovery is configured; the
/// returned task refreshes the row until `stop`.
async fn register(
    config: &Config,
    publisher_id: String,
    stop: &CancellationToken,
) -> Result<Option<JoinHandle<()>>, BridgeError> {
    let (Some(d), BackendConfig::Zmq(z)) = (&config.discovery, &config.backend) else {
        return Ok(None);
    };
    let uri = advertised_uri(&z.bind, d.local_ip.as_deref()).map_err(BridgeError::Discovery)?;
    match Registration::start(d.clone(), publisher_id, uri).await {
        Ok(registration) => Ok(Some(tokio::spawn(registration.run(stop.clone())))),
        Err(e) => {
            stop.cancel();
            let target = match &d.url {
                Some(url) => format!("discovery.url {}", crate::config::redact_url(url)),
                None => format!(
                    "discovery.endpoints {}",
                    crate::config::redact_endpoints(&d.endpoints)
                ),
            };
            Err(BridgeError::Discovery(format!(
                "cannot register in the publisher table: {e} (check {target})"
            )))
        }
    }
}

/// After a stop, in-flight updates get `grace` to go out: the returned
/// token fires when it is over.
fn deadline_after_stop(stop: &CancellationToken, grace: Duration) -> CancellationToken {
    let give_up = CancellationToken::new();
    let (stop, fire) = (stop.clone(), give_up.clone());
    tokio::spawn(async move {
        stop.cancelled().await;
        tokio::time::sleep(grace).await;
        fire.cancel();
    });
    give_up
}

/// Waits for the producers and the registration; the first producer
/// error is the term's.
async fn join(
    producers: Vec<Producer>,
    registration: Option<JoinHandle<()>>,
) -> Result<(), BridgeError> {
    let mut result = Ok(());
    for producer in producers {
        let r = producer
            .await
            .unwrap_or_else(|e| Err(BridgeError::Multiproc(format!("task failed: {e}"))));
        if result.is_ok() {
            result = r;
        }
    }
    if let Some(r) = registration {
        let _ = r.await;
    }
    result
}

/// The source's name in metrics.
fn source_name(config: &Config) -> &'static str {
    match &config.source {
        Some(SourceConfig::Etcd(_)) => "etcd",
        Some(SourceConfig::Redis(_)) => "redis",
        None => "multiproc",
    }
}

/// What happens to updates left unpublished at the shutdown deadline.
fn what_becomes_of_unpublished(config: &Config) -> &'static str {
    match &config.source {
        Some(SourceConfig::Etcd(_)) => {
            "they are replayed from the last checkpoint at the next start"
        }
        Some(SourceConfig::Redis(_)) => {
            "Redis keeps no history: the next start reconciles every key and subscribers get a sync"
        }
        None => "the multiproc publishers' updates are lost; subscribers see the gap",
    }
}
