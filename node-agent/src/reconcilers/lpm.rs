//! The LPM tries the reconcilers share, one per address family: the
//! ip-cache (`CM_IPCACHE` + `CM_IPCACHE6`, written by both the ip-cache and
//! the tunnel reconcilers, split by prefix length: host entries are the
//! ip-cache's, shorter prefixes the tunnels') and the strict ranges
//! (`CM_STRICT_RANGES` + `CM_STRICT_RANGES6`). [`DualLpm`] opens both of a
//! pair through their pins and speaks [`IpCidr`], so a reconciler never
//! handles a family on its own.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{
    Pod,
    maps::{LpmTrie, Map, MapData, lpm_trie::Key},
};
use clustermesh_api::IpCidr;
use tunnel_common::{Ip6, IpCacheValue, maps};

use super::ReconcileError;

pub(super) fn err(target: &'static str) -> impl Fn(aya::maps::MapError) -> ReconcileError {
    move |e| ReconcileError::new(target, e)
}

/// A key of either trie, as read back from the kernel.
#[derive(Clone, Copy)]
pub(super) enum AnyKey {
    V4(Key<u32>),
    V6(Key<Ip6>),
}

impl AnyKey {
    pub(super) fn of(c: &IpCidr) -> Self {
        let len = c.prefix_len().into();
        match c.addr() {
            IpAddr::V4(a) => Self::V4(Key::new(len, u32::from(a).to_be())),
            IpAddr::V6(a) => Self::V6(Key::new(len, a.octets())),
        }
    }

    /// The range of the key (None: not a valid prefix, e.g. host bits set).
    pub(super) fn cidr(&self) -> Option<IpCidr> {
        let (addr, len) = match self {
            Self::V4(k) => (
                IpAddr::V4(Ipv4Addr::from(u32::from_be(k.data()))),
                k.prefix_len(),
            ),
            Self::V6(k) => (IpAddr::V6(Ipv6Addr::from(k.data())), k.prefix_len()),
        };
        IpCidr::new(addr, u8::try_from(len).ok()?).ok()
    }

    /// A single address (/32, /128): the ip-cache's host entries.
    pub(super) fn is_host(&self) -> bool {
        match self {
            Self::V4(k) => k.prefix_len() == 32,
            Self::V6(k) => k.prefix_len() == 128,
        }
    }
}

/// The IPv4 and the IPv6 trie of one kind, with the same value type.
pub(super) struct DualLpm<V: Pod> {
    v4: LpmTrie<MapData, u32, V>,
    v6: LpmTrie<MapData, Ip6, V>,
    target: &'static str,
}

impl<V: Pod> DualLpm<V> {
    pub(super) fn open(
        pin_dir: &Path,
        (name4, name6): (&'static str, &'static str),
        target: &'static str,
    ) -> Result<Self, ReconcileError> {
        let d4 = super::pinned(pin_dir, name4, target)?;
        let d6 = super::pinned(pin_dir, name6, target)?;
        Ok(Self {
            v4: LpmTrie::try_from(Map::LpmTrie(d4)).map_err(err(target))?,
            v6: LpmTrie::try_from(Map::LpmTrie(d6)).map_err(err(target))?,
            target,
        })
    }

    pub(super) fn insert(&mut self, c: &IpCidr, v: &V) -> Result<(), ReconcileError> {
        self.insert_key(&AnyKey::of(c), v)
    }

    fn insert_key(&mut self, k: &AnyKey, v: &V) -> Result<(), ReconcileError> {
        match k {
            AnyKey::V4(k) => self.v4.insert(k, v, 0),
            AnyKey::V6(k) => self.v6.insert(k, v, 0),
        }
        .map_err(err(self.target))
    }

    /// Removes the entry; none there is fine.
    pub(super) fn remove(&mut self, c: &IpCidr) -> Result<(), ReconcileError> {
        self.remove_key(&AnyKey::of(c))
    }

    pub(super) fn remove_key(&mut self, k: &AnyKey) -> Result<(), ReconcileError> {
        let r = match k {
            AnyKey::V4(k) => self.v4.remove(k),
            AnyKey::V6(k) => self.v6.remove(k),
        };
        match crate::datapath::absent_ok(r) {
            Ok(()) => Ok(()),
            Err(e) => Err(err(self.target)(e)),
        }
    }

