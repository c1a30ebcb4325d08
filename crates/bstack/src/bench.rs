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
    /// validate), `hotweights` (publish against file reading and hashing)
    /// `bcache` (planning latency at 1k to 1M pending requests; the
    /// shared trace under every policy, with hit rates and TTFT),
    /// `strata` (every tier against memcpy, raw file I/O or raw TCP),
    /// `datajax` (a 10-million-row feature pipeline against pandas in the
    /// same run, trace + lower of 20 operations, a djit cache hit, WaveSpec
    /// export of the shared trace), `bwrt` (round trip of an empty wave
    /// through the C ABI against an atomic ping-pong, ring throughput from
    /// 2 submitting threads, a 1024^3 f32 GEMM against numpy's matmul) or
    /// `hotweights-cluster` (alias `hw-cluster`: a rollout to 4 workers,
    /// each in a network namespace behind a 1 Gbit/s link, against one raw
    /// TCP copy of the same bytes; needs root, else runs on loopback).
    component: String,
    /// Timed runs per figure, after one warm-up run.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Scale of the generated inputs, 1.0 = the reference size (plan:
    /// 20,000 tensors x 4 chunks and 100,000 ops; hotweights: a 512 MiB
    /// checkpoint in 4 shards; hotweights-cluster: a 2 GiB checkpoint, 10 %
    /// of it changed per version; datajax: 10 million rows). For hotweights-cluster `--runs` is the
    /// number of rollouts, with no warm-up.
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
        "bcache" => bench_bcache(&args, out)?,
        "strata" => crate::bench_strata::measure(args.runs, args.scale, out)?,
        "datajax" => crate::bench_datajax::measure(args.runs, args.scale, out)?,
        "bwrt" => crate::bench_bwrt::measure(args.runs, args.scale, out)?,
        "hotweights-cluster" | "hw-cluster" => {
            crate::bench_hw_cluster::measure(args.runs, args.scale, out)?
        }
        // The raw TCP receiver of the cluster bench's baseline, started by
        // the bench inside a worker's network namespace.
        "hotweights-cluster-sink" => crate::bench_hw_cluster::sink()?,
        other => bail!(
            "no benchmarks for {other:?}; available: plan, hotweights, bcache, strata, datajax, bwrt, hotweights-cluster"
        ),
    }
    Ok(Outcome::Ok)
}

