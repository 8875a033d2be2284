//! The agent's control plane: one watcher per cluster (the local one and
//! each remote one configured in the clusters directory), per-cluster
//! stores, the pure merge into desired state, and the reconcilers.
//!
//! ```text
//! clusters dir (poll) ─> watcher per cluster ─(Init/Apply/Delete/InitDone)─> ClusterStore (validate, mark & sweep)
//!                                                                              │
//!                    reconcilers (update / delete / prune) <── diff <── merge(all stores)
//! ```
//!
//! One task owns all state (no locks around it); watchers only send events.
//! Rules:
//! - a cluster whose config is invalid, names another cluster, or reuses an
//!   id or name already connected is refused as a whole (status says why);
//! - a disconnected cluster keeps serving its last state; after `stale_ttl`
//!   (0 = never) it is withdrawn; removing its file drains it at once;
//! - nothing is deleted from the datapath before every cluster has synced
//!   once (or `sync_timeout` passed): then one prune removes leftovers, and
//!   from there on every difference is applied.

pub mod admission;
pub mod config;
pub mod incremental;
pub mod merge;
pub mod policy;
pub mod prefixes;
pub mod room;
pub mod store;
pub mod watcher;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clustermesh_api::{ClusterName, Identity, IpCidr, NodeName, policy::CompiledPolicy};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use clustermesh_api::EncryptionPolicy;
pub use clustermesh_api::status::{ClusterStatus, ControlPlaneStatus, DesiredCounts};

use self::{
    config::{ClusterFile, DirChange},
    incremental::{Delta, Incremental},
    merge::{ClusterInput, MergeInput},
    store::{Changes, ClusterStore, Effect},
    watcher::WatchEvent,
};
use crate::{
    desired::{Desired, IpCacheEntry, MergedService, Peer, TunnelEntry},
    reconcilers::{
        Failure, MemoryReconciler, Reconciler, Target, apply_isolated, apply_keys,
        apply_keys_within,
    },
};

/// The control plane's configuration (part of [`crate::config::AgentConfig`]).
#[derive(Debug, Clone)]
pub struct ClustersConfig {
    pub local_cluster: ClusterName,
    pub local: ClusterFile,
    /// This node's name in the local cluster.
    pub self_node: Option<NodeName>,
    pub clusters_dir: PathBuf,
    /// Withdraw a remote cluster's state after it has been unreachable this
    /// long; zero keeps it forever.
    pub stale_ttl: Duration,
    /// Prune the datapath after this long even if a cluster never synced.
    pub sync_timeout: Duration,
    pub poll_interval: Duration,
    /// Pod ranges strict mode covers whatever the clusters declare
    /// (`--strict-range`, this node's `--pod-cidr`).
    pub strict_ranges: Vec<IpCidr>,
}

impl ClustersConfig {
    pub const DEFAULT_STALE_TTL: Duration = Duration::from_secs(300);
    pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
}

/// The side effects, one reconciler per target.
pub struct Reconcilers {
    pub ipcache: Box<dyn Reconciler<IpCidr, IpCacheEntry>>,
    pub tunnels: Box<dyn Reconciler<IpCidr, TunnelEntry>>,
    pub peers: Box<dyn Reconciler<String, Peer>>,
    pub services: Box<dyn Reconciler<String, MergedService>>,
    /// The local cluster's encryption policy (strict flags, status, audit).
    pub policy: Box<dyn Reconciler<(), EncryptionPolicy>>,
    /// `CM_STRICT_RANGES`.
    pub strict_ranges: Box<dyn Reconciler<IpCidr, ()>>,
    /// Compiled network policy by local endpoint identity (`CM_POLICY`
    /// through `reconcilers::network_policy::PolicyMap`).
    pub network_policies: Box<dyn Reconciler<Identity, CompiledPolicy>>,
    /// Node-local identities of the policies' CIDR prefixes
    /// (`reconcilers::network_policy::PolicyCidrMap`).
    pub policy_cidrs: Box<dyn Reconciler<IpCidr, u32>>,
}

impl Reconcilers {
    /// Every target in memory (tests, and an agent without a datapath).
    pub fn in_memory() -> Self {
        Self {
            ipcache: Box::new(MemoryReconciler::new("ipcache")),
            tunnels: Box::new(MemoryReconciler::new("tunnels")),
            peers: Box::new(MemoryReconciler::new("peers")),
            services: Box::new(MemoryReconciler::new("services")),
            policy: Box::new(MemoryReconciler::new("policy")),
            strict_ranges: Box::new(MemoryReconciler::new("strict ranges")),
            network_policies: Box::new(MemoryReconciler::new("network policies")),
            policy_cidrs: Box::new(MemoryReconciler::new("policy CIDRs")),
        }
    }
}

impl std::fmt::Debug for Reconcilers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconcilers").finish_non_exhaustive()
    }
}

/// The shared status the agent publishes (served by [`crate::status`]).
pub type AgentStatus = ControlPlaneStatus;

