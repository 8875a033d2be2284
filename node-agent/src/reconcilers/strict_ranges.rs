//! [`StrictRangeMap`] keeps the pinned `CM_STRICT_RANGES` (an LPM trie of
//! the mesh's pod ranges) equal to the desired strict ranges. In strict
//! mode `from_endpoint` drops pod traffic to an address inside one of them
//! that the ip-cache cannot route (`drop_strict_unknown_dest`) instead of
//! handing it to the host stack. IPv6 ranges are not in the eBPF datapath
//! yet (IPv6 from pods is dropped as a whole); they are skipped.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use clustermesh_api::IpCidr;
use tunnel_common::{STRICT_RANGE, maps};

use super::{ReconcileError, Reconciler};

const TARGET: &str = "strict ranges";

fn err(e: aya::maps::MapError) -> ReconcileError {
    ReconcileError::new(TARGET, e)
}

/// The LPM key of an IPv4 range; None for IPv6.
pub fn key(c: &IpCidr) -> Option<Key<u32>> {
    match c.addr() {
        IpAddr::V4(a) => Some(Key::new(c.prefix_len().into(), u32::from(a).to_be())),
        IpAddr::V6(_) => None,
    }
}

/// The range of an LPM key (None: not a valid prefix).
pub fn cidr(k: &Key<u32>) -> Option<IpCidr> {
    let addr = std::net::Ipv4Addr::from(u32::from_be(k.data()));
    IpCidr::new(IpAddr::V4(addr), u8::try_from(k.prefix_len()).ok()?).ok()
}

pub struct StrictRangeMap {
    map: LpmTrie<MapData, u32, u32>,
}

impl StrictRangeMap {
    pub fn open(pin_dir: &Path) -> Result<Self, ReconcileError> {
        let data = super::pinned(pin_dir, maps::STRICT_RANGES, TARGET)?;
        Ok(Self {
            map: LpmTrie::try_from(Map::LpmTrie(data)).map_err(err)?,
        })
    }

    fn keys(&self) -> Result<Vec<Key<u32>>, ReconcileError> {
        self.map.keys().map(|k| k.map_err(err)).collect()
    }
}

impl Reconciler<IpCidr, ()> for StrictRangeMap {
    fn name(&self) -> &'static str {
        TARGET
    }
    fn update(&mut self, k: &IpCidr, _: &()) -> Result<(), ReconcileError> {
        let Some(key) = key(k) else { return Ok(()) };
        self.map.insert(&key, &STRICT_RANGE, 0).map_err(err)
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        let Some(key) = key(k) else { return Ok(()) };
        match self.map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
    fn prune(&mut self, desired: &BTreeMap<IpCidr, ()>) -> Result<usize, ReconcileError> {
        let mut n = 0;
        for k in self.keys()? {
            if cidr(&k).is_none_or(|c| !desired.contains_key(&c)) {
                match self.map.remove(&k) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => n += 1,
                    Err(e) => return Err(err(e)),
                }
            }
        }
        Ok(n)
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, ()>, ReconcileError> {
        Ok(self
            .keys()?
            .iter()
            .filter_map(cidr)
            .map(|c| (c, ()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_round_trip_and_ipv6_is_skipped() {
        for (c, want) in [
            ("10.0.0.0/8", Some((8, [10, 0, 0, 0]))),
            ("10.2.0.0/16", Some((16, [10, 2, 0, 0]))),
            ("10.1.0.7/32", Some((32, [10, 1, 0, 7]))),
            ("0.0.0.0/0", Some((0, [0, 0, 0, 0]))),
            ("fd00::/16", None),
        ] {
            let c: IpCidr = c.parse().unwrap();
            let k = key(&c);
            assert_eq!(
                k.as_ref()
                    .map(|k| (k.prefix_len(), u32::from_be(k.data()).to_be_bytes())),
                want,
                "{c}"
            );
            if let Some(k) = k {
                assert_eq!(cidr(&k), Some(c));
            }
        }
        // A key with host bits set (never written by us) is no range.
        assert_eq!(
            cidr(&Key::new(8, u32::from_be_bytes([10, 0, 0, 1]).to_be())),
            None
        );
    }
}
