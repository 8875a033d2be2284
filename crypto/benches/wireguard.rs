//! WireGuard throughput between two nodes (network namespaces joined by a
//! veth underlay), one iperf3 TCP stream, in one invocation, runs
//! interleaved round-robin:
//!
//! - plain: the underlay itself, no encryption (baseline);
//! - wireguard-go on both ends (Debian's; baseline);
//! - ours (`clustermesh-wg`) on both ends.
//!
//! Prints Gbit/s (median [min..max]) and ours as a ratio to each baseline.
//! Needs root. Usage: wireguard [--runs N] [--seconds S]
#![allow(clippy::unwrap_used)]

use clustermesh_testkit::{
    iperf::{iperf, median},
    netns::sweep_stale,
    wireguard::{Impl, WgPair},
};

fn main() {
    if !clustermesh_testkit::bench_may_run("WireGuard", "network namespaces, TUN") {
        return;
    }
    let runs = clustermesh_testkit::bench_arg("--runs", 5).max(1) as usize;
    let seconds = clustermesh_testkit::bench_arg("--seconds", 3).max(1);
    sweep_stale();
    let ours = Impl::Ours(env!("CARGO_BIN_EXE_clustermesh-wg").into());
    let go = WgPair::new(Impl::WireguardGo, Impl::WireguardGo).unwrap();
    let us = WgPair::new(ours.clone(), ours).unwrap();
    go.wait_connected().unwrap();
    us.wait_connected().unwrap();

    let configs: [(&str, &WgPair, bool); 3] = [
        ("plain underlay, no encryption (baseline)", &us, false),
        ("wireguard-go both ends (baseline)", &go, true),
        ("clustermesh-wg both ends (ours)", &us, true),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..runs {
        for (i, (name, p, tunnel)) in configs.iter().enumerate() {
            let ip = if *tunnel {
                &p.b.tunnel_ip
            } else {
                &p.b.underlay_ip
            };
            let g = iperf(&p.b.ns, &p.a.ns, ip, seconds).unwrap();
            eprintln!("  round {}: {name}: {g:.2} Gbit/s", round + 1);
            results[i].push(g);
        }
    }
    println!(
        "WireGuard benchmark: node to node over a veth underlay (one iperf3 TCP stream, {runs} interleaved rounds x {seconds} s, median [min..max])"
    );
    let m: Vec<_> = results.iter().map(|r| median(r.clone())).collect();
    for ((name, _, _), m) in configs.iter().zip(&m) {
        println!("  {name:<42} {:>6.2} Gbit/s [{:.2}..{:.2}]", m.0, m.1, m.2);
    }
    println!(
        "  ours / wireguard-go: {:.2}   ours / plain: {:.3}",
        m[2].0 / m[1].0,
        m[2].0 / m[0].0
    );
}
