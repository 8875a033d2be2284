//! The `clustermesh-cni` binary: environment and stdin in, JSON on stdout,
//! exit status 0 or 1, as a container runtime expects of a CNI plugin.

use std::{io::Write, process::ExitCode};

fn main() -> ExitCode {
    let out = clustermesh_cni::run(|k| std::env::var(k).ok(), &mut std::io::stdin().lock());
    if let Some(s) = &out.stdout {
        let mut stdout = std::io::stdout().lock();
        // Nothing sensible is left to do if the runtime closed stdout.
        let _ = writeln!(stdout, "{s}").and_then(|()| stdout.flush());
    }
    ExitCode::from(out.exit_code)
}
