//! The whole product on two nodes of two clusters, for end-to-end tests:
//! each cluster a real etcd with a real clustermesh-apiserver (in process);
//! each node a namespace with a VXLAN device, an underlay veth to the other
//! node, a pod attached by the real CNI plugin binary (as a container
//! runtime calls it) and the real node-agent binary.
//!
//! A test harness: it panics (with what failed) instead of returning errors.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use clustermesh_api::{ClusterId, EncryptionPolicy};
use clustermesh_testkit::{
    etcd::EtcdServer,
    netns::{NetNs, PinDir, sweep_stale, veth_pair},
};
use node_agent::datapath::{Datapath, attached_programs};

/// target/<profile>/deps/<this test> -> target/<profile>/<name>, else the
/// debug build's (`cargo bench` builds no other package's binaries).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap();
    let bin = profile.join(name);
    if bin.exists() {
        return bin;
    }
    let debug = profile.parent().unwrap().join("debug").join(name);
    assert!(
        debug.exists(),
        "{} is missing: build the workspace (cargo build --workspace)",
        bin.display()
    );
    debug
}

/// A free loopback port below the ephemeral range ([`crate::mesh::free_port`]).
pub fn free_port() -> u16 {
    crate::mesh::free_port().unwrap()
}

/// One node of cluster `id`: its namespace, its pod's namespace, its pins,
/// the CNI endpoint directory and the agent's configuration.
pub struct Node {
    pub id: u8,
    pub ns: NetNs,
    pub pod: NetNs,
    pub pins: PinDir,
    pub dir: tempfile::TempDir,
    pub pod_ip: Ipv4Addr,
    /// IPv6 nodes ([`Node::new_v6`]): the pod's address (it has no IPv4).
    pub pod_ip6: Option<Ipv6Addr>,
    /// An IPv6-only node: underlay fd00:192:0:2::<id>, pod range
    /// fd00:10:<id>::/64.
    pub v6: bool,
    pub status: String,
}

impl Node {
    pub fn new(id: u8) -> Self {
        let ns = NetNs::new(&format!("n{id}")).unwrap();
        let pod = NetNs::new(&format!("p{id}")).unwrap();
        Node {
            id,
            ns,
            pod,
            pins: PinDir::new(&format!("n{id}")).unwrap(),
            dir: tempfile::tempdir().unwrap(),
            pod_ip: Ipv4Addr::UNSPECIFIED,
            pod_ip6: None,
            v6: false,
            status: format!("127.0.0.1:{}", free_port()),
        }
    }

    /// An IPv6-only node (underlay and pod).
    pub fn new_v6(id: u8) -> Self {
        Node {
            v6: true,
            ..Node::new(id)
        }
    }

    /// The pod's address to reach it at: IPv6 on an IPv6 node.
    pub fn pod_addr(&self) -> IpAddr {
        match self.pod_ip6 {
            Some(a) if self.v6 => IpAddr::V6(a),
            _ => IpAddr::V4(self.pod_ip),
        }
    }

    /// The pod range of this node.
    pub fn pod_cidr(&self) -> String {
        if self.v6 {
            format!("fd00:10:{}::/64", self.id)
        } else {
            format!("10.{}.0.0/24", self.id)
        }
    }

    pub fn endpoints(&self) -> PathBuf {
        self.dir.path().join("endpoints")
    }

    /// CNI ADD through the plugin binary, run in the node's namespace.
    /// `mtu`: the pod's MTU (1450 leaves room for VXLAN/Geneve's 50 bytes,
    /// 1420 for WireGuard's 80 over an IPv4 or IPv6 underlay).
    pub fn cni_add(&mut self, mtu: u32) {
        match self.add_pod(&self.pod, "web", mtu) {
            IpAddr::V4(a) => self.pod_ip = a,
            IpAddr::V6(a) => self.pod_ip6 = Some(a),
        }
    }