struct Slot {
    local: bool,
    store: ClusterStore,
    file_bytes: Vec<u8>,
    /// The pod ranges its file declares.
    declared: Vec<IpCidr>,
    cancel: CancellationToken,
    connected: bool,
    synced: bool,
    withdrawn: bool,
    refused: Option<String>,
    last_error: Option<String>,
    disconnected_since: Option<Instant>,
    reconnects: u64,
}

impl Slot {
    fn new(name: ClusterName, local: bool, file_bytes: Vec<u8>, cancel: CancellationToken) -> Self {
        Self {
            local,
            store: ClusterStore::new(name, local),
            file_bytes,
            declared: Vec::new(),
            cancel,
            connected: false,
            synced: false,
            withdrawn: false,
            refused: None,
            last_error: None,
            disconnected_since: None,
            reconnects: 0,
        }
    }
}

/// The running control plane.
pub struct Agent {
    cfg: ClustersConfig,
    slots: BTreeMap<ClusterName, Slot>,
    scan: config::Scan,
    last: Desired,
    pruned: bool,
    started: Instant,
    reconcilers: Reconcilers,
    status: Arc<Mutex<AgentStatus>>,
    tx: mpsc::Sender<(ClusterName, WatchEvent)>,
    rx: mpsc::Receiver<(ClusterName, WatchEvent)>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    dirty: bool,
    retry: bool,
    /// Entries refused in the last round.
    failures: Vec<Failure>,
    /// Pod CIDR -> id of the cluster holding it (see [`Agent::update_owners`]).
    owners: BTreeMap<IpCidr, u8>,
    /// The ranges whose holder changed since the merge last saw `owners`
    /// (None: unknown, the merge compares them all).
    owners_touched: Option<std::collections::BTreeSet<IpCidr>>,
    /// The local services marked global (counted when a local service
    /// record changes).
    global_services: usize,
    /// The addresses of this node's local endpoints whose records have
    /// been through a reconcile (their network policy applied): the
    /// endpoint source marks a pod ready only then ([`Agent::policy_ready`]).
    policy_ready: tokio::sync::watch::Sender<std::collections::BTreeSet<std::net::IpAddr>>,
    /// Where the flow directory goes (None: flows off).
    directory: Option<tokio::sync::watch::Sender<Arc<crate::flows::Directory>>>,
    /// A directory rebuild is due; when and in how long the last was built.
    directory_pending: bool,
    directory_built: Option<(Instant, Duration)>,
    /// The merged state, kept up to date from each store's changes.
    engine: Incremental,
    /// Whether the merge has run once.
    merged: bool,
    /// The records of the clusters removed since the last round.
    gone: BTreeMap<ClusterName, Changes>,
    /// Keys a target refused, retried every round.
    retry_keys: RetryKeys,
    /// A cluster's sync state changed: the range holders are checked.
    owners_stale: bool,
    /// The room in the ip-cache maps.
    room: room::IpCacheRoom,
    /// The most events seen waiting at once.
    queue_peak: QueuePeak,
}

/// The most events seen waiting at once: since the start, and in windows
/// of [`QueuePeak::WINDOW`] (the current and the last).
#[derive(Debug, Default)]
struct QueuePeak {
    all: usize,
    current: usize,
    last: usize,
    since: Option<Instant>,
}

impl QueuePeak {
    const WINDOW: Duration = Duration::from_secs(10);

    fn seen(&mut self, depth: usize, now: Instant) {
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= Self::WINDOW {
            self.last = self.current;
            self.current = 0;
            self.since = Some(now);
        }
        self.current = self.current.max(depth);
        self.all = self.all.max(depth);
    }

    fn recent(&self) -> usize {
        self.current.max(self.last)
    }
}

