//! Export benchmark against a real etcd (started here, loopback only).
//!
//! Measures, in one run:
//! - baseline: raw etcd puts of the same number of keys with values of the
//!   same size, 100 per transaction (what etcd itself sustains here);
//! - ingest: endpoints added through the gRPC API (validation, identity
//!   allocation, durable internal write, export), one `AddEndpoint` call
//!   at a time, then (after removing them all) in `AddEndpoints` batches of
//!   1000: until the last call returned (acknowledged: durable in the
//!   internal store) and until every endpoint is in the exported schema;
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
    let reqs = requests(n, nodes, per_node);
    for r in &reqs {
        g.add_endpoint(r.clone()).await.unwrap();
    }
    let ingest = t.elapsed();
    let (batch_ack, batch_exported) = batch_ingest(&mut g, &mut kv, &reqs).await;
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
    for (what, d) in [("acknowledged", batch_ack), ("exported", batch_exported)] {
        println!(
            "  ingest through AddEndpoints (1000), {what:<12} {:>9.0} records/s  ({:.2?})  ratio to baseline {:.2}",
            rate(d),
            d,
            rate(d) / rate(baseline)
        );
    }
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
    for (case, d) in [
        (
            "ingest through AddEndpoints batches of 1000, acknowledged",
            batch_ack,
        ),
        (
            "ingest through AddEndpoints batches of 1000, exported",
            batch_exported,
        ),
    ] {
        record(&fig(case, "records/s", rate(d), Better::Higher).baseline(base, rate(baseline)));
    }
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

/// The `n` endpoints of the run, `per_node` on each node in turn.
fn requests(n: usize, nodes: usize, per_node: usize) -> Vec<proto::AddEndpointRequest> {
    (0..nodes)
        .flat_map(|node| (0..per_node).map(move |j| (node, j)))
        .take(n)
        .enumerate()
        .map(|(i, (node, j))| {
            let ip = format!("10.{}.{}.{}", 100 + node / 250, node % 250, j + 1);
            let mut labels = HashMap::new();
            labels.insert("k8s:app".to_owned(), format!("app{}", i % 50));
            proto::AddEndpointRequest {
                node: format!("node-{node}"),
                name: format!("app-{}", ip.replace('.', "-")),
                ip,
                namespace: "default".into(),
                labels,
            }
        })
        .collect()
}

/// Number of exported endpoint keys.
async fn exported_count(kv: &mut Client) -> i64 {
    kv.get(
        "clustermesh/state/ip/",
        Some(GetOptions::new().with_prefix().with_count_only()),
    )
    .await
    .unwrap()
    .count()
}

/// Waits until etcd holds `want` exported endpoints.
async fn wait_exported(kv: &mut Client, want: i64) {
    while exported_count(kv).await != want {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Removes every endpoint (in batches), then adds them again in
/// `AddEndpoints` batches of 1000: the time until the last call returned,
/// and until all of them were exported.
async fn batch_ingest(
    g: &mut ClusterMeshClient<tonic::transport::Channel>,
    kv: &mut Client,
    reqs: &[proto::AddEndpointRequest],
) -> (Duration, Duration) {
    let n = reqs.len() as i64;
    wait_exported(kv, n).await;
    for chunk in reqs.chunks(1000) {
        let ips = chunk.iter().map(|r| r.ip.clone()).collect();
        let r = g
            .remove_endpoints(proto::RemoveEndpointsRequest { ips })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results.iter().all(|r| r.code == 0), "{r:?}");
    }
    wait_exported(kv, 0).await;
    let t = Instant::now();
    for chunk in reqs.chunks(1000) {
        let r = g
            .add_endpoints(proto::AddEndpointsRequest {
                endpoints: chunk.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results.iter().all(|r| r.code == 0), "{r:?}");
    }
    let ack = t.elapsed();
    wait_exported(kv, n).await;
    (ack, t.elapsed())
}
