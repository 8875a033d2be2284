//! docs/cli.md cannot rot: every command of its ```sh blocks runs, in
//! order, through `sh` against two real clusters (etcd, apiserver, agent),
//! with the page's variables set to their addresses, and must succeed.
//! Then the mesh is checked to be where the walkthrough leaves it.
#![allow(clippy::unwrap_used)]

mod cli_common;
use cli_common as common;

use std::time::Duration;

use common::*;

/// The commands of the ```sh blocks (continuation lines joined).
fn sh_commands(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut cur = String::new();
    for line in md.lines() {
        let t = line.trim_end();
        if t.starts_with("```") {
            in_sh = t == "```sh";
            continue;
        }
        if !in_sh || t.trim().is_empty() || t.trim_start().starts_with('#') {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_in_docs_cli_md_runs() {
    let md =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md")).unwrap();
    let cmds = sh_commands(&md);
    assert!(cmds.len() >= 15, "too few commands found: {cmds:#?}");
    for c in &cmds {
        assert!(
            c.starts_with("clustermesh "),
            "not a clustermesh command: {c}"
        );
    }
    // Every subcommand of the walkthrough's story is there.
    for needle in [
        "clustermesh enable",
        "clustermesh connect",
        "clustermesh status --wait",
        "-o json",
        "clustermesh service create",
        "clustermesh encryption strict on",
        "clustermesh disconnect",
    ] {
        assert!(
            cmds.iter().any(|c| c.contains(needle)),
            "{needle} missing from docs/cli.md"
        );
    }

    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("config");
    let east = cluster(root.path(), ClusterSpec::new("east", 1, 1)).await;
    let west = cluster(root.path(), ClusterSpec::new("west", 2, 1)).await;
    east.register("node-1", "10.1.0.0/24", "192.0.2.1").await;
    east.endpoint("node-1", "10.1.0.5").await;
    west.register("node-1", "10.2.0.0/24", "192.0.2.2").await;
    west.endpoint("node-1", "10.2.0.5").await;
    let cli = cli_bin();
    let bin_dir = cli.parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let vars = [
        ("EAST_API", east.api_url()),
        ("EAST_ETCD", east.etcd.endpoint()),
        (
            "EAST_NODE1_DIR",
            east.nodes[0].clusters_dir.display().to_string(),
        ),
        ("EAST_NODE1_STATUS", east.nodes[0].status.clone()),
        ("WEST_API", west.api_url()),
        ("WEST_ETCD", west.etcd.endpoint()),
        (
            "WEST_NODE1_DIR",
            west.nodes[0].clusters_dir.display().to_string(),
        ),
        ("WEST_NODE1_STATUS", west.nodes[0].status.clone()),
    ];
    for c in &cmds {
        let child = tokio::process::Command::new("sh")
            .args(["-c", c])
            .env("PATH", &path)
            .env("CLUSTERMESH_CONFIG_DIR", &dir)
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let o = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{c}: no end within 90 s"))
            .unwrap();
        println!("$ {c}\n{}", stdout(&o));
        assert!(
            o.status.success(),
            "docs/cli.md: `{c}` failed ({:?}):\n{}\n{}",
            o.status.code(),
            stdout(&o),
            stderr(&o)
        );
    }
    // Where the walkthrough ends: disconnected, one service left, no
    // encryption.
    assert!(east.remote_files(0).is_empty() && west.remote_files(0).is_empty());
    let v = run_json(&dir, &["service", "list"]).await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["cluster"], "east");
    let s = run_json(&dir, &["status"]).await;
    assert_eq!(s["healthy"], true);
    for c in s["clusters"].as_array().unwrap() {
        assert_eq!(c["encryption_policy"]["mode"], "none");
        assert_eq!(c["nodes"][0]["configured"], 0);
    }
}
