//! [`StorageEngine`]: the store as applications use it.
//!
//! An engine is a [`TierChain`] with named tiers and three ways to address
//! them ([`Access`]):
//!
//! - `chain`: through the links (writes follow write-through / write-back,
//!   reads go top-down with promotion);
//! - `exact(tier)`: that tier only; a store there also removes older copies
//!   of the key from the tiers above it, so a chain read never returns them;
//! - `prefer(tier)`: that tier first, the chain when the tier is full
//!   (stores) or does not hold the key (loads).
//!
//! A load that fails says why, per key: [`Error::NotFound`] lists the tiers
//! whose lookup failed (a corrupt object, an I/O error) so a serving engine
//! can recompute exactly those blocks; [`StorageEngine::load_many`] returns
//! every failure with the key's position in the request.
//!
//! [`StorageEngine::close`] flushes every dirty object, makes every tier
//! durable and stops the flusher; after it every call fails with
//! [`Error::Closed`]. Dropping an engine without closing it flushes as well,
//! on a best-effort basis (a drop cannot report an error).
//!
//! The engine is itself a [`Tier`] (chain access), so anything that serves a
//! tier, such as [`crate::server`], serves a whole engine.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};

use crate::chain::{ChainStats, Lookup, TierChain};
use crate::sync::lock;
use crate::tier::{Meta, Object, Tier, TierStats};
use crate::{ArtifactKey, Error, Result};

/// Which tiers a call addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Through the chain.
    Chain,
    /// One tier (its index) only.
    Exact(usize),
    /// One tier first, then the chain.
    Prefer(usize),
}

/// An object loaded, with the tier it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The object.
    pub object: Object,
    /// Index of the tier that held it.
    pub tier: usize,
}

/// A load of a batch that failed: which key and why.
#[derive(Debug)]
pub struct LoadFailure {
    /// Position of the key in the request.
    pub index: usize,
    /// The key.
    pub key: ArtifactKey,
    /// Why: [`Error::NotFound`] (with any tier failures) or another error.
    pub error: Error,
}

/// The answer to [`StorageEngine::load_many`].
#[derive(Debug, Default)]
pub struct LoadBatch {
    /// One slot per requested key, `None` where it failed.
    pub loaded: Vec<Option<Loaded>>,
    /// Every key that failed, in request order.
    pub failures: Vec<LoadFailure>,
}

/// Counters of an engine: each tier's and the chain's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineStats {
    /// `(tier name, its counters)`, in chain order.
    pub tiers: Vec<(String, TierStats)>,
    /// The write-back counters.
    pub chain: ChainStats,
}

/// Named tiers behind one API. See the module documentation.
#[derive(Debug)]
pub struct StorageEngine {
    chain: TierChain,
    names: Vec<String>,
    /// `true` once closed. Every call holds it for reading while it runs,
    /// and `close` takes it for writing: a store cannot slip in between
    /// `close`'s flush and the flusher's stop.
    closed: RwLock<bool>,
    /// Pins taken through [`Tier::pin`] on the engine, per key: an unpin
    /// without its pin is refused, so a client can never undo the pin
    /// that keeps a dirty object in its tier.
    user_pins: Mutex<HashMap<Vec<u8>, u32>>,
}

