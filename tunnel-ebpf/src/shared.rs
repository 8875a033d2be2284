//! Maps, helpers (delivery, service load-balancing), the panic handler and
//! the license shared by the programs (each binary includes this module
//! once). Every map is pinned by name, so
//! the two objects (one per attach point) share them through the node's pin
//! directory, and a restarted agent adopts them with their contents.

use core::ptr::NonNull;

use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use tunnel_common::{
    Counter, DatapathConfig, Direction, EndpointInfo, IPPROTO_TCP, IPPROTO_UDP, Ip6, IpCacheValue,
    LB_BACKEND_SELECTABLE, Lb6Addr, Lb6BackendKey, Lb6FlowKey, Lb6ServiceKey, Lb6ServiceValue,
    LbAddr, LbAddrOf, LbBackendKey, LbBackendKeyOf, LbBackendValue, LbFlowKey, LbFlowKeyOf,
    LbServiceKey, LbServiceKeyOf, LbServiceValue, LbServiceValueOf, MAX_ENDPOINTS, MAX_IPCACHE,
    MAX_LB_BACKENDS, MAX_LB_FLOWS, MAX_LB_FRONTENDS, MAX_LB_SLOTS, MAX_POLICY, MAX_POLICY_CIDRS,
    MAX_POLICY_CT, MAX_POLICY_STATS, MAX_SOURCE_IDENTITIES, MAX_STRICT_RANGES, METRICS_ENTRIES,
    POLICY_ALLOW, POLICY_AUDIT, POLICY_DENY, POLICY_PREFIX_FULL, PolicyCtKey, PolicyKey,
    PolicyState, PolicyStatsKey, PolicyValue, Verdict, metric_index, policy_default_deny,
};

#[map]
pub static CM_METRICS: PerCpuArray<Counter> = PerCpuArray::pinned(METRICS_ENTRIES, 0);
#[map]
pub static CM_ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);
#[map]
pub static CM_ENDPOINTS6: HashMap<Ip6, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);
#[map]
pub static CM_IPCACHE: LpmTrie<u32, IpCacheValue> = LpmTrie::pinned(MAX_IPCACHE, 0);
#[map]
pub static CM_IPCACHE6: LpmTrie<Ip6, IpCacheValue> = LpmTrie::pinned(MAX_IPCACHE, 0);
#[map]
pub static CM_CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);
#[map]
pub static CM_SRC_IDENTITY: LruHashMap<u32, u32> = LruHashMap::pinned(MAX_SOURCE_IDENTITIES, 0);
#[map]
pub static CM_SRC_IDENTITY6: LruHashMap<Ip6, u32> = LruHashMap::pinned(MAX_SOURCE_IDENTITIES, 0);
#[map]
pub static CM_LB_SERVICES: HashMap<LbServiceKey, LbServiceValue> = HashMap::pinned(MAX_LB_SLOTS, 0);
#[map]
pub static CM_LB_BACKENDS: HashMap<LbBackendKey, LbBackendValue> =
    HashMap::pinned(MAX_LB_BACKENDS, 0);
#[map]
pub static CM_LB_FLOWS: LruHashMap<LbFlowKey, LbAddr> = LruHashMap::pinned(MAX_LB_FLOWS, 0);
#[map]
pub static CM_LB_REVERSE: LruHashMap<LbFlowKey, LbAddr> = LruHashMap::pinned(MAX_LB_FLOWS, 0);
#[map]
pub static CM_LB_FRONTENDS: HashMap<u32, u32> = HashMap::pinned(MAX_LB_FRONTENDS, 0);
#[map]
pub static CM_LB6_SERVICES: HashMap<Lb6ServiceKey, Lb6ServiceValue> =
    HashMap::pinned(MAX_LB_SLOTS, 0);
#[map]
pub static CM_LB6_BACKENDS: HashMap<Lb6BackendKey, LbBackendValue> =
    HashMap::pinned(MAX_LB_BACKENDS, 0);
#[map]
pub static CM_LB6_FLOWS: LruHashMap<Lb6FlowKey, Lb6Addr> = LruHashMap::pinned(MAX_LB_FLOWS, 0);
#[map]
pub static CM_LB6_REVERSE: LruHashMap<Lb6FlowKey, Lb6Addr> = LruHashMap::pinned(MAX_LB_FLOWS, 0);
#[map]
pub static CM_LB6_FRONTENDS: HashMap<Ip6, u32> = HashMap::pinned(MAX_LB_FRONTENDS, 0);
#[map]
pub static CM_STRICT_RANGES: LpmTrie<u32, u32> = LpmTrie::pinned(MAX_STRICT_RANGES, 0);
#[map]
pub static CM_STRICT_RANGES6: LpmTrie<Ip6, u32> = LpmTrie::pinned(MAX_STRICT_RANGES, 0);
#[map]
pub static CM_POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(MAX_POLICY, 0);
#[map]
pub static CM_POLICY_CIDR: LpmTrie<u32, u32> = LpmTrie::pinned(MAX_POLICY_CIDRS, 0);
#[map]
pub static CM_POLICY_CIDR6: LpmTrie<Ip6, u32> = LpmTrie::pinned(MAX_POLICY_CIDRS, 0);
#[map]
pub static CM_POLICY_STATE: HashMap<u32, PolicyState> = HashMap::pinned(MAX_ENDPOINTS, 0);
#[map]
pub static CM_POLICY_CT: LruHashMap<PolicyCtKey, u32> = LruHashMap::pinned(MAX_POLICY_CT, 0);
#[map]
pub static CM_POLICY_STATS: PerCpuHashMap<PolicyStatsKey, Counter> =
    PerCpuHashMap::pinned(MAX_POLICY_STATS, 0);

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// Offsets in an Ethernet + IPv4 frame.
pub const IP_SRC: usize = ETH_HLEN + 12;
pub const IP_DST: usize = ETH_HLEN + 16;
/// The fixed IPv6 header (extension headers follow it).
pub const IP6_HLEN: usize = 40;
/// Offsets in an Ethernet + IPv6 frame.
pub const IP6_NEXT: usize = ETH_HLEN + 6;
pub const IP6_SRC: usize = ETH_HLEN + 8;
pub const IP6_DST: usize = ETH_HLEN + 24;

