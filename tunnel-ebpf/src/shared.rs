//! Maps, helpers, the panic handler and the license shared by the programs
//! (each binary includes this module once). Every map is pinned by name, so
//! the two objects (one per attach point) share them through the node's pin
//! directory, and a restarted agent adopts them with their contents.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use tunnel_common::{
    Counter, DatapathConfig, Direction, EndpointInfo, IpCacheValue, MAX_ENDPOINTS, MAX_IPCACHE,
    MAX_SOURCE_IDENTITIES, METRICS_ENTRIES, Verdict, metric_index,
};

#[map]
pub static CM_METRICS: PerCpuArray<Counter> = PerCpuArray::pinned(METRICS_ENTRIES, 0);
#[map]
pub static CM_ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);
#[map]
pub static CM_IPCACHE: LpmTrie<u32, IpCacheValue> = LpmTrie::pinned(MAX_IPCACHE, 0);
#[map]
pub static CM_CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);
#[map]
pub static CM_SRC_IDENTITY: LruHashMap<u32, u32> = LruHashMap::pinned(MAX_SOURCE_IDENTITIES, 0);

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
/// Offsets in an Ethernet + IPv4 frame.
pub const IP_SRC: usize = ETH_HLEN + 12;
pub const IP_DST: usize = ETH_HLEN + 16;

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

/// Remembers the identity `src` last arrived with. Written only when it
/// changed: a per-packet hash update costs more than the lookup.
#[inline(always)]
pub fn record_identity(src: u32, identity: u32) {
    // SAFETY: the value is copied out at once.
    if unsafe { CM_SRC_IDENTITY.get(&src) }.copied() != Some(identity) {
        let _ = CM_SRC_IDENTITY.insert(&src, &identity, 0);
    }
}

/// Delivers a frame that arrived from a remote node outside WireGuard:
/// dropped under strict ingress, else [`deliver`].
#[inline(always)]
pub fn deliver_unencrypted(ctx: &TcContext, ep: &EndpointInfo) -> (Verdict, i32) {
    if config().flags & tunnel_common::CONFIG_FLAG_STRICT_INGRESS != 0 {
        return (
            Verdict::DropStrictPlaintext,
            aya_ebpf::bindings::TC_ACT_SHOT,
        );
    }
    deliver(ctx, ep)
}

/// Delivers the frame to a local endpoint: MACs rewritten, then
/// `redirect_peer` straight into its namespace (no host stack, no backlog).
#[inline(always)]
pub fn deliver(ctx: &TcContext, ep: &EndpointInfo) -> (Verdict, i32) {
    if set_macs(ctx, ep).is_err() {
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
