//! The pure merge of every cluster's records into the node's desired
//! datapath state. No IO, no clock: the same input gives the same output,
//! which the table tests pin down.
//!
//! Rules that span records and clusters live here, because only the merge
//! sees all clusters:
//! - **Admission** ([`super::admission`]): a remote node's pod CIDRs and
//!   underlay addresses are bounded (prefix lengths, reserved ranges, never
//!   covering a node's address), underlay addresses and WireGuard keys are
//!   unique across every node of every cluster, and a remote endpoint may
//!   not claim a reserved identity.
//! - **CIDR ownership**: a node is accepted only if none of its pod CIDRs
//!   overlaps a pod CIDR already accepted for another node. The local
//!   cluster's nodes are accepted first, then remote ones in the order this
//!   agent first accepted them (an established cluster's ranges cannot be
//!   taken over by a newcomer). A refused node contributes nothing.
//! - **Identity ownership**: a remote cluster's endpoint or identity must
//!   carry that cluster's id in bits 16-23; reserved identities only for
//!   the local cluster's endpoints.
//! - **Endpoints and backends** must lie inside an accepted pod CIDR of their
//!   own cluster.
//! - **Global services**: a local service gets remote backends only when it is
//!   global here and the remote's same-named service is global and shared,
//!   with the same ports. Backends keep their state (ready, terminating,
//!   not ready): which ones get new flows is the load-balancer's choice
//!   (`datapath::services::select`). Two local services may not share a
//!   frontend (address, port, protocol): the later one (by name) is
//!   refused.
//!
//! Everything refused is listed in [`Desired::rejected`] with a reason.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use clustermesh_api::{
    ClusterId, ClusterName, EncryptionMode, EncryptionPolicy, EncryptionScope, EndpointRecord,
    Identity, IpCidr, K8sName, NodeName, Protocol, ServiceRecord,
};

use super::{admission::Admitted, prefixes::PrefixMap, store::Records};
use crate::desired::{
    Desired, IpCacheEntry, MergedBackend, MergedService, Peer, Rejection, TunnelEntry,
};

pub const DEFAULT_WG_PORT: u16 = 51871;

/// One cluster's input to the merge.
#[derive(Debug, Clone, Copy)]
pub struct ClusterInput<'a> {
    pub name: &'a ClusterName,
    pub id: ClusterId,
    pub records: &'a Records,
    /// The pod ranges the cluster's remote-cluster file declares (empty:
    /// none declared; never bounds the local cluster).
    pub declared: &'a [IpCidr],
}

#[derive(Debug, Clone, Copy)]
pub struct MergeInput<'a> {
    pub local: ClusterInput<'a>,
    /// This node (excluded from tunnels and peers).
    pub self_node: Option<&'a NodeName>,
    /// The local cluster's encryption policy.
    pub encryption: EncryptionPolicy,
    pub remotes: &'a [ClusterInput<'a>],
    /// Pod CIDRs held now, with the id of the cluster holding each (seeded
    /// from the pinned tunnel entries, so it survives agent restarts): a
    /// remote node claiming a range another cluster holds is refused, even
    /// while the holder has not synced yet; the holder releases it by
    /// syncing without it (or by being removed).
    pub incumbents: &'a BTreeMap<IpCidr, u8>,
    /// The ranges whose holder may differ from the last update's (the
    /// incremental merge then compares only those), or None: any may.
    /// The full merge does not read it.
    pub incumbents_changed: Option<&'a std::collections::BTreeSet<IpCidr>>,
}

fn encrypt_to(policy: &EncryptionPolicy, local: bool) -> bool {
    policy.mode == EncryptionMode::Wireguard && (policy.scope == EncryptionScope::All || !local)
}

fn port_set(s: &ServiceRecord) -> Vec<(Option<String>, Protocol, u16)> {
    let mut v: Vec<_> = s
        .ports
        .iter()
        .map(|p| (p.name.as_ref().map(ToString::to_string), p.protocol, p.port))
        .collect();
    v.sort();
    v
}

/// The accepted node whose pod CIDR holds an address (the CIDR-ownership
/// index: accepted pod CIDRs never overlap across nodes, so every prefix
/// holding an address belongs to one node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub cluster: ClusterName,
    pub local: bool,
    pub node: NodeName,
    pub underlay_ips: Vec<IpAddr>,
}

/// Accepted pod CIDR -> the node holding it.
pub type Owners = PrefixMap<Owner>;

/// The accepted node whose pod CIDR holds `ip`.
pub fn owner_of(owners: &Owners, ip: IpAddr) -> Option<&Owner> {
    owners.containing(ip).next().map(|(_, o)| o)
}

/// The underlay address traffic to `dest` (a pod or pod range of a node
/// with these underlay addresses) is tunnelled or routed to: the node's
/// address of the same family when it has one (an IPv6 route needs an
/// IPv6 gateway), else its first.
fn underlay_for(underlay_ips: &[IpAddr], dest: IpAddr) -> Option<IpAddr> {
    underlay_ips
        .iter()
        .find(|u| u.is_ipv4() == dest.is_ipv4())
        .or(underlay_ips.first())
        .copied()
}

