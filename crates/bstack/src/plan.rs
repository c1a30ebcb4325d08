//! `bstack plan`: validate, show and convert contract files, and write the built-in examples.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bstack_plan::{
    CachePlan, ContractKind, Document, Format, HashAlgorithm, SwapPlan, SwapWindow, TransferKind,
    TransferOp, WaveSpec, WeightManifest,
};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::Outcome;
use crate::output::{Output, bytes, duration_ns, plural, table};

#[derive(Subcommand, Debug)]
pub enum PlanCommand {
    /// Check files against their contract and print every problem with its
    /// path (`ops[3].length: must be > 0`). Exits 1 if any file has problems,
    /// 2 if any cannot be read.
    Validate {
        /// Contract files: JSON (any name) or protobuf (see --kind).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        kind: KindArg,
    },
    /// Summarise a file: counts, bytes, windows, and the largest operations.
    Show {
        /// Contract file.
        file: PathBuf,
        #[command(flatten)]
        kind: KindArg,
        /// Rows in the table of largest operations or tensors.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Convert a file between JSON and protobuf; the output replaces OUT
    /// atomically.
    Convert {
        /// Contract file to read.
        file: PathBuf,
        /// Form to write.
        #[arg(long, value_enum)]
        to: FormatArg,
        /// File to write.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        kind: KindArg,
    },
    /// Write the built-in example of every contract, as JSON and as
    /// protobuf (ten files, `KIND.json` and `KIND.pb`), each validated and
    /// read back: starting points for hand-written plans and fixtures for
    /// tools that read them.
    Examples {
        /// Directory to write to (created if missing); files there with the
        /// same names are replaced.
        #[arg(short, long, default_value = "examples")]
        output: PathBuf,
    },
}

/// Names the contract of protobuf input.
#[derive(Args, Debug)]
pub struct KindArg {
    /// Contract of protobuf input, needed unless the file name contains it
    /// (`x.cache_plan.pb`): weight-manifest, cache-plan, swap-window,
    /// swap-plan or wave-spec. For JSON, checked against the file's `kind`.
    #[arg(long, value_parser = parse_kind)]
    kind: Option<ContractKind>,
}

fn parse_kind(s: &str) -> Result<ContractKind, String> {
    ContractKind::from_name(s).ok_or_else(|| {
        format!(
            "unknown contract {s:?}; expected one of {}",
            ContractKind::names()
        )
    })
}

/// The two encodings, as a flag value.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    /// Pretty JSON with `kind` and `schema_version`.
    Json,
    /// Protobuf binary.
    Proto,
}

impl FormatArg {
    /// The flag spelling.
    pub fn name(self) -> &'static str {
        match self {
            FormatArg::Json => "json",
            FormatArg::Proto => "proto",
        }
    }
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Json => Format::Json,
            FormatArg::Proto => Format::Proto,
        }
    }
}

pub fn run(cmd: PlanCommand, out: &Output) -> Result<Outcome> {
    match cmd {
        PlanCommand::Examples { output } => examples(&output, out),
        PlanCommand::Validate { files, kind } => validate(&files, kind.kind, out),
        PlanCommand::Show { file, kind, top } => {
            let doc = read(&file, kind.kind)?;
            show(&file, &doc, top, out)?;
            Ok(Outcome::Ok)
        }
        PlanCommand::Convert {
            file,
            to,
            output,
            kind,
        } => {
            let doc = read(&file, kind.kind)?;
            let problems = doc.problems().len();
            if problems > 0 {
                tracing::warn!(
                    "{} has {problems} problems; `bstack plan validate` lists them",
                    file.display()
                );
            }
            doc.write(&output, to.into())?;
            let size = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            if out.json {
                out.json_line(&json!({
                    "file": output, "kind": doc.kind().name(), "format": to.name(), "bytes": size,
                }))?;
            } else {
                out.line(format_args!(
                    "wrote {} ({}, {}, {})",
                    output.display(),
                    doc.kind(),
                    to.name(),
                    bytes(size)
                ))?;
            }
            Ok(Outcome::Ok)
        }
    }
}

