//! Export of the cluster's state into etcd under the public schema.
//!
//! Invariants:
//! - Every key the exporter owns (cluster config, state, canaries,
//!   heartbeat) is attached to one lease it keeps alive: when the apiserver
//!   dies, its entries expire after the lease TTL.
//! - The cluster config is written before any state key.
//! - The sync canary of a kind is written only after the initial export of
//!   that kind completed.
//! - Writes are diffs against what etcd holds: unchanged keys are never
//!   rewritten, keys no longer desired are deleted (mark and sweep).
//! - On restart, the exporter lists its keys and adopts their lease if it is
//!   still alive, so a restart within the TTL produces no event at all for
//!   unchanged keys. Stopping the apiserver does not revoke the lease.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clustermesh_api::{ClusterName, Heartbeat, Key, KvKey, Record, StateKind, SyncCanary, encode};
use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};

use crate::state::Desired;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd granted no lease: {0}")]
    Lease(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A key and its new value (None: deleted), recorded once etcd applied it.
type Done = (String, Option<Vec<u8>>);

fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| Error::Etcd { op, source }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What one sync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub puts: usize,
    pub deletes: usize,
}

pub struct Exporter {
    client: Client,
    cluster: ClusterName,
    ttl: Duration,
    lease: i64,
    /// Keys (with values) that etcd holds under our lease.
    written: BTreeMap<String, Vec<u8>>,
    /// Kinds whose initial export completed in this lease's lifetime (or an
    /// adopted predecessor's).
    synced: BTreeSet<StateKind>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("cluster", &self.cluster)
            .field("lease", &self.lease)
            .field("written", &self.written.len())
            .finish_non_exhaustive()
    }
}

/// The prefixes the exporter owns in its cluster's etcd.
pub fn owned_prefixes(cluster: &ClusterName) -> Vec<String> {
    let mut p = vec![
        Key::ClusterConfig {
            cluster: cluster.clone(),
        }
        .build(),
        Key::Heartbeat {
            cluster: cluster.clone(),
        }
        .build(),
        Key::synced_prefix(cluster),
    ];
    p.extend(StateKind::ALL.iter().map(|k| k.prefix(cluster)));
    p
}

impl Exporter {
    /// Lists what a previous incarnation left, and adopts its lease if it is
    /// alive; otherwise grants a new one (the old keys expire or are
    /// rewritten under the new lease).
    pub async fn start(mut client: Client, cluster: ClusterName, ttl: Duration) -> Result<Self> {
        let mut existing: BTreeMap<String, (Vec<u8>, i64)> = BTreeMap::new();
        for p in owned_prefixes(&cluster) {
            // cluster-config and heartbeat keys are exact; the others prefixes.
            let opts = if p.ends_with('/') {
                Some(GetOptions::new().with_prefix())
            } else {
                None
            };
            let resp = client
                .get(p.as_str(), opts)
                .await
                .map_err(etcd("list own keys"))?;
            for kv in resp.kvs() {
                if let Ok(k) = std::str::from_utf8(kv.key()) {
                    existing.insert(k.to_owned(), (kv.value().to_vec(), kv.lease()));
                }
            }
        }
        let hb_key = Key::Heartbeat {
            cluster: cluster.clone(),
        }
        .build();
        let mut adopted = None;
        if let Some((_, lease)) = existing.get(&hb_key)
            && *lease != 0
        {
            let ttl_left = client
                .lease_time_to_live(*lease, None)
                .await
                .map_err(etcd("lease time-to-live"))?
                .ttl();
            if ttl_left > 0 {
                adopted = Some(*lease);
            }
        }
        let mut me = Self {
            client,
            cluster,
            ttl,
            lease: 0,
            written: BTreeMap::new(),
            synced: BTreeSet::new(),
        };
        match adopted {
            Some(lease) => {
                me.lease = lease;
                me.written = existing
                    .into_iter()
                    .filter(|(_, (_, l))| *l == lease)
                    .map(|(k, (v, _))| (k, v))
                    .collect();
                for kind in StateKind::ALL {
                    let canary = Key::Synced {
                        cluster: me.cluster.clone(),
                        kind,
                    }
                    .build();
                    if me.written.contains_key(&canary) {
                        me.synced.insert(kind);
                    }
                }
                tracing::info!(lease, keys = me.written.len(), "adopted the previous lease");
            }
            None => me.grant().await?,
        }
        Ok(me)
    }

