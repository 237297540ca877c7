//! Resume, don't re-read (issue 21): a subscriber that stays up while the
//! bridge restarts (SIGTERM, `kill -9`) or fails over to another HA member
//! delivers no `sync`: the new run starts at or before the position the
//! subscriber had verified, so it misses nothing, and the updates repeated
//! by the replay are dropped. Every written revision still arrives, each
//! row's updates in order, and the subscriber ends equal to etcd. A `sync`
//! is still delivered when the history is gone (compaction:
//! `tests/faults.rs` `fault3_…`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{
    BackendConfig, EtcdBackendConfig, ZmqBackendConfig, DEFAULT_SILENCE_TIMEOUT,
};
use feedbridge::pubsub::Subscriber;
use feedbridge::{Action, DbUpdate};

const BIN: &str = env!("CARGO_BIN_EXE_feedbridge");

/// A bridge process: `config` is a file, or the shipped default with the
/// test's etcd and ZeroMQ port in the environment.
fn spawn(config: &Path, etcd: &EtcdServer, zmq: &str, log: &Path) -> KillOnDrop {
    spawn_with(
        config,
        &[
            ("FEEDBRIDGE_ETCD_ENDPOINTS", &etcd.endpoint()),
            ("FEEDBRIDGE_ZMQ_BIND", zmq),
        ],
        log,
    )
}

fn spawn_with(config: &Path, env: &[(&str, &str)], log: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Collects what `sub` delivers, and fails the test on any `sync`.
fn collect(sub: &Arc<dyn Subscriber>) -> (Received, tokio::task::JoinHandle<()>) {
    let (rx, _pump) = sub.clone().updates(4096);
    Received::collecting(rx)
}

fn syncs(received: &Received) -> Vec<DbUpdate> {
    received
        .all()
        .into_iter()
        .filter(|u| u.action == Action::Sync)
        .collect()
}

/// Each row's updates arrived once, in revision order (the replay's
/// repeats were dropped).
fn once_and_in_order(received: &Received) {
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for u in lport(&received.all()) {
        let rev = u.revision.expect("etcd updates carry their revision");
        if let Some(before) = last.insert(u.key.clone(), rev) {
            assert!(
                before < rev,
                "row {} got revision {rev} after {before}",
                u.key
            );
        }
    }
}

/// Waits until the bridge's writes are flowing to `received` (a probe
/// arrived), as a subscriber that joined before the restart.
async fn flowing(received: &Received, kv: &etcd_client::Client) {
    flowing_again(received, kv, "first").await
}

/// The same with probes named after `run`: a bridge just started is up
/// (and handles signals) once one of its own arrives.
async fn flowing_again(received: &Received, kv: &etcd_client::Client, run: &str) {
    let mut kv = kv.clone();
    for i in 0.. {
        kv.put(format!("/probe/{run}-{i}"), "x", None)
            .await
            .unwrap();
        let seen = eventually_or_none(Duration::from_millis(300), || {
            received
                .all()
                .iter()
                .any(|u| u.table == "probe" && u.key.starts_with(run))
        })
        .await;
        if seen {
            return;
        }
        assert!(i < 100, "nothing reached the subscriber");
    }
}

async fn eventually_or_none(within: Duration, ok: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ok()
}

/// How the bridge goes down.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Term,
    Kill,
}

fn stop(bridge: &mut KillOnDrop, how: Stop) {
    match how {
        Stop::Term => {
            let pid = bridge.id().to_string();
            assert!(Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success());
            let status = wait_exit(bridge, Duration::from_secs(20));
            assert!(status.success(), "a graceful stop exits 0: {status:?}");
        }
        Stop::Kill => {
            bridge.kill().unwrap();
            bridge.wait().unwrap();
        }
    }
}