/// The keys each target refused last time.
#[derive(Debug, Default)]
struct RetryKeys {
    ipcache: std::collections::BTreeSet<IpCidr>,
    tunnels: std::collections::BTreeSet<IpCidr>,
    peers: std::collections::BTreeSet<String>,
    services: std::collections::BTreeSet<String>,
    policy: std::collections::BTreeSet<()>,
    network_policies: std::collections::BTreeSet<Identity>,
    policy_cidrs: std::collections::BTreeSet<IpCidr>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("clusters", &self.slots.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Returns the heap's free pages to the kernel (glibc keeps them
/// otherwise: after the initial sync of a large mesh that is the relists'
/// buffers, a quarter of the agent's resident memory).
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether cluster `id` keeps holding a range ([`Agent::update_owners`]):
/// while it has not synced, yes; once synced, only if the range is still
/// routed to it; a cluster gone keeps it until every cluster has synced.
fn keeps_range(synced: Option<&bool>, all: bool, routed: Option<u8>, id: u8) -> bool {
    match synced {
        None => !all,
        Some(false) => true,
        Some(true) => routed == Some(id),
    }
}

impl Agent {
    pub fn new(cfg: ClustersConfig, reconcilers: Reconcilers, cancel: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let status = Arc::new(Mutex::new(AgentStatus {
            cluster: cfg.local_cluster.to_string(),
            node: cfg.self_node.as_ref().map(ToString::to_string),
            ..Default::default()
        }));
        Self {
            cfg,
            slots: BTreeMap::new(),
            scan: config::Scan::new(),
            last: Desired::default(),
            pruned: false,
            started: Instant::now(),
            reconcilers,
            status,
            tx,
            rx,
            tracker: TaskTracker::new(),
            cancel,
            dirty: false,
            retry: false,
            failures: Vec::new(),
            owners: BTreeMap::new(),
            owners_touched: None,
            global_services: 0,
            policy_ready: tokio::sync::watch::Sender::new(Default::default()),
            directory: None,
            directory_pending: false,
            directory_built: None,
            engine: Incremental::new(),
            merged: false,
            gone: BTreeMap::new(),
            retry_keys: RetryKeys::default(),
            owners_stale: true,
            room: room::IpCacheRoom::default(),
            queue_peak: QueuePeak::default(),
        }
    }

    /// Bounds the ip-cache to the sizes of its maps (`CM_IPCACHE`,
    /// `CM_IPCACHE6`): what does not fit is refused and counted
    /// ([`room`]). Without this the ip-cache is unbounded.
    pub fn set_ipcache_capacity(&mut self, v4: usize, v6: usize) {
        self.room = room::IpCacheRoom::new(v4, v6);
    }

    /// Follows the local endpoints whose policy has been applied (a new
    /// pod is marked ready, so that it may send and receive, only once its
    /// identity's policy is in the datapath: fail closed).
    pub fn policy_ready(
        &self,
    ) -> tokio::sync::watch::Receiver<std::collections::BTreeSet<std::net::IpAddr>> {
        self.policy_ready.subscribe()
    }

    /// Publishes [`Agent::policy_ready`] through a channel made before the
    /// agent (the endpoint source starts first).
    pub fn set_policy_ready(
        &mut self,
        tx: tokio::sync::watch::Sender<std::collections::BTreeSet<std::net::IpAddr>>,
    ) {
        self.policy_ready = tx;
    }

    /// Publishes the flow directory after each reconcile through `tx`.
    pub fn set_directory(&mut self, tx: tokio::sync::watch::Sender<Arc<crate::flows::Directory>>) {
        self.directory = Some(tx);
    }

    /// Shared status, read by the status endpoint.
    pub fn status(&self) -> Arc<Mutex<AgentStatus>> {
        self.status.clone()
    }

    fn start_watcher(&mut self, name: ClusterName, file: ClusterFile, bytes: Vec<u8>, local: bool) {
        let cancel = self.cancel.child_token();
        let declared = file.pod_cidrs.clone();
        self.tracker.spawn(watcher::run(
            name.clone(),
            file,
            local,
            self.tx.clone(),
            cancel.clone(),
        ));
        match self.slots.get_mut(&name) {
            // A changed file: the store is kept until the new session's
            // relist sweeps it, so traffic does not flap.
            Some(s) => {
                s.cancel.cancel();
                s.cancel = cancel;
                s.file_bytes = bytes;
                s.declared = declared;
                s.refused = None;
            }
            None => {
                let mut slot = Slot::new(name.clone(), local, bytes, cancel);
                slot.declared = declared;
                self.slots.insert(name, slot);
            }
        }
        // Its declared ranges count for strict mode at once.
        self.dirty = true;
    }

    fn rescan(&mut self) {
        let new = match config::scan(&self.cfg.clusters_dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(dir = %self.cfg.clusters_dir.display(), error = %e, "cannot read the clusters directory");
                return;
            }
        };
        for change in config::diff(&self.scan, &new) {
            match change {
                DirChange::Added(n) | DirChange::Changed(n) => {
                    if n == self.cfg.local_cluster {
                        tracing::warn!(cluster = %n, "the clusters directory names the local cluster; ignored");
                        continue;
                    }
                    let (bytes, parsed) = &new[&n];
                    match parsed {
                        Ok(f) => {
                            tracing::info!(cluster = %n, "connecting to remote cluster");
                            self.start_watcher(n, f.clone(), bytes.clone(), false);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "invalid remote cluster file");
                            if let Some(s) = self.slots.get_mut(&n) {
                                s.cancel.cancel();
                                s.last_error = Some(e.to_string());
                                s.connected = false;
                            } else {
                                let mut slot = Slot::new(
                                    n.clone(),
                                    false,
                                    bytes.clone(),
                                    CancellationToken::new(),
                                );
                                slot.last_error = Some(e.to_string());
                                slot.cancel.cancel();
                                self.slots.insert(n, slot);
                            }
                        }
                    }
                }
                DirChange::Removed(n) => {
                    if let Some(mut s) = self.slots.remove(&n) {
                        tracing::info!(cluster = %n, "remote cluster removed; draining its state");
                        s.cancel.cancel();
                        let mut gone = s.store.take_changes();
                        gone.extend(Changes::all(&s.store.records));
                        self.gone.entry(n).or_default().extend(gone);
                        self.owners_stale = true;
                        self.dirty = true;
                    }
                }
            }
        }
        self.scan = new;
    }

