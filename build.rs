//! Compiles `proto/` into Rust with tonic-prost-build, using protox so no system `protoc` is
//! needed, and writes the descriptor set (with source comments) for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/sllm/v1/common.proto",
        "proto/sllm/v1/model_registry.proto",
        "proto/sllm/v1/worker_registry.proto",
        "proto/sllm/v1/scaler.proto",
        "proto/sllm/v1/dispatch.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // protox keeps source info, so reflection (and `grpcurl describe`) shows the comments.
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("sllm_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
