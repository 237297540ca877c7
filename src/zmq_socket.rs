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
