//! Propagation latency: time from a change written into a remote cluster's
//! etcd (in the exported schema, as its clustermesh-apiserver writes it)
//! until the corresponding entry is readable in the real, pinned eBPF maps
//! of a node of the local cluster.
//!
//! - the node: an in-process `node_agent::clusters::Agent` (cluster c1,
//!   node n0) whose reconcilers are the product's map writers
//!   (`IpCacheMap`, `TunnelMap`, `ServiceMap`) on maps created by
//!   `Datapath::load` in a bpffs directory; the benchmark reads the maps
//!   back through `Datapath` (bpf syscalls), polling every 20 µs;
//! - the changes, interleaved, rotating over the remote clusters:
//!   an endpoint added (-> its /32 ip-cache entry with its identity),
//!   a global service's backend changed (-> the frontend's selectable
//!   backend slot), a node added (-> its pod CIDR's tunnel entry);
//! - baseline, same run: a put into the same etcd until a plain etcd
//!   watcher receives the event (the floor any watcher pays);
//! - with each cluster count of `--clusters` (default 2, 10 and 50), every
//!   cluster prefilled with `--nodes` x `--endpoints` endpoints; each
//!   kind's p99 is then compared with the smallest mesh's (goal: the
//!   largest mesh within 1.5 x of it and below 50 ms).
//!
//! Each change is measured alone: written, then awaited, then the next.
//! Prints p50/p99 [min..max] in milliseconds. Needs root (eBPF, bpffs).
//! Usage: propagation [--changes N per kind] [--clusters 2,10,50]
//!        [--nodes N] [--endpoints E per node]
#![allow(clippy::unwrap_used)]

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use clustermesh_api::{IpCidr, StateKind};
use clustermesh_testkit::{
    etcd::EtcdServer,
    netns::PinDir,
    report::{Figure, Percentiles, record},
};
use etcd_client::{Client, Txn, TxnOp, WatchOptions};
use node_agent::{
    clusters::{Agent, ClustersConfig, Reconcilers, config::ClusterFile},
    datapath::Datapath,
    reconcilers::{
        SharedReconciler,
        ipcache::IpCacheMap,
        services::{LbPolicy, ServiceMap},
        tunnels::TunnelMap,
    },
};
use tokio_util::sync::CancellationToken;
use tunnel_common::IPPROTO_TCP;

const PORTS: &str = r#"[{"protocol":"TCP","port":80,"targetPort":8080}]"#;
const KINDS: [&str; 3] = [
    "endpoint added -> ip-cache entry",
    "service backend changed -> LB slot",
    "node added -> tunnel entry",
];

/// `--clusters 2,10`
fn cluster_counts() -> Vec<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--clusters")
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.split(',')
                .filter_map(|x| x.trim().parse().ok())
                .map(|n: usize| n.clamp(2, 100))
                .collect()
        })
        .unwrap_or_else(|| vec![2, 10, 50])
}

