//! Network policy: the model ([`model`]), the manifest parsers
//! ([`cilium`], [`k8s`]), the evaluation ([`eval`]) and the lint ([`lint`]).
//!
//! Everything here is pure: no I/O, no clocks. docs/policy.md describes the
//! semantics and the accepted and refused manifest shapes.
//!
//! [`parse_manifests`] reads a YAML (or JSON) stream of one or more
//! documents separated by `---`, each a `CiliumNetworkPolicy`,
//! `CiliumClusterwideNetworkPolicy` (`cilium.io/v2`), `NetworkPolicy`
//! (`networking.k8s.io/v1`) or a `List` of them. Unknown fields and fields
//! we do not enforce (L7 rules, FQDNs, services, ...) are refused with an
//! error naming the field path, never ignored.

pub mod cilium;
pub mod eval;
pub mod k8s;
pub mod lint;
pub mod model;

use std::{collections::BTreeMap, fmt, marker::PhantomData};

use serde::{Deserialize, Deserializer, de::IgnoredAny};

pub use eval::{
    CompiledEntry, CompiledPolicy, Decision, EndpointRef, FlowPeer, MapVerdict, Reserved, RuleRef,
    RuleSection, Verdict, compile, evaluate,
};
pub use lint::{Warning, WarningKind, lint, lint_with_endpoints};
pub use model::*;

use crate::types::K8sName;

/// Largest manifest stream accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("manifest of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    /// Not YAML (or JSON); the message carries the line and column.
    #[error("document {document}: {message}")]
    Syntax { document: usize, message: String },
    /// A field is wrong, unknown or not supported. `field` is its path in
    /// the document, e.g. `spec.ingress[0].toPorts[0].rules`.
    #[error("document {document}{}: {field}: {message}", policy.as_ref().map(|p| format!(" ({p})")).unwrap_or_default())]
    Field {
        document: usize,
        policy: Option<String>,
        field: String,
        message: String,
    },
}

