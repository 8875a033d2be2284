//! The remote-cluster file: how a node reaches one remote cluster's etcd.
//! `clustermesh connect` writes one per remote cluster into every node's
//! clusters directory (file name = cluster name), or a Kubernetes Secret
//! is mounted there; the agent reads them.
//!
//! ```yaml
//! endpoints:
//!   - https://192.0.2.10:2379
//! trusted-ca-file: /var/lib/clustermesh/c2/ca.pem     # optional
//! cert-file: /var/lib/clustermesh/c2/client.pem       # optional, with key-file
//! key-file: /var/lib/clustermesh/c2/client-key.pem
//! pod-cidrs: [10.2.0.0/16]                             # optional
//! ```
//!
//! `pod-cidrs` declares the cluster's pod ranges: the agent admits only
//! remote nodes whose pod CIDRs lie inside them, and strict mode drops
//! traffic into them that the ip-cache cannot route (instead of handing it
//! to the host stack). Each is at most /8 (IPv6 /16) wide.
//!
//! Unknown fields are refused (a misspelt `cert-file` must not silently
//! fall back to plaintext).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use clustermesh_api::IpCidr;

use crate::etcd::EtcdConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterFile {
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The cluster's declared pod ranges (empty: none declared).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<IpCidr>,
}

/// Why a remote-cluster file is refused; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    #[error("cluster config {path}: not UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("cluster config {path}: {source}")]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_norway::Error,
    },
    #[error("cluster config {path}: endpoints: at least one etcd endpoint is required")]
    NoEndpoints { path: PathBuf },
    #[error("cluster config {path}: endpoints: {endpoint:?} must start with http:// or https://")]
    BadEndpoint { path: PathBuf, endpoint: String },
    #[error("cluster config {path}: cert-file and key-file go together")]
    CertWithoutKey { path: PathBuf },
    #[error("cluster config {path}: pod-cidrs: {cidr} is wider than /8 (IPv6 /16)")]
    PodCidrTooWide { path: PathBuf, cidr: IpCidr },
}

impl ClusterFile {
    /// Parses and validates a file's bytes (`path` only names it in errors).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, ClusterFileError> {
        let path = || path.to_owned();
        let text =
            std::str::from_utf8(bytes).map_err(|_| ClusterFileError::NotUtf8 { path: path() })?;
        let f: ClusterFile =
            serde_norway::from_str(text).map_err(|source| ClusterFileError::Yaml {
                path: path(),
                source,
            })?;
        if f.endpoints.is_empty() {
            return Err(ClusterFileError::NoEndpoints { path: path() });
        }
        if let Some(e) = f
            .endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err(ClusterFileError::BadEndpoint {
                path: path(),
                endpoint: e.clone(),
            });
        }
        if f.cert_file.is_some() != f.key_file.is_some() {
            return Err(ClusterFileError::CertWithoutKey { path: path() });
        }
        let min = |c: &IpCidr| if c.addr().is_ipv4() { 8 } else { 16 };
        if let Some(c) = f.pod_cidrs.iter().find(|c| c.prefix_len() < min(c)) {
            return Err(ClusterFileError::PodCidrTooWide {
                path: path(),
                cidr: *c,
            });
        }
        Ok(f)
    }

    /// The file's text, as `clustermesh connect` writes it.
    pub fn render(&self) -> String {
        let body = serde_norway::to_string(self).unwrap_or_default();
        format!("# written by clustermesh connect\n{body}")
    }

    /// How to connect to this cluster's etcd.
    pub fn etcd(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.endpoints.clone(),
            ca_file: self.trusted_ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn render_parses_back() {
        let f = ClusterFile {
            endpoints: vec![
                "https://192.0.2.1:2379".into(),
                "https://192.0.2.2:2379".into(),
            ],
            trusted_ca_file: Some("/d/ca.pem".into()),
            cert_file: Some("/d/client.pem".into()),
            key_file: Some("/d/client-key.pem".into()),
            pod_cidrs: vec![
                "10.2.0.0/16".parse().unwrap(),
                "fd00:2::/48".parse().unwrap(),
            ],
        };
        let text = f.render();
        assert!(text.contains("trusted-ca-file: /d/ca.pem"), "{text}");
        assert!(text.contains("10.2.0.0/16"), "{text}");
        assert_eq!(
            ClusterFile::parse(Path::new("c2"), text.as_bytes()).unwrap(),
            f
        );
        let plain = ClusterFile {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            pod_cidrs: Vec::new(),
        };
        let text = plain.render();
        assert!(!text.contains("cert-file"), "{text}");
        assert!(!text.contains("pod-cidrs"), "{text}");
        assert_eq!(
            ClusterFile::parse(Path::new("c2"), text.as_bytes()).unwrap(),
            plain
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_field() {
        let p = Path::new("/clusters/c2");
        let cases: [(&[u8], &str); 8] = [
            (b"endpoints: []\n", "at least one"),
            (b"endpoints: [127.0.0.1:2379]", "must start with http"),
            (b"endpoints: [http://a]\nbogus: 1", "bogus"),
            (b"endpoints: [http://a]\ncert-file: /c.pem\n", "go together"),
            (b"\xff\xfe", "not UTF-8"),
            (
                b"endpoints: [http://a]\npod-cidrs: [10.2.0.1/16]\n",
                "host bits",
            ),
            (
                b"endpoints: [http://a]\npod-cidrs: [0.0.0.0/0]\n",
                "wider than /8",
            ),
            (
                b"endpoints: [http://a]\npod-cidrs: 10.2.0.0/16\n",
                "pod-cidrs",
            ),
        ];
        for (bytes, want) in cases {
            let e = ClusterFile::parse(p, bytes).unwrap_err().to_string();
            assert!(e.contains("/clusters/c2") && e.contains(want), "{e}");
        }
        let ok = b"endpoints: [http://a]\npod-cidrs: [10.2.0.0/16, 10.3.0.0/16]\n";
        assert_eq!(ClusterFile::parse(p, ok).unwrap().pod_cidrs.len(), 2);
    }
}
