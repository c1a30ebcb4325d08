//! `bstack demo`: the whole stack in one command, each stage reading the
//! contract files the stages before it wrote.
//!
//! The flow, with what each stage reads and writes under the output
//! directory:
//!
//! 1. **trace**: the first requests of the serving trace (or a generated
//!    one, said so, when the shared trace is absent) to `trace.jsonl`.
//! 2. **datajax**: a traced program over `trace.jsonl` exports
//!    `datajax/wave_spec.json`: tiles, prefix cohorts, reuse statistics and
//!    a swap window on the quietest waves.
//! 3. **bcache + stratacache** (`demo_kv.rs`): windows of the trace planned
//!    on two nodes with the WaveSpec's cohorts for placement, one
//!    `CachePlan` per window split into per-node shares that the nodes'
//!    stores execute on real bytes, their reports fed back to the planner;
//!    and a replay of the trace under LRU and bcache.
//! 4. **hotweights**: two versions of a generated checkpoint published,
//!    planned with the WaveSpec's swap window as the `SwapPlan`'s window,
//!    verified, applied, exported byte-identical and rolled back.
//! 5. **rollout** (`demo_cluster.rs`): that `SwapPlan` rolled out to two
//!    worker processes through a coordinator.
//! 6. **bwrt** (`demo_bwrt.rs`): a runtime built from the WaveSpec runs GEMM
//!    waves through the C ABI and takes the new weights only inside the
//!    `SwapPlan`'s window.
//!
//! Last, every contract file written is validated again, and one table
//! (or, with `--json`, one document) says what each stage read, wrote and
//! measured.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use bstack_plan::{Contract, Document, Format, SwapPlan};
use clap::Args;
use hotweights::plan::PlanOptions;
use hotweights::source::DirSource;
use hotweights::store::{ApplySource, Store};
use hotweights::synth::SynthModel;
use hotweights::{PublishOptions, VerifyOptions};
use serde_json::json;

use crate::Outcome;
use crate::output::{Output, bytes, plural, table};
use crate::plan::read_back;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory for everything the demo writes (created if missing; the
    /// demo's own files and folders in it are replaced).
    #[arg(short, long = "output", visible_alias = "out", default_value = "out")]
    output: PathBuf,
    /// Serving trace, Mooncake JSON lines (`timestamp`, `input_length`,
    /// `output_length`, `hash_ids`). Default: the shared one-hour trace, or,
    /// when that file is absent, a generated trace of multi-turn
    /// conversations.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Requests of the trace to use, from its start.
    #[arg(long, default_value_t = 2000, value_parser = at_least_two)]
    requests: u64,
}

/// `--requests`: a trace of one request has no reuse, no cohorts and no
/// window to plan.
fn at_least_two(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n >= 2 => Ok(n),
        Ok(_) => Err("the demo needs at least 2 requests".into()),
        Err(e) => Err(format!("{e}: give a number of requests, such as 2000")),
    }
}

/// One stage's row of the summary.
struct Stage {
    name: &'static str,
    read: String,
    wrote: String,
    figures: String,
    seconds: f64,
}

