//! Privileged: the node agent is killed with SIGKILL and started again while
//! a pod pings a pod of another cluster every 10 ms over the eBPF VXLAN
//! datapath. The programs' TCX links and the maps are pinned in bpffs, so
//! traffic does not depend on the agent process; the restarted agent adopts
//! the pinned links (atomic program swap) instead of attaching again.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clustermesh_testkit::netns::sweep_stale;
use e2e::{
    require_root,
    topo::{Node, underlay},
};
use node_agent::datapath::attached_programs;
use tunnel_common::{Direction, Verdict};

fn agent_binary() -> std::path::PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/node-agent
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("node-agent");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        bin.display()
    );
    bin
}

/// Starts the agent for node `n`; returns once it printed that both
/// programs are attached, with how (New or Adopted).
fn start_agent(n: &Node) -> (Child, Vec<String>) {
    let mut child = Command::new(agent_binary())
        .args([
            "--netns",
            n.ns.name(),
            "--endpoint-iface",
            "lxc0",
            "--overlay-iface",
            "cm_vxlan",
        ])
        .arg("--bpf-pin-dir")
        .arg(n.pins.path())
        .args(["--report-every", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    // Read its output on a thread, so a silent agent fails the test instead
    // of hanging it; the thread keeps draining the reports afterwards.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                // Nobody listens any more: keep draining.
            }
        }
    });
    let mut lines = Vec::new();
    while lines.len() < 2 {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.starts_with("attached") => lines.push(l.trim().to_owned()),
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("agent did not report both attachments ({e}): {lines:?}");
            }
        }
    }
    (child, lines)
}

fn programs_on(n: &Node, iface: &str) -> Vec<String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _in = n.ns.enter().unwrap();
            attached_programs(iface).unwrap()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn agent_killed_and_restarted_under_ping_loses_nothing() {
    require_root!();
    sweep_stale();
    let a = Node::new(1).unwrap();
    let b = Node::new(2).unwrap();
    let (ula, ulb) = underlay(&a, &b).unwrap();
    // Node B's datapath stays up for the whole test.
    let mut dpb = b.datapath(true).unwrap();
    b.connect(&mut dpb, &a, ula).unwrap();

    // Node A: the real agent binary attaches and pins the programs.
    let (mut agent, how) = start_agent(&a);
    assert!(how.iter().all(|l| l.ends_with("(New)")), "{how:?}");
    // The maps are programmed through their pins by a second handle, as the
    // agent's reconcilers do.
    let mut dpa = a.datapath(false).unwrap();
    a.connect(&mut dpa, &b, ulb).unwrap();

    const PINGS: u32 = 400; // 4 s at 10 ms
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            a.pod.name(),
            "ping",
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
        ])
        .arg(b.pod_ip.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tunnelled = |dp: &node_agent::datapath::Datapath| {
        dp.counter(Direction::Egress, Verdict::Tunnel)
            .unwrap()
            .packets
    };
    let wait_more = |dp: &node_agent::datapath::Datapath, n: u64, what: &str| {
        let start = tunnelled(dp);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tunnelled(dp) < start + n {
            assert!(Instant::now() < deadline, "traffic stalled: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_more(&dpa, 50, "before the kill");

    // SIGKILL: no cleanup of any kind.
    agent.kill().unwrap();
    agent.wait().unwrap();
    wait_more(&dpa, 50, "while the agent is dead");

    let (mut agent, how) = start_agent(&a);
    assert!(
        how.iter().all(|l| l.ends_with("(Adopted)")),
        "restart must adopt the pinned links: {how:?}"
    );
    wait_more(&dpa, 50, "after the restart");

    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    eprintln!("agent kill -9 + restart under 10 ms ping: {summary}");
    assert!(
        summary.starts_with(&format!("{PINGS} packets transmitted, {PINGS} received")),
        "lost pings across the agent restart: {summary}"
    );
    // Exactly one program per hook: adoption swapped, it did not add.
    assert_eq!(programs_on(&a, "lxc0"), vec!["from_endpoint".to_owned()]);
    assert_eq!(programs_on(&a, "cm_vxlan"), vec!["from_overlay".to_owned()]);
    // The maps still hold what was programmed: B saw A's identity all along.
    assert_eq!(dpb.source_identity(a.pod_ip).unwrap(), Some(a.identity));

    agent.kill().unwrap();
    agent.wait().unwrap();
}
