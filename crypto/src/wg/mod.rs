//! A userspace WireGuard device: boringtun's sans-IO [`Tunn`] per peer over
//! a TUN device and one UDP socket (this kernel has no WireGuard module).
//!
//! - Cryptokey routing as in the WireGuard paper: a packet read from the TUN
//!   goes to the peer whose allowed IPs hold its destination (longest
//!   prefix); a packet decrypted from a peer is written to the TUN only if
//!   its source is within that peer's allowed IPs (else dropped, counted).
//! - Roaming: a peer's endpoint follows the source of its last
//!   authenticated packet.
//! - Control: [`uapi`], the cross-platform WireGuard control protocol, over
//!   a unix socket: the standard `wg` tool configures and shows this device,
//!   and the node agent uses the same protocol.
//!
//! Threads: one reads the TUN and encrypts, one reads the socket and
//! decrypts, one drives the protocol timers (handshakes, keepalives,
//! rekeys). Each peer's tunnel state is behind its own lock; the peer table
//! behind a read-write lock written only by control operations.

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

/// Counters of the whole device (also exported through `get`).
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

/// One peer.
pub struct Peer {
    pub public: [u8; 32],
    /// The upper 24 bits of this peer's session indexes.
    index: u32,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
    allowed: RwLock<Vec<IpCidr>>,
    keepalive: Option<u16>,
}

impl Peer {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.read().ok().and_then(|e| *e)
    }
    pub fn allowed_ips(&self) -> Vec<IpCidr> {
        self.allowed.read().map(|a| a.clone()).unwrap_or_default()
    }
    /// (tx bytes, rx bytes) of payload.
    pub fn transfer(&self) -> (u64, u64) {
        match self.tunn.lock() {
            Ok(t) => {
                let (_, tx, rx, _, _) = t.stats();
                (tx as u64, rx as u64)
            }
            Err(_) => (0, 0),
        }
    }
    /// Wall-clock time of the last completed handshake.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        let age = self.tunn.lock().ok()?.time_since_last_handshake()?;
        SystemTime::now().checked_sub(age)
    }
    pub fn persistent_keepalive(&self) -> Option<u16> {
        self.keepalive
    }
}

/// What a peer is configured with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerConfig {
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpCidr>,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<[u8; 32]>,
}

