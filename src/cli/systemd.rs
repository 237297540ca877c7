//! systemd's notify protocol (`Type=notify`), through the `sd-notify`
//! crate: `READY=1` once the bridge is ready (the condition `/readyz`
//! reports), `WATCHDOG=1` at half the unit's `WatchdogSec` while the
//! pipeline is alive (`/livez`: a wedged bridge is restarted, an idle one
//! is not), `STOPPING=1` at shutdown. Without `$NOTIFY_SOCKET` (not under
//! systemd) it does nothing.

use std::sync::Arc;
use std::time::Duration;

use feedbridge::stats::Stats;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Talks to systemd until `shutdown`, then says the service is stopping.
pub fn spawn(stats: Arc<Stats>, shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tokio::spawn(async move {
        let send = |state: &[NotifyState]| {
            if let Err(e) = sd_notify::notify(state) {
                tracing::warn!(error = %e, "Cannot notify systemd.");
            }
        };
        let watchdog = sd_notify::watchdog_enabled().map(|every| every / 2);
        let mut tick = tokio::time::interval(
            watchdog
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_millis(250)),
        );
        let mut ready = false;
        let mut wedged = false;
        let mut last_pet = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
                    return;
                }
                _ = tick.tick() => {}
            }
            if !ready {
                if let Ok(role) = stats.ready() {
                    ready = true;
                    let status = format!("ready ({role})");
                    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
                }
            }
            if let Some(every) = watchdog {
                if last_pet.elapsed() >= every {
                    match stats.alive() {
                        Ok(()) => {
                            send(&[NotifyState::Watchdog]);
                            last_pet = tokio::time::Instant::now();
                            wedged = false;
                        }
                        // No pet: systemd restarts the wedged process.
                        Err(why) if !wedged => {
                            wedged = true;
                            tracing::error!(%why, "The pipeline is wedged: no longer answering the systemd watchdog.");
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    });
}