pub fn run(args: DemoArgs, out: &Output) -> Result<Outcome> {
    let dir = &args.output;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let shown = |p: &Path| p.display().to_string();
    let mut stages = Vec::new();
    let mut timer = Instant::now();
    let mut lap = || {
        let s = timer.elapsed().as_secs_f64();
        timer = Instant::now();
        s
    };

    let trace_path = dir.join("trace.jsonl");
    let trace = trace_stage(args.trace.as_deref(), args.requests as usize, &trace_path)?;
    stages.push(Stage {
        name: "trace",
        read: trace.source.clone(),
        wrote: shown(&trace_path),
        figures: format!(
            "{} over {:.0} s; {} block references, {} distinct",
            plural(trace.requests, "request"),
            trace.span_ms as f64 / 1e3,
            trace.references,
            trace.distinct
        ),
        seconds: lap(),
    });

    let (wave_spec, datajax) = datajax_stage(&dir.join("datajax"), &trace_path, &trace)?;
    let report = &datajax.report;
    stages.push(Stage {
        name: "datajax",
        read: shown(&trace_path),
        wrote: format!("{}\n{}", shown(&wave_spec), shown(&datajax.program)),
        figures: format!(
            "{:.1} % of block references reuse a block;\n{} prefix cohorts kept of {};\nswap window waves [{}, {}) of {}",
            100.0 * report.reused_references as f64 / report.references.max(1) as f64,
            report.cohorts_kept,
            report.cohorts_found,
            report.swap_window.0,
            report.swap_window.1,
            report.waves,
        ),
        seconds: lap(),
    });

    let kv = crate::demo_kv::kv_stage(&dir.join("kv"), &trace_path, &wave_spec)?;
    // The stage interleaves planning and execution; the execution's share
    // of its time is the stores'.
    let exec_seconds = kv.exec_ns as f64 / 1e9;
    let kv_seconds = lap();
    let (e, rr) = (&kv.executed, &kv.round_robin);
    let t = &e.total;
    stages.push(Stage {
        name: "bcache",
        read: format!("{}\n{} (cohorts)", shown(&trace_path), shown(&wave_spec)),
        wrote: format!(
            "{} cache plans and {} node shares in {}",
            e.windows.len(),
            e.windows.len() * 2,
            shown(&kv.dir)
        ),
        figures: format!(
            "{} on 2 nodes, {} placed by cohort;\n\
             {} moved SSD -> CPU, in {};\n\
             round-robin placement: {}; every block once: {};\n\
             {:.1} % of block reads already in CPU memory (round-robin {:.1} %);\n\
             {} deferred, {} dropped",
            plural(e.requests, "request"),
            e.placed_by_cohort,
            bytes(t.planned_bytes),
            plural(t.ops, "op"),
            bytes(rr.total.planned_bytes),
            bytes(kv.floor_bytes),
            100.0 * e.hit_rate(),
            100.0 * rr.hit_rate(),
            bytes(t.deferred_bytes),
            bytes(t.dropped_bytes),
        ),
        seconds: (kv_seconds - exec_seconds).max(0.0),
    });
    stages.push(Stage {
        name: "stratacache",
        read: "each window's node shares".into(),
        wrote: "an exec_report.json per node and window".into(),
        figures: format!(
            "{} copied SSD -> CPU = {} planned, 0 failed;\n\
             {} pages checked byte for byte, {} evicted as planned;\n\
             {} page hits fed back to the planner; {}/s",
            bytes(t.executed_bytes),
            bytes(t.planned_bytes),
            t.verified_pages,
            t.evicted_pages,
            kv.hits_fed_back,
            bytes((t.executed_bytes as f64 / exec_seconds.max(1e-9)) as u64),
        ),
        seconds: exec_seconds,
    });

    let (replay_text, replay) = replay_stage(&trace_path)?;
    stages.push(Stage {
        name: "bcache replay",
        read: shown(&trace_path),
        wrote: "-".into(),
        figures: replay_text,
        seconds: lap(),
    });

    let hw_dir = dir.join("hotweights");
    let (hw_text, hw_summary) = hotweights_stage(&hw_dir, &wave_spec)?;
    stages.push(Stage {
        name: "hotweights",
        read: format!("{} (swap window)", shown(&wave_spec)),
        wrote: format!(
            "{}/ckpt-v1, ckpt-v2,\nv1/v2.weight_manifest.json,\nv1-v2.swap_plan.json, store/",
            shown(&hw_dir)
        ),
        figures: hw_text,
        seconds: lap(),
    });

    let swap_plan = hw_dir.join("v1-v2.swap_plan.json");
    let (cluster_text, cluster) = crate::demo_cluster::cluster_stage(&hw_dir)?;
    stages.push(Stage {
        name: "rollout",
        read: shown(&swap_plan),
        wrote: format!("{}/cluster/rank0, rank1", shown(&hw_dir)),
        figures: cluster_text,
        seconds: lap(),
    });

    let (bwrt_text, bwrt) = crate::demo_bwrt::bwrt_stage(&wave_spec, &swap_plan)?;
    stages.push(Stage {
        name: "bwrt",
        read: format!("{}\n{} (window)", shown(&wave_spec), shown(&swap_plan)),
        wrote: "-".into(),
        figures: bwrt_text,
        seconds: lap(),
    });

    let contracts = validate_all(dir)?;
    stages.push(Stage {
        name: "validate",
        read: format!("every contract file under {}", shown(dir)),
        wrote: "-".into(),
        figures: format!("{} files, all valid", contracts.len()),
        seconds: lap(),
    });

    if out.json {
        out.json_line(&json!({
            "out": dir,
            "trace": trace,
            "stages": stages.iter().map(|s| json!({
                "stage": s.name, "read": s.read, "wrote": s.wrote,
                "figures": s.figures, "seconds": s.seconds,
            })).collect::<Vec<_>>(),
            "datajax": datajax,
            "kv": kv,
            "replay": replay,
            "hotweights": hw_summary,
            "cluster": cluster,
            "bwrt": bwrt,
            "contracts": contracts,
        }))?;
    } else {
        let mut t = table(&["stage", "read", "wrote", "figures", "s"], &[4]);
        for s in &stages {
            t.add_row(vec![
                s.name.to_owned(),
                s.read.clone(),
                s.wrote.clone(),
                s.figures.clone(),
                format!("{:.1}", s.seconds),
            ]);
        }
        out.line(t)?;
        out.line(format_args!(
            "wrote {} contract files under {}; `bstack --json demo` has every figure; \
             look at one with `bstack plan show {}`",
            contracts.len(),
            dir.display(),
            swap_plan.display()
        ))?;
    }
    Ok(Outcome::Ok)
}

