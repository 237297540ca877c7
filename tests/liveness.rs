//! Links that die without a word (issue 19). A partition drops packets:
//! no RST, no FIN, and a socket that only receives never notices. Each test
//! cuts one link through the fault-injecting proxy of `feedbridge::testing`
//! while etcd or Redis is being written, holds the cut long enough for the
//! far side to give up on the connection, heals it, and checks that the
//! near side noticed within its bound and that the subscriber (an
//! application that re-reads the database on a `sync`, as Dragonflow's
//! controllers do) ends equal to the database.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{BackendConfig, EtcdBackendConfig, RedisBackendConfig, ZmqBackendConfig};
use feedbridge::pubsub::Subscriber;
use feedbridge::testing::{Fault, FaultProxy};
use feedbridge::{Action, DbUpdate};
use tokio::sync::mpsc;

/// The subscribers' silence timeout in these tests (the least allowed).
const SILENCE: Duration = Duration::from_secs(2);
/// A subscriber notices a dead link within its silence timeout plus one
/// liveness check and some scheduling.
const DETECT: Duration = Duration::from_secs(5);
/// After the link heals, every subscriber equals the database within this
/// (reconnect backoff, resubscription, the re-read after a `sync`).
const CONVERGE: Duration = Duration::from_secs(20);

/// Where an application re-reads its rows: the `lport` table.
#[derive(Clone)]
enum Db {
    Etcd(Box<etcd_client::Client>),
    Redis(redis::aio::MultiplexedConnection),
}

impl Db {
    async fn rows(&self) -> BTreeMap<String, String> {
        match self {
            Db::Etcd(kv) => etcd_state_of((**kv).clone())
                .await
                .into_iter()
                .map(|((_, k), v)| (k, v))
                .collect(),
            Db::Redis(conn) => {
                let mut c = conn.clone();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}*", REDIS_PREFIX))
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let mut rows = BTreeMap::new();
                for key in keys {
                    let value: Option<String> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    if let Some(v) = value {
                        rows.insert(key[REDIS_PREFIX.len()..].to_owned(), v);
                    }
                }
                rows
            }
        }
    }
}

/// The Redis source's default layout for table `lport`, topic `D`.
const REDIS_PREFIX: &str = "{lport.D}";

/// An application as Dragonflow runs one: applies every update to its own
/// copy of the rows and, on a `sync`, re-reads them from the database.
#[derive(Clone, Default)]
struct App {
    rows: Arc<Mutex<BTreeMap<String, String>>>,
    syncs: Arc<AtomicUsize>,
}

impl App {
    fn run(mut rx: mpsc::Receiver<DbUpdate>, db: Db) -> App {
        let app = App::default();
        let me = app.clone();
        tokio::spawn(async move {
            while let Some(u) = rx.recv().await {
                match u.action {
                    Action::Sync => {
                        me.syncs.fetch_add(1, Relaxed);
                        let fresh = db.rows().await;
                        *me.rows.lock().unwrap() = fresh;
                    }
                    Action::Create | Action::Set if u.table == "lport" => {
                        me.rows
                            .lock()
                            .unwrap()
                            .insert(u.key, u.value.unwrap_or_default());
                    }
                    Action::Delete if u.table == "lport" => {
                        me.rows.lock().unwrap().remove(&u.key);
                    }
                    _ => {}
                }
            }
        });
        app
    }

    fn syncs(&self) -> usize {
        self.syncs.load(Relaxed)
    }