/// Every cluster in merge order: the local one first, then the remotes
/// (by name), each with whether it is the local one.
pub fn clusters<'a>(input: &'a MergeInput<'a>) -> Vec<(bool, &'a ClusterInput<'a>)> {
    std::iter::once((true, &input.local))
        .chain(input.remotes.iter().map(|r| (false, r)))
        .collect()
}

pub fn merge(input: &MergeInput<'_>) -> Desired {
    let mut out = Desired::default();
    out.policy.insert((), input.encryption);
    let nodes = merge_nodes(input);
    out.tunnels = nodes.tunnels;
    out.peers = nodes.peers;
    out.ipcache = nodes.ipcache;
    out.rejected = nodes.rejected;
    for (local, c) in clusters(input) {
        out.rejected.extend(identity_rejections(c));
        for rec in c.records.endpoints.values() {
            match endpoint_entry(input, c, local, rec, &nodes.owners) {
                Ok(e) => {
                    out.ipcache.insert(IpCidr::host(rec.ip), e);
                }
                Err(r) => out.rejected.push(r),
            }
        }
    }
    let services = merge_services(input, &nodes.owners);
    out.services = services.services;
    out.rejected
        .extend(services.rejected.into_values().flatten());
    out.network_policies = super::policy::merge_policies(input);
    out.policy_cidrs = super::policy::merge_policy_cidrs(input);
    out
}

/// A remote node's pod CIDR that overlaps a range another cluster holds
/// (incumbent), in words.
pub fn held_by_other(
    incumbents: &PrefixMap<u8>,
    id: u8,
    rec: &clustermesh_api::NodeRecord,
) -> Option<String> {
    rec.pod_cidrs.iter().find_map(|p| {
        incumbents
            .overlapping(p)
            .find(|(_, owner)| **owner != id)
            .map(|(c, owner)| {
                format!(
                    "pod CIDR {p} overlaps {c}, which the datapath routes for cluster id {owner}"
                )
            })
    })
}

/// What the nodes of every cluster give: tunnels, remote nodes' ip-cache
/// entries, WireGuard peers, and who owns which pod CIDR.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NodeSection {
    pub tunnels: BTreeMap<IpCidr, TunnelEntry>,
    /// The remote nodes' underlay addresses (endpoints' entries win).
    pub ipcache: BTreeMap<IpCidr, IpCacheEntry>,
    pub peers: BTreeMap<String, Peer>,
    pub owners: Owners,
    pub rejected: Vec<Rejection>,
}

/// 1. Nodes and CIDR ownership: tunnels, remote nodes' ip-cache entries,
///    WireGuard peers. O(nodes x log nodes): admission is indexed.
pub fn merge_nodes(input: &MergeInput<'_>) -> NodeSection {
    let all = clusters(input);
    let incumbents: PrefixMap<u8> = input.incumbents.iter().map(|(c, id)| (*c, *id)).collect();
    let mut candidates: Vec<(bool, u64, &ClusterInput<'_>, &clustermesh_api::NodeRecord)> =
        Vec::new();
    for (local, c) in &all {
        for (rec, seq) in c.records.nodes.values() {
            candidates.push((*local, *seq, c, rec));
        }
    }
    // Local first; then the nodes whose ranges the datapath routes to their
    // own cluster now (incumbents: an order every restart sees the same);
    // then by first acceptance, then by name for determinism.
    let incumbent = |c: &ClusterInput<'_>, rec: &clustermesh_api::NodeRecord| {
        rec.pod_cidrs
            .iter()
            .any(|p| input.incumbents.get(p) == Some(&c.id.get()))
    };
    candidates.sort_by_cached_key(|(local, seq, c, rec)| {
        (
            std::cmp::Reverse(*local),
            std::cmp::Reverse(incumbent(c, rec)),
            *seq,
            c.name,
            &rec.name,
        )
    });
    let mut admitted = Admitted::default();
    for c in input.remotes {
        admitted.declare(c.name, c.declared);
    }
    for (_, _, c, rec) in &candidates {
        admitted.offer(rec, c.name);
    }
    let mut out = NodeSection::default();
    for (local, _, c, rec) in candidates {
        if let Some(r) = verdict(&admitted, &incumbents, local, c, rec) {
            out.rejected.push(r);
            continue;
        }
        admitted.admit(rec, c.name);
        add_node(input, &mut out, local, c, rec);
    }
    out
}

/// Why `rec` is refused against what is admitted (None: accepted).
fn verdict(
    admitted: &Admitted<'_>,
    incumbents: &PrefixMap<u8>,
    local: bool,
    c: &ClusterInput<'_>,
    rec: &clustermesh_api::NodeRecord,
) -> Option<Rejection> {
    let refused = match admitted.check(rec, c.name, local) {
        Err(r) => Some((r.reason, r.detail)),
        Ok(()) if !local => held_by_other(incumbents, c.id.get(), rec).map(|d| ("cidr_overlap", d)),
        Ok(()) => None,
    };
    refused.map(|(reason, detail)| Rejection {
        cluster: c.name.clone(),
        record: format!("node {}", rec.name),
        reason,
        detail,
    })
}

