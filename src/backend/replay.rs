//! Repairing a gap instead of re-reading: the bridge keeps its most recent
//! updates in a bounded [`ReplayBuffer`] and answers "what came after
//! revision R, on these topics?" on a ZeroMQ endpoint ([`ReplayServer`],
//! announced in its heartbeats); a subscriber that missed messages inside
//! a run (a high-water-mark drop, a reconnect) asks with [`ask`] and
//! delivers the answer instead of a `sync`. A position older than the
//! buffer is answered from the source's own [`History`] (etcd's), read on
//! a worker thread so that answers from the buffer never wait for it; only
//! when that history is gone too (compacted) does the subscriber re-read.
//!
//! The protocol, REQ → ROUTER: a request is one frame, the JSON object
//! `{"after": R, "topics": [..]}` (no topics: all); the answer is a JSON
//! status frame, `{"to": P}` (everything up to P follows) or
//! `{"gone": why}`, then one frame per update in the subscriber's codec.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sequence::Positions;
use crate::codec::{Codec, Envelope};
use crate::stats::Stats;
use crate::update::DbUpdate;
use crate::zmq_socket::{bind, CONTEXT};

/// The most values the buffer keeps, whatever `bridge.replay_buffer` says.
pub const MAX_BUFFER_BYTES: usize = 64 << 20;

/// The most updates one answer from the source's history carries (the
/// reader also stops at [`MAX_BUFFER_BYTES`] of keys and values): a
/// subscriber further behind re-reads, which is cheaper by then.
pub const HISTORY_MAX_UPDATES: usize = 100_000;

/// How long a subscriber waits for an answer before it re-reads instead.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// The bridge's most recent updates, in the order they were published.
#[derive(Debug)]
pub struct ReplayBuffer {
    entries: VecDeque<DbUpdate>,
    bytes: usize,
    max_entries: usize,
    /// Everything published after this revision is here (`None`: nothing
    /// to answer from yet).
    floor: Option<i64>,
    /// The revision of the last update recorded, kept when it is evicted:
    /// a source event known to exist, where a history read can end.
    last: Option<i64>,
}

/// Where a read of the source's history must end for a position older
/// than the buffer, and what the buffer adds after it.
#[derive(Debug)]
pub struct Older {
    /// The revision of an event the source published.
    pub until: i64,
    /// Whether the history read takes the events at `until` too (else
    /// they are the first of `then`).
    pub inclusive: bool,
    /// The buffer's updates after the history read, on the wanted topics.
    pub then: Vec<DbUpdate>,
}

/// A source's own history of changes (etcd keeps every revision until it
/// compacts): what the replay endpoint reads for a position the buffer no
/// longer reaches back to.
pub trait History: Send + Sync + 'static {
    /// The updates after revision `after` up to the known event at
    /// `until` (with it when `inclusive`), in order; at most `limit`,
    /// within `deadline`; or why not (compacted: the `sync` case).
    fn updates(
        &self,
        after: i64,
        until: i64,
        inclusive: bool,
        limit: usize,
        deadline: Duration,
    ) -> Result<Vec<DbUpdate>, String>;
}

impl ReplayBuffer {
    /// A buffer of at most `max_entries` updates.
    pub fn new(max_entries: usize) -> Self {
        ReplayBuffer {
            entries: VecDeque::new(),
            bytes: 0,
            max_entries,
            floor: None,
            last: None,
        }
    }

    /// Everything after `revision` is published from now on (a term's
    /// start, or the first position after a sync).
    pub fn published(&mut self, revision: i64) {
        self.floor.get_or_insert(revision);
    }

    /// Keeps `updates`, just published. A `sync` of everything cuts the
    /// history: nothing before it can be answered any more.
    pub fn record(&mut self, updates: impl IntoIterator<Item = DbUpdate>) {
        for update in updates {
            if update.revision.is_none() {
                if update.table.is_empty() {
                    self.entries.clear();
                    self.bytes = 0;
                    self.floor = None;
                    self.last = None;
                }
                continue;
            }
            self.last = update.revision;
            self.bytes += size(&update);
            self.entries.push_back(update);
        }
        while self.entries.len() > self.max_entries || self.bytes > MAX_BUFFER_BYTES {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= size(&old);
            self.floor = self.floor.max(old.revision);
        }
    }

