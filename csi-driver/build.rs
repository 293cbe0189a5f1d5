// Compiles the CSI v1 protocol (server and client) and the node agent's API (client only:
// the controller drives node agents through it). Uses the protoc shipped in the
// protoc-bin-vendored crate, so a build needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/csi.proto"],
        &["proto", include.to_str().ok_or("protoc include path is not UTF-8")?],
    )?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure().build_server(false).compile_with_config(
        config,
        &["../node-agent/proto/agent.proto"],
        &["../node-agent/proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=../node-agent/proto/agent.proto");
    Ok(())
}
