//! Service load-balancing: which backends of a merged service get new
//! flows ([`select`], pure), and the reconciler that writes frontends and
//! backends into the LB maps ([`ServiceMap`]).
//!
//! Selection, per service, over the backends the merge kept (ready,
//! terminating and not-ready ones, each with its cluster):
//! - terminating backends never get new flows but keep theirs (draining);
//! - affinity `none`: every ready backend of every cluster is selectable;
//! - affinity `local`: the local cluster's ready backends, as long as they
//!   are at least `failover_threshold` of the local backends declared
//!   (ready + not-ready + terminating). Below that, remote ready backends
//!   join them (spill-over, not all-or-nothing); with no local ready one,
//!   only remote ones. Remote backends not selected keep their flows;
//! - affinity `remote`: remote ready backends; the local ones only when no
//!   remote one is ready.
//!
//! A removed backend, or a withdrawn or stale cluster's, is not in the
//! merge any more: it is neither selectable nor allowed, so new
//! connections, and UDP flows that had it, go to the others at once;
//! established TCP connections stay with it (moving them could only end in
//! a reset).
//!
//! Map layout (see `tunnel_common::maps`): per frontend address, port and
//! protocol, slot 0 holds the selectable count and slots 1..=count the
//! backends; CM_LB_BACKENDS lists every backend flows may keep. Writes are
//! ordered so the programs never read a count larger than the slots
//! written: allowed backends and slots first, then slot 0, then removals
//! (slot 0 of removed frontends before their slots). CM_LB_FRONTENDS holds
//! every frontend address with its number of (port, protocol) frontends,
//! written after the slots of a new frontend and kept equal to the union
//! over every service ([`frontend_addrs`]): the programs drop fragments,
//! other protocols and other ports to such an address instead of handing
//! them to the host stack.
//!
//! Both families: IPv4 frontends and backends go into the `CM_LB_*` maps,
//! IPv6 ones into the `CM_LB6_*` maps, through the same generic code
//! ([`LbFamily`], [`FamilyMaps`]). A frontend gets only the backends of its
//! own family: a record with IPv4 and IPv6 frontends (dual stack) has two
//! independent frontends, an IPv6 frontend whose record has no IPv6 backend
//! drops new flows (`drop_no_service_backend`) as any frontend without
//! backends does.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use clustermesh_api::{Affinity, BackendState, ClusterName, Protocol};
use tunnel_common::{
    IPPROTO_TCP, IPPROTO_UDP, Ip6, LB_BACKEND_DRAINING, LB_BACKEND_SELECTABLE, LbBackendKeyOf,
    LbBackendValue, LbServiceKeyOf, LbServiceValueOf, MAX_LB_SLOTS, maps,
};

use super::{ReconcileError, Reconciler};
use crate::desired::MergedService;

/// Default of `--lb-failover-threshold`.
pub const DEFAULT_FAILOVER_THRESHOLD: f64 = 0.5;

/// Node-wide load-balancing settings.
#[derive(Debug, Clone)]
pub struct LbPolicy {
    pub local_cluster: ClusterName,
    /// Affinity `local` spills over to remote backends when the ready local
    /// ones fall below this fraction of the local ones declared (0: only
    /// when none is ready; 1: as soon as one is not ready).
    pub failover_threshold: f64,
}

/// Which backends get new flows and which only keep theirs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub selectable: Vec<IpAddr>,
    pub draining: Vec<IpAddr>,
}

