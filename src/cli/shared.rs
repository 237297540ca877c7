//! What every command shares: logging, the runtime, signals, and the
//! one-line description of a config.

use feedbridge::config::{BackendConfig, Config, SourceConfig};
use tokio_util::sync::CancellationToken;

/// Logs to stderr at `level`, unless `RUST_LOG` says otherwise.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
