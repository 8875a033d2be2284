//! Two network namespaces joined by a veth "underlay" (10.99.0.1 and
//! 10.99.0.2), each with a WireGuard device, ours (`clustermesh-wg`) or
//! Debian's `wireguard-go`, configured as each other's peer with the
//! standard `wg` tool: tunnel addresses 10.100.0.1 and 10.100.0.2 (and,
//! with [`WgPair::new_dual`], fd00:100::1 and fd00:100::2), UDP ports 51871
//! and 51872. Processes are killed, control sockets removed and namespaces
//! deleted on drop.

use std::{
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{NetNs, veth_pair};

/// Which WireGuard implementation a node runs.
#[derive(Debug, Clone)]
pub enum Impl {
    /// `clustermesh-wg` at this path.
    Ours(PathBuf),
    WireguardGo,
}

/// A device process, killed on drop with its control socket removed.
#[derive(Debug)]
struct Proc(Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// One side.
#[derive(Debug)]
pub struct WgNode {
    pub ns: NetNs,
    pub iface: String,
    pub key_file: PathBuf,
    pub public: String,
    pub underlay_ip: String,
    /// The underlay's IPv6 address (both families are on `ul0`).
    pub underlay_ip6: String,
    pub tunnel_ip: String,
    /// The inner IPv6 address (fd00:100::N), with [`WgPair::new_dual`]
    /// only.
    pub tunnel_ip6: Option<String>,
    pub port: u16,
    _proc: Proc,
}

/// Both sides (field order: processes go before their namespaces).
#[derive(Debug)]
pub struct WgPair {
    pub a: WgNode,
    pub b: WgNode,
    pub dir: tempfile::TempDir,
}

fn wg(ns: &NetNs, args: &[&str]) -> io::Result<String> {
    ns.exec("wg", args)
}

fn until(what: &str, mut cond: impl FnMut() -> bool) -> io::Result<()> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(io::Error::other(format!("timed out waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The control socket directory both implementations use.
pub const RUN_DIR: &str = "/var/run/wireguard";

fn start(which: &Impl, ns: &NetNs, iface: &str, log: &Path) -> io::Result<Proc> {
    let sock = Path::new(RUN_DIR).join(format!("{iface}.sock"));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]);
    match which {
        Impl::Ours(bin) => cmd.arg(bin).arg(iface),
        Impl::WireguardGo => cmd.args(["wireguard-go", "-f", iface]),
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let p = Proc(child, sock.clone());
    until(&format!("control socket {}", sock.display()), || {
        sock.exists()
    })?;
    Ok(p)
}

/// `n`'s key, port and peer (`peer`, at its underlay address of the
/// family `v6` says), its tunnel addresses, MTU 1420, up.
fn configure(n: &WgNode, peer: &WgNode, v6: bool) -> io::Result<()> {
    let port = n.port.to_string();
    let endpoint = if v6 {
        format!("[{}]:{}", peer.underlay_ip6, peer.port)
    } else {
        format!("{}:{}", peer.underlay_ip, peer.port)
    };
    let mut allowed = format!("{}/32", peer.tunnel_ip);
    if let Some(ip6) = &peer.tunnel_ip6 {
        allowed.push_str(&format!(",{ip6}/128"));
    }
    let key = n.key_file.to_string_lossy().into_owned();
    wg(
        &n.ns,
        &[
            "set",
            &n.iface,
            "listen-port",
            &port,
            "private-key",
            &key,
            "peer",
            &peer.public,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ],
    )?;
    let addr = format!("{}/24", n.tunnel_ip);
    n.ns.exec("ip", &["addr", "add", &addr, "dev", &n.iface])?;
    if let Some(ip6) = &n.tunnel_ip6 {
        let addr = format!("{ip6}/64");
        n.ns.exec(
            "ip",
            &["-6", "addr", "add", &addr, "dev", &n.iface, "nodad"],
        )?;
    }
    n.ns.exec("ip", &["link", "set", &n.iface, "mtu", "1420", "up"])?;
    Ok(())
}

impl WgPair {
    /// A pair over an IPv4 underlay.
    pub fn new(a: Impl, b: Impl) -> io::Result<Self> {
        Self::new_over(a, b, false)
    }

    /// A pair whose endpoints are the underlay's IPv4 (`v6` false) or IPv6
    /// addresses; `ul0` has both.
    pub fn new_over(a: Impl, b: Impl, v6: bool) -> io::Result<Self> {
        Self::build(a, b, v6, false)
    }

    /// A pair over an IPv4 (`v6` false) or IPv6 underlay whose tunnel
    /// carries both families: each side also has the inner IPv6 address
    /// `tunnel_ip6` (fd00:100::N/64), and its peer's allowed IPs cover the
    /// other side's /128 next to its /32.
    pub fn new_dual(a: Impl, b: Impl, v6: bool) -> io::Result<Self> {
        Self::build(a, b, v6, true)
    }

    fn build(a: Impl, b: Impl, v6: bool, inner6: bool) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let nsa = NetNs::new("wga")?;
        let nsb = NetNs::new("wgb")?;
        veth_pair(&nsa, "ul0", "10.99.0.1/24", &nsb, "ul0", "10.99.0.2/24")?;
        for (ns, a6) in [(&nsa, "fd99::1/64"), (&nsb, "fd99::2/64")] {
            ns.exec("ip", &["-6", "addr", "add", a6, "dev", "ul0", "nodad"])?;
        }
        // Unique names: the control sockets share one directory.
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            crate::netns::next_tag()
        );
        let mut nodes = Vec::new();
        for (i, (which, ns)) in [(a, nsa), (b, nsb)].into_iter().enumerate() {
            let iface = format!("cmwg{tag}{}", ["a", "b"][i]);
            let key_file = dir.path().join(format!("{iface}.key"));
            let out = Command::new("wg").arg("genkey").output()?;
            {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_file)?
                    .write_all(&out.stdout)?;
            }
            let public = String::from_utf8_lossy(
                &Command::new("sh")
                    .arg("-c")
                    .arg(format!("wg pubkey < {}", key_file.display()))
                    .output()?
                    .stdout,
            )
            .trim()
            .to_owned();
            let proc = start(
                &which,
                &ns,
                &iface,
                &dir.path().join(format!("{iface}.log")),
            )?;
            nodes.push(WgNode {
                ns,
                iface,
                key_file,
                public,
                underlay_ip: format!("10.99.0.{}", i + 1),
                underlay_ip6: format!("fd99::{}", i + 1),
                tunnel_ip: format!("10.100.0.{}", i + 1),
                tunnel_ip6: inner6.then(|| format!("fd00:100::{}", i + 1)),
                port: 51871 + i as u16,
                _proc: proc,
            });
        }
        let b = nodes.pop().ok_or_else(|| io::Error::other("no node b"))?;
        let a = nodes.pop().ok_or_else(|| io::Error::other("no node a"))?;
        for (n, peer) in [(&a, &b), (&b, &a)] {
            configure(n, peer, v6)?;
        }
        Ok(Self { a, b, dir })
    }

    /// A pair where `b` sits behind a NAT: namespaces A (10.99.0.1), a
    /// router R (10.99.0.254 towards A, masquerading) and B (192.168.77.2,
    /// default route via R). A knows B's key but no endpoint for it; B has
    /// A's endpoint and a persistent keepalive of 1 s, as a roaming client
    /// behind SNAT would. Returns the pair and the router's namespace.
    pub fn new_behind_nat(a: Impl, b: Impl) -> io::Result<(Self, NetNs)> {
        let mut pair = Self::new(a, b)?;
        let r = NetNs::new("wgr")?;
        // Re-wire B: out of A's subnet, behind R.
        pair.b.ns.exec("ip", &["link", "del", "ul0"])?;
        veth_pair(
            &pair.a.ns,
            "ul0",
            "10.99.0.1/24",
            &r,
            "up0",
            "10.99.0.254/24",
        )?;
        veth_pair(
            &r,
            "down0",
            "192.168.77.1/24",
            &pair.b.ns,
            "ul0",
            "192.168.77.2/24",
        )?;
        pair.b
            .ns
            .exec("ip", &["route", "add", "default", "via", "192.168.77.1"])?;
        r.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        r.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "up0",
                "-j",
                "MASQUERADE",
            ],
        )?;
        pair.b.underlay_ip = "192.168.77.2".into();
        // A: B's key, no endpoint (it learns it from B's packets).
        let allowed = format!("{}/32", pair.b.tunnel_ip);
        wg(
            &pair.a.ns,
            &["set", &pair.a.iface, "peer", &pair.b.public, "remove"],
        )?;
        wg(
            &pair.a.ns,
            &[
                "set",
                &pair.a.iface,
                "peer",
                &pair.b.public,
                "allowed-ips",
                &allowed,
            ],
        )?;
        // B: A's endpoint, keepalive.
        let endpoint = format!("{}:{}", pair.a.underlay_ip, pair.a.port);
        wg(
            &pair.b.ns,
            &[
                "set",
                &pair.b.iface,
                "peer",
                &pair.a.public,
                "endpoint",
                &endpoint,
                "persistent-keepalive",
                "1",
            ],
        )?;
        Ok((pair, r))
    }

    /// Waits until A reaches B through the tunnel (the first packet starts
    /// the handshake), at B's inner IPv6 address too if it has one.
    pub fn wait_connected(&self) -> io::Result<()> {
        for ip in std::iter::once(&self.b.tunnel_ip).chain(&self.b.tunnel_ip6) {
            until(&format!("the tunnel to {ip}"), || {
                self.a.ns.exec("ping", &["-c", "1", "-W", "1", ip]).is_ok()
            })?;
        }
        Ok(())
    }
}
