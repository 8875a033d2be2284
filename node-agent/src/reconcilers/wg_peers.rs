//! [`WgPeers`] keeps the device's peers equal to the merged desired state
//! (one per remote node: public key, underlay endpoint, pod CIDRs) over the
//! standard control protocol. Updating a peer's endpoint or allowed IPs
//! keeps its session. A node whose key changed (it rotated) gets its new
//! key routed to in one transaction while the old entry stays *draining*
//! (decrypts the old sessions' last packets) for the overlap; the agent's
//! [`Reconciler::tick`] removes it once the overlap has passed (time is
//! passed in, no thread sleeps).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use clustermesh_api::WgPublicKey;
use clustermesh_crypto::wg::uapi::Client;

use super::{ReconcileError, Reconciler};
use crate::{audit::Audit, desired::Peer};

fn rerr(e: std::io::Error) -> ReconcileError {
    ReconcileError::new("wireguard peers", e)
}

/// A rotated-away key still decrypting its sessions' last packets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Draining {
    peer: String,
    key: WgPublicKey,
    since: Instant,
}

/// The device's peers as a reconcile target (key: `cluster/node`).
pub struct WgPeers {
    client: Client,
    keys: BTreeMap<String, WgPublicKey>,
    /// How long a rotated-away key stays draining.
    overlap: Duration,
    draining: Vec<Draining>,
    audit: Audit,
}

impl WgPeers {
    pub fn new(client: Client, overlap: Duration, audit: Audit) -> Self {
        Self {
            client,
            keys: BTreeMap::new(),
            overlap,
            draining: Vec::new(),
            audit,
        }
    }

    /// Keys draining now: (peer, fingerprint).
    pub fn draining(&self) -> impl Iterator<Item = (&str, String)> {
        self.draining
            .iter()
            .map(|d| (d.peer.as_str(), d.key.fingerprint()))
    }
}

impl Reconciler<String, Peer> for WgPeers {
    fn name(&self) -> &'static str {
        "wireguard peers"
    }
    fn update(&mut self, k: &String, v: &Peer) -> Result<(), ReconcileError> {
        if let Some(old) = self.keys.get(k).copied()
            && old != v.public_key
        {
            // Make before break: routes move to the new key at once, the
            // old entry drains, and goes after the overlap.
            self.client
                .replace_peer_key(&old, &v.public_key, v.endpoint, &v.allowed_ips)
                .map_err(rerr)?;
            self.audit.record(
                "peer_key_changed",
                serde_json::json!({"peer": k, "old_key": old.fingerprint(), "new_key": v.public_key.fingerprint(), "drain_s": self.overlap.as_secs()}),
            );
            self.draining.push(Draining {
                peer: k.clone(),
                key: old,
                since: Instant::now(),
            });
            self.keys.insert(k.clone(), v.public_key);
            return Ok(());
        }
        self.client
            .set_peer(&v.public_key, v.endpoint, &v.allowed_ips)
            .map_err(rerr)?;
        if self.keys.insert(k.clone(), v.public_key).is_none() {
            self.audit.record(
                "peer_added",
                serde_json::json!({"peer": k, "key": v.public_key.fingerprint(), "endpoint": v.endpoint.to_string()}),
            );
        }
        Ok(())
    }
    fn delete(&mut self, k: &String) -> Result<(), ReconcileError> {
        if let Some(key) = self.keys.remove(k) {
            self.client.remove_peer(key.as_bytes()).map_err(rerr)?;
            self.audit.record(
                "peer_removed",
                serde_json::json!({"peer": k, "key": key.fingerprint()}),
            );
        }
        Ok(())
    }
    fn prune(&mut self, desired: &BTreeMap<String, Peer>) -> Result<usize, ReconcileError> {
        let want: Vec<[u8; 32]> = desired.values().map(|p| *p.public_key.as_bytes()).collect();
        let mut n = 0;
        for p in self.client.get().map_err(rerr)?.peers {
            let draining = self
                .draining
                .iter()
                .any(|d| *d.key.as_bytes() == p.public_key);
            if !want.contains(&p.public_key) && !draining {
                self.client.remove_peer(&p.public_key).map_err(rerr)?;
                let key = WgPublicKey::from_bytes(p.public_key)
                    .map(|k| k.fingerprint())
                    .unwrap_or_default();
                self.audit.record(
                    "peer_removed",
                    serde_json::json!({"peer": null, "key": key, "reason": "not desired after resync"}),
                );
                n += 1;
            }
        }
        self.keys.retain(|k, _| desired.contains_key(k));
        Ok(n)
    }
    /// Empty: the first diff re-applies every desired peer, which keeps the
    /// sessions of unchanged peers (same key).
    fn snapshot(&mut self) -> Result<BTreeMap<String, Peer>, ReconcileError> {
        Ok(BTreeMap::new())
    }
    /// Removes the drained keys whose overlap has passed; one the device
    /// refuses to remove stays listed and is retried on the next tick.
    fn tick(&mut self, now: Instant) -> Result<(), ReconcileError> {
        let overlap = self.overlap;
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.draining)
            .into_iter()
            .partition(|d| now.saturating_duration_since(d.since) >= overlap);
        self.draining = keep;
        let mut first_err = None;
        for d in due {
            match self.client.remove_peer(d.key.as_bytes()) {
                Ok(()) => {
                    tracing::info!(peer = %d.peer, key = %d.key.fingerprint(), "drained key removed")
                }
                Err(e) => {
                    tracing::warn!(peer = %d.peer, error = %e, "removing a drained key");
                    first_err.get_or_insert(e);
                    self.draining.push(d);
                }
            }
        }
        first_err.map_or(Ok(()), |e| Err(rerr(e)))
    }
}
