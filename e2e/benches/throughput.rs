//! Pod-to-pod TCP throughput between two nodes (network namespaces on this
//! machine), one iperf3 stream, several runs, median, in one invocation:
//!
//! - plain routing without the mesh (baseline): kernel forwarding, a route
//!   per remote pod CIDR via the other node;
//! - kernel classic VXLAN (baseline): a VXLAN device with a fixed remote and
//!   routes through it;
//! - ours, the eBPF datapath in each mode: VXLAN (sent through the
//!   external-mode device, decapsulated by `from_underlay`; identity in the
//!   VNI), Geneve (encapsulated by the programs), direct
//!   routing (netlink routes, no encapsulation).
//!
//! Each configuration runs on its own pair of nodes, all set up first, and
//! the runs are interleaved round-robin (plain, kernel VXLAN, ours..., then
//! again), so drift in the machine's load hits every configuration alike.
//! Prints Gbit/s (median [min..max]) and each as a ratio to plain, plus the
//! median of the per-round ratios.
//!
//! Then IPv6: dual-stack pods over an IPv6-only underlay, pod to pod over
//! IPv6, plain IPv6 routing (baseline) and ours in each mode, interleaved
//! the same way, each as a ratio to IPv6 plain routing.
//!
//! Then request/response latency over the same paths: one TCP connection
//! (Nagle off), a 64-byte request answered by a 64-byte response,
//! `--rr-iterations` round trips per path and round (interleaved like the
//! throughput runs), p50 and p99 pooled over the rounds, each as a ratio to
//! plain. Figures also go to `$CLUSTERMESH_BENCH_JSON` (testkit::report).
//! Needs root.
//! Usage: throughput [--runs N] [--seconds S] [--rr-iterations N]
#![allow(clippy::unwrap_used)]

use clustermesh_testkit::{
    iperf::{iperf, median},
    netns::{NetNs, sweep_stale},
    report::{Better, Figure, Percentiles, record, tcp_rr},
};
use e2e::topo::{Node, underlay, underlay6};
use node_agent::{desired::TunnelEntry, reconcilers::Reconciler as _};
use tunnel_common::TunnelMode;

fn sh(ns: &NetNs, args: &[&str]) {
    ns.exec(args[0], &args[1..]).unwrap();
}

