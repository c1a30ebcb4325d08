//! Generates the Rust types of `proto/bstack/plan/v1/plan.proto`.
//!
//! `protox` parses the schema in pure Rust, so building needs no system
//! `protoc`. Every message also derives serde with unknown fields rejected and
//! absent fields read as their protobuf default; enum fields go through
//! `crate::json` so that JSON shows their names rather than numbers.

use std::error::Error;

const PROTO_ROOT: &str = "proto";
const PROTO_FILE: &str = "bstack/plan/v1/plan.proto";

/// Fields whose protobuf type is an enum, with the module in `crate::json`
/// that (de)serializes them by name.
const ENUM_FIELDS: &[(&str, &str)] = &[
    (
        ".bstack.plan.v1.WeightManifest.hash_algorithm",
        "crate::json::hash_algorithm",
    ),
    (
        ".bstack.plan.v1.TransferOp.kind",
        "crate::json::transfer_kind",
    ),
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile([PROTO_FILE], [PROTO_ROOT])?;

    let mut config = prost_build::Config::new();
    config.message_attribute(
        ".bstack.plan.v1",
        "#[derive(serde::Serialize, serde::Deserialize)]\n#[serde(deny_unknown_fields, default)]",
    );
    for (field, module) in ENUM_FIELDS {
        config.field_attribute(field, format!("#[serde(with = \"{module}\")]"));
    }
    config.compile_fds(descriptors)?;
    Ok(())
}
