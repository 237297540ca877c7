//! The publisher service's multiproc channel (Dragonflow's "multi process
//! publisher"): on a controller host many worker processes cannot all bind
//! the one publisher port, so they PUSH their updates over a local ipc
//! socket to this PULL socket, and the service republishes them through the
//! configured backend, in arrival order. Rust processes use
//! [`ZmqPublisher::push`](crate::backend::zmq::ZmqPublisher::push).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::config::MultiprocConfig;
use crate::mapper::{Mapped, Skip};
use crate::source::SourceEvent;
use crate::stats::Stats;
use crate::update::{Action, DbUpdate};
use crate::zmq_socket::{bind, CONTEXT};

/// Checks one multiproc message as a source change is checked: exactly
/// `[topic, payload]`, a UTF-8 topic, a decodable payload with a known
/// action, a value within `max_value_bytes` (else a `sync` of that row, as
/// [`Mapped::Resync`]). Anything else is [`Mapped::Skip`] of a bad message.
fn validate(frames: &[Vec<u8>], codec: Codec, max_value_bytes: usize) -> Mapped {
    let bad = Mapped::Skip(Skip::BadMessage);
    let [topic, payload] = frames else {
        return bad;
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return bad;
    };
    let Ok((mut update, _)) = codec.decode(payload) else {
        return bad;
    };
    if matches!(update.action, Action::Other(_)) {
        return bad;
    }
    if !topic.is_empty() {
        update.topic = topic.to_owned();
    }
    if update
        .value
        .as_ref()
        .is_some_and(|v| v.len() > max_value_bytes)
    {
        if update.action == Action::Delete {
            update.value = None; // a delete is always delivered
            return Mapped::Update(update);
        }
        let reason = format!(
            "the value of {}/{} is not carried ({}): re-read the row",
            update.table,
            update.key,
            Skip::Oversize.as_str()
        );
        let sync = DbUpdate::new(update.table, update.key, Action::Sync, Some(reason))
            .with_topic(update.topic);
        return Mapped::Resync(sync, Skip::Oversize);
    }
    Mapped::Update(update)
}

/// The bound PULL socket.
pub struct MultiprocListener {
    socket: zmq::Socket,
    endpoint: String,
    codec: Codec,
}

impl MultiprocListener {
    /// Binds now, so a bad path fails at start-up. A socket file left by a
    /// crashed run is replaced; one a live service listens on is refused.
    pub fn bind(config: &MultiprocConfig) -> Result<Self, String> {
        let endpoint = config.endpoint();
        if let Some(dir) = std::path::Path::new(&endpoint["ipc://".len()..]).parent() {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                return Err(format!(
                    "multiproc.socket: directory {} does not exist",
                    dir.display()
                ));
            }
        }
        let socket = CONTEXT.socket(zmq::PULL).map_err(|e| e.to_string())?;
        // Messages still queued at shutdown are read, not dropped: see run.
        socket.set_linger(0).map_err(|e| e.to_string())?;
        bind(&socket, &endpoint)?;
        tracing::info!(%endpoint, "Multiproc channel listening.");
        Ok(MultiprocListener {
            socket,
            endpoint,
            codec: config.codec,
        })
    }

    /// Receives until `stop`, handing each update to the pipeline with the
    /// topic of its topic frame. At stop it still reads what already
    /// arrived. Malformed messages are logged, counted, and skipped; a
    /// value over `max_value_bytes` becomes a `sync` of its row, as from a
    /// source.
    ///
    /// It runs as a task on the pipeline's runtime, woken through the
    /// socket's `ZMQ_FD` by the runtime's own epoll: no thread of its own
    /// to wake and hand over from for each message.
    pub async fn run(
        self,
        tx: mpsc::Sender<SourceEvent>,
        stop: CancellationToken,
        stats: Arc<Stats>,
        max_value_bytes: usize,
    ) -> Result<(), String> {
        let MultiprocListener {
            socket,
            endpoint,
            codec,
        } = self;
        let fd = ZmqFd(socket.get_fd().map_err(|e| e.to_string())?);
        // SAFETY: the fd is the socket's, open while the socket lives, and
        // the socket is dropped only after `signal` (below).
        let signal = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.to_string())?;
        let mut events = Vec::with_capacity(READ_BATCH);
        let result = loop {
            // `ZMQ_FD` is edge-triggered: what is queued is read (its
            // events asked after the readiness was cleared) before the
            // next wait, so no message waits for another to wake it.
            read_queued(&socket, &mut events, codec, max_value_bytes, &stats);
            if events.is_empty() {
                if stop.is_cancelled() {
                    break Ok(());
                }
                tokio::select! {
                    ready = signal.readable() => match ready {
                        Ok(mut guard) => guard.clear_ready(),
                        Err(e) => break Err(e.to_string()),
                    },
                    // Once more round: what already arrived is read.
                    _ = stop.cancelled() => {}
                }
                continue;
            }
            let mut gone = false;
            for event in events.drain(..) {
                if tx.send(event).await.is_err() {
                    gone = true;
                    break;
                }
            }
            if gone {
                break Ok(());
            }
        };
        drop(signal); // deregistered before the socket closes its fd
        drop(socket);
        let _ = std::fs::remove_file(&endpoint["ipc://".len()..]);
        result
    }
}

