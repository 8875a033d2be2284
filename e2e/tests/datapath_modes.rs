//! Privileged: two nodes of two clusters, a pod on each, connected by the
//! eBPF datapath in real network namespaces, once per mode:
//! - VXLAN (sent through external-mode devices, UDP 8472, VNI = sender
//!   identity; received by the device or decapsulated in eBPF),
//! - Geneve (encapsulated by the programs, UDP 6081, VNI = identity),
//! - direct routing (no encapsulation; netlink routes to the peer's pod
//!   CIDR; identity resolved from the ip-cache on receipt).
//!
//! Each proves ping and TCP both ways, that the receiver records the
//! sender's identity, what the wire carries (tcpdump + tshark on the
//! underlay), the MTU boundary with DF pings, and that traffic to an
//! unknown address is dropped.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv6Addr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clustermesh_testkit::{capture::Capture, netns::sweep_stale};
use e2e::{
    require_root,
    topo::{Node, link_local6, ping, ping6, underlay, underlay6},
};
use node_agent::{desired::TunnelEntry, reconcilers::Reconciler as _};
use tunnel_common::{Direction, TunnelMode, Verdict};

/// A one-connection TCP server: replies with the request reversed. Every
/// step has a timeout, so a broken datapath fails the test instead of
/// hanging it.
const TCP_SERVER: &str = "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',5201))\ns.listen(1)\ns.settimeout(10)\nprint('listening',flush=True)\nc,_=s.accept()\nc.settimeout(10)\nd=c.recv(100)\nc.sendall(d[::-1])\nc.close()";
const TCP_CLIENT: &str = "import socket,sys\nc=socket.create_connection((sys.argv[1],5201),timeout=5)\nc.sendall(b'hello')\nprint(c.recv(100).decode())";

#[test]
fn vxlan_between_clusters_carries_identity() {
    require_root!();
    exercise(TunnelMode::Vxlan);
}

#[test]
fn geneve_between_clusters_carries_identity() {
    require_root!();
    exercise(TunnelMode::Geneve);
}

#[test]
fn direct_routing_between_clusters_resolves_identity() {
    require_root!();
    exercise(TunnelMode::Direct);
}

