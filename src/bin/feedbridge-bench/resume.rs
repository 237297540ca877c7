//! `--resume N`: what a bridge restart costs N subscribers that stay up.
//! With positions, each verifies the new run against what it had and goes
//! on (no re-read); without, each would re-read the whole table. The same
//! run measures both: the restart with N resuming subscribers, then N full
//! reads of the `--preload` keys, as N re-syncing subscribers would do.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feedbridge::backend::PubSub;
use feedbridge::testing::free_port;
use feedbridge::Action;

use crate::args::{Args, Backend, Source};
use crate::measure::proc_usage;
use crate::scenario::{bridge_config, subscriber_backend};
use crate::servers::{fresh_db, Db, KillOnDrop};

/// What one resume run measured.
pub(crate) struct ResumeRow {
    subscribers: usize,
    keys: usize,
    /// Syncs the subscribers delivered after the restart (re-reads).
    syncs: u64,
    /// From the restart until every subscriber had an update of the new run.
    resumed_in: Duration,
    /// etcd's CPU over that time.
    etcd_cpu_ms: f64,
    /// N full reads of the table, one per subscriber, as after a `sync`.
    reread_in: Duration,
    reread_etcd_cpu_ms: f64,
    reread_mb: f64,
}

fn spawn_bridge(config: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .arg("--bridge-child")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// Restarts the bridge (SIGTERM, start again) under N subscribers, then
/// re-reads the table N times.
pub(crate) async fn resume(args: &Args, subscribers: usize) -> ResumeRow {
    let args = Args {
        source: Source::Etcd,
        backend: Backend::Zmq,
        ..args.clone()
    };
    let db = fresh_db(&args).await;
    let Db::Etcd(etcd) = &db else {
        unreachable!("an etcd source")
    };
    let etcd_pid = etcd.pid().expect("etcd runs");
    let zmq_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bench.toml");
    std::fs::write(&config, bridge_config(&db, &args, zmq_port)).unwrap();
    let mut bridge = spawn_bridge(&config);
    let pubsub = PubSub::new(subscriber_backend(&db, Backend::Zmq, zmq_port));
    let syncs = Arc::new(AtomicU64::new(0));
    // The highest probe number each subscriber has seen.
    let seen: Vec<Arc<AtomicU64>> = (0..subscribers).map(|_| Arc::default()).collect();
    let mut subs = Vec::new();
    for seen in &seen {
        let sub = pubsub.get_subscriber();
        sub.register_topic("");
        let (syncs, seen) = (syncs.clone(), seen.clone());
        sub.clone().daemonize(Box::new(move |u| {
            if u.action == Action::Sync {
                syncs.fetch_add(1, Relaxed);
            } else if let Some(n) = u.key.strip_prefix("resume-") {
                seen.fetch_max(n.parse().unwrap_or(0), Relaxed);
            }
        }));
        subs.push(sub);
    }
    let mut kv = etcd.client().await;
    let mut probe = 0u64;
    everyone_sees(&seen, 1, &mut probe, &mut kv).await;
    // Heartbeats give every subscriber its position.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let syncs_before = syncs.load(Relaxed);

    // A graceful restart, as in a rolling upgrade.
    let (etcd_cpu_before, _) = proc_usage(etcd_pid);
    let start = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &bridge.0.id().to_string()])
        .status();
    let _ = bridge.0.wait();
    bridge = spawn_bridge(&config);
    let after_restart = probe + 1;
    everyone_sees(&seen, after_restart, &mut probe, &mut kv).await;
    let resumed_in = start.elapsed();
    let (etcd_cpu_after, _) = proc_usage(etcd_pid);
    // A late verdict comes with the new run's first heartbeats.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restart_syncs = syncs.load(Relaxed) - syncs_before;
    for s in &subs {
        s.stop();
    }
    drop(bridge);

    // What N re-syncing subscribers would do instead: read the table.
    let (cpu_before, _) = proc_usage(etcd_pid);
    let start = Instant::now();
    let mut bytes = 0usize;
    let reads = (0..subscribers).map(|_| {
        // A whole table can pass gRPC's default 4 MiB.
        let mut kv = feedbridge::db::etcd::kv_client(&kv);
        async move {
            let opts = etcd_client::GetOptions::new().with_prefix();
            let resp = kv
                .get("/bench/", Some(opts.with_limit(0).with_serializable()))
                .await
                .unwrap();
            resp.kvs()
                .iter()
                .map(|kv| kv.key().len() + kv.value().len())
                .sum::<usize>()
        }
    });
    for n in futures_util::future::join_all(reads).await {
        bytes += n;
    }
    let reread_in = start.elapsed();
    let (cpu_after, _) = proc_usage(etcd_pid);
    ResumeRow {
        subscribers,
        keys: args.preload,
        syncs: restart_syncs,
        resumed_in,
        etcd_cpu_ms: (etcd_cpu_after - etcd_cpu_before) * 1000.0,
        reread_in,
        reread_etcd_cpu_ms: (cpu_after - cpu_before) * 1000.0,
        reread_mb: bytes as f64 / 1_048_576.0,
    }
}

/// Writes probes until every subscriber has one numbered `from` or more.
async fn everyone_sees(
    seen: &[Arc<AtomicU64>],
    from: u64,
    probe: &mut u64,
    kv: &mut etcd_client::Client,
) {
    let start = Instant::now();
    loop {
        *probe += 1;
        // Under the bridge's prefix (`/bench/`), apart from the preload.
        kv.put(format!("/bench/resume-{probe}"), "x", None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if seen.iter().all(|s| s.load(Relaxed) >= from) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not every subscriber received an update"
        );
    }
}

/// Prints resume runs as a table.
pub(crate) fn print(rows: &[ResumeRow]) {
    println!(
        "{:>5} {:>7} {:>6} {:>11} {:>13} | {:>14} {:>16} {:>9}",
        "subs",
        "keys",
        "syncs",
        "resumed in",
        "etcd cpu ms",
        "re-read in",
        "etcd cpu ms",
        "read MB"
    );
    for r in rows {
        println!(
            "{:>5} {:>7} {:>6} {:>11} {:>13.0} | {:>14} {:>16.0} {:>9.1}",
            r.subscribers,
            r.keys,
            r.syncs,
            format!("{:.2} s", r.resumed_in.as_secs_f64()),
            r.etcd_cpu_ms,
            format!("{:.2} s", r.reread_in.as_secs_f64()),
            r.reread_etcd_cpu_ms,
            r.reread_mb,
        );
    }
}
