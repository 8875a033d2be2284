//! Side effects go through one trait: a reconciler makes one target (an eBPF
//! map, routes, WireGuard peers, the endpoint map, the datapath's
//! configuration) equal to a desired map from [`crate::desired`].
//!
//! - `update` and `delete` apply a single difference;
//! - `prune` removes everything the target holds that is not desired. The
//!   agent calls it once, after every cluster has synced (or its sync timeout
//!   passed), so a restarted agent never removes what it has not yet
//!   re-learned; before that it only adds and updates.
//!
//! [`MemoryReconciler`] is the in-memory implementation used to test the
//! wiring without root; the real ones, one module each, implement the same
//! trait:
//! - [`ipcache`]: host entries (/32) of the pinned `CM_IPCACHE`;
//! - [`tunnels`]: pod-CIDR routes of `CM_IPCACHE`, with tombstones;
//! - [`routes`]: direct-routing routes over netlink (with [`routes::RoutedTunnels`]);
//! - [`services`]: the load-balancer maps, and the pure backend selection;
//! - [`wg_peers`]: the WireGuard device's peers (old keys drain for the
//!   overlap, timed by [`Reconciler::tick`]);
//! - [`endpoints`]: the local pods in `CM_ENDPOINTS`;
//! - [`datapath_config`]: `CM_CONFIG` (mode, interfaces, strict flags from
//!   the cluster's encryption policy);
//! - [`strict_ranges`]: the mesh's pod ranges strict mode covers
//!   (`CM_STRICT_RANGES`);
//! - [`network_policy`]: the compiled network policies (`CM_POLICY`,
//!   `CM_POLICY_STATE`).
//!
//! Each opens its map through the pin, independently of the loader.

pub mod datapath_config;
pub mod endpoints;
pub mod ipcache;
mod lpm;
pub mod network_policy;
pub mod routes;
pub mod services;
pub mod strict_ranges;
pub mod tunnels;
pub mod wg_peers;

use std::collections::BTreeMap;

/// Any error a target reports, kept typed for its source chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
#[error("reconciling {target}: {source}")]
pub struct ReconcileError {
    pub target: &'static str,
    #[source]
    pub source: BoxError,
}

impl ReconcileError {
    pub fn new(target: &'static str, source: impl Into<BoxError>) -> Self {
        Self {
            target,
            source: source.into(),
        }
    }
}

/// A pinned map that cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("opening {path}")]
pub struct OpenPin {
    pub path: std::path::PathBuf,
    #[source]
    pub source: aya::maps::MapError,
}

/// Opens the map pinned as `name` under `pin_dir` for `target`.
pub(crate) fn pinned(
    pin_dir: &std::path::Path,
    name: &str,
    target: &'static str,
) -> Result<aya::maps::MapData, ReconcileError> {
    let path = pin_dir.join(name);
    aya::maps::MapData::from_pin(&path)
        .map_err(|source| ReconcileError::new(target, OpenPin { path, source }))
}

pub trait Reconciler<K, V>: Send {
    fn name(&self) -> &'static str;
    fn update(&mut self, key: &K, value: &V) -> Result<(), ReconcileError>;
    fn delete(&mut self, key: &K) -> Result<(), ReconcileError>;
    /// Removes what is not in `desired`; returns how many entries went.
    fn prune(&mut self, desired: &BTreeMap<K, V>) -> Result<usize, ReconcileError>;
    /// What the target holds now (pinned maps surviving a restart). The
    /// agent starts its diffs from this, so a restart rewrites nothing that
    /// did not change.
    fn snapshot(&mut self) -> Result<BTreeMap<K, V>, ReconcileError>;
    /// Time passed: work the target schedules itself (draining keys,
    /// expiring tombstones). Called on every round of the agent's loop.
    fn tick(&mut self, _now: std::time::Instant) -> Result<(), ReconcileError> {
        Ok(())
    }
}