    /// The updates after `after` on the topics `wants` selects, or why the
    /// buffer cannot tell.
    pub fn after(
        &self,
        after: i64,
        wants: impl Fn(&str) -> bool,
    ) -> Result<Vec<&DbUpdate>, String> {
        match self.floor {
            Some(floor) if after >= floor => Ok(self
                .entries
                .iter()
                .filter(|u| u.revision.is_some_and(|r| r > after) && wants(&u.topic))
                .collect()),
            Some(floor) => Err(format!(
                "the replay buffer starts after revision {floor}, past {after}"
            )),
            None => Err("the replay buffer holds nothing yet".into()),
        }
    }
}

impl ReplayBuffer {
    /// For a position `after` older than the buffer: where the history
    /// read ends and what the buffer adds, or why it cannot be answered.
    pub fn older(&self, after: i64, wants: impl Fn(&str) -> bool) -> Result<Older, String> {
        let Some(floor) = self.floor else {
            return Err("the replay buffer holds nothing yet".into());
        };
        if let Some(first) = self.entries.front().and_then(|u| u.revision) {
            return Ok(Older {
                until: first,
                inclusive: false,
                then: self
                    .entries
                    .iter()
                    .filter(|u| wants(&u.topic))
                    .cloned()
                    .collect(),
            });
        }
        match self.last {
            // Everything recorded was evicted: the last one ends the read.
            Some(last) if last == floor => Ok(Older {
                until: last,
                inclusive: true,
                then: Vec::new(),
            }),
            _ => Err(format!(
                "the replay buffer starts after revision {floor}, past {after}, and nothing published since marks where etcd's history would end"
            )),
        }
    }
}

fn size(update: &DbUpdate) -> usize {
    64 + update.table.len()
        + update.key.len()
        + update.topic.len()
        + update.value.as_ref().map_or(0, String::len)
}

#[derive(Serialize, Deserialize)]
struct Request {
    after: i64,
    #[serde(default)]
    topics: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    To(i64),
    Gone(String),
}

/// The bridge's side: a ROUTER socket on a thread of its own, answering
/// from the buffer, and from the source's [`History`] (on a worker thread)
/// for positions older than the buffer. Stops when dropped.
pub struct ReplayServer {
    endpoint: String,
    /// A message on it ends the router's thread, which otherwise sleeps
    /// until a request comes (no periodic wake-up of an idle bridge).
    stop: Mutex<zmq::Socket>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ReplayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayServer")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Requests waiting for a history read at most; one more is answered
/// "gone" (a `sync` for that subscriber) rather than queued past its
/// patience.
const HISTORY_QUEUE: usize = 64;

/// A request the buffer could not answer, for the history worker.
struct HistoryJob {
    /// The asker's ROUTER envelope (identity, empty frame).
    envelope: Vec<Vec<u8>>,
    after: i64,
    older: Older,
    to: i64,
    topics: Vec<String>,
    asked: std::time::Instant,
}

/// What answers from the buffer need.
struct Answerer {
    stats: Arc<Stats>,
    buffer: Arc<Mutex<ReplayBuffer>>,
    positions: Arc<Positions>,
    codec: Codec,
    history: Option<std::sync::mpsc::SyncSender<HistoryJob>>,
}

/// Names the inproc pipes of replay servers apart.
static WORKER_PIPES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl ReplayServer {
    /// Binds `endpoint` (port `*`: any free one) and answers from
    /// `buffer`, up to what `positions` says was published, encoding
    /// updates with `codec`; positions older than the buffer from
    /// `history`, when the source keeps one.
    pub fn bind(
        endpoint: &str,
        buffer: Arc<Mutex<ReplayBuffer>>,
        positions: Arc<Positions>,
        codec: Codec,
        history: Option<Arc<dyn History>>,
        stats: Arc<Stats>,
    ) -> Result<Self, String> {
        let router = replay_socket(zmq::ROUTER)?;
        bind(&router, endpoint)?;
        let endpoint = router
            .get_last_endpoint()
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| endpoint.to_owned());
        let mut threads = Vec::new();
        // The history worker hands its answers back over an inproc pipe:
        // only the router's own thread may use the router.
        let (pipe, jobs) = match history {
            None => (None, None),
            Some(history) => {
                let (pipe, jobs, worker) = history_worker(history, codec, stats.clone())?;
                threads.push(worker);
                (Some(pipe), Some(jobs))
            }
        };
        let answerer = Answerer {
            stats,
            buffer,
            positions,
            codec,
            history: jobs,
        };
        let (stopping, stop) = inproc_pair("replay-stop")?;
        threads.push(
            std::thread::Builder::new()
                .name("replay".into())
                .spawn(move || serve(&router, pipe.as_ref(), &answerer, &stopping))
                .map_err(|e| format!("cannot start the replay thread: {e}"))?,
        );
        tracing::info!(%endpoint, "Answering subscribers' gaps from the replay buffer.");
        Ok(ReplayServer {
            endpoint,
            stop: Mutex::new(stop),
            threads,
        })
    }

