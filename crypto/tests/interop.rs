//! Privileged: our WireGuard device (`clustermesh-wg`, boringtun over TUN)
//! in one network namespace and a standard WireGuard peer (Debian's
//! `wireguard-go`) in another, both configured with the standard `wg` tool
//! over their control sockets (testkit's `WgPair`). Proves the handshake
//! completes and traffic passes both ways, that the wire carries WireGuard
//! (tshark's dissector) and never the inner ICMP, that our key derivation
//! matches `wg pubkey`, and that `wg show` reads our device.
#![allow(clippy::unwrap_used)]

use clustermesh_testkit::{
    capture::Capture,
    netns::sweep_stale,
    wireguard::{Impl, WgPair},
};

use clustermesh_testkit::require_root;

#[test]
fn handshake_and_traffic_with_wireguard_go() {
    require_root!();
    sweep_stale();
    let ours = Impl::Ours(env!("CARGO_BIN_EXE_clustermesh-wg").into());
    let pair = WgPair::new(ours, Impl::WireguardGo).unwrap();
    let (a, b) = (&pair.a, &pair.b);
    // Our device derives the same public key as `wg pubkey`.
    let shown = a.ns.exec("wg", &["show", &a.iface, "public-key"]).unwrap();
    assert_eq!(shown.trim(), a.public);

    // Capture B's underlay while the peers talk.
    let cap = Capture::start(&b.ns, "ul0", &pair.dir.path().join("ul.pcap")).unwrap();

    // Handshake (started by our side's first packet), then both ways.
    pair.wait_connected().unwrap();
    let out =
        a.ns.exec("ping", &["-c", "5", "-i", "0.05", &b.tunnel_ip])
            .unwrap();
    assert!(out.contains("5 received"), "{out}");
    let out =
        b.ns.exec("ping", &["-c", "5", "-i", "0.05", &a.tunnel_ip])
            .unwrap();
    assert!(out.contains("5 received"), "{out}");

    // Traffic for an address no peer covers is dropped by our device and
    // counted (x_stats), not sent anywhere.
    let ours = clustermesh_crypto::wg::uapi::Client::new(format!(
        "{}/{}.sock",
        clustermesh_testkit::wireguard::RUN_DIR,
        a.iface
    ));
    let before = ours.stats().unwrap();
    let _ =
        a.ns.exec("ping", &["-c", "3", "-i", "0.05", "-W", "1", "10.100.0.9"]);
    let after = ours.stats().unwrap();
    assert_eq!(after.tx_no_peer - before.tx_no_peer, 3, "{after:?}");

    // Both sides report the handshake and the traffic.
    let p = peer_line(a, &b.public);
    assert_eq!(p[2], format!("{}:{}", b.underlay_ip, b.port), "{p:?}");
    assert!(
        p[4].parse::<u64>().unwrap() > 0,
        "our latest handshake: {p:?}"
    );
    assert!(
        p[5].parse::<u64>().unwrap() > 0 && p[6].parse::<u64>().unwrap() > 0,
        "{p:?}"
    );
    let p = peer_line(b, &a.public);
    assert!(
        p[4].parse::<u64>().unwrap() > 0,
        "wireguard-go's latest handshake: {p:?}"
    );

    // The wire: WireGuard messages only, never the inner ICMP.
    let wire = cap.wireguard_only().unwrap();
    assert!(
        wire.initiations >= 1 && wire.responses >= 1,
        "handshake: {wire:?}"
    );
    assert!(wire.data >= 10, "transport data: {wire:?}");
}

/// Peer `key`'s line of `wg show <iface> dump`, by field (0 public key, 1
/// preshared key, 2 endpoint, 3 allowed ips, 4 latest handshake, 5 rx, 6
/// tx, 7 keepalive).
fn peer_line(n: &clustermesh_testkit::wireguard::WgNode, key: &str) -> Vec<String> {
    let dump = n.ns.exec("wg", &["show", &n.iface, "dump"]).unwrap();
    dump.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no peer {key} in {dump}"))
        .split('\t')
        .map(str::to_owned)
        .collect()
}

/// Field `i` of [`peer_line`].
fn dump_field(n: &clustermesh_testkit::wireguard::WgNode, key: &str, i: usize) -> String {
    peer_line(n, key).get(i).cloned().unwrap_or_default()
}

