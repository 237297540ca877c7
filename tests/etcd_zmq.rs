//! The first vertical slice end to end: a real etcd, the bridge in-process,
//! ZeroMQ subscribers (Rust and Dragonflow-style Python).

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use feedbridge::backend::zmq::ZmqSubscriber;
use feedbridge::codec::Codec;
use feedbridge::pubsub::Subscriber;
use feedbridge::{Action, DbUpdate};
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);

fn config(etcd: &EtcdServer, zmq_port: u16, extra_source: &str) -> String {
    format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n{extra_source}\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{zmq_port}\"\n",
        etcd.endpoint()
    )
}

fn subscriber(port: u16, topics: &[&str]) -> Arc<ZmqSubscriber> {
    let sub = Arc::new(ZmqSubscriber::new(Codec::Msgpack));
    sub.register_listen_address(&format!("tcp://127.0.0.1:{port}"));
    for t in topics {
        sub.register_topic(t);
    }
    sub
}

fn summary(u: &DbUpdate) -> (String, String, Action, Option<String>, String) {
    (
        u.table.clone(),
        u.key.clone(),
        u.action.clone(),
        u.value.clone(),
        u.topic.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_set_delete_reach_the_subscriber_in_order() {
    let etcd = EtcdServer::start().await;
    let port = free_port();
    let bridge = Bridge::start(&config(&etcd, port, ""));
    let sub = subscriber(port, &[""]);
    let (mut rx, _task) = sub.clone().updates(64);
    let mut kv = etcd.client().await;
    await_etcd_flow(&mut rx, &kv).await;

    kv.put("/lport/p1", r#"{"id":"p1","topic":"tenant1"}"#, None)
        .await
        .unwrap();
    kv.put(
        "/lport/p1",
        r#"{"id":"p1","topic":"tenant1","up":true}"#,
        None,
    )
    .await
    .unwrap();
    kv.put("/lswitch/s1", "plain text", None).await.unwrap();
    kv.delete("/lport/p1", None).await.unwrap();
    kv.put("/lport/a/b", "slash key", None).await.unwrap();

    let got = collect_until(&mut rx, "5 updates", WAIT, |g| g.len() >= 5).await;
    let got: Vec<_> = got.iter().map(summary).collect();
    let s = |x: &str| x.to_string();
    assert_eq!(
        got,
        vec![
            (
                s("lport"),
                s("p1"),
                Action::Create,
                Some(s(r#"{"id":"p1","topic":"tenant1"}"#)),
                s("tenant1")
            ),
            (
                s("lport"),
                s("p1"),
                Action::Set,
                Some(s(r#"{"id":"p1","topic":"tenant1","up":true}"#)),
                s("tenant1")
            ),
            (
                s("lswitch"),
                s("s1"),
                Action::Create,
                Some(s("plain text")),
                s("D")
            ),
            // a delete carries the previous value, so its topic is known too
            (
                s("lport"),
                s("p1"),
                Action::Delete,
                Some(s(r#"{"id":"p1","topic":"tenant1","up":true}"#)),
                s("tenant1")
            ),
            (
                s("lport"),
                s("a/b"),
                Action::Create,
                Some(s("slash key")),
                s("D")
            ),
        ]
    );
    assert!(bridge.stats.updates_published.get() >= 5);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_filter_exactly_and_registration_applies_while_running() {
    let etcd = EtcdServer::start().await;
    let port = free_port();
    let bridge = Bridge::start(&config(&etcd, port, ""));
    let sub = subscriber(port, &["t1"]);
    let (mut rx, _task) = sub.clone().updates(64);
    let kv = etcd.client().await;
    let probe_kv = kv.clone();
    await_flow(&mut rx, |i| {
        let mut c = probe_kv.clone();
        async move {
            c.put(format!("/probe/{i}"), r#"{"topic":"t1"}"#, None)
                .await
                .unwrap();
        }
    })
    .await;

    let mut c = kv.clone();
    // t10 shares t1's prefix: ZeroMQ would deliver it, the subscriber must not.
    for (key, topic) in [("a", "t2"), ("b", "t10"), ("c", "D"), ("d", "t1")] {
        c.put(
            format!("/lport/{key}"),
            format!(r#"{{"topic":"{topic}"}}"#),
            None,
        )
        .await
        .unwrap();
    }
    let got = collect_until(&mut rx, "the t1 update", WAIT, |g| !g.is_empty()).await;
    assert_eq!((got[0].key.as_str(), got[0].topic.as_str()), ("d", "t1"));

    sub.register_topic("t2");
    sub.unregister_topic("t1");
    // Registration is applied asynchronously: t1 updates may still arrive
    // until the first t2 one shows that the switch happened.
    let mut n = 0;
    'switch: loop {
        n += 1;
        c.put(format!("/lport/t2-{n}"), r#"{"topic":"t2"}"#, None)
            .await
            .unwrap();
        c.put(format!("/lport/t1-{n}"), r#"{"topic":"t1"}"#, None)
            .await
            .unwrap();
        while let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            if u.topic == "t2" {
                break 'switch;
            }
            assert_eq!(u.topic, "t1");
        }
        assert!(n < 50, "register_topic never took effect");
    }
    c.put("/lport/t1-last", r#"{"topic":"t1"}"#, None)
        .await
        .unwrap();
    c.put("/lport/t2-last", r#"{"topic":"t2"}"#, None)
        .await
        .unwrap();
    // after the switch, only t2 keeps arriving
    let more = collect_until(&mut rx, "t2-last", WAIT, |g| {
        g.iter().any(|u| u.key == "t2-last")
    })
    .await;
    assert!(more.iter().all(|u| u.topic == "t2"), "{more:?}");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dragonflow_python_subscriber_decodes_the_wire() {
    let etcd = EtcdServer::start().await;
    let port = free_port();
    let bridge = Bridge::start(&config(&etcd, port, ""));
    let script = workspace_path("tests/interop/dragonflow_subscriber.py");
    let mut py = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("tcp://127.0.0.1:{port}"))
        .arg("tenant1")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with pyzmq and msgpack (scripts/setup.sh installs them)");
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));
    let mut kv = etcd.client().await;
    // Python joins late too: write probes on D until one is echoed back.
    let mut n = 0;
    loop {
        n += 1;
        kv.put(format!("/probe/{n}"), "x", None).await.unwrap();
        if let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
        {
            assert!(line.contains("probe"), "{line}");
            break;
        }
        assert!(n < 60, "python subscriber never received anything");
    }
    kv.put("/lport/p9", r#"{"topic":"tenant1","name":"é"}"#, None)
        .await
        .unwrap();
    kv.put("/lport/other", r#"{"topic":"tenant2"}"#, None)
        .await
        .unwrap();
    kv.delete("/lport/p9", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if line.contains("probe") {
            continue;
        }
        seen.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    assert_eq!(seen[0]["table"], "lport");
    assert_eq!(seen[0]["key"], "p9");
    assert_eq!(seen[0]["action"], "create");
    assert_eq!(seen[0]["value"], r#"{"topic":"tenant1","name":"é"}"#);
    assert_eq!(seen[0]["topic"], "tenant1");
    assert_eq!(seen[0]["value_type"], "str");
    assert_eq!(seen[1]["action"], "delete");

    // Heartbeats go out all the while; Dragonflow's subscriber must never
    // see one (its topic matches no subscription prefix of D / tenants).
    let context = zmq::Context::new();
    let beats = context.socket(zmq::SUB).unwrap();
    beats.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    beats
        .set_subscribe(feedbridge::backend::HEARTBEAT_TOPIC.as_bytes())
        .unwrap();
    beats.set_rcvtimeo(5000).unwrap();
    for _ in 0..2 {
        let frames = beats.recv_multipart(0).expect("a heartbeat");
        assert_eq!(frames[0], feedbridge::backend::HEARTBEAT_TOPIC.as_bytes());
    }
    kv.put("/lport/marker", "{}", None).await.unwrap();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("the python subscriber is still running");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(
            v["topic"] == "D" || v["topic"] == "tenant1",
            "unexpected message at the Dragonflow subscriber: {line}"
        );
        if v["key"] == "marker" {
            break;
        }
    }
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_fails_fast_with_a_clear_error() {
    let port = free_port();
    let dead = free_port();
    let cfg = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"http://127.0.0.1:{dead}\"]\nconnect_timeout = \"1s\"\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{port}\"\n"
    );
    let bridge = Bridge::start(&cfg);
    let err = bridge.failure().await;
    assert!(
        err.contains("etcd") && err.contains(&dead.to_string()),
        "{err}"
    );
}