impl PolicyError {
    /// The field path, for field errors.
    pub fn field(&self) -> Option<&str> {
        match self {
            PolicyError::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// A field error before the document and policy are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldErr {
    pub field: String,
    pub message: String,
}

impl FieldErr {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses a stream of one or more YAML (or JSON) documents into policies,
/// in order. Empty documents are skipped.
pub fn parse_manifests(text: &str) -> Result<Vec<Policy>, PolicyError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(PolicyError::TooLarge {
            size: text.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    Ok(parse_documents(text)?
        .into_iter()
        .map(|d| d.policy)
        .collect())
}

/// One policy of a manifest stream with the document it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedDocument {
    /// The 0-based document of the stream.
    pub document: usize,
    pub policy: Policy,
    /// The policy's own manifest (the List item for a List), as JSON: what
    /// the apiserver stores and `policy show` prints.
    pub manifest: serde_json::Value,
}

/// Like [`parse_manifests`], keeping each policy's own manifest (as JSON).
/// Every document is validated; the first error refuses the whole stream.
pub fn parse_documents(text: &str) -> Result<Vec<ParsedDocument>, PolicyError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(PolicyError::TooLarge {
            size: text.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    let mut out = Vec::new();
    for (document, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(de).map_err(|e| PolicyError::Syntax {
            document,
            message: e.to_string(),
        })?;
        parse_value(document, value, "", &mut out)?;
    }
    Ok(out)
}

/// A YAML value as JSON (YAML-only shapes, e.g. non-string keys, refused).
fn to_json(
    document: usize,
    name: Option<String>,
    field: String,
    value: &serde_norway::Value,
) -> Result<serde_json::Value, PolicyError> {
    serde_json::to_value(value).map_err(|e| PolicyError::Field {
        document,
        policy: name,
        field,
        message: format!("not representable as JSON: {e}"),
    })
}

/// Parses one document that is already a value. `prefix` is the path of
/// the value in its document (`items[2].` inside a List).
fn parse_value(
    document: usize,
    value: serde_norway::Value,
    prefix: &str,
    out: &mut Vec<ParsedDocument>,
) -> Result<(), PolicyError> {
    use serde_norway::Value;
    let map = match &value {
        Value::Null => return Ok(()),
        Value::Mapping(m) => m,
        _ => {
            return Err(PolicyError::Field {
                document,
                policy: None,
                field: top(prefix),
                message: "a policy manifest must be a mapping".to_owned(),
            });
        }
    };
    let text_of = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_owned);
    let api_version = text_of("apiVersion");
    let kind = text_of("kind");
    let name = map
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let field_err = |e: FieldErr| PolicyError::Field {
        document,
        policy: name.clone(),
        field: format!("{prefix}{}", e.field),
        message: e.message,
    };
    let mut push = |policy: Policy, manifest: serde_json::Value| {
        out.push(ParsedDocument {
            document,
            policy,
            manifest,
        })
    };
    match (api_version.as_deref(), kind.as_deref()) {
        (Some("cilium.io/v2"), Some("CiliumNetworkPolicy")) => {
            let json = to_json(document, name.clone(), top(prefix), &value)?;
            push(cilium::from_value(value, false).map_err(field_err)?, json);
        }
        (Some("cilium.io/v2"), Some("CiliumClusterwideNetworkPolicy")) => {
            let json = to_json(document, name.clone(), top(prefix), &value)?;
            push(cilium::from_value(value, true).map_err(field_err)?, json);
        }
        (Some("networking.k8s.io/v1"), Some("NetworkPolicy")) => {
            let json = to_json(document, name.clone(), top(prefix), &value)?;
            push(k8s::from_value(value).map_err(field_err)?, json);
        }
        (Some("v1"), Some(k)) if k == "List" || k.ends_with("List") => {
            let items = match map.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                Some(Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(field_err(FieldErr::new("items", "must be a list")));
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                parse_value(document, item, &format!("{prefix}items[{i}]."), out)?;
            }
        }
        (None, _) => {
            return Err(field_err(FieldErr::new("apiVersion", "missing")));
        }
        (_, None) => return Err(field_err(FieldErr::new("kind", "missing"))),
        (Some(v), Some(k)) => {
            return Err(field_err(FieldErr::new(
                "kind",
                format!(
                    "{v} {k} is not a supported policy (supported: cilium.io/v2 CiliumNetworkPolicy and \
                     CiliumClusterwideNetworkPolicy, networking.k8s.io/v1 NetworkPolicy, v1 List)"
                ),
            )));
        }
    }
    Ok(())
}

fn top(prefix: &str) -> String {
    match prefix.strip_suffix('.') {
        Some(p) => p.to_owned(),
        None if prefix.is_empty() => "(top level)".to_owned(),
        None => prefix.to_owned(),
    }
}

/// Deserializes `T` from a document value, naming the path of a failure.
/// An unknown field's path ends with the field's own name.
pub(crate) fn typed<T: for<'de> Deserialize<'de>>(
    value: serde_norway::Value,
) -> Result<T, FieldErr> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = e.into_inner().to_string();
        // "unknown field `x`, expected ..." -> path.x
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some((name, _)) = rest.split_once('`')
        {
            // serde_path_to_error already ends the path with the field;
            // add it only if it does not.
            let field = if path.is_empty() {
                name.to_owned()
            } else if path == name || path.ends_with(&format!(".{name}")) {
                path
            } else {
                format!("{path}.{name}")
            };
            return FieldErr::new(field, message);
        }
        FieldErr::new(
            if path.is_empty() {
                "(top level)".to_owned()
            } else {
                path
            },
            message,
        )
    })
}

/// Why a field is refused.
pub(crate) trait Why {
    const WHY: &'static str;
}

/// A field that is accepted by the schema but not enforced: any value but
/// null is refused, naming the field (its path comes from
/// serde_path_to_error).
pub(crate) struct Refused<W>(PhantomData<W>);

impl<W> fmt::Debug for Refused<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Refused")
    }
}

impl<'de, W: Why> Deserialize<'de> for Refused<W> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d)?;
        Err(serde::de::Error::custom(format!(
            "not supported: {}",
            W::WHY
        )))
    }
}

macro_rules! why {
    ($($name:ident => $text:expr;)*) => {
        $(
            pub(crate) struct $name;
            impl Why for $name {
                const WHY: &'static str = $text;
            }
        )*
    };
}