/// The ifindex the packet came in on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: ctx wraps the live `__sk_buff` of this invocation.
    unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex }
}

#[inline(always)]
pub fn count(dir: Direction, verdict: Verdict, len: u32) {
    if let Some(c) = CM_METRICS.get_ptr_mut(metric_index(dir, verdict)) {
        // SAFETY: this CPU's slot of a per-CPU array: no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

#[inline(always)]
pub fn config() -> DatapathConfig {
    match CM_CONFIG.get(0) {
        Some(c) => *c,
        None => DatapathConfig::default(),
    }
}

#[inline(always)]
pub fn endpoint(ip: u32) -> Option<EndpointInfo> {
    // SAFETY: the value is copied out at once; the map is only written by
    // user space with whole-value updates.
    unsafe { CM_ENDPOINTS.get(&ip).copied() }
}

#[inline(always)]
pub fn ipcache(ip: u32) -> Option<IpCacheValue> {
    CM_IPCACHE
        .get(&aya_ebpf::maps::lpm_trie::Key::new(32, ip))
        .copied()
}

#[inline(always)]
pub fn endpoint6(ip: &Ip6) -> Option<EndpointInfo> {
    // SAFETY: as `endpoint`.
    unsafe { CM_ENDPOINTS6.get(ip).copied() }
}

/// The ip-cache entry of one IPv6 address (longest prefix match).
#[inline(always)]
pub fn ipcache6(ip: &Ip6) -> Option<IpCacheValue> {
    CM_IPCACHE6
        .get(&aya_ebpf::maps::lpm_trie::Key::new(128, *ip))
        .copied()
}

/// Whether `ip` lies in one of the mesh's IPv6 pod ranges
/// (`CM_STRICT_RANGES6`).
#[inline(always)]
pub fn in_strict_range6(ip: &Ip6) -> bool {
    CM_STRICT_RANGES6
        .get(&aya_ebpf::maps::lpm_trie::Key::new(128, *ip))
        .is_some()
}

/// Whether `ip` lies in one of the mesh's pod ranges (`CM_STRICT_RANGES`).
#[inline(always)]
pub fn in_strict_range(ip: u32) -> bool {
    CM_STRICT_RANGES
        .get(&aya_ebpf::maps::lpm_trie::Key::new(32, ip))
        .is_some()
}

/// IPv4 source and destination (network order) of an Ethernet frame, or
/// None for anything else.
#[inline(always)]
pub fn ipv4_addrs(ctx: &TcContext) -> Option<(u32, u32)> {
    let proto: u16 = ctx.load(12).ok()?;
    if u16::from_be(proto) != ETH_P_IP {
        return None;
    }
    let src: u32 = ctx.load(IP_SRC).ok()?;
    let dst: u32 = ctx.load(IP_DST).ok()?;
    Some((src, dst))
}

/// IPv6 source and destination of an Ethernet frame, or None for
/// anything else.
#[inline(always)]
pub fn ipv6_addrs(ctx: &TcContext) -> Option<(Ip6, Ip6)> {
    let proto: u16 = ctx.load(12).ok()?;
    if u16::from_be(proto) != ETH_P_IPV6 {
        return None;
    }
    let src: Ip6 = ctx.load(IP6_SRC).ok()?;
    let dst: Ip6 = ctx.load(IP6_DST).ok()?;
    Some((src, dst))
}

/// The identity of a remote source address as the ip-cache knows it
/// (direct routing, WireGuard: no header carries it), `IDENTITY_WORLD`
/// when unknown.
#[inline(always)]
pub fn identity_of(v: Option<IpCacheValue>) -> u32 {
    match v {
        Some(v) if v.identity != 0 => v.identity,
        _ => tunnel_common::IDENTITY_WORLD,
    }
}

/// [`record_identity`] for an IPv6 source (`CM_SRC_IDENTITY6`).
#[inline(always)]
pub fn record_identity6(src: &Ip6, identity: u32) {
    // SAFETY: the value is copied out at once.
    if unsafe { CM_SRC_IDENTITY6.get(src) }.copied() != Some(identity) {
        let _ = CM_SRC_IDENTITY6.insert(src, &identity, 0);
    }
}

/// Remembers the identity `src` last arrived with. Written only when it
/// changed: a per-packet hash update costs more than the lookup.
#[inline(always)]
pub fn record_identity(src: u32, identity: u32) {
    // SAFETY: the value is copied out at once.
    if unsafe { CM_SRC_IDENTITY.get(&src) }.copied() != Some(identity) {
        let _ = CM_SRC_IDENTITY.insert(&src, &identity, 0);
    }
}

/// Delivers a frame that arrived from a remote node outside WireGuard
/// (`peer`: the sender's identity): dropped under strict ingress, else
/// [`deliver`].
#[inline(always)]
pub fn deliver_unencrypted(ctx: &TcContext, ep: &EndpointInfo, peer: u32) -> (Verdict, i32) {
    if config().flags & tunnel_common::CONFIG_FLAG_STRICT_INGRESS != 0 {
        return (
            Verdict::DropStrictPlaintext,
            aya_ebpf::bindings::TC_ACT_SHOT,
        );
    }
    deliver(ctx, ep, peer)
}

/// Delivers the frame to a local endpoint from a sender of identity
/// `peer`: the endpoint's ingress policy first ([`policy`], on the
/// packet as it arrived: a service reply still has its backend as
/// source), then a service reply gets its frontend back as source
/// ([`lb_reverse`], either family), MACs rewritten, then `redirect_peer`
/// straight into its namespace (no host stack, no backlog).
#[inline(always)]
pub fn deliver(ctx: &TcContext, ep: &EndpointInfo, peer: u32) -> (Verdict, i32) {
    crate::flow::note_identities(peer, ep.identity);
    if let Err(v) = policy(ctx, ep, peer, Direction::Ingress) {
        return (v, aya_ebpf::bindings::TC_ACT_SHOT);
    }
    if lb_reverse(ctx).is_err() || set_macs(ctx, ep).is_err() {
        return (Verdict::DropInternal, aya_ebpf::bindings::TC_ACT_SHOT);
    }
    // SAFETY: plain helper call; the kernel checks the ifindex.
    let r = unsafe { aya_ebpf::helpers::generated::bpf_redirect_peer(ep.ifindex, 0) };
    (Verdict::Local, r as i32)
}

/// Rewrites the MACs for delivery to a local endpoint.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, ep: &EndpointInfo) -> Result<(), i64> {
    ctx.store(0, &ep.mac, 0)?;
    ctx.store(6, &ep.host_mac, 0)?;
    Ok(())
}

// ---- Service load-balancing -------------------------------------------
//
// A client pod's packet to a frontend (service address, port, protocol) is
// translated in `from_endpoint` to a backend: the flow's backend comes from
// the family's flows map (always for an established TCP connection; for UDP
// while that backend is still allowed for the frontend, the backends map;
// for a new TCP connection while it is selectable), otherwise a selectable
// slot is drawn at random and the flow (and its reverse, for the replies)
// remembered. Replies are translated back on delivery to the client
// (`deliver`). Which backends are selectable (affinity, failover) is decided
// in user space.
//
// Both families run the same code: `lb_forward` and `lb_reverse` are generic
// over [`Family`] (IPv4: [`V4`], the `CM_LB_*` maps; IPv6: [`V6`], the
// `CM_LB6_*` maps), monomorphised once per family. The trait holds only what
// differs: the address type, its maps, where the header keeps the addresses
// and the L4 protocol (IPv4: IHL and fragment bits; IPv6: the next header
// right after the fixed header, no extension headers walked), and how an
// address rewrite fixes checksums (IPv4: the header checksum and the L4
// pseudo-header; IPv6: no header checksum, the 16-byte address in the
// pseudo-header word by word).

/// Offset of the IP checksum in an Ethernet + IPv4 frame.
const IP_CSUM: usize = ETH_HLEN + 10;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// IPv6 next header of a Fragment header.
const IPPROTO_FRAGMENT: u8 = 44;

/// What the load-balancer needs to know about an address family.
pub trait Family {
    /// The address as the maps key it (network order).
    type Addr: Copy + PartialEq + 'static;
    /// Offsets of the source and destination addresses in an Ethernet frame.
    const SRC: usize;
    const DST: usize;
    fn frontends() -> &'static HashMap<Self::Addr, u32>;
    /// The address as 16 bytes (IPv4 mapped), for flow events.
    fn mapped(a: &Self::Addr) -> Ip6;
    fn services() -> &'static HashMap<LbServiceKeyOf<Self::Addr>, LbServiceValueOf<Self::Addr>>;
    fn backends() -> &'static HashMap<LbBackendKeyOf<Self::Addr>, LbBackendValue>;
    fn flows() -> &'static LruHashMap<LbFlowKeyOf<Self::Addr>, LbAddrOf<Self::Addr>>;
    fn reverse() -> &'static LruHashMap<LbFlowKeyOf<Self::Addr>, LbAddrOf<Self::Addr>>;
    /// Protocol and L4 header offset of a packet to a frontend address;
    /// `Err`: the verdict to drop it with (fragment, other protocol).
    fn frontend_l4(ctx: &TcContext) -> Result<(u8, usize), Verdict>;
    /// Replaces the address at `off` (`old` -> `new`), fixing the header
    /// checksum (if the family has one) and the L4 checksum at `csum_off`
    /// (`mangled`: the UDP zero-checksum flag).
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: &Self::Addr,
        new: &Self::Addr,
        csum_off: usize,
        mangled: u64,
    ) -> Result<(), i64>;
}