/// The backends of `svc` that get new flows, by its affinity (module docs).
pub fn select(svc: &MergedService, policy: &LbPolicy) -> Selection {
    let mut local_ready = Vec::new();
    let mut remote_ready = Vec::new();
    let mut draining = Vec::new();
    let mut local_declared = 0usize;
    for b in &svc.backends {
        let local = b.cluster == policy.local_cluster;
        if local {
            local_declared += 1;
        }
        match (b.state, local) {
            (BackendState::Ready, true) => local_ready.push(b.ip),
            (BackendState::Ready, false) => remote_ready.push(b.ip),
            (BackendState::Terminating, _) => draining.push(b.ip),
            (BackendState::NotReady, _) => {}
        }
    }
    let (selectable, mut kept) = match svc.affinity {
        Affinity::None => {
            local_ready.append(&mut remote_ready);
            (local_ready, Vec::new())
        }
        Affinity::Local => {
            let enough = !local_ready.is_empty()
                && local_ready.len() as f64 >= policy.failover_threshold * local_declared as f64;
            if enough {
                (local_ready, remote_ready)
            } else {
                local_ready.append(&mut remote_ready);
                (local_ready, Vec::new())
            }
        }
        Affinity::Remote => {
            if remote_ready.is_empty() {
                (local_ready, Vec::new())
            } else {
                (remote_ready, local_ready)
            }
        }
    };
    draining.append(&mut kept);
    let mut selectable = selectable;
    selectable.sort();
    selectable.dedup();
    draining.sort();
    draining.dedup();
    draining.retain(|ip| !selectable.contains(ip));
    Selection {
        selectable,
        draining,
    }
}

/// An address family of the LB maps, by the address type its maps key
/// (`u32` network order: IPv4, `CM_LB_*`; [`Ip6`]: IPv6, `CM_LB6_*`). The
/// entries, their write order and the prune are one generic code path
/// ([`FamilyMaps`]), instantiated once per family, as the programs'
/// `lb_forward` is.
pub trait LbFamily: aya::Pod + Copy + Ord + Default + std::fmt::Debug {
    const SERVICES: &'static str;
    const BACKENDS: &'static str;
    const FRONTENDS: &'static str;
    /// The address in this family's map form; None: the other family.
    fn from_ip(ip: IpAddr) -> Option<Self>;
}

impl LbFamily for u32 {
    const SERVICES: &'static str = maps::LB_SERVICES;
    const BACKENDS: &'static str = maps::LB_BACKENDS;
    const FRONTENDS: &'static str = maps::LB_FRONTENDS;
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(u32::from(a).to_be()),
            IpAddr::V6(_) => None,
        }
    }
}

impl LbFamily for Ip6 {
    const SERVICES: &'static str = maps::LB6_SERVICES;
    const BACKENDS: &'static str = maps::LB6_BACKENDS;
    const FRONTENDS: &'static str = maps::LB6_FRONTENDS;
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(_) => None,
            IpAddr::V6(a) => Some(a.octets()),
        }
    }
}

fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

/// The map entries of one service in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entries<A: LbFamily> {
    pub slots: BTreeMap<LbServiceKeyOf<A>, LbServiceValueOf<A>>,
    pub backends: BTreeMap<LbBackendKeyOf<A>, LbBackendValue>,
}

impl<A: LbFamily> Default for Entries<A> {
    fn default() -> Self {
        Self {
            slots: BTreeMap::new(),
            backends: BTreeMap::new(),
        }
    }
}

/// The LB map entries of a service in family `A`: its frontends of that
/// family, each with the backends of that family only. Families are never
/// mixed (the datapath translates addresses, not families): an IPv6
/// frontend of a record whose backends are all IPv4 is a frontend without
/// backends (its new flows are dropped, `drop_no_service_backend`), and
/// IPv6 backends of a record with only IPv4 frontends are unused. At most
/// `MAX_LB_SLOTS - 1` backends are selectable per frontend.
pub fn entries<A: LbFamily>(svc: &MergedService, policy: &LbPolicy) -> Entries<A> {
    let sel = select(svc, policy);
    let selectable: Vec<A> = sel
        .selectable
        .iter()
        .filter_map(|ip| A::from_ip(*ip))
        .take(MAX_LB_SLOTS as usize - 1)
        .collect();
    let draining: Vec<A> = sel
        .draining
        .iter()
        .filter_map(|ip| A::from_ip(*ip))
        .collect();
    let mut out = Entries::default();
    for fe in svc.frontends.iter().filter_map(|ip| A::from_ip(*ip)) {
        for &(p, port, target) in &svc.ports {
            let key = |slot: u16| LbServiceKeyOf {
                addr: fe,
                port: port.to_be(),
                proto: proto(p),
                _pad: 0,
                slot,
                _pad2: 0,
            };
            out.slots.insert(
                key(0),
                LbServiceValueOf {
                    addr: A::default(),
                    port: 0,
                    count: selectable.len() as u16,
                },
            );
            let backend = |addr: A| LbBackendKeyOf {
                frontend: fe,
                frontend_port: port.to_be(),
                proto: proto(p),
                _pad: 0,
                backend: addr,
                backend_port: target.to_be(),
                _pad2: 0,
            };
            for (i, &b) in selectable.iter().enumerate() {
                out.slots.insert(
                    key(i as u16 + 1),
                    LbServiceValueOf {
                        addr: b,
                        port: target.to_be(),
                        count: 0,
                    },
                );
                out.backends.insert(
                    backend(b),
                    LbBackendValue {
                        state: LB_BACKEND_SELECTABLE,
                    },
                );
            }
            for &b in &draining {
                out.backends.insert(
                    backend(b),
                    LbBackendValue {
                        state: LB_BACKEND_DRAINING,
                    },
                );
            }
        }
    }
    out
}

