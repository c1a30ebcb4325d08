//! The interface every tier implements, and what it stores with an object.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{ArtifactKey, Result};

/// What is known about a stored object besides its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Element type of the payload, e.g. `bf16`; empty when not a tensor.
    pub dtype: String,
    /// Shape of the payload; empty when not a tensor.
    pub shape: Vec<u64>,
    /// How the payload is encoded, e.g. `raw`, `zstd`; empty is `raw`.
    pub codec: String,
    /// Payload bytes.
    pub length: u64,
    /// When the object was stored, ns since the Unix epoch.
    pub created_ns: u64,
    /// [`checksum`] of the payload. Tiers that keep bytes outside process
    /// memory (mmap, disk, Redis) compute it on `put` and check it on every
    /// `get`; 0 means not computed yet.
    pub checksum: u64,
}

/// The checksum of a payload: XXH3-64. Fast enough (tens of GB/s on one
/// core) that persistent tiers verify every read; it detects corruption
/// (flipped bits, torn writes), not tampering.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// An object as a tier returns it: metadata and reference-counted bytes
/// (the tier keeps its copy; holding this one borrows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The metadata.
    pub meta: Meta,
    /// The payload.
    pub bytes: Arc<[u8]>,
}

/// Counters of one tier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierStats {
    /// Objects held.
    pub objects: u64,
    /// Payload bytes held.
    pub bytes: u64,
    /// Payload bytes the tier may hold.
    pub capacity_bytes: u64,
    /// Reads that found their key.
    pub hits: u64,
    /// Reads that did not.
    pub misses: u64,
    /// Objects evicted to make room.
    pub evictions: u64,
}

/// One storage tier: memory, mmap/DAX, disk or remote.
///
/// Implementations are safe to share between threads; every method takes
/// `&self`. A failed call leaves the tier as it was.
pub trait Tier: Send + Sync {
    /// A short name for reports, e.g. `memory`.
    fn name(&self) -> &str;

    /// The object stored under `key`, or `None`.
    fn get(&self, key: &ArtifactKey) -> Result<Option<Object>>;

    /// Stores `bytes` under `key`, replacing what was there. May evict other
    /// objects to make room; fails (storing nothing) when it cannot.
    fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> Result<()>;

    /// Stores a shared buffer under `key`. A tier that keeps objects in
    /// process memory adopts a buffer that no one else holds instead of
    /// copying it (the memory tier does); the others store it as
    /// [`Tier::put`] does. Moving an
    /// object between tiers goes through here, so an object read from one
    /// tier lands in memory without a second copy.
    fn put_shared(&self, key: &ArtifactKey, meta: Meta, bytes: Arc<[u8]>) -> Result<()> {
        self.put(key, meta, &bytes)
    }

    /// Whether `key` is stored.
    fn contains(&self, key: &ArtifactKey) -> Result<bool>;

    /// Removes `key`; says whether it was there.
    fn delete(&self, key: &ArtifactKey) -> Result<bool>;

    /// The tier's counters now.
    fn stats(&self) -> TierStats;

    /// Every stored key with its metadata, in no particular order (for
    /// `strata ls`; it walks the whole tier).
    fn list(&self) -> Result<Vec<(ArtifactKey, Meta)>>;

    /// Makes everything stored so far durable (written and synced, for
    /// tiers that persist). Tiers in process memory have nothing to do.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Whether [`Tier::pin`] works on this tier. A write-back link needs it:
    /// a dirty object stays pinned until it has been flushed below.
    fn can_pin(&self) -> bool {
        false
    }

    /// Pins `key`: it is not evicted until as many [`Tier::unpin`]s. Says
    /// whether the key is stored (always `false` where pinning is not
    /// supported).
    fn pin(&self, key: &ArtifactKey) -> Result<bool> {
        let _ = key;
        Ok(false)
    }

    /// Undoes one [`Tier::pin`]. Says whether the key is stored.
    fn unpin(&self, key: &ArtifactKey) -> Result<bool> {
        let _ = key;
        Ok(false)
    }

    /// [`Tier::get`] for many keys, in order.
    fn get_many(&self, keys: &[ArtifactKey]) -> Vec<Result<Option<Object>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }

    /// [`Tier::put`] for many objects, in order; each result says how its
    /// object fared.
    fn put_many(&self, items: &[(ArtifactKey, Meta, &[u8])]) -> Vec<Result<()>> {
        items
            .iter()
            .map(|(k, m, b)| self.put(k, m.clone(), b))
            .collect()
    }
}

/// A new shared buffer of `len` bytes, zeroed, then filled by `fill` (a
/// file read, a copy out of a mapping).
///
/// Tiers that read into memory use it so that a read lands directly in the
/// buffer the caller receives: building an `Arc<[u8]>` from a `Vec` would
/// copy every byte once more.
pub fn shared_bytes<E>(
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::result::Result<(), E>,
) -> std::result::Result<Arc<[u8]>, E> {
    let mut buf = Arc::<[u8]>::new_uninit_slice(len);
    let filled = match Arc::get_mut(&mut buf) {
        Some(slots) => {
            for slot in slots.iter_mut() {
                slot.write(0);
            }
            #[allow(unsafe_code)]
            // SAFETY: every element was initialised just above, and
            // `MaybeUninit<u8>` has the layout of `u8`.
            let bytes = unsafe { &mut *(std::ptr::from_mut(slots) as *mut [u8]) };
            fill(bytes)
        }
        // A fresh Arc has no other owner; were it otherwise, fall back to
        // a copy rather than write through a shared buffer.
        None => {
            let mut v = vec![0u8; len];
            fill(&mut v)?;
            return Ok(Arc::from(v));
        }
    };
    filled?;
    #[allow(unsafe_code)]
    // SAFETY: every element was initialised above.
    Ok(unsafe { buf.assume_init() })
}

/// Reads `len` bytes of `file` at `offset` into a new shared buffer, in
/// pieces of `piece` bytes, handing each piece to `each` as soon as it has
/// landed (to hash it while it is still in cache).
///
/// Unlike [`shared_bytes`], the buffer is not zeroed first: the reads
/// write every byte, and a `get` of a large object then costs the read
/// and nothing more. A file shorter than asked fails with
/// [`std::io::ErrorKind::UnexpectedEof`].
pub fn pread_shared(
    file: &std::fs::File,
    offset: u64,
    len: usize,
    piece: usize,
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<Arc<[u8]>> {
    let mut buf = Arc::<[u8]>::new_uninit_slice(len);
    let Some(slots) = Arc::get_mut(&mut buf) else {
        // A fresh Arc has no other owner; never write through a shared one.
        return Err(std::io::Error::other("a fresh buffer was shared"));
    };
    let mut at = offset;
    for chunk in slots.chunks_mut(piece.max(1)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let (filled, unfilled) = rustix::io::pread(file, rest, at)?;
            if filled.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            each(filled);
            at += filled.len() as u64;
            rest = unfilled;
        }
    }
    #[allow(unsafe_code)]
    // SAFETY: the loop above ends only once `pread` has reported every
    // byte of every chunk as written (initialised).
    Ok(unsafe { buf.assume_init() })
}