/// One entry a target refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub target: &'static str,
    /// The entry's key, as `{:?}` shows it.
    pub key: String,
    pub error: String,
}

/// Applies the difference between `old` and `new` entry by entry: an entry
/// the target refuses is recorded in `failures` and left out of what is
/// applied, every other entry is applied. Returns what the target holds
/// now (as far as this agent knows): `new`, except that a refused update
/// keeps the old value (or none) and a refused delete keeps the entry, so
/// the next diff from it retries exactly the refused entries. With
/// `allow_delete` false removals are deferred to the prune.
pub fn apply_isolated<K: Ord + Clone + std::fmt::Debug, V: PartialEq + Clone>(
    r: &mut dyn Reconciler<K, V>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    allow_delete: bool,
    failures: &mut Vec<Failure>,
) -> BTreeMap<K, V> {
    let mut applied = new.clone();
    let fail = |k: &K, e: ReconcileError| Failure {
        target: e.target,
        key: format!("{k:?}"),
        error: e.source.to_string(),
    };
    for (k, v) in new {
        if old.get(k) == Some(v) {
            continue;
        }
        if let Err(e) = r.update(k, v) {
            failures.push(fail(k, e));
            match old.get(k) {
                Some(o) => applied.insert(k.clone(), o.clone()),
                None => applied.remove(k),
            };
        }
    }
    if allow_delete {
        for (k, o) in old {
            if !new.contains_key(k)
                && let Err(e) = r.delete(k)
            {
                failures.push(fail(k, e));
                applied.insert(k.clone(), o.clone());
            }
        }
    }
    applied
}

/// Room in a target of bounded size ([`apply_keys_within`]): asked before
/// a key the target does not hold is added, told when a key leaves it.
pub trait Room<K> {
    /// Whether `key`, new to the target, fits. A key that does not is kept
    /// for a retry and counted by the room, not reported as a failure (a
    /// full map refuses thousands of keys at once: the room says how many).
    fn admit(&mut self, key: &K) -> bool;
    /// `key` no longer takes room (deleted, or its add failed).
    fn release(&mut self, key: &K);
}

/// A target without a bound.
pub struct Unbounded;

impl<K> Room<K> for Unbounded {
    fn admit(&mut self, _: &K) -> bool {
        true
    }
    fn release(&mut self, _: &K) {}
}

/// Applies the entries of `keys` (what the incremental merge touched) and
/// of `retry` (what the target refused before) where `desired` and `held`
/// (what the target holds, as far as this agent knows) differ, entry by
/// entry: a refused entry goes into `failures` and back into `retry`,
/// keeping its held value, and everything else is applied. With
/// `allow_delete` false removals wait for the prune (the held entry
/// stays). The cost follows the keys, not the maps.
pub fn apply_keys<'k, K: Ord + Clone + std::fmt::Debug + 'k, V: PartialEq + Clone>(
    r: &mut dyn Reconciler<K, V>,
    held: &mut BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    keys: impl IntoIterator<Item = &'k K>,
    retry: &mut std::collections::BTreeSet<K>,
    allow_delete: bool,
    failures: &mut Vec<Failure>,
) {
    let target = Target { r, held, retry };
    apply_keys_within(
        target,
        desired,
        keys,
        allow_delete,
        failures,
        &mut Unbounded,
    );
}

/// A target with what the agent knows it holds and the keys it refused.
pub struct Target<'a, K, V> {
    pub r: &'a mut dyn Reconciler<K, V>,
    pub held: &'a mut BTreeMap<K, V>,
    pub retry: &'a mut std::collections::BTreeSet<K>,
}

