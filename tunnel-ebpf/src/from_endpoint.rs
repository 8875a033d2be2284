//! `from_endpoint`: TC ingress of a pod's host-side veth, i.e. every packet a
//! local endpoint sends.
//!
//! Today it accounts every packet in the per-CPU metrics map and hands it to
//! the host stack unchanged (the "unknown destination" path of the datapath);
//! local delivery, ip-cache lookup and encapsulation build on it.
//!
//! The host (non-BPF) build of this file exists only so that workspace tools
//! (`cargo check`, `cargo clippy --workspace`) can type-check it; the real
//! object is built for `bpfel-unknown-none` by node-agent's build.rs.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// `#[classifier]` generates the kernel entry point taking `*mut __sk_buff`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use tunnel_common::{Counter, Direction, METRICS_ENTRIES, Verdict, metric_index};

#[map]
static CM_METRICS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(METRICS_ENTRIES, 0);

#[inline(always)]
fn count(dir: Direction, verdict: Verdict, len: u32) {
    if let Some(c) = CM_METRICS.get_ptr_mut(metric_index(dir, verdict)) {
        // SAFETY: the pointer is to this CPU's slot of a per-CPU array: no
        // other context writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    count(Direction::Egress, Verdict::Pass, ctx.len());
    TC_ACT_OK
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
