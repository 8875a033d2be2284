//! Network policies through the gRPC API (issue 18, part 2): a real etcd,
//! the apiserver with mutual TLS. Only the admin applies and deletes (a
//! node certificate and a read-only certificate are refused first); an
//! apply is all or nothing; an L7 rule is refused naming the field; the
//! policies are exported under `clustermesh/state/policies/v1/` (decoded
//! strictly), survive a restart, and every change is audited with the
//! caller, the old and the new manifest.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use clustermesh_api::{Entry, proto};
use clustermesh_testkit::etcd::EtcdServer;
use common::{pki::Pki, *};
use tonic::Code;

const DB: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web, io.cilium.k8s.policy.cluster: c2}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: deny-all}
spec:
  endpointSelector: {matchLabels: {tier: locked}}
  ingress: [{}]
"#;

const BAD: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: extra, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: prod}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
"#;

fn apply(m: &str) -> proto::ApplyPoliciesRequest {
    proto::ApplyPoliciesRequest {
        manifest: m.to_owned(),
    }
}

fn names(l: &proto::ListPoliciesResponse) -> Vec<String> {
    l.policies
        .iter()
        .map(|p| format!("{}/{}/{}", p.kind, p.namespace, p.name))
        .collect()
}

#[tokio::test]
async fn only_the_admin_applies_policies_all_or_nothing_and_every_change_is_audited() {
    let etcd = EtcdServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let mut cfg = config(&etcd, "c1", 1);
    let audit = pki.secure(&mut cfg);
    let api = start(cfg.clone()).await;
    let addr = api.grpc_addr.to_string();
    let mut admin = pki.client(&addr, Some("admin")).await.unwrap();
    let mut n1 = pki.client(&addr, Some("node-1")).await.unwrap();
    let mut reader = pki.client(&addr, Some("reader")).await.unwrap();

    // The attack first: a node certificate (and a read-only one) applying
    // or deleting a policy is refused and changes nothing.
    for (who, g) in [("node", &mut n1), ("reader", &mut reader)] {
        let e = g.apply_policies(apply(DB)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
        assert!(e.message().contains("network policies"), "{}", e.message());
        let e = g
            .delete_policy(proto::DeletePolicyRequest {
                namespace: "prod".into(),
                name: "db".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
    }
    let l = reader
        .list_policies(proto::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(l.policies.is_empty(), "a refused apply stored {l:?}");

    // The admin applies two documents.
    let r = admin.apply_policies(apply(DB)).await.unwrap().into_inner();
    let outcomes: Vec<_> = r.policies.iter().map(|p| p.outcome.as_str()).collect();
    assert_eq!(outcomes, ["created", "created"]);
    // Reading is open to every certificate of the CA (the node's too).
    let l = n1
        .list_policies(proto::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        names(&l),
        [
            "CiliumClusterwideNetworkPolicy//deny-all",
            "CiliumNetworkPolicy/prod/db"
        ]
    );
    let p = reader
        .get_policy(proto::GetPolicyRequest {
            namespace: "prod".into(),
            name: "db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.cluster, "c1");
    let back = clustermesh_api::convert::policy_from_proto(&p).unwrap();
    assert_eq!(back.policy.specs[0].ingress.len(), 1);

    // Exported, and decoded strictly by a reader of the schema.
    let mut kv = etcd_client(&etcd).await;
    let want = "clustermesh/state/policies/v1/c1/prod/db";
    let cw = "clustermesh/state/policies/v1/c1/_/deny-all";
    let ex = wait_exported(&mut kv, "policies exported", |e| {
        e.contains_key(want)
            && e.contains_key(cw)
            && e.contains_key("clustermesh/synced/c1/policies")
    })
    .await;
    assert!(matches!(&ex[want], Entry::Policy(p) if p.name.as_str() == "db"));

    // All or nothing: document 0 is fine, document 1 has an L7 rule. The
    // error names the document and the field; nothing is stored.
    let e = admin.apply_policies(apply(BAD)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("document 1"), "{}", e.message());
    assert!(
        e.message().contains("spec.ingress[0].toPorts[0].rules"),
        "{}",
        e.message()
    );
    let l = admin
        .list_policies(proto::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.policies.len(), 2, "{:?}", names(&l));

    // Unchanged, configured; another kind under the same name is refused.
    let r = admin.apply_policies(apply(DB)).await.unwrap().into_inner();
    assert!(r.policies.iter().all(|p| p.outcome == "unchanged"), "{r:?}");
    let changed = DB.replace("5432", "5433");
    let r = admin
        .apply_policies(apply(&changed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.policies[0].outcome, "configured");
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: prod}\nspec: {podSelector: {}}\n";
    let e = admin.apply_policies(apply(np)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let dup = format!("{np}---\n{np}").replace("name: db", "name: twice");
    let e = admin.apply_policies(apply(&dup)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A restart re-exports what was stored.
    api.shutdown(Duration::from_secs(1)).await;
    let api = start(cfg).await;
    let addr = api.grpc_addr.to_string();
    let mut admin = pki.client(&addr, Some("admin")).await.unwrap();
    let l = admin
        .list_policies(proto::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.policies.len(), 2, "{:?}", names(&l));
    assert!(l.policies.iter().any(|p| p.manifest_json.contains("5433")));

    // Delete: gone from the API and from the export.
    let d = admin
        .delete_policy(proto::DeletePolicyRequest {
            namespace: "prod".into(),
            name: "db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.deleted);
    let d = admin
        .delete_policy(proto::DeletePolicyRequest {
            namespace: "prod".into(),
            name: "db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.deleted, "a second delete finds nothing");
    let e = admin
        .get_policy(proto::GetPolicyRequest {
            namespace: "prod".into(),
            name: "db".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    wait_exported(&mut kv, "policy deleted", |e| {
        !e.contains_key(want) && e.contains_key(cw)
    })
    .await;

    // The audit trail: who changed what, old and new.
    let log = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ok = |action: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|v| v["action"] == action && v["result"] == "ok")
            .collect()
    };
    let applied = ok("ApplyPolicies");
    // 2 created + 1 configured (unchanged is no change).
    assert_eq!(applied.len(), 3, "{log}");
    assert!(applied.iter().all(|v| v["caller"] == "root"));
    let conf = applied
        .iter()
        .find(|v| !v["old"].is_null())
        .unwrap_or_else(|| panic!("no change with an old manifest:\n{log}"));
    assert_eq!(conf["policy"], "prod/db");
    assert!(conf["old"].to_string().contains("5432"), "{conf}");
    assert!(conf["new"].to_string().contains("5433"), "{conf}");
    let del = ok("DeletePolicy");
    assert_eq!(del.len(), 1, "{log}");
    assert!(del[0]["new"].is_null() && del[0]["old"].to_string().contains("5433"));
    let refused = lines
        .iter()
        .filter(|v| {
            v["action"] == "ApplyPolicies"
                && v["result"] == "permission_denied"
                && v["caller"] == "node:node-1"
        })
        .count();
    assert_eq!(refused, 1, "{log}");
    api.shutdown(Duration::from_secs(1)).await;
}