    /// Removes every entry whose range `keep` refuses (and keys that are
    /// no valid range); returns how many went. The prune of the tries
    /// that hold one entry per range (strict ranges, policy CIDRs).
    pub(super) fn retain(
        &mut self,
        keep: impl Fn(&IpCidr) -> bool,
    ) -> Result<usize, ReconcileError> {
        let mut n = 0;
        for (k, _) in self.entries()? {
            if k.cidr().is_none_or(|c| !keep(&c)) {
                self.remove_key(&k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The exact entry of `c` (not a longest-prefix match).
    pub(super) fn get(&self, c: &IpCidr) -> Result<Option<V>, ReconcileError> {
        let r = match AnyKey::of(c) {
            AnyKey::V4(k) => self.v4.get(&k, 0),
            AnyKey::V6(k) => self.v6.get(&k, 0),
        };
        match r {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(err(self.target)(e)),
        }
    }

    /// Every key of both tries with its value (a snapshot; entries removed
    /// meanwhile are skipped).
    pub(super) fn entries(&self) -> Result<Vec<(AnyKey, V)>, ReconcileError> {
        let e = err(self.target);
        let mut out = Vec::new();
        for k in self.v4.keys() {
            let k = k.map_err(&e)?;
            match self.v4.get(&k, 0) {
                Ok(v) => out.push((AnyKey::V4(k), v)),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(x) => return Err(e(x)),
            }
        }
        for k in self.v6.keys() {
            let k = k.map_err(&e)?;
            match self.v6.get(&k, 0) {
                Ok(v) => out.push((AnyKey::V6(k), v)),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(x) => return Err(e(x)),
            }
        }
        Ok(out)
    }
}

/// The ip-cache pair (`CM_IPCACHE`, `CM_IPCACHE6`).
pub(super) fn open_ipcache(
    pin_dir: &Path,
    target: &'static str,
) -> Result<DualLpm<IpCacheValue>, ReconcileError> {
    DualLpm::open(pin_dir, (maps::IPCACHE, maps::IPCACHE6), target)
}

/// The tunnel endpoint fields of an [`IpCacheValue`]: (IPv4, IPv6), the
/// one of the address's family set, the other zero.
pub(super) fn tunnel_fields(ip: Option<IpAddr>) -> (u32, Ip6) {
    match ip {
        Some(IpAddr::V4(a)) => (u32::from(a).to_be(), [0; 16]),
        Some(IpAddr::V6(a)) => (0, a.octets()),
        None => (0, [0; 16]),
    }
}

/// The tunnel endpoint of a value, either family (None: no node).
pub(super) fn tunnel_endpoint(v: &IpCacheValue) -> Option<IpAddr> {
    if v.tunnel_endpoint != 0 {
        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v.tunnel_endpoint))))
    } else if v.tunnel_endpoint6 != [0; 16] {
        Some(IpAddr::V6(Ipv6Addr::from(v.tunnel_endpoint6)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_round_trip_in_both_families() {
        for c in [
            "10.0.0.0/8",
            "10.1.0.7/32",
            "0.0.0.0/0",
            "fd00::/16",
            "fd00:10:2::/64",
            "fd00:10:2::5/128",
        ] {
            let c: IpCidr = c.parse().unwrap();
            let k = AnyKey::of(&c);
            assert_eq!(k.cidr(), Some(c), "{c}");
            assert_eq!(k.is_host(), c.prefix_len() == 32 || c.prefix_len() == 128);
        }
        let k = AnyKey::of(&"fd00::1/128".parse().unwrap());
        let AnyKey::V6(k6) = k else { panic!("v6") };
        assert_eq!(k6.data()[15], 1, "network order");
        // A key with host bits set (never written by us) is no range.
        let bad = AnyKey::V4(Key::new(8, u32::from_be_bytes([10, 0, 0, 1]).to_be()));
        assert_eq!(bad.cidr(), None);
        let bad6 = AnyKey::V6(Key::new(
            16,
            "fd00::1".parse::<Ipv6Addr>().unwrap().octets(),
        ));
        assert_eq!(bad6.cidr(), None);
    }

    #[test]
    fn tunnel_endpoints_round_trip_in_both_families() {
        for ip in [None, Some("192.0.2.1"), Some("2001:db8::7")] {
            let ip: Option<IpAddr> = ip.map(|s| s.parse().unwrap());
            let (t4, t6) = tunnel_fields(ip);
            let v = IpCacheValue {
                tunnel_endpoint: t4,
                tunnel_endpoint6: t6,
                ..IpCacheValue::default()
            };
            assert_eq!(tunnel_endpoint(&v), ip);
            assert_eq!(v.has_tunnel_endpoint(), ip.is_some());
        }
    }
}
