//! The contracts every BStack component speaks.
//!
//! BStack's planners and executors never share internal structs; they
//! exchange the values defined here, so each component can be built, tested
//! and replaced on its own, and every plan can be saved, inspected, diffed
//! and replayed:
//!
//! | contract | made by | consumed by |
//! |---|---|---|
//! | [`WeightManifest`] | `hotweights publish` | delta planning, verification |
//! | [`CachePlan`] (of [`TransferOp`]s and [`KvPageRef`]s) | the bcache planner | the stratacache executor |
//! | [`SwapPlan`], [`SwapWindow`] | `hotweights plan` | the rollout coordinator and workers, bwrt |
//! | [`WaveSpec`] | datajax WaveSpec export | bwrt |
//!
//! The schema is `proto/bstack/plan/v1/plan.proto`; the Rust types are
//! generated from it at build time (pure Rust, no `protoc`). Each contract has
//! two forms that convert losslessly:
//!
//! - **protobuf**, compact, and compatible with the earlier `bw.stack` wire
//!   format where fields exist in both ([`Contract::decode_proto`],
//!   `prost::Message::encode_to_vec`);
//! - **JSON**, for people and tools like `jq` ([`json`], [`Contract::to_json`],
//!   [`Contract::from_json`]).
//!
//! Decoding checks form; [`Validate`] checks meaning, returning every problem
//! with the path of the field (`ops[3].length: must be > 0`).
//!
//! ```
//! use bstack_plan::{CachePlan, Contract, PlanWindow, TransferKind, TransferOp, Validate};
//!
//! let plan = CachePlan {
//!     schema_version: bstack_plan::SCHEMA_VERSION,
//!     plan_id: "w0".into(),
//!     window: Some(PlanWindow { index: 0, start_ns: 0, end_ns: 20_000_000 }),
//!     ops: vec![TransferOp {
//!         kind: TransferKind::H2d as i32,
//!         src: "tier://node0/cpu".into(),
//!         dst: "device://gpu0/kv".into(),
//!         length: 0, // wrong: a copy moves at least one byte
//!         ..Default::default()
//!     }],
//!     ..Default::default()
//! };
//! let problems = plan.problems();
//! assert_eq!(problems[0].to_string(), "ops[0].length: must be > 0");
//!
//! let json = plan.to_json();
//! assert_eq!(CachePlan::from_json(&json, "<doc>").unwrap(), plan);
//! ```

pub mod address;
mod document;
pub mod dtype;
mod error;
pub mod example;
pub mod json;
mod validate;

/// Types generated from `plan.proto`; re-exported at the crate root.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/bstack.plan.v1.rs"));
}

pub use address::{Address, AddressError, TierKind, TierName};
pub use document::{Contract, ContractKind, Document, Format, write_atomic};
pub use error::{PlanError, Result};
/// Protobuf encoding and decoding of every contract (`encode_to_vec`, `decode`).
pub use prost::Message;
pub use v1::*;
pub use validate::{Checker, Problem, Problems, Validate};

/// The contract version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