/// IPv4: `CM_LB_*`.
pub struct V4;
/// IPv6: `CM_LB6_*`.
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    const SRC: usize = IP_SRC;
    const DST: usize = IP_DST;
    #[inline(always)]
    fn mapped(a: &u32) -> Ip6 {
        crate::flow::mapped(*a)
    }
    fn frontends() -> &'static HashMap<u32, u32> {
        &CM_LB_FRONTENDS
    }
    #[inline(always)]
    fn services() -> &'static HashMap<LbServiceKey, LbServiceValue> {
        &CM_LB_SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<LbBackendKey, LbBackendValue> {
        &CM_LB_BACKENDS
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<LbFlowKey, LbAddr> {
        &CM_LB_FLOWS
    }
    #[inline(always)]
    fn reverse() -> &'static LruHashMap<LbFlowKey, LbAddr> {
        &CM_LB_REVERSE
    }
    #[inline(always)]
    fn frontend_l4(ctx: &TcContext) -> Result<(u8, usize), Verdict> {
        let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| Verdict::DropMalformed)?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl < 20 {
            return Err(Verdict::DropMalformed);
        }
        let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(|_| Verdict::DropMalformed)?;
        // More-fragments flag or a fragment offset.
        if u16::from_be(frag) & 0x3fff != 0 {
            return Err(Verdict::DropFragment);
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| Verdict::DropMalformed)?;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Err(Verdict::DropServiceProtocol);
        }
        Ok((proto, ETH_HLEN + ihl))
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: &u32,
        new: &u32,
        csum_off: usize,
        mangled: u64,
    ) -> Result<(), i64> {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(*old),
            u64::from(*new),
            BPF_F_PSEUDO_HDR | mangled | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(*old), u64::from(*new), 4)?;
        ctx.store(off, new, 0)
    }
}

