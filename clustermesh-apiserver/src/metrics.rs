//! Prometheus text metrics, served at `GET /metrics` on the metrics port.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Debug, Default)]
pub struct Metrics {
    pub etcd_puts: AtomicU64,
    pub etcd_deletes: AtomicU64,
    pub etcd_errors: AtomicU64,
    pub lease_losses: AtomicU64,
    pub nodes_expired: AtomicU64,
    /// Requests by (method, result).
    pub requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Exported records by kind (set after each sync).
    pub exported: Mutex<BTreeMap<&'static str, u64>>,
    pub last_heartbeat_ms: AtomicU64,
}

impl Metrics {
    pub fn request(&self, method: &'static str, result: &'static str) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((method, result)).or_default() += 1;
        }
    }

    pub fn render(&self, cluster: &str) -> String {
        let mut out = String::new();
        let c = |name: &str, help: &str, v: u64, out: &mut String| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{cluster=\"{cluster}\"}} {v}\n"
            ));
        };
        c(
            "clustermesh_apiserver_etcd_puts_total",
            "Keys written to etcd.",
            self.etcd_puts.load(Ordering::Relaxed),
            &mut out,
        );
        c(
            "clustermesh_apiserver_etcd_deletes_total",
            "Keys deleted from etcd.",
            self.etcd_deletes.load(Ordering::Relaxed),
            &mut out,
        );
        c(
            "clustermesh_apiserver_etcd_errors_total",
            "Failed etcd operations.",
            self.etcd_errors.load(Ordering::Relaxed),
            &mut out,
        );
        c(
            "clustermesh_apiserver_lease_losses_total",
            "Times the export lease expired.",
            self.lease_losses.load(Ordering::Relaxed),
            &mut out,
        );
        c(
            "clustermesh_apiserver_nodes_expired_total",
            "Nodes removed for missing heartbeats.",
            self.nodes_expired.load(Ordering::Relaxed),
            &mut out,
        );
        out.push_str("# HELP clustermesh_apiserver_requests_total gRPC requests by method and result.\n# TYPE clustermesh_apiserver_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((method, result), v) in m.iter() {
                out.push_str(&format!(
                    "clustermesh_apiserver_requests_total{{cluster=\"{cluster}\",method=\"{method}\",result=\"{result}\"}} {v}\n"
                ));
            }
        }
        out.push_str("# HELP clustermesh_apiserver_exported_records Records exported, by kind.\n# TYPE clustermesh_apiserver_exported_records gauge\n");
        if let Ok(m) = self.exported.lock() {
            for (kind, v) in m.iter() {
                out.push_str(&format!(
                    "clustermesh_apiserver_exported_records{{cluster=\"{cluster}\",kind=\"{kind}\"}} {v}\n"
                ));
            }
        }
        out.push_str(&format!(
            "# HELP clustermesh_apiserver_last_heartbeat_timestamp_ms Unix ms of the last heartbeat written.\n# TYPE clustermesh_apiserver_last_heartbeat_timestamp_ms gauge\nclustermesh_apiserver_last_heartbeat_timestamp_ms{{cluster=\"{cluster}\"}} {}\n",
            self.last_heartbeat_ms.load(Ordering::Relaxed)
        ));
        out
    }
}

/// Serves `GET /metrics` (anything else: 404) until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let mut buf = [0u8; 1024];
        let n = match tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf))
            .await
        {
            Ok(Ok(n)) => n,
            _ => continue,
        };
        let req = String::from_utf8_lossy(&buf[..n]);
        let resp = if req.starts_with("GET /metrics ") {
            let body = render();
            format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        } else {
            "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned()
        };
        let _ = sock.write_all(resp.as_bytes()).await;
    }
}
