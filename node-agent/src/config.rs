//! The agent's configuration: one [`AgentConfig`] holding every flag (clap),
//! with [`Default`] (the flags' defaults) and [`AgentConfig::validate`],
//! which checks what clap cannot and turns the strings into typed values.
//! A bad configuration exits with status 64 and a message naming the flag.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use clap::Parser;
use clustermesh_api::{ClusterName, IpCidr, NodeName};
use tunnel_common::TunnelMode;

#[derive(Debug, Clone, Parser)]
#[command(name = "node-agent", version, about = "clustermesh node agent")]
pub struct AgentConfig {
    /// Host-side interfaces of local endpoints to attach `from_endpoint` to.
    #[arg(long = "endpoint-iface")]
    pub endpoint_ifaces: Vec<String>,
    /// Network namespace (ip netns name) holding the endpoint interfaces;
    /// the agent itself stays in its own namespace.
    #[arg(long)]
    pub netns: Option<String>,
    /// The node's VXLAN device (external mode) to attach `from_overlay` to.
    #[arg(long)]
    pub overlay_iface: Option<String>,
    /// How pod traffic to remote nodes leaves: none (host stack), vxlan
    /// (needs --overlay-iface), geneve or direct (need --underlay-iface and
    /// an --underlay-ip).
    #[arg(long, default_value = "none", value_parser = ["none", "vxlan", "geneve", "direct"])]
    pub tunnel: String,
    /// The node's underlay interface: `from_underlay` is attached to it
    /// (Geneve, direct routing) and direct routes point out of it.
    #[arg(long)]
    pub underlay_iface: Option<String>,
    /// bpffs directory where the datapath's maps and links are pinned
    /// (adopted on restart).
    #[arg(long, default_value = "/sys/fs/bpf/clustermesh")]
    pub bpf_pin_dir: std::path::PathBuf,
    /// Seconds between counter reports.
    #[arg(long, default_value_t = 5)]
    pub report_every: u64,
    /// Exit after this many reports (0 = run until stopped).
    #[arg(long, default_value_t = 0)]
    pub reports: u64,
    /// The cluster's apiserver, e.g. https://10.0.0.5:9950 (standalone
    /// mode); https needs --apiserver-ca, --apiserver-cert and
    /// --apiserver-key. http:// only reaches an apiserver run with
    /// --insecure-plaintext.
    #[arg(long)]
    pub apiserver: Option<String>,
    /// The cluster CA the apiserver's certificate chains to
    /// (`pki/<cluster>/ca.pem`).
    #[arg(long)]
    pub apiserver_ca: Option<PathBuf>,
    /// This node's certificate for the apiserver (CN node:<node name>,
    /// `pki/<cluster>/nodes/<node>.pem` from `clustermesh enable --node`):
    /// it may act only for this node.
    #[arg(long)]
    pub apiserver_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long)]
    pub apiserver_key: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Underlay IPs other nodes reach this node at (repeatable; IPv4,
    /// IPv6 or one of each for a dual-stack underlay). The first of each
    /// family is the node's address for Geneve, and VXLAN received by the
    /// programs, over that family.
    #[arg(long = "underlay-ip")]
    pub underlay_ips: Vec<String>,
    /// Pod CIDRs of this node (strict mode covers them too).
    #[arg(long = "pod-cidr")]
    pub pod_cidrs: Vec<String>,
    /// A pod range of the mesh that strict mode covers (repeatable): under
    /// a strict policy, pod traffic to an address inside it that the
    /// ip-cache cannot route is dropped (`drop_strict_unknown_dest`), never
    /// handed to the host stack. This node's --pod-cidr and every remote
    /// cluster file's `pod-cidrs` are covered as well.
    #[arg(long = "strict-range")]
    pub strict_ranges: Vec<String>,
    /// Endpoints to register: IP[,ns=NS][,name=NAME],LABEL=VALUE...
    #[arg(long = "endpoint")]
    pub endpoints: Vec<crate::registration::EndpointSpec>,
    /// The node's WireGuard device (enables encryption): started as a
    /// separate `clustermesh-wg` process if not running, adopted if it is.
    /// Traffic the cluster's encryption policy covers goes through it.
    #[arg(long)]
    pub wireguard_iface: Option<String>,
    /// UDP port of the WireGuard device.
    #[arg(long, default_value_t = 51871)]
    pub wireguard_port: u16,
    /// The node's WireGuard private key file (created 0600 if missing).
    #[arg(long, default_value = "/var/lib/clustermesh/wireguard.key")]
    pub wireguard_key_file: std::path::PathBuf,
    /// The `clustermesh-wg` binary (default: next to this one, else PATH).
    #[arg(long)]
    pub wireguard_bin: Option<std::path::PathBuf>,
    /// Log file of the WireGuard device process
    /// (default /var/log/clustermesh-wg-<iface>.log).
    #[arg(long)]
    pub wireguard_log: Option<std::path::PathBuf>,
    /// Rotate the WireGuard key every this many seconds (0: only on
    /// SIGUSR1). Make before break: the device holds both keys for
    /// --wireguard-overlap seconds while peers move to the new one.
    #[arg(long, default_value_t = 0)]
    pub wireguard_rotate_every: u64,
    /// Seconds both keys stay valid during a rotation; peers keep a
    /// node's old key draining as long.
    #[arg(long, default_value_t = 120)]
    pub wireguard_overlap: u64,
    /// The encryption audit trail (append-only JSON lines).
    #[arg(long, default_value = "/var/log/clustermesh/audit.jsonl")]
    pub audit_log: std::path::PathBuf,
    /// Directory where the CNI plugin (clustermesh-cni) leaves one file per
    /// pod: watched, and each pod attached, registered and made deliverable
    /// as it comes; removed as its file goes.
    #[arg(long)]
    pub endpoint_dir: Option<std::path::PathBuf>,
    /// This node's cluster: enables the control plane (watch the local and
    /// every remote cluster, merge, reconcile).
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// The local cluster's etcd endpoints (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub local_etcd_endpoints: Vec<String>,
    /// CA of the local etcd's server certificate (https endpoints).
    #[arg(long)]
    pub local_etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate and key for the local etcd (its CN is the etcd
    /// user; `clustermesh enable` issues `node.pem`, CN remote-<cluster>).
    #[arg(long, requires = "local_etcd_key")]
    pub local_etcd_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "local_etcd_cert")]
    pub local_etcd_key: Option<std::path::PathBuf>,
    /// Directory of remote-cluster files (file name = cluster name).
    #[arg(long, default_value = "/var/lib/clustermesh/clusters")]
    pub clusters_dir: std::path::PathBuf,
    /// Status endpoint (GET /status JSON, GET /metrics).
    #[arg(long, default_value = "127.0.0.1:9964")]
    pub status_listen: std::net::SocketAddr,
    /// Seconds an unreachable remote cluster's state is kept (0 = forever).
    #[arg(long, default_value_t = 300)]
    pub stale_ttl: u64,
    /// Affinity `local` services spill new flows over to remote backends
    /// when their ready local backends fall below this fraction of the
    /// local ones declared (0: only when none is ready).
    #[arg(long, default_value_t = crate::reconcilers::services::DEFAULT_FAILOVER_THRESHOLD)]
    pub lb_failover_threshold: f64,
    /// Entries of each ip-cache map (`CM_IPCACHE`, `CM_IPCACHE6`): host
    /// entries and pod-CIDR routes of the whole mesh. Entries beyond it are
    /// refused and counted (status `maps`, metric
    /// `clustermesh_agent_map_refused_entries`). A map pinned already
    /// keeps its size until the pin is removed.
    #[arg(long, default_value_t = tunnel_common::MAX_IPCACHE,
          value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub ipcache_max_entries: u32,
    /// Seconds to wait for every cluster's initial sync before pruning.
    #[arg(long, default_value_t = 60)]
    pub sync_timeout: u64,
    /// Network policy audit mode for every endpoint of this node: a packet
    /// the policy would drop is counted (`policy_audit`) and passes, so a
    /// policy can be rolled out and its would-be drops read first.
    #[arg(long)]
    pub policy_audit: bool,
    /// Flow events from the datapath (docs/observability.md): `all`
    /// (drops, policy audits, and forwarded flows: each one's first
    /// packet, then one aggregated event per --flow-trace-interval-ms),
    /// `drops` (drops and audits only) or `off`.
    #[arg(long, default_value = "all", value_parser = ["off", "drops", "all"])]
    pub flow_events: String,
    /// How often a forwarded flow is reported after its first packet,
    /// with the packets and bytes since (0: every packet).
    #[arg(long, default_value_t = 5000)]
    pub flow_trace_interval_ms: u64,
    /// Flows the agent keeps for `clustermesh observe` (the oldest go).
    #[arg(long, default_value_t = 4096)]
    pub flow_buffer: usize,
    /// The flow API (gRPC `clustermesh.v1.Observer`, mutual TLS only).
    #[arg(long, requires_all = ["flows_tls_cert", "flows_tls_key", "flows_client_ca"])]
    pub flows_listen: Option<std::net::SocketAddr>,
    /// The flow API's server certificate and key (`clustermesh enable`
    /// issues each node's, `pki/<cluster>/nodes/<node>.pem`).
    #[arg(long)]
    pub flows_tls_cert: Option<std::path::PathBuf>,
    #[arg(long)]
    pub flows_tls_key: Option<std::path::PathBuf>,
    /// The CA the flow API's clients must present a certificate of (the
    /// cluster CA; CN `root` or `node:<this node>` are let in).
    #[arg(long)]
    pub flows_client_ca: Option<std::path::PathBuf>,
    /// Export every flow, and the audit trail, as JSON lines for a SIEM
    /// (OCSF; docs/observability.md) into this file.
    #[arg(long)]
    pub flow_export_path: Option<std::path::PathBuf>,
    /// The export file is rotated (path.1, path.2, ...) before it passes
    /// this size.
    #[arg(long, default_value_t = crate::flows::export::DEFAULT_MAX_BYTES)]
    pub flow_export_max_bytes: u64,
    /// Rotated export files kept (the oldest goes).
    #[arg(long, default_value_t = crate::flows::export::DEFAULT_MAX_FILES)]
    pub flow_export_max_files: usize,
    /// Export only flows matching one of these filters
    /// (`key=value[,key=value...]`, e.g. `verdict=dropped,to-cluster=c2`).
    #[arg(long)]
    pub flow_export_allow: Vec<String>,
    /// Never export flows matching one of these filters.
    #[arg(long)]
    pub flow_export_deny: Vec<String>,
    /// Leave this field out of every exported line (a dotted path of the
    /// schema, e.g. `src_endpoint.ip`).
    #[arg(long)]
    pub flow_export_redact: Vec<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        // Every flag has a default or is optional: this cannot fail.
        Self::parse_from(["node-agent"])
    }
}

