//! `from_endpoint`: TC ingress of a pod's host-side veth, i.e. every packet a
//! local endpoint sends.
//!
//! With the datapath not configured (mode `none`) everything goes to the
//! host stack unchanged. Otherwise a pod is untrusted:
//!
//! - a frame that is neither IPv4 nor ARP (IPv6 included, until the
//!   datapath supports it) is dropped (`drop_non_ipv4`);
//! - an IPv4 packet whose source is not a local endpoint (`CM_ENDPOINTS`)
//!   bound to this very interface (its `ifindex`), and an ARP frame whose
//!   sender protocol address is not, are dropped (`drop_spoofed`). A pod
//!   whose entry the agent has not written yet sends nothing (fail closed);
//! - destination is a service frontend address (`CM_LB_FRONTENDS`): a
//!   fragment is dropped (`drop_fragment`), a protocol other than TCP/UDP
//!   or a port that is not one of its frontends too
//!   (`drop_service_protocol`); a frontend (address, port, TCP or UDP): the
//!   destination becomes the flow's backend (kept for the flow's life while
//!   the backend is allowed, else drawn from the selectable ones; replies
//!   are translated back on delivery), then routed as below; a frontend
//!   with no selectable backend drops new flows (`drop_no_service_backend`);
//! - destination is a local endpoint: rewrite MACs, `redirect_peer` straight
//!   into its namespace (no host stack);
//! - destination is in the ip-cache with a tunnel endpoint (a remote node),
//!   by the node's mode:
//!   - VXLAN: set the tunnel key (remote node, VNI = the source endpoint's
//!     security identity) and redirect to the external-mode VXLAN device;
//!   - Geneve: encapsulate here (`bpf_skb_adjust_room` + outer IPv4/UDP
//!     6081/Geneve headers, VNI = identity) and send out of the underlay
//!     interface with `bpf_redirect_neigh` (the kernel fills in the MACs of
//!     the next hop);
//!   - direct routing: `bpf_redirect_neigh` to the underlay interface, whose
//!     FIB lookup uses the routes the agent installed (pod CIDR via node);
//! - destination marked for encryption (ip-cache `IPCACHE_FLAG_ENCRYPT`):
//!   redirected to the WireGuard (TUN) device, which encrypts it to the
//!   remote node; with no device configured, strict mode drops it
//!   (`drop_strict_plaintext`), otherwise it takes the tunnel unencrypted;
//! - destination is a remote range whose node is gone (ip-cache entry marked
//!   unreachable): dropped with a counted reason;
//! - strict mode (`CONFIG_FLAG_STRICT`), destination inside one of the
//!   mesh's pod ranges (`CM_STRICT_RANGES`) that the ip-cache cannot route
//!   (no entry, or one with neither tunnel endpoint nor encryption):
//!   dropped (`drop_strict_unknown_dest`), never handed to the host stack
//!   (whose default route would send it out in the clear);
//! - anything else (a destination outside the mesh, or not covered by
//!   strict mode): hand to the host stack unchanged.
//!
//! Every packet is counted per CPU in CM_METRICS by (direction, verdict).
//!
//! The host (non-BPF) build of this file exists only so that workspace tools
//! (`cargo check`, `cargo clippy --workspace`) can type-check it; the real
//! object is built for `bpfel-unknown-none` by node-agent's build.rs.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// `#[classifier]` generates the kernel entry point taking `*mut __sk_buff`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

// Not every shared helper is used by this program.
#[allow(dead_code)]
mod shared;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_DONT_FRAGMENT, BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key,
    },
    helpers::generated::{
        bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh, bpf_skb_adjust_room,
        bpf_skb_set_tunnel_key,
    },
    macros::classifier,
    programs::TcContext,
};
use shared::{
    Balanced, ETH_HLEN, ETH_P_IP, IP_DST, IP_SRC, config, count, deliver, endpoint,
    in_strict_range, ipcache, lb_forward,
};
use tunnel_common::{
    CONFIG_FLAG_STRICT, DatapathConfig, Direction, ENCAP_OVERHEAD, EndpointInfo, GENEVE_PORT,
    IPCACHE_FLAG_ENCRYPT, IPCACHE_FLAG_UNREACHABLE, TunnelMode, Verdict,
};

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (verdict, action) = try_from_endpoint(&ctx);
    count(Direction::Egress, verdict, len);
    action
}

