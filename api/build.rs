//! Generates the gRPC API (messages and tonic client/server) from
//! `proto/clustermesh.proto`. Needs `protoc` (Debian `protobuf-compiler`,
//! installed by scripts/setup.sh).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/clustermesh.proto");
    tonic_prost_build::configure().compile_protos(&["proto/clustermesh.proto"], &["proto"])?;
    Ok(())
}
