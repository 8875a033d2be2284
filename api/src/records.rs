//! The records a cluster exports, stored as JSON values under the keys of
//! [`crate::keys`].
//!
//! Field names are camelCase in JSON. Unknown fields are ignored, so that a
//! newer exporter may add an optional field without breaking older readers
//! during a rolling upgrade; anything that changes the meaning of an existing
//! field gets a new schema version instead. Every other rule is checked:
//! each typed field validates itself on decode, and [`Record::validate`]
//! checks what spans fields (duplicates, limits, consistency).

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    keys::{Key, StateKind},
    types::{
        BootId, ClusterId, ClusterName, Identity, IpCidr, K8sName, Labels, NodeName, WgPublicKey,
    },
};

/// A rule that spans fields of one record, broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// JSON path of the offending field, e.g. `podCidrs[1]`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Behaviour common to all stored records.
pub trait Record: Serialize + for<'de> Deserialize<'de> {
    /// Human name of the record type, used in errors.
    const WHAT: &'static str;
    /// The one key this record is stored under.
    fn key(&self) -> Key;
    /// Cross-field rules. Single-field rules are enforced by the field types.
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

fn check_len<T>(field: &str, v: &[T], min: usize, max: usize) -> Result<(), FieldError> {
    if v.len() < min || v.len() > max {
        return Err(FieldError::new(
            field,
            format!("must have {min}..={max} entries, has {}", v.len()),
        ));
    }
    Ok(())
}

fn check_unique<T: Ord + std::fmt::Display>(field: &str, v: &[T]) -> Result<(), FieldError> {
    let mut seen = BTreeSet::new();
    for (i, x) in v.iter().enumerate() {
        if !seen.insert(x) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("duplicate entry {x}"),
            ));
        }
    }
    Ok(())
}

/// Whether the cluster encrypts traffic between nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncryptionMode {
    #[default]
    None,
    Wireguard,
}

/// Which traffic encryption covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncryptionScope {
    /// All pod traffic between nodes, in the cluster and across clusters.
    #[default]
    All,
    /// Only pod traffic to nodes of other clusters.
    InterCluster,
}

/// A cluster's encryption (compliance) policy; every node converges on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionPolicy {
    pub mode: EncryptionMode,
    #[serde(default)]
    pub scope: EncryptionScope,
    /// Fail closed: pod traffic to a remote node never leaves unencrypted.
    #[serde(default)]
    pub strict: bool,
    /// Drop unencrypted pod traffic arriving from remote nodes.
    #[serde(default)]
    pub strict_ingress: bool,
    /// Encrypt node-to-node (host) traffic too.
    #[serde(default)]
    pub node_to_node: bool,
}

/// What an exporter supports, so readers can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Sync canaries are written after the initial export of each kind.
    pub sync_canaries: bool,
    /// Highest cluster id in the mesh (255 in this release).
    pub max_connected_clusters: u16,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            sync_canaries: true,
            max_connected_clusters: 255,
        }
    }
}

/// `clustermesh/cluster-config/<cluster>`: written first, read first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    pub id: ClusterId,
    pub name: ClusterName,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default)]
    pub encryption: EncryptionPolicy,
}

