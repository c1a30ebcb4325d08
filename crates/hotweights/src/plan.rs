//! Planning a rollout: from two manifests to a sealed [`SwapPlan`].
//!
//! [`create`] takes the previous and the next manifest of one model and
//!
//! 1. computes the [`Delta`]: which (entry, chunk) keys
//!    are new or changed, and which entries were removed;
//! 2. groups the changed chunks by the ranks that consume them (a
//!    [`TpGroups`] map from tensor-name globs to ranks), so that a bucket only
//!    goes to ranks that need every byte of it;
//! 3. packs each group into buckets with [`pack`](crate::pack::pack)
//!    (first-fit decreasing, aligned, oversize chunks split);
//! 4. when the directory holding the next version is known, writes the
//!    [`TransferOp`]s that fill each bucket from it (`STORAGE2H`, from
//!    `file:///...` to `device://host/bucket-N`), merging pieces that are
//!    contiguous in both the file and the bucket;
//! 5. seals the plan: its digest is computed last, over the finished plan.
//!
//! The plan carries the whole `to` manifest, the truth of the new version
//! (removed entries are simply absent from it), and the identity of the
//! `from` version (model, version, hash function, chunk size) without its
//! entries: receivers hold those, and [`verify`](crate::verify()) takes the
//! full previous manifest when it is to check the delta. Leaving them out
//! halves the plan's size and the time to seal it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bstack_plan::{
    Bucket, BucketItem, HashAlgorithm, SCHEMA_VERSION, SwapPlan, SwapWindow, TransferKind,
    TransferOp, WeightManifest,
};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use serde::Serialize;

use crate::delta::{self, Delta, EntryRef};
use crate::error::{HotweightsError, Result};
use crate::pack::{self, Piece};
use crate::source::{ChunkSource, EntryIndex};

/// Default bucket size: 512 MiB.
pub const DEFAULT_BUCKET_BYTES: u64 = 512 << 20;
/// Default alignment of items inside a bucket: 256 bytes, what GPU copy
/// engines move fastest.
pub const DEFAULT_ALIGN: u64 = 256;

/// How to plan.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Largest bucket, in bytes.
    pub bucket_bytes: u64,
    /// Alignment of every item inside its bucket; a power of two.
    pub align: u64,
    /// Plan even if the manifests' model ids, hash functions or chunk sizes
    /// differ (with another hash or chunk size, every chunk moves).
    pub force: bool,
    /// Plan identifier; `None` gives `MODEL:FROM->TO`.
    pub plan_id: Option<String>,
    /// Directory holding the next version's files (absolute). With it, the
    /// plan carries the transfer ops that fill its buckets; without it, the
    /// plan has buckets only and its executor must be told where the bytes
    /// are.
    pub source: Option<PathBuf>,
    /// Which ranks consume which tensors; `None`: every rank consumes all.
    pub groups: Option<TpGroups>,
    /// Number of ranks. With it, buckets for every rank name all of them
    /// (`0..world_size`) instead of leaving their consumers empty.
    pub world_size: Option<u32>,
    /// When the swap may happen.
    pub window: SwapWindow,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            align: DEFAULT_ALIGN,
            force: false,
            plan_id: None,
            source: None,
            groups: None,
            world_size: None,
            window: any_time_window(),
        }
    }
}

/// A window that allows the swap at any time and in any wave.
pub fn any_time_window() -> SwapWindow {
    SwapWindow {
        schema_version: SCHEMA_VERSION,
        t_start_ns: 0,
        t_deadline_ns: 0,
        wave_begin: 0,
        wave_end: u64::MAX,
    }
}

/// The bucket size for `--auto`: `alpha` of the free device memory, rounded
/// down to the alignment and at least one alignment unit, so that staging a
/// bucket never takes more than that share of what is free.
pub fn auto_bucket_bytes(free_bytes: u64, alpha: f64, align: u64) -> Result<u64> {
    if !(alpha > 0.0 && alpha <= 1.0) {
        return Err(HotweightsError::Option(format!(
            "alpha must be in (0, 1], not {alpha}"
        )));
    }
    if align == 0 || !align.is_power_of_two() {
        return Err(HotweightsError::Option(format!(
            "the alignment must be a power of two, not {align}"
        )));
    }
    let bytes = (free_bytes as f64 * alpha) as u64;
    Ok((bytes - bytes % align).max(align))
}

