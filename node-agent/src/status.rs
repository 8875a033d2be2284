//! The agent's local HTTP endpoint (loopback by default), served by
//! [`clustermesh_http::serve`] (concurrent connections with timeouts):
//! - `GET /healthz`: `ok` while the agent runs (liveness);
//! - `GET /status`: the [`NodeStatus`] document as JSON (the control plane
//!   as the clusters stage publishes it, and the encryption section),
//!   what `clustermesh status` reads with the same types;
//! - `GET /metrics`: the same as OpenMetrics (prometheus-client), base
//!   units (seconds), counters ending in `_total` (the Prometheus text
//!   format unless the client asks for OpenMetrics).

use std::sync::{Arc, Mutex};

use axum::{Json, Router, extract::State, response::Response, routing::get};
use clustermesh_api::status::{ControlPlaneStatus, EncryptionStatus, NodeStatus, PolicyStatus};
use clustermesh_http::prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tokio_util::sync::CancellationToken;

/// What the endpoint reads.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Published by the control plane (None: the agent runs without one).
    pub control_plane: Option<Arc<Mutex<ControlPlaneStatus>>>,
    pub encryption: Arc<Mutex<EncryptionStatus>>,
    pub policy: Arc<Mutex<PolicyStatus>>,
    /// The node's flows (None: flow events off or no datapath).
    pub flows: Option<Arc<crate::flows::Observer>>,
}

