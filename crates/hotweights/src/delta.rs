//! The delta between two manifests of one model, chunk by chunk.
//!
//! A chunk is identified by its key: the entry it belongs to (a tensor name,
//! or a file path for the non-tensor bytes) and its index in that entry. A
//! chunk of the next version must move when the previous version has no
//! chunk with that key, or has one with a different hash or length.
//! Everything else is already on the receiver.
//!
//! Entries present before and absent now are *removed*: the receiver must
//! drop them, so the delta lists them instead of ignoring them (the next
//! manifest, which the plan carries, is the whole truth of the new version).
//!
//! The comparison is one hash-map lookup per entry and a zip over its chunk
//! lists, so a delta of a million chunks costs a few milliseconds.

use std::collections::HashMap;

use bstack_plan::{Chunk, WeightManifest};
use rayon::prelude::*;
use serde::Serialize;

/// How an entry differs between the previous and the next version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Only in the next version.
    Added,
    /// In both, with at least one chunk, its dtype or its shape different.
    Changed,
    /// Only in the previous version: to be deleted.
    Removed,
    /// In both and identical.
    Unchanged,
}

/// Counts and bytes of the entries of one [`Change`] class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Number of entries.
    pub count: u64,
    /// Bytes of those entries (in the next version; in the previous one
    /// for removed entries).
    pub bytes: u64,
}

/// The four classes for one kind of entry (tensors, or files).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Classes {
    /// Entries only in the next version.
    pub added: Tally,
    /// Entries in both that differ.
    pub changed: Tally,
    /// Entries only in the previous version.
    pub removed: Tally,
    /// Entries in both that are identical.
    pub unchanged: Tally,
}

impl Classes {
    fn tally(&mut self, change: Change, bytes: u64) {
        let t = match change {
            Change::Added => &mut self.added,
            Change::Changed => &mut self.changed,
            Change::Removed => &mut self.removed,
            Change::Unchanged => &mut self.unchanged,
        };
        t.count += 1;
        t.bytes = t.bytes.saturating_add(bytes);
    }
}

/// Which entry of the next manifest a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryRef {
    /// `tensors[i]` of the manifest.
    Tensor(usize),
    /// `files[i]` of the manifest.
    File(usize),
}

/// One chunk of the next version that the receiver does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedChunk {
    /// Its entry in the next manifest.
    pub entry: EntryRef,
    /// Chunk index in the entry.
    pub chunk: u32,
    /// Chunk length in bytes.
    pub length: u64,
    /// Whether the previous version has a chunk with this key (so a sparse
    /// delta against it is possible); false for added entries and chunks
    /// past the previous end.
    pub has_base: bool,
}

/// The difference between two versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Delta {
    /// Tensor entries by class.
    pub tensors: Classes,
    /// File entries (safetensors headers and other files) by class.
    pub files: Classes,
    /// Chunks in the next version.
    pub chunks_total: u64,
    /// Bytes in the next version.
    pub bytes_total: u64,
    /// Chunks that must move.
    pub chunks_changed: u64,
    /// Bytes that must move without sparse encoding.
    pub bytes_changed: u64,
    /// Names of removed tensors, sorted.
    pub removed_tensors: Vec<String>,
    /// Paths of removed file entries, sorted.
    pub removed_files: Vec<String>,
    /// The chunks that must move, in manifest order (tensors, then files).
    #[serde(skip)]
    pub changed: Vec<ChangedChunk>,
}

impl Delta {
    /// Share of the next version's bytes that must move, in percent.
    pub fn changed_percent(&self) -> f64 {
        if self.bytes_total == 0 {
            return 0.0;
        }
        self.bytes_changed as f64 * 100.0 / self.bytes_total as f64
    }
}

