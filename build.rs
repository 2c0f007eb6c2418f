//! Compiles the gRPC API with `protox` (pure Rust), so no system `protoc` is needed.
//! The encoded descriptor set is written to `OUT_DIR` for the reflection service.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tokenbroker/v1/tokenbroker.proto";
    println!("cargo:rerun-if-changed=proto");
    let file_descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tokenbroker_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Requests that do not decode are INVALID_ARGUMENT, audited (src/service/codec.rs).
        .codec_path("crate::service::codec::BrokerCodec")
        .compile_fds(file_descriptors)?;
    Ok(())
}
