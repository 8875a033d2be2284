//! `node-agent`. Today it:
//! - attaches the datapath's `from_endpoint` program to the given host-side
//!   endpoint interfaces (optionally inside a named network namespace) and
//!   reports its counters;
//! - in standalone mode registers its node and endpoints with the cluster's
//!   apiserver and keeps them alive.
//!
//! The cluster watchers and reconcilers build on it.
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use clustermesh_api::proto;
use node_agent::{
    datapath::Datapath,
    registration::{self, EndpointSpec},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about = "clustermesh node agent")]
struct Args {
    /// Host-side interfaces of local endpoints to attach `from_endpoint` to.
    #[arg(long = "endpoint-iface")]
    endpoint_ifaces: Vec<String>,
    /// Network namespace (ip netns name) holding the endpoint interfaces;
    /// the agent itself stays in its own namespace.
    #[arg(long)]
    netns: Option<String>,
    /// The node's VXLAN device (external mode) to attach `from_overlay` to.
    #[arg(long)]
    overlay_iface: Option<String>,
    /// How pod traffic to remote nodes leaves: none (host stack), vxlan
    /// (needs --overlay-iface), geneve or direct (need --underlay-iface and
    /// an IPv4 --underlay-ip).
    #[arg(long, default_value = "none", value_parser = ["none", "vxlan", "geneve", "direct"])]
    tunnel: String,
    /// The node's underlay interface: `from_underlay` is attached to it
    /// (Geneve, direct routing) and direct routes point out of it.
    #[arg(long)]
    underlay_iface: Option<String>,
    /// bpffs directory where the datapath's maps and links are pinned
    /// (adopted on restart).
    #[arg(long, default_value = "/sys/fs/bpf/clustermesh")]
    bpf_pin_dir: std::path::PathBuf,
    /// Seconds between counter reports.
    #[arg(long, default_value_t = 5)]
    report_every: u64,
    /// Exit after this many reports (0 = run until stopped).
    #[arg(long, default_value_t = 0)]
    reports: u64,
    /// The cluster's apiserver, e.g. http://127.0.0.1:9950 (standalone mode).
    #[arg(long)]
    apiserver: Option<String>,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Underlay IPs other nodes reach this node at.
    #[arg(long = "underlay-ip")]
    underlay_ips: Vec<String>,
    /// Pod CIDRs of this node.
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<String>,
    /// Endpoints to register: IP[,ns=NS][,name=NAME],LABEL=VALUE...
    #[arg(long = "endpoint")]
    endpoints: Vec<EndpointSpec>,
    /// The node's WireGuard device (enables encryption): started as a
    /// separate `clustermesh-wg` process if not running, adopted if it is.
    /// Traffic the cluster's encryption policy covers goes through it.
    #[arg(long)]
    wireguard_iface: Option<String>,
    /// UDP port of the WireGuard device.
    #[arg(long, default_value_t = 51871)]
    wireguard_port: u16,
    /// The node's WireGuard private key file (created 0600 if missing).
    #[arg(long, default_value = "/var/lib/clustermesh/wireguard.key")]
    wireguard_key_file: std::path::PathBuf,
    /// The `clustermesh-wg` binary (default: next to this one, else PATH).
    #[arg(long)]
    wireguard_bin: Option<std::path::PathBuf>,
    /// Log file of the WireGuard device process
    /// (default /var/log/clustermesh-wg-<iface>.log).
    #[arg(long)]
    wireguard_log: Option<std::path::PathBuf>,
    /// Rotate the WireGuard key every this many seconds (0: only on
    /// SIGUSR1). Make before break: the device holds both keys for
    /// --wireguard-overlap seconds while peers move to the new one.
    #[arg(long, default_value_t = 0)]
    wireguard_rotate_every: u64,
    /// Seconds both keys stay valid during a rotation; peers keep a
    /// node's old key draining as long.
    #[arg(long, default_value_t = 120)]
    wireguard_overlap: u64,
    /// The encryption audit trail (append-only JSON lines).
    #[arg(long, default_value = "/var/log/clustermesh/audit.jsonl")]
    audit_log: std::path::PathBuf,
    /// Directory where the CNI plugin (clustermesh-cni) leaves one file per
    /// pod: watched, and each pod attached, registered and made deliverable
    /// as it comes; removed as its file goes.
    #[arg(long)]
    endpoint_dir: Option<std::path::PathBuf>,
    /// This node's cluster: enables the control plane (watch the local and
    /// every remote cluster, merge, reconcile).
    #[arg(long)]
    cluster_name: Option<String>,
    /// The local cluster's etcd endpoints (comma separated).
    #[arg(long, value_delimiter = ',')]
    local_etcd_endpoints: Vec<String>,
    /// CA of the local etcd's server certificate (https endpoints).
    #[arg(long)]
    local_etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate and key for the local etcd (its CN is the etcd
    /// user; `clustermesh enable` issues `node.pem`, CN remote-<cluster>).
    #[arg(long, requires = "local_etcd_key")]
    local_etcd_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "local_etcd_cert")]
    local_etcd_key: Option<std::path::PathBuf>,
    /// Directory of remote-cluster files (file name = cluster name).
    #[arg(long, default_value = "/var/lib/clustermesh/clusters")]
    clusters_dir: std::path::PathBuf,
    /// Status endpoint (GET /status JSON, GET /metrics).
    #[arg(long, default_value = "127.0.0.1:9964")]
    status_listen: std::net::SocketAddr,
    /// Seconds an unreachable remote cluster's state is kept (0 = forever).
    #[arg(long, default_value_t = 300)]
    stale_ttl: u64,
    /// Affinity `local` services spill new flows over to remote backends
    /// when their ready local backends fall below this fraction of the
    /// local ones declared (0: only when none is ready).
    #[arg(long, default_value_t = node_agent::datapath::services::DEFAULT_FAILOVER_THRESHOLD)]
    lb_failover_threshold: f64,
    /// Seconds to wait for every cluster's initial sync before pruning.
    #[arg(long, default_value_t = 60)]
    sync_timeout: u64,
}