    /// Attaches the pod namespace `pod` (app label and pod name `app`)
    /// through CNI ADD; returns its address.
    ///
    /// `readyTimeoutSeconds` 0: these tests attach pods before the agent
    /// runs (the plugin sets the veth up itself); the fail-closed start is
    /// the mesh harness's (pods after the agent) and `cni/tests/spec.rs`'s.
    pub fn add_pod(&self, pod: &NetNs, app: &str, mtu: u32) -> IpAddr {
        std::fs::create_dir_all(self.endpoints()).unwrap();
        let range = if self.v6 { "podCIDRv6" } else { "podCIDR" };
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"clustermesh","type":"clustermesh-cni","{range}":"{}","mtu":{mtu},"readyTimeoutSeconds":0,"endpointDir":"{}","args":{{"cni":{{"labels":[{{"key":"k8s:app","value":"{app}"}}]}}}}}}"#,
            self.pod_cidr(),
            self.endpoints().display()
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .arg(binary("clustermesh-cni"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("{app}-{}", self.id))
            .env("CNI_NETNS", format!("/var/run/netns/{}", pod.name()))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={app}"),
            )
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
        addr.split('/').next().unwrap().parse().unwrap()
    }

    pub fn underlay_ip(&self) -> String {
        if self.v6 {
            format!("fd00:192:0:2::{}", self.id)
        } else {
            format!("192.0.2.{}", self.id)
        }
    }

    /// Starts the agent binary; returns it once it has attached the three
    /// programs, with how each got attached (New or Adopted).
    pub fn start_agent(&self, etcd: &str, apiserver: &str) -> (Child, Vec<String>) {
        self.start_agent_with(etcd, apiserver, "geneve", &[], 3)
    }

    /// [`Node::start_agent`] with a tunnel mode and extra arguments;
    /// returns once `expect` programs are attached.
    pub fn start_agent_with(
        &self,
        etcd: &str,
        apiserver: &str,
        tunnel: &str,
        extra: &[&str],
        expect: usize,
    ) -> (Child, Vec<String>) {
        let mut child = Command::new(binary("node-agent"))
            .args(["--netns", self.ns.name(), "--endpoint-dir"])
            .arg(self.endpoints())
            .args([
                "--overlay-iface",
                "cm_vxlan",
                "--underlay-iface",
                "ul0",
                "--tunnel",
                tunnel,
                "--bpf-pin-dir",
            ])
            .arg(self.pins.path())
            .args(["--apiserver", &format!("http://{apiserver}")])
            .args(["--node-name", &format!("node-{}", self.id)])
            .args(["--underlay-ip", &self.underlay_ip()])
            .args(["--pod-cidr", &self.pod_cidr()])
            .args(["--cluster-name", &format!("c{}", self.id)])
            .args(["--local-etcd-endpoints", etcd])
            .arg("--clusters-dir")
            .arg(self.dir.path().join("clusters"))
            .args(["--status-listen", &self.status, "--report-every", "1"])
            .arg("--audit-log")
            .arg(self.audit_log())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Both streams are read on threads, so a silent agent fails the
        // test instead of hanging it; they keep draining afterwards, into
        // `agent.log` in the node's directory (tests read it back).
        let (tx, rx) = mpsc::channel::<String>();
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
        while how.len() < expect {
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
                    panic!("agent did not attach its {expect} programs ({e}): {how:?}");
                }
            }
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())
            .unwrap();
        writeln!(log, "{}", how.join("\n")).unwrap();
        std::thread::spawn(move || {
            while let Ok(l) = rx.recv() {
                let _ = writeln!(log, "{l}");
            }
        });
        (child, how)
    }

    /// The agent's encryption audit trail.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// Everything the node's agents printed after attaching.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let mut s = TcpStream::connect(&self.status).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /status HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        serde_json::from_str(body.split_once("\r\n\r\n")?.1).ok()
    }

    pub fn datapath(&self) -> Datapath {
        Datapath::load(self.pins.path()).unwrap()
    }

    pub fn programs_on(&self, iface: &str) -> Vec<String> {
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

pub fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn write_cluster_file(dir: &Path, name: &str, etcd: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), format!("endpoints:\n  - {etcd}\n")).unwrap();
}

/// An IPv6-only underlay veth `ul0` between `a` and `b`.
fn underlay6(a: &Node, b: &Node) {
    let addr = |n: &Node| format!("{}/64", n.underlay_ip());
    clustermesh_testkit::netns::veth_pair6(&a.ns, "ul0", &addr(a), &b.ns, "ul0", &addr(b)).unwrap();
}

/// Two clusters (c1, c2) with one node each (A, B), pods attached, the
/// clusters connected (each node's clusters directory names the other).
/// Field order matters on drop: apiservers before their etcds.
pub struct Mesh {
    pub a: Node,
    pub b: Node,
    pub apis: Vec<clustermesh_apiserver::Running>,
    pub etcds: Vec<EtcdServer>,
    pub rt: tokio::runtime::Runtime,
}

impl Mesh {
    pub fn new(encryption: EncryptionPolicy) -> Self {
        Self::build(encryption, false)
    }

    /// [`Mesh::new`] with IPv6-only nodes: IPv6 underlay, IPv6 pods.
    pub fn new_v6(encryption: EncryptionPolicy) -> Self {
        Self::build(encryption, true)
    }

