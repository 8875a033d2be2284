//! Network policies from Kubernetes (issue 18): CiliumNetworkPolicy
//! (`cilium.io/v2`, namespaced), CiliumClusterwideNetworkPolicy
//! (`cilium.io/v2`, cluster-scoped) and NetworkPolicy
//! (`networking.k8s.io/v1`), watched by [`crate::kube_source::KubeSource`]
//! with kube's dynamic API (no CRD types: the objects stay the JSON the
//! Kubernetes API server sent, nothing is dropped by a typed round trip).
//!
//! Each object is turned back into a manifest (apiVersion, kind,
//! metadata.name, metadata.namespace and every top-level field but
//! `status`) and parsed with [`clustermesh_api::policy::parse_documents`],
//! the parser `clustermesh policy apply` goes through: Kubernetes mode
//! accepts exactly what the API accepts, and stores the same record. An
//! object the parser refuses (L7 rules, FQDNs, unknown fields, ...) is
//! [`Skipped`] with the field path the parser names; the others are not
//! affected.
//!
//! Objects are converted when they arrive, not on every recomputation of
//! the records. The etcd key has no kind (`<ns|_>/<name>`): of a
//! CiliumNetworkPolicy and a NetworkPolicy with the same namespace and
//! name, the CiliumNetworkPolicy is exported and the other skipped.

use std::collections::BTreeMap;

use clustermesh_api::{
    ClusterName, PolicyRecord, Record as _,
    policy::{PolicyError, PolicyKind},
};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::watcher::Event,
};
use serde_json::{Map, Value};

use crate::kube_source::Skipped;

/// The kinds watched, in the order that wins a namespace/name collision.
pub const POLICY_KINDS: [PolicyKind; 3] = [
    PolicyKind::CiliumNetworkPolicy,
    PolicyKind::CiliumClusterwideNetworkPolicy,
    PolicyKind::NetworkPolicy,
];

/// The kind's name, as [`Skipped::kind`] holds it.
pub fn kind_name(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
        PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        PolicyKind::NetworkPolicy => "NetworkPolicy",
    }
}

/// Whether objects of the kind live in a namespace.
pub fn namespaced(kind: PolicyKind) -> bool {
    kind != PolicyKind::CiliumClusterwideNetworkPolicy
}

/// The API group, version, kind and plural resource name of the kind.
pub fn api_resource(kind: PolicyKind) -> ApiResource {
    let (group, version, plural) = match kind {
        PolicyKind::CiliumNetworkPolicy => ("cilium.io", "v2", "ciliumnetworkpolicies"),
        PolicyKind::CiliumClusterwideNetworkPolicy => {
            ("cilium.io", "v2", "ciliumclusterwidenetworkpolicies")
        }
        PolicyKind::NetworkPolicy => ("networking.k8s.io", "v1", "networkpolicies"),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind_name(kind));
    ApiResource::from_gvk_with_plural(&gvk, plural)
}

