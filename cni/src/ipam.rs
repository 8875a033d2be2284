//! The plugin's own address management over the node's pod ranges: an
//! IPv4 CIDR (`podCIDR`), an IPv6 CIDR (`podCIDRv6`), or both.
//!
//! Leases live in `<endpointDir>/.ipam/leases.json` (a hidden directory, so
//! no container id, which must start with a letter or digit, can collide
//! with it, and [`crate::read_endpoint_dir`] never sees it). Every
//! read-modify-write holds an exclusive `flock` on `<endpointDir>/.ipam/lock`
//! and replaces the lease file by rename, so concurrent ADDs never hand out
//! the same address and a crash never leaves a half-written file.
//!
//! An attachment (container id and interface name) gets one address per
//! configured family, both under the same lock: if one family has no room,
//! neither is leased. Allocation gives the lowest free address: for IPv4
//! neither the network nor the broadcast address, for IPv6 anything but the
//! network address (the subnet-router anycast address). It walks the sorted
//! leases, never the range, so a /64 costs what a /24 does: O(leases).
//! Asking again returns the same addresses (ADD is idempotent), releasing
//! leases that do not exist is not an error (DEL is idempotent). A lease
//! outside the current range of its family (the node's range changed), or
//! of a family no longer configured, is dropped at the next allocation.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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

/// An IPv6 network: address and prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Cidr {
    network: Ipv6Addr,
    prefix: u8,
}

/// The shortest and longest prefix accepted for an own IPv6 pod range.
pub const IPV6_POOL_PREFIXES: std::ops::RangeInclusive<u8> = 64..=120;

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
    #[error("{got:?} is not an IPv6 address")]
    BadAddress6 { got: String },
    #[error("prefix length {got:?} is not a number in 0..=128")]
    BadPrefix6 { got: String },
    #[error("{got} has host bits set (the network is {network})")]
    HostBitsSet6 { got: String, network: Ipv6Cidr },
    #[error("/{prefix} is not a pod range size: the IPv6 prefix must be /64 to /120")]
    PrefixOutOfRange6 { prefix: u8 },
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

impl Ipv6Cidr {
    pub fn new(network: Ipv6Addr, prefix: u8) -> Option<Self> {
        (prefix <= 128 && u128::from(network) & !mask6(prefix) == 0)
            .then_some(Self { network, prefix })
    }

    /// Parses `x:y::z/n` with host bits zero.
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| CidrError::NoPrefix { got: s.into() })?;
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress6 { got: addr.into() })?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 128)
            .ok_or_else(|| CidrError::BadPrefix6 { got: prefix.into() })?;
        let network = Ipv6Addr::from(u128::from(addr) & mask6(prefix));
        if network != addr {
            return Err(CidrError::HostBitsSet6 {
                got: s.into(),
                network: Self { network, prefix },
            });
        }
        Ok(Self { network, prefix })
    }

    /// [`Ipv6Cidr::parse`], and the prefix in [`IPV6_POOL_PREFIXES`]
    /// (/64 to /120: at least 255 pod addresses, at most a whole subnet).
    pub fn parse_pool(s: &str) -> Result<Self, CidrError> {
        let c = Self::parse(s)?;
        if !IPV6_POOL_PREFIXES.contains(&c.prefix) {
            return Err(CidrError::PrefixOutOfRange6 { prefix: c.prefix });
        }
        Ok(c)
    }

    pub fn network(&self) -> Ipv6Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The highest address inside.
    pub fn last(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) | !mask6(self.prefix))
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & mask6(self.prefix) == u128::from(self.network)
    }

    /// Whether `ip` may be given to a pod: inside, and not the network
    /// (subnet-router anycast) address.
    pub fn is_host(&self, ip: Ipv6Addr) -> bool {
        self.contains(ip) && ip != self.network
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv6Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn mask6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// The pod ranges of a network: at least one in a valid configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pools {
    /// `podCIDR`.
    pub v4: Option<Ipv4Cidr>,
    /// `podCIDRv6`.
    pub v6: Option<Ipv6Cidr>,
}

impl Pools {
    /// An IPv4-only network.
    pub fn v4(cidr: Ipv4Cidr) -> Self {
        Self {
            v4: Some(cidr),
            v6: None,
        }
    }

    /// An IPv6-only network.
    pub fn v6(cidr: Ipv6Cidr) -> Self {
        Self {
            v4: None,
            v6: Some(cidr),
        }
    }
}