struct State {
    key: Option<PrivateKey>,
    peers: HashMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    next_index: u32,
    /// Allowed-IP routes, by prefix length, longest first.
    routes: Vec<(u8, HashMap<IpAddr, Arc<Peer>>)>,
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

fn bind(port: u16) -> Result<UdpSocket, DeviceError> {
    let s = UdpSocket::bind(("0.0.0.0", port))
        .map_err(|source| DeviceError::Socket { port, source })?;
    s.set_read_timeout(Some(Duration::from_millis(250)))
        .map_err(|source| DeviceError::Socket { port, source })?;
    Ok(s)
}

impl State {
    fn rebuild_routes(&mut self) {
        let mut by_len: std::collections::BTreeMap<u8, HashMap<IpAddr, Arc<Peer>>> =
            Default::default();
        for p in self.peers.values() {
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
        for (len, m) in &self.routes {
            let max = if dst.is_ipv4() { 32 } else { 128 };
            if *len > max {
                continue;
            }
            if let Some(p) = m.get(&masked(dst, *len)) {
                return Some(p.clone());
            }
        }
        None
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
                key: None,
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

    /// Sets the private key; every peer's sessions restart with it.
    pub fn set_private_key(&self, key: PrivateKey) {
        let Ok(mut st) = self.state.write() else {
            return;
        };
        let secret = key.secret();
        let public = x25519::PublicKey::from(&secret);
        for p in st.peers.values() {
            if let Ok(mut t) = p.tunn.lock() {
                t.set_static_private(secret.clone(), public, None);
            }
        }
        st.key = Some(key);
    }

    /// The private key, for the control protocol's `get`.
    pub fn private_key(&self) -> Option<PrivateKey> {
        self.state.read().ok().and_then(|s| s.key.clone())
    }

    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.state
            .read()
            .map(|s| s.peers.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds or replaces a peer. A replaced peer keeps its session when only
    /// its endpoint or allowed IPs change, so traffic does not pause.
    pub fn upsert_peer(&self, public: [u8; 32], cfg: &PeerConfig) -> Result<(), DeviceError> {
        let mut st = self.state.write().map_err(|_| DeviceError::NoKey)?;
        // Allowed IPs must not be routed to another peer already.
        for c in &cfg.allowed_ips {
            for (k, p) in &st.peers {
                if *k != public && p.allowed_ips().contains(c) {
                    return Err(DeviceError::AllowedIpTaken {
                        peer: b64(&public),
                        cidr: *c,
                        other: b64(k),
                    });
                }
            }
        }
        if let Some(p) = st.peers.get(&public).cloned()
            && p.keepalive == cfg.persistent_keepalive
            && cfg.preshared_key.is_none()
        {
            if let Ok(mut e) = p.endpoint.write()
                && cfg.endpoint.is_some()
            {
                *e = cfg.endpoint;
            }
            if let Ok(mut a) = p.allowed.write() {
                *a = cfg.allowed_ips.clone();
            }
            st.rebuild_routes();
            return Ok(());
        }
        let secret = st.key.as_ref().ok_or(DeviceError::NoKey)?.secret();
        let index = st.next_index;
        st.next_index = (st.next_index + 1) & 0x00ff_ffff;
        let tunn = Tunn::new(
            secret,
            x25519::PublicKey::from(public),
            cfg.preshared_key,
            cfg.persistent_keepalive,
            index,
            None,
        );
        let peer = Arc::new(Peer {
            public,
            index,
            tunn: Mutex::new(tunn),
            endpoint: RwLock::new(cfg.endpoint),
            allowed: RwLock::new(cfg.allowed_ips.clone()),
            keepalive: cfg.persistent_keepalive,
        });
        if let Some(old) = st.peers.insert(public, peer.clone()) {
            st.by_index.remove(&old.index);
        }
        st.by_index.insert(index, peer);
        st.rebuild_routes();
        Ok(())
    }

    pub fn remove_peer(&self, public: &[u8; 32]) -> bool {
        let Ok(mut st) = self.state.write() else {
            return false;
        };
        let Some(p) = st.peers.remove(public) else {
            return false;
        };
        st.by_index.remove(&p.index);
        st.rebuild_routes();
        true
    }

    pub fn remove_all_peers(&self) {
        if let Ok(mut st) = self.state.write() {
            st.peers.clear();
            st.by_index.clear();
            st.routes.clear();
        }
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

    /// TUN -> encrypt -> UDP.
    fn tun_loop(&self) {
        let mut pkt = vec![0u8; BUF];
        let mut out = vec![0u8; BUF + 32];
        while !self.stop.load(Ordering::Relaxed) {
            let n = match self.tun.recv(&mut pkt) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading the TUN device");
                    return;
                }
            };
            let Some(dst) = Tunn::dst_address(&pkt[..n]) else {
                continue;
            };
            let peer = self.state.read().ok().and_then(|s| s.route(dst));
            let Some(peer) = peer else {
                self.stats.tx_no_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Ok(mut t) = peer.tunn.lock() else {
                continue;
            };
            if let TunnResult::WriteToNetwork(b) = t.encapsulate(&pkt[..n], &mut out) {
                let to = peer.endpoint();
                drop(t);
                self.send(to, b);
            }
        }
    }

    fn peer_for(&self, datagram: &[u8]) -> Option<Arc<Peer>> {
        let st = self.state.read().ok()?;
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(p) => {
                let key = st.key.as_ref()?;
                let secret = key.secret();
                let public = x25519::PublicKey::from(&secret);
                let half = parse_handshake_anon(&secret, &public, &p).ok()?;
                st.peers.get(&half.peer_static_public).cloned()
            }
            Packet::HandshakeResponse(p) => st.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            Packet::PacketCookieReply(p) => st.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            Packet::PacketData(p) => st.by_index.get(&(p.receiver_idx >> 8)).cloned(),
        }
    }

    /// UDP -> decrypt -> TUN (or a handshake reply back to the network).
    fn udp_loop(&self) {
        let mut buf = vec![0u8; BUF];
        let mut out = vec![0u8; BUF];
        while !self.stop.load(Ordering::Relaxed) {
            let Some(sock) = self.socket() else { return };
            let (n, from) = match sock.recv_from(&mut buf) {
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
            let Some(peer) = self.peer_for(&buf[..n]) else {
                self.stats.rx_unknown.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Ok(mut t) = peer.tunn.lock() else {
                continue;
            };
            let mut first = true;
            loop {
                let datagram: &[u8] = if first { &buf[..n] } else { &[] };
                let r = t.decapsulate(Some(from.ip()), datagram, &mut out);
                first = false;
                match r {
                    TunnResult::WriteToNetwork(b) => {
                        // Handshake replies (and packets queued for the new
                        // session) go to where the peer is now.
                        self.send(Some(from), b);
                        continue;
                    }
                    TunnResult::WriteToTunnelV4(p, src) => {
                        self.deliver(&peer, p, IpAddr::V4(src), from);
                    }
                    TunnResult::WriteToTunnelV6(p, src) => {
                        self.deliver(&peer, p, IpAddr::V6(src), from);
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
    }

    fn deliver(&self, peer: &Peer, pkt: &[u8], src: IpAddr, from: SocketAddr) {
        // Authenticated: the peer is at `from` now (roaming).
        if let Ok(mut e) = peer.endpoint.write()
            && *e != Some(from)
        {
            *e = Some(from);
        }
        if pkt.is_empty() {
            return; // keepalive
        }
        if !peer.allowed_ips().iter().any(|c| c.contains(src)) {
            self.stats.rx_not_allowed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let _ = self.tun.send(pkt);
    }

    /// Handshake retries, keepalives and rekeys.
    fn timer_loop(&self) {
        let mut out = vec![0u8; BUF];
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(250));
            for p in self.peers() {
                let Ok(mut t) = p.tunn.lock() else { continue };
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
