//! The clustermesh node agent.
//!
//! - [`datapath`]: loads the tunnel-ebpf programs, attaches them to
//!   interfaces (TCX) and reads their metrics.
//! - [`registration`]: standalone mode: registers the node and its
//!   endpoints with the cluster's apiserver and keeps them alive.
//! - [`clusters`]: the control plane: one watcher per connected cluster,
//!   validated per-cluster stores, the pure merge into desired state.
//! - [`reconcile`]: the one trait side effects go through (update / delete /
//!   prune) and its in-memory implementation.
//! - [`status`]: the local status endpoint (JSON and Prometheus).
//! - [`audit`]: the append-only JSON-lines audit trail of encryption
//!   posture changes.
//! - [`wireguard`]: the node's WireGuard device (started once, adopted by
//!   every later agent) and its peers reconciler.
//!
//! The eBPF map, netlink route and WireGuard peer reconcilers plug into
//! [`clusters::Reconcilers`] (docs/architecture.md).

pub mod audit;
pub mod clusters;
pub mod datapath;
pub mod reconcile;
pub mod registration;
pub mod status;
pub mod wireguard;
