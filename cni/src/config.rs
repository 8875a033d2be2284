//! The network configuration the runtime passes on stdin, decoded in three
//! steps so that each failure gets the right CNI code:
//!
//! 1. JSON syntax ([`ConfigError::Decode`], code 6);
//! 2. `cniVersion` against [`SUPPORTED_VERSIONS`] before anything else,
//!    because a config of another version may have another shape
//!    ([`ConfigError::Version`], code 1);
//! 3. the typed shape with `serde_path_to_error`, so a wrong type names its
//!    JSON path (code 6), then the values ([`ConfigError::Invalid`], code 7,
//!    naming the field).
//!
//! Unknown fields are ignored, as the spec's conventions expect (runtimes
//! add `runtimeConfig`, `capabilities`, ... and the `ipam` object belongs
//! to the IPAM plugin).

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::Deserialize;

use crate::{
    error::code,
    ipam::{CidrError, Ipv4Cidr, Ipv6Cidr, Pools},
};

/// The versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Where endpoint files and the address leases live unless `endpointDir` says otherwise.
pub const DEFAULT_ENDPOINT_DIR: &str = "/var/run/clustermesh/endpoints";
/// 1500 minus the 50 bytes VXLAN or Geneve add.
pub const DEFAULT_MTU: u32 = 1450;
/// How long ADD waits for the node agent to attach the pod's datapath
/// (`readyTimeoutSeconds`).
pub const DEFAULT_READY_TIMEOUT_S: u64 = 30;
/// The smallest MTU IPv6 works with (RFC 8200).
pub const IPV6_MIN_MTU: u32 = 1280;

/// A supported `cniVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const LATEST: Self = Self::V1_1_0;

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "0.3.0" => Self::V0_3_0,
            "0.3.1" => Self::V0_3_1,
            "0.4.0" => Self::V0_4_0,
            "1.0.0" => Self::V1_0_0,
            "1.1.0" => Self::V1_1_0,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists since 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// STATUS and GC exist since 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }

    /// Results before 1.0.0 carry `"version": "4"` in each IP.
    pub fn ips_have_version(self) -> bool {
        self < Self::V1_0_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot decode the network configuration{}: {source}", at(path))]
    Decode {
        /// JSON path of the offending value (`.` for the document).
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("incompatible CNI version: cniVersion {got:?} is not one of {SUPPORTED_VERSIONS:?}")]
    Version { got: String },
    #[error("network configuration field {field}: {reason}")]
    Invalid { field: String, reason: Reason },
}

impl ConfigError {
    pub fn code(&self) -> u32 {
        match self {
            Self::Decode { .. } => code::DECODE,
            Self::Version { .. } => code::INCOMPATIBLE_VERSION,
            Self::Invalid { .. } => code::INVALID_CONFIG,
        }
    }

    /// The JSON path or field the error is about.
    pub fn field(&self) -> &str {
        match self {
            Self::Decode { path, .. } => path,
            Self::Version { .. } => "cniVersion",
            Self::Invalid { field, .. } => field,
        }
    }

    fn invalid(field: impl Into<String>, reason: Reason) -> Self {
        Self::Invalid {
            field: field.into(),
            reason,
        }
    }
}

/// What is wrong with a field's value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Reason {
    #[error("required")]
    Missing,
    #[error("required unless podCIDRv6 or ipam.type is given")]
    NoPool,
    #[error("must start with a letter or digit, followed by letters, digits, '_', '.' or '-'")]
    BadName,
    #[error("{0}")]
    Cidr(#[from] CidrError),
    #[error("{got} is out of range {min}..={max}")]
    OutOfRange { got: u32, min: u32, max: u32 },
    #[error("must be an absolute path")]
    NotAbsolute,
    #[error("must be a plugin file name (no '/', not '.' or '..')")]
    BadPluginName,
    #[error("is empty")]
    Empty,
    #[error("duplicate label key {0:?}")]
    DuplicateLabel(String),
}

/// How addresses are handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipam {
    /// This plugin's own allocator over `podCIDR` and/or `podCIDRv6`.
    Own(Pools),
    /// The standard IPAM plugin named by `ipam.type`, found in `CNI_PATH`.
    Delegate { plugin: String },
}

