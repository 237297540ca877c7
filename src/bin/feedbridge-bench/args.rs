//! The benchmark's command line: what to measure, and the internal
//! arguments of its child processes (writers, the bridge).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

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
    /// Measure what a bridge restart costs this many subscribers that stay
    /// up (comma separated: one run each), against as many full re-reads
    /// of the `--preload` keys, instead of the throughput scenarios.
    #[arg(long, value_delimiter = ',')]
    pub(crate) resume: Vec<usize>,
    /// Measure the publisher service (multiproc channel → ZeroMQ) at these
    /// rates in messages a second (comma separated), beside a libzmq
    /// forwarder (`zmq_proxy`, PULL → PUB) fed and read alike, instead of
    /// the source scenarios.
    #[arg(long, value_delimiter = ',')]
    pub(crate) service: Vec<u64>,
    /// Run etcd→zmq and redis→zmq at each of these fixed rates in changes
    /// a second (comma separated), each beside its floor (a plain consumer
    /// of the database in a process of its own: its CPU per change),
    /// instead of one scenario.
    #[arg(long, value_delimiter = ',')]
    pub(crate) rates: Vec<u64>,
    /// Fan-out: etcd→zmq at `--rate` (1000 when not given) to each of these
    /// numbers of ZeroMQ subscribers (comma separated), spread over
    /// `--subscriber-processes` processes, instead of one scenario.
    #[arg(long, value_delimiter = ',')]
    pub(crate) fanout: Vec<usize>,
    /// Run the subscribers in this many processes of their own (ZeroMQ
    /// only; 0: in the harness's process). `--fanout` uses 4 when not
    /// given.
    #[arg(long)]
    pub(crate) subscriber_processes: Option<usize>,
    /// Also measure a minimal forwarder to ZeroMQ: the plain consumer
    /// sending each value it receives on a libzmq PUB socket to a raw
    /// subscriber, nothing else (no mapping, no envelope); its CPU per
    /// change is the floor of a bridge to ZeroMQ. `--rates` measures it.
    #[arg(long)]
    pub(crate) forwarder_floor: bool,
    /// Internal: run as the plain consumer of `etcd:URL` or `redis:URL`.
    #[arg(long, hide = true)]
    pub(crate) plain_child: Option<String>,
    /// Internal: the plain consumer forwards to a PUB socket bound here.
    #[arg(long, hide = true)]
    pub(crate) plain_forward: Option<String>,
    /// Internal: run as subscribers, `ZMQ_ENDPOINT,COUNT`.
    #[arg(long, hide = true)]
    pub(crate) subscriber_child: Option<String>,
    /// Internal: run as the floor forwarder, `PULL_ENDPOINT,PUB_ENDPOINT`.
    #[arg(long, hide = true)]
    pub(crate) proxy_child: Option<String>,
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
