//! Privileged: a pod is untrusted (issue 16). Two nodes of two clusters on
//! one underlay link (VXLAN), a pod on each, as `topo` wires them; pod A
//! then attacks, each step with a control that shows the attack would
//! otherwise work:
//!
//! (1) spoofing: a second address in A's pod (no endpoint) and a local
//!     endpoint bound to another interface, used as sources: B's pod sees
//!     none of them, `drop_spoofed` counts them; its own address still
//!     works;
//! (2) IPv6 to the node from an address the pod was not given (no
//!     `CM_ENDPOINTS6` entry; the node answers it with the datapath
//!     unconfigured): not answered, counted `drop_spoofed`; frames that are
//!     neither IPv4, IPv6 nor ARP: counted `drop_unsupported_l3`;
//! (3) a service frontend address the node also owns: plain ICMP (answered
//!     before the frontend is written), ICMP fragments and a port that is
//!     no frontend never reach the node (`drop_service_protocol`,
//!     `drop_fragment`);
//! (4) strict mode, node with ip_forward=1 and a default route out of the
//!     underlay: a packet to an unknown address inside a strict range is
//!     seen on the underlay with strict off, and never with strict on
//!     (`drop_strict_unknown_dest`), also for an ip-cache entry without a
//!     tunnel endpoint;
//! (5) a restarted agent's datapath-config reconciler keeps both pinned
//!     strict flags until it reads the policy.
//!
//! Against the `from_endpoint` before issue 16's checks, step (1) fails:
//! B's pod received 5 of 5 echo requests from each spoofed source.
#![allow(clippy::unwrap_used)]

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use clustermesh_api::{Affinity, BackendState, Protocol, status::EncryptionStatus};
use clustermesh_testkit::{capture::Capture, netns::sweep_stale};
use e2e::{
    require_root,
    topo::{Node, ifindex, ping, underlay},
};
use node_agent::{
    audit::Audit,
    datapath::Datapath,
    desired::{MergedBackend, MergedService},
    reconcilers::{
        Reconciler as _,
        datapath_config::DatapathConfigMap,
        services::{LbPolicy, ServiceMap},
        strict_ranges::StrictRangeMap,
    },
};
use tunnel_common::{
    CONFIG_FLAG_STRICT, CONFIG_FLAG_STRICT_INGRESS, DatapathConfig, Direction, EndpointInfo,
    IpCacheValue, Verdict,
};

fn drops(dp: &Datapath, v: Verdict) -> u64 {
    dp.counter(Direction::Egress, v).unwrap().packets
}

