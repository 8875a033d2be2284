//! `clustermesh`: the command-line interface (docs/cli.md).
//!
//! Standalone mode: the CLI knows clusters through its configuration
//! directory ([`config`]): `enable` writes a cluster's file and PKI there;
//! `connect`/`disconnect` write or remove the remote-cluster files in the
//! nodes' clusters directories (what the node agents watch) and manage the
//! read-only etcd users; `status`, `service` and `encryption` talk to the
//! apiservers (gRPC) and the agents (`/status`); `observe` streams the
//! flows of every node agent's flow API (gRPC, mutual TLS).
//!
//! Exit codes: 0 success (and, for `status`, healthy); 1 a failure or an
//! unhealthy mesh, with one sentence on standard error saying what failed
//! and what to check; 2 a usage error (clap).

mod clients;
mod config;
mod connect;
mod enable;
mod encryption;
mod observe;
mod policy;
mod service;
mod status;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "clustermesh",
    version,
    about = "clustermesh: multi-cluster connectivity and encryption",
    after_help = "Standalone mode keeps its state in --config-dir (see docs/cli.md)."
)]
struct Cli {
    /// The CLI's configuration directory (cluster files and PKI).
    #[arg(
        long,
        global = true,
        env = "CLUSTERMESH_CONFIG_DIR",
        default_value = config::DEFAULT_DIR
    )]
    config_dir: PathBuf,
    /// Kubernetes mode: the kubeconfig context to use (not implemented yet;
    /// standalone mode is used without it).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format of commands that print state.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The source cluster's nodes watch each destination (one direction).
    Unicast,
    /// Source and each destination watch each other.
    Bidirectional,
    /// Every listed cluster watches every other.
    Mesh,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a cluster's CA and certificates and write its cluster file
    /// (re-running updates the file and keeps the CA).
    Enable(enable::Args),
    /// Connect clusters: validate, create read-only etcd access, write the
    /// remote-cluster files on every node.
    #[command(
        after_help = "Example:\n  clustermesh connect --cluster east --destination west --wait"
    )]
    Connect(connect::Args),
    /// Disconnect clusters: remove the remote-cluster files and revoke the
    /// read-only access.
    #[command(
        after_help = "Example:\n  clustermesh disconnect --cluster east --destination west --wait"
    )]
    Disconnect(connect::Args),
    /// Health of every cluster and node: connections, sync, counts,
    /// encryption. Exits 1 when not healthy.
    Status(status::Args),
    /// Encryption (WireGuard) posture and compliance switches.
    #[command(subcommand)]
    Encryption(encryption::Command),
    /// Global services (standalone mode).
    #[command(subcommand)]
    Service(service::Command),
    /// Network policies (compiled by the agents, enforced in the eBPF datapath).
    #[command(subcommand)]
    Policy(policy::Command),
    /// Flows the node agents observed, from every node of every cluster,
    /// merged by time; --follow streams new ones.
    Observe(observe::Args),
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Decode an etcd key and its value as an agent would; print the record
    /// as JSON, or the reason it would be refused (exit status 1).
    ValidateRecord {
        /// The etcd key, e.g. clustermesh/state/nodes/v1/c1/node-a
        key: String,
        /// File holding the value; '-' or absent reads standard input.
        value: Option<PathBuf>,
    },
}

/// What every command gets.
pub struct Ctx {
    pub dir: config::ConfigDir,
    pub output: Output,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }
}

/// Prints a JSON value (pretty).
pub fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A live progress line on standard error: rewritten in place on a
/// terminal; otherwise printed as a line only when it changes.
#[derive(Default)]
pub struct Progress {
    last: String,
    shown: bool,
}

impl Progress {
    pub fn show(&mut self, line: &str) {
        use std::io::IsTerminal as _;
        if std::io::stderr().is_terminal() {
            eprint!("\r{line}\x1b[K");
            self.shown = true;
        } else if line != self.last {
            eprintln!("{line}");
        }
        self.last = line.to_owned();
    }

    /// Ends the line (on a terminal).
    pub fn done(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}

/// Parses `30s`, `2m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 2m, 1h)"))?;
    let mult = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    if !n.is_finite() || n < 0.0 || n * mult > 1e9 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(n * mult))
}

fn validate_record(key: String, value: Option<PathBuf>) -> ExitCode {
    use std::io::Read as _;
    let mut buf = Vec::new();
    let read = match value.as_deref() {
        None => std::io::stdin().read_to_end(&mut buf).map(|_| ()),
        Some(p) if p.as_os_str() == "-" => std::io::stdin().read_to_end(&mut buf).map(|_| ()),
        Some(p) => std::fs::read(p).map(|b| buf = b),
    };
    if let Err(e) = read {
        eprintln!("error: cannot read the value: {e}");
        return ExitCode::from(1);
    }
    match clustermesh_api::decode_entry(key.as_bytes(), &buf) {
        Ok((_, entry)) => {
            let json = match entry.encode() {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            };
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap_or_default();
            print_json(&v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("refused ({}): {e}", e.reason());
            ExitCode::from(1)
        }
    }
}

/// The outcome of a command: `Ok(true)` success, `Ok(false)` ran but the
/// answer is "not healthy" (exit 1, the command printed why).
type Outcome = anyhow::Result<bool>;

async fn run(cli: Cli) -> Outcome {
    let ctx = Ctx {
        dir: config::ConfigDir::new(cli.config_dir),
        output: cli.output,
    };
    match cli.command {
        Command::Enable(a) => enable::run(&ctx, a).await,
        Command::Connect(a) => connect::connect(&ctx, a).await,
        Command::Disconnect(a) => connect::disconnect(&ctx, a).await,
        Command::Status(a) => status::run(&ctx, a).await,
        Command::Encryption(c) => encryption::run(&ctx, c).await,
        Command::Service(c) => service::run(&ctx, c).await,
        Command::Policy(c) => policy::run(&ctx, c).await,
        Command::Observe(a) => observe::run(&ctx, a).await,
        Command::Completion { .. } | Command::ValidateRecord { .. } => Ok(true),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "clustermesh",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::ValidateRecord { key, value } => return validate_record(key, value),
        // A bad filter value is a usage error (exit status 2), as clap's.
        Command::Observe(ref a) => {
            if let Err(e) = observe::check(a) {
                let mut cmd = Cli::command();
                cmd.build();
                let sub = cmd.find_subcommand_mut("observe");
                sub.map_or_else(
                    || clap::Error::raw(clap::error::ErrorKind::ValueValidation, &e),
                    |c| c.error(clap::error::ErrorKind::ValueValidation, &e),
                )
                .exit();
            }
        }
        _ => {}
    }
    if let Some(ctx) = &cli.context {
        eprintln!(
            "error: Kubernetes mode (--context {ctx}) is not implemented yet; drop --context to use standalone mode with --config-dir (docs/cli.md)"
        );
        return ExitCode::from(1);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(run(cli));
    // Background connection tasks must not hold the process.
    rt.shutdown_timeout(Duration::from_millis(100));
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3y").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