/// Issue 17: our device against wireguard-go over an IPv6 underlay (peer
/// endpoints `[fd99::N]:port`), with a preshared key on both sides:
/// handshake, traffic both ways, WireGuard only on the wire. Before the
/// device's socket was dual-stack, no packet got through.
#[test]
fn ipv6_underlay_with_preshared_keys_against_wireguard_go() {
    require_root!();
    sweep_stale();
    let ours = Impl::Ours(env!("CARGO_BIN_EXE_clustermesh-wg").into());
    let pair = WgPair::new_over(ours, Impl::WireguardGo, true).unwrap();
    let (a, b) = (&pair.a, &pair.b);
    let psk = pair.dir.path().join("psk");
    let out = std::process::Command::new("wg")
        .arg("genpsk")
        .output()
        .unwrap();
    std::fs::write(&psk, &out.stdout).unwrap();
    let psk = psk.to_string_lossy().into_owned();
    for (n, peer) in [(a, b), (b, a)] {
        n.ns.exec(
            "wg",
            &["set", &n.iface, "peer", &peer.public, "preshared-key", &psk],
        )
        .unwrap();
    }
    let cap = Capture::start(&b.ns, "ul0", &pair.dir.path().join("ul6.pcap")).unwrap();
    pair.wait_connected().unwrap();
    for (from, to) in [(a, b), (b, a)] {
        let out = from
            .ns
            .exec("ping", &["-c", "5", "-i", "0.05", &to.tunnel_ip])
            .unwrap();
        assert!(out.contains("5 received"), "{out}");
    }
    assert_eq!(
        dump_field(a, &b.public, 2),
        format!("[{}]:{}", b.underlay_ip6, b.port)
    );
    assert_ne!(
        dump_field(a, &b.public, 1),
        "(none)",
        "our side has no preshared key"
    );
    let wire = cap.wireguard_only().unwrap();
    assert!(wire.initiations >= 1 && wire.data >= 10, "{wire:?}");
    eprintln!("IPv6 underlay with a preshared key: {wire:?}");
}

/// Issue 17: roaming between families. The pair talks over IPv4; then
/// wireguard-go's side moves to IPv6 (its endpoint for us becomes our IPv6
/// address): our device follows the authenticated packets to the peer's
/// IPv6 address and answers there; then back to IPv4.
#[test]
fn roaming_between_ipv4_and_ipv6_against_wireguard_go() {
    require_root!();
    sweep_stale();
    let ours = Impl::Ours(env!("CARGO_BIN_EXE_clustermesh-wg").into());
    let pair = WgPair::new(ours, Impl::WireguardGo).unwrap();
    let (a, b) = (&pair.a, &pair.b);
    pair.wait_connected().unwrap();
    assert_eq!(
        dump_field(a, &b.public, 2),
        format!("{}:{}", b.underlay_ip, b.port)
    );
    for (to, want) in [
        (
            format!("[{}]:{}", a.underlay_ip6, a.port),
            format!("[{}]:{}", b.underlay_ip6, b.port),
        ),
        (
            format!("{}:{}", a.underlay_ip, a.port),
            format!("{}:{}", b.underlay_ip, b.port),
        ),
    ] {
        b.ns.exec("wg", &["set", &b.iface, "peer", &a.public, "endpoint", &to])
            .unwrap();
        let out =
            b.ns.exec("ping", &["-c", "3", "-i", "0.05", &a.tunnel_ip])
                .unwrap();
        assert!(out.contains("3 received"), "{out}");
        assert_eq!(dump_field(a, &b.public, 2), want, "our device did not roam");
        let out =
            a.ns.exec("ping", &["-c", "3", "-i", "0.05", &b.tunnel_ip])
                .unwrap();
        assert!(out.contains("3 received"), "after roaming to {want}: {out}");
        eprintln!("roamed: our device now sends to {want}");
    }
}

