//! The local multi-cluster mesh: N clusters x M nodes x K pods in network
//! namespaces on this machine, made of the product's real parts, described
//! by a topology file that `down` (and any other tool) works from alone.
//!
//! Per cluster `cI` (id I): the CLI's `enable` creates its CA and
//! certificates; a real etcd serves TLS with client-certificate auth; a
//! `clustermesh-apiserver` exports into it. Per node `cI-nJ`: a namespace
//! with an underlay veth `ul0` (192.168.I.J/16) on a shared fabric (a bridge
//! in the `<prefix>-fabric` namespace: every node of every cluster reaches
//! every other, like routable node IPs across VPCs), an external-mode VXLAN
//! device, pod CIDR 10.I.J.0/24, and a `node-agent` (eBPF datapath,
//! WireGuard device when encryption is on). Per pod: a namespace attached by
//! the CNI plugin binary exactly as a container runtime calls it, running a
//! responder that answers `cI/node-J/web-K` on TCP and UDP 8080. Then
//! `clustermesh connect --mode mesh --wait` connects every cluster to every
//! other, and `clustermesh service create` declares the global service
//! `default/web` (10.96.0.10:80 and/or [fd00:96::10]:80 by the IP family
//! -> 8080, TCP and UDP) in every cluster, its backends the first pod of
//! each node (in each family it has).
//!
//! Everything created (namespaces, processes, bpffs pin directories, the
//! state directory) is recorded in `<state-dir>/topology.json` as it is
//! created, so `down` removes it all, also after a failed `up`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The service every cluster declares: its IPv4 frontend (`--ip-family
/// ipv4` and `dual`)...
pub const SERVICE_FRONTEND: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// ... and its IPv6 frontend (`ipv6` and `dual`: one service with both).
pub const SERVICE_FRONTEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
pub const SERVICE_PORT: u16 = 80;
/// The port every pod's responder listens on (TCP and UDP).
pub const POD_PORT: u16 = 8080;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    None,
    Wireguard,
    Strict,
}

impl std::str::FromStr for Encryption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "wireguard" => Ok(Self::Wireguard),
            "strict" => Ok(Self::Strict),
            _ => Err(format!("{s:?}: expected none, wireguard or strict")),
        }
    }
}

/// The address families of pods and underlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// IPv4 pods over an IPv4 underlay.
    #[default]
    Ipv4,
    /// IPv6 pods over an IPv6 underlay (no IPv4 anywhere on the data path).
    Ipv6,
    /// Dual-stack pods over a dual-stack underlay: each family reaches a
    /// node over its own underlay address; WireGuard peers over IPv4.
    Dual,
}

impl IpFamily {
    pub fn v4(self) -> bool {
        self != Self::Ipv6
    }
    pub fn v6(self) -> bool {
        self != Self::Ipv4
    }
}

impl std::str::FromStr for IpFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ipv4" => Ok(Self::Ipv4),
            "ipv6" => Ok(Self::Ipv6),
            "dual" => Ok(Self::Dual),
            _ => Err(format!("{s:?}: expected ipv4, ipv6 or dual")),
        }
    }
}

/// A node's IPv6 underlay address: `fd00:192:168::<c>:<n>`.
pub fn underlay6(c: u8, n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0, 0, 0, c.into(), n.into())
}

/// Cluster `c`'s IPv6 pod range `fd00:10:<c>::/48`; node `n`'s is
/// `fd00:10:<c>:<n>::/64`.
pub fn pod_range6(c: u8) -> String {
    format!("fd00:10:{c}::/48")
}

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct Options {
    pub clusters: u8,
    pub nodes: u8,
    pub pods: u8,
    /// vxlan, geneve or direct.
    pub tunnel: String,
    pub encryption: Encryption,
    /// Pod and underlay address families.
    pub ip_family: IpFamily,
    pub state_dir: PathBuf,
    /// Prefix of every namespace, pin directory and device name.
    pub prefix: String,
    /// Directory holding the product's binaries.
    pub bin_dir: PathBuf,
    /// The apiservers' `--lease-ttl` (seconds; None: their default): how
    /// long a stopped apiserver's exported state outlives it.
    pub lease_ttl: Option<u64>,
    /// The agents' `--stale-ttl` (seconds; None: their default, 300): how
    /// long an unreachable cluster's last state is kept.
    pub stale_ttl: Option<u64>,
}

