//! `clustermesh status`: per cluster (apiserver `Status` and
//! `GetClusterInfo`) and per node (agent `/status`): remote clusters
//! configured / connected / synced, last errors in words, counts, and the
//! encryption posture.
//!
//! Healthy means: every apiserver answers, its etcd is healthy and every
//! kind has been exported; every node's agent answers, has synced its own
//! cluster, and has connected to and synced every remote cluster it is
//! configured with. Anything else is listed as a problem and exits 1.

use std::time::Duration;

use anyhow::Result;
use clustermesh_api::status::{ClusterStatus, EncryptionStatus, NodeStatus, RecordCounts};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    Ctx,
    clients::{Api, agent_status},
    config::{ClusterEntry, NodeEntry},
    connect::configured_remotes,
    parse_duration, print_json,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this cluster (default: every enabled cluster).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Wait (with a live progress line) until healthy or --timeout.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, value_parser = parse_duration, default_value = "2m")]
    pub timeout: Duration,
}

/// What a node's agent says about one remote cluster.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteView {
    pub name: String,
    pub connected: bool,
    pub synced: bool,
    pub withdrawn: bool,
    pub last_error: Option<String>,
    pub counts: RecordCounts,
}

fn remote_view(c: &ClusterStatus) -> RemoteView {
    RemoteView {
        name: c.name.clone(),
        connected: c.connected,
        synced: c.synced,
        withdrawn: c.withdrawn,
        last_error: c.last_error.clone(),
        counts: c.counts,
    }
}

/// The remote cluster `name` in an agent's status, if it is there.
pub fn remote_of(status: &NodeStatus, name: &str) -> Option<RemoteView> {
    status.control_plane.remote(name).map(remote_view)
}

#[derive(Debug, Serialize)]
struct NodeReport {
    name: String,
    status_address: String,
    reachable: bool,
    error: Option<String>,
    local_synced: bool,
    /// Other clusters: those the CLI knows and those configured here.
    known: usize,
    configured: usize,
    connected: usize,
    synced: usize,
    /// The remote clusters configured on its disk.
    configured_remotes: Vec<String>,
    remotes: Vec<RemoteView>,
    /// The local services marked global the agent balances.
    global_services: Option<usize>,
    /// Clusters configured on disk that the agent does not show (yet).
    not_seen: Vec<String>,
    local_counts: Option<RecordCounts>,
    encryption: Option<EncryptionStatus>,
}

#[derive(Debug, Serialize)]
struct ClusterReport {
    name: String,
    id: u64,
    apiserver: String,
    apiserver_reachable: bool,
    apiserver_error: Option<String>,
    /// "mutual-tls" or "insecure-plaintext" (the apiserver's word).
    api_security: Option<String>,
    etcd_healthy: bool,
    etcd_error: Option<String>,
    /// kind -> {count, synced}
    exported: Value,
    encryption_policy: Value,
    nodes: Vec<NodeReport>,
    /// The figures over the nodes that answered, as Cilium's `clustermesh
    /// status` gives them.
    summary: Summary,
    healthy: bool,
    problems: Vec<String>,
}

/// Least, mean and greatest of a figure over the nodes that answered.
#[derive(Debug, Default, Serialize, PartialEq)]
struct Spread {
    min: usize,
    avg: f64,
    max: usize,
}

impl Spread {
    fn of(v: impl Iterator<Item = usize>) -> Option<Self> {
        let v: Vec<usize> = v.collect();
        let (min, max) = (*v.iter().min()?, *v.iter().max()?);
        Some(Self {
            min,
            avg: v.iter().sum::<usize>() as f64 / v.len() as f64,
            max,
        })
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[min:{} / avg:{:.1} / max:{}]",
            self.min, self.avg, self.max
        )
    }
}

/// One remote cluster over the nodes of a cluster.
#[derive(Debug, Serialize, PartialEq)]
struct Connection {
    cluster: String,
    /// Nodes of this cluster: in all, configured for it, connected, synced.
    nodes: usize,
    configured: usize,
    connected: usize,
    synced: usize,
}

