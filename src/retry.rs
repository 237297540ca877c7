//! Reconnection policy shared by every connection: capped exponential
//! backoff with jitter (the `backon` crate), reset once a connection has been
//! healthy for a while, and one log line per state change instead of one per
//! attempt.

use std::fmt::Display;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::stats::ConnState;

/// A connection that stayed up this long starts its next outage with the
/// shortest delay again.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Tracks one connection's outages.
#[derive(Debug)]
pub struct Reconnect {
    what: String,
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    up_since: Option<Instant>,
    down: bool,
    attempts: u64,
    state: Option<ConnState>,
}

impl Reconnect {
    /// A policy for the connection described by `what` (e.g. `etcd source`).
    pub fn new(what: impl Into<String>) -> Self {
        Self::with_delays(what, Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The same with explicit first and largest delays.
    pub fn with_delays(what: impl Into<String>, min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Reconnect {
            what: what.into(),
            delays: builder.build(),
            builder,
            up_since: None,
            down: false,
            attempts: 0,
            state: None,
        }
    }

    /// Also reports up/down and reconnects to `state` (metrics, readiness).
    pub fn with_state(mut self, state: ConnState) -> Self {
        self.state = Some(state);
        self
    }

    /// Records a successful (re)connection; logs the recovery once.
    pub fn up(&mut self) {
        if let Some(state) = &self.state {
            state.set_up(true, self.down);
        }
        if self.down {
            tracing::info!(connection = %self.what, attempts = self.attempts, "Connection is back.");
            self.down = false;
        }
        self.up_since = Some(Instant::now());
    }

    /// Records a failure, logs it once per outage, and waits the next delay.
    /// Returns `false` when `shutdown` fired during the wait.
    pub async fn down(
        &mut self,
        error: &(dyn Display + Sync),
        shutdown: &CancellationToken,
    ) -> bool {
        if self
            .up_since
            .take()
            .is_some_and(|t| t.elapsed() >= HEALTHY_AFTER)
        {
            self.delays = self.builder.build();
        }
        self.attempts += 1;
        if let Some(state) = &self.state {
            state.set_up(false, false);
        }
        if !self.down {
            tracing::warn!(connection = %self.what, %error, "Connection lost; retrying with backoff.");
            self.down = true;
            self.attempts = 1;
        } else {
            tracing::debug!(connection = %self.what, %error, attempt = self.attempts, "Retry failed.");
        }
        let delay = self.delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}
