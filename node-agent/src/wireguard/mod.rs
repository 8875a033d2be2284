//! The node's WireGuard device: its lifecycle ([`device`]: start once,
//! adopt on every later agent start) and this node's key rotation
//! ([`rotation`]). The device's peers are a reconcile target:
//! [`crate::reconcilers::wg_peers`].
//!
//! The device is `clustermesh-wg` (boringtun over TUN), a process of its
//! own: the agent starts it once (detached, in the node's network
//! namespace) and on every later start finds it by its control socket and
//! adopts it, so an agent restart never interrupts encrypted traffic and
//! never resets a session. The private key lives in a 0600 file the device
//! reads; the agent publishes the public key in its NodeRecord.

pub mod device;
pub mod rotation;

pub use device::{
    DeviceSpec, Error, WgDevice, default_bin, default_log, ensure, peer_status, supervise,
};
pub use rotation::{Rotation, rotation};
