//! The cluster's state as the apiserver knows it, and the rules for changing
//! it. Pure: no IO, time passed in. The gRPC handlers check a change here,
//! persist it, then apply it; the exporter turns [`ClusterState::desired`]
//! into etcd keys.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use clustermesh_api::{
    ClusterConfig, ClusterId, ClusterName, EncryptionPolicy, EndpointRecord, FieldError, Identity,
    IdentityRecord, IpCidr, K8sName, Key, KvKey, Labels, NodeName, NodeRecord, PolicyRecord,
    Record, ServiceRecord, StateKind, encode, policy::PolicyName,
};

/// Most policies one `ApplyPolicies` stores (one etcd transaction).
pub const MAX_APPLY: usize = 100;

/// Why a change was refused; maps onto a gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(FieldError),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
}

impl Refusal {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Refusal::Invalid(FieldError::new(field, reason))
    }
    /// Short stable reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Invalid(_) => "invalid",
            Refusal::AlreadyExists(_) => "already_exists",
            Refusal::FailedPrecondition(_) => "failed_precondition",
            Refusal::NotFound(_) => "not_found",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub record: NodeRecord,
    pub last_seen: Instant,
    /// Declared by the Kubernetes API (a Node object), not by a registering
    /// agent: it lives as long as the object, not by heartbeats.
    pub from_kubernetes: bool,
}

pub type ServiceName = (K8sName, K8sName);
/// A network policy's namespace (None: cluster-wide) and name.
pub type PolicyKey = (Option<K8sName>, PolicyName);

/// Everything the cluster exports.
#[derive(Debug)]
pub struct ClusterState {
    pub cluster: ClusterName,
    pub cluster_id: ClusterId,
    pub encryption: EncryptionPolicy,
    pub nodes: BTreeMap<NodeName, NodeEntry>,
    pub endpoints: BTreeMap<IpAddr, EndpointRecord>,
    /// Services declared through the API (persisted).
    pub services: BTreeMap<ServiceName, ServiceRecord>,
    /// Services from the services file (re-read at start, not persisted).
    pub file_services: BTreeMap<ServiceName, ServiceRecord>,
    /// Services from the Kubernetes API (re-listed at start, not persisted).
    pub kube_services: BTreeMap<ServiceName, ServiceRecord>,
    pub identities: BTreeMap<Identity, IdentityRecord>,
    pub identity_by_labels: BTreeMap<Labels, Identity>,
    /// Network policies applied through the API (persisted).
    pub policies: BTreeMap<PolicyKey, PolicyRecord>,
    /// Identities no endpoint uses, since when (garbage collection; not
    /// persisted: after a restart the grace period starts again).
    unused_since: BTreeMap<Identity, Instant>,
    /// Network policies from the Kubernetes API (re-listed at start, not
    /// persisted). One of these takes the place of an API-applied policy
    /// of the same namespace and name: the Kubernetes API is the source of
    /// truth in Kubernetes mode.
    pub kube_policies: BTreeMap<PolicyKey, PolicyRecord>,
    /// Exported keys changed since the last [`ClusterState::take_changes`]:
    /// the exporter writes only these, so a change costs O(1), not O(state).
    dirty: BTreeSet<Key>,
}

/// One exported key's new value (None: delete).
pub type Change = (String, Option<Vec<u8>>);

/// The keys and values the exporter keeps in etcd (without canaries and
/// heartbeat, which it manages itself).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub cluster_config: (String, Vec<u8>),
    pub kinds: BTreeMap<StateKind, BTreeMap<String, Vec<u8>>>,
}

/// What a registration does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    New,
    /// Same node and boot id, same record: only refreshes liveness.
    Unchanged,
    /// Same node and boot id, changed record (e.g. a rotated key).
    Updated,
    /// Same node, new boot id, after the old incarnation expired.
    Replaced,
}