fn main() {
    if !clustermesh_testkit::bench_may_run("throughput", "network namespaces, eBPF") {
        return;
    }
    let runs = clustermesh_testkit::bench_arg("--runs", 5).max(1) as usize;
    let seconds = clustermesh_testkit::bench_arg("--seconds", 3).max(1);
    let rr_iterations = (clustermesh_testkit::bench_arg("--rr-iterations", 5000) as usize).max(10);
    sweep_stale();
    let pair = |id: u8| {
        let a = Node::new(id).unwrap();
        let b = Node::new(id + 1).unwrap();
        let (ula, ulb) = underlay(&a, &b).unwrap();
        (a, b, ula, ulb)
    };

    // 1. Plain routing (no mesh): kernel forwarding, a route per pod.
    let plain = pair(1);
    {
        let (a, b, ula, ulb) = &plain;
        for (n, peer, via) in [(a, b, ulb), (b, a, ula)] {
            sh(&n.ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            let pod = format!("{}/32", n.pod_ip);
            sh(&n.ns, &["ip", "route", "add", &pod, "dev", "lxc0"]);
            let cidr = format!("10.{}.0.0/24", peer.id);
            sh(
                &n.ns,
                &["ip", "route", "add", &cidr, "via", &via.to_string()],
            );
        }
    }

    // 2. Kernel classic VXLAN (VNI 42, fixed remote), routes through it.
    let kvx = pair(3);
    {
        let (a, b, ula, ulb) = &kvx;
        for (n, peer, remote, local_vx, peer_vx) in [
            (a, b, ulb, "198.51.100.1", "198.51.100.2"),
            (b, a, ula, "198.51.100.2", "198.51.100.1"),
        ] {
            sh(&n.ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            let pod = format!("{}/32", n.pod_ip);
            sh(&n.ns, &["ip", "route", "add", &pod, "dev", "lxc0"]);
            let r = remote.to_string();
            sh(
                &n.ns,
                &[
                    "ip", "link", "add", "vx42", "type", "vxlan", "id", "42", "remote", &r,
                    "dstport", "4789", "dev", "ul0",
                ],
            );
            let addr = format!("{local_vx}/24");
            sh(&n.ns, &["ip", "addr", "add", &addr, "dev", "vx42"]);
            sh(&n.ns, &["ip", "link", "set", "vx42", "up"]);
            let cidr = format!("10.{}.0.0/24", peer.id);
            sh(
                &n.ns,
                &["ip", "route", "add", &cidr, "via", peer_vx, "dev", "vx42"],
            );
        }
    }

    // 3-5. Ours: the eBPF datapath in each mode (programs take the packets
    // before routing; direct routing uses the agent's netlink routes).
    let ours = |id: u8, mode: TunnelMode| {
        let (a, b, ula, ulb) = pair(id);
        let mut dpa = a.datapath(true).unwrap();
        let mut dpb = b.datapath(true).unwrap();
        a.connect_with(&mut dpa, &b, mode, ula, ulb).unwrap();
        b.connect_with(&mut dpb, &a, mode, ulb, ula).unwrap();
        let mut tables = Vec::new();
        if mode == TunnelMode::Direct {
            for (n, peer, via) in [(&a, &b, ulb), (&b, &a, ula)] {
                let mut t = n.routes().unwrap();
                let entry = TunnelEntry {
                    node_ip: via.into(),
                    cluster_id: peer.id,
                    node: "peer".parse().unwrap(),
                    encrypt: false,
                };
                let cidr = format!("10.{}.0.0/24", peer.id).parse().unwrap();
                t.update(&cidr, &entry).unwrap();
                tables.push(t);
            }
        }
        ((a, b, ula, ulb), (dpa, dpb, tables))
    };
    let (vxlan, _keep_vxlan) = ours(5, TunnelMode::Vxlan);
    let (geneve, _keep_geneve) = ours(7, TunnelMode::Geneve);
    let (direct, _keep_direct) = ours(9, TunnelMode::Direct);

    let configs = [
        ("plain routing (baseline)", &plain),
        ("kernel classic VXLAN (baseline)", &kvx),
        ("eBPF VXLAN (ours)", &vxlan),
        ("eBPF Geneve (ours)", &geneve),
        ("eBPF direct routing (ours)", &direct),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut rr: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut rr_port = 7100u16;
    for round in 0..runs {
        for (i, (name, (a, b, _, _))) in configs.iter().enumerate() {
            let g = iperf(&b.pod, &a.pod, &b.pod_ip.to_string(), seconds).unwrap();
            eprintln!("  round {}: {name}: {g:.2} Gbit/s", round + 1);
            results[i].push(g);
        }
        for (i, (name, (a, b, _, _))) in configs.iter().enumerate() {
            rr_port += 1;
            let lat = tcp_rr(&b.pod, &a.pod, b.pod_ip.into(), rr_port, 64, rr_iterations).unwrap();
            let p = Percentiles::of(lat.clone());
            eprintln!(
                "  round {}: {name}: request/response p50 {:.1} us p99 {:.1} us",
                round + 1,
                p.p50,
                p.p99
            );
            rr[i].extend(lat);
        }
    }

    println!(
        "throughput benchmark: pod to pod across two nodes (network namespaces, one iperf3 TCP stream, {runs} interleaved rounds x {seconds} s, median [min..max])"
    );
    let names: Vec<&str> = configs.iter().map(|c| c.0).collect();
    report(
        "throughput",
        "plain",
        &names,
        &results,
        (runs, seconds),
        true,
    );
    let kvx_m = median(results[1].clone());
    let vx_m = median(results[2].clone());
    println!("  ours VXLAN / kernel VXLAN: {:.2}", vx_m.0 / kvx_m.0);
    ipv6_throughput(runs, seconds);

    println!(
        "request/response latency: one TCP connection, 64-byte request and response, {rr_iterations} round trips per path x {runs} interleaved rounds, pooled; p50 / p99 [min..max]"
    );
    let pct: Vec<Percentiles> = rr.into_iter().map(Percentiles::of).collect();
    for (i, ((name, _), p)) in configs.iter().zip(&pct).enumerate() {
        println!(
            "  {name:<32} p50 {:>6.1} us  p99 {:>7.1} us  [{:.1}..{:.1}]  p50 ratio to plain {:.2}  p99 ratio {:.2}",
            p.p50,
            p.p99,
            p.min,
            p.max,
            p.p50 / pct[0].p50,
            p.p99 / pct[0].p99
        );
        let mut f = Figure::latency("request-response", *name, "us", p).params(
            serde_json::json!({"runs": runs, "iterations_per_round": rr_iterations, "bytes": 64, "p99_ratio_to_plain": p.p99 / pct[0].p99}),
        );
        if i > 0 {
            f = f.baseline(configs[0].0, pct[0].p50);
        }
        if i > 1 {
            f = f.baseline(configs[1].0, pct[1].p50);
        }
        record(&f);
    }
}

/// Two dual-stack nodes on an IPv6-only underlay (pods' MTU 1430).
fn pair6(id: u8) -> (Node, Node, std::net::Ipv6Addr, std::net::Ipv6Addr) {
    let a = Node::new_dual(id).unwrap();
    let b = Node::new_dual(id + 1).unwrap();
    let (ula, ulb) = underlay6(&a, &b).unwrap();
    (a, b, ula, ulb)
}

/// IPv6 pod to pod over an IPv6 underlay: plain IPv6 routing (baseline)
/// and the eBPF datapath in each mode, interleaved rounds, ratios to plain.
fn ipv6_throughput(runs: usize, seconds: u64) {
    let plain = pair6(21);
    {
        let (a, b, ula, ulb) = &plain;
        for (n, peer, via) in [(a, b, ulb), (b, a, ula)] {
            sh(&n.ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            let pod = format!("{}/128", n.pod_ip6);
            sh(&n.ns, &["ip", "-6", "route", "add", &pod, "dev", "lxc0"]);
            let cidr = format!("fd00:{:x}::/64", peer.id);
            let via = via.to_string();
            sh(&n.ns, &["ip", "-6", "route", "add", &cidr, "via", &via]);
        }
    }
    let ours = |id: u8, mode: TunnelMode| {
        let (a, b, ula, ulb) = pair6(id);
        let mut dpa = a.datapath(true).unwrap();
        let mut dpb = b.datapath(true).unwrap();
        a.connect_any(&mut dpa, &b, mode, ula.into(), ulb.into())
            .unwrap();
        b.connect_any(&mut dpb, &a, mode, ulb.into(), ula.into())
            .unwrap();
        let mut tables = Vec::new();
        if mode == TunnelMode::Direct {
            // The agent's route reconciler, with IPv6 gateways.
            for (n, peer, via) in [(&a, &b, ulb), (&b, &a, ula)] {
                let mut t = n.routes().unwrap();
                let entry = TunnelEntry {
                    node_ip: via.into(),
                    cluster_id: peer.id,
                    node: "peer".parse().unwrap(),
                    encrypt: false,
                };
                let cidr = format!("fd00:{:x}::/64", peer.id).parse().unwrap();
                t.update(&cidr, &entry).unwrap();
                tables.push(t);
            }
        }
        ((a, b, ula, ulb), (dpa, dpb, tables))
    };
    let (vxlan, _keep_vxlan) = ours(23, TunnelMode::Vxlan);
    let (geneve, _keep_geneve) = ours(25, TunnelMode::Geneve);
    let (direct, _keep_direct) = ours(27, TunnelMode::Direct);
    let configs = [
        ("IPv6 plain routing (baseline)", &plain),
        ("IPv6 eBPF VXLAN (ours)", &vxlan),
        ("IPv6 eBPF Geneve (ours)", &geneve),
        ("IPv6 eBPF direct routing (ours)", &direct),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..runs {
        for (i, (name, (a, b, _, _))) in configs.iter().enumerate() {
            let g = iperf(&b.pod, &a.pod, &b.pod_ip6.to_string(), seconds).unwrap();
            eprintln!("  round {}: {name}: {g:.2} Gbit/s", round + 1);
            results[i].push(g);
        }
    }
    println!(
        "IPv6 throughput: IPv6 pod to pod across two nodes over an IPv6 underlay (pod MTU 1430, one iperf3 TCP stream, {runs} interleaved rounds x {seconds} s, median [min..max])"
    );
    let names: Vec<&str> = configs.iter().map(|c| c.0).collect();
    report(
        "throughput-ipv6",
        "IPv6 plain",
        &names,
        &results,
        (runs, seconds),
        false,
    );
}

/// Prints and records throughput figures: each configuration's median and
/// its ratio to the first (the baseline), and with `second_baseline` also
/// against the second.
fn report(
    bench: &'static str,
    baseline: &str,
    names: &[&'static str],
    results: &[Vec<f64>],
    (runs, seconds): (usize, u64),
    second_baseline: bool,
) {
    let plain_m = median(results[0].clone());
    for (i, name) in names.iter().enumerate() {
        let m = median(results[i].clone());
        // The ratio within each round, then its median: robust to drift.
        let per_round = median(
            results[i]
                .iter()
                .zip(&results[0])
                .map(|(x, p)| x / p)
                .collect(),
        );
        println!(
            "  {name:<32} {:>6.2} Gbit/s [{:.2}..{:.2}]  ratio to {baseline} {:.2} (per-round median {:.2})",
            m.0,
            m.1,
            m.2,
            m.0 / plain_m.0,
            per_round.0
        );
        let mut f = Figure::new(bench, *name, "Gbit/s", m, Better::Higher).params(
            serde_json::json!({"runs": runs, "seconds": seconds, "per_round_ratio_median": per_round.0}),
        );
        if i > 0 {
            f = f.baseline(names[0], plain_m.0);
        }
        if second_baseline && i > 1 {
            f = f.baseline(names[1], median(results[1].clone()).0);
        }
        record(&f);
    }
}
