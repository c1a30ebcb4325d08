//! Bucket packing: first-fit decreasing in O(n log n), with alignment and
//! splitting.
//!
//! Changed chunks travel in buckets: contiguous staging buffers that move as
//! one unit (one pinned host buffer, one broadcast, one device copy). Fewer,
//! fuller buckets mean fewer round trips, so the packer places pieces
//! largest first, each into the first bucket with room (first-fit
//! decreasing, within 11/9 of the optimal bucket count).
//!
//! - **O(n log n)**: "the first bucket with room" is found by descending a
//!   max-tree of the buckets' free bytes, not by scanning every bucket, so a
//!   million pieces pack in tens of milliseconds.
//! - **Alignment**: every piece starts at a multiple of `align` bytes inside
//!   its bucket (GPU copy engines move 256-byte-aligned data fastest). A
//!   bucket's fill level is kept aligned, so its free bytes are exact.
//! - **Splitting**: a piece larger than a bucket is cut into bucket-sized
//!   parts, each filling a bucket of its own, and the remainder is packed
//!   like any other piece. No bucket is ever larger than the limit.
//! - **Determinism**: ties in size keep the input order, so the same input
//!   gives the same buckets.

use crate::error::{HotweightsError, Result};

/// A piece to place: `length` bytes identified by the caller's `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The caller's identifier (index into its own list).
    pub id: usize,
    /// Bytes; pieces of length 0 are skipped.
    pub length: u64,
}

/// Where part of a piece went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The piece's `id`.
    pub id: usize,
    /// Start of this part inside the piece (non-zero for a split piece).
    pub piece_offset: u64,
    /// Length of this part.
    pub length: u64,
    /// Start of this part inside its bucket; a multiple of the alignment.
    pub bucket_offset: u64,
}

/// One packed bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedBucket {
    /// Bytes used, rounded up to the alignment; <= the limit.
    pub used: u64,
    /// Parts in the bucket, by increasing `bucket_offset`.
    pub parts: Vec<Placement>,
}

/// Packs `pieces` into buckets of at most `limit` bytes, each part aligned
/// to `align` bytes (a power of two, > 0). `limit` is rounded down to a
/// multiple of `align`.
///
/// ```
/// use hotweights::pack::{Piece, pack};
/// let buckets = pack(&[Piece { id: 0, length: 300 }, Piece { id: 1, length: 100 }], 512, 256)?;
/// assert_eq!(buckets.len(), 2); // 300 rounds up to 512: no room left for the second
/// # Ok::<(), hotweights::HotweightsError>(())
/// ```
pub fn pack(pieces: &[Piece], limit: u64, align: u64) -> Result<Vec<PackedBucket>> {
    let limit = bucket_limit(limit, align)?;

    let mut buckets = Vec::new();
    // Whole bucket-sized parts of oversize pieces come first: they are the
    // largest, and each fills a bucket exactly.
    let mut rest = Vec::with_capacity(pieces.len());
    for p in pieces.iter().filter(|p| p.length > 0) {
        let whole = p.length / limit;
        for k in 0..whole {
            buckets.push(PackedBucket {
                used: limit,
                parts: vec![Placement {
                    id: p.id,
                    piece_offset: k * limit,
                    length: limit,
                    bucket_offset: 0,
                }],
            });
        }
        let tail = p.length % limit;
        if tail > 0 {
            rest.push((tail, whole * limit, p.id));
        }
    }
    // Largest first; the stable sort keeps the input order among equals.
    rest.sort_by_key(|r| std::cmp::Reverse(r.0));

    let first_ffd = buckets.len();
    // First fit never leaves two buckets at most half full (the later
    // one's pieces would have fitted in the earlier one), so it opens at
    // most 2 * (aligned bytes / limit) + 1 buckets: a tree that size, not
    // one leaf per piece, stays small enough for the cache.
    let aligned: u64 = rest
        .iter()
        .map(|&(length, _, _)| align_up(length, align))
        .fold(0, u64::saturating_add);
    let bound = (2 * aligned.div_ceil(limit)).saturating_add(1);
    let mut tree = FreeTree::new(
        rest.len().min(usize::try_from(bound).unwrap_or(usize::MAX)),
        limit,
    );
    for &(length, piece_offset, id) in &rest {
        // Every leaf starts at `limit` >= length, so this always finds one.
        let Some(leaf) = tree.first_at_least(length) else {
            return Err(HotweightsError::Option(format!(
                "internal: no bucket for a {length}-byte piece"
            )));
        };
        if leaf + first_ffd == buckets.len() {
            buckets.push(PackedBucket::default());
        }
        let bucket = &mut buckets[leaf + first_ffd];
        bucket.parts.push(Placement {
            id,
            piece_offset,
            length,
            bucket_offset: bucket.used,
        });
        bucket.used = align_up(bucket.used + length, align);
        tree.set(leaf, limit - bucket.used);
    }
    Ok(buckets)
}

