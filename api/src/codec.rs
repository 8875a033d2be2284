//! Encoding records to etcd values and decoding `(key, value)` pairs read
//! from etcd.
//!
//! Decoding is strict and total: any byte strings give either a valid record
//! whose key agrees with the key it was read from, or a [`DecodeError`] that
//! says what is wrong. It never panics (a fuzz-style test feeds it random and
//! mutated bytes).

use crate::{
    keys::{Key, KeyError, KvKey},
    records::{
        ClusterConfig, EndpointRecord, FieldError, Heartbeat, IdentityRecord, NodeRecord,
        PolicyRecord, Record, ServiceRecord, SyncCanary,
    },
};

/// Largest value accepted from etcd (etcd's own request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Why a `(key, value)` pair from etcd was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{what} at {key}: value of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        what: &'static str,
        key: String,
        size: usize,
        max: usize,
    },
    #[error("{what} at {key}: bad JSON: {source}")]
    BadJson {
        what: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} at {key}: field {field}: {message}")]
    InvalidField {
        what: &'static str,
        key: String,
        field: String,
        message: String,
    },
    #[error("{what} at {key}: value says cluster {value_cluster:?}, key says {key_cluster:?}")]
    ClusterMismatch {
        what: &'static str,
        key: String,
        key_cluster: String,
        value_cluster: String,
    },
    #[error("{what} at {key}: value belongs under {value_key}")]
    KeyMismatch {
        what: &'static str,
        key: String,
        value_key: String,
    },
}

impl DecodeError {
    /// A short stable reason, for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Key(KeyError::UnknownVersion { .. }) => "unknown_version",
            DecodeError::Key(_) => "bad_key",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::BadJson { .. } => "bad_json",
            DecodeError::InvalidField { .. } => "invalid_field",
            DecodeError::ClusterMismatch { .. } => "cluster_mismatch",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
        }
    }
}

/// Encodes a record as its etcd value (compact JSON). Refuses a record that
/// does not validate, so nothing invalid is ever written.
pub fn encode<R: Record>(record: &R) -> Result<Vec<u8>, FieldError> {
    record.validate()?;
    serde_json::to_vec(record).map_err(|e| FieldError::new("", e.to_string()))
}

/// Decodes the value of a record of type `R` read from `key`.
pub fn decode_value<R: Record>(key: &Key, value: &[u8]) -> Result<R, DecodeError> {
    let key_text = || key.build();
    if value.len() > MAX_VALUE_BYTES {
        return Err(DecodeError::TooLarge {
            what: R::WHAT,
            key: key_text(),
            size: value.len(),
            max: MAX_VALUE_BYTES,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(value);
    let record: R = match serde_path_to_error::deserialize(&mut de) {
        Ok(r) => r,
        Err(e) => {
            let path = match e.path().to_string() {
                p if p == "." => "(top level)".to_owned(),
                p => p,
            };
            let inner = e.into_inner();
            return Err(match inner.classify() {
                serde_json::error::Category::Data => DecodeError::InvalidField {
                    what: R::WHAT,
                    key: key_text(),
                    field: path,
                    message: strip_position(&inner.to_string()),
                },
                _ => DecodeError::BadJson {
                    what: R::WHAT,
                    key: key_text(),
                    source: inner,
                },
            });
        }
    };
    // serde_json accepts trailing whitespace only; Deserializer::end checks.
    if let Err(source) = de.end() {
        return Err(DecodeError::BadJson {
            what: R::WHAT,
            key: key_text(),
            source,
        });
    }
    record.validate().map_err(|e| DecodeError::InvalidField {
        what: R::WHAT,
        key: key_text(),
        field: e.field,
        message: e.reason,
    })?;
    let own = record.key();
    if own.cluster() != key.cluster() {
        return Err(DecodeError::ClusterMismatch {
            what: R::WHAT,
            key: key_text(),
            key_cluster: key.cluster().to_string(),
            value_cluster: own.cluster().to_string(),
        });
    }
    if own != *key {
        return Err(DecodeError::KeyMismatch {
            what: R::WHAT,
            key: key_text(),
            value_key: own.build(),
        });
    }
    Ok(record)
}

/// serde_json appends " at line L column C" to data errors; the JSON path we
/// report says more.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Any record of the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    ClusterConfig(ClusterConfig),
    Node(NodeRecord),
    Endpoint(EndpointRecord),
    Identity(IdentityRecord),
    Service(ServiceRecord),
    Policy(PolicyRecord),
    Synced(SyncCanary),
    Heartbeat(Heartbeat),
}

impl Entry {
    pub fn key(&self) -> Key {
        match self {
            Entry::ClusterConfig(r) => r.key(),
            Entry::Node(r) => r.key(),
            Entry::Endpoint(r) => r.key(),
            Entry::Identity(r) => r.key(),
            Entry::Service(r) => r.key(),
            Entry::Policy(r) => r.key(),
            Entry::Synced(r) => r.key(),
            Entry::Heartbeat(r) => r.key(),
        }
    }

    /// The etcd value of this entry.
    pub fn encode(&self) -> Result<Vec<u8>, FieldError> {
        match self {
            Entry::ClusterConfig(r) => encode(r),
            Entry::Node(r) => encode(r),
            Entry::Endpoint(r) => encode(r),
            Entry::Identity(r) => encode(r),
            Entry::Service(r) => encode(r),
            Entry::Policy(r) => encode(r),
            Entry::Synced(r) => encode(r),
            Entry::Heartbeat(r) => encode(r),
        }
    }
}

/// Decodes any `(key, value)` pair of the schema.
pub fn decode_entry(key: &[u8], value: &[u8]) -> Result<(Key, Entry), DecodeError> {
    let key = Key::parse(key)?;
    let entry = match &key {
        Key::ClusterConfig { .. } => Entry::ClusterConfig(decode_value(&key, value)?),
        Key::Node { .. } => Entry::Node(decode_value(&key, value)?),
        Key::Ip { .. } => Entry::Endpoint(decode_value(&key, value)?),
        Key::Identity { .. } => Entry::Identity(decode_value(&key, value)?),
        Key::Service { .. } => Entry::Service(decode_value(&key, value)?),
        Key::Policy { .. } => Entry::Policy(decode_value(&key, value)?),
        Key::Synced { .. } => Entry::Synced(decode_value(&key, value)?),
        Key::Heartbeat { .. } => Entry::Heartbeat(decode_value(&key, value)?),
    };
    Ok((key, entry))
}
