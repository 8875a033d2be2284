//! clustermesh-apiserver: exports one cluster's state into its etcd.
//!
//! ```text
//! gRPC API (standalone source) ──┐
//! services file (YAML) ──────────┼─> ClusterState ──desired()──> Exporter ──> etcd (leased, public schema)
//! internal store (etcd) <────────┘        │
//!   clustermesh/internal/<cluster>/...    └─ node expiry (heartbeat TTL)
//! ```
//!
//! - [`state`]: the cluster's state and the rules for changing it (pure).
//! - [`store`]: the durable internal records and identity allocation.
//! - [`export`]: the leased public export, canaries, heartbeat.
//! - [`grpc`]: the `clustermesh.v1.ClusterMesh` service, behind mutual TLS;
//!   [`authz`]: who the caller is (certificate CN) and what it may do.
//! - [`kube_source`]: Nodes, Services, EndpointSlices, Namespaces from
//!   Kubernetes (kube-rs), as the same records; [`kube_policies`]: the
//!   CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and NetworkPolicy
//!   objects, as the policy records `ApplyPolicies` stores.
//!
//! One root [`CancellationToken`] and one [`TaskTracker`]: every task is
//! tracked; shutdown cancels and waits with a grace period. Stopping does not
//! remove the exported state (the lease is left to expire, or adopted by the
//! next start).

pub mod authz;
pub mod config;
pub mod export;
pub mod grpc;
pub mod grpc_endpoints;
pub mod grpc_policy;
pub mod kube_policies;
pub mod kube_source;
pub mod metrics;
pub mod services_file;
pub mod state;
pub mod store;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use backon::BackoffBuilder as _;
use clustermesh_api::{StateKind, proto::cluster_mesh_server::ClusterMeshServer};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::Config;

/// Errors that stop the apiserver from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Etcd(#[from] clustermesh_kvstore::Error),
    #[error("loading stored state: {0}")]
    Store(#[from] store::Error),
    #[error(transparent)]
    ServicesFile(#[from] services_file::Error),
    #[error("starting the export: {0}")]
    Export(#[from] export::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC TLS: reading {path}: {source}")]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("stopped before etcd could be reached")]
    Cancelled,
    #[error("Kubernetes: initial list did not complete within {0:?}")]
    KubeTimeout(Duration),
    #[error("Kubernetes: {0}")]
    Kube(#[source] kube_source::Error),
}

#[derive(Debug, Clone, Default)]
pub struct ExportStatus {
    pub synced: BTreeSet<StateKind>,
    pub last_error: Option<String>,
    pub last_heartbeat_ms: u64,
}

/// What the tasks share.
pub struct Shared {
    pub cfg: Config,
    pub client: etcd_client::Client,
    pub keys: store::Internal,
    pub state: tokio::sync::Mutex<state::ClusterState>,
    pub changed: Notify,
    pub metrics: metrics::Metrics,
    pub export_status: std::sync::Mutex<ExportStatus>,
    /// The audit trail (`--audit-log`), if any.
    pub audit: Option<clustermesh_api::audit::Audit>,
}

/// A running apiserver.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("grpc_addr", &self.grpc_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Cancels every task and waits for them (at most `grace`).
    pub async fn shutdown(self, grace: Duration) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("tasks did not stop within {grace:?}");
        }
    }

    /// Resolves when a task has stopped the server (or it was cancelled).
    pub async fn stopped(&self) {
        self.cancel.cancelled().await;
    }

    /// Kinds whose initial export completed.
    pub fn synced(&self) -> BTreeSet<StateKind> {
        self.shared
            .export_status
            .lock()
            .map(|s| s.synced.clone())
            .unwrap_or_default()
    }
}

async fn connect_with_retry(
    cfg: &Config,
    cancel: &CancellationToken,
) -> Result<etcd_client::Client, StartError> {
    use backon::Retryable as _;
    let attempt = || async { cfg.etcd.connect().await };
    let backoff = clustermesh_kvstore::backoff::reconnect();
    tokio::select! {
        _ = cancel.cancelled() => Err(StartError::Cancelled),
        r = attempt
            .retry(backoff)
            .when(|e| matches!(e, clustermesh_kvstore::Error::Connect { .. }))
            .notify(|e, d| tracing::warn!(error = %e, "etcd unreachable; retrying in {d:?}")) => Ok(r?),
    }
}