    fn check_stale(&mut self, now: Instant) {
        if self.cfg.stale_ttl.is_zero() {
            return;
        }
        for (name, s) in &mut self.slots {
            if s.local || s.withdrawn {
                continue;
            }
            if let Some(since) = s.disconnected_since
                && now.duration_since(since) >= self.cfg.stale_ttl
            {
                tracing::warn!(cluster = %name, "unreachable for longer than the stale TTL; withdrawing its state");
                s.withdrawn = true;
                self.owners_stale = true;
                if s.store.clear() == Effect::Changed {
                    self.dirty = true;
                }
            }
        }
    }

    fn handle(&mut self, name: ClusterName, ev: WatchEvent, now: Instant) {
        // The ids the other clusters hold (only a connect needs them: every
        // other event is O(1) in the mesh size).
        let taken: Vec<(u8, ClusterName)> = match ev {
            WatchEvent::Connected { .. } => self
                .slots
                .iter()
                .filter(|(n, s)| **n != name && s.refused.is_none())
                .filter_map(|(n, s)| s.store.config.as_ref().map(|c| (c.id.get(), n.clone())))
                .collect(),
            _ => Vec::new(),
        };
        let Some(s) = self.slots.get_mut(&name) else {
            return; // a removed cluster's last words
        };
        if matches!(ev, WatchEvent::Connected { .. } | WatchEvent::InitDone) {
            self.owners_stale = true;
        }
        let effect = match ev {
            WatchEvent::Connected { config, .. } => {
                s.connected = true;
                s.last_error = None;
                match s.store.check_config(&config) {
                    Err(e) => {
                        s.refused = Some(format!("invalid cluster config: {e}"));
                    }
                    Ok(c) => {
                        if let Some((_, other)) = taken.iter().find(|(id, _)| *id == c.id.get()) {
                            s.refused = Some(format!(
                                "cluster id {} is already used by cluster {other}; give each cluster a unique id",
                                c.id
                            ));
                        } else {
                            s.refused = None;
                            s.store.config = Some(c);
                        }
                    }
                }
                if let Some(r) = &s.refused {
                    tracing::warn!(cluster = %name, reason = %r, "cluster refused");
                    s.store.config = None;
                    s.store.clear()
                } else {
                    Effect::None
                }
            }
            _ if s.refused.is_some() => Effect::None,
            WatchEvent::Init => {
                s.store.init();
                Effect::None
            }
            WatchEvent::Apply { key, value } => s.store.apply(&key, &value, now),
            WatchEvent::Page(kvs) => kvs.iter().fold(Effect::None, |e, kv| {
                match s.store.apply(kv.key(), kv.value(), now) {
                    Effect::Changed => Effect::Changed,
                    Effect::None => e,
                }
            }),
            WatchEvent::Delete { key } => s.store.delete(&key, now),
            WatchEvent::InitDone => {
                s.synced = true;
                s.withdrawn = false;
                s.disconnected_since = None;
                s.store.init_done();
                // A relist may change nothing visible yet still be the first
                // sync (prune condition): always recompute.
                Effect::Changed
            }
            WatchEvent::Disconnected { error } => {
                s.connected = false;
                s.last_error = Some(error);
                s.disconnected_since.get_or_insert(now);
                s.reconnects += 1;
                Effect::None
            }
        };
        if effect == Effect::Changed {
            self.dirty = true;
        }
    }

    fn all_synced(&self) -> bool {
        self.slots.values().all(|s| s.synced || s.refused.is_some())
    }

    /// The pod ranges strict mode covers: the configured ones and every
    /// remote cluster file's declared ones (a cluster keeps them, also
    /// while refused or unreachable, until its file is removed).
    fn strict_ranges(&self) -> BTreeMap<IpCidr, ()> {
        let remote = self
            .slots
            .values()
            .filter(|s| !s.local)
            .flat_map(|s| s.declared.iter());
        self.cfg
            .strict_ranges
            .iter()
            .chain(remote)
            .map(|c| (*c, ()))
            .collect()
    }

    /// Applies the strict ranges, before anything else (they need no
    /// cluster to have connected); removals wait for the prune as all do.
    fn reconcile_strict_ranges(&mut self, failures: &mut Vec<Failure>) {
        let want = self.strict_ranges();
        let old = &self.last.strict_ranges;
        let mut applied = apply_isolated(
            self.reconcilers.strict_ranges.as_mut(),
            old,
            &want,
            self.pruned,
            failures,
        );
        if !self.pruned {
            for k in old.keys() {
                applied.entry(*k).or_default();
            }
        }
        self.last.strict_ranges = applied;
    }

