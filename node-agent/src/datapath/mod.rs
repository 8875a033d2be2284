//! The node's eBPF datapath: the compiled tunnel-ebpf objects, a loader that
//! pins their maps in the node's bpffs directory and attaches the programs
//! (TCX), typed access to the maps (tests and tools read them), and the
//! counters read back from the kernel ([`Counters`], through the pin).
//! What the maps must hold is the reconcilers' business
//! ([`crate::reconcilers`]); this module only loads, attaches and pins.
//!
//! Invariants:
//! - map and program names come from `tunnel_common`, the one place the
//!   kernel and user side agree on them;
//! - every map is pinned by name under the pin directory: both programs
//!   share them, and a restarted agent loading with the same directory
//!   adopts them with their contents (traffic keeps flowing meanwhile).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttach},
    },
};
use tunnel_common::{
    Counter, DatapathConfig, Direction, EndpointInfo, Ip6, IpCacheValue, Lb6BackendKey,
    Lb6ServiceKey, Lb6ServiceValue, LbBackendKey, LbBackendValue, LbServiceKey, LbServiceValue,
    STRICT_RANGE, Verdict, maps, metric_index, programs,
};

/// ELF objects built by build.rs (aya-build) from tunnel-ebpf.
pub mod objects {
    /// `from_endpoint`, for the TC ingress of a pod's host-side veth.
    pub static FROM_ENDPOINT: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from-endpoint"));
    /// `from_overlay`, for the TC ingress of the VXLAN device.
    pub static FROM_OVERLAY: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from-overlay"));
    /// `from_underlay`, for the TC ingress of the underlay interface
    /// (Geneve and direct routing).
    pub static FROM_UNDERLAY: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from-underlay"));
    /// `from_wireguard`, for the TC ingress of the WireGuard (TUN) device.
    pub static FROM_WIREGUARD: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from-wireguard"));
}

/// Errors of the datapath loader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating pin directory {path}: {source}")]
    PinDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading eBPF object {object}: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    #[error("eBPF object has no program {0:?}")]
    MissingProgram(&'static str),
    #[error("eBPF object has no map {0:?}")]
    MissingMap(&'static str),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("link of {program}: {source}")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning the link of {program} at {path}: {source}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("interface {iface:?} not found in this network namespace")]
    NoSuchInterface { iface: String },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The ifindex of `iface` in the calling thread's network namespace.
pub fn ifindex(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface).map_err(|_| Error::NoSuchInterface {
        iface: iface.to_owned(),
    })?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        return Err(Error::NoSuchInterface {
            iface: iface.to_owned(),
        });
    }
    Ok(idx)
}

/// The interface's MAC address, from sysfs of the calling thread's netns.
pub fn mac_of(iface: &str) -> Result<[u8; 6]> {
    let err = || Error::NoSuchInterface {
        iface: iface.to_owned(),
    };
    // sysfs shows the mounting netns; ask the kernel through an ioctl instead.
    let name = std::ffi::CString::new(iface).map_err(|_| err())?;
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(err());
    }
    // SAFETY: ifreq is plain data; the name fits (checked by the kernel's
    // IFNAMSIZ, we copy at most 15 bytes).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes().iter().take(15)) {
        *d = *s as libc::c_char;
    }
    // SAFETY: valid fd and ifreq for SIOCGIFHWADDR.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err());
    }
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// The sizes of the maps an operator may set, in entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// `CM_IPCACHE` and `CM_IPCACHE6`, each (host entries and pod-CIDR
    /// routes of the whole mesh).
    pub ipcache: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            ipcache: tunnel_common::MAX_IPCACHE,
        }
    }
}

/// The size of the map pinned as `name` under `pin_dir`, if there is one.
pub fn pinned_size(pin_dir: &Path, name: &'static str) -> Result<Option<u32>> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let map = MapData::from_pin(&path).map_err(map_err(name))?;
    Ok(Some(map.info().map_err(map_err(name))?.max_entries()))
}

impl MapSizes {
    /// The size each sized map gets under `pin_dir`: the configured one,
    /// except for a map pinned already, which keeps its size (resizing
    /// means recreating the map and dropping what it routes: that waits
    /// for the pin to be removed, and is logged).
    fn effective(&self, pin_dir: &Path) -> Result<Vec<(&'static str, u32)>> {
        let mut out = Vec::new();
        for name in [maps::IPCACHE, maps::IPCACHE6] {
            let size = match pinned_size(pin_dir, name)? {
                Some(pinned) if pinned != self.ipcache => {
                    tracing::warn!(
                        map = name,
                        pinned,
                        configured = self.ipcache,
                        "map pinned with another size keeps it; the configured size applies once the pin is removed"
                    );
                    pinned
                }
                _ => self.ipcache,
            };
            out.push((name, size));
        }
        Ok(out)
    }
}

