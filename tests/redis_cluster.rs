//! The Redis source on a real Redis Cluster that the tests create (masters
//! and replicas on free ports): every master's notifications, failover of
//! a master under write load, slot migration under write load, and bridges
//! that share a cluster by slot ranges.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use feedbridge::backend::zmq::ZmqSubscriber;
use feedbridge::codec::Codec;
use feedbridge::pubsub::Subscriber;
use feedbridge::testing::RedisCluster;
use feedbridge::{Action, DbUpdate};
use redis::cluster_async::ClusterConnection;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(60);

fn cluster_to_zmq(url: &str, port: u16, extra: &str) -> String {
    format!(
        "[source]\ntype = \"redis\"\nurl = \"{url}\"\n{extra}[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{port}\"\n"
    )
}

fn zmq_updates(port: u16) -> mpsc::Receiver<DbUpdate> {
    let sub = Arc::new(ZmqSubscriber::new(Codec::Msgpack));
    sub.register_listen_address(&format!("tcp://127.0.0.1:{port}"));
    sub.register_topic("");
    sub.updates(4096).0
}

/// Sets `{probe.tN}x` keys (over many slots, so over every master) until
/// one reaches the subscriber.
async fn await_cluster_flow(rx: &mut mpsc::Receiver<DbUpdate>, conn: &ClusterConnection) {
    await_redis_keys_flow(rx, conn.clone(), |i| format!("{{probe.t{i}}}x")).await;
}

/// The shipped-style bridge (cluster → ZeroMQ) on `url`, a subscriber of
/// it, and a cluster connection, once updates flow from every master.
async fn bridged(
    cluster: &RedisCluster,
    url: &str,
) -> (Bridge, mpsc::Receiver<DbUpdate>, ClusterConnection) {
    let port = free_port();
    let bridge = Bridge::start(&cluster_to_zmq(url, port, ""));
    let mut rx = zmq_updates(port);
    let conn = cluster.connection().await;
    await_cluster_flow(&mut rx, &conn).await;
    (bridge, rx, conn)
}

/// Every `lport` row in the cluster: key → value.
async fn cluster_rows(cluster: &RedisCluster) -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    let mut conn = cluster.connection().await;
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .unwrap();
    for node in feedbridge::db::redis::parse_cluster_nodes(&text) {
        if !node.master {
            continue;
        }
        let client = redis::Client::open(format!("redis://{}/0", node.addr)).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("{lport.*")
            .query_async(&mut c)
            .await
            .unwrap();
        for key in keys {
            let value: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            if let Some(v) = value {
                let row = key.split_once('}').unwrap().1.to_string();
                rows.insert(row, v);
            }
        }
    }
    rows
}

/// The `lport` rows a subscriber holds after `updates`.
fn rows(updates: &[DbUpdate]) -> BTreeMap<String, String> {
    view(updates)
        .into_iter()
        .filter(|((t, _), _)| t == "lport")
        .map(|((_, k), v)| (k, v))
        .collect()
}

/// Receives until the subscriber holds `expected`, or fails saying what differs.
async fn until_equal(
    rx: &mut mpsc::Receiver<DbUpdate>,
    seen: &mut Vec<DbUpdate>,
    expected: &BTreeMap<String, String>,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while &rows(seen) != expected {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(u)) => seen.push(u),
            _ => {
                let got = rows(seen);
                let missing: Vec<_> = expected
                    .iter()
                    .filter(|(k, v)| got.get(*k) != Some(v))
                    .map(|(k, _)| k)
                    .take(10)
                    .collect();
                let extra: Vec<_> = got
                    .keys()
                    .filter(|k| !expected.contains_key(*k))
                    .take(10)
                    .collect();
                panic!(
                    "subscriber differs from the cluster: {} rows vs {}; wrong or missing {missing:?}; extra {extra:?}",
                    got.len(),
                    expected.len()
                );
            }
        }
    }
}