fn read(path: &Path, kind: Option<ContractKind>) -> Result<Document> {
    Ok(Document::read(path, kind)?)
}

fn validate(files: &[PathBuf], kind: Option<ContractKind>, out: &Output) -> Result<Outcome> {
    let (mut unreadable, mut invalid) = (0, 0);
    for file in files {
        let doc = match read(file, kind) {
            Ok(doc) => doc,
            // One file: its error is the whole story.
            Err(e) if files.len() == 1 && !out.json => return Err(e),
            Err(e) => {
                unreadable += 1;
                if out.json {
                    out.json_line(&json!({ "file": file, "error": crate::one_line(&e) }))?;
                } else {
                    eprintln!("error: {}", crate::one_line(&e));
                }
                continue;
            }
        };
        let problems = doc.problems();
        if !problems.is_empty() {
            invalid += 1;
        }
        if out.json {
            out.json_line(&json!({
                "file": file, "kind": doc.kind().name(), "valid": problems.is_empty(), "problems": problems,
            }))?;
        } else if problems.is_empty() {
            out.line(format_args!("{}: valid {}", file.display(), doc.kind()))?;
        } else {
            for p in &problems {
                out.line(format_args!("{}: {p}", file.display()))?;
            }
            out.line(format_args!(
                "{}: {} in this {}",
                file.display(),
                plural(problems.len() as u64, "problem"),
                doc.kind()
            ))?;
        }
    }
    if unreadable > 0 {
        bail!("{unreadable} of {} files could not be read", files.len());
    }
    Ok(if invalid > 0 {
        Outcome::Problems
    } else {
        Outcome::Ok
    })
}

/// A summary: labelled figures, an optional table, and the same as JSON.
struct Summary {
    rows: Vec<(&'static str, String)>,
    json: serde_json::Map<String, Value>,
    table: Option<comfy_table::Table>,
}

impl Summary {
    fn new() -> Self {
        Summary {
            rows: Vec::new(),
            json: serde_json::Map::new(),
            table: None,
        }
    }
    /// Adds a figure shown as `text` in the table and as `value` in JSON,
    /// under `label` with spaces turned to underscores.
    fn add(&mut self, label: &'static str, text: String, value: Value) {
        self.rows.push((label, text));
        self.json.insert(label.replace(' ', "_"), value);
    }
}

fn show(path: &Path, doc: &Document, top: usize, out: &Output) -> std::io::Result<()> {
    let mut s = Summary::new();
    s.json.insert("file".into(), json!(path));
    s.json.insert("kind".into(), json!(doc.kind().name()));
    match doc {
        Document::WeightManifest(m) => summarise_manifest(&mut s, m, top),
        Document::CachePlan(p) => summarise_cache_plan(&mut s, p, top),
        Document::SwapWindow(w) => summarise_swap_window(&mut s, w),
        Document::SwapPlan(p) => summarise_swap_plan(&mut s, p, top),
        Document::WaveSpec(w) => summarise_wave_spec(&mut s, w),
    }
    let problems = doc.problems().len();
    s.add("problems", problems.to_string(), json!(problems));
    if out.json {
        return out.json_line(&Value::Object(s.json));
    }
    out.line(format_args!("{} ({})", path.display(), doc.kind()))?;
    let mut t = crate::output::key_value_table();
    for (k, v) in s.rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    out.line(t)?;
    match s.table {
        Some(largest) => out.line(largest),
        None => Ok(()),
    }
}

fn kind_name(kind: i32) -> String {
    TransferKind::try_from(kind)
        .map(|k| k.as_str_name().to_owned())
        .unwrap_or_else(|_| kind.to_string())
}

fn summarise_ops(s: &mut Summary, ops: &[TransferOp], top: usize) {
    let total = total(ops.iter().map(|o| o.length));
    s.add(
        "ops",
        format!("{} ({})", ops.len(), bytes(total)),
        json!({"count": ops.len(), "bytes": total}),
    );
    let mut by_kind: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for op in ops {
        let e = by_kind.entry(kind_name(op.kind)).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(op.length);
    }
    let text = by_kind
        .iter()
        .map(|(k, (n, b))| format!("{k} {n} ({})", bytes(*b)))
        .collect::<Vec<_>>();
    let value: serde_json::Map<String, Value> = by_kind
        .iter()
        .map(|(k, (n, b))| (k.clone(), json!({"count": n, "bytes": b})))
        .collect();
    s.add("ops by kind", text.join(", "), Value::Object(value));
    if ops.is_empty() || top == 0 {
        return;
    }
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(ops[i].length), i));
    let mut t = table(
        &["op", "kind", "src", "dst", "bytes", "deadline", "note"],
        &[0, 4],
    );
    for &i in order.iter().take(top) {
        let op = &ops[i];
        let deadline = if op.deadline_ns == 0 {
            "-".to_owned()
        } else {
            duration_ns(op.deadline_ns)
        };
        t.add_row(vec![
            i.to_string(),
            kind_name(op.kind),
            format!("{}+{}", op.src, op.src_offset),
            format!("{}+{}", op.dst, op.dst_offset),
            bytes(op.length),
            deadline,
            op.note.clone(),
        ]);
    }
    s.table = Some(t);
}