fn load(
    object: &'static str,
    bytes: &[u8],
    pin_dir: &Path,
    program: &'static str,
    sizes: &[(&'static str, u32)],
) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    for (name, size) in sizes {
        loader.map_max_entries(name, *size);
    }
    let mut ebpf = loader
        .load(bytes)
        .map_err(|source| Error::Load { object, source })?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .ok_or(Error::MissingProgram(program))?
        .try_into()
        .map_err(|source| Error::Program { program, source })?;
    prog.load()
        .map_err(|source| Error::Program { program, source })?;
    Ok(ebpf)
}

/// Attaches `program` to the TCX ingress of `iface` and pins the link under
/// `pin_dir`, so the program stays attached when the agent exits or dies.
/// If a previous agent's pinned link exists, the program is swapped into it
/// atomically (`bpf_link_update`): no moment without a program, and never
/// two programs on one interface.
fn attach(ebpf: &mut Ebpf, program: &'static str, iface: &str, pin_dir: &Path) -> Result<Attached> {
    let idx = ifindex(iface)?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .ok_or(Error::MissingProgram(program))?
        .try_into()
        .map_err(|source| Error::Program { program, source })?;
    let perr = |source| Error::Program { program, source };
    let lerr = |source: aya::programs::links::LinkError| Error::Link { program, source };
    let path = pin_dir.join(format!("link_{program}_{idx}"));
    if path.exists() {
        let adopted = PinnedLink::from_pin(&path)
            .map_err(lerr)
            .and_then(|p| SchedClassifierLink::try_from(FdLink::from(p)).map_err(lerr))
            .and_then(|link| prog.attach_to_link(link).map_err(perr));
        match adopted {
            // The pin keeps the link attached whatever happens to our handle.
            Ok(_) => return Ok(Attached::Adopted),
            Err(e) => {
                // A stale pin (the interface was recreated): start fresh.
                tracing::warn!(path = %path.display(), error = %e, "stale pinned link; attaching anew");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let id = prog
        .attach(
            idx,
            TcAttach::Tcx {
                attach_type: TcAttachType::Ingress,
                order: LinkOrder::default(),
            },
        )
        .map_err(perr)?;
    let link = prog.take_link(id).map_err(perr)?;
    let fd: FdLink = link.try_into().map_err(lerr)?;
    fd.pin(&path).map_err(|source| Error::PinLink {
        program,
        path: path.clone(),
        source,
    })?;
    Ok(Attached::New)
}

/// Names of the programs attached to the TCX ingress of `iface` (in the
/// calling thread's network namespace), in order.
pub fn attached_programs(iface: &str) -> Result<Vec<String>> {
    let idx = ifindex(iface)?;
    let (_, progs) = SchedClassifier::query_tcx(idx, TcAttachType::Ingress).map_err(|source| {
        Error::Program {
            program: "query",
            source,
        }
    })?;
    Ok(progs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
        .collect())
}

/// How a program got attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new TCX link, now pinned.
    New,
    /// A previous agent's pinned link, now running this agent's program.
    Adopted,
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// The loaded datapath of one node. TCX links live as long as this value
/// (or longer once pinned); maps live in the pin directory.
pub struct Datapath {
    endpoint: Ebpf,
    overlay: Ebpf,
    underlay: Ebpf,
    wireguard: Ebpf,
    pin_dir: PathBuf,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the four programs, creating or adopting the maps pinned in
    /// `pin_dir` (which must be on bpffs), with the default sizes.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        Self::load_with(pin_dir, &MapSizes::default())
    }

    /// [`Datapath::load`] with the map sizes `sizes` (a map pinned already
    /// keeps its size: [`Datapath::ipcache_capacity`] reads what holds).
    pub fn load_with(pin_dir: &Path, sizes: &MapSizes) -> Result<Self> {
        std::fs::create_dir_all(pin_dir).map_err(|source| Error::PinDir {
            path: pin_dir.display().to_string(),
            source,
        })?;
        let sizes = sizes.effective(pin_dir)?;
        let endpoint = load(
            "from-endpoint",
            objects::FROM_ENDPOINT,
            pin_dir,
            programs::FROM_ENDPOINT,
            &sizes,
        )?;
        let overlay = load(
            "from-overlay",
            objects::FROM_OVERLAY,
            pin_dir,
            programs::FROM_OVERLAY,
            &sizes,
        )?;
        let underlay = load(
            "from-underlay",
            objects::FROM_UNDERLAY,
            pin_dir,
            programs::FROM_UNDERLAY,
            &sizes,
        )?;
        let wireguard = load(
            "from-wireguard",
            objects::FROM_WIREGUARD,
            pin_dir,
            programs::FROM_WIREGUARD,
            &sizes,
        )?;
        Ok(Self {
            endpoint,
            overlay,
            underlay,
            wireguard,
            pin_dir: pin_dir.to_owned(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The sizes of the pinned `CM_IPCACHE` and `CM_IPCACHE6`, in entries.
    pub fn ipcache_capacity(&self) -> Result<(u32, u32)> {
        let size = |name| pinned_size(&self.pin_dir, name)?.ok_or(Error::MissingMap(name));
        Ok((size(maps::IPCACHE)?, size(maps::IPCACHE6)?))
    }

    /// Attaches `from_endpoint` to the TC ingress of a pod's host-side veth
    /// (in the calling thread's network namespace), or adopts the pinned
    /// link a previous agent left.
    pub fn attach_endpoint(&mut self, iface: &str) -> Result<Attached> {
        attach(
            &mut self.endpoint,
            programs::FROM_ENDPOINT,
            iface,
            &self.pin_dir,
        )
    }

    /// Attaches (or adopts) `from_overlay` on the TC ingress of the VXLAN
    /// device.
    pub fn attach_overlay(&mut self, iface: &str) -> Result<Attached> {
        attach(
            &mut self.overlay,
            programs::FROM_OVERLAY,
            iface,
            &self.pin_dir,
        )
    }

    /// Attaches (or adopts) `from_underlay` on the TC ingress of the
    /// underlay interface (Geneve decapsulation, direct-routing delivery).
    pub fn attach_underlay(&mut self, iface: &str) -> Result<Attached> {
        attach(
            &mut self.underlay,
            programs::FROM_UNDERLAY,
            iface,
            &self.pin_dir,
        )
    }

    /// Attaches (or adopts) `from_wireguard` on the TC ingress of the
    /// WireGuard (TUN) device.
    pub fn attach_wireguard(&mut self, iface: &str) -> Result<Attached> {
        attach(
            &mut self.wireguard,
            programs::FROM_WIREGUARD,
            iface,
            &self.pin_dir,
        )
    }

    /// The configuration the programs run with.
    pub fn config(&self) -> Result<DatapathConfig> {
        let map = self
            .endpoint
            .map(maps::CONFIG)
            .ok_or(Error::MissingMap(maps::CONFIG))?;
        let a: Array<&MapData, DatapathConfig> =
            Array::try_from(map).map_err(map_err(maps::CONFIG))?;
        a.get(&0, 0).map_err(map_err(maps::CONFIG))
    }

    pub fn set_config(&mut self, cfg: DatapathConfig) -> Result<()> {
        let map = self
            .endpoint
            .map_mut(maps::CONFIG)
            .ok_or(Error::MissingMap(maps::CONFIG))?;
        let mut a: Array<&mut MapData, DatapathConfig> =
            Array::try_from(map).map_err(map_err(maps::CONFIG))?;
        a.set(0, &cfg, 0).map_err(map_err(maps::CONFIG))
    }

    fn endpoints(&mut self) -> Result<HashMap<&mut MapData, u32, EndpointInfo>> {
        let map = self
            .endpoint
            .map_mut(maps::ENDPOINTS)
            .ok_or(Error::MissingMap(maps::ENDPOINTS))?;
        HashMap::try_from(map).map_err(map_err(maps::ENDPOINTS))
    }

    /// Declares a local endpoint (delivery target).
    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, info: EndpointInfo) -> Result<()> {
        self.endpoints()?
            .insert(&u32::from(ip).to_be(), &info, 0)
            .map_err(map_err(maps::ENDPOINTS))
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<()> {
        match crate::datapath::absent_ok(self.endpoints()?.remove(&u32::from(ip).to_be())) {
            Ok(()) => Ok(()),
            Err(e) => Err(map_err(maps::ENDPOINTS)(e)),
        }
    }

    fn ipcache(&mut self) -> Result<LpmTrie<&mut MapData, u32, IpCacheValue>> {
        let map = self
            .endpoint
            .map_mut(maps::IPCACHE)
            .ok_or(Error::MissingMap(maps::IPCACHE))?;
        LpmTrie::try_from(map).map_err(map_err(maps::IPCACHE))
    }

    /// Sets the ip-cache entry of an IPv4 prefix.
    pub fn upsert_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix_len: u8,
        v: IpCacheValue,
    ) -> Result<()> {
        self.ipcache()?
            .insert(&Key::new(prefix_len.into(), u32::from(addr).to_be()), &v, 0)
            .map_err(map_err(maps::IPCACHE))
    }

    pub fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        match crate::datapath::absent_ok(
            self.ipcache()?
                .remove(&Key::new(prefix_len.into(), u32::from(addr).to_be())),
        ) {
            Ok(()) => Ok(()),
            Err(e) => Err(map_err(maps::IPCACHE)(e)),
        }
    }

    /// What the programs find for `ip` in the ip-cache (longest prefix
    /// match, as the kernel looks it up).
    pub fn lookup(&mut self, ip: Ipv4Addr) -> Result<Option<IpCacheValue>> {
        match self.ipcache()?.get(&Key::new(32, u32::from(ip).to_be()), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(maps::IPCACHE)(e)),
        }
    }

    /// Every ip-cache entry: (address, prefix length, value), in key order.
    pub fn ipcache_entries(&mut self) -> Result<Vec<(Ipv4Addr, u8, IpCacheValue)>> {
        let m = self.ipcache()?;
        let mut out = Vec::new();
        for k in m.keys() {
            let k = k.map_err(map_err(maps::IPCACHE))?;
            match m.get(&k, 0) {
                Ok(v) => out.push((
                    Ipv4Addr::from(u32::from_be(k.data())),
                    k.prefix_len() as u8,
                    v,
                )),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::IPCACHE)(e)),
            }
        }
        out.sort_by_key(|(a, l, _)| (*a, *l));
        Ok(out)
    }

    /// Every local endpoint, in address order.
    pub fn endpoint_entries(&mut self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>> {
        let m = self.endpoints()?;
        let mut out = Vec::new();
        for r in m.iter() {
            let (k, v) = r.map_err(map_err(maps::ENDPOINTS))?;
            out.push((Ipv4Addr::from(u32::from_be(k)), v));
        }
        out.sort_by_key(|(a, _)| *a);
        Ok(out)
    }

    /// The identity traffic from `src` last arrived with over the overlay.
    pub fn source_identity(&mut self, src: Ipv4Addr) -> Result<Option<u32>> {
        let map = self
            .overlay
            .map_mut(maps::SOURCE_IDENTITY)
            .ok_or(Error::MissingMap(maps::SOURCE_IDENTITY))?;
        // aya's HashMap handle also reads LRU hash maps.
        let m: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(map).map_err(map_err(maps::SOURCE_IDENTITY))?;
        match m.get(&u32::from(src).to_be(), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(maps::SOURCE_IDENTITY)(e)),
        }
    }

    fn endpoints6(&mut self) -> Result<HashMap<&mut MapData, Ip6, EndpointInfo>> {
        let map = self
            .endpoint
            .map_mut(maps::ENDPOINTS6)
            .ok_or(Error::MissingMap(maps::ENDPOINTS6))?;
        HashMap::try_from(map).map_err(map_err(maps::ENDPOINTS6))
    }

    /// Declares a local IPv6 endpoint (`CM_ENDPOINTS6`).
    pub fn upsert_endpoint6(&mut self, ip: Ipv6Addr, info: EndpointInfo) -> Result<()> {
        self.endpoints6()?
            .insert(&ip.octets(), &info, 0)
            .map_err(map_err(maps::ENDPOINTS6))
    }

    pub fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<()> {
        match crate::datapath::absent_ok(self.endpoints6()?.remove(&ip.octets())) {
            Ok(()) => Ok(()),
            Err(e) => Err(map_err(maps::ENDPOINTS6)(e)),
        }
    }

    /// Every local IPv6 endpoint, in address order.
    pub fn endpoint6_entries(&mut self) -> Result<Vec<(Ipv6Addr, EndpointInfo)>> {
        let m = self.endpoints6()?;
        let mut out = Vec::new();
        for r in m.iter() {
            let (k, v) = r.map_err(map_err(maps::ENDPOINTS6))?;
            out.push((Ipv6Addr::from(k), v));
        }
        out.sort_by_key(|(a, _)| *a);
        Ok(out)
    }

    fn ipcache6(&mut self) -> Result<LpmTrie<&mut MapData, Ip6, IpCacheValue>> {
        let map = self
            .endpoint
            .map_mut(maps::IPCACHE6)
            .ok_or(Error::MissingMap(maps::IPCACHE6))?;
        LpmTrie::try_from(map).map_err(map_err(maps::IPCACHE6))
    }

    /// Sets the ip-cache entry of an IPv6 prefix (`CM_IPCACHE6`).
    pub fn upsert_ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix_len: u8,
        v: IpCacheValue,
    ) -> Result<()> {
        self.ipcache6()?
            .insert(&Key::new(prefix_len.into(), addr.octets()), &v, 0)
            .map_err(map_err(maps::IPCACHE6))
    }

    pub fn remove_ipcache6(&mut self, addr: Ipv6Addr, prefix_len: u8) -> Result<()> {
        match crate::datapath::absent_ok(
            self.ipcache6()?
                .remove(&Key::new(prefix_len.into(), addr.octets())),
        ) {
            Ok(()) => Ok(()),
            Err(e) => Err(map_err(maps::IPCACHE6)(e)),
        }
    }

    /// What the programs find for `ip` in the IPv6 ip-cache (longest
    /// prefix match).
    pub fn lookup6(&mut self, ip: Ipv6Addr) -> Result<Option<IpCacheValue>> {
        match self.ipcache6()?.get(&Key::new(128, ip.octets()), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(maps::IPCACHE6)(e)),
        }
    }

    /// Every IPv6 ip-cache entry: (address, prefix length, value), in key
    /// order.
    pub fn ipcache6_entries(&mut self) -> Result<Vec<(Ipv6Addr, u8, IpCacheValue)>> {
        let m = self.ipcache6()?;
        let mut out = Vec::new();
        for k in m.keys() {
            let k = k.map_err(map_err(maps::IPCACHE6))?;
            match m.get(&k, 0) {
                Ok(v) => out.push((Ipv6Addr::from(k.data()), k.prefix_len() as u8, v)),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::IPCACHE6)(e)),
            }
        }
        out.sort_by_key(|(a, l, _)| (*a, *l));
        Ok(out)
    }

    /// The identity traffic from the IPv6 `src` last arrived with
    /// (`CM_SRC_IDENTITY6`).
    pub fn source_identity6(&mut self, src: Ipv6Addr) -> Result<Option<u32>> {
        let map = self
            .overlay
            .map_mut(maps::SOURCE_IDENTITY6)
            .ok_or(Error::MissingMap(maps::SOURCE_IDENTITY6))?;
        // aya's HashMap handle also reads LRU hash maps.
        let m: HashMap<&mut MapData, Ip6, u32> =
            HashMap::try_from(map).map_err(map_err(maps::SOURCE_IDENTITY6))?;
        match m.get(&src.octets(), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(maps::SOURCE_IDENTITY6)(e)),
        }
    }

    /// Adds an IPv6 mesh pod range to `CM_STRICT_RANGES6` (tests and
    /// tools; the agent's strict-ranges reconciler owns the map).
    pub fn upsert_strict_range6(&mut self, addr: Ipv6Addr, prefix_len: u8) -> Result<()> {
        let map = self
            .endpoint
            .map_mut(maps::STRICT_RANGES6)
            .ok_or(Error::MissingMap(maps::STRICT_RANGES6))?;
        let mut m: LpmTrie<&mut MapData, Ip6, u32> =
            LpmTrie::try_from(map).map_err(map_err(maps::STRICT_RANGES6))?;
        m.insert(
            &Key::new(prefix_len.into(), addr.octets()),
            &STRICT_RANGE,
            0,
        )
        .map_err(map_err(maps::STRICT_RANGES6))
    }

    /// The backends new flows to a frontend (address, port, IP protocol)
    /// are spread over, in slot order; None: not a frontend.
    pub fn lb_selectable(
        &mut self,
        frontend: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> Result<Option<Vec<(Ipv4Addr, u16)>>> {
        let map = self
            .endpoint
            .map_mut(maps::LB_SERVICES)
            .ok_or(Error::MissingMap(maps::LB_SERVICES))?;
        let m: HashMap<&mut MapData, LbServiceKey, LbServiceValue> =
            HashMap::try_from(map).map_err(map_err(maps::LB_SERVICES))?;
        let mut key = LbServiceKey {
            addr: u32::from(frontend).to_be(),
            port: port.to_be(),
            proto,
            ..Default::default()
        };
        let count = match m.get(&key, 0) {
            Ok(v) => v.count,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err(maps::LB_SERVICES)(e)),
        };
        let mut out = Vec::new();
        for slot in 1..=count {
            key.slot = slot;
            let v = m.get(&key, 0).map_err(map_err(maps::LB_SERVICES))?;
            out.push((Ipv4Addr::from(u32::from_be(v.addr)), u16::from_be(v.port)));
        }
        Ok(Some(out))
    }

    /// Every backend flows to a frontend (address, port, IP protocol) may
    /// keep: (address, port, `LB_BACKEND_*` state), sorted.
    pub fn lb_allowed(
        &mut self,
        frontend: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> Result<Vec<(Ipv4Addr, u16, u32)>> {
        let map = self
            .endpoint
            .map_mut(maps::LB_BACKENDS)
            .ok_or(Error::MissingMap(maps::LB_BACKENDS))?;
        let m: HashMap<&mut MapData, LbBackendKey, LbBackendValue> =
            HashMap::try_from(map).map_err(map_err(maps::LB_BACKENDS))?;
        let (fe, port) = (u32::from(frontend).to_be(), port.to_be());
        let mut out = Vec::new();
        for kv in m.iter() {
            let (k, v) = kv.map_err(map_err(maps::LB_BACKENDS))?;
            if k.frontend == fe && k.frontend_port == port && k.proto == proto {
                out.push((
                    Ipv4Addr::from(u32::from_be(k.backend)),
                    u16::from_be(k.backend_port),
                    v.state,
                ));
            }
        }
        out.sort();
        Ok(out)
    }

    /// [`Datapath::lb_selectable`] for an IPv6 frontend (`CM_LB6_SERVICES`).
    pub fn lb6_selectable(
        &mut self,
        frontend: Ipv6Addr,
        port: u16,
        proto: u8,
    ) -> Result<Option<Vec<(Ipv6Addr, u16)>>> {
        let map = self
            .endpoint
            .map_mut(maps::LB6_SERVICES)
            .ok_or(Error::MissingMap(maps::LB6_SERVICES))?;
        let m: HashMap<&mut MapData, Lb6ServiceKey, Lb6ServiceValue> =
            HashMap::try_from(map).map_err(map_err(maps::LB6_SERVICES))?;
        let mut key = Lb6ServiceKey {
            addr: frontend.octets(),
            port: port.to_be(),
            proto,
            ..Default::default()
        };
        let count = match m.get(&key, 0) {
            Ok(v) => v.count,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err(maps::LB6_SERVICES)(e)),
        };
        let mut out = Vec::new();
        for slot in 1..=count {
            key.slot = slot;
            let v = m.get(&key, 0).map_err(map_err(maps::LB6_SERVICES))?;
            out.push((Ipv6Addr::from(v.addr), u16::from_be(v.port)));
        }
        Ok(Some(out))
    }

    /// [`Datapath::lb_allowed`] for an IPv6 frontend (`CM_LB6_BACKENDS`).
    pub fn lb6_allowed(
        &mut self,
        frontend: Ipv6Addr,
        port: u16,
        proto: u8,
    ) -> Result<Vec<(Ipv6Addr, u16, u32)>> {
        let map = self
            .endpoint
            .map_mut(maps::LB6_BACKENDS)
            .ok_or(Error::MissingMap(maps::LB6_BACKENDS))?;
        let m: HashMap<&mut MapData, Lb6BackendKey, LbBackendValue> =
            HashMap::try_from(map).map_err(map_err(maps::LB6_BACKENDS))?;
        let (fe, port) = (frontend.octets(), port.to_be());
        let mut out = Vec::new();
        for kv in m.iter() {
            let (k, v) = kv.map_err(map_err(maps::LB6_BACKENDS))?;
            if k.frontend == fe && k.frontend_port == port && k.proto == proto {
                out.push((
                    Ipv6Addr::from(k.backend),
                    u16::from_be(k.backend_port),
                    v.state,
                ));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every IPv6 frontend address with its number of (port, protocol)
    /// frontends (`CM_LB6_FRONTENDS`), sorted.
    pub fn lb6_frontends(&mut self) -> Result<Vec<(Ipv6Addr, u32)>> {
        let map = self
            .endpoint
            .map_mut(maps::LB6_FRONTENDS)
            .ok_or(Error::MissingMap(maps::LB6_FRONTENDS))?;
        let m: HashMap<&mut MapData, Ip6, u32> =
            HashMap::try_from(map).map_err(map_err(maps::LB6_FRONTENDS))?;
        let mut out = Vec::new();
        for kv in m.iter() {
            let (k, v) = kv.map_err(map_err(maps::LB6_FRONTENDS))?;
            out.push((Ipv6Addr::from(k), v));
        }
        out.sort();
        Ok(out)
    }

    /// The counter of (direction, verdict), summed over CPUs.
    pub fn counter(&self, dir: Direction, verdict: Verdict) -> Result<Counter> {
        Counters::open(&self.pin_dir)?.get(dir, verdict)
    }

    /// Every non-zero counter, for metrics export and tests.
    pub fn counters(&self) -> Result<Vec<(Direction, Verdict, Counter)>> {
        Counters::open(&self.pin_dir)?.all()
    }
}

/// The per-CPU verdict counters (`CM_METRICS`), opened through their pin so
/// any task can read them without the loader.
pub struct Counters {
    map: PerCpuArray<MapData, Counter>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

impl Counters {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let data =
            MapData::from_pin(pin_dir.join(maps::METRICS)).map_err(map_err(maps::METRICS))?;
        let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(map_err(maps::METRICS))?;
        Ok(Self { map })
    }

    /// The counter of (direction, verdict), summed over CPUs.
    pub fn get(&self, dir: Direction, verdict: Verdict) -> Result<Counter> {
        let per_cpu = self
            .map
            .get(&metric_index(dir, verdict), 0)
            .map_err(map_err(maps::METRICS))?;
        Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    /// Every non-zero counter.
    pub fn all(&self) -> Result<Vec<(Direction, Verdict, Counter)>> {
        let mut out = Vec::new();
        for dir in [Direction::Egress, Direction::Ingress] {
            for v in Verdict::ALL {
                let c = self.get(dir, v)?;
                if c.packets != 0 {
                    out.push((dir, v, c));
                }
            }
        }
        Ok(out)
    }
}

/// Writes `CM_FLOW_CONFIG` (flow events on or off, the trace interval)
/// through its pin.
pub fn set_flow_config(pin_dir: &Path, cfg: tunnel_common::FlowConfig) -> Result<()> {
    let name = maps::FLOW_CONFIG;
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let mut a: Array<MapData, tunnel_common::FlowConfig> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(name))?;
    a.set(0, &cfg, 0).map_err(map_err(name))
}

/// Events the ring buffer had no room for (`CM_FLOW_LOST`, summed over
/// CPUs).
pub fn flow_lost(pin_dir: &Path) -> Result<u64> {
    let name = maps::FLOW_LOST;
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let a: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_err(name))?;
    Ok(a.get(&0, 0).map_err(map_err(name))?.iter().sum())
}

/// The flow events ring buffer (`CM_FLOWS`) through its pin, ready for
/// tokio to wait on.
pub fn flow_ring(
    pin_dir: &Path,
) -> std::result::Result<tokio::io::unix::AsyncFd<aya::maps::RingBuf<MapData>>, anyhow::Error> {
    let name = maps::FLOWS;
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let ring =
        aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(data)).map_err(map_err(name))?;
    // SAFETY: the ring owns its fd and keeps it open as long as the
    // AsyncFd holds it (the registration's requirement).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot wait on the flow ring buffer: {}", e.into_parts().1))
}

