//! The apiserver's configuration: one struct with defaults and `validate()`.
//! A bad configuration is refused at start (exit status 64) with a message
//! naming the field.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clustermesh_api::{ClusterId, ClusterName, EncryptionPolicy};

pub use clustermesh_kvstore::EtcdConfig;

/// Mutual TLS of the gRPC API: the server's certificate and the CA every
/// caller's certificate must chain to (the caller's identity is its CN,
/// see [`crate::authz`]).
#[derive(Debug, Clone)]
pub struct GrpcTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
}

#[derive(Clone)]
pub struct Config {
    pub cluster_name: ClusterName,
    pub cluster_id: ClusterId,
    pub etcd: EtcdConfig,
    /// Endpoints remote clusters use to reach this etcd (GetClusterInfo);
    /// defaults to `etcd.endpoints`.
    pub advertise_etcd_endpoints: Vec<String>,
    pub grpc_listen: SocketAddr,
    /// Mutual TLS of the gRPC API; required unless `insecure_plaintext`.
    pub grpc_tls: Option<GrpcTls>,
    /// Serve the gRPC API in plaintext without authentication: every caller
    /// is allowed everything. Only with this explicit flag; warned at start
    /// and shown in status and metrics.
    pub insecure_plaintext: bool,
    /// The audit trail (JSON lines): posture changes and refused calls,
    /// with the caller's identity.
    pub audit_log: Option<PathBuf>,
    /// Prometheus text metrics at `http://<addr>/metrics`; None disables.
    pub metrics_listen: Option<SocketAddr>,
    /// Services declared in a YAML file (standalone source).
    pub services_file: Option<PathBuf>,
    pub encryption: EncryptionPolicy,
    /// TTL of the etcd lease every exported key is attached to: a dead
    /// apiserver's entries expire after it.
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// A registered node that sends no heartbeat for this long is removed
    /// with its endpoints.
    pub node_ttl: Duration,
    /// An identity no endpoint has used for this long is deleted (zero:
    /// never).
    pub identity_gc_grace: Duration,
    /// Kubernetes mode: watch Nodes, Services, EndpointSlices, Namespaces
    /// and the network policy kinds with this client (in addition to the
    /// standalone API).
    pub kubernetes: Option<kube::Client>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("cluster_name", &self.cluster_name)
            .field("cluster_id", &self.cluster_id)
            .field("etcd", &self.etcd)
            .field("grpc_listen", &self.grpc_listen)
            .field("kubernetes", &self.kubernetes.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

impl Config {
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
    pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(30);
    pub const DEFAULT_IDENTITY_GC_GRACE: Duration = Duration::from_secs(300);

    /// A configuration with defaults for everything but identity and etcd.
    pub fn new(
        cluster_name: ClusterName,
        cluster_id: ClusterId,
        etcd_endpoints: Vec<String>,
    ) -> Self {
        Self {
            cluster_name,
            cluster_id,
            etcd: EtcdConfig {
                endpoints: etcd_endpoints,
                ..Default::default()
            },
            advertise_etcd_endpoints: Vec::new(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_tls: None,
            insecure_plaintext: false,
            audit_log: None,
            metrics_listen: None,
            services_file: None,
            encryption: EncryptionPolicy::default(),
            lease_ttl: Self::DEFAULT_LEASE_TTL,
            heartbeat_interval: Self::DEFAULT_HEARTBEAT,
            node_ttl: Self::DEFAULT_NODE_TTL,
            identity_gc_grace: Self::DEFAULT_IDENTITY_GC_GRACE,
            kubernetes: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd.endpoints.is_empty() {
            return Err(bad(
                "etcd.endpoints",
                "at least one etcd endpoint is required",
            ));
        }
        for e in self
            .etcd
            .endpoints
            .iter()
            .chain(&self.advertise_etcd_endpoints)
        {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(bad(
                    "etcd.endpoints",
                    format!("{e:?} must start with http:// or https://"),
                ));
            }
        }
        if self.etcd.cert_file.is_some() != self.etcd.key_file.is_some() {
            return Err(bad(
                "etcd.cert_file",
                "client certificate and key go together",
            ));
        }
        for (field, f) in [
            ("etcd.ca_file", &self.etcd.ca_file),
            ("etcd.cert_file", &self.etcd.cert_file),
            ("etcd.key_file", &self.etcd.key_file),
            ("services_file", &self.services_file),
        ] {
            if let Some(p) = f
                && !p.is_file()
            {
                return Err(bad(
                    field,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        match (&self.grpc_tls, self.insecure_plaintext) {
            (None, false) => {
                return Err(bad(
                    "grpc_tls",
                    "the gRPC API needs mutual TLS (--tls-cert, --tls-key, --tls-client-ca from `clustermesh enable`); \
                     --insecure-plaintext serves it without authentication",
                ));
            }
            (Some(_), true) => {
                return Err(bad(
                    "insecure_plaintext",
                    "conflicts with the TLS options: give one or the other",
                ));
            }
            _ => {}
        }
        if let Some(t) = &self.grpc_tls {
            for (field, p) in [
                ("grpc_tls.cert_file", &t.cert_file),
                ("grpc_tls.key_file", &t.key_file),
                ("grpc_tls.client_ca_file", &t.client_ca_file),
            ] {
                if !p.is_file() {
                    return Err(bad(
                        field,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err(bad(
                "lease_ttl",
                "must be at least 2s (etcd's minimum is its election timeout)",
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.lease_ttl {
            return Err(bad(
                "heartbeat_interval",
                "must be above 0 and below lease_ttl",
            ));
        }
        if self.node_ttl < Duration::from_secs(1) {
            return Err(bad("node_ttl", "must be at least 1s"));
        }
        let e = &self.encryption;
        if e.mode == clustermesh_api::EncryptionMode::None && (e.strict || e.strict_ingress) {
            return Err(bad(
                "encryption.strict",
                "strict mode needs encryption mode wireguard",
            ));
        }
        Ok(())
    }

    pub fn advertised_endpoints(&self) -> &[String] {
        if self.advertise_etcd_endpoints.is_empty() {
            &self.etcd.endpoints
        } else {
            &self.advertise_etcd_endpoints
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg() -> Config {
        let mut c = Config::new(
            "c1".parse().unwrap(),
            ClusterId::new(1).unwrap(),
            vec!["http://127.0.0.1:2379".into()],
        );
        c.insecure_plaintext = true;
        c
    }

    #[test]
    fn defaults_validate_and_bad_fields_are_named() {
        cfg().validate().unwrap();
        // Neither TLS nor the explicit insecure flag: refused.
        let mut c = cfg();
        c.insecure_plaintext = false;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "grpc_tls");
        assert!(e.reason.contains("--insecure-plaintext"), "{}", e.reason);
        let mut c = cfg();
        c.grpc_tls = Some(GrpcTls {
            cert_file: "/nonexistent/c.pem".into(),
            key_file: "/nonexistent/k.pem".into(),
            client_ca_file: "/nonexistent/ca.pem".into(),
        });
        assert_eq!(c.validate().unwrap_err().field, "insecure_plaintext");
        c.insecure_plaintext = false;
        assert_eq!(c.validate().unwrap_err().field, "grpc_tls.cert_file");
        let mut c = cfg();
        c.etcd.endpoints = vec!["127.0.0.1:2379".into()];
        assert_eq!(c.validate().unwrap_err().field, "etcd.endpoints");
        let mut c = cfg();
        c.heartbeat_interval = c.lease_ttl;
        assert_eq!(c.validate().unwrap_err().field, "heartbeat_interval");
        let mut c = cfg();
        c.encryption.strict = true;
        assert_eq!(c.validate().unwrap_err().field, "encryption.strict");
        let mut c = cfg();
        c.etcd.ca_file = Some("/nonexistent/ca.pem".into());
        assert_eq!(c.validate().unwrap_err().field, "etcd.ca_file");
    }
}
