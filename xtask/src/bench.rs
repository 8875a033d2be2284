//! `cargo xtask bench`: every benchmark with real sizes, then
//! docs/benchmarks.md and docs/benchmarks.json rendered from what they
//! reported, with a description of the machine gathered here.
//!
//! Each benchmark prints its human-readable figures on stdout (kept
//! verbatim in the report) and, because this sets `CLUSTERMESH_BENCH_JSON`,
//! appends one JSON line per figure (`clustermesh_testkit::report`). The
//! benchmarks run in the release profile (`cargo bench`), one after the
//! other, so they do not compete for the machine.
//!
//! `--smoke` runs the tiny sizes of `cargo xtask test` instead (to try the
//! report), `--only a,b` a subset, `--out-dir` writes elsewhere than docs/.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

/// One benchmark: its target name, what it shows, its sizes.
pub struct Bench {
    pub name: &'static str,
    pub title: &'static str,
    pub about: &'static str,
    /// Arguments of the real run (`make bench`).
    pub full: &'static [&'static str],
    /// Arguments of the smoke run (`make test`): a few seconds.
    pub smoke: &'static [&'static str],
}

pub const BENCHES: &[Bench] = &[
    Bench {
        name: "throughput",
        title: "Datapath: pod-to-pod throughput and request/response latency",
        about: "Pod to pod across two nodes (network namespaces joined by a veth underlay), each path on its own pair of nodes, runs interleaved round-robin. Throughput: one iperf3 TCP stream. Latency: one TCP connection, 64-byte request answered by 64-byte response, round trips pooled over the rounds. Baselines: plain routing (kernel forwarding) and the kernel's classic VXLAN device; ours: the eBPF datapath in VXLAN, Geneve and direct-routing mode. Then IPv6 (`throughput-ipv6`): dual-stack pods over an IPv6-only underlay, IPv6 pod to pod (pod MTU 1430), baseline plain IPv6 routing, ours in each mode, interleaved the same way.",
        full: &["--runs", "7", "--seconds", "4", "--rr-iterations", "10000"],
        smoke: &["--runs", "1", "--seconds", "1", "--rr-iterations", "100"],
    },
    Bench {
        name: "wireguard",
        title: "Encryption: WireGuard throughput and request/response latency",
        about: "Node to node over a veth underlay (the encrypted hop of every pod-to-pod path), one iperf3 TCP stream and the same 64-byte request/response loop, interleaved rounds. Baselines: the plain underlay and Debian's wireguard-go on both ends; ours: clustermesh-wg (userspace, boringtun) on both ends. Throughput with TCP over IPv4 and over IPv6 inside the tunnel (both over an IPv4 underlay; plain: the underlay's IPv4 and IPv6 addresses), and ours with inner IPv6 over an IPv6 underlay; latency over IPv4.",
        full: &["--runs", "7", "--seconds", "4", "--rr-iterations", "10000"],
        smoke: &["--runs", "1", "--seconds", "1", "--rr-iterations", "100"],
    },
    Bench {
        name: "services",
        title: "Services: new connections per second through a frontend",
        about: "The whole product (two clusters, real etcds, apiservers and agent binaries, Geneve). New TCP connections per second from a client pod: through a service frontend (translated by the eBPF datapath) and straight to the same backend (baseline), local and remote backend, rounds interleaved.",
        full: &["--runs", "7", "--seconds", "3"],
        smoke: &["--runs", "1", "--seconds", "1"],
    },
    Bench {
        name: "policy",
        title: "Network policy: cost on the path, compile speed, propagation",
        about: "Pod to pod across two nodes (Geneve, the eBPF datapath), rounds interleaved: no policy (baseline) against a default-deny ingress policy of 1,000 compiled entries on the server pod (the client's allow among them): one iperf3 TCP stream and new TCP connections per second (goal >= 0.97 x for both). Compile + map update of 10,000 rules (parse, compile against 1,000 peer identities, prefixes, PolicyMap::update into the real pinned CM_POLICY) against plain inserts of the same prefixes. Propagation: a mesh-harness cluster of 4 nodes (real etcd, apiserver, agents), `clustermesh policy apply` of a changed policy 20 times, time from the command's start until each node's CM_POLICY_STATE has the new revision, p50/p99 over every node and change, against the command's own round trip.",
        full: &[
            "--runs",
            "5",
            "--seconds",
            "3",
            "--rules",
            "1000",
            "--compile-rules",
            "10000",
            "--nodes",
            "4",
            "--changes",
            "20",
        ],
        smoke: &[
            "--runs",
            "1",
            "--seconds",
            "1",
            "--rules",
            "50",
            "--compile-rules",
            "200",
            "--nodes",
            "2",
            "--changes",
            "2",
        ],
    },
    Bench {
        name: "flows",
        title: "Flow events: cost on the path, and a flood",
        about: "Pod to pod across two nodes (Geneve, the eBPF datapath), rounds interleaved, each case on its own pair of nodes: flow events off (baseline) against flow events on as the agent runs them by default (drops, audits, each forwarded flow's first packet then one aggregated event per 5 s), the agent's reader draining both ring buffers; one iperf3 TCP stream (goal >= 0.95 x). Then, with every packet an event, two iperf3 UDP floods of 64-byte datagrams: events read, events lost because the ring buffer was full (counted by the datapath, reported by the agent), the flow buffer's fill (bounded) and the resident memory each flood added (the second against the first: bounded, not growing with the flood).",
        full: &["--runs", "5", "--seconds", "3", "--buffer", "4096"],
        smoke: &["--runs", "1", "--seconds", "1", "--buffer", "64"],
    },
    Bench {
        name: "propagation",
        title: "Control plane: propagation latency across clusters",
        about: "Time from a change written into a remote cluster's etcd (the exported schema, as its apiserver writes it) until the entry is readable in the real pinned eBPF maps of a node of the local cluster (in-process Agent with the product's map reconcilers and the incremental merge; maps read back after each write of the map writers, no poller competing for the cores). Changes interleaved: endpoint added, global service backend changed, node added; each measured alone. Baseline: the same etcd put until a plain etcd watcher gets the event. Meshes of 2, 10 and 50 clusters in one run, every cluster starting with 40 nodes x 250 endpoints (10,000 endpoints a cluster: 20,000 in the mesh with 2 clusters, 500,000 with 50). The changes accumulate (with 2 clusters the one remote gains 1,000 endpoints and 1,000 nodes during the run; with 50 each remote about 20 of each). Goal: each kind's p99 at 50 clusters within 1.5 x of its p99 at 2 clusters, and below 50 ms.",
        full: &[
            "--changes",
            "1000",
            "--clusters",
            "2,10,50",
            "--nodes",
            "40",
            "--endpoints",
            "250",
        ],
        smoke: &[
            "--changes",
            "10",
            "--clusters",
            "2,3",
            "--nodes",
            "2",
            "--endpoints",
            "2",
        ],
    },
    Bench {
        name: "churn",
        title: "Control plane: churn across the mesh",
        about: "Modelled on Cilium's scale CI (mock clusters writing about 325 updates/s across the mesh): 10 clusters of real etcds, each prefilled with 40 nodes x 250 endpoints (100,000 in the mesh), and the in-process agent of a node of c1 writing the real pinned eBPF maps. For 60 s, 325 endpoint updates per second in all (added, identity changed, deleted), round-robin over the nine remote clusters. Propagation of each update from its etcd put until the product's IpCacheMap wrote CM_IPCACHE; baseline, same updates: a plain etcd watcher of the same etcd. Every 10 s: updates written and applied, in flight, the agent's event queue (depth, peak) and resident memory. Sync errors: updates never applied, refused entries, clusters in error, reconnects (goal 0).",
        full: &[
            "--clusters",
            "10",
            "--nodes",
            "40",
            "--endpoints",
            "250",
            "--rate",
            "325",
            "--seconds",
            "60",
            "--every",
            "10",
        ],
        smoke: &[
            "--clusters",
            "3",
            "--nodes",
            "2",
            "--endpoints",
            "2",
            "--rate",
            "50",
            "--seconds",
            "2",
            "--every",
            "1",
        ],
    },
    Bench {
        name: "bootstrap",
        title: "Control plane: agent bootstrap and memory at scale",
        about: "An agent connecting to many clusters (one real etcd process each, filled by a generator with the exported schema): time to full sync (goal within 3 x the baseline), resident memory growth per remote endpoint once synced (goal < 400 bytes; the leading product is at about 5 KB), ip-cache update rate. Baseline: plain prefix reads of every etcd, one after the other. The ip-cache target counts what it is given and holds nothing in the process, as the kernel map does; every other target is in memory (small). Size: 40 clusters x 100 nodes x 250 endpoints = 1,000,000 endpoints (975,000 remote), about a minute with the filling on this machine; the issue's 100 x 100 x 1,000 (10 M keys) does not fit it.",
        full: &["--clusters", "40", "--nodes", "100", "--endpoints", "250"],
        smoke: &["--clusters", "2", "--nodes", "2", "--endpoints", "5"],
    },
    Bench {
        name: "export",
        title: "Control plane: export into etcd",
        about: "clustermesh-apiserver against a real etcd: cold-start full export and ingest through the gRPC API in records/s (one AddEndpoint call at a time; then AddEndpoints batches of 1000, until the last call returned and until every endpoint is in the exported schema; goal >= 0.5 x the baseline), exported bytes per record and etcd database growth per record. Baseline: raw etcd puts of the same count and value size, 100 per transaction.",
        full: &["--endpoints", "10000", "--nodes", "100"],
        smoke: &["--endpoints", "200", "--nodes", "4"],
    },
];

