//! The BPF build links with `bpf-linker`, a dependency cargo cannot express:
//! rebuild when it changes (scripts/setup.sh installs it).
fn main() {
    if let Ok(p) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
