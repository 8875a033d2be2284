//! Export benchmark against a real etcd (started here, loopback only).
//!
//! Measures, in one run:
//! - baseline: raw etcd puts of the same number of keys with values of the
//!   same size, 100 per transaction (what etcd itself sustains here);
//! - ingest: endpoints added through the gRPC API (validation, identity
//!   allocation, durable internal write, export);
//! - cold start: time for a fresh apiserver to export everything from its
//!   stored state until all sync canaries are written (full sync);
//! - size: bytes of exported keys+values per endpoint, and etcd's database
//!   growth per endpoint during the cold-start export.
//!
//! Usage: export [--endpoints N] [--nodes M]
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use clustermesh_api::{ClusterId, proto, proto::cluster_mesh_client::ClusterMeshClient};
use clustermesh_apiserver::Config;
use clustermesh_testkit::{
    etcd::EtcdServer,
    report::{Better, Figure, record},
};
use etcd_client::{Client, GetOptions, Txn, TxnOp};

#[tokio::main]
async fn main() {
    let n = clustermesh_testkit::bench_arg("--endpoints", 10_000) as usize;
    let nodes = (clustermesh_testkit::bench_arg("--nodes", 100) as usize).clamp(1, 250);
    let per_node = n.div_ceil(nodes);
    assert!(
        per_node <= 250,
        "at most 250 endpoints per node (/24 pod CIDRs)"
    );
    let etcd = EtcdServer::start().unwrap();
    let mut kv = Client::connect([etcd.endpoint()], None).await.unwrap();

    // Baseline: raw puts, same count and value size as an endpoint record.
    let sample = br#"{"ip":"10.100.200.250","cluster":"bench","identity":65792,"hostIp":"192.168.100.250","node":"node-100","namespace":"default","name":"app-10-100-200-250"}"#;
    let t = Instant::now();
    let mut ops = Vec::new();
    for i in 0..n {
        ops.push(TxnOp::put(
            format!(
                "baseline/state/ip/v1/bench/10.{}.{}.{}",
                i / 65536,
                (i / 256) % 256,
                i % 256
            ),
            sample.to_vec(),
            None,
        ));
        if ops.len() == 100 {
            kv.txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .unwrap();
        }
    }
    if !ops.is_empty() {
        kv.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    let baseline = t.elapsed();
    kv.delete(
        "baseline/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();

    let mut cfg = Config::new(
        "bench".parse().unwrap(),
        ClusterId::new(1).unwrap(),
        vec![etcd.endpoint()],
    );
    // Plaintext API: this test is about export throughput; TLS and authorization
    // are clustermesh-apiserver/tests/authz.rs's and the mesh harness's.
    cfg.insecure_plaintext = true;
    cfg.lease_ttl = Duration::from_secs(30);
    cfg.node_ttl = Duration::from_secs(600);
    let a = clustermesh_apiserver::start(cfg.clone()).await.unwrap();
    let mut g = ClusterMeshClient::connect(format!("http://{}", a.grpc_addr))
        .await
        .unwrap();
    let t = Instant::now();
    for node in 0..nodes {
        g.register_node(proto::RegisterNodeRequest {
            node: Some(proto::Node {
                name: format!("node-{node}"),
                underlay_ips: vec![format!("192.168.{}.{}", node / 250, node % 250 + 1)],
                pod_cidrs: vec![format!("10.{}.{}.0/24", 100 + node / 250, node % 250)],
                boot_id: "bench".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    }
    let mut added = 0;
    'outer: for node in 0..nodes {
        for j in 0..per_node {
            if added == n {
                break 'outer;
            }
            let ip = format!("10.{}.{}.{}", 100 + node / 250, node % 250, j + 1);
            let mut labels = HashMap::new();
            labels.insert("k8s:app".to_owned(), format!("app{}", added % 50));
            g.add_endpoint(proto::AddEndpointRequest {
                node: format!("node-{node}"),
                ip: ip.clone(),
                namespace: "default".into(),
                name: format!("app-{}", ip.replace('.', "-")),
                labels,
            })
            .await
            .unwrap();
            added += 1;
        }
    }
    let ingest = t.elapsed();
    a.shutdown(Duration::from_secs(5)).await;
    for l in kv.leases().await.unwrap().leases() {
        kv.lease_revoke(l.id()).await.unwrap();
    }

    let db_before = kv.status().await.unwrap().db_size();
    let t = Instant::now();
    let b = clustermesh_apiserver::start(cfg).await.unwrap();
    let cold = t.elapsed();
    assert_eq!(
        b.synced().len(),
        clustermesh_api::StateKind::ALL.len(),
        "start() returns after the full initial export (every kind synced)"
    );
    let db_after = kv.status().await.unwrap().db_size();
    let exported = kv
        .get(
            "clustermesh/state/ip/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(exported.kvs().len(), n, "every endpoint exported");
    let bytes: usize = exported
        .kvs()
        .iter()
        .map(|k| k.key().len() + k.value().len())
        .sum();
    b.shutdown(Duration::from_secs(5)).await;

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "export benchmark: {n} endpoints on {nodes} nodes, 50 identities, etcd 3.4 on loopback"
    );
    println!(
        "  baseline raw etcd puts (100/txn):   {:>9.0} records/s  ({:.2?})",
        rate(baseline),
        baseline
    );
    println!(
        "  cold-start full export (all kinds): {:>9.0} records/s  ({:.2?} to full sync)  ratio to baseline {:.2}",
        rate(cold),
        cold,
        rate(cold) / rate(baseline)
    );
    println!(
        "  ingest through gRPC AddEndpoint:    {:>9.0} records/s  ({:.2?})  ratio to baseline {:.2}",
        rate(ingest),
        ingest,
        rate(ingest) / rate(baseline)
    );
    println!(
        "  exported ip record size:            {:>9.0} bytes/record (key+value)",
        bytes as f64 / n as f64
    );
    println!(
        "  etcd db growth during export:       {:>9.0} bytes/record",
        (db_after - db_before).max(0) as f64 / n as f64
    );
    let params = serde_json::json!({"endpoints": n, "nodes": nodes, "identities": 50});
    let one = |v: f64| (v, v, v);
    let base = "raw etcd puts, 100 per txn (baseline)";
    let fig = |case: &str, unit, v, better| {
        Figure::new("export", case, unit, one(v), better).params(params.clone())
    };
    record(&fig(base, "records/s", rate(baseline), Better::Higher));
    record(
        &fig(
            "cold-start full export (all kinds)",
            "records/s",
            rate(cold),
            Better::Higher,
        )
        .baseline(base, rate(baseline)),
    );
    record(
        &fig(
            "ingest through gRPC AddEndpoint",
            "records/s",
            rate(ingest),
            Better::Higher,
        )
        .baseline(base, rate(baseline)),
    );
    record(&fig(
        "exported ip record size (key+value)",
        "bytes/record",
        bytes as f64 / n as f64,
        Better::Lower,
    ));
    record(&fig(
        "etcd db growth during export",
        "bytes/record",
        (db_after - db_before).max(0) as f64 / n as f64,
        Better::Lower,
    ));
}
