//! Flow events (docs/observability.md): each program calls [`begin`] on
//! entry and [`end`] with the packet's verdict; in between the datapath
//! notes what only it knows (identities, the service frontend, an audited
//! policy drop) into this CPU's scratch event (`CM_FLOW_SCRATCH`: the
//! event is never on the 512-byte stack).
//!
//! What is emitted into the `CM_FLOWS` ring buffer, by `CM_FLOW_CONFIG`:
//! - every drop and every policy audit (`FLOW_CONFIG_DROPS`), one event per
//!   packet;
//! - forwarded traffic (`FLOW_CONFIG_TRACES`): a flow's first packet, then
//!   at most one event per `trace_interval_ns` carrying the packets and
//!   bytes since its last one (`CM_FLOW_AGG`, an LRU keyed by the
//!   5-tuple and the program), so a busy node is not flooded.
//!
//! An event the ring buffer has no room for is counted in `CM_FLOW_LOST`
//! (the agent reports it), never waited for. With `CM_FLOW_CONFIG` off a
//! packet costs one array lookup here.
//!
//! The 5-tuple is read at [`end`], from the packet as it leaves the
//! program: a translated service packet shows its backend (the frontend
//! noted by the load-balancer), a packet this program encapsulated in
//! Geneve is read past the outer headers.

use core::ptr::NonNull;

use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use tunnel_common::{
    FLOW_CONFIG_DROPS, FLOW_CONFIG_TRACES, FLOW_FLAG_AUDIT, FLOW_FLAG_DROP, FLOW_FLAG_TRACE,
    FLOW_FLAG_TRANSLATED, FLOW_HOOK_ENDPOINT, FLOW_HOOK_WIREGUARD, FLOW_RING_BYTES, FlowAgg,
    FlowConfig, FlowEvent, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Ip6, MAX_FLOW_AGG, TunnelMode,
    Verdict,
};

use crate::shared::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, config};

/// The `__sk_buff` of `ctx`, for a subprogram to rebuild its context from.
#[inline(always)]
fn skb(ctx: &TcContext) -> NonNull<__sk_buff> {
    // SAFETY: the context of a running program is never null.
    unsafe { NonNull::new_unchecked(ctx.as_ptr().cast()) }
}

#[map]
pub static CM_FLOWS: RingBuf = RingBuf::pinned(FLOW_RING_BYTES, 0);
#[map]
pub static CM_FLOW_CONFIG: Array<FlowConfig> = Array::pinned(1, 0);
#[map]
pub static CM_FLOW_AGG: LruHashMap<FlowKey, FlowAgg> = LruHashMap::pinned(MAX_FLOW_AGG, 0);
#[map]
pub static CM_FLOW_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
// Per object, not pinned: a program runs to completion on its CPU.
#[map]
pub static CM_FLOW_SCRATCH: PerCpuArray<FlowEvent> = PerCpuArray::with_max_entries(1, 0);

/// Events are on for this packet ([`begin`]).
pub struct Flow;

#[inline(always)]
fn scratch() -> Option<*mut FlowEvent> {
    CM_FLOW_SCRATCH.get_ptr_mut(0)
}

/// Starts the event of a packet that `hook` sees (`direction`: relative to
/// the local endpoint). None: events are off.
#[inline(always)]
pub fn begin(hook: u8, direction: u8, ifindex: u32) -> Option<Flow> {
    let cfg = *CM_FLOW_CONFIG.get(0)?;
    if cfg.flags == 0 {
        return None;
    }
    let ev = scratch()?;
    // SAFETY: this CPU's slot of a per-CPU array, written by this program
    // only while it runs.
    unsafe {
        (*ev).src_identity = 0;
        (*ev).dst_identity = 0;
        (*ev).flags = 0;
        (*ev).svc_port = 0;
        (*ev).hook = hook;
        (*ev).direction = direction;
        (*ev).ifindex = ifindex;
        // Where the IP header starts: the TUN device's packets have none
        // before it (until from_wireguard pushes one, [`l3_offset`]).
        (*ev).l3_offset = if hook == FLOW_HOOK_WIREGUARD {
            0
        } else {
            ETH_HLEN as u32
        };
    }
    Some(Flow)
}