/// Runs `f` once to warm up, then `runs` times; returns the median.
pub fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    middle(
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

/// The median of `times` (zero when empty), for benches that time only
/// part of each run.
pub(crate) fn middle(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// Runs a Python baseline: `script` gets `args` as `sys.argv[1:]` and
/// prints one line, `SECONDS FIELD...`. Returns the seconds and the other
/// fields, or why it could not run (`install` is the pip hint for a missing
/// module).
pub(crate) fn python_baseline(
    script: &str,
    args: &[String],
    install: &str,
) -> std::result::Result<(Duration, Vec<String>), String> {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("python3 did not start: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(if err.contains("No module named") {
            format!("not installed ({install})")
        } else {
            format!(
                "the Python baseline failed: {}",
                err.lines().last().unwrap_or("")
            )
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let secs: f64 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("the Python baseline printed no time")?;
    Ok((
        Duration::from_secs_f64(secs),
        parts.map(str::to_owned).collect(),
    ))
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
pub(crate) struct Figure<'a> {
    bench: &'a str,
    /// Items processed (tensors, ops, ...).
    n: usize,
    /// Bytes processed.
    bytes: usize,
    time: Duration,
    /// The physical limit measured in the same run, and its time; `None`
    /// where no such limit exists (planning is pure computation).
    baseline: Option<(&'a str, Duration)>,
    /// Figure-specific fields (sizes, memory, ratios of bytes).
    extra: serde_json::Value,
}

impl<'a> Figure<'a> {
    pub(crate) fn new(bench: &'a str, n: usize, bytes: usize, time: Duration) -> Self {
        Figure {
            bench,
            n,
            bytes,
            time,
            baseline: None,
            extra: json!({}),
        }
    }

    pub(crate) fn against(mut self, name: &'a str, time: Duration) -> Self {
        self.baseline = Some((name, time));
        self
    }

    pub(crate) fn with(mut self, extra: serde_json::Value) -> Self {
        self.extra = extra;
        self
    }
}

/// Prints one figure.
pub(crate) fn emit(out: &Output, runs: usize, f: Figure<'_>) -> std::io::Result<()> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut figure = json!({
        "bench": f.bench,
        "n": f.n,
        "runs": runs,
        "bytes": f.bytes,
        "median_ms": ms(f.time),
        "mb_per_s": f.bytes as f64 / f.time.as_secs_f64().max(1e-12) / 1e6,
        "baseline": f.baseline.map(|b| b.0),
        "baseline_ms": f.baseline.map(|b| ms(b.1)),
        "ratio": f.baseline.map(|b| ms(f.time) / ms(b.1).max(1e-9)),
    });
    if let (Some(figure), Some(extra)) = (figure.as_object_mut(), f.extra.as_object()) {
        figure.extend(extra.clone());
    }
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
    let figure = |suffix: &str, bytes: usize, time: Duration, baseline: (&str, Duration)| {
        emit(
            out,
            runs,
            Figure::new(&format!("{name}.{suffix}"), n, bytes, time)
                .against(baseline.0, baseline.1),
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

    bench_plan_million(args, out)?;
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

    let memcpy = memcpy_baseline(runs, bytes.min(256 << 20));
    let n = files.len();
    emit(
        out,
        runs,
        Figure::new("hotweights.read_files", n, bytes, read).against("memcpy", memcpy),
    )?;
    emit(
        out,
        runs,
        Figure::new("hotweights.hash_in_memory", n, bytes, hash).against("memcpy", memcpy),
    )?;
    emit(
        out,
        runs,
        Figure::new("hotweights.publish", n, bytes, publish)
            .against("slower of read_files and hash_in_memory", read.max(hash)),
    )?;
    drop(dir);
    bench_commit(args, out)?;
    bench_sparse_delta(args, out)
}

/// Planning a million-chunk manifest with 10 % and with every chunk
/// changed: delta, packing, consumer sets and sealing, but not the copies
/// of the inputs that `plan::create` consumes. Peak memory is the process's
/// high-water mark, so this runs before anything else in the process.
fn bench_plan_million(args: &BenchArgs, out: &Output) -> Result<()> {
    let chunks = ((1_000_000.0 * args.scale) as usize).max(4);
    let prev = synthetic_manifest(chunks / 4);
    for (name, every) in [("hotweights.plan_10pct", 10), ("hotweights.plan_all", 1)] {
        let mut next = prev.clone();
        next.version = "v2".into();
        let mut k = 0usize;
        for t in &mut next.tensors {
            for c in &mut t.chunks {
                if k.is_multiple_of(every) {
                    c.hash = hex_hash(u64::MAX - k as u64);
                }
                k += 1;
            }
        }
        let options = hotweights::PlanOptions::default();
        let mut times = Vec::new();
        let mut report = None;
        for _ in 0..=args.runs {
            let n = next.clone();
            let started = Instant::now();
            let planned = hotweights::plan::create(&prev, n, &options)?;
            times.push(started.elapsed());
            report = Some((planned.delta.chunks_changed, planned.report.buckets));
            drop(black_box(planned));
        }
        times.remove(0); // warm-up
        let (changed, buckets) = report.unwrap_or_default();
        emit(
            out,
            args.runs,
            Figure::new(name, chunks, 0, middle(times)).with(json!({
                "chunks_changed": changed,
                "buckets": buckets,
                "peak_rss_mib": peak_rss_mib(),
            })),
        )?;
    }
    Ok(())
}

/// The process's peak resident memory so far, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The commit flip on stores of two model sizes (1 GiB and 8 GiB at scale
/// 1, as sparse files), against the floor of any durable atomic switch: a
/// small file written, fsync'd and renamed, and its directory fsync'd, in the
/// same directory.
fn bench_commit(args: &BenchArgs, out: &Output) -> Result<()> {
    use std::os::unix::fs::FileExt;

    for (name, gib) in [
        ("hotweights.commit_flip_1g", 1.0),
        ("hotweights.commit_flip_8g", 8.0),
    ] {
        let size = (((1u64 << 30) as f64 * gib * args.scale) as u64).max(8 << 20);
        let dir = tempfile::tempdir()?;
        let mut store = hotweights::Store::open_or_create(&dir.path().join("store"))?;
        let chunk = hotweights::DEFAULT_CHUNK_BYTES;
        for version in ["v1", "v2"] {
            // Sparse weights: a marker per chunk keeps every chunk distinct.
            let ckpt = dir.path().join(version);
            std::fs::create_dir_all(&ckpt)?;
            let file = std::fs::File::create(ckpt.join("weights.bin"))?;
            file.set_len(size)?;
            for (i, offset) in (0..size).step_by(chunk as usize).enumerate() {
                let marker = format!("{version}:{i}");
                file.write_all_at(marker.as_bytes(), offset)?;
            }
            let manifest = hotweights::publish(
                &ckpt,
                &hotweights::PublishOptions {
                    model_id: Some("bench".into()),
                    ..hotweights::PublishOptions::new(version)
                },
                &|_| {},
            )?;
            store.import(
                &manifest,
                &hotweights::source::DirSource::new(&ckpt),
                &|_| {},
            )?;
        }
        let mut flips = ["v1", "v2"].iter().cycle();
        let flip = median(args.runs, || {
            if let Some(v) = flips.next() {
                black_box(store.commit(v).is_ok());
            }
        });
        let floor_dir = dir.path().join("floor");
        std::fs::create_dir_all(&floor_dir)?;
        let floor = median(args.runs, || {
            black_box(durable_rename(&floor_dir).is_ok());
        });
        emit(
            out,
            args.runs,
            // The flip touches no model bytes: `bytes` stays 0.
            Figure::new(name, 1, 0, flip)
                .against("write + fsync + rename + fsync(dir)", floor)
                .with(json!({ "store_model_bytes": size })),
        )?;
    }
    Ok(())
}

fn durable_rename(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join("state.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(br#"{"current":"v2"}"#)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join("state"))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Wire bytes of an RL-like update, where 1 % of the bf16 elements of every
/// tensor changed: whole chunks against sparse deltas (zstd of old XOR new).
/// The time is that of measuring both: reading, hashing and encoding.
fn bench_sparse_delta(args: &BenchArgs, out: &Output) -> Result<()> {
    use hotweights::source::DirSource;
    use hotweights::synth::SynthModel;

    let layers = ((8.0 * args.scale).round() as usize).max(1);
    let vocab = ((32_000.0 * args.scale) as usize).max(256);
    let dir = tempfile::tempdir()?;
    let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
    let mut model = SynthModel::decoder(layers, 1024, vocab, 7);
    model.write(&v1, 3)?;
    let elements_changed = model.nudge(0.01, 8);
    model.write(&v2, 3)?;
    let options = |v: &str| hotweights::PublishOptions {
        model_id: Some("bench".into()),
        ..hotweights::PublishOptions::new(v)
    };
    let m1 = hotweights::publish(&v1, &options("v1"), &|_| {})?;
    let m2 = hotweights::publish(&v2, &options("v2"), &|_| {})?;
    let planned = hotweights::plan::create(&m1, m2, &hotweights::PlanOptions::default())?;
    let (prev, next) = (DirSource::new(&v1), DirSource::new(&v2));
    let mut wire = None;
    let time = median(args.runs, || {
        wire = hotweights::plan::wire_report(&planned.plan, &m1, &prev, &next).ok();
    });
    let Some(wire) = wire else {
        bail!("measuring the sparse delta failed");
    };
    emit(
        out,
        args.runs,
        Figure::new(
            "hotweights.sparse_delta_1pct",
            planned.delta.chunks_changed as usize,
            wire.full_bytes as usize,
            time,
        )
        .with(json!({
            "model_bytes": model.bytes(),
            "elements_changed": elements_changed,
            "full_bytes": wire.full_bytes,
            "delta_bytes": wire.delta_bytes,
            "wire_percent": wire.delta_percent(),
        })),
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
    // Sorted by name, as published manifests are.
    let mut tensors: Vec<TensorEntry> = tensors;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
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

/// A synthetic planning window like the ones engines send: 4 nodes with GPU,
/// CPU and SSD tiers, 8 layers, 3 tenants, requests of 1 to 16 consecutive
/// pages (6.2 on average) from CPU or SSD, deadlines 50 to 600 ms out.
fn synthetic_window(requests: usize, seed: u64) -> bcache::WindowInput {
    use bcache::model::{Node, Request, Tenant, Tier, TierState, WindowInput};
    let mut rng = seed;
    let mut next = move || bcache::rng::splitmix64(&mut rng);
    const GIB: u64 = 1 << 30;
    let tier = |tier, capacity: u64, bw: u64| TierState::new(tier, capacity, capacity / 2, bw);
    let nodes = (0..4)
        .map(|n| Node {
            name: format!("node{n}"),
            tiers: vec![
                tier(Tier::Gpu, 80 * GIB, 50 * GIB),
                tier(Tier::Cpu, 512 * GIB, 25 * GIB),
                tier(Tier::Ssd, 4096 * GIB, 6 * GIB),
            ],
        })
        .collect();
    let tenants = ["a", "b", "c"]
        .iter()
        .map(|t| Tenant {
            name: (*t).to_owned(),
            rate_bytes_per_s: 400 * GIB,
            burst_bytes: 64 * GIB,
            weight: 1.0,
        })
        .collect();
    let lengths = [1u64, 2, 4, 8, 16];
    let requests = (0..requests)
        .map(|i| {
            let len = lengths[(next() % 5) as usize];
            let start = next() % (1024 - len);
            let from_ssd = next() % 4 == 0;
            let layer = (next() % 8) as u32;
            Request {
                id: format!("r{i}"),
                node: format!("node{}", next() % 4),
                tenant: ["a", "b", "c"][(next() % 3) as usize].to_owned(),
                pages: (start..start + len).collect(),
                layers: [layer, layer + 1],
                src: if from_ssd { Tier::Ssd } else { Tier::Cpu },
                dst: if from_ssd { Tier::Cpu } else { Tier::Gpu },
                deadline_ns: (5 + next() % 56) * 10_000_000,
                page_bytes: 256 * 1024,
                est_fill_ns: [1u64, 2, 5, 10, 20][(next() % 5) as usize] * 1_000_000,
                tensor: "kv".into(),
                tokens: Vec::new(),
            }
        })
        .collect();
    WindowInput {
        window_index: 0,
        now_ns: 0,
        window_ns: 0,
        nodes,
        tenants,
        layer_latency_ns: (0..8).map(|l| 5_000_000 + l * 500_000).collect(),
        requests,
    }
}

/// Median planning time of one planner planning `window` `runs` times
/// (after one warm-up), each window 20 ms after the last with the same
/// requests due 20 ms later; only the planning call is timed. Returns the
/// last result too.
fn steady(
    window: &mut bcache::WindowInput,
    config: bcache::config::PlannerConfig,
    runs: usize,
) -> (
    Duration,
    Option<bcache::Result<(CachePlan, bcache::planner::Report)>>,
) {
    let mut planner = bcache::planner::Planner::new(config);
    let step = window.window_ns.max(20_000_000);
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for run in 0..=runs {
        let started = Instant::now();
        let result = planner.plan(black_box(window));
        let elapsed = started.elapsed();
        if run > 0 {
            times.push(elapsed);
        }
        last = Some(result);
        window.window_index += 1;
        window.now_ns += step;
        for r in &mut window.requests {
            r.deadline_ns += step;
        }
    }
    (middle(times), last)
}

fn bench_bcache(args: &BenchArgs, out: &Output) -> Result<()> {
    use bcache::config::{Config, PlannerConfig};
    use bcache::planner::Planner;
    for base in [1_000usize, 10_000, 100_000, 1_000_000] {
        let n = ((base as f64 * args.scale) as usize).max(1);
        let mut window = synthetic_window(n, 7);
        let pages: usize = window.requests.iter().map(|r| r.pages.len()).sum();
        let runs = if n >= 500_000 {
            args.runs.min(5)
        } else {
            args.runs
        };
        // Cold: a new planner's first window, which also grows the heat
        // table from nothing.
        let fresh = Planner::new(PlannerConfig::default());
        let cold = median(runs, || {
            let mut p = fresh.clone();
            black_box(p.plan(black_box(&window)).ok());
        });
        // Steady: one planner plans window after window, as the service
        // does. Measured with the default stages, and again with the
        // route-hints stage on (off by default: it serves routers).
        let (time, last) = steady(&mut window, PlannerConfig::default(), runs);
        let hints = PlannerConfig {
            route_hints: true,
            ..PlannerConfig::default()
        };
        let (time_hints, hinted) = steady(&mut window, hints, runs);
        let route_hints = match hinted {
            Some(Ok((_, r))) => r.route_hints.len(),
            _ => 0,
        };
        let (plan, report) = match last {
            Some(r) => r?,
            None => bail!("no planning run"),
        };
        emit(
            out,
            runs,
            Figure::new("bcache_plan_window", n, 0, time).with(json!({
                "pages": pages,
                "cold_median_ms": cold.as_secs_f64() * 1e3,
                "with_route_hints_median_ms": time_hints.as_secs_f64() * 1e3,
                "route_hints": route_hints,
                "ops": plan.ops.len(),
                "demand_bytes": report.demand_bytes,
                "unique_bytes": report.unique_bytes,
                "planned_bytes": report.planned_bytes,
                "deferred_bytes": report.deferred_bytes,
                "credit_deferred": report.credit_deferred.len(),
                "evict": plan.evict.len(),
            })),
        )?;
    }
    let trace_path = std::path::Path::new(crate::bcache::SHARED_TRACE);
    if !trace_path.exists() {
        tracing::warn!(
            "{} is absent: skipping the trace benches",
            trace_path.display()
        );
        return Ok(());
    }
    let trace = bcache::trace::Trace::read(trace_path, false)?;
    let mut config = Config::default();
    config.sim.capacity_scales = vec![1.0];
    let runs = args.runs.min(3);
    let mut report = None;
    let time = median(runs, || {
        report = Some(bcache::sim::simulate(&trace, &config))
    });
    let report = match report {
        Some(r) => r?,
        None => bail!("no simulation run"),
    };
    emit(
        out,
        runs,
        Figure::new(
            "bcache_sim_full_trace_4_policies",
            trace.requests.len(),
            0,
            time,
        )
        .with(json!({
            "policies": config.sim.policies,
            "block_refs": report.block_refs,
        })),
    )?;
    let config = Config::default();
    let report = bcache::sim::simulate(&trace, &config)?;
    for r in &report.results {
        let figure = json!({
            "bench": "bcache_policy_quality",
            "policy": r.policy.name(),
            "gpu_gib_per_node": r.gpu_gib,
            "hit_rate": r.hit_rate,
            "gpu_hit_rate": r.gpu_hit_rate,
            "ttft_p50_ms": r.ttft_p50_ms,
            "ttft_p90_ms": r.ttft_p90_ms,
            "ttft_p99_ms": r.ttft_p99_ms,
            "stall_s": r.stall_s,
            "prefetch_timeliness": r.prefetch_timeliness,
            "plan_p50_us": r.plan_p50_us,
        });
        out.json_line(&figure)?;
    }
    Ok(())
}