/// A configuration refused, naming the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn refuse(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

/// What [`AgentConfig::validate`] derives from the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub tunnel: TunnelMode,
    /// The first IPv4 `--underlay-ip` (Geneve and direct routing use it).
    pub underlay_ip: Option<Ipv4Addr>,
    /// The first IPv6 `--underlay-ip` (the same, over IPv6).
    pub underlay_ip6: Option<Ipv6Addr>,
    /// `--cluster-name`, when the control plane runs.
    pub cluster: Option<ClusterName>,
    /// `--node-name`, else the host name.
    pub node_name: String,
    /// `--strict-range` and `--pod-cidr`, the ranges strict mode covers.
    pub strict_ranges: Vec<IpCidr>,
}

impl AgentConfig {
    /// Checks the flags together; the error names the flag at fault.
    /// The first IPv4 and the first IPv6 `--underlay-ip`.
    fn underlay(&self) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), ConfigError> {
        for s in &self.underlay_ips {
            if s.parse::<std::net::IpAddr>().is_err() {
                return Err(refuse(
                    "--underlay-ip",
                    format!("{s:?} is not an IPv4 or IPv6 address"),
                ));
            }
        }
        let first = |v6: bool| {
            self.underlay_ips
                .iter()
                .filter_map(|s| s.parse::<std::net::IpAddr>().ok())
                .find(|ip| ip.is_ipv6() == v6)
        };
        let v4 = first(false).and_then(|ip| match ip {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        });
        let v6 = first(true).and_then(|ip| match ip {
            std::net::IpAddr::V6(a) => Some(a),
            std::net::IpAddr::V4(_) => None,
        });
        Ok((v4, v6))
    }

    /// The export's configuration (None: no `--flow-export-path`); the
    /// error names the filter flag at fault.
    pub fn flow_export(&self) -> Result<Option<crate::flows::export::ExportConfig>, ConfigError> {
        use crate::flows::export::{ExportConfig, parse_filter};
        let filters = |flag: &'static str, v: &[String]| {
            v.iter()
                .map(|s| {
                    parse_filter(s)
                        .and_then(|f| {
                            clustermesh_api::flow::Filter::from_proto(&f).map_err(|e| e.to_string())
                        })
                        .map_err(|e| refuse(flag, format!("{s:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let allow = filters("--flow-export-allow", &self.flow_export_allow)?;
        let deny = filters("--flow-export-deny", &self.flow_export_deny)?;
        let Some(path) = &self.flow_export_path else {
            return Ok(None);
        };
        let mut c = ExportConfig::new(path.clone());
        c.max_bytes = self.flow_export_max_bytes;
        c.max_files = self.flow_export_max_files;
        c.allow = allow;
        c.deny = deny;
        c.redact.clone_from(&self.flow_export_redact);
        Ok(Some(c))
    }

    fn check_flows(&self) -> Result<(), ConfigError> {
        if self.flows_listen.is_some() {
            for (flag, v) in [
                ("--flows-tls-cert", &self.flows_tls_cert),
                ("--flows-tls-key", &self.flows_tls_key),
                ("--flows-client-ca", &self.flows_client_ca),
            ] {
                if v.is_none() {
                    return Err(refuse(
                        flag,
                        "--flows-listen serves flows over mutual TLS only: give --flows-tls-cert, --flows-tls-key and --flows-client-ca",
                    ));
                }
            }
        }
        self.flow_export()?;
        if self.flow_buffer == 0 || self.flow_buffer > 1_000_000 {
            return Err(refuse(
                "--flow-buffer",
                format!("{} must be between 1 and 1000000 flows", self.flow_buffer),
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<Validated, ConfigError> {
        if self.endpoint_ifaces.is_empty()
            && self.endpoint_dir.is_none()
            && self.overlay_iface.is_none()
            && self.apiserver.is_none()
            && self.cluster_name.is_none()
        {
            return Err(refuse(
                "--cluster-name",
                "nothing to do: give --endpoint-dir, --endpoint-iface, --overlay-iface, --apiserver and/or --cluster-name",
            ));
        }
        self.check_apiserver()?;
        self.check_flows()?;
        if !(0.0..=1.0).contains(&self.lb_failover_threshold) {
            return Err(refuse(
                "--lb-failover-threshold",
                format!(
                    "{} must be a fraction between 0 and 1",
                    self.lb_failover_threshold
                ),
            ));
        }
        let tunnel = match self.tunnel.as_str() {
            "vxlan" => TunnelMode::Vxlan,
            "geneve" => TunnelMode::Geneve,
            "direct" => TunnelMode::Direct,
            _ => TunnelMode::None,
        };
        if tunnel == TunnelMode::Vxlan && self.overlay_iface.is_none() {
            return Err(refuse(
                "--overlay-iface",
                "--tunnel vxlan needs --overlay-iface (an external-mode VXLAN device)",
            ));
        }
        let (underlay_ip, underlay_ip6) = self.underlay()?;
        if matches!(tunnel, TunnelMode::Geneve | TunnelMode::Direct) {
            if self.underlay_iface.is_none() {
                return Err(refuse(
                    "--underlay-iface",
                    format!("--tunnel {} needs --underlay-iface", self.tunnel),
                ));
            }
            if underlay_ip.is_none() && underlay_ip6.is_none() {
                return Err(refuse(
                    "--underlay-ip",
                    format!("--tunnel {} needs an --underlay-ip", self.tunnel),
                ));
            }
        }
        let cluster = match &self.cluster_name {
            Some(c) => Some(
                c.parse::<ClusterName>()
                    .map_err(|e| refuse("--cluster-name", e.to_string()))?,
            ),
            None => None,
        };
        if cluster.is_some() && self.local_etcd_endpoints.is_empty() {
            return Err(refuse(
                "--local-etcd-endpoints",
                "--cluster-name needs --local-etcd-endpoints",
            ));
        }
        let node_name = match &self.node_name {
            Some(n) => {
                n.parse::<NodeName>()
                    .map_err(|e| refuse("--node-name", e.to_string()))?;
                n.clone()
            }
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .map_err(|e| refuse("--node-name", format!("reading the host name: {e}")))?,
        };
        Ok(Validated {
            tunnel,
            underlay_ip,
            underlay_ip6,
            cluster,
            node_name,
            strict_ranges: self.strict_ranges()?,
        })
    }

    /// `--apiserver` and its TLS flags, together.
    fn check_apiserver(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.apiserver {
            let tls = [
                &self.apiserver_ca,
                &self.apiserver_cert,
                &self.apiserver_key,
            ];
            if a.starts_with("https://") {
                if tls.iter().any(|f| f.is_none()) {
                    return Err(refuse(
                        "--apiserver-cert",
                        "--apiserver https:// needs --apiserver-ca, --apiserver-cert and --apiserver-key (the cluster CA and this node's certificate from `clustermesh enable --node`)",
                    ));
                }
            } else if !a.starts_with("http://") {
                return Err(refuse(
                    "--apiserver",
                    format!(
                        "{a:?} must start with https:// (or http:// for an --insecure-plaintext apiserver)"
                    ),
                ));
            } else if tls.iter().any(|f| f.is_some()) {
                return Err(refuse(
                    "--apiserver",
                    format!("{a} is plaintext but TLS files were given: use https://"),
                ));
            }
        } else if self.apiserver_cert.is_some() {
            return Err(refuse("--apiserver-cert", "needs --apiserver"));
        }
        Ok(())
    }

    /// `--strict-range` and `--pod-cidr` as prefixes, deduplicated.
    pub fn strict_ranges(&self) -> Result<Vec<IpCidr>, ConfigError> {
        let mut out = Vec::new();
        for (field, list) in [
            ("--strict-range", &self.strict_ranges),
            ("--pod-cidr", &self.pod_cidrs),
        ] {
            for s in list {
                let c = s
                    .parse::<IpCidr>()
                    .map_err(|e| refuse(field, format!("{s}: {e}")))?;
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with(args: &[&str]) -> AgentConfig {
        AgentConfig::parse_from(std::iter::once("node-agent").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_the_flags_defaults() {
        let d = AgentConfig::default();
        assert_eq!(d.status_listen.to_string(), "127.0.0.1:9964");
        assert_eq!(d.stale_ttl, 300);
        assert_eq!(d.tunnel, "none");
    }

    #[test]
    fn bad_configurations_name_the_flag() {
        let cases: [(&[&str], &str); 14] = [
            (&["--apiserver", "https://a:1"], "--apiserver-cert"),
            (&["--apiserver", "a:1"], "--apiserver"),
            (
                &["--apiserver", "http://a:1", "--apiserver-cert", "/n.pem"],
                "--apiserver",
            ),
            (&[], "--cluster-name"),
            (&["--cluster-name", "c1"], "--local-etcd-endpoints"),
            (
                &[
                    "--cluster-name",
                    "C_1",
                    "--local-etcd-endpoints",
                    "http://a:1",
                ],
                "--cluster-name",
            ),
            (
                &[
                    "--apiserver",
                    "http://a:1",
                    "--lb-failover-threshold",
                    "1.5",
                ],
                "--lb-failover-threshold",
            ),
            (
                &["--apiserver", "http://a:1", "--tunnel", "vxlan"],
                "--overlay-iface",
            ),
            (
                &[
                    "--apiserver",
                    "http://a:1",
                    "--tunnel",
                    "direct",
                    "--underlay-iface",
                    "eth0",
                ],
                "--underlay-ip",
            ),
            (
                &["--apiserver", "http://a:1", "--underlay-ip", "node-1"],
                "--underlay-ip",
            ),
            (
                &["--apiserver", "http://a:1", "--node-name", "Bad Name"],
                "--node-name",
            ),
            (
                &["--apiserver", "http://a:1", "--strict-range", "10.0.0.1/8"],
                "--strict-range",
            ),
            (
                &["--apiserver", "http://a:1", "--strict-range", "nonsense"],
                "--strict-range",
            ),
            (
                &["--apiserver", "http://a:1", "--pod-cidr", "10.1.0.0/33"],
                "--pod-cidr",
            ),
        ];
        for (args, field) in cases {
            let e = with(args).validate().unwrap_err();
            assert_eq!(e.field, field, "{args:?}: {e}");
        }
    }

    #[test]
    fn a_good_configuration_is_typed() {
        let v = with(&[
            "--cluster-name",
            "c1",
            "--local-etcd-endpoints",
            "http://127.0.0.1:2379",
            "--node-name",
            "n1",
            "--tunnel",
            "geneve",
            "--underlay-iface",
            "ul0",
            "--underlay-ip",
            "fd00::1",
            "--underlay-ip",
            "192.0.2.1",
            "--strict-range",
            "10.0.0.0/8",
            "--strict-range",
            "10.0.0.0/8",
            "--pod-cidr",
            "10.1.0.0/24",
        ])
        .validate()
        .unwrap();
        let ranges: Vec<String> = v.strict_ranges.iter().map(ToString::to_string).collect();
        assert_eq!(ranges, ["10.0.0.0/8", "10.1.0.0/24"]);
        assert_eq!(v.tunnel, TunnelMode::Geneve);
        assert_eq!(v.underlay_ip, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(v.underlay_ip6, Some("fd00::1".parse().unwrap()));
        assert_eq!(v.cluster.unwrap().to_string(), "c1");
        assert_eq!(v.node_name, "n1");
    }
}
