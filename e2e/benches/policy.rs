//! Network policy (issue 18): what it costs on the path, how fast a large
//! policy compiles into the maps, how fast a change reaches every node.
//! All baselines are measured in the same invocation.
//!
//! 1. Datapath: pod to pod across two nodes (network namespaces, Geneve, the
//!    eBPF datapath), each case on its own pair of nodes, rounds
//!    interleaved: no policy (baseline) against a default-deny ingress
//!    policy of `--rules` compiled entries on the server pod (1,000: the
//!    entry allowing the client among 999 for other peers and ports). One
//!    iperf3 TCP stream (Gbit/s) and new TCP connections per second (each
//!    new connection is a policy lookup and a tracked connection; the rest
//!    of its packets hit the tracking).
//! 2. Compile + map update of `--compile-rules` rules (one policy, each rule
//!    allowing one of 1,000 peer identities on a port): parse the manifest,
//!    compile it for the endpoint, turn it into prefixes and write them
//!    into the real pinned `CM_POLICY` (`PolicyMap::update`). Baseline: the
//!    same prefixes written into the same map with plain inserts.
//! 3. Propagation: a mesh-harness cluster of `--nodes` nodes (real etcd,
//!    apiserver, agents); `clustermesh policy apply` of a changed policy,
//!    `--changes` times; the time from the command's start until each
//!    node's `CM_POLICY_STATE` shows the new revision (polled every 1 ms),
//!    p50 and p99 over every node and change. Baseline: the command's own
//!    round trip (it returns once the apiserver stored the policy).
//!
//! Figures also go to `$CLUSTERMESH_BENCH_JSON`. Needs root.
//! Usage: policy [--runs N] [--seconds S] [--rules N] [--compile-rules N]
//!        [--nodes N] [--changes N]
#![allow(clippy::unwrap_used)]

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use clustermesh_api::{
    Identity,
    policy::{
        CompiledEntry, CompiledPolicy, Direction, EndpointRef, FlowPeer, MapVerdict, PolicyKind,
        PolicyRef, PortRange, ProtoMatch, RuleRef, RuleSection, compile, parse_manifests,
    },
};
use clustermesh_testkit::{
    iperf::{iperf, median},
    netns::{NetNs, sweep_stale},
    report::{Better, Figure, Percentiles, record},
};
use e2e::{
    mesh::{self, Encryption, IpFamily, Options},
    product::binary,
    topo::{Node, geneve_pair},
};
use node_agent::reconcilers::{
    Reconciler as _,
    network_policy::{PolicyMap, map_entries},
};

/// The port the connection-rate server listens on.
const CONN_PORT: u16 = 7000;

fn arg(name: &str, default: u64) -> u64 {
    clustermesh_testkit::bench_arg(name, default)
}

fn rule_ref(i: usize) -> RuleRef {
    RuleRef {
        policy: PolicyRef {
            kind: PolicyKind::CiliumNetworkPolicy,
            namespace: Some("default".parse().unwrap()),
            name: "bench".parse().unwrap(),
        },
        section: RuleSection::Ingress,
        origin: format!("spec.ingress[{i}]"),
    }
}

/// A default-deny ingress policy of `rules` entries: the client allowed on
/// every port from 1024, the others for peers that never send.
fn big_policy(client: u32, rules: usize) -> CompiledPolicy {
    let mut entries = vec![CompiledEntry {
        peer: Identity::from_raw(client.into()).unwrap(),
        direction: Direction::Ingress,
        protocol: ProtoMatch::Tcp,
        ports: PortRange::new(1024, 65535).unwrap(),
        verdict: MapVerdict::Allow,
        rule: rule_ref(0),
    }];
    for i in 1..rules {
        entries.push(CompiledEntry {
            peer: Identity::from_raw(((200u64 << 16) | 300) + (i as u64 % 1000)).unwrap(),
            direction: Direction::Ingress,
            protocol: ProtoMatch::Tcp,
            ports: PortRange::single(8000 + (i / 1000) as u16),
            verdict: MapVerdict::Allow,
            rule: rule_ref(i),
        });
    }
    CompiledPolicy {
        default_deny_ingress: true,
        default_deny_egress: false,
        entries,
    }
}

/// Accepts and closes connections in `pod` forever (a detached thread).
fn accept_forever(pod: &NetNs) {
    let name = pod.name().to_owned();
    std::thread::spawn(move || {
        let _ = clustermesh_api::netns::run_in_named(Some(&name), || {
            let l = TcpListener::bind(("0.0.0.0", CONN_PORT)).unwrap();
            for c in l.incoming() {
                drop(c);
            }
        });
    });
}

/// New TCP connections per second from `pod` to `to` for `secs`.
fn conn_rate(pod: &NetNs, to: SocketAddr, secs: u64) -> f64 {
    clustermesh_api::netns::run_in_named(Some(pod.name()), || {
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1)).unwrap();
            let mut buf = [0u8; 1];
            let _ = s.read(&mut buf);
            n += 1;
        }
        n as f64 / t0.elapsed().as_secs_f64()
    })
    .unwrap()
}

