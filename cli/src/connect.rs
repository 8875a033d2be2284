//! `clustermesh connect` and `disconnect`.
//!
//! A connection is directional: reader R's nodes watch exporter X's etcd.
//! For each direction, connect
//! 1. validates everything first (both apiservers answer and agree with the
//!    cluster files; ids and names unique, also against the clusters R is
//!    already connected to; pod CIDRs disjoint; encryption compatible) and
//!    changes nothing if anything is refused;
//! 2. with a TLS etcd (https endpoints), creates in X's etcd the read-only
//!    user `remote-R` (role `clustermesh-remote-read`, the apiserver's
//!    `remote_access`; etcd auth is enabled if it was not, after granting
//!    X's own nodes their reader `remote-X`) and issues from
//!    X's CA a client certificate whose CN is that user
//!    (`pki/X/remote-R.pem`): etcd `--client-cert-auth` maps it to the
//!    user, so R's nodes can read X's public prefixes and nothing else. A
//!    plaintext etcd has no users: the file only names its endpoints;
//! 3. writes on every node of R `<clusters-dir>/X` (endpoints, and the CA
//!    and client certificate copied to `<clusters-dir>/.tls/X/`), atomically;
//!    identical content is left untouched, so re-running changes nothing.
//!
//! Disconnect removes the files and revokes the user. `--wait` polls every
//! node's `/status` until the remote cluster is synced (or gone).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Result, anyhow, bail};
use clustermesh_api::{IpCidr, proto};
use clustermesh_crypto::pki::Usage;

use crate::{
    Ctx, Mode,
    clients::{Api, agent_status, one_line},
    config::{self, ClusterEntry, ConfigDir},
    parse_duration, print_json, status,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The source cluster.
    #[arg(long)]
    pub cluster: String,
    /// The destination cluster(s), comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub destination: Vec<String>,
    /// unicast: the source watches the destinations; bidirectional: both
    /// ways; mesh: every listed cluster watches every other.
    #[arg(long, value_enum, default_value_t = Mode::Bidirectional)]
    pub mode: Mode,
    /// Wait until every node reports the change (synced, or gone).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, value_parser = parse_duration, default_value = "2m")]
    pub timeout: Duration,
}

/// Ordered (reader, exporter) pairs: reader's nodes watch exporter's etcd.
type Pairs = Vec<(String, String)>;

/// The clusters named by a request, and its directions.
fn directions(a: &Args) -> Result<(Vec<String>, Pairs)> {
    let mut names = vec![a.cluster.clone()];
    for d in &a.destination {
        if d == &a.cluster {
            bail!("cannot connect cluster {d} to itself; name another cluster in --destination");
        }
        if names.contains(d) {
            bail!("cluster {d} is named twice in --destination");
        }
        names.push(d.clone());
    }
    let mut pairs = Vec::new();
    match a.mode {
        Mode::Unicast => {
            for d in &a.destination {
                pairs.push((a.cluster.clone(), d.clone()));
            }
        }
        Mode::Bidirectional => {
            for d in &a.destination {
                pairs.push((a.cluster.clone(), d.clone()));
                pairs.push((d.clone(), a.cluster.clone()));
            }
        }
        Mode::Mesh => {
            for r in &names {
                for x in &names {
                    if r != x {
                        pairs.push((r.clone(), x.clone()));
                    }
                }
            }
        }
    }
    Ok((names, pairs))
}

/// Remote clusters a cluster's nodes are configured to watch (file names in
/// their clusters directories).
pub fn configured_remotes(c: &ClusterEntry) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in &c.nodes {
        let Ok(rd) = std::fs::read_dir(&n.clusters_dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Some(f) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if f.parse::<clustermesh_api::ClusterName>().is_ok() && e.path().is_file() {
                out.entry(f).or_default().push(n.name.clone());
            }
        }
    }
    out
}

