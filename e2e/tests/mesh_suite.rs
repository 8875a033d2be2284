//! Privileged: the end-to-end suite on the mesh harness (`e2e::mesh`, the
//! same code as `mesh up|check|down` and `make demo`): real etcds (TLS),
//! apiservers, agents, CNI pods, connected with the `clustermesh` CLI.
//!
//! - the connectivity matrix, the global service and (encrypted) the wire,
//!   for each tunnel mode with and without strict WireGuard;
//! - at runtime: a cluster disconnected (its pods unreachable, drops
//!   counted) and connected again; an etcd killed and restarted while
//!   traffic flows (no loss, convergence after); a node-agent killed -9 and
//!   restarted under continuous ping (loss reported); a remote cluster's
//!   apiserver stopped (its entries expire with their lease, its traffic is
//!   dropped with a counted reason);
//! - flows (VXLAN, strict WireGuard): `clustermesh observe` across both
//!   clusters (allowed, denied by a policy, through the global service),
//!   its filters, and `--follow`.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::{
    path::PathBuf,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use e2e::{
    mesh::{self, Encryption, Options, Topology},
    product::binary,
    require_root,
};
use tunnel_common::{Direction, Verdict};

/// One mesh at a time: they share the machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// A mesh removed on drop (also when the test panics).
struct Up(Topology);

impl Drop for Up {
    fn drop(&mut self) {
        if let Err(e) = mesh::down(&self.0) {
            eprintln!("mesh down: {e:#}");
        }
    }
}

fn options(prefix: &str, tunnel: &str, encryption: Encryption, nodes: u8) -> Options {
    let state: PathBuf =
        std::env::temp_dir().join(format!("cm-suite-{prefix}-{}", std::process::id()));
    Options {
        clusters: 2,
        nodes,
        pods: 1,
        tunnel: tunnel.into(),
        encryption,
        ip_family: mesh::IpFamily::Ipv4,
        state_dir: state,
        prefix: prefix.into(),
        bin_dir: binary("node-agent").parent().unwrap().to_owned(),
        lease_ttl: Some(4),
        stale_ttl: Some(5),
    }
}

fn failed_rows(rows: &[mesh::Row]) -> Vec<String> {
    rows.iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{} {} -> {}: {}", r.check, r.from, r.to, r.detail))
        .collect()
}

#[test]
fn matrix_for_each_tunnel_mode_with_and_without_encryption() {
    require_root!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for tunnel in ["vxlan", "geneve", "direct"] {
        for enc in [Encryption::None, Encryption::Strict] {
            let t0 = Instant::now();
            // A prefix of its own per mesh: nothing of one is reused by
            // the next.
            let o = options(&format!("s{}{}", &tunnel[..1], enc as u8), tunnel, enc, 2);
            let up = Up(mesh::up(&o, false).unwrap());
            let rows = mesh::check(&up.0).unwrap();
            let failed = failed_rows(&rows);
            eprintln!(
                "{tunnel}, encryption {enc:?}: {} checks, {} failed ({:.1} s with up and check)",
                rows.len(),
                failed.len(),
                t0.elapsed().as_secs_f64()
            );
            assert!(failed.is_empty(), "{tunnel}/{enc:?}: {failed:#?}");
            // Every kind of check ran: ping, TCP, service, and the wire
            // when encrypted.
            for kind in ["ping", "tcp", "service"] {
                assert!(rows.iter().any(|r| r.check == kind), "no {kind} check");
            }
            // IPv4 only: no IPv6 frontend.
            assert!(!rows.iter().any(|r| r.check == "service6"));
            assert_eq!(
                rows.iter().any(|r| r.check == "encryption"),
                enc != Encryption::None
            );
            if tunnel == "vxlan" && enc == Encryption::Strict {
                let mut up = up;
                new_pods_are_encrypted_from_the_first_packet(&mut up.0);
                usr1_rotates_the_key_and_keeps_the_agent(&up.0);
                a_dead_wireguard_device_is_restarted(&up.0);
                flows_are_observed_across_clusters(&up.0);
                podman_containers_join_the_mesh(&up.0);
            }
        }
    }
}

