//! Evaluation: the verdict of one flow and which rule decided it, and the
//! per-endpoint compiled form a policy map will hold.
//!
//! Semantics (docs/policy.md):
//! - A local endpoint is selected by a policy spec when it is in the
//!   policy's namespace (namespaced policies) and the endpoint selector
//!   matches its labels, with `io.kubernetes.pod.namespace` and
//!   `io.cilium.k8s.policy.cluster` set from its namespace and cluster.
//! - A direction is enforced (default-deny) when any selecting spec is
//!   default-deny in it; a flow is then allowed only by a matching allow
//!   rule. Otherwise every flow is allowed.
//! - A matching deny rule of any selecting spec wins over every allow, and
//!   applies even when the direction is not default-deny
//!   (`enableDefaultDeny: false`).
//! - A peer whose identity is unknown (the agent has not synced it yet)
//!   matches no rule at all, not even `all` or an any-peer rule: in an
//!   enforced direction it is denied with its own verdict,
//!   [`Verdict::DeniedUnknownPeer`], never mistaken for world.

use std::net::IpAddr;

use crate::{
    policy::model::{
        CLUSTER_KEY, Direction, Entity, LabelView, NAMESPACE_KEY, Peer as RulePeer, PeerSet,
        Policy, PolicyRef, PolicySpec, PortRange, ProtoMatch, Rule, cidr_matches,
    },
    records::Protocol,
    types::{ClusterName, Identity, K8sName, Labels},
};

/// The local endpoint whose traffic is evaluated.
#[derive(Debug, Clone, Copy)]
pub struct EndpointRef<'a> {
    pub cluster: &'a ClusterName,
    pub namespace: &'a K8sName,
    pub labels: &'a Labels,
}

/// Reserved identities a peer can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reserved {
    Host,
    World,
    RemoteNode,
    Health,
    Init,
    Unmanaged,
    /// Not known to the agent (yet): never matched by any rule.
    Unknown,
}

impl Reserved {
    /// The reserved identity of a numeric identity, if it is one we know.
    pub fn of(id: Identity) -> Option<Reserved> {
        Some(match id {
            Identity::HOST => Reserved::Host,
            Identity::WORLD => Reserved::World,
            Identity::REMOTE_NODE => Reserved::RemoteNode,
            Identity::HEALTH => Reserved::Health,
            Identity::INIT => Reserved::Init,
            Identity::UNMANAGED => Reserved::Unmanaged,
            _ => return None,
        })
    }
}

/// The other side of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowPeer {
    /// An endpoint of a cluster of the mesh, by its identity's cluster and
    /// labels (its namespace is its `io.kubernetes.pod.namespace` label).
    Endpoint {
        cluster: ClusterName,
        labels: Labels,
    },
    Reserved(Reserved),
    /// An address outside the mesh's endpoints (world), for CIDR rules.
    Address(IpAddr),
}

/// Which list of a spec a rule is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleSection {
    Ingress,
    IngressDeny,
    Egress,
    EgressDeny,
}

impl RuleSection {
    fn of(direction: Direction, deny: bool) -> Self {
        match (direction, deny) {
            (Direction::Ingress, false) => RuleSection::Ingress,
            (Direction::Ingress, true) => RuleSection::IngressDeny,
            (Direction::Egress, false) => RuleSection::Egress,
            (Direction::Egress, true) => RuleSection::EgressDeny,
        }
    }
}

/// One rule of one policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub section: RuleSection,
    /// The rule's path in its manifest, e.g. `spec.ingress[0]`.
    pub origin: String,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.policy, self.origin)
    }
}

/// The outcome for one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allowed,
    /// The direction is enforced and no allow rule matched.
    DeniedByDefault,
    /// A deny rule matched.
    DeniedByRule,
    /// The direction is enforced and the peer's identity is unknown.
    DeniedUnknownPeer,
}

