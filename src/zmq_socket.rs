//! libzmq plumbing shared by the ZeroMQ backend and the publisher
//! service's multiproc channel: the process's one context, and binding an
//! endpoint safely.

use std::sync::LazyLock;

/// One libzmq context (its I/O thread) for the whole process.
pub static CONTEXT: LazyLock<zmq::Context> = LazyLock::new(zmq::Context::new);

/// Binds `endpoint`. For `ipc://PATH`, a socket file left by a crashed run
/// is removed first, but a path some live process still listens on is
/// refused: taking it over would silently cut that process off.
pub fn bind(socket: &zmq::Socket, endpoint: &str) -> Result<(), String> {
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        if std::path::Path::new(path).exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!("{endpoint} is in use by a running process"));
            }
            let _ = std::fs::remove_file(path);
            tracing::info!(%path, "Removed a stale ipc socket file left by an earlier run.");
        }
    }
    socket
        .bind(endpoint)
        .map_err(|e| format!("cannot bind {endpoint}: {e}"))
}

/// How often a ZeroMQ connection is pinged (ZMTP heartbeats).
pub const ZMTP_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest TTL a libzmq 4.3 peer reads right (see [`set_liveness`]).
const MAX_TTL_MS: i32 = 65_000;

/// TCP keep-alive of every ZeroMQ connection: probes after this long idle...
const TCP_KEEPALIVE_IDLE_S: i32 = 10;
/// ...every this many seconds...
const TCP_KEEPALIVE_INTERVAL_S: i32 = 2;
/// ...and the connection is dead after this many unanswered.
const TCP_KEEPALIVE_COUNT: i32 = 3;

/// Gives `socket`'s connections their own liveness, so a peer that
/// vanished without a word (a partition, a host powered off) is noticed:
/// ZMTP heartbeats (a ping every [`ZMTP_PING_INTERVAL`]; the connection is
/// dropped when nothing came back within `timeout`), their TTL, and TCP
/// keep-alive underneath.
///
/// The TTL asks a peer that sets no heartbeat of its own (Dragonflow's
/// pyzmq subscriber) to drop the connection when it hears nothing for
/// `timeout` after a ping, and reconnect. libzmq arms that timer on a ping
/// and disarms it on any later message, so it covers a link that dies
/// while idle (the ping was the last thing received), not one cut in the
/// middle of a burst: such a peer needs its own heartbeat or keep-alive.
///
/// Only for sockets that never stop reading (publishers). A socket whose
/// queue fills stops reading its connections, so it cannot see the pongs:
/// its heartbeat timeout replaces the connection, and when the queue drains
/// libzmq 4.3 restarts input on the replacement and aborts the process
/// (`Assertion failed: _input_stopped`, zeromq/libzmq#3937 and #4767, open
/// upstream). Subscribers get [`set_keepalive`] and watch their publishers'
/// heartbeats instead.
pub fn set_liveness(socket: &zmq::Socket, timeout: std::time::Duration) -> zmq::Result<()> {
    let ms = |d: std::time::Duration| d.as_millis().try_into().unwrap_or(i32::MAX);
    socket.set_heartbeat_ivl(ms(ZMTP_PING_INTERVAL))?;
    socket.set_heartbeat_timeout(ms(timeout))?;
    // The TTL travels in deciseconds, and libzmq 4.3 turns it back into
    // milliseconds in 16 bits: past 65.5 s it would wrap around.
    socket.set_heartbeat_ttl(ms(timeout).min(MAX_TTL_MS))?;
    set_keepalive(socket)
}

/// TCP keep-alive on `socket`'s connections: a peer that vanished is
/// noticed within about 16 s of an idle connection (10 s, then 3 probes
/// 2 s apart), with no ZMTP heartbeat of the socket's own.
pub fn set_keepalive(socket: &zmq::Socket) -> zmq::Result<()> {
    socket.set_tcp_keepalive(1)?;
    socket.set_tcp_keepalive_idle(TCP_KEEPALIVE_IDLE_S)?;
    socket.set_tcp_keepalive_intvl(TCP_KEEPALIVE_INTERVAL_S)?;
    socket.set_tcp_keepalive_cnt(TCP_KEEPALIVE_COUNT)
}
