//! Flows (docs/observability.md): the server-side filter of the node
//! agent's `Observer` API and the words its messages use. The messages
//! themselves are the generated `proto::Flow` and friends (they also
//! derive serde: one JSON object per flow in `clustermesh observe -o json`).
//!
//! A [`Filter`] is the checked form of a `proto::FlowFilter`: every field
//! is a set (a flow matches one of its values), and a flow must match every
//! non-empty field, as `hubble observe` combines its flags.

use std::net::IpAddr;

use crate::proto::{Flow, FlowEndpoint, FlowFilter};

/// The `verdict` words.
pub const VERDICTS: [&str; 3] = ["forwarded", "dropped", "audit"];

/// A filter refused, naming the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flow filter {field}: {value:?} {reason}")]
pub struct FilterError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

fn bad(field: &'static str, value: &str, reason: impl Into<String>) -> FilterError {
    FilterError {
        field,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// A pod given as `namespace/name` or `name` (any namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodRef {
    namespace: Option<String>,
    name: String,
}

/// A label given as `key=value` (any source) or `source:key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelRef {
    source: Option<String>,
    key: String,
    value: String,
}

/// A checked [`FlowFilter`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    from_pod: Vec<PodRef>,
    to_pod: Vec<PodRef>,
    from_cluster: Vec<String>,
    to_cluster: Vec<String>,
    namespace: Vec<String>,
    label: Vec<LabelRef>,
    verdict: Vec<String>,
    drop_reason: Vec<String>,
    port: Vec<u32>,
    protocol: Vec<String>,
    encrypted: Option<bool>,
    from_ip: Vec<IpAddr>,
    to_ip: Vec<IpAddr>,
}

fn pods(field: &'static str, v: &[String]) -> Result<Vec<PodRef>, FilterError> {
    v.iter()
        .map(|p| {
            let (ns, name) = match p.split_once('/') {
                Some((ns, name)) => (Some(ns), name),
                None => (None, p.as_str()),
            };
            if name.is_empty() || ns.is_some_and(str::is_empty) || name.contains('/') {
                return Err(bad(field, p, "is not namespace/name or name"));
            }
            Ok(PodRef {
                namespace: ns.map(str::to_owned),
                name: name.to_owned(),
            })
        })
        .collect()
}

fn labels(v: &[String]) -> Result<Vec<LabelRef>, FilterError> {
    v.iter()
        .map(|l| {
            let (kv_source, kv) = match l.split_once(':') {
                Some((s, rest)) if !s.contains('=') => (Some(s), rest),
                _ => (None, l.as_str()),
            };
            let Some((k, val)) = kv.split_once('=') else {
                return Err(bad("label", l, "is not key=value or source:key=value"));
            };
            if k.is_empty() {
                return Err(bad("label", l, "has an empty key"));
            }
            Ok(LabelRef {
                source: kv_source.map(str::to_owned),
                key: k.to_owned(),
                value: val.to_owned(),
            })
        })
        .collect()
}

fn ips(field: &'static str, v: &[String]) -> Result<Vec<IpAddr>, FilterError> {
    v.iter()
        .map(|s| s.parse().map_err(|_| bad(field, s, "is not an IP address")))
        .collect()
}

/// The protocol word of an IP protocol number.
pub fn protocol_name(proto: u8, ip_version: u32) -> String {
    match (proto, ip_version) {
        (6, _) => "tcp".into(),
        (17, _) => "udp".into(),
        (1, 4) => "icmp".into(),
        (58, 6) => "icmpv6".into(),
        (p, _) => p.to_string(),
    }
}

/// A drop reason without its `drop_` prefix (both are accepted).
fn reason(s: &str) -> &str {
    s.strip_prefix("drop_").unwrap_or(s)
}

impl Filter {
    /// Checks every field of `f`.
    pub fn from_proto(f: &FlowFilter) -> Result<Self, FilterError> {
        for v in &f.verdict {
            if !VERDICTS.contains(&v.as_str()) {
                return Err(bad(
                    "verdict",
                    v,
                    format!("is not one of {}", VERDICTS.join(", ")),
                ));
            }
        }
        for p in &f.port {
            if *p > u32::from(u16::MAX) {
                return Err(bad("port", &p.to_string(), "is above 65535"));
            }
        }
        let protocol: Vec<String> = f.protocol.iter().map(|p| p.to_ascii_lowercase()).collect();
        for p in &protocol {
            let known = ["tcp", "udp", "icmp", "icmpv6"].contains(&p.as_str());
            if !known && p.parse::<u8>().is_err() {
                return Err(bad(
                    "protocol",
                    p,
                    "is not tcp, udp, icmp, icmpv6 or a number",
                ));
            }
        }
        Ok(Self {
            from_pod: pods("from_pod", &f.from_pod)?,
            to_pod: pods("to_pod", &f.to_pod)?,
            from_cluster: f.from_cluster.clone(),
            to_cluster: f.to_cluster.clone(),
            namespace: f.namespace.clone(),
            label: labels(&f.label)?,
            verdict: f.verdict.clone(),
            drop_reason: f.drop_reason.iter().map(|r| reason(r).to_owned()).collect(),
            port: f.port.clone(),
            protocol,
            encrypted: f.encrypted,
            from_ip: ips("from_ip", &f.from_ip)?,
            to_ip: ips("to_ip", &f.to_ip)?,
        })
    }

