//! The admin HTTP listener: Prometheus metrics at `/metrics`, liveness at
//! `/healthz`, readiness (source connected, backend ready) at `/readyz`.
//! Off unless `[admin] listen` (or `FEEDBRIDGE_ADMIN_LISTEN`) is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn route(path: &str, stats: &Stats) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            stats.encode(),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/livez" => match stats.alive() {
            Ok(()) => respond(StatusCode::OK, "text/plain", "alive\n".into()),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("wedged: {why}\n"),
            ),
        },
        "/readyz" => match stats.ready() {
            Ok(role) => respond(StatusCode::OK, "text/plain", format!("ready ({role})\n")),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz, /livez or /readyz\n".into(),
        ),
    }
}

/// Binds now (a taken port fails at start-up), then serves until `stop`.
pub async fn serve(
    listen: SocketAddr,
    stats: Arc<Stats>,
    stop: CancellationToken,
) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, "Admin listener serving /metrics, /healthz and /readyz.");
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "Admin listener accept failed.");
                        continue;
                    }
                },
            };
            let stats = stats.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let response = route(req.uri().path(), &stats);
                        async move { Ok::<_, Infallible>(response) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

/// `GET url` with a plain HTTP/1.0 request: `Ok` on a 200 answer. For
/// container health checks, where the runtime image has no curl.
pub fn probe(url: &str) -> Result<(), String> {
    let (status, body) = get(url)?;
    if status == 200 {
        Ok(())
    } else {
        Err(format!("{url}: {status} {}", body.trim()))
    }
}

/// A plain HTTP/1.0 GET of `http://HOST:PORT/PATH`: status code and body.
pub fn get(url: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url} is not an http:// URL"))?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = std::net::TcpStream::connect(host).map_err(|e| format!("{host}: {e}"))?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{url}: no HTTP answer"))?;
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Ok((status, body))
}