const ETH_P_ARP: u16 = 0x0806;
/// Sender protocol address of an Ethernet + ARP (IPv4 over Ethernet) frame.
const ARP_SPA: usize = ETH_HLEN + 14;

/// The local endpoint `ip` if it is bound to the interface the packet came
/// in on: a pod may only send as itself.
#[inline(always)]
fn own_endpoint(ctx: &TcContext, ip: u32) -> Option<EndpointInfo> {
    let ep = endpoint(ip)?;
    // SAFETY: ctx wraps the live `__sk_buff` of this invocation.
    let ifindex = unsafe { (*ctx.as_ptr().cast::<aya_ebpf::bindings::__sk_buff>()).ifindex };
    (ep.ifindex == ifindex).then_some(ep)
}

/// ARP from a pod: only about its own address (the host answers it).
#[inline(always)]
fn arp(ctx: &TcContext) -> (Verdict, i32) {
    let Ok(spa) = ctx.load::<u32>(ARP_SPA) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    match own_endpoint(ctx, spa) {
        Some(_) => (Verdict::Pass, TC_ACT_OK),
        None => (Verdict::DropSpoofed, TC_ACT_SHOT),
    }
}

/// Strict mode's verdict for a destination the ip-cache cannot route: a
/// mesh pod range is never handed to the host stack.
#[inline(always)]
fn unroutable(cfg: &DatapathConfig, dst: u32) -> (Verdict, i32) {
    if cfg.flags & CONFIG_FLAG_STRICT != 0 && in_strict_range(dst) {
        return (Verdict::DropStrictUnknownDest, TC_ACT_SHOT);
    }
    (Verdict::Pass, TC_ACT_OK)
}

#[inline(always)]
fn try_from_endpoint(ctx: &TcContext) -> (Verdict, i32) {
    let cfg = config();
    if cfg.mode == TunnelMode::None as u32 {
        return (Verdict::Pass, TC_ACT_OK);
    }
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => {}
        ETH_P_ARP => return arp(ctx),
        _ => return (Verdict::DropNonIpv4, TC_ACT_SHOT),
    }
    let (Ok(src), Ok(dst)) = (ctx.load::<u32>(IP_SRC), ctx.load::<u32>(IP_DST)) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    let Some(sender) = own_endpoint(ctx, src) else {
        return (Verdict::DropSpoofed, TC_ACT_SHOT);
    };
    // A service frontend is translated to its flow's backend first; the
    // rest routes the backend's address.
    let dst = match lb_forward(ctx, src, dst) {
        Ok(Balanced::No) => dst,
        Ok(Balanced::To(backend)) => backend,
        Err(v) => return (v, TC_ACT_SHOT),
    };
    if let Some(ep) = endpoint(dst) {
        return deliver(ctx, &ep);
    }
    let Some(dest) = ipcache(dst) else {
        return unroutable(&cfg, dst);
    };
    if dest.flags & IPCACHE_FLAG_UNREACHABLE != 0 {
        return (Verdict::DropNoTunnelEndpoint, TC_ACT_SHOT);
    }
    if dest.flags & IPCACHE_FLAG_ENCRYPT != 0 {
        if cfg.wg_ifindex != 0 {
            // The TUN device is layer 3: the kernel strips the Ethernet
            // header on the way.
            // SAFETY: plain helper call.
            let r = unsafe { bpf_redirect(cfg.wg_ifindex, 0) };
            return (Verdict::Encrypted, r as i32);
        }
        if cfg.flags & CONFIG_FLAG_STRICT != 0 {
            return (Verdict::DropStrictPlaintext, TC_ACT_SHOT);
        }
    }
    if dest.tunnel_endpoint == 0 {
        return unroutable(&cfg, dst);
    }
    // The sender's identity (24 bits: cluster id + local id) rides in the
    // VNI of either tunnel.
    let identity = sender.identity & 0x00ff_ffff;
    if cfg.mode == TunnelMode::Vxlan as u32 {
        vxlan(ctx, &cfg, dest.tunnel_endpoint, identity)
    } else if cfg.mode == TunnelMode::Geneve as u32 {
        geneve(ctx, &cfg, dest.tunnel_endpoint, identity)
    } else if cfg.mode == TunnelMode::Direct as u32 {
        to_underlay(&cfg, Verdict::Routed)
    } else {
        (Verdict::Pass, TC_ACT_OK)
    }
}

