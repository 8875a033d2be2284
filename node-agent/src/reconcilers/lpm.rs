//! What the ip-cache and tunnel reconcilers share: both write the one LPM
//! map `CM_IPCACHE` (opened through its pin) and split it by prefix length.
//! IPv6 entries are not in the eBPF datapath yet; they are skipped.

use std::{net::IpAddr, path::Path};

use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use clustermesh_api::IpCidr;
use tunnel_common::{IpCacheValue, maps};

use super::ReconcileError;

pub(super) fn err(target: &'static str) -> impl Fn(aya::maps::MapError) -> ReconcileError {
    move |e| ReconcileError::new(target, e)
}

pub(super) fn open(
    pin_dir: &Path,
    target: &'static str,
) -> Result<LpmTrie<MapData, u32, IpCacheValue>, ReconcileError> {
    let data = super::pinned(pin_dir, maps::IPCACHE, target)?;
    LpmTrie::try_from(Map::LpmTrie(data)).map_err(err(target))
}

pub(super) fn key(c: &IpCidr) -> Option<Key<u32>> {
    match c.addr() {
        IpAddr::V4(a) => Some(Key::new(c.prefix_len().into(), u32::from(a).to_be())),
        IpAddr::V6(_) => None,
    }
}

pub(super) fn cidr(k: &Key<u32>) -> Option<IpCidr> {
    let addr = std::net::Ipv4Addr::from(u32::from_be(k.data()));
    IpCidr::new(IpAddr::V4(addr), u8::try_from(k.prefix_len()).ok()?).ok()
}

pub(super) fn v4_be(ip: Option<IpAddr>) -> u32 {
    match ip {
        Some(IpAddr::V4(a)) => u32::from(a).to_be(),
        _ => 0,
    }
}

/// Every key of the map with its value (a snapshot).
pub(super) fn entries(
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