impl Options {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=9).contains(&self.clusters) {
            bail!("--clusters {}: between 1 and 9", self.clusters);
        }
        if !(1..=9).contains(&self.nodes) {
            bail!("--nodes {}: between 1 and 9", self.nodes);
        }
        if !(1..=9).contains(&self.pods) {
            bail!("--pods {}: between 1 and 9", self.pods);
        }
        if !["vxlan", "geneve", "direct"].contains(&self.tunnel.as_str()) {
            bail!("--tunnel {}: vxlan, geneve or direct", self.tunnel);
        }
        if self.prefix.is_empty()
            || self.prefix.len() > 6
            || !self.prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            bail!(
                "--prefix {:?}: 1 to 6 letters or digits (it starts device names)",
                self.prefix
            );
        }
        for b in [
            "node-agent",
            "clustermesh-apiserver",
            "clustermesh-cni",
            "clustermesh",
            "clustermesh-wg",
        ] {
            if !self.bin_dir.join(b).exists() {
                bail!(
                    "{} is missing: build the workspace first (cargo build --workspace)",
                    self.bin_dir.join(b).display()
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    pub role: String,
    pub pid: u32,
    pub log: PathBuf,
    /// Program and arguments, to start it again ([`restart`]).
    #[serde(default)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Etcd {
    pub endpoints: Vec<String>,
    pub pid: u32,
    pub data_dir: PathBuf,
    /// The cluster's CA (it signed etcd's server certificate).
    pub ca_file: PathBuf,
    /// Admin client credentials (CN root).
    pub admin_cert_file: PathBuf,
    pub admin_key_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Apiserver {
    /// gRPC address (http).
    pub address: String,
    pub metrics: String,
    pub pid: u32,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub id: u8,
    pub etcd: Etcd,
    pub apiserver: Apiserver,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agent {
    /// `GET /status` (JSON) and `/metrics`.
    pub status: String,
    /// The flow API (`--flows-listen`, gRPC over mutual TLS).
    #[serde(default)]
    pub flows: String,
    pub pid: u32,
    pub log: PathBuf,
    pub audit_log: PathBuf,
    pub clusters_dir: PathBuf,
    pub endpoint_dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub cluster: String,
    pub netns: String,
    pub underlay_iface: String,
    /// The node's IPv4 underlay address (none: `--ip-family ipv6`).
    #[serde(default)]
    pub underlay_ip: Option<Ipv4Addr>,
    /// The node's IPv6 underlay address (`--ip-family ipv6` or `dual`).
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// The node's IPv4 pod CIDR.
    #[serde(default)]
    pub pod_cidr: Option<String>,
    /// The node's IPv6 pod CIDR.
    #[serde(default)]
    pub pod_cidr6: Option<String>,
    pub wireguard_iface: Option<String>,
    pub agent: Agent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub cluster: String,
    pub node: String,
    pub netns: String,
    /// The pod's IPv4 address (none: `--ip-family ipv6`).
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address (`--ip-family ipv6` or `dual`).
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// What its responder answers on TCP and UDP 8080.
    pub answer: String,
}

impl Pod {
    /// Its addresses, IPv4 first.
    pub fn addrs(&self) -> Vec<IpAddr> {
        self.ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Service {
    pub cluster: String,
    pub name: String,
    /// The IPv4 frontend (empty with `--ip-family ipv6`).
    #[serde(default)]
    pub frontend: String,
    /// The IPv6 frontend (`--ip-family ipv6` or `dual`).
    #[serde(default)]
    pub frontend6: Option<Ipv6Addr>,
    pub ports: Vec<String>,
    /// The IPv4 backends.
    #[serde(default)]
    pub backends: Vec<Ipv4Addr>,
    /// The IPv6 backends.
    #[serde(default)]
    pub backends6: Vec<Ipv6Addr>,
    pub global: bool,
    pub affinity: String,
}

/// `<state-dir>/topology.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Topology {
    pub version: u32,
    pub state_dir: PathBuf,
    pub prefix: String,
    pub tunnel: String,
    pub encryption: Option<Encryption>,
    #[serde(default)]
    pub ip_family: IpFamily,
    /// `clustermesh --config-dir` of this mesh.
    pub cli_config_dir: PathBuf,
    pub clusters: Vec<Cluster>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// Every namespace created, in order (down removes them in reverse).
    pub namespaces: Vec<String>,
    pub pin_dirs: Vec<PathBuf>,
    /// Every process started (down stops them in reverse).
    pub processes: Vec<Process>,
    /// The Prometheus server scraping the mesh ([`crate::prometheus`]).
    #[serde(default)]
    pub prometheus: Option<crate::prometheus::Prometheus>,
}

impl Topology {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("topology.json")
    }

    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let p = Self::path(state_dir);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let p = Self::path(&self.state_dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub fn pods_of(&self, cluster: &str) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(move |p| p.cluster == cluster)
    }

    /// `clustermesh` with this mesh's config dir.
    pub fn cli(&self, bin_dir: &Path) -> Command {
        let mut c = Command::new(bin_dir.join("clustermesh"));
        c.arg("--config-dir").arg(&self.cli_config_dir);
        c
    }
}

// ---- small process and namespace helpers ---------------------------------

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// `ip netns exec <ns> <args>`.
pub fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// A free loopback port below the ephemeral range (32768 and up): a port
/// the kernel hands out for binding 0 can be taken by any outgoing
/// connection before the process it is meant for binds it.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // One seed per process, so the ports it hands out walk a permutation
    // of the range (7919 is prime to 12000): a port handed out is never
    // handed out again before it is bound (ports are taken at `enable` and
    // bound later by the agents). A seed per call made repeats likely
    // across a mesh's thirty-odd ports.
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
    }) % 12000;
    for _ in 0..1000 {
        let n = NEXT.fetch_add(7919, Ordering::Relaxed) % 12000;
        let port = 20000 + ((n + seed) % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between 20000 and 32000")
}

/// Starts a detached process (its own process group, so a Ctrl-C of the
/// caller does not reach it), output to `log`.
fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt as _;
    let f = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    Ok(child.id())
}

fn cmdline(cmd: &Command) -> Vec<String> {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// Starts `cmd` detached and records it in the topology as `role`.
pub(crate) fn start(
    t: &mut Topology,
    role: String,
    cmd: &mut Command,
    log: &Path,
) -> anyhow::Result<u32> {
    let pid = spawn(cmd, log)?;
    t.processes.push(Process {
        role,
        pid,
        log: log.to_owned(),
        cmd: cmdline(cmd),
    });
    t.save()?;
    Ok(pid)
}

/// Kills the process `role` (SIGKILL) and waits until it is gone.
pub fn kill(t: &Topology, role: &str) -> anyhow::Result<()> {
    let p = t
        .processes
        .iter()
        .find(|p| p.role == role)
        .with_context(|| format!("no process {role:?} in the topology"))?;
    signal(p.pid, libc::SIGKILL);
    wait_for(&format!("{role} to exit"), Duration::from_secs(10), || {
        !alive(p.pid)
    })
}

/// Starts the process `role` again with the same command (after [`kill`]
/// or a crash), appending to its log; every pid field naming the old
/// process is updated and the topology saved.
pub fn restart(t: &mut Topology, role: &str) -> anyhow::Result<u32> {
    let i = t
        .processes
        .iter()
        .position(|p| p.role == role)
        .with_context(|| format!("no process {role:?} in the topology"))?;
    let old = t.processes[i].clone();
    if alive(old.pid) {
        bail!("{role} (pid {}) is still running", old.pid);
    }
    let (prog, args) = old.cmd.split_first().context("no command recorded")?;
    let mut cmd = Command::new(prog);
    cmd.args(args).env("RUST_LOG", "info");
    let pid = spawn(&mut cmd, &old.log)?;
    t.processes[i].pid = pid;
    for c in &mut t.clusters {
        if c.etcd.pid == old.pid {
            c.etcd.pid = pid;
        }
        if c.apiserver.pid == old.pid {
            c.apiserver.pid = pid;
        }
    }
    for n in &mut t.nodes {
        if n.agent.pid == old.pid {
            n.agent.pid = pid;
            let pid_file = n.agent.clusters_dir.with_file_name("agent.pid");
            std::fs::write(pid_file, pid.to_string())?;
        }
    }
    t.save()?;
    Ok(pid)
}

/// Sends `sig` to the process `role`; its pid.
pub fn signal_role(t: &Topology, role: &str, sig: i32) -> anyhow::Result<u32> {
    let p = t
        .processes
        .iter()
        .find(|p| p.role == role)
        .with_context(|| format!("no process {role:?} in the topology"))?;
    signal(p.pid, sig);
    Ok(p.pid)
}

/// Whether `pid` runs (not a zombie).
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks the process exists.
    let exists = unsafe { libc::kill(pid as i32, 0) == 0 };
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Waits for `cond`, up to `limit`; the error names `what`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn log_has(log: &Path, needle: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|s| s.contains(needle))
}

/// What a failed process's log says: its error and panic lines (before any
/// backtrace), else its last lines.
fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = s
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("Error:") || l.contains("panicked"))
        .take(10)
        .collect();
    if !errors.is_empty() {
        return errors.join("\n");
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs `f` on a thread moved into namespace `ns` (sockets it creates
/// belong there).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    Ok(clustermesh_api::netns::run_in_named(Some(ns), f)?)
}

/// The responder of a pod (`mesh serve`): answers `answer` to every TCP
/// connection and UDP datagram on `port`, forever.
pub fn serve(netns: &str, answer: &str, port: u16) -> anyhow::Result<()> {
    // This process serves only this namespace: its main thread moves in.
    clustermesh_api::netns::enter(&clustermesh_api::netns::open_named(netns)?)?;
    // Dual-stack sockets: IPv4 clients arrive as v4-mapped IPv6.
    let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let tcp = TcpListener::bind(any)?;
    let udp = UdpSocket::bind(any)?;
    let a = answer.as_bytes().to_vec();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&a, from);
        }
    });
    for mut c in tcp.incoming().flatten() {
        let _ = c.write_all(answer.as_bytes());
    }
    Ok(())
}

