//! stratacache: the tiered artifact store of BStack.
//!
//! KV-cache chunks and weight chunks outgrow GPU memory and live in CPU
//! memory, CXL/DAX memory, local SSD or a remote store. This crate puts them
//! behind one API, and executes the bcache planner's `CachePlan`s on them.
//!
//! Read it bottom up:
//!
//! - [`key`]: [`ArtifactKey`], the typed key of every stored object, with a
//!   canonical binary encoding under which two different keys (two kinds,
//!   two tensor-parallel ranks, two adapters) can never collide.
//! - [`tier`]: the [`Tier`] trait every tier implements, with [`Meta`] and
//!   [`Object`] (metadata and shared, reference-counted bytes);
//!   [`record`]: the self-checking record format of the tiers that keep
//!   bytes outside the process.
//! - The tiers: [`memory`] ([`MemoryTier`], a sharded byte-bounded LRU that
//!   never evicts a pinned or borrowed object), [`mmap`] ([`MmapTier`], a
//!   mapped region of a file or DAX device whose index is the region
//!   itself), [`disk`] ([`DiskTier`], segment files with an index snapshot,
//!   recovered after a crash by a checked scan), [`redis`] ([`RedisTier`],
//!   one self-checking record per object on a Redis server) and [`remote`]
//!   ([`RemoteTier`], a store served by [`server`] to many processes).
//! - [`chain`]: [`TierChain`], tiers in order with write-through and
//!   write-back links, where a dirty object is never dropped;
//!   [`engine`]: [`StorageEngine`], named tiers with `chain`, `exact` and
//!   `prefer` access and loads that say which keys failed and why.
//! - [`exec`]: [`execute`], the `CachePlan` executor.
//! - [`config`]: one YAML file describing a whole store.
//!
//! A store from its configuration, one object through it, and back:
//!
//! ```
//! use stratacache::config::Config;
//! use stratacache::{Access, ArtifactKey, CustomKey, Meta};
//!
//! let dir = tempfile::tempdir()?;
//! let yaml = format!(
//!     "tiers:\n  - {{ name: cpu, kind: memory, capacity: 64MiB, mode: write_back }}\n  \
//!      - {{ name: ssd, kind: disk, path: {} }}\n",
//!     dir.path().display()
//! );
//! let config = Config::from_yaml(&yaml, "example")?;
//! let engine = config.open()?;
//! let key = ArtifactKey::Custom(CustomKey { namespace: "docs".into(), name: "a".into() });
//! engine.store(&key, Meta::default(), b"hello", Access::Chain)?;
//! engine.close()?; // flushes the dirty copy down to the disk tier
//! drop(engine);
//!
//! // A new process: the memory tier starts empty, the disk tier has it.
//! let engine = config.open()?;
//! let loaded = engine.load(&key, Access::Chain)?;
//! assert_eq!(engine.tier_names()[loaded.tier], "ssd");
//! assert_eq!(&*loaded.object.bytes, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Keys of two tensor-parallel ranks never meet:
//!
//! ```
//! use stratacache::{ArtifactKey, KvChunkKey, Layers};
//!
//! let rank0 = ArtifactKey::KvChunk(KvChunkKey {
//!     model: "llama-3-8b".into(),
//!     adapter: None,
//!     kv_dtype: "bf16".into(),
//!     tp_size: 2,
//!     rank: 0,
//!     prefix_hash: 0x1234_u64.to_be_bytes().to_vec(),
//!     layers: Layers::One(12),
//! });
//! let mut rank1 = rank0.clone();
//! if let ArtifactKey::KvChunk(k) = &mut rank1 {
//!     k.rank = 1;
//! }
//! let (a, b) = (rank0.encode().unwrap(), rank1.encode().unwrap());
//! assert_ne!(a, b, "two ranks never share a key");
//! assert_eq!(ArtifactKey::decode(&a).unwrap(), rank0);
//! assert_eq!(rank0.to_string(), "kv/llama-3-8b/bf16/tp2.r0/0000000000001234/layer12");
//! ```

pub mod chain;
pub mod config;
pub mod disk;
pub mod engine;
pub mod error;
pub mod exec;
pub mod key;
pub mod memory;
pub mod mmap;
pub mod record;
pub mod redis;
pub mod remote;
pub mod server;
mod sync;
pub mod tier;

pub use chain::{ChainStats, FlushPolicy, Link, LinkMode, Lookup, TierChain};
pub use disk::{DiskOptions, DiskTier};
pub use engine::{Access, EngineStats, LoadBatch, LoadFailure, Loaded, StorageEngine};
pub use error::{Error, Result};
pub use exec::{
    ExecOptions, ExecReport, KeySpace, OpReport, OpStatus, PageHit, execute, execute_with,
};
pub use key::{ArtifactKey, CustomKey, KvChunkKey, Layers, ParamChunkKey};
pub use memory::MemoryTier;
pub use mmap::{MmapOptions, MmapTier};
pub use redis::{RedisOptions, RedisTier};
pub use remote::{RemoteOptions, RemoteTier};
pub use server::{Listener, ServeOptions, Server, ServerHandle, ServerStats, serve};
pub use tier::{Meta, Object, Tier, TierStats, checksum, shared_bytes};