/// The bucket size [`pack`] uses for `limit` and `align`: `limit` rounded
/// down to a multiple of `align`. An error if `align` is not a power of two
/// or the result is 0.
pub fn bucket_limit(limit: u64, align: u64) -> Result<u64> {
    if align == 0 || !align.is_power_of_two() {
        return Err(HotweightsError::Option(format!(
            "the alignment must be a power of two, not {align}"
        )));
    }
    match limit - limit % align {
        0 => Err(HotweightsError::Option(format!(
            "the bucket size must be at least the alignment ({align} bytes)"
        ))),
        limit => Ok(limit),
    }
}

/// `value` rounded up to a multiple of `align` (a power of two).
pub fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// A max-tree over the free bytes of `n` buckets, leaves left to right in
/// bucket order. Unopened buckets hold the full limit, so the leftmost leaf
/// with room is either an open bucket or the next one to open.
struct FreeTree {
    leaves: usize,
    max: Vec<u64>,
}

impl FreeTree {
    fn new(n: usize, limit: u64) -> Self {
        let leaves = n.max(1).next_power_of_two();
        FreeTree {
            leaves,
            max: vec![limit; 2 * leaves],
        }
    }

    /// Lowers a leaf's free bytes (they only ever shrink).
    fn set(&mut self, leaf: usize, free: u64) {
        let mut i = leaf + self.leaves;
        self.max[i] = free;
        while i > 1 {
            i /= 2;
            let max = self.max[2 * i].max(self.max[2 * i + 1]);
            // Above a node whose maximum did not change, nothing changes.
            if self.max[i] == max {
                break;
            }
            self.max[i] = max;
        }
    }

    fn first_at_least(&self, need: u64) -> Option<usize> {
        if self.max[1] < need {
            return None;
        }
        let mut i = 1;
        while i < self.leaves {
            i = if self.max[2 * i] >= need {
                2 * i
            } else {
                2 * i + 1
            };
        }
        Some(i - self.leaves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: usize, length: u64) -> Piece {
        Piece { id, length }
    }

    #[test]
    fn first_fit_decreasing_fills_earlier_buckets() {
        // 600 and 300 do not share a 1024 bucket once 600 rounds to 768;
        // 200 then fits after 600 in the first bucket.
        let b = pack(&[p(0, 300), p(1, 600), p(2, 200)], 1024, 256).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].parts.iter().map(|x| x.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(b[0].parts[1].bucket_offset, 768);
        assert_eq!(b[0].used, 1024);
        assert_eq!(b[1].parts[0].id, 0);
    }

    #[test]
    fn oversize_pieces_are_split() {
        let b = pack(&[p(7, 2500)], 1000, 8).unwrap();
        // limit rounds to 1000 (multiple of 8): 1000 + 1000 + 500.
        assert_eq!(b.len(), 3);
        let offsets: Vec<u64> = b.iter().map(|x| x.parts[0].piece_offset).collect();
        assert_eq!(offsets, [0, 1000, 2000]);
        assert!(b.iter().all(|x| x.used <= 1000));
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(pack(&[], 1024, 3).is_err());
        assert!(pack(&[], 100, 256).is_err());
        assert!(pack(&[], 1024, 256).unwrap().is_empty());
    }
}
