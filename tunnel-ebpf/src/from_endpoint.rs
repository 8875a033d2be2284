//! `from_endpoint`: TC ingress of a pod's host-side veth, i.e. every packet a
//! local endpoint sends.
//!
//! - destination is a local endpoint: rewrite MACs, `redirect_peer` straight
//!   into its namespace (no host stack);
//! - destination is in the ip-cache with a tunnel endpoint and the node runs
//!   VXLAN: set the tunnel key (remote node, VNI = the source endpoint's
//!   security identity) and redirect to the VXLAN device;
//! - anything else (unknown destination, not IPv4, datapath not configured):
//!   hand to the host stack unchanged.
//!
//! Every packet is counted per CPU in CM_METRICS by (direction, verdict).
//!
//! The host (non-BPF) build of this file exists only so that workspace tools
//! (`cargo check`, `cargo clippy --workspace`) can type-check it; the real
//! object is built for `bpfel-unknown-none` by node-agent's build.rs.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// `#[classifier]` generates the kernel entry point taking `*mut __sk_buff`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod shared;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::generated::{bpf_redirect, bpf_redirect_peer, bpf_skb_set_tunnel_key},
    macros::classifier,
    programs::TcContext,
};
use shared::{config, count, endpoint, ipcache, ipv4_addrs, set_macs};
use tunnel_common::{Direction, TunnelMode, Verdict};

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (verdict, action) = try_from_endpoint(&ctx);
    count(Direction::Egress, verdict, len);
    action
}

#[inline(always)]
fn try_from_endpoint(ctx: &TcContext) -> (Verdict, i32) {
    let Some((src, dst)) = ipv4_addrs(ctx) else {
        return (Verdict::Pass, TC_ACT_OK);
    };
    let cfg = config();
    if cfg.mode == TunnelMode::None as u32 {
        return (Verdict::Pass, TC_ACT_OK);
    }
    if let Some(ep) = endpoint(dst) {
        if set_macs(ctx, &ep).is_err() {
            return (Verdict::DropInternal, TC_ACT_SHOT);
        }
        // SAFETY: plain helper call; the kernel checks the ifindex.
        let r = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
        return (Verdict::Local, r as i32);
    }
    let Some(dest) = ipcache(dst) else {
        return (Verdict::Pass, TC_ACT_OK);
    };
    if dest.tunnel_endpoint == 0 || cfg.mode != TunnelMode::Vxlan as u32 {
        return (Verdict::Pass, TC_ACT_OK);
    }
    // The VNI carries the sender's identity (24 bits: cluster id + local id).
    let identity = match endpoint(src) {
        Some(ep) => ep.identity,
        None => 2, // world
    };
    // SAFETY: zeroed is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = identity & 0x00ff_ffff;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(dest.tunnel_endpoint);
    key.tunnel_ttl = 64;
    // SAFETY: ctx is a live skb, key a valid stack struct of the given size.
    let r = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.as_ptr().cast(),
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if r != 0 {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    // SAFETY: plain helper call.
    let r = unsafe { bpf_redirect(cfg.overlay_ifindex, 0) };
    (Verdict::Tunnel, r as i32)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
