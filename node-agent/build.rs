// Compiles the agent API protobuf definitions. Uses the protoc shipped in the
// protoc-bin-vendored crate so that a build needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(config, &["proto/agent.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/agent.proto");
    Ok(())
}
