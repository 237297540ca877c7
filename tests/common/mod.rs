//! Test helpers: real etcd and Redis servers on free ports in temp dirs
//! (killed on drop, restartable), waiting with timeouts instead of sleeps,
//! and a bridge run in-process.

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use feedbridge::config::Config;
use feedbridge::stats::Stats;
pub use feedbridge::testing::{eventually, free_port, EtcdServer, RedisServer};
use feedbridge::DbUpdate;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A bridge running in this process; stopped on drop, so a failing test
/// does not leave its threads running.
pub struct Bridge {
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), feedbridge::bridge::BridgeError>>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The library's log lines (the in-process bridge's and subscribers')
/// go to stderr when RUST_LOG says so (run with `--nocapture`).
pub fn log_if_asked() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

impl Bridge {
    pub fn start(config_toml: &str) -> Self {
        log_if_asked();
        let config = Config::parse(config_toml, Path::new("test.toml")).unwrap();
        config.validate(Path::new("test.toml")).unwrap();
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(feedbridge::bridge::run(
            config,
            shutdown.clone(),
            stats.clone(),
        ));
        Bridge {
            stats,
            shutdown,
            task,
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// Waits for the bridge to end by itself and returns its error.
    pub async fn failure(mut self) -> String {
        let result = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
        result
            .expect("the bridge should have failed")
            .unwrap()
            .unwrap_err()
            .to_string()
    }
}

/// Receives updates until `done` holds for the collected list, or panics.
pub async fn collect_until(
    rx: &mut mpsc::Receiver<DbUpdate>,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&[DbUpdate]) -> bool,
) -> Vec<DbUpdate> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(u)) => got.push(u),
            Ok(None) => panic!("subscriber ended while waiting for {what}; got {got:#?}"),
            Err(_) => panic!("timed out waiting for {what}; got {got:#?}"),
        }
    }
    got
}

