//! Prefix clustering: banded MinHash LSH for token prompts, exact grouping
//! for block-hash prefixes.
//!
//! The planner gives routing hints per *prefix cluster*: requests whose
//! prompts are nearly the same (a shared system prompt, a template with a
//! few words swapped) should land where their KV pages already are. This
//! module finds those clusters.
//!
//! # Similarity on tokens: MinHash
//!
//! A prompt is turned into the *set* of its `k`-token shingles (windows of
//! `k` consecutive tokens; see [`LshConfig::shingle`]). Two prompts are
//! similar when their shingle sets have a high Jaccard similarity
//! `|A ∩ B| / |A ∪ B|`. Changing one token touches at most `k` shingles, so
//! 5 changed tokens in a 512-token prompt with `k = 4` leave a Jaccard
//! similarity of about 0.92 to the original.
//!
//! A MinHash [`signature`] is `bands * rows` numbers; number `i` is the
//! minimum of hash function `i` over the shingles. For any one (random)
//! function the chance that two prompts have the same minimum is their
//! Jaccard similarity, so the fraction of equal positions, [`jaccard_estimate`],
//! estimates it.
//!
//! # Banding: the LSH step
//!
//! Comparing every pair of signatures is quadratic. Instead the signature is
//! cut into `bands` bands of `rows` values, and each band is hashed (with its
//! band index) to a bucket key. Two prompts become *candidates* when **any**
//! band lands in the same bucket; a whole band agrees with probability
//! `s^rows`, so the chance of becoming candidates is
//! `1 - (1 - s^rows)^bands` — the S-curve of [`collision_probability`]. More
//! rows make the curve steeper and move it right (fewer false pairs); more
//! bands move it left (fewer missed pairs). It rises most steeply near
//! [`threshold`] `≈ (1/bands)^(1/rows)`.
//!
//! [`cluster`] joins candidates with a union-find over the bucket table (no
//! pairwise comparison) and returns the connected components as dense ids.
//! Components are transitive: if A is near B and B is near C, all three share
//! an id even when A and C alone would not collide.
//!
//! ```
//! use bcache::lsh::{cluster, collision_probability, LshConfig};
//!
//! let cfg = LshConfig::default();
//! let base: Vec<u32> = (0..512).map(|i| i * 7 + 1).collect();
//! let mut edited = base.clone();
//! edited[100] = 99_999; // one token changed
//! let other: Vec<u32> = (0..512).map(|i| i * 13 + 5).collect();
//!
//! let ids = cluster(&[&base, &edited, &other], &cfg);
//! assert_eq!(ids, vec![0, 0, 1]);
//!
//! // With the defaults (16 bands x 4 rows), a pair at Jaccard 0.92 is
//! // almost surely found, a pair at 0.1 almost never.
//! assert!(collision_probability(0.92, &cfg) > 0.999_999);
//! assert!(collision_probability(0.1, &cfg) < 0.002);
//! ```
//!
//! # Exact grouping on block hashes
//!
//! Traces such as Mooncake's do not carry tokens but the content hash of
//! each 512-token KV block. Equal ids mean the same block, so there is
//! nothing to estimate: [`prefix_clusters`] groups requests whose first
//! `depth` block ids are identical, exactly.

use std::collections::hash_map::Entry;

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

use crate::rng::{mix64, splitmix64};

/// From this many prompts on, [`cluster`] computes signatures in parallel.
const PARALLEL_MIN_PROMPTS: usize = 64;

/// Settings of the MinHash LSH.
///
/// The defaults (16 bands x 4 rows, 4-token shingles) put the S-curve's
/// midpoint near Jaccard 0.5: near-duplicates (Jaccard 0.8 and up) collide
/// with probability above 0.999, unrelated prompts (Jaccard below 0.1)
/// with probability below 0.002. See [`collision_probability`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LshConfig {
    /// Number of bands; prompts are candidates when any band matches.
    pub bands: usize,
    /// Signature values per band; a band matches when all of them do.
    pub rows: usize,
    /// Tokens per shingle. A prompt shorter than this is one shingle.
    pub shingle: usize,
    /// Seed of the hash functions. Signatures are only comparable when
    /// computed with the same seed (and the same `bands * rows`).
    pub seed: u64,
}

