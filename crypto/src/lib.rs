//! clustermesh key material and encryption.
//!
//! - [`pki`]: the control plane's X.509 CA and certificates (etcd and
//!   apiserver TLS, remote-cluster client identities).
//! - [`keys`]: WireGuard x25519 keys and the node's private key file.
//! - [`wg`]: a userspace WireGuard device (boringtun over TUN) with the
//!   standard control protocol; the `clustermesh-wg` binary runs it.

pub mod keys;
pub mod pki;
pub mod wg;