/// Validates the configuration, loads the stored state, starts the export,
/// the gRPC API and metrics. Returns once the initial export is done.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    cfg.validate()?;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut client = connect_with_retry(&cfg, &cancel).await?;

    let mut st = load_state(&cfg, &mut client).await?;
    let kube = kube_initial_sync(&cfg, &mut st).await?;
    let counts = st.counts();
    tracing::info!(?counts, "loaded stored state");
    st.clear_changes();

    let listeners = Listeners::bind(&cfg).await?;
    let (grpc_addr, metrics_addr) = (listeners.grpc_addr, listeners.metrics_addr);

    let mut exporter =
        export::Exporter::start(client.clone(), cfg.cluster_name.clone(), cfg.lease_ttl).await?;
    let desired = st.desired();
    if cfg.insecure_plaintext {
        tracing::warn!(
            "the gRPC API serves plaintext without authentication (--insecure-plaintext): anyone who reaches {} may change this cluster's posture",
            cfg.grpc_listen
        );
    }
    let audit = cfg
        .audit_log
        .as_deref()
        .map(|p| clustermesh_api::audit::Audit::open(p, ("cluster", cfg.cluster_name.as_str())));
    let shared = Arc::new(Shared {
        audit,
        keys: store::Internal::new(&cfg.cluster_name),
        cfg,
        client,
        state: tokio::sync::Mutex::new(st),
        changed: Notify::new(),
        metrics: metrics::Metrics::default(),
        export_status: std::sync::Mutex::new(ExportStatus::default()),
    });

    // Initial export before serving, so readers never see a half export
    // followed by the canary.
    let stats = exporter.sync(&desired).await?;
    exporter.heartbeat().await?;
    record_sync(&shared, &exporter, &counts, stats, None);

    spawn_grpc(&shared, listeners.grpc, &tracker, &cancel)?;
    if let Some(l) = listeners.metrics {
        tracker.spawn(metrics::serve(l, shared.clone(), cancel.clone()));
    }
    if let Some((src, skips)) = kube {
        shared
            .metrics
            .set_kube_skipped(src.records().skipped_counts());
        tracker.spawn(kube_loop(src, skips, shared.clone(), cancel.clone()));
    }
    tracker.spawn(export_loop(
        shared.clone(),
        exporter,
        cancel.clone(),
        tracker.clone(),
    ));
    Ok(Running {
        grpc_addr,
        metrics_addr,
        shared,
        cancel,
        tracker,
    })
}

/// The stored state (internal store), with the services file's services
/// in place of stored ones of the same name.
async fn load_state(
    cfg: &Config,
    client: &mut etcd_client::Client,
) -> Result<state::ClusterState, StartError> {
    let mut st = state::ClusterState::new(cfg.cluster_name.clone(), cfg.cluster_id, cfg.encryption);
    store::load(client, &mut st, Instant::now()).await?;
    if let Some(p) = &cfg.services_file {
        for s in services_file::load(p, &cfg.cluster_name)? {
            st.services.remove(&(s.namespace.clone(), s.name.clone()));
            st.file_services
                .insert((s.namespace.clone(), s.name.clone()), s);
        }
    }
    Ok(st)
}

/// Kubernetes: list everything before the first export, so a restart
/// exports the same set instead of deleting and re-adding it. The source,
/// to keep watching, and the skips it logged; None without Kubernetes.
async fn kube_initial_sync(
    cfg: &Config,
    st: &mut state::ClusterState,
) -> Result<Option<(kube_source::KubeSource, kube_source::SkipLog)>, StartError> {
    let Some(client) = &cfg.kubernetes else {
        return Ok(None);
    };
    let mut src = kube_source::KubeSource::new(client.clone(), cfg.cluster_name.clone());
    const KUBE_SYNC: Duration = Duration::from_secs(60);
    tokio::time::timeout(KUBE_SYNC, src.initial_sync())
        .await
        .map_err(|_| StartError::KubeTimeout(KUBE_SYNC))?
        .map_err(StartError::Kube)?;
    let recs = src.records();
    let mut skips = kube_source::SkipLog::default();
    skips.report(&recs.skipped);
    st.replace_kube(&recs.nodes, &recs.services, Instant::now());
    st.replace_kube_policies(&recs.policies);
    Ok(Some((src, skips)))
}

