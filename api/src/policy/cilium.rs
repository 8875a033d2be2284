//! CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (`cilium.io/v2`),
//! the L3/L4 subset.
//!
//! Accepted: `spec` or `specs`, each with `endpointSelector`, `ingress`,
//! `ingressDeny`, `egress`, `egressDeny`, `enableDefaultDeny`,
//! `description`, `labels`; ingress rules with `fromEndpoints`,
//! `fromCIDR`, `fromCIDRSet` (`cidr`, `except`), `fromEntities`, `toPorts`
//! (`ports[]` of `port`, `endPort`, `protocol` TCP/UDP/ANY); egress rules
//! with the `to` counterparts. Refused, naming the field: `nodeSelector`,
//! `toPorts[].rules` (L7), `serverNames`, `listener`, TLS, `toFQDNs`,
//! `toServices`, `fromRequires`/`toRequires`, `fromGroups`/`toGroups`,
//! `fromNodes`/`toNodes`, `icmps`, `authentication`, CIDR groups, `log`,
//! SCTP and ICMP protocols, named ports, unknown fields.

use serde::{Deserialize, de::IgnoredAny};

use super::{
    Auth, CidrGroup, FieldErr, Fqdn, Groups, Icmp, L7, Log, Metadata, NodeSel, Nodes, RawPort,
    RawProto, RawSelector, Refused, Requires, Tls, ToServices, pod_key, port_rule, typed,
};
use crate::{
    policy::model::{
        Entity, Peer, PeerSet, Policy, PolicyKind, PolicySpec, PortRule, ProtoMatch, Rule,
    },
    types::IpCidr,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Doc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Option<Spec>,
    #[serde(default)]
    specs: Option<Vec<Spec>>,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    endpoint_selector: Option<RawSelector>,
    #[serde(default)]
    #[allow(dead_code)]
    node_selector: Option<Refused<NodeSel>>,
    #[serde(default)]
    ingress: Option<Vec<IngressRule>>,
    #[serde(default)]
    ingress_deny: Option<Vec<IngressRule>>,
    #[serde(default)]
    egress: Option<Vec<EgressRule>>,
    #[serde(default)]
    egress_deny: Option<Vec<EgressRule>>,
    #[serde(default)]
    enable_default_deny: Option<DefaultDeny>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    labels: Option<IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    log: Option<Refused<Log>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultDeny {
    #[serde(default)]
    ingress: Option<bool>,
    #[serde(default)]
    egress: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct IngressRule {
    #[serde(default)]
    from_endpoints: Option<Vec<RawSelector>>,
    #[serde(default, rename = "fromCIDR")]
    from_cidr: Option<Vec<IpCidr>>,
    #[serde(default, rename = "fromCIDRSet")]
    from_cidr_set: Option<Vec<CidrSet>>,
    #[serde(default)]
    from_entities: Option<Vec<String>>,
    #[serde(default)]
    to_ports: Option<Vec<PortRuleRaw>>,
    #[serde(default)]
    from_requires: Option<Refused<Requires>>,
    #[serde(default)]
    from_groups: Option<Refused<Groups>>,
    #[serde(default)]
    from_nodes: Option<Refused<Nodes>>,
    #[serde(default)]
    icmps: Option<Refused<Icmp>>,
    #[serde(default)]
    authentication: Option<Refused<Auth>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct EgressRule {
    #[serde(default)]
    to_endpoints: Option<Vec<RawSelector>>,
    #[serde(default, rename = "toCIDR")]
    to_cidr: Option<Vec<IpCidr>>,
    #[serde(default, rename = "toCIDRSet")]
    to_cidr_set: Option<Vec<CidrSet>>,
    #[serde(default)]
    to_entities: Option<Vec<String>>,
    #[serde(default)]
    to_ports: Option<Vec<PortRuleRaw>>,
    #[serde(default, rename = "toFQDNs")]
    to_fqdns: Option<Refused<Fqdn>>,
    #[serde(default)]
    to_services: Option<Refused<ToServices>>,
    #[serde(default)]
    to_requires: Option<Refused<Requires>>,
    #[serde(default)]
    to_groups: Option<Refused<Groups>>,
    #[serde(default)]
    to_nodes: Option<Refused<Nodes>>,
    #[serde(default)]
    icmps: Option<Refused<Icmp>>,
    #[serde(default)]
    authentication: Option<Refused<Auth>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct CidrSet {
    #[serde(default)]
    cidr: Option<IpCidr>,
    #[serde(default)]
    except: Option<Vec<IpCidr>>,
    #[serde(default)]
    cidr_group_ref: Option<Refused<CidrGroup>>,
    #[serde(default)]
    cidr_group_selector: Option<Refused<CidrGroup>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct PortRuleRaw {
    #[serde(default)]
    ports: Option<Vec<PortProtocol>>,
    #[serde(default)]
    rules: Option<Refused<L7>>,
    #[serde(default)]
    server_names: Option<Refused<Tls>>,
    #[serde(default)]
    listener: Option<Refused<Tls>>,
    #[serde(default, rename = "originatingTLS")]
    originating_tls: Option<Refused<Tls>>,
    #[serde(default, rename = "terminatingTLS")]
    terminating_tls: Option<Refused<Tls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortProtocol {
    #[serde(default)]
    port: Option<RawPort>,
    #[serde(default)]
    end_port: Option<RawPort>,
    #[serde(default)]
    protocol: Option<RawProto>,
}

/// The peer fields of one rule, whichever direction.
struct RawPeers<'a> {
    endpoints: (&'a str, &'a Option<Vec<RawSelector>>),
    cidr: (&'a str, &'a Option<Vec<IpCidr>>),
    cidr_set: (&'a str, &'a Option<Vec<CidrSet>>),
    entities: (&'a str, &'a Option<Vec<String>>),
    to_ports: &'a Option<Vec<PortRuleRaw>>,
}

/// Parses one CiliumNetworkPolicy (`clusterwide`: a
/// CiliumClusterwideNetworkPolicy) document.
pub(crate) fn from_value(
    value: serde_norway::Value,
    clusterwide: bool,
) -> Result<Policy, FieldErr> {
    let doc: Doc = typed(value)?;
    let (name, namespace) = doc.metadata.identity(!clusterwide)?;
    let specs: Vec<(String, Spec)> = match (doc.spec, doc.specs) {
        (Some(_), Some(_)) => {
            return Err(FieldErr::new("specs", "give spec or specs, not both"));
        }
        (Some(s), None) => vec![("spec".to_owned(), s)],
        (None, Some(v)) if !v.is_empty() => v
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("specs[{i}]"), s))
            .collect(),
        _ => return Err(FieldErr::new("spec", "missing (give spec or specs)")),
    };
    let specs = specs
        .into_iter()
        .map(|(origin, s)| convert_spec(origin, s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Policy {
        kind: if clusterwide {
            PolicyKind::CiliumClusterwideNetworkPolicy
        } else {
            PolicyKind::CiliumNetworkPolicy
        },
        name,
        namespace,
        specs,
    })
}

fn convert_spec(origin: String, s: Spec) -> Result<PolicySpec, FieldErr> {
    let sel = s
        .endpoint_selector
        .as_ref()
        .ok_or_else(|| FieldErr::new(format!("{origin}.endpointSelector"), "missing"))?;
    let endpoint_selector = sel.to_selector(&format!("{origin}.endpointSelector"), &pod_key)?;
    let ingress = rules(&origin, "ingress", s.ingress.as_deref(), ingress_peers)?;
    let ingress_deny = rules(
        &origin,
        "ingressDeny",
        s.ingress_deny.as_deref(),
        ingress_peers,
    )?;
    let egress = rules(&origin, "egress", s.egress.as_deref(), egress_peers)?;
    let egress_deny = rules(
        &origin,
        "egressDeny",
        s.egress_deny.as_deref(),
        egress_peers,
    )?;
    let present = |v: &Option<Vec<IngressRule>>| v.as_ref().is_some_and(|v| !v.is_empty());
    let present_e = |v: &Option<Vec<EgressRule>>| v.as_ref().is_some_and(|v| !v.is_empty());
    let dd = s.enable_default_deny.as_ref();
    Ok(PolicySpec {
        default_deny_ingress: dd
            .and_then(|d| d.ingress)
            .unwrap_or(present(&s.ingress) || present(&s.ingress_deny)),
        default_deny_egress: dd
            .and_then(|d| d.egress)
            .unwrap_or(present_e(&s.egress) || present_e(&s.egress_deny)),
        origin,
        endpoint_selector,
        ingress,
        ingress_deny,
        egress,
        egress_deny,
    })
}

fn ingress_peers(r: &IngressRule) -> RawPeers<'_> {
    RawPeers {
        endpoints: ("fromEndpoints", &r.from_endpoints),
        cidr: ("fromCIDR", &r.from_cidr),
        cidr_set: ("fromCIDRSet", &r.from_cidr_set),
        entities: ("fromEntities", &r.from_entities),
        to_ports: &r.to_ports,
    }
}

fn egress_peers(r: &EgressRule) -> RawPeers<'_> {
    RawPeers {
        endpoints: ("toEndpoints", &r.to_endpoints),
        cidr: ("toCIDR", &r.to_cidr),
        cidr_set: ("toCIDRSet", &r.to_cidr_set),
        entities: ("toEntities", &r.to_entities),
        to_ports: &r.to_ports,
    }
}

fn rules<R>(
    origin: &str,
    section: &str,
    raw: Option<&[R]>,
    peers_of: fn(&R) -> RawPeers<'_>,
) -> Result<Vec<Rule>, FieldErr> {
    let mut out = Vec::new();
    for (i, r) in raw.unwrap_or_default().iter().enumerate() {
        let path = format!("{origin}.{section}[{i}]");
        if let Some(rule) = rule(path, peers_of(r))? {
            out.push(rule);
        }
    }
    Ok(out)
}

/// One rule; `None` for a rule that matches nothing (`{}`: it only makes
/// the direction default-deny).
fn rule(path: String, raw: RawPeers<'_>) -> Result<Option<Rule>, FieldErr> {
    let mut peers = Vec::new();
    let mut any_peer_field = false;
    let (f, eps) = raw.endpoints;
    for (i, sel) in eps.iter().flatten().enumerate() {
        any_peer_field = true;
        peers.push(Peer::Endpoints(
            sel.to_selector(&format!("{path}.{f}[{i}]"), &pod_key)?,
        ));
    }
    let (_, cidrs) = raw.cidr;
    for c in cidrs.iter().flatten() {
        any_peer_field = true;
        peers.push(Peer::Cidr {
            cidr: *c,
            except: Vec::new(),
        });
    }
    let (f, sets) = raw.cidr_set;
    for (i, s) in sets.iter().flatten().enumerate() {
        any_peer_field = true;
        let p = format!("{path}.{f}[{i}]");
        let cidr = s
            .cidr
            .ok_or_else(|| FieldErr::new(format!("{p}.cidr"), "missing"))?;
        let except = s.except.clone().unwrap_or_default();
        for (j, e) in except.iter().enumerate() {
            if !cidr.contains_cidr(e) {
                return Err(FieldErr::new(
                    format!("{p}.except[{j}]"),
                    format!("{e} is not inside {cidr}"),
                ));
            }
        }
        peers.push(Peer::Cidr { cidr, except });
    }
    let (f, entities) = raw.entities;
    for (i, e) in entities.iter().flatten().enumerate() {
        any_peer_field = true;
        let entity: Entity = e
            .parse()
            .map_err(|m| FieldErr::new(format!("{path}.{f}[{i}]"), m))?;
        peers.push(Peer::Entity(entity));
    }
    let mut ports: Vec<PortRule> = Vec::new();
    for (i, pr) in raw.to_ports.iter().flatten().enumerate() {
        for (j, pp) in pr.ports.iter().flatten().enumerate() {
            let p = format!("{path}.toPorts[{i}].ports[{j}]");
            let proto = pp.protocol.map(|p| p.0).unwrap_or(ProtoMatch::Any);
            ports.push(port_rule(&p, pp.port, pp.end_port, proto)?);
        }
    }
    if !any_peer_field && ports.is_empty() {
        return Ok(None);
    }
    Ok(Some(Rule {
        origin: path,
        peers: if any_peer_field {
            PeerSet::Only(peers)
        } else {
            PeerSet::Any
        },
        ports,
    }))
}