/// The object's `ns/name` (`name` when cluster-scoped), for logs and
/// [`Skipped::name`].
pub fn object_name(obj: &DynamicObject) -> String {
    let name = obj.metadata.name.as_deref().unwrap_or("<no name>");
    match obj.metadata.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// The object as a policy manifest: apiVersion and kind of the watched
/// resource (list items of built-in kinds carry neither), metadata name
/// and namespace, and the object's other top-level fields except
/// `status` (written by controllers, not part of the policy).
pub fn manifest(kind: PolicyKind, obj: &DynamicObject) -> Value {
    let ar = api_resource(kind);
    let mut meta = Map::new();
    if let Some(n) = &obj.metadata.name {
        meta.insert("name".into(), Value::String(n.clone()));
    }
    if let Some(ns) = &obj.metadata.namespace {
        meta.insert("namespace".into(), Value::String(ns.clone()));
    }
    let mut m = Map::new();
    m.insert("apiVersion".into(), Value::String(ar.api_version));
    m.insert("kind".into(), Value::String(ar.kind));
    m.insert("metadata".into(), Value::Object(meta));
    if let Some(data) = obj.data.as_object() {
        for (k, v) in data {
            if !matches!(k.as_str(), "status" | "apiVersion" | "kind" | "metadata") {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(m)
}

/// A parse error without the document number (one object is one
/// document): the field path and what is wrong with it.
fn reason(e: &PolicyError) -> String {
    match e {
        PolicyError::Field { field, message, .. } => format!("{field}: {message}"),
        other => other.to_string(),
    }
}

/// A watched object as the record `ApplyPolicies` would store for the
/// same manifest.
pub fn policy_record(
    cluster: &ClusterName,
    kind: PolicyKind,
    obj: &DynamicObject,
) -> Result<PolicyRecord, Skipped> {
    let sk = |r: String| Skipped {
        kind: kind_name(kind),
        name: object_name(obj),
        reason: r,
    };
    let text = manifest(kind, obj).to_string();
    if text.len() > PolicyRecord::MAX_MANIFEST_BYTES {
        return Err(sk(format!(
            "{} bytes exceeds the {}-byte limit of one policy",
            text.len(),
            PolicyRecord::MAX_MANIFEST_BYTES
        )));
    }
    let mut docs = clustermesh_api::policy::parse_documents(&text).map_err(|e| sk(reason(&e)))?;
    let d = match (docs.pop(), docs.is_empty()) {
        (Some(d), true) => d,
        _ => return Err(sk("does not hold exactly one policy".to_owned())),
    };
    if d.policy.kind != kind {
        return Err(sk(format!("parsed as a {}", d.policy.kind)));
    }
    let rec = PolicyRecord::new(cluster.clone(), d.policy, d.manifest);
    rec.validate().map_err(|e| sk(e.to_string()))?;
    Ok(rec)
}

type Converted = Result<PolicyRecord, Skipped>;

/// One policy kind's objects, converted on arrival, with relist
/// buffering: a (re)list replaces the cache at InitDone, so objects gone
/// while the watch was down are swept.
#[derive(Debug)]
pub(crate) struct PolicyCache {
    pub(crate) kind: PolicyKind,
    cluster: ClusterName,
    items: BTreeMap<String, Converted>,
    buffer: Option<BTreeMap<String, Converted>>,
    pub(crate) synced: bool,
    /// The Kubernetes API does not serve the kind (its CRD is not
    /// installed): nothing of it is exported until it does.
    pub(crate) not_served: bool,
}

impl PolicyCache {
    pub(crate) fn new(cluster: ClusterName, kind: PolicyKind) -> Self {
        Self {
            kind,
            cluster,
            items: BTreeMap::new(),
            buffer: None,
            synced: false,
            not_served: false,
        }
    }

    fn convert(&self, obj: &DynamicObject) -> (String, Converted) {
        (
            object_name(obj),
            policy_record(&self.cluster, self.kind, obj),
        )
    }

    /// Applies an event; returns whether the visible cache changed.
    pub(crate) fn apply(&mut self, ev: Event<DynamicObject>) -> bool {
        match ev {
            Event::Init => {
                self.buffer = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                let (k, v) = self.convert(&o);
                if let Some(b) = self.buffer.as_mut() {
                    b.insert(k, v);
                }
                false
            }
            Event::InitDone => {
                if let Some(b) = self.buffer.take() {
                    self.items = b;
                }
                self.synced = true;
                self.not_served = false;
                true
            }
            Event::Apply(o) => {
                let (k, v) = self.convert(&o);
                self.items.insert(k, v);
                true
            }
            Event::Delete(o) => {
                self.items.remove(&object_name(&o));
                true
            }
        }
    }

    /// The list failed with 404: the kind is not served. Counts as synced
    /// with no objects (the watcher keeps retrying, and lists them once
    /// the CRD is installed). Returns whether the visible cache changed.
    pub(crate) fn set_not_served(&mut self) -> bool {
        let changed = !self.items.is_empty();
        self.items.clear();
        self.buffer = None;
        self.synced = true;
        self.not_served = true;
        changed
    }
}

/// The policies of all kinds, each namespace/name once (the first kind of
/// [`POLICY_KINDS`] wins), and what was skipped.
pub(crate) fn resolve(caches: &[PolicyCache]) -> (Vec<PolicyRecord>, Vec<Skipped>) {
    let mut by_key: BTreeMap<crate::state::PolicyKey, PolicyRecord> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut ordered: Vec<&PolicyCache> = caches.iter().collect();
    ordered.sort_by_key(|c| POLICY_KINDS.iter().position(|k| *k == c.kind));
    for c in ordered {
        for (name, item) in &c.items {
            match item {
                Err(s) => skipped.push(s.clone()),
                Ok(r) => {
                    let key = (r.namespace.clone(), r.name.clone());
                    if let Some(first) = by_key.get(&key) {
                        skipped.push(Skipped {
                            kind: kind_name(c.kind),
                            name: name.clone(),
                            reason: format!(
                                "{} has the same namespace and name; one policy per namespace \
                                 and name is exported",
                                first.policy.reference()
                            ),
                        });
                    } else {
                        by_key.insert(key, r.clone());
                    }
                }
            }
        }
    }
    (by_key.into_values().collect(), skipped)
}
