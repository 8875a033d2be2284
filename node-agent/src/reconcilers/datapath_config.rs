//! [`DatapathConfigMap`] keeps `CM_CONFIG` (the programs' configuration:
//! tunnel mode, interfaces, underlay address, strict flags) in step with the
//! local cluster's encryption policy, the one-entry `policy` map of the
//! desired state. It also records the policy in the node's
//! [`EncryptionStatus`] and writes each change of it to the audit trail.
//!
//! The base configuration (mode and interfaces) is written when the
//! reconciler is opened, strict egress included when the node runs a
//! WireGuard device, and every strict flag the pinned `CM_CONFIG` already
//! had kept ([`restored`]: a restarted agent never loosens strict egress or
//! strict ingress before it has read the policy): fail closed until the
//! policy is read. Without a datapath (control plane only) it keeps the
//! status and the audit trail.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{Array, Map, MapData};
use clustermesh_api::{EncryptionPolicy, status::EncryptionStatus};
use tunnel_common::{CONFIG_FLAG_STRICT, CONFIG_FLAG_STRICT_INGRESS, DatapathConfig, maps};

use super::{ReconcileError, Reconciler};
use crate::audit::Audit;

const TARGET: &str = "datapath config";

/// The strict flags of a policy.
pub fn strict_flags(p: &EncryptionPolicy) -> u32 {
    (if p.strict { CONFIG_FLAG_STRICT } else { 0 })
        | if p.strict_ingress {
            CONFIG_FLAG_STRICT_INGRESS
        } else {
            0
        }
}

/// Both strict flags.
const STRICT_FLAGS: u32 = CONFIG_FLAG_STRICT | CONFIG_FLAG_STRICT_INGRESS;

/// What an agent writes at start: `base`, with every strict flag of the
/// `pinned` configuration (a previous agent's) kept until the policy is
/// read. Without a tunnel mode the programs pass everything: `base` alone.
pub fn restored(base: DatapathConfig, pinned: Option<DatapathConfig>) -> DatapathConfig {
    if base.mode == 0 {
        return base;
    }
    let kept = pinned.map_or(0, |p| p.flags & STRICT_FLAGS);
    DatapathConfig {
        flags: base.flags | kept,
        ..base
    }
}

pub struct DatapathConfigMap {
    map: Option<Array<MapData, DatapathConfig>>,
    config: DatapathConfig,
    status: Arc<Mutex<EncryptionStatus>>,
    audit: Audit,
}

impl DatapathConfigMap {
    /// Opens the pinned `CM_CONFIG`, reads what it holds and writes
    /// `base` into it, keeping the strict flags it had ([`restored`]).
    pub fn open(
        pin_dir: &Path,
        base: DatapathConfig,
        status: Arc<Mutex<EncryptionStatus>>,
        audit: Audit,
    ) -> Result<Self, ReconcileError> {
        let data = super::pinned(pin_dir, maps::CONFIG, TARGET)?;
        let mut map: Array<MapData, DatapathConfig> =
            Array::try_from(Map::Array(data)).map_err(|e| ReconcileError::new(TARGET, e))?;
        let pinned = map.get(&0, 0).map_err(|e| ReconcileError::new(TARGET, e))?;
        let base = restored(base, Some(pinned));
        if pinned.flags & STRICT_FLAGS != 0 {
            tracing::info!(
                strict = base.flags & CONFIG_FLAG_STRICT != 0,
                strict_ingress = base.flags & CONFIG_FLAG_STRICT_INGRESS != 0,
                "kept the pinned datapath's strict flags until the policy is read"
            );
        }
        map.set(0, &base, 0)
            .map_err(|e| ReconcileError::new(TARGET, e))?;
        Ok(Self {
            map: Some(map),
            config: base,
            status,
            audit,
        })
    }

    /// No datapath: the policy only reaches the status and the audit trail.
    pub fn without_datapath(status: Arc<Mutex<EncryptionStatus>>, audit: Audit) -> Self {
        Self {
            map: None,
            config: DatapathConfig::default(),
            status,
            audit,
        }
    }
}

