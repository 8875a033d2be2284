//! A userspace WireGuard device: boringtun's sans-IO [`Tunn`] per peer over
//! a TUN device and one UDP socket (this kernel has no WireGuard module).
//!
//! - Cryptokey routing as in the WireGuard paper: a packet read from the TUN
//!   goes to the peer whose allowed IPs hold its destination (longest
//!   prefix); a packet decrypted from a peer is written to the TUN only if
//!   its source is within that peer's allowed IPs (else dropped, counted).
//! - Roaming: a peer's endpoint follows the source of its last
//!   authenticated packet.
//! - Long-term key rotation without loss (make before break), beyond the
//!   standard protocol:
//!   - the device may hold several private keys: the newest is used to
//!     start sessions, every one still accepts handshakes, and each peer
//!     has one session slot (a `Tunn`) per key, so sessions under the old
//!     key keep working while peers move to the new one. Outgoing packets
//!     take the newest slot with a live session;
//!   - a peer can be *draining*: it decrypts and validates what its
//!     sessions still carry but is no longer routed to, so the node that
//!     learnt its peer's new key moves its routes to the new peer entry in
//!     one step and keeps accepting the old sessions' last packets.
//! - Control: [`uapi`], the cross-platform WireGuard control protocol, over
//!   a unix socket: the standard `wg` tool configures and shows this device,
//!   and the node agent uses the same protocol (plus `x_` keys for the
//!   rotation features). A `set` is applied as one transaction: the data
//!   path sees the routes before or after it, never half of it.
//!
//! Threads: one reads the TUN and encrypts, one reads the socket and
//! decrypts, one drives the protocol timers (handshakes, keepalives,
//! rekeys). Each session slot is behind its own lock; the peer table behind
//! a read-write lock written only by control operations.

pub mod offload;
pub mod tun;
pub mod uapi;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use boringtun::{
    noise::{Packet, Tunn, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon},
    x25519,
};
use clustermesh_api::IpCidr;

use crate::keys::PrivateKey;

/// Largest UDP payload / IP packet handled (a 64 KiB datagram).
const BUF: usize = 65536;

/// Counters of the whole device.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Decrypted packets whose source is outside the sending peer's
    /// allowed IPs (dropped).
    pub rx_not_allowed: AtomicU64,
    /// Datagrams that are not WireGuard or match no peer (dropped).
    pub rx_unknown: AtomicU64,
    /// TUN packets for which no peer's allowed IPs match (dropped).
    pub tx_no_peer: AtomicU64,
    /// Handshake and decryption failures.
    pub rx_errors: AtomicU64,
}

/// One session slot of a peer: a `Tunn` under one of our private keys.
struct Slot {
    /// The upper 24 bits of this slot's session indexes.
    index: u32,
    /// Our public key this slot's handshakes use.
    local: [u8; 32],
    tunn: Mutex<Tunn>,
}

/// One peer.
pub struct Peer {
    pub public: [u8; 32],
    /// Newest key last.
    slots: RwLock<Vec<Arc<Slot>>>,
    endpoint: RwLock<Option<SocketAddr>>,
    allowed: RwLock<Vec<IpCidr>>,
    keepalive: Option<u16>,
    preshared: Option<[u8; 32]>,
    draining: AtomicBool,
}

impl Peer {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.read().ok().and_then(|e| *e)
    }
    pub fn allowed_ips(&self) -> Vec<IpCidr> {
        self.allowed.read().map(|a| a.clone()).unwrap_or_default()
    }
    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().map(|s| s.clone()).unwrap_or_default()
    }
    /// (tx bytes, rx bytes) of payload, over all slots.
    pub fn transfer(&self) -> (u64, u64) {
        self.slots()
            .iter()
            .fold((0, 0), |(tx, rx), s| match s.tunn.lock() {
                Ok(t) => {
                    let (_, t_tx, t_rx, _, _) = t.stats();
                    (tx + t_tx as u64, rx + t_rx as u64)
                }
                Err(_) => (tx, rx),
            })
    }
    /// Wall-clock time of the last completed handshake (any slot).
    pub fn last_handshake(&self) -> Option<SystemTime> {
        let age = self
            .slots()
            .iter()
            .filter_map(|s| s.tunn.lock().ok()?.time_since_last_handshake())
            .min()?;
        SystemTime::now().checked_sub(age)
    }
    pub fn persistent_keepalive(&self) -> Option<u16> {
        self.keepalive
    }
    pub fn preshared_key(&self) -> Option<[u8; 32]> {
        self.preshared
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
    /// The slot to send with: the newest with a live session, else the
    /// newest (which starts a handshake).
    fn send_slot(&self) -> Option<Arc<Slot>> {
        let slots = self.slots();
        slots
            .iter()
            .rev()
            .find(|s| {
                s.tunn
                    .lock()
                    .ok()
                    .and_then(|t| t.time_since_last_handshake())
                    .is_some()
            })
            .or_else(|| slots.last())
            .cloned()
    }
}

