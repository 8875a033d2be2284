//! Bad input to the apiserver's gRPC API against a real etcd: every refusal
//! names what is wrong with the right status code, and nothing of a refused
//! request reaches etcd.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use clustermesh_api::proto;
use clustermesh_testkit::etcd::EtcdServer;
use common::*;
use tonic::Code;

#[tokio::test]
async fn invalid_requests_are_refused_and_write_nothing() {
    let etcd = EtcdServer::start().unwrap();
    let mut kv = etcd_client(&etcd).await;
    let mut cfg = config(&etcd, "c1", 1);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let a = start(cfg).await;
    let mut g = grpc(&a).await;
    register(&mut g, node("good", "10.1.0.0/24", "192.0.2.1", "b1"))
        .await
        .unwrap();
    add_endpoint(&mut g, "good", "10.1.0.5", "web")
        .await
        .unwrap();
    // Let the export settle, then snapshot all of etcd.
    wait_exported(&mut kv, "good state", |e| {
        e.contains_key("clustermesh/state/ip/v1/c1/10.1.0.5")
    })
    .await;
    let snapshot = |m: std::collections::BTreeMap<String, Vec<u8>>| {
        m.into_iter()
            .filter(|(k, _)| !k.starts_with("clustermesh/heartbeat/"))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let before = snapshot(list(&mut kv, "clustermesh/").await);

    let mut other_cluster = node("x", "10.9.0.0/24", "192.0.2.9", "b");
    other_cluster.cluster = "c2".into();
    let mut bad_key = node("k", "10.3.0.0/24", "192.0.2.3", "b");
    bad_key.wireguard_public_keys = vec!["not-base64!".into()];
    let cases: Vec<(&str, proto::Node, Code, &str)> = vec![
        (
            "bad CIDR",
            node("n2", "10.2.0.1/24", "192.0.2.2", "b2"),
            Code::InvalidArgument,
            "node.pod_cidrs[0]",
        ),
        (
            "not a CIDR",
            node("n2", "banana", "192.0.2.2", "b2"),
            Code::InvalidArgument,
            "node.pod_cidrs[0]",
        ),
        (
            "overlapping CIDR",
            node("n2", "10.1.0.128/25", "192.0.2.2", "b2"),
            Code::InvalidArgument,
            "overlaps pod CIDR 10.1.0.0/24 of node good",
        ),
        (
            "bad node name",
            node("Bad_Name", "10.2.0.0/24", "192.0.2.2", "b2"),
            Code::InvalidArgument,
            "node.name",
        ),
        (
            "bad underlay IP",
            node("n2", "10.2.0.0/24", "192.0.2.300", "b2"),
            Code::InvalidArgument,
            "node.underlay_ips[0]",
        ),
        (
            "empty boot id",
            node("n2", "10.2.0.0/24", "192.0.2.2", ""),
            Code::InvalidArgument,
            "node.boot_id",
        ),
        (
            "bad WireGuard key",
            bad_key,
            Code::InvalidArgument,
            "node.wireguard_public_keys[0]",
        ),
        (
            "unknown cluster",
            other_cluster,
            Code::FailedPrecondition,
            "this apiserver serves cluster c1",
        ),
        (
            "duplicate name, other boot id",
            node("good", "10.1.0.0/24", "192.0.2.1", "b-other"),
            Code::AlreadyExists,
            "still alive",
        ),
    ];
    for (what, n, code, words) in cases {
        let e = register(&mut g, n).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(
            e.message().contains(words),
            "{what}: {:?} lacks {words:?}",
            e.message()
        );
    }

    // Endpoints.
    let e = add_endpoint(&mut g, "good", "10.7.0.5", "web")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("outside node good's pod CIDRs"),
        "{}",
        e.message()
    );
    let e = add_endpoint(&mut g, "nobody", "10.1.0.6", "web")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let mut huge = std::collections::HashMap::new();
    for i in 0..65 {
        huge.insert(format!("k{i}"), "v".to_owned());
    }
    let e = g
        .add_endpoint(proto::AddEndpointRequest {
            node: "good".into(),
            ip: "10.1.0.7".into(),
            namespace: "default".into(),
            name: "p".into(),
            labels: huge,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("labels:") && e.message().contains("too many labels"),
        "{}",
        e.message()
    );

    // Services.
    let mut s = service("web", &["10.1.0.5"]);
    s.affinity = "nearest".into();
    let e = g
        .upsert_service(proto::UpsertServiceRequest { service: Some(s) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("service.affinity"), "{}", e.message());
    let mut s = service("web", &["10.1.0.5"]);
    s.ports[0].port = 70000;
    let e = g
        .upsert_service(proto::UpsertServiceRequest { service: Some(s) })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("service.ports[0].port"),
        "{}",
        e.message()
    );

    // Nothing of the refused requests reached etcd (exported or internal).
    tokio::time::sleep(Duration::from_millis(1200)).await; // two export ticks
    let after = snapshot(list(&mut kv, "clustermesh/").await);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    assert_eq!(before, after);

    // Refusals are counted in the metrics.
    let addr = a.metrics_addr.unwrap();
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    })
    .await
    .unwrap();
    assert!(
        body.contains(r#"clustermesh_apiserver_requests_total{cluster="c1",method="RegisterNode",result="invalid_argument"} 7"#),
        "{body}"
    );
    assert!(body.contains(r#"kind="ip"} 1"#), "{body}");
    // The export has run (the records are in etcd): its heartbeat time is
    // a Unix time of this run, not 0.
    let beat: f64 = body
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"clustermesh_apiserver_last_heartbeat_timestamp_seconds{cluster="c1"} "#,
            )
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no heartbeat gauge in {body}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 120.0..=now + 1.0).contains(&beat),
        "heartbeat {beat}, now {now}"
    );
    a.shutdown(Duration::from_secs(5)).await;
}