/// The verdict on a node that shares no range, address or key with any
/// other node offered (see `incremental`): its own bounds decide.
pub fn lone_verdict(
    incumbents: &PrefixMap<u8>,
    local: bool,
    c: &ClusterInput<'_>,
    rec: &clustermesh_api::NodeRecord,
) -> Option<Rejection> {
    let mut a = Admitted::default();
    if !local {
        a.declare(c.name, c.declared);
    }
    a.offer(rec, c.name);
    verdict(&a, incumbents, local, c, rec)
}

/// Takes back what [`add_node`] gave for `rec` of `cluster` (and its
/// refusal, if it was refused).
pub fn remove_node(
    out: &mut NodeSection,
    cluster: &ClusterName,
    local: bool,
    rec: &clustermesh_api::NodeRecord,
) {
    let record = format!("node {}", rec.name);
    out.rejected
        .retain(|r| !(r.cluster == *cluster && r.record == record));
    for cidr in &rec.pod_cidrs {
        if out
            .owners
            .get(cidr)
            .is_some_and(|o| o.cluster == *cluster && o.node == rec.name)
        {
            out.owners.remove(cidr);
            out.tunnels.remove(cidr);
        }
    }
    if !local {
        for ip in &rec.underlay_ips {
            out.ipcache.remove(&IpCidr::host(*ip));
        }
    }
    out.peers.remove(&format!("{cluster}/{}", rec.name));
}

/// An accepted node's contribution to the [`NodeSection`].
pub fn add_node(
    input: &MergeInput<'_>,
    out: &mut NodeSection,
    local: bool,
    c: &ClusterInput<'_>,
    rec: &clustermesh_api::NodeRecord,
) {
    for cidr in &rec.pod_cidrs {
        if out.owners.get(cidr).is_none() {
            out.owners.insert(
                *cidr,
                Owner {
                    cluster: c.name.clone(),
                    local,
                    node: rec.name.clone(),
                    underlay_ips: rec.underlay_ips.clone(),
                },
            );
        }
    }
    if local && input.self_node == Some(&rec.name) {
        return;
    }
    let Some(node_ip) = rec.underlay_ips.first().copied() else {
        return;
    };
    for cidr in &rec.pod_cidrs {
        out.tunnels.insert(
            *cidr,
            TunnelEntry {
                node_ip: underlay_for(&rec.underlay_ips, cidr.addr()).unwrap_or(node_ip),
                cluster_id: c.id.get(),
                node: rec.name.clone(),
                encrypt: encrypt_to(&input.encryption, local),
            },
        );
    }
    if !local {
        // Every underlay address of the node (both families of a
        // dual-stack underlay) is a remote node.
        for ip in &rec.underlay_ips {
            out.ipcache.insert(
                IpCidr::host(*ip),
                IpCacheEntry {
                    identity: Identity::REMOTE_NODE,
                    cluster_id: c.id.get(),
                    tunnel_endpoint: Some(*ip),
                    encrypt: input.encryption.node_to_node && encrypt_to(&input.encryption, local),
                },
            );
        }
    }
    if encrypt_to(&input.encryption, local)
        && let Some(key) = rec.wireguard_public_keys.first()
    {
        let mut allowed = rec.pod_cidrs.clone();
        if input.encryption.node_to_node {
            allowed.extend(rec.underlay_ips.iter().map(|ip| IpCidr::host(*ip)));
        }
        out.peers.insert(
            format!("{}/{}", c.name, rec.name),
            Peer {
                public_key: *key,
                endpoint: SocketAddr::new(node_ip, rec.wireguard_port.unwrap_or(DEFAULT_WG_PORT)),
                allowed_ips: allowed,
            },
        );
    }
}

/// 2a. A cluster's identities that do not carry its cluster id.
pub fn identity_rejections(c: &ClusterInput<'_>) -> Vec<Rejection> {
    c.records
        .identities
        .values()
        .filter(|rec| rec.id.cluster() != Some(c.id))
        .map(|rec| Rejection {
            cluster: c.name.clone(),
            record: format!("identity {}", rec.id),
            reason: "identity_cluster_bits",
            detail: format!("identity {} does not carry cluster id {}", rec.id, c.id),
        })
        .collect()
}