    /// What changed in every store since the last round (and the records
    /// of the clusters removed since).
    fn take_changes(&mut self) -> BTreeMap<ClusterName, Changes> {
        let mut out = std::mem::take(&mut self.gone);
        for (n, s) in &mut self.slots {
            let c = s.store.take_changes();
            if !c.is_empty() {
                out.entry(n.clone()).or_default().extend(c);
            }
        }
        out
    }

    fn reconcile(&mut self) {
        let mut failures = Vec::new();
        self.reconcile_strict_ranges(&mut failures);
        let local_cfg = self
            .slots
            .get(&self.cfg.local_cluster)
            .and_then(|l| l.store.config.clone());
        // The local policy is unknown until the local cluster connects.
        let Some(local_cfg) = local_cfg else {
            self.retry = !failures.is_empty();
            self.failures = failures;
            return;
        };
        let changes = self.take_changes();
        let Some(local) = self.slots.get(&self.cfg.local_cluster) else {
            return;
        };
        let remotes: Vec<ClusterInput<'_>> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.local && s.refused.is_none())
            .filter_map(|(n, s)| {
                s.store.config.as_ref().map(|c| ClusterInput {
                    name: n,
                    id: c.id,
                    records: &s.store.records,
                    declared: &s.declared,
                })
            })
            .collect();
        let input = MergeInput {
            local: ClusterInput {
                name: &self.cfg.local_cluster,
                id: local_cfg.id,
                records: &local.store.records,
                declared: &[],
            },
            self_node: self.cfg.self_node.as_ref(),
            encryption: local_cfg.encryption,
            remotes: &remotes,
            incumbents: &self.owners,
            incumbents_changed: self.owners_touched.as_ref(),
        };
        let first = !self.merged;
        let delta = self.engine.update(&input, &changes);
        self.owners_touched = Some(Default::default());
        self.merged = true;
        let local_endpoints = first
            || changes
                .get(&self.cfg.local_cluster)
                .is_some_and(|c| !c.endpoints.is_empty());
        let here: Option<std::collections::BTreeSet<std::net::IpAddr>> =
            local_endpoints.then(|| {
                local
                    .store
                    .records
                    .endpoints
                    .values()
                    .filter(|e| self.cfg.self_node.is_none() || e.node == self.cfg.self_node)
                    .map(|e| e.ip)
                    .collect()
            });
        // Each refusal is logged once, when it appears (the metric
        // clustermesh_agent_records_rejected counts the current ones).
        for r in &delta.rejected {
            tracing::warn!(
                cluster = %r.cluster,
                record = %r.record,
                reason = r.reason,
                "record refused: {}",
                r.detail
            );
        }
        let prune_now =
            !self.pruned && (self.all_synced() || self.started.elapsed() >= self.cfg.sync_timeout);
        self.apply(&delta, &mut failures);
        self.count_global_services(first, &changes);
        self.report_room(&mut failures);
        if let Some(here) = here {
            self.policy_ready.send_if_modified(|s| {
                let changed = *s != here;
                *s = here;
                changed
            });
        }
        if prune_now {
            self.pruned = self.prune(&mut failures);
        }
        // Each refused entry is logged once, when it appears; all of them
        // are in the status and retried every round.
        for f in &failures {
            if !self.failures.contains(f) {
                tracing::warn!(target = f.target, key = %f.key, error = %f.error, "entry refused by its target; retrying, everything else is applied");
            }
        }
        self.retry = !failures.is_empty();
        self.failures = failures;
        let released = if self.owners_stale {
            self.update_owners()
        } else {
            self.update_owners_of(&delta.tunnels)
        };
        if released {
            // A range was released: a claim refused for it may now go.
            self.dirty = true;
        }
        self.owners_stale = false;
        if !changes.is_empty() || !delta.is_empty() {
            self.directory_pending = true;
        }
        self.publish_directory(Instant::now());
    }

    /// Rebuilds what flows' addresses are from every store (when flows
    /// are on: [`Agent::set_directory`]), at most at a twentieth of the
    /// time since the last build (so a mesh of a million endpoints spends
    /// at most about 5 % of a core on it); a pending rebuild is retried
    /// every round.
    fn publish_directory(&mut self, now: Instant) {
        let Some(tx) = &self.directory else { return };
        if !self.directory_pending
            || self
                .directory_built
                .is_some_and(|(at, took)| now.duration_since(at) < took * 20)
        {
            return;
        }
        let node = self.cfg.self_node.as_ref().map(ToString::to_string);
        let d = crate::flows::Directory::build(
            &self.cfg.local_cluster,
            node.as_deref(),
            self.slots
                .values()
                .filter(|s| s.local || s.refused.is_none())
                .map(|s| &s.store.records),
        );
        tx.send_replace(Arc::new(d));
        self.directory_pending = false;
        self.directory_built = Some((now, now.elapsed()));
    }

