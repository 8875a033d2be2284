//! Privileged: IPv6 service load-balancing in the datapath (issue 17). Two
//! nodes of two clusters on one underlay link (VXLAN over IPv4), as `topo`
//! wires them, each pod given an IPv6 address here (topo's pods are IPv4),
//! plus a second IPv6 pod on node A; the real services reconciler
//! (`ServiceMap`) writes the IPv6 frontend `fd00:96::10` (TCP and UDP 80 ->
//! 8080) into the `CM_LB6_*` maps. Shown:
//!
//! (1) TCP and UDP to the frontend reach the backends (local and remote),
//!     never the client itself, and the replies come from the frontend
//!     (UDP: the answer's source; TCP: the connection would not complete
//!     otherwise), from either node;
//! (2) to the frontend address, ICMPv6 (answered by the node, which owns
//!     the address, before the frontend exists), fragments (next header
//!     44), another extension header (destination options) and a port that
//!     is no frontend are dropped and counted (`drop_service_protocol`,
//!     `drop_fragment`), never handed to the node;
//! (3) an IPv6 frontend whose record has only an IPv4 backend has no
//!     backend (families are not mixed): new flows are dropped
//!     (`drop_no_service_backend`);
//! (4) deleting the service removes the address from `CM_LB6_FRONTENDS`:
//!     the node answers it again.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use clustermesh_api::{Affinity, BackendState, Protocol};
use clustermesh_testkit::netns::{NetNs, sweep_stale};
use e2e::{
    require_root,
    services::{Responder, ask_tcp, ask_udp, in_pod},
    topo::{Node, mac, mac_bytes, underlay},
};
use node_agent::{
    datapath::Datapath,
    desired::{MergedBackend, MergedService},
    reconcilers::{
        Reconciler as _,
        services::{LbPolicy, ServiceMap},
    },
};
use tunnel_common::{Direction, EndpointInfo, IPPROTO_TCP, IpCacheValue, Verdict};

const FE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const PORT: u16 = 8080;

fn pod6(c: u8, n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, c.into(), 0, 0, 0, 0, n)
}

fn drops(dp: &Datapath, v: Verdict) -> u64 {
    dp.counter(Direction::Egress, v).unwrap().packets
}

