//! TLS and authentication against real servers the tests start: an etcd
//! serving https with client certificates, an etcd with users, and a
//! password-protected Redis. Wrong credentials fail fast with a clear
//! message that never contains the secret.

mod common;

use std::time::Duration;

use common::*;
use feedbridge::backend::PubSub;
use feedbridge::codec::Codec;
use feedbridge::config::{AuthConfig, BackendConfig, EtcdBackendConfig, RedisBackendConfig};
use feedbridge::pubsub::Subscriber;
use feedbridge::testing::TestCerts;
use feedbridge::{Action, DbUpdate};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    let certs = TestCerts::generate();
    let etcd = EtcdServer::start_tls(&certs).await;
    let auth = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        certs.path("ca.pem").display(),
        certs.path("client.pem").display(),
        certs.path("client.key").display()
    );
    let cfg = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{0}\"]\n[source.auth]\n{auth}[backend]\ntype = \"etcd\"\nendpoints = [\"{0}\"]\n[backend.auth]\n{auth}",
        etcd.endpoint()
    );
    let bridge = Bridge::start(&cfg);
    let tls = AuthConfig {
        ca_file: Some(certs.path("ca.pem")),
        cert_file: Some(certs.path("client.pem")),
        key_file: Some(certs.path("client.key")),
        ..Default::default()
    };
    let backend = BackendConfig::Etcd(EtcdBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        endpoints: vec![etcd.endpoint()],
        prefix: "/pubsub/".into(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        auth: tls.clone(),
    });
    let sub = PubSub::new(backend).get_subscriber();
    let (mut rx, _task) = sub.clone().updates(64);
    let mut kv = feedbridge::db::etcd::connect(&[etcd.endpoint()], Duration::from_secs(5), &tls)
        .await
        .unwrap();
    await_etcd_flow(&mut rx, &kv).await;
    kv.put("/lport/secure", "v", None).await.unwrap();
    let got = collect_until(&mut rx, "the update over TLS", WAIT, |g| !g.is_empty()).await;
    assert_eq!(
        (got[0].key.as_str(), got[0].action.clone()),
        ("secure", Action::Create)
    );
    bridge.stop().await;

    // Without a client certificate the server refuses, and the bridge says so.
    let no_cert = format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\nconnect_timeout = \"2s\"\n[source.auth]\nca_file = \"{}\"\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{}\"\n",
        etcd.endpoint(),
        certs.path("ca.pem").display(),
        free_port()
    );
    let err = Bridge::start(&no_cert).failure().await;
    assert!(
        err.contains("etcd") && err.contains(&etcd.endpoint()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_user_and_password_from_a_file() {
    let etcd = EtcdServer::start().await;
    let mut admin = etcd.client().await;
    admin.user_add("root", "rootpw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::write(&good, "rootpw\n").unwrap();
    std::fs::write(&bad, "guess-not\n").unwrap();
    let cfg = |file: &std::path::Path, port: u16| {
        format!(
            "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\nconnect_timeout = \"3s\"\n[source.auth]\nuser = \"root\"\npassword_file = \"{}\"\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{port}\"\n",
            etcd.endpoint(),
            file.display()
        )
    };
    let err = Bridge::start(&cfg(&bad, free_port())).failure().await;
    assert!(
        err.to_lowercase().contains("authentication failed"),
        "{err}"
    );
    assert!(!err.contains("guess-not"), "the secret leaked: {err}");

    let port = free_port();
    let bridge = Bridge::start(&cfg(&good, port));
    let sub = std::sync::Arc::new(feedbridge::backend::zmq::ZmqSubscriber::new(Codec::Msgpack));
    sub.register_listen_address(&format!("tcp://127.0.0.1:{port}"));
    sub.register_topic("");
    let (mut rx, _task) = sub.clone().updates(64);
    let options = etcd_client::ConnectOptions::new().with_user("root", "rootpw");
    let kv = etcd_client::Client::connect([etcd.endpoint()], Some(options))
        .await
        .unwrap();
    await_etcd_flow(&mut rx, &kv).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_password_works_and_a_wrong_one_fails_fast() {
    let redis = RedisServer::start_with(&["requirepass s3cret-pw"]).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::write(&good, "s3cret-pw").unwrap();
    std::fs::write(&bad, "nope-pw").unwrap();
    let cfg = |file: &std::path::Path| {
        format!(
            "[source]\ntype = \"redis\"\nurl = \"{0}\"\n[source.auth]\npassword_file = \"{1}\"\n[backend]\ntype = \"redis\"\nurl = \"{0}\"\n[backend.auth]\npassword_file = \"{1}\"\n",
            redis.url(),
            file.display()
        )
    };
    let err = Bridge::start(&cfg(&bad)).failure().await;
    assert!(
        err.contains("credentials") && !err.contains("running"),
        "a refused password is named as such: {err}"
    );
    assert!(
        !err.contains("nope-pw") && !err.contains("s3cret"),
        "the secret leaked: {err}"
    );

    let bridge = Bridge::start(&cfg(&good));
    let auth = AuthConfig {
        password_file: Some(good.clone()),
        ..Default::default()
    };
    let sub = PubSub::new(BackendConfig::Redis(RedisBackendConfig {
        silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
        url: redis.url(),
        codec: Codec::Msgpack,
        connect_timeout: Duration::from_secs(5),
        sharded: false,
        auth: auth.clone(),
    }))
    .get_subscriber();
    sub.register_topic("");
    let (mut rx, _task) = sub.clone().updates(64);
    let client = feedbridge::db::redis::client(&redis.url(), &auth).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    await_redis_flow_on(&mut rx, conn.clone()).await;
    let mut c = conn.clone();
    redis::cmd("SET")
        .arg("{lport.t}k")
        .arg("v")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let got = collect_until(&mut rx, "the update", WAIT, |g| !g.is_empty()).await;
    assert_eq!(
        got[0],
        DbUpdate {
            timestamp: got[0].timestamp,
            ..DbUpdate::new("lport", "k", Action::Create, Some("v".into())).with_topic("t")
        }
    );
    bridge.stop().await;
}
