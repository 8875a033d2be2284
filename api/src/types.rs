//! Typed, validated values.
//!
//! Every value type here can only be constructed valid: parsing (`FromStr`,
//! `TryFrom`) and serde deserialization go through the same checks, so a
//! record that decoded is a record whose fields are all in range.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// What is wrong with one value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid cluster name {got:?}: {reason}")]
    ClusterName { got: String, reason: &'static str },
    #[error("invalid cluster id {got}: must be 1..=255 (0 is reserved)")]
    ClusterId { got: u64 },
    #[error("invalid node name {got:?}: {reason}")]
    NodeName { got: String, reason: &'static str },
    #[error("invalid {what} {got:?}: {reason}")]
    K8sName {
        what: &'static str,
        got: String,
        reason: &'static str,
    },
    #[error("invalid IP address {got:?}")]
    Ip { got: String },
    #[error("invalid CIDR {got:?}: {reason}")]
    Cidr { got: String, reason: String },
    #[error("invalid WireGuard public key: {reason}")]
    WgKey { reason: &'static str },
    #[error("invalid security identity {got}: {reason}")]
    Identity { got: u64, reason: &'static str },
    #[error("invalid label {key:?}: {reason}")]
    Label { key: String, reason: &'static str },
    #[error("invalid boot id {got:?}: {reason}")]
    BootId { got: String, reason: &'static str },
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Checks a DNS-1123 label: 1..=max chars of `[a-z0-9-]`, alphanumeric at
/// both ends.
fn dns_label(s: &str, max: usize) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > max {
        return Err("too long");
    }
    if !s.chars().all(|c| is_lower_alnum(c) || c == '-') {
        return Err("only lowercase letters, digits and '-' are allowed");
    }
    let first = s.chars().next().unwrap_or('-');
    let last = s.chars().next_back().unwrap_or('-');
    if !is_lower_alnum(first) || !is_lower_alnum(last) {
        return Err("must start and end with a lowercase letter or digit");
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident, $check:expr) => {
        $(#[$m])*
        ///
        /// Held as a shared string: a clone is a reference count, so the
        /// stores of a large mesh can share one name among many records.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(s: String) -> Result<Self, ValueError> {
                let check: fn(&str) -> Result<(), ValueError> = $check;
                check(&s)?;
                Ok(Self(s.into()))
            }
        }
        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, ValueError> {
                Self::try_from(s.to_owned())
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0.to_string()
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A cluster's name: 1-32 characters of lowercase letters, digits and
    /// '-', starting and ending with a letter or digit. Unique in a mesh.
    ClusterName,
    |s| dns_label(s, 32).map_err(|reason| ValueError::ClusterName {
        got: s.to_owned(),
        reason
    })
);

string_newtype!(
    /// A node's name: a DNS-1123 subdomain (up to 253 characters, dot-separated
    /// labels of lowercase letters, digits and '-').
    NodeName,
    |s| {
        let err = |reason| ValueError::NodeName {
            got: s.to_owned(),
            reason,
        };
        if s.len() > 253 {
            return Err(err("longer than 253 characters"));
        }
        for label in s.split('.') {
            dns_label(label, 63).map_err(err)?;
        }
        Ok(())
    }
);

string_newtype!(
    /// A Kubernetes namespace or object name as used for services and pods:
    /// a DNS-1123 label of up to 63 characters.
    K8sName,
    |s| dns_label(s, 63).map_err(|reason| ValueError::K8sName {
        what: "name",
        got: s.to_owned(),
        reason
    })
);

string_newtype!(
    /// A node's boot id: changes when the node reboots, so a re-registration
    /// under the same name but another boot id is a different incarnation.
    /// 1-64 characters of ASCII letters, digits and '-'.
    BootId,
    |s| {
        let err = |reason| ValueError::BootId {
            got: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(err("must not be empty"));
        }
        if s.len() > 64 {
            return Err(err("longer than 64 characters"));
        }
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(err("only ASCII letters, digits and '-' are allowed"));
        }
        Ok(())
    }
);

/// A cluster's numeric id, 1..=255. 0 is reserved (it marks identities that
/// belong to no cluster). The id is carried in bits 16-23 of every identity the
/// cluster allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ClusterId(u8);

impl ClusterId {
    pub const MIN: u8 = 1;
    pub const MAX: u8 = 255;

    pub fn new(id: u64) -> Result<Self, ValueError> {
        match u8::try_from(id) {
            Ok(v) if v >= Self::MIN => Ok(Self(v)),
            _ => Err(ValueError::ClusterId { got: id }),
        }
    }
    pub fn get(self) -> u8 {
        self.0
    }
}
impl TryFrom<u64> for ClusterId {
    type Error = ValueError;
    fn try_from(v: u64) -> Result<Self, ValueError> {
        Self::new(v)
    }
}
impl From<ClusterId> for u64 {
    fn from(v: ClusterId) -> u64 {
        v.0.into()
    }
}
impl FromStr for ClusterId {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let n: u64 = s
            .parse()
            .map_err(|_| ValueError::ClusterId { got: u64::MAX })?;
        Self::new(n)
    }
}
impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A numeric security identity.
///
/// Layout: bits 0-15 the cluster-local id, bits 16-23 the owning cluster's id,
/// bits 24-31 zero. Identities with cluster bits 0 are the reserved ones
/// (1..=255: host, world, ...), shared by every cluster. A cluster allocates
/// local ids from [`Identity::FIRST_LOCAL`]..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Identity(u32);

impl Identity {
    /// First cluster-local id a cluster allocates; below are reserved.
    pub const FIRST_LOCAL: u16 = 256;
    pub const HOST: Identity = Identity(1);
    pub const WORLD: Identity = Identity(2);
    pub const UNMANAGED: Identity = Identity(3);
    pub const HEALTH: Identity = Identity(4);
    pub const INIT: Identity = Identity(5);
    pub const REMOTE_NODE: Identity = Identity(6);

    /// A cluster-scoped identity.
    pub fn new(cluster: ClusterId, local: u16) -> Result<Self, ValueError> {
        let raw = (u32::from(cluster.get()) << 16) | u32::from(local);
        if local < Self::FIRST_LOCAL {
            return Err(ValueError::Identity {
                got: raw.into(),
                reason: "cluster-local ids below 256 are reserved",
            });
        }
        Ok(Self(raw))
    }

    pub fn from_raw(raw: u64) -> Result<Self, ValueError> {
        let err = |reason| ValueError::Identity { got: raw, reason };
        let v = u32::try_from(raw).map_err(|_| err("does not fit in 32 bits"))?;
        if v >> 24 != 0 {
            return Err(err("bits 24-31 must be zero"));
        }
        let cluster = (v >> 16) & 0xff;
        let local = v & 0xffff;
        if v == 0 {
            return Err(err("0 is not an identity"));
        }
        if cluster == 0 && local > 255 {
            return Err(err(
                "an identity without cluster bits must be a reserved one (1..=255)",
            ));
        }
        if cluster != 0 && local < u32::from(Self::FIRST_LOCAL) {
            return Err(err("cluster-local ids below 256 are reserved"));
        }
        Ok(Self(v))
    }

    pub fn get(self) -> u32 {
        self.0
    }
    /// Bit 24 marks a node-local identity: the agent gives one to each CIDR
    /// prefix its policies name. Never exported, never accepted from etcd
    /// or the network ([`Identity::from_raw`] refuses bits 24-31), never
    /// carried in a tunnel header (24 bits).
    pub const NODE_LOCAL: u32 = 1 << 24;
    /// The node-local identity number `n` (1..2^24).
    pub fn node_local(n: u32) -> Option<Self> {
        (1..Self::NODE_LOCAL)
            .contains(&n)
            .then_some(Self(Self::NODE_LOCAL | n))
    }
    pub fn is_node_local(self) -> bool {
        self.0 & Self::NODE_LOCAL != 0
    }
    /// The owning cluster, or `None` for a reserved or node-local identity.
    pub fn cluster(self) -> Option<ClusterId> {
        if self.is_node_local() {
            return None;
        }
        ClusterId::new(u64::from((self.0 >> 16) & 0xff)).ok()
    }
    pub fn local(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
    pub fn is_reserved(self) -> bool {
        self.cluster().is_none() && !self.is_node_local()
    }
}
impl TryFrom<u64> for Identity {
    type Error = ValueError;
    fn try_from(v: u64) -> Result<Self, ValueError> {
        Self::from_raw(v)
    }
}
impl From<Identity> for u64 {
    fn from(v: Identity) -> u64 {
        v.0.into()
    }
}
impl FromStr for Identity {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        // Canonical decimal only: no sign, no leading zeros.
        if s.is_empty()
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(ValueError::Identity {
                got: 0,
                reason: "not a canonical decimal number",
            });
        }
        let n: u64 = s.parse().map_err(|_| ValueError::Identity {
            got: u64::MAX,
            reason: "does not fit in 32 bits",
        })?;
        Self::from_raw(n)
    }
}
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parses an IP address in its canonical text form only, so that one address
/// has exactly one etcd key.
pub fn parse_canonical_ip(s: &str) -> Result<IpAddr, ValueError> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| ValueError::Ip { got: s.to_owned() })?;
    if ip.to_string() != s {
        return Err(ValueError::Ip { got: s.to_owned() });
    }
    Ok(ip)
}

/// An IPv4 or IPv6 prefix with no host bits set, e.g. `10.1.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpCidr {
    addr: IpAddr,
    len: u8,
}

