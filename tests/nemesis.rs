//! A nemesis run (issue 22): a workload with a known history, random
//! faults injected at random intervals from a seed, and a checker of what
//! every subscriber delivered.
//!
//! - Workload: one writer to etcd, a counter in every value, deletes,
//!   large values, delete-ranges, bursts.
//! - Bridges, as processes: an HA pair (etcd → Redis), the shipped
//!   etcd → ZeroMQ config and the shipped etcd → etcd config.
//! - Links: each bridge's etcd connection (source, election, and the etcd
//!   backend's), the pair's Redis connection, and each staying
//!   subscriber's, through a fault proxy of its own.
//! - Subscribers: a Redis subscriber of the pair, a ZeroMQ subscriber and
//!   an etcd subscriber staying up, and a ZeroMQ subscriber the nemesis
//!   restarts and stalls; each an application that re-reads etcd on a
//!   `sync` (and at its start).
//! - Nemesis: `kill -9`, SIGTERM (and a restart), SIGSTOP/SIGCONT of a
//!   bridge; an etcd restart; a partition of any link (sometimes until the
//!   far side gives up); a compaction; a subscriber restart; a burst; a
//!   burst while an application stands still (over the high-water mark).
//! - Checker: per subscriber run and key, revisions delivered in order;
//!   every written revision delivered, or a `sync` delivered around it, or
//!   inside a window a bridge declared it re-listed after a compaction and
//!   superseded there by a delivered write; the final state equal to
//!   etcd's; the HA pair's terms (publisher, epoch) never interleave on
//!   Redis (two leaders at once).
//!
//! `scripts/nemesis.sh [--minutes N] [--seed S]` runs it (it is ignored by
//! the ordinary test run); the same seed injects the same faults.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use feedbridge::pubsub::Subscriber;
use feedbridge::testing::{Fault, FaultProxy};
use feedbridge::{Action, DbUpdate};

const BIN: &str = env!("CARGO_BIN_EXE_feedbridge");

/// How the writer writes: `burst` without a pause, `pad` bytes of
/// padding in every value (0: only now and then a large one).
#[derive(Default)]
struct Load {
    burst: AtomicBool,
    pad: std::sync::atomic::AtomicUsize,
}

impl Load {
    fn pad(&self, i: u64) -> usize {
        match self.pad.load(Relaxed) {
            0 if i % 97 == 96 => 64 << 10,
            pad => pad,
        }
    }

    /// A burst of writes for `for_`.
    async fn burst(&self, for_: Duration) {
        self.burst.store(true, Relaxed);
        tokio::time::sleep(for_).await;
        self.burst.store(false, Relaxed);
    }

    /// A burst of 8 KiB values while the application of `seen` stands
    /// still, 15–25 s: past the bridge's send high-water mark (10,000
    /// messages as shipped) and the sockets' buffers, so the bridge drops
    /// for that subscriber, which must repair the gap (or say `sync`).
    async fn burst_over_a_stall(&self, seen: &Seen, rng: &mut Rng) {
        seen.stalled.store(true, Relaxed);
        self.pad.store(8 << 10, Relaxed);
        self.burst(Duration::from_millis(15_000 + rng.below(10_000)))
            .await;
        self.pad.store(0, Relaxed);
        seen.stalled.store(false, Relaxed);
    }
}

/// A small, seeded generator (xorshift64*): the same seed, the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One acknowledged write.
#[derive(Clone, Debug)]
struct Write {
    /// The etcd key; `/lport/k1*` for a delete-range.
    key: String,
    revision: i64,
    delete: bool,
}

