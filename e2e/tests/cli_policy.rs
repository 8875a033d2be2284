//! `clustermesh policy` through the real binary against two real clusters
//! (etcd + apiserver each): apply (all or nothing, outcomes), list, show,
//! lint, trace across clusters (allowed, denied by default, by rule, and
//! after the policy is deleted) and delete. Enforcement in the datapath is
//! policy_mesh.rs's.
#![allow(clippy::unwrap_used)]

mod cli_common;
use cli_common as common;

use std::collections::HashMap;

use clustermesh_api::proto;
use common::*;

/// c1's database may be reached only from c2's frontend pods, on 5432/TCP.
const DB_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-from-c2-frontend
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: db
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
        io.cilium.k8s.policy.cluster: c2
    toPorts:
    - ports:
      - port: "5432"
        protocol: TCP
"#;

/// A second document after a valid one: an L7 rule, refused.
const WITH_L7: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web-ok
  namespace: default
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: frontend}}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web-l7
  namespace: default
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET}]
"#;

async fn pod(c: &Cluster, ip: &str, name: &str, app: &str) {
    let labels = HashMap::from([("k8s:app".to_owned(), app.to_owned())]);
    c.grpc()
        .await
        .add_endpoint(proto::AddEndpointRequest {
            node: "n1".into(),
            ip: ip.into(),
            namespace: "default".into(),
            name: name.into(),
            labels,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_list_show_lint_trace_and_delete() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let c1 = cluster(root.path(), ClusterSpec::new("c1", 1, 1)).await;
    let c2 = cluster(root.path(), ClusterSpec::new("c2", 2, 1)).await;
    enable(&dir, &c1).await;
    enable(&dir, &c2).await;
    c1.register("n1", "10.1.0.0/24", "192.0.2.1").await;
    c2.register("n1", "10.2.0.0/24", "192.0.2.2").await;
    pod(&c1, "10.1.0.5", "db-0", "db").await;
    pod(&c2, "10.2.0.5", "frontend-0", "frontend").await;
    pod(&c2, "10.2.0.6", "batch-0", "batch").await;
    let files = root.path().join("manifests");
    std::fs::create_dir_all(&files).unwrap();
    let db = files.join("db.yaml");
    std::fs::write(&db, DB_POLICY).unwrap();
    let l7 = files.join("l7.yaml");
    std::fs::write(&l7, WITH_L7).unwrap();
    let db_s = db.to_str().unwrap();

    // Apply: created, then unchanged.
    let out = run_ok(&dir, &["policy", "apply", "--cluster", "c1", "-f", db_s]).await;
    assert!(out.contains("default/db-from-c2-frontend created"), "{out}");
    let out = run_ok(&dir, &["policy", "apply", "--cluster", "c1", "-f", db_s]).await;
    assert!(out.contains("unchanged"), "{out}");

    // All or nothing: the valid first document is not stored either.
    let err = run_fail(
        &dir,
        &[
            "policy",
            "apply",
            "--cluster",
            "c1",
            "-f",
            l7.to_str().unwrap(),
        ],
    )
    .await;
    assert!(err.contains("rules"), "{err}");
    let list = run_json(&dir, &["policy", "list"]).await;
    let names: Vec<String> = list
        .as_array()
        .or_else(|| list["policies"].as_array())
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["db-from-c2-frontend"], "{list}");
    let show = run_ok(
        &dir,
        &["policy", "show", "db-from-c2-frontend", "-n", "default"],
    )
    .await;
    assert!(
        show.contains("endpointSelector") && show.contains("5432"),
        "{show}"
    );

    // Lint: the named cluster gives no default warning; a selector without
    // one is warned about (exit 0); a parse error exits 1.
    let out = run_ok(&dir, &["policy", "lint", "-f", db_s]).await;
    assert!(out.contains("0 warnings"), "{out}");
    let bare = files.join("bare.yaml");
    std::fs::write(
        &bare,
        DB_POLICY.replace("        io.cilium.k8s.policy.cluster: c2\n", ""),
    )
    .unwrap();
    let out = run_ok(&dir, &["policy", "lint", "-f", bare.to_str().unwrap()]).await;
    assert!(out.contains("local cluster"), "{out}");
    let err = run_fail(&dir, &["policy", "lint", "-f", l7.to_str().unwrap()]).await;
    assert!(err.contains("toPorts[0].rules"), "{err}");

    // Trace, egress at c2 (no policy there) and ingress at c1.
    let trace = |from: &'static str, port: &'static str| {
        let dir = dir.clone();
        async move {
            let args = [
                "policy",
                "trace",
                "--from",
                from,
                "--to",
                "c1/default/db-0",
                "--port",
                port,
            ];
            cli(&dir, &args).await
        }
    };
    let o = trace("c2/default/frontend-0", "5432/TCP").await;
    assert!(
        o.status.success() && stdout(&o).contains("ALLOWED"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("db-from-c2-frontend"), "{}", stdout(&o));
    for (from, port) in [
        ("c2/default/frontend-0", "5433/TCP"),
        ("c2/default/frontend-0", "5432/UDP"),
        ("c2/default/batch-0", "5432/TCP"),
    ] {
        let o = trace(from, port).await;
        assert_eq!(o.status.code(), Some(1), "{from} {port}: {}", stdout(&o));
        assert!(
            stdout(&o).contains("DENIED"),
            "{from} {port}: {}",
            stdout(&o)
        );
    }

    // Delete: the list is empty and the flow is allowed again.
    let out = run_ok(
        &dir,
        &[
            "policy",
            "delete",
            "db-from-c2-frontend",
            "-n",
            "default",
            "--cluster",
            "c1",
        ],
    )
    .await;
    assert!(out.contains("deleted"), "{out}");
    let list = run_json(&dir, &["policy", "list"]).await;
    let n = list
        .as_array()
        .or_else(|| list["policies"].as_array())
        .map_or(0, Vec::len);
    assert_eq!(n, 0, "{list}");
    let o = trace("c2/default/batch-0", "5432/TCP").await;
    assert!(
        o.status.success() && stdout(&o).contains("ALLOWED"),
        "{}",
        stdout(&o)
    );
}
