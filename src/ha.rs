//! High availability: several bridges with the same config, one publishing
//! at a time, elected through etcd's lease-based election API (or, with a
//! weaker guarantee, a Redis lock).
//!
//! Each instance holds a lease (`lease_ttl`) and campaigns under the
//! election name; the winner runs the pipeline and keeps its checkpoint in
//! the store, where the next leader resumes it. A leader stops publishing
//! when its lease may have expired: it tracks locally, on the monotonic
//! clock, until when the lease is certainly valid (the time a keep-alive
//! was *sent* plus the TTL the server granted, minus a safety margin), and
//! the pipeline checks that before every publish. The server cannot expire
//! the lease earlier than that, so another instance cannot be elected while
//! this one still publishes (assuming the two clocks run at the same rate
//! within the margin). A paused (SIGSTOP) leader finds the deadline passed
//! when it resumes and publishes nothing more.
//!
//! The Redis lock (`SET key token NX PX ttl`, refreshed and released only
//! by its holder) gives the same local guarantee against one Redis server,
//! but Redis replicates asynchronously: if the server fails over to a
//! replica that had not seen the lock, two instances can lead at once.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crate::db::redis::Conn;
use etcd_client::{Client, Compare, CompareOp, LeaderKey, ResignOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use crate::config::HaConfig;

/// A fixed origin for the monotonic deadlines kept in atomics.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    ORIGIN.elapsed().as_millis() as u64
}

/// Extends the Redis lock only while it is still ours.
const REDIS_EXTEND: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
/// Releases the Redis lock only while it is still ours.
const REDIS_RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
return redis.call('del', KEYS[1]) else return 0 end";
/// Stores the checkpoint only while the lock is still ours.
const REDIS_CHECKPOINT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
redis.call('set', KEYS[2], ARGV[2]) return 1 else return 0 end";

/// Where the election runs.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one per leadership term
enum Store {
    Etcd {
        client: Client,
        leader: LeaderKey,
        lease: i64,
    },
    Redis {
        conn: Conn,
        key: String,
        token: String,
    },
}

/// This instance's leadership.
pub struct Leadership {
    store: Store,
    checkpoint_key: String,
    /// Monotonic ms until which the lease is certainly valid.
    valid_until: Arc<AtomicU64>,
    /// Cancelled once the lease may have expired.
    lost: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
    /// How long one call to the store may take in a term (a third of the
    /// lease): a leader cut off from the store learns it from a timeout,
    /// not from TCP minutes later.
    call_timeout: Duration,
}

