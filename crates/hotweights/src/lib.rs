//! Versioned weight rollouts for live inference clusters.
//!
//! Between two RL steps most bf16 weights are bit-identical, and a fine-tune
//! often touches a fraction of its tensors, so moving a whole checkpoint for
//! every update wastes minutes. hotweights describes a checkpoint at the
//! level of tensors and fixed-size chunks ([`publish()`] makes a
//! [`bstack_plan::WeightManifest`]), plans an update as the chunks whose hash
//! changed, packed into transfer buckets ([`plan::create`] makes a sealed
//! [`bstack_plan::SwapPlan`]), checks the plan ([`verify()`]), and installs
//! it in a versioned store where switching versions is one atomic rename
//! ([`Store`]).
//!
//! The whole flow, on a generated two-version checkpoint:
//!
//! ```
//! use hotweights::source::DirSource;
//! use hotweights::synth::SynthModel;
//! use hotweights::{ApplySource, PlanOptions, PublishOptions, Store, VerifyOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let (v1_dir, v2_dir) = (dir.path().join("v1"), dir.path().join("v2"));
//! let mut model = SynthModel::decoder(2, 64, 256, 1);
//! model.write(&v1_dir, 2)?;
//! model.rewrite("lm_head.weight", 2); // a fine-tuned head
//! model.write(&v2_dir, 2)?;
//!
//! let options = |v: &str| PublishOptions { model_id: Some("tiny".into()), ..PublishOptions::new(v) };
//! let v1 = hotweights::publish(&v1_dir, &options("v1"), &|_| {})?;
//! let v2 = hotweights::publish(&v2_dir, &options("v2"), &|_| {})?;
//!
//! let plan_options = PlanOptions { source: Some(v2_dir.clone()), ..PlanOptions::default() };
//! let planned = hotweights::plan::create(&v1, v2.clone(), &plan_options)?;
//! assert_eq!(planned.delta.tensors.changed.count, 1);
//! let check = VerifyOptions { prev: Some(&v1), next: Some(&v2), ..VerifyOptions::default() };
//! assert!(hotweights::verify(&planned.plan, &check).is_empty());
//!
//! let mut store = Store::open_or_create(&dir.path().join("store"))?;
//! store.import(&v1, &DirSource::new(&v1_dir), &|_| {})?; // the receiver's first version
//! store.commit("v1")?;
//! store.apply(&planned.plan, ApplySource::PlanOps, &|_| {})?; // moves only the new head
//! store.commit("v2")?;
//! assert_eq!(store.rollback()?, "v1");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! - [`checkpoint`]: reading a checkpoint directory (safetensors, single or
//!   sharded, and other files) and checking its headers.
//! - [`publish`](mod@publish): hashing it into a manifest.
//! - [`delta`]: what changed between two manifests, chunk by chunk.
//! - [`pack`]: first-fit-decreasing bucket packing with alignment.
//! - [`plan`](mod@plan): the sealed swap plan, consumer ranks, wire sizes.
//! - [`verify`](mod@verify): every check of a plan before it runs.
//! - [`store`]: the versioned content-addressed store.
//! - [`cluster`]: the cluster processes: the coordinator's gRPC service,
//!   workers, the source, and the rollout driver.
//! - [`coordinator`]: the rollout coordinator's decisions without the
//!   network: plans, worker leases, persisted-before-acknowledged changes.
//! - [`coordstate`]: where a rollout coordinator keeps its state: an
//!   embedded redb file, or Redis with a leader lease for standbys.
//! - [`rollout`]: the state machine of a cluster rollout (submitted,
//!   transferring, precommitted, committed or aborted), idempotent calls.
//! - [`source`]: verified chunk bytes from a directory or a store.
//! - [`sparse`]: sparse deltas, `zstd(old XOR new)`, for changed chunks whose
//!   old bytes the receiver holds.
//! - [`dataplane`]: moving bucket bytes from one source to many receivers
//!   over TCP, as a verified, pipelined, resumable chain broadcast.
//! - [`wire`]: the wire form of buckets (raw or sparse records per item).
//! - [`hash`]: the chunk hash functions.
//! - [`synth`]: generated checkpoints for demos, benchmarks and tests.
//! - [`failpoint`]: crash injection for the store's tests.

pub mod checkpoint;
pub mod cluster;
pub mod coordinator;
pub mod coordstate;
pub mod dataplane;
pub mod delta;
mod error;
pub mod failpoint;
pub mod hash;
pub mod pack;
pub mod plan;
pub mod publish;
pub mod rollout;
pub mod source;
pub mod sparse;
pub mod store;
pub mod synth;
pub mod verify;
pub mod wire;

pub use checkpoint::{Checkpoint, CheckpointFile, INDEX_FILE};
pub use error::{HotweightsError, Result};
pub use hash::hash_hex;
pub use plan::{PlanOptions, Planned, TpGroups};
pub use publish::{DEFAULT_CHUNK_BYTES, PublishOptions, publish, publish_checkpoint};
pub use store::{ApplySource, Store};
pub use verify::{VerifyOptions, verify};