/// A pod's addresses: one per family it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl PodIps {
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }

    /// IPv4 first, then IPv6.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }

    /// Adds `ip` unless its family already has one (the first wins).
    pub fn add_first(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                self.v4.get_or_insert(a);
            }
            IpAddr::V6(a) => {
                self.v6.get_or_insert(a);
            }
        }
    }
}

impl fmt::Display for PodIps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let all: Vec<String> = self.iter().map(|ip| ip.to_string()).collect();
        f.write_str(&all.join(", "))
    }
}

/// One address handed out. The lease file stores `ip` as its string, so
/// files written before IPv6 leases existed read unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: IpAddr,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseFile {
    leases: Vec<Lease>,
}

/// The range an exhausted allocation was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    V4(Ipv4Cidr),
    V6(Ipv6Cidr),
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(c) => c.fmt(f),
            Self::V6(c) => c.fmt(f),
        }
    }
}

impl Pool {
    fn is_v6(&self) -> bool {
        matches!(self, Self::V6(_))
    }

    fn is_host(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Self::V4(c), IpAddr::V4(a)) => c.is_host(a),
            (Self::V6(c), IpAddr::V6(a)) => c.is_host(a),
            _ => false,
        }
    }

    /// The first and last pod address as numbers; `None` if there is none
    /// (an IPv4 /31 or /32, an IPv6 /128 made with `new`).
    fn host_range(&self) -> Option<(u128, u128)> {
        match self {
            Self::V4(c) if c.prefix() <= 30 => Some((
                u128::from(u32::from(c.network()) + 1),
                u128::from(u32::from(c.broadcast()) - 1),
            )),
            Self::V6(c) if c.prefix() < 128 => {
                Some((u128::from(c.network()) + 1, u128::from(c.last())))
            }
            _ => None,
        }
    }

    fn addr(&self, n: u128) -> IpAddr {
        match self {
            // In range by construction: host_range of an IPv4 pool fits u32.
            Self::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(0))),
            Self::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
        }
    }
}

