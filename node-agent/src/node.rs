//! Builds the agent's stages from its configuration and starts each as a
//! task of the root [`TaskTracker`], under the root [`CancellationToken`]:
//!
//! 1. the WireGuard device (started or adopted: its TUN must exist before
//!    programs attach to it);
//! 2. the datapath: programs loaded and attached in the node's namespace,
//!    maps pinned; `CM_CONFIG` written fail-closed (strict egress when
//!    encrypted, and every strict flag the pinned configuration had) until
//!    the policy is read;
//! 3. the local endpoints ([`crate::endpoints`]) and the registration with
//!    the apiserver ([`crate::registration`]), with key rotation;
//! 4. the control plane ([`crate::clusters::Agent`]) with its reconcilers
//!    (eBPF maps, routes, WireGuard peers, datapath config), and the
//!    status endpoint;
//! 5. telemetry (status refresh, counter reports, audit of refusals);
//! 6. flows ([`crate::flows`]): `CM_FLOW_CONFIG` written, the ring buffer
//!    drained into the node's flow buffer, the flow API when
//!    `--flows-listen` is given.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use clustermesh_api::{proto, status::EncryptionStatus};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tunnel_common::{CONFIG_FLAG_STRICT, DatapathConfig, TunnelMode};

use crate::{
    audit::Audit,
    clusters::{Agent, ClustersConfig, Reconcilers, config::ClusterFile},
    config::{AgentConfig, Validated},
    datapath::{self, Attachment, Counters, NodeIfaces},
    endpoints::{CniEndpoints, EndpointSource},
    reconcilers::{
        ReconcileError, Reconciler,
        datapath_config::DatapathConfigMap,
        endpoints::EndpointMap,
        ipcache::IpCacheMap,
        network_policy::{PolicyCidrMap, PolicyMap},
        routes::{RouteTable, RoutedTunnels},
        services::{LbPolicy, ServiceMap},
        strict_ranges::StrictRangeMap,
        tunnels::TunnelMap,
        wg_peers::WgPeers,
    },
    registration, status,
    telemetry::Telemetry,
    wireguard::{self, DeviceSpec, WgDevice},
};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the WireGuard device: {0}")]
    Wireguard(#[from] wireguard::Error),
    #[error(transparent)]
    Attach(#[from] datapath::AttachError),
    #[error(transparent)]
    Locked(#[from] datapath::LockError),
    #[error("the datapath's counters: {0}")]
    Counters(#[source] datapath::Error),
    #[error("the ip-cache's size: {0}")]
    MapSize(#[source] datapath::Error),
    #[error(transparent)]
    Reconciler(#[from] ReconcileError),
    #[error("the flow events: {0}")]
    Flows(#[source] anyhow::Error),
    #[error(transparent)]
    FlowApi(#[from] crate::flows::server::ServeError),
    #[error(transparent)]
    FlowExport(#[from] crate::flows::export::ExportError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("--status-listen {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn device(cfg: &AgentConfig) -> Result<Option<WgDevice>, StartError> {
    let Some(iface) = &cfg.wireguard_iface else {
        return Ok(None);
    };
    Ok(Some(wireguard::ensure(&DeviceSpec {
        iface: iface.clone(),
        port: cfg.wireguard_port,
        key_file: cfg.wireguard_key_file.clone(),
        bin: cfg
            .wireguard_bin
            .clone()
            .unwrap_or_else(wireguard::default_bin),
        log: cfg
            .wireguard_log
            .clone()
            .unwrap_or_else(|| wireguard::default_log(iface)),
        uapi_dir: "/var/run/wireguard".into(),
        netns: cfg.netns.clone(),
    })?))
}

/// Whether this agent loads the datapath (and so owns the pin directory).
fn uses_datapath(cfg: &AgentConfig) -> bool {
    cfg.endpoint_dir.is_some()
        || !cfg.endpoint_ifaces.is_empty()
        || cfg.overlay_iface.is_some()
        || cfg.underlay_iface.is_some()
}

fn attach(cfg: &AgentConfig) -> Result<Option<Attachment>, StartError> {
    let ifaces = NodeIfaces {
        endpoints: cfg.endpoint_ifaces.clone(),
        overlay: cfg.overlay_iface.clone(),
        underlay: cfg.underlay_iface.clone(),
        wireguard: cfg.wireguard_iface.clone(),
    };
    if !uses_datapath(cfg) {
        return Ok(None);
    }
    Ok(Some(datapath::attach_node(
        &ifaces,
        cfg.netns.as_deref(),
        &cfg.bpf_pin_dir,
        &datapath::MapSizes {
            ipcache: cfg.ipcache_max_entries,
        },
    )?))
}

/// The programs' configuration before the policy is read.
fn base_config(v: &Validated, a: &Attachment, encrypted: bool) -> DatapathConfig {
    if v.tunnel == TunnelMode::None {
        return DatapathConfig::default();
    }
    DatapathConfig {
        mode: v.tunnel as u32,
        overlay_ifindex: a.overlay_ifindex,
        underlay_ifindex: a.underlay_ifindex,
        underlay_ip: v.underlay_ip.map_or(0, |ip| u32::from(ip).to_be()),
        wg_ifindex: a.wg_ifindex,
        // Strict until the cluster's policy is read: fail closed (the
        // reconciler also keeps the pinned configuration's strict flags).
        flags: if encrypted { CONFIG_FLAG_STRICT } else { 0 },
        underlay_ip6: v.underlay_ip6.map_or([0; 16], |ip| ip.octets()),
    }
}

/// Everything the stages share.
struct Shared {
    audit: Audit,
    encryption: Arc<Mutex<EncryptionStatus>>,
    policy: Arc<Mutex<clustermesh_api::status::PolicyStatus>>,
    /// The control plane's endpoints with their policy applied, which the
    /// endpoint source waits for before a pod is ready.
    policy_ready: tokio::sync::watch::Sender<std::collections::BTreeSet<std::net::IpAddr>>,
    wg: Option<WgDevice>,
    /// What flows' addresses are, published by the control plane.
    directory: tokio::sync::watch::Sender<Arc<crate::flows::Directory>>,
    /// The node's flows (None: no datapath, or flow events off).
    flows: Option<Arc<crate::flows::Observer>>,
}

/// Builds every stage and spawns it on `tracker`; returns once all run.
pub async fn start(
    cfg: AgentConfig,
    v: Validated,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Running, StartError> {
    // First of all: one agent per datapath. The lock lives as long as the
    // returned [`Running`] (main keeps it until the process exits).
    let lock = if uses_datapath(&cfg) {
        Some(datapath::lock_pin_dir(&cfg.bpf_pin_dir)?)
    } else {
        None
    };
    let wg = device(&cfg)?;
    let attachment = attach(&cfg)?;
    let shared = Shared {
        audit: Audit::open(&cfg.audit_log, ("node", v.node_name.as_str())),
        encryption: Arc::new(Mutex::new(EncryptionStatus {
            device: cfg.wireguard_iface.clone(),
            public_key: wg.as_ref().map(|w| w.public.fingerprint()),
            ..Default::default()
        })),
        policy: Arc::default(),
        policy_ready: tokio::sync::watch::Sender::new(Default::default()),
        wg,
        directory: tokio::sync::watch::Sender::new(Arc::new(crate::flows::Directory::empty(
            v.cluster
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            v.node_name.clone(),
        ))),
        flows: None,
    };
    let policy: Box<dyn Reconciler<_, _>> = match &attachment {
        Some(a) => Box::new(DatapathConfigMap::open(
            &cfg.bpf_pin_dir,
            base_config(&v, a, shared.wg.is_some()),
            shared.encryption.clone(),
            shared.audit.clone(),
        )?),
        None => Box::new(DatapathConfigMap::without_datapath(
            shared.encryption.clone(),
            shared.audit.clone(),
        )),
    };
    let counters = match &attachment {
        Some(_) => Some(Counters::open(&cfg.bpf_pin_dir).map_err(StartError::Counters)?),
        None => None,
    };
    let datapath = attachment.is_some();
    let mut shared = shared;
    if datapath {
        shared.flows = start_flows(&cfg, &v, &shared, cancel, tracker).await?;
    }
    start_local(&cfg, &v, attachment, &shared, cancel, tracker)?;
    if let Some(cluster) = &v.cluster {
        start_control_plane(&cfg, cluster, datapath, policy, &shared, cancel, tracker).await?;
    }
    tracker.spawn(
        Telemetry {
            counters,
            wg: shared.wg.as_ref().map(|w| w.client.clone()),
            status: shared.encryption.clone(),
            policy: datapath.then(|| (cfg.bpf_pin_dir.clone(), shared.policy.clone())),
            audit: shared.audit.clone(),
            report_every: Duration::from_secs(cfg.report_every.max(1)),
            reports: cfg.reports,
        }
        .run(cancel.clone()),
    );
    if let Some(w) = shared.wg.clone() {
        tracker.spawn(supervise_device(w, shared.audit.clone(), cancel.clone()));
    }
    Ok(Running { _lock: lock })
}

/// Writes `CM_FLOW_CONFIG` (also "off": a previous agent's setting goes),
/// then, unless off, starts draining the ring buffer into the node's flow
/// buffer and serves the flow API when asked.
async fn start_flows(
    cfg: &AgentConfig,
    v: &Validated,
    shared: &Shared,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Option<Arc<crate::flows::Observer>>, StartError> {
    use crate::flows;
    let events = flows::Events::parse(&cfg.flow_events).unwrap_or_default();
    let interval = Duration::from_millis(cfg.flow_trace_interval_ms);
    flows::configure(&cfg.bpf_pin_dir, events, interval).map_err(StartError::Flows)?;
    if events == flows::Events::Off {
        return Ok(None);
    }
    let observer = flows::Observer::new(
        cfg.flow_buffer,
        events,
        interval,
        shared.directory.subscribe(),
    );
    let sink = match cfg.flow_export()? {
        Some(c) => Some(export_sink(c, &observer, &shared.audit)?),
        None => None,
    };
    tracker.spawn(flows::read(
        cfg.bpf_pin_dir.clone(),
        observer.clone(),
        sink,
        cancel.clone(),
    ));
    if let (Some(addr), Some(cert), Some(key), Some(ca)) = (
        cfg.flows_listen,
        &cfg.flows_tls_cert,
        &cfg.flows_tls_key,
        &cfg.flows_client_ca,
    ) {
        let tls = flows::server::Tls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: ca.clone(),
        };
        let serve = flows::server::start(
            addr,
            tls,
            observer.clone(),
            v.node_name.clone(),
            cancel.clone(),
        )
        .await?;
        tracker.spawn(serve);
    }
    Ok(Some(observer))
}

/// The flow export: every flow the reader records, and every audit-trail
/// line (the audit file stays as it is), in one stream.
fn export_sink(
    c: crate::flows::export::ExportConfig,
    observer: &Arc<crate::flows::Observer>,
    audit: &Audit,
) -> Result<crate::flows::Sink, StartError> {
    use crate::flows::export::{AuditRecord, Exporter};
    let ex = Arc::new(Mutex::new(Exporter::open(c)?));
    observer.set_export(ex.clone());
    let for_audit = ex.clone();
    audit.tee(move |line| {
        if let (Ok(r), Ok(mut e)) = (AuditRecord::parse_line(line), for_audit.lock()) {
            // A failed write is counted by the exporter (metrics).
            let _ = e.audit(&r);
        }
    });
    Ok(Box::new(move |f| {
        if let Ok(mut e) = ex.lock() {
            let _ = e.flow(f);
        }
    }))
}

/// Supervises the WireGuard device ([`wireguard::supervise`]); when it
/// dies, the agent rebuilds everything tied to it (the device with the
/// node's key, `from_wireguard` on the new TUN interface, its ifindex in
/// `CM_CONFIG`, every peer) by re-executing itself: the same process id
/// and flags through the restart path that adopts the pinned datapath, so
/// forwarding never pauses and strict mode stays fail closed meanwhile
/// (packets redirected to the dead device are dropped).
async fn supervise_device(w: WgDevice, audit: Audit, cancel: CancellationToken) {
    let Some(why) = wireguard::supervise(&w, &cancel).await else {
        return;
    };
    tracing::error!(%why, "the WireGuard device died; re-executing the agent to rebuild it");
    audit.record(
        "device_down",
        serde_json::json!({"why": why, "action": "agent re-executed to restart the device"}),
    );
    if let Some(c) = &w.child
        && let Ok(mut c) = c.lock()
    {
        // A hung device holds its TUN name: stop it, and reap it either way.
        let _ = c.kill();
        let _ = c.wait();
    }
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "node-agent".into());
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .exec();
    tracing::error!(error = %e, "re-executing the agent failed; exiting so a supervisor restarts it");
    std::process::exit(70);
}

/// What the running agent holds until it exits.
#[derive(Debug)]
pub struct Running {
    /// The pin directory's lock (one agent per datapath).
    _lock: Option<std::fs::File>,
}

/// The local endpoints, the registration and key rotation.
fn start_local(
    cfg: &AgentConfig,
    v: &Validated,
    attachment: Option<Attachment>,
    shared: &Shared,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), StartError> {
    let (ids_tx, ids_rx) = tokio::sync::watch::channel(Vec::new());
    let mut specs = cfg.endpoints.clone();
    let (specs_tx, specs_rx) = tokio::sync::watch::channel(specs.clone());
    if let Some(a) = attachment {
        let mut source = EndpointSource {
            map: EndpointMap::open(&cfg.bpf_pin_dir)?,
            dp: a.dp,
            static_specs: cfg.endpoints.clone(),
            endpoint_dir: cfg.endpoint_dir.clone(),
            netns: cfg.netns.clone(),
            ifaces: a.ifaces,
            // With a control plane that will see the pod's record (it is
            // registered through the apiserver), a pod is ready only once
            // its policy is applied.
            policy_ready: (v.cluster.is_some() && cfg.apiserver.is_some())
                .then(|| shared.policy_ready.subscribe()),
        };
        let mut cni = CniEndpoints::default();
        specs = source.start(&mut cni);
        specs_tx.send_replace(specs.clone());
        tracker.spawn(source.run(cni, specs, specs_tx, ids_rx, cancel.clone()));
    }
    let Some(addr) = cfg.apiserver.clone() else {
        return Ok(());
    };
    let wg = shared.wg.as_ref();
    let node = proto::Node {
        name: v.node_name.clone(),
        underlay_ips: cfg.underlay_ips.clone(),
        pod_cidrs: cfg.pod_cidrs.clone(),
        boot_id: registration::boot_id(),
        wireguard_public_keys: wg.iter().map(|w| w.public.to_string()).collect(),
        wireguard_port: wg.map_or(0, |w| u32::from(w.port)),
        ..Default::default()
    };
    let (node_tx, node_rx) = tokio::sync::watch::channel(node);
    if let Some(w) = wg {
        tracker.spawn(wireguard::rotation(
            wireguard::Rotation {
                wg: w.clone(),
                key_file: cfg.wireguard_key_file.clone(),
                every: Duration::from_secs(cfg.wireguard_rotate_every),
                overlap: Duration::from_secs(cfg.wireguard_overlap),
                node: node_tx,
                audit: shared.audit.clone(),
                status: shared.encryption.clone(),
            },
            cancel.clone(),
        ));
    }
    let tls = match (&cfg.apiserver_ca, &cfg.apiserver_cert, &cfg.apiserver_key) {
        (Some(ca), Some(cert), Some(key)) => Some((ca.clone(), cert.clone(), key.clone())),
        _ => {
            tracing::warn!(apiserver = %addr, "registering over plaintext: the apiserver runs without TLS (--insecure-plaintext)");
            None
        }
    };
    tracker.spawn(registration::run(
        registration::Target { addr, tls },
        node_rx,
        specs_rx,
        ids_tx,
        cancel.clone(),
    ));
    Ok(())
}

/// The reconcilers: the pinned maps, routes and the device with a
/// datapath; in memory (shown by the status endpoint) without.
fn reconcilers(
    cfg: &AgentConfig,
    cluster: &clustermesh_api::ClusterName,
    datapath: bool,
    policy: Box<dyn Reconciler<(), clustermesh_api::EncryptionPolicy>>,
    shared: &Shared,
) -> Result<Reconcilers, StartError> {
    let mut r = Reconcilers::in_memory();
    r.policy = policy;
    if let Some(w) = &shared.wg {
        r.peers = Box::new(WgPeers::new(
            w.client.clone(),
            Duration::from_secs(cfg.wireguard_overlap),
            shared.audit.clone(),
        ));
    }
    if !datapath {
        return Ok(r);
    }
    let map = TunnelMap::open(&cfg.bpf_pin_dir)?;
    r.tunnels = if cfg.tunnel == "direct" {
        let netns = cfg.netns.as_deref().map(clustermesh_api::netns::path_of);
        let dev = cfg.underlay_iface.as_deref().unwrap_or_default();
        Box::new(RoutedTunnels {
            map,
            routes: RouteTable::open(netns.as_deref(), dev)?,
        })
    } else {
        Box::new(map)
    };
    r.ipcache = Box::new(IpCacheMap::open(&cfg.bpf_pin_dir)?);
    r.strict_ranges = Box::new(StrictRangeMap::open(&cfg.bpf_pin_dir)?);
    r.network_policies = Box::new(PolicyMap::open(&cfg.bpf_pin_dir, cfg.policy_audit)?);
    r.policy_cidrs = Box::new(PolicyCidrMap::open(&cfg.bpf_pin_dir)?);
    r.services = Box::new(ServiceMap::open(
        &cfg.bpf_pin_dir,
        LbPolicy {
            local_cluster: cluster.clone(),
            failover_threshold: cfg.lb_failover_threshold,
        },
    )?);
    Ok(r)
}

async fn start_control_plane(
    cfg: &AgentConfig,
    cluster: &clustermesh_api::ClusterName,
    datapath: bool,
    policy: Box<dyn Reconciler<(), clustermesh_api::EncryptionPolicy>>,
    shared: &Shared,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), StartError> {
    let clusters = ClustersConfig {
        local_cluster: cluster.clone(),
        local: ClusterFile {
            endpoints: cfg.local_etcd_endpoints.clone(),
            trusted_ca_file: cfg.local_etcd_ca.clone(),
            cert_file: cfg.local_etcd_cert.clone(),
            key_file: cfg.local_etcd_key.clone(),
            pod_cidrs: Vec::new(),
        },
        self_node: cfg.node_name.as_deref().and_then(|n| n.parse().ok()),
        clusters_dir: cfg.clusters_dir.clone(),
        stale_ttl: Duration::from_secs(cfg.stale_ttl),
        sync_timeout: Duration::from_secs(cfg.sync_timeout),
        poll_interval: Duration::from_secs(1),
        // Validated before start: cannot fail here.
        strict_ranges: cfg.strict_ranges().unwrap_or_default(),
    };
    let mut agent = Agent::new(
        clusters,
        reconcilers(cfg, cluster, datapath, policy, shared)?,
        cancel.clone(),
    );
    agent.set_policy_ready(shared.policy_ready.clone());
    if datapath {
        let size = |name| {
            datapath::pinned_size(&cfg.bpf_pin_dir, name)
                .map_err(StartError::MapSize)
                .map(|s| s.map_or(usize::MAX, |s| s as usize))
        };
        agent.set_ipcache_capacity(
            size(tunnel_common::maps::IPCACHE)?,
            size(tunnel_common::maps::IPCACHE6)?,
        );
    }
    if shared.flows.is_some() {
        agent.set_directory(shared.directory.clone());
    }
    let listener = tokio::net::TcpListener::bind(cfg.status_listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.status_listen,
            source,
        })?;
    let sources = status::Sources {
        control_plane: Some(agent.status()),
        encryption: shared.encryption.clone(),
        policy: shared.policy.clone(),
        flows: shared.flows.clone(),
    };
    tracker.spawn(status::serve(listener, sources, cancel.clone()));
    tracker.spawn(async move {
        agent.run().await;
    });
    Ok(())
}
