//! `from_underlay`: TC ingress of the node's underlay interface, for the
//! two modes that need no kernel tunnel device.
//!
//! - Geneve (UDP 6081 to this node's underlay IPv4 `underlay_ip`, or over
//!   IPv6 to its `underlay_ip6` with UDP right after the fixed IPv6
//!   header): check the header, take the sender's identity from the VNI,
//!   strip outer IPv4 or IPv6/UDP/Geneve/inner Ethernet with
//!   `bpf_skb_adjust_room` (`BPF_F_ADJ_ROOM_DECAP_L3_*` of the inner
//!   family: an IPv4 or IPv6 pod packet over either underlay) and deliver
//!   to the local endpoint (`CM_ENDPOINTS` or `CM_ENDPOINTS6`), recording
//!   the identity (`CM_SRC_IDENTITY` or `CM_SRC_IDENTITY6`); an inner
//!   destination that is not a local endpoint is dropped with a counted
//!   reason, never handed on.
//! - VXLAN (UDP 8472 to this node's underlay IPv4 or IPv6, when the agent
//!   configured that address): decapsulated here the same way, VNI =
//!   identity. Sending
//!   still goes through the external-mode VXLAN device; receiving here
//!   skips the host's UDP stack and the device's GRO cells (the device and
//!   `from_overlay` remain the path when no underlay IP is configured).
//! - Direct routing: an IPv4 or IPv6 packet for a local endpoint is
//!   delivered; the sender's identity is what the ip-cache (`CM_IPCACHE`,
//!   `CM_IPCACHE6`) says about its source address (no header carries it).
//! - Strict ingress (`CONFIG_FLAG_STRICT_INGRESS`): every delivery above
//!   is dropped instead (`drop_strict_plaintext`), both families.
//! - Every delivery applies the endpoint's ingress network policy with the
//!   sender's identity (`shared::deliver`).
//! - anything else (the node's own traffic, VXLAN for the kernel device):
//!   passed to the host stack untouched and not counted, so the counters
//!   stay about pod traffic.
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
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::bpf_skb_adjust_room,
    macros::classifier,
    programs::TcContext,
};
use shared::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP6_HLEN, IP6_NEXT, config, count, deliver_unencrypted,
    endpoint, endpoint6, identity_of, ipcache, ipcache6, ipv4_addrs, ipv6_addrs, record_identity,
    record_identity6,
};
use tunnel_common::{DatapathConfig, Direction, GENEVE_PORT, Ip6, TunnelMode, VXLAN_PORT, Verdict};

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let f = flow::begin(
        tunnel_common::FLOW_HOOK_UNDERLAY,
        Direction::Ingress as u8,
        shared::ingress_ifindex(&ctx),
    );
    match try_from_underlay(&ctx) {
        Some((verdict, action)) => {
            count(Direction::Ingress, verdict, len);
            flow::end(&ctx, f, verdict, len);
            action
        }
        None => TC_ACT_OK,
    }
}

const IPPROTO_UDP: u8 = 17;
/// Outer IPv4 without options, and outer IPv6 without extension headers.
const OUTER_IP4: usize = 20;
const OUTER_IP6: usize = IP6_HLEN;
const UDP_HLEN: usize = 8;
const GENEVE_HLEN: usize = 8;
const ETH_P_TEB: u16 = 0x6558;

/// The UDP port this node's mode receives tunnelled traffic on (0: none).
#[inline(always)]
fn tunnel_port(cfg: &DatapathConfig) -> u16 {
    if cfg.mode == TunnelMode::Geneve as u32 {
        GENEVE_PORT
    } else if cfg.mode == TunnelMode::Vxlan as u32 {
        VXLAN_PORT
    } else {
        0
    }
}

