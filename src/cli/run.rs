//! `feedbridge run` and `feedbridge check`: load a config, then run the
//! bridge until SIGINT / SIGTERM, or only validate it.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use feedbridge::config::Config;
use feedbridge::stats::Stats;
use tokio_util::sync::CancellationToken;

use super::shared::{cancel_on_signal, describe, fail, runtime};

/// `run`'s exit code when it stopped with updates unpublished (the backend
/// was down through the whole shutdown timeout): 0 would claim a clean stop.
const EXIT_UNPUBLISHED: u8 = 3;

/// `feedbridge run --config FILE`.
pub fn run(config: &Path) -> ExitCode {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            fail(&e, false);
            return ExitCode::from(2);
        }
    };
    runtime().block_on(serve(config))
}

/// `feedbridge check --config FILE`: exit 0 when usable (warnings printed),
/// 2 with the reason otherwise.
pub fn check(config: &Path) -> ExitCode {
    match Config::load(config) {
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
    }
}

async fn serve(config: Config) -> ExitCode {
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
    super::systemd::spawn(stats.clone(), shutdown.clone());
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
            fail(&e, true);
            ExitCode::FAILURE
        }
    }
}