/// The identities of the packet's source and destination (0: not known
/// here; an earlier note is kept).
#[inline(always)]
pub fn note_identities(src: u32, dst: u32) {
    if let Some(ev) = scratch() {
        // SAFETY: as in [`begin`].
        unsafe {
            if src != 0 {
                (*ev).src_identity = src;
            }
            if dst != 0 {
                (*ev).dst_identity = dst;
            }
        }
    }
}

/// The load-balancer translated the packet: `frontend` (16 bytes, IPv4
/// mapped) and `port` (network order) were its destination.
#[inline(always)]
pub fn note_service(frontend: &Ip6, port: u16) {
    if let Some(ev) = scratch() {
        // SAFETY: as in [`begin`].
        unsafe {
            (*ev).svc = *frontend;
            (*ev).svc_port = port;
            (*ev).flags |= FLOW_FLAG_TRANSLATED;
        }
    }
}

/// Audit mode passed a packet the policy would have dropped.
#[inline(always)]
pub fn note_audit() {
    if let Some(ev) = scratch() {
        // SAFETY: as in [`begin`].
        unsafe { (*ev).flags |= FLOW_FLAG_AUDIT };
    }
}

/// The IP header now starts at `off` (from_wireguard pushed an Ethernet
/// header).
#[inline(always)]
pub fn l3_offset(off: u32) {
    if let Some(ev) = scratch() {
        // SAFETY: as in [`begin`].
        unsafe { (*ev).l3_offset = off };
    }
}

/// An IPv4 address (network order, as loaded) as 16 bytes `::ffff:a.b.c.d`.
#[inline(always)]
pub fn mapped(a: u32) -> Ip6 {
    let b = a.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// Reads the 5-tuple at `off` into the event. False: not IP.
#[inline(always)]
fn tuple(ctx: &TcContext, ev: *mut FlowEvent, off: usize) -> bool {
    let Ok(vihl) = ctx.load::<u8>(off) else {
        return false;
    };
    // SAFETY: as in [`begin`].
    let ev = unsafe { &mut *ev };
    // One helper call per header, not one per field.
    let l4 = match vihl >> 4 {
        4 => {
            let Ok(h) = ctx.load::<[u8; 20]>(off) else {
                return false;
            };
            ev.family = 4;
            ev.proto = h[9];
            ev.src = [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, h[12], h[13], h[14], h[15],
            ];
            ev.dst = [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, h[16], h[17], h[18], h[19],
            ];
            // A later fragment has no ports.
            if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                0
            } else {
                off + usize::from(vihl & 0x0f) * 4
            }
        }
        6 => {
            let Ok(h) = ctx.load::<[u8; 40]>(off) else {
                return false;
            };
            ev.family = 6;
            ev.proto = h[6];
            ev.src.copy_from_slice(&h[8..24]);
            ev.dst.copy_from_slice(&h[24..40]);
            off + 40
        }
        _ => return false,
    };
    ev.sport = 0;
    ev.dport = 0;
    if l4 != 0
        && (ev.proto == IPPROTO_TCP || ev.proto == IPPROTO_UDP)
        && let Ok(p) = ctx.load::<[u16; 2]>(l4)
    {
        ev.sport = p[0];
        ev.dport = p[1];
    }
    true
}

/// Where the IP header of the packet as it leaves starts.
#[inline(always)]
fn ip_offset(ctx: &TcContext, ev: &FlowEvent, mode: u32) -> usize {
    if ev.hook == FLOW_HOOK_ENDPOINT
        && ev.verdict == Verdict::Tunnel as u8
        && mode == TunnelMode::Geneve as u32
    {
        // Encapsulated here: outer IP, UDP (8), Geneve (8), inner Ethernet.
        let outer = match ctx.load::<u16>(12).map(u16::from_be) {
            Ok(ETH_P_IP) => 20,
            Ok(ETH_P_IPV6) => 40,
            _ => return 0,
        };
        return ETH_HLEN + outer + 16 + ETH_HLEN;
    }
    ev.l3_offset as usize
}

