//! Privileged: two nodes of two clusters, a pod on each, connected by the
//! eBPF datapath over VXLAN (external-mode devices, UDP 8472) in real
//! network namespaces. Proves ping and TCP both ways, that the receiver
//! records the sender's identity carried in the VNI, that the wire carries
//! VXLAN with that VNI (tcpdump + tshark on the underlay), and that traffic
//! to an unknown address is dropped with a counted reason.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clustermesh_testkit::netns::sweep_stale;
use e2e::{
    require_root,
    topo::{Node, ping, underlay},
};
use tunnel_common::{Direction, Verdict};

/// A one-connection TCP server: replies with the request reversed. Every
/// step has a timeout, so a broken datapath fails the test instead of
/// hanging it.
const TCP_SERVER: &str = "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',5201))\ns.listen(1)\ns.settimeout(10)\nprint('listening',flush=True)\nc,_=s.accept()\nc.settimeout(10)\nd=c.recv(100)\nc.sendall(d[::-1])\nc.close()";
const TCP_CLIENT: &str = "import socket,sys\nc=socket.create_connection((sys.argv[1],5201),timeout=5)\nc.sendall(b'hello')\nprint(c.recv(100).decode())";

#[test]
fn vxlan_between_clusters_carries_identity() {
    require_root!();
    sweep_stale();
    let a = Node::new(1).unwrap();
    let b = Node::new(2).unwrap();
    // The underlay: node A and node B on one link (addresses inside the
    // namespaces only).
    let (ula, ulb) = underlay(&a, &b).unwrap();
    let mut dpa = a.datapath(true).unwrap();
    let mut dpb = b.datapath(true).unwrap();
    a.connect(&mut dpa, &b, ulb).unwrap();
    b.connect(&mut dpb, &a, ula).unwrap();
    let (ida, idb) = (a.identity, b.identity);

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
        .args(["udp", "port", "8472"])
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
            "tcpdump saw fewer than 4 VXLAN packets"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The wire carries VXLAN on 8472 with the sender's identity as VNI.
    let fields = Command::new("tshark")
        .args(["-r"])
        .arg(pcap.path())
        .args([
            "-d",
            "udp.port==8472,vxlan",
            "-T",
            "fields",
            "-e",
            "vxlan.vni",
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
    for l in &lines {
        let cols: Vec<&str> = l.split('\t').collect();
        let vni: u32 = cols[0]
            .parse()
            .unwrap_or_else(|_| panic!("no VNI in {l:?}"));
        // ip.src lists outer then inner source.
        let inner_src = cols[1].split(',').next_back().unwrap();
        let want = if inner_src == a.pod_ip.to_string() {
            ida
        } else {
            idb
        };
        assert_eq!(vni, want, "VNI must be the sender's identity: {l}");
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

    // MTU: the pod's 1450 leaves room for VXLAN's 50 bytes. A DF ping that
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

    // Counters: tunnelled out of A, delivered into B.
    let out_a = dpa.counter(Direction::Egress, Verdict::Tunnel).unwrap();
    let in_b = dpb.counter(Direction::Ingress, Verdict::Local).unwrap();
    assert!(
        out_a.packets >= 5 && in_b.packets >= 5,
        "{out_a:?} {in_b:?}"
    );

    // An address in B's pod CIDR without an endpoint: tunnelled, then dropped
    // at B with a counted reason (not handed on).
    let before = dpb
        .counter(Direction::Ingress, Verdict::DropUnknownEndpoint)
        .unwrap();
    let out = ping(&a.pod, "10.2.0.99".parse().unwrap(), 3, "0.05");
    assert!(out.contains("0 received"), "{out}");
    let after = dpb
        .counter(Direction::Ingress, Verdict::DropUnknownEndpoint)
        .unwrap();
    assert_eq!(after.packets - before.packets, 3);

    // Removing B from A's ip-cache: traffic goes to the host stack instead of
    // the tunnel (no tunnel counted).
    let t0 = dpa.counter(Direction::Egress, Verdict::Tunnel).unwrap();
    dpa.remove_ipcache("10.2.0.0".parse().unwrap(), 24).unwrap();
    dpa.remove_ipcache(b.pod_ip, 32).unwrap();
    let out = ping(&a.pod, b.pod_ip, 2, "0.05");
    assert!(out.contains("0 received"), "{out}");
    assert_eq!(dpa.counter(Direction::Egress, Verdict::Tunnel).unwrap(), t0);
}
