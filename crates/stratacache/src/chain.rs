//! [`TierChain`]: tiers in order, fastest first, each link write-through or
//! write-back, with read-through and optional promotion.
//!
//! # Writes
//!
//! A `put` stores the object in the first tier, then follows the links:
//! below a **write-through** link the object is also stored in the next tier
//! before `put` returns; at a **write-back** link it stops, the object is
//! *dirty* there, and the background flusher copies it to the next tier
//! later (where the next link's mode applies in turn).
//!
//! # A dirty object is never dropped
//!
//! The stores this crate replaces lost data in three ways, and each is
//! closed here:
//!
//! - *Evicted before its flush.* A dirty object is pinned in its tier (a
//!   write-back tier must support [`Tier::pin`]; the chain refuses one that
//!   does not), so the tier's eviction walks past it. When the tier is full
//!   of dirty objects, `put` flushes one of the oldest itself (evicting a
//!   dirty object means flushing it first; it tries up to four whose retry
//!   time has come), and if that cannot make room, it stores the object in
//!   the next tier directly rather than fail or drop.
//! - *One failed flush stops the flusher.* A failed flush is counted, its
//!   error kept for [`ChainStats::last_flush_error`], and the object retried
//!   with exponential backoff (capped); the flusher itself never exits on an
//!   error.
//! - *Acknowledged then lost in a race.* Writes to one key are ordered by a
//!   per-key lock (striped over [`STRIPES`] mutexes), taken by `put`,
//!   `delete`, a flush of that key and a promotion, so a flush can never
//!   write an older version below a newer one, and a promotion can never put
//!   a stale copy above a newer one.
//!
//! # Locking
//!
//! The per-key stripe is held across that key's own tier calls (that is
//! what orders them). The one time another key's I/O happens under it: a
//! put that finds its write-back tier full flushes a few other keys
//! itself; it only *tries* their stripes, so two puts never wait for each
//! other. The dirty table's shards are held for table updates and for
//! pin / unpin: an index operation in every local tier, a round trip when
//! the write-back tier is a remote one (a served store), during which that
//! sixteenth of the dirty table waits.
//!
//! A write moves its stripe's *epoch* when it is done, still under the
//! stripe; a read that finds the key below copies it up only if the epoch
//! has not moved since the read began, and never when a tier above failed
//! (it may hold a newer copy).
//!
//! # Reads
//!
//! `get` asks each tier in order and returns the first hit. A tier that
//! fails (an I/O error, a corrupt object) is skipped and its reason kept: a
//! miss everywhere reports every reason ([`Lookup::Missing`]), so an engine
//! knows why a block must be recomputed. A hit below a tier whose link has
//! `promote` set is copied up into it (clean: promotion never makes an
//! object dirty).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sync::lock;
use crate::tier::{Meta, Object, Tier};
use crate::{ArtifactKey, Error, Result};

/// Per-key lock stripes: two keys share a stripe with probability 1/STRIPES.
pub const STRIPES: usize = 1024;

const DIRTY_SHARDS: usize = 16;

/// Dirty objects a put into a full write-back tier tries to flush itself
/// before it stores below instead.
const RELIEVE_TRIES: usize = 4;

/// How a write reaches the tier below a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkMode {
    /// Stored below before `put` returns.
    WriteThrough,
    /// Stored below later, by the flusher; dirty (and pinned) until then.
    WriteBack,
}

/// One tier of a chain and how writes leave it.
#[derive(Clone)]
pub struct Link {
    /// The tier.
    pub tier: Arc<dyn Tier>,
    /// How writes reach the next tier (ignored for the last one).
    pub mode: LinkMode,
    /// Whether hits in lower tiers are copied into this one.
    pub promote: bool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("tier", &self.tier.name())
            .field("mode", &self.mode)
            .field("promote", &self.promote)
            .finish()
    }
}

/// How the flusher retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushPolicy {
    /// Flusher threads (at least 1 when a link is write-back).
    pub threads: usize,
    /// Wait before the first retry of a failed flush; doubles per failure.
    pub retry_initial: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
    /// How often an idle flusher looks for work it was not woken for.
    pub idle_poll: Duration,
}

