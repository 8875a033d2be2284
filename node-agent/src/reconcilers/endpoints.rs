//! [`EndpointMap`] keeps `CM_ENDPOINTS` and `CM_ENDPOINTS6` (the local pods the programs deliver
//! to: address -> host veth, pod MAC, identity) equal to the desired local
//! endpoints ([`crate::desired::LocalEndpoints`], built by
//! [`crate::endpoints`] from the CNI plugin's files and the identities the
//! apiserver allocated). Removing an endpoint also removes the pin of its
//! veth's `from_endpoint` link (the kernel detached the program with the
//! interface; the pin would otherwise stay in bpffs).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use aya::maps::{HashMap, Map, MapData};
use tunnel_common::{EndpointInfo, Ip6, maps, programs};

use super::{ReconcileError, Reconciler};
use crate::desired::LocalEndpoint;

const TARGET: &str = "endpoints";

fn err(e: aya::maps::MapError) -> ReconcileError {
    ReconcileError::new(TARGET, e)
}

/// `CM_ENDPOINTS` (IPv4 pods) and `CM_ENDPOINTS6` (IPv6 pods), keyed as
/// the programs load the addresses (network order).
pub struct EndpointMap {
    map: HashMap<MapData, u32, EndpointInfo>,
    map6: HashMap<MapData, Ip6, EndpointInfo>,
    pin_dir: PathBuf,
}

fn info(e: &LocalEndpoint) -> EndpointInfo {
    EndpointInfo {
        ifindex: e.host_ifindex,
        identity: e.identity,
        mac: e.mac,
        host_mac: e.host_mac,
    }
}

fn local(v: EndpointInfo) -> LocalEndpoint {
    LocalEndpoint {
        host_ifindex: v.ifindex,
        host_mac: v.host_mac,
        mac: v.mac,
        identity: v.identity,
    }
}

impl EndpointMap {
    pub fn open(pin_dir: &std::path::Path) -> Result<Self, ReconcileError> {
        let data = super::pinned(pin_dir, maps::ENDPOINTS, TARGET)?;
        let data6 = super::pinned(pin_dir, maps::ENDPOINTS6, TARGET)?;
        Ok(Self {
            map: HashMap::try_from(Map::HashMap(data)).map_err(err)?,
            map6: HashMap::try_from(Map::HashMap(data6)).map_err(err)?,
            pin_dir: pin_dir.to_owned(),
        })
    }

    fn forget_link(&self, ifindex: u32) {
        let path = self
            .pin_dir
            .join(format!("link_{}_{ifindex}", programs::FROM_ENDPOINT));
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "removing a link pin");
        }
    }

    fn remove(&mut self, ip: IpAddr) -> Result<(), ReconcileError> {
        let (ifindex, removed) = match ip {
            IpAddr::V4(a) => {
                let key = u32::from(a).to_be();
                let i = self.map.get(&key, 0).ok().map(|i| i.ifindex);
                (i, self.map.remove(&key))
            }
            IpAddr::V6(a) => {
                let key = a.octets();
                let i = self.map6.get(&key, 0).ok().map(|i| i.ifindex);
                (i, self.map6.remove(&key))
            }
        };
        match crate::datapath::absent_ok(removed) {
            Ok(()) => {}
            Err(e) => return Err(err(e)),
        }
        // The veth's link pin goes with its last address (a dual-stack pod
        // has two entries on one veth).
        if let Some(i) = ifindex
            && !self.snapshot()?.values().any(|e| e.host_ifindex == i)
        {
            self.forget_link(i);
        }
        Ok(())
    }

    /// Removes every entry whose address `keep` refuses (pods deleted
    /// while no agent ran); returns the addresses removed.
    pub fn retain(&mut self, keep: impl Fn(IpAddr) -> bool) -> Result<Vec<IpAddr>, ReconcileError> {
        let gone: Vec<IpAddr> = self
            .snapshot()?
            .into_keys()
            .filter(|ip| !keep(*ip))
            .collect();
        for ip in &gone {
            self.remove(*ip)?;
        }
        Ok(gone)
    }
}

impl Reconciler<IpAddr, LocalEndpoint> for EndpointMap {
    fn name(&self) -> &'static str {
        TARGET
    }
    fn update(&mut self, ip: &IpAddr, e: &LocalEndpoint) -> Result<(), ReconcileError> {
        match ip {
            IpAddr::V4(a) => self.map.insert(&u32::from(*a).to_be(), &info(e), 0),
            IpAddr::V6(a) => self.map6.insert(&a.octets(), &info(e), 0),
        }
        .map_err(err)
    }
    fn delete(&mut self, ip: &IpAddr) -> Result<(), ReconcileError> {
        self.remove(*ip)
    }
    fn prune(
        &mut self,
        desired: &BTreeMap<IpAddr, LocalEndpoint>,
    ) -> Result<usize, ReconcileError> {
        Ok(self.retain(|ip| desired.contains_key(&ip))?.len())
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpAddr, LocalEndpoint>, ReconcileError> {
        let mut out = BTreeMap::new();
        for r in self.map.iter() {
            let (k, v) = r.map_err(err)?;
            out.insert(
                IpAddr::from(std::net::Ipv4Addr::from(u32::from_be(k))),
                local(v),
            );
        }
        for r in self.map6.iter() {
            let (k, v) = r.map_err(err)?;
            out.insert(IpAddr::from(std::net::Ipv6Addr::from(k)), local(v));
        }
        Ok(out)
    }
}