    /// The endpoint bound (the port chosen, for `*`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        if let Ok(stop) = self.stop.lock() {
            let _ = stop.send("", zmq::DONTWAIT);
        }
        // The router's thread goes first; with it the job queue's sender,
        // which ends the worker after its current read.
        for t in self.threads.drain(..).rev() {
            let _ = t.join();
        }
    }
}

fn replay_socket(kind: zmq::SocketType) -> Result<zmq::Socket, String> {
    let socket = CONTEXT
        .socket(kind)
        .map_err(|e| format!("cannot create the replay socket: {e}"))?;
    socket
        .set_linger(0)
        .map_err(|e| format!("cannot set options on the replay socket: {e}"))?;
    Ok(socket)
}

/// Starts the thread that reads `history` for the requests queued on the
/// returned sender; its replies come out of the returned pipe.
#[allow(clippy::type_complexity)]
fn history_worker(
    history: Arc<dyn History>,
    codec: Codec,
    stats: Arc<Stats>,
) -> Result<
    (
        zmq::Socket,
        std::sync::mpsc::SyncSender<HistoryJob>,
        std::thread::JoinHandle<()>,
    ),
    String,
> {
    let (pipe, worker) = inproc_pair("replay-history")?;
    let (jobs, queue) = std::sync::mpsc::sync_channel(HISTORY_QUEUE);
    let thread = std::thread::Builder::new()
        .name("replay-history".into())
        .spawn(move || {
            for job in queue {
                let reply = read_history(&*history, job, codec, &stats);
                let _ = worker.send_multipart(reply, 0);
            }
        })
        .map_err(|e| format!("cannot start the history thread: {e}"))?;
    Ok((pipe, jobs, thread))
}

/// Two inproc PAIR sockets connected to each other: (bound, connected).
fn inproc_pair(what: &str) -> Result<(zmq::Socket, zmq::Socket), String> {
    let name = format!(
        "inproc://feedbridge-{what}-{}",
        WORKER_PIPES.fetch_add(1, Ordering::Relaxed)
    );
    let bound = replay_socket(zmq::PAIR)?;
    bind(&bound, &name)?;
    let connected = replay_socket(zmq::PAIR)?;
    connected
        .connect(&name)
        .map_err(|e| format!("cannot connect {name}: {e}"))?;
    Ok((bound, connected))
}

/// The router's loop: requests in, answers out (its own, and the history
/// worker's through `pipe`), until a message on `stop`.
fn serve(
    router: &zmq::Socket,
    pipe: Option<&zmq::Socket>,
    answerer: &Answerer,
    stop: &zmq::Socket,
) {
    loop {
        let mut items = vec![
            router.as_poll_item(zmq::POLLIN),
            stop.as_poll_item(zmq::POLLIN),
        ];
        if let Some(pipe) = pipe {
            items.push(pipe.as_poll_item(zmq::POLLIN));
        }
        match zmq::poll(&mut items, -1) {
            Ok(n) if n > 0 => {}
            Ok(_) | Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "The replay server cannot wait for requests; it stops (subscribers' gaps become syncs).");
                return;
            }
        }
        if items[1].is_readable() {
            return;
        }
        if items.get(2).is_some_and(|i| i.is_readable()) {
            if let Some(Ok(reply)) = pipe.map(|p| p.recv_multipart(zmq::DONTWAIT)) {
                let _ = router.send_multipart(reply, zmq::DONTWAIT);
            }
        }
        if !items[0].is_readable() {
            continue;
        }
        let Ok(frames) = router.recv_multipart(zmq::DONTWAIT) else {
            continue;
        };
        // [identity, "", request] from a REQ socket.
        let [identity, empty, request] = frames.as_slice() else {
            continue;
        };
        let envelope = vec![identity.clone(), empty.clone()];
        if let Some(answer) = answerer.answer(request, &envelope) {
            let reply = envelope.into_iter().chain(answer).collect::<Vec<_>>();
            let _ = router.send_multipart(reply, zmq::DONTWAIT);
        }
    }
}

fn status(s: Status) -> Vec<u8> {
    serde_json::to_vec(&s).expect("plain JSON")
}

