//! The policy model: what a parsed manifest becomes, independent of the
//! manifest's shape (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy,
//! Kubernetes NetworkPolicy). docs/policy.md describes the semantics.

use std::{collections::BTreeSet, fmt, net::IpAddr, str::FromStr};

use crate::types::{ClusterName, IpCidr, K8sName, Labels, ValueError};

/// The label every endpoint carries with its namespace.
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
/// The label every endpoint carries with its cluster's name.
pub const CLUSTER_KEY: &str = "io.cilium.k8s.policy.cluster";
/// Prefix of the labels that carry an endpoint's namespace's labels
/// (what a Kubernetes `namespaceSelector` selects on).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The source the namespace and cluster labels are given when the
/// evaluator adds them.
pub const K8S_SOURCE: &str = "k8s";

/// Where a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        })
    }
}

/// A policy's name: a DNS-1123 subdomain (up to 253 characters of
/// dot-separated labels of lowercase letters, digits and '-'), as
/// Kubernetes names objects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName(String);

impl PolicyName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PolicyName {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let err = |reason| ValueError::K8sName {
            what: "policy name",
            got: s.chars().take(64).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(err("must not be empty"));
        }
        if s.len() > 253 {
            return Err(err("longer than 253 characters"));
        }
        for label in s.split('.') {
            // Each dot-separated part is a DNS label; K8sName checks that.
            if label.len() > 63 {
                return Err(err("a dot-separated part is longer than 63 characters"));
            }
            label.parse::<K8sName>().map_err(|_| {
                err("only lowercase letters, digits, '-' and '.', alphanumeric at both ends of each part")
            })?;
        }
        Ok(Self(s.to_owned()))
    }
}

impl serde::Serialize for PolicyName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for PolicyName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Names one policy: kind, namespace (none for cluster-wide) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: Option<K8sName>,
    pub name: PolicyName,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// One policy object. A CiliumNetworkPolicy with `specs` has several
/// [`PolicySpec`]s; every other shape has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub name: PolicyName,
    /// `None`: cluster-wide (CiliumClusterwideNetworkPolicy). A namespaced
    /// policy selects endpoints of its namespace only, and its peer
    /// selectors without a namespace requirement mean its namespace.
    pub namespace: Option<K8sName>,
    pub specs: Vec<PolicySpec>,
}

impl Policy {
    pub fn reference(&self) -> PolicyRef {
        PolicyRef {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// Traffic direction, seen from the selected (local) endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// One rule set with one endpoint selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// Where it is in the manifest, e.g. `spec` or `specs[1]`.
    pub origin: String,
    /// The endpoints (of the policy's namespace, if namespaced) the rules
    /// apply to.
    pub endpoint_selector: Selector,
    /// Whether a selected endpoint is default-deny in each direction.
    pub default_deny_ingress: bool,
    pub default_deny_egress: bool,
    pub ingress: Vec<Rule>,
    pub ingress_deny: Vec<Rule>,
    pub egress: Vec<Rule>,
    pub egress_deny: Vec<Rule>,
}

impl PolicySpec {
    pub fn default_deny(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.default_deny_ingress,
            Direction::Egress => self.default_deny_egress,
        }
    }
    pub fn allows(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
    pub fn denies(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress_deny,
            Direction::Egress => &self.egress_deny,
        }
    }
    /// Whether the spec says anything about this direction.
    pub fn touches(&self, direction: Direction) -> bool {
        self.default_deny(direction)
            || !self.allows(direction).is_empty()
            || !self.denies(direction).is_empty()
    }
}

/// One allow or deny rule: traffic with any of `peers` on any of `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Where it is in the manifest, e.g. `spec.ingress[0]`.
    pub origin: String,
    pub peers: PeerSet,
    /// Empty: every port of every protocol.
    pub ports: Vec<PortRule>,
}

/// The peers a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSet {
    /// Any peer (a Cilium rule with only `toPorts`, a NetworkPolicy rule
    /// without `from`/`to`). Identities unknown to the agent are still not
    /// matched (see [`crate::policy::eval`]).
    Any,
    /// Any of these.
    Only(Vec<Peer>),
}

/// One peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Endpoints whose labels the selector matches. Without a requirement
    /// on [`NAMESPACE_KEY`] a namespaced policy means its own namespace;
    /// without one on [`CLUSTER_KEY`] the selector means the local cluster
    /// only.
    Endpoints(Selector),
    /// Addresses outside the mesh's endpoints in `cidr` but not in any of
    /// `except`.
    Cidr {
        cidr: IpCidr,
        except: Vec<IpCidr>,
    },
    Entity(Entity),
}

