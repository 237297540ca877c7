//! The `feedbridge` command: parses the CLI, loads the config and calls the
//! library. Exit codes: 0 success, 1 runtime failure, 2 bad config or usage.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{
    BackendConfig, Config, EtcdBackendConfig, RedisBackendConfig, SourceConfig, ZmqBackendConfig,
    DEFAULT_ETCD_ENDPOINT, DEFAULT_REDIS_URL, DEFAULT_ZMQ_BIND,
};
use feedbridge::stats::Stats;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "feedbridge",
    version,
    about = "Change-feed bridge: etcd / Redis changes to ZeroMQ, Redis or etcd pub/sub"
)]
struct Cli {
    /// Log level (overridden by RUST_LOG): error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a shell completion script (e.g. `feedbridge completions bash
    /// > /etc/bash_completion.d/feedbridge`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), from the same definition as `--help`.
    Man,
    /// One screen about a running bridge, from its admin listener: role,
    /// readiness, what it read and published, skips, lag, reconnects.
    Status {
        /// The admin listener (`[admin] listen`).
        #[arg(long, default_value = "http://127.0.0.1:9095")]
        url: String,
        /// Refresh in place every this long (e.g. `2s`), with rates.
        #[arg(long, value_parser = humantime::parse_duration, num_args = 0..=1, default_missing_value = "2s")]
        watch: Option<std::time::Duration>,
    },
    /// Run the bridge until SIGINT or SIGTERM.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 when usable, 2 with the reason otherwise.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Exit 0 if an admin URL answers 200 (for container health checks).
    Health {
        /// e.g. http://127.0.0.1:9095/readyz
        #[arg(long, default_value = "http://127.0.0.1:9095/healthz")]
        url: String,
    },
    /// Subscribe and print one JSON object per update on stdout.
    Tail {
        /// Which backend to subscribe through.
        #[arg(long, value_enum, default_value = "zmq")]
        backend: TailBackend,
        /// ZeroMQ publisher endpoint (repeatable).
        #[arg(long)]
        connect: Vec<String>,
        /// Redis URL (redis backend).
        #[arg(long, default_value = DEFAULT_REDIS_URL)]
        redis_url: String,
        /// Sharded pub/sub (`SSUBSCRIBE` on a Redis Cluster; redis backend).
        #[arg(long)]
        sharded: bool,
        /// etcd endpoint (etcd backend, repeatable).
        #[arg(long)]
        etcd_endpoint: Vec<String>,
        /// etcd key prefix of the topics (etcd backend).
        #[arg(long, default_value = "/pubsub/")]
        etcd_prefix: String,
        /// Find ZeroMQ publishers in this database's `publisher` table
        /// (an etcd URL, or redis://...) and follow them as they come and go.
        #[arg(long)]
        discover: Option<String>,
        /// Topic to receive (repeatable); every topic when none is given.
        #[arg(long)]
        topic: Vec<String>,
        /// Payload codec.
        #[arg(long, value_enum, default_value = "msgpack")]
        codec: TailCodec,
        /// Output: one JSON object per line, or a readable line coloured by
        /// action. Default: pretty on a terminal, JSON otherwise.
        #[arg(long, value_enum)]
        format: Option<TailFormat>,
        /// Exit after this many updates (exit 0).
        #[arg(long)]
        count: Option<u64>,
        /// Exit after this long, e.g. `5s` (exit 0, or 1 when `--count`
        /// updates did not arrive in time).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// How long a feedbridge publisher may be silent (no update, no
        /// heartbeat) before the connection is taken for dead: tail says
        /// so, reconnects and prints a `sync` (at least 2s).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        silence_timeout: std::time::Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TailBackend {
    Zmq,
    Redis,
    Etcd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum TailFormat {
    Json,
    Pretty,
}

#[derive(Clone, Copy, ValueEnum)]
enum TailCodec {
    Msgpack,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "feedbridge", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Status { url, watch } => status(&url, watch),
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(command).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Health { url } => match feedbridge::admin::probe(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                for warning in c.warnings() {
                    eprintln!("warning: {warning}");
                }
                println!("{}: OK ({})", config.display(), describe(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            runtime().block_on(run(config))
        }
        Command::Tail {
            backend,
            connect,
            redis_url,
            sharded,
            etcd_endpoint,
            etcd_prefix,
            discover,
            topic,
            codec,
            format,
            count,
            timeout,
            silence_timeout,
        } => {
            let codec = match codec {
                TailCodec::Msgpack => Codec::Msgpack,
                TailCodec::Json => Codec::Json,
            };
            let config = match backend {
                TailBackend::Zmq => BackendConfig::Zmq(ZmqBackendConfig {
                    bind: String::new(),
                    codec,
                    send_hwm: 1,
                    linger: Default::default(),
                    rejoin_wait: std::time::Duration::ZERO,
                    silence_timeout,
                }),
                TailBackend::Redis => BackendConfig::Redis(RedisBackendConfig {
                    url: redis_url,
                    codec,
                    connect_timeout: std::time::Duration::from_secs(5),
                    sharded,
                    silence_timeout,
                    auth: Default::default(),
                }),
                TailBackend::Etcd => BackendConfig::Etcd(EtcdBackendConfig {
                    endpoints: if etcd_endpoint.is_empty() {
                        vec![DEFAULT_ETCD_ENDPOINT.into()]
                    } else {
                        etcd_endpoint
                    },
                    prefix: etcd_prefix,
                    codec,
                    connect_timeout: std::time::Duration::from_secs(5),
                    silence_timeout,
                    auth: Default::default(),
                }),
            };
            if let Err((field, reason)) = config.check_silence_timeout() {
                eprintln!(
                    "error: --{}: {reason}",
                    field.trim_start_matches("backend.").replace('_', "-")
                );
                return ExitCode::from(2);
            }
            let connect = if connect.is_empty() && discover.is_none() {
                vec![DEFAULT_ZMQ_BIND.to_owned()]
            } else {
                connect
            };
            let format =
                format.unwrap_or(if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    TailFormat::Pretty
                } else {
                    TailFormat::Json
                });
            let until = Until { count, timeout };
            runtime().block_on(tail(config, connect, discover, topic, format, until))
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> tokio::runtime::Runtime {
    feedbridge::bridge::runtime().expect("tokio runtime")
}

fn describe(c: &Config) -> String {
    let mut source = match &c.source {
        Some(SourceConfig::Etcd(s)) => format!(
            "etcd {} prefix {:?}",
            feedbridge::config::redact_endpoints(&s.endpoints),
            s.prefix
        ),
        Some(SourceConfig::Redis(s)) => {
            format!("redis {}", feedbridge::db::redis::redacted(&s.url))
        }
        None => String::new(),
    };
    if let Some(m) = &c.multiproc {
        if !source.is_empty() {
            source.push_str(" + ");
        }
        source.push_str(&format!("multiproc {}", m.endpoint()));
    }
    let backend = match &c.backend {
        BackendConfig::Zmq(b) => format!("zmq {} ({})", b.bind, b.codec),
        BackendConfig::Redis(b) => format!(
            "redis {} ({})",
            feedbridge::db::redis::redacted(&b.url),
            b.codec
        ),
        BackendConfig::Etcd(b) => format!(
            "etcd {} {} ({})",
            feedbridge::config::redact_endpoints(&b.endpoints),
            b.prefix,
            b.codec
        ),
    };
    match &c.discovery {
        Some(d) => {
            let table = match &d.url {
                Some(url) => feedbridge::db::redis::redacted(url),
                None => feedbridge::config::redact_endpoints(&d.endpoints),
            };
            format!("{source} -> {backend}, registered in the publisher table of {table}")
        }
        None => format!("{source} -> {backend}"),
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("Shutdown requested; publishing what is in flight.");
        token.cancel();
    });
}

async fn run(config: Config) -> ExitCode {
    tracing::info!(
        "feedbridge {} starting: {}",
        env!("CARGO_PKG_VERSION"),
        describe(&config)
    );
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let stats = Arc::new(Stats::default());
    match feedbridge::bridge::run(config, shutdown, stats.clone()).await {
        Ok(()) => {
            tracing::info!(
                read = stats.changes_read.get(),
                published = stats.updates_published.get(),
                "Stopped cleanly."
            );
            ExitCode::SUCCESS
        }
        Err(e @ feedbridge::bridge::BridgeError::Unpublished { .. }) => {
            tracing::error!(
                read = stats.changes_read.get(),
                published = stats.updates_published.get(),
                "{e}"
            );
            ExitCode::from(EXIT_UNPUBLISHED)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `feedbridge status`: exit 0 when ready, 1 when the listener does not
/// answer, 2 when the bridge answers but is not ready.
fn status(url: &str, watch: Option<std::time::Duration>) -> ExitCode {
    let mut before: Option<(feedbridge::status::Snapshot, std::time::Instant)> = None;
    loop {
        let snapshot = match feedbridge::status::read(url) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: no bridge answers at {url} ({e}); is [admin] listen set?");
                return ExitCode::FAILURE;
            }
        };
        let screen = snapshot.render(url, before.as_ref().map(|(s, t)| (s, t.elapsed())));
        let Some(every) = watch else {
            print!("{screen}");
            return if snapshot.ready.0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        };
        // Clear the screen and draw again in place.
        print!("\x1b[2J\x1b[H{screen}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        before = Some((snapshot, std::time::Instant::now()));
        std::thread::sleep(every);
    }
}

/// `run`'s exit code when it stopped with updates unpublished (the backend
/// was down through the whole shutdown timeout): 0 would claim a clean stop.
const EXIT_UNPUBLISHED: u8 = 3;

#[derive(serde::Serialize)]
struct Line<'a> {
    table: &'a str,
    key: &'a str,
    action: &'a str,
    value: Option<&'a str>,
    topic: &'a str,
}

/// When `tail` stops by itself.
struct Until {
    count: Option<u64>,
    timeout: Option<std::time::Duration>,
}

/// One update as a readable line: time, action (coloured on a terminal),
/// table/key, topic, value.
fn pretty(u: &feedbridge::DbUpdate, colour: bool) -> String {
    let (code, action) = match u.action {
        feedbridge::Action::Create => ("32", "create"),
        feedbridge::Action::Set => ("33", "set"),
        feedbridge::Action::Delete => ("31", "delete"),
        feedbridge::Action::Sync => ("35", "sync"),
        _ => ("2", u.action.as_str()),
    };
    let action = if colour {
        format!("\x1b[{code}m{action:<6}\x1b[0m")
    } else {
        format!("{action:<6}")
    };
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let time = now.get(11..23).unwrap_or(&now);
    let row = if u.table.is_empty() {
        String::new()
    } else {
        format!("{}/{}", u.table, u.key)
    };
    format!(
        "{time}  {action}  {row}  @{}  {}",
        u.topic,
        u.value.as_deref().unwrap_or("-")
    )
}

async fn tail(
    config: BackendConfig,
    connect: Vec<String>,
    discover: Option<String>,
    topics: Vec<String>,
    format: TailFormat,
    until: Until,
) -> ExitCode {
    let is_zmq = matches!(config, BackendConfig::Zmq(_));
    let subscriber = PubSub::new(config).get_subscriber();
    subscriber.unregister_topic(feedbridge::SEND_ALL_TOPIC);
    if topics.is_empty() {
        subscriber.register_topic("");
    }
    for t in &topics {
        subscriber.register_topic(t);
    }
    if is_zmq {
        for c in &connect {
            subscriber.register_listen_address(c);
        }
    }
    let stop = CancellationToken::new();
    cancel_on_signal(stop.clone());
    if let Some(db) = discover {
        let target = feedbridge::discovery::Target::parse(&db);
        tokio::spawn(feedbridge::discovery::follow_publishers(
            target,
            subscriber.clone(),
            stop.clone(),
        ));
    }
    let (mut updates, task) = subscriber.clone().updates(1024);
    let mut out = std::io::stdout().lock();
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let deadline = until.timeout.map(|t| tokio::time::Instant::now() + t);
    let timed_out = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timed_out);
    let mut printed = 0u64;
    let mut short = false;
    while until.count.is_none_or(|n| printed < n) {
        let update = tokio::select! {
            _ = stop.cancelled() => break,
            _ = &mut timed_out => {
                short = until.count.is_some();
                break;
            }
            u = updates.recv() => u,
        };
        let Some(u) = update else { break };
        let text = match format {
            TailFormat::Json => serde_json::to_string(&Line {
                table: &u.table,
                key: &u.key,
                action: u.action.as_str(),
                value: u.value.as_deref(),
                topic: &u.topic,
            })
            .expect("strings serialize"),
            TailFormat::Pretty => pretty(&u, colour),
        };
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            break; // stdout closed (e.g. piped into head)
        }
        printed += 1;
    }
    subscriber.stop();
    if short {
        eprintln!(
            "error: timed out after {} with {printed} of {} updates",
            humantime::format_duration(until.timeout.unwrap_or_default()),
            until.count.unwrap_or_default()
        );
        return ExitCode::FAILURE;
    }
    match task.await {
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}
