//! Real etcd and Redis servers for tests and benchmarks: each starts on
//! free loopback ports in its own temp dir, is killed on drop, and can be
//! restarted on the same data for fault tests. Not part of the bridge; it
//! is public so the integration tests and `feedbridge-bench` share it.

use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A free TCP port on loopback (the OS picks it; the listener is dropped).
pub fn free_port() -> u16 {
    // Tests of one binary run in parallel threads: never hand out the same
    // port twice, even when the OS offers it again before it is bound.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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
        .unwrap_or_else(|e| panic!("cannot start {program} (scripts/setup.sh installs it): {e}"))
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A test certificate authority with a server certificate (for
/// `localhost` / 127.0.0.1) and a client certificate, made with `openssl`.
pub struct TestCerts {
    dir: TempDir,
}

impl TestCerts {
    /// Generates the CA and both certificates.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sh = |cmd: &str| {
            let ok = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl (scripts/setup.sh installs it)");
            assert!(ok.success(), "{cmd}");
        };
        sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=feedbridge-test-ca");
        for (name, ext) in [
            (
                "server",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
            ),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            sh(&format!(
                "openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name} && \
                 printf '{ext}\\n' > {name}.ext && \
                 openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2 -extfile {name}.ext"
            ));
        }
        TestCerts { dir }
    }

    /// Path of `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }
}

/// The command line of an etcd member: its name, data dir, client and
/// peer URLs, the initial cluster, progress notifications every 500 ms.
fn etcd_args(name: &str, data: &Path, client: &str, peer: &str, cluster: &str) -> Vec<String> {
    [
        "--name",
        name,
        "--data-dir",
        data.to_str().expect("a UTF-8 temp dir"),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        cluster,
        "--experimental-watch-progress-notify-interval",
        "500ms",
        "--log-level",
        "warn",
        "--logger",
        "zap",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A single-member etcd cluster.
pub struct EtcdServer {
    dir: TempDir,
    /// The client port.
    pub client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// Serve https with these, requiring client certificates.
    tls: Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts etcd serving https with `certs`, requiring a client
    /// certificate signed by the test CA.
    pub async fn start_tls(certs: &TestCerts) -> Self {
        Self::start_with(Some((
            certs.path("ca.pem"),
            certs.path("server.pem"),
            certs.path("server.key"),
        )))
        .await
    }

    async fn start_with(
        tls: Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    ) -> Self {
        let mut s = EtcdServer {
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
            tls,
        };
        s.spawn().await;
        s
    }

    /// The client URL, `http(s)://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let data = self.dir.path().join("data");
        let mut args = etcd_args(
            "default",
            &data,
            &self.endpoint(),
            &peer,
            &format!("default={peer}"),
        );
        if let Some((ca, cert, key)) = &self.tls {
            for (flag, path) in [
                ("--trusted-ca-file", ca),
                ("--cert-file", cert),
                ("--key-file", key),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
            args.push("--client-cert-auth".into());
        }
        let tls = self.tls.is_some();
        self.child = Some(spawn_logged(
            "etcd",
            &args,
            &self.dir.path().join("etcd.log"),
        ));
        let endpoint = self.endpoint();
        if tls {
            // Readiness over TLS is the test's to check, with its client cert.
            let port = self.client_port;
            eventually("etcd to listen", Duration::from_secs(20), || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            })
            .await;
            return;
        }
        eventually("etcd to answer", Duration::from_secs(20), || {
            let endpoint = endpoint.clone();
            async move {
                let mut c = etcd_client::Client::connect([endpoint], None).await.ok()?;
                c.status().await.ok().map(|_| ())
            }
        })
        .await;
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

    /// A connected client.
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
    /// The port.
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

    /// `redis://127.0.0.1:PORT/0`.
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
                let ping = async {
                    let mut c = client.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<String>(&mut c).await
                };
                // Up is up: a server with `requirepass` answers NOAUTH.
                match ping.await {
                    Ok(_) => Some(()),
                    Err(e) if e.to_string().contains("NOAUTH") => Some(()),
                    Err(_) => None,
                }
            }
        })
        .await;
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills Redis and starts it again on the same data (AOF) and port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Kills Redis.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// A connection.
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

