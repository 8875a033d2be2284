//! `clustermesh enable`: a cluster's CA and certificates, and its cluster
//! file in the configuration directory.
//!
//! Certificates (all under `pki/<cluster>/`, issued once and kept on
//! re-runs): `etcd-server` and `apiserver-server` (the gRPC API's, for an
//! `https://` apiserver; SANs of both: the etcd endpoints' and apiserver's
//! hosts, 127.0.0.1, localhost, `--san`), `apiserver` (client, CN
//! `apiserver-<cluster>`: the apiserver's etcd user), `node` (client, CN
//! `remote-<cluster>`: the nodes' read-only user of their own etcd, the
//! role remote readers have), `admin` (client, CN `root`: the CLI's etcd
//! user for managing users, and the admin of the apiserver's gRPC API),
//! `nodes/<node>` per `--node` (client and server, CN `node:<node>`: that
//! node's agent on the apiserver's gRPC API, allowed to act only for its
//! own node, and the server certificate of its flow API, `--flows-listen`;
//! SANs 127.0.0.1, localhost and the hosts of the node's `status` and
//! `flows` addresses; removed with `--remove-node`, but valid until the CA
//! changes: there is no revocation list). A node certificate issued before
//! node certificates had the server usage is kept like any other: delete
//! `nodes/<node>.pem` and rerun enable to get the new one. The per-connection remote-client certificates (CN
//! `remote-<reader>`, from the exporter's CA) are issued by `connect`.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Result, anyhow, bail};
use clustermesh_api::{ClusterId, ClusterName};
use clustermesh_crypto::pki::{Ca, Usage};

use crate::{
    Ctx,
    config::{self, ClusterEntry, NodeEntry},
    print_json,
};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  clustermesh enable --cluster east --id 1 \\\n    --apiserver https://10.0.0.5:9950 --etcd-endpoints https://10.0.0.5:2379 \\\n    --node node-1,clusters-dir=/var/lib/clustermesh/clusters,status=10.0.0.11:9964"
)]
pub struct Args {
    /// The cluster's name (1-32 of a-z, 0-9, '-').
    #[arg(long)]
    pub cluster: String,
    /// The cluster's id (1..=255), unique in the mesh. Required the first
    /// time.
    #[arg(long)]
    pub id: Option<u64>,
    /// The apiserver's gRPC address (default https://127.0.0.1:9950: mutual
    /// TLS; http:// only for an apiserver run with --insecure-plaintext).
    #[arg(long)]
    pub apiserver: Option<String>,
    /// The cluster's etcd endpoints, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Extra subject alternative names (IPs or DNS names) of the server
    /// certificates (etcd's and the apiserver's).
    #[arg(long = "san", value_delimiter = ',')]
    pub sans: Vec<String>,
    /// The cluster's pod ranges (CIDRs, comma separated), e.g.
    /// 10.1.0.0/16: connected clusters admit this cluster's nodes only
    /// inside them and, in strict mode, drop plaintext to them. Given
    /// again, replaces the list.
    #[arg(long = "pod-cidr-range", value_delimiter = ',')]
    pub pod_cidrs: Vec<String>,
    /// A node: NAME,clusters-dir=PATH,status=HOST:PORT[,flows=HOST:PORT][,audit-log=PATH][,pid-file=PATH].
    /// Repeat for each node; a node given again replaces its entry.
    #[arg(long = "node", value_parser = parse_node)]
    pub nodes: Vec<NodeEntry>,
    /// Remove a node from the cluster file.
    #[arg(long = "remove-node")]
    pub remove_nodes: Vec<String>,
}

