//! The CLI's standalone state: a configuration directory (`--config-dir`,
//! `$CLUSTERMESH_CONFIG_DIR`, default `/etc/clustermesh`) holding
//!
//! ```text
//! clusters/<name>.yaml         one per enabled cluster (ClusterEntry): id, apiserver,
//!                              etcd endpoints, and its nodes (clusters dir, status and
//!                              flows addresses)
//! pki/<name>/ca.pem, ca-key.pem                 the cluster's CA (created by enable)
//! pki/<name>/etcd-server.pem, etcd-server-key.pem   etcd's server certificate
//! pki/<name>/apiserver.pem, apiserver-key.pem   the apiserver's etcd client (CN apiserver-<name>)
//! pki/<name>/admin.pem, admin-key.pem           the CLI's etcd client (CN root)
//! pki/<name>/remote-<other>.pem, -key.pem       read-only client of <other>'s nodes (CN remote-<other>),
//!                                               issued by connect
//! ```
//!
//! Everything is plain files so they can be read, versioned or copied to
//! where the nodes' clusters directories live. Writes are atomic (write to
//! a dotfile, rename), private keys mode 0600.

use std::{
    collections::BTreeMap,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clustermesh_api::{ClusterId, ClusterName};
use serde::{Deserialize, Serialize};

pub const DEFAULT_DIR: &str = "/etc/clustermesh";

/// One node of a cluster, as the CLI reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeEntry {
    pub name: String,
    /// The node agent's `--clusters-dir` (connect writes remote-cluster
    /// files here).
    pub clusters_dir: PathBuf,
    /// The node agent's `--status-listen` address (host:port).
    pub status: String,
    /// The node agent's `--flows-listen` address (host:port): its flow
    /// API (`clustermesh observe`). Absent: the node is not observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<String>,
    /// The node agent's `--audit-log` (encryption audit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
    /// A file holding the node agent's pid (encryption rotate-keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
}

/// `clusters/<name>.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterEntry {
    pub name: String,
    pub id: u64,
    /// The apiserver's gRPC address, `http://host:port`.
    pub apiserver: String,
    /// The cluster's etcd endpoints (for the CLI's admin operations).
    pub etcd_endpoints: Vec<String>,
    /// The cluster's declared pod ranges (`enable --pod-cidr-range`):
    /// `connect` writes them into the other clusters' remote-cluster files,
    /// so their agents admit this cluster's nodes only inside them and, in
    /// strict mode, never send traffic for them in plaintext.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
}

impl ClusterEntry {
    pub fn tls(&self) -> bool {
        self.etcd_endpoints
            .iter()
            .any(|e| e.starts_with("https://"))
    }
}

/// The configuration directory.
#[derive(Debug, Clone)]
pub struct ConfigDir {
    pub root: PathBuf,
}

impl ConfigDir {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn clusters_dir(&self) -> PathBuf {
        self.root.join("clusters")
    }

    pub fn cluster_file(&self, name: &str) -> PathBuf {
        self.clusters_dir().join(format!("{name}.yaml"))
    }

    pub fn pki(&self, name: &str) -> PathBuf {
        self.root.join("pki").join(name)
    }

    /// Every enabled cluster, by name. A file that does not parse is an
    /// error naming it.
    pub fn all(&self) -> Result<BTreeMap<String, ClusterEntry>> {
        let mut out = BTreeMap::new();
        let rd = match std::fs::read_dir(self.clusters_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(anyhow!(
                    "cannot read {}: {e}; check --config-dir",
                    self.clusters_dir().display()
                ));
            }
        };
        for ent in rd {
            let ent = ent.with_context(|| format!("reading {}", self.clusters_dir().display()))?;
            let path = ent.path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let c = read_entry(&path)?;
            out.insert(c.name.clone(), c);
        }
        Ok(out)
    }

    /// The named cluster; a misspelt name says which ones exist.
    pub fn get(&self, name: &str) -> Result<ClusterEntry> {
        let path = self.cluster_file(name);
        if path.is_file() {
            return read_entry(&path);
        }
        let known: Vec<String> = self.all()?.into_keys().collect();
        if known.is_empty() {
            bail!(
                "cluster {name:?} is not known: no cluster is enabled in {} (run `clustermesh enable --cluster {name} ...`, or pass the right --config-dir)",
                self.root.display()
            );
        }
        let hint = known
            .iter()
            .filter(|k| close(k, name))
            .min_by_key(|k| distance(k, name))
            .map(|k| format!("did you mean {k:?}? "))
            .unwrap_or_default();
        bail!(
            "cluster {name:?} is not known: {hint}enabled clusters in {} are {}",
            self.root.display(),
            known.join(", ")
        )
    }

    pub fn save(&self, c: &ClusterEntry) -> Result<PathBuf> {
        let path = self.cluster_file(&c.name);
        let yaml = serde_norway::to_string(c).context("encoding the cluster file")?;
        write_atomic(&path, yaml.as_bytes(), 0o644)?;
        Ok(path)
    }
}