fn as_number(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The lowest number in `first..=last` not in `used` (sorted ascending;
/// values outside the range and repeats are allowed). Walks `used` once:
/// O(`used.len()`) whatever the size of the range.
pub fn lowest_free(used: &[u128], first: u128, last: u128) -> Option<u128> {
    let mut candidate = first;
    for &u in used {
        if u == candidate {
            candidate = candidate.checked_add(1)?;
        } else if u > candidate {
            break;
        }
    }
    (candidate <= last).then_some(candidate)
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
    Exhausted { cidr: Pool },
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

/// The lease of `(container_id, ifname)` in `pool`'s family: the existing
/// one if it is in `pool`, else the lowest free address (a lease of ours of
/// that family outside `pool` is stale and dropped). Returns the address and
/// whether `leases` changed.
fn lease_in(
    leases: &mut Vec<Lease>,
    pool: Pool,
    container_id: &str,
    ifname: &str,
) -> Result<(IpAddr, bool), IpamError> {
    let mine = |l: &Lease| {
        l.container_id == container_id && l.ifname == ifname && l.ip.is_ipv6() == pool.is_v6()
    };
    if let Some(l) = leases.iter().find(|l| mine(l) && pool.is_host(l.ip)) {
        return Ok((l.ip, false));
    }
    leases.retain(|l| !mine(l));
    let mut used: Vec<u128> = leases
        .iter()
        .filter(|l| pool.is_host(l.ip))
        .map(|l| as_number(l.ip))
        .collect();
    used.sort_unstable();
    let (first, last) = pool
        .host_range()
        .ok_or(IpamError::Exhausted { cidr: pool })?;
    let n = lowest_free(&used, first, last).ok_or(IpamError::Exhausted { cidr: pool })?;
    let ip = pool.addr(n);
    leases.push(Lease {
        ip,
        container_id: container_id.to_owned(),
        ifname: ifname.to_owned(),
    });
    Ok((ip, true))
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

    /// [`Store::allocate_pools`] for an IPv4-only network.
    pub fn allocate(
        &self,
        cidr: Ipv4Cidr,
        container_id: &str,
        ifname: &str,
    ) -> Result<Ipv4Addr, IpamError> {
        let ips = self.allocate_pools(Pools::v4(cidr), container_id, ifname)?;
        ips.v4.ok_or(IpamError::Exhausted {
            cidr: Pool::V4(cidr),
        })
    }

    /// The addresses of `(container_id, ifname)`, one per family of
    /// `pools`: its existing lease where it has one in that range, else the
    /// lowest free address. Both families are leased under one lock, or
    /// neither. Leases of the attachment in a family `pools` lacks are
    /// dropped.
    pub fn allocate_pools(
        &self,
        pools: Pools,
        container_id: &str,
        ifname: &str,
    ) -> Result<PodIps, IpamError> {
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        self.locked(|leases| {
            let before = leases.len();
            leases.retain(|l| {
                let unconfigured = if l.ip.is_ipv6() {
                    pools.v6.is_none()
                } else {
                    pools.v4.is_none()
                };
                !(l.container_id == container_id && l.ifname == ifname && unconfigured)
            });
            let mut changed = leases.len() != before;
            let mut ips = PodIps::default();
            for pool in [pools.v4.map(Pool::V4), pools.v6.map(Pool::V6)]
                .into_iter()
                .flatten()
            {
                let (ip, new) = lease_in(leases, pool, container_id, ifname)?;
                changed |= new;
                ips.add_first(ip);
            }
            Ok((ips, changed))
        })
    }

    /// Releases every lease of `(container_id, ifname)`, returning the
    /// addresses there were.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<PodIps, IpamError> {
        if !self.dir.exists() {
            return Ok(PodIps::default());
        }
        self.locked(|leases| {
            let mut gone = PodIps::default();
            leases.retain(|l| {
                let mine = l.container_id == container_id && l.ifname == ifname;
                if mine {
                    gone.add_first(l.ip);
                }
                !mine
            });
            Ok((gone, !gone.is_empty()))
        })
    }

    /// The addresses leased to `(container_id, ifname)`.
    pub fn lookup(&self, container_id: &str, ifname: &str) -> Result<PodIps, IpamError> {
        let mut ips = PodIps::default();
        for l in self.leases()? {
            if l.container_id == container_id && l.ifname == ifname {
                ips.add_first(l.ip);
            }
        }
        Ok(ips)
    }

    /// Every lease, in address order (IPv4 first).
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
            s.release("b", "eth0").expect("release").v4,
            Some(ip("10.7.0.2"))
        );
        assert_eq!(s.release("b", "eth0").expect("release again").v4, None);
        assert_eq!(s.release("never", "eth0").expect("unknown").v4, None);
        assert_eq!(s.lookup("b", "eth0").expect("lookup").v4, None);
        assert_eq!(s.allocate(c, "d", "eth0").expect("d"), ip("10.7.0.2"));
        assert_eq!(
            s.lookup("d", "eth0").expect("lookup").v4,
            Some(ip("10.7.0.2"))
        );
        // A new Store on the same directory sees the same leases.
        let again = Store::new(dir.path());
        assert_eq!(
            again.lookup("a", "eth0").expect("lookup").v4,
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
        assert_eq!(s.release("a", "eth0").expect("release").v4, None);
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

    fn cidr6(s: &str) -> Ipv6Cidr {
        Ipv6Cidr::parse_pool(s).expect("cidr6")
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().expect("ip6")
    }

    fn dual(v4: &str, v6: &str) -> Pools {
        Pools {
            v4: Some(cidr(v4)),
            v6: Some(cidr6(v6)),
        }
    }

    /// Writes `leases` as the lease file, as an earlier run would have.
    fn seed(dir: &Path, leases: &[Lease]) {
        fs::create_dir_all(dir.join(".ipam")).expect("mkdir");
        let bytes = serde_json::to_vec(&LeaseFile {
            leases: leases.to_vec(),
        })
        .expect("encode");
        fs::write(dir.join(".ipam/leases.json"), bytes).expect("write");
    }

    #[test]
    fn ipv6_cidr_parsing() {
        let c = cidr6("fd00:10:1::/64");
        assert_eq!(c.to_string(), "fd00:10:1::/64");
        assert_eq!(c.last(), ip6("fd00:10:1::ffff:ffff:ffff:ffff"));
        assert!(c.is_host(ip6("fd00:10:1::1")));
        assert!(c.is_host(ip6("fd00:10:1::ffff:ffff:ffff:ffff")));
        assert!(!c.is_host(ip6("fd00:10:1::")), "the network address");
        assert!(!c.contains(ip6("fd00:10:2::1")));
        assert_eq!(cidr6("fd00::/120").last(), ip6("fd00::ff"));
        assert!(matches!(
            Ipv6Cidr::parse("fd00::"),
            Err(CidrError::NoPrefix { .. })
        ));
        assert!(matches!(
            Ipv6Cidr::parse("10.0.0.0/24"),
            Err(CidrError::BadAddress6 { .. })
        ));
        assert!(matches!(
            Ipv6Cidr::parse("fd00::/129"),
            Err(CidrError::BadPrefix6 { .. })
        ));
        assert!(matches!(
            Ipv6Cidr::parse("fd00::1/64"),
            Err(CidrError::HostBitsSet6 { .. })
        ));
        for (s, prefix) in [("fd00::/63", 63), ("fd00::/121", 121), ("::/0", 0)] {
            assert_eq!(
                Ipv6Cidr::parse_pool(s),
                Err(CidrError::PrefixOutOfRange6 { prefix }),
                "{s}"
            );
        }
        assert!(Ipv6Cidr::parse_pool("fd00::/120").is_ok());
        assert_eq!(Ipv6Cidr::new(ip6("fd00::"), 64), Some(cidr6("fd00::/64")));
        assert_eq!(Ipv6Cidr::new(ip6("fd00::1"), 64), None);
        // The IPv4 parser refuses IPv6 and the other way round.
        assert!(matches!(
            Ipv4Cidr::parse("fd00::/64"),
            Err(CidrError::BadAddress { .. })
        ));
    }

    #[test]
    fn lowest_free_walks_the_leases_not_the_range() {
        let first = u128::from(ip6("fd00::1"));
        let last = u128::from(ip6("fd00::ffff:ffff:ffff:ffff"));
        assert_eq!(lowest_free(&[], first, last), Some(first));
        // A million leases in a row from the start of a /64: the next one
        // after them (a walk of the range would never end).
        let used: Vec<u128> = (first..first + 1_000_000).collect();
        assert_eq!(lowest_free(&used, first, last), Some(first + 1_000_000));
        // Gaps, repeats and values outside the range.
        let used = [first - 1, first, first, first + 1, first + 3, last + 5];
        assert_eq!(lowest_free(&used, first, last), Some(first + 2));
        // A full range.
        let used: Vec<u128> = (10..=20).collect();
        assert_eq!(lowest_free(&used, 10, 20), None);
        assert_eq!(lowest_free(&used, 10, 21), Some(21));
        // The very top of the address space.
        assert_eq!(lowest_free(&[u128::MAX], u128::MAX, u128::MAX), None);
        assert_eq!(
            lowest_free(&[u128::MAX - 1], u128::MAX - 1, u128::MAX),
            Some(u128::MAX)
        );
    }

    #[test]
    fn dual_stack_allocates_one_address_per_family() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(dir.path());
        let pools = dual("10.7.0.0/24", "fd00:7::/64");
        let a = s.allocate_pools(pools, "a", "eth0").expect("a");
        assert_eq!(a.v4, Some(ip("10.7.0.1")));
        assert_eq!(a.v6, Some(ip6("fd00:7::1")));
        let b = s.allocate_pools(pools, "b", "eth0").expect("b");
        assert_eq!(b.v4, Some(ip("10.7.0.2")));
        assert_eq!(b.v6, Some(ip6("fd00:7::2")));
        assert_eq!(b.to_string(), "10.7.0.2, fd00:7::2");
        // Idempotent, and what lookup says.
        assert_eq!(s.allocate_pools(pools, "a", "eth0").expect("a again"), a);
        assert_eq!(s.lookup("a", "eth0").expect("lookup"), a);
        assert_eq!(s.leases().expect("leases").len(), 4);
        // Release frees both families.
        assert_eq!(s.release("a", "eth0").expect("release"), a);
        assert_eq!(s.lookup("a", "eth0").expect("lookup"), PodIps::default());
        assert_eq!(s.release("a", "eth0").expect("again"), PodIps::default());
        assert_eq!(s.leases().expect("leases").len(), 2);
        let c = s.allocate_pools(pools, "c", "eth0").expect("c");
        assert_eq!((c.v4, c.v6), (a.v4, a.v6), "freed addresses reused");
    }

    #[test]
    fn ipv6_only_allocation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(dir.path());
        let pools = Pools::v6(cidr6("fd00:9::/120"));
        let a = s.allocate_pools(pools, "a", "eth0").expect("a");
        assert_eq!(
            a,
            PodIps {
                v4: None,
                v6: Some(ip6("fd00:9::1"))
            }
        );
        let b = s.allocate_pools(pools, "a", "net1").expect("a net1");
        assert_eq!(b.v6, Some(ip6("fd00:9::2")));
        let leases = s.leases().expect("leases");
        assert!(leases.iter().all(|l| l.ip.is_ipv6()), "{leases:?}");
    }

    #[test]
    fn no_family_is_leased_when_another_is_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A /120 with all 255 pod addresses taken (::1 to ::ff).
        let full: Vec<Lease> = (1..=255u128)
            .map(|i| Lease {
                ip: IpAddr::V6(Ipv6Addr::from(u128::from(ip6("fd00:5::")) + i)),
                container_id: format!("x{i}"),
                ifname: "eth0".into(),
            })
            .collect();
        seed(dir.path(), &full);
        let s = Store::new(dir.path());
        let e = s
            .allocate_pools(dual("10.5.0.0/24", "fd00:5::/120"), "new", "eth0")
            .expect_err("IPv6 range full");
        assert!(
            matches!(e, IpamError::Exhausted { cidr: Pool::V6(_) }),
            "{e}"
        );
        assert!(e.to_string().contains("fd00:5::/120"), "{e}");
        assert_eq!(e.code(), code::IPAM_EXHAUSTED);
        assert_eq!(s.lookup("new", "eth0").expect("lookup"), PodIps::default());
        assert_eq!(s.leases().expect("leases").len(), 255);
        // IPv4 full: no IPv6 lease either.
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(dir.path());
        let pools = dual("192.168.5.0/30", "fd00:5::/64");
        s.allocate_pools(pools, "a", "eth0").expect("a");
        s.allocate_pools(pools, "b", "eth0").expect("b");
        let e = s.allocate_pools(pools, "c", "eth0").expect_err("full");
        assert!(
            matches!(e, IpamError::Exhausted { cidr: Pool::V4(_) }),
            "{e}"
        );
        assert_eq!(s.lookup("c", "eth0").expect("lookup"), PodIps::default());
        assert_eq!(s.leases().expect("leases").len(), 4);
    }

    #[test]
    fn many_ipv6_leases_cost_no_scan_of_the_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = u128::from(ip6("fd00:6::"));
        let taken: Vec<Lease> = (1..=5000u128)
            .map(|i| Lease {
                ip: IpAddr::V6(Ipv6Addr::from(base + i)),
                container_id: format!("x{i}"),
                ifname: "eth0".into(),
            })
            .collect();
        seed(dir.path(), &taken);
        let s = Store::new(dir.path());
        let a = s
            .allocate_pools(Pools::v6(cidr6("fd00:6::/64")), "a", "eth0")
            .expect("a");
        assert_eq!(a.v6, Some(Ipv6Addr::from(base + 5001)));
    }

    #[test]
    fn a_family_no_longer_configured_loses_its_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::new(dir.path());
        s.allocate_pools(dual("10.3.0.0/24", "fd00:3::/64"), "a", "eth0")
            .expect("dual");
        let v4 = s
            .allocate_pools(Pools::v4(cidr("10.3.0.0/24")), "a", "eth0")
            .expect("v4 only");
        assert_eq!(
            v4,
            PodIps {
                v4: Some(ip("10.3.0.1")),
                v6: None
            }
        );
        assert_eq!(s.lookup("a", "eth0").expect("lookup"), v4);
        // A changed IPv6 range: the old lease is replaced.
        s.allocate_pools(dual("10.3.0.0/24", "fd00:3::/64"), "a", "eth0")
            .expect("dual");
        let moved = s
            .allocate_pools(dual("10.3.0.0/24", "fd00:4::/64"), "a", "eth0")
            .expect("moved");
        assert_eq!(moved.v6, Some(ip6("fd00:4::1")));
        assert_eq!(s.leases().expect("leases").len(), 2);
    }

    #[test]
    fn lease_files_of_ipv4_only_versions_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join(".ipam")).expect("mkdir");
        fs::write(
            dir.path().join(".ipam/leases.json"),
            br#"{"leases":[{"ip":"10.1.0.1","container_id":"a","ifname":"eth0"}]}"#,
        )
        .expect("write");
        let s = Store::new(dir.path());
        assert_eq!(
            s.lookup("a", "eth0").expect("lookup").v4,
            Some(ip("10.1.0.1"))
        );
        assert_eq!(
            s.allocate(cidr("10.1.0.0/24"), "b", "eth0").expect("b"),
            ip("10.1.0.2")
        );
    }
}
