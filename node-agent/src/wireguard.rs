//! The node's WireGuard device and its peers.
//!
//! The device is `clustermesh-wg` (boringtun over TUN), a process of its
//! own: the agent starts it once (detached, in the node's network
//! namespace) and on every later start finds it by its control socket and
//! adopts it, so an agent restart never interrupts encrypted traffic and
//! never resets a session. The private key lives in a 0600 file the device
//! reads; the agent publishes the public key in its NodeRecord.
//!
//! [`WgPeers`] keeps the device's peers equal to the merged desired state
//! (one per remote node: public key, underlay endpoint, pod CIDRs) over the
//! standard control protocol. Updating a peer's endpoint or allowed IPs
//! keeps its session. A node whose key changed (it rotated) gets its new
//! key routed to in one transaction while the old entry stays *draining*
//! (decrypts the old sessions' last packets) for the overlap, then goes.
//!
//! [`rotation`] rotates this node's key, on a schedule and on SIGUSR1, make
//! before break: new key in the key file, added to the device next to the
//! old one, published first in the NodeRecord with the old one second;
//! after the overlap the old key is dropped from the device and the record.

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clustermesh_api::WgPublicKey;
use clustermesh_crypto::{
    keys::KeyFile,
    wg::uapi::{Client, socket_path},
};

use crate::{
    audit::Audit,
    clusters::merge::Peer,
    reconcile::{ReconcileError, Reconciler},
};

/// What `/status` shows about encryption on this node.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EncryptionStatus {
    /// The WireGuard device, if this node runs one.
    pub device: Option<String>,
    /// Fingerprint of this node's current public key.
    pub public_key: Option<String>,
    /// The cluster's policy as last read.
    pub policy: Option<clustermesh_api::EncryptionPolicy>,
    pub peers: Vec<PeerStatus>,
    /// Pod packets refused by strict mode (eBPF counters, pinned: since
    /// the datapath was created).
    pub plaintext_drops: PlaintextDrops,
    /// The device's drop counters (since the device started): no peer
    /// for a destination (a peer whose key is not known yet), source not
    /// allowed, unknown sender, handshake/decryption failures.
    pub device_drops: clustermesh_crypto::wg::uapi::DeviceCounters,
    pub rotations_completed: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerStatus {
    pub key: String,
    pub endpoint: Option<String>,
    /// Seconds since the last handshake (None: never).
    pub last_handshake_age_s: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PlaintextDrops {
    pub egress: u64,
    pub ingress: u64,
}

/// The device's peers as [`PeerStatus`] rows.
pub fn peer_status(client: &Client) -> std::io::Result<Vec<PeerStatus>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(client
        .get()?
        .peers
        .into_iter()
        .map(|p| PeerStatus {
            key: WgPublicKey::from_bytes(p.public_key)
                .map(|k| k.fingerprint())
                .unwrap_or_default(),
            endpoint: p.endpoint.map(|e| e.to_string()),
            last_handshake_age_s: (p.last_handshake_sec != 0)
                .then(|| now.saturating_sub(p.last_handshake_sec)),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        })
        .collect())
}

/// How to find or start the device.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub iface: String,
    pub port: u16,
    pub key_file: PathBuf,
    /// The `clustermesh-wg` binary.
    pub bin: PathBuf,
    /// Where the device process logs.
    pub log: PathBuf,
    /// Control socket directory.
    pub uapi_dir: PathBuf,
    /// Network namespace (`ip netns` name) to create the device in.
    pub netns: Option<String>,
}

/// The running device.
#[derive(Debug, Clone)]
pub struct WgDevice {
    pub client: Client,
    pub public: WgPublicKey,
    pub port: u16,
    /// True when an existing device was adopted (not started).
    pub adopted: bool,
}

/// `clustermesh-wg` next to this executable, else from PATH.
pub fn default_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("clustermesh-wg")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("clustermesh-wg"))
}