impl Family for V6 {
    type Addr = Ip6;
    const SRC: usize = IP6_SRC;
    const DST: usize = IP6_DST;
    #[inline(always)]
    fn mapped(a: &Ip6) -> Ip6 {
        *a
    }
    fn frontends() -> &'static HashMap<Ip6, u32> {
        &CM_LB6_FRONTENDS
    }
    #[inline(always)]
    fn services() -> &'static HashMap<Lb6ServiceKey, Lb6ServiceValue> {
        &CM_LB6_SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<Lb6BackendKey, LbBackendValue> {
        &CM_LB6_BACKENDS
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<Lb6FlowKey, Lb6Addr> {
        &CM_LB6_FLOWS
    }
    #[inline(always)]
    fn reverse() -> &'static LruHashMap<Lb6FlowKey, Lb6Addr> {
        &CM_LB6_REVERSE
    }
    /// TCP or UDP right after the fixed header. A Fragment header is a
    /// fragment; any other next header (ICMPv6, or an extension header:
    /// the load-balancer does not walk them) is not balanced.
    #[inline(always)]
    fn frontend_l4(ctx: &TcContext) -> Result<(u8, usize), Verdict> {
        let next: u8 = ctx.load(IP6_NEXT).map_err(|_| Verdict::DropMalformed)?;
        if next == IPPROTO_FRAGMENT {
            return Err(Verdict::DropFragment);
        }
        if next != IPPROTO_TCP && next != IPPROTO_UDP {
            return Err(Verdict::DropServiceProtocol);
        }
        Ok((next, ETH_HLEN + IP6_HLEN))
    }
    /// No header checksum; the address is four 32-bit words of the L4
    /// pseudo-header, each replaced with `BPF_F_PSEUDO_HDR`.
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        off: usize,
        old: &Ip6,
        new: &Ip6,
        csum_off: usize,
        mangled: u64,
    ) -> Result<(), i64> {
        // SAFETY: 16 plain bytes either way.
        let (o, n) = unsafe {
            (
                core::mem::transmute::<Ip6, [u32; 4]>(*old),
                core::mem::transmute::<Ip6, [u32; 4]>(*new),
            )
        };
        for i in 0..4 {
            if o[i] != n[i] {
                ctx.l4_csum_replace(
                    csum_off,
                    u64::from(o[i]),
                    u64::from(n[i]),
                    BPF_F_PSEUDO_HDR | mangled | 4,
                )?;
            }
        }
        ctx.store(off, new, 0)
    }
}

/// Protocol and L4 header offset of a TCP or UDP packet that is not a
/// fragment (fragments carry no ports; they are not balanced), for the
/// reverse translation: [`Family::frontend_l4`] without verdicts.
#[inline(always)]
fn l4<F: Family>(ctx: &TcContext) -> Option<(u8, usize)> {
    F::frontend_l4(ctx).ok()
}

/// Offset of the L4 checksum and the flags `l4_csum_replace` needs for it
/// (a UDP checksum of 0 means "none" and must stay 0).
#[inline(always)]
fn l4_csum(proto: u8, l4off: usize) -> (usize, u64) {
    if proto == IPPROTO_TCP {
        (l4off + 16, 0)
    } else {
        (l4off + 6, BPF_F_MARK_MANGLED_0)
    }
}

/// Rewrites the address at `addr_off` and the port at `port_off`, fixing the
/// checksums (the address is in the L4 pseudo-header).
#[inline(always)]
fn rewrite<F: Family>(
    ctx: &TcContext,
    (proto, l4off): (u8, usize),
    addr_off: usize,
    (old_addr, new_addr): (&F::Addr, &F::Addr),
    port_off: usize,
    (old_port, new_port): (u16, u16),
) -> Result<(), i64> {
    // Offsets within the first 256 bytes (Ethernet, IP header, L4 ports).
    let offs = (proto as u32)
        | ((l4off as u32 & 0xff) << 8)
        | ((addr_off as u32 & 0xff) << 16)
        | ((port_off as u32 & 0xff) << 24);
    let ports = (u32::from(old_port) << 16) | u32::from(new_port);
    if old_addr == new_addr {
        // Only the port changes (the address is read back in the call).
        return match rewrite_call::<F>(skb(ctx), offs, old_addr, ports) {
            0 => Ok(()),
            e => Err(e),
        };
    }
    match rewrite_call::<F>(skb(ctx), offs, new_addr, ports) {
        0 => Ok(()),
        e => Err(e),
    }
}

