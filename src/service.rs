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

/// How often the receive loop looks at the stop request while idle.
const POLL_INTERVAL_MS: i64 = 50;

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
        let receive = move || {
            loop {
                let stopping = stop.is_cancelled();
                let ready = socket
                    .poll(zmq::POLLIN, if stopping { 0 } else { POLL_INTERVAL_MS })
                    .unwrap_or(0);
                if ready == 0 {
                    if stopping {
                        break;
                    }
                    continue;
                }
                while let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) {
                    let event = match validate(&frames, codec, max_value_bytes) {
                        Mapped::Update(update) => SourceEvent::Update(update),
                        Mapped::Resync(sync, skip) => {
                            stats.uncarried(skip, sync.key.as_bytes());
                            stats.syncs_published.inc();
                            SourceEvent::Update(sync)
                        }
                        Mapped::Skip(_) => {
                            stats.skip(
                                Skip::BadMessage,
                                frames.first().map(Vec::as_slice).unwrap_or_default(),
                            );
                            continue;
                        }
                    };
                    if tx.blocking_send(event).is_err() {
                        return;
                    }
                }
            }
            let _ = std::fs::remove_file(&endpoint["ipc://".len()..]);
        };
        tokio::task::spawn_blocking(receive)
            .await
            .map_err(|e| e.to_string())
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