impl Default for FlushPolicy {
    fn default() -> FlushPolicy {
        FlushPolicy {
            threads: 1,
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_secs(5),
            idle_poll: Duration::from_millis(50),
        }
    }
}

/// The result of a chain lookup.
#[derive(Debug)]
pub enum Lookup {
    /// Found in tier `tier` (its index in the chain).
    Found {
        /// The object.
        object: Object,
        /// Index of the tier that held it.
        tier: usize,
    },
    /// Found nowhere. `reasons` lists the tiers that failed, and why;
    /// empty when every tier simply did not hold the key.
    Missing {
        /// `(tier name, error)` for each tier whose lookup failed.
        reasons: Vec<(String, Error)>,
    },
}

/// Counters of a chain's write-back machinery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStats {
    /// Objects dirty now (waiting to be flushed).
    pub dirty: u64,
    /// Dirty objects flushed to the tier below.
    pub flushed: u64,
    /// Flush attempts that failed (each is retried).
    pub flush_failures: u64,
    /// Flushes made by `put` to make room in a full write-back tier.
    pub pressure_flushes: u64,
    /// Puts stored below a full write-back tier instead of in it.
    pub bypassed: u64,
    /// Hits copied into a higher tier.
    pub promotions: u64,
    /// Dirty objects that vanished from their tier before their flush.
    /// Every path that could cause it is closed; a non-zero value is a bug.
    pub lost: u64,
    /// The last flush error, if any flush ever failed.
    pub last_flush_error: Option<String>,
}

/// Ordered tiers with write-through / write-back links. See the module
/// documentation.
pub struct TierChain {
    inner: Arc<Inner>,
    flushers: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for TierChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierChain")
            .field("links", &self.inner.links)
            .finish_non_exhaustive()
    }
}

struct Inner {
    links: Vec<Link>,
    policy: FlushPolicy,
    stripes: Box<[Mutex<()>]>,
    /// Bumped by every write or delete of a key in the stripe, under the
    /// stripe's lock: a promotion whose stripe moved lost a race.
    epochs: Box<[AtomicU64]>,
    hasher: RandomState,
    dirty: Box<[Mutex<DirtyShard>]>,
    /// Wakes flushers: new dirty objects, or stop.
    wake: Condvar,
    wake_lock: Mutex<()>,
    stop: AtomicBool,
    generation: AtomicU64,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    flushed: AtomicU64,
    flush_failures: AtomicU64,
    pressure_flushes: AtomicU64,
    bypassed: AtomicU64,
    promotions: AtomicU64,
    lost: AtomicU64,
    last_flush_error: Mutex<Option<String>>,
}

/// Dirty objects of one shard of the key space, across all write-back links.
#[derive(Default)]
struct DirtyShard {
    entries: HashMap<(usize, Vec<u8>), Dirty>,
    /// Oldest first; may hold entries already flushed (skipped when popped).
    order: VecDeque<(usize, Vec<u8>)>,
}

struct Dirty {
    key: ArtifactKey,
    generation: u64,
    failures: u32,
    next_try: Instant,
    /// Taken by a flusher thread, so that the others pass it by.
    claimed: bool,
}

/// Moves a stripe's epoch when dropped; see [`Inner::writing`].
struct EpochBump<'a>(&'a AtomicU64);

impl Drop for EpochBump<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// What flushing one dirty entry did.
enum Flushed {
    Done,
    /// A newer write, or a delete, came in meanwhile: nothing to settle.
    Superseded,
    Failed(Error),
    /// The key's stripe was busy (only when asked not to wait).
    Busy,
}