impl Record for ClusterConfig {
    const WHAT: &'static str = "cluster config";
    fn key(&self) -> Key {
        Key::ClusterConfig {
            cluster: self.name.clone(),
        }
    }
    fn validate(&self) -> Result<(), FieldError> {
        let e = &self.encryption;
        if e.mode == EncryptionMode::None {
            if e.strict {
                return Err(FieldError::new(
                    "encryption.strict",
                    "strict mode needs encryption mode wireguard",
                ));
            }
            if e.strict_ingress {
                return Err(FieldError::new(
                    "encryption.strictIngress",
                    "strict ingress needs encryption mode wireguard",
                ));
            }
        }
        if self.capabilities.max_connected_clusters == 0 {
            return Err(FieldError::new(
                "capabilities.maxConnectedClusters",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// `clustermesh/state/nodes/v1/<cluster>/<node>`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: NodeName,
    pub cluster: ClusterName,
    /// Addresses other nodes reach this node at (tunnel endpoint, WireGuard
    /// endpoint). The first one is the preferred.
    pub underlay_ips: Vec<IpAddr>,
    /// Pod address ranges allocated to this node.
    pub pod_cidrs: Vec<IpCidr>,
    /// WireGuard public keys: one normally, two while a rotation overlaps
    /// (the first is the newest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wireguard_public_keys: Vec<WgPublicKey>,
    /// WireGuard UDP port (default 51871).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_port: Option<u16>,
    pub boot_id: BootId,
}

impl NodeRecord {
    pub const MAX_UNDERLAY_IPS: usize = 4;
    pub const MAX_POD_CIDRS: usize = 8;
    pub const MAX_WG_KEYS: usize = 2;
}

impl Record for NodeRecord {
    const WHAT: &'static str = "node";
    fn key(&self) -> Key {
        Key::Node {
            cluster: self.cluster.clone(),
            node: self.name.clone(),
        }
    }
    fn validate(&self) -> Result<(), FieldError> {
        check_len("underlayIps", &self.underlay_ips, 1, Self::MAX_UNDERLAY_IPS)?;
        check_unique("underlayIps", &self.underlay_ips)?;
        for (i, ip) in self.underlay_ips.iter().enumerate() {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(FieldError::new(
                    format!("underlayIps[{i}]"),
                    format!("{ip} is not a unicast address"),
                ));
            }
        }
        check_len("podCidrs", &self.pod_cidrs, 0, Self::MAX_POD_CIDRS)?;
        for (i, a) in self.pod_cidrs.iter().enumerate() {
            for b in &self.pod_cidrs[..i] {
                if a.overlaps(b) {
                    return Err(FieldError::new(
                        format!("podCidrs[{i}]"),
                        format!("{a} overlaps {b}"),
                    ));
                }
            }
        }
        check_len(
            "wireguardPublicKeys",
            &self.wireguard_public_keys,
            0,
            Self::MAX_WG_KEYS,
        )?;
        check_unique("wireguardPublicKeys", &self.wireguard_public_keys)?;
        if self.wireguard_port == Some(0) {
            return Err(FieldError::new("wireguardPort", "must not be 0"));
        }
        Ok(())
    }
}

/// `clustermesh/state/ip/v1/<cluster>/<ip>`: one ip-cache entry, an endpoint's
/// address and the identity its traffic carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    pub ip: IpAddr,
    pub cluster: ClusterName,
    pub identity: Identity,
    /// Underlay address of the node hosting the endpoint (tunnel endpoint).
    pub host_ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<K8sName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<K8sName>,
}

impl Record for EndpointRecord {
    const WHAT: &'static str = "endpoint";
    fn key(&self) -> Key {
        Key::Ip {
            cluster: self.cluster.clone(),
            ip: self.ip,
        }
    }
    fn validate(&self) -> Result<(), FieldError> {
        if self.ip.is_unspecified() || self.ip.is_multicast() || self.ip.is_loopback() {
            return Err(FieldError::new(
                "ip",
                format!("{} is not an endpoint address", self.ip),
            ));
        }
        if self.host_ip.is_unspecified() || self.host_ip.is_multicast() {
            return Err(FieldError::new(
                "hostIp",
                format!("{} is not a unicast address", self.host_ip),
            ));
        }
        if self.name.is_some() && self.namespace.is_none() {
            return Err(FieldError::new("namespace", "required when name is set"));
        }
        Ok(())
    }
}

/// `clustermesh/state/identities/v1/<cluster>/<id>`: a security identity and
/// the labels it stands for. Only cluster-scoped identities are exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRecord {
    pub id: Identity,
    pub cluster: ClusterName,
    pub labels: Labels,
}

impl Record for IdentityRecord {
    const WHAT: &'static str = "identity";
    fn key(&self) -> Key {
        Key::Identity {
            cluster: self.cluster.clone(),
            id: self.id,
        }
    }
    fn validate(&self) -> Result<(), FieldError> {
        if self.id.is_reserved() {
            return Err(FieldError::new(
                "id",
                format!(
                    "{} is a reserved identity; clusters export only their own",
                    self.id
                ),
            ));
        }
        if self.labels.is_empty() {
            return Err(FieldError::new(
                "labels",
                "an identity needs at least one label",
            ));
        }
        Ok(())
    }
}

/// L4 protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// One port of a service: frontend `port` maps to backend `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<K8sName>,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
}

