//! The batch endpoint calls (`AddEndpoints`, `RemoveEndpoints`, issue 20)
//! against a real etcd: each endpoint of a batch is validated, authorized
//! and answered on its own, tried as an attacker would (a node hiding
//! another node's endpoint in its own batch), and what is accepted is
//! exported.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use clustermesh_api::{Entry, proto};
use clustermesh_testkit::etcd::EtcdServer;
use common::{pki::Pki, *};
use tonic::Code;

fn ep(node: &str, ip: &str, app: &str) -> proto::AddEndpointRequest {
    let mut labels = HashMap::new();
    labels.insert("k8s:app".to_owned(), app.to_owned());
    proto::AddEndpointRequest {
        node: node.into(),
        ip: ip.into(),
        namespace: "default".into(),
        name: format!("{app}-{}", ip.replace('.', "-")),
        labels,
    }
}

/// The exported endpoints: IP -> node.
fn endpoints(e: &std::collections::BTreeMap<String, Entry>) -> HashMap<String, String> {
    e.values()
        .filter_map(|v| match v {
            Entry::Endpoint(r) => Some((
                r.ip.to_string(),
                r.node.as_ref().map(ToString::to_string).unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

fn codes(r: &proto::EndpointsResponse) -> Vec<(String, Code)> {
    r.results
        .iter()
        .map(|r| (r.ip.clone(), Code::from(r.code)))
        .collect()
}

#[tokio::test]
async fn a_batch_answers_each_endpoint_and_a_node_acts_only_for_itself() {
    let etcd = EtcdServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let mut cfg = config(&etcd, "c1", 1);
    let audit = pki.secure(&mut cfg);
    let api = start(cfg).await;
    let addr = api.grpc_addr.to_string();
    let mut n1 = pki.client(&addr, Some("node-1")).await.unwrap();
    let mut n2 = pki.client(&addr, Some("node-2")).await.unwrap();
    register(
        &mut n1,
        node("node-1", "10.1.1.0/24", "192.168.1.1", "boot-1"),
    )
    .await
    .unwrap();
    register(
        &mut n2,
        node("node-2", "10.1.2.0/24", "192.168.1.2", "boot-2"),
    )
    .await
    .unwrap();
    add_endpoint(&mut n2, "node-2", "10.1.2.5", "db")
        .await
        .unwrap();

    // The attack: node-1 hides endpoints of node-2 (a new one, and one that
    // takes over node-2's pod) among its own.
    let r = n1
        .add_endpoints(proto::AddEndpointsRequest {
            endpoints: vec![
                ep("node-1", "10.1.1.2", "web"),
                ep("node-2", "10.1.2.6", "evil"),
                ep("node-2", "10.1.2.5", "evil"),
                ep("node-1", "10.1.1.999", "web"),
                ep("node-1", "10.1.2.7", "web"),
                ep("node-1", "10.1.1.2", "web"),
                ep("node-1", "10.1.1.3", "api"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        codes(&r),
        vec![
            ("10.1.1.2".into(), Code::Ok),
            ("10.1.2.6".into(), Code::PermissionDenied),
            ("10.1.2.5".into(), Code::PermissionDenied),
            ("10.1.1.999".into(), Code::InvalidArgument),
            ("10.1.2.7".into(), Code::InvalidArgument),
            ("10.1.1.2".into(), Code::InvalidArgument),
            ("10.1.1.3".into(), Code::Ok),
        ],
        "{r:?}"
    );
    assert!(r.results[1].message.contains("node:node-1"), "{r:?}");
    assert!(r.results[3].message.contains("ip"), "{r:?}");
    assert!(r.results[4].message.contains("outside"), "{r:?}");
    assert!(r.results[5].message.contains("twice"), "{r:?}");
    assert_ne!(r.results[0].identity, 0);
    assert_ne!(r.results[0].identity, r.results[6].identity);

    let mut kv = etcd_client(&etcd).await;
    let e = wait_exported(&mut kv, "node-1's two endpoints", |e| {
        endpoints(e).len() == 3
    })
    .await;
    let want: HashMap<String, String> = [
        ("10.1.1.2", "node-1"),
        ("10.1.1.3", "node-1"),
        ("10.1.2.5", "node-2"),
    ]
    .into_iter()
    .map(|(a, b)| (a.into(), b.into()))
    .collect();
    assert_eq!(endpoints(&e), want);

    // Removing: node-2's endpoint is refused, its own removed, an unknown
    // IP is done already, a bad one is named.
    let r = n1
        .remove_endpoints(proto::RemoveEndpointsRequest {
            ips: vec![
                "10.1.2.5".into(),
                "10.1.1.2".into(),
                "10.1.1.77".into(),
                "nonsense".into(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        codes(&r),
        vec![
            ("10.1.2.5".into(), Code::PermissionDenied),
            ("10.1.1.2".into(), Code::Ok),
            ("10.1.1.77".into(), Code::Ok),
            ("nonsense".into(), Code::InvalidArgument),
        ],
        "{r:?}"
    );
    let e = wait_exported(&mut kv, "10.1.1.2 removed", |e| {
        !endpoints(e).contains_key("10.1.1.2")
    })
    .await;
    assert_eq!(
        endpoints(&e).get("10.1.2.5").map(String::as_str),
        Some("node-2")
    );

    // The refused endpoints are audited with the caller that tried.
    let log = std::fs::read_to_string(&audit).unwrap();
    let denied: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| {
            v["result"] == "permission_denied" && v["caller"] == "node:node-1"
        })
        .collect();
    assert!(
        denied
            .iter()
            .any(|v| v["action"] == "AddEndpoints" && v["ip"] == "10.1.2.5"),
        "{log}"
    );
    assert!(
        denied
            .iter()
            .any(|v| v["action"] == "RemoveEndpoint" && v["ip"] == "10.1.2.5"),
        "{log}"
    );
}

#[tokio::test]
async fn a_full_batch_is_stored_and_exported_and_a_larger_one_refused() {
    let etcd = EtcdServer::start().unwrap();
    let api = start(config(&etcd, "c1", 1)).await;
    let mut g = grpc(&api).await;
    let mut reqs = Vec::new();
    for n in 0..4 {
        register(
            &mut g,
            node(
                &format!("node-{n}"),
                &format!("10.1.{n}.0/24"),
                &format!("192.168.1.{}", n + 1),
                "b",
            ),
        )
        .await
        .unwrap();
        for i in 1..=250 {
            reqs.push(ep(
                &format!("node-{n}"),
                &format!("10.1.{n}.{i}"),
                &format!("app{}", i % 7),
            ));
        }
    }
    assert_eq!(reqs.len(), 1000);

    // One more than the limit: refused whole, nothing stored.
    let mut over = reqs.clone();
    over.push(ep("node-0", "10.1.0.251", "app0"));
    let e = g
        .add_endpoints(proto::AddEndpointsRequest { endpoints: over })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most 1000"), "{}", e.message());

    let r = g
        .add_endpoints(proto::AddEndpointsRequest {
            endpoints: reqs.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results.iter().all(|r| r.code == 0), "{r:?}");
    // One identity per label set.
    let ids: std::collections::BTreeSet<u32> = r.results.iter().map(|r| r.identity).collect();
    assert_eq!(ids.len(), 7, "{ids:?}");
    let mut kv = etcd_client(&etcd).await;
    let e = wait_exported(&mut kv, "1000 endpoints", |e| endpoints(e).len() == 1000).await;
    assert!(!endpoints(&e).contains_key("10.1.0.251"));

    let ips: Vec<String> = reqs.iter().map(|r| r.ip.clone()).collect();
    let r = g
        .remove_endpoints(proto::RemoveEndpointsRequest { ips })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results.iter().all(|r| r.code == 0), "{r:?}");
    wait_exported(&mut kv, "every endpoint removed", |e| {
        endpoints(e).is_empty()
    })
    .await;
}
