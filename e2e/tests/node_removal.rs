//! Privileged: a remote node is removed from its cluster while a node of
//! another cluster talks to it, end to end through the real control plane:
//! two clusters, each a real etcd with a real clustermesh-apiserver; node
//! A's agent (in process) watches both and programs A's pinned eBPF maps and
//! direct-routing routes (netlink) through its reconcilers.
//!
//! Proves: once node B deregisters, A's route and map entries for B go
//! within one second (the figure is printed), and A's pod traffic to B's
//! pod is then dropped at A with a counted reason (`drop_no_tunnel_endpoint`)
//! instead of being sent into the void. Before that, B's cluster turns
//! hostile and publishes nodes claiming 0.0.0.0/1, A's underlay address, the
//! underlay subnet and loopback: refused with their reasons, A's routing
//! table unchanged and B still reachable (issue 16).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use clustermesh_api::{
    ClusterId,
    proto::{self, cluster_mesh_client::ClusterMeshClient},
};
use clustermesh_testkit::{etcd::EtcdServer, netns::sweep_stale};
use e2e::{
    require_root,
    topo::{Node, ping, underlay},
};
use node_agent::{
    clusters::{Agent, ClustersConfig, Reconcilers, config::ClusterFile},
    desired::TunnelEntry,
    reconcilers::{
        MemoryReconciler, Reconciler as _, ipcache::IpCacheMap, routes::RoutedTunnels,
        tunnels::TunnelMap,
    },
};
use tokio_util::sync::CancellationToken;
use tunnel_common::{Direction, IPCACHE_FLAG_UNREACHABLE, TunnelMode, Verdict};

async fn apiserver(name: &str, id: u64, etcd: &EtcdServer) -> clustermesh_apiserver::Running {
    let mut cfg = clustermesh_apiserver::Config::new(
        name.parse().unwrap(),
        ClusterId::new(id).unwrap(),
        vec![etcd.endpoint()],
    );
    // Plaintext API: this test is about node removal; TLS and authorization
    // are clustermesh-apiserver/tests/authz.rs's and the mesh harness's.
    cfg.insecure_plaintext = true;
    cfg.heartbeat_interval = Duration::from_secs(1);
    clustermesh_apiserver::start(cfg).await.unwrap()
}