    async fn grant(&mut self) -> Result<()> {
        let resp = self
            .client
            .lease_grant(self.ttl.as_secs().max(2) as i64, None)
            .await
            .map_err(etcd("lease grant"))?;
        if resp.id() == 0 || !resp.error().is_empty() {
            return Err(Error::Lease(resp.error().to_owned()));
        }
        self.lease = resp.id();
        self.written.clear();
        self.synced.clear();
        tracing::info!(lease = self.lease, "granted a new lease");
        Ok(())
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    pub fn synced(&self) -> &BTreeSet<StateKind> {
        &self.synced
    }

    /// The lease expired (etcd unreachable for longer than its TTL): start
    /// over with a new one and rewrite everything.
    pub async fn lease_lost(&mut self) -> Result<()> {
        tracing::warn!(
            lease = self.lease,
            "lease lost; re-exporting under a new lease"
        );
        self.grant().await
    }

    async fn apply(
        &mut self,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<SyncStats> {
        let stats = SyncStats {
            puts: puts.len(),
            deletes: deletes.len(),
        };
        let mut ops: Vec<(TxnOp, Done)> = Vec::with_capacity(puts.len() + deletes.len());
        for (k, v) in puts {
            ops.push((
                TxnOp::put(
                    k.clone(),
                    v.clone(),
                    Some(PutOptions::new().with_lease(self.lease)),
                ),
                (k, Some(v)),
            ));
        }
        for k in deletes {
            ops.push((TxnOp::delete(k.clone(), None), (k, None)));
        }
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(100));
            let batch = std::mem::replace(&mut ops, rest);
            let (txn_ops, done): (Vec<TxnOp>, Vec<Done>) = batch.into_iter().unzip();
            self.client
                .txn(Txn::new().and_then(txn_ops))
                .await
                .map_err(etcd("export"))?;
            for (k, v) in done {
                match v {
                    Some(v) => self.written.insert(k, v),
                    None => self.written.remove(&k),
                };
            }
        }
        Ok(stats)
    }

    /// Brings etcd to `desired`: cluster config first, then each kind (puts
    /// and deletes of the difference), then the canaries of kinds whose
    /// initial export just completed.
    pub async fn sync(&mut self, desired: &Desired) -> Result<SyncStats> {
        let mut total = SyncStats::default();
        let (ck, cv) = &desired.cluster_config;
        if self.written.get(ck) != Some(cv) {
            let s = self.apply(vec![(ck.clone(), cv.clone())], vec![]).await?;
            total.puts += s.puts;
        }
        let mut new_canaries = Vec::new();
        for (kind, want) in &desired.kinds {
            let prefix = kind.prefix(&self.cluster);
            let puts: Vec<(String, Vec<u8>)> = want
                .iter()
                .filter(|(k, v)| self.written.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let deletes: Vec<String> = self
                .written
                .keys()
                .filter(|k| k.starts_with(&prefix) && !want.contains_key(*k))
                .cloned()
                .collect();
            let s = self.apply(puts, deletes).await?;
            total.puts += s.puts;
            total.deletes += s.deletes;
            if !self.synced.contains(kind) {
                let c = SyncCanary {
                    cluster: self.cluster.clone(),
                    kind: *kind,
                    synced_at_ms: now_ms(),
                };
                if let Ok(v) = encode(&c) {
                    new_canaries.push((c.key().build(), v));
                }
            }
        }
        if !new_canaries.is_empty() {
            let kinds: Vec<StateKind> = desired
                .kinds
                .keys()
                .filter(|k| !self.synced.contains(*k))
                .copied()
                .collect();
            let s = self.apply(new_canaries, vec![]).await?;
            total.puts += s.puts;
            self.synced.extend(kinds);
        }
        Ok(total)
    }

    /// Writes changed keys only (the steady state: O(changes)). Keys of a
    /// kind are only written after its initial export, which [`Self::sync`]
    /// does.
    pub async fn apply_changes(&mut self, changes: Vec<crate::state::Change>) -> Result<SyncStats> {
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for (k, v) in changes {
            match v {
                Some(v) if self.written.get(&k) != Some(&v) => puts.push((k, v)),
                None if self.written.contains_key(&k) => deletes.push(k),
                _ => {}
            }
        }
        self.apply(puts, deletes).await
    }

    pub async fn heartbeat(&mut self) -> Result<()> {
        let hb = Heartbeat {
            cluster: self.cluster.clone(),
            timestamp_ms: now_ms(),
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        };
        if let Ok(v) = encode(&hb) {
            self.apply(vec![(hb.key().build(), v)], vec![]).await?;
        }
        Ok(())
    }
}

/// Keeps `lease` alive until cancelled. Returns when the lease is gone
/// (etcd answered TTL 0), so the caller can start over.
pub async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let every = (ttl / 3).max(Duration::from_millis(500));
    loop {
        let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "lease keep-alive stream failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(every) => continue,
                }
            }
        };
        loop {
            if let Err(e) = keeper.keep_alive().await {
                tracing::warn!(error = %e, "lease keep-alive failed");
                break;
            }
            match stream.message().await {
                Ok(Some(r)) if r.ttl() <= 0 => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "lease keep-alive response failed");
                    break;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(every) => {}
            }
        }
        // The stream broke: ask whether the lease still exists.
        if let Ok(r) = client.lease_time_to_live(lease, None).await
            && r.ttl() <= 0
        {
            return Ok(());
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