/// Lifecycle of a backend: only `ready` ones get new flows; `terminating`
/// ones keep the flows they have until they end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendState {
    Ready,
    Terminating,
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub ip: IpAddr,
    /// The cluster the backend runs in: always the exporting cluster.
    pub cluster: ClusterName,
    pub state: BackendState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
}

/// Which backends a global service prefers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Spread over all clusters' ready backends.
    #[default]
    None,
    /// Prefer this cluster's backends; fail over to remote ones.
    Local,
    /// Prefer remote clusters' backends.
    Remote,
}

/// `clustermesh/state/services/v1/<cluster>/<namespace>/<name>`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRecord {
    pub cluster: ClusterName,
    pub namespace: K8sName,
    pub name: K8sName,
    /// Service (cluster) IPs.
    pub frontends: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub backends: Vec<Backend>,
    /// `service.cilium.io/global`: merged with same-named services of other
    /// clusters.
    pub global: bool,
    /// `service.cilium.io/shared`: this cluster's backends are offered to
    /// other clusters (only meaningful when global).
    pub shared: bool,
    /// `service.cilium.io/affinity`
    #[serde(default)]
    pub affinity: Affinity,
}

impl ServiceRecord {
    pub const MAX_FRONTENDS: usize = 4;
    pub const MAX_PORTS: usize = 64;
    pub const MAX_BACKENDS: usize = 4096;
}

impl Record for ServiceRecord {
    const WHAT: &'static str = "service";
    fn key(&self) -> Key {
        Key::Service {
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
    fn validate(&self) -> Result<(), FieldError> {
        check_len("frontends", &self.frontends, 0, Self::MAX_FRONTENDS)?;
        check_unique("frontends", &self.frontends)?;
        check_len("ports", &self.ports, 1, Self::MAX_PORTS)?;
        check_len("backends", &self.backends, 0, Self::MAX_BACKENDS)?;
        let mut seen = BTreeSet::new();
        let mut names = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                return Err(FieldError::new(format!("ports[{i}].port"), "must not be 0"));
            }
            if p.target_port == 0 {
                return Err(FieldError::new(
                    format!("ports[{i}].targetPort"),
                    "must not be 0",
                ));
            }
            if !seen.insert((p.protocol, p.port)) {
                return Err(FieldError::new(
                    format!("ports[{i}]"),
                    format!("duplicate {}/{}", p.port, p.protocol),
                ));
            }
            if let Some(n) = &p.name
                && !names.insert(n.clone())
            {
                return Err(FieldError::new(
                    format!("ports[{i}].name"),
                    format!("duplicate port name {n}"),
                ));
            }
        }
        if self.ports.len() > 1 && self.ports.iter().any(|p| p.name.is_none()) {
            return Err(FieldError::new(
                "ports",
                "every port needs a name when a service has more than one",
            ));
        }
        let mut ips = BTreeSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            if b.cluster != self.cluster {
                return Err(FieldError::new(
                    format!("backends[{i}].cluster"),
                    format!(
                        "backend of cluster {} in a service exported by {}: a cluster exports only its own backends",
                        b.cluster, self.cluster
                    ),
                ));
            }
            if !ips.insert(b.ip) {
                return Err(FieldError::new(
                    format!("backends[{i}].ip"),
                    format!("duplicate backend {}", b.ip),
                ));
            }
        }
        Ok(())
    }
}

/// `clustermesh/synced/<cluster>/<kind>`: written once the initial export of
/// a kind is complete. A reader that has seen the canary and listed the prefix
/// has seen everything the exporter had at that time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncCanary {
    pub cluster: ClusterName,
    pub kind: StateKind,
    /// Unix time in milliseconds when the kind was synced.
    pub synced_at_ms: u64,
}

impl Record for SyncCanary {
    const WHAT: &'static str = "sync canary";
    fn key(&self) -> Key {
        Key::Synced {
            cluster: self.cluster.clone(),
            kind: self.kind,
        }
    }
}