/// Finds the device by its control socket, or starts it; makes sure it
/// runs with the key file's key.
pub fn ensure(spec: &DeviceSpec) -> anyhow::Result<WgDevice> {
    let key_file = KeyFile::new(&spec.key_file);
    let (key, created) = key_file.load_or_create().context("WireGuard private key")?;
    let public = key.public_key()?;
    if created {
        tracing::info!(path = %spec.key_file.display(), public = %public.fingerprint(), "created the WireGuard key");
    }
    let client = Client::new(socket_path(&spec.uapi_dir, &spec.iface));
    if let Ok(info) = client.get() {
        if info.public_of_private != Some(public) {
            // Someone changed the file (rotation by hand): the device follows.
            client
                .set_private_key(&key)
                .context("setting the device's key")?;
        }
        tracing::info!(iface = %spec.iface, "adopted the running WireGuard device");
        return Ok(WgDevice {
            client,
            public,
            port: info.listen_port,
            adopted: true,
        });
    }
    start(spec).with_context(|| format!("starting {}", spec.bin.display()))?;
    let t0 = Instant::now();
    let info = loop {
        match client.get() {
            Ok(i) => break i,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                return Err(anyhow::anyhow!(
                    "WireGuard device {} did not come up within 10 s ({e}); see {}",
                    spec.iface,
                    spec.log.display()
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    tracing::info!(iface = %spec.iface, port = info.listen_port, "started the WireGuard device");
    Ok(WgDevice {
        client,
        public,
        port: info.listen_port,
        adopted: false,
    })
}

/// Starts the device detached (own session, log file, in the namespace):
/// it outlives this agent.
fn start(spec: &DeviceSpec) -> anyhow::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("device log {}", spec.log.display()))?;
    let ns = match &spec.netns {
        Some(n) => Some(
            std::fs::File::open(format!("/var/run/netns/{n}"))
                .with_context(|| format!("network namespace {n}"))?,
        ),
        None => None,
    };
    let ns_fd = ns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let mut cmd = Command::new(&spec.bin);
    cmd.arg(&spec.iface)
        .args(["--port", &spec.port.to_string(), "--uapi-dir"])
        .arg(&spec.uapi_dir)
        .arg("--private-key-file")
        .arg(&spec.key_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: between fork and exec only async-signal-safe calls (setsid,
    // setns on an fd opened before the fork).
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()?;
    Ok(())
}

fn rerr(e: std::io::Error) -> ReconcileError {
    ReconcileError {
        target: "wireguard peers",
        message: e.to_string(),
    }
}

/// The device's peers as a reconcile target (key: `cluster/node`).
pub struct WgPeers {
    client: Client,
    keys: BTreeMap<String, WgPublicKey>,
    /// How long a rotated-away key stays draining.
    overlap: Duration,
    audit: Audit,
}

impl WgPeers {
    pub fn new(client: Client, overlap: Duration, audit: Audit) -> Self {
        Self {
            client,
            keys: BTreeMap::new(),
            overlap,
            audit,
        }
    }
}

impl Reconciler<String, Peer> for WgPeers {
    fn name(&self) -> &'static str {
        "wireguard peers"
    }
    fn update(&mut self, k: &String, v: &Peer) -> Result<(), ReconcileError> {
        if let Some(old) = self.keys.get(k).copied()
            && old != v.public_key
        {
            // Make before break: routes move to the new key at once, the
            // old entry drains, and goes after the overlap.
            self.client
                .replace_peer_key(&old, &v.public_key, v.endpoint, &v.allowed_ips)
                .map_err(rerr)?;
            self.audit.record(
                "peer_key_changed",
                serde_json::json!({"peer": k, "old_key": old.fingerprint(), "new_key": v.public_key.fingerprint(), "drain_s": self.overlap.as_secs()}),
            );
            let client = self.client.clone();
            let overlap = self.overlap;
            let name = k.clone();
            std::thread::spawn(move || {
                std::thread::sleep(overlap);
                match client.remove_peer(old.as_bytes()) {
                    Ok(()) => {
                        tracing::info!(peer = %name, key = %old.fingerprint(), "drained key removed")
                    }
                    Err(e) => tracing::warn!(peer = %name, error = %e, "removing a drained key"),
                }
            });
            self.keys.insert(k.clone(), v.public_key);
            return Ok(());
        }
        self.client
            .set_peer(&v.public_key, v.endpoint, &v.allowed_ips)
            .map_err(rerr)?;
        if self.keys.insert(k.clone(), v.public_key).is_none() {
            self.audit.record(
                "peer_added",
                serde_json::json!({"peer": k, "key": v.public_key.fingerprint(), "endpoint": v.endpoint.to_string()}),
            );
        }
        Ok(())
    }
    fn delete(&mut self, k: &String) -> Result<(), ReconcileError> {
        if let Some(key) = self.keys.remove(k) {
            self.client.remove_peer(key.as_bytes()).map_err(rerr)?;
            self.audit.record(
                "peer_removed",
                serde_json::json!({"peer": k, "key": key.fingerprint()}),
            );
        }
        Ok(())
    }
    fn prune(&mut self, desired: &BTreeMap<String, Peer>) -> Result<usize, ReconcileError> {
        let want: Vec<[u8; 32]> = desired.values().map(|p| *p.public_key.as_bytes()).collect();
        let mut n = 0;
        for p in self.client.get().map_err(rerr)?.peers {
            if !want.contains(&p.public_key) {
                self.client.remove_peer(&p.public_key).map_err(rerr)?;
                let key = WgPublicKey::from_bytes(p.public_key)
                    .map(|k| k.fingerprint())
                    .unwrap_or_default();
                self.audit.record(
                    "peer_removed",
                    serde_json::json!({"peer": null, "key": key, "reason": "not desired after resync"}),
                );
                n += 1;
            }
        }
        self.keys.retain(|k, _| desired.contains_key(k));
        Ok(n)
    }
    /// Empty: the first diff re-applies every desired peer, which keeps the
    /// sessions of unchanged peers (same key).
    fn snapshot(&mut self) -> Result<BTreeMap<String, Peer>, ReconcileError> {
        Ok(BTreeMap::new())
    }
}

/// The default place of the device's log.
pub fn default_log(iface: &str) -> PathBuf {
    Path::new("/var/log").join(format!("clustermesh-wg-{iface}.log"))
}

/// What key rotation works with.
pub struct Rotation {
    pub wg: WgDevice,
    pub key_file: PathBuf,
    /// Rotate this often (zero: only on SIGUSR1).
    pub every: Duration,
    /// How long both keys stay valid.
    pub overlap: Duration,
    /// The node record the registration publishes.
    pub node: tokio::sync::watch::Sender<clustermesh_api::proto::Node>,
    pub audit: Audit,
    pub status: std::sync::Arc<std::sync::Mutex<EncryptionStatus>>,
}

/// Rotates this node's WireGuard key on `r.every` and on SIGUSR1, until
/// cancelled. See the module docs for the steps.
pub async fn rotation(r: Rotation, cancel: tokio_util::sync::CancellationToken) {
    let Rotation {
        wg,
        key_file,
        every,
        overlap,
        node,
        audit,
        status,
    } = r;
    let mut usr1 =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGUSR1 handler: rotation on command is off");
                None
            }
        };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every), if !every.is_zero() => {}
            Some(()) = async { match usr1.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {}
        }
        match rotate_once(&wg, &key_file, overlap, &node, &audit, &cancel).await {
            Ok(new) => {
                if let Ok(mut s) = status.lock() {
                    s.rotations_completed += 1;
                    s.public_key = Some(new.fingerprint());
                }
            }
            Err(e) => {
                audit.record(
                    "key_rotation_failed",
                    serde_json::json!({"error": e.to_string()}),
                );
            }
        }
    }
}

