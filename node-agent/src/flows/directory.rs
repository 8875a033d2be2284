//! What a flow's addresses are, as the merged state of every connected
//! cluster knows them ([`Directory`], rebuilt by the control plane after
//! each reconcile that changed records), and the turn of a datapath
//! [`FlowEvent`] into an enriched [`Flow`] ([`Directory::flow`], pure).
//!
//! An address is, in this order: a pod of some cluster (its endpoint
//! record: cluster, node, namespace, name, identity and the identity's
//! labels); a node of some cluster (its underlay addresses; this node's
//! too), never "world"; inside a pod range some node declares but without
//! an endpoint yet ("unknown"); a policy CIDR identity ("cidr"); else
//! "world".

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use clustermesh_api::{
    ClusterName, Identity, IpCidr,
    flow::protocol_name,
    proto::{Flow, FlowEndpoint, FlowService},
    records::{EndpointRecord, NodeRecord},
};
use tunnel_common::{
    Direction, FLOW_FLAG_AUDIT, FLOW_FLAG_DROP, FLOW_FLAG_TRANSLATED, FLOW_HOOK_ENDPOINT,
    FLOW_HOOK_OVERLAY, FLOW_HOOK_UNDERLAY, FLOW_HOOK_WIREGUARD, FlowEvent, TunnelMode, Verdict,
};

use crate::clusters::store::Records;

/// A pod as flows name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pod {
    cluster: String,
    node: String,
    namespace: String,
    name: String,
    identity: u32,
}

/// A node as flows name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Node {
    cluster: String,
    name: String,
}

/// A service frontend as flows name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Service {
    cluster: String,
    namespace: String,
    name: String,
}

/// Everything [`Directory::flow`] looks addresses up in.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    cluster: String,
    node: String,
    pods: HashMap<IpAddr, Pod>,
    nodes: HashMap<IpAddr, Node>,
    ranges: Vec<(IpCidr, String)>,
    labels: HashMap<u32, Vec<String>>,
    services: HashMap<(IpAddr, u16), Service>,
    /// Interface index -> name, for `interface`.
    interfaces: HashMap<u32, String>,
}

fn pod_of(e: &EndpointRecord) -> Pod {
    Pod {
        cluster: e.cluster.to_string(),
        node: e.node.as_ref().map(ToString::to_string).unwrap_or_default(),
        namespace: e
            .namespace
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        name: e.name.as_ref().map(ToString::to_string).unwrap_or_default(),
        identity: e.identity.get(),
    }
}

fn node_of(n: &NodeRecord) -> Node {
    Node {
        cluster: n.cluster.to_string(),
        name: n.name.to_string(),
    }
}

impl Directory {
    /// A node's directory before its control plane has merged anything.
    pub fn empty(cluster: String, node: String) -> Self {
        Self {
            cluster,
            node,
            ..Self::default()
        }
    }