/// [`rewrite`] as a subprogram (stack, see [`lb_forward`]): the offsets
/// and the ports packed into one argument each, the old address read from
/// the packet (a BPF function takes five registers, and the compiler may
/// pass an IPv6 address in two).
#[inline(never)]
fn rewrite_call<F: Family>(
    skb: NonNull<__sk_buff>,
    offs: u32,
    new_addr: &F::Addr,
    ports: u32,
) -> i64 {
    let ctx = &TcContext::new(skb);
    let Ok(old) = ctx.load::<F::Addr>(((offs >> 16) & 0xff) as usize) else {
        return -1;
    };
    let old_addr = &old;
    let (proto, l4off) = (offs as u8, ((offs >> 8) & 0xff) as usize);
    let (addr_off, port_off) = (((offs >> 16) & 0xff) as usize, (offs >> 24) as usize);
    let (old_port, new_port) = ((ports >> 16) as u16, ports as u16);
    match rewrite_inline::<F>(
        ctx,
        (proto, l4off),
        addr_off,
        (old_addr, new_addr),
        port_off,
        (old_port, new_port),
    ) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

#[inline(always)]
fn rewrite_inline<F: Family>(
    ctx: &TcContext,
    (proto, l4off): (u8, usize),
    addr_off: usize,
    (old_addr, new_addr): (&F::Addr, &F::Addr),
    port_off: usize,
    (old_port, new_port): (u16, u16),
) -> Result<(), i64> {
    let (csum_off, mangled) = l4_csum(proto, l4off);
    if old_addr != new_addr {
        F::rewrite_addr(ctx, addr_off, old_addr, new_addr, csum_off, mangled)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            mangled | 2,
        )?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// What the load-balancer did with a packet leaving a pod.
pub enum Balanced<A> {
    /// Not addressed to a frontend.
    No,
    /// Translated: the new destination address.
    To(A),
}

/// The backend a flow keeps, if any (the rules in the section comment):
/// an established TCP connection keeps it regardless; otherwise while the
/// backends map allows it (a new TCP connection: only while selectable).
/// Written to `out`; false: none. A subprogram (stack, see [`lb_forward`]).
#[inline(never)]
fn kept_backend<F: Family>(
    flow: &LbFlowKeyOf<F::Addr>,
    established: bool,
    out: &mut LbAddrOf<F::Addr>,
) -> bool {
    // SAFETY: values are read at once; user space writes whole values.
    let Some(b) = (unsafe { F::flows().get(flow) }) else {
        return false;
    };
    out.addr = b.addr;
    out.port = b.port;
    if established {
        return true;
    }
    let bkey = LbBackendKeyOf {
        frontend: flow.daddr,
        frontend_port: flow.dport,
        proto: flow.proto,
        _pad: 0,
        backend: out.addr,
        backend_port: out.port,
        _pad2: 0,
    };
    // SAFETY: as above.
    match unsafe { F::backends().get(&bkey) } {
        // A new TCP connection (this flow's port reused, or its SYN
        // retransmitted) only to a backend that takes new ones.
        Some(v) => flow.proto != IPPROTO_TCP || v.state == LB_BACKEND_SELECTABLE,
        None => false,
    }
}

/// Draws a selectable backend of the flow's frontend (`count` backends)
/// for a new flow, writes it to `out` and remembers the flow and its
/// reverse. Returns 0, or the number of the drop verdict. A subprogram
/// (stack, see [`lb_forward`]).
#[inline(never)]
fn new_backend<F: Family>(
    count: u16,
    flow: &LbFlowKeyOf<F::Addr>,
    out: &mut LbAddrOf<F::Addr>,
) -> u32 {
    let count = u32::from(count);
    if count == 0 {
        return Verdict::DropNoServiceBackend as u32;
    }
    // SAFETY: plain helper call.
    let r = unsafe { aya_ebpf::helpers::generated::bpf_get_prandom_u32() };
    let mut skey = LbServiceKeyOf {
        addr: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
        slot: (1 + r % count) as u16,
        _pad2: 0,
    };
    // SAFETY: read at once. A slot missing here is a frontend being shrunk
    // by user space at this moment.
    let Some(mut v) = (unsafe { F::services().get(&skey) }) else {
        return Verdict::DropNoServiceBackend as u32;
    };
    // Never the client itself while there is another backend: its reply
    // would not leave its namespace to be translated back (hairpin needs
    // source translation, not done).
    if v.addr == flow.saddr && count > 1 {
        skey.slot = (u32::from(skey.slot) % count + 1) as u16;
        // SAFETY: as above.
        match unsafe { F::services().get(&skey) } {
            Some(w) => v = w,
            None => return Verdict::DropNoServiceBackend as u32,
        }
    }
    out.addr = v.addr;
    out.port = v.port;
    let reply = LbFlowKeyOf {
        saddr: out.addr,
        daddr: flow.saddr,
        sport: out.port,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let frontend = LbAddrOf {
        addr: flow.daddr,
        port: flow.dport,
        _pad: 0,
    };
    // The reverse first: a reply can never beat it.
    if F::reverse().insert(&reply, &frontend, 0).is_err()
        || F::flows().insert(flow, out, 0).is_err()
    {
        return Verdict::DropInternal as u32;
    }
    0
}

/// The body of [`lb_forward`]: `addrs` holds (source, destination) and
/// gets the backend as destination. Returns 0: not a frontend; 1:
/// translated; otherwise the drop verdict's number. A subprogram, one per
/// family.
#[inline(never)]
fn lb_forward_call<F: Family>(skb: NonNull<__sk_buff>, addrs: &mut [F::Addr; 2]) -> u32 {
    let ctx = TcContext::new(skb);
    // SAFETY: only the presence is read.
    if unsafe { F::frontends().get(&addrs[1]) }.is_none() {
        return 0;
    }
    // A frontend address is served by the load-balancer or not at all:
    // nothing addressed to it reaches the host stack.
    let (proto, l4off) = match F::frontend_l4(&ctx) {
        Ok(r) => r,
        Err(v) => return v as u32,
    };
    // Source and destination port, network order.
    let Ok(ports) = ctx.load::<[u16; 2]>(l4off) else {
        return Verdict::DropMalformed as u32;
    };
    let flow = LbFlowKeyOf {
        saddr: addrs[0],
        daddr: addrs[1],
        sport: ports[0],
        dport: ports[1],
        proto,
        _pad: [0; 3],
    };
    let skey = LbServiceKeyOf {
        addr: addrs[1],
        port: ports[1],
        proto,
        _pad: 0,
        slot: 0,
        _pad2: 0,
    };
    // SAFETY: read at once.
    let Some(count) = (unsafe { F::services().get(&skey) }).map(|v| v.count) else {
        // A port (or protocol) of the address that is no frontend.
        return Verdict::DropServiceProtocol as u32;
    };
    // A flow keeps its backend while that backend is allowed for the
    // frontend (selectable or draining). An established TCP connection
    // keeps it regardless: moving it could only be answered by a reset,
    // while the old backend may well finish it (a removed backend often
    // still runs). A new TCP connection (SYN without ACK) whose 4-tuple was
    // seen before keeps it only while it is selectable: draining means no
    // new connections.
    let established = proto == IPPROTO_TCP
        && ctx
            .load::<u8>(l4off + 13)
            .is_ok_and(|f| f & (TCP_SYN | TCP_ACK) != TCP_SYN);
    let mut backend = LbAddrOf {
        addr: addrs[1],
        port: 0,
        _pad: 0,
    };
    if !kept_backend::<F>(&flow, established, &mut backend) {
        let v = new_backend::<F>(count, &flow, &mut backend);
        if v != 0 {
            return v;
        }
    }
    if rewrite::<F>(
        &ctx,
        (proto, l4off),
        F::DST,
        (&addrs[1], &backend.addr),
        l4off + 2,
        (ports[1], backend.port),
    )
    .is_err()
    {
        return Verdict::DropInternal as u32;
    }
    crate::flow::note_service(&F::mapped(&addrs[1]), ports[1]);
    addrs[1] = backend.addr;
    1
}

/// Restores the frontend as the source of a reply from a backend (a frame
/// of family `F`). A BPF-to-BPF call, as [`lb_forward`], for the stack.
#[inline(never)]
fn lb_reverse_family<F: Family>(skb: NonNull<__sk_buff>) -> i64 {
    let ctx = TcContext::new(skb);
    match lb_reverse_inline::<F>(&ctx) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

#[inline(always)]
fn lb_reverse_inline<F: Family>(ctx: &TcContext) -> Result<(), i64> {
    let Ok(src) = ctx.load::<F::Addr>(F::SRC) else {
        return Ok(());
    };
    let Ok(dst) = ctx.load::<F::Addr>(F::DST) else {
        return Ok(());
    };
    let Some((proto, l4off)) = l4::<F>(ctx) else {
        return Ok(());
    };
    let Ok(ports) = ctx.load::<[u16; 2]>(l4off) else {
        return Ok(());
    };
    let key = LbFlowKeyOf {
        saddr: src,
        daddr: dst,
        sport: ports[0],
        dport: ports[1],
        proto,
        _pad: [0; 3],
    };
    // SAFETY: copied out at once.
    let Some(fe) = (unsafe { F::reverse().get(&key) }).copied() else {
        return Ok(());
    };
    rewrite::<F>(
        ctx,
        (proto, l4off),
        F::SRC,
        (&src, &fe.addr),
        l4off,
        (ports[0], fe.port),
    )
}

/// Restores the frontend as the source of a reply from a backend, in
/// either family.
#[inline(always)]
pub fn lb_reverse(ctx: &TcContext) -> Result<(), i64> {
    let Ok(proto) = ctx.load::<u16>(12) else {
        return Ok(());
    };
    let r = match u16::from_be(proto) {
        ETH_P_IP => lb_reverse_family::<V4>(skb(ctx)),
        ETH_P_IPV6 => lb_reverse_family::<V6>(skb(ctx)),
        _ => 0,
    };
    if r == 0 { Ok(()) } else { Err(r) }
}

/// Translates a packet addressed to a service frontend to its flow's
/// backend. `Err` is the verdict of a packet that must be dropped.
///
/// The work is a BPF-to-BPF call ([`lb_forward_call`], one subprogram per
/// family) rather than inlined: inlined twice into `from_endpoint` with
/// the tunnels and neighbour discovery, the program's stack frame would
/// exceed the 512 bytes the kernel allows; as a call its keys live in a
/// frame of their own.
#[inline(always)]
pub fn lb_forward<F: Family>(
    ctx: &TcContext,
    src: F::Addr,
    dst: F::Addr,
) -> Result<Balanced<F::Addr>, Verdict> {
    let mut addrs = [src, dst];
    match lb_forward_call::<F>(skb(ctx), &mut addrs) {
        0 => Ok(Balanced::No),
        1 => Ok(Balanced::To(addrs[1])),
        v => Err(drop_verdict(v)),
    }
}

/// The `__sk_buff` of `ctx`, for a subprogram to rebuild its context from.
#[inline(always)]
fn skb(ctx: &TcContext) -> NonNull<__sk_buff> {
    // SAFETY: the context of a running program is never null.
    unsafe { NonNull::new_unchecked(ctx.as_ptr().cast()) }
}

/// The verdict [`lb_forward_call`] returned as a number.
#[inline(always)]
fn drop_verdict(v: u32) -> Verdict {
    const FRAGMENT: u32 = Verdict::DropFragment as u32;
    const PROTOCOL: u32 = Verdict::DropServiceProtocol as u32;
    const NO_BACKEND: u32 = Verdict::DropNoServiceBackend as u32;
    const MALFORMED: u32 = Verdict::DropMalformed as u32;
    match v {
        FRAGMENT => Verdict::DropFragment,
        PROTOCOL => Verdict::DropServiceProtocol,
        NO_BACKEND => Verdict::DropNoServiceBackend,
        MALFORMED => Verdict::DropMalformed,
        _ => Verdict::DropInternal,
    }
}

// ---- Network policy ----------------------------------------------------
//
// A local endpoint whose identity has a `CM_POLICY_STATE` entry has a
// policy; every other one skips all of this after one lookup. For one that
// has, a packet passes when
// 1. it belongs to a connection this direction already allowed under the
//    current revision (`CM_POLICY_CT`, keyed by the 5-tuple as this
//    direction saw it), or
// 2. it is a reply of a connection the other direction allowed (the
//    reversed tuple, the other direction); after a policy change
//    (another revision) that connection's first packet direction is
//    checked again on the policy, so a connection the new policy denies
//    stops, one it allows goes on,
// 3. else the policy decides: the longest `CM_POLICY` prefix of (endpoint,
//    peer, direction, protocol, destination port). Allow: tracked, passes.
//    Deny: dropped. No entry: dropped if the direction is default-deny,
//    else tracked and passes (so its replies pass the other direction's
//    default deny).
// A drop is `drop_policy_denied`, or `drop_policy_unknown_peer` when it was
// for want of an allow and the peer's address lies in a mesh pod range
// with no ip-cache entry (the agent has not synced it). Drops are counted
// per endpoint (`CM_POLICY_STATS`); in audit mode they are counted as
// `policy_audit` there and in `CM_METRICS`, and the packet passes.
//
// Egress is checked in `from_endpoint` after the load-balancer (the peer
// is the backend), ingress in `deliver` before the reverse translation, so
// both directions track the same tuple. IPv4 addresses are tracked as
// IPv4-mapped IPv6; a protocol other than TCP and UDP is tracked and
// looked up without ports (protocol 0 in the policy map); IPv6 extension
// headers are not walked (such a packet is protocol 0), and an IPv4
// fragment after the first carries no ports (port 0).

/// The 5-tuple of the Ethernet frame's packet; None: not IP.
#[inline(always)]
fn policy_tuple(ctx: &TcContext, key: &mut PolicyCtKey) -> Option<()> {
    let proto: u16 = ctx.load(12).ok()?;
    let l4 = match u16::from_be(proto) {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
            let frag: u16 = ctx.load(ETH_HLEN + 6).ok()?;
            key.proto = ctx.load(ETH_HLEN + 9).ok()?;
            let src: [u8; 4] = ctx.load(IP_SRC).ok()?;
            let dst: [u8; 4] = ctx.load(IP_DST).ok()?;
            key.saddr = [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, src[0], src[1], src[2], src[3],
            ];
            key.daddr = [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, dst[0], dst[1], dst[2], dst[3],
            ];
            if u16::from_be(frag) & 0x1fff != 0 {
                return Some(());
            }
            ETH_HLEN + usize::from(vihl & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            key.proto = ctx.load(IP6_NEXT).ok()?;
            key.saddr = ctx.load(IP6_SRC).ok()?;
            key.daddr = ctx.load(IP6_DST).ok()?;
            ETH_HLEN + IP6_HLEN
        }
        _ => return None,
    };
    if key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP {
        let ports: [u16; 2] = ctx.load(l4).ok()?;
        key.sport = ports[0];
        key.dport = ports[1];
    }
    Some(())
}

/// The identity of a peer address (IPv4-mapped or IPv6) as this node
/// knows it: a local endpoint's, the ip-cache's, else 0.
#[inline(always)]
fn address_identity(addr: &Ip6) -> u32 {
    let v4 = addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff;
    if v4 {
        let ip = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
        if let Some(ep) = endpoint(ip) {
            return ep.identity;
        }
        return ipcache(ip).map_or(0, |v| v.identity);
    }
    if let Some(ep) = endpoint6(addr) {
        return ep.identity;
    }
    ipcache6(addr).map_or(0, |v| v.identity)
}

/// The node-local identity of the longest policy CIDR prefix holding the
/// address, else 0.
#[inline(always)]
fn cidr_identity(addr: &Ip6) -> u32 {
    let v4 = addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff;
    if v4 {
        let ip = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
        return CM_POLICY_CIDR
            .get(&aya_ebpf::maps::lpm_trie::Key::new(32, ip))
            .copied()
            .unwrap_or(0);
    }
    CM_POLICY_CIDR6
        .get(&aya_ebpf::maps::lpm_trie::Key::new(128, *addr))
        .copied()
        .unwrap_or(0)
}

/// Whether the peer address is a mesh pod this node has no identity for.
#[inline(always)]
fn unknown_peer(addr: &Ip6) -> bool {
    if address_identity(addr) != 0 {
        return false;
    }
    let v4 = addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff;
    if v4 {
        in_strict_range(u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]))
    } else {
        in_strict_range6(addr)
    }
}

/// The policy map's verdict for a packet: `POLICY_ALLOW`, `POLICY_DENY`
/// or 0 (no entry).
#[inline(always)]
fn policy_lookup(identity: u32, peer: u32, dir: Direction, proto: u8, port: u16) -> u8 {
    let (proto, port) = if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        (proto, u16::from_be(port))
    } else {
        (0, 0)
    };
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey::new(identity, peer, dir, proto, port),
    );
    CM_POLICY.get(&key).map_or(0, |v| v.verdict)
}

