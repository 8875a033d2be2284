//! etcd access shared by every binary that talks to a cluster's etcd: the
//! apiserver (its own etcd, read-write), the node agent (its own and every
//! remote cluster's, read-only) and the CLI (admin tasks during `connect`).
//!
//! - [`etcd`]: the one connection builder ([`EtcdConfig`] -> client), with
//!   one set of timeouts and keep-alives, TLS and client certificates;
//! - [`cluster_file`]: the remote-cluster file `clustermesh connect` writes
//!   on every node and the agent reads;
//! - [`remote_access`]: the read-only etcd users and roles remote clusters
//!   read through;
//! - [`backoff`]: the one reconnect policy (backon).
//!
//! It depends only on the model crate, so the CLI links neither the
//! apiserver nor the Kubernetes client.

pub mod backoff;
pub mod cluster_file;
pub mod etcd;
pub mod remote_access;

pub use cluster_file::{ClusterFile, ClusterFileError};
pub use etcd::{Error, EtcdConfig};