    /// Whether `flow` passes every non-empty field.
    pub fn matches(&self, flow: &Flow) -> bool {
        let none = FlowEndpoint::default();
        let src = flow.source.as_ref().unwrap_or(&none);
        let dst = flow.destination.as_ref().unwrap_or(&none);
        let any = |v: &[String], s: &str| v.is_empty() || v.iter().any(|x| x == s);
        let pod = |v: &[PodRef], e: &FlowEndpoint| {
            v.is_empty()
                || v.iter().any(|p| {
                    p.name == e.pod && p.namespace.as_ref().is_none_or(|ns| *ns == e.namespace)
                })
        };
        let ip = |v: &[IpAddr], e: &FlowEndpoint| {
            v.is_empty() || e.ip.parse::<IpAddr>().is_ok_and(|a| v.contains(&a))
        };
        let has_label = |l: &LabelRef, e: &FlowEndpoint| {
            e.labels.iter().any(|x| {
                let (s, kv) = x.split_once(':').unwrap_or(("", x));
                kv.split_once('=')
                    .is_some_and(|(k, v)| k == l.key && v == l.value)
                    && l.source.as_ref().is_none_or(|ls| ls == s)
            })
        };
        pod(&self.from_pod, src)
            && pod(&self.to_pod, dst)
            && any(&self.from_cluster, &src.cluster)
            && any(&self.to_cluster, &dst.cluster)
            && (self.namespace.is_empty()
                || self
                    .namespace
                    .iter()
                    .any(|n| *n == src.namespace || *n == dst.namespace))
            && self
                .label
                .iter()
                .all(|l| has_label(l, src) || has_label(l, dst))
            && any(&self.verdict, &flow.verdict)
            && (self.drop_reason.is_empty()
                || self
                    .drop_reason
                    .iter()
                    .any(|r| r == reason(&flow.drop_reason)))
            && (self.port.is_empty()
                || self
                    .port
                    .iter()
                    .any(|p| *p == flow.source_port || *p == flow.destination_port))
            && any(&self.protocol, &flow.protocol)
            && self.encrypted.is_none_or(|e| e == flow.encrypted)
            && ip(&self.from_ip, src)
            && ip(&self.to_ip, dst)
    }
}

/// One line per flow for people (`clustermesh observe`):
/// `time cluster/node  src -> dst  proto  verdict[ reason]  flags`.
pub fn human_line(f: &Flow) -> String {
    let none = FlowEndpoint::default();
    let side = |e: &FlowEndpoint, port: u32| {
        let who = if !e.pod.is_empty() {
            format!("{}/{}/{}", e.cluster, e.namespace, e.pod)
        } else if e.kind == "node" {
            format!("{}/node:{}", e.cluster, e.node)
        } else {
            e.kind.clone()
        };
        let addr = match (e.ip.parse::<IpAddr>(), port) {
            (Ok(IpAddr::V6(a)), p) if p != 0 => format!("[{a}]:{p}"),
            (_, 0) => e.ip.clone(),
            (_, p) => format!("{}:{p}", e.ip),
        };
        format!("{who} ({addr}, id {})", e.identity)
    };
    let mut verdict = flow_verdict_word(f);
    if let Some(s) = &f.service {
        let fe = match s.frontend.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => format!("[{a}]"),
            _ => s.frontend.clone(),
        };
        verdict.push_str(&format!(
            " via service {}/{} {fe}:{}",
            s.namespace, s.name, s.port
        ));
    }
    let enc = if f.encrypted { " encrypted" } else { "" };
    let tunnel = if f.tunnel.is_empty() {
        String::new()
    } else {
        format!(" {}", f.tunnel)
    };
    format!(
        "{} {}/{} {} {} -> {} {} {}{}{}",
        f.time,
        f.cluster,
        f.node,
        f.direction,
        side(f.source.as_ref().unwrap_or(&none), f.source_port),
        side(f.destination.as_ref().unwrap_or(&none), f.destination_port),
        f.protocol,
        verdict,
        tunnel,
        enc
    )
}

