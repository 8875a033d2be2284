//! The clustermesh node agent.
//!
//! - [`datapath`]: loads the tunnel-ebpf programs, attaches them to
//!   interfaces (TCX) and reads their metrics.
//! - [`registration`]: standalone mode: registers the node and its
//!   endpoints with the cluster's apiserver and keeps them alive.
//!
//! The remote-cluster watchers, the pure merge into desired state and the
//! reconcilers build on this (see docs/architecture.md).

pub mod datapath;
pub mod registration;