impl Default for LshConfig {
    fn default() -> Self {
        LshConfig {
            bands: 16,
            rows: 4,
            shingle: 4,
            seed: 0x6263_6163_6865_6c73, // "bcachels"
        }
    }
}

impl LshConfig {
    /// Checks that every count is at least 1 and that `bands * rows` fits in
    /// memory arithmetic. The functions of this module treat a zero as 1
    /// rather than fail; call this where the config is loaded so that a
    /// mistake is reported instead.
    pub fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("bands", self.bands),
            ("rows", self.rows),
            ("shingle", self.shingle),
        ] {
            if value == 0 {
                return Err(Error::Config {
                    origin: "lsh".into(),
                    message: format!("{key} must be at least 1, got 0"),
                });
            }
        }
        if self.bands.checked_mul(self.rows).is_none() {
            return Err(Error::Config {
                origin: "lsh".into(),
                message: format!(
                    "bands * rows overflows ({} * {}); use a signature of a few hundred values at most",
                    self.bands, self.rows
                ),
            });
        }
        Ok(())
    }

    /// Number of hash functions, `bands * rows` (zeros counted as 1,
    /// saturating on overflow).
    pub fn signature_len(&self) -> usize {
        self.bands.max(1).saturating_mul(self.rows.max(1))
    }
}

/// The MinHash signature of a token sequence: `bands * rows` values, value
/// `i` being the minimum of hash function `i` over the sequence's
/// `shingle`-token shingles.
///
/// Each shingle is hashed once to 64 bits `h`; function `i` is then
/// `a_i * h + b_i (mod 2^64)` with an odd `a_i` and a `b_i` drawn from
/// `cfg.seed`. With `a_i` odd each function is a permutation of the 64-bit
/// values, and the minimum is decided by the high bits, which form the
/// multiply-add-shift universal family; measured collision rates follow
/// [`collision_probability`] to within sampling error. A 512-token prompt
/// costs about 32 000 multiply-adds with the defaults (about 20 µs).
/// A sequence shorter than `shingle` (the empty one included) is a single
/// shingle. Zero counts in `cfg` are treated as 1 (see
/// [`LshConfig::validate`]).
pub fn signature(tokens: &[u32], cfg: &LshConfig) -> Vec<u64> {
    MinHasher::new(cfg).signature(tokens)
}

/// Estimates the Jaccard similarity of the shingle sets behind two
/// signatures: the fraction of positions where they agree.
///
/// The signatures must come from the same config; if their lengths differ
/// only the common prefix is compared. Returns 0.0 when either is empty.
/// The standard error is `sqrt(s (1 - s) / len)`, about 0.03 at `s = 0.9`
/// with the default 64 values.
pub fn jaccard_estimate(a: &[u64], b: &[u64]) -> f64 {
    let len = a.len().min(b.len());
    if len == 0 {
        return 0.0;
    }
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / len as f64
}

/// The LSH S-curve: the probability that two prompts whose shingle sets have
/// Jaccard similarity `jaccard` share at least one band, and so become
/// candidates in [`cluster`]: `1 - (1 - s^rows)^bands`.
///
/// Use it to pick `bands` and `rows`: the curve is near 0 for dissimilar
/// pairs, rises steeply around [`threshold`] and is near 1 above it. With
/// the defaults (16 x 4): 0.1 → 0.0016, 0.3 → 0.12, 0.5 → 0.64, 0.7 → 0.988,
/// 0.8 → 0.9998, 0.92 → 1 - 1.8e-9. `jaccard` is clamped to `[0, 1]`; NaN counts as 0.
pub fn collision_probability(jaccard: f64, cfg: &LshConfig) -> f64 {
    let s = if jaccard.is_nan() {
        0.0
    } else {
        jaccard.clamp(0.0, 1.0)
    };
    let rows = cfg.rows.max(1) as f64;
    let bands = cfg.bands.max(1) as f64;
    1.0 - (1.0 - s.powf(rows)).powf(bands)
}