/// A Redis Cluster on free ports: `masters` masters with `replicas` each,
/// created with `redis-cli --cluster create`, nodes restartable one by one.
/// Failover is deterministic: `cluster-node-timeout 1000` and
/// `cluster-replica-validity-factor 0` (any replica may take over).
pub struct RedisCluster {
    /// Every node; the first `masters` start as masters.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node
    /// says `cluster_state:ok` and every replica has synced.
    pub async fn start(masters: usize, replicas: usize) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let conf = format!(
                "cluster-enabled yes\ncluster-config-file nodes.conf\ncluster-node-timeout 1000\ncluster-port {}\ncluster-replica-validity-factor 0\nappendonly no",
                free_port()
            );
            nodes.push(RedisServer::start_with(&[&conf]).await);
        }
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli (scripts/setup.sh installs it)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        cluster.await_healthy().await;
        cluster
    }

    /// Waits until every running node says `cluster_state:ok`, agrees on
    /// the masters, and every replica's link to its master is up.
    pub async fn await_healthy(&self) {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .map(|n| n.port)
            .collect();
        eventually("the cluster to be healthy", Duration::from_secs(60), || {
            let ports = ports.clone();
            async move {
                for port in ports {
                    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
                    let mut c = client.get_multiplexed_async_connection().await.ok()?;
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    if !info.contains("cluster_state:ok") {
                        return None;
                    }
                    let nodes: String = redis::cmd("CLUSTER")
                        .arg("NODES")
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    if nodes.contains("fail") {
                        return None;
                    }
                    let repl: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }

    /// A seed URL (the first running node).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .find(|n| n.pid().is_some())
            .expect("a running node")
            .url()
    }

    /// A connection to the whole cluster (commands reach the key's owner).
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(vec![self.url()])
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    }

    /// The index in `nodes` of the master serving `key` now.
    pub async fn master_of(&self, key: &[u8]) -> usize {
        let slot = crate::db::redis::slot(key);
        let mut c = self.connection().await;
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await
            .unwrap();
        let nodes = crate::db::redis::parse_cluster_nodes(&text);
        let node = crate::db::redis::master_of(&nodes, slot).expect("a master serves every slot");
        self.nodes
            .iter()
            .position(|n| node.addr == format!("127.0.0.1:{}", n.port))
            .expect("a node of this cluster")
    }
}

/// An etcd cluster of `n` members on free ports, members restartable one
/// by one on their data.
pub struct EtcdCluster {
    dir: TempDir,
    /// (name, client port, peer port, process) of each member.
    members: Vec<(String, u16, u16, Option<Child>)>,
}

impl EtcdCluster {
    /// Starts every member and waits until each answers.
    pub async fn start(n: usize) -> Self {
        let members = (0..n)
            .map(|i| (format!("m{i}"), free_port(), free_port(), None))
            .collect();
        let mut cluster = EtcdCluster {
            dir: tempfile::tempdir().unwrap(),
            members,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.await_member(i).await;
        }
        cluster
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].1)
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|(name, _, peer, _)| format!("{name}=http://127.0.0.1:{peer}"))
            .collect();
        let (name, _, peer, _) = &self.members[i];
        let peer = format!("http://127.0.0.1:{peer}");
        let client = self.endpoint(i);
        let data = self.dir.path().join(name);
        let mut args = etcd_args(name, &data, &client, &peer, &initial.join(","));
        args.extend(["--initial-cluster-state".into(), "new".into()]);
        let log = self.dir.path().join(format!("{name}.log"));
        self.members[i].3 = Some(spawn_logged("etcd", &args, &log));
    }

    async fn await_member(&self, i: usize) {
        let endpoint = self.endpoint(i);
        eventually("an etcd member to answer", Duration::from_secs(30), || {
            let endpoint = endpoint.clone();
            async move {
                let mut c = etcd_client::Client::connect([endpoint], None).await.ok()?;
                c.status().await.ok().map(|_| ())
            }
        })
        .await;
    }

    /// Kills member `i` (SIGKILL).
    pub fn stop(&mut self, i: usize) {
        kill(&mut self.members[i].3);
    }

    /// Kills member `i` and starts it again on its data.
    pub async fn restart(&mut self, i: usize) {
        self.stop(i);
        self.spawn(i);
        self.await_member(i).await;
    }

    /// A client of every member.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.endpoints(), None)
            .await
            .unwrap()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            kill(&mut m.3);
        }
    }
}

