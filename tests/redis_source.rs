//! The Redis keyspace source against a real Redis: action mapping, values,
//! reconciliation across restarts, and the refusal when notifications
//! cannot be enabled.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use feedbridge::backend::zmq::ZmqSubscriber;
use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{BackendConfig, RedisBackendConfig};
use feedbridge::pubsub::Subscriber;
use feedbridge::{Action, DbUpdate};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

fn redis_to_zmq(redis: &RedisServer, port: u16) -> String {
    format!(
        "[source]\ntype = \"redis\"\nurl = \"{}\"\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{port}\"\n",
        redis.url()
    )
}

async fn zmq_updates(port: u16) -> mpsc::Receiver<DbUpdate> {
    let sub = Arc::new(ZmqSubscriber::new(Codec::Msgpack));
    sub.register_listen_address(&format!("tcp://127.0.0.1:{port}"));
    sub.register_topic("");
    sub.updates(256).0
}

/// A Redis → ZeroMQ bridge on `redis`, a subscriber of every topic whose
/// flow is up, and a connection to write with.
async fn bridged(
    redis: &RedisServer,
) -> (
    Bridge,
    mpsc::Receiver<DbUpdate>,
    redis::aio::MultiplexedConnection,
) {
    let port = free_port();
    let bridge = Bridge::start(&redis_to_zmq(redis, port));
    let mut rx = zmq_updates(port).await;
    await_redis_flow(&mut rx, redis).await;
    (bridge, rx, redis.connection().await)
}

async fn cmd(conn: &mut redis::aio::MultiplexedConnection, args: &[&str]) {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async::<redis::Value>(conn).await.unwrap();
}

