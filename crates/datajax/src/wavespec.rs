//! WaveSpec export from serving request logs.
//!
//! Input is a request trace in the Mooncake format, one JSON object per
//! line: `{"timestamp": ms, "input_length": tokens, "output_length": tokens,
//! "hash_ids": [block ids]}`, where each id names one KV block of
//! `block_tokens` tokens *and the whole prefix before it* (ids are chained
//! hashes, so equal ids at depth d mean equal first d blocks).
//!
//! From it [`export`] computes, in request-time order:
//!
//! - **prefix cohorts**: groups of requests sharing their first `depth`
//!   blocks. Only maximal cohorts are kept (a prefix whose every request
//!   also shares the next block is reported at the deeper level), ranked by
//!   the KV blocks their sharing saves, `(requests - 1) * depth`;
//! - a **prefix-depth histogram**: per depth, how many requests find that
//!   many leading blocks already seen, and how many distinct prefixes of
//!   that depth exist;
//! - **reuse distances**: for each block reference, the number of distinct
//!   blocks referenced since the previous reference to the same block (the
//!   LRU stack distance, so "an LRU cache of C blocks hits every reference
//!   with distance < C"), bucketed by powers of two; computed exactly with a
//!   Fenwick tree in O(n log n);
//! - **I/O extents**: the blocks referenced, as runs of consecutive block
//!   ids. The ids themselves are kept (the earlier exporter hashed keys,
//!   which scattered neighbouring blocks); the trace numbers blocks in order
//!   of first use, so runs follow real prompt locality.
//!
//! The per-wave load (requests and tokens per `wave_ms` window) is computed
//! by a traced datajax program on the engine; the swap window is placed on
//! the quietest waves, where a weight swap disturbs the fewest requests.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use bstack_plan::{
    ClusterShape, IoExtent, PrefixCohort, PrefixDepth, ReuseBucket, SCHEMA_VERSION, WaveSpec,
};
use datafusion::arrow::array::{Array, Int64Array, RecordBatch};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Source};
use crate::error::{DatajaxError, Result};
use crate::expr::{col, count_rows, lit, sum};
use crate::frame::Frame;
use crate::ir::Ir;
use crate::types::{DType, Schema};

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Arrival, ms from the trace start.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Generated tokens.
    pub output_length: u64,
    /// Prefix block ids, in prompt order.
    pub hash_ids: Vec<u64>,
}

/// Reads a JSON-lines trace; `limit` keeps only the first requests. A bad
/// line is an error naming the file, the line and the field.
pub fn read_trace(path: &Path, limit: Option<usize>) -> Result<Vec<Request>> {
    let file = std::fs::File::open(path).map_err(|e| DatajaxError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let line = line.map_err(|e| DatajaxError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let de = &mut serde_json::Deserializer::from_str(&line);
        let r: Request = serde_path_to_error::deserialize(de).map_err(|e| {
            DatajaxError::Input(format!(
                "{} line {}: {} (at {}); expected {{\"timestamp\": ms, \"input_length\": n, \"output_length\": n, \"hash_ids\": [ids]}}",
                path.display(),
                i + 1,
                e.inner(),
                e.path()
            ))
        })?;
        out.push(r);
    }
    if out.is_empty() {
        return Err(DatajaxError::Input(format!(
            "{}: no requests in the trace",
            path.display()
        )));
    }
    Ok(out)
}

/// What [`export`] is asked for.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Tokens per KV block.
    pub block_tokens: u32,
    /// Bytes per KV block (model-dependent); 0 if unknown.
    pub block_bytes: u64,
    /// Cohorts kept (the most valuable).
    pub max_cohorts: usize,
    /// Depths in the prefix histogram.
    pub max_depth: u32,
    /// Length of one wave, ms.
    pub wave_ms: u64,
    /// Waves in the swap window.
    pub swap_waves: u64,
    /// GEMM tile (bm, bn, bk) written into the spec.
    pub tile: (u32, u32, u32),
    /// What the statistics come from (a file name).
    pub source: String,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            block_tokens: 512,
            // A Llama-3-8B-like shape: 2 (K and V) * 32 layers * 8 KV heads
            // * 128 head dim * 2 bytes (bf16) * 512 tokens = 64 MiB.
            block_bytes: 2 * 32 * 8 * 128 * 2 * 512,
            max_cohorts: 64,
            max_depth: 16,
            wave_ms: 1000,
            swap_waves: 1,
            tile: (128, 128, 64),
            source: String::new(),
        }
    }
}

