//! `--service RATES`: the publisher service (multiproc channel → ZeroMQ)
//! at fixed rates, beside its floor measured in the same run: a minimal
//! forwarder on libzmq (`zmq_proxy` from a PULL to a PUB socket) in a
//! process of its own, fed by the same pusher and read by the same
//! subscribers. Both are measured alike: the forwarding process's CPU
//! time (every thread's, from /proc schedstat, in nanoseconds) per
//! message, and the latency push → subscriber.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feedbridge::codec::Codec;
use feedbridge::testing::free_port;
use feedbridge::{Action, DbUpdate};
use serde::{Deserialize, Serialize};

use crate::args::Args;
use crate::measure::{cpu_ns, latencies, least_delivered, raw_subscriber, Recorder};
use crate::servers::KillOnDrop;
use crate::values::value;

/// One point: the service and its floor at one rate.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct ServiceRow {
    pub(crate) rate: u64,
    pub(crate) subscribers: usize,
    pub(crate) sent: u64,
    /// Messages the slowest subscriber of the service missed.
    pub(crate) missing: u64,
    pub(crate) service_cpu_us_per_msg: f64,
    pub(crate) floor_cpu_us_per_msg: f64,
    /// Service CPU per message over the floor's.
    pub(crate) ratio_to_floor: f64,
    pub(crate) service_p99_ms: f64,
    pub(crate) floor_p99_ms: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Forwarder {
    Service,
    Proxy,
}

/// What one forwarder did at one rate.
struct Point {
    sent: u64,
    missing: u64,
    cpu_us_per_msg: f64,
    p99_ms: f64,
}

/// `--proxy-child PULL_ENDPOINT,PUB_ENDPOINT`: the floor, as a process.
pub(crate) fn proxy_child(spec: &str) {
    let (pull_at, pub_at) = spec.split_once(',').expect("PULL,PUB endpoints");
    let context = zmq::Context::new();
    let pull = context.socket(zmq::PULL).unwrap();
    pull.bind(pull_at).unwrap();
    let publisher = context.socket(zmq::PUB).unwrap();
    publisher.set_sndhwm(10_000).unwrap();
    publisher.bind(pub_at).unwrap();
    zmq::proxy(&pull, &publisher).unwrap();
}

fn message(i: u64) -> Vec<Vec<u8>> {
    let update = DbUpdate::new(
        "bench",
        format!("k{}", i % 1000),
        Action::Set,
        Some(value(200)),
    );
    vec![
        b"bench".to_vec(),
        Codec::Msgpack.encode(&update, &Default::default()),
    ]
}