impl Sources {
    /// A snapshot of the whole document.
    pub fn snapshot(&self) -> NodeStatus {
        NodeStatus {
            control_plane: self
                .control_plane
                .as_ref()
                .and_then(|s| s.lock().ok().map(|g| g.clone()))
                .unwrap_or_default(),
            encryption: self
                .encryption
                .lock()
                .map(|g| g.clone())
                .unwrap_or_default(),
            policy: self.policy.lock().map(|g| g.clone()).unwrap_or_default(),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

fn gauge_family() -> Family<Labels, Gauge> {
    Family::default()
}

fn counter_family() -> Family<Labels, Counter> {
    Family::default()
}

fn set(f: &Family<Labels, Gauge>, labels: Labels, v: u64) {
    f.get_or_create(&labels)
        .set(i64::try_from(v).unwrap_or(i64::MAX));
}

fn add(f: &Family<Labels, Counter>, labels: Labels, v: u64) {
    f.get_or_create(&labels).inc_by(v);
}

fn cluster_metrics(r: &mut Registry, s: &ControlPlaneStatus) {
    let connected = gauge_family();
    let synced = gauge_family();
    let withdrawn = gauge_family();
    let events = counter_family();
    let reconnects = counter_family();
    let age: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    let refused = counter_family();
    let rejected = gauge_family();
    for c in &s.clusters {
        let l = || vec![("cluster", c.name.clone())];
        set(&connected, l(), u64::from(c.connected));
        set(&synced, l(), u64::from(c.synced));
        set(&withdrawn, l(), u64::from(c.withdrawn));
        add(&events, l(), c.events);
        add(&reconnects, l(), c.reconnects);
        age.get_or_create(&l())
            .set(c.last_event_age_ms.unwrap_or(0) as f64 / 1000.0);
        for (reason, v) in &c.refused_total {
            add(
                &refused,
                vec![("cluster", c.name.clone()), ("reason", reason.clone())],
                *v,
            );
        }
        for (reason, v) in &c.rejected_now {
            set(
                &rejected,
                vec![("cluster", c.name.clone()), ("reason", reason.clone())],
                *v,
            );
        }
    }
    let p = "clustermesh_agent_cluster";
    r.register(
        format!("{p}_connected"),
        "Whether the cluster's etcd is connected",
        connected,
    );
    r.register(
        format!("{p}_synced"),
        "Whether the cluster completed its initial sync",
        synced,
    );
    r.register(
        format!("{p}_withdrawn"),
        "Whether the cluster's state was withdrawn as stale",
        withdrawn,
    );
    r.register(format!("{p}_events"), "Watch events received", events);
    r.register(
        format!("{p}_reconnects"),
        "Sessions that ended and were retried",
        reconnects,
    );
    r.register_with_unit(
        format!("{p}_last_event_age"),
        "Time since the cluster's last watch event (watch lag)",
        Unit::Seconds,
        age,
    );
    r.register(
        "clustermesh_agent_records_refused",
        "Records refused when read (decoding, ownership), by reason",
        refused,
    );
    r.register(
        "clustermesh_agent_records_rejected",
        "Records the merge rejects right now, by reason",
        rejected,
    );
    let desired = gauge_family();
    for (target, n) in [
        ("ipcache", s.desired.ipcache),
        ("tunnels", s.desired.tunnels),
        ("peers", s.desired.peers),
        ("services", s.desired.services),
        ("network_policies", s.desired.policies),
        ("network_policy_endpoints", s.desired.policy_endpoints),
        ("network_policy_entries", s.desired.policy_entries),
    ] {
        set(&desired, vec![("target", target.into())], n as u64);
    }
    r.register(
        "clustermesh_agent_desired_entries",
        "Entries of the desired datapath state",
        desired,
    );
    let errors = gauge_family();
    for f in &s.reconcile_errors {
        errors
            .get_or_create(&vec![("target", f.target.clone())])
            .inc();
    }
    r.register(
        "clustermesh_agent_reconcile_errors",
        "Desired entries a target refused in the last round (retried; the rest is applied)",
        errors,
    );
    map_metrics(r, &s.maps);
    let depth = Gauge::<i64>::default();
    depth.set(i64::try_from(s.event_queue.depth).unwrap_or(i64::MAX));
    r.register(
        "clustermesh_agent_event_queue_depth",
        "Watcher events waiting for the merge",
        depth,
    );
    let peak = Gauge::<i64>::default();
    peak.set(i64::try_from(s.event_queue.peak).unwrap_or(i64::MAX));
    r.register(
        "clustermesh_agent_event_queue_peak",
        "The most watcher events seen waiting at once since the agent started",
        peak,
    );
}

/// The bounded maps' occupancy: entries, size, their ratio (the alarm is
/// at 0.9) and the entries refused for want of room.
fn map_metrics(r: &mut Registry, maps: &[clustermesh_api::status::MapOccupancy]) {
    let entries = gauge_family();
    let capacity = gauge_family();
    let refused = gauge_family();
    let pressure: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    for m in maps {
        let l = || vec![("map", m.map.clone())];
        set(&entries, l(), m.entries);
        set(&capacity, l(), m.capacity);
        set(&refused, l(), m.refused);
        pressure
            .get_or_create(&l())
            .set(crate::clusters::room::pressure(
                m.entries as usize,
                m.capacity as usize,
            ));
    }
    r.register(
        "clustermesh_agent_map_entries",
        "Entries a bounded datapath map holds",
        entries,
    );
    r.register(
        "clustermesh_agent_map_capacity",
        "Size of a bounded datapath map, in entries",
        capacity,
    );
    r.register(
        "clustermesh_agent_map_pressure",
        "Entries of a bounded datapath map over its size (alarm at 0.9)",
        pressure,
    );
    r.register(
        "clustermesh_agent_map_refused_entries",
        "Desired entries a full datapath map refused (added as room frees)",
        refused,
    );
}

fn encryption_metrics(r: &mut Registry, e: &EncryptionStatus) {
    let handshake = gauge_family();
    let bytes = counter_family();
    for p in &e.peers {
        if let Some(age) = p.last_handshake_age_s {
            set(&handshake, vec![("peer", p.key.clone())], age);
        }
        add(
            &bytes,
            vec![("peer", p.key.clone()), ("direction", "rx".into())],
            p.rx_bytes,
        );
        add(
            &bytes,
            vec![("peer", p.key.clone()), ("direction", "tx".into())],
            p.tx_bytes,
        );
    }
    r.register_with_unit(
        "clustermesh_agent_wireguard_peer_handshake_age",
        "Time since each WireGuard peer's last handshake",
        Unit::Seconds,
        handshake,
    );
    r.register_with_unit(
        "clustermesh_agent_wireguard_peer",
        "Bytes through each WireGuard peer",
        Unit::Bytes,
        bytes,
    );
    let plaintext = counter_family();
    add(
        &plaintext,
        vec![("direction", "egress".into())],
        e.plaintext_drops.egress,
    );
    add(
        &plaintext,
        vec![("direction", "ingress".into())],
        e.plaintext_drops.ingress,
    );
    r.register(
        "clustermesh_agent_plaintext_drops",
        "Pod packets strict encryption refused, by direction",
        plaintext,
    );
    let unknown = Counter::<u64>::default();
    unknown.inc_by(e.plaintext_drops.unknown_destination);
    r.register(
        "clustermesh_agent_strict_unknown_destination_drops",
        "Pod packets into a mesh pod range the ip-cache could not route, refused by strict mode",
        unknown,
    );
    let d = &e.device_drops;
    let device = counter_family();
    for (reason, v) in [
        ("no_peer", d.tx_no_peer),
        ("source_not_allowed", d.rx_not_allowed),
        ("unknown_sender", d.rx_unknown),
        ("handshake_or_decrypt_failure", d.rx_errors),
    ] {
        add(&device, vec![("reason", reason.into())], v);
    }
    r.register(
        "clustermesh_agent_wireguard_device_drops",
        "Packets the WireGuard device dropped, by reason",
        device,
    );
    let rotations: Counter = Counter::default();
    rotations.inc_by(e.rotations_completed);
    r.register(
        "clustermesh_agent_wireguard_key_rotations",
        "WireGuard key rotations completed",
        rotations,
    );
}

/// The metrics of a status snapshot.
pub fn registry(s: &NodeStatus) -> Registry {
    let mut r = Registry::default();
    cluster_metrics(&mut r, &s.control_plane);
    encryption_metrics(&mut r, &s.encryption);
    let verdicts = counter_family();
    for v in &s.policy.verdicts {
        add(
            &verdicts,
            vec![
                ("endpoint", v.endpoint.clone()),
                ("direction", v.direction.clone()),
                ("verdict", v.verdict.clone()),
            ],
            v.packets,
        );
    }
    r.register(
        "clustermesh_agent_policy_verdicts",
        "Packets of each local endpoint by network policy verdict (drops and audited would-be drops) and direction",
        verdicts,
    );
    r
}

/// The flow metrics: flows by verdict, drop reason and the clusters of
/// both sides, and events lost by where they were lost.
pub fn flow_metrics(r: &mut Registry, o: &crate::flows::Observer) {
    let flows = counter_family();
    for ((verdict, reason, src, dst), n) in o.counts() {
        add(
            &flows,
            vec![
                ("verdict", verdict),
                ("drop_reason", reason),
                ("source_cluster", src),
                ("destination_cluster", dst),
            ],
            n,
        );
    }
    r.register(
        "clustermesh_agent_flows",
        "Packets of the flows observed (a trace event counts what it aggregates), by verdict, drop reason and the source and destination clusters",
        flows,
    );
    let st = o.status();
    let lost = counter_family();
    for (place, n) in [
        ("datapath_ring", st.lost_datapath),
        ("decode", st.lost_decode),
        ("follower", st.lost_followers),
    ] {
        add(&lost, vec![("place", place.into())], n);
    }
    r.register(
        "clustermesh_agent_flow_events_lost",
        "Flow events lost: the datapath's ring buffer full, undecodable, or skipped by a slow follower",
        lost,
    );
    let seen = Counter::<u64>::default();
    seen.inc_by(st.seen);
    r.register(
        "clustermesh_agent_flow_events",
        "Flow events read from the datapath",
        seen,
    );
    if let Some(x) = o.export_stats() {
        let export = counter_family();
        for (what, n) in [
            ("written", x.written),
            ("filtered", x.filtered),
            ("rotations", x.rotations),
            ("write_errors", x.write_errors),
        ] {
            add(&export, vec![("outcome", what.into())], n);
        }
        r.register(
            "clustermesh_agent_flow_export_lines",
            "The SIEM export: lines written (flows and audit events), flows filtered out, rotations, failed writes",
            export,
        );
    }
    let buffered = Gauge::<i64>::default();
    buffered.set(i64::try_from(st.buffered).unwrap_or(i64::MAX));
    r.register(
        "clustermesh_agent_flow_buffer_flows",
        "Flows held for clustermesh observe (at most --flow-buffer)",
        buffered,
    );
}

async fn status(State(src): State<Sources>) -> Json<NodeStatus> {
    Json(src.snapshot())
}

async fn metrics(State(src): State<Sources>, headers: axum::http::HeaderMap) -> Response {
    let mut r = registry(&src.snapshot());
    if let Some(o) = &src.flows {
        flow_metrics(&mut r, o);
    }
    clustermesh_http::metrics_response(&r, clustermesh_http::accept(&headers))
}

pub fn router(src: Sources) -> Router {
    Router::new()
        .route("/healthz", get(clustermesh_http::healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(src)
}

/// Serves the endpoint until cancelled.
pub async fn serve(listener: tokio::net::TcpListener, src: Sources, cancel: CancellationToken) {
    clustermesh_http::serve(listener, router(src), cancel).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clustermesh_api::status::{ClusterStatus, PeerStatus};

    use super::*;

    #[test]
    fn metrics_follow_the_conventions() {
        let s = NodeStatus {
            control_plane: ControlPlaneStatus {
                clusters: vec![ClusterStatus {
                    name: "c2".into(),
                    connected: true,
                    last_event_age_ms: Some(1500),
                    rejected_now: [("cidr_overlap".to_owned(), 2)].into(),
                    ..Default::default()
                }],
                maps: vec![clustermesh_api::status::MapOccupancy {
                    map: "CM_IPCACHE".into(),
                    entries: 475,
                    capacity: 500,
                    refused: 3,
                    alarm: true,
                }],
                ..Default::default()
            },
            encryption: EncryptionStatus {
                peers: vec![PeerStatus {
                    key: "abc".into(),
                    last_handshake_age_s: Some(3),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    ..Default::default()
                }],
                ..Default::default()
            },
            policy: PolicyStatus {
                verdicts: vec![clustermesh_api::status::PolicyVerdictCount {
                    endpoint: "10.1.0.5".into(),
                    identity: 65836,
                    direction: "ingress".into(),
                    verdict: "drop_policy_denied".into(),
                    packets: 4,
                    bytes: 240,
                }],
            },
        };
        let mut text = String::new();
        clustermesh_http::prometheus_client::encoding::text::encode(&mut text, &registry(&s))
            .unwrap();
        for want in [
            r#"clustermesh_agent_cluster_connected{cluster="c2"} 1"#,
            r#"clustermesh_agent_cluster_last_event_age_seconds{cluster="c2"} 1.5"#,
            r#"clustermesh_agent_records_rejected{cluster="c2",reason="cidr_overlap"} 2"#,
            r#"clustermesh_agent_wireguard_peer_handshake_age_seconds{peer="abc"} 3"#,
            r#"clustermesh_agent_wireguard_peer_bytes_total{peer="abc",direction="tx"} 20"#,
            "# TYPE clustermesh_agent_plaintext_drops counter",
            "clustermesh_agent_strict_unknown_destination_drops_total 0",
            r#"clustermesh_agent_map_pressure{map="CM_IPCACHE"} 0.95"#,
            r#"clustermesh_agent_map_refused_entries{map="CM_IPCACHE"} 3"#,
            r#"clustermesh_agent_map_capacity{map="CM_IPCACHE"} 500"#,
            r#"clustermesh_agent_policy_verdicts_total{endpoint="10.1.0.5",direction="ingress",verdict="drop_policy_denied"} 4"#,
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
        assert!(!text.contains("_ms"), "{text}");
    }

    #[test]
    fn flow_metrics_count_flows_by_verdict_and_clusters_and_the_losses() {
        use std::sync::Arc;
        use tunnel_common::{FLOW_FLAG_DROP, FlowEvent, Verdict};
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(crate::flows::Directory::default()));
        let o = crate::flows::Observer::new(
            8,
            crate::flows::Events::All,
            std::time::Duration::from_secs(5),
            rx,
        );
        let drop = FlowEvent {
            family: 4,
            verdict: Verdict::DropPolicyDenied as u8,
            flags: FLOW_FLAG_DROP,
            packets: 1,
            ..FlowEvent::default()
        };
        o.record(&drop, 1);
        o.record(&drop, 2);
        o.lost_datapath
            .store(7, std::sync::atomic::Ordering::Relaxed);
        let mut r = Registry::default();
        flow_metrics(&mut r, &o);
        let mut text = String::new();
        clustermesh_http::prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for want in [
            r#"clustermesh_agent_flows_total{verdict="dropped",drop_reason="policy_denied",source_cluster="",destination_cluster=""} 2"#,
            r#"clustermesh_agent_flow_events_lost_total{place="datapath_ring"} 7"#,
            "clustermesh_agent_flow_events_total 2",
            "clustermesh_agent_flow_buffer_flows 2",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