/// IPv6: the matrix (ping6, tcp6, the global service's IPv6 frontend
/// service6; in dual-stack also ping, tcp and the IPv4 service) and the
/// wire for each tunnel mode with strict WireGuard,
/// over a dual-stack underlay and over an IPv6-only one; in the IPv6 VXLAN
/// mesh also the first packets of new IPv6 pods.
#[test]
fn matrix_in_dual_stack_and_ipv6_with_strict_encryption() {
    require_root!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for family in [mesh::IpFamily::Dual, mesh::IpFamily::Ipv6] {
        for tunnel in ["vxlan", "geneve", "direct"] {
            let t0 = Instant::now();
            let f = if family == mesh::IpFamily::Dual {
                'd'
            } else {
                's'
            };
            let mut o = options(
                &format!("x{f}{}", &tunnel[..1]),
                tunnel,
                Encryption::Strict,
                2,
            );
            o.ip_family = family;
            let up = Up(mesh::up(&o, false).unwrap());
            let rows = mesh::check(&up.0).unwrap();
            let failed = failed_rows(&rows);
            eprintln!(
                "{family:?} {tunnel}, strict: {} checks, {} failed ({:.1} s with up and check)",
                rows.len(),
                failed.len(),
                t0.elapsed().as_secs_f64()
            );
            assert!(failed.is_empty(), "{family:?}/{tunnel}: {failed:#?}");
            // The global service in each family (service6: the IPv6
            // frontend, balanced over the IPv6 backends).
            let mut kinds = vec!["ping6", "tcp6", "encryption", "service6"];
            if family == mesh::IpFamily::Dual {
                kinds.extend(["ping", "tcp", "service"]);
            } else {
                assert!(
                    !rows.iter().any(|r| r.check == "service"),
                    "no IPv4 frontend"
                );
                assert!(up.0.pods.iter().all(|p| p.ip.is_none() && p.ipv6.is_some()));
                assert!(up.0.nodes.iter().all(|n| n.underlay_ip.is_none()));
            }
            for kind in kinds {
                assert!(rows.iter().any(|r| r.check == kind), "no {kind} check");
            }
            if family == mesh::IpFamily::Ipv6 && tunnel == "vxlan" {
                let mut up = up;
                new_pods_are_encrypted_from_the_first_packet(&mut up.0);
            }
        }
    }
}

/// Strict mode from a pod's first packet, on a node that forwards and has
/// a default route (as real hosts do), so any packet that reached the host
/// stack would leave in plaintext over the underlay: 3 new pods, each
/// pinging a remote pod every 10 ms from the moment CNI ADD returns; every
/// ping answered, and the underlay captures show no pod address outside
/// WireGuard.
/// A real container runtime on a node: podman (CNI backend) runs a
/// container from a busybox root filesystem on c1's first node, attached
/// by `clustermesh-cni`; it pings a pod of c2 and gets answers from the
/// global service (strict WireGuard: the mesh's own check proved the wire);
/// `podman rm` releases its address (CNI DEL: endpoint file and lease
/// gone).
fn podman_containers_join_the_mesh(t: &Topology) {
    let bin = binary("clustermesh-cni").parent().unwrap().to_owned();
    let pm = e2e::podman::Podman::on_node(t, 0, &bin, 1420).unwrap();
    let name = "cm-suite-podman";
    let _ = pm.rm(name);
    let id = pm.run_detached(name).unwrap();
    let removed = Removed(&pm, name);
    let leased = pm.leases_of(&id).unwrap();
    assert_eq!(leased.len(), 1, "one address for {id}: {leased:?}");
    assert!(
        pm.endpoint_dir.join(format!("{id}.json")).exists(),
        "no endpoint file for {id}"
    );
    let c2 = t.pods.iter().find(|p| p.cluster == "c2").unwrap();
    let c2_ip = c2.ip.unwrap().to_string();
    let out = pm
        .exec(name, &["ping", "-c", "3", "-W", "2", &c2_ip])
        .unwrap();
    assert!(out.contains("3 packets received"), "{out}");
    // The global service: every answer is a backend's name, and c2's
    // backends answer too (affinity none).
    let mut answers = Vec::new();
    for _ in 0..12 {
        let a = pm
            .exec(name, &["sh", "-c", "nc -w 3 10.96.0.10 80 </dev/null"])
            .unwrap();
        answers.push(a.trim().to_owned());
    }
    assert!(
        answers
            .iter()
            .all(|a| t.pods.iter().any(|p| &p.answer == a)),
        "{answers:?}"
    );
    assert!(answers.iter().any(|a| a.starts_with("c2/")), "{answers:?}");
    drop(removed);
    assert!(
        pm.leases_of(&id).unwrap().is_empty(),
        "lease kept after podman rm"
    );
    assert!(
        !pm.endpoint_dir.join(format!("{id}.json")).exists(),
        "endpoint file kept after podman rm"
    );
}