/// A finished plan and what it moves.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The sealed plan.
    pub plan: SwapPlan,
    /// The delta it carries.
    pub delta: Delta,
    /// Bucket figures.
    pub report: PlanReport,
}

/// Figures of a plan's buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanReport {
    /// Number of buckets.
    pub buckets: u64,
    /// The bucket size limit used.
    pub bucket_limit: u64,
    /// Sum of bucket capacities: staging memory for the whole rollout.
    pub bucket_bytes: u64,
    /// Bytes of chunk data in the buckets.
    pub staged_bytes: u64,
    /// Alignment padding inside buckets.
    pub padding_bytes: u64,
    /// Capacity of the largest bucket.
    pub largest_bucket: u64,
    /// Chunks split across several buckets.
    pub split_chunks: u64,
    /// Transfer operations (0 when planned without a source directory).
    pub ops: u64,
    /// Distinct consumer-rank sets (1 without a TP-group map).
    pub consumer_sets: u64,
}

/// The address of bucket `id`'s staging buffer in host memory.
pub fn bucket_address(id: u32) -> String {
    format!("device://host/bucket-{id}")
}

/// The bucket id of a [`bucket_address`], if `address` is one.
pub fn parse_bucket_address(address: &str) -> Option<u32> {
    address
        .strip_prefix("device://host/bucket-")?
        .parse()
        .ok()
        .filter(|id: &u32| bucket_address(*id) == address)
}

/// Plans the rollout from `prev` to `next`. Both manifests should be valid
/// ([`bstack_plan::Validate`]); the CLI checks them when it reads them.
///
/// ```
/// use hotweights::plan::{PlanOptions, create};
/// let prev = bstack_plan::example::weight_manifest("v1");
/// let mut next = prev.clone();
/// next.version = "v2".into();
/// next.tensors[0].chunks[0].hash = "ab".repeat(32);
/// let planned = create(&prev, next, &PlanOptions::default())?;
/// assert_eq!(planned.delta.chunks_changed, 1);
/// assert_eq!(planned.plan.digest, planned.plan.compute_digest());
/// # Ok::<(), hotweights::HotweightsError>(())
/// ```
pub fn create(
    prev: &WeightManifest,
    next: WeightManifest,
    options: &PlanOptions,
) -> Result<Planned> {
    check_compatible(prev, &next, options.force)?;
    check_unique_file_paths(&next)?;
    let delta = delta::compute(prev, &next);

    // Group the changed chunks by consumer set; `None` is "every rank".
    let mut sets: BTreeMap<Option<BTreeSet<u32>>, Vec<Piece>> = BTreeMap::new();
    match &options.groups {
        None => {
            let all = delta
                .changed
                .iter()
                .enumerate()
                .map(|(id, c)| Piece {
                    id,
                    length: c.length,
                })
                .collect();
            sets.insert(None, all);
        }
        Some(groups) => {
            // One glob match per tensor, not per chunk.
            let ranks: Vec<Option<BTreeSet<u32>>> = next
                .tensors
                .iter()
                .map(|t| groups.ranks_for(&t.name))
                .collect();
            for (id, c) in delta.changed.iter().enumerate() {
                let set = match c.entry {
                    EntryRef::Tensor(i) => ranks[i].clone(),
                    EntryRef::File(_) => None,
                };
                sets.entry(set).or_default().push(Piece {
                    id,
                    length: c.length,
                });
            }
        }
    }

    let limit = pack::bucket_limit(options.bucket_bytes, options.align)?;
    let mut buckets = Vec::new();
    let mut report = PlanReport {
        bucket_limit: limit,
        consumer_sets: sets.len().max(1) as u64,
        ..PlanReport::default()
    };
    let mut split = BTreeSet::new();
    for (ranks, pieces) in &sets {
        let consumer_ranks: Vec<u32> = match (ranks, options.world_size) {
            (Some(ranks), _) => ranks.iter().copied().collect(),
            (None, Some(w)) => (0..w).collect(),
            (None, None) => Vec::new(),
        };
        for packed in pack::pack(pieces, options.bucket_bytes, options.align)? {
            let id = buckets.len() as u32;
            let items = packed
                .parts
                .iter()
                .map(|p| {
                    let c = &delta.changed[p.id];
                    if p.length < c.length {
                        split.insert(p.id);
                    }
                    let (is_file, name) = entry_name(&next, c.entry);
                    BucketItem {
                        name: name.to_owned(),
                        chunk: c.chunk,
                        chunk_offset: p.piece_offset,
                        length: p.length,
                        bucket_offset: p.bucket_offset,
                        is_file,
                    }
                })
                .collect();
            report.bucket_bytes += packed.used;
            report.largest_bucket = report.largest_bucket.max(packed.used);
            buckets.push(Bucket {
                id,
                capacity: packed.used,
                items,
                consumer_ranks: consumer_ranks.clone(),
            });
        }
    }
    report.buckets = buckets.len() as u64;
    report.split_chunks = split.len() as u64;

    let model = next.model_id.clone();
    let mut plan = SwapPlan {
        schema_version: SCHEMA_VERSION,
        plan_id: options
            .plan_id
            .clone()
            .unwrap_or_else(|| format!("{model}:{}->{}", prev.version, next.version)),
        from: Some(identity(prev)),
        to: Some(next),
        ops: Vec::new(),
        window: Some(options.window),
        buckets,
        digest: String::new(),
    };
    report.staged_bytes = plan.staged_bytes();
    report.padding_bytes = report.bucket_bytes - report.staged_bytes;
    if let Some(source) = &options.source {
        plan.ops = transfer_ops(&plan, source)?;
        report.ops = plan.ops.len() as u64;
    }
    plan.seal();
    Ok(Planned {
        plan,
        delta,
        report,
    })
}