impl IpCidr {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, ValueError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let err = |reason: String| ValueError::Cidr {
            got: format!("{addr}/{len}"),
            reason,
        };
        if len > max {
            return Err(err(format!("prefix length must be at most {max}")));
        }
        let masked = mask(addr, len);
        if masked != addr {
            return Err(err(format!(
                "host bits are set (did you mean {masked}/{len}?)"
            )));
        }
        Ok(Self { addr, len })
    }
    /// The prefix of length `len` (capped at the family's width) that
    /// holds `ip`: its host bits cleared.
    pub fn truncate(ip: IpAddr, len: u8) -> Self {
        let len = len.min(if ip.is_ipv4() { 32 } else { 128 });
        Self {
            addr: mask(ip, len),
            len,
        }
    }
    /// The prefix of a single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
    /// Whether every address of `other` is in this prefix.
    pub fn contains_cidr(&self, other: &IpCidr) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }
    /// Whether the two prefixes share at least one address.
    pub fn overlaps(&self, other: &IpCidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let len = self.len.min(other.len);
        mask(self.addr, len) == mask(other.addr, len)
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl FromStr for IpCidr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let err = |reason: &str| ValueError::Cidr {
            got: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| err("missing '/<prefix length>'"))?;
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| err("not an IP address before '/'"))?;
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("prefix length is not a number"));
        }
        let len: u8 = len
            .parse()
            .map_err(|_| err("prefix length is not a number"))?;
        Self::new(addr, len)
    }
}
impl TryFrom<String> for IpCidr {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        s.parse()
    }
}
impl From<IpCidr> for String {
    fn from(c: IpCidr) -> String {
        c.to_string()
    }
}
impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A WireGuard (Curve25519) public key: 32 bytes, shown as standard base64
/// (the form `wg pubkey` prints). Low-order points, which would make every
/// handshake with the peer predictable, are refused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WgPublicKey([u8; 32]);

