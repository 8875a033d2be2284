//! Kubernetes source: Nodes, Services, EndpointSlices, Namespaces and the
//! network policy kinds ([`crate::kube_policies`]) watched with kube-rs
//! and turned into the same records the standalone source produces.
//!
//! Annotations (the ones Cilium users already have on their manifests):
//! - `service.cilium.io/global: "true"`: merge with same-named services of
//!   other clusters;
//! - `service.cilium.io/shared: "false"`: consume remote backends, do not
//!   offer local ones (default true);
//! - `service.cilium.io/affinity: local|remote|none`.
//!
//! The same annotations on a Namespace set the default for its services; a
//! service's own annotation wins. A node's WireGuard public key comes from
//! the node annotation [`ANNOTATION_WG_KEY`] that its agent sets.
//!
//! Watch contract: each resource's watcher yields Init / InitApply / InitDone
//! / Apply / Delete. A (re)list is buffered and replaces that resource's
//! cache atomically at InitDone, so a relist never shows a half state; the
//! records are recomputed and handed to the state, which writes only what
//! changed. An object that cannot be exported is [`Skipped`] with the
//! reason (the others are not affected); [`SkipLog`] logs each skip once.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    pin::Pin,
};

use clustermesh_api::{
    Affinity, Backend, BackendState, BootId, ClusterName, IpCidr, NodeName, NodeRecord,
    PolicyRecord, Protocol, Record, ServicePort, ServiceRecord, WgPublicKey, policy::PolicyKind,
};
use futures_util::{Stream, StreamExt as _, stream::select_all};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, ResourceExt as _,
    api::DynamicObject,
    runtime::{WatchStreamExt as _, watcher, watcher::Event},
};

use crate::kube_policies::{self, PolicyCache};