/// Computes what must move to turn `prev` into `next`.
///
/// ```
/// use bstack_plan::example;
/// let next = example::weight_manifest("v1");
/// let delta = hotweights::delta::compute(&next, &next);
/// assert_eq!(delta.chunks_changed, 0);
/// ```
pub fn compute(prev: &WeightManifest, next: &WeightManifest) -> Delta {
    let mut delta = Delta::default();

    // Tensors are many (a million chunks is a quarter of a million tensors):
    // compare them in parallel blocks, then merge the blocks in order.
    let (matched, removed) = pair(&prev.tensors, &next.tensors, |t| t.name.as_str());
    let blocks: Vec<Delta> = next
        .tensors
        .par_chunks(BLOCK)
        .zip(matched.par_chunks(BLOCK))
        .enumerate()
        .map(|(b, (tensors, matched))| {
            let mut part = Delta::default();
            for (k, (t, old)) in tensors.iter().zip(matched).enumerate() {
                let same_meta = old.is_some_and(|o| {
                    o.dtype == t.dtype && o.shape == t.shape && o.length == t.length
                });
                let moved = diff_chunks(
                    &mut part,
                    EntryRef::Tensor(b * BLOCK + k),
                    old.map(|o| o.chunks.as_slice()),
                    &t.chunks,
                );
                part.tensors
                    .tally(classify(old.is_some(), moved, same_meta), t.length);
            }
            part
        })
        .collect();
    for part in blocks {
        delta.absorb(part);
    }
    for t in removed {
        delta.tensors.tally(Change::Removed, t.length);
        delta.removed_tensors.push(t.name.clone());
    }

    let (matched, removed) = pair(&prev.files, &next.files, |f| f.path.as_str());
    for (i, (f, old)) in next.files.iter().zip(matched).enumerate() {
        let same_meta = old.is_some_and(|o| o.offset == f.offset && o.length == f.length);
        let moved = diff_chunks(
            &mut delta,
            EntryRef::File(i),
            old.map(|o| o.chunks.as_slice()),
            &f.chunks,
        );
        delta
            .files
            .tally(classify(old.is_some(), moved, same_meta), f.length);
    }
    for f in removed {
        delta.files.tally(Change::Removed, f.length);
        delta.removed_files.push(f.path.clone());
    }
    delta.removed_tensors.sort_unstable();
    delta.removed_files.sort_unstable();
    delta
}

/// Tensors per parallel block of [`compute`].
const BLOCK: usize = 4096;

impl Delta {
    /// Adds the counts and changed chunks of a later block of tensors.
    fn absorb(&mut self, part: Delta) {
        for (mine, theirs) in [
            (&mut self.tensors.added, part.tensors.added),
            (&mut self.tensors.changed, part.tensors.changed),
            (&mut self.tensors.unchanged, part.tensors.unchanged),
        ] {
            mine.count += theirs.count;
            mine.bytes = mine.bytes.saturating_add(theirs.bytes);
        }
        self.chunks_total += part.chunks_total;
        self.bytes_total = self.bytes_total.saturating_add(part.bytes_total);
        self.chunks_changed += part.chunks_changed;
        self.bytes_changed = self.bytes_changed.saturating_add(part.bytes_changed);
        if self.changed.is_empty() {
            self.changed = part.changed;
        } else {
            self.changed.extend(part.changed);
        }
    }
}

/// For each entry of `next`, its namesake in `prev`; and the entries of
/// `prev` that `next` lacks. Manifests list entries sorted by name, which
/// allows a merge in one pass with no hashing; any other order falls back to
/// a hash map.
fn pair<'a, T>(
    prev: &'a [T],
    next: &'a [T],
    key: impl Fn(&T) -> &str,
) -> (Vec<Option<&'a T>>, Vec<&'a T>) {
    let sorted = |list: &[T]| list.windows(2).all(|w| key(&w[0]) < key(&w[1]));
    if sorted(prev) && sorted(next) {
        let (mut matched, mut removed) = (Vec::with_capacity(next.len()), Vec::new());
        let mut p = 0;
        for n in next {
            while p < prev.len() && key(&prev[p]) < key(n) {
                removed.push(&prev[p]);
                p += 1;
            }
            if p < prev.len() && key(&prev[p]) == key(n) {
                matched.push(Some(&prev[p]));
                p += 1;
            } else {
                matched.push(None);
            }
        }
        removed.extend(&prev[p..]);
        return (matched, removed);
    }
    let by_key: HashMap<&str, &T> = prev.iter().map(|e| (key(e), e)).collect();
    let matched = next.iter().map(|n| by_key.get(key(n)).copied()).collect();
    let present: std::collections::HashSet<&str> = next.iter().map(&key).collect();
    let removed = prev.iter().filter(|e| !present.contains(key(e))).collect();
    (matched, removed)
}

fn classify(existed: bool, moved: bool, same_meta: bool) -> Change {
    match (existed, moved || !same_meta) {
        (false, _) => Change::Added,
        (true, true) => Change::Changed,
        (true, false) => Change::Unchanged,
    }
}

/// Records the chunks of `next` that `old` lacks; true if there was any.
fn diff_chunks(delta: &mut Delta, entry: EntryRef, old: Option<&[Chunk]>, next: &[Chunk]) -> bool {
    let old = old.unwrap_or_default();
    let before = delta.changed.len();
    for (i, c) in next.iter().enumerate() {
        delta.chunks_total += 1;
        delta.bytes_total = delta.bytes_total.saturating_add(c.length);
        let base = old.get(i);
        if base.is_some_and(|b| b.hash == c.hash && b.length == c.length) {
            continue;
        }
        delta.chunks_changed += 1;
        delta.bytes_changed = delta.bytes_changed.saturating_add(c.length);
        delta.changed.push(ChangedChunk {
            entry,
            chunk: c.index,
            length: c.length,
            has_base: base.is_some_and(|b| b.length == c.length),
        });
    }
    delta.changed.len() > before
}
