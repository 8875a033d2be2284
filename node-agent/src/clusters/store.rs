//! Per-cluster stores: what one cluster currently exports, as far as this
//! agent accepted it.
//!
//! Invariants:
//! - A (re)list is buffered from `Init` to `InitDone` and then replaces the
//!   store at once (mark and sweep): keys not seen again are deleted, others
//!   are kept or updated, so a reconnect never shows a half or empty state.
//! - Every value is decoded by the api crate's strict decoder, and the key
//!   must belong to this cluster (a cluster can never speak for another).
//!   Refused keys are counted by reason and logged once per key and reason;
//!   they never enter the store. A key that turns invalid drops its previous
//!   value.
//! - A cluster's records are bounded: a value over [`MAX_VALUE_BYTES`] is
//!   refused (`value_too_large`) before it is decoded, and a new key past
//!   [`ClusterStore::max_records`] (default [`MAX_RECORDS`]) is refused
//!   (`record_limit`), so a hostile or broken remote cannot exhaust this
//!   agent's memory; what it already has stays.
//! - Network policies are kept for the local cluster only: each cluster
//!   enforces its own, so a remote's policy records are ignored (not an
//!   error, not counted as refused). The local ones are decoded as strictly
//!   as everything else (the manifest is parsed again).
//! - Cross-record rules (CIDR ownership, identity bits, endpoints inside
//!   their cluster's CIDRs) are the merge's job: it sees every cluster.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map},
    net::IpAddr,
    time::Instant,
};

use clustermesh_api::{
    ClusterConfig, ClusterName, EndpointRecord, Entry, Identity, IdentityRecord, K8sName, Key,
    KvKey, NodeName, NodeRecord, PolicyRecord, ServiceRecord, decode_entry, decode_value,
    policy::PolicyName,
};

/// A network policy's namespace (None: cluster-wide) and name.
pub type PolicyKey = (Option<K8sName>, PolicyName);

/// The records one cluster exports, by kind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    /// Node record and the sequence number of its first acceptance (older
    /// claims win CIDR conflicts).
    pub nodes: BTreeMap<NodeName, (NodeRecord, u64)>,
    pub endpoints: BTreeMap<IpAddr, EndpointRecord>,
    pub identities: BTreeMap<Identity, IdentityRecord>,
    pub services: BTreeMap<(K8sName, K8sName), ServiceRecord>,
    /// The local cluster's network policies (empty for a remote cluster).
    pub policies: BTreeMap<PolicyKey, PolicyRecord>,
}

impl Records {
    pub fn len(&self) -> usize {
        self.nodes.len()
            + self.endpoints.len()
            + self.identities.len()
            + self.services.len()
            + self.policies.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn contains(&self, k: &Key) -> bool {
        match k {
            Key::Node { node, .. } => self.nodes.contains_key(node),
            Key::Ip { ip, .. } => self.endpoints.contains_key(ip),
            Key::Identity { id, .. } => self.identities.contains_key(id),
            Key::Service {
                namespace, name, ..
            } => self
                .services
                .contains_key(&(namespace.clone(), name.clone())),
            Key::Policy {
                namespace, name, ..
            } => self
                .policies
                .contains_key(&(namespace.clone(), name.clone())),
            _ => false,
        }
    }
    fn keys(&self, cluster: &ClusterName) -> Vec<Key> {
        let c = || cluster.clone();
        self.nodes
            .keys()
            .map(|n| Key::Node {
                cluster: c(),
                node: n.clone(),
            })
            .chain(self.endpoints.keys().map(|ip| Key::Ip {
                cluster: c(),
                ip: *ip,
            }))
            .chain(self.identities.keys().map(|id| Key::Identity {
                cluster: c(),
                id: *id,
            }))
            .chain(self.services.keys().map(|(ns, n)| Key::Service {
                cluster: c(),
                namespace: ns.clone(),
                name: n.clone(),
            }))
            .chain(self.policies.keys().map(|(ns, n)| Key::Policy {
                cluster: c(),
                namespace: ns.clone(),
                name: n.clone(),
            }))
            .collect()
    }
}

/// The largest value accepted from a remote etcd: a service with the
/// most backends a record may hold (4096) fits well below it.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;
/// Records (nodes, endpoints, identities, services) accepted from one
/// cluster by default: above the largest clusters of the field (Cilium's
/// scale tests: 15k endpoints a cluster; 100k+ supported here).
pub const MAX_RECORDS: usize = 500_000;

/// Which records changed since the merge last took them
/// ([`ClusterStore::take_changes`]): what the incremental merge
/// re-derives, so that the cost of an event follows the change, not the
/// mesh.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub endpoints: BTreeSet<IpAddr>,
    pub services: BTreeSet<(K8sName, K8sName)>,
    pub nodes: BTreeSet<NodeName>,
    pub identities: bool,
    pub policies: bool,
    /// An endpoint that names (or named) a namespace changed: policy
    /// peers take an identity's namespace from its endpoints.
    pub endpoint_namespaces: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Every record of `r` (a cluster that goes or comes as a whole).
    pub fn all(r: &Records) -> Self {
        Self {
            endpoints: r.endpoints.keys().copied().collect(),
            services: r.services.keys().cloned().collect(),
            nodes: r.nodes.keys().cloned().collect(),
            identities: !r.identities.is_empty(),
            policies: !r.policies.is_empty(),
            endpoint_namespaces: r.endpoints.values().any(|e| e.namespace.is_some()),
        }
    }

