//! Privileged: strict encryption never leaks, across the moments where
//! meshes leak in practice. The whole product (two clusters, real etcd and
//! apiservers, CNI, agents, WireGuard devices) with the policy WireGuard +
//! strict; B's underlay is captured for the whole test while A's pod pings
//! B's pod every 10 ms throughout:
//!
//! (a) the nodes start (agents and devices come up while traffic is sent);
//! (c) A's WireGuard key rotates (SIGUSR1 to its agent) under a separate
//!     10 ms ping: no ping lost; afterwards A runs on the new key only and
//!     B's one peer entry for A carries it;
//! (b) a peer goes and comes back: B's agent is stopped and B deregistered
//!     (A removes the peer, traffic to B's pod is dropped with a counted
//!     reason), then B's agent starts again (A adds the peer back);
//! (d) A's agent is killed with SIGKILL and restarted under a separate 10 ms
//!     ping: the gap is reported and must be zero (the device is a process
//!     of its own and the datapath is pinned).
//!
//! Then the capture must hold WireGuard only: no pod packet in the clear,
//! no unencrypted tunnel.
#![allow(clippy::unwrap_used)]

use std::{process::Command, time::Duration};

use clustermesh_api::proto::{self, cluster_mesh_client::ClusterMeshClient};
use clustermesh_testkit::{capture::Capture, ping::Ping};
use e2e::{
    product::{Mesh, Node, WgDevice, until},
    require_root,
};
use tunnel_common::{Direction, Verdict};

/// One at a time: both tests name their WireGuard devices (and control
/// sockets, in /var/run/wireguard) after the process and the node.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn strict_mode_leaks_nothing_at_start_restart_rotation_and_peer_churn() {
    require_root!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    strict_run(&Mesh::new(Mesh::strict_wireguard()));
}

/// The same over IPv6 only: IPv6 pods, an IPv6 underlay (WireGuard over
/// IPv6), the capture holding no IPv6 pod packet (ICMPv6 echo included)
/// outside WireGuard.
#[test]
fn strict_mode_leaks_nothing_over_ipv6() {
    require_root!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    strict_run(&Mesh::new_v6(Mesh::strict_wireguard()));
}

