//! [`StrictRangeMap`] keeps the pinned `CM_STRICT_RANGES` and
//! `CM_STRICT_RANGES6` (LPM tries of the mesh's pod ranges, one per
//! family) equal to the desired strict ranges. In strict mode
//! `from_endpoint` drops pod traffic to an address inside one of them that
//! the ip-cache cannot route (`drop_strict_unknown_dest`) instead of
//! handing it to the host stack.

use std::{collections::BTreeMap, path::Path};

use clustermesh_api::IpCidr;
use tunnel_common::{STRICT_RANGE, maps};

use super::{ReconcileError, Reconciler, lpm::DualLpm};

const TARGET: &str = "strict ranges";

pub struct StrictRangeMap {
    map: DualLpm<u32>,
}

impl StrictRangeMap {
    pub fn open(pin_dir: &Path) -> Result<Self, ReconcileError> {
        Ok(Self {
            map: DualLpm::open(pin_dir, (maps::STRICT_RANGES, maps::STRICT_RANGES6), TARGET)?,
        })
    }
}

impl Reconciler<IpCidr, ()> for StrictRangeMap {
    fn name(&self) -> &'static str {
        TARGET
    }
    fn update(&mut self, k: &IpCidr, _: &()) -> Result<(), ReconcileError> {
        self.map.insert(k, &STRICT_RANGE)
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        self.map.remove(k)
    }
    fn prune(&mut self, desired: &BTreeMap<IpCidr, ()>) -> Result<usize, ReconcileError> {
        self.map.retain(|c| desired.contains_key(c))
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, ()>, ReconcileError> {
        Ok(self
            .map
            .entries()?
            .iter()
            .filter_map(|(k, _)| k.cidr())
            .map(|c| (c, ()))
            .collect())
    }
}
