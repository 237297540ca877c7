//! The publisher service's multiproc channel (Dragonflow's "multi process
//! publisher"): on a controller host many worker processes cannot all bind
//! the one publisher port, so they PUSH their updates over a local ipc
//! socket to this PULL socket, and the service republishes them through the
//! configured backend, in arrival order. Rust processes use
//! [`ZmqPublisher::push`](crate::backend::zmq::ZmqPublisher::push).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::zmq::{bind, CONTEXT};
use crate::codec::Codec;
use crate::config::MultiprocConfig;
use crate::mapper::Skip;
use crate::source::SourceEvent;
use crate::stats::Stats;

/// How often the receive loop looks at the stop request while idle.
const POLL_INTERVAL_MS: i64 = 50;

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
    /// arrived. Malformed messages are logged, counted, and skipped.
    pub async fn run(
        self,
        tx: mpsc::Sender<SourceEvent>,
        stop: CancellationToken,
        stats: Arc<Stats>,
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
                    let update = match frames.as_slice() {
                        [topic, payload] => codec.decode(payload).ok().map(|(mut u, _)| {
                            if !topic.is_empty() {
                                u.topic = String::from_utf8_lossy(topic).into_owned();
                            }
                            u
                        }),
                        _ => None,
                    };
                    let Some(update) = update else {
                        stats.skip(
                            Skip::BadMessage,
                            frames.first().map(Vec::as_slice).unwrap_or_default(),
                        );
                        continue;
                    };
                    if tx.blocking_send(SourceEvent::Update(update)).is_err() {
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
