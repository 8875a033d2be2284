//! Reconcilers that keep the pinned eBPF maps equal to the desired state.
//!
//! Both write the one LPM map `CM_IPCACHE` and split it by prefix length:
//! [`IpCacheMap`] owns the host entries (/32: endpoints and remote nodes),
//! [`TunnelMap`] the pod-CIDR routes (shorter prefixes, identity 0), so each
//! one's prune only removes its own entries.
//!
//! A pod CIDR whose node goes away is not simply removed: [`TunnelMap`]
//! leaves a tombstone (flag `IPCACHE_FLAG_UNREACHABLE`) for
//! [`TOMBSTONE_TTL`], so traffic still addressed to those pods is dropped
//! with a counted reason (`drop_no_tunnel_endpoint`) instead of leaking to
//! the host stack and its default route. Each opens the map through its
//! pin, independently of the loader. IPv6 entries are not in the eBPF
//! datapath yet; they are skipped (and counted by the caller's status).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use clustermesh_api::{Identity, IpCidr, NodeName};
use tunnel_common::{IPCACHE_FLAG_ENCRYPT, IPCACHE_FLAG_UNREACHABLE, IpCacheValue, maps};

/// How long a removed node's pod CIDR keeps dropping traffic (long enough
/// for clients to notice and stop; then the range is forgotten).
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(300);

use crate::{
    clusters::merge::{IpCacheEntry, TunnelEntry},
    reconcile::{ReconcileError, Reconciler},
};

fn err(target: &'static str) -> impl Fn(aya::maps::MapError) -> ReconcileError {
    move |e| ReconcileError {
        target,
        message: e.to_string(),
    }
}

fn open(
    pin_dir: &Path,
    target: &'static str,
) -> Result<LpmTrie<MapData, u32, IpCacheValue>, ReconcileError> {
    let path = pin_dir.join(maps::IPCACHE);
    let data = MapData::from_pin(&path).map_err(|e| ReconcileError {
        target,
        message: format!("opening {}: {e}", path.display()),
    })?;
    LpmTrie::try_from(Map::LpmTrie(data)).map_err(err(target))
}

fn key(c: &IpCidr) -> Option<Key<u32>> {
    match c.addr() {
        IpAddr::V4(a) => Some(Key::new(c.prefix_len().into(), u32::from(a).to_be())),
        IpAddr::V6(_) => None,
    }
}

fn cidr(k: &Key<u32>) -> Option<IpCidr> {
    let addr = std::net::Ipv4Addr::from(u32::from_be(k.data()));
    IpCidr::new(IpAddr::V4(addr), u8::try_from(k.prefix_len()).ok()?).ok()
}

fn v4_be(ip: Option<IpAddr>) -> u32 {
    match ip {
        Some(IpAddr::V4(a)) => u32::from(a).to_be(),
        _ => 0,
    }
}

/// Every key of the map with its value (a snapshot).
fn entries(
    m: &LpmTrie<MapData, u32, IpCacheValue>,
    target: &'static str,
) -> Result<Vec<(Key<u32>, IpCacheValue)>, ReconcileError> {
    let mut out = Vec::new();
    for k in m.keys() {
        let k = k.map_err(err(target))?;
        match m.get(&k, 0) {
            Ok(v) => out.push((k, v)),
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(err(target)(e)),
        }
    }
    Ok(out)
}

/// Host entries (/32) of `CM_IPCACHE`.
pub struct IpCacheMap {
    map: LpmTrie<MapData, u32, IpCacheValue>,
}

impl IpCacheMap {
    pub fn open(pin_dir: &Path) -> Result<Self, ReconcileError> {
        Ok(Self {
            map: open(pin_dir, "ipcache")?,
        })
    }
}

impl Reconciler<IpCidr, IpCacheEntry> for IpCacheMap {
    fn name(&self) -> &'static str {
        "ipcache"
    }
    fn update(&mut self, k: &IpCidr, v: &IpCacheEntry) -> Result<(), ReconcileError> {
        let Some(key) = key(k) else { return Ok(()) };
        let value = IpCacheValue {
            identity: v.identity.get(),
            tunnel_endpoint: v4_be(v.tunnel_endpoint),
            cluster_id: v.cluster_id,
            flags: if v.encrypt { IPCACHE_FLAG_ENCRYPT } else { 0 },
            _pad: [0; 2],
        };
        self.map.insert(&key, &value, 0).map_err(err("ipcache"))
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        let Some(key) = key(k) else { return Ok(()) };
        match self.map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err("ipcache")(e)),
        }
    }
    fn prune(&mut self, desired: &BTreeMap<IpCidr, IpCacheEntry>) -> Result<usize, ReconcileError> {
        let mut n = 0;
        for (k, _) in entries(&self.map, "ipcache")? {
            if k.prefix_len() != 32 {
                continue;
            }
            if cidr(&k).is_none_or(|c| !desired.contains_key(&c)) {
                self.map.remove(&k).map_err(err("ipcache"))?;
                n += 1;
            }
        }
        Ok(n)
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, IpCacheEntry>, ReconcileError> {
        let mut out = BTreeMap::new();
        for (k, v) in entries(&self.map, "ipcache")? {
            if k.prefix_len() != 32 {
                continue;
            }
            let (Some(c), Ok(identity)) = (cidr(&k), Identity::from_raw(v.identity.into())) else {
                continue;
            };
            out.insert(
                c,
                IpCacheEntry {
                    identity,
                    cluster_id: v.cluster_id,
                    tunnel_endpoint: (v.tunnel_endpoint != 0).then(|| {
                        IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(v.tunnel_endpoint)))
                    }),
                    encrypt: v.flags & IPCACHE_FLAG_ENCRYPT != 0,
                },
            );
        }
        Ok(out)
    }
}