async fn register(
    api: &clustermesh_apiserver::Running,
    node: &str,
    cidr: &str,
    underlay: &str,
    pod: &str,
) -> ClusterMeshClient<tonic::transport::Channel> {
    let mut g = ClusterMeshClient::connect(format!("http://{}", api.grpc_addr))
        .await
        .unwrap();
    g.register_node(proto::RegisterNodeRequest {
        node: Some(proto::Node {
            name: node.into(),
            underlay_ips: vec![underlay.into()],
            pod_cidrs: vec![cidr.into()],
            boot_id: "boot-1".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    g.add_endpoint(proto::AddEndpointRequest {
        node: node.into(),
        ip: pod.into(),
        namespace: "default".into(),
        name: format!("pod-{node}"),
        labels: [("k8s:app".to_owned(), "web".to_owned())].into(),
    })
    .await
    .unwrap();
    g
}

/// Polls `cond` every 5 ms for at most 20 s; returns how long it took.
async fn until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_remote_node_is_unreachable_within_a_second_with_counted_drops() {
    require_root!();
    sweep_stale();
    let a = Node::new(1).unwrap();
    let b = Node::new(2).unwrap();
    let (ula, ulb) = underlay(&a, &b).unwrap();

    let (etcd1, etcd2) = (EtcdServer::start().unwrap(), EtcdServer::start().unwrap());
    let api1 = apiserver("c1", 1, &etcd1).await;
    let api2 = apiserver("c2", 2, &etcd2).await;
    register(
        &api1,
        "a1",
        "10.1.0.0/24",
        &ula.to_string(),
        &a.pod_ip.to_string(),
    )
    .await;
    let mut g2 = register(
        &api2,
        "b1",
        "10.2.0.0/24",
        &ulb.to_string(),
        &b.pod_ip.to_string(),
    )
    .await;

    // Node B is programmed by hand (direct routing back to A).
    let mut dpb = b.datapath(true).unwrap();
    b.connect_with(&mut dpb, &a, TunnelMode::Direct, ulb, ula)
        .unwrap();
    let mut back = b.routes().unwrap();
    back.update(
        &"10.1.0.0/24".parse().unwrap(),
        &TunnelEntry {
            node_ip: ula.into(),
            cluster_id: 1,
            node: "a1".parse().unwrap(),
            encrypt: false,
        },
    )
    .unwrap();

    // Node A: datapath configured, remote state from the agent.
    let mut dpa = a.datapath(true).unwrap();
    a.program(&mut dpa, TunnelMode::Direct, ula).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c2"),
        format!("endpoints:\n  - {}\n", etcd2.endpoint()),
    )
    .unwrap();
    let reconcilers = Reconcilers {
        ipcache: Box::new(IpCacheMap::open(a.pins.path()).unwrap()),
        tunnels: Box::new(RoutedTunnels {
            map: TunnelMap::open(a.pins.path()).unwrap(),
            routes: a.routes().unwrap(),
        }),
        peers: Box::new(MemoryReconciler::new("peers")),
        services: Box::new(MemoryReconciler::new("services")),
        policy: Box::new(MemoryReconciler::new("policy")),
        strict_ranges: Box::new(MemoryReconciler::new("strict ranges")),
        network_policies: Box::new(MemoryReconciler::new("network policies")),
        policy_cidrs: Box::new(MemoryReconciler::new("policy CIDRs")),
    };
    let cancel = CancellationToken::new();
    let agent = Agent::new(
        ClustersConfig {
            local_cluster: "c1".parse().unwrap(),
            local: ClusterFile {
                endpoints: vec![etcd1.endpoint()],
                trusted_ca_file: None,
                cert_file: None,
                key_file: None,
                pod_cidrs: Vec::new(),
            },
            self_node: Some("a1".parse().unwrap()),
            clusters_dir: dir.path().to_owned(),
            stale_ttl: Duration::from_secs(300),
            sync_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            strict_ranges: Vec::new(),
        },
        reconcilers,
        cancel.clone(),
    );
    let agent_status = agent.status();
    let running = tokio::spawn(agent.run());

    // The agent learns B: its pod via the tunnel map and routes.
    let routes_of_a = a.routes().unwrap();
    until("A learns B's pod", || {
        dpa.lookup(b.pod_ip)
            .unwrap()
            .is_some_and(|v| v.identity != 0)
            && routes_of_a
                .list()
                .unwrap()
                .contains_key(&"10.2.0.0/24".parse().unwrap())
    })
    .await;
    let out = ping(&a.pod, b.pod_ip, 5, "0.05");
    assert!(out.contains("5 received"), "A -> B before removal: {out}");

    // Issue 16: cluster c2 turns hostile and writes, into its own etcd,
    // nodes claiming 0.0.0.0/1, a /32 on A's underlay address, the
    // underlay subnet and loopback. With direct routing those would become
    // host routes on A: each is refused, and A's routing table is exactly
    // what it was (B's range still routed).
    let table = || {
        a.ns.exec("ip", &["-4", "route", "show", "table", "all"])
            .unwrap()
    };
    let before_hostile = table();
    let mut kv2 = etcd_client::Client::connect([etcd2.endpoint()], None)
        .await
        .unwrap();
    let evil = [
        ("wide", "0.0.0.0/1".to_owned(), "192.0.2.12"),
        ("host", format!("{ula}/32"), "192.0.2.14"),
        (
            "under",
            format!(
                "{}/24",
                std::net::Ipv4Addr::from(u32::from(ula) & 0xffff_ff00)
            ),
            "198.51.100.1",
        ),
        ("loop", "127.0.0.0/8".to_owned(), "192.0.2.13"),
    ];
    for (name, cidr, ip) in &evil {
        kv2.put(
            format!("clustermesh/state/nodes/v1/c2/{name}"),
            format!(
                r#"{{"name":"{name}","cluster":"c2","underlayIps":["{ip}"],"podCidrs":["{cidr}"],"bootId":"e"}}"#
            ),
            None,
        )
        .await
        .unwrap();
    }
    let status = agent_status.clone();
    until("every hostile node of c2 refused", || {
        let s = status.lock().unwrap();
        s.clusters
            .iter()
            .find(|c| c.name == "c2")
            .is_some_and(|c| c.rejected_now.values().sum::<u64>() >= evil.len() as u64)
    })
    .await;
    let refused = status
        .lock()
        .unwrap()
        .clusters
        .iter()
        .find(|c| c.name == "c2")
        .unwrap()
        .rejected_now
        .clone();
    eprintln!("hostile nodes of c2 refused: {refused:?}");
    assert_eq!(
        table(),
        before_hostile,
        "the hostile records changed A's routes"
    );
    let out = ping(&a.pod, b.pod_ip, 3, "0.05");
    assert!(
        out.contains("3 received"),
        "B is cut off by the hostile records: {out}"
    );
    for (name, _, _) in &evil {
        kv2.delete(format!("clustermesh/state/nodes/v1/c2/{name}"), None)
            .await
            .unwrap();
    }

    // B leaves its cluster.
    let t0 = Instant::now();
    g2.deregister_node(proto::DeregisterNodeRequest {
        node: "b1".into(),
        boot_id: "boot-1".into(),
    })
    .await
    .unwrap();
    let gone = until("B's entries leave A", || {
        let v = dpa.lookup(b.pod_ip).unwrap();
        v.is_some_and(|v| v.flags & IPCACHE_FLAG_UNREACHABLE != 0 && v.tunnel_endpoint == 0)
            && routes_of_a.list().unwrap().is_empty()
    })
    .await
    .max(t0.elapsed());
    eprintln!("remote node removal reached A's maps and routes in {gone:?}");
    assert!(
        gone < Duration::from_secs(1),
        "B's entries took {gone:?} to leave A (limit 1 s)"
    );

    // Traffic to B's pod is now dropped at A, counted.
    let before = dpa
        .counter(Direction::Egress, Verdict::DropNoTunnelEndpoint)
        .unwrap();
    let routed = dpa.counter(Direction::Egress, Verdict::Routed).unwrap();
    let out = ping(&a.pod, b.pod_ip, 3, "0.05");
    assert!(out.contains("0 received"), "{out}");
    let after = dpa
        .counter(Direction::Egress, Verdict::DropNoTunnelEndpoint)
        .unwrap();
    assert_eq!(after.packets - before.packets, 3, "drops must be counted");
    assert_eq!(
        dpa.counter(Direction::Egress, Verdict::Routed).unwrap(),
        routed
    );

    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
    drop((api1, api2));
}
