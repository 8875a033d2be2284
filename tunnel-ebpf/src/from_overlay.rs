//! `from_overlay`: TC ingress of the node's VXLAN device (external mode):
//! decapsulated traffic from remote nodes.
//!
//! Reads the tunnel key (VNI = the sender's security identity), records the
//! identity per source address in CM_SRC_IDENTITY, and delivers to the local
//! endpoint with `redirect_peer`. A destination that is not a local endpoint
//! is dropped with a counted reason, never handed on silently.
//!
//! The host build exists only for workspace tools (see from_endpoint.rs).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![allow(clippy::not_unsafe_ptr_arg_deref)]

// Not every shared helper is used by this program.
#[allow(dead_code)]
mod shared;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::generated::bpf_skb_get_tunnel_key,
    macros::classifier,
    programs::TcContext,
};
use shared::{count, deliver_unencrypted, endpoint, ipv4_addrs, record_identity};
use tunnel_common::{Direction, Verdict};

#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (verdict, action) = try_from_overlay(&ctx);
    count(Direction::Ingress, verdict, len);
    action
}

#[inline(always)]
fn try_from_overlay(ctx: &TcContext) -> (Verdict, i32) {
    let Some((src, dst)) = ipv4_addrs(ctx) else {
        return (Verdict::Pass, TC_ACT_OK);
    };
    // SAFETY: zeroed is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: ctx is a live skb, key a valid stack struct of the given size.
    let r = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.as_ptr().cast(),
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if r != 0 {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    }
    record_identity(src, key.tunnel_id & 0x00ff_ffff);
    let Some(ep) = endpoint(dst) else {
        return (Verdict::DropUnknownEndpoint, TC_ACT_SHOT);
    };
    deliver_unencrypted(ctx, &ep)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
