//! clustermesh key material.
//!
//! - [`pki`]: the control plane's X.509 CA and certificates (etcd and
//!   apiserver TLS, remote-cluster client identities).
//!
//! WireGuard (x25519 keys, boringtun tunnels over TUN, rotation) is to come
//! here as well (docs/architecture.md).

pub mod pki;
