//! The memory tier: a sharded, byte-bounded LRU cache in process memory.
//!
//! Keys are spread over shards by hash, each shard behind its own lock, so
//! threads working on different keys rarely wait for each other. Each shard
//! keeps its objects in a slab with an intrusive doubly linked list in
//! recency order: a hit moves its entry to the front and eviction takes from
//! the back, both O(1).
//!
//! Two kinds of object are never evicted: a *pinned* one ([`MemoryTier::pin`],
//! for data an engine is about to use) and a *borrowed* one (an [`Object`]
//! returned by `get` is still held somewhere: its bytes are shared, not
//! copied, and must stay valid). Eviction walks past them. When nothing can
//! be evicted, `put` fails with [`Error::Full`] and changes nothing; it
//! never aborts and never drops what it cannot drop.
//!
//! Buffers are recycled. KV-cache chunks of one model all have one size, so
//! the buffer of an evicted, deleted or replaced object (when no one else
//! holds it) is kept in a small per-shard pool (at most an eighth of the
//! shard's capacity) and the next `put` of the same size copies into it:
//! a put then costs one `memcpy`, without an allocation whose fresh pages
//! the kernel would have to fault in and zero first. [`Tier::put_shared`]
//! adopts a buffer that no one else holds (a page just read from another
//! tier) and copies nothing.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sync::lock;
use crate::tier::{Meta, Object, Tier, TierStats};
use crate::{ArtifactKey, Error, Result};

const NONE: u32 = u32::MAX;

/// The memory tier. See the module documentation.
#[derive(Debug)]
pub struct MemoryTier {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    key: Arc<[u8]>,
    object: Object,
    pins: u32,
    prev: u32,
    next: u32,
}

#[derive(Debug, Default)]
struct Shard {
    index: HashMap<Arc<[u8]>, u32>,
    slab: Vec<Option<Entry>>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next victim.
    tail: u32,
    bytes: u64,
    capacity: u64,
    /// Recycled buffers by length, owned by no one else.
    spare: HashMap<usize, Vec<Arc<[u8]>>>,
    spare_bytes: u64,
}

