//! One scenario: the database's ceiling with a plain watcher, then the same
//! load through the bridge (a child process) to N subscribers.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{BackendConfig, EtcdBackendConfig, RedisBackendConfig, ZmqBackendConfig};
use feedbridge::pubsub::Subscriber;
use feedbridge::testing::free_port;

use crate::args::{Args, Backend};
use crate::measure::{
    await_flow, cpu_ns, drain, latencies, least_delivered, proc_usage, rate, raw_subscriber,
    Recorder,
};
use crate::remote::{Remote, Report};
use crate::report::Row;
use crate::servers::{fresh_db, write_phase, Db, KillOnDrop, Target};

/// The bridge's config for the database under test and `backend`.
pub(crate) fn bridge_config(db: &Db, args: &Args, zmq_port: u16) -> String {
    let backend = args.backend;
    let source = match db {
        Db::Etcd(e) => format!(
            "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"/bench/\"\n",
            e.endpoint()
        ),
        Db::Redis(_) | Db::RedisCluster(_) => format!(
            "[source]\ntype = \"redis\"\nurl = \"{}\"\n",
            db.redis_url().expect("a Redis")
        ),
    };
    let backend = match (backend, db) {
        (Backend::Zmq, _) => {
            let hwm = args
                .send_hwm
                .map(|n| format!("send_hwm = {n}\n"))
                .unwrap_or_default();
            format!("[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{zmq_port}\"\n{hwm}")
        }
        (Backend::Redis, Db::Redis(_) | Db::RedisCluster(_)) => format!(
            "[backend]\ntype = \"redis\"\nurl = \"{}\"\n",
            db.redis_url().expect("a Redis")
        ),
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

/// The subscribers' side of `backend`.
pub(crate) fn subscriber_backend(db: &Db, backend: Backend, zmq_port: u16) -> BackendConfig {
    match (backend, db) {
        (Backend::Zmq, _) => zmq_subscribers(format!("tcp://127.0.0.1:{zmq_port}")),
        (Backend::Redis, Db::Redis(_) | Db::RedisCluster(_)) => {
            BackendConfig::Redis(RedisBackendConfig {
                silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
                url: db.redis_url().expect("a Redis"),
                codec: Codec::Msgpack,
                connect_timeout: Duration::from_secs(5),
                sharded: false,
                auth: Default::default(),
            })
        }
        (Backend::Etcd, Db::Etcd(e)) => BackendConfig::Etcd(EtcdBackendConfig {
            silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
            endpoints: vec![e.endpoint()],
            prefix: "/pubsub/".into(),
            codec: Codec::Msgpack,
            connect_timeout: Duration::from_secs(5),
            auth: Default::default(),
        }),
        _ => unreachable!("checked in bridge_config"),
    }
}

/// Subscribers of the ZeroMQ publisher at `endpoint`.
fn zmq_subscribers(endpoint: String) -> BackendConfig {
    BackendConfig::Zmq(ZmqBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        bind: endpoint,
        codec: Codec::Msgpack,
        send_hwm: 10_000,
        linger: Duration::ZERO,
        rejoin_wait: Duration::ZERO,
    })
}

/// `n` subscribers of every topic of `pubsub`, each recording what it
/// receives.
fn subscribe(pubsub: &PubSub, n: usize) -> (Vec<Arc<dyn Subscriber>>, Vec<Arc<Recorder>>) {
    let mut subs = Vec::new();
    let mut recorders = Vec::new();
    for _ in 0..n {
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
    (subs, recorders)
}

/// `--subscriber-child ENDPOINT,COUNT`: COUNT subscribers of the ZeroMQ
/// publisher at ENDPOINT in this process, served to the harness (see
/// [`crate::remote`]).
pub(crate) fn subscriber_child(spec: &str, runtime: &tokio::runtime::Runtime) {
    let (endpoint, count) = spec
        .rsplit_once(',')
        .expect("--subscriber-child takes ENDPOINT,COUNT");
    let count: usize = count.parse().expect("a number of subscribers");
    runtime.block_on(async {
        let pubsub = PubSub::new(zmq_subscribers(endpoint.to_owned()));
        let (subs, recorders) = subscribe(&pubsub, count);
        tokio::task::spawn_blocking(move || crate::remote::serve(recorders))
            .await
            .unwrap();
        for s in &subs {
            s.stop();
        }
    });
}

/// This binary as a child process in `mode` (`--plain-child`, ...).
fn child(mode: &str, spec: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([mode, spec]);
    cmd
}

/// The plain consumer of `db` as a child process (`--plain-prev-kv`
/// passed on).
fn plain_child(db: &Db, args: &Args) -> Command {
    let mut cmd = child("--plain-child", &Target::of(db).spec());
    if args.plain_prev_kv {
        cmd.arg("--plain-prev-kv");
    }
    cmd
}

/// Where the subscribers of a scenario run.
enum Subscribers {
    /// In this process.
    Here(Vec<Arc<dyn Subscriber>>, Vec<Arc<Recorder>>),
    /// In child processes.
    Children(Vec<Remote>),
}

impl Subscribers {
    fn recorders(&self) -> Vec<Arc<Recorder>> {
        match self {
            Subscribers::Here(_, recs) => recs.clone(),
            Subscribers::Children(children) => children.iter().map(Remote::mirror).collect(),
        }
    }

    fn reset(&mut self) {
        if let Subscribers::Children(children) = self {
            children.iter_mut().for_each(Remote::reset);
        }
    }

    /// p50 / p99 / p99.9 over every subscriber (with children: the highest
    /// of the children's, each over its own subscribers), and the p99 of
    /// the slowest subscriber.
    fn latencies(&mut self) -> Report {
        match self {
            Subscribers::Here(_, recs) => {
                let (p50, p99, p999) = latencies(recs);
                let worst_p99 = recs
                    .iter()
                    .map(|r| latencies(std::slice::from_ref(r)).1)
                    .fold(0.0, f64::max);
                Report {
                    p50,
                    p99,
                    p999,
                    worst_p99,
                }
            }
            Subscribers::Children(children) => children.iter_mut().map(Remote::report).fold(
                Report {
                    p50: 0.0,
                    p99: 0.0,
                    p999: 0.0,
                    worst_p99: 0.0,
                },
                |a, b| Report {
                    p50: a.p50.max(b.p50),
                    p99: a.p99.max(b.p99),
                    p999: a.p999.max(b.p999),
                    worst_p99: a.worst_p99.max(b.worst_p99),
                },
            ),
        }
    }

    fn stop(self) {
        if let Subscribers::Here(subs, _) = self {
            for s in &subs {
                s.stop();
            }
        }
    }
}

/// The CPU per change (µs) of a minimal forwarder to ZeroMQ: on a fresh
/// database of the same size, the plain consumer sends each value on a
/// libzmq PUB socket, read by a raw subscriber here.
async fn forwarder_floor(args: &Args) -> f64 {
    let db = fresh_db(args).await;
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let mut cmd = plain_child(&db, args);
    cmd.args(["--plain-forward", &endpoint]);
    let forwarder = Remote::spawn(cmd);
    let rec = Arc::new(Recorder::default());
    let stop = Arc::new(AtomicBool::new(false));
    raw_subscriber(endpoint, rec.clone(), stop.clone(), false);
    let recs = vec![rec];
    await_flow(&db, &recs).await;
    let before = cpu_ns(forwarder.pid());
    let (written, _, _) = write_phase(&db, args, || least_delivered(&recs)).await;
    drain(&recs, written).await;
    let ns = cpu_ns(forwarder.pid()).saturating_sub(before);
    stop.store(true, Relaxed);
    ns as f64 / 1000.0 / written.max(1) as f64
}

/// Runs one scenario: the ceiling phase, then the bridged phase.
pub(crate) async fn scenario(args: &Args) -> Row {
    let db = fresh_db(args).await;

    // 1. The ceiling: the database to one plain consumer, in a process of
    // its own, whose CPU per change is the floor of the bridge's.
    let mut plain = Remote::spawn(plain_child(&db, args));
    let recs = vec![plain.mirror()];
    await_flow(&db, &recs).await;
    plain.reset();
    let floor_before = cpu_ns(plain.pid());
    let (written, start, _) = write_phase(&db, args, || least_delivered(&recs)).await;
    drain(&recs, written).await;
    let floor_ns = cpu_ns(plain.pid()).saturating_sub(floor_before);
    let ceiling = rate(&recs, start);
    let plain_lat = plain.report();
    drop(plain);
    drop(db);

    // 1b. With `--forwarder-floor`: the plain consumer that also hands each
    // value to libzmq, nothing else.
    let forwarder_us = if args.forwarder_floor {
        forwarder_floor(args).await
    } else {
        0.0
    };

    // 2. Through the bridge, a separate process, to N subscribers.
    let db = fresh_db(args).await;
    let zmq_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("bench.toml");
    std::fs::write(&cfg_path, bridge_config(&db, args, zmq_port)).unwrap();
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
    let processes = args.subscriber_processes.unwrap_or(0).min(args.subscribers);
    let mut subscribers = if processes > 0 {
        assert!(
            args.backend == Backend::Zmq,
            "subscribers run in processes of their own only on ZeroMQ"
        );
        let endpoint = format!("tcp://127.0.0.1:{zmq_port}");
        Subscribers::Children(
            (0..processes)
                .map(|i| {
                    // The subscribers spread evenly, the first ones one more.
                    let n = args.subscribers / processes
                        + usize::from(i < args.subscribers % processes);
                    Remote::spawn(child("--subscriber-child", &format!("{endpoint},{n}")))
                })
                .collect(),
        )
    } else {
        let pubsub = PubSub::new(subscriber_backend(&db, args.backend, zmq_port));
        let (subs, recs) = subscribe(&pubsub, args.subscribers);
        Subscribers::Here(subs, recs)
    };
    let recorders = subscribers.recorders();
    await_flow(&db, &recorders).await;
    subscribers.reset();
    let cpu_before = cpu_ns(pid);
    let (written_b, start_b, max_lag) =
        write_phase(&db, args, || least_delivered(&recorders)).await;
    drain(&recorders, written_b).await;
    let bridge_ns = cpu_ns(pid).saturating_sub(cpu_before);
    let (_, rss) = proc_usage(pid);
    let bridged = rate(&recorders, start_b);
    let lat = subscribers.latencies();
    let least = least_delivered(&recorders);
    subscribers.stop();
    drop(bridge);
    let bridge_us_per_change = bridge_ns as f64 / 1000.0 / written_b.max(1) as f64;
    let floor_us_per_change = floor_ns as f64 / 1000.0 / written.max(1) as f64;

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
        plain_p50_ms: plain_lat.p50,
        plain_p99_ms: plain_lat.p99,
        plain_p999_ms: plain_lat.p999,
        bridged_p50_ms: lat.p50,
        bridged_p99_ms: lat.p99,
        bridged_p999_ms: lat.p999,
        added_p99_ms: lat.p99 - plain_lat.p99,
        missing: written_b.saturating_sub(least),
        max_lag,
        bridge_cpu_ms_per_1k: bridge_us_per_change,
        bridge_peak_rss_mb: rss,
        floor_cpu_us_per_change: floor_us_per_change,
        ratio_to_floor: bridge_us_per_change / floor_us_per_change,
        forwarder_cpu_us_per_change: forwarder_us,
        ratio_to_forwarder: if forwarder_us > 0.0 {
            bridge_us_per_change / forwarder_us
        } else {
            0.0
        },
        subscriber_processes: processes,
        slowest_p99_ms: lat.worst_p99,
        bridge_cpu_us_per_delivery: bridge_us_per_change / args.subscribers.max(1) as f64,
    }
}
