//! The cross-platform WireGuard control protocol ("UAPI",
//! <https://www.wireguard.com/xplatform/>) over a unix socket at
//! `<dir>/<interface>.sock` (`/var/run/wireguard` by default, where the
//! standard `wg` tool looks for userspace devices): `get=1` reports the
//! device and its peers, `set=1` changes them. Keys travel in hex. Errors
//! answer `errno=N` (22 EINVAL for malformed input) and change nothing of
//! the operation that failed: a `set` is one transaction, all or nothing.
//!
//! Extensions for lossless key rotation (ignored by nothing: only our agent
//! sends them): device keys `x_add_private_key` (a newest key, older keys
//! keep working) and `x_drop_public_key` (retire a key), and the peer key
//! `x_draining=true|false` (decrypt only, no longer routed to); and the
//! request `x_stats=1`, the device's drop counters.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::UNIX_EPOCH,
};

use clustermesh_api::{IpCidr, WgPublicKey};

use super::{Change, Device, PeerConfig};
use crate::keys::PrivateKey;

const EINVAL: i32 = 22;
const EIO: i32 = 5;

fn hex(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The `get=1` answer (without the final `errno=0` and blank line).
pub fn get(dev: &Device) -> String {
    let mut out = String::new();
    if let Some(k) = dev.private_key() {
        out += &format!("private_key={}\n", hex(k.expose_bytes()));
    }
    out += &format!("listen_port={}\n", dev.listen_port());
    for p in dev.peers() {
        out += &format!("public_key={}\n", hex(&p.public));
        if let Some(k) = p.preshared_key() {
            out += &format!("preshared_key={}\n", hex(&k));
        }
        if let Some(e) = p.endpoint() {
            out += &format!("endpoint={e}\n");
        }
        out += &format!(
            "persistent_keepalive_interval={}\n",
            p.persistent_keepalive().unwrap_or(0)
        );
        for c in p.allowed_ips() {
            out += &format!("allowed_ip={c}\n");
        }
        let (sec, nsec) = p
            .last_handshake()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        out += &format!("last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\n");
        let (tx, rx) = p.transfer();
        out += &format!("tx_bytes={tx}\nrx_bytes={rx}\nprotocol_version=1\n");
    }
    out
}

#[derive(Debug, Default)]
struct PeerOp {
    public: [u8; 32],
    remove: bool,
    update_only: bool,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    preshared: Option<[u8; 32]>,
    replace_allowed: bool,
    allowed: Vec<IpCidr>,
    draining: Option<bool>,
}

/// A parsed `set=1` body.
#[derive(Debug, Default)]
struct SetOp {
    private_key: Option<PrivateKey>,
    add_key: Option<PrivateKey>,
    drop_key: Option<[u8; 32]>,
    listen_port: Option<u16>,
    replace_peers: bool,
    peers: Vec<PeerOp>,
}

/// Parses `set=1` lines; the error names the offending line.
fn parse_set(lines: &[String]) -> Result<SetOp, String> {
    let mut op = SetOp::default();
    for l in lines {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| format!("{l:?} is not key=value"))?;
        let bad = || format!("{k}: invalid value {v:?}");
        match (k, op.peers.last_mut()) {
            ("public_key", _) => {
                let public = unhex(v).ok_or_else(bad)?;
                WgPublicKey::from_bytes(public).map_err(|e| format!("public_key: {e}"))?;
                op.peers.push(PeerOp {
                    public,
                    ..Default::default()
                });
            }
            ("private_key", None) => {
                op.private_key = Some(PrivateKey::from_bytes(unhex(v).ok_or_else(bad)?));
            }
            ("x_add_private_key", None) => {
                op.add_key = Some(PrivateKey::from_bytes(unhex(v).ok_or_else(bad)?));
            }
            ("x_drop_public_key", None) => op.drop_key = Some(unhex(v).ok_or_else(bad)?),
            ("x_draining", Some(p)) => p.draining = Some(v == "true"),
            ("listen_port", None) => op.listen_port = Some(v.parse().map_err(|_| bad())?),
            ("fwmark", None) => {}
            ("replace_peers", None) => op.replace_peers = v == "true",
            ("remove", Some(p)) => p.remove = v == "true",
            ("update_only", Some(p)) => p.update_only = v == "true",
            ("endpoint", Some(p)) => p.endpoint = Some(v.parse().map_err(|_| bad())?),
            ("persistent_keepalive_interval", Some(p)) => {
                p.keepalive = Some(v.parse().map_err(|_| bad())?)
            }
            ("preshared_key", Some(p)) => {
                let k = unhex(v).ok_or_else(bad)?;
                p.preshared = (k != [0; 32]).then_some(k);
            }
            ("replace_allowed_ips", Some(p)) => p.replace_allowed = v == "true",
            ("allowed_ip", Some(p)) => p.allowed.push(v.parse().map_err(|_| bad())?),
            ("protocol_version", Some(_)) if v == "1" => {}
            _ => return Err(format!("unexpected {k:?} here")),
        }
    }
    Ok(op)
}

