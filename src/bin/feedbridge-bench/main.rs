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

mod args;
mod measure;
mod plot;
mod remote;
mod report;
mod resume;
mod scenario;
mod servers;
mod service;
mod values;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use feedbridge::config::Config;
use tokio_util::sync::CancellationToken;

use crate::args::{Args, Backend, Source};
use crate::report::{csv, median, print_fanout, print_table, Row};
use crate::scenario::scenario;
use crate::servers::{pin, writer_child};

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
    if !args.rates.is_empty() {
        let d = args.duration;
        return args
            .rates
            .iter()
            .flat_map(|&rate| {
                [Source::Etcd, Source::Redis].map(|source| Args {
                    forwarder_floor: true,
                    ..with(source, Backend::Zmq, 1, rate, 0, d)
                })
            })
            .collect();
    }
    if !args.fanout.is_empty() {
        let rate = if args.rate == 0 { 1000 } else { args.rate };
        return args
            .fanout
            .iter()
            .map(|&n| Args {
                subscriber_processes: Some(args.subscriber_processes.unwrap_or(4)),
                ..with(args.source, Backend::Zmq, n, rate, 0, args.duration)
            })
            .collect();
    }
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
    if let Some(spec) = &args.plain_child {
        remote::plain_child(spec, args.plain_prev_kv, args.plain_forward.as_deref());
        return;
    }
    if let Some(spec) = &args.subscriber_child {
        scenario::subscriber_child(spec, &runtime);
        return;
    }
    if let Some(spec) = &args.proxy_child {
        service::proxy_child(spec);
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
        // The runtime the `feedbridge` binary runs the bridge on; SIGTERM
        // stops it gracefully, as it does the binary.
        feedbridge::bridge::runtime()
            .unwrap()
            .block_on(async {
                let shutdown = CancellationToken::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("SIGTERM handler");
                    term.recv().await;
                    stop.cancel();
                });
                feedbridge::bridge::run(config, shutdown, stats).await
            })
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
    if !args.service.is_empty() {
        let rows = service::service(&args);
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
        }
        return;
    }
    if !args.resume.is_empty() {
        let rows: Vec<_> = runtime.block_on(async {
            let mut rows = Vec::new();
            for &n in &args.resume {
                eprintln!(
                    "resume: a bridge restart under {n} subscriber(s), {} preloaded keys...",
                    args.preload
                );
                rows.push(resume::resume(&args, n).await);
            }
            rows
        });
        resume::print(&rows);
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
    if !args.fanout.is_empty() {
        println!("\nfan-out:");
        print_fanout(&summary);
    }
    draw(&args, &summary);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
    if let Some(p) = &args.csv {
        std::fs::write(p, csv(&rows)).unwrap();
    }
}

/// `--plot`, when asked for: the fan-out figures for `--fanout`, else
/// throughput and latency per scenario.
fn draw(args: &Args, rows: &[Row]) {
    if let Some(p) = &args.plot {
        let drawn = if !args.fanout.is_empty() {
            plot::plot_fanout(rows, p)
        } else {
            plot::plot(rows, p)
        };
        if let Err(e) = drawn {
            eprintln!("cannot draw {}: {e}", p.display());
            std::process::exit(1);
        }
    }
}