/// `podman rm -f` on drop (also when the test panics).
struct Removed<'a>(&'a e2e::podman::Podman, &'a str);

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.rm(self.1) {
            eprintln!("podman rm {}: {e:#}", self.1);
        }
    }
}

fn new_pods_are_encrypted_from_the_first_packet(t: &mut Topology) {
    let node = &t.nodes[0];
    let ns = node.netns.clone();
    assert_eq!(node.cluster, "c1");
    // A default route of the pods' family to another node: whatever reached
    // the host stack would leave over the underlay.
    let remote_pod = t.pods.iter().find(|p| p.cluster == "c2").unwrap();
    let remote = remote_pod.addrs()[0];
    if remote.is_ipv4() {
        mesh::in_ns(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
        mesh::in_ns(
            &ns,
            &[
                "ip",
                "route",
                "replace",
                "default",
                "via",
                "192.168.2.1",
                "dev",
                "ul0",
            ],
        )
        .unwrap();
    } else {
        let gw = mesh::underlay6(2, 1).to_string();
        mesh::in_ns(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]).unwrap();
        mesh::in_ns(
            &ns,
            &[
                "ip", "-6", "route", "replace", "default", "via", &gw, "dev", "ul0",
            ],
        )
        .unwrap();
    }
    let caps = mesh::start_captures(t).unwrap();
    let bin = binary("node-agent").parent().unwrap().to_owned();
    let mut answered = Vec::new();
    for k in 1..=3 {
        let t0 = Instant::now();
        let pod = mesh::add_pod(t, &bin, 0, &format!("f{k}"), &format!("fresh-{k}"), 1420).unwrap();
        let added = t0.elapsed();
        let s = Ping::start(&pod.netns, &remote.to_string(), 20).finish();
        eprintln!(
            "new pod {} ({:?}): CNI ADD took {added:?}; then ping every 10 ms to {remote}: {}/{} answered",
            pod.name,
            pod.addrs(),
            s.received,
            s.sent
        );
        answered.push((pod.name, s.received, s.sent));
    }
    // The wire first: a leak is the worse failure.
    let rows = mesh::finish_captures(t, caps).unwrap();
    for r in &rows {
        eprintln!("wire {}: {}", r.from, r.detail);
    }
    let failed = failed_rows(&rows);
    assert!(
        failed.is_empty(),
        "pod packets outside WireGuard: {failed:#?}"
    );
    for (name, received, sent) in answered {
        assert_eq!(received, sent, "pod {name} lost pings right after CNI ADD");
    }
}

/// SIGUSR1 on an agent with WireGuard: a key rotation, the agent alive.
fn usr1_rotates_the_key_and_keeps_the_agent(t: &Topology) {
    // The rotation's first step is in the audit trail at once (it
    // completes after the overlap, 120 s by default).
    let audit = t.nodes[0].agent.audit_log.clone();
    let started = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .matches("\"key_rotation_started\"")
            .count()
    };
    let before = started();
    let pid = mesh::signal_role(t, "agent c1/node-1", libc::SIGUSR1).unwrap();
    mesh::wait_for("a rotation after SIGUSR1", Duration::from_secs(30), || {
        started() > before || !mesh::alive(pid)
    })
    .unwrap();
    assert!(
        mesh::alive(pid),
        "SIGUSR1 killed the agent (rotation configured)"
    );
    eprintln!(
        "SIGUSR1 with WireGuard: key rotations started {before} -> {}; agent alive",
        started()
    );
}

/// Continuous ping from a pod (10 ms), in the background.
struct Ping(std::process::Child);

