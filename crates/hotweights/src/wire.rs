//! The wire form of a plan's buckets: what a source sends over the data
//! plane, and how a receiver turns it back into the buckets' bytes.
//!
//! A bucket is sent as the records of its items, in plan order; the
//! alignment padding between items is not sent. Each record is:
//!
//! | bytes | content |
//! |---|---|
//! | 0 | kind: `0` raw, `1` sparse |
//! | 1..9 | payload length, u64 little-endian |
//! | 9.. | payload |
//!
//! - **raw**: the item's bytes as they are (`length` of the item).
//! - **sparse**: a [`crate::sparse`] delta, `zstd(old XOR new)`, of the whole
//!   chunk against the chunk of the same entry and index in the plan's
//!   `from` version, which every receiver holds. The [`Encoder`] sends one
//!   only for whole-chunk items whose old chunk it can read (the source was
//!   given the previous checkpoint), with the same length, and only when the
//!   delta is smaller than the chunk: between two RL steps that is most
//!   chunks, at a few percent of their size.
//!
//! The record stream of a bucket is cut into data-plane pieces at any byte;
//! pieces of one bucket arrive in order (the data plane delivers in
//! sequence), and the [`Decoder`] rebuilds each item as soon as its record
//! is complete, so a receiver never holds more than one bucket plus one
//! record. A sparse record is checked against the new chunk's hash as it is
//! decoded; every chunk is checked again when the store stages it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bstack_plan::{HashAlgorithm, SwapPlan, WeightManifest};

use crate::dataplane::Payload;
use crate::error::{HotweightsError, Result};
use crate::source::{ChunkLoc, EntryIndex, read_range};

/// A raw record.
pub const RAW: u8 = 0;
/// A sparse record.
pub const SPARSE: u8 = 1;
const HEADER: usize = 9;

/// A chunk named by value, so encoders and decoders own what they need.
#[derive(Debug, Clone)]
pub struct OwnedChunk {
    name: String,
    is_file: bool,
    index: u32,
    file: String,
    offset: u64,
    length: u64,
    hash: String,
    algorithm: HashAlgorithm,
}

impl OwnedChunk {
    fn of(loc: &ChunkLoc<'_>) -> OwnedChunk {
        OwnedChunk {
            name: loc.name.to_owned(),
            is_file: loc.is_file,
            index: loc.index,
            file: loc.file.to_owned(),
            offset: loc.offset,
            length: loc.length,
            hash: loc.hash.to_owned(),
            algorithm: loc.algorithm,
        }
    }

    /// The chunk as a [`ChunkLoc`].
    pub fn loc(&self) -> ChunkLoc<'_> {
        ChunkLoc {
            name: &self.name,
            is_file: self.is_file,
            index: self.index,
            file: &self.file,
            offset: self.offset,
            length: self.length,
            hash: &self.hash,
            algorithm: self.algorithm,
        }
    }
}

/// One item to send.
#[derive(Debug)]
struct Job {
    bucket: u32,
    /// Where the item's new bytes are: file, offset, length.
    new: (PathBuf, u64, u64),
    /// For a whole-chunk item whose old chunk the source can read: the old
    /// chunk, in the previous checkpoint.
    old: Option<OwnedChunk>,
}

/// A plan's buckets as wire records, cut into data-plane payloads.
#[derive(Debug)]
pub struct Encoder {
    jobs: std::vec::IntoIter<Job>,
    prev_root: Option<PathBuf>,
    piece_bytes: usize,
    bucket: Option<u32>,
    offset: u64,
    buffer: Vec<u8>,
    peeked: Option<Job>,
    /// Payload bytes of raw records so far.
    pub raw_bytes: u64,
    /// Chunk bytes sent as sparse records so far, and their wire size.
    pub sparse: (u64, u64),
}