/// What the attach thread learnt inside the node's namespace.
struct Attachment {
    dp: Datapath,
    overlay_ifindex: u32,
    underlay_ifindex: u32,
    wg_ifindex: u32,
    /// Host-side interface -> (ifindex, MAC).
    ifaces: std::collections::BTreeMap<String, (u32, [u8; 6])>,
}

/// Runs `f` on a thread inside network namespace `netns` (None: ours);
/// attaching by ifindex resolves in the caller's namespace.
fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(ns) = netns {
                let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
                    .with_context(|| format!("network namespace {ns}"))?;
                // SAFETY: a valid namespace fd; affects only this thread,
                // which ends with the scope.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("entering the network namespace");
                }
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("network namespace thread panicked"))?
    })
}

/// Pods the CNI plugin attached, by container id.
#[derive(Default)]
struct CniEndpoints {
    known: std::collections::BTreeMap<String, clustermesh_cni::EndpointFile>,
}

impl CniEndpoints {
    /// Reads the directory and applies what changed: new pods get
    /// `from_endpoint` attached (or adopted) on their host veth; removed
    /// ones leave the endpoint map and their link pin. Returns whether the
    /// set changed.
    fn poll(
        &mut self,
        dir: &std::path::Path,
        dp: &mut Datapath,
        netns: Option<&str>,
        ifaces: &mut std::collections::BTreeMap<String, (u32, [u8; 6])>,
    ) -> bool {
        let (files, errors) = clustermesh_cni::read_endpoint_dir(dir);
        for (path, e) in errors {
            tracing::warn!(path = %path.display(), error = %e, "ignoring endpoint file");
        }
        let now: std::collections::BTreeMap<_, _> = files
            .into_iter()
            .map(|f| (f.container_id.clone(), f))
            .collect();
        let mut changed = false;
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        for id in gone {
            if let Some(f) = self.known.remove(&id) {
                if let Err(e) = dp.remove_endpoint(f.ip) {
                    tracing::warn!(ip = %f.ip, error = %e, "removing endpoint from the datapath");
                }
                dp.forget_endpoint_link(f.host_ifindex);
                ifaces.remove(&f.host_iface);
                tracing::info!(container = %id, ip = %f.ip, "pod detached");
                changed = true;
            }
        }
        for (id, f) in now {
            if self.known.get(&id) == Some(&f) {
                continue;
            }
            let iface = f.host_iface.clone();
            match in_netns(netns, || dp.attach_endpoint(&iface)) {
                Ok(Ok(how)) => {
                    tracing::info!(container = %id, ip = %f.ip, iface = %iface, ?how, "pod attached");
                    ifaces.insert(iface, (f.host_ifindex, f.host_mac.0));
                    self.known.insert(id, f);
                    changed = true;
                }
                // Retried on the next poll (the veth may be mid-creation).
                Ok(Err(e)) => tracing::warn!(container = %id, error = %e, "attaching pod"),
                Err(e) => tracing::warn!(container = %id, error = %e, "attaching pod"),
            }
        }
        changed
    }