/// The gRPC and (optional) metrics listeners, bound before the export.
struct Listeners {
    grpc: tokio::net::TcpListener,
    grpc_addr: SocketAddr,
    metrics: Option<tokio::net::TcpListener>,
    metrics_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(cfg: &Config) -> Result<Self, StartError> {
        let grpc = tokio::net::TcpListener::bind(cfg.grpc_listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: cfg.grpc_listen,
                source,
            })?;
        let grpc_addr = grpc.local_addr().map_err(|source| StartError::Listen {
            addr: cfg.grpc_listen,
            source,
        })?;
        let metrics = match cfg.metrics_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|source| StartError::Listen { addr: a, source })?,
            ),
            None => None,
        };
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        Ok(Self {
            grpc,
            grpc_addr,
            metrics,
            metrics_addr,
        })
    }
}

/// The gRPC server on `listener` (TLS when configured), as a task; its
/// failure cancels everything.
fn spawn_grpc(
    shared: &Arc<Shared>,
    listener: tokio::net::TcpListener,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(), StartError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &shared.cfg.grpc_tls {
        builder = builder.tls_config(grpc_tls(t)?).map_err(StartError::Tls)?;
    }
    let svc = ClusterMeshServer::new(grpc::Api {
        shared: shared.clone(),
    });
    let router = builder.add_service(svc);
    let c = cancel.clone();
    tracker.spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, c.clone().cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
            c.cancel();
        }
    });
    Ok(())
}

fn grpc_tls(t: &config::GrpcTls) -> Result<tonic::transport::ServerTlsConfig, StartError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| StartError::TlsFile {
            path: p.to_owned(),
            source,
        })
    };
    // A client certificate of the CA is required (tonic's default once a
    // client CA is set): authz reads the caller's identity from it.
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            read(&t.cert_file)?,
            read(&t.key_file)?,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(read(
            &t.client_ca_file,
        )?)))
}

fn record_sync(
    shared: &Shared,
    exporter: &export::Exporter,
    counts: &[(StateKind, usize)],
    stats: export::SyncStats,
    heartbeat_ms: Option<u64>,
) {
    shared
        .metrics
        .etcd_puts
        .fetch_add(stats.puts as u64, Ordering::Relaxed);
    shared
        .metrics
        .etcd_deletes
        .fetch_add(stats.deletes as u64, Ordering::Relaxed);
    if let Ok(mut m) = shared.metrics.exported.lock() {
        for (k, v) in counts {
            m.insert(k.as_str(), *v as u64);
        }
    }
    let beat = heartbeat_ms.unwrap_or_else(export::now_ms);
    shared
        .metrics
        .last_heartbeat_ms
        .store(beat, Ordering::Relaxed);
    if let Ok(mut s) = shared.export_status.lock() {
        s.synced = exporter.synced().clone();
        s.last_error = None;
        s.last_heartbeat_ms = beat;
    }
}