/// One TCP request: the answer read to the end.
pub fn ask(to: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

// ---- up ----------------------------------------------------------------

/// Brings the mesh up (removing a previous one in the same state directory
/// first). On failure everything created so far is removed, unless `keep`.
pub fn up(o: &Options, keep: bool) -> anyhow::Result<Topology> {
    o.validate()?;
    if Topology::path(&o.state_dir).exists() {
        let old = Topology::load(&o.state_dir)?;
        eprintln!(
            "mesh: removing the previous mesh in {}",
            o.state_dir.display()
        );
        down(&old)?;
    }
    std::fs::create_dir_all(o.state_dir.join("logs"))?;
    let state_dir = std::fs::canonicalize(&o.state_dir)?;
    let mut t = Topology {
        version: 1,
        state_dir: state_dir.clone(),
        prefix: o.prefix.clone(),
        tunnel: o.tunnel.clone(),
        encryption: Some(o.encryption),
        ip_family: o.ip_family,
        cli_config_dir: state_dir.join("cli"),
        ..Default::default()
    };
    t.save()?;
    match build(o, &mut t) {
        Ok(()) => Ok(t),
        Err(e) => {
            let _ = t.save();
            if !keep {
                eprintln!("mesh: up failed; removing what it created");
                let _ = down(&t);
            }
            Err(e)
        }
    }
}

fn build(o: &Options, t: &mut Topology) -> anyhow::Result<()> {
    let s = t.state_dir.clone();
    let logs = s.join("logs");
    let bin = |b: &str| o.bin_dir.join(b);
    // VXLAN and Geneve add 50 bytes over IPv4, 70 over IPv6; WireGuard 60
    // over IPv4, 80 over IPv6 (1420 + 80 = the underlay's 1500).
    let mtu = match (o.encryption, o.ip_family.v6()) {
        (Encryption::None, false) => 1450,
        (Encryption::None, true) => 1430,
        _ => 1420,
    };

    // The fabric: one bridge every node's underlay plugs into.
    let fabric = format!("{}-fabric", o.prefix);
    ip(&["netns", "add", &fabric])?;
    t.namespaces.push(fabric.clone());
    t.save()?;
    in_ns(&fabric, &["ip", "link", "add", "br0", "type", "bridge"])?;
    in_ns(&fabric, &["ip", "link", "set", "br0", "up"])?;

    // Per cluster: certificates, etcd, apiserver.
    let mut node_ports: BTreeMap<(u8, u8), u16> = BTreeMap::new();
    let mut flow_ports: BTreeMap<(u8, u8), u16> = BTreeMap::new();
    for c in 1..=o.clusters {
        let name = format!("c{c}");
        let (etcd_port, peer_port, grpc, metrics) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let etcd_ep = format!("https://127.0.0.1:{etcd_port}");
        let mut enable = t.cli(&o.bin_dir);
        enable.args([
            "enable",
            "--cluster",
            &name,
            "--id",
            &c.to_string(),
            "--apiserver",
            &format!("https://127.0.0.1:{grpc}"),
            "--etcd-endpoints",
            &etcd_ep,
            // The cluster's declared pod range: connect writes it into the
            // other clusters' files (admission, strict mode).
            "--pod-cidr-range",
            &declared_ranges(o.ip_family, c).join(","),
        ]);
        for n in 1..=o.nodes {
            let port = free_port()?;
            node_ports.insert((c, n), port);
            let fport = free_port()?;
            flow_ports.insert((c, n), fport);
            let dir = s.join(format!("nodes/{name}-n{n}"));
            enable.args([
                "--node",
                &format!(
                    "node-{n},clusters-dir={},status=127.0.0.1:{port},flows=127.0.0.1:{fport},audit-log={},pid-file={}",
                    dir.join("clusters").display(),
                    dir.join("audit.jsonl").display(),
                    dir.join("agent.pid").display()
                ),
            ]);
        }
        run(&mut enable)?;
        let pki = t.cli_config_dir.join("pki").join(&name);
        let data_dir = s.join(format!("etcd-{name}"));
        let log = logs.join(format!("etcd-{name}.log"));
        let peer = format!("http://127.0.0.1:{peer_port}");
        let pid = start(
            t,
            format!("etcd {name}"),
            Command::new("etcd")
                .args(["--name", &name, "--data-dir"])
                .arg(&data_dir)
                .args(["--listen-client-urls", &etcd_ep])
                .args(["--advertise-client-urls", &etcd_ep])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("{name}={peer}")])
                .arg("--cert-file")
                .arg(pki.join("etcd-server.pem"))
                .arg("--key-file")
                .arg(pki.join("etcd-server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(pki.join("ca.pem"))
                .args(["--client-cert-auth", "--log-level", "warn"]),
            &log,
        )?;

        let health = || {
            Command::new("etcdctl")
                .args(["--endpoints", &etcd_ep, "--cacert"])
                .arg(pki.join("ca.pem"))
                .arg("--cert")
                .arg(pki.join("admin.pem"))
                .arg("--key")
                .arg(pki.join("admin-key.pem"))
                .args(["endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        wait_for(
            &format!("etcd of {name} ({})", log.display()),
            Duration::from_secs(20),
            health,
        )?;
        let alog = logs.join(format!("apiserver-{name}.log"));
        let mut api = Command::new(bin("clustermesh-apiserver"));
        api.args(["--cluster-name", &name, "--cluster-id", &c.to_string()])
            .args(["--etcd-endpoints", &etcd_ep, "--etcd-ca"])
            .arg(pki.join("ca.pem"))
            .arg("--etcd-cert")
            .arg(pki.join("apiserver.pem"))
            .arg("--etcd-key")
            .arg(pki.join("apiserver-key.pem"))
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            // The gRPC API with mutual TLS (enable's server certificate;
            // callers: the CLI's admin and each node's certificate).
            .arg("--tls-cert")
            .arg(pki.join("apiserver-server.pem"))
            .arg("--tls-key")
            .arg(pki.join("apiserver-server-key.pem"))
            .arg("--tls-client-ca")
            .arg(pki.join("ca.pem"))
            .arg("--audit-log")
            .arg(logs.join(format!("apiserver-audit-{name}.jsonl")))
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")]);
        match o.encryption {
            Encryption::None => {}
            Encryption::Wireguard => {
                api.args(["--encryption", "wireguard"]);
            }
            Encryption::Strict => {
                api.args(["--encryption", "wireguard", "--encryption-strict"]);
            }
        }
        if let Some(ttl) = o.lease_ttl {
            api.args(["--lease-ttl", &ttl.to_string(), "--heartbeat-interval", "1"]);
        }
        let apid = start(t, format!("apiserver {name}"), &mut api, &alog)?;
        t.clusters.push(Cluster {
            name: name.clone(),
            id: c,
            etcd: Etcd {
                endpoints: vec![etcd_ep.clone()],
                pid,
                data_dir,
                ca_file: pki.join("ca.pem"),
                admin_cert_file: pki.join("admin.pem"),
                admin_key_file: pki.join("admin-key.pem"),
            },
            apiserver: Apiserver {
                address: format!("127.0.0.1:{grpc}"),
                metrics: format!("127.0.0.1:{metrics}"),
                pid: apid,
                log: alog.clone(),
            },
        });
        t.save()?;
        wait_for(
            &format!("apiserver of {name}: {}", alog.display()),
            Duration::from_secs(20),
            || log_has(&alog, "serving") || !alive(apid),
        )?;
        if !alive(apid) {
            bail!("the apiserver of {name} exited:\n{}", tail(&alog));
        }
    }

    // Per node: namespace, underlay, VXLAN device, pods, agent.
    for c in 1..=o.clusters {
        let cname = format!("c{c}");
        let pki = t.cli_config_dir.join("pki").join(&cname);
        let etcd_ep = t.clusters[usize::from(c - 1)].etcd.endpoints[0].clone();
        let api = t.clusters[usize::from(c - 1)].apiserver.address.clone();
        for n in 1..=o.nodes {
            let node_name = format!("node-{n}");
            let ns = format!("{}-c{c}-n{n}", o.prefix);
            let dir = s.join(format!("nodes/{cname}-n{n}"));
            std::fs::create_dir_all(dir.join("clusters"))?;
            std::fs::create_dir_all(dir.join("endpoints"))?;
            ip(&["netns", "add", &ns])?;
            t.namespaces.push(ns.clone());
            t.save()?;
            in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
            in_ns(
                &ns,
                &[
                    "ip", "link", "add", "cm_vxlan", "type", "vxlan", "external", "dstport", "8472",
                ],
            )?;
            in_ns(&ns, &["ip", "link", "set", "cm_vxlan", "up"])?;
            let peer = format!("u{c}{n}");
            ip(&[
                "-n", &fabric, "link", "add", &peer, "type", "veth", "peer", "name", "ul0",
                "netns", &ns,
            ])?;
            in_ns(
                &fabric,
                &["ip", "link", "set", &peer, "master", "br0", "up"],
            )?;
            let fam = o.ip_family;
            let ul = fam.v4().then(|| Ipv4Addr::new(192, 168, c, n));
            let ul6 = fam.v6().then(|| underlay6(c, n));
            if let Some(ul) = ul {
                in_ns(
                    &ns,
                    &["ip", "addr", "add", &format!("{ul}/16"), "dev", "ul0"],
                )?;
            }
            if let Some(ul6) = ul6 {
                in_ns(
                    &ns,
                    &[
                        "ip",
                        "-6",
                        "addr",
                        "add",
                        &format!("{ul6}/64"),
                        "dev",
                        "ul0",
                        "nodad",
                    ],
                )?;
            }
            in_ns(&ns, &["ip", "link", "set", "ul0", "up"])?;
            let cidr = fam.v4().then(|| format!("10.{c}.{n}.0/24"));
            let cidr6 = fam.v6().then(|| format!("fd00:10:{c}:{n}::/64"));
            let pin = PathBuf::from(format!("/sys/fs/bpf/{}-c{c}-n{n}", o.prefix));
            t.pin_dirs.push(pin.clone());
            let status = format!("127.0.0.1:{}", node_ports[&(c, n)]);
            let flows = format!("127.0.0.1:{}", flow_ports[&(c, n)]);
            let alog = logs.join(format!("agent-{cname}-n{n}.log"));
            let wg = (o.encryption != Encryption::None).then(|| format!("{}c{c}n{n}", o.prefix));
            let mut agent = Command::new(bin("node-agent"));
            agent
                .args(["--netns", &ns, "--endpoint-dir"])
                .arg(dir.join("endpoints"))
                .args(["--overlay-iface", "cm_vxlan", "--underlay-iface", "ul0"])
                .args(["--tunnel", &o.tunnel, "--bpf-pin-dir"])
                .arg(&pin)
                .args(["--apiserver", &format!("https://{api}")])
                .arg("--apiserver-ca")
                .arg(pki.join("ca.pem"))
                .arg("--apiserver-cert")
                .arg(pki.join(format!("nodes/{node_name}.pem")))
                .arg("--apiserver-key")
                .arg(pki.join(format!("nodes/{node_name}-key.pem")))
                .args(["--node-name", &node_name]);
            // IPv4 first: the first underlay address is the node's
            // WireGuard endpoint.
            for u in ul.map(IpAddr::V4).into_iter().chain(ul6.map(IpAddr::V6)) {
                agent.args(["--underlay-ip", &u.to_string()]);
            }
            for p in cidr.iter().chain(&cidr6) {
                agent.args(["--pod-cidr", p]);
            }
            // Strict mode: the own cluster's ranges never leave in
            // plaintext, even before its nodes are known.
            for r in declared_ranges(fam, c) {
                agent.args(["--strict-range", &r]);
            }
            agent
                .args(["--cluster-name", &cname, "--local-etcd-endpoints", &etcd_ep])
                .arg("--local-etcd-ca")
                .arg(pki.join("ca.pem"))
                .arg("--local-etcd-cert")
                .arg(pki.join("node.pem"))
                .arg("--local-etcd-key")
                .arg(pki.join("node-key.pem"))
                .arg("--clusters-dir")
                .arg(dir.join("clusters"))
                .args(["--status-listen", &status, "--report-every", "5"])
                .args(["--flows-listen", &flows, "--flows-tls-cert"])
                .arg(pki.join(format!("nodes/{node_name}.pem")))
                .arg("--flows-tls-key")
                .arg(pki.join(format!("nodes/{node_name}-key.pem")))
                .arg("--flows-client-ca")
                .arg(pki.join("ca.pem"))
                .arg("--flow-export-path")
                .arg(dir.join("flows.jsonl"))
                .arg("--audit-log")
                .arg(dir.join("audit.jsonl"));
            if let Some(w) = &wg {
                agent
                    .args(["--wireguard-iface", w, "--wireguard-key-file"])
                    .arg(dir.join("wg.key"))
                    .arg("--wireguard-bin")
                    .arg(bin("clustermesh-wg"))
                    .arg("--wireguard-log")
                    .arg(logs.join(format!("wg-{cname}-n{n}.log")));
            }
            if let Some(ttl) = o.stale_ttl {
                agent.args(["--stale-ttl", &ttl.to_string()]);
            }
            agent.env("RUST_LOG", "info");
            let apid = start(t, format!("agent {cname}/{node_name}"), &mut agent, &alog)?;
            std::fs::write(dir.join("agent.pid"), apid.to_string())?;
            t.nodes.push(Node {
                name: node_name.clone(),
                cluster: cname.clone(),
                netns: ns.clone(),
                underlay_iface: "ul0".into(),
                underlay_ip: ul,
                ipv6: ul6,
                pod_cidr: cidr.clone(),
                pod_cidr6: cidr6.clone(),
                wireguard_iface: wg,
                agent: Agent {
                    status,
                    flows,
                    pid: apid,
                    log: alog,
                    audit_log: dir.join("audit.jsonl"),
                    clusters_dir: dir.join("clusters"),
                    endpoint_dir: dir.join("endpoints"),
                    bpf_pin_dir: pin,
                },
            });
            t.save()?;
            // Pods after the agent: CNI ADD leaves a pod's veth down and
            // returns once the agent has attached its datapath (fail
            // closed from the first packet).
            let node = t.nodes.len() - 1;
            for k in 1..=o.pods {
                add_pod(
                    t,
                    &o.bin_dir,
                    node,
                    &format!("p{k}"),
                    &format!("web-{k}"),
                    mtu,
                )?;
            }
        }
    }
    for n in &t.nodes {
        let log = n.agent.log.clone();
        let pid = n.agent.pid;
        wait_for(
            &format!(
                "agent {}/{} to register its pods ({})",
                n.cluster,
                n.name,
                log.display()
            ),
            Duration::from_secs(60),
            || {
                let s = std::fs::read_to_string(&log).unwrap_or_default();
                s.matches("has identity").count() >= usize::from(o.pods) || !alive(pid)
            },
        )?;
        if !alive(pid) {
            bail!("agent {}/{} exited:\n{}", n.cluster, n.name, tail(&log));
        }
    }

    // Connect every cluster to every other, with the product's CLI.
    if o.clusters > 1 {
        let others: Vec<String> = (2..=o.clusters).map(|c| format!("c{c}")).collect();
        run(t.cli(&o.bin_dir).args([
            "connect",
            "--cluster",
            "c1",
            "--destination",
            &others.join(","),
            "--mode",
            "mesh",
            "--wait",
            "--timeout",
            "90s",
        ]))?;
    }

    // The global service, declared in every cluster: one service with a
    // frontend and backends in each family the mesh has (the model allows
    // several frontends; each family's frontend gets that family's
    // backends).
    let clusters = t.clusters.clone();
    for c in &clusters {
        let web1 = || t.pods_of(&c.name).filter(|p| p.name == "web-1");
        let backends: Vec<Ipv4Addr> = web1().filter_map(|p| p.ip).collect();
        let backends6: Vec<Ipv6Addr> = web1().filter_map(|p| p.ipv6).collect();
        let frontend6 = o.ip_family.v6().then_some(SERVICE_FRONTEND6);
        let frontend = if o.ip_family.v4() {
            SERVICE_FRONTEND.to_string()
        } else {
            String::new()
        };
        let ports = vec![
            format!("http={SERVICE_PORT}:{POD_PORT}/TCP"),
            format!("dns={SERVICE_PORT}:{POD_PORT}/UDP"),
        ];
        let mut cmd = t.cli(&o.bin_dir);
        cmd.args(["service", "create", "--cluster", &c.name, "default/web"]);
        if !frontend.is_empty() {
            cmd.args(["--frontend", &frontend]);
        }
        if let Some(f) = frontend6 {
            cmd.args(["--frontend", &f.to_string()]);
        }
        for p in &ports {
            cmd.args(["--port", p]);
        }
        cmd.args(["--global", "--affinity", "none"]);
        for b in &backends {
            cmd.args(["--backend", &b.to_string()]);
        }
        for b in &backends6 {
            cmd.args(["--backend", &b.to_string()]);
        }
        run(&mut cmd)?;
        t.services.push(Service {
            cluster: c.name.clone(),
            name: "default/web".into(),
            frontend,
            frontend6,
            ports,
            backends,
            backends6,
            global: true,
            affinity: "none".into(),
        });
        t.save()?;
    }
    run(t
        .cli(&o.bin_dir)
        .args(["status", "--wait", "--timeout", "90s"]))?;
    crate::prometheus::start(t, &logs)?;
    Ok(())
}

/// Attaches a new pod to node `node` (index in `t.nodes`) through the CNI
/// plugin, as a container runtime would: namespace `<node ns>-<suffix>`,
/// pod name `name` (label `k8s:app=web`), MTU `mtu`; starts its responder.
/// Returns once CNI ADD has returned, i.e. once the node's agent has
/// attached the pod's datapath (fail closed), with the pod recorded in `t`.
pub fn add_pod(
    t: &mut Topology,
    bin_dir: &Path,
    node: usize,
    suffix: &str,
    name: &str,
    mtu: u32,
) -> anyhow::Result<Pod> {
    add_pod_labelled(t, bin_dir, node, (suffix, name), mtu, "web")
}

/// [`add_pod`] with the label `k8s:app=<app>` (its identity follows).
pub fn add_pod_labelled(
    t: &mut Topology,
    bin_dir: &Path,
    node: usize,
    (suffix, name): (&str, &str),
    mtu: u32,
    app: &str,
) -> anyhow::Result<Pod> {
    let n = t.nodes.get(node).context("no such node")?.clone();
    let (ns, cname, node_name) = (&n.netns, &n.cluster, &n.name);
    let pod_ns = format!("{ns}-{suffix}");
    ip(&["netns", "add", &pod_ns])?;
    t.namespaces.push(pod_ns.clone());
    t.save()?;
    let mut conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "clustermesh", "type": "clustermesh-cni",
        "mtu": mtu,
        "endpointDir": n.agent.endpoint_dir,
        "args": {"cni": {"labels": [{"key": "k8s:app", "value": app}]}},
    });
    if let Some(c) = &n.pod_cidr {
        conf["podCIDR"] = c.as_str().into();
    }
    if let Some(c) = &n.pod_cidr6 {
        conf[CNI_POD_CIDR6] = c.as_str().into();
    }
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin_dir.join("clustermesh-cni"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("{cname}-{node_name}-{name}"))
        .env("CNI_NETNS", format!("/var/run/netns/{pod_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
        )
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("CNI stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("CNI ADD of {pod_ns}: {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let (mut pod_ip, mut pod_ip6) = (None, None);
    for a in v["ips"].as_array().into_iter().flatten() {
        let addr = a["address"]
            .as_str()
            .context("CNI result without an address")?;
        match addr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse::<IpAddr>()?
        {
            IpAddr::V4(a) => pod_ip = pod_ip.or(Some(a)),
            IpAddr::V6(a) => pod_ip6 = pod_ip6.or(Some(a)),
        }
    }
    if pod_ip.is_none() && pod_ip6.is_none() {
        bail!("CNI ADD of {pod_ns}: no address in {text}");
    }
    let answer = format!("{cname}/{node_name}/{name}");
    let rlog = t
        .state_dir
        .join("logs")
        .join(format!("responder-{pod_ns}.log"));
    let exe = std::env::current_exe()?;
    let mut serve_cmd = Command::new(mesh_binary(&exe, bin_dir));
    serve_cmd.args(["serve", "--netns", &pod_ns, "--answer", &answer]);
    start(t, format!("responder {pod_ns}"), &mut serve_cmd, &rlog)?;
    let pod = Pod {
        name: name.to_owned(),
        cluster: cname.clone(),
        node: node_name.clone(),
        netns: pod_ns,
        ip: pod_ip,
        ipv6: pod_ip6,
        answer,
    };
    t.pods.push(pod.clone());
    t.save()?;
    Ok(pod)
}

/// The CNI network-config field of a node's IPv6 pod range.
pub(crate) const CNI_POD_CIDR6: &str = "podCIDRv6";

/// Cluster `c`'s declared pod ranges for the family: `10.<c>.0.0/16`,
/// `fd00:10:<c>::/48`.
pub fn declared_ranges(f: IpFamily, c: u8) -> Vec<String> {
    let mut v = Vec::new();
    if f.v4() {
        v.push(format!("10.{c}.0.0/16"));
    }
    if f.v6() {
        v.push(pod_range6(c));
    }
    v
}

/// The harness binary itself (`mesh`): this executable when it is the
/// harness, else the one next to the product's binaries.
fn mesh_binary(exe: &Path, bin_dir: &Path) -> PathBuf {
    if exe.file_name().is_some_and(|n| n == "mesh") {
        exe.to_owned()
    } else {
        bin_dir.join("mesh")
    }
}

// ---- down ----------------------------------------------------------------

/// Removes everything the topology lists: processes (TERM, then KILL),
/// WireGuard devices the agents started, namespaces, pin directories, the
/// state directory. Works from the file alone; what is already gone is
/// skipped.
pub fn down(t: &Topology) -> anyhow::Result<()> {
    for p in t.processes.iter().rev() {
        if alive(p.pid) {
            signal(p.pid, libc::SIGTERM);
        }
    }
    let t0 = Instant::now();
    while t.processes.iter().any(|p| alive(p.pid)) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &t.processes {
        if alive(p.pid) {
            signal(p.pid, libc::SIGKILL);
        }
    }
    for n in &t.nodes {
        if let Some(w) = &n.wireguard_iface {
            let _ = Command::new("pkill")
                .args(["-f", &format!("clustermesh-wg {w} ")])
                .status();
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{w}.sock"));
        }
    }
    let mut problems = Vec::new();
    for ns in t.namespaces.iter().rev() {
        if Path::new(&format!("/var/run/netns/{ns}")).exists()
            && let Err(e) = ip(&["netns", "del", ns])
        {
            problems.push(e.to_string());
        }
    }
    for p in &t.pin_dirs {
        if p.exists()
            && let Err(e) = std::fs::remove_dir_all(p)
        {
            problems.push(format!("removing {}: {e}", p.display()));
        }
    }
    if t.state_dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&t.state_dir)
    {
        problems.push(format!("removing {}: {e}", t.state_dir.display()));
    }
    if !problems.is_empty() {
        bail!("down left things behind: {}", problems.join("; "));
    }
    Ok(())
}

// ---- check ---------------------------------------------------------------

/// One row of the check table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub check: String,
    pub from: String,
    pub to: String,
    pub ok: bool,
    pub detail: String,
}

impl Row {
    /// A row for the outcome `r` (its error, in full, as the detail).
    pub fn of(check: &str, from: &str, to: &str, r: anyhow::Result<()>) -> Self {
        Self {
            check: check.into(),
            from: from.into(),
            to: to.into(),
            ok: r.is_ok(),
            detail: r.err().map(|e| format!("{e:#}")).unwrap_or_default(),
        }
    }
}

/// The connectivity matrix (every pod to up to two pods of every cluster,
/// ping and TCP), the global service from every cluster, and with
/// encryption the underlay capture. Returns every row.
/// `GET path` on a loopback HTTP endpoint; the body.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut s =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{addr}{path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// `promtool check metrics` on an endpoint's `/metrics`.
fn promtool_check(addr: &str) -> anyhow::Result<()> {
    let body = http_get(addr, "/metrics")?;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus; scripts/setup.sh installs it)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every agent's and apiserver's metrics pass `promtool check metrics`.
fn metrics_rows(t: &Topology) -> Vec<Row> {
    let endpoints = t
        .clusters
        .iter()
        .map(|c| (format!("{} apiserver", c.name), c.apiserver.metrics.clone()))
        .chain(t.nodes.iter().map(|n| {
            (
                format!("{}/{} agent", n.cluster, n.name),
                n.agent.status.clone(),
            )
        }));
    endpoints
        .map(|(from, addr)| Row::of("metrics", &from, &addr, promtool_check(&addr)))
        .collect()
}

pub fn check(t: &Topology) -> anyhow::Result<Vec<Row>> {
    let mut rows = metrics_rows(t);
    let capture = match t.encryption {
        Some(Encryption::Wireguard | Encryption::Strict) if t.clusters.len() > 1 => {
            Some(start_captures(t)?)
        }
        _ => None,
    };
    for src in &t.pods {
        for c in &t.clusters {
            let targets: Vec<&Pod> = t
                .pods_of(&c.name)
                .filter(|p| p.netns != src.netns)
                .collect();
            let sample: Vec<&Pod> = match targets.len() {
                0 => vec![],
                1 => vec![targets[0]],
                n => vec![targets[0], targets[n - 1]],
            };
            for dst in sample {
                rows.extend(pod_rows(src, dst)?);
            }
        }
    }
    // The global service: from the last pod of each cluster's first node
    // (not a backend when nodes have 2 pods or more), answers counted per
    // cluster, in each family the service has a frontend in (`service`,
    // `service6`); with affinity none every cluster must answer (but not
    // with the client itself: a client is never balanced to itself).
    for c in &t.clusters {
        if !t.services.iter().any(|s| s.cluster == c.name) {
            continue;
        }
        let first_node = t.pods_of(&c.name).next().map(|p| p.node.clone());
        let Some(src) = t
            .pods_of(&c.name)
            .filter(|p| Some(&p.node) == first_node.as_ref())
            .last()
        else {
            continue;
        };
        if t.services.iter().any(|s| !s.frontend.is_empty()) && src.ip.is_some() {
            let frontend = SocketAddr::from((SERVICE_FRONTEND, SERVICE_PORT));
            let others = |s: &Service| s.backends.iter().any(|b| Some(*b) != src.ip);
            rows.push(service_row(t, src, frontend, "service", others)?);
        }
        if t.services.iter().any(|s| s.frontend6.is_some()) && src.ipv6.is_some() {
            let frontend = SocketAddr::from((SERVICE_FRONTEND6, SERVICE_PORT));
            let others = |s: &Service| s.backends6.iter().any(|b| Some(*b) != src.ipv6);
            rows.push(service_row(t, src, frontend, "service6", others)?);
        }
    }
    if let Some(caps) = capture {
        rows.extend(finish_captures(t, caps)?);
    }
    // Last, after the traffic: the dashboard's flow panels need flows.
    // Its WireGuard panels need an encrypted mesh.
    let encrypted = matches!(
        t.encryption,
        Some(Encryption::Wireguard | Encryption::Strict)
    );
    let dashboard = Path::new(DASHBOARD);
    rows.extend(crate::prometheus::rows(t, encrypted.then_some(dashboard)));
    Ok(rows)
}

/// The Grafana dashboard of the mesh (its metrics are checked to exist).
pub const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/clustermesh.json"
);

/// `20 x clusters` TCP requests from `src` to the service's `frontend`:
/// the row fails if one fails or if a cluster whose service has a backend
/// other than the client (`others`) never answers.
fn service_row(
    t: &Topology,
    src: &Pod,
    frontend: SocketAddr,
    check: &str,
    others: impl Fn(&Service) -> bool,
) -> anyhow::Result<Row> {
    let n = 20 * t.clusters.len();
    let answers = in_netns(&src.netns, || {
        (0..n)
            .map(|_| ask(frontend, Duration::from_secs(2)))
            .collect::<Vec<_>>()
    })?;
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for a in &answers {
        match a {
            Ok(s) => {
                *per.entry(s.split('/').next().unwrap_or("").to_owned())
                    .or_default() += 1
            }
            Err(_) => failed += 1,
        }
    }
    // Every cluster with a backend other than the client itself (a client
    // is never balanced to itself) must answer.
    let all = t
        .services
        .iter()
        .filter(|s| others(s))
        .all(|s| per.contains_key(&s.cluster));
    Ok(Row {
        check: check.into(),
        from: format!("{}/{}/{}", src.cluster, src.node, src.name),
        to: format!("{frontend} (default/web, global)"),
        ok: failed == 0 && all,
        detail: format!(
            "{n} requests: {}{}",
            per.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        ),
    })
}

/// Ping and TCP from `src` to `dst`, in every family both have (`ping6`,
/// `tcp6` for IPv6).
fn pod_rows(src: &Pod, dst: &Pod) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let from = format!("{}/{}/{}", src.cluster, src.node, src.name);
    let pairs = [
        (src.ip.is_some(), dst.ip.map(IpAddr::V4), ""),
        (src.ipv6.is_some(), dst.ipv6.map(IpAddr::V6), "6"),
    ];
    for (has, to_ip, suffix) in pairs {
        let (true, Some(to_ip)) = (has, to_ip) else {
            continue;
        };
        let ping = ping_ok(&src.netns, to_ip);
        rows.push(Row {
            check: format!("ping{suffix}"),
            from: from.clone(),
            to: dst.answer.clone(),
            ok: ping.is_ok(),
            detail: ping.err().map(|e| e.to_string()).unwrap_or_default(),
        });
        let to = SocketAddr::from((to_ip, POD_PORT));
        let r = in_netns(&src.netns, || ask(to, Duration::from_secs(2)))?;
        let (ok, detail) = match r {
            Ok(a) if a == dst.answer => (true, String::new()),
            Ok(a) => (false, format!("answered {a:?}")),
            Err(e) => (false, e.to_string()),
        };
        rows.push(Row {
            check: format!("tcp{suffix}"),
            from: from.clone(),
            to: dst.answer.clone(),
            ok,
            detail,
        });
    }
    Ok(rows)
}

