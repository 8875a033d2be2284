//! Conversions between the gRPC messages ([`crate::proto`]) and the records.
//!
//! Messages carry text (IPs, CIDRs, keys) so that every field is validated
//! here, once, with an error naming the field as a path in the request
//! (`node.pod_cidrs[1]`), which the apiserver returns as `InvalidArgument`.

use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    proto,
    records::{
        Affinity, Backend, BackendState, EncryptionMode, EncryptionPolicy, EncryptionScope,
        FieldError, NodeRecord, Protocol, Record, ServicePort, ServiceRecord,
    },
    types::{ClusterName, IpCidr, K8sName, Labels, NodeName, WgPublicKey},
};

fn field<T, E: std::fmt::Display>(
    path: impl Into<String>,
    r: Result<T, E>,
) -> Result<T, FieldError> {
    r.map_err(|e| FieldError::new(path, e.to_string()))
}

fn ip(path: String, s: &str) -> Result<IpAddr, FieldError> {
    field(
        path,
        s.parse::<IpAddr>()
            .map_err(|_| format!("invalid IP address {s:?}")),
    )
}

/// A registered node's record from its registration message.
pub fn node_from_proto(n: &proto::Node, cluster: &ClusterName) -> Result<NodeRecord, FieldError> {
    let name: NodeName = field("node.name", n.name.parse())?;
    let underlay_ips = n
        .underlay_ips
        .iter()
        .enumerate()
        .map(|(i, s)| ip(format!("node.underlay_ips[{i}]"), s))
        .collect::<Result<_, _>>()?;
    let pod_cidrs = n
        .pod_cidrs
        .iter()
        .enumerate()
        .map(|(i, s)| field(format!("node.pod_cidrs[{i}]"), s.parse::<IpCidr>()))
        .collect::<Result<_, _>>()?;
    let wireguard_public_keys = n
        .wireguard_public_keys
        .iter()
        .enumerate()
        .map(|(i, s)| {
            field(
                format!("node.wireguard_public_keys[{i}]"),
                s.parse::<WgPublicKey>(),
            )
        })
        .collect::<Result<_, _>>()?;
    let wireguard_port = match n.wireguard_port {
        0 => None,
        p => Some(field(
            "node.wireguard_port",
            u16::try_from(p).map_err(|_| format!("{p} is not a UDP port")),
        )?),
    };
    let rec = NodeRecord {
        name,
        cluster: cluster.clone(),
        underlay_ips,
        pod_cidrs,
        wireguard_public_keys,
        wireguard_port,
        boot_id: field("node.boot_id", n.boot_id.parse())?,
    };
    rec.validate().map_err(|e| prefixed("node.", e))?;
    Ok(rec)
}

pub fn node_to_proto(n: &NodeRecord) -> proto::Node {
    proto::Node {
        name: n.name.to_string(),
        underlay_ips: n.underlay_ips.iter().map(ToString::to_string).collect(),
        pod_cidrs: n.pod_cidrs.iter().map(ToString::to_string).collect(),
        wireguard_public_keys: n
            .wireguard_public_keys
            .iter()
            .map(ToString::to_string)
            .collect(),
        wireguard_port: n.wireguard_port.map(u32::from).unwrap_or(0),
        boot_id: n.boot_id.to_string(),
        cluster: n.cluster.to_string(),
    }
}

/// Record validation reports camelCase JSON paths; requests use snake_case.
fn prefixed(prefix: &str, e: FieldError) -> FieldError {
    let mut out = String::with_capacity(e.field.len() + prefix.len() + 4);
    out.push_str(prefix);
    for c in e.field.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    FieldError::new(out, e.reason)
}

pub fn labels_from_proto(
    m: &std::collections::HashMap<String, String>,
) -> Result<Labels, FieldError> {
    let map: BTreeMap<String, String> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    field("labels", Labels::new(map))
}

fn protocol(path: String, s: &str) -> Result<Protocol, FieldError> {
    match s.to_ascii_uppercase().as_str() {
        "TCP" | "" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        _ => Err(FieldError::new(
            path,
            format!("unknown protocol {s:?} (TCP or UDP)"),
        )),
    }
}

pub fn affinity_from_str(s: &str) -> Result<Affinity, FieldError> {
    match s {
        "" | "none" => Ok(Affinity::None),
        "local" => Ok(Affinity::Local),
        "remote" => Ok(Affinity::Remote),
        _ => Err(FieldError::new(
            "service.affinity",
            format!("unknown affinity {s:?} (local, remote or none)"),
        )),
    }
}

pub fn affinity_str(a: Affinity) -> &'static str {
    match a {
        Affinity::None => "none",
        Affinity::Local => "local",
        Affinity::Remote => "remote",
    }
}

fn state_from_str(path: String, s: &str) -> Result<BackendState, FieldError> {
    match s {
        "" | "ready" => Ok(BackendState::Ready),
        "terminating" => Ok(BackendState::Terminating),
        "not-ready" => Ok(BackendState::NotReady),
        _ => Err(FieldError::new(
            path,
            format!("unknown backend state {s:?} (ready, terminating or not-ready)"),
        )),
    }
}

