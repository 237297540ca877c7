//! Every example config in `config/` runs end to end: the file itself is
//! loaded (only its endpoints are pointed at the test's servers, through the
//! documented environment overrides) and `feedbridge tail --backend ...`
//! prints a row written to the source database.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use feedbridge::config::Config;
use feedbridge::stats::Stats;
use tokio_util::sync::CancellationToken;

async fn run_example(
    name: &str,
    tail_args: &[String],
    etcd: &EtcdServer,
    redis: &RedisServer,
    zmq_port: u16,
) {
    let path = workspace_path(&format!("config/{name}.toml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut config = Config::parse(&text, &path).unwrap();
    let (etcd_ep, redis_url, zmq) = (
        etcd.endpoint(),
        redis.url(),
        format!("tcp://127.0.0.1:{zmq_port}"),
    );
    config.apply_env(|var| match var {
        "FEEDBRIDGE_ETCD_ENDPOINTS" => Some(etcd_ep.clone()),
        "FEEDBRIDGE_REDIS_URL" => Some(redis_url.clone()),
        "FEEDBRIDGE_ZMQ_BIND" => Some(zmq.clone()),
        _ => None,
    });
    config.validate(&path).unwrap();
    let is_redis_source = matches!(
        config.source,
        Some(feedbridge::config::SourceConfig::Redis(_))
    );
    let shutdown = CancellationToken::new();
    let bridge = tokio::spawn(feedbridge::bridge::run(
        config,
        shutdown.clone(),
        Arc::new(Stats::default()),
    ));

    let (mut tail, mut lines) = spawn_tail(tail_args);
    let mut kv = etcd.client().await;
    let mut rc = redis.connection().await;
    // one row per example, so an earlier example's row cannot interfere
    let row = name.replace('-', "_");
    let (probe_key, row_key) = if is_redis_source {
        ("{probe.}x".to_string(), format!("{{lport.tenant1}}{row}"))
    } else {
        ("/probe/x".to_string(), format!("/lport/{row}"))
    };
    let mut n = 0;
    loop {
        n += 1;
        if is_redis_source {
            redis::cmd("SET")
                .arg(&probe_key)
                .arg(n)
                .query_async::<()>(&mut rc)
                .await
                .unwrap();
        } else {
            kv.put(probe_key.as_str(), n.to_string(), None)
                .await
                .unwrap();
        }
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), lines.recv()).await {
            break;
        }
        assert!(n < 60, "{name}: tail printed nothing");
    }
    let value = r#"{"id":"p1","topic":"tenant1"}"#;
    if is_redis_source {
        redis::cmd("SET")
            .arg(&row_key)
            .arg(value)
            .query_async::<()>(&mut rc)
            .await
            .unwrap();
    } else {
        kv.put(row_key.as_str(), value, None).await.unwrap();
    }
    let line = loop {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .unwrap_or_else(|_| panic!("{name}: the row never reached tail"))
            .unwrap();
        if !l.contains("probe") {
            break l;
        }
    };
    let expected = format!(
        r#"{{"table":"lport","key":"{row}","action":"create","value":"{{\"id\":\"p1\",\"topic\":\"tenant1\"}}","topic":"tenant1"}}"#
    );
    assert_eq!(line, expected, "{name}");
    tail.kill().unwrap();
    tail.wait().unwrap();
    shutdown.cancel();
    bridge.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_config_runs_end_to_end() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let s = |x: &str| x.to_string();
    for name in [
        "feedbridge",
        "redis-zmq",
        "redis-cluster",
        "redis-redis",
        "etcd-etcd",
        "etcd-redis",
    ] {
        let port = free_port();
        let args = match name {
            // (redis-cluster runs here on a standalone server, which it also
            // accepts; tests/redis_cluster.rs covers a real cluster)
            "feedbridge" | "redis-zmq" | "redis-cluster" => vec![
                s("--backend"),
                s("zmq"),
                s("--connect"),
                format!("tcp://127.0.0.1:{port}"),
            ],
            "redis-redis" | "etcd-redis" => {
                vec![s("--backend"), s("redis"), s("--redis-url"), redis.url()]
            }
            _ => vec![
                s("--backend"),
                s("etcd"),
                s("--etcd-endpoint"),
                etcd.endpoint(),
            ],
        };
        run_example(name, &args, &etcd, &redis, port).await;
    }
}