#[inline(always)]
fn vxlan(ctx: &TcContext, cfg: &DatapathConfig, remote: u32, identity: u32) -> (Verdict, i32) {
    // SAFETY: zeroed is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = identity;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(remote);
    key.tunnel_ttl = 64;
    // No outer UDP checksum (as Geneve: the inner packet carries its own;
    // saves a checksum per GSO segment) and DF, like Geneve's outer header:
    // the pod MTU leaves room, the underlay must not fragment.
    // SAFETY: ctx is a live skb, key a valid stack struct of the given size.
    let r = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.as_ptr().cast(),
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_ZERO_CSUM_TX | BPF_F_DONT_FRAGMENT),
        )
    };
    if r != 0 {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    // SAFETY: plain helper call.
    let r = unsafe { bpf_redirect(cfg.overlay_ifindex, 0) };
    (Verdict::Tunnel, r as i32)
}

/// Bytes inserted after the MAC header: outer IPv4, UDP, Geneve, inner
/// Ethernet.
const GENEVE_ROOM: usize = ENCAP_OVERHEAD as usize;
/// Geneve protocol type of an Ethernet payload ("transparent Ethernet
/// bridging").
const ETH_P_TEB: u16 = 0x6558;

/// One's-complement checksum of an IPv4 header without options.
#[inline(always)]
fn ipv4_csum(h: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn geneve(ctx: &TcContext, cfg: &DatapathConfig, remote: u32, identity: u32) -> (Verdict, i32) {
    // The pod's MACs become the inner Ethernet header (the receiver
    // rewrites them anyway); the outer ones are filled by redirect_neigh.
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    let inner_l3 = ctx.len() as usize - ETH_HLEN;
    // Entropy for ECMP on the underlay, from the inner flow.
    // SAFETY: ctx is a live skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.as_ptr().cast()) };
    let flags = u64::from(
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
            // The inner segments keep their size: the pod MTU already
            // leaves room for the headers.
            | BPF_F_ADJ_ROOM_FIXED_GSO,
    ) | ((ETH_HLEN as u64 & 0xff) << 56); // BPF_F_ADJ_ROOM_ENCAP_L2(14)
    // SAFETY: ctx is a live skb; the helper validates the arguments.
    let r = unsafe {
        bpf_skb_adjust_room(
            ctx.as_ptr().cast(),
            GENEVE_ROOM as i32,
            BPF_ADJ_ROOM_MAC,
            flags,
        )
    };
    if r != 0 {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    let ip_len = (inner_l3 + GENEVE_ROOM) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF: the underlay must not fragment; the MTU accounts for it
    ip[8] = 64;
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&cfg.underlay_ip.to_ne_bytes());
    ip[16..20].copy_from_slice(&remote.to_ne_bytes());
    let csum = ipv4_csum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());

    let mut hdr = [0u8; GENEVE_ROOM];
    hdr[..20].copy_from_slice(&ip);
    let sport = 49152 | (hash as u16 & 0x3fff);
    hdr[20..22].copy_from_slice(&sport.to_be_bytes());
    hdr[22..24].copy_from_slice(&GENEVE_PORT.to_be_bytes());
    hdr[24..26].copy_from_slice(&(ip_len - 20).to_be_bytes());
    // UDP checksum 0: allowed over IPv4, and the inner packet has its own.
    // Geneve: version 0, no options, not OAM, not critical.
    hdr[30..32].copy_from_slice(&ETH_P_TEB.to_be_bytes());
    hdr[32..35].copy_from_slice(&identity.to_be_bytes()[1..4]);
    hdr[36..48].copy_from_slice(&macs);
    hdr[48..50].copy_from_slice(&0x0800u16.to_be_bytes());
    if ctx.store(ETH_HLEN, &hdr, 0).is_err() {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    to_underlay(cfg, Verdict::Tunnel)
}

/// Out of the underlay interface, next hop resolved by the kernel's FIB and
/// neighbour tables (routes to remote pod CIDRs in direct mode, the
/// underlay's own routes for Geneve).
#[inline(always)]
fn to_underlay(cfg: &DatapathConfig, verdict: Verdict) -> (Verdict, i32) {
    // SAFETY: no parameters (a FIB lookup on the packet's destination).
    let r = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    (verdict, r as i32)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
