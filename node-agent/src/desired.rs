//! The desired state of the node: what the pure merge
//! ([`crate::clusters::merge`]) produces and every reconciler
//! ([`crate::reconcilers`]) makes a target equal to. Reconcilers, tests and
//! benches import these types from here, never from the stage that
//! computes them.
//!
//! Each map is keyed as its target is: the ip-cache and tunnels by prefix,
//! peers by `cluster/node`, services by `namespace/name`, the local
//! endpoints by address, the encryption policy by `()` (one entry), the
//! strict ranges by prefix.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use clustermesh_api::{
    Affinity, BackendState, ClusterName, EncryptionPolicy, Identity, IpCidr, NodeName, Protocol,
    WgPublicKey, policy::CompiledPolicy,
};

/// ip-cache entry: an address or prefix and what the datapath needs for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCacheEntry {
    pub identity: Identity,
    pub cluster_id: u8,
    /// Underlay address of the node hosting it (None: this node).
    pub tunnel_endpoint: Option<IpAddr>,
    /// Traffic to it must go through WireGuard.
    pub encrypt: bool,
}

/// Route of a remote pod CIDR to the node that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelEntry {
    pub node_ip: IpAddr,
    pub cluster_id: u8,
    pub node: NodeName,
    /// Traffic to the range must go through WireGuard (so that an address
    /// not yet in the ip-cache is never sent in plaintext either).
    pub encrypt: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: WgPublicKey,
    pub endpoint: SocketAddr,
    pub allowed_ips: Vec<IpCidr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedBackend {
    pub ip: IpAddr,
    pub cluster: ClusterName,
    pub state: BackendState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedService {
    pub frontends: Vec<IpAddr>,
    pub ports: Vec<(Protocol, u16, u16)>,
    pub affinity: Affinity,
    pub backends: Vec<MergedBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub cluster: ClusterName,
    /// The record, e.g. `node n1`, `endpoint 10.1.0.5`.
    pub record: String,
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Desired {
    pub ipcache: BTreeMap<IpCidr, IpCacheEntry>,
    pub tunnels: BTreeMap<IpCidr, TunnelEntry>,
    /// Keyed `cluster/node`.
    pub peers: BTreeMap<String, Peer>,
    /// Keyed `namespace/name`.
    pub services: BTreeMap<String, MergedService>,
    /// The local cluster's encryption policy: one entry (key `()`), read by
    /// the datapath-config reconciler (strict flags) and shown in status.
    pub policy: BTreeMap<(), EncryptionPolicy>,
    /// The mesh's pod ranges strict mode covers (`CM_STRICT_RANGES`): the
    /// agent's `--strict-range` and `--pod-cidr` flags and every remote
    /// cluster file's declared `pod-cidrs`. Not from the merge: known
    /// before any cluster connects, and applied first.
    pub strict_ranges: BTreeMap<IpCidr, ()>,
    /// Network policy (issue 18), by local endpoint identity: the compiled
    /// entries (peer identity, direction, protocol, port range, allow or
    /// deny, rule) and the default-deny flags of each local endpoint
    /// identity on this node that a local-cluster policy touches; written
    /// into `CM_POLICY` (local identity, peer identity, direction,
    /// protocol, port prefix) by `reconcilers::network_policy`.
    pub network_policies: BTreeMap<Identity, CompiledPolicy>,
    /// The CIDR prefixes local policies name (and their excepts), each
    /// with its node-local identity (`CM_POLICY_CIDR`, `CM_POLICY_CIDR6`):
    /// the datapath's identity of an address outside the mesh's endpoints.
    pub policy_cidrs: BTreeMap<IpCidr, u32>,
    pub rejected: Vec<Rejection>,
}

/// A local pod as the datapath delivers to it (`CM_ENDPOINTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The host side of the pod's veth.
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    /// The pod's own MAC.
    pub mac: [u8; 6],
    pub identity: u32,
}

/// The local endpoints, by address.
pub type LocalEndpoints = BTreeMap<IpAddr, LocalEndpoint>;