/// Curve25519 points of small order (the top bit is ignored by X25519, so
/// comparison masks it).
const LOW_ORDER_POINTS: [[u8; 32]; 7] = {
    let mut p = [[0u8; 32]; 7];
    // 0
    // 1
    p[1][0] = 1;
    // order-8 points
    p[2] = [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ];
    p[3] = [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ];
    // p - 1, p, p + 1 (non-canonical encodings of the points above)
    let mut i = 4;
    while i < 7 {
        let mut j = 1;
        while j < 31 {
            p[i][j] = 0xff;
            j += 1;
        }
        p[i][31] = 0x7f;
        p[i][0] = 0xec + (i as u8 - 4);
        i += 1;
    }
    p
};

impl WgPublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, ValueError> {
        let mut masked = bytes;
        masked[31] &= 0x7f;
        if LOW_ORDER_POINTS.contains(&masked) {
            return Err(ValueError::WgKey {
                reason: "a low-order point (no peer can hold its private key)",
            });
        }
        Ok(Self(bytes))
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// A short, non-secret fingerprint for logs and audit records: the first
    /// 8 characters of the base64 form.
    pub fn fingerprint(&self) -> String {
        self.to_string().chars().take(8).collect()
    }
}
impl FromStr for WgPublicKey {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| ValueError::WgKey {
                reason: "not standard base64",
            })?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| ValueError::WgKey {
            reason: "must decode to exactly 32 bytes",
        })?;
        Self::from_bytes(bytes)
    }
}
impl TryFrom<String> for WgPublicKey {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        s.parse()
    }
}
impl From<WgPublicKey> for String {
    fn from(k: WgPublicKey) -> String {
        k.to_string()
    }
}
impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}
impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({self})")
    }
}

