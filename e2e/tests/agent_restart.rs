//! Privileged: the whole product on two nodes of two clusters, and node A's
//! agent killed with SIGKILL and started again while A's pod pings B's pod
//! every 10 ms.
//!
//! Each cluster is a real etcd with a real clustermesh-apiserver; each node
//! a namespace with its pod attached by the real CNI plugin binary (as a
//! container runtime calls it) and the real node-agent binary, which picks
//! the pod up from the endpoint directory, registers it (the apiserver
//! allocates its identity), watches both clusters and programs its pinned
//! maps; pods talk over eBPF Geneve.
//!
//! Proves: zero lost pings across the kill and restart (the TCX links and
//! maps are pinned, so traffic does not depend on the agent process); the
//! restarted agent adopts every pinned link (atomic program swap, one
//! program per hook); and once it has resynced, the maps equal what they
//! were, i.e. the desired state, entry for entry.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use clustermesh_api::ClusterId;
use clustermesh_testkit::{
    etcd::EtcdServer,
    netns::{NetNs, PinDir, sweep_stale, veth_pair},
};
use e2e::require_root;
use node_agent::datapath::{Datapath, attached_programs};
use tunnel_common::{Direction, Verdict};

/// target/<profile>/deps/<this test> -> target/<profile>/<name>
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One node of cluster `id`: its namespace, its pod's namespace, its pins,
/// the CNI endpoint directory and the agent's configuration.
struct Node {
    id: u8,
    ns: NetNs,
    pod: NetNs,
    pins: PinDir,
    dir: tempfile::TempDir,
    pod_ip: Ipv4Addr,
    status: String,
}

impl Node {
    fn new(id: u8) -> Self {
        let ns = NetNs::new(&format!("n{id}")).unwrap();
        let pod = NetNs::new(&format!("p{id}")).unwrap();
        Node {
            id,
            ns,
            pod,
            pins: PinDir::new(&format!("n{id}")).unwrap(),
            dir: tempfile::tempdir().unwrap(),
            pod_ip: Ipv4Addr::UNSPECIFIED,
            status: format!("127.0.0.1:{}", free_port()),
        }
    }

    fn endpoints(&self) -> PathBuf {
        self.dir.path().join("endpoints")
    }

    /// CNI ADD through the plugin binary, run in the node's namespace.
    fn cni_add(&mut self) {
        std::fs::create_dir_all(self.endpoints()).unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"clustermesh","type":"clustermesh-cni","podCIDR":"10.{}.0.0/24","mtu":1450,"endpointDir":"{}","args":{{"cni":{{"labels":[{{"key":"k8s:app","value":"web"}}]}}}}}}"#,
            self.id,
            self.endpoints().display()
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .arg(binary("clustermesh-cni"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("web-{}", self.id))
            .env("CNI_NETNS", format!("/var/run/netns/{}", self.pod.name()))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "CNI ADD: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let addr = v["ips"][0]["address"].as_str().unwrap();
        self.pod_ip = addr.split('/').next().unwrap().parse().unwrap();
    }

    fn underlay_ip(&self) -> String {
        format!("192.0.2.{}", self.id)
    }

    /// Starts the agent binary; returns it once it has attached the three
    /// programs, with how each got attached (New or Adopted).
    fn start_agent(&self, etcd: &str, apiserver: &str) -> (Child, Vec<String>) {
        let mut child = Command::new(binary("node-agent"))
            .args(["--netns", self.ns.name(), "--endpoint-dir"])
            .arg(self.endpoints())
            .args([
                "--overlay-iface",
                "cm_vxlan",
                "--underlay-iface",
                "ul0",
                "--tunnel",
                "geneve",
                "--bpf-pin-dir",
            ])
            .arg(self.pins.path())
            .args(["--apiserver", &format!("http://{apiserver}")])
            .args(["--node-name", &format!("node-{}", self.id)])
            .args(["--underlay-ip", &self.underlay_ip()])
            .args(["--pod-cidr", &format!("10.{}.0.0/24", self.id)])
            .args(["--cluster-name", &format!("c{}", self.id)])
            .args(["--local-etcd-endpoints", etcd])
            .arg("--clusters-dir")
            .arg(self.dir.path().join("clusters"))
            .args(["--status-listen", &self.status, "--report-every", "1"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Both streams are read on threads, so a silent agent fails the
        // test instead of hanging it; they keep draining afterwards.
        let (tx, rx) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        let err = BufReader::new(child.stderr.take().unwrap());
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            out.lines()
                .map_while(Result::ok)
                .for_each(|l| drop(tx.send(l)))
        });
        std::thread::spawn(move || {
            err.lines()
                .map_while(Result::ok)
                .for_each(|l| drop(tx2.send(l)))
        });
        let mut how = Vec::new();
        while how.len() < 3 {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) if l.starts_with("attached") => how.push(l.trim().to_owned()),
                Ok(l) if l.contains("pod attached") => {
                    let adopted = if l.contains("Adopted") {
                        "(Adopted)"
                    } else {
                        "(New)"
                    };
                    how.push(format!("attached from_endpoint {adopted}"));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    panic!("agent did not attach its three programs ({e}): {how:?}");
                }
            }
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
        (child, how)
    }

    fn status(&self) -> Option<serde_json::Value> {
        let mut s = TcpStream::connect(&self.status).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /status HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        serde_json::from_str(body.split_once("\r\n\r\n")?.1).ok()
    }

    fn datapath(&self) -> Datapath {
        Datapath::load(self.pins.path()).unwrap()
    }

    fn programs_on(&self, iface: &str) -> Vec<String> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let _in = self.ns.enter().unwrap();
                attached_programs(iface).unwrap()
            })
            .join()
            .unwrap()
        })
    }
}

fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_cluster_file(dir: &Path, name: &str, etcd: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), format!("endpoints:\n  - {etcd}\n")).unwrap();
}

#[test]
fn agent_killed_and_restarted_under_ping_loses_nothing_and_maps_stay_desired() {
    require_root!();
    sweep_stale();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut a = Node::new(1);
    let mut b = Node::new(2);
    for n in [&a, &b] {
        n.ns.exec(
            "ip",
            &[
                "link", "add", "cm_vxlan", "type", "vxlan", "external", "dstport", "8472",
            ],
        )
        .unwrap();
        n.ns.exec("ip", &["link", "set", "cm_vxlan", "up"]).unwrap();
    }
    veth_pair(&a.ns, "ul0", "192.0.2.1/24", &b.ns, "ul0", "192.0.2.2/24").unwrap();
    a.cni_add();
    b.cni_add();

    // Two clusters: etcd + apiserver each.
    let etcds = [EtcdServer::start().unwrap(), EtcdServer::start().unwrap()];
    let apis: Vec<_> = etcds
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut cfg = clustermesh_apiserver::Config::new(
                format!("c{}", i + 1).parse().unwrap(),
                ClusterId::new(i as u64 + 1).unwrap(),
                vec![e.endpoint()],
            );
            cfg.heartbeat_interval = Duration::from_secs(1);
            rt.block_on(clustermesh_apiserver::start(cfg)).unwrap()
        })
        .collect();
    write_cluster_file(&a.dir.path().join("clusters"), "c2", &etcds[1].endpoint());
    write_cluster_file(&b.dir.path().join("clusters"), "c1", &etcds[0].endpoint());
    let (mut agent_b, _) = b.start_agent(&etcds[1].endpoint(), &apis[1].grpc_addr.to_string());
    let (mut agent_a, how) = a.start_agent(&etcds[0].endpoint(), &apis[0].grpc_addr.to_string());
    assert!(how.iter().all(|l| l.ends_with("(New)")), "{how:?}");

    // Meshed: A's pod reaches B's pod.
    let synced = |n: &Node| {
        n.status()
            .is_some_and(|s| s["all_synced"] == serde_json::Value::Bool(true))
    };
    until("both agents synced", Duration::from_secs(30), || {
        synced(&a) && synced(&b)
    });
    until("A's pod reaches B's pod", Duration::from_secs(30), || {
        a.pod
            .exec("ping", &["-c", "1", "-W", "1", &b.pod_ip.to_string()])
            .is_ok()
    });
    let mut dpa = a.datapath();
    // Converged: both pods (with identities) in A's ip-cache.
    let has_pod = |entries: &[(Ipv4Addr, u8, tunnel_common::IpCacheValue)], pod: Ipv4Addr| {
        entries
            .iter()
            .any(|(ip, len, v)| *ip == pod && *len == 32 && v.identity != 0)
    };
    until(
        "A's ip-cache holds both pods",
        Duration::from_secs(30),
        || {
            let e = dpa.ipcache_entries().unwrap();
            has_pod(&e, a.pod_ip) && has_pod(&e, b.pod_ip)
        },
    );
    let desired = (
        dpa.ipcache_entries().unwrap(),
        dpa.endpoint_entries().unwrap(),
    );
    assert_eq!(desired.1.len(), 1, "A's pod in A's endpoint map");

    const PINGS: u32 = 400; // 4 s at 10 ms
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            a.pod.name(),
            "ping",
            "-c",
            &PINGS.to_string(),
        ])
        .args(["-i", "0.01", "-W", "1", &b.pod_ip.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tunnelled = |dp: &Datapath| {
        dp.counter(Direction::Egress, Verdict::Tunnel)
            .unwrap()
            .packets
    };
    let wait_more = |dp: &Datapath, n: u64, what: &str| {
        let start = tunnelled(dp);
        until(what, Duration::from_secs(10), || tunnelled(dp) >= start + n);
    };
    wait_more(&dpa, 50, "traffic before the kill");

    // SIGKILL: no cleanup of any kind.
    agent_a.kill().unwrap();
    agent_a.wait().unwrap();
    wait_more(&dpa, 50, "traffic while the agent is dead");

    let (mut agent_a, how) = a.start_agent(&etcds[0].endpoint(), &apis[0].grpc_addr.to_string());
    assert!(
        how.iter().all(|l| l.ends_with("(Adopted)")),
        "restart must adopt the pinned links: {how:?}"
    );
    until("A resynced", Duration::from_secs(30), || synced(&a));
    wait_more(&dpa, 50, "traffic after the restart");

    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    eprintln!("agent kill -9 + restart under 10 ms ping: {summary}");
    assert!(
        summary.starts_with(&format!("{PINGS} packets transmitted, {PINGS} received")),
        "lost pings across the agent restart: {summary}"
    );
    // Exactly one program per hook: adoption swapped, it did not add.
    let pod_iface = std::fs::read_dir(a.endpoints())
        .unwrap()
        .filter_map(Result::ok)
        .find_map(|e| {
            let f: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            f["host_iface"].as_str().map(str::to_owned)
        })
        .unwrap();
    assert_eq!(a.programs_on(&pod_iface), vec!["from_endpoint".to_owned()]);
    assert_eq!(a.programs_on("cm_vxlan"), vec!["from_overlay".to_owned()]);
    assert_eq!(a.programs_on("ul0"), vec!["from_underlay".to_owned()]);
    // The maps equal the desired state, entry for entry.
    let after = (
        dpa.ipcache_entries().unwrap(),
        dpa.endpoint_entries().unwrap(),
    );
    assert_eq!(
        after, desired,
        "maps after the restart differ from the desired state"
    );

    for c in [&mut agent_a, &mut agent_b] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    drop(apis);
}
