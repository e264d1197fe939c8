//! Generates the gRPC code from `proto/*.proto` at build time, so the
//! generated code always matches the definitions (nothing generated is
//! committed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/cluster.proto", "proto/api.proto"], &["proto"])?;
    Ok(())
}