fn summarise_manifest(s: &mut Summary, m: &WeightManifest, top: usize) {
    let tensor_bytes = total(m.tensors.iter().map(|t| t.length));
    let file_bytes = total(m.files.iter().map(|f| f.length));
    let chunks = m.chunk_count();
    let algorithm = HashAlgorithm::try_from(m.hash_algorithm)
        .map(|a| a.as_str_name().to_owned())
        .unwrap_or_else(|_| m.hash_algorithm.to_string());
    s.add("model", m.model_id.clone(), json!(m.model_id));
    s.add("version", m.version.clone(), json!(m.version));
    s.add("hash", algorithm.clone(), json!(algorithm));
    s.add(
        "tensors",
        format!("{} ({})", m.tensors.len(), bytes(tensor_bytes)),
        json!({"count": m.tensors.len(), "bytes": tensor_bytes}),
    );
    s.add(
        "files",
        format!("{} ({})", m.files.len(), bytes(file_bytes)),
        json!({"count": m.files.len(), "bytes": file_bytes}),
    );
    s.add(
        "chunks",
        format!("{chunks} of {}", bytes(m.chunk_bytes)),
        json!({"count": chunks, "chunk_bytes": m.chunk_bytes}),
    );
    if m.tensors.is_empty() || top == 0 {
        return;
    }
    let mut order: Vec<usize> = (0..m.tensors.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(m.tensors[i].length), i));
    let mut t = table(&["tensor", "dtype", "shape", "bytes", "chunks"], &[3, 4]);
    for &i in order.iter().take(top) {
        let e = &m.tensors[i];
        t.add_row(vec![
            e.name.clone(),
            e.dtype.clone(),
            format!("{:?}", e.shape),
            bytes(e.length),
            e.chunks.len().to_string(),
        ]);
    }
    s.table = Some(t);
}

fn summarise_cache_plan(s: &mut Summary, p: &CachePlan, top: usize) {
    s.add("plan", p.plan_id.clone(), json!(p.plan_id));
    if let Some(w) = &p.window {
        s.add(
            "window",
            format!(
                "#{} [{}, {}) ({})",
                w.index,
                duration_ns(w.start_ns),
                duration_ns(w.end_ns),
                duration_ns(w.end_ns.saturating_sub(w.start_ns))
            ),
            json!({"index": w.index, "start_ns": w.start_ns, "end_ns": w.end_ns}),
        );
    }
    let pages = |list: &[bstack_plan::KvPageRef]| total(list.iter().map(|p| p.count.max(1)));
    for (key, list) in [
        ("prefetch", &p.prefetch),
        ("evict", &p.evict),
        ("admit", &p.admit),
    ] {
        let n = pages(list);
        s.add(key, plural(n, "page"), json!(n));
    }
    summarise_ops(s, &p.ops, top);
}

