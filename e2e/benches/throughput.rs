//! Pod-to-pod TCP throughput between two nodes (network namespaces on this
//! machine), one iperf3 stream, several runs, median, in one invocation:
//!
//! - plain routing without the mesh (baseline): kernel forwarding, a route
//!   per remote pod CIDR via the other node;
//! - kernel classic VXLAN (baseline): a VXLAN device with a fixed remote and
//!   routes through it;
//! - ours, the eBPF datapath in each mode: VXLAN (external-mode device,
//!   identity in the VNI), Geneve (encapsulated by the programs), direct
//!   routing (netlink routes, no encapsulation).
//!
//! Prints Gbit/s and each as a ratio to plain. Needs root.
//! Usage: throughput [--runs N] [--seconds S]
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use clustermesh_testkit::netns::{NetNs, sweep_stale};
use e2e::topo::{Node, underlay};
use node_agent::{clusters::merge::TunnelEntry, reconcile::Reconciler as _};
use tunnel_common::TunnelMode;

static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(5301);

/// One iperf3 run from `client` to `server_ip`; Gbit/s received. Each run
/// uses a fresh port (no clash with a server still exiting) and is retried
/// if iperf3 reports an error instead of a result.
fn iperf(server: &NetNs, client: &NetNs, server_ip: &str, seconds: u64) -> f64 {
    let mut last = String::new();
    for _ in 0..3 {
        let port = PORT
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let mut srv = Command::new("ip")
            .args([
                "netns",
                "exec",
                server.name(),
                "iperf3",
                "-s",
                "-1",
                "-p",
                &port,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = None;
        for _ in 0..100 {
            if let Ok(o) = client.exec(
                "iperf3",
                &[
                    "-c",
                    server_ip,
                    "-p",
                    &port,
                    "-t",
                    &seconds.to_string(),
                    "-J",
                ],
            ) {
                out = Some(o);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = srv.kill();
        let _ = srv.wait();
        let Some(out) = out else { continue };
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return bps / 1e9;
        }
        last = v["error"].to_string();
    }
    panic!("iperf3 gave no result: {last}");
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn sh(ns: &NetNs, args: &[&str]) {
    ns.exec(args[0], &args[1..]).unwrap();
}

fn main() {
    if !clustermesh_testkit::is_root() {
        eprintln!("SKIPPED: the throughput benchmark needs root (network namespaces, eBPF)");
        if std::env::var_os("CLUSTERMESH_REQUIRE_PRIVILEGED").is_some() {
            std::process::exit(1);
        }
        return;
    }
    let runs = clustermesh_testkit::bench_arg("--runs", 5).max(1) as usize;
    let seconds = clustermesh_testkit::bench_arg("--seconds", 3).max(1);
    sweep_stale();
    let a = Node::new(1).unwrap();
    let b = Node::new(2).unwrap();
    let (ula, ulb) = underlay(&a, &b).unwrap();
    let measure = |what: &str| {
        let v: Vec<f64> = (0..runs)
            .map(|_| iperf(&b.pod, &a.pod, &b.pod_ip.to_string(), seconds))
            .collect();
        let m = median(v);
        eprintln!("  {what}: {:.2} Gbit/s", m.0);
        m
    };

    // 1. Plain routing (no mesh).
    for (n, peer, via) in [(&a, &b, ulb), (&b, &a, ula)] {
        sh(&n.ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        sh(
            &n.ns,
            &[
                "ip",
                "route",
                "add",
                &format!("{}/32", n.pod_ip),
                "dev",
                "lxc0",
            ],
        );
        sh(
            &n.ns,
            &[
                "ip",
                "route",
                "add",
                &format!("10.{}.0.0/24", peer.id),
                "via",
                &via.to_string(),
            ],
        );
    }
    let plain = measure("plain routing");

    // 2. Kernel classic VXLAN (VNI 42, fixed remote).
    for (n, peer, remote, local_vx, peer_vx) in [
        (&a, &b, ulb, "198.51.100.1", "198.51.100.2"),
        (&b, &a, ula, "198.51.100.2", "198.51.100.1"),
    ] {
        let r = remote.to_string();
        sh(
            &n.ns,
            &[
                "ip", "link", "add", "vx42", "type", "vxlan", "id", "42", "remote", &r, "dstport",
                "4789", "dev", "ul0",
            ],
        );
        sh(
            &n.ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{local_vx}/24"),
                "dev",
                "vx42",
            ],
        );
        sh(&n.ns, &["ip", "link", "set", "vx42", "up"]);
        sh(
            &n.ns,
            &[
                "ip",
                "route",
                "replace",
                &format!("10.{}.0.0/24", peer.id),
                "via",
                peer_vx,
                "dev",
                "vx42",
            ],
        );
    }
    let kvx = measure("kernel VXLAN");

    // 3. Ours: eBPF VXLAN (programs take the packets before routing).
    let mut dpa = a.datapath(true).unwrap();
    let mut dpb = b.datapath(true).unwrap();
    a.connect(&mut dpa, &b, ulb).unwrap();
    b.connect(&mut dpb, &a, ula).unwrap();
    let ours = measure("eBPF VXLAN (ours)");

    // 4. Ours, Geneve: same maps, another mode.
    a.connect_with(&mut dpa, &b, TunnelMode::Geneve, ula, ulb)
        .unwrap();
    b.connect_with(&mut dpb, &a, TunnelMode::Geneve, ulb, ula)
        .unwrap();
    let geneve = measure("eBPF Geneve (ours)");

    // 5. Ours, direct routing: the agent's netlink routes (replacing the
    // baselines' routes to the same CIDRs).
    let mut tables = Vec::new();
    for (n, dp, peer, own, via) in [(&a, &mut dpa, &b, ula, ulb), (&b, &mut dpb, &a, ulb, ula)] {
        let mut t = n.routes().unwrap();
        let entry = TunnelEntry {
            node_ip: via.into(),
            cluster_id: peer.id,
            node: "peer".parse().unwrap(),
        };
        t.update(&format!("10.{}.0.0/24", peer.id).parse().unwrap(), &entry)
            .unwrap();
        n.connect_with(dp, peer, TunnelMode::Direct, own, via)
            .unwrap();
        tables.push(t);
    }
    let direct = measure("eBPF direct routing (ours)");

    println!(
        "throughput benchmark: pod to pod across two nodes (network namespaces, one iperf3 TCP stream, {runs} runs x {seconds} s, median [min..max])"
    );
    for (name, m) in [
        ("plain routing (baseline)", plain),
        ("kernel classic VXLAN (baseline)", kvx),
        ("eBPF VXLAN (ours)", ours),
        ("eBPF Geneve (ours)", geneve),
        ("eBPF direct routing (ours)", direct),
    ] {
        println!(
            "  {name:<32} {:>6.2} Gbit/s [{:.2}..{:.2}]  ratio to plain {:.2}",
            m.0,
            m.1,
            m.2,
            m.0 / plain.0
        );
    }
    println!("  ours / kernel VXLAN: {:.2}", ours.0 / kvx.0);
}