impl TierChain {
    /// A chain of `links`, fastest first, with flusher threads started when
    /// any link is write-back. Fails when there are no links, or when a
    /// write-back link is last or its tier cannot pin.
    pub fn new(links: Vec<Link>, policy: FlushPolicy) -> Result<TierChain> {
        if links.is_empty() {
            return Err(Error::Config {
                field: "tiers".into(),
                message: "a chain needs at least one tier".into(),
            });
        }
        for (i, link) in links.iter().enumerate() {
            if link.mode != LinkMode::WriteBack {
                continue;
            }
            if i + 1 == links.len() {
                return Err(Error::Config {
                    field: format!("tiers[{i}].mode"),
                    message: format!(
                        "the last tier ({}) has no tier below to write back to; use write_through",
                        link.tier.name()
                    ),
                });
            }
            if !link.tier.can_pin() {
                return Err(Error::Config {
                    field: format!("tiers[{i}].mode"),
                    message: format!(
                        "the {} tier cannot pin objects, so dirty objects could be evicted \
                         before their flush; use write_through",
                        link.tier.name()
                    ),
                });
            }
        }
        let write_back = links.iter().any(|l| l.mode == LinkMode::WriteBack);
        let inner = Arc::new(Inner {
            links,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            epochs: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            dirty: (0..DIRTY_SHARDS)
                .map(|_| Mutex::new(DirtyShard::default()))
                .collect(),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            counters: Counters::default(),
            policy,
        });
        let chain = TierChain {
            inner,
            flushers: Mutex::new(Vec::new()),
        };
        if write_back {
            for n in 0..chain.inner.policy.threads.max(1) {
                let inner = chain.inner.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("strata-flush-{n}"))
                    .spawn(move || inner.flusher_loop());
                match spawned {
                    Ok(handle) => lock(&chain.flushers).push(handle),
                    // Dropping `chain` stops the flushers already started.
                    Err(e) => {
                        return Err(Error::Io {
                            tier: "chain".into(),
                            op: "starting the flusher thread",
                            path: String::new(),
                            source: e,
                        });
                    }
                }
            }
        }
        Ok(chain)
    }

    /// The links, in order.
    pub fn links(&self) -> &[Link] {
        &self.inner.links
    }

    /// Stores an object through the chain (see the module documentation).
    /// When it returns `Ok`, the object is loadable until deleted.
    pub fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> Result<()> {
        let encoded = key.encode()?;
        let _stripe = self.inner.lock_stripe(&encoded);
        let _write = self.inner.writing(&encoded);
        self.inner.put_from(0, key, &encoded, meta, bytes)
    }

    /// Stores an object in tier `tier` only, and removes every other copy
    /// of the key (older ones, which a chain read must never return). In a
    /// write-back tier the object is dirty, and reaches the tiers below
    /// through the flusher like any other.
    pub fn put_exact(
        &self,
        tier: usize,
        key: &ArtifactKey,
        meta: Meta,
        bytes: &[u8],
    ) -> Result<()> {
        let link = self.inner.link(tier)?;
        let encoded = key.encode()?;
        let _stripe = self.inner.lock_stripe(&encoded);
        let _write = self.inner.writing(&encoded);
        link.tier.put(key, meta.clone(), bytes)?;
        let below = tier + 1 < self.inner.links.len();
        if link.mode == LinkMode::WriteBack && below {
            if !self.inner.mark_dirty(tier, key, &encoded)? {
                // Evicted already by another put: store it below instead.
                self.inner.put_from(tier + 1, key, &encoded, meta, bytes)?;
                return Ok(());
            }
            for above in 0..tier {
                self.inner.drop_copy(above, key, &encoded)?;
            }
            return Ok(());
        }
        for other in (0..self.inner.links.len()).filter(|&t| t != tier) {
            self.inner.drop_copy(other, key, &encoded)?;
        }
        Ok(())
    }

    /// Looks `key` up tier by tier, promoting as configured.
    pub fn get(&self, key: &ArtifactKey) -> Result<Lookup> {
        let encoded = key.encode()?;
        let epoch = self.inner.epoch(&encoded);
        let mut reasons = Vec::new();
        for (i, link) in self.inner.links.iter().enumerate() {
            match link.tier.get(key) {
                Ok(Some(object)) => {
                    // A tier above that failed may hold a newer copy:
                    // never promote over it.
                    if i > 0 && reasons.is_empty() {
                        self.inner.promote(i, key, &encoded, &object, epoch);
                    }
                    return Ok(Lookup::Found { object, tier: i });
                }
                Ok(None) => {}
                Err(e) => reasons.push((link.tier.name().to_owned(), e)),
            }
        }
        Ok(Lookup::Missing { reasons })
    }

    /// Looks `key` up in tier `tier` only.
    pub fn get_exact(&self, tier: usize, key: &ArtifactKey) -> Result<Option<Object>> {
        self.inner.link(tier)?.tier.get(key)
    }

    /// Whether any tier holds `key`.
    pub fn contains(&self, key: &ArtifactKey) -> Result<bool> {
        for link in &self.inner.links {
            if link.tier.contains(key)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Copies `key` from tier `from` into tier `to`; returns the bytes
    /// `to` holds after, or `None` when `from` does not hold the key. Plans
    /// move pages this way.
    ///
    /// The copy never puts an older version over a newer one: copying up
    /// (`to` above `from`), it takes the key from the highest tier between
    /// them that holds it (a tier nearer the top holds the newer version);
    /// when `to` holds the key dirty, `to` already has the newest version
    /// and nothing is copied.
    pub fn copy(&self, key: &ArtifactKey, from: usize, to: usize) -> Result<Option<u64>> {
        self.inner.link(from)?;
        let dst = self.inner.link(to)?;
        let encoded = key.encode()?;
        let _stripe = self.inner.lock_stripe(&encoded);
        let _write = self.inner.writing(&encoded);
        if self.inner.is_dirty(to, &encoded) {
            return Ok(dst.tier.get(key)?.map(|o| o.bytes.len() as u64));
        }
        let mut src = from;
        if to < from {
            let mut nearest = None;
            for t in to + 1..=from {
                if self.inner.links[t].tier.contains(key)? {
                    nearest = Some(t);
                    break;
                }
            }
            match nearest {
                Some(t) => src = t,
                None => return Ok(None),
            }
        }
        let Some(object) = self.inner.links[src].tier.get(key)? else {
            return Ok(None);
        };
        let len = object.bytes.len() as u64;
        dst.tier.put_shared(key, object.meta, object.bytes)?;
        Ok(Some(len))
    }

    /// Removes `key` from tier `tier` only. A dirty object is flushed
    /// below first; if that fails it stays, and the error says why. Says
    /// whether the tier held the key.
    pub fn evict(&self, tier: usize, key: &ArtifactKey) -> Result<bool> {
        let link = self.inner.link(tier)?;
        let encoded = key.encode()?;
        let held = self.inner.stripe_of(&encoded);
        let _stripe = self.inner.lock_stripe(&encoded);
        let _write = self.inner.writing(&encoded);
        if self.inner.is_dirty(tier, &encoded)
            && let Flushed::Failed(e) = self.inner.flush_one(tier, key, Some(held))
        {
            return Err(e);
        }
        link.tier.delete(key)
    }

    /// Removes `key` from every tier (dirty or not); says whether any held it.
    pub fn delete(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        let _stripe = self.inner.lock_stripe(&encoded);
        let _write = self.inner.writing(&encoded);
        let mut found = false;
        for i in 0..self.inner.links.len() {
            found |= self.inner.drop_copy(i, key, &encoded)?;
        }
        Ok(found)
    }

    /// Flushes every dirty object now, then makes every tier durable
    /// ([`Tier::flush`]). Objects whose flush fails stay dirty (the flusher
    /// retries them); the error names how many and the first reason.
    pub fn flush(&self) -> Result<()> {
        // Dirty objects can cascade (write-back below write-back): repeat
        // until a pass finds nothing, bounded by the chain's depth.
        for _ in 0..self.inner.links.len() {
            let pending = self.inner.collect_dirty(None, false, usize::MAX, false);
            if pending.is_empty() {
                break;
            }
            let mut failures = Vec::new();
            for (link, key) in pending {
                if let Flushed::Failed(e) = self.inner.flush_one(link, &key, None) {
                    failures.push(e);
                }
            }
            if let Some(first) = failures.first() {
                return Err(Error::Flush {
                    failed: failures.len(),
                    first: first.to_string(),
                });
            }
        }
        for link in &self.inner.links {
            link.tier.flush()?;
        }
        Ok(())
    }

    /// The write-back counters now.
    pub fn stats(&self) -> ChainStats {
        let c = &self.inner.counters;
        ChainStats {
            dirty: self
                .inner
                .dirty
                .iter()
                .map(|s| lock(s).entries.len() as u64)
                .sum(),
            flushed: c.flushed.load(Ordering::Relaxed),
            flush_failures: c.flush_failures.load(Ordering::Relaxed),
            pressure_flushes: c.pressure_flushes.load(Ordering::Relaxed),
            bypassed: c.bypassed.load(Ordering::Relaxed),
            promotions: c.promotions.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            last_flush_error: lock(&c.last_flush_error).clone(),
        }
    }

    /// Stops the flusher threads after they finish what they are doing.
    /// Dirty objects stay dirty: call [`TierChain::flush`] first to write
    /// them below. Idempotent.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        {
            let _guard = lock(&self.inner.wake_lock);
            self.inner.wake.notify_all();
        }
        let handles = std::mem::take(&mut *lock(&self.flushers));
        for h in handles {
            // A flusher that panicked has nothing left to join; the chain's
            // state stays consistent (every update completes under its lock).
            let _ = h.join();
        }
    }
}

