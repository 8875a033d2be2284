//! This node's key rotation, on a schedule and on SIGUSR1, make before
//! break: new key in the key file, added to the device next to the old one,
//! published first in the NodeRecord with the old one second; after the
//! overlap the old key is dropped from the device and the record.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use clustermesh_api::{WgPublicKey, status::EncryptionStatus};
use clustermesh_crypto::keys::KeyFile;

use super::{Error, WgDevice};
use crate::audit::Audit;

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
    pub status: Arc<Mutex<EncryptionStatus>>,
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
) -> Result<WgPublicKey, Error> {
    let key_err = |source| Error::Key {
        path: key_file.to_owned(),
        source,
    };
    let file = KeyFile::new(key_file);
    let old = file.load().and_then(|k| k.public_key()).map_err(key_err)?;
    let new_key = clustermesh_crypto::keys::PrivateKey::generate().map_err(key_err)?;
    let new = new_key.public_key().map_err(key_err)?;
    // The file first: a device or agent restarted from here on uses the
    // new key.
    file.replace(&new_key).map_err(key_err)?;
    wg.client
        .add_private_key(&new_key)
        .map_err(Error::Control)?;
    node.send_modify(|n| n.wireguard_public_keys = vec![new.to_string(), old.to_string()]);
    audit.record(
        "key_rotation_started",
        serde_json::json!({"old_key": old.fingerprint(), "new_key": new.fingerprint(), "overlap_s": overlap.as_secs()}),
    );
    tokio::select! {
        _ = cancel.cancelled() => return Ok(new),
        _ = tokio::time::sleep(overlap) => {}
    }
    wg.client.drop_key(&old).map_err(Error::Control)?;
    node.send_modify(|n| n.wireguard_public_keys = vec![new.to_string()]);
    audit.record(
        "key_rotation_completed",
        serde_json::json!({"retired_key": old.fingerprint(), "current_key": new.fingerprint()}),
    );
    Ok(new)
}
