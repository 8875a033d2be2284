//! End-to-end harness: builds topologies of network namespaces on one
//! machine and checks the product across them. Privileged tests live in
//! `tests/` and need root (CI runs as root).

pub use clustermesh_testkit as testkit;

pub mod mesh;
pub mod podman;
pub mod product;
pub mod prometheus;
pub mod services;
pub mod topo;

/// Skips (or, when CI requires privileged tests, fails) a test that needs
/// root; one definition, in the testkit.
pub use clustermesh_testkit::require_root;
