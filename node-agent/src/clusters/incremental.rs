//! The incremental merge: the node's desired state kept up to date from
//! what changed ([`Changes`] of each cluster's store), instead of merging
//! every cluster again on every event. Each update returns the keys it
//! touched ([`Delta`]): the agent applies exactly those, so neither the
//! merge nor the diff walks the whole mesh.
//!
//! What a change re-derives (the rules are [`super::merge`]'s, shared
//! function for function, so the two cannot drift):
//! - an **endpoint** (cluster C, address x): C's verdict on x, and x's
//!   ip-cache entry when C owns the pod CIDR holding x (no other cluster's
//!   record can be valid at x then, and when C does not own it, x's entry
//!   is not C's): one lookup in the CIDR-ownership index and one in C's
//!   store, whatever the size of the mesh;
//! - a **service** of a remote cluster: the one local service of that
//!   name (O(clusters)); a local service: the local services (frontend
//!   conflicts are decided among them, in name order);
//! - a **node**, a cluster coming or going, its declared ranges or the
//!   range holders (incumbents): node admission again (indexed, O(nodes x
//!   log nodes), independent of the endpoints), then only the endpoints
//!   inside the pod CIDRs whose owner changed (range scans of each store)
//!   and the services with a backend inside them (found by a scan of the
//!   service records; their backends are checked against the owners);
//! - an **identity**, a local policy, a local endpoint or an endpoint
//!   naming a namespace: the network-policy section (still whole: it is
//!   a function of every identity and the local endpoints);
//! - the local **encryption policy**, the local cluster's id or a remote
//!   cluster's id: everything (a rebuild, diffed once against the old
//!   state).
//!
//! The property test below drives random event sequences and checks after
//! every step that the state equals [`super::merge::merge`] of the same
//! input.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use clustermesh_api::{ClusterName, EncryptionPolicy, Identity, IpCidr, NodeRecord};

use super::{
    merge::{
        self, ClusterInput, MergeInput, NodeSection, ServiceSection, add_node, clusters,
        endpoint_entry, identity_rejections, lone_verdict, merge_nodes, merge_service,
        merge_services, remove_node, service_name,
    },
    prefixes::PrefixMap,
    store::Changes,
};
use crate::desired::{Desired, IpCacheEntry, Rejection};

/// The keys of each target an update touched (their desired value may or
/// may not differ from what the target holds).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    pub ipcache: BTreeSet<IpCidr>,
    pub tunnels: BTreeSet<IpCidr>,
    pub peers: BTreeSet<String>,
    pub services: BTreeSet<String>,
    pub policy: bool,
    pub network_policies: BTreeSet<Identity>,
    pub policy_cidrs: BTreeSet<IpCidr>,
    /// Refusals that appeared with this update (logged once).
    pub rejected: Vec<Rejection>,
}

impl Delta {
    /// Whether no target key was touched.
    pub fn is_empty(&self) -> bool {
        self.ipcache.is_empty()
            && self.tunnels.is_empty()
            && self.peers.is_empty()
            && self.services.is_empty()
            && !self.policy
            && self.network_policies.is_empty()
            && self.policy_cidrs.is_empty()
    }
}

/// What, when it differs, makes an update a rebuild.
#[derive(Debug, Clone, PartialEq)]
struct Basis {
    encryption: EncryptionPolicy,
    ids: BTreeMap<ClusterName, u8>,
}

/// What, when it differs, makes node admission run again (with the range
/// holders, which [`Incremental`] keeps indexed).
#[derive(Debug, Clone, PartialEq)]
struct NodeBasis {
    declared: BTreeMap<ClusterName, Vec<IpCidr>>,
}

