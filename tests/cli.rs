//! The `feedbridge` binary as a user runs it: check, run, tail, signals.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_feedbridge");

#[test]
fn check_accepts_examples_and_rejects_bad_configs_with_exit_2() {
    for example in [
        "feedbridge",
        "etcd-etcd",
        "etcd-redis",
        "redis-zmq",
        "redis-redis",
        "redis-cluster",
        "publisher-service",
        "ha",
    ] {
        let (code, out) = check_file(&workspace_path(&format!("config/{example}.toml")));
        assert_eq!(code, Some(0), "{example}: {out}");
    }
    let cases = [
        (
            "[source]\ntype = \"etcd\"\nprefx = \"/\"\n[backend]\ntype = \"zmq\"\n",
            "prefx",
        ),
        (
            "[source]\ntype = \"etcd\"\n[backend]\ntype = \"zmq\"\nlinger = \"soon\"\n",
            "backend.linger",
        ),
        (
            "[source]\ntype = \"etcd\"\n[backend]\ntype = \"nats\"\n",
            "backend.type",
        ),
        ("[source]\ntype = \"etcd\"\n", "[backend]"),
    ];
    for (text, needle) in cases {
        let (code, out) = check(text);
        assert_eq!(code, Some(2), "{out}");
        assert!(
            out.contains(needle) && out.contains("c.toml"),
            "{needle} not in: {out}"
        );
    }
    let out = Command::new(BIN)
        .args(["run", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_tail_binaries_end_to_end_then_sigterm_exits_0() {
    let etcd = EtcdServer::start().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{port}\"\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let mut bridge = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (mut tail, mut lines) =
        spawn_tail(&["--connect".into(), format!("tcp://127.0.0.1:{port}")]);
    let mut kv = etcd.client().await;
    let mut n = 0;
    loop {
        n += 1;
        kv.put("/probe/x", n.to_string(), None).await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), lines.recv()).await {
            break;
        }
        assert!(n < 60, "tail printed nothing");
    }
    kv.put("/lport/p1", r#"{"id":"p1"}"#, None).await.unwrap();
    let line = loop {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .unwrap()
            .unwrap();
        if !l.contains("probe") {
            break l;
        }
    };
    assert_eq!(
        line,
        r#"{"table":"lport","key":"p1","action":"create","value":"{\"id\":\"p1\"}","topic":"D"}"#
    );

    for child in [&mut bridge, &mut tail] {
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }
    for child in [&mut bridge, &mut tail] {
        let status = wait_exit(child, Duration::from_secs(15));
        assert_eq!(status.code(), Some(0));
    }
}

/// Runs `feedbridge check` on the file: exit code, stdout and stderr.
fn check_file(path: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// The same for a config `text` (written to `c.toml`).
fn check(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    check_file(&path)
}

#[test]
fn check_never_prints_a_secret_and_refuses_malformed_endpoints() {
    // A malformed Redis URL with a password, and an etcd endpoint with one.
    let (code, out) = check(
        "[source]\ntype = \"redis\"\nurl = \"redis//:secretpw@127.0.0.1:6379/0\"\n[backend]\ntype = \"zmq\"\n",
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("source.url") && !out.contains("secretpw"),
        "{out}"
    );
    let (code, out) = check(
        "[source]\ntype = \"etcd\"\nendpoints = [\"http://root:secretpw@127.0.0.1:2379\"]\n[backend]\ntype = \"zmq\"\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("secretpw"), "{out}");
    for endpoint in [
        "htp:/127.0.0.1::99999",
        "http://127.0.0.1:99999",
        "ftp://127.0.0.1:2379",
        "http://127.0.0.1",
        "http://127.0.0.1:2379/v3",
    ] {
        let (code, out) = check(&format!(
            "[source]\ntype = \"etcd\"\nendpoints = [\"{endpoint}\"]\n[backend]\ntype = \"zmq\"\n"
        ));
        assert_eq!(code, Some(2), "{endpoint} accepted: {out}");
        assert!(out.contains("source.endpoints"), "{out}");
    }
    let (code, out) = check(
        "[source]\ntype = \"etcd\"\nendpoints = [\"127.0.0.1:2379\", \"https://etcd-1:2379\"]\n[backend]\ntype = \"zmq\"\n",
    );
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn check_warns_about_unauthenticated_listeners_on_every_address() {
    let (code, out) = check(
        "[source]\ntype = \"etcd\"\n[backend]\ntype = \"zmq\"\nbind = \"tcp://0.0.0.0:8866\"\n[admin]\nlisten = \"0.0.0.0:9095\"\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("warning: backend.bind"), "{out}");
    assert!(out.contains("warning: admin.listen"), "{out}");
    let (_, out) = check(
        "[source]\ntype = \"etcd\"\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:8866\"\n",
    );
    assert!(!out.contains("warning"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_stops_after_count_or_timeout_and_prints_pretty_lines() {
    let redis = RedisServer::start().await;
    let tail = |extra: &[&str]| {
        Command::new(BIN)
            .args(["tail", "--backend", "redis", "--redis-url", &redis.url()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // --count: exits 0 after two updates, in the readable format.
    let child = tail(&["--count", "2", "--timeout", "30s", "--format", "pretty"]);
    await_pattern_subscriber(&redis).await;
    let backend =
        feedbridge::config::BackendConfig::Redis(feedbridge::config::RedisBackendConfig {
            silence_timeout: feedbridge::config::DEFAULT_SILENCE_TIMEOUT,
            url: redis.url(),
            codec: feedbridge::codec::Codec::Msgpack,
            connect_timeout: Duration::from_secs(5),
            sharded: false,
            auth: Default::default(),
        });
    let publisher = feedbridge::backend::PubSub::new(backend)
        .get_publisher()
        .await
        .unwrap();
    for (key, action) in [
        ("p1", feedbridge::Action::Create),
        ("p1", feedbridge::Action::Delete),
        ("p2", feedbridge::Action::Create),
    ] {
        let u =
            feedbridge::DbUpdate::new("lport", key, action, Some("v".into())).with_topic("tenant1");
        publisher.send_event(&u, None).await.unwrap();
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains("create")
            && lines[0].contains("lport/p1")
            && lines[0].contains("@tenant1"),
        "{stdout}"
    );
    assert!(lines[1].contains("delete"), "{stdout}");
    assert!(!lines[0].starts_with('{'), "pretty, not JSON: {stdout}");

    // --timeout with too few updates: exits 1 and says so.
    let start = std::time::Instant::now();
    let child = tail(&["--count", "5", "--timeout", "1s"]);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out after 1s with 0 of 5"));
    assert!(start.elapsed() < Duration::from_secs(15));
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in ["tail", "check", "count", "sharded"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(".ie") || text.contains(".TH feedbridge"),
        "{text}"
    );
    assert!(text.contains("tail"));
}

/// `admin.log_format = "json"` (or `--log-format json`): every stderr line
/// of a failing `run` is one JSON object with the fields log shippers
/// index, and the password in the config appears in none of them.
#[test]
fn json_logs_are_one_object_per_line_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    // Nothing listens on port 1: the source cannot connect and `run` fails.
    std::fs::write(
        &path,
        "[source]\ntype = \"redis\"\nurl = \"redis://user:secretpw@127.0.0.1:1/0\"\nconnect_timeout = \"1s\"\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:0\"\n[admin]\nlog_format = \"json\"\n",
    )
    .unwrap();
    for flag in [None, Some("json")] {
        let mut cmd = Command::new(BIN);
        if let Some(format) = flag {
            cmd.args(["--log-format", format]);
        }
        let out = cmd.args(["run", "--config"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "the source is unreachable");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(!lines.is_empty(), "no log line: {stderr}");
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for field in ["timestamp", "level", "target", "message"] {
                assert!(v.get(field).is_some(), "{field} missing in {line}");
            }
        }
        assert!(lines.iter().any(|l| l.contains("\"ERROR\"")), "{stderr}");
        assert!(
            !stderr.contains("secretpw"),
            "a secret in the logs: {stderr}"
        );
    }
    // Text stays the default, and the flag wins over the config.
    let out = Command::new(BIN)
        .args(["--log-format", "text", "run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.lines().any(|l| l.starts_with('{')), "{stderr}");
    assert!(stderr.contains("error: redis source"), "{stderr}");
    assert!(!stderr.contains("secretpw"), "{stderr}");
}

/// `Type=notify` against a real datagram socket standing in for systemd:
/// READY=1 once ready, WATCHDOG=1 at half of WATCHDOG_USEC while the
/// pipeline is alive (and `/livez` says so), STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let etcd = EtcdServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n[backend]\ntype = \"zmq\"\nbind = \"tcp://127.0.0.1:{}\"\n[admin]\nlisten = \"{admin}\"\n",
            etcd.endpoint(),
            free_port()
        ),
    )
    .unwrap();
    let mut bridge = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "1000000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let next = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = next();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(first.contains("STATUS=ready (leader)"), "{first:?}");
    // Pets at half the interval: two within about a second.
    let started = std::time::Instant::now();
    for _ in 0..2 {
        let pet = next();
        assert_eq!(pet.trim(), "WATCHDOG=1");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let livez = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&admin).unwrap();
        write!(s, "GET /livez HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(
        livez.contains(" 200 ") && livez.ends_with("alive\n"),
        "{livez}"
    );
    let pid = bridge.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let stopping = loop {
        let m = next();
        if m.trim() != "WATCHDOG=1" {
            break m;
        }
    };
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = wait_exit(&mut bridge, Duration::from_secs(20));
    assert!(status.success());
}
