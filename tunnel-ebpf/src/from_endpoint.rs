//! `from_endpoint`: TC ingress of a pod's host-side veth, i.e. every packet a
//! local endpoint sends.
//!
//! With the datapath not configured (mode `none`) everything goes to the
//! host stack unchanged. Otherwise a pod is untrusted:
//!
//! - a frame that is neither IPv4, IPv6 nor ARP is dropped
//!   (`drop_unsupported_l3`);
//! - an IPv4 or IPv6 packet whose source is not a local endpoint
//!   (`CM_ENDPOINTS`, `CM_ENDPOINTS6`) bound to this very interface (its
//!   `ifindex`), and an ARP frame whose sender protocol address is not, are
//!   dropped (`drop_spoofed`). A pod whose entry the agent has not written
//!   yet sends nothing (fail closed);
//! - IPv6 from `::` or fe80::/10: neighbour discovery and MLD go to the
//!   host stack, a Neighbour Solicitation for the gateway fe80::1 is
//!   answered here with a Neighbour Advertisement carrying the host veth's
//!   MAC, sent back into the pod (`neighbour_reply`; also when the NS comes
//!   from the pod's own address, as Linux sends it), anything else is
//!   `drop_spoofed`;
//! - destination is a service frontend address (`CM_LB_FRONTENDS`, IPv6
//!   `CM_LB6_FRONTENDS`): a fragment (IPv6: next header Fragment) is
//!   dropped (`drop_fragment`), a protocol other than TCP/UDP (IPv6: any
//!   other next header, extension headers included) or a port that is not
//!   one of its frontends too (`drop_service_protocol`); a frontend
//!   (address, port, TCP or UDP): the
//!   destination becomes the flow's backend (kept for the flow's life while
//!   the backend is allowed, else drawn from the selectable ones; replies
//!   are translated back on delivery), then routed as below; a frontend
//!   with no selectable backend drops new flows (`drop_no_service_backend`);
//! - the sender's network policy, egress, on the (translated) destination
//!   and its identity (`shared::policy`: `drop_policy_denied`,
//!   `drop_policy_unknown_peer`, or `policy_audit` and passed);
//! - destination is a local endpoint: its ingress policy (with the sender's
//!   identity), rewrite MACs, `redirect_peer` straight into its namespace
//!   (no host stack);
//! - destination is in the ip-cache (`CM_IPCACHE`, `CM_IPCACHE6`) with a
//!   tunnel endpoint (a remote node over IPv4, `tunnel_endpoint`, else over
//!   IPv6, `tunnel_endpoint6`: either family of pod over either underlay),
//!   by the node's mode:
//!   - VXLAN: set the tunnel key (remote node, IPv4 or IPv6 with
//!     `BPF_F_TUNINFO_IPV6`, VNI = the source endpoint's security identity)
//!     and redirect to the external-mode VXLAN device;
//!   - Geneve: encapsulate here (`bpf_skb_adjust_room` + outer IPv4 or
//!     IPv6/UDP 6081/Geneve headers, VNI = identity) and send out of the underlay
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
//!   mesh's pod ranges (`CM_STRICT_RANGES`, `CM_STRICT_RANGES6`) that the
//!   ip-cache cannot route
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
mod flow;
#[allow(dead_code)]
mod shared;

use core::ptr::NonNull;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_DONT_FRAGMENT, BPF_F_TUNINFO_IPV6, BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key,
    },
    helpers::generated::{
        bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh, bpf_skb_adjust_room,
        bpf_skb_change_tail, bpf_skb_set_tunnel_key,
    },
    macros::classifier,
    programs::TcContext,
};
use shared::{
    Balanced, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP_DST, IP_SRC, IP6_DST, IP6_HLEN, IP6_NEXT, IP6_SRC,
    config, count, deliver, endpoint, endpoint6, in_strict_range, in_strict_range6,
    ingress_ifindex, ipcache, ipcache6, lb_forward, policy,
};
use shared::{V4, V6};
use tunnel_common::{
    CONFIG_FLAG_STRICT, DatapathConfig, Direction, ENCAP_OVERHEAD, ENCAP_OVERHEAD6, EndpointInfo,
    GENEVE_PORT, IPCACHE_FLAG_ENCRYPT, IPCACHE_FLAG_UNREACHABLE, Ip6, IpCacheValue, TunnelMode,
    Verdict,
};

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let f = flow::begin(
        tunnel_common::FLOW_HOOK_ENDPOINT,
        Direction::Egress as u8,
        ingress_ifindex(&ctx),
    );
    let (verdict, action) = try_from_endpoint(&ctx);
    count(Direction::Egress, verdict, len);
    flow::end(&ctx, f, verdict, len);
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
    (ep.ifindex == ingress_ifindex(ctx)).then_some(ep)
}

