//! Propagation latency: time from a change written into a remote cluster's
//! etcd (in the exported schema, as its clustermesh-apiserver writes it)
//! until the corresponding entry is readable in the real, pinned eBPF maps
//! of a node of the local cluster.
//!
//! - the node: an in-process `node_agent::clusters::Agent` (cluster c1,
//!   node n0) whose reconcilers are the product's map writers
//!   (`IpCacheMap`, `TunnelMap`, `ServiceMap`) on maps created by
//!   `Datapath::load` in a bpffs directory; the benchmark reads the maps
//!   back through `Datapath` (bpf syscalls) each time one of those
//!   writers has written (`common::Signalled`: counted once the bpf call
//!   returned; no poller competes with the agent for the two cores);
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

mod common;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use clustermesh_api::IpCidr;
use clustermesh_testkit::{
    netns::PinDir,
    report::{Figure, Percentiles, record},
};
use common::{Signalled, Writes, endpoint_json, frontend, landing_ip, node_json, service_json};
use etcd_client::{Client, WatchOptions};
use node_agent::datapath::Datapath;
use tokio_util::sync::CancellationToken;
use tunnel_common::IPPROTO_TCP;

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

/// Reads the maps (`ready`) after each write of the agent's map writers
/// (and every 5 ms regardless); the time since `t0` when `ready` first
/// holds, or None after 10 s.
fn await_entry(t0: Instant, writes: &Writes, mut ready: impl FnMut() -> bool) -> Option<f64> {
    loop {
        let seen = writes.count();
        if ready() {
            return Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return None;
        }
        writes.wait_past(seen, Duration::from_millis(5));
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
    let etcds = common::etcds(rt, clusters, nodes, per_node);
    let clients: Vec<Client> = etcds
        .iter()
        .map(|e| rt.block_on(Client::connect([e.endpoint()], None)).unwrap())
        .collect();

    let pins = PinDir::new("prop").unwrap();
    let mut dp = Datapath::load(pins.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let writes = std::sync::Arc::new(Writes::default());
    let ipcache = Signalled::maybe(common::ipcache_map(pins.path()), Some(&writes));
    let agent = common::agent(
        &etcds,
        pins.path(),
        dir.path(),
        ipcache,
        Some(&writes),
        cancel.clone(),
    );
    let status = agent.status();
    let t = Instant::now();
    let task = rt.spawn(agent.run());
    let sync = common::await_sync(&status, &mut dp, clusters, t);

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
                    await_entry(t0, &writes, || {
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
                    await_entry(t0, &writes, || {
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
                    await_entry(t0, &writes, || {
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
        "propagation benchmark: change written into a remote cluster's etcd -> entry readable in the real pinned eBPF maps of a node (in-process Agent, reconcilers IpCacheMap/TunnelMap/ServiceMap; maps read after each write of the map writers), {changes} changes per kind, each cluster prefilled with {nodes} nodes x {per_node} endpoints; p50 / p99 [min..max]"
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
    // The same ratio of the plain watcher: what the machine alone adds
    // with more etcds running (the agent's figure includes it).
    let row: Vec<String> = runs
        .iter()
        .map(|(n, r)| {
            let p = r.baseline.p99;
            format!("{n}: {p:.2} ms (x{:.2})", p / first.baseline.p99)
        })
        .collect();
    println!(
        "    {:<48} {}",
        "plain watcher (baseline, for reference)",
        row.join("  ")
    );
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
