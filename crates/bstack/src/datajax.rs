//! `bstack datajax`: run, explain and export traced DataFrame programs, and
//! export WaveSpecs from serving traces.
//!
//! A pipeline file is a datajax IR document (JSON with `ir_version`; see
//! `datajax::ir`), as `Frame::to_ir` writes it, or a Substrait plan
//! (protobuf) exported by `export-substrait`. Inputs are bound by name:
//! `--input events=events.parquet`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bstack_plan::{Document, Format};
use clap::{Args, Subcommand};
use datajax::engine::Backend;
use datajax::{Engine, Ir, Source, Table};
use serde_json::json;

use crate::Outcome;
use crate::output::{Output, bytes, key_value_table, plural};

#[derive(Subcommand, Debug)]
pub enum DatajaxCommand {
    /// Run a pipeline (IR JSON or Substrait) on bound inputs; print the
    /// result or write it with -o (.parquet, .csv, .arrow, .jsonl).
    Run(RunArgs),
    /// Print a pipeline's IR, its lowered and optimised logical plans, and
    /// the physical plan DataFusion would run.
    Explain(PipelineArgs),
    /// Write a pipeline as a Substrait plan (protobuf) for other engines.
    ExportSubstrait(ExportSubstraitArgs),
    /// Compute prefix cohorts, a prefix-depth histogram, reuse distances
    /// and I/O extents from a serving trace (Mooncake JSON lines) and write
    /// them as a WaveSpec contract.
    ExportWavespec(ExportWavespecArgs),
}

/// A pipeline and its inputs.
#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// The pipeline: datajax IR JSON, or a Substrait plan (.pb).
    pipeline: PathBuf,
    /// Binds input NAME to the file at PATH (.parquet, .csv, .arrow,
    /// .jsonl); repeat for each input.
    #[arg(long = "input", short = 'i', value_name = "NAME=PATH")]
    inputs: Vec<String>,
    /// Partitions the engine runs in parallel (default: the core count).
    #[arg(long, value_name = "N")]
    partitions: Option<usize>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Write the result here instead of printing it; the extension picks
    /// the format (.parquet, .csv, .arrow, .jsonl).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Rows shown when printing.
    #[arg(long, default_value_t = 50, value_name = "N")]
    show: usize,
}

#[derive(Args, Debug)]
pub struct ExportSubstraitArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Where to write the Substrait plan (protobuf).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExportWavespecArgs {
    /// The request trace: JSON lines with timestamp (ms), input_length,
    /// output_length and hash_ids (prefix block ids).
    #[arg(long, value_name = "FILE")]
    trace: PathBuf,
    /// Where to write the WaveSpec (.json, or .pb for protobuf).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
    /// Use only the first N requests of the trace (the flag `bstack demo`
    /// takes too; `--limit` is accepted as well).
    #[arg(long = "requests", alias = "limit", value_name = "N")]
    requests: Option<usize>,
    /// Tokens per KV block in the trace.
    #[arg(long, default_value_t = 512, value_name = "N")]
    block_tokens: u32,
    /// Bytes of one KV block (2 * layers * kv_heads * head_dim * dtype
    /// bytes * block_tokens); the default is a Llama-3-8B-like bf16 shape.
    #[arg(long, default_value_t = 2 * 32 * 8 * 128 * 2 * 512, value_name = "BYTES")]
    block_bytes: u64,
    /// Cohorts kept, the most valuable first.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_cohorts: usize,
    /// Depths in the prefix histogram.
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_depth: u32,
    /// Length of one wave, ms of trace time.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    wave_ms: u64,
    /// Waves in the swap window (placed on the quietest waves).
    #[arg(long, default_value_t = 1, value_name = "N")]
    swap_waves: u64,
}

pub fn run(cmd: DatajaxCommand, out: &Output) -> Result<Outcome> {
    match cmd {
        DatajaxCommand::Run(a) => run_pipeline(a, out),
        DatajaxCommand::Explain(a) => explain(a, out),
        DatajaxCommand::ExportSubstrait(a) => export_substrait(a, out),
        DatajaxCommand::ExportWavespec(a) => export_wavespec(a, out),
    }
}

