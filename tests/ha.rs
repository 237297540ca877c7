//! High availability with real etcd and bridge processes: failover after
//! `kill -9`, a paused (SIGSTOP) leader that must not publish stale work
//! when it resumes, and a graceful hand-over on SIGTERM. Subscribers read
//! Redis PUBLISH messages raw, to see which instance (publisher id) sent
//! each one.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use feedbridge::codec::{Codec, Envelope};
use feedbridge::DbUpdate;
use futures_util::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_feedbridge");

/// Every message with its envelope and arrival time.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(DbUpdate, Envelope, Instant)>>>);

impl Seen {
    async fn start(redis: &RedisServer) -> (Seen, Received) {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.psubscribe("*").await.unwrap();
        let (seen, received) = (Seen::default(), Received::default());
        let (s, r) = (seen.clone(), received.clone());
        tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(m) = messages.next().await {
                if let Ok((u, env)) = Codec::Msgpack.decode(m.get_payload_bytes()) {
                    r.0.lock().unwrap().push(u.clone());
                    s.0.lock().unwrap().push((u, env, Instant::now()));
                }
            }
        });
        (seen, received)
    }

    fn publishers_after(&self, t: Instant) -> Vec<String> {
        let mut ids: Vec<String> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, at)| *at > t)
            .filter_map(|(_, e, _)| e.publisher.clone())
            .collect();
        ids.dedup();
        ids
    }

    /// Waits for the first message after `t` from a publisher other than
    /// `old`, and returns when it arrived.
    async fn first_other_after(&self, what: &str, t: Instant, old: &str) -> Instant {
        eventually(what, Duration::from_secs(30), || async move {
            let seen = self.0.lock().unwrap();
            seen.iter()
                .find(|(_, e, at)| *at > t && e.publisher.as_deref() != Some(old))
                .map(|(_, _, at)| *at)
        })
        .await
    }

    fn last_publisher(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .last()
            .and_then(|(_, e, _)| e.publisher.clone())
    }
}

fn instance_config(etcd: &EtcdServer, redis: &RedisServer, name: &str, ttl: &str) -> String {
    format!(
        "[source]\ntype = \"etcd\"\nendpoints = [\"{}\"]\n[backend]\ntype = \"redis\"\nurl = \"{}\"\n[ha]\nservice = \"test\"\nlease_ttl = \"{ttl}\"\ninstance = \"{name}\"\n",
        etcd.endpoint(),
        redis.url()
    )
}

