//! Privileged: network policy enforced by the eBPF datapath on a 3-cluster
//! mesh of the harness (`e2e::mesh`: real etcds, apiservers, agents, CNI
//! pods), the policy applied with the real `clustermesh` CLI.
//!
//! c1's `app=web` pod is default-deny on ingress, reachable only from c2's
//! `app=frontend` pods on TCP 8080. From c2's frontend it connects (and the
//! reply of the connection passes back); from c3's frontend (other cluster),
//! c2's web pod (other label), on TCP 9090 (other port) and on UDP 8080 it
//! is dropped, each counted as `drop_policy_denied` for that endpoint.
//! Deleting the policy restores the denied pairs (the time is printed).
//! For each tunnel mode without encryption, and with strict WireGuard in
//! dual stack (both families checked), where audit mode is checked too: the
//! agent restarted with `--policy-audit` lets everything through and counts
//! exactly the would-be drops as `policy_audit`. In the Geneve mesh also a
//! Kubernetes NetworkPolicy of the documentation's shape: it allows the
//! local cluster's frontends only.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use e2e::{
    mesh::{self, Encryption, IpFamily, Options, Pod, Topology},
    product::binary,
    require_root,
};
use tunnel_common::{Direction, Verdict};

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web-from-c2-frontend
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
        io.cilium.k8s.policy.cluster: c2
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
"#;

/// Kubernetes' documentation shape (`podSelector`, `ingress.from.podSelector`,
/// `ports`): without a cluster in the selector, only the local cluster's
/// frontends are allowed (as Cilium's policies since 1.19).
const NETWORK_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-from-frontend
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: frontend
    ports:
    - protocol: TCP
      port: 8080
"#;

/// Default deny on `app=fresh` pods (only `app=nobody` may reach them).
const FRESH_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fresh-deny
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: fresh
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: nobody
"#;

/// A denied attempt waits this long for an answer.
const DENIED_WAIT: Duration = Duration::from_millis(400);

/// A mesh removed on drop (also when the test panics).
struct Up(Topology);

impl Drop for Up {
    fn drop(&mut self) {
        if let Err(e) = mesh::down(&self.0) {
            eprintln!("mesh down: {e:#}");
        }
    }
}

fn bin_dir() -> PathBuf {
    binary("node-agent").parent().unwrap().to_owned()
}

fn options(prefix: &str, tunnel: &str, encryption: Encryption, family: IpFamily) -> Options {
    Options {
        clusters: 3,
        nodes: 1,
        pods: 1,
        tunnel: tunnel.into(),
        encryption,
        ip_family: family,
        state_dir: std::env::temp_dir().join(format!("cm-pol-{prefix}-{}", std::process::id())),
        prefix: prefix.into(),
        bin_dir: bin_dir(),
        lease_ttl: Some(4),
        stale_ttl: Some(5),
    }
}

/// The pods of the scenario.
struct Pods {
    backend: Pod,
    c2_front: Pod,
    c3_front: Pod,
    c2_web: Pod,
}

fn node_of(t: &Topology, cluster: &str) -> usize {
    t.nodes.iter().position(|n| n.cluster == cluster).unwrap()
}

fn pods(t: &mut Topology) -> Pods {
    let backend = t.pods_of("c1").next().unwrap().clone();
    let c2_web = t.pods_of("c2").next().unwrap().clone();
    let (n2, n3) = (node_of(t, "c2"), node_of(t, "c3"));
    let mtu = 1280;
    let c2_front =
        mesh::add_pod_labelled(t, &bin_dir(), n2, ("fe", "front"), mtu, "frontend").unwrap();
    let c3_front =
        mesh::add_pod_labelled(t, &bin_dir(), n3, ("fe", "front"), mtu, "frontend").unwrap();
    Pods {
        backend,
        c2_front,
        c3_front,
        c2_web,
    }
}

/// The pod's address of the family (`v6`).
fn addr(p: &Pod, v6: bool) -> IpAddr {
    *p.addrs().iter().find(|a| a.is_ipv6() == v6).unwrap()
}