/// A subscriber stays up while the bridge (`config`, or the shipped one)
/// is stopped `how` twice under writes and started again; it delivers no
/// `sync` and ends with every written revision and etcd's state.
/// `positions`: the subscriber's backend announces positions in heartbeats
/// (ZeroMQ, Redis).
async fn restarts_cost_no_sync(
    how: Stop,
    config: Option<&str>,
    positions: bool,
    subscriber: impl FnOnce(&EtcdServer, &str) -> Arc<dyn Subscriber>,
) {
    let etcd = EtcdServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let zmq = format!("tcp://127.0.0.1:{}", free_port());
    let config = match config {
        Some(text) => {
            let path = dir.path().join("bridge.toml");
            std::fs::write(&path, text).unwrap();
            path
        }
        None => workspace_path("config/feedbridge.toml"),
    };
    let mut bridge = spawn(&config, &etcd, &zmq, &dir.path().join("bridge0.log"));
    let sub = subscriber(&etcd, &zmq);
    let (received, _task) = collect(&sub);
    let kv = etcd.client().await;
    flowing(&received, &kv).await;
    let log: Log = Default::default();
    let writer = tokio::spawn(write_ops(etcd.endpoint(), 0, 1500, log.clone()));
    for (n, at) in [(1, 400), (2, 900)] {
        eventually("the writer under way", STREAM_WAIT, || {
            let done = log.lock().unwrap().len() >= at;
            async move { done.then_some(()) }
        })
        .await;
        stop(&mut bridge, how);
        bridge = spawn(
            &config,
            &etcd,
            &zmq,
            &dir.path().join(format!("bridge{n}.log")),
        );
        flowing_again(&received, &kv, &format!("run{n}")).await;
    }
    writer.await.unwrap();
    verify(&log, &received, &etcd).await;
    once_and_in_order(&received);
    // A late tail-loss or restart verdict comes with a heartbeat: wait for
    // one past the last write. (An etcd subscriber's watch resumes by
    // itself and its publisher announces no position: it needs none.)
    if positions {
        positioned_at(&sub, last_revision(&log)).await;
    }
    let syncs = syncs(&received);
    assert!(
        syncs.is_empty(),
        "{how:?} twice: the subscriber was told to re-read: {syncs:?} (logs in {})",
        dir.keep().display()
    );
    drop(bridge);
}