/// The tcpdump filter, tshark decode arguments and VNI field of a mode.
fn wire(mode: TunnelMode) -> (&'static str, &'static [&'static str], Option<&'static str>) {
    match mode {
        TunnelMode::Vxlan => (
            "udp port 8472",
            &["-d", "udp.port==8472,vxlan"],
            Some("vxlan.vni"),
        ),
        // tshark knows 6081 as Geneve by itself.
        TunnelMode::Geneve => ("udp port 6081", &[], Some("geneve.vni")),
        _ => ("icmp", &[], None),
    }
}

fn exercise(mode: TunnelMode) {
    sweep_stale();
    let a = Node::new(1).unwrap();
    let b = Node::new(2).unwrap();
    // The underlay: node A and node B on one link (addresses inside the
    // namespaces only).
    let (ula, ulb) = underlay(&a, &b).unwrap();
    let mut dpa = a.datapath(true).unwrap();
    let mut dpb = b.datapath(true).unwrap();
    // VXLAN: A leaves its underlay IP unset, so A receives through the
    // kernel device and `from_overlay`, while B decapsulates in
    // `from_underlay`: both receive paths are exercised.
    let own_a = if mode == TunnelMode::Vxlan {
        std::net::Ipv4Addr::UNSPECIFIED
    } else {
        ula
    };
    a.connect_with(&mut dpa, &b, mode, own_a, ulb).unwrap();
    b.connect_with(&mut dpb, &a, mode, ulb, ula).unwrap();
    let (ida, idb) = (a.identity, b.identity);
    // Direct routing: the routes the agent installs over netlink.
    let mut routes = Vec::new();
    if mode == TunnelMode::Direct {
        for (n, peer, via) in [(&a, &b, ulb), (&b, &a, ula)] {
            let mut t = n.routes().unwrap();
            let cidr = format!("10.{}.0.0/24", peer.id).parse().unwrap();
            let entry = TunnelEntry {
                node_ip: via.into(),
                cluster_id: peer.id,
                node: "peer".parse().unwrap(),
                encrypt: false,
            };
            t.update(&cidr, &entry).unwrap();
            let shown = n.ns.exec("ip", &["route", "show", "proto", "222"]).unwrap();
            assert!(
                shown.contains(&format!("10.{}.0.0/24 via {via} dev ul0", peer.id)),
                "{shown}"
            );
            routes.push(t);
        }
    }
    let (filter, decode, vni_field) = wire(mode);

    // Capture the underlay on B while traffic flows.
    let pcap = tempfile::NamedTempFile::new().unwrap();
    let mut dump = Command::new("ip")
        .args([
            "netns",
            "exec",
            b.ns.name(),
            "tcpdump",
            "-i",
            "ul0",
            "-nn",
            "-U",
            "-c",
            "4",
            "-w",
        ])
        .arg(pcap.path())
        .args(filter.split(' '))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(dump.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "tcpdump did not start"
        );
    }

    // Ping both ways.
    let out = ping(&a.pod, b.pod_ip, 5, "0.05");
    assert!(out.contains("5 received"), "A -> B: {out}");
    let out = ping(&b.pod, a.pod_ip, 5, "0.05");
    assert!(out.contains("5 received"), "B -> A: {out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while dump.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "tcpdump saw fewer than 4 packets ({filter})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The wire: VXLAN on 8472 or Geneve on 6081 with the sender's identity
    // as VNI; direct routing: the pods' own packets, one IP header.
    let fields = Command::new("tshark")
        .args(["-r"])
        .arg(pcap.path())
        .args(decode)
        .args([
            "-T",
            "fields",
            "-e",
            vni_field.unwrap_or("udp.port"),
            "-e",
            "ip.src",
            "-e",
            "icmp.type",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&fields.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let pods = [a.pod_ip.to_string(), b.pod_ip.to_string()];
    for l in &lines {
        let cols: Vec<&str> = l.split('\t').collect();
        // ip.src lists outer then inner source.
        let srcs: Vec<&str> = cols[1].split(',').collect();
        let inner_src = *srcs.last().unwrap();
        assert!(pods.iter().any(|p| p == inner_src), "{l}");
        assert!(cols[2] == "8" || cols[2] == "0", "ICMP echo expected: {l}");
        let Some(_) = vni_field else {
            assert_eq!(srcs.len(), 1, "direct routing must not encapsulate: {l}");
            assert!(cols[0].is_empty(), "direct routing must not use UDP: {l}");
            continue;
        };
        assert_eq!(srcs.len(), 2, "outer and inner IPv4 expected: {l}");
        // tshark shows the VXLAN VNI in decimal, Geneve's in hex.
        let vni = match cols[0].strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => cols[0].parse(),
        }
        .unwrap_or_else(|_| panic!("no VNI in {l:?}"));
        let want = if inner_src == a.pod_ip.to_string() {
            ida
        } else {
            idb
        };
        assert_eq!(vni, want, "VNI must be the sender's identity: {l}");
    }

    if mode == TunnelMode::Vxlan {
        let rx = |n: &Node| -> u64 {
            n.ns.exec("cat", &["/sys/class/net/cm_vxlan/statistics/rx_packets"])
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert!(rx(&a) >= 5, "A receives through its VXLAN device");
        assert_eq!(
            rx(&b),
            0,
            "B decapsulates in from_underlay, before the device"
        );
    }
    // The receivers recorded the senders' identities.
    assert_eq!(dpb.source_identity(a.pod_ip).unwrap(), Some(ida));
    assert_eq!(dpa.source_identity(b.pod_ip).unwrap(), Some(idb));

    // TCP both ways: a connection carrying a request and its reply.
    for (server, client, ip) in [(&b, &a, b.pod_ip), (&a, &b, a.pod_ip)] {
        let mut srv = Command::new("ip")
            .args([
                "netns",
                "exec",
                server.pod.name(),
                "python3",
                "-c",
                TCP_SERVER,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The server prints once it listens.
        let mut ready = String::new();
        BufReader::new(srv.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "listening");
        let out = client
            .pod
            .exec("python3", &["-c", TCP_CLIENT, &ip.to_string()]);
        let _ = srv.kill();
        let _ = srv.wait();
        let out = out.unwrap_or_else(|e| panic!("TCP to {ip}: {e}"));
        assert_eq!(out.trim(), "olleh", "TCP reply from {ip}");
    }

    // MTU: the pod's 1450 leaves room for VXLAN's or Geneve's 50 bytes. A DF ping that
    // fills it exactly crosses; one byte more is refused at the pod with an
    // error (EMSGSIZE), never silently dropped on the way.
    let fits = a
        .pod
        .exec(
            "ping",
            &[
                "-c",
                "2",
                "-i",
                "0.05",
                "-M",
                "do",
                "-s",
                "1422",
                &b.pod_ip.to_string(),
            ],
        )
        .unwrap();
    assert!(fits.contains("2 received"), "{fits}");
    let too_big = Command::new("ip")
        .args([
            "netns",
            "exec",
            a.pod.name(),
            "ping",
            "-c",
            "1",
            "-M",
            "do",
            "-s",
            "1423",
        ])
        .arg(b.pod_ip.to_string())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&too_big.stdout),
        String::from_utf8_lossy(&too_big.stderr)
    );
    assert!(!too_big.status.success());
    assert!(
        said.contains("message too long") || said.contains("mtu"),
        "{said}"
    );

    // Counters: tunnelled (or routed) out of A, delivered into B.
    let sent = if mode == TunnelMode::Direct {
        Verdict::Routed
    } else {
        Verdict::Tunnel
    };
    let out_a = dpa.counter(Direction::Egress, sent).unwrap();
    let in_b = dpb.counter(Direction::Ingress, Verdict::Local).unwrap();
    assert!(
        out_a.packets >= 5 && in_b.packets >= 5,
        "{out_a:?} {in_b:?}"
    );

    // An address in B's pod CIDR without an endpoint: sent, then dropped at
    // B (tunnels: with a counted reason, not handed on).
    let before = dpb
        .counter(Direction::Ingress, Verdict::DropUnknownEndpoint)
        .unwrap();
    let out = ping(&a.pod, "10.2.0.99".parse().unwrap(), 3, "0.05");
    assert!(out.contains("0 received"), "{out}");
    let after = dpb
        .counter(Direction::Ingress, Verdict::DropUnknownEndpoint)
        .unwrap();
    if mode != TunnelMode::Direct {
        assert_eq!(after.packets - before.packets, 3);
    }

    // Removing B from A's ip-cache: traffic goes to the host stack instead of
    // the tunnel (nothing more sent).
    let t0 = dpa.counter(Direction::Egress, sent).unwrap();
    dpa.remove_ipcache("10.2.0.0".parse().unwrap(), 24).unwrap();
    dpa.remove_ipcache(b.pod_ip, 32).unwrap();
    let out = ping(&a.pod, b.pod_ip, 2, "0.05");
    assert!(out.contains("0 received"), "{out}");
    assert_eq!(dpa.counter(Direction::Egress, sent).unwrap(), t0);
    // Direct routes are removed through the same reconciler.
    for (mut t, peer) in routes.into_iter().zip([&b, &a]) {
        let cidr = format!("10.{}.0.0/24", peer.id).parse().unwrap();
        t.delete(&cidr).unwrap();
        assert!(t.list().unwrap().is_empty());
    }
}

/// Strict ingress: pod traffic arriving outside WireGuard (here Geneve from
/// a node that does not encrypt) is dropped at the receiver with a counted
/// reason, never delivered.
#[test]
fn strict_ingress_drops_unencrypted_pod_traffic() {
    require_root!();
    sweep_stale();
    let a = Node::new(1).unwrap();
    let b = Node::new(2).unwrap();
    let (ula, ulb) = underlay(&a, &b).unwrap();
    let mut dpa = a.datapath(true).unwrap();
    let mut dpb = b.datapath(true).unwrap();
    a.connect_with(&mut dpa, &b, TunnelMode::Geneve, ula, ulb)
        .unwrap();
    b.connect_with(&mut dpb, &a, TunnelMode::Geneve, ulb, ula)
        .unwrap();
    let out = ping(&a.pod, b.pod_ip, 2, "0.05");
    assert!(out.contains("2 received"), "before: {out}");

    let mut cfg = dpb.config().unwrap();
    cfg.flags |= tunnel_common::CONFIG_FLAG_STRICT_INGRESS;
    dpb.set_config(cfg).unwrap();
    let before = dpb
        .counter(Direction::Ingress, Verdict::DropStrictPlaintext)
        .unwrap();
    let out = ping(&a.pod, b.pod_ip, 3, "0.05");
    assert!(
        out.contains("0 received"),
        "strict ingress delivered plaintext: {out}"
    );
    let after = dpb
        .counter(Direction::Ingress, Verdict::DropStrictPlaintext)
        .unwrap();
    assert_eq!(after.packets - before.packets, 3);
}

// ---- IPv6 ---------------------------------------------------------------
//
// Dual-stack pods (`fd00:<id>::2/128`, gateway fe80::1) on two nodes, per
// mode over an IPv4 and over an IPv6 underlay: ping6 and TCP over IPv6 both
// ways, the receiver's CM_SRC_IDENTITY6, counters, and the wire (outer
// family, VNI). Over an IPv6 underlay the tunnels also carry the IPv4 pods
// (an IPv4 pod behind a node reached only over IPv6). VXLAN: A has no
// underlay address of its own, so A receives through the kernel device and
// `from_overlay` (an IPv6 tunnel key over the IPv6 underlay), B in
// `from_underlay`.

const TCP_SERVER6: &str = "import socket,sys\ns=socket.socket(socket.AF_INET6)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('::',5201))\ns.listen(1)\ns.settimeout(10)\nprint('listening',flush=True)\nc,_=s.accept()\nc.settimeout(10)\nd=c.recv(100)\nc.sendall(d[::-1])\nc.close()";

#[test]
fn ipv6_vxlan_over_ipv4_underlay() {
    require_root!();
    exercise6(TunnelMode::Vxlan, false);
}

#[test]
fn ipv6_vxlan_over_ipv6_underlay() {
    require_root!();
    exercise6(TunnelMode::Vxlan, true);
}

#[test]
fn ipv6_geneve_over_ipv4_underlay() {
    require_root!();
    exercise6(TunnelMode::Geneve, false);
}

#[test]
fn ipv6_geneve_over_ipv6_underlay() {
    require_root!();
    exercise6(TunnelMode::Geneve, true);
}

#[test]
fn ipv6_direct_routing_over_ipv4_underlay() {
    require_root!();
    exercise6(TunnelMode::Direct, false);
}

#[test]
fn ipv6_direct_routing_over_ipv6_underlay() {
    require_root!();
    exercise6(TunnelMode::Direct, true);
}

/// Two dual-stack nodes, maps programmed for `mode` over the underlay of
/// the given family: (A, B, A's datapath, B's, B's underlay address).
fn dual_nodes(
    mode: TunnelMode,
    v6_underlay: bool,
) -> (
    Node,
    Node,
    node_agent::datapath::Datapath,
    node_agent::datapath::Datapath,
    IpAddr,
) {
    sweep_stale();
    let a = Node::new_dual(1).unwrap();
    let b = Node::new_dual(2).unwrap();
    let (ula, ulb): (IpAddr, IpAddr) = if v6_underlay {
        let (x, y) = underlay6(&a, &b).unwrap();
        (x.into(), y.into())
    } else {
        let (x, y) = underlay(&a, &b).unwrap();
        (x.into(), y.into())
    };
    let mut dpa = a.datapath(true).unwrap();
    let mut dpb = b.datapath(true).unwrap();
    let none: IpAddr = if v6_underlay {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let own_a = if mode == TunnelMode::Vxlan { none } else { ula };
    a.connect_any(&mut dpa, &b, mode, own_a, ulb).unwrap();
    b.connect_any(&mut dpb, &a, mode, ulb, ula).unwrap();
    if mode == TunnelMode::Direct {
        // The agent's routes: the peer's IPv6 pod CIDR via the peer (its
        // IPv6 underlay address, or over an IPv4-only underlay its
        // link-local address: IPv6 routes take no IPv4 gateway).
        let hops: [IpAddr; 2] = if v6_underlay {
            [ula, ulb]
        } else {
            [
                link_local6(&a).unwrap().into(),
                link_local6(&b).unwrap().into(),
            ]
        };
        for (n, peer, via) in [(&a, &b, hops[1]), (&b, &a, hops[0])] {
            let cidr = format!("fd00:{}::/64", peer.id);
            n.ns.exec(
                "ip",
                &[
                    "-6",
                    "route",
                    "add",
                    &cidr,
                    "via",
                    &via.to_string(),
                    "dev",
                    "ul0",
                ],
            )
            .unwrap();
        }
    }
    (a, b, dpa, dpb, ulb)
}

/// `ping`'s "N received".
fn received(out: &str) -> u32 {
    out.split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn tcp6(server: &Node, client: &Node) {
    let ip = server.pod_ip6.to_string();
    let mut srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            server.pod.name(),
            "python3",
            "-c",
            TCP_SERVER6,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(srv.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "listening");
    let out = client.pod.exec("python3", &["-c", TCP_CLIENT, &ip]);
    let _ = srv.kill();
    let _ = srv.wait();
    let out = out.unwrap_or_else(|e| panic!("TCP to {ip}: {e}"));
    assert_eq!(out.trim(), "olleh", "TCP reply from {ip}");
}

fn exercise6(mode: TunnelMode, v6_underlay: bool) {
    let (a, b, mut dpa, mut dpb, ulb) = dual_nodes(mode, v6_underlay);
    let (ida, idb) = (a.identity, b.identity);
    // The wire on B's underlay while A pings B over IPv6.
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::start(&b.ns, "ul0", &dir.path().join("ul.pcap")).unwrap();
    let out = ping6(&a.pod, b.pod_ip6, 5, "0.05");
    assert_eq!(
        received(&out),
        5,
        "A -> B over IPv6: {out}; A {:?}; B {:?}; A's routes {:?}",
        dpa.counters().unwrap(),
        dpb.counters().unwrap(),
        a.ns.exec("ip", &["-6", "route"]),
    );
    let out = ping6(&b.pod, a.pod_ip6, 5, "0.05");
    assert_eq!(received(&out), 5, "B -> A over IPv6: {out}");
    let (_, decode, vni_field) = wire(mode);
    let seen = cap
        .stop_and_read(
            decode,
            &[
                vni_field.unwrap_or("udp.port"),
                "ip.src",
                "ipv6.src",
                "icmpv6.type",
            ],
        )
        .unwrap();
    // Echo requests and replies (128, 129) from the pods.
    let echoes: Vec<Vec<&str>> = seen
        .lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .filter(|c| c.len() == 4 && (c[3] == "128" || c[3] == "129"))
        .collect();
    assert!(echoes.len() >= 10, "{seen}");
    for c in &echoes {
        let v6: Vec<&str> = c[2].split(',').collect();
        let inner = *v6.last().unwrap();
        assert!(
            inner == a.pod_ip6.to_string() || inner == b.pod_ip6.to_string(),
            "{c:?}"
        );
        match vni_field {
            None => {
                assert_eq!(v6.len(), 1, "direct routing must not encapsulate: {c:?}");
                assert!(c[0].is_empty() && c[1].is_empty(), "{c:?}");
            }
            Some(_) => {
                // The outer header of the underlay's family.
                if v6_underlay {
                    assert_eq!(v6.len(), 2, "outer and inner IPv6 expected: {c:?}");
                    assert!(c[1].is_empty(), "no IPv4 header: {c:?}");
                } else {
                    assert_eq!(v6.len(), 1, "{c:?}");
                    assert!(!c[1].is_empty(), "outer IPv4 expected: {c:?}");
                }
                let vni = match c[0].strip_prefix("0x") {
                    Some(hex) => u32::from_str_radix(hex, 16),
                    None => c[0].parse(),
                }
                .unwrap_or_else(|_| panic!("no VNI in {c:?}"));
                let want = if inner == a.pod_ip6.to_string() {
                    ida
                } else {
                    idb
                };
                assert_eq!(vni, want, "VNI must be the sender's identity: {c:?}");
            }
        }
    }
    // The receivers recorded the senders' identities.
    assert_eq!(dpb.source_identity6(a.pod_ip6).unwrap(), Some(ida));
    assert_eq!(dpa.source_identity6(b.pod_ip6).unwrap(), Some(idb));
    tcp6(&b, &a);
    tcp6(&a, &b);
    if mode != TunnelMode::Direct && v6_underlay {
        // IPv4 pods behind nodes reached over IPv6 only.
        let out = ping(&a.pod, b.pod_ip, 3, "0.05");
        assert_eq!(received(&out), 3, "IPv4 A -> B over IPv6: {out}");
        let out = ping(&b.pod, a.pod_ip, 3, "0.05");
        assert_eq!(received(&out), 3, "IPv4 B -> A over IPv6: {out}");
        assert_eq!(dpb.source_identity(a.pod_ip).unwrap(), Some(ida));
        assert_eq!(dpa.source_identity(b.pod_ip).unwrap(), Some(idb));
    }
    if mode == TunnelMode::Vxlan {
        let rx = |n: &Node| -> u64 {
            n.ns.exec("cat", &["/sys/class/net/cm_vxlan/statistics/rx_packets"])
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert!(rx(&a) >= 5, "A receives through its VXLAN device");
        assert_eq!(rx(&b), 0, "B decapsulates in from_underlay");
    }
    let sent = if mode == TunnelMode::Direct {
        Verdict::Routed
    } else {
        Verdict::Tunnel
    };
    let out_a = dpa.counter(Direction::Egress, sent).unwrap();
    let in_b = dpb.counter(Direction::Ingress, Verdict::Local).unwrap();
    assert!(
        out_a.packets >= 5 && in_b.packets >= 5,
        "{out_a:?} {in_b:?}"
    );
    // An address in B's IPv6 pod CIDR without an endpoint: dropped at B
    // (tunnels: counted).
    let before = dpb
        .counter(Direction::Ingress, Verdict::DropUnknownEndpoint)
        .unwrap();
    let out = ping6(&a.pod, "fd00:2::99".parse().unwrap(), 3, "0.05");
    assert_eq!(received(&out), 0, "{out}");
    if mode != TunnelMode::Direct {
        let after = dpb
            .counter(Direction::Ingress, Verdict::DropUnknownEndpoint)
            .unwrap();
        assert_eq!(after.packets - before.packets, 3);
    }
    let _ = ulb;
}

/// An IPv6 pod is as untrusted as an IPv4 one, its gateway is answered in
/// eBPF, and strict mode covers IPv6 (Geneve over an IPv6 underlay):
/// (1) with its neighbour entry for fe80::1 deleted, the pod resolves it
/// again: the NS is answered (`neighbour_reply`) with the host veth's MAC,
/// the entry comes back REACHABLE and traffic flows; (2) a source address
/// the pod was not given: `drop_spoofed`; (3) strict egress: an IPv6 mesh
/// range the ip-cache cannot route, `drop_strict_unknown_dest`, and an
/// entry marked for encryption with no WireGuard device,
/// `drop_strict_plaintext`; (4) strict ingress drops IPv6 plaintext.
#[test]
fn ipv6_gateway_answered_spoofing_and_strict_mode() {
    require_root!();
    let (a, b, mut dpa, mut dpb, ulb) = dual_nodes(TunnelMode::Geneve, true);
    let egress =
        |dp: &node_agent::datapath::Datapath, v| dp.counter(Direction::Egress, v).unwrap().packets;

    // (1) The gateway's neighbour entry, gone, is resolved by the pod.
    a.pod
        .exec("ip", &["-6", "neigh", "del", "fe80::1", "dev", "eth0"])
        .unwrap();
    let gone = a
        .pod
        .exec("ip", &["-6", "neigh", "show", "fe80::1", "dev", "eth0"])
        .unwrap();
    assert!(gone.trim().is_empty(), "{gone}");
    let na0 = egress(&dpa, Verdict::NeighbourReply);
    let out = ping6(&a.pod, b.pod_ip6, 3, "0.05");
    let entry = a
        .pod
        .exec("ip", &["-6", "neigh", "show", "fe80::1", "dev", "eth0"])
        .unwrap();
    let answered = egress(&dpa, Verdict::NeighbourReply) - na0;
    eprintln!("gateway: {entry:?}, neighbour_reply +{answered}, ping6 {out}");
    assert_eq!(received(&out), 3, "{out}");
    assert!(answered >= 1, "neighbour_reply +{answered}");
    assert!(
        entry.contains(&format!("lladdr {}", e2e::topo::mac(1, a.id)))
            && entry.contains("REACHABLE"),
        "{entry}"
    );

    // (2) A spoofed IPv6 source never leaves the pod.
    a.pod
        .exec(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                "fd00:1::99/128",
                "dev",
                "eth0",
                "nodad",
            ],
        )
        .unwrap();
    let sp0 = egress(&dpa, Verdict::DropSpoofed);
    let out = Command::new("ip")
        .args(["netns", "exec", a.pod.name(), "ping", "-6", "-c", "3"])
        .args(["-i", "0.05", "-W", "1", "-I", "fd00:1::99"])
        .arg(b.pod_ip6.to_string())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let spoofed = egress(&dpa, Verdict::DropSpoofed) - sp0;
    assert_eq!(received(&out), 0, "spoofed: {out}");
    assert!(spoofed >= 3, "drop_spoofed +{spoofed}");
    // Gone again, so the pod's own address is its source below.
    a.pod
        .exec(
            "ip",
            &["-6", "addr", "del", "fd00:1::99/128", "dev", "eth0"],
        )
        .unwrap();

    // (3) Strict egress.
    let cfg = dpa.config().unwrap();
    dpa.set_config(tunnel_common::DatapathConfig {
        flags: tunnel_common::CONFIG_FLAG_STRICT,
        ..cfg
    })
    .unwrap();
    dpa.upsert_strict_range6("fd00::".parse().unwrap(), 16)
        .unwrap();
    let un0 = egress(&dpa, Verdict::DropStrictUnknownDest);
    let out = ping6(&a.pod, "fd00:9::9".parse().unwrap(), 3, "0.05");
    assert_eq!(received(&out), 0, "{out}");
    let unknown = egress(&dpa, Verdict::DropStrictUnknownDest) - un0;
    assert_eq!(unknown, 3, "drop_strict_unknown_dest +{unknown}");
    // Still routed: the mesh works in strict mode.
    let out = ping6(&a.pod, b.pod_ip6, 2, "0.05");
    assert_eq!(received(&out), 2, "strict, not encrypted: {out}");
    let mut enc = dpa.lookup6(b.pod_ip6).unwrap().unwrap();
    enc.flags |= tunnel_common::IPCACHE_FLAG_ENCRYPT;
    dpa.upsert_ipcache6(b.pod_ip6, 128, enc).unwrap();
    let pl0 = egress(&dpa, Verdict::DropStrictPlaintext);
    let out = ping6(&a.pod, b.pod_ip6, 3, "0.05");
    assert_eq!(received(&out), 0, "{out}");
    let plain = egress(&dpa, Verdict::DropStrictPlaintext) - pl0;
    assert_eq!(plain, 3, "drop_strict_plaintext (egress) +{plain}");
    enc.flags &= !tunnel_common::IPCACHE_FLAG_ENCRYPT;
    dpa.upsert_ipcache6(b.pod_ip6, 128, enc).unwrap();
    dpa.set_config(cfg).unwrap();

    // (4) Strict ingress at B.
    let out = ping6(&a.pod, b.pod_ip6, 2, "0.05");
    assert_eq!(received(&out), 2, "before strict ingress: {out}");
    let cfgb = dpb.config().unwrap();
    dpb.set_config(tunnel_common::DatapathConfig {
        flags: tunnel_common::CONFIG_FLAG_STRICT_INGRESS,
        ..cfgb
    })
    .unwrap();
    let in0 = dpb
        .counter(Direction::Ingress, Verdict::DropStrictPlaintext)
        .unwrap()
        .packets;
    let out = ping6(&a.pod, b.pod_ip6, 3, "0.05");
    assert_eq!(
        received(&out),
        0,
        "strict ingress delivered plaintext: {out}"
    );
    let dropped = dpb
        .counter(Direction::Ingress, Verdict::DropStrictPlaintext)
        .unwrap()
        .packets
        - in0;
    assert_eq!(dropped, 3, "drop_strict_plaintext (ingress) +{dropped}");
    let _ = ulb;
}
