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
    /// Component to measure: `plan` (contract encode, decode, JSON,
    /// validate) or `hotweights` (publish against file reading and hashing).
    component: String,
    /// Timed runs per figure, after one warm-up run.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Scale of the generated inputs, 1.0 = the reference size (plan:
    /// 20,000 tensors x 4 chunks and 100,000 ops; hotweights: a 512 MiB
    /// checkpoint in 4 shards).
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
        "hotweights" | "hw" => bench_hotweights(&args, out)?,
        other => bail!("no benchmarks for {other:?}; available: plan, hotweights"),
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

/// One measured figure.
struct Figure<'a> {
    bench: &'a str,
    /// Items processed (tensors, ops, ...).
    n: usize,
    /// Bytes processed.
    bytes: usize,
    time: Duration,
    /// The physical limit measured in the same run, and its time.
    baseline: (&'a str, Duration),
}

/// Prints one figure.
fn emit(out: &Output, runs: usize, f: Figure<'_>) -> std::io::Result<()> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let figure = json!({
        "bench": f.bench,
        "n": f.n,
        "runs": runs,
        "bytes": f.bytes,
        "median_ms": ms(f.time),
        "mb_per_s": f.bytes as f64 / f.time.as_secs_f64().max(1e-12) / 1e6,
        "baseline": f.baseline.0,
        "baseline_ms": ms(f.baseline.1),
        "ratio": ms(f.time) / ms(f.baseline.1).max(1e-9),
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
    let proto_base = ("memcpy", memcpy_baseline(runs, proto.len()));
    let json_base = ("memcpy", memcpy_baseline(runs, text.len()));
    let (pb, js) = (proto.len(), text.len());
    let figure = |suffix: &str, bytes: usize, time: Duration, baseline| {
        emit(
            out,
            runs,
            Figure {
                bench: &format!("{name}.{suffix}"),
                n,
                bytes,
                time,
                baseline,
            },
        )
    };

    let t = median(runs, || drop(black_box(value.encode_to_vec())));
    figure("proto_encode", pb, t, proto_base)?;
    let t = median(runs, || drop(black_box(T::decode(black_box(&proto[..])))));
    figure("proto_decode", pb, t, proto_base)?;
    let t = median(runs, || drop(black_box(value.to_json())));
    figure("json_write", js, t, json_base)?;
    let t = median(runs, || {
        drop(black_box(T::from_json(black_box(&text), "<bench>")))
    });
    figure("json_read", js, t, json_base)?;
    let t = median(runs, || drop(black_box(value.problems())));
    figure("validate", pb, t, proto_base)
}

/// Publish throughput against the two limits it cannot beat, both measured
/// in the same run on all cores: reading the same files, and hashing the
/// same bytes already in memory. The figure's baseline is the slower of the
/// two; a ratio of 1.25 is 80 % of that limit.
fn bench_hotweights(args: &BenchArgs, out: &Output) -> Result<()> {
    use rayon::prelude::*;
    use std::io::Read;

    let runs = args.runs;
    let total = ((512u64 << 20) as f64 * args.scale).max((1u64 << 20) as f64) as u64;
    let dir = tempfile::tempdir()?;
    let files = write_bench_checkpoint(dir.path(), total)?;
    let on_disk: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    let bytes = on_disk as usize;

    let read = median(runs, || {
        files.par_iter().for_each(|path| {
            let mut buf = vec![0u8; 4 << 20];
            if let Ok(mut f) = std::fs::File::open(path) {
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    black_box(&buf[..n]);
                }
            }
        })
    });
    let contents: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let chunks: Vec<&[u8]> = contents.iter().flat_map(|c| c.chunks(4 << 20)).collect();
    let hash = median(runs, || {
        chunks.par_iter().for_each(|c| {
            black_box(blake3::hash(c));
        });
    });
    drop(contents);
    let options = hotweights::PublishOptions::new("bench");
    let publish = median(runs, || {
        drop(black_box(hotweights::publish(
            dir.path(),
            &options,
            &|_| {},
        )))
    });

    let memcpy = ("memcpy", memcpy_baseline(runs, bytes.min(256 << 20)));
    let n = files.len();
    emit(
        out,
        runs,
        Figure {
            bench: "hotweights.read_files",
            n,
            bytes,
            time: read,
            baseline: memcpy,
        },
    )?;
    emit(
        out,
        runs,
        Figure {
            bench: "hotweights.hash_in_memory",
            n,
            bytes,
            time: hash,
            baseline: memcpy,
        },
    )?;
    let limit = ("slower of read_files and hash_in_memory", read.max(hash));
    emit(
        out,
        runs,
        Figure {
            bench: "hotweights.publish",
            n,
            bytes,
            time: publish,
            baseline: limit,
        },
    )?;
    Ok(())
}

/// Writes a sharded BF16 checkpoint of about `total` bytes (4 shards of
/// 16 MiB tensors) with its index; returns the shard paths.
fn write_bench_checkpoint(dir: &std::path::Path, total: u64) -> Result<Vec<std::path::PathBuf>> {
    const TENSOR: u64 = 16 << 20;
    let shards = 4u64;
    let per_shard = (total / shards).max(1);
    let mut paths = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let name = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let mut header = serde_json::Map::new();
        let mut offset = 0u64;
        let mut t = 0;
        while offset < per_shard {
            let len = TENSOR.min(per_shard - offset) & !1; // whole BF16 elements
            if len == 0 {
                break;
            }
            let tensor = format!("model.layers.{s}.w{t}.weight");
            header.insert(tensor.clone(), json!({"dtype": "BF16", "shape": [len / 2], "data_offsets": [offset, offset + len]}));
            weight_map.insert(tensor, json!(name));
            offset += len;
            t += 1;
        }
        let mut text = serde_json::to_string(&header)?;
        while text.len() % 8 != 0 {
            text.push(' ');
        }
        let mut data = vec![0u8; offset as usize];
        blake3::Hasher::new()
            .update(name.as_bytes())
            .finalize_xof()
            .fill(&mut data);
        let mut file = (text.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(text.as_bytes());
        file.extend_from_slice(&data);
        let path = dir.join(&name);
        std::fs::write(&path, file)?;
        paths.push(path);
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join(hotweights::INDEX_FILE),
        serde_json::to_vec(&index)?,
    )?;
    Ok(paths)
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