async fn rotate_once(
    wg: &WgDevice,
    key_file: &Path,
    overlap: Duration,
    node: &tokio::sync::watch::Sender<clustermesh_api::proto::Node>,
    audit: &Audit,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<WgPublicKey> {
    let file = KeyFile::new(key_file);
    let old = file.load()?.public_key()?;
    let new_key = clustermesh_crypto::keys::PrivateKey::generate()?;
    let new = new_key.public_key()?;
    // The file first: a device or agent restarted from here on uses the
    // new key.
    file.replace(&new_key)?;
    wg.client.add_private_key(&new_key)?;
    node.send_modify(|n| n.wireguard_public_keys = vec![new.to_string(), old.to_string()]);
    audit.record(
        "key_rotation_started",
        serde_json::json!({"old_key": old.fingerprint(), "new_key": new.fingerprint(), "overlap_s": overlap.as_secs()}),
    );
    tokio::select! {
        _ = cancel.cancelled() => return Ok(new),
        _ = tokio::time::sleep(overlap) => {}
    }
    wg.client.drop_key(&old)?;
    node.send_modify(|n| n.wireguard_public_keys = vec![new.to_string()]);
    audit.record(
        "key_rotation_completed",
        serde_json::json!({"retired_key": old.fingerprint(), "current_key": new.fingerprint()}),
    );
    Ok(new)
}