fn endpoint_json(name: &str, ip: Ipv4Addr, identity: u32, host: &str) -> String {
    format!(r#"{{"ip":"{ip}","cluster":"{name}","identity":{identity},"hostIp":"{host}"}}"#)
}

fn node_json(name: &str, node: &str, underlay: &str, cidr: &str) -> String {
    format!(
        r#"{{"name":"{node}","cluster":"{name}","underlayIps":["{underlay}"],"podCidrs":["{cidr}"],"bootId":"b"}}"#
    )
}

fn service_json(name: &str, svc: &str, frontends: &[String], backends: &[Ipv4Addr]) -> String {
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
fn frontend(c: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, c as u8)
}

/// Addresses for changes in cluster `c`: inside its landing node's pod
/// CIDR 10.c.128.0/17.
fn landing_ip(c: usize, k: usize) -> Ipv4Addr {
    let k = k + 1;
    Ipv4Addr::new(10, c as u8, 128 + ((k / 256) % 128) as u8, (k % 256) as u8)
}

/// Fills cluster `c` of `clusters`: config, nodes with endpoints, a landing
/// node for the changes, services, sync canaries.
async fn fill(etcd: &EtcdServer, c: usize, clusters: usize, nodes: usize, per_node: usize) {
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

/// Polls `ready` every 20 µs; the time since `t0`, or None after 10 s.
fn await_entry(t0: Instant, mut ready: impl FnMut() -> bool) -> Option<f64> {
    loop {
        if ready() {
            return Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

struct Run {
    baseline: Percentiles,
    kinds: Vec<(Percentiles, usize)>,
    sync: Duration,
}

fn run(
    rt: &tokio::runtime::Runtime,
    clusters: usize,
    changes: usize,
    nodes: usize,
    per_node: usize,
) -> Run {
    let mut etcds = Vec::new();
    for c in 1..=clusters {
        let e = EtcdServer::start().unwrap();
        rt.block_on(fill(&e, c, clusters, nodes, per_node));
        etcds.push(e);
    }
    let clients: Vec<Client> = etcds
        .iter()
        .map(|e| rt.block_on(Client::connect([e.endpoint()], None)).unwrap())
        .collect();

    let pins = PinDir::new("prop").unwrap();
    let mut dp = Datapath::load(pins.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (i, e) in etcds.iter().enumerate().skip(1) {
        std::fs::write(
            dir.path().join(format!("c{}", i + 1)),
            format!("endpoints: [{}]\n", e.endpoint()),
        )
        .unwrap();
    }
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
        poll_interval: Duration::from_millis(200),
        strict_ranges: Vec::new(),
    };
    let r = Reconcilers {
        ipcache: Box::new(IpCacheMap::open(pins.path()).unwrap()),
        tunnels: Box::new(TunnelMap::open(pins.path()).unwrap()),
        peers: Box::new(SharedReconciler::new("peers")),
        services: Box::new(
            ServiceMap::open(
                pins.path(),
                LbPolicy {
                    local_cluster: "c1".parse().unwrap(),
                    failover_threshold: 0.5,
                },
            )
            .unwrap(),
        ),
        policy: Box::new(SharedReconciler::new("policy")),
        strict_ranges: Box::new(SharedReconciler::new("strict ranges")),
        network_policies: Box::new(SharedReconciler::new("network policies")),
        policy_cidrs: Box::new(SharedReconciler::new("policy CIDRs")),
    };
    let agent = Agent::new(cfg, r, cancel.clone());
    let status = agent.status();
    let t = Instant::now();
    let task = rt.spawn(agent.run());
    // Synced: every cluster, and every remote service's first backend in
    // the maps.
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
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "no sync in 5 min");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = t.elapsed();

    // Baseline: put -> event at a plain watcher, same etcd as the changes.
    let baseline = rt.block_on(async {
        let mut out = Vec::new();
        for c in 2..=clusters {
            let mut kv = clients[c - 1].clone();
            let mut stream = kv
                .watch("bench/", Some(WatchOptions::new().with_prefix()))
                .await
                .unwrap();
            let n = changes / (clusters - 1) + usize::from(c - 2 < changes % (clusters - 1));
            for i in 0..n {
                let t0 = Instant::now();
                kv.put(format!("bench/{i}"), "x", None).await.unwrap();
                loop {
                    let m = stream.message().await.unwrap().unwrap();
                    if !m.events().is_empty() {
                        break;
                    }
                }
                out.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        Percentiles::of(out)
    });

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
    let mut timeouts = [0usize; KINDS.len()];
    for i in 0..changes {
        let c = 2 + i % (clusters - 1);
        let k = i / (clusters - 1); // changes so far in cluster c, per kind
        let name = format!("c{c}");
        let mut kv = clients[c - 1].clone();
        for (kind, out) in samples.iter_mut().enumerate() {
            let t0 = Instant::now();
            let took = match kind {
                0 => {
                    // An endpoint added on the landing node.
                    let ip = landing_ip(c, 1 + k);
                    let identity = ((c << 16) | (1000 + k % 1000)) as u32;
                    rt.block_on(kv.put(
                        format!("clustermesh/state/ip/v1/{name}/{ip}"),
                        endpoint_json(&name, ip, identity, &format!("172.16.{c}.250")),
                        None,
                    ))
                    .unwrap();
                    await_entry(t0, || {
                        dp.lookup(ip)
                            .unwrap()
                            .is_some_and(|v| v.identity == identity)
                    })
                }
                1 => {
                    // The service's one backend replaced by another.
                    let ip = landing_ip(c, 20_000 + k % 10_000);
                    rt.block_on(kv.put(
                        format!("clustermesh/state/services/v1/{name}/default/s{c}"),
                        service_json(&name, &format!("s{c}"), &[], &[ip]),
                        None,
                    ))
                    .unwrap();
                    await_entry(t0, || {
                        dp.lb_selectable(frontend(c), 80, IPPROTO_TCP).unwrap()
                            == Some(vec![(ip, 8080)])
                    })
                }
                _ => {
                    // A node added, its pod CIDR in (64+c).0.0.0/8.
                    let cidr: IpCidr = format!("{}.{}.{}.0/24", 64 + c, k / 256, k % 256)
                        .parse()
                        .unwrap();
                    let probe = Ipv4Addr::new((64 + c) as u8, (k / 256) as u8, (k % 256) as u8, 1);
                    let underlay =
                        Ipv4Addr::new(172, (16 + c) as u8, (k / 256) as u8, (k % 256) as u8);
                    rt.block_on(kv.put(
                        format!("clustermesh/state/nodes/v1/{name}/added{k}"),
                        node_json(
                            &name,
                            &format!("added{k}"),
                            &underlay.to_string(),
                            &cidr.to_string(),
                        ),
                        None,
                    ))
                    .unwrap();
                    let want = u32::from(underlay).to_be();
                    await_entry(t0, || {
                        dp.lookup(probe)
                            .unwrap()
                            .is_some_and(|v| v.tunnel_endpoint == want)
                    })
                }
            };
            match took {
                Some(ms) => out.push(ms),
                None => timeouts[kind] += 1,
            }
        }
    }
    cancel.cancel();
    let _ = rt.block_on(task);
    drop(dp);
    drop(pins);
    Run {
        baseline,
        kinds: samples
            .into_iter()
            .zip(timeouts)
            .map(|(s, t)| (Percentiles::of(s), t))
            .collect(),
        sync,
    }
}

fn main() {
    if !clustermesh_testkit::bench_may_run("propagation", "eBPF maps on bpffs") {
        return;
    }
    let changes = (clustermesh_testkit::bench_arg("--changes", 1000) as usize).max(1);
    let nodes = (clustermesh_testkit::bench_arg("--nodes", 40) as usize).clamp(1, 100);
    let per_node = (clustermesh_testkit::bench_arg("--endpoints", 250) as usize).clamp(0, 250);
    let counts = cluster_counts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "propagation benchmark: change written into a remote cluster's etcd -> entry readable in the real pinned eBPF maps of a node (in-process Agent, reconcilers IpCacheMap/TunnelMap/ServiceMap; maps polled every 20 us), {changes} changes per kind, each cluster prefilled with {nodes} nodes x {per_node} endpoints; p50 / p99 [min..max]"
    );
    let ms = |p: &Percentiles| {
        format!(
            "p50 {:>6.2} ms  p99 {:>6.2} ms  [{:.2}..{:.2}]",
            p.p50, p.p99, p.min, p.max
        )
    };
    let mut runs: Vec<(usize, Run)> = Vec::new();
    for clusters in counts {
        let r = run(&rt, clusters, changes, nodes, per_node);
        let params = serde_json::json!({
            "clusters": clusters, "changes": changes, "nodes": nodes, "endpoints_per_node": per_node,
            "target": "real pinned eBPF maps (Datapath::load on bpffs)",
        });
        println!(
            "  {clusters} clusters ({} endpoints in all; initial sync {:.2?}):",
            clusters * nodes * per_node,
            r.sync
        );
        let base_name = "etcd put -> event at a plain watcher (baseline)";
        println!("    {base_name:<48} {}", ms(&r.baseline));
        record(
            &Figure::latency(
                "propagation",
                format!("{clusters} clusters: {base_name}"),
                "ms",
                &r.baseline,
            )
            .params(params.clone()),
        );
        for ((p, timeouts), kind) in r.kinds.iter().zip(KINDS) {
            let to = if *timeouts > 0 {
                format!("  {timeouts} never seen within 10 s")
            } else {
                String::new()
            };
            println!(
                "    {kind:<48} {}  p50 x{:.1} baseline{to}",
                ms(p),
                p.p50 / r.baseline.p50
            );
            record(
                &Figure::latency(
                    "propagation",
                    format!("{clusters} clusters: {kind}"),
                    "ms",
                    p,
                )
                .baseline(format!("{clusters} clusters: {base_name}"), r.baseline.p50)
                .params(params.clone()),
            );
        }
        runs.push((clusters, r));
    }
    // Flat in mesh size: each kind's p99 at every size against the
    // smallest mesh of the same run.
    let Some((small, first)) = runs.first() else {
        return;
    };
    println!("  p99 against {small} clusters (goal: the largest mesh <= 1.5 x and < 50 ms):");
    for (i, kind) in KINDS.iter().enumerate() {
        let base = first.kinds[i].0.p99;
        let row: Vec<String> = runs
            .iter()
            .map(|(n, r)| {
                let p = r.kinds[i].0.p99;
                format!("{n}: {p:.2} ms (x{:.2})", p / base)
            })
            .collect();
        let (largest, last) = &runs[runs.len() - 1];
        let p = last.kinds[i].0.p99;
        let met = p <= 1.5 * base && p < 50.0 && last.kinds[i].1 == 0;
        println!(
            "    {kind:<48} {}  {} clusters: goal {}",
            row.join("  "),
            largest,
            if met { "met" } else { "NOT met" }
        );
    }
}
