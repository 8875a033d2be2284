//! The SIEM export (docs/observability.md, "Export for SIEMs"): flows and
//! audit-trail events as JSON lines in one file, each line one OCSF 1.3
//! event:
//!
//! - a flow is a **Network Activity** event (class 4001, activity 6
//!   Traffic), [`NetworkActivity`];
//! - an audit-trail event (a posture change of this node: encryption
//!   policy, key rotation, WireGuard peers, plaintext drops) is a **Device
//!   Config State Change** event (class 5019, activity 1 Log),
//!   [`DeviceConfigStateChange`].
//!
//! What OCSF has no attribute for (clusters, namespaces, pods, labels,
//! identities, encryption, tunnel, service, drop reason) is under
//! `unmapped`, named as in `proto::Flow`.
//!
//! Flows are selected by allow / deny filters ([`parse_filter`]: the
//! `--flow-export-allow` / `--flow-export-deny` flag syntax), fields are
//! removed by `--flow-export-redact PATH` (validated against the paths the
//! schema can produce, [`redactable_paths`]), and the file rotates by size
//! (`path` -> `path.1` -> ... -> `path.N`, the oldest deleted).
//!
//! The writer never panics on any flow; a failed write is returned (and
//! counted in [`ExportStats::write_errors`]) and leaves no partial line.

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use clustermesh_api::{
    flow::Filter,
    proto::{Flow, FlowEndpoint, FlowFilter, FlowService},
    time::rfc3339,
};
use serde::Serialize;
use serde_json::{Map, Value};

/// The OCSF schema version every line declares (`metadata.version`).
pub const OCSF_VERSION: &str = "1.3.0";
/// `metadata.product.name` and `metadata.product.vendor_name`.
pub const PRODUCT: &str = "clustermesh";
/// Default `--flow-export-max-bytes`: 10 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default `--flow-export-max-files`: rotated files kept.
pub const DEFAULT_MAX_FILES: usize = 5;

// ---- configuration ---------------------------------------------------------

/// The export's flags.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The current file; rotated files are `path.1` (newest) .. `path.N`.
    pub path: PathBuf,
    /// A write that would take the file past this rotates it first.
    pub max_bytes: u64,
    /// Rotated files kept besides the current one (0: none, the file
    /// starts over).
    pub max_files: usize,
    /// A flow is exported when it matches one of these (or there is none)
    pub allow: Vec<Filter>,
    /// ... and none of these.
    pub deny: Vec<Filter>,
    /// Dotted output paths removed from every line.
    pub redact: Vec<String>,
}

impl ExportConfig {
    /// The defaults: every flow, nothing redacted, 10 MiB, 5 rotated files.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            max_files: DEFAULT_MAX_FILES,
            allow: Vec::new(),
            deny: Vec::new(),
            redact: Vec::new(),
        }
    }
}

/// The export refused at start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("--flow-export-redact {path:?}: {reason}")]
    Redact { path: String, reason: String },
    #[error("flow export: {0}")]
    Config(String),
    #[error("flow export file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The filter flag keys and the `FlowFilter` field each fills.
pub const FILTER_KEYS: [&str; 13] = [
    "from-pod",
    "to-pod",
    "from-cluster",
    "to-cluster",
    "namespace",
    "label",
    "verdict",
    "drop-reason",
    "port",
    "protocol",
    "encrypted",
    "from-ip",
    "to-ip",
];

/// Parses one `--flow-export-allow` / `--flow-export-deny` value:
/// comma-separated `key=value` (a key may repeat: one of its values
/// matches; different keys must all match), e.g.
/// `from-cluster=c2,verdict=dropped,port=443,port=8443`. Values cannot
/// contain commas. Checked as the `Observer` API checks its filters.
pub fn parse_filter(s: &str) -> Result<FlowFilter, String> {
    let mut f = FlowFilter::default();
    if s.trim().is_empty() {
        return Err("empty flow filter (want key=value[,key=value...])".into());
    }
    for item in s.split(',') {
        let item = item.trim();
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("flow filter item {item:?} is not key=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            return Err(format!("flow filter {key}: empty value"));
        }
        let v = value.to_owned();
        match key {
            "from-pod" => f.from_pod.push(v),
            "to-pod" => f.to_pod.push(v),
            "from-cluster" => f.from_cluster.push(v),
            "to-cluster" => f.to_cluster.push(v),
            "namespace" => f.namespace.push(v),
            "label" => f.label.push(v),
            "verdict" => f.verdict.push(v),
            "drop-reason" => f.drop_reason.push(v),
            "protocol" => f.protocol.push(v),
            "from-ip" => f.from_ip.push(v),
            "to-ip" => f.to_ip.push(v),
            "port" => f.port.push(
                value
                    .parse()
                    .map_err(|_| format!("flow filter port: {value:?} is not a port number"))?,
            ),
            "encrypted" => {
                let b = value.parse().map_err(|_| {
                    format!("flow filter encrypted: {value:?} is not true or false")
                })?;
                if f.encrypted.is_some_and(|e| e != b) {
                    return Err("flow filter encrypted: both true and false".into());
                }
                f.encrypted = Some(b);
            }
            _ => {
                return Err(format!(
                    "flow filter: unknown key {key:?} (one of {})",
                    FILTER_KEYS.join(", ")
                ));
            }
        }
    }
    Filter::from_proto(&f).map_err(|e| {
        let key = e.field.replace('_', "-");
        format!("flow filter {key}: {:?} {}", e.value, e.reason)
    })?;
    Ok(f)
}

// ---- the schema --------------------------------------------------------------

/// `metadata`: the OCSF version, the product, which log (`flows` or
/// `audit`), the event's id and sequence, and the source's own timestamp.
#[derive(Debug, Clone, Serialize)]
pub struct Metadata {
    pub version: &'static str,
    pub product: Product,
    pub log_name: &'static str,
    /// `cluster/node/sequence` for a flow: unique per event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// `Flow.sequence`: per observing node, increasing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// `Flow.time` / the audit line's `ts`, as written by the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_time: Option<String>,
    pub profiles: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Product {
    pub name: &'static str,
    pub vendor_name: &'static str,
    pub version: &'static str,
}

/// `device`: the node that observed the flow or whose posture changed.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    /// 1 (Server): a Kubernetes / clustermesh node.
    pub type_id: u8,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `src_endpoint` / `dst_endpoint`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetworkEndpoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// `namespace/pod` for a pod, the node's name for a node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Destination only: `namespace/name` of the service the client sent to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svc_name: Option<String>,
}