/// [`own_endpoint`] for an IPv6 source (`CM_ENDPOINTS6`).
#[inline(always)]
fn own_endpoint6(ctx: &TcContext, ip: &Ip6) -> Option<EndpointInfo> {
    let ep = endpoint6(ip)?;
    (ep.ifindex == ingress_ifindex(ctx)).then_some(ep)
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
/// mesh pod range (`in_range`, looked up only in strict mode) is never
/// handed to the host stack.
#[inline(always)]
fn unroutable(cfg: &DatapathConfig, in_range: impl FnOnce() -> bool) -> (Verdict, i32) {
    if cfg.flags & CONFIG_FLAG_STRICT != 0 && in_range() {
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
        ETH_P_IP => ipv4(ctx, &cfg),
        ETH_P_IPV6 => ipv6(ctx, &cfg),
        ETH_P_ARP => arp(ctx),
        _ => (Verdict::DropUnsupportedL3, TC_ACT_SHOT),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, cfg: &DatapathConfig) -> (Verdict, i32) {
    let (Ok(src), Ok(dst)) = (ctx.load::<u32>(IP_SRC), ctx.load::<u32>(IP_DST)) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    let Some(sender) = own_endpoint(ctx, src) else {
        return (Verdict::DropSpoofed, TC_ACT_SHOT);
    };
    flow::note_identities(sender.identity, 0);
    // A service frontend is translated to its flow's backend first; the
    // rest routes the backend's address.
    let dst = match lb_forward::<V4>(ctx, src, dst) {
        Ok(Balanced::No) => dst,
        Ok(Balanced::To(backend)) => backend,
        Err(v) => return (v, TC_ACT_SHOT),
    };
    // The sender's egress policy, on the backend when balanced.
    if let Err(v) = policy(ctx, &sender, 0, Direction::Egress) {
        return (v, TC_ACT_SHOT);
    }
    unpack(route4_call(skb(ctx), cfg, dst, sender.identity))
}

/// Where an IPv4 packet from a pod (after the load-balancer) goes: local
/// delivery, the ip-cache's node, strict mode. A subprogram beside the
/// load-balancer's, not under it (see Subprograms).
#[inline(never)]
fn route4_call(skb: NonNull<__sk_buff>, cfg: &DatapathConfig, dst: u32, identity: u32) -> u64 {
    let ctx = &TcContext::new(skb);
    if let Some(ep) = endpoint(dst) {
        return pack(deliver(ctx, &ep, identity));
    }
    let Some(dest) = ipcache(dst) else {
        return pack(unroutable(cfg, || in_strict_range(dst)));
    };
    flow::note_identities(0, dest.identity);
    pack(match remote(ctx, cfg, &dest, identity, ETH_P_IP) {
        Some(v) => v,
        None => unroutable(cfg, || in_strict_range(dst)),
    })
}

/// IPv6 from a pod: as IPv4 (own source, service frontends balanced through
/// `CM_LB6_*`, local delivery, ip-cache, strict mode), after neighbour
/// discovery ([`neighbour_discovery`]).
#[inline(always)]
fn ipv6(ctx: &TcContext, cfg: &DatapathConfig) -> (Verdict, i32) {
    let (Ok(src), Ok(dst), Ok(next)) = (
        ctx.load::<Ip6>(IP6_SRC),
        ctx.load::<Ip6>(IP6_DST),
        ctx.load::<u8>(IP6_NEXT),
    ) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    // `::` (DAD) and fe80::/10: the pod's kernel uses them for neighbour
    // discovery and MLD on its own link, whatever the CNI configured.
    let link_scope = src == [0; 16] || (src[0] == 0xfe && src[1] & 0xc0 == 0x80);
    if let Some(v) = neighbour_discovery(ctx, &src, next, link_scope) {
        return v;
    }
    if link_scope {
        // Nothing else may leave the pod from an address it was not given.
        return (Verdict::DropSpoofed, TC_ACT_SHOT);
    }
    let Some(sender) = own_endpoint6(ctx, &src) else {
        return (Verdict::DropSpoofed, TC_ACT_SHOT);
    };
    flow::note_identities(sender.identity, 0);
    let dst = match lb_forward::<V6>(ctx, src, dst) {
        Ok(Balanced::No) => dst,
        Ok(Balanced::To(backend)) => backend,
        Err(v) => return (v, TC_ACT_SHOT),
    };
    if let Err(v) = policy(ctx, &sender, 0, Direction::Egress) {
        return (v, TC_ACT_SHOT);
    }
    unpack(route6_call(skb(ctx), cfg, &dst, sender.identity))
}

/// [`route4_call`] for IPv6.
#[inline(never)]
fn route6_call(skb: NonNull<__sk_buff>, cfg: &DatapathConfig, dst: &Ip6, identity: u32) -> u64 {
    let ctx = &TcContext::new(skb);
    if let Some(ep) = endpoint6(dst) {
        return pack(deliver(ctx, &ep, identity));
    }
    let Some(dest) = ipcache6(dst) else {
        return pack(unroutable(cfg, || in_strict_range6(dst)));
    };
    flow::note_identities(0, dest.identity);
    pack(match remote(ctx, cfg, &dest, identity, ETH_P_IPV6) {
        Some(v) => v,
        None => unroutable(cfg, || in_strict_range6(dst)),
    })
}

/// A destination the ip-cache found (either family of inner packet,
/// `inner` its ethertype): tombstone, encryption, then the mode's way to
/// the node. None: the entry names no node to reach (the caller's strict
/// check decides).
#[inline(always)]
fn remote(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    dest: &IpCacheValue,
    identity: u32,
    inner: u16,
) -> Option<(Verdict, i32)> {
    if dest.flags & IPCACHE_FLAG_UNREACHABLE != 0 {
        return Some((Verdict::DropNoTunnelEndpoint, TC_ACT_SHOT));
    }
    if dest.flags & IPCACHE_FLAG_ENCRYPT != 0 {
        if cfg.wg_ifindex != 0 {
            // The TUN device is layer 3 (IPv4 and IPv6): the kernel strips
            // the Ethernet header on the way.
            // SAFETY: plain helper call.
            let r = unsafe { bpf_redirect(cfg.wg_ifindex, 0) };
            return Some((Verdict::Encrypted, r as i32));
        }
        if cfg.flags & CONFIG_FLAG_STRICT != 0 {
            return Some((Verdict::DropStrictPlaintext, TC_ACT_SHOT));
        }
    }
    if !dest.has_tunnel_endpoint() {
        return None;
    }
    // The sender's identity (24 bits: cluster id + local id) rides in the
    // VNI of either tunnel.
    let identity = identity & 0x00ff_ffff;
    Some(if cfg.mode == TunnelMode::Vxlan as u32 {
        vxlan(ctx, cfg, dest, identity)
    } else if cfg.mode == TunnelMode::Geneve as u32 {
        // The node's underlay family: IPv4 when the entry has an IPv4
        // tunnel endpoint, else IPv6.
        if dest.tunnel_endpoint != 0 {
            unpack(geneve4_call(
                skb(ctx),
                cfg,
                dest.tunnel_endpoint,
                identity,
                inner,
            ))
        } else {
            unpack(geneve6_call(
                skb(ctx),
                cfg,
                &dest.tunnel_endpoint6,
                identity,
                inner,
            ))
        }
    } else if cfg.mode == TunnelMode::Direct as u32 {
        to_underlay(cfg, Verdict::Routed)
    } else {
        (Verdict::Pass, TC_ACT_OK)
    })
}

// ---- IPv6 neighbour discovery ------------------------------------------
//
// The CNI gives an IPv6 pod a default route via fe80::1 with a permanent
// neighbour entry for the host veth's MAC, but nothing stops the pod from
// resolving it again (the entry deleted, or a pod set up otherwise): that
// Neighbour Solicitation is answered here, as the gateway, since no one on
// the host owns fe80::1. The pod's kernel also sends DAD, MLD and Router
// Solicitations from `::` or its own link-local address: those go to the
// host stack (where they are harmless), anything else from such a source
// is spoofed.

const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
/// The pod's IPv6 gateway.
const GATEWAY6: Ip6 = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Some: the packet is neighbour discovery or MLD that is handled here
/// (answered, or passed to the host stack); None: route it as any packet.
#[inline(always)]
fn neighbour_discovery(
    ctx: &TcContext,
    src: &Ip6,
    next: u8,
    link_scope: bool,
) -> Option<(Verdict, i32)> {
    // ICMPv6 right after the fixed header, or after one Hop-by-Hop header
    // (MLD reports carry a router alert option in it).
    let icmp = if next == IPPROTO_ICMPV6 {
        ETH_HLEN + IP6_HLEN
    } else if next == IPPROTO_HOPOPTS {
        let hbh = ctx.load::<[u8; 2]>(ETH_HLEN + IP6_HLEN).ok()?;
        if hbh[0] != IPPROTO_ICMPV6 {
            return None;
        }
        ETH_HLEN + IP6_HLEN + (usize::from(hbh[1]) + 1) * 8
    } else {
        return None;
    };
    let typ = ctx.load::<u8>(icmp).ok()?;
    // An NS from `::` is DAD: the pod asking whether anyone owns the
    // address, not resolving it.
    if typ == ICMPV6_NS && next == IPPROTO_ICMPV6 && *src != [0; 16] {
        let target = ctx.load::<Ip6>(icmp + 8).ok()?;
        if target == GATEWAY6 {
            return Some(unpack(answer_gateway_ns_call(skb(ctx), src, link_scope)));
        }
    }
    // Router/neighbour solicitations and advertisements, redirects
    // (133-137), MLD queries, reports and done (130-132, 143).
    if link_scope && ((130..=137).contains(&typ) || typ == 143) {
        return Some((Verdict::Pass, TC_ACT_OK));
    }
    None
}

/// Ethernet + IPv6 + ICMPv6 Neighbour Advertisement with a target
/// link-layer address option.
const NA_LEN: usize = ETH_HLEN + IP6_HLEN + 32;

/// Answers a pod's Neighbour Solicitation for [`GATEWAY6`] with a
/// Neighbour Advertisement carrying the host veth's MAC, rewritten in place
/// and sent back into the pod (egress of the same veth).
///
/// The host MAC comes from the pod's endpoint entry when the NS is from
/// the pod's own address (what Linux uses: the source of the packet that
/// needs the neighbour), or from the frame's destination when a link-local
/// NS is unicast (a reachability probe to the MAC the pod already has). A
/// multicast NS from a link-local source names no MAC to give: it goes to
/// the host stack unanswered.
#[inline(always)]
fn answer_gateway_ns(ctx: &TcContext, src: &Ip6, link_scope: bool) -> (Verdict, i32) {
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
        return (Verdict::DropMalformed, TC_ACT_SHOT);
    };
    let host_mac = if !link_scope {
        match own_endpoint6(ctx, src) {
            Some(ep) => ep.host_mac,
            None => return (Verdict::DropSpoofed, TC_ACT_SHOT),
        }
    } else if macs[0] & 1 == 0 {
        [macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]]
    } else {
        return (Verdict::Pass, TC_ACT_OK);
    };
    let mut p = [0u8; NA_LEN];
    p[0..6].copy_from_slice(&macs[6..12]);
    p[6..12].copy_from_slice(&host_mac);
    p[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    p[14] = 0x60;
    p[19] = 32; // payload length
    p[20] = IPPROTO_ICMPV6;
    p[21] = 255; // hop limit 255: the receiver checks it came from the link
    p[22..38].copy_from_slice(&GATEWAY6);
    p[38..54].copy_from_slice(src);
    p[54] = ICMPV6_NA;
    p[58] = 0xe0; // router, solicited, override
    p[62..78].copy_from_slice(&GATEWAY6);
    p[78] = 2; // option: target link-layer address, 8 bytes
    p[79] = 1;
    p[80..86].copy_from_slice(&host_mac);
    // ICMPv6 checksum over the pseudo-header (source, destination, length
    // 32, next header 58) and the message: the addresses and the message
    // are contiguous at 22..86.
    let mut sum: u32 = 32 + u32::from(IPPROTO_ICMPV6);
    let mut i = 22;
    while i < NA_LEN {
        sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    p[56..58].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    // SAFETY: ctx is a live skb; the helper validates the length.
    if unsafe { bpf_skb_change_tail(ctx.as_ptr().cast(), NA_LEN as u32, 0) } != 0
        || ctx.store(0, &p, 0).is_err()
    {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    // Egress of the pod's own veth: straight back into the pod.
    // SAFETY: plain helper call.
    let r = unsafe { bpf_redirect(ingress_ifindex(ctx), 0) };
    (Verdict::NeighbourReply, r as i32)
}

// ---- Subprograms -------------------------------------------------------
//
// The kernel limits the stack of a call chain to 512 bytes (the frames of
// the program and of every function on the chain), and the compiler's
// frames are generous. So the work is split into BPF-to-BPF calls that are
// siblings rather than nested: the program's own frame stays small, the
// service load-balancer (`shared::lb_forward`, one subprogram per family)
// and the routing after it (`route4_call`, `route6_call`, which reach the
// tunnels and delivery) are called one after the other, and the functions
// with large buffers (the Neighbour Advertisement, the Geneve headers) are
// calls of their own. A verdict and action travel as one u64 (a BPF
// function returns one register).

#[inline(always)]
fn skb(ctx: &TcContext) -> NonNull<__sk_buff> {
    // SAFETY: the context of a running program is never null.
    unsafe { NonNull::new_unchecked(ctx.as_ptr().cast()) }
}

#[inline(always)]
fn pack((v, action): (Verdict, i32)) -> u64 {
    (u64::from(v as u8) << 32) | u64::from(action as u32)
}

#[inline(always)]
fn unpack(x: u64) -> (Verdict, i32) {
    // SAFETY: the high byte came from a `Verdict` (`pack`), a `repr(u8)`
    // enum.
    let v = unsafe { core::mem::transmute::<u8, Verdict>((x >> 32) as u8) };
    (v, x as u32 as i32)
}

#[inline(never)]
fn answer_gateway_ns_call(skb: NonNull<__sk_buff>, src: &Ip6, link_scope: bool) -> u64 {
    pack(answer_gateway_ns(&TcContext::new(skb), src, link_scope))
}

#[inline(never)]
fn geneve4_call(
    skb: NonNull<__sk_buff>,
    cfg: &DatapathConfig,
    remote: u32,
    identity: u32,
    inner: u16,
) -> u64 {
    pack(geneve4(&TcContext::new(skb), cfg, remote, identity, inner))
}

#[inline(never)]
fn geneve6_call(
    skb: NonNull<__sk_buff>,
    cfg: &DatapathConfig,
    remote: &Ip6,
    identity: u32,
    inner: u16,
) -> u64 {
    pack(geneve6(&TcContext::new(skb), cfg, remote, identity, inner))
}

// ---- Tunnels -----------------------------------------------------------

#[inline(always)]
fn vxlan(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    dest: &IpCacheValue,
    identity: u32,
) -> (Verdict, i32) {
    // SAFETY: zeroed is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = identity;
    key.tunnel_ttl = 64;
    let flags = if dest.tunnel_endpoint != 0 {
        key.__bindgen_anon_1.remote_ipv4 = u32::from_be(dest.tunnel_endpoint);
        // No outer UDP checksum (as Geneve: the inner packet carries its
        // own; saves a checksum per GSO segment) and DF, like Geneve's
        // outer header: the pod MTU leaves room, the underlay must not
        // fragment.
        BPF_F_ZERO_CSUM_TX | BPF_F_DONT_FRAGMENT
    } else {
        // An IPv6 underlay. The kernel copies remote_ipv6 as it is
        // (memcpy into the in6_addr, unlike remote_ipv4 which it converts
        // from host order): the address's bytes in network order.
        // SAFETY: both are 16 plain bytes.
        key.__bindgen_anon_1.remote_ipv6 =
            unsafe { core::mem::transmute::<Ip6, [u32; 4]>(dest.tunnel_endpoint6) };
        // With an outer UDP checksum: a kernel VXLAN device (the receiver
        // without an underlay address, `from_overlay`) drops zero-checksum
        // UDP over IPv6 unless configured with udp6zerocsumrx.
        BPF_F_TUNINFO_IPV6
    };
    // SAFETY: ctx is a live skb, key a valid stack struct of the given size.
    let r = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.as_ptr().cast(),
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            u64::from(flags),
        )
    };
    if r != 0 {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    // SAFETY: plain helper call.
    let r = unsafe { bpf_redirect(cfg.overlay_ifindex, 0) };
    (Verdict::Tunnel, r as i32)
}

/// Bytes inserted after the MAC header over IPv4: outer IPv4, UDP, Geneve,
/// inner Ethernet.
const GENEVE_ROOM: usize = ENCAP_OVERHEAD as usize;
/// The same over IPv6 (outer IPv6 header of 40 bytes).
const GENEVE_ROOM6: usize = ENCAP_OVERHEAD6 as usize;
/// UDP + Geneve + inner Ethernet, after the outer IP header.
const GENEVE_L4: usize = 8 + 8 + ETH_HLEN;
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

/// Makes `room` bytes after the MAC header for an outer `outer_l3` header
/// (a `BPF_F_ADJ_ROOM_ENCAP_L3_*` flag), UDP, Geneve and the inner
/// Ethernet header. Returns the pod's MACs (the inner Ethernet header),
/// the inner L3 length and the flow hash (ECMP entropy on the underlay).
#[inline(always)]
fn geneve_room(
    ctx: &TcContext,
    room: usize,
    outer_l3: u32,
) -> Result<([u8; 12], u16, u32), Verdict> {
    // The pod's MACs become the inner Ethernet header (the receiver
    // rewrites them anyway); the outer ones are filled by redirect_neigh.
    let macs = ctx
        .load::<[u8; 12]>(0)
        .map_err(|_| Verdict::DropMalformed)?;
    let inner_l3 = (ctx.len() as usize - ETH_HLEN) as u16;
    // SAFETY: ctx is a live skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.as_ptr().cast()) };
    let flags = u64::from(
        outer_l3
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
            // The inner segments keep their size: the pod MTU already
            // leaves room for the headers.
            | BPF_F_ADJ_ROOM_FIXED_GSO,
    ) | ((ETH_HLEN as u64 & 0xff) << 56); // BPF_F_ADJ_ROOM_ENCAP_L2(14)
    // SAFETY: ctx is a live skb; the helper validates the arguments. It
    // also sets skb->protocol to the outer family, which redirect_neigh's
    // FIB lookup follows.
    let r =
        unsafe { bpf_skb_adjust_room(ctx.as_ptr().cast(), room as i32, BPF_ADJ_ROOM_MAC, flags) };
    if r != 0 {
        return Err(Verdict::DropInternal);
    }
    Ok((macs, inner_l3, hash))
}

/// UDP (source port from the flow hash, checksum 0), Geneve (version 0, no
/// options, not OAM, not critical, VNI = identity) and the inner Ethernet
/// header (`inner`: its ethertype).
#[inline(always)]
fn geneve_l4(
    udp_len: u16,
    hash: u32,
    identity: u32,
    macs: &[u8; 12],
    inner: u16,
) -> [u8; GENEVE_L4] {
    let mut h = [0u8; GENEVE_L4];
    let sport = 49152 | (hash as u16 & 0x3fff);
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&GENEVE_PORT.to_be_bytes());
    h[4..6].copy_from_slice(&udp_len.to_be_bytes());
    h[10..12].copy_from_slice(&ETH_P_TEB.to_be_bytes());
    h[12..15].copy_from_slice(&identity.to_be_bytes()[1..4]);
    h[16..28].copy_from_slice(macs);
    h[28..30].copy_from_slice(&inner.to_be_bytes());
    h
}

/// Geneve over an IPv4 underlay.
#[inline(always)]
fn geneve4(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    remote: u32,
    identity: u32,
    inner: u16,
) -> (Verdict, i32) {
    let (macs, inner_l3, hash) = match geneve_room(ctx, GENEVE_ROOM, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) {
        Ok(r) => r,
        Err(v) => return (v, TC_ACT_SHOT),
    };
    let ip_len = inner_l3 + GENEVE_ROOM as u16;
    let mut hdr = [0u8; GENEVE_ROOM];
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
    hdr[..20].copy_from_slice(&ip);
    // UDP checksum 0: allowed over IPv4, and the inner packet has its own.
    hdr[20..].copy_from_slice(&geneve_l4(ip_len - 20, hash, identity, &macs, inner));
    if ctx.store(ETH_HLEN, &hdr, 0).is_err() {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    to_underlay(cfg, Verdict::Tunnel)
}

/// Geneve over an IPv6 underlay: outer IPv6 from `underlay_ip6`.
#[inline(always)]
fn geneve6(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    remote: &Ip6,
    identity: u32,
    inner: u16,
) -> (Verdict, i32) {
    if cfg.underlay_ip6 == [0; 16] {
        // This node has no IPv6 underlay address to send from: the node
        // behind the entry cannot be reached from here.
        return (Verdict::DropNoTunnelEndpoint, TC_ACT_SHOT);
    }
    let (macs, inner_l3, hash) = match geneve_room(ctx, GENEVE_ROOM6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6)
    {
        Ok(r) => r,
        Err(v) => return (v, TC_ACT_SHOT),
    };
    let payload = inner_l3 + GENEVE_L4 as u16;
    let mut hdr = [0u8; GENEVE_ROOM6];
    // Version 6, traffic class 0, flow label from the inner flow's hash
    // (ECMP on the underlay may hash on it).
    hdr[0] = 0x60;
    hdr[1] = ((hash >> 16) & 0x0f) as u8;
    hdr[2] = (hash >> 8) as u8;
    hdr[3] = hash as u8;
    hdr[4..6].copy_from_slice(&payload.to_be_bytes());
    hdr[6] = 17; // UDP, no extension headers (the receiver expects none)
    hdr[7] = 64;
    hdr[8..24].copy_from_slice(&cfg.underlay_ip6);
    hdr[24..40].copy_from_slice(remote);
    // UDP checksum 0 over IPv6: RFC 6935/6936 allow it for tunnel
    // protocols, and the receiver decapsulates in eBPF (`from_underlay`)
    // before any UDP stack could refuse it; the inner packet carries its
    // own checksum.
    hdr[IP6_HLEN..].copy_from_slice(&geneve_l4(payload, hash, identity, &macs, inner));
    if ctx.store(ETH_HLEN, &hdr, 0).is_err() {
        return (Verdict::DropInternal, TC_ACT_SHOT);
    }
    to_underlay(cfg, Verdict::Tunnel)
}

/// Out of the underlay interface, next hop resolved by the kernel's FIB and
/// neighbour tables of the packet's family (routes to remote pod CIDRs in
/// direct mode, the underlay's own routes for Geneve).
#[inline(always)]
fn to_underlay(cfg: &DatapathConfig, verdict: Verdict) -> (Verdict, i32) {
    // SAFETY: no parameters (a FIB lookup on the packet's destination).
    let r = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    (verdict, r as i32)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