pub const ANNOTATION_GLOBAL: &str = "service.cilium.io/global";
pub const ANNOTATION_SHARED: &str = "service.cilium.io/shared";
pub const ANNOTATION_AFFINITY: &str = "service.cilium.io/affinity";
pub const ANNOTATION_WG_KEY: &str = "network.clustermesh.io/wireguard-public-key";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why an object was not exported. `kind`: `node`, `service` or the
/// policy kind (`CiliumNetworkPolicy`, ...); `name`: `ns/name`, or `name`
/// for cluster-scoped objects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
#[error("{kind} {name}: {reason}")]
pub struct Skipped {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

fn skip(kind: &'static str, name: impl Into<String>, reason: impl Into<String>) -> Skipped {
    Skipped {
        kind,
        name: name.into(),
        reason: reason.into(),
    }
}

/// A Node as a [`NodeRecord`].
pub fn node_record(cluster: &ClusterName, node: &Node) -> Result<NodeRecord, Skipped> {
    let name = node.name_any();
    let sk = |r: String| skip("node", name.clone(), r);
    let node_name: NodeName = name
        .parse()
        .map_err(|e: clustermesh_api::ValueError| sk(e.to_string()))?;
    let status = node.status.as_ref();
    let addrs = status.and_then(|s| s.addresses.as_ref());
    let mut underlay_ips: Vec<IpAddr> = Vec::new();
    for wanted in ["InternalIP", "ExternalIP"] {
        for a in addrs.into_iter().flatten().filter(|a| a.type_ == wanted) {
            if let Ok(ip) = a.address.parse::<IpAddr>()
                && !underlay_ips.contains(&ip)
            {
                underlay_ips.push(ip);
            }
        }
    }
    underlay_ips.truncate(NodeRecord::MAX_UNDERLAY_IPS);
    if underlay_ips.is_empty() {
        return Err(sk("no InternalIP or ExternalIP address yet".into()));
    }
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if cidrs.is_empty()
        && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
    {
        cidrs.push(c);
    }
    let pod_cidrs = cidrs
        .iter()
        .map(|c| {
            c.parse::<IpCidr>()
                .map_err(|e| sk(format!("spec.podCIDRs: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let wireguard_public_keys = match node.annotations().get(ANNOTATION_WG_KEY) {
        Some(k) => vec![
            k.parse::<WgPublicKey>()
                .map_err(|e| sk(format!("annotation {ANNOTATION_WG_KEY}: {e}")))?,
        ],
        None => vec![],
    };
    let boot = status
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.boot_id.clone())
        .unwrap_or_default();
    let boot_id: BootId = if boot.is_empty() {
        "unknown".to_owned()
    } else {
        boot
    }
    .parse()
    .map_err(|e: clustermesh_api::ValueError| sk(format!("status.nodeInfo.bootID: {e}")))?;
    let rec = NodeRecord {
        name: node_name,
        cluster: cluster.clone(),
        underlay_ips,
        pod_cidrs,
        wireguard_public_keys,
        wireguard_port: None,
        boot_id,
    };
    rec.validate().map_err(|e| sk(e.to_string()))?;
    Ok(rec)
}

fn flag(v: Option<&String>, what: &str) -> Result<Option<bool>, String> {
    match v.map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(None),
        Some(s) if s == "true" => Ok(Some(true)),
        Some(s) if s == "false" => Ok(Some(false)),
        Some(s) => Err(format!(
            "annotation {what}: {s:?} is not \"true\" or \"false\""
        )),
    }
}

fn affinity(v: Option<&String>) -> Result<Option<Affinity>, String> {
    match v.map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(None),
        Some(s) => clustermesh_api::convert::affinity_from_str(&s)
            .map(Some)
            .map_err(|_| {
                format!("annotation {ANNOTATION_AFFINITY}: {s:?} is not local, remote or none")
            }),
    }
}

/// A Service with its EndpointSlices (and its Namespace's defaults) as a
/// [`ServiceRecord`]. `Ok(None)`: a kind of service that is not exported
/// (ExternalName).
pub fn service_record(
    cluster: &ClusterName,
    svc: &Service,
    slices: &[&EndpointSlice],
    namespace: Option<&Namespace>,
) -> Result<Option<ServiceRecord>, Skipped> {
    let ns = svc.namespace().unwrap_or_default();
    let full = format!("{ns}/{}", svc.name_any());
    let sk = |r: String| skip("service", full.clone(), r);
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let (global, shared, affinity) = service_annotations(svc, namespace, &ns, &sk)?;
    let frontends = service_frontends(&spec);
    let ports = service_ports(&spec, slices, &full, &sk)?;
    if ports.is_empty() {
        return Err(sk("no TCP or UDP port".into()));
    }
    let backends = service_backends(cluster, slices);
    let rec = ServiceRecord {
        cluster: cluster.clone(),
        namespace: ns
            .parse()
            .map_err(|e: clustermesh_api::ValueError| sk(e.to_string()))?,
        name: svc
            .name_any()
            .parse()
            .map_err(|e: clustermesh_api::ValueError| sk(e.to_string()))?,
        frontends,
        ports,
        backends,
        global,
        shared,
        affinity,
    };
    rec.validate().map_err(|e| sk(e.to_string()))?;
    Ok(Some(rec))
}

/// A service's global, shared and affinity settings: its own annotations,
/// else its namespace's (`ns`), else the defaults (false, true, none).
fn service_annotations(
    svc: &Service,
    namespace: Option<&Namespace>,
    ns: &str,
    sk: &dyn Fn(String) -> Skipped,
) -> Result<(bool, bool, Affinity), Skipped> {
    let svc_ann = svc.annotations();
    let ns_ann = namespace
        .map(|n| n.annotations().clone())
        .unwrap_or_default();
    let pick_flag = |key: &str| -> Result<Option<bool>, Skipped> {
        match flag(svc_ann.get(key), key).map_err(sk)? {
            Some(v) => Ok(Some(v)),
            None => flag(ns_ann.get(key), key).map_err(|e| sk(format!("namespace {ns}: {e}"))),
        }
    };
    let global = pick_flag(ANNOTATION_GLOBAL)?.unwrap_or(false);
    let shared = pick_flag(ANNOTATION_SHARED)?.unwrap_or(true);
    let affinity = match affinity(svc_ann.get(ANNOTATION_AFFINITY)).map_err(sk)? {
        Some(a) => a,
        None => affinity(ns_ann.get(ANNOTATION_AFFINITY))
            .map_err(|e| sk(format!("namespace {ns}: {e}")))?
            .unwrap_or_default(),
    };
    Ok((global, shared, affinity))
}

/// The service's cluster IPs, each once.
fn service_frontends(spec: &ServiceSpec) -> Vec<IpAddr> {
    let mut frontends: Vec<IpAddr> = Vec::new();
    let ips = spec.cluster_ips.clone().unwrap_or_default();
    for ip in ips.iter().chain(spec.cluster_ip.iter()) {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !frontends.contains(&ip)
        {
            frontends.push(ip);
        }
    }
    frontends
}

/// The service's TCP and UDP ports (others are skipped), a named
/// targetPort resolved through the slices' ports. `full`: the service's
/// ns/name, for the log.
fn service_ports(
    spec: &ServiceSpec,
    slices: &[&EndpointSlice],
    full: &str,
    sk: &dyn Fn(String) -> Skipped,
) -> Result<Vec<ServicePort>, Skipped> {
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                tracing::debug!(service = %full, protocol = other, "port protocol not load-balanced; skipped");
                continue;
            }
        };
        let port =
            u16::try_from(p.port).map_err(|_| sk(format!("port {} out of range", p.port)))?;
        // targetPort: a number, or a name resolved through the slices' ports.
        let target = match &p.target_port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                u16::try_from(*n).ok()
            }
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_)) | None => {
                slices
                    .iter()
                    .flat_map(|s| s.ports.iter().flatten())
                    .find(|sp| sp.name == p.name)
                    .and_then(|sp| sp.port)
                    .and_then(|n| u16::try_from(n).ok())
            }
        }
        .unwrap_or(port);
        ports.push(ServicePort {
            name: match &p.name {
                Some(n) if !n.is_empty() => Some(
                    n.parse()
                        .map_err(|e: clustermesh_api::ValueError| sk(e.to_string()))?,
                ),
                _ => None,
            },
            protocol,
            port,
            target_port: target,
        });
    }
    Ok(ports)
}