/// What a [`FaultProxy`] does to the traffic through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards both ways.
    Pass,
    /// A partition: forwards nothing and sends nothing back (no RST, no
    /// FIN). Connections stay open and new ones are accepted and held. The
    /// proxy stops reading, so what a peer sends piles up in its buffers,
    /// as it would when packets are dropped.
    Blackhole,
    /// Resets every connection (RST), and each new one as it arrives.
    Reset,
    /// Forwards both ways, each read delayed by this long.
    Latency(Duration),
}

/// A fault-injecting TCP proxy in the manner of toxiproxy, for tests that
/// cut links between real processes without root: a client connects to
/// [`FaultProxy::addr`] instead of the server, and the test turns faults on
/// and off with [`FaultProxy::set`].
///
/// After a [`Fault::Blackhole`] heals, a connection one side of which
/// closed during the cut (the far side gave up: Redis dropped a slow
/// subscriber, a ZeroMQ publisher timed out its heartbeat) is not closed on
/// the other side either: as on a real network, whose goodbye was lost in
/// the partition, that side learns only when it next sends something (it is
/// reset then). [`FaultProxy::far_side_gives_up`] makes the servers' side
/// give up at once, as their TCP stack would after its retransmissions
/// (about 15 minutes with Linux defaults) or a host that lost power.
///
/// It runs on a thread of its own, so a test runtime that blocks cannot
/// stall it; dropping it closes every connection.
pub struct FaultProxy {
    addr: std::net::SocketAddr,
    mode: tokio::sync::watch::Sender<Fault>,
    give_up: tokio::sync::watch::Sender<u64>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("fault", &*self.mode.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// A proxy on a free loopback port to `upstream` (`HOST:PORT`).
    pub fn start(upstream: &str) -> Self {
        let upstream: std::net::SocketAddr = upstream
            .parse()
            .unwrap_or_else(|e| panic!("upstream {upstream:?} is not HOST:PORT: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, mode_rx) = tokio::sync::watch::channel(Fault::Pass);
        let (give_up, give_up_rx) = tokio::sync::watch::channel(0u64);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let accept = async {
                        loop {
                            let Ok((down, _)) = listener.accept().await else {
                                continue;
                            };
                            tokio::spawn(relay(
                                down,
                                upstream,
                                mode_rx.clone(),
                                give_up_rx.clone(),
                            ));
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        () = accept => {}
                    }
                });
                // Dropping the runtime drops every connection.
            })
            .unwrap();
        FaultProxy {
            addr,
            mode,
            give_up,
            stop,
        }
    }

    /// `HOST:PORT` to connect to instead of the upstream.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Applies `fault` to every connection, open or new.
    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    /// During a [`Fault::Blackhole`]: the servers' side gives up every cut
    /// connection now (it is closed towards the server; the client hears
    /// nothing).
    pub fn far_side_gives_up(&self) {
        self.give_up.send_modify(|n| *n += 1);
    }