/// Policy verdicts per local endpoint (`CM_POLICY_STATS`, read through
/// its pin): (host-side ifindex, direction, verdict, counter summed over
/// CPUs), non-zero ones only.
pub fn policy_stats(pin_dir: &Path) -> Result<Vec<(u32, Direction, Verdict, Counter)>> {
    let name = maps::POLICY_STATS;
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let map: aya::maps::PerCpuHashMap<MapData, tunnel_common::PolicyStatsKey, Counter> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))
            .map_err(map_err(name))?;
    let mut out = Vec::new();
    for item in map.iter() {
        let (k, per_cpu) = item.map_err(map_err(name))?;
        let dir = if k.direction == Direction::Ingress as u8 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let Some(v) = Verdict::ALL.into_iter().find(|v| *v as u8 == k.verdict) else {
            continue;
        };
        let c = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        });
        if c.packets != 0 {
            out.push((k.ifindex, dir, v, c));
        }
    }
    out.sort_by_key(|(i, d, v, _)| (*i, *d as u8, *v as u8));
    Ok(out)
}

/// Writes `CM_POLICY` prefixes with plain inserts, nothing else (the
/// policy benchmark's baseline for `PolicyMap::update`).
pub fn policy_insert_raw(
    pin_dir: &Path,
    entries: &std::collections::BTreeMap<
        (u32, tunnel_common::PolicyKey),
        tunnel_common::PolicyValue,
    >,
) -> Result<()> {
    let name = maps::POLICY;
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let mut map: LpmTrie<MapData, tunnel_common::PolicyKey, tunnel_common::PolicyValue> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).map_err(map_err(name))?;
    for ((len, key), v) in entries {
        map.insert(&Key::new(*len, *key), v, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

/// The local endpoints by host-side ifindex: their addresses (both maps)
/// and identity, read through the pins.
pub fn endpoints_by_ifindex(
    pin_dir: &Path,
) -> Result<std::collections::BTreeMap<u32, (Vec<std::net::IpAddr>, u32)>> {
    let mut out: std::collections::BTreeMap<u32, (Vec<std::net::IpAddr>, u32)> =
        std::collections::BTreeMap::new();
    let d4 = MapData::from_pin(pin_dir.join(maps::ENDPOINTS)).map_err(map_err(maps::ENDPOINTS))?;
    let m4: HashMap<MapData, u32, EndpointInfo> =
        HashMap::try_from(aya::maps::Map::HashMap(d4)).map_err(map_err(maps::ENDPOINTS))?;
    for item in m4.iter() {
        let (k, v) = item.map_err(map_err(maps::ENDPOINTS))?;
        let e = out.entry(v.ifindex).or_insert((Vec::new(), v.identity));
        e.0.push(Ipv4Addr::from(u32::from_be(k)).into());
    }
    let d6 =
        MapData::from_pin(pin_dir.join(maps::ENDPOINTS6)).map_err(map_err(maps::ENDPOINTS6))?;
    let m6: HashMap<MapData, Ip6, EndpointInfo> =
        HashMap::try_from(aya::maps::Map::HashMap(d6)).map_err(map_err(maps::ENDPOINTS6))?;
    for item in m6.iter() {
        let (k, v) = item.map_err(map_err(maps::ENDPOINTS6))?;
        let e = out.entry(v.ifindex).or_insert((Vec::new(), v.identity));
        e.0.push(Ipv6Addr::from(k).into());
    }
    Ok(out)
}

/// The local endpoint identities with a policy and their
/// `CM_POLICY_STATE` (flags, revision), read through the pin.
pub fn policy_states(pin_dir: &Path) -> Result<Vec<(u32, tunnel_common::PolicyState)>> {
    let name = maps::POLICY_STATE;
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let map: HashMap<MapData, u32, tunnel_common::PolicyState> =
        HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(name))?;
    let mut out = Vec::new();
    for item in map.iter() {
        out.push(item.map_err(map_err(name))?);
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

/// A map delete that found the key absent already is no error:
/// aya reports a missing key of `bpf_map_delete_elem` as the syscall's
/// ENOENT, not as `MapError::KeyNotFound` (that is lookups only).
pub fn absent_ok(
    r: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Why this agent may not own the pin directory.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another node-agent runs with --bpf-pin-dir {path} (it holds the directory's lock); stop it first"
    )]
    Held { path: PathBuf },
    #[error("locking --bpf-pin-dir {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Takes the exclusive lock of the pin directory for as long as the
/// returned file is open (the process's life): a second agent for the same
/// node's datapath refuses to start instead of fighting over its maps.
pub fn lock_pin_dir(pin_dir: &Path) -> std::result::Result<std::fs::File, LockError> {
    use std::os::fd::AsRawFd as _;
    let io = |source| LockError::Io {
        path: pin_dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(pin_dir).map_err(io)?;
    let dir = std::fs::File::open(pin_dir).map_err(io)?;
    // SAFETY: flock on an open fd; the lock goes with the fd.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            LockError::Held {
                path: pin_dir.to_owned(),
            }
        } else {
            io(e)
        });
    }
    Ok(dir)
}