impl Encoder {
    /// An encoder of `plan`'s buckets, reading new bytes from `dir` (the
    /// `to` checkpoint) and, when `prev` names the `from` version's manifest
    /// and checkpoint directory, sending sparse records where they are
    /// smaller.
    pub fn new(
        plan: &SwapPlan,
        dir: &Path,
        prev: Option<(&WeightManifest, &Path)>,
        piece_bytes: usize,
    ) -> Result<Encoder> {
        let Some(to) = plan.to.as_ref() else {
            return Err(HotweightsError::Mismatch(
                "the plan has no `to` manifest".into(),
            ));
        };
        let from_version = plan.from.as_ref().map(|m| m.version.as_str());
        let prev = prev.filter(|(m, _)| Some(m.version.as_str()) == from_version);
        let new_index = EntryIndex::new(to);
        let old_index = prev.map(|(m, _)| EntryIndex::new(m));
        let mut jobs = Vec::new();
        for b in &plan.buckets {
            for item in &b.items {
                let Some(loc) = new_index.chunk(item.is_file, &item.name, item.chunk) else {
                    return Err(HotweightsError::Mismatch(format!(
                        "bucket {} holds chunk {} of {:?}, which the `to` manifest lacks",
                        b.id, item.chunk, item.name
                    )));
                };
                let whole = item.chunk_offset == 0 && item.length == loc.length;
                let old = old_index
                    .as_ref()
                    .filter(|_| whole)
                    .and_then(|ix| ix.chunk(item.is_file, &item.name, item.chunk))
                    .filter(|o| o.length == loc.length && o.hash != loc.hash)
                    .map(|o| OwnedChunk::of(&o));
                let offset = loc.offset.checked_add(item.chunk_offset).ok_or_else(|| {
                    HotweightsError::Mismatch(format!("{}: offset overflows", loc.describe()))
                })?;
                jobs.push(Job {
                    bucket: b.id,
                    new: (dir.join(loc.file), offset, item.length),
                    old,
                });
            }
        }
        Ok(Encoder {
            jobs: jobs.into_iter(),
            prev_root: prev.map(|(_, p)| p.to_owned()),
            piece_bytes: piece_bytes.max(1),
            bucket: None,
            offset: 0,
            buffer: Vec::new(),
            peeked: None,
            raw_bytes: 0,
            sparse: (0, 0),
        })
    }

    /// Appends one job's record to the buffer.
    fn encode(&mut self, job: &Job) -> Result<()> {
        let (path, offset, length) = &job.new;
        let new = read_range(path, *offset, *length)?;
        if let (Some(old), Some(root)) = (&job.old, &self.prev_root) {
            let old_path = root.join(&old.file);
            let old_bytes = read_range(&old_path, old.offset, old.length)?;
            old.loc().verify(&old_bytes, &old_path)?;
            if let Some(delta) = crate::sparse::encode(&old_bytes, &new)? {
                self.buffer.push(SPARSE);
                self.buffer
                    .extend_from_slice(&(delta.len() as u64).to_le_bytes());
                self.buffer.extend_from_slice(&delta);
                self.sparse.0 += new.len() as u64;
                self.sparse.1 += delta.len() as u64;
                return Ok(());
            }
        }
        self.buffer.push(RAW);
        self.buffer
            .extend_from_slice(&(new.len() as u64).to_le_bytes());
        self.buffer.extend_from_slice(&new);
        self.raw_bytes += new.len() as u64;
        Ok(())
    }

    fn step(&mut self) -> Result<Option<Payload>> {
        loop {
            // Fill the buffer from the current bucket's jobs.
            while self.buffer.len() < self.piece_bytes {
                let job = match self.peeked.take().or_else(|| self.jobs.next()) {
                    Some(j) => j,
                    None => break,
                };
                if self.bucket.is_some_and(|b| b != job.bucket) {
                    self.peeked = Some(job);
                    break;
                }
                self.bucket = Some(job.bucket);
                self.encode(&job)?;
            }
            let Some(bucket) = self.bucket else {
                return Ok(None);
            };
            if !self.buffer.is_empty() {
                let n = self.buffer.len().min(self.piece_bytes);
                let bytes: Vec<u8> = self.buffer.drain(..n).collect();
                let payload = Payload {
                    bucket,
                    offset: self.offset,
                    bytes,
                };
                self.offset += n as u64;
                return Ok(Some(payload));
            }
            // The bucket is done: on to the next one.
            self.bucket = None;
            self.offset = 0;
            if self.peeked.is_none() {
                match self.jobs.next() {
                    Some(j) => self.peeked = Some(j),
                    None => return Ok(None),
                }
            }
        }
    }
}

