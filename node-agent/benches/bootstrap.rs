//! Agent bootstrap at scale: an agent connecting to many clusters whose
//! etcds were filled by a generator, measured in one run.
//!
//! - baseline: reading every key of every etcd with plain prefix gets (the
//!   floor any watcher pays), and the process's resident memory before the
//!   agent starts;
//! - the agent: time from start until every cluster synced, the agent
//!   pruned (its one-time packing and heap trim after the initial sync are
//!   done) and the ip-cache target got every entry; resident memory growth
//!   per remote endpoint; the rate of ip-cache updates. The ip-cache
//!   target ([`Counting`]) holds nothing in the process, as the kernel
//!   map does, so the memory is the agent's own.
//!
//! The generator writes the exported schema directly (cluster config, nodes,
//! endpoints, canaries), as an apiserver would, so filling is fast. Each
//! etcd is a real process on loopback.
//!
//! Usage: bootstrap [--clusters C] [--nodes N] [--endpoints E per node]
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clustermesh_api::{IpCidr, StateKind};
use clustermesh_testkit::{
    etcd::EtcdServer,
    report::{Better, Figure, record},
};
use etcd_client::{Client, GetOptions, Txn, TxnOp};
use node_agent::{
    clusters::{Agent, ClustersConfig, Reconcilers, config::ClusterFile},
    desired::IpCacheEntry,
    reconcilers::{ReconcileError, Reconciler, SharedReconciler},
};
use tokio_util::sync::CancellationToken;

