//! `clustermesh policy`: network policies in standalone mode (issue 18;
//! docs/policy.md). `apply`, `list`, `show`, `delete` talk to the
//! apiservers (apply and delete need the admin certificate the CLI holds);
//! `lint` is offline; `trace` reads the policies from the apiservers and
//! the endpoints and identities from the clusters' etcd, and evaluates the
//! flow with `clustermesh_api::policy::evaluate`: egress at the source's
//! cluster, ingress at the destination's (each cluster enforces its own
//! policies). Policies are computed by the agents but NOT enforced in the
//! datapath yet.

use std::{io::Read as _, path::PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use clustermesh_api::{
    ClusterName, Entry, K8sName, Protocol, StateKind, convert,
    policy::{self, Decision, Direction, EndpointRef, FlowPeer, Policy, Verdict},
    proto,
};
use serde_json::json;

use crate::{Ctx, clients::Api, config::ClusterEntry, print_json};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Apply policies (YAML or JSON, multi-document) to a cluster: all or nothing.
    #[command(after_help = "Example:\n  clustermesh policy apply --cluster east -f db-policy.yaml")]
    Apply {
        #[arg(long)]
        cluster: String,
        /// The manifest file, or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// List the policies of every cluster (or one).
    List {
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Print a policy's manifest (JSON).
    Show {
        name: String,
        /// The namespace (none: a cluster-wide policy, or the only policy of that name).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Delete a policy from a cluster.
    Delete {
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long)]
        cluster: String,
    },
    /// Check a manifest offline: parse errors (exit 1) and warnings (exit 0).
    Lint {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Would a flow be allowed? Exit 0 allowed, 1 denied.
    #[command(
        after_help = "Example:\n  clustermesh policy trace --from east/default/web-1 --to west/default/db-0 --port 5432/TCP"
    )]
    Trace {
        /// CLUSTER/NAMESPACE/POD of the source.
        #[arg(long)]
        from: String,
        /// CLUSTER/NAMESPACE/POD of the destination.
        #[arg(long)]
        to: String,
        /// PORT/TCP or PORT/UDP.
        #[arg(long)]
        port: String,
    },
}

pub async fn run(ctx: &Ctx, cmd: Command) -> Result<bool> {
    match cmd {
        Command::Apply { cluster, file } => apply(ctx, &cluster, &file).await,
        Command::List { cluster } => list(ctx, cluster).await,
        Command::Show {
            name,
            namespace,
            cluster,
        } => show(ctx, &name, namespace.as_deref(), cluster).await,
        Command::Delete {
            name,
            namespace,
            cluster,
        } => delete(ctx, &name, namespace.as_deref(), &cluster).await,
        Command::Lint { file } => lint(ctx, &file),
        Command::Trace { from, to, port } => trace(ctx, &from, &to, &port).await,
    }
}

fn read(file: &PathBuf) -> Result<String> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the manifest from standard input")?;
        return Ok(s);
    }
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

async fn api(ctx: &Ctx, cluster: &str) -> Result<(ClusterEntry, Api)> {
    let c = ctx.dir.get(cluster)?;
    let api = Api::connect(&ctx.dir, &c).await?;
    Ok((c, api))
}