impl Answerer {
    /// The frames answering one request, or `None` when the history
    /// worker answers it.
    fn answer(&self, request: &[u8], envelope: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
        let Ok(request) = serde_json::from_slice::<Request>(request) else {
            return self.gone("a request the bridge cannot read".into());
        };
        let to = self.positions.published_position().unwrap_or(request.after);
        let wants = |t: &str| request.topics.is_empty() || request.topics.iter().any(|w| w == t);
        let buffer = self.buffer.lock().expect("replay buffer lock");
        let why = match buffer.after(request.after, wants) {
            Ok(updates) => {
                self.stats.replay_answered("buffer");
                let updates = updates
                    .into_iter()
                    .map(|u| self.codec.encode(u, &Envelope::default()));
                return Some(
                    std::iter::once(status(Status::To(to)))
                        .chain(updates)
                        .collect(),
                );
            }
            Err(why) => why,
        };
        let Some(jobs) = &self.history else {
            return self.gone(why);
        };
        let older = match buffer.older(request.after, wants) {
            Ok(older) => older,
            Err(why) => return self.gone(why),
        };
        drop(buffer);
        let job = HistoryJob {
            envelope: envelope.to_vec(),
            after: request.after,
            older,
            to,
            topics: request.topics,
            asked: std::time::Instant::now(),
        };
        match jobs.try_send(job) {
            Ok(()) => None,
            Err(_) => self.gone(format!(
                "{why}, and {HISTORY_QUEUE} other reads of etcd's history are waiting"
            )),
        }
    }

    /// The answer that makes the subscriber re-read.
    fn gone(&self, why: String) -> Option<Vec<Vec<u8>>> {
        self.stats.replay_answered("gone");
        Some(vec![status(Status::Gone(why))])
    }
}

/// Reads what a job needs from the source's history and builds the reply
/// (envelope included).
fn read_history(
    history: &dyn History,
    job: HistoryJob,
    codec: Codec,
    stats: &Stats,
) -> Vec<Vec<u8>> {
    let mut reply = job.envelope;
    // The asker stops waiting after ASK_TIMEOUT; leave room for the reply.
    let deadline = ASK_TIMEOUT
        .saturating_sub(job.asked.elapsed())
        .saturating_sub(Duration::from_millis(300));
    let wants = |t: &str| job.topics.is_empty() || job.topics.iter().any(|w| w == t);
    let older = job.older;
    let limit = HISTORY_MAX_UPDATES;
    match history.updates(job.after, older.until, older.inclusive, limit, deadline) {
        Ok(updates) => {
            stats.replay_answered("history");
            tracing::info!(
                after = job.after,
                to = job.to,
                from_history = updates.len(),
                from_buffer = older.then.len(),
                "Answered a gap older than the replay buffer from etcd's history."
            );
            reply.push(status(Status::To(job.to)));
            reply.extend(
                updates
                    .iter()
                    .filter(|u| wants(&u.topic))
                    .chain(&older.then)
                    .map(|u| codec.encode(u, &Envelope::default())),
            );
        }
        Err(why) => {
            stats.replay_answered("gone");
            tracing::info!(after = job.after, %why, "A gap older than the replay buffer cannot be read from etcd's history: the subscriber re-reads.");
            reply.push(status(Status::Gone(format!(
                "older than the replay buffer, and {why}"
            ))));
        }
    }
    reply
}

