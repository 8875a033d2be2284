//! The connect lifecycle through the real binary against real etcd,
//! apiservers and agents: enable two clusters, connect them, status says
//! both synced on every node, re-running changes nothing, disconnect, status
//! says no remote cluster.
#![allow(clippy::unwrap_used)]

mod cli_common;
use cli_common as common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_connect_status_disconnect() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let c1 = cluster(root.path(), ClusterSpec::new("c1", 1, 2)).await;
    let c2 = cluster(root.path(), ClusterSpec::new("c2", 2, 1)).await;
    c1.register("n1", "10.1.0.0/24", "192.0.2.1").await;
    c1.endpoint("n1", "10.1.0.5").await;
    c2.register("n1", "10.2.0.0/24", "192.0.2.2").await;

    let out = enable(&dir, &c1).await;
    assert!(out.contains("created") && out.contains("next:"), "{out}");
    for f in [
        "ca.pem",
        "ca-key.pem",
        "etcd-server.pem",
        "apiserver.pem",
        "admin.pem",
    ] {
        assert!(dir.join("pki/c1").join(f).is_file(), "{f} missing");
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.join("pki/c1/ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "private key readable by others");
    // Re-running keeps the CA and reports nothing changed.
    let ca = std::fs::read(dir.join("pki/c1/ca.pem")).unwrap();
    let out = enable(&dir, &c1).await;
    assert!(out.contains("unchanged") && out.contains("kept"), "{out}");
    assert_eq!(std::fs::read(dir.join("pki/c1/ca.pem")).unwrap(), ca);
    let v = {
        let id = c2.id.to_string();
        let api = c2.api_url();
        let etcd = c2.etcd.endpoint();
        let nodes = c2.node_args();
        let mut args = vec![
            "enable",
            "--cluster",
            "c2",
            "--id",
            &id,
            "--apiserver",
            &api,
            "--etcd-endpoints",
            &etcd,
        ];
        args.extend(nodes.iter().map(String::as_str));
        run_json(&dir, &args).await
    };
    assert_eq!(v["cluster"], "c2");
    assert_eq!(v["id"], 2);
    assert!(v["next"].as_array().unwrap().len() >= 3);

    // Before connecting: healthy, nothing configured.
    let s = until_status(&dir, "both clusters healthy", |v| v["healthy"] == true).await;
    for n in nodes_of(&s, "c1") {
        assert_eq!(n["configured"], 0);
        assert_eq!(n["known"], 1);
        assert_eq!(n["local_synced"], true);
    }
    let text = run_ok(&dir, &["status", "--cluster", "c1"]).await;
    assert!(
        text.contains("clusters 0/1 configured, 0/0 connected, 0/0 synced"),
        "{text}"
    );

    // Connect (bidirectional by default) and wait for every node.
    let out = run_ok(
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
    assert_eq!(out.matches("wrote").count(), 3, "{out}");
    assert!(
        out.contains("every node reports the change (3/3 synced)"),
        "{out}"
    );
    assert_eq!(c1.remote_files(0), vec!["c2"]);
    assert_eq!(c1.remote_files(1), vec!["c2"]);
    assert_eq!(c2.remote_files(0), vec!["c1"]);

    let s = run_json(&dir, &["status"]).await;
    assert_eq!(s["healthy"], true, "{s:#}");
    for (c, remote) in [("c1", "c2"), ("c2", "c1")] {
        for n in nodes_of(&s, c) {
            assert_eq!(
                (&n["configured"], &n["connected"], &n["synced"]),
                (&1.into(), &1.into(), &1.into()),
                "{n:#}"
            );
            let r = &n["remotes"][0];
            assert_eq!(r["name"], remote);
            assert_eq!(r["synced"], true);
        }
    }
    // c1's nodes see c2's node; c2's see c1's node and endpoint.
    assert_eq!(nodes_of(&s, "c1")[0]["remotes"][0]["counts"]["nodes"], 1);
    assert_eq!(
        nodes_of(&s, "c2")[0]["remotes"][0]["counts"]["endpoints"],
        1
    );
    let text = run_ok(&dir, &["status"]).await;
    assert!(
        text.contains("clusters 1/1 configured, 1/1 connected, 1/1 synced"),
        "{text}"
    );
    // Cilium's layout over the nodes: connected to all, each connection,
    // global services (none declared here).
    for line in [
        "all 2 nodes are connected to all 1 remote cluster [min:1 / avg:1.0 / max:1]",
        "all 1 node is connected to all 1 remote cluster [min:1 / avg:1.0 / max:1]",
        "    - c2: 2/2 configured, 2/2 connected, 2/2 synced",
        "    - c1: 1/1 configured, 1/1 connected, 1/1 synced",
        "global services: [min:0 / avg:0.0 / max:0]",
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }
    assert_eq!(
        s["clusters"][0]["summary"]["nodes_connected_to_all"], 2,
        "{s}"
    );
    run_ok(&dir, &["status", "--wait", "--timeout", "10s"]).await;

    // Re-running is harmless: nothing is rewritten.
    let out = run_ok(&dir, &["connect", "--cluster", "c1", "--destination", "c2"]).await;
    assert_eq!(out.matches("unchanged").count(), 3, "{out}");
    assert!(!out.contains("wrote"), "{out}");

    // Disconnect: files gone, every node drains c2 / c1.
    let v = run_json(
        &dir,
        &[
            "disconnect",
            "--cluster",
            "c1",
            "--destination",
            "c2",
            "--wait",
            "--timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(v["drained"], true, "{v:#}");
    assert_eq!(v["files"].as_array().unwrap().len(), 3);
    assert!(c1.remote_files(0).is_empty() && c2.remote_files(0).is_empty());
    let s = run_json(&dir, &["status"]).await;
    assert_eq!(s["healthy"], true, "{s:#}");
    for c in ["c1", "c2"] {
        for n in nodes_of(&s, c) {
            assert_eq!(n["configured"], 0);
            assert_eq!(n["remotes"].as_array().unwrap().len(), 0, "{n:#}");
        }
    }
    // Disconnecting again is harmless too.
    let out = run_ok(
        &dir,
        &["disconnect", "--cluster", "c1", "--destination", "c2"],
    )
    .await;
    assert_eq!(out.matches("already absent").count(), 3, "{out}");

    // Unicast: only c1's nodes watch c2.
    run_ok(
        &dir,
        &[
            "connect",
            "--cluster",
            "c1",
            "--destination",
            "c2",
            "--mode",
            "unicast",
            "--wait",
            "--timeout",
            "45s",
        ],
    )
    .await;
    assert_eq!(c1.remote_files(0), vec!["c2"]);
    assert!(c2.remote_files(0).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_unhealthy_when_a_remote_is_down() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let c1 = cluster(root.path(), ClusterSpec::new("c1", 1, 1)).await;
    let mut c2 = cluster(root.path(), ClusterSpec::new("c2", 2, 1)).await;
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
            "--mode",
            "unicast",
            "--wait",
            "--timeout",
            "45s",
        ],
    )
    .await;
    // c2's etcd dies: c1's node loses it, status says so in words, exit 1.
    c2.etcd.kill().unwrap();
    let s = until_status(&dir, "c2 disconnected on c1's node", |v| {
        v["clusters"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["name"] == "c1" && c["nodes"][0]["remotes"][0]["connected"] == false)
        })
    })
    .await;
    assert_eq!(s["healthy"], false);
    let o = cli(&dir, &["status", "--cluster", "c1"]).await;
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o);
    assert!(
        text.contains("NOT healthy") && text.contains("remote cluster c2 is not connected"),
        "{text}"
    );
    let o = cli(
        &dir,
        &["status", "--wait", "--timeout", "1s", "--cluster", "c1"],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("waiting:"), "{}", stderr(&o));
    // Its apiserver is unreachable too: said in one sentence.
    c2.api
        .take()
        .unwrap()
        .shutdown(std::time::Duration::from_secs(2))
        .await;
    let v = run_json_fail(&dir, &["status", "--cluster", "c2"]).await;
    let err = v["clusters"][0]["apiserver_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        err.contains("cannot reach the apiserver of cluster c2"),
        "{err}"
    );
}

async fn run_json_fail(dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let o = cli(dir, &a).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_mode_connects_every_pair() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let a = cluster(root.path(), ClusterSpec::new("a", 1, 1)).await;
    let b = cluster(root.path(), ClusterSpec::new("b", 2, 1)).await;
    let c = cluster(root.path(), ClusterSpec::new("c", 3, 1)).await;
    for x in [&a, &b, &c] {
        enable(&dir, x).await;
    }
    let v = run_json(
        &dir,
        &[
            "connect",
            "--cluster",
            "a",
            "--destination",
            "b,c",
            "--mode",
            "mesh",
            "--wait",
            "--timeout",
            "45s",
        ],
    )
    .await;
    assert_eq!(v["connected"].as_array().unwrap().len(), 6);
    assert_eq!(v["synced"], true);
    assert_eq!(a.remote_files(0), vec!["b", "c"]);
    assert_eq!(b.remote_files(0), vec!["a", "c"]);
    assert_eq!(c.remote_files(0), vec!["a", "b"]);
    let s = run_json(&dir, &["status"]).await;
    assert_eq!(s["healthy"], true, "{s:#}");
    for x in ["a", "b", "c"] {
        let n = nodes_of(&s, x)[0];
        assert_eq!(
            (&n["configured"], &n["synced"], &n["known"]),
            (&2.into(), &2.into(), &2.into())
        );
    }
    run_ok(
        &dir,
        &[
            "disconnect",
            "--cluster",
            "a",
            "--destination",
            "b,c",
            "--mode",
            "mesh",
            "--wait",
            "--timeout",
            "30s",
        ],
    )
    .await;
    for x in [&a, &b, &c] {
        assert!(x.remote_files(0).is_empty());
    }
}