fn read_entry(path: &Path) -> Result<ClusterEntry> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let c: ClusterEntry = serde_norway::from_str(&text)
        .map_err(|e| anyhow!("{} is not a valid cluster file: {e}", path.display()))?;
    validate_entry(&c).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(c)
}

pub fn validate_entry(c: &ClusterEntry) -> Result<()> {
    c.name
        .parse::<ClusterName>()
        .map_err(|e| anyhow!("name {:?}: {e}", c.name))?;
    ClusterId::new(c.id).map_err(|e| anyhow!("id: {e}"))?;
    if !(c.apiserver.starts_with("http://") || c.apiserver.starts_with("https://")) {
        bail!(
            "apiserver {:?} must start with http:// or https://",
            c.apiserver
        );
    }
    for p in &c.pod_cidrs {
        p.parse::<clustermesh_api::IpCidr>()
            .map_err(|e| anyhow!("pod CIDR range {p:?}: {e}"))?;
    }
    for e in &c.etcd_endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            bail!("etcd endpoint {e:?} must start with http:// or https://");
        }
    }
    for n in &c.nodes {
        if n.status.parse::<std::net::SocketAddr>().is_err() && !n.status.contains(':') {
            bail!("node {}: status {:?} is not host:port", n.name, n.status);
        }
        if let Some(f) = n.flows.as_ref().filter(|f| !f.contains(':')) {
            bail!("node {}: flows {f:?} is not host:port", n.name);
        }
    }
    Ok(())
}

/// At most two edits apart (a typo), or one is a prefix of the other.
fn close(a: &str, b: &str) -> bool {
    a.starts_with(b) || b.starts_with(a) || distance(a, b) <= 2
}

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Writes `bytes` to `path` atomically (a dotfile in the same directory,
/// then rename), creating the directory. Returns whether the content
/// changed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<bool> {
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(false);
    }
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{file}.tmp-{}", std::process::id()));
    {
        use std::io::Write as _;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))?;
        f.write_all(bytes)
            .map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(true)
}

/// Removes a file; a missing one is fine. Returns whether it existed.
pub fn remove(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow!("cannot remove {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn typos_are_close() {
        assert!(close("c1", "c2"));
        assert!(close("east", "eats"));
        assert!(close("cluster-a", "cluster"));
        assert!(!close("east", "westward"));
    }

    #[test]
    fn entries_round_trip_and_unknown_names_list_the_known() {
        let dir = tempfile::tempdir().unwrap();
        let cd = ConfigDir::new(dir.path().into());
        let c = ClusterEntry {
            name: "east".into(),
            id: 1,
            apiserver: "https://127.0.0.1:9950".into(),
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            pod_cidrs: vec!["10.1.0.0/16".into()],
            nodes: vec![NodeEntry {
                name: "n1".into(),
                clusters_dir: "/tmp/x".into(),
                status: "127.0.0.1:9964".into(),
                flows: Some("127.0.0.1:9965".into()),
                audit_log: None,
                pid_file: None,
            }],
        };
        cd.save(&c).unwrap();
        assert_eq!(cd.get("east").unwrap(), c);
        let e = cd.get("eats").unwrap_err().to_string();
        assert!(
            e.contains("did you mean \"east\"") && e.contains("east"),
            "{e}"
        );
        assert!(
            !write_atomic(
                &cd.cluster_file("east"),
                serde_norway::to_string(&c).unwrap().as_bytes(),
                0o644
            )
            .unwrap()
        );
    }
}