/// Every frontend address of the services' entries, with its number of
/// (port, protocol) frontends (their slot 0), as `CM_LB_FRONTENDS` (or
/// `CM_LB6_FRONTENDS`) holds them.
pub fn frontend_addrs<'a, A: LbFamily + 'a>(
    services: impl IntoIterator<Item = &'a Entries<A>>,
) -> BTreeMap<A, u32> {
    let mut out = BTreeMap::new();
    for e in services {
        for k in e.slots.keys().filter(|k| k.slot == 0) {
            *out.entry(k.addr).or_insert(0) += 1;
        }
    }
    out
}

fn err(e: aya::maps::MapError) -> ReconcileError {
    ReconcileError::new("services", e)
}

fn open<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>, ReconcileError> {
    let data = super::pinned(pin_dir, name, "services")?;
    HashMap::try_from(Map::HashMap(data)).map_err(err)
}

/// One family's LB maps and what this agent wrote into them.
pub struct FamilyMaps<A: LbFamily> {
    slots: HashMap<MapData, LbServiceKeyOf<A>, LbServiceValueOf<A>>,
    backends: HashMap<MapData, LbBackendKeyOf<A>, LbBackendValue>,
    frontends: HashMap<MapData, A, u32>,
    /// What this agent wrote per service (to remove what a change drops).
    written: BTreeMap<String, Entries<A>>,
    /// What this agent wrote into the frontends map.
    written_frontends: BTreeMap<A, u32>,
}

