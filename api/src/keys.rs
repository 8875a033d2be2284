//! The etcd key schema. Stable API: readers in other clusters, possibly
//! running another release, parse these keys.
//!
//! ```text
//! clustermesh/cluster-config/<cluster>
//! clustermesh/state/nodes/v1/<cluster>/<node>
//! clustermesh/state/ip/v1/<cluster>/<ip>
//! clustermesh/state/identities/v1/<cluster>/<identity>
//! clustermesh/state/services/v1/<cluster>/<namespace>/<name>
//! clustermesh/state/policies/v1/<cluster>/<namespace or _>/<name>
//! clustermesh/synced/<cluster>/<kind>
//! clustermesh/heartbeat/<cluster>
//! ```
//!
//! Every segment is the canonical text of a typed value, so one object has
//! exactly one key: `parse(build(k)) == k` and `build(parse(s)) == s`. A
//! breaking change to a state record's JSON gets a new version segment (`v2`)
//! and both are written for a release; readers refuse versions they do not
//! know instead of guessing.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    policy::PolicyName,
    types::{ClusterName, Identity, K8sName, NodeName, ValueError, parse_canonical_ip},
};

/// Root of every key this product writes.
pub const ROOT: &str = "clustermesh/";
/// The current version segment of the state kinds.
pub const STATE_VERSION: &str = "v1";

/// What is wrong with a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not UTF-8")]
    NotUtf8,
    #[error("key {key:?} is outside the {ROOT:?} schema")]
    OutsideSchema { key: String },
    #[error("key {key:?}: unknown kind {kind:?}")]
    UnknownKind { key: String, kind: String },
    #[error("key {key:?}: unknown schema version {version:?} (this build reads {STATE_VERSION})")]
    UnknownVersion { key: String, version: String },
    #[error("key {key:?}: expected {expected} segments after the kind")]
    Shape { key: String, expected: usize },
    #[error("key {key:?}: {source}")]
    Segment {
        key: String,
        #[source]
        source: ValueError,
    },
}

/// The kinds of state a cluster exports, each under its own prefix and with
/// its own sync canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateKind {
    Nodes,
    Ip,
    Identities,
    Services,
    /// Network policies (issue 18). Only the owning cluster's agents use
    /// them: each cluster enforces its own.
    Policies,
}

/// The namespace segment of a cluster-wide policy's key (`_` is no
/// Kubernetes name, so it cannot collide with a namespace).
pub const CLUSTER_WIDE_SEGMENT: &str = "_";

impl StateKind {
    pub const ALL: [StateKind; 5] = [
        StateKind::Nodes,
        StateKind::Ip,
        StateKind::Identities,
        StateKind::Services,
        StateKind::Policies,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Nodes => "nodes",
            StateKind::Ip => "ip",
            StateKind::Identities => "identities",
            StateKind::Services => "services",
            StateKind::Policies => "policies",
        }
    }

    /// `clustermesh/state/<kind>/v1/<cluster>/`: everything of this kind one
    /// cluster exports (the trailing '/' keeps `c1` from matching `c10`).
    pub fn prefix(self, cluster: &ClusterName) -> String {
        format!("{ROOT}state/{}/{STATE_VERSION}/{cluster}/", self.as_str())
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StateKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        StateKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(())
    }
}

/// One key of the schema.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    ClusterConfig {
        cluster: ClusterName,
    },
    Node {
        cluster: ClusterName,
        node: NodeName,
    },
    Ip {
        cluster: ClusterName,
        ip: IpAddr,
    },
    Identity {
        cluster: ClusterName,
        id: Identity,
    },
    Service {
        cluster: ClusterName,
        namespace: K8sName,
        name: K8sName,
    },
    /// A network policy; `namespace: None` is cluster-wide (segment `_`).
    Policy {
        cluster: ClusterName,
        namespace: Option<K8sName>,
        name: PolicyName,
    },
    Synced {
        cluster: ClusterName,
        kind: StateKind,
    },
    Heartbeat {
        cluster: ClusterName,
    },
}

/// Builds and parses etcd keys: the one place that knows the text form.
pub trait KvKey: Sized {
    /// The key's text.
    fn build(&self) -> String;
    /// Parses a raw etcd key. Total: any byte string gives a key or an error.
    fn parse(raw: &[u8]) -> Result<Self, KeyError>;
}

impl Key {
    /// The cluster the key belongs to.
    pub fn cluster(&self) -> &ClusterName {
        match self {
            Key::ClusterConfig { cluster }
            | Key::Node { cluster, .. }
            | Key::Ip { cluster, .. }
            | Key::Identity { cluster, .. }
            | Key::Service { cluster, .. }
            | Key::Policy { cluster, .. }
            | Key::Synced { cluster, .. }
            | Key::Heartbeat { cluster } => cluster,
        }
    }

    /// The state kind of a state key.
    pub fn state_kind(&self) -> Option<StateKind> {
        match self {
            Key::Node { .. } => Some(StateKind::Nodes),
            Key::Ip { .. } => Some(StateKind::Ip),
            Key::Identity { .. } => Some(StateKind::Identities),
            Key::Service { .. } => Some(StateKind::Services),
            Key::Policy { .. } => Some(StateKind::Policies),
            _ => None,
        }
    }

