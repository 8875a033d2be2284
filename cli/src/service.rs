//! `clustermesh service`: global services in standalone mode, through each
//! cluster's apiserver (`UpsertService`, `DeleteService`, `ListServices`).
//! A service is global when `global` is set; `shared` (default true) says
//! whether this cluster's backends are offered to the others; `affinity`
//! (none|local|remote) which backends a client prefers. The same
//! annotations as Cilium's `service.cilium.io/{global,shared,affinity}`.

use anyhow::{Result, anyhow, bail};
use clustermesh_api::proto;
use serde_json::json;

use crate::{Ctx, clients::Api, config::ClusterEntry, print_json};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List services of every cluster (or one), with backends per cluster.
    List {
        /// Only this cluster (default: every enabled one).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// One service across every cluster: where it is, and its backends.
    Show {
        /// NAMESPACE/NAME, or NAME with --namespace.
        service: String,
        /// The namespace, when SERVICE is a bare NAME.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// Create (or replace) a service in a cluster.
    #[command(
        after_help = "Example:\n  clustermesh service create --cluster east default/web --frontend 10.96.0.10 \\\n    --port 80:8080/TCP --backend 10.1.0.5 --global --affinity local"
    )]
    Create {
        /// The cluster (a name given to `enable`).
        #[arg(long)]
        cluster: String,
        /// NAMESPACE/NAME, or NAME with --namespace.
        service: String,
        /// The namespace, when SERVICE is a bare NAME.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Frontend (cluster) IP; repeat for several.
        #[arg(long = "frontend", required = true)]
        frontends: Vec<String>,
        /// [NAME=]PORT[:TARGET_PORT][/TCP|UDP]; repeat for several.
        #[arg(long = "port", required = true, value_parser = parse_port)]
        ports: Vec<proto::ServicePort>,
        /// IP[@NODE][,ready|terminating|not-ready]; repeat for several.
        #[arg(long = "backend", value_parser = parse_backend)]
        backends: Vec<proto::Backend>,
        /// Make it a global service (service.cilium.io/global).
        #[arg(long)]
        global: bool,
        /// Offer this cluster's backends to other clusters
        /// (service.cilium.io/shared).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        shared: bool,
        /// none | local | remote (service.cilium.io/affinity).
        #[arg(long, default_value = "none", value_parser = ["none", "local", "remote"])]
        affinity: String,
    },
    /// Delete a service from a cluster.
    Delete {
        /// The cluster (a name given to `enable`).
        #[arg(long)]
        cluster: String,
        /// NAMESPACE/NAME, or NAME with --namespace.
        service: String,
        /// The namespace, when SERVICE is a bare NAME.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// Change a service's global, shared or affinity setting.
    Annotate {
        /// The cluster (a name given to `enable`).
        #[arg(long)]
        cluster: String,
        /// NAMESPACE/NAME, or NAME with --namespace.
        service: String,
        /// The namespace, when SERVICE is a bare NAME.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// true | false (service.cilium.io/global).
        #[arg(long, action = clap::ArgAction::Set)]
        global: Option<bool>,
        /// true | false (service.cilium.io/shared).
        #[arg(long, action = clap::ArgAction::Set)]
        shared: Option<bool>,
        /// none | local | remote (service.cilium.io/affinity).
        #[arg(long, value_parser = ["none", "local", "remote"])]
        affinity: Option<String>,
    },
}

fn parse_port(s: &str) -> Result<proto::ServicePort, String> {
    let (name, rest) = match s.split_once('=') {
        Some((n, r)) => (n.to_owned(), r),
        None => (String::new(), s),
    };
    let (ports, proto_) = match rest.split_once('/') {
        Some((p, pr)) => (p, pr.to_uppercase()),
        None => (rest, "TCP".to_owned()),
    };
    if proto_ != "TCP" && proto_ != "UDP" {
        return Err(format!("protocol {proto_:?} must be TCP or UDP"));
    }
    let num = |x: &str| {
        x.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(u32::from)
            .ok_or_else(|| format!("{x:?} is not a port (1-65535)"))
    };
    let (port, target) = match ports.split_once(':') {
        Some((p, t)) => (num(p)?, num(t)?),
        None => (num(ports)?, num(ports)?),
    };
    Ok(proto::ServicePort {
        name,
        protocol: proto_,
        port,
        target_port: target,
    })
}

fn parse_backend(s: &str) -> Result<proto::Backend, String> {
    let (addr, state) = match s.split_once(',') {
        Some((a, st)) => (a, st.to_owned()),
        None => (s, "ready".to_owned()),
    };
    if !["ready", "terminating", "not-ready"].contains(&state.as_str()) {
        return Err(format!(
            "state {state:?} must be ready, terminating or not-ready"
        ));
    }
    let (ip, node) = match addr.split_once('@') {
        Some((i, n)) => (i, n.to_owned()),
        None => (addr, String::new()),
    };
    ip.parse::<std::net::IpAddr>()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    Ok(proto::Backend {
        ip: ip.to_owned(),
        state,
        node,
    })
}

