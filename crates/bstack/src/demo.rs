//! `bstack demo`: the stack on built-in examples, end to end through files.
//!
//! Every stage writes its contracts to the output directory in both forms
//! and the next reads them from there, so the demo exercises exactly what a
//! user's pipeline would: files, not in-memory structs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bstack_plan::{Contract, Document, Format, SwapPlan, example};
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
    /// Directory for the contract files (created if missing).
    #[arg(long, default_value = "out")]
    out: PathBuf,
}

pub fn run(args: DemoArgs, out: &Output) -> Result<Outcome> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut rows = Vec::new();
    for doc in example::all() {
        let problems = doc.problems();
        if !problems.is_empty() {
            bail!(
                "built-in {} example is invalid: {}",
                doc.kind(),
                problems[0]
            );
        }
        let json_path = args.out.join(format!("{}.json", doc.kind()));
        let proto_path = args.out.join(format!("{}.pb", doc.kind()));
        doc.write(&json_path, Format::Json)?;
        doc.write(&proto_path, Format::Proto)?;
        read_back(&json_path, &doc)?;
        read_back(&proto_path, &doc)?;
        rows.push(Row {
            json_bytes: std::fs::metadata(&json_path)?.len(),
            proto_bytes: std::fs::metadata(&proto_path)?.len(),
            detail: detail(&doc),
            json_path,
            proto_path,
            doc,
        });
    }

    let (steps, hw_summary) = hotweights_stage(&args.out.join("hotweights"))?;
    let (cluster_table, cluster_summary) =
        crate::demo_cluster::cluster_stage(&args.out.join("hotweights"))?;
    let (cache_rows, cache_summary) = bcache_stage(&args.out.join("bcache"))?;
    let (strata_text, strata_summary) = strata_stage(&args.out.join("strata"))?;
    let (datajax_text, datajax_summary) = datajax_stage(&args.out.join("datajax"))?;
    let (bwrt_text, bwrt_summary) =
        crate::demo_bwrt::bwrt_stage(&args.out.join("datajax").join("wave_spec.json"))?;

    if out.json {
        let stages: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "contract": r.doc.kind().name(),
                    "detail": r.detail,
                    "json": {"file": r.json_path, "bytes": r.json_bytes},
                    "proto": {"file": r.proto_path, "bytes": r.proto_bytes},
                    "valid": true,
                })
            })
            .collect();
        out.json_line(&json!({
            "out": args.out,
            "contracts": stages,
            "hotweights": hw_summary,
            "cluster": cluster_summary,
            "bcache": cache_summary,
            "strata": strata_summary,
            "datajax": datajax_summary,
            "bwrt": bwrt_summary,
        }))?;
    } else {
        let mut t = table(
            &["contract", "example", "JSON", "protobuf", "valid"],
            &[2, 3],
        );
        for r in &rows {
            t.add_row(vec![
                r.doc.kind().to_string(),
                r.detail.clone(),
                bytes(r.json_bytes),
                bytes(r.proto_bytes),
                "yes, read back from both".to_owned(),
            ]);
        }
        out.line(t)?;
        let mut t = table(&["hotweights", "result"], &[]);
        for s in &steps {
            t.add_row(vec![s.step.to_owned(), s.result.clone()]);
        }
        out.line(t)?;
        out.line(cluster_table)?;
        out.line(cache_rows)?;
        out.line(strata_text)?;
        out.line(datajax_text)?;
        out.line(bwrt_text)?;
        out.line(format_args!(
            "wrote {} files to {}; inspect one with `bstack plan show {}`",
            rows.len() * 2,
            args.out.display(),
            args.out.join("swap_plan.json").display()
        ))?;
    }
    Ok(Outcome::Ok)
}

struct Row {
    doc: Document,
    detail: String,
    json_path: PathBuf,
    json_bytes: u64,
    proto_path: PathBuf,
    proto_bytes: u64,
}

