//! What every command shares: logging, the runtime, signals, and the
//! one-line description of a config.

use feedbridge::config::{BackendConfig, Config, LogFormat, SourceConfig};
use tokio_util::sync::CancellationToken;

/// The format logging was set up with.
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Says why a command failed: an `error:` line for a person reading text
/// logs; with JSON logs an ERROR event, so that stderr stays one JSON
/// object per line.
pub fn fail(message: &dyn std::fmt::Display, logged: bool) {
    match FORMAT.get().copied().unwrap_or_default() {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json if !logged => tracing::error!("{message}"),
        LogFormat::Json => {}
    }
}

/// Logs to stderr at `level` (unless `RUST_LOG` says otherwise), as text
/// or one JSON object per line.
pub fn init_logging(level: &str, format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let logger = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logger
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logger
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// The log format: `--log-format`, else the config's `admin.log_format`
/// (read before the config is checked, so that its errors are logged in
/// that format; a config that cannot be read says so later), else text.
pub fn log_format(flag: Option<&str>, config: Option<&std::path::Path>) -> LogFormat {
    if let Some(format) = flag.and_then(|f| f.parse().ok()) {
        return format;
    }
    config
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|top| {
            let format = top.get("admin")?.get("log_format")?.as_str()?.parse().ok();
            format
        })
        .unwrap_or_default()
}

/// The runtime every command runs on (the bridge's own, one thread).
pub fn runtime() -> tokio::runtime::Runtime {
    feedbridge::bridge::runtime().expect("tokio runtime")
}

/// What a config connects, in one line (secrets redacted).
pub fn describe(c: &Config) -> String {
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
pub fn cancel_on_signal(token: CancellationToken) {
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