    /// Keeps the range holders (merge incumbents) in step: a range stays
    /// with its cluster until that cluster has synced without it, or is
    /// gone once every cluster has synced; ranges routed now and held by
    /// nobody are taken by the cluster they are routed for. Returns whether
    /// a range was released.
    fn update_owners(&mut self) -> bool {
        let all = self.all_synced();
        let synced = self.sync_states();
        let tunnels = &self.last.tunnels;
        let before = self.owners.len();
        let mut touched = std::mem::take(&mut self.owners_touched);
        self.owners.retain(|cidr, id| {
            let keep = keeps_range(
                synced.get(id),
                all,
                tunnels.get(cidr).map(|e| e.cluster_id),
                *id,
            );
            if !keep && let Some(t) = &mut touched {
                t.insert(*cidr);
            }
            keep
        });
        let released = self.owners.len() != before;
        for (c, e) in tunnels {
            if let std::collections::btree_map::Entry::Vacant(v) = self.owners.entry(*c) {
                v.insert(e.cluster_id);
                if let Some(t) = &mut touched {
                    t.insert(*c);
                }
            }
        }
        self.owners_touched = touched;
        released
    }

    /// [`Agent::update_owners`] for the ranges whose tunnel entries the
    /// merge touched, when no cluster's sync state changed: every other
    /// holder's outcome is what it was. O(ranges touched + clusters).
    fn update_owners_of(&mut self, touched: &std::collections::BTreeSet<IpCidr>) -> bool {
        if touched.is_empty() {
            return false;
        }
        let all = self.all_synced();
        let synced = self.sync_states();
        let mut released = false;
        for cidr in touched {
            let routed = self.last.tunnels.get(cidr).map(|e| e.cluster_id);
            if let Some(id) = self.owners.get(cidr).copied()
                && !keeps_range(synced.get(&id), all, routed, id)
            {
                self.owners.remove(cidr);
                released = true;
                self.touch_owner(*cidr);
            }
            if let Some(id) = routed
                && let std::collections::btree_map::Entry::Vacant(v) = self.owners.entry(*cidr)
            {
                v.insert(id);
                self.touch_owner(*cidr);
            }
        }
        released
    }

    /// Counts the local services marked global, when a local service
    /// record changed (a global flag toggled on a service no other cluster
    /// shares changes no key of the merge).
    fn count_global_services(&mut self, first: bool, changes: &BTreeMap<ClusterName, Changes>) {
        let local = &self.cfg.local_cluster;
        if !first && changes.get(local).is_none_or(|c| c.services.is_empty()) {
            return;
        }
        self.global_services = self.slots.get(local).map_or(0, |s| {
            s.store
                .records
                .services
                .values()
                .filter(|s| s.global)
                .count()
        });
    }

    /// Notes that `cidr`'s holder changed (for the next merge).
    fn touch_owner(&mut self, cidr: IpCidr) {
        if let Some(t) = &mut self.owners_touched {
            t.insert(cidr);
        }
    }

    /// Whether each connected cluster (by id) has synced.
    fn sync_states(&self) -> BTreeMap<u8, bool> {
        self.slots
            .values()
            .filter(|s| s.refused.is_none())
            .filter_map(|s| s.store.config.as_ref().map(|c| (c.id.get(), s.synced)))
            .collect()
    }

    /// Applies the keys the merge touched (and those a target refused
    /// before), target by target, entry by entry: `last` follows what the
    /// targets hold. Before the prune nothing is deleted.
    fn apply(&mut self, delta: &Delta, failures: &mut Vec<Failure>) {
        let r = &mut self.reconcilers;
        let d = self.engine.desired();
        let last = &mut self.last;
        let retry = &mut self.retry_keys;
        let del = self.pruned;
        self.room.start_round();
        // Routes first: a full ip-cache keeps room for them (see room).
        let routes = Target {
            r: r.tunnels.as_mut(),
            held: &mut last.tunnels,
            retry: &mut retry.tunnels,
        };
        apply_keys_within(
            routes,
            &d.tunnels,
            &delta.tunnels,
            del,
            failures,
            &mut self.room.routes(),
        );
        let hosts = Target {
            r: r.ipcache.as_mut(),
            held: &mut last.ipcache,
            retry: &mut retry.ipcache,
        };
        apply_keys_within(
            hosts,
            &d.ipcache,
            &delta.ipcache,
            del,
            failures,
            &mut self.room.hosts(),
        );
        apply_keys(
            r.peers.as_mut(),
            &mut last.peers,
            &d.peers,
            &delta.peers,
            &mut retry.peers,
            del,
            failures,
        );
        apply_keys(
            r.services.as_mut(),
            &mut last.services,
            &d.services,
            &delta.services,
            &mut retry.services,
            del,
            failures,
        );
        // The policy is never deleted: the last one read stays applied.
        let policy: &[()] = if delta.policy { &[()] } else { &[] };
        apply_keys(
            r.policy.as_mut(),
            &mut last.policy,
            &d.policy,
            policy,
            &mut retry.policy,
            false,
            failures,
        );
        // Before the policies that name their identities.
        apply_keys(
            r.policy_cidrs.as_mut(),
            &mut last.policy_cidrs,
            &d.policy_cidrs,
            &delta.policy_cidrs,
            &mut retry.policy_cidrs,
            del,
            failures,
        );
        apply_keys(
            r.network_policies.as_mut(),
            &mut last.network_policies,
            &d.network_policies,
            &delta.network_policies,
            &mut retry.network_policies,
            del,
            failures,
        );
    }

