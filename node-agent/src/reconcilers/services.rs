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

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use clustermesh_api::{Affinity, BackendState, ClusterName, Protocol};
use tunnel_common::{
    IPPROTO_TCP, IPPROTO_UDP, LB_BACKEND_DRAINING, LB_BACKEND_SELECTABLE, LbBackendKey,
    LbBackendValue, LbServiceKey, LbServiceValue, MAX_LB_SLOTS, maps,
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

fn v4_be(ip: IpAddr) -> Option<u32> {
    match ip {
        IpAddr::V4(a) => Some(u32::from(a).to_be()),
        IpAddr::V6(_) => None,
    }
}

fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

/// The map entries of one service.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Entries {
    pub slots: BTreeMap<LbServiceKey, LbServiceValue>,
    pub backends: BTreeMap<LbBackendKey, LbBackendValue>,
}

/// The LB map entries of a service (IPv6 frontends and backends are not in
/// the eBPF datapath yet and are left out). At most `MAX_LB_SLOTS - 1`
/// backends are selectable per frontend.
pub fn entries(svc: &MergedService, policy: &LbPolicy) -> Entries {
    let sel = select(svc, policy);
    let selectable: Vec<u32> = sel
        .selectable
        .iter()
        .filter_map(|ip| v4_be(*ip))
        .take(MAX_LB_SLOTS as usize - 1)
        .collect();
    let draining: Vec<u32> = sel.draining.iter().filter_map(|ip| v4_be(*ip)).collect();
    let mut out = Entries::default();
    for fe in svc.frontends.iter().filter_map(|ip| v4_be(*ip)) {
        for &(p, port, target) in &svc.ports {
            let key = |slot: u16| LbServiceKey {
                addr: fe,
                port: port.to_be(),
                proto: proto(p),
                _pad: 0,
                slot,
                _pad2: 0,
            };
            out.slots.insert(
                key(0),
                LbServiceValue {
                    addr: 0,
                    port: 0,
                    count: selectable.len() as u16,
                },
            );
            let backend = |addr: u32| LbBackendKey {
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
                    LbServiceValue {
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
/// (port, protocol) frontends (their slot 0), as `CM_LB_FRONTENDS` holds them.
pub fn frontend_addrs<'a>(services: impl IntoIterator<Item = &'a Entries>) -> BTreeMap<u32, u32> {
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

/// Writes merged services into `CM_LB_SERVICES` and `CM_LB_BACKENDS`.
pub struct ServiceMap {
    policy: LbPolicy,
    slots: HashMap<MapData, LbServiceKey, LbServiceValue>,
    backends: HashMap<MapData, LbBackendKey, LbBackendValue>,
    frontends: HashMap<MapData, u32, u32>,
    /// What this agent wrote per service (to remove what a change drops).
    written: BTreeMap<String, Entries>,
    /// What this agent wrote into `CM_LB_FRONTENDS`.
    written_frontends: BTreeMap<u32, u32>,
}

impl ServiceMap {
    pub fn open(pin_dir: &Path, policy: LbPolicy) -> Result<Self, ReconcileError> {
        Ok(Self {
            policy,
            slots: open(pin_dir, maps::LB_SERVICES)?,
            backends: open(pin_dir, maps::LB_BACKENDS)?,
            frontends: open(pin_dir, maps::LB_FRONTENDS)?,
            written: BTreeMap::new(),
            written_frontends: BTreeMap::new(),
        })
    }

    /// Makes `CM_LB_FRONTENDS` hold the frontend addresses of what is
    /// written (after the slots: a new address is complete when it appears).
    fn sync_frontends(&mut self) -> Result<(), ReconcileError> {
        let want = frontend_addrs(self.written.values());
        for (a, n) in &want {
            if self.written_frontends.get(a) != Some(n) {
                self.frontends.insert(a, n, 0).map_err(err)?;
                self.written_frontends.insert(*a, *n);
            }
        }
        let gone: Vec<u32> = self
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
    fn write(&mut self, old: &Entries, new: &Entries) -> Result<(), ReconcileError> {
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
        let gone = |k: &&LbServiceKey| !new.slots.contains_key(k);
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
}

fn remove<K: aya::Pod, V: aya::Pod>(
    m: &mut HashMap<MapData, K, V>,
    k: &K,
) -> Result<(), ReconcileError> {
    match m.remove(k) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(err(e)),
    }
}

impl Reconciler<String, MergedService> for ServiceMap {
    fn name(&self) -> &'static str {
        "services"
    }
    fn update(&mut self, k: &String, v: &MergedService) -> Result<(), ReconcileError> {
        let new = entries(v, &self.policy);
        let old = self.written.remove(k).unwrap_or_default();
        let r = self.write(&old, &new);
        // On failure the maps hold a mix: remember the union so a later
        // change or the prune removes what must go.
        self.written.insert(
            k.clone(),
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
    fn delete(&mut self, k: &String) -> Result<(), ReconcileError> {
        let old = self.written.remove(k).unwrap_or_default();
        let r = self.write(&old, &Entries::default());
        if r.is_err() {
            // Still (partly) in the maps: a later delete or the prune retries.
            self.written.insert(k.clone(), old);
        }
        r?;
        self.sync_frontends()
    }
    fn prune(
        &mut self,
        desired: &BTreeMap<String, MergedService>,
    ) -> Result<usize, ReconcileError> {
        let mut want = Entries::default();
        self.written.clear();
        for (name, svc) in desired {
            let e = entries(svc, &self.policy);
            want.slots.extend(e.slots.iter().map(|(k, v)| (*k, *v)));
            want.backends
                .extend(e.backends.iter().map(|(k, v)| (*k, *v)));
            self.written.insert(name.clone(), e);
        }
        let mut n = 0;
        let keys: BTreeSet<LbServiceKey> = self.slots.keys().filter_map(Result::ok).collect();
        let stale: Vec<_> = keys
            .iter()
            .filter(|k| !want.slots.contains_key(k))
            .collect();
        let (slot0, rest): (Vec<_>, Vec<_>) = stale.into_iter().partition(|k| k.slot == 0);
        for k in slot0.into_iter().chain(rest) {
            remove(&mut self.slots, k)?;
            n += 1;
        }
        let keys: BTreeSet<LbBackendKey> = self.backends.keys().filter_map(Result::ok).collect();
        for k in keys.iter().filter(|k| !want.backends.contains_key(k)) {
            remove(&mut self.backends, k)?;
            n += 1;
        }
        // Addresses left by services removed while no agent ran.
        let fe = frontend_addrs(self.written.values());
        let keys: BTreeSet<u32> = self.frontends.keys().filter_map(Result::ok).collect();
        for a in keys.iter().filter(|a| !fe.contains_key(a)) {
            remove(&mut self.frontends, a)?;
            n += 1;
        }
        self.written_frontends.clear();
        self.sync_frontends()?;
        Ok(n)
    }
    /// Services cannot be rebuilt from the maps (they hold no names), so a
    /// restarted agent starts from nothing: it rewrites every service with
    /// the same values (no flow sees a change) and the prune after the
    /// initial sync removes what is no longer desired.
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
        let e = entries(&s, &policy(0.5));
        // Two ports: each has slot 0 + 2 backends.
        assert_eq!(e.slots.len(), 6);
        let fe = u32::from(std::net::Ipv4Addr::new(10, 96, 0, 10)).to_be();
        let k0 = LbServiceKey {
            addr: fe,
            port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
            slot: 0,
            _pad2: 0,
        };
        assert_eq!(e.slots[&k0].count, 2);
        let k1 = LbServiceKey { slot: 1, ..k0 };
        assert_eq!(e.slots[&k1].port, 8080u16.to_be());
        assert_eq!(
            e.slots[&k1].addr,
            u32::from(std::net::Ipv4Addr::new(10, 1, 0, 1)).to_be()
        );
        let udp0 = LbServiceKey {
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
        // IPv6 frontends are skipped, not mangled.
        let mut v6 = s.clone();
        v6.frontends = vec!["fd00::10".parse().unwrap()];
        assert!(entries(&v6, &policy(0.5)).slots.is_empty());
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
            // IPv6 frontends are not in the eBPF datapath.
            (vec![&v6], vec![]),
        ];
        for (i, (svcs, want)) in table.into_iter().enumerate() {
            let e: Vec<Entries> = svcs.iter().map(|s| entries(s, &policy(0.5))).collect();
            let got: Vec<(u32, u32)> = frontend_addrs(&e).into_iter().collect();
            assert_eq!(got, want, "row {i}");
        }
    }
}