/// The trace the demo runs on.
#[derive(Debug, serde::Serialize)]
struct TraceInfo {
    /// Where it came from, in words.
    source: String,
    /// Whether it was generated.
    generated: bool,
    requests: u64,
    span_ms: u64,
    references: u64,
    distinct: u64,
}

/// Writes the first `requests` requests of `trace` (default: the shared
/// trace, or a generated one when that is absent) to `to`.
fn trace_stage(trace: Option<&Path>, requests: usize, to: &Path) -> Result<TraceInfo> {
    use datajax::wavespec::read_trace;
    let shared = Path::new(crate::bcache::SHARED_TRACE);
    let (list, source, generated) = match trace {
        Some(path) => (
            read_trace(path, Some(requests))?,
            format!("{} (first {requests} requests)", path.display()),
            false,
        ),
        None if shared.exists() => (
            read_trace(shared, Some(requests))?,
            format!("{} (first {requests} requests)", shared.display()),
            false,
        ),
        None => (
            synthetic_trace(requests),
            format!(
                "a generated trace of {requests} requests ({} was not found)",
                shared.display()
            ),
            true,
        ),
    };
    ensure!(
        list.len() >= 2,
        "{source}: the demo needs at least 2 requests, the trace has {}",
        list.len()
    );
    let mut text = Vec::new();
    for r in &list {
        serde_json::to_writer(&mut text, r)?;
        text.push(b'\n');
    }
    bstack_plan::write_atomic(to, &text).with_context(|| format!("writing {}", to.display()))?;
    let references: u64 = list.iter().map(|r| r.hash_ids.len() as u64).sum();
    let distinct = list
        .iter()
        .flat_map(|r| &r.hash_ids)
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    let (first, last) = (list[0].timestamp, list[list.len() - 1].timestamp);
    Ok(TraceInfo {
        source,
        generated,
        requests: list.len() as u64,
        span_ms: last.saturating_sub(first),
        references,
        distinct,
    })
}

/// bcache's generated conversation trace ([`bcache::trace::Trace::synthetic`],
/// about eight turns per conversation), as Mooncake requests.
fn synthetic_trace(requests: usize) -> Vec<datajax::wavespec::Request> {
    bcache::trace::Trace::synthetic(requests, requests.div_ceil(8), 42)
        .requests
        .into_iter()
        .map(|r| datajax::wavespec::Request {
            timestamp: r.arrival_ns / 1_000_000,
            input_length: r.input_tokens,
            output_length: r.output_tokens,
            hash_ids: r.blocks,
        })
        .collect()
}

/// Replays the trace under LRU and bcache on the simulator's default
/// cluster; returns the figures in words and the simulator's report.
fn replay_stage(trace: &Path) -> Result<(String, serde_json::Value)> {
    let trace = bcache::trace::Trace::read(trace, false)?;
    let mut config = bcache::config::Config::default();
    config.sim.policies = vec!["lru".into(), "bcache".into()];
    config.sim.capacity_scales = vec![1.0];
    let sim = bcache::sim::simulate(&trace, &config)?;
    use bcache::sim::PolicyKind;
    let by = |kind: PolicyKind| sim.results.iter().find(|r| r.policy == kind);
    let (Some(lru), Some(ours)) = (by(PolicyKind::Lru), by(PolicyKind::Bcache)) else {
        bail!("the replay did not report both lru and bcache");
    };
    let text = format!(
        "{} requests on {} nodes ({} GiB GPU each):\n\
         TTFT p90 {:.0} ms with bcache, {:.0} ms with LRU;\n\
         GPU stall {:.1} s with bcache, {:.1} s with LRU",
        sim.requests,
        config.sim.nodes,
        config.sim.gpu_gib,
        ours.ttft_p90_ms,
        lru.ttft_p90_ms,
        ours.stall_s,
        lru.stall_s,
    );
    Ok((text, serde_json::to_value(&sim)?))
}