impl Drop for TierChain {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    fn link(&self, tier: usize) -> Result<&Link> {
        self.links.get(tier).ok_or_else(|| Error::Config {
            field: "tier".into(),
            message: format!(
                "tier index {tier} is out of range: the chain has {} tiers",
                self.links.len()
            ),
        })
    }

    fn stripe_of(&self, encoded: &[u8]) -> usize {
        (self.hasher.hash_one(encoded) % STRIPES as u64) as usize
    }

    fn lock_stripe(&self, encoded: &[u8]) -> MutexGuard<'_, ()> {
        lock(&self.stripes[self.stripe_of(encoded)])
    }

    fn epoch(&self, encoded: &[u8]) -> u64 {
        self.epochs[self.stripe_of(encoded)].load(Ordering::Acquire)
    }

    /// Marks a write of the key's stripe: the epoch moves when the guard
    /// drops, after the write (on every path out of it) and while the
    /// caller still holds the stripe. Moving it before the write would let
    /// a reader that started during the write see the new epoch with the
    /// old data, and promote the old data over the new.
    fn writing(&self, encoded: &[u8]) -> EpochBump<'_> {
        EpochBump(&self.epochs[self.stripe_of(encoded)])
    }

    fn is_dirty(&self, link: usize, encoded: &[u8]) -> bool {
        self.dirty_shard(encoded)
            .entries
            .contains_key(&(link, encoded.to_vec()))
    }

    fn dirty_shard(&self, encoded: &[u8]) -> MutexGuard<'_, DirtyShard> {
        // A different hash of the same key than the stripes', so the two
        // tables' collisions are independent.
        let h = self.hasher.hash_one((encoded, 0x5eed_u32));
        lock(&self.dirty[(h % DIRTY_SHARDS as u64) as usize])
    }

    /// Stores the object from tier `start` down, following the links. The
    /// caller holds the key's stripe.
    fn put_from(
        &self,
        start: usize,
        key: &ArtifactKey,
        encoded: &[u8],
        meta: Meta,
        bytes: &[u8],
    ) -> Result<()> {
        let mut i = start;
        while let Some(link) = self.links.get(i) {
            let last = i + 1 == self.links.len();
            match link.tier.put(key, meta.clone(), bytes) {
                Ok(()) => {}
                Err(e) if e.is_full() && link.mode == LinkMode::WriteBack => {
                    // Make room by flushing this tier's oldest dirty
                    // objects, then try once more; failing that, store
                    // below and drop the stale copy here.
                    if self.relieve(i, encoded) && link.tier.put(key, meta.clone(), bytes).is_ok() {
                        self.counters
                            .pressure_flushes
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.put_from(i + 1, key, encoded, meta, bytes)?;
                        self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
                        self.drop_copy(i, key, encoded)?;
                        return Ok(());
                    }
                }
                Err(e) if e.is_full() && !last => {
                    // A full write-through cache tier: the object goes on
                    // below; the older copy here must not be read again.
                    self.put_from(i + 1, key, encoded, meta, bytes)?;
                    self.drop_copy(i, key, encoded)?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            if last {
                return Ok(());
            }
            match link.mode {
                LinkMode::WriteThrough => i += 1,
                LinkMode::WriteBack => {
                    if self.mark_dirty(i, key, encoded)? {
                        return Ok(());
                    }
                    // Evicted between the put and the pin (another
                    // thread's put made room): store it below now.
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// Records `key` dirty in tier `link`, pinning it there once. Returns
    /// `false` when the tier no longer holds the key.
    fn mark_dirty(&self, link: usize, key: &ArtifactKey, encoded: &[u8]) -> Result<bool> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut shard = self.dirty_shard(encoded);
        let id = (link, encoded.to_vec());
        if let Some(d) = shard.entries.get_mut(&id) {
            d.generation = generation;
            d.failures = 0;
            d.next_try = Instant::now();
            return Ok(true);
        }
        if !self.links[link].tier.pin(key)? {
            return Ok(false);
        }
        shard.entries.insert(
            id.clone(),
            Dirty {
                key: key.clone(),
                generation,
                failures: 0,
                next_try: Instant::now(),
                claimed: false,
            },
        );
        shard.order.push_back(id);
        drop(shard);
        let _guard = lock(&self.wake_lock);
        self.wake.notify_one();
        Ok(true)
    }

    /// Removes `key` from tier `link`, settling its dirty entry there (the
    /// caller holds the key's stripe).
    fn drop_copy(&self, link: usize, key: &ArtifactKey, encoded: &[u8]) -> Result<bool> {
        {
            let mut shard = self.dirty_shard(encoded);
            let id = (link, encoded.to_vec());
            if shard.entries.contains_key(&id) {
                // Unpinned first: if that fails, the entry (and the pin
                // it accounts for) stays as it was.
                self.links[link].tier.unpin(key)?;
                shard.entries.remove(&id);
            }
        }
        self.links[link].tier.delete(key)
    }

    /// Flushes one of tier `link`'s oldest dirty objects to make room,
    /// trying at most [`RELIEVE_TRIES`] of those whose retry time has come;
    /// says whether one was flushed. Other keys' stripes are only tried, so
    /// two puts never wait for each other; `held_key` is the key whose
    /// stripe the caller holds.
    fn relieve(&self, link: usize, held_key: &[u8]) -> bool {
        let held = self.stripe_of(held_key);
        self.collect_dirty(Some(link), true, RELIEVE_TRIES, false)
            .into_iter()
            .any(|(l, key)| matches!(self.flush_one(l, &key, Some(held)), Flushed::Done))
    }

    /// Dirty entries (of link `only`, or of every link), oldest first per
    /// shard; with `ready_only`, only those whose retry time has come. With
    /// `claim` (the flusher threads), entries another flusher has claimed
    /// are passed by and the ones returned are claimed, until
    /// [`Inner::unclaim`].
    fn collect_dirty(
        &self,
        only: Option<usize>,
        ready_only: bool,
        max: usize,
        claim: bool,
    ) -> Vec<(usize, ArtifactKey)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for shard in self.dirty.iter() {
            let mut shard = lock(shard);
            let DirtyShard { entries, order } = &mut *shard;
            // Drop queue positions of entries already settled.
            order.retain(|id| entries.contains_key(id));
            for id in order.iter() {
                if out.len() >= max {
                    return out;
                }
                if let Some(d) = entries.get_mut(id)
                    && only.is_none_or(|l| l == id.0)
                    && (!ready_only || d.next_try <= now)
                    && !(claim && d.claimed)
                {
                    d.claimed |= claim;
                    out.push((id.0, d.key.clone()));
                }
            }
        }
        out
    }

    /// Releases a flusher's claim on an entry, if it is still dirty.
    fn unclaim(&self, link: usize, key: &ArtifactKey) {
        if let Ok(encoded) = key.encode()
            && let Some(d) = self
                .dirty_shard(&encoded)
                .entries
                .get_mut(&(link, encoded.clone()))
        {
            d.claimed = false;
        }
    }

    /// Flushes one dirty object to the tier below its link. `held` is the
    /// stripe the caller already holds (a put relieving pressure), in which
    /// case other stripes are only tried.
    fn flush_one(&self, link: usize, key: &ArtifactKey, held: Option<usize>) -> Flushed {
        let encoded = match key.encode() {
            Ok(e) => e,
            Err(e) => return Flushed::Failed(e),
        };
        let stripe = self.stripe_of(&encoded);
        let _guard = match held {
            Some(h) if h == stripe => None,
            Some(_) => match self.stripes[stripe].try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => return Flushed::Busy,
            },
            None => Some(lock(&self.stripes[stripe])),
        };
        let id = (link, encoded.clone());
        let generation = match self.dirty_shard(&encoded).entries.get(&id) {
            Some(d) => d.generation,
            None => return Flushed::Superseded,
        };
        let tier = &self.links[link].tier;
        let result = match tier.get(key) {
            Ok(Some(object)) => self.put_from(link + 1, key, &encoded, object.meta, &object.bytes),
            Ok(None) => {
                // Pinned objects are not evicted and deletes settle the
                // entry first, so this cannot happen; count it if it does.
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                let mut shard = self.dirty_shard(&encoded);
                shard.entries.remove(&id);
                return Flushed::Failed(Error::Corrupt {
                    tier: tier.name().to_owned(),
                    key: key.to_string(),
                    reason: "a dirty object vanished before its flush".into(),
                });
            }
            Err(e) => Err(e),
        };
        let mut shard = self.dirty_shard(&encoded);
        let result = match result {
            Ok(()) => match shard.entries.get(&id) {
                // The object is clean: it may be evicted again. Unpinned
                // before the entry goes, so a failed unpin leaves the
                // entry to account for the pin (and the flush is retried).
                Some(d) if d.generation == generation => tier.unpin(key).map(|_| ()),
                _ => return Flushed::Superseded,
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                shard.entries.remove(&id);
                self.counters.flushed.fetch_add(1, Ordering::Relaxed);
                Flushed::Done
            }
            Err(e) => {
                self.counters.flush_failures.fetch_add(1, Ordering::Relaxed);
                *lock(&self.counters.last_flush_error) = Some(format!("{key}: {e}"));
                if let Some(d) = shard.entries.get_mut(&id) {
                    d.failures = d.failures.saturating_add(1);
                    let factor = 1u32 << d.failures.min(16).saturating_sub(1);
                    let wait = self
                        .policy
                        .retry_initial
                        .saturating_mul(factor)
                        .min(self.policy.retry_max);
                    d.next_try = Instant::now() + wait;
                }
                Flushed::Failed(e)
            }
        }
    }

    /// Copies a hit in tier `found` into the promoting tiers above it,
    /// unless a write to the key raced with the read (`epoch` moved).
    fn promote(
        &self,
        found: usize,
        key: &ArtifactKey,
        encoded: &[u8],
        object: &Object,
        epoch: u64,
    ) {
        if !self.links[..found].iter().any(|l| l.promote) {
            return;
        }
        let _stripe = self.lock_stripe(encoded);
        if self.epoch(encoded) != epoch {
            return;
        }
        for link in self.links[..found].iter().filter(|l| l.promote) {
            // A promotion is an optimisation: a full tier just skips it.
            if link
                .tier
                .put(key, object.meta.clone(), &object.bytes)
                .is_ok()
            {
                self.counters.promotions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flusher_loop(self: Arc<Inner>) {
        while !self.stop.load(Ordering::SeqCst) {
            let ready = self.collect_dirty(None, true, 256, true);
            if ready.is_empty() {
                let guard = lock(&self.wake_lock);
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                let wait = self.next_retry_in().unwrap_or(self.policy.idle_poll);
                let _ = self
                    .wake
                    .wait_timeout(guard, wait.min(self.policy.idle_poll))
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            for (link, key) in ready {
                // Failures are counted and rescheduled inside; the loop
                // goes on whatever happens to one object.
                if !self.stop.load(Ordering::SeqCst) {
                    let _ = self.flush_one(link, &key, None);
                }
                self.unclaim(link, &key);
            }
        }
    }

    fn next_retry_in(&self) -> Option<Duration> {
        let now = Instant::now();
        self.dirty
            .iter()
            .filter_map(|s| {
                lock(s)
                    .entries
                    .values()
                    .map(|d| d.next_try.saturating_duration_since(now))
                    .min()
            })
            .min()
    }
}