/// Runs one call to the store within `timeout`.
async fn within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from the election store within {}",
                humantime::format_duration(timeout)
            ))
        })
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

    /// The checkpoint the previous leader left in the store.
    pub async fn load_checkpoint(&self) -> Result<Option<i64>, String> {
        within(self.call_timeout, self.load_checkpoint_text()).await
    }

    async fn load_checkpoint_text(&self) -> Result<Option<i64>, String> {
        let text: Option<String> = match self.store.clone() {
            Store::Etcd { mut client, .. } => {
                let resp = client
                    .get(self.checkpoint_key.clone(), None)
                    .await
                    .map_err(|e| e.to_string())?;
                resp.kvs()
                    .first()
                    .and_then(|kv| kv.value_str().ok().map(str::to_owned))
            }
            Store::Redis { mut conn, .. } => redis::cmd("GET")
                .arg(&self.checkpoint_key)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?,
        };
        Ok(text.and_then(|t| t.trim().parse().ok()))
    }

    /// Stores the checkpoint, only while this instance still holds the
    /// election (a deposed leader cannot move it). `false` if it does not.
    pub async fn save_checkpoint(&self, revision: i64) -> Result<bool, String> {
        within(self.call_timeout, self.save_checkpoint_now(revision)).await
    }

    async fn save_checkpoint_now(&self, revision: i64) -> Result<bool, String> {
        match self.store.clone() {
            Store::Etcd {
                mut client, leader, ..
            } => {
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        leader.key().to_vec(),
                        CompareOp::Equal,
                        leader.rev(),
                    )])
                    .and_then([TxnOp::put(
                        self.checkpoint_key.clone(),
                        revision.to_string(),
                        None,
                    )]);
                Ok(client
                    .txn(txn)
                    .await
                    .map_err(|e| e.to_string())?
                    .succeeded())
            }
            Store::Redis {
                mut conn,
                key,
                token,
            } => {
                let stored: i64 = redis::cmd("EVAL")
                    .arg(REDIS_CHECKPOINT)
                    .arg(2)
                    .arg(&key)
                    .arg(&self.checkpoint_key)
                    .arg(&token)
                    .arg(revision)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(stored == 1)
            }
        }
    }

    /// Hands leadership over at once (graceful stop): a standby is elected
    /// without waiting for the lease to expire.
    pub async fn resign(&self) {
        match self.end_term().await {
            Ok(()) => tracing::info!("Resigned leadership."),
            Err(e) => tracing::warn!(error = %e, "Cannot resign; the lease will expire instead."),
        }
    }

    /// Gives the term's key and lease back without a word (a term that
    /// never led, or one that ended): a store out of reach only delays
    /// the next election by the lease's TTL.
    pub async fn release_quietly(&self) {
        if let Err(e) = self.end_term().await {
            tracing::debug!(error = %e, "Cannot release the election key; its lease will expire instead.");
        }
    }

    /// Stops the term here (no more keep-alives, leadership counts as
    /// lost), then gives its key and lease back within the call timeout.
    async fn end_term(&self) -> Result<(), String> {
        self.keeper.abort();
        self.lost.cancel();
        within(self.call_timeout, self.release()).await
    }

    async fn release(&self) -> Result<(), String> {
        match self.store.clone() {
            Store::Etcd {
                mut client,
                leader,
                lease,
            } => {
                let resigned = client
                    .resign(Some(ResignOptions::new().with_leader(leader)))
                    .await;
                let _ = client.lease_revoke(lease).await;
                resigned.map(drop).map_err(|e| e.to_string())
            }
            Store::Redis {
                mut conn,
                key,
                token,
            } => redis::cmd("EVAL")
                .arg(REDIS_RELEASE)
                .arg(1)
                .arg(&key)
                .arg(&token)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
        self.lost.cancel();
    }
}

