//! Remote-cluster configuration: a directory with one file per cluster, the
//! file name being the cluster name (as `clustermesh connect` writes them,
//! or a mounted Kubernetes Secret):
//!
//! ```yaml
//! endpoints:
//!   - https://192.0.2.10:2379
//! trusted-ca-file: /var/lib/clustermesh/c2/ca.pem     # optional
//! cert-file: /var/lib/clustermesh/c2/client.pem       # optional, with key-file
//! key-file: /var/lib/clustermesh/c2/client-key.pem
//! ```
//!
//! The directory is polled: a new file connects, a file whose bytes changed
//! reconnects, a removed file disconnects and drains that cluster. Files
//! whose names are not valid cluster names (dotfiles, editor swap files,
//! Kubernetes' `..data` links) are ignored.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use clustermesh_api::ClusterName;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterFile {
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub trusted_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster config {path}: {reason}")]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ClusterFile {
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError {
            path: path.display().to_string(),
            reason,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| err("not UTF-8".into()))?;
        let f: ClusterFile = serde_norway::from_str(text).map_err(|e| err(e.to_string()))?;
        if f.endpoints.is_empty() {
            return Err(err(
                "endpoints: at least one etcd endpoint is required".into()
            ));
        }
        for e in &f.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(err(format!(
                    "endpoints: {e:?} must start with http:// or https://"
                )));
            }
        }
        if f.cert_file.is_some() != f.key_file.is_some() {
            return Err(err("cert-file and key-file go together".into()));
        }
        Ok(f)
    }

    /// etcd connection options for this cluster.
    pub fn connect_options(&self) -> Result<etcd_client::ConnectOptions, std::io::Error> {
        use std::time::Duration;
        let mut o = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(3), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if self.trusted_ca_file.is_some() || self.cert_file.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.trusted_ca_file {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(ca)?));
            }
            if let (Some(c), Some(k)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    std::fs::read(c)?,
                    std::fs::read(k)?,
                ));
            }
            o = o.with_tls(tls);
        }
        Ok(o)
    }
}

/// A directory scan: cluster name -> (raw bytes, parsed file or error).
pub type Scan = BTreeMap<ClusterName, (Vec<u8>, Result<ClusterFile, ConfigError>)>;

pub fn scan(dir: &Path) -> std::io::Result<Scan> {
    let mut out = Scan::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        let Some(name) = ent.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Ok(cluster) = name.parse::<ClusterName>() else {
            continue;
        };
        let path = ent.path();
        // Follow symlinks (Kubernetes Secret volumes); skip directories.
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let parsed = ClusterFile::parse(&path, &bytes);
        out.insert(cluster, (bytes, parsed));
    }
    Ok(out)
}

/// What changed between two scans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirChange {
    Added(ClusterName),
    Changed(ClusterName),
    Removed(ClusterName),
}

pub fn diff(old: &Scan, new: &Scan) -> Vec<DirChange> {
    let mut out = Vec::new();
    for (name, (bytes, _)) in new {
        match old.get(name) {
            None => out.push(DirChange::Added(name.clone())),
            Some((b, _)) if b != bytes => out.push(DirChange::Changed(name.clone())),
            Some(_) => {}
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            out.push(DirChange::Removed(name.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn files_and_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c2"), "endpoints: [http://127.0.0.1:1]\n").unwrap();
        std::fs::write(dir.path().join(".c3.swp"), "junk").unwrap();
        std::fs::write(dir.path().join("c4"), "endpoints: []\n").unwrap();
        let a = scan(dir.path()).unwrap();
        assert_eq!(a.len(), 2);
        assert!(a[&"c2".parse::<ClusterName>().unwrap()].1.is_ok());
        let e = a[&"c4".parse::<ClusterName>().unwrap()]
            .1
            .clone()
            .unwrap_err();
        assert!(e.reason.contains("at least one"), "{e}");
        // Rewriting identical bytes is not a change; other bytes are.
        std::fs::write(dir.path().join("c2"), "endpoints: [http://127.0.0.1:1]\n").unwrap();
        assert!(diff(&a, &scan(dir.path()).unwrap()).is_empty());
        std::fs::write(dir.path().join("c2"), "endpoints: [http://127.0.0.1:2]\n").unwrap();
        std::fs::remove_file(dir.path().join("c4")).unwrap();
        let d = diff(&a, &scan(dir.path()).unwrap());
        assert_eq!(
            d,
            vec![
                DirChange::Changed("c2".parse().unwrap()),
                DirChange::Removed("c4".parse().unwrap())
            ]
        );
        assert!(ClusterFile::parse(Path::new("x"), b"endpoints: [127.0.0.1:2379]").is_err());
        assert!(ClusterFile::parse(Path::new("x"), b"endpoints: [http://a]\nbogus: 1").is_err());
    }
}