/// A manifest's identity without its entries.
pub fn identity(m: &WeightManifest) -> WeightManifest {
    WeightManifest {
        schema_version: m.schema_version,
        model_id: m.model_id.clone(),
        version: m.version.clone(),
        hash_algorithm: m.hash_algorithm,
        created_unix_ms: m.created_unix_ms,
        chunk_bytes: m.chunk_bytes,
        files: Vec::new(),
        tensors: Vec::new(),
    }
}

fn check_compatible(prev: &WeightManifest, next: &WeightManifest, force: bool) -> Result<()> {
    let mut why = Vec::new();
    if prev.model_id != next.model_id {
        why.push(format!(
            "the previous manifest is of model {:?}, the next of {:?}",
            prev.model_id, next.model_id
        ));
    }
    if prev.hash_algorithm != next.hash_algorithm {
        why.push(format!(
            "the previous manifest hashes with {}, the next with {} (publish both with the same --hash, or every chunk moves)",
            algorithm_name(prev.hash_algorithm),
            algorithm_name(next.hash_algorithm)
        ));
    }
    if prev.chunk_bytes != next.chunk_bytes {
        why.push(format!(
            "the previous manifest has {}-byte chunks, the next {}-byte chunks (publish both with the same --chunk-mib, or every chunk moves)",
            prev.chunk_bytes, next.chunk_bytes
        ));
    }
    if why.is_empty() || force {
        return Ok(());
    }
    Err(HotweightsError::Mismatch(format!(
        "{}; pass --force to plan anyway",
        why.join("; ")
    )))
}

fn algorithm_name(value: i32) -> String {
    match HashAlgorithm::try_from(value) {
        Ok(HashAlgorithm::Blake3) => "blake3".into(),
        Ok(HashAlgorithm::Sha256) => "sha256".into(),
        _ => format!("algorithm {value}"),
    }
}

/// Buckets name file entries by path, so a path must name one entry.
pub(crate) fn check_unique_file_paths(m: &WeightManifest) -> Result<()> {
    let mut seen = BTreeMap::new();
    for (i, f) in m.files.iter().enumerate() {
        if let Some(first) = seen.insert(f.path.as_str(), i) {
            return Err(HotweightsError::Mismatch(format!(
                "files[{i}] and files[{first}] of the next manifest both name {:?}; plans need one file entry per path",
                f.path
            )));
        }
    }
    Ok(())
}

/// (is_file, name) of an entry of `m`.
pub(crate) fn entry_name(m: &WeightManifest, entry: EntryRef) -> (bool, &str) {
    match entry {
        EntryRef::Tensor(i) => (false, m.tensors[i].name.as_str()),
        EntryRef::File(i) => (true, m.files[i].path.as_str()),
    }
}

