//! `cargo xtask`: the project's tasks, called by the Makefile after
//! scripts/setup.sh has installed the toolchain and packages.
//!
//! - `lint`: rustfmt check, the function-length check (no function over
//!   120 lines in node-agent, clustermesh-apiserver and cli; fn_length.rs),
//!   then clippy with warnings denied, whole workspace (the eBPF crate
//!   included, type-checked for the host).
//! - `test`: lint, then every test of the workspace, then a smoke run of
//!   each benchmark with tiny sizes. As root the privileged tests (network
//!   namespaces, eBPF) run and must not skip.
//! - `bench`: every benchmark with real sizes, then docs/benchmarks.md and
//!   docs/benchmarks.json (bench.rs).
use std::{path::PathBuf, process::Command};

mod bench;
mod fn_length;

/// Where benchmarks append their figures (clustermesh_testkit::report::ENV).
const REPORT_ENV: &str = "CLUSTERMESH_BENCH_JSON";

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// cargo fmt --check, the function-length check, cargo clippy -D warnings
    Lint,
    /// lint, then the whole test suite
    Test {
        /// Skip the lint step.
        #[arg(long)]
        no_lint: bool,
    },
    /// Every benchmark with real sizes (release profile, as root), then
    /// docs/benchmarks.md and docs/benchmarks.json.
    Bench {
        /// Tiny sizes (the smoke runs of `test`), to try the report.
        #[arg(long)]
        smoke: bool,
        /// Only these benchmarks (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Where to write benchmarks.md and benchmarks.json.
        #[arg(long, default_value = "docs")]
        out_dir: PathBuf,
    },
}

fn cargo(args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(envs.iter().copied())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--check"], &[])?;
    fn_length::check()?;
    cargo(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Lint => lint(),
        Task::Test { no_lint } => {
            if !no_lint {
                lint()?;
            }
            let mut env = vec![];
            if is_root() {
                // Privileged tests fail instead of skipping.
                env.push(("CLUSTERMESH_REQUIRE_PRIVILEGED", "1"));
            }
            // Every binary first: the end-to-end tests run the product's
            // binaries (clustermesh, node-agent, ...) as child processes.
            cargo(&["build", "--workspace", "--bins"], &[])?;
            cargo(&["test", "--workspace", "--no-fail-fast"], &env)?;
            // Benchmarks are not part of the suite (slow, noisy); a smoke run
            // of each with tiny sizes is, so none of them rots. --workspace
            // keeps feature unification (no rebuild).
            bench::smoke(&env)
        }
        Task::Bench {
            smoke,
            only,
            out_dir,
        } => {
            if !is_root() {
                bail!("cargo xtask bench needs root (network namespaces, eBPF)");
            }
            bench::run(bench::Options {
                smoke,
                only,
                out_dir,
            })
        }
    }
}