/// `ns/name` or `name` + `--namespace`.
fn split_name(service: &str, namespace: &str) -> (String, String) {
    match service.split_once('/') {
        Some((ns, n)) => (ns.to_owned(), n.to_owned()),
        None => (namespace.to_owned(), service.to_owned()),
    }
}

fn service_json(s: &proto::Service) -> serde_json::Value {
    json!({
        "cluster": s.cluster,
        "namespace": s.namespace,
        "name": s.name,
        "frontends": s.frontends,
        "ports": s.ports.iter().map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.port, "target_port": p.target_port})).collect::<Vec<_>>(),
        "backends": s.backends.iter().map(|b| json!({"ip": b.ip, "state": b.state, "node": b.node})).collect::<Vec<_>>(),
        "global": s.global,
        "shared": s.shared,
        "affinity": s.affinity,
    })
}

fn ports_text(s: &proto::Service) -> String {
    s.ports
        .iter()
        .map(|p| format!("{}:{}/{}", p.port, p.target_port, p.protocol))
        .collect::<Vec<_>>()
        .join(",")
}

fn backends_text(s: &proto::Service) -> String {
    if s.backends.is_empty() {
        return "-".into();
    }
    s.backends
        .iter()
        .map(|b| {
            if b.state == "ready" {
                b.ip.clone()
            } else {
                format!("{}({})", b.ip, b.state)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

async fn list_of(ctx: &Ctx, c: &ClusterEntry) -> Result<Vec<proto::Service>> {
    let mut api = Api::connect(&ctx.dir, c).await?;
    let mut v = api.list_services().await?;
    for s in &mut v {
        if s.cluster.is_empty() {
            s.cluster = c.name.clone();
        }
    }
    Ok(v)
}

async fn find(ctx: &Ctx, c: &ClusterEntry, ns: &str, name: &str) -> Result<proto::Service> {
    list_of(ctx, c)
        .await?
        .into_iter()
        .find(|s| s.namespace == ns && s.name == name)
        .ok_or_else(|| {
            anyhow!(
                "cluster {} has no service {ns}/{name}; `clustermesh service list --cluster {}` lists its services",
                c.name,
                c.name
            )
        })
}

pub async fn run(ctx: &Ctx, cmd: Command) -> Result<bool> {
    match cmd {
        Command::List { cluster } => list(ctx, cluster).await,
        Command::Show { service, namespace } => show(ctx, &service, &namespace).await,
        Command::Create {
            cluster,
            service,
            namespace,
            frontends,
            ports,
            backends,
            global,
            shared,
            affinity,
        } => {
            let (ns, name) = split_name(&service, &namespace);
            let s = proto::Service {
                namespace: ns,
                name,
                frontends,
                ports,
                backends,
                global,
                shared,
                affinity,
                cluster: String::new(),
            };
            create(ctx, &cluster, s).await
        }
        Command::Delete {
            cluster,
            service,
            namespace,
        } => delete(ctx, &cluster, &service, &namespace).await,
        Command::Annotate {
            cluster,
            service,
            namespace,
            global,
            shared,
            affinity,
        } => {
            annotate(
                ctx, &cluster, &service, &namespace, global, shared, affinity,
            )
            .await
        }
    }
}

async fn list(ctx: &Ctx, cluster: Option<String>) -> Result<bool> {
    let clusters: Vec<ClusterEntry> = match cluster {
        Some(n) => vec![ctx.dir.get(&n)?],
        None => ctx.dir.all()?.into_values().collect(),
    };
    let mut all = Vec::new();
    for c in &clusters {
        all.extend(list_of(ctx, c).await?);
    }
    if ctx.json() {
        print_json(&json!(all.iter().map(service_json).collect::<Vec<_>>()));
    } else {
        println!(
            "{:<12} {:<28} {:<6} {:<6} {:<8} {:<16} {:<16} BACKENDS",
            "CLUSTER", "SERVICE", "GLOBAL", "SHARED", "AFFINITY", "FRONTENDS", "PORTS"
        );
        for s in &all {
            println!(
                "{:<12} {:<28} {:<6} {:<6} {:<8} {:<16} {:<16} {}",
                s.cluster,
                format!("{}/{}", s.namespace, s.name),
                s.global,
                s.shared,
                s.affinity,
                s.frontends.join(","),
                ports_text(s),
                backends_text(s)
            );
        }
    }
    Ok(true)
}

async fn show(ctx: &Ctx, service: &str, namespace: &str) -> Result<bool> {
    let (ns, name) = split_name(service, namespace);
    let mut found = Vec::new();
    for c in ctx.dir.all()?.values() {
        found.extend(
            list_of(ctx, c)
                .await?
                .into_iter()
                .filter(|s| s.namespace == ns && s.name == name),
        );
    }
    if found.is_empty() {
        bail!("no enabled cluster has service {ns}/{name}; `clustermesh service list` lists them");
    }
    // Which clusters' backends a client of each cluster can reach.
    let global_shared: Vec<&proto::Service> =
        found.iter().filter(|s| s.global && s.shared).collect();
    if ctx.json() {
        print_json(&json!({
            "namespace": ns, "name": name,
            "clusters": found.iter().map(service_json).collect::<Vec<_>>(),
            "global_backends": global_shared.iter().flat_map(|s| s.backends.iter().map(|b| json!({"cluster": s.cluster, "ip": b.ip, "state": b.state}))).collect::<Vec<_>>(),
        }));
    } else {
        println!("service {ns}/{name}");
        for s in &found {
            println!(
                "  cluster {}: global {}, shared {}, affinity {}, frontends {}, ports {}",
                s.cluster,
                s.global,
                s.shared,
                s.affinity,
                s.frontends.join(","),
                ports_text(s)
            );
            println!("    backends: {}", backends_text(s));
        }
        let n: usize = global_shared.iter().map(|s| s.backends.len()).sum();
        println!(
            "  global backends (global and shared): {n} in {} cluster(s)",
            global_shared.len()
        );
    }
    Ok(true)
}

/// Upserts `s` (its `cluster` empty) in `cluster`.
async fn create(ctx: &Ctx, cluster: &str, s: proto::Service) -> Result<bool> {
    let c = ctx.dir.get(cluster)?;
    let mut api = Api::connect(&ctx.dir, &c).await?;
    api.upsert_service(s.clone()).await?;
    if ctx.json() {
        print_json(
            &json!({"created": service_json(&proto::Service { cluster: c.name.clone(), ..s })}),
        );
    } else {
        println!(
            "service {}/{} created in cluster {}",
            s.namespace, s.name, c.name
        );
    }
    Ok(true)
}

async fn delete(ctx: &Ctx, cluster: &str, service: &str, namespace: &str) -> Result<bool> {
    let c = ctx.dir.get(cluster)?;
    let (ns, name) = split_name(service, namespace);
    // Say clearly when there is nothing to delete.
    find(ctx, &c, &ns, &name).await?;
    let mut api = Api::connect(&ctx.dir, &c).await?;
    api.delete_service(&ns, &name).await?;
    if ctx.json() {
        print_json(&json!({"deleted": {"cluster": c.name, "namespace": ns, "name": name}}));
    } else {
        println!("service {ns}/{name} deleted from cluster {}", c.name);
    }
    Ok(true)
}

async fn annotate(
    ctx: &Ctx,
    cluster: &str,
    service: &str,
    namespace: &str,
    global: Option<bool>,
    shared: Option<bool>,
    affinity: Option<String>,
) -> Result<bool> {
    if global.is_none() && shared.is_none() && affinity.is_none() {
        bail!("nothing to change: give --global, --shared and/or --affinity");
    }
    let c = ctx.dir.get(cluster)?;
    let (ns, name) = split_name(service, namespace);
    let mut s = find(ctx, &c, &ns, &name).await?;
    if let Some(g) = global {
        s.global = g;
    }
    if let Some(sh) = shared {
        s.shared = sh;
    }
    if let Some(a) = affinity {
        s.affinity = a;
    }
    let shown = s.clone();
    s.cluster = String::new();
    let mut api = Api::connect(&ctx.dir, &c).await?;
    api.upsert_service(s).await?;
    if ctx.json() {
        print_json(&json!({"updated": service_json(&shown)}));
    } else {
        println!(
            "service {ns}/{name} in cluster {}: global {}, shared {}, affinity {}",
            c.name, shown.global, shown.shared, shown.affinity
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ports_and_backends() {
        let p = parse_port("http=80:8080/tcp").unwrap();
        assert_eq!(
            (p.name.as_str(), p.port, p.target_port, p.protocol.as_str()),
            ("http", 80, 8080, "TCP")
        );
        let p = parse_port("53/UDP").unwrap();
        assert_eq!((p.port, p.target_port), (53, 53));
        assert!(parse_port("0").is_err());
        assert!(parse_port("80/SCTP").is_err());
        let b = parse_backend("10.1.0.5@n1,terminating").unwrap();
        assert_eq!(
            (b.ip.as_str(), b.node.as_str(), b.state.as_str()),
            ("10.1.0.5", "n1", "terminating")
        );
        assert!(parse_backend("10.1.0.300").is_err());
        assert!(parse_backend("10.1.0.3,gone").is_err());
        assert_eq!(split_name("a/b", "default"), ("a".into(), "b".into()));
        assert_eq!(split_name("b", "x"), ("x".into(), "b".into()));
    }
}
