//! The apiserver against a real etcd server (Debian etcd-server, started by
//! the test on free loopback ports): export of every kind, canaries after
//! the initial export, leases that expire a killed apiserver's entries,
//! restarts without delete events, identity allocation.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::BTreeSet, time::Duration};

use clustermesh_api::{Entry, StateKind, proto};
use clustermesh_testkit::etcd::EtcdServer;
use common::*;
use etcd_client::{EventType, WatchOptions};

#[tokio::test]
async fn exports_every_kind_and_canaries_come_after_the_initial_export() {
    let etcd = EtcdServer::start().unwrap();
    let mut kv = etcd_client(&etcd).await;

    // A first run registers state, then stops; its lease is revoked so the
    // second run must do a full initial export from the stored state.
    let a = start(config(&etcd, "c1", 1)).await;
    let mut g = grpc(&a).await;
    register(&mut g, node("n1", "10.1.0.0/24", "192.0.2.1", "b1"))
        .await
        .unwrap();
    register(&mut g, node("n2", "10.1.1.0/24", "192.0.2.2", "b2"))
        .await
        .unwrap();
    let web = add_endpoint(&mut g, "n1", "10.1.0.5", "web").await.unwrap();
    let web2 = add_endpoint(&mut g, "n2", "10.1.1.5", "web").await.unwrap();
    let db = add_endpoint(&mut g, "n2", "10.1.1.6", "db").await.unwrap();
    assert_eq!(web, web2, "same labels, same identity");
    assert_ne!(web, db);
    assert_eq!(web >> 16, 1, "cluster id in bits 16-23");
    g.upsert_service(proto::UpsertServiceRequest {
        service: Some(service("web", &["10.1.0.5", "10.1.1.5"])),
    })
    .await
    .unwrap();
    a.shutdown(Duration::from_secs(5)).await;
    // Simulate a long outage: revoke every lease so the export is gone.
    for l in kv.leases().await.unwrap().leases() {
        kv.lease_revoke(l.id()).await.unwrap();
    }
    assert!(exported(&mut kv).await.is_empty());

    let start_rev = kv
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let b = start(config(&etcd, "c1", 1)).await;
    let state = wait_exported(&mut kv, "full export", |e| e.len() >= 14).await;

    // Every kind is there and decodes under the stable schema.
    let count = |f: fn(&Entry) -> bool| state.values().filter(|e| f(e)).count();
    assert_eq!(
        count(|e| matches!(e, Entry::ClusterConfig(c) if c.id.get() == 1)),
        1
    );
    assert_eq!(count(|e| matches!(e, Entry::Node(_))), 2);
    assert_eq!(count(|e| matches!(e, Entry::Endpoint(_))), 3);
    assert_eq!(count(|e| matches!(e, Entry::Identity(_))), 2);
    assert_eq!(
        count(|e| matches!(e, Entry::Service(s) if s.backends.len() == 2 && s.global)),
        1
    );
    assert_eq!(count(|e| matches!(e, Entry::Synced(_))), 5);
    assert_eq!(count(|e| matches!(e, Entry::Heartbeat(_))), 1);
    let Entry::Endpoint(ep) = &state["clustermesh/state/ip/v1/c1/10.1.0.5"] else {
        panic!()
    };
    assert_eq!(ep.identity.get(), web);
    assert_eq!(ep.host_ip.to_string(), "192.0.2.1");

    // Order of the initial export, from etcd's own event history: cluster
    // config first; each kind's canary after every key of that kind.
    let mut w = kv
        .watch(
            "clustermesh/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start_rev + 1),
            ),
        )
        .await
        .unwrap();
    let mut order: Vec<String> = Vec::new();
    while order.len() < 15 {
        let r = w.message().await.unwrap().unwrap();
        for ev in r.events() {
            let k = String::from_utf8(ev.kv().unwrap().key().to_vec()).unwrap();
            if ev.event_type() == EventType::Put && !order.contains(&k) {
                order.push(k);
            }
        }
    }
    assert_eq!(order[0], "clustermesh/cluster-config/c1", "{order:?}");
    for kind in StateKind::ALL {
        let canary = order
            .iter()
            .position(|k| *k == format!("clustermesh/synced/c1/{kind}"))
            .unwrap_or_else(|| panic!("no canary for {kind}: {order:?}"));
        // (No policy was applied: that kind's canary comes alone.)
        if let Some(last) = order
            .iter()
            .rposition(|k| k.starts_with(&kind.prefix(&"c1".parse().unwrap())))
        {
            assert!(last < canary, "{kind}: state key after canary: {order:?}");
        }
    }
    assert_eq!(
        b.synced(),
        StateKind::ALL.into_iter().collect::<BTreeSet<_>>()
    );
    b.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn killed_apiserver_entries_expire_with_its_lease() {
    let etcd = EtcdServer::start().unwrap();
    let mut kv = etcd_client(&etcd).await;
    let grpc_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .args([
            "--cluster-name",
            "c1",
            "--cluster-id",
            "1",
            "--etcd-endpoints",
        ])
        .arg(etcd.endpoint())
        .args([
            "--listen",
            &format!("127.0.0.1:{grpc_port}"),
            "--lease-ttl",
            "2",
            "--heartbeat-interval",
            "1",
            "--insecure-plaintext",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut g = loop {
        match proto::cluster_mesh_client::ClusterMeshClient::connect(format!(
            "http://127.0.0.1:{grpc_port}"
        ))
        .await
        {
            Ok(g) => break g,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    register(&mut g, node("n1", "10.1.0.0/24", "192.0.2.1", "b1"))
        .await
        .unwrap();
    add_endpoint(&mut g, "n1", "10.1.0.5", "web").await.unwrap();
    wait_exported(&mut kv, "endpoint exported", |e| {
        e.contains_key("clustermesh/state/ip/v1/c1/10.1.0.5")
    })
    .await;

    child.kill().unwrap(); // SIGKILL: no cleanup of any kind
    child.wait().unwrap();
    // Within the lease TTL (2 s) every exported key is gone.
    wait_exported(&mut kv, "lease expiry", |e| e.is_empty()).await;
    // The durable internal records stay: a restart restores the export.
    let internal = list(&mut kv, "clustermesh/internal/c1/").await;
    assert!(
        internal.contains_key("clustermesh/internal/c1/nodes/n1"),
        "{:?}",
        internal.keys()
    );
}

#[tokio::test]
async fn restart_changes_nothing_readers_can_see() {
    let etcd = EtcdServer::start().unwrap();
    let mut kv = etcd_client(&etcd).await;
    let a = start(config(&etcd, "c1", 1)).await;
    let mut g = grpc(&a).await;
    register(&mut g, node("n1", "10.1.0.0/24", "192.0.2.1", "b1"))
        .await
        .unwrap();
    for i in 1..=20 {
        add_endpoint(
            &mut g,
            "n1",
            &format!("10.1.0.{i}"),
            if i % 2 == 0 { "web" } else { "db" },
        )
        .await
        .unwrap();
    }
    g.upsert_service(proto::UpsertServiceRequest {
        service: Some(service("web", &["10.1.0.2"])),
    })
    .await
    .unwrap();
    let before = wait_exported(&mut kv, "initial export", |e| {
        e.keys()
            .filter(|k| k.starts_with("clustermesh/state/ip/"))
            .count()
            == 20
    })
    .await;
    a.shutdown(Duration::from_secs(5)).await;

    let rev = kv
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut w = kv
        .watch(
            "clustermesh/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .unwrap();
    let b = start(config(&etcd, "c1", 1)).await;
    // A change after the restart marks the end of the observation window.
    let mut g = grpc(&b).await;
    add_endpoint(&mut g, "n1", "10.1.0.99", "web")
        .await
        .unwrap();
    let (mut deletes, mut state_puts) = (Vec::new(), Vec::new());
    'outer: loop {
        let r = tokio::time::timeout(Duration::from_secs(20), w.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for ev in r.events() {
            let k = String::from_utf8(ev.kv().unwrap().key().to_vec()).unwrap();
            if k.starts_with("clustermesh/internal/") || k.starts_with("clustermesh/heartbeat/") {
                continue;
            }
            if k == "clustermesh/state/ip/v1/c1/10.1.0.99" {
                break 'outer;
            }
            match ev.event_type() {
                EventType::Delete => deletes.push(k),
                EventType::Put => state_puts.push(k),
            }
        }
    }
    assert!(deletes.is_empty(), "restart deleted {deletes:?}");
    assert!(
        state_puts.is_empty(),
        "restart rewrote unchanged keys {state_puts:?}"
    );
    let after = exported(&mut kv).await;
    for (k, v) in &before {
        if !k.starts_with("clustermesh/heartbeat/") {
            assert_eq!(after.get(k), Some(v), "{k}");
        }
    }
    b.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn identities_are_stable_across_restarts_and_race_free() {
    let etcd = EtcdServer::start().unwrap();
    let mut kv = etcd_client(&etcd).await;
    // Two apiserver processes' worth of allocators racing on one etcd:
    // overlapping label sets, allocated concurrently.
    let cluster: clustermesh_api::ClusterName = "c1".parse().unwrap();
    let id = clustermesh_api::ClusterId::new(1).unwrap();
    let keys = clustermesh_apiserver::store::Internal::new(&cluster);
    let labels = |i: usize| {
        let mut m = std::collections::BTreeMap::new();
        m.insert("k8s:app".to_owned(), format!("app{i}"));
        // As the API allocates them: per namespace.
        m.insert(
            "k8s:io.kubernetes.pod.namespace".to_owned(),
            "default".to_owned(),
        );
        clustermesh_api::Labels::new(m).unwrap()
    };
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let mut c = etcd_client(&etcd).await;
        let keys = keys.clone();
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            let mut st = clustermesh_apiserver::state::ClusterState::new(
                cluster.clone(),
                id,
                Default::default(),
            );
            let mut got = Vec::new();
            // Each worker walks the same 40 label sets in a different order.
            for j in 0..40 {
                let i = (j * (worker + 1) * 7 + worker) % 40;
                let r = clustermesh_apiserver::store::allocate_identity(
                    &mut c,
                    &keys,
                    &cluster,
                    id,
                    &labels(i),
                    &st,
                )
                .await
                .unwrap();
                st.add_identity(r.clone());
                got.push((i, r.id));
            }
            got
        }));
    }
    let mut by_labels = std::collections::BTreeMap::new();
    for t in tasks {
        for (i, ident) in t.await.unwrap() {
            let prev = by_labels.insert(i, ident);
            assert!(
                prev.is_none() || prev == Some(ident),
                "labels app{i}: {prev:?} vs {ident}"
            );
            assert_eq!(ident.cluster(), Some(id));
        }
    }
    let distinct: BTreeSet<_> = by_labels.values().collect();
    assert_eq!(
        distinct.len(),
        40,
        "distinct labels got distinct identities"
    );

    // Through the apiserver, across a restart: same labels, same identity.
    let a = start(config(&etcd, "c1", 1)).await;
    let mut g = grpc(&a).await;
    register(&mut g, node("n1", "10.1.0.0/24", "192.0.2.1", "b1"))
        .await
        .unwrap();
    let first = add_endpoint(&mut g, "n1", "10.1.0.5", "app7")
        .await
        .unwrap();
    assert_eq!(first, by_labels[&7].get());
    let fresh = add_endpoint(&mut g, "n1", "10.1.0.6", "brand-new")
        .await
        .unwrap();
    a.shutdown(Duration::from_secs(5)).await;
    for l in kv.leases().await.unwrap().leases() {
        kv.lease_revoke(l.id()).await.unwrap();
    }
    let b = start(config(&etcd, "c1", 1)).await;
    let mut g = grpc(&b).await;
    assert_eq!(
        add_endpoint(&mut g, "n1", "10.1.0.7", "brand-new")
            .await
            .unwrap(),
        fresh
    );
    b.shutdown(Duration::from_secs(5)).await;
}
