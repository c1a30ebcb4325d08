//! Versioned weight rollouts for live inference clusters.
//!
//! Between two RL steps most bf16 weights are bit-identical, and a fine-tune
//! often touches a fraction of its tensors, so moving a whole checkpoint for
//! every update wastes minutes. hotweights describes a checkpoint at the
//! level of tensors and fixed-size chunks ([`publish`] makes a
//! [`bstack_plan::WeightManifest`]), so that an update moves only the chunks
//! whose hash changed.
//!
//! ```no_run
//! use hotweights::{PublishOptions, publish};
//!
//! let v1 = publish("ckpt/v1".as_ref(), &PublishOptions::new("v1"), &|_| {})?;
//! let v2 = publish("ckpt/v2".as_ref(), &PublishOptions::new("v2"), &|_| {})?;
//! let changed = v2.tensors.iter().filter(|t| !v1.tensors.contains(t)).count();
//! println!("{changed} tensors differ");
//! # Ok::<(), hotweights::HotweightsError>(())
//! ```
//!
//! - [`checkpoint`]: reading a checkpoint directory (safetensors, single or
//!   sharded, and other files) and checking its headers.
//! - [`publish`](mod@publish): hashing it into a manifest.
//! - [`hash`]: the chunk hash functions.
//! - [`sparse`]: sparse deltas, `zstd(old XOR new)`, for changed chunks whose
//!   old bytes the receiver holds.

pub mod checkpoint;
pub mod delta;
mod error;
pub mod failpoint;
pub mod hash;
pub mod pack;
pub mod plan;
pub mod publish;
pub mod source;
pub mod sparse;
pub mod store;
pub mod synth;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointFile, INDEX_FILE};
pub use error::{HotweightsError, Result};
pub use hash::hash_hex;
pub use plan::{PlanOptions, Planned, TpGroups};
pub use publish::{DEFAULT_CHUNK_BYTES, PublishOptions, publish, publish_checkpoint};
pub use store::{ApplySource, Store};
pub use verify::{VerifyOptions, verify};