    fn specs(&self) -> impl Iterator<Item = EndpointSpec> + '_ {
        self.known.values().map(|f| EndpointSpec {
            ip: f.ip.to_string(),
            namespace: f.namespace.clone().unwrap_or_default(),
            name: f.name.clone().unwrap_or_else(|| f.container_id.clone()),
            iface: Some(f.host_iface.clone()),
            mac: Some(f.mac.0),
            labels: if f.labels.is_empty() {
                // An identity needs at least one label.
                [("cni:container".to_owned(), "unlabelled".to_owned())].into()
            } else {
                f.labels.clone().into_iter().collect()
            },
        })
    }
}

fn attach(
    ifaces: &[String],
    overlay: Option<&str>,
    underlay: Option<&str>,
    wireguard: Option<&str>,
    netns: Option<&str>,
    pin_dir: &std::path::Path,
    always: bool,
) -> anyhow::Result<Option<Attachment>> {
    if !always && ifaces.is_empty() && overlay.is_none() && underlay.is_none() {
        return Ok(None);
    }
    let ifaces = ifaces.to_vec();
    let overlay = overlay.map(str::to_owned);
    let underlay = underlay.map(str::to_owned);
    let wireguard = wireguard.map(str::to_owned);
    let netns = netns.map(str::to_owned);
    let pin_dir = pin_dir.to_owned();
    std::thread::spawn(move || -> anyhow::Result<Option<Attachment>> {
        if let Some(ns) = &netns {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}"))
                .with_context(|| format!("network namespace {ns}"))?;
            // SAFETY: a valid namespace fd; affects only this thread, which
            // ends after attaching (the TCX links are pinned).
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("entering the network namespace");
            }
        }
        let mut dp = Datapath::load(&pin_dir).context("loading the datapath")?;
        let mut known = std::collections::BTreeMap::new();
        for i in &ifaces {
            let how = dp
                .attach_endpoint(i)
                .with_context(|| format!("attaching to {i}"))?;
            known.insert(
                i.clone(),
                (
                    node_agent::datapath::ifindex(i)?,
                    node_agent::datapath::mac_of(i)?,
                ),
            );
            println!("attached from_endpoint to {i} ({how:?})");
        }
        let mut overlay_ifindex = 0;
        if let Some(o) = &overlay {
            let how = dp
                .attach_overlay(o)
                .with_context(|| format!("attaching to {o}"))?;
            overlay_ifindex = node_agent::datapath::ifindex(o)?;
            println!("attached from_overlay to {o} ({how:?})");
        }
        let mut underlay_ifindex = 0;
        if let Some(u) = &underlay {
            let how = dp
                .attach_underlay(u)
                .with_context(|| format!("attaching to {u}"))?;
            underlay_ifindex = node_agent::datapath::ifindex(u)?;
            println!("attached from_underlay to {u} ({how:?})");
        }
        let mut wg_ifindex = 0;
        if let Some(w) = &wireguard {
            let how = dp
                .attach_wireguard(w)
                .with_context(|| format!("attaching to {w}"))?;
            wg_ifindex = node_agent::datapath::ifindex(w)?;
            println!("attached from_wireguard to {w} ({how:?})");
        }
        Ok(Some(Attachment {
            dp,
            overlay_ifindex,
            underlay_ifindex,
            wg_ifindex,
            ifaces: known,
        }))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("attach thread panicked"))?
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.endpoint_ifaces.is_empty()
        && args.endpoint_dir.is_none()
        && args.overlay_iface.is_none()
        && args.apiserver.is_none()
        && args.cluster_name.is_none()
    {
        anyhow::bail!(
            "nothing to do: give --endpoint-dir, --endpoint-iface, --overlay-iface, --apiserver and/or --cluster-name"
        );
    }
    if !(0.0..=1.0).contains(&args.lb_failover_threshold) {
        anyhow::bail!(
            "--lb-failover-threshold {}: must be a fraction between 0 and 1",
            args.lb_failover_threshold
        );
    }
    let mode = match args.tunnel.as_str() {
        "vxlan" => tunnel_common::TunnelMode::Vxlan,
        "geneve" => tunnel_common::TunnelMode::Geneve,
        "direct" => tunnel_common::TunnelMode::Direct,
        _ => tunnel_common::TunnelMode::None,
    };
    if mode == tunnel_common::TunnelMode::Vxlan && args.overlay_iface.is_none() {
        anyhow::bail!("--tunnel vxlan needs --overlay-iface (an external-mode VXLAN device)");
    }
    let underlay_ip = args
        .underlay_ips
        .iter()
        .find_map(|s| s.parse::<std::net::Ipv4Addr>().ok());
    if matches!(
        mode,
        tunnel_common::TunnelMode::Geneve | tunnel_common::TunnelMode::Direct
    ) && (args.underlay_iface.is_none() || underlay_ip.is_none())
    {
        anyhow::bail!(
            "--tunnel {} needs --underlay-iface and an IPv4 --underlay-ip",
            args.tunnel
        );
    }
    // The WireGuard device first: its TUN must exist to attach to it.
    let wg = match &args.wireguard_iface {
        Some(iface) => Some(
            node_agent::wireguard::ensure(&node_agent::wireguard::DeviceSpec {
                iface: iface.clone(),
                port: args.wireguard_port,
                key_file: args.wireguard_key_file.clone(),
                bin: args
                    .wireguard_bin
                    .clone()
                    .unwrap_or_else(node_agent::wireguard::default_bin),
                log: args
                    .wireguard_log
                    .clone()
                    .unwrap_or_else(|| node_agent::wireguard::default_log(iface)),
                uapi_dir: "/var/run/wireguard".into(),
                netns: args.netns.clone(),
            })
            .context("the WireGuard device")?,
        ),
        None => None,
    };
    let attachment = attach(
        &args.endpoint_ifaces,
        args.overlay_iface.as_deref(),
        args.underlay_iface.as_deref(),
        args.wireguard_iface.as_deref(),
        args.netns.as_deref(),
        &args.bpf_pin_dir,
        args.endpoint_dir.is_some(),
    )?;
    let mut dp_cfg = tunnel_common::DatapathConfig::default();
    let (mut dp, mut ifaces) = match attachment {
        Some(a) => {
            let mut dp = a.dp;
            if mode != tunnel_common::TunnelMode::None {
                dp_cfg = tunnel_common::DatapathConfig {
                    mode: mode as u32,
                    overlay_ifindex: a.overlay_ifindex,
                    underlay_ifindex: a.underlay_ifindex,
                    underlay_ip: underlay_ip.map_or(0, |ip| u32::from(ip).to_be()),
                    wg_ifindex: a.wg_ifindex,
                    // Strict until the cluster's policy is read: fail closed.
                    flags: if wg.is_some() {
                        tunnel_common::CONFIG_FLAG_STRICT
                    } else {
                        0
                    },
                };
                dp.set_config(dp_cfg)?;
            }
            (Some(dp), a.ifaces)
        }
        None => (None, Default::default()),
    };
    let cancel = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let (ids_tx, mut ids_rx) = tokio::sync::watch::channel(Vec::new());
    let mut cni = CniEndpoints::default();
    let mut specs = args.endpoints.clone();
    if let (Some(dir), Some(dp)) = (&args.endpoint_dir, dp.as_mut()) {
        cni.poll(dir, dp, args.netns.as_deref(), &mut ifaces);
        specs.extend(cni.specs());
        // Pods deleted while no agent ran: their entries and link pins go
        // (the live ones stay untouched, so traffic never pauses).
        let live: std::collections::BTreeSet<&str> = specs.iter().map(|e| e.ip.as_str()).collect();
        for (ip, info) in dp.endpoint_entries()? {
            if !live.contains(ip.to_string().as_str()) {
                dp.remove_endpoint(ip)?;
                dp.forget_endpoint_link(info.ifindex);
                println!("removed stale endpoint {ip}");
            }
        }
    }
    let (specs_tx, specs_rx) = tokio::sync::watch::channel(specs.clone());
    let node_name = match args.node_name.clone() {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .context("reading the host name (or give --node-name)")?,
    };
    let audit = node_agent::audit::Audit::open(&args.audit_log, &node_name);
    let enc_status = std::sync::Arc::new(std::sync::Mutex::new(
        node_agent::wireguard::EncryptionStatus {
            device: args.wireguard_iface.clone(),
            public_key: wg.as_ref().map(|w| w.public.fingerprint()),
            ..Default::default()
        },
    ));
    if let Some(addr) = args.apiserver.clone() {
        let name = node_name.clone();
        let node = proto::Node {
            name,
            underlay_ips: args.underlay_ips.clone(),
            pod_cidrs: args.pod_cidrs.clone(),
            boot_id: registration::boot_id(),
            wireguard_public_keys: wg.iter().map(|w| w.public.to_string()).collect(),
            wireguard_port: wg.as_ref().map_or(0, |w| u32::from(w.port)),
            ..Default::default()
        };
        let (node_tx, node_rx) = tokio::sync::watch::channel(node);
        if let Some(w) = &wg {
            tracker.spawn(node_agent::wireguard::rotation(
                node_agent::wireguard::Rotation {
                    wg: w.clone(),
                    key_file: args.wireguard_key_file.clone(),
                    every: Duration::from_secs(args.wireguard_rotate_every),
                    overlap: Duration::from_secs(args.wireguard_overlap),
                    node: node_tx,
                    audit: audit.clone(),
                    status: enc_status.clone(),
                },
                cancel.clone(),
            ));
        }
        tracker.spawn(registration::run(
            addr,
            node_rx,
            specs_rx,
            ids_tx,
            cancel.clone(),
        ));
    }
    let mut agent_status = None;
    if let Some(cluster) = &args.cluster_name {
        use node_agent::{
            clusters::{Agent, AgentConfig, Reconcilers, config::ClusterFile},
            reconcile::MemoryReconciler,
        };
        let local_cluster: clustermesh_api::ClusterName = cluster
            .parse()
            .map_err(|e| anyhow::anyhow!("--cluster-name: {e}"))?;
        if args.local_etcd_endpoints.is_empty() {
            anyhow::bail!("--cluster-name needs --local-etcd-endpoints");
        }
        let lb_policy = node_agent::datapath::services::LbPolicy {
            local_cluster: local_cluster.clone(),
            failover_threshold: args.lb_failover_threshold,
        };
        let cfg = AgentConfig {
            local_cluster,
            local: ClusterFile {
                endpoints: args.local_etcd_endpoints.clone(),
                trusted_ca_file: args.local_etcd_ca.clone(),
                cert_file: args.local_etcd_cert.clone(),
                key_file: args.local_etcd_key.clone(),
            },
            self_node: args.node_name.as_deref().and_then(|n| n.parse().ok()),
            clusters_dir: args.clusters_dir.clone(),
            stale_ttl: Duration::from_secs(args.stale_ttl),
            sync_timeout: Duration::from_secs(args.sync_timeout),
            poll_interval: Duration::from_secs(1),
        };
        // With the datapath loaded, the ip-cache and tunnel routes go into
        // its pinned maps, services into the load-balancer's maps; without
        // it they are held in memory (and shown by the status endpoint).
        let (ipcache, tunnels): (
            Box<dyn node_agent::reconcile::Reconciler<_, _>>,
            Box<dyn node_agent::reconcile::Reconciler<_, _>>,
        ) = if dp.is_some() {
            use node_agent::datapath::{
                reconcilers::{IpCacheMap, TunnelMap},
                routes::{RouteTable, RoutedTunnels},
            };
            let map = TunnelMap::open(&args.bpf_pin_dir)?;
            let tunnels: Box<dyn node_agent::reconcile::Reconciler<_, _>> =
                if mode == tunnel_common::TunnelMode::Direct {
                    let netns = args
                        .netns
                        .as_ref()
                        .map(|n| std::path::PathBuf::from(format!("/var/run/netns/{n}")));
                    let dev = args.underlay_iface.as_deref().unwrap_or_default();
                    Box::new(RoutedTunnels {
                        map,
                        routes: RouteTable::open(netns.as_deref(), dev)?,
                    })
                } else {
                    Box::new(map)
                };
            (Box::new(IpCacheMap::open(&args.bpf_pin_dir)?), tunnels)
        } else {
            (
                Box::new(MemoryReconciler::new("ipcache")),
                Box::new(MemoryReconciler::new("tunnels")),
            )
        };
        let reconcilers = Reconcilers {
            ipcache,
            tunnels,
            peers: match &wg {
                Some(w) => Box::new(node_agent::wireguard::WgPeers::new(
                    w.client.clone(),
                    Duration::from_secs(args.wireguard_overlap),
                    audit.clone(),
                )),
                None => Box::new(MemoryReconciler::new("peers")),
            },
            services: if dp.is_some() {
                Box::new(node_agent::datapath::services::ServiceMap::open(
                    &args.bpf_pin_dir,
                    lb_policy,
                )?)
            } else {
                Box::new(MemoryReconciler::new("services"))
            },
        };
        let agent = Agent::new(cfg, reconcilers, cancel.clone());
        let status = agent.status();
        agent_status = Some(status.clone());
        let listener = tokio::net::TcpListener::bind(args.status_listen)
            .await
            .with_context(|| format!("--status-listen {}", args.status_listen))?;
        tracker.spawn(node_agent::status::serve(
            listener,
            status,
            enc_status.clone(),
            cancel.clone(),
        ));
        tracker.spawn(async move {
            agent.run().await;
        });
    }
    tracker.close();
    let mut n = 0;
    let mut ids_open = true;
    let mut tick = tokio::time::interval(Duration::from_secs(args.report_every.max(1)));
    tick.tick().await;
    let mut cni_tick = tokio::time::interval(Duration::from_millis(200));
    let mut policy_tick = tokio::time::interval(Duration::from_millis(500));
    let mut reported_device = clustermesh_crypto::wg::uapi::DeviceCounters::default();
    // The device outlives agents too: its first reading is the baseline.
    let mut reported_device_known = false;
    // The pinned counters outlive agents: start from what they say now, so
    // the first report counts only new drops.
    let mut reported_drops = dp
        .as_ref()
        .map(|d| node_agent::wireguard::PlaintextDrops {
            egress: d
                .counter(
                    tunnel_common::Direction::Egress,
                    tunnel_common::Verdict::DropStrictPlaintext,
                )
                .map_or(0, |c| c.packets),
            ingress: d
                .counter(
                    tunnel_common::Direction::Ingress,
                    tunnel_common::Verdict::DropStrictPlaintext,
                )
                .map_or(0, |c| c.packets),
        })
        .unwrap_or_default();
    loop {
        tokio::select! {
            // The cluster's strict-encryption switch reaches the datapath.
            _ = policy_tick.tick(), if agent_status.is_some() => {
                let policy = agent_status
                    .as_ref()
                    .and_then(|s| s.lock().ok().and_then(|g| g.encryption));
                let Some(policy) = policy else { continue };
                let peers = wg.as_ref().and_then(|w| node_agent::wireguard::peer_status(&w.client).ok());
                let device_drops = wg.as_ref().and_then(|w| w.client.stats().ok());
                let drops = dp.as_ref().map(|d| node_agent::wireguard::PlaintextDrops {
                    egress: d.counter(tunnel_common::Direction::Egress, tunnel_common::Verdict::DropStrictPlaintext).map_or(0, |c| c.packets),
                    ingress: d.counter(tunnel_common::Direction::Ingress, tunnel_common::Verdict::DropStrictPlaintext).map_or(0, |c| c.packets),
                });
                if let Ok(mut e) = enc_status.lock() {
                    if e.policy != Some(policy) {
                        audit.record("encryption_policy", serde_json::to_value(policy).unwrap_or_default());
                    }
                    e.policy = Some(policy);
                    if let Some(p) = peers {
                        e.peers = p;
                    }
                    if let Some(d) = drops {
                        e.plaintext_drops = d;
                    }
                    if let Some(d) = device_drops {
                        e.device_drops = d;
                    }
                }
                if dp.is_none() || dp_cfg.mode == 0 {
                    continue;
                }
                let flags = if policy.strict { tunnel_common::CONFIG_FLAG_STRICT } else { 0 }
                    | if policy.strict_ingress { tunnel_common::CONFIG_FLAG_STRICT_INGRESS } else { 0 };
                if flags != dp_cfg.flags && let Some(d) = dp.as_mut() {
                    dp_cfg.flags = flags;
                    d.set_config(dp_cfg)?;
                    tracing::info!(strict = policy.strict, strict_ingress = policy.strict_ingress, "encryption policy applied to the datapath");
                }
            }
            _ = cni_tick.tick(), if args.endpoint_dir.is_some() && dp.is_some() => {
                let (Some(dir), Some(d)) = (&args.endpoint_dir, dp.as_mut()) else { continue };
                if cni.poll(dir, d, args.netns.as_deref(), &mut ifaces) {
                    specs = args.endpoints.iter().cloned().chain(cni.specs()).collect();
                    specs_tx.send_replace(specs.clone());
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            r = ids_rx.changed(), if ids_open => {
                if r.is_err() {
                    ids_open = false;
                    continue;
                }
                let ids = ids_rx.borrow_and_update().clone();
                for (ip, id) in &ids {
                    println!("endpoint {ip} has identity {id}");
                    // A local endpoint with a veth and MAC: deliverable.
                    let spec = specs.iter().find(|e| e.ip == *ip);
                    if let (Some(dp), Some(spec)) = (dp.as_mut(), spec)
                        && let (Some(iface), Some(mac)) = (&spec.iface, spec.mac)
                        && let Some((ifindex, host_mac)) = ifaces.get(iface)
                        && let Ok(std::net::IpAddr::V4(v4)) = ip.parse::<std::net::IpAddr>()
                    {
                        dp.upsert_endpoint(
                            v4,
                            tunnel_common::EndpointInfo { ifindex: *ifindex, identity: *id, mac, host_mac: *host_mac },
                        )?;
                    }
                }
            }
            _ = tick.tick() => {
                // Strict-mode refusals since the last report, as evidence.
                let now = enc_status.lock().map(|e| e.plaintext_drops).unwrap_or_default();
                if now.egress + now.ingress > reported_drops.egress + reported_drops.ingress {
                    audit.record("plaintext_drops", serde_json::json!({
                        "egress": now.egress - reported_drops.egress,
                        "ingress": now.ingress - reported_drops.ingress,
                        "interval_s": args.report_every.max(1),
                    }));
                }
                reported_drops = now;
                // Handshake and decryption failures, and traffic refused for
                // want of a peer, since the last report.
                let dev = enc_status.lock().map(|e| e.device_drops).unwrap_or_default();
                let delta = |now: u64, was: u64| now.saturating_sub(was);
                let failures = delta(dev.rx_errors, reported_device.rx_errors);
                let no_peer = delta(dev.tx_no_peer, reported_device.tx_no_peer);
                if failures + no_peer + delta(dev.rx_unknown, reported_device.rx_unknown) > 0 && reported_device_known {
                    audit.record("wireguard_drops", serde_json::json!({
                        "handshake_or_decrypt_failures": failures,
                        "no_peer": no_peer,
                        "unknown_sender": delta(dev.rx_unknown, reported_device.rx_unknown),
                        "source_not_allowed": delta(dev.rx_not_allowed, reported_device.rx_not_allowed),
                        "interval_s": args.report_every.max(1),
                    }));
                }
                reported_device = dev;
                reported_device_known = true;
                if let Some(dp) = &dp {
                    for (dir, verdict, c) in dp.counters()? {
                        println!("{:?} {}: {} packets, {} bytes", dir, verdict.name(), c.packets, c.bytes);
                    }
                }
                n += 1;
                if args.reports != 0 && n >= args.reports {
                    break;
                }
            }
        }
    }
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
    Ok(())
}