impl Reconciler<(), EncryptionPolicy> for DatapathConfigMap {
    fn name(&self) -> &'static str {
        TARGET
    }
    fn update(&mut self, _: &(), policy: &EncryptionPolicy) -> Result<(), ReconcileError> {
        let changed = self
            .status
            .lock()
            .map(|mut s| s.policy.replace(*policy) != Some(*policy))
            .unwrap_or(true);
        if changed {
            self.audit.record(
                "encryption_policy",
                serde_json::to_value(policy).unwrap_or_default(),
            );
        }
        let flags = strict_flags(policy);
        let Some(map) = self.map.as_mut() else {
            return Ok(());
        };
        // Without a tunnel mode the programs only deliver locally.
        if self.config.mode == 0 || flags == self.config.flags {
            return Ok(());
        }
        let next = DatapathConfig {
            flags,
            ..self.config
        };
        map.set(0, &next, 0)
            .map_err(|e| ReconcileError::new(TARGET, e))?;
        self.config = next;
        tracing::info!(
            strict = policy.strict,
            strict_ingress = policy.strict_ingress,
            "encryption policy applied to the datapath"
        );
        Ok(())
    }
    /// The last policy read stays applied.
    fn delete(&mut self, _: &()) -> Result<(), ReconcileError> {
        Ok(())
    }
    fn prune(&mut self, _: &BTreeMap<(), EncryptionPolicy>) -> Result<usize, ReconcileError> {
        Ok(0)
    }
    /// Empty: the first reconcile applies (and audits) the policy read.
    fn snapshot(&mut self) -> Result<BTreeMap<(), EncryptionPolicy>, ReconcileError> {
        Ok(BTreeMap::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn without_a_datapath_the_policy_reaches_status_and_audit_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let status = Arc::new(Mutex::new(EncryptionStatus::default()));
        let mut r =
            DatapathConfigMap::without_datapath(status.clone(), Audit::open(&log, ("node", "n1")));
        let p = EncryptionPolicy {
            strict: true,
            ..Default::default()
        };
        r.update(&(), &p).unwrap();
        r.update(&(), &p).unwrap();
        assert_eq!(status.lock().unwrap().policy, Some(p));
        let lines = std::fs::read_to_string(&log).unwrap();
        assert_eq!(lines.matches("encryption_policy").count(), 1, "{lines}");
        assert_eq!(strict_flags(&p), CONFIG_FLAG_STRICT);
    }

    #[test]
    fn a_restart_keeps_the_pinned_strict_flags_until_the_policy_is_read() {
        const S: u32 = CONFIG_FLAG_STRICT;
        const I: u32 = CONFIG_FLAG_STRICT_INGRESS;
        let cfg = |mode, flags| DatapathConfig {
            mode,
            overlay_ifindex: 7,
            flags,
            ..Default::default()
        };
        // (base mode, base flags, pinned flags or no pin, expected flags)
        let rows: [(u32, u32, Option<u32>, u32); 8] = [
            (1, 0, None, 0),
            (1, S, None, S),
            // A fresh map is zeroed: nothing to keep.
            (1, 0, Some(0), 0),
            // The previous agent ran strict ingress: kept, not only egress.
            (1, S, Some(S | I), S | I),
            (1, 0, Some(I), I),
            (1, 0, Some(S), S),
            // Unknown bits of the pinned value are not carried over.
            (1, 0, Some(0x80 | I), I),
            // Mode none: the programs pass everything; nothing to keep.
            (0, 0, Some(S | I), 0),
        ];
        for (i, (mode, base, pinned, want)) in rows.into_iter().enumerate() {
            let got = restored(cfg(mode, base), pinned.map(|f| cfg(1, f)));
            assert_eq!(got.flags, want, "row {i}");
            assert_eq!((got.mode, got.overlay_ifindex), (mode, 7), "row {i}");
        }
    }
}
