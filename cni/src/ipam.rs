//! The plugin's own IPv4 address management over the node's pod CIDR.
//!
//! Leases live in `<endpointDir>/.ipam/leases.json` (a hidden directory, so
//! no container id, which must start with a letter or digit, can collide
//! with it, and [`crate::read_endpoint_dir`] never sees it). Every
//! read-modify-write holds an exclusive `flock` on `<endpointDir>/.ipam/lock`
//! and replaces the lease file by rename, so concurrent ADDs never hand out
//! the same address and a crash never leaves a half-written file.
//!
//! Allocation gives the lowest free address of the CIDR, excluding its
//! network and broadcast addresses. A lease is keyed by container id and
//! interface name: asking again returns the same address (ADD is
//! idempotent), releasing a lease that does not exist is not an error (DEL
//! is idempotent). Leases outside the current CIDR (the node's CIDR
//! changed) are not reused.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::error::code;

/// An IPv4 network: address and prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a CIDR string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{got:?} is not ADDRESS/PREFIX")]
    NoPrefix { got: String },
    #[error("{got:?} is not an IPv4 address")]
    BadAddress { got: String },
    #[error("prefix length {got:?} is not a number in 0..=32")]
    BadPrefix { got: String },
    #[error("{got} has host bits set (the network is {network})")]
    HostBitsSet { got: String, network: Ipv4Cidr },
    #[error("/{prefix} has no room for pods: the prefix must be at most /30")]
    TooSmall { prefix: u8 },
}

impl Ipv4Cidr {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32 && u32::from(network) & !mask(prefix) == 0)
            .then_some(Self { network, prefix })
    }

    /// Parses `a.b.c.d/n` with host bits zero.
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| CidrError::NoPrefix { got: s.into() })?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress { got: addr.into() })?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| CidrError::BadPrefix { got: prefix.into() })?;
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if network != addr {
            return Err(CidrError::HostBitsSet {
                got: s.into(),
                network: Self { network, prefix },
            });
        }
        Ok(Self { network, prefix })
    }

    /// [`Ipv4Cidr::parse`], and the CIDR must hold at least two pod
    /// addresses besides network and broadcast (prefix at most /30).
    pub fn parse_pool(s: &str) -> Result<Self, CidrError> {
        let c = Self::parse(s)?;
        if c.prefix > 30 {
            return Err(CidrError::TooSmall { prefix: c.prefix });
        }
        Ok(c)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether `ip` may be given to a pod: inside, and neither the network
    /// nor the broadcast address.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.broadcast()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

/// One address handed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseFile {
    leases: Vec<Lease>,
}

/// What can go wrong with the lease store.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lease file {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no free address left in {cidr}")]
    Exhausted { cidr: Ipv4Cidr },
}

impl IpamError {
    pub fn code(&self) -> u32 {
        match self {
            Self::Io { .. } => code::IO,
            Self::Corrupt { .. } => code::STATE_CORRUPT,
            Self::Exhausted { .. } => code::IPAM_EXHAUSTED,
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IpamError {
    let path = path.to_owned();
    move |source| IpamError::Io { op, path, source }
}

/// The lease store of one endpoint directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store under `endpoint_dir`; nothing is touched until used.
    pub fn new(endpoint_dir: &Path) -> Self {
        Self {
            dir: endpoint_dir.join(".ipam"),
        }
    }

    fn lease_path(&self) -> PathBuf {
        self.dir.join("leases.json")
    }

    /// The address of `(container_id, ifname)`: its existing lease if it
    /// has one in `cidr`, else the lowest free host address of `cidr`.
    pub fn allocate(
        &self,
        cidr: Ipv4Cidr,
        container_id: &str,
        ifname: &str,
    ) -> Result<Ipv4Addr, IpamError> {
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        self.locked(|leases| {
            let mine = |l: &Lease| l.container_id == container_id && l.ifname == ifname;
            if let Some(l) = leases.iter().find(|l| mine(l) && cidr.is_host(l.ip)) {
                return Ok((l.ip, false));
            }
            // A lease of ours outside the CIDR is stale: drop it.
            leases.retain(|l| !mine(l));
            let mut used: Vec<u32> = leases
                .iter()
                .filter(|l| cidr.is_host(l.ip))
                .map(|l| u32::from(l.ip))
                .collect();
            used.sort_unstable();
            // Without room besides network and broadcast (a /31 or /32
            // made with `Ipv4Cidr::new`) there is nothing to give.
            if cidr.prefix() > 30 {
                return Err(IpamError::Exhausted { cidr });
            }
            let mut candidate = u32::from(cidr.network()) + 1;
            let last = u32::from(cidr.broadcast()) - 1;
            for u in used {
                if u == candidate {
                    candidate += 1;
                } else if u > candidate {
                    break;
                }
            }
            if candidate > last {
                return Err(IpamError::Exhausted { cidr });
            }
            let ip = Ipv4Addr::from(candidate);
            leases.push(Lease {
                ip,
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
            });
            Ok((ip, true))
        })
    }

    /// Releases the lease of `(container_id, ifname)`, returning its address
    /// if there was one.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        if !self.dir.exists() {
            return Ok(None);
        }
        self.locked(|leases| {
            let pos = leases
                .iter()
                .position(|l| l.container_id == container_id && l.ifname == ifname);
            Ok(match pos {
                Some(i) => (Some(leases.remove(i).ip), true),
                None => (None, false),
            })
        })
    }

