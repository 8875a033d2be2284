//! `from_wireguard`: TC ingress of the node's WireGuard (TUN) device, i.e.
//! pod traffic the device decrypted from a remote node.
//!
//! The TUN device is layer 3, so the packet starts at its IP header. For a
//! local endpoint the program pushes an Ethernet header
//! (`bpf_skb_change_head`) and delivers it as every program does
//! (`deliver`: a service reply translated back to its frontend, the
//! endpoint's MACs, `redirect_peer`); the sender's identity is what the ip-cache says about
//! the source address (WireGuard authenticated the sending node, and the
//! device only accepts sources within that node's allowed IPs). A
//! destination that is not a local endpoint (e.g. the node itself, with
//! node-to-node encryption) goes to the host stack.
//!
//! The host build exists only for workspace tools (see from_endpoint.rs).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![allow(clippy::not_unsafe_ptr_arg_deref)]

// Not every shared helper is used by this program.
#[allow(dead_code)]
mod shared;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_skb_change_head,
    macros::classifier,
    programs::TcContext,
};
use shared::{ETH_HLEN, ETH_P_IP, count, deliver, endpoint, ipcache, record_identity};
use tunnel_common::{Direction, IDENTITY_WORLD, Verdict};

#[classifier]
pub fn from_wireguard(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (verdict, action) = try_from_wireguard(&ctx);
    count(Direction::Ingress, verdict, len);
    action
}

#[inline(always)]
fn try_from_wireguard(ctx: &TcContext) -> (Verdict, i32) {
    let Ok(vihl) = ctx.load::<u8>(0) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    if vihl >> 4 != 4 {
        return (Verdict::Pass, TC_ACT_OK);
    }
    let (Ok(src), Ok(dst)) = (ctx.load::<u32>(12), ctx.load::<u32>(16)) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    let Some(ep) = endpoint(dst) else {
        return (Verdict::Pass, TC_ACT_OK);
    };
    let identity = match ipcache(src) {
        Some(v) if v.identity != 0 => v.identity,
        _ => IDENTITY_WORLD,
    };
    record_identity(src, identity);
    // SAFETY: ctx is a live skb; the helper validates the arguments.
    if unsafe { bpf_skb_change_head(ctx.as_ptr().cast(), ETH_HLEN as u32, 0) } != 0 {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    // The MACs are written by `deliver`, which also translates a service
    // reply back to its frontend.
    if ctx.store(12, &ETH_P_IP.to_be_bytes(), 0).is_err() {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    deliver(ctx, &ep)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