impl Iterator for Encoder {
    type Item = Result<Payload>;
    fn next(&mut self) -> Option<Result<Payload>> {
        self.step().transpose()
    }
}

/// One item to rebuild.
#[derive(Debug)]
struct Slot {
    bucket_offset: u64,
    length: u64,
    /// The new chunk, when the item is the whole chunk (a sparse record
    /// may arrive).
    new: Option<OwnedChunk>,
    /// The old chunk of the same entry and index, when the receiver's
    /// `from` manifest has one of the same length.
    old: Option<OwnedChunk>,
}

#[derive(Debug)]
struct BucketState {
    /// Whole chunks rebuilt and not yet taken: (slot index).
    ready: Vec<usize>,
    slots: Vec<Slot>,
    next: usize,
    wire: u64,
    pending: Vec<u8>,
    /// The bucket's bytes, allocated with the first record.
    out: Vec<u8>,
    capacity: u64,
}

/// Rebuilds a plan's buckets from their wire records. See the module
/// documentation.
#[derive(Debug)]
pub struct Decoder {
    buckets: HashMap<u32, BucketState>,
}

impl Decoder {
    /// A decoder for `plan`; `from` is the receiver's manifest of the plan's
    /// `from` version (needed only for sparse records).
    pub fn new(plan: &SwapPlan, from: Option<&WeightManifest>) -> Result<Decoder> {
        let Some(to) = plan.to.as_ref() else {
            return Err(HotweightsError::Mismatch(
                "the plan has no `to` manifest".into(),
            ));
        };
        let new_index = EntryIndex::new(to);
        let old_index = from.map(EntryIndex::new);
        let mut buckets = HashMap::new();
        for b in &plan.buckets {
            let mut slots = Vec::new();
            for item in &b.items {
                let end = item.bucket_offset.checked_add(item.length);
                if end.is_none_or(|e| e > b.capacity) {
                    return Err(HotweightsError::Mismatch(format!(
                        "an item of bucket {} lies past its capacity",
                        b.id
                    )));
                }
                let loc = new_index.chunk(item.is_file, &item.name, item.chunk);
                let whole = loc.filter(|l| item.chunk_offset == 0 && item.length == l.length);
                let old = old_index
                    .as_ref()
                    .filter(|_| whole.is_some())
                    .and_then(|ix| ix.chunk(item.is_file, &item.name, item.chunk))
                    .filter(|o| Some(o.length) == whole.map(|w| w.length))
                    .map(|o| OwnedChunk::of(&o));
                slots.push(Slot {
                    bucket_offset: item.bucket_offset,
                    length: item.length,
                    new: whole.map(|w| OwnedChunk::of(&w)),
                    old,
                });
            }
            buckets.insert(
                b.id,
                BucketState {
                    ready: Vec::new(),
                    slots,
                    next: 0,
                    wire: 0,
                    pending: Vec::new(),
                    out: Vec::new(),
                    capacity: b.capacity,
                },
            );
        }
        Ok(Decoder { buckets })
    }

