//! Test helpers: real etcd and Redis servers on free ports in temp dirs
//! (killed on drop, restartable), waiting with timeouts instead of sleeps,
//! and a bridge run in-process.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feedbridge::config::Config;
use feedbridge::stats::Stats;
use feedbridge::DbUpdate;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A free TCP port on loopback (the OS picks it; the listener is dropped).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_logged(program: &str, args: &[String], log: &Path) -> Child {
    let log_file = std::fs::File::create(log).unwrap();
    Command::new(program)
        .args(args)
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {program} (run scripts/setup.sh to install it): {e}")
        })
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A single-member etcd cluster.
pub struct EtcdServer {
    dir: TempDir,
    pub client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        let mut s = EtcdServer {
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        s.spawn().await;
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let args: Vec<String> = [
            "--name",
            "default",
            "--data-dir",
            self.dir.path().join("data").to_str().unwrap(),
            "--listen-client-urls",
            &self.endpoint(),
            "--advertise-client-urls",
            &self.endpoint(),
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("default={peer}"),
            "--experimental-watch-progress-notify-interval",
            "500ms",
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.child = Some(spawn_logged(
            "etcd",
            &args,
            &self.dir.path().join("etcd.log"),
        ));
        let endpoint = self.endpoint();
        eventually("etcd to answer", Duration::from_secs(20), || {
            let endpoint = endpoint.clone();
            async move {
                let mut c = etcd_client::Client::connect([endpoint], None).await.ok()?;
                c.status().await.ok().map(|_| ())
            }
        })
        .await;
    }

    /// Kills etcd (SIGKILL) and starts it again on the same data dir and port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Kills etcd.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .unwrap()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A Redis server.
pub struct RedisServer {
    dir: TempDir,
    pub port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts Redis (AOF on, so a restart keeps the data) and waits for PONG.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// The same with extra config lines, e.g. `["rename-command", "CONFIG", "\"\""]`.
    pub async fn start_with(extra: &[&str]) -> Self {
        let mut s = RedisServer {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        s.spawn().await;
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) {
        let conf = self.dir.path().join("redis.conf");
        let mut text = format!(
            "port {}\nbind 127.0.0.1\ndir {}\nsave \"\"\nappendonly yes\nappendfsync always\ndaemonize no\n",
            self.port,
            self.dir.path().display()
        );
        if !self.extra.is_empty() {
            text.push_str(&self.extra.join(" "));
            text.push('\n');
        }
        std::fs::write(&conf, text).unwrap();
        let args = vec![conf.to_str().unwrap().to_owned()];
        self.child = Some(spawn_logged(
            "redis-server",
            &args,
            &self.dir.path().join("redis.log"),
        ));
        let url = self.url();
        eventually("redis to answer", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

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