impl<A: LbFamily> FamilyMaps<A>
where
    LbServiceKeyOf<A>: aya::Pod + Ord,
    LbServiceValueOf<A>: aya::Pod,
    LbBackendKeyOf<A>: aya::Pod + Ord,
{
    fn open(pin_dir: &Path) -> Result<Self, ReconcileError> {
        Ok(Self {
            slots: open(pin_dir, A::SERVICES)?,
            backends: open(pin_dir, A::BACKENDS)?,
            frontends: open(pin_dir, A::FRONTENDS)?,
            written: BTreeMap::new(),
            written_frontends: BTreeMap::new(),
        })
    }

    /// Makes the frontends map hold the frontend addresses of what is
    /// written (after the slots: a new address is complete when it appears).
    fn sync_frontends(&mut self) -> Result<(), ReconcileError> {
        let want = frontend_addrs(self.written.values());
        for (a, n) in &want {
            if self.written_frontends.get(a) != Some(n) {
                self.frontends.insert(a, n, 0).map_err(err)?;
                self.written_frontends.insert(*a, *n);
            }
        }
        let gone: Vec<A> = self
            .written_frontends
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect();
        for a in gone {
            remove(&mut self.frontends, &a)?;
            self.written_frontends.remove(&a);
        }
        Ok(())
    }

    /// Makes the maps hold `new` where they held `old` (ordered: see the
    /// module docs).
    fn write(&mut self, old: &Entries<A>, new: &Entries<A>) -> Result<(), ReconcileError> {
        for (k, v) in &new.backends {
            if old.backends.get(k) != Some(v) {
                self.backends.insert(k, v, 0).map_err(err)?;
            }
        }
        for (k, v) in new.slots.iter().filter(|(k, _)| k.slot != 0) {
            if old.slots.get(k) != Some(v) {
                self.slots.insert(k, v, 0).map_err(err)?;
            }
        }
        for (k, v) in new.slots.iter().filter(|(k, _)| k.slot == 0) {
            if old.slots.get(k) != Some(v) {
                self.slots.insert(k, v, 0).map_err(err)?;
            }
        }
        let gone = |k: &&LbServiceKeyOf<A>| !new.slots.contains_key(k);
        let slot0: Vec<_> = old
            .slots
            .keys()
            .filter(gone)
            .filter(|k| k.slot == 0)
            .collect();
        let rest: Vec<_> = old
            .slots
            .keys()
            .filter(gone)
            .filter(|k| k.slot != 0)
            .collect();
        for k in slot0.into_iter().chain(rest) {
            remove(&mut self.slots, k)?;
        }
        for k in old.backends.keys() {
            if !new.backends.contains_key(k) {
                remove(&mut self.backends, k)?;
            }
        }
        Ok(())
    }

    fn update(
        &mut self,
        k: &str,
        v: &MergedService,
        policy: &LbPolicy,
    ) -> Result<(), ReconcileError> {
        let new = entries::<A>(v, policy);
        let old = self.written.remove(k).unwrap_or_default();
        let r = self.write(&old, &new);
        // On failure the maps hold a mix: remember the union so a later
        // change or the prune removes what must go.
        self.written.insert(
            k.to_owned(),
            if r.is_ok() {
                new
            } else {
                let mut u = old;
                u.slots.extend(new.slots);
                u.backends.extend(new.backends);
                u
            },
        );
        r?;
        self.sync_frontends()
    }

    fn delete(&mut self, k: &str) -> Result<(), ReconcileError> {
        let old = self.written.remove(k).unwrap_or_default();
        let r = self.write(&old, &Entries::default());
        if r.is_err() {
            // Still (partly) in the maps: a later delete or the prune retries.
            self.written.insert(k.to_owned(), old);
        }
        r?;
        self.sync_frontends()
    }

    fn prune(
        &mut self,
        desired: &BTreeMap<String, MergedService>,
        policy: &LbPolicy,
    ) -> Result<usize, ReconcileError> {
        let mut want = Entries::<A>::default();
        self.written.clear();
        for (name, svc) in desired {
            let e = entries::<A>(svc, policy);
            want.slots.extend(e.slots.iter().map(|(k, v)| (*k, *v)));
            want.backends
                .extend(e.backends.iter().map(|(k, v)| (*k, *v)));
            self.written.insert(name.clone(), e);
        }
        let mut n = 0;
        let keys: BTreeSet<LbServiceKeyOf<A>> = self.slots.keys().filter_map(Result::ok).collect();
        let stale: Vec<_> = keys
            .iter()
            .filter(|k| !want.slots.contains_key(k))
            .collect();
        let (slot0, rest): (Vec<_>, Vec<_>) = stale.into_iter().partition(|k| k.slot == 0);
        for k in slot0.into_iter().chain(rest) {
            remove(&mut self.slots, k)?;
            n += 1;
        }
        let keys: BTreeSet<LbBackendKeyOf<A>> =
            self.backends.keys().filter_map(Result::ok).collect();
        for k in keys.iter().filter(|k| !want.backends.contains_key(k)) {
            remove(&mut self.backends, k)?;
            n += 1;
        }
        // Addresses left by services removed while no agent ran.
        let fe = frontend_addrs(self.written.values());
        let keys: BTreeSet<A> = self.frontends.keys().filter_map(Result::ok).collect();
        for a in keys.iter().filter(|a| !fe.contains_key(a)) {
            remove(&mut self.frontends, a)?;
            n += 1;
        }
        self.written_frontends.clear();
        self.sync_frontends()?;
        Ok(n)
    }
}

/// Writes merged services into the LB maps of both families: IPv4
/// frontends into `CM_LB_SERVICES`, `CM_LB_BACKENDS`, `CM_LB_FRONTENDS`;
/// IPv6 ones into `CM_LB6_SERVICES`, `CM_LB6_BACKENDS`, `CM_LB6_FRONTENDS`.
pub struct ServiceMap {
    policy: LbPolicy,
    v4: FamilyMaps<u32>,
    v6: FamilyMaps<Ip6>,
}