/// 2b. One endpoint record of cluster `c`: its ip-cache entry, or why it
/// is refused. O(distinct pod-CIDR lengths x log nodes).
pub fn endpoint_entry(
    input: &MergeInput<'_>,
    c: &ClusterInput<'_>,
    local: bool,
    rec: &EndpointRecord,
    owners: &Owners,
) -> Result<IpCacheEntry, Rejection> {
    let refuse = |reason: &'static str, detail: String| Rejection {
        cluster: c.name.clone(),
        record: format!("endpoint {}", rec.ip),
        reason,
        detail,
    };
    // A remote cluster never speaks for a reserved identity (host,
    // world, remote-node...): only for its own cluster-scoped ones.
    if !local && rec.identity.is_reserved() {
        return Err(refuse(
            "reserved_identity",
            format!(
                "a remote cluster may not claim the reserved identity {}",
                rec.identity
            ),
        ));
    }
    if !rec.identity.is_reserved() && rec.identity.cluster() != Some(c.id) {
        return Err(refuse(
            "identity_cluster_bits",
            format!(
                "identity {} does not carry cluster id {}",
                rec.identity, c.id
            ),
        ));
    }
    let Some(node) = owner_of(owners, rec.ip).filter(|o| o.cluster == *c.name) else {
        return Err(refuse(
            "endpoint_outside_cluster_cidrs",
            format!(
                "{} is not inside an accepted pod CIDR of cluster {}",
                rec.ip, c.name
            ),
        ));
    };
    let on_self = local && Some(&node.node) == input.self_node;
    // The host's underlay address of the endpoint's family when the
    // record names one of another family (a dual-stack node registers
    // one host address for both of a pod's).
    let tunnel_endpoint = if rec.host_ip.is_ipv4() != rec.ip.is_ipv4() {
        underlay_for(&node.underlay_ips, rec.ip).unwrap_or(rec.host_ip)
    } else {
        rec.host_ip
    };
    Ok(IpCacheEntry {
        identity: rec.identity,
        cluster_id: c.id.get(),
        tunnel_endpoint: if on_self { None } else { Some(tunnel_endpoint) },
        encrypt: !on_self && encrypt_to(&input.encryption, local),
    })
}

/// Local service (namespace, name).
pub type ServiceKey = (K8sName, K8sName);

/// What the local services give.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ServiceSection {
    pub services: BTreeMap<String, MergedService>,
    /// Refusals, by the local service they concern.
    pub rejected: BTreeMap<ServiceKey, Vec<Rejection>>,
    /// The local services whose frontends are their own (not refused for
    /// a frontend another local service has).
    pub accepted: std::collections::BTreeSet<ServiceKey>,
}

/// The desired-state key of a local service.
pub fn service_name(key: &ServiceKey) -> String {
    format!("{}/{}", key.0, key.1)
}

/// 3. Services: local ones, with remote backends for global services.
pub fn merge_services(input: &MergeInput<'_>, owners: &Owners) -> ServiceSection {
    let mut out = ServiceSection::default();
    let mut frontends: BTreeMap<(IpAddr, Protocol, u16), String> = BTreeMap::new();
    for (key, svc) in &input.local.records.services {
        let name = service_name(key);
        let taken = svc.frontends.iter().find_map(|ip| {
            svc.ports.iter().find_map(|p| {
                frontends
                    .get(&(*ip, p.protocol, p.port))
                    .map(|o| (ip, p, o))
            })
        });
        if let Some((ip, p, other)) = taken {
            out.rejected
                .entry(key.clone())
                .or_default()
                .push(Rejection {
                    cluster: input.local.name.clone(),
                    record: format!("service {name}"),
                    reason: "service_frontend_conflict",
                    detail: format!(
                        "{ip}:{}/{} is already the frontend of service {other}",
                        p.port, p.protocol
                    ),
                });
            continue;
        }
        for ip in &svc.frontends {
            for p in &svc.ports {
                frontends.insert((*ip, p.protocol, p.port), name.clone());
            }
        }
        let (merged, rejected) = merge_service(input, key, svc, owners);
        if !rejected.is_empty() {
            out.rejected.insert(key.clone(), rejected);
        }
        out.accepted.insert(key.clone());
        out.services.insert(name, merged);
    }
    out
}

