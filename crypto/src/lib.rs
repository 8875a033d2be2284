//! clustermesh encryption: x25519 key pairs and key files, WireGuard tunnels
//! built on boringtun's sans-IO `Tunn` over TUN devices, the peer table and
//! key rotation. Nothing is implemented yet: the crate holds its place in
//! the workspace layout (docs/architecture.md).