/// A validated network configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub version: CniVersion,
    pub name: String,
    pub endpoint_dir: PathBuf,
    pub mtu: u32,
    pub ipam: Ipam,
    /// From `args.cni.labels`.
    pub labels: BTreeMap<String, String>,
    /// `readyTimeoutSeconds`: ADD leaves the host veth down and returns only
    /// once the agent has attached the datapath and set it up (fail
    /// closed), or fails after this long. `0` (not for production): the
    /// plugin sets the veth up itself and returns at once, so the pod's
    /// first packets may reach the host stack before the datapath is
    /// attached.
    pub ready_timeout: std::time::Duration,
    /// `prevResult` (CHECK and DEL), reduced to what CHECK compares.
    pub prev_result: Option<PrevResult>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "podCIDRv6")]
    pod_cidr_v6: Option<String>,
    endpoint_dir: Option<String>,
    mtu: Option<u32>,
    ready_timeout_seconds: Option<u64>,
    ipam: Option<RawIpam>,
    args: Option<RawArgs>,
    prev_result: Option<PrevResult>,
}

#[derive(Deserialize)]
struct RawIpam {
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct RawArgs {
    cni: Option<RawCniArgs>,
}

#[derive(Deserialize)]
struct RawCniArgs {
    labels: Option<Vec<RawLabel>>,
}

#[derive(Deserialize)]
struct RawLabel {
    key: String,
    value: String,
}

/// The parts of a previous result that CHECK compares against the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<PrevInterface>,
    #[serde(default)]
    pub ips: Vec<PrevIp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PrevInterface {
    pub name: String,
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PrevIp {
    pub address: String,
}

/// The requested `cniVersion` if the input is JSON with a supported one;
/// used to label error output even when the rest of the config is bad.
pub fn requested_version(stdin: &[u8]) -> Option<CniVersion> {
    let v: serde_json::Value = serde_json::from_slice(stdin).ok()?;
    CniVersion::parse(v.get("cniVersion")?.as_str()?)
}

impl Config {
    /// Decodes and validates a network configuration.
    pub fn parse(stdin: &[u8]) -> Result<Self, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_slice(stdin).map_err(|source| ConfigError::Decode {
                path: ".".into(),
                source,
            })?;
        if !value.is_object() {
            use serde::de::{Error as _, Unexpected};
            let got = match &value {
                serde_json::Value::Null => Unexpected::Unit,
                serde_json::Value::Bool(b) => Unexpected::Bool(*b),
                serde_json::Value::Number(_) => Unexpected::Other("a number"),
                serde_json::Value::String(s) => Unexpected::Str(s),
                serde_json::Value::Array(_) => Unexpected::Seq,
                serde_json::Value::Object(_) => Unexpected::Map,
            };
            return Err(ConfigError::Decode {
                path: ".".into(),
                source: serde_json::Error::invalid_type(got, &"a JSON object"),
            });
        }
        let version = match value.get("cniVersion") {
            None | Some(serde_json::Value::Null) => {
                return Err(ConfigError::invalid("cniVersion", Reason::Missing));
            }
            Some(serde_json::Value::String(s)) => {
                CniVersion::parse(s).ok_or_else(|| ConfigError::Version { got: s.clone() })?
            }
            Some(other) => {
                return Err(ConfigError::Version {
                    got: other.to_string(),
                });
            }
        };
        Self::validate(version, decode(value)?)
    }

    fn validate(version: CniVersion, raw: RawConfig) -> Result<Self, ConfigError> {
        let name = raw
            .name
            .ok_or_else(|| ConfigError::invalid("name", Reason::Missing))?;
        if !valid_network_name(&name) {
            return Err(ConfigError::invalid("name", Reason::BadName));
        }
        match raw.kind.as_deref() {
            None => return Err(ConfigError::invalid("type", Reason::Missing)),
            Some("") => return Err(ConfigError::invalid("type", Reason::Empty)),
            Some(_) => {}
        }
        let ipam = validate_ipam(
            raw.pod_cidr.as_deref(),
            raw.pod_cidr_v6.as_deref(),
            raw.ipam,
        )?;
        let endpoint_dir = PathBuf::from(
            raw.endpoint_dir
                .unwrap_or_else(|| DEFAULT_ENDPOINT_DIR.to_owned()),
        );
        if !endpoint_dir.is_absolute() {
            return Err(ConfigError::invalid("endpointDir", Reason::NotAbsolute));
        }
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        // 68 is IPv4's minimum; 65535 is the largest a veth takes.
        if !(68..=65535).contains(&mtu) {
            return Err(ConfigError::invalid(
                "mtu",
                Reason::OutOfRange {
                    got: mtu,
                    min: 68,
                    max: 65535,
                },
            ));
        }
        // IPv6 needs 1280: the kernel turns IPv6 off on a smaller link.
        if matches!(&ipam, Ipam::Own(Pools { v6: Some(_), .. })) && mtu < IPV6_MIN_MTU {
            return Err(ConfigError::invalid(
                "mtu",
                Reason::OutOfRange {
                    got: mtu,
                    min: IPV6_MIN_MTU,
                    max: 65535,
                },
            ));
        }
        let mut labels = BTreeMap::new();
        let raw_labels = raw
            .args
            .and_then(|a| a.cni)
            .and_then(|c| c.labels)
            .unwrap_or_default();
        for (i, l) in raw_labels.into_iter().enumerate() {
            if l.key.is_empty() {
                return Err(ConfigError::invalid(
                    format!("args.cni.labels[{i}].key"),
                    Reason::Empty,
                ));
            }
            if labels.contains_key(&l.key) {
                return Err(ConfigError::invalid(
                    format!("args.cni.labels[{i}].key"),
                    Reason::DuplicateLabel(l.key),
                ));
            }
            labels.insert(l.key, l.value);
        }
        let ready = raw.ready_timeout_seconds.unwrap_or(DEFAULT_READY_TIMEOUT_S);
        if ready > 600 {
            return Err(ConfigError::invalid(
                "readyTimeoutSeconds",
                Reason::OutOfRange {
                    got: u32::try_from(ready).unwrap_or(u32::MAX),
                    min: 0,
                    max: 600,
                },
            ));
        }
        Ok(Self {
            version,
            name,
            endpoint_dir,
            mtu,
            ready_timeout: std::time::Duration::from_secs(ready),
            ipam,
            labels,
            prev_result: raw.prev_result,
        })
    }
}

/// The address management `podCIDR`, `podCIDRv6` and `ipam.type` ask for:
/// a delegate wins (the ranges are still validated); else at least one range.
fn validate_ipam(
    pod_cidr: Option<&str>,
    pod_cidr_v6: Option<&str>,
    ipam: Option<RawIpam>,
) -> Result<Ipam, ConfigError> {
    let v4 = pod_cidr
        .map(Ipv4Cidr::parse_pool)
        .transpose()
        .map_err(|e| ConfigError::invalid("podCIDR", e.into()))?;
    let v6 = pod_cidr_v6
        .map(Ipv6Cidr::parse_pool)
        .transpose()
        .map_err(|e| ConfigError::invalid("podCIDRv6", e.into()))?;
    match ipam.and_then(|i| i.kind) {
        Some(plugin) => {
            if plugin.is_empty()
                || plugin == "."
                || plugin == ".."
                || plugin.contains('/')
                || plugin.contains('\0')
            {
                return Err(ConfigError::invalid("ipam.type", Reason::BadPluginName));
            }
            Ok(Ipam::Delegate { plugin })
        }
        None if v4.is_none() && v6.is_none() => {
            Err(ConfigError::invalid("podCIDR", Reason::NoPool))
        }
        None => Ok(Ipam::Own(Pools { v4, v6 })),
    }
}

/// ` at <path>` for a value inside the document, nothing for the document.
fn at(path: &str) -> String {
    if path == "." {
        String::new()
    } else {
        format!(" at {path}")
    }
}

/// Typed decoding that names the JSON path of a failure.
fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::Decode {
            path,
            source: e.into_inner(),
        }
    })
}