    /// Adds `other`'s changes.
    pub fn extend(&mut self, other: Self) {
        self.endpoints.extend(other.endpoints);
        self.services.extend(other.services);
        self.nodes.extend(other.nodes);
        self.identities |= other.identities;
        self.policies |= other.policies;
        self.endpoint_namespaces |= other.endpoint_namespaces;
    }

    /// What differs between `old` and `new`: O(records of one cluster).
    pub fn between(old: &Records, new: &Records) -> Self {
        let mut c = Self {
            nodes: changed_nodes(&old.nodes, &new.nodes),
            identities: old.identities != new.identities,
            policies: old.policies != new.policies,
            ..Self::default()
        };
        for (ip, e) in &new.endpoints {
            let before = old.endpoints.get(ip);
            if before != Some(e) {
                c.endpoints.insert(*ip);
                c.endpoint_namespaces |=
                    e.namespace.is_some() || before.is_some_and(|b| b.namespace.is_some());
            }
        }
        for (ip, e) in &old.endpoints {
            if !new.endpoints.contains_key(ip) {
                c.endpoints.insert(*ip);
                c.endpoint_namespaces |= e.namespace.is_some();
            }
        }
        for (k, s) in &new.services {
            if old.services.get(k) != Some(s) {
                c.services.insert(k.clone());
            }
        }
        for k in old.services.keys() {
            if !new.services.contains_key(k) {
                c.services.insert(k.clone());
            }
        }
        c
    }
}

/// The nodes whose records differ between `old` and `new` (the sequence
/// numbers aside).
fn changed_nodes(
    old: &BTreeMap<NodeName, (NodeRecord, u64)>,
    new: &BTreeMap<NodeName, (NodeRecord, u64)>,
) -> BTreeSet<NodeName> {
    let differs = |a: &BTreeMap<_, (NodeRecord, u64)>,
                   b: &BTreeMap<NodeName, (NodeRecord, u64)>| {
        a.iter()
            .filter(|(n, (r, _))| b.get(*n).is_none_or(|(o, _)| o != r))
            .map(|(n, _)| NodeName::clone(n))
            .collect::<BTreeSet<_>>()
    };
    let mut out = differs(new, old);
    out.extend(differs(old, new));
    out
}

/// Counts of a cluster's records (for status).
pub use clustermesh_api::status::RecordCounts as Counts;

