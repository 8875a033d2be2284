//! One watcher per cluster (the local one and each remote), following the
//! watch contract: `Init`, `Apply`/`Delete` for every listed key, `InitDone`,
//! then `Apply`/`Delete` as etcd reports changes.
//!
//! A session: connect; read `cluster-config/<name>` (it must exist and name
//! this cluster); wait until the sync canaries of the watched kinds exist
//! (the exporter's initial export is complete); list their state prefixes
//! at one revision; watch them from the next revision. The local cluster's
//! watcher watches every kind; a remote cluster's leaves out the policies
//! (each cluster enforces its own; a remote's policies are never read, so a
//! remote of an older release without that kind is still followed). Any failure ends the session; the next
//! one starts after a jittered exponential backoff (backon) and lists
//! again, so the consumer's mark-and-sweep removes what vanished meanwhile.
//! A compacted watch revision ends the session at once (relist, no missed
//! delete); so does a change of etcd's cluster id (a rebuilt etcd).
//!
//! The watcher never decodes values: it passes raw bytes, and the consumer
//! validates everything it reads.

use std::time::Duration;

use backon::BackoffBuilder as _;
use clustermesh_api::{ClusterName, Key, KvKey, StateKind};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::ClusterFile;

/// What a watcher reports.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// Connected; the cluster config's raw value (validated by the consumer).
    Connected {
        config: Vec<u8>,
        etcd_cluster_id: u64,
    },
    /// A (re)list starts: buffer until `InitDone`.
    Init,
    Apply {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// One page of a list: each key-value as an `Apply`, in order (one
    /// event for a page: the queue and the copies are per page).
    Page(Vec<etcd_client::KeyValue>),
    Delete {
        key: Vec<u8>,
    },
    InitDone,
    /// The session ended; the consumer keeps the last state.
    Disconnected {
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] clustermesh_kvstore::Error),
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("cluster {0} has no cluster-config key (is its apiserver running?)")]
    NoClusterConfig(ClusterName),
    #[error("watch revision compacted at {0}: relisting")]
    Compacted(i64),
    #[error("watch cancelled by etcd: {0}")]
    WatchCancelled(String),
    #[error("etcd cluster id changed from {old:x} to {new:x} (rebuilt etcd): full resync")]
    EtcdReplaced { old: u64, new: u64 },
    #[error("the consumer is gone")]
    ConsumerGone,
}

fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> SessionError {
    move |source| SessionError::Etcd { op, source }
}

struct Session<'a> {
    name: &'a ClusterName,
    tx: &'a mpsc::Sender<(ClusterName, WatchEvent)>,
}

impl Session<'_> {
    async fn send(&self, ev: WatchEvent) -> Result<(), SessionError> {
        self.tx
            .send((self.name.clone(), ev))
            .await
            .map_err(|_| SessionError::ConsumerGone)
    }
}

/// How often the canary check polls while the exporter is still syncing.
const CANARY_POLL: Duration = Duration::from_millis(200);

/// The kinds a watcher follows: every kind for the local cluster, all
/// but the policies for a remote one.
pub fn watched_kinds(local: bool) -> Vec<StateKind> {
    StateKind::ALL
        .into_iter()
        .filter(|k| local || *k != StateKind::Policies)
        .collect()
}

async fn session(
    name: &ClusterName,
    file: &ClusterFile,
    kinds: &[StateKind],
    tx: &mpsc::Sender<(ClusterName, WatchEvent)>,
    last_etcd_id: &mut Option<u64>,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let s = Session { name, tx };
    let mut client = file.etcd().connect().await?;
    let cfg_key = Key::ClusterConfig {
        cluster: name.clone(),
    }
    .build();
    connected(&s, &mut client, &cfg_key, last_etcd_id).await?;
    if !canaries(name, kinds, &mut client, cancel).await? {
        return Ok(());
    }
    let prefixes: Vec<String> = kinds.iter().map(|k| k.prefix(name)).collect();
    let rev = list(&s, &mut client, &prefixes).await?;
    watch(&s, &mut client, &prefixes, &cfg_key, rev, cancel).await
}

/// Reads the cluster config and reports the session as connected.
async fn connected(
    s: &Session<'_>,
    client: &mut Client,
    cfg_key: &str,
    last_etcd_id: &mut Option<u64>,
) -> Result<(), SessionError> {
    let name = s.name;
    let r = client
        .get(cfg_key, None)
        .await
        .map_err(etcd("get cluster-config"))?;
    let etcd_id = r.header().map(|h| h.cluster_id()).unwrap_or(0);
    if let Some(old) = *last_etcd_id
        && old != etcd_id
    {
        // Reported once; the relist below is the full resync.
        tracing::warn!(cluster = %name, "{}", SessionError::EtcdReplaced { old, new: etcd_id });
    }
    *last_etcd_id = Some(etcd_id);
    let Some(kv) = r.kvs().first() else {
        return Err(SessionError::NoClusterConfig(name.clone()));
    };
    s.send(WatchEvent::Connected {
        config: kv.value().to_vec(),
        etcd_cluster_id: etcd_id,
    })
    .await?;

    Ok(())
}