/// A verdict and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The allow rule (for `Allowed` in an enforced direction, or when an
    /// allow rule matched anyway) or the deny rule (`DeniedByRule`).
    pub rule: Option<RuleRef>,
    /// The policies that make the direction default-deny for this endpoint
    /// (empty: not enforced).
    pub enforced_by: Vec<PolicyRef>,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.verdict, &self.rule) {
            (Verdict::Allowed, Some(r)) => write!(f, "allowed by {r}"),
            (Verdict::Allowed, None) => {
                f.write_str("allowed (no policy selects the endpoint in this direction)")
            }
            (Verdict::DeniedByRule, Some(r)) => write!(f, "denied by {r}"),
            (Verdict::DeniedByRule, None) => f.write_str("denied by a rule"),
            (Verdict::DeniedUnknownPeer, _) => {
                f.write_str("denied: the peer's identity is unknown")
            }
            (Verdict::DeniedByDefault, _) => {
                f.write_str("denied by default (no allow rule matches; enforced by ")?;
                for (i, p) in self.enforced_by.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{p}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Whether the spec selects the local endpoint.
pub(crate) fn selects(policy: &Policy, spec: &PolicySpec, local: &EndpointRef<'_>) -> bool {
    if let Some(ns) = &policy.namespace
        && ns != local.namespace
    {
        return false;
    }
    let view = LabelView::new(
        local.labels,
        Some(local.namespace.as_str()),
        Some(local.cluster),
    );
    spec.endpoint_selector.matches(&view)
}

/// Precomputed view of the peer.
struct PeerCtx<'a> {
    peer: &'a FlowPeer,
    view: Option<LabelView<'a>>,
}

impl<'a> PeerCtx<'a> {
    fn new(peer: &'a FlowPeer) -> Self {
        let view = match peer {
            FlowPeer::Endpoint { cluster, labels } => {
                Some(LabelView::new(labels, None, Some(cluster)))
            }
            _ => None,
        };
        Self { peer, view }
    }
}

fn peer_matches(
    policy_ns: Option<&K8sName>,
    local_cluster: &ClusterName,
    rule_peer: &RulePeer,
    ctx: &PeerCtx<'_>,
) -> bool {
    match (rule_peer, ctx.peer) {
        (_, FlowPeer::Reserved(Reserved::Unknown)) => false,
        (RulePeer::Endpoints(sel), FlowPeer::Endpoint { cluster, .. }) => {
            let Some(view) = &ctx.view else {
                return false;
            };
            if let Some(ns) = policy_ns
                && !sel.mentions(NAMESPACE_KEY)
                && view.namespace() != Some(ns.as_str())
            {
                return false;
            }
            if !sel.mentions(CLUSTER_KEY) && cluster != local_cluster {
                return false;
            }
            sel.matches(view)
        }
        (RulePeer::Endpoints(_), _) => false,
        (RulePeer::Cidr { cidr, except }, FlowPeer::Address(ip)) => cidr_matches(cidr, except, *ip),
        // 0.0.0.0/0 and ::/0 mean the world identity too, as in Cilium.
        (RulePeer::Cidr { cidr, except }, FlowPeer::Reserved(Reserved::World)) => {
            cidr.prefix_len() == 0 && except.is_empty()
        }
        (RulePeer::Cidr { .. }, _) => false,
        (RulePeer::Entity(e), p) => match (e, p) {
            (Entity::All, _) => true,
            (Entity::World, FlowPeer::Reserved(Reserved::World) | FlowPeer::Address(_)) => true,
            (Entity::Host, FlowPeer::Reserved(Reserved::Host)) => true,
            (Entity::RemoteNode, FlowPeer::Reserved(Reserved::RemoteNode)) => true,
            (Entity::Cluster, FlowPeer::Endpoint { cluster, .. }) => cluster == local_cluster,
            (
                Entity::Cluster,
                FlowPeer::Reserved(
                    Reserved::Host
                    | Reserved::RemoteNode
                    | Reserved::Health
                    | Reserved::Init
                    | Reserved::Unmanaged,
                ),
            ) => true,
            _ => false,
        },
    }
}

/// Whether the rule's peers include the peer (ports aside).
fn rule_peer_matches(
    policy_ns: Option<&K8sName>,
    local_cluster: &ClusterName,
    rule: &Rule,
    ctx: &PeerCtx<'_>,
) -> bool {
    if matches!(ctx.peer, FlowPeer::Reserved(Reserved::Unknown)) {
        return false;
    }
    match &rule.peers {
        PeerSet::Any => true,
        PeerSet::Only(peers) => peers
            .iter()
            .any(|p| peer_matches(policy_ns, local_cluster, p, ctx)),
    }
}

fn rule_port_matches(rule: &Rule, proto: Protocol, port: u16) -> bool {
    rule.ports.is_empty()
        || rule
            .ports
            .iter()
            .any(|p| p.protocol.matches(proto) && p.ports.contains(port))
}

/// The verdict of one flow of `local` with `peer` in `direction`.
pub fn evaluate(
    policies: &[Policy],
    local: &EndpointRef<'_>,
    peer: &FlowPeer,
    direction: Direction,
    proto: Protocol,
    port: u16,
) -> Decision {
    let ctx = PeerCtx::new(peer);
    let mut enforced_by: Vec<PolicyRef> = Vec::new();
    let mut allow: Option<RuleRef> = None;
    for policy in policies {
        for spec in &policy.specs {
            if !spec.touches(direction) || !selects(policy, spec, local) {
                continue;
            }
            let ns = policy.namespace.as_ref();
            let reference = || RuleRef {
                policy: policy.reference(),
                section: RuleSection::of(direction, true),
                origin: String::new(),
            };
            for rule in spec.denies(direction) {
                if rule_peer_matches(ns, local.cluster, rule, &ctx)
                    && rule_port_matches(rule, proto, port)
                {
                    return Decision {
                        verdict: Verdict::DeniedByRule,
                        rule: Some(RuleRef {
                            origin: rule.origin.clone(),
                            ..reference()
                        }),
                        enforced_by,
                    };
                }
            }
            if spec.default_deny(direction) {
                let r = policy.reference();
                if !enforced_by.contains(&r) {
                    enforced_by.push(r);
                }
            }
            if allow.is_none() {
                allow = spec
                    .allows(direction)
                    .iter()
                    .find(|rule| {
                        rule_peer_matches(ns, local.cluster, rule, &ctx)
                            && rule_port_matches(rule, proto, port)
                    })
                    .map(|rule| RuleRef {
                        policy: policy.reference(),
                        section: RuleSection::of(direction, false),
                        origin: rule.origin.clone(),
                    });
            }
        }
    }
    let verdict = match (&allow, enforced_by.is_empty(), peer) {
        (_, true, _) => Verdict::Allowed,
        (_, false, FlowPeer::Reserved(Reserved::Unknown)) => Verdict::DeniedUnknownPeer,
        (Some(_), false, _) => Verdict::Allowed,
        (None, false, _) => Verdict::DeniedByDefault,
    };
    Decision {
        verdict,
        rule: allow,
        enforced_by,
    }
}

/// Allow or deny, in a compiled entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapVerdict {
    Allow,
    Deny,
}

