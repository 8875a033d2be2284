//! `from_overlay`: TC ingress of the node's VXLAN device (external mode):
//! decapsulated traffic from remote nodes.
//!
//! Reads the tunnel key (VNI = the sender's security identity) of either
//! underlay family (IPv4 or IPv6 outer header), records the identity per
//! source address in CM_SRC_IDENTITY (IPv4 inner) or CM_SRC_IDENTITY6
//! (IPv6 inner), and delivers to the local endpoint (`CM_ENDPOINTS`,
//! `CM_ENDPOINTS6`) with `redirect_peer`. A destination that is not a
//! local endpoint is dropped with a counted reason, never handed on
//! silently; strict ingress drops every delivery (`drop_strict_plaintext`).
//! Delivery applies the endpoint's ingress network policy with the VNI's
//! identity (`shared::deliver`).
//! Other frames (neither IPv4 nor IPv6): host stack.
//!
//! The host build exists only for workspace tools (see from_endpoint.rs).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![allow(clippy::not_unsafe_ptr_arg_deref)]

// Not every shared helper is used by this program.
#[allow(dead_code)]
mod flow;
#[allow(dead_code)]
mod shared;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_TUNINFO_IPV6, TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::generated::bpf_skb_get_tunnel_key,
    macros::classifier,
    programs::TcContext,
};
use shared::{
    count, deliver_unencrypted, endpoint, endpoint6, ipv4_addrs, ipv6_addrs, record_identity,
    record_identity6,
};
use tunnel_common::{Direction, Verdict};

#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let f = flow::begin(
        tunnel_common::FLOW_HOOK_OVERLAY,
        Direction::Ingress as u8,
        shared::ingress_ifindex(&ctx),
    );
    let (verdict, action) = try_from_overlay(&ctx);
    count(Direction::Ingress, verdict, len);
    flow::end(&ctx, f, verdict, len);
    action
}

/// The VNI of the tunnel the packet arrived through. The kernel refuses
/// (-EPROTO) to give an IPv6 tunnel's key without `BPF_F_TUNINFO_IPV6`
/// and an IPv4 one's with it: the underlay may be either, so both are
/// asked (IPv4 first, the common case).
#[inline(always)]
fn tunnel_vni(ctx: &TcContext) -> Option<u32> {
    for flags in [0, BPF_F_TUNINFO_IPV6] {
        // SAFETY: zeroed is a valid bpf_tunnel_key.
        let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
        // SAFETY: ctx is a live skb, key a valid stack struct of the given size.
        let r = unsafe {
            bpf_skb_get_tunnel_key(
                ctx.as_ptr().cast(),
                &mut key,
                core::mem::size_of::<bpf_tunnel_key>() as u32,
                u64::from(flags),
            )
        };
        if r == 0 {
            return Some(key.tunnel_id & 0x00ff_ffff);
        }
    }
    None
}

#[inline(always)]
fn try_from_overlay(ctx: &TcContext) -> (Verdict, i32) {
    if let Some((src, dst)) = ipv4_addrs(ctx) {
        let Some(identity) = tunnel_vni(ctx) else {
            return (Verdict::DropMalformed, TC_ACT_SHOT);
        };
        record_identity(src, identity);
        let Some(ep) = endpoint(dst) else {
            return (Verdict::DropUnknownEndpoint, TC_ACT_SHOT);
        };
        return deliver_unencrypted(ctx, &ep, identity);
    }
    if let Some((src, dst)) = ipv6_addrs(ctx) {
        let Some(identity) = tunnel_vni(ctx) else {
            return (Verdict::DropMalformed, TC_ACT_SHOT);
        };
        record_identity6(&src, identity);
        let Some(ep) = endpoint6(&dst) else {
            return (Verdict::DropUnknownEndpoint, TC_ACT_SHOT);
        };
        return deliver_unencrypted(ctx, &ep, identity);
    }
    (Verdict::Pass, TC_ACT_OK)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