    /// Waits until the application's rows equal the database's; returns
    /// how long that took.
    async fn converges_with(&self, db: &Db, what: &str) -> Duration {
        let start = Instant::now();
        let deadline = start + CONVERGE;
        loop {
            let theirs = db.rows().await;
            let mine = self.rows.lock().unwrap().clone();
            if mine == theirs {
                return start.elapsed();
            }
            if Instant::now() > deadline {
                let stale = theirs
                    .iter()
                    .filter(|(k, v)| mine.get(*k) != Some(*v))
                    .count();
                let extra = mine.keys().filter(|k| !theirs.contains_key(*k)).count();
                panic!(
                    "{what}: {stale} of {} rows stale and {extra} deleted rows kept {:?} after the link healed ({} syncs)",
                    theirs.len(),
                    CONVERGE,
                    self.syncs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Writes `lport` rows over 50 keys (every 13th write a delete) until
/// stopped, with `pace` between writes and values of `size` bytes.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl Writer {
    fn etcd(endpoint: String, pace: Duration, size: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let task = tokio::spawn(async move {
            let mut kv = etcd_client::Client::connect([endpoint], None)
                .await
                .unwrap();
            let mut i = 0;
            while !done.load(Relaxed) {
                let key = format!("/lport/k{}", i % 50);
                if i % 13 == 12 {
                    kv.delete(key, None).await.unwrap();
                } else {
                    kv.put(key, format!("v{i}-{}", "x".repeat(size)), None)
                        .await
                        .unwrap();
                }
                i += 1;
                tokio::time::sleep(pace).await;
            }
            i
        });
        Writer { stop, task }
    }

    fn redis(conn: redis::aio::MultiplexedConnection, pace: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let task = tokio::spawn(async move {
            let mut c = conn;
            let mut i = 0;
            while !done.load(Relaxed) {
                let key = format!("{REDIS_PREFIX}k{}", i % 50);
                let mut cmd = if i % 13 == 12 {
                    redis::cmd("DEL")
                } else {
                    redis::cmd("SET")
                };
                cmd.arg(&key);
                if i % 13 != 12 {
                    cmd.arg(format!("v{i}"));
                }
                cmd.query_async::<redis::Value>(&mut c).await.unwrap();
                i += 1;
                tokio::time::sleep(pace).await;
            }
            i
        });
        Writer { stop, task }
    }

    /// Stops writing; returns how many writes were made.
    async fn stop(self) -> usize {
        self.stop.store(true, Relaxed);
        tokio::time::timeout(STREAM_WAIT, self.task)
            .await
            .expect("the writer to stop")
            .unwrap()
    }
}

fn etcd_source(etcd: &str) -> String {
    format!("[source]\ntype = \"etcd\"\nendpoints = [\"{etcd}\"]\n")
}

fn zmq_backend(port: u16) -> String {
    format!(
        "[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{port}\"\nsilence_timeout = \"2s\"\n"
    )
}

fn zmq_subscriber(endpoint: &str) -> Arc<dyn Subscriber> {
    let sub = PubSub::new(BackendConfig::Zmq(ZmqBackendConfig {
        bind: endpoint.to_owned(),
        codec: Codec::Msgpack,
        send_hwm: 1000,
        linger: Duration::ZERO,
        rejoin_wait: Duration::ZERO,
        silence_timeout: SILENCE,
    }))
    .get_subscriber();
    sub.register_topic("");
    sub
}

/// An etcd → ZeroMQ bridge and a subscriber reaching it through a fault
/// proxy, with updates flowing.
async fn zmq_through_proxy() -> (
    EtcdServer,
    Bridge,
    FaultProxy,
    Arc<dyn Subscriber>,
    mpsc::Receiver<DbUpdate>,
) {
    let etcd = EtcdServer::start().await;
    let port = free_port();
    let bridge = Bridge::start(&(etcd_source(&etcd.endpoint()) + &zmq_backend(port)));
    let proxy = FaultProxy::start(&format!("127.0.0.1:{port}"));
    let sub = zmq_subscriber(&format!("tcp://{}", proxy.addr()));
    let (mut rx, _pump) = sub.clone().updates(4096);
    await_etcd_flow(&mut rx, &etcd.client().await).await;
    (etcd, bridge, proxy, sub, rx)
}

/// Waits until `sub` has taken a connection for dead; returns when.
async fn noticed(sub: &Arc<dyn Subscriber>, since: Instant, what: &str) -> Duration {
    eventually(what, DETECT + SILENCE, || {
        let n = sub.silences();
        async move { (n > 0).then_some(()) }
    })
    .await;
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zmq_subscriber_whose_publisher_gave_up_during_a_partition_reconnects_and_resyncs() {
    let (etcd, _bridge, proxy, sub, rx) = zmq_through_proxy().await;
    let kv = etcd.client().await;
    let db = Db::Etcd(Box::new(kv));
    let app = App::run(rx, db.clone());
    let writer = Writer::etcd(etcd.endpoint(), Duration::from_millis(5), 0);

    tokio::time::sleep(Duration::from_millis(500)).await; // writes flowing
    proxy.set(Fault::Blackhole);
    let cut = Instant::now();
    // The bridge's side frees the connection (its ZMTP heartbeat times
    // out; with kernel defaults TCP would after ~15 minutes): from then on
    // nothing would ever reach this subscriber on it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.far_side_gives_up();
    let detected = noticed(&sub, cut, "the subscriber to notice the silence").await;
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(1)).await; // writes after the heal
    let writes = writer.stop().await;
    let converged = app.converges_with(&db, "zmq subscriber").await;
    // Heard again after the heal, the bridge's heartbeat showed what was
    // missed, and its replay buffer sent it: no re-read.
    assert_eq!(app.syncs(), 0, "the cut was replayed, not re-read");
    println!("zmq subscriber: {writes} writes, silence noticed {detected:?} after the cut, converged {converged:?} after the writes stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dragonflow_python_subscriber_cut_off_while_idle_recovers_through_the_heartbeat_ttl() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let etcd = EtcdServer::start().await;
    let port = free_port();
    let _bridge = Bridge::start(&(etcd_source(&etcd.endpoint()) + &zmq_backend(port)));
    let proxy = FaultProxy::start(&format!("127.0.0.1:{port}"));
    // Dragonflow's subscriber sets no heartbeat option of its own: only the
    // TTL the publisher's pings carry can make it drop a dead connection.
    let mut py = tokio::process::Command::new("python3")
        .arg(workspace_path("tests/interop/dragonflow_subscriber.py"))
        .arg(format!("tcp://{}", proxy.addr()))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with pyzmq and msgpack (scripts/setup.sh installs them)");
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));
    let mut kv = etcd.client().await;
    // Writes `key` until the Python subscriber prints it.
    async fn reaches(
        kv: &mut etcd_client::Client,
        lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
        key: &str,
        within: Duration,
    ) -> Duration {
        let start = Instant::now();
        loop {
            kv.put(format!("/lport/{key}"), "x", None).await.unwrap();
            let wait = tokio::time::timeout(Duration::from_millis(300), async {
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains(key) {
                        return;
                    }
                }
            });
            if wait.await.is_ok() {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "the Python subscriber never received {key}"
            );
        }
    }
    reaches(&mut kv, &mut lines, "before", Duration::from_secs(20)).await;
    // libzmq arms the TTL on a ping and disarms it on any later message:
    // the link dies while idle, after the publisher's next ping.
    tokio::time::sleep(feedbridge::zmq_socket::ZMTP_PING_INTERVAL * 2).await;
    proxy.set(Fault::Blackhole);
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.far_side_gives_up();
    tokio::time::sleep(SILENCE).await; // the cut outlasts the TTL
    proxy.set(Fault::Pass);
    let back = reaches(&mut kv, &mut lines, "after", CONVERGE).await;
    println!("Dragonflow-style subscriber: receiving again {back:?} after the heal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_subscriber_that_redis_dropped_during_a_partition_reconnects_and_resyncs() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let mut admin = redis.connection().await;
    // A small pub/sub output buffer: Redis drops the cut-off subscriber
    // soon ("scheduled to be closed ASAP"), and its goodbye is lost.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 65536 32768 1")
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let _bridge = Bridge::start(&format!(
        "{}[backend]\ntype = \"redis\"\nurl = \"{}\"\n",
        etcd_source(&etcd.endpoint()),
        redis.url()
    ));
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", redis.port));
    let sub = PubSub::new(BackendConfig::Redis(RedisBackendConfig {
        url: format!("redis://{}/0", proxy.addr()),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        sharded: false,
        silence_timeout: SILENCE,
        auth: Default::default(),
    }))
    .get_subscriber();
    sub.register_topic("");
    let (mut rx, _pump) = sub.clone().updates(4096);
    let kv = etcd.client().await;
    await_etcd_flow(&mut rx, &kv).await;
    let db = Db::Etcd(Box::new(kv));
    let app = App::run(rx, db.clone());
    // Values of 16 KiB: megabytes a second, so the subscriber's buffers
    // (the kernel's, then Redis') fill within the cut.
    let writer = Writer::etcd(etcd.endpoint(), Duration::ZERO, 16 * 1024);

    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Fault::Blackhole);
    let cut = Instant::now();
    eventually(
        "Redis to drop the cut-off subscriber",
        Duration::from_secs(30),
        || {
            let mut c = admin.clone();
            async move {
                let mut numpat = redis::cmd("PUBSUB");
                numpat.arg("NUMPAT");
                let n: i64 =
                    tokio::time::timeout(Duration::from_secs(1), numpat.query_async(&mut c))
                        .await
                        .ok()?
                        .ok()?;
                (n == 0).then_some(())
            }
        },
    )
    .await;
    let dropped = cut.elapsed();
    let detected = noticed(&sub, cut, "the subscriber to notice Redis is silent").await;
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = writer.stop().await;
    let converged = app.converges_with(&db, "redis subscriber").await;
    // What was published meanwhile came from the bridge's replay buffer
    // (tests/resume.rs), or, past it, with a sync and a re-read.
    println!("redis subscriber: {writes} writes, Redis dropped it {dropped:?} and it noticed {detected:?} after the cut, converged {converged:?} after the writes stopped ({} syncs)", app.syncs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_subscriber_cut_off_notices_and_resumes_from_its_revision() {
    let etcd = EtcdServer::start().await;
    let _bridge = Bridge::start(&format!(
        "{}[backend]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n",
        etcd_source(&etcd.endpoint()),
        etcd.endpoint()
    ));
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", etcd.client_port));
    let sub = PubSub::new(BackendConfig::Etcd(EtcdBackendConfig {
        endpoints: vec![format!("http://{}", proxy.addr())],
        prefix: "/pubsub/".into(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        silence_timeout: SILENCE,
        auth: Default::default(),
    }))
    .get_subscriber();
    sub.register_topic("");
    let (mut rx, _pump) = sub.clone().updates(4096);
    let kv = etcd.client().await;
    await_etcd_flow(&mut rx, &kv).await;
    let db = Db::Etcd(Box::new(kv));
    let app = App::run(rx, db.clone());
    let writer = Writer::etcd(etcd.endpoint(), Duration::from_millis(5), 0);

    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Fault::Blackhole);
    let cut = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.far_side_gives_up();
    let detected = noticed(&sub, cut, "the subscriber to notice etcd is silent").await;
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = writer.stop().await;
    let converged = app.converges_with(&db, "etcd subscriber").await;
    // etcd keeps the history: the subscriber resumed from its revision and
    // missed nothing, so it had no reason for a sync.
    assert_eq!(app.syncs(), 0, "resumed, not re-read");
    println!("etcd subscriber: {writes} writes, silence noticed {detected:?} after the cut, converged {converged:?} after the writes stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_source_cut_off_reports_its_lag_unknown_and_resumes_losing_nothing() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", etcd.client_port));
    let bridge = Bridge::start(&format!(
        "{}[backend]\ntype = \"redis\"\nurl = \"{}\"\n",
        etcd_source(&format!("http://{}", proxy.addr())),
        redis.url()
    ));
    let received = {
        let mut rx = redis_updates(&redis.url());
        await_etcd_flow(&mut rx, &etcd.client().await).await;
        Received::collecting(rx).0
    };
    let log: Log = Default::default();
    let writer = tokio::spawn(write_ops(etcd.endpoint(), 0, 600, log.clone()));
    eventually("writes under way", STREAM_WAIT, || {
        let n = log.lock().unwrap().len();
        async move { (n > 100).then_some(()) }
    })
    .await;
    proxy.set(Fault::Blackhole);
    let cut = Instant::now();
    // While the source cannot hear etcd, the lag is unknown, never 0.
    let status = eventually("the lag to read unknown", Duration::from_secs(15), || {
        let metrics = bridge.stats.encode();
        async move {
            metrics
                .lines()
                .any(|l| l == "feedbridge_lag_revisions -1")
                .then(|| feedbridge::status::Snapshot::parse(&metrics, (false, String::new())))
        }
    })
    .await;
    let unknown_after = cut.elapsed();
    let screen = status.render("http://bridge", None);
    assert!(
        screen.contains("lag") && screen.contains("unknown"),
        "{screen}"
    );
    proxy.far_side_gives_up();
    proxy.set(Fault::Pass);
    writer.await.unwrap();
    verify(&log, &received, &etcd).await;
    eventually("the lag to be known again", STREAM_WAIT, || {
        let known = !bridge.stats.source_blind();
        async move { known.then_some(()) }
    })
    .await;
    println!("etcd source: lag unknown {unknown_after:?} after the cut; nothing lost");
}

/// The nemesis' seeds 2 and 3 (issue 22): etcd compacts the history a
/// running bridge has not read yet (its link was cut, or it was stopped).
/// The bridge re-lists and publishes each row's state at the re-list,
/// deletes included, with no `sync`: its subscribers end equal to etcd and
/// nobody re-reads; the intermediate revisions are gone from etcd and are
/// not delivered (as a Kubernetes informer's relist after `410 Gone`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_source_cut_off_across_a_compaction_publishes_each_rows_state_with_no_sync() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", etcd.client_port));
    let bridge = Bridge::start(&format!(
        "{}[backend]\ntype = \"redis\"\nurl = \"{}\"\n",
        etcd_source(&format!("http://{}", proxy.addr())),
        redis.url()
    ));
    let mut kv = etcd.client().await;
    let received = {
        let mut rx = redis_updates(&redis.url());
        await_etcd_flow(&mut rx, &kv).await;
        Received::collecting(rx).0
    };
    for (k, v) in [("k1", "a"), ("k2", "b"), ("k4", "d")] {
        kv.put(format!("/lport/{k}"), v, None).await.unwrap();
    }
    received
        .wait("the rows before the cut", |g| view(&lport(g)).len() == 3)
        .await;

    proxy.set(Fault::Blackhole);
    eventually(
        "the source to notice the cut",
        Duration::from_secs(15),
        || {
            let blind = bridge.stats.source_blind();
            async move { blind.then_some(()) }
        },
    )
    .await;
    let mut intermediate = Vec::new();
    for v in ["a2", "a3"] {
        let r = kv.put("/lport/k1", v, None).await.unwrap();
        intermediate.push(r.header().unwrap().revision());
    }
    kv.put("/lport/k1", "a4", None).await.unwrap();
    kv.delete("/lport/k2", None).await.unwrap();
    kv.put("/lport/k3", "c", None).await.unwrap(); // created and deleted unseen
    kv.delete("/lport/k3", None).await.unwrap();
    kv.delete("/lport/k4", None).await.unwrap();
    kv.put("/lport/k5", "e", None).await.unwrap();
    let rev = kv
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    kv.compact(rev, None).await.unwrap();
    proxy.far_side_gives_up();
    proxy.set(Fault::Pass);

    let expected = etcd_state(&etcd).await;
    received
        .wait("each row's state after the re-list", |g| {
            view(&lport(g)) == expected
        })
        .await;
    let got = received.all();
    let deleted: Vec<&str> = got
        .iter()
        .filter(|u| u.action == Action::Delete)
        .map(|u| u.key.as_str())
        .collect();
    assert!(
        deleted.contains(&"k2") && deleted.contains(&"k4"),
        "every row deleted meanwhile gets its delete: {deleted:?}"
    );
    assert!(
        !got.iter().any(|u| u.action == Action::Sync),
        "the re-list carried every row's state: no re-read"
    );
    assert_eq!(bridge.stats.syncs_published.get(), 0);
    assert!(
        !got.iter()
            .any(|u| u.revision.is_some_and(|r| intermediate.contains(&r))),
        "compacted revisions cannot be delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_source_cut_off_notices_and_reconciles_what_changed_meanwhile() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", redis.port));
    let port = free_port();
    let bridge = Bridge::start(&format!(
        "[source]\ntype = \"redis\"\nurl = \"redis://{}/0\"\n{}",
        proxy.addr(),
        zmq_backend(port)
    ));
    let sub = zmq_subscriber(&format!("tcp://127.0.0.1:{port}"));
    let (mut rx, _pump) = sub.clone().updates(4096);
    let conn = redis.connection().await;
    await_redis_flow(&mut rx, &redis).await;
    let db = Db::Redis(conn.clone());
    let app = App::run(rx, db.clone());
    let writer = Writer::redis(conn, Duration::from_millis(2));

    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Fault::Blackhole);
    let cut = Instant::now();
    eventually("the source to notice", Duration::from_secs(15), || {
        let blind = bridge.stats.source_blind();
        async move { blind.then_some(()) }
    })
    .await;
    let detected = cut.elapsed();
    proxy.far_side_gives_up();
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = writer.stop().await;
    let converged = app.converges_with(&db, "redis source").await;
    println!("redis source: {writes} writes, cut noticed {detected:?} after it, converged {converged:?} after the writes stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ha_leader_cut_off_from_etcd_says_standby_before_another_is_elected() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", etcd.client_port));
    let config = |name: &str, election: &str| {
        format!(
            "{}[backend]\ntype = \"redis\"\nurl = \"{}\"\n[ha]\nservice = \"test\"\nendpoints = [\"{election}\"]\nlease_ttl = \"3s\"\ninstance = \"{name}\"\n",
            etcd_source(&etcd.endpoint()),
            redis.url()
        )
    };
    let a = Bridge::start(&config("a", &format!("http://{}", proxy.addr())));
    eventually("a to lead", STREAM_WAIT, || {
        let leads = a.stats.leader.get() == 1;
        async move { leads.then_some(()) }
    })
    .await;
    let b = Bridge::start(&config("b", &etcd.endpoint()));
    // b is campaigning (standing by) once its lease is granted.
    let kv = etcd.client().await;
    eventually("b to stand by", STREAM_WAIT, || {
        let mut kv = kv.clone();
        async move {
            let opts = etcd_client::GetOptions::new().with_prefix();
            let r = kv.get("/feedbridge/election/", Some(opts)).await.ok()?;
            (r.kvs().len() == 2).then_some(())
        }
    })
    .await;
    assert_eq!(b.stats.ready(), Ok("standby"));
    // Under writes, so the leader has checkpoints to store in its term.
    let writer = Writer::etcd(etcd.endpoint(), Duration::from_millis(5), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;

    proxy.set(Fault::Blackhole);
    let cut = Instant::now();
    let mut a_stood_down = None;
    loop {
        // b first: once it leads it stays leader, so a leader read after it
        // that is still 1 means both claimed to lead at once.
        let b_leads = b.stats.leader.get() == 1;
        let a_leads = a.stats.leader.get() == 1;
        assert!(
            !(a_leads && b_leads),
            "both instances claimed to lead {:?} after the cut",
            cut.elapsed()
        );
        if !a_leads && a_stood_down.is_none() {
            a_stood_down = Some(cut.elapsed());
            assert_eq!(a.stats.ready(), Ok("standby"), "readiness follows");
        }
        if b_leads {
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "b was never elected"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let b_elected = cut.elapsed();
    proxy.set(Fault::Pass);
    writer.stop().await;
    println!(
        "HA: the cut-off leader said standby {:?} after the cut, the other was elected {b_elected:?} after it",
        a_stood_down.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zmq_subscriber_whose_publisher_never_comes_back_is_told_to_re_read() {
    let (_etcd, _bridge, proxy, _sub, mut rx) = zmq_through_proxy().await;
    // Heartbeats give the subscriber a position and a replay endpoint.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Blackhole); // a host that lost power: never heals
    let cut = Instant::now();
    let sync = collect_until(&mut rx, "a sync", DETECT + SILENCE * 3, |got| {
        got.iter().any(|u| u.action == Action::Sync)
    })
    .await;
    let sync = sync.into_iter().find(|u| u.action == Action::Sync).unwrap();
    assert!(
        sync.value
            .as_deref()
            .unwrap_or_default()
            .contains("not been heard again"),
        "{sync:?}"
    );
    println!(
        "zmq subscriber: told to re-read {:?} after its publisher vanished",
        cut.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_passes_delays_blackholes_and_resets() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", redis.port));
    let ping = |timeout: Duration| {
        let url = format!("redis://{}/0", proxy.addr());
        async move {
            let client = redis::Client::open(url).unwrap();
            let start = Instant::now();
            let answer = tokio::time::timeout(timeout, async {
                let mut c = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut c).await
            })
            .await;
            (answer, start.elapsed())
        }
    };
    let (answer, _) = ping(Duration::from_secs(5)).await;
    assert_eq!(answer.unwrap().unwrap(), "PONG", "pass");
    // Each read is held 100 ms, each way (redis-rs gives an answer 500 ms).
    proxy.set(Fault::Latency(Duration::from_millis(100)));
    let (answer, took) = ping(Duration::from_secs(5)).await;
    assert_eq!(answer.unwrap().unwrap(), "PONG");
    assert!(took >= Duration::from_millis(200), "latency: {took:?}");
    proxy.set(Fault::Blackhole);
    let (answer, took) = ping(Duration::from_secs(1)).await;
    let timed_out = |a: &Result<redis::RedisResult<String>, _>| match a {
        Err(_) => true,
        Ok(Err(e)) => e.to_string().contains("timed out"),
        Ok(Ok(_)) => false,
    };
    assert!(
        timed_out(&answer) && took >= Duration::from_millis(400),
        "a blackhole answers nothing, not even an error: {answer:?} after {took:?}"
    );
    proxy.set(Fault::Reset);
    let (answer, took) = ping(Duration::from_secs(5)).await;
    assert!(
        matches!(answer, Ok(Err(_))) && !timed_out(&answer),
        "a reset fails at once: {answer:?} after {took:?}"
    );
    proxy.set(Fault::Pass);
    let (answer, _) = ping(Duration::from_secs(5)).await;
    assert_eq!(answer.unwrap().unwrap(), "PONG", "healed");
}
