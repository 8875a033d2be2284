//! Builds the tunnel-ebpf programs for the BPF target with aya-build and puts
//! the objects in OUT_DIR, where `datapath::objects` includes them.
//!
//! The eBPF side needs `-Z build-std=core`, i.e. a nightly or RUSTC_BOOTSTRAP.
//! We use the pinned stable toolchain (rust-toolchain.toml, 1.98.0: its LLVM
//! matches the bpf-linker we build) with RUSTC_BOOTSTRAP=1 set for that
//! nested build only, never for the host crates.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest
        .parent()
        .ok_or_else(|| anyhow::anyhow!("node-agent has no parent directory"))?;
    let ebpf_dir = workspace.join("tunnel-ebpf");
    let common_dir = workspace.join("tunnel-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");

    // rustup exports the toolchain it resolved from rust-toolchain.toml.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.98.0".to_owned());
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tunnel-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
