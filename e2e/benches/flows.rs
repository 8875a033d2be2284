//! Flow events (issue 19): what they cost on the path, and what a flood
//! does to them. All baselines are measured in the same invocation.
//!
//! 1. Datapath: pod to pod across two nodes (network namespaces, Geneve,
//!    the eBPF datapath), each case on its own pair of nodes, rounds
//!    interleaved: flow events off (`CM_FLOW_CONFIG` 0: the baseline)
//!    against flow events on as the agent runs them by default (drops,
//!    audits, and each forwarded flow's first packet then one aggregated
//!    event per 5 s), with the agent's own reader (`node_agent::flows::read`
//!    into an `Observer`) draining both nodes' ring buffers in this
//!    process. One iperf3 TCP stream (Gbit/s). Goal: >= 0.95 x.
//! 2. Flood: on the pair with events on, every packet reported
//!    (`--flow-trace-interval-ms 0`) under an iperf3 UDP flood of 64-byte
//!    datagrams for `--seconds`: events read, events the ring buffer had no
//!    room for (`CM_FLOW_LOST`, what the agent reports as
//!    `clustermesh_agent_flow_events_lost_total{place="datapath_ring"}`),
//!    the buffer's fill (at most `--buffer` flows), and this process's
//!    resident memory before and after (the readers and their buffers live
//!    here: growth bounded by the buffer, not by the flood).
//! 3. A stalled reader: the same flood with the readers stopped, so the
//!    ring buffers fill: events lost (counted by the datapath), and what the
//!    readers drain once started again.
//!
//! Figures also go to `$CLUSTERMESH_BENCH_JSON`. Needs root.
//! Usage: flows [--runs N] [--seconds S] [--buffer N]
#![allow(clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use clustermesh_testkit::{
    iperf::{iperf, median},
    netns::{NetNs, sweep_stale},
    report::{Better, Figure, record},
};
use e2e::topo::{Node, geneve_pair};
use node_agent::flows::{self, Directory, Events, Observer};
use tokio_util::sync::CancellationToken;