/// One entry of an endpoint's compiled policy: the shape a policy map
/// holds, keyed by (peer identity, direction, protocol, port range).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CompiledEntry {
    pub peer: Identity,
    pub direction: Direction,
    /// `Any` also for rules without ports (every protocol).
    pub protocol: ProtoMatch,
    pub ports: PortRange,
    pub verdict: MapVerdict,
    pub rule: RuleRef,
}

/// One local endpoint's policy, for every peer identity it was compiled
/// against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub default_deny_ingress: bool,
    pub default_deny_egress: bool,
    /// In policy order; deny entries win over allow entries.
    pub entries: Vec<CompiledEntry>,
}

impl CompiledPolicy {
    /// The verdict from the compiled entries alone (what the datapath will
    /// do). Agrees with [`evaluate`] for every peer compiled in.
    pub fn lookup(
        &self,
        peer: Identity,
        direction: Direction,
        proto: Protocol,
        port: u16,
    ) -> (Verdict, Option<&RuleRef>) {
        let hit = |e: &&CompiledEntry, v: MapVerdict| {
            e.peer == peer
                && e.direction == direction
                && e.verdict == v
                && e.protocol.matches(proto)
                && e.ports.contains(port)
        };
        if let Some(e) = self.entries.iter().find(|e| hit(e, MapVerdict::Deny)) {
            return (Verdict::DeniedByRule, Some(&e.rule));
        }
        let allow = self.entries.iter().find(|e| hit(e, MapVerdict::Allow));
        let enforced = match direction {
            Direction::Ingress => self.default_deny_ingress,
            Direction::Egress => self.default_deny_egress,
        };
        match (allow, enforced) {
            (a, false) => (Verdict::Allowed, a.map(|e| &e.rule)),
            (Some(e), true) => (Verdict::Allowed, Some(&e.rule)),
            (None, true) => (Verdict::DeniedByDefault, None),
        }
    }
}

/// Compiles the policies for one local endpoint against the known peer
/// identities (endpoint identities of every cluster and the reserved ones).
///
/// CIDR rules match [`FlowPeer::Address`] peers: pass one per prefix
/// identity, an address whose longest match among the prefixes is that
/// prefix (the agent's `clusters::policy::cidr_peers`).
pub fn compile(
    policies: &[Policy],
    local: &EndpointRef<'_>,
    peers: &[(Identity, FlowPeer)],
) -> CompiledPolicy {
    let mut out = CompiledPolicy::default();
    let ctxs: Vec<(Identity, PeerCtx<'_>)> =
        peers.iter().map(|(id, p)| (*id, PeerCtx::new(p))).collect();
    for policy in policies {
        let ns = policy.namespace.as_ref();
        for spec in &policy.specs {
            if !selects(policy, spec, local) {
                continue;
            }
            out.default_deny_ingress |= spec.default_deny_ingress;
            out.default_deny_egress |= spec.default_deny_egress;
            for direction in [Direction::Ingress, Direction::Egress] {
                for (deny, rules) in [
                    (true, spec.denies(direction)),
                    (false, spec.allows(direction)),
                ] {
                    for rule in rules {
                        let rref = RuleRef {
                            policy: policy.reference(),
                            section: RuleSection::of(direction, deny),
                            origin: rule.origin.clone(),
                        };
                        for (id, ctx) in &ctxs {
                            if !rule_peer_matches(ns, local.cluster, rule, ctx) {
                                continue;
                            }
                            let verdict = if deny {
                                MapVerdict::Deny
                            } else {
                                MapVerdict::Allow
                            };
                            if rule.ports.is_empty() {
                                out.entries.push(CompiledEntry {
                                    peer: *id,
                                    direction,
                                    protocol: ProtoMatch::Any,
                                    ports: PortRange::ALL,
                                    verdict,
                                    rule: rref.clone(),
                                });
                            }
                            for p in &rule.ports {
                                out.entries.push(CompiledEntry {
                                    peer: *id,
                                    direction,
                                    protocol: p.protocol,
                                    ports: p.ports,
                                    verdict,
                                    rule: rref.clone(),
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    out
}