why! {
    L7 => "L7 rules (HTTP, Kafka, DNS) are not enforced; only the L3/L4 subset is";
    Fqdn => "FQDN rules (toFQDNs) are not enforced; use toCIDR/toCIDRSet";
    ToServices => "toServices is not enforced; select the backends with toEndpoints";
    Requires => "fromRequires/toRequires are deprecated in Cilium and not enforced";
    Icmp => "ICMP rules (icmps) are not enforced";
    Groups => "fromGroups/toGroups (cloud provider groups) are not enforced";
    Nodes => "fromNodes/toNodes are not enforced; use the host and remote-node entities";
    Auth => "mutual authentication is not enforced";
    Tls => "TLS interception (serverNames, originatingTLS, terminatingTLS, listener) is not enforced";
    NodeSel => "nodeSelector (host policies) is not enforced; use endpointSelector";
    CidrGroup => "CIDR groups (cidrGroupRef, cidrGroupSelector) are not supported; list the CIDRs";
    Log => "policy logging (log) is not supported";
}

/// `matchLabels` / `matchExpressions`, as both Cilium and Kubernetes write
/// them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawSelector {
    #[serde(default)]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub match_expressions: Option<Vec<RawExpression>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExpression {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Option<Vec<String>>,
}

impl RawSelector {
    /// The selector, keys mapped through `map_key` (identity for pod
    /// selectors, the namespace-label mapping for namespace selectors).
    pub(crate) fn to_selector(
        &self,
        path: &str,
        map_key: &dyn Fn(&str) -> Result<LabelKey, String>,
    ) -> Result<Selector, FieldErr> {
        let mut requirements = Vec::new();
        for (k, v) in self.match_labels.iter().flatten() {
            let field = format!("{path}.matchLabels.{k}");
            let key = map_key(k).map_err(|m| FieldErr::new(&field, m))?;
            let r = Requirement::new(key, Operator::In, [v.clone()].into())
                .map_err(|m| FieldErr::new(&field, m))?;
            requirements.push(r);
        }
        for (i, e) in self.match_expressions.iter().flatten().enumerate() {
            let field = format!("{path}.matchExpressions[{i}]");
            let key = map_key(&e.key).map_err(|m| FieldErr::new(format!("{field}.key"), m))?;
            let op: Operator = e
                .operator
                .parse()
                .map_err(|m| FieldErr::new(format!("{field}.operator"), m))?;
            let values = e.values.iter().flatten().cloned().collect();
            let r = Requirement::new(key, op, values).map_err(|m| FieldErr::new(&field, m))?;
            requirements.push(r);
        }
        Ok(Selector { requirements })
    }
}

/// A pod selector key: `source:key` as [`LabelKey::parse`].
pub(crate) fn pod_key(k: &str) -> Result<LabelKey, String> {
    LabelKey::parse(k)
}

