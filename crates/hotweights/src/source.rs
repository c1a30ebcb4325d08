//! Where chunk bytes come from: a checkpoint directory or a store.
//!
//! A manifest says where each chunk lives (file, offset, length) and what it
//! hashes to; a [`ChunkSource`] fetches those bytes and checks the hash, so
//! every consumer (the wire-size report, `apply`, `export`) reads verified
//! bytes through one interface whether they come from the published files
//! ([`DirSource`]) or from the content-addressed [`Store`](crate::Store).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bstack_plan::{BucketItem, Chunk, HashAlgorithm, WeightManifest};

use crate::error::{HotweightsError, Result};
use crate::hash::hash_hex;

/// One chunk as a manifest describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc<'m> {
    /// Tensor name or file path of the entry.
    pub name: &'m str,
    /// Whether the entry is a file entry.
    pub is_file: bool,
    /// Chunk index in the entry.
    pub index: u32,
    /// File holding the entry, relative to the checkpoint root.
    pub file: &'m str,
    /// Byte offset of the chunk in that file.
    pub offset: u64,
    /// Chunk length.
    pub length: u64,
    /// Expected hash (lowercase hex).
    pub hash: &'m str,
    /// Hash function of the manifest.
    pub algorithm: HashAlgorithm,
}

impl ChunkLoc<'_> {
    /// "chunk 3 of tensor "w"" for messages.
    pub fn describe(&self) -> String {
        let what = if self.is_file { "file" } else { "tensor" };
        format!("chunk {} of {what} {:?}", self.index, self.name)
    }

    /// Checks that `bytes` are this chunk.
    pub fn verify(&self, bytes: &[u8], origin: &Path) -> Result<()> {
        if bytes.len() as u64 != self.length {
            return Err(HotweightsError::Verify(format!(
                "{}: {} is {} bytes, expected {}",
                origin.display(),
                self.describe(),
                bytes.len(),
                self.length
            )));
        }
        let actual = hash_hex(self.algorithm, bytes).ok_or_else(|| {
            HotweightsError::Verify(format!(
                "{}: the manifest names no known hash function",
                self.describe()
            ))
        })?;
        if actual != self.hash {
            return Err(HotweightsError::Verify(format!(
                "{}: {} hashes to {actual}, expected {}",
                origin.display(),
                self.describe(),
                self.hash
            )));
        }
        Ok(())
    }
}

/// A place that can produce a manifest's chunks, verified.
pub trait ChunkSource: Sync {
    /// The bytes of `loc`, checked against its hash.
    fn read_chunk(&self, loc: &ChunkLoc<'_>) -> Result<Vec<u8>>;
}

/// A checkpoint directory laid out as the manifest says (the published
/// directory, or an exported copy).
#[derive(Debug, Clone)]
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    /// A source reading files under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirSource { root: root.into() }
    }
}

impl ChunkSource for DirSource {
    fn read_chunk(&self, loc: &ChunkLoc<'_>) -> Result<Vec<u8>> {
        let path = self.root.join(loc.file);
        read_range(&path, loc.offset, loc.length).and_then(|bytes| {
            loc.verify(&bytes, &path)?;
            Ok(bytes)
        })
    }
}

/// Reads `length` bytes at `offset` of `path`. The range is checked against
/// the file's size before anything is allocated, so a manifest or plan that
/// states a huge length is an error, not an allocation failure.
pub(crate) fn read_range(path: &Path, offset: u64, length: u64) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| HotweightsError::io(path, e))?;
    let size = file
        .metadata()
        .map_err(|e| HotweightsError::io(path, e))?
        .len();
    let short = || {
        HotweightsError::io(
            path,
            std::io::Error::other(format!(
                "ends before byte {}: is this the checkpoint the manifest describes?",
                offset.saturating_add(length)
            )),
        )
    };
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(short());
    }
    let mut bytes = vec![0; length as usize];
    file.read_exact_at(&mut bytes, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            short()
        } else {
            HotweightsError::io(path, e)
        }
    })?;
    Ok(bytes)
}

/// Every chunk of a manifest, located, in manifest order (tensors, then
/// files). Built from the entries themselves, not looked up by name, so a
/// file that appears as several entries yields each entry's own chunks.
pub(crate) fn chunk_locs(m: &WeightManifest) -> impl Iterator<Item = ChunkLoc<'_>> {
    let algorithm = HashAlgorithm::try_from(m.hash_algorithm).unwrap_or(HashAlgorithm::Unspecified);
    let tensors = m.tensors.iter().map(|t| {
        let entry = (false, t.name.as_str(), t.file.as_str(), t.offset);
        (entry, t.chunks.as_slice())
    });
    let files = m.files.iter().map(|f| {
        let entry = (true, f.path.as_str(), f.path.as_str(), f.offset);
        (entry, f.chunks.as_slice())
    });
    tensors
        .chain(files)
        .flat_map(move |((is_file, name, file, offset), chunks)| {
            chunks.iter().enumerate().map(move |(i, c)| ChunkLoc {
                name,
                is_file,
                index: i as u32,
                file,
                offset: offset.saturating_add(c.offset),
                length: c.length,
                hash: c.hash.as_str(),
                algorithm,
            })
        })
}

/// A manifest's entries by (is_file, name), for lookups by key.
pub(crate) struct EntryIndex<'m> {
    algorithm: HashAlgorithm,
    tensors: HashMap<&'m str, (&'m str, u64, &'m [Chunk])>,
    files: HashMap<&'m str, (&'m str, u64, &'m [Chunk])>,
}

impl<'m> EntryIndex<'m> {
    pub(crate) fn new(m: &'m WeightManifest) -> Self {
        EntryIndex {
            algorithm: HashAlgorithm::try_from(m.hash_algorithm)
                .unwrap_or(HashAlgorithm::Unspecified),
            tensors: m
                .tensors
                .iter()
                .map(|t| {
                    (
                        t.name.as_str(),
                        (t.file.as_str(), t.offset, t.chunks.as_slice()),
                    )
                })
                .collect(),
            files: m
                .files
                .iter()
                .map(|f| {
                    (
                        f.path.as_str(),
                        (f.path.as_str(), f.offset, f.chunks.as_slice()),
                    )
                })
                .collect(),
        }
    }

    /// Where chunk `index` of entry (is_file, name) is.
    pub(crate) fn chunk(&self, is_file: bool, name: &str, index: u32) -> Option<ChunkLoc<'m>> {
        let entries = if is_file { &self.files } else { &self.tensors };
        let (key, &(file, entry_offset, chunks)) = entries.get_key_value(name)?;
        let c = chunks.get(index as usize)?;
        Some(ChunkLoc {
            name: key,
            is_file,
            index,
            file,
            offset: entry_offset.checked_add(c.offset)?,
            length: c.length,
            hash: c.hash.as_str(),
            algorithm: self.algorithm,
        })
    }

    /// Where a bucket item's bytes are in the manifest's files: (file, offset).
    pub(crate) fn item_location(&self, item: &BucketItem) -> Option<(&'m str, u64)> {
        let loc = self.chunk(item.is_file, &item.name, item.chunk)?;
        Some((loc.file, loc.offset.checked_add(item.chunk_offset)?))
    }
}
