//! `mesh`: the local multi-cluster mesh on this machine (root).
//!
//! ```text
//! cargo run -p e2e -- up [--clusters 2 --nodes 2 --pods 2 --tunnel vxlan --encryption strict --ip-family ipv4]
//! cargo run -p e2e -- status | check | down      [--state-dir target/mesh]
//! ```
//!
//! `up` writes `<state-dir>/topology.json` (default `target/mesh`); the
//! other commands work from it alone. See docs/demo.md.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use e2e::mesh::{self, Encryption, Options, Topology};

#[derive(Parser)]
#[command(
    name = "mesh",
    about = "The local multi-cluster mesh (network namespaces, root)"
)]
struct Cli {
    /// Where the topology file, logs, certificates and etcd data live.
    #[arg(long, global = true, default_value = "target/mesh")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the mesh (removing a previous one in the same state dir) and
    /// write <state-dir>/topology.json.
    Up {
        #[arg(long, default_value_t = 2)]
        clusters: u8,
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        #[arg(long, default_value_t = 2)]
        pods: u8,
        /// vxlan, geneve or direct.
        #[arg(long, default_value = "vxlan")]
        tunnel: String,
        /// none, wireguard or strict.
        #[arg(long, default_value = "strict")]
        encryption: Encryption,
        /// ipv4, ipv6 (IPv6 pods over an IPv6 underlay) or dual (dual-stack
        /// pods and underlay).
        #[arg(long, default_value = "ipv4")]
        ip_family: mesh::IpFamily,
        /// Prefix of namespaces, pin directories and devices.
        #[arg(long, default_value = "cmd")]
        prefix: String,
        /// The apiservers' --lease-ttl (seconds): how long a stopped
        /// apiserver's exported state outlives it.
        #[arg(long)]
        lease_ttl: Option<u64>,
        /// The agents' --stale-ttl (seconds): how long an unreachable
        /// cluster's last state is kept (default 300).
        #[arg(long)]
        stale_ttl: Option<u64>,
        /// Leave what was built in place when up fails (for debugging).
        #[arg(long)]
        keep_on_failure: bool,
    },
    /// Processes alive, then `clustermesh status` of the mesh.
    Status,
    /// Connectivity matrix, global service, encryption on the wire; a
    /// table; exit status 1 if anything failed.
    Check {
        /// Print the rows as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove everything the topology file lists.
    Down,
    /// (internal) A pod's responder: answers on TCP and UDP 8080.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        answer: String,
        #[arg(long, default_value_t = mesh::POD_PORT)]
        port: u16,
    },
}

fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Serve {
            netns,
            answer,
            port,
        } => {
            mesh::serve(&netns, &answer, port)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Up {
            clusters,
            nodes,
            pods,
            tunnel,
            encryption,
            ip_family,
            prefix,
            lease_ttl,
            stale_ttl,
            keep_on_failure,
        } => {
            if !clustermesh_testkit::is_root() {
                anyhow::bail!("run as root (network namespaces, eBPF)");
            }
            let o = Options {
                clusters,
                nodes,
                pods,
                tunnel,
                encryption,
                ip_family,
                state_dir: cli.state_dir,
                prefix,
                bin_dir: bin_dir(),
                lease_ttl,
                stale_ttl,
            };
            let t0 = std::time::Instant::now();
            let t = mesh::up(&o, keep_on_failure)?;
            println!(
                "mesh up in {:.1} s: {} clusters x {} nodes x {} pods, tunnel {}, encryption {:?}, ip family {:?}",
                t0.elapsed().as_secs_f64(),
                clusters,
                nodes,
                pods,
                t.tunnel,
                encryption,
                ip_family
            );
            println!("topology: {}", Topology::path(&t.state_dir).display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status => {
            let t = Topology::load(&cli.state_dir)?;
            let dead = mesh::dead_processes(&t);
            for p in &dead {
                println!(
                    "not running: {} (pid {}; log {})",
                    p.role,
                    p.pid,
                    p.log.display()
                );
            }
            println!(
                "{} of {} processes running",
                t.processes.len() - dead.len(),
                t.processes.len()
            );
            let st = t.cli(&bin_dir()).arg("status").status()?;
            Ok(if st.success() && dead.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Check { json } => {
            let t = Topology::load(&cli.state_dir)?;
            let rows = mesh::check(&t)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                mesh::print_rows(&rows);
            }
            Ok(if rows.iter().all(|r| r.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Down => {
            if !mesh::Topology::path(&cli.state_dir).exists() {
                println!("no mesh in {}", cli.state_dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            let t = Topology::load(&cli.state_dir)?;
            mesh::down(&t)?;
            println!("mesh removed");
            Ok(ExitCode::SUCCESS)
        }
    }
}