/// The spec's rule for `name`.
fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes())
    }

    fn err(json: &str) -> ConfigError {
        match parse(json) {
            Ok(c) => panic!("accepted {json}: {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(r#"{"cniVersion":"1.1.0","name":"mesh","type":"clustermesh-cni","podCIDR":"10.1.2.0/24"}"#)
            .expect("valid");
        assert_eq!(c.version, CniVersion::V1_1_0);
        assert_eq!(c.name, "mesh");
        assert_eq!(c.mtu, DEFAULT_MTU);
        assert_eq!(c.endpoint_dir, PathBuf::from(DEFAULT_ENDPOINT_DIR));
        assert_eq!(
            c.ipam,
            Ipam::Own(Pools::v4(
                Ipv4Cidr::parse_pool("10.1.2.0/24").expect("cidr")
            ))
        );
        assert!(c.labels.is_empty());
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"{"cniVersion":"0.4.0","name":"mesh","type":"clustermesh-cni",
                "endpointDir":"/tmp/eps","mtu":1400,
                "ipam":{"type":"host-local","subnet":"10.9.0.0/24"},
                "runtimeConfig":{"whatever":1},
                "args":{"cni":{"labels":[{"key":"app","value":"web"},{"key":"tier","value":"fe"}]}},
                "prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/x"}],
                              "ips":[{"version":"4","address":"10.9.0.2/32","interface":0}]}}"#,
        )
        .expect("valid");
        assert_eq!(c.version, CniVersion::V0_4_0);
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.endpoint_dir, PathBuf::from("/tmp/eps"));
        assert_eq!(
            c.ipam,
            Ipam::Delegate {
                plugin: "host-local".into()
            }
        );
        assert_eq!(c.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(c.labels.len(), 2);
        let prev = c.prev_result.expect("prevResult");
        assert_eq!(prev.interfaces[0].name, "eth0");
        assert_eq!(prev.ips[0].address, "10.9.0.2/32");
    }

    #[test]
    fn each_bad_input_gets_its_code_and_field() {
        // (config, code, field named)
        let cases: &[(&str, u32, &str)] = &[
            (r#"{"cniVersion":"1.1.0","name":"#, code::DECODE, "."),
            (r#"[1,2]"#, code::DECODE, "."),
            (
                r#"{"cniVersion":"9.9.9","name":"m","type":"t","podCIDR":"10.0.0.0/24"}"#,
                code::INCOMPATIBLE_VERSION,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":"0.2.0","name":"m","type":"t","podCIDR":"10.0.0.0/24"}"#,
                code::INCOMPATIBLE_VERSION,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":1,"name":"m","type":"t","podCIDR":"10.0.0.0/24"}"#,
                code::INCOMPATIBLE_VERSION,
                "cniVersion",
            ),
            (
                r#"{"name":"m","type":"t","podCIDR":"10.0.0.0/24"}"#,
                code::INVALID_CONFIG,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/24","mtu":"big"}"#,
                code::DECODE,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/24","mtu":-1}"#,
                code::DECODE,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":7}"#,
                code::DECODE,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","ipam":"host-local"}"#,
                code::DECODE,
                "ipam",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/24","args":{"cni":{"labels":[{"key":"a"}]}}}"#,
                code::DECODE,
                "args.cni.labels[0]",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/24","prevResult":{"ips":[{"address":5}]}}"#,
                code::DECODE,
                "prevResult.ips[0].address",
            ),
            (
                r#"{"cniVersion":"1.0.0","type":"t","podCIDR":"10.0.0.0/24"}"#,
                code::INVALID_CONFIG,
                "name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"bad name","type":"t","podCIDR":"10.0.0.0/24"}"#,
                code::INVALID_CONFIG,
                "name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","podCIDR":"10.0.0.0/24"}"#,
                code::INVALID_CONFIG,
                "type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t"}"#,
                code::INVALID_CONFIG,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","ipam":{}}"#,
                code::INVALID_CONFIG,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0"}"#,
                code::INVALID_CONFIG,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.1/24"}"#,
                code::INVALID_CONFIG,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/33"}"#,
                code::INVALID_CONFIG,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/31"}"#,
                code::INVALID_CONFIG,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"fd00::/64"}"#,
                code::INVALID_CONFIG,
                "podCIDR",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/24","mtu":0}"#,
                code::INVALID_CONFIG,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/24","mtu":70000}"#,
                code::INVALID_CONFIG,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/24","endpointDir":"rel"}"#,
                code::INVALID_CONFIG,
                "endpointDir",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","ipam":{"type":"../evil"}}"#,
                code::INVALID_CONFIG,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"m","type":"t","podCIDR":"10.0.0.0/24","args":{"cni":{"labels":[{"key":"a","value":"1"},{"key":"a","value":"2"}]}}}"#,
                code::INVALID_CONFIG,
                "args.cni.labels[1].key",
            ),
        ];
        for (json, want_code, field) in cases {
            let e = err(json);
            assert_eq!(e.code(), *want_code, "{json}: {e}");
            assert_eq!(e.field(), *field, "{json}: {e}");
            if *field != "." {
                assert!(
                    e.to_string().contains(field),
                    "{json}: message {e} names {field}"
                );
            }
        }
    }

    #[test]
    fn pod_ranges_per_family() {
        let base = r#""cniVersion":"1.1.0","name":"m","type":"t""#;
        let v4 = Ipv4Cidr::parse_pool("10.1.2.0/24").expect("v4");
        let v6 = Ipv6Cidr::parse_pool("fd00:1:2::/64").expect("v6");
        let c = parse(&format!(
            r#"{{{base},"podCIDR":"10.1.2.0/24","podCIDRv6":"fd00:1:2::/64"}}"#
        ))
        .expect("dual-stack");
        assert_eq!(
            c.ipam,
            Ipam::Own(Pools {
                v4: Some(v4),
                v6: Some(v6)
            })
        );
        let c = parse(&format!(r#"{{{base},"podCIDRv6":"fd00:1:2::/64"}}"#)).expect("v6 only");
        assert_eq!(c.ipam, Ipam::Own(Pools::v6(v6)));
        let c = parse(&format!(
            r#"{{{base},"podCIDRv6":"fd00:1:2::/120","mtu":1280}}"#
        ))
        .expect("/120 and the IPv6 minimum MTU");
        assert_eq!(c.mtu, 1280);
        // IPv4 alone may still have a small MTU.
        assert_eq!(
            parse(&format!(r#"{{{base},"podCIDR":"10.1.2.0/24","mtu":576}}"#))
                .expect("v4 small mtu")
                .mtu,
            576
        );
        // A delegate wins over the ranges, which must still be valid.
        let c = parse(&format!(
            r#"{{{base},"podCIDRv6":"fd00:1:2::/64","ipam":{{"type":"host-local"}}}}"#
        ))
        .expect("delegated");
        assert_eq!(
            c.ipam,
            Ipam::Delegate {
                plugin: "host-local".into()
            }
        );
        // (podCIDRv6 value, reason)
        let bad: &[(&str, CidrError)] = &[
            (
                "10.1.2.0/24",
                CidrError::BadAddress6 {
                    got: "10.1.2.0".into(),
                },
            ),
            (
                "fd00::",
                CidrError::NoPrefix {
                    got: "fd00::".into(),
                },
            ),
            ("fd00::/130", CidrError::BadPrefix6 { got: "130".into() }),
            ("fd00::/63", CidrError::PrefixOutOfRange6 { prefix: 63 }),
            ("fd00::/121", CidrError::PrefixOutOfRange6 { prefix: 121 }),
            ("fd00::/128", CidrError::PrefixOutOfRange6 { prefix: 128 }),
            (
                "fd00::1/64",
                CidrError::HostBitsSet6 {
                    got: "fd00::1/64".into(),
                    network: Ipv6Cidr::parse("fd00::/64").expect("net"),
                },
            ),
        ];
        for (range, reason) in bad {
            for extra in ["", r#","podCIDR":"10.1.2.0/24""#, r#","ipam":{"type":"h"}"#] {
                let json = format!(r#"{{{base},"podCIDRv6":"{range}"{extra}}}"#);
                let e = err(&json);
                assert_eq!(e.code(), code::INVALID_CONFIG, "{json}: {e}");
                assert_eq!(e.field(), "podCIDRv6", "{json}: {e}");
                assert!(e.to_string().contains("podCIDRv6"), "{e}");
                match &e {
                    ConfigError::Invalid {
                        reason: Reason::Cidr(got),
                        ..
                    } => assert_eq!(got, reason, "{json}"),
                    other => panic!("{json}: {other}"),
                }
            }
        }
        // Wrong type: code 6 at the path.
        let e = err(&format!(r#"{{{base},"podCIDRv6":64}}"#));
        assert_eq!((e.code(), e.field()), (code::DECODE, "podCIDRv6"), "{e}");
        // IPv6 and an MTU below 1280.
        let e = err(&format!(r#"{{{base},"podCIDRv6":"fd00::/64","mtu":1279}}"#));
        assert_eq!((e.code(), e.field()), (code::INVALID_CONFIG, "mtu"), "{e}");
        assert!(e.to_string().contains("1280"), "{e}");
        // Neither range nor delegate: named, with what would do.
        let e = err(&format!("{{{base}}}"));
        assert_eq!(e.field(), "podCIDR");
        assert!(e.to_string().contains("podCIDRv6"), "{e}");
    }

    #[test]
    fn requested_version_is_lenient() {
        assert_eq!(
            requested_version(br#"{"cniVersion":"0.3.1","mtu":"x"}"#),
            Some(CniVersion::V0_3_1)
        );
        assert_eq!(requested_version(br#"{"cniVersion":"7"}"#), None);
        assert_eq!(requested_version(b"not json"), None);
    }

    #[test]
    fn version_capabilities() {
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_status_and_gc());
        assert!(CniVersion::V1_1_0.has_status_and_gc());
        for v in SUPPORTED_VERSIONS {
            assert_eq!(CniVersion::parse(v).map(CniVersion::as_str), Some(v));
        }
    }
}