/// Messages read at most before they are handed over.
const READ_BATCH: usize = 1024;

/// The socket's signalling fd, owned by the socket (not closed here).
struct ZmqFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for ZmqFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// Reads what libzmq has queued (up to [`READ_BATCH`]) into `events`,
/// checked as [`validate`] says.
fn read_queued(
    socket: &zmq::Socket,
    events: &mut Vec<SourceEvent>,
    codec: Codec,
    max_value_bytes: usize,
    stats: &Stats,
) {
    while events.len() < READ_BATCH && socket.get_events().is_ok_and(|e| e.contains(zmq::POLLIN)) {
        let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) else {
            break;
        };
        match validate(&frames, codec, max_value_bytes) {
            Mapped::Update(update) => events.push(SourceEvent::Update(update)),
            Mapped::Resync(sync, skip) => {
                stats.uncarried(skip, sync.key.as_bytes());
                stats.syncs_published.inc();
                events.push(SourceEvent::Update(sync));
            }
            Mapped::Skip(_) => stats.skip(
                Skip::BadMessage,
                frames.first().map(Vec::as_slice).unwrap_or_default(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiproc_messages_are_checked_like_source_changes() {
        let codec = Codec::Msgpack;
        let payload = |u: &DbUpdate| codec.encode(u, &Default::default());
        let ok = DbUpdate::new("lport", "p1", Action::Set, Some("v".into()));
        let frames = |t: &[u8], u: &DbUpdate| vec![t.to_vec(), payload(u)];
        let Mapped::Update(forwarded) = validate(&frames(b"t", &ok), codec, 10) else {
            panic!("a good message is forwarded");
        };
        assert_eq!(forwarded.topic, "t");
        let explode = DbUpdate::new("lport", "p1", Action::from("explode"), None);
        for bad in [
            frames(b"t\xff", &ok),
            frames(b"t", &explode),
            vec![b"t".to_vec()],
            vec![b"t".to_vec(), b"junk".to_vec()],
        ] {
            assert_eq!(validate(&bad, codec, 10), Mapped::Skip(Skip::BadMessage));
        }
        let big = DbUpdate::new("lport", "p1", Action::Set, Some("x".repeat(11)));
        let Mapped::Resync(sync, Skip::Oversize) = validate(&frames(b"t", &big), codec, 10) else {
            panic!("an oversize value becomes a sync of its row");
        };
        assert_eq!(
            (
                sync.action,
                sync.table.as_str(),
                sync.key.as_str(),
                sync.topic.as_str()
            ),
            (Action::Sync, "lport", "p1", "t")
        );
        let mut gone = big.clone();
        gone.action = Action::Delete;
        let Mapped::Update(delete) = validate(&frames(b"t", &gone), codec, 10) else {
            panic!("a delete is always forwarded");
        };
        assert_eq!((delete.action, delete.value), (Action::Delete, None));
    }
}
