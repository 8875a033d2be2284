//! `from_wireguard`: TC ingress of the node's WireGuard (TUN) device, i.e.
//! pod traffic the device decrypted from a remote node.
//!
//! The TUN device is layer 3, so the packet starts at its IP header (IPv4
//! or IPv6, by the version nibble). For a local endpoint (`CM_ENDPOINTS`,
//! `CM_ENDPOINTS6`) the program pushes an Ethernet header
//! (`bpf_skb_change_head`, ethertype of the family) and delivers it as
//! every program does (`deliver`: the endpoint's ingress policy, a service
//! reply translated back to its frontend, the endpoint's MACs,
//! `redirect_peer`); the sender's identity
//! is what the ip-cache (`CM_IPCACHE`, `CM_IPCACHE6`) says about the
//! source address, recorded in `CM_SRC_IDENTITY` / `CM_SRC_IDENTITY6`
//! (WireGuard authenticated the sending node, and the device only accepts
//! sources within that node's allowed IPs). A destination that is not a
//! local endpoint (e.g. the node itself, with node-to-node encryption)
//! goes to the host stack.
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
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_skb_change_head,
    macros::classifier,
    programs::TcContext,
};
use shared::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, count, deliver, endpoint, endpoint6, identity_of, ipcache,
    ipcache6, record_identity, record_identity6,
};
use tunnel_common::{Direction, Ip6, Verdict};

#[classifier]
pub fn from_wireguard(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let f = flow::begin(
        tunnel_common::FLOW_HOOK_WIREGUARD,
        Direction::Ingress as u8,
        shared::ingress_ifindex(&ctx),
    );
    let (verdict, action) = try_from_wireguard(&ctx);
    count(Direction::Ingress, verdict, len);
    flow::end(&ctx, f, verdict, len);
    action
}

#[inline(always)]
fn try_from_wireguard(ctx: &TcContext) -> (Verdict, i32) {
    let Ok(vihl) = ctx.load::<u8>(0) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    let (ep, ethertype, identity) = match vihl >> 4 {
        4 => {
            let (Ok(src), Ok(dst)) = (ctx.load::<u32>(12), ctx.load::<u32>(16)) else {
                return (Verdict::DropMalformed, TC_ACT_SHOT);
            };
            let Some(ep) = endpoint(dst) else {
                return (Verdict::Pass, TC_ACT_OK);
            };
            let identity = identity_of(ipcache(src));
            record_identity(src, identity);
            (ep, ETH_P_IP, identity)
        }
        6 => {
            let (Ok(src), Ok(dst)) = (ctx.load::<Ip6>(8), ctx.load::<Ip6>(24)) else {
                return (Verdict::DropMalformed, TC_ACT_SHOT);
            };
            let Some(ep) = endpoint6(&dst) else {
                return (Verdict::Pass, TC_ACT_OK);
            };
            let identity = identity_of(ipcache6(&src));
            record_identity6(&src, identity);
            (ep, ETH_P_IPV6, identity)
        }
        _ => return (Verdict::Pass, TC_ACT_OK),
    };
    // SAFETY: ctx is a live skb; the helper validates the arguments.
    if unsafe { bpf_skb_change_head(ctx.as_ptr().cast(), ETH_HLEN as u32, 0) } != 0 {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    // The MACs are written by `deliver`, which also translates a service
    // reply back to its frontend.
    if ctx.store(12, &ethertype.to_be_bytes(), 0).is_err() {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    flow::l3_offset(ETH_HLEN as u32);
    deliver(ctx, &ep, identity)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