#[derive(Debug, Default, Serialize, PartialEq)]
struct Summary {
    nodes: usize,
    /// Nodes that answered and are connected to every remote cluster known.
    nodes_connected_to_all: usize,
    /// Remote clusters each node is connected to.
    remote_clusters_connected: Option<Spread>,
    connections: Vec<Connection>,
    global_services: Option<Spread>,
}

/// The cluster's figures from its node reports.
fn summarize(nodes: &[NodeReport]) -> Summary {
    let up: Vec<&NodeReport> = nodes.iter().filter(|n| n.reachable).collect();
    let mut names: Vec<&String> = nodes
        .iter()
        .flat_map(|n| {
            n.configured_remotes
                .iter()
                .chain(n.remotes.iter().map(|r| &r.name))
        })
        .collect();
    names.sort();
    names.dedup();
    let connections = names
        .into_iter()
        .map(|c| {
            let has = |n: &NodeReport, f: fn(&RemoteView) -> bool| {
                n.remotes.iter().any(|r| &r.name == c && f(r))
            };
            Connection {
                cluster: c.clone(),
                nodes: nodes.len(),
                configured: nodes
                    .iter()
                    .filter(|n| n.configured_remotes.contains(c))
                    .count(),
                connected: up.iter().filter(|n| has(n, |r| r.connected)).count(),
                synced: up.iter().filter(|n| has(n, |r| r.synced)).count(),
            }
        })
        .collect();
    Summary {
        nodes: nodes.len(),
        nodes_connected_to_all: up
            .iter()
            .filter(|n| n.connected == n.configured && n.configured == n.known)
            .count(),
        remote_clusters_connected: Spread::of(up.iter().map(|n| n.connected)),
        connections,
        global_services: Spread::of(up.iter().filter_map(|n| n.global_services)),
    }
}

async fn cluster_report(ctx: &Ctx, c: &ClusterEntry, known: &[String]) -> ClusterReport {
    let mut r = ClusterReport {
        name: c.name.clone(),
        id: c.id,
        apiserver: c.apiserver.clone(),
        apiserver_reachable: false,
        apiserver_error: None,
        api_security: None,
        etcd_healthy: false,
        etcd_error: None,
        exported: json!({}),
        encryption_policy: Value::Null,
        nodes: Vec::new(),
        summary: Summary::default(),
        healthy: false,
        problems: Vec::new(),
    };
    read_apiserver(ctx, c, &mut r).await;
    apiserver_problems(c, &mut r);
    let configured = configured_remotes(c);
    for n in &c.nodes {
        let files: Vec<String> = configured
            .iter()
            .filter(|(_, nodes)| nodes.contains(&n.name))
            .map(|(k, _)| k.clone())
            .collect();
        let nr = node_report(c, n, files, known, &mut r.problems).await;
        r.nodes.push(nr);
    }
    if c.nodes.is_empty() {
        r.problems.push(format!(
            "cluster {} has no nodes in its cluster file (add them with `clustermesh enable --cluster {} --node ...`)",
            c.name, c.name
        ));
    }
    r.summary = summarize(&r.nodes);
    r.healthy = r.problems.is_empty();
    r
}

/// The apiserver's `Status` and encryption policy into `r`, or the error.
async fn read_apiserver(ctx: &Ctx, c: &ClusterEntry, r: &mut ClusterReport) {
    match Api::connect(&ctx.dir, c).await {
        Err(e) => r.apiserver_error = Some(e.to_string()),
        Ok(mut api) => match api.status().await {
            Err(e) => r.apiserver_error = Some(e.to_string()),
            Ok(s) => {
                r.apiserver_reachable = true;
                r.etcd_healthy = s.etcd_healthy;
                r.api_security = (!s.api_security.is_empty()).then_some(s.api_security);
                r.etcd_error = (!s.etcd_error.is_empty()).then_some(s.etcd_error);
                let mut m = serde_json::Map::new();
                for k in s.kinds {
                    m.insert(k.kind, json!({"count": k.count, "synced": k.synced}));
                }
                r.exported = Value::Object(m);
                if let Ok(info) = api.info().await
                    && let Some(e) = info.encryption
                {
                    r.encryption_policy = json!({
                        "mode": e.mode, "scope": e.scope, "strict": e.strict,
                        "strict_ingress": e.strict_ingress, "node_to_node": e.node_to_node,
                    });
                }
            }
        },
    }
}

