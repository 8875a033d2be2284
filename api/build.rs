//! Generates the gRPC API (messages and tonic client/server) from
//! `proto/clustermesh.proto`. Needs `protoc` (Debian `protobuf-compiler`,
//! installed by scripts/setup.sh).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/clustermesh.proto");
    // The flow messages are also the JSON the CLI prints and the agent's
    // flow ring holds: serde on those only.
    let mut b = tonic_prost_build::configure();
    for m in ["Flow", "FlowEndpoint", "FlowService", "ObserverStatus"] {
        b = b.type_attribute(
            format!("clustermesh.v1.{m}"),
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        );
    }
    b.compile_protos(&["proto/clustermesh.proto"], &["proto"])?;
    Ok(())
}