fn arg(name: &str, default: u64) -> u64 {
    clustermesh_testkit::bench_arg(name, default)
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A UDP flood of 64-byte datagrams from `client` to `server_ip` for
/// `secs` (iperf3, unlimited rate); datagrams sent.
fn udp_flood(server: &NetNs, client: &NetNs, server_ip: &str, secs: u64) -> u64 {
    let port = "5399";
    let mut srv = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            server.name(),
            "iperf3",
            "-s",
            "-1",
            "-p",
            port,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut sent = 0;
    for _ in 0..100 {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", client.name(), "iperf3", "-c", server_ip])
            .args([
                "-p",
                port,
                "-u",
                "-b",
                "0",
                "-l",
                "64",
                "-t",
                &secs.to_string(),
                "-J",
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(p) = v["end"]["sum"]["packets"].as_u64() {
            sent = p;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = srv.kill();
    let _ = srv.wait();
    sent
}

/// The agent's reader on both nodes of a pair, into one observer each.
fn readers(
    rt: &tokio::runtime::Runtime,
    nodes: [&Node; 2],
    buffer: usize,
    interval: Duration,
    cancel: &CancellationToken,
) -> Vec<Arc<Observer>> {
    nodes
        .iter()
        .map(|n| {
            flows::configure(n.pins.path(), Events::All, interval).unwrap();
            let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Directory::default()));
            let o = Observer::new(buffer, Events::All, interval, rx);
            rt.spawn(flows::read(
                n.pins.path().to_owned(),
                o.clone(),
                None,
                cancel.clone(),
            ));
            o
        })
        .collect()
}

fn main() {
    if !clustermesh_testkit::bench_may_run("flows", "network namespaces, eBPF") {
        return;
    }
    let runs = arg("--runs", 5).max(1) as usize;
    let seconds = arg("--seconds", 3).max(1);
    let buffer = arg("--buffer", 4096).max(1) as usize;
    sweep_stale();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let off = geneve_pair(41).unwrap();
    let on = geneve_pair(43).unwrap();
    for n in [&off.0, &off.1] {
        flows::configure(n.pins.path(), Events::Off, Duration::ZERO).unwrap();
    }
    let reading = cancel.child_token();
    let observers = readers(
        &rt,
        [&on.0, &on.1],
        buffer,
        Duration::from_secs(5),
        &reading,
    );
    let cases = [
        ("flow events off (baseline)", &off),
        ("flow events on", &on),
    ];
    let mut gbit: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for round in 0..runs {
        for (i, (name, (a, b, _))) in cases.iter().enumerate() {
            let g = iperf(&b.pod, &a.pod, &b.pod_ip.to_string(), seconds).unwrap();
            eprintln!("  round {}: {name}: {g:.2} Gbit/s", round + 1);
            gbit[i].push(g);
        }
    }
    let events: u64 = observers.iter().map(|o| o.status().seen).sum();
    println!(
        "flow events on the path: pod to pod across two nodes (Geneve), one iperf3 TCP stream, {runs} interleaved rounds x {seconds} s, median [min..max]; {events} events read with events on"
    );
    let base = median(gbit[0].clone());
    for (i, (name, _)) in cases.iter().enumerate() {
        let m = median(gbit[i].clone());
        let ratio = m.0 / base.0;
        println!(
            "  throughput {name:<28} {:>7.2} Gbit/s [{:.2}..{:.2}]  ratio {ratio:.3}",
            m.0, m.1, m.2
        );
        let mut f = Figure::new(
            "flows",
            format!("throughput: {name}"),
            "Gbit/s",
            m,
            Better::Higher,
        )
        .params(serde_json::json!({"runs": runs, "seconds": seconds, "trace_interval_ms": 5000}));
        if i > 0 {
            f = f.baseline(format!("throughput: {}", cases[0].0), base.0);
        }
        record(&f);
    }
    flood(&on, &observers, buffer, seconds);
    // A reader that falls behind: stopped while the flood runs, so the
    // ring buffers fill; what does not fit is counted, never waited for.
    reading.cancel();
    stalled(&rt, &on, &observers, seconds, &cancel);
    cancel.cancel();
}

/// The flood case (module docs, 2): two floods in a row, so the memory
/// the second adds shows whether the first's was a bound or a leak.
fn flood(
    on: &(Node, Node, Vec<node_agent::datapath::Datapath>),
    observers: &[Arc<Observer>],
    buffer: usize,
    seconds: u64,
) {
    for n in [&on.0, &on.1] {
        flows::configure(n.pins.path(), Events::All, Duration::ZERO).unwrap();
    }
    let lost = || {
        [&on.0, &on.1]
            .iter()
            .map(|n| node_agent::datapath::flow_lost(n.pins.path()).unwrap_or(0))
            .sum::<u64>()
    };
    let seen = || observers.iter().map(|o| o.status().seen).sum::<u64>();
    let mut rss = vec![rss_kib()];
    let (mut sent, mut read, mut dropped) = (0, 0, 0);
    for _ in 0..2 {
        let (s0, l0) = (seen(), lost());
        sent += udp_flood(&on.1.pod, &on.0.pod, &on.1.pod_ip.to_string(), seconds);
        // The reader drains what is left in the ring buffers.
        std::thread::sleep(Duration::from_millis(500));
        read += seen() - s0;
        dropped += lost() - l0;
        rss.push(rss_kib());
    }
    let buffered: Vec<u64> = observers.iter().map(|o| o.status().buffered).collect();
    println!(
        "flood: iperf3 UDP 64-byte datagrams, unlimited rate, 2 x {seconds} s, every packet an event (interval 0), both nodes: {sent} datagrams sent, {read} events read, {dropped} lost (ring buffer full, counted), buffers {buffered:?} of {buffer} flows each; resident memory before, after the first flood, after the second: {rss:?} KiB"
    );
    assert!(buffered.iter().all(|b| *b as usize <= buffer));
    let one = |v: f64| (v, v, v);
    record(
        &Figure::new(
            "flows",
            "flood: events lost (ring buffer full)",
            "events",
            one(dropped as f64),
            Better::Lower,
        )
        .params(serde_json::json!({"sent": sent, "read": read, "seconds": 2 * seconds})),
    );
    let first = rss[1].saturating_sub(rss[0]) as f64;
    let second = rss[2].saturating_sub(rss[1]) as f64;
    record(
        &Figure::new(
            "flows",
            "flood: resident memory added by the second flood",
            "KiB",
            one(second),
            Better::Lower,
        )
        .baseline(
            "flood: resident memory added by the first flood",
            first.max(1.0),
        )
        .params(serde_json::json!({"buffer_flows": buffer, "rss_kib": rss})),
    );
}

/// The flood with the readers stopped (module docs, 3): the ring buffers
/// fill and the rest is counted as lost; readers started again drain what
/// the buffers hold.
fn stalled(
    rt: &tokio::runtime::Runtime,
    on: &(Node, Node, Vec<node_agent::datapath::Datapath>),
    observers: &[Arc<Observer>],
    seconds: u64,
    cancel: &CancellationToken,
) {
    let lost = || {
        [&on.0, &on.1]
            .iter()
            .map(|n| node_agent::datapath::flow_lost(n.pins.path()).unwrap_or(0))
            .sum::<u64>()
    };
    let seen = || observers.iter().map(|o| o.status().seen).sum::<u64>();
    std::thread::sleep(Duration::from_millis(200));
    let (s0, l0) = (seen(), lost());
    let sent = udp_flood(&on.1.pod, &on.0.pod, &on.1.pod_ip.to_string(), seconds);
    for (n, o) in [&on.0, &on.1].iter().zip(observers) {
        rt.spawn(flows::read(
            n.pins.path().to_owned(),
            o.clone(),
            None,
            cancel.clone(),
        ));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (drained, dropped) = (seen() - s0, lost() - l0);
    println!(
        "stalled reader: the same flood for {seconds} s with the readers stopped: {sent} datagrams sent (each an event on both nodes), {dropped} events lost (ring buffer full, counted), {drained} drained once the readers started again (what the {} KiB ring buffers held)",
        tunnel_common::FLOW_RING_BYTES / 1024
    );
    assert!(sent == 0 || dropped > 0, "a stalled reader lost nothing?");
    record(
        &Figure::new(
            "flows",
            "stalled reader: events lost (counted)",
            "events",
            (dropped as f64, dropped as f64, dropped as f64),
            Better::Lower,
        )
        .params(serde_json::json!({"sent": sent, "drained": drained, "seconds": seconds})),
    );
}