/// Counts a policy verdict for the endpoint behind `ifindex`.
#[inline(always)]
fn policy_count(ifindex: u32, dir: Direction, verdict: Verdict, len: u32) {
    let key = PolicyStatsKey {
        ifindex,
        direction: dir as u8,
        verdict: verdict as u8,
        _pad: 0,
    };
    if let Some(c) = CM_POLICY_STATS.get_ptr_mut(&key) {
        // SAFETY: this CPU's copy of a per-CPU value: no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
        return;
    }
    let first = Counter {
        packets: 1,
        bytes: u64::from(len),
    };
    let _ = CM_POLICY_STATS.insert(&key, &first, 0);
}

/// The policy of a packet of the local endpoint `ep` in `dir` with the
/// peer of identity `peer` (egress: 0, looked up from the destination).
#[inline(always)]
pub fn policy(
    ctx: &TcContext,
    ep: &EndpointInfo,
    peer: u32,
    dir: Direction,
) -> Result<(), Verdict> {
    match policy_call(skb(ctx), ep.identity, peer, dir as u32, ep.ifindex) {
        0 => Ok(()),
        v if v == Verdict::DropPolicyUnknownPeer as u32 => Err(Verdict::DropPolicyUnknownPeer),
        _ => Err(Verdict::DropPolicyDenied),
    }
}