fn state_str(s: BackendState) -> &'static str {
    match s {
        BackendState::Ready => "ready",
        BackendState::Terminating => "terminating",
        BackendState::NotReady => "not-ready",
    }
}

/// A service declared through the API (or the CLI) for `cluster`.
pub fn service_from_proto(
    s: &proto::Service,
    cluster: &ClusterName,
) -> Result<ServiceRecord, FieldError> {
    let namespace: K8sName = field("service.namespace", s.namespace.parse())?;
    let name: K8sName = field("service.name", s.name.parse())?;
    let frontends = s
        .frontends
        .iter()
        .enumerate()
        .map(|(i, f)| ip(format!("service.frontends[{i}]"), f))
        .collect::<Result<_, _>>()?;
    let mut ports = Vec::with_capacity(s.ports.len());
    for (i, p) in s.ports.iter().enumerate() {
        let port = |what: &str, v: u32| {
            field(
                format!("service.ports[{i}].{what}"),
                u16::try_from(v).map_err(|_| format!("{v} is not a port")),
            )
        };
        ports.push(ServicePort {
            name: if p.name.is_empty() {
                None
            } else {
                Some(field(format!("service.ports[{i}].name"), p.name.parse())?)
            },
            protocol: protocol(format!("service.ports[{i}].protocol"), &p.protocol)?,
            port: port("port", p.port)?,
            target_port: port(
                "target_port",
                if p.target_port == 0 {
                    p.port
                } else {
                    p.target_port
                },
            )?,
        });
    }
    let mut backends = Vec::with_capacity(s.backends.len());
    for (i, b) in s.backends.iter().enumerate() {
        backends.push(Backend {
            ip: ip(format!("service.backends[{i}].ip"), &b.ip)?,
            cluster: cluster.clone(),
            state: state_from_str(format!("service.backends[{i}].state"), &b.state)?,
            node: if b.node.is_empty() {
                None
            } else {
                Some(field(
                    format!("service.backends[{i}].node"),
                    b.node.parse(),
                )?)
            },
        });
    }
    if !s.cluster.is_empty() && s.cluster != cluster.as_str() {
        return Err(FieldError::new(
            "service.cluster",
            format!("this apiserver serves cluster {cluster}, not {}", s.cluster),
        ));
    }
    let rec = ServiceRecord {
        cluster: cluster.clone(),
        namespace,
        name,
        frontends,
        ports,
        backends,
        global: s.global,
        shared: s.shared,
        affinity: affinity_from_str(&s.affinity)?,
    };
    rec.validate().map_err(|e| prefixed("service.", e))?;
    Ok(rec)
}

pub fn service_to_proto(s: &ServiceRecord) -> proto::Service {
    proto::Service {
        namespace: s.namespace.to_string(),
        name: s.name.to_string(),
        frontends: s.frontends.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| proto::ServicePort {
                name: p.name.as_ref().map(ToString::to_string).unwrap_or_default(),
                protocol: p.protocol.to_string(),
                port: p.port.into(),
                target_port: p.target_port.into(),
            })
            .collect(),
        backends: s
            .backends
            .iter()
            .map(|b| proto::Backend {
                ip: b.ip.to_string(),
                state: state_str(b.state).to_owned(),
                node: b.node.as_ref().map(ToString::to_string).unwrap_or_default(),
            })
            .collect(),
        global: s.global,
        shared: s.shared,
        affinity: affinity_str(s.affinity).to_owned(),
        cluster: s.cluster.to_string(),
    }
}

/// An encryption policy from its message, validated as a cluster config
/// would validate it (strict needs WireGuard).
pub fn encryption_from_proto(p: &proto::EncryptionPolicy) -> Result<EncryptionPolicy, FieldError> {
    let e = EncryptionPolicy {
        mode: match p.mode.as_str() {
            "none" | "" => EncryptionMode::None,
            "wireguard" => EncryptionMode::Wireguard,
            o => {
                return Err(FieldError::new(
                    "policy.mode",
                    format!("unknown mode {o:?} (none or wireguard)"),
                ));
            }
        },
        scope: match p.scope.as_str() {
            "all" | "" => EncryptionScope::All,
            "inter-cluster" => EncryptionScope::InterCluster,
            o => {
                return Err(FieldError::new(
                    "policy.scope",
                    format!("unknown scope {o:?} (all or inter-cluster)"),
                ));
            }
        },
        strict: p.strict,
        strict_ingress: p.strict_ingress,
        node_to_node: p.node_to_node,
    };
    if e.mode == EncryptionMode::None && (e.strict || e.strict_ingress) {
        return Err(FieldError::new(
            if e.strict {
                "policy.strict"
            } else {
                "policy.strict_ingress"
            },
            "strict mode needs encryption mode wireguard",
        ));
    }
    Ok(e)
}