/// Clusters connected to `c` in either direction (as the nodes' files say).
pub fn connected_clusters(
    all: &BTreeMap<String, ClusterEntry>,
    c: &ClusterEntry,
) -> std::collections::BTreeSet<String> {
    let mut out: std::collections::BTreeSet<String> = configured_remotes(c).into_keys().collect();
    for (name, other) in all {
        if name != &c.name && configured_remotes(other).contains_key(&c.name) {
            out.insert(name.clone());
        }
    }
    out.remove(&c.name);
    out
}

fn cidrs(info: &proto::ClusterInfo) -> Vec<IpCidr> {
    info.pod_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

fn strict(info: &proto::ClusterInfo) -> bool {
    info.encryption.as_ref().is_some_and(|e| e.strict)
}

fn encryption_off(info: &proto::ClusterInfo) -> bool {
    info.encryption
        .as_ref()
        .is_none_or(|e| e.mode.is_empty() || e.mode == "none")
}

/// Refusals between two clusters that would be connected.
fn check_pair(a: &proto::ClusterInfo, b: &proto::ClusterInfo) -> Result<()> {
    check_merge(a, b)?;
    for (s, o) in [(a, b), (b, a)] {
        if strict(s) && encryption_off(o) {
            bail!(
                "cluster {} enforces strict encryption but cluster {} has encryption off, so their traffic would be dropped; turn WireGuard on in {} (`clustermesh encryption enable --cluster {}`) or strict mode off in {} (`clustermesh encryption strict off --cluster {}`)",
                s.name,
                o.name,
                o.name,
                o.name,
                s.name,
                s.name
            );
        }
    }
    Ok(())
}

/// Refusals between two clusters one node would merge: ids, names and
/// pod CIDRs must not collide.
fn check_merge(a: &proto::ClusterInfo, b: &proto::ClusterInfo) -> Result<()> {
    if a.id == b.id {
        bail!(
            "clusters {} and {} both have cluster id {}; cluster ids must be unique in the mesh: give one of them another id (`clustermesh enable --cluster {} --id N`, then restart its apiserver with --cluster-id N)",
            a.name,
            b.name,
            a.id,
            b.name
        );
    }
    if a.name == b.name {
        bail!(
            "both apiservers call themselves cluster {}; cluster names must be unique in the mesh: check --cluster-name of each apiserver",
            a.name
        );
    }
    for x in cidrs(a) {
        for y in cidrs(b) {
            if x.overlaps(&y) {
                bail!(
                    "pod CIDR {x} of cluster {} overlaps pod CIDR {y} of cluster {}; pod addresses must be unique across the mesh: give the nodes of one cluster pod CIDRs that do not overlap",
                    a.name,
                    b.name
                );
            }
        }
    }
    Ok(())
}

/// Fetches and cross-checks the apiserver's view of a cluster.
async fn info_of(cd: &ConfigDir, c: &ClusterEntry) -> Result<proto::ClusterInfo> {
    let mut api = Api::connect(cd, c).await?;
    let info = api.info().await?;
    if info.name != c.name {
        bail!(
            "the apiserver at {} says it is cluster {:?}, but {} names it {:?}; fix `apiserver` in that file or the apiserver's --cluster-name",
            c.apiserver,
            info.name,
            cd.cluster_file(&c.name).display(),
            c.name
        );
    }
    if u64::from(info.id) != c.id {
        bail!(
            "the apiserver of cluster {} runs with cluster id {}, but {} says {}; re-run `clustermesh enable --cluster {} --id {}` or restart the apiserver with --cluster-id {}",
            c.name,
            info.id,
            cd.cluster_file(&c.name).display(),
            c.id,
            c.name,
            info.id,
            c.id
        );
    }
    Ok(info)
}

/// An admin etcd client of a TLS cluster (certificate CN root).
pub(crate) async fn etcd_admin(cd: &ConfigDir, c: &ClusterEntry) -> Result<etcd_client::Client> {
    let pki = cd.pki(&c.name);
    for f in ["ca.pem", "admin.pem", "admin-key.pem"] {
        if let Err(e) = std::fs::metadata(pki.join(f)) {
            return Err(anyhow!(
                "cannot read {} ({e}); run `clustermesh enable --cluster {}` first",
                pki.join(f).display(),
                c.name
            ));
        }
    }
    let etcd = clustermesh_kvstore::EtcdConfig {
        endpoints: c.etcd_endpoints.clone(),
        ca_file: Some(pki.join("ca.pem")),
        cert_file: Some(pki.join("admin.pem")),
        key_file: Some(pki.join("admin-key.pem")),
    };
    let r = async {
        let mut client = etcd.connect().await?;
        // The connection is lazy: probe it so a wrong certificate shows here.
        client
            .status()
            .await
            .map_err(|source| clustermesh_kvstore::Error::Connect {
                endpoints: c.etcd_endpoints.join(","),
                source,
            })?;
        Ok::<_, clustermesh_kvstore::Error>(client)
    }
    .await;
    match r {
        Ok(client) => Ok(client),
        // A refused TLS handshake reads like a closed connection: if etcd's
        // port answers, it is the credentials.
        Err(e) if port_answers(&c.etcd_endpoints).await => Err(anyhow!(
            "etcd of cluster {} refused the CLI's admin certificate ({}); check that etcd runs with --client-cert-auth --trusted-ca-file pki/{}/ca.pem and that pki/{}/admin.pem is the one enable created",
            c.name,
            one_line(&e.to_string()),
            c.name,
            c.name
        )),
        Err(e) => Err(etcd_error(c, &e)),
    }
}

/// Whether any endpoint's TCP port accepts a connection.
pub async fn port_answers(endpoints: &[String]) -> bool {
    for e in endpoints {
        let Some(hostport) = e.split_once("://").map(|(_, r)| r.trim_end_matches('/')) else {
            continue;
        };
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(hostport),
        )
        .await
        {
            return true;
        }
    }
    false
}