/// Writes `n` values over keys `{lport.tK}kK` (K < `keys`) through the
/// cluster, retrying each write until the cluster takes it (a failover or
/// a migration in between answers errors for a moment).
async fn write_load(conn: ClusterConnection, n: usize, keys: usize, tag: &'static str) {
    let mut c = conn;
    for i in 0..n {
        let key = format!("{{lport.{tag}{}}}k{}", i % keys, i % keys);
        let mut tries = 0;
        loop {
            let r = redis::cmd("SET")
                .arg(&key)
                .arg(format!("v{i}"))
                .query_async::<()>(&mut c)
                .await;
            match r {
                Ok(()) => break,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 400, "the cluster never took {key}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_over_many_hash_tags_reach_the_subscriber_from_every_master() {
    let cluster = RedisCluster::start(3, 0).await;
    // The URL names one node only: the source finds the others.
    let (bridge, mut rx, conn) = bridged(&cluster, &cluster.nodes[1].url()).await;
    write_load(conn.clone(), 60, 60, "t").await;
    let expected = cluster_rows(&cluster).await;
    assert_eq!(expected.len(), 60);
    let mut masters = std::collections::BTreeSet::new();
    for key in expected.keys() {
        let tag = key.trim_start_matches('k');
        masters.insert(
            cluster
                .master_of(format!("{{lport.t{tag}}}").as_bytes())
                .await,
        );
    }
    assert_eq!(masters.len(), 3, "the keys are spread over every master");
    let mut seen = Vec::new();
    until_equal(&mut rx, &mut seen, &expected).await;
    bridge.stop().await;
}

/// Reads go out as one pipeline of GETs per master; a hash answers
/// WRONGTYPE there and is read again with the type-aware script. Strings
/// and hashes of every master, written in one burst so they share
/// batches, all arrive with their values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_and_hashes_of_every_master_are_read_in_shared_batches() {
    let cluster = RedisCluster::start(3, 0).await;
    let (bridge, mut rx, conn) = bridged(&cluster, &cluster.url()).await;
    let mut c = conn.clone();
    let mut masters = std::collections::BTreeSet::new();
    let mut expected = BTreeMap::new();
    for i in 0..30 {
        let (string, hash) = (format!("{{lport.h{i}}}s{i}"), format!("{{lport.h{i}}}h{i}"));
        masters.insert(cluster.master_of(string.as_bytes()).await);
        redis::pipe()
            .cmd("SET")
            .arg(&string)
            .arg(format!("v{i}"))
            .ignore()
            .cmd("HSET")
            .arg(&hash)
            .arg("mtu")
            .arg(i)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .unwrap();
        expected.insert(format!("s{i}"), format!("v{i}"));
        expected.insert(format!("h{i}"), format!(r#"{{"mtu":"{i}"}}"#));
    }
    assert_eq!(masters.len(), 3, "the keys are spread over every master");
    let mut seen = Vec::new();
    until_equal(&mut rx, &mut seen, &expected).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_master_under_write_load_ends_equal_to_the_cluster() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let (bridge, mut rx, conn) = bridged(&cluster, &cluster.url()).await;
    let mut seen = Vec::new();
    let writer = tokio::spawn(write_load(conn.clone(), 3000, 300, "f"));
    // Under load, kill -9 a master that is not the seed the bridge named.
    let victim = cluster.master_of(b"lport.f7").await;
    collect_until(&mut rx, "the load under way", WAIT, |g| g.len() >= 300)
        .await
        .into_iter()
        .for_each(|u| seen.push(u));
    cluster.nodes[victim].stop();
    writer.await.unwrap();
    // The replica took over; the killed node comes back as a replica.
    cluster.nodes[victim].restart().await;
    cluster.await_healthy().await;
    let expected = cluster_rows(&cluster).await;
    assert_eq!(expected.len(), 300);
    until_equal(&mut rx, &mut seen, &expected).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_under_load_never_deletes_a_key_that_exists() {
    let cluster = RedisCluster::start(3, 0).await;
    let (bridge, mut rx, conn) = bridged(&cluster, &cluster.url()).await;
    write_load(conn.clone(), 400, 400, "m").await;
    let writer = tokio::spawn(write_load(conn.clone(), 4000, 400, "m"));
    // Move 2000 slots (and their keys) from the first master to another.
    let mut c = conn.clone();
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut c)
        .await
        .unwrap();
    let ids: Vec<(String, bool)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[8..].iter().any(|s| s.starts_with("0-")))
        })
        .collect();
    let from = ids.iter().find(|(_, first)| *first).unwrap().0.clone();
    let to = ids.iter().find(|(_, first)| !*first).unwrap().0.clone();
    let status = std::process::Command::new("redis-cli")
        .args([
            "--cluster",
            "reshard",
            &format!("127.0.0.1:{}", cluster.nodes[0].port),
        ])
        .args(["--cluster-from", &from, "--cluster-to", &to])
        .args(["--cluster-slots", "2000", "--cluster-yes"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "reshard failed");
    writer.await.unwrap();
    let expected = cluster_rows(&cluster).await;
    assert_eq!(expected.len(), 400);
    let mut seen = Vec::new();
    until_equal(&mut rx, &mut seen, &expected).await;
    let deletes: Vec<_> = seen
        .iter()
        .filter(|u| u.table == "lport" && u.action == Action::Delete)
        .map(|u| u.key.clone())
        .collect();
    assert!(
        deletes.is_empty(),
        "keys that moved were published as deleted: {deletes:?}"
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_share_a_cluster_by_slot_ranges() {
    let cluster = RedisCluster::start(3, 0).await;
    let (low, high) = (free_port(), free_port());
    let a = Bridge::start(&cluster_to_zmq(&cluster.url(), low, "slots = \"0-8191\"\n"));
    let b = Bridge::start(&cluster_to_zmq(
        &cluster.url(),
        high,
        "slots = \"8192-16383\"\n",
    ));
    let (mut rx_a, mut rx_b) = (zmq_updates(low), zmq_updates(high));
    let conn = cluster.connection().await;
    // Probes land in one range or the other: wait for both flows.
    for rx in [&mut rx_a, &mut rx_b] {
        await_cluster_flow(rx, &conn).await;
    }
    write_load(conn.clone(), 200, 200, "s").await;
    let expected = cluster_rows(&cluster).await;
    let in_range = |low: bool| -> BTreeMap<String, String> {
        expected
            .iter()
            .filter(|(k, _)| {
                let tag = format!("lport.s{}", k.trim_start_matches('k'));
                (feedbridge::db::redis::slot(tag.as_bytes()) < 8192) == low
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let (want_a, want_b) = (in_range(true), in_range(false));
    assert!(!want_a.is_empty() && !want_b.is_empty());
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    until_equal(&mut rx_a, &mut seen_a, &want_a).await;
    until_equal(&mut rx_b, &mut seen_b, &want_b).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lock_ha_and_the_publisher_table_work_on_a_cluster() {
    use feedbridge::discovery::{PublisherTable, Target};
    let cluster = RedisCluster::start(3, 0).await;
    let url = cluster.url();
    let config = |name: &str, port: u16| {
        cluster_to_zmq(&url, port, "")
            + &format!(
                "[ha]\nservice = \"test\"\nlease_ttl = \"2s\"\ninstance = \"{name}\"\n[discovery]\nurl = \"{url}\"\nid = \"pub-{name}\"\n"
            )
    };
    // One service (the same bind): only its leader binds the port.
    let port = free_port();
    let a = Bridge::start(&config("a", port));
    let b = Bridge::start(&config("b", port));
    let leaders = |a: &Bridge, b: &Bridge| (a.stats.leader.get(), b.stats.leader.get());
    eventually("one leader", WAIT, || {
        let l = leaders(&a, &b);
        async move { (l.0 + l.1 == 1).then_some(()) }
    })
    .await;
    let (leader, standby) = if a.stats.leader.get() == 1 {
        (a, b)
    } else {
        (b, a)
    };
    // The leader's row is in the cluster's publisher table, and listing
    // finds it whichever node the URL names.
    let target = Target::Redis(url.clone(), Default::default());
    eventually("the leader's row", WAIT, || {
        let target = target.clone();
        async move {
            let mut table = PublisherTable::connect(&target, WAIT).await.ok()?;
            let (rows, _) = table.list().await.ok()?;
            rows.iter().any(|r| r.id.starts_with("pub-")).then_some(())
        }
    })
    .await;
    leader.stop().await; // resigns: the standby takes over
    eventually("the standby to lead", WAIT, || {
        let l = standby.stats.leader.get();
        async move { (l == 1).then_some(()) }
    })
    .await;
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_publish_and_subscribe_survive_a_failover_of_the_channels_owner() {
    use feedbridge::backend::redis::RedisPublisher;
    use feedbridge::backend::{PubSub, Sequencer};
    use feedbridge::config::{BackendConfig, RedisBackendConfig};
    use feedbridge::pubsub::Publisher;
    let mut cluster = RedisCluster::start(3, 1).await;
    let config = RedisBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        url: cluster.url(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        sharded: true,
        auth: Default::default(),
    };
    let publisher = RedisPublisher::connect(&config, Arc::new(Sequencer::new("sharded-test")))
        .await
        .unwrap();
    let sub = PubSub::new(BackendConfig::Redis(config.clone())).get_subscriber();
    sub.register_topic("tenant1");
    let (mut rx, _task) = sub.clone().updates(1024);
    // A plain subscriber of the same URL sees nothing: SPUBLISH is not PUBLISH.
    let mut plain = redis_updates(&cluster.url());
    let row = |k: String| DbUpdate::new("lport", k, Action::Set, None).with_topic("tenant1");
    for i in 0.. {
        publisher
            .send_event(&row(format!("probe{i}")), None)
            .await
            .unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            break;
        }
        assert!(i < 100, "the sharded subscriber never received anything");
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {}
    // kill -9 the channel's owner; publish on (retrying) through the failover.
    let owner = cluster.master_of(b"tenant1").await;
    cluster.nodes[owner].stop();
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    loop {
        if publisher
            .send_event(&row(format!("k{sent}")), None)
            .await
            .is_ok()
        {
            sent += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while let Ok(u) = rx.try_recv() {
            got.push(u);
        }
        let synced = got.iter().any(|u| u.action == Action::Sync);
        let after = got
            .iter()
            .skip_while(|u| u.action != Action::Sync)
            .filter(|u| u.key.starts_with('k'))
            .count();
        if synced && after >= 10 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sync and resumed delivery after the failover; got {} updates, {} syncs, the last {:?}",
            got.len(),
            got.iter().filter(|u| u.action == Action::Sync).count(),
            got.last()
        );
    }
    assert!(
        plain.try_recv().is_err(),
        "a plain SUBSCRIBE subscriber received sharded messages"
    );
    sub.stop();
}
