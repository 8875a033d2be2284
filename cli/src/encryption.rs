//! `clustermesh encryption`: the compliance switches and their evidence.
//!
//! - `status`: the cluster's policy (apiserver) and each node's view
//!   (agent `/status` `encryption`: device, key fingerprint, the policy it
//!   applies, peers with handshake age, strict-mode drops, rotations).
//!   Exits 1 when a node does not apply the cluster's policy.
//! - `enable | disable | strict on|off [--ingress]`: change the exported
//!   policy with the apiserver's `SetEncryptionPolicy`; it is persisted
//!   (outlives apiserver restarts, overriding the --encryption flags) and
//!   every agent applies it within a second (the strict flags in the
//!   datapath; the WireGuard device itself exists only on nodes whose agent
//!   runs with --wireguard-iface, which needs an agent restart to add).
//! - `rotate-keys`: SIGUSR1 to each node agent (pid from the node's
//!   `pid-file`): make-before-break rotation, evidence in the audit trail.
//! - `audit [--since D]`: the nodes' audit trails (`audit-log`), merged.

use std::time::{Duration, SystemTime};

use anyhow::{Result, anyhow, bail};
use clustermesh_api::{proto, time::rfc3339};
use serde_json::{Value, json};

use crate::{
    Ctx,
    clients::{Api, agent_status},
    config::{ClusterEntry, NodeEntry},
    parse_duration, print_json,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The policy of each cluster and what each node applies.
    Status {
        /// Only this cluster (default: every enabled one).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Turn WireGuard encryption on for a cluster.
    Enable {
        /// The cluster (a name given to `enable`).
        #[arg(long)]
        cluster: String,
        /// all | inter-cluster
        #[arg(long, value_parser = ["all", "inter-cluster"])]
        scope: Option<String>,
        /// Encrypt node-to-node (host) traffic too.
        #[arg(long)]
        node_to_node: bool,
    },
    /// Turn encryption off for a cluster (refused while strict mode is on).
    Disable {
        /// The cluster (a name given to `enable`).
        #[arg(long)]
        cluster: String,
    },
    /// Strict (fail-closed) mode: pod traffic to remote nodes never leaves
    /// unencrypted; with --ingress, unencrypted pod traffic arriving is
    /// dropped too.
    Strict {
        /// on | off
        #[arg(value_enum)]
        state: OnOff,
        /// The cluster (a name given to `enable`).
        #[arg(long)]
        cluster: String,
        /// Only the ingress half (on: egress and ingress; off: ingress only).
        #[arg(long)]
        ingress: bool,
    },
    /// Rotate the WireGuard keys of a cluster's nodes now (SIGUSR1 to each
    /// agent; needs `pid-file` in the node entry).
    RotateKeys {
        /// The cluster (a name given to `enable`).
        #[arg(long)]
        cluster: String,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// The encryption audit trail of a cluster's nodes (JSON lines).
    Audit {
        /// The cluster (a name given to `enable`).
        #[arg(long)]
        cluster: String,
        /// Only events newer than this (e.g. 1h, 30m).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only this event kind (e.g. key_rotation_completed).
        #[arg(long)]
        event: Option<String>,
    },
}

fn policy_json(p: &proto::EncryptionPolicy) -> Value {
    json!({
        "mode": if p.mode.is_empty() { "none" } else { p.mode.as_str() },
        "scope": if p.scope.is_empty() { "all" } else { p.scope.as_str() },
        "strict": p.strict,
        "strict_ingress": p.strict_ingress,
        "node_to_node": p.node_to_node,
    })
}

/// A policy as an agent reports it, in the CLI's field names; none stays
/// null.
fn applied_policy(p: Option<&clustermesh_api::EncryptionPolicy>) -> Value {
    let Some(p) = p else { return Value::Null };
    json!({
        "mode": match p.mode {
            clustermesh_api::EncryptionMode::None => "none",
            clustermesh_api::EncryptionMode::Wireguard => "wireguard",
        },
        "scope": match p.scope {
            clustermesh_api::EncryptionScope::All => "all",
            clustermesh_api::EncryptionScope::InterCluster => "inter-cluster",
        },
        "strict": p.strict,
        "strict_ingress": p.strict_ingress,
        "node_to_node": p.node_to_node,
    })
}

fn policy_text(p: &Value) -> String {
    let mut s = p["mode"].as_str().unwrap_or("none").to_owned();
    if p["scope"] == "inter-cluster" {
        s.push_str(", inter-cluster only");
    }
    if p["strict"] == true {
        s.push_str(", strict");
    }
    if p["strict_ingress"] == true {
        s.push_str(", strict ingress");
    }
    if p["node_to_node"] == true {
        s.push_str(", node-to-node");
    }
    s
}

async fn set(
    ctx: &Ctx,
    c: &ClusterEntry,
    f: impl FnOnce(&mut proto::EncryptionPolicy) -> Result<()>,
) -> Result<bool> {
    let mut api = Api::connect(&ctx.dir, c).await?;
    let info = api.info().await?;
    let before = info.encryption.unwrap_or_default();
    let mut p = before.clone();
    if p.mode.is_empty() {
        p.mode = "none".into();
    }
    if p.scope.is_empty() {
        p.scope = "all".into();
    }
    f(&mut p)?;
    let now = api.set_encryption(p).await?;
    let (b, n) = (policy_json(&before), policy_json(&now));
    if ctx.json() {
        print_json(&json!({"cluster": c.name, "before": b, "now": n, "changed": b != n}));
    } else {
        if b == n {
            println!(
                "cluster {}: encryption unchanged ({})",
                c.name,
                policy_text(&n)
            );
        } else {
            println!(
                "cluster {}: encryption {} -> {}",
                c.name,
                policy_text(&b),
                policy_text(&n)
            );
        }
        println!(
            "every node applies it within a second (`clustermesh encryption status --cluster {}`); it is kept across apiserver restarts",
            c.name
        );
    }
    Ok(true)
}

pub async fn run(ctx: &Ctx, cmd: Command) -> Result<bool> {
    match cmd {
        Command::Status { cluster } => status(ctx, cluster).await,
        Command::Enable {
            cluster,
            scope,
            node_to_node,
        } => enable(ctx, &cluster, scope, node_to_node).await,
        Command::Disable { cluster } => disable(ctx, &cluster).await,
        Command::Strict {
            state,
            cluster,
            ingress,
        } => strict(ctx, state, &cluster, ingress).await,
        Command::RotateKeys { cluster, node } => rotate_keys(ctx, &cluster, node),
        Command::Audit {
            cluster,
            since,
            event,
        } => audit(ctx, &cluster, since, event),
    }
}

async fn enable(
    ctx: &Ctx,
    cluster: &str,
    scope: Option<String>,
    node_to_node: bool,
) -> Result<bool> {
    let c = ctx.dir.get(cluster)?;
    set(ctx, &c, |p| {
        p.mode = "wireguard".into();
        if let Some(s) = scope {
            p.scope = s;
        }
        if node_to_node {
            p.node_to_node = true;
        }
        Ok(())
    })
    .await
}

async fn disable(ctx: &Ctx, cluster: &str) -> Result<bool> {
    let c = ctx.dir.get(cluster)?;
    let name = c.name.clone();
    set(ctx, &c, |p| {
        if p.strict || p.strict_ingress {
            bail!(
                "cluster {name} enforces strict encryption; turn it off first (`clustermesh encryption strict off --cluster {name}`) so that disabling encryption is a deliberate second step"
            );
        }
        p.mode = "none".into();
        p.node_to_node = false;
        Ok(())
    })
    .await
}

async fn strict(ctx: &Ctx, state: OnOff, cluster: &str, ingress: bool) -> Result<bool> {
    let c = ctx.dir.get(cluster)?;
    let name = c.name.clone();
    if state == OnOff::On {
        refuse_unencrypted_peers(ctx, &c).await?;
    }
    set(ctx, &c, |p| {
        match state {
            OnOff::On => {
                if p.mode != "wireguard" {
                    bail!(
                        "strict mode needs encryption on, and cluster {name} has encryption off; run `clustermesh encryption enable --cluster {name}` first"
                    );
                }
                p.strict = true;
                if ingress {
                    p.strict_ingress = true;
                }
            }
            OnOff::Off => {
                p.strict_ingress = false;
                if !ingress {
                    p.strict = false;
                }
            }
        }
        Ok(())
    })
    .await
}

/// Strict mode in `c` would drop the traffic of a connected cluster that
/// does not encrypt: refuse, as connect does.
async fn refuse_unencrypted_peers(ctx: &Ctx, c: &ClusterEntry) -> Result<()> {
    let name = &c.name;
    let all = ctx.dir.all()?;
    for other in crate::connect::connected_clusters(&all, c) {
        let Some(e) = all.get(&other) else { continue };
        let mut api = Api::connect(&ctx.dir, e).await?;
        let p = api.info().await?.encryption.unwrap_or_default();
        if p.mode.is_empty() || p.mode == "none" {
            bail!(
                "cluster {name} is connected to cluster {other}, which has encryption off, so strict mode would drop their traffic; turn WireGuard on in {other} first (`clustermesh encryption enable --cluster {other}`) or disconnect it"
            );
        }
    }
    Ok(())
}

fn rotate_keys(ctx: &Ctx, cluster: &str, node: Option<String>) -> Result<bool> {
    let c = ctx.dir.get(cluster)?;
    let nodes: Vec<_> = c
        .nodes
        .iter()
        .filter(|n| node.as_ref().is_none_or(|x| *x == n.name))
        .collect();
    if nodes.is_empty() {
        bail!(
            "cluster {} has no node {}; its nodes are: {}",
            c.name,
            node.unwrap_or_default(),
            c.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut done = Vec::new();
    for n in nodes {
        let pid = signal_rotation(&c, n)?;
        done.push(json!({"node": n.name, "pid": pid}));
    }
    if ctx.json() {
        print_json(&json!({"cluster": c.name, "rotation_started": done}));
    } else {
        for d in &done {
            println!(
                "node {}: key rotation started (SIGUSR1 to pid {})",
                d["node"].as_str().unwrap_or_default(),
                d["pid"]
            );
        }
        println!(
            "evidence: `clustermesh encryption audit --cluster {} --event key_rotation_completed` once the overlap has passed",
            c.name
        );
    }
    Ok(true)
}

/// SIGUSR1 to the agent of node `n` (pid from its `pid-file`); the pid.
fn signal_rotation(c: &ClusterEntry, n: &NodeEntry) -> Result<i32> {
    let pf = n.pid_file.as_ref().ok_or_else(|| {
        anyhow!(
            "node {} of cluster {} has no pid-file in its cluster file, so the CLI cannot signal its agent; add it (`clustermesh enable --cluster {} --node {},clusters-dir=...,status=...,pid-file=PATH`) or run `kill -USR1 <node-agent pid>` on the node",
            n.name, c.name, c.name, n.name
        )
    })?;
    let text = std::fs::read_to_string(pf).map_err(|e| {
        anyhow!(
            "cannot read the pid file {} of node {} ({e}); check that its agent runs",
            pf.display(),
            n.name
        )
    })?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 1).ok_or_else(|| {
        anyhow!(
            "the pid file {} of node {} does not hold a process id",
            pf.display(),
            n.name
        )
    })?;
    // SAFETY: kill(2) with a checked positive pid and a valid signal.
    let rc = unsafe { libc::kill(pid, libc::SIGUSR1) };
    if rc != 0 {
        bail!(
            "cannot signal the agent of node {} (pid {pid} from {}): {}; check that it runs and that you may signal it",
            n.name,
            pf.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(pid)
}

fn audit(ctx: &Ctx, cluster: &str, since: Option<Duration>, event: Option<String>) -> Result<bool> {
    let c = ctx.dir.get(cluster)?;
    let cutoff = since.map(|d| rfc3339(SystemTime::now() - d));
    let mut lines = Vec::new();
    let mut missing = Vec::new();
    for n in &c.nodes {
        match read_audit_log(n) {
            Ok(text) => lines.extend(audit_events(&text, cutoff.as_deref(), event.as_deref())),
            Err(m) => missing.push(m),
        }
    }
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    if ctx.json() {
        print_json(&json!({
            "cluster": c.name,
            "events": lines.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
            "unavailable": missing,
        }));
    } else {
        for (_, v) in &lines {
            println!("{v}");
        }
        for m in &missing {
            eprintln!("note: {m}");
        }
    }
    Ok(missing.is_empty() || !lines.is_empty())
}

/// The text of node `n`'s audit trail, or why it is unavailable.
fn read_audit_log(n: &NodeEntry) -> std::result::Result<String, String> {
    let Some(p) = &n.audit_log else {
        return Err(format!(
            "node {} has no audit-log in its cluster file",
            n.name
        ));
    };
    std::fs::read_to_string(p)
        .map_err(|e| format!("node {}: cannot read {} ({e})", n.name, p.display()))
}

/// The events (timestamp, record) of an audit trail's JSON lines, those
/// not older than `cutoff` and of kind `event` when given.
fn audit_events(text: &str, cutoff: Option<&str>, event: Option<&str>) -> Vec<(String, Value)> {
    let mut lines = Vec::new();
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(l) else {
            continue;
        };
        let ts = v["ts"].as_str().unwrap_or_default().to_owned();
        if cutoff.is_some_and(|c| ts.as_str() < c) {
            continue;
        }
        if event.is_some_and(|e| v["event"] != e) {
            continue;
        }
        lines.push((ts, v));
    }
    lines
}

async fn status(ctx: &Ctx, cluster: Option<String>) -> Result<bool> {
    let clusters: Vec<ClusterEntry> = match cluster {
        Some(n) => vec![ctx.dir.get(&n)?],
        None => ctx.dir.all()?.into_values().collect(),
    };
    let mut out = Vec::new();
    let mut ok = true;
    for c in &clusters {
        let mut api = Api::connect(&ctx.dir, c).await?;
        let policy = policy_json(&api.info().await?.encryption.unwrap_or_default());
        let mut nodes = Vec::new();
        for n in &c.nodes {
            let mut problems = Vec::new();
            let enc = match agent_status(&n.status).await {
                Ok(v) => Some(v.encryption),
                Err(e) => {
                    problems.push(format!(
                        "cannot read the status of node {} at {} ({e})",
                        n.name, n.status
                    ));
                    None
                }
            };
            if let Some(enc) = &enc {
                let applied = &applied_policy(enc.policy.as_ref());
                if applied.is_null() {
                    problems.push(format!(
                        "node {} has not read the cluster's policy yet",
                        n.name
                    ));
                } else {
                    let want = |k: &str| policy[k] == applied[k];
                    if !(want("mode") && want("strict") && want("strict_ingress") && want("scope"))
                    {
                        problems.push(format!(
                            "node {} applies {} but the cluster's policy is {}",
                            n.name,
                            policy_text(applied),
                            policy_text(&policy)
                        ));
                    }
                }
                if policy["mode"] == "wireguard" && enc.device.is_none() {
                    problems.push(format!(
                        "node {} has no WireGuard device: its traffic is not encrypted{}; restart its agent with --wireguard-iface",
                        n.name,
                        if policy["strict"] == true { " and strict mode drops it" } else { "" }
                    ));
                }
            }
            ok &= problems.is_empty();
            nodes.push(json!({"node": n.name, "encryption": enc, "problems": problems}));
        }
        out.push(json!({"cluster": c.name, "policy": policy, "nodes": nodes}));
    }
    if ctx.json() {
        print_json(&json!({"compliant": ok, "clusters": out}));
    } else {
        for c in &out {
            println!(
                "cluster {}: policy {}",
                c["cluster"].as_str().unwrap_or_default(),
                policy_text(&c["policy"])
            );
            for n in c["nodes"].as_array().into_iter().flatten() {
                let e = &n["encryption"];
                let peers = e["peers"].as_array().cloned().unwrap_or_default();
                let max_age = peers
                    .iter()
                    .filter_map(|p| p["last_handshake_age_s"].as_u64())
                    .max();
                println!(
                    "  node {}: device {}, key {}, applies {}, {} peers{}, plaintext drops egress {} ingress {}, rotations {}",
                    n["node"].as_str().unwrap_or_default(),
                    e["device"].as_str().unwrap_or("none"),
                    e["public_key"].as_str().unwrap_or("-"),
                    if e["policy"].is_null() {
                        "nothing yet".to_owned()
                    } else {
                        policy_text(&e["policy"])
                    },
                    peers.len(),
                    max_age
                        .map(|a| format!(" (oldest handshake {a}s ago)"))
                        .unwrap_or_default(),
                    e["plaintext_drops"]["egress"],
                    e["plaintext_drops"]["ingress"],
                    e["rotations_completed"],
                );
                for p in n["problems"].as_array().into_iter().flatten() {
                    println!("    problem: {}", p.as_str().unwrap_or_default());
                }
            }
        }
    }
    Ok(ok)
}
