//! `clustermesh-cni`: the CNI plugin that attaches pods to a clustermesh node.
//!
//! For each pod (ADD) it hands out an IPv4 and/or an IPv6 address (its own
//! lease store over the node's pod CIDRs, or a delegated IPAM plugin),
//! creates a veth pair with the host side `lxc<hash>` in the node namespace
//! and the pod side in the pod's namespace with the addresses as /32 and
//! /128, per family a default route via the fixed gateway (169.254.1.1,
//! fe80::1) and a permanent neighbour entry for it (the host veth's MAC),
//! and records the attachment in an endpoint file the node agent reads. DEL undoes it; CHECK verifies it. See `docs/cni.md`.
//!
//! Modules: [`env`](mod@env) (the `CNI_*` variables), [`config`] (the network
//! configuration), [`ipam`] (own address leases), [`delegate`] (delegated
//! IPAM), [`link`] (netlink), [`endpoint`] (endpoint files, read by the
//! agent), [`result`] (output shapes), [`error`] (error codes), [`cmd`]
//! (the commands).

pub mod cmd;
pub mod config;
pub mod delegate;
/// The endpoint-file format, shared with the agent through the model crate.
pub use clustermesh_api::endpoint_file as endpoint;
pub mod env;
pub mod error;
pub mod ipam;
pub mod link;
pub mod result;

pub use cmd::{Outcome, run};
pub use endpoint::{EndpointError, EndpointFile, MacAddr, read_endpoint_dir};
pub use error::Error;
