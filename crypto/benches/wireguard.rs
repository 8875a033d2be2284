//! WireGuard throughput between two nodes (network namespaces joined by a
//! veth underlay), one iperf3 TCP stream, in one invocation, runs
//! interleaved round-robin:
//!
//! - plain: the underlay itself, no encryption (baseline);
//! - wireguard-go on both ends (Debian's; baseline);
//! - ours (`clustermesh-wg`) on both ends;
//!
//! each with TCP over IPv4 (the tunnel's 10.100.0.N; plain: the underlay's
//! 10.99.0.N) and over IPv6 (the tunnel's fd00:100::N; plain: the
//! underlay's fd99::N), both over an IPv4 underlay; and ours with inner
//! IPv6 over an IPv6 underlay (endpoints `[fd99::N]:port`).
//!
//! Prints Gbit/s (median [min..max]) and ours as a ratio to each baseline,
//! and ours with inner IPv6 over ours with inner IPv4; then
//! request/response latency over the three IPv4 paths (one TCP
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

/// One measured path: its name, the pair, and the address of B that A's
/// iperf3 client connects to.
struct Path<'a> {
    name: &'static str,
    pair: &'a WgPair,
    ip: String,
}

const PLAIN: &str = "plain underlay, no encryption (baseline)";
const GO: &str = "wireguard-go both ends (baseline)";
const OURS: &str = "clustermesh-wg both ends (ours)";
const PLAIN6: &str = "plain underlay IPv6, no encryption (baseline)";
const GO6: &str = "wireguard-go both ends, inner IPv6 (baseline)";
const OURS6: &str = "clustermesh-wg both ends, inner IPv6 (ours)";
const OURS66: &str = "clustermesh-wg, inner IPv6, IPv6 underlay (ours)";

fn main() {
    if !clustermesh_testkit::bench_may_run("WireGuard", "network namespaces, TUN") {
        return;
    }
    let runs = clustermesh_testkit::bench_arg("--runs", 5).max(1) as usize;
    let seconds = clustermesh_testkit::bench_arg("--seconds", 3).max(1);
    let rr_iterations = (clustermesh_testkit::bench_arg("--rr-iterations", 5000) as usize).max(10);
    sweep_stale();
    let ours = Impl::Ours(env!("CARGO_BIN_EXE_clustermesh-wg").into());
    let go = WgPair::new_dual(Impl::WireguardGo, Impl::WireguardGo, false).unwrap();
    let us = WgPair::new_dual(ours.clone(), ours.clone(), false).unwrap();
    let us6 = WgPair::new_dual(ours.clone(), ours, true).unwrap();
    for p in [&go, &us, &us6] {
        p.wait_connected().unwrap();
    }
    let inner6 = |p: &WgPair| p.b.tunnel_ip6.clone().unwrap();
    let paths = [
        (PLAIN, &us, us.b.underlay_ip.clone()),
        (GO, &go, go.b.tunnel_ip.clone()),
        (OURS, &us, us.b.tunnel_ip.clone()),
        (PLAIN6, &us, us.b.underlay_ip6.clone()),
        (GO6, &go, inner6(&go)),
        (OURS6, &us, inner6(&us)),
        (OURS66, &us6, inner6(&us6)),
    ]
    .map(|(name, pair, ip)| Path { name, pair, ip });
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut rr: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut rr_port = 7300u16;
    for round in 0..runs {
        for (i, p) in paths.iter().enumerate() {
            let g = iperf(&p.pair.b.ns, &p.pair.a.ns, &p.ip, seconds).unwrap();
            eprintln!("  round {}: {}: {g:.2} Gbit/s", round + 1, p.name);
            results[i].push(g);
        }
        // Latency over the IPv4 paths.
        for (i, p) in paths[..3].iter().enumerate() {
            rr_port += 1;
            let lat = tcp_rr(
                &p.pair.b.ns,
                &p.pair.a.ns,
                p.ip.parse().unwrap(),
                rr_port,
                64,
                rr_iterations,
            )
            .unwrap();
            let pc = Percentiles::of(lat.clone());
            eprintln!(
                "  round {}: {}: request/response p50 {:.1} us p99 {:.1} us",
                round + 1,
                p.name,
                pc.p50,
                pc.p99
            );
            rr[i].extend(lat);
        }
    }
    let m: Vec<_> = results.iter().map(|r| median(r.clone())).collect();
    throughput(&paths, &m, runs, seconds);
    latency(&paths[..3], rr, runs, rr_iterations);
}

