//! The local HTTP endpoint of the node agent (`/healthz`, `/status`,
//! `/metrics`) and of the apiserver (`/healthz`, `/metrics`), on axum.
//!
//! [`serve`] accepts connections concurrently (one task each, so an idle or
//! slow client never delays another: a liveness probe is answered while
//! any number of connections sit open), gives a client
//! [`HEADER_READ_TIMEOUT`] to send its request head and closes idle
//! keep-alive connections after [`IDLE_TIMEOUT`]. It is axum's own
//! `serve` loop with those two timeouts added (axum's has none), built
//! from hyper-util's server parts.
//!
//! Metrics are written with `prometheus-client` ([`metrics_response`]),
//! in the OpenMetrics text format, so names, types, units and escaping
//! follow the exposition rules (`promtool check metrics` passes).

use std::{net::SocketAddr, time::Duration};

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use prometheus_client::registry::Registry;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use prometheus_client;

/// How long a client may take to send its request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open with no request in flight.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET /healthz`: the process serves.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// A registry rendered as an OpenMetrics response.
pub fn metrics_response(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// Serves `router` on `listener` until `cancel`, then lets the requests in
/// flight finish (connections are closed gracefully).
pub async fn serve(listener: tokio::net::TcpListener, router: Router, cancel: CancellationToken) {
    let conns = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: back off a little, keep serving.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        conns.spawn(connection(stream, peer, router.clone(), cancel.clone()));
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) {
    let service = TowerToHyperService::new(router);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            _ = &mut idle => conn.as_mut().graceful_shutdown(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn get_healthz(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_do_not_delay_healthz() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Router::new().route("/healthz", get(healthz)),
            cancel.clone(),
        ));
        // 50 clients that connect and never send a byte, and one that sends
        // half a request head.
        let mut idle = Vec::new();
        for _ in 0..50 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let t = Instant::now();
        let r = get_healthz(addr).await;
        let took = t.elapsed();
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");
        // Not a timing assertion on the machine's speed: with one
        // connection at a time the answer would wait for the others'
        // 5 s header timeout.
        assert!(
            took < HEADER_READ_TIMEOUT,
            "healthz took {took:?} behind idle connections"
        );
        eprintln!("healthz behind 51 idle connections: {took:?}");
        cancel.cancel();
        server.await.unwrap();
    }

    #[test]
    fn metrics_are_openmetrics() {
        use prometheus_client::metrics::counter::Counter;
        let mut r = Registry::default();
        let c: Counter = Counter::default();
        c.inc();
        r.register("clustermesh_test_events", "Events.", c);
        let resp = metrics_response(&r);
        assert_eq!(resp.status(), StatusCode::OK);
    }
}