fn received(out: &str) -> u32 {
    out.split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `args` in `ns`'s pod, whatever its exit status; stdout.
fn run(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_pod_cannot_spoof_leak_ipv6_hit_the_host_through_a_frontend_or_escape_strict_mode() {
    require_root!();
    sweep_stale();
    let a = Node::new(1).unwrap();
    let b = Node::new(2).unwrap();
    let (ula, ulb) = underlay(&a, &b).unwrap();
    let mut dpa = a.datapath(true).unwrap();
    let mut dpb = b.datapath(true).unwrap();
    a.connect(&mut dpa, &b, ulb).unwrap();
    b.connect(&mut dpb, &a, ula).unwrap();
    let out = ping(&a.pod, b.pod_ip, 3, "0.1");
    assert_eq!(received(&out), 3, "baseline: {out}");

    spoofing(&a, &b, &mut dpa);
    ipv6(&a, &mut dpa);
    frontends(&a, &b, &dpa);
    strict(&a, &b, &mut dpa);
    restart_keeps_strict_flags(&a, &mut dpa);
}

/// (1) Spoofed sources never leave A; A's own address does.
fn spoofing(a: &Node, b: &Node, dpa: &mut Datapath) {
    // Another local endpoint, bound to another interface (the VXLAN
    // device stands in for a second pod's veth).
    let other: Ipv4Addr = "10.1.0.3".parse().unwrap();
    dpa.upsert_endpoint(
        other,
        EndpointInfo {
            ifindex: ifindex(&a.ns, "cm_vxlan").unwrap(),
            identity: a.identity + 1,
            mac: [2, 0, 0, 0, 0, 3],
            host_mac: [2, 0, 0, 0, 0, 4],
        },
    )
    .unwrap();
    a.pod
        .exec("ip", &["addr", "add", "10.1.0.99/32", "dev", "eth0"])
        .unwrap();
    a.pod
        .exec("ip", &["addr", "add", "10.1.0.3/32", "dev", "eth0"])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cap = Capture::start(&b.pod, "eth0", &dir.path().join("podb.pcap")).unwrap();
    let before = drops(dpa, Verdict::DropSpoofed);
    const N: u32 = 5;
    let dst = b.pod_ip.to_string();
    for src in ["10.1.0.99", "10.1.0.3"] {
        let out = run(
            a.pod.name(),
            &[
                "ping",
                "-c",
                &N.to_string(),
                "-i",
                "0.05",
                "-W",
                "1",
                "-I",
                src,
                &dst,
            ],
        );
        assert_eq!(received(&out), 0, "spoofed as {src}: {out}");
    }
    // Control: the pod's own address still goes through.
    let own = run(
        a.pod.name(),
        &[
            "ping",
            "-c",
            "3",
            "-i",
            "0.05",
            "-W",
            "1",
            "-I",
            &a.pod_ip.to_string(),
            &dst,
        ],
    );
    let spoofed = drops(dpa, Verdict::DropSpoofed) - before;
    let seen = cap.stop_and_read(&[], &["ip.src"]).unwrap();
    let from = |ip: &str| seen.lines().filter(|l| l.trim() == ip).count();
    eprintln!(
        "spoofing: drop_spoofed +{spoofed}; B's pod saw {} from 10.1.0.99, {} from 10.1.0.3, {} from {} (own address, {} of 3 answered)",
        from("10.1.0.99"),
        from("10.1.0.3"),
        from(&a.pod_ip.to_string()),
        a.pod_ip,
        received(&own)
    );
    assert_eq!(received(&own), 3, "own address: {own}");
    assert!(
        from(&a.pod_ip.to_string()) >= 3,
        "the capture works: {seen}"
    );
    assert_eq!((from("10.1.0.99"), from("10.1.0.3")), (0, 0), "{seen}");
    assert!(spoofed >= u64::from(2 * N), "drop_spoofed +{spoofed}");
    for ip in ["10.1.0.99/32", "10.1.0.3/32"] {
        a.pod
            .exec("ip", &["addr", "del", ip, "dev", "eth0"])
            .unwrap();
    }
    dpa.remove_endpoint(other).unwrap();
}

/// (2) IPv6 from an address the pod does not own never reaches the node's
/// stack, nor does a frame of another layer 3 protocol.
fn ipv6(a: &Node, dpa: &mut Datapath) {
    for (ns, dev, addr) in [
        (&a.pod, "eth0", "fd00:1::2/64"),
        (&a.ns, "lxc0", "fd00:1::1/64"),
    ] {
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=0"])
            .unwrap();
        ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=0")],
        )
        .unwrap();
        ns.exec("ip", &["-6", "addr", "add", addr, "dev", dev, "nodad"])
            .unwrap();
    }
    let ping6 = || {
        run(
            a.pod.name(),
            &["ping", "-6", "-c", "3", "-i", "0.1", "-W", "1", "fd00:1::1"],
        )
    };
    // Control: with the datapath unconfigured (mode none: everything goes
    // to the host stack), the node answers.
    let cfg = dpa.config().unwrap();
    dpa.set_config(DatapathConfig::default()).unwrap();
    let open = ping6();
    dpa.set_config(cfg).unwrap();
    a.ns.exec("ip", &["-6", "neigh", "flush", "dev", "lxc0"])
        .unwrap();
    // The node's neighbour entry is permanent in the pod (as the IPv4
    // gateway's is): the echo requests themselves leave the pod.
    let lladdr = e2e::topo::mac(1, a.id);
    a.pod
        .exec(
            "ip",
            &[
                "-6",
                "neigh",
                "replace",
                "fd00:1::1",
                "lladdr",
                &lladdr,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )
        .unwrap();
    let before = drops(dpa, Verdict::DropSpoofed);
    let closed = ping6();
    let counted = drops(dpa, Verdict::DropSpoofed) - before;
    // Three raw frames of an experimental ethertype (0x88b5).
    let l3_before = drops(dpa, Verdict::DropUnsupportedL3);
    let _ = run(
        a.pod.name(),
        &[
            "python3",
            "-c",
            "import socket\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind(('eth0',0))\nf=b'\\xff'*6+b'\\x02\\x00\\x00\\x00\\x00\\x09'+b'\\x88\\xb5'+b'x'*46\nfor _ in range(3): s.send(f)",
        ],
    );
    let l3 = drops(dpa, Verdict::DropUnsupportedL3) - l3_before;
    eprintln!(
        "ipv6: unconfigured datapath {} of 3 answered; configured {} of 3, drop_spoofed +{counted}; ethertype 0x88b5 drop_unsupported_l3 +{l3}",
        received(&open),
        received(&closed)
    );
    assert_eq!(received(&open), 3, "control: {open}");
    assert_eq!(received(&closed), 0, "{closed}");
    assert!(counted >= 3, "drop_spoofed +{counted}");
    assert_eq!(l3, 3, "drop_unsupported_l3 +{l3}");
}

/// (3) A frontend address: only its TCP/UDP frontends pass.
fn frontends(a: &Node, b: &Node, dpa: &Datapath) {
    const FE: &str = "10.96.0.10";
    // The node owns the address (as a host-based proxy would): anything
    // handed to its stack is answered.
    a.ns.exec("ip", &["addr", "add", &format!("{FE}/32"), "dev", "lo"])
        .unwrap();
    // The node answers the pod through the pod's veth (resolving the
    // pod's address by ARP: the pod's ARP reply is about its own address
    // and passes).
    let pod = format!("{}/32", a.pod_ip);
    a.ns.exec("ip", &["route", "add", &pod, "dev", "lxc0"])
        .unwrap();
    // The node's fragmented answers must fit the pod's MTU (1450).
    a.ns.exec("ip", &["link", "set", "lxc0", "mtu", "1450"])
        .unwrap();
    let icmp = |size: &str| {
        run(
            a.pod.name(),
            &["ping", "-c", "3", "-i", "0.1", "-W", "1", "-s", size, FE],
        )
    };
    let (plain_open, frag_open) = (icmp("56"), icmp("3000"));
    let mut svc = ServiceMap::open(
        a.pins.path(),
        LbPolicy {
            local_cluster: "c1".parse().unwrap(),
            failover_threshold: 0.5,
        },
    )
    .unwrap();
    svc.update(
        &"default/web".to_owned(),
        &MergedService {
            frontends: vec![FE.parse().unwrap()],
            ports: vec![(Protocol::Tcp, 80, 5201)],
            affinity: Affinity::None,
            backends: vec![MergedBackend {
                ip: b.pod_ip.into(),
                cluster: "c2".parse().unwrap(),
                state: BackendState::Ready,
            }],
        },
    )
    .unwrap();
    let (proto0, frag0) = (
        drops(dpa, Verdict::DropServiceProtocol),
        drops(dpa, Verdict::DropFragment),
    );
    let plain = icmp("56");
    let proto1 = drops(dpa, Verdict::DropServiceProtocol);
    let frag = icmp("3000");
    let frag1 = drops(dpa, Verdict::DropFragment);
    // A TCP port of the address that is no frontend.
    let _ = run(
        a.pod.name(),
        &[
            "python3",
            "-c",
            &format!(
                "import socket\ntry: socket.create_connection(('{FE}',22),timeout=1)\nexcept Exception: pass"
            ),
        ],
    );
    let port = drops(dpa, Verdict::DropServiceProtocol) - proto1;
    eprintln!(
        "frontend {FE}: before the service ICMP {}/3 and 3000-byte ICMP {}/3 answered by the node; as a frontend ICMP {}/3 (drop_service_protocol +{}), fragmented {}/3 (drop_fragment +{}), TCP port 22 drop_service_protocol +{port}",
        received(&plain_open),
        received(&frag_open),
        received(&plain),
        proto1 - proto0,
        received(&frag),
        frag1 - frag0,
    );
    assert_eq!(
        (received(&plain_open), received(&frag_open)),
        (3, 3),
        "control"
    );
    assert_eq!((received(&plain), received(&frag)), (0, 0));
    assert!(proto1 - proto0 >= 3);
    // 3000 bytes at MTU 1450: three fragments per echo request.
    assert!(frag1 - frag0 >= 6, "drop_fragment +{}", frag1 - frag0);
    assert!(port >= 1, "SYN to a port that is no frontend");
    svc.delete(&"default/web".to_owned()).unwrap();
}

/// (4) Strict mode never hands a mesh pod range to the host's default route.
fn strict(a: &Node, b: &Node, dpa: &mut Datapath) {
    for kv in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.lxc0.rp_filter=0",
    ] {
        a.ns.exec("sysctl", &["-qw", kv]).unwrap();
    }
    a.ns.exec(
        "ip",
        &["route", "add", "default", "via", "192.0.2.2", "dev", "ul0"],
    )
    .unwrap();
    let mut ranges = StrictRangeMap::open(a.pins.path()).unwrap();
    ranges.update(&"10.0.0.0/8".parse().unwrap(), &()).unwrap();
    // An ip-cache entry without a tunnel endpoint (e.g. a range whose node
    // is not known) inside the strict range.
    dpa.upsert_ipcache("10.9.8.0".parse().unwrap(), 24, IpCacheValue::default())
        .unwrap();
    let cfg = dpa.config().unwrap();
    let send = || {
        for dst in ["10.9.9.9", "10.9.8.7"] {
            let _ = run(
                a.pod.name(),
                &["ping", "-c", "3", "-i", "0.05", "-W", "1", dst],
            );
        }
    };
    let leaked = |pcap: &str| {
        let cap = Capture::start(&b.ns, "ul0", std::path::Path::new(pcap)).unwrap();
        send();
        let seen = cap.stop_and_read(&[], &["ip.dst"]).unwrap();
        seen.lines()
            .filter(|l| l.trim() == "10.9.9.9" || l.trim() == "10.9.8.7")
            .count()
    };
    let dir = tempfile::tempdir().unwrap();
    // Control: strict off, the packets take the node's default route.
    let open = leaked(dir.path().join("open.pcap").to_str().unwrap());
    dpa.set_config(DatapathConfig {
        flags: CONFIG_FLAG_STRICT,
        ..cfg
    })
    .unwrap();
    let before = drops(dpa, Verdict::DropStrictUnknownDest);
    let closed = leaked(dir.path().join("closed.pcap").to_str().unwrap());
    let counted = drops(dpa, Verdict::DropStrictUnknownDest) - before;
    // The mesh itself still works in strict mode (no encryption marked).
    let out = ping(&a.pod, b.pod_ip, 3, "0.1");
    eprintln!(
        "strict: on the underlay with strict off {open} packets to 10.9.9.9/10.9.8.7, with strict on {closed} (drop_strict_unknown_dest +{counted}); pod to pod {}/3",
        received(&out)
    );
    assert!(open >= 6, "control: the leak path exists ({open})");
    assert_eq!(closed, 0);
    assert!(counted >= 6, "drop_strict_unknown_dest +{counted}");
    assert_eq!(received(&out), 3, "{out}");
    dpa.set_config(cfg).unwrap();
}

/// (5) The reconciler a restarted agent opens keeps the pinned strict flags.
fn restart_keeps_strict_flags(a: &Node, dpa: &mut Datapath) {
    let cfg = dpa.config().unwrap();
    let both = CONFIG_FLAG_STRICT | CONFIG_FLAG_STRICT_INGRESS;
    dpa.set_config(DatapathConfig { flags: both, ..cfg })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let status = Arc::new(Mutex::new(EncryptionStatus::default()));
    // What node.rs writes before the policy is read with no WireGuard
    // device: no strict flag of its own.
    let base = DatapathConfig { flags: 0, ..cfg };
    let mut r = DatapathConfigMap::open(
        a.pins.path(),
        base,
        status,
        Audit::open(&dir.path().join("audit.jsonl"), ("node", "n1")),
    )
    .unwrap();
    let kept = dpa.config().unwrap().flags;
    // Then the policy is read: not strict.
    r.update(&(), &Default::default()).unwrap();
    let after = dpa.config().unwrap().flags;
    eprintln!(
        "restart: pinned flags {both:#x}, written at start {kept:#x}, after a non-strict policy {after:#x}"
    );
    assert_eq!(kept, both);
    assert_eq!(after, 0);
}
