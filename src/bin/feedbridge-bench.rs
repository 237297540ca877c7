//! `feedbridge-bench`: end-to-end throughput, latency and resource use of
//! the bridge, measured against the source database's own ceiling.
//!
//! For each scenario it starts its own etcd or Redis, then runs the same
//! write load twice: once with a plain watcher (etcd watch, or a keyspace
//! subscriber that reads the values as the bridge does) to find what the
//! database itself delivers, and once through the bridge (this binary
//! re-executed as a separate process, so its CPU time and peak RSS can be
//! read from /proc) to N subscribers. Values embed their send time, so
//! latency is write call → subscriber callback.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{
    BackendConfig, Config, EtcdBackendConfig, RedisBackendConfig, ZmqBackendConfig,
};
use feedbridge::testing::{free_port, EtcdServer, RedisServer};
use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Clone)]
#[command(
    name = "feedbridge-bench",
    about = "Benchmark the bridge against the database's own ceiling"
)]
struct Args {
    /// Source database.
    #[arg(long, value_enum, default_value = "etcd")]
    source: Source,
    /// Publish backend.
    #[arg(long, value_enum, default_value = "zmq")]
    backend: Backend,
    /// Subscribers of the bridge's output.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// How long the writers write.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Total writes per second (0: as fast as the database accepts).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 200)]
    value_size: usize,
    /// Keys each writer cycles through (0: a new key for every write).
    #[arg(long, default_value_t = 0)]
    keys_per_writer: usize,
    /// Keys written before the run, so the bridge knows this many.
    #[arg(long, default_value_t = 0)]
    preload: usize,
    /// Run the standard matrix (every path, fan-out 1/10/50, fixed rate,
    /// 100k keys) instead of one scenario.
    #[arg(long)]
    matrix: bool,
    /// A few seconds per path, for CI: proves the harness runs.
    #[arg(long)]
    smoke: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the results as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Pin the bridge process to this CPU (start the harness itself with
    /// `taskset -c` on the others), so the bridge does not take CPU from
    /// the database and the writers it is measured against.
    #[arg(long)]
    bridge_cpu: Option<usize>,
    /// Pin the database and the writers to CPU 0, and the bridge, its
    /// subscribers and the plain watcher to CPU 1, so the ceiling and the
    /// bridged run give the database the same CPU.
    #[arg(long)]
    pin: bool,
    /// The plain etcd watcher also asks for the previous value of each
    /// change, as the bridge does (for deletes' values and topics).
    #[arg(long)]
    plain_prev_kv: bool,
    /// Internal: run as the writers against `etcd:URL` or `redis:URL`.
    #[arg(long, hide = true)]
    writer_child: Option<String>,
    /// Internal: run as the bridge with this config file.
    #[arg(long, hide = true)]
    bridge_child: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum Source {
    Etcd,
    Redis,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum Backend {
    Zmq,
    Redis,
    Etcd,
}

#[derive(Serialize, Clone, Debug)]
struct Row {
    path: String,
    subscribers: usize,
    writers: usize,
    target_rate: u64,
    keys_known: usize,
    written: u64,
    ceiling_per_s: f64,
    /// Write rate the database accepted during the bridged run (the bridge,
    /// the subscribers and the writers share the two cores).
    written_per_s: f64,
    bridged_per_s: f64,
    ratio: f64,
    /// bridged / written in the same run: whether the bridge kept up.
    keep_up: f64,
    plain_p50_ms: f64,
    plain_p99_ms: f64,
    plain_p999_ms: f64,
    bridged_p50_ms: f64,
    bridged_p99_ms: f64,
    bridged_p999_ms: f64,
    added_p99_ms: f64,
    missing: u64,
    max_lag: u64,
    bridge_cpu_ms_per_1k: f64,
    bridge_peak_rss_mb: f64,
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A value of `size` bytes that carries its send time.
fn value(size: usize) -> String {
    let head = format!("{{\"t\":{},\"pad\":\"", now_nanos());
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// The send time in a value, if it is one of the writers' values.
fn sent_at(value: &[u8]) -> Option<u64> {
    let rest = value.strip_prefix(b"{\"t\":")?;
    let end = rest.iter().position(|b| *b == b',')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// What one receiver saw.
#[derive(Default)]
struct Recorder {
    delivered: AtomicU64,
    latencies_ns: Mutex<Vec<u64>>,
    last_at: Mutex<Option<Instant>>,
}

impl Recorder {
    fn record(&self, value: &[u8]) {
        if let Some(t) = sent_at(value) {
            let lat = now_nanos().saturating_sub(t);
            self.latencies_ns.lock().unwrap().push(lat);
            *self.last_at.lock().unwrap() = Some(Instant::now());
            self.delivered.fetch_add(1, Relaxed);
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

fn latencies(recorders: &[Arc<Recorder>]) -> (f64, f64, f64) {
    let mut all: Vec<u64> = recorders
        .iter()
        .flat_map(|r| r.latencies_ns.lock().unwrap().clone())
        .collect();
    all.sort_unstable();
    (
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
    )
}

/// The database under test.
enum Db {
    Etcd(EtcdServer),
    Redis(RedisServer),
}

impl Db {
    async fn start(source: Source) -> Db {
        match source {
            Source::Etcd => Db::Etcd(EtcdServer::start().await),
            // No AOF fsync per write: a benchmark of the bridge, not the disk.
            Source::Redis => Db::Redis(RedisServer::start_with(&["appendonly no"]).await),
        }
    }

    fn key(&self, name: &str) -> String {
        match self {
            Db::Etcd(_) => format!("/bench/{name}"),
            Db::Redis(_) => format!("{{bench.}}{name}"),
        }
    }

    async fn writer(&self) -> Writer {
        match self {
            Db::Etcd(e) => Writer::Etcd(Box::new(e.client().await)),
            Db::Redis(r) => Writer::Redis(r.connection().await),
        }
    }
}

enum Writer {
    Etcd(Box<etcd_client::Client>),
    Redis(redis::aio::MultiplexedConnection),
}

impl Writer {
    async fn put(&mut self, key: String, value: String) {
        match self {
            Writer::Etcd(c) => {
                c.put(key, value, None).await.expect("etcd put");
            }
            Writer::Redis(c) => {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .query_async::<()>(c)
                    .await
                    .expect("redis SET");
            }
        }
    }
}

async fn preload(db: &Db, n: usize, size: usize) {
    let mut w = db.writer().await;
    for i in 0..n {
        w.put(db.key(&format!("pre{i}")), value(size)).await;
    }
}

/// Where writers write: enough to connect from another process too.
#[derive(Clone)]
enum Target {
    Etcd(String),
    Redis(String),
}

impl Target {
    fn of(db: &Db) -> Target {
        match db {
            Db::Etcd(e) => Target::Etcd(e.endpoint()),
            Db::Redis(r) => Target::Redis(r.url()),
        }
    }

    fn parse(spec: &str) -> Target {
        match spec.split_once(':') {
            Some(("etcd", url)) => Target::Etcd(url.to_owned()),
            Some(("redis", url)) => Target::Redis(url.to_owned()),
            _ => panic!("--writer-child takes etcd:URL or redis:URL, not {spec}"),
        }
    }

    fn spec(&self) -> String {
        match self {
            Target::Etcd(u) => format!("etcd:{u}"),
            Target::Redis(u) => format!("redis:{u}"),
        }
    }

    fn key(&self, name: &str) -> String {
        match self {
            Target::Etcd(_) => format!("/bench/{name}"),
            Target::Redis(_) => format!("{{bench.}}{name}"),
        }
    }

    async fn writer(&self) -> Writer {
        match self {
            Target::Etcd(url) => Writer::Etcd(Box::new(
                etcd_client::Client::connect([url], None).await.unwrap(),
            )),
            Target::Redis(url) => Writer::Redis(
                redis::Client::open(url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            ),
        }
    }
}

/// Runs the writers for `args.duration`, counting acknowledged writes.
async fn run_writers(target: &Target, args: &Args, written: Arc<AtomicU64>) {
    let stop_at = Instant::now() + args.duration;
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let mut writer = target.writer().await;
        let (written, size, rate, writers) = (
            written.clone(),
            args.value_size,
            args.rate,
            args.writers as u64,
        );
        let keys_per_writer = args.keys_per_writer;
        let prefix = target.key(&format!("w{w}-"));
        tasks.push(tokio::spawn(async move {
            let mut tick = (rate > 0).then(|| {
                let mut t =
                    tokio::time::interval(Duration::from_nanos(1_000_000_000 * writers / rate));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut i = 0;
            while Instant::now() < stop_at {
                if let Some(t) = &mut tick {
                    t.tick().await;
                }
                // Each write a new key unless a key space is set: Redis
                // merges fast writes to one key, which would read as loss.
                let n = if keys_per_writer > 0 {
                    i % keys_per_writer
                } else {
                    i
                };
                writer.put(format!("{prefix}{n}"), value(size)).await;
                written.fetch_add(1, Relaxed);
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Writes for `args.duration` (in this process, or pinned to CPU 0 in a
/// child with `--pin`); returns how many writes were acknowledged, when
/// writing started, and the largest lag (written − least delivered)
/// sampled every 250 ms.
async fn write_phase(db: &Db, args: &Args, recorders: &[Arc<Recorder>]) -> (u64, Instant, u64) {
    let written = Arc::new(AtomicU64::new(0));
    let target = Target::of(db);
    let start = Instant::now();
    let writing = if args.pin {
        let mut child = KillOnDrop(
            Command::new("taskset")
                .args(["-c", "0"])
                .arg(std::env::current_exe().unwrap())
                .args(["--writer-child", &target.spec()])
                .args(["--writers", &args.writers.to_string()])
                .args(["--duration", &format!("{}ms", args.duration.as_millis())])
                .args(["--rate", &args.rate.to_string()])
                .args(["--value-size", &args.value_size.to_string()])
                .args(["--keys-per-writer", &args.keys_per_writer.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let out = child.0.stdout.take().unwrap();
        let w = written.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("written ").and_then(|n| n.parse().ok()) {
                    w.store(n, Relaxed);
                }
            }
            drop(child);
        })
    } else {
        let (target, args, w) = (target.clone(), args.clone(), written.clone());
        tokio::spawn(async move { run_writers(&target, &args, w).await })
    };
    let mut max_lag = 0;
    while !writing.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let least = recorders
            .iter()
            .map(|r| r.delivered.load(Relaxed))
            .min()
            .unwrap_or(0);
        max_lag = max_lag.max(written.load(Relaxed).saturating_sub(least));
    }
    writing.await.unwrap();
    (written.load(Relaxed), start, max_lag)
}

/// `--writer-child`: writes, reporting the count every 100 ms on stdout.
fn writer_child(spec: &str, args: &Args, runtime: &tokio::runtime::Runtime) {
    let target = Target::parse(spec);
    let written = Arc::new(AtomicU64::new(0));
    runtime.block_on(async {
        let w = written.clone();
        let report = tokio::spawn(async move {
            loop {
                println!("written {}", w.load(Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        run_writers(&target, args, written.clone()).await;
        report.abort();
    });
    println!("written {}", written.load(Relaxed));
}

/// Pins a process (all its threads) to one CPU.
fn pin(pid: u32, cpu: usize) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "taskset could not pin {pid} to CPU {cpu}"
    );
}

/// Waits until every recorder has `n` deliveries, or 20 s of no progress.
async fn drain(recorders: &[Arc<Recorder>], n: u64) {
    let mut last = 0;
    let mut idle_since = Instant::now();
    loop {
        let least = recorders
            .iter()
            .map(|r| r.delivered.load(Relaxed))
            .min()
            .unwrap_or(0);
        if least >= n {
            return;
        }
        if least != last {
            last = least;
            idle_since = Instant::now();
        } else if idle_since.elapsed() > Duration::from_secs(20) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rate(recorders: &[Arc<Recorder>], start: Instant) -> f64 {
    let least = recorders
        .iter()
        .map(|r| r.delivered.load(Relaxed))
        .min()
        .unwrap_or(0);
    let last = recorders
        .iter()
        .filter_map(|r| *r.last_at.lock().unwrap())
        .max()
        .unwrap_or(start);
    least as f64 / last.duration_since(start).as_secs_f64().max(1e-9)
}

/// The database's own delivery to one plain consumer.
async fn plain_watcher(
    db: &Db,
    rec: Arc<Recorder>,
    stop: CancellationToken,
    prev_kv: bool,
) -> tokio::task::JoinHandle<()> {
    match db {
        Db::Etcd(e) => {
            let mut client = e.client().await;
            let mut opts = etcd_client::WatchOptions::new().with_prefix();
            if prev_kv {
                opts = opts.with_prev_key();
            }
            let mut stream = client.watch("/bench/", Some(opts)).await.unwrap();
            tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let Ok(Some(resp)) = msg else { return };
                    for ev in resp.events() {
                        if let Some(kv) = ev.kv() {
                            rec.record(kv.value());
                        }
                    }
                }
            })
        }
        Db::Redis(r) => {
            // Notifications carry no value: read it, pipelined per batch,
            // as any keyspace consumer (and the bridge) must.
            let client = redis::Client::open(r.url()).unwrap();
            let mut conn = r.connection().await;
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg("KA")
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
            let mut pubsub = client.get_async_pubsub().await.unwrap();
            pubsub.psubscribe("__keyspace@0__:{bench.}*").await.unwrap();
            tokio::spawn(async move {
                let mut messages = pubsub.into_on_message();
                loop {
                    let first = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(first) = first else { return };
                    let mut keys = VecDeque::new();
                    keys.push_back(first.get_channel_name()["__keyspace@0__:".len()..].to_owned());
                    while let Some(Some(m)) = futures_util::FutureExt::now_or_never(messages.next())
                    {
                        keys.push_back(m.get_channel_name()["__keyspace@0__:".len()..].to_owned());
                        if keys.len() >= 512 {
                            break;
                        }
                    }
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.cmd("GET").arg(k);
                    }
                    let values: Vec<Option<Vec<u8>>> =
                        pipe.query_async(&mut conn).await.unwrap_or_default();
                    for v in values.into_iter().flatten() {
                        rec.record(&v);
                    }
                }
            })
        }
    }
}

/// Writes probe values until every recorder saw one (subscriptions are up).
async fn await_flow(db: &Db, recorders: &[Arc<Recorder>]) {
    let mut w = db.writer().await;
    let start = Instant::now();
    while recorders.iter().any(|r| r.delivered.load(Relaxed) == 0) {
        w.put(db.key("probe"), value(64)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "subscribers never received a probe"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for r in recorders {
        r.delivered.store(0, Relaxed);
        r.latencies_ns.lock().unwrap().clear();
        *r.last_at.lock().unwrap() = None;
    }
}

fn bridge_config(db: &Db, backend: Backend, zmq_port: u16) -> String {
    let source = match db {
        Db::Etcd(e) => format!(
            "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"/bench/\"\n",
            e.endpoint()
        ),
        Db::Redis(r) => format!("[source]\ntype = \"redis\"\nurl = \"{}\"\n", r.url()),
    };
    let backend = match (backend, db) {
        (Backend::Zmq, _) => {
            format!("[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{zmq_port}\"\n")
        }
        (Backend::Redis, Db::Redis(r)) => {
            format!("[backend]\ntype = \"redis\"\nurl = \"{}\"\n", r.url())
        }
        (Backend::Etcd, Db::Etcd(e)) => format!(
            "[backend]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n",
            e.endpoint()
        ),
        _ => panic!(
            "the benchmark publishes to the source's own database for redis and etcd backends"
        ),
    };
    source + &backend
}

fn subscriber_backend(db: &Db, backend: Backend, zmq_port: u16) -> BackendConfig {
    match (backend, db) {
        (Backend::Zmq, _) => BackendConfig::Zmq(ZmqBackendConfig {
            bind: format!("tcp://127.0.0.1:{zmq_port}"),
            codec: Codec::Msgpack,
            send_hwm: 10_000,
            linger: Duration::ZERO,
            rejoin_wait: Duration::ZERO,
        }),
        (Backend::Redis, Db::Redis(r)) => BackendConfig::Redis(RedisBackendConfig {
            url: r.url(),
            codec: Codec::Msgpack,
            connect_timeout: Duration::from_secs(5),
            auth: Default::default(),
        }),
        (Backend::Etcd, Db::Etcd(e)) => BackendConfig::Etcd(EtcdBackendConfig {
            endpoints: vec![e.endpoint()],
            prefix: "/pubsub/".into(),
            codec: Codec::Msgpack,
            connect_timeout: Duration::from_secs(5),
            auth: Default::default(),
        }),
        _ => unreachable!("checked in bridge_config"),
    }
}

/// CPU seconds (user + system) and peak RSS (MB) of a process.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the ")" of the command name; utime, stime are 14 and 15
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(14) + ticks(15)) / 100.0; // USER_HZ
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm_kb / 1024.0)
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh database for one phase (pinned, preloaded), so both phases
/// write to a database of the same size and history.
async fn fresh_db(args: &Args) -> Db {
    let db = Db::start(args.source).await;
    if args.pin {
        let db_pid = match &db {
            Db::Etcd(e) => e.pid(),
            Db::Redis(r) => r.pid(),
        };
        pin(db_pid.expect("the database runs"), 0);
    }
    if args.preload > 0 {
        preload(&db, args.preload, args.value_size).await;
    }
    db
}

async fn scenario(args: &Args) -> Row {
    let db = fresh_db(args).await;

    // 1. The ceiling: the database to one plain consumer.
    let plain = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let watcher = plain_watcher(&db, plain.clone(), stop.clone(), args.plain_prev_kv).await;
    let recs = vec![plain.clone()];
    await_flow(&db, &recs).await;
    let (written, start, _) = write_phase(&db, args, &recs).await;
    drain(&recs, written).await;
    let ceiling = rate(&recs, start);
    let (plain_p50, plain_p99, plain_p999) = latencies(&recs);
    stop.cancel();
    let _ = watcher.await;
    drop(db);

    // 2. Through the bridge, a separate process, to N subscribers.
    let db = fresh_db(args).await;
    let zmq_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("bench.toml");
    std::fs::write(&cfg_path, bridge_config(&db, args.backend, zmq_port)).unwrap();
    let bridge = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .arg("--bridge-child")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = bridge.0.id();
    if let Some(cpu) = args.bridge_cpu {
        let pinned = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
            .stdout(Stdio::null())
            .status();
        assert!(
            pinned.is_ok_and(|s| s.success()),
            "taskset could not pin the bridge to CPU {cpu}"
        );
    }
    let pubsub = PubSub::new(subscriber_backend(&db, args.backend, zmq_port));
    let mut subs = Vec::new();
    let mut recorders = Vec::new();
    for _ in 0..args.subscribers {
        let sub = pubsub.get_subscriber();
        sub.register_topic("");
        let rec = Arc::new(Recorder::default());
        let r = rec.clone();
        sub.clone().daemonize(Box::new(move |u| {
            if let Some(v) = &u.value {
                r.record(v.as_bytes());
            }
        }));
        subs.push(sub);
        recorders.push(rec);
    }
    await_flow(&db, &recorders).await;
    let (cpu_before, _) = proc_usage(pid);
    let (written_b, start_b, max_lag) = write_phase(&db, args, &recorders).await;
    drain(&recorders, written_b).await;
    let (cpu_after, rss) = proc_usage(pid);
    let bridged = rate(&recorders, start_b);
    let (p50, p99, p999) = latencies(&recorders);
    let least = recorders
        .iter()
        .map(|r| r.delivered.load(Relaxed))
        .min()
        .unwrap_or(0);
    for s in &subs {
        s.stop();
    }
    drop(bridge);

    Row {
        path: format!("{:?}->{:?}", args.source, args.backend).to_lowercase(),
        subscribers: args.subscribers,
        writers: args.writers,
        target_rate: args.rate,
        keys_known: args.preload
            + if args.keys_per_writer > 0 {
                (args.writers * args.keys_per_writer) as u64
            } else {
                written_b
            } as usize,
        written: written_b,
        ceiling_per_s: ceiling,
        written_per_s: written_b as f64 / args.duration.as_secs_f64(),
        bridged_per_s: bridged,
        ratio: bridged / ceiling,
        keep_up: (bridged / (written_b as f64 / args.duration.as_secs_f64())).min(1.0),
        plain_p50_ms: plain_p50,
        plain_p99_ms: plain_p99,
        plain_p999_ms: plain_p999,
        bridged_p50_ms: p50,
        bridged_p99_ms: p99,
        bridged_p999_ms: p999,
        added_p99_ms: p99 - plain_p99,
        missing: written_b.saturating_sub(least),
        max_lag,
        bridge_cpu_ms_per_1k: (cpu_after - cpu_before) * 1000.0 / (written_b.max(1) as f64)
            * 1000.0,
        bridge_peak_rss_mb: rss,
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<12} {:>4} {:>5} {:>8} {:>7} {:>10} {:>10} {:>10} {:>6} {:>7} {:>22} {:>22} {:>9} {:>7} {:>7} {:>10} {:>8}",
        "path", "subs", "rate", "keys", "written", "ceiling/s", "written/s", "bridged/s", "ratio", "keep-up",
        "plain p50/p99/p999 ms", "bridged p50/p99/p999", "added p99", "missing", "max lag", "cpu ms/1k", "rss MB"
    );
    for r in rows {
        let rate = if r.target_rate == 0 {
            "max".to_string()
        } else {
            r.target_rate.to_string()
        };
        println!(
            "{:<12} {:>4} {:>5} {:>8} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>6.3} {:>7.3} {:>22} {:>22} {:>9.2} {:>7} {:>7} {:>10.1} {:>8.1}",
            r.path, r.subscribers, rate, r.keys_known, r.written, r.ceiling_per_s, r.written_per_s, r.bridged_per_s, r.ratio, r.keep_up,
            format!("{:.2}/{:.2}/{:.2}", r.plain_p50_ms, r.plain_p99_ms, r.plain_p999_ms),
            format!("{:.2}/{:.2}/{:.2}", r.bridged_p50_ms, r.bridged_p99_ms, r.bridged_p999_ms),
            r.added_p99_ms, r.missing, r.max_lag, r.bridge_cpu_ms_per_1k, r.bridge_peak_rss_mb
        );
    }
}

fn csv(rows: &[Row]) -> String {
    let mut out = String::from("path,subscribers,writers,target_rate,keys_known,written,ceiling_per_s,written_per_s,bridged_per_s,ratio,keep_up,plain_p50_ms,plain_p99_ms,plain_p999_ms,bridged_p50_ms,bridged_p99_ms,bridged_p999_ms,added_p99_ms,missing,max_lag,bridge_cpu_ms_per_1k,bridge_peak_rss_mb\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.4},{:.4},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{:.2},{:.1}\n",
            r.path, r.subscribers, r.writers, r.target_rate, r.keys_known, r.written, r.ceiling_per_s, r.written_per_s, r.bridged_per_s, r.ratio, r.keep_up,
            r.plain_p50_ms, r.plain_p99_ms, r.plain_p999_ms, r.bridged_p50_ms, r.bridged_p99_ms, r.bridged_p999_ms,
            r.added_p99_ms, r.missing, r.max_lag, r.bridge_cpu_ms_per_1k, r.bridge_peak_rss_mb
        ));
    }
    out
}

fn scenarios(args: &Args) -> Vec<Args> {
    let with = |source, backend, subscribers, rate, preload, duration: Duration| Args {
        source,
        backend,
        subscribers,
        rate,
        preload,
        duration,
        ..args.clone()
    };
    if args.smoke {
        let d = Duration::from_secs(1);
        return vec![
            with(Source::Etcd, Backend::Zmq, 1, 0, 0, d),
            with(Source::Redis, Backend::Zmq, 1, 0, 0, d),
            with(Source::Redis, Backend::Redis, 1, 0, 0, d),
            with(Source::Etcd, Backend::Etcd, 1, 0, 0, d),
        ];
    }
    if args.matrix {
        let d = args.duration;
        return vec![
            with(Source::Etcd, Backend::Zmq, 1, 0, 0, d),
            with(Source::Redis, Backend::Zmq, 1, 0, 0, d),
            with(Source::Redis, Backend::Redis, 1, 0, 0, d),
            with(Source::Etcd, Backend::Etcd, 1, 0, 0, d),
            with(Source::Etcd, Backend::Zmq, 10, 0, 0, d),
            with(Source::Redis, Backend::Zmq, 10, 0, 0, d),
            with(Source::Etcd, Backend::Zmq, 50, 0, 0, d),
            with(Source::Redis, Backend::Zmq, 50, 5000, 0, d),
            with(Source::Redis, Backend::Zmq, 1, 5000, 0, d),
            with(Source::Etcd, Backend::Zmq, 1, 0, 100_000, d),
            with(Source::Redis, Backend::Zmq, 1, 0, 100_000, d),
        ];
    }
    vec![args.clone()]
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(spec) = &args.writer_child {
        writer_child(spec, &args, &runtime);
        return;
    }
    if args.pin {
        // this process (subscribers, plain watcher) and the bridge it spawns
        pin(std::process::id(), 1);
    }
    if let Some(cfg) = &args.bridge_child {
        // The bridge under test, in its own process.
        let config = Config::load(cfg).unwrap_or_else(|e| panic!("{e}"));
        let stats = Arc::new(feedbridge::stats::Stats::default());
        runtime
            .block_on(feedbridge::bridge::run(
                config,
                CancellationToken::new(),
                stats,
            ))
            .unwrap();
        return;
    }
    let rows: Vec<Row> = runtime.block_on(async {
        let mut rows = Vec::new();
        for sc in scenarios(&args) {
            eprintln!(
                "running {:?}->{:?} with {} subscriber(s), rate {}, {} preloaded keys, {:?}...",
                sc.source, sc.backend, sc.subscribers, sc.rate, sc.preload, sc.duration
            );
            rows.push(scenario(&sc).await);
        }
        rows
    });
    print_table(&rows);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
    if let Some(p) = &args.csv {
        std::fs::write(p, csv(&rows)).unwrap();
    }
}
