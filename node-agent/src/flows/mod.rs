//! Flow observability on the node (docs/observability.md).
//!
//! ```text
//! programs --CM_FLOWS ring buffer--> reader (decode, Directory::flow)
//!     --> Observer: the last N flows (bounded), a broadcast for followers,
//!         per-flow metrics --> server (gRPC Observer, mTLS) / export (JSON lines)
//! ```
//!
//! - [`directory`]: addresses to pods, nodes, services of every connected
//!   cluster, and the event-to-flow conversion (pure);
//! - [`Observer`]: the bounded buffer and its counters (what was seen and
//!   what was lost, where);
//! - [`read`]: the task that drains the ring buffer;
//! - [`server`]: the `clustermesh.v1.Observer` gRPC service;
//! - [`export`]: the SIEM export file.

pub mod directory;
pub mod export;
pub mod server;

use std::{
    collections::{BTreeMap, VecDeque},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clustermesh_api::{
    flow::Filter,
    proto::{Flow, ObserverStatus},
};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tunnel_common::FlowEvent;

pub use directory::Directory;

/// Which events the datapath emits (`--flow-events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Events {
    Off,
    Drops,
    #[default]
    All,
}

impl Events {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "drops" => Some(Self::Drops),
            "all" => Some(Self::All),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Drops => "drops",
            Self::All => "all",
        }
    }

    /// The `CM_FLOW_CONFIG` flags.
    pub fn flags(self) -> u32 {
        match self {
            Self::Off => 0,
            Self::Drops => tunnel_common::FLOW_CONFIG_DROPS,
            Self::All => tunnel_common::FLOW_CONFIG_DROPS | tunnel_common::FLOW_CONFIG_TRACES,
        }
    }
}

/// Flows by (verdict, drop reason, source cluster, destination cluster),
/// for `clustermesh_agent_flows_total`.
pub type FlowCounts = BTreeMap<(String, String, String, String), u64>;

struct Ring {
    flows: VecDeque<Arc<Flow>>,
    next: u64,
    counts: FlowCounts,
}