/// The Jaccard similarity where the S-curve of [`collision_probability`] is
/// steepest, approximately `(1 / bands)^(1 / rows)`: pairs well above it are
/// clustered, pairs well below it are not. 0.5 for the defaults.
pub fn threshold(cfg: &LshConfig) -> f64 {
    let rows = cfg.rows.max(1) as f64;
    let bands = cfg.bands.max(1) as f64;
    (1.0 / bands).powf(1.0 / rows)
}

/// Groups near-duplicate prompts: returns one cluster id per prompt.
///
/// Two prompts are candidates when any of their bands hash to the same
/// bucket (see the [module docs](self)); clusters are the connected
/// components of that relation, found with a union-find over the buckets in
/// `O(n * bands)`. Ids are dense and assigned in order of first appearance,
/// so prompt 0 is in cluster 0 and the largest id is `clusters - 1`. The
/// result depends only on the prompts and `cfg`, never on thread timing.
/// Signatures are computed in parallel (rayon) from 64 prompts on.
pub fn cluster(prompts: &[&[u32]], cfg: &LshConfig) -> Vec<u32> {
    let hasher = MinHasher::new(cfg);
    let band_keys = |tokens: &&[u32]| hasher.band_keys(tokens);
    let keys: Vec<Vec<u64>> = if prompts.len() >= PARALLEL_MIN_PROMPTS {
        prompts.par_iter().map(band_keys).collect()
    } else {
        prompts.iter().map(band_keys).collect()
    };

    let mut sets = UnionFind::new(prompts.len());
    // Band key -> first prompt seen in that bucket. The band index is mixed
    // into the key, so one table serves all bands.
    // The keys are already mixed: a fast hasher loses nothing.
    let mut buckets: FxHashMap<u64, usize> = FxHashMap::with_capacity_and_hasher(
        prompts.len().saturating_mul(hasher.bands),
        Default::default(),
    );
    for (prompt, prompt_keys) in keys.iter().enumerate() {
        for &key in prompt_keys {
            match buckets.entry(key) {
                Entry::Occupied(first) => sets.union(*first.get(), prompt),
                Entry::Vacant(slot) => {
                    slot.insert(prompt);
                }
            }
        }
    }
    sets.dense_ids()
}

/// Groups requests by their first `depth` KV block ids, exactly.
///
/// A request's key is its first `depth` block ids, or its whole list when
/// that is shorter; requests with equal keys share a cluster. Block ids are
/// content hashes — equal ids mean the very same KV block — so there is
/// nothing to estimate and no similarity is used: `[1, 2]` is not in the
/// cluster of `[1, 2, 3]` when `depth` is 3 (its key is shorter), but it is
/// when `depth` is 2. Ids are dense, in order of first appearance. With
/// `depth == 0` every request is in cluster 0.
///
/// From 32 768 requests on, the work is spread over cores: see
/// [`prefix_clusters_by`].
pub fn prefix_clusters(prefixes: &[&[u64]], depth: usize) -> Vec<u32> {
    prefix_clusters_by(prefixes.len(), depth, |i| prefixes[i])
}

