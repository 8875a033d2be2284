//! The network policy part of the merge (issue 18): for each local
//! endpoint identity, the compiled policy entries
//! (`clustermesh_api::policy::compile`) over every identity the mesh knows.
//!
//! - Only the **local** cluster's policies are used: each cluster enforces
//!   its own (a remote's policy records are never read, see the store).
//! - The local endpoints are the local cluster's endpoint records on this
//!   node (every local endpoint when the agent has no node name). They are
//!   keyed by their identity: endpoints with equal labels share an identity
//!   and so their compiled policy. The later eBPF policy map is keyed by
//!   (local endpoint identity, peer identity, direction, protocol, port
//!   range); the datapath finds a pod's identity in `CM_ENDPOINTS`.
//! - The peers: the reserved identities (host, world, remote-node, health,
//!   init, unmanaged) and the identities of every cluster (local and
//!   remote) that carry their own cluster's id, with their labels and
//!   cluster. A label set without `io.kubernetes.pod.namespace` gets the
//!   namespace of an endpoint of that identity (identities allocated
//!   before they were namespaced, or by another cluster's older
//!   apiserver), so namespaced policies select them.
//! - An identity no policy touches gets no entry (unrestricted).
//!
//! Pure, like the rest of the merge.

use std::collections::{BTreeMap, BTreeSet};

use std::net::IpAddr;

use clustermesh_api::{
    Identity, IpCidr, K8sName, Labels,
    policy::{
        CompiledPolicy, Direction, EndpointRef, FlowPeer, NAMESPACE_KEY, Peer, PeerSet, Policy,
        Reserved, compile,
    },
};

use super::merge::{ClusterInput, MergeInput};

/// The reserved peers every endpoint is compiled against.
const RESERVED: [(Identity, Reserved); 6] = [
    (Identity::HOST, Reserved::Host),
    (Identity::WORLD, Reserved::World),
    (Identity::UNMANAGED, Reserved::Unmanaged),
    (Identity::HEALTH, Reserved::Health),
    (Identity::INIT, Reserved::Init),
    (Identity::REMOTE_NODE, Reserved::RemoteNode),
];

fn has_namespace(labels: &Labels) -> Option<&str> {
    labels
        .iter()
        .find(|(k, _)| {
            *k == NAMESPACE_KEY
                || k.split_once(':')
                    .is_some_and(|(_, key)| key == NAMESPACE_KEY)
        })
        .map(|(_, v)| v)
}

/// The namespace of an endpoint of `id` in `c`, if any.
fn endpoint_namespace<'a>(c: &'a ClusterInput<'_>, id: Identity) -> Option<&'a K8sName> {
    c.records
        .endpoints
        .values()
        .filter(|e| e.identity == id)
        .find_map(|e| e.namespace.as_ref())
}

/// `labels` with the namespace label added when it has none and an
/// endpoint of the identity names one.
fn with_namespace(labels: &Labels, ns: Option<&K8sName>) -> Labels {
    match (has_namespace(labels), ns) {
        (None, Some(ns)) => {
            let mut m: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            m.insert(format!("k8s:{NAMESPACE_KEY}"), ns.to_string());
            Labels::new(m).unwrap_or_else(|_| labels.clone())
        }
        _ => labels.clone(),
    }
}