/// None: not ours, pass uncounted.
#[inline(always)]
fn try_from_underlay(ctx: &TcContext) -> Option<(Verdict, i32)> {
    let ethertype: u16 = ctx.load(12).ok()?;
    let cfg = config();
    match u16::from_be(ethertype) {
        ETH_P_IP => ipv4(ctx, &cfg),
        ETH_P_IPV6 => ipv6(ctx, &cfg),
        _ => None,
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, cfg: &DatapathConfig) -> Option<(Verdict, i32)> {
    let (src, dst) = ipv4_addrs(ctx)?;
    let port = tunnel_port(cfg);
    if port != 0 && cfg.underlay_ip != 0 && dst == cfg.underlay_ip {
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        let dport: u16 = ctx.load(ETH_HLEN + OUTER_IP4 + 2).ok()?;
        if vihl != 0x45 || proto != IPPROTO_UDP || u16::from_be(dport) != port {
            return None;
        }
        return Some(tunnel(ctx, port, OUTER_IP4));
    }
    if cfg.mode == TunnelMode::Direct as u32 {
        let ep = endpoint(dst)?;
        let identity = identity_of(ipcache(src));
        record_identity(src, identity);
        return Some(deliver_unencrypted(ctx, &ep, identity));
    }
    None
}

/// IPv6 from the underlay: a tunnel over an IPv6 underlay (UDP right
/// after the fixed header, to this node's `underlay_ip6`), or a pod's own
/// IPv6 packet in direct mode.
#[inline(always)]
fn ipv6(ctx: &TcContext, cfg: &DatapathConfig) -> Option<(Verdict, i32)> {
    let (src, dst) = ipv6_addrs(ctx)?;
    let port = tunnel_port(cfg);
    if port != 0 && cfg.underlay_ip6 != [0; 16] && dst == cfg.underlay_ip6 {
        let next: u8 = ctx.load(IP6_NEXT).ok()?;
        let dport: u16 = ctx.load(ETH_HLEN + OUTER_IP6 + 2).ok()?;
        // Extension headers are not expected (our senders put none): such
        // a packet is the host stack's.
        if next != IPPROTO_UDP || u16::from_be(dport) != port {
            return None;
        }
        return Some(tunnel(ctx, port, OUTER_IP6));
    }
    if cfg.mode == TunnelMode::Direct as u32 {
        let ep = endpoint6(&dst)?;
        let identity = identity_of(ipcache6(&src));
        record_identity6(&src, identity);
        return Some(deliver_unencrypted(ctx, &ep, identity));
    }
    None
}

/// Geneve or VXLAN (by `port`) after an outer IP header of `outer_l3`
/// bytes.
#[inline(always)]
fn tunnel(ctx: &TcContext, port: u16, outer_l3: usize) -> (Verdict, i32) {
    if port == GENEVE_PORT {
        geneve(ctx, outer_l3)
    } else {
        vxlan(ctx, outer_l3)
    }
}

#[inline(always)]
fn geneve(ctx: &TcContext, outer_l3: usize) -> (Verdict, i32) {
    let g = ETH_HLEN + outer_l3 + UDP_HLEN;
    let Ok(hdr) = ctx.load::<[u8; GENEVE_HLEN]>(g) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    // Version 0 only; options are skipped (we send none, others may).
    if hdr[0] >> 6 != 0 || u16::from_be_bytes([hdr[2], hdr[3]]) != ETH_P_TEB {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    }
    let opts = usize::from(hdr[0] & 0x3f) * 4;
    let identity = u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]);
    decap(ctx, outer_l3, GENEVE_HLEN + opts, identity)
}

/// VXLAN header: flags (I = VNI valid), reserved, VNI (24 bits), reserved.
const VXLAN_HLEN: usize = 8;
const VXLAN_FLAG_VNI: u8 = 0x08;

#[inline(always)]
fn vxlan(ctx: &TcContext, outer_l3: usize) -> (Verdict, i32) {
    let Ok(hdr) = ctx.load::<[u8; VXLAN_HLEN]>(ETH_HLEN + outer_l3 + UDP_HLEN) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    if hdr[0] & VXLAN_FLAG_VNI == 0 {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    }
    decap(
        ctx,
        outer_l3,
        VXLAN_HLEN,
        u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]),
    )
}

/// Strips the outer IP header (`outer_l3` bytes) + UDP + a
/// `tunnel_hlen`-byte tunnel header + the inner Ethernet header, records
/// the sender's identity and delivers the inner packet (IPv4 or IPv6,
/// either over either outer family) to its local endpoint.
#[inline(always)]
fn decap(ctx: &TcContext, outer_l3: usize, tunnel_hlen: usize, identity: u32) -> (Verdict, i32) {
    let inner = ETH_HLEN + outer_l3 + UDP_HLEN + tunnel_hlen;
    let Ok(ethertype) = ctx.load::<u16>(inner + 12) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    let l3 = inner + ETH_HLEN;
    // The inner family's local endpoint, and the flag that tells
    // adjust_room the family of the header that becomes the outermost
    // (it sets skb->protocol from it).
    let (ep, decap_flag) = match u16::from_be(ethertype) {
        ETH_P_IP => {
            let (Ok(src), Ok(dst)) = (ctx.load::<u32>(l3 + 12), ctx.load::<u32>(l3 + 16)) else {
                return (Verdict::DropMalformed, TC_ACT_SHOT);
            };
            record_identity(src, identity);
            (endpoint(dst), BPF_F_ADJ_ROOM_DECAP_L3_IPV4)
        }
        ETH_P_IPV6 => {
            let (Ok(src), Ok(dst)) = (ctx.load::<Ip6>(l3 + 8), ctx.load::<Ip6>(l3 + 24)) else {
                return (Verdict::DropMalformed, TC_ACT_SHOT);
            };
            record_identity6(&src, identity);
            (endpoint6(&dst), BPF_F_ADJ_ROOM_DECAP_L3_IPV6)
        }
        _ => return (Verdict::DropMalformed, TC_ACT_SHOT),
    };
    let Some(ep) = ep else {
        return (Verdict::DropUnknownEndpoint, TC_ACT_SHOT);
    };
    let strip = (outer_l3 + UDP_HLEN + tunnel_hlen + ETH_HLEN) as i32;
    // SAFETY: ctx is a live skb; the helper validates the arguments.
    let r = unsafe {
        bpf_skb_adjust_room(
            ctx.as_ptr().cast(),
            -strip,
            BPF_ADJ_ROOM_MAC,
            u64::from(decap_flag | BPF_F_ADJ_ROOM_FIXED_GSO),
        )
    };
    if r != 0 {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    deliver_unencrypted(ctx, &ep, identity)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