/// The interfaces of one node to attach the programs to.
#[derive(Debug, Clone, Default)]
pub struct NodeIfaces {
    /// Host-side veths of endpoints given on the command line.
    pub endpoints: Vec<String>,
    pub overlay: Option<String>,
    pub underlay: Option<String>,
    pub wireguard: Option<String>,
}

/// What attaching learnt inside the node's namespace.
#[derive(Debug)]
pub struct Attachment {
    pub dp: Datapath,
    pub overlay_ifindex: u32,
    pub underlay_ifindex: u32,
    pub wg_ifindex: u32,
    /// Host-side interface -> (ifindex, MAC).
    pub ifaces: std::collections::BTreeMap<String, (u32, [u8; 6])>,
}

/// Loads the datapath and attaches every program of the node, inside
/// network namespace `netns` (None: ours), on a thread of its own.
pub fn attach_node(
    ifaces: &NodeIfaces,
    netns: Option<&str>,
    pin_dir: &Path,
    sizes: &MapSizes,
) -> std::result::Result<Attachment, AttachError> {
    clustermesh_api::netns::run_in_named(netns, || attach_all(ifaces, pin_dir, sizes))?
}

/// Why the node's programs could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Netns(#[from] clustermesh_api::netns::Error),
    #[error("loading the datapath: {0}")]
    Load(#[source] Box<Error>),
    #[error("attaching to {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: Box<Error>,
    },
}