impl StorageEngine {
    /// An engine over `chain`, whose tiers are called `names` (one per
    /// link, unique).
    pub fn new(chain: TierChain, names: Vec<String>) -> Result<StorageEngine> {
        if names.len() != chain.links().len() {
            return Err(Error::Config {
                field: "tiers".into(),
                message: format!("{} names for {} tiers", names.len(), chain.links().len()),
            });
        }
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(Error::Config {
                    field: format!("tiers[{i}].name"),
                    message: format!("{n:?} names two tiers; give each tier its own name"),
                });
            }
        }
        Ok(StorageEngine {
            chain,
            names,
            closed: RwLock::new(false),
            user_pins: Mutex::new(HashMap::new()),
        })
    }

    /// The tiers' names, in chain order.
    pub fn tier_names(&self) -> &[String] {
        &self.names
    }

    /// The index of the tier called `name`.
    pub fn tier_index(&self, name: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| Error::Config {
                field: "tier".into(),
                message: format!(
                    "no tier is called {name:?}; the engine has {}",
                    self.names.join(", ")
                ),
            })
    }

    /// The tier at `index`.
    pub fn tier(&self, index: usize) -> Result<&dyn Tier> {
        let _open = self.check_open()?;
        self.chain
            .links()
            .get(index)
            .map(|l| &*l.tier)
            .ok_or_else(|| self.out_of_range(index))
    }

    /// The chain underneath.
    pub fn chain(&self) -> &TierChain {
        &self.chain
    }

    fn out_of_range(&self, index: usize) -> Error {
        Error::Config {
            field: "tier".into(),
            message: format!(
                "tier index {index} is out of range: the engine has {} tiers",
                self.names.len()
            ),
        }
    }

    /// Holds the engine open for the duration of a call.
    fn check_open(&self) -> Result<RwLockReadGuard<'_, bool>> {
        let closed = self
            .closed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *closed {
            return Err(Error::Closed {
                what: "the storage engine".into(),
            });
        }
        Ok(closed)
    }

    fn check_tier(&self, index: usize) -> Result<()> {
        if index < self.names.len() {
            Ok(())
        } else {
            Err(self.out_of_range(index))
        }
    }

    /// Stores an object.
    pub fn store(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8], access: Access) -> Result<()> {
        let _open = self.check_open()?;
        match access {
            Access::Chain => self.chain.put(key, meta, bytes),
            Access::Exact(t) => {
                self.check_tier(t)?;
                self.chain.put_exact(t, key, meta, bytes)
            }
            Access::Prefer(t) => {
                self.check_tier(t)?;
                match self.chain.put_exact(t, key, meta.clone(), bytes) {
                    Err(e) if e.is_full() => self.chain.put(key, meta, bytes),
                    other => other,
                }
            }
        }
    }

    /// [`StorageEngine::store`] for many objects; one result each, in order.
    pub fn store_many(
        &self,
        items: &[(ArtifactKey, Meta, &[u8])],
        access: Access,
    ) -> Vec<Result<()>> {
        items
            .iter()
            .map(|(k, m, b)| self.store(k, m.clone(), b, access))
            .collect()
    }

    /// Loads an object. A miss is [`Error::NotFound`], listing any tier
    /// that failed on the way.
    pub fn load(&self, key: &ArtifactKey, access: Access) -> Result<Loaded> {
        let _open = self.check_open()?;
        let not_found = |reasons: Vec<(String, Error)>| Error::NotFound {
            key: key.to_string(),
            reasons: reasons
                .into_iter()
                .map(|(tier, e)| format!("{tier}: {e}"))
                .collect(),
        };
        match access {
            Access::Chain => match self.chain.get(key)? {
                Lookup::Found { object, tier } => Ok(Loaded { object, tier }),
                Lookup::Missing { reasons } => Err(not_found(reasons)),
            },
            Access::Exact(t) => {
                self.check_tier(t)?;
                match self.chain.get_exact(t, key) {
                    Ok(Some(object)) => Ok(Loaded { object, tier: t }),
                    Ok(None) => Err(not_found(Vec::new())),
                    Err(e) => Err(not_found(vec![(self.names[t].clone(), e)])),
                }
            }
            Access::Prefer(t) => {
                self.check_tier(t)?;
                let first = match self.chain.get_exact(t, key) {
                    Ok(Some(object)) => return Ok(Loaded { object, tier: t }),
                    Ok(None) => None,
                    Err(e) => Some((self.names[t].clone(), e)),
                };
                match self.chain.get(key)? {
                    Lookup::Found { object, tier } => Ok(Loaded { object, tier }),
                    Lookup::Missing { mut reasons } => {
                        reasons.extend(first);
                        Err(not_found(reasons))
                    }
                }
            }
        }
    }

    /// Loads many objects; every failure is reported with its key.
    pub fn load_many(&self, keys: &[ArtifactKey], access: Access) -> LoadBatch {
        let mut batch = LoadBatch::default();
        for (index, key) in keys.iter().enumerate() {
            match self.load(key, access) {
                Ok(l) => batch.loaded.push(Some(l)),
                Err(error) => {
                    batch.loaded.push(None);
                    batch.failures.push(LoadFailure {
                        index,
                        key: key.clone(),
                        error,
                    });
                }
            }
        }
        batch
    }

    /// Whether the key is stored (in any tier, or in the given one).
    pub fn contains(&self, key: &ArtifactKey, access: Access) -> Result<bool> {
        let _open = self.check_open()?;
        // Tiers by index, not through `tier()`: the read guard is not
        // taken twice in one call.
        let tier = |t: usize| {
            self.chain
                .links()
                .get(t)
                .map(|l| &*l.tier)
                .ok_or_else(|| self.out_of_range(t))
        };
        match access {
            Access::Chain => self.chain.contains(key),
            Access::Exact(t) => tier(t)?.contains(key),
            Access::Prefer(t) => Ok(tier(t)?.contains(key)? || self.chain.contains(key)?),
        }
    }

    /// Removes the key from every tier; says whether any held it.
    pub fn delete(&self, key: &ArtifactKey) -> Result<bool> {
        let _open = self.check_open()?;
        self.chain.delete(key)
    }

    /// Flushes dirty objects below and makes every tier durable.
    pub fn flush(&self) -> Result<()> {
        let _open = self.check_open()?;
        self.chain.flush()
    }

    /// Copies `key` from tier `from` into tier `to`, never over a newer
    /// version ([`TierChain::copy`]); the bytes `to` holds after, or `None`
    /// when there was nothing to copy.
    pub fn copy(&self, key: &ArtifactKey, from: usize, to: usize) -> Result<Option<u64>> {
        let _open = self.check_open()?;
        self.chain.copy(key, from, to)
    }

    /// Removes `key` from tier `tier` only, flushing it below first when
    /// it is dirty there ([`TierChain::evict`]).
    pub fn evict(&self, tier: usize, key: &ArtifactKey) -> Result<bool> {
        let _open = self.check_open()?;
        self.chain.evict(tier, key)
    }

    /// Counters of every tier and of the chain.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            tiers: self
                .names
                .iter()
                .zip(self.chain.links())
                .map(|(n, l)| (n.clone(), l.tier.stats()))
                .collect(),
            chain: self.chain.stats(),
        }
    }

    /// Flushes everything, makes it durable and stops the flusher. On an
    /// error the engine stays open (nothing is lost: dirty objects stay
    /// pinned in their tier), so the caller can retry.
    pub fn close(&self) -> Result<()> {
        let mut closed = self
            .closed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *closed {
            return Ok(());
        }
        self.chain.flush()?;
        self.chain.stop();
        *closed = true;
        Ok(())
    }
}

