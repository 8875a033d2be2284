//! `clustermesh observe`: the flows the node agents observed (their
//! `clustermesh.v1.Observer` API, docs/observability.md), from every node
//! of every enabled cluster, merged by time; `--follow` keeps streaming.
//!
//! # Fan-out: the CLI dials every node agent itself
//!
//! The CLI connects directly to each node's flow API (the `flows` address
//! of every node in `clusters/<name>.yaml`, the agent's `--flows-listen`),
//! with mutual TLS: it trusts that cluster's CA (`pki/<cluster>/ca.pem`),
//! expects the agent's certificate to name the host of the `flows` address
//! (the TLS server name the CLI sends; `enable` issues the node
//! certificates with those SANs and the server usage), and presents the
//! admin certificate (`pki/<cluster>/admin.pem`, CN `root`). Each node
//! answers with its own buffered flows, already filtered (the same
//! `FlowFilter` for all, checked here first with
//! [`clustermesh_api::flow::Filter::from_proto`]); the CLI merges them.
//!
//! Why no relay process in the path:
//! - a relay is one more component to run, to crash and to scale (Hubble
//!   Relay's crash on IPv6 peers is a known user complaint), and when it is
//!   down no flow can be seen at all, while here a node that does not
//!   answer hides only its own flows (named on standard error);
//! - flows never load the apiserver or etcd: they go from each agent to
//!   the CLI only;
//! - the CLI already reaches every agent directly (`clustermesh status`
//!   reads each agent's `/status`), so it needs no new network path;
//! - each agent authenticates the admin with the cluster CA the CLI
//!   already holds: no new credential to issue or distribute.
//!
//! The cost is one connection per node per run: fine up to a few hundred
//! nodes. Beyond that (or where the CLI cannot reach the nodes) a relay
//! that does this same fan-out next to the nodes is the answer; the
//! per-node API and the merge are the ones a relay would use.
//!
//! # History, then follow
//!
//! Without `--follow` every node's answer (the last `--last` matching
//! flows, default 20, or all since `--since`) is gathered concurrently,
//! merged ([`merge`]: by time, then cluster, node, sequence) and the last N
//! overall printed. With `--follow` the same history is printed (none
//! without `--last`/`--since`), then each node is followed from the last
//! flow it returned (`since` its time, skipping the sequences already
//! printed), printing each new flow as any node streams it, until Ctrl-C.
//! After a run without `--follow`, each node's `GetObserverStatus` is read
//! and losses (datapath ring buffer, undecodable, slow readers) are said on
//! standard error.
//!
//! Output: one line per flow ([`clustermesh_api::flow::human_line`]), or
//! with `-o json` one JSON object per line (the `Flow` message); nothing
//! else goes to standard output.

use std::{
    io::Write as _,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, anyhow};
use clustermesh_api::{
    flow::{Filter, VERDICTS, human_line},
    proto::{
        Flow, FlowFilter, GetFlowsRequest, ObserverStatus, ObserverStatusRequest,
        observer_client::ObserverClient,
    },
};
use tokio::{sync::mpsc, task::JoinSet};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    Ctx,
    clients::{CONNECT_TIMEOUT, REQUEST_TIMEOUT, error_text},
    connect::port_answers,
    enable::host_of_addr,
    parse_duration,
};

/// How many flows a run without `--follow`, `--last` or `--since` prints.
pub const DEFAULT_LAST: u32 = 20;