fn spawn(dir: &std::path::Path, name: &str, cfg: &str) -> KillOnDrop {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    KillOnDrop(
        Command::new(BIN)
            .args(["run", "--log-level", "feedbridge=debug,info", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The instance holding the election: the oldest key under the prefix.
async fn leader(etcd: &EtcdServer) -> Option<String> {
    let mut c = etcd.client().await;
    let opts = etcd_client::GetOptions::new().with_prefix().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let r = c.get("/feedbridge/election/", Some(opts)).await.ok()?;
    r.kvs().first().map(|kv| kv.value_str().unwrap().to_owned())
}

async fn await_leader_other_than(etcd: &EtcdServer, old: &str) -> String {
    eventually("a new leader", Duration::from_secs(30), || async {
        leader(etcd).await.filter(|l| l != old)
    })
    .await
}

/// Probes until the leader's messages arrive; returns its publisher id.
async fn await_flow_from_leader(etcd: &EtcdServer, seen: &Seen) -> String {
    let mut kv = etcd.client().await;
    let mut n = 0;
    loop {
        n += 1;
        kv.put("/probe/ha", n.to_string(), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(p) = seen.last_publisher() {
            return p;
        }
        assert!(n < 300, "no instance ever published");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_leader_a_standby_takes_over_without_missing_revisions() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (seen, received) = Seen::start(&redis).await;
    let admin: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut instances: Vec<(String, KillOnDrop)> = ["a", "b", "c"]
        .iter()
        .zip(&admin)
        .map(|(n, a)| {
            let cfg =
                instance_config(&etcd, &redis, n, "2s") + &format!("[admin]\nlisten = \"{a}\"\n");
            (n.to_string(), spawn(dir.path(), n, &cfg))
        })
        .collect();
    let first_id = await_flow_from_leader(&etcd, &seen).await;
    let leader_name = leader(&etcd).await.unwrap();
    // /readyz and the metrics say which instance leads
    for ((name, _), a) in instances.iter().zip(&admin) {
        let role = if *name == leader_name {
            "leader"
        } else {
            "standby"
        };
        let a = a.clone();
        let (ready, metrics) = tokio::task::spawn_blocking(move || {
            (http_get(&a, "/readyz"), http_get(&a, "/metrics"))
        })
        .await
        .unwrap();
        assert_eq!(ready.trim(), format!("ready ({role})"), "{name}");
        let gauge = if role == "leader" {
            "feedbridge_leader 1"
        } else {
            "feedbridge_leader 0"
        };
        assert!(metrics.contains(gauge), "{name}: {metrics}");
    }

    let log = Log::default();
    let writer = tokio::spawn(write_ops(etcd.endpoint(), 0, 400, log.clone()));
    received
        .wait("the stream under way", |g| lport(g).len() >= 60)
        .await;
    let pos = instances
        .iter()
        .position(|(n, _)| *n == leader_name)
        .unwrap();
    instances[pos].1.kill().unwrap();
    let killed = Instant::now();
    let new_leader = await_leader_other_than(&etcd, &leader_name).await;
    // the first message from another instance after the kill
    let took_over = seen
        .first_other_after("the new leader to publish", killed, &first_id)
        .await;
    let failover = took_over.duration_since(killed);
    eprintln!(
        "kill -9 failover: {new_leader} published {failover:?} after the kill (lease_ttl 2s)"
    );
    assert!(
        failover < Duration::from_secs(2) + Duration::from_secs(5),
        "{failover:?}"
    );
    writer.await.unwrap();
    verify(&log, &received, &etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_does_not_publish_after_the_new_leader_started() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (seen, received) = Seen::start(&redis).await;
    let instances: Vec<(String, KillOnDrop)> = ["a", "b"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                spawn(dir.path(), n, &instance_config(&etcd, &redis, n, "2s")),
            )
        })
        .collect();
    let old_id = await_flow_from_leader(&etcd, &seen).await;
    let old_name = leader(&etcd).await.unwrap();
    let old_pid = instances
        .iter()
        .find(|(n, _)| *n == old_name)
        .unwrap()
        .1
        .id()
        .to_string();

    let log = Log::default();
    let writer = tokio::spawn(write_ops(etcd.endpoint(), 0, 600, log.clone()));
    received
        .wait("the stream under way", |g| lport(g).len() >= 50)
        .await;
    assert!(Command::new("kill")
        .args(["-STOP", &old_pid])
        .status()
        .unwrap()
        .success());
    let stopped = Instant::now();
    await_leader_other_than(&etcd, &old_name).await;
    let new_started = seen
        .first_other_after("the new leader to publish", stopped, &old_id)
        .await;
    assert!(Command::new("kill")
        .args(["-CONT", &old_pid])
        .status()
        .unwrap()
        .success());
    writer.await.unwrap();
    // more writes after the resume, so the old leader had every chance
    let log2 = Log::default();
    write_ops(etcd.endpoint(), 600, 700, log2.clone()).await;
    verify(&log, &received, &etcd).await;
    verify(&log2, &received, &etcd).await;
    let after = seen.publishers_after(new_started);
    assert!(
        !after.contains(&old_id),
        "the resumed old leader published stale work: {after:?}"
    );
    eprintln!(
        "SIGSTOP failover: new leader published {:?} after the stop (lease_ttl 2s)",
        new_started.duration_since(stopped)
    );
}

/// A leader that finds a newer term holding the publishing fence (a term
/// that took it and is gone) stands down and campaigns again, instead of
/// retrying a publish that can never succeed; alone, it wins a new term,
/// takes the fence and delivers everything. The nemesis (seed 4, 60 s)
/// found the way there: an election answered after the winner's lease had
/// expired made a second leader for 120 ms, which took the fence from the
/// real one; the real one then retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_finds_its_fence_taken_stands_down_and_leads_again() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (seen, received) = Seen::start(&redis).await;
    let _a = spawn(dir.path(), "a", &instance_config(&etcd, &redis, "a", "2s"));
    await_flow_from_leader(&etcd, &seen).await;
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let fences: Vec<String> = redis::cmd("KEYS")
        .arg("{feedbridge:*}:fence")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fences.len(), 1, "{fences:?}");
    redis::cmd("SET")
        .arg(&fences[0])
        .arg("a-newer-term-that-is-gone:1")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let log = Log::default();
    write_ops(etcd.endpoint(), 0, 200, log.clone()).await;
    verify(&log, &received, &etcd).await;
    let said = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(said.contains("standing down"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_without_waiting_for_the_lease() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (seen, received) = Seen::start(&redis).await;
    // a long TTL: only a resignation can make the hand-over fast
    let mut instances: Vec<(String, KillOnDrop)> = ["a", "b"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                spawn(dir.path(), n, &instance_config(&etcd, &redis, n, "30s")),
            )
        })
        .collect();
    let old_id = await_flow_from_leader(&etcd, &seen).await;
    let old_name = leader(&etcd).await.unwrap();
    let pos = instances.iter().position(|(n, _)| *n == old_name).unwrap();
    let log = Log::default();
    let writer = tokio::spawn(write_ops(etcd.endpoint(), 0, 300, log.clone()));
    received
        .wait("the stream under way", |g| lport(g).len() >= 50)
        .await;
    let pid = instances[pos].1.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let termed = Instant::now();
    let status = instances[pos].1.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let took_over = seen
        .first_other_after("the standby to publish", termed, &old_id)
        .await;
    let handover = took_over.duration_since(termed);
    eprintln!(
        "SIGTERM hand-over: the standby published {handover:?} after the signal (lease_ttl 30s)"
    );
    assert!(
        handover < Duration::from_secs(10),
        "waited for the lease: {handover:?}"
    );
    writer.await.unwrap();
    verify(&log, &received, &etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_source_elects_through_a_redis_lock_and_fails_over() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (seen, received) = Seen::start(&redis).await;
    let cfg = |name: &str| {
        format!(
            "[source]\ntype = \"redis\"\nurl = \"{0}\"\n[backend]\ntype = \"redis\"\nurl = \"{0}\"\n[ha]\nservice = \"test\"\nlease_ttl = \"2s\"\ninstance = \"{name}\"\n",
            redis.url()
        )
    };
    let mut instances: Vec<(String, KillOnDrop)> = ["a", "b"]
        .iter()
        .map(|n| (n.to_string(), spawn(dir.path(), n, &cfg(n))))
        .collect();
    let mut conn = redis.connection().await;
    let holder = || {
        let mut c = conn.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("{feedbridge:*}:leader")
                .query_async(&mut c)
                .await
                .ok()?;
            let token: String = redis::cmd("GET")
                .arg(keys.first()?)
                .query_async(&mut c)
                .await
                .ok()?;
            Some(token.split(':').next()?.to_owned())
        }
    };
    let first = eventually("a leader", Duration::from_secs(20), holder).await;
    // probe until the leader publishes
    let mut n = 0;
    while seen.last_publisher().is_none() {
        n += 1;
        redis::cmd("SET")
            .arg("{probe.}x")
            .arg(n)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(n < 200, "no instance published");
    }
    let first_id = seen.last_publisher().unwrap();
    for i in 0..50 {
        redis::cmd("SET")
            .arg(format!("{{lport.}}k{i}"))
            .arg(format!("v{i}"))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let pos = instances.iter().position(|(n, _)| *n == first).unwrap();
    instances[pos].1.kill().unwrap();
    let killed = Instant::now();
    // written while no one leads: the new leader's reconciliation finds them
    for i in 25..75 {
        redis::cmd("SET")
            .arg(format!("{{lport.}}k{i}"))
            .arg(format!("w{i}"))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let took_over = seen
        .first_other_after("the standby to publish", killed, &first_id)
        .await;
    eprintln!(
        "Redis-lock failover: published {:?} after the kill (lease_ttl 2s)",
        took_over.duration_since(killed)
    );
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..75 {
        let v = if i < 25 {
            format!("v{i}")
        } else {
            format!("w{i}")
        };
        expected.insert(("lport".to_string(), format!("k{i}")), v);
    }
    received
        .wait("the subscriber's view to equal Redis", |g| {
            view(&lport(g)) == expected
        })
        .await;
    let syncs = received
        .all()
        .iter()
        .filter(|u| u.action == feedbridge::Action::Sync)
        .count();
    assert!(
        syncs >= 1,
        "the new leader announces it may have missed deletes"
    );
}

/// Found by the nemesis (issue 22, seed 1): members that reach etcd by
/// different addresses (here one through a proxy) derived different
/// service ids, so each campaigned in an election of its own and both
/// published. `ha.service` names the group instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_reaching_etcd_by_different_addresses_share_one_election() {
    let etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let proxy = feedbridge::testing::FaultProxy::start(&format!("127.0.0.1:{}", etcd.client_port));
    let dir = tempfile::tempdir().unwrap();
    let _a = spawn(dir.path(), "a", &instance_config(&etcd, &redis, "a", "2s"));
    let b_config = instance_config(&etcd, &redis, "b", "2s")
        .replace(&etcd.endpoint(), &format!("http://{}", proxy.addr()));
    let _b = spawn(dir.path(), "b", &b_config);
    let elections = eventually(
        "both members campaigning",
        Duration::from_secs(30),
        || async {
            let mut c = etcd.client().await;
            let keys = c
                .get(
                    "/feedbridge/election/",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_keys_only(),
                    ),
                )
                .await
                .ok()?;
            let elections: std::collections::BTreeSet<String> = keys
                .kvs()
                .iter()
                .filter_map(|kv| kv.key_str().ok())
                .filter_map(|k| k.rsplit_once('/').map(|(election, _)| election.to_owned()))
                .collect();
            (keys.kvs().len() >= 2).then_some(elections)
        },
    )
    .await;
    assert_eq!(
        elections.len(),
        1,
        "one election for the group: {elections:?}"
    );
}

/// Found by the nemesis (issue 22, seed 2): a standby whose campaign was
/// cut by a restart of etcd exited ("high availability: … broken pipe")
/// instead of campaigning again, leaving the pair without a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_etcd_does_not_end_either_member() {
    let mut etcd = EtcdServer::start().await;
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = spawn(dir.path(), "a", &instance_config(&etcd, &redis, "a", "2s"));
    let mut b = spawn(dir.path(), "b", &instance_config(&etcd, &redis, "b", "2s"));
    eventually(
        "both members campaigning",
        Duration::from_secs(30),
        || async {
            let mut c = etcd.client().await;
            let opts = etcd_client::GetOptions::new()
                .with_prefix()
                .with_keys_only();
            let keys = c.get("/feedbridge/election/", Some(opts)).await.ok()?;
            (keys.kvs().len() >= 2).then_some(())
        },
    )
    .await;
    etcd.restart().await;
    // Both stay up (an exit is what the bug did, within a second), and a
    // leader is elected again.
    let leader = eventually(
        "a leader after the restart",
        Duration::from_secs(30),
        || async { leader(&etcd).await },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, child) in [("a", &mut a), ("b", &mut b)] {
        if let Some(status) = child.try_wait().unwrap() {
            let said = std::fs::read_to_string(dir.path().join(format!("{name}.log")));
            panic!(
                "member {name} exited ({status}) after the etcd restart (leader now {leader}); it said:\n{}",
                said.unwrap_or_default()
            );
        }
    }
}

/// Probes (`{probe.}x` writes) until a publish reaches a fresh subscriber.
async fn until_published(redis: &RedisServer) {
    let (seen, _) = Seen::start(redis).await;
    let conn = redis.connection().await;
    eventually("a publish", Duration::from_secs(30), || {
        let mut conn = conn.clone();
        let seen = seen.clone();
        async move {
            redis::cmd("SET")
                .arg("{probe.}x")
                .arg(1)
                .query_async::<()>(&mut conn)
                .await
                .ok()?;
            seen.last_publisher()
        }
    })
    .await;
}

/// Waits (30 s at most) for `done`, failing with the member's log if it exits.
async fn while_alive(
    member: &mut KillOnDrop,
    log: &std::path::Path,
    what: &str,
    done: impl Fn() -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        if let Some(status) = member.try_wait().unwrap() {
            panic!(
                "the member exited ({status}) waiting for {what}; it said:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the member said:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Redis source's side of the test above: a member that reached Redis
/// in one term and starts the next while Redis is down (the term ended
/// with etcd, the election's store, out of reach) retries until Redis is
/// back, then publishes. Before, the new term failed ("cannot set up the
/// redis publisher" / "cannot connect") and the process exited for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_that_starts_while_the_redis_source_is_down_waits_for_it() {
    term_starts_while_redis_is_down(true).await;
}

/// The same over ZeroMQ: the term's publisher binds, so it is the source
/// that finds Redis down, and it retries inside the term (the etcd
/// source's way) rather than failing the term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_whose_redis_source_is_down_retries_it_inside_the_term() {
    term_starts_while_redis_is_down(false).await;
}

async fn term_starts_while_redis_is_down(redis_backend: bool) {
    let mut etcd = EtcdServer::start().await;
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let backend = if redis_backend {
        format!("type = \"redis\"\nurl = \"{}\"", redis.url())
    } else {
        format!("type = \"zmq\"\nbind = \"tcp://127.0.0.1:{}\"", free_port())
    };
    let cfg = format!(
        "[source]\ntype = \"redis\"\nurl = \"{}\"\n[backend]\n{backend}\n[ha]\nservice = \"test\"\nendpoints = [\"{}\"]\nlease_ttl = \"2s\"\ninstance = \"a\"\n",
        redis.url(),
        etcd.endpoint()
    );
    let mut a = spawn(dir.path(), "a", &cfg);
    let log = dir.path().join("a.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    // What the member said from its second election on.
    let second_term = || {
        let text = read();
        let (at, _) = text.match_indices("Elected leader").nth(1)?;
        Some(text[at..].to_owned())
    };
    let source_reconciled = || read().matches("Reconciled Redis keys").count();
    while_alive(&mut a, &log, "the first reconciliation", || {
        source_reconciled() >= 1
    })
    .await;
    if redis_backend {
        until_published(&redis).await;
    }
    redis.stop();
    while_alive(&mut a, &log, "the source to notice", || {
        read().contains("Connection lost; retrying with backoff. connection=redis source")
    })
    .await;
    etcd.stop();
    while_alive(&mut a, &log, "the term to end", || {
        read().contains("Leadership lost")
    })
    .await;
    etcd.restart().await;
    // Elected again, it finds Redis down (the backend or the source,
    // whichever it connects first) and keeps trying.
    while_alive(&mut a, &log, "a new term to find Redis down", || {
        second_term().is_some_and(|t| t.contains("Connection lost") && t.contains("127.0.0.1:"))
    })
    .await;
    if !redis_backend {
        let term = second_term().unwrap();
        assert!(
            term.contains("connection=redis source") && !term.contains("a term's databases"),
            "the source retries inside the term; the member said:\n{}",
            read()
        );
    }
    redis.restart().await;
    while_alive(&mut a, &log, "the source to reconcile again", || {
        second_term().is_some_and(|t| t.contains("Reconciled Redis keys"))
    })
    .await;
    if redis_backend {
        until_published(&redis).await;
    }
    while_alive(&mut a, &log, "nothing", || true).await;
}

/// An election that answers after the candidate's lease expired is void:
/// etcd's `Campaign` returns once the keys before the candidate's are
/// gone, without checking that the candidate's own key still exists. Here
/// the candidate is cut off (through a proxy) until its lease expires and
/// its key is deleted, the leader resigns meanwhile, and the link heals:
/// the answer "elected" arrives, and the candidate must campaign again
/// with a new lease rather than lead on a lease that no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_answered_after_the_lease_expired_is_campaigned_again() {
    use feedbridge::config::HaConfig;
    use feedbridge::testing::{Fault, FaultProxy};
    use tokio_util::sync::CancellationToken;
    let etcd = EtcdServer::start().await;
    let proxy = FaultProxy::start(etcd.endpoint().trim_start_matches("http://"));
    let config = |endpoint: String, name: &str| HaConfig {
        service: Some("void".into()),
        endpoints: vec![endpoint],
        url: None,
        prefix: "/feedbridge".into(),
        lease_ttl: Duration::from_secs(2),
        instance: Some(name.into()),
        auth: Default::default(),
    };
    let never = CancellationToken::new();
    let leader_config = config(etcd.endpoint(), "l");
    let leader = feedbridge::ha::campaign(&leader_config, "l", "void", &never)
        .await
        .unwrap()
        .expect("elected");
    let candidate_config = config(format!("http://{}", proxy.addr()), "c");
    let stop = never.clone();
    let candidate = tokio::spawn(async move {
        feedbridge::ha::campaign(&candidate_config, "c", "void", &stop).await
    });
    let keys = || async {
        let mut c = etcd.client().await;
        let opts = etcd_client::GetOptions::new().with_prefix();
        let r = c.get("/feedbridge/election/", Some(opts)).await.unwrap();
        r.kvs()
            .iter()
            .map(|kv| kv.value_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    eventually("the candidate's key", Duration::from_secs(10), || async {
        (keys().await.len() == 2).then_some(())
    })
    .await;
    proxy.set(Fault::Blackhole);
    eventually(
        "the candidate's lease to expire",
        Duration::from_secs(15),
        || async { (keys().await == ["l"]).then_some(()) },
    )
    .await;
    leader.resign().await;
    proxy.set(Fault::Pass);
    let lead = tokio::time::timeout(Duration::from_secs(30), candidate)
        .await
        .expect("the candidate is elected once alone")
        .unwrap()
        .unwrap()
        .expect("elected");
    assert!(
        lead.is_valid(),
        "elected on a lease that had expired: a second leader beside any elected meanwhile"
    );
    assert_eq!(keys().await, ["c"], "its own key holds the election");
}
