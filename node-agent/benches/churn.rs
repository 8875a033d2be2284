//! Churn (issue 20), modelled on Cilium's scale CI (mock clusters writing
//! about 325 updates/s across the mesh): remote clusters keep changing
//! while a node's agent follows them into its real pinned eBPF maps.
//!
//! - the mesh: `--clusters` real etcds (cluster c1 local, the others
//!   remote), each prefilled with `--nodes` x `--endpoints` endpoints in
//!   the exported schema; the agent: the in-process `Agent` of node n0 of
//!   c1 with the product's map writers on maps from `Datapath::load`;
//! - the churn: for `--seconds`, `--rate` endpoint updates per second in
//!   all, round-robin over the remote clusters, each an endpoint added, an
//!   endpoint's identity changed or an endpoint deleted (a third each once
//!   every cluster has 100 churned endpoints); no key is written again
//!   before its last write was applied;
//! - each update's propagation: from just before the etcd put until the
//!   product's `IpCacheMap` wrote (or deleted) the entry in `CM_IPCACHE`
//!   (the map writer is wrapped to take the time); baseline, same run,
//!   same updates: until a plain etcd watcher of the same etcd got the
//!   event;
//! - every second: updates written and applied, updates in flight, the
//!   agent's event queue (depth now, and its peak over the last 10-20 s)
//!   and this process's resident memory
//!   (the agent and the bench's bookkeeping; the etcds are other
//!   processes);
//! - sync errors: updates never applied (10 s after the churn stopped),
//!   entries a target refused, reconnects and clusters with an error.
//!
//! Needs root (eBPF, bpffs). Usage: churn [--clusters N] [--nodes N]
//! [--endpoints E per node] [--rate R] [--seconds S] [--every S]
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clustermesh_api::IpCidr;
use clustermesh_testkit::{
    netns::PinDir,
    report::{Better, Figure, Percentiles, record},
};
use common::{endpoint_json, landing_ip};
use etcd_client::{Client, WatchOptions};
use node_agent::{
    datapath::Datapath,
    desired::IpCacheEntry,
    reconcilers::{ReconcileError, Reconciler},
};
use tokio_util::sync::CancellationToken;

/// Churned endpoints a cluster keeps before it also deletes.
const LIVE: usize = 100;
/// Addresses a cluster's churn cycles through (its landing node's
/// 10.c.128.0/17 holds 32,767).
const POOL: usize = 30_000;

/// Update times, by address, until something sees them.
type Pending = Arc<Mutex<HashMap<IpAddr, Instant>>>;

/// Latencies seen, in milliseconds.
#[derive(Default)]
struct Seen {
    ms: Vec<f64>,
}

/// The product's ip-cache writer, timing each entry written or deleted
/// whose update is pending.
struct Timed {
    inner: Box<dyn Reconciler<IpCidr, IpCacheEntry>>,
    pending: Pending,
    seen: Arc<Mutex<Seen>>,
}

