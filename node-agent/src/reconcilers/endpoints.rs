//! [`EndpointMap`] keeps `CM_ENDPOINTS` (the local pods the programs deliver
//! to: address -> host veth, pod MAC, identity) equal to the desired local
//! endpoints ([`crate::desired::LocalEndpoints`], built by
//! [`crate::endpoints`] from the CNI plugin's files and the identities the
//! apiserver allocated). Removing an endpoint also removes the pin of its
//! veth's `from_endpoint` link (the kernel detached the program with the
//! interface; the pin would otherwise stay in bpffs).

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use aya::maps::{HashMap, Map, MapData};
use tunnel_common::{EndpointInfo, maps, programs};

use super::{ReconcileError, Reconciler};
use crate::desired::LocalEndpoint;

const TARGET: &str = "endpoints";

fn err(e: aya::maps::MapError) -> ReconcileError {
    ReconcileError::new(TARGET, e)
}

pub struct EndpointMap {
    map: HashMap<MapData, u32, EndpointInfo>,
    pin_dir: PathBuf,
}

impl EndpointMap {
    pub fn open(pin_dir: &std::path::Path) -> Result<Self, ReconcileError> {
        let data = super::pinned(pin_dir, maps::ENDPOINTS, TARGET)?;
        Ok(Self {
            map: HashMap::try_from(Map::HashMap(data)).map_err(err)?,
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

    fn remove(&mut self, ip: Ipv4Addr) -> Result<(), ReconcileError> {
        let key = u32::from(ip).to_be();
        let ifindex = self.map.get(&key, 0).ok().map(|i| i.ifindex);
        match self.map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
        if let Some(i) = ifindex {
            self.forget_link(i);
        }
        Ok(())
    }

    /// Removes every entry whose address `keep` refuses (pods deleted
    /// while no agent ran); returns the addresses removed.
    pub fn retain(
        &mut self,
        keep: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Vec<Ipv4Addr>, ReconcileError> {
        let gone: Vec<Ipv4Addr> = self
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

impl Reconciler<Ipv4Addr, LocalEndpoint> for EndpointMap {
    fn name(&self) -> &'static str {
        TARGET
    }
    fn update(&mut self, ip: &Ipv4Addr, e: &LocalEndpoint) -> Result<(), ReconcileError> {
        let info = EndpointInfo {
            ifindex: e.host_ifindex,
            identity: e.identity,
            mac: e.mac,
            host_mac: e.host_mac,
        };
        self.map
            .insert(&u32::from(*ip).to_be(), &info, 0)
            .map_err(err)
    }
    fn delete(&mut self, ip: &Ipv4Addr) -> Result<(), ReconcileError> {
        self.remove(*ip)
    }
    fn prune(
        &mut self,
        desired: &BTreeMap<Ipv4Addr, LocalEndpoint>,
    ) -> Result<usize, ReconcileError> {
        Ok(self.retain(|ip| desired.contains_key(&ip))?.len())
    }
    fn snapshot(&mut self) -> Result<BTreeMap<Ipv4Addr, LocalEndpoint>, ReconcileError> {
        let mut out = BTreeMap::new();
        for r in self.map.iter() {
            let (k, v) = r.map_err(err)?;
            out.insert(
                Ipv4Addr::from(u32::from_be(k)),
                LocalEndpoint {
                    host_ifindex: v.ifindex,
                    host_mac: v.host_mac,
                    mac: v.mac,
                    identity: v.identity,
                },
            );
        }
        Ok(out)
    }
}