/// The figures of one export, for people.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// Requests read.
    pub requests: u64,
    /// Block references (sum of prefix lengths).
    pub references: u64,
    /// Distinct blocks.
    pub distinct_blocks: u64,
    /// References to a block seen before.
    pub reused_references: u64,
    /// Maximal cohorts found (before keeping the top ones).
    pub cohorts_found: u64,
    /// Cohorts kept in the spec.
    pub cohorts_kept: u64,
    /// I/O extents (runs of consecutive block ids).
    pub extents: u64,
    /// Waves.
    pub waves: u64,
    /// The swap window, in waves.
    pub swap_window: (u64, u64),
    /// Requests in the swap window.
    pub swap_window_requests: u64,
    /// Median reuse distance, in blocks (0 with no reuse).
    pub median_reuse_distance: u64,
}

/// The load of each wave, as a traced datajax program: requests and prompt
/// tokens per `wave_ms` window of arrival time.
pub fn wave_load_program(wave_ms: u64) -> Result<Ir> {
    let schema = Schema::of(&[
        ("timestamp", DType::Int64),
        ("input_length", DType::Int64),
        ("output_length", DType::Int64),
    ])?;
    let wave = i64::try_from(wave_ms.max(1)).unwrap_or(i64::MAX);
    Frame::input("requests", schema)
        .with_column("wave", (col("timestamp") / lit(wave)).cast(DType::Int64))
        .group_by(["wave"])
        .agg([
            count_rows().alias("requests"),
            sum("input_length").alias("input_tokens"),
        ])
        .sort(["wave"])
        .to_ir()
}

