//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`).
//!
//! Accepted: `podSelector`, `policyTypes`, `ingress[].from[]` and
//! `egress[].to[]` peers of `podSelector`, `namespaceSelector` (alone or
//! together) or `ipBlock` (`cidr`, `except`), `ports[]` of `port`
//! (numbers only), `endPort`, `protocol` TCP/UDP (default TCP). Refused:
//! named ports, SCTP, unknown fields.
//!
//! Translation, as Cilium does it: a `namespaceSelector` becomes
//! requirements on the namespace's labels, `io.cilium.k8s.namespace.labels.<key>`,
//! except `kubernetes.io/metadata.name` which is the namespace label
//! `io.kubernetes.pod.namespace` itself; it always adds
//! `io.kubernetes.pod.namespace Exists`, so the policy's namespace is not
//! implied. Without `policyTypes` the policy is Ingress, plus Egress when it
//! has an `egress` section. A rule without `from`/`to` allows every peer,
//! one without `ports` every port.

use serde::{Deserialize, de::IgnoredAny};

use super::{FieldErr, Metadata, RawPort, RawProto, RawSelector, pod_key, port_rule, typed};
use crate::{
    policy::model::{
        LabelKey, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, Operator, Peer, PeerSet, Policy,
        PolicyKind, PolicySpec, ProtoMatch, Requirement, Rule, Selector,
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
    spec: Spec,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    pod_selector: RawSelector,
    #[serde(default)]
    policy_types: Option<Vec<PolicyType>>,
    #[serde(default)]
    ingress: Option<Vec<IngressRule>>,
    #[serde(default)]
    egress: Option<Vec<EgressRule>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressRule {
    #[serde(default)]
    from: Option<Vec<NpPeer>>,
    #[serde(default)]
    ports: Option<Vec<NpPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressRule {
    #[serde(default)]
    to: Option<Vec<NpPeer>>,
    #[serde(default)]
    ports: Option<Vec<NpPort>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NpPeer {
    #[serde(default)]
    pod_selector: Option<RawSelector>,
    #[serde(default)]
    namespace_selector: Option<RawSelector>,
    #[serde(default)]
    ip_block: Option<IpBlock>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpBlock {
    cidr: IpCidr,
    #[serde(default)]
    except: Option<Vec<IpCidr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NpPort {
    #[serde(default)]
    protocol: Option<RawProto>,
    #[serde(default)]
    port: Option<RawPort>,
    #[serde(default)]
    end_port: Option<RawPort>,
}

/// The label key a namespaceSelector key means.
fn namespace_key(k: &str) -> Result<LabelKey, String> {
    let key = LabelKey::parse(k)?;
    if key.source.is_some() {
        return Err(format!(
            "namespace label key {k:?} must not have a source prefix"
        ));
    }
    if key.key == "kubernetes.io/metadata.name" {
        return Ok(LabelKey::any(NAMESPACE_KEY));
    }
    Ok(LabelKey::any(&format!(
        "{NAMESPACE_LABELS_PREFIX}{}",
        key.key
    )))
}

/// Parses one NetworkPolicy document.
pub(crate) fn from_value(value: serde_norway::Value) -> Result<Policy, FieldErr> {
    let doc: Doc = typed(value)?;
    let (name, namespace) = doc.metadata.identity(true)?;
    let s = doc.spec;
    let endpoint_selector = s.pod_selector.to_selector("spec.podSelector", &pod_key)?;
    let types = match &s.policy_types {
        Some(t) if !t.is_empty() => t.clone(),
        _ => {
            let mut t = vec![PolicyType::Ingress];
            if s.egress.is_some() {
                t.push(PolicyType::Egress);
            }
            t
        }
    };
    let mut ingress = Vec::new();
    for (i, r) in s.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        ingress.push(rule(&path, "from", r.from.as_deref(), r.ports.as_deref())?);
    }
    let mut egress = Vec::new();
    for (i, r) in s.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        egress.push(rule(&path, "to", r.to.as_deref(), r.ports.as_deref())?);
    }
    let ingress_on = types.contains(&PolicyType::Ingress);
    let egress_on = types.contains(&PolicyType::Egress);
    // Kubernetes ignores rules of a direction not in policyTypes; refusing
    // them says so instead of silently dropping them.
    if !ingress_on && !ingress.is_empty() {
        return Err(FieldErr::new(
            "spec.ingress",
            "policyTypes does not list Ingress, so these rules would be ignored; add Ingress or remove them",
        ));
    }
    if !egress_on && !egress.is_empty() {
        return Err(FieldErr::new(
            "spec.egress",
            "policyTypes does not list Egress, so these rules would be ignored; add Egress or remove them",
        ));
    }
    Ok(Policy {
        kind: PolicyKind::NetworkPolicy,
        name,
        namespace,
        specs: vec![PolicySpec {
            origin: "spec".to_owned(),
            endpoint_selector,
            default_deny_ingress: ingress_on,
            default_deny_egress: egress_on,
            ingress,
            ingress_deny: Vec::new(),
            egress,
            egress_deny: Vec::new(),
        }],
    })
}

fn rule(
    path: &str,
    peers_field: &str,
    peers: Option<&[NpPeer]>,
    ports: Option<&[NpPort]>,
) -> Result<Rule, FieldErr> {
    let peers = match peers {
        None | Some([]) => PeerSet::Any,
        Some(list) => {
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                out.push(peer(&format!("{path}.{peers_field}[{i}]"), p)?);
            }
            PeerSet::Only(out)
        }
    };
    let mut port_rules = Vec::new();
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        let proto = p.protocol.map(|p| p.0).unwrap_or(ProtoMatch::Tcp);
        if proto == ProtoMatch::Any {
            return Err(FieldErr::new(
                format!("{path}.ports[{i}].protocol"),
                "a NetworkPolicy protocol is TCP or UDP",
            ));
        }
        port_rules.push(port_rule(
            &format!("{path}.ports[{i}]"),
            p.port,
            p.end_port,
            proto,
        )?);
    }
    Ok(Rule {
        origin: path.to_owned(),
        peers,
        ports: port_rules,
    })
}

fn peer(path: &str, p: &NpPeer) -> Result<Peer, FieldErr> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, Some(b)) => {
            let except = b.except.clone().unwrap_or_default();
            for (j, e) in except.iter().enumerate() {
                if !b.cidr.contains_cidr(e) {
                    return Err(FieldErr::new(
                        format!("{path}.ipBlock.except[{j}]"),
                        format!("{e} is not inside {}", b.cidr),
                    ));
                }
            }
            Ok(Peer::Cidr {
                cidr: b.cidr,
                except,
            })
        }
        (_, _, Some(_)) => Err(FieldErr::new(
            format!("{path}.ipBlock"),
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        )),
        (None, None, None) => Err(FieldErr::new(
            path,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        )),
        (pods, namespaces, None) => {
            let mut sel = match pods {
                Some(s) => s.to_selector(&format!("{path}.podSelector"), &pod_key)?,
                None => Selector::all(),
            };
            if let Some(ns) = namespaces {
                let nsel = ns.to_selector(&format!("{path}.namespaceSelector"), &namespace_key)?;
                sel.requirements.extend(nsel.requirements);
                sel.requirements.push(Requirement {
                    key: LabelKey::any(NAMESPACE_KEY),
                    operator: Operator::Exists,
                    values: Default::default(),
                });
            }
            Ok(Peer::Endpoints(sel))
        }
    }
}