/// Security labels of an identity, e.g. `k8s:app` -> `web`.
///
/// Limits (refused beyond them): at most [`Labels::MAX_LABELS`] labels; keys
/// 1..=317 printable ASCII characters without spaces or '='; values at most
/// 63 printable ASCII characters without spaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub const MAX_LABELS: usize = 64;
    pub const MAX_KEY: usize = 317;
    pub const MAX_VALUE: usize = 63;

    pub fn new(map: BTreeMap<String, String>) -> Result<Self, ValueError> {
        if map.len() > Self::MAX_LABELS {
            return Err(ValueError::Label {
                key: String::new(),
                reason: "too many labels (at most 64)",
            });
        }
        let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        for (k, v) in &map {
            let err = |reason| ValueError::Label {
                key: k.chars().take(64).collect(),
                reason,
            };
            if k.is_empty() || k.len() > Self::MAX_KEY {
                return Err(err("key must be 1..=317 characters"));
            }
            if !printable(k) || k.contains('=') {
                return Err(err("key must be printable ASCII without spaces or '='"));
            }
            if v.len() > Self::MAX_VALUE {
                return Err(err("value longer than 63 characters"));
            }
            if !printable(v) {
                return Err(err("value must be printable ASCII without spaces"));
            }
        }
        Ok(Self(map))
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The labels an endpoint's identity is allocated for: these, with the
    /// endpoint's namespace as `k8s:io.kubernetes.pod.namespace`; a label
    /// of that key the endpoint claims itself (under any source) is
    /// replaced. So identities are per namespace: equal labels in two
    /// namespaces are two identities, and a pod cannot pose as another
    /// namespace's.
    pub fn for_identity(&self, namespace: &str) -> Result<Labels, ValueError> {
        let ns_key = crate::policy::model::NAMESPACE_KEY;
        let mut m: BTreeMap<String, String> = self
            .0
            .iter()
            .filter(|(k, _)| k.split_once(':').map_or(k.as_str(), |(_, key)| key) != ns_key)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        m.insert(format!("k8s:{ns_key}"), namespace.to_owned());
        Labels::new(m)
    }
}
impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = ValueError;
    fn try_from(m: BTreeMap<String, String>) -> Result<Self, ValueError> {
        Self::new(m)
    }
}
impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}
impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn identity_labels_carry_the_endpoint_namespace_only() {
        let l = |pairs: &[(&str, &str)]| {
            Labels::new(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            )
            .unwrap()
        };
        let ns = "k8s:io.kubernetes.pod.namespace";
        assert_eq!(
            l(&[("k8s:app", "web")]).for_identity("prod").unwrap(),
            l(&[("k8s:app", "web"), (ns, "prod")])
        );
        // A claimed namespace, under any source, is replaced.
        for claimed in [
            ns,
            "any:io.kubernetes.pod.namespace",
            "io.kubernetes.pod.namespace",
        ] {
            assert_eq!(
                l(&[("k8s:app", "web"), (claimed, "kube-system")])
                    .for_identity("prod")
                    .unwrap(),
                l(&[("k8s:app", "web"), (ns, "prod")]),
                "{claimed}"
            );
        }
    }

    #[test]
    fn cluster_names() {
        for ok in ["a", "c1", "cluster-one", &"a".repeat(32)] {
            assert!(ok.parse::<ClusterName>().is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(33), "é"] {
            assert!(bad.parse::<ClusterName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_overlap_and_contains() {
        let a: IpCidr = "10.1.0.0/16".parse().unwrap();
        let b: IpCidr = "10.1.2.0/24".parse().unwrap();
        let c: IpCidr = "10.2.0.0/16".parse().unwrap();
        let v6: IpCidr = "fd00::/64".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(!a.overlaps(&v6));
        assert!(a.contains("10.1.200.3".parse().unwrap()));
        assert!(!b.contains("10.1.3.1".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<IpCidr>().unwrap().overlaps(&c));
        let e = "10.1.0.1/16".parse::<IpCidr>().unwrap_err();
        assert!(e.to_string().contains("did you mean 10.1.0.0/16"), "{e}");
    }

    #[test]
    fn identity_layout() {
        let c = ClusterId::new(7).unwrap();
        let id = Identity::new(c, 300).unwrap();
        assert_eq!(id.get(), (7 << 16) | 300);
        assert_eq!(id.cluster(), Some(c));
        assert_eq!(id.local(), 300);
        assert!(Identity::HOST.is_reserved());
        assert!(Identity::new(c, 5).is_err());
        assert!(Identity::from_raw(1 << 24).is_err());
        assert!(Identity::from_raw(256).is_err());
        assert!(Identity::from_raw(0).is_err());
    }

    #[test]
    fn wg_keys() {
        let k = WgPublicKey::from_bytes([9u8; 32]).unwrap();
        let s = k.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<WgPublicKey>().unwrap(), k);
        for low in LOW_ORDER_POINTS {
            assert!(WgPublicKey::from_bytes(low).is_err());
            let mut high = low;
            high[31] |= 0x80;
            assert!(WgPublicKey::from_bytes(high).is_err());
        }
        assert!("AAAA".parse::<WgPublicKey>().is_err());
    }
}