#[derive(Debug, Clone, Default, clap::Args)]
#[command(
    after_help = "Filters combine: a flow must match every flag given, and one of the values of a repeated flag.\n\nExamples:\n  clustermesh observe\n  clustermesh observe --verdict dropped --since 10m\n  clustermesh observe --to-pod prod/db --port 5432 --follow\n  clustermesh observe --from-cluster west --encrypted false -o json"
)]
pub struct Args {
    /// Only the nodes of this cluster (repeat; default: every enabled
    /// cluster's nodes).
    #[arg(long = "cluster", value_name = "NAME")]
    pub clusters: Vec<String>,
    /// Source pod, `namespace/name` or `name`.
    #[arg(long)]
    pub from_pod: Vec<String>,
    /// Destination pod, `namespace/name` or `name`.
    #[arg(long)]
    pub to_pod: Vec<String>,
    /// Source cluster.
    #[arg(long)]
    pub from_cluster: Vec<String>,
    /// Destination cluster.
    #[arg(long)]
    pub to_cluster: Vec<String>,
    /// Namespace of either side.
    #[arg(long)]
    pub namespace: Vec<String>,
    /// Label of either side: `key=value` or `source:key=value`.
    #[arg(long)]
    pub label: Vec<String>,
    /// Verdict.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(VERDICTS))]
    pub verdict: Vec<String>,
    /// Drop reason, e.g. `policy_denied` (a `drop_` prefix is accepted).
    #[arg(long)]
    pub drop_reason: Vec<String>,
    /// Port of either side.
    #[arg(long)]
    pub port: Vec<u32>,
    /// Protocol: tcp, udp, icmp, icmpv6 or a number.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// Only flows that crossed (or will cross) the network inside WireGuard
    /// (`true`), or only those that did not (`false`).
    #[arg(long, value_name = "true|false")]
    pub encrypted: Option<bool>,
    /// Source IP address.
    #[arg(long)]
    pub from_ip: Vec<String>,
    /// Destination IP address.
    #[arg(long)]
    pub to_ip: Vec<String>,
    /// Only flows of the last DURATION (e.g. 30s, 5m, 1h).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub since: Option<Duration>,
    /// The last N flows overall (0: every buffered one). Default 20 without
    /// --follow and --since; with --follow, no history unless given.
    #[arg(long, value_name = "N")]
    pub last: Option<u32>,
    /// Keep streaming new flows until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// The filter the flags say (not checked: see [`check`]).
pub fn filter(a: &Args) -> FlowFilter {
    FlowFilter {
        from_pod: a.from_pod.clone(),
        to_pod: a.to_pod.clone(),
        from_cluster: a.from_cluster.clone(),
        to_cluster: a.to_cluster.clone(),
        namespace: a.namespace.clone(),
        label: a.label.clone(),
        verdict: a.verdict.clone(),
        drop_reason: a.drop_reason.clone(),
        port: a.port.clone(),
        protocol: a.protocol.clone(),
        encrypted: a.encrypted,
        from_ip: a.from_ip.clone(),
        to_ip: a.to_ip.clone(),
    }
}

/// Checks the filter flags as the agents will; the error names the flag
/// (a usage error: exit status 2).
pub fn check(a: &Args) -> Result<(), String> {
    Filter::from_proto(&filter(a)).map(|_| ()).map_err(|e| {
        format!(
            "invalid value {:?} for '--{}': {}",
            e.value,
            e.field.replace('_', "-"),
            e.reason
        )
    })
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What to ask every node first.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The history request (`follow` false: it ends).
    pub history: GetFlowsRequest,
    /// Whether the history is printed (with `--follow` and neither
    /// `--last` nor `--since` it only tells where each node is).
    pub show_history: bool,
    /// How many flows of the merged history to print (0: all).
    pub keep: u32,
}

/// The plan of the flags at `now`.
pub fn plan(a: &Args, now: SystemTime) -> Plan {
    let since = a
        .since
        .map_or(0, |d| unix_nanos(now.checked_sub(d).unwrap_or(UNIX_EPOCH)));
    let (last, show_history) = match (a.last, a.since.is_some(), a.follow) {
        (Some(n), _, _) => (n, true),
        (None, true, _) => (0, true),
        (None, false, false) => (DEFAULT_LAST, true),
        (None, false, true) => (1, false),
    };
    Plan {
        history: GetFlowsRequest {
            filter: Some(filter(a)),
            last,
            follow: false,
            since_unix_nanos: since,
        },
        show_history,
        keep: last,
    }
}

fn order(a: &Flow, b: &Flow) -> std::cmp::Ordering {
    (a.time_unix_nanos, &a.cluster, &a.node, a.sequence).cmp(&(
        b.time_unix_nanos,
        &b.cluster,
        &b.node,
        b.sequence,
    ))
}

/// The nodes' answers as one list: by time (then cluster, node,
/// sequence), the last `last` (0: all).
pub fn merge(per_node: Vec<Vec<Flow>>, last: u32) -> Vec<Flow> {
    let mut all: Vec<Flow> = per_node.into_iter().flatten().collect();
    all.sort_by(order);
    let last = usize::try_from(last).unwrap_or(usize::MAX);
    if last > 0 && all.len() > last {
        all.drain(..all.len() - last);
    }
    all
}

/// Where a node's history ended: the time and sequence of its newest flow.
fn cursor(flows: &[Flow]) -> Option<(u64, u64)> {
    flows
        .iter()
        .map(|f| (f.time_unix_nanos, f.sequence))
        .max_by_key(|&(_, seq)| seq)
}

/// The follow request of a node whose history ended at `cursor`.
fn follow_request(history: &GetFlowsRequest, cursor: Option<(u64, u64)>) -> GetFlowsRequest {
    GetFlowsRequest {
        filter: history.filter.clone(),
        last: 0,
        follow: true,
        since_unix_nanos: cursor.map_or(history.since_unix_nanos, |(t, _)| t),
    }
}

/// One node to observe.
#[derive(Debug, Clone)]
struct Target {
    cluster: String,
    node: String,
    /// `host:port`, the agent's `--flows-listen`.
    addr: String,
    pki: PathBuf,
    cluster_file: PathBuf,
}

impl Target {
    fn who(&self) -> String {
        format!("node {}/{} at {}", self.cluster, self.node, self.addr)
    }
}

/// The nodes of the clusters asked for (all without `--cluster`) that have
/// a flows address; those without are named once on standard error.
fn targets(ctx: &Ctx, clusters: &[String]) -> Result<Vec<Target>> {
    let entries = if clusters.is_empty() {
        ctx.dir.all()?.into_values().collect::<Vec<_>>()
    } else {
        clusters
            .iter()
            .map(|c| ctx.dir.get(c))
            .collect::<Result<Vec<_>>>()?
    };
    if entries.is_empty() {
        return Err(anyhow!(
            "no cluster is enabled in {}; run `clustermesh enable` first, or pass the right --config-dir",
            ctx.dir.root.display()
        ));
    }
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    for c in &entries {
        for n in &c.nodes {
            match &n.flows {
                Some(addr) => out.push(Target {
                    cluster: c.name.clone(),
                    node: n.name.clone(),
                    addr: addr.clone(),
                    pki: ctx.dir.pki(&c.name),
                    cluster_file: ctx.dir.cluster_file(&c.name),
                }),
                None => skipped.push(format!("{}/{}", c.name, n.name)),
            }
        }
    }
    if !skipped.is_empty() {
        eprintln!(
            "note: not observed, no flows address: {}; add it with `clustermesh enable --cluster C --node NAME,...,flows=HOST:PORT` (the agent's --flows-listen)",
            skipped.join(", ")
        );
    }
    if out.is_empty() {
        return Err(anyhow!(
            "no node has a flows address; give each node flows=HOST:PORT (its agent's --flows-listen) with `clustermesh enable --node ...`"
        ));
    }
    Ok(out)
}

/// A lazily connected client of a node's flow API (a failure to connect
/// shows on the first call).
fn client(t: &Target) -> Result<ObserverClient<Channel>, String> {
    let read = |f: &str| {
        std::fs::read(t.pki.join(f)).map_err(|e| {
            format!(
                "cannot read {} for the flow API of {} ({e}); run `clustermesh enable --cluster {}` again",
                t.pki.join(f).display(),
                t.who(),
                t.cluster
            )
        })
    };
    let host = host_of_addr(&t.addr).ok_or_else(|| {
        format!(
            "the flows address {:?} of node {}/{} is not HOST:PORT; fix `flows` in {}",
            t.addr,
            t.cluster,
            t.node,
            t.cluster_file.display()
        )
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(
            read("admin.pem")?,
            read("admin-key.pem")?,
        ))
        .domain_name(host);
    let ep = Endpoint::from_shared(format!("https://{}", t.addr))
        .map_err(|e| format!("the flows address of {} is not usable: {e}", t.who()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| format!("the TLS settings for {}: {e}", t.who()))?;
    Ok(ObserverClient::new(ep.connect_lazy()))
}

/// One sentence for a failed call to a node: what failed, what to check.
async fn node_error(t: &Target, what: &str, s: &tonic::Status) -> String {
    use tonic::Code;
    // The message and its causes ("tcp connect error: Connection refused").
    let msg = error_text(s);
    // A status made on this side from a transport error has a source.
    let transport = std::error::Error::source(s).is_some();
    if transport && port_answers(&[format!("https://{}", t.addr)]).await {
        return format!(
            "{} refused the TLS handshake or dropped the connection on {what} ({msg}); check that its agent serves the flow API with pki/{c}/nodes/{n}.pem (from pki/{c}/ca.pem; one issued before node certificates had the server usage must be deleted and `clustermesh enable --cluster {c}` rerun), that this certificate names the host of its flows address, and that the agent trusts pki/{c}/ca.pem",
            t.who(),
            c = t.cluster,
            n = t.node
        );
    }
    match s.code() {
        _ if transport || matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
            format!(
                "cannot reach the flow API of {} on {what} ({msg}); check that its agent is running with --flows-listen {} and that `flows` in {} is right",
                t.who(),
                t.addr,
                t.cluster_file.display()
            )
        }
        Code::Unauthenticated | Code::PermissionDenied => format!(
            "{} refused the CLI's admin certificate on {what} ({msg}); check that its agent trusts pki/{}/ca.pem for its flow API",
            t.who(),
            t.cluster
        ),
        Code::Unimplemented => format!(
            "{} does not serve {what} ({msg}); check that its agent is recent enough to serve flows",
            t.who()
        ),
        _ => format!("{what} on {} failed: {msg}", t.who()),
    }
}

/// A node's history: its whole (finite) answer to `req`.
async fn history(
    t: &Target,
    c: &mut ObserverClient<Channel>,
    req: GetFlowsRequest,
) -> Result<Vec<Flow>, String> {
    let fut = async {
        let mut stream = c.get_flows(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(f) = stream.message().await? {
            out.push(f);
        }
        Ok::<_, tonic::Status>(out)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(s)) => Err(node_error(t, "GetFlows", &s).await),
        Err(_) => Err(format!(
            "{} did not finish its GetFlows answer within {REQUEST_TIMEOUT:?}; check that its agent is healthy",
            t.who()
        )),
    }
}

/// A node that answered its history.
struct Answered {
    target: Target,
    client: ObserverClient<Channel>,
    flows: Vec<Flow>,
}

/// Every node's history, asked concurrently; a node that fails is named on
/// standard error. In the order of `targets`.
async fn histories(targets: &[Target], req: &GetFlowsRequest) -> Vec<Answered> {
    let mut set = JoinSet::new();
    for (i, t) in targets.iter().cloned().enumerate() {
        let req = req.clone();
        set.spawn(async move {
            let r = match client(&t) {
                Ok(mut c) => history(&t, &mut c, req).await.map(|f| (c, f)),
                Err(e) => Err(e),
            };
            (i, t, r)
        });
    }
    let mut done = Vec::new();
    while let Some(j) = set.join_next().await {
        if let Ok(r) = j {
            done.push(r);
        }
    }
    done.sort_by_key(|(i, _, _)| *i);
    let mut out = Vec::new();
    for (_, target, r) in done {
        match r {
            Ok((client, flows)) => out.push(Answered {
                target,
                client,
                flows,
            }),
            Err(e) => eprintln!("error: {e}"),
        }
    }
    out
}

/// Writes one flow; an error means standard output is gone.
fn emit(out: &mut impl std::io::Write, f: &Flow, json: bool) -> std::io::Result<()> {
    if json {
        let line = serde_json::to_string(f).map_err(std::io::Error::other)?;
        writeln!(out, "{line}")
    } else {
        writeln!(out, "{}", human_line(f))
    }
}

pub async fn run(ctx: &Ctx, a: Args) -> Result<bool> {
    check(&a).map_err(|e| anyhow!("{e}"))?;
    let targets = targets(ctx, &a.clusters)?;
    let plan = plan(&a, SystemTime::now());
    let answered = histories(&targets, &plan.history).await;
    if answered.is_empty() {
        return Err(anyhow!(
            "no node's flow API answered ({} tried, each named above)",
            targets.len()
        ));
    }
    let mut following = Vec::new();
    let mut per_node = Vec::new();
    for n in answered {
        let req = follow_request(&plan.history, cursor(&n.flows));
        let skip = cursor(&n.flows).map(|(_, seq)| seq);
        per_node.push(n.flows);
        following.push((n.target, n.client, req, skip));
    }
    let mut out = std::io::stdout().lock();
    if plan.show_history {
        for f in merge(per_node, plan.keep) {
            if emit(&mut out, &f, ctx.json()).is_err() {
                return Ok(true);
            }
        }
    }
    let _ = out.flush();
    drop(out);
    if !a.follow {
        losses(&following).await;
        return Ok(true);
    }
    follow(following, ctx.json()).await
}

type Following = (
    Target,
    ObserverClient<Channel>,
    GetFlowsRequest,
    Option<u64>,
);

/// Streams one node's new flows (those after sequence `skip`) into `tx`;
/// an error is sent once, then the stream ends.
async fn follow_node(f: Following, tx: mpsc::Sender<Result<Flow, String>>) {
    let (t, mut c, req, skip) = f;
    let r = async {
        let mut stream = c.get_flows(req).await?.into_inner();
        while let Some(f) = stream.message().await? {
            if skip.is_some_and(|s| f.sequence <= s) {
                continue;
            }
            if tx.send(Ok(f)).await.is_err() {
                break;
            }
        }
        Ok::<_, tonic::Status>(())
    }
    .await;
    let msg = match r {
        Ok(()) => format!(
            "{} ended its flow stream; check that its agent is still running",
            t.who()
        ),
        Err(s) => node_error(&t, "GetFlows --follow", &s).await,
    };
    let _ = tx.send(Err(msg)).await;
}

/// Prints every node's new flows as they come, until Ctrl-C (success) or
/// until every node's stream ended (failure).
async fn follow(nodes: Vec<Following>, json: bool) -> Result<bool> {
    let (tx, mut rx) = mpsc::channel(1024);
    let mut set = JoinSet::new();
    for n in nodes {
        set.spawn(follow_node(n, tx.clone()));
    }
    drop(tx);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(Ok(f)) => {
                    let mut out = std::io::stdout().lock();
                    if emit(&mut out, &f, json).and_then(|()| out.flush()).is_err() {
                        return Ok(true);
                    }
                }
                Some(Err(e)) => eprintln!("error: {e}"),
                None => {
                    eprintln!("error: every node's flow stream ended");
                    return Ok(false);
                }
            },
            _ = &mut ctrl_c => {
                set.abort_all();
                return Ok(true);
            }
        }
    }
}

