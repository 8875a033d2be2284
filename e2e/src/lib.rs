//! End-to-end harness: builds topologies of network namespaces on one
//! machine and checks the product across them. Privileged tests live in
//! `tests/` and need root (CI runs as root).

pub use clustermesh_testkit as testkit;

pub mod product;
pub mod topo;

/// Skips a privileged test when not root, loudly (CI runs as root, so a skip
/// there would show in the log).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::testkit::is_root() {
            eprintln!("SKIPPED: this test needs root (network namespaces, eBPF)");
            if std::env::var_os("CLUSTERMESH_REQUIRE_PRIVILEGED").is_some() {
                panic!("CLUSTERMESH_REQUIRE_PRIVILEGED is set but the test is not root");
            }
            return;
        }
    };
}