/// [`prefix_clusters`] over `n` requests whose block ids `blocks(i)` gives,
/// for a caller that holds them in its own structures (the planner: a
/// million requests, whose lists a copied index would only add a pass to).
/// `blocks` is called with `0..n` only.
///
/// From 32 768 requests on, the keys are hashed, and then checked against
/// their cluster's first key, in parallel (rayon): reading each request's
/// block list is the cost, and it spreads over cores; only the numbering in
/// order of first appearance is sequential, on the compact hashes. The
/// result is the same as the serial one, collisions of the 64-bit hash
/// included: they are found by the check and fall back to the exact table.
pub fn prefix_clusters_by<'a, F>(n: usize, depth: usize, blocks: F) -> Vec<u32>
where
    F: Fn(usize) -> &'a [u64] + Sync,
{
    let key = |i: usize| prefix_key(blocks(i), depth);
    if n < PARALLEL_MIN_PREFIXES {
        return prefix_clusters_exact(n, key);
    }
    let hashes: Vec<u64> = (0..n)
        .into_par_iter()
        .with_min_len(4096)
        .map(|i| hash_blocks(key(i)))
        .collect();
    let mut first: FxHashMap<u64, u32> = FxHashMap::default();
    let mut reps: Vec<usize> = Vec::new();
    let ids: Vec<u32> = hashes
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            *first.entry(h).or_insert_with(|| {
                reps.push(i);
                (reps.len() - 1) as u32
            })
        })
        .collect();
    let exact = ids
        .par_iter()
        .enumerate()
        .with_min_len(4096)
        .all(|(i, &id)| {
            reps.get(id as usize)
                .is_some_and(|&rep| rep == i || key(rep) == key(i))
        });
    if exact {
        ids
    } else {
        prefix_clusters_exact(n, key)
    }
}

/// From this many requests on, [`prefix_clusters_by`] works in parallel.
const PARALLEL_MIN_PREFIXES: usize = 32_768;

/// [`prefix_clusters_by`] with the keys themselves in the table: exact,
/// serial.
fn prefix_clusters_exact<'a>(n: usize, key: impl Fn(usize) -> &'a [u64]) -> Vec<u32> {
    // A fast hasher, and a table that grows with the distinct keys only:
    // shared prefixes are the point, so it stays small and in cache.
    let mut ids: FxHashMap<&[u64], u32> = FxHashMap::default();
    (0..n)
        .map(|i| {
            let next = ids.len() as u32;
            *ids.entry(key(i)).or_insert(next)
        })
        .collect()
}

/// A request's key: its first `depth` block ids, or all when fewer.
fn prefix_key(blocks: &[u64], depth: usize) -> &[u64] {
    &blocks[..depth.min(blocks.len())]
}

/// A 64-bit hash of a block-id key, its length included (so that `[1, 2]`
/// and `[1, 2, 0]` differ by construction).
fn hash_blocks(blocks: &[u64]) -> u64 {
    blocks
        .iter()
        .fold(mix64(blocks.len() as u64 ^ PREFIX_SEED), |h, &b| {
            mix64(h ^ b)
        })
}

/// Mixed into [`hash_blocks`]' start ("prefix").
const PREFIX_SEED: u64 = 0x7072_6566_6978;

/// The hash functions of one config, drawn once from its seed.
struct MinHasher {
    bands: usize,
    rows: usize,
    shingle: usize,
    /// Seed of the shingle hash.
    shingle_seed: u64,
    /// Seed of the band keys.
    band_seed: u64,
    /// Multipliers `a_i`, odd.
    mul: Vec<u64>,
    /// Offsets `b_i`.
    add: Vec<u64>,
}

impl MinHasher {
    fn new(cfg: &LshConfig) -> MinHasher {
        let bands = cfg.bands.max(1);
        let rows = cfg.rows.max(1);
        let len = bands.saturating_mul(rows);
        let mut state = cfg.seed;
        let shingle_seed = splitmix64(&mut state);
        let band_seed = splitmix64(&mut state);
        let mut mul = Vec::with_capacity(len);
        let mut add = Vec::with_capacity(len);
        for _ in 0..len {
            mul.push(splitmix64(&mut state) | 1);
            add.push(splitmix64(&mut state));
        }
        MinHasher {
            bands,
            rows,
            shingle: cfg.shingle.max(1),
            shingle_seed,
            band_seed,
            mul,
            add,
        }
    }

    fn signature(&self, tokens: &[u32]) -> Vec<u64> {
        let mut sig = vec![u64::MAX; self.mul.len()];
        let mut fold = |h: u64| {
            for ((slot, &a), &b) in sig.iter_mut().zip(&self.mul).zip(&self.add) {
                let v = a.wrapping_mul(h).wrapping_add(b);
                if v < *slot {
                    *slot = v;
                }
            }
        };
        if tokens.len() < self.shingle {
            fold(self.hash_shingle(tokens));
        } else {
            for window in tokens.windows(self.shingle) {
                fold(self.hash_shingle(window));
            }
        }
        sig
    }

