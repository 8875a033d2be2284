//! Privileged: the tunnel-ebpf `from_endpoint` program, built by node-agent's
//! build.rs, is loaded and attached (TCX ingress) to the host side of a pod's
//! veth in real network namespaces, and real packets move its counters.
#![allow(clippy::unwrap_used)]

use clustermesh_testkit::netns::{NetNs, PinDir, sweep_stale, veth_pair};
use e2e::require_root;
use node_agent::datapath::Datapath;
use tunnel_common::{Direction, Verdict};

#[test]
fn from_endpoint_counts_real_packets() {
    require_root!();
    sweep_stale();
    let host = NetNs::new("host").unwrap();
    let pod = NetNs::new("pod").unwrap();
    // Addresses live only inside the two namespaces.
    veth_pair(&host, "lxc0", "192.0.2.1/24", &pod, "eth0", "192.0.2.2/24").unwrap();

    let pins = PinDir::new("attach").unwrap();
    // Attach from a dedicated thread that enters the host namespace.
    let prog = std::thread::scope(|s| {
        s.spawn(|| {
            let _in = host.enter().unwrap();
            let mut dp = Datapath::load(pins.path())?;
            dp.attach_endpoint("lxc0")?;
            Ok::<_, node_agent::datapath::Error>(dp)
        })
        .join()
        .unwrap()
    })
    .unwrap();

    let before = prog.counter(Direction::Egress, Verdict::Pass).unwrap();
    assert_eq!(before.packets, 0, "a fresh program has counted nothing");

    const PINGS: u64 = 5;
    let out = pod
        .exec(
            "ping",
            &[
                "-c",
                &PINGS.to_string(),
                "-i",
                "0.01",
                "-W",
                "2",
                "-s",
                "100",
                "192.0.2.1",
            ],
        )
        .unwrap();
    assert!(out.contains(&format!("{PINGS} received")), "{out}");

    let after = prog.counter(Direction::Egress, Verdict::Pass).unwrap();
    // Every echo request (plus any ARP) left the pod through the program.
    assert!(after.packets >= PINGS, "counted {after:?}");
    // 100 bytes payload + 8 ICMP + 20 IP + 14 Ethernet per echo request.
    assert!(after.bytes >= PINGS * 142, "counted {after:?}");
    // The datapath is not configured (no tunnel mode): nothing was dropped
    // or redirected, everything went to the host stack.
    for (dir, v, c) in prog.counters().unwrap() {
        assert!(
            dir == Direction::Egress && v == Verdict::Pass,
            "unexpected counter {dir:?}/{v:?}: {c:?}"
        );
    }

    // Replies travel the other way (pod ingress): not counted by from_endpoint.
    let host_out = host
        .exec("ping", &["-c", "2", "-i", "0.01", "192.0.2.2"])
        .unwrap();
    assert!(host_out.contains("2 received"), "{host_out}");
    let later = prog.counter(Direction::Egress, Verdict::Pass).unwrap();
    // The pod's two echo replies pass the program; host's requests do not.
    assert!(later.packets >= after.packets + 2);
}

/// Issue 20: `--ipcache-max-entries` sizes `CM_IPCACHE` and `CM_IPCACHE6`;
/// the kernel holds exactly that many entries; a restart configured with
/// another size adopts the pinned map with its size and contents (aya
/// would refuse the pin otherwise) and reports the size that holds.
#[test]
fn the_ipcache_size_is_configured_and_a_pinned_map_keeps_its_size() {
    use node_agent::datapath::MapSizes;
    use tunnel_common::IpCacheValue;
    require_root!();
    sweep_stale();
    let pins = PinDir::new("mapsize").unwrap();
    let mut dp = Datapath::load_with(pins.path(), &MapSizes { ipcache: 128 }).unwrap();
    assert_eq!(dp.ipcache_capacity().unwrap(), (128, 128));
    let v = IpCacheValue {
        identity: 7,
        ..Default::default()
    };
    for i in 0..128u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        dp.upsert_ipcache(ip, 32, v).unwrap();
    }
    let over = dp.upsert_ipcache("10.1.0.0".parse().unwrap(), 32, v);
    assert!(over.is_err(), "the kernel refuses entry 129");
    drop(dp);
    // Restarted with a larger size: the pinned map, its size and contents
    // stay.
    let mut dp = Datapath::load_with(pins.path(), &MapSizes { ipcache: 4096 }).unwrap();
    assert_eq!(dp.ipcache_capacity().unwrap(), (128, 128));
    assert_eq!(
        dp.lookup("10.0.0.5".parse().unwrap())
            .unwrap()
            .map(|v| v.identity),
        Some(7)
    );
    drop(dp);
    let dp = Datapath::load(pins.path()).unwrap();
    assert_eq!(dp.ipcache_capacity().unwrap().0, 128);
}
