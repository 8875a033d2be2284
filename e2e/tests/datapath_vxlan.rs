//! Privileged: two nodes of two clusters, a pod on each, connected by the
//! eBPF datapath over VXLAN (external-mode devices, UDP 8472) in real
//! network namespaces. Proves ping and TCP both ways, that the receiver
//! records the sender's identity carried in the VNI, that the wire carries
//! VXLAN with that VNI (tcpdump + tshark on the underlay), and that traffic
//! to an unknown address is dropped with a counted reason.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clustermesh_testkit::netns::{NetNs, PinDir, sweep_stale};
use e2e::require_root;
use node_agent::datapath::Datapath;
use tunnel_common::{DatapathConfig, Direction, EndpointInfo, IpCacheValue, TunnelMode, Verdict};

struct Node {
    ns: NetNs,
    pod: NetNs,
    pins: PinDir,
    dp: Option<Datapath>,
    pod_ip: Ipv4Addr,
    identity: u32,
}

fn mac(last: u8, id: u8) -> String {
    format!("02:00:0a:{id:02x}:00:{last:02x}")
}

fn mac_bytes(last: u8, id: u8) -> [u8; 6] {
    [0x02, 0x00, 0x0a, id, 0x00, last]
}

fn ifindex(ns: &NetNs, dev: &str) -> u32 {
    let out = ns.exec("ip", &["-o", "link", "show", "dev", dev]).unwrap();
    out.split(':').next().unwrap().trim().parse().unwrap()
}