/// `connection_info`.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    /// IANA keyword in lower case (`tcp`, `udp`, `icmp`, `ipv6-icmp`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_num: Option<u8>,
    /// `IPv4` | `IPv6` (omitted when not IP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_ver: Option<&'static str>,
    /// 4 | 6 | 0.
    pub protocol_ver_id: u8,
    /// `Unknown` | `Inbound` | `Outbound` | `Lateral`, relative to the mesh.
    pub direction: &'static str,
    pub direction_id: u8,
}

/// `traffic`.
#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// One `observables` entry: `name` is the path of the value in the event.
#[derive(Debug, Clone, Serialize)]
pub struct Observable {
    pub name: &'static str,
    pub type_id: u8,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    pub value: String,
}

/// `unmapped.source` / `unmapped.destination`: one side as the observing
/// node's merged state knows it (`proto::FlowEndpoint`).
#[derive(Debug, Clone, Serialize)]
pub struct MeshEndpoint {
    pub kind: String,
    pub identity: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod: String,
    pub labels: Vec<String>,
}

/// `unmapped.service`: the service frontend the client sent to.
#[derive(Debug, Clone, Serialize)]
pub struct MeshService {
    pub frontend: String,
    pub port: u32,
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

/// `unmapped` of a flow: what OCSF has no attribute for.
#[derive(Debug, Clone, Serialize)]
pub struct FlowUnmapped {
    /// The observing node's cluster.
    pub cluster: String,
    /// `trace` | `drop` | `audit`.
    pub event: String,
    /// `forwarded` | `dropped` | `audit`.
    pub verdict: String,
    /// The datapath's reason for a drop or an audit (would-be drop).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub drop_reason: String,
    /// What the datapath did: `local` | `tunnel` | `routed` | ...
    #[serde(skip_serializing_if = "String::is_empty")]
    pub datapath_disposition: String,
    /// `egress` (leaving a local pod) | `ingress` (arriving for one).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub direction: String,
    pub encrypted: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tunnel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<MeshService>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<MeshEndpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<MeshEndpoint>,
}

/// A flow as OCSF Network Activity (4001), activity 6 (Traffic).
#[derive(Debug, Clone, Serialize)]
pub struct NetworkActivity {
    pub class_uid: u32,
    pub class_name: &'static str,
    pub category_uid: u32,
    pub category_name: &'static str,
    pub activity_id: u32,
    pub activity_name: &'static str,
    pub type_uid: u32,
    pub type_name: &'static str,
    /// Milliseconds since the epoch (`Flow.time_unix_nanos`).
    pub time: u64,
    pub severity_id: u8,
    pub severity: &'static str,
    /// 1 Allowed (forwarded, audit) | 2 Denied (dropped).
    pub action_id: u8,
    pub action: &'static str,
    /// 1 Allowed | 6 Dropped | 17 Logged (audit: allowed, would be denied).
    pub disposition_id: u8,
    pub disposition: &'static str,
    /// 1 Success (forwarded, audit) | 2 Failure (dropped).
    pub status_id: u8,
    pub status: &'static str,
    /// The drop reason of a dropped flow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_detail: Option<String>,
    pub metadata: Metadata,
    pub device: Device,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<NetworkEndpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_endpoint: Option<NetworkEndpoint>,
    pub connection_info: ConnectionInfo,
    pub traffic: Traffic,
    pub observables: Vec<Observable>,
    pub unmapped: FlowUnmapped,
}

/// `unmapped` of an audit event: the audit trail's own fields.
#[derive(Debug, Clone, Serialize)]
pub struct AuditUnmapped {
    /// The audit event's name (`encryption_policy`, `peer_added`, ...).
    pub event: String,
    /// The writer's scope as in the audit line (`node` for an agent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The event's fields exactly as in the audit trail (fingerprints,
    /// never keys).
    pub fields: Map<String, Value>,
}

/// An audit-trail event as OCSF Device Config State Change (5019),
/// activity 1 (Log).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceConfigStateChange {
    pub class_uid: u32,
    pub class_name: &'static str,
    pub category_uid: u32,
    pub category_name: &'static str,
    pub activity_id: u32,
    pub activity_name: &'static str,
    pub type_uid: u32,
    pub type_name: &'static str,
    pub time: u64,
    pub severity_id: u8,
    pub severity: &'static str,
    pub status_id: u8,
    pub status: &'static str,
    pub message: String,
    pub metadata: Metadata,
    pub device: Device,
    pub unmapped: AuditUnmapped,
}

// ---- mapping ---------------------------------------------------------------

/// One line of the audit trail (`clustermesh_api::audit`): `ts`, the
/// writer's scope (`node` or `cluster`: its name), `event`, the fields.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// RFC 3339 UTC with milliseconds, as `audit::rfc3339` writes it.
    pub ts: String,
    /// `node` | `cluster`.
    pub scope: String,
    /// The node's (cluster's) name.
    pub name: String,
    pub event: String,
    pub fields: Map<String, Value>,
}