    pub fn cluster_config_prefix() -> String {
        format!("{ROOT}cluster-config/")
    }
    pub fn synced_prefix(cluster: &ClusterName) -> String {
        format!("{ROOT}synced/{cluster}/")
    }
}

impl KvKey for Key {
    fn build(&self) -> String {
        match self {
            Key::ClusterConfig { cluster } => format!("{ROOT}cluster-config/{cluster}"),
            Key::Node { cluster, node } => format!("{}{node}", StateKind::Nodes.prefix(cluster)),
            Key::Ip { cluster, ip } => format!("{}{ip}", StateKind::Ip.prefix(cluster)),
            Key::Identity { cluster, id } => {
                format!("{}{id}", StateKind::Identities.prefix(cluster))
            }
            Key::Service {
                cluster,
                namespace,
                name,
            } => format!("{}{namespace}/{name}", StateKind::Services.prefix(cluster)),
            Key::Policy {
                cluster,
                namespace,
                name,
            } => format!(
                "{}{}/{name}",
                StateKind::Policies.prefix(cluster),
                namespace
                    .as_ref()
                    .map_or(CLUSTER_WIDE_SEGMENT, K8sName::as_str)
            ),
            Key::Synced { cluster, kind } => format!("{ROOT}synced/{cluster}/{kind}"),
            Key::Heartbeat { cluster } => format!("{ROOT}heartbeat/{cluster}"),
        }
    }

    fn parse(raw: &[u8]) -> Result<Self, KeyError> {
        let key = std::str::from_utf8(raw).map_err(|_| KeyError::NotUtf8)?;
        let owned = || key.to_owned();
        let rest = key
            .strip_prefix(ROOT)
            .ok_or_else(|| KeyError::OutsideSchema { key: owned() })?;
        let segs: Vec<&str> = rest.split('/').collect();
        fn seg<T>(key: &str, r: Result<T, ValueError>) -> Result<T, KeyError> {
            r.map_err(|source| KeyError::Segment {
                key: key.to_owned(),
                source,
            })
        }
        let shape = |expected| KeyError::Shape {
            key: owned(),
            expected,
        };
        match segs.as_slice() {
            ["cluster-config", rest @ ..] => match rest {
                [c] => Ok(Key::ClusterConfig {
                    cluster: seg(key, c.parse())?,
                }),
                _ => Err(shape(1)),
            },
            ["heartbeat", rest @ ..] => match rest {
                [c] => Ok(Key::Heartbeat {
                    cluster: seg(key, c.parse())?,
                }),
                _ => Err(shape(1)),
            },
            ["synced", rest @ ..] => match rest {
                [c, kind] => {
                    let cluster = seg(key, c.parse())?;
                    let kind = kind.parse().map_err(|()| KeyError::UnknownKind {
                        key: owned(),
                        kind: (*kind).to_owned(),
                    })?;
                    Ok(Key::Synced { cluster, kind })
                }
                _ => Err(shape(2)),
            },
            ["state", kind, version, rest @ ..] => {
                let kind: StateKind = kind.parse().map_err(|()| KeyError::UnknownKind {
                    key: owned(),
                    kind: (*kind).to_owned(),
                })?;
                if *version != STATE_VERSION {
                    return Err(KeyError::UnknownVersion {
                        key: owned(),
                        version: (*version).to_owned(),
                    });
                }
                match (kind, rest) {
                    (StateKind::Nodes, [c, n]) => Ok(Key::Node {
                        cluster: seg(key, c.parse())?,
                        node: seg(key, n.parse())?,
                    }),
                    (StateKind::Ip, [c, ip]) => Ok(Key::Ip {
                        cluster: seg(key, c.parse())?,
                        ip: seg(key, parse_canonical_ip(ip))?,
                    }),
                    (StateKind::Identities, [c, id]) => Ok(Key::Identity {
                        cluster: seg(key, c.parse())?,
                        id: seg(key, id.parse())?,
                    }),
                    (StateKind::Services, [c, ns, name]) => Ok(Key::Service {
                        cluster: seg(key, c.parse())?,
                        namespace: seg(key, ns.parse())?,
                        name: seg(key, name.parse())?,
                    }),
                    (StateKind::Policies, [c, ns, name]) => Ok(Key::Policy {
                        cluster: seg(key, c.parse())?,
                        namespace: if *ns == CLUSTER_WIDE_SEGMENT {
                            None
                        } else {
                            Some(seg(key, ns.parse())?)
                        },
                        name: seg(key, name.parse())?,
                    }),
                    (StateKind::Services | StateKind::Policies, _) => Err(shape(3)),
                    _ => Err(shape(2)),
                }
            }
            ["state", ..] => Err(shape(4)),
            [kind, ..] => Err(KeyError::UnknownKind {
                key: owned(),
                kind: (*kind).to_owned(),
            }),
            [] => Err(KeyError::OutsideSchema { key: owned() }),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.build())
    }
}
