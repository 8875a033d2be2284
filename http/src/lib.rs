//! The local HTTP endpoint of the node agent (`/healthz`, `/status`,
//! `/metrics`) and of the apiserver (`/healthz`, `/metrics`), on axum.
//!
//! [`serve`] accepts connections concurrently (one task each, so an idle or
//! slow client never delays another: a liveness probe is answered while
//! any number of connections sit open), gives a client
//! [`HEADER_READ_TIMEOUT`] to send its request head and closes a
//! keep-alive connection between requests after [`MAX_CONNECTION_AGE`]. It is axum's own
//! `serve` loop with those two timeouts added (axum's has none), built
//! from hyper-util's server parts.
//!
//! Metrics are written with `prometheus-client` ([`metrics_response`]):
//! OpenMetrics for clients that ask for it (Prometheus does), else the
//! Prometheus text format ([`prometheus_text`]), so names, types, units
//! and escaping follow the exposition rules and `promtool check metrics`
//! passes on what `curl` gets.

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
/// How long a connection may stay open; it is then closed between
/// requests (keep-alive clients reconnect).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// `GET /healthz`: the process serves.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// The OpenMetrics text of a registry in the Prometheus text format
/// (0.0.4), for clients that do not ask for OpenMetrics (`curl`,
/// `promtool check metrics`): a counter's `# HELP`/`# TYPE` lines name its
/// `_total` samples, `# UNIT` and `# EOF` go. Samples are unchanged.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A registry rendered as a metrics response: OpenMetrics when the client
/// accepts it (Prometheus asks for it), else the Prometheus text format.
pub fn metrics_response(registry: &Registry, accept: Option<&str>) -> Response {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response();
    }
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        let ctype = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(header::CONTENT_TYPE, ctype)], body).into_response()
    } else {
        let ctype = "text/plain; version=0.0.4; charset=utf-8";
        ([(header::CONTENT_TYPE, ctype)], prometheus_text(&body)).into_response()
    }
}

/// The `Accept` header of a request, for [`metrics_response`].
pub fn accept(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())
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
    // Requests in flight get a second; a stuck client does not hold up exit.
    let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
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
    let max_age = tokio::time::sleep(MAX_CONNECTION_AGE);
    tokio::pin!(max_age);
    // Asked to close once (shutdown or age); then only the connection's
    // own end is awaited (the request in flight, or the header timeout).
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = cancel.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = &mut max_age, if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
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
        r.register("clustermesh_test_events", "Events", c);
        let resp = metrics_response(&r, None);
        assert_eq!(resp.status(), StatusCode::OK);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        assert!(
            om.contains("# TYPE clustermesh_test_events counter"),
            "{om}"
        );
        let text = prometheus_text(&om);
        assert_eq!(
            text,
            "# HELP clustermesh_test_events_total Events.\n# TYPE clustermesh_test_events_total counter\nclustermesh_test_events_total 1\n"
        );
    }
}