/// Cilium's reserved entities (the subset we support).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    /// The local node.
    Host,
    /// Every other node.
    RemoteNode,
    /// Everything outside the clusters: the reserved world identity and any
    /// address outside the mesh.
    World,
    /// Everything of the local cluster: its endpoints, its nodes (host,
    /// remote-node) and the reserved health, init and unmanaged identities.
    Cluster,
    /// Everything with a known identity.
    All,
}

impl Entity {
    pub fn name(self) -> &'static str {
        match self {
            Entity::Host => "host",
            Entity::RemoteNode => "remote-node",
            Entity::World => "world",
            Entity::Cluster => "cluster",
            Entity::All => "all",
        }
    }
}

impl FromStr for Entity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "world" => Entity::World,
            "cluster" => Entity::Cluster,
            "all" => Entity::All,
            other => {
                return Err(format!(
                    "entity {other:?} is not supported (supported: host, remote-node, world, cluster, all)"
                ));
            }
        })
    }
}

/// L4 protocol a port rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtoMatch {
    Tcp,
    Udp,
    /// TCP and UDP.
    Any,
}

impl ProtoMatch {
    pub fn matches(self, proto: crate::records::Protocol) -> bool {
        use crate::records::Protocol;
        matches!(
            (self, proto),
            (ProtoMatch::Any, _)
                | (ProtoMatch::Tcp, Protocol::Tcp)
                | (ProtoMatch::Udp, Protocol::Udp)
        )
    }
    /// Whether every protocol `other` matches, this matches too.
    pub fn covers(self, other: ProtoMatch) -> bool {
        self == ProtoMatch::Any || self == other
    }
}

impl fmt::Display for ProtoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtoMatch::Tcp => "TCP",
            ProtoMatch::Udp => "UDP",
            ProtoMatch::Any => "ANY",
        })
    }
}

/// An inclusive port range, `first <= last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };
    pub fn new(first: u16, last: u16) -> Result<Self, String> {
        if first > last {
            return Err(format!("end port {last} is below the start port {first}"));
        }
        Ok(Self { first, last })
    }
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }
    pub fn first(self) -> u16 {
        self.first
    }
    pub fn last(self) -> u16 {
        self.last
    }
    pub fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
    pub fn covers(self, other: PortRange) -> bool {
        self.first <= other.first && other.last <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == PortRange::ALL {
            f.write_str("*")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Ports of one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRule {
    pub protocol: ProtoMatch,
    pub ports: PortRange,
}

impl fmt::Display for PortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ports, self.protocol)
    }
}

/// A label key in a selector: `app` or `any:app` match a label `app` of
/// any source (`k8s:app`, `container:app`, `app`); `k8s:app` matches only
/// the label with source `k8s`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey {
    /// `None`: any source.
    pub source: Option<String>,
    pub key: String,
}

impl LabelKey {
    /// Splits `source:key`; `any:` and no prefix mean any source. The
    /// `reserved:` source is refused: reserved identities are selected with
    /// entities.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (source, key) = split_source(s);
        if key.is_empty() {
            return Err(format!("label key {s:?} is empty"));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) || key.contains('=') {
            return Err(format!(
                "label key {s:?} must be printable ASCII without spaces or '='"
            ));
        }
        if key.len() > Labels::MAX_KEY {
            return Err(format!("label key {s:?} is too long"));
        }
        match source {
            Some("reserved") => Err(format!(
                "label key {s:?}: reserved identities are selected with entities (fromEntities/toEntities), not labels"
            )),
            Some("any") | None => Ok(Self {
                source: None,
                key: key.to_owned(),
            }),
            Some(src) => Ok(Self {
                source: Some(src.to_owned()),
                key: key.to_owned(),
            }),
        }
    }
    pub fn any(key: &str) -> Self {
        Self {
            source: None,
            key: key.to_owned(),
        }
    }
    /// Whether a label (source, key) is this key.
    pub fn matches(&self, source: Option<&str>, key: &str) -> bool {
        self.key == key
            && match &self.source {
                None => true,
                Some(s) => Some(s.as_str()) == source,
            }
    }
}

