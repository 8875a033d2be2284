//! Warnings about policies that parse but may not mean what their author
//! thinks.
//!
//! - A peer selector without a requirement on `io.cilium.k8s.policy.cluster`
//!   means the local cluster only (Cilium 1.19's default, ours too): the
//!   warning asks to name the cluster or use `Exists`.
//! - An endpoint selector that selects none of the known endpoints
//!   ([`lint_with_endpoints`]).
//! - An allow rule shadowed by a deny rule: a deny rule of a spec with the
//!   same namespace and endpoint selector whose peers and ports cover the
//!   allow rule's, so the allow can never take effect.

use std::fmt;

use crate::policy::{
    eval::{EndpointRef, selects},
    model::{
        CLUSTER_KEY, Direction, Entity, Peer, PeerSet, Policy, PolicyRef, PortRange, ProtoMatch,
        Rule,
    },
};

/// One warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub policy: PolicyRef,
    /// The field path in the manifest, e.g. `spec.ingress[0].fromEndpoints[1]`.
    pub field: String,
    pub kind: WarningKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WarningKind {
    ImplicitLocalCluster,
    SelectsNothing,
    ShadowedByDeny,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.policy, self.field, self.message)
    }
}

/// The warnings of a policy set.
pub fn lint(policies: &[Policy]) -> Vec<Warning> {
    let mut out = Vec::new();
    for policy in policies {
        for spec in &policy.specs {
            for direction in [Direction::Ingress, Direction::Egress] {
                for rules in [spec.allows(direction), spec.denies(direction)] {
                    for rule in rules {
                        implicit_cluster(policy, rule, direction, &mut out);
                    }
                }
            }
        }
    }
    shadowed(policies, &mut out);
    out
}

/// [`lint`], plus a warning for each spec that selects none of `endpoints`.
pub fn lint_with_endpoints(policies: &[Policy], endpoints: &[EndpointRef<'_>]) -> Vec<Warning> {
    let mut out = lint(policies);
    for policy in policies {
        for spec in &policy.specs {
            if !endpoints.iter().any(|e| selects(policy, spec, e)) {
                out.push(Warning {
                    policy: policy.reference(),
                    field: format!("{}.endpointSelector", spec.origin),
                    kind: WarningKind::SelectsNothing,
                    message: format!(
                        "the endpoint selector {} selects none of the {} known endpoints",
                        spec.endpoint_selector,
                        endpoints.len()
                    ),
                });
            }
        }
    }
    out
}

/// The field name of a rule's endpoint peers in Cilium's shape; our rule
/// paths are the manifest's, so a NetworkPolicy's peers are `from`/`to`.
fn peers_field(policy: &Policy, direction: Direction) -> &'static str {
    use crate::policy::model::PolicyKind;
    match (policy.kind, direction) {
        (PolicyKind::NetworkPolicy, Direction::Ingress) => "from",
        (PolicyKind::NetworkPolicy, Direction::Egress) => "to",
        (_, Direction::Ingress) => "fromEndpoints",
        (_, Direction::Egress) => "toEndpoints",
    }
}

fn implicit_cluster(policy: &Policy, rule: &Rule, direction: Direction, out: &mut Vec<Warning>) {
    let PeerSet::Only(peers) = &rule.peers else {
        return;
    };
    let by_position = policy.kind == crate::policy::model::PolicyKind::NetworkPolicy;
    let mut endpoints_seen = 0usize;
    for (position, p) in peers.iter().enumerate() {
        if let Peer::Endpoints(sel) = p {
            let i = if by_position {
                position
            } else {
                endpoints_seen
            };
            if !sel.mentions(CLUSTER_KEY) {
                out.push(Warning {
                    policy: policy.reference(),
                    field: format!("{}.{}[{i}]", rule.origin, peers_field(policy, direction)),
                    kind: WarningKind::ImplicitLocalCluster,
                    message: format!(
                        "the selector {sel} has no {CLUSTER_KEY} requirement, so it means the local cluster only; \
                         name the cluster ({CLUSTER_KEY}: <name>) or use Exists for every cluster"
                    ),
                });
            }
            endpoints_seen += 1;
        }
    }
}

fn peer_covers(deny: &Peer, allow: &Peer) -> bool {
    match (deny, allow) {
        (Peer::Entity(Entity::All), _) => true,
        (a, b) if a == b => true,
        (Peer::Entity(Entity::World), Peer::Cidr { .. }) => true,
        (
            Peer::Cidr {
                cidr: d,
                except: de,
            },
            Peer::Cidr { cidr: a, .. },
        ) => d.contains_cidr(a) && !de.iter().any(|e| e.overlaps(a)),
        _ => false,
    }
}

fn peers_cover(deny: &PeerSet, allow: &PeerSet) -> bool {
    match (deny, allow) {
        (PeerSet::Any, _) => true,
        (PeerSet::Only(d), PeerSet::Any) => d.contains(&Peer::Entity(Entity::All)),
        (PeerSet::Only(d), PeerSet::Only(a)) => {
            a.iter().all(|ap| d.iter().any(|dp| peer_covers(dp, ap)))
        }
    }
}

fn ports_cover(deny: &Rule, allow: &Rule) -> bool {
    if deny.ports.is_empty() {
        return true;
    }
    if allow.ports.is_empty() {
        return deny
            .ports
            .iter()
            .any(|d| d.protocol == ProtoMatch::Any && d.ports == PortRange::ALL);
    }
    allow.ports.iter().all(|a| {
        deny.ports
            .iter()
            .any(|d| d.protocol.covers(a.protocol) && d.ports.covers(a.ports))
    })
}

fn shadowed(policies: &[Policy], out: &mut Vec<Warning>) {
    for policy in policies {
        for spec in &policy.specs {
            for direction in [Direction::Ingress, Direction::Egress] {
                for allow in spec.allows(direction) {
                    let by = policies.iter().find_map(|dp| {
                        if dp.namespace != policy.namespace {
                            return None;
                        }
                        dp.specs
                            .iter()
                            .filter(|ds| ds.endpoint_selector == spec.endpoint_selector)
                            .flat_map(|ds| ds.denies(direction))
                            .find(|d| peers_cover(&d.peers, &allow.peers) && ports_cover(d, allow))
                            .map(|d| (dp.reference(), d.origin.clone()))
                    });
                    if let Some((p, origin)) = by {
                        out.push(Warning {
                            policy: policy.reference(),
                            field: allow.origin.clone(),
                            kind: WarningKind::ShadowedByDeny,
                            message: format!(
                                "this allow rule never takes effect: {p} {origin} denies all of it"
                            ),
                        });
                    }
                }
            }
        }
    }
}
