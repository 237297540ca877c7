//! `feedbridge tail`: subscribe through any backend and print one line per
//! update, until stopped, a count, or a timeout.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{
    BackendConfig, EtcdBackendConfig, RedisBackendConfig, ZmqBackendConfig, DEFAULT_ETCD_ENDPOINT,
    DEFAULT_REDIS_URL, DEFAULT_ZMQ_BIND,
};
use tokio_util::sync::CancellationToken;

use super::shared::{cancel_on_signal, runtime};

/// `tail`'s arguments.
#[derive(Args)]
pub struct TailArgs {
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
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TailBackend {
    Zmq,
    Redis,
    Etcd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum TailFormat {
    Json,
    Pretty,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TailCodec {
    Msgpack,
    Json,
}

/// `feedbridge tail ...`.
pub fn tail(args: TailArgs) -> ExitCode {
    let TailArgs {
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
    } = args;
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
    let format = format.unwrap_or(if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        TailFormat::Pretty
    } else {
        TailFormat::Json
    });
    let until = Until { count, timeout };
    runtime().block_on(follow(config, connect, discover, topic, format, until))
}

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

async fn follow(
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