fn zmq_subscriber(_: &EtcdServer, zmq: &str) -> Arc<dyn Subscriber> {
    let sub = PubSub::new(BackendConfig::Zmq(ZmqBackendConfig {
        bind: zmq.to_owned(),
        codec: Codec::Msgpack,
        send_hwm: 1000,
        linger: Duration::ZERO,
        rejoin_wait: Duration::ZERO,
        silence_timeout: DEFAULT_SILENCE_TIMEOUT,
    }))
    .get_subscriber();
    sub.register_topic("");
    sub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_with_the_shipped_config_costs_a_zmq_subscriber_no_sync() {
    restarts_cost_no_sync(Stop::Term, None, true, zmq_subscriber).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_with_the_shipped_config_costs_a_zmq_subscriber_no_sync() {
    restarts_cost_no_sync(Stop::Kill, None, true, zmq_subscriber).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_cost_a_redis_subscriber_no_sync() {
    let redis = RedisServer::start().await;
    let config = format!(
        "[source]\ntype = \"etcd\"\n[backend]\ntype = \"redis\"\nurl = \"{}\"\n",
        redis.url()
    );
    let url = redis.url();
    restarts_cost_no_sync(Stop::Kill, Some(&config), true, move |_, _| {
        redis_subscriber(&url)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_cost_an_etcd_subscriber_no_sync() {
    let config = "[source]\ntype = \"etcd\"\n[backend]\ntype = \"etcd\"\n";
    restarts_cost_no_sync(Stop::Kill, Some(config), false, |etcd, _| {
        let sub = PubSub::new(BackendConfig::Etcd(EtcdBackendConfig {
            endpoints: vec![etcd.endpoint()],
            prefix: "/pubsub/".into(),
            codec: Codec::Msgpack,
            connect_timeout: Duration::from_secs(5),
            silence_timeout: DEFAULT_SILENCE_TIMEOUT,
            auth: Default::default(),
        }))
        .get_subscriber();
        sub.register_topic("");
        sub
    })
    .await;
}

/// An HA pair on Redis; the leader is stopped `how` under writes and the
/// standby takes over; the subscriber delivers no `sync`.
async fn a_failover_costs_no_sync(how: Stop) {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[source]\ntype = \"etcd\"\n[backend]\ntype = \"redis\"\nurl = \"{}\"\n[ha]\nservice = \"test\"\nlease_ttl = \"2s\"\ninstance = \"{name}\"\n",
                redis.url()
            ),
        )
        .unwrap();
        path
    };
    let (a, b) = (config("a"), config("b"));
    let unused = format!("tcp://127.0.0.1:{}", free_port());
    let mut first = spawn(&a, &etcd, &unused, &dir.path().join("a.log"));
    let sub = redis_subscriber(&redis.url());
    let (received, _task) = collect(&sub);
    let kv = etcd.client().await;
    flowing(&received, &kv).await;
    let _second = spawn(&b, &etcd, &unused, &dir.path().join("b.log"));
    let log: Log = Default::default();
    let writer = tokio::spawn(write_ops(etcd.endpoint(), 0, 1000, log.clone()));
    eventually("the writer under way", STREAM_WAIT, || {
        let done = log.lock().unwrap().len() >= 300;
        async move { done.then_some(()) }
    })
    .await;
    // SIGTERM: the leader resigns at once; kill -9: its lease expires.
    stop(&mut first, how);
    writer.await.unwrap();
    verify(&log, &received, &etcd).await;
    once_and_in_order(&received);
    positioned_at(&sub, last_revision(&log)).await;
    let syncs = syncs(&received);
    assert!(
        syncs.is_empty(),
        "a failover ({how:?}) made the subscriber re-read: {syncs:?} (logs in {})",
        dir.keep().display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ha_failover_after_kill_9_of_the_leader_costs_a_redis_subscriber_no_sync() {
    a_failover_costs_no_sync(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ha_failover_after_sigterm_of_the_leader_costs_a_redis_subscriber_no_sync() {
    a_failover_costs_no_sync(Stop::Term).await;
}

// ---- Gaps inside a run, repaired from the bridge's replay buffer ----

/// An in-process bridge from `etcd` to `backend`, with its replay endpoint.
fn bridge_to(etcd: &EtcdServer, backend: &str) -> Bridge {
    Bridge::start(&format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n{backend}",
        etcd.endpoint()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_zmq_subscriber_dropped_at_its_high_water_mark_are_replayed_not_re_read() {
    application_stalls(Duration::ZERO, None).await;
}

/// libzmq 4.3 aborts the process (`Assertion failed: _input_stopped`,
/// zeromq/libzmq#3937, #4767) when a SUB socket with ZMTP heartbeats of
/// its own stops reading on a full queue past its heartbeat timeout: the
/// timeout replaces the connection, and the queue draining later restarts
/// input on the replacement. An application that stalls for longer than
/// the silence timeout must cost neither the process nor a re-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_stalled_past_the_silence_timeout_neither_aborts_nor_re_reads() {
    application_stalls(Duration::from_secs(4), Some(Duration::from_secs(1))).await;
}

/// A subscriber with small queues whose application stops taking updates
/// while 8 KiB values stream (for at least `stall`): the subscriber's
/// queue, then the bridge's, fill and drop; what was dropped is replayed.
async fn application_stalls(stall: Duration, silence_timeout: Option<Duration>) {
    let etcd = EtcdServer::start().await;
    let port = free_port();
    let _bridge = bridge_to(
        &etcd,
        &format!("[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{port}\"\nsend_hwm = 20\n"),
    );
    let mut sub = feedbridge::backend::zmq::ZmqSubscriber::new(Codec::Msgpack).with_receive_hwm(20);
    if let Some(timeout) = silence_timeout {
        sub = sub.with_silence_timeout(timeout);
    }
    let sub = Arc::new(sub);
    sub.register_listen_address(&format!("tcp://127.0.0.1:{port}"));
    sub.register_topic("");
    // A small channel and an application that stops taking updates for a
    // while: the subscriber's queue, then the bridge's, fill and drop.
    let (mut rx, _pump) = sub.clone().updates(8);
    let received = Received::default();
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (sink, paused) = (received.clone(), paused.clone());
        tokio::spawn(async move {
            loop {
                while paused.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let Some(u) = rx.recv().await else { return };
                sink.0.lock().unwrap().push(u);
            }
        });
    }
    let kv = etcd.client().await;
    flowing(&received, &kv).await;
    // A heartbeat gives the subscriber its position.
    positioned(&sub).await;
    let log: Log = Default::default();
    // 8 KiB values: megabytes, past what the sockets' buffers hold.
    let writer = tokio::spawn(write_padded_ops(
        vec![etcd.endpoint()],
        0,
        3000,
        log.clone(),
        8 << 10,
    ));
    eventually("the writer under way", STREAM_WAIT, || {
        let done = log.lock().unwrap().len() >= 200;
        async move { done.then_some(()) }
    })
    .await;
    paused.store(true, std::sync::atomic::Ordering::Relaxed);
    let stalled = std::time::Instant::now();
    eventually("writes while the application stalls", STREAM_WAIT, || {
        let done = log.lock().unwrap().len() >= 1500 && stalled.elapsed() >= stall;
        async move { done.then_some(()) }
    })
    .await;
    paused.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    verify(&log, &received, &etcd).await;
    once_and_in_order(&received);
    assert!(sub.gaps() > 0, "the stall made gaps to repair");
    positioned_at(&sub, last_revision(&log)).await;
    let syncs = syncs(&received);
    assert!(
        syncs.is_empty(),
        "a gap was re-read, not replayed: {syncs:?}"
    );
    println!("zmq: {} gaps repaired from the replay buffer", sub.gaps());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_subscriber_whose_connection_was_killed_gets_the_missed_updates_replayed() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let _bridge = bridge_to(
        &etcd,
        &format!("[backend]\ntype = \"redis\"\nurl = \"{}\"\n", redis.url()),
    );
    let sub = redis_subscriber(&redis.url());
    let (received, _task) = collect(&sub);
    let kv = etcd.client().await;
    flowing(&received, &kv).await;
    positioned(&sub).await;
    let log: Log = Default::default();
    let writer = tokio::spawn(write_ops(etcd.endpoint(), 0, 1500, log.clone()));
    let mut admin = redis.connection().await;
    for at in [300, 800] {
        eventually("the writer under way", STREAM_WAIT, || {
            let done = log.lock().unwrap().len() >= at;
            async move { done.then_some(()) }
        })
        .await;
        // Redis drops the subscriber (as at its output-buffer limit): what
        // is published until it is back is gone from Redis.
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async::<redis::Value>(&mut admin)
            .await
            .unwrap();
    }
    writer.await.unwrap();
    verify(&log, &received, &etcd).await;
    once_and_in_order(&received);
    positioned_at(&sub, last_revision(&log)).await;
    let syncs = syncs(&received);
    assert!(
        syncs.is_empty(),
        "a reconnect was re-read, not replayed: {syncs:?}"
    );
}

// ---- Gaps older than the replay buffer: etcd's own history ----

/// A bridge keeping only 10 updates in its replay buffer, a Redis
/// subscriber cut off (connections reset) while 300 rows are written, and
/// what `meanwhile` does to etcd before the cut heals. Returns what the
/// subscriber delivered, the bridge and the writes.
async fn cut_off_past_the_buffer(
    etcd: &EtcdServer,
    redis: &RedisServer,
    meanwhile: impl std::future::Future<Output = ()>,
) -> (Received, Bridge, Log) {
    let bridge = bridge_to(
        etcd,
        &format!(
            "[backend]\ntype = \"redis\"\nurl = \"{}\"\n[bridge]\nreplay_buffer = 10\n",
            redis.url()
        ),
    );
    let proxy = feedbridge::testing::FaultProxy::start(&format!("127.0.0.1:{}", redis.port));
    let sub = redis_subscriber(&format!("redis://{}/0", proxy.addr()));
    let (received, _task) = collect(&sub);
    let kv = etcd.client().await;
    flowing(&received, &kv).await;
    positioned(&sub).await;
    proxy.set(feedbridge::testing::Fault::Reset);
    let log: Log = Default::default();
    write_ops(etcd.endpoint(), 0, 300, log.clone()).await;
    meanwhile.await;
    proxy.set(feedbridge::testing::Fault::Pass);
    std::mem::forget(proxy); // held open until the test ends
    (received, bridge, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_older_than_the_replay_buffer_is_read_from_etcds_history_not_re_read() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let (received, bridge, log) = cut_off_past_the_buffer(&etcd, &redis, async {}).await;
    verify(&log, &received, &etcd).await;
    once_and_in_order(&received);
    let syncs = syncs(&received);
    assert!(syncs.is_empty(), "a gap was re-read: {syncs:?}");
    assert!(
        bridge.stats.replay_answers("history") >= 1,
        "the gap was past the buffer: etcd's history answered it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_etcd_compacted_away_is_a_sync() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let compact = async {
        let mut kv = etcd.client().await;
        let rev = kv
            .get("/", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        kv.compact(rev, None).await.unwrap();
    };
    let (received, bridge, _) = cut_off_past_the_buffer(&etcd, &redis, compact).await;
    eventually("a sync for the compacted gap", STREAM_WAIT, || {
        let got = syncs(&received);
        async move { (!got.is_empty()).then_some(got) }
    })
    .await;
    let syncs = syncs(&received);
    assert!(
        syncs[0]
            .value
            .as_deref()
            .unwrap_or("")
            .contains("compacted"),
        "the sync says why: {syncs:?}"
    );
    assert!(bridge.stats.replay_answers("gone") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_cut_off_across_a_bridge_restart_resumes_from_etcds_history() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\ncheckpoint_file = \"{}\"\n[backend]\ntype = \"redis\"\nurl = \"{}\"\n[bridge]\nreplay_buffer = 10\n",
        etcd.endpoint(),
        dir.path().join("checkpoint").display(),
        redis.url()
    );
    let bridge = Bridge::start(&config);
    let proxy = feedbridge::testing::FaultProxy::start(&format!("127.0.0.1:{}", redis.port));
    let sub = redis_subscriber(&format!("redis://{}/0", proxy.addr()));
    let (received, _task) = collect(&sub);
    let kv = etcd.client().await;
    flowing(&received, &kv).await;
    positioned(&sub).await;
    proxy.set(feedbridge::testing::Fault::Reset);
    let log: Log = Default::default();
    write_ops(etcd.endpoint(), 0, 200, log.clone()).await;
    // The bridge restarts while the subscriber is away: the new run starts
    // past its position, and answers on a new replay endpoint.
    bridge.stop().await;
    let bridge = Bridge::start(&config);
    write_ops(etcd.endpoint(), 200, 300, log.clone()).await;
    proxy.set(feedbridge::testing::Fault::Pass);
    verify(&log, &received, &etcd).await;
    once_and_in_order(&received);
    let syncs = syncs(&received);
    assert!(syncs.is_empty(), "the gap was re-read: {syncs:?}");
    assert!(bridge.stats.replay_answers("history") >= 1);
    drop(proxy);
}

// ---- A Redis source: no history, but the index saved at a graceful stop ----

/// A Redis → ZeroMQ bridge process with a checkpoint file, stopped `how`
/// while a subscriber stays up and keys change, then started again.
/// Returns what the subscriber delivered once its view equals Redis.
async fn redis_source_restarted(how: Stop) -> Vec<DbUpdate> {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\ntype = \"redis\"\nurl = \"{}\"\ncheckpoint_file = \"{}\"\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{port}\"\n",
            redis.url(),
            dir.path().join("checkpoint").display()
        ),
    )
    .unwrap();
    let log = |n: u32| dir.path().join(format!("bridge{n}.log"));
    let mut bridge = spawn_with(&config, &[], &log(0));
    let sub = zmq_subscriber_of(port);
    let (mut rx, _pump) = sub.clone().updates(4096);
    await_redis_flow(&mut rx, &redis).await;
    let mut c = redis.connection().await;
    let set = |k: String, v: String| redis::cmd("SET").arg(k).arg(v).to_owned();
    for i in 0..20 {
        set(format!("{{lport.}}k{i}"), format!("v{i}"))
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    let mut seen = collect_until(&mut rx, "the first writes", STREAM_WAIT, |g| {
        lport(g).len() >= 20
    })
    .await;
    positioned(&sub).await;
    stop(&mut bridge, how);
    // While the bridge is down: sets, deletes, a new key.
    for i in 0..5 {
        set(format!("{{lport.}}k{i}"), format!("changed{i}"))
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    for i in 10..15 {
        redis::cmd("DEL")
            .arg(format!("{{lport.}}k{i}"))
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    set("{lport.}new".into(), "n".into())
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let _bridge = spawn_with(&config, &[], &log(1));
    let expected: std::collections::BTreeMap<(String, String), String> = {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("{lport.}*")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut state = std::collections::BTreeMap::new();
        for k in keys {
            let v: String = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
            state.insert(("lport".into(), k.trim_start_matches("{lport.}").into()), v);
        }
        state
    };
    let before = seen.len();
    let more = collect_until(
        &mut rx,
        "a sync, or the view equal to Redis",
        STREAM_WAIT,
        |g| {
            let mut all = seen.clone();
            all.extend_from_slice(g);
            g.iter().any(|u| u.action == Action::Sync) || view(&lport(&all)) == expected
        },
    )
    .await;
    seen.extend(more);
    // Whatever else the new run sends in its first second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(u) = rx.try_recv() {
        seen.push(u);
    }
    seen.split_off(before)
}

fn zmq_subscriber_of(port: u16) -> Arc<feedbridge::backend::zmq::ZmqSubscriber> {
    let sub = Arc::new(feedbridge::backend::zmq::ZmqSubscriber::new(Codec::Msgpack));
    sub.register_listen_address(&format!("tcp://127.0.0.1:{port}"));
    sub.register_topic("");
    sub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_source_stopped_gracefully_publishes_what_changed_meanwhile_with_no_sync() {
    let after = redis_source_restarted(Stop::Term).await;
    let syncs: Vec<_> = after.iter().filter(|u| u.action == Action::Sync).collect();
    assert!(syncs.is_empty(), "the diff needs no re-read: {syncs:?}");
    let rows = lport(&after);
    let deletes = rows.iter().filter(|u| u.action == Action::Delete).count();
    assert_eq!(deletes, 5, "the keys deleted while down: {rows:?}");
    assert!(rows
        .iter()
        .any(|u| u.key == "new" && u.action == Action::Create));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_source_killed_cannot_know_what_subscribers_got_and_says_sync() {
    let after = redis_source_restarted(Stop::Kill).await;
    assert!(
        after.iter().any(|u| u.action == Action::Sync),
        "no saved index after kill -9: the subscriber must re-read: {after:?}"
    );
}