/// Keeps etcd equal to the state: on every change, on every heartbeat tick,
/// after node expiry and after a lost lease. Failures are retried with
/// backoff; the state is never lost, only its export delayed.
async fn export_loop(
    shared: Arc<Shared>,
    mut exporter: export::Exporter,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let cfg = &shared.cfg;
    let spawn_keepalive = |lease: i64| {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let client = shared.client.clone();
        let c = cancel.clone();
        let ttl = cfg.lease_ttl;
        tracker.spawn(async move {
            let _ = export::keep_alive(client, lease, ttl, c).await;
            let _ = tx.send(());
        });
        rx
    };
    let mut lost = spawn_keepalive(exporter.lease());
    let mut heartbeat = tokio::time::interval(cfg.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expiry = tokio::time::interval(Duration::from_millis(500));
    let mut failures = 0u32;
    let mut backoff = clustermesh_kvstore::backoff::reconnect().build();
    let mut need_full = false;
    loop {
        let mut beat = false;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.changed.notified() => {}
            _ = heartbeat.tick() => beat = true,
            _ = expiry.tick() => {
                let nodes = expire_nodes(&shared).await;
                if !(collect_identities(&shared).await || nodes) {
                    continue;
                }
            }
            r = &mut lost => {
                if r.is_ok() && !cancel.is_cancelled() {
                    shared.metrics.lease_losses.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = exporter.lease_lost().await {
                        tracing::warn!(error = %e, "granting a new lease failed");
                    }
                    need_full = true;
                    lost = spawn_keepalive(exporter.lease());
                } else {
                    return;
                }
            }
        }
        let result = async {
            let stats = if need_full {
                let desired = {
                    let mut st = shared.state.lock().await;
                    st.clear_changes();
                    st.desired()
                };
                exporter.sync(&desired).await?
            } else {
                let changes = shared.state.lock().await.take_changes();
                exporter.apply_changes(changes).await?
            };
            if beat {
                exporter.heartbeat().await?;
            }
            Ok::<_, export::Error>(stats)
        }
        .await;
        match result {
            Ok(stats) => {
                failures = 0;
                backoff = clustermesh_kvstore::backoff::reconnect().build();
                need_full = false;
                let hb = if beat {
                    Some(export::now_ms())
                } else {
                    shared
                        .export_status
                        .lock()
                        .ok()
                        .map(|s| s.last_heartbeat_ms)
                };
                let counts = shared.state.lock().await.counts();
                record_sync(&shared, &exporter, &counts, stats, hb);
            }
            Err(e) => {
                failures += 1;
                // Pending changes may be half applied: resync everything.
                need_full = true;
                shared.metrics.etcd_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, failures, "export failed; retrying");
                if let Ok(mut s) = shared.export_status.lock() {
                    s.last_error = Some(e.to_string());
                }
                let delay = backoff
                    .next()
                    .unwrap_or(clustermesh_kvstore::backoff::MAX_DELAY);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => shared.changed.notify_one(),
                }
            }
        }
    }
}

/// Follows the Kubernetes watchers and hands their records to the state.
async fn kube_loop(
    mut src: kube_source::KubeSource,
    mut skips: kube_source::SkipLog,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let changed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = src.next() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "Kubernetes source stopped");
                    return;
                }
            },
        };
        if changed {
            let recs = src.records();
            skips.report(&recs.skipped);
            shared.metrics.set_kube_skipped(recs.skipped_counts());
            let n = {
                let mut st = shared.state.lock().await;
                st.replace_kube(&recs.nodes, &recs.services, Instant::now())
                    + st.replace_kube_policies(&recs.policies)
            };
            if n > 0 {
                shared.changed.notify_one();
            }
        }
    }
}

/// Deletes the identities no endpoint has used for the grace period
/// (`identity_gc_grace`), under the state lock (an endpoint added at the
/// same time waits, then allocates afresh). Returns whether any went.
async fn collect_identities(shared: &Shared) -> bool {
    let grace = shared.cfg.identity_gc_grace;
    if grace.is_zero() {
        return false;
    }
    let mut st = shared.state.lock().await;
    let due = st.identities_to_collect(Instant::now(), grace);
    let mut changed = false;
    for rec in due {
        match store::delete_identity(&mut shared.client.clone(), &shared.keys, &rec).await {
            Ok(()) => {
                tracing::info!(identity = %rec.id, labels = %rec.labels, unused_for = ?grace, "identity collected: no endpoint uses it");
                st.remove_identity(rec.id);
                changed = true;
            }
            Err(e) => {
                tracing::warn!(identity = %rec.id, error = %e, "deleting an unused identity failed; will retry")
            }
        }
    }
    changed
}

/// Removes nodes whose heartbeats stopped. Returns whether anything changed.
async fn expire_nodes(shared: &Shared) -> bool {
    let mut st = shared.state.lock().await;
    let expired = st.expired_nodes(Instant::now(), shared.cfg.node_ttl);
    let mut changed = false;
    for n in expired {
        let eps = st.endpoints_of(&n);
        match store::delete_node(&mut shared.client.clone(), &shared.keys, &n, &eps).await {
            Ok(()) => {
                tracing::info!(node = %n, endpoints = eps.len(), "node expired: no heartbeat");
                st.remove_node(&n);
                shared.metrics.nodes_expired.fetch_add(1, Ordering::Relaxed);
                changed = true;
            }
            Err(e) => {
                tracing::warn!(node = %n, error = %e, "removing expired node failed; will retry")
            }
        }
    }
    changed
}