/// The ip-cache target as the agent sees the kernel's map: outside the
/// process. It counts the entries written and holds none, so the memory
/// figure is the agent's own (its stores, merge and what it knows the
/// target holds).
#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl Reconciler<IpCidr, IpCacheEntry> for Counting {
    fn name(&self) -> &'static str {
        "ipcache (counted)"
    }
    fn update(&mut self, _: &IpCidr, _: &IpCacheEntry) -> Result<(), ReconcileError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn delete(&mut self, _: &IpCidr) -> Result<(), ReconcileError> {
        Ok(())
    }
    fn prune(&mut self, _: &BTreeMap<IpCidr, IpCacheEntry>) -> Result<usize, ReconcileError> {
        Ok(0)
    }
    fn snapshot(&mut self) -> Result<BTreeMap<IpCidr, IpCacheEntry>, ReconcileError> {
        Ok(BTreeMap::new())
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn fill(etcd: &EtcdServer, c: usize, nodes: usize, per_node: usize) {
    let mut kv = Client::connect([etcd.endpoint()], None).await.unwrap();
    let name = format!("c{c}");
    let mut ops = vec![TxnOp::put(
        format!("clustermesh/cluster-config/{name}"),
        format!(r#"{{"id":{c},"name":"{name}"}}"#),
        None,
    )];
    let flush = |ops: &mut Vec<TxnOp>| std::mem::take(ops);
    for n in 0..nodes {
        let cidr = format!("10.{c}.{n}.0/24");
        ops.push(TxnOp::put(
            format!("clustermesh/state/nodes/v1/{name}/n{n}"),
            format!(r#"{{"name":"n{n}","cluster":"{name}","underlayIps":["172.16.{c}.{}"],"podCidrs":["{cidr}"],"bootId":"b"}}"#, n + 1),
            None,
        ));
        for e in 0..per_node {
            let ip = format!("10.{c}.{n}.{}", e + 1);
            ops.push(TxnOp::put(
                format!("clustermesh/state/ip/v1/{name}/{ip}"),
                format!(
                    r#"{{"ip":"{ip}","cluster":"{name}","identity":{},"hostIp":"172.16.{c}.{}"}}"#,
                    (c << 16) | (256 + e % 50),
                    n + 1
                ),
                None,
            ));
            if ops.len() >= 100 {
                kv.txn(Txn::new().and_then(flush(&mut ops))).await.unwrap();
            }
        }
    }
    for k in StateKind::ALL {
        ops.push(TxnOp::put(
            format!("clustermesh/synced/{name}/{k}"),
            format!(r#"{{"cluster":"{name}","kind":"{k}","syncedAtMs":1}}"#),
            None,
        ));
    }
    kv.txn(Txn::new().and_then(ops)).await.unwrap();
}

#[tokio::main]
async fn main() {
    let clusters = (clustermesh_testkit::bench_arg("--clusters", 10) as usize).clamp(2, 200);
    let nodes = (clustermesh_testkit::bench_arg("--nodes", 100) as usize).clamp(1, 250);
    let per_node = (clustermesh_testkit::bench_arg("--endpoints", 100) as usize).clamp(1, 250);
    let remote_endpoints = (clusters - 1) * nodes * per_node;
    let mut etcds = Vec::new();
    for c in 1..=clusters {
        let e = EtcdServer::start().unwrap();
        fill(&e, c, nodes, per_node).await;
        etcds.push(e);
    }

    // Baseline: read everything once with plain gets.
    let t = Instant::now();
    let mut read = 0usize;
    for (i, e) in etcds.iter().enumerate() {
        let mut kv = Client::connect([e.endpoint()], None).await.unwrap();
        read += kv
            .get(
                format!("clustermesh/state/ip/v1/c{}/", i + 1),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .unwrap()
            .kvs()
            .len();
    }
    let baseline = t.elapsed();
    assert_eq!(read, clusters * nodes * per_node);

    let dir = tempfile::tempdir().unwrap();
    for (i, e) in etcds.iter().enumerate().skip(1) {
        std::fs::write(
            dir.path().join(format!("c{}", i + 1)),
            format!("endpoints: [{}]\n", e.endpoint()),
        )
        .unwrap();
    }
    let ipcache = Counting::default();
    let rss_before = rss_kib();
    let cancel = CancellationToken::new();
    let cfg = ClustersConfig {
        local_cluster: "c1".parse().unwrap(),
        local: ClusterFile {
            endpoints: vec![etcds[0].endpoint()],
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            pod_cidrs: Vec::new(),
        },
        self_node: Some("n0".parse().unwrap()),
        clusters_dir: dir.path().to_owned(),
        stale_ttl: Duration::ZERO,
        sync_timeout: Duration::from_secs(600),
        poll_interval: Duration::from_millis(50),
        strict_ranges: Vec::new(),
    };
    let r = Reconcilers {
        ipcache: Box::new(ipcache.clone()),
        tunnels: Box::new(SharedReconciler::new("tunnels")),
        peers: Box::new(SharedReconciler::new("peers")),
        services: Box::new(SharedReconciler::new("services")),
        policy: Box::new(SharedReconciler::new("policy")),
        strict_ranges: Box::new(SharedReconciler::new("strict ranges")),
        network_policies: Box::new(SharedReconciler::new("network policies")),
        policy_cidrs: Box::new(SharedReconciler::new("policy CIDRs")),
    };
    let agent = Agent::new(cfg, r, cancel.clone());
    let status = agent.status();
    let t = Instant::now();
    let run = tokio::spawn(agent.run());
    let want_entries = clusters * nodes * per_node + (clusters - 1) * nodes;
    loop {
        let synced = status
            .lock()
            .map(|s| s.all_synced && s.pruned && s.clusters.len() == clusters)
            .unwrap_or(false);
        if synced && ipcache.0.load(Ordering::Relaxed) >= want_entries {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "no full sync within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sync = t.elapsed();
    let rss_after = rss_kib();
    let updates = ipcache.0.load(Ordering::Relaxed);
    cancel.cancel();
    run.await.unwrap();

    let per_ep = (rss_after.saturating_sub(rss_before) * 1024) as f64 / remote_endpoints as f64;
    println!(
        "bootstrap benchmark: {clusters} clusters x {nodes} nodes x {per_node} endpoints ({} endpoints, {remote_endpoints} remote), one etcd process per cluster on loopback",
        clusters * nodes * per_node
    );
    println!(
        "  baseline: plain prefix reads of all etcds: {:.2?} ({:.0} records/s)",
        baseline,
        read as f64 / baseline.as_secs_f64()
    );
    println!(
        "  agent: time to full sync:                 {:.2?} ({:.0} records/s)  ratio to baseline {:.2}",
        sync,
        read as f64 / sync.as_secs_f64(),
        baseline.as_secs_f64() / sync.as_secs_f64()
    );
    println!(
        "  agent: ipcache updates:                   {updates} ({:.0} updates/s)",
        updates as f64 / sync.as_secs_f64()
    );
    println!(
        "  agent: resident memory growth:            {} KiB ({:.0} bytes per remote endpoint; the ip-cache target outside the process, as the kernel map is)",
        rss_after.saturating_sub(rss_before),
        per_ep
    );
    let params = serde_json::json!({
        "clusters": clusters, "nodes_per_cluster": nodes, "endpoints_per_node": per_node,
        "endpoints": clusters * nodes * per_node, "remote_endpoints": remote_endpoints,
    });
    let one = |v: f64| (v, v, v);
    let base = "plain prefix reads of all etcds (baseline)";
    let base_rate = read as f64 / baseline.as_secs_f64();
    record(
        &Figure::new(
            "bootstrap",
            base,
            "records/s",
            one(base_rate),
            Better::Higher,
        )
        .params(params.clone()),
    );
    record(
        &Figure::new(
            "bootstrap",
            "agent: records/s to full sync",
            "records/s",
            one(read as f64 / sync.as_secs_f64()),
            Better::Higher,
        )
        .baseline(base, base_rate)
        .params(params.clone()),
    );
    record(
        &Figure::new(
            "bootstrap",
            "agent: time to full sync",
            "s",
            one(sync.as_secs_f64()),
            Better::Lower,
        )
        .baseline(base, baseline.as_secs_f64())
        .params(params.clone()),
    );
    record(
        &Figure::new(
            "bootstrap",
            "agent: ipcache update rate during sync",
            "updates/s",
            one(updates as f64 / sync.as_secs_f64()),
            Better::Higher,
        )
        .params(params.clone()),
    );
    record(
        &Figure::new(
            "bootstrap",
            "agent: resident memory per remote endpoint (goal < 1024; leading product about 5 KB)",
            "bytes",
            one(per_ep),
            Better::Lower,
        )
        .baseline("goal", 1024.0)
        .params(params),
    );
}