/// Waits until this instance is elected (`None` if `shutdown` comes first).
///
/// An election that answers after this instance's lease may have expired
/// (the store was out of reach while the campaign waited: etcd's
/// `Campaign` returns once the keys before its own are gone, without
/// checking that its own still exists) is void: its key is released and
/// the campaign starts again with a new lease. Taken as a win, it made a
/// second leader beside the one elected meanwhile, and took the
/// publishing fence from it.
pub async fn campaign(
    config: &HaConfig,
    instance: &str,
    service_id: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, String> {
    loop {
        let Some(lead) = campaign_once(config, instance, service_id, shutdown).await? else {
            return Ok(None);
        };
        if lead.is_valid() {
            tracing::info!(%instance, "Elected leader; publishing.");
            return Ok(Some(lead));
        }
        tracing::warn!(%instance, "Elected only after this instance's lease may have expired (the store was out of reach while campaigning): not leading; campaigning again with a new lease.");
        lead.release_quietly().await;
    }
}

async fn campaign_once(
    config: &HaConfig,
    instance: &str,
    service_id: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, String> {
    let ttl = config.lease_ttl.as_secs().max(1) as i64;
    let prefix = config.prefix.trim_end_matches('/');
    let valid_until = Arc::new(AtomicU64::new(0));
    let lost = CancellationToken::new();
    let elected = match &config.url {
        None => {
            let name = format!("{prefix}/election/{service_id}");
            tracing::info!(%instance, election = %name, ttl_s = ttl, "Standing by: campaigning for leadership in etcd.");
            campaign_etcd(config, instance, &name, ttl, shutdown, &valid_until, &lost)
                .await?
                .map(|(store, keeper)| (store, keeper, format!("{prefix}/checkpoint/{service_id}")))
        }
        Some(url) => {
            let prefix = prefix.trim_start_matches('/');
            // One hash tag for the lock and the checkpoint: the script that
            // moves the checkpoint only while holding the lock touches both,
            // and on a Redis Cluster they must share a slot.
            let key = format!("{{{prefix}:{service_id}}}:leader");
            tracing::info!(%instance, lock = %key, ttl_s = ttl, "Standing by: campaigning for leadership in Redis.");
            campaign_redis(
                config,
                url,
                instance,
                key,
                ttl,
                shutdown,
                &valid_until,
                &lost,
            )
            .await?
            .map(|(store, keeper)| {
                let checkpoint = format!("{{{prefix}:{service_id}}}:checkpoint");
                (store, keeper, checkpoint)
            })
        }
    };
    let Some((store, keeper, checkpoint_key)) = elected else {
        return Ok(None);
    };
    Ok(Some(Leadership {
        store,
        checkpoint_key,
        valid_until,
        lost,
        keeper,
        call_timeout: Duration::from_millis(ttl as u64 * 1000 / 3).max(Duration::from_secs(1)),
    }))
}

/// Whether the election's store can be reached at all, checked once at
/// start: a wrong address or credentials fail with a clear error, while
/// every later outage (a restart of etcd or Redis while this instance
/// stands by) is retried.
pub async fn reachable(config: &HaConfig) -> Result<(), String> {
    let timeout = Duration::from_secs(5);
    match &config.url {
        None => {
            let mut client = crate::db::etcd::connect(&config.endpoints, timeout, &config.auth)
                .await
                .map_err(|e| e.to_string())?;
            let opts = etcd_client::GetOptions::new()
                .with_keys_only()
                .with_limit(1);
            tokio::time::timeout(timeout, client.get(config.prefix.as_str(), Some(opts)))
                .await
                .map_err(|_| "no answer from etcd".to_string())?
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Some(url) => {
            let client = crate::db::redis::client(url, &config.auth)?;
            let mut conn = crate::db::redis::connect(&client, timeout).await?;
            tokio::time::timeout(timeout, redis::cmd("PING").query_async::<()>(&mut conn))
                .await
                .map_err(|_| "no answer from Redis".to_string())?
                .map_err(|e| e.to_string())
        }
    }
}

type Elected = Option<(Store, tokio::task::JoinHandle<()>)>;

async fn campaign_etcd(
    config: &HaConfig,
    instance: &str,
    name: &str,
    ttl: i64,
    shutdown: &CancellationToken,
    valid_until: &Arc<AtomicU64>,
    lost: &CancellationToken,
) -> Result<Elected, String> {
    let err = |e: etcd_client::Error| e.to_string();
    let mut client =
        crate::db::etcd::connect(&config.endpoints, Duration::from_secs(5), &config.auth)
            .await
            .map_err(err)?;
    let sent = now_ms();
    let lease = client.lease_grant(ttl, None).await.map_err(err)?.id();
    valid_until.store(sent + valid_for(ttl), SeqCst);
    // Campaigning can take long: the lease is kept alive meanwhile.
    let refresh = Refresh::Etcd {
        client: client.clone(),
        lease,
    };
    let keeper = tokio::spawn(keep_alive(refresh, ttl, valid_until.clone(), lost.clone()));
    let resp = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            keeper.abort();
            let _ = client.lease_revoke(lease).await;
            return Ok(None);
        }
        r = client.campaign(name.to_owned(), instance.to_owned(), lease) => r,
    };
    let resp = resp.map_err(|e| {
        keeper.abort();
        err(e)
    })?;
    let leader = resp
        .leader()
        .cloned()
        .ok_or("campaign returned no leader key")?;
    Ok(Some((
        Store::Etcd {
            client,
            leader,
            lease,
        },
        keeper,
    )))
}

#[allow(clippy::too_many_arguments)]
async fn campaign_redis(
    config: &HaConfig,
    url: &str,
    instance: &str,
    key: String,
    ttl: i64,
    shutdown: &CancellationToken,
    valid_until: &Arc<AtomicU64>,
    lost: &CancellationToken,
) -> Result<Elected, String> {
    let client = crate::db::redis::client(url, &config.auth)?;
    let mut conn = crate::db::redis::connect(&client, Duration::from_secs(5)).await?;
    let token = format!("{instance}:{}", std::process::id());
    let period = Duration::from_millis(ttl as u64 * 1000 / 3);
    loop {
        let sent = now_ms();
        let got: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl * 1000)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if got.is_some() {
            valid_until.store(sent + valid_for(ttl), SeqCst);
            let refresh = Refresh::Redis {
                conn: conn.clone(),
                key: key.clone(),
                token: token.clone(),
            };
            let keeper = tokio::spawn(keep_alive(refresh, ttl, valid_until.clone(), lost.clone()));
            return Ok(Some((Store::Redis { conn, key, token }, keeper)));
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// How long after sending a keep-alive the lease is certainly valid: the
/// TTL less a margin of a quarter (at least 500 ms) for clock-rate drift
/// and scheduling.
fn valid_for(ttl_s: i64) -> u64 {
    let ttl = ttl_s as u64 * 1000;
    ttl - (ttl / 4).max(500).min(ttl / 2)
}

/// Cancels `lost` once `valid_until` passes without being extended.
async fn watchdog(valid_until: Arc<AtomicU64>, lost: CancellationToken) {
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
}

/// What keeps a lease alive.
#[allow(clippy::large_enum_variant)] // one per leadership term
enum Refresh {
    Etcd {
        client: Client,
        lease: i64,
    },
    Redis {
        conn: Conn,
        key: String,
        token: String,
    },
}

/// Refreshes the lease every third of its TTL; extends `valid_until` on
/// each answer and cancels `lost` once the store says it is gone, or once
/// `valid_until` passes without an answer.
async fn keep_alive(
    store: Refresh,
    ttl: i64,
    valid_until: Arc<AtomicU64>,
    lost: CancellationToken,
) {
    let period = Duration::from_millis(ttl as u64 * 1000 / 3);
    let dog = tokio::spawn(watchdog(valid_until.clone(), lost.clone()));
    let mut etcd_stream = None;
    while !lost.is_cancelled() {
        let sent = now_ms();
        // Some(true): refreshed; Some(false): the lease is gone; None: no answer.
        let refreshed: Option<bool> = match &store {
            Refresh::Etcd { client, lease } => {
                if etcd_stream.is_none() {
                    etcd_stream = client.clone().lease_keep_alive(*lease).await.ok();
                }
                match &mut etcd_stream {
                    Some((keeper, answers)) => {
                        let answer = async {
                            keeper.keep_alive().await?;
                            answers.message().await
                        };
                        match tokio::time::timeout(period, answer).await {
                            Ok(Ok(Some(resp))) => Some(resp.ttl() > 0),
                            _ => {
                                etcd_stream = None;
                                None
                            }
                        }
                    }
                    None => None,
                }
            }
            Refresh::Redis { conn, key, token } => {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(REDIS_EXTEND)
                    .arg(1)
                    .arg(key)
                    .arg(token)
                    .arg(ttl * 1000);
                let extend = cmd.query_async::<i64>(&mut conn);
                match tokio::time::timeout(period, extend).await {
                    Ok(Ok(n)) => Some(n == 1),
                    _ => None,
                }
            }
        };
        match refreshed {
            Some(true) => {
                valid_until.fetch_max(sent + valid_for(ttl), SeqCst);
            }
            Some(false) => {
                tracing::warn!("The lease expired in the store: leadership lost.");
                lost.cancel();
                break;
            }
            None => {} // retried until the watchdog gives up
        }
        tokio::time::sleep(period).await;
    }
    dog.abort();
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