/// The windows of revisions a bridge declared it re-listed (its resume
/// revision was compacted): `(first revision not read, re-list revision)`,
/// from its "Re-list complete" log lines. Within one, a subscriber gets
/// each row's state at the re-list, not the revisions before it.
fn coalesced_windows(logs: &Path, bridges: &[&str]) -> Vec<(i64, i64)> {
    let mut windows = Vec::new();
    for entry in std::fs::read_dir(logs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".log") || !bridges.iter().any(|b| name.starts_with(&format!("{b}-"))) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("Re-list complete")) {
            let plain = strip_ansi(line);
            let field = |name: &str| -> Option<i64> {
                let at = plain.find(&format!(" {name}="))? + name.len() + 2;
                plain[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            if let (Some(from), Some(to)) = (field("coalesced_from"), field("revision")) {
                windows.push((from, to));
            }
        }
    }
    windows
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A bridge process, restartable.
struct Proc {
    name: &'static str,
    config: PathBuf,
    env: Vec<(&'static str, String)>,
    logs: PathBuf,
    child: Option<KillOnDrop>,
    runs: usize,
    stopped: bool,
}

impl Proc {
    /// A bridge not started yet, logging into `logs`.
    fn new(
        name: &'static str,
        config: PathBuf,
        env: Vec<(&'static str, String)>,
        logs: &Path,
    ) -> Self {
        Proc {
            name,
            config,
            env,
            logs: logs.to_path_buf(),
            child: None,
            runs: 0,
            stopped: false,
        }
    }

    fn start(&mut self) {
        self.runs += 1;
        let log = self.logs.join(format!("{}-{}.log", self.name, self.runs));
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"]).arg(&self.config);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(KillOnDrop(
            cmd.stderr(std::fs::File::create(log).unwrap())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        self.stopped = false;
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn term(&mut self) {
        self.cont();
        self.signal("-TERM");
        if let Some(mut c) = self.child.take() {
            let _ = wait_exit(&mut c, Duration::from_secs(20));
        }
    }

    fn stop(&mut self) {
        self.signal("-STOP");
        self.stopped = true;
    }

    fn cont(&mut self) {
        if self.stopped {
            self.signal("-CONT");
            self.stopped = false;
        }
    }

    /// A fault of the bridge's own: 0 `kill -9` and restart, 1 SIGTERM
    /// and restart, else SIGSTOP for 0.5–3.5 s; what it was.
    async fn fault(&mut self, kind: u64, rng: &mut Rng) -> String {
        match kind {
            0 => {
                self.kill();
                self.start();
                format!("kill -9 bridge {}", self.name)
            }
            1 => {
                self.term();
                self.start();
                format!("SIGTERM bridge {}", self.name)
            }
            _ => {
                self.stop();
                tokio::time::sleep(Duration::from_millis(500 + rng.below(3000))).await;
                self.cont();
                format!("SIGSTOP/SIGCONT bridge {}", self.name)
            }
        }
    }
}

/// One run of a subscriber: the subscriber and what its application saw.
type Run = (Arc<dyn Subscriber>, Seen);

/// What one subscriber delivered, in order, and its application's rows.
#[derive(Clone, Default)]
struct Seen {
    delivered: Arc<Mutex<Vec<DbUpdate>>>,
    rows: Arc<Mutex<BTreeMap<String, String>>>,
    /// The application stops reading while set (a stalled controller):
    /// its subscriber's queues fill and the publisher drops at its
    /// high-water mark.
    stalled: Arc<AtomicBool>,
}

/// How an application reads the whole database (on a `sync`, and at its
/// start): `None` while it cannot (the database restarting).
type Reader = Arc<
    dyn Fn() -> futures_util::future::BoxFuture<'static, Option<BTreeMap<String, String>>>
        + Send
        + Sync,
>;

/// Reads etcd's `lport` rows.
fn etcd_reader(endpoint: String) -> Reader {
    Arc::new(move || {
        let endpoint = endpoint.clone();
        Box::pin(async move {
            let kv = etcd_client::Client::connect([endpoint], None).await.ok()?;
            tokio::time::timeout(Duration::from_secs(5), rows_of(kv))
                .await
                .ok()?
                .ok()
        })
    })
}

/// Runs a subscriber's application: applies updates, re-reads the
/// database on a `sync`. One that `starts` mid-run (a restarted
/// subscriber) subscribes, then reads the database, as an application
/// does at start: that read counts as a `sync` at the head of what it
/// delivered.
fn run_app(sub: Arc<dyn Subscriber>, read: Reader, starts: bool) -> Seen {
    let seen = Seen::default();
    let s = seen.clone();
    // A restarted subscriber's application keeps a short queue: when it
    // stalls, the ZeroMQ queues behind it overflow soon.
    let (mut rx, _pump) = sub.updates(if starts { 64 } else { 4096 });
    let start = starts.then(|| DbUpdate::sync("the application started: it reads the database"));
    tokio::spawn(async move {
        let mut next = start;
        loop {
            while s.stalled.load(Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let u = match next.take() {
                Some(u) => u,
                None => match rx.recv().await {
                    Some(u) => u,
                    None => break,
                },
            };
            if u.action == Action::Sync {
                // The application re-reads (retrying while the database
                // restarts).
                let fresh = loop {
                    if let Some(state) = read().await {
                        break state;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                };
                *s.rows.lock().unwrap() = fresh;
            } else if u.table == "lport" {
                let mut rows = s.rows.lock().unwrap();
                match u.action {
                    Action::Delete => {
                        rows.remove(&u.key);
                    }
                    _ => {
                        rows.insert(u.key.clone(), u.value.clone().unwrap_or_default());
                    }
                }
            }
            s.delivered.lock().unwrap().push(u);
        }
    });
    seen
}

async fn rows_of(kv: etcd_client::Client) -> Result<BTreeMap<String, String>, ()> {
    Ok(etcd_state_of(kv)
        .await
        .into_iter()
        .map(|((_, k), v)| (k, v))
        .collect())
}

/// The writer: values carry a counter; deletes, large values, a
/// delete-range now and then; `burst` writes go out without a pause.
async fn writer(
    endpoint: String,
    log: Arc<Mutex<Vec<Write>>>,
    stop: Arc<AtomicBool>,
    load: Arc<Load>,
) {
    let mut kv: Option<etcd_client::Client> = None;
    let mut i: u64 = 0;
    while !stop.load(Relaxed) {
        let Some(c) = kv.as_mut() else {
            kv = etcd_client::Client::connect([endpoint.clone()], None)
                .await
                .ok();
            if kv.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        };
        let key = format!("/lport/k{}", i % 40);
        let result = if i % 199 == 198 {
            c.delete(
                "/lport/k1",
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .map(|r| {
                // the keys it deleted share one revision in the history
                if r.deleted() > 0 {
                    vec![(
                        "/lport/k1*".to_string(),
                        r.header().unwrap().revision(),
                        true,
                    )]
                } else {
                    vec![]
                }
            })
        } else if i % 11 == 10 {
            c.delete(key.clone(), None).await.map(|r| {
                if r.deleted() > 0 {
                    vec![(key.clone(), r.header().unwrap().revision(), true)]
                } else {
                    vec![]
                }
            })
        } else {
            let pad = load.pad(i);
            c.put(key.clone(), format!("{i}:{}", "x".repeat(pad)), None)
                .await
                .map(|r| vec![(key.clone(), r.header().unwrap().revision(), false)])
        };
        match result {
            Ok(writes) => {
                let mut log = log.lock().unwrap();
                for (key, revision, delete) in writes {
                    log.push(Write {
                        key,
                        revision,
                        delete,
                    });
                }
                i += 1;
            }
            Err(_) => {
                kv = None; // etcd restarting: reconnect
                continue;
            }
        }
        if !load.burst.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: scripts/nemesis.sh runs it"]
async fn nemesis() {
    let (seconds, seed, mut rng) = run_length();
    // The subscribers' own log lines (reconnects, repairs, syncs).
    log_if_asked();
    let mut etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().to_path_buf();
    let endpoint = etcd.endpoint();
    let zmq_port = free_port();

    // Every link a fault can cut goes through a proxy of its own.
    let link = |to: u16| FaultProxy::start(&format!("127.0.0.1:{to}"));
    let links: Vec<(&str, FaultProxy)> = vec![
        ("bridge a -> etcd", link(etcd.client_port)),
        ("bridge b -> etcd", link(etcd.client_port)),
        ("bridge z -> etcd", link(etcd.client_port)),
        ("HA pair -> redis", link(redis.port)),
        ("redis subscriber -> redis", link(redis.port)),
        ("zmq subscriber -> bridge z", link(zmq_port)),
        ("bridge e -> etcd", link(etcd.client_port)),
        ("etcd subscriber -> etcd", link(etcd.client_port)),
    ];
    let via = |name: &str| {
        links
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p.addr())
            .unwrap()
    };

    // The HA pair, etcd -> Redis (source, election and backend through
    // their links).
    let ha = |name: &str| {
        format!(
            "[source]\ntype = \"etcd\"\nendpoints = [\"http://{}\"]\n[backend]\ntype = \"redis\"\nurl = \"redis://{}/0\"\n[ha]\nservice = \"test\"\nlease_ttl = \"2s\"\ninstance = \"{name}\"\n",
            via(&format!("bridge {name} -> etcd")),
            via("HA pair -> redis"),
        )
    };
    let mut procs = vec![
        Proc::new("a", write_config(&logs, "a", &ha("a")), vec![], &logs),
        Proc::new("b", write_config(&logs, "b", &ha("b")), vec![], &logs),
        // The single bridge, etcd -> ZeroMQ, as shipped.
        Proc::new(
            "z",
            workspace_path("config/feedbridge.toml"),
            vec![
                (
                    "FEEDBRIDGE_ETCD_ENDPOINTS",
                    format!("http://{}", via("bridge z -> etcd")),
                ),
                ("FEEDBRIDGE_ZMQ_BIND", format!("tcp://127.0.0.1:{zmq_port}")),
            ],
            &logs,
        ),
        // etcd -> etcd (/pubsub/<topic> keys), as shipped; source and
        // backend through one link.
        Proc::new(
            "e",
            workspace_path("config/etcd-etcd.toml"),
            vec![(
                "FEEDBRIDGE_ETCD_ENDPOINTS",
                format!("http://{}", via("bridge e -> etcd")),
            )],
            &logs,
        ),
    ];
    for p in &mut procs {
        p.start();
    }
    // Who publishes on Redis, in the order Redis delivered it: a term is a
    // (publisher, epoch); two whose messages interleave led at once.
    let terms: Arc<Mutex<Vec<(String, u64)>>> = Default::default();
    {
        use futures_util::StreamExt;
        let client = redis::Client::open(redis.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.psubscribe("*").await.unwrap();
        let terms = terms.clone();
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(m) = messages.next().await {
                if let Ok((_, env)) =
                    feedbridge::codec::Codec::Msgpack.decode(m.get_payload_bytes())
                {
                    if let (Some(p), Some(e)) = (env.publisher, env.epoch) {
                        let mut terms = terms.lock().unwrap();
                        if terms.last().is_none_or(|t| t.0 != p || t.1 != e) {
                            terms.push((p, e));
                        }
                    }
                }
            }
        });
    }
    // Each subscriber's incarnations (the last one is the one running);
    // the nemesis restarts the last subscriber's.
    let direct = format!("127.0.0.1:{zmq_port}");
    let mut subscribers: Vec<(&str, Vec<Run>)> = vec![
        (
            "redis (HA pair)",
            vec![{
                let sub =
                    redis_subscriber(&format!("redis://{}/0", via("redis subscriber -> redis")));
                (
                    sub.clone(),
                    run_app(sub, etcd_reader(endpoint.clone()), false),
                )
            }],
        ),
        (
            "zmq (through the proxy)",
            vec![{
                let sub = zmq_sub(&via("zmq subscriber -> bridge z"));
                (
                    sub.clone(),
                    run_app(sub, etcd_reader(endpoint.clone()), false),
                )
            }],
        ),
        (
            "etcd (through the proxy)",
            vec![{
                use feedbridge::config::{BackendConfig, EtcdBackendConfig};
                let sub =
                    feedbridge::backend::PubSub::new(BackendConfig::Etcd(EtcdBackendConfig {
                        endpoints: vec![format!("http://{}", via("etcd subscriber -> etcd"))],
                        prefix: "/pubsub/".into(),
                        codec: feedbridge::codec::Codec::Msgpack,
                        connect_timeout: Duration::from_secs(5),
                        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
                        auth: Default::default(),
                    }))
                    .get_subscriber();
                sub.register_topic("");
                (
                    sub.clone(),
                    run_app(sub, etcd_reader(endpoint.clone()), false),
                )
            }],
        ),
        (
            "zmq (restarted)",
            vec![{
                let sub = zmq_sub(&direct);
                (
                    sub.clone(),
                    run_app(sub, etcd_reader(endpoint.clone()), false),
                )
            }],
        ),
    ];
    // Every subscriber is receiving before the run starts.
    let kv = etcd.client().await;
    await_probes(&subscribers, |i| {
        let mut kv = kv.clone();
        async move {
            kv.put(format!("/probe/{i}"), "x", None).await.unwrap();
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // positions

    let log: Arc<Mutex<Vec<Write>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let writing = tokio::spawn(writer(
        endpoint.clone(),
        log.clone(),
        stop.clone(),
        load.clone(),
    ));

    let mut faults: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(3000))).await;
        let target = rng.below(procs.len() as u64) as usize;
        let kind = match rng.below(10) {
            kind @ 0..=2 => procs[target].fault(kind, &mut rng).await,
            3 => {
                etcd.restart().await;
                "restart etcd".into()
            }
            4 | 5 => {
                let (name, proxy) = &links[rng.below(links.len() as u64) as usize];
                partition(proxy, &mut rng).await;
                format!("partition {name}")
            }
            6 => {
                if let Ok(mut c) = etcd_client::Client::connect([endpoint.clone()], None).await {
                    if let Ok(r) = c.get("/", None).await {
                        let rev = r.header().unwrap().revision();
                        let _ = c.compact(rev, None).await;
                    }
                }
                "compact etcd".into()
            }
            7 => {
                let (_, runs) = subscribers.last_mut().unwrap();
                runs.last().unwrap().0.stop();
                let sub = zmq_sub(&direct);
                runs.push((
                    sub.clone(),
                    run_app(sub, etcd_reader(endpoint.clone()), true),
                ));
                "restart a subscriber".into()
            }
            8 => {
                load.burst(Duration::from_secs(1)).await;
                "a burst of writes".into()
            }
            _ => {
                let (_, runs) = subscribers.last().unwrap();
                load.burst_over_a_stall(&runs.last().unwrap().1, &mut rng)
                    .await;
                "a burst over a stalled subscriber's high-water mark".into()
            }
        };
        eprintln!("nemesis: {kind}");
        *faults.entry(kind).or_default() += 1;
    }

    // Heal, stop writing, and let everything converge.
    for (_, proxy) in &links {
        proxy.set(Fault::Pass);
    }
    for p in &mut procs {
        p.cont();
    }
    stop.store(true, Relaxed);
    writing.await.unwrap();
    let kv = etcd.client().await;
    let expected = rows_of(kv.clone()).await.unwrap();
    let (stale, converged) = converge(&subscribers, &expected).await;

    // The checker.
    let written = log.lock().unwrap().clone();
    println!(
        "nemesis: seed {seed}, {seconds} s, {} writes acknowledged",
        written.len()
    );
    println!(
        "faults injected: {faults:?} ({} in all)",
        faults.values().sum::<usize>()
    );
    let mut failures = Vec::new();
    for (name, runs) in &subscribers {
        let feeders: &[&str] = if name.starts_with("redis") {
            &["a", "b"]
        } else if name.starts_with("etcd") {
            &["e"]
        } else {
            &["z"]
        };
        let windows = coalesced_windows(&logs, feeders);
        let mut verdict = Verdict::default();
        for (i, (_, seen)) in runs.iter().enumerate() {
            let delivered = seen.delivered.lock().unwrap();
            verdict.add(&delivered, &written, &windows, i > 0, i + 1 < runs.len());
        }
        let stale_rows = stale.get(name).copied().unwrap_or(0);
        print_liveness(name, runs);
        for reason in &verdict.reasons {
            println!("{name}: a sync: {reason}");
        }
        println!(
            "{name}: {} runs, {} updates delivered, {} syncs, {} lost, {} missing but signalled by a sync, {} superseded in {} re-list windows, {} order violations, {stale_rows} stale rows",
            runs.len(),
            verdict.delivered,
            verdict.syncs,
            verdict.lost,
            verdict.explained,
            verdict.coalesced,
            windows.len(),
            verdict.order
        );
        if verdict.lost > 0 || verdict.order > 0 || stale_rows > 0 {
            println!("{name}: first lost writes {:?}", verdict.examples);
            println!("{name}: delivered around the first: {:?}", verdict.context);
            println!("{name}: the first's row: {:?}", verdict.row_context);
            failures.push(*name);
        }
    }
    println!("converged {converged:?} after the faults stopped");
    // A term that comes back after another term started: two leaders at once.
    let terms = terms.lock().unwrap().clone();
    let mut ended = std::collections::HashSet::new();
    let mut concurrent = 0;
    for pair in terms.windows(2) {
        ended.insert(pair[0].clone());
        if ended.contains(&pair[1]) {
            concurrent += 1;
        }
    }
    let distinct: std::collections::HashSet<_> = terms.iter().collect();
    println!(
        "HA pair: {} terms on Redis, {concurrent} times an earlier term published after a later one had started",
        distinct.len()
    );
    if concurrent > 0 {
        failures.push("HA pair (two leaders at once)");
    }
    for p in &mut procs {
        p.kill();
    }
    assert!(
        failures.is_empty(),
        "the checker failed for {failures:?} (seed {seed}; logs in {})",
        dir.keep().display()
    );
}

/// Reads the cluster's `lport` rows: the keys every master lists, each
/// read through the cluster (a key in migration is listed twice).
fn cluster_reader(urls: Vec<String>) -> Reader {
    Arc::new(move || {
        let urls = urls.clone();
        Box::pin(async move {
            let read = async {
                let client = redis::cluster::ClusterClient::new(urls).ok()?;
                let mut conn = client.get_async_connection().await.ok()?;
                let mut rows = BTreeMap::new();
                for (_, addr, master) in cluster_nodes(&mut conn).await? {
                    if !master {
                        continue;
                    }
                    let node = redis::Client::open(format!("redis://{addr}/0")).ok()?;
                    let mut c = node.get_multiplexed_async_connection().await.ok()?;
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg("{lport.*")
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    for key in keys {
                        let value: Option<String> = redis::cmd("GET")
                            .arg(&key)
                            .query_async(&mut conn)
                            .await
                            .ok()?;
                        if let (Some(v), Some((_, row))) = (value, key.split_once('}')) {
                            rows.insert(row.to_string(), v);
                        }
                    }
                }
                Some(rows)
            };
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .ok()
                .flatten()
        })
    })
}

/// `(id, host:port, master)` of every node the cluster knows and does not
/// consider failed.
async fn cluster_nodes(
    conn: &mut redis::cluster_async::ClusterConnection,
) -> Option<Vec<(String, String, bool)>> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(conn)
        .await
        .ok()?;
    Some(
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let addr = f.get(1)?.split('@').next()?.to_string();
                let flags = f.get(2)?;
                (!flags.contains("fail"))
                    .then(|| (f[0].to_string(), addr, flags.contains("master")))
            })
            .collect(),
    )
}

/// The counter a workload value starts with (`<counter>:<padding>`).
fn counter(value: &str) -> Option<u64> {
    value.split(':').next()?.parse().ok()
}

/// The cluster's writer: values carry a counter (every attempt its own);
/// 40 rows over 5 hash tags (one slot each), deletes, large values, a
/// multi-key DEL of one tag's rows now and then. A SET is followed by
/// `WAIT 1` on its master: the counters a replica confirmed are
/// `durable` (a failover keeps them), the others may be lost by one.
async fn cluster_writer(
    urls: Vec<String>,
    durable: Arc<Mutex<std::collections::HashSet<u64>>>,
    acknowledged: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    load: Arc<Load>,
) {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let mut conn: Option<redis::cluster_async::ClusterConnection> = None;
    let mut i: u64 = 0;
    while !stop.load(Relaxed) {
        let Some(c) = conn.as_mut() else {
            conn = match redis::cluster::ClusterClient::new(urls.clone()) {
                Ok(client) => client.get_async_connection().await.ok(),
                Err(_) => None,
            };
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        };
        let row = i % 40;
        let tag = format!("lport.t{}", row % 5);
        let key = format!("{{{tag}}}k{row}");
        let set = !(i % 199 == 198 || i % 11 == 10);
        let mut cmd = redis::cmd(if set { "SET" } else { "DEL" });
        if i % 199 == 198 {
            for r in (1..40).step_by(5) {
                cmd.arg(format!("{{lport.t1}}k{r}"));
            }
        } else if set {
            let pad = load.pad(i);
            cmd.arg(&key).arg(format!("{i}:{}", "x".repeat(pad)));
        } else {
            cmd.arg(&key);
        }
        let done =
            tokio::time::timeout(Duration::from_secs(5), cmd.query_async::<redis::Value>(c)).await;
        match done {
            Ok(Ok(_)) => {
                acknowledged.fetch_add(1, Relaxed);
                if set {
                    let route =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                            feedbridge::db::redis::slot(tag.as_bytes()),
                            SlotAddr::Master,
                        )));
                    let mut wait = redis::cmd("WAIT");
                    wait.arg(1).arg(100);
                    if let Ok(Ok(redis::Value::Int(n))) =
                        tokio::time::timeout(Duration::from_secs(2), c.route_command(wait, route))
                            .await
                    {
                        if n >= 1 {
                            durable.lock().unwrap().insert(i);
                        }
                    }
                }
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => conn = None,
        }
        i += 1;
        if !load.burst.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
}

/// The nemesis against a Redis Cluster source (3 masters, a replica
/// each): the shipped cluster → ZeroMQ config as is, and again with its
/// checkpoint (and index) on; ZeroMQ subscribers, one through a proxy,
/// one restarted and stalled. Faults: `kill -9`, SIGTERM, SIGSTOP of a
/// bridge; `kill -9` of a master (its replica takes over; it comes back
/// as a replica); FLUSHDB on a master; a slot migration; a subscriber's
/// partition and restart; bursts.
///
/// Redis keeps no history, so the checker cannot ask for every write:
/// per row, the counters delivered only grow (a regression is allowed
/// only below a write no replica confirmed: a failover may lose it), and
/// each subscriber ends equal to the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: scripts/nemesis.sh runs it"]
async fn nemesis_redis_cluster() {
    let (seconds, seed, mut rng) = run_length();
    log_if_asked();
    let mut cluster = feedbridge::testing::RedisCluster::start(3, 1).await;
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().to_path_buf();
    let (port_c, port_k) = (free_port(), free_port());
    let proxy = FaultProxy::start(&format!("127.0.0.1:{port_c}"));

    let shipped = std::fs::read_to_string(workspace_path("config/redis-cluster.toml")).unwrap();
    let commented = "# checkpoint_file = \"/var/lib/feedbridge/redis-cluster.checkpoint\"";
    assert!(shipped.contains(commented), "the shipped config changed");
    let checkpointed = shipped.replace(
        commented,
        &format!("checkpoint_file = {:?}", logs.join("k.checkpoint")),
    );
    let env = |port: u16| {
        vec![
            ("FEEDBRIDGE_REDIS_URL", urls[1].clone()),
            ("FEEDBRIDGE_ZMQ_BIND", format!("tcp://127.0.0.1:{port}")),
        ]
    };
    let mut procs = vec![
        Proc::new(
            "c",
            workspace_path("config/redis-cluster.toml"),
            env(port_c),
            &logs,
        ),
        Proc::new(
            "k",
            write_config(&logs, "k", &checkpointed),
            env(port_k),
            &logs,
        ),
    ];
    for p in &mut procs {
        p.start();
    }
    let read = cluster_reader(urls.clone());
    let direct = format!("127.0.0.1:{port_c}");
    let mut subscribers: Vec<(&str, Vec<Run>)> = vec![
        (
            "zmq of c (through the proxy)",
            vec![{
                let sub = zmq_sub(&proxy.addr());
                (sub.clone(), run_app(sub, read.clone(), false))
            }],
        ),
        (
            "zmq of k (checkpointed)",
            vec![{
                let sub = zmq_sub(&format!("127.0.0.1:{port_k}"));
                (sub.clone(), run_app(sub, read.clone(), false))
            }],
        ),
        (
            "zmq of c (restarted)",
            vec![{
                let sub = zmq_sub(&direct);
                (sub.clone(), run_app(sub, read.clone(), false))
            }],
        ),
    ];
    let conn = cluster.connection().await;
    await_probes(&subscribers, |i| {
        let mut conn = conn.clone();
        async move {
            let _: Result<(), _> = redis::cmd("SET")
                .arg(format!("{{probe.t{i}}}x"))
                .arg("x")
                .query_async(&mut conn)
                .await;
        }
    })
    .await;

    let durable: Arc<Mutex<std::collections::HashSet<u64>>> = Default::default();
    let acknowledged: Arc<std::sync::atomic::AtomicU64> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let writing = tokio::spawn(cluster_writer(
        urls.clone(),
        durable.clone(),
        acknowledged.clone(),
        stop.clone(),
        load.clone(),
    ));

    let mut faults: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(3000))).await;
        let target = rng.below(procs.len() as u64) as usize;
        let kind = match rng.below(11) {
            kind @ 0..=2 => procs[target].fault(kind, &mut rng).await,
            3 => {
                // kill -9 of a master: its replica takes over; it comes
                // back as a replica.
                let masters: Vec<String> =
                    masters(&cluster).await.into_iter().map(|n| n.1).collect();
                let victim = &masters[rng.below(masters.len() as u64) as usize];
                let i = cluster
                    .nodes
                    .iter()
                    .position(|n| format!("127.0.0.1:{}", n.port) == *victim)
                    .unwrap();
                cluster.nodes[i].stop();
                tokio::time::sleep(Duration::from_millis(2000 + rng.below(3000))).await;
                cluster.nodes[i].restart().await;
                cluster.await_healthy().await;
                "kill -9 a Redis master".into()
            }
            4 | 5 => {
                partition(&proxy, &mut rng).await;
                "partition zmq subscriber -> bridge c".into()
            }
            6 => {
                let masters: Vec<String> =
                    masters(&cluster).await.into_iter().map(|n| n.1).collect();
                let victim = &masters[rng.below(masters.len() as u64) as usize];
                if let Ok(client) = redis::Client::open(format!("redis://{victim}/0")) {
                    if let Ok(mut m) = client.get_multiplexed_async_connection().await {
                        let _: Result<(), _> = redis::cmd("FLUSHDB").query_async(&mut m).await;
                    }
                }
                "FLUSHDB on a master".into()
            }
            7 => {
                let masters = masters(&cluster).await;
                let from = rng.below(masters.len() as u64) as usize;
                let to = (from + 1 + rng.below(masters.len() as u64 - 1) as usize) % masters.len();
                let slots = 100 + rng.below(900);
                let seed_node = masters[from].1.clone();
                let (from_id, to_id) = (masters[from].0.clone(), masters[to].0.clone());
                let moved = tokio::task::spawn_blocking(move || {
                    Command::new("redis-cli")
                        .args(["--cluster", "reshard", &seed_node])
                        .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
                        .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
                .await
                .unwrap();
                if moved {
                    "a slot migration".into()
                } else {
                    "a slot migration (refused by redis-cli)".into()
                }
            }
            8 => {
                let (_, runs) = subscribers.last_mut().unwrap();
                runs.last().unwrap().0.stop();
                let sub = zmq_sub(&direct);
                runs.push((sub.clone(), run_app(sub, read.clone(), true)));
                "restart a subscriber".into()
            }
            9 => {
                load.burst(Duration::from_secs(1)).await;
                "a burst of writes".into()
            }
            _ => {
                let (_, runs) = subscribers.last().unwrap();
                load.burst_over_a_stall(&runs.last().unwrap().1, &mut rng)
                    .await;
                "a burst over a stalled subscriber's high-water mark".into()
            }
        };
        eprintln!("nemesis: {kind}");
        *faults.entry(kind).or_default() += 1;
    }

    proxy.set(Fault::Pass);
    for p in &mut procs {
        p.cont();
    }
    stop.store(true, Relaxed);
    writing.await.unwrap();
    cluster.await_healthy().await;
    let expected = loop {
        if let Some(rows) = read().await {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (stale, converged) = converge(&subscribers, &expected).await;

    println!(
        "nemesis (Redis Cluster): seed {seed}, {seconds} s, {} writes acknowledged, {} confirmed by a replica",
        acknowledged.load(Relaxed),
        durable.lock().unwrap().len()
    );
    println!(
        "faults injected: {faults:?} ({} in all)",
        faults.values().sum::<usize>()
    );
    let durable = durable.lock().unwrap().clone();
    let mut failures = Vec::new();
    for (name, runs) in &subscribers {
        let mut verdict = CounterVerdict::default();
        for (_, seen) in runs {
            verdict.add(&seen.delivered.lock().unwrap(), &durable);
        }
        let stale_rows = stale.get(name).copied().unwrap_or(0);
        print_liveness(name, runs);
        for reason in &verdict.reasons {
            println!("{name}: a sync: {reason}");
        }
        println!(
            "{name}: {} runs, {} updates delivered, {} syncs, {} order violations, {} regressions below an unconfirmed write (lost by a failover), {} duplicates, {stale_rows} stale rows",
            runs.len(),
            verdict.delivered,
            verdict.syncs,
            verdict.order,
            verdict.lost_by_failover,
            verdict.duplicates,
        );
        if verdict.order > 0 || stale_rows > 0 {
            println!("{name}: first order violations {:?}", verdict.examples);
            failures.push(*name);
        }
    }
    println!("converged {converged:?} after the faults stopped");
    for p in &mut procs {
        p.kill();
    }
    assert!(
        failures.is_empty(),
        "the checker failed for {failures:?} (seed {seed}; logs in {})",
        dir.keep().display()
    );
}

/// The Redis checker: per row, the counters delivered grow between
/// `sync`s (after one the application re-read).
#[derive(Default)]
struct CounterVerdict {
    delivered: usize,
    syncs: usize,
    order: usize,
    lost_by_failover: usize,
    duplicates: usize,
    examples: Vec<String>,
    reasons: Vec<String>,
}

impl CounterVerdict {
    fn add(&mut self, delivered: &[DbUpdate], durable: &std::collections::HashSet<u64>) {
        self.delivered += delivered.len();
        // row → the last counter delivered, and whether a delete followed
        let mut last: HashMap<&str, (u64, bool)> = HashMap::new();
        for u in delivered {
            if u.action == Action::Sync {
                self.syncs += 1;
                if self.reasons.len() < 3 {
                    self.reasons.push(u.value.clone().unwrap_or_default());
                }
                last.clear();
                continue;
            }
            if u.table != "lport" {
                continue;
            }
            if u.action == Action::Delete {
                if let Some(l) = last.get_mut(u.key.as_str()) {
                    l.1 = true;
                }
                continue;
            }
            let Some(c) = u.value.as_deref().and_then(counter) else {
                continue;
            };
            match last.insert(&u.key, (c, false)) {
                Some((before, _)) if c > before => {}
                // The same value again after a delete: a failover undid
                // the delete.
                Some((before, true)) if c == before => {}
                Some((before, false)) if c == before => self.duplicates += 1,
                Some((before, _)) if !durable.contains(&before) => self.lost_by_failover += 1,
                Some((before, _)) => {
                    self.order += 1;
                    if self.examples.len() < 5 {
                        self.examples.push(format!("{}: {before} then {c}", u.key));
                    }
                }
                None => {}
            }
        }
    }
}

/// `NEMESIS_SECONDS` (120) and `NEMESIS_SEED` (1), and the run's generator.
fn run_length() -> (u64, u64, Rng) {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (seconds, seed) = (var("NEMESIS_SECONDS", 120), var("NEMESIS_SEED", 1));
    (
        seconds,
        seed,
        Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    )
}

/// Cuts `proxy`'s connections for 0.5–4.5 s (sometimes until the far side
/// gives up), then heals them.
async fn partition(proxy: &FaultProxy, rng: &mut Rng) {
    proxy.set(Fault::Blackhole);
    tokio::time::sleep(Duration::from_millis(500 + rng.below(4000))).await;
    if rng.below(2) == 0 {
        proxy.far_side_gives_up();
    }
    proxy.set(Fault::Pass);
}

/// The cluster's masters now, as [`cluster_nodes`] lists them.
async fn masters(cluster: &feedbridge::testing::RedisCluster) -> Vec<(String, String, bool)> {
    let mut c = cluster.connection().await;
    cluster_nodes(&mut c)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.2)
        .collect()
}

/// A ZeroMQ subscriber of every topic, as shipped (msgpack).
fn zmq_sub(address: &str) -> Arc<dyn Subscriber> {
    use feedbridge::config::{BackendConfig, ZmqBackendConfig};
    let sub = feedbridge::backend::PubSub::new(BackendConfig::Zmq(ZmqBackendConfig {
        bind: format!("tcp://{address}"),
        codec: feedbridge::codec::Codec::Msgpack,
        send_hwm: 1000,
        linger: Duration::ZERO,
        rejoin_wait: Duration::ZERO,
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
    }))
    .get_subscriber();
    sub.register_topic("");
    sub
}

/// Writes probes with `probe(i)` until every subscriber's first run has
/// received one (table `probe`).
async fn await_probes<F, Fut>(subscribers: &[(&str, Vec<Run>)], mut probe: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for i in 0.. {
        probe(i).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if subscribers.iter().all(|(_, runs)| {
            runs[0]
                .1
                .delivered
                .lock()
                .unwrap()
                .iter()
                .any(|u| u.table == "probe")
        }) {
            return;
        }
        assert!(i < 150, "the subscribers never received anything");
    }
}

/// After the faults: waits for each subscriber's application to hold
/// `expected`, as long as it makes progress (a subscriber of a backend
/// slower than the writer, etcd's, catches up for minutes); gives up on
/// one that delivered nothing for 30 s. For each, how long it took, and
/// for those that never got there how many rows differ.
async fn converge(
    subscribers: &[(&'static str, Vec<Run>)],
    expected: &BTreeMap<String, String>,
) -> (BTreeMap<&'static str, usize>, Duration) {
    let started = Instant::now();
    let mut stale = BTreeMap::new();
    for (name, runs) in subscribers {
        let seen = &runs.last().unwrap().1;
        let mut last = (seen.delivered.lock().unwrap().len(), Instant::now());
        loop {
            if *seen.rows.lock().unwrap() == *expected {
                break;
            }
            let delivered = seen.delivered.lock().unwrap().len();
            if delivered != last.0 {
                last = (delivered, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(30) {
                let rows = seen.rows.lock().unwrap();
                let n = expected
                    .iter()
                    .filter(|(k, v)| rows.get(*k) != Some(v))
                    .count()
                    + rows.keys().filter(|k| !expected.contains_key(*k)).count();
                stale.insert(*name, n);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !stale.contains_key(name) {
            println!(
                "{name}: equal to the database {:?} after the faults stopped",
                started.elapsed()
            );
        }
    }
    (stale, started.elapsed())
}

/// The gaps a subscriber detected and the silences it noticed, over its runs.
fn print_liveness(name: &str, runs: &[Run]) {
    let (gaps, silences) = runs.iter().fold((0, 0), |(g, s), (sub, _)| {
        (g + sub.gaps(), s + sub.silences())
    });
    println!("{name}: {gaps} gaps detected, {silences} silences");
}

/// What the checker found in what one subscriber delivered (over its
/// runs).
#[derive(Default)]
struct Verdict {
    delivered: usize,
    syncs: usize,
    lost: usize,
    explained: usize,
    /// Missing, but inside a window its bridge declared coalesced (a
    /// re-list after compaction), and superseded there by a later write
    /// of the row whose result was delivered.
    coalesced: usize,
    order: usize,
    examples: Vec<String>,
    reasons: Vec<String>,
    /// What the subscriber delivered around the first lost write: the
    /// deliveries just before and after it, syncs marked, so a failing
    /// seed says where the history broke.
    context: Vec<String>,
    /// The first lost write's row: its writes, deliveries and windows near it.
    row_context: Vec<String>,
}

impl Verdict {
    /// Checks one run of a subscriber: each row's revisions strictly
    /// increase; every written revision was delivered, or a `sync` was
    /// delivered between the updates around it. A run `started` mid-way
    /// answers from its first delivery on, one that `ended` (restarted)
    /// up to its last.
    ///
    /// A revision inside a declared coalesced window (`windows`) may be
    /// missing only if the row's state at the window's end was delivered:
    /// its last write there (with its own revision), or for a deleted row
    /// a delete within the window (a re-list's delete carries the
    /// re-list's revision), or nothing at all for a row the subscriber
    /// did not have.
    fn add(
        &mut self,
        delivered: &[DbUpdate],
        written: &[Write],
        windows: &[(i64, i64)],
        started: bool,
        ended: bool,
    ) {
        self.delivered += delivered.len();
        let sync_at: Vec<usize> = delivered
            .iter()
            .enumerate()
            .filter(|(_, u)| u.action == Action::Sync)
            .map(|(i, _)| i)
            .collect();
        self.syncs += sync_at.len();
        for i in &sync_at {
            if self.reasons.len() < 3 {
                self.reasons
                    .push(delivered[*i].value.clone().unwrap_or_default());
            }
        }
        let mut last: HashMap<&str, i64> = HashMap::new();
        for u in delivered.iter().filter(|u| u.table == "lport") {
            if let Some(r) = u.revision {
                if let Some(before) = last.insert(&u.key, r) {
                    if before >= r {
                        self.order += 1;
                    }
                }
            }
        }
        let index: std::collections::HashSet<i64> =
            delivered.iter().filter_map(|u| u.revision).collect();
        let revisions = delivered.iter().filter_map(|u| u.revision);
        let from = revisions.clone().min().filter(|_| started);
        let until = revisions.max().filter(|_| ended);
        let around = Around::new(delivered);
        let rows = Rows::new(written, delivered);
        // A re-list that could not tell what was deleted says `sync` with
        // its revision; the application's re-read comes after that list,
        // so it covers the whole window.
        let said_sync: Vec<(i64, i64)> = windows
            .iter()
            .copied()
            .filter(|&(_, to)| {
                let reason = format!("before revision {to} was compacted");
                sync_at.iter().any(|&s| {
                    delivered[s]
                        .value
                        .as_deref()
                        .is_some_and(|r| r.contains(&reason))
                })
            })
            .collect();
        for w in written {
            if index.contains(&w.revision)
                || from.is_some_and(|f| w.revision < f)
                || until.is_some_and(|u| w.revision > u)
            {
                continue;
            }
            let (before, after) = around.of(w.revision);
            let first_sync = sync_at.partition_point(|&s| s < before);
            let sync_between = sync_at.get(first_sync).is_some_and(|&s| s <= after);
            let relist_said_sync = said_sync
                .iter()
                .any(|&(from, to)| (from..=to).contains(&w.revision));
            if relist_said_sync || sync_between {
                self.explained += 1;
            } else if windows.iter().any(|&window| superseded(w, window, &rows)) {
                self.coalesced += 1;
            } else {
                self.lost += 1;
                if self.examples.len() < 5 {
                    self.examples.push(format!("{}@{}", w.key, w.revision));
                }
                if self.context.is_empty() {
                    // The row's own story near it: what was written and
                    // what the subscriber delivered (re-lists deliver rows
                    // out of revision order, so the neighbours by revision
                    // may say little), and the windows around it.
                    let row = w.key.strip_prefix("/lport/").unwrap_or(&w.key);
                    let near = |r: i64| (r - w.revision).abs() <= 3000;
                    self.row_context = rows
                        .writes
                        .get(row)
                        .into_iter()
                        .flatten()
                        .filter(|&&(r, _)| near(r))
                        .map(|&(r, d)| format!("written @{r}{}", if d { " (delete)" } else { "" }))
                        .chain(
                            rows.delivered
                                .get(row)
                                .into_iter()
                                .flatten()
                                .filter(|u| u.revision.is_some_and(near))
                                .map(|u| format!("delivered {:?} @{:?}", u.action, u.revision)),
                        )
                        .chain(
                            windows
                                .iter()
                                .filter(|&&(f, t)| f <= w.revision + 3000 && t + 3000 >= w.revision)
                                .map(|(f, t)| format!("re-list window {f}..={t}")),
                        )
                        .collect();
                    let shown = before.saturating_sub(5)..(after + 5).min(delivered.len());
                    self.context = shown
                        .map(|i| {
                            let u = &delivered[i];
                            format!(
                                "#{i} {:?} {}/{} @{:?}",
                                u.action, u.table, u.key, u.revision
                            )
                        })
                        .collect();
                }
            }
        }
    }
}

/// Where a revision falls in what a subscriber delivered: the position of
/// the last delivery of a lower revision (0 if none) and of the first of a
/// higher one (the end if none). Built once per run, each answer a binary
/// search: a 30-minute run checks hundreds of thousands of writes against
/// as many deliveries.
struct Around {
    /// (revision, position) in revision order.
    by_revision: Vec<(i64, usize)>,
    /// The highest position among `by_revision[..=i]`.
    last_below: Vec<usize>,
    /// The lowest position among `by_revision[i..]`.
    first_above: Vec<usize>,
    len: usize,
}

impl Around {
    fn new(delivered: &[DbUpdate]) -> Around {
        let mut by_revision: Vec<(i64, usize)> = delivered
            .iter()
            .enumerate()
            .filter_map(|(i, u)| u.revision.map(|r| (r, i)))
            .collect();
        by_revision.sort_unstable();
        let last_below = by_revision
            .iter()
            .scan(0, |m, &(_, i)| {
                *m = i.max(*m);
                Some(*m)
            })
            .collect();
        let mut first_above: Vec<usize> = by_revision
            .iter()
            .rev()
            .scan(usize::MAX, |m, &(_, i)| {
                *m = i.min(*m);
                Some(*m)
            })
            .collect();
        first_above.reverse();
        Around {
            by_revision,
            last_below,
            first_above,
            len: delivered.len(),
        }
    }

    fn of(&self, revision: i64) -> (usize, usize) {
        let below = self.by_revision.partition_point(|&(r, _)| r < revision);
        let above = self.by_revision.partition_point(|&(r, _)| r <= revision);
        (
            below.checked_sub(1).map_or(0, |k| self.last_below[k]),
            self.first_above.get(above).copied().unwrap_or(self.len),
        )
    }
}

/// Per row: the writes that touched it and what a subscriber delivered of
/// it, built once per run.
struct Rows<'a> {
    /// row → (revision, delete) of its own writes, in revision order.
    writes: HashMap<&'a str, Vec<(i64, bool)>>,
    /// Delete-ranges: (prefix of the rows removed, revision).
    ranges: Vec<(&'a str, i64)>,
    /// row → its updates delivered, in delivery order.
    delivered: HashMap<&'a str, Vec<&'a DbUpdate>>,
}

impl<'a> Rows<'a> {
    fn new(written: &'a [Write], delivered: &'a [DbUpdate]) -> Rows<'a> {
        let mut writes: HashMap<&str, Vec<(i64, bool)>> = HashMap::new();
        let mut ranges = Vec::new();
        for w in written {
            let Some(k) = w.key.strip_prefix("/lport/") else {
                continue;
            };
            match k.strip_suffix('*') {
                Some(prefix) => ranges.push((prefix, w.revision)),
                None => writes.entry(k).or_default().push((w.revision, w.delete)),
            }
        }
        for v in writes.values_mut() {
            v.sort_unstable();
        }
        let mut mine: HashMap<&str, Vec<&DbUpdate>> = HashMap::new();
        for u in delivered.iter().filter(|u| u.table == "lport") {
            mine.entry(u.key.as_str()).or_default().push(u);
        }
        Rows {
            writes,
            ranges,
            delivered: mine,
        }
    }

    /// The last write that touched `row` at or before `to`: (revision,
    /// delete).
    fn last_write(&self, row: &str, to: i64) -> Option<(i64, bool)> {
        let own = self.writes.get(row).and_then(|v| {
            let k = v.partition_point(|&(r, _)| r <= to);
            k.checked_sub(1).map(|k| v[k])
        });
        let range = self
            .ranges
            .iter()
            .filter(|&&(prefix, r)| r <= to && row.starts_with(prefix))
            .map(|&(_, r)| (r, true))
            .max();
        own.max(range)
    }
}

/// Whether the missing write `w` is accounted for by the re-list of
/// `window`: the row's state at the window's end reached the subscriber.
fn superseded(w: &Write, (from, to): (i64, i64), rows: &Rows) -> bool {
    if w.revision < from || w.revision > to {
        return false;
    }
    let Some(key) = w.key.strip_prefix("/lport/") else {
        return false;
    };
    if key.ends_with('*') {
        // A delete-range in the window: each row it removed is checked
        // through its own writes and the final state.
        return true;
    }
    let (last, deleted) = rows.last_write(key, to).expect("w itself");
    if last > w.revision {
        return true; // superseded; that write answers for the row
    }
    if !deleted {
        return false; // the re-list carries a row's last value with its revision
    }
    let mine: &[&DbUpdate] = rows.delivered.get(key).map_or(&[], |v| v.as_slice());
    let deleted_in_window = mine.iter().any(|u| {
        u.action == Action::Delete && u.revision.is_some_and(|r| r >= w.revision && r <= to)
    });
    // The subscriber never had the row (created and deleted while the
    // bridge could not read): nothing to tell it.
    let never_had = mine
        .iter()
        .rev()
        .find(|u| u.revision.is_some_and(|r| r < from))
        .is_none_or(|u| u.action == Action::Delete);
    deleted_in_window || never_had
}

/// An `lport` update of `row` at `revision` (a sync without a row).
fn at(row: &str, revision: i64, action: Action) -> DbUpdate {
    let sync = action == Action::Sync;
    let mut u = if sync {
        DbUpdate::sync("test")
    } else {
        DbUpdate::new("lport", row, action, Some("v".into()))
    };
    u.revision = (!sync).then_some(revision);
    u
}

#[test]
fn the_checker_finds_the_deliveries_around_a_revision_as_a_scan_would() {
    // Delivery order is not revision order: a replay repeats 3 and 4.
    let delivered = [
        at("a", 2, Action::Set),
        at("b", 4, Action::Set),
        at("", 0, Action::Sync),
        at("a", 3, Action::Set),
        at("b", 4, Action::Set),
        at("a", 7, Action::Set),
    ];
    let around = Around::new(&delivered);
    for revision in 0..10 {
        let scan_before = delivered
            .iter()
            .rposition(|u| u.revision.is_some_and(|r| r < revision))
            .unwrap_or(0);
        let scan_after = delivered
            .iter()
            .position(|u| u.revision.is_some_and(|r| r > revision))
            .unwrap_or(delivered.len());
        assert_eq!(
            around.of(revision),
            (scan_before, scan_after),
            "revision {revision}"
        );
    }
}

#[test]
fn the_checker_finds_a_rows_last_write_including_delete_ranges() {
    let write = |key: &str, revision, delete| Write {
        key: format!("/lport/{key}"),
        revision,
        delete,
    };
    let written = [
        write("k12", 9, false),
        write("k12", 3, false),
        write("k1*", 6, true),
        write("k2", 5, false),
    ];
    let delivered = [at("k12", 3, Action::Set)];
    let rows = Rows::new(&written, &delivered);
    assert_eq!(rows.last_write("k12", 4), Some((3, false)));
    assert_eq!(rows.last_write("k12", 6), Some((6, true)), "the range");
    assert_eq!(rows.last_write("k12", 10), Some((9, false)));
    assert_eq!(rows.last_write("k2", 4), None);
    assert_eq!(rows.last_write("k2", 6), Some((5, false)));
    assert_eq!(rows.delivered["k12"].len(), 1);
}