/// A port: a number (or a string of digits, as Cilium writes it). Named
/// ports are refused.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawPort(pub u16);

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number 0..=65535")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawPort, E> {
                u16::try_from(v)
                    .map(RawPort)
                    .map_err(|_| E::custom(format!("port {v} is not in 0..=65535")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawPort, E> {
                u16::try_from(v)
                    .map(RawPort)
                    .map_err(|_| E::custom(format!("port {v} is not in 0..=65535")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawPort, E> {
                if !v.is_empty() && v.len() <= 5 && v.bytes().all(|b| b.is_ascii_digit()) {
                    let n: u32 = v.parse().map_err(|_| E::custom("not a number"))?;
                    return self.visit_u64(n.into());
                }
                Err(E::custom(format!(
                    "named port {v:?} is not supported; give the port number"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A protocol as manifests write it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawProto(pub ProtoMatch);

impl<'de> Deserialize<'de> for RawProto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(RawProto(match s.as_str() {
            "TCP" => ProtoMatch::Tcp,
            "UDP" => ProtoMatch::Udp,
            "ANY" => ProtoMatch::Any,
            "SCTP" => {
                return Err(serde::de::Error::custom(
                    "not supported: SCTP is not enforced (TCP, UDP, ANY are)",
                ));
            }
            "ICMP" | "ICMPv6" | "ICMPV6" => {
                return Err(serde::de::Error::custom(
                    "not supported: ICMP is not enforced (TCP, UDP, ANY are)",
                ));
            }
            other => {
                return Err(serde::de::Error::custom(format!(
                    "protocol {other:?} is not one of TCP, UDP, ANY"
                )));
            }
        }))
    }
}

/// Builds one port rule from `port` / `endPort` / protocol. `port` absent
/// or 0: every port of the protocol (Cilium's and Kubernetes' meaning).
pub(crate) fn port_rule(
    path: &str,
    port: Option<RawPort>,
    end_port: Option<RawPort>,
    protocol: ProtoMatch,
) -> Result<PortRule, FieldErr> {
    let ports = match (port, end_port) {
        (None | Some(RawPort(0)), None) => PortRange::ALL,
        (None | Some(RawPort(0)), Some(_)) => {
            return Err(FieldErr::new(
                format!("{path}.endPort"),
                "endPort needs a non-zero port",
            ));
        }
        (Some(RawPort(p)), None) => PortRange::single(p),
        (Some(RawPort(p)), Some(RawPort(e))) => {
            PortRange::new(p, e).map_err(|m| FieldErr::new(format!("{path}.endPort"), m))?
        }
    };
    Ok(PortRule { protocol, ports })
}

/// Kubernetes object metadata: name and namespace used, the usual
/// bookkeeping fields accepted and ignored, anything else refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct Metadata {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<IgnoredAny>,
    #[serde(default)]
    pub annotations: Option<IgnoredAny>,
    #[serde(default)]
    pub uid: Option<IgnoredAny>,
    #[serde(default)]
    pub resource_version: Option<IgnoredAny>,
    #[serde(default)]
    pub generation: Option<IgnoredAny>,
    #[serde(default)]
    pub creation_timestamp: Option<IgnoredAny>,
    #[serde(default)]
    pub managed_fields: Option<IgnoredAny>,
    #[serde(default)]
    pub finalizers: Option<IgnoredAny>,
    #[serde(default)]
    pub owner_references: Option<IgnoredAny>,
    #[serde(default)]
    pub generate_name: Option<IgnoredAny>,
    #[serde(default)]
    pub self_link: Option<IgnoredAny>,
}

impl Metadata {
    /// Name and namespace, validated; a namespaced kind without a
    /// namespace gets `default` (as `kubectl apply` does).
    pub(crate) fn identity(
        &self,
        namespaced: bool,
    ) -> Result<(PolicyName, Option<K8sName>), FieldErr> {
        let name = self
            .name
            .as_deref()
            .ok_or_else(|| FieldErr::new("metadata.name", "missing"))?
            .parse::<PolicyName>()
            .map_err(|e| FieldErr::new("metadata.name", e.to_string()))?;
        let namespace = match (&self.namespace, namespaced) {
            (Some(ns), true) => Some(
                ns.parse::<K8sName>()
                    .map_err(|e| FieldErr::new("metadata.namespace", e.to_string()))?,
            ),
            (None, true) => Some(
                K8sName::try_from("default".to_owned())
                    .map_err(|e| FieldErr::new("metadata.namespace", e.to_string()))?,
            ),
            (Some(_), false) => {
                return Err(FieldErr::new(
                    "metadata.namespace",
                    "a cluster-wide policy has no namespace",
                ));
            }
            (None, false) => None,
        };
        Ok((name, namespace))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refused_kinds_and_syntax() {
        let e = parse_manifests("apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert_eq!(e.field(), Some("kind"), "{e}");
        let e = parse_manifests("kind: NetworkPolicy\n").unwrap_err();
        assert_eq!(e.field(), Some("apiVersion"), "{e}");
        let e = parse_manifests("a: [1, 2\n").unwrap_err();
        assert!(matches!(e, PolicyError::Syntax { .. }), "{e}");
        assert!(e.to_string().contains("line"), "{e}");
        let e = parse_manifests("- 1\n- 2\n").unwrap_err();
        assert!(e.to_string().contains("mapping"), "{e}");
        assert!(parse_manifests("").unwrap().is_empty());
        assert!(parse_manifests("---\n---\n").unwrap().is_empty());
    }

    #[test]
    fn policy_names() {
        for ok in ["a", "allow-web", "a.b-c.d", &"a".repeat(63)] {
            assert!(ok.parse::<PolicyName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a..b",
            "-a",
            "a_b",
            &"a".repeat(64),
            &"a.".repeat(130),
        ] {
            assert!(bad.parse::<PolicyName>().is_err(), "{bad}");
        }
    }
}