async fn apply(ctx: &Ctx, cluster: &str, file: &PathBuf) -> Result<bool> {
    let text = read(file)?;
    // Checked here first: the same parser, the error without a round trip.
    policy::parse_documents(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let (_, mut api) = api(ctx, cluster).await?;
    let out = api.apply_policies(text).await?;
    if ctx.json() {
        print_json(&json!(
            out.iter()
                .map(|p| json!({
                    "cluster": cluster, "kind": p.kind, "namespace": p.namespace,
                    "name": p.name, "outcome": p.outcome,
                }))
                .collect::<Vec<_>>()
        ));
    } else {
        for p in &out {
            println!(
                "{} {} {}",
                p.kind,
                qualified(&p.namespace, &p.name),
                p.outcome
            );
        }
    }
    Ok(true)
}

fn qualified(ns: &str, name: &str) -> String {
    if ns.is_empty() {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

async fn policies_of(ctx: &Ctx, cluster: Option<String>) -> Result<Vec<proto::NetworkPolicy>> {
    let clusters: Vec<ClusterEntry> = match cluster {
        Some(n) => vec![ctx.dir.get(&n)?],
        None => ctx.dir.all()?.into_values().collect(),
    };
    let mut all = Vec::new();
    for c in &clusters {
        let mut api = Api::connect(&ctx.dir, c).await?;
        all.extend(api.list_policies().await?);
    }
    Ok(all)
}

async fn list(ctx: &Ctx, cluster: Option<String>) -> Result<bool> {
    let all = policies_of(ctx, cluster).await?;
    if ctx.json() {
        let v: Vec<serde_json::Value> = all.iter().map(policy_json).collect();
        print_json(&json!(v));
    } else {
        println!("{:<12} {:<32} {:<40} SPECS", "CLUSTER", "KIND", "POLICY");
        for p in &all {
            let specs = convert::policy_from_proto(p).map_or(0, |r| r.policy.specs.len());
            println!(
                "{:<12} {:<32} {:<40} {specs}",
                p.cluster,
                p.kind,
                qualified(&p.namespace, &p.name)
            );
        }
    }
    Ok(true)
}

fn policy_json(p: &proto::NetworkPolicy) -> serde_json::Value {
    let manifest: serde_json::Value =
        serde_json::from_str(&p.manifest_json).unwrap_or(serde_json::Value::Null);
    json!({
        "cluster": p.cluster, "kind": p.kind, "namespace": p.namespace,
        "name": p.name, "manifest": manifest,
    })
}

/// The one policy `name` (in `namespace`, or cluster-wide, or the only one
/// of that name) of the given policies.
fn pick<'a>(
    all: &'a [proto::NetworkPolicy],
    name: &str,
    namespace: Option<&str>,
) -> Result<&'a proto::NetworkPolicy> {
    let named: Vec<&proto::NetworkPolicy> = all.iter().filter(|p| p.name == name).collect();
    let found: Vec<&proto::NetworkPolicy> = match namespace {
        Some(ns) => named.into_iter().filter(|p| p.namespace == ns).collect(),
        None => {
            let cw: Vec<_> = named
                .iter()
                .copied()
                .filter(|p| p.namespace.is_empty())
                .collect();
            if cw.is_empty() { named } else { cw }
        }
    };
    match found.as_slice() {
        [one] => Ok(one),
        [] => bail!(
            "no network policy {}",
            qualified(namespace.unwrap_or(""), name)
        ),
        many => bail!(
            "{} policies are named {name} ({}); pick one with -n NAMESPACE or --cluster",
            many.len(),
            many.iter()
                .map(|p| format!("{}:{}", p.cluster, qualified(&p.namespace, &p.name)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

async fn show(ctx: &Ctx, name: &str, ns: Option<&str>, cluster: Option<String>) -> Result<bool> {
    let all = policies_of(ctx, cluster).await?;
    let p = pick(&all, name, ns)?;
    print_json(&policy_json(p));
    Ok(true)
}

async fn delete(ctx: &Ctx, name: &str, ns: Option<&str>, cluster: &str) -> Result<bool> {
    let all = policies_of(ctx, Some(cluster.to_owned())).await?;
    let p = pick(&all, name, ns)?;
    let (_, mut api) = api(ctx, cluster).await?;
    let deleted = api.delete_policy(&p.namespace, &p.name).await?;
    if ctx.json() {
        print_json(
            &json!({"cluster": cluster, "namespace": p.namespace, "name": p.name, "deleted": deleted}),
        );
    } else {
        println!("{} {} deleted", p.kind, qualified(&p.namespace, &p.name));
    }
    Ok(true)
}

fn lint(ctx: &Ctx, file: &PathBuf) -> Result<bool> {
    let text = read(file)?;
    let ps = policy::parse_manifests(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let warnings = policy::lint(&ps);
    if ctx.json() {
        let v: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        print_json(&json!({"policies": ps.len(), "warnings": v}));
    } else {
        for w in &warnings {
            println!("warning: {w}");
        }
        println!("{} policies, {} warnings", ps.len(), warnings.len());
    }
    Ok(true)
}

/// One side of a traced flow: `CLUSTER/NAMESPACE/POD`, resolved.
struct Side {
    cluster: ClusterName,
    namespace: K8sName,
    labels: clustermesh_api::Labels,
    identity: clustermesh_api::Identity,
}

fn parse_side(flag: &str, s: &str) -> Result<(ClusterName, K8sName, K8sName)> {
    let parts: Vec<&str> = s.split('/').collect();
    let [c, ns, pod] = parts.as_slice() else {
        bail!("--{flag} {s:?}: expected CLUSTER/NAMESPACE/POD");
    };
    Ok((
        c.parse().map_err(|e| anyhow!("--{flag}: {e}"))?,
        ns.parse().map_err(|e| anyhow!("--{flag}: {e}"))?,
        pod.parse().map_err(|e| anyhow!("--{flag}: {e}"))?,
    ))
}

fn parse_port(s: &str) -> Result<(u16, Protocol)> {
    let (p, proto_) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = p
        .parse()
        .map_err(|_| anyhow!("--port {s:?}: {p:?} is not a port (0-65535)"))?;
    let proto_ = match proto_.to_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => bail!("--port {s:?}: protocol {other:?} must be TCP or UDP"),
    };
    Ok((port, proto_))
}

/// Reads the cluster's exported endpoints and identities from its etcd
/// (strictly decoded) and finds the pod.
async fn resolve(ctx: &Ctx, flag: &str, s: &str) -> Result<Side> {
    let (cluster, namespace, pod) = parse_side(flag, s)?;
    let c = ctx.dir.get(cluster.as_str())?;
    let mut etcd = if c.etcd_endpoints.iter().any(|e| e.starts_with("https://")) {
        crate::connect::etcd_admin(&ctx.dir, &c).await?
    } else {
        clustermesh_kvstore::EtcdConfig {
            endpoints: c.etcd_endpoints.clone(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
        .connect()
        .await
        .map_err(|e| anyhow!("etcd of cluster {cluster}: {e}"))?
    };
    let mut get = async |kind: StateKind| -> Result<Vec<Entry>> {
        let r = etcd
            .get(
                kind.prefix(&cluster),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| anyhow!("etcd of cluster {cluster}: {e}"))?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| clustermesh_api::decode_entry(kv.key(), kv.value()).ok())
            .map(|(_, e)| e)
            .collect())
    };
    let eps = get(StateKind::Ip).await?;
    let ep = eps
        .iter()
        .find_map(|e| match e {
            Entry::Endpoint(r)
                if r.namespace.as_ref() == Some(&namespace) && r.name.as_ref() == Some(&pod) =>
            {
                Some(r.clone())
            }
            _ => None,
        })
        .ok_or_else(|| {
            anyhow!("--{flag}: cluster {cluster} exports no endpoint {namespace}/{pod}")
        })?;
    let ids = get(StateKind::Identities).await?;
    let labels = ids
        .iter()
        .find_map(|e| match e {
            Entry::Identity(r) if r.id == ep.identity => Some(r.labels.clone()),
            _ => None,
        })
        .ok_or_else(|| {
            anyhow!(
                "--{flag}: cluster {cluster} exports no identity {} (of {namespace}/{pod})",
                ep.identity
            )
        })?;
    let has_ns = labels.iter().any(|(k, _)| {
        k == policy::NAMESPACE_KEY || k.ends_with(&format!(":{}", policy::NAMESPACE_KEY))
    });
    let labels = if has_ns {
        labels
    } else {
        let mut m: std::collections::BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        m.insert(
            format!("k8s:{}", policy::NAMESPACE_KEY),
            namespace.to_string(),
        );
        clustermesh_api::Labels::new(m).map_err(|e| anyhow!("--{flag}: {e}"))?
    };
    Ok(Side {
        cluster,
        namespace,
        labels,
        identity: ep.identity,
    })
}

fn decide(
    ps: &[Policy],
    me: &Side,
    peer: &Side,
    dir: Direction,
    p: Protocol,
    port: u16,
) -> Decision {
    let local = EndpointRef {
        cluster: &me.cluster,
        namespace: &me.namespace,
        labels: &me.labels,
    };
    let peer = FlowPeer::Endpoint {
        cluster: peer.cluster.clone(),
        labels: peer.labels.clone(),
    };
    policy::evaluate(ps, &local, &peer, dir, p, port)
}

async fn trace(ctx: &Ctx, from: &str, to: &str, port: &str) -> Result<bool> {
    let (port, proto_) = parse_port(port)?;
    let src = resolve(ctx, "from", from).await?;
    let dst = resolve(ctx, "to", to).await?;
    let policies = async |c: &ClusterName| -> Result<Vec<Policy>> {
        let all = policies_of(ctx, Some(c.to_string())).await?;
        all.iter()
            .map(|p| {
                convert::policy_from_proto(p)
                    .map(|r| r.policy)
                    .map_err(|e| anyhow!("{e}"))
            })
            .collect()
    };
    let egress = decide(
        &policies(&src.cluster).await?,
        &src,
        &dst,
        Direction::Egress,
        proto_,
        port,
    );
    let ingress = decide(
        &policies(&dst.cluster).await?,
        &dst,
        &src,
        Direction::Ingress,
        proto_,
        port,
    );
    let allowed = egress.verdict == Verdict::Allowed && ingress.verdict == Verdict::Allowed;
    let side = |d: &Decision, c: &ClusterName| {
        json!({
            "cluster": c.to_string(),
            "verdict": format!("{:?}", d.verdict),
            "rule": d.rule.as_ref().map(|r| json!({"policy": r.policy.to_string(), "rule": r.origin})),
            "enforced_by": d.enforced_by.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "decision": d.to_string(),
        })
    };
    if ctx.json() {
        print_json(&json!({
            "from": from, "to": to, "port": port, "protocol": format!("{proto_:?}").to_uppercase(),
            "source_identity": src.identity.get(), "destination_identity": dst.identity.get(),
            "allowed": allowed,
            "egress": side(&egress, &src.cluster),
            "ingress": side(&ingress, &dst.cluster),
        }));
    } else {
        println!(
            "egress at {} ({from}, identity {}): {egress}",
            src.cluster, src.identity
        );
        println!(
            "ingress at {} ({to}, identity {}): {ingress}",
            dst.cluster, dst.identity
        );
        println!("{}", if allowed { "ALLOWED" } else { "DENIED" });
        println!(
            "(computed from the control plane's state, as the agents compile it into the datapath)"
        );
    }
    Ok(allowed)
}