fn ping_ok(ns: &str, to: IpAddr) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..3 {
        match in_ns(ns, &["ping", "-c", "1", "-W", "1", &to.to_string()]) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no reply")))
        .map_err(|_| anyhow::anyhow!("no reply to 3 pings"))
}

/// Running underlay captures ([`start_captures`]).
pub struct Captures(Vec<(String, u32, PathBuf)>);

/// tcpdump on the underlay of the first node of every cluster.
pub fn start_captures(t: &Topology) -> anyhow::Result<Captures> {
    let mut v = Vec::new();
    for c in &t.clusters {
        let Some(n) = t.nodes.iter().find(|n| n.cluster == c.name) else {
            continue;
        };
        let pcap = t.state_dir.join(format!("check-{}.pcap", n.netns));
        let log = t
            .state_dir
            .join("logs")
            .join(format!("tcpdump-{}.log", n.netns));
        let pid = spawn(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &n.netns,
                    "tcpdump",
                    "-Z",
                    "root",
                    "--immediate-mode",
                    "-n",
                    "-i",
                ])
                .arg(&n.underlay_iface)
                .arg("-w")
                .arg(&pcap),
            &log,
        )?;
        wait_for("tcpdump to listen", Duration::from_secs(10), || {
            log_has(&log, "listening on")
        })?;
        v.push((n.netns.clone(), pid, pcap));
    }
    Ok(Captures(v))
}