impl MemoryTier {
    /// A tier holding at most `capacity_bytes` of payload, in `shards`
    /// shards (at least 1) of equal share. An object larger than one
    /// shard's share cannot be stored.
    pub fn new(capacity_bytes: u64, shards: usize) -> MemoryTier {
        let n = shards.max(1);
        let share = capacity_bytes / n as u64;
        MemoryTier {
            shards: (0..n)
                .map(|_| {
                    Mutex::new(Shard {
                        head: NONE,
                        tail: NONE,
                        capacity: share,
                        ..Shard::default()
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            capacity: share * n as u64,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, encoded: &[u8]) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(encoded) % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }

    /// Stores `bytes` (already this tier's own buffer) under `encoded`.
    fn insert(
        &self,
        key: &ArtifactKey,
        encoded: Vec<u8>,
        meta: Meta,
        bytes: Arc<[u8]>,
    ) -> Result<()> {
        let len = bytes.len() as u64;
        let object = Object {
            meta: Meta {
                length: len,
                ..meta
            },
            bytes,
        };
        let mut shard = self.shard(&encoded);
        if len > shard.capacity {
            return Err(Error::Full {
                tier: "memory".into(),
                key: key.to_string(),
                message: format!(
                    "{len} bytes exceed a shard's share of the capacity ({} bytes)",
                    shard.capacity
                ),
            });
        }
        let old = shard.index.get(encoded.as_slice()).copied();
        let old_len = old
            .and_then(|s| shard.entry(s))
            .map_or(0, |e| e.object.bytes.len() as u64);
        let need = (shard.bytes - old_len + len).saturating_sub(shard.capacity);
        let Some(victims) = shard.victims(need, old) else {
            return Err(Error::Full {
                tier: "memory".into(),
                key: key.to_string(),
                message: format!(
                    "{need} more bytes needed and every other object is pinned or borrowed"
                ),
            });
        };
        for v in victims {
            if let Some(e) = shard.remove(v) {
                shard.recycle(e.object.bytes);
            }
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        let pins = match old.and_then(|s| shard.remove(s)) {
            Some(e) => {
                shard.recycle(e.object.bytes);
                e.pins
            }
            None => 0,
        };
        shard.insert(Entry {
            key: encoded.into(),
            object,
            pins,
            prev: NONE,
            next: NONE,
        });
        Ok(())
    }

    fn pin_by(&self, key: &ArtifactKey, delta: i32) -> Result<bool> {
        let encoded = key.encode()?;
        let mut shard = self.shard(&encoded);
        let Some(&slot) = shard.index.get(encoded.as_slice()) else {
            return Ok(false);
        };
        if let Some(e) = shard.entry_mut(slot) {
            e.pins = e.pins.saturating_add_signed(delta);
        }
        Ok(true)
    }
}

impl Shard {
    /// Keeps `bytes` for a later put of the same size, if no one else
    /// holds it and the pool has room (an eighth of the shard's capacity).
    fn recycle(&mut self, mut bytes: Arc<[u8]>) {
        let len = bytes.len() as u64;
        if len == 0
            || Arc::get_mut(&mut bytes).is_none()
            || self.spare_bytes + len > self.capacity / 8
        {
            return;
        }
        self.spare_bytes += len;
        self.spare.entry(bytes.len()).or_default().push(bytes);
    }

    fn take_spare(&mut self, len: usize) -> Option<Arc<[u8]>> {
        let buffers = self.spare.get_mut(&len)?;
        let b = buffers.pop()?;
        if buffers.is_empty() {
            self.spare.remove(&len);
        }
        self.spare_bytes -= len as u64;
        Some(b)
    }

    fn entry(&self, slot: u32) -> Option<&Entry> {
        self.slab.get(slot as usize)?.as_ref()
    }

    fn entry_mut(&mut self, slot: u32) -> Option<&mut Entry> {
        self.slab.get_mut(slot as usize)?.as_mut()
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = match self.entry(slot) {
            Some(e) => (e.prev, e.next),
            None => return,
        };
        match self.entry_mut(prev) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.entry_mut(next) {
            Some(n) => n.prev = prev,
            None => self.tail = prev,
        }
    }

    fn push_front(&mut self, slot: u32) {
        let head = self.head;
        if let Some(e) = self.entry_mut(slot) {
            e.prev = NONE;
            e.next = head;
        }
        match self.entry_mut(head) {
            Some(h) => h.prev = slot,
            None => self.tail = slot,
        }
        self.head = slot;
    }

    fn remove(&mut self, slot: u32) -> Option<Entry> {
        self.unlink(slot);
        let entry = self.slab.get_mut(slot as usize)?.take()?;
        self.index.remove(&entry.key);
        self.free.push(slot);
        self.bytes -= entry.object.bytes.len() as u64;
        Some(entry)
    }

    fn insert(&mut self, entry: Entry) {
        let len = entry.object.bytes.len() as u64;
        let key = entry.key.clone();
        let slot = match self.free.pop() {
            Some(s) => {
                self.slab[s as usize] = Some(entry);
                s
            }
            None => {
                self.slab.push(Some(entry));
                (self.slab.len() - 1) as u32
            }
        };
        self.index.insert(key, slot);
        self.bytes += len;
        self.push_front(slot);
    }

    /// Victims, least recent first, that free `need` bytes, skipping
    /// pinned and borrowed objects and `keep`; `None` when they cannot.
    fn victims(&self, need: u64, keep: Option<u32>) -> Option<Vec<u32>> {
        let mut out = Vec::new();
        let mut freed = 0;
        let mut at = self.tail;
        while freed < need {
            let e = self.entry(at)?;
            let borrowed = Arc::strong_count(&e.object.bytes) > 1;
            if e.pins == 0 && !borrowed && Some(at) != keep {
                freed += e.object.bytes.len() as u64;
                out.push(at);
            }
            at = e.prev;
        }
        Some(out)
    }
}

impl Tier for MemoryTier {
    fn name(&self) -> &str {
        "memory"
    }

    fn get(&self, key: &ArtifactKey) -> Result<Option<Object>> {
        let encoded = key.encode()?;
        let mut shard = self.shard(&encoded);
        let Some(&slot) = shard.index.get(encoded.as_slice()) else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        shard.unlink(slot);
        shard.push_front(slot);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(shard.entry(slot).map(|e| e.object.clone()))
    }

    fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> Result<()> {
        let encoded = key.encode()?;
        let spare = self.shard(&encoded).take_spare(bytes.len());
        // Copy before locking: the copy is the slow part.
        let buffer = match spare {
            Some(mut b) => match Arc::get_mut(&mut b) {
                Some(slot) => {
                    slot.copy_from_slice(bytes);
                    b
                }
                None => Arc::from(bytes),
            },
            None => Arc::from(bytes),
        };
        self.insert(key, encoded, meta, buffer)
    }

    /// Adopts `bytes` when no one else holds them; otherwise copies, as
    /// `put` does: a buffer shared with another tier would count as
    /// borrowed in both, and neither could ever evict it.
    fn put_shared(&self, key: &ArtifactKey, meta: Meta, mut bytes: Arc<[u8]>) -> Result<()> {
        if Arc::get_mut(&mut bytes).is_none() {
            return self.put(key, meta, &bytes);
        }
        let encoded = key.encode()?;
        self.insert(key, encoded, meta, bytes)
    }

    fn contains(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        Ok(self.shard(&encoded).index.contains_key(encoded.as_slice()))
    }

    fn delete(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        let mut shard = self.shard(&encoded);
        let Some(&slot) = shard.index.get(encoded.as_slice()) else {
            return Ok(false);
        };
        match shard.remove(slot) {
            Some(e) => {
                shard.recycle(e.object.bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn stats(&self) -> TierStats {
        let mut stats = TierStats {
            capacity_bytes: self.capacity,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            ..TierStats::default()
        };
        for shard in self.shards.iter() {
            let shard = lock(shard);
            stats.objects += shard.index.len() as u64;
            stats.bytes += shard.bytes;
        }
        stats
    }

    fn list(&self) -> Result<Vec<(ArtifactKey, Meta)>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for e in shard.slab.iter().flatten() {
                out.push((ArtifactKey::decode(&e.key)?, e.object.meta.clone()));
            }
        }
        Ok(out)
    }

    fn can_pin(&self) -> bool {
        true
    }

    /// Pins `key`: it is not evicted until as many `unpin`s; a `put` that
    /// replaces it keeps its pins.
    fn pin(&self, key: &ArtifactKey) -> Result<bool> {
        self.pin_by(key, 1)
    }

    fn unpin(&self, key: &ArtifactKey) -> Result<bool> {
        self.pin_by(key, -1)
    }
}
