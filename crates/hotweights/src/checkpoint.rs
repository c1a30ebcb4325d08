//! Reading a checkpoint directory: which files it holds and where every
//! tensor lives in them.
//!
//! A checkpoint is a directory of safetensors files, single (`model.safetensors`)
//! or sharded (`model-00001-of-00004.safetensors`, ... with
//! `model.safetensors.index.json` naming the shard of every tensor), plus
//! other files (config, tokenizer, ...). Only headers are read here; the
//! bytes are read when hashing.
//!
//! Every byte of every file is accounted for: a safetensors file is its
//! header (the 8-byte length and the JSON) followed by tensor data that the
//! format requires to be contiguous, so the header and the tensors tile the
//! file exactly. That is what lets a checkpoint be rebuilt byte for byte from
//! its manifest.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{HotweightsError, Result};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Headers larger than this are refused, as the safetensors format does.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFile {
    /// Path relative to the checkpoint directory, with `/` separators.
    pub path: String,
    /// Size in bytes.
    pub length: u64,
    /// For a safetensors file: its header length (8-byte prefix included)
    /// and its tensors, in file order. `None` for other files.
    pub safetensors: Option<SafetensorsLayout>,
}

/// Where the tensors of one safetensors file are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsLayout {
    /// Bytes before the first tensor: the 8-byte header length and the JSON header.
    pub header_bytes: u64,
    /// The tensors, in file order.
    pub tensors: Vec<TensorLocation>,
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    /// Tensor name.
    pub name: String,
    /// Element type, safetensors spelling (`BF16`).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Byte offset from the start of the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// A checkpoint directory, with every file found and every safetensors
/// header parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The directory.
    pub root: PathBuf,
    /// Its files, sorted by path. Hidden files and directories (names
    /// starting with `.`) are skipped.
    pub files: Vec<CheckpointFile>,
}

impl Checkpoint {
    /// Reads the directory: lists its files, parses every safetensors header,
    /// and checks the index file (if any) against the shards.
    pub fn open(root: &Path) -> Result<Checkpoint> {
        let mut paths = Vec::new();
        list_files(root, root, &mut paths)?;
        paths.sort();
        let mut files = Vec::with_capacity(paths.len());
        for rel in paths {
            let full = root.join(&rel);
            let length = std::fs::metadata(&full)
                .map_err(|e| HotweightsError::io(&full, e))?
                .len();
            let safetensors = if rel.ends_with(".safetensors") {
                Some(read_layout(&full, length)?)
            } else {
                None
            };
            files.push(CheckpointFile {
                path: rel,
                length,
                safetensors,
            });
        }
        let checkpoint = Checkpoint {
            root: root.to_owned(),
            files,
        };
        checkpoint.check_unique_tensors()?;
        if checkpoint.files.iter().any(|f| f.path == INDEX_FILE) {
            checkpoint.check_index(&root.join(INDEX_FILE))?;
        }
        Ok(checkpoint)
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.length).sum()
    }

    fn check_unique_tensors(&self) -> Result<()> {
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for file in &self.files {
            for t in file.safetensors.iter().flat_map(|s| &s.tensors) {
                if let Some(first) = seen.insert(&t.name, &file.path) {
                    return Err(HotweightsError::DuplicateTensor {
                        name: t.name.clone(),
                        first: first.to_owned(),
                        second: file.path.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Every shard the index names exists, and holds the tensors the index
    /// says it holds.
    fn check_index(&self, path: &Path) -> Result<()> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let fail = |message: String| HotweightsError::Index {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| HotweightsError::io(path, e))?;
        let index: Index =
            serde_json::from_str(&text).map_err(|e| fail(format!("not a valid index: {e}")))?;
        let by_path: HashMap<&str, &CheckpointFile> =
            self.files.iter().map(|f| (f.path.as_str(), f)).collect();
        for (tensor, shard) in &index.weight_map {
            let Some(file) = by_path.get(shard.as_str()) else {
                return Err(fail(format!(
                    "names shard {shard:?} (for tensor {tensor:?}), which is missing"
                )));
            };
            let holds = file
                .safetensors
                .iter()
                .flat_map(|s| &s.tensors)
                .any(|t| &t.name == tensor);
            if !holds {
                return Err(fail(format!(
                    "says tensor {tensor:?} is in {shard}, which does not hold it"
                )));
            }
        }
        Ok(())
    }
}

/// Appends the paths (relative, `/`-separated) of the regular files under `dir`.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| HotweightsError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| HotweightsError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(HotweightsError::io(
                entry.path(),
                std::io::Error::new(std::io::ErrorKind::InvalidData, "file name is not UTF-8"),
            ));
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: model hub caches link snapshot files to blobs.
        let meta = std::fs::metadata(&path).map_err(|e| HotweightsError::io(&path, e))?;
        if meta.is_dir() {
            list_files(root, &path, out)?;
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
            out.push(parts.join("/"));
        }
    }
    Ok(())
}

/// Reads and checks the header of one safetensors file. Deserializing the
/// crate's `Metadata` runs its checks (known dtypes, offsets contiguous from
/// 0, each tensor's size equal to dtype x shape); what is left is that the
/// data section is exactly as long as the header says.
fn read_layout(path: &Path, file_len: u64) -> Result<SafetensorsLayout> {
    let bad = |message: String| HotweightsError::Safetensors {
        path: path.to_owned(),
        message,
    };
    let mut file = File::open(path).map_err(|e| HotweightsError::io(path, e))?;
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| {
        bad(format!(
            "{file_len} bytes is too short for the 8-byte header length"
        ))
    })?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(bad(format!(
            "header length {header_len} does not fit: the file is {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| HotweightsError::io(path, e))?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| bad(explain_header(&header).unwrap_or_else(|| format!("header: {e}"))))?;
    let data_len = file_len - 8 - header_len;
    if metadata.data_len() as u64 != data_len {
        return Err(bad(format!(
            "the header describes {} bytes of tensor data, but the file holds {data_len} \
             (truncated, or bytes that no tensor owns)",
            metadata.data_len()
        )));
    }
    let tensors = metadata
        .offset_keys()
        .into_iter()
        .filter_map(|name| {
            let info = metadata.info(&name)?;
            let (start, stop) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
            Some(TensorLocation {
                dtype: format!("{:?}", info.dtype),
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                offset: 8 + header_len + start,
                length: stop - start,
                name,
            })
        })
        .collect();
    Ok(SafetensorsLayout {
        header_bytes: 8 + header_len,
        tensors,
    })
}

/// Names the tensor whose shape and dtype disagree with its offsets, which
/// the safetensors crate reports without a name.
fn explain_header(header: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Info {
        dtype: String,
        shape: Vec<u64>,
        data_offsets: (u64, u64),
    }
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    map.into_iter().filter(|(name, _)| name != "__metadata__").find_map(|(name, value)| {
        let info: Info = serde_json::from_value(value).ok()?;
        let held = info.data_offsets.1.checked_sub(info.data_offsets.0)?;
        let needed = bstack_plan::dtype::tensor_bytes(&info.dtype, &info.shape)?;
        (held != needed).then(|| {
            format!(
                "tensor {name:?}: shape {:?} of {} takes {needed} bytes, but data_offsets [{}, {}] hold {held}",
                info.shape, info.dtype, info.data_offsets.0, info.data_offsets.1
            )
        })
    })
}
