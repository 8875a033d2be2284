//! WireGuard throughput between two nodes (network namespaces joined by a
//! veth underlay), one iperf3 TCP stream, in one invocation, runs
//! interleaved round-robin:
//!
//! - plain: the underlay itself, no encryption (baseline);
//! - wireguard-go on both ends (Debian's; baseline);
//! - ours (`clustermesh-wg`) on both ends.
//!
//! Prints Gbit/s (median [min..max]) and ours as a ratio to each baseline;
//! then request/response latency over the same three paths (one TCP
//! connection, 64-byte request and response, `--rr-iterations` round trips
//! per path and round, p50/p99 pooled over rounds). Figures also go to
//! `$CLUSTERMESH_BENCH_JSON` (testkit::report).
//! Needs root. Usage: wireguard [--runs N] [--seconds S] [--rr-iterations N]
#![allow(clippy::unwrap_used)]

use clustermesh_testkit::{
    iperf::{iperf, median},
    netns::sweep_stale,
    report::{Better, Figure, Percentiles, record, serde_json, tcp_rr},
    wireguard::{Impl, WgPair},
};

fn main() {
    if !clustermesh_testkit::bench_may_run("WireGuard", "network namespaces, TUN") {
        return;
    }
    let runs = clustermesh_testkit::bench_arg("--runs", 5).max(1) as usize;
    let seconds = clustermesh_testkit::bench_arg("--seconds", 3).max(1);
    let rr_iterations = (clustermesh_testkit::bench_arg("--rr-iterations", 5000) as usize).max(10);
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
    let mut rr: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut rr_port = 7300u16;
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
        for (i, (name, p, tunnel)) in configs.iter().enumerate() {
            let ip = if *tunnel {
                &p.b.tunnel_ip
            } else {
                &p.b.underlay_ip
            };
            rr_port += 1;
            let lat = tcp_rr(
                &p.b.ns,
                &p.a.ns,
                ip.parse().unwrap(),
                rr_port,
                64,
                rr_iterations,
            )
            .unwrap();
            let pc = Percentiles::of(lat.clone());
            eprintln!(
                "  round {}: {name}: request/response p50 {:.1} us p99 {:.1} us",
                round + 1,
                pc.p50,
                pc.p99
            );
            rr[i].extend(lat);
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
    let params = serde_json::json!({"runs": runs, "seconds": seconds, "streams": 1});
    record(
        &Figure::new("wireguard", configs[0].0, "Gbit/s", m[0], Better::Higher)
            .params(params.clone()),
    );
    record(
        &Figure::new("wireguard", configs[1].0, "Gbit/s", m[1], Better::Higher)
            .baseline(configs[0].0, m[0].0)
            .params(params.clone()),
    );
    record(
        &Figure::new("wireguard", configs[2].0, "Gbit/s", m[2], Better::Higher)
            .baseline(configs[1].0, m[1].0)
            .baseline(configs[0].0, m[0].0)
            .params(params),
    );

    println!(
        "request/response latency: one TCP connection, 64-byte request and response, {rr_iterations} round trips per path x {runs} interleaved rounds, pooled; p50 / p99 [min..max]"
    );
    let pct: Vec<Percentiles> = rr.into_iter().map(Percentiles::of).collect();
    for (i, ((name, _, _), p)) in configs.iter().zip(&pct).enumerate() {
        println!(
            "  {name:<42} p50 {:>6.1} us  p99 {:>7.1} us  [{:.1}..{:.1}]",
            p.p50, p.p99, p.min, p.max
        );
        let params =
            serde_json::json!({"runs": runs, "iterations_per_round": rr_iterations, "bytes": 64});
        let f = Figure::latency("wireguard-request-response", *name, "us", p).params(params);
        record(&match i {
            0 => f,
            1 => f.baseline(configs[0].0, pct[0].p50),
            _ => f
                .baseline(configs[1].0, pct[1].p50)
                .baseline(configs[0].0, pct[0].p50),
        });
    }
    println!(
        "  ours / wireguard-go: p50 {:.2}  p99 {:.2}",
        pct[2].p50 / pct[1].p50,
        pct[2].p99 / pct[1].p99
    );
}
