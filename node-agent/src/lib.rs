//! The clustermesh node agent.
//!
//! - [`datapath`]: loads the tunnel-ebpf programs, attaches them to
//!   interfaces (TCX) and reads their metrics.
//!
//! The remote-cluster watchers, the pure merge into desired state and the
//! reconcilers build on this (see docs/architecture.md).

pub mod datapath;