/// `k8s:app` -> (Some("k8s"), "app"); `app` -> (None, "app"). Kubernetes
/// label keys cannot contain ':', so the first ':' ends the source.
pub(crate) fn split_source(s: &str) -> (Option<&str>, &str) {
    match s.split_once(':') {
        Some((src, key)) => (Some(src), key),
        None => (None, s),
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{s}:{}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

/// A selector's operator (Kubernetes label selector semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl FromStr for Operator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(format!(
                    "operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"
                ));
            }
        })
    }
}

/// One requirement of a selector. `matchLabels: {k: v}` is `k In [v]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: LabelKey,
    pub operator: Operator,
    /// Non-empty for In and NotIn, empty for Exists and DoesNotExist.
    pub values: BTreeSet<String>,
}

impl Requirement {
    pub fn new(
        key: LabelKey,
        operator: Operator,
        values: BTreeSet<String>,
    ) -> Result<Self, String> {
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(format!("operator {operator:?} needs at least one value"));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(format!("operator {operator:?} takes no values"));
            }
            _ => {}
        }
        for v in &values {
            if v.len() > Labels::MAX_VALUE || !v.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "label value {v:?} must be at most 63 printable ASCII characters"
                ));
            }
        }
        Ok(Self {
            key,
            operator,
            values,
        })
    }
    pub fn equals(key: LabelKey, value: &str) -> Self {
        Self {
            key,
            operator: Operator::In,
            values: [value.to_owned()].into(),
        }
    }

    fn matches(&self, labels: &LabelView<'_>) -> bool {
        let mut values = labels.values(&self.key);
        match self.operator {
            Operator::In => values.any(|v| self.values.contains(v)),
            // Kubernetes: NotIn is true when the label is absent.
            Operator::NotIn => values.all(|v| !self.values.contains(v)),
            Operator::Exists => values.next().is_some(),
            Operator::DoesNotExist => values.next().is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vals = || self.values.iter().cloned().collect::<Vec<_>>().join(",");
        match self.operator {
            Operator::In if self.values.len() == 1 => write!(f, "{}={}", self.key, vals()),
            Operator::In => write!(f, "{} in ({})", self.key, vals()),
            Operator::NotIn => write!(f, "{} notin ({})", self.key, vals()),
            Operator::Exists => write!(f, "{}", self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

/// A label selector: every requirement must hold. No requirements: every
/// endpoint (still within the namespace and cluster defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Selects every endpoint.
    pub fn all() -> Self {
        Self::default()
    }
    pub fn matches(&self, labels: &LabelView<'_>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
    /// Whether a requirement is about this label key (any source).
    pub fn mentions(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key.key == key)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// An endpoint's labels as selectors see them: split into source and key,
/// with the namespace and cluster labels set by the evaluator (any label
/// of those keys the endpoint claims itself is replaced).
#[derive(Debug, Clone)]
pub struct LabelView<'a> {
    entries: Vec<(Option<&'a str>, &'a str, &'a str)>,
}

impl<'a> LabelView<'a> {
    pub fn new(
        labels: &'a Labels,
        namespace: Option<&'a str>,
        cluster: Option<&'a ClusterName>,
    ) -> Self {
        let mut entries: Vec<(Option<&'a str>, &'a str, &'a str)> =
            Vec::with_capacity(labels.len() + 2);
        for (k, v) in labels.iter() {
            let (src, key) = split_source(k);
            if (namespace.is_some() && key == NAMESPACE_KEY)
                || (cluster.is_some() && key == CLUSTER_KEY)
            {
                continue;
            }
            entries.push((src, key, v));
        }
        if let Some(ns) = namespace {
            entries.push((Some(K8S_SOURCE), NAMESPACE_KEY, ns));
        }
        if let Some(c) = cluster {
            entries.push((Some(K8S_SOURCE), CLUSTER_KEY, c.as_str()));
        }
        Self { entries }
    }
    /// Values of the labels a selector key means.
    pub fn values<'s>(&'s self, key: &'s LabelKey) -> impl Iterator<Item = &'a str> + 's {
        self.entries
            .iter()
            .filter(move |(src, k, _)| key.matches(*src, k))
            .map(|(_, _, v)| *v)
    }
    /// The namespace label's value, if any.
    pub fn namespace(&self) -> Option<&'a str> {
        self.entries
            .iter()
            .find(|(_, k, _)| *k == NAMESPACE_KEY)
            .map(|(_, _, v)| *v)
    }
}

/// Checks that `addr` is in `cidr` and in none of `except`.
pub(crate) fn cidr_matches(cidr: &IpCidr, except: &[IpCidr], addr: IpAddr) -> bool {
    cidr.contains(addr) && !except.iter().any(|e| e.contains(addr))
}