/// Applies a `set=1` body; returns the errno (0 on success).
pub fn set(dev: &Device, lines: &[String]) -> i32 {
    let op = match parse_set(lines) {
        Ok(op) => op,
        Err(e) => {
            tracing::warn!(device = dev.name(), error = %e, "refused a set");
            return EINVAL;
        }
    };
    if let Some(port) = op.listen_port
        && let Err(e) = dev.set_listen_port(port)
    {
        tracing::warn!(device = dev.name(), error = %e, "listen port");
        return EIO;
    }
    let mut changes = Vec::new();
    if let Some(k) = op.private_key {
        changes.push(Change::SetKey(k));
    }
    if let Some(k) = op.add_key {
        changes.push(Change::AddKey(k));
    }
    if let Some(k) = op.drop_key {
        changes.push(Change::DropKey(k));
    }
    if op.replace_peers {
        changes.push(Change::RemoveAllPeers);
    }
    let current = dev.peers();
    for p in op.peers {
        if p.remove {
            changes.push(Change::RemovePeer(p.public));
            continue;
        }
        let existing = current.iter().find(|x| x.public == p.public);
        if p.update_only && existing.is_none() {
            continue;
        }
        let mut cfg = PeerConfig {
            endpoint: p.endpoint.or_else(|| existing.and_then(|e| e.endpoint())),
            allowed_ips: if p.replace_allowed {
                Vec::new()
            } else {
                existing.map(|e| e.allowed_ips()).unwrap_or_default()
            },
            persistent_keepalive: match p.keepalive {
                Some(0) => None,
                Some(k) => Some(k),
                None => existing.and_then(|e| e.persistent_keepalive()),
            },
            preshared_key: p.preshared,
            draining: p
                .draining
                .unwrap_or_else(|| existing.is_some_and(|e| e.is_draining())),
        };
        for c in p.allowed {
            if !cfg.allowed_ips.contains(&c) {
                cfg.allowed_ips.push(c);
            }
        }
        changes.push(Change::UpsertPeer(p.public, cfg));
    }
    match dev.apply(changes) {
        Ok(()) => 0,
        Err(e) => {
            tracing::warn!(device = dev.name(), error = %e, "refused a set");
            EINVAL
        }
    }
}

/// Lines up to a blank line or the end of the stream.
fn read_block(r: &mut impl std::io::BufRead) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            break;
        }
        let l = l.trim_end_matches('\n').to_owned();
        if l.is_empty() {
            break;
        }
        out.push(l);
    }
    Ok(out)
}

fn serve_conn(dev: &Device, s: UnixStream) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    loop {
        let mut first = String::new();
        if r.read_line(&mut first)? == 0 {
            return Ok(());
        }
        let body = read_block(&mut r)?;
        match first.trim_end() {
            "get=1" => write!(w, "{}errno=0\n\n", get(dev))?,
            "x_stats=1" => {
                let st = &dev.stats;
                let v =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                write!(
                    w,
                    "tx_no_peer={}\nrx_not_allowed={}\nrx_unknown={}\nrx_errors={}\nerrno=0\n\n",
                    v(&st.tx_no_peer),
                    v(&st.rx_not_allowed),
                    v(&st.rx_unknown),
                    v(&st.rx_errors)
                )?
            }
            "set=1" => write!(w, "errno={}\n\n", set(dev, &body))?,
            _ => {
                write!(w, "errno={EINVAL}\n\n")?;
                return Ok(());
            }
        }
    }
}

