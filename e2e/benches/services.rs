//! New TCP connections per second from a client pod through a service
//! frontend (balanced by the eBPF datapath at the client's veth, replies
//! translated back on delivery) vs straight to the same backend's address
//! (baseline), in the same run, rounds interleaved:
//!
//! - a local backend (client and backend pods on the same node);
//! - a remote backend (the other cluster's node, Geneve; the service is
//!   global, its only backend exported by the other cluster).
//!
//! Each connection: connect, read the backend's answer to the end, close.
//! Direct and translated connections come from two client pods on the same
//! node (a backend's TIME_WAIT for one would refuse the other's SYN if they
//! shared an address and port).
//! Prints connections/s (median [min..max]) and the ratio frontend/direct.
//! Runs the whole product (real etcds, apiservers, agent binaries). Needs
//! root. Usage: services [--runs N] [--seconds S]
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use clustermesh_testkit::{
    iperf::median,
    netns::NetNs,
    report::{Better, Figure, record},
};
use e2e::{
    product::until,
    services::{BACKEND_PORT, FRONTEND_PORT, ServiceRig, ask_tcp, in_pod, web_service},
};
use tunnel_common::IPPROTO_TCP;

/// Connections per second to `to` from inside `pod` for `secs`.
fn rate(pod: &NetNs, to: SocketAddr, secs: u64) -> f64 {
    in_pod(pod, || {
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            ask_tcp(to, Duration::from_secs(1)).unwrap();
            n += 1;
        }
        n as f64 / t0.elapsed().as_secs_f64()
    })
}

fn main() {
    if !clustermesh_testkit::bench_may_run("services", "network namespaces, eBPF") {
        return;
    }
    let runs = clustermesh_testkit::bench_arg("--runs", 5).max(1) as usize;
    let secs = clustermesh_testkit::bench_arg("--seconds", 2).max(1);
    // Two client pods, so a backend never sees the same address and port
    // from a direct and a translated connection (its TIME_WAIT of one
    // would refuse the other's SYN: the timestamps differ).
    let rig = ServiceRig::start(&["client", "direct"], &[]);
    let (m, client, direct) = (&rig.m, &rig.clients[0], &rig.clients[1]);
    let (a_ip, b_ip) = (m.a.pod_ip, m.b.pod_ip);
    let local_fe = Ipv4Addr::new(10, 96, 0, 10);
    let remote_fe = Ipv4Addr::new(10, 96, 0, 11);
    m.upsert_service(0, web_service(local_fe, &[a_ip], false, true, "none"));
    let far = |fe, backends: &[Ipv4Addr]| {
        let mut s = web_service(fe, backends, true, true, "none");
        s.name = "far".into();
        s
    };
    m.upsert_service(0, far(remote_fe, &[]));
    m.upsert_service(1, far(remote_fe, &[b_ip]));
    let mut dp = m.a.datapath();
    until("both frontends programmed", Duration::from_secs(30), || {
        let mut n = |fe| {
            dp.lb_selectable(fe, FRONTEND_PORT, IPPROTO_TCP)
                .unwrap()
                .map_or(0, |v| v.len())
        };
        n(local_fe) == 1 && n(remote_fe) == 1
    });

    let cases = [
        ("local backend, direct (baseline)", a_ip, BACKEND_PORT),
        ("local backend, via frontend", local_fe, FRONTEND_PORT),
        ("remote backend, direct (baseline)", b_ip, BACKEND_PORT),
        ("remote backend, via frontend", remote_fe, FRONTEND_PORT),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..runs {
        for (i, (_, ip, port)) in cases.iter().enumerate() {
            let from = if *port == FRONTEND_PORT {
                client
            } else {
                direct
            };
            let r = rate(from, SocketAddr::from((*ip, *port)), secs);
            results[i].push(r);
        }
        eprintln!("round {}/{runs} done", round + 1);
    }
    println!("new TCP connections per second ({runs} runs x {secs} s, median [min..max]):");
    let meds: Vec<f64> = results
        .iter()
        .zip(&cases)
        .map(|(r, (name, _, _))| {
            let (med, lo, hi) = median(r.clone());
            println!("  {name:<36} {med:>8.0} /s [{lo:.0}..{hi:.0}]");
            med
        })
        .collect();
    for (i, (r, (name, _, _))) in results.iter().zip(&cases).enumerate() {
        let mut f = Figure::new(
            "services",
            *name,
            "connections/s",
            median(r.clone()),
            Better::Higher,
        )
        .params(serde_json::json!({"runs": runs, "seconds": secs}));
        if i % 2 == 1 {
            f = f.baseline(cases[i - 1].0, meds[i - 1]);
        }
        record(&f);
    }
    println!(
        "  ratio frontend/direct: local {:.2}, remote {:.2}",
        meds[1] / meds[0],
        meds[3] / meds[2]
    );
}