/// The spec and its figures. See the module documentation.
pub fn export(
    engine: &Engine,
    requests: &[Request],
    options: &ExportOptions,
) -> Result<(WaveSpec, ExportReport)> {
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].timestamp);
    let t0 = order.first().map_or(0, |&i| requests[i].timestamp);

    // Cohorts and the depth histogram, in time order.
    struct Block {
        depth: u32,
        requests: u64,
        first_ms: u64,
        last_ms: u64,
        max_child: u64,
    }
    let mut blocks: HashMap<u64, Block> = HashMap::new();
    let max_depth = options.max_depth.max(1) as usize;
    let mut depth_reuse = vec![0u64; max_depth];
    let mut depth_prefixes = vec![0u64; max_depth];
    let mut refs: Vec<u64> = Vec::new();
    for &i in &order {
        let r = &requests[i];
        let t = r.timestamp.saturating_sub(t0);
        let mut parent: Option<u64> = None;
        for (d, &b) in r.hash_ids.iter().enumerate() {
            refs.push(b);
            let depth = u32::try_from(d + 1).unwrap_or(u32::MAX);
            let entry = blocks.entry(b);
            let seen = matches!(entry, std::collections::hash_map::Entry::Occupied(_));
            let blk = entry.or_insert(Block {
                depth,
                requests: 0,
                first_ms: t,
                last_ms: t,
                max_child: 0,
            });
            blk.requests += 1;
            blk.last_ms = t;
            let count = blk.requests;
            if d < max_depth {
                if seen {
                    depth_reuse[d] += 1;
                } else {
                    depth_prefixes[d] += 1;
                }
            }
            if let Some(p) = parent
                && let Some(pb) = blocks.get_mut(&p)
            {
                pb.max_child = pb.max_child.max(count);
            }
            parent = Some(b);
        }
    }
    let mut cohorts: Vec<PrefixCohort> = blocks
        .iter()
        .filter(|(_, b)| b.requests >= 2 && b.max_child < b.requests)
        .map(|(&id, b)| PrefixCohort {
            block: id,
            depth: b.depth,
            requests: b.requests,
            bytes: u64::from(b.depth).saturating_mul(options.block_bytes),
            first_ms: b.first_ms,
            last_ms: b.last_ms,
        })
        .collect();
    let cohorts_found = cohorts.len() as u64;
    cohorts.sort_by(|a, b| {
        let value = |c: &PrefixCohort| (c.requests - 1).saturating_mul(u64::from(c.depth));
        value(b).cmp(&value(a)).then(a.block.cmp(&b.block))
    });
    cohorts.truncate(options.max_cohorts);
    let mut prefix_histogram = Vec::new();
    for d in 0..max_depth {
        if depth_prefixes[d] == 0 && depth_reuse[d] == 0 {
            break;
        }
        prefix_histogram.push(PrefixDepth {
            depth: u32::try_from(d + 1).unwrap_or(u32::MAX),
            requests: depth_reuse[d],
            prefixes: depth_prefixes[d],
        });
    }
    // Requests reusing d blocks also reuse every shallower depth: make the
    // counts cumulative from the deep end so they never increase with depth.
    for i in (0..prefix_histogram.len().saturating_sub(1)).rev() {
        let next = prefix_histogram[i + 1].requests;
        if prefix_histogram[i].requests < next {
            prefix_histogram[i].requests = next;
        }
    }

    let (reuse_distances, cold, median) = reuse_histogram(&refs);

    // Runs of consecutive block ids.
    let mut ids: Vec<u64> = blocks.keys().copied().collect();
    ids.sort_unstable();
    let mut io_extents: Vec<IoExtent> = Vec::new();
    for id in ids {
        match io_extents.last_mut() {
            Some(e) if e.last_page.checked_add(1) == Some(id) => e.last_page = id,
            _ => io_extents.push(IoExtent {
                layer: "kv".into(),
                first_page: id,
                last_page: id,
            }),
        }
    }

    // Per-wave load, on the engine.
    let load = wave_load(engine, requests, options.wave_ms)?;
    let waves = load.iter().map(|(w, _, _)| *w + 1).max().unwrap_or(1);
    let span = options.swap_waves.clamp(1, waves);
    let mut per_wave = vec![0u64; usize::try_from(waves).unwrap_or(0)];
    for (w, n, _) in &load {
        if let Some(slot) = per_wave.get_mut(usize::try_from(*w).unwrap_or(usize::MAX)) {
            *slot = *n;
        }
    }
    let (mut best, mut best_load) = (0u64, u64::MAX);
    let span_us = usize::try_from(span).unwrap_or(1);
    for start in 0..per_wave.len().saturating_sub(span_us - 1) {
        let l: u64 = per_wave[start..start + span_us].iter().sum();
        if l < best_load {
            best_load = l;
            best = start as u64;
        }
    }
    let (bm, bn, bk) = options.tile;
    let spec = WaveSpec {
        schema_version: SCHEMA_VERSION,
        bm,
        bn,
        bk,
        cluster: Some(ClusterShape { x: 1, y: 1 }),
        io_extents,
        swap_begin: best,
        swap_end: best + span,
        stage_depth: 2,
        num_waves: waves,
        dtype: "BF16".into(),
        wave_budget_ns: options.wave_ms.saturating_mul(1_000_000),
        cohorts,
        prefix_histogram,
        reuse_distances,
        block_bytes: options.block_bytes,
        block_tokens: if options.block_bytes > 0 || options.block_tokens > 0 {
            options.block_tokens
        } else {
            0
        },
        cold_references: cold,
        source: options.source.clone(),
        ..Default::default()
    };
    let report = ExportReport {
        requests: requests.len() as u64,
        references: refs.len() as u64,
        distinct_blocks: blocks.len() as u64,
        reused_references: refs.len() as u64 - cold,
        cohorts_found,
        cohorts_kept: spec.cohorts.len() as u64,
        extents: spec.io_extents.len() as u64,
        waves,
        swap_window: (spec.swap_begin, spec.swap_end),
        swap_window_requests: if best_load == u64::MAX { 0 } else { best_load },
        median_reuse_distance: median,
    };
    Ok((spec, report))
}