pub struct Options {
    pub smoke: bool,
    pub only: Vec<String>,
    pub out_dir: PathBuf,
}

struct Ran {
    bench: &'static Bench,
    args: Vec<&'static str>,
    seconds: f64,
    ok: bool,
    stdout: String,
}

fn sh(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

/// CPU, cores, memory, kernel, OS, tools, date: gathered, not typed in.
fn machine() -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    vec![
        ("date (UTC)", sh("date", &["-u", "+%Y-%m-%d %H:%M"])),
        ("CPU model", model),
        ("logical CPUs", cores.to_string()),
        ("memory", format!("{:.1} GiB", mem_kib as f64 / 1048576.0)),
        ("kernel", sh("uname", &["-r"])),
        ("OS", os),
        (
            "virtualization",
            match sh("systemd-detect-virt", &[]) {
                s if s.is_empty() => "unknown".into(),
                s => s,
            },
        ),
        (
            "load average at start (1/5/15 min)",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("rustc", sh("rustc", &["--version"])),
        ("etcd", first_line(&sh("etcd", &["--version"]))),
        ("iperf3", first_line(&sh("iperf3", &["--version"]))),
        (
            "wireguard-go",
            first_line(&sh("wireguard-go", &["--version"])),
        ),
        ("commit", sh("git", &["rev-parse", "--short", "HEAD"])),
    ]
}

fn run_one(b: &'static Bench, smoke: bool, json: &Path) -> Ran {
    let args: Vec<&'static str> = if smoke { b.smoke } else { b.full }.to_vec();
    let mut cmd_args = vec!["bench", "--workspace", "--bench", b.name, "--"];
    cmd_args.extend(&args);
    eprintln!("+ cargo {}", cmd_args.join(" "));
    let t = Instant::now();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&cmd_args)
        .env(crate::REPORT_ENV, json)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    let seconds = t.elapsed().as_secs_f64();
    let (ok, stdout) = match out {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(e) => (false, format!("could not run cargo: {e}")),
    };
    print!("{stdout}");
    Ran {
        bench: b,
        args,
        seconds,
        ok,
        stdout,
    }
}