    /// Feeds one piece (bytes at `offset` of `bucket`'s record stream).
    /// `old` reads a chunk of the `from` version (verified). Returns the
    /// item bytes completed by this piece.
    pub fn feed(
        &mut self,
        bucket: u32,
        offset: u64,
        bytes: &[u8],
        old: &dyn Fn(&ChunkLoc<'_>) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let Some(state) = self.buckets.get_mut(&bucket) else {
            return Err(HotweightsError::Mismatch(format!(
                "a piece of bucket {bucket}, which the plan does not have"
            )));
        };
        if offset != state.wire {
            return Err(HotweightsError::Mismatch(format!(
                "bucket {bucket}: a piece at wire offset {offset}, expected {}",
                state.wire
            )));
        }
        state.wire += bytes.len() as u64;
        state.pending.extend_from_slice(bytes);
        let mut done = 0u64;
        let mut at = 0usize;
        loop {
            let rest = &state.pending[at..];
            if rest.len() < HEADER {
                break;
            }
            let Some(slot) = state.slots.get(state.next) else {
                return Err(HotweightsError::Mismatch(format!(
                    "bucket {bucket}: bytes after its last item"
                )));
            };
            let kind = rest[0];
            let mut len = [0u8; 8];
            len.copy_from_slice(&rest[1..HEADER]);
            let len = u64::from_le_bytes(len);
            // Neither record can be longer than its item: a sparse record is
            // sent only when smaller.
            if len > slot.length {
                return Err(HotweightsError::Mismatch(format!(
                    "bucket {bucket}: a record of {len} bytes for an item of {}",
                    slot.length
                )));
            }
            let total = HEADER + len as usize;
            if rest.len() < total {
                break;
            }
            let payload = &rest[HEADER..total];
            if state.out.is_empty() {
                state.out = vec![0u8; state.capacity as usize];
            }
            let range = slot.bucket_offset as usize..(slot.bucket_offset + slot.length) as usize;
            match kind {
                RAW => {
                    if len != slot.length {
                        return Err(HotweightsError::Mismatch(format!(
                            "bucket {bucket}: a raw record of {len} bytes for an item of {}",
                            slot.length
                        )));
                    }
                    state.out[range].copy_from_slice(payload);
                }
                SPARSE => {
                    let (Some(new), Some(old_chunk)) = (&slot.new, &slot.old) else {
                        return Err(HotweightsError::Mismatch(format!(
                            "bucket {bucket}: a sparse record for an item without an old chunk of the same size here"
                        )));
                    };
                    let old_bytes = old(&old_chunk.loc())?;
                    let rebuilt = crate::sparse::decode_verified(
                        &old_bytes,
                        payload,
                        new.algorithm,
                        &new.hash,
                    )?;
                    state.out[range].copy_from_slice(&rebuilt);
                }
                other => {
                    return Err(HotweightsError::Mismatch(format!(
                        "bucket {bucket}: unknown record kind {other}"
                    )));
                }
            }
            done += slot.length;
            if slot.new.is_some() {
                state.ready.push(state.next);
            }
            state.next += 1;
            at += total;
        }
        state.pending.drain(..at);
        Ok(done)
    }

    /// The whole chunks of `bucket` rebuilt since the last call, with their
    /// bytes (not yet checked against their hash: raw records are checked
    /// by whoever stores them), so a receiver can store them while the
    /// rest arrives.
    pub fn take_ready(&mut self, bucket: u32) -> Vec<(OwnedChunk, Vec<u8>)> {
        let Some(state) = self.buckets.get_mut(&bucket) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for i in std::mem::take(&mut state.ready) {
            let Some(slot) = state.slots.get(i) else {
                continue;
            };
            let Some(chunk) = &slot.new else {
                continue;
            };
            let start = slot.bucket_offset as usize;
            let end = start + slot.length as usize;
            if let Some(bytes) = state.out.get(start..end) {
                out.push((chunk.clone(), bytes.to_vec()));
            }
        }
        out
    }

    /// Whether every item of `bucket` has been rebuilt.
    pub fn is_complete(&self, bucket: u32) -> bool {
        self.buckets
            .get(&bucket)
            .is_some_and(|s| s.next == s.slots.len())
    }

    /// The rebuilt buckets, once every item of every bucket arrived.
    pub fn finish(self) -> Result<HashMap<u32, Vec<u8>>> {
        let mut out = HashMap::new();
        for (id, s) in self.buckets {
            if s.next != s.slots.len() || !s.pending.is_empty() {
                return Err(HotweightsError::Mismatch(format!(
                    "bucket {id} arrived with {} of its {} items",
                    s.next,
                    s.slots.len()
                )));
            }
            let bytes = if s.out.is_empty() {
                vec![0u8; s.capacity as usize]
            } else {
                s.out
            };
            out.insert(id, bytes);
        }
        Ok(out)
    }
}
