//! Generates the gRPC service of `proto/bstack/bcache/v1/planner.proto`.
//!
//! `protox` parses the schema in pure Rust, so building needs no system
//! `protoc`. The `CachePlan` the service returns is the contract of the
//! `bstack-plan` crate: `extern_path` maps `bstack.plan.v1` onto its
//! generated types instead of generating them a second time.

use std::error::Error;

const PROTO_ROOT: &str = "proto";
const PLAN_PROTO_ROOT: &str = "../bstack-plan/proto";
const PROTO_FILE: &str = "bstack/bcache/v1/planner.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    println!("cargo:rerun-if-changed={PLAN_PROTO_ROOT}");
    // The set holds the imported plan.proto too: prost needs its messages to
    // derive this package's traits. Its module (`bstack.plan.v1.rs`) is also
    // written to OUT_DIR, but only `bstack.bcache.v1.rs` is included.
    let descriptors = protox::compile([PROTO_FILE], [PROTO_ROOT, PLAN_PROTO_ROOT])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".bstack.plan.v1", "::bstack_plan::v1")
        .compile_fds(descriptors)?;
    Ok(())
}
