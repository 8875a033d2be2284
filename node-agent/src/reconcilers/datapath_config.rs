//! [`DatapathConfigMap`] keeps `CM_CONFIG` (the programs' configuration:
//! tunnel mode, interfaces, underlay address, strict flags) in step with the
//! local cluster's encryption policy, the one-entry `policy` map of the
//! desired state. It also records the policy in the node's
//! [`EncryptionStatus`] and writes each change of it to the audit trail.
//!
//! The base configuration (mode and interfaces) is written when the
//! reconciler is opened, strict egress included when the node runs a
//! WireGuard device: fail closed until the policy is read. Without a
//! datapath (control plane only) it keeps the status and the audit trail.

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

pub struct DatapathConfigMap {
    map: Option<Array<MapData, DatapathConfig>>,
    config: DatapathConfig,
    status: Arc<Mutex<EncryptionStatus>>,
    audit: Audit,
}

impl DatapathConfigMap {
    /// Opens the pinned `CM_CONFIG` and writes `base` into it.
    pub fn open(
        pin_dir: &Path,
        base: DatapathConfig,
        status: Arc<Mutex<EncryptionStatus>>,
        audit: Audit,
    ) -> Result<Self, ReconcileError> {
        let data = super::pinned(pin_dir, maps::CONFIG, TARGET)?;
        let mut map: Array<MapData, DatapathConfig> =
            Array::try_from(Map::Array(data)).map_err(|e| ReconcileError::new(TARGET, e))?;
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
}