/// `clustermesh/heartbeat/<cluster>`: refreshed periodically by the
/// exporter; its age tells readers whether the exporter is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub cluster: ClusterName,
    /// Unix time in milliseconds of the last beat.
    pub timestamp_ms: u64,
    /// Release of the exporter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl Record for Heartbeat {
    const WHAT: &'static str = "heartbeat";
    fn key(&self) -> Key {
        Key::Heartbeat {
            cluster: self.cluster.clone(),
        }
    }
    fn validate(&self) -> Result<(), FieldError> {
        if let Some(v) = &self.version
            && v.len() > 64
        {
            return Err(FieldError::new("version", "longer than 64 characters"));
        }
        Ok(())
    }
}

/// The state kind a record type lives under, for the state records.
pub trait StateRecord: Record {
    const KIND: StateKind;
}
impl StateRecord for NodeRecord {
    const KIND: StateKind = StateKind::Nodes;
}
impl StateRecord for EndpointRecord {
    const KIND: StateKind = StateKind::Ip;
}
impl StateRecord for IdentityRecord {
    const KIND: StateKind = StateKind::Identities;
}
impl StateRecord for ServiceRecord {
    const KIND: StateKind = StateKind::Services;
}

/// A network policy a cluster enforces (issue 18): the manifest of one
/// policy as applied (JSON, the List item for a List), and the policy it
/// parses to. Decoding parses the manifest again with
/// [`crate::policy::parse_manifests`]: a stored policy is exactly as
/// strict as an applied one, and the model is never stored separately
/// (so it cannot disagree with the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawPolicyRecord", into = "RawPolicyRecord")]
pub struct PolicyRecord {
    pub cluster: ClusterName,
    /// None: cluster-wide (CiliumClusterwideNetworkPolicy).
    pub namespace: Option<K8sName>,
    pub name: crate::policy::PolicyName,
    pub manifest: serde_json::Value,
    /// What `manifest` parses to.
    pub policy: crate::policy::Policy,
}

impl Eq for PolicyRecord {}

impl PolicyRecord {
    /// Largest manifest of one policy (its JSON text).
    pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

    /// The record of a parsed policy and its manifest.
    pub fn new(
        cluster: ClusterName,
        policy: crate::policy::Policy,
        manifest: serde_json::Value,
    ) -> Self {
        Self {
            cluster,
            namespace: policy.namespace.clone(),
            name: policy.name.clone(),
            manifest,
            policy,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPolicyRecord {
    cluster: ClusterName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<K8sName>,
    name: crate::policy::PolicyName,
    manifest: serde_json::Value,
}

impl TryFrom<RawPolicyRecord> for PolicyRecord {
    type Error = String;
    fn try_from(r: RawPolicyRecord) -> Result<Self, String> {
        let text = r.manifest.to_string();
        if text.len() > Self::MAX_MANIFEST_BYTES {
            return Err(format!(
                "manifest: {} bytes exceeds the {}-byte limit",
                text.len(),
                Self::MAX_MANIFEST_BYTES
            ));
        }
        let mut ps = crate::policy::parse_manifests(&text).map_err(|e| format!("manifest: {e}"))?;
        let policy = match (ps.pop(), ps.is_empty()) {
            (Some(p), true) => p,
            _ => return Err("manifest: must hold exactly one policy".to_owned()),
        };
        Ok(Self {
            cluster: r.cluster,
            namespace: r.namespace,
            name: r.name,
            manifest: r.manifest,
            policy,
        })
    }
}

impl From<PolicyRecord> for RawPolicyRecord {
    fn from(r: PolicyRecord) -> Self {
        Self {
            cluster: r.cluster,
            namespace: r.namespace,
            name: r.name,
            manifest: r.manifest,
        }
    }
}

impl Record for PolicyRecord {
    const WHAT: &'static str = "policy";
    fn key(&self) -> Key {
        Key::Policy {
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
    fn validate(&self) -> Result<(), FieldError> {
        if self.policy.name != self.name {
            return Err(FieldError::new(
                "manifest.metadata.name",
                format!(
                    "is {}, the record's name is {}",
                    self.policy.name, self.name
                ),
            ));
        }
        if self.policy.namespace != self.namespace {
            return Err(FieldError::new(
                "manifest.metadata.namespace",
                format!(
                    "is {:?}, the record's namespace is {:?}",
                    self.policy.namespace.as_ref().map(K8sName::as_str),
                    self.namespace.as_ref().map(K8sName::as_str)
                ),
            ));
        }
        Ok(())
    }
}

impl StateRecord for PolicyRecord {
    const KIND: StateKind = StateKind::Policies;
}