/// Waits for the exporter's initial export (the canaries of `kinds`);
/// false if cancelled meanwhile.
async fn canaries(
    name: &ClusterName,
    kinds: &[StateKind],
    client: &mut Client,
    cancel: &CancellationToken,
) -> Result<bool, SessionError> {
    let synced = Key::synced_prefix(name);
    loop {
        let r = client
            .get(
                synced.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(etcd("get canaries"))?;
        let have = kinds.iter().all(|k| {
            let want = Key::Synced {
                cluster: name.clone(),
                kind: *k,
            }
            .build();
            r.kvs().iter().any(|kv| kv.key() == want.as_bytes())
        });
        if have {
            return Ok(true);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            _ = tokio::time::sleep(CANARY_POLL) => {}
        }
    }
}

/// Keys fetched per list request: a large remote cluster (100k+
/// endpoints) is read in pages, never as one response over etcd's and
/// gRPC's message limits.
pub const LIST_PAGE: i64 = 1000;

/// The end of the key range of `prefix` (etcd's range_end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return end;
        }
        end.pop();
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

/// Lists every kind at one revision (Init, Apply..., InitDone), in pages of
/// [`LIST_PAGE`] keys; returns the revision.
async fn list(
    s: &Session<'_>,
    client: &mut Client,
    prefixes: &[String],
) -> Result<i64, SessionError> {
    let mut rev = 0;
    for (i, p) in prefixes.iter().enumerate() {
        let end = prefix_end(p.as_bytes());
        let mut from = p.as_bytes().to_vec();
        loop {
            let mut o = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if rev != 0 {
                // Every page and kind at the first page's revision: one
                // consistent snapshot.
                o = o.with_revision(rev);
            }
            let r = client
                .get(from.clone(), Some(o))
                .await
                .map_err(etcd("list"))?;
            if rev == 0 {
                rev = r.header().map(|h| h.revision()).unwrap_or(0);
            }
            if i == 0 && from.as_slice() == p.as_bytes() {
                s.send(WatchEvent::Init).await?;
            }
            let Some(last) = r.kvs().last().map(|kv| kv.key().to_vec()) else {
                break;
            };
            let more = r.more();
            let mut r = r;
            s.send(WatchEvent::Page(r.take_kvs())).await?;
            if !more {
                break;
            }
            // The next page starts just after the last key.
            from = last;
            from.push(0);
        }
    }
    s.send(WatchEvent::InitDone).await?;

    Ok(rev)
}

/// Watches every kind, and the cluster config, from the next revision.
async fn watch(
    s: &Session<'_>,
    client: &mut Client,
    prefixes: &[String],
    cfg_key: &str,
    rev: i64,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let mut streams = Vec::new();
    for p in prefixes
        .iter()
        .map(String::as_str)
        .chain(std::iter::once(cfg_key))
    {
        let mut o = WatchOptions::new().with_start_revision(rev + 1);
        if p.ends_with('/') {
            o = o.with_prefix();
        }
        let w = client.watch(p, Some(o)).await.map_err(etcd("watch"))?;
        streams.push(
            futures_util::stream::unfold(w, |mut w| async move {
                let m = w.message().await;
                Some((m, w))
            })
            .boxed(),
        );
    }
    let mut merged = futures_util::stream::select_all(streams);
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = merged.next() => m,
        };
        let resp = match msg {
            Some(Ok(Some(r))) => r,
            Some(Ok(None)) | None => {
                return Err(SessionError::WatchCancelled("stream ended".into()));
            }
            Some(Err(e)) => return Err(etcd("watch")(e)),
        };
        if resp.compact_revision() > 0 {
            return Err(SessionError::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            return Err(SessionError::WatchCancelled(
                resp.cancel_reason().to_owned(),
            ));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            if kv.key() == cfg_key.as_bytes() {
                // A changed or deleted cluster config: start over so the
                // consumer re-validates identity and policy.
                return Err(SessionError::WatchCancelled(
                    "cluster config changed".into(),
                ));
            }
            let e = match ev.event_type() {
                EventType::Put => WatchEvent::Apply {
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                },
                EventType::Delete => WatchEvent::Delete {
                    key: kv.key().to_vec(),
                },
            };
            s.send(e).await?;
        }
    }
}

/// Runs sessions until cancelled, with jittered exponential backoff between
/// failed ones (reset after a session that got as far as listing).
pub async fn run(
    name: ClusterName,
    file: ClusterFile,
    local: bool,
    tx: mpsc::Sender<(ClusterName, WatchEvent)>,
    cancel: CancellationToken,
) {
    let kinds = watched_kinds(local);
    let builder = clustermesh_kvstore::backoff::reconnect();
    let mut backoff = builder.build();
    let mut last_etcd_id = None;
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = session(&name, &file, &kinds, &tx, &mut last_etcd_id, &cancel) => r,
        };
        let err = match r {
            Ok(()) => return,
            Err(SessionError::ConsumerGone) => return,
            Err(e) => e,
        };
        let immediate = matches!(
            err,
            SessionError::Compacted(_) | SessionError::WatchCancelled(_)
        );
        tracing::info!(cluster = %name, error = %err, "cluster session ended");
        if tx
            .send((
                name.clone(),
                WatchEvent::Disconnected {
                    error: err.to_string(),
                },
            ))
            .await
            .is_err()
        {
            return;
        }
        let delay = if immediate {
            backoff = builder.build();
            Duration::ZERO
        } else {
            backoff
                .next()
                .unwrap_or(clustermesh_kvstore::backoff::MAX_DELAY)
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/b/"), b"a/b0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
