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
    /// Frontend address -> a service on it (a reply's source).
    frontends: HashMap<IpAddr, Service>,
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
                        // A global service is in every cluster: the local
                        // record names it.
                        let local = s.cluster == *cluster;
                        let e = d.services.entry((*f, p.port));
                        if local || matches!(e, std::collections::hash_map::Entry::Vacant(_)) {
                            let svc = Service {
                                cluster: s.cluster.to_string(),
                                namespace: s.namespace.to_string(),
                                name: s.name.to_string(),
                            };
                            d.frontends.insert(*f, svc.clone());
                            e.insert_entry(svc);
                        }
                    }
                }
            }
        }
        d
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
        } else if let Some(s) = self.frontends.get(&ip) {
            // A service reply, its source put back to the frontend.
            e.kind = "service".into();
            e.cluster.clone_from(&s.cluster);
            e.namespace.clone_from(&s.namespace);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tunnel_common::{FLOW_FLAG_TRACE, IDENTITY_WORLD};

    fn records(cluster: &str, id: u8, node_ip: &str, pod_ip: &str, app: &str) -> Records {
        let mut r = Records::default();
        let n: NodeRecord = serde_json::from_value(serde_json::json!({
            "name": "node-1", "cluster": cluster, "underlayIps": [node_ip],
            "podCidrs": [format!("10.{id}.1.0/24")], "bootId": "b"
        }))
        .unwrap();
        r.nodes.insert(n.name.clone(), (n, 1));
        let identity = (u32::from(id) << 16) | 300;
        let e: EndpointRecord = serde_json::from_value(serde_json::json!({
            "ip": pod_ip, "cluster": cluster, "identity": identity, "hostIp": node_ip,
            "node": "node-1", "namespace": "default", "name": format!("{app}-0")
        }))
        .unwrap();
        r.endpoints.insert(e.ip, e);
        let i: clustermesh_api::records::IdentityRecord =
            serde_json::from_value(serde_json::json!({
                "id": identity, "cluster": cluster,
                "labels": {"k8s:app": app, "k8s:io.kubernetes.pod.namespace": "default"}
            }))
            .unwrap();
        r.identities.insert(i.id, i);
        r
    }

    fn dir() -> Directory {
        let c1 = records("c1", 1, "192.168.1.1", "10.1.1.5", "client");
        let mut c2 = records("c2", 2, "192.168.2.1", "10.2.1.5", "web");
        let s: clustermesh_api::records::ServiceRecord =
            serde_json::from_value(serde_json::json!({
                "cluster": "c2", "namespace": "default", "name": "echo",
                "frontends": ["10.96.0.10"],
                "ports": [{"protocol": "TCP", "port": 80, "targetPort": 8080}],
                "backends": [], "global": true, "shared": true
            }))
            .unwrap();
        c2.services.insert((s.namespace.clone(), s.name.clone()), s);
        Directory::build(&"c1".parse().unwrap(), Some("node-1"), [&c1, &c2])
    }

    fn ev(src: &str, dst: &str, verdict: Verdict, hook: u8) -> FlowEvent {
        FlowEvent {
            src: mapped(src.parse().unwrap()),
            dst: mapped(dst.parse().unwrap()),
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
            proto: 6,
            family: 4,
            hook,
            verdict: verdict as u8,
            mode: TunnelMode::Vxlan as u8,
            flags: if verdict.is_drop() {
                FLOW_FLAG_DROP
            } else {
                FLOW_FLAG_TRACE
            },
            direction: if hook == FLOW_HOOK_ENDPOINT {
                Direction::Egress as u8
            } else {
                Direction::Ingress as u8
            },
            packets: 3,
            bytes: 180,
            ..FlowEvent::default()
        }
    }

    #[test]
    fn pods_of_every_cluster_are_named_with_their_labels() {
        let f = dir().flow(
            &ev(
                "10.1.1.5",
                "10.2.1.5",
                Verdict::Encrypted,
                FLOW_HOOK_ENDPOINT,
            ),
            1,
            7,
        );
        let (s, d) = (f.source.clone().unwrap(), f.destination.clone().unwrap());
        assert_eq!(
            (s.kind.as_str(), s.cluster.as_str(), s.pod.as_str()),
            ("pod", "c1", "client-0")
        );
        assert_eq!(
            (d.kind.as_str(), d.cluster.as_str(), d.pod.as_str()),
            ("pod", "c2", "web-0")
        );
        assert_eq!((s.identity, d.identity), ((1 << 16) | 300, (2 << 16) | 300));
        assert!(
            d.labels.contains(&"k8s:app=web".to_owned()),
            "{:?}",
            d.labels
        );
        assert_eq!(d.namespace, "default");
        assert_eq!(
            (f.verdict.as_str(), f.disposition.as_str()),
            ("forwarded", "encrypted")
        );
        assert_eq!((f.tunnel.as_str(), f.encrypted), ("wireguard", true));
        assert_eq!(
            (f.source_port, f.destination_port, f.protocol.as_str()),
            (40000, 8080, "tcp")
        );
        assert_eq!((f.packets, f.bytes, f.sequence), (3, 180, 7));
        assert_eq!(
            (f.cluster.as_str(), f.node.as_str(), f.direction.as_str()),
            ("c1", "node-1", "egress")
        );
    }

    #[test]
    fn a_remote_node_is_a_node_never_world_and_strangers_are_world() {
        let d = dir();
        let f = d.flow(
            &ev("192.168.2.1", "10.1.1.5", Verdict::Local, FLOW_HOOK_OVERLAY),
            1,
            1,
        );
        let s = f.source.unwrap();
        assert_eq!(
            (s.kind.as_str(), s.cluster.as_str(), s.node.as_str()),
            ("node", "c2", "node-1")
        );
        assert_eq!(s.identity, Identity::REMOTE_NODE.get());
        assert_eq!((f.tunnel.as_str(), f.encrypted), ("vxlan", false));
        let own = d.flow(
            &ev(
                "192.168.1.1",
                "10.1.1.5",
                Verdict::Local,
                FLOW_HOOK_UNDERLAY,
            ),
            1,
            1,
        );
        assert_eq!(own.source.unwrap().identity, Identity::HOST.get());
        let w = d.flow(
            &ev("10.1.1.5", "8.8.8.8", Verdict::Pass, FLOW_HOOK_ENDPOINT),
            1,
            1,
        );
        let dst = w.destination.unwrap();
        assert_eq!((dst.kind.as_str(), dst.identity), ("world", IDENTITY_WORLD));
        assert_eq!((w.disposition.as_str(), w.tunnel.as_str()), ("host", ""));
        // In a declared pod range, no endpoint yet.
        let u = d.flow(
            &ev(
                "10.1.1.5",
                "10.2.1.77",
                Verdict::DropStrictUnknownDest,
                FLOW_HOOK_ENDPOINT,
            ),
            1,
            1,
        );
        let dst = u.destination.unwrap();
        assert_eq!((dst.kind.as_str(), dst.cluster.as_str()), ("unknown", "c2"));
        assert_eq!(
            (u.verdict.as_str(), u.drop_reason.as_str()),
            ("dropped", "strict_unknown_dest")
        );
    }

    #[test]
    fn a_translated_flow_names_its_service() {
        let mut e = ev("10.1.1.5", "10.2.1.5", Verdict::Tunnel, FLOW_HOOK_ENDPOINT);
        e.flags |= FLOW_FLAG_TRANSLATED;
        e.svc = mapped("10.96.0.10".parse().unwrap());
        e.svc_port = 80u16.to_be();
        let f = dir().flow(&e, 1, 1);
        // The reply, its source put back to the frontend by the datapath.
        let r = dir().flow(
            &ev(
                "10.96.0.10",
                "10.1.1.5",
                Verdict::Local,
                FLOW_HOOK_WIREGUARD,
            ),
            1,
            1,
        );
        let rs = r.source.unwrap();
        assert_eq!(
            (rs.kind.as_str(), rs.namespace.as_str()),
            ("service", "default")
        );
        let s = f.service.unwrap();
        assert_eq!(
            (
                s.frontend.as_str(),
                s.port,
                s.name.as_str(),
                s.namespace.as_str()
            ),
            ("10.96.0.10", 80, "echo", "default")
        );
        assert_eq!(
            (f.tunnel.as_str(), f.disposition.as_str()),
            ("vxlan", "tunnel")
        );
        // A policy audit: passed, reported as the would-be drop.
        let mut a = ev("10.2.1.5", "10.1.1.5", Verdict::Local, FLOW_HOOK_WIREGUARD);
        a.flags = FLOW_FLAG_AUDIT;
        let f = dir().flow(&a, 1, 1);
        assert_eq!(
            (f.event.as_str(), f.verdict.as_str(), f.drop_reason.as_str()),
            ("audit", "audit", "policy_denied")
        );
        assert_eq!(
            (f.tunnel.as_str(), f.encrypted, f.direction.as_str()),
            ("wireguard", true, "ingress")
        );
    }

    #[test]
    fn ipv6_and_non_ip_events() {
        let mut e = ev(
            "10.1.1.5",
            "10.2.1.5",
            Verdict::DropSpoofed,
            FLOW_HOOK_ENDPOINT,
        );
        e.family = 6;
        e.src = "fd00:10:1:1::5".parse::<Ipv6Addr>().unwrap().octets();
        e.dst = "fd00:10:2:1::5".parse::<Ipv6Addr>().unwrap().octets();
        e.proto = 58;
        let f = dir().flow(&e, 1, 1);
        assert_eq!((f.ip_version, f.protocol.as_str()), (6, "icmpv6"));
        assert_eq!(f.source.unwrap().ip, "fd00:10:1:1::5");
        let mut n = ev(
            "10.1.1.5",
            "10.2.1.5",
            Verdict::DropUnsupportedL3,
            FLOW_HOOK_ENDPOINT,
        );
        n.family = 0;
        let f = dir().flow(&n, 1, 1);
        assert_eq!(
            (f.ip_version, f.source.is_none(), f.drop_reason.as_str()),
            (0, true, "unsupported_l3")
        );
    }
}
