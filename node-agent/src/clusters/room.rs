//! The room in the ip-cache (issue 20). `CM_IPCACHE` (and `CM_IPCACHE6`)
//! hold, per family, both the host entries ([`crate::reconcilers::ipcache`])
//! and the pod-CIDR routes ([`crate::reconcilers::tunnels`]) up to the
//! map's size (`--ipcache-max-entries`, read back from the pinned map).
//!
//! A mesh larger than the map does not fail the reconcile: the entries that
//! do not fit are refused, counted, shown in the status and the metrics,
//! and added as room frees; everything that fits is applied. Nothing held
//! is evicted for a newcomer. Routes come first: host entries stop short of
//! the size by the routes held plus a reserve of 1/64 of the map (room for
//! new nodes' routes and for the tombstones of removed ones), routes may
//! fill it.

use std::collections::BTreeMap;

use clustermesh_api::IpCidr;

use crate::reconcilers::Room;

/// Above this share of its size a map is under pressure (status alarm,
/// logged once per crossing).
pub const ALARM: f64 = 0.9;

/// The maps' names, by family.
pub const MAPS: [&str; 2] = ["CM_IPCACHE", "CM_IPCACHE6"];

fn family(k: &IpCidr) -> usize {
    usize::from(k.addr().is_ipv6())
}

/// What the two targets of one ip-cache map hold, per family.
#[derive(Debug, Clone)]
pub struct IpCacheRoom {
    capacity: [usize; 2],
    hosts: [usize; 2],
    routes: [usize; 2],
    /// Keys refused for want of room in the current round.
    refused: [usize; 2],
    alarmed: [bool; 2],
}

impl Default for IpCacheRoom {
    fn default() -> Self {
        Self::new(usize::MAX, usize::MAX)
    }
}

/// One map's occupancy, as the status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: usize,
    pub refused: usize,
}

impl IpCacheRoom {
    /// Room for `v4` and `v6` entries (`usize::MAX`: unbounded).
    pub fn new(v4: usize, v6: usize) -> Self {
        Self {
            capacity: [v4, v6],
            hosts: [0; 2],
            routes: [0; 2],
            refused: [0; 2],
            alarmed: [false; 2],
        }
    }

    /// Counts what the targets hold (after adoption or the prune).
    pub fn count<A, B>(&mut self, hosts: &BTreeMap<IpCidr, A>, routes: &BTreeMap<IpCidr, B>) {
        self.hosts = [0; 2];
        self.routes = [0; 2];
        for k in hosts.keys() {
            self.hosts[family(k)] += 1;
        }
        for k in routes.keys() {
            self.routes[family(k)] += 1;
        }
    }

    /// A new round: the refusals are counted afresh (every refused key is
    /// retried each round).
    pub fn start_round(&mut self) {
        self.refused = [0; 2];
    }

    /// The host entries' view of the room.
    pub fn hosts(&mut self) -> Part<'_> {
        Part {
            room: self,
            routes: false,
        }
    }

    /// The routes' view of the room.
    pub fn routes(&mut self) -> Part<'_> {
        Part {
            room: self,
            routes: true,
        }
    }

    /// Each bounded map's occupancy.
    pub fn occupancy(&self) -> Vec<Occupancy> {
        (0..2)
            .filter(|&f| self.capacity[f] != usize::MAX)
            .map(|f| Occupancy {
                map: MAPS[f],
                entries: self.hosts[f] + self.routes[f],
                capacity: self.capacity[f],
                refused: self.refused[f],
            })
            .collect()
    }

    /// The maps that crossed [`ALARM`] (up or down) since the last call.
    pub fn crossings(&mut self) -> Vec<(Occupancy, bool)> {
        let mut out = Vec::new();
        for o in self.occupancy() {
            let f = usize::from(o.map == MAPS[1]);
            let now = pressure(o.entries, o.capacity) >= ALARM || o.refused > 0;
            if now != self.alarmed[f] {
                self.alarmed[f] = now;
                out.push((o, now));
            }
        }
        out
    }

    fn reserve(&self, f: usize) -> usize {
        (self.capacity[f] / 64).max(1)
    }
}

/// `entries` as a share of `capacity`.
pub fn pressure(entries: usize, capacity: usize) -> f64 {
    if capacity == 0 {
        return 1.0;
    }
    entries as f64 / capacity as f64
}

/// One target's view of the room: host entries may take up to the size
/// less the routes held and the reserve, routes up to the size.
pub struct Part<'a> {
    room: &'a mut IpCacheRoom,
    routes: bool,
}

impl Part<'_> {
    fn held(&mut self, f: usize) -> &mut usize {
        if self.routes {
            &mut self.room.routes[f]
        } else {
            &mut self.room.hosts[f]
        }
    }
}

