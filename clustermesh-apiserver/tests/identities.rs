//! Identities through the API on a real etcd: namespaced (equal labels in
//! two namespaces are two identities; a namespace label an endpoint claims
//! is replaced by its own namespace) and garbage-collected once no endpoint
//! has used them for the grace period (an identity in use is kept; the
//! labels get an identity again when an endpoint comes back).
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use clustermesh_api::{Entry, proto};
use clustermesh_testkit::etcd::EtcdServer;
use common::*;

async fn add(
    g: &mut proto::cluster_mesh_client::ClusterMeshClient<tonic::transport::Channel>,
    ip: &str,
    namespace: &str,
    labels: &[(&str, &str)],
) -> u32 {
    let labels: HashMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    g.add_endpoint(proto::AddEndpointRequest {
        node: "n1".into(),
        ip: ip.into(),
        namespace: namespace.into(),
        name: format!("pod-{}", ip.replace('.', "-")),
        labels,
    })
    .await
    .unwrap()
    .into_inner()
    .identity
}

/// The exported identities: id -> labels.
async fn identities(kv: &mut etcd_client::Client) -> HashMap<u32, Vec<(String, String)>> {
    exported(kv)
        .await
        .into_values()
        .filter_map(|e| match e {
            Entry::Identity(r) => Some((
                r.id.get(),
                r.labels
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn identities_are_per_namespace() {
    let etcd = EtcdServer::start().unwrap();
    let mut kv = etcd_client(&etcd).await;
    let a = start(config(&etcd, "c1", 1)).await;
    let mut g = grpc(&a).await;
    register(&mut g, node("n1", "10.1.0.0/24", "192.0.2.1", "b1"))
        .await
        .unwrap();
    let web = [("k8s:app", "web")];
    let d = add(&mut g, "10.1.0.5", "default", &web).await;
    let p = add(&mut g, "10.1.0.6", "prod", &web).await;
    assert_ne!(d, p, "equal labels in two namespaces share an identity");
    // Same namespace, same labels: shared.
    assert_eq!(add(&mut g, "10.1.0.7", "prod", &web).await, p);
    // Claiming prod's namespace from default gets default's identity.
    let claim = add(
        &mut g,
        "10.1.0.8",
        "default",
        &[
            ("k8s:app", "web"),
            ("k8s:io.kubernetes.pod.namespace", "prod"),
        ],
    )
    .await;
    assert_eq!(claim, d, "a claimed namespace label was believed");
    wait_exported(&mut kv, "both identities", |e| {
        e.values()
            .filter(|e| matches!(e, Entry::Identity(_)))
            .count()
            == 2
    })
    .await;
    let ids = identities(&mut kv).await;
    let ns_of = |id: u32| {
        ids[&id]
            .iter()
            .find(|(k, _)| k == "k8s:io.kubernetes.pod.namespace")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(ns_of(d).as_deref(), Some("default"));
    assert_eq!(ns_of(p).as_deref(), Some("prod"));
    a.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn unused_identities_are_collected_after_the_grace_period() {
    let etcd = EtcdServer::start().unwrap();
    let mut kv = etcd_client(&etcd).await;
    let mut cfg = config(&etcd, "c1", 1);
    cfg.identity_gc_grace = Duration::from_secs(1);
    let a = start(cfg).await;
    let mut g = grpc(&a).await;
    register(&mut g, node("n1", "10.1.0.0/24", "192.0.2.1", "b1"))
        .await
        .unwrap();
    let gone = add(&mut g, "10.1.0.5", "default", &[("k8s:app", "old")]).await;
    let kept = add(&mut g, "10.1.0.6", "default", &[("k8s:app", "kept")]).await;
    wait_exported(&mut kv, "both identities", |e| {
        e.values()
            .filter(|e| matches!(e, Entry::Identity(_)))
            .count()
            == 2
    })
    .await;
    g.remove_endpoint(proto::RemoveEndpointRequest {
        ip: "10.1.0.5".into(),
    })
    .await
    .unwrap();
    // Polled: collected once unused for the grace period (checked every
    // half second), the other one stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ids = identities(&mut kv).await;
        assert!(ids.contains_key(&kept), "the identity in use was collected");
        if !ids.contains_key(&gone) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "identity {gone} never collected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its internal index went too: the labels allocate again.
    let internal = list(&mut kv, "clustermesh/internal/").await;
    assert!(
        !internal.keys().any(|k| k.contains("k8s:app=old")),
        "{:?}",
        internal.keys()
    );
    let again = add(&mut g, "10.1.0.7", "default", &[("k8s:app", "old")]).await;
    wait_exported(&mut kv, "the identity again", |e| {
        e.values()
            .any(|e| matches!(e, Entry::Identity(r) if r.id.get() == again))
    })
    .await;
    a.shutdown(Duration::from_secs(5)).await;
}