impl Drop for StorageEngine {
    fn drop(&mut self) {
        let closed = *self
            .closed
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !closed {
            // Best effort: a drop cannot report; `close` can.
            let _ = self.chain.flush();
        }
    }
}

/// The engine as one tier (chain access), so it can be served.
impl Tier for StorageEngine {
    fn name(&self) -> &str {
        "engine"
    }

    fn get(&self, key: &ArtifactKey) -> Result<Option<Object>> {
        match self.load(key, Access::Chain) {
            Ok(l) => Ok(Some(l.object)),
            Err(e) if e.is_miss() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> Result<()> {
        self.store(key, meta, bytes, Access::Chain)
    }

    fn contains(&self, key: &ArtifactKey) -> Result<bool> {
        StorageEngine::contains(self, key, Access::Chain)
    }

    fn delete(&self, key: &ArtifactKey) -> Result<bool> {
        StorageEngine::delete(self, key)
    }

    /// The sums over every tier (objects held in two tiers count twice).
    fn stats(&self) -> TierStats {
        let mut total = TierStats::default();
        for l in self.chain.links() {
            let s = l.tier.stats();
            total.objects += s.objects;
            total.bytes += s.bytes;
            total.capacity_bytes += s.capacity_bytes;
            total.hits += s.hits;
            total.misses += s.misses;
            total.evictions += s.evictions;
        }
        total
    }

    /// Every key in any tier, once, with the metadata of its highest copy.
    fn list(&self) -> Result<Vec<(ArtifactKey, Meta)>> {
        let _open = self.check_open()?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for l in self.chain.links() {
            for (k, m) in l.tier.list()? {
                if seen.insert(k.clone()) {
                    out.push((k, m));
                }
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        StorageEngine::flush(self)
    }

    fn can_pin(&self) -> bool {
        self.chain.links().first().is_some_and(|l| l.tier.can_pin())
    }

    /// Pins the key in the first tier. The engine counts these pins apart
    /// from the ones that keep dirty objects in place.
    fn pin(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        let mut pins = lock(&self.user_pins);
        if !self.tier(0)?.pin(key)? {
            return Ok(false);
        }
        *pins.entry(encoded).or_default() += 1;
        Ok(true)
    }

    /// Undoes one [`Tier::pin`] made through the engine; `false` (and
    /// nothing changed) when the key has none.
    fn unpin(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        let mut pins = lock(&self.user_pins);
        let Some(count) = pins.get_mut(&encoded) else {
            return Ok(false);
        };
        self.tier(0)?.unpin(key)?;
        *count -= 1;
        if *count == 0 {
            pins.remove(&encoded);
        }
        Ok(true)
    }
}