/// The problems of the apiserver read by [`read_apiserver`]: unreachable,
/// its etcd unhealthy, kinds not exported yet.
fn apiserver_problems(c: &ClusterEntry, r: &mut ClusterReport) {
    if let Some(e) = &r.apiserver_error {
        r.problems.push(e.clone());
    } else {
        if !r.etcd_healthy {
            r.problems.push(format!(
                "the apiserver of cluster {} cannot use its etcd: {}",
                c.name,
                r.etcd_error.clone().unwrap_or_default()
            ));
        }
        if let Some(m) = r.exported.as_object() {
            for (k, v) in m {
                if v["synced"] != true {
                    r.problems
                        .push(format!("cluster {}: {k} not exported yet", c.name));
                }
            }
        }
    }
}

/// Node `n` of cluster `c` as its agent's `/status` shows it; `files`: the
/// remote clusters configured on its disk, `known`: those the CLI knows.
/// Its problems are added to `problems`.
async fn node_report(
    c: &ClusterEntry,
    n: &NodeEntry,
    files: Vec<String>,
    known: &[String],
    problems: &mut Vec<String>,
) -> NodeReport {
    let mut nr = NodeReport {
        name: n.name.clone(),
        status_address: n.status.clone(),
        reachable: false,
        error: None,
        local_synced: false,
        known: known
            .iter()
            .filter(|k| **k != c.name && !files.contains(k))
            .count()
            + files.len(),
        configured: files.len(),
        connected: 0,
        synced: 0,
        configured_remotes: files.clone(),
        remotes: Vec::new(),
        global_services: None,
        not_seen: Vec::new(),
        local_counts: None,
        encryption: None,
    };
    match agent_status(&n.status).await {
        Err(e) => {
            let msg = format!(
                "cannot read the status of node {} of cluster {} at {} ({e}); check that its node-agent runs with --status-listen {}",
                n.name, c.name, n.status, n.status
            );
            nr.error = Some(msg.clone());
            problems.push(msg);
        }
        Ok(v) => {
            nr.reachable = true;
            for cl in &v.control_plane.clusters {
                if cl.local {
                    nr.local_synced = cl.synced;
                    nr.local_counts = Some(cl.counts);
                    if !nr.local_synced {
                        problems.push(format!(
                            "node {}: its own cluster {} is not synced{}",
                            n.name,
                            c.name,
                            cl.last_error
                                .as_ref()
                                .map(|e| format!(" ({e})"))
                                .unwrap_or_default()
                        ));
                    }
                } else {
                    nr.remotes.push(remote_view(cl));
                }
            }
            check_remotes(&files, &mut nr, problems);
            nr.global_services = Some(v.control_plane.desired.global_services);
            nr.encryption = Some(v.encryption);
        }
    }
    nr
}

