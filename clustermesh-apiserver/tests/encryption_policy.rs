//! `SetEncryptionPolicy` against a real etcd: the new policy is exported in
//! the cluster config at once, survives a restart whose flags say
//! otherwise, and an invalid one is refused without changing anything.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use clustermesh_api::{Entry, proto};
use clustermesh_testkit::etcd::EtcdServer;
use common::*;
use tonic::Code;

fn strict_of(e: &std::collections::BTreeMap<String, Entry>) -> Option<bool> {
    match e.get("clustermesh/cluster-config/c1") {
        Some(Entry::ClusterConfig(c)) => Some(c.encryption.strict),
        _ => None,
    }
}

#[tokio::test]
async fn set_policy_is_exported_persisted_and_validated() {
    let etcd = EtcdServer::start().unwrap();
    let mut kv = etcd_client(&etcd).await;
    let a = start(config(&etcd, "c1", 1)).await;
    let mut g = grpc(&a).await;
    wait_exported(&mut kv, "cluster config", |e| strict_of(e) == Some(false)).await;

    // Strict without WireGuard: refused, nothing changes.
    let e = g
        .set_encryption_policy(proto::SetEncryptionPolicyRequest {
            policy: Some(proto::EncryptionPolicy {
                mode: "none".into(),
                strict: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("policy.strict"), "{}", e.message());
    assert_eq!(strict_of(&exported(&mut kv).await), Some(false));

    let now = g
        .set_encryption_policy(proto::SetEncryptionPolicyRequest {
            policy: Some(proto::EncryptionPolicy {
                mode: "wireguard".into(),
                scope: "all".into(),
                strict: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(now.strict);
    wait_exported(&mut kv, "strict exported", |e| strict_of(e) == Some(true)).await;
    let info = g
        .get_cluster_info(proto::GetClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.encryption.unwrap().strict);

    // A restart with the default flags (encryption none) keeps it.
    a.shutdown(Duration::from_secs(5)).await;
    let a = start(config(&etcd, "c1", 1)).await;
    let mut g = grpc(&a).await;
    let info = g
        .get_cluster_info(proto::GetClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let p = info.encryption.unwrap();
    assert!(p.strict && p.mode == "wireguard", "{p:?}");
    assert_eq!(strict_of(&exported(&mut kv).await), Some(true));
    a.shutdown(Duration::from_secs(5)).await;
}