/// The loss line of a node's observer status, if it lost anything.
fn loss_line(cluster: &str, node: &str, s: &ObserverStatus) -> Option<String> {
    (s.lost_datapath != 0 || s.lost_decode != 0 || s.lost_followers != 0).then(|| {
        format!(
            "node {cluster}/{node}: {} events lost in the datapath ring buffer, {} undecodable, {} skipped by slow readers",
            s.lost_datapath, s.lost_decode, s.lost_followers
        )
    })
}

/// Says on standard error what each node lost (`GetObserverStatus`).
async fn losses(nodes: &[Following]) {
    let mut set = JoinSet::new();
    for (i, (t, c, _, _)) in nodes.iter().enumerate() {
        let (t, mut c) = (t.clone(), c.clone());
        set.spawn(async move {
            let r = tokio::time::timeout(
                REQUEST_TIMEOUT,
                c.get_observer_status(ObserverStatusRequest {}),
            )
            .await;
            let line = match r {
                Ok(Ok(s)) => loss_line(&t.cluster, &t.node, s.get_ref()),
                Ok(Err(s)) => Some(format!(
                    "warning: {}",
                    node_error(&t, "GetObserverStatus", &s).await
                )),
                Err(_) => Some(format!(
                    "warning: {} did not answer GetObserverStatus within {REQUEST_TIMEOUT:?}",
                    t.who()
                )),
            };
            (i, line)
        });
    }
    let mut lines = Vec::new();
    while let Some(j) = set.join_next().await {
        if let Ok((i, Some(l))) = j {
            lines.push((i, l));
        }
    }
    lines.sort();
    for (_, l) in lines {
        eprintln!("{l}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        a: Args,
    }

    fn args(v: &[&str]) -> Args {
        T::try_parse_from(std::iter::once("observe").chain(v.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn flags_map_to_the_filter() {
        let a = args(&[
            "--from-pod",
            "prod/web",
            "--from-pod",
            "api",
            "--to-pod",
            "db",
            "--from-cluster",
            "east",
            "--to-cluster",
            "west",
            "--namespace",
            "prod",
            "--label",
            "k8s:app=web",
            "--verdict",
            "dropped",
            "--verdict",
            "audit",
            "--drop-reason",
            "policy_denied",
            "--port",
            "5432",
            "--protocol",
            "TCP",
            "--encrypted",
            "false",
            "--from-ip",
            "10.1.0.5",
            "--to-ip",
            "fd00::5",
        ]);
        let f = filter(&a);
        assert_eq!(f.from_pod, ["prod/web", "api"]);
        assert_eq!(f.to_pod, ["db"]);
        assert_eq!(f.from_cluster, ["east"]);
        assert_eq!(f.to_cluster, ["west"]);
        assert_eq!(f.namespace, ["prod"]);
        assert_eq!(f.label, ["k8s:app=web"]);
        assert_eq!(f.verdict, ["dropped", "audit"]);
        assert_eq!(f.drop_reason, ["policy_denied"]);
        assert_eq!(f.port, [5432]);
        assert_eq!(f.protocol, ["TCP"]);
        assert_eq!(f.encrypted, Some(false));
        assert_eq!(f.from_ip, ["10.1.0.5"]);
        assert_eq!(f.to_ip, ["fd00::5"]);
        check(&a).unwrap();
        assert_eq!(
            filter(&args(&["--encrypted", "true"])).encrypted,
            Some(true)
        );
        assert_eq!(filter(&args(&[])).encrypted, None);
        assert_eq!(filter(&args(&[])), FlowFilter::default());
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = check(&args(&["--from-pod", "a/b/c"])).unwrap_err();
        assert!(e.contains("'--from-pod'") && e.contains("a/b/c"), "{e}");
        let e = check(&args(&["--to-ip", "10.1.0.300"])).unwrap_err();
        assert!(e.contains("'--to-ip'"), "{e}");
        let e = check(&args(&["--port", "70000"])).unwrap_err();
        assert!(e.contains("'--port'") && e.contains("65535"), "{e}");
        let e = check(&args(&["--label", "novalue"])).unwrap_err();
        assert!(e.contains("'--label'"), "{e}");
        let e = check(&args(&["--protocol", "sctpx"])).unwrap_err();
        assert!(e.contains("'--protocol'"), "{e}");
        // clap refuses these before the filter does.
        assert!(T::try_parse_from(["observe", "--verdict", "denied"]).is_err());
        assert!(T::try_parse_from(["observe", "--encrypted", "maybe"]).is_err());
        assert!(T::try_parse_from(["observe", "--since", "5y"]).is_err());
    }

    #[test]
    fn since_last_and_follow_make_the_request() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let p = plan(&args(&["--since", "5m"]), now);
        assert_eq!(
            p.history.since_unix_nanos,
            (1_000_000 - 300) * 1_000_000_000
        );
        assert_eq!((p.history.last, p.keep, p.show_history), (0, 0, true));
        assert!(!p.history.follow);
        let p = plan(&args(&["--since", "1h"]), now);
        assert_eq!(
            p.history.since_unix_nanos,
            (1_000_000 - 3600) * 1_000_000_000
        );
        let p = plan(&args(&["--since", "30s", "--last", "5"]), now);
        assert_eq!((p.history.last, p.keep), (5, 5));
        let p = plan(&args(&[]), now);
        assert_eq!((p.history.last, p.history.since_unix_nanos), (20, 0));
        assert!(p.show_history);
        // Following without --last/--since: no history, only where each
        // node is.
        let p = plan(&args(&["--follow"]), now);
        assert_eq!((p.history.last, p.show_history), (1, false));
        let p = plan(&args(&["-f", "--last", "3"]), now);
        assert_eq!((p.history.last, p.show_history), (3, true));
        // A duration longer than the epoch: no lower bound.
        let p = plan(&args(&["--since", "1000d"]), UNIX_EPOCH);
        assert_eq!(p.history.since_unix_nanos, 0);
        assert_eq!(p.history.filter.unwrap(), filter(&args(&["--since", "1h"])));
    }

    fn flow(cluster: &str, node: &str, seq: u64, t: u64) -> Flow {
        Flow {
            cluster: cluster.into(),
            node: node.into(),
            sequence: seq,
            time_unix_nanos: t,
            ..Flow::default()
        }
    }

    fn ids(v: &[Flow]) -> Vec<String> {
        v.iter()
            .map(|f| format!("{}/{}#{}", f.cluster, f.node, f.sequence))
            .collect()
    }

    #[test]
    fn merge_sorts_across_nodes_and_keeps_the_last() {
        let n1 = vec![flow("c1", "n1", 1, 10), flow("c1", "n1", 2, 30)];
        let n2 = vec![
            flow("c2", "n1", 7, 20),
            flow("c2", "n1", 8, 30),
            flow("c2", "n1", 9, 40),
        ];
        let n3 = vec![flow("c1", "n2", 4, 30)];
        let all = merge(vec![n1.clone(), n2.clone(), n3.clone()], 0);
        assert_eq!(
            ids(&all),
            [
                "c1/n1#1", "c2/n1#7", "c1/n1#2", "c1/n2#4", "c2/n1#8", "c2/n1#9"
            ]
        );
        let last = merge(vec![n1, n2, n3], 3);
        assert_eq!(ids(&last), ["c1/n2#4", "c2/n1#8", "c2/n1#9"]);
        assert!(merge(vec![vec![], vec![]], 20).is_empty());
        assert_eq!(merge(vec![vec![flow("c", "n", 1, 1)]], 20).len(), 1);
    }

    #[test]
    fn following_starts_after_the_history() {
        let h = plan(
            &args(&["--last", "2", "--verdict", "dropped"]),
            SystemTime::now(),
        )
        .history;
        let flows = vec![flow("c1", "n1", 5, 100), flow("c1", "n1", 6, 120)];
        assert_eq!(cursor(&flows), Some((120, 6)));
        let r = follow_request(&h, cursor(&flows));
        assert!(r.follow);
        assert_eq!((r.last, r.since_unix_nanos), (0, 120));
        assert_eq!(r.filter, h.filter);
        let r = follow_request(&h, None);
        assert_eq!((r.last, r.since_unix_nanos), (0, h.since_unix_nanos));
    }

    #[test]
    fn losses_are_said_only_when_there_are_some() {
        let mut s = ObserverStatus::default();
        assert_eq!(loss_line("c1", "node-1", &s), None);
        s.lost_datapath = 1234;
        assert_eq!(
            loss_line("c1", "node-1", &s).unwrap(),
            "node c1/node-1: 1234 events lost in the datapath ring buffer, 0 undecodable, 0 skipped by slow readers"
        );
        s.lost_datapath = 0;
        s.lost_followers = 2;
        assert!(loss_line("c1", "node-1", &s).is_some());
    }

    #[test]
    fn json_is_one_object_per_line() {
        let mut out = Vec::new();
        emit(&mut out, &flow("c1", "n1", 1, 5), true).unwrap();
        emit(&mut out, &flow("c1", "n1", 2, 6), true).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["sequence"], 2);
        assert_eq!(v["cluster"], "c1");
    }
    /// A fake node agent: flows 1..=3 (times 100, 200, 300); `follow`
    /// adds flow 10 and keeps the stream open.
    struct Fake;

    #[tonic::async_trait]
    impl clustermesh_api::proto::observer_server::Observer for Fake {
        type GetFlowsStream =
            tonic::codegen::tokio_stream::wrappers::ReceiverStream<Result<Flow, tonic::Status>>;

        async fn get_flows(
            &self,
            r: tonic::Request<GetFlowsRequest>,
        ) -> Result<tonic::Response<Self::GetFlowsStream>, tonic::Status> {
            if r.peer_certs().is_none_or(|c| c.is_empty()) {
                return Err(tonic::Status::unauthenticated("no client certificate"));
            }
            let req = r.into_inner();
            let mut out: Vec<Flow> = (1..=3)
                .map(|i| flow("c1", "node-1", i, i * 100))
                .filter(|f| f.time_unix_nanos >= req.since_unix_nanos)
                .collect();
            let last = req.last as usize;
            if last > 0 && out.len() > last {
                out.drain(..out.len() - last);
            }
            let (tx, rx) = mpsc::channel(8);
            tokio::spawn(async move {
                for f in out {
                    let _ = tx.send(Ok(f)).await;
                }
                if req.follow {
                    let _ = tx.send(Ok(flow("c1", "node-1", 10, 1000))).await;
                    tx.closed().await;
                }
            });
            Ok(tonic::Response::new(
                tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
        }

        async fn get_observer_status(
            &self,
            _: tonic::Request<ObserverStatusRequest>,
        ) -> Result<tonic::Response<ObserverStatus>, tonic::Status> {
            Ok(tonic::Response::new(ObserverStatus {
                lost_datapath: 3,
                ..ObserverStatus::default()
            }))
        }
    }

    /// A fake agent serving with the node certificate enable issues; its
    /// address.
    async fn serve(pki: &std::path::Path) -> std::net::SocketAddr {
        use clustermesh_crypto::pki::{Ca, Usage};
        use tonic::transport::{Server, ServerTlsConfig};
        std::fs::create_dir_all(pki).unwrap();
        let ca = Ca::generate("clustermesh-ca-c1").unwrap();
        std::fs::write(pki.join("ca.pem"), ca.cert_pem()).unwrap();
        let admin = ca.issue("root", &[], Usage::Client).unwrap();
        std::fs::write(pki.join("admin.pem"), &admin.cert_pem).unwrap();
        std::fs::write(pki.join("admin-key.pem"), &admin.key_pem).unwrap();
        let entry = crate::config::NodeEntry {
            name: "node-1".into(),
            clusters_dir: "/x".into(),
            status: "127.0.0.1:1".into(),
            flows: Some("localhost:1".into()),
            audit_log: None,
            pid_file: None,
        };
        let sans = crate::enable::node_sans(&entry);
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let node = ca
            .issue("node:node-1", &sans, Usage::ServerAndClient)
            .unwrap();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(node.cert_pem, node.key_pem))
            .client_ca_root(Certificate::from_pem(ca.cert_pem()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let router = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(clustermesh_api::proto::observer_server::ObserverServer::new(Fake));
        tokio::spawn(router.serve_with_incoming(
            tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(l),
        ));
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_answers_over_mutual_tls_then_streams_only_new_flows() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki/c1");
        let addr = serve(&pki).await;
        let target = |node: &str, addr: String| Target {
            cluster: "c1".into(),
            node: node.into(),
            addr,
            pki: pki.clone(),
            cluster_file: dir.path().join("clusters/c1.yaml"),
        };
        // By name (the certificate's DNS SAN) and by IP (its IP SAN); a
        // dead node is named on standard error and left out.
        let good = target("node-1", format!("localhost:{}", addr.port()));
        let by_ip = target("node-1", addr.to_string());
        let dead = target("node-2", "127.0.0.1:1".into());
        let p = plan(&args(&["--last", "2"]), SystemTime::now());
        let answered = histories(&[good, by_ip, dead], &p.history).await;
        assert_eq!(answered.len(), 2);
        assert_eq!(ids(&answered[0].flows), ["c1/node-1#2", "c1/node-1#3"]);
        assert_eq!(
            merge(answered.iter().map(|a| a.flows.clone()).collect(), 3).len(),
            3
        );
        let n = answered.into_iter().next().unwrap();
        let s = n
            .client
            .clone()
            .get_observer_status(ObserverStatusRequest {})
            .await
            .unwrap();
        assert!(loss_line("c1", "node-1", s.get_ref()).is_some());
        // Following from flow 3: the fake sends 3 again, then 10.
        let cur = cursor(&n.flows);
        let req = follow_request(&p.history, cur);
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(follow_node(
            (n.target, n.client, req, cur.map(|(_, seq)| seq)),
            tx,
        ));
        let f = rx.recv().await.unwrap().unwrap();
        assert_eq!(f.sequence, 10);
        task.abort();
    }
}
