//! [`IpCacheMap`] keeps the host entries (/32 and /128: endpoints and
//! remote nodes) of the pinned `CM_IPCACHE` and `CM_IPCACHE6` equal to the
//! desired ip-cache. The pod-CIDR routes of the same maps are
//! [`super::tunnels::TunnelMap`]'s, so each one's prune only removes its
//! own entries.

use std::{collections::BTreeMap, path::Path};

use clustermesh_api::{Identity, IpCidr};
use tunnel_common::{IPCACHE_FLAG_ENCRYPT, IpCacheValue};

use super::{
    ReconcileError, Reconciler,
    lpm::{DualLpm, open_ipcache, tunnel_endpoint, tunnel_fields},
};
use crate::desired::IpCacheEntry;

/// Host entries (/32, /128) of `CM_IPCACHE` and `CM_IPCACHE6`.
pub struct IpCacheMap {
    map: DualLpm<IpCacheValue>,
}

impl IpCacheMap {
    pub fn open(pin_dir: &Path) -> Result<Self, ReconcileError> {
        Ok(Self {
            map: open_ipcache(pin_dir, "ipcache")?,
        })
    }
}

impl Reconciler<IpCidr, IpCacheEntry> for IpCacheMap {
    fn name(&self) -> &'static str {
        "ipcache"
    }
    fn update(&mut self, k: &IpCidr, v: &IpCacheEntry) -> Result<(), ReconcileError> {
        let (tunnel_endpoint, tunnel_endpoint6) = tunnel_fields(v.tunnel_endpoint);
        let value = IpCacheValue {
            identity: v.identity.get(),
            tunnel_endpoint,
            cluster_id: v.cluster_id,
            flags: if v.encrypt { IPCACHE_FLAG_ENCRYPT } else { 0 },
            _pad: [0; 2],
            tunnel_endpoint6,
        };
        self.map.insert(k, &value)
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        self.map.remove(k)
    }
    fn prune(&mut self, desired: &BTreeMap<IpCidr, IpCacheEntry>) -> Result<usize, ReconcileError> {
        let mut n = 0;
        for (k, _) in self.map.entries()? {
            if !k.is_host() {
                continue;
            }
            if k.cidr().is_none_or(|c| !desired.contains_key(&c)) {
                self.map.remove_key(&k)?;
                n += 1;
            }
        }
        Ok(n)
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, IpCacheEntry>, ReconcileError> {
        let mut out = BTreeMap::new();
        for (k, v) in self.map.entries()? {
            if !k.is_host() {
                continue;
            }
            let (Some(c), Ok(identity)) = (k.cidr(), Identity::from_raw(v.identity.into())) else {
                continue;
            };
            out.insert(
                c,
                IpCacheEntry {
                    identity,
                    cluster_id: v.cluster_id,
                    tunnel_endpoint: tunnel_endpoint(&v),
                    encrypt: v.flags & IPCACHE_FLAG_ENCRYPT != 0,
                },
            );
        }
        Ok(out)
    }
}