fn parse_node(s: &str) -> Result<NodeEntry, String> {
    let mut parts = s.split(',');
    let name = parts.next().unwrap_or_default().trim().to_owned();
    if name.is_empty() || name.contains('=') {
        return Err("starts with the node's name, e.g. node-1,clusters-dir=/var/lib/clustermesh/clusters,status=127.0.0.1:9964".into());
    }
    name.parse::<clustermesh_api::NodeName>()
        .map_err(|e| format!("node name {name:?}: {e}"))?;
    let (mut dir, mut status, mut flows, mut audit, mut pid) = (None, None, None, None, None);
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("{p:?} is not key=value"))?;
        match k.trim() {
            "clusters-dir" => dir = Some(v.into()),
            "status" => status = Some(v.to_owned()),
            "flows" => flows = Some(v.to_owned()),
            "audit-log" => audit = Some(v.into()),
            "pid-file" => pid = Some(v.into()),
            o => {
                return Err(format!(
                    "unknown key {o:?} (clusters-dir, status, flows, audit-log, pid-file)"
                ));
            }
        }
    }
    let status = status.ok_or("status=HOST:PORT (the agent's --status-listen) is required")?;
    if !status.contains(':') {
        return Err(format!("status {status:?} is not HOST:PORT"));
    }
    if let Some(f) = flows.as_ref().filter(|f| !f.contains(':')) {
        return Err(format!(
            "flows {f:?} is not HOST:PORT (the agent's --flows-listen)"
        ));
    }
    Ok(NodeEntry {
        name,
        clusters_dir: dir.ok_or("clusters-dir=PATH (the agent's --clusters-dir) is required")?,
        status,
        flows,
        audit_log: audit,
        pid_file: pid,
    })
}