impl ClusterState {
    pub fn new(cluster: ClusterName, cluster_id: ClusterId, encryption: EncryptionPolicy) -> Self {
        Self {
            cluster,
            cluster_id,
            encryption,
            nodes: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            services: BTreeMap::new(),
            file_services: BTreeMap::new(),
            kube_services: BTreeMap::new(),
            identities: BTreeMap::new(),
            identity_by_labels: BTreeMap::new(),
            policies: BTreeMap::new(),
            unused_since: BTreeMap::new(),
            kube_policies: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    fn touch(&mut self, key: Key) {
        self.dirty.insert(key);
    }

    /// The current value of every exported key changed since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|k| {
                let v = match &k {
                    Key::Node { node, .. } => {
                        self.nodes.get(node).and_then(|n| encode(&n.record).ok())
                    }
                    Key::Ip { ip, .. } => self.endpoints.get(ip).and_then(|e| encode(e).ok()),
                    Key::Identity { id, .. } => {
                        self.identities.get(id).and_then(|i| encode(i).ok())
                    }
                    Key::Service {
                        namespace, name, ..
                    } => {
                        let sk = (namespace.clone(), name.clone());
                        self.services
                            .get(&sk)
                            .or_else(|| self.file_services.get(&sk))
                            .or_else(|| self.kube_services.get(&sk))
                            .and_then(|s| encode(s).ok())
                    }
                    Key::Policy {
                        namespace, name, ..
                    } => self
                        .policy(&(namespace.clone(), name.clone()))
                        .and_then(|p| encode(p).ok()),
                    Key::ClusterConfig { .. } => encode(&self.cluster_config()).ok(),
                    _ => None,
                };
                (k.build(), v)
            })
            .collect()
    }

    /// Changes the exported encryption policy (the cluster config key).
    pub fn set_encryption(&mut self, p: EncryptionPolicy) {
        if self.encryption != p {
            self.encryption = p;
            self.touch(Key::ClusterConfig {
                cluster: self.cluster.clone(),
            });
        }
    }

    /// Forgets pending changes (a full sync covers them).
    pub fn clear_changes(&mut self) {
        self.dirty.clear();
    }

    pub fn put_endpoint(&mut self, rec: EndpointRecord) {
        self.touch(rec.key());
        self.endpoints.insert(rec.ip, rec);
    }

    pub fn remove_endpoint(&mut self, ip: &IpAddr) -> bool {
        match self.endpoints.remove(ip) {
            Some(rec) => {
                self.touch(rec.key());
                true
            }
            None => false,
        }
    }

    pub fn put_service(&mut self, rec: ServiceRecord) {
        self.touch(rec.key());
        self.services
            .insert((rec.namespace.clone(), rec.name.clone()), rec);
    }

    pub fn remove_service(&mut self, key: &ServiceName) -> bool {
        match self.services.remove(key) {
            Some(rec) => {
                self.touch(rec.key());
                true
            }
            None => false,
        }
    }

    pub fn put_policy(&mut self, rec: PolicyRecord) {
        self.touch(rec.key());
        self.policies
            .insert((rec.namespace.clone(), rec.name.clone()), rec);
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) -> Option<PolicyRecord> {
        let rec = self.policies.remove(key)?;
        self.touch(rec.key());
        Some(rec)
    }

    /// The exported policy of a namespace and name: the Kubernetes one,
    /// else the API-applied one.
    pub fn policy(&self, key: &PolicyKey) -> Option<&PolicyRecord> {
        self.kube_policies
            .get(key)
            .or_else(|| self.policies.get(key))
    }

    /// Every exported policy, by namespace and name (a Kubernetes policy in
    /// place of an API-applied one of the same namespace and name).
    /// In namespace/name order.
    pub fn all_policies(&self) -> impl Iterator<Item = &PolicyRecord> {
        let mut m: BTreeMap<&PolicyKey, &PolicyRecord> = self.policies.iter().collect();
        m.extend(self.kube_policies.iter());
        m.into_values()
    }

    /// Refuses changing, through the API, a policy that comes from the
    /// Kubernetes API. `what` names it in the error (its document).
    pub fn check_not_kube_policy(&self, key: &PolicyKey, what: &str) -> Result<(), Refusal> {
        match self.kube_policies.get(key) {
            Some(k) => Err(Refusal::FailedPrecondition(format!(
                "{what}: {} comes from the Kubernetes API (Kubernetes mode); change or delete it \
                 there, e.g. with kubectl",
                k.policy.reference()
            ))),
            None => Ok(()),
        }
    }

    /// Makes the Kubernetes-sourced policies equal to `policies` (mark and
    /// sweep); only what differs is touched. Returns the number of
    /// policies changed. `policies` holds each namespace/name once (the
    /// source resolves collisions).
    pub fn replace_kube_policies(&mut self, policies: &[PolicyRecord]) -> usize {
        let wanted: BTreeMap<PolicyKey, &PolicyRecord> = policies
            .iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p))
            .collect();
        let gone: Vec<PolicyKey> = self
            .kube_policies
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        let mut changed = 0;
        for k in gone {
            if let Some(rec) = self.kube_policies.remove(&k) {
                // The API-applied policy of that name, if any, is exported again.
                self.touch(rec.key());
                changed += 1;
            }
        }
        for (k, p) in wanted {
            if self.kube_policies.get(&k) == Some(p) {
                continue;
            }
            self.touch(p.key());
            self.kube_policies.insert(k, p.clone());
            changed += 1;
        }
        changed
    }

    /// Checks a set of policies to apply together: at most
    /// [`MAX_APPLY`] of them, each namespace/name once, none of them a
    /// Kubernetes policy, and an existing policy of that namespace/name
    /// only replaced by one of the same kind. `what[i]` names policy `i`
    /// in errors (its document).
    pub fn check_policies(&self, recs: &[PolicyRecord], what: &[String]) -> Result<(), Refusal> {
        if recs.len() > MAX_APPLY {
            return Err(Refusal::invalid(
                "manifest",
                format!(
                    "{} policies in one apply; at most {MAX_APPLY} are applied together",
                    recs.len()
                ),
            ));
        }
        let mut seen: BTreeMap<PolicyKey, usize> = BTreeMap::new();
        for (i, r) in recs.iter().enumerate() {
            let k = (r.namespace.clone(), r.name.clone());
            let here = what.get(i).map_or("a document", String::as_str);
            if let Some(j) = seen.insert(k.clone(), i) {
                let there = what.get(j).map_or("a document", String::as_str);
                return Err(Refusal::invalid(
                    "manifest",
                    format!("{here}: policy {} is also in {there}", r.policy.reference()),
                ));
            }
            self.check_not_kube_policy(&k, here)?;
            if let Some(old) = self.policies.get(&k)
                && old.policy.kind != r.policy.kind
            {
                return Err(Refusal::FailedPrecondition(format!(
                    "{here}: {} would replace {}: one policy per namespace and name; delete it first",
                    r.policy.reference(),
                    old.policy.reference()
                )));
            }
        }
        Ok(())
    }

    pub fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig {
            id: self.cluster_id,
            name: self.cluster.clone(),
            capabilities: Default::default(),
            encryption: self.encryption,
        }
    }

    /// Checks a node registration against the nodes already known.
    pub fn check_register(
        &self,
        rec: &NodeRecord,
        now: Instant,
        node_ttl: Duration,
    ) -> Result<Registration, Refusal> {
        if rec.cluster != self.cluster {
            return Err(Refusal::FailedPrecondition(format!(
                "node {} registers for cluster {}, but this apiserver serves cluster {}",
                rec.name, rec.cluster, self.cluster
            )));
        }
        let mut outcome = Registration::New;
        if let Some(old) = self.nodes.get(&rec.name) {
            if old.record.boot_id == rec.boot_id {
                outcome = if old.record == *rec {
                    Registration::Unchanged
                } else {
                    Registration::Updated
                };
            } else if now.saturating_duration_since(old.last_seen) < node_ttl {
                return Err(Refusal::AlreadyExists(format!(
                    "node {} is registered with boot id {} and still alive; a node with boot id {} \
                     cannot take its name until it deregisters or expires ({}s without heartbeat)",
                    rec.name,
                    old.record.boot_id,
                    rec.boot_id,
                    node_ttl.as_secs()
                )));
            } else {
                outcome = Registration::Replaced;
            }
        }
        for (name, other) in &self.nodes {
            if *name == rec.name {
                continue;
            }
            for (i, c) in rec.pod_cidrs.iter().enumerate() {
                if let Some(o) = other.record.pod_cidrs.iter().find(|o| o.overlaps(c)) {
                    return Err(Refusal::invalid(
                        format!("node.pod_cidrs[{i}]"),
                        format!("{c} overlaps pod CIDR {o} of node {name}"),
                    ));
                }
            }
            for (i, ip) in rec.underlay_ips.iter().enumerate() {
                if other.record.underlay_ips.contains(ip) {
                    return Err(Refusal::invalid(
                        format!("node.underlay_ips[{i}]"),
                        format!("{ip} is already the underlay address of node {name}"),
                    ));
                }
            }
        }
        // A node may not shrink its pod CIDRs out from under its endpoints.
        for ep in self.endpoints.values() {
            if ep.node.as_ref() == Some(&rec.name)
                && !rec.pod_cidrs.iter().any(|c| c.contains(ep.ip))
            {
                if outcome == Registration::Replaced {
                    continue; // the old incarnation's endpoints are dropped
                }
                return Err(Refusal::invalid(
                    "node.pod_cidrs",
                    format!(
                        "endpoint {} of this node would fall outside its pod CIDRs",
                        ep.ip
                    ),
                ));
            }
        }
        Ok(outcome)
    }

    pub fn apply_register(&mut self, rec: NodeRecord, outcome: Registration, now: Instant) {
        if outcome == Registration::Replaced {
            self.remove_endpoints_of(&rec.name);
        }
        self.touch(rec.key());
        self.nodes.insert(
            rec.name.clone(),
            NodeEntry {
                record: rec,
                last_seen: now,
                from_kubernetes: false,
            },
        );
    }

    /// Makes the Kubernetes-sourced nodes and services equal to `nodes` and
    /// `services` (mark and sweep); only what differs is touched. Returns
    /// the number of records changed.
    pub fn replace_kube(
        &mut self,
        nodes: &[NodeRecord],
        services: &[ServiceRecord],
        now: Instant,
    ) -> usize {
        let mut changed = 0;
        let gone: Vec<NodeName> = self
            .nodes
            .iter()
            .filter(|(n, e)| e.from_kubernetes && !nodes.iter().any(|r| r.name == **n))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            self.remove_node(&n);
            changed += 1;
        }
        for r in nodes {
            if self.nodes.get(&r.name).is_some_and(|e| e.record == *r) {
                continue;
            }
            self.touch(r.key());
            self.nodes.insert(
                r.name.clone(),
                NodeEntry {
                    record: r.clone(),
                    last_seen: now,
                    from_kubernetes: true,
                },
            );
            changed += 1;
        }
        let gone: Vec<ServiceName> = self
            .kube_services
            .keys()
            .filter(|k| !services.iter().any(|s| s.namespace == k.0 && s.name == k.1))
            .cloned()
            .collect();
        for k in gone {
            if let Some(rec) = self.kube_services.remove(&k) {
                self.touch(rec.key());
                changed += 1;
            }
        }
        for s in services {
            let k = (s.namespace.clone(), s.name.clone());
            if self.kube_services.get(&k) == Some(s) {
                continue;
            }
            self.touch(s.key());
            self.kube_services.insert(k, s.clone());
            changed += 1;
        }
        changed
    }

    /// Refreshes a node's liveness; the boot id must match.
    pub fn heartbeat(
        &mut self,
        node: &NodeName,
        boot_id: &str,
        now: Instant,
    ) -> Result<(), Refusal> {
        match self.nodes.get_mut(node) {
            Some(e) if e.record.boot_id.as_str() == boot_id => {
                e.last_seen = now;
                Ok(())
            }
            Some(e) => Err(Refusal::FailedPrecondition(format!(
                "node {node} is registered with boot id {}, not {boot_id}",
                e.record.boot_id
            ))),
            None => Err(Refusal::NotFound(format!(
                "node {node} is not registered (it may have expired): register it again"
            ))),
        }
    }

    /// Nodes whose last heartbeat is older than `ttl`.
    pub fn expired_nodes(&self, now: Instant, ttl: Duration) -> Vec<NodeName> {
        self.nodes
            .iter()
            .filter(|(_, e)| {
                !e.from_kubernetes && now.saturating_duration_since(e.last_seen) >= ttl
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Endpoint IPs hosted by `node`.
    pub fn endpoints_of(&self, node: &NodeName) -> Vec<IpAddr> {
        self.endpoints
            .values()
            .filter(|e| e.node.as_ref() == Some(node))
            .map(|e| e.ip)
            .collect()
    }

    fn remove_endpoints_of(&mut self, node: &NodeName) {
        for ip in self.endpoints_of(node) {
            self.remove_endpoint(&ip);
        }
    }

    /// Removes a node and its endpoints.
    pub fn remove_node(&mut self, node: &NodeName) -> bool {
        self.remove_endpoints_of(node);
        match self.nodes.remove(node) {
            Some(e) => {
                self.touch(e.record.key());
                true
            }
            None => false,
        }
    }

    /// Checks an endpoint before its identity is allocated.
    pub fn check_endpoint(&self, node: &NodeName, ip: IpAddr) -> Result<(), Refusal> {
        let Some(n) = self.nodes.get(node) else {
            return Err(Refusal::FailedPrecondition(format!(
                "node {node} is not registered: register the node before its endpoints"
            )));
        };
        if !n.record.pod_cidrs.iter().any(|c| c.contains(ip)) {
            let cidrs: Vec<String> = n.record.pod_cidrs.iter().map(IpCidr::to_string).collect();
            return Err(Refusal::invalid(
                "ip",
                format!(
                    "{ip} is outside node {node}'s pod CIDRs [{}]",
                    cidrs.join(", ")
                ),
            ));
        }
        if let Some(e) = self.endpoints.get(&ip)
            && e.node.as_ref() != Some(node)
        {
            return Err(Refusal::AlreadyExists(format!(
                "{ip} is already an endpoint of node {}",
                e.node.as_ref().map(ToString::to_string).unwrap_or_default()
            )));
        }
        Ok(())
    }

    pub fn check_service(&self, svc: &ServiceRecord) -> Result<(), Refusal> {
        let key = (svc.namespace.clone(), svc.name.clone());
        if self.file_services.contains_key(&key) {
            return Err(Refusal::FailedPrecondition(format!(
                "service {}/{} is declared in the services file; change it there",
                svc.namespace, svc.name
            )));
        }
        if self.kube_services.contains_key(&key) {
            return Err(Refusal::FailedPrecondition(format!(
                "service {}/{} is a Kubernetes Service; change it (or its annotations) there",
                svc.namespace, svc.name
            )));
        }
        // A frontend (address, protocol, port) belongs to one service: a
        // second one would take its traffic (the datapath keeps one).
        for other in self.all_services() {
            if (&other.namespace, &other.name) == (&svc.namespace, &svc.name) {
                continue;
            }
            for ip in svc
                .frontends
                .iter()
                .filter(|ip| other.frontends.contains(ip))
            {
                if let Some(p) = svc.ports.iter().find(|p| {
                    other
                        .ports
                        .iter()
                        .any(|o| o.port == p.port && o.protocol == p.protocol)
                }) {
                    return Err(Refusal::AlreadyExists(format!(
                        "frontend {ip} {:?}/{} is service {}/{}'s",
                        p.protocol, p.port, other.namespace, other.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// All services, API-declared and from the file.
    pub fn all_services(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.services
            .values()
            .chain(self.file_services.values())
            .chain(self.kube_services.values())
    }

    pub fn add_identity(&mut self, rec: IdentityRecord) {
        if self.identities.get(&rec.id) == Some(&rec) {
            return;
        }
        self.touch(rec.key());
        self.identity_by_labels.insert(rec.labels.clone(), rec.id);
        self.identities.insert(rec.id, rec);
    }

    /// Tracks which identities no endpoint uses and returns those unused
    /// for at least `grace` (to be deleted). An identity used again before
    /// that is kept and its clock reset.
    pub fn identities_to_collect(&mut self, now: Instant, grace: Duration) -> Vec<IdentityRecord> {
        let used: BTreeSet<Identity> = self.endpoints.values().map(|e| e.identity).collect();
        let known = &self.identities;
        self.unused_since
            .retain(|id, _| known.contains_key(id) && !used.contains(id));
        for id in known.keys().filter(|id| !used.contains(id)) {
            self.unused_since.entry(*id).or_insert(now);
        }
        self.unused_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
            .filter_map(|(id, _)| known.get(id).cloned())
            .collect()
    }

    /// Removes an identity (collected): no longer exported.
    pub fn remove_identity(&mut self, id: Identity) -> bool {
        let Some(rec) = self.identities.remove(&id) else {
            return false;
        };
        self.touch(rec.key());
        if self.identity_by_labels.get(&rec.labels) == Some(&id) {
            self.identity_by_labels.remove(&rec.labels);
        }
        self.unused_since.remove(&id);
        true
    }

    /// The exported keys and values. Records that fail to encode cannot
    /// exist here: every record entered through validation.
    pub fn desired(&self) -> Desired {
        fn put<R: Record>(m: &mut BTreeMap<String, Vec<u8>>, r: &R) {
            if let Ok(v) = encode(r) {
                m.insert(r.key().build(), v);
            }
        }
        let cfg = self.cluster_config();
        let mut kinds: BTreeMap<StateKind, BTreeMap<String, Vec<u8>>> = StateKind::ALL
            .into_iter()
            .map(|k| (k, BTreeMap::new()))
            .collect();
        let mut m = BTreeMap::new();
        for n in self.nodes.values() {
            put(&mut m, &n.record);
        }
        kinds.insert(StateKind::Nodes, std::mem::take(&mut m));
        for e in self.endpoints.values() {
            put(&mut m, e);
        }
        kinds.insert(StateKind::Ip, std::mem::take(&mut m));
        for i in self.identities.values() {
            put(&mut m, i);
        }
        kinds.insert(StateKind::Identities, std::mem::take(&mut m));
        for s in self.all_services() {
            put(&mut m, s);
        }
        kinds.insert(StateKind::Services, std::mem::take(&mut m));
        for p in self.all_policies() {
            put(&mut m, p);
        }
        kinds.insert(StateKind::Policies, m);
        Desired {
            cluster_config: (cfg.key().build(), encode(&cfg).unwrap_or_default()),
            kinds,
        }
    }

    pub fn counts(&self) -> [(StateKind, usize); 5] {
        [
            (StateKind::Nodes, self.nodes.len()),
            (StateKind::Ip, self.endpoints.len()),
            (StateKind::Identities, self.identities.len()),
            (
                StateKind::Services,
                self.services.len() + self.file_services.len(),
            ),
            (StateKind::Policies, self.all_policies().count()),
        ]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn st() -> ClusterState {
        ClusterState::new(
            "c1".parse().unwrap(),
            ClusterId::new(1).unwrap(),
            Default::default(),
        )
    }
    fn node(name: &str, boot: &str, cidr: &str, ip: &str) -> NodeRecord {
        NodeRecord {
            name: name.parse().unwrap(),
            cluster: "c1".parse().unwrap(),
            underlay_ips: vec![ip.parse().unwrap()],
            pod_cidrs: vec![cidr.parse().unwrap()],
            wireguard_public_keys: vec![],
            wireguard_port: None,
            boot_id: boot.parse().unwrap(),
        }
    }
    const TTL: Duration = Duration::from_secs(30);

    #[test]
    fn registration_rules() {
        let mut s = st();
        let t0 = Instant::now();
        let a = node("a", "b1", "10.1.0.0/24", "192.0.2.1");
        assert_eq!(s.check_register(&a, t0, TTL), Ok(Registration::New));
        s.apply_register(a.clone(), Registration::New, t0);
        assert_eq!(s.check_register(&a, t0, TTL), Ok(Registration::Unchanged));
        // Overlapping pod CIDR of another node.
        let b = node("b", "b2", "10.1.0.128/25", "192.0.2.2");
        let e = s.check_register(&b, t0, TTL).unwrap_err();
        assert!(
            matches!(&e, Refusal::Invalid(f) if f.field == "node.pod_cidrs[0]" && f.reason.contains("node a")),
            "{e:?}"
        );
        // Same underlay IP as another node.
        let b = node("b", "b2", "10.2.0.0/24", "192.0.2.1");
        assert!(
            matches!(s.check_register(&b, t0, TTL), Err(Refusal::Invalid(f)) if f.field == "node.underlay_ips[0]")
        );
        // Same name, other boot id while alive: refused; after expiry: replaces.
        let a2 = node("a", "b9", "10.1.0.0/24", "192.0.2.1");
        assert!(matches!(
            s.check_register(&a2, t0, TTL),
            Err(Refusal::AlreadyExists(_))
        ));
        assert_eq!(
            s.check_register(&a2, t0 + TTL, TTL),
            Ok(Registration::Replaced)
        );
        // Another cluster's node.
        let mut x = node("x", "b", "10.9.0.0/24", "192.0.2.9");
        x.cluster = "c2".parse().unwrap();
        assert!(matches!(
            s.check_register(&x, t0, TTL),
            Err(Refusal::FailedPrecondition(_))
        ));
    }

    #[test]
    fn endpoint_rules_and_expiry() {
        let mut s = st();
        let t0 = Instant::now();
        s.apply_register(
            node("a", "b1", "10.1.0.0/24", "192.0.2.1"),
            Registration::New,
            t0,
        );
        let a: NodeName = "a".parse().unwrap();
        assert!(s.check_endpoint(&a, "10.1.0.5".parse().unwrap()).is_ok());
        assert!(
            matches!(s.check_endpoint(&a, "10.2.0.5".parse().unwrap()), Err(Refusal::Invalid(f)) if f.field == "ip")
        );
        assert!(matches!(
            s.check_endpoint(&"zz".parse().unwrap(), "10.1.0.5".parse().unwrap()),
            Err(Refusal::FailedPrecondition(_))
        ));
        s.put_endpoint(EndpointRecord {
            ip: "10.1.0.5".parse().unwrap(),
            cluster: "c1".parse().unwrap(),
            identity: Identity::new(ClusterId::new(1).unwrap(), 256).unwrap(),
            host_ip: "192.0.2.1".parse().unwrap(),
            node: Some(a.clone()),
            namespace: None,
            name: None,
        });
        assert!(
            s.expired_nodes(t0 + Duration::from_secs(29), TTL)
                .is_empty()
        );
        assert_eq!(s.expired_nodes(t0 + TTL, TTL), vec![a.clone()]);
        s.heartbeat(&a, "b1", t0 + Duration::from_secs(20)).unwrap();
        assert!(s.expired_nodes(t0 + TTL, TTL).is_empty());
        assert!(s.heartbeat(&a, "other", t0).is_err());
        assert!(s.remove_node(&a));
        assert!(s.endpoints.is_empty(), "a node's endpoints go with it");
        let d = s.desired();
        assert!(d.kinds[&StateKind::Nodes].is_empty());
        // Every touched key is reported once, with its current value: the
        // node and endpoint were added then removed, so both are deletes.
        let changes = s.take_changes();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes.iter().all(|(_, v)| v.is_none()));
        assert!(s.take_changes().is_empty());
        assert!(d.cluster_config.0.ends_with("cluster-config/c1"));
    }

    #[test]
    fn a_new_encryption_policy_changes_the_cluster_config_only() {
        let mut s = ClusterState::new(
            "c1".parse().unwrap(),
            ClusterId::new(1).unwrap(),
            EncryptionPolicy::default(),
        );
        let strict = EncryptionPolicy {
            mode: clustermesh_api::EncryptionMode::Wireguard,
            strict: true,
            ..Default::default()
        };
        s.set_encryption(strict);
        let changes = s.take_changes();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(changes[0].0.ends_with("cluster-config/c1"));
        let v: serde_json::Value = serde_json::from_slice(changes[0].1.as_ref().unwrap()).unwrap();
        assert_eq!(v["encryption"]["strict"], true);
        // The same policy again: nothing to export.
        s.set_encryption(strict);
        assert!(s.take_changes().is_empty());
    }
}
