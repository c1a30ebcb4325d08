//! Publishing: the manifest of a checkpoint directory.
//!
//! Every tensor becomes a manifest entry with its dtype, shape, file, byte
//! offset and length, split into fixed-size chunks that are hashed one by
//! one, so that a later delta moves only the chunks that changed. Every other
//! byte is an entry too: each safetensors header (the file's first bytes) and
//! every other file (config, tokenizer, ...), chunked the same way. The
//! entries therefore tile every file, and a checkpoint can be rebuilt from
//! its manifest byte for byte.
//!
//! Chunks are hashed in parallel on all cores, reading the files through
//! memory maps. The output is deterministic: the same directory gives a
//! byte-identical manifest (tensors sorted by name, files by path and
//! offset, no timestamp).

use std::fs::File;
use std::path::Path;

use bstack_plan::{Chunk, FileEntry, HashAlgorithm, SCHEMA_VERSION, TensorEntry, WeightManifest};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::error::{HotweightsError, Result};
use crate::hash::hash_hex;

/// Default chunk size: 4 MiB, small enough that a fine-tune touching part of
/// a tensor moves little, large enough that a 70B model has ~35k chunks.
pub const DEFAULT_CHUNK_BYTES: u64 = 4 << 20;

/// What to publish a checkpoint as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOptions {
    /// Model identity; `None` takes the checkpoint directory's name.
    pub model_id: Option<String>,
    /// Version label of these weights.
    pub version: String,
    /// Chunk size in bytes; > 0.
    pub chunk_bytes: u64,
    /// Hash function for the chunks.
    pub hash: HashAlgorithm,
}

impl PublishOptions {
    /// Options for `version` with the defaults: 4 MiB chunks, BLAKE3.
    pub fn new(version: impl Into<String>) -> Self {
        PublishOptions {
            model_id: None,
            version: version.into(),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            hash: HashAlgorithm::Blake3,
        }
    }
}

/// A byte range of a file to be chunked and hashed, and what it becomes.
struct Region {
    file: usize,
    offset: u64,
    length: u64,
    /// First chunk job of this region.
    first_job: usize,
    entry: Entry,
}

enum Entry {
    Tensor {
        name: String,
        dtype: String,
        shape: Vec<u64>,
    },
    File,
}

/// One chunk to hash: bytes [start, start + length) of file `file`.
struct Job {
    file: usize,
    start: u64,
    length: u64,
}

/// Reads `dir` and returns its manifest. `progress` is called with the
/// number of bytes of each chunk as it is hashed (from several threads).
///
/// ```no_run
/// use hotweights::{PublishOptions, publish};
///
/// let manifest = publish("ckpt/step-1200".as_ref(), &PublishOptions::new("step-1200"), &|_| {})?;
/// println!("{} tensors", manifest.tensors.len());
/// # Ok::<(), hotweights::HotweightsError>(())
/// ```
pub fn publish(
    dir: &Path,
    options: &PublishOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<WeightManifest> {
    check_options(options)?;
    let checkpoint = Checkpoint::open(dir)?;
    publish_checkpoint(&checkpoint, options, progress)
}

fn check_options(options: &PublishOptions) -> Result<()> {
    if options.chunk_bytes == 0 {
        return Err(HotweightsError::Option("the chunk size must be > 0".into()));
    }
    if options.version.is_empty() {
        return Err(HotweightsError::Option(
            "the version must not be empty".into(),
        ));
    }
    if hash_hex(options.hash, b"").is_none() {
        return Err(HotweightsError::Option(
            "choose a hash algorithm: blake3 or sha256".into(),
        ));
    }
    Ok(())
}

/// [`publish`] for a checkpoint already opened.
pub fn publish_checkpoint(
    checkpoint: &Checkpoint,
    options: &PublishOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<WeightManifest> {
    check_options(options)?;
    let chunk = options.chunk_bytes;
    let mut regions = Vec::new();
    let mut jobs = Vec::new();
    let mut add = |file: usize, offset: u64, length: u64, entry: Entry| {
        regions.push(Region {
            file,
            offset,
            length,
            first_job: jobs.len(),
            entry,
        });
        let mut start = 0;
        while start < length {
            let len = chunk.min(length - start);
            jobs.push(Job {
                file,
                start: offset + start,
                length: len,
            });
            start += len;
        }
    };
    for (i, file) in checkpoint.files.iter().enumerate() {
        match &file.safetensors {
            Some(layout) => {
                add(i, 0, layout.header_bytes, Entry::File);
                for t in &layout.tensors {
                    let entry = Entry::Tensor {
                        name: t.name.clone(),
                        dtype: t.dtype.clone(),
                        shape: t.shape.clone(),
                    };
                    add(i, t.offset, t.length, entry);
                }
            }
            None => add(i, 0, file.length, Entry::File),
        }
    }

    let maps = checkpoint
        .files
        .iter()
        .map(|f| map_file(&checkpoint.root.join(&f.path), f.length))
        .collect::<Result<Vec<_>>>()?;
    let hashes: Vec<String> = jobs
        .par_iter()
        .map(|job| {
            let bytes = maps[job.file]
                .as_deref()
                .and_then(|m| m.get(job.start as usize..(job.start + job.length) as usize))
                .unwrap_or_default();
            let hex = hash_hex(options.hash, bytes).unwrap_or_default();
            progress(job.length);
            hex
        })
        .collect();

    let mut manifest = WeightManifest {
        schema_version: SCHEMA_VERSION,
        model_id: options
            .model_id
            .clone()
            .unwrap_or_else(|| default_model_id(&checkpoint.root)),
        version: options.version.clone(),
        hash_algorithm: options.hash as i32,
        chunk_bytes: chunk,
        ..Default::default()
    };
    for region in regions {
        let chunks = (0..region.length.div_ceil(chunk))
            .map(|c| Chunk {
                index: c as u32,
                offset: c * chunk,
                length: chunk.min(region.length - c * chunk),
                hash: hashes[region.first_job + c as usize].clone(),
            })
            .collect();
        let path = checkpoint.files[region.file].path.clone();
        match region.entry {
            Entry::Tensor { name, dtype, shape } => manifest.tensors.push(TensorEntry {
                name,
                dtype,
                shape,
                file: path,
                offset: region.offset,
                length: region.length,
                chunks,
            }),
            Entry::File => manifest.files.push(FileEntry {
                path,
                offset: region.offset,
                length: region.length,
                hash: String::new(),
                chunks,
            }),
        }
    }
    manifest.tensors.sort_by(|a, b| a.name.cmp(&b.name));
    manifest
        .files
        .sort_by(|a, b| (&a.path, a.offset).cmp(&(&b.path, b.offset)));
    Ok(manifest)
}

fn default_model_id(root: &Path) -> String {
    root.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_owned())
}

/// Maps a file for reading; `None` for an empty file, which cannot be mapped.
#[allow(unsafe_code)]
fn map_file(path: &Path, length: u64) -> Result<Option<Mmap>> {
    if length == 0 {
        return Ok(None);
    }
    let file = File::open(path).map_err(|e| HotweightsError::io(path, e))?;
    // SAFETY: the map is only read. If another process truncates the file
    // while it is mapped, reads past the new end fault; checkpoints being
    // published are not being rewritten, and the same race would tear an
    // ordinary read() as well.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| HotweightsError::io(path, e))?;
    if map.len() as u64 != length {
        return Err(HotweightsError::io(
            path,
            std::io::Error::other(format!(
                "changed size while being read: {length} -> {} bytes",
                map.len()
            )),
        ));
    }
    Ok(Some(map))
}