/// The slices' endpoint addresses as backends of `cluster`, each IP once,
/// with their state from the endpoint conditions.
fn service_backends(cluster: &ClusterName, slices: &[&EndpointSlice]) -> Vec<Backend> {
    let mut backends: Vec<Backend> = Vec::new();
    for s in slices {
        for ep in s.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            // Kubernetes: a nil `ready` means unknown, to be treated as ready;
            // a nil `terminating` means not terminating.
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let state = if terminating {
                BackendState::Terminating
            } else if ready {
                BackendState::Ready
            } else {
                BackendState::NotReady
            };
            let node = ep.node_name.as_ref().and_then(|n| n.parse().ok());
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<IpAddr>()
                    && !backends.iter().any(|b| b.ip == ip)
                {
                    backends.push(Backend {
                        ip,
                        cluster: cluster.clone(),
                        state,
                        node: node.clone(),
                    });
                }
            }
        }
    }
    backends
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("watching {kind}: {source}")]
    Watch {
        kind: &'static str,
        #[source]
        source: watcher::Error,
    },
    #[error("the Kubernetes watch streams ended")]
    Ended,
}

// Events live only between the stream and the cache; their size does not matter.
#[allow(clippy::large_enum_variant)]
enum Ev {
    Node(Box<Result<Event<Node>, watcher::Error>>),
    Service(Result<Event<Service>, watcher::Error>),
    Slice(Result<Event<EndpointSlice>, watcher::Error>),
    Namespace(Result<Event<Namespace>, watcher::Error>),
    Policy(PolicyKind, Result<Event<DynamicObject>, watcher::Error>),
}

/// One resource's cache with relist buffering.
struct Cache<K> {
    items: BTreeMap<String, K>,
    buffer: Option<BTreeMap<String, K>>,
    synced: bool,
}

