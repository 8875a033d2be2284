//! The apiserver's own durable records in etcd, under
//! `clustermesh/internal/<cluster>/` (never readable by remote clusters):
//!
//! ```text
//! nodes/<node>                  NodeRecord       (standalone registrations)
//! endpoints/<ip>                EndpointRecord
//! services/<namespace>/<name>   ServiceRecord    (declared through the API)
//! policies/<namespace or _>/<name>  PolicyRecord (applied through the API)
//! identities/<id>               IdentityRecord   (allocations, never leased)
//! identity-labels/<labels>      <id>             (uniqueness index; labels as "k=v k2=v2")
//! ```
//!
//! They are the source of truth across restarts: the exported (leased)
//! state is recomputed from them, so a restart re-exports exactly what was
//! there and readers see no flap. Identities in particular survive any
//! outage, so an identity number never changes meaning.

use std::{net::IpAddr, time::Instant};

use clustermesh_api::{
    ClusterId, ClusterName, EndpointRecord, Identity, IdentityRecord, K8sName, Labels, NodeName,
    NodeRecord, PolicyRecord, Record, ServiceRecord, encode, keys::CLUSTER_WIDE_SEGMENT,
};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use serde::de::DeserializeOwned;

use crate::state::{ClusterState, NodeEntry};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("identity space of cluster {cluster} is exhausted (65280 identities)")]
    IdentitiesExhausted { cluster: ClusterName },
    #[error("identity allocation for {labels} did not settle after {tries} attempts")]
    AllocationContended { labels: String, tries: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn etcd(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| Error::Etcd { op, source }
}

/// Key builder for the internal prefix of one cluster.
#[derive(Debug, Clone)]
pub struct Internal {
    prefix: String,
}

impl Internal {
    pub fn new(cluster: &ClusterName) -> Self {
        Self {
            prefix: format!("{}internal/{cluster}/", clustermesh_api::keys::ROOT),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn node(&self, n: &NodeName) -> String {
        format!("{}nodes/{n}", self.prefix)
    }
    pub fn endpoint(&self, ip: &IpAddr) -> String {
        format!("{}endpoints/{ip}", self.prefix)
    }
    pub fn service(&self, ns: &str, name: &str) -> String {
        format!("{}services/{ns}/{name}", self.prefix)
    }
    pub fn policy(&self, ns: Option<&K8sName>, name: &str) -> String {
        let ns = ns.map_or(CLUSTER_WIDE_SEGMENT, K8sName::as_str);
        format!("{}policies/{ns}/{name}", self.prefix)
    }
    pub fn identity(&self, id: Identity) -> String {
        format!("{}identities/{id}", self.prefix)
    }
    /// The encryption policy set through the API (`SetEncryptionPolicy`).
    pub fn encryption_policy(&self) -> String {
        format!("{}encryption-policy", self.prefix)
    }
    pub fn identity_labels(&self, labels: &Labels) -> String {
        let canon: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}identity-labels/{}", self.prefix, canon.join(" "))
    }
}

fn json<R: Record>(r: &R) -> Result<Vec<u8>> {
    encode(r).map_err(|e| Error::Encode {
        what: R::WHAT,
        reason: e.to_string(),
    })
}

/// Loads the durable state. A record that does not decode is logged and
/// skipped: it never stops the apiserver, and it is left in etcd for an
/// operator to inspect.
pub async fn load(client: &mut Client, state: &mut ClusterState, now: Instant) -> Result<()> {
    let keys = Internal::new(&state.cluster);
    let resp = client
        .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd("load internal state"))?;
    fn parse<R: Record + DeserializeOwned>(key: &str, v: &[u8]) -> Option<R> {
        match serde_json::from_slice::<R>(v) {
            Ok(r) => match r.validate() {
                Ok(()) => Some(r),
                Err(e) => {
                    tracing::warn!(key, error = %e, "skipping invalid stored {}", R::WHAT);
                    None
                }
            },
            Err(e) => {
                tracing::warn!(key, error = %e, "skipping undecodable stored {}", R::WHAT);
                None
            }
        }
    }
    for kv in resp.kvs() {
        let Ok(key) = std::str::from_utf8(kv.key()) else {
            continue;
        };
        let Some(rest) = key.strip_prefix(keys.prefix()) else {
            continue;
        };
        let v = kv.value();
        if rest == "encryption-policy" {
            // Set through the API: takes precedence over the flags.
            match serde_json::from_slice::<clustermesh_api::EncryptionPolicy>(v) {
                Ok(p)
                    if p.mode != clustermesh_api::EncryptionMode::None
                        || !(p.strict || p.strict_ingress) =>
                {
                    if p != state.encryption {
                        tracing::warn!(stored = ?p, flags = ?state.encryption, "the encryption policy set with `clustermesh encryption` overrides the --encryption flags");
                    }
                    state.encryption = p;
                }
                _ => tracing::warn!(key, "skipping invalid stored encryption policy"),
            }
        } else if rest.starts_with("nodes/") {
            if let Some(r) = parse::<NodeRecord>(key, v)
                && r.cluster == state.cluster
            {
                state.nodes.insert(
                    r.name.clone(),
                    NodeEntry {
                        record: r,
                        last_seen: now,
                        from_kubernetes: false,
                    },
                );
            }
        } else if rest.starts_with("endpoints/") {
            if let Some(r) = parse::<EndpointRecord>(key, v)
                && r.cluster == state.cluster
            {
                state.endpoints.insert(r.ip, r);
            }
        } else if rest.starts_with("services/") {
            if let Some(r) = parse::<ServiceRecord>(key, v)
                && r.cluster == state.cluster
            {
                state
                    .services
                    .insert((r.namespace.clone(), r.name.clone()), r);
            }
        } else if rest.starts_with("policies/") {
            if let Some(r) = parse::<PolicyRecord>(key, v)
                && r.cluster == state.cluster
                && keys.policy(r.namespace.as_ref(), r.name.as_str()) == key
            {
                state
                    .policies
                    .insert((r.namespace.clone(), r.name.clone()), r);
            }
        } else if rest.starts_with("identities/")
            && let Some(r) = parse::<IdentityRecord>(key, v)
            && r.cluster == state.cluster
            && r.id.cluster() == Some(state.cluster_id)
        {
            state.add_identity(r);
        }
    }
    // Endpoints of nodes that are gone are not restored.
    let orphans: Vec<IpAddr> = state
        .endpoints
        .values()
        .filter(|e| {
            e.node
                .as_ref()
                .is_some_and(|n| !state.nodes.contains_key(n))
        })
        .map(|e| e.ip)
        .collect();
    for ip in orphans {
        state.endpoints.remove(&ip);
    }
    Ok(())
}

/// Most operations in one transaction (etcd's default limit is 128).
pub const TXN_OPS: usize = 100;

/// Applies puts and deletes in transactions of at most [`TXN_OPS`]
/// operations.
pub async fn write(
    client: &mut Client,
    puts: Vec<(String, Vec<u8>)>,
    deletes: Vec<String>,
) -> Result<()> {
    let mut ops: Vec<TxnOp> = puts
        .into_iter()
        .map(|(k, v)| TxnOp::put(k, v, None))
        .chain(deletes.into_iter().map(|k| TxnOp::delete(k, None)))
        .collect();
    while !ops.is_empty() {
        let rest = ops.split_off(ops.len().min(TXN_OPS));
        let batch = std::mem::replace(&mut ops, rest);
        client
            .txn(Txn::new().and_then(batch))
            .await
            .map_err(etcd("write internal state"))?;
    }
    Ok(())
}

pub async fn put_node(client: &mut Client, keys: &Internal, r: &NodeRecord) -> Result<()> {
    write(client, vec![(keys.node(&r.name), json(r)?)], vec![]).await
}

pub async fn delete_node(
    client: &mut Client,
    keys: &Internal,
    n: &NodeName,
    endpoints: &[IpAddr],
) -> Result<()> {
    let mut dels = vec![keys.node(n)];
    dels.extend(endpoints.iter().map(|ip| keys.endpoint(ip)));
    write(client, vec![], dels).await
}

/// The internal store's key and value of an endpoint.
pub fn endpoint_put(keys: &Internal, r: &EndpointRecord) -> Result<(String, Vec<u8>)> {
    Ok((keys.endpoint(&r.ip), json(r)?))
}

pub async fn delete_endpoint(client: &mut Client, keys: &Internal, ip: &IpAddr) -> Result<()> {
    write(client, vec![], vec![keys.endpoint(ip)]).await
}

pub async fn put_encryption_policy(
    client: &mut Client,
    keys: &Internal,
    p: &clustermesh_api::EncryptionPolicy,
) -> Result<()> {
    let v = serde_json::to_vec(p).map_err(|e| Error::Encode {
        what: "encryption policy",
        reason: e.to_string(),
    })?;
    write(client, vec![(keys.encryption_policy(), v)], vec![]).await
}

pub async fn put_service(client: &mut Client, keys: &Internal, r: &ServiceRecord) -> Result<()> {
    write(
        client,
        vec![(
            keys.service(r.namespace.as_str(), r.name.as_str()),
            json(r)?,
        )],
        vec![],
    )
    .await
}

pub async fn delete_service(
    client: &mut Client,
    keys: &Internal,
    ns: &str,
    name: &str,
) -> Result<()> {
    write(client, vec![], vec![keys.service(ns, name)]).await
}

/// Stores `puts` and deletes `deletes` in one transaction (the caller
/// bounds them to [`crate::state::MAX_APPLY`]): all or nothing.
pub async fn write_policies(
    client: &mut Client,
    keys: &Internal,
    puts: &[PolicyRecord],
    deletes: &[crate::state::PolicyKey],
) -> Result<()> {
    let mut ops = Vec::with_capacity(puts.len() + deletes.len());
    for r in puts {
        ops.push(TxnOp::put(
            keys.policy(r.namespace.as_ref(), r.name.as_str()),
            json(r)?,
            None,
        ));
    }
    for (ns, name) in deletes {
        ops.push(TxnOp::delete(keys.policy(ns.as_ref(), name.as_str()), None));
    }
    client
        .txn(Txn::new().and_then(ops))
        .await
        .map_err(etcd("write policies"))?;
    Ok(())
}

/// Deletes a collected identity (its record and its labels' index entry,
/// the latter only while it still names this identity).
pub async fn delete_identity(
    client: &mut Client,
    keys: &Internal,
    rec: &IdentityRecord,
) -> Result<()> {
    let labels_key = keys.identity_labels(&rec.labels);
    let id_key = keys.identity(rec.id);
    let txn = Txn::new()
        .when([Compare::value(
            labels_key.clone(),
            CompareOp::Equal,
            rec.id.to_string(),
        )])
        .and_then([
            TxnOp::delete(labels_key, None),
            TxnOp::delete(id_key.clone(), None),
        ])
        .or_else([TxnOp::delete(id_key, None)]);
    client.txn(txn).await.map_err(etcd("delete identity"))?;
    Ok(())
}

/// Allocates (or finds) the identity of `labels`.
///
/// Race-free between concurrent allocators (two apiserver processes, or two
/// requests): the labels index key and the identity key are created in one
/// transaction guarded by "neither exists yet". A loser either finds the
/// labels already allocated (and uses that identity) or the number taken
/// (and tries the next).
pub async fn allocate_identity(
    client: &mut Client,
    keys: &Internal,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    labels: &Labels,
    known: &ClusterState,
) -> Result<IdentityRecord> {
    if let Some(id) = known.identity_by_labels.get(labels)
        && let Some(r) = known.identities.get(id)
    {
        return Ok(r.clone());
    }
    let labels_key = keys.identity_labels(labels);
    const SPACE: usize = (u16::MAX - Identity::FIRST_LOCAL + 1) as usize;
    if known.identities.len() >= SPACE {
        return Err(Error::IdentitiesExhausted {
            cluster: cluster.clone(),
        });
    }
    let mut candidate = known
        .identities
        .keys()
        .map(|i| i.local())
        .max()
        .map_or(Identity::FIRST_LOCAL, next);
    const TRIES: u32 = 64;
    for _ in 0..TRIES {
        let Ok(id) = Identity::new(cluster_id, candidate) else {
            return Err(Error::IdentitiesExhausted {
                cluster: cluster.clone(),
            });
        };
        if known.identities.contains_key(&id) {
            candidate = next(candidate);
            continue;
        }
        let rec = IdentityRecord {
            id,
            cluster: cluster.clone(),
            labels: labels.clone(),
        };
        let id_key = keys.identity(id);
        let txn = Txn::new()
            .when([
                Compare::create_revision(labels_key.clone(), CompareOp::Equal, 0),
                Compare::create_revision(id_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(labels_key.clone(), id.to_string(), None),
                TxnOp::put(id_key.clone(), json(&rec)?, None),
            ])
            .or_else([TxnOp::get(labels_key.clone(), None)]);
        let resp = client.txn(txn).await.map_err(etcd("allocate identity"))?;
        if resp.succeeded() {
            return Ok(rec);
        }
        // Lost a race: did someone allocate these labels?
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op
                && let Some(kv) = g.kvs().first()
                && let Ok(s) = std::str::from_utf8(kv.value())
                && let Ok(id) = s.parse::<Identity>()
            {
                return Ok(IdentityRecord {
                    id,
                    cluster: cluster.clone(),
                    labels: labels.clone(),
                });
            }
        }
        candidate = next(candidate);
    }
    Err(Error::AllocationContended {
        labels: labels.to_string(),
        tries: TRIES,
    })
}

/// The next local id to try, wrapping to the start of the range.
fn next(c: u16) -> u16 {
    if c == u16::MAX {
        Identity::FIRST_LOCAL
    } else {
        c + 1
    }
}
