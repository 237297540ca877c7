//! One scenario: the database's ceiling with a plain watcher, then the same
//! load through the bridge (a child process) to N subscribers.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{BackendConfig, EtcdBackendConfig, RedisBackendConfig, ZmqBackendConfig};
use feedbridge::testing::free_port;
use tokio_util::sync::CancellationToken;

use crate::args::{Args, Backend};
use crate::measure::{
    await_flow, drain, latencies, least_delivered, plain_watcher, proc_usage, rate, Recorder,
};
use crate::report::Row;
use crate::servers::{fresh_db, write_phase, Db, KillOnDrop};

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
        (Backend::Zmq, _) => BackendConfig::Zmq(ZmqBackendConfig {
            silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
            bind: format!("tcp://127.0.0.1:{zmq_port}"),
            codec: Codec::Msgpack,
            send_hwm: 10_000,
            linger: Duration::ZERO,
            rejoin_wait: Duration::ZERO,
        }),
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

/// Runs one scenario: the ceiling phase, then the bridged phase.
pub(crate) async fn scenario(args: &Args) -> Row {
    let db = fresh_db(args).await;

    // 1. The ceiling: the database to one plain consumer.
    let plain = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let watcher = plain_watcher(&db, plain.clone(), stop.clone(), args.plain_prev_kv).await;
    let recs = vec![plain.clone()];
    await_flow(&db, &recs).await;
    let (written, start, _) = write_phase(&db, args, || least_delivered(&recs)).await;
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
    let (written_b, start_b, max_lag) =
        write_phase(&db, args, || least_delivered(&recorders)).await;
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