/// `(wave, requests, input tokens)` per non-empty wave, from the traced
/// program [`wave_load_program`].
fn wave_load(engine: &Engine, requests: &[Request], wave_ms: u64) -> Result<Vec<(u64, u64, u64)>> {
    let t0 = requests.iter().map(|r| r.timestamp).min().unwrap_or(0);
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let batch = RecordBatch::try_from_iter([
        (
            "timestamp",
            Arc::new(Int64Array::from_iter_values(
                requests.iter().map(|r| int(r.timestamp - t0)),
            )) as _,
        ),
        (
            "input_length",
            Arc::new(Int64Array::from_iter_values(
                requests.iter().map(|r| int(r.input_length)),
            )) as _,
        ),
        (
            "output_length",
            Arc::new(Int64Array::from_iter_values(
                requests.iter().map(|r| int(r.output_length)),
            )) as _,
        ),
    ])?;
    let ir = wave_load_program(wave_ms)?;
    let inputs = HashMap::from([("requests".to_owned(), Source::Batches(vec![batch]))]);
    let table = crate::engine::Backend::run(engine, &ir, &inputs)?;
    let mut out = Vec::new();
    for b in &table.batches {
        let get = |name: &str| -> Result<&Int64Array> {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                .ok_or_else(|| DatajaxError::Engine(format!("wave load: no int64 column {name}")))
        };
        let (w, n, t) = (get("wave")?, get("requests")?, get("input_tokens")?);
        for i in 0..b.num_rows() {
            let u = |a: &Int64Array| {
                if a.is_null(i) {
                    0
                } else {
                    u64::try_from(a.value(i)).unwrap_or(0)
                }
            };
            out.push((u(w), u(n), u(t)));
        }
    }
    Ok(out)
}

/// The reuse-distance buckets (powers of two, then an open bucket), the
/// count of cold (first) references, and the median distance.
pub fn reuse_histogram(refs: &[u64]) -> (Vec<ReuseBucket>, u64, u64) {
    // A Fenwick tree over reference times marks, per block, its latest
    // reference; the distance of a reuse is the number of marks after the
    // block's previous reference.
    let n = refs.len();
    let mut tree = vec![0i64; n + 1];
    let add = |tree: &mut Vec<i64>, mut i: usize, v: i64| {
        i += 1;
        while i <= n {
            tree[i] += v;
            i += i & i.wrapping_neg();
        }
    };
    let prefix = |tree: &Vec<i64>, mut i: usize| -> i64 {
        let mut s = 0;
        while i > 0 {
            s += tree[i];
            i -= i & i.wrapping_neg();
        }
        s
    };
    let mut last: HashMap<u64, usize> = HashMap::new();
    let mut distances: Vec<u64> = Vec::new();
    let mut cold = 0u64;
    for (t, &b) in refs.iter().enumerate() {
        match last.insert(b, t) {
            Some(p) => {
                let d = prefix(&tree, t) - prefix(&tree, p + 1);
                distances.push(u64::try_from(d).unwrap_or(0));
                add(&mut tree, p, -1);
            }
            None => cold += 1,
        }
        add(&mut tree, t, 1);
    }
    let mut sorted = distances;
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let max = sorted.last().copied().unwrap_or(0);
    let mut buckets: Vec<ReuseBucket> = Vec::new();
    // Buckets: [0], [1], [2,3], [4,7], ... up to the maximum seen.
    let mut start = 0usize;
    let mut upper = 0u64;
    loop {
        let end = sorted.partition_point(|&d| d <= upper);
        buckets.push(ReuseBucket {
            max_distance: upper,
            count: (end - start) as u64,
        });
        start = end;
        if upper >= max {
            break;
        }
        upper = if upper == 0 {
            1
        } else {
            upper.saturating_mul(2).saturating_add(1)
        };
    }
    (buckets, cold, median)
}
