//! Parts of the test harness that create real things and always remove
//! them: network namespaces (also on panic, by `Drop`), and a real etcd
//! server on free loopback ports with a temporary data dir.
//!
//! Names are unique per process and test (`cmt<pid>x<n>-<tag>`), so tests
//! can run in parallel and after a crash; [`netns::sweep_stale`] removes what
//! a killed run left behind.

pub mod capture;
pub mod etcd;
pub mod iperf;
pub mod netns;
pub mod ping;
pub mod report;
pub mod wireguard;

/// Runs a command, returning its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> std::io::Result<String> {
    let out = std::process::Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process may create namespaces and load eBPF (root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For a benchmark's `main`: false (after saying so) when not root, so the
/// benchmark returns; with `CLUSTERMESH_REQUIRE_PRIVILEGED` set the
/// process exits with status 1 instead (a skip must not pass in CI).
pub fn bench_may_run(name: &str, needs: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!("SKIPPED: the {name} benchmark needs root ({needs})");
    if std::env::var_os("CLUSTERMESH_REQUIRE_PRIVILEGED").is_some() {
        std::process::exit(1);
    }
    false
}

/// A numeric command-line option of a benchmark (`--name N`), or `default`.
pub fn bench_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Skips a privileged test when not root, loudly; with
/// `CLUSTERMESH_REQUIRE_PRIVILEGED` set (CI runs as root with it) it fails
/// instead, so a skip can never pass for a success.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("SKIPPED: this test needs root (network namespaces, eBPF, TUN)");
            if std::env::var_os("CLUSTERMESH_REQUIRE_PRIVILEGED").is_some() {
                panic!("CLUSTERMESH_REQUIRE_PRIVILEGED is set but the test is not root");
            }
            return;
        }
    };
}
