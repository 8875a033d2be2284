//! x25519 key pairs for WireGuard, and the node's private key file.
//!
//! - A [`PrivateKey`] is zeroized when dropped, never printed (its `Debug`
//!   shows only the public key's fingerprint) and never serialized except
//!   by [`KeyFile`] and the device's control protocol.
//! - The key file holds the base64 private key (as `wg genkey` writes it),
//!   is created with mode 0600 in one step (`O_CREAT|O_EXCL`, no window in
//!   which it is readable), and is refused when group or others can read
//!   it, so a restarted node keeps its identity and only root can take it.

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use base64::Engine as _;
use boringtun::x25519;
use clustermesh_api::WgPublicKey;
use zeroize::{Zeroize as _, Zeroizing};

/// Errors of key handling. None of them carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the system's random source: {0}")]
    Random(std::io::Error),
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} does not hold a base64 WireGuard private key (32 bytes)")]
    Malformed { path: PathBuf },
    #[error("the private key's public key is not usable: {0}")]
    Public(#[source] clustermesh_api::ValueError),
}

/// A WireGuard (x25519) private key, clamped as `wg genkey` does.
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl PrivateKey {
    /// A fresh key from the kernel's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut b = Zeroizing::new([0u8; 32]);
        getrandom(&mut b[..]).map_err(KeyError::Random)?;
        Ok(Self::from_bytes(*b))
    }

    /// From raw bytes (clamped).
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        let k = Self(Zeroizing::new(bytes));
        bytes.zeroize();
        k
    }

    /// From the base64 form `wg genkey` prints.
    pub fn from_base64(s: &str) -> Option<Self> {
        let v = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .ok()?,
        );
        let b: [u8; 32] = v.as_slice().try_into().ok()?;
        Some(Self::from_bytes(b))
    }

    /// The base64 form (for the key file only).
    fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&self.0[..]))
    }

    /// The raw bytes, for the device's control protocol.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The secret as boringtun takes it.
    pub fn secret(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(*self.0)
    }

    /// The raw public key.
    pub fn public_bytes(&self) -> [u8; 32] {
        x25519::PublicKey::from(&self.secret()).to_bytes()
    }

    /// The public key (what peers and the NodeRecord carry).
    pub fn public_key(&self) -> Result<WgPublicKey, KeyError> {
        let p = x25519::PublicKey::from(&self.secret());
        WgPublicKey::from_bytes(p.to_bytes()).map_err(KeyError::Public)
    }
}

impl Clone for PrivateKey {
    fn clone(&self) -> Self {
        Self(Zeroizing::new(*self.0))
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.public_key() {
            Ok(p) => write!(f, "PrivateKey(public {})", p.fingerprint()),
            Err(_) => f.write_str("PrivateKey(..)"),
        }
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of buf.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// The node's private key file.
#[derive(Debug, Clone)]
pub struct KeyFile {
    pub path: PathBuf,
}

impl KeyFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
        move |source| KeyError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Loads the key, or creates the file (mode 0600) with a new one.
    /// Returns the key and whether it was created.
    pub fn load_or_create(&self) -> Result<(PrivateKey, bool), KeyError> {
        match self.load() {
            Ok(k) => Ok((k, false)),
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let k = PrivateKey::generate()?;
                match self.write_new(&k) {
                    Ok(()) => Ok((k, true)),
                    // Another process created it meanwhile: use theirs.
                    Err(KeyError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        Ok((self.load()?, false))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Loads an existing key file, refusing one others can read.
    pub fn load(&self) -> Result<PrivateKey, KeyError> {
        let meta = std::fs::metadata(&self.path).map_err(self.io())?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: self.path.clone(),
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read_to_string(&self.path).map_err(self.io())?);
        PrivateKey::from_base64(&text).ok_or_else(|| KeyError::Malformed {
            path: self.path.clone(),
        })
    }

    /// Creates the file with `key`; fails if it exists.
    pub fn write_new(&self, key: &PrivateKey) -> Result<(), KeyError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(self.io())?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(self.io())?;
        let mut line = key.to_base64();
        line.push('\n');
        f.write_all(line.as_bytes()).map_err(self.io())?;
        f.sync_all().map_err(self.io())
    }

    /// Replaces the file's key atomically (rotation): a 0600 temporary file
    /// renamed over the old one.
    pub fn replace(&self, key: &PrivateKey) -> Result<(), KeyError> {
        let tmp = KeyFile::new(tmp_path(&self.path));
        let _ = std::fs::remove_file(&tmp.path);
        tmp.write_new(key)?;
        std::fs::rename(&tmp.path, &self.path).map_err(self.io())
    }
}

fn tmp_path(p: &Path) -> PathBuf {
    let mut name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    p.with_file_name(format!(".{}", name.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_match_wg_and_files_are_private() {
        // The RFC 7748 test vector's private key, as `wg pubkey` sees it.
        let k = PrivateKey::from_base64("d0ZQ9XmBWz0rw5lMnOOf9aJ4UGwdQ6nM9ezRP5QE81Y=").unwrap();
        let p = k.public_key().unwrap();
        assert_eq!(p.to_string().len(), 44);
        let d = format!("{k:?}");
        assert!(d.contains(&p.fingerprint()) && !d.contains("d0ZQ9X"), "{d}");

        let dir = tempfile::tempdir().unwrap();
        let f = KeyFile::new(dir.path().join("sub/wg.key"));
        let (k1, created) = f.load_or_create().unwrap();
        assert!(created);
        let mode = std::fs::metadata(&f.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = f.load_or_create().unwrap();
        assert!(!created);
        assert_eq!(k1.public_key().unwrap(), k2.public_key().unwrap());

        std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(0o600)).unwrap();

        let k3 = PrivateKey::generate().unwrap();
        f.replace(&k3).unwrap();
        assert_eq!(
            f.load().unwrap().public_key().unwrap(),
            k3.public_key().unwrap()
        );
        std::fs::write(&f.path, "not a key").unwrap();
        assert!(matches!(f.load(), Err(KeyError::Malformed { .. })));
    }
}
