//! The gRPC API's authentication and authorization, tried as an attacker
//! would (issue 16): a real etcd, the apiserver with mutual TLS, and
//! callers holding certificates of the cluster CA: the admin (CN `root`,
//! what `clustermesh enable` issues), node-1's and node-2's node
//! certificates (CN `node:<name>`), another identity of the same CA (CN
//! `remote-c1`, the remote readers' etcd user), a certificate of another
//! CA, and no certificate at all.
//!
//! Each refusal names the caller and what it may not do, changes nothing,
//! and every posture change (encryption policy, services, removing another
//! node) is written to the audit log with the caller's identity.
#![allow(clippy::unwrap_used)]

mod common;

use clustermesh_api::proto::{self, cluster_mesh_client::ClusterMeshClient};
use clustermesh_testkit::etcd::EtcdServer;
use common::{pki::Pki, *};
use tonic::{Code, transport::Channel};

fn policy(strict: bool) -> proto::SetEncryptionPolicyRequest {
    proto::SetEncryptionPolicyRequest {
        policy: Some(proto::EncryptionPolicy {
            mode: if strict { "wireguard" } else { "none" }.into(),
            scope: if strict { "all" } else { "" }.into(),
            strict,
            ..Default::default()
        }),
    }
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> tonic::Status {
    let e = match r {
        Ok(v) => panic!("{what}: the attack worked: {v:?}"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    e
}

async fn strict_now(g: &mut ClusterMeshClient<Channel>) -> bool {
    g.get_cluster_info(proto::GetClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .encryption
        .unwrap()
        .strict
}

#[tokio::test]
async fn only_the_admin_changes_posture_and_a_node_acts_only_for_itself() {
    let etcd = EtcdServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let mut cfg = config(&etcd, "c1", 1);
    let audit = pki.secure(&mut cfg);
    cfg.encryption = clustermesh_api::EncryptionPolicy {
        mode: clustermesh_api::EncryptionMode::Wireguard,
        strict: true,
        ..Default::default()
    };
    let api = start(cfg).await;
    let addr = api.grpc_addr.to_string();

    // No certificate, or one of another CA: no call gets through.
    for who in [None, Some("stranger")] {
        let r = match pki.client(&addr, who).await {
            Err(e) => Err(e),
            Ok(mut g) => g
                .set_encryption_policy(policy(false))
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:?}")),
        };
        assert!(
            r.is_err(),
            "{who:?}: a caller without a cluster certificate changed the policy"
        );
    }
    // Plaintext: the TLS port does not speak it.
    let plain = ClusterMeshClient::connect(format!("http://{addr}")).await;
    if let Ok(mut g) = plain {
        assert!(g.set_encryption_policy(policy(false)).await.is_err());
    }

    let mut admin = pki.client(&addr, Some("admin")).await.unwrap();
    let mut n1 = pki.client(&addr, Some("node-1")).await.unwrap();
    let mut reader = pki.client(&addr, Some("reader")).await.unwrap();
    assert!(strict_now(&mut admin).await);

    // A node certificate never changes posture, services, or other nodes.
    let e = denied(
        "node sets the policy",
        n1.set_encryption_policy(policy(false)).await,
    );
    assert!(e.message().contains("node:node-1"), "{}", e.message());
    denied(
        "reader sets the policy",
        reader.set_encryption_policy(policy(false)).await,
    );
    assert!(
        strict_now(&mut admin).await,
        "the refused calls changed the policy"
    );
    denied(
        "node upserts a service",
        n1.upsert_service(proto::UpsertServiceRequest {
            service: Some(service("dns", &[])),
        })
        .await,
    );
    denied(
        "node deletes a service",
        n1.delete_service(proto::DeleteServiceRequest {
            namespace: "default".into(),
            name: "dns".into(),
        })
        .await,
    );

    // Its own node: yes; another's: no.
    register(
        &mut n1,
        node("node-1", "10.1.1.0/24", "192.168.1.1", "boot-1"),
    )
    .await
    .unwrap();
    denied(
        "node-1 registers node-2",
        register(
            &mut n1,
            node("node-2", "10.1.2.0/24", "192.168.1.2", "evil"),
        )
        .await,
    );
    denied(
        "reader registers a node",
        register(
            &mut reader,
            node("node-3", "10.1.3.0/24", "192.168.1.3", "x"),
        )
        .await,
    );
    let mut n2 = pki.client(&addr, Some("node-2")).await.unwrap();
    register(
        &mut n2,
        node("node-2", "10.1.2.0/24", "192.168.1.2", "boot-2"),
    )
    .await
    .unwrap();
    add_endpoint(&mut n2, "node-2", "10.1.2.5", "db")
        .await
        .unwrap();
    denied(
        "node-1 adds an endpoint for node-2",
        add_endpoint(&mut n1, "node-2", "10.1.2.6", "web").await,
    );
    let e = add_endpoint(&mut n1, "node-1", "10.1.2.7", "web")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "node-1 adds an endpoint in node-2's range: {e:?}"
    );
    denied(
        "node-1 removes node-2's endpoint",
        n1.remove_endpoint(proto::RemoveEndpointRequest {
            ip: "10.1.2.5".into(),
        })
        .await,
    );
    denied(
        "node-1 deregisters node-2",
        n1.deregister_node(proto::DeregisterNodeRequest {
            node: "node-2".into(),
            boot_id: "boot-2".into(),
        })
        .await,
    );
    // A heartbeat for another node is refused on the stream.
    let beat = proto::NodeHeartbeatRequest {
        node: "node-2".into(),
        boot_id: "boot-2".into(),
    };
    let r = n1.node_heartbeat(futures_util::stream::iter([beat])).await;
    let r = match r {
        Err(e) => Err(e),
        Ok(s) => {
            use futures_util::StreamExt as _;
            let mut s = s.into_inner();
            match s.next().await {
                Some(Ok(v)) => Ok(v),
                Some(Err(e)) => Err(e),
                None => Err(tonic::Status::unknown("ended")),
            }
        }
    };
    denied("node-1 heartbeats for node-2", r);
    // Deregistering even its own node needs the boot id (an empty one was
    // a takeover: deregister, then register with another key).
    let e = n2
        .deregister_node(proto::DeregisterNodeRequest {
            node: "node-2".into(),
            boot_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("boot_id"), "{}", e.message());
    let eps = admin
        .get_cluster_info(proto::GetClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .pod_cidrs;
    assert!(
        eps.contains(&"10.1.2.0/24".to_owned()),
        "node-2 was removed: {eps:?}"
    );

    // The admin: posture and services; a service may not take another's
    // frontend.
    admin
        .upsert_service(proto::UpsertServiceRequest {
            service: Some(service("dns", &[])),
        })
        .await
        .unwrap();
    let e = admin
        .upsert_service(proto::UpsertServiceRequest {
            service: Some(service("aaa-hijack", &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("default/dns"), "{}", e.message());
    admin.set_encryption_policy(policy(false)).await.unwrap();
    assert!(!strict_now(&mut admin).await);
    admin
        .deregister_node(proto::DeregisterNodeRequest {
            node: "node-2".into(),
            boot_id: String::new(),
        })
        .await
        .unwrap();

    // The audit trail: who changed what.
    let log = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |action: &str| {
        lines
            .iter()
            .find(|v| v["action"] == action && v["result"] == "ok")
            .unwrap_or_else(|| panic!("no {action} in the audit log:\n{log}"))
    };
    let p = find("SetEncryptionPolicy");
    assert_eq!(p["caller"], "root", "{p}");
    assert_eq!(p["new"]["strict"], false, "{p}");
    assert_eq!(p["old"]["strict"], true, "{p}");
    assert_eq!(find("UpsertService")["caller"], "root");
    assert_eq!(find("DeregisterNode")["node"], "node-2");
    // Refusals are audited too, with the caller that tried.
    let refused: Vec<_> = lines
        .iter()
        .filter(|v| v["result"] == "permission_denied" && v["caller"] == "node:node-1")
        .collect();
    assert!(refused.len() >= 3, "refusals not audited:\n{log}");
}