fn host_of(endpoint: &str) -> Option<String> {
    let rest = endpoint.split_once("://")?.1;
    let hostport = rest.split('/').next()?;
    let host = if let Some(h) = hostport.strip_prefix('[') {
        h.split(']').next()?
    } else {
        hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// The host of a `host:port` (or `[v6]:port`) address.
pub fn host_of_addr(addr: &str) -> Option<String> {
    host_of(&format!("tcp://{addr}"))
}

/// The SANs of a node's certificate (also the server certificate of its
/// flow API): 127.0.0.1, localhost and the hosts of its `status` and
/// `flows` addresses.
pub fn node_sans(n: &NodeEntry) -> Vec<String> {
    let mut sans: Vec<String> = vec!["127.0.0.1".into(), "localhost".into()];
    sans.extend(host_of_addr(&n.status));
    sans.extend(n.flows.as_deref().and_then(host_of_addr));
    sans.sort();
    sans.dedup();
    sans
}

/// Writes a certificate pair unless it exists; returns whether it was
/// created.
fn ensure_cert(
    dir: &Path,
    file: &str,
    ca: &Ca,
    cn: &str,
    sans: &[&str],
    usage: Usage,
) -> Result<bool> {
    let cert = dir.join(format!("{file}.pem"));
    let key = dir.join(format!("{file}-key.pem"));
    if cert.is_file() && key.is_file() {
        return Ok(false);
    }
    let issued = ca
        .issue(cn, sans, usage)
        .map_err(|e| anyhow!("issuing the {file} certificate: {e}"))?;
    config::write_atomic(&key, issued.key_pem.as_bytes(), 0o600)?;
    config::write_atomic(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    Ok(true)
}

/// Loads the cluster's CA, creating it the first time.
pub fn load_or_create_ca(dir: &Path, cluster: &str) -> Result<(Ca, bool)> {
    let name = format!("clustermesh-ca-{cluster}");
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert.is_file() && key.is_file() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| anyhow!("cannot read {}: {e}", p.display()))
        };
        let ca = Ca::load(&name, &read(&cert)?, &read(&key)?)
            .map_err(|e| anyhow!("the CA in {} cannot be used: {e}", dir.display()))?;
        return Ok((ca, false));
    }
    let ca = Ca::generate(&name).map_err(|e| anyhow!("creating the CA: {e}"))?;
    config::write_atomic(&key, ca.key_pem().as_bytes(), 0o600)?;
    config::write_atomic(&cert, ca.cert_pem().as_bytes(), 0o644)?;
    Ok((ca, true))
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<bool> {
    let name: ClusterName = a
        .cluster
        .parse()
        .map_err(|e| anyhow!("--cluster {:?}: {e}", a.cluster))?;
    let all = ctx.dir.all()?;
    let existing = all.get(name.as_str()).cloned();
    let id = cluster_id(ctx, &all, &name, a.id, existing.as_ref())?;
    let sans = a.sans.clone();
    let entry = updated_entry(existing.clone(), &name, id, a)?;

    let pki = ctx.dir.pki(&entry.name);
    let certs = issue_certificates(&pki, &entry, sans)?;
    let changed = existing.as_ref() != Some(&entry);
    let file = ctx.dir.save(&entry)?;

    let next = next_commands(&entry, &pki);
    if ctx.json() {
        print_json(&serde_json::json!({
            "cluster": entry.name,
            "id": entry.id,
            "file": file,
            "file_changed": changed,
            "created": certs.created,
            "kept": certs.kept,
            "next": next,
        }));
    } else {
        println!(
            "cluster {} (id {}): {} {}",
            entry.name,
            entry.id,
            if existing.is_none() {
                "wrote"
            } else if changed {
                "updated"
            } else {
                "unchanged"
            },
            file.display()
        );
        for c in &certs.created {
            println!("  created {c}");
        }
        for k in &certs.kept {
            println!("  kept    {k}");
        }
        println!("next:");
        for (i, n) in next.iter().enumerate() {
            println!("  {}. {n}", i + 1);
        }
    }
    Ok(true)
}

/// The cluster's id: `--id`, else the existing entry's; valid and unique
/// in the mesh (`all`).
fn cluster_id(
    ctx: &Ctx,
    all: &BTreeMap<String, ClusterEntry>,
    name: &ClusterName,
    id: Option<u64>,
    existing: Option<&ClusterEntry>,
) -> Result<u64> {
    let id = match (id, existing) {
        (Some(id), _) => id,
        (None, Some(e)) => e.id,
        (None, None) => {
            bail!("--id is required to enable a new cluster (a number 1..=255, unique in the mesh)")
        }
    };
    ClusterId::new(id).map_err(|e| anyhow!("--id {id}: {e}"))?;
    if let Some(other) = all.values().find(|c| c.id == id && c.name != name.as_str()) {
        bail!(
            "cluster id {id} is already used by cluster {} ({}); give each cluster a unique id (1..=255)",
            other.name,
            ctx.dir.cluster_file(&other.name).display()
        );
    }
    Ok(id)
}

/// The cluster's entry: the existing one (or a new one) with the
/// arguments applied, validated.
fn updated_entry(
    existing: Option<ClusterEntry>,
    name: &ClusterName,
    id: u64,
    a: Args,
) -> Result<ClusterEntry> {
    let Args {
        apiserver,
        etcd_endpoints,
        pod_cidrs,
        nodes,
        remove_nodes,
        ..
    } = a;
    let mut entry = existing.unwrap_or_else(|| ClusterEntry {
        name: name.to_string(),
        id,
        apiserver: "https://127.0.0.1:9950".into(),
        etcd_endpoints: vec![],
        pod_cidrs: vec![],
        nodes: vec![],
    });
    entry.id = id;
    if !pod_cidrs.is_empty() {
        entry.pod_cidrs = pod_cidrs;
    }
    if let Some(api) = apiserver {
        entry.apiserver = api;
    }
    if !etcd_endpoints.is_empty() {
        entry.etcd_endpoints = etcd_endpoints;
    }
    if entry.etcd_endpoints.is_empty() {
        bail!("--etcd-endpoints is required to enable a new cluster (e.g. https://10.0.0.5:2379)");
    }
    for n in nodes {
        match entry.nodes.iter_mut().find(|x| x.name == n.name) {
            Some(x) => *x = n,
            None => entry.nodes.push(n),
        }
    }
    entry.nodes.retain(|n| !remove_nodes.contains(&n.name));
    config::validate_entry(&entry)?;
    Ok(entry)
}

/// The certificate files of [`issue_certificates`], created or kept.
struct Certificates {
    created: Vec<String>,
    kept: Vec<String>,
}

/// The cluster's CA and certificates under `pki`, each issued unless it
/// exists (module docs); `sans`: the `--san` extra names.
fn issue_certificates(pki: &Path, entry: &ClusterEntry, sans: Vec<String>) -> Result<Certificates> {
    let (ca, ca_created) = load_or_create_ca(pki, &entry.name)?;
    let mut all_sans: Vec<String> = vec!["127.0.0.1".into(), "localhost".into()];
    all_sans.extend(entry.etcd_endpoints.iter().filter_map(|e| host_of(e)));
    all_sans.extend(host_of(&entry.apiserver));
    all_sans.extend(sans);
    all_sans.sort();
    all_sans.dedup();
    let san_refs: Vec<&str> = all_sans.iter().map(String::as_str).collect();
    let mut certs = Certificates {
        created: Vec::new(),
        kept: Vec::new(),
    };
    let mut note = |file: &str, was_created: bool| {
        let p = pki.join(format!("{file}.pem")).display().to_string();
        if was_created {
            certs.created.push(p)
        } else {
            certs.kept.push(p)
        }
    };
    note("ca", ca_created);
    note(
        "etcd-server",
        ensure_cert(pki, "etcd-server", &ca, "etcd", &san_refs, Usage::Server)?,
    );
    let api_user = format!("apiserver-{}", entry.name);
    note(
        "apiserver",
        ensure_cert(pki, "apiserver", &ca, &api_user, &[], Usage::Client)?,
    );
    note(
        "apiserver-server",
        ensure_cert(
            pki,
            "apiserver-server",
            &ca,
            "clustermesh-apiserver",
            &san_refs,
            Usage::Server,
        )?,
    );
    let node_user = format!("remote-{}", entry.name);
    note(
        "node",
        ensure_cert(pki, "node", &ca, &node_user, &[], Usage::Client)?,
    );
    note(
        "admin",
        ensure_cert(pki, "admin", &ca, "root", &[], Usage::Client)?,
    );
    let nodes = pki.join("nodes");
    std::fs::create_dir_all(&nodes)
        .map_err(|e| anyhow!("cannot create {}: {e}", nodes.display()))?;
    for n in &entry.nodes {
        let file = format!("nodes/{}", n.name);
        let cn = format!("node:{}", n.name);
        let sans = node_sans(n);
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        note(
            &file,
            ensure_cert(pki, &file, &ca, &cn, &sans, Usage::ServerAndClient)?,
        );
    }
    // A removed node's certificate files go (the CA still vouches for them:
    // rotate the CA to revoke).
    if let Ok(rd) = std::fs::read_dir(&nodes) {
        for f in rd.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let node = name.trim_end_matches(".pem").trim_end_matches("-key");
            if !entry.nodes.iter().any(|n| n.name == node) {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
    Ok(certs)
}

/// What to run next: etcd, the apiserver, the agents, then `connect`,
/// with the certificates under `pki`.
fn next_commands(entry: &ClusterEntry, pki: &Path) -> Vec<String> {
    let p = |f: &str| pki.join(f).display().to_string();
    let endpoints = entry.etcd_endpoints.join(",");
    let mut next = Vec::new();
    if entry.tls() {
        next.push(format!(
            "run etcd with --cert-file {} --key-file {} --trusted-ca-file {} --client-cert-auth",
            p("etcd-server.pem"),
            p("etcd-server-key.pem"),
            p("ca.pem")
        ));
    }
    next.push(apiserver_command(entry, &p));
    if entry.nodes.is_empty() {
        next.push(format!(
            "add the nodes: clustermesh enable --cluster {} --node NAME,clusters-dir=PATH,status=HOST:PORT",
            entry.name
        ));
    }
    for n in &entry.nodes {
        next.push(format!(
            "run the agent of node {}: node-agent --cluster-name {} --node-name {} --apiserver {}{} --local-etcd-endpoints {endpoints}{} --clusters-dir {} --status-listen {}{}",
            n.name,
            entry.name,
            n.name,
            entry.apiserver,
            if entry.apiserver.starts_with("https://") {
                format!(
                    " --apiserver-ca {} --apiserver-cert {} --apiserver-key {}",
                    p("ca.pem"),
                    p(&format!("nodes/{}.pem", n.name)),
                    p(&format!("nodes/{}-key.pem", n.name))
                )
            } else {
                String::new()
            },
            if entry.tls() {
                format!(
                    " --local-etcd-ca {} --local-etcd-cert {} --local-etcd-key {}",
                    p("ca.pem"),
                    p("node.pem"),
                    p("node-key.pem")
                )
            } else {
                String::new()
            },
            n.clusters_dir.display(),
            n.status,
            n.flows
                .as_ref()
                .map_or(String::new(), |f| format!(" --flows-listen {f}"))
        ));
    }
    next.push(format!(
        "connect it: clustermesh connect --cluster {} --destination <other cluster>",
        entry.name
    ));
    next
}

/// The apiserver's command line; `p`: a PKI file's path.
fn apiserver_command(entry: &ClusterEntry, p: &dyn Fn(&str) -> String) -> String {
    let endpoints = entry.etcd_endpoints.join(",");
    format!(
        "run the apiserver: clustermesh-apiserver --cluster-name {} --cluster-id {} --etcd-endpoints {endpoints} --listen {}{}",
        entry.name,
        entry.id,
        entry
            .apiserver
            .split_once("://")
            .map_or(entry.apiserver.as_str(), |(_, r)| r),
        if entry.tls() {
            format!(
                " --etcd-ca {} --etcd-cert {} --etcd-key {}",
                p("ca.pem"),
                p("apiserver.pem"),
                p("apiserver-key.pem")
            )
        } else {
            String::new()
        },
    ) + &if entry.apiserver.starts_with("https://") {
        format!(
            " --tls-cert {} --tls-key {} --tls-client-ca {}",
            p("apiserver-server.pem"),
            p("apiserver-server-key.pem"),
            p("ca.pem")
        )
    } else {
        " --insecure-plaintext".to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_specs() {
        let n = parse_node("n1,clusters-dir=/x,status=127.0.0.1:1").unwrap();
        assert_eq!(n.name, "n1");
        assert_eq!(n.status, "127.0.0.1:1");
        assert!(
            parse_node("n1,status=127.0.0.1:1")
                .unwrap_err()
                .contains("clusters-dir")
        );
        assert!(
            parse_node("n1,clusters-dir=/x")
                .unwrap_err()
                .contains("status")
        );
        assert!(
            parse_node("n1,bogus=1")
                .unwrap_err()
                .contains("unknown key")
        );
        assert!(parse_node("Bad_Name,clusters-dir=/x,status=a:1").is_err());
        assert_eq!(n.flows, None);
        let n = parse_node("n1,clusters-dir=/x,status=10.0.0.11:1,flows=10.0.0.12:2").unwrap();
        assert_eq!(n.flows.as_deref(), Some("10.0.0.12:2"));
        assert_eq!(
            node_sans(&n),
            ["10.0.0.11", "10.0.0.12", "127.0.0.1", "localhost"]
        );
        assert!(
            parse_node("n1,clusters-dir=/x,status=a:1,flows=nohostport")
                .unwrap_err()
                .contains("flows")
        );
        assert!(
            parse_node("n1,bogus=1")
                .unwrap_err()
                .contains("flows, audit-log")
        );
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("https://10.0.0.5:2379").unwrap(), "10.0.0.5");
        assert_eq!(host_of("http://etcd.local:2379").unwrap(), "etcd.local");
        assert_eq!(host_of("https://[::1]:2379").unwrap(), "::1");
        assert_eq!(host_of_addr("[fd00::1]:9965").unwrap(), "fd00::1");
        assert_eq!(host_of_addr("node-1.local:9965").unwrap(), "node-1.local");
    }
}