fn flow_verdict_word(f: &Flow) -> String {
    match f.verdict.as_str() {
        "dropped" => format!("DROPPED ({})", f.drop_reason),
        "audit" => format!("AUDIT ({})", f.drop_reason),
        _ => "FORWARDED".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::proto::FlowService;

    fn flow() -> Flow {
        Flow {
            cluster: "c1".into(),
            node: "node-1".into(),
            verdict: "dropped".into(),
            drop_reason: "policy_denied".into(),
            protocol: "tcp".into(),
            source_port: 40000,
            destination_port: 8080,
            encrypted: true,
            source: Some(FlowEndpoint {
                ip: "10.2.1.5".into(),
                cluster: "c2".into(),
                namespace: "default".into(),
                pod: "frontend".into(),
                labels: vec!["k8s:app=frontend".into()],
                kind: "pod".into(),
                ..FlowEndpoint::default()
            }),
            destination: Some(FlowEndpoint {
                ip: "10.1.1.5".into(),
                cluster: "c1".into(),
                namespace: "prod".into(),
                pod: "web".into(),
                labels: vec!["k8s:app=web".into()],
                kind: "pod".into(),
                ..FlowEndpoint::default()
            }),
            ..Flow::default()
        }
    }

    fn filter(f: FlowFilter) -> Filter {
        Filter::from_proto(&f).unwrap()
    }

    #[test]
    fn every_field_filters_and_fields_combine() {
        let f = flow();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let cases: Vec<(FlowFilter, bool)> = vec![
            (FlowFilter::default(), true),
            (
                FlowFilter {
                    from_pod: s(&["default/frontend"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    from_pod: s(&["frontend"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    from_pod: s(&["prod/frontend"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    to_pod: s(&["prod/web", "x"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    to_pod: s(&["frontend"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    from_cluster: s(&["c2"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    to_cluster: s(&["c2"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    namespace: s(&["prod"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    namespace: s(&["kube-system"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    label: s(&["app=web"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    label: s(&["k8s:app=frontend"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    label: s(&["any:app=frontend"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    label: s(&["app=web", "app=db"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    verdict: s(&["forwarded", "dropped"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    verdict: s(&["forwarded"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    drop_reason: s(&["drop_policy_denied"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    drop_reason: s(&["policy_denied"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    drop_reason: s(&["spoofed"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    port: vec![8080],
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    port: vec![40000],
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    port: vec![9090],
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    protocol: s(&["TCP"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    protocol: s(&["udp"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    encrypted: Some(true),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    encrypted: Some(false),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    from_ip: s(&["10.2.1.5"]),
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    to_ip: s(&["10.2.1.5"]),
                    ..Default::default()
                },
                false,
            ),
            (
                FlowFilter {
                    from_cluster: s(&["c2"]),
                    verdict: s(&["dropped"]),
                    port: vec![8080],
                    ..Default::default()
                },
                true,
            ),
            (
                FlowFilter {
                    from_cluster: s(&["c2"]),
                    verdict: s(&["forwarded"]),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (ff, want) in cases {
            assert_eq!(filter(ff.clone()).matches(&f), want, "{ff:?}");
        }
    }

    #[test]
    fn bad_filters_are_refused_naming_the_field() {
        let s = |v: &str| vec![v.to_string()];
        let cases = [
            (
                FlowFilter {
                    verdict: s("allowed"),
                    ..Default::default()
                },
                "verdict",
            ),
            (
                FlowFilter {
                    from_pod: s("a/b/c"),
                    ..Default::default()
                },
                "from_pod",
            ),
            (
                FlowFilter {
                    to_pod: s("/web"),
                    ..Default::default()
                },
                "to_pod",
            ),
            (
                FlowFilter {
                    label: s("app"),
                    ..Default::default()
                },
                "label",
            ),
            (
                FlowFilter {
                    label: s("=x"),
                    ..Default::default()
                },
                "label",
            ),
            (
                FlowFilter {
                    port: vec![70000],
                    ..Default::default()
                },
                "port",
            ),
            (
                FlowFilter {
                    protocol: s("sctpx"),
                    ..Default::default()
                },
                "protocol",
            ),
            (
                FlowFilter {
                    from_ip: s("10.0.0"),
                    ..Default::default()
                },
                "from_ip",
            ),
        ];
        for (f, field) in cases {
            let e = Filter::from_proto(&f).unwrap_err();
            assert_eq!(e.field, field, "{f:?}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn the_human_line_names_both_sides_the_verdict_and_the_service() {
        let mut f = flow();
        f.tunnel = "wireguard".into();
        f.service = Some(FlowService {
            frontend: "10.96.0.10".into(),
            port: 80,
            namespace: "default".into(),
            name: "echo".into(),
            ..FlowService::default()
        });
        let l = human_line(&f);
        for want in [
            "c2/default/frontend (10.2.1.5:40000",
            "c1/prod/web (10.1.1.5:8080",
            "DROPPED (policy_denied)",
            "via service default/echo 10.96.0.10:80",
            "wireguard encrypted",
        ] {
            assert!(l.contains(want), "{want} not in {l}");
        }
    }

    #[test]
    fn protocol_names() {
        assert_eq!(protocol_name(6, 4), "tcp");
        assert_eq!(protocol_name(17, 6), "udp");
        assert_eq!(protocol_name(1, 4), "icmp");
        assert_eq!(protocol_name(58, 6), "icmpv6");
        assert_eq!(protocol_name(132, 4), "132");
    }
}
