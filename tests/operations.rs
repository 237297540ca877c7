//! Operations: the admin listener's metrics and health endpoints during an
//! end-to-end run, and the health probe command.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_feedbridge");

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn metric(body: &str, name_and_labels: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_written_and_health_endpoints_answer() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n[backend]\ntype = \"redis\"\nurl = \"{}\"\n[admin]\nlisten = \"{admin}\"\n",
        etcd.endpoint(),
        redis.url()
    );
    let bridge = Bridge::start(&cfg);
    let admin2 = admin.clone();
    eventually("the bridge to be ready", Duration::from_secs(20), || {
        let a = admin2.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::net::TcpStream::connect(&a)
                    .ok()
                    .map(|_| get(&a, "/readyz"))
            })
            .await
            .unwrap()
            .filter(|(s, _)| *s == 200)
        }
    })
    .await;
    let (status, body) = tokio::task::spawn_blocking({
        let a = admin.clone();
        move || get(&a, "/healthz")
    })
    .await
    .unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = tokio::task::spawn_blocking({
        let a = admin.clone();
        move || get(&a, "/readyz")
    })
    .await
    .unwrap();
    assert_eq!((status, body.trim()), (200, "ready (leader)"));

    let mut kv = etcd.client().await;
    for i in 0..5 {
        kv.put(format!("/lport/p{i}"), r#"{"topic":"t1"}"#, None)
            .await
            .unwrap();
    }
    kv.put("/lport/p0", r#"{"topic":"t1","x":1}"#, None)
        .await
        .unwrap();
    kv.delete("/lport/p1", None).await.unwrap();
    kv.put("/nokey", "outside the layout", None).await.unwrap();

    let a = admin.clone();
    let body = eventually("the counters to move", Duration::from_secs(20), move || {
        let a = a.clone();
        async move {
            let (_, body) = tokio::task::spawn_blocking(move || get(&a, "/metrics"))
                .await
                .unwrap();
            (metric(
                &body,
                "feedbridge_updates_published_total{backend=\"redis\",topic=\"t1\"}",
            ) >= 7.0)
                .then_some(body)
        }
    })
    .await;
    let read = |action: &str| {
        metric(&body, &format!("feedbridge_updates_read_total{{source=\"etcd\",table=\"lport\",action=\"{action}\"}}"))
    };
    assert_eq!(
        (read("create"), read("set"), read("delete")),
        (5.0, 1.0, 1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "feedbridge_updates_published_total{backend=\"redis\",topic=\"t1\"}"
        ),
        7.0
    );
    assert_eq!(
        metric(&body, "feedbridge_skipped_total{reason=\"outside_layout\"}"),
        1.0
    );
    let revision = etcd_revision(&mut kv).await as f64;
    assert_eq!(metric(&body, "feedbridge_source_revision"), revision);
    assert!(body.contains("feedbridge_checkpoint_revision"), "{body}");
    assert!(
        body.contains("feedbridge_reconnects_total{connection=\"source\"}"),
        "{body}"
    );

    // the container health check command
    let ok = std::process::Command::new(BIN)
        .args(["health", "--url", &format!("http://{admin}/readyz")])
        .status()
        .unwrap();
    assert!(ok.success());
    // Every metric the Grafana dashboard queries is exported, so the two
    // cannot drift apart.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_path("deploy/grafana/feedbridge.json")).unwrap(),
    )
    .unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                if word.starts_with("feedbridge_") {
                    queried.insert(word.to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 12, "{queried:?}");
    for name in &queried {
        let base = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            body.lines().any(|l| l.starts_with(&format!("{name} "))
                || l.starts_with(&format!("{name}{{"))
                || l.starts_with(&format!("# TYPE {base} "))),
            "the dashboard queries {name}, which the bridge does not export"
        );
    }
    // `feedbridge status`: one screen of the same figures
    let status = std::process::Command::new(BIN)
        .args(["status", "--url", &format!("http://{admin}")])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{screen}");
    let read: f64 = body
        .lines()
        .filter(|l| l.starts_with("feedbridge_updates_read_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    for needle in [
        "ready (leader)".to_string(),
        "leader".to_string(),
        format!("read            {read} changes"),
        "published".to_string(),
        "lag".to_string(),
        "backend up, source up".to_string(),
    ] {
        assert!(screen.contains(&needle), "{needle:?} not in:\n{screen}");
    }
    bridge.stop().await;
    let gone = std::process::Command::new(BIN)
        .args(["status", "--url", &format!("http://{admin}")])
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no bridge answers"));
    let down = std::process::Command::new(BIN)
        .args(["health", "--url", &format!("http://{admin}/readyz")])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!down.success(), "nothing listens after the stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_not_ready_while_the_source_is_down() {
    let mut etcd = EtcdServer::start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{}\"\n[admin]\nlisten = \"{admin}\"\n",
        etcd.endpoint(),
        free_port()
    );
    let bridge = Bridge::start(&cfg);
    let status = |a: String| async move {
        tokio::task::spawn_blocking(move || {
            std::net::TcpStream::connect(&a)
                .ok()
                .map(|_| get(&a, "/readyz").0)
        })
        .await
        .unwrap()
    };
    let a = admin.clone();
    eventually("ready", Duration::from_secs(20), || {
        let f = status(a.clone());
        async move { f.await.filter(|s| *s == 200) }
    })
    .await;
    etcd.stop();
    let a = admin.clone();
    eventually(
        "not ready while etcd is down",
        Duration::from_secs(30),
        || {
            let f = status(a.clone());
            async move { f.await.filter(|s| *s == 503) }
        },
    )
    .await;
    etcd.restart().await;
    let a = admin.clone();
    eventually("ready again", Duration::from_secs(30), || {
        let f = status(a.clone());
        async move { f.await.filter(|s| *s == 200) }
    })
    .await;
    bridge.stop().await;
}
