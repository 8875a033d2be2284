//! Finding or starting the WireGuard device (see the [module
//! docs](super)), and reading its peers for status.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clustermesh_api::{WgPublicKey, status::PeerStatus};
use clustermesh_crypto::{
    keys::KeyFile,
    wg::uapi::{Client, socket_path},
};

/// Why the device could not be found, started or rotated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("WireGuard key file {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: clustermesh_crypto::keys::KeyError,
    },
    #[error("the WireGuard device's control socket: {0}")]
    Control(#[source] std::io::Error),
    #[error("device log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] clustermesh_api::netns::Error),
    #[error("starting {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("WireGuard device {iface} did not come up within {waited:?} ({source}); see {log}")]
    NotUp {
        iface: String,
        waited: Duration,
        log: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
pub fn ensure(spec: &DeviceSpec) -> Result<WgDevice, Error> {
    const UP_WITHIN: Duration = Duration::from_secs(10);
    let key_err = |source| Error::Key {
        path: spec.key_file.clone(),
        source,
    };
    let key_file = KeyFile::new(&spec.key_file);
    let (key, created) = key_file.load_or_create().map_err(key_err)?;
    let public = key.public_key().map_err(key_err)?;
    if created {
        tracing::info!(path = %spec.key_file.display(), public = %public.fingerprint(), "created the WireGuard key");
    }
    let client = Client::new(socket_path(&spec.uapi_dir, &spec.iface));
    if let Ok(info) = client.get() {
        if info.public_of_private != Some(public) {
            // Someone changed the file (rotation by hand): the device follows.
            client.set_private_key(&key).map_err(Error::Control)?;
        }
        tracing::info!(iface = %spec.iface, "adopted the running WireGuard device");
        return Ok(WgDevice {
            client,
            public,
            port: info.listen_port,
            adopted: true,
        });
    }
    start(spec)?;
    let t0 = Instant::now();
    let info = loop {
        match client.get() {
            Ok(i) => break i,
            Err(source) if t0.elapsed() > UP_WITHIN => {
                return Err(Error::NotUp {
                    iface: spec.iface.clone(),
                    waited: UP_WITHIN,
                    log: spec.log.clone(),
                    source,
                });
            }
            // The device process is starting: its socket appears shortly.
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
fn start(spec: &DeviceSpec) -> Result<(), Error> {
    let log_err = |source| Error::Log {
        path: spec.log.clone(),
        source,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(log_err)?;
    let ns = spec
        .netns
        .as_deref()
        .map(clustermesh_api::netns::open_named)
        .transpose()?;
    let ns_fd = ns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let mut cmd = Command::new(&spec.bin);
    cmd.arg(&spec.iface)
        .args(["--port", &spec.port.to_string(), "--uapi-dir"])
        .arg(&spec.uapi_dir)
        .arg("--private-key-file")
        .arg(&spec.key_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(log_err)?)
        .stderr(log);
    // SAFETY: between fork and exec only async-signal-safe calls (setsid,
    // setns on an fd opened before the fork).
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if let Some(fd) = ns_fd {
                clustermesh_api::netns::enter_fd(fd)?;
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| Error::Spawn {
        bin: spec.bin.clone(),
        source,
    })?;
    Ok(())
}

/// The default place of the device's log.
pub fn default_log(iface: &str) -> PathBuf {
    Path::new("/var/log").join(format!("clustermesh-wg-{iface}.log"))
}
