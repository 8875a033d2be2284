//! Finding or starting the WireGuard device (see the [module
//! docs](super)), and reading its peers for status.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
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
    /// The device process when this agent started it (reaped by
    /// [`supervise`]).
    pub child: Option<Arc<Mutex<std::process::Child>>>,
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
            child: None,
        });
    }
    let child = start(spec)?;
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
        child: Some(Arc::new(Mutex::new(child))),
    })
}

/// Starts the device detached (own session, log file, in the namespace):
/// it outlives this agent.
fn start(spec: &DeviceSpec) -> Result<std::process::Child, Error> {
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
    })
}

/// Probes between liveness checks of the device.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Failed probes in a row before the device counts as dead.
pub const PROBES_BEFORE_DEAD: u32 = 3;

/// Supervises the device until cancelled: reaps it if this agent started
/// it (no zombie), and probes its control socket every [`PROBE_EVERY`].
/// Once it is dead ([`PROBES_BEFORE_DEAD`] failed probes, or its process
/// exited), returns: the caller rebuilds everything tied to the device
/// (see `node::supervise_device`). Returns `None` if cancelled.
pub async fn supervise(
    dev: &WgDevice,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<String> {
    let mut failed = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
        if let Some(c) = &dev.child {
            let exited = c.lock().ok().and_then(|mut c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Some(format!("the device process exited ({status})"));
            }
        }
        // The control socket is a blocking Unix socket: off the runtime.
        let client = dev.client.clone();
        let alive = tokio::task::spawn_blocking(move || client.get().is_ok())
            .await
            .unwrap_or(false);
        failed = if alive { 0 } else { failed + 1 };
        if failed >= PROBES_BEFORE_DEAD {
            return Some(format!(
                "the device's control socket did not answer {PROBES_BEFORE_DEAD} probes"
            ));
        }
    }
}

/// The default place of the device's log.
pub fn default_log(iface: &str) -> PathBuf {
    Path::new("/var/log").join(format!("clustermesh-wg-{iface}.log"))
}
