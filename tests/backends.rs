//! etcd as a source feeding the databases' native pub/sub backends:
//! etcd `/pubsub/<topic>` keys and Redis PUBLISH.

mod common;

use std::time::Duration;

use common::*;
use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{BackendConfig, EtcdBackendConfig, RedisBackendConfig};
use feedbridge::{Action, DbUpdate};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn etcd_backend(etcd: &EtcdServer) -> BackendConfig {
    BackendConfig::Etcd(EtcdBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        endpoints: vec![etcd.endpoint()],
        prefix: "/pubsub/".into(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        auth: Default::default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_to_etcd_pubsub_keys_without_feedback_loop() {
    let etcd = EtcdServer::start().await;
    let cfg = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{0}\"]\n[backend]\ntype = \"etcd\"\nendpoints = [\"{0}\"]\n",
        etcd.endpoint()
    );
    let bridge = Bridge::start(&cfg);
    let sub = PubSub::new(etcd_backend(&etcd)).get_subscriber();
    sub.register_topic("tenant1");
    let (mut rx, _task) = sub.clone().updates(64);
    await_etcd_flow(&mut rx, &etcd.client().await).await;

    let mut kv = etcd.client().await;
    kv.put("/lport/p1", r#"{"topic":"tenant1"}"#, None)
        .await
        .unwrap();
    kv.put("/lport/p2", r#"{"topic":"tenant2"}"#, None)
        .await
        .unwrap(); // not subscribed
    kv.put("/lport/p3", "x", None).await.unwrap(); // D
    let got = collect_until(&mut rx, "two updates", WAIT, |g| g.len() >= 2).await;
    let keys: Vec<_> = got
        .iter()
        .map(|u| (u.key.as_str(), u.action.clone(), u.topic.as_str()))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("p1", Action::Create, "tenant1"),
            ("p3", Action::Create, "D")
        ]
    );
    // the messages really are PUTs under /pubsub/<topic>
    let stored = kv.get("/pubsub/tenant1", None).await.unwrap();
    let (u, _) = Codec::Msgpack.decode(stored.kvs()[0].value()).unwrap();
    assert_eq!(u.key, "p1");
    // and the bridge skipped its own /pubsub/ writes instead of looping
    let own = bridge.stats.skipped(feedbridge::mapper::Skip::OwnKey);
    assert!(own >= 3, "own writes skipped: {own}");
    let published = bridge.stats.updates_published.get();
    assert!(
        published < 20,
        "a feedback loop would publish without end: {published}"
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_subscriber_gets_every_put_of_a_burst_and_resumes_after_restart() {
    let mut etcd = EtcdServer::start().await;
    let publisher = PubSub::new(etcd_backend(&etcd))
        .get_publisher()
        .await
        .unwrap();
    let sub = PubSub::new(etcd_backend(&etcd)).get_subscriber();
    let (mut rx, _task) = sub.clone().updates(256);
    // wait until the watch is up: publish until something arrives
    await_publisher_flow(&mut rx, &publisher).await;
    // 50 puts to the same key /pubsub/D: all must arrive, not only the last
    for i in 0..50 {
        let u = DbUpdate::new("lport", format!("k{i}"), Action::Set, Some(i.to_string()));
        publisher.send_event(&u, None).await.unwrap();
    }
    let got = collect_until(&mut rx, "50 updates", WAIT, |g| g.len() >= 50).await;
    let keys: Vec<_> = got.iter().map(|u| u.key.clone()).collect();
    assert_eq!(keys, (0..50).map(|i| format!("k{i}")).collect::<Vec<_>>());

    // Restart etcd: the publisher reconnects (its first sends may fail and
    // are retried, as the bridge does), the subscriber resumes from its last
    // revision, and no false gap is reported.
    etcd.restart().await;
    for i in 50..60 {
        let u = DbUpdate::new("lport", format!("k{i}"), Action::Set, Some(i.to_string()));
        eventually("a send after the restart", WAIT, || {
            let (p, u) = (publisher.clone(), u.clone());
            async move { p.send_event(&u, None).await.ok() }
        })
        .await;
    }
    let got = collect_until(&mut rx, "10 updates after restart", WAIT, |g| g.len() >= 10).await;
    let keys: Vec<_> = got.iter().map(|u| u.key.clone()).collect();
    assert_eq!(keys, (50..60).map(|i| format!("k{i}")).collect::<Vec<_>>());
    assert_eq!(sub.gaps(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_to_redis_publish() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let cfg = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n[backend]\ntype = \"redis\"\nurl = \"{}\"\ncodec = \"json\"\n",
        etcd.endpoint(),
        redis.url()
    );
    let bridge = Bridge::start(&cfg);
    let backend = BackendConfig::Redis(RedisBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        url: redis.url(),
        codec: Codec::Json,
        connect_timeout: Duration::from_secs(5),
        sharded: false,
        auth: Default::default(),
    });
    let sub = PubSub::new(backend).get_subscriber();
    let (mut rx, _task) = sub.clone().updates(64);
    await_etcd_flow(&mut rx, &etcd.client().await).await;
    let mut kv = etcd.client().await;
    kv.put("/lrouter/r1", "v", None).await.unwrap();
    kv.delete("/lrouter/r1", None).await.unwrap();
    let got = collect_until(&mut rx, "create and delete", WAIT, |g| g.len() >= 2).await;
    let got: Vec<_> = got
        .iter()
        .map(|u| (u.table.as_str(), u.key.as_str(), u.action.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("lrouter", "r1", Action::Create),
            ("lrouter", "r1", Action::Delete)
        ]
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_emits_existing_rows_then_watches_without_gap() {
    // Through the etcd backend, which loses nothing to late joining: the
    // subscriber is proven up (a probe arrives) before the bridge starts.
    let etcd = EtcdServer::start().await;
    let mut kv = etcd.client().await;
    kv.put("/lport/old1", "v1", None).await.unwrap();
    kv.put("/lport/old2", "v2", None).await.unwrap();
    let sub = PubSub::new(etcd_backend(&etcd)).get_subscriber();
    sub.register_topic("");
    let (mut rx, _task) = sub.clone().updates(64);
    let probe = PubSub::new(etcd_backend(&etcd))
        .get_publisher()
        .await
        .unwrap();
    await_publisher_flow(&mut rx, &probe).await;
    let cfg = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{0}\"]\nsnapshot = true\n[backend]\ntype = \"etcd\"\nendpoints = [\"{0}\"]\n",
        etcd.endpoint()
    );
    let bridge = Bridge::start(&cfg);
    let got = collect_until(&mut rx, "snapshot creates", WAIT, |g| g.len() >= 2).await;
    let got: Vec<_> = got
        .iter()
        .map(|u| (u.key.as_str(), u.action.clone()))
        .collect();
    assert_eq!(
        got,
        vec![("old1", Action::Create), ("old2", Action::Create)]
    );
    kv.put("/lport/new", "v3", None).await.unwrap();
    let got = collect_until(&mut rx, "the watched create", WAIT, |g| !g.is_empty()).await;
    assert_eq!(
        (got[0].key.as_str(), got[0].action.clone()),
        ("new", Action::Create)
    );
    bridge.stop().await;
}

/// A Redis publisher stamped by `sequencer`, and a subscriber of
/// `tenant1` handing updates through a channel of `capacity`, already
/// receiving (Redis delivers only once the SUBSCRIBE is in) and drained.
struct RedisPair {
    publisher: feedbridge::backend::redis::RedisPublisher,
    sub: std::sync::Arc<dyn feedbridge::pubsub::Subscriber>,
    rx: tokio::sync::mpsc::Receiver<DbUpdate>,
    _task: tokio::task::JoinHandle<Result<(), feedbridge::pubsub::SubscribeError>>,
}

fn tenant_row(key: &str) -> DbUpdate {
    DbUpdate::new("lport", key, Action::Set, None).with_topic("tenant1")
}

async fn redis_pair(
    redis: &RedisServer,
    sequencer: std::sync::Arc<feedbridge::backend::Sequencer>,
    capacity: usize,
) -> RedisPair {
    use feedbridge::pubsub::Publisher;
    let config = RedisBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        url: redis.url(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        sharded: false,
        auth: Default::default(),
    };
    let publisher = feedbridge::backend::redis::RedisPublisher::connect(&config, sequencer)
        .await
        .unwrap();
    let sub = PubSub::new(BackendConfig::Redis(config)).get_subscriber();
    sub.register_topic("tenant1");
    let (mut rx, _task) = sub.clone().updates(capacity);
    for i in 0.. {
        publisher
            .send_event(&tenant_row("probe"), None)
            .await
            .unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            break;
        }
        assert!(i < 100, "the subscriber never received anything");
    }
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {}
    RedisPair {
        publisher,
        sub,
        rx,
        _task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_heartbeats_reveal_a_lost_tail() {
    use feedbridge::pubsub::Publisher;
    let redis = RedisServer::start().await;
    let sequencer = std::sync::Arc::new(feedbridge::backend::Sequencer::new("redis-tail"));
    let RedisPair {
        publisher,
        sub,
        mut rx,
        _task,
    } = redis_pair(&redis, sequencer.clone(), 64).await;
    let row = tenant_row;
    publisher.send_event(&row("k1"), None).await.unwrap();
    let got = collect_until(&mut rx, "k1", WAIT, |g| !g.is_empty()).await;
    assert_eq!(got[0].key, "k1");
    sequencer.stamp("tenant1"); // lost on the way; nothing follows
    let start = std::time::Instant::now();
    let sync = collect_until(&mut rx, "a sync from a heartbeat", WAIT, |g| !g.is_empty()).await;
    eprintln!("the lost tail was reported after {:?}", start.elapsed());
    assert_eq!(sync[0].action, Action::Sync, "{sync:?}");
    assert!(sync[0].value.as_deref().unwrap().contains("missed 1"));
    sub.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_on_a_shared_redis_ignores_its_keyspace_notifications() {
    use std::io::BufRead;
    let redis = RedisServer::start().await;
    let mut c = redis.connection().await;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("KEA")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("tail.err");
    let mut tail = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_feedbridge"))
            .args(["tail", "--backend", "redis", "--redis-url", &redis.url()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let out = tail.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    await_pattern_subscriber(&redis).await;
    for i in 0..500 {
        redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v")
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    // Something that is not an update at all, on an ordinary channel.
    redis::cmd("PUBLISH")
        .arg("chatter")
        .arg("not msgpack")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let publisher = PubSub::new(BackendConfig::Redis(RedisBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        url: redis.url(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        sharded: false,
        auth: Default::default(),
    }))
    .get_publisher()
    .await
    .unwrap();
    publisher
        .send_event(
            &DbUpdate::new("lport", "real", Action::Set, Some("v".into())),
            None,
        )
        .await
        .unwrap();
    let line = tokio::time::timeout(WAIT, lines.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        line.contains("\"real\""),
        "only the update is printed: {line}"
    );
    drop(tail);
    let log = std::fs::read_to_string(&stderr).unwrap();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        warnings <= 2,
        "{warnings} warnings for 500 notifications:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backend_batches_topics_into_transactions_in_order() {
    let etcd = EtcdServer::start().await;
    let pubsub = PubSub::new(etcd_backend(&etcd));
    let publisher = pubsub.get_publisher().await.unwrap();
    let sub = pubsub.get_subscriber();
    sub.register_topic("");
    let (mut rx, _task) = sub.clone().updates(1024);
    await_publisher_flow(&mut rx, &publisher).await;
    let mut kv = etcd.client().await;
    let before = etcd_revision(&mut kv).await;
    // 40 updates over 10 topics, each topic coming back 4 times.
    let batch: Vec<DbUpdate> = (0..40)
        .map(|i| {
            DbUpdate::new("lport", format!("k{i}"), Action::Set, Some(i.to_string()))
                .with_topic(format!("t{}", i % 10))
        })
        .collect();
    publisher.send_batch(&batch).await.unwrap();
    let after = etcd_revision(&mut kv).await;
    assert_eq!(after - before, 4, "four transactions of ten topics each");
    let got = collect_until(&mut rx, "the batch", WAIT, |g| {
        g.iter().filter(|u| u.table == "lport").count() == 40
    })
    .await;
    for t in 0..10 {
        let topic = format!("t{t}");
        let keys: Vec<_> = got
            .iter()
            .filter(|u| u.topic == topic)
            .map(|u| u.key.clone())
            .collect();
        let want: Vec<_> = (0..4).map(|r| format!("k{}", r * 10 + t)).collect();
        assert_eq!(keys, want, "order on {topic}");
    }
}

/// An application that stops taking updates: redis-rs would keep every
/// message published meanwhile in a queue of its own, without limit. After
/// 10 s the subscriber lets go of its connection instead; once the
/// application takes updates again it gets what was already handed over,
/// then a `sync`, then the live stream — not the stalled backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_application_gets_a_sync_instead_of_an_unbounded_backlog() {
    use feedbridge::pubsub::Publisher;
    let redis = RedisServer::start().await;
    let sequencer = std::sync::Arc::new(feedbridge::backend::Sequencer::new("stall"));
    let RedisPair {
        publisher,
        sub,
        mut rx,
        _task,
    } = redis_pair(&redis, sequencer, 4).await;
    let row = |k: String| tenant_row(&k);

    // The application stalls (nobody reads `rx`) while 2,000 updates go out.
    let batch: Vec<DbUpdate> = (0..2000).map(|i| row(format!("stalled{i}"))).collect();
    publisher.send_batch(&batch).await.unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await; // longer than the 10 s allowed: a stall, not a wait
    let before_sync = collect_until(&mut rx, "a sync", WAIT, |g| {
        g.last().is_some_and(|u| u.action == Action::Sync)
    })
    .await;
    assert!(
        before_sync.len() < 100,
        "the stalled backlog was kept and delivered: {} updates before the sync",
        before_sync.len()
    );
    // and the live stream flows again
    publisher
        .send_event(&row("after".into()), None)
        .await
        .unwrap();
    collect_until(&mut rx, "the update after the stall", WAIT, |g| {
        g.iter().any(|u| u.key == "after")
    })
    .await;
    sub.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_publisher_whose_term_lost_the_fence_publishes_nothing() {
    use feedbridge::backend::redis::RedisPublisher;
    use feedbridge::backend::Sequencer;
    use feedbridge::pubsub::Publisher;
    let redis = RedisServer::start().await;
    let config = RedisBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        url: redis.url(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        sharded: false,
        auth: Default::default(),
    };
    let key = "{feedbridge:test}:fence".to_string();
    let (old_fenced, new_fenced) = (CancellationToken::new(), CancellationToken::new());
    let old = RedisPublisher::fenced(
        &config,
        std::sync::Arc::new(Sequencer::new("old")),
        Some((key.clone(), old_fenced.clone())),
    )
    .await
    .unwrap();
    let mut rx = redis_updates(&redis.url());
    await_pattern_subscriber(&redis).await;
    old.send_event(&tenant_row("before"), None).await.unwrap();
    // A newer term takes the fence: the old term's writes are refused by
    // Redis, however late they arrive.
    let new = RedisPublisher::fenced(
        &config,
        std::sync::Arc::new(Sequencer::new("new")),
        Some((key.clone(), new_fenced.clone())),
    )
    .await
    .unwrap();
    let refused = old
        .send_event(&tenant_row("stale"), None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("fenced"), "{refused}");
    assert!(
        old_fenced.is_cancelled(),
        "the fenced term is told to stand down: retrying could never succeed"
    );
    // A term whose leadership is already gone (an election answered after
    // its lease expired) does not take the fence from the valid one.
    let closed: feedbridge::backend::Gate = std::sync::Arc::new(|| false);
    let void = RedisPublisher::fenced(
        &config,
        std::sync::Arc::new(Sequencer::new("void").with_heartbeat_gate(closed)),
        Some((key, CancellationToken::new())),
    )
    .await
    .err()
    .expect("a term that is not leading takes no fence");
    assert!(
        void.to_string().contains("not taking the publishing fence"),
        "{void}"
    );
    new.send_event(&tenant_row("after"), None).await.unwrap();
    assert!(!new_fenced.is_cancelled());
    let got = collect_until(
        &mut rx,
        "the new term's update",
        Duration::from_secs(10),
        |g| g.iter().any(|u| u.key == "after"),
    )
    .await;
    let keys: Vec<&str> = got
        .iter()
        .filter(|u| u.table == "lport")
        .map(|u| u.key.as_str())
        .collect();
    assert_eq!(keys, ["before", "after"], "{got:?}");
}
