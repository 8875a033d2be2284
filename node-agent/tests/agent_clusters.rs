//! The agent's control plane against three real clusters: each a real etcd
//! (started by the test on free loopback ports) with a real
//! clustermesh-apiserver exporting into it. The agent runs with in-memory
//! reconcilers (the datapath ones are tested in e2e), which the test reads.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeSet, path::Path, time::Duration};

use clustermesh_api::{
    ClusterId, IpCidr,
    policy::{CompiledPolicy, Direction, MapVerdict},
    proto::{self, cluster_mesh_client::ClusterMeshClient},
};
use clustermesh_apiserver::{Config, Running};
use clustermesh_testkit::etcd::EtcdServer;
use node_agent::{
    clusters::{
        Agent, AgentStatus, ClusterStatus, ClustersConfig, Reconcilers, config::ClusterFile,
    },
    desired::{IpCacheEntry, MergedService, Peer, TunnelEntry},
    reconcilers::{MemoryReconciler, SharedReconciler},
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

struct Cluster {
    name: String,
    etcd: EtcdServer,
    api: Option<Running>,
    g: ClusterMeshClient<Channel>,
}

async fn cluster(name: &str, id: u64) -> Cluster {
    cluster_with(name, id, clustermesh_api::EncryptionPolicy::default()).await
}

async fn cluster_with(
    name: &str,
    id: u64,
    encryption: clustermesh_api::EncryptionPolicy,
) -> Cluster {
    let etcd = EtcdServer::start().unwrap();
    let mut cfg = Config::new(
        name.parse().unwrap(),
        ClusterId::new(id).unwrap(),
        vec![etcd.endpoint()],
    );
    cfg.lease_ttl = Duration::from_secs(30);
    cfg.heartbeat_interval = Duration::from_secs(1);
    // Plaintext API: this test is about the agent's merge; TLS and authorization
    // are clustermesh-apiserver/tests/authz.rs's and the mesh harness's.
    cfg.insecure_plaintext = true;
    cfg.node_ttl = Duration::from_secs(600);
    cfg.encryption = encryption;
    let api = clustermesh_apiserver::start(cfg).await.unwrap();
    let g = ClusterMeshClient::connect(format!("http://{}", api.grpc_addr))
        .await
        .unwrap();
    Cluster {
        name: name.into(),
        etcd,
        api: Some(api),
        g,
    }
}

impl Cluster {
    async fn node(&mut self, name: &str, cidr: &str, ip: &str) {
        self.node_with_keys(name, cidr, ip, vec![]).await;
    }
    async fn node_with_keys(&mut self, name: &str, cidr: &str, ip: &str, keys: Vec<String>) {
        self.g
            .register_node(proto::RegisterNodeRequest {
                node: Some(proto::Node {
                    name: name.into(),
                    underlay_ips: vec![ip.into()],
                    pod_cidrs: vec![cidr.into()],
                    wireguard_public_keys: keys,
                    boot_id: "b".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    async fn endpoint(&mut self, node: &str, ip: &str) -> u32 {
        self.endpoint_app(node, ip, "web").await
    }
    async fn endpoint_app(&mut self, node: &str, ip: &str, app: &str) -> u32 {
        let mut labels = std::collections::HashMap::new();
        labels.insert("k8s:app".to_owned(), app.to_owned());
        self.g
            .add_endpoint(proto::AddEndpointRequest {
                node: node.into(),
                ip: ip.into(),
                namespace: "default".into(),
                name: format!("p-{}", ip.replace(['.', ':'], "-")),
                labels,
            })
            .await
            .unwrap()
            .into_inner()
            .identity
    }
    fn file(&self, dir: &Path) {
        write_file(dir, &self.name, &self.etcd.endpoint());
    }
    async fn kv(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.etcd.endpoint()], None)
            .await
            .unwrap()
    }
}

fn write_file(dir: &Path, name: &str, endpoint: &str) {
    // Write then rename, as a Secret update or the connect CLI would.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("endpoints:\n  - {endpoint}\n")).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

struct Targets {
    ipcache: SharedReconciler<IpCidr, IpCacheEntry>,
    tunnels: SharedReconciler<IpCidr, TunnelEntry>,
    peers: SharedReconciler<String, Peer>,
    services: SharedReconciler<String, MergedService>,
    network_policies: SharedReconciler<clustermesh_api::Identity, CompiledPolicy>,
}

fn agent(
    local: &Cluster,
    dir: &Path,
    stale_ttl: Duration,
    cancel: &CancellationToken,
) -> (Agent, Targets) {
    let t = Targets {
        ipcache: SharedReconciler::new("ipcache"),
        tunnels: SharedReconciler::new("tunnels"),
        peers: SharedReconciler::new("peers"),
        services: SharedReconciler::new("services"),
        network_policies: SharedReconciler::new("network policies"),
    };
    let a = Agent::new(
        agent_config(local, dir, stale_ttl),
        t.reconcilers(),
        cancel.clone(),
    );
    (a, t)
}

impl Targets {
    /// Reconcilers writing into these (shared) targets.
    fn reconcilers(&self) -> Reconcilers {
        Reconcilers {
            ipcache: Box::new(self.ipcache.clone()),
            tunnels: Box::new(self.tunnels.clone()),
            peers: Box::new(self.peers.clone()),
            services: Box::new(self.services.clone()),
            policy: Box::new(MemoryReconciler::new("policy")),
            strict_ranges: Box::new(MemoryReconciler::new("strict ranges")),
            network_policies: Box::new(self.network_policies.clone()),
            policy_cidrs: Box::new(SharedReconciler::new("policy CIDRs")),
        }
    }
}

fn agent_config(local: &Cluster, dir: &Path, stale_ttl: Duration) -> ClustersConfig {
    ClustersConfig {
        local_cluster: local.name.parse().unwrap(),
        local: ClusterFile {
            endpoints: vec![local.etcd.endpoint()],
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            pod_cidrs: Vec::new(),
        },
        self_node: Some("a1".parse().unwrap()),
        clusters_dir: dir.to_owned(),
        stale_ttl,
        sync_timeout: Duration::from_secs(60),
        poll_interval: Duration::from_millis(100),
        strict_ranges: Vec::new(),
    }
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn ips(t: &Targets) -> BTreeSet<String> {
    t.ipcache
        .contents()
        .keys()
        .filter(|c| {
            let a = c.addr().to_string();
            a.starts_with("10.") || a.starts_with("fd00:10:")
        })
        .map(|c| c.addr().to_string())
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn status_of<'a>(s: &'a AgentStatus, name: &str) -> Option<&'a ClusterStatus> {
    s.clusters.iter().find(|c| c.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_sync_churn_outages_hostility_and_drain() {
    let mut c1 = cluster("c1", 1).await;
    let mut c2 = cluster("c2", 2).await;
    let mut c3 = cluster("c3", 3).await;
    c1.node("a1", "10.1.0.0/24", "192.0.2.1").await;
    c1.node("a2", "10.1.1.0/24", "192.0.2.2").await;
    c2.node("b1", "10.2.0.0/24", "192.0.2.11").await;
    c3.node("x1", "10.3.0.0/24", "192.0.2.21").await;
    c1.endpoint("a1", "10.1.0.5").await;
    c1.endpoint("a2", "10.1.1.5").await;
    let id2 = c2.endpoint("b1", "10.2.0.5").await;
    c3.endpoint("x1", "10.3.0.5").await;

    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());
    c3.file(dir.path());
    std::fs::write(dir.path().join(".editor.swp"), "ignored").unwrap();
    let cancel = CancellationToken::new();
    let (a, t) = agent(&c1, dir.path(), Duration::from_secs(3), &cancel);
    let status = a.status();
    let st = move || status.lock().unwrap().clone();
    let run = tokio::spawn(a.run());

    // 1. Initial sync of all three clusters.
    until("initial sync", || {
        st().all_synced && st().clusters.len() == 3
    })
    .await;
    until("all endpoints", || {
        ips(&t) == set(&["10.1.0.5", "10.1.1.5", "10.2.0.5", "10.3.0.5"])
    })
    .await;
    assert!(st().pruned);
    let e = t.ipcache.contents()[&"10.2.0.5/32".parse::<IpCidr>().unwrap()];
    assert_eq!(e.identity.get(), id2);
    assert_eq!(e.tunnel_endpoint.unwrap().to_string(), "192.0.2.11");
    assert_eq!(e.cluster_id, 2);
    // Tunnels to every other node (a2 in our cluster, b1, x1), not to a1 (us).
    let tunnels: BTreeSet<String> = t
        .tunnels
        .contents()
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(tunnels, set(&["10.1.1.0/24", "10.2.0.0/24", "10.3.0.0/24"]));
    assert!(
        t.peers.contents().is_empty(),
        "no encryption configured: no peers"
    );
    assert!(t.services.contents().is_empty());

    // 2. Churn is reflected exactly.
    c2.endpoint("b1", "10.2.0.6").await;
    c3.g.remove_endpoint(proto::RemoveEndpointRequest {
        ip: "10.3.0.5".into(),
    })
    .await
    .unwrap();
    c2.node("b2", "10.2.1.0/24", "192.0.2.12").await;
    until("churn", || {
        ips(&t) == set(&["10.1.0.5", "10.1.1.5", "10.2.0.5", "10.2.0.6"])
            && t.tunnels
                .contents()
                .contains_key(&"10.2.1.0/24".parse().unwrap())
    })
    .await;
    c2.g.deregister_node(proto::DeregisterNodeRequest {
        node: "b2".into(),
        boot_id: "b".into(),
    })
    .await
    .unwrap();
    until("node removal", || {
        !t.tunnels
            .contents()
            .contains_key(&"10.2.1.0/24".parse().unwrap())
    })
    .await;

    // 3. A remote etcd killed and restarted: state kept while down,
    //    converged after.
    c2.etcd.kill().unwrap();
    until("c2 disconnected", || {
        status_of(&st(), "c2").is_some_and(|c| !c.connected)
    })
    .await;
    assert!(
        ips(&t).contains("10.2.0.5"),
        "state kept while the cluster is down"
    );
    c2.etcd.restart().unwrap();
    until("c2 reconnected", || {
        status_of(&st(), "c2").is_some_and(|c| c.connected && c.synced)
    })
    .await;
    c2.endpoint("b1", "10.2.0.7").await;
    until("converged after restart", || {
        ips(&t).contains("10.2.0.7") && ips(&t).contains("10.2.0.5")
    })
    .await;

    // 4. Compaction while the agent is disconnected: point c3's file at a
    //    dead endpoint (the agent keeps c3's last state), delete a key and
    //    compact etcd, then point it back: the deleted key must be gone.
    c3.endpoint("x1", "10.3.0.8").await;
    until("10.3.0.8", || ips(&t).contains("10.3.0.8")).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    write_file(dir.path(), "c3", &format!("http://127.0.0.1:{dead}"));
    until("c3 disconnected", || {
        status_of(&st(), "c3").is_some_and(|c| !c.connected)
    })
    .await;
    c3.g.remove_endpoint(proto::RemoveEndpointRequest {
        ip: "10.3.0.8".into(),
    })
    .await
    .unwrap();
    let mut kv3 = c3.kv().await;
    // Wait for the export of the delete, then compact past it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !kv3
        .get("clustermesh/state/ip/v1/c3/10.3.0.8", None)
        .await
        .unwrap()
        .kvs()
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let rev = kv3
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    kv3.compact(rev, None).await.unwrap();
    assert!(ips(&t).contains("10.3.0.8"), "still the last known state");
    c3.file(dir.path());
    until("deleted key gone after reconnect", || {
        !ips(&t).contains("10.3.0.8")
    })
    .await;

    // 5. A hostile (or broken) c3 writes into its own etcd: a record claiming
    //    cluster c2, bad JSON, a node overlapping c1's pod CIDR, an endpoint
    //    with c1's identity bits. Each is refused and counted; the rest of
    //    c3 keeps working.
    let before = status_of(&st(), "c3").unwrap().clone();
    kv3.put(
        "clustermesh/state/nodes/v1/c3/evil1",
        r#"{"name":"evil1","cluster":"c2","underlayIps":["192.0.2.99"],"podCidrs":["10.9.0.0/24"],"bootId":"e"}"#,
        None,
    )
    .await
    .unwrap();
    kv3.put("clustermesh/state/ip/v1/c3/10.3.0.66", "{not json", None)
        .await
        .unwrap();
    kv3.put(
        "clustermesh/state/nodes/v1/c3/evil2",
        r#"{"name":"evil2","cluster":"c3","underlayIps":["192.0.2.98"],"podCidrs":["10.1.0.0/25"],"bootId":"e"}"#,
        None,
    )
    .await
    .unwrap();
    kv3.put(
        "clustermesh/state/ip/v1/c3/10.3.0.77",
        format!(
            r#"{{"ip":"10.3.0.77","cluster":"c3","identity":{},"hostIp":"192.0.2.21"}}"#,
            (1 << 16) | 300
        ),
        None,
    )
    .await
    .unwrap();
    c3.endpoint("x1", "10.3.0.9").await;
    until("hostile records refused and counted", || {
        let s = st();
        let c = status_of(&s, "c3").unwrap();
        c.refused_total
            .get("cluster_mismatch")
            .copied()
            .unwrap_or(0)
            > before
                .refused_total
                .get("cluster_mismatch")
                .copied()
                .unwrap_or(0)
            && c.refused_total.contains_key("bad_json")
            && c.rejected_now.get("cidr_overlap") == Some(&1)
            && c.rejected_now.get("identity_cluster_bits") == Some(&1)
            && ips(&t).contains("10.3.0.9")
    })
    .await;
    let now = ips(&t);
    assert!(
        !now.contains("10.3.0.66") && !now.contains("10.3.0.77"),
        "{now:?}"
    );
    assert!(
        !t.tunnels
            .contents()
            .keys()
            .any(|c| c.to_string() == "10.1.0.0/25")
    );
    let mine = t.ipcache.contents()[&"10.1.0.5/32".parse::<IpCidr>().unwrap()];
    assert_eq!(
        mine.tunnel_endpoint, None,
        "our endpoint still ours, not c3's"
    );
    assert!(now.contains("10.1.0.5"), "our own state untouched");

    // 6. Removing c2's file drains exactly c2.
    std::fs::remove_file(dir.path().join("c2")).unwrap();
    until("c2 drained", || {
        let i = ips(&t);
        !i.iter().any(|ip| ip.starts_with("10.2."))
            && i.contains("10.3.0.9")
            && i.contains("10.1.0.5")
    })
    .await;
    assert!(status_of(&st(), "c2").is_none());

    // 7. Bounded staleness: c3 unreachable for longer than the TTL (3 s) is
    //    withdrawn.
    c3.etcd.kill().unwrap();
    until("c3 withdrawn", || {
        status_of(&st(), "c3").is_some_and(|c| c.withdrawn)
    })
    .await;
    until("c3 state gone", || {
        !ips(&t).iter().any(|ip| ip.starts_with("10.3."))
    })
    .await;
    assert_eq!(ips(&t), set(&["10.1.0.5", "10.1.1.5"]));

    cancel.cancel();
    run.await.unwrap();
    for c in [&mut c1, &mut c2, &mut c3] {
        if let Some(a) = c.api.take() {
            a.shutdown(Duration::from_secs(2)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_cluster_id_is_refused_with_a_reason() {
    let c1 = cluster("c1", 1).await;
    let c2 = cluster("c2", 2).await;
    let mut c9 = cluster("c9", 2).await; // same id as c2
    c9.node("z1", "10.9.0.0/24", "192.0.2.91").await;
    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());
    let cancel = CancellationToken::new();
    let (a, t) = agent(&c1, dir.path(), Duration::ZERO, &cancel);
    let status = a.status();
    let st = move || status.lock().unwrap().clone();
    let run = tokio::spawn(a.run());
    until("c2 synced", || {
        status_of(&st(), "c2").is_some_and(|c| c.synced)
    })
    .await;
    c9.file(dir.path());
    until("c9 refused", || {
        status_of(&st(), "c9").is_some_and(|c| {
            c.last_error
                .as_deref()
                .is_some_and(|e| e.contains("cluster id 2 is already used by cluster c2"))
        })
    })
    .await;
    assert!(
        !t.tunnels
            .contents()
            .contains_key(&"10.9.0.0/24".parse().unwrap())
    );
    cancel.cancel();
    run.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_changes_nothing_that_did_not_change() {
    let mut c1 = cluster("c1", 1).await;
    let mut c2 = cluster("c2", 2).await;
    c1.node("a1", "10.1.0.0/24", "192.0.2.1").await;
    c2.node("b1", "10.2.0.0/24", "192.0.2.11").await;
    c2.endpoint("b1", "10.2.0.5").await;
    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());

    // First run: the targets (think: pinned eBPF maps) get the state.
    let cancel = CancellationToken::new();
    let (a, t) = agent(&c1, dir.path(), Duration::ZERO, &cancel);
    let status = a.status();
    let run = tokio::spawn(a.run());
    until("first sync", || {
        status.lock().unwrap().all_synced && ips(&t).contains("10.2.0.5")
    })
    .await;
    cancel.cancel();
    run.await.unwrap();

    // While the agent is down, the world changes a little: one endpoint is
    // removed. The targets keep their contents (the datapath survives).
    c2.g.remove_endpoint(proto::RemoveEndpointRequest {
        ip: "10.2.0.5".into(),
    })
    .await
    .unwrap();
    c2.endpoint("b1", "10.2.0.6").await;
    let kept = t.ipcache.contents();
    t.ipcache.0.lock().unwrap().ops.clear();
    t.tunnels.0.lock().unwrap().ops.clear();
    t.peers.0.lock().unwrap().ops.clear();
    t.services.0.lock().unwrap().ops.clear();

    // Second run on the same targets.
    let cancel = CancellationToken::new();
    let a = Agent::new(
        agent_config(&c1, dir.path(), Duration::ZERO),
        t.reconcilers(),
        cancel.clone(),
    );
    let status = a.status();
    let run = tokio::spawn(a.run());
    until("second sync", || status.lock().unwrap().pruned).await;
    use node_agent::reconcilers::Op;
    let ops = t.ipcache.ops();
    // Exactly: the new endpoint written, the removed one pruned, nothing else
    // rewritten, and no delete before the prune.
    assert_eq!(
        ops,
        vec![Op::Update("10.2.0.6/32".parse().unwrap()), Op::Prune(1)],
        "kept before restart: {:?}",
        kept.keys().collect::<Vec<_>>()
    );
    assert_eq!(t.tunnels.ops(), vec![Op::Prune(0)]);
    assert_eq!(ips(&t), set(&["10.2.0.6"]));
    cancel.cancel();
    run.await.unwrap();
}

/// Issue 16 (error isolation): one entry the target refuses (as a kernel
/// rejecting a route or a full map would) is reported and retried, and
/// every other cluster's changes are applied meanwhile. Before the fix the
/// whole round failed and was retried forever: c3's endpoint never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_entry_leaves_every_other_change_applied() {
    let mut c1 = cluster("c1", 1).await;
    let mut c2 = cluster("c2", 2).await;
    let mut c3 = cluster("c3", 3).await;
    c1.node("a1", "10.1.0.0/24", "192.0.2.1").await;
    c2.node("b1", "10.2.0.0/24", "192.0.2.11").await;
    c3.node("x1", "10.3.0.0/24", "192.0.2.21").await;
    c2.endpoint("b1", "10.2.0.5").await;
    c2.endpoint("b1", "10.2.0.6").await;
    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());
    c3.file(dir.path());
    let cancel = CancellationToken::new();
    let (a, t) = agent(&c1, dir.path(), Duration::ZERO, &cancel);
    let bad: IpCidr = "10.2.0.5/32".parse().unwrap();
    t.ipcache.0.lock().unwrap().refuse = vec![bad];
    let status = a.status();
    let st = move || status.lock().unwrap().clone();
    let run = tokio::spawn(a.run());
    until("c2's other endpoint", || ips(&t) == set(&["10.2.0.6"])).await;
    until("the refusal in the status", || {
        st().reconcile_errors
            .iter()
            .any(|f| f.target == "ipcache" && f.key.contains("10.2.0.5"))
    })
    .await;
    // A change in another cluster while the entry is still refused.
    c3.endpoint("x1", "10.3.0.5").await;
    until("c3's new endpoint applied", || {
        ips(&t) == set(&["10.2.0.6", "10.3.0.5"])
    })
    .await;
    assert!(st().pruned, "the prune ran despite the refused entry");
    // The target accepts it again: the retry applies it, the error clears.
    t.ipcache.0.lock().unwrap().refuse.clear();
    until("the refused entry applied", || {
        ips(&t) == set(&["10.2.0.5", "10.2.0.6", "10.3.0.5"])
    })
    .await;
    until("the error cleared", || st().reconcile_errors.is_empty()).await;
    cancel.cancel();
    run.await.unwrap();
}

/// Issue 16 (admission): a remote cluster (c2) writes into its own etcd a
/// node claiming another remote's (c3's) established range, and nodes with
/// hostile ranges (0.0.0.0/1, loopback, a /32 on our node's address, a range
/// covering the underlay). Each is refused with its reason and c3 keeps its
/// range, also after the observer's agent restarts and re-reads every
/// cluster at once (before the fix the first-acceptance counts tied and the
/// name order gave c3's range to c2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_cannot_take_over_another_remotes_range_or_claim_hostile_ones() {
    let mut c1 = cluster("c1", 1).await;
    let c2 = cluster("c2", 2).await;
    let mut c3 = cluster("c3", 3).await;
    c1.node("a1", "10.1.0.0/24", "192.0.2.1").await;
    c3.node("x1", "10.3.0.0/24", "192.0.2.21").await;
    c3.endpoint("x1", "10.3.0.5").await;
    // An IPv6 node of c3: the same rules hold for IPv6 ranges.
    c3.node("x2", "fd00:10:3::/64", "2001:db8::21").await;
    c3.endpoint("x2", "fd00:10:3::5").await;
    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());
    c3.file(dir.path());
    let cancel = CancellationToken::new();
    let (a, t) = agent(&c1, dir.path(), Duration::ZERO, &cancel);
    let status = a.status();
    let run = tokio::spawn(a.run());
    until("c3's ranges", || {
        let i = ips(&t);
        i.contains("10.3.0.5") && i.contains("fd00:10:3::5")
    })
    .await;

    let mut kv2 = c2.kv().await;
    let evil = [
        ("steal", "10.3.0.0/24", "192.0.2.11"),
        ("wide", "0.0.0.0/1", "192.0.2.12"),
        ("loop", "127.0.0.0/8", "192.0.2.13"),
        ("host", "192.0.2.1/32", "192.0.2.14"),
        ("under", "192.0.2.0/24", "198.51.100.1"),
        ("steal6", "fd00:10:3::/64", "2001:db8::11"),
        ("wide6", "fd00::/8", "2001:db8::12"),
        ("link6", "fe80::/64", "2001:db8::13"),
        ("mapped6", "::ffff:0.0.0.0/96", "2001:db8::14"),
        ("under6", "2001:db8::/64", "2001:db8:1::1"),
    ];
    for (name, cidr, ip) in evil {
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
    let tunnel_of = |t: &Targets, c: &str| {
        t.tunnels
            .contents()
            .get(&c.parse::<IpCidr>().unwrap())
            .map(|e| (e.cluster_id, e.node.to_string()))
    };
    let refused = |s: &AgentStatus| {
        status_of(s, "c2")
            .map(|c| c.rejected_now.clone())
            .unwrap_or_default()
    };
    let want = [
        ("cidr_overlap", 2),
        ("pod_cidr_prefix", 3),
        ("pod_cidr_reserved", 3),
        ("pod_cidr_covers_node_ip", 2),
    ];
    let all_refused = |s: &AgentStatus| {
        let r = refused(s);
        want.iter().all(|(k, n)| r.get(*k) == Some(n))
    };
    until("every hostile node refused, with its reason", || {
        all_refused(&status.lock().unwrap())
    })
    .await;
    assert_eq!(tunnel_of(&t, "10.3.0.0/24"), Some((3, "x1".into())));
    assert_eq!(tunnel_of(&t, "fd00:10:3::/64"), Some((3, "x2".into())));
    for (name, cidr, _) in &evil {
        if !name.starts_with("steal") {
            assert_eq!(tunnel_of(&t, cidr), None, "{cidr} routed");
        }
    }
    cancel.cancel();
    run.await.unwrap();

    // The observer restarts on the same targets (its pinned datapath).
    let cancel = CancellationToken::new();
    let a = Agent::new(
        agent_config(&c1, dir.path(), Duration::ZERO),
        t.reconcilers(),
        cancel.clone(),
    );
    let status = a.status();
    let run = tokio::spawn(a.run());
    let st = status.clone();
    until("resynced after the restart", move || {
        let s = st.lock().unwrap();
        if !(s.pruned && all_refused(&s)) {
            eprintln!(
                "DEBUG pruned={} c2={:?} c3={:?}",
                s.pruned,
                refused(&s),
                status_of(&s, "c3").map(|c| c.rejected_now.clone())
            );
        }
        s.pruned && all_refused(&s)
    })
    .await;
    assert_eq!(tunnel_of(&t, "10.3.0.0/24"), Some((3, "x1".into())));
    assert!(
        ips(&t).contains("10.3.0.5"),
        "c3's endpoint refused after the restart"
    );
    cancel.cancel();
    run.await.unwrap();
}

/// The strict ranges need no cluster: the flags' and every remote cluster
/// file's declared `pod-cidrs` are applied at once (no etcd answers here),
/// and a new file's are added as it appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_ranges_come_from_flags_and_declared_pod_cidrs_before_any_cluster_connects() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = "http://127.0.0.1:9";
    std::fs::write(
        dir.path().join("c2"),
        format!("endpoints: [{nobody}]\npod-cidrs: [10.2.0.0/16, fd00:2::/48]\n"),
    )
    .unwrap();
    let ranges = SharedReconciler::<IpCidr, ()>::new("strict ranges");
    let mut r = Reconcilers::in_memory();
    r.strict_ranges = Box::new(ranges.clone());
    let cfg = ClustersConfig {
        local_cluster: "c1".parse().unwrap(),
        local: ClusterFile {
            endpoints: vec![nobody.into()],
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            pod_cidrs: Vec::new(),
        },
        self_node: None,
        clusters_dir: dir.path().to_owned(),
        stale_ttl: Duration::ZERO,
        sync_timeout: Duration::from_secs(60),
        poll_interval: Duration::from_millis(100),
        strict_ranges: vec![
            "10.0.0.0/8".parse().unwrap(),
            "10.1.3.0/24".parse().unwrap(),
        ],
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(Agent::new(cfg, r, cancel.clone()).run());
    let shown = |r: &SharedReconciler<IpCidr, ()>| -> Vec<String> {
        r.contents().keys().map(ToString::to_string).collect()
    };
    until("the configured and declared ranges", || {
        shown(&ranges).len() == 4
    })
    .await;
    assert_eq!(
        shown(&ranges),
        ["10.0.0.0/8", "10.1.3.0/24", "10.2.0.0/16", "fd00:2::/48"]
    );
    std::fs::write(
        dir.path().join("c3"),
        format!("endpoints: [{nobody}]\npod-cidrs: [10.3.0.0/16]\n"),
    )
    .unwrap();
    until("a new file's range", || {
        shown(&ranges).contains(&"10.3.0.0/16".to_owned())
    })
    .await;
    cancel.cancel();
    task.await.unwrap();
}

/// A remote cluster larger than one list page (issue 16: etcd lists are
/// paginated, so a 100k-endpoint cluster syncs): 2,100 endpoints, read at
/// connect in pages of `LIST_PAGE` keys at one revision, every one in the
/// ip-cache and the status counts. (One unpaginated read also passes at
/// this size; it fails only past gRPC's 4 MiB message limit, some 20k
/// endpoints, a size for `make bench`: this test proves the pages are
/// stitched into one whole snapshot.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_larger_than_a_list_page_syncs_whole() {
    let mut c1 = cluster("c1", 1).await;
    let mut c2 = cluster("c2", 2).await;
    c1.node("a1", "10.1.0.0/24", "192.0.2.1").await;
    c2.node("b1", "10.2.0.0/16", "192.0.2.11").await;
    let n = 2 * node_agent::clusters::watcher::LIST_PAGE as usize + 100;
    for i in 0..n {
        let ip = format!("10.2.{}.{}", 1 + i / 250, 1 + i % 250);
        c2.endpoint("b1", &ip).await;
    }
    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());
    let cancel = CancellationToken::new();
    let (a, t) = agent(&c1, dir.path(), Duration::ZERO, &cancel);
    let status = a.status();
    let run = tokio::spawn(a.run());
    until("every endpoint of c2", || {
        t.ipcache
            .contents()
            .keys()
            .filter(|c| c.prefix_len() == 32 && c.addr().to_string().starts_with("10.2."))
            .count()
            == n
    })
    .await;
    // The status is published after the round that wrote the entries.
    until("c2's status counting every endpoint", || {
        let st = status.lock().unwrap().clone();
        status_of(&st, "c2").is_some_and(|c| c.counts.endpoints == n)
    })
    .await;
    cancel.cancel();
    run.await.unwrap();
}

/// Issue 16: a remote cluster (c3) publishes a node with another cluster's
/// node's WireGuard key (c2/b1's): refused (`wireguard_key_taken`), and the
/// victim keeps its peer: never cut off, never impersonated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_wireguard_key_is_refused_without_cutting_the_victim_off() {
    let wg = clustermesh_api::EncryptionPolicy {
        mode: clustermesh_api::EncryptionMode::Wireguard,
        ..Default::default()
    };
    let mut c1 = cluster_with("c1", 1, wg).await;
    let mut c2 = cluster("c2", 2).await;
    let c3 = cluster("c3", 3).await;
    c1.node("a1", "10.1.0.0/24", "192.0.2.1").await;
    let key = clustermesh_api::WgPublicKey::from_bytes([7; 32]).unwrap();
    c2.node_with_keys("b1", "10.2.0.0/24", "192.0.2.11", vec![key.to_string()])
        .await;
    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());
    c3.file(dir.path());
    let cancel = CancellationToken::new();
    let (a, t) = agent(&c1, dir.path(), Duration::ZERO, &cancel);
    let status = a.status();
    let run = tokio::spawn(a.run());
    let victim = |t: &Targets| t.peers.contents().get("c2/b1").map(|p| p.public_key);
    until("c2/b1's peer", || victim(&t) == Some(key)).await;

    let mut kv3 = c3.kv().await;
    kv3.put(
        "clustermesh/state/nodes/v1/c3/thief",
        format!(
            r#"{{"name":"thief","cluster":"c3","underlayIps":["192.0.2.31"],"podCidrs":["10.3.0.0/24"],"wireguardPublicKeys":["{key}"],"bootId":"e"}}"#
        ),
        None,
    )
    .await
    .unwrap();
    until("the thief refused", || {
        status_of(&status.lock().unwrap(), "c3")
            .is_some_and(|c| c.rejected_now.get("wireguard_key_taken") == Some(&1))
    })
    .await;
    assert_eq!(victim(&t), Some(key), "the victim lost its peer");
    assert!(
        !t.peers.contents().contains_key("c3/thief"),
        "the thief became a peer"
    );
    cancel.cancel();
    run.await.unwrap();
}

/// Only c2's frontends reach c1's db on TCP 5432.
const DB_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend, io.cilium.k8s.policy.cluster: c2}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_policies_reach_the_desired_policy_entries_and_remote_ones_are_ignored() {
    let mut c1 = cluster("c1", 1).await;
    let mut c2 = cluster("c2", 2).await;
    c1.node("a1", "10.1.0.0/24", "192.0.2.1").await;
    c2.node("b1", "10.2.0.0/24", "192.0.2.11").await;
    let db = c1.endpoint_app("a1", "10.1.0.5", "db").await;
    let front = c2.endpoint_app("b1", "10.2.0.5", "frontend").await;
    let other = c2.endpoint_app("b1", "10.2.0.6", "batch").await;
    // c2 denies everything to its own pods of app=db, and would select c1's
    // db too if a remote's policies were (wrongly) applied here.
    let remote = DB_POLICY
        .replace("name: db,", "name: remote-deny,")
        .replace(
            "ingress:\n  - fromEndpoints",
            "ingressDeny:\n  - fromEndpoints",
        );
    c2.g.apply_policies(proto::ApplyPoliciesRequest { manifest: remote })
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());
    let cancel = CancellationToken::new();
    let (a, t) = agent(&c1, dir.path(), Duration::from_secs(30), &cancel);
    let status = a.status();
    let st = move || status.lock().unwrap().clone();
    let run = tokio::spawn(a.run());
    until("initial sync", || {
        st().all_synced && st().clusters.len() == 2
    })
    .await;
    assert!(
        t.network_policies.contents().is_empty(),
        "no local policy, but entries: {:?}",
        t.network_policies.contents()
    );
    assert_eq!(
        status_of(&st(), "c2").unwrap().counts.policies,
        0,
        "a remote's policies are not kept"
    );

    // Applied through the API: the agent's desired entries follow.
    c1.g.apply_policies(proto::ApplyPoliciesRequest {
        manifest: DB_POLICY.to_owned(),
    })
    .await
    .unwrap();
    let dbid = clustermesh_api::Identity::from_raw(db.into()).unwrap();
    until("policy entries", || {
        t.network_policies.contents().contains_key(&dbid)
    })
    .await;
    let p = t.network_policies.contents()[&dbid].clone();
    assert!(p.default_deny_ingress && !p.default_deny_egress);
    // One allow entry: from c2's frontend identity, TCP 5432, ingress. No
    // deny entry: c2's own policy never applies here.
    assert_eq!(p.entries.len(), 1, "{:?}", p.entries);
    let e = &p.entries[0];
    assert_eq!(e.peer.get(), front);
    assert_eq!(e.direction, Direction::Ingress);
    assert_eq!(e.verdict, MapVerdict::Allow);
    assert_eq!(e.ports.to_string(), "5432");
    assert_eq!(e.rule.origin, "spec.ingress[0]");
    assert!(p.entries.iter().all(|e| e.peer.get() != other));
    until("status counts", || {
        let d = st().desired;
        d.policies == 1 && d.policy_endpoints == 1 && d.policy_entries == 1
    })
    .await;
    assert_eq!(status_of(&st(), "c1").unwrap().counts.policies, 1);

    // Deleted: the entries go.
    c1.g.delete_policy(proto::DeletePolicyRequest {
        namespace: "default".into(),
        name: "db".into(),
    })
    .await
    .unwrap();
    until("policy entries removed", || {
        t.network_policies.contents().is_empty()
    })
    .await;
    until("status counts zero", || st().desired.policy_entries == 0).await;
    cancel.cancel();
    run.await.unwrap();
}