/// `NAME=PATH` pairs as sources.
fn bind(inputs: &[String]) -> Result<HashMap<String, Source>> {
    let mut out = HashMap::new();
    for i in inputs {
        let Some((name, path)) = i.split_once('=') else {
            bail!("--input {i:?}: write NAME=PATH (for example events=events.parquet)");
        };
        if name.is_empty() || path.is_empty() {
            bail!("--input {i:?}: both NAME and PATH are needed");
        }
        if out
            .insert(name.to_owned(), Source::from_path(path)?)
            .is_some()
        {
            bail!("--input {name}: bound twice");
        }
    }
    Ok(out)
}

fn engine(partitions: Option<usize>) -> Result<Engine> {
    Ok(match partitions {
        Some(0) => bail!("--partitions must be at least 1"),
        Some(n) => Engine::with_partitions(n)?,
        None => Engine::new()?,
    })
}

/// A pipeline file: IR or Substrait bytes.
enum Pipeline {
    Ir(Ir),
    Substrait(Vec<u8>),
}

fn load(path: &Path) -> Result<Pipeline> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let looks_json = raw.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if ext == "json" || (looks_json && !matches!(ext, "pb" | "substrait")) {
        let text =
            String::from_utf8(raw).with_context(|| format!("{}: not UTF-8", path.display()))?;
        Ok(Pipeline::Ir(Ir::from_json(
            &text,
            &path.display().to_string(),
        )?))
    } else {
        Ok(Pipeline::Substrait(raw))
    }
}

