//! Compiles the broker's proto from ../../proto with `protox` (pure Rust, no
//! system `protoc`) into a client-only tonic stub.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    println!("cargo:rerun-if-changed={root}");
    let file_descriptors = protox::compile(["tokenbroker/v1/tokenbroker.proto"], [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(file_descriptors)?;
    Ok(())
}
