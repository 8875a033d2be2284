//! The node's eBPF datapath: the compiled tunnel-ebpf objects, a loader that
//! attaches them, and metrics read back from the kernel.
//!
//! Invariant: map and program names come from `tunnel_common`, the one place
//! the kernel and user side agree on them.

use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{SchedClassifier, TcAttachType, links::LinkOrder, tc::TcAttach},
};
use tunnel_common::{Counter, Direction, Verdict, maps, metric_index, programs};

/// ELF objects built by build.rs (aya-build) from tunnel-ebpf.
pub mod objects {
    /// `from_endpoint`, for the TC ingress of a pod's host-side veth.
    pub static FROM_ENDPOINT: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from-endpoint"));
}

/// Errors of the datapath loader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading eBPF object {object}: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    #[error("eBPF object has no program {0:?}")]
    MissingProgram(&'static str),
    #[error("eBPF object has no map {0:?}")]
    MissingMap(&'static str),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("interface {iface:?} not found in this network namespace")]
    NoSuchInterface { iface: String },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The `from_endpoint` program loaded and attached to one interface. The TCX
/// link lives as long as this value.
pub struct EndpointProgram {
    ebpf: Ebpf,
    iface: String,
}

impl std::fmt::Debug for EndpointProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointProgram")
            .field("iface", &self.iface)
            .finish_non_exhaustive()
    }
}

fn ifindex(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface).map_err(|_| Error::NoSuchInterface {
        iface: iface.to_owned(),
    })?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        return Err(Error::NoSuchInterface {
            iface: iface.to_owned(),
        });
    }
    Ok(idx)
}

impl EndpointProgram {
    /// Loads `from_endpoint` and attaches it (TCX ingress) to `iface` in the
    /// calling thread's network namespace.
    pub fn attach(iface: &str) -> Result<Self> {
        let idx = ifindex(iface)?;
        let mut ebpf = EbpfLoader::new()
            .load(objects::FROM_ENDPOINT)
            .map_err(|source| Error::Load {
                object: "from-endpoint",
                source,
            })?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(programs::FROM_ENDPOINT)
            .ok_or(Error::MissingProgram(programs::FROM_ENDPOINT))?
            .try_into()
            .map_err(|source| Error::Program {
                program: programs::FROM_ENDPOINT,
                source,
            })?;
        let perr = |source| Error::Program {
            program: programs::FROM_ENDPOINT,
            source,
        };
        prog.load().map_err(perr)?;
        prog.attach(
            idx,
            TcAttach::Tcx {
                attach_type: TcAttachType::Ingress,
                order: LinkOrder::default(),
            },
        )
        .map_err(perr)?;
        Ok(Self {
            ebpf,
            iface: iface.to_owned(),
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The counter of (direction, verdict), summed over CPUs.
    pub fn counter(&self, dir: Direction, verdict: Verdict) -> Result<Counter> {
        let map = self
            .ebpf
            .map(maps::METRICS)
            .ok_or(Error::MissingMap(maps::METRICS))?;
        let arr: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map).map_err(|source| Error::Map {
                map: maps::METRICS,
                source,
            })?;
        let per_cpu = arr
            .get(&metric_index(dir, verdict), 0)
            .map_err(|source| Error::Map {
                map: maps::METRICS,
                source,
            })?;
        Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    /// Every non-zero counter, for metrics export and tests.
    pub fn counters(&self) -> Result<Vec<(Direction, Verdict, Counter)>> {
        let mut out = Vec::new();
        for dir in [Direction::Egress, Direction::Ingress] {
            for v in Verdict::ALL {
                let c = self.counter(dir, v)?;
                if c.packets != 0 {
                    out.push((dir, v, c));
                }
            }
        }
        Ok(out)
    }
}