/// Prints and records the throughput figures (`m`: median, min, max of
/// each path, in the order of `paths`).
fn throughput(paths: &[Path<'_>], m: &[(f64, f64, f64)], runs: usize, seconds: u64) {
    println!(
        "WireGuard benchmark: node to node over a veth underlay (one iperf3 TCP stream, {runs} interleaved rounds x {seconds} s, median [min..max])"
    );
    let line = |i: usize| {
        println!(
            "  {:<50} {:>6.2} Gbit/s [{:.2}..{:.2}]",
            paths[i].name, m[i].0, m[i].1, m[i].2
        );
    };
    (0..3).for_each(line);
    println!(
        "  ours / wireguard-go: {:.2}   ours / plain: {:.3}",
        m[2].0 / m[1].0,
        m[2].0 / m[0].0
    );
    println!(
        "inner IPv6 (TCP over IPv6 in the tunnel, to fd00:100::2; plain: to the underlay's fd99::2), same rounds:"
    );
    (3..paths.len()).for_each(line);
    println!(
        "  IPv6: ours / wireguard-go: {:.2}   ours / plain: {:.3}   ours IPv6 / ours IPv4: {:.2}   over an IPv6 underlay / over IPv4: {:.2}",
        m[5].0 / m[4].0,
        m[5].0 / m[3].0,
        m[5].0 / m[2].0,
        m[6].0 / m[5].0
    );
    let params = serde_json::json!({"runs": runs, "seconds": seconds, "streams": 1});
    let fig = |i: usize, baselines: &[usize]| {
        let f = Figure::new("wireguard", paths[i].name, "Gbit/s", m[i], Better::Higher)
            .params(params.clone());
        let f = baselines
            .iter()
            .fold(f, |f, &b| f.baseline(paths[b].name, m[b].0));
        record(&f);
    };
    fig(0, &[]);
    fig(1, &[0]);
    fig(2, &[1, 0]);
    fig(3, &[]);
    fig(4, &[3]);
    fig(5, &[4, 3, 2]);
    fig(6, &[5, 3]);
}

/// Prints and records the request/response latencies of the IPv4 paths.
fn latency(paths: &[Path<'_>], rr: Vec<Vec<f64>>, runs: usize, rr_iterations: usize) {
    println!(
        "request/response latency: one TCP connection, 64-byte request and response, {rr_iterations} round trips per path x {runs} interleaved rounds, pooled; p50 / p99 [min..max]"
    );
    let pct: Vec<Percentiles> = rr.into_iter().map(Percentiles::of).collect();
    for (i, (p, pc)) in paths.iter().zip(&pct).enumerate() {
        println!(
            "  {:<42} p50 {:>6.1} us  p99 {:>7.1} us  [{:.1}..{:.1}]",
            p.name, pc.p50, pc.p99, pc.min, pc.max
        );
        let params =
            serde_json::json!({"runs": runs, "iterations_per_round": rr_iterations, "bytes": 64});
        let f = Figure::latency("wireguard-request-response", p.name, "us", pc).params(params);
        record(&match i {
            0 => f,
            1 => f.baseline(paths[0].name, pct[0].p50),
            _ => f
                .baseline(paths[1].name, pct[1].p50)
                .baseline(paths[0].name, pct[0].p50),
        });
    }
    println!(
        "  ours / wireguard-go: p50 {:.2}  p99 {:.2}",
        pct[2].p50 / pct[1].p50,
        pct[2].p99 / pct[1].p99
    );
}