    fn build(encryption: EncryptionPolicy, v6: bool) -> Self {
        sweep_stale();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut a, mut b) = if v6 {
            (Node::new_v6(1), Node::new_v6(2))
        } else {
            (Node::new(1), Node::new(2))
        };
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
        if v6 {
            underlay6(&a, &b);
        } else {
            veth_pair(&a.ns, "ul0", "192.0.2.1/24", &b.ns, "ul0", "192.0.2.2/24").unwrap();
        }
        // Pod MTU: the underlay's 1500 minus what the path adds.
        let mtu = if encryption.mode == clustermesh_api::EncryptionMode::Wireguard {
            1500 - 80
        } else if v6 {
            1500 - 70
        } else {
            1500 - 50
        };
        a.cni_add(mtu);
        b.cni_add(mtu);
        let etcds = vec![EtcdServer::start().unwrap(), EtcdServer::start().unwrap()];
        let apis: Vec<_> = etcds
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut cfg = clustermesh_apiserver::Config::new(
                    format!("c{}", i + 1).parse().unwrap(),
                    ClusterId::new(i as u64 + 1).unwrap(),
                    vec![e.endpoint()],
                );
                // Plaintext API: this test is about the datapath; TLS and authorization
                // are clustermesh-apiserver/tests/authz.rs's and the mesh harness's.
                cfg.insecure_plaintext = true;
                cfg.heartbeat_interval = Duration::from_secs(1);
                cfg.encryption = encryption;
                rt.block_on(clustermesh_apiserver::start(cfg)).unwrap()
            })
            .collect();
        write_cluster_file(&a.dir.path().join("clusters"), "c2", &etcds[1].endpoint());
        write_cluster_file(&b.dir.path().join("clusters"), "c1", &etcds[0].endpoint());
        Mesh {
            a,
            b,
            apis,
            etcds,
            rt,
        }
    }

    /// The etcd endpoint and apiserver address of node `n`'s cluster.
    pub fn cluster_of(&self, n: &Node) -> (String, String) {
        let i = usize::from(n.id - 1);
        (self.etcds[i].endpoint(), self.apis[i].grpc_addr.to_string())
    }

    /// The policy the encryption tests run under: WireGuard, all traffic,
    /// strict.
    pub fn strict_wireguard() -> EncryptionPolicy {
        EncryptionPolicy {
            mode: clustermesh_api::EncryptionMode::Wireguard,
            scope: clustermesh_api::EncryptionScope::All,
            strict: true,
            ..Default::default()
        }
    }

    /// Starts node `n`'s agent (Geneve) with its WireGuard device `wg`;
    /// returns once its four programs are attached.
    pub fn start_encrypted_agent(&self, n: &Node, wg: &WgDevice) -> (Child, Vec<String>) {
        let (etcd, api) = self.cluster_of(n);
        let args = wg.args();
        let extra: Vec<&str> = args.iter().map(String::as_str).collect();
        n.start_agent_with(&etcd, &api, "geneve", &extra, 4)
    }

    /// Declares (or replaces) a service in cluster `i` (0: c1) through its
    /// apiserver, as `clustermesh service create` does.
    pub fn upsert_service(&self, i: usize, svc: clustermesh_api::proto::Service) {
        use clustermesh_api::proto::{
            UpsertServiceRequest, cluster_mesh_client::ClusterMeshClient,
        };
        let addr = format!("http://{}", self.apis[i].grpc_addr);
        self.rt.block_on(async {
            let mut g = ClusterMeshClient::connect(addr).await.unwrap();
            g.upsert_service(UpsertServiceRequest { service: Some(svc) })
                .await
                .unwrap();
        });
    }

    /// Whether node `n`'s agent reports every cluster synced.
    pub fn synced(n: &Node) -> bool {
        n.status()
            .is_some_and(|s| s["all_synced"] == serde_json::Value::Bool(true))
    }
}

/// A WireGuard device the agent started for node `n` (a detached process of
/// its own, which outlives agents by design): killed, and its control
/// socket removed, on drop.
pub struct WgDevice {
    pub iface: String,
    pub key_file: PathBuf,
    pub log: PathBuf,
}

impl WgDevice {
    pub fn for_node(n: &Node) -> Self {
        WgDevice {
            iface: format!("cmwg{}n{}", std::process::id() % 100_000, n.id),
            key_file: n.dir.path().join("wg.key"),
            log: n.dir.path().join("wg.log"),
        }
    }

    /// The agent arguments that enable it.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--wireguard-iface".into(),
            self.iface.clone(),
            "--wireguard-key-file".into(),
            self.key_file.display().to_string(),
            "--wireguard-log".into(),
            self.log.display().to_string(),
            // Short rotation overlap, so tests see a rotation end.
            "--wireguard-overlap".into(),
            "2".into(),
        ]
    }
}

impl Drop for WgDevice {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-f", &format!("clustermesh-wg {} ", self.iface)])
            .status();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.iface));
    }
}

/// A spawned process (an agent) killed and reaped on drop, so a failing
/// test leaves none behind.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
