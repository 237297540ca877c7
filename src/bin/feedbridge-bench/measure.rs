//! Measurement: latency percentiles (from the send times the values carry),
//! delivered rates, the plain watcher that gives the database's ceiling,
//! and the bridge process's CPU time and peak RSS from /proc.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use feedbridge::codec::Codec;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::servers::{Db, Target};
use crate::values::{now_nanos, sent_at, value};

/// What one receiver saw.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) delivered: AtomicU64,
    pub(crate) latencies_ns: Mutex<Vec<u64>>,
    pub(crate) last_at: Mutex<Option<Instant>>,
}

impl Recorder {
    pub(crate) fn record(&self, value: &[u8]) {
        if let Some(t) = sent_at(value) {
            let lat = now_nanos().saturating_sub(t);
            self.latencies_ns.lock().unwrap().push(lat);
            *self.last_at.lock().unwrap() = Some(Instant::now());
            self.delivered.fetch_add(1, Relaxed);
        }
    }
}

/// What the slowest of `recorders` has received.
pub(crate) fn least_delivered(recorders: &[Arc<Recorder>]) -> u64 {
    recorders
        .iter()
        .map(|r| r.delivered.load(Relaxed))
        .min()
        .unwrap_or(0)
}

/// A raw SUB socket on its own thread, recording every bench value: the
/// second frame is a msgpack `DbUpdate` (`msgpack`) or the value itself.
pub(crate) fn raw_subscriber(
    address: String,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    msgpack: bool,
) {
    std::thread::spawn(move || {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::SUB).unwrap();
        socket.set_rcvhwm(100_000).unwrap();
        socket.set_subscribe(b"").unwrap();
        socket.connect(&address).unwrap();
        while !stop.load(Relaxed) {
            if socket.poll(zmq::POLLIN, 100).unwrap_or(0) == 0 {
                continue;
            }
            while let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) {
                let Some(payload) = frames.get(1) else {
                    continue;
                };
                if !msgpack {
                    rec.record(payload);
                } else if let Ok((update, _)) = Codec::Msgpack.decode(payload) {
                    if let Some(v) = &update.value {
                        rec.record(v.as_bytes());
                    }
                }
            }
        }
    });
}

/// The `p` quantile of sorted nanoseconds, in milliseconds.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

/// p50 / p99 / p99.9 over every recorder, in milliseconds.
pub(crate) fn latencies(recorders: &[Arc<Recorder>]) -> (f64, f64, f64) {
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

/// Waits until every recorder has `n` deliveries, or 20 s of no progress.
pub(crate) async fn drain(recorders: &[Arc<Recorder>], n: u64) {
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

/// Deliveries per second of the slowest recorder since `start`.
pub(crate) fn rate(recorders: &[Arc<Recorder>], start: Instant) -> f64 {
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

/// What the plain consumer does with each value it receives.
pub(crate) type Sink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// The database's own delivery to one plain consumer.
pub(crate) async fn plain_watcher(
    target: &Target,
    rec: Sink,
    stop: CancellationToken,
    prev_kv: bool,
) -> tokio::task::JoinHandle<()> {
    match target {
        Target::Etcd(url) => {
            let mut client = etcd_client::Client::connect([url], None).await.unwrap();
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
                            rec(kv.value());
                        }
                    }
                }
            })
        }
        Target::Redis(url) | Target::RedisCluster(url) => {
            // Notifications carry no value: read it, pipelined per batch,
            // as any keyspace consumer (and the bridge) must. On a cluster
            // every master tells of its own keys.
            let client = redis::Client::open(url.as_str()).unwrap();
            let timeout = Duration::from_secs(5);
            let mut conn = feedbridge::db::redis::connect(&client, timeout)
                .await
                .unwrap();
            let addr = feedbridge::db::redis::addr_of(&client);
            let nodes = feedbridge::db::redis::nodes(&mut conn, &addr)
                .await
                .unwrap();
            let mut streams = Vec::new();
            for node in nodes.iter().filter(|n| n.master) {
                let node_client = if conn.is_cluster() {
                    feedbridge::db::redis::node_client(&client, &node.addr).unwrap()
                } else {
                    client.clone()
                };
                let mut direct = feedbridge::db::redis::connect_node(&node_client, timeout)
                    .await
                    .unwrap();
                redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("notify-keyspace-events")
                    .arg("KA")
                    .query_async::<()>(&mut direct)
                    .await
                    .unwrap();
                let mut pubsub = node_client.get_async_pubsub().await.unwrap();
                pubsub.psubscribe("__keyspace@0__:{bench.*").await.unwrap();
                streams.push(pubsub.into_on_message());
            }
            let mut messages = futures_util::stream::select_all(streams);
            tokio::spawn(async move {
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
                    let values: Vec<Option<Vec<u8>>> = if conn.is_cluster() {
                        let gets = keys.iter().map(|k| {
                            let mut c = conn.clone();
                            async move {
                                redis::cmd("GET")
                                    .arg(k)
                                    .query_async(&mut c)
                                    .await
                                    .ok()
                                    .flatten()
                            }
                        });
                        futures_util::future::join_all(gets).await
                    } else {
                        let mut pipe = redis::pipe();
                        for k in &keys {
                            pipe.cmd("GET").arg(k);
                        }
                        pipe.query_async(&mut conn).await.unwrap_or_default()
                    };
                    for v in values.into_iter().flatten() {
                        rec(&v);
                    }
                }
            })
        }
    }
}

/// Writes probe values until every recorder saw one (subscriptions are up).
pub(crate) async fn await_flow(db: &Db, recorders: &[Arc<Recorder>]) {
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

/// CPU time of every thread of `pid` alive now, in nanoseconds (from
/// /proc schedstat: the clock ticks of /proc stat are 10 ms, too coarse
/// for a few seconds at 100 changes a second).
pub(crate) fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU seconds (user + system) and peak RSS (MB) of a process.
pub(crate) fn proc_usage(pid: u32) -> (f64, f64) {
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