/// Every peer identity the mesh knows, with what policies match on.
fn peers(all: &[&ClusterInput<'_>]) -> Vec<(Identity, FlowPeer)> {
    let mut out: Vec<(Identity, FlowPeer)> = RESERVED
        .iter()
        .map(|(id, r)| (*id, FlowPeer::Reserved(*r)))
        .collect();
    for c in all {
        for (id, rec) in &c.records.identities {
            // A cluster speaks only for identities of its own id.
            if id.cluster() != Some(c.id) || rec.cluster != *c.name {
                continue;
            }
            let labels = with_namespace(&rec.labels, endpoint_namespace(c, *id));
            out.push((
                *id,
                FlowPeer::Endpoint {
                    cluster: c.name.clone(),
                    labels,
                },
            ));
        }
    }
    out
}

/// Every CIDR prefix the policies name (rule peers and their excepts; not
/// `/0`, which is world).
fn cidrs_of(policies: &[Policy]) -> BTreeSet<IpCidr> {
    let mut out = BTreeSet::new();
    for p in policies {
        for spec in &p.specs {
            for d in [Direction::Ingress, Direction::Egress] {
                for rule in spec.allows(d).iter().chain(spec.denies(d)) {
                    let PeerSet::Only(peers) = &rule.peers else {
                        continue;
                    };
                    for peer in peers {
                        if let Peer::Cidr { cidr, except } = peer {
                            out.extend(
                                std::iter::once(cidr)
                                    .chain(except)
                                    .filter(|c| c.prefix_len() > 0),
                            );
                        }
                    }
                }
            }
        }
    }
    out
}

/// An address of `p` whose longest match in `set` is `p` itself (None: the
/// longer prefixes of `set` inside `p` cover all of it).
fn representative(p: IpCidr, set: &BTreeSet<IpCidr>) -> Option<IpAddr> {
    let inner: Vec<IpCidr> = set
        .iter()
        .filter(|c| **c != p && p.contains_cidr(c))
        .copied()
        .collect();
    fn find(p: IpCidr, inner: &[IpCidr]) -> Option<IpAddr> {
        if inner.iter().any(|c| c.contains_cidr(&p)) {
            return None;
        }
        if !inner.iter().any(|c| p.contains_cidr(c)) {
            return Some(p.addr());
        }
        // Split in halves: some address outside every inner prefix.
        let len = p.prefix_len() + 1;
        let lo = IpCidr::new(p.addr(), len).ok()?;
        let hi_addr = match p.addr() {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) | (1u32 << (32 - u32::from(len)))).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) | (1u128 << (128 - u32::from(len)))).into()),
        };
        let hi = IpCidr::new(hi_addr, len).ok()?;
        find(lo, inner).or_else(|| find(hi, inner))
    }
    find(p, &inner)
}

/// The CIDR prefixes of the local policies with their node-local
/// identities (numbered in prefix order) and a representative address.
pub fn cidr_peers(policies: &[Policy]) -> Vec<(IpCidr, Identity, IpAddr)> {
    let set = cidrs_of(policies);
    let mut out = Vec::new();
    let mut n = 0u32;
    for c in &set {
        let Some(addr) = representative(*c, &set) else {
            continue;
        };
        n += 1;
        if let Some(id) = Identity::node_local(n) {
            out.push((*c, id, addr));
        }
    }
    out
}

fn local_policies(input: &MergeInput<'_>) -> Vec<Policy> {
    input
        .local
        .records
        .policies
        .values()
        .map(|r| r.policy.clone())
        .collect()
}

/// The node-local identity of every CIDR prefix the local policies name
/// (`Desired::policy_cidrs`).
pub fn merge_policy_cidrs(input: &MergeInput<'_>) -> BTreeMap<IpCidr, u32> {
    cidr_peers(&local_policies(input))
        .into_iter()
        .map(|(c, id, _)| (c, id.get()))
        .collect()
}