/// One cluster as this agent sees it.
#[derive(Debug)]
pub struct ClusterStore {
    pub name: ClusterName,
    /// The local cluster (the only one whose policies are kept).
    pub local: bool,
    pub config: Option<ClusterConfig>,
    pub records: Records,
    /// Keys refused now, with the reason (for log-once and status).
    pub refused: BTreeMap<Vec<u8>, &'static str>,
    /// Refusals since start, by reason.
    pub refused_total: BTreeMap<&'static str, u64>,
    pub events: u64,
    pub last_event: Option<Instant>,
    buffer: Option<Records>,
    /// Keys refused during the current relist.
    buffered_refusals: BTreeSet<Vec<u8>>,
    /// At most this many records from this cluster.
    pub max_records: usize,
    seq: u64,
    /// What changed since [`ClusterStore::take_changes`].
    changes: Changes,
    /// Node names and namespaces the records repeat, each held once
    /// ([`ClusterStore::share`]).
    names: std::collections::HashSet<NodeName>,
    namespaces: std::collections::HashSet<K8sName>,
}

/// What an event did to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing visible changed (buffered, identical, or refused).
    None,
    /// The records changed.
    Changed,
}

impl ClusterStore {
    pub fn new(name: ClusterName, local: bool) -> Self {
        Self {
            name,
            local,
            config: None,
            records: Records::default(),
            refused: BTreeMap::new(),
            refused_total: BTreeMap::new(),
            events: 0,
            last_event: None,
            buffer: None,
            buffered_refusals: BTreeSet::new(),
            max_records: MAX_RECORDS,
            seq: 0,
            changes: Changes::default(),
            names: Default::default(),
            namespaces: Default::default(),
        }
    }

    /// Shares the names a record repeats (its cluster's, its node's, its
    /// namespace) with the records before it, so a cluster of a hundred
    /// thousand endpoints on a few hundred nodes holds each name once.
    /// Each pool holds at most `max_records` names and starts over past
    /// that: sharing is only a saving, the records are equal either way.
    fn share(&mut self, entry: Entry) -> Entry {
        fn pooled<T: Clone + Eq + std::hash::Hash>(
            pool: &mut std::collections::HashSet<T>,
            max: usize,
            v: T,
        ) -> T {
            if let Some(p) = pool.get(&v) {
                return p.clone();
            }
            if pool.len() >= max {
                pool.clear();
            }
            pool.insert(v.clone());
            v
        }
        let max = self.max_records;
        match entry {
            Entry::Endpoint(mut r) => {
                if r.cluster == self.name {
                    r.cluster = self.name.clone();
                }
                r.node = r.node.map(|n| pooled(&mut self.names, max, n));
                r.namespace = r.namespace.map(|n| pooled(&mut self.namespaces, max, n));
                Entry::Endpoint(r)
            }
            Entry::Node(mut r) => {
                if r.cluster == self.name {
                    r.cluster = self.name.clone();
                }
                r.name = pooled(&mut self.names, max, r.name);
                Entry::Node(r)
            }
            e => e,
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            nodes: self.records.nodes.len(),
            endpoints: self.records.endpoints.len(),
            identities: self.records.identities.len(),
            services: self.records.services.len(),
            policies: self.records.policies.len(),
        }
    }

    /// What changed since the last call (the merge takes it).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Validates the cluster config read at connect time.
    pub fn check_config(&self, raw: &[u8]) -> Result<ClusterConfig, String> {
        let key = Key::ClusterConfig {
            cluster: self.name.clone(),
        };
        decode_value::<ClusterConfig>(&key, raw).map_err(|e| e.to_string())
    }

    fn refuse(&mut self, key: &[u8], reason: &'static str, detail: &str) {
        *self.refused_total.entry(reason).or_default() += 1;
        let first = self.refused.insert(key.to_vec(), reason) != Some(reason);
        if first {
            tracing::warn!(cluster = %self.name, key = %String::from_utf8_lossy(key), reason, detail, "record refused");
        }
    }

    fn target(&mut self) -> &mut Records {
        match self.buffer.as_mut() {
            Some(b) => b,
            None => &mut self.records,
        }
    }

    /// Starts a (re)list.
    pub fn init(&mut self) {
        self.buffer = Some(Records::default());
    }