fn tcp(from: &Pod, to: &Pod, port: u16, v6: bool, timeout: Duration) -> Result<String, String> {
    let target = SocketAddr::new(addr(to, v6), port);
    mesh::in_netns(&from.netns, || mesh::ask(target, timeout))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn udp(from: &Pod, to: &Pod, port: u16, v6: bool, timeout: Duration) -> Option<String> {
    let target = SocketAddr::new(addr(to, v6), port);
    let any: SocketAddr = if v6 {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    mesh::in_netns(&from.netns, || {
        let s = UdpSocket::bind(any).ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        s.send_to(b"?", target).ok()?;
        let mut buf = [0u8; 256];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .ok()
    .flatten()
}

/// The node-side ifindex of a pod's veth (`eth0@ifN` in the pod).
fn host_ifindex(p: &Pod) -> u32 {
    let out = mesh::in_ns(&p.netns, &["ip", "-o", "link", "show", "eth0"]).unwrap();
    let peer = out.split("@if").nth(1).unwrap();
    peer.split(':').next().unwrap().parse().unwrap()
}

/// The pod's policy counter of (direction, verdict), in packets.
fn policy_count(t: &Topology, p: &Pod, dir: Direction, v: Verdict) -> u64 {
    let pin = &t.nodes[node_of(t, &p.cluster)].agent.bpf_pin_dir;
    let ifindex = host_ifindex(p);
    node_agent::datapath::policy_stats(pin)
        .unwrap()
        .iter()
        .filter(|(i, d, verdict, _)| *i == ifindex && *d == dir && *verdict == v)
        .map(|(_, _, _, c)| c.packets)
        .sum()
}

fn cli(t: &Topology, args: &[&str]) -> String {
    let out = t.cli(&bin_dir()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "clustermesh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn apply(t: &Topology, dir: &Path) {
    let f = dir.join("policy.yaml");
    std::fs::write(&f, POLICY).unwrap();
    let out = cli(
        t,
        &[
            "policy",
            "apply",
            "--cluster",
            "c1",
            "-f",
            f.to_str().unwrap(),
        ],
    );
    assert!(out.contains("web-from-c2-frontend"), "{out}");
}

/// A Kubernetes NetworkPolicy on the backend: c1's own frontend reaches it
/// on TCP 8080, c2's frontend (another cluster: not selected by default),
/// another port and UDP do not, each counted.
fn network_policy(t: &mut Topology, p: &Pods) {
    let n1 = node_of(t, "c1");
    let local =
        mesh::add_pod_labelled(t, &bin_dir(), n1, ("fe", "front"), 1280, "frontend").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("knp.yaml");
    std::fs::write(&f, NETWORK_POLICY).unwrap();
    let out = cli(
        t,
        &[
            "policy",
            "apply",
            "--cluster",
            "c1",
            "-f",
            f.to_str().unwrap(),
        ],
    );
    assert!(out.contains("web-from-frontend"), "{out}");
    await_enforcement(p, true, false);
    let to = &p.backend;
    let denied = |t: &Topology| policy_count(t, to, Direction::Ingress, Verdict::DropPolicyDenied);
    let ok = tcp(&local, to, 8080, false, Duration::from_secs(2));
    assert_eq!(ok.as_deref(), Ok(to.answer.as_str()), "c1's frontend");
    for (what, from, port) in [
        ("c2's frontend", &p.c2_front, 8080),
        ("other port", &local, 9090),
    ] {
        let n = denied(t);
        assert!(tcp(from, to, port, false, DENIED_WAIT).is_err(), "{what}");
        assert!(denied(t) > n, "{what}: not counted");
    }
    let n = denied(t);
    assert_eq!(udp(&local, to, 8080, false, DENIED_WAIT), None, "UDP");
    assert_eq!(denied(t), n + 1);
    cli(
        t,
        &[
            "policy",
            "delete",
            "--cluster",
            "c1",
            "web-from-frontend",
            "-n",
            "default",
        ],
    );
    await_enforcement(p, false, false);
}

/// A new pod of a new identity that a default-deny policy selects is
/// enforced from its first packet: CNI ADD returns only once the agent has
/// applied its policy. The first connection to it, from the backend on the
/// same node (local delivery: no propagation to wait for), right after the
/// ADD returned, is dropped and counted.
fn new_pod_enforced_from_the_first_packet(t: &mut Topology, p: &Pods) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("fresh.yaml");
    std::fs::write(&f, FRESH_POLICY).unwrap();
    cli(
        t,
        &[
            "policy",
            "apply",
            "--cluster",
            "c1",
            "-f",
            f.to_str().unwrap(),
        ],
    );
    let n1 = node_of(t, "c1");
    let fresh = mesh::add_pod_labelled(t, &bin_dir(), n1, ("fr", "fresh"), 1280, "fresh").unwrap();
    let r = tcp(&p.backend, &fresh, 8080, false, DENIED_WAIT);
    assert!(r.is_err(), "the new pod answered before its policy: {r:?}");
    assert!(
        policy_count(t, &fresh, Direction::Ingress, Verdict::DropPolicyDenied) >= 1,
        "the first connection was not dropped by the policy"
    );
    cli(
        t,
        &[
            "policy",
            "delete",
            "--cluster",
            "c1",
            "fresh-deny",
            "-n",
            "default",
        ],
    );
}

fn delete(t: &Topology) {
    cli(
        t,
        &[
            "policy",
            "delete",
            "--cluster",
            "c1",
            "web-from-c2-frontend",
            "-n",
            "default",
        ],
    );
}

/// Every pair reaches the backend (no policy, or audit mode).
fn all_reach(p: &Pods, v6: bool) {
    let to = &p.backend;
    for from in [&p.c2_front, &p.c3_front, &p.c2_web] {
        let r = tcp(from, to, 8080, v6, Duration::from_secs(2));
        assert_eq!(
            r.as_deref(),
            Ok(to.answer.as_str()),
            "{} -> backend",
            from.name
        );
    }
    assert_eq!(
        udp(&p.c2_front, to, 8080, v6, Duration::from_secs(2)).as_deref(),
        Some(to.answer.as_str()),
        "UDP"
    );
}

/// Enforced: the allowed pair connects, every other one is dropped and
/// counted for the backend.
fn enforced(t: &Topology, p: &Pods, v6: bool) {
    let to = &p.backend;
    let denied = |t: &Topology| policy_count(t, to, Direction::Ingress, Verdict::DropPolicyDenied);
    let before = denied(t);
    let ok = tcp(&p.c2_front, to, 8080, v6, Duration::from_secs(2));
    assert_eq!(
        ok.as_deref(),
        Ok(to.answer.as_str()),
        "allowed pair (reply read)"
    );
    assert_eq!(denied(t), before, "the allowed connection dropped nothing");
    let attempts: [(&str, &Pod, u16); 3] = [
        ("other cluster", &p.c3_front, 8080),
        ("other label", &p.c2_web, 8080),
        ("other port", &p.c2_front, 9090),
    ];
    for (what, from, port) in attempts {
        let n = denied(t);
        let r = tcp(from, to, port, v6, DENIED_WAIT);
        assert!(r.is_err(), "{what}: {r:?}");
        assert!(denied(t) > n, "{what}: not counted as drop_policy_denied");
    }
    let n = denied(t);
    assert_eq!(udp(&p.c2_front, to, 8080, v6, DENIED_WAIT), None, "UDP");
    assert_eq!(denied(t), n + 1, "the UDP datagram counted once");
    // Nothing the backend sent was dropped: its replies passed.
    assert_eq!(
        policy_count(t, to, Direction::Egress, Verdict::DropPolicyDenied),
        0
    );
    // The agent reports the backend's drops (refreshed every 500 ms).
    let status = &t.nodes[node_of(t, "c1")].agent.status;
    let want = addr(to, v6).to_string();
    mesh::wait_for(
        "the backend's drops in /status",
        Duration::from_secs(5),
        || {
            let Ok(body) = mesh::http_get(status, "/status") else {
                return false;
            };
            let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            doc["policy"]["verdicts"].as_array().is_some_and(|v| {
                v.iter().any(|c| {
                    c["endpoint"]
                        .as_str()
                        .is_some_and(|e| e.split(',').any(|a| a == want))
                        && c["direction"] == "ingress"
                        && c["verdict"] == "drop_policy_denied"
                        && c["packets"].as_u64().is_some_and(|n| n >= 4)
                })
            })
        },
    )
    .unwrap();
}

/// Waits until the policy is (`on`) or is no longer enforced on the
/// backend, seen from c3's frontend.
fn await_enforcement(p: &Pods, on: bool, v6: bool) {
    mesh::wait_for("the policy to take effect", Duration::from_secs(20), || {
        tcp(
            &p.c3_front,
            &p.backend,
            8080,
            v6,
            Duration::from_millis(200),
        )
        .is_err()
            == on
    })
    .unwrap();
}

/// Apply, enforce, delete: on one mesh.
fn scenario(t: &Topology, p: &Pods, families: &[bool], label: &str) {
    let dir = tempfile::tempdir().unwrap();
    for &v6 in families {
        all_reach(p, v6);
    }
    apply(t, dir.path());
    await_enforcement(p, true, families[0]);
    for &v6 in families {
        enforced(t, p, v6);
    }
    let t0 = Instant::now();
    delete(t);
    await_enforcement(p, false, families[0]);
    let restored = t0.elapsed();
    eprintln!(
        "{label}: enforced and counted; traffic restored {:.0} ms after `policy delete` started",
        restored.as_secs_f64() * 1000.0
    );
    assert!(
        restored < Duration::from_secs(3),
        "restored after {restored:?}"
    );
    for &v6 in families {
        all_reach(p, v6);
    }
}

/// Audit mode: c1's agent restarted with `--policy-audit`.
fn audit(t: &mut Topology, p: &Pods) {
    let dir = tempfile::tempdir().unwrap();
    let n1 = node_of(t, "c1");
    let role = t
        .processes
        .iter()
        .find(|x| x.pid == t.nodes[n1].agent.pid)
        .unwrap()
        .role
        .clone();
    mesh::kill(t, &role).unwrap();
    let i = t.processes.iter().position(|x| x.role == role).unwrap();
    t.processes[i].cmd.push("--policy-audit".into());
    mesh::restart(t, &role).unwrap();
    apply(t, dir.path());
    let to = &p.backend;
    let audited = |t: &Topology| policy_count(t, to, Direction::Ingress, Verdict::PolicyAudit);
    let denied = |t: &Topology| policy_count(t, to, Direction::Ingress, Verdict::DropPolicyDenied);
    // The policy is in place once a would-be drop is counted.
    mesh::wait_for("the audited policy", Duration::from_secs(20), || {
        let n = audited(t);
        udp(&p.c2_front, to, 8080, false, Duration::from_millis(300)).is_some() && audited(t) > n
    })
    .unwrap();
    let (a0, d0) = (audited(t), denied(t));
    // Allowed: nothing audited.
    let ok = tcp(&p.c2_front, to, 8080, false, Duration::from_secs(2));
    assert_eq!(ok.as_deref(), Ok(to.answer.as_str()));
    assert_eq!(audited(t), a0, "an allowed connection is no would-be drop");
    // Would-be drops pass, each counted: one UDP datagram is one.
    assert_eq!(
        udp(&p.c2_front, to, 8080, false, Duration::from_secs(2)).as_deref(),
        Some(to.answer.as_str())
    );
    assert_eq!(audited(t), a0 + 1, "exactly the datagram");
    for from in [&p.c3_front, &p.c2_web] {
        let n = audited(t);
        let r = tcp(from, to, 8080, false, Duration::from_secs(2));
        assert_eq!(
            r.as_deref(),
            Ok(to.answer.as_str()),
            "{} in audit mode",
            from.name
        );
        assert!(audited(t) > n, "{}: not audited", from.name);
    }
    assert_eq!(denied(t), d0, "audit mode dropped nothing");
    delete(t);
}

#[test]
fn policy_enforced_in_every_tunnel_mode_and_under_strict_wireguard() {
    require_root!();
    for (prefix, tunnel, enc, family) in [
        ("pw", "vxlan", Encryption::Strict, IpFamily::Dual),
        ("pv", "vxlan", Encryption::None, IpFamily::Ipv4),
        ("pg", "geneve", Encryption::None, IpFamily::Ipv4),
        ("pd", "direct", Encryption::None, IpFamily::Ipv4),
    ] {
        let t0 = Instant::now();
        let mut up = Up(mesh::up(&options(prefix, tunnel, enc, family), false).unwrap());
        let p = pods(&mut up.0);
        let families: &[bool] = if family == IpFamily::Dual {
            &[false, true]
        } else {
            &[false]
        };
        let label = format!("{tunnel}, encryption {enc:?}, {family:?}");
        scenario(&up.0, &p, families, &label);
        if enc == Encryption::Strict {
            audit(&mut up.0, &p);
        }
        if tunnel == "geneve" {
            network_policy(&mut up.0, &p);
        }
        if tunnel == "vxlan" && enc == Encryption::None {
            new_pod_enforced_from_the_first_packet(&mut up.0, &p);
        }
        eprintln!("{label}: {:.1} s", t0.elapsed().as_secs_f64());
    }
}

/// The policy maps' reconciler on a real datapath: a restarted agent reads
/// the prefixes back and prunes them; deleting what is not there is no
/// error (aya reports a missing key on delete as ENOENT: it once failed
/// every such delete).
#[test]
fn policy_map_survives_a_restart_and_prunes() {
    use clustermesh_api::{
        Identity,
        policy::{
            CompiledEntry, CompiledPolicy, Direction as D, MapVerdict, PolicyKind, PolicyRef,
            PortRange, ProtoMatch, RuleRef, RuleSection,
        },
    };
    use node_agent::reconcilers::{Reconciler as _, network_policy::PolicyMap};
    require_root!();
    let n = e2e::topo::Node::new(41).unwrap();
    let _dp = n.datapath(false).unwrap();
    let id = Identity::from_raw(n.identity.into()).unwrap();
    let p = CompiledPolicy {
        default_deny_ingress: true,
        default_deny_egress: false,
        entries: vec![CompiledEntry {
            peer: Identity::WORLD,
            direction: D::Ingress,
            protocol: ProtoMatch::Tcp,
            ports: PortRange::new(1024, 65535).unwrap(),
            verdict: MapVerdict::Allow,
            rule: RuleRef {
                policy: PolicyRef {
                    kind: PolicyKind::CiliumNetworkPolicy,
                    namespace: Some("default".parse().unwrap()),
                    name: "p".parse().unwrap(),
                },
                section: RuleSection::Ingress,
                origin: "spec.ingress[0]".into(),
            },
        }],
    };
    let pin = n.pins.path();
    let mut m = PolicyMap::open(pin, false).unwrap();
    // Never written: deleting it is no error.
    m.delete(&Identity::HOST).unwrap();
    m.update(&id, &p).unwrap();
    let states = node_agent::datapath::policy_states(pin).unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(
        states[0].1.flags,
        tunnel_common::POLICY_DEFAULT_DENY_INGRESS
    );
    drop(m);
    // A restarted agent: same policy, no rewrite of the revision; then
    // the policy goes and the prune removes every prefix.
    let mut m = PolicyMap::open(pin, false).unwrap();
    m.update(&id, &p).unwrap();
    assert_eq!(node_agent::datapath::policy_states(pin).unwrap(), states);
    assert_eq!(m.prune(&Default::default()).unwrap(), 1);
    assert!(node_agent::datapath::policy_states(pin).unwrap().is_empty());
    let mut again = PolicyMap::open(pin, false).unwrap();
    assert_eq!(
        again.prune(&Default::default()).unwrap(),
        0,
        "prefixes left"
    );
}

/// Egress to addresses outside the mesh by CIDR, on a real datapath
/// (Geneve pair): a default-deny egress policy allowing UDP 9999 to
/// 203.0.113.0/24 except 203.0.113.128/25. The datapath gives the
/// destination the node-local identity of its longest policy prefix
/// (`CM_POLICY_CIDR`): inside the /24 it passes, inside the except, outside
/// every prefix (world) and on another port it is dropped and counted.
#[test]
fn egress_by_cidr_with_except() {
    use clustermesh_api::{
        policy::{EndpointRef, parse_manifests},
        {Identity, Labels},
    };
    use node_agent::reconcilers::{
        Reconciler as _,
        network_policy::{PolicyCidrMap, PolicyMap},
    };
    require_root!();
    let a = e2e::topo::Node::new(43).unwrap();
    let b = e2e::topo::Node::new(44).unwrap();
    let (ula, ulb) = e2e::topo::underlay(&a, &b).unwrap();
    let mut dpa = a.datapath(true).unwrap();
    let mut dpb = b.datapath(true).unwrap();
    a.connect_with(&mut dpa, &b, tunnel_common::TunnelMode::Geneve, ula, ulb)
        .unwrap();
    b.connect_with(&mut dpb, &a, tunnel_common::TunnelMode::Geneve, ulb, ula)
        .unwrap();
    let policies = parse_manifests(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDRSet:
    - cidr: 203.0.113.0/24
      except: [203.0.113.128/25]
    toPorts: [{ports: [{port: "9999", protocol: UDP}]}]
"#,
    )
    .unwrap();
    let cidrs = node_agent::clusters::policy::cidr_peers(&policies);
    assert_eq!(cidrs.len(), 2, "{cidrs:?}");
    let pin = a.pins.path();
    let mut cm = PolicyCidrMap::open(pin).unwrap();
    for (c, id, _) in &cidrs {
        cm.update(c, &id.get()).unwrap();
    }
    let peers: Vec<_> = cidrs
        .iter()
        .map(|(_, id, addr)| (*id, clustermesh_api::policy::FlowPeer::Address(*addr)))
        .collect();
    let labels = Labels::new([("k8s:app".to_owned(), "client".to_owned())].into()).unwrap();
    let (cluster, ns) = ("c43".parse().unwrap(), "default".parse().unwrap());
    let me = EndpointRef {
        cluster: &cluster,
        namespace: &ns,
        labels: &labels,
    };
    let compiled = clustermesh_api::policy::compile(&policies, &me, &peers);
    assert!(compiled.default_deny_egress);
    let mut pm = PolicyMap::open(pin, false).unwrap();
    pm.update(&Identity::from_raw(a.identity.into()).unwrap(), &compiled)
        .unwrap();
    let lxc = e2e::topo::ifindex(&a.ns, "lxc0").unwrap();
    let denied = || {
        node_agent::datapath::policy_stats(pin)
            .unwrap()
            .iter()
            .filter(|(i, d, v, _)| {
                *i == lxc && *d == Direction::Egress && *v == Verdict::DropPolicyDenied
            })
            .map(|(_, _, _, c)| c.packets)
            .sum::<u64>()
    };
    let send = |to: &str| {
        let to: SocketAddr = to.parse().unwrap();
        clustermesh_api::netns::run_in_named(Some(a.pod.name()), || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"x", to).unwrap();
        })
        .unwrap();
    };
    for (to, dropped) in [
        ("203.0.113.9:9999", false),
        ("203.0.113.200:9999", true),
        ("198.51.100.1:9999", true),
        ("203.0.113.9:8888", true),
    ] {
        let n = denied();
        send(to);
        // The verdict is taken in the sender's context: counted by now.
        assert_eq!(denied() - n, u64::from(dropped), "{to}");
    }
}
