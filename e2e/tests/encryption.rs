//! Privileged: the whole product with the clusters' encryption policy set
//! to WireGuard (strict): each agent starts its node's WireGuard device
//! (`clustermesh-wg`, a process of its own), publishes its public key, and
//! programs the other node as a peer; `from_endpoint` hands pod traffic to
//! the device and `from_wireguard` delivers what it decrypts.
//!
//! Proves: pods of two clusters ping each other through WireGuard; the
//! underlay carries only WireGuard (tshark: handshake and transport
//! messages) and never a pod's packet, neither plaintext ICMP nor a Geneve
//! or VXLAN tunnel; the receiver knows the sender's identity; the devices
//! report the handshake.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use clustermesh_testkit::capture::Capture;
use e2e::{
    product::{Mesh, WgDevice, until},
    require_root,
};
use tunnel_common::{Direction, Verdict};

#[test]
fn pods_talk_through_wireguard_and_the_underlay_carries_no_plaintext() {
    require_root!();
    let m = Mesh::new(Mesh::strict_wireguard());
    let (a, b) = (&m.a, &m.b);
    let (wga, wgb) = (WgDevice::for_node(a), WgDevice::for_node(b));
    let mut agents = Vec::new();
    for (n, wg) in [(a, &wga), (b, &wgb)] {
        let (child, how) = m.start_encrypted_agent(n, wg);
        assert!(how.iter().any(|l| l.contains("from_wireguard")), "{how:?}");
        agents.push(child);
    }
    until("both agents synced", Duration::from_secs(30), || {
        Mesh::synced(a) && Mesh::synced(b)
    });

    // Capture B's underlay from before the first packet.
    let cap = Capture::start(&b.ns, "ul0", &b.dir.path().join("ul.pcap")).unwrap();

    until("A's pod reaches B's pod", Duration::from_secs(30), || {
        a.pod
            .exec("ping", &["-c", "1", "-W", "1", &b.pod_ip.to_string()])
            .is_ok()
    });
    let out = a
        .pod
        .exec("ping", &["-c", "10", "-i", "0.05", &b.pod_ip.to_string()])
        .unwrap();
    assert!(out.contains("10 received"), "A -> B: {out}");
    let out = b
        .pod
        .exec("ping", &["-c", "10", "-i", "0.05", &a.pod_ip.to_string()])
        .unwrap();
    assert!(out.contains("10 received"), "B -> A: {out}");

    // Bulk TCP (TSO super-packets into the device, GRO super-packets out
    // of it, through both eBPF programs) arrives intact.
    let gbits =
        clustermesh_testkit::iperf::iperf(&b.pod, &a.pod, &b.pod_ip.to_string(), 1).unwrap();
    eprintln!("pod to pod TCP through WireGuard: {gbits:.2} Gbit/s");
    // (A path that drops large packets manages ~0.00 here.)
    assert!(gbits > 0.05, "bulk TCP through WireGuard: {gbits} Gbit/s");

    // The datapath took the encrypted path and the receivers know who sent.
    let mut dpa = a.datapath();
    let mut dpb = b.datapath();
    let enc = dpa.counter(Direction::Egress, Verdict::Encrypted).unwrap();
    assert!(enc.packets >= 20, "A's encrypted: {enc:?}");
    assert_eq!(
        dpa.counter(Direction::Egress, Verdict::Tunnel)
            .unwrap()
            .packets,
        0
    );
    let ida = dpa.endpoint_entries().unwrap()[0].1.identity;
    assert_eq!(dpb.source_identity(a.pod_ip).unwrap(), Some(ida));

    // The devices completed a handshake with each other.
    let dump_b =
        b.ns.exec("wg", &["show", &wgb.iface, "latest-handshakes"])
            .unwrap();
    let ts: u64 = dump_b
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(ts > 0, "B's device: {dump_b}");

    // The wire: WireGuard only.
    let wire = cap.wireguard_only().unwrap();
    assert!(wire.data >= 20, "transport data: {wire:?}");

    for mut c in agents {
        c.kill().unwrap();
        c.wait().unwrap();
    }

    // No key material in any log of the run (agents and devices), in any
    // of the encodings it exists in (base64 as in the key file, hex as on
    // the control socket).
    for (n, wg) in [(a, &wga), (b, &wgb)] {
        let b64 = std::fs::read_to_string(&wg.key_file)
            .unwrap()
            .trim()
            .to_owned();
        let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &b64).unwrap();
        let hex: String = raw.iter().map(|x| format!("{x:02x}")).collect();
        for log in [n.agent_log(), wg.log.clone()] {
            let text = std::fs::read_to_string(&log).unwrap();
            assert!(!text.is_empty(), "{} is empty", log.display());
            assert!(
                !text.contains(&b64) && !text.to_lowercase().contains(&hex),
                "private key material in {}",
                log.display()
            );
        }
    }
}
