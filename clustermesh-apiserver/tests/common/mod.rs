//! Shared helpers of the apiserver integration tests: a real etcd
//! (testkit), an apiserver started in-process, a gRPC client.
#![allow(dead_code, clippy::unwrap_used)]

pub mod pki;

use std::{collections::BTreeMap, time::Duration};

use clustermesh_api::{
    ClusterId, Key, KvKey, decode_entry,
    proto::{self, cluster_mesh_client::ClusterMeshClient},
};
use clustermesh_apiserver::{Config, Running};
use clustermesh_testkit::etcd::EtcdServer;
use etcd_client::{Client, GetOptions};
use tonic::transport::Channel;

pub fn config(etcd: &EtcdServer, name: &str, id: u64) -> Config {
    let mut c = Config::new(
        name.parse().unwrap(),
        ClusterId::new(id).unwrap(),
        vec![etcd.endpoint()],
    );
    c.lease_ttl = Duration::from_secs(3);
    c.heartbeat_interval = Duration::from_millis(500);
    c.node_ttl = Duration::from_secs(30);
    // These tests are about the export; the API's TLS and authorization
    // are tests/authz.rs's.
    c.insecure_plaintext = true;
    c
}

pub async fn start(cfg: Config) -> Running {
    clustermesh_apiserver::start(cfg).await.unwrap()
}

pub async fn grpc(r: &Running) -> ClusterMeshClient<Channel> {
    ClusterMeshClient::connect(format!("http://{}", r.grpc_addr))
        .await
        .unwrap()
}

pub async fn etcd_client(etcd: &EtcdServer) -> Client {
    Client::connect([etcd.endpoint()], None).await.unwrap()
}

/// Every key under `prefix` with its value.
pub async fn list(c: &mut Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let r = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key().to_vec()).unwrap(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

/// Exported keys of the public schema (not internal ones), each decoded.
pub async fn exported(c: &mut Client) -> BTreeMap<String, clustermesh_api::Entry> {
    list(c, "clustermesh/")
        .await
        .into_iter()
        .filter(|(k, _)| !k.starts_with("clustermesh/internal/"))
        .map(|(k, v)| {
            let (_, e) = decode_entry(k.as_bytes(), &v).unwrap_or_else(|e| panic!("{k}: {e}"));
            (k, e)
        })
        .collect()
}

pub fn node(name: &str, cidr: &str, ip: &str, boot: &str) -> proto::Node {
    proto::Node {
        name: name.into(),
        underlay_ips: vec![ip.into()],
        pod_cidrs: vec![cidr.into()],
        wireguard_public_keys: vec![],
        wireguard_port: 0,
        boot_id: boot.into(),
        cluster: String::new(),
    }
}

pub async fn register(
    g: &mut ClusterMeshClient<Channel>,
    n: proto::Node,
) -> Result<(), tonic::Status> {
    g.register_node(proto::RegisterNodeRequest { node: Some(n) })
        .await
        .map(|_| ())
}

pub async fn add_endpoint(
    g: &mut ClusterMeshClient<Channel>,
    node: &str,
    ip: &str,
    app: &str,
) -> Result<u32, tonic::Status> {
    let mut labels = std::collections::HashMap::new();
    labels.insert("k8s:app".to_owned(), app.to_owned());
    g.add_endpoint(proto::AddEndpointRequest {
        node: node.into(),
        ip: ip.into(),
        namespace: "default".into(),
        name: format!("{app}-{}", ip.replace('.', "-")),
        labels,
    })
    .await
    .map(|r| r.into_inner().identity)
}

pub fn service(name: &str, backends: &[&str]) -> proto::Service {
    proto::Service {
        namespace: "default".into(),
        name: name.into(),
        frontends: vec!["10.96.0.10".into()],
        ports: vec![proto::ServicePort {
            name: String::new(),
            protocol: "TCP".into(),
            port: 80,
            target_port: 8080,
        }],
        backends: backends
            .iter()
            .map(|ip| proto::Backend {
                ip: (*ip).into(),
                state: "ready".into(),
                node: String::new(),
            })
            .collect(),
        global: true,
        shared: true,
        affinity: "local".into(),
        cluster: String::new(),
    }
}

/// Waits (polling etcd, bounded) until `cond` holds for the exported state.
pub async fn wait_exported(
    c: &mut Client,
    what: &str,
    cond: impl Fn(&BTreeMap<String, clustermesh_api::Entry>) -> bool,
) -> BTreeMap<String, clustermesh_api::Entry> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let e = exported(c).await;
        if cond(&e) {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            e.keys()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn key(k: Key) -> String {
    k.build()
}
