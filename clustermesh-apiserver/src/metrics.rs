//! The apiserver's metrics (prometheus-client, OpenMetrics), served at
//! `GET /metrics` on the metrics port with `GET /healthz`
//! ([`clustermesh_http::serve`]).

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use clustermesh_http::prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

type Labels = Vec<(&'static str, String)>;

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
    /// Kubernetes objects not exported (skipped), by kind (set after each
    /// recomputation of the Kubernetes records).
    pub kube_skipped: Mutex<BTreeMap<&'static str, u64>>,
    pub last_heartbeat_ms: AtomicU64,
}

impl Metrics {
    pub fn request(&self, method: &'static str, result: &'static str) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((method, result)).or_default() += 1;
        }
    }

    /// Replaces the skipped-objects counts.
    pub fn set_kube_skipped(&self, counts: BTreeMap<&'static str, u64>) {
        if let Ok(mut m) = self.kube_skipped.lock() {
            *m = counts;
        }
    }

    /// The metrics as a prometheus-client registry (OpenMetrics names:
    /// counters end in `_total`, the heartbeat time is in seconds).
    /// The metrics of an apiserver of `cluster`; `insecure`: its gRPC API
    /// runs without TLS (`--insecure-plaintext`).
    pub fn registry(&self, cluster: &str, insecure: bool) -> Registry {
        let mut r = Registry::default();
        let l = || vec![("cluster", cluster.to_owned())];
        let counter = |v: u64| {
            let f: Family<Labels, Counter> = Family::default();
            f.get_or_create(&l()).inc_by(v);
            f
        };
        for (name, help, v) in [
            (
                "clustermesh_apiserver_etcd_puts",
                "Keys written to etcd",
                &self.etcd_puts,
            ),
            (
                "clustermesh_apiserver_etcd_deletes",
                "Keys deleted from etcd",
                &self.etcd_deletes,
            ),
            (
                "clustermesh_apiserver_etcd_errors",
                "Failed etcd operations",
                &self.etcd_errors,
            ),
            (
                "clustermesh_apiserver_lease_losses",
                "Times the export lease expired",
                &self.lease_losses,
            ),
            (
                "clustermesh_apiserver_nodes_expired",
                "Nodes removed for missing heartbeats",
                &self.nodes_expired,
            ),
        ] {
            r.register(name, help, counter(v.load(Ordering::Relaxed)));
        }
        let requests: Family<Labels, Counter> = Family::default();
        if let Ok(m) = self.requests.lock() {
            for ((method, result), v) in m.iter() {
                let mut labels = l();
                labels.push(("method", (*method).to_owned()));
                labels.push(("result", (*result).to_owned()));
                requests.get_or_create(&labels).inc_by(*v);
            }
        }
        r.register(
            "clustermesh_apiserver_requests",
            "gRPC requests by method and result",
            requests,
        );
        let exported: Family<Labels, Gauge> = Family::default();
        if let Ok(m) = self.exported.lock() {
            for (kind, v) in m.iter() {
                let mut labels = l();
                labels.push(("kind", (*kind).to_owned()));
                exported
                    .get_or_create(&labels)
                    .set(i64::try_from(*v).unwrap_or(i64::MAX));
            }
        }
        r.register(
            "clustermesh_apiserver_exported_records",
            "Records exported, by kind",
            exported,
        );
        let skipped: Family<Labels, Gauge> = Family::default();
        if let Ok(m) = self.kube_skipped.lock() {
            for (kind, v) in m.iter() {
                let mut labels = l();
                labels.push(("kind", (*kind).to_owned()));
                skipped
                    .get_or_create(&labels)
                    .set(i64::try_from(*v).unwrap_or(i64::MAX));
            }
        }
        r.register(
            "clustermesh_apiserver_kubernetes_skipped_objects",
            "Kubernetes objects not exported (refused by the translation), by kind",
            skipped,
        );
        let plaintext: Family<Labels, Gauge> = Family::default();
        plaintext.get_or_create(&l()).set(i64::from(insecure));
        r.register(
            "clustermesh_apiserver_insecure_plaintext",
            "1 when the gRPC API runs without TLS and authentication (--insecure-plaintext)",
            plaintext,
        );
        let heartbeat: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
        heartbeat
            .get_or_create(&l())
            .set(self.last_heartbeat_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        r.register_with_unit(
            "clustermesh_apiserver_last_heartbeat_timestamp",
            "Unix time of the last heartbeat written",
            Unit::Seconds,
            heartbeat,
        );
        r
    }
}

/// Serves `GET /healthz` and `GET /metrics` until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: std::sync::Arc<crate::Shared>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use axum::{Router, routing::get};
    let router =
        Router::new()
            .route("/healthz", get(clustermesh_http::healthz))
            .route(
                "/metrics",
                get(move |headers: axum::http::HeaderMap| {
                    let r = shared.metrics.registry(
                        shared.cfg.cluster_name.as_str(),
                        shared.cfg.insecure_plaintext,
                    );
                    async move {
                        clustermesh_http::metrics_response(&r, clustermesh_http::accept(&headers))
                    }
                }),
            );
    clustermesh_http::serve(listener, router, cancel).await;
}