impl<K: kube::Resource> Cache<K> {
    fn new() -> Self {
        Self {
            items: BTreeMap::new(),
            buffer: None,
            synced: false,
        }
    }
    fn key(k: &K) -> String {
        format!(
            "{}/{}",
            k.meta().namespace.clone().unwrap_or_default(),
            k.meta().name.clone().unwrap_or_default()
        )
    }
    /// Applies an event; returns whether the visible cache changed.
    fn apply(&mut self, ev: Event<K>) -> bool {
        match ev {
            Event::Init => {
                self.buffer = Some(BTreeMap::new());
                false
            }
            Event::InitApply(k) => {
                if let Some(b) = self.buffer.as_mut() {
                    b.insert(Self::key(&k), k);
                }
                false
            }
            Event::InitDone => {
                if let Some(b) = self.buffer.take() {
                    self.items = b;
                }
                self.synced = true;
                true
            }
            Event::Apply(k) => {
                self.items.insert(Self::key(&k), k);
                true
            }
            Event::Delete(k) => {
                self.items.remove(&Self::key(&k));
                true
            }
        }
    }
}

/// The source: four watchers and their caches.
pub struct KubeSource {
    cluster: ClusterName,
    events: Pin<Box<dyn Stream<Item = Ev> + Send>>,
    nodes: Cache<Node>,
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
    namespaces: Cache<Namespace>,
    /// One per [`kube_policies::POLICY_KINDS`].
    policies: Vec<PolicyCache>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// The records the source currently produces, and what it skipped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    pub nodes: Vec<NodeRecord>,
    pub services: Vec<ServiceRecord>,
    /// Each namespace/name once.
    pub policies: Vec<PolicyRecord>,
    pub skipped: Vec<Skipped>,
}

impl Records {
    /// How many objects of each kind are skipped (the
    /// `clustermesh_apiserver_kubernetes_skipped_objects` gauge).
    pub fn skipped_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for s in &self.skipped {
            *m.entry(s.kind).or_default() += 1;
        }
        m
    }
}

/// Logs each skipped object once (a warning naming the object and the
/// reason), not on every recomputation of the records; a skip that goes
/// away and comes back is logged again.
#[derive(Debug, Default)]
pub struct SkipLog {
    logged: BTreeSet<Skipped>,
}

impl SkipLog {
    /// Logs the skips not logged before; returns them.
    pub fn report(&mut self, skipped: &[Skipped]) -> Vec<Skipped> {
        let now: BTreeSet<Skipped> = skipped.iter().cloned().collect();
        let new: Vec<Skipped> = now.difference(&self.logged).cloned().collect();
        for s in &new {
            tracing::warn!(kind = s.kind, object = %s.name, reason = %s.reason, "Kubernetes object not exported: {s}");
        }
        self.logged = now;
        new
    }
}

impl KubeSource {
    pub fn new(client: kube::Client, cluster: ClusterName) -> Self {
        let cfg = watcher::Config::default;
        let nodes = watcher(Api::<Node>::all(client.clone()), cfg())
            .default_backoff()
            .map(|e| Ev::Node(Box::new(e)));
        let services = watcher(Api::<Service>::all(client.clone()), cfg())
            .default_backoff()
            .map(Ev::Service);
        let slices = watcher(Api::<EndpointSlice>::all(client.clone()), cfg())
            .default_backoff()
            .map(Ev::Slice);
        let namespaces = watcher(Api::<Namespace>::all(client.clone()), cfg())
            .default_backoff()
            .map(Ev::Namespace);
        let mut streams = vec![
            nodes.boxed(),
            services.boxed(),
            slices.boxed(),
            namespaces.boxed(),
        ];
        for kind in kube_policies::POLICY_KINDS {
            let ar = kube_policies::api_resource(kind);
            let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
            streams.push(
                watcher(api, cfg())
                    .default_backoff()
                    .map(move |e| Ev::Policy(kind, e))
                    .boxed(),
            );
        }
        let events = select_all(streams);
        let policies = kube_policies::POLICY_KINDS
            .into_iter()
            .map(|k| PolicyCache::new(cluster.clone(), k))
            .collect();
        Self {
            cluster,
            events: Box::pin(events),
            nodes: Cache::new(),
            services: Cache::new(),
            slices: Cache::new(),
            namespaces: Cache::new(),
            policies,
        }
    }