fn without_probes(updates: Vec<DbUpdate>) -> Vec<(String, String, Action, Option<String>, String)> {
    updates
        .into_iter()
        .filter(|u| u.table != "probe")
        .map(|u| (u.table, u.key, u.action, u.value, u.topic))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_events_map_to_actions_with_values() {
    let redis = RedisServer::start().await;
    let (bridge, mut rx, mut c) = bridged(&redis).await;
    let s = |x: &str| x.to_string();

    // Redis keeps no history: a value is read after its notification, so
    // each step waits for its update before the next write.
    type Row = (String, String, Action, Option<String>, String);
    async fn step(
        c: &mut redis::aio::MultiplexedConnection,
        rx: &mut mpsc::Receiver<DbUpdate>,
        args: &[&str],
        expect: Row,
    ) {
        cmd(c, args).await;
        let got = collect_until(rx, &format!("{args:?}"), WAIT, |g| !g.is_empty()).await;
        assert_eq!(without_probes(got), vec![expect], "after {args:?}");
    }
    let row = |t: &str, k: &str, a: Action, v: Option<&str>, topic: &str| {
        (s(t), s(k), a, v.map(s), s(topic))
    };
    // `new` + `set` of one SET make a single create
    step(
        &mut c,
        &mut rx,
        &["SET", "{lport.tenant1}p1", "v1"],
        row("lport", "p1", Action::Create, Some("v1"), "tenant1"),
    )
    .await;
    step(
        &mut c,
        &mut rx,
        &["SET", "{lport.tenant1}p1", "v2"],
        row("lport", "p1", Action::Set, Some("v2"), "tenant1"),
    )
    .await;
    step(
        &mut c,
        &mut rx,
        &["DEL", "{lport.tenant1}p1"],
        row("lport", "p1", Action::Delete, None, "tenant1"),
    )
    .await;
    let sw = |v: Option<&str>, a: Action| row("lswitch", "s1", a, v, "D");
    step(
        &mut c,
        &mut rx,
        &["HSET", "{lswitch.}s1", "name", "sw", "mtu", "1500"],
        sw(Some(r#"{"mtu":"1500","name":"sw"}"#), Action::Create),
    )
    .await;
    step(
        &mut c,
        &mut rx,
        &["HSET", "{lswitch.}s1", "mtu", "9000"],
        sw(Some(r#"{"mtu":"9000","name":"sw"}"#), Action::Set),
    )
    .await;
    step(
        &mut c,
        &mut rx,
        &["HDEL", "{lswitch.}s1", "name"],
        sw(Some(r#"{"mtu":"9000"}"#), Action::Set),
    )
    .await;
    // removing the last field removes the key
    step(
        &mut c,
        &mut rx,
        &["HDEL", "{lswitch.}s1", "mtu"],
        sw(None, Action::Delete),
    )
    .await;
    step(
        &mut c,
        &mut rx,
        &["SET", "{lswitch.}s2", "x"],
        row("lswitch", "s2", Action::Create, Some("x"), "D"),
    )
    .await;
    step(
        &mut c,
        &mut rx,
        &["UNLINK", "{lswitch.}s2"],
        row("lswitch", "s2", Action::Delete, None, "D"),
    )
    .await;

    // the topic comes from the value when the key has none
    step(
        &mut c,
        &mut rx,
        &["SET", "{router.}r1", r#"{"topic":"t7"}"#],
        row(
            "router",
            "r1",
            Action::Create,
            Some(r#"{"topic":"t7"}"#),
            "t7",
        ),
    )
    .await;
    cmd(&mut c, &["RENAME", "{router.}r1", "{router.}r2"]).await;
    let got = without_probes(collect_until(&mut rx, "rename", WAIT, |g| g.len() >= 2).await);
    assert!(
        got.contains(&row("router", "r1", Action::Delete, None, "D")),
        "{got:?}"
    );
    assert!(
        got.contains(&row(
            "router",
            "r2",
            Action::Create,
            Some(r#"{"topic":"t7"}"#),
            "t7"
        )),
        "{got:?}"
    );

    step(
        &mut c,
        &mut rx,
        &["SET", "{lport.}ttl", "x", "PX", "300"],
        row("lport", "ttl", Action::Create, Some("x"), "D"),
    )
    .await;
    let got = collect_until(&mut rx, "expiry", WAIT, |g| !g.is_empty()).await;
    assert_eq!(
        without_probes(got),
        vec![row("lport", "ttl", Action::Delete, None, "D")]
    );

    // a list is not a row: ignored, nothing published, bridge keeps going
    cmd(&mut c, &["RPUSH", "{lport.}list", "a"]).await;
    cmd(&mut c, &["SET", "{lport.}after", "ok"]).await;
    let got = collect_until(&mut rx, "the update after the list", WAIT, |g| {
        !g.is_empty()
    })
    .await;
    assert_eq!(got[0].key, "after");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_ends_with_the_real_state() {
    let mut redis = RedisServer::start().await;
    let (bridge, mut rx, mut c) = bridged(&redis).await;
    for i in 0..20 {
        cmd(
            &mut c,
            &["SET", &format!("{{lport.}}k{i}"), &format!("v{i}")],
        )
        .await;
    }
    let mut seen = collect_until(&mut rx, "first writes", WAIT, |g| g.len() >= 20).await;

    // Kill Redis (AOF keeps the data) and write while the bridge is away:
    // those notifications are never sent, reconciliation must find them.
    redis.restart().await;
    let mut c = redis.connection().await;
    for i in 0..10 {
        cmd(
            &mut c,
            &["SET", &format!("{{lport.}}k{i}"), &format!("changed{i}")],
        )
        .await;
    }
    for i in 10..15 {
        cmd(&mut c, &["DEL", &format!("{{lport.}}k{i}")]).await;
    }
    cmd(&mut c, &["SET", "{lport.}new", "n"]).await;

    let mut expected = std::collections::BTreeMap::new();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("{lport.}*")
        .query_async(&mut c)
        .await
        .unwrap();
    for k in keys {
        let v: String = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
        expected.insert(
            (
                "lport".to_string(),
                k.trim_start_matches("{lport.}").to_string(),
            ),
            v,
        );
    }
    let more = collect_until(&mut rx, "the subscriber's view to equal Redis", WAIT, |g| {
        let mut all = seen.clone();
        all.extend_from_slice(g);
        all.retain(|u| u.table == "lport");
        view(&all) == expected
    })
    .await;
    seen.extend(more);
    assert_eq!(
        view(
            &seen
                .into_iter()
                .filter(|u| u.table == "lport")
                .collect::<Vec<_>>()
        ),
        expected
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_when_config_is_disabled_and_notifications_are_off() {
    let redis = RedisServer::start_with(&["rename-command CONFIG \"\""]).await;
    let bridge = Bridge::start(&redis_to_zmq(&redis, free_port()));
    let err = bridge.failure().await;
    assert!(err.contains("notify-keyspace-events Kg$hxen"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_without_config_when_notifications_are_already_on() {
    let redis =
        RedisServer::start_with(&["rename-command CONFIG \"\"\nnotify-keyspace-events KA$n"]).await;
    let port = free_port();
    let bridge = Bridge::start(&redis_to_zmq(&redis, port));
    let mut rx = zmq_updates(port).await;
    await_redis_flow(&mut rx, &redis).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_to_redis_publish_and_subscribe() {
    let redis = RedisServer::start().await;
    let cfg = format!(
        "[source]\ntype = \"redis\"\nurl = \"{0}\"\n[backend]\ntype = \"redis\"\nurl = \"{0}\"\n",
        redis.url()
    );
    let bridge = Bridge::start(&cfg);
    let backend = BackendConfig::Redis(RedisBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        url: redis.url(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        sharded: false,
        auth: Default::default(),
    });
    let sub = PubSub::new(backend).get_subscriber(); // on D
    sub.register_topic("tenant1");
    let (mut rx, _task) = sub.clone().updates(64);
    await_redis_flow(&mut rx, &redis).await;
    let mut c = redis.connection().await;
    cmd(&mut c, &["SET", "{lport.tenant1}p1", "a"]).await;
    cmd(&mut c, &["SET", "{lport.tenant2}p2", "b"]).await; // not subscribed
    cmd(&mut c, &["SET", "{lport.}p3", "c"]).await; // D
    let got = collect_until(&mut rx, "two updates", WAIT, |g| g.len() >= 2).await;
    let keys: Vec<_> = got
        .iter()
        .map(|u| (u.key.as_str(), u.topic.as_str()))
        .collect();
    assert_eq!(keys, vec![("p1", "tenant1"), ("p3", "D")]);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_values_are_signalled_never_altered() {
    let redis = RedisServer::start().await;
    let (bridge, mut rx, mut c) = bridged(&redis).await;
    for (key, args) in [
        ("h", &["HSET", "{lport.t1}h", "f", "ok"][..]),
        ("s", &["SET", "{lport.t1}s", "ok"][..]),
    ] {
        cmd(&mut c, args).await;
        collect_until(&mut rx, key, WAIT, |g| g.iter().any(|u| u.key == key)).await;
    }
    // A hash field and a string that are not UTF-8.
    redis::cmd("HSET")
        .arg("{lport.t1}h")
        .arg("f")
        .arg(&b"\xffbad"[..])
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    redis::cmd("SET")
        .arg("{lport.t1}s")
        .arg(&b"\xfe"[..])
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let got = collect_until(&mut rx, "two syncs", WAIT, |g| {
        g.iter().filter(|u| u.action == Action::Sync).count() == 2
    })
    .await;
    for u in &got {
        assert_eq!(
            (u.table.as_str(), u.action.clone()),
            ("lport", Action::Sync),
            "{u:?}"
        );
        assert!(!u.value.as_deref().unwrap_or_default().contains('\u{fffd}'));
    }
    bridge.stop().await;
}

/// Rows (table lport) a subscriber holds after `updates`.
fn lport_rows(updates: &[DbUpdate]) -> std::collections::BTreeSet<String> {
    view(updates)
        .into_keys()
        .filter(|(t, _)| t == "lport")
        .map(|(_, k)| k)
        .collect()
}

/// Receives until the subscriber's rows (all of `seen` and what arrives)
/// are exactly `rows`; keeps what arrived in `seen`.
async fn expect_rows(
    rx: &mut mpsc::Receiver<DbUpdate>,
    seen: &mut Vec<DbUpdate>,
    what: &str,
    rows: &[&str],
    timeout: Duration,
) {
    let want: std::collections::BTreeSet<String> = rows.iter().map(|s| s.to_string()).collect();
    let start = std::time::Instant::now();
    let more = collect_until(rx, what, timeout, |g| {
        let mut all = seen.clone();
        all.extend_from_slice(g);
        lport_rows(&all) == want
    })
    .await;
    seen.extend(more);
    eprintln!("{what}: after {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushdb_flushall_and_swapdb_are_answered_with_deletes() {
    let redis = RedisServer::start().await;
    let (bridge, mut rx, mut c) = bridged(&redis).await;
    let mut seen: Vec<DbUpdate> = Vec::new();
    // Redis promises no per-key notification for these: the bridge must
    // notice within its bound (about 1 s; 5 s promised).
    const BOUND: Duration = Duration::from_secs(5);
    async fn set_keys(c: &mut redis::aio::MultiplexedConnection, names: &[&str]) {
        for k in names {
            cmd(c, &["SET", &format!("{{lport.t1}}{k}"), "v"]).await;
        }
    }
    set_keys(&mut c, &["a1", "a2", "a3", "a4", "a5", "a6", "a7"]).await;
    expect_rows(
        &mut rx,
        &mut seen,
        "seven rows",
        &["a1", "a2", "a3", "a4", "a5", "a6", "a7"],
        WAIT,
    )
    .await;
    cmd(&mut c, &["FLUSHDB"]).await;
    expect_rows(&mut rx, &mut seen, "deletes after FLUSHDB", &[], BOUND).await;

    set_keys(&mut c, &["b1", "b2", "b3"]).await;
    expect_rows(&mut rx, &mut seen, "three rows", &["b1", "b2", "b3"], WAIT).await;
    cmd(&mut c, &["FLUSHALL"]).await;
    expect_rows(&mut rx, &mut seen, "deletes after FLUSHALL", &[], BOUND).await;

    set_keys(&mut c, &["c1", "c2"]).await;
    expect_rows(&mut rx, &mut seen, "two rows", &["c1", "c2"], WAIT).await;
    // Database 1 holds other rows; SWAPDB brings them into database 0.
    let mut one = redis::Client::open(format!("{}1", redis.url().trim_end_matches('0')))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    set_keys(&mut one, &["d1"]).await;
    cmd(&mut c, &["SWAPDB", "0", "1"]).await;
    expect_rows(&mut rx, &mut seen, "the swapped-in rows", &["d1"], BOUND).await;
    assert_eq!(bridge.stats.flushes_detected.get(), 3);
    bridge.stop().await;
}

/// A bridge short of CPU reads notifications slower than Redis sends them;
/// once they are read more than two seconds late (measured with its
/// sentinel key's own notifications) it lets go of them and reconciles,
/// instead of letting the client's queue grow. Here two tasks hold the
/// test runtime's two threads 90 % of the time while another thread writes
/// 20,000 changes a second for 5 s. The backend never blocks (ZeroMQ), so
/// only that delay can trigger the pause; the subscriber still ends with
/// every key's last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_read_too_late_are_dropped_for_a_reconciliation() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let redis = RedisServer::start().await;
    let port = free_port();
    let bridge = Bridge::start(&(redis_to_zmq(&redis, port) + "send_hwm = 10000000\n"));
    let mut rx = zmq_updates(port).await;
    await_redis_flow(&mut rx, &redis).await;

    let starve = Arc::new(AtomicBool::new(true));
    for _ in 0..2 {
        let starve = starve.clone();
        tokio::spawn(async move {
            while starve.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(90)); // holds the thread
                tokio::task::yield_now().await;
            }
        });
    }
    let client = redis::Client::open(redis.url()).unwrap();
    let writer = std::thread::spawn(move || {
        let mut c = client.get_connection().unwrap();
        for round in 0..100 {
            let mut pipe = redis::pipe();
            for k in 0..1000 {
                pipe.cmd("SET")
                    .arg(format!("{{lport.}}k{k}"))
                    .arg(format!("v{round}"))
                    .ignore();
            }
            pipe.query::<()>(&mut c).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    starve.store(false, Ordering::Relaxed);

    let mut done = std::collections::BTreeSet::new();
    collect_until(&mut rx, "every key's last value", WAIT * 3, |got| {
        // called after each update: the newest is the one to look at
        if let Some(u) = got.last().filter(|u| u.table == "lport") {
            if u.value.as_deref() == Some("v99") {
                done.insert(u.key.clone());
            } else {
                done.remove(&u.key);
            }
        }
        done.len() == 1000
    })
    .await;
    assert!(
        bridge.stats.source_paused.get() > 0,
        "the notifications were read one by one, however late"
    );
    bridge.stop().await;
}