    /// Ends a (re)list: the buffer replaces the records.
    pub fn init_done(&mut self) -> Effect {
        let Some(mut b) = self.buffer.take() else {
            return Effect::None;
        };
        // Keep first-acceptance order of nodes that stay.
        for (name, (_, seq)) in b.nodes.iter_mut() {
            if let Some((_, old)) = self.records.nodes.get(name) {
                *seq = *old;
            }
        }
        // Refusals of keys that are gone are forgotten.
        let keys: Vec<Vec<u8>> = self.refused.keys().cloned().collect();
        let seen: BTreeSet<String> = b.keys(&self.name).iter().map(KvKey::build).collect();
        for k in keys {
            if let Ok(s) = std::str::from_utf8(&k)
                && !seen.contains(s)
                && !self.buffered_refusals.contains(&k)
            {
                self.refused.remove(&k);
            }
        }
        self.buffered_refusals.clear();
        if b == self.records {
            return Effect::None;
        }
        self.changes.extend(Changes::between(&self.records, &b));
        crate::clusters::incremental::pack(&mut b.endpoints);
        self.records = b;
        Effect::Changed
    }

    pub fn apply(&mut self, key: &[u8], value: &[u8], now: Instant) -> Effect {
        self.events += 1;
        self.last_event = Some(now);
        if value.len() > MAX_VALUE_BYTES {
            self.refuse(
                key,
                "value_too_large",
                &format!("{} bytes, at most {MAX_VALUE_BYTES}", value.len()),
            );
            if self.buffer.is_some() {
                self.buffered_refusals.insert(key.to_vec());
            }
            return Effect::None;
        }
        // A remote cluster's policies never apply here: not even decoded.
        if !self.local
            && let Ok(Key::Policy { .. }) = Key::parse(key)
        {
            return Effect::None;
        }
        let (k, entry) = match decode_entry(key, value) {
            Ok(x) => x,
            Err(e) => {
                self.refuse(key, e.reason(), &e.to_string());
                if self.buffer.is_some() {
                    self.buffered_refusals.insert(key.to_vec());
                }
                // A key that turned invalid no longer holds its old value.
                return match Key::parse(key) {
                    Ok(k) if *k.cluster() == self.name => self.remove(&k),
                    _ => Effect::None,
                };
            }
        };
        if *k.cluster() != self.name {
            self.refuse(
                key,
                "foreign_cluster",
                &format!(
                    "key of cluster {} in cluster {}'s etcd",
                    k.cluster(),
                    self.name
                ),
            );
            return Effect::None;
        }
        let full = {
            let max = self.max_records;
            let t = self.target();
            t.len() >= max && !t.contains(&k)
        };
        if full {
            self.refuse(
                key,
                "record_limit",
                &format!(
                    "cluster {} already has {} records",
                    self.name, self.max_records
                ),
            );
            if self.buffer.is_some() {
                self.buffered_refusals.insert(key.to_vec());
            }
            return Effect::None;
        }
        self.refused.remove(key);
        self.seq += 1;
        let seq = self.seq;
        let live = self.buffer.is_none();
        let mut change = Changes::default();
        let entry = self.share(entry);
        let changed = put(self.target(), entry, seq, &mut change);
        if changed && live {
            self.changes.extend(change);
            Effect::Changed
        } else {
            Effect::None
        }
    }

    fn remove(&mut self, k: &Key) -> Effect {
        let live = self.buffer.is_none();
        let t = self.target();
        let present = t.contains(k);
        let mut change = Changes::default();
        match k {
            Key::Node { node, .. } => {
                t.nodes.remove(node);
                change.nodes.insert(node.clone());
            }
            Key::Ip { ip, .. } => {
                let old = t.endpoints.remove(ip);
                change.endpoints.insert(*ip);
                change.endpoint_namespaces = old.is_some_and(|o| o.namespace.is_some());
            }
            Key::Identity { id, .. } => {
                t.identities.remove(id);
                change.identities = true;
            }
            Key::Service {
                namespace, name, ..
            } => {
                let key = (namespace.clone(), name.clone());
                t.services.remove(&key);
                change.services.insert(key);
            }
            Key::Policy {
                namespace, name, ..
            } => {
                t.policies.remove(&(namespace.clone(), name.clone()));
                change.policies = true;
            }
            _ => {}
        }
        if present && live {
            self.changes.extend(change);
            Effect::Changed
        } else {
            Effect::None
        }
    }

    pub fn delete(&mut self, key: &[u8], now: Instant) -> Effect {
        self.events += 1;
        self.last_event = Some(now);
        self.refused.remove(key);
        match Key::parse(key) {
            Ok(k) if *k.cluster() == self.name => self.remove(&k),
            _ => Effect::None,
        }
    }