fn datapath(runs: usize, seconds: u64, rules: usize) {
    let none = geneve_pair(31).unwrap();
    let with = geneve_pair(33).unwrap();
    let server = &with.1;
    let p = big_policy(with.0.identity, rules);
    let prefixes = map_entries(Identity::from_raw(server.identity.into()).unwrap(), &p).len();
    let mut map = PolicyMap::open(server.pins.path(), false).unwrap();
    map.update(&Identity::from_raw(server.identity.into()).unwrap(), &p)
        .unwrap();
    for (_, b, _) in [&none, &with] {
        accept_forever(&b.pod);
    }
    let label = if rules == 1000 {
        "1,000-rule policy".to_owned()
    } else {
        format!("{rules}-rule policy")
    };
    let cases = [("no policy (baseline)", &none), (label.as_str(), &with)];
    let mut gbit: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut conns: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for round in 0..runs {
        for (i, (name, (a, b, _))) in cases.iter().enumerate() {
            let g = iperf(&b.pod, &a.pod, &b.pod_ip.to_string(), seconds).unwrap();
            let to = SocketAddr::from((b.pod_ip, CONN_PORT));
            let c = conn_rate(&a.pod, to, seconds);
            eprintln!(
                "  round {}: {name}: {g:.2} Gbit/s, {c:.0} connections/s",
                round + 1
            );
            gbit[i].push(g);
            conns[i].push(c);
        }
    }
    println!(
        "policy on the path: pod to pod across two nodes (Geneve), {runs} interleaved rounds x {seconds} s, median [min..max]; the policy: {rules} compiled entries, {prefixes} map prefixes"
    );
    for (what, unit, v) in [
        ("throughput", "Gbit/s", &gbit),
        ("new connections", "connections/s", &conns),
    ] {
        let base = median(v[0].clone());
        for (i, (name, _)) in cases.iter().enumerate() {
            let m = median(v[i].clone());
            let ratio = m.0 / base.0;
            println!(
                "  {what:<16} {name:<22} {:>9.2} {unit} [{:.2}..{:.2}]  ratio {ratio:.3}",
                m.0, m.1, m.2
            );
            let mut f = Figure::new("policy", format!("{what}: {name}"), unit, m, Better::Higher)
                .params(serde_json::json!({"runs": runs, "seconds": seconds, "entries": rules, "prefixes": prefixes}));
            if i > 0 {
                f = f.baseline(format!("{what}: {}", cases[0].0), base.0);
            }
            record(&f);
        }
    }
}

/// A policy of `rules` ingress rules, each from one of 1,000 client labels
/// on one port.
fn manifest(rules: usize) -> String {
    let mut s = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: big\n  namespace: default\nspec:\n  endpointSelector:\n    matchLabels:\n      app: server\n  ingress:\n",
    );
    for i in 0..rules {
        s.push_str(&format!(
            "  - fromEndpoints: [{{matchLabels: {{app: client-{}}}}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n",
            i % 1000,
            1024 + i / 1000
        ));
    }
    s
}

fn compile_and_write(rules: usize, runs: usize) {
    let n = Node::new(35).unwrap();
    let _dp = n.datapath(false).unwrap();
    let yaml = manifest(rules);
    let cluster: clustermesh_api::ClusterName = "c1".parse().unwrap();
    let ns: clustermesh_api::K8sName = "default".parse().unwrap();
    let labels =
        clustermesh_api::Labels::new([("k8s:app".to_owned(), "server".to_owned())].into()).unwrap();
    let me = EndpointRef {
        cluster: &cluster,
        namespace: &ns,
        labels: &labels,
    };
    let peers: Vec<(Identity, FlowPeer)> = (0..1000u64)
        .map(|j| {
            let l = clustermesh_api::Labels::new(
                [
                    ("k8s:app".to_owned(), format!("client-{j}")),
                    (
                        "k8s:io.kubernetes.pod.namespace".to_owned(),
                        "default".to_owned(),
                    ),
                ]
                .into(),
            )
            .unwrap();
            (
                Identity::from_raw((1 << 16) | (300 + j)).unwrap(),
                FlowPeer::Endpoint {
                    cluster: cluster.clone(),
                    labels: l,
                },
            )
        })
        .collect();
    let id = Identity::from_raw((1 << 16) | 299).unwrap();
    let (mut total, mut raw) = (Vec::new(), Vec::new());
    let mut prefixes = 0;
    for round in 0..runs {
        let mut map = PolicyMap::open(n.pins.path(), false).unwrap();
        map.prune(&Default::default()).unwrap();
        let t0 = Instant::now();
        let policies: Vec<_> = parse_manifests(&yaml).unwrap();
        let compiled = compile(&policies, &me, &peers);
        let t_compile = t0.elapsed();
        map.update(&id, &compiled).unwrap();
        let t = t0.elapsed();
        total.push(t.as_secs_f64() * 1000.0);
        // Baseline: the same prefixes, plain inserts into the same map.
        let entries = map_entries(id, &compiled);
        prefixes = entries.len();
        map.prune(&Default::default()).unwrap();
        let t1 = Instant::now();
        raw_insert(n.pins.path(), &entries);
        raw.push(t1.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "  round {}: parse + compile {:.1} ms, with the map update {:.1} ms; plain inserts {:.1} ms",
            round + 1,
            t_compile.as_secs_f64() * 1000.0,
            t.as_secs_f64() * 1000.0,
            raw.last().unwrap()
        );
    }
    let (t, r) = (median(total), median(raw));
    println!(
        "compile + map update of {rules} rules (1,000 peers, {prefixes} prefixes), {runs} runs: {:.1} ms [{:.1}..{:.1}]; plain inserts of the prefixes {:.1} ms; ratio {:.2}",
        t.0,
        t.1,
        t.2,
        r.0,
        t.0 / r.0
    );
    record(
        &Figure::new("policy", "compile + map update", "ms", t, Better::Lower)
            .baseline("plain map inserts of the same prefixes", r.0)
            .params(serde_json::json!({"rules": rules, "prefixes": prefixes, "peers": 1000, "runs": runs})),
    );
    record(
        &Figure::new(
            "policy",
            "plain map inserts of the same prefixes",
            "ms",
            r,
            Better::Lower,
        )
        .params(serde_json::json!({"prefixes": prefixes})),
    );
}

