//! The node agent's status document: what `GET /status` serves and what
//! `clustermesh status` and `clustermesh encryption status` read. One set of
//! types on both sides (serialised by the agent, deserialised by the CLI),
//! so a renamed field is a compile error, not a silently empty column.
//!
//! Every struct defaults missing fields, so a newer CLI reads an older
//! agent's document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::EncryptionPolicy;

/// `GET /status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub control_plane: ControlPlaneStatus,
    pub encryption: EncryptionStatus,
    pub policy: PolicyStatus,
}

/// Network policy verdicts of this node's endpoints, read from the
/// datapath (`CM_POLICY_STATS`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PolicyStatus {
    pub verdicts: Vec<PolicyVerdictCount>,
}

/// Packets of one local endpoint with one policy verdict in one direction.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PolicyVerdictCount {
    /// The endpoint's addresses (comma-separated), or its host-side
    /// ifindex when it is not in the endpoint map any more.
    pub endpoint: String,
    pub identity: u32,
    /// `ingress` or `egress`.
    pub direction: String,
    /// `drop_policy_denied`, `drop_policy_unknown_peer` or `policy_audit`.
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What the control plane (watchers, stores, merge, reconcilers) reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ControlPlaneStatus {
    pub cluster: String,
    pub node: Option<String>,
    pub clusters: Vec<ClusterStatus>,
    pub all_synced: bool,
    pub pruned: bool,
    pub desired: DesiredCounts,
    /// Entries a target refused in the last round (retried every round;
    /// everything else is applied).
    pub reconcile_errors: Vec<ReconcileFailure>,
    /// The bounded maps' occupancy (the ip-cache, per family).
    pub maps: Vec<MapOccupancy>,
    /// The watchers' events waiting for the merge.
    pub event_queue: EventQueue,
}

/// The queue between the watchers and the merge (bounded: a full queue
/// holds the watchers back, never drops an event).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct EventQueue {
    /// Events waiting now.
    pub depth: u64,
    /// The most seen waiting at once since the agent started (the initial
    /// sync of a large mesh fills the queue: that is backpressure).
    pub peak: u64,
    /// The most seen waiting at once in the last 10 to 20 s.
    pub recent_peak: u64,
    pub capacity: u64,
}

/// A datapath map's entries against its size.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MapOccupancy {
    /// The map's name, e.g. `CM_IPCACHE`.
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
    /// Desired entries refused for want of room (added as room frees).
    pub refused: u64,
    /// At or above 90 % of its size, or refusing entries.
    pub alarm: bool,
}

/// One desired entry a target (eBPF map, routes, WireGuard device) refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ReconcileFailure {
    pub target: String,
    pub key: String,
    pub error: String,
}

impl ControlPlaneStatus {
    /// The remote cluster `name`, if this agent knows it.
    pub fn remote(&self, name: &str) -> Option<&ClusterStatus> {
        self.clusters.iter().find(|c| c.name == name && !c.local)
    }

    /// The local cluster's entry.
    pub fn local(&self) -> Option<&ClusterStatus> {
        self.clusters.iter().find(|c| c.local)
    }
}

/// One cluster as this agent sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClusterStatus {
    pub name: String,
    pub id: Option<u8>,
    pub local: bool,
    pub connected: bool,
    pub synced: bool,
    pub withdrawn: bool,
    pub last_error: Option<String>,
    pub counts: RecordCounts,
    pub last_event_age_ms: Option<u64>,
    pub events: u64,
    pub reconnects: u64,
    /// Records refused since start, by reason (decoding and ownership).
    pub refused_total: BTreeMap<String, u64>,
    /// Records refused by the merge right now, by reason.
    pub rejected_now: BTreeMap<String, u64>,
}

/// Counts of a cluster's records.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RecordCounts {
    pub nodes: usize,
    pub endpoints: usize,
    pub identities: usize,
    pub services: usize,
    /// Network policies (the local cluster's only: remote ones are not read).
    pub policies: usize,
}

/// Entries of the desired datapath state.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DesiredCounts {
    pub ipcache: usize,
    pub tunnels: usize,
    pub peers: usize,
    pub services: usize,
    /// Of the local cluster's services, those marked global (balanced over
    /// the backends of every cluster that shares the same service).
    pub global_services: usize,
    /// The local cluster's network policies the merge compiled.
    pub policies: usize,
    /// Local endpoint identities with a compiled policy, and its entries
    /// (the compiled entries, before they become `CM_POLICY` prefixes).
    pub policy_endpoints: usize,
    pub policy_entries: usize,
}

/// Encryption on this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct EncryptionStatus {
    /// The WireGuard device, if this node runs one.
    pub device: Option<String>,
    /// Fingerprint of this node's current public key.
    pub public_key: Option<String>,
    /// The cluster's policy as last applied.
    pub policy: Option<EncryptionPolicy>,
    pub peers: Vec<PeerStatus>,
    /// Pod packets refused by strict mode (eBPF counters, pinned: since
    /// the datapath was created).
    pub plaintext_drops: PlaintextDrops,
    /// The device's drop counters (since the device started).
    pub device_drops: DeviceDrops,
    pub rotations_completed: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PeerStatus {
    pub key: String,
    pub endpoint: Option<String>,
    /// Seconds since the last handshake (None: never).
    pub last_handshake_age_s: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PlaintextDrops {
    pub egress: u64,
    pub ingress: u64,
    /// Egress into a mesh pod range the ip-cache could not route
    /// (`drop_strict_unknown_dest`), refused instead of handed to the host.
    pub unknown_destination: u64,
}

/// The WireGuard device's drop counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DeviceDrops {
    /// Packets for which no peer's allowed IPs match (in strict mode: pod
    /// traffic whose peer key is not known yet, refused).
    pub tx_no_peer: u64,
    /// Decrypted packets from a source outside the peer's allowed IPs.
    pub rx_not_allowed: u64,
    /// Datagrams matching no peer (e.g. handshakes to an unknown key).
    pub rx_unknown: u64,
    /// Handshake and decryption failures.
    pub rx_errors: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_document_round_trips_and_old_documents_read() {
        let s = NodeStatus {
            control_plane: ControlPlaneStatus {
                cluster: "c1".into(),
                node: Some("n1".into()),
                clusters: vec![ClusterStatus {
                    name: "c2".into(),
                    connected: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
            encryption: EncryptionStatus {
                device: Some("wg0".into()),
                ..Default::default()
            },
            policy: PolicyStatus::default(),
        };
        let v = serde_json::to_value(&s).unwrap();
        // Flattened: the control plane's fields at the top, as before.
        assert_eq!(v["cluster"], "c1");
        assert_eq!(v["encryption"]["device"], "wg0");
        assert_eq!(serde_json::from_value::<NodeStatus>(v).unwrap(), s);
        let old: NodeStatus =
            serde_json::from_str(r#"{"cluster":"c1","clusters":[{"name":"c2"}]}"#).unwrap();
        assert_eq!(
            old.control_plane.remote("c2").map(|c| c.connected),
            Some(false)
        );
    }
}