/// 3b. One accepted local service with the backends of every cluster
/// that shares it. O(clusters).
pub fn merge_service(
    input: &MergeInput<'_>,
    key: &ServiceKey,
    svc: &ServiceRecord,
    owners: &Owners,
) -> (MergedService, Vec<Rejection>) {
    let name = service_name(key);
    let mut rejected = Vec::new();
    let mut backends = Vec::new();
    let mut take = |cluster: &ClusterName, s: &ServiceRecord, rejected: &mut Vec<Rejection>| {
        for b in &s.backends {
            if owner_of(owners, b.ip).is_none_or(|o| o.cluster != *cluster) {
                rejected.push(Rejection {
                    cluster: cluster.clone(),
                    record: format!("service {name} backend {}", b.ip),
                    reason: "backend_outside_cluster_cidrs",
                    detail: format!(
                        "{} is not inside an accepted pod CIDR of cluster {cluster}",
                        b.ip
                    ),
                });
                continue;
            }
            backends.push(MergedBackend {
                ip: b.ip,
                cluster: cluster.clone(),
                state: b.state,
            });
        }
    };
    take(input.local.name, svc, &mut rejected);
    if svc.global {
        for r in input.remotes {
            let Some(rs) = r.records.services.get(key) else {
                continue;
            };
            if !rs.global || !rs.shared {
                continue;
            }
            if port_set(rs) != port_set(svc) {
                rejected.push(Rejection {
                    cluster: r.name.clone(),
                    record: format!("service {name}"),
                    reason: "service_port_conflict",
                    detail: "its ports differ from the local service's".into(),
                });
                continue;
            }
            take(r.name, rs, &mut rejected);
        }
    }
    let merged = MergedService {
        frontends: svc.frontends.clone(),
        ports: svc
            .ports
            .iter()
            .map(|p| (p.protocol, p.port, p.target_port))
            .collect(),
        affinity: svc.affinity,
        backends,
    };
    (merged, rejected)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clustermesh_api::{
        Backend, ClusterId, EndpointRecord, IdentityRecord, K8sName, Labels, NodeRecord,
        ServicePort,
    };

    use clustermesh_api::{Affinity, BackendState, WgPublicKey};

    use super::*;

    fn key(b: u8) -> WgPublicKey {
        WgPublicKey::from_bytes([b; 32]).unwrap()
    }

    fn node(r: &mut Records, seq: u64, cluster: &str, name: &str, cidr: &str, ip: &str) {
        let rec = NodeRecord {
            name: name.parse().unwrap(),
            cluster: cluster.parse().unwrap(),
            underlay_ips: vec![ip.parse().unwrap()],
            pod_cidrs: vec![cidr.parse().unwrap()],
            wireguard_public_keys: vec![key(seq as u8 + 10)],
            wireguard_port: None,
            boot_id: "b".parse().unwrap(),
        };
        r.nodes.insert(rec.name.clone(), (rec, seq));
    }

    fn ep(r: &mut Records, cluster: &str, ip: &str, identity: u32, host: &str) {
        let rec = EndpointRecord {
            ip: ip.parse().unwrap(),
            cluster: cluster.parse().unwrap(),
            identity: Identity::from_raw(identity.into()).unwrap(),
            host_ip: host.parse().unwrap(),
            node: None,
            namespace: None,
            name: None,
        };
        r.endpoints.insert(rec.ip, rec);
    }

    fn svc(
        r: &mut Records,
        cluster: &str,
        global: bool,
        shared: bool,
        backends: &[(&str, BackendState)],
    ) {
        let rec = ServiceRecord {
            cluster: cluster.parse().unwrap(),
            namespace: "default".parse().unwrap(),
            name: "web".parse().unwrap(),
            frontends: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: None,
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
            }],
            backends: backends
                .iter()
                .map(|(ip, state)| Backend {
                    ip: ip.parse().unwrap(),
                    cluster: cluster.parse().unwrap(),
                    state: *state,
                    node: None,
                })
                .collect(),
            global,
            shared,
            affinity: Affinity::Local,
        };
        r.services
            .insert((rec.namespace.clone(), rec.name.clone()), rec);
    }

    fn wg(scope: EncryptionScope) -> EncryptionPolicy {
        EncryptionPolicy {
            mode: EncryptionMode::Wireguard,
            scope,
            ..Default::default()
        }
    }

    struct World {
        names: Vec<ClusterName>,
        recs: Vec<Records>,
        incumbents: BTreeMap<IpCidr, u8>,
    }

    impl World {
        fn new(n: usize) -> Self {
            Self {
                names: (1..=n).map(|i| format!("c{i}").parse().unwrap()).collect(),
                recs: vec![Records::default(); n],
                incumbents: BTreeMap::new(),
            }
        }
        fn merge(&self, enc: EncryptionPolicy) -> Desired {
            let inputs: Vec<ClusterInput<'_>> = (0..self.names.len())
                .map(|i| ClusterInput {
                    name: &self.names[i],
                    id: ClusterId::new(i as u64 + 1).unwrap(),
                    records: &self.recs[i],
                    declared: &[],
                })
                .collect();
            let self_node: NodeName = "n1".parse().unwrap();
            merge(&MergeInput {
                local: inputs[0],
                self_node: Some(&self_node),
                encryption: enc,
                remotes: &inputs[1..],
                incumbents: &self.incumbents,
                incumbents_changed: None,
            })
        }
    }

    fn cidr(s: &str) -> IpCidr {
        s.parse().unwrap()
    }

    #[test]
    fn dual_stack_nodes_are_reached_over_the_family_of_each_destination() {
        let mut w = World::new(2);
        node(&mut w.recs[0], 1, "c1", "n1", "10.1.0.0/24", "192.0.2.1");
        node(&mut w.recs[1], 3, "c2", "m1", "10.2.0.0/24", "192.0.2.11");
        {
            let m1 = &mut w.recs[1].nodes.values_mut().next().unwrap().0;
            m1.underlay_ips.push("2001:db8::11".parse().unwrap());
            m1.pod_cidrs.push(cidr("fd00:10:2::/64"));
        }
        // An IPv6-only node carrying an IPv4 range too.
        node(
            &mut w.recs[1],
            4,
            "c2",
            "m2",
            "fd00:10:3::/64",
            "2001:db8::12",
        );
        w.recs[1]
            .nodes
            .get_mut(&"m2".parse::<NodeName>().unwrap())
            .unwrap()
            .0
            .pod_cidrs
            .push(cidr("10.2.1.0/24"));
        // The pod registered both addresses with the node's IPv4 host address.
        ep(
            &mut w.recs[1],
            "c2",
            "10.2.0.5",
            (2 << 16) | 300,
            "192.0.2.11",
        );
        ep(
            &mut w.recs[1],
            "c2",
            "fd00:10:2::5",
            (2 << 16) | 300,
            "192.0.2.11",
        );
        let d = w.merge(wg(EncryptionScope::All));
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        let via = |c: &str| d.tunnels[&cidr(c)].node_ip.to_string();
        assert_eq!(via("10.2.0.0/24"), "192.0.2.11");
        assert_eq!(via("fd00:10:2::/64"), "2001:db8::11");
        assert_eq!(via("fd00:10:3::/64"), "2001:db8::12");
        // No IPv4 underlay: the IPv4 range goes over IPv6.
        assert_eq!(via("10.2.1.0/24"), "2001:db8::12");
        let tep = |c: &str| d.ipcache[&cidr(c)].tunnel_endpoint.map(|t| t.to_string());
        assert_eq!(tep("10.2.0.5/32").as_deref(), Some("192.0.2.11"));
        assert_eq!(tep("fd00:10:2::5/128").as_deref(), Some("2001:db8::11"));
        // Both underlay addresses are the remote node.
        for ip in ["192.0.2.11/32", "2001:db8::11/128"] {
            assert_eq!(d.ipcache[&cidr(ip)].identity, Identity::REMOTE_NODE, "{ip}");
        }
        let peer = &d.peers["c2/m1"];
        assert!(peer.allowed_ips.contains(&cidr("fd00:10:2::/64")));
        assert_eq!(peer.endpoint.ip().to_string(), "192.0.2.11");
        assert_eq!(d.peers["c2/m2"].endpoint.ip().to_string(), "2001:db8::12");
    }

    #[test]
    fn tunnels_ipcache_and_peers() {
        let mut w = World::new(2);
        node(&mut w.recs[0], 1, "c1", "n1", "10.1.0.0/24", "192.0.2.1");
        node(&mut w.recs[0], 2, "c1", "n2", "10.1.1.0/24", "192.0.2.2");
        node(&mut w.recs[1], 3, "c2", "m1", "10.2.0.0/24", "192.0.2.11");
        ep(
            &mut w.recs[0],
            "c1",
            "10.1.0.5",
            (1 << 16) | 300,
            "192.0.2.1",
        );
        ep(
            &mut w.recs[0],
            "c1",
            "10.1.1.5",
            (1 << 16) | 301,
            "192.0.2.2",
        );
        ep(
            &mut w.recs[1],
            "c2",
            "10.2.0.5",
            (2 << 16) | 300,
            "192.0.2.11",
        );
        let d = w.merge(wg(EncryptionScope::All));
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        // No tunnel to ourselves; one per other node's pod CIDR.
        assert_eq!(
            d.tunnels.keys().copied().collect::<Vec<_>>(),
            vec![cidr("10.1.1.0/24"), cidr("10.2.0.0/24")]
        );
        assert_eq!(
            d.tunnels[&cidr("10.2.0.0/24")].node_ip.to_string(),
            "192.0.2.11"
        );
        assert_eq!(d.tunnels[&cidr("10.2.0.0/24")].cluster_id, 2);
        // ip-cache: local endpoint on this node has no tunnel and no encryption.
        let mine = d.ipcache[&cidr("10.1.0.5/32")];
        assert_eq!((mine.tunnel_endpoint, mine.encrypt), (None, false));
        let other = d.ipcache[&cidr("10.2.0.5/32")];
        assert_eq!(other.tunnel_endpoint.unwrap().to_string(), "192.0.2.11");
        assert!(other.encrypt);
        assert_eq!(other.identity.get(), (2 << 16) | 300);
        assert_eq!(
            d.ipcache[&cidr("192.0.2.11/32")].identity,
            Identity::REMOTE_NODE
        );
        // Peers: every other node with a key, allowed IPs = its pod CIDRs.
        assert_eq!(
            d.peers.keys().cloned().collect::<Vec<_>>(),
            vec!["c1/n2".to_owned(), "c2/m1".to_owned()]
        );
        assert_eq!(d.peers["c2/m1"].endpoint.port(), DEFAULT_WG_PORT);
        assert_eq!(d.peers["c2/m1"].allowed_ips, vec![cidr("10.2.0.0/24")]);
        // Inter-cluster scope: only remote peers; local traffic unencrypted.
        let d = w.merge(wg(EncryptionScope::InterCluster));
        assert_eq!(
            d.peers.keys().cloned().collect::<Vec<_>>(),
            vec!["c2/m1".to_owned()]
        );
        assert!(!d.ipcache[&cidr("10.1.1.5/32")].encrypt);
        // No encryption: no peers, nothing encrypted.
        let d = w.merge(EncryptionPolicy::default());
        assert!(d.peers.is_empty() && d.ipcache.values().all(|e| !e.encrypt));
    }

    /// Issue 16: a remote cluster publishing another remote's range. Both
    /// nodes are first accepted at the same count (an agent that just
    /// restarted re-reads every cluster at once): the name order alone
    /// would hand c3's range to c2. The range the datapath routes to c3
    /// (incumbent) stays c3's; with no incumbent the older claim wins.
    #[test]
    fn a_remote_cannot_take_over_another_remotes_range_across_restarts() {
        let mut w = World::new(3);
        node(&mut w.recs[0], 1, "c1", "n1", "10.1.0.0/24", "192.0.2.1");
        node(&mut w.recs[1], 1, "c2", "evil", "10.3.0.0/24", "192.0.2.11");
        node(&mut w.recs[2], 1, "c3", "x1", "10.3.0.0/24", "192.0.2.21");
        // Same count, so give each node its own key.
        for (i, r) in w.recs.iter_mut().enumerate() {
            for (rec, _) in r.nodes.values_mut() {
                rec.wireguard_public_keys = vec![key(50 + i as u8)];
            }
        }
        let enc = EncryptionPolicy::default();
        // Without an incumbent (first start), the tie goes by name: c2.
        assert_eq!(w.merge(enc).tunnels[&cidr("10.3.0.0/24")].cluster_id, 2);
        // The datapath routes the range to c3 (it held it before the
        // restart): c3 keeps it, c2's claim is refused.
        w.incumbents.insert(cidr("10.3.0.0/24"), 3);
        let d = w.merge(enc);
        assert_eq!(d.tunnels[&cidr("10.3.0.0/24")].node.to_string(), "x1");
        assert!(
            d.rejected
                .iter()
                .any(|r| r.cluster.to_string() == "c2" && r.reason == "cidr_overlap")
        );
        // ... also while c3 has not synced yet (its node not read yet).
        let x1 = w.recs[2].nodes.clone();
        w.recs[2].nodes.clear();
        let d = w.merge(enc);
        assert!(!d.tunnels.contains_key(&cidr("10.3.0.0/24")));
        w.recs[2].nodes = x1;
        // An incumbent never beats the local cluster.
        node(&mut w.recs[0], 2, "c1", "n2", "10.3.0.0/25", "192.0.2.2");
        for (rec, _) in w.recs[0].nodes.values_mut() {
            if rec.name.to_string() == "n2" {
                rec.wireguard_public_keys = vec![key(60)];
            }
        }
        let d = w.merge(enc);
        assert_eq!(d.tunnels[&cidr("10.3.0.0/25")].node.to_string(), "n2");
        assert!(!d.tunnels.contains_key(&cidr("10.3.0.0/24")));
    }

    #[test]
    fn rejections() {
        let mut w = World::new(3);
        node(&mut w.recs[0], 1, "c1", "n1", "10.1.0.0/16", "192.0.2.1");
        // c2 overlaps the local cluster: refused, whatever its age.
        node(&mut w.recs[1], 0, "c2", "m1", "10.1.5.0/24", "192.0.2.11");
        node(&mut w.recs[1], 5, "c2", "m2", "10.2.0.0/24", "192.0.2.12");
        // c3 overlaps c2's m2, but c2's claim is older: c3's node is refused.
        node(&mut w.recs[2], 9, "c3", "x1", "10.2.0.128/25", "192.0.2.21");
        node(&mut w.recs[2], 10, "c3", "x2", "10.3.0.0/24", "192.0.2.22");
        // Wrong identity bits; endpoint outside the cluster's CIDRs.
        ep(
            &mut w.recs[1],
            "c2",
            "10.2.0.5",
            (3 << 16) | 300,
            "192.0.2.12",
        );
        ep(
            &mut w.recs[2],
            "c3",
            "10.9.0.5",
            (3 << 16) | 300,
            "192.0.2.22",
        );
        ep(
            &mut w.recs[2],
            "c3",
            "10.3.0.5",
            (3 << 16) | 300,
            "192.0.2.22",
        );
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("k8s:app".to_owned(), "x".to_owned());
        let bad = IdentityRecord {
            id: Identity::from_raw((1 << 16) | 400).unwrap(),
            cluster: "c3".parse().unwrap(),
            labels: Labels::new(labels).unwrap(),
        };
        w.recs[2].identities.insert(bad.id, bad);
        let d = w.merge(EncryptionPolicy::default());
        let reasons: Vec<(String, &str, &str)> = d
            .rejected
            .iter()
            .map(|r| (r.cluster.to_string(), r.record.as_str(), r.reason))
            .collect();
        assert!(
            reasons.contains(&("c2".into(), "node m1", "cidr_overlap")),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&("c3".into(), "node x1", "cidr_overlap")),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&("c2".into(), "endpoint 10.2.0.5", "identity_cluster_bits")),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&(
                "c3".into(),
                "endpoint 10.9.0.5",
                "endpoint_outside_cluster_cidrs"
            )),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.0 == "c3"
                && r.2 == "identity_cluster_bits"
                && r.1.starts_with("identity"))
        );
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        // Everything else still works.
        assert!(d.tunnels.contains_key(&cidr("10.2.0.0/24")));
        assert!(d.tunnels.contains_key(&cidr("10.3.0.0/24")));
        assert!(!d.tunnels.contains_key(&cidr("10.1.5.0/24")));
        assert!(d.ipcache.contains_key(&cidr("10.3.0.5/32")));
        assert!(!d.ipcache.contains_key(&cidr("10.2.0.5/32")));
    }

    #[test]
    fn global_service_semantics_table() {
        use BackendState::*;
        // (local global, remote global, remote shared) -> remote backends?
        let table = [
            (true, true, true, true),
            (true, true, false, false),
            (true, false, true, false),
            (false, true, true, false),
            (false, false, false, false),
            (true, false, false, false),
        ];
        for (lg, rg, rs, want) in table {
            let mut w = World::new(2);
            node(&mut w.recs[0], 1, "c1", "n1", "10.1.0.0/24", "192.0.2.1");
            node(&mut w.recs[1], 2, "c2", "m1", "10.2.0.0/24", "192.0.2.11");
            svc(&mut w.recs[0], "c1", lg, true, &[("10.1.0.5", Ready)]);
            svc(&mut w.recs[1], "c2", rg, rs, &[("10.2.0.5", Ready)]);
            let d = w.merge(EncryptionPolicy::default());
            let s = &d.services["default/web"];
            let remote = s.backends.iter().any(|b| b.cluster.as_str() == "c2");
            assert_eq!(
                remote, want,
                "local global {lg}, remote global {rg}, remote shared {rs}"
            );
            assert!(
                s.backends.iter().any(|b| b.cluster.as_str() == "c1"),
                "local backends always"
            );
        }
        // A remote-only service is not programmed (no local frontend).
        let mut w = World::new(2);
        node(&mut w.recs[1], 2, "c2", "m1", "10.2.0.0/24", "192.0.2.11");
        svc(&mut w.recs[1], "c2", true, true, &[("10.2.0.5", Ready)]);
        assert!(w.merge(EncryptionPolicy::default()).services.is_empty());
    }

    #[test]
    fn backend_states_ports_and_ownership() {
        use BackendState::*;
        let mut w = World::new(3);
        node(&mut w.recs[0], 1, "c1", "n1", "10.1.0.0/24", "192.0.2.1");
        node(&mut w.recs[1], 2, "c2", "m1", "10.2.0.0/24", "192.0.2.11");
        node(&mut w.recs[2], 3, "c3", "x1", "10.3.0.0/24", "192.0.2.21");
        svc(
            &mut w.recs[0],
            "c1",
            true,
            true,
            &[
                ("10.1.0.5", Ready),
                ("10.1.0.6", Terminating),
                ("10.1.0.7", NotReady),
            ],
        );
        // c2 claims a backend in c1's range: refused, its other one kept.
        svc(
            &mut w.recs[1],
            "c2",
            true,
            true,
            &[("10.2.0.5", Ready), ("10.1.0.99", Ready)],
        );
        // c3's ports differ: its whole contribution is refused.
        svc(&mut w.recs[2], "c3", true, true, &[("10.3.0.5", Ready)]);
        let (ns, n): (K8sName, K8sName) = ("default".parse().unwrap(), "web".parse().unwrap());
        w.recs[2].services.get_mut(&(ns, n)).unwrap().ports[0].port = 81;
        let d = w.merge(EncryptionPolicy::default());
        let s = &d.services["default/web"];
        let ips: Vec<(String, BackendState)> = s
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.state))
            .collect();
        assert_eq!(
            ips,
            vec![
                ("10.1.0.5".into(), Ready),
                ("10.1.0.6".into(), Terminating),
                ("10.1.0.7".into(), NotReady),
                ("10.2.0.5".into(), Ready)
            ]
        );
        let reasons: Vec<&str> = d.rejected.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            vec!["backend_outside_cluster_cidrs", "service_port_conflict"]
        );
        assert_eq!(s.ports, vec![(Protocol::Tcp, 80, 8080)]);
        assert_eq!(s.affinity, Affinity::Local);
    }

    #[test]
    fn two_local_services_may_not_share_a_frontend() {
        use BackendState::*;
        let mut w = World::new(1);
        node(&mut w.recs[0], 1, "c1", "n1", "10.1.0.0/24", "192.0.2.1");
        svc(&mut w.recs[0], "c1", false, true, &[("10.1.0.5", Ready)]);
        let mut other = w.recs[0].services.values().next().unwrap().clone();
        other.name = "api".parse().unwrap();
        w.recs[0]
            .services
            .insert((other.namespace.clone(), other.name.clone()), other);
        let d = w.merge(EncryptionPolicy::default());
        // "default/api" sorts first and keeps the frontend.
        assert!(d.services.contains_key("default/api"));
        assert!(!d.services.contains_key("default/web"));
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].reason, "service_frontend_conflict");
        assert!(
            d.rejected[0].detail.contains("10.96.0.10:80/TCP")
                && d.rejected[0].detail.contains("default/api"),
            "{}",
            d.rejected[0].detail
        );
    }
}