/// Every contract file under `dir` (JSON files with a `kind`, and `.pb`
/// files whose name says their contract) read and validated; fails on the
/// first problem, naming the file.
fn validate_all(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if is_contract_file(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    for path in &found {
        let doc = Document::read(path, None)?;
        if let Some(problem) = doc.problems().first() {
            bail!("{}: {problem}", path.display());
        }
    }
    Ok(found)
}

/// Whether `path` holds a contract: its name ends in `KIND.json` or
/// `KIND.pb` for a contract kind (`v1-v2.swap_plan.json`, `wave_spec.json`).
fn is_contract_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let Some(stem) = name
        .strip_suffix(".json")
        .or_else(|| name.strip_suffix(".pb"))
    else {
        return false;
    };
    let kind = stem.rsplit('.').next().unwrap_or(stem);
    bstack_plan::ContractKind::from_name(kind).is_some()
}

/// The hotweights stage: two versions of a generated checkpoint (a
/// fine-tuned layer, an optimizer-like nudge, one tensor added, one
/// removed), published, planned with the WaveSpec's swap window, verified,
/// applied to a local store, committed, exported byte-identical, and
/// rolled back. Returns its figures in words and its summary.
fn hotweights_stage(dir: &Path, wave_spec: &Path) -> Result<(String, serde_json::Value)> {
    let spec = crate::bwrt_cmd::read_wave_spec(wave_spec)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let (ckpt1, ckpt2) = (dir.join("ckpt-v1"), dir.join("ckpt-v2"));
    let mut model = SynthModel::decoder(8, 512, 4096, 1);
    model.write(&ckpt1, 3)?;
    model.nudge_where(0.01, 2, |n| {
        n.starts_with("model.layers.0.") || n.starts_with("model.layers.1.")
    });
    model.rewrite("model.layers.7.mlp.down_proj.weight", 3);
    model.rewrite("lm_head.weight", 3);
    model.remove("model.layers.5.post_attention_layernorm.weight");
    model.add(
        "model.layers.7.mlp.router.weight",
        hotweights::synth::Dtype::BF16,
        &[64, 512],
        4,
    );
    model.write(&ckpt2, 3)?;

    let options = |v: &str| PublishOptions {
        model_id: Some("synth-decoder".into()),
        chunk_bytes: 1 << 20,
        ..PublishOptions::new(v)
    };
    let m1 = hotweights::publish(&ckpt1, &options("v1"), &|_| {})?;
    let m2 = hotweights::publish(&ckpt2, &options("v2"), &|_| {})?;
    m1.write(&dir.join("v1.weight_manifest.json"), Format::Json)?;
    m2.write(&dir.join("v2.weight_manifest.json"), Format::Json)?;

    // The swap may happen only in the waves the WaveSpec set aside for it.
    let mut window = hotweights::plan::any_time_window();
    window.wave_begin = spec.swap_begin;
    window.wave_end = spec.swap_end;
    let plan_options = PlanOptions {
        bucket_bytes: 4 << 20,
        source: Some(std::path::absolute(&ckpt2)?),
        window,
        ..PlanOptions::default()
    };
    let planned = hotweights::plan::create(&m1, m2.clone(), &plan_options)?;
    let plan_path = dir.join("v1-v2.swap_plan.json");
    planned.plan.write(&plan_path, Format::Json)?;
    let d = &planned.delta;
    let wire = hotweights::plan::wire_report(
        &planned.plan,
        &m1,
        &DirSource::new(&ckpt1),
        &DirSource::new(&ckpt2),
    )?;

    let read: SwapPlan = SwapPlan::from_document(Document::read(&plan_path, None)?)
        .context("the plan file is not a swap plan")?;
    let problems = hotweights::verify(
        &read,
        &VerifyOptions {
            prev: Some(&m1),
            next: Some(&m2),
            align: Some(plan_options.align),
            bucket_limit: Some(plan_options.bucket_bytes),
            ..VerifyOptions::default()
        },
    );
    if let Some(p) = problems.first() {
        bail!("the demo's plan does not verify: {p}");
    }

    let store_dir = dir.join("store");
    let mut store = Store::open_or_create(&store_dir)?;
    store.import(&m1, &DirSource::new(&ckpt1), &|_| {})?;
    store.commit("v1")?;
    let applied = store.apply(&read, ApplySource::PlanOps, &|_| {})?;
    let started = Instant::now();
    store.commit("v2")?;
    let flip = started.elapsed();
    let exported = dir.join("export-v2");
    store.export("v2", &exported, &|_| {})?;
    let identical = same_files(&ckpt2, &exported)?;
    if !identical {
        bail!("the exported v2 differs from its checkpoint");
    }
    let back = store.rollback()?;
    let text = format!(
        "{} tensors, {}; {} changed, {} added, {} removed;\n\
         {} of changed chunks ({:.1} %) in {}, {} on the wire as zstd deltas;\n\
         plan verified; swap window waves [{}, {});\n\
         applied {} to a store, committed (flip {:.0} µs),\n\
         exported byte-identical, rolled back to {back}",
        m2.tensors.len(),
        bytes(model.bytes()),
        d.tensors.changed.count,
        d.tensors.added.count,
        d.tensors.removed.count,
        bytes(d.bytes_changed),
        d.changed_percent(),
        plural(planned.report.buckets, "bucket"),
        bytes(wire.delta_bytes),
        window.wave_begin,
        window.wave_end,
        plural(applied.chunks_written, "chunk"),
        flip.as_secs_f64() * 1e6,
    );
    let summary = json!({
        "delta": d, "buckets": planned.report, "wire": wire, "applied": applied,
        "window": {"wave_begin": window.wave_begin, "wave_end": window.wave_end},
        "commit_flip_us": flip.as_secs_f64() * 1e6, "export_identical": identical, "current": back,
    });
    Ok((text, summary))
}