    /// The directory of this node (`cluster`, `node`) over the records of
    /// every cluster it merges (the local one included).
    pub fn build<'a>(
        cluster: &ClusterName,
        node: Option<&str>,
        clusters: impl IntoIterator<Item = &'a Records>,
    ) -> Self {
        let mut d = Self {
            cluster: cluster.to_string(),
            node: node.unwrap_or_default().to_owned(),
            ..Self::default()
        };
        let all: Vec<&Records> = clusters.into_iter().collect();
        for r in &all {
            for (id, rec) in &r.identities {
                let mut l: Vec<String> =
                    rec.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                l.sort();
                d.labels.insert(id.get(), l);
            }
        }
        for r in &all {
            for (ip, e) in &r.endpoints {
                d.pods.insert(*ip, pod_of(e));
            }
            for (n, _) in r.nodes.values() {
                for ip in &n.underlay_ips {
                    d.nodes.insert(*ip, node_of(n));
                }
                for c in &n.pod_cidrs {
                    d.ranges.push((*c, n.cluster.to_string()));
                }
            }
            for s in r.services.values() {
                for f in &s.frontends {
                    for p in &s.ports {
                        d.services.entry((*f, p.port)).or_insert_with(|| Service {
                            cluster: s.cluster.to_string(),
                            namespace: s.namespace.to_string(),
                            name: s.name.to_string(),
                        });
                    }
                }
            }
        }
        d
    }

    /// The name of interface `ifindex` (the pods' host-side veths, the
    /// devices), shown as a flow's `interface`.
    pub fn set_interfaces(&mut self, m: HashMap<u32, String>) {
        self.interfaces = m;
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn endpoint(&self, ip: IpAddr, identity: u32) -> FlowEndpoint {
        let mut e = FlowEndpoint {
            ip: ip.to_string(),
            identity,
            ..FlowEndpoint::default()
        };
        if let Some(p) = self.pods.get(&ip) {
            e.kind = "pod".into();
            e.cluster.clone_from(&p.cluster);
            e.node.clone_from(&p.node);
            e.namespace.clone_from(&p.namespace);
            e.pod.clone_from(&p.name);
            if e.identity == 0 || e.identity == Identity::WORLD.get() {
                e.identity = p.identity;
            }
        } else if let Some(n) = self.nodes.get(&ip) {
            e.kind = "node".into();
            e.cluster.clone_from(&n.cluster);
            e.node.clone_from(&n.name);
            if e.identity == 0 || e.identity == Identity::WORLD.get() {
                e.identity = if n.cluster == self.cluster && n.name == self.node {
                    Identity::HOST.get()
                } else {
                    Identity::REMOTE_NODE.get()
                };
            }
        } else if let Some((_, c)) = self.ranges.iter().find(|(r, _)| r.contains(ip)) {
            e.kind = "unknown".into();
            e.cluster.clone_from(c);
        } else if identity & Identity::NODE_LOCAL != 0 {
            e.kind = "cidr".into();
        } else {
            e.kind = "world".into();
            if e.identity == 0 {
                e.identity = Identity::WORLD.get();
            }
        }
        if let Some(l) = self.labels.get(&e.identity) {
            e.labels.clone_from(l);
        }
        e
    }

    /// The enriched flow of one datapath event observed at `time_unix_nanos`
    /// (the event's monotonic time already turned into wall-clock time).
    pub fn flow(&self, ev: &FlowEvent, time_unix_nanos: u64, sequence: u64) -> Flow {
        let verdict = Verdict::ALL
            .into_iter()
            .find(|v| *v as u8 == ev.verdict)
            .unwrap_or(Verdict::DropInternal);
        let drop = ev.flags & FLOW_FLAG_DROP != 0;
        let audit = ev.flags & FLOW_FLAG_AUDIT != 0;
        let (event, word, reason) = if drop {
            ("drop", "dropped", strip(verdict.name()).to_owned())
        } else if audit {
            // The policy's would-be drop (its reason is not carried: a
            // denial, or an unknown peer the policy would have refused).
            ("audit", "audit", "policy_denied".to_owned())
        } else {
            ("trace", "forwarded", String::new())
        };
        let family = ev.family;
        let addr = |a: &[u8; 16]| -> IpAddr {
            let v6 = Ipv6Addr::from(*a);
            match (family, v6.to_ipv4_mapped()) {
                (4, Some(v4)) => IpAddr::V4(v4),
                _ => IpAddr::V6(v6),
            }
        };
        let ip_version = u32::from(if family == 4 || family == 6 {
            family
        } else {
            0
        });
        let (source, destination) = if ip_version == 0 {
            (None, None)
        } else {
            (
                Some(self.endpoint(addr(&ev.src), ev.src_identity)),
                Some(self.endpoint(addr(&ev.dst), ev.dst_identity)),
            )
        };
        let direction = if ev.direction == Direction::Ingress as u8 {
            "ingress"
        } else {
            "egress"
        };
        let (tunnel, encrypted) = tunnel_of(ev, verdict);
        let service = (ev.flags & FLOW_FLAG_TRANSLATED != 0).then(|| {
            let fe = addr(&ev.svc);
            let port = u16::from_be(ev.svc_port);
            let s = self.services.get(&(fe, port)).cloned().unwrap_or_default();
            FlowService {
                frontend: fe.to_string(),
                port: u32::from(port),
                cluster: s.cluster,
                namespace: s.namespace,
                name: s.name,
            }
        });
        Flow {
            time_unix_nanos,
            time: rfc3339(time_unix_nanos),
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            sequence,
            event: event.into(),
            verdict: word.into(),
            drop_reason: reason,
            disposition: disposition(verdict).into(),
            direction: direction.into(),
            ip_version,
            protocol: if ip_version == 0 {
                String::new()
            } else {
                protocol_name(ev.proto, ip_version)
            },
            source,
            destination,
            source_port: u32::from(u16::from_be(ev.sport)),
            destination_port: u32::from(u16::from_be(ev.dport)),
            encrypted,
            tunnel: tunnel.into(),
            service,
            packets: ev.packets,
            bytes: ev.bytes,
            interface: self
                .interfaces
                .get(&ev.ifindex)
                .cloned()
                .unwrap_or_default(),
        }
    }
}

fn strip(name: &str) -> &str {
    name.strip_prefix("drop_").unwrap_or(name)
}

/// What the datapath did, in one word.
fn disposition(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "host",
        Verdict::Local => "local",
        Verdict::Tunnel => "tunnel",
        Verdict::Routed => "routed",
        Verdict::Encrypted => "encrypted",
        Verdict::NeighbourReply => "neighbour_reply",
        Verdict::PolicyAudit => "policy_audit",
        other => strip(other.name()),
    }
}

/// The way between nodes the packet took (or arrived by), and whether it
/// is (was) inside WireGuard there.
fn tunnel_of(ev: &FlowEvent, v: Verdict) -> (&'static str, bool) {
    let mode = |m: u8| match m {
        x if x == TunnelMode::Vxlan as u8 => "vxlan",
        x if x == TunnelMode::Geneve as u8 => "geneve",
        x if x == TunnelMode::Direct as u8 => "direct",
        _ => "",
    };
    match ev.hook {
        FLOW_HOOK_ENDPOINT => match v {
            Verdict::Encrypted => ("wireguard", true),
            Verdict::Tunnel | Verdict::Routed => (mode(ev.mode), false),
            _ => ("", false),
        },
        FLOW_HOOK_OVERLAY => ("vxlan", false),
        FLOW_HOOK_UNDERLAY => (mode(ev.mode), false),
        FLOW_HOOK_WIREGUARD => ("wireguard", true),
        _ => ("", false),
    }
}

/// RFC 3339 (UTC, milliseconds) of Unix nanoseconds.
fn rfc3339(nanos: u64) -> String {
    clustermesh_api::time::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos))
}

/// An IPv4 address as the datapath's 16 bytes.
pub fn mapped(a: Ipv4Addr) -> [u8; 16] {
    a.to_ipv6_mapped().octets()
}
