//! Global services and the encryption switches through the real binary
//! against real apiservers (and agents for the applied policy).
#![allow(clippy::unwrap_used)]

mod cli_common;
use cli_common as common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_services_across_two_clusters() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let c1 = cluster(root.path(), ClusterSpec::new("c1", 1, 1)).await;
    let c2 = cluster(root.path(), ClusterSpec::new("c2", 2, 1)).await;
    enable(&dir, &c1).await;
    enable(&dir, &c2).await;
    run_ok(
        &dir,
        &[
            "connect",
            "--cluster",
            "c1",
            "--destination",
            "c2",
            "--wait",
            "--timeout",
            "45s",
        ],
    )
    .await;

    let out = run_ok(
        &dir,
        &[
            "service",
            "create",
            "--cluster",
            "c1",
            "default/web",
            "--frontend",
            "10.96.0.10",
            "--port",
            "http=80:8080/TCP",
            "--backend",
            "10.1.0.5@n1",
            "--global",
            "--affinity",
            "local",
        ],
    )
    .await;
    assert!(
        out.contains("service default/web created in cluster c1"),
        "{out}"
    );
    run_ok(
        &dir,
        &[
            "service",
            "create",
            "--cluster",
            "c2",
            "web",
            "-n",
            "default",
            "--frontend",
            "10.96.0.10",
            "--port",
            "http=80:8080",
            "--backend",
            "10.2.0.7",
            "--backend",
            "10.2.0.8,terminating",
            "--global",
        ],
    )
    .await;

    let v = run_json(&dir, &["service", "list"]).await;
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{v:#}");
    let c1s = list.iter().find(|s| s["cluster"] == "c1").unwrap();
    assert_eq!(c1s["affinity"], "local");
    assert_eq!(c1s["global"], true);
    assert_eq!(c1s["ports"][0]["target_port"], 8080);
    assert_eq!(c1s["backends"][0]["node"], "n1");
    let v = run_json(&dir, &["service", "list", "--cluster", "c2"]).await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["backends"][1]["state"], "terminating");

    let v = run_json(&dir, &["service", "show", "default/web"]).await;
    assert_eq!(v["clusters"].as_array().unwrap().len(), 2);
    assert_eq!(v["global_backends"].as_array().unwrap().len(), 3, "{v:#}");
    let text = run_ok(&dir, &["service", "show", "web"]).await;
    assert!(
        text.contains("global backends (global and shared): 3 in 2 cluster(s)"),
        "{text}"
    );

    // c2 stops sharing its backends.
    let v = run_json(
        &dir,
        &[
            "service",
            "annotate",
            "--cluster",
            "c2",
            "default/web",
            "--shared",
            "false",
        ],
    )
    .await;
    assert_eq!(v["updated"]["shared"], false);
    let v = run_json(&dir, &["service", "show", "default/web"]).await;
    assert_eq!(v["global_backends"].as_array().unwrap().len(), 1, "{v:#}");
    let e = run_fail(
        &dir,
        &["service", "annotate", "--cluster", "c2", "default/web"],
    )
    .await;
    assert!(e.contains("nothing to change"), "{e}");

    // The agents see the services (local and remote).
    let s = until_status(&dir, "services counted on c1's node", |v| {
        v["clusters"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["name"] == "c1" && c["nodes"][0]["remotes"][0]["counts"]["services"] == 1
            })
        })
    })
    .await;
    assert_eq!(nodes_of(&s, "c1")[0]["local_counts"]["services"], 1);

    // Refusals in one sentence.
    let e = run_fail(
        &dir,
        &[
            "service",
            "create",
            "--cluster",
            "c1",
            "bad",
            "--frontend",
            "banana",
            "--port",
            "80",
        ],
    )
    .await;
    assert!(
        e.contains("UpsertService on cluster c1 failed") && e.contains("frontends"),
        "{e}"
    );
    let o = cli(
        &dir,
        &[
            "service",
            "create",
            "--cluster",
            "c1",
            "x",
            "--frontend",
            "10.96.0.1",
            "--port",
            "0",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    let v = run_json(
        &dir,
        &["service", "delete", "--cluster", "c2", "default/web"],
    )
    .await;
    assert_eq!(v["deleted"]["cluster"], "c2");
    let e = run_fail(
        &dir,
        &["service", "delete", "--cluster", "c2", "default/web"],
    )
    .await;
    assert!(e.contains("cluster c2 has no service default/web"), "{e}");
    let v = run_json(&dir, &["service", "list"]).await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let e = run_fail(&dir, &["service", "show", "default/nothing"]).await;
    assert!(
        e.contains("no enabled cluster has service default/nothing"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_switches_audit_and_rotation() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let mut c1 = cluster(root.path(), ClusterSpec::new("c1", 1, 1)).await;
    let audit_path = root.path().join("audit-c1-n1.jsonl");
    let pid_path = root.path().join("agent-c1-n1.pid");
    enable(&dir, &c1).await;
    // The node's audit trail and pid file join its entry.
    let n = &c1.nodes[0];
    let spec = format!(
        "n1,clusters-dir={},status={},audit-log={},pid-file={}",
        n.clusters_dir.display(),
        n.status,
        audit_path.display(),
        pid_path.display()
    );
    run_ok(&dir, &["enable", "--cluster", "c1", "--node", &spec]).await;

    // A connected cluster without encryption: strict would cut it off.
    let c2 = cluster(root.path(), ClusterSpec::new("c2", 2, 1)).await;
    enable(&dir, &c2).await;
    run_ok(
        &dir,
        &[
            "connect",
            "--cluster",
            "c2",
            "--destination",
            "c1",
            "--mode",
            "unicast",
        ],
    )
    .await;
    run_ok(&dir, &["encryption", "enable", "--cluster", "c1"]).await;
    let e = run_fail(&dir, &["encryption", "strict", "on", "--cluster", "c1"]).await;
    assert!(
        e.contains("cluster c1 is connected to cluster c2, which has encryption off"),
        "{e}"
    );
    run_ok(
        &dir,
        &[
            "disconnect",
            "--cluster",
            "c2",
            "--destination",
            "c1",
            "--mode",
            "unicast",
        ],
    )
    .await;
    run_ok(&dir, &["encryption", "disable", "--cluster", "c1"]).await;

    let e = run_fail(&dir, &["encryption", "strict", "on", "--cluster", "c1"]).await;
    assert!(
        e.contains("strict mode needs encryption on")
            && e.contains("clustermesh encryption enable --cluster c1"),
        "{e}"
    );
    let v = run_json(&dir, &["encryption", "enable", "--cluster", "c1"]).await;
    assert_eq!(v["now"]["mode"], "wireguard");
    assert_eq!(v["changed"], true);
    assert_eq!(v["before"]["mode"], "none");
    let v = run_json(
        &dir,
        &["encryption", "strict", "on", "--ingress", "--cluster", "c1"],
    )
    .await;
    assert_eq!(
        (
            v["now"]["strict"].clone(),
            v["now"]["strict_ingress"].clone()
        ),
        (true.into(), true.into())
    );
    // Re-running changes nothing.
    let v = run_json(
        &dir,
        &["encryption", "strict", "on", "--ingress", "--cluster", "c1"],
    )
    .await;
    assert_eq!(v["changed"], false);

    // The node applies it; it has no WireGuard device, which status calls
    // out (not compliant: exit 1).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let v = loop {
        let o = cli(&dir, &["encryption", "status", "-o", "json"]).await;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if v["clusters"][0]["nodes"][0]["encryption"]["policy"]["strict"] == true {
            assert_eq!(o.status.code(), Some(1));
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "policy not applied: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(v["compliant"], false);
    let problems = v["clusters"][0]["nodes"][0]["problems"].to_string();
    assert!(
        problems.contains("node n1 has no WireGuard device"),
        "{problems}"
    );

    // Persisted: an apiserver restarted with its flags (encryption none)
    // keeps the policy set through the CLI.
    c1.api
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(5))
        .await;
    let mut cfg = clustermesh_apiserver::Config::new(
        "c1".parse().unwrap(),
        clustermesh_api::ClusterId::new(1).unwrap(),
        vec![c1.etcd.endpoint()],
    );
    cfg.lease_ttl = Duration::from_secs(30);
    // Plaintext API: this test is about services and encryption; TLS and authorization
    // are clustermesh-apiserver/tests/authz.rs's and the mesh harness's.
    cfg.insecure_plaintext = true;
    cfg.heartbeat_interval = Duration::from_secs(1);
    c1.api = Some(clustermesh_apiserver::start(cfg).await.unwrap());
    let api = c1.api_url();
    run_ok(&dir, &["enable", "--cluster", "c1", "--apiserver", &api]).await;
    let v = run_json_any(&dir, &["encryption", "status"]).await;
    assert_eq!(v["clusters"][0]["policy"]["strict"], true, "{v:#}");
    assert_eq!(v["clusters"][0]["policy"]["mode"], "wireguard");

    // Disabling is refused while strict; strict off, then disable.
    let e = run_fail(&dir, &["encryption", "disable", "--cluster", "c1"]).await;
    assert!(e.contains("turn it off first"), "{e}");
    let v = run_json(
        &dir,
        &[
            "encryption",
            "strict",
            "off",
            "--ingress",
            "--cluster",
            "c1",
        ],
    )
    .await;
    assert_eq!(
        (
            v["now"]["strict"].clone(),
            v["now"]["strict_ingress"].clone()
        ),
        (true.into(), false.into())
    );
    run_ok(&dir, &["encryption", "strict", "off", "--cluster", "c1"]).await;
    let v = run_json(&dir, &["encryption", "disable", "--cluster", "c1"]).await;
    assert_eq!(v["now"]["mode"], "none");
    let text = run_ok(&dir, &["status", "--cluster", "c1"]).await;
    assert!(text.contains("encryption policy: none"), "{text}");

    // Audit: the agent's own writer, plus an old line --since filters out.
    std::fs::write(
        &audit_path,
        "{\"ts\":\"2020-01-01T00:00:00.000Z\",\"node\":\"n1\",\"event\":\"key_rotation_completed\"}\n",
    )
    .unwrap();
    let audit = node_agent::audit::Audit::open(&audit_path, ("node", "n1"));
    audit.record(
        "encryption_policy",
        serde_json::json!({"mode": "wireguard", "strict": true}),
    );
    audit.record(
        "key_rotation_completed",
        serde_json::json!({"old": "aa", "new": "bb"}),
    );
    let v = run_json(&dir, &["encryption", "audit", "--cluster", "c1"]).await;
    assert_eq!(v["events"].as_array().unwrap().len(), 3, "{v:#}");
    let v = run_json(
        &dir,
        &["encryption", "audit", "--cluster", "c1", "--since", "1h"],
    )
    .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 2, "{v:#}");
    let v = run_json(
        &dir,
        &[
            "encryption",
            "audit",
            "--cluster",
            "c1",
            "--since",
            "1h",
            "--event",
            "key_rotation_completed",
        ],
    )
    .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    assert_eq!(v["events"][0]["new"], "bb");

    // Rotation signals the agent's pid (a stand-in process that SIGUSR1
    // terminates, so the test sees the signal arrive).
    let e = run_fail(&dir, &["encryption", "rotate-keys", "--cluster", "c1"]).await;
    assert!(e.contains("cannot read the pid file"), "{e}");
    let mut child = tokio::process::Command::new("sleep")
        .arg("60")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    std::fs::write(&pid_path, child.id().unwrap().to_string()).unwrap();
    let v = run_json(&dir, &["encryption", "rotate-keys", "--cluster", "c1"]).await;
    assert_eq!(v["rotation_started"][0]["node"], "n1");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status.signal(), Some(libc::SIGUSR1));
}

/// `-o json` whatever the exit code.
async fn run_json_any(dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let o = cli(dir, &a).await;
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{a:?}: {e}: {}", stderr(&o)))
}