/// ZeroMQ subscribers join late (the "slow joiner"): writes `/probe/N` keys
/// through `put` until one arrives, then drains what is left of the probes.
pub async fn await_flow<F, Fut>(rx: &mut mpsc::Receiver<DbUpdate>, mut put: F)
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = ()>,
{
    let start = Instant::now();
    for i in 0.. {
        put(i).await;
        if let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            assert_eq!(
                u.table, "probe",
                "unexpected update before the flow was up: {u:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no update reached the subscriber"
        );
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {}
}

pub fn workspace_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// What a subscriber believes the database holds, by (table, key), after
/// applying `updates` in order (`sync` notices are ignored).
pub fn view(updates: &[DbUpdate]) -> std::collections::BTreeMap<(String, String), String> {
    let mut state = std::collections::BTreeMap::new();
    for u in updates {
        match u.action {
            feedbridge::Action::Create | feedbridge::Action::Set => {
                state.insert(
                    (u.table.clone(), u.key.clone()),
                    u.value.clone().unwrap_or_default(),
                );
            }
            feedbridge::Action::Delete => {
                state.remove(&(u.table.clone(), u.key.clone()));
            }
            _ => {}
        }
    }
    state
}

/// etcd's current revision.
pub async fn etcd_revision(kv: &mut etcd_client::Client) -> i64 {
    kv.get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// Sets Redis `{probe.}N` keys until one reaches the subscriber.
pub async fn await_redis_flow(rx: &mut mpsc::Receiver<DbUpdate>, redis: &RedisServer) {
    await_redis_flow_on(rx, redis.connection().await).await;
}

/// The same through a given (e.g. authenticated) connection.
pub async fn await_redis_flow_on(
    rx: &mut mpsc::Receiver<DbUpdate>,
    conn: redis::aio::MultiplexedConnection,
) {
    await_redis_keys_flow(rx, conn, |i| format!("{{probe.}}{i}")).await;
}

/// Sets the Redis keys `key(N)` through `conn` (a node or a whole
/// cluster) until one reaches the subscriber.
pub async fn await_redis_keys_flow<C>(
    rx: &mut mpsc::Receiver<DbUpdate>,
    conn: C,
    key: impl Fn(u32) -> String,
) where
    C: redis::aio::ConnectionLike + Clone + Send,
{
    await_flow(rx, |i| {
        let (mut c, key) = (conn.clone(), key(i));
        async move {
            redis::cmd("SET")
                .arg(key)
                .arg("x")
                .query_async::<()>(&mut c)
                .await
                .unwrap();
        }
    })
    .await;
}

/// Puts etcd `/probe/N` keys through `kv` until one reaches the subscriber.
pub async fn await_etcd_flow(rx: &mut mpsc::Receiver<DbUpdate>, kv: &etcd_client::Client) {
    await_flow(rx, |i| {
        let mut c = kv.clone();
        async move {
            c.put(format!("/probe/{i}"), "x", None).await.unwrap();
        }
    })
    .await;
}

/// Publishes `probe` updates through `publisher` until one arrives.
pub async fn await_publisher_flow(
    rx: &mut mpsc::Receiver<DbUpdate>,
    publisher: &Arc<dyn feedbridge::pubsub::Publisher>,
) {
    await_flow(rx, |i| {
        let p = publisher.clone();
        async move {
            let probe = DbUpdate::new("probe", i.to_string(), feedbridge::Action::Set, None);
            p.send_event(&probe, None).await.unwrap();
        }
    })
    .await;
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves
/// nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

// ---- A known stream of etcd writes, and checking what a subscriber saw ----

/// How long the stream checks wait.
pub const STREAM_WAIT: Duration = Duration::from_secs(30);

/// One successful etcd write.
#[derive(Debug, Clone)]
pub struct Written {
    pub key: String,
    pub revision: i64,
}

pub type Log = Arc<Mutex<Vec<Written>>>;

/// Writes ops `from..to` over ten keys (every seventh a delete), retrying
/// while etcd is unreachable, and logs each write that etcd confirmed.
pub async fn write_ops(endpoint: String, from: usize, to: usize, log: Log) {
    write_ops_to(vec![endpoint], from, to, log).await
}

/// The same through a client of several endpoints (an etcd cluster).
pub async fn write_ops_to(endpoints: Vec<String>, from: usize, to: usize, log: Log) {
    write_padded_ops(endpoints, from, to, log, 0).await
}

/// The same with values padded by `pad` bytes (to fill buffers quickly).
pub async fn write_padded_ops(
    endpoints: Vec<String>,
    from: usize,
    to: usize,
    log: Log,
    pad: usize,
) {
    let mut kv = etcd_client::Client::connect(endpoints.clone(), None)
        .await
        .unwrap();
    for i in from..to {
        let key = format!("/lport/k{}", i % 10);
        loop {
            let result = if i % 7 == 6 {
                kv.delete(key.clone(), None)
                    .await
                    .map(|r| (r.deleted() > 0).then(|| r.header().unwrap().revision()))
            } else {
                kv.put(key.clone(), format!("v{i}{}", "x".repeat(pad)), None)
                    .await
                    .map(|r| Some(r.header().unwrap().revision()))
            };
            match result {
                Ok(rev) => {
                    if let Some(revision) = rev {
                        log.lock().unwrap().push(Written {
                            key: key.clone(),
                            revision,
                        });
                    }
                    break;
                }
                Err(_) => {
                    // etcd is restarting: retry on a fresh connection.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Ok(c) = etcd_client::Client::connect(endpoints.clone(), None).await {
                        kv = c;
                    }
                }
            }
        }
    }
}

/// Everything a subscriber received, shared with a background task.
#[derive(Clone, Default)]
pub struct Received(pub Arc<Mutex<Vec<DbUpdate>>>);

impl Received {
    /// Everything `rx` delivers from now on, collected by a task (its
    /// handle, to stop it).
    pub fn collecting(mut rx: mpsc::Receiver<DbUpdate>) -> (Received, JoinHandle<()>) {
        let received = Received::default();
        let sink = received.clone();
        let task = tokio::spawn(async move {
            while let Some(u) = rx.recv().await {
                sink.0.lock().unwrap().push(u);
            }
        });
        (received, task)
    }

    pub fn all(&self) -> Vec<DbUpdate> {
        self.0.lock().unwrap().clone()
    }

    pub async fn wait(&self, what: &str, pred: impl Fn(&[DbUpdate]) -> bool) {
        eventually(what, STREAM_WAIT, || {
            let ok = pred(&self.0.lock().unwrap());
            async move { ok.then_some(()) }
        })
        .await;
    }

    pub fn revisions(&self) -> std::collections::HashSet<i64> {
        self.all().iter().filter_map(|u| u.revision).collect()
    }
}

pub async fn etcd_state(etcd: &EtcdServer) -> BTreeMap<(String, String), String> {
    etcd_state_of(etcd.client().await).await
}

/// The `lport` rows of the etcd `kv` is connected to.
pub async fn etcd_state_of(mut kv: etcd_client::Client) -> BTreeMap<(String, String), String> {
    let resp = kv
        .get(
            "/lport/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            let key = kv
                .key_str()
                .unwrap()
                .trim_start_matches("/lport/")
                .to_string();
            (
                ("lport".to_string(), key),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn lport(updates: &[DbUpdate]) -> Vec<DbUpdate> {
    updates
        .iter()
        .filter(|u| u.table == "lport")
        .cloned()
        .collect()
}

/// The three promises: no written revision missing, per-key order kept
/// (first deliveries in revision order; replays may repeat), final state
/// equal to etcd's.
pub async fn verify(written: &Log, received: &Received, etcd: &EtcdServer) {
    verify_against(written, received, etcd.client().await).await
}

/// The same against the etcd `kv` is connected to (an etcd cluster).
pub async fn verify_against(written: &Log, received: &Received, kv: etcd_client::Client) {
    let written = written.lock().unwrap().clone();
    let expected = etcd_state_of(kv).await;
    let complete = |got: &[DbUpdate]| {
        let revs: std::collections::HashSet<i64> = got.iter().filter_map(|u| u.revision).collect();
        let missing: Vec<i64> = written
            .iter()
            .map(|w| w.revision)
            .filter(|r| !revs.contains(r))
            .collect();
        (missing, view(&lport(got)))
    };
    let start = std::time::Instant::now();
    loop {
        let (missing, state) = complete(&received.all());
        if missing.is_empty() && state == expected {
            break;
        }
        assert!(
            start.elapsed() < STREAM_WAIT,
            "missing revisions {missing:?}; state {state:?} != etcd {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = lport(&received.all());
    let mut first_seen: HashMap<String, Vec<i64>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for u in &got {
        let rev = u.revision.unwrap();
        if seen.insert(rev) {
            first_seen.entry(u.key.clone()).or_default().push(rev);
        }
    }
    for (key, revs) in &first_seen {
        assert!(
            revs.windows(2).all(|w| w[0] < w[1]),
            "order broken for {key}: {revs:?}"
        );
    }
    let keys: std::collections::HashSet<_> = written
        .iter()
        .map(|w| w.key.trim_start_matches("/lport/"))
        .collect();
    assert!(keys.len() == 10, "the stream touched every key");
}

/// Runs `feedbridge tail ARGS` and hands its stdout over line by line.
pub fn spawn_tail(args: &[String]) -> (KillOnDrop, mpsc::UnboundedReceiver<String>) {
    use std::io::BufRead;
    let mut tail = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_feedbridge"))
            .arg("tail")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = mpsc::unbounded_channel();
    let out = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    (tail, lines)
}

/// Waits for a child process to exit, or panics after `timeout`.
pub fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "process did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis-backend subscriber of every topic on `url` (not running yet).
pub fn redis_subscriber(url: &str) -> Arc<dyn feedbridge::pubsub::Subscriber> {
    use feedbridge::config::{BackendConfig, RedisBackendConfig};
    let sub = feedbridge::backend::PubSub::new(BackendConfig::Redis(RedisBackendConfig {
        url: url.to_owned(),
        codec: feedbridge::codec::Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        sharded: false,
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        auth: Default::default(),
    }))
    .get_subscriber();
    sub.register_topic("");
    sub
}

/// A Redis-backend subscriber of every topic on `url`, already running.
pub fn redis_updates(url: &str) -> mpsc::Receiver<DbUpdate> {
    redis_subscriber(url).updates(1024).0
}

/// Waits until Redis counts a pattern subscription (what `redis_updates`
/// makes), so nothing published after it is missed.
pub async fn await_pattern_subscriber(redis: &RedisServer) {
    let conn = redis.connection().await;
    eventually("a pattern subscriber on Redis", STREAM_WAIT, || {
        let mut c = conn.clone();
        async move {
            let n: i64 = redis::cmd("PUBSUB")
                .arg("NUMPAT")
                .query_async(&mut c)
                .await
                .ok()?;
            (n > 0).then_some(())
        }
    })
    .await;
}

/// Waits until `sub` has a position (a publisher's heartbeat came): from
/// then on a reconnect or a gap is repaired from the publisher, not re-read.
pub async fn positioned<S: feedbridge::pubsub::Subscriber + ?Sized>(sub: &Arc<S>) {
    positioned_at(sub, 0).await
}

/// Waits until `sub` has verified everything up to revision `at`: a
/// heartbeat past it showed nothing missing, so any verdict on what came
/// before (a repair or a `sync`) has been delivered.
pub async fn positioned_at<S: feedbridge::pubsub::Subscriber + ?Sized>(sub: &Arc<S>, at: i64) {
    eventually("the subscriber's position", STREAM_WAIT, || {
        let there = sub.positions().values().any(|p| *p >= at);
        async move { there.then_some(()) }
    })
    .await
}

/// The last revision written in `log`.
pub fn last_revision(log: &Log) -> i64 {
    log.lock()
        .unwrap()
        .iter()
        .map(|w| w.revision)
        .max()
        .unwrap_or(0)
}