/// [`apply_keys`] into a target of bounded size: a key new to the target
/// is added only if `room` admits it, and is retried (not a failure) if
/// not.
pub fn apply_keys_within<'k, K: Ord + Clone + std::fmt::Debug + 'k, V: PartialEq + Clone>(
    t: Target<'_, K, V>,
    desired: &BTreeMap<K, V>,
    keys: impl IntoIterator<Item = &'k K>,
    allow_delete: bool,
    failures: &mut Vec<Failure>,
    room: &mut dyn Room<K>,
) {
    let Target { r, held, retry } = t;
    let mut todo = std::mem::take(retry);
    todo.extend(keys.into_iter().cloned());
    let fail = |k: &K, e: ReconcileError| Failure {
        target: e.target,
        key: format!("{k:?}"),
        error: e.source.to_string(),
    };
    for k in todo {
        match (desired.get(&k), held.get(&k)) {
            (Some(v), Some(o)) if v == o => {}
            (Some(_), None) if !room.admit(&k) => {
                retry.insert(k);
            }
            (Some(v), was) => {
                let new = was.is_none();
                match r.update(&k, v) {
                    Ok(()) => {
                        held.insert(k, v.clone());
                    }
                    Err(e) => {
                        if new {
                            room.release(&k);
                        }
                        failures.push(fail(&k, e));
                        retry.insert(k);
                    }
                }
            }
            (None, Some(_)) if allow_delete => match r.delete(&k) {
                Ok(()) => {
                    held.remove(&k);
                    room.release(&k);
                }
                Err(e) => {
                    failures.push(fail(&k, e));
                    retry.insert(k);
                }
            },
            (None, _) => {}
        }
    }
}

/// One operation seen by a [`MemoryReconciler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<K> {
    Update(K),
    Delete(K),
    Prune(usize),
}

/// A target held in memory, recording every operation.
#[derive(Debug, Clone)]
pub struct MemoryReconciler<K, V> {
    pub name: &'static str,
    pub contents: BTreeMap<K, V>,
    pub ops: Vec<Op<K>>,
    /// Keys whose update and delete fail, as a kernel that rejects an
    /// entry would (tests of error isolation).
    pub refuse: Vec<K>,
}

impl<K, V> MemoryReconciler<K, V> {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            contents: BTreeMap::new(),
            ops: Vec::new(),
            refuse: Vec::new(),
        }
    }
}