    fn synced(&self) -> bool {
        self.nodes.synced
            && self.services.synced
            && self.slices.synced
            && self.namespaces.synced
            && self.policies.iter().all(|c| c.synced)
    }

    /// Waits for the next event; returns whether the records may have changed.
    /// Watch errors are logged and retried by the watchers' backoff.
    pub async fn next(&mut self) -> Result<bool, Error> {
        let ev = self.events.next().await.ok_or(Error::Ended)?;
        let (kind, r) = match ev {
            Ev::Node(r) => ("nodes", (*r).map(|e| self.nodes.apply(e))),
            Ev::Service(r) => ("services", r.map(|e| self.services.apply(e))),
            Ev::Slice(r) => ("endpointslices", r.map(|e| self.slices.apply(e))),
            Ev::Namespace(r) => ("namespaces", r.map(|e| self.namespaces.apply(e))),
            Ev::Policy(kind, r) => return Ok(self.policy_event(kind, r)),
        };
        match r {
            Ok(changed) => Ok(changed),
            Err(source) => {
                let e = Error::Watch { kind, source };
                tracing::warn!(error = %e, "Kubernetes watch failed; retrying with backoff");
                Ok(false)
            }
        }
    }

    /// A policy watcher's event. A 404 on the list: the kind is not served
    /// (e.g. Cilium's CRDs are not installed), none of it is exported and
    /// the watcher keeps retrying; other errors are retried like the other
    /// kinds'.
    fn policy_event(
        &mut self,
        kind: PolicyKind,
        r: Result<Event<DynamicObject>, watcher::Error>,
    ) -> bool {
        let Some(cache) = self.policies.iter_mut().find(|c| c.kind == kind) else {
            return false;
        };
        match r {
            Ok(e) => cache.apply(e),
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.is_not_found() => {
                if !cache.not_served {
                    let ar = kube_policies::api_resource(kind);
                    tracing::warn!(
                        "the Kubernetes API does not serve {} ({}/{}, is its CRD installed?): no {kind} is exported until it does",
                        ar.plural,
                        ar.group,
                        ar.version
                    );
                }
                cache.set_not_served()
            }
            Err(source) => {
                let e = Error::Watch {
                    kind: kube_policies::kind_name(kind),
                    source,
                };
                tracing::warn!(error = %e, "Kubernetes watch failed; retrying with backoff");
                false
            }
        }
    }

    /// Consumes events until every watcher has listed once.
    pub async fn initial_sync(&mut self) -> Result<(), Error> {
        while !self.synced() {
            self.next().await?;
        }
        Ok(())
    }

    /// The records of the current caches.
    pub fn records(&self) -> Records {
        let mut out = Records::default();
        for n in self.nodes.items.values() {
            match node_record(&self.cluster, n) {
                Ok(r) => out.nodes.push(r),
                Err(e) => out.skipped.push(e),
            }
        }
        for svc in self.services.items.values() {
            let ns = svc.namespace().unwrap_or_default();
            let name = svc.name_any();
            let slices: Vec<&EndpointSlice> = self
                .slices
                .items
                .values()
                .filter(|s| {
                    s.namespace().as_deref() == Some(ns.as_str())
                        && s.labels().get(SERVICE_NAME_LABEL) == Some(&name)
                })
                .collect();
            let namespace = self.namespaces.items.get(&format!("/{ns}"));
            match service_record(&self.cluster, svc, &slices, namespace) {
                Ok(Some(r)) => out.services.push(r),
                Ok(None) => {}
                Err(e) => out.skipped.push(e),
            }
        }
        let (policies, skipped) = kube_policies::resolve(&self.policies);
        out.policies = policies;
        out.skipped.extend(skipped);
        out
    }
}