fn strict_run(m: &Mesh) {
    let (a, b) = (&m.a, &m.b);
    let (wga, wgb) = (WgDevice::for_node(a), WgDevice::for_node(b));
    let cap = Capture::start(&b.ns, "ul0", &b.dir.path().join("ul.pcap")).unwrap();
    // Traffic for the whole test, from before anything runs.
    let background = Ping::start(&a.pod, &b.pod_addr().to_string(), 0, "0.01").unwrap();

    // (a) Start.
    let (mut agent_b, _) = m.start_encrypted_agent(b, &wgb);
    let (mut agent_a, how) = m.start_encrypted_agent(a, &wga);
    assert!(how.iter().all(|l| l.ends_with("(New)")), "{how:?}");
    until("A's pod reaches B's pod", Duration::from_secs(30), || {
        a.pod
            .exec("ping", &["-c", "1", "-W", "1", &b.pod_addr().to_string()])
            .is_ok()
    });

    // (d) Agent restart under a 10 ms ping.
    const PINGS: u32 = 300;
    let ping = Ping::start(&a.pod, &b.pod_addr().to_string(), PINGS, "0.01").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agent_a.kill().unwrap();
    agent_a.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (agent_a2, how) = m.start_encrypted_agent(a, &wga);
    agent_a = agent_a2;
    assert!(how.iter().all(|l| l.ends_with("(Adopted)")), "{how:?}");
    let sum = ping.finish().unwrap();
    let (sent, received) = (sum.sent, sum.received);
    eprintln!(
        "encrypted, strict: agent kill -9 + restart under 10 ms ping: {sent} sent, {received} received, gap {} ms",
        sum.gap_ms(10)
    );
    assert_eq!(
        (sent, received),
        (PINGS, PINGS),
        "lost pings across the agent restart"
    );

    // (c) Key rotation under a 10 ms ping.
    let key_before =
        a.ns.exec("wg", &["show", &wga.iface, "public-key"])
            .unwrap();
    let ping = Ping::start(&a.pod, &b.pod_addr().to_string(), PINGS, "0.01").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let usr1 = Command::new("kill")
        .args(["-USR1", &agent_a.id().to_string()])
        .status()
        .unwrap();
    assert!(usr1.success());
    let sum = ping.finish().unwrap();
    let (sent, received) = (sum.sent, sum.received);
    eprintln!("encrypted, strict: key rotation under 10 ms ping: {sent} sent, {received} received");
    assert_eq!(
        (sent, received),
        (PINGS, PINGS),
        "lost pings across the key rotation"
    );
    let key_after =
        a.ns.exec("wg", &["show", &wga.iface, "public-key"])
            .unwrap();
    assert_ne!(key_before, key_after, "A's key did not change");
    // After the overlap (2 s) and B's drain: one key each side.
    until(
        "the rotation completes on both sides",
        Duration::from_secs(15),
        || {
            let peers = b.ns.exec("wg", &["show", &wgb.iface, "peers"]).unwrap();
            peers.trim() == key_after.trim()
        },
    );
    let out = a
        .pod
        .exec(
            "ping",
            &["-c", "5", "-i", "0.05", &b.pod_addr().to_string()],
        )
        .unwrap();
    assert!(out.contains("5 received"), "after the rotation: {out}");

    // (b) Peer churn: B goes away (agent stopped, node deregistered) ...
    agent_b.kill().unwrap();
    agent_b.wait().unwrap();
    let (_, api_b) = m.cluster_of(b);
    m.rt.block_on(async {
        let mut g = ClusterMeshClient::connect(format!("http://{api_b}"))
            .await
            .unwrap();
        g.deregister_node(proto::DeregisterNodeRequest {
            node: format!("node-{}", b.id),
            boot_id: node_agent::registration::boot_id(),
        })
        .await
        .unwrap();
    });
    let dpa = a.datapath();
    let drops = |dp: &node_agent::datapath::Datapath| {
        dp.counter(Direction::Egress, Verdict::DropNoTunnelEndpoint)
            .unwrap()
            .packets
    };
    let before = drops(&dpa);
    until(
        "A drops traffic to the gone node, counted",
        Duration::from_secs(10),
        || drops(&dpa) >= before + 20,
    );
    let peers = a.ns.exec("wg", &["show", &wga.iface, "peers"]).unwrap();
    assert!(peers.trim().is_empty(), "A still has peer(s): {peers}");
    // ... and comes back.
    let (mut agent_b, _) = m.start_encrypted_agent(b, &wgb);
    until(
        "A's pod reaches B's pod again",
        Duration::from_secs(30),
        || {
            a.pod
                .exec("ping", &["-c", "1", "-W", "1", &b.pod_addr().to_string()])
                .is_ok()
        },
    );
    let enc = dpa.counter(Direction::Egress, Verdict::Encrypted).unwrap();
    assert!(enc.packets > u64::from(PINGS), "{enc:?}");

    // The audit trails hold the posture changes, keys as fingerprints.
    let events = |n: &Node| -> Vec<serde_json::Value> {
        std::fs::read_to_string(n.audit_log())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let has = |ev: &[serde_json::Value], name: &str| ev.iter().any(|e| e["event"] == name);
    let ea = events(a);
    for name in [
        "encryption_policy",
        "peer_added",
        "key_rotation_started",
        "key_rotation_completed",
        "peer_removed",
    ] {
        assert!(has(&ea, name), "A's audit trail lacks {name}: {ea:?}");
    }
    let policy = ea
        .iter()
        .find(|e| e["event"] == "encryption_policy")
        .unwrap();
    assert_eq!(policy["strict"], true, "{policy}");
    assert!(has(&events(b), "peer_key_changed"), "B's audit trail");
    let rotated = ea
        .iter()
        .find(|e| e["event"] == "key_rotation_completed")
        .unwrap();
    assert_eq!(
        rotated["current_key"].as_str().unwrap().len(),
        8,
        "{rotated}"
    );
    // Status: the encryption section (refreshed every 500 ms).
    until(
        "A's status shows the peer back",
        Duration::from_secs(10),
        || {
            a.status()
                .is_some_and(|st| st["encryption"]["peers"].as_array().map(Vec::len) == Some(1))
        },
    );
    let st = a.status().unwrap();
    let enc = &st["encryption"];
    assert_eq!(enc["rotations_completed"], 1, "{enc}");
    assert!(
        enc["peers"][0]["last_handshake_age_s"].as_u64().is_some(),
        "{enc}"
    );

    // Nothing but WireGuard crossed the underlay the whole time.
    let wire = cap.wireguard_only().unwrap();
    eprintln!("underlay during the test: {wire:?}");
    assert!(wire.data > PINGS as usize, "{wire:?}");

    background.stop();
    for c in [&mut agent_a, &mut agent_b] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}