impl AuditRecord {
    /// The record `Audit::record(event, fields)` writes now for `scope`
    /// (e.g. `("node", "node-1")`); `fields` other than an object are
    /// ignored, as the trail does.
    pub fn new(scope: (&str, &str), event: &str, fields: Value) -> Self {
        Self {
            ts: rfc3339(SystemTime::now()),
            scope: scope.0.to_owned(),
            name: scope.1.to_owned(),
            event: event.to_owned(),
            fields: match fields {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }

    /// Reads one line of the audit file.
    pub fn parse_line(line: &str) -> Result<Self, String> {
        let Value::Object(mut m) =
            serde_json::from_str(line).map_err(|e| format!("audit line: {e}"))?
        else {
            return Err("audit line: not a JSON object".into());
        };
        let mut take = |k: &str| match m.remove(k) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(format!("audit line: no string {k:?}")),
        };
        let ts = take("ts")?;
        let event = take("event")?;
        let (scope, name) = match take("node") {
            Ok(n) => ("node", n),
            Err(_) => ("cluster", take("cluster")?),
        };
        Ok(Self {
            ts,
            scope: scope.to_owned(),
            name,
            event,
            fields: m,
        })
    }
}

fn product() -> Product {
    Product {
        name: PRODUCT,
        vendor_name: PRODUCT,
        version: env!("CARGO_PKG_VERSION"),
    }
}

fn now_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fff...]Z`.
fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20 || b.get(4) != Some(&b'-') || b.get(10) != Some(&b'T') || !s.ends_with('Z') {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let frac = s.get(19..s.len() - 1)?;
    let ms = match frac.strip_prefix('.') {
        Some(f) if !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()) => {
            let digits: String = f.chars().chain("000".chars()).take(3).collect();
            digits.parse::<i64>().ok()?
        }
        None if frac.is_empty() => 0,
        _ => return None,
    };
    // days from civil (proleptic Gregorian)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms;
    u64::try_from(t).ok()
}

fn severity_name(id: u8) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        _ => "Unknown",
    }
}

/// Inside the mesh: a pod, a node, or an address in a mesh pod range.
fn inside(e: Option<&FlowEndpoint>) -> Option<bool> {
    match e?.kind.as_str() {
        "pod" | "node" | "unknown" => Some(true),
        "world" | "cidr" => Some(false),
        _ => None,
    }
}

fn direction(f: &Flow) -> (u8, &'static str) {
    match (inside(f.source.as_ref()), inside(f.destination.as_ref())) {
        (Some(true), Some(true)) => (3, "Lateral"),
        (Some(true), Some(false)) => (2, "Outbound"),
        (Some(false), Some(true)) => (1, "Inbound"),
        _ => (0, "Unknown"),
    }
}

fn protocol(f: &Flow) -> (Option<String>, Option<u8>) {
    match f.protocol.to_ascii_lowercase().as_str() {
        "tcp" => (Some("tcp".into()), Some(6)),
        "udp" => (Some("udp".into()), Some(17)),
        "icmp" => (Some("icmp".into()), Some(1)),
        "icmpv6" => (Some("ipv6-icmp".into()), Some(58)),
        other => (None, other.parse().ok()),
    }
}

fn ip(s: &str) -> Option<String> {
    s.parse::<IpAddr>().ok().map(|a| a.to_string())
}

fn network_endpoint(e: &FlowEndpoint, port: u32) -> NetworkEndpoint {
    let name = if !e.pod.is_empty() {
        Some(format!("{}/{}", e.namespace, e.pod))
    } else if e.kind == "node" && !e.node.is_empty() {
        Some(e.node.clone())
    } else {
        None
    };
    NetworkEndpoint {
        ip: ip(&e.ip),
        port: (1..=65535).contains(&port).then_some(port),
        name,
        svc_name: None,
    }
}

fn mesh_endpoint(e: &FlowEndpoint) -> MeshEndpoint {
    MeshEndpoint {
        kind: e.kind.clone(),
        identity: e.identity,
        cluster: e.cluster.clone(),
        node: e.node.clone(),
        namespace: e.namespace.clone(),
        pod: e.pod.clone(),
        labels: e.labels.clone(),
    }
}

fn mesh_service(s: &FlowService) -> MeshService {
    MeshService {
        frontend: s.frontend.clone(),
        port: s.port,
        cluster: s.cluster.clone(),
        namespace: s.namespace.clone(),
        name: s.name.clone(),
    }
}

/// (action_id, action, disposition_id, disposition, status_id, status, severity_id)
type Outcome = (u8, &'static str, u8, &'static str, u8, &'static str, u8);

fn outcome(verdict: &str) -> Outcome {
    match verdict {
        "dropped" => (2, "Denied", 6, "Dropped", 2, "Failure", 2),
        "audit" => (1, "Allowed", 17, "Logged", 1, "Success", 2),
        _ => (1, "Allowed", 1, "Allowed", 1, "Success", 1),
    }
}

fn observables(src: Option<&NetworkEndpoint>, dst: Option<&NetworkEndpoint>) -> Vec<Observable> {
    let mut v = Vec::new();
    for (name, e) in [("src_endpoint.ip", src), ("dst_endpoint.ip", dst)] {
        if let Some(ip) = e.and_then(|e| e.ip.clone()) {
            v.push(Observable {
                name,
                type_id: 2,
                type_name: "IP Address",
                value: ip,
            });
        }
    }
    v
}

/// The OCSF record of a flow (no filtering, no redaction).
pub fn network_activity(f: &Flow) -> NetworkActivity {
    let (action_id, action, disposition_id, disposition, status_id, status, severity_id) =
        outcome(&f.verdict);
    let src = f
        .source
        .as_ref()
        .map(|e| network_endpoint(e, f.source_port));
    let mut dst = f
        .destination
        .as_ref()
        .map(|e| network_endpoint(e, f.destination_port));
    if let (Some(d), Some(s)) = (dst.as_mut(), f.service.as_ref())
        && !s.name.is_empty()
    {
        d.svc_name = Some(format!("{}/{}", s.namespace, s.name));
    }
    let (direction_id, direction) = direction(f);
    let (protocol_name, protocol_num) = protocol(f);
    let (protocol_ver_id, protocol_ver) = match f.ip_version {
        4 => (4, Some("IPv4")),
        6 => (6, Some("IPv6")),
        _ => (0, None),
    };
    let time = match f.time_unix_nanos {
        0 => now_ms(),
        n => n / 1_000_000,
    };
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    NetworkActivity {
        class_uid: 4001,
        class_name: "Network Activity",
        category_uid: 4,
        category_name: "Network Activity",
        activity_id: 6,
        activity_name: "Traffic",
        type_uid: 400_106,
        type_name: "Network Activity: Traffic",
        time,
        severity_id,
        severity: severity_name(severity_id),
        action_id,
        action,
        disposition_id,
        disposition,
        status_id,
        status,
        status_detail: (f.verdict == "dropped")
            .then(|| nonempty(&f.drop_reason))
            .flatten(),
        metadata: Metadata {
            version: OCSF_VERSION,
            product: product(),
            log_name: "flows",
            uid: Some(format!("{}/{}/{}", f.cluster, f.node, f.sequence)),
            sequence: Some(f.sequence),
            original_time: nonempty(&f.time),
            profiles: vec!["host", "security_control"],
        },
        device: Device {
            type_id: 1,
            type_name: "Server",
            name: nonempty(&f.node),
        },
        observables: observables(src.as_ref(), dst.as_ref()),
        src_endpoint: src,
        dst_endpoint: dst,
        connection_info: ConnectionInfo {
            protocol_name,
            protocol_num,
            protocol_ver,
            protocol_ver_id,
            direction,
            direction_id,
        },
        traffic: Traffic {
            packets: f.packets,
            bytes: f.bytes,
        },
        unmapped: FlowUnmapped {
            cluster: f.cluster.clone(),
            event: f.event.clone(),
            verdict: f.verdict.clone(),
            drop_reason: f.drop_reason.clone(),
            datapath_disposition: f.disposition.clone(),
            direction: f.direction.clone(),
            encrypted: f.encrypted,
            tunnel: f.tunnel.clone(),
            service: f.service.as_ref().map(mesh_service),
            source: f.source.as_ref().map(mesh_endpoint),
            destination: f.destination.as_ref().map(mesh_endpoint),
        },
    }
}

/// Audit events worth more than Informational.
fn audit_severity(event: &str) -> u8 {
    match event {
        "plaintext_drops" => 3,
        "peer_key_changed" | "peer_removed" | "encryption_policy" => 2,
        _ => 1,
    }
}

/// The OCSF record of an audit-trail event.
pub fn device_config_state_change(r: &AuditRecord) -> DeviceConfigStateChange {
    let severity_id = audit_severity(&r.event);
    let is = |s: &str| (r.scope == s).then(|| r.name.clone());
    DeviceConfigStateChange {
        class_uid: 5019,
        class_name: "Device Config State Change",
        category_uid: 5,
        category_name: "Discovery",
        activity_id: 1,
        activity_name: "Log",
        type_uid: 501_901,
        type_name: "Device Config State Change: Log",
        time: parse_rfc3339_ms(&r.ts).unwrap_or_else(now_ms),
        severity_id,
        severity: severity_name(severity_id),
        status_id: 1,
        status: "Success",
        message: format!("clustermesh audit: {}", r.event),
        metadata: Metadata {
            version: OCSF_VERSION,
            product: product(),
            log_name: "audit",
            uid: None,
            sequence: None,
            original_time: Some(r.ts.clone()),
            profiles: vec!["host"],
        },
        device: Device {
            type_id: 1,
            type_name: "Server",
            name: Some(r.name.clone()),
        },
        unmapped: AuditUnmapped {
            event: r.event.clone(),
            node: is("node"),
            cluster: is("cluster"),
            fields: r.fields.clone(),
        },
    }
}

// ---- redaction ---------------------------------------------------------------

/// Paths that cannot be redacted: OCSF requires them (or, for
/// `unmapped.redacted`, the redaction itself is recorded there).
const PROTECTED: [&str; 17] = [
    "class_uid",
    "class_name",
    "category_uid",
    "category_name",
    "activity_id",
    "activity_name",
    "type_uid",
    "type_name",
    "time",
    "severity_id",
    "severity",
    "metadata",
    "device",
    "device.type_id",
    "device.type",
    "unmapped",
    "unmapped.redacted",
];

fn collect_paths(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            let p = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            // the audit fields vary by event: redactable as a whole only
            if p != "unmapped.fields" {
                collect_paths(&p, child, out);
            }
            out.insert(p);
        }
    }
}

/// A flow with every optional field set, for the set of output paths.
fn full_flow() -> Flow {
    let side = || FlowEndpoint {
        ip: "10.0.0.1".into(),
        identity: 1,
        cluster: "c".into(),
        node: "n".into(),
        namespace: "ns".into(),
        pod: "p".into(),
        labels: vec!["k8s:a=b".into()],
        kind: "pod".into(),
    };
    Flow {
        time_unix_nanos: 1,
        time: "t".into(),
        cluster: "c".into(),
        node: "n".into(),
        event: "drop".into(),
        verdict: "dropped".into(),
        drop_reason: "r".into(),
        disposition: "d".into(),
        direction: "egress".into(),
        ip_version: 4,
        protocol: "tcp".into(),
        source: Some(side()),
        destination: Some(side()),
        source_port: 1,
        destination_port: 1,
        tunnel: "vxlan".into(),
        service: Some(FlowService {
            frontend: "10.0.0.2".into(),
            port: 1,
            cluster: "c".into(),
            namespace: "ns".into(),
            name: "s".into(),
        }),
        ..Flow::default()
    }
}

/// Every path the schema can produce (flows and audit events), objects
/// and leaves, except `unmapped.redacted`; arrays and `unmapped.fields`
/// count as leaves. The set `--flow-export-redact` is checked against
/// (protected paths included: they are refused with their own reason).
pub fn schema_paths() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(v) = serde_json::to_value(network_activity(&full_flow())) {
        collect_paths("", &v, &mut out);
    }
    let audit = AuditRecord::new(("node", "n"), "e", Value::Null);
    if let Ok(v) = serde_json::to_value(device_config_state_change(&audit)) {
        collect_paths("", &v, &mut out);
    }
    let mut cluster_audit = audit;
    cluster_audit.scope = "cluster".into();
    if let Ok(v) = serde_json::to_value(device_config_state_change(&cluster_audit)) {
        collect_paths("", &v, &mut out);
    }
    out
}

/// The paths `--flow-export-redact` accepts.
pub fn redactable_paths() -> BTreeSet<String> {
    let mut s = schema_paths();
    s.retain(|p| !PROTECTED.contains(&p.as_str()) && !p.starts_with("metadata."));
    s
}

fn check_redact(paths: &[String]) -> Result<Vec<String>, ExportError> {
    let ok = redactable_paths();
    let mut out: Vec<String> = Vec::new();
    for p in paths {
        let p = p.trim();
        let err = |reason: &str| ExportError::Redact {
            path: p.to_owned(),
            reason: reason.to_owned(),
        };
        if PROTECTED.contains(&p) || p.starts_with("metadata.") {
            return Err(err("is required by OCSF and cannot be redacted"));
        }
        if !ok.contains(p) {
            return Err(err(
                "is not a field of the export schema (docs/observability.md)",
            ));
        }
        if !out.iter().any(|q| q == p) {
            out.push(p.to_owned());
        }
    }
    Ok(out)
}

/// Removes `path` from `v`; whether it was there.
fn remove_path(v: &mut Value, path: &str) -> bool {
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (Some(parent), last),
        None => (None, path),
    };
    let mut cur = v;
    if let Some(parent) = parent {
        for k in parent.split('.') {
            match cur.get_mut(k) {
                Some(next) => cur = next,
                None => return false,
            }
        }
    }
    cur.as_object_mut().and_then(|m| m.remove(last)).is_some()
}

/// Removes the redacted paths (and the observables naming them, or a
/// path under them), then lists what was removed in `unmapped.redacted`.
fn redact(v: &mut Value, paths: &[String]) {
    let mut removed = Vec::new();
    for p in paths {
        if remove_path(v, p) {
            removed.push(Value::String(p.clone()));
        }
    }
    let covered = |name: &str| {
        paths.iter().any(|p| {
            name == p
                || name
                    .strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('.'))
        })
    };
    if let Some(Value::Array(obs)) = v.get_mut("observables") {
        obs.retain(|o| !o.get("name").and_then(Value::as_str).is_some_and(covered));
    }
    if !removed.is_empty()
        && let Some(Value::Object(u)) = v.get_mut("unmapped")
    {
        u.insert("redacted".into(), Value::Array(removed));
    }
}

// ---- the writer --------------------------------------------------------------

/// What the exporter did since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ExportStats {
    /// Lines written (flows and audit events).
    pub written: u64,
    /// Flows the allow / deny filters left out.
    pub filtered: u64,
    pub rotations: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Writes (or rotations) that failed; each was also returned.
    pub write_errors: u64,
}

/// The SIEM export file.
pub struct Exporter {
    cfg: ExportConfig,
    redact: Vec<String>,
    file: Option<File>,
    /// The current file's length.
    size: u64,
    stats: ExportStats,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("path", &self.cfg.path)
            .field("size", &self.size)
            .field("stats", &self.stats)
            .finish()
    }
}

fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let len = f.metadata()?.len();
    Ok((f, len))
}

fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

impl Exporter {
    /// Checks the configuration (redaction paths, sizes), creates the
    /// parent directory and opens the file for appending (mode 0640).
    pub fn open(cfg: ExportConfig) -> Result<Self, ExportError> {
        if cfg.max_bytes == 0 {
            return Err(ExportError::Config("max bytes must be above 0".into()));
        }
        let redact = check_redact(&cfg.redact)?;
        let io_err = |source| ExportError::Io {
            path: cfg.path.clone(),
            source,
        };
        if let Some(parent) = cfg.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err)?;
        }
        let (file, size) = open_append(&cfg.path).map_err(io_err)?;
        Ok(Self {
            redact,
            file: Some(file),
            size,
            stats: ExportStats::default(),
            cfg,
        })
    }

    /// Writes `flow` if the filters select it; `Ok(false)`: filtered out.
    pub fn flow(&mut self, flow: &Flow) -> io::Result<bool> {
        let allowed = self.cfg.allow.is_empty() || self.cfg.allow.iter().any(|f| f.matches(flow));
        if !allowed || self.cfg.deny.iter().any(|f| f.matches(flow)) {
            self.stats.filtered += 1;
            return Ok(false);
        }
        let line = self.line(&network_activity(flow))?;
        self.write_line(&line)?;
        Ok(true)
    }

    /// Writes an audit-trail event (never filtered; redaction applies).
    pub fn audit(&mut self, record: &AuditRecord) -> io::Result<()> {
        let line = self.line(&device_config_state_change(record))?;
        self.write_line(&line)
    }

    pub fn stats(&self) -> ExportStats {
        self.stats
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    fn line<T: Serialize>(&mut self, record: &T) -> io::Result<Vec<u8>> {
        let out = if self.redact.is_empty() {
            serde_json::to_vec(record)
        } else {
            serde_json::to_value(record).and_then(|mut v| {
                redact(&mut v, &self.redact);
                serde_json::to_vec(&v)
            })
        };
        match out {
            Ok(mut l) => {
                l.push(b'\n');
                Ok(l)
            }
            Err(e) => {
                self.stats.write_errors += 1;
                Err(io::Error::other(e))
            }
        }
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let r = self.try_write(line);
        if r.is_err() {
            self.stats.write_errors += 1;
        }
        r
    }

    fn try_write(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if self.size > 0 && self.size.saturating_add(len) > self.cfg.max_bytes {
            self.rotate()?;
        }
        if self.file.is_none() {
            let (f, size) = open_append(&self.cfg.path)?;
            self.file = Some(f);
            self.size = size;
        }
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("flow export file not open"));
        };
        if let Err(e) = f.write_all(line) {
            // cut a partial line off: the file ends with a full line
            let _ = f.set_len(self.size);
            return Err(e);
        }
        self.size += len;
        self.stats.written += 1;
        self.stats.bytes += len;
        Ok(())
    }

    /// `path.{N-1}` -> `path.N` (the oldest is replaced) ... `path` ->
    /// `path.1`, then a new `path`. With `max_files` 0 the file is removed.
    fn rotate(&mut self) -> io::Result<()> {
        let path = self.cfg.path.clone();
        let n = self.cfg.max_files;
        if n == 0 {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            match std::fs::remove_file(rotated(&path, n)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            for i in (1..n).rev() {
                rename_if_exists(&rotated(&path, i), &rotated(&path, i + 1))?;
            }
            rename_if_exists(&path, &rotated(&path, 1))?;
        }
        // the old file is gone: a failed open below retries on the next
        // write without rotating again
        self.file = None;
        self.size = 0;
        self.stats.rotations += 1;
        let (f, size) = open_append(&path)?;
        self.file = Some(f);
        self.size = size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    // the schema mirror below reads every field (deny_unknown_fields);
    // the tests assert the ones that matter
    #![allow(clippy::unwrap_used, dead_code)]
    use super::*;
    use serde::Deserialize;

    // ---- a strict mirror of the documented schema ----------------------

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MProduct {
        name: String,
        vendor_name: String,
        version: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MMetadata {
        version: String,
        product: MProduct,
        log_name: String,
        uid: Option<String>,
        sequence: Option<u64>,
        original_time: Option<String>,
        profiles: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MDevice {
        type_id: u8,
        #[serde(rename = "type")]
        type_name: String,
        name: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MEndpoint {
        ip: Option<IpAddr>,
        port: Option<u16>,
        name: Option<String>,
        svc_name: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MConnection {
        protocol_name: Option<String>,
        protocol_num: Option<u8>,
        protocol_ver: Option<String>,
        protocol_ver_id: u8,
        direction: String,
        direction_id: u8,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MTraffic {
        packets: u64,
        bytes: u64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MObservable {
        name: String,
        type_id: u8,
        #[serde(rename = "type")]
        type_name: String,
        value: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MMesh {
        kind: String,
        identity: u32,
        cluster: Option<String>,
        node: Option<String>,
        namespace: Option<String>,
        pod: Option<String>,
        labels: Option<Vec<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MService {
        frontend: IpAddr,
        port: u16,
        cluster: String,
        namespace: String,
        name: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MFlowUnmapped {
        cluster: String,
        event: String,
        verdict: String,
        drop_reason: Option<String>,
        datapath_disposition: Option<String>,
        direction: Option<String>,
        encrypted: bool,
        tunnel: Option<String>,
        service: Option<MService>,
        source: Option<MMesh>,
        destination: Option<MMesh>,
        redacted: Option<Vec<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MNetworkActivity {
        class_uid: u32,
        class_name: String,
        category_uid: u32,
        category_name: String,
        activity_id: u32,
        activity_name: String,
        type_uid: u32,
        type_name: String,
        time: u64,
        severity_id: u8,
        severity: String,
        action_id: u8,
        action: String,
        disposition_id: u8,
        disposition: String,
        status_id: u8,
        status: String,
        status_detail: Option<String>,
        metadata: MMetadata,
        device: MDevice,
        src_endpoint: Option<MEndpoint>,
        dst_endpoint: Option<MEndpoint>,
        connection_info: MConnection,
        traffic: MTraffic,
        observables: Vec<MObservable>,
        unmapped: MFlowUnmapped,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MAuditUnmapped {
        event: String,
        node: Option<String>,
        cluster: Option<String>,
        fields: Option<Map<String, Value>>,
        redacted: Option<Vec<String>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MConfigChange {
        class_uid: u32,
        class_name: String,
        category_uid: u32,
        category_name: String,
        activity_id: u32,
        activity_name: String,
        type_uid: u32,
        type_name: String,
        time: u64,
        severity_id: u8,
        severity: String,
        status_id: u8,
        status: String,
        message: String,
        metadata: MMetadata,
        device: MDevice,
        unmapped: MAuditUnmapped,
    }

    enum Line {
        Flow(Box<MNetworkActivity>),
        Audit(Box<MConfigChange>),
    }

    fn parse(line: &str) -> Line {
        let v: Value = serde_json::from_str(line).unwrap();
        match v["class_uid"].as_u64() {
            Some(4001) => Line::Flow(Box::new(serde_json::from_value(v).unwrap())),
            Some(5019) => Line::Audit(Box::new(serde_json::from_value(v).unwrap())),
            other => panic!("class {other:?} in {line}"),
        }
    }

    fn lines(path: &Path) -> Vec<Line> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(parse)
            .collect()
    }

    fn flows(path: &Path) -> Vec<MNetworkActivity> {
        lines(path)
            .into_iter()
            .filter_map(|l| match l {
                Line::Flow(f) => Some(*f),
                Line::Audit(_) => None,
            })
            .collect()
    }

    // ---- flows ---------------------------------------------------------

    fn ep(ip: &str, cluster: &str, ns: &str, pod: &str, identity: u32) -> FlowEndpoint {
        FlowEndpoint {
            ip: ip.into(),
            identity,
            cluster: cluster.into(),
            node: format!("{cluster}-node"),
            namespace: ns.into(),
            pod: pod.into(),
            labels: vec![format!("k8s:app={pod}")],
            kind: "pod".into(),
        }
    }

    fn forwarded_v4(seq: u64) -> Flow {
        Flow {
            time_unix_nanos: 1_700_000_000_123_456_789,
            time: "2023-11-14T22:13:20.123456789Z".into(),
            cluster: "c1".into(),
            node: "node-1".into(),
            sequence: seq,
            event: "trace".into(),
            verdict: "forwarded".into(),
            drop_reason: String::new(),
            disposition: "tunnel".into(),
            direction: "egress".into(),
            ip_version: 4,
            protocol: "tcp".into(),
            source: Some(ep("10.1.1.5", "c1", "default", "frontend", 4242)),
            destination: Some(ep("10.2.1.7", "c2", "prod", "web", 5151)),
            source_port: 40000,
            destination_port: 8080,
            encrypted: true,
            tunnel: "wireguard".into(),
            service: Some(FlowService {
                frontend: "10.96.0.10".into(),
                port: 80,
                cluster: "c2".into(),
                namespace: "prod".into(),
                name: "web".into(),
            }),
            packets: 3,
            bytes: 420,
        }
    }

    fn dropped_v6(seq: u64) -> Flow {
        Flow {
            time_unix_nanos: 1_700_000_001_000_000_000,
            time: "2023-11-14T22:13:21Z".into(),
            cluster: "c1".into(),
            node: "node-1".into(),
            sequence: seq,
            event: "drop".into(),
            verdict: "dropped".into(),
            drop_reason: "policy_denied".into(),
            disposition: "policy_denied".into(),
            direction: "ingress".into(),
            ip_version: 6,
            protocol: "udp".into(),
            source: Some(FlowEndpoint {
                ip: "2001:db8::1".into(),
                kind: "world".into(),
                ..FlowEndpoint::default()
            }),
            destination: Some(ep("fd00:10:1::5", "c1", "prod", "db", 7000)),
            source_port: 5353,
            destination_port: 53,
            encrypted: false,
            packets: 1,
            bytes: 80,
            ..Flow::default()
        }
    }

    fn audit_v4(seq: u64) -> Flow {
        Flow {
            event: "audit".into(),
            verdict: "audit".into(),
            drop_reason: "policy_denied".into(),
            protocol: "icmp".into(),
            source_port: 0,
            destination_port: 0,
            service: None,
            encrypted: false,
            ..forwarded_v4(seq)
        }
    }

    fn cfg(dir: &Path) -> ExportConfig {
        ExportConfig::new(dir.join("export/flows.ocsf.jsonl"))
    }

    #[test]
    fn every_line_is_the_documented_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Exporter::open(cfg(dir.path())).unwrap();
        for f in [forwarded_v4(1), dropped_v6(2), audit_v4(3)] {
            assert!(x.flow(&f).unwrap());
        }
        x.flow(&Flow::default()).unwrap(); // empty: still a valid line
        let rec = AuditRecord::new(
            ("node", "node-1"),
            "peer_added",
            serde_json::json!({"peer": "c2/n", "key": "ab12"}),
        );
        x.audit(&rec).unwrap();
        let path = x.path().to_owned();
        drop(x);
        let all = lines(&path);
        assert_eq!(all.len(), 5);
        let Line::Flow(fwd) = &all[0] else { panic!() };
        assert_eq!(
            (
                fwd.class_uid,
                fwd.category_uid,
                fwd.activity_id,
                fwd.type_uid
            ),
            (4001, 4, 6, 400_106)
        );
        assert_eq!(
            (fwd.action_id, fwd.disposition_id, fwd.status_id),
            (1, 1, 1)
        );
        assert_eq!(fwd.time, 1_700_000_000_123);
        assert_eq!(fwd.metadata.version, OCSF_VERSION);
        assert_eq!(fwd.metadata.uid.as_deref(), Some("c1/node-1/1"));
        assert_eq!(fwd.metadata.sequence, Some(1));
        assert_eq!(fwd.device.name.as_deref(), Some("node-1"));
        let src = fwd.src_endpoint.as_ref().unwrap();
        assert_eq!(src.ip, Some("10.1.1.5".parse().unwrap()));
        assert_eq!(
            (src.port, src.name.as_deref()),
            (Some(40000), Some("default/frontend"))
        );
        let dst = fwd.dst_endpoint.as_ref().unwrap();
        assert_eq!(dst.svc_name.as_deref(), Some("prod/web"));
        assert_eq!(
            (
                fwd.connection_info.protocol_num,
                fwd.connection_info.protocol_ver_id
            ),
            (Some(6), 4)
        );
        assert_eq!(
            (
                fwd.connection_info.direction_id,
                fwd.connection_info.direction.as_str()
            ),
            (3, "Lateral")
        );
        assert_eq!((fwd.traffic.packets, fwd.traffic.bytes), (3, 420));
        assert_eq!(fwd.observables.len(), 2);
        let u = &fwd.unmapped;
        assert!(u.encrypted);
        assert_eq!(
            (u.cluster.as_str(), u.tunnel.as_deref()),
            ("c1", Some("wireguard"))
        );
        assert_eq!(u.source.as_ref().unwrap().cluster.as_deref(), Some("c1"));
        assert_eq!(
            u.destination.as_ref().unwrap().cluster.as_deref(),
            Some("c2")
        );
        assert_eq!(u.destination.as_ref().unwrap().pod.as_deref(), Some("web"));
        assert_eq!(u.source.as_ref().unwrap().identity, 4242);
        assert_eq!(u.service.as_ref().unwrap().port, 80);

        check_drop_audit_and_empty(&all);
    }

    /// The second half of `every_line_is_the_documented_schema`.
    fn check_drop_audit_and_empty(all: &[Line]) {
        let Line::Flow(drop) = &all[1] else { panic!() };
        assert_eq!((drop.action_id, drop.action.as_str()), (2, "Denied"));
        assert_eq!((drop.disposition_id, drop.status_id), (6, 2));
        assert_eq!(drop.status_detail.as_deref(), Some("policy_denied"));
        assert_eq!(drop.unmapped.drop_reason.as_deref(), Some("policy_denied"));
        assert!(!drop.unmapped.encrypted && drop.unmapped.service.is_none());
        assert_eq!(
            drop.src_endpoint.as_ref().unwrap().ip,
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(drop.connection_info.protocol_ver_id, 6);
        assert_eq!(
            (
                drop.connection_info.direction_id,
                drop.connection_info.protocol_num
            ),
            (1, Some(17))
        );
        assert_eq!(
            drop.unmapped.destination.as_ref().unwrap().pod.as_deref(),
            Some("db")
        );

        let Line::Flow(aud) = &all[2] else { panic!() };
        assert_eq!(
            (aud.action_id, aud.disposition_id, aud.status_id),
            (1, 17, 1)
        );
        assert_eq!(aud.status_detail, None);
        assert_eq!(aud.unmapped.drop_reason.as_deref(), Some("policy_denied"));
        assert_eq!(aud.src_endpoint.as_ref().unwrap().port, None);

        let Line::Flow(empty) = &all[3] else { panic!() };
        assert!(empty.src_endpoint.is_none() && empty.time > 0);

        let Line::Audit(a) = &all[4] else { panic!() };
        assert_eq!(
            (a.class_uid, a.category_uid, a.activity_id, a.type_uid),
            (5019, 5, 1, 501_901)
        );
        assert_eq!(a.unmapped.event, "peer_added");
        assert_eq!(a.unmapped.node.as_deref(), Some("node-1"));
        assert_eq!(a.unmapped.fields.as_ref().unwrap()["peer"], "c2/n");
        assert_eq!(a.metadata.log_name, "audit");
        assert!(a.time > 1_700_000_000_000);
    }

    #[test]
    fn rotation_keeps_at_most_max_files_and_loses_only_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.max_bytes = 4096;
        c.max_files = 2;
        let path = c.path.clone();
        let mut x = Exporter::open(c).unwrap();
        for seq in 1..=200 {
            let f = if seq % 3 == 0 {
                dropped_v6(seq)
            } else {
                forwarded_v4(seq)
            };
            x.flow(&f).unwrap();
        }
        let st = x.stats();
        assert_eq!(st.written, 200);
        assert!(st.rotations >= 3, "{st:?}");
        drop(x);
        let files: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(!rotated(&path, 3).exists());
        let mut seqs = Vec::new();
        for p in [rotated(&path, 2), rotated(&path, 1), path.clone()] {
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len <= 4096 && len > 0, "{} is {len}", p.display());
            seqs.extend(flows(&p).iter().map(|f| f.metadata.sequence.unwrap()));
        }
        assert_eq!(
            *seqs.last().unwrap(),
            200,
            "the newest flow is in the current file"
        );
        assert!(seqs[0] > 1, "the oldest files were deleted");
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0] + 1, "a gap in {seqs:?}");
        }
        // reopening appends to the current file
        let before = std::fs::metadata(&path).unwrap().len();
        let mut c = cfg(dir.path());
        c.max_bytes = 1 << 20;
        let mut x = Exporter::open(c).unwrap();
        x.flow(&forwarded_v4(201)).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > before);
    }

    #[test]
    fn a_line_above_max_bytes_is_alone_in_its_file_and_max_files_zero_keeps_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.max_bytes = 100;
        c.max_files = 0;
        let path = c.path.clone();
        let mut x = Exporter::open(c).unwrap();
        for seq in 1..=3 {
            x.flow(&forwarded_v4(seq)).unwrap();
        }
        assert_eq!(x.stats().rotations, 2);
        let kept = flows(&path);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].metadata.sequence, Some(3));
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn allow_and_deny_filters_select_flows() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        let f = |s: &str| Filter::from_proto(&parse_filter(s).unwrap()).unwrap();
        c.allow = vec![f("verdict=dropped"), f("to-cluster=c2,port=8080")];
        c.deny = vec![f("protocol=udp,from-ip=2001:db8::1")];
        let mut x = Exporter::open(c).unwrap();
        assert!(
            x.flow(&forwarded_v4(1)).unwrap(),
            "allowed by the second filter"
        );
        assert!(!x.flow(&dropped_v6(2)).unwrap(), "allowed, then denied");
        assert!(
            !x.flow(&audit_v4(3)).unwrap(),
            "port 0: no allow filter matches"
        );
        let mut d = dropped_v6(4);
        d.source.as_mut().unwrap().ip = "2001:db8::2".into();
        assert!(x.flow(&d).unwrap());
        let st = x.stats();
        assert_eq!((st.written, st.filtered), (2, 2));
        let seqs: Vec<u64> = flows(x.path())
            .iter()
            .map(|f| f.metadata.sequence.unwrap())
            .collect();
        assert_eq!(seqs, [1, 4]);
    }

    #[test]
    fn parse_filter_reads_every_key_and_names_bad_ones() {
        let f = parse_filter(
            "from-pod=default/a,to-pod=b,from-cluster=c1,to-cluster=c2,namespace=ns,\
             label=k8s:app=web,verdict=dropped,drop-reason=policy_denied,port=53,port=443,\
             protocol=UDP,encrypted=false,from-ip=10.0.0.1,to-ip=fd00::1",
        )
        .unwrap();
        assert_eq!(f.from_pod, ["default/a"]);
        assert_eq!(f.label, ["k8s:app=web"]);
        assert_eq!(f.port, [53, 443]);
        assert_eq!(f.encrypted, Some(false));
        assert_eq!(f.to_ip, ["fd00::1"]);
        for (bad, names) in [
            ("", "empty"),
            ("verdict", "verdict"),
            ("colour=red", "colour"),
            ("port=http", "port"),
            ("port=70000", "port"),
            ("encrypted=yes", "encrypted"),
            ("encrypted=true,encrypted=false", "encrypted"),
            ("verdict=allowed", "verdict"),
            ("from-pod=a/b/c", "from-pod"),
            ("label=app", "label"),
            ("protocol=sctpx", "protocol"),
            ("to-ip=10.0.0", "to-ip"),
            ("namespace=", "namespace"),
        ] {
            let e = parse_filter(bad).unwrap_err();
            assert!(e.contains(names), "{bad:?}: {e}");
        }
    }

    #[test]
    fn redaction_removes_fields_and_their_observables() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.redact = vec![
            "src_endpoint.ip".into(),
            "unmapped.source.labels".into(),
            "unmapped.destination".into(),
            "unmapped.fields".into(),
        ];
        let mut x = Exporter::open(c).unwrap();
        x.flow(&forwarded_v4(1)).unwrap();
        x.audit(&AuditRecord::new(
            ("node", "n1"),
            "peer_added",
            serde_json::json!({"peer": "x"}),
        ))
        .unwrap();
        let text = std::fs::read_to_string(x.path()).unwrap();
        assert!(
            !text.contains("10.1.1.5") && !text.contains("k8s:app=frontend"),
            "{text}"
        );
        let all = lines(x.path());
        let Line::Flow(f) = &all[0] else { panic!() };
        assert!(f.src_endpoint.as_ref().unwrap().ip.is_none());
        assert_eq!(f.src_endpoint.as_ref().unwrap().port, Some(40000));
        assert!(f.unmapped.destination.is_none());
        assert!(f.unmapped.source.as_ref().unwrap().labels.is_none());
        let names: Vec<&str> = f.observables.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["dst_endpoint.ip"]);
        assert_eq!(
            f.unmapped.redacted.as_deref().unwrap(),
            [
                "src_endpoint.ip",
                "unmapped.source.labels",
                "unmapped.destination"
            ]
        );
        let Line::Audit(a) = &all[1] else { panic!() };
        assert!(a.unmapped.fields.is_none());
        assert_eq!(a.unmapped.redacted.as_deref().unwrap(), ["unmapped.fields"]);
    }

    #[test]
    fn redacting_an_unknown_or_required_path_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        for (p, why) in [
            ("src_endpoint.mac", "not a field"),
            ("unmapped.source.lables", "not a field"),
            ("unmapped.fields.peer", "not a field"),
            ("class_uid", "required"),
            ("metadata.product.name", "required"),
            ("unmapped.redacted", "required"),
        ] {
            let mut c = cfg(dir.path());
            c.redact = vec![p.into()];
            let e = Exporter::open(c).unwrap_err().to_string();
            assert!(e.contains(p) && e.contains(why), "{p}: {e}");
        }
        let mut c = cfg(dir.path());
        c.max_bytes = 0;
        assert!(Exporter::open(c).is_err());
    }

    #[test]
    fn audit_lines_parse_into_records() {
        let r = AuditRecord::parse_line(
            r#"{"ts":"2026-11-26T11:03:46.467Z","node":"node-1","event":"plaintext_drops","egress":3}"#,
        )
        .unwrap();
        assert_eq!(
            (r.scope.as_str(), r.name.as_str(), r.event.as_str()),
            ("node", "node-1", "plaintext_drops")
        );
        assert_eq!(r.fields["egress"], 3);
        let o = device_config_state_change(&r);
        assert_eq!(o.time, 1_795_691_026_467);
        assert_eq!(o.severity_id, 3);
        let c = AuditRecord::parse_line(
            r#"{"ts":"2000-02-29T00:00:00.000Z","cluster":"c1","event":"api_call"}"#,
        )
        .unwrap();
        assert_eq!(
            device_config_state_change(&c).unmapped.cluster.as_deref(),
            Some("c1")
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00.000Z"),
            Some(951_782_400_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2023-11-14T22:13:20.5Z"),
            Some(1_700_000_000_500)
        );
        for bad in ["", "[]", r#"{"ts":"x"}"#, r#"{"ts":"x","event":"e"}"#] {
            assert!(AuditRecord::parse_line(bad).is_err(), "{bad}");
        }
        for bad in [
            "2023-13-14T22:13:20Z",
            "2023-11-14 22:13:20Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn odd_flows_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Exporter::open(cfg(dir.path())).unwrap();
        let mut f = forwarded_v4(u64::MAX);
        f.time_unix_nanos = u64::MAX;
        f.protocol = "999".into();
        f.ip_version = 17;
        f.source.as_mut().unwrap().ip = "not an ip".into();
        f.destination.as_mut().unwrap().kind = "???".into();
        f.source_port = u32::MAX;
        f.time = "\u{0}\"\\".into();
        assert!(x.flow(&f).unwrap());
        let v: Value =
            serde_json::from_str(std::fs::read_to_string(x.path()).unwrap().trim()).unwrap();
        assert!(v["src_endpoint"].get("ip").is_none());
        assert!(v["connection_info"].get("protocol_num").is_none());
        assert_eq!(v["connection_info"]["direction_id"], 0);
    }

    #[test]
    fn a_failed_write_is_returned_and_counted() {
        let Ok(mut x) = Exporter::open(ExportConfig::new("/dev/full")) else {
            return; // no /dev/full here
        };
        assert!(x.flow(&forwarded_v4(1)).is_err());
        assert!(
            x.audit(&AuditRecord::new(("node", "n"), "e", Value::Null))
                .is_err()
        );
        let st = x.stats();
        assert_eq!((st.written, st.write_errors, st.bytes), (0, 2, 0));
    }

    #[test]
    fn the_docs_list_every_output_path() {
        let doc = include_str!("../../../docs/observability.md");
        for p in schema_paths() {
            assert!(
                doc.contains(&format!("`{p}`")),
                "docs/observability.md does not list `{p}`"
            );
        }
        assert!(doc.contains("`unmapped.redacted`"));
    }
}