pub fn encryption_to_proto(e: &EncryptionPolicy) -> proto::EncryptionPolicy {
    proto::EncryptionPolicy {
        mode: match e.mode {
            EncryptionMode::None => "none",
            EncryptionMode::Wireguard => "wireguard",
        }
        .to_owned(),
        scope: match e.scope {
            EncryptionScope::All => "all",
            EncryptionScope::InterCluster => "inter-cluster",
        }
        .to_owned(),
        strict: e.strict,
        strict_ingress: e.strict_ingress,
        node_to_node: e.node_to_node,
    }
}

/// A stored policy as the API returns it.
pub fn policy_to_proto(p: &crate::records::PolicyRecord) -> proto::NetworkPolicy {
    proto::NetworkPolicy {
        cluster: p.cluster.to_string(),
        kind: p.policy.kind.to_string(),
        namespace: p
            .namespace
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        name: p.name.to_string(),
        manifest_json: p.manifest.to_string(),
    }
}

/// A policy read from the API (the CLI's `policy trace`), parsed and
/// checked as strictly as the apiserver stores it.
pub fn policy_from_proto(
    p: &proto::NetworkPolicy,
) -> Result<crate::records::PolicyRecord, FieldError> {
    let cluster: ClusterName = field("cluster", p.cluster.parse())?;
    let manifest: serde_json::Value =
        field("manifest_json", serde_json::from_str(&p.manifest_json))?;
    let mut ps = field(
        "manifest_json",
        crate::policy::parse_manifests(&p.manifest_json),
    )?;
    let policy = match (ps.pop(), ps.is_empty()) {
        (Some(x), true) => x,
        _ => {
            return Err(FieldError::new(
                "manifest_json",
                "must hold exactly one policy",
            ));
        }
    };
    let rec = crate::records::PolicyRecord::new(cluster, policy, manifest);
    if rec.policy.kind.to_string() != p.kind
        || rec.name.as_str() != p.name
        || rec.namespace.as_ref().map(K8sName::as_str).unwrap_or("") != p.namespace
    {
        return Err(FieldError::new(
            "manifest_json",
            format!(
                "is {}, the message names {} {}/{}",
                rec.policy.reference(),
                p.kind,
                p.namespace,
                p.name
            ),
        ));
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node() -> proto::Node {
        proto::Node {
            name: "n1".into(),
            underlay_ips: vec!["192.0.2.1".into()],
            pod_cidrs: vec!["10.1.0.0/24".into()],
            wireguard_public_keys: vec![],
            wireguard_port: 0,
            boot_id: "b1".into(),
            cluster: String::new(),
        }
    }

    #[test]
    fn node_errors_name_the_request_field() {
        let c: ClusterName = "c1".parse().unwrap();
        assert!(node_from_proto(&node(), &c).is_ok());
        let mut n = node();
        n.pod_cidrs.push("10.1.0.0/16".into());
        let e = node_from_proto(&n, &c).unwrap_err();
        assert_eq!(e.field, "node.pod_cidrs[1]");
        let mut n = node();
        n.underlay_ips = vec!["nope".into()];
        assert_eq!(
            node_from_proto(&n, &c).unwrap_err().field,
            "node.underlay_ips[0]"
        );
        let mut n = node();
        n.underlay_ips.clear();
        assert_eq!(
            node_from_proto(&n, &c).unwrap_err().field,
            "node.underlay_ips"
        );
    }

    #[test]
    fn service_round_trip() {
        let c: ClusterName = "c1".parse().unwrap();
        let s = proto::Service {
            namespace: "default".into(),
            name: "web".into(),
            frontends: vec!["10.96.0.1".into()],
            ports: vec![proto::ServicePort {
                name: String::new(),
                protocol: "TCP".into(),
                port: 80,
                target_port: 8080,
            }],
            backends: vec![proto::Backend {
                ip: "10.1.0.5".into(),
                state: "ready".into(),
                node: String::new(),
            }],
            global: true,
            shared: true,
            affinity: "local".into(),
            cluster: String::new(),
        };
        let r = service_from_proto(&s, &c).unwrap();
        let back = service_to_proto(&r);
        assert_eq!(service_from_proto(&back, &c).unwrap(), r);
        let mut bad = s.clone();
        bad.affinity = "nearest".into();
        assert_eq!(
            service_from_proto(&bad, &c).unwrap_err().field,
            "service.affinity"
        );
    }

    #[test]
    fn encryption_policies_round_trip_and_strict_needs_wireguard() {
        let p = proto::EncryptionPolicy {
            mode: "wireguard".into(),
            scope: "inter-cluster".into(),
            strict: true,
            strict_ingress: true,
            node_to_node: false,
        };
        let e = encryption_from_proto(&p).unwrap();
        assert_eq!(encryption_to_proto(&e), p);
        let bad = proto::EncryptionPolicy {
            mode: "none".into(),
            strict: true,
            ..Default::default()
        };
        assert_eq!(
            encryption_from_proto(&bad).unwrap_err().field,
            "policy.strict"
        );
        let bad = proto::EncryptionPolicy {
            mode: "ipsec".into(),
            ..Default::default()
        };
        assert!(
            encryption_from_proto(&bad)
                .unwrap_err()
                .to_string()
                .contains("unknown mode")
        );
    }
}