    /// Stops the proxy, closing every connection.
    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// Closes `stream` with a reset (RST) instead of a goodbye.
fn reset(stream: tokio::net::TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// What was waiting on one side of a connection when a cut healed.
enum Drained {
    /// It is still open; these bytes came meanwhile.
    Open(Vec<u8>),
    /// It closed during the cut.
    Gone,
}

/// Reads what `stream` holds without waiting.
fn drain(stream: &tokio::net::TcpStream) -> Drained {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return Drained::Gone,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Drained::Open(got),
            Err(_) => return Drained::Gone,
        }
    }
}

/// Holds a connection whose other side is gone, silent, until its owner
/// sends something (it is reset then, as a host that forgot the connection
/// answers) or closes it.
async fn orphan(stream: tokio::net::TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => return reset(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

/// One proxied connection: `down` is the client's side, `upstream` the
/// server's address.
async fn relay(
    down: tokio::net::TcpStream,
    upstream: std::net::SocketAddr,
    mut mode: tokio::sync::watch::Receiver<Fault>,
    mut give_up: tokio::sync::watch::Receiver<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A connection made during a cut is held until it heals.
    loop {
        match *mode.borrow_and_update() {
            Fault::Blackhole => {}
            Fault::Reset => return reset(down),
            Fault::Pass | Fault::Latency(_) => break,
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
    let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
        return reset(down);
    };
    let _ = (down.set_nodelay(true), up.set_nodelay(true));
    let (mut down, mut up) = (down, up);
    give_up.borrow_and_update();
    let mut cut = false;
    let (mut down_open, mut up_open) = (true, true);
    let (mut from_down, mut from_up) = (vec![0u8; 65536], vec![0u8; 65536]);
    loop {
        let fault = *mode.borrow_and_update();
        match fault {
            Fault::Reset => {
                reset(up);
                return reset(down);
            }
            Fault::Blackhole => {
                cut = true;
                // Giving up first: a test that says "give up, then heal"
                // must never see the piled-up bytes delivered.
                tokio::select! {
                    biased;
                    changed = give_up.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // The server's side forgets the connection; the
                        // client's goodbye never comes.
                        drop(up);
                        while *mode.borrow_and_update() == Fault::Blackhole {
                            if mode.changed().await.is_err() {
                                return;
                            }
                        }
                        return orphan(down).await;
                    }
                    changed = mode.changed() => if changed.is_err() { return },
                }
                continue;
            }
            Fault::Pass | Fault::Latency(_) => {}
        }
        if std::mem::take(&mut cut) {
            // What piled up during the cut: delivered if both sides are
            // still there; if one gave up meanwhile, the other is orphaned.
            match (drain(&down), drain(&up)) {
                (Drained::Open(to_up), Drained::Open(to_down)) => {
                    if up.write_all(&to_up).await.is_err()
                        || down.write_all(&to_down).await.is_err()
                    {
                        reset(up);
                        return reset(down);
                    }
                }
                (Drained::Gone, Drained::Open(_)) => return orphan(up).await,
                (_, Drained::Gone) => return orphan(down).await,
            }
        }
        let delay = match fault {
            Fault::Latency(d) => d,
            _ => Duration::ZERO,
        };
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return },
            r = down.read(&mut from_down), if down_open => match r {
                Ok(0) => {
                    down_open = false;
                    let _ = up.shutdown().await;
                }
                Ok(n) => {
                    tokio::time::sleep(delay).await;
                    if up.write_all(&from_down[..n]).await.is_err() {
                        return reset(down);
                    }
                }
                Err(_) => return reset(up),
            },
            r = up.read(&mut from_up), if up_open => match r {
                Ok(0) => {
                    up_open = false;
                    let _ = down.shutdown().await;
                }
                Ok(n) => {
                    tokio::time::sleep(delay).await;
                    if down.write_all(&from_up[..n]).await.is_err() {
                        return reset(up);
                    }
                }
                Err(_) => return reset(down),
            },
        }
        if !down_open && !up_open {
            return;
        }
    }
}