/// The subscriber's side: asks the replay endpoint for what came after
/// revision `after` on `topics` (empty: all). Blocks up to [`ASK_TIMEOUT`].
/// Returns the updates and the position they reach, or why not.
pub fn ask(
    endpoint: &str,
    after: i64,
    topics: &[String],
    codec: Codec,
) -> Result<(Vec<DbUpdate>, i64), String> {
    let socket = CONTEXT
        .socket(zmq::REQ)
        .map_err(|e| format!("cannot create a replay request socket: {e}"))?;
    let ms = ASK_TIMEOUT.as_millis() as i32;
    socket
        .set_linger(0)
        .and_then(|()| socket.set_rcvtimeo(ms))
        .and_then(|()| socket.set_sndtimeo(ms))
        .map_err(|e| format!("cannot set options: {e}"))?;
    socket
        .connect(endpoint)
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    let request = serde_json::to_vec(&Request {
        after,
        topics: topics.to_vec(),
    })
    .expect("plain JSON");
    socket
        .send(request, 0)
        .map_err(|e| format!("cannot ask {endpoint}: {e}"))?;
    let frames = socket
        .recv_multipart(0)
        .map_err(|e| format!("no answer from {endpoint}: {e}"))?;
    let (status, payloads) = frames
        .split_first()
        .ok_or_else(|| format!("an empty answer from {endpoint}"))?;
    match serde_json::from_slice::<Status>(status) {
        Ok(Status::To(to)) => {
            let updates = payloads
                .iter()
                .map(|p| codec.decode(p).map(|(u, _)| u).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((updates, to))
        }
        Ok(Status::Gone(why)) => Err(why),
        Err(e) => Err(format!("an answer that cannot be read: {e}")),
    }
}

/// What a repair asks about: the registered topics (none: all).
pub fn topics_of(registration: &super::Registration) -> Vec<String> {
    if registration.topics.contains("") {
        Vec::new()
    } else {
        registration.topics.iter().cloned().collect()
    }
}

/// Repairs a gap of `publisher`'s: asks its replay endpoint for what came
/// after this subscriber's position on `topics`, and moves the position.
/// The updates are to be delivered through [`Dedup`](super::Dedup) (some
/// were delivered already); `Err` says why a `sync` is due instead.
pub fn repair(
    tracker: &mut super::GapTracker,
    publisher: &str,
    topics: &[String],
    codec: Codec,
) -> Result<Vec<DbUpdate>, String> {
    let (service, after, endpoint) = tracker.repair_point(publisher)?;
    let (updates, to) = ask(&endpoint, after, topics, codec)?;
    tracker.repaired(&service, to);
    tracing::info!(%publisher, after, to, updates = updates.len(), "Repaired a gap from the publisher's replay buffer (no re-read).");
    Ok(updates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(key: &str, topic: &str, rev: i64) -> DbUpdate {
        let mut u = DbUpdate::new("t", key, crate::Action::Set, Some("v".into())).with_topic(topic);
        u.revision = Some(rev);
        u
    }

    #[test]
    fn the_buffer_answers_only_what_it_reaches_back_to() {
        let mut b = ReplayBuffer::new(3);
        assert!(b.after(0, |_| true).is_err(), "nothing yet");
        b.published(10);
        b.record([at("a", "x", 11), at("b", "y", 12)]);
        let got: Vec<i64> = b
            .after(10, |_| true)
            .unwrap()
            .iter()
            .filter_map(|u| u.revision)
            .collect();
        assert_eq!(got, vec![11, 12]);
        assert_eq!(b.after(11, |t| t == "y").unwrap().len(), 1);
        assert!(b.after(9, |_| true).is_err(), "from before the term");
        b.record([at("c", "x", 13), at("d", "x", 14)]); // 11 evicted
        assert!(b.after(10, |_| true).is_err());
        assert_eq!(b.after(11, |_| true).unwrap().len(), 3);
        b.record([DbUpdate::sync("compacted")]);
        assert!(b.after(14, |_| true).is_err(), "a sync cuts the history");
        b.published(20);
        assert_eq!(b.after(20, |_| true).unwrap().len(), 0);
    }

    #[test]
    fn a_position_older_than_the_buffer_reads_history_up_to_a_known_event() {
        let mut b = ReplayBuffer::new(2);
        b.published(10);
        assert!(b.older(5, |_| true).is_err(), "no event to end a read at");
        b.record([at("a", "x", 11), at("b", "y", 12), at("c", "x", 13)]);
        let older = b.older(5, |t| t == "x").unwrap();
        assert_eq!((older.until, older.inclusive), (12, false));
        assert_eq!(
            older.then.iter().map(|u| u.revision).collect::<Vec<_>>(),
            vec![Some(13)]
        );
        let mut empty = ReplayBuffer::new(0);
        empty.published(10);
        empty.record([at("a", "x", 11)]);
        let older = empty.older(5, |_| true).unwrap();
        assert_eq!(
            (older.until, older.inclusive),
            (11, true),
            "the evicted last"
        );
        assert!(older.then.is_empty());
    }

    #[test]
    fn a_subscriber_asks_and_gets_what_it_missed() {
        let buffer = Arc::new(Mutex::new(ReplayBuffer::new(100)));
        let positions = Arc::new(Positions::new("s"));
        positions.start_after(5);
        buffer.lock().unwrap().published(5);
        buffer
            .lock()
            .unwrap()
            .record([at("a", "x", 6), at("b", "y", 7), at("c", "x", 8)]);
        positions.published(8);
        let server = ReplayServer::bind(
            "tcp://127.0.0.1:*",
            buffer,
            positions,
            Codec::Msgpack,
            None,
            Arc::default(),
        )
        .unwrap();
        let (got, to) = ask(server.endpoint(), 6, &["x".into()], Codec::Msgpack).unwrap();
        assert_eq!(to, 8);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].key.as_str(), got[0].revision), ("c", Some(8)));
        let gone = ask(server.endpoint(), 1, &[], Codec::Msgpack).unwrap_err();
        assert!(gone.contains("starts after revision 5"), "{gone}");
    }
}