    /// Withdraws everything (stale TTL passed, or the cluster was removed).
    pub fn clear(&mut self) -> Effect {
        self.buffer = None;
        if self.records.is_empty() {
            return Effect::None;
        }
        self.changes.extend(Changes::all(&self.records));
        self.records = Records::default();
        Effect::Changed
    }
}

/// Puts a decoded record into `t`; whether it changed, and what into
/// `change`.
fn put(t: &mut Records, entry: Entry, seq: u64, change: &mut Changes) -> bool {
    match entry {
        Entry::Node(r) => {
            change.nodes.insert(r.name.clone());
            match t.nodes.entry(r.name.clone()) {
                btree_map::Entry::Occupied(mut o) => {
                    if o.get().0 == r {
                        false
                    } else {
                        o.get_mut().0 = r;
                        true
                    }
                }
                btree_map::Entry::Vacant(v) => {
                    v.insert((r, seq));
                    true
                }
            }
        }
        Entry::Endpoint(r) => {
            let ns = r.namespace.is_some();
            let old = t.endpoints.insert(r.ip, r.clone());
            change.endpoints.insert(r.ip);
            change.endpoint_namespaces = ns || old.as_ref().is_some_and(|o| o.namespace.is_some());
            old.as_ref() != Some(&r)
        }
        Entry::Identity(r) => {
            change.identities = true;
            t.identities.insert(r.id, r.clone()).as_ref() != Some(&r)
        }
        Entry::Service(r) => {
            let key = (r.namespace.clone(), r.name.clone());
            change.services.insert(key.clone());
            t.services.insert(key, r.clone()).as_ref() != Some(&r)
        }
        Entry::Policy(r) => {
            change.policies = true;
            t.policies
                .insert((r.namespace.clone(), r.name.clone()), r.clone())
                .as_ref()
                != Some(&r)
        }
        // Only state prefixes are watched; anything else is ignored.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clustermesh_api::{Record as _, encode};

    fn endpoint(ip: &str) -> (Vec<u8>, Vec<u8>) {
        let rec = EndpointRecord {
            ip: ip.parse().unwrap(),
            cluster: "c2".parse().unwrap(),
            identity: Identity::from_raw((2 << 16) | 300).unwrap(),
            host_ip: "192.168.2.1".parse().unwrap(),
            node: None,
            namespace: None,
            name: None,
        };
        (rec.key().build().into_bytes(), encode(&rec).unwrap())
    }

    #[test]
    fn a_cluster_is_bounded_in_records_and_value_size() {
        let mut s = ClusterStore::new("c2".parse().unwrap(), false);
        s.max_records = 2;
        let now = Instant::now();
        for ip in ["10.2.0.1", "10.2.0.2"] {
            let (k, v) = endpoint(ip);
            assert_eq!(s.apply(&k, &v, now), Effect::Changed, "{ip}");
        }
        // The third new key is refused; what the cluster has stays, and an
        // update of a record it has is still taken.
        let (k3, v3) = endpoint("10.2.0.3");
        assert_eq!(s.apply(&k3, &v3, now), Effect::None);
        assert_eq!(s.refused.get(&k3), Some(&"record_limit"));
        assert_eq!(s.records.endpoints.len(), 2);
        let (k1, _) = endpoint("10.2.0.1");
        let mut rec = s.records.endpoints[&"10.2.0.1".parse::<IpAddr>().unwrap()].clone();
        rec.namespace = Some("default".parse().unwrap());
        rec.name = Some("web".parse().unwrap());
        assert_eq!(s.apply(&k1, &encode(&rec).unwrap(), now), Effect::Changed);
        // A value over the size bound is refused before decoding.
        let big = vec![b' '; MAX_VALUE_BYTES + 1];
        assert_eq!(s.apply(&k1, &big, now), Effect::None);
        assert_eq!(s.refused.get(&k1), Some(&"value_too_large"));
        assert_eq!(s.refused_total.get("record_limit"), Some(&1));
        assert_eq!(s.records.endpoints.len(), 2, "the old value stays");
    }
}