/// Pod-CIDR routes (prefixes shorter than /32) of `CM_IPCACHE`.
pub struct TunnelMap {
    map: LpmTrie<MapData, u32, IpCacheValue>,
    /// Node names are not in the map; kept to answer snapshots exactly.
    names: BTreeMap<IpCidr, NodeName>,
    /// Removed ranges still marked unreachable, with when they were removed.
    tombstones: BTreeMap<IpCidr, Instant>,
    tombstone_ttl: Duration,
}

impl TunnelMap {
    pub fn open(pin_dir: &Path) -> Result<Self, ReconcileError> {
        Ok(Self {
            map: open(pin_dir, "tunnels")?,
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
            if let Some(key) = key(&k) {
                match self.map.remove(&key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(err("tunnels")(e)),
                }
            }
        }
        Ok(())
    }
}

impl Reconciler<IpCidr, TunnelEntry> for TunnelMap {
    fn name(&self) -> &'static str {
        "tunnels"
    }
    fn update(&mut self, k: &IpCidr, v: &TunnelEntry) -> Result<(), ReconcileError> {
        let Some(key) = key(k) else { return Ok(()) };
        let value = IpCacheValue {
            identity: 0,
            tunnel_endpoint: v4_be(Some(v.node_ip)),
            cluster_id: v.cluster_id,
            flags: if v.encrypt { IPCACHE_FLAG_ENCRYPT } else { 0 },
            _pad: [0; 2],
        };
        self.names.insert(*k, v.node.clone());
        self.tombstones.remove(k);
        self.map.insert(&key, &value, 0).map_err(err("tunnels"))?;
        self.expire()
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        self.names.remove(k);
        let Some(key) = key(k) else { return Ok(()) };
        let previous = match self.map.get(&key, 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return self.expire(),
            Err(e) => return Err(err("tunnels")(e)),
        };
        // Overwritten in place: the range goes from "tunnel to the node"
        // to "drop" with no moment in between.
        let tomb = IpCacheValue {
            identity: 0,
            tunnel_endpoint: 0,
            cluster_id: previous.cluster_id,
            flags: IPCACHE_FLAG_UNREACHABLE,
            _pad: [0; 2],
        };
        self.map.insert(&key, &tomb, 0).map_err(err("tunnels"))?;
        self.tombstones.insert(*k, Instant::now());
        self.expire()
    }
    fn prune(&mut self, desired: &BTreeMap<IpCidr, TunnelEntry>) -> Result<usize, ReconcileError> {
        let mut n = 0;
        for (k, v) in entries(&self.map, "tunnels")? {
            if k.prefix_len() == 32 {
                continue;
            }
            let Some(c) = cidr(&k) else {
                self.map.remove(&k).map_err(err("tunnels"))?;
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
            self.map.remove(&k).map_err(err("tunnels"))?;
            n += 1;
        }
        self.names.retain(|k, _| desired.contains_key(k));
        self.expire()?;
        Ok(n)
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, TunnelEntry>, ReconcileError> {
        let mut out = BTreeMap::new();
        for (k, v) in entries(&self.map, "tunnels")? {
            if k.prefix_len() == 32 || v.tunnel_endpoint == 0 {
                continue;
            }
            let Some(c) = cidr(&k) else { continue };
            // Node names are not stored in the kernel: entries adopted from
            // a previous process are left out, so the first diff rewrites
            // them in place once (same kernel value, no gap).
            let Some(node) = self.names.get(&c).cloned() else {
                continue;
            };
            out.insert(
                c,
                TunnelEntry {
                    node_ip: IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(v.tunnel_endpoint))),
                    cluster_id: v.cluster_id,
                    node,
                    encrypt: v.flags & IPCACHE_FLAG_ENCRYPT != 0,
                },
            );
        }
        Ok(out)
    }
}