/// Runs `args` in namespace `ns`, whatever its exit status; stdout.
fn run(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn received(out: &str) -> u32 {
    out.split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn enable_ipv6(ns: &NetNs, dev: &str) {
    for k in ["all", dev] {
        ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{k}.disable_ipv6=0")],
        )
        .unwrap();
    }
}

/// Gives a pod (`eth0`, its host side's MAC `host_mac`) the IPv6 address
/// `ip` and the CNI's IPv6 default route via `fe80::1` (permanent
/// neighbour entry: the host side's MAC).
fn pod_ipv6(pod: &NetNs, ip: Ipv6Addr, host_mac: &str) {
    enable_ipv6(pod, "eth0");
    pod.exec(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{ip}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    )
    .unwrap();
    pod.exec(
        "ip",
        &[
            "-6",
            "neigh",
            "replace",
            "fe80::1",
            "lladdr",
            host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .unwrap();
    pod.exec(
        "ip",
        &[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ],
    )
    .unwrap();
}

/// A second pod on node `n` behind `lxc1` (MACs 3 and 4 of the node),
/// IPv6 only, its `from_endpoint` attached. The returned datapath handle
/// keeps nothing alive the pins do not.
fn second_pod(n: &Node, ip: Ipv6Addr) -> (NetNs, Datapath) {
    let pod = NetNs::new(&format!("p{}b", n.id)).unwrap();
    n.ns.exec(
        "ip",
        &[
            "link",
            "add",
            "lxc1",
            "address",
            &mac(3, n.id),
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
    n.ns.exec("ip", &["link", "set", "lxc1", "up"]).unwrap();
    pod.exec("ip", &["link", "set", "eth0", "address", &mac(4, n.id)])
        .unwrap();
    pod.exec("ip", &["link", "set", "eth0", "mtu", "1450", "up"])
        .unwrap();
    pod_ipv6(&pod, ip, &mac(3, n.id));
    let dp = std::thread::scope(|s| {
        s.spawn(|| {
            let _in = n.ns.enter().unwrap();
            let mut dp = Datapath::load(n.pins.path()).unwrap();
            dp.attach_endpoint("lxc1").unwrap();
            dp
        })
        .join()
        .unwrap()
    });
    (pod, dp)
}

fn ifindex(n: &Node, dev: &str) -> u32 {
    e2e::topo::ifindex(&n.ns, dev).unwrap()
}

fn backend(ip: IpAddr, cluster: &str) -> MergedBackend {
    MergedBackend {
        ip,
        cluster: cluster.parse().unwrap(),
        state: BackendState::Ready,
    }
}

fn web(backends: Vec<MergedBackend>) -> MergedService {
    MergedService {
        frontends: vec![FE.into()],
        ports: vec![(Protocol::Tcp, 80, PORT), (Protocol::Udp, 80, PORT)],
        affinity: Affinity::None,
        backends,
    }
}

/// `n` TCP and `n` UDP requests to the frontend from `pod`: answers per
/// responder name, errors under "error".
fn ask_both(pod: &NetNs, n: usize) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let to = SocketAddr::from((FE, 80));
    let t = Duration::from_secs(1);
    in_pod(pod, || {
        let mut tcp = BTreeMap::new();
        let mut udp = BTreeMap::new();
        for _ in 0..n {
            let k = ask_tcp(to, t).unwrap_or_else(|e| format!("error: {e}"));
            *tcp.entry(k).or_insert(0) += 1;
            let k = ask_udp(to, t).unwrap_or_else(|e| format!("error: {e}"));
            *udp.entry(k).or_insert(0) += 1;
        }
        (tcp, udp)
    })
}

#[test]
fn ipv6_frontends_are_balanced_translated_back_and_closed() {
    require_root!();
    sweep_stale();
    let a = Node::new(1).unwrap();
    let b = Node::new(2).unwrap();
    let (ula, ulb) = underlay(&a, &b).unwrap();
    let mut dpa = a.datapath(true).unwrap();
    let mut dpb = b.datapath(true).unwrap();
    a.connect(&mut dpa, &b, ulb).unwrap();
    b.connect(&mut dpb, &a, ula).unwrap();
    for n in [&a, &b] {
        enable_ipv6(&n.ns, "lxc0");
        pod_ipv6(&n.pod, pod6(n.id, 2), &mac(1, n.id));
    }
    let (a2, _dpa2) = second_pod(&a, pod6(1, 3));
    // The local endpoints, and each other's pods through the tunnel.
    let ep = |n: &Node, dev: &str, m: u8| EndpointInfo {
        ifindex: ifindex(n, dev),
        identity: n.identity,
        mac: mac_bytes(m + 1, n.id),
        host_mac: mac_bytes(m, n.id),
    };
    dpa.upsert_endpoint6(pod6(1, 2), ep(&a, "lxc0", 1)).unwrap();
    dpa.upsert_endpoint6(pod6(1, 3), ep(&a, "lxc1", 3)).unwrap();
    dpb.upsert_endpoint6(pod6(2, 2), ep(&b, "lxc0", 1)).unwrap();
    let via = |n: &Node, ul: std::net::Ipv4Addr| IpCacheValue {
        identity: n.identity,
        tunnel_endpoint: u32::from(ul).to_be(),
        cluster_id: n.id,
        ..Default::default()
    };
    dpa.upsert_ipcache6(pod6(2, 2), 128, via(&b, ulb)).unwrap();
    dpb.upsert_ipcache6(pod6(1, 2), 128, via(&a, ula)).unwrap();
    dpb.upsert_ipcache6(pod6(1, 3), 128, via(&a, ula)).unwrap();
    let _responders = [
        Responder::start_on(&a.pod, "a", Ipv6Addr::UNSPECIFIED.into(), PORT),
        Responder::start_on(&a2, "a2", Ipv6Addr::UNSPECIFIED.into(), PORT),
        Responder::start_on(&b.pod, "b", Ipv6Addr::UNSPECIFIED.into(), PORT),
    ];
    // Control: the pods reach each other over IPv6 directly.
    let direct = in_pod(&a.pod, || {
        ask_tcp(SocketAddr::from((pod6(2, 2), PORT)), Duration::from_secs(2))
    });
    assert_eq!(direct.unwrap(), "b", "IPv6 pod to pod");

    // Node A owns the frontend address (as a host-based proxy would) and
    // answers pod A directly.
    a.ns.exec(
        "ip",
        &["-6", "addr", "add", &format!("{FE}/128"), "dev", "lo"],
    )
    .unwrap();
    let pa = pod6(1, 2).to_string();
    a.ns.exec("ip", &["-6", "route", "add", &pa, "dev", "lxc0"])
        .unwrap();
    a.ns.exec(
        "ip",
        &[
            "-6",
            "neigh",
            "replace",
            &pa,
            "lladdr",
            &mac(2, 1),
            "dev",
            "lxc0",
            "nud",
            "permanent",
        ],
    )
    .unwrap();
    // The node's fragmented answers must fit the pod's MTU (1450).
    a.ns.exec("ip", &["link", "set", "lxc0", "mtu", "1450"])
        .unwrap();
    let ping = |size: &str| {
        run(
            a.pod.name(),
            &[
                "ping",
                "-6",
                "-c",
                "3",
                "-i",
                "0.1",
                "-W",
                "1",
                "-s",
                size,
                &FE.to_string(),
            ],
        )
    };
    let (plain_open, frag_open) = (ping("56"), ping("3000"));
    assert_eq!(
        (received(&plain_open), received(&frag_open)),
        (3, 3),
        "control: the node answers its address before it is a frontend: {plain_open} {frag_open}"
    );

    let policy = || LbPolicy {
        local_cluster: "c1".parse().unwrap(),
        failover_threshold: 0.5,
    };
    let mut sa = ServiceMap::open(a.pins.path(), policy()).unwrap();
    let mut sb = ServiceMap::open(b.pins.path(), policy()).unwrap();
    let key = "default/web".to_owned();
    // Three IPv6 backends and an IPv4 one (which an IPv6 frontend never
    // gets).
    let svc = web(vec![
        backend(pod6(1, 2).into(), "c1"),
        backend(pod6(1, 3).into(), "c1"),
        backend(pod6(2, 2).into(), "c2"),
        backend(b.pod_ip.into(), "c2"),
    ]);
    sa.update(&key, &svc).unwrap();
    sb.update(&key, &svc).unwrap();
    let sel = dpa.lb6_selectable(FE, 80, IPPROTO_TCP).unwrap().unwrap();
    let want: Vec<(Ipv6Addr, u16)> = [pod6(1, 2), pod6(1, 3), pod6(2, 2)]
        .into_iter()
        .map(|ip| (ip, PORT))
        .collect();
    assert_eq!(sel, want, "CM_LB6_SERVICES slots");
    assert_eq!(dpa.lb6_allowed(FE, 80, IPPROTO_TCP).unwrap().len(), 3);
    assert_eq!(dpa.lb6_frontends().unwrap(), vec![(FE, 2)]);

    balanced(&a, &b, &a2);
    closed(&a, &dpa, &ping);

    // (3) Only an IPv4 backend left: the IPv6 frontend has none.
    let nb0 = drops(&dpa, Verdict::DropNoServiceBackend);
    sa.update(&key, &web(vec![backend(b.pod_ip.into(), "c2")]))
        .unwrap();
    assert_eq!(
        dpa.lb6_selectable(FE, 80, IPPROTO_TCP).unwrap(),
        Some(vec![])
    );
    let (tcp, udp) = ask_both(&a.pod, 2);
    let nb = drops(&dpa, Verdict::DropNoServiceBackend) - nb0;
    eprintln!("no IPv6 backend: TCP {tcp:?}, UDP {udp:?}, drop_no_service_backend +{nb}");
    assert!(tcp.keys().all(|k| k.starts_with("error")), "{tcp:?}");
    assert!(udp.keys().all(|k| k.starts_with("error")), "{udp:?}");
    assert!(nb >= 4, "drop_no_service_backend +{nb}");

    // (4) Deleted: no longer a frontend, the node answers its address.
    sa.delete(&key).unwrap();
    assert_eq!(dpa.lb6_frontends().unwrap(), vec![]);
    assert_eq!(dpa.lb6_selectable(FE, 80, IPPROTO_TCP).unwrap(), None);
    let open = ping("56");
    assert_eq!(received(&open), 3, "after delete: {open}");
    sb.delete(&key).unwrap();
}

/// (1) From A's pod (backends a, a2, b: never a) and B's pod (never b),
/// over TCP and UDP, every request answered from the frontend.
fn balanced(a: &Node, b: &Node, a2: &NetNs) {
    for (client, me, others) in [(&a.pod, "a", ["a2", "b"]), (&b.pod, "b", ["a", "a2"])] {
        let (tcp, udp) = ask_both(client, 30);
        eprintln!("client {me}: TCP {tcp:?}, UDP {udp:?}");
        for (what, m) in [("TCP", &tcp), ("UDP", &udp)] {
            assert_eq!(
                m.values().sum::<usize>(),
                m.iter()
                    .filter(|(k, _)| others.contains(&k.as_str()))
                    .map(|(_, v)| v)
                    .sum::<usize>(),
                "client {me} {what}: only {others:?} answer: {m:?}"
            );
            for o in others {
                assert!(
                    m.contains_key(o),
                    "client {me} {what}: {o} never chosen: {m:?}"
                );
            }
        }
    }
    // And a2 as the client (a local backend's reply delivered from lxc0).
    let (tcp, udp) = ask_both(a2, 10);
    eprintln!("client a2: TCP {tcp:?}, UDP {udp:?}");
    for m in [&tcp, &udp] {
        assert!(m.keys().all(|k| k == "a" || k == "b"), "{m:?}");
    }
}

/// (2) ICMPv6, fragments, a destination options header and a port that
/// is no frontend: dropped at the pod's veth, counted.
fn closed(a: &Node, dpa: &Datapath, ping: &dyn Fn(&str) -> String) {
    let (proto0, frag0) = (
        drops(dpa, Verdict::DropServiceProtocol),
        drops(dpa, Verdict::DropFragment),
    );
    let plain = ping("56");
    let proto1 = drops(dpa, Verdict::DropServiceProtocol);
    let frag = ping("3000");
    let frag1 = drops(dpa, Verdict::DropFragment);
    // UDP to port 80 behind a Destination Options header (next header 60),
    // three frames written raw: the load-balancer does not walk extension
    // headers, so it refuses them.
    let frame = format!(
        "import socket,struct\n\
         s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
         s.bind(('eth0',0))\n\
         src=socket.inet_pton(socket.AF_INET6,'{src}')\n\
         dst=socket.inet_pton(socket.AF_INET6,'{FE}')\n\
         udp=struct.pack('!HHHH',40000,80,11,0)+b'who'\n\
         pl=bytes([17,0,1,4,0,0,0,0])+udp\n\
         ip=struct.pack('!IHBB',0x60000000,len(pl),60,64)+src+dst\n\
         f=bytes.fromhex('{gw}')+bytes.fromhex('{me}')+b'\\x86\\xdd'+ip+pl\n\
         for _ in range(3): s.send(f)\n",
        src = pod6(1, 2),
        gw = mac(1, 1).replace(':', ""),
        me = mac(2, 1).replace(':', ""),
    );
    let _ = run(a.pod.name(), &["python3", "-c", &frame]);
    let proto2 = drops(dpa, Verdict::DropServiceProtocol);
    // A TCP port of the address that is no frontend.
    let refused = in_pod(&a.pod, || {
        std::net::TcpStream::connect_timeout(
            &SocketAddr::from((FE, 22)),
            Duration::from_millis(500),
        )
        .is_err()
    });
    let port = drops(dpa, Verdict::DropServiceProtocol) - proto2;
    eprintln!(
        "frontend {FE}: ICMPv6 {}/3 answered (drop_service_protocol +{}), 3000-byte {}/3 (drop_fragment +{}), destination options drop_service_protocol +{}, TCP port 22 drop_service_protocol +{port}",
        received(&plain),
        proto1 - proto0,
        received(&frag),
        frag1 - frag0,
        proto2 - proto1,
    );
    assert_eq!((received(&plain), received(&frag)), (0, 0));
    assert!(proto1 - proto0 >= 3, "ICMPv6");
    // 3000 bytes at MTU 1450: three fragments per echo request.
    assert!(frag1 - frag0 >= 9, "drop_fragment +{}", frag1 - frag0);
    assert_eq!(proto2 - proto1, 3, "destination options");
    assert!(refused && port >= 1, "SYN to a port that is no frontend");
}