impl Ping {
    fn start(from: &str, to: &str, count: u32) -> Self {
        Ping(
            Command::new("ip")
                .args(["netns", "exec", from, "ping", "-i", "0.01", "-c"])
                .arg(count.to_string())
                .arg(to)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }
    fn finish(self) -> clustermesh_testkit::ping::PingSummary {
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        clustermesh_testkit::ping::summary(&text).unwrap_or_else(|| panic!("ping output: {text}"))
    }
}

fn reachable(from: &str, to: &str) -> bool {
    mesh::in_ns(from, &["ping", "-c", "1", "-W", "1", to]).is_ok()
}

fn drops(t: &Topology, node: usize) -> u64 {
    let dp = node_agent::datapath::Datapath::load(&t.nodes[node].agent.bpf_pin_dir).unwrap();
    dp.counter(Direction::Egress, Verdict::DropNoTunnelEndpoint)
        .unwrap()
        .packets
}

fn cli(t: &Topology, args: &[&str]) -> String {
    let bin = binary("clustermesh");
    let out = t.cli(bin.parent().unwrap()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "clustermesh {args:?}: {text}");
    text
}

/// What docs/demo.md promises: from topology.json alone (as untyped JSON,
/// as a script would read it), every pod's namespace and address, and
/// every cluster's etcd with its admin credentials.
fn agent_signals_and_status_port(t: &mut Topology, c1_pod: &str, c2_ip: &str) {
    let role = "agent c1/node-1";
    let status = t.nodes[0].agent.status.clone();
    let pid = mesh::signal_role(t, role, libc::SIGUSR1).unwrap();
    // The agent answers after the signal was delivered and handled.
    std::thread::sleep(Duration::from_millis(300));
    assert!(mesh::alive(pid), "SIGUSR1 killed the agent");
    assert_eq!(mesh::http_get(&status, "/healthz").unwrap(), "ok\n");

    let idle: Vec<std::net::TcpStream> = (0..50)
        .map(|_| std::net::TcpStream::connect(&status).unwrap())
        .collect();
    let t0 = Instant::now();
    assert_eq!(mesh::http_get(&status, "/healthz").unwrap(), "ok\n");
    let took = t0.elapsed();
    eprintln!("agent /healthz with 50 idle connections open: {took:?}");
    // One connection at a time would wait for the idle ones' 5 s header
    // timeout; this is the structural property, not a speed figure.
    assert!(took < clustermesh_http::HEADER_READ_TIMEOUT, "{took:?}");
    drop(idle);

    // A second agent for the same node (same flags, same pin directory)
    // refuses to start, naming the reason, and leaves the first alone.
    let p = t.processes.iter().find(|p| p.role == role).unwrap();
    let out = std::process::Command::new(&p.cmd[0])
        .args(&p.cmd[1..])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second agent started: {err}");
    assert!(
        err.contains("another node-agent runs with --bpf-pin-dir"),
        "{err}"
    );
    assert!(mesh::alive(pid), "the second agent hurt the first");
    assert_eq!(mesh::http_get(&status, "/healthz").unwrap(), "ok\n");

    let ping = Ping::start(c1_pod, c2_ip, 200);
    std::thread::sleep(Duration::from_millis(300));
    mesh::signal_role(t, role, libc::SIGTERM).unwrap();
    let t0 = Instant::now();
    mesh::wait_for(
        "the agent to exit on SIGTERM",
        Duration::from_secs(10),
        || !mesh::alive(pid),
    )
    .unwrap();
    eprintln!("agent exited {:?} after SIGTERM", t0.elapsed());
    let log = std::fs::read_to_string(&t.nodes[0].agent.log).unwrap_or_default();
    assert!(
        log.contains("SIGTERM: shutting down"),
        "no shutdown line in the log"
    );
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
    let s = ping.finish();
    eprintln!(
        "ping while the agent stopped: {}/{} received",
        s.received, s.sent
    );
    assert_eq!(s.received, s.sent, "the datapath stopped with the agent");
    mesh::restart(t, role).unwrap();
    cli(t, &["status", "--wait", "--timeout", "60s"]);
}

fn topology_file_serves_an_outside_script(t: &Topology) {
    let text = std::fs::read_to_string(Topology::path(&t.state_dir)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pods = v["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 2);
    for p in pods {
        let (ns, ip) = (p["netns"].as_str().unwrap(), p["ip"].as_str().unwrap());
        let addrs = mesh::in_ns(ns, &["ip", "-4", "-o", "addr", "show", "eth0"]).unwrap();
        assert!(addrs.contains(&format!("{ip}/")), "{ns}: {addrs}");
    }
    for c in v["clusters"].as_array().unwrap() {
        let e = &c["etcd"];
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", e["endpoints"][0].as_str().unwrap()])
            .args(["--cacert", e["ca_file"].as_str().unwrap()])
            .args(["--cert", e["admin_cert_file"].as_str().unwrap()])
            .args(["--key", e["admin_key_file"].as_str().unwrap()])
            .args(["get", "--prefix", "--keys-only", "clustermesh/state/nodes/"])
            .output()
            .unwrap();
        let keys = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && keys.contains("/node-1"),
            "etcd of {}: {keys} {}",
            c["name"],
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn runtime_disconnect_etcd_restart_agent_restart_and_apiserver_stop() {
    require_root!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let o = options("smr", "geneve", Encryption::None, 1);
    let mut up = Up(mesh::up(&o, false).unwrap());
    let failed = failed_rows(&mesh::check(&up.0).unwrap());
    assert!(failed.is_empty(), "{failed:#?}");
    topology_file_serves_an_outside_script(&up.0);
    let (c1_pod, c2_ip) = (
        up.0.pods[0].netns.clone(),
        up.0.pods[1].ip.unwrap().to_string(),
    );
    assert_eq!(up.0.pods[1].cluster, "c2");

    // 1. Disconnected at runtime: c2's pods are unreachable from c1, and the
    //    drops are counted (tombstoned range), not silent.
    cli(
        &up.0,
        &["disconnect", "--cluster", "c1", "--destination", "c2"],
    );
    mesh::wait_for("c2 unreachable from c1", Duration::from_secs(30), || {
        !reachable(&c1_pod, &c2_ip)
    })
    .unwrap();
    let before = drops(&up.0, 0);
    assert!(!reachable(&c1_pod, &c2_ip));
    let after = drops(&up.0, 0);
    eprintln!("disconnected: drop_no_tunnel_endpoint on c1 {before} -> {after}");
    assert!(after > before, "drops counted after disconnect");

    // ... and connected again.
    cli(
        &up.0,
        &[
            "connect",
            "--cluster",
            "c1",
            "--destination",
            "c2",
            "--wait",
            "--timeout",
            "60s",
        ],
    );
    mesh::wait_for("c2 reachable again", Duration::from_secs(30), || {
        reachable(&c1_pod, &c2_ip)
    })
    .unwrap();

    // 2. c2's etcd killed and restarted while traffic flows: the agents
    //    keep the last state (no loss), and converge after the restart.
    let ping = Ping::start(&c1_pod, &c2_ip, 300);
    std::thread::sleep(Duration::from_millis(500));
    mesh::kill(&up.0, "etcd c2").unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    mesh::restart(&mut up.0, "etcd c2").unwrap();
    let s = ping.finish();
    eprintln!(
        "etcd c2 killed and restarted under ping: {}/{} received",
        s.received, s.sent
    );
    assert_eq!(
        s.received, s.sent,
        "cross-cluster traffic while c2's etcd was down"
    );
    cli(&up.0, &["status", "--wait", "--timeout", "60s"]);

    // 3. c1's agent killed -9 and restarted under continuous ping.
    let ping = Ping::start(&c1_pod, &c2_ip, 400);
    std::thread::sleep(Duration::from_millis(500));
    mesh::kill(&up.0, "agent c1/node-1").unwrap();
    mesh::restart(&mut up.0, "agent c1/node-1").unwrap();
    let s = ping.finish();
    eprintln!(
        "agent c1/node-1 killed -9 and restarted under a 10 ms ping: {}/{} received",
        s.received, s.sent
    );
    assert_eq!(s.received, s.sent, "loss across the agent restart");
    cli(&up.0, &["status", "--wait", "--timeout", "60s"]);

    // 3b. Signals and the status port: SIGUSR1 without a WireGuard device
    //     does not kill the agent; 50 idle connections on the status port
    //     do not hold up /healthz; SIGTERM stops the agent cleanly while
    //     the datapath keeps forwarding.
    agent_signals_and_status_port(&mut up.0, &c1_pod, &c2_ip);

    // 4. c2's apiserver stopped: its exported state expires with its lease
    //    (4 s here), c1 finds no cluster config there (c2 unavailable) and
    //    after its stale TTL (5 s here) withdraws c2's state; traffic to
    //    c2's pods is then dropped with a counted reason.
    let before = drops(&up.0, 0);
    mesh::kill(&up.0, "apiserver c2").unwrap();
    let t0 = Instant::now();
    mesh::wait_for(
        "c2's pods unreachable after its apiserver stopped",
        Duration::from_secs(60),
        || !reachable(&c1_pod, &c2_ip),
    )
    .unwrap();
    let after = drops(&up.0, 0);
    eprintln!(
        "apiserver c2 stopped: c2's pods unreachable after {:?}; drop_no_tunnel_endpoint {before} -> {after}",
        t0.elapsed()
    );
    assert!(after > before, "drops counted after c2's entries expired");
}

/// The pid of `clustermesh-wg <iface>`, if it runs.
fn device_pid(iface: &str) -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("clustermesh-wg {iface} ")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
}

/// Zombie children of `pid`.
fn zombies_of(pid: u32) -> Vec<String> {
    let out = Command::new("ps")
        .args(["-o", "pid=,stat=,comm=", "--ppid", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|st| st.starts_with('Z'))
        })
        .map(str::to_owned)
        .collect()
}

/// The WireGuard device killed (-9) under an agent: the agent notices,
/// reaps it (no zombie), starts a new one with the node's key and rebuilds
/// what depends on it; encrypted traffic flows again, the agent keeps its
/// pid, and the audit trail says what happened.
fn a_dead_wireguard_device_is_restarted(t: &Topology) {
    let n = &t.nodes[0];
    let iface = n.wireguard_iface.clone().unwrap();
    let agent = t
        .processes
        .iter()
        .find(|p| p.role == "agent c1/node-1")
        .unwrap()
        .pid;
    let old = device_pid(&iface).expect("the device runs");
    let c1_pod = t
        .pods
        .iter()
        .find(|p| p.node == n.name && p.cluster == "c1")
        .unwrap();
    let c2_ip = t
        .pods
        .iter()
        .find(|p| p.cluster == "c2")
        .unwrap()
        .ip
        .unwrap()
        .to_string();
    assert!(reachable(&c1_pod.netns, &c2_ip));
    let t0 = Instant::now();
    mesh::signal(old, libc::SIGKILL);
    mesh::wait_for("a new device", Duration::from_secs(30), || {
        device_pid(&iface).is_some_and(|p| p != old)
    })
    .unwrap();
    mesh::wait_for("encrypted traffic again", Duration::from_secs(30), || {
        reachable(&c1_pod.netns, &c2_ip)
    })
    .unwrap();
    eprintln!(
        "device {iface} killed: new device and traffic back after {:?}",
        t0.elapsed()
    );
    assert!(mesh::alive(agent), "the agent died with its device");
    assert!(
        zombies_of(agent).is_empty(),
        "zombies: {:?}",
        zombies_of(agent)
    );
    let audit = std::fs::read_to_string(&n.agent.audit_log).unwrap();
    assert!(
        audit.contains("\"device_down\""),
        "no device_down in the audit trail"
    );
}

/// Runs the CLI with `args` on the mesh; its standard output (it must
/// succeed).
fn cli_ok(t: &Topology, args: &[&std::ffi::OsStr]) -> String {
    let bin = binary("node-agent").parent().unwrap().to_owned();
    let out = t.cli(&bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "clustermesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `clustermesh observe` (one JSON object per line) as flows.
fn observe(t: &Topology, args: &[&str]) -> Vec<clustermesh_api::proto::Flow> {
    let all: Vec<&std::ffi::OsStr> = std::iter::once("observe")
        .chain(args.iter().copied())
        .chain(["-o", "json"])
        .map(std::ffi::OsStr::new)
        .collect();
    cli_ok(t, &all)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The cluster id in an identity's bits 16-23.
fn identity_cluster(id: u32) -> u32 {
    (id >> 16) & 0xff
}

const DENY_9099: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-9099, namespace: default}
spec:
  endpointSelector: {}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEntities: [all]
    toPorts: [{ports: [{port: \"9099\", protocol: TCP}]}]
";

/// Flows in the strict WireGuard mesh, as `clustermesh observe` shows
/// them from every node of both clusters: a connection c1 -> c2 denied by
/// a c2 policy (TCP 9099), an allowed one (TCP 8080) and a request through
/// the global service, each with clusters, namespace, pods, identities,
/// verdict, reason, encryption and the frontend; the filters
/// `--to-cluster c2 --verdict dropped`; `--follow` within a second.
fn flows_are_observed_across_clusters(t: &Topology) {
    let a = t.pods.iter().find(|p| p.cluster == "c1").unwrap();
    let b = t.pods.iter().find(|p| p.cluster == "c2").unwrap();
    let (a_ip, b_ip) = (a.ip.unwrap(), b.ip.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("deny.yaml");
    std::fs::write(&f, DENY_9099).unwrap();
    let os = |v: &'static str| std::ffi::OsStr::new(v);
    cli_ok(
        t,
        &[
            os("policy"),
            os("apply"),
            os("--cluster"),
            os("c2"),
            os("-f"),
            f.as_os_str(),
        ],
    );
    // Denied: retried until the policy is enforced on c2's node.
    let denied_at = Instant::now();
    let denied = loop {
        let _ = mesh::in_netns(&a.netns, || {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from((b_ip, 9099)),
                Duration::from_millis(300),
            )
        });
        let got = observe(
            t,
            &[
                "--to-cluster",
                "c2",
                "--verdict",
                "dropped",
                "--port",
                "9099",
            ],
        );
        if let Some(d) = got.into_iter().find(|f| f.destination_port == 9099) {
            break d;
        }
        assert!(
            denied_at.elapsed() < Duration::from_secs(20),
            "no dropped flow to c2:9099 within 20 s"
        );
    };
    // Allowed, and through the global service.
    let to_b = std::net::SocketAddr::from((b_ip, mesh::POD_PORT));
    let fe = std::net::SocketAddr::from((mesh::SERVICE_FRONTEND, mesh::SERVICE_PORT));
    mesh::in_netns(&a.netns, || {
        mesh::ask(to_b, Duration::from_secs(2)).unwrap();
        for _ in 0..4 {
            mesh::ask(fe, Duration::from_secs(2)).unwrap();
        }
    })
    .unwrap();
    let flows = observe(t, &["--last", "50"]);
    assert!(flows.len() <= 50, "{} flows for --last 50", flows.len());
    let side = |f: &clustermesh_api::proto::Flow| {
        (
            f.source.clone().unwrap_or_default(),
            f.destination.clone().unwrap_or_default(),
        )
    };
    // The denied connection, seen where it was dropped (c2's node).
    let (src, dst) = side(&denied);
    assert_eq!(
        (denied.verdict.as_str(), denied.drop_reason.as_str()),
        ("dropped", "policy_denied")
    );
    assert_eq!(
        (denied.cluster.as_str(), denied.direction.as_str()),
        ("c2", "ingress")
    );
    assert_eq!(
        (
            src.cluster.as_str(),
            src.pod.as_str(),
            src.namespace.as_str()
        ),
        ("c1", a.name.as_str(), "default")
    );
    assert_eq!(
        (
            dst.cluster.as_str(),
            dst.pod.as_str(),
            dst.namespace.as_str()
        ),
        ("c2", b.name.as_str(), "default")
    );
    assert_eq!(
        (
            identity_cluster(src.identity),
            identity_cluster(dst.identity)
        ),
        (1, 2)
    );
    assert!(src.labels.iter().any(|l| l == "k8s:app=web"), "{src:?}");
    assert!(
        denied.encrypted && denied.tunnel == "wireguard",
        "{denied:?}"
    );
    // The allowed connection: leaving c1 encrypted, arriving in c2.
    let allowed: Vec<_> = flows
        .iter()
        .filter(|f| {
            let (s, d) = side(f);
            s.ip == a_ip.to_string() && d.ip == b_ip.to_string() && f.destination_port == 8080
        })
        .collect();
    for (cluster, direction, disposition) in
        [("c1", "egress", "encrypted"), ("c2", "ingress", "local")]
    {
        let f = allowed
            .iter()
            .find(|f| f.cluster == cluster && f.direction == direction)
            .unwrap_or_else(|| {
                panic!("no {direction} flow of {a_ip} -> {b_ip}:8080 on {cluster}: {allowed:#?}")
            });
        let (s, d) = side(f);
        assert_eq!(f.verdict, "forwarded", "{f:?}");
        assert_eq!(f.disposition, disposition, "{f:?}");
        assert!(f.encrypted, "{f:?}");
        assert_eq!(
            (s.pod.as_str(), d.pod.as_str()),
            (a.name.as_str(), b.name.as_str())
        );
        assert_eq!(
            (identity_cluster(s.identity), identity_cluster(d.identity)),
            (1, 2)
        );
    }
    // Through the global service: the frontend, translated to a backend pod.
    let via = flows
        .iter()
        .find(|f| {
            f.service
                .as_ref()
                .is_some_and(|s| s.frontend == mesh::SERVICE_FRONTEND.to_string())
        })
        .unwrap_or_else(|| panic!("no flow through the service frontend in {flows:#?}"));
    let svc = via.service.clone().unwrap();
    assert_eq!(
        (svc.port, svc.name.is_empty()),
        (u32::from(mesh::SERVICE_PORT), false),
        "{svc:?}"
    );
    let (s, d) = side(via);
    assert_eq!(s.pod, a.name);
    assert_eq!(
        (d.kind.as_str(), via.destination_port),
        ("pod", u32::from(mesh::POD_PORT)),
        "{via:?}"
    );
    // Filters: only dropped flows into c2.
    let only = observe(
        t,
        &["--to-cluster", "c2", "--verdict", "dropped", "--last", "50"],
    );
    assert!(!only.is_empty());
    for f in &only {
        assert_eq!(
            (f.verdict.as_str(), side(f).1.cluster.as_str()),
            ("dropped", "c2"),
            "{f:?}"
        );
    }
    follow_shows_a_new_flow_within_a_second(t, a, to_b);
    exported_for_the_siem(t, &denied);
    let args = [
        "policy",
        "delete",
        "--cluster",
        "c2",
        "-n",
        "default",
        "deny-9099",
    ];
    cli_ok(t, &args.map(std::ffi::OsStr::new));
}

/// `observe --follow`: a connection made after it started shows within 1 s.
fn follow_shows_a_new_flow_within_a_second(t: &Topology, a: &mesh::Pod, to: std::net::SocketAddr) {
    use std::io::BufRead as _;
    let bin = binary("node-agent").parent().unwrap().to_owned();
    let mut child = t
        .cli(&bin)
        .args([
            "observe",
            "--follow",
            "--last",
            "1",
            "-o",
            "json",
            "--from-ip",
        ])
        .arg(a.ip.unwrap().to_string())
        .args(["--port", &to.port().to_string(), "--cluster", "c1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send((Instant::now(), l)).is_err() {
                return;
            }
        }
    });
    // The history line (--last 1) first: the streams are open.
    let first = rx.recv_timeout(Duration::from_secs(10));
    let _ = first;
    let sent = Instant::now();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    mesh::in_netns(&a.netns, || mesh::ask(to, Duration::from_secs(2)).unwrap()).unwrap();
    let got = loop {
        let (at, l) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("observe --follow showed no new flow within 5 s");
        let f: clustermesh_api::proto::Flow = serde_json::from_str(&l).unwrap();
        if f.time_unix_nanos >= started {
            break at.duration_since(sent);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "observe --follow: a new flow shown {} ms after the request",
        got.as_millis()
    );
    assert!(got < Duration::from_secs(1), "shown after {got:?}");
}

/// The node's SIEM export (`--flow-export-path`): every line one OCSF
/// record; the denied flow is a Network Activity (4001) record, Denied,
/// with its reason and both pods.
fn exported_for_the_siem(t: &Topology, denied: &clustermesh_api::proto::Flow) {
    let node = t
        .nodes
        .iter()
        .find(|n| n.cluster == denied.cluster && n.name == denied.node)
        .unwrap();
    let path = node.agent.clusters_dir.with_file_name("flows.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["class_uid"] == 4001 || l["class_uid"] == 5019),
        "{path:?}"
    );
    let hit = lines
        .iter()
        .find(|l| {
            l["class_uid"] == 4001 && l["dst_endpoint"]["port"] == 9099 && l["action_id"] == 2
        })
        .unwrap_or_else(|| panic!("no denied 4001 record for port 9099 in {}", path.display()));
    let text = hit.to_string();
    for want in [
        "policy_denied",
        denied.source.as_ref().unwrap().pod.as_str(),
        "c1",
        "c2",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
}