/// Node `id` (cluster `id`): namespace, VXLAN device, pod with a fixed
/// gateway; loads and attaches the datapath.
fn node(id: u8, underlay: &str) -> Node {
    let ns = NetNs::new(&format!("n{id}")).unwrap();
    let pod = NetNs::new(&format!("p{id}")).unwrap();
    let pod_ip: Ipv4Addr = format!("10.{id}.0.2").parse().unwrap();
    let _ = underlay;
    ns.exec(
        "ip",
        &[
            "link", "add", "cm_vxlan", "type", "vxlan", "external", "dstport", "8472",
        ],
    )
    .unwrap();
    ns.exec("ip", &["link", "set", "cm_vxlan", "up"]).unwrap();
    ns.exec(
        "ip",
        &[
            "link",
            "add",
            "lxc0",
            "address",
            &mac(1, id),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ],
    )
    .unwrap();
    ns.exec("ip", &["link", "set", "lxc0", "up"]).unwrap();
    pod.exec("ip", &["link", "set", "eth0", "address", &mac(2, id)])
        .unwrap();
    // VXLAN adds 50 bytes on the underlay.
    pod.exec("ip", &["link", "set", "eth0", "mtu", "1450", "up"])
        .unwrap();
    pod.exec(
        "ip",
        &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"],
    )
    .unwrap();
    pod.exec(
        "ip",
        &[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ],
    )
    .unwrap();
    pod.exec(
        "ip",
        &[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    pod.exec(
        "ip",
        &[
            "neigh",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "lladdr",
            &mac(1, id),
            "nud",
            "permanent",
        ],
    )
    .unwrap();
    let pins = PinDir::new(&format!("n{id}")).unwrap();
    Node {
        ns,
        pod,
        pins,
        dp: None,
        pod_ip,
        identity: (u32::from(id) << 16) | 300,
    }
}

impl Node {
    fn load(&mut self, id: u8) {
        let lxc = ifindex(&self.ns, "lxc0");
        let vx = ifindex(&self.ns, "cm_vxlan");
        let dp = std::thread::scope(|s| {
            s.spawn(|| {
                let _in = self.ns.enter().unwrap();
                let mut dp = Datapath::load(self.pins.path())?;
                dp.attach_endpoint("lxc0")?;
                dp.attach_overlay("cm_vxlan")?;
                Ok::<_, node_agent::datapath::Error>(dp)
            })
            .join()
            .unwrap()
        })
        .unwrap();
        let mut dp = dp;
        dp.set_config(DatapathConfig {
            mode: TunnelMode::Vxlan as u32,
            overlay_ifindex: vx,
        })
        .unwrap();
        dp.upsert_endpoint(
            self.pod_ip,
            EndpointInfo {
                ifindex: lxc,
                identity: self.identity,
                mac: mac_bytes(2, id),
                host_mac: mac_bytes(1, id),
            },
        )
        .unwrap();
        self.dp = Some(dp);
    }

    /// Routes `peer`'s pod CIDR and pod through the tunnel to `underlay`.
    fn learn(&mut self, peer_id: u8, peer_identity: u32, underlay: &str) {
        let tep = u32::from(underlay.parse::<Ipv4Addr>().unwrap()).to_be();
        let dp = self.dp.as_mut().unwrap();
        let cidr: Ipv4Addr = format!("10.{peer_id}.0.0").parse().unwrap();
        dp.upsert_ipcache(
            cidr,
            24,
            IpCacheValue {
                identity: 0,
                tunnel_endpoint: tep,
                cluster_id: peer_id,
                ..Default::default()
            },
        )
        .unwrap();
        dp.upsert_ipcache(
            format!("10.{peer_id}.0.2").parse().unwrap(),
            32,
            IpCacheValue {
                identity: peer_identity,
                tunnel_endpoint: tep,
                cluster_id: peer_id,
                ..Default::default()
            },
        )
        .unwrap();
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().unwrap()
    }
}

/// A one-connection TCP server: replies with the request reversed. Every
/// step has a timeout, so a broken datapath fails the test instead of
/// hanging it.
const TCP_SERVER: &str = "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',5201))\ns.listen(1)\ns.settimeout(10)\nprint('listening',flush=True)\nc,_=s.accept()\nc.settimeout(10)\nd=c.recv(100)\nc.sendall(d[::-1])\nc.close()";
const TCP_CLIENT: &str = "import socket,sys\nc=socket.create_connection((sys.argv[1],5201),timeout=5)\nc.sendall(b'hello')\nprint(c.recv(100).decode())";

/// ping's summary, whatever its exit status (it fails when nothing answers).
fn ping(from: &NetNs, to: Ipv4Addr, n: u32) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            from.name(),
            "ping",
            "-c",
            &n.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
        ])
        .arg(to.to_string())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vxlan_between_clusters_carries_identity() {
    require_root!();
    sweep_stale();
    let mut a = node(1, "192.0.2.1");
    let mut b = node(2, "192.0.2.2");
    // The underlay: node A and node B on one link (addresses inside the
    // namespaces only).
    clustermesh_testkit::netns::veth_pair(
        &a.ns,
        "ul0",
        "192.0.2.1/24",
        &b.ns,
        "ul0",
        "192.0.2.2/24",
    )
    .unwrap();
    a.load(1);
    b.load(2);
    let (ida, idb) = (a.identity, b.identity);
    a.learn(2, idb, "192.0.2.2");
    b.learn(1, ida, "192.0.2.1");

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
    let out = ping(&a.pod, b.pod_ip, 5);
    assert!(out.contains("5 received"), "A -> B: {out}");
    let out = ping(&b.pod, a.pod_ip, 5);
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
    assert_eq!(b.dp().source_identity(a.pod_ip).unwrap(), Some(ida));
    assert_eq!(a.dp().source_identity(b.pod_ip).unwrap(), Some(idb));

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

    // Counters: tunnelled out of A, delivered into B.
    let out_a = a.dp().counter(Direction::Egress, Verdict::Tunnel).unwrap();
    let in_b = b.dp().counter(Direction::Ingress, Verdict::Local).unwrap();
    assert!(
        out_a.packets >= 5 && in_b.packets >= 5,
        "{out_a:?} {in_b:?}"
    );

    // An address in B's pod CIDR without an endpoint: tunnelled, then dropped
    // at B with a counted reason (not handed on).
    let before = b
        .dp()
        .counter(Direction::Ingress, Verdict::DropUnknownEndpoint)
        .unwrap();
    let out = ping(&a.pod, "10.2.0.99".parse().unwrap(), 3);
    assert!(out.contains("0 received"), "{out}");
    let after = b
        .dp()
        .counter(Direction::Ingress, Verdict::DropUnknownEndpoint)
        .unwrap();
    assert_eq!(after.packets - before.packets, 3);

    // Removing B from A's ip-cache: traffic goes to the host stack instead of
    // the tunnel (no tunnel counted).
    let t0 = a.dp().counter(Direction::Egress, Verdict::Tunnel).unwrap();
    a.dp()
        .remove_ipcache("10.2.0.0".parse().unwrap(), 24)
        .unwrap();
    a.dp().remove_ipcache(b.pod_ip, 32).unwrap();
    let out = ping(&a.pod, b.pod_ip, 2);
    assert!(out.contains("0 received"), "{out}");
    assert_eq!(
        a.dp().counter(Direction::Egress, Verdict::Tunnel).unwrap(),
        t0
    );
}