fn summarise_swap_window(s: &mut Summary, w: &SwapWindow) {
    let deadline = if w.t_deadline_ns == 0 {
        "none".to_owned()
    } else {
        duration_ns(w.t_deadline_ns)
    };
    s.add(
        "time",
        format!("from {} until {deadline}", duration_ns(w.t_start_ns)),
        json!({"t_start_ns": w.t_start_ns, "t_deadline_ns": w.t_deadline_ns}),
    );
    s.add(
        "waves",
        format!("[{}, {})", w.wave_begin, w.wave_end),
        json!({"begin": w.wave_begin, "end": w.wave_end}),
    );
}

fn summarise_swap_plan(s: &mut Summary, p: &SwapPlan, top: usize) {
    s.add("plan", p.plan_id.clone(), json!(p.plan_id));
    let version = |m: &Option<WeightManifest>| {
        m.as_ref()
            .map(|m| format!("{} {}", m.model_id, m.version))
            .unwrap_or_else(|| "(missing)".into())
    };
    s.add("from", version(&p.from), json!(version(&p.from)));
    s.add("to", version(&p.to), json!(version(&p.to)));
    if let (Some(from), Some(to)) = (&p.from, &p.to) {
        let tensors = |m: &WeightManifest| -> HashMap<String, Vec<String>> {
            let hashes =
                |t: &bstack_plan::TensorEntry| t.chunks.iter().map(|c| c.hash.clone()).collect();
            m.tensors
                .iter()
                .map(|t| (t.name.clone(), hashes(t)))
                .collect()
        };
        let files = |m: &WeightManifest| -> HashMap<String, Vec<String>> {
            let hashes = |f: &bstack_plan::FileEntry| {
                f.chunks
                    .iter()
                    .map(|c| c.hash.clone())
                    .chain([f.hash.clone()])
                    .collect()
            };
            m.files
                .iter()
                .map(|f| (f.path.clone(), hashes(f)))
                .collect()
        };
        if from.tensors.is_empty() && from.files.is_empty() {
            // Planners may send the old version's identity only: its
            // entries are on the receivers. Comparing against nothing
            // would call every entry added.
            s.add(
                "delta",
                format!(
                    "not in the plan: it names {} {} without its entries \
                     (`bstack hw verify-plan --manifest-prev` checks against them)",
                    from.model_id, from.version
                ),
                json!(null),
            );
        } else {
            summarise_delta(s, "tensors", &tensors(from), &tensors(to));
            summarise_delta(s, "files", &files(from), &files(to));
        }
    }
    let staged = p.staged_bytes();
    s.add(
        "buckets",
        format!("{} holding {}", p.buckets.len(), bytes(staged)),
        json!({"count": p.buckets.len(), "bytes": staged}),
    );
    if let Some(w) = &p.window {
        summarise_swap_window(s, w);
    }
    let digest = if p.digest.is_empty() {
        "not sealed".to_owned()
    } else if p.digest == p.compute_digest() {
        format!("{} (matches)", p.digest)
    } else {
        format!("{} (DOES NOT MATCH)", p.digest)
    };
    s.add("digest", digest, json!(p.digest));
    summarise_ops(s, &p.ops, top);
}

/// Entries added, changed (any hash differs) and removed between two versions.
fn summarise_delta(
    s: &mut Summary,
    label: &'static str,
    old: &HashMap<String, Vec<String>>,
    new: &HashMap<String, Vec<String>>,
) {
    let added = new.keys().filter(|k| !old.contains_key(*k)).count();
    let removed = old.keys().filter(|k| !new.contains_key(*k)).count();
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .count();
    s.add(
        label,
        format!("{added} added, {changed} changed, {removed} removed"),
        json!({"added": added, "changed": changed, "removed": removed}),
    );
}