/// What a peer is configured with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerConfig {
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpCidr>,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<[u8; 32]>,
    /// Decrypt and validate only; never routed to.
    pub draining: bool,
}

struct State {
    /// Our private keys, newest last.
    keys: Vec<PrivateKey>,
    peers: HashMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, (Arc<Peer>, Arc<Slot>)>,
    next_index: u32,
    /// Allowed-IP routes, by prefix length, longest first.
    routes: Vec<(u8, HashMap<IpAddr, Arc<Peer>>)>,
}

/// A peer's mutable parts, kept to undo a failed transaction.
struct SavedPeer {
    peer: Arc<Peer>,
    slots: Vec<Arc<Slot>>,
    endpoint: Option<SocketAddr>,
    allowed: Vec<IpCidr>,
    draining: bool,
}

/// The device.
pub struct Device {
    tun: tun::Tun,
    socket: RwLock<Arc<UdpSocket>>,
    port: std::sync::atomic::AtomicU16,
    state: RwLock<State>,
    stop: AtomicBool,
    pub stats: DeviceStats,
}

/// Errors of device operations.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("TUN device {name}: {source}")]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("UDP port {port}: {source}")]
    Socket {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {peer}: allowed IP {cidr} is already routed to peer {other}")]
    AllowedIpTaken {
        peer: String,
        cidr: IpCidr,
        other: String,
    },
    #[error("no private key set")]
    NoKey,
    #[error("the device's state lock is poisoned")]
    Poisoned,
}

/// One change of a control transaction.
#[derive(Debug)]
pub enum Change {
    /// Standard `private_key=`: this key only (sessions under other keys
    /// end). Setting the key the device already uses alone changes nothing.
    SetKey(PrivateKey),
    /// Adds a newest key; older keys keep working (rotation overlap).
    AddKey(PrivateKey),
    /// Drops a key (by its public key) and its sessions.
    DropKey([u8; 32]),
    RemoveAllPeers,
    RemovePeer([u8; 32]),
    UpsertPeer([u8; 32], PeerConfig),
}

fn b64(k: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(k)
}

fn masked(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// One dual-stack UDP socket (`[::]:port`, IPv6-only off): peers over an
/// IPv4 or an IPv6 underlay, and roaming between the two. IPv4 senders come
/// in as v4-mapped addresses ([`offload::recv_gro`] gives them back as
/// IPv4); IPv4 destinations are sent as such (Linux hands them to its IPv4
/// path). A kernel without IPv6 gets an IPv4 socket.
fn dual_stack(port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s.into())
}

fn bind(port: u16) -> Result<UdpSocket, DeviceError> {
    let s = match dual_stack(port) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            tracing::warn!("IPv6 is off in this kernel: the device listens on IPv4 only");
            UdpSocket::bind(("0.0.0.0", port))
                .map_err(|source| DeviceError::Socket { port, source })?
        }
        Err(source) => return Err(DeviceError::Socket { port, source }),
    };
    s.set_read_timeout(Some(Duration::from_millis(250)))
        .map_err(|source| DeviceError::Socket { port, source })?;
    offload::set_buffers(&s, 4 << 20);
    if let Err(e) = offload::enable_gro(&s) {
        tracing::warn!(error = %e, "UDP GRO unavailable; one datagram per receive");
    }
    Ok(s)
}

impl State {
    fn rebuild_routes(&mut self) {
        let mut by_len: std::collections::BTreeMap<u8, HashMap<IpAddr, Arc<Peer>>> =
            Default::default();
        for p in self.peers.values().filter(|p| !p.is_draining()) {
            for c in p.allowed_ips() {
                by_len
                    .entry(c.prefix_len())
                    .or_default()
                    .insert(masked(c.addr(), c.prefix_len()), p.clone());
            }
        }
        self.routes = by_len.into_iter().rev().collect();
    }