/// Whether every file under `a` has an identical twin under `b`, and `b`
/// has no other files.
fn same_files(a: &Path, b: &Path) -> Result<bool> {
    let list = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(d)?
            .map(|e| e.map(|e| PathBuf::from(e.file_name())))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        Ok(names)
    };
    let names = list(a)?;
    if names != list(b)? {
        return Ok(false);
    }
    for n in names {
        if std::fs::read(a.join(&n))? != std::fs::read(b.join(&n))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What the datajax stage wrote and found.
#[derive(Debug, serde::Serialize)]
struct DatajaxSummary {
    report: datajax::wavespec::ExportReport,
    wave_spec: PathBuf,
    program: PathBuf,
}

/// The datajax stage: a WaveSpec exported from the demo's trace, validated
/// and read back; plus the traced wave-load program, written as IR and
/// loaded again. Returns the WaveSpec's path and the summary.
fn datajax_stage(dir: &Path, trace: &Path, info: &TraceInfo) -> Result<(PathBuf, DatajaxSummary)> {
    use datajax::wavespec::{ExportOptions, export, read_trace, wave_load_program};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let requests = read_trace(trace, None)?;
    let engine = datajax::Engine::new()?;
    let options = ExportOptions {
        source: if info.generated {
            "generated".into()
        } else {
            trace
                .file_name()
                .map_or("trace".into(), |n| n.to_string_lossy().into_owned())
        },
        // Every cohort: the KV stage places requests by them.
        max_cohorts: 1 << 16,
        ..Default::default()
    };
    let (spec, report) = export(&engine, &requests, &options)?;
    let doc = Document::WaveSpec(spec);
    let path = dir.join("wave_spec.json");
    doc.write(&path, Format::Json)?;
    read_back(&path, &doc)?;
    let program = wave_load_program(options.wave_ms)?;
    let program_path = dir.join("wave_load.ir.json");
    bstack_plan::write_atomic(&program_path, program.to_json().as_bytes())?;
    datajax::Ir::load(&program_path)?;
    Ok((
        path.clone(),
        DatajaxSummary {
            report,
            wave_spec: path,
            program: program_path,
        },
    ))
}