    /// A full ip-cache map is one failure, whatever the number of entries
    /// waiting for room (the status's `maps` counts them; each is retried
    /// every round); crossing the alarm, up or down, is logged once.
    fn report_room(&mut self, failures: &mut Vec<Failure>) {
        for o in self.room.occupancy() {
            if o.refused > 0 {
                failures.push(Failure {
                    target: "ipcache",
                    key: format!("({} full)", o.map),
                    error: format!(
                        "{} is full ({} entries): desired entries wait for room, counted in the status's maps; raise --ipcache-max-entries",
                        o.map, o.capacity
                    ),
                });
            }
        }
        for (o, up) in self.room.crossings() {
            if up {
                tracing::warn!(
                    map = o.map,
                    entries = o.entries,
                    capacity = o.capacity,
                    refused = o.refused,
                    "ip-cache map under pressure (at or above 90 % of its size, or full)"
                );
            } else {
                tracing::info!(
                    map = o.map,
                    entries = o.entries,
                    capacity = o.capacity,
                    "ip-cache map pressure back below 90 %"
                );
            }
        }
    }

    /// The one prune after the initial sync; true when every target pruned
    /// (a target that failed is pruned again next round). What the targets
    /// kept while nothing was deleted and is no longer desired goes.
    fn prune(&mut self, failures: &mut Vec<Failure>) -> bool {
        // `last.strict_ranges` still holds what left them (kept until now).
        let strict = self.strict_ranges();
        let d = self.engine.desired();
        let last = &mut self.last;
        last.strict_ranges.retain(|k, _| strict.contains_key(k));
        last.ipcache.retain(|k, _| d.ipcache.contains_key(k));
        last.tunnels.retain(|k, _| d.tunnels.contains_key(k));
        last.peers.retain(|k, _| d.peers.contains_key(k));
        last.services.retain(|k, _| d.services.contains_key(k));
        last.network_policies
            .retain(|k, _| d.network_policies.contains_key(k));
        last.policy_cidrs
            .retain(|k, _| d.policy_cidrs.contains_key(k));
        self.room.count(&last.ipcache, &last.tunnels);
        let r = &mut self.reconcilers;
        let results = [
            r.ipcache.prune(&last.ipcache),
            r.tunnels.prune(&last.tunnels),
            r.peers.prune(&last.peers),
            r.services.prune(&last.services),
            r.network_policies.prune(&last.network_policies),
            r.policy_cidrs.prune(&last.policy_cidrs),
            r.strict_ranges.prune(&strict),
        ];
        let mut removed = 0;
        let mut ok = true;
        for res in results {
            match res {
                Ok(n) => removed += n,
                Err(e) => {
                    ok = false;
                    failures.push(Failure {
                        target: e.target,
                        key: "(prune)".into(),
                        error: e.source.to_string(),
                    });
                }
            }
        }
        // What the initial sync built by inserts in key order, packed; the
        // relists' buffers go back to the kernel.
        incremental::pack(&mut self.last.ipcache);
        self.engine.pack();
        trim_heap();
        tracing::info!(removed, "initial sync complete; pruned leftovers");
        ok
    }