/// Stops the captures and checks that no pod address appears in any IP
/// header on the wire (inner headers of VXLAN and Geneve decoded too), and
/// that WireGuard carried the traffic.
pub fn finish_captures(t: &Topology, caps: Captures) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (ns, pid, pcap) in caps.0 {
        signal(pid, libc::SIGTERM);
        wait_for("tcpdump to stop", Duration::from_secs(10), || !alive(pid))?;
        let out = run(Command::new("tshark").args(["-r"]).arg(&pcap).args([
            "-d",
            "udp.port==8472,vxlan",
            "-T",
            "fields",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "wg.type",
            "-e",
            "ipv6.src",
            "-e",
            "ipv6.dst",
        ]))?;
        let mut wg = 0;
        let mut plain = Vec::new();
        for l in out.lines() {
            let cols: Vec<&str> = l.split('\t').collect();
            if cols.get(2).is_some_and(|w| !w.is_empty()) {
                wg += 1;
            }
            // IPv4 and IPv6 headers, outer and inner (tshark lists every
            // header's address, comma-separated).
            let addrs = [0, 1, 3, 4]
                .iter()
                .filter_map(|i| cols.get(*i))
                .flat_map(|c| c.split(','));
            if addrs
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .any(|a| is_pod_address(t, a))
            {
                plain.push(l.to_owned());
            }
        }
        rows.push(Row {
            check: "encryption".into(),
            from: format!("{ns} underlay"),
            to: "the wire".into(),
            ok: plain.is_empty() && wg > 0,
            detail: if plain.is_empty() {
                format!("{wg} WireGuard messages, no pod address in the clear")
            } else {
                format!(
                    "{} packets with a pod address in the clear, e.g. {}",
                    plain.len(),
                    plain[0]
                )
            },
        });
    }
    Ok(rows)
}

/// A pod's address, or one inside the mesh's pod ranges (10.0.0.0/8,
/// fd00:10::/32).
fn is_pod_address(t: &Topology, a: IpAddr) -> bool {
    t.pods.iter().any(|p| p.addrs().contains(&a))
        || match a {
            IpAddr::V4(a) => a.octets()[0] == 10,
            IpAddr::V6(a) => a.segments()[..2] == [0xfd00, 0x10],
        }
}

/// The check table, one line per row; failures first.
pub fn print_rows(rows: &[Row]) {
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by_key(|r| r.ok);
    println!(
        "{:<6} {:<10} {:<22} {:<36} detail",
        "result", "check", "from", "to"
    );
    for r in sorted {
        println!(
            "{:<6} {:<10} {:<22} {:<36} {}",
            if r.ok { "ok" } else { "FAIL" },
            r.check,
            r.from,
            r.to,
            r.detail
        );
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    println!(
        "{} checks, {} passed, {failed} failed",
        rows.len(),
        rows.len() - failed
    );
}

/// Processes of the topology that are not running.
pub fn dead_processes(t: &Topology) -> Vec<&Process> {
    t.processes.iter().filter(|p| !alive(p.pid)).collect()
}