    fn route(&self, dst: IpAddr) -> Option<Arc<Peer>> {
        let max = if dst.is_ipv4() { 32 } else { 128 };
        for (len, m) in &self.routes {
            if *len > max {
                continue;
            }
            if let Some(p) = m.get(&masked(dst, *len)) {
                return Some(p.clone());
            }
        }
        None
    }

    fn new_slot(&mut self, key: &PrivateKey, peer: &[u8; 32], cfg: &PeerConfig) -> Arc<Slot> {
        let index = self.next_index;
        self.next_index = (self.next_index + 1) & 0x00ff_ffff;
        let secret = key.secret();
        let local = x25519::PublicKey::from(&secret).to_bytes();
        Arc::new(Slot {
            index,
            local,
            tunn: Mutex::new(Tunn::new(
                secret,
                x25519::PublicKey::from(*peer),
                cfg.preshared_key,
                cfg.persistent_keepalive,
                index,
                None,
            )),
        })
    }

    fn reindex(&mut self) {
        self.by_index.clear();
        for p in self.peers.values() {
            for sl in p.slots() {
                self.by_index.insert(sl.index, (p.clone(), sl));
            }
        }
    }

    /// Gives every peer a slot per key (creating missing ones, dropping
    /// those of removed keys).
    fn sync_slots(&mut self) {
        let keys: Vec<PrivateKey> = self.keys.clone();
        let peers: Vec<Arc<Peer>> = self.peers.values().cloned().collect();
        for p in peers {
            let cfg = PeerConfig {
                persistent_keepalive: p.keepalive,
                preshared_key: p.preshared,
                ..Default::default()
            };
            let old = p.slots();
            let mut slots = Vec::new();
            for k in &keys {
                let local = k.public_bytes();
                match old.iter().find(|s| s.local == local) {
                    Some(s) => slots.push(s.clone()),
                    None => slots.push(self.new_slot(k, &p.public, &cfg)),
                }
            }
            if let Ok(mut g) = p.slots.write() {
                *g = slots;
            }
        }
        self.reindex();
    }

    fn upsert(&mut self, public: [u8; 32], cfg: PeerConfig) -> Result<(), DeviceError> {
        if !cfg.draining {
            for c in &cfg.allowed_ips {
                for (k, p) in &self.peers {
                    if *k != public && !p.is_draining() && p.allowed_ips().contains(c) {
                        return Err(DeviceError::AllowedIpTaken {
                            peer: b64(&public),
                            cidr: *c,
                            other: b64(k),
                        });
                    }
                }
            }
        }
        if let Some(p) = self.peers.get(&public).cloned()
            && p.keepalive == cfg.persistent_keepalive
            && p.preshared == cfg.preshared_key
        {
            // Same peer: its sessions stay.
            if let Ok(mut e) = p.endpoint.write()
                && cfg.endpoint.is_some()
            {
                *e = cfg.endpoint;
            }
            if let Ok(mut a) = p.allowed.write() {
                *a = cfg.allowed_ips;
            }
            p.draining.store(cfg.draining, Ordering::Relaxed);
            return Ok(());
        }
        if self.keys.is_empty() {
            return Err(DeviceError::NoKey);
        }
        let peer = Arc::new(Peer {
            public,
            slots: RwLock::new(Vec::new()),
            endpoint: RwLock::new(cfg.endpoint),
            allowed: RwLock::new(cfg.allowed_ips.clone()),
            keepalive: cfg.persistent_keepalive,
            preshared: cfg.preshared_key,
            draining: AtomicBool::new(cfg.draining),
        });
        self.peers.insert(public, peer);
        self.sync_slots();
        Ok(())
    }
}

