//! Receivers in child processes of their own (the plain consumer that is
//! the floor, the subscribers of a fan-out), so their CPU is theirs and
//! not the harness's. The child reports the least its receivers have
//! delivered on stdout (each 100 ms, when it changed, with how long ago
//! its last delivery was) and answers commands
//! on stdin: `reset` (counting starts again from zero; acknowledged with
//! `reset`) and `report` (the latency percentiles). The parent mirrors the
//! count in a [`Recorder`], so the same waits and rates work on it.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::measure::{least_delivered, percentile, plain_watcher, Recorder, Sink};
use crate::servers::KillOnDrop;
use crate::servers::Target;

/// What a child's receivers saw, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Report {
    /// Percentiles over every receiver of the child together.
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    /// The p99 of its slowest receiver.
    pub(crate) worst_p99: f64,
}

/// Child side: serves `recorders` until stdin closes.
pub(crate) fn serve(recorders: Vec<Arc<Recorder>>) {
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let (recs, o) = (recorders.clone(), out.clone());
    std::thread::spawn(move || {
        let mut told = u64::MAX;
        loop {
            // Read under the output lock: a reset cannot slip in between.
            let mut o = o.lock().unwrap();
            let least = least_delivered(&recs);
            if least != told {
                // How long ago the last delivery was, so the parent's rate
                // does not depend on this 100 ms tick.
                let age = recs
                    .iter()
                    .filter_map(|r| *r.last_at.lock().unwrap())
                    .max()
                    .map_or(0, |t| t.elapsed().as_nanos());
                let _ = writeln!(o, "delivered {least} {age}");
                let _ = o.flush();
                told = least;
            }
            drop(o);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let reply = match line.trim() {
            "reset" => {
                // Under the output lock: no count from before the reset
                // can follow its acknowledgement.
                let mut o = out.lock().unwrap();
                for r in &recorders {
                    r.delivered.store(0, Relaxed);
                    r.latencies_ns.lock().unwrap().clear();
                }
                let _ = writeln!(o, "reset");
                let _ = o.flush();
                continue;
            }
            "report" => {
                let mut all = Vec::new();
                let mut worst = 0f64;
                for r in &recorders {
                    let mut mine = r.latencies_ns.lock().unwrap().clone();
                    mine.sort_unstable();
                    worst = worst.max(percentile(&mine, 0.99));
                    all.extend(mine);
                }
                all.sort_unstable();
                format!(
                    "report {} {} {} {worst}",
                    percentile(&all, 0.5),
                    percentile(&all, 0.99),
                    percentile(&all, 0.999)
                )
            }
            other => format!("unknown command {other}"),
        };
        let mut o = out.lock().unwrap();
        let _ = writeln!(o, "{reply}");
        let _ = o.flush();
    }
}

/// Parent side: one child and the mirror of its count.
pub(crate) struct Remote {
    child: KillOnDrop,
    stdin: ChildStdin,
    mirror: Arc<Recorder>,
    replies: mpsc::Receiver<String>,
}

impl Remote {
    /// Starts `cmd` (this binary in a child mode that calls [`serve`]).
    pub(crate) fn spawn(mut cmd: Command) -> Remote {
        let mut child = KillOnDrop(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let stdin = child.0.stdin.take().unwrap();
        let stdout = child.0.stdout.take().unwrap();
        let mirror = Arc::new(Recorder::default());
        let (tx, replies) = mpsc::channel();
        let m = mirror.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(report) = line.strip_prefix("delivered ") {
                    let mut f = report.split(' ').map(|x| x.parse::<u64>().unwrap_or(0));
                    let (n, age) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
                    if n != m.delivered.swap(n, Relaxed) {
                        let at = Instant::now().checked_sub(Duration::from_nanos(age));
                        *m.last_at.lock().unwrap() = at.or(Some(Instant::now()));
                    }
                } else {
                    if line == "reset" {
                        m.delivered.store(0, Relaxed);
                        *m.last_at.lock().unwrap() = None;
                    }
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        });
        Remote {
            child,
            stdin,
            mirror,
            replies,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The child's count (its slowest receiver's), as a recorder.
    pub(crate) fn mirror(&self) -> Arc<Recorder> {
        self.mirror.clone()
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("the child reads its commands");
        self.stdin.flush().unwrap();
        tokio::task::block_in_place(|| self.replies.recv_timeout(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("the child did not answer {command}: {e}"))
    }

    /// Counting starts again from zero, in the child and the mirror.
    pub(crate) fn reset(&mut self) {
        let reply = self.ask("reset");
        assert_eq!(reply, "reset");
    }

    /// The latency percentiles since the last reset.
    pub(crate) fn report(&mut self) -> Report {
        let reply = self.ask("report");
        let f: Vec<f64> = reply
            .strip_prefix("report ")
            .unwrap_or_else(|| panic!("not a report: {reply}"))
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(f64::NAN))
            .collect();
        Report {
            p50: f[0],
            p99: f[1],
            p999: f[2],
            worst_p99: f[3],
        }
    }
}

/// `--plain-child SPEC`: the plain consumer of `--plain-child`'s database
/// in a process of its own, served to the harness (see [`crate::remote`]),
/// on the runtime the bridge runs on. With `forward`, a minimal forwarder
/// instead: each value goes out on a libzmq PUB socket bound there (a
/// topic frame and the value, as the bridge sends), for the harness's raw
/// subscriber to record.
pub(crate) fn plain_child(spec: &str, prev_kv: bool, forward: Option<&str>) {
    let target = Target::parse(spec);
    feedbridge::bridge::runtime().unwrap().block_on(async {
        let rec = Arc::new(Recorder::default());
        let sink: Sink = match forward {
            None => {
                let rec = rec.clone();
                Arc::new(move |v: &[u8]| rec.record(v))
            }
            Some(endpoint) => {
                let context = zmq::Context::new();
                let publisher = context.socket(zmq::PUB).unwrap();
                publisher.set_sndhwm(10_000).unwrap();
                publisher.bind(endpoint).unwrap();
                let publisher = std::sync::Mutex::new(publisher);
                Arc::new(move |v: &[u8]| {
                    let _ = publisher
                        .lock()
                        .unwrap()
                        .send_multipart([&b"bench"[..], v], 0);
                })
            }
        };
        let stop = CancellationToken::new();
        let _watcher = plain_watcher(&target, sink, stop, prev_kv).await;
        tokio::task::spawn_blocking(move || serve(vec![rec]))
            .await
            .unwrap();
    });
}