fn etcd_error(c: &ClusterEntry, e: &dyn std::fmt::Display) -> anyhow::Error {
    let t = one_line(&e.to_string());
    let lower = t.to_lowercase();
    if lower.contains("permission denied")
        || lower.contains("certificate")
        || lower.contains("authentication")
        || lower.contains("tls")
        || lower.contains("handshake")
    {
        anyhow!(
            "etcd of cluster {} refused the CLI's admin certificate ({t}); check that etcd runs with --client-cert-auth --trusted-ca-file pki/{}/ca.pem from this config dir",
            c.name,
            c.name
        )
    } else {
        anyhow!(
            "cannot reach etcd of cluster {} at {} ({t}); check that it is running and `etcd-endpoints` in its cluster file",
            c.name,
            c.etcd_endpoints.join(",")
        )
    }
}

/// What one direction does on one node.
#[derive(Debug, serde::Serialize)]
struct FileAction {
    reader: String,
    exporter: String,
    node: String,
    file: PathBuf,
    changed: bool,
}

fn tls_dir(node_dir: &std::path::Path, exporter: &str) -> PathBuf {
    node_dir.join(".tls").join(exporter)
}

/// A reader's credentials for an exporter's TLS etcd: the CA (PEM), the
/// client certificate and key.
type Credentials = (String, Vec<u8>, Vec<u8>);