/// [`policy`] as a subprogram (its keys in a frame of their own). Returns
/// 0 (passes) or the drop verdict's number.
#[inline(never)]
fn policy_call(skb: NonNull<__sk_buff>, identity: u32, peer: u32, dir: u32, ifindex: u32) -> u32 {
    // SAFETY: copied out at once; user space writes whole values.
    let Some(state) = (unsafe { CM_POLICY_STATE.get(&identity) }).copied() else {
        return 0;
    };
    let ctx = TcContext::new(skb);
    let (dir, other) = if dir == Direction::Ingress as u32 {
        (Direction::Ingress, Direction::Egress)
    } else {
        (Direction::Egress, Direction::Ingress)
    };
    let mut key = PolicyCtKey {
        direction: dir as u8,
        ..PolicyCtKey::default()
    };
    if policy_tuple(&ctx, &mut key).is_none() {
        return 0;
    }
    // SAFETY: read at once.
    if unsafe { CM_POLICY_CT.get(&key) }.copied() == Some(state.revision) {
        return 0;
    }
    // Egress: the destination's identity; outside the mesh's endpoints a
    // policy CIDR's, else world. Ingress: the sender's as delivered, world
    // refined by a policy CIDR.
    let peer = if peer == 0 {
        match address_identity(&key.daddr) {
            0 => match cidr_identity(&key.daddr) {
                0 => tunnel_common::IDENTITY_WORLD,
                id => id,
            },
            id => id,
        }
    } else if peer == tunnel_common::IDENTITY_WORLD {
        match cidr_identity(&key.saddr) {
            0 => peer,
            id => id,
        }
    } else {
        peer
    };
    let reply = PolicyCtKey {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        direction: other as u8,
        _pad: [0; 2],
    };
    // SAFETY: read at once.
    if let Some(rev) = unsafe { CM_POLICY_CT.get(&reply) }.copied() {
        if rev == state.revision {
            return 0;
        }
        // Tracked under an older policy: does the connection's first
        // direction still pass?
        let v = policy_lookup(identity, peer, other, key.proto, key.sport);
        if v == POLICY_ALLOW || (v == 0 && state.flags & policy_default_deny(other) == 0) {
            let _ = CM_POLICY_CT.insert(&reply, &state.revision, 0);
            return 0;
        }
    }
    let v = policy_lookup(identity, peer, dir, key.proto, key.dport);
    let verdict = if v == POLICY_DENY {
        Verdict::DropPolicyDenied
    } else if v == POLICY_ALLOW || state.flags & policy_default_deny(dir) == 0 {
        let _ = CM_POLICY_CT.insert(&key, &state.revision, 0);
        return 0;
    } else {
        let addr = if dir == Direction::Egress {
            &key.daddr
        } else {
            &key.saddr
        };
        if unknown_peer(addr) {
            Verdict::DropPolicyUnknownPeer
        } else {
            Verdict::DropPolicyDenied
        }
    };
    let len = ctx.len();
    if state.flags & POLICY_AUDIT != 0 {
        crate::flow::note_audit();
        policy_count(ifindex, dir, Verdict::PolicyAudit, len);
        count(dir, Verdict::PolicyAudit, len);
        return 0;
    }
    policy_count(ifindex, dir, verdict, len);
    verdict as u32
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// GPL-compatible, so the kernel allows every helper we call.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