/// The control socket path of `iface` under `dir`.
pub fn socket_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{iface}.sock"))
}

/// Serves the control protocol for `dev` at `<dir>/<name>.sock` (directory
/// mode 0755 as `wg` expects, socket 0600: root only). Returns once
/// listening; connections are served on threads.
pub fn serve(dev: Arc<Device>, dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = socket_path(dir, dev.name());
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("wg-uapi".into())
        .spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let d = dev.clone();
                let _ = std::thread::Builder::new()
                    .name("wg-uapi-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_conn(&d, c) {
                            tracing::debug!(error = %e, "control connection");
                        }
                    });
            }
        })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn lines(s: &[&str]) -> Vec<String> {
        s.iter().map(|l| (*l).to_owned()).collect()
    }

    #[test]
    fn set_parsing_refuses_bad_input_by_line() {
        let k = hex(&[7u8; 32]);
        let ok = parse_set(&lines(&[
            "listen_port=51871",
            &format!("public_key={k}"),
            "endpoint=192.0.2.2:51871",
            "replace_allowed_ips=true",
            "allowed_ip=10.2.0.0/24",
            "persistent_keepalive_interval=25",
        ]))
        .unwrap();
        assert_eq!(ok.listen_port, Some(51871));
        assert_eq!(ok.peers.len(), 1);
        assert_eq!(ok.peers[0].allowed.len(), 1);
        assert_eq!(ok.peers[0].keepalive, Some(25));
        for (bad, want) in [
            (vec!["public_key=zz".to_owned()], "public_key"),
            (vec![format!("public_key={}", hex(&[0u8; 32]))], "low-order"),
            (
                vec![format!("public_key={k}"), "endpoint=nope".into()],
                "endpoint",
            ),
            (
                vec![format!("public_key={k}"), "allowed_ip=10.0.0.1/24".into()],
                "allowed_ip",
            ),
            (vec!["endpoint=192.0.2.2:1".into()], "unexpected"),
            (vec!["garbage".into()], "key=value"),
            (vec!["listen_port=99999".into()], "listen_port"),
        ] {
            let e = parse_set(&bad).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        assert_eq!(unhex(&k), Some([7u8; 32]));
    }
}

/// What `get=1` reports about one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpCidr>,
    /// Seconds since the epoch of the last handshake (0: none).
    pub last_handshake_sec: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What `get=1` reports about a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub public_of_private: Option<WgPublicKey>,
    pub listen_port: u16,
    pub peers: Vec<PeerInfo>,
}

/// The device's drop counters (`x_stats=1`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCounters {
    /// Packets for which no peer's allowed IPs match (in strict mode:
    /// pod traffic whose peer key is not known yet, refused).
    pub tx_no_peer: u64,
    /// Decrypted packets from a source outside the peer's allowed IPs.
    pub rx_not_allowed: u64,
    /// Datagrams matching no peer (e.g. handshakes to an unknown key).
    pub rx_unknown: u64,
    /// Handshake and decryption failures.
    pub rx_errors: u64,
}

/// A client of a device's control socket (ours or any userspace
/// WireGuard). Each call is one connection.
#[derive(Debug, Clone)]
pub struct Client {
    pub path: PathBuf,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn request(&self, req: &str) -> std::io::Result<Vec<String>> {
        let mut s = UnixStream::connect(&self.path)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        s.write_all(req.as_bytes())?;
        let mut r = BufReader::new(s);
        let mut lines = read_block(&mut r)?;
        match lines.last().and_then(|l| l.strip_prefix("errno=")) {
            Some("0") => {
                lines.pop();
                Ok(lines)
            }
            Some(n) => Err(std::io::Error::other(format!(
                "{}: the device answered errno={n}",
                self.path.display()
            ))),
            None => Err(std::io::Error::other(format!(
                "{}: no errno in the answer",
                self.path.display()
            ))),
        }
    }

