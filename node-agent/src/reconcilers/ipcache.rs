//! [`IpCacheMap`] keeps the host entries (/32: endpoints and remote nodes)
//! of the pinned `CM_IPCACHE` equal to the desired ip-cache. The pod-CIDR
//! routes of the same map are [`super::tunnels::TunnelMap`]'s, so each
//! one's prune only removes its own entries.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use aya::maps::{LpmTrie, MapData};
use clustermesh_api::{Identity, IpCidr};
use tunnel_common::{IPCACHE_FLAG_ENCRYPT, IpCacheValue};

use super::{
    ReconcileError, Reconciler,
    lpm::{cidr, entries, err, key, open, v4_be},
};
use crate::desired::IpCacheEntry;

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
            tunnel_endpoint6: [0; 16],
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