/// A sum that stops at `u64::MAX`: figures from input must not overflow.
fn total(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

fn summarise_wave_spec(s: &mut Summary, w: &WaveSpec) {
    let dtype = if w.dtype.is_empty() { "F32" } else { &w.dtype };
    s.add(
        "tile",
        format!("{} x {} x {} {dtype}", w.bm, w.bn, w.bk),
        json!({"bm": w.bm, "bn": w.bn, "bk": w.bk, "dtype": dtype}),
    );
    if let Some(c) = &w.cluster {
        s.add(
            "cluster",
            format!("{} x {}", c.x, c.y),
            json!({"x": c.x, "y": c.y}),
        );
    }
    s.add(
        "waves",
        if w.num_waves == 0 {
            "open-ended".into()
        } else {
            w.num_waves.to_string()
        },
        json!(w.num_waves),
    );
    s.add(
        "swap window",
        format!("waves [{}, {})", w.swap_begin, w.swap_end),
        json!({"begin": w.swap_begin, "end": w.swap_end}),
    );
    s.add(
        "tiles ordered",
        w.tile_order.len().to_string(),
        json!(w.tile_order.len()),
    );
    s.add(
        "io extents",
        w.io_extents.len().to_string(),
        json!(w.io_extents.len()),
    );
    s.add(
        "cohorts",
        w.cohorts.len().to_string(),
        json!(w.cohorts.len()),
    );
    let deepest = w.prefix_histogram.last().map_or(0, |d| d.depth);
    s.add(
        "prefix histogram",
        match w.prefix_histogram.len() {
            0 => "none".into(),
            n => format!("{}, deepest {deepest} blocks", plural(n as u64, "depth")),
        },
        json!({"depths": w.prefix_histogram.len(), "deepest": deepest}),
    );
    s.add(
        "stage depth",
        w.stage_depth.to_string(),
        json!(w.stage_depth),
    );
    let deadline = if w.deadline_ns == 0 {
        "none".into()
    } else {
        duration_ns(w.deadline_ns)
    };
    s.add("deadline", deadline, json!(w.deadline_ns));
}

/// `plan examples`: every contract's example in both forms, read back.
fn examples(dir: &Path, out: &Output) -> Result<Outcome> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rows = Vec::new();
    for doc in bstack_plan::example::all() {
        if let Some(problem) = doc.problems().first() {
            bail!("the built-in {} example is invalid: {problem}", doc.kind());
        }
        let mut files = Vec::new();
        for (format, ext) in [(Format::Json, "json"), (Format::Proto, "pb")] {
            let path = dir.join(format!("{}.{ext}", doc.kind()));
            doc.write(&path, format)?;
            read_back(&path, &doc)?;
            let size = std::fs::metadata(&path)
                .with_context(|| format!("reading back {}", path.display()))?
                .len();
            files.push((path, size));
        }
        rows.push((doc, files));
    }
    if out.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(doc, files)| {
                json!({
                    "contract": doc.kind().name(),
                    "detail": example_detail(doc),
                    "json": {"file": files[0].0, "bytes": files[0].1},
                    "proto": {"file": files[1].0, "bytes": files[1].1},
                    "valid": true,
                })
            })
            .collect();
        out.json_line(&json!({"out": dir, "contracts": list}))?;
    } else {
        let mut t = table(
            &["contract", "example", "JSON", "protobuf", "valid"],
            &[2, 3],
        );
        for (doc, files) in &rows {
            t.add_row(vec![
                doc.kind().to_string(),
                example_detail(doc),
                bytes(files[0].1),
                bytes(files[1].1),
                "yes, read back from both".to_owned(),
            ]);
        }
        out.line(t)?;
        out.line(format_args!(
            "wrote {} files to {}; inspect one with `bstack plan show {}`",
            rows.len() * 2,
            dir.display(),
            dir.join("swap_plan.json").display()
        ))?;
    }
    Ok(Outcome::Ok)
}

/// One line on what an example holds.
fn example_detail(doc: &Document) -> String {
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
        Document::SwapPlan(p) => format!(
            "{} buckets, {} of changed chunks, sealed",
            p.buckets.len(),
            bytes(p.staged_bytes())
        ),
        Document::WaveSpec(w) => format!(
            "{}x{}x{} tiles, {} waves, swap [{}, {})",
            w.bm, w.bn, w.bk, w.num_waves, w.swap_begin, w.swap_end
        ),
    }
}

/// Reads `path` back and fails unless it decodes to `doc`.
pub fn read_back(path: &Path, doc: &Document) -> Result<()> {
    let back = Document::read(path, Some(doc.kind()))
        .with_context(|| format!("reading back {}", path.display()))?;
    if &back != doc {
        bail!("{} does not read back to the value written", path.display());
    }
    Ok(())
}
