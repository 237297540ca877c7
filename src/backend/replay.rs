//! Repairing a gap instead of re-reading: the bridge keeps its most recent
//! updates in a bounded [`ReplayBuffer`] and answers "what came after
//! revision R, on these topics?" on a ZeroMQ endpoint ([`ReplayServer`],
//! announced in its heartbeats); a subscriber that missed messages inside
//! a run (a high-water-mark drop, a reconnect) asks with [`ask`] and
//! delivers the answer instead of a `sync`. Only when the buffer no longer
//! reaches back to its position does the subscriber re-read.
//!
//! The protocol, REQ → ROUTER: a request is one frame, the JSON object
//! `{"after": R, "topics": [..]}` (no topics: all); the answer is a JSON
//! status frame, `{"to": P}` (everything up to P follows) or
//! `{"gone": why}`, then one frame per update in the subscriber's codec.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sequence::Positions;
use crate::codec::{Codec, Envelope};
use crate::update::DbUpdate;
use crate::zmq_socket::{bind, CONTEXT};

/// The most values the buffer keeps, whatever `bridge.replay_buffer` says.
const MAX_BUFFER_BYTES: usize = 64 << 20;

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
}

impl ReplayBuffer {
    /// A buffer of at most `max_entries` updates.
    pub fn new(max_entries: usize) -> Self {
        ReplayBuffer {
            entries: VecDeque::new(),
            bytes: 0,
            max_entries,
            floor: None,
        }
    }

    /// Everything after `revision` is published from now on (a term's
    /// start, or the first position after a sync).
    pub fn published(&mut self, revision: i64) {
        self.floor.get_or_insert(revision);
    }

    /// Keeps `updates`, just published. A `sync` of everything cuts the
    /// history: nothing before it can be answered any more.
    pub fn record(&mut self, updates: &[DbUpdate]) {
        for update in updates {
            if update.revision.is_none() {
                if update.table.is_empty() {
                    self.entries.clear();
                    self.bytes = 0;
                    self.floor = None;
                }
                continue;
            }
            self.bytes += size(update);
            self.entries.push_back(update.clone());
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
/// from the buffer. Stops when dropped.
#[derive(Debug)]
pub struct ReplayServer {
    endpoint: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReplayServer {
    /// Binds `endpoint` (port `*`: any free one) and answers from
    /// `buffer`, up to what `positions` says was published, encoding
    /// updates with `codec`.
    pub fn bind(
        endpoint: &str,
        buffer: Arc<Mutex<ReplayBuffer>>,
        positions: Arc<Positions>,
        codec: Codec,
    ) -> Result<Self, String> {
        let socket = CONTEXT
            .socket(zmq::ROUTER)
            .map_err(|e| format!("cannot create the replay socket: {e}"))?;
        socket
            .set_linger(0)
            .map_err(|e| format!("cannot set options on the replay socket: {e}"))?;
        bind(&socket, endpoint)?;
        let endpoint = socket
            .get_last_endpoint()
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| endpoint.to_owned());
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("replay".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    if !matches!(socket.poll(zmq::POLLIN, 100), Ok(n) if n > 0) {
                        continue;
                    }
                    let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) else {
                        continue;
                    };
                    // [identity, "", request] from a REQ socket.
                    let [identity, empty, request] = frames.as_slice() else {
                        continue;
                    };
                    let answer = answer(request, &buffer, &positions, codec);
                    let mut reply = vec![identity.clone(), empty.clone()];
                    reply.extend(answer);
                    let _ = socket.send_multipart(reply, zmq::DONTWAIT);
                }
            })
            .map_err(|e| format!("cannot start the replay thread: {e}"))?;
        tracing::info!(%endpoint, "Answering subscribers' gaps from the replay buffer.");
        Ok(ReplayServer {
            endpoint,
            stop,
            thread: Some(thread),
        })
    }

    /// The endpoint bound (the port chosen, for `*`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The frames answering one request.
fn answer(
    request: &[u8],
    buffer: &Mutex<ReplayBuffer>,
    positions: &Positions,
    codec: Codec,
) -> Vec<Vec<u8>> {
    let status = |s: Status| serde_json::to_vec(&s).expect("plain JSON");
    let Ok(request) = serde_json::from_slice::<Request>(request) else {
        return vec![status(Status::Gone(
            "a request the bridge cannot read".into(),
        ))];
    };
    let to = positions.published_position().unwrap_or(request.after);
    let wants = |t: &str| request.topics.is_empty() || request.topics.iter().any(|w| w == t);
    let buffer = buffer.lock().expect("replay buffer lock");
    match buffer.after(request.after, wants) {
        Ok(updates) => std::iter::once(status(Status::To(to)))
            .chain(
                updates
                    .into_iter()
                    .map(|u| codec.encode(u, &Envelope::default())),
            )
            .collect(),
        Err(why) => vec![status(Status::Gone(why))],
    }
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
    let (service, after, endpoint) = tracker
        .repair_point(publisher)
        .ok_or("its position or replay endpoint is not known yet")?;
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
        b.record(&[at("a", "x", 11), at("b", "y", 12)]);
        let got: Vec<i64> = b
            .after(10, |_| true)
            .unwrap()
            .iter()
            .filter_map(|u| u.revision)
            .collect();
        assert_eq!(got, vec![11, 12]);
        assert_eq!(b.after(11, |t| t == "y").unwrap().len(), 1);
        assert!(b.after(9, |_| true).is_err(), "from before the term");
        b.record(&[at("c", "x", 13), at("d", "x", 14)]); // 11 evicted
        assert!(b.after(10, |_| true).is_err());
        assert_eq!(b.after(11, |_| true).unwrap().len(), 3);
        b.record(&[DbUpdate::sync("compacted")]);
        assert!(b.after(14, |_| true).is_err(), "a sync cuts the history");
        b.published(20);
        assert_eq!(b.after(20, |_| true).unwrap().len(), 0);
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
            .record(&[at("a", "x", 6), at("b", "y", 7), at("c", "x", 8)]);
        positions.published(8);
        let server =
            ReplayServer::bind("tcp://127.0.0.1:*", buffer, positions, Codec::Msgpack).unwrap();
        let (got, to) = ask(server.endpoint(), 6, &["x".into()], Codec::Msgpack).unwrap();
        assert_eq!(to, 8);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].key.as_str(), got[0].revision), ("c", Some(8)));
        let gone = ask(server.endpoint(), 1, &[], Codec::Msgpack).unwrap_err();
        assert!(gone.contains("starts after revision 5"), "{gone}");
    }
}