    fn publish(&self, now: Instant) {
        let mut rejected: BTreeMap<&ClusterName, BTreeMap<String, u64>> = BTreeMap::new();
        for r in self.engine.rejected() {
            *rejected
                .entry(&r.cluster)
                .or_default()
                .entry(r.reason.to_owned())
                .or_default() += 1;
        }
        let clusters = self
            .slots
            .iter()
            .map(|(n, s)| ClusterStatus {
                name: n.to_string(),
                id: s.store.config.as_ref().map(|c| c.id.get()),
                local: s.local,
                connected: s.connected,
                synced: s.synced,
                withdrawn: s.withdrawn,
                last_error: s.refused.clone().or_else(|| s.last_error.clone()),
                counts: s.store.counts(),
                last_event_age_ms: s
                    .store
                    .last_event
                    .map(|t| now.duration_since(t).as_millis() as u64),
                events: s.store.events,
                reconnects: s.reconnects,
                refused_total: s
                    .store
                    .refused_total
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), *v))
                    .collect(),
                rejected_now: rejected.get(n).cloned().unwrap_or_default(),
            })
            .collect();
        let st = AgentStatus {
            cluster: self.cfg.local_cluster.to_string(),
            node: self.cfg.self_node.as_ref().map(ToString::to_string),
            clusters,
            all_synced: self.all_synced(),
            pruned: self.pruned,
            reconcile_errors: self
                .failures
                .iter()
                .map(|f| clustermesh_api::status::ReconcileFailure {
                    target: f.target.to_owned(),
                    key: f.key.clone(),
                    error: f.error.clone(),
                })
                .collect(),
            desired: DesiredCounts {
                ipcache: self.last.ipcache.len(),
                tunnels: self.last.tunnels.len(),
                peers: self.last.peers.len(),
                services: self.last.services.len(),
                global_services: self.global_services,
                policies: self
                    .slots
                    .get(&self.cfg.local_cluster)
                    .map_or(0, |s| s.store.records.policies.len()),
                policy_endpoints: self.last.network_policies.len(),
                policy_entries: self
                    .last
                    .network_policies
                    .values()
                    .map(|p| p.entries.len())
                    .sum(),
            },
            maps: self
                .room
                .occupancy()
                .into_iter()
                .map(|o| clustermesh_api::status::MapOccupancy {
                    map: o.map.to_owned(),
                    entries: o.entries as u64,
                    capacity: o.capacity as u64,
                    refused: o.refused as u64,
                    alarm: o.refused > 0 || room::pressure(o.entries, o.capacity) >= room::ALARM,
                })
                .collect(),
            event_queue: clustermesh_api::status::EventQueue {
                depth: self.rx.len() as u64,
                peak: self.queue_peak.all as u64,
                recent_peak: self.queue_peak.recent() as u64,
                capacity: self.rx.max_capacity() as u64,
            },
        };
        if let Ok(mut g) = self.status.lock() {
            *g = st;
        }
    }

    /// Lets every target do the work it schedules (drains, expiries).
    fn tick(&mut self, now: Instant) {
        let r = &mut self.reconcilers;
        let results = [
            r.ipcache.tick(now),
            r.tunnels.tick(now),
            r.peers.tick(now),
            r.services.tick(now),
            r.policy.tick(now),
            r.strict_ranges.tick(now),
            r.network_policies.tick(now),
            r.policy_cidrs.tick(now),
        ];
        for e in results.into_iter().filter_map(Result::err) {
            tracing::warn!(error = %e, "scheduled reconciler work failed; retrying");
        }
    }

    /// Starts the diffs from what the targets already hold (adoption).
    fn adopt(&mut self) {
        let r = &mut self.reconcilers;
        let snap = (|| {
            Ok::<_, crate::reconcilers::ReconcileError>(Desired {
                ipcache: r.ipcache.snapshot()?,
                tunnels: r.tunnels.snapshot()?,
                peers: r.peers.snapshot()?,
                services: r.services.snapshot()?,
                policy: r.policy.snapshot()?,
                strict_ranges: r.strict_ranges.snapshot()?,
                network_policies: r.network_policies.snapshot()?,
                policy_cidrs: r.policy_cidrs.snapshot()?,
                rejected: Vec::new(),
            })
        })();
        match snap {
            Ok(d) => {
                // The ranges the datapath routes survive the restart: their
                // clusters hold them until they sync without them.
                self.owners = d.tunnels.iter().map(|(c, e)| (*c, e.cluster_id)).collect();
                self.owners_touched = None;
                tracing::info!(
                    ipcache = d.ipcache.len(),
                    tunnels = d.tunnels.len(),
                    peers = d.peers.len(),
                    services = d.services.len(),
                    "adopted the datapath state"
                );
                self.room.count(&d.ipcache, &d.tunnels);
                self.last = d;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the datapath state; rewriting it"),
        }
    }

    /// Runs until cancelled; returns the reconcilers (tests inspect them).
    pub async fn run(mut self) -> Reconcilers {
        self.adopt();
        let local = self.cfg.local_cluster.clone();
        let local_file = self.cfg.local.clone();
        self.start_watcher(local, local_file, Vec::new(), true);
        self.rescan();
        let mut tick = tokio::time::interval(self.cfg.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tick.tick() => {
                    self.rescan();
                    self.check_stale(Instant::now());
                    if self.retry || (!self.pruned && self.started.elapsed() >= self.cfg.sync_timeout) {
                        self.dirty = true;
                    }
                }
                ev = self.rx.recv() => {
                    let Some((name, ev)) = ev else { break };
                    let now = Instant::now();
                    self.queue_peak.seen(self.rx.len() + 1, now);
                    self.handle(name, ev, now);
                    // Take everything already queued before recomputing.
                    while let Ok((name, ev)) = self.rx.try_recv() {
                        self.handle(name, ev, now);
                    }
                }
            }
            if self.dirty {
                self.dirty = false;
                self.reconcile();
            }
            self.tick(Instant::now());
            // A directory rebuild the rate limit deferred.
            self.publish_directory(Instant::now());
            self.publish(Instant::now());
        }
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tracker.wait()).await;
        self.reconcilers
    }
}