fn detail(doc: &Document) -> String {
    match doc {
        Document::WeightManifest(m) => format!(
            "{} {}: {}, {}",
            m.model_id,
            m.version,
            plural(m.tensors.len() as u64, "tensor"),
            plural(m.files.len() as u64, "file")
        ),
        Document::CachePlan(p) => format!(
            "{} ops, {} prefetch, {} evict, {} admit",
            p.ops.len(),
            p.prefetch.len(),
            p.evict.len(),
            p.admit.len()
        ),
        Document::SwapWindow(w) => format!("waves [{}, {})", w.wave_begin, w.wave_end),
        Document::SwapPlan(p) => {
            let moved = p.staged_bytes();
            format!(
                "{} buckets, {} of changed chunks, sealed",
                p.buckets.len(),
                bytes(moved)
            )
        }
        Document::WaveSpec(w) => {
            format!(
                "{}x{}x{} tiles, {} waves, swap [{}, {})",
                w.bm, w.bn, w.bk, w.num_waves, w.swap_begin, w.swap_end
            )
        }
    }
}

/// One row of the hotweights stage's table.
struct Step {
    step: &'static str,
    result: String,
}

/// The hotweights stage: two versions of a generated checkpoint (a
/// fine-tuned layer, an optimizer-like nudge, one tensor added, one
/// removed), published, planned, verified, applied to a local store,
/// committed, exported byte-identical, and rolled back.
fn hotweights_stage(dir: &Path) -> Result<(Vec<Step>, serde_json::Value)> {
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

    let mut steps = Vec::new();
    let options = |v: &str| PublishOptions {
        model_id: Some("synth-decoder".into()),
        chunk_bytes: 1 << 20,
        ..PublishOptions::new(v)
    };
    let m1 = hotweights::publish(&ckpt1, &options("v1"), &|_| {})?;
    let m2 = hotweights::publish(&ckpt2, &options("v2"), &|_| {})?;
    m1.write(&dir.join("v1.weight_manifest.json"), Format::Json)?;
    m2.write(&dir.join("v2.weight_manifest.json"), Format::Json)?;
    steps.push(Step {
        step: "publish",
        result: format!(
            "v1 and v2: {} tensors, {} in 1 MiB chunks",
            m2.tensors.len(),
            bytes(model.bytes())
        ),
    });

    let plan_options = PlanOptions {
        bucket_bytes: 4 << 20,
        source: Some(std::path::absolute(&ckpt2)?),
        ..PlanOptions::default()
    };
    let planned = hotweights::plan::create(&m1, m2.clone(), &plan_options)?;
    let plan_path = dir.join("v1-v2.swap_plan.json");
    planned.plan.write(&plan_path, Format::Json)?;
    let d = &planned.delta;
    steps.push(Step {
        step: "plan",
        result: format!(
            "tensors: {} changed, {} added, {} removed, {} unchanged; {} of {} ({:.1} %) to move in {} of up to 4 MiB",
            d.tensors.changed.count,
            d.tensors.added.count,
            d.tensors.removed.count,
            d.tensors.unchanged.count,
            bytes(d.bytes_changed),
            bytes(d.bytes_total),
            d.changed_percent(),
            plural(planned.report.buckets, "bucket")
        ),
    });
    let wire = hotweights::plan::wire_report(
        &planned.plan,
        &m1,
        &DirSource::new(&ckpt1),
        &DirSource::new(&ckpt2),
    )?;
    steps.push(Step {
        step: "sparse delta",
        result: format!(
            "wire bytes {} whole, {} with zstd(old XOR new) deltas ({:.1} %)",
            bytes(wire.full_bytes),
            bytes(wire.delta_bytes),
            wire.delta_percent()
        ),
    });

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
    steps.push(Step {
        step: "verify-plan",
        result: format!("no problems; digest {}", &read.digest[..23]),
    });

    let store_dir = dir.join("store");
    let mut store = Store::open_or_create(&store_dir)?;
    store.import(&m1, &DirSource::new(&ckpt1), &|_| {})?;
    store.commit("v1")?;
    let applied = store.apply(&read, ApplySource::PlanOps, &|_| {})?;
    steps.push(Step {
        step: "apply",
        result: format!(
            "v1 imported and current; v2 applied: {} written ({}), {} shared with v1",
            plural(applied.chunks_written, "chunk"),
            bytes(applied.bytes_written),
            plural(applied.chunks_shared, "chunk")
        ),
    });
    let started = Instant::now();
    store.commit("v2")?;
    let flip = started.elapsed();
    let exported = dir.join("export-v2");
    store.export("v2", &exported, &|_| {})?;
    let identical = same_files(&ckpt2, &exported)?;
    if !identical {
        bail!("the exported v2 differs from its checkpoint");
    }
    steps.push(Step {
        step: "commit + export",
        result: format!(
            "v2 current (flip {:.0} µs); exported files byte-identical to ckpt-v2",
            flip.as_secs_f64() * 1e6
        ),
    });
    let back = store.rollback()?;
    steps.push(Step {
        step: "rollback",
        result: format!(
            "current is {back:?} again; `bstack hw status --store {}`",
            store_dir.display()
        ),
    });
    let summary = json!({
        "delta": d, "buckets": planned.report, "wire": wire, "applied": applied,
        "commit_flip_us": flip.as_secs_f64() * 1e6, "export_identical": identical, "current": back,
    });
    Ok((steps, summary))
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

/// The bcache stage: plan one window from the trace's first requests
/// (written as a CachePlan and read back), then replay the first five
/// minutes of the shared trace (or a generated one when it is absent) under
/// `lru` and `bcache`.
fn bcache_stage(dir: &Path) -> Result<(String, serde_json::Value)> {
    use bcache::config::Config;
    use bcache::model::{Tier, TierState, WindowInput};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (trace, source) = demo_trace()?;

    // One window: the first 16 requests' blocks, waiting in CPU memory.
    let mut config = Config::default();
    let bb = config.sim.block_bytes();
    let tier = |tier, capacity: u64, bw: u64| TierState::new(tier, capacity, capacity / 2, bw);
    let window = demo_window(
        &trace,
        16,
        vec![
            tier(Tier::Gpu, 32 << 30, 25_000_000_000),
            tier(Tier::Cpu, 128 << 30, 25_000_000_000),
        ],
        (Tier::Cpu, Tier::Gpu),
        bb,
        |i| 20_000_000 + i * 50_000_000,
    );
    let window_path = dir.join("window.json");
    bstack_plan::write_atomic(&window_path, &serde_json::to_vec_pretty(&window)?)?;
    let window = WindowInput::read(&window_path)?;
    let mut planner = bcache::Planner::new(config.planner.clone());
    let (plan, report) = planner.plan(&window)?;
    let doc = Document::CachePlan(plan);
    let plan_path = dir.join("cache_plan.json");
    doc.write(&plan_path, Format::Json)?;
    read_back(&plan_path, &doc)?;

    config.sim.policies = vec!["lru".into(), "bcache".into()];
    config.sim.capacity_scales = vec![1.0];
    let sim = bcache::sim::simulate(&trace, &config)?;
    let mut text = format!(
        "bcache: planned window 0 of {} requests: {} demanded, {} after dedup, {} ops ({}); \
         wrote {}\nreplayed {} requests of {}:\n",
        window.requests.len(),
        bytes(report.demand_bytes),
        bytes(report.unique_bytes),
        report.ops,
        if report.deferred_bytes > 0 {
            format!("{} deferred to later windows", bytes(report.deferred_bytes))
        } else {
            "nothing deferred".to_owned()
        },
        plan_path.display(),
        sim.requests,
        source,
    );
    text.push_str(&crate::bcache::sim_table(&sim.results).to_string());
    let summary = json!({
        "trace": source,
        "window": {"requests": window.requests.len(), "demand_bytes": report.demand_bytes,
                   "unique_bytes": report.unique_bytes, "ops": report.ops,
                   "deferred_bytes": report.deferred_bytes, "plan": plan_path},
        "sim": sim,
    });
    Ok((text, summary))
}

/// The first five minutes of the shared serving trace, or a generated
/// trace when it is absent; with words saying which.
fn demo_trace() -> Result<(bcache::trace::Trace, String)> {
    use bcache::trace::Trace;
    let shared = Path::new(crate::bcache::SHARED_TRACE);
    let (mut trace, source) = if shared.exists() {
        (
            Trace::read(shared, false)?,
            format!("{} (first 5 minutes)", shared.display()),
        )
    } else {
        (
            Trace::synthetic(1000, 60, 42),
            format!("a generated trace ({} was not found)", shared.display()),
        )
    };
    trace.truncate_to(300.0);
    Ok((trace, source))
}

/// One planning window on `node0` with `tiers`: the first `requests`
/// requests of the trace, their blocks moving from `moves.0` to `moves.1`
/// in pages of `page_bytes`, request `i` due at `deadline(i)`.
fn demo_window(
    trace: &bcache::trace::Trace,
    requests: usize,
    tiers: Vec<bcache::model::TierState>,
    moves: (bcache::model::Tier, bcache::model::Tier),
    page_bytes: u64,
    deadline: impl Fn(u64) -> u64,
) -> bcache::model::WindowInput {
    use bcache::model::{Node, Request, WindowInput};
    WindowInput {
        window_index: 0,
        now_ns: 0,
        window_ns: 0,
        nodes: vec![Node {
            name: "node0".into(),
            tiers,
        }],
        tenants: Vec::new(),
        layer_latency_ns: Vec::new(),
        requests: trace
            .requests
            .iter()
            .take(requests)
            .enumerate()
            .map(|(i, r)| Request {
                id: format!("req{i}"),
                node: "node0".into(),
                tenant: "default".into(),
                pages: r.blocks.clone(),
                layers: [0, 1],
                src: moves.0,
                dst: moves.1,
                deadline_ns: deadline(i as u64),
                page_bytes,
                est_fill_ns: 0,
                tensor: "kv".into(),
                tokens: Vec::new(),
            })
            .collect(),
    }
}

/// Bytes of one KV page in the stratacache stage: small enough that the
/// demo moves a few hundred MiB at most, large enough to measure bandwidth.
const STRATA_PAGE_BYTES: u64 = 256 << 10;

/// The stratacache stage: bcache plans one window of the trace's first
/// requests (their pages wait on SSD and are wanted in CPU memory); the
/// plan goes through a file; stratacache executes it on real bytes from a
/// disk tier into a memory tier on four streams, every copied page is
/// checked byte for byte, and the page hits go back to the planner.
fn strata_stage(dir: &Path) -> Result<(String, serde_json::Value)> {
    use bcache::model::{Tier, TierState};
    use stratacache::config::{ByteSize, Config, TierConfig, TierKind};
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (trace, source) = demo_trace()?;

    let mut planner_config = bcache::config::Config::default().planner;
    // Operations of at most 4 MiB: enough of them to keep four streams busy.
    planner_config.max_io_bytes = 4 << 20;
    let tier = |tier, capacity: u64, bw: u64| TierState::new(tier, capacity, capacity, bw);
    let window = demo_window(
        &trace,
        24,
        vec![
            tier(Tier::Cpu, 4 << 30, 20_000_000_000),
            tier(Tier::Ssd, 64 << 30, 4_000_000_000),
        ],
        (Tier::Ssd, Tier::Cpu),
        STRATA_PAGE_BYTES,
        |i| 5_000_000 + i * 2_000_000,
    );
    let mut planner = bcache::Planner::new(planner_config);
    let (plan, plan_report) = planner.plan(&window)?;
    let plan_path = dir.join("cache_plan.json");
    Document::CachePlan(plan).write(&plan_path, Format::Json)?;
    // The executor reads the plan back from its file, as a separate
    // process would.
    let plan = crate::strata::read_plan(&plan_path)?;

    let mut memory = TierConfig::new(TierKind::Memory);
    memory.name = Some("cpu".into());
    memory.capacity = Some(ByteSize(2 << 30));
    let mut disk = TierConfig::new(TierKind::Disk);
    disk.name = Some("ssd".into());
    disk.path = Some(dir.join("store"));
    disk.capacity = Some(ByteSize(8 << 30));
    let mut config = Config {
        tiers: vec![memory, disk],
        ..Config::default()
    };
    config.exec.node = "node0".into();
    config.exec.streams = 4;
    let engine = config.open()?;
    let seeded = crate::strata::fill_sources(&engine, &plan, &config.exec)?;
    engine.flush()?;
    let report = stratacache::execute(&engine, &plan, &config.exec)?;

    // Every page the plan moved must now be in CPU memory, byte for byte.
    let cpu = engine.tier_index("cpu")?;
    let mut verified = 0u64;
    for op in plan.ops.iter().filter(|o| o.dst == "tier://node0/cpu") {
        let pages: u64 = op.kv_refs.iter().map(|r| r.count.max(1)).sum();
        let page_bytes = (op.length / pages.max(1)) as usize;
        for r in &op.kv_refs {
            for (layer, page, key) in config.exec.keys.ref_keys(r) {
                let got = engine.load(&key, stratacache::Access::Exact(cpu))?;
                if *got.object.bytes != *crate::strata::page_pattern(layer, page, page_bytes) {
                    bail!("page {page} of layer {layer} arrived with the wrong bytes");
                }
                verified += 1;
            }
        }
    }
    let hits: Vec<(u32, u64, f64)> = report
        .hits
        .iter()
        .map(|h| (h.layer, h.page, h.hits))
        .collect();
    planner.observe_hits(&hits, window.now_ns);
    engine.close()?;
    let report_path = dir.join("exec_report.json");
    bstack_plan::write_atomic(&report_path, &serde_json::to_vec_pretty(&report)?)?;

    let text = format!(
        "stratacache: executed the bcache plan for {} requests of {source}:\n  \
         {} ops, {} from the disk tier (ssd) into the memory tier (cpu) on {} streams in {} \
         ({}/s); {} late (at most {}), {} failed; {} pages checked byte for byte; \
         {} page hits fed back to the planner\n  wrote {} and {}",
        window.requests.len(),
        report.ops.len(),
        bytes(report.done_bytes),
        report.streams,
        crate::output::duration_ns(report.elapsed_ns),
        bytes(report.bandwidth_bps as u64),
        report.late_ops,
        crate::output::duration_ns(report.max_late_ns),
        report.failed_ops,
        verified,
        hits.len(),
        plan_path.display(),
        report_path.display(),
    );
    let summary = json!({
        "trace": source,
        "requests": window.requests.len(),
        "planned_bytes": plan_report.planned_bytes,
        "deferred_bytes": plan_report.deferred_bytes,
        "seeded_pages": seeded,
        "ops": report.ops.len(),
        "done_bytes": report.done_bytes,
        "failed_ops": report.failed_ops,
        "late_ops": report.late_ops,
        "max_late_ns": report.max_late_ns,
        "elapsed_ns": report.elapsed_ns,
        "bandwidth_bps": report.bandwidth_bps,
        "verified_pages": verified,
        "hits_fed_back": hits.len(),
        "plan": plan_path,
        "report": report_path,
    });
    if report.failed_ops > 0 {
        bail!(
            "the stratacache stage failed {} operations: {}",
            report.failed_ops,
            text
        );
    }
    Ok((text, summary))
}

/// The datajax stage: a WaveSpec exported from the first 2,000 requests of
/// the shared trace (or a generated trace when it is absent), validated and
/// read back; plus the traced wave-load program, written as IR and replayed.
fn datajax_stage(dir: &Path) -> Result<(String, serde_json::Value)> {
    use datajax::wavespec::{ExportOptions, Request, export, read_trace, wave_load_program};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let shared = Path::new(crate::bcache::SHARED_TRACE);
    let (requests, source) = if shared.exists() {
        (
            read_trace(shared, Some(2000))?,
            format!("{} (first 2,000 requests)", shared.display()),
        )
    } else {
        // Chained prefixes: 50 conversations, each turn extending the last.
        let mut requests = Vec::new();
        let mut next_id = 0u64;
        for conv in 0..50u64 {
            let mut ids: Vec<u64> = Vec::new();
            for turn in 0..8u64 {
                for _ in 0..(2 + turn % 3) {
                    ids.push(next_id);
                    next_id += 1;
                }
                requests.push(Request {
                    timestamp: conv * 900 + turn * 4000,
                    input_length: ids.len() as u64 * 512,
                    output_length: 200,
                    hash_ids: ids.clone(),
                });
            }
        }
        (
            requests,
            format!("a generated trace ({} was not found)", shared.display()),
        )
    };
    let engine = datajax::Engine::new()?;
    let options = ExportOptions {
        source: if shared.exists() {
            "conversation_trace.jsonl"
        } else {
            "generated"
        }
        .into(),
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
    let text = format!(
        "datajax: {} requests of {source}: {} block references, {:.1} % reused, {} cohorts kept of {}, \
         {} io extents, swap window waves [{}, {}) of {}; wrote {} and the traced program {}",
        report.requests,
        report.references,
        100.0 * report.reused_references as f64 / report.references.max(1) as f64,
        report.cohorts_kept,
        report.cohorts_found,
        report.extents,
        report.swap_window.0,
        report.swap_window.1,
        report.waves,
        path.display(),
        program_path.display(),
    );
    let summary =
        json!({"trace": source, "report": report, "wave_spec": path, "program": program_path});
    Ok((text, summary))
}