/// The node's last flows and what its pipeline saw and lost.
pub struct Observer {
    ring: Mutex<Ring>,
    capacity: usize,
    tx: broadcast::Sender<Arc<Flow>>,
    pub seen: AtomicU64,
    pub lost_decode: AtomicU64,
    pub lost_followers: AtomicU64,
    /// The datapath's count of events the ring buffer had no room for
    /// (`CM_FLOW_LOST`), refreshed by the reader.
    pub lost_datapath: AtomicU64,
    pub events: Events,
    pub trace_interval: Duration,
    directory: watch::Receiver<Arc<Directory>>,
    export: std::sync::OnceLock<Arc<Mutex<export::Exporter>>>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// Keeps the last `capacity` flows (at least 1).
    pub fn new(
        capacity: usize,
        events: Events,
        trace_interval: Duration,
        directory: watch::Receiver<Arc<Directory>>,
    ) -> Arc<Self> {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity.min(4096));
        Arc::new(Self {
            ring: Mutex::new(Ring {
                flows: VecDeque::with_capacity(capacity.min(65_536)),
                next: 1,
                counts: FlowCounts::new(),
            }),
            capacity,
            tx,
            seen: AtomicU64::new(0),
            lost_decode: AtomicU64::new(0),
            lost_followers: AtomicU64::new(0),
            lost_datapath: AtomicU64::new(0),
            events,
            trace_interval,
            directory,
            export: std::sync::OnceLock::new(),
        })
    }

    /// The export whose figures the metrics show.
    pub fn set_export(&self, e: Arc<Mutex<export::Exporter>>) {
        let _ = self.export.set(e);
    }

    pub fn export_stats(&self) -> Option<export::ExportStats> {
        self.export
            .get()
            .and_then(|e| e.lock().ok().map(|g| g.stats()))
    }

    /// Enriches one event and keeps it (the oldest goes when full).
    pub fn record(&self, ev: &FlowEvent, time_unix_nanos: u64) -> Arc<Flow> {
        self.seen.fetch_add(1, Ordering::Relaxed);
        let dir = self.directory.borrow().clone();
        let mut ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = ring.next;
        ring.next += 1;
        let flow = Arc::new(dir.flow(ev, time_unix_nanos, seq));
        let cluster = |e: &Option<clustermesh_api::proto::FlowEndpoint>| {
            e.as_ref().map(|e| e.cluster.clone()).unwrap_or_default()
        };
        *ring
            .counts
            .entry((
                flow.verdict.clone(),
                flow.drop_reason.clone(),
                cluster(&flow.source),
                cluster(&flow.destination),
            ))
            .or_default() += flow.packets.max(1);
        if ring.flows.len() >= self.capacity {
            ring.flows.pop_front();
        }
        ring.flows.push_back(flow.clone());
        drop(ring);
        // No follower is not an error.
        let _ = self.tx.send(flow.clone());
        flow
    }

    /// The buffered flows matching `filter` since `since` (Unix nanos; 0:
    /// any), the last `last` of them (0: all).
    pub fn query(&self, filter: &Filter, last: usize, since: u64) -> Vec<Arc<Flow>> {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<Arc<Flow>> = ring
            .flows
            .iter()
            .filter(|f| f.time_unix_nanos >= since && filter.matches(f))
            .cloned()
            .collect();
        if last != 0 && out.len() > last {
            out.drain(..out.len() - last);
        }
        out
    }

    /// New flows as they are recorded.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.tx.subscribe()
    }

    pub fn counts(&self) -> FlowCounts {
        self.ring
            .lock()
            .map(|r| r.counts.clone())
            .unwrap_or_default()
    }

    pub fn status(&self) -> ObserverStatus {
        let dir = self.directory.borrow().clone();
        let buffered = self.ring.lock().map(|r| r.flows.len()).unwrap_or_default();
        ObserverStatus {
            cluster: dir.cluster().to_owned(),
            node: dir.node().to_owned(),
            seen: self.seen.load(Ordering::Relaxed),
            buffered: buffered as u64,
            capacity: self.capacity as u64,
            lost_datapath: self.lost_datapath.load(Ordering::Relaxed),
            lost_decode: self.lost_decode.load(Ordering::Relaxed),
            lost_followers: self.lost_followers.load(Ordering::Relaxed),
            trace_interval_ms: self.trace_interval.as_millis() as u64,
            events: self.events.name().into(),
        }
    }
}

/// One event out of the ring buffer's bytes; None: not one (wrong size).
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is repr(C) plain data (every bit pattern valid),
    // the length is checked, and read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// Wall-clock nanoseconds minus CLOCK_MONOTONIC nanoseconds (what
/// `bpf_ktime_get_ns` counts), to stamp events.
pub fn monotonic_offset() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64;
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    wall.saturating_sub(mono)
}

/// Writes `CM_FLOW_CONFIG` through its pin.
pub fn configure(pin_dir: &Path, events: Events, trace_interval: Duration) -> anyhow::Result<()> {
    crate::datapath::set_flow_config(
        pin_dir,
        tunnel_common::FlowConfig {
            flags: events.flags(),
            _pad: 0,
            trace_interval_ns: trace_interval.as_nanos() as u64,
        },
    )?;
    Ok(())
}

/// What the reader hands each flow to besides the buffer (the export).
pub type Sink = Box<dyn FnMut(&Flow) + Send>;