pub async fn connect(ctx: &Ctx, a: Args) -> Result<bool> {
    let (names, pairs) = directions(&a)?;
    let cd = &ctx.dir;
    let mut entries = BTreeMap::new();
    for n in &names {
        entries.insert(n.clone(), cd.get(n)?);
    }
    let mut infos = BTreeMap::new();
    for (n, c) in &entries {
        infos.insert(n.clone(), info_of(cd, c).await?);
    }
    // Validation, before anything changes.
    for (i, x) in names.iter().enumerate() {
        for y in &names[i + 1..] {
            check_pair(&infos[x], &infos[y])?;
        }
    }
    check_readers(cd, &names, &pairs, &entries, &infos).await?;
    // A declared range that leaves out a node's CIDR would have the
    // readers refuse that node: say so before writing anything.
    for x in &names {
        let declared: Vec<IpCidr> = entries[x]
            .pod_cidrs
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        if declared.is_empty() {
            continue;
        }
        if let Some(c) = cidrs(&infos[x])
            .into_iter()
            .find(|c| !declared.iter().any(|d| d.contains_cidr(c)))
        {
            bail!(
                "cluster {x} has a node with pod CIDR {c}, outside its declared pod ranges [{}]; widen them with `clustermesh enable --cluster {x} --pod-cidr-range ...`",
                entries[x].pod_cidrs.join(", ")
            );
        }
    }
    let endpoints_of = |x: &str| {
        if infos[x].etcd_endpoints.is_empty() {
            entries[x].etcd_endpoints.clone()
        } else {
            infos[x].etcd_endpoints.clone()
        }
    };
    // Reach every TLS etcd before changing anything: a wrong credential
    // or an unreachable etcd changes nothing.
    let mut admins = BTreeMap::new();
    for (_, x) in &pairs {
        let tls = endpoints_of(x).iter().any(|e| e.starts_with("https://"));
        if tls && !admins.contains_key(x) {
            admins.insert(x.clone(), etcd_admin(cd, &entries[x]).await?);
        }
    }
    // Apply.
    let mut actions = Vec::new();
    let mut users = Vec::new();
    for (r, x) in &pairs {
        let mut creds = None;
        if let Some(admin) = admins.get_mut(x) {
            let (user, c) = grant_reader(cd, admin, r, x, &entries[x], &infos[x]).await?;
            users.push(serde_json::json!({"etcd_of": x, "user": user, "read_only": true}));
            creds = Some(c);
        }
        actions.extend(write_remote_files(
            r,
            &entries[r],
            x,
            endpoints_of(x),
            &entries[x].pod_cidrs,
            creds.as_ref(),
        )?);
    }
    if !ctx.json() {
        print_applied(&actions, &users);
    }
    let mut ok = true;
    if a.wait {
        ok = wait(ctx, &entries, &pairs, true, a.timeout).await?;
    } else if !ctx.json() {
        println!(
            "next: `clustermesh status --wait` shows when every node has synced the new clusters"
        );
    }
    if ctx.json() {
        print_json(&serde_json::json!({
            "connected": pairs.iter().map(|(r, x)| serde_json::json!({"reader": r, "exporter": x})).collect::<Vec<_>>(),
            "files": actions,
            "etcd_users": users,
            "synced": if a.wait { Some(ok) } else { None },
        }));
    }
    Ok(ok)
}

/// Validation of each reader R of `pairs`: it has nodes, and the clusters
/// it is already connected to (outside this request) do not collide with
/// its new exporter X (cluster id, pod CIDRs).
async fn check_readers(
    cd: &ConfigDir,
    names: &[String],
    pairs: &Pairs,
    entries: &BTreeMap<String, ClusterEntry>,
    infos: &BTreeMap<String, proto::ClusterInfo>,
) -> Result<()> {
    let all = cd.all()?;
    let mut existing_infos = BTreeMap::new();
    for (r, x) in pairs {
        let reader = &entries[r];
        if reader.nodes.is_empty() {
            bail!(
                "cluster {r} has no nodes in {}, so there is nowhere to write the connection; add them with `clustermesh enable --cluster {r} --node NAME,clusters-dir=PATH,status=HOST:PORT`",
                cd.cluster_file(r).display()
            );
        }
        for existing in configured_remotes(reader).keys() {
            if existing == x || names.contains(existing) {
                continue;
            }
            let Some(e) = all.get(existing) else {
                continue;
            };
            if u64::from(infos[x].id) == e.id {
                bail!(
                    "cluster {r} is already connected to cluster {existing}, which has the same cluster id {} as cluster {x}; cluster ids must be unique in the mesh: give one of them another id",
                    e.id
                );
            }
            // R's nodes will merge X with E: their pod CIDRs must not
            // collide either. An unreachable E is checked by its id only.
            if !existing_infos.contains_key(existing)
                && let Ok(mut api) = Api::connect(cd, e).await
                && let Ok(info) = api.info().await
            {
                existing_infos.insert(existing.clone(), info);
            }
            if let Some(info) = existing_infos.get(existing) {
                check_merge(&infos[x], info).map_err(|err| {
                    anyhow!("cluster {r} is already connected to cluster {existing}, so: {err}")
                })?;
            }
        }
    }
    Ok(())
}