/// Issue 20 (scale limits): a remote cluster holding more endpoints than
/// the ip-cache has room for. The reconcile does not fail: what fits is
/// applied (the pod-CIDR route first), the rest is refused and counted as
/// one status failure and the `maps` occupancy (alarm on), and added once
/// endpoints leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_larger_than_the_ip_cache_is_refused_counted_and_added_as_room_frees() {
    let mut c1 = cluster("c1", 1).await;
    let mut c2 = cluster("c2", 2).await;
    c1.node("a1", "10.1.0.0/24", "192.0.2.1").await;
    c2.node("b1", "10.2.0.0/24", "192.0.2.11").await;
    let ips_of =
        |r: std::ops::Range<u32>| -> Vec<String> { r.map(|i| format!("10.2.0.{i}")).collect() };
    let batch = |ips: Vec<String>| proto::AddEndpointsRequest {
        endpoints: ips
            .into_iter()
            .map(|ip| proto::AddEndpointRequest {
                node: "b1".into(),
                name: format!("p-{}", ip.replace('.', "-")),
                ip,
                namespace: "default".into(),
                labels: [("k8s:app".to_owned(), "web".to_owned())].into(),
            })
            .collect(),
    };
    let r = c2.g.add_endpoints(batch(ips_of(1..81))).await.unwrap();
    assert!(r.into_inner().results.iter().all(|e| e.code == 0));
    let dir = tempfile::tempdir().unwrap();
    c2.file(dir.path());
    let cancel = CancellationToken::new();
    let (mut a, t) = agent(&c1, dir.path(), Duration::ZERO, &cancel);
    // 64 entries of IPv4 (the smallest --ipcache-max-entries), IPv6
    // unbounded.
    a.set_ipcache_capacity(64, usize::MAX);
    let status = a.status();
    let st = move || status.lock().unwrap().clone();
    let run = tokio::spawn(a.run());
    until("the ip-cache full", || {
        st().maps
            .first()
            .is_some_and(|m| m.refused > 0 && m.entries == 63)
    })
    .await;
    let s = st();
    let m = &s.maps[0];
    assert_eq!(
        (m.map.as_str(), m.capacity, m.alarm),
        ("CM_IPCACHE", 64, true)
    );
    // The route is in; host entries stop at 64 - 1 route - 1 reserve (of
    // 1/64, kept for routes).
    let route: IpCidr = "10.2.0.0/24".parse().unwrap();
    assert!(t.tunnels.contents().contains_key(&route), "the route first");
    assert_eq!(t.ipcache.contents().len(), 62);
    assert!(
        m.refused >= 80 - 62,
        "every desired host entry that waits: {m:?}"
    );
    let full: Vec<_> = s
        .reconcile_errors
        .iter()
        .filter(|f| f.target == "ipcache")
        .collect();
    assert_eq!(full.len(), 1, "one failure for the full map: {full:?}");
    assert!(
        full[0].error.contains("CM_IPCACHE is full (64 entries)"),
        "{}",
        full[0].error
    );
    // 40 endpoints leave: the rest fits, the failure and the alarm clear.
    let r =
        c2.g.remove_endpoints(proto::RemoveEndpointsRequest {
            ips: ips_of(41..81),
        })
        .await
        .unwrap();
    assert!(r.into_inner().results.iter().all(|e| e.code == 0));
    until("every remaining entry applied", || {
        let s = st();
        s.maps[0].refused == 0 && s.reconcile_errors.is_empty() && !s.maps[0].alarm
    })
    .await;
    let held = ips(&t);
    assert!(
        ips_of(1..41).iter().all(|ip| held.contains(ip)),
        "the 40 endpoints left all applied: {held:?}"
    );
    assert!(!ips_of(41..81).iter().any(|ip| held.contains(ip)));
    cancel.cancel();
    run.await.unwrap();
}