fn raw_insert(
    pin: &std::path::Path,
    entries: &std::collections::BTreeMap<
        node_agent::reconcilers::network_policy::Prefix,
        tunnel_common::PolicyValue,
    >,
) {
    node_agent::datapath::policy_insert_raw(pin, entries).unwrap();
}

fn policy_yaml(port: u16) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: prop\n  namespace: default\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: web}}}}]\n    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]\n"
    )
}

fn revisions(t: &mesh::Topology) -> Vec<Option<u32>> {
    t.nodes
        .iter()
        .map(|n| {
            node_agent::datapath::policy_states(&n.agent.bpf_pin_dir)
                .ok()
                .and_then(|v| v.first().map(|(_, s)| s.revision))
        })
        .collect()
}

fn propagation(nodes: u8, changes: usize) {
    let o = Options {
        clusters: 1,
        nodes,
        pods: 1,
        tunnel: "geneve".into(),
        encryption: Encryption::None,
        ip_family: IpFamily::Ipv4,
        state_dir: std::env::temp_dir().join(format!("cm-bench-policy-{}", std::process::id())),
        prefix: "bpol".into(),
        bin_dir: binary("node-agent").parent().unwrap().to_owned(),
        lease_ttl: None,
        stale_ttl: None,
    };
    let t = mesh::up(&o, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f: PathBuf = dir.path().join("p.yaml");
    let (mut lat, mut cli) = (Vec::new(), Vec::new());
    for k in 0..changes {
        std::fs::write(&f, policy_yaml(8000 + k as u16)).unwrap();
        let before = revisions(&t);
        let t0 = Instant::now();
        let out = t
            .cli(&o.bin_dir)
            .args(["policy", "apply", "--cluster", "c1", "-f"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cli.push(t0.elapsed().as_secs_f64() * 1000.0);
        let mut seen: Vec<Option<f64>> = vec![None; t.nodes.len()];
        while seen.iter().any(Option::is_none) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "change {k} never arrived"
            );
            for (i, r) in revisions(&t).into_iter().enumerate() {
                if seen[i].is_none() && r.is_some() && r != before[i] {
                    seen[i] = Some(t0.elapsed().as_secs_f64() * 1000.0);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        lat.extend(seen.into_iter().flatten());
    }
    let _ = mesh::down(&t);
    let p = Percentiles::of(lat);
    let c = Percentiles::of(cli);
    println!(
        "policy change to every node's map: 1 cluster x {nodes} nodes, {changes} changes through `clustermesh policy apply`: p50 {:.1} ms, p99 {:.1} ms [{:.1}..{:.1}]; the command's round trip p50 {:.1} ms (baseline); p99 / round trip {:.2}",
        p.p50,
        p.p99,
        p.min,
        p.max,
        c.p50,
        p.p99 / c.p50
    );
    record(
        &Figure::latency("policy", "propagation to every node", "ms", &p)
            .baseline("clustermesh policy apply round trip", c.p50)
            .params(serde_json::json!({"nodes": nodes, "changes": changes})),
    );
}

fn main() {
    if !clustermesh_testkit::bench_may_run("policy", "network namespaces, eBPF") {
        return;
    }
    let runs = arg("--runs", 5).max(1) as usize;
    let seconds = arg("--seconds", 3).max(1);
    let rules = arg("--rules", 1000).max(1) as usize;
    let compile_rules = arg("--compile-rules", 10_000).max(1) as usize;
    let nodes = arg("--nodes", 4).clamp(1, 9) as u8;
    let changes = arg("--changes", 20).max(1) as usize;
    sweep_stale();
    datapath(runs, seconds, rules);
    compile_and_write(compile_rules, runs);
    propagation(nodes, changes);
}
