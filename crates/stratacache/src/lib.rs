//! stratacache: the tiered artifact store of BStack.
//!
//! KV-cache chunks and weight chunks outgrow GPU memory and live in CPU
//! memory, CXL/DAX memory, local SSD or a remote store. This crate puts them
//! behind one API. It is being built in steps; what exists today:
//!
//! - [`key`]: [`ArtifactKey`], the typed key of every stored object, with a
//!   canonical binary encoding under which two different keys (two kinds,
//!   two tensor-parallel ranks, two adapters) can never collide.
//!
//! - [`tier`]: the [`Tier`] trait every tier implements, with [`Meta`] and
//!   [`Object`] (metadata and shared, reference-counted bytes).
//! - [`memory`]: [`MemoryTier`], a sharded byte-bounded LRU that never evicts
//!   a pinned or borrowed object.
//! - [`disk`]: [`DiskTier`], append-only segment files with an index
//!   snapshot, recovered after a crash by a checked scan.
//! - [`mmap`]: [`MmapTier`], objects in a mapped region of a file or a DAX
//!   device, with an allocator, eviction and an index rebuilt from the
//!   region itself after a restart or a crash.
//! - [`remote`] and [`server`]: one store shared by many processes (ranks,
//!   a scheduler and its workers): [`Server`] serves any tier over TCP or a
//!   Unix socket, and [`RemoteTier`] is a tier that talks to it.
//! - [`redis`]: [`RedisTier`], the remote tier on a Redis server: one
//!   self-checking record per object, pipelined batches, pooled
//!   connections.
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