/// The compiled policy of each local endpoint identity on this node.
pub fn merge_policies(input: &MergeInput<'_>) -> BTreeMap<Identity, CompiledPolicy> {
    let local = &input.local;
    let policies = local_policies(input);
    let mut out = BTreeMap::new();
    if policies.is_empty() {
        return out;
    }
    let all: Vec<&ClusterInput<'_>> = std::iter::once(local).chain(input.remotes).collect();
    let mut peers = peers(&all);
    // Addresses outside the mesh's endpoints, by the prefixes the policies
    // name: each prefix's node-local identity stands for the addresses
    // whose longest match it is.
    peers.extend(
        cidr_peers(&policies)
            .into_iter()
            .map(|(_, id, addr)| (id, FlowPeer::Address(addr))),
    );
    let here: BTreeSet<Identity> = local
        .records
        .endpoints
        .values()
        .filter(|e| input.self_node.is_none() || e.node.as_ref() == input.self_node)
        .map(|e| e.identity)
        .collect();
    let default_ns: K8sName = match "default".parse() {
        Ok(n) => n,
        Err(_) => return out,
    };
    for id in here {
        let Some(rec) = local.records.identities.get(&id) else {
            continue; // identity not synced yet: nothing to select on
        };
        let ep_ns = endpoint_namespace(local, id);
        let labels = with_namespace(&rec.labels, ep_ns);
        let namespace = has_namespace(&labels)
            .and_then(|n| n.parse::<K8sName>().ok())
            .unwrap_or_else(|| default_ns.clone());
        let me = EndpointRef {
            cluster: local.name,
            namespace: &namespace,
            labels: &labels,
        };
        let compiled = compile(&policies, &me, &peers);
        if compiled.default_deny_ingress
            || compiled.default_deny_egress
            || !compiled.entries.is_empty()
        {
            out.insert(id, compiled);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clustermesh_api::{
        ClusterId, ClusterName, EndpointRecord, IdentityRecord, NodeName, PolicyRecord,
        policy::{Direction, MapVerdict, ProtoMatch, parse_documents},
    };

    use super::*;
    use crate::clusters::store::Records;

    fn id(cluster: u64, local: u16) -> Identity {
        Identity::new(ClusterId::new(cluster).unwrap(), local).unwrap()
    }

    fn add(r: &mut Records, cluster: &str, ident: Identity, ip: &str, node: &str, app: &str) {
        let c: ClusterName = cluster.parse().unwrap();
        let labels = Labels::new([("k8s:app".to_owned(), app.to_owned())].into()).unwrap();
        r.identities.insert(
            ident,
            IdentityRecord {
                id: ident,
                cluster: c.clone(),
                labels,
            },
        );
        r.endpoints.insert(
            ip.parse().unwrap(),
            EndpointRecord {
                ip: ip.parse().unwrap(),
                cluster: c,
                identity: ident,
                host_ip: "192.0.2.1".parse().unwrap(),
                node: Some(node.parse().unwrap()),
                namespace: Some("default".parse().unwrap()),
                name: None,
            },
        );
    }

    fn policies(r: &mut Records, cluster: &str, text: &str) {
        for d in parse_documents(text).unwrap() {
            let rec = PolicyRecord::new(cluster.parse().unwrap(), d.policy, d.manifest);
            r.policies
                .insert((rec.namespace.clone(), rec.name.clone()), rec);
        }
    }

    const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web, io.cilium.k8s.policy.cluster: c2}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  egressDeny:
  - toEntities: [world]
"#;

    struct W {
        names: [ClusterName; 2],
        recs: [Records; 2],
    }

    impl W {
        fn new() -> Self {
            let mut w = W {
                names: ["c1".parse().unwrap(), "c2".parse().unwrap()],
                recs: [Records::default(), Records::default()],
            };
            add(&mut w.recs[0], "c1", id(1, 256), "10.1.0.5", "n1", "db");
            add(&mut w.recs[0], "c1", id(1, 257), "10.1.0.6", "n1", "web");
            add(
                &mut w.recs[0],
                "c1",
                id(1, 258),
                "10.1.1.5",
                "n2",
                "db-other",
            );
            add(&mut w.recs[1], "c2", id(2, 256), "10.2.0.5", "m1", "web");
            add(&mut w.recs[1], "c2", id(2, 257), "10.2.0.6", "m1", "db");
            w
        }
        /// `f` over the merge input of both clusters (c1 local) on `node`.
        fn with_input<T>(&self, node: Option<&str>, f: impl Fn(&MergeInput<'_>) -> T) -> T {
            let inputs: Vec<ClusterInput<'_>> = (0..2)
                .map(|i| ClusterInput {
                    name: &self.names[i],
                    id: ClusterId::new(i as u64 + 1).unwrap(),
                    records: &self.recs[i],
                    declared: &[],
                })
                .collect();
            let n: Option<NodeName> = node.map(|n| n.parse().unwrap());
            f(&MergeInput {
                local: inputs[0],
                self_node: n.as_ref(),
                encryption: Default::default(),
                remotes: &inputs[1..],
                incumbents: &BTreeMap::new(),
                incumbents_changed: None,
            })
        }
        fn cidrs(&self) -> BTreeMap<IpCidr, u32> {
            self.with_input(None, merge_policy_cidrs)
        }
        fn merge(&self, node: Option<&str>) -> BTreeMap<Identity, CompiledPolicy> {
            self.with_input(node, merge_policies)
        }
    }

    const CIDR_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-out, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: db}}
  egress:
  - toCIDRSet:
    - cidr: 203.0.113.0/24
      except: [203.0.113.128/25]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"#;

    #[test]
    fn cidr_prefixes_get_node_local_identities_and_excepts_their_own() {
        let mut w = W::new();
        policies(&mut w.recs[0], "c1", CIDR_POLICY);
        let cidrs = w.cidrs();
        let c = |s: &str| s.parse::<IpCidr>().unwrap();
        assert_eq!(
            cidrs.keys().copied().collect::<Vec<_>>(),
            [c("203.0.113.0/24"), c("203.0.113.128/25")]
        );
        for id in cidrs.values() {
            assert!(
                Identity::from_raw(u64::from(*id)).is_err(),
                "never exportable"
            );
            assert_ne!(*id & Identity::NODE_LOCAL, 0);
        }
        let p = &w.merge(Some("n1"))[&id(1, 256)];
        assert!(p.default_deny_egress);
        let allowed: Vec<u32> = p
            .entries
            .iter()
            .filter(|e| e.verdict == MapVerdict::Allow)
            .map(|e| e.peer.get())
            .collect();
        // The /24's identity is allowed, the except's is not.
        assert_eq!(allowed, [cidrs[&c("203.0.113.0/24")]], "{p:?}");
    }

    #[test]
    fn a_prefix_covered_by_longer_ones_needs_no_identity() {
        let set: BTreeSet<IpCidr> = ["10.0.0.0/8", "10.0.0.0/9", "10.128.0.0/9", "fd00::/64"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let c = |s: &str| s.parse::<IpCidr>().unwrap();
        assert_eq!(representative(c("10.0.0.0/8"), &set), None);
        assert_eq!(
            representative(c("10.0.0.0/9"), &set),
            Some("10.0.0.0".parse().unwrap())
        );
        let set2: BTreeSet<IpCidr> = ["10.0.0.0/8", "10.0.0.0/16"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let r = representative(c("10.0.0.0/8"), &set2).unwrap();
        assert!(
            c("10.0.0.0/8").contains(r) && !c("10.0.0.0/16").contains(r),
            "{r}"
        );
        assert_eq!(
            representative(c("fd00::/64"), &set),
            Some("fd00::".parse().unwrap())
        );
    }

    #[test]
    fn no_policy_no_entries() {
        assert!(W::new().merge(Some("n1")).is_empty());
    }

    #[test]
    fn a_local_policy_compiles_for_the_selected_local_endpoints_of_this_node() {
        let mut w = W::new();
        policies(&mut w.recs[0], "c1", POLICY);
        let d = w.merge(Some("n1"));
        // Only c1's db on n1 is selected (web is not; db-other is on n2).
        assert_eq!(d.keys().copied().collect::<Vec<_>>(), [id(1, 256)]);
        let p = &d[&id(1, 256)];
        assert!(p.default_deny_ingress, "{p:?}");
        assert!(
            p.default_deny_egress,
            "egressDeny makes egress enforced: {p:?}"
        );
        let allow: Vec<_> = p
            .entries
            .iter()
            .filter(|e| e.verdict == MapVerdict::Allow)
            .collect();
        // c2's web only (not c1's web: the policy names c2).
        assert_eq!(allow.len(), 1, "{allow:?}");
        assert_eq!(allow[0].peer, id(2, 256));
        assert_eq!(allow[0].direction, Direction::Ingress);
        assert_eq!(allow[0].protocol, ProtoMatch::Tcp);
        let deny: Vec<_> = p
            .entries
            .iter()
            .filter(|e| e.verdict == MapVerdict::Deny)
            .collect();
        assert_eq!(deny.len(), 1, "{deny:?}");
        assert_eq!(deny[0].peer, Identity::WORLD);
        assert_eq!(deny[0].rule.origin, "spec.egressDeny[0]");
        // Without a node name, every local endpoint counts (db-other is
        // not selected by app=db either).
        assert_eq!(w.merge(None).len(), 1);
    }

    #[test]
    fn a_remote_clusters_policies_never_apply_here() {
        let mut w = W::new();
        // Even present in the remote's records (the store never keeps
        // them), c2's policy is not used for c1's endpoints.
        policies(&mut w.recs[1], "c2", POLICY);
        assert!(w.merge(Some("n1")).is_empty());
    }

    #[test]
    fn a_remote_identity_of_another_clusters_id_is_no_peer() {
        let mut w = W::new();
        policies(&mut w.recs[0], "c1", POLICY);
        // c2 claims an identity of cluster id 1 with app=web: not a peer.
        add(&mut w.recs[1], "c2", id(1, 300), "10.2.0.7", "m1", "web");
        let p = &w.merge(Some("n1"))[&id(1, 256)];
        assert!(p.entries.iter().all(|e| e.peer != id(1, 300)), "{p:?}");
    }

    #[test]
    fn namespaced_policies_use_the_endpoint_namespace() {
        let mut w = W::new();
        // A policy of namespace prod selects nothing in default.
        policies(
            &mut w.recs[0],
            "c1",
            &POLICY.replace("{name: db}", "{name: db, namespace: prod}"),
        );
        assert!(w.merge(Some("n1")).is_empty());
    }
}
