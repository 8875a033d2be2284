//! `clustermesh`: the command-line interface.
//!
//! Implemented so far: `validate-record`, which checks an etcd key and value
//! against the stable schema exactly as the agents do, and says what is wrong.
use std::io::Read as _;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "clustermesh",
    version,
    about = "clustermesh: multi-cluster connectivity and encryption"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Decode an etcd key and its value as an agent would; print the record
    /// as JSON, or the reason it would be refused (exit status 1).
    ValidateRecord {
        /// The etcd key, e.g. clustermesh/state/nodes/v1/c1/node-a
        key: String,
        /// File holding the value; '-' or absent reads standard input.
        value: Option<std::path::PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::ValidateRecord { key, value } => {
            let mut buf = Vec::new();
            let read = match value.as_deref() {
                None => std::io::stdin().read_to_end(&mut buf).map(|_| ()),
                Some(p) if p.as_os_str() == "-" => {
                    std::io::stdin().read_to_end(&mut buf).map(|_| ())
                }
                Some(p) => std::fs::read(p).map(|b| buf = b),
            };
            if let Err(e) = read {
                eprintln!("error: cannot read the value: {e}");
                return std::process::ExitCode::from(1);
            }
            match clustermesh_api::decode_entry(key.as_bytes(), &buf) {
                Ok((_, entry)) => {
                    let json = match entry.encode() {
                        Ok(v) => v,
                        Err(e) => {
                            eprintln!("error: {e}");
                            return std::process::ExitCode::from(1);
                        }
                    };
                    let v: serde_json::Value = serde_json::from_slice(&json).unwrap_or_default();
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("refused ({}): {e}", e.reason());
                    std::process::ExitCode::from(1)
                }
            }
        }
    }
}