fn attach_all(
    ifaces: &NodeIfaces,
    pin_dir: &Path,
    sizes: &MapSizes,
) -> std::result::Result<Attachment, AttachError> {
    let mut dp = Datapath::load_with(pin_dir, sizes).map_err(|e| AttachError::Load(Box::new(e)))?;
    fn at(iface: &str) -> impl FnOnce(Error) -> AttachError + '_ {
        move |source| AttachError::Attach {
            iface: iface.to_owned(),
            source: Box::new(source),
        }
    }
    let mut known = std::collections::BTreeMap::new();
    for i in &ifaces.endpoints {
        let how = dp.attach_endpoint(i).map_err(at(i))?;
        known.insert(
            i.clone(),
            (ifindex(i).map_err(at(i))?, mac_of(i).map_err(at(i))?),
        );
        println!("attached from_endpoint to {i} ({how:?})");
    }
    let mut one = |iface: &Option<String>,
                   f: fn(&mut Datapath, &str) -> Result<Attached>,
                   what: &str|
     -> std::result::Result<u32, AttachError> {
        let Some(i) = iface else { return Ok(0) };
        let how = f(&mut dp, i).map_err(at(i))?;
        println!("attached {what} to {i} ({how:?})");
        ifindex(i).map_err(at(i))
    };
    let overlay_ifindex = one(&ifaces.overlay, Datapath::attach_overlay, "from_overlay")?;
    let underlay_ifindex = one(&ifaces.underlay, Datapath::attach_underlay, "from_underlay")?;
    let wg_ifindex = one(
        &ifaces.wireguard,
        Datapath::attach_wireguard,
        "from_wireguard",
    )?;
    Ok(Attachment {
        dp,
        overlay_ifindex,
        underlay_ifindex,
        wg_ifindex,
        ifaces: known,
    })
}