impl Room<IpCidr> for Part<'_> {
    fn admit(&mut self, k: &IpCidr) -> bool {
        let f = family(k);
        let r = &*self.room;
        let (used, limit) = if self.routes {
            (r.hosts[f] + r.routes[f], r.capacity[f])
        } else {
            let limit = r.capacity[f]
                .saturating_sub(r.routes[f])
                .saturating_sub(r.reserve(f));
            (r.hosts[f], limit)
        };
        if used < limit {
            *self.held(f) += 1;
            true
        } else {
            self.room.refused[f] += 1;
            false
        }
    }
    fn release(&mut self, k: &IpCidr) {
        let held = self.held(family(k));
        *held = held.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use super::*;
    use crate::reconcilers::{MemoryReconciler, Target, apply_keys_within};

    fn host(i: u32) -> IpCidr {
        IpCidr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 32).unwrap()
    }
    fn route(i: u32) -> IpCidr {
        IpCidr::new(std::net::Ipv4Addr::from(0x4000_0000 + (i << 8)).into(), 24).unwrap()
    }

    /// A target: contents, held, refused keys.
    type Held = (
        MemoryReconciler<IpCidr, u32>,
        BTreeMap<IpCidr, u32>,
        BTreeSet<IpCidr>,
    );

    /// Applies `desired` routes (t[1]) then hosts (t[0]) through the room,
    /// as the agent does; returns the failures (never the refusals for
    /// room).
    fn round(
        room: &mut IpCacheRoom,
        t: &mut [Held; 2],
        desired: [&BTreeMap<IpCidr, u32>; 2],
    ) -> usize {
        room.start_round();
        let mut failures = Vec::new();
        for i in [1, 0] {
            let (r, held, retry) = &mut t[i];
            let keys: Vec<IpCidr> = desired[i].keys().chain(held.keys()).copied().collect();
            let target = Target { r, held, retry };
            let mut part = if i == 0 { room.hosts() } else { room.routes() };
            apply_keys_within(target, desired[i], &keys, true, &mut failures, &mut part);
        }
        failures.len()
    }

    #[test]
    fn a_full_map_refuses_what_does_not_fit_counts_it_and_adds_it_as_room_frees() {
        // 128 entries: hosts stop at 128 - routes - 2 (the reserve).
        let mut room = IpCacheRoom::new(128, usize::MAX);
        let mut t = [
            (
                MemoryReconciler::new("ipcache"),
                BTreeMap::new(),
                BTreeSet::new(),
            ),
            (
                MemoryReconciler::new("tunnels"),
                BTreeMap::new(),
                BTreeSet::new(),
            ),
        ];
        let hosts: BTreeMap<IpCidr, u32> = (0..200).map(|i| (host(i), i)).collect();
        let routes: BTreeMap<IpCidr, u32> = (0..10).map(|i| (route(i), i)).collect();
        assert_eq!(round(&mut room, &mut t, [&hosts, &routes]), 0, "no failure");
        // The 10 routes first, then hosts up to 128 - 10 - 2 = 116.
        assert_eq!(t[1].0.contents.len(), 10);
        assert_eq!(t[0].0.contents.len(), 116);
        let o = room.occupancy();
        assert_eq!(
            o,
            vec![Occupancy {
                map: "CM_IPCACHE",
                entries: 126,
                capacity: 128,
                refused: 84
            }]
        );
        assert_eq!(t[0].2.len(), 84, "the refused hosts wait for a retry");
        assert_eq!(room.crossings().len(), 1, "alarm raised once");
        assert!(room.crossings().is_empty(), "and not again");
        // 100 hosts leave: the waiting hosts and routes now fit.
        let fewer: BTreeMap<IpCidr, u32> = hosts.iter().skip(100).map(|(k, v)| (*k, *v)).collect();
        round(&mut room, &mut t, [&fewer, &routes]);
        assert_eq!(t[1].0.contents.len(), 10, "every route placed");
        assert_eq!(
            t[0].0.contents.len(),
            100,
            "the 100 remaining hosts fit now"
        );
        assert_eq!(room.occupancy()[0].refused, 0);
        assert_eq!(room.occupancy()[0].entries, 110);
        let crossed = room.crossings();
        assert_eq!(crossed.len(), 1);
        assert!(!crossed[0].1, "alarm cleared: 110/128 = 0.86");
    }

    #[test]
    fn families_are_bounded_apart_and_unbounded_reports_nothing() {
        let mut room = IpCacheRoom::new(usize::MAX, 64);
        let v6 = |i: u16| {
            IpCidr::new(
                std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i).into(),
                128,
            )
            .unwrap()
        };
        let mut hosts = room.hosts();
        assert!((0..1000).all(|i| hosts.admit(&host(i))), "v4 unbounded");
        let admitted = (0..100).filter(|i| hosts.admit(&v6(*i))).count();
        assert_eq!(admitted, 63, "v6: 64 less the reserve of 1");
        let o = room.occupancy();
        assert_eq!(o.len(), 1, "only the bounded map is reported");
        assert_eq!(
            (o[0].map, o[0].entries, o[0].refused),
            ("CM_IPCACHE6", 63, 37)
        );
        assert!(IpCacheRoom::default().occupancy().is_empty());
    }
}