/// The ops that fill every bucket of `plan` from the next version's files
/// under `source`: one op per run of items contiguous in both a file and a
/// bucket.
pub fn transfer_ops(plan: &SwapPlan, source: &Path) -> Result<Vec<TransferOp>> {
    let Some(to) = plan.to.as_ref() else {
        return Err(HotweightsError::Mismatch(
            "the plan has no `to` manifest".into(),
        ));
    };
    let root = source_root(source)?;
    let index = EntryIndex::new(to);
    let mut ops: Vec<TransferOp> = Vec::new();
    for bucket in &plan.buckets {
        let dst = bucket_address(bucket.id);
        let first = ops.len();
        for item in &bucket.items {
            let Some((file, offset)) = index.item_location(item) else {
                return Err(HotweightsError::Mismatch(format!(
                    "bucket {} holds chunk {} of {:?}, which the `to` manifest lacks",
                    bucket.id, item.chunk, item.name
                )));
            };
            let src = format!("file://{root}/{file}");
            if let Some(last) = ops[first..].last_mut()
                && last.src == src
                && last.src_offset + last.length == offset
                && last.dst_offset + last.length == item.bucket_offset
            {
                last.length += item.length;
                continue;
            }
            ops.push(TransferOp {
                kind: TransferKind::Storage2h as i32,
                src,
                dst: dst.clone(),
                length: item.length,
                src_offset: offset,
                dst_offset: item.bucket_offset,
                ..TransferOp::default()
            });
        }
    }
    Ok(ops)
}

/// The canonical `file://` form of a source directory: absolute, no
/// trailing slash, valid UTF-8 (addresses are text).
fn source_root(source: &Path) -> Result<String> {
    let abs = std::path::absolute(source).map_err(|e| HotweightsError::io(source, e))?;
    let text = abs.to_str().ok_or_else(|| {
        HotweightsError::Option(format!(
            "{}: the source directory's path must be UTF-8 to be written in a plan",
            source.display()
        ))
    })?;
    let root = text.trim_end_matches('/').to_owned();
    let check = format!("file://{root}/x");
    check
        .parse::<bstack_plan::Address>()
        .map_err(|e| HotweightsError::Option(format!("{}: {e}", source.display())))?;
    Ok(root)
}

/// Which ranks consume which tensors: an ordered list of tensor-name glob
/// patterns (`*`, `?`, `[...]`, `{a,b}`), each with its ranks. A tensor
/// matched by several patterns goes to the union of their ranks; a tensor
/// matched by none, and every non-tensor file, goes to every rank.
///
/// The file form is a JSON object: `{"model.layers.*.mlp.*": [0, 1], ...}`.
#[derive(Debug, Clone)]
pub struct TpGroups {
    groups: Vec<(String, Vec<u32>)>,
    set: GlobSet,
}

impl TpGroups {
    /// Builds the map from (pattern, ranks) pairs.
    pub fn new(groups: Vec<(String, Vec<u32>)>) -> Result<Self> {
        let mut builder = GlobSetBuilder::new();
        for (pattern, _) in &groups {
            let glob = Glob::new(pattern).map_err(|e| {
                HotweightsError::Option(format!("TP group pattern {pattern:?}: {e}"))
            })?;
            builder.add(glob);
        }
        let set = builder
            .build()
            .map_err(|e| HotweightsError::Option(format!("TP group patterns: {e}")))?;
        Ok(TpGroups { groups, set })
    }