fn run_pipeline(a: RunArgs, out: &Output) -> Result<Outcome> {
    let inputs = bind(&a.pipeline.inputs)?;
    let engine = engine(a.pipeline.partitions)?;
    let started = std::time::Instant::now();
    let table = match load(&a.pipeline.pipeline)? {
        Pipeline::Ir(ir) => engine.run(&ir, &inputs)?,
        Pipeline::Substrait(b) => datajax::substrait::run(
            &engine,
            &b,
            &inputs,
            &a.pipeline.pipeline.display().to_string(),
        )?,
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &a.output {
        table.write(path)?;
    }
    if out.json {
        let preview = if a.output.is_none() {
            rows_json(&table, a.show)?
        } else {
            json!([])
        };
        out.json_line(&json!({
            "rows": table.num_rows(),
            "columns": table.schema.fields().iter().map(|f| json!({"name": f.name(), "type": f.data_type().to_string()})).collect::<Vec<_>>(),
            "output": a.output.as_ref().map(|p| p.display().to_string()),
            "seconds": seconds,
            "preview": preview,
        }))?;
    } else if let Some(path) = &a.output {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        out.line(format!(
            "wrote {} ({}, {}) in {seconds:.3} s",
            path.display(),
            plural(table.num_rows() as u64, "row"),
            bytes(size)
        ))?;
    } else {
        let shown = Table {
            schema: table.schema.clone(),
            batches: first_rows(&table, a.show),
        };
        out.line(shown.pretty()?)?;
        if table.num_rows() > a.show {
            out.line(format!(
                "... {} rows in all (--show N, or -o FILE for every row)",
                table.num_rows()
            ))?;
        }
    }
    Ok(Outcome::Ok)
}

fn first_rows(
    table: &Table,
    n: usize,
) -> Vec<datajax::datafusion::arrow::record_batch::RecordBatch> {
    let mut left = n;
    let mut out = Vec::new();
    for b in &table.batches {
        if left == 0 {
            break;
        }
        let take = left.min(b.num_rows());
        out.push(b.slice(0, take));
        left -= take;
    }
    out
}

fn rows_json(table: &Table, n: usize) -> Result<serde_json::Value> {
    let mut w = datajax::datafusion::arrow::json::ArrayWriter::new(Vec::new());
    for b in first_rows(table, n) {
        w.write(&b)?;
    }
    w.finish()?;
    let buf = w.into_inner();
    if buf.is_empty() {
        return Ok(json!([]));
    }
    Ok(serde_json::from_slice(&buf)?)
}

fn explain(a: PipelineArgs, out: &Output) -> Result<Outcome> {
    let inputs = bind(&a.inputs)?;
    let engine = engine(a.partitions)?;
    let e = match load(&a.pipeline)? {
        Pipeline::Ir(ir) => engine.explain(&ir, &inputs)?,
        Pipeline::Substrait(b) => {
            let plan = datajax::substrait::import(
                &engine,
                &b,
                &inputs,
                &a.pipeline.display().to_string(),
            )?;
            engine.explain_plan("(a Substrait plan: no datajax IR)".into(), plan)?
        }
    };
    if out.json {
        out.json_line(&json!({
            "ir": e.ir, "logical": e.logical, "optimized": e.optimized, "physical": e.physical,
        }))?;
    } else {
        out.line(e)?;
    }
    Ok(Outcome::Ok)
}

fn export_substrait(a: ExportSubstraitArgs, out: &Output) -> Result<Outcome> {
    let inputs = bind(&a.pipeline.inputs)?;
    let engine = engine(a.pipeline.partitions)?;
    let Pipeline::Ir(ir) = load(&a.pipeline.pipeline)? else {
        bail!(
            "{} is already a Substrait plan",
            a.pipeline.pipeline.display()
        );
    };
    let bytes_out = datajax::substrait::export(&engine, &ir, &inputs)?;
    bstack_plan::write_atomic(&a.output, &bytes_out)?;
    if out.json {
        out.json_line(
            &json!({"output": a.output.display().to_string(), "bytes": bytes_out.len()}),
        )?;
    } else {
        out.line(format!(
            "wrote {} ({})",
            a.output.display(),
            bytes(bytes_out.len() as u64)
        ))?;
    }
    Ok(Outcome::Ok)
}

fn export_wavespec(a: ExportWavespecArgs, out: &Output) -> Result<Outcome> {
    if a.wave_ms == 0 {
        bail!("--wave-ms must be at least 1");
    }
    let requests = datajax::wavespec::read_trace(&a.trace, a.requests)?;
    let engine = Engine::new()?;
    let options = datajax::wavespec::ExportOptions {
        block_tokens: a.block_tokens,
        block_bytes: a.block_bytes,
        max_cohorts: a.max_cohorts,
        max_depth: a.max_depth,
        wave_ms: a.wave_ms,
        swap_waves: a.swap_waves,
        source: a
            .trace
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let (spec, report) = datajax::wavespec::export(&engine, &requests, &options)?;
    let seconds = started.elapsed().as_secs_f64();
    let format = match a.output.extension().and_then(|e| e.to_str()) {
        Some("pb" | "binpb" | "bin") => Format::Proto,
        _ => Format::Json,
    };
    Document::WaveSpec(spec).write(&a.output, format)?;
    if out.json {
        let mut v = serde_json::to_value(&report)?;
        v["output"] = json!(a.output.display().to_string());
        v["seconds"] = json!(seconds);
        out.json_line(&v)?;
    } else {
        let mut t = key_value_table();
        let rows: [(&str, String); 10] = [
            ("requests", report.requests.to_string()),
            ("block references", report.references.to_string()),
            ("distinct blocks", report.distinct_blocks.to_string()),
            (
                "reused references",
                format!(
                    "{} ({:.1} %)",
                    report.reused_references,
                    100.0 * report.reused_references as f64 / report.references.max(1) as f64
                ),
            ),
            (
                "median reuse distance",
                plural(report.median_reuse_distance, "block"),
            ),
            (
                "cohorts",
                format!("{} kept of {}", report.cohorts_kept, report.cohorts_found),
            ),
            ("io extents", report.extents.to_string()),
            ("waves", report.waves.to_string()),
            (
                "swap window",
                format!(
                    "waves [{}, {}), {}",
                    report.swap_window.0,
                    report.swap_window.1,
                    plural(report.swap_window_requests, "request")
                ),
            ),
            (
                "written",
                format!("{} in {seconds:.2} s", a.output.display()),
            ),
        ];
        for (k, v) in rows {
            t.add_row(vec![k.to_owned(), v]);
        }
        out.line(t)?;
    }
    Ok(Outcome::Ok)
}