/// Finishes the packet's event: emitted or aggregated by its verdict.
#[inline(always)]
pub fn end(ctx: &TcContext, flow: Option<Flow>, verdict: Verdict, len: u32) {
    if flow.is_some() {
        end_call(skb(ctx), verdict as u32, len);
    }
}

/// [`end`] as a subprogram: its loads live in a frame of their own, not
/// in the program's (the combined stack of nested calls must stay under
/// 512 bytes).
#[inline(never)]
fn end_call(skb: NonNull<__sk_buff>, verdict: u32, len: u32) {
    let ctx = &TcContext::new(skb);
    let (Some(cfg), Some(ev)) = (CM_FLOW_CONFIG.get(0).copied(), scratch()) else {
        return;
    };
    // Drops are the verdicts from 64 up (`Verdict::is_drop`).
    let drop = verdict >= Verdict::DropMalformed as u32;
    // SAFETY: as in [`begin`].
    let (audit, mode) = unsafe {
        (*ev).verdict = verdict as u8;
        let mode = config().mode;
        (*ev).mode = mode as u8;
        ((*ev).flags & FLOW_FLAG_AUDIT != 0, mode)
    };
    if drop || audit {
        if cfg.flags & FLOW_CONFIG_DROPS == 0 {
            return;
        }
        // SAFETY: as in [`begin`].
        let off = ip_offset(ctx, unsafe { &*ev }, mode);
        if !tuple(ctx, ev, off) {
            // SAFETY: as in [`begin`].
            unsafe { (*ev).family = 0 };
        }
        // SAFETY: as in [`begin`].
        unsafe {
            if drop {
                (*ev).flags |= FLOW_FLAG_DROP;
            }
            (*ev).packets = 1;
            (*ev).bytes = u64::from(len);
        }
        emit(ev);
        return;
    }
    if cfg.flags & FLOW_CONFIG_TRACES == 0 || verdict == Verdict::NeighbourReply as u32 {
        return;
    }
    // SAFETY: as in [`begin`].
    let off = ip_offset(ctx, unsafe { &*ev }, mode);
    if !tuple(ctx, ev, off) {
        return;
    }
    trace(ev, cfg.trace_interval_ns, len);
}

/// A forwarded packet: reported on its flow's first packet and then once
/// per `interval` with what the flow carried since. The counts are added
/// without atomics: a flow's packets mostly stay on one CPU, and a count
/// lost to a race only makes a report a packet short.
#[inline(always)]
fn trace(ev: *mut FlowEvent, interval: u64, len: u32) {
    // SAFETY: a plain helper call.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
    // SAFETY: the event starts with its key (repr(C), asserted in
    // tunnel-common); the map reads the key from map memory.
    let key = unsafe { &*ev.cast::<FlowKey>() };
    let (packets, bytes) = match CM_FLOW_AGG.get_ptr_mut(key) {
        Some(a) => {
            // SAFETY: an LRU value; see the comment above on races.
            unsafe {
                if interval != 0 && now.wrapping_sub((*a).last_ns) < interval {
                    (*a).packets += 1;
                    (*a).bytes += u64::from(len);
                    return;
                }
                let r = ((*a).packets + 1, (*a).bytes + u64::from(len));
                (*a).last_ns = now;
                (*a).packets = 0;
                (*a).bytes = 0;
                r
            }
        }
        None => {
            let first = FlowAgg {
                last_ns: now,
                packets: 0,
                bytes: 0,
            };
            let _ = CM_FLOW_AGG.insert(key, &first, 0);
            (1, u64::from(len))
        }
    };
    // SAFETY: as in [`begin`].
    unsafe {
        (*ev).flags |= FLOW_FLAG_TRACE;
        (*ev).packets = packets;
        (*ev).bytes = bytes;
    }
    emit(ev);
}

#[inline(always)]
fn emit(ev: *mut FlowEvent) {
    // SAFETY: as in [`begin`]; a plain helper call.
    unsafe { (*ev).ts_ns = aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
    // SAFETY: the scratch event, copied by the helper.
    if CM_FLOWS.output(unsafe { &*ev }, 0).is_err()
        && let Some(lost) = CM_FLOW_LOST.get_ptr_mut(0)
    {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *lost += 1 };
    }
}
