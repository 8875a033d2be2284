//! The shared model of clustermesh: the product's stable API.
//!
//! - [`types`]: typed, validated values (`ClusterName`, `ClusterId`,
//!   `Identity`, `IpCidr`, `WgPublicKey`, ...). A value of these types is
//!   valid by construction.
//! - [`records`]: what a cluster exports (cluster config, nodes, endpoints,
//!   identities, services, sync canaries, heartbeat), as JSON values.
//! - [`keys`]: the versioned etcd key schema rooted at `clustermesh/`, built
//!   and parsed by one trait ([`keys::KvKey`]).
//! - [`codec`]: strict, total decoding of `(key, value)` pairs from etcd.
//! - [`proto`]: the apiserver's gRPC API (tonic); [`convert`] turns its
//!   messages into records, validating every field.
//!
//! - [`endpoint_file`]: the CNI plugin's per-pod files the agent reads.
//! - [`policy`]: the network policy model, its manifest parsers
//!   (CiliumNetworkPolicy, NetworkPolicy), evaluation and lint.
//! - [`netns`]: entering network namespaces (the one `setns`).
//! - [`status`]: the node agent's `/status` document, shared with the CLI.
//!
//! docs/kvstore.md documents every key and field; keep it in step.

pub mod audit;
pub mod codec;
pub mod convert;
pub mod endpoint_file;
pub mod keys;
pub mod netns;
pub mod policy;
pub mod records;
pub mod status;
pub mod time;
pub mod types;

/// Generated protobuf messages and tonic client/server of `clustermesh.v1`.
pub mod flow;
pub mod proto {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("clustermesh.v1");
}

pub use codec::{DecodeError, Entry, decode_entry, decode_value, encode};
pub use keys::{Key, KeyError, KvKey, StateKind};
pub use records::{
    Affinity, Backend, BackendState, Capabilities, ClusterConfig, EncryptionMode, EncryptionPolicy,
    EncryptionScope, EndpointRecord, FieldError, Heartbeat, IdentityRecord, NodeRecord,
    PolicyRecord, Protocol, Record, ServicePort, ServiceRecord, StateRecord, SyncCanary,
};
pub use types::{
    BootId, ClusterId, ClusterName, Identity, IpCidr, K8sName, Labels, NodeName, ValueError,
    WgPublicKey,
};