/// In the TLS etcd of `exporter` X (`admin`): the read-only user
/// `remote-R` of reader `r` (and X's own `remote-X`, before auth goes on),
/// and its client certificate from X's CA, issued once. The user and the
/// credentials to copy to R's nodes.
async fn grant_reader(
    cd: &ConfigDir,
    admin: &mut etcd_client::Client,
    r: &str,
    x: &str,
    exporter: &ClusterEntry,
    info: &proto::ClusterInfo,
) -> Result<(String, Credentials)> {
    // X's own nodes read their etcd as remote-X (enable's node.pem):
    // granted before auth goes on, so they never lose access.
    let own: clustermesh_api::ClusterName =
        x.parse().map_err(|e| anyhow!("cluster name {x:?}: {e}"))?;
    clustermesh_kvstore::remote_access::grant_remote_reader(admin, &own)
        .await
        .map_err(|e| etcd_error(exporter, &e))?;
    clustermesh_kvstore::remote_access::enable_auth(admin, &format!("apiserver-{x}"))
        .await
        .map_err(|e| etcd_error(exporter, &e))?;
    let name: clustermesh_api::ClusterName =
        r.parse().map_err(|e| anyhow!("cluster name {r:?}: {e}"))?;
    let user = clustermesh_kvstore::remote_access::grant_remote_reader(admin, &name)
        .await
        .map_err(|e| etcd_error(exporter, &e))?;
    let pki = cd.pki(x);
    let (ca, _) = crate::enable::load_or_create_ca(&pki, x)?;
    let (cert, key) = (
        pki.join(format!("{user}.pem")),
        pki.join(format!("{user}-key.pem")),
    );
    if !(cert.is_file() && key.is_file()) {
        let issued = ca
            .issue(&user, &[], Usage::Client)
            .map_err(|e| anyhow!("issuing the certificate of {user}: {e}"))?;
        config::write_atomic(&key, issued.key_pem.as_bytes(), 0o600)?;
        config::write_atomic(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    }
    let ca_pem = if info.etcd_ca_pem.is_empty() {
        ca.cert_pem().to_owned()
    } else {
        info.etcd_ca_pem.clone()
    };
    let read =
        |p: &PathBuf| std::fs::read(p).map_err(|e| anyhow!("cannot read {}: {e}", p.display()));
    let creds = (ca_pem, read(&cert)?, read(&key)?);
    Ok((user, creds))
}

/// On every node of reader `r`: the remote-cluster file of exporter `x`
/// (and its TLS files from `creds`), written atomically.
fn write_remote_files(
    r: &str,
    reader: &ClusterEntry,
    x: &str,
    endpoints: Vec<String>,
    pod_cidrs: &[String],
    creds: Option<&Credentials>,
) -> Result<Vec<FileAction>> {
    // Validated when the entry was written (`enable --pod-cidr-range`).
    let pod_cidrs: Vec<IpCidr> = pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect();
    let mut actions = Vec::new();
    for n in &reader.nodes {
        let mut remote = clustermesh_kvstore::ClusterFile {
            endpoints: endpoints.clone(),
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            pod_cidrs: pod_cidrs.clone(),
        };
        if let Some((ca, cert, key)) = creds {
            let d = tls_dir(&n.clusters_dir, x);
            config::write_atomic(&d.join("ca.pem"), ca.as_bytes(), 0o644)?;
            config::write_atomic(&d.join("client.pem"), cert, 0o644)?;
            config::write_atomic(&d.join("client-key.pem"), key, 0o600)?;
            remote.trusted_ca_file = Some(d.join("ca.pem"));
            remote.cert_file = Some(d.join("client.pem"));
            remote.key_file = Some(d.join("client-key.pem"));
        }
        let yaml = remote.render();
        let file = n.clusters_dir.join(x);
        let changed = config::write_atomic(&file, yaml.as_bytes(), 0o644)?;
        actions.push(FileAction {
            reader: r.to_owned(),
            exporter: x.to_owned(),
            node: n.name.clone(),
            file,
            changed,
        });
    }
    Ok(actions)
}

/// The text report of what connect wrote and which etcd users it made.
fn print_applied(actions: &[FileAction], users: &[serde_json::Value]) {
    for act in actions {
        println!(
            "{} -> {}: node {}: {} {}",
            act.reader,
            act.exporter,
            act.node,
            if act.changed { "wrote" } else { "unchanged" },
            act.file.display()
        );
    }
    for u in users {
        println!(
            "etcd of {}: read-only user {}",
            u["etcd_of"].as_str().unwrap_or_default(),
            u["user"].as_str().unwrap_or_default()
        );
    }
}

pub async fn disconnect(ctx: &Ctx, a: Args) -> Result<bool> {
    let (names, pairs) = directions(&a)?;
    let cd = &ctx.dir;
    let mut entries = BTreeMap::new();
    for n in &names {
        entries.insert(n.clone(), cd.get(n)?);
    }
    // Reach every TLS etcd first: a wrong credential changes nothing.
    let mut admins = BTreeMap::new();
    for (_, x) in &pairs {
        let exporter = &entries[x];
        if exporter.tls() && !admins.contains_key(x) {
            admins.insert(x.clone(), etcd_admin(cd, exporter).await?);
        }
    }
    let mut actions = Vec::new();
    let mut revoked = Vec::new();
    for (r, x) in &pairs {
        for n in &entries[r].nodes {
            let file = n.clusters_dir.join(x);
            let changed = config::remove(&file)?;
            let d = tls_dir(&n.clusters_dir, x);
            if d.is_dir() {
                std::fs::remove_dir_all(&d)
                    .map_err(|e| anyhow!("cannot remove {}: {e}", d.display()))?;
            }
            actions.push(FileAction {
                reader: r.clone(),
                exporter: x.clone(),
                node: n.name.clone(),
                file,
                changed,
            });
        }
    }
    // The files are gone (the agents drain); now revoke the read access.
    for (r, x) in &pairs {
        let exporter = &entries[x];
        let Some(admin) = admins.get_mut(x) else {
            continue;
        };
        let name: clustermesh_api::ClusterName =
            r.parse().map_err(|e| anyhow!("cluster name {r:?}: {e}"))?;
        clustermesh_kvstore::remote_access::revoke_remote_reader(admin, &name)
            .await
            .map_err(|e| etcd_error(exporter, &e))?;
        let pki = cd.pki(x);
        let user = clustermesh_kvstore::remote_access::remote_user(&name);
        config::remove(&pki.join(format!("{user}.pem")))?;
        config::remove(&pki.join(format!("{user}-key.pem")))?;
        revoked.push(serde_json::json!({"etcd_of": x, "user": user}));
    }
    if !ctx.json() {
        for act in &actions {
            println!(
                "{} -x- {}: node {}: {} {}",
                act.reader,
                act.exporter,
                act.node,
                if act.changed {
                    "removed"
                } else {
                    "already absent"
                },
                act.file.display()
            );
        }
        for u in &revoked {
            println!(
                "etcd of {}: revoked user {}",
                u["etcd_of"].as_str().unwrap_or_default(),
                u["user"].as_str().unwrap_or_default()
            );
        }
    }
    let mut ok = true;
    if a.wait {
        ok = wait(ctx, &entries, &pairs, false, a.timeout).await?;
    }
    if ctx.json() {
        print_json(&serde_json::json!({
            "disconnected": pairs.iter().map(|(r, x)| serde_json::json!({"reader": r, "exporter": x})).collect::<Vec<_>>(),
            "files": actions,
            "etcd_users_revoked": revoked,
            "drained": if a.wait { Some(ok) } else { None },
        }));
    }
    Ok(ok)
}

/// Polls every reader node until each exporter is synced (`present`) or
/// absent from its status. Prints a progress line; returns false on timeout
/// after saying what is missing.
async fn wait(
    ctx: &Ctx,
    entries: &BTreeMap<String, ClusterEntry>,
    pairs: &[(String, String)],
    present: bool,
    timeout: Duration,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let total: usize = pairs.iter().map(|(r, _)| entries[r].nodes.len()).sum();
    let mut progress = crate::Progress::default();
    loop {
        let mut missing = Vec::new();
        for (r, x) in pairs {
            for n in &entries[r].nodes {
                let st = agent_status(&n.status).await;
                let why = match st {
                    Err(e) => Some(format!("node {} of {r} ({}): {e}", n.name, n.status)),
                    Ok(v) => match (status::remote_of(&v, x), present) {
                        (Some(c), true) if c.synced => None,
                        (Some(c), true) => Some(format!(
                            "node {} of {r}: {x} not synced yet{}",
                            n.name,
                            c.last_error
                                .map(|e| format!(" (last error: {e})"))
                                .unwrap_or_default()
                        )),
                        (None, true) => Some(format!("node {} of {r}: {x} not seen yet", n.name)),
                        (Some(_), false) => {
                            Some(format!("node {} of {r}: {x} still present", n.name))
                        }
                        (None, false) => None,
                    },
                };
                if let Some(w) = why {
                    missing.push(w);
                }
            }
        }
        if !ctx.json() {
            progress.show(&format!(
                "waiting: {}/{} node connections {}",
                total - missing.len(),
                total,
                if present { "synced" } else { "drained" }
            ));
        }
        if missing.is_empty() {
            progress.done();
            if !ctx.json() {
                println!(
                    "every node reports the change ({total}/{total} {})",
                    if present { "synced" } else { "drained" }
                );
            }
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            progress.done();
            eprintln!(
                "error: not every node reported the change within {timeout:?}: {}",
                missing.join("; ")
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(mode: Mode, dest: &[&str]) -> Args {
        Args {
            cluster: "a".into(),
            destination: dest.iter().map(|s| (*s).to_owned()).collect(),
            mode,
            wait: false,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn modes_give_directions() {
        assert_eq!(
            directions(&args(Mode::Unicast, &["b", "c"]))
                .unwrap()
                .1
                .len(),
            2
        );
        assert_eq!(
            directions(&args(Mode::Bidirectional, &["b", "c"]))
                .unwrap()
                .1
                .len(),
            4
        );
        assert_eq!(
            directions(&args(Mode::Mesh, &["b", "c"])).unwrap().1.len(),
            6
        );
        assert!(directions(&args(Mode::Mesh, &["a"])).is_err());
        assert!(directions(&args(Mode::Mesh, &["b", "b"])).is_err());
    }

    fn info(name: &str, id: u32, cidrs: &[&str], mode: &str, strict: bool) -> proto::ClusterInfo {
        proto::ClusterInfo {
            name: name.into(),
            id,
            pod_cidrs: cidrs.iter().map(|s| (*s).to_owned()).collect(),
            encryption: Some(proto::EncryptionPolicy {
                mode: mode.into(),
                strict,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pair_refusals() {
        let a = info("a", 1, &["10.1.0.0/16"], "wireguard", true);
        check_pair(&a, &info("b", 2, &["10.2.0.0/16"], "wireguard", false)).unwrap();
        let e = check_pair(&a, &info("b", 1, &[], "wireguard", false)).unwrap_err();
        assert!(e.to_string().contains("both have cluster id 1"), "{e}");
        let e = check_pair(&a, &info("b", 2, &["10.1.3.0/24"], "wireguard", true)).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        let e = check_pair(&a, &info("b", 2, &[], "none", false)).unwrap_err();
        assert!(e.to_string().contains("enforces strict encryption"), "{e}");
    }
}