/// Each remote cluster of `files` in the agent's view `nr`: counted when
/// connected and synced, else a problem.
fn check_remotes(files: &[String], nr: &mut NodeReport, problems: &mut Vec<String>) {
    for f in files {
        match nr.remotes.iter().find(|x| &x.name == f) {
            None => {
                nr.not_seen.push(f.clone());
                problems.push(format!(
                    "node {}: remote cluster {f} is configured but the agent does not show it yet",
                    nr.name
                ));
            }
            Some(x) => {
                nr.connected += usize::from(x.connected);
                nr.synced += usize::from(x.synced);
                if !(x.connected && x.synced) {
                    problems.push(format!(
                        "node {}: remote cluster {f} is {}{}",
                        nr.name,
                        if x.connected {
                            "connected, not synced"
                        } else {
                            "not connected"
                        },
                        x.last_error
                            .as_ref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
    }
}

fn print_text(reports: &[ClusterReport]) {
    for r in reports {
        println!(
            "cluster {} (id {}): {}",
            r.name,
            r.id,
            if r.healthy { "healthy" } else { "NOT healthy" }
        );
        if r.apiserver_reachable {
            print_apiserver(r);
        } else {
            println!("  apiserver {}: unreachable", r.apiserver);
        }
        print_summary(&r.summary);
        for n in &r.nodes {
            if !n.reachable {
                println!("  node {} ({}): unreachable", n.name, n.status_address);
                continue;
            }
            print_node(&r.name, n);
        }
        for p in &r.problems {
            println!("  problem: {p}");
        }
    }
}

/// The cluster's figures over its nodes (Cilium's layout: nodes connected
/// to all clusters, each cluster connection, global services).
fn print_summary(s: &Summary) {
    let remotes = s.connections.len();
    let spread = s
        .remote_clusters_connected
        .as_ref()
        .map(|x| format!(" {x}"))
        .unwrap_or_default();
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let clusters = plural(remotes, "remote cluster", "remote clusters");
    let nodes = plural(s.nodes, "node is", "nodes are");
    if s.nodes_connected_to_all == s.nodes {
        println!("  all {nodes} connected to all {clusters}{spread}");
    } else {
        println!(
            "  {} of {nodes} connected to all {clusters}{spread}",
            s.nodes_connected_to_all
        );
    }
    if !s.connections.is_empty() {
        println!("  cluster connections:");
        for c in &s.connections {
            println!(
                "    - {}: {}/{} configured, {}/{} connected, {}/{} synced",
                c.cluster, c.configured, c.nodes, c.connected, c.nodes, c.synced, c.nodes
            );
        }
    }
    if let Some(g) = &s.global_services {
        println!("  global services: {g}");
    }
}

/// A reachable apiserver's lines: etcd, exported kinds, encryption policy.
fn print_apiserver(r: &ClusterReport) {
    let kinds: Vec<String> = r
        .exported
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    format!(
                        "{k} {}{}",
                        v["count"],
                        if v["synced"] == true {
                            ""
                        } else {
                            " (not synced)"
                        }
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "  apiserver {}{}: etcd {}; exported: {}",
        r.apiserver,
        match r.api_security.as_deref() {
            Some("insecure-plaintext") => " (INSECURE: plaintext, no authentication)",
            Some("mutual-tls") => " (mutual TLS)",
            _ => "",
        },
        if r.etcd_healthy {
            "healthy"
        } else {
            "UNHEALTHY"
        },
        kinds.join(", ")
    );
    let e = &r.encryption_policy;
    if !e.is_null() {
        println!(
            "  encryption policy: {}{}{}{}",
            e["mode"].as_str().unwrap_or("none"),
            if e["strict"] == true { ", strict" } else { "" },
            if e["strict_ingress"] == true {
                ", strict ingress"
            } else {
                ""
            },
            if e["scope"] == "inter-cluster" {
                ", inter-cluster only"
            } else {
                ""
            },
        );
    }
}

/// A reachable node's lines (of cluster `cluster`): counts, local cluster,
/// each remote, encryption.
fn print_node(cluster: &str, n: &NodeReport) {
    println!(
        "  node {}: clusters {}/{} configured, {}/{} connected, {}/{} synced; local {}",
        n.name,
        n.configured,
        n.known,
        n.connected,
        n.configured,
        n.synced,
        n.configured,
        if n.local_synced {
            "synced"
        } else {
            "NOT synced"
        }
    );
    if let Some(lc) = &n.local_counts {
        println!(
            "    {} (local): nodes {}, endpoints {}, identities {}, services {}",
            cluster, lc.nodes, lc.endpoints, lc.identities, lc.services
        );
    }
    for x in &n.remotes {
        println!(
            "    {}: {}, {}{}; nodes {}, endpoints {}, identities {}, services {}{}",
            x.name,
            if x.connected {
                "connected"
            } else {
                "NOT connected"
            },
            if x.synced { "synced" } else { "NOT synced" },
            if x.withdrawn { ", withdrawn" } else { "" },
            x.counts.nodes,
            x.counts.endpoints,
            x.counts.identities,
            x.counts.services,
            x.last_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(e) = &n.encryption {
        println!(
            "    encryption: device {}, key {}, {} peers, plaintext drops egress {} ingress {}",
            e.device.as_deref().unwrap_or("none"),
            e.public_key.as_deref().unwrap_or("-"),
            e.peers.len(),
            e.plaintext_drops.egress,
            e.plaintext_drops.ingress,
        );
    }
}

async fn reports(ctx: &Ctx, clusters: &[ClusterEntry]) -> Vec<ClusterReport> {
    let known: Vec<String> = ctx
        .dir
        .all()
        .map(|m| m.into_keys().collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for c in clusters {
        out.push(cluster_report(ctx, c, &known).await);
    }
    out
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<bool> {
    let clusters: Vec<ClusterEntry> = match &a.cluster {
        Some(n) => vec![ctx.dir.get(n)?],
        None => ctx.dir.all()?.into_values().collect(),
    };
    if clusters.is_empty() {
        anyhow::bail!(
            "no cluster is enabled in {} (run `clustermesh enable`, or pass the right --config-dir)",
            ctx.dir.root.display()
        );
    }
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut progress = crate::Progress::default();
    let rs = loop {
        let rs = reports(ctx, &clusters).await;
        let problems: Vec<&String> = rs.iter().flat_map(|r| &r.problems).collect();
        if !a.wait || problems.is_empty() || tokio::time::Instant::now() >= deadline {
            progress.done();
            break rs;
        }
        let checks: usize = rs.iter().map(|r| 1 + r.nodes.len()).sum();
        let bad = rs
            .iter()
            .map(|r| usize::from(!r.problems.is_empty()))
            .sum::<usize>();
        progress.show(&format!(
            "waiting: {} problem(s) in {bad} of {} cluster(s) ({checks} checks); first: {}",
            problems.len(),
            rs.len(),
            problems[0]
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let healthy = rs.iter().all(|r| r.healthy);
    if ctx.json() {
        print_json(&json!({ "healthy": healthy, "clusters": rs }));
    } else {
        print_text(&rs);
    }
    Ok(healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, files: &[&str], up: &[(&str, bool, bool)], global: usize) -> NodeReport {
        let remotes: Vec<RemoteView> = up
            .iter()
            .map(|(n, connected, synced)| RemoteView {
                name: (*n).into(),
                connected: *connected,
                synced: *synced,
                withdrawn: false,
                last_error: None,
                counts: RecordCounts::default(),
            })
            .collect();
        NodeReport {
            name: name.into(),
            status_address: String::new(),
            reachable: true,
            error: None,
            local_synced: true,
            known: 2,
            configured: files.len(),
            connected: remotes.iter().filter(|r| r.connected).count(),
            synced: remotes.iter().filter(|r| r.synced).count(),
            configured_remotes: files.iter().map(|f| (*f).into()).collect(),
            remotes,
            global_services: Some(global),
            not_seen: Vec::new(),
            local_counts: None,
            encryption: None,
        }
    }

    #[test]
    fn the_summary_counts_nodes_connections_and_global_services_over_the_nodes() {
        let mut down = node("n3", &["c2"], &[], 0);
        down.reachable = false;
        down.global_services = None;
        let nodes = [
            node(
                "n1",
                &["c2", "c3"],
                &[("c2", true, true), ("c3", true, true)],
                4,
            ),
            node(
                "n2",
                &["c2", "c3"],
                &[("c2", true, false), ("c3", false, false)],
                2,
            ),
            down,
        ];
        let s = summarize(&nodes);
        assert_eq!(s.nodes, 3);
        assert_eq!(s.nodes_connected_to_all, 1);
        assert_eq!(
            s.remote_clusters_connected,
            Some(Spread {
                min: 1,
                avg: 1.5,
                max: 2
            })
        );
        assert_eq!(
            s.connections,
            [
                Connection {
                    cluster: "c2".into(),
                    nodes: 3,
                    configured: 3,
                    connected: 2,
                    synced: 1
                },
                Connection {
                    cluster: "c3".into(),
                    nodes: 3,
                    configured: 2,
                    connected: 1,
                    synced: 1
                },
            ]
        );
        let g = s.global_services.map(|g| g.to_string());
        assert_eq!(g.as_deref(), Some("[min:2 / avg:3.0 / max:4]"));
        // No node answered: no spread to show.
        assert_eq!(summarize(&[]).remote_clusters_connected, None);
    }
}
