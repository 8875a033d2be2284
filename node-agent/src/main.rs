//! `node-agent`: today it attaches the datapath's endpoint program to the
//! given interfaces and reports its counters until interrupted; the cluster
//! watchers and reconcilers build on it.
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use node_agent::datapath::EndpointProgram;

#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about = "clustermesh node agent")]
struct Args {
    /// Host-side interfaces of local endpoints to attach `from_endpoint` to.
    #[arg(long = "endpoint-iface", required = true)]
    endpoint_ifaces: Vec<String>,
    /// Seconds between counter reports.
    #[arg(long, default_value_t = 5)]
    report_every: u64,
    /// Exit after this many reports (0 = run until killed).
    #[arg(long, default_value_t = 0)]
    reports: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let progs = args
        .endpoint_ifaces
        .iter()
        .map(|i| EndpointProgram::attach(i).with_context(|| format!("attaching to {i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for p in &progs {
        println!("attached from_endpoint to {}", p.iface());
    }
    let mut n = 0;
    loop {
        std::thread::sleep(Duration::from_secs(args.report_every.max(1)));
        for p in &progs {
            for (dir, verdict, c) in p.counters()? {
                println!(
                    "{} {:?} {}: {} packets, {} bytes",
                    p.iface(),
                    dir,
                    verdict.name(),
                    c.packets,
                    c.bytes
                );
            }
        }
        n += 1;
        if args.reports != 0 && n >= args.reports {
            return Ok(());
        }
    }
}
