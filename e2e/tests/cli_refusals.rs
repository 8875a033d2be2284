//! What connect refuses, through the real binary against real apiservers:
//! every refusal is one sentence saying what is wrong and how to fix it,
//! exit code 1, and nothing is written to any node. Usage errors exit 2.
#![allow(clippy::unwrap_used)]

mod cli_common;
use cli_common as common;

use std::path::Path;

use clustermesh_api::{EncryptionMode, EncryptionPolicy};
use common::*;

/// A cluster file written by hand (as one copied from another admin's
/// config dir would be), bypassing enable's own checks.
fn hand_written(dir: &Path, name: &str, id: u64, apiserver: &str, c: &Cluster) {
    let nodes: String = c
        .nodes
        .iter()
        .map(|n| {
            format!(
                "- name: {}\n  clusters-dir: {}\n  status: {}\n",
                n.name,
                n.clusters_dir.display(),
                n.status
            )
        })
        .collect();
    std::fs::write(
        dir.join("clusters").join(format!("{name}.yaml")),
        format!(
            "name: {name}\nid: {id}\napiserver: {apiserver}\netcd-endpoints:\n- {}\nnodes:\n{nodes}",
            c.etcd.endpoint()
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_what_cannot_work_and_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let c1 = cluster(root.path(), ClusterSpec::new("c1", 1, 1)).await;
    let c2 = cluster(root.path(), ClusterSpec::new("c2", 2, 1)).await;
    c1.register("n1", "10.1.0.0/24", "192.0.2.1").await;
    enable(&dir, &c1).await;
    enable(&dir, &c2).await;

    // Misspelt names.
    let e = run_fail(
        &dir,
        &["connect", "--cluster", "c1", "--destination", "c22"],
    )
    .await;
    assert!(
        e.contains("cluster \"c22\" is not known: did you mean \"c2\"?"),
        "{e}"
    );
    let e = run_fail(&dir, &["status", "--cluster", "west"]).await;
    assert!(
        e.contains("enabled clusters in") && e.contains("c1, c2"),
        "{e}"
    );
    let e = run_fail(&dir, &["connect", "--cluster", "c1", "--destination", "c1"]).await;
    assert!(e.contains("cannot connect cluster c1 to itself"), "{e}");

    // enable refuses a second cluster with the same id.
    let e = run_fail(
        &dir,
        &[
            "enable",
            "--cluster",
            "c9",
            "--id",
            "1",
            "--etcd-endpoints",
            "http://127.0.0.1:1",
        ],
    )
    .await;
    assert!(
        e.contains("cluster id 1 is already used by cluster c1") && e.contains("unique id"),
        "{e}"
    );

    // A duplicate cluster id (a cluster file copied from elsewhere).
    let c3 = cluster(root.path(), ClusterSpec::new("c3", 1, 1)).await;
    hand_written(&dir, "c3", 1, &c3.api_url(), &c3);
    let e = run_fail(&dir, &["connect", "--cluster", "c1", "--destination", "c3"]).await;
    assert!(
        e.contains("clusters c1 and c3 both have cluster id 1")
            && e.contains("give one of them another id"),
        "{e}"
    );

    // A duplicate name: the file's apiserver is another cluster's.
    hand_written(&dir, "c4", 4, &c1.api_url(), &c3);
    let e = run_fail(&dir, &["connect", "--cluster", "c2", "--destination", "c4"]).await;
    assert!(
        e.contains("says it is cluster \"c1\"") && e.contains("names it \"c4\""),
        "{e}"
    );

    // Overlapping pod CIDRs.
    let c5 = cluster(root.path(), ClusterSpec::new("c5", 5, 1)).await;
    c5.register("n1", "10.1.0.128/25", "192.0.2.5").await;
    enable(&dir, &c5).await;
    let e = run_fail(&dir, &["connect", "--cluster", "c1", "--destination", "c5"]).await;
    assert!(
        e.contains(
            "pod CIDR 10.1.0.0/24 of cluster c1 overlaps pod CIDR 10.1.0.128/25 of cluster c5"
        ),
        "{e}"
    );

    // Strict encryption on one side, off on the other.
    let mut spec = ClusterSpec::new("c6", 6, 1);
    spec.encryption = EncryptionPolicy {
        mode: EncryptionMode::Wireguard,
        strict: true,
        ..Default::default()
    };
    let c6 = cluster(root.path(), spec).await;
    enable(&dir, &c6).await;
    let e = run_fail(&dir, &["connect", "--cluster", "c1", "--destination", "c6"]).await;
    assert!(
        e.contains("cluster c6 enforces strict encryption but cluster c1 has encryption off")
            && e.contains("clustermesh encryption enable --cluster c1"),
        "{e}"
    );

    // An id already used by a cluster c1 is connected to.
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
        ],
    )
    .await;
    let c7 = cluster(root.path(), ClusterSpec::new("c7", 2, 1)).await;
    hand_written(&dir, "c7", 2, &c7.api_url(), &c7);
    let e = run_fail(&dir, &["connect", "--cluster", "c1", "--destination", "c7"]).await;
    assert!(
        e.contains("cluster c1 is already connected to cluster c2, which has the same cluster id 2 as cluster c7"),
        "{e}"
    );

    // A pod CIDR overlapping one of a cluster c1 already watches (c2).
    c2.register("n1", "10.2.0.0/24", "192.0.2.2").await;
    let c10 = cluster(root.path(), ClusterSpec::new("c10", 10, 1)).await;
    c10.register("n1", "10.2.0.0/16", "192.0.2.10").await;
    enable(&dir, &c10).await;
    let e = run_fail(
        &dir,
        &["connect", "--cluster", "c1", "--destination", "c10"],
    )
    .await;
    assert!(
        e.contains("cluster c1 is already connected to cluster c2, so: pod CIDR 10.2.0.0/16 of cluster c10 overlaps pod CIDR 10.2.0.0/24 of cluster c2"),
        "{e}"
    );

    // An unreachable apiserver.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    hand_written(&dir, "c8", 8, &format!("http://127.0.0.1:{port}"), &c7);
    let e = run_fail(&dir, &["connect", "--cluster", "c1", "--destination", "c8"]).await;
    assert!(
        e.contains(&format!(
            "cannot reach the apiserver of cluster c8 at http://127.0.0.1:{port}"
        )) && e.contains("check that it is running"),
        "{e}"
    );

    // Nothing but the one accepted connection was written anywhere.
    assert_eq!(c1.remote_files(0), vec!["c2"]);
    for c in [&c2, &c3, &c5, &c6, &c7, &c10] {
        assert!(c.remote_files(0).is_empty(), "{} got files", c.name);
    }

    // Usage errors exit 2; Kubernetes mode is refused in words.
    for args in [
        vec!["connect", "--cluster", "c1"],
        vec![
            "connect",
            "--cluster",
            "c1",
            "--destination",
            "c2",
            "--mode",
            "ring",
        ],
        vec!["status", "--timeout", "soon"],
        vec!["bogus"],
    ] {
        let o = cli(&dir, &args).await;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let e = run_fail(&dir, &["--context", "kind-east", "status"]).await;
    assert!(
        e.contains("Kubernetes mode (--context kind-east) is not implemented yet"),
        "{e}"
    );
}

#[tokio::test]
async fn every_subcommand_has_help_and_completions_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--help"],
        vec!["enable", "--help"],
        vec!["connect", "--help"],
        vec!["disconnect", "--help"],
        vec!["status", "--help"],
        vec!["encryption", "--help"],
        vec!["encryption", "status", "--help"],
        vec!["encryption", "enable", "--help"],
        vec!["encryption", "disable", "--help"],
        vec!["encryption", "strict", "--help"],
        vec!["encryption", "rotate-keys", "--help"],
        vec!["encryption", "audit", "--help"],
        vec!["service", "--help"],
        vec!["service", "list", "--help"],
        vec!["service", "show", "--help"],
        vec!["service", "create", "--help"],
        vec!["service", "delete", "--help"],
        vec!["service", "annotate", "--help"],
        vec!["completion", "--help"],
    ] {
        let out = run_ok(dir.path(), &args).await;
        assert!(out.contains("Usage: clustermesh"), "{args:?}: {out}");
    }
    for (shell, marker) in [
        ("bash", "_clustermesh()"),
        ("zsh", "#compdef clustermesh"),
        ("fish", "complete -c clustermesh"),
    ] {
        let out = run_ok(dir.path(), &["completion", shell]).await;
        assert!(out.contains(marker), "{shell}: {out}");
        assert!(
            out.contains("connect") && out.contains("rotate-keys"),
            "{shell}"
        );
    }
}