/// A figure shown with about four significant digits.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn table(figs: &[&serde_json::Value]) -> String {
    let mut s = String::new();
    let latency = figs.iter().any(|f| f["p99"].is_number());
    if latency {
        s.push_str("| case | unit | p50 | p99 | min..max | p50 ratio to baseline |\n| --- | --- | --- | --- | --- | --- |\n");
    } else {
        s.push_str("| case | unit | median | min..max | ratio to baseline |\n| --- | --- | --- | --- | --- |\n");
    }
    for f in figs {
        let v = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
        let ratios: Vec<String> = f["baselines"]
            .as_array()
            .map(|bs| {
                bs.iter()
                    .filter_map(|b| {
                        Some(format!(
                            "{} x {}",
                            num(b["ratio"].as_f64()?),
                            b["case"].as_str()?
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let spread = if v("min") == v("max") {
            "(one measurement)".to_owned()
        } else {
            format!("{}..{}", num(v("min")), num(v("max")))
        };
        let case = f["case"].as_str().unwrap_or_default();
        let unit = f["unit"].as_str().unwrap_or_default();
        if latency {
            let p99 = f["p99"].as_f64().map(num).unwrap_or_default();
            let _ = writeln!(
                s,
                "| {case} | {unit} | {} | {p99} | {spread} | {} |",
                num(v("median")),
                ratios.join("; ")
            );
        } else {
            let _ = writeln!(
                s,
                "| {case} | {unit} | {} | {spread} | {} |",
                num(v("median")),
                ratios.join("; ")
            );
        }
    }
    s
}

fn render(
    machine: &[(&'static str, String)],
    ran: &[Ran],
    figures: &[serde_json::Value],
    total: f64,
    smoke: bool,
) -> String {
    let mut s = String::new();
    s.push_str("# Benchmarks\n\n");
    let _ = writeln!(
        s,
        "Generated by `make bench` (`cargo xtask bench`{}): every benchmark run with the sizes shown, one after the other, in the release profile (`cargo bench`), each baseline measured in the same run as the figures compared with it. Do not edit by hand: the command rewrites this file and `docs/benchmarks.json` (the same figures, machine-readable). The whole run took {:.1} minutes; sizes are chosen to keep it well under 25 minutes on a 2-vCPU machine (the bootstrap section says what a larger size gave). Each benchmark also has a smoke run with tiny sizes in `make test`; the benchmarks themselves are not part of it. Earlier measurements and how they were read (what moved which figure) are in [benchmarks-notes.md](benchmarks-notes.md).\n",
        if smoke {
            " --smoke, tiny sizes: NOT representative"
        } else {
            ""
        },
        total / 60.0
    );
    s.push_str("## Machine\n\n| | |\n| --- | --- |\n");
    for (k, v) in machine {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s.push_str("\nThe machine is shared (another build may run at the same time): the spread columns show how much a figure moved between rounds; ratios are between figures measured in the same run, interleaved where the benchmark allows.\n\n");
    let goals = goals(figures);
    if !goals.is_empty() {
        s.push_str("## Goals\n\n| goal | measured | met |\n| --- | --- | --- |\n");
        for (goal, measured, met) in goals {
            let _ = writeln!(
                s,
                "| {goal} | {measured} | {} |",
                if met { "yes" } else { "no" }
            );
        }
        s.push('\n');
    }
    s.push_str(
        "## Summary\n\n| benchmark | status | took | command |\n| --- | --- | --- | --- |\n",
    );
    for r in ran {
        let _ = writeln!(
            s,
            "| [{}](#{}) | {} | {:.0} s | `cargo bench --workspace --bench {} -- {}` |",
            r.bench.name,
            anchor(r.bench.title),
            if r.ok { "ok" } else { "FAILED" },
            r.seconds,
            r.bench.name,
            r.args.join(" ")
        );
    }
    s.push('\n');
    for r in ran {
        let _ = writeln!(s, "## {}\n\n{}\n", r.bench.title, r.bench.about);
        let _ = writeln!(
            s,
            "Command: `cargo bench --workspace --bench {} -- {}` (as root; {:.0} s).\n",
            r.bench.name,
            r.args.join(" "),
            r.seconds
        );
        let mut groups: Vec<&str> = Vec::new();
        for f in figures {
            let name = f["bench"].as_str().unwrap_or_default();
            let owner = match name {
                "request-response" | "throughput-ipv6" => "throughput",
                "wireguard-request-response" => "wireguard",
                n => n,
            };
            if owner == r.bench.name && !groups.contains(&name) {
                groups.push(name);
            }
        }
        for g in groups {
            let figs: Vec<&serde_json::Value> = figures
                .iter()
                .filter(|f| f["bench"].as_str() == Some(g))
                .collect();
            if g != r.bench.name {
                let _ = writeln!(s, "{g}:\n");
            }
            s.push_str(&table(&figs));
            s.push('\n');
        }
        if !r.ok {
            s.push_str("**This benchmark failed in this run** (see its output).\n\n");
        }
        let _ = writeln!(s, "Output:\n\n```\n{}\n```\n", r.stdout.trim_end());
    }
    s
}

/// The project's stated goals, checked against this run's figures:
/// (goal, what was measured, met).
fn goals(figures: &[serde_json::Value]) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    let by = |bench: &str, case: &str| {
        figures
            .iter()
            .find(|f| f["bench"].as_str() == Some(bench) && f["case"].as_str() == Some(case))
    };
    for case in [
        "eBPF VXLAN (ours)",
        "eBPF Geneve (ours)",
        "eBPF direct routing (ours)",
    ] {
        if let Some(r) = by("throughput", case).and_then(|f| f["ratio"].as_f64()) {
            out.push((
                format!("{case}: throughput >= 0.95 x plain routing"),
                format!("{} x", num(r)),
                r >= 0.95,
            ));
        }
        let case6 = format!("IPv6 {case}");
        if let Some(r) = by("throughput-ipv6", &case6).and_then(|f| f["ratio"].as_f64()) {
            out.push((
                format!("{case6}: throughput >= 0.95 x plain IPv6 routing"),
                format!("{} x", num(r)),
                r >= 0.95,
            ));
        }
    }
    for what in ["throughput", "new connections"] {
        let case = format!("{what}: 1,000-rule policy");
        if let Some(r) = by("policy", &case).and_then(|f| f["ratio"].as_f64()) {
            out.push((
                format!("{case} >= 0.97 x no policy"),
                format!("{} x", num(r)),
                r >= 0.97,
            ));
        }
    }
    if let Some(r) = by("flows", "throughput: flow events on").and_then(|f| f["ratio"].as_f64()) {
        out.push((
            "throughput with flow events on >= 0.95 x off".into(),
            format!("{} x", num(r)),
            r >= 0.95,
        ));
    }
    if let Some(r) =
        by("wireguard", "clustermesh-wg both ends (ours)").and_then(|f| f["ratio"].as_f64())
    {
        out.push((
            "WireGuard throughput >= 5 x wireguard-go".into(),
            format!("{} x", num(r)),
            r >= 5.0,
        ));
    }
    out.extend(propagation_goals(figures));
    if let Some(e) = by("churn", "sync errors").and_then(|f| f["median"].as_f64()) {
        out.push(("churn: 0 sync errors".into(), num(e), e == 0.0));
    }
    if let Some(r) = by("churn", "updates/s sustained").and_then(|f| f["ratio"].as_f64()) {
        out.push((
            "churn: updates/s sustained >= 0.95 x asked".into(),
            format!("{} x", num(r)),
            r >= 0.95,
        ));
    }
    let batch = "ingest through AddEndpoints batches of 1000, exported";
    if let Some(r) = by("export", batch).and_then(|f| f["ratio"].as_f64()) {
        out.push((
            "export ingest through the batch RPC >= 0.5 x raw etcd puts".into(),
            format!("{} x", num(r)),
            r >= 0.5,
        ));
    }
    if let Some(b) = figures
        .iter()
        .find(|f| {
            f["bench"].as_str() == Some("bootstrap")
                && f["case"]
                    .as_str()
                    .is_some_and(|c| c.contains("memory per remote endpoint"))
        })
        .and_then(|f| f["median"].as_f64())
    {
        out.push((
            "resident memory < 400 bytes per remote endpoint".into(),
            format!("{} bytes", num(b)),
            b < 400.0,
        ));
    }
    if let Some(r) = by("bootstrap", "agent: time to full sync").and_then(|f| f["ratio"].as_f64()) {
        out.push((
            "bootstrap: full sync within 3 x plain etcd reads".into(),
            format!("{} x", num(r)),
            r <= 3.0,
        ));
    }
    out
}

/// Propagation flat in mesh size: each kind's p99 in the largest mesh of
/// the run against the smallest (<= 1.5 x) and below 50 ms.
fn propagation_goals(figures: &[serde_json::Value]) -> Vec<(String, String, bool)> {
    // case "{n} clusters: {kind}" -> (kind, n, p99), the changes only.
    let mut by_kind: std::collections::BTreeMap<String, Vec<(u64, f64)>> = Default::default();
    for f in figures.iter().filter(|f| {
        f["bench"].as_str() == Some("propagation")
            && f["baselines"].as_array().is_some_and(|b| !b.is_empty())
    }) {
        let case = f["case"].as_str().unwrap_or_default();
        let Some((n, kind)) = case.split_once(" clusters: ") else {
            continue;
        };
        if let (Ok(n), Some(p99)) = (n.parse::<u64>(), f["p99"].as_f64()) {
            by_kind.entry(kind.to_owned()).or_default().push((n, p99));
        }
    }
    let mut out = Vec::new();
    for (kind, mut v) in by_kind {
        v.sort_by_key(|(n, _)| *n);
        let (Some((small, base)), Some((large, p99))) = (v.first().copied(), v.last().copied())
        else {
            continue;
        };
        if large > small {
            let r = p99 / base;
            out.push((
                format!("propagation p99 at {large} clusters <= 1.5 x {small} clusters: {kind}"),
                format!("{} x", num(r)),
                r <= 1.5,
            ));
        }
        out.push((
            format!("propagation p99 < 50 ms at {large} clusters: {kind}"),
            format!("{} ms", num(p99)),
            p99 < 50.0,
        ));
    }
    out
}

fn anchor(title: &str) -> String {
    title
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let machine = machine();
    let selected: Vec<&'static Bench> = BENCHES
        .iter()
        .filter(|b| opts.only.is_empty() || opts.only.iter().any(|o| o == b.name))
        .collect();
    if selected.is_empty() {
        bail!("--only names no benchmark");
    }
    let tmp = std::env::temp_dir().join(format!("clustermesh-bench-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // Build everything first, so no benchmark's time includes a build.
    let mut build = vec!["bench", "--workspace", "--no-run"];
    for b in &selected {
        build.extend(["--bench", b.name]);
    }
    crate::cargo(&build, &[])?;
    // The mesh benchmarks (policy, services) run the product's release
    // binaries as child processes.
    crate::cargo(&["build", "--release", "--workspace", "--bins"], &[])?;
    let mut ran = Vec::new();
    for b in selected {
        ran.push(run_one(b, opts.smoke, &tmp));
    }
    let figures: Vec<serde_json::Value> = std::fs::read_to_string(&tmp)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let _ = std::fs::remove_file(&tmp);
    let total = t0.elapsed().as_secs_f64();
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let md = render(&machine, &ran, &figures, total, opts.smoke);
    let md_path = opts.out_dir.join("benchmarks.md");
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    let json = serde_json::json!({
        "generated_by": "cargo xtask bench",
        "smoke": opts.smoke,
        "total_seconds": total,
        "machine": machine.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str()))).collect::<serde_json::Map<_, _>>(),
        "runs": ran.iter().map(|r| serde_json::json!({
            "bench": r.bench.name,
            "command": format!("cargo bench --workspace --bench {} -- {}", r.bench.name, r.args.join(" ")),
            "ok": r.ok,
            "seconds": r.seconds,
            "stdout": r.stdout,
        })).collect::<Vec<_>>(),
        "figures": figures,
    });
    let json_path = opts.out_dir.join("benchmarks.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "wrote {} and {} ({:.1} min)",
        md_path.display(),
        json_path.display(),
        total / 60.0
    );
    let failed: Vec<&str> = ran.iter().filter(|r| !r.ok).map(|r| r.bench.name).collect();
    if !failed.is_empty() {
        bail!("benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The smoke runs of `cargo xtask test`: each benchmark with tiny sizes,
/// test profile (the suite's build).
pub fn smoke(env: &[(&str, &str)]) -> anyhow::Result<()> {
    for b in BENCHES {
        let mut args = vec!["test", "--workspace", "--bench", b.name, "--"];
        args.extend_from_slice(b.smoke);
        crate::cargo(&args, env)?;
    }
    Ok(())
}
