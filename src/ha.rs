//! High availability: several bridges with the same config, one publishing
//! at a time, elected through etcd's lease-based election API.
//!
//! Each instance holds a lease (`lease_ttl`) and campaigns under the
//! election name; the winner runs the pipeline and keeps its checkpoint in
//! etcd, where the next leader resumes it. A leader stops publishing when
//! its lease may have expired: it tracks locally, on the monotonic clock,
//! until when the lease is certainly valid (the time a keep-alive was *sent*
//! plus the TTL the server granted, minus a safety margin), and the pipeline
//! checks that before every publish. The server cannot expire the lease
//! earlier than that, so another instance cannot be elected while this one
//! still publishes (assuming the two clocks run at the same rate within the
//! margin). A paused (SIGSTOP) leader finds the deadline passed when it
//! resumes and publishes nothing more.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, LeaderKey, ResignOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use crate::config::HaConfig;

/// A fixed origin for the monotonic deadlines kept in atomics.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    ORIGIN.elapsed().as_millis() as u64
}

/// This instance's leadership; dropped or resigned when it ends.
pub struct Leadership {
    client: Client,
    leader: LeaderKey,
    lease: i64,
    checkpoint_key: String,
    /// Monotonic ms until which the lease is certainly valid.
    valid_until: Arc<AtomicU64>,
    /// Cancelled once the lease may have expired.
    lost: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Whether this instance may still publish.
    pub fn is_valid(&self) -> bool {
        !self.lost.is_cancelled() && now_ms() < self.valid_until.load(SeqCst)
    }

    /// Cancelled when leadership may have been lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// The checkpoint the previous leader left in etcd.
    pub async fn load_checkpoint(&self) -> Result<Option<i64>, etcd_client::Error> {
        let resp = self
            .client
            .clone()
            .get(self.checkpoint_key.clone(), None)
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.trim().parse().ok()))
    }

    /// Stores the checkpoint, only while this instance's leader key still
    /// exists (a deposed leader cannot move it).
    pub async fn save_checkpoint(&self, revision: i64) -> Result<bool, etcd_client::Error> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.leader.key().to_vec(),
                CompareOp::Equal,
                self.leader.rev(),
            )])
            .and_then([TxnOp::put(
                self.checkpoint_key.clone(),
                revision.to_string(),
                None,
            )]);
        Ok(self.client.clone().txn(txn).await?.succeeded())
    }

    /// Hands leadership over at once (graceful stop): a standby is elected
    /// without waiting for the lease to expire.
    pub async fn resign(&self) {
        self.keeper.abort();
        self.lost.cancel();
        let mut client = self.client.clone();
        let opts = ResignOptions::new().with_leader(self.leader.clone());
        if let Err(e) = client.resign(Some(opts)).await {
            tracing::warn!(error = %e, "Cannot resign; the lease will expire instead.");
        }
        let _ = client.lease_revoke(self.lease).await;
        tracing::info!("Resigned leadership.");
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
        self.lost.cancel();
    }
}

/// Waits until this instance is elected (`None` if `shutdown` comes first).
pub async fn campaign(
    config: &HaConfig,
    instance: &str,
    service_id: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, etcd_client::Error> {
    let ttl = config.lease_ttl.as_secs().max(1) as i64;
    let mut client =
        crate::source::etcd::connect(&config.endpoints, Duration::from_secs(5), &config.auth)
            .await?;
    let sent = now_ms();
    let lease = client.lease_grant(ttl, None).await?.id();
    let valid_until = Arc::new(AtomicU64::new(sent + valid_for(ttl)));
    let lost = CancellationToken::new();
    let keeper = tokio::spawn(keep_alive(
        client.clone(),
        lease,
        ttl,
        valid_until.clone(),
        lost.clone(),
    ));
    let name = format!(
        "{}/election/{service_id}",
        config.prefix.trim_end_matches('/')
    );
    tracing::info!(%instance, election = %name, ttl_s = ttl, "Standing by: campaigning for leadership.");
    let resp = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            keeper.abort();
            let _ = client.lease_revoke(lease).await;
            return Ok(None);
        }
        r = client.campaign(name.clone(), instance.to_owned(), lease) => r?,
    };
    let leader = resp
        .leader()
        .cloned()
        .ok_or_else(|| etcd_client::Error::ElectError("campaign returned no leader key".into()))?;
    tracing::info!(%instance, "Elected leader; publishing.");
    Ok(Some(Leadership {
        client,
        leader,
        lease,
        checkpoint_key: format!(
            "{}/checkpoint/{service_id}",
            config.prefix.trim_end_matches('/')
        ),
        valid_until,
        lost,
        keeper,
    }))
}

/// How long after sending a keep-alive the lease is certainly valid: the
/// TTL less a margin of a quarter (at least 500 ms) for clock-rate drift
/// and scheduling.
fn valid_for(ttl_s: i64) -> u64 {
    let ttl = ttl_s as u64 * 1000;
    ttl - (ttl / 4).max(500).min(ttl / 2)
}

/// Refreshes the lease every third of its TTL; extends `valid_until` on
/// each answer and cancels `lost` once it passes without one.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: i64,
    valid_until: Arc<AtomicU64>,
    lost: CancellationToken,
) {
    let period = Duration::from_millis(ttl as u64 * 1000 / 3);
    let watchdog = {
        let (valid_until, lost) = (valid_until.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                let until = valid_until.load(SeqCst);
                let now = now_ms();
                if now >= until {
                    tracing::warn!("Lease may have expired: stopping publishing.");
                    lost.cancel();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(until - now)).await;
            }
        })
    };
    let mut stream = None;
    loop {
        if lost.is_cancelled() {
            break;
        }
        if stream.is_none() {
            stream = client.lease_keep_alive(lease).await.ok();
        }
        if let Some((keeper, answers)) = &mut stream {
            let sent = now_ms();
            let answer = async {
                keeper.keep_alive().await?;
                answers.message().await
            };
            match tokio::time::timeout(period, answer).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                    valid_until.fetch_max(sent + valid_for(resp.ttl()), SeqCst);
                }
                Ok(Ok(Some(_))) => {
                    tracing::warn!("The lease expired on the server: leadership lost.");
                    lost.cancel();
                    break;
                }
                _ => stream = None, // retried until the watchdog gives up
            }
        }
        tokio::time::sleep(period).await;
    }
    watchdog.abort();
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_margin_keeps_the_deadline_inside_the_ttl() {
        assert_eq!(super::valid_for(10), 7_500);
        assert_eq!(super::valid_for(2), 1_500);
        assert_eq!(super::valid_for(1), 500);
    }
}