/// Runs `forwarder` at `rate` messages a second for `duration` to
/// `subscribers` subscribers.
fn point(forwarder: Forwarder, rate: u64, duration: Duration, subscribers: usize) -> Point {
    let dir = tempfile::tempdir().unwrap();
    let ipc = format!("ipc://{}", dir.path().join("multiproc.sock").display());
    let port = free_port();
    let tcp = format!("tcp://127.0.0.1:{port}");
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    match forwarder {
        Forwarder::Service => {
            let config = dir.path().join("service.toml");
            std::fs::write(
                &config,
                format!(
                    "[multiproc]\nsocket = \"{}\"\ncodec = \"msgpack\"\n[backend]\ntype = \"zmq\"\nbind = \"{tcp}\"\n",
                    &ipc["ipc://".len()..]
                ),
            )
            .unwrap();
            cmd.arg("--bridge-child").arg(config);
        }
        Forwarder::Proxy => {
            cmd.arg("--proxy-child").arg(format!("{ipc},{tcp}"));
        }
    }
    let child = KillOnDrop(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let stop = Arc::new(AtomicBool::new(false));
    let recorders: Vec<Arc<Recorder>> = (0..subscribers)
        .map(|_| Arc::new(Recorder::default()))
        .collect();
    for rec in &recorders {
        raw_subscriber(tcp.clone(), rec.clone(), stop.clone(), true);
    }
    let context = zmq::Context::new();
    let push = context.socket(zmq::PUSH).unwrap();
    push.set_sndhwm(100_000).unwrap();
    push.connect(&ipc).unwrap();
    // Every subscriber receives before the measured phase.
    let warm = Instant::now();
    let mut i = 0;
    while least_delivered(&recorders) == 0 {
        assert!(
            warm.elapsed() < Duration::from_secs(30),
            "the forwarder never delivered"
        );
        push.send_multipart(message(i), 0).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    // The measured phase counts from zero.
    for r in &recorders {
        r.delivered.store(0, Relaxed);
        r.latencies_ns.lock().unwrap().clear();
    }
    let cpu_before = cpu_ns(pid);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        let due = start + interval * sent as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        push.send_multipart(message(sent), 0).unwrap();
        sent += 1;
    }
    let mut last = (0, Instant::now());
    loop {
        let least = least_delivered(&recorders);
        if least >= sent || last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        if least != last.0 {
            last = (least, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = cpu_ns(pid).saturating_sub(cpu_before);
    let least = least_delivered(&recorders);
    stop.store(true, Relaxed);
    drop(child);
    Point {
        sent,
        missing: sent.saturating_sub(least),
        cpu_us_per_msg: cpu as f64 / 1000.0 / sent.max(1) as f64,
        p99_ms: latencies(&recorders).1,
    }
}

/// Every rate of `--service`, the service then its floor, `--repeat`
/// times (interleaved); every run and the medians printed.
pub(crate) fn service(args: &Args) -> Vec<ServiceRow> {
    let mut runs: Vec<Vec<ServiceRow>> = Vec::new();
    for run in 1..=args.repeat {
        let mut rows = Vec::new();
        for &rate in &args.service {
            eprintln!(
                "run {run}/{}: publisher service at {rate} msg/s, {} subscriber(s), {:?}, and its floor...",
                args.repeat, args.subscribers, args.duration
            );
            let s = point(Forwarder::Service, rate, args.duration, args.subscribers);
            let f = point(Forwarder::Proxy, rate, args.duration, args.subscribers);
            rows.push(ServiceRow {
                rate,
                subscribers: args.subscribers,
                sent: s.sent,
                missing: s.missing + f.missing,
                service_cpu_us_per_msg: s.cpu_us_per_msg,
                floor_cpu_us_per_msg: f.cpu_us_per_msg,
                ratio_to_floor: s.cpu_us_per_msg / f.cpu_us_per_msg,
                service_p99_ms: s.p99_ms,
                floor_p99_ms: f.p99_ms,
            });
        }
        runs.push(rows);
    }
    let all: Vec<ServiceRow> = runs.iter().flatten().cloned().collect();
    print(&all);
    if args.repeat > 1 {
        let medians: Vec<ServiceRow> = (0..args.service.len())
            .map(|i| {
                let of = |f: fn(&ServiceRow) -> f64| {
                    let mut v: Vec<f64> = runs.iter().map(|r| f(&r[i])).collect();
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                ServiceRow {
                    service_cpu_us_per_msg: of(|r| r.service_cpu_us_per_msg),
                    floor_cpu_us_per_msg: of(|r| r.floor_cpu_us_per_msg),
                    ratio_to_floor: of(|r| r.ratio_to_floor),
                    service_p99_ms: of(|r| r.service_p99_ms),
                    floor_p99_ms: of(|r| r.floor_p99_ms),
                    missing: runs.iter().map(|r| r[i].missing).max().unwrap_or(0),
                    ..runs[0][i].clone()
                }
            })
            .collect();
        println!("\nmedian of {} runs:", args.repeat);
        print(&medians);
    }
    all
}

fn print(rows: &[ServiceRow]) {
    println!(
        "{:>8} {:>5} {:>8} {:>16} {:>14} {:>9} {:>12} {:>10} {:>8}",
        "rate/s",
        "subs",
        "sent",
        "service µs/msg",
        "floor µs/msg",
        "× floor",
        "service p99",
        "floor p99",
        "missing"
    );
    for r in rows {
        println!(
            "{:>8} {:>5} {:>8} {:>16.1} {:>14.1} {:>9.2} {:>10.2}ms {:>8.2}ms {:>8}",
            r.rate,
            r.subscribers,
            r.sent,
            r.service_cpu_us_per_msg,
            r.floor_cpu_us_per_msg,
            r.ratio_to_floor,
            r.service_p99_ms,
            r.floor_p99_ms,
            r.missing
        );
    }
    let worst = rows.iter().map(|r| r.ratio_to_floor).fold(0.0, f64::max);
    println!(
        "goal: the service at most 1.5× its floor's CPU per message: {} (worst {worst:.2}×)",
        if worst <= 1.5 { "met" } else { "not met" }
    );
}