    /// One 64-bit key per band: the band's values and its index, mixed.
    fn band_keys(&self, tokens: &[u32]) -> Vec<u64> {
        let sig = self.signature(tokens);
        sig.chunks(self.rows)
            .enumerate()
            .map(|(band, values)| {
                let mut h = mix64(self.band_seed ^ band as u64);
                for &v in values {
                    h = mix64(h ^ v);
                }
                h
            })
            .collect()
    }

    fn hash_shingle(&self, shingle: &[u32]) -> u64 {
        // The length goes in first so that a short prompt's single shingle
        // cannot equal a full shingle by construction.
        let mut h = mix64(self.shingle_seed ^ shingle.len() as u64);
        for pair in shingle.chunks(2) {
            let word = match pair {
                [a, b] => u64::from(*a) | (u64::from(*b) << 32),
                [a] => u64::from(*a) | (1 << 63),
                _ => 0,
            };
            h = mix64(h ^ word);
        }
        h
    }
}

/// Disjoint sets over `0..n` with path halving and union by size.
struct UnionFind {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl UnionFind {
    fn new(n: usize) -> UnionFind {
        UnionFind {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        if self.size[ra] < self.size[rb] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb] = ra;
        self.size[ra] += self.size[rb];
    }

    /// Dense ids of the sets, numbered in order of their first member.
    fn dense_ids(&mut self) -> Vec<u32> {
        let n = self.parent.len();
        let mut id_of_root = vec![u32::MAX; n];
        let mut next = 0u32;
        (0..n)
            .map(|x| {
                let root = self.find(x);
                if id_of_root[root] == u32::MAX {
                    id_of_root[root] = next;
                    next += 1;
                }
                id_of_root[root]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_functions_are_seeded_and_odd() {
        let cfg = LshConfig::default();
        let a = MinHasher::new(&cfg);
        let b = MinHasher::new(&LshConfig { seed: 1, ..cfg });
        assert_eq!(a.mul.len(), 64);
        assert!(a.mul.iter().all(|m| m % 2 == 1));
        assert_ne!(a.mul, b.mul);
        // Zeros are treated as 1 and never panic.
        let zero = LshConfig {
            bands: 0,
            rows: 0,
            shingle: 0,
            seed: 0,
        };
        assert_eq!(signature(&[1, 2, 3], &zero).len(), 1);
        assert_eq!(cluster(&[&[1, 2], &[1, 2], &[3]], &zero), vec![0, 0, 1]);
    }

    #[test]
    fn a_hash_collision_falls_back_to_the_exact_table() {
        // mix64 is a bijection, so a second key with the same hash can be
        // solved for: [a0, a1] and [b0, b1] collide when
        // b1 = mix64(s ^ b0) ^ mix64(s ^ a0) ^ a1.
        let s = mix64(2 ^ PREFIX_SEED);
        let (a0, a1, b0) = (5u64, 6u64, 7u64);
        let b1 = mix64(s ^ b0) ^ mix64(s ^ a0) ^ a1;
        let a = [a0, a1];
        let b = [b0, b1];
        assert_eq!(hash_blocks(&a), hash_blocks(&b));
        // Enough requests for the parallel path: `a` first, `b` last.
        let filler = [1u64];
        let mut lists: Vec<&[u64]> = vec![&a];
        lists.extend(std::iter::repeat_n(&filler[..], PARALLEL_MIN_PREFIXES));
        lists.push(&b);
        let ids = prefix_clusters(&lists, 2);
        assert_eq!(ids[0], 0);
        assert_eq!(ids[1], 1);
        assert_eq!(ids[lists.len() - 1], 2, "colliding keys stay apart");
    }

    #[test]
    fn union_find_numbers_sets_by_first_member() {
        let mut uf = UnionFind::new(5);
        uf.union(3, 1);
        uf.union(4, 0);
        assert_eq!(uf.dense_ids(), vec![0, 1, 2, 1, 0]);
    }
}