    /// Reads the JSON file form.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| HotweightsError::io(path, e))?;
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| {
                HotweightsError::Option(format!(
                    "{}: expected a JSON object of tensor-name pattern -> list of ranks: {e}",
                    path.display()
                ))
            })?;
        let mut groups = Vec::with_capacity(map.len());
        for (pattern, value) in map {
            let ranks = value
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|r| r.as_u64().and_then(|r| u32::try_from(r).ok()))
                        .collect::<Option<Vec<u32>>>()
                })
                .ok_or_else(|| {
                    HotweightsError::Option(format!(
                        "{}: {pattern:?}: expected a list of ranks (non-negative integers), found {value}",
                        path.display()
                    ))
                })?;
            groups.push((pattern, ranks));
        }
        TpGroups::new(groups).map_err(|e| match e {
            HotweightsError::Option(m) => {
                HotweightsError::Option(format!("{}: {m}", path.display()))
            }
            other => other,
        })
    }

    /// The (pattern, ranks) pairs, in file order.
    pub fn groups(&self) -> &[(String, Vec<u32>)] {
        &self.groups
    }

    /// The ranks that consume tensor `name`; `None` for every rank.
    pub fn ranks_for(&self, name: &str) -> Option<BTreeSet<u32>> {
        let matches = self.set.matches(name);
        if matches.is_empty() {
            return None;
        }
        Some(
            matches
                .into_iter()
                .flat_map(|i| self.groups[i].1.iter().copied())
                .collect(),
        )
    }

    /// Problems of the map itself: empty groups, duplicate ranks in a
    /// group, and ranks outside `[0, world_size)` when it is known.
    pub fn problems(&self, world_size: Option<u32>) -> Vec<String> {
        let mut out = Vec::new();
        for (pattern, ranks) in &self.groups {
            if ranks.is_empty() {
                out.push(format!("tp-groups {pattern:?}: no ranks"));
            }
            let mut seen = BTreeSet::new();
            for &r in ranks {
                if !seen.insert(r) {
                    out.push(format!("tp-groups {pattern:?}: rank {r} listed twice"));
                }
                if let Some(w) = world_size.filter(|&w| r >= w) {
                    out.push(format!(
                        "tp-groups {pattern:?}: rank {r} is outside the world of {w} ranks"
                    ));
                }
            }
        }
        out
    }
}

/// Wire bytes of a plan's changed chunks, sent whole or as sparse deltas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WireReport {
    /// Bytes on the wire sending every changed chunk whole.
    pub full_bytes: u64,
    /// Bytes on the wire sending each changed chunk as the smaller of its
    /// sparse delta and itself.
    pub delta_bytes: u64,
    /// Chunks that go as sparse deltas.
    pub delta_chunks: u64,
    /// Chunks that go whole (no base, or the delta is not smaller).
    pub full_chunks: u64,
}

impl WireReport {
    /// `delta_bytes` as a share of `full_bytes`, in percent.
    pub fn delta_percent(&self) -> f64 {
        if self.full_bytes == 0 {
            return 0.0;
        }
        self.delta_bytes as f64 * 100.0 / self.full_bytes as f64
    }
}

/// Measures the wire bytes of `plan`'s changed chunks, reading the old
/// chunks (as `prev`, the full manifest of the plan's `from` version,
/// describes them) from `prev_source` and the new ones from `next_source`;
/// both are checked against the manifests' hashes, so a wrong directory is
/// an error, not a wrong figure. Runs in parallel over chunks.
pub fn wire_report(
    plan: &SwapPlan,
    prev: &WeightManifest,
    prev_source: &dyn ChunkSource,
    next_source: &dyn ChunkSource,
) -> Result<WireReport> {
    let Some(to) = plan.to.as_ref() else {
        return Err(HotweightsError::Mismatch(
            "the plan lacks its `to` manifest".into(),
        ));
    };
    if let Some(f) = &plan.from
        && (f.model_id != prev.model_id || f.version != prev.version)
    {
        return Err(HotweightsError::Mismatch(format!(
            "the plan starts from {} {}, not from the manifest given ({} {})",
            f.model_id, f.version, prev.model_id, prev.version
        )));
    }
    let delta = delta::compute(prev, to);
    let (old_index, new_index) = (EntryIndex::new(prev), EntryIndex::new(to));
    let sizes = delta
        .changed
        .par_iter()
        .map(|c| -> Result<(u64, u64, bool)> {
            let (is_file, name) = entry_name(to, c.entry);
            let missing = || {
                HotweightsError::Mismatch(format!(
                    "chunk {} of {name:?} is not in the manifest",
                    c.chunk
                ))
            };
            let new = next_source.read_chunk(
                &new_index
                    .chunk(is_file, name, c.chunk)
                    .ok_or_else(missing)?,
            )?;
            let old = match old_index.chunk(is_file, name, c.chunk) {
                Some(loc) if c.has_base => Some(prev_source.read_chunk(&loc)?),
                _ => None,
            };
            let encoded = match old {
                Some(old) => crate::sparse::encode(&old, &new)?.map(|d| d.len() as u64),
                None => None,
            };
            let full = new.len() as u64;
            Ok((full, encoded.unwrap_or(full), encoded.is_some()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut report = WireReport::default();
    for (full, wire, as_delta) in sizes {
        report.full_bytes += full;
        report.delta_bytes += wire;
        if as_delta {
            report.delta_chunks += 1;
        } else {
            report.full_chunks += 1;
        }
    }
    Ok(report)
}