impl<K: Ord + Clone + Send, V: Clone + Send> Reconciler<K, V> for MemoryReconciler<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn update(&mut self, key: &K, value: &V) -> Result<(), ReconcileError> {
        if self.refuse.contains(key) {
            return Err(ReconcileError::new(
                self.name,
                "entry refused by the target",
            ));
        }
        self.contents.insert(key.clone(), value.clone());
        self.ops.push(Op::Update(key.clone()));
        Ok(())
    }
    fn delete(&mut self, key: &K) -> Result<(), ReconcileError> {
        if self.refuse.contains(key) {
            return Err(ReconcileError::new(
                self.name,
                "entry refused by the target",
            ));
        }
        self.contents.remove(key);
        self.ops.push(Op::Delete(key.clone()));
        Ok(())
    }
    fn snapshot(&mut self) -> Result<BTreeMap<K, V>, ReconcileError> {
        Ok(self.contents.clone())
    }
    fn prune(&mut self, desired: &BTreeMap<K, V>) -> Result<usize, ReconcileError> {
        let before = self.contents.len();
        self.contents.retain(|k, _| desired.contains_key(k));
        let n = before - self.contents.len();
        self.ops.push(Op::Prune(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn diff_updates_changed_and_defers_deletes_until_allowed() {
        let mut r = MemoryReconciler::<u32, &str>::new("t");
        let old: BTreeMap<u32, &str> = [(1, "a"), (2, "b")].into();
        let new: BTreeMap<u32, &str> = [(2, "b"), (3, "c")].into();
        r.contents = old.clone();
        let mut failures = Vec::new();
        apply_isolated(&mut r, &old, &new, false, &mut failures);
        assert_eq!(r.ops, vec![Op::Update(3)], "only the changed entry");
        assert!(
            r.contents.contains_key(&1),
            "no delete before the initial sync"
        );
        assert_eq!(r.prune(&new).unwrap(), 1);
        assert_eq!(r.contents, new);
        r.ops.clear();
        let applied = apply_isolated(&mut r, &new, &old, true, &mut failures);
        assert_eq!(r.ops, vec![Op::Update(1), Op::Delete(3)]);
        assert_eq!((r.contents.clone(), applied), (old.clone(), old));
        assert!(failures.is_empty());
    }

    #[test]
    fn a_refused_entry_is_isolated_and_retried() {
        let mut r = MemoryReconciler::<u32, &str>::new("t");
        r.refuse = vec![2];
        let old: BTreeMap<u32, &str> = [(4, "d")].into();
        let new: BTreeMap<u32, &str> = [(1, "a"), (2, "b"), (3, "c")].into();
        r.contents = old.clone();
        let mut failures = Vec::new();
        let applied = apply_isolated(&mut r, &old, &new, true, &mut failures);
        // Everything else applied, the refused one reported.
        assert_eq!(r.contents, [(1, "a"), (3, "c")].into());
        assert_eq!(applied, [(1, "a"), (3, "c")].into());
        assert_eq!(failures.len(), 1);
        assert_eq!((failures[0].target, failures[0].key.as_str()), ("t", "2"));
        // The next round retries only the refused entry.
        r.refuse.clear();
        r.ops.clear();
        let mut failures = Vec::new();
        let applied = apply_isolated(&mut r, &applied, &new, true, &mut failures);
        assert!(failures.is_empty());
        assert_eq!(applied, new);
        assert_eq!(r.ops, vec![Op::Update(2)]);
        // A refused delete keeps the entry in what is applied.
        r.refuse = vec![3];
        let fewer: BTreeMap<u32, &str> = [(1, "a")].into();
        let applied = apply_isolated(&mut r, &new, &fewer, true, &mut failures);
        assert_eq!(applied, [(1, "a"), (3, "c")].into());
        assert_eq!(failures.len(), 1);
    }
}

/// A [`MemoryReconciler`] shared with an observer (tests, status), behind a
/// mutex.
#[derive(Debug, Clone)]
pub struct SharedReconciler<K, V>(pub std::sync::Arc<std::sync::Mutex<MemoryReconciler<K, V>>>);

impl<K: Ord + Clone + Send, V: Clone + Send> SharedReconciler<K, V> {
    pub fn new(name: &'static str) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(
            MemoryReconciler::new(name),
        )))
    }
    /// A copy of the target's contents.
    pub fn contents(&self) -> BTreeMap<K, V> {
        self.0
            .lock()
            .map(|g| g.contents.clone())
            .unwrap_or_default()
    }
    pub fn ops(&self) -> Vec<Op<K>> {
        self.0.lock().map(|g| g.ops.clone()).unwrap_or_default()
    }
}

fn poisoned(target: &'static str) -> ReconcileError {
    ReconcileError::new(target, "lock poisoned")
}

impl<K: Ord + Clone + Send, V: Clone + Send> Reconciler<K, V> for SharedReconciler<K, V> {
    fn name(&self) -> &'static str {
        self.0.lock().map(|g| g.name).unwrap_or("shared")
    }
    fn update(&mut self, key: &K, value: &V) -> Result<(), ReconcileError> {
        self.0
            .lock()
            .map_err(|_| poisoned("shared"))?
            .update(key, value)
    }
    fn delete(&mut self, key: &K) -> Result<(), ReconcileError> {
        self.0.lock().map_err(|_| poisoned("shared"))?.delete(key)
    }
    fn prune(&mut self, desired: &BTreeMap<K, V>) -> Result<usize, ReconcileError> {
        self.0
            .lock()
            .map_err(|_| poisoned("shared"))?
            .prune(desired)
    }
    fn snapshot(&mut self) -> Result<BTreeMap<K, V>, ReconcileError> {
        self.0.lock().map_err(|_| poisoned("shared"))?.snapshot()
    }
}
