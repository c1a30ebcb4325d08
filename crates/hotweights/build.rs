//! Generates the gRPC service of `proto/bstack/hotweights/v1/cluster.proto`.
//!
//! `protox` parses the schema in pure Rust, so building needs no system
//! `protoc`. The plans and manifests the service carries are the contracts
//! of the `bstack-plan` crate: `extern_path` maps `bstack.plan.v1` onto its
//! generated types instead of generating them a second time.

use std::error::Error;

const PROTO_ROOT: &str = "proto";
const PLAN_PROTO_ROOT: &str = "../bstack-plan/proto";
const PROTO_FILE: &str = "bstack/hotweights/v1/cluster.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    println!("cargo:rerun-if-changed={PLAN_PROTO_ROOT}");
    let descriptors = protox::compile([PROTO_FILE], [PROTO_ROOT, PLAN_PROTO_ROOT])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".bstack.plan.v1", "::bstack_plan::v1")
        .compile_fds(descriptors)?;
    Ok(())
}
