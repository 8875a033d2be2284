//! Privileged: the whole product on two nodes of two clusters, and node A's
//! agent killed with SIGKILL and started again while A's pod pings B's pod
//! every 10 ms.
//!
//! Each cluster is a real etcd with a real clustermesh-apiserver; each node
//! a namespace with its pod attached by the real CNI plugin binary (as a
//! container runtime calls it) and the real node-agent binary, which picks
//! the pod up from the endpoint directory, registers it (the apiserver
//! allocates its identity), watches both clusters and programs its pinned
//! maps; pods talk over eBPF Geneve.
//!
//! Proves: zero lost pings across the kill and restart (the TCX links and
//! maps are pinned, so traffic does not depend on the agent process); the
//! restarted agent adopts every pinned link (atomic program swap, one
//! program per hook); and once it has resynced, the maps equal what they
//! were, i.e. the desired state, entry for entry.
#![allow(clippy::unwrap_used)]

use std::{net::Ipv4Addr, time::Duration};

use clustermesh_api::EncryptionPolicy;
use clustermesh_testkit::ping::Ping;
use e2e::{
    product::{Mesh, until},
    require_root,
};
use node_agent::datapath::Datapath;
use tunnel_common::{Direction, Verdict};

#[test]
fn agent_killed_and_restarted_under_ping_loses_nothing_and_maps_stay_desired() {
    require_root!();
    let m = Mesh::new(EncryptionPolicy::default());
    let (a, b) = (&m.a, &m.b);
    let ((etcd_a, api_a), (etcd_b, api_b)) = (m.cluster_of(a), m.cluster_of(b));
    let (mut agent_b, _) = b.start_agent(&etcd_b, &api_b);
    let (mut agent_a, how) = a.start_agent(&etcd_a, &api_a);
    assert!(how.iter().all(|l| l.ends_with("(New)")), "{how:?}");

    // Meshed: A's pod reaches B's pod.
    let synced = Mesh::synced;
    until("both agents synced", Duration::from_secs(30), || {
        synced(a) && synced(b)
    });
    until("A's pod reaches B's pod", Duration::from_secs(30), || {
        a.pod
            .exec("ping", &["-c", "1", "-W", "1", &b.pod_ip.to_string()])
            .is_ok()
    });
    let mut dpa = a.datapath();
    // Converged: both pods (with identities) in A's ip-cache.
    let has_pod = |entries: &[(Ipv4Addr, u8, tunnel_common::IpCacheValue)], pod: Ipv4Addr| {
        entries
            .iter()
            .any(|(ip, len, v)| *ip == pod && *len == 32 && v.identity != 0)
    };
    until(
        "A's ip-cache holds both pods",
        Duration::from_secs(30),
        || {
            let e = dpa.ipcache_entries().unwrap();
            has_pod(&e, a.pod_ip) && has_pod(&e, b.pod_ip)
        },
    );
    let desired = (
        dpa.ipcache_entries().unwrap(),
        dpa.endpoint_entries().unwrap(),
    );
    assert_eq!(desired.1.len(), 1, "A's pod in A's endpoint map");

    const PINGS: u32 = 400; // 4 s at 10 ms
    let ping = Ping::start(&a.pod, &b.pod_ip.to_string(), PINGS, "0.01").unwrap();
    let tunnelled = |dp: &Datapath| {
        dp.counter(Direction::Egress, Verdict::Tunnel)
            .unwrap()
            .packets
    };
    let wait_more = |dp: &Datapath, n: u64, what: &str| {
        let start = tunnelled(dp);
        until(what, Duration::from_secs(10), || tunnelled(dp) >= start + n);
    };
    wait_more(&dpa, 50, "traffic before the kill");

    // SIGKILL: no cleanup of any kind.
    agent_a.kill().unwrap();
    agent_a.wait().unwrap();
    wait_more(&dpa, 50, "traffic while the agent is dead");

    let (mut agent_a, how) = a.start_agent(&etcd_a, &api_a);
    assert!(
        how.iter().all(|l| l.ends_with("(Adopted)")),
        "restart must adopt the pinned links: {how:?}"
    );
    until("A resynced", Duration::from_secs(30), || synced(a));
    wait_more(&dpa, 50, "traffic after the restart");

    let sum = ping.finish().unwrap();
    eprintln!("agent kill -9 + restart under 10 ms ping: {sum:?}");
    assert_eq!(
        (sum.sent, sum.received),
        (PINGS, PINGS),
        "lost pings across the agent restart"
    );
    // Exactly one program per hook: adoption swapped, it did not add.
    let pod_iface = std::fs::read_dir(a.endpoints())
        .unwrap()
        .filter_map(Result::ok)
        .find_map(|e| {
            let f: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            f["host_iface"].as_str().map(str::to_owned)
        })
        .unwrap();
    assert_eq!(a.programs_on(&pod_iface), vec!["from_endpoint".to_owned()]);
    assert_eq!(a.programs_on("cm_vxlan"), vec!["from_overlay".to_owned()]);
    assert_eq!(a.programs_on("ul0"), vec!["from_underlay".to_owned()]);
    // The maps equal the desired state, entry for entry.
    let after = (
        dpa.ipcache_entries().unwrap(),
        dpa.endpoint_entries().unwrap(),
    );
    assert_eq!(
        after, desired,
        "maps after the restart differ from the desired state"
    );

    for c in [&mut agent_a, &mut agent_b] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}
