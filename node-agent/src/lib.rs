//! The clustermesh node agent, laid out as its pipeline:
//!
//! ```text
//! config ─> node (build, start every stage under one token)
//! clusters: watcher (etcd) ─> store (decode, mark & sweep) ─> merge (pure) ─> desired
//! endpoints: CNI files + registration identities ─> desired local endpoints
//! desired ─> reconcilers (ip-cache, tunnels, routes, services, WireGuard peers,
//!                         endpoints, datapath config) ─> kernel maps, routes, device
//! ```
//!
//! - [`config`]: every flag in one [`config::AgentConfig`], `validate()`.
//! - [`node`]: builds the stages from the configuration and starts them.
//! - [`clusters`]: the control plane: one watcher per connected cluster,
//!   validated per-cluster stores, the pure merge into desired state.
//! - [`desired`]: the desired-state types every stage imports.
//! - [`reconcilers`]: the one trait side effects go through (update /
//!   delete / prune / snapshot / tick), its in-memory fake, and every real
//!   target.
//! - [`endpoints`]: the local pods (CNI endpoint files), attached and made
//!   deliverable.
//! - [`registration`]: standalone mode: registers the node and its
//!   endpoints with the cluster's apiserver and keeps them alive.
//! - [`datapath`]: loads the tunnel-ebpf programs, attaches and pins them,
//!   reads their counters.
//! - [`wireguard`]: the node's WireGuard device (started once, adopted by
//!   every later agent) and key rotation.
//! - [`telemetry`]: status refresh, counter reports, audit of refusals.
//! - [`status`]: the local HTTP endpoint (`/healthz`, `/status`, `/metrics`).
//! - [`flows`]: what the agent does with the flows it observes
//!   ([`flows::export`]: the OCSF JSON-lines file for SIEMs).
//! - [`audit`]: the append-only JSON-lines audit trail of encryption
//!   posture changes.
//!
//! docs/architecture.md walks a record from a remote etcd to a map entry
//! through these modules.

/// The audit trail (shared with the apiserver).
pub use clustermesh_api::audit;
pub mod clusters;
pub mod config;
pub mod datapath;
pub mod desired;
pub mod endpoints;
pub mod flows;
pub mod node;
pub mod reconcilers;
pub mod registration;
pub mod status;
pub mod telemetry;
pub mod wireguard;
