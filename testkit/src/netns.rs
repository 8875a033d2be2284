//! Network namespaces owned by a test.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::run;

const PREFIX: &str = "cmt";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process (for names of things tests create).
pub fn next_tag() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A named network namespace (`ip netns`), deleted on drop with everything
/// in it (veths inside are destroyed with it).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `cmt<pid>x<n>-<tag>` with loopback up.
    pub fn new(tag: &str) -> io::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}x{n}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    /// Use from a dedicated thread: tokio worker threads must not move.
    pub fn enter(&self) -> io::Result<Entered> {
        let back = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(clustermesh_api::netns::path_of(&self.name))?;
        setns(&target)?;
        Ok(Entered { back })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("testkit: removing netns {}: {e}", self.name);
        }
    }
}

fn setns(f: &File) -> io::Result<()> {
    clustermesh_api::netns::enter_fd(f.as_raw_fd())
}

/// The calling thread is inside a namespace; dropping returns it.
#[derive(Debug)]
pub struct Entered {
    back: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.back) {
            // Staying in the wrong namespace would corrupt later steps.
            panic!("testkit: cannot return to the original netns: {e}");
        }
    }
}

/// A veth pair between two namespaces with addresses, links up.
pub fn veth_pair(
    a: &NetNs,
    a_if: &str,
    a_addr: &str,
    b: &NetNs,
    b_if: &str,
    b_addr: &str,
) -> io::Result<()> {
    a.exec(
        "ip",
        &[
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    )?;
    a.exec("ip", &["addr", "add", a_addr, "dev", a_if])?;
    b.exec("ip", &["addr", "add", b_addr, "dev", b_if])?;
    a.exec("ip", &["link", "set", a_if, "up"])?;
    b.exec("ip", &["link", "set", b_if, "up"])?;
    Ok(())
}

/// [`veth_pair`] for an IPv6-only link: IPv6 turned on in both namespaces
/// (a new one may inherit it off), addresses added without duplicate
/// address detection, and no DAD for the kernel's own link-local addresses
/// either (the kernel sends its neighbour solicitations for routed packets
/// from the link-local address, and none while it is tentative), so the
/// link is usable at once.
pub fn veth_pair6(
    a: &NetNs,
    a_if: &str,
    a_addr: &str,
    b: &NetNs,
    b_if: &str,
    b_addr: &str,
) -> io::Result<()> {
    a.exec(
        "ip",
        &[
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    )?;
    for (ns, dev, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        enable_ipv6(ns)?;
        ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{dev}.accept_dad=0")],
        )?;
        ns.exec("ip", &["-6", "addr", "add", addr, "dev", dev, "nodad"])?;
        ns.exec("ip", &["link", "set", dev, "up"])?;
    }
    Ok(())
}

/// Turns IPv6 on in a namespace, for its existing interfaces too.
pub fn enable_ipv6(ns: &NetNs) -> io::Result<()> {
    for kv in [
        "net.ipv6.conf.all.disable_ipv6=0",
        "net.ipv6.conf.default.disable_ipv6=0",
    ] {
        ns.exec("sysctl", &["-qw", kv])?;
    }
    let links = ns.exec("ls", &["/proc/sys/net/ipv6/conf"])?;
    for dev in links.split_whitespace() {
        if dev != "all" && dev != "default" {
            ns.exec(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=0")],
            )?;
        }
    }
    Ok(())
}

/// Deletes namespaces left by test processes that no longer run.
pub fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
    // Pin directories of dead test processes.
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(ent.path());
            }
        }
    }
}

/// A directory on bpffs for one test's pinned maps, removed on drop.
#[derive(Debug)]
pub struct PinDir {
    path: std::path::PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> io::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let root = std::path::Path::new("/sys/fs/bpf");
        if !root.join(".").exists() {
            return Err(io::Error::other(
                "bpffs is not mounted at /sys/fs/bpf (run scripts/setup.sh)",
            ));
        }
        let path = root.join(format!("{PREFIX}{}x{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("testkit: removing {}: {e}", self.path.display());
        }
    }
}
