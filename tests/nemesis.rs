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

impl Write {
    /// Whether this write changed the row `key` (`kN`, as delivered).
    fn touches(&self, key: &str) -> bool {
        match self.key.strip_prefix("/lport/") {
            Some(k) => match k.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => k == key,
            },
            None => false,
        }
    }
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

/// Runs a subscriber's application: applies updates, re-reads etcd on a
/// `sync`. One that `starts` mid-run (a restarted subscriber) subscribes,
/// then reads etcd, as an application does at start: that read counts as
/// a `sync` at the head of what it delivered.
fn run_app(sub: Arc<dyn Subscriber>, etcd: String, starts: bool) -> Seen {
    let seen = Seen::default();
    let s = seen.clone();
    let (mut rx, _pump) = sub.updates(4096);
    let start = starts.then(|| DbUpdate::sync("the application started: it reads etcd"));
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
                // The application re-reads (retrying while etcd restarts).
                let fresh = loop {
                    if let Ok(kv) = etcd_client::Client::connect([etcd.clone()], None).await {
                        if let Ok(Ok(state)) =
                            tokio::time::timeout(Duration::from_secs(5), rows_of(kv)).await
                        {
                            break state;
                        }
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
    burst: Arc<AtomicBool>,
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
            let pad = if i % 97 == 96 { 64 << 10 } else { 0 };
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
        if !burst.load(Relaxed) {
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
    let seconds: u64 = std::env::var("NEMESIS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut rng = Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
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
    let zmq_sub = |address: &str| {
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
    };
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
                (sub.clone(), run_app(sub, endpoint.clone(), false))
            }],
        ),
        (
            "zmq (through the proxy)",
            vec![{
                let sub = zmq_sub(&via("zmq subscriber -> bridge z"));
                (sub.clone(), run_app(sub, endpoint.clone(), false))
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
                (sub.clone(), run_app(sub, endpoint.clone(), false))
            }],
        ),
        (
            "zmq (restarted)",
            vec![{
                let sub = zmq_sub(&direct);
                (sub.clone(), run_app(sub, endpoint.clone(), false))
            }],
        ),
    ];
    // Every subscriber is receiving before the run starts.
    let mut kv = etcd.client().await;
    for i in 0.. {
        kv.put(format!("/probe/{i}"), "x", None).await.unwrap();
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
            break;
        }
        assert!(i < 150, "the subscribers never received anything");
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // positions

    let log: Arc<Mutex<Vec<Write>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let burst = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(
        endpoint.clone(),
        log.clone(),
        stop.clone(),
        burst.clone(),
    ));

    let mut faults: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(3000))).await;
        let target = rng.below(procs.len() as u64) as usize;
        let kind = match rng.below(10) {
            0 => {
                procs[target].kill();
                procs[target].start();
                format!("kill -9 bridge {}", procs[target].name)
            }
            1 => {
                procs[target].term();
                procs[target].start();
                format!("SIGTERM bridge {}", procs[target].name)
            }
            2 => {
                procs[target].stop();
                tokio::time::sleep(Duration::from_millis(500 + rng.below(3000))).await;
                procs[target].cont();
                format!("SIGSTOP/SIGCONT bridge {}", procs[target].name)
            }
            3 => {
                etcd.restart().await;
                "restart etcd".into()
            }
            4 | 5 => {
                let (name, proxy) = &links[rng.below(links.len() as u64) as usize];
                proxy.set(Fault::Blackhole);
                tokio::time::sleep(Duration::from_millis(500 + rng.below(4000))).await;
                if rng.below(2) == 0 {
                    proxy.far_side_gives_up();
                }
                proxy.set(Fault::Pass);
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
                runs.push((sub.clone(), run_app(sub, endpoint.clone(), true)));
                "restart a subscriber".into()
            }
            8 => {
                burst.store(true, Relaxed);
                tokio::time::sleep(Duration::from_millis(1000)).await;
                burst.store(false, Relaxed);
                "a burst of writes".into()
            }
            _ => {
                // A burst while the restarted subscriber's application
                // stands still: more than its queues and the bridge's
                // send high-water mark hold, so the bridge drops for it
                // and it must repair the gap.
                let (_, runs) = subscribers.last().unwrap();
                let stalled = runs.last().unwrap().1.stalled.clone();
                stalled.store(true, Relaxed);
                burst.store(true, Relaxed);
                tokio::time::sleep(Duration::from_millis(4000 + rng.below(4000))).await;
                burst.store(false, Relaxed);
                stalled.store(false, Relaxed);
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
    let converging = Instant::now();
    let kv = etcd.client().await;
    let expected = rows_of(kv.clone()).await.unwrap();
    let mut stale = BTreeMap::new();
    for (name, runs) in &subscribers {
        let seen = &runs.last().unwrap().1;
        let ok = eventually_bool(Duration::from_secs(60), || {
            *seen.rows.lock().unwrap() == expected
        })
        .await;
        if !ok {
            let rows = seen.rows.lock().unwrap();
            let n = expected
                .iter()
                .filter(|(k, v)| rows.get(*k) != Some(v))
                .count()
                + rows.keys().filter(|k| !expected.contains_key(*k)).count();
            stale.insert(*name, n);
        }
    }
    let converged = converging.elapsed();

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
        let (gaps, silences) = runs.iter().fold((0, 0), |(g, s), (sub, _)| {
            (g + sub.gaps(), s + sub.silences())
        });
        println!("{name}: {gaps} gaps detected, {silences} silences");
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
        for w in written {
            if index.contains(&w.revision)
                || from.is_some_and(|f| w.revision < f)
                || until.is_some_and(|u| w.revision > u)
            {
                continue;
            }
            let before = delivered
                .iter()
                .rposition(|u| u.revision.is_some_and(|r| r < w.revision))
                .unwrap_or(0);
            let after = delivered
                .iter()
                .position(|u| u.revision.is_some_and(|r| r > w.revision))
                .unwrap_or(delivered.len());
            // A re-list that could not tell what was deleted says `sync`
            // with its revision; the application's re-read comes after
            // that list, so it covers the whole window.
            let relist_said_sync = windows.iter().any(|&(from, to)| {
                (from..=to).contains(&w.revision)
                    && sync_at.iter().any(|&s| {
                        delivered[s].value.as_deref().is_some_and(|r| {
                            r.contains(&format!("before revision {to} was compacted"))
                        })
                    })
            });
            if relist_said_sync || sync_at.iter().any(|&s| s >= before && s <= after) {
                self.explained += 1;
            } else if windows
                .iter()
                .any(|&window| superseded(w, window, written, delivered))
            {
                self.coalesced += 1;
            } else {
                self.lost += 1;
                if self.examples.len() < 5 {
                    self.examples.push(format!("{}@{}", w.key, w.revision));
                }
            }
        }
    }
}

/// Whether the missing write `w` is accounted for by the re-list of
/// `window`: the row's state at the window's end reached the subscriber.
fn superseded(
    w: &Write,
    (from, to): (i64, i64),
    written: &[Write],
    delivered: &[DbUpdate],
) -> bool {
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
    let last = written
        .iter()
        .filter(|x| x.revision <= to && x.touches(key))
        .max_by_key(|x| x.revision)
        .expect("w itself");
    if last.revision > w.revision {
        return true; // superseded; `last` answers for the row
    }
    if !last.delete {
        return false; // the re-list carries a row's last value with its revision
    }
    let mine: Vec<&DbUpdate> = delivered
        .iter()
        .filter(|u| u.table == "lport" && u.key == key)
        .collect();
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

async fn eventually_bool(within: Duration, ok: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ok()
}
