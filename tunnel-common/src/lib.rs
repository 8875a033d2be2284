//! Types shared by the eBPF programs (tunnel-ebpf, `no_std`) and user space
//! (node-agent, with the `user` feature).
//!
//! Rules, because the kernel and user space must agree byte for byte:
//! every type is `#[repr(C)]`, `Copy`, has explicit padding fields and no
//! `bool` (flags are integers), and its size is asserted at compile time.
//! Map and program names are defined here once.
#![no_std]

/// Program names (the function names in tunnel-ebpf, i.e. ELF symbols).
pub mod programs {
    /// TC ingress of a pod's host-side veth: traffic leaving the pod.
    pub const FROM_ENDPOINT: &str = "from_endpoint";
}

/// Map names (the static names in tunnel-ebpf).
pub mod maps {
    /// Per-CPU array of [`crate::Counter`], indexed by [`crate::metric_index`].
    pub const METRICS: &str = "CM_METRICS";
}

/// Direction of a counted packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Leaving a local endpoint (pod).
    Egress = 0,
    /// Arriving for a local endpoint.
    Ingress = 1,
}

/// What happened to a packet: forwarding outcomes and drop reasons.
/// Numbers are stable (they are exported as metrics); append only.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Handed to the host stack unchanged.
    Pass = 0,
    /// Redirected to a local endpoint.
    Local = 1,
    /// Sent to a remote node through the tunnel.
    Tunnel = 2,
    /// Dropped: packet too short or not parseable.
    DropMalformed = 64,
    /// Dropped: destination is a known remote range without a live node.
    DropNoTunnelEndpoint = 65,
    /// Dropped: strict mode refuses to send pod traffic unencrypted.
    DropStrictPlaintext = 66,
    /// Dropped: a helper call failed.
    DropInternal = 67,
}

impl Verdict {
    pub const ALL: [Verdict; 7] = [
        Verdict::Pass,
        Verdict::Local,
        Verdict::Tunnel,
        Verdict::DropMalformed,
        Verdict::DropNoTunnelEndpoint,
        Verdict::DropStrictPlaintext,
        Verdict::DropInternal,
    ];

    pub const fn is_drop(self) -> bool {
        (self as u8) >= 64
    }

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Local => "local",
            Verdict::Tunnel => "tunnel",
            Verdict::DropMalformed => "drop_malformed",
            Verdict::DropNoTunnelEndpoint => "drop_no_tunnel_endpoint",
            Verdict::DropStrictPlaintext => "drop_strict_plaintext",
            Verdict::DropInternal => "drop_internal",
        }
    }
}

/// Verdicts per direction in the metrics array.
pub const VERDICT_SLOTS: u32 = 128;
/// Entries of the metrics array.
pub const METRICS_ENTRIES: u32 = 2 * VERDICT_SLOTS;

/// Index of a (direction, verdict) counter in [`maps::METRICS`].
#[inline(always)]
pub const fn metric_index(dir: Direction, verdict: Verdict) -> u32 {
    (dir as u32) * VERDICT_SLOTS + (verdict as u32)
}

/// Packets and bytes, one per CPU per (direction, verdict).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: Counter is repr(C), Copy, has no padding and every bit pattern is valid.
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_indexes_are_distinct_and_in_range() {
        let mut seen = [false; METRICS_ENTRIES as usize];
        for dir in [Direction::Egress, Direction::Ingress] {
            for v in Verdict::ALL {
                let i = metric_index(dir, v);
                assert!(i < METRICS_ENTRIES);
                assert!(!seen[i as usize]);
                seen[i as usize] = true;
            }
        }
    }
}
