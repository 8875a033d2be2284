//! The CLI's integration harness: real etcd servers (testkit), real
//! apiservers and node agents (control plane only: in-memory reconcilers,
//! no eBPF, no root) started in-process, and the real `clustermesh` binary
//! run as a child process with a timeout (killed on drop).
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Output,
    sync::{Arc, Mutex},
    time::Duration,
};

use clustermesh_api::status::EncryptionStatus;
use clustermesh_api::{
    ClusterId,
    proto::{self, cluster_mesh_client::ClusterMeshClient},
};
use clustermesh_apiserver::{Config, Running};
use clustermesh_testkit::etcd::EtcdServer;
use node_agent::{
    audit::Audit,
    clusters::{Agent, ClustersConfig, Reconcilers, config::ClusterFile},
    reconcilers::datapath_config::DatapathConfigMap,
};
use tokio_util::sync::CancellationToken;

/// The `clustermesh` binary of this build (cargo xtask test builds every
/// binary before the tests).
pub fn cli_bin() -> std::path::PathBuf {
    e2e::product::binary("clustermesh")
}

/// One node agent, control plane only.
pub struct Node {
    pub name: String,
    pub clusters_dir: PathBuf,
    pub status: String,
    cancel: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub struct Cluster {
    pub name: String,
    pub id: u64,
    pub etcd: EtcdServer,
    pub api: Option<Running>,
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api.as_ref().unwrap().grpc_addr)
    }

    /// The `--node` arguments of `enable` for this cluster's nodes.
    pub fn node_args(&self) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|n| {
                [
                    "--node".to_owned(),
                    format!(
                        "{},clusters-dir={},status={}",
                        n.name,
                        n.clusters_dir.display(),
                        n.status
                    ),
                ]
            })
            .collect()
    }

    pub async fn grpc(&self) -> ClusterMeshClient<tonic::transport::Channel> {
        ClusterMeshClient::connect(self.api_url()).await.unwrap()
    }

    /// Registers a node with a pod CIDR (as its agent would in standalone
    /// mode).
    pub async fn register(&self, node: &str, cidr: &str, ip: &str) {
        self.grpc()
            .await
            .register_node(proto::RegisterNodeRequest {
                node: Some(proto::Node {
                    name: node.into(),
                    underlay_ips: vec![ip.into()],
                    pod_cidrs: vec![cidr.into()],
                    boot_id: "b".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }

    pub async fn endpoint(&self, node: &str, ip: &str) {
        let mut labels = HashMap::new();
        labels.insert("k8s:app".to_owned(), "web".to_owned());
        self.grpc()
            .await
            .add_endpoint(proto::AddEndpointRequest {
                node: node.into(),
                ip: ip.into(),
                namespace: "default".into(),
                name: format!("web-{}", ip.replace('.', "-")),
                labels,
            })
            .await
            .unwrap();
    }

    /// Files in a node's clusters directory (cluster names only).
    pub fn remote_files(&self, node: usize) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.nodes[node].clusters_dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_file())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|f| !f.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

pub struct ClusterSpec<'a> {
    pub name: &'a str,
    pub id: u64,
    pub nodes: usize,
    pub encryption: clustermesh_api::EncryptionPolicy,
}

impl<'a> ClusterSpec<'a> {
    pub fn new(name: &'a str, id: u64, nodes: usize) -> Self {
        Self {
            name,
            id,
            nodes,
            encryption: Default::default(),
        }
    }
}

/// A real etcd, an apiserver and `nodes` agents whose directories live
/// under `root`.
pub async fn cluster(root: &Path, spec: ClusterSpec<'_>) -> Cluster {
    let etcd = EtcdServer::start().unwrap();
    let mut cfg = Config::new(
        spec.name.parse().unwrap(),
        ClusterId::new(spec.id).unwrap(),
        vec![etcd.endpoint()],
    );
    cfg.lease_ttl = Duration::from_secs(30);
    cfg.heartbeat_interval = Duration::from_secs(1);
    cfg.node_ttl = Duration::from_secs(600);
    // Plaintext API: this test is about the CLI; TLS and authorization
    // are clustermesh-apiserver/tests/authz.rs's and the mesh harness's.
    cfg.insecure_plaintext = true;
    cfg.encryption = spec.encryption;
    let api = clustermesh_apiserver::start(cfg).await.unwrap();
    let mut nodes = Vec::new();
    for i in 0..spec.nodes {
        let local = ClusterFile {
            endpoints: vec![etcd.endpoint()],
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            pod_cidrs: Vec::new(),
        };
        nodes.push(agent(root, spec.name, &format!("n{}", i + 1), local).await);
    }
    Cluster {
        name: spec.name.into(),
        id: spec.id,
        etcd,
        api: Some(api),
        nodes,
    }
}

/// A node agent's control plane and its `/status` endpoint, as node-agent
/// runs them (without a datapath).
pub async fn agent(root: &Path, cluster: &str, node: &str, local: ClusterFile) -> Node {
    let clusters_dir = root.join(format!("{cluster}-{node}")).join("clusters");
    std::fs::create_dir_all(&clusters_dir).unwrap();
    let cancel = CancellationToken::new();
    let cfg = ClustersConfig {
        local_cluster: cluster.parse().unwrap(),
        local,
        self_node: node.parse().ok(),
        clusters_dir: clusters_dir.clone(),
        stale_ttl: Duration::from_secs(300),
        sync_timeout: Duration::from_secs(60),
        poll_interval: Duration::from_millis(100),
        strict_ranges: Vec::new(),
    };
    // The encryption section follows the cluster's policy through the
    // datapath-config reconciler, as in the agent (no datapath here).
    let enc = Arc::new(Mutex::new(EncryptionStatus::default()));
    let audit = Audit::open(&clusters_dir.with_file_name("audit.jsonl"), ("node", node));
    let mut reconcilers = Reconcilers::in_memory();
    reconcilers.policy = Box::new(DatapathConfigMap::without_datapath(enc.clone(), audit));
    let a = Agent::new(cfg, reconcilers, cancel.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(node_agent::status::serve(
        listener,
        node_agent::status::Sources {
            control_plane: Some(a.status()),
            encryption: enc,
            policy: Default::default(),
            flows: None,
        },
        cancel.clone(),
    ));
    tokio::spawn(async move {
        a.run().await;
    });
    Node {
        name: node.into(),
        clusters_dir,
        status: addr,
        cancel,
    }
}

/// Runs the CLI with `CLUSTERMESH_CONFIG_DIR=dir` (60 s at most; killed on
/// timeout or drop).
pub async fn cli(dir: &Path, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(cli_bin())
        .args(args)
        .env("CLUSTERMESH_CONFIG_DIR", dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(o) => o.unwrap(),
        Err(_) => panic!("clustermesh {args:?} did not finish within 60 s"),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(args: &[&str], o: &Output) -> String {
    assert!(
        o.status.success(),
        "clustermesh {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Runs and asserts success.
pub async fn run_ok(dir: &Path, args: &[&str]) -> String {
    ok(args, &cli(dir, args).await)
}

/// Runs, asserts exit code 1 and returns stderr.
pub async fn run_fail(dir: &Path, args: &[&str]) -> String {
    let o = cli(dir, args).await;
    assert_eq!(
        o.status.code(),
        Some(1),
        "clustermesh {args:?} should fail with 1:\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    let e = stderr(&o);
    assert!(
        e.trim().lines().count() == 1 && e.starts_with("error: "),
        "one error sentence expected, got: {e}"
    );
    e
}

pub async fn run_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = run_ok(dir, &a).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{a:?}: not JSON ({e}): {out}"))
}

/// `enable` for a running cluster.
pub async fn enable(dir: &Path, c: &Cluster) -> String {
    let id = c.id.to_string();
    let api = c.api_url();
    let etcd = c.etcd.endpoint();
    let mut args = vec![
        "enable",
        "--cluster",
        &c.name,
        "--id",
        &id,
        "--apiserver",
        &api,
        "--etcd-endpoints",
        &etcd,
    ];
    let nodes = c.node_args();
    args.extend(nodes.iter().map(String::as_str));
    run_ok(dir, &args).await
}

/// Polls (bounded) until `status -o json` satisfies `cond`.
pub async fn until_status(
    dir: &Path,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let o = cli(dir, &["status", "-o", "json"]).await;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if cond(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last status: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The per-node reports of a cluster in `status -o json`.
pub fn nodes_of<'a>(status: &'a serde_json::Value, cluster: &str) -> Vec<&'a serde_json::Value> {
    status["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {status:#}"))["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .collect()
}
