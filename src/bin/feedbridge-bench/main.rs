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

mod measure;
mod plot;
mod report;
mod scenario;
mod servers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use feedbridge::config::Config;
use tokio_util::sync::CancellationToken;

use crate::report::{csv, median, print_table, Row};
use crate::scenario::scenario;
use crate::servers::{pin, writer_child};

#[derive(Parser, Clone)]
#[command(
    name = "feedbridge-bench",
    about = "Benchmark the bridge against the database's own ceiling"
)]
pub(crate) struct Args {
    /// Source database.
    #[arg(long, value_enum, default_value = "etcd")]
    pub(crate) source: Source,
    /// Publish backend.
    #[arg(long, value_enum, default_value = "zmq")]
    pub(crate) backend: Backend,
    /// Subscribers of the bridge's output.
    #[arg(long, default_value_t = 1)]
    pub(crate) subscribers: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    pub(crate) writers: usize,
    /// How long the writers write.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Total writes per second (0: as fast as the database accepts).
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 200)]
    pub(crate) value_size: usize,
    /// Topics the writes spread over (a `topic` field in each JSON value;
    /// 0: none, every update on `D`).
    #[arg(long, default_value_t = 0)]
    pub(crate) topics: usize,
    /// Keys each writer cycles through (0: a new key for every write).
    #[arg(long, default_value_t = 0)]
    pub(crate) keys_per_writer: usize,
    /// Keys written before the run, so the bridge knows this many.
    #[arg(long, default_value_t = 0)]
    pub(crate) preload: usize,
    /// Run the standard matrix (every path, fan-out 1/10/50, fixed rate,
    /// 100k keys) instead of one scenario.
    #[arg(long)]
    pub(crate) matrix: bool,
    /// A few seconds per path, for CI: proves the harness runs.
    #[arg(long)]
    pub(crate) smoke: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Also write the results as CSV here.
    #[arg(long)]
    pub(crate) csv: Option<PathBuf>,
    /// Also draw throughput and latency percentiles per scenario in this
    /// SVG file (the medians when `--repeat` is above 1).
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Print (and with `--plot`, draw) the results saved by an earlier
    /// `--json` run instead of running anything.
    #[arg(long, conflicts_with_all = ["matrix", "smoke", "json", "csv", "repeat"])]
    pub(crate) from: Option<PathBuf>,
    /// Run every scenario this many times (interleaved), print every run
    /// and the median of each figure.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) repeat: u32,
    /// Pin the bridge process to this CPU (start the harness itself with
    /// `taskset -c` on the others), so the bridge does not take CPU from
    /// the database and the writers it is measured against.
    #[arg(long)]
    pub(crate) bridge_cpu: Option<usize>,
    /// Pin the database and the writers to CPU 0, and the bridge, its
    /// subscribers and the plain watcher to CPU 1, so the ceiling and the
    /// bridged run give the database the same CPU.
    #[arg(long)]
    pub(crate) pin: bool,
    /// The bridge's ZeroMQ `send_hwm` (messages queued per subscriber
    /// before libzmq drops for it); the shipped default when not given.
    #[arg(long)]
    pub(crate) send_hwm: Option<i32>,
    /// The plain etcd watcher also asks for the previous value of each
    /// change, as the bridge does (for deletes' values and topics).
    #[arg(long)]
    pub(crate) plain_prev_kv: bool,
    /// Internal: run as the writers against `etcd:URL` or `redis:URL`.
    #[arg(long, hide = true)]
    pub(crate) writer_child: Option<String>,
    /// Internal: run as the bridge with this config file.
    #[arg(long, hide = true)]
    pub(crate) bridge_child: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
pub(crate) enum Source {
    Etcd,
    Redis,
    /// A 3-master Redis Cluster started by the benchmark.
    RedisCluster,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
pub(crate) enum Backend {
    Zmq,
    Redis,
    Etcd,
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
        // The bridge under test, in its own process; it logs when RUST_LOG
        // says what to log (e.g. RUST_LOG=feedbridge=info).
        if std::env::var_os("RUST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
        }
        let config = Config::load(cfg).unwrap_or_else(|e| panic!("{e}"));
        let stats = Arc::new(feedbridge::stats::Stats::default());
        // The runtime the `feedbridge` binary runs the bridge on.
        feedbridge::bridge::runtime()
            .unwrap()
            .block_on(feedbridge::bridge::run(
                config,
                CancellationToken::new(),
                stats,
            ))
            .unwrap();
        return;
    }
    if let Some(saved) = &args.from {
        let rows: Vec<Row> = std::fs::read_to_string(saved)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| {
                eprintln!("cannot read results from {}: {e}", saved.display());
                std::process::exit(2);
            });
        print_table(&rows);
        draw(&args, &rows);
        return;
    }
    let scenarios = scenarios(&args);
    // runs[run][scenario]: one pass over every scenario per run, so a
    // noisy stretch of time does not land on a single scenario's runs.
    let runs: Vec<Vec<Row>> = runtime.block_on(async {
        let mut runs = Vec::new();
        for run in 1..=args.repeat {
            let mut rows = Vec::new();
            for sc in &scenarios {
                eprintln!(
                    "run {run}/{}: {:?}->{:?} with {} subscriber(s), rate {}, {} preloaded keys, {:?}...",
                    args.repeat, sc.source, sc.backend, sc.subscribers, sc.rate, sc.preload, sc.duration
                );
                rows.push(scenario(sc).await);
            }
            runs.push(rows);
        }
        runs
    });
    let rows: Vec<Row> = runs.iter().flatten().cloned().collect();
    print_table(&rows);
    let summary: Vec<Row> = if args.repeat > 1 {
        let medians: Vec<Row> = (0..scenarios.len())
            .map(|i| median(&runs.iter().map(|run| run[i].clone()).collect::<Vec<_>>()))
            .collect();
        println!("\nmedian of {} runs:", args.repeat);
        print_table(&medians);
        medians
    } else {
        rows.clone()
    };
    draw(&args, &summary);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
    if let Some(p) = &args.csv {
        std::fs::write(p, csv(&rows)).unwrap();
    }
}

/// `--plot`, when asked for.
fn draw(args: &Args, rows: &[Row]) {
    if let Some(p) = &args.plot {
        if let Err(e) = plot::plot(rows, p) {
            eprintln!("cannot draw {}: {e}", p.display());
            std::process::exit(1);
        }
    }
}