impl ServiceMap {
    pub fn open(pin_dir: &Path, policy: LbPolicy) -> Result<Self, ReconcileError> {
        Ok(Self {
            policy,
            v4: FamilyMaps::open(pin_dir)?,
            v6: FamilyMaps::open(pin_dir)?,
        })
    }
}

fn remove<K: aya::Pod, V: aya::Pod>(
    m: &mut HashMap<MapData, K, V>,
    k: &K,
) -> Result<(), ReconcileError> {
    match crate::datapath::absent_ok(m.remove(k)) {
        Ok(()) => Ok(()),
        Err(e) => Err(err(e)),
    }
}

impl Reconciler<String, MergedService> for ServiceMap {
    fn name(&self) -> &'static str {
        "services"
    }
    /// Both families, each whatever the other's outcome (the first error
    /// is returned; the failed family retries on the next change or prune).
    fn update(&mut self, k: &String, v: &MergedService) -> Result<(), ReconcileError> {
        let r4 = self.v4.update(k, v, &self.policy);
        let r6 = self.v6.update(k, v, &self.policy);
        r4.and(r6)
    }
    fn delete(&mut self, k: &String) -> Result<(), ReconcileError> {
        let r4 = self.v4.delete(k);
        let r6 = self.v6.delete(k);
        r4.and(r6)
    }
    fn prune(
        &mut self,
        desired: &BTreeMap<String, MergedService>,
    ) -> Result<usize, ReconcileError> {
        let r4 = self.v4.prune(desired, &self.policy);
        let r6 = self.v6.prune(desired, &self.policy);
        Ok(r4? + r6?)
    }
    /// Services cannot be rebuilt from the maps (they hold no names), so a
    /// restarted agent starts from nothing: it rewrites every service with
    /// the same values (no flow sees a change) and the prune after the
    /// initial sync removes what is no longer desired (in both families).
    fn snapshot(&mut self) -> Result<BTreeMap<String, MergedService>, ReconcileError> {
        Ok(BTreeMap::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::desired::MergedBackend;

    fn svc(affinity: Affinity, backends: &[(&str, &str, BackendState)]) -> MergedService {
        MergedService {
            frontends: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![(Protocol::Tcp, 80, 8080), (Protocol::Udp, 53, 5353)],
            affinity,
            backends: backends
                .iter()
                .map(|(ip, c, s)| MergedBackend {
                    ip: ip.parse().unwrap(),
                    cluster: c.parse().unwrap(),
                    state: *s,
                })
                .collect(),
        }
    }

    fn policy(t: f64) -> LbPolicy {
        LbPolicy {
            local_cluster: "c1".parse().unwrap(),
            failover_threshold: t,
        }
    }

    fn ips(v: &[IpAddr]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn affinity_and_failover_table() {
        use BackendState::*;
        let l1 = ("10.1.0.1", "c1", Ready);
        let l2 = ("10.1.0.2", "c1", Ready);
        let l2_down = ("10.1.0.2", "c1", NotReady);
        let l3_down = ("10.1.0.3", "c1", NotReady);
        let lt = ("10.1.0.9", "c1", Terminating);
        let r1 = ("10.2.0.1", "c2", Ready);
        let r2_down = ("10.2.0.2", "c2", NotReady);
        // (affinity, threshold, backends, selectable, draining)
        #[allow(clippy::type_complexity)]
        let table: Vec<(Affinity, f64, Vec<_>, Vec<&str>, Vec<&str>)> = vec![
            // none spreads over every ready backend.
            (
                Affinity::None,
                0.5,
                vec![l1, l2, r1],
                vec!["10.1.0.1", "10.1.0.2", "10.2.0.1"],
                vec![],
            ),
            // local: healthy local capacity keeps new flows local; remote
            // flows drain.
            (
                Affinity::Local,
                0.5,
                vec![l1, l2, r1],
                vec!["10.1.0.1", "10.1.0.2"],
                vec!["10.2.0.1"],
            ),
            // 1 of 2 ready is not below 0.5: still local.
            (
                Affinity::Local,
                0.5,
                vec![l1, l2_down, r1],
                vec!["10.1.0.1"],
                vec!["10.2.0.1"],
            ),
            // 1 of 3 ready is below 0.5: remote ones join (spill-over).
            (
                Affinity::Local,
                0.5,
                vec![l1, l2_down, l3_down, r1],
                vec!["10.1.0.1", "10.2.0.1"],
                vec![],
            ),
            // threshold 0: only when no local one is ready.
            (
                Affinity::Local,
                0.0,
                vec![l1, l2_down, l3_down, r1],
                vec!["10.1.0.1"],
                vec!["10.2.0.1"],
            ),
            // no local backend at all: remote.
            (
                Affinity::Local,
                0.5,
                vec![r1, r2_down],
                vec!["10.2.0.1"],
                vec![],
            ),
            // terminating ones only drain, and are not capacity.
            (
                Affinity::Local,
                0.5,
                vec![lt, r1],
                vec!["10.2.0.1"],
                vec!["10.1.0.9"],
            ),
            // remote prefers remote; local ones drain.
            (
                Affinity::Remote,
                0.5,
                vec![l1, r1],
                vec!["10.2.0.1"],
                vec!["10.1.0.1"],
            ),
            // remote with no remote ready: local.
            (
                Affinity::Remote,
                0.5,
                vec![l1, r2_down],
                vec!["10.1.0.1"],
                vec![],
            ),
            // nothing ready: nothing selectable (new flows are dropped).
            (Affinity::None, 0.5, vec![l2_down, r2_down], vec![], vec![]),
        ];
        for (i, (aff, t, bs, want_sel, want_drain)) in table.into_iter().enumerate() {
            let s = select(&svc(aff, &bs), &policy(t));
            assert_eq!(ips(&s.selectable), want_sel, "row {i}: selectable");
            assert_eq!(ips(&s.draining), want_drain, "row {i}: draining");
        }
    }

    #[test]
    fn entries_have_slots_per_frontend_port_and_protocol() {
        use BackendState::*;
        let s = svc(
            Affinity::None,
            &[
                ("10.1.0.1", "c1", Ready),
                ("10.2.0.1", "c2", Ready),
                ("10.1.0.9", "c1", Terminating),
            ],
        );
        let e = entries::<u32>(&s, &policy(0.5));
        // Two ports: each has slot 0 + 2 backends.
        assert_eq!(e.slots.len(), 6);
        let fe = u32::from(std::net::Ipv4Addr::new(10, 96, 0, 10)).to_be();
        let k0 = tunnel_common::LbServiceKey {
            addr: fe,
            port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
            slot: 0,
            _pad2: 0,
        };
        assert_eq!(e.slots[&k0].count, 2);
        let k1 = tunnel_common::LbServiceKey { slot: 1, ..k0 };
        assert_eq!(e.slots[&k1].port, 8080u16.to_be());
        assert_eq!(
            e.slots[&k1].addr,
            u32::from(std::net::Ipv4Addr::new(10, 1, 0, 1)).to_be()
        );
        let udp0 = tunnel_common::LbServiceKey {
            port: 53u16.to_be(),
            proto: IPPROTO_UDP,
            ..k0
        };
        assert_eq!(e.slots[&udp0].count, 2);
        // Allowed backends: 2 selectable + 1 draining, per port.
        assert_eq!(e.backends.len(), 6);
        let draining = e
            .backends
            .values()
            .filter(|v| v.state == LB_BACKEND_DRAINING)
            .count();
        assert_eq!(draining, 2);
        // The IPv4 entries have no IPv6 frontend, the IPv6 ones no IPv4.
        assert!(entries::<Ip6>(&s, &policy(0.5)).slots.is_empty());
        let mut v6 = s.clone();
        v6.frontends = vec!["fd00::10".parse().unwrap()];
        assert!(entries::<u32>(&v6, &policy(0.5)).slots.is_empty());
        // An IPv6 frontend with only IPv4 backends: a frontend without
        // backends (count 0), never an IPv4 backend in an IPv6 slot.
        let e6 = entries::<Ip6>(&v6, &policy(0.5));
        assert_eq!(e6.slots.len(), 2, "{e6:?}");
        assert!(e6.slots.values().all(|v| v.count == 0));
        assert!(e6.backends.is_empty());
    }

    #[test]
    fn dual_stack_records_split_by_family() {
        use BackendState::*;
        let mut s = svc(
            Affinity::None,
            &[
                ("10.1.0.1", "c1", Ready),
                ("fd00:10:1::1", "c1", Ready),
                ("fd00:10:2::1", "c2", Ready),
                ("fd00:10:1::9", "c1", Terminating),
            ],
        );
        s.frontends.push("fd00:96::10".parse().unwrap());
        let e4 = entries::<u32>(&s, &policy(0.5));
        let e6 = entries::<Ip6>(&s, &policy(0.5));
        // IPv4: one backend per port; IPv6: two selectable + one draining.
        assert_eq!((e4.slots.len(), e4.backends.len()), (4, 2));
        assert_eq!((e6.slots.len(), e6.backends.len()), (6, 6));
        let fe6: Ip6 = "fd00:96::10"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let k0 = LbServiceKeyOf {
            addr: fe6,
            port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
            slot: 0,
            _pad2: 0,
        };
        assert_eq!(e6.slots[&k0].count, 2);
        let k1 = LbServiceKeyOf { slot: 1, ..k0 };
        let b1: Ip6 = "fd00:10:1::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        assert_eq!(
            (e6.slots[&k1].addr, e6.slots[&k1].port),
            (b1, 8080u16.to_be())
        );
        let draining = e6
            .backends
            .values()
            .filter(|v| v.state == LB_BACKEND_DRAINING)
            .count();
        assert_eq!(draining, 2);
        let fe: Vec<(Ip6, u32)> = frontend_addrs([&e6]).into_iter().collect();
        assert_eq!(fe, vec![(fe6, 2)]);
    }

    #[test]
    fn frontend_addresses_table() {
        use BackendState::*;
        let a = u32::from(std::net::Ipv4Addr::new(10, 96, 0, 10)).to_be();
        let b = u32::from(std::net::Ipv4Addr::new(10, 96, 0, 11)).to_be();
        let two_ports = svc(Affinity::None, &[("10.1.0.1", "c1", Ready)]);
        let mut other_addr = two_ports.clone();
        other_addr.frontends = vec!["10.96.0.11".parse().unwrap()];
        other_addr.ports = vec![(Protocol::Tcp, 443, 8443)];
        let mut same_addr_other_port = other_addr.clone();
        same_addr_other_port.frontends = two_ports.frontends.clone();
        let no_backend = svc(Affinity::None, &[]);
        let mut v6 = two_ports.clone();
        v6.frontends = vec!["fd00::10".parse().unwrap()];
        // (services, expected address -> number of (port, protocol) frontends)
        type Row<'a> = (Vec<&'a MergedService>, Vec<(u32, u32)>);
        let table: Vec<Row<'_>> = vec![
            (vec![], vec![]),
            // One service, TCP 80 and UDP 53 on one address.
            (vec![&two_ports], vec![(a, 2)]),
            // A frontend without backends is still a frontend (its new
            // flows drop, nothing reaches the host).
            (vec![&no_backend], vec![(a, 2)]),
            (vec![&two_ports, &other_addr], vec![(a, 2), (b, 1)]),
            // Two services sharing an address: the address stays while
            // either has it.
            (vec![&two_ports, &same_addr_other_port], vec![(a, 3)]),
            (vec![&same_addr_other_port], vec![(a, 1)]),
            // IPv6 frontends are in the IPv6 map, not this one.
            (vec![&v6], vec![]),
        ];
        for (i, (svcs, want)) in table.into_iter().enumerate() {
            let e: Vec<Entries<u32>> = svcs
                .iter()
                .map(|s| entries::<u32>(s, &policy(0.5)))
                .collect();
            let got: Vec<(u32, u32)> = frontend_addrs(&e).into_iter().collect();
            assert_eq!(got, want, "row {i}");
        }
    }
}
