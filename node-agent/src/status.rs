//! The agent's local status endpoint (HTTP on a loopback address):
//! `GET /status` is the [`AgentStatus`] as JSON with an `encryption`
//! section ([`EncryptionStatus`]: device, key fingerprint, policy, per-peer
//! handshake age and bytes, strict-mode drops), what `clustermesh status`
//! reads; `GET /metrics` the same as Prometheus text.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::{clusters::AgentStatus, wireguard::EncryptionStatus};

/// Prometheus text of a status snapshot.
pub fn metrics(s: &AgentStatus, e: &EncryptionStatus) -> String {
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{{{labels}}} {v}");
        }
    };
    let per = |f: &dyn Fn(&crate::clusters::ClusterStatus) -> u64| -> Vec<(String, u64)> {
        s.clusters
            .iter()
            .map(|c| (format!("cluster=\"{}\"", c.name), f(c)))
            .collect()
    };
    gauge(
        "clustermesh_agent_cluster_connected",
        "Whether the cluster's etcd is connected.",
        "gauge",
        per(&|c| u64::from(c.connected)),
    );
    gauge(
        "clustermesh_agent_cluster_synced",
        "Whether the cluster completed its initial sync.",
        "gauge",
        per(&|c| u64::from(c.synced)),
    );
    gauge(
        "clustermesh_agent_cluster_withdrawn",
        "Whether the cluster's state was withdrawn as stale.",
        "gauge",
        per(&|c| u64::from(c.withdrawn)),
    );
    gauge(
        "clustermesh_agent_cluster_events_total",
        "Watch events received.",
        "counter",
        per(&|c| c.events),
    );
    gauge(
        "clustermesh_agent_cluster_reconnects_total",
        "Sessions that ended and were retried.",
        "counter",
        per(&|c| c.reconnects),
    );
    gauge(
        "clustermesh_agent_cluster_last_event_age_ms",
        "Milliseconds since the cluster's last watch event (watch lag).",
        "gauge",
        per(&|c| c.last_event_age_ms.unwrap_or(0)),
    );
    let mut refused = Vec::new();
    let mut rejected = Vec::new();
    for c in &s.clusters {
        for (r, v) in &c.refused_total {
            refused.push((format!("cluster=\"{}\",reason=\"{r}\"", c.name), *v));
        }
        for (r, v) in &c.rejected_now {
            rejected.push((format!("cluster=\"{}\",reason=\"{r}\"", c.name), *v));
        }
    }
    gauge(
        "clustermesh_agent_records_refused_total",
        "Records refused when read (decoding, ownership), by reason.",
        "counter",
        refused,
    );
    gauge(
        "clustermesh_agent_records_rejected",
        "Records the merge rejects right now, by reason.",
        "gauge",
        rejected,
    );
    gauge(
        "clustermesh_agent_desired_entries",
        "Entries of the desired datapath state.",
        "gauge",
        vec![
            ("target=\"ipcache\"".into(), s.desired.ipcache as u64),
            ("target=\"tunnels\"".into(), s.desired.tunnels as u64),
            ("target=\"peers\"".into(), s.desired.peers as u64),
            ("target=\"services\"".into(), s.desired.services as u64),
        ],
    );
    gauge(
        "clustermesh_agent_wireguard_peer_handshake_age_seconds",
        "Seconds since each WireGuard peer's last handshake.",
        "gauge",
        e.peers
            .iter()
            .filter_map(|p| Some((format!("peer=\"{}\"", p.key), p.last_handshake_age_s?)))
            .collect(),
    );
    gauge(
        "clustermesh_agent_wireguard_peer_bytes_total",
        "Bytes through each WireGuard peer.",
        "counter",
        e.peers
            .iter()
            .flat_map(|p| {
                [
                    (format!("peer=\"{}\",direction=\"rx\"", p.key), p.rx_bytes),
                    (format!("peer=\"{}\",direction=\"tx\"", p.key), p.tx_bytes),
                ]
            })
            .collect(),
    );
    gauge(
        "clustermesh_agent_plaintext_drops_total",
        "Pod packets strict encryption refused, by direction.",
        "counter",
        vec![
            ("direction=\"egress\"".into(), e.plaintext_drops.egress),
            ("direction=\"ingress\"".into(), e.plaintext_drops.ingress),
        ],
    );
    let d = &e.device_drops;
    gauge(
        "clustermesh_agent_wireguard_device_drops_total",
        "Packets the WireGuard device dropped, by reason.",
        "counter",
        vec![
            ("reason=\"no_peer\"".into(), d.tx_no_peer),
            ("reason=\"source_not_allowed\"".into(), d.rx_not_allowed),
            ("reason=\"unknown_sender\"".into(), d.rx_unknown),
            (
                "reason=\"handshake_or_decrypt_failure\"".into(),
                d.rx_errors,
            ),
        ],
    );
    gauge(
        "clustermesh_agent_wireguard_key_rotations_total",
        "WireGuard key rotations completed.",
        "counter",
        vec![(String::new(), e.rotations_completed)],
    );
    o
}

/// Serves `/status` and `/metrics` until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: Arc<Mutex<AgentStatus>>,
    encryption: Arc<Mutex<EncryptionStatus>>,
    cancel: CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "status accept failed");
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
        let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
        let enc = encryption.lock().map(|s| s.clone()).unwrap_or_default();
        let (code, ctype, body) = if req.starts_with("GET /status ") {
            let mut v = serde_json::to_value(&snapshot).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.insert(
                    "encryption".into(),
                    serde_json::to_value(&enc).unwrap_or_default(),
                );
            }
            (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&v).unwrap_or_default(),
            )
        } else if req.starts_with("GET /metrics ") {
            (
                "200 OK",
                "text/plain; version=0.0.4",
                metrics(&snapshot, &enc),
            )
        } else {
            ("404 Not Found", "text/plain", String::new())
        };
        let resp = format!(
            "HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = sock.write_all(resp.as_bytes()).await;
    }
}
