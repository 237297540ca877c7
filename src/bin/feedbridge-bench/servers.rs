//! The databases under test (started fresh per phase), the writers that
//! load them (in a child process when pinned), and CPU pinning.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feedbridge::testing::{EtcdServer, RedisCluster, RedisServer};

use crate::args::{Args, Source};
use crate::values::{value, value_on};

/// The database under test.
pub(crate) enum Db {
    Etcd(EtcdServer),
    Redis(RedisServer),
    RedisCluster(RedisCluster),
}

/// A Redis key of the benchmark: on a cluster spread over 16 hash tags
/// (so over every master), else under one.
pub(crate) fn redis_key(name: &str, cluster: bool) -> String {
    if cluster {
        let tag = name
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
            % 16;
        format!("{{bench.t{tag}}}{name}")
    } else {
        format!("{{bench.}}{name}")
    }
}

impl Db {
    pub(crate) async fn start(source: Source) -> Db {
        match source {
            Source::Etcd => Db::Etcd(EtcdServer::start().await),
            // No AOF fsync per write: a benchmark of the bridge, not the disk.
            Source::Redis => Db::Redis(RedisServer::start_with(&["appendonly no"]).await),
            Source::RedisCluster => Db::RedisCluster(RedisCluster::start(3, 0).await),
        }
    }

    /// A URL of the database (a seed node for a cluster).
    pub(crate) fn redis_url(&self) -> Option<String> {
        match self {
            Db::Etcd(_) => None,
            Db::Redis(r) => Some(r.url()),
            Db::RedisCluster(c) => Some(c.url()),
        }
    }

    /// The database's processes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        match self {
            Db::Etcd(e) => e.pid().into_iter().collect(),
            Db::Redis(r) => r.pid().into_iter().collect(),
            Db::RedisCluster(c) => c.nodes.iter().filter_map(|n| n.pid()).collect(),
        }
    }

    pub(crate) fn key(&self, name: &str) -> String {
        match self {
            Db::Etcd(_) => format!("/bench/{name}"),
            Db::Redis(_) => redis_key(name, false),
            Db::RedisCluster(_) => redis_key(name, true),
        }
    }

    pub(crate) async fn writer(&self) -> Writer {
        Target::of(self).writer().await
    }
}

/// A connection that writes the load.
pub(crate) enum Writer {
    Etcd(Box<etcd_client::Client>),
    Redis(feedbridge::db::redis::Conn),
}

impl Writer {
    pub(crate) async fn put(&mut self, key: String, value: String) {
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

/// Writes `n` keys of `size` bytes before a phase.
pub(crate) async fn preload(db: &Db, n: usize, size: usize) {
    let mut w = db.writer().await;
    for i in 0..n {
        w.put(db.key(&format!("pre{i}")), value(size)).await;
    }
}

/// Where writers write: enough to connect from another process too.
#[derive(Clone)]
pub(crate) enum Target {
    Etcd(String),
    Redis(String),
    RedisCluster(String),
}

impl Target {
    pub(crate) fn of(db: &Db) -> Target {
        match db {
            Db::Etcd(e) => Target::Etcd(e.endpoint()),
            Db::Redis(r) => Target::Redis(r.url()),
            Db::RedisCluster(c) => Target::RedisCluster(c.url()),
        }
    }

    pub(crate) fn parse(spec: &str) -> Target {
        match spec.split_once(':') {
            Some(("etcd", url)) => Target::Etcd(url.to_owned()),
            Some(("redis", url)) => Target::Redis(url.to_owned()),
            Some(("redis-cluster", url)) => Target::RedisCluster(url.to_owned()),
            _ => panic!("--writer-child takes etcd:URL or redis:URL, not {spec}"),
        }
    }

    pub(crate) fn spec(&self) -> String {
        match self {
            Target::Etcd(u) => format!("etcd:{u}"),
            Target::Redis(u) => format!("redis:{u}"),
            Target::RedisCluster(u) => format!("redis-cluster:{u}"),
        }
    }

    pub(crate) fn key(&self, name: &str) -> String {
        match self {
            Target::Etcd(_) => format!("/bench/{name}"),
            Target::Redis(_) => redis_key(name, false),
            Target::RedisCluster(_) => redis_key(name, true),
        }
    }

    pub(crate) async fn writer(&self) -> Writer {
        match self {
            Target::Etcd(url) => Writer::Etcd(Box::new(
                etcd_client::Client::connect([url], None).await.unwrap(),
            )),
            Target::Redis(url) | Target::RedisCluster(url) => Writer::Redis(
                feedbridge::db::redis::connect(
                    &redis::Client::open(url.as_str()).unwrap(),
                    Duration::from_secs(5),
                )
                .await
                .unwrap(),
            ),
        }
    }
}

/// Runs the writers for `args.duration`, counting acknowledged writes.
pub(crate) async fn run_writers(target: &Target, args: &Args, written: Arc<AtomicU64>) {
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
        let topics = args.topics;
        let target = target.clone();
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
                writer
                    .put(
                        target.key(&format!("w{w}-{n}")),
                        value_on(size, (topics > 0).then(|| i % topics)),
                    )
                    .await;
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
/// sampled every 250 ms (`least_delivered`: what the slowest receiver has).
pub(crate) async fn write_phase(
    db: &Db,
    args: &Args,
    least_delivered: impl Fn() -> u64,
) -> (u64, Instant, u64) {
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
                .args(["--topics", &args.topics.to_string()])
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
        let least = least_delivered();
        max_lag = max_lag.max(written.load(Relaxed).saturating_sub(least));
    }
    writing.await.unwrap();
    (written.load(Relaxed), start, max_lag)
}

/// `--writer-child`: writes, reporting the count every 100 ms on stdout.
pub(crate) fn writer_child(spec: &str, args: &Args, runtime: &tokio::runtime::Runtime) {
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
pub(crate) fn pin(pid: u32, cpu: usize) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "taskset could not pin {pid} to CPU {cpu}"
    );
}

/// A child process killed when dropped.
pub(crate) struct KillOnDrop(pub(crate) Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh database for one phase (pinned, preloaded), so both phases
/// write to a database of the same size and history.
pub(crate) async fn fresh_db(args: &Args) -> Db {
    let db = Db::start(args.source).await;
    if args.pin {
        for pid in db.pids() {
            pin(pid, 0);
        }
    }
    if args.preload > 0 {
        preload(&db, args.preload, args.value_size).await;
    }
    db
}