    /// Our device's drop counters.
    pub fn stats(&self) -> std::io::Result<DeviceCounters> {
        let mut c = DeviceCounters::default();
        for l in self.request("x_stats=1\n\n")? {
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            let v = v.parse().unwrap_or(0);
            match k {
                "tx_no_peer" => c.tx_no_peer = v,
                "rx_not_allowed" => c.rx_not_allowed = v,
                "rx_unknown" => c.rx_unknown = v,
                "rx_errors" => c.rx_errors = v,
                _ => {}
            }
        }
        Ok(c)
    }

    /// `set=1` with these `key=value` lines.
    pub fn set(&self, lines: &[String]) -> std::io::Result<()> {
        let mut req = String::from("set=1\n");
        for l in lines {
            req += l;
            req.push('\n');
        }
        req.push('\n');
        self.request(&req).map(drop)
    }

    /// `get=1`, parsed (the private key itself is not kept: only its
    /// public key, to compare with the key file).
    pub fn get(&self) -> std::io::Result<DeviceInfo> {
        let mut d = DeviceInfo::default();
        for l in self.request("get=1\n\n")? {
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            match k {
                "private_key" => {
                    d.public_of_private = unhex(v)
                        .map(PrivateKey::from_bytes)
                        .and_then(|k| k.public_key().ok());
                }
                "listen_port" => d.listen_port = v.parse().unwrap_or(0),
                "public_key" => d.peers.push(PeerInfo {
                    public_key: unhex(v).unwrap_or_default(),
                    ..Default::default()
                }),
                _ => {
                    let Some(p) = d.peers.last_mut() else {
                        continue;
                    };
                    match k {
                        "endpoint" => p.endpoint = v.parse().ok(),
                        "allowed_ip" => p.allowed_ips.extend(v.parse::<IpCidr>().ok()),
                        "last_handshake_time_sec" => p.last_handshake_sec = v.parse().unwrap_or(0),
                        "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                        "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
        Ok(d)
    }

    /// Adds or updates a peer: its endpoint and exactly these allowed IPs.
    pub fn set_peer(
        &self,
        public: &WgPublicKey,
        endpoint: SocketAddr,
        allowed: &[IpCidr],
    ) -> std::io::Result<()> {
        let mut lines = vec![
            format!("public_key={}", hex(public.as_bytes())),
            format!("endpoint={endpoint}"),
            "replace_allowed_ips=true".to_owned(),
        ];
        lines.extend(allowed.iter().map(|c| format!("allowed_ip={c}")));
        self.set(&lines)
    }

    pub fn remove_peer(&self, public: &[u8; 32]) -> std::io::Result<()> {
        self.set(&[
            format!("public_key={}", hex(public)),
            "remove=true".to_owned(),
        ])
    }

    /// Sets the device's private key.
    pub fn set_private_key(&self, key: &PrivateKey) -> std::io::Result<()> {
        self.set(&[format!("private_key={}", hex(key.expose_bytes()))])
    }

    /// Rotation, step 1: a newest key; the current one keeps working.
    pub fn add_private_key(&self, key: &PrivateKey) -> std::io::Result<()> {
        self.set(&[format!("x_add_private_key={}", hex(key.expose_bytes()))])
    }

    /// Rotation, last step: retire a key and its sessions.
    pub fn drop_key(&self, public: &WgPublicKey) -> std::io::Result<()> {
        self.set(&[format!("x_drop_public_key={}", hex(public.as_bytes()))])
    }

    /// A peer's key changed: in one transaction the old peer turns
    /// draining (still decrypts its sessions' last packets, no longer
    /// routed to) and the new one takes the routes.
    pub fn replace_peer_key(
        &self,
        old: &WgPublicKey,
        new: &WgPublicKey,
        endpoint: SocketAddr,
        allowed: &[IpCidr],
    ) -> std::io::Result<()> {
        let mut lines = vec![
            format!("public_key={}", hex(old.as_bytes())),
            "x_draining=true".to_owned(),
            format!("public_key={}", hex(new.as_bytes())),
            format!("endpoint={endpoint}"),
            "replace_allowed_ips=true".to_owned(),
        ];
        lines.extend(allowed.iter().map(|c| format!("allowed_ip={c}")));
        self.set(&lines)
    }
}