/// Drains `CM_FLOWS` (pinned under `pin_dir`) into `observer` until
/// cancelled; each flow also goes to `sink`.
pub async fn read(
    pin_dir: std::path::PathBuf,
    observer: Arc<Observer>,
    mut sink: Option<Sink>,
    cancel: CancellationToken,
) {
    let mut ring = match crate::datapath::flow_ring(&pin_dir) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "flow events: cannot open the ring buffer; no flows");
            return;
        }
    };
    let offset = monotonic_offset();
    let mut lost_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = lost_tick.tick() => {
                if let Ok(n) = crate::datapath::flow_lost(&pin_dir) {
                    observer.lost_datapath.store(n, Ordering::Relaxed);
                }
            }
            r = ring.readable_mut() => {
                let mut guard = match r {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!(error = %e, "flow events: ring buffer poll failed; no more flows");
                        return;
                    }
                };
                let rb = guard.get_inner_mut();
                // A bounded batch per wake-up, so cancellation and the
                // lost counter are never starved. Readiness is cleared only
                // once the ring is empty: the kernel wakes a reader only
                // when it had caught up, so one left behind would sleep
                // with events waiting.
                let mut empty = false;
                for _ in 0..4096 {
                    let Some(item) = rb.next() else {
                        empty = true;
                        break;
                    };
                    match decode(&item) {
                        Some(ev) => {
                            let f = observer.record(&ev, ev.ts_ns.saturating_add(offset));
                            if let Some(s) = sink.as_mut() {
                                s(&f);
                            }
                        }
                        None => {
                            observer.lost_decode.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if empty {
                    guard.clear_ready();
                } else {
                    drop(guard);
                    tokio::task::yield_now().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tunnel_common::{FLOW_FLAG_DROP, FLOW_HOOK_ENDPOINT, Verdict};

    fn observer(cap: usize) -> Arc<Observer> {
        let (_tx, rx) = watch::channel(Arc::new(Directory::default()));
        Observer::new(cap, Events::All, Duration::from_secs(5), rx)
    }

    fn event(port: u16, drop: bool) -> FlowEvent {
        FlowEvent {
            src: directory::mapped([10, 1, 1, 5].into()),
            dst: directory::mapped([10, 2, 1, 5].into()),
            sport: 40000u16.to_be(),
            dport: port.to_be(),
            proto: 6,
            family: 4,
            hook: FLOW_HOOK_ENDPOINT,
            verdict: if drop {
                Verdict::DropPolicyDenied as u8
            } else {
                Verdict::Tunnel as u8
            },
            flags: if drop { FLOW_FLAG_DROP } else { 0 },
            packets: 1,
            bytes: 60,
            ..FlowEvent::default()
        }
    }

    #[test]
    fn the_buffer_keeps_the_last_n_and_queries_filter_and_cut() {
        let o = observer(3);
        for p in 1..=5u16 {
            o.record(&event(p, p % 2 == 0), u64::from(p) * 1000);
        }
        let all = o.query(&Filter::default(), 0, 0);
        let ports: Vec<u32> = all.iter().map(|f| f.destination_port).collect();
        assert_eq!(ports, vec![3, 4, 5]);
        assert_eq!(
            all.iter().map(|f| f.sequence).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let f = Filter::from_proto(&clustermesh_api::proto::FlowFilter {
            verdict: vec!["dropped".into()],
            ..Default::default()
        })
        .unwrap();
        let dropped = o.query(&f, 0, 0);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].drop_reason, "policy_denied");
        assert_eq!(o.query(&Filter::default(), 2, 0).len(), 2);
        assert_eq!(o.query(&Filter::default(), 0, 5000).len(), 1);
        let s = o.status();
        assert_eq!((s.seen, s.buffered, s.capacity), (5, 3, 3));
        let counts = o.counts();
        assert_eq!(counts.values().sum::<u64>(), 5);
    }

    #[test]
    fn short_events_do_not_decode() {
        assert!(decode(&[0u8; 10]).is_none());
        let ev = event(80, false);
        // SAFETY: FlowEvent is plain data.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const FlowEvent).cast::<u8>(),
                std::mem::size_of::<FlowEvent>(),
            )
        };
        assert_eq!(decode(bytes), Some(ev));
    }
}
