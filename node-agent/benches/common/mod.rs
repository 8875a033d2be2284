//! What the control-plane benchmarks on real pinned maps share
//! (`propagation`, `churn`): remote clusters as real etcds filled in the
//! exported schema, and an in-process agent on maps loaded by
//! `Datapath::load` whose reconcilers are the product's map writers.
#![allow(clippy::unwrap_used, dead_code)]

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use clustermesh_api::{IpCidr, StateKind};
use clustermesh_testkit::etcd::EtcdServer;
use etcd_client::{Client, Txn, TxnOp};
use node_agent::{
    clusters::{Agent, ClustersConfig, Reconcilers, config::ClusterFile},
    datapath::Datapath,
    desired::IpCacheEntry,
    reconcilers::{
        ReconcileError, Reconciler, SharedReconciler,
        ipcache::IpCacheMap,
        services::{LbPolicy, ServiceMap},
        tunnels::TunnelMap,
    },
};
use tokio_util::sync::CancellationToken;
use tunnel_common::IPPROTO_TCP;

pub const PORTS: &str = r#"[{"protocol":"TCP","port":80,"targetPort":8080}]"#;

pub fn endpoint_json(name: &str, ip: Ipv4Addr, identity: u32, host: &str) -> String {
    format!(r#"{{"ip":"{ip}","cluster":"{name}","identity":{identity},"hostIp":"{host}"}}"#)
}

pub fn node_json(name: &str, node: &str, underlay: &str, cidr: &str) -> String {
    format!(
        r#"{{"name":"{node}","cluster":"{name}","underlayIps":["{underlay}"],"podCidrs":["{cidr}"],"bootId":"b"}}"#
    )
}

pub fn service_json(name: &str, svc: &str, frontends: &[String], backends: &[Ipv4Addr]) -> String {
    let fe: Vec<String> = frontends.iter().map(|f| format!("\"{f}\"")).collect();
    let be: Vec<String> = backends
        .iter()
        .map(|b| format!(r#"{{"ip":"{b}","cluster":"{name}","state":"ready"}}"#))
        .collect();
    format!(
        r#"{{"cluster":"{name}","namespace":"default","name":"{svc}","frontends":[{}],"ports":{PORTS},"backends":[{}],"global":true,"shared":true}}"#,
        fe.join(","),
        be.join(",")
    )
}

/// The frontend of the service whose backends live in cluster `c`.
pub fn frontend(c: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, c as u8)
}

/// Addresses for changes in cluster `c`: inside its landing node's pod
/// CIDR 10.c.128.0/17.
pub fn landing_ip(c: usize, k: usize) -> Ipv4Addr {
    let k = k + 1;
    Ipv4Addr::new(10, c as u8, 128 + ((k / 256) % 128) as u8, (k % 256) as u8)
}

/// Fills cluster `c` of `clusters`: config, nodes with endpoints, a landing
/// node for the changes, services, sync canaries.
pub async fn fill(etcd: &EtcdServer, c: usize, clusters: usize, nodes: usize, per_node: usize) {
    let mut kv = Client::connect([etcd.endpoint()], None).await.unwrap();
    let name = format!("c{c}");
    let mut ops = vec![TxnOp::put(
        format!("clustermesh/cluster-config/{name}"),
        format!(r#"{{"id":{c},"name":"{name}"}}"#),
        None,
    )];
    for n in 0..nodes {
        ops.push(TxnOp::put(
            format!("clustermesh/state/nodes/v1/{name}/n{n}"),
            node_json(
                &name,
                &format!("n{n}"),
                &format!("172.16.{c}.{}", n + 1),
                &format!("10.{c}.{n}.0/24"),
            ),
            None,
        ));
        for e in 0..per_node {
            let ip = Ipv4Addr::new(10, c as u8, n as u8, (e + 1) as u8);
            ops.push(TxnOp::put(
                format!("clustermesh/state/ip/v1/{name}/{ip}"),
                endpoint_json(
                    &name,
                    ip,
                    ((c << 16) | (256 + e % 50)) as u32,
                    &format!("172.16.{c}.{}", n + 1),
                ),
                None,
            ));
            if ops.len() >= 100 {
                kv.txn(Txn::new().and_then(std::mem::take(&mut ops)))
                    .await
                    .unwrap();
            }
        }
    }
    ops.push(TxnOp::put(
        format!("clustermesh/state/nodes/v1/{name}/landing"),
        node_json(
            &name,
            "landing",
            &format!("172.16.{c}.250"),
            &format!("10.{c}.128.0/17"),
        ),
        None,
    ));
    if c == 1 {
        // The local cluster: one global service per remote cluster, its
        // backends all remote.
        for r in 2..=clusters {
            ops.push(TxnOp::put(
                format!("clustermesh/state/services/v1/{name}/default/s{r}"),
                service_json(&name, &format!("s{r}"), &[frontend(r).to_string()], &[]),
                None,
            ));
        }
    } else {
        ops.push(TxnOp::put(
            format!("clustermesh/state/services/v1/{name}/default/s{c}"),
            service_json(&name, &format!("s{c}"), &[], &[landing_ip(c, 0)]),
            None,
        ));
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

/// `clusters` real etcds, cluster c filled by [`fill`].
pub fn etcds(
    rt: &tokio::runtime::Runtime,
    clusters: usize,
    nodes: usize,
    per_node: usize,
) -> Vec<EtcdServer> {
    (1..=clusters)
        .map(|c| {
            let e = EtcdServer::start().unwrap();
            rt.block_on(fill(&e, c, clusters, nodes, per_node));
            e
        })
        .collect()
}

/// The agent of node n0 of cluster c1 (`etcds[0]`), connected to every
/// other etcd through files in `dir`, writing the maps pinned in `pins`;
/// `ipcache` is its ip-cache target (the product's `IpCacheMap`, maybe
/// wrapped); with `writes`, the tunnel and service maps' writes are
/// counted there ([`Signalled`]).
pub fn agent(
    etcds: &[EtcdServer],
    pins: &Path,
    dir: &Path,
    ipcache: Box<dyn Reconciler<IpCidr, IpCacheEntry>>,
    writes: Option<&Arc<Writes>>,
    cancel: CancellationToken,
) -> Agent {
    for (i, e) in etcds.iter().enumerate().skip(1) {
        std::fs::write(
            dir.join(format!("c{}", i + 1)),
            format!("endpoints: [{}]\n", e.endpoint()),
        )
        .unwrap();
    }
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
        clusters_dir: dir.to_owned(),
        stale_ttl: Duration::ZERO,
        sync_timeout: Duration::from_secs(600),
        poll_interval: Duration::from_millis(200),
        strict_ranges: Vec::new(),
    };
    let services = Box::new(
        ServiceMap::open(
            pins,
            LbPolicy {
                local_cluster: "c1".parse().unwrap(),
                failover_threshold: 0.5,
            },
        )
        .unwrap(),
    );
    let tunnels = Box::new(TunnelMap::open(pins).unwrap());
    let r = Reconcilers {
        ipcache,
        tunnels: Signalled::maybe(tunnels, writes),
        peers: Box::new(SharedReconciler::new("peers")),
        services: Signalled::maybe(services, writes),
        policy: Box::new(SharedReconciler::new("policy")),
        strict_ranges: Box::new(SharedReconciler::new("strict ranges")),
        network_policies: Box::new(SharedReconciler::new("network policies")),
        policy_cidrs: Box::new(SharedReconciler::new("policy CIDRs")),
    };
    Agent::new(cfg, r, cancel)
}

/// How many writes the wrapped targets have made; a waiter wakes at each.
#[derive(Default)]
pub struct Writes {
    count: Mutex<u64>,
    bumped: Condvar,
}

impl Writes {
    pub fn count(&self) -> u64 {
        *self.count.lock().unwrap()
    }

    fn bump(&self) {
        *self.count.lock().unwrap() += 1;
        self.bumped.notify_all();
    }

    /// Waits until the count passes `seen`, at most `limit`.
    pub fn wait_past(&self, seen: u64, limit: Duration) {
        let g = self.count.lock().unwrap();
        let _ = self.bumped.wait_timeout_while(g, limit, |n| *n <= seen);
    }
}

/// A target that counts each write it passed on (after the inner target
/// returned: the kernel map holds it then), so a benchmark reads the maps
/// when they changed instead of polling them.
pub struct Signalled<K, V> {
    pub inner: Box<dyn Reconciler<K, V>>,
    pub writes: Arc<Writes>,
}

impl<K: 'static, V: 'static> Signalled<K, V> {
    pub fn maybe(
        inner: Box<dyn Reconciler<K, V>>,
        writes: Option<&Arc<Writes>>,
    ) -> Box<dyn Reconciler<K, V>> {
        match writes {
            Some(w) => Box::new(Self {
                inner,
                writes: w.clone(),
            }),
            None => inner,
        }
    }
}

impl<K, V> Reconciler<K, V> for Signalled<K, V> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn update(&mut self, k: &K, v: &V) -> Result<(), ReconcileError> {
        let r = self.inner.update(k, v);
        self.writes.bump();
        r
    }
    fn delete(&mut self, k: &K) -> Result<(), ReconcileError> {
        let r = self.inner.delete(k);
        self.writes.bump();
        r
    }
    fn prune(
        &mut self,
        desired: &std::collections::BTreeMap<K, V>,
    ) -> Result<usize, ReconcileError> {
        let r = self.inner.prune(desired);
        self.writes.bump();
        r
    }
    fn snapshot(&mut self) -> Result<std::collections::BTreeMap<K, V>, ReconcileError> {
        self.inner.snapshot()
    }
    fn tick(&mut self, now: Instant) -> Result<(), ReconcileError> {
        // A tick may write (a service drains a backend slot).
        let r = self.inner.tick(now);
        self.writes.bump();
        r
    }
}

/// The product's ip-cache writer on the maps pinned in `pins`.
pub fn ipcache_map(pins: &Path) -> Box<dyn Reconciler<IpCidr, IpCacheEntry>> {
    Box::new(IpCacheMap::open(pins).unwrap())
}

/// Waits until every cluster synced and every remote service's first
/// backend is in the maps; the time it took since `t`.
pub fn await_sync(
    status: &std::sync::Arc<std::sync::Mutex<node_agent::clusters::AgentStatus>>,
    dp: &mut Datapath,
    clusters: usize,
    t: Instant,
) -> Duration {
    loop {
        let synced = status
            .lock()
            .map(|s| s.all_synced && s.clusters.len() == clusters)
            .unwrap_or(false);
        if synced
            && (2..=clusters).all(|c| {
                dp.lb_selectable(frontend(c), 80, IPPROTO_TCP).unwrap()
                    == Some(vec![(landing_ip(c, 0), 8080)])
            })
        {
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(300), "no sync in 5 min");
        std::thread::sleep(Duration::from_millis(5));
    }
}
