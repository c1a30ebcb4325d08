//! `bstack bench`: the one benchmark harness.
//!
//! Every figure is printed as one JSON object per line:
//! `{"bench", "n", "runs", "median_ms", "baseline", "baseline_ms", "ratio", ...}`.
//! Each measurement is repeated after a warm-up and the median is reported.
//! Where a physical limit exists the bench measures it in the same run
//! (`baseline`, e.g. `memcpy` of the same number of bytes) and reports
//! `ratio = median_ms / baseline_ms`: a ratio survives a noisy machine, an
//! absolute time does not. Components add their benches as functions here.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bstack_plan::{
    CachePlan, Chunk, Contract, HashAlgorithm, KvPageRef, PlanWindow, SCHEMA_VERSION, TensorEntry,
    TransferKind, TransferOp, WeightManifest,
};
use clap::Args;
use serde_json::json;

use crate::Outcome;
use crate::output::Output;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Component to measure: `plan` (contract encode, decode, JSON, validate).
    component: String,
    /// Timed runs per figure, after one warm-up run.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Scale of the generated inputs, 1.0 = the reference size
    /// (20,000 tensors x 4 chunks; 100,000 ops).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

pub fn run(args: BenchArgs, out: &Output) -> Result<Outcome> {
    if !(1..=1000).contains(&args.runs) {
        bail!("--runs must be 1 to 1000");
    }
    // 100x the reference is 2 million tensors: about 1 GB of manifest.
    if !(args.scale > 0.0 && args.scale <= 100.0) {
        bail!("--scale must be above 0 and at most 100");
    }
    match args.component.as_str() {
        "plan" => bench_plan(&args, out)?,
        other => bail!("no benchmarks for {other:?}; available: plan"),
    }
    Ok(Outcome::Ok)
}

/// Runs `f` once to warm up, then `runs` times; returns the median.
pub fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[times.len() / 2]
}

/// The time to copy `len` bytes from one buffer to another: the floor for any
/// operation that must touch every byte once.
pub fn memcpy_baseline(runs: usize, len: usize) -> Duration {
    let src = vec![0x5au8; len.max(1)];
    let mut dst = vec![0u8; len.max(1)];
    median(runs, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    })
}

/// Prints one figure.
fn emit(
    out: &Output,
    bench: &str,
    n: usize,
    runs: usize,
    bytes: usize,
    time: Duration,
    baseline: Duration,
) -> std::io::Result<()> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let figure = json!({
        "bench": bench,
        "n": n,
        "runs": runs,
        "bytes": bytes,
        "median_ms": ms(time),
        "mb_per_s": bytes as f64 / time.as_secs_f64().max(1e-12) / 1e6,
        "baseline": "memcpy",
        "baseline_ms": ms(baseline),
        "ratio": ms(time) / ms(baseline).max(1e-9),
    });
    out.json_line(&figure)
}

/// Encode, decode, JSON write, JSON read and validate, for a large manifest
/// and a large cache plan.
fn bench_plan(args: &BenchArgs, out: &Output) -> std::io::Result<()> {
    let runs = args.runs;
    let scaled = |n: f64| ((n * args.scale) as usize).max(1);

    let manifest = synthetic_manifest(scaled(20_000.0));
    measure_contract(
        out,
        "plan.manifest",
        manifest.tensors.len(),
        runs,
        &manifest,
    )?;
    let plan = synthetic_cache_plan(scaled(100_000.0));
    measure_contract(out, "plan.cache_plan", plan.ops.len(), runs, &plan)
}

fn measure_contract<T: Contract>(
    out: &Output,
    name: &str,
    n: usize,
    runs: usize,
    value: &T,
) -> std::io::Result<()> {
    let proto = value.encode_to_vec();
    let text = value.to_json();
    let proto_base = memcpy_baseline(runs, proto.len());
    let json_base = memcpy_baseline(runs, text.len());

    let t = median(runs, || drop(black_box(value.encode_to_vec())));
    emit(
        out,
        &format!("{name}.proto_encode"),
        n,
        runs,
        proto.len(),
        t,
        proto_base,
    )?;
    let t = median(runs, || drop(black_box(T::decode(black_box(&proto[..])))));
    emit(
        out,
        &format!("{name}.proto_decode"),
        n,
        runs,
        proto.len(),
        t,
        proto_base,
    )?;
    let t = median(runs, || drop(black_box(value.to_json())));
    emit(
        out,
        &format!("{name}.json_write"),
        n,
        runs,
        text.len(),
        t,
        json_base,
    )?;
    let t = median(runs, || {
        drop(black_box(T::from_json(black_box(&text), "<bench>")))
    });
    emit(
        out,
        &format!("{name}.json_read"),
        n,
        runs,
        text.len(),
        t,
        json_base,
    )?;
    let t = median(runs, || drop(black_box(value.problems())));
    emit(
        out,
        &format!("{name}.validate"),
        n,
        runs,
        proto.len(),
        t,
        proto_base,
    )
}

fn hex_hash(seed: u64) -> String {
    blake3::hash(&seed.to_le_bytes()).to_hex().to_string()
}

/// A manifest shaped like a large checkpoint: `tensors` BF16 tensors of 4
/// chunks each, spread over 8 shard files.
fn synthetic_manifest(tensors: usize) -> WeightManifest {
    const CHUNK: u64 = 4 << 20;
    let mut offsets = [0u64; 8];
    let tensors = (0..tensors)
        .map(|i| {
            let file = i % 8;
            let length = 4 * CHUNK;
            let offset = offsets[file];
            offsets[file] += length;
            TensorEntry {
                name: format!("model.layers.{}.mlp.w{}.weight", i / 4, i % 4),
                dtype: "BF16".into(),
                shape: vec![4096, 2048],
                file: format!("model-{:05}-of-00008.safetensors", file + 1),
                offset,
                length,
                chunks: (0..4)
                    .map(|c| Chunk {
                        index: c,
                        offset: u64::from(c) * CHUNK,
                        length: CHUNK,
                        hash: hex_hash((i * 4) as u64 + u64::from(c)),
                    })
                    .collect(),
            }
        })
        .collect();
    WeightManifest {
        schema_version: SCHEMA_VERSION,
        model_id: "bench".into(),
        version: "v1".into(),
        hash_algorithm: HashAlgorithm::Blake3 as i32,
        chunk_bytes: CHUNK,
        tensors,
        ..Default::default()
    }
}

/// A cache plan of `ops` page-run copies over 8 nodes.
fn synthetic_cache_plan(ops: usize) -> CachePlan {
    const PAGE: u64 = 64 << 10;
    CachePlan {
        schema_version: SCHEMA_VERSION,
        plan_id: "bench".into(),
        window: Some(PlanWindow {
            index: 0,
            start_ns: 0,
            end_ns: 20_000_000,
        }),
        ops: (0..ops)
            .map(|i| {
                let page = (i as u64) * 4;
                TransferOp {
                    kind: TransferKind::H2d as i32,
                    src: format!("tier://node{}/cpu", i % 8),
                    dst: format!("tier://node{}/gpu0", i % 8),
                    length: 4 * PAGE,
                    src_offset: page * PAGE,
                    dst_offset: page * PAGE,
                    kv_refs: vec![KvPageRef {
                        tensor: "kv".into(),
                        page,
                        layer: (i % 32) as u32,
                        count: 4,
                        ..Default::default()
                    }],
                    deadline_ns: (i as u64 % 20) * 1_000_000,
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}