/// The basis of an input with policy `encryption` and clusters `all`.
fn basis(encryption: EncryptionPolicy, all: &[(bool, &ClusterInput<'_>)]) -> (Basis, NodeBasis) {
    (
        Basis {
            encryption,
            ids: all
                .iter()
                .map(|(_, c)| (c.name.clone(), c.id.get()))
                .collect(),
        },
        NodeBasis {
            declared: all
                .iter()
                .map(|(_, c)| (c.name.clone(), c.declared.to_vec()))
                .collect(),
        },
    )
}

impl Basis {
    /// Whether `all` has exactly these clusters and ids (compared in
    /// place: an update allocates no copy of the mesh's membership).
    fn same_ids(&self, all: &[(bool, &ClusterInput<'_>)]) -> bool {
        self.ids.len() == all.len()
            && all
                .iter()
                .all(|(_, c)| self.ids.get(c.name) == Some(&c.id.get()))
    }
}

impl NodeBasis {
    /// Whether `all` declares exactly these ranges, cluster by cluster.
    fn same(&self, all: &[(bool, &ClusterInput<'_>)]) -> bool {
        self.declared.len() == all.len()
            && all.iter().all(|(_, c)| {
                self.declared
                    .get(c.name)
                    .is_some_and(|d| d[..] == *c.declared)
            })
    }
}

/// The merged state, kept.
#[derive(Debug, Default)]
pub struct Incremental {
    basis: Option<(Basis, NodeBasis)>,
    /// The desired state (its `rejected` stays empty: see
    /// [`Incremental::rejected`]).
    desired: Desired,
    nodes: NodeSection,
    /// Every node offered (admitted or not), and how many of them hold
    /// each pod CIDR, underlay address and key: whether a changed node
    /// meets any other.
    offered: BTreeMap<(ClusterName, clustermesh_api::NodeName), NodeRecord>,
    offered_cidrs: PrefixMap<Vec<(ClusterName, clustermesh_api::NodeName)>>,
    offered_ips: BTreeMap<IpAddr, u32>,
    offered_keys: BTreeMap<clustermesh_api::WgPublicKey, u32>,
    /// `MergeInput::incumbents`, indexed.
    incumbents: PrefixMap<u8>,
    /// Endpoint refusals by address (one per cluster claiming it).
    endpoints_rejected: BTreeMap<IpAddr, Vec<Rejection>>,
    identities_rejected: BTreeMap<ClusterName, Vec<Rejection>>,
    services: ServiceSection,
}

/// Rebuilds `m` from its sorted entries, which fills every B-tree node
/// (built by inserts in key order, as a merge or a sync does, nodes stay
/// about half full). A mesh of a million endpoints saves tens of bytes an
/// entry; later inserts and removals keep the nodes at least half full.
pub fn pack<K: Ord, V>(m: &mut BTreeMap<K, V>) {
    *m = std::mem::take(m).into_iter().collect();
}

/// Inserts every key where `old` and `new` differ into `keys`.
fn diff_keys<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    keys: &mut BTreeSet<K>,
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            keys.insert(k.clone());
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            keys.insert(k.clone());
        }
    }
}

/// Every cluster's endpoint addresses inside `ranges`, into `out`: range
/// scans of each store, O(clusters x log endpoints + found).
fn endpoints_in(all: &[(bool, &ClusterInput<'_>)], ranges: &BTreeSet<IpCidr>, out: &mut Rederive) {
    for p in ranges {
        for (i, (_, c)) in all.iter().enumerate() {
            let inside = c
                .records
                .endpoints
                .range(p.addr()..)
                .take_while(|(ip, _)| p.contains(**ip));
            for (ip, _) in inside {
                if let Some(holders) = out.entry(*ip).or_insert_with(|| Some(Vec::new()))
                    && !holders.contains(&i)
                {
                    holders.push(i);
                }
            }
        }
    }
}

/// The keys of every cluster's services with a backend inside `ranges`:
/// a scan of the service records (no merge), O(services x backends x
/// prefix lengths).
fn services_in<'a>(
    all: &[(bool, &'a ClusterInput<'a>)],
    ranges: &PrefixMap<()>,
) -> impl Iterator<Item = &'a merge::ServiceKey> {
    all.iter()
        .flat_map(|(_, c)| c.records.services.iter())
        .filter(|(_, s)| {
            s.backends
                .iter()
                .any(|b| ranges.containing(b.ip).next().is_some())
        })
        .map(|(k, _)| k)
}

/// Addresses to derive again, each with the clusters (indexes into the
/// merge order) that have a record at it when a range scan found them
/// all, or None: ask every cluster.
type Rederive = BTreeMap<IpAddr, Option<Vec<usize>>>;

/// The refusals of `new` that `old` did not have.
fn appeared<'a>(old: &[Rejection], new: &'a [Rejection]) -> impl Iterator<Item = &'a Rejection> {
    let seen: BTreeSet<(&ClusterName, &str, &str)> = old
        .iter()
        .map(|r| (&r.cluster, r.record.as_str(), r.reason))
        .collect();
    new.iter()
        .filter(move |r| !seen.contains(&(&r.cluster, r.record.as_str(), r.reason)))
}

impl Incremental {
    pub fn new() -> Self {
        Self::default()
    }

    /// The desired state (without its refusals).
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Rebuilds the ip-cache with packed nodes ([`pack`]), once the mesh
    /// has synced.
    pub fn pack(&mut self) {
        pack(&mut self.desired.ipcache);
    }

    /// Every refusal now.
    pub fn rejected(&self) -> impl Iterator<Item = &Rejection> {
        self.nodes
            .rejected
            .iter()
            .chain(self.identities_rejected.values().flatten())
            .chain(self.endpoints_rejected.values().flatten())
            .chain(self.services.rejected.values().flatten())
    }

    /// Brings the state up to `input`, given what changed in each
    /// cluster's records since the last update (a cluster no longer in
    /// `input` lists every record it had).
    pub fn update(
        &mut self,
        input: &MergeInput<'_>,
        changes: &BTreeMap<ClusterName, Changes>,
    ) -> Delta {
        let all = clusters(input);
        let Some((old_b, old_nb)) = self.basis.take() else {
            return self.rebuild(input, basis(input.encryption, &all));
        };
        // A cluster's id is in its identities and entries: changed, all
        // is derived again (as when the encryption policy changes).
        let renumbered = all
            .iter()
            .any(|(_, c)| old_b.ids.get(c.name).is_some_and(|id| *id != c.id.get()));
        if old_b.encryption != input.encryption || renumbered {
            return self.rebuild(input, basis(input.encryption, &all));
        }
        let membership = !old_nb.same(&all);
        let (b, nb) = if membership || !old_b.same_ids(&all) {
            basis(input.encryption, &all)
        } else {
            (old_b, old_nb)
        };
        let mut delta = Delta::default();
        let mut rederive = Rederive::new();
        let mut moved = BTreeSet::new();
        let holders = self.holders_changed(input);
        let holders_moved = !holders.is_empty() && !self.incumbents_inert(&all, holders);
        if membership || holders_moved {
            moved = self.update_nodes(input, &all, &mut rederive, &mut delta);
        } else if changes.values().any(|c| !c.nodes.is_empty()) {
            moved = match self.nodes_alone(input, &all, changes, &mut rederive, &mut delta) {
                Ok(m) => m,
                Err(mut m) => {
                    m.extend(self.update_nodes(input, &all, &mut rederive, &mut delta));
                    m
                }
            };
        }
        let services_all = !moved.is_empty();
        let moved: PrefixMap<()> = moved.into_iter().map(|c| (c, ())).collect();
        for (name, ch) in changes {
            let c = all.iter().find(|(_, c)| c.name == name).copied();
            for ip in &ch.endpoints {
                if moved.containing(*ip).next().is_some() {
                    // Its range changed owner: the range scan found every
                    // cluster with a record at it (none, if it was
                    // deleted).
                    rederive.entry(*ip).or_insert_with(|| Some(Vec::new()));
                } else {
                    // Its owner is what it was.
                    self.endpoint_changed(input, name, c, *ip, &mut delta);
                }
            }
            if ch.identities {
                self.update_identities(name, c, &mut delta);
            }
        }
        for (ip, holders) in rederive {
            self.rederive(input, &all, ip, holders.as_deref(), &mut delta);
        }
        let local = changes.get(input.local.name);
        if local.is_some_and(|c| !c.services.is_empty()) {
            self.update_services(input, &mut delta);
        } else {
            let mut keys: BTreeSet<_> = changes.values().flat_map(|c| &c.services).collect();
            if services_all {
                // Only a backend's owner changed: the services with a
                // backend inside a range that moved.
                keys.extend(services_in(&all, &moved));
            }
            for key in keys {
                self.update_service(input, key, &mut delta);
            }
        }
        let policy = membership
            || local.is_some_and(|c| c.policies || !c.endpoints.is_empty())
            || changes
                .values()
                .any(|c| c.identities || c.endpoint_namespaces);
        if policy {
            self.update_policy(input, &mut delta);
        }
        self.basis = Some((b, nb));
        delta
    }

    /// Everything from scratch, diffed once against the old state.
    fn rebuild(&mut self, input: &MergeInput<'_>, basis: (Basis, NodeBasis)) -> Delta {
        let old_rejected: Vec<Rejection> = self.rejected().cloned().collect();
        let old = std::mem::take(&mut self.desired);
        self.nodes = merge_nodes(input);
        self.reindex(input);
        let mut new = Desired {
            tunnels: self.nodes.tunnels.clone(),
            peers: self.nodes.peers.clone(),
            ipcache: self.nodes.ipcache.clone(),
            ..Desired::default()
        };
        new.policy.insert((), input.encryption);
        self.identities_rejected.clear();
        self.endpoints_rejected.clear();
        for (local, c) in clusters(input) {
            let ids = identity_rejections(c);
            if !ids.is_empty() {
                self.identities_rejected.insert(c.name.clone(), ids);
            }
            for rec in c.records.endpoints.values() {
                match endpoint_entry(input, c, local, rec, &self.nodes.owners) {
                    Ok(e) => {
                        new.ipcache.insert(IpCidr::host(rec.ip), e);
                    }
                    Err(r) => self.endpoints_rejected.entry(rec.ip).or_default().push(r),
                }
            }
        }
        self.services = merge_services(input, &self.nodes.owners);
        new.services = std::mem::take(&mut self.services.services);
        new.network_policies = super::policy::merge_policies(input);
        new.policy_cidrs = super::policy::merge_policy_cidrs(input);
        let mut delta = Delta::default();
        diff_keys(&old.ipcache, &new.ipcache, &mut delta.ipcache);
        diff_keys(&old.tunnels, &new.tunnels, &mut delta.tunnels);
        diff_keys(&old.peers, &new.peers, &mut delta.peers);
        diff_keys(&old.services, &new.services, &mut delta.services);
        delta.policy = old.policy != new.policy;
        diff_keys(
            &old.network_policies,
            &new.network_policies,
            &mut delta.network_policies,
        );
        diff_keys(
            &old.policy_cidrs,
            &new.policy_cidrs,
            &mut delta.policy_cidrs,
        );
        self.desired = new;
        let new_rejected: Vec<Rejection> = self.rejected().cloned().collect();
        delta.rejected = appeared(&old_rejected, &new_rejected).cloned().collect();
        self.basis = Some(basis);
        delta
    }

    /// Node admission again; the addresses whose entry may have changed go
    /// into `rederive`. Returns the pod CIDRs whose owner changed.
    fn update_nodes(
        &mut self,
        input: &MergeInput<'_>,
        all: &[(bool, &ClusterInput<'_>)],
        rederive: &mut Rederive,
        delta: &mut Delta,
    ) -> BTreeSet<IpCidr> {
        let new = merge_nodes(input);
        self.reindex(input);
        let old = std::mem::replace(&mut self.nodes, new);
        let new = &self.nodes;
        diff_keys(&old.tunnels, &new.tunnels, &mut delta.tunnels);
        diff_keys(&old.peers, &new.peers, &mut delta.peers);
        let mut hosts = BTreeSet::new();
        diff_keys(&old.ipcache, &new.ipcache, &mut hosts);
        for h in &hosts {
            rederive.insert(h.addr(), None);
        }
        delta
            .rejected
            .extend(appeared(&old.rejected, &new.rejected).cloned());
        // Pod CIDRs gained, lost or moved: every endpoint inside them.
        let mut ranges = BTreeSet::new();
        for (c, o) in new.owners.iter() {
            if old.owners.get(c) != Some(o) {
                ranges.insert(*c);
            }
        }
        for (c, _) in old.owners.iter() {
            if new.owners.get(c).is_none() {
                ranges.insert(*c);
            }
        }
        endpoints_in(all, &ranges, rederive);
        // Addresses a gone cluster had are in its changes; those of a
        // refused node's range never had an entry from it.
        self.desired.tunnels = new.tunnels.clone();
        self.desired.peers = new.peers.clone();
        ranges
    }

    /// The offered-node indexes from every cluster's records.
    fn reindex(&mut self, input: &MergeInput<'_>) {
        self.offered.clear();
        self.offered_cidrs = PrefixMap::default();
        self.offered_ips.clear();
        self.offered_keys.clear();
        self.incumbents = input.incumbents.iter().map(|(c, id)| (*c, *id)).collect();
        for (_, c) in clusters(input) {
            for (rec, _) in c.records.nodes.values() {
                self.offer(c.name, rec, true);
                self.offered
                    .insert((c.name.clone(), rec.name.clone()), rec.clone());
            }
        }
    }

    /// Counts `rec`'s ranges, addresses and keys in (or out of) the
    /// offered-node indexes.
    fn offer(&mut self, cluster: &ClusterName, rec: &NodeRecord, add: bool) {
        fn count<K: Ord + Copy>(m: &mut BTreeMap<K, u32>, k: K, add: bool) {
            let n = m.get(&k).copied().unwrap_or(0);
            match (add, n) {
                (true, _) => {
                    m.insert(k, n + 1);
                }
                (false, 0 | 1) => {
                    m.remove(&k);
                }
                (false, _) => {
                    m.insert(k, n - 1);
                }
            }
        }
        let me = (cluster.clone(), rec.name.clone());
        for c in &rec.pod_cidrs {
            let mut holders = self.offered_cidrs.remove(c).unwrap_or_default();
            if add {
                holders.push(me.clone());
            } else if let Some(i) = holders.iter().position(|h| *h == me) {
                holders.remove(i);
            }
            if !holders.is_empty() {
                self.offered_cidrs.insert(*c, holders);
            }
        }
        for ip in &rec.underlay_ips {
            count(&mut self.offered_ips, *ip, add);
        }
        for k in &rec.wireguard_public_keys {
            count(&mut self.offered_keys, *k, add);
        }
    }

    /// The ranges whose holder differs from the last update's, each with
    /// its holder then and now: of the ranges
    /// [`MergeInput::incumbents_changed`] names when it does (O(ranges
    /// touched)), else of every range held then or now.
    fn holders_changed(&self, input: &MergeInput<'_>) -> Vec<(IpCidr, Option<u8>, Option<u8>)> {
        let differs = |c: &IpCidr| {
            let was = self.incumbents.get(c).copied();
            let now = input.incumbents.get(c).copied();
            (was != now).then_some((*c, was, now))
        };
        match input.incumbents_changed {
            Some(touched) => touched.iter().filter_map(differs).collect(),
            None => {
                let gone = self
                    .incumbents
                    .iter()
                    .filter(|(c, _)| !input.incumbents.contains_key(c))
                    .map(|(c, _)| c);
                input
                    .incumbents
                    .keys()
                    .chain(gone)
                    .filter_map(differs)
                    .collect()
            }
        }
    }

    /// Whether the range holders' change (`changed`: range, holder then,
    /// holder now) changes no verdict: each range that changed overlaps
    /// at most one node offered, which meets no other node and belongs to
    /// the cluster the range is (and was) held for. Then only that node's
    /// place in the admission order moves, which no other node sees.
    /// Keeps the index of holders.
    fn incumbents_inert(
        &mut self,
        all: &[(bool, &ClusterInput<'_>)],
        changed: Vec<(IpCidr, Option<u8>, Option<u8>)>,
    ) -> bool {
        let inert = changed.iter().all(|(p, was, now)| {
            let mut holders = self
                .offered_cidrs
                .overlapping(p)
                .flat_map(|(_, h)| h.iter());
            let (Some(h), None) = (holders.next(), holders.next()) else {
                // Nobody's range: no verdict reads it.
                return self.offered_cidrs.overlapping(p).next().is_none();
            };
            let id = all
                .iter()
                .find(|(_, c)| *c.name == h.0)
                .map(|(_, c)| c.id.get());
            id.is_some()
                && [was, now].iter().all(|o| o.is_none_or(|o| Some(o) == id))
                && self.offered.get(h).is_some_and(|rec| self.alone_here(rec))
        });
        if inert {
            for (p, _, now) in changed {
                match now {
                    Some(id) => self.incumbents.insert(p, id),
                    None => self.incumbents.remove(&p),
                };
            }
        }
        inert
    }

    /// [`Incremental::alone`] for a node that is in the index itself.
    fn alone_here(&self, rec: &NodeRecord) -> bool {
        self.alone_counting(rec, 1)
    }

    /// Whether `rec` shares no pod CIDR, underlay address or key with any
    /// node offered (itself taken out), and no range of it holds another's
    /// address: then admitting or refusing it changes nobody else's
    /// verdict, whatever the order.
    fn alone(&self, rec: &NodeRecord) -> bool {
        self.alone_counting(rec, 0)
    }

    /// The index holds `rec`'s ranges, addresses and keys exactly `own`
    /// times (0: it is taken out; 1: it is in), and nothing else meets them.
    fn alone_counting(&self, rec: &NodeRecord, own: usize) -> bool {
        rec.pod_cidrs.iter().all(|p| {
            self.offered_cidrs
                .overlapping(p)
                .all(|(c, h)| c == p && h.len() == own)
                && self
                    .offered_ips
                    .range(p.addr()..)
                    .take_while(|(ip, _)| p.contains(**ip))
                    .next()
                    .is_none()
        }) && rec.underlay_ips.iter().all(|ip| {
            self.offered_cidrs.containing(*ip).next().is_none()
                && self.offered_ips.get(ip).map_or(0, |n| *n as usize) == own
        }) && rec
            .wireguard_public_keys
            .iter()
            .all(|k| self.offered_keys.get(k).map_or(0, |n| *n as usize) == own)
    }

    /// The changed nodes one by one, each against the rest, when each
    /// (before and after) is [`Incremental::alone`]: O(log nodes) a node.
    /// Returns the pod CIDRs whose owner changed; Err (with those so far)
    /// as soon as one is not alone: node admission must run again,
    /// and what was done so far is in `delta` and `rederive`.
    fn nodes_alone(
        &mut self,
        input: &MergeInput<'_>,
        all: &[(bool, &ClusterInput<'_>)],
        changes: &BTreeMap<ClusterName, Changes>,
        rederive: &mut Rederive,
        delta: &mut Delta,
    ) -> Result<BTreeSet<IpCidr>, BTreeSet<IpCidr>> {
        let mut ranges = BTreeSet::new();
        let mut peers = BTreeSet::new();
        for (name, ch) in changes {
            let c = all.iter().find(|(_, c)| c.name == name).copied();
            let local = name == input.local.name;
            for node in &ch.nodes {
                let key = (name.clone(), node.clone());
                let old = self.offered.remove(&key);
                if let Some(o) = &old {
                    self.offer(name, o, false);
                }
                let new = c.and_then(|(_, c)| c.records.nodes.get(node).map(|(r, _)| r.clone()));
                let lone = old.as_ref().is_none_or(|o| self.alone(o))
                    && new.as_ref().is_none_or(|n| self.alone(n));
                if !lone {
                    // Node admission runs again from what was changed so
                    // far: what changed from the state before must still
                    // be in the delta.
                    endpoints_in(all, &ranges, rederive);
                    delta.tunnels.extend(ranges.iter().copied());
                    delta.peers.extend(peers);
                    return Err(ranges);
                }
                let before: Vec<Rejection> = self.nodes.rejected.clone();
                for r in old.iter().chain(new.iter()) {
                    ranges.extend(r.pod_cidrs.iter().copied());
                    if !local {
                        for ip in &r.underlay_ips {
                            rederive.insert(*ip, None);
                        }
                    }
                    peers.insert(format!("{name}/{node}"));
                }
                if let Some(o) = &old {
                    remove_node(&mut self.nodes, name, local, o);
                }
                if let (Some(n), Some((_, c))) = (new, c) {
                    match lone_verdict(&self.incumbents, local, c, &n) {
                        Some(r) => self.nodes.rejected.push(r),
                        None => add_node(input, &mut self.nodes, local, c, &n),
                    }
                    self.offer(name, &n, true);
                    self.offered.insert(key, n);
                }
                delta
                    .rejected
                    .extend(appeared(&before, &self.nodes.rejected).cloned());
            }
        }
        for p in &ranges {
            match self.nodes.tunnels.get(p) {
                Some(t) => self.desired.tunnels.insert(*p, t.clone()),
                None => self.desired.tunnels.remove(p),
            };
            delta.tunnels.insert(*p);
        }
        endpoints_in(all, &ranges, rederive);
        for k in peers {
            match self.nodes.peers.get(&k) {
                Some(v) => self.desired.peers.insert(k.clone(), v.clone()),
                None => self.desired.peers.remove(&k),
            };
            delta.peers.insert(k);
        }
        Ok(ranges)
    }

    /// Sets `x`'s ip-cache entry: the endpoint's when it has a valid one,
    /// else the remote node's, else none.
    fn set_ip(&mut self, x: IpAddr, endpoint: Option<IpCacheEntry>, delta: &mut Delta) {
        let key = IpCidr::host(x);
        let want = endpoint.or_else(|| self.nodes.ipcache.get(&key).copied());
        let changed = match want {
            Some(e) => self.desired.ipcache.insert(key, e) != Some(e),
            None => self.desired.ipcache.remove(&key).is_some(),
        };
        if changed {
            delta.ipcache.insert(key);
        }
    }

    /// Replaces `cluster`'s refusal of `x` (if any) with `r`.
    fn set_refusal(
        &mut self,
        x: IpAddr,
        cluster: &ClusterName,
        r: Option<Rejection>,
        delta: &mut Delta,
    ) {
        let list = self.endpoints_rejected.entry(x).or_default();
        let old = list.iter().position(|o| o.cluster == *cluster);
        let old = old.map(|i| list.remove(i));
        if let Some(r) = r {
            if old.as_ref().is_none_or(|o| o.reason != r.reason) {
                delta.rejected.push(r.clone());
            }
            list.push(r);
        }
        if list.is_empty() {
            self.endpoints_rejected.remove(&x);
        }
    }

    /// Cluster `name`'s record at `x` changed (`c`: the cluster, when it
    /// is still in the input).
    fn endpoint_changed(
        &mut self,
        input: &MergeInput<'_>,
        name: &ClusterName,
        c: Option<(bool, &ClusterInput<'_>)>,
        x: IpAddr,
        delta: &mut Delta,
    ) {
        let owns = merge::owner_of(&self.nodes.owners, x).is_some_and(|o| o.cluster == *name);
        let verdict = c.and_then(|(local, c)| {
            c.records
                .endpoints
                .get(&x)
                .map(|rec| endpoint_entry(input, c, local, rec, &self.nodes.owners))
        });
        match verdict {
            Some(Ok(e)) => {
                self.set_refusal(x, name, None, delta);
                self.set_ip(x, Some(e), delta);
            }
            Some(Err(r)) => {
                self.set_refusal(x, name, Some(r), delta);
                if owns {
                    self.set_ip(x, None, delta);
                }
            }
            None => {
                self.set_refusal(x, name, None, delta);
                if owns {
                    self.set_ip(x, None, delta);
                }
            }
        }
    }

    /// Every cluster's verdict on `x` again (of `holders` only, when they
    /// are known to be all the clusters with a record at `x`).
    fn rederive(
        &mut self,
        input: &MergeInput<'_>,
        all: &[(bool, &ClusterInput<'_>)],
        x: IpAddr,
        holders: Option<&[usize]>,
        delta: &mut Delta,
    ) {
        let old = self.endpoints_rejected.remove(&x).unwrap_or_default();
        let mut entry = None;
        let mut refused = Vec::new();
        let mut ask = |local: bool, c: &ClusterInput<'_>| {
            if let Some(rec) = c.records.endpoints.get(&x) {
                match endpoint_entry(input, c, local, rec, &self.nodes.owners) {
                    Ok(e) => entry = Some(e),
                    Err(r) => refused.push(r),
                }
            }
        };
        match holders {
            Some(h) => {
                for (local, c) in h.iter().filter_map(|i| all.get(*i)) {
                    ask(*local, c);
                }
            }
            None => {
                for (local, c) in all {
                    ask(*local, c);
                }
            }
        }
        delta.rejected.extend(appeared(&old, &refused).cloned());
        if !refused.is_empty() {
            self.endpoints_rejected.insert(x, refused);
        }
        self.set_ip(x, entry, delta);
    }

    fn update_identities(
        &mut self,
        name: &ClusterName,
        c: Option<(bool, &ClusterInput<'_>)>,
        delta: &mut Delta,
    ) {
        let new = c.map(|(_, c)| identity_rejections(c)).unwrap_or_default();
        let old = self.identities_rejected.remove(name).unwrap_or_default();
        delta.rejected.extend(appeared(&old, &new).cloned());
        if !new.is_empty() {
            self.identities_rejected.insert(name.clone(), new);
        }
    }

    /// Every local service again.
    fn update_services(&mut self, input: &MergeInput<'_>, delta: &mut Delta) {
        let mut new = merge_services(input, &self.nodes.owners);
        diff_keys(&self.desired.services, &new.services, &mut delta.services);
        let old: Vec<Rejection> = self.services.rejected.values().flatten().cloned().collect();
        let now: Vec<Rejection> = new.rejected.values().flatten().cloned().collect();
        delta.rejected.extend(appeared(&old, &now).cloned());
        self.desired.services = std::mem::take(&mut new.services);
        self.services = new;
    }

    /// The local service `key` (a remote's same-named service changed).
    fn update_service(
        &mut self,
        input: &MergeInput<'_>,
        key: &merge::ServiceKey,
        delta: &mut Delta,
    ) {
        if !self.services.accepted.contains(key) {
            return;
        }
        let Some(svc) = input.local.records.services.get(key) else {
            return;
        };
        let (merged, rejected) = merge_service(input, key, svc, &self.nodes.owners);
        let name = service_name(key);
        if self.desired.services.get(&name) != Some(&merged) {
            delta.services.insert(name.clone());
            self.desired.services.insert(name, merged);
        }
        let old = self.services.rejected.remove(key).unwrap_or_default();
        delta.rejected.extend(appeared(&old, &rejected).cloned());
        if !rejected.is_empty() {
            self.services.rejected.insert(key.clone(), rejected);
        }
    }

    fn update_policy(&mut self, input: &MergeInput<'_>, delta: &mut Delta) {
        let policies = super::policy::merge_policies(input);
        let cidrs = super::policy::merge_policy_cidrs(input);
        diff_keys(
            &self.desired.network_policies,
            &policies,
            &mut delta.network_policies,
        );
        diff_keys(&self.desired.policy_cidrs, &cidrs, &mut delta.policy_cidrs);
        self.desired.network_policies = policies;
        self.desired.policy_cidrs = cidrs;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Instant;

    use clustermesh_api::{
        Affinity, Backend, BackendState, ClusterId, EncryptionMode, EndpointRecord, IdentityRecord,
        KvKey, Labels, NodeName, NodeRecord, PolicyRecord, Protocol, Record, ServicePort,
        ServiceRecord, WgPublicKey, encode, policy::parse_documents,
    };

    use super::*;
    use crate::clusters::store::ClusterStore;

    /// xorshift64*: a seeded, reproducible stream (no dependency for it).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len() as u64) as usize]
        }
    }

    const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  egress:
  - toCIDR: [203.0.113.0/24]
"#;

    /// A small address space, so that ranges, addresses, keys and
    /// frontends collide often.
    fn record(rng: &mut Rng, c: u8) -> (Vec<u8>, Vec<u8>) {
        let cluster: ClusterName = format!("c{c}").parse().unwrap();
        let ident = |rng: &mut Rng| {
            let cid = if rng.below(8) == 0 {
                *rng.pick(&[1u64, 2, 3, 4])
            } else {
                u64::from(c)
            };
            if rng.below(12) == 0 {
                Identity::WORLD
            } else {
                Identity::new(ClusterId::new(cid).unwrap(), 256 + rng.below(3) as u16).unwrap()
            }
        };
        let pod_ip = |rng: &mut Rng| -> IpAddr {
            format!(
                "10.{}.{}.{}",
                1 + rng.below(3),
                rng.below(2),
                1 + rng.below(4)
            )
            .parse()
            .unwrap()
        };
        let (k, v) = match rng.below(10) {
            0..=2 => {
                let len = *rng.pick(&[23u8, 24, 24, 24, 16]);
                let cidr = IpCidr::truncate(
                    format!("10.{}.{}.0", 1 + rng.below(3), rng.below(2))
                        .parse()
                        .unwrap(),
                    len,
                );
                let r = NodeRecord {
                    name: format!("n{}", rng.below(4)).parse().unwrap(),
                    cluster,
                    underlay_ips: vec![format!("192.0.2.{}", 1 + rng.below(12)).parse().unwrap()],
                    pod_cidrs: vec![cidr],
                    wireguard_public_keys: vec![
                        WgPublicKey::from_bytes([10 + rng.below(10) as u8; 32]).unwrap(),
                    ],
                    wireguard_port: None,
                    boot_id: "b".parse().unwrap(),
                };
                (r.key(), encode(&r).unwrap())
            }
            3..=6 => {
                let r = EndpointRecord {
                    ip: pod_ip(rng),
                    cluster,
                    identity: ident(rng),
                    host_ip: format!("192.0.2.{}", 1 + rng.below(12)).parse().unwrap(),
                    node: Some(format!("n{}", rng.below(4)).parse().unwrap()),
                    namespace: (rng.below(2) == 0).then(|| "default".parse().unwrap()),
                    name: None,
                };
                (r.key(), encode(&r).unwrap())
            }
            7 => {
                let app = *rng.pick(&["db", "web"]);
                let mut id = ident(rng);
                if id.is_reserved() {
                    id = Identity::new(ClusterId::new(u64::from(c)).unwrap(), 256).unwrap();
                }
                let r = IdentityRecord {
                    id,
                    cluster,
                    labels: Labels::new([("k8s:app".to_owned(), app.to_owned())].into()).unwrap(),
                };
                (r.key(), encode(&r).unwrap())
            }
            8 if c == 1 && rng.below(3) == 0 => {
                let d = parse_documents(POLICY).unwrap().remove(0);
                let r = PolicyRecord::new(cluster, d.policy, d.manifest);
                (r.key(), encode(&r).unwrap())
            }
            _ => {
                let r = ServiceRecord {
                    cluster: cluster.clone(),
                    namespace: "default".parse().unwrap(),
                    name: rng.pick(&["web", "api"]).parse().unwrap(),
                    frontends: vec![format!("10.96.0.{}", 1 + rng.below(2)).parse().unwrap()],
                    ports: vec![ServicePort {
                        name: None,
                        protocol: Protocol::Tcp,
                        port: *rng.pick(&[80, 80, 81]),
                        target_port: 8080,
                    }],
                    backends: (0..rng.below(3))
                        .map(|_| pod_ip(rng))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .map(|ip| Backend {
                            ip,
                            cluster: cluster.clone(),
                            state: BackendState::Ready,
                            node: None,
                        })
                        .collect(),
                    global: rng.below(4) != 0,
                    shared: rng.below(4) != 0,
                    affinity: Affinity::Local,
                };
                (r.key(), encode(&r).unwrap())
            }
        };
        (k.build().into_bytes(), v)
    }

    fn sorted(it: impl Iterator<Item = Rejection>) -> Vec<(String, String, &'static str, String)> {
        let mut v: Vec<_> = it
            .map(|r| (r.cluster.to_string(), r.record, r.reason, r.detail))
            .collect();
        v.sort();
        v
    }

    /// Random event sequences over four clusters (puts, deletes, relists,
    /// withdrawals, a cluster leaving and coming back, range holders and
    /// the encryption policy changing): after every step the kept state
    /// equals the full merge of the same input, and the delta names every
    /// key that changed.
    #[test]
    fn incremental_equals_the_full_merge_after_every_event() {
        let names: Vec<ClusterName> = (1..=4).map(|i| format!("c{i}").parse().unwrap()).collect();
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut stores: Vec<ClusterStore> = names
                .iter()
                .enumerate()
                .map(|(i, n)| ClusterStore::new(n.clone(), i == 0))
                .collect();
            let mut present = [true; 4];
            let mut incumbents: BTreeMap<IpCidr, u8> = BTreeMap::new();
            // The ranges whose holder changed since the last update; odd
            // seeds pass them as the hint, even seeds leave the engine to
            // compare every range.
            let mut touched: BTreeSet<IpCidr> = BTreeSet::new();
            let mut encryption = EncryptionPolicy::default();
            let mut engine = Incremental::new();
            let mut gone: BTreeMap<ClusterName, Changes> = BTreeMap::new();
            let now = Instant::now();
            for step in 0..150 {
                let c = rng.below(4) as usize;
                match rng.below(40) {
                    0 => {
                        // A relist: some of what it had, some new.
                        let keep: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.below(6))
                            .map(|_| record(&mut rng, c as u8 + 1))
                            .collect();
                        stores[c].init();
                        for (k, v) in keep {
                            stores[c].apply(&k, &v, now);
                        }
                        stores[c].init_done();
                    }
                    1 => {
                        stores[c].clear();
                    }
                    2 if c > 0 => {
                        // The cluster leaves the input (removed or refused)
                        // or comes back.
                        // Either way every record it has comes or goes.
                        gone.entry(names[c].clone())
                            .or_default()
                            .extend(Changes::all(&stores[c].records));
                        present[c] = !present[c];
                    }
                    3 => {
                        let cidr = IpCidr::truncate(
                            format!("10.{}.{}.0", 1 + rng.below(3), rng.below(2))
                                .parse()
                                .unwrap(),
                            24,
                        );
                        if incumbents.remove(&cidr).is_none() {
                            incumbents.insert(cidr, 1 + rng.below(4) as u8);
                        }
                        touched.insert(cidr);
                    }
                    4 => {
                        encryption.mode = if encryption.mode == EncryptionMode::Wireguard {
                            EncryptionMode::None
                        } else {
                            EncryptionMode::Wireguard
                        };
                    }
                    5..=12 => {
                        // A delete of something it may have.
                        let (k, _) = record(&mut rng, c as u8 + 1);
                        stores[c].delete(&k, now);
                    }
                    _ => {
                        let (k, v) = record(&mut rng, c as u8 + 1);
                        stores[c].apply(&k, &v, now);
                    }
                }
                let mut changes = std::mem::take(&mut gone);
                for s in &mut stores {
                    let ch = s.take_changes();
                    if !ch.is_empty() {
                        changes.entry(s.name.clone()).or_default().extend(ch);
                    }
                }
                let remotes: Vec<ClusterInput<'_>> = (1..4)
                    .filter(|i| present[*i])
                    .map(|i| ClusterInput {
                        name: &names[i],
                        id: ClusterId::new(i as u64 + 1).unwrap(),
                        records: &stores[i].records,
                        declared: &[],
                    })
                    .collect();
                let self_node: NodeName = "n1".parse().unwrap();
                let input = MergeInput {
                    local: ClusterInput {
                        name: &names[0],
                        id: ClusterId::new(1).unwrap(),
                        records: &stores[0].records,
                        declared: &[],
                    },
                    self_node: Some(&self_node),
                    encryption,
                    remotes: &remotes,
                    incumbents: &incumbents,
                    incumbents_changed: (seed % 2 == 1).then_some(&touched),
                };
                let before = engine.desired().clone();
                let delta = engine.update(&input, &changes);
                let full = merge::merge(&input);
                let got = engine.desired();
                let at = format!("seed {seed} step {step}");
                assert_eq!(got.ipcache, full.ipcache, "ipcache, {at}");
                assert_eq!(got.tunnels, full.tunnels, "tunnels, {at}");
                assert_eq!(got.peers, full.peers, "peers, {at}");
                assert_eq!(got.services, full.services, "services, {at}");
                assert_eq!(got.policy, full.policy, "policy, {at}");
                assert_eq!(
                    got.network_policies, full.network_policies,
                    "policies, {at}"
                );
                assert_eq!(got.policy_cidrs, full.policy_cidrs, "policy CIDRs, {at}");
                assert_eq!(
                    sorted(engine.rejected().cloned()),
                    sorted(full.rejected.into_iter()),
                    "rejections, {at}"
                );
                let mut moved = BTreeSet::new();
                diff_keys(&before.ipcache, &got.ipcache, &mut moved);
                assert!(moved.is_subset(&delta.ipcache), "ipcache delta, {at}");
                let mut moved = BTreeSet::new();
                diff_keys(&before.tunnels, &got.tunnels, &mut moved);
                assert!(moved.is_subset(&delta.tunnels), "tunnel delta, {at}");
                let mut moved = BTreeSet::new();
                diff_keys(&before.services, &got.services, &mut moved);
                assert!(moved.is_subset(&delta.services), "service delta, {at}");
                let mut moved = BTreeSet::new();
                diff_keys(&before.peers, &got.peers, &mut moved);
                assert!(moved.is_subset(&delta.peers), "peer delta, {at}");
                let mut moved = BTreeSet::new();
                diff_keys(&before.network_policies, &got.network_policies, &mut moved);
                assert!(
                    moved.is_subset(&delta.network_policies),
                    "policy delta, {at}"
                );
                assert!(before.policy == got.policy || delta.policy, "{at}");
                touched.clear();
            }
        }
    }
}