impl Device {
    /// Creates the TUN device `name` (MTU `mtu`) in the calling thread's
    /// network namespace and binds UDP `port` (0: any free port).
    pub fn new(name: &str, mtu: u32, port: u16) -> Result<Arc<Self>, DeviceError> {
        let tun = tun::Tun::open(name, mtu).map_err(|source| DeviceError::Tun {
            name: name.to_owned(),
            source,
        })?;
        let socket = bind(port)?;
        let port = socket
            .local_addr()
            .map_err(|source| DeviceError::Socket { port, source })?
            .port();
        Ok(Arc::new(Self {
            tun,
            socket: RwLock::new(Arc::new(socket)),
            port: port.into(),
            state: RwLock::new(State {
                keys: Vec::new(),
                peers: HashMap::new(),
                by_index: HashMap::new(),
                next_index: 1,
                routes: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            stats: DeviceStats::default(),
        }))
    }

    pub fn name(&self) -> &str {
        self.tun.name()
    }

    pub fn listen_port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    fn socket(&self) -> Option<Arc<UdpSocket>> {
        self.socket.read().ok().map(|s| s.clone())
    }

    /// Rebinds the UDP socket to `port`.
    pub fn set_listen_port(&self, port: u16) -> Result<(), DeviceError> {
        if port == self.listen_port() && port != 0 {
            return Ok(());
        }
        let s = bind(port)?;
        let actual = s
            .local_addr()
            .map_err(|source| DeviceError::Socket { port, source })?
            .port();
        if let Ok(mut g) = self.socket.write() {
            *g = Arc::new(s);
        }
        self.port.store(actual, Ordering::Relaxed);
        Ok(())
    }

    /// Applies the changes as one transaction: all or, on the first error,
    /// none (the state is restored), routes rebuilt once at the end.
    pub fn apply(&self, changes: Vec<Change>) -> Result<(), DeviceError> {
        let mut st = self.state.write().map_err(|_| DeviceError::Poisoned)?;
        let saved: Vec<SavedPeer> = st
            .peers
            .values()
            .map(|p| SavedPeer {
                peer: p.clone(),
                slots: p.slots(),
                endpoint: p.endpoint(),
                allowed: p.allowed_ips(),
                draining: p.is_draining(),
            })
            .collect();
        let saved_keys = st.keys.clone();
        let saved_next = st.next_index;
        let mut result = Ok(());
        for c in changes {
            let r = match c {
                Change::SetKey(k) => {
                    let same = st.keys.len() == 1 && st.keys[0].public_bytes() == k.public_bytes();
                    if !same {
                        st.keys = vec![k];
                        st.sync_slots();
                    }
                    Ok(())
                }
                Change::AddKey(k) => {
                    let p = k.public_bytes();
                    st.keys.retain(|x| x.public_bytes() != p);
                    st.keys.push(k);
                    st.sync_slots();
                    Ok(())
                }
                Change::DropKey(p) => {
                    st.keys.retain(|x| x.public_bytes() != p);
                    st.sync_slots();
                    Ok(())
                }
                Change::RemoveAllPeers => {
                    st.peers.clear();
                    st.reindex();
                    Ok(())
                }
                Change::RemovePeer(p) => {
                    st.peers.remove(&p);
                    st.reindex();
                    Ok(())
                }
                Change::UpsertPeer(p, cfg) => st.upsert(p, cfg),
            };
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        if result.is_err() {
            st.keys = saved_keys;
            st.next_index = saved_next;
            st.peers.clear();
            for SavedPeer {
                peer: p,
                slots,
                endpoint,
                allowed,
                draining,
            } in saved
            {
                if let Ok(mut g) = p.slots.write() {
                    *g = slots;
                }
                if let Ok(mut g) = p.endpoint.write() {
                    *g = endpoint;
                }
                if let Ok(mut g) = p.allowed.write() {
                    *g = allowed;
                }
                p.draining.store(draining, Ordering::Relaxed);
                st.peers.insert(p.public, p);
            }
            st.reindex();
        }
        st.rebuild_routes();
        result
    }

    /// Sets the one private key (see [`Change::SetKey`]).
    pub fn set_private_key(&self, key: PrivateKey) {
        let _ = self.apply(vec![Change::SetKey(key)]);
    }

    /// The newest private key, for the control protocol's `get`.
    pub fn private_key(&self) -> Option<PrivateKey> {
        self.state.read().ok().and_then(|s| s.keys.last().cloned())
    }

    /// Public keys of every private key held, newest last.
    pub fn public_keys(&self) -> Vec<[u8; 32]> {
        self.state
            .read()
            .map(|s| s.keys.iter().map(PrivateKey::public_bytes).collect())
            .unwrap_or_default()
    }

    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.state
            .read()
            .map(|s| s.peers.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds or replaces a peer (see [`Change::UpsertPeer`]).
    pub fn upsert_peer(&self, public: [u8; 32], cfg: &PeerConfig) -> Result<(), DeviceError> {
        self.apply(vec![Change::UpsertPeer(public, cfg.clone())])
    }

    pub fn remove_peer(&self, public: &[u8; 32]) -> bool {
        let had = self
            .state
            .read()
            .map(|s| s.peers.contains_key(public))
            .unwrap_or(false);
        had && self.apply(vec![Change::RemovePeer(*public)]).is_ok()
    }

    /// Asks the device's threads to end (they notice within 250 ms).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Starts the three data-path threads.
    pub fn start(self: &Arc<Self>) -> Vec<std::thread::JoinHandle<()>> {
        let mut out = Vec::new();
        for (name, f) in [
            ("wg-tun", Self::tun_loop as fn(&Self)),
            ("wg-udp", Self::udp_loop),
            ("wg-timers", Self::timer_loop),
        ] {
            let d = self.clone();
            if let Ok(h) = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(&d))
            {
                out.push(h);
            }
        }
        out
    }

    fn send(&self, to: Option<SocketAddr>, pkt: &[u8]) {
        if let (Some(to), Some(s)) = (to, self.socket()) {
            let _ = s.send_to(pkt, to);
        }
    }

    /// TUN -> encrypt -> UDP. A TCP super-packet is cut into segments,
    /// each encrypted into one contiguous buffer, and the datagrams leave
    /// in as few `sendmsg` calls as UDP GSO allows.
    fn tun_loop(&self) {
        let mut pkt = vec![0u8; BUF + offload::VNET_HDR_LEN];
        let mut scratch = Vec::with_capacity(2048);
        let mut out = vec![0u8; 2 * BUF];
        // (offset, length) of each datagram written into `out`.
        let mut dgrams: Vec<(usize, usize)> = Vec::with_capacity(64);
        while !self.stop.load(Ordering::Relaxed) {
            let n = match self.tun.recv(&mut pkt) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading the TUN device");
                    return;
                }
            };
            let ip = pkt.get(offload::VNET_HDR_LEN..n).unwrap_or_default();
            let Some(dst) = Tunn::dst_address(ip) else {
                continue;
            };
            let peer = self.state.read().ok().and_then(|s| s.route(dst));
            let Some(peer) = peer else {
                self.stats.tx_no_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(slot) = peer.send_slot() else {
                continue;
            };
            let Ok(mut t) = slot.tunn.lock() else {
                continue;
            };
            dgrams.clear();
            let mut used = 0;
            let ok = offload::segments(&mut pkt[..n], &mut scratch, |seg| {
                let room = out.len() - used;
                if room < seg.len() + 32 || room < 148 {
                    return;
                }
                if let TunnResult::WriteToNetwork(b) = t.encapsulate(seg, &mut out[used..]) {
                    let len = b.len();
                    dgrams.push((used, len));
                    used += len;
                }
            });
            drop(t);
            if !ok {
                self.stats.tx_no_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (Some(to), Some(sock)) = (peer.endpoint(), self.socket()) else {
                continue;
            };
            // Runs of equal-size datagrams (a shorter one may end a run),
            // at most 64 KiB per send.
            let mut i = 0;
            while i < dgrams.len() {
                let (start, size) = dgrams[i];
                let mut end = start + size;
                let mut j = i + 1;
                while j < dgrams.len() && dgrams[j].1 <= size && end + dgrams[j].1 <= 65000 {
                    end += dgrams[j].1;
                    j += 1;
                    if dgrams[j - 1].1 < size {
                        break;
                    }
                }
                if let Err(e) = offload::send_gso(&sock, to, &out[start..end], size) {
                    tracing::debug!(error = %e, "sending");
                }
                i = j;
            }
        }
    }

    fn slot_for(&self, datagram: &[u8]) -> Option<(Arc<Peer>, Arc<Slot>)> {
        let st = self.state.read().ok()?;
        let index = match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(p) => {
                // Addressed to one of our keys, from one of our peers.
                for key in st.keys.iter().rev() {
                    let secret = key.secret();
                    let public = x25519::PublicKey::from(&secret);
                    let Ok(half) = parse_handshake_anon(&secret, &public, &p) else {
                        continue;
                    };
                    let peer = st.peers.get(&half.peer_static_public)?;
                    let slot = peer
                        .slots()
                        .into_iter()
                        .find(|s| s.local == public.to_bytes())?;
                    return Some((peer.clone(), slot));
                }
                return None;
            }
            Packet::HandshakeResponse(p) => p.receiver_idx,
            Packet::PacketCookieReply(p) => p.receiver_idx,
            Packet::PacketData(p) => p.receiver_idx,
        };
        st.by_index.get(&(index >> 8)).cloned()
    }

    /// UDP -> decrypt -> TUN (or a handshake reply back to the network).
    fn udp_loop(&self) {
        let mut buf = vec![0u8; BUF];
        let mut out = vec![0u8; BUF];
        let mut gro = offload::TcpCoalescer::default();
        while !self.stop.load(Ordering::Relaxed) {
            let Some(sock) = self.socket() else { return };
            let (n, from, seg) = match offload::recv_gro(&sock, &mut buf) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the UDP socket");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // What a batch decrypts goes to the TUN coalesced.
            for d in buf[..n].chunks(seg.max(1)) {
                self.receive(d, from, &mut out, &mut gro);
            }
            gro.flush(|b| {
                let _ = self.tun.send_with_header(b);
            });
        }
    }

    /// One datagram from the network.
    fn receive(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        out: &mut [u8],
        gro: &mut offload::TcpCoalescer,
    ) {
        let Some((peer, slot)) = self.slot_for(datagram) else {
            self.stats.rx_unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(mut t) = slot.tunn.lock() else {
            return;
        };
        let mut first = true;
        loop {
            let input: &[u8] = if first { datagram } else { &[] };
            let r = t.decapsulate(Some(from.ip()), input, out);
            if first && !matches!(r, TunnResult::Err(_)) {
                // Authenticated (a handshake message, data, or a
                // keepalive, which boringtun reports as Done): the peer is
                // at `from` now. Keepalives alone must do it, or a peer
                // behind NAT that only keeps its mapping alive is never
                // found.
                Self::roam(&peer, from);
            }
            first = false;
            match r {
                TunnResult::WriteToNetwork(b) => {
                    // Handshake replies (and packets queued for the new
                    // session) go to where the peer is now.
                    self.send(Some(from), b);
                    continue;
                }
                TunnResult::WriteToTunnelV4(p, src) => {
                    self.deliver(&peer, p, IpAddr::V4(src), from, gro);
                }
                TunnResult::WriteToTunnelV6(p, src) => {
                    self.deliver(&peer, p, IpAddr::V6(src), from, gro);
                }
                TunnResult::Err(WireGuardError::DuplicateCounter) => {}
                TunnResult::Err(e) => {
                    self.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %b64(&peer.public), error = ?e, "decapsulate");
                }
                TunnResult::Done => {}
            }
            break;
        }
    }

    /// Roaming: an authenticated packet from `from` moves the peer there.
    fn roam(peer: &Peer, from: SocketAddr) {
        if let Ok(mut e) = peer.endpoint.write()
            && *e != Some(from)
        {
            *e = Some(from);
        }
    }

    fn deliver(
        &self,
        peer: &Peer,
        pkt: &[u8],
        src: IpAddr,
        from: SocketAddr,
        gro: &mut offload::TcpCoalescer,
    ) {
        Self::roam(peer, from);
        if pkt.is_empty() {
            return; // keepalive
        }
        if !peer.allowed_ips().iter().any(|c| c.contains(src)) {
            self.stats.rx_not_allowed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        gro.push(pkt, |b| {
            let _ = self.tun.send_with_header(b);
        });
    }

    /// Handshake retries, keepalives and rekeys, for every slot.
    fn timer_loop(&self) {
        let mut out = vec![0u8; BUF];
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(250));
            for p in self.peers() {
                for sl in p.slots() {
                    let Ok(mut t) = sl.tunn.lock() else { continue };
                    match t.update_timers(&mut out) {
                        TunnResult::WriteToNetwork(b) => {
                            let to = p.endpoint();
                            self.send(to, b);
                        }
                        TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                        TunnResult::Err(e) => {
                            tracing::debug!(peer = %b64(&p.public), error = ?e, "timers");
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