    /// The address leased to `(container_id, ifname)`, if any.
    pub fn lookup(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .leases()?
            .into_iter()
            .find(|l| l.container_id == container_id && l.ifname == ifname)
            .map(|l| l.ip))
    }

    /// Every lease, in address order.
    pub fn leases(&self) -> Result<Vec<Lease>, IpamError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        self.locked(|leases| Ok((leases.clone(), false)))
    }

    /// Runs `f` on the leases under the lock; writes them back if `f` says
    /// it changed them.
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut Vec<Lease>) -> Result<(T, bool), IpamError>,
    ) -> Result<T, IpamError> {
        let lock_path = self.dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        lock.lock().map_err(io_err("locking", &lock_path))?;
        let path = self.lease_path();
        let mut file = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<LeaseFile>(&bytes).map_err(|source| {
                IpamError::Corrupt {
                    path: path.clone(),
                    source,
                }
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => LeaseFile::default(),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let (out, changed) = f(&mut file.leases)?;
        if changed {
            file.leases.sort_by_key(|l| l.ip);
            let bytes = serde_json::to_vec_pretty(&file).map_err(|source| IpamError::Corrupt {
                path: path.clone(),
                source,
            })?;
            write_atomic(&path, &bytes).map_err(io_err("writing", &path))?;
        }
        // The lock is released when `lock` closes.
        drop(lock);
        Ok(out)
    }
}

/// Writes `bytes` to a hidden temporary file next to `path`, syncs it and
/// renames it over `path`: readers see the old or the new content, never a
/// part.
pub(crate) use clustermesh_api::endpoint_file::write_atomic;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        Ipv4Cidr::parse_pool(s).expect("cidr")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidr_parsing() {
        let c = cidr("10.1.0.0/16");
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert_eq!(c.broadcast(), ip("10.1.255.255"));
        assert!(c.is_host(ip("10.1.0.1")));
        assert!(!c.is_host(ip("10.1.0.0")));
        assert!(!c.is_host(ip("10.1.255.255")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert_eq!(
            Ipv4Cidr::parse("0.0.0.0/0").expect("all").broadcast(),
            ip("255.255.255.255")
        );
        assert!(matches!(
            Ipv4Cidr::parse("10.0.0.0"),
            Err(CidrError::NoPrefix { .. })
        ));
        assert!(matches!(
            Ipv4Cidr::parse("10.0.0/8"),
            Err(CidrError::BadAddress { .. })
        ));
        assert!(matches!(
            Ipv4Cidr::parse("10.0.0.0/x"),
            Err(CidrError::BadPrefix { .. })
        ));
        assert!(matches!(
            Ipv4Cidr::parse("10.0.0.0/33"),
            Err(CidrError::BadPrefix { .. })
        ));
        assert!(matches!(
            Ipv4Cidr::parse("10.0.0.1/8"),
            Err(CidrError::HostBitsSet { .. })
        ));
        assert!(matches!(
            Ipv4Cidr::parse_pool("10.0.0.0/31"),
            Err(CidrError::TooSmall { prefix: 31 })
        ));
        assert_eq!(Ipv4Cidr::new(ip("10.0.0.0"), 8), Some(cidr("10.0.0.0/8")));
        assert_eq!(Ipv4Cidr::new(ip("10.0.0.1"), 8), None);
    }

    #[test]
    fn allocates_lowest_free_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(dir.path());
        let c = cidr("10.7.0.0/24");
        assert_eq!(s.allocate(c, "a", "eth0").expect("a"), ip("10.7.0.1"));
        assert_eq!(s.allocate(c, "b", "eth0").expect("b"), ip("10.7.0.2"));
        assert_eq!(s.allocate(c, "c", "eth0").expect("c"), ip("10.7.0.3"));
        // Same container and interface: same address, no new lease.
        assert_eq!(s.allocate(c, "b", "eth0").expect("b again"), ip("10.7.0.2"));
        // Same container, other interface: another lease.
        assert_eq!(s.allocate(c, "b", "net1").expect("b net1"), ip("10.7.0.4"));
        assert_eq!(s.leases().expect("leases").len(), 4);
        // Release frees the address; the lowest free one is reused.
        assert_eq!(
            s.release("b", "eth0").expect("release"),
            Some(ip("10.7.0.2"))
        );
        assert_eq!(s.release("b", "eth0").expect("release again"), None);
        assert_eq!(s.release("never", "eth0").expect("unknown"), None);
        assert_eq!(s.lookup("b", "eth0").expect("lookup"), None);
        assert_eq!(s.allocate(c, "d", "eth0").expect("d"), ip("10.7.0.2"));
        assert_eq!(s.lookup("d", "eth0").expect("lookup"), Some(ip("10.7.0.2")));
        // A new Store on the same directory sees the same leases.
        let again = Store::new(dir.path());
        assert_eq!(
            again.lookup("a", "eth0").expect("lookup"),
            Some(ip("10.7.0.1"))
        );
    }

    #[test]
    fn exhaustion_excludes_network_and_broadcast() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(dir.path());
        let c = cidr("192.168.5.0/30");
        assert_eq!(s.allocate(c, "a", "eth0").expect("a"), ip("192.168.5.1"));
        assert_eq!(s.allocate(c, "b", "eth0").expect("b"), ip("192.168.5.2"));
        let e = s.allocate(c, "c", "eth0").expect_err("full");
        assert!(matches!(e, IpamError::Exhausted { .. }), "{e}");
        assert_eq!(e.code(), code::IPAM_EXHAUSTED);
        // The existing ones still get theirs.
        assert_eq!(
            s.allocate(c, "a", "eth0").expect("a again"),
            ip("192.168.5.1")
        );
        s.release("a", "eth0").expect("release");
        assert_eq!(s.allocate(c, "c", "eth0").expect("c"), ip("192.168.5.1"));
        // A pool with no host addresses at all.
        let tiny = Ipv4Cidr::new(ip("255.255.255.255"), 32).expect("/32");
        assert!(matches!(
            s.allocate(tiny, "d", "eth0"),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn changed_cidr_drops_stale_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(dir.path());
        assert_eq!(
            s.allocate(cidr("10.0.0.0/24"), "a", "eth0").expect("a"),
            ip("10.0.0.1")
        );
        assert_eq!(
            s.allocate(cidr("10.0.1.0/24"), "a", "eth0").expect("a"),
            ip("10.0.1.1")
        );
        assert_eq!(s.leases().expect("leases").len(), 1);
    }

    #[test]
    fn release_and_leases_do_not_create_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let s = Store::new(&missing);
        assert_eq!(s.release("a", "eth0").expect("release"), None);
        assert!(s.leases().expect("leases").is_empty());
        assert!(!missing.exists());
    }

    #[test]
    fn corrupt_lease_file_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(dir.path());
        fs::create_dir_all(dir.path().join(".ipam")).expect("mkdir");
        fs::write(dir.path().join(".ipam/leases.json"), b"{not json").expect("write");
        let e = s
            .allocate(cidr("10.0.0.0/24"), "a", "eth0")
            .expect_err("corrupt");
        assert!(matches!(e, IpamError::Corrupt { .. }), "{e}");
        assert_eq!(e.code(), code::STATE_CORRUPT);
    }

    #[test]
    fn concurrent_allocations_never_share_an_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = cidr("10.8.0.0/24");
        let ips: Vec<Ipv4Addr> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let path = dir.path();
                    scope.spawn(move || {
                        // Each thread opens its own store, as separate
                        // plugin processes would (flock is per open file).
                        Store::new(path)
                            .allocate(c, &format!("c{i}"), "eth0")
                            .expect("allocate")
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let distinct: BTreeSet<_> = ips.iter().collect();
        assert_eq!(distinct.len(), 16, "{ips:?}");
        assert_eq!(Store::new(dir.path()).leases().expect("leases").len(), 16);
        let expect: BTreeSet<Ipv4Addr> = (1..=16).map(|i| Ipv4Addr::new(10, 8, 0, i)).collect();
        assert_eq!(ips.into_iter().collect::<BTreeSet<_>>(), expect);
    }
}
