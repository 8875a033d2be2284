//! Remote-cluster configuration: a directory with one file per cluster, the
//! file name being the cluster name (as `clustermesh connect` writes them,
//! or a mounted Kubernetes Secret); the file format is
//! [`clustermesh_kvstore::cluster_file`]:
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

use std::{collections::BTreeMap, path::Path};

use clustermesh_api::ClusterName;
pub use clustermesh_kvstore::{ClusterFile, ClusterFileError};

/// A directory scan: cluster name -> (raw bytes, parsed file or error).
pub type Scan = BTreeMap<ClusterName, (Vec<u8>, Result<ClusterFile, ClusterFileError>)>;

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
            .as_ref()
            .unwrap_err();
        assert!(e.to_string().contains("at least one"), "{e}");
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
    }
}