impl Timed {
    fn done(&self, k: &IpCidr) {
        if k.prefix_len() != 32 {
            return;
        }
        let t = self.pending.lock().unwrap().remove(&k.addr());
        if let Some(t) = t {
            self.seen
                .lock()
                .unwrap()
                .ms
                .push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
}

impl Reconciler<IpCidr, IpCacheEntry> for Timed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn update(&mut self, k: &IpCidr, v: &IpCacheEntry) -> Result<(), ReconcileError> {
        self.inner.update(k, v)?;
        self.done(k);
        Ok(())
    }
    fn delete(&mut self, k: &IpCidr) -> Result<(), ReconcileError> {
        self.inner.delete(k)?;
        self.done(k);
        Ok(())
    }
    fn prune(
        &mut self,
        desired: &std::collections::BTreeMap<IpCidr, IpCacheEntry>,
    ) -> Result<usize, ReconcileError> {
        self.inner.prune(desired)
    }
    fn snapshot(
        &mut self,
    ) -> Result<std::collections::BTreeMap<IpCidr, IpCacheEntry>, ReconcileError> {
        self.inner.snapshot()
    }
    fn tick(&mut self, now: Instant) -> Result<(), ReconcileError> {
        self.inner.tick(now)
    }
}

/// One remote cluster's churn: the endpoints it added and still has.
struct Churn {
    c: usize,
    live: VecDeque<(Ipv4Addr, u32)>,
    next: usize,
    step: u64,
}

impl Churn {
    /// The next update: the key, and the value (None: a delete).
    fn next(&mut self) -> (String, Ipv4Addr, Option<String>) {
        let name = format!("c{}", self.c);
        self.step += 1;
        let identity = |step: u64| ((self.c << 16) as u32) | (2000 + (step % 1000) as u32);
        let host = format!("172.16.{}.250", self.c);
        let op = if self.live.len() < LIVE {
            0
        } else {
            self.step % 3
        };
        let (ip, value) = match op {
            0 => {
                // Added (the pool is far larger than what is live).
                self.next = self.next % POOL + 1;
                let ip = landing_ip(self.c, self.next);
                let id = identity(self.step);
                self.live.push_back((ip, id));
                (ip, Some(endpoint_json(&name, ip, id, &host)))
            }
            1 => {
                // The oldest changes identity.
                let (ip, _) = self.live.pop_front().unwrap();
                let id = identity(self.step);
                self.live.push_back((ip, id));
                (ip, Some(endpoint_json(&name, ip, id, &host)))
            }
            _ => {
                let (ip, _) = self.live.pop_front().unwrap();
                (ip, None)
            }
        };
        (format!("clustermesh/state/ip/v1/{name}/{ip}"), ip, value)
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Writes the churn at `rate` updates/s until `stop`; counts writes.
async fn write(
    clients: Vec<Client>,
    rate: u64,
    pending: [Pending; 2],
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut churns: Vec<Churn> = (2..=clients.len())
        .map(|c| Churn {
            c,
            live: VecDeque::new(),
            next: 0,
            step: 0,
        })
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let n = churns.len();
        let ch = &mut churns[i % n];
        i += 1;
        let mut kv = clients[ch.c - 1].clone();
        let (key, ip, value) = ch.next();
        let t = Instant::now();
        for p in &pending {
            p.lock().unwrap().insert(IpAddr::V4(ip), t);
        }
        match value {
            Some(v) => kv.put(key, v, None).await.map(|_| ()),
            None => kv.delete(key, None).await.map(|_| ()),
        }
        .unwrap();
        written.fetch_add(1, Ordering::Relaxed);
    }
}

/// The baseline: a plain watcher of cluster `c`'s endpoints.
async fn watch(mut kv: Client, c: usize, pending: Pending, seen: Arc<Mutex<Seen>>) {
    let prefix = format!("clustermesh/state/ip/v1/c{c}/");
    let mut stream = kv
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    while let Ok(Some(m)) = stream.message().await {
        for e in m.events() {
            let Some(kv) = e.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let Some(ip) = key
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<IpAddr>().ok())
            else {
                continue;
            };
            if let Some(t) = pending.lock().unwrap().remove(&ip) {
                seen.lock()
                    .unwrap()
                    .ms
                    .push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
}

/// One row of the time series.
struct Sample {
    t: f64,
    written: u64,
    applied: usize,
    in_flight: usize,
    queue: u64,
    queue_peak: u64,
    recent_peak: u64,
    rss: u64,
}

fn main() {
    if !clustermesh_testkit::bench_may_run("churn", "eBPF maps on bpffs") {
        return;
    }
    let clusters = (clustermesh_testkit::bench_arg("--clusters", 10) as usize).clamp(2, 100);
    let nodes = (clustermesh_testkit::bench_arg("--nodes", 40) as usize).clamp(1, 100);
    let per_node = (clustermesh_testkit::bench_arg("--endpoints", 250) as usize).clamp(0, 250);
    let rate = clustermesh_testkit::bench_arg("--rate", 325).clamp(1, 5000);
    let seconds = clustermesh_testkit::bench_arg("--seconds", 60).max(1);
    let every = clustermesh_testkit::bench_arg("--every", 10).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "churn benchmark: {clusters} clusters, each prefilled with {nodes} nodes x {per_node} endpoints; {rate} endpoint updates/s (added, identity changed, deleted) round-robin over the {} remote clusters for {seconds} s; propagation from the etcd put until the product's IpCacheMap wrote CM_IPCACHE, baseline a plain etcd watcher of the same updates",
        clusters - 1
    );
    let etcds = common::etcds(&rt, clusters, nodes, per_node);
    let clients: Vec<Client> = etcds
        .iter()
        .map(|e| rt.block_on(Client::connect([e.endpoint()], None)).unwrap())
        .collect();
    let pins = PinDir::new("churn").unwrap();
    let mut dp = Datapath::load(pins.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let pending: [Pending; 2] = Default::default();
    let seen: [Arc<Mutex<Seen>>; 2] = Default::default();
    let ipcache = Box::new(Timed {
        inner: common::ipcache_map(pins.path()),
        pending: pending[0].clone(),
        seen: seen[0].clone(),
    });
    let agent = common::agent(
        &etcds,
        pins.path(),
        dir.path(),
        ipcache,
        None,
        cancel.clone(),
    );
    let status = agent.status();
    let rss_synced_before = rss();
    let task = rt.spawn(agent.run());
    let sync = common::await_sync(&status, &mut dp, clusters, Instant::now());
    let rss0 = rss();
    println!(
        "  initial sync of {} endpoints: {sync:.2?}; resident memory {:.1} MiB (before the agent: {:.1} MiB)",
        clusters * nodes * per_node,
        rss0 as f64 / (1 << 20) as f64,
        rss_synced_before as f64 / (1 << 20) as f64
    );
    let reconnects0: u64 = status
        .lock()
        .unwrap()
        .clusters
        .iter()
        .map(|c| c.reconnects)
        .sum();
    for (c, kv) in clients.iter().enumerate().skip(1) {
        rt.spawn(watch(
            kv.clone(),
            c + 1,
            pending[1].clone(),
            seen[1].clone(),
        ));
    }
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = rt.spawn(write(
        clients.clone(),
        rate,
        pending.clone(),
        written.clone(),
        stop.clone(),
    ));
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut refused_seen = 0usize;
    let mut errored = 0usize;
    let mut errors = std::collections::BTreeSet::new();
    println!(
        "    {:>5}  {:>9}  {:>9}  {:>9}  {:>11}  {:>10}  {:>9}",
        "t (s)", "written", "applied", "in flight", "queue now", "peak 10-20s", "RSS MiB"
    );
    let mut next = Duration::from_secs(1);
    while t0.elapsed() < Duration::from_secs(seconds) {
        // One sample a second (a sampling period, not a wait).
        std::thread::sleep(next.saturating_sub(t0.elapsed()));
        next += Duration::from_secs(1);
        let st = status.lock().unwrap().clone();
        refused_seen = refused_seen.max(st.reconcile_errors.len());
        for c in &st.clusters {
            if let Some(e) = &c.last_error {
                errors.insert(format!("{}: {e}", c.name));
            }
        }
        for f in &st.reconcile_errors {
            errors.insert(format!("{} {}: {}", f.target, f.key, f.error));
        }
        errored = errored.max(
            st.clusters
                .iter()
                .filter(|c| !c.connected || c.last_error.is_some())
                .count(),
        );
        let s = Sample {
            t: t0.elapsed().as_secs_f64(),
            written: written.load(Ordering::Relaxed),
            applied: seen[0].lock().unwrap().ms.len(),
            in_flight: pending[0].lock().unwrap().len(),
            queue: st.event_queue.depth,
            queue_peak: st.event_queue.peak,
            recent_peak: st.event_queue.recent_peak,
            rss: rss(),
        };
        if samples.len() as u64 % every == every - 1 {
            println!(
                "    {:>5.0}  {:>9}  {:>9}  {:>9}  {:>11}  {:>10}  {:>9.1}",
                s.t,
                s.written,
                s.applied,
                s.in_flight,
                s.queue,
                s.recent_peak,
                s.rss as f64 / (1 << 20) as f64
            );
        }
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(writer).unwrap();
    let elapsed = t0.elapsed();
    let total = written.load(Ordering::Relaxed);
    // The last updates: applied within 10 s, or lost.
    let t_end = Instant::now();
    while !pending[0].lock().unwrap().is_empty() && t_end.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let lost = pending[0].lock().unwrap().len();
    let st = status.lock().unwrap().clone();
    let reconnects = st.clusters.iter().map(|c| c.reconnects).sum::<u64>() - reconnects0;
    let sync_errors = lost + refused_seen + errored + reconnects as usize;
    cancel.cancel();
    let _ = rt.block_on(task);
    drop(dp);
    drop(pins);

    let agent_p = Percentiles::of(std::mem::take(&mut seen[0].lock().unwrap().ms));
    let base_p = Percentiles::of(std::mem::take(&mut seen[1].lock().unwrap().ms));
    let per_s = total as f64 / elapsed.as_secs_f64();
    let params = serde_json::json!({
        "clusters": clusters, "nodes": nodes, "endpoints_per_node": per_node,
        "rate": rate, "seconds": seconds,
    });
    println!(
        "  updates sustained: {per_s:.0}/s of {rate}/s asked (x{:.2}); {total} written",
        per_s / rate as f64
    );
    record(
        &Figure::new(
            "churn",
            "updates/s sustained",
            "updates/s",
            (per_s, per_s, per_s),
            Better::Higher,
        )
        .baseline("updates/s asked", rate as f64)
        .params(params.clone()),
    );
    let ms = |p: &Percentiles| {
        format!(
            "p50 {:>6.2} ms  p99 {:>6.2} ms  [{:.2}..{:.2}]",
            p.p50, p.p99, p.min, p.max
        )
    };
    let base_name = "etcd put -> event at a plain watcher (baseline)";
    let name = "etcd put -> CM_IPCACHE written by the agent";
    println!("    {base_name:<46} {}", ms(&base_p));
    println!(
        "    {name:<46} {}  p99 x{:.1} baseline",
        ms(&agent_p),
        agent_p.p99 / base_p.p99
    );
    record(&Figure::latency("churn", base_name, "ms", &base_p).params(params.clone()));
    record(
        &Figure::latency("churn", name, "ms", &agent_p)
            .baseline(base_name, base_p.p50)
            .params(params.clone()),
    );
    // The queue's peak in the churn: the recent peaks from 20 s on (before,
    // they reach back to the initial sync, which fills the queue).
    let sync_peak = samples.first().map_or(0, |s| s.queue_peak);
    let late: Vec<u64> = samples
        .iter()
        .filter(|s| s.t >= 20.0)
        .map(|s| s.recent_peak)
        .collect();
    let peak_queue = late
        .iter()
        .copied()
        .max()
        .unwrap_or_else(|| samples.iter().map(|s| s.recent_peak).max().unwrap_or(0));
    let peak_flight = samples.iter().map(|s| s.in_flight).max().unwrap_or(0);
    let rss_max = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let rss_last = samples.last().map_or(0, |s| s.rss);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "  sync errors: {sync_errors} (updates lost {lost}, entries refused {refused_seen}, clusters in error {errored}, reconnects {reconnects})"
    );
    for e in &errors {
        println!("    error seen: {e}");
    }
    println!(
        "  event queue peak in the churn {peak_queue} of {} (in the initial sync {sync_peak}); updates in flight at most {peak_flight}; resident memory after sync {:.1} MiB, at most {:.1} MiB, at the end {:.1} MiB (x{:.3} of after sync)",
        st.event_queue.capacity,
        mib(rss0),
        mib(rss_max),
        mib(rss_last),
        rss_last as f64 / rss0.max(1) as f64
    );
    record(
        &Figure::new(
            "churn",
            "sync errors",
            "errors",
            (sync_errors as f64, sync_errors as f64, sync_errors as f64),
            Better::Lower,
        )
        .params(params.clone()),
    );
    record(
        &Figure::new(
            "churn",
            "event queue peak in the churn",
            "events",
            (peak_queue as f64, 0.0, peak_queue as f64),
            Better::Lower,
        )
        .params(params.clone()),
    );
    record(
        &Figure::new(
            "churn",
            "resident memory at the end of the churn",
            "MiB",
            (mib(rss_last), mib(rss0), mib(rss_max)),
            Better::Lower,
        )
        .baseline("resident memory after the initial sync", mib(rss0))
        .params(params),
    );
}
