//! Test helpers: real etcd and Redis servers on free ports in temp dirs
//! (killed on drop, restartable), waiting with timeouts instead of sleeps,
//! and a bridge run in-process.

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feedbridge::config::Config;
use feedbridge::stats::Stats;
pub use feedbridge::testing::{eventually, free_port, EtcdServer, RedisServer};
use feedbridge::DbUpdate;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A bridge running in this process; stopped on drop, so a failing test
/// does not leave its threads running.
pub struct Bridge {
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), feedbridge::bridge::BridgeError>>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Bridge {
    pub fn start(config_toml: &str) -> Self {
        let config = Config::parse(config_toml, Path::new("test.toml")).unwrap();
        config.validate(Path::new("test.toml")).unwrap();
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(feedbridge::bridge::run(
            config,
            shutdown.clone(),
            stats.clone(),
        ));
        Bridge {
            stats,
            shutdown,
            task,
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// Waits for the bridge to end by itself and returns its error.
    pub async fn failure(mut self) -> String {
        let result = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
        result
            .expect("the bridge should have failed")
            .unwrap()
            .unwrap_err()
            .to_string()
    }
}

/// Receives updates until `done` holds for the collected list, or panics.
pub async fn collect_until(
    rx: &mut mpsc::Receiver<DbUpdate>,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&[DbUpdate]) -> bool,
) -> Vec<DbUpdate> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(u)) => got.push(u),
            Ok(None) => panic!("subscriber ended while waiting for {what}; got {got:#?}"),
            Err(_) => panic!("timed out waiting for {what}; got {got:#?}"),
        }
    }
    got
}

/// ZeroMQ subscribers join late (the "slow joiner"): writes `/probe/N` keys
/// through `put` until one arrives, then drains what is left of the probes.
pub async fn await_flow<F, Fut>(rx: &mut mpsc::Receiver<DbUpdate>, mut put: F)
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = ()>,
{
    let start = Instant::now();
    for i in 0.. {
        put(i).await;
        if let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            assert_eq!(
                u.table, "probe",
                "unexpected update before the flow was up: {u:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no update reached the subscriber"
        );
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {}
}

pub fn workspace_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// What a subscriber believes the database holds, by (table, key), after
/// applying `updates` in order (`sync` notices are ignored).
pub fn view(updates: &[DbUpdate]) -> std::collections::BTreeMap<(String, String), String> {
    let mut state = std::collections::BTreeMap::new();
    for u in updates {
        match u.action {
            feedbridge::Action::Create | feedbridge::Action::Set => {
                state.insert(
                    (u.table.clone(), u.key.clone()),
                    u.value.clone().unwrap_or_default(),
                );
            }
            feedbridge::Action::Delete => {
                state.remove(&(u.table.clone(), u.key.clone()));
            }
            _ => {}
        }
    }
    state
}

/// Sets Redis `{probe.}N` keys until one reaches the subscriber.
pub async fn await_redis_flow(rx: &mut mpsc::Receiver<DbUpdate>, redis: &RedisServer) {
    let conn = redis.connection().await;
    await_flow(rx, |i| {
        let mut c = conn.clone();
        async move {
            redis::cmd("SET")
                .arg(format!("{{probe.}}{i}"))
                .arg("x")
                .query_async::<()>(&mut c)
                .await
                .unwrap();
        }
    })
    .await;
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves
/// nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
