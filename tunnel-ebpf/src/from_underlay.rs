//! `from_underlay`: TC ingress of the node's underlay interface, for the
//! two modes that need no kernel tunnel device.
//!
//! - Geneve (UDP 6081 to this node's underlay IP): check the header, take
//!   the sender's identity from the VNI, strip outer IPv4/UDP/Geneve/inner
//!   Ethernet with `bpf_skb_adjust_room` and deliver to the local endpoint;
//!   an inner destination that is not a local endpoint is dropped with a
//!   counted reason, never handed on.
//! - VXLAN (UDP 8472 to this node's underlay IP, when the agent configured
//!   that IP): decapsulated here the same way, VNI = identity. Sending
//!   still goes through the external-mode VXLAN device; receiving here
//!   skips the host's UDP stack and the device's GRO cells (the device and
//!   `from_overlay` remain the path when no underlay IP is configured).
//! - Direct routing: a packet for a local endpoint is delivered; the
//!   sender's identity is what the ip-cache says about its source address
//!   (no header carries it).
//! - anything else (the node's own traffic, VXLAN for the kernel device):
//!   passed to the host stack untouched and not counted, so the counters
//!   stay about pod traffic.
//!
//! The host build exists only for workspace tools (see from_endpoint.rs).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![allow(clippy::not_unsafe_ptr_arg_deref)]

// Not every shared helper is used by this program.
#[allow(dead_code)]
mod shared;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::bpf_skb_adjust_room,
    macros::classifier,
    programs::TcContext,
};
use shared::{
    ETH_HLEN, config, count, deliver_unencrypted, endpoint, ipcache, ipv4_addrs, record_identity,
};
use tunnel_common::{Direction, GENEVE_PORT, IDENTITY_WORLD, TunnelMode, VXLAN_PORT, Verdict};

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    let len = ctx.len();
    match try_from_underlay(&ctx) {
        Some((verdict, action)) => {
            count(Direction::Ingress, verdict, len);
            action
        }
        None => TC_ACT_OK,
    }
}

const IPPROTO_UDP: u8 = 17;
/// Outer IPv4 without options + UDP.
const OUTER_L3_L4: usize = 20 + 8;
const GENEVE_HLEN: usize = 8;
const ETH_P_TEB: u16 = 0x6558;
const ETH_P_IP: u16 = 0x0800;

/// None: not ours, pass uncounted.
#[inline(always)]
fn try_from_underlay(ctx: &TcContext) -> Option<(Verdict, i32)> {
    let (src, dst) = ipv4_addrs(ctx)?;
    let cfg = config();
    let tunnel_port = if cfg.mode == TunnelMode::Geneve as u32 {
        GENEVE_PORT
    } else if cfg.mode == TunnelMode::Vxlan as u32 {
        VXLAN_PORT
    } else {
        0
    };
    if tunnel_port != 0 && cfg.underlay_ip != 0 && dst == cfg.underlay_ip {
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        let dport: u16 = ctx.load(ETH_HLEN + 22).ok()?;
        if vihl != 0x45 || proto != IPPROTO_UDP || u16::from_be(dport) != tunnel_port {
            return None;
        }
        return Some(if tunnel_port == GENEVE_PORT {
            geneve(ctx)
        } else {
            vxlan(ctx)
        });
    }
    if cfg.mode == TunnelMode::Direct as u32 {
        let ep = endpoint(dst)?;
        let identity = match ipcache(src) {
            Some(v) if v.identity != 0 => v.identity,
            _ => IDENTITY_WORLD,
        };
        record_identity(src, identity);
        return Some(deliver_unencrypted(ctx, &ep));
    }
    None
}

#[inline(always)]
fn geneve(ctx: &TcContext) -> (Verdict, i32) {
    let g = ETH_HLEN + OUTER_L3_L4;
    let Ok(hdr) = ctx.load::<[u8; GENEVE_HLEN]>(g) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    // Version 0 only; options are skipped (we send none, others may).
    if hdr[0] >> 6 != 0 || u16::from_be_bytes([hdr[2], hdr[3]]) != ETH_P_TEB {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    }
    let opts = usize::from(hdr[0] & 0x3f) * 4;
    let identity = u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]);
    decap(ctx, GENEVE_HLEN + opts, identity)
}

/// VXLAN header: flags (I = VNI valid), reserved, VNI (24 bits), reserved.
const VXLAN_HLEN: usize = 8;
const VXLAN_FLAG_VNI: u8 = 0x08;

#[inline(always)]
fn vxlan(ctx: &TcContext) -> (Verdict, i32) {
    let Ok(hdr) = ctx.load::<[u8; VXLAN_HLEN]>(ETH_HLEN + OUTER_L3_L4) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    if hdr[0] & VXLAN_FLAG_VNI == 0 {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    }
    decap(
        ctx,
        VXLAN_HLEN,
        u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]),
    )
}

/// Strips outer IPv4 + UDP + a `tunnel_hlen`-byte tunnel header + the
/// inner Ethernet header, records the sender's identity and delivers the
/// inner packet to its local endpoint.
#[inline(always)]
fn decap(ctx: &TcContext, tunnel_hlen: usize, identity: u32) -> (Verdict, i32) {
    let inner = ETH_HLEN + OUTER_L3_L4 + tunnel_hlen;
    let Ok(ethertype) = ctx.load::<u16>(inner + 12) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    if u16::from_be(ethertype) != ETH_P_IP {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    }
    let (Ok(src), Ok(dst)) = (
        ctx.load::<u32>(inner + ETH_HLEN + 12),
        ctx.load::<u32>(inner + ETH_HLEN + 16),
    ) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    record_identity(src, identity);
    let Some(ep) = endpoint(dst) else {
        return (Verdict::DropUnknownEndpoint, TC_ACT_SHOT);
    };
    let strip = (OUTER_L3_L4 + tunnel_hlen + ETH_HLEN) as i32;
    // SAFETY: ctx is a live skb; the helper validates the arguments.
    let r = unsafe {
        bpf_skb_adjust_room(
            ctx.as_ptr().cast(),
            -strip,
            BPF_ADJ_ROOM_MAC,
            u64::from(BPF_F_ADJ_ROOM_DECAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO),
        )
    };
    if r != 0 {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    deliver_unencrypted(ctx, &ep)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
