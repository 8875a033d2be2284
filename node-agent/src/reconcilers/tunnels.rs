//! [`TunnelMap`] keeps the pod-CIDR routes (prefixes shorter than a host
//! entry) of the pinned `CM_IPCACHE` and `CM_IPCACHE6` equal to the desired
//! tunnels.
//!
//! A pod CIDR whose node goes away is not simply removed: it is left as a
//! tombstone (flag `IPCACHE_FLAG_UNREACHABLE`) for [`TOMBSTONE_TTL`], so
//! traffic still addressed to those pods is dropped with a counted reason
//! (`drop_no_tunnel_endpoint`) instead of leaking to the host stack and its
//! default route.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use clustermesh_api::{IpCidr, NodeName};
use tunnel_common::{IPCACHE_FLAG_ENCRYPT, IPCACHE_FLAG_UNREACHABLE, IpCacheValue};

use super::{
    ReconcileError, Reconciler,
    lpm::{DualLpm, open_ipcache, tunnel_endpoint, tunnel_fields},
};
use crate::desired::TunnelEntry;

/// The node name of an entry adopted from a previous agent (the kernel
/// does not store names).
pub const ADOPTED: &str = "adopted-from-datapath";

fn adopted_name() -> &'static NodeName {
    static NAME: std::sync::OnceLock<NodeName> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        ADOPTED
            .parse()
            .unwrap_or_else(|_| unreachable!("a valid node name"))
    })
}

/// How long a removed node's pod CIDR keeps dropping traffic (long enough
/// for clients to notice and stop; then the range is forgotten).
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(300);

/// Pod-CIDR routes (prefixes shorter than a host entry) of `CM_IPCACHE`
/// and `CM_IPCACHE6`.
pub struct TunnelMap {
    map: DualLpm<IpCacheValue>,
    /// Node names are not in the map; kept to answer snapshots exactly.
    names: BTreeMap<IpCidr, NodeName>,
    /// Removed ranges still marked unreachable, with when they were removed.
    tombstones: BTreeMap<IpCidr, Instant>,
    tombstone_ttl: Duration,
}

impl TunnelMap {
    pub fn open(pin_dir: &Path) -> Result<Self, ReconcileError> {
        Ok(Self {
            map: open_ipcache(pin_dir, "tunnels")?,
            names: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            tombstone_ttl: TOMBSTONE_TTL,
        })
    }

    /// Overrides [`TOMBSTONE_TTL`] (tests).
    pub fn with_tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// Ranges currently held as tombstones.
    pub fn tombstones(&self) -> impl Iterator<Item = &IpCidr> {
        self.tombstones.keys()
    }

    /// Removes tombstones older than the TTL.
    fn expire(&mut self) -> Result<(), ReconcileError> {
        let ttl = self.tombstone_ttl;
        let expired: Vec<IpCidr> = self
            .tombstones
            .iter()
            .filter(|(_, at)| at.elapsed() >= ttl)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            self.tombstones.remove(&k);
            self.map.remove(&k)?;
        }
        Ok(())
    }
}

impl Reconciler<IpCidr, TunnelEntry> for TunnelMap {
    fn name(&self) -> &'static str {
        "tunnels"
    }
    fn update(&mut self, k: &IpCidr, v: &TunnelEntry) -> Result<(), ReconcileError> {
        let (tunnel_endpoint, tunnel_endpoint6) = tunnel_fields(Some(v.node_ip));
        let value = IpCacheValue {
            identity: 0,
            tunnel_endpoint,
            cluster_id: v.cluster_id,
            flags: if v.encrypt { IPCACHE_FLAG_ENCRYPT } else { 0 },
            _pad: [0; 2],
            tunnel_endpoint6,
        };
        self.names.insert(*k, v.node.clone());
        self.tombstones.remove(k);
        self.map.insert(k, &value)?;
        self.expire()
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        self.names.remove(k);
        let Some(previous) = self.map.get(k)? else {
            return self.expire();
        };
        // Overwritten in place: the range goes from "tunnel to the node"
        // to "drop" with no moment in between.
        let tomb = IpCacheValue {
            identity: 0,
            tunnel_endpoint: 0,
            cluster_id: previous.cluster_id,
            flags: IPCACHE_FLAG_UNREACHABLE,
            _pad: [0; 2],
            tunnel_endpoint6: [0; 16],
        };
        self.map.insert(k, &tomb)?;
        self.tombstones.insert(*k, Instant::now());
        self.expire()
    }
    fn prune(&mut self, desired: &BTreeMap<IpCidr, TunnelEntry>) -> Result<usize, ReconcileError> {
        let mut n = 0;
        for (k, v) in self.map.entries()? {
            if k.is_host() {
                continue;
            }
            let Some(c) = k.cidr() else {
                self.map.remove_key(&k)?;
                n += 1;
                continue;
            };
            if desired.contains_key(&c) {
                continue;
            }
            if v.flags & IPCACHE_FLAG_UNREACHABLE != 0 {
                // A tombstone; one a previous process left starts its TTL now.
                self.tombstones.entry(c).or_insert_with(Instant::now);
                continue;
            }
            self.map.remove_key(&k)?;
            n += 1;
        }
        self.names.retain(|k, _| desired.contains_key(k));
        self.expire()?;
        Ok(n)
    }
    fn tick(&mut self, _now: Instant) -> Result<(), ReconcileError> {
        self.expire()
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, TunnelEntry>, ReconcileError> {
        let mut out = BTreeMap::new();
        for (k, v) in self.map.entries()? {
            if k.is_host() {
                continue;
            }
            let (Some(c), Some(node_ip)) = (k.cidr(), tunnel_endpoint(&v)) else {
                continue;
            };
            // Node names are not stored in the kernel: an entry adopted
            // from a previous process is reported under [`ADOPTED`], so
            // the agent knows the range and its cluster at once (the
            // incumbent of the merge's ownership) and the first diff
            // rewrites it in place with its name (same kernel value).
            let node = self
                .names
                .get(&c)
                .cloned()
                .unwrap_or_else(|| adopted_name().clone());
            out.insert(
                c,
                TunnelEntry {
                    node_ip,
                    cluster_id: v.cluster_id,
                    node,
                    encrypt: v.flags & IPCACHE_FLAG_ENCRYPT != 0,
                },
            );
        }
        Ok(out)
    }
}