/// Issue 17: a peer behind SNAT with a persistent keepalive, each way
/// round. The public side knows the NATed peer's key but not its address;
/// the NATed side's keepalives alone (no traffic) make it known (the NAT's
/// address and port), and the public side then reaches it through the NAT.
#[test]
fn a_peer_behind_nat_with_persistent_keepalive() {
    require_root!();
    sweep_stale();
    let ours = || Impl::Ours(env!("CARGO_BIN_EXE_clustermesh-wg").into());
    for (public, natted, what) in [
        (
            ours(),
            Impl::WireguardGo,
            "wireguard-go behind NAT, ours public",
        ),
        (
            Impl::WireguardGo,
            ours(),
            "ours behind NAT, wireguard-go public",
        ),
    ] {
        let (pair, _router) = WgPair::new_behind_nat(public, natted).unwrap();
        let (a, b) = (&pair.a, &pair.b);
        let t0 = std::time::Instant::now();
        let learned = loop {
            let e = dump_field(a, &b.public, 2);
            if e.starts_with("10.99.0.254:") {
                break e;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(15),
                "{what}: the public side never learned the NATed peer (endpoint {e}); A: {}; B: {}",
                a.ns.exec("wg", &["show", &a.iface, "dump"])
                    .unwrap_or_default(),
                b.ns.exec("wg", &["show", &b.iface, "dump"])
                    .unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let out =
            a.ns.exec("ping", &["-c", "3", "-i", "0.2", &b.tunnel_ip])
                .unwrap();
        assert!(out.contains("3 received"), "{what}: {out}");
        eprintln!(
            "{what}: endpoint {learned} learned after {:?}",
            t0.elapsed()
        );
    }
}

/// The kernel's count of TCP segments received with a bad checksum in
/// `ns` (`Tcp: InCsumErrors` of /proc/net/snmp, IPv4 and IPv6 alike).
fn tcp_csum_errors(ns: &clustermesh_testkit::netns::NetNs) -> u64 {
    let snmp = ns.exec("cat", &["/proc/net/snmp"]).unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Issue 17: bulk TCP over IPv6 inside the tunnel, both ways, between our
/// device and wireguard-go: our TSO6 segments (IPv6 payload lengths,
/// TCP/IPv6 checksums) are accepted by the peer's kernel, and what we
/// write toward our TUN by ours; no TCP checksum error on either side.
/// Inner IPv4 alongside still works. Then between two of ours (whose
/// UDP GSO batches arrive whole; wireguard-go's segments come one by one):
/// the segments are coalesced toward the TUN into GSO_TCPV6 super-packets,
/// seen there larger than the MTU, and accepted.
#[test]
fn inner_ipv6_bulk_tcp_against_wireguard_go() {
    require_root!();
    sweep_stale();
    let ours = Impl::Ours(env!("CARGO_BIN_EXE_clustermesh-wg").into());
    let pair = WgPair::new_dual(ours.clone(), Impl::WireguardGo, false).unwrap();
    let (a, b) = (&pair.a, &pair.b);
    pair.wait_connected().unwrap();
    let errors = |n: &clustermesh_testkit::wireguard::WgNode| tcp_csum_errors(&n.ns);
    let before = (errors(a), errors(b));
    for (from, to) in [(a, b), (b, a)] {
        let ip6 = to.tunnel_ip6.as_deref().unwrap();
        let out = from
            .ns
            .exec("ping", &["-c", "3", "-i", "0.05", ip6])
            .unwrap();
        assert!(out.contains("3 received"), "{out}");
        let g = clustermesh_testkit::iperf::iperf(&to.ns, &from.ns, ip6, 1).unwrap();
        eprintln!(
            "inner IPv6 TCP {} -> {}: {g:.2} Gbit/s",
            from.iface, to.iface
        );
        assert!(g > 0.05, "inner IPv6 TCP to {ip6}: {g} Gbit/s");
    }
    let g = clustermesh_testkit::iperf::iperf(&b.ns, &a.ns, &b.tunnel_ip, 1).unwrap();
    assert!(g > 0.05, "inner IPv4 TCP next to IPv6: {g} Gbit/s");
    assert_eq!((errors(a), errors(b)), before, "TCP checksum errors");
    drop(pair);

    let pair = WgPair::new_dual(ours.clone(), ours, false).unwrap();
    let (a, b) = (&pair.a, &pair.b);
    pair.wait_connected().unwrap();
    let before = errors(b);
    let pcap = pair.dir.path().join("tun.pcap");
    let cap = Capture::start(&b.ns, &b.iface, &pcap).unwrap();
    let (ip6, from6) = (b.tunnel_ip6.as_deref().unwrap(), a.tunnel_ip6.clone());
    let g = clustermesh_testkit::iperf::iperf(&b.ns, &a.ns, ip6, 1).unwrap();
    assert!(g > 0.05, "inner IPv6 TCP between two of ours: {g} Gbit/s");
    let out = cap.stop_and_read(&[], &["ipv6.src", "frame.len"]).unwrap();
    let big = out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(src, len)| Some(*src) == from6.as_deref() && len.parse().unwrap_or(0) > 1420)
        .count();
    eprintln!("inner IPv6 between two of ours: {g:.2} Gbit/s, {big} super-packets to the TUN");
    assert!(big > 0, "no coalesced IPv6 super-packet on our TUN");
    assert_eq!(errors(b), before, "TCP checksum errors");
}
