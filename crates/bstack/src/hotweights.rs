//! `bstack hotweights` (alias `hw`): weight rollouts.
//!
//! A thin shell over the `hotweights` library: each subcommand parses its
//! flags, reads and validates its input files, calls one library function
//! and prints a table (or JSON with `--json`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bstack_plan::{
    Contract, ContractKind, Document, Format, HashAlgorithm, SwapPlan, WeightManifest,
};
use clap::{Args, Subcommand, ValueEnum};
use hotweights::plan::{PlanOptions, Planned, TpGroups, WireReport};
use hotweights::source::DirSource;
use hotweights::store::{ApplyReport, ApplySource, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::Outcome;
use crate::output::{Output, bytes, key_value_table, plural, table};
use crate::plan::FormatArg;

#[derive(Subcommand, Debug)]
pub enum HotweightsCommand {
    /// Hash a checkpoint directory (safetensors, single or sharded with
    /// model.safetensors.index.json, plus config and tokenizer files) into a
    /// manifest of tensors and fixed-size chunks. The same directory always
    /// gives the same manifest.
    Publish(PublishArgs),

    /// Plan the rollout from one manifest to the next: the delta by
    /// (tensor, chunk) hash, removed tensors included; the changed chunks
    /// packed into aligned buckets (first-fit decreasing, oversize chunks
    /// split); consumer ranks from a TP-group map; the transfer ops that fill
    /// each bucket (with --source); sealed with a digest.
    Plan(PlanArgs),

    /// Check a swap plan before executing it: contract checks, every changed
    /// chunk staged exactly once, alignment, bucket limits, ops against the
    /// manifests, consumer ranks against the world and the TP groups, and
    /// the digest. Lists every problem; exits 1 if there is any.
    VerifyPlan(VerifyArgs),

    /// Make a plan's new version available in a local store (created if
    /// absent): every staged chunk is read, verified against its hash and
    /// stored; unchanged chunks are shared with the version already there.
    /// With --manifest instead of --plan, import a whole version. Does not
    /// change the current version: see commit.
    Apply(ApplyArgs),

    /// Make a stored version current, atomically (fsync'd rename): a crash
    /// leaves either the old or the new version current.
    Commit(CommitArgs),

    /// Make the previous version current again, atomically, in O(1).
    Rollback(StoreArg),

    /// Show a store's versions, which is current, its size, and anything an
    /// interrupted apply or commit left behind.
    Status(StoreArg),

    /// Delete what no retained version needs: unreferenced chunks, temporary
    /// files, and versions dropped from the history.
    Gc(GcArgs),

    /// Rebuild a stored version's checkpoint directory, byte-identical to the
    /// directory it was published from (every chunk verified).
    Export(ExportArgs),

    /// The rollout coordinator: serve it, or ask it for status and workers.
    #[command(subcommand)]
    Coord(crate::hw_cluster::CoordCommand),

    /// Run a worker beside a serving engine: receive and verify rollouts,
    /// stage them in a local store, vote, and flip on commit (pausing the
    /// engine through a hook); catch up when behind.
    Worker(crate::hw_cluster::WorkerArgs),

    /// Hold the next version's checkpoint and send it to the workers when a
    /// rollout to it begins (a pipelined chain broadcast of the changed
    /// chunks); serve catch-up transfers.
    ServeSource(crate::hw_cluster::SourceArgs),

    /// Drive one rollout end to end: submit the plan, begin, wait for every
    /// precommit, commit, wait for every worker to flip. Exits 0 only if
    /// every consumer committed.
    Rollout(crate::hw_cluster::RolloutArgs),
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Manifest of the version the receivers hold.
    #[arg(long)]
    prev: PathBuf,
    /// Manifest of the version to roll out.
    #[arg(long)]
    next: PathBuf,
    /// Largest bucket, in MiB.
    #[arg(long, default_value_t = 512, conflicts_with = "auto",
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    bucket_mib: u64,
    /// Size buckets from free device memory: alpha x free MiB (see
    /// --free-mib and --alpha).
    #[arg(long)]
    auto: bool,
    /// Free device memory in MiB for --auto [default: the least free memory
    /// over local GPUs, from nvidia-smi].
    #[arg(long, requires = "auto")]
    free_mib: Option<u64>,
    /// Share of free memory one bucket may take, for --auto; in (0, 1].
    #[arg(long, default_value_t = 0.25, requires = "auto")]
    alpha: f64,
    /// Alignment of items inside a bucket, in bytes; a power of two.
    #[arg(long, default_value_t = hotweights::plan::DEFAULT_ALIGN)]
    align: u64,
    /// Number of ranks: every rank in --tp-groups must be below it, and
    /// buckets that go to every rank list all of them.
    #[arg(long)]
    world_size: Option<u32>,
    /// JSON object of tensor-name glob -> consumer ranks, e.g.
    /// {"model.layers.*.mlp.*": [0, 1]}. Unmatched tensors and other files
    /// go to every rank.
    #[arg(long)]
    tp_groups: Option<PathBuf>,
    /// Directory of the next version's checkpoint: the plan then carries
    /// the ops that read each bucket's bytes from it.
    #[arg(long)]
    source: Option<PathBuf>,
    /// Directory of the previous version's checkpoint: with --source,
    /// measures the wire bytes of sparse deltas (zstd of old XOR new).
    #[arg(long, requires = "source")]
    prev_source: Option<PathBuf>,
    /// Plan even if the manifests' model ids, hash functions or chunk sizes
    /// differ.
    #[arg(long)]
    force: bool,
    /// Identifier of the rollout [default: MODEL:FROM->TO].
    #[arg(long)]
    plan_id: Option<String>,
    /// Wave range [BEGIN, END) in which the runtime may swap, as BEGIN:END
    /// [default: any wave].
    #[arg(long, value_parser = parse_waves)]
    swap_waves: Option<(u64, u64)>,
    /// Write the plan here (atomically) and print a summary; without it the
    /// JSON plan goes to stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Form of the plan.
    #[arg(long, value_enum, default_value_t = FormatArg::Json)]
    format: FormatArg,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Swap plan (JSON, or protobuf named *.swap_plan.pb).
    plan: PathBuf,
    /// The plan's `from` must be exactly this manifest.
    #[arg(long)]
    manifest_prev: Option<PathBuf>,
    /// The plan's `to` must be exactly this manifest.
    #[arg(long)]
    manifest_next: Option<PathBuf>,
    /// Number of ranks: consumer ranks must be below it.
    #[arg(long)]
    world_size: Option<u32>,
    /// TP-group map (as for plan): every rank consuming a tensor must
    /// receive each bucket holding a piece of it.
    #[arg(long)]
    tp_groups: Option<PathBuf>,
    /// Every bucket must name its consumer ranks.
    #[arg(long)]
    require_consumers: bool,
    /// Alignment every item must keep, in bytes; 0 skips the check.
    #[arg(long, default_value_t = hotweights::plan::DEFAULT_ALIGN)]
    align: u64,
    /// Largest allowed bucket, in MiB.
    #[arg(long)]
    bucket_mib: Option<u64>,
}

#[derive(Args, Debug)]
pub struct StoreArg {
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// Store directory (created if absent).
    #[arg(long)]
    store: PathBuf,
    /// Swap plan to apply; the store must hold the plan's unchanged chunks.
    #[arg(
        long,
        required_unless_present = "manifest",
        conflicts_with = "manifest"
    )]
    plan: Option<PathBuf>,
    /// Import this manifest's whole version instead (needs --source).
    #[arg(long, requires = "source")]
    manifest: Option<PathBuf>,
    /// Directory of the new version's checkpoint [default: the files the
    /// plan's ops name].
    #[arg(long)]
    source: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
    /// Version to make current [default: the last one applied].
    #[arg(long)]
    version: Option<String>,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
    /// Keep only this many versions of rollback history [default: all].
    #[arg(long)]
    keep: Option<usize>,
    /// Also delete the versions that are neither current nor in the
    /// rollback history (applied but never committed, or rolled back from).
    #[arg(long)]
    prune_uncommitted: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
    /// Version to export [default: the current one].
    #[arg(long)]
    version: Option<String>,
    /// Directory to create; must not exist or be empty.
    #[arg(short, long)]
    output: PathBuf,
}

fn parse_waves(s: &str) -> std::result::Result<(u64, u64), String> {
    let (b, e) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected BEGIN:END, e.g. 100:104"))?;
    let begin = b.parse::<u64>().map_err(|e| format!("{b:?}: {e}"))?;
    let end = e
        .parse::<u64>()
        .map_err(|e| format!("{e:?}: not a wave index"))?;
    if end < begin {
        return Err(format!("{s:?}: END must be >= BEGIN"));
    }
    Ok((begin, end))
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Version label of these weights (e.g. step-1200).
    #[arg(long)]
    version: String,
    /// Model identity [default: the checkpoint directory's name].
    #[arg(long)]
    model_id: Option<String>,
    /// Chunk size in MiB: a changed chunk is the unit a rollout moves.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=4096))]
    chunk_mib: u64,
    /// Chunk hash function.
    #[arg(long, value_enum, default_value_t = HashArg::Blake3)]
    hash: HashArg,
    /// Write the manifest here (atomically) and print a summary; without it
    /// the JSON manifest goes to stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Form of the manifest.
    #[arg(long, value_enum, default_value_t = FormatArg::Json)]
    format: FormatArg,
}

/// Chunk hash functions.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum HashArg {
    /// BLAKE3: fast, the default.
    Blake3,
    /// SHA-256, for tools that require it.
    Sha256,
}

pub fn run(cmd: HotweightsCommand, out: &Output, quiet: bool) -> Result<Outcome> {
    match cmd {
        HotweightsCommand::Publish(args) => publish(args, out, quiet),
        HotweightsCommand::Plan(args) => plan(args, out),
        HotweightsCommand::VerifyPlan(args) => verify_plan(args, out),
        HotweightsCommand::Apply(args) => apply(args, out, quiet),
        HotweightsCommand::Commit(args) => commit(args, out),
        HotweightsCommand::Rollback(args) => rollback(args, out),
        HotweightsCommand::Status(args) => status(args, out),
        HotweightsCommand::Gc(args) => gc(args, out),
        HotweightsCommand::Export(args) => export(args, out, quiet),
        HotweightsCommand::Coord(cmd) => crate::hw_cluster::coord(cmd, out),
        HotweightsCommand::Worker(args) => crate::hw_cluster::worker(args, out),
        HotweightsCommand::ServeSource(args) => crate::hw_cluster::serve_source(args, out),
        HotweightsCommand::Rollout(args) => crate::hw_cluster::rollout(args, out, quiet),
    }
}

fn publish(args: PublishArgs, out: &Output, quiet: bool) -> Result<Outcome> {
    let format: Format = args.format.into();
    if args.output.is_none() && format == Format::Proto {
        bail!("--format proto writes binary: give a file with -o");
    }
    let options = hotweights::PublishOptions {
        model_id: args.model_id,
        version: args.version,
        chunk_bytes: args.chunk_mib << 20,
        hash: match args.hash {
            HashArg::Blake3 => HashAlgorithm::Blake3,
            HashArg::Sha256 => HashAlgorithm::Sha256,
        },
    };
    let started = Instant::now();
    let checkpoint = hotweights::Checkpoint::open(&args.checkpoint)?;
    let total = checkpoint.total_bytes();
    let bar = progress_bar(total, "hashing", quiet);
    let manifest = hotweights::publish_checkpoint(&checkpoint, &options, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let Some(path) = args.output else {
        out.line(manifest.to_json().trim_end())?;
        return Ok(Outcome::Ok);
    };
    manifest.write(&path, format)?;
    summarise(&manifest, &path, total, seconds, out)?;
    Ok(Outcome::Ok)
}

/// A byte progress bar on stderr, shown only on a terminal and without -q.
fn progress_bar(total: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

fn summarise(
    m: &WeightManifest,
    path: &Path,
    total: u64,
    seconds: f64,
    out: &Output,
) -> std::io::Result<()> {
    let tensor_bytes: u64 = m.tensors.iter().map(|t| t.length).sum();
    let chunks = m.chunk_count();
    let rate = total as f64 / seconds.max(1e-9);
    if out.json {
        return out.json_line(&json!({
            "manifest": path, "model_id": m.model_id, "version": m.version,
            "tensors": m.tensors.len(), "tensor_bytes": tensor_bytes, "files": m.files.len(),
            "bytes": total, "chunks": chunks, "chunk_bytes": m.chunk_bytes,
            "seconds": seconds, "bytes_per_second": rate,
        }));
    }
    let mut t = key_value_table();
    t.add_row(vec!["manifest".to_owned(), path.display().to_string()]);
    t.add_row(vec![
        "model".to_owned(),
        format!("{} {}", m.model_id, m.version),
    ]);
    t.add_row(vec![
        "tensors".to_owned(),
        format!("{} ({})", m.tensors.len(), bytes(tensor_bytes)),
    ]);
    t.add_row(vec![
        "other entries".to_owned(),
        format!("{} (headers, config, tokenizer, ...)", m.files.len()),
    ]);
    t.add_row(vec![
        "chunks".to_owned(),
        format!("{chunks} of up to {}", bytes(m.chunk_bytes)),
    ]);
    t.add_row(vec![
        "hashed".to_owned(),
        format!(
            "{} in {seconds:.2} s ({}/s)",
            bytes(total),
            bytes(rate as u64)
        ),
    ]);
    out.line(t)
}

/// Reads a contract file and checks it: bad input is an error (exit 2)
/// that lists every problem with its path.
pub(crate) fn read_valid<T: Contract>(path: &Path) -> Result<T> {
    let doc = Document::read(path, Some(T::KIND))?;
    let problems = doc.problems();
    if !problems.is_empty() {
        let listed: Vec<String> = problems.iter().take(20).map(|p| p.to_string()).collect();
        let more = problems.len().saturating_sub(listed.len());
        bail!(
            "{}: not a valid {}: {}{}",
            path.display(),
            T::KIND.name(),
            listed.join("; "),
            if more > 0 {
                format!("; and {more} more (bstack plan validate lists them all)")
            } else {
                String::new()
            }
        );
    }
    T::from_document(doc).with_context(|| format!("{}: not a {}", path.display(), T::KIND.name()))
}

/// Least free memory over local GPUs, in MiB, as nvidia-smi reports it.
fn free_gpu_mib() -> Result<u64> {
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.free", "--format=csv,noheader,nounits"])
        .output()
        .context("--auto without --free-mib asks nvidia-smi for free GPU memory, and it could not run; pass --free-mib N")?;
    if !output.status.success() {
        bail!("nvidia-smi failed ({}); pass --free-mib N", output.status);
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .min()
        .context("nvidia-smi listed no GPU; pass --free-mib N")
}

fn plan(args: PlanArgs, out: &Output) -> Result<Outcome> {
    let format: Format = args.format.into();
    if args.output.is_none() && format == Format::Proto {
        bail!("--format proto writes binary: give a file with -o");
    }
    let prev: WeightManifest = read_valid(&args.prev)?;
    let next: WeightManifest = read_valid(&args.next)?;
    let groups = args.tp_groups.as_deref().map(TpGroups::load).transpose()?;
    if let Some(g) = &groups {
        let problems = g.problems(args.world_size);
        if !problems.is_empty() {
            bail!(
                "{}: {}",
                args.tp_groups.as_deref().unwrap_or(Path::new("")).display(),
                problems.join("; ")
            );
        }
    }
    let bucket_bytes = if args.auto {
        let free = match args.free_mib {
            Some(f) => f,
            None => free_gpu_mib()?,
        };
        hotweights::plan::auto_bucket_bytes(free.saturating_mul(1 << 20), args.alpha, args.align)?
    } else {
        args.bucket_mib << 20
    };
    let mut window = hotweights::plan::any_time_window();
    if let Some((begin, end)) = args.swap_waves {
        window.wave_begin = begin;
        window.wave_end = end;
    }
    let options = PlanOptions {
        bucket_bytes,
        align: args.align,
        force: args.force,
        plan_id: args.plan_id,
        source: args.source.clone(),
        groups,
        world_size: args.world_size,
        window,
    };
    let started = Instant::now();
    let planned = hotweights::plan::create(&prev, next, &options).with_context(|| {
        format!(
            "--prev {} and --next {}",
            args.prev.display(),
            args.next.display()
        )
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let wire = match (&args.prev_source, &args.source) {
        (Some(prev_dir), Some(next_dir)) => Some(hotweights::plan::wire_report(
            &planned.plan,
            &prev,
            &DirSource::new(prev_dir),
            &DirSource::new(next_dir),
        )?),
        _ => None,
    };
    let Some(path) = args.output else {
        out.line(planned.plan.to_json().trim_end())?;
        return Ok(Outcome::Ok);
    };
    planned.plan.write(&path, format)?;
    summarise_plan(&planned, wire.as_ref(), &path, seconds, out)?;
    Ok(Outcome::Ok)
}

fn summarise_plan(
    p: &Planned,
    wire: Option<&WireReport>,
    path: &Path,
    seconds: f64,
    out: &Output,
) -> std::io::Result<()> {
    let d = &p.delta;
    let r = &p.report;
    if out.json {
        return out.json_line(&json!({
            "plan": path, "plan_id": p.plan.plan_id, "digest": p.plan.digest,
            "delta": d, "changed_percent": d.changed_percent(),
            "buckets": r, "wire": wire, "seconds": seconds,
        }));
    }
    let mut t = table(
        &["entries", "added", "changed", "removed", "unchanged"],
        &[1, 2, 3, 4],
    );
    for (name, c) in [("tensors", &d.tensors), ("other files", &d.files)] {
        let cell = |t: &hotweights::delta::Tally| format!("{} ({})", t.count, bytes(t.bytes));
        t.add_row(vec![
            name.to_owned(),
            cell(&c.added),
            cell(&c.changed),
            cell(&c.removed),
            cell(&c.unchanged),
        ]);
    }
    out.line(t)?;
    let mut t = key_value_table();
    t.add_row(vec![
        "plan".to_owned(),
        format!("{} ({})", path.display(), p.plan.plan_id),
    ]);
    t.add_row(vec![
        "delta".to_owned(),
        format!(
            "{} of {} chunks, {} of {} ({:.2} %)",
            d.chunks_changed,
            d.chunks_total,
            bytes(d.bytes_changed),
            bytes(d.bytes_total),
            d.changed_percent()
        ),
    ]);
    t.add_row(vec![
        "buckets".to_owned(),
        format!(
            "{} of up to {}, largest {}, {} padding, {} split, {}",
            r.buckets,
            bytes(r.bucket_limit),
            bytes(r.largest_bucket),
            bytes(r.padding_bytes),
            plural(r.split_chunks, "chunk"),
            plural(r.consumer_sets, "consumer set")
        ),
    ]);
    t.add_row(vec![
        "transfer ops".to_owned(),
        if r.ops > 0 {
            r.ops.to_string()
        } else {
            "none (no --source)".to_owned()
        },
    ]);
    if let Some(w) = wire {
        t.add_row(vec![
            "wire bytes".to_owned(),
            format!(
                "{} whole, {} with sparse deltas ({:.2} %; {} of {} chunks as deltas)",
                bytes(w.full_bytes),
                bytes(w.delta_bytes),
                w.delta_percent(),
                w.delta_chunks,
                w.delta_chunks + w.full_chunks
            ),
        ]);
    }
    if !d.removed_tensors.is_empty() {
        let shown: Vec<&str> = d
            .removed_tensors
            .iter()
            .take(5)
            .map(String::as_str)
            .collect();
        let more = d.removed_tensors.len() - shown.len();
        t.add_row(vec![
            "removed tensors".to_owned(),
            format!(
                "{}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        ]);
    }
    t.add_row(vec!["digest".to_owned(), p.plan.digest.clone()]);
    t.add_row(vec![
        "planned in".to_owned(),
        format!("{:.1} ms", seconds * 1e3),
    ]);
    out.line(t)
}

fn verify_plan(args: VerifyArgs, out: &Output) -> Result<Outcome> {
    let doc = Document::read(&args.plan, Some(ContractKind::SwapPlan))?;
    let plan = SwapPlan::from_document(doc).context("not a swap plan")?;
    let prev: Option<WeightManifest> = args.manifest_prev.as_deref().map(read_valid).transpose()?;
    let next: Option<WeightManifest> = args.manifest_next.as_deref().map(read_valid).transpose()?;
    let groups = args.tp_groups.as_deref().map(TpGroups::load).transpose()?;
    let options = hotweights::VerifyOptions {
        prev: prev.as_ref(),
        next: next.as_ref(),
        world_size: args.world_size,
        groups: groups.as_ref(),
        require_consumers: args.require_consumers,
        align: Some(args.align).filter(|&a| a > 0),
        bucket_limit: args.bucket_mib.map(|m| m.saturating_mul(1 << 20)),
    };
    let problems = hotweights::verify(&plan, &options);
    let items: usize = plan.buckets.iter().map(|b| b.items.len()).sum();
    if out.json {
        out.json_line(&json!({
            "plan": args.plan, "ok": problems.is_empty(), "problems": problems,
            "buckets": plan.buckets.len(), "items": items, "ops": plan.ops.len(),
        }))?;
    } else if problems.is_empty() {
        out.line(format!(
            "{}: ok ({}, {}, {}; digest {})",
            args.plan.display(),
            plural(plan.buckets.len() as u64, "bucket"),
            plural(items as u64, "item"),
            plural(plan.ops.len() as u64, "op"),
            plan.digest
        ))?;
    } else {
        for p in &problems {
            out.line(format!("{}: {p}", args.plan.display()))?;
        }
        out.line(format!(
            "{}: {}",
            args.plan.display(),
            plural(problems.len() as u64, "problem")
        ))?;
    }
    Ok(if problems.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Problems
    })
}

fn apply(args: ApplyArgs, out: &Output, quiet: bool) -> Result<Outcome> {
    let started = Instant::now();
    let mut store = Store::open_or_create(&args.store)?;
    let report = match (&args.plan, &args.manifest) {
        (Some(path), _) => {
            let doc = Document::read(path, Some(ContractKind::SwapPlan))?;
            let plan = SwapPlan::from_document(doc).context("not a swap plan")?;
            let bar = progress_bar(plan.staged_bytes(), "applying", quiet);
            let source = match &args.source {
                Some(dir) => ApplySource::Dir(dir),
                None => ApplySource::PlanOps,
            };
            let report = store.apply(&plan, source, &|n| bar.inc(n))?;
            bar.finish_and_clear();
            report
        }
        (None, Some(path)) => {
            let manifest: WeightManifest = read_valid(path)?;
            let total = manifest.total_bytes();
            let bar = progress_bar(total, "importing", quiet);
            let dir = args
                .source
                .as_deref()
                .context("--manifest needs --source DIR")?;
            let report = store.import(&manifest, &DirSource::new(dir), &|n| bar.inc(n))?;
            bar.finish_and_clear();
            report
        }
        (None, None) => bail!("give --plan PLAN, or --manifest M --source DIR"),
    };
    summarise_apply(&report, &args.store, started.elapsed().as_secs_f64(), out)?;
    Ok(Outcome::Ok)
}

fn summarise_apply(
    r: &ApplyReport,
    store: &Path,
    seconds: f64,
    out: &Output,
) -> std::io::Result<()> {
    if out.json {
        return out.json_line(&json!({ "store": store, "report": r, "seconds": seconds }));
    }
    if r.already_present {
        return out.line(format!(
            "{}: version {:?} is already in the store",
            store.display(),
            r.version
        ));
    }
    out.line(format!(
        "{}: version {:?} available ({} written, {}; {} shared with other versions) in {seconds:.2} s; `bstack hw commit --store {}` makes it current",
        store.display(),
        r.version,
        plural(r.chunks_written, "chunk"),
        bytes(r.bytes_written),
        plural(r.chunks_shared, "chunk"),
        store.display()
    ))
}

fn commit(args: CommitArgs, out: &Output) -> Result<Outcome> {
    let mut store = Store::open_or_create(&args.store)?;
    let version = match args.version.or_else(|| store.state().last_applied.clone()) {
        Some(v) => v,
        None => bail!(
            "{}: nothing applied yet; give --version V",
            args.store.display()
        ),
    };
    let previous = store.state().current.clone();
    let started = Instant::now();
    store.commit(&version)?;
    let micros = started.elapsed().as_secs_f64() * 1e6;
    if out.json {
        out.json_line(&json!({ "store": args.store, "current": version, "previous": previous, "flip_us": micros }))?;
    } else if previous.as_deref() == Some(version.as_str()) {
        out.line(format!(
            "{}: {version:?} is already current",
            args.store.display()
        ))?;
    } else {
        out.line(format!(
            "{}: current is now {version:?} (was {}); flipped in {micros:.0} µs",
            args.store.display(),
            previous
                .as_deref()
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "none".into())
        ))?;
    }
    Ok(Outcome::Ok)
}

fn rollback(args: StoreArg, out: &Output) -> Result<Outcome> {
    let mut store = Store::open_or_create(&args.store)?;
    let from = store.state().current.clone();
    let now = store.rollback()?;
    if out.json {
        out.json_line(&json!({ "store": args.store, "current": now, "rolled_back_from": from }))?;
    } else {
        out.line(format!(
            "{}: rolled back to {now:?} (from {})",
            args.store.display(),
            from.as_deref()
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "none".into())
        ))?;
    }
    Ok(Outcome::Ok)
}

fn status(args: StoreArg, out: &Output) -> Result<Outcome> {
    let store = Store::open(&args.store)?;
    let s = store.status()?;
    if out.json {
        out.json_line(&json!({ "store": args.store, "status": s }))?;
        return Ok(Outcome::Ok);
    }
    let mut t = table(
        &["version", "role", "model", "tensors", "chunks", "size"],
        &[3, 4, 5],
    );
    for v in &s.versions {
        t.add_row(vec![
            v.version.clone(),
            v.role.to_owned(),
            v.model_id.clone(),
            v.tensors.to_string(),
            v.chunks.to_string(),
            bytes(v.bytes),
        ]);
    }
    out.line(t)?;
    out.line(format!(
        "current: {}; rollback history: {}; {} stored ({})",
        s.current.as_deref().unwrap_or("none"),
        if s.history.is_empty() {
            "empty".to_owned()
        } else {
            s.history.join(", ")
        },
        plural(s.chunks, "chunk"),
        bytes(s.chunk_bytes)
    ))?;
    if s.unreferenced_chunks > 0 {
        out.line(format!(
            "{} no version references ({}): `bstack hw gc --store {}` frees them",
            plural(s.unreferenced_chunks, "chunk"),
            bytes(s.unreferenced_bytes),
            args.store.display()
        ))?;
    }
    for line in &s.interrupted {
        out.line(format!("interrupted: {line}"))?;
    }
    Ok(Outcome::Ok)
}

fn gc(args: GcArgs, out: &Output) -> Result<Outcome> {
    let mut store = Store::open_or_create(&args.store)?;
    let r = store.gc(args.keep, args.prune_uncommitted)?;
    if out.json {
        out.json_line(&json!({ "store": args.store, "gc": r }))?;
    } else {
        out.line(format!(
            "{}: removed {} ({}), {} and {}; kept {}",
            args.store.display(),
            plural(r.chunks_removed, "chunk"),
            bytes(r.bytes_freed),
            plural(r.versions_removed.len() as u64, "version"),
            plural(r.leftovers_removed, "leftover file"),
            plural(r.chunks_kept, "chunk")
        ))?;
    }
    Ok(Outcome::Ok)
}

fn export(args: ExportArgs, out: &Output, quiet: bool) -> Result<Outcome> {
    let store = Store::open(&args.store)?;
    let version = match args.version.or_else(|| store.state().current.clone()) {
        Some(v) => v,
        None => bail!(
            "{}: no version is current; give --version V",
            args.store.display()
        ),
    };
    let started = Instant::now();
    let manifest = store.manifest(&version)?;
    let total = manifest.total_bytes();
    let bar = progress_bar(total, "exporting", quiet);
    let r = store.export(&version, &args.output, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if out.json {
        out.json_line(&json!({ "store": args.store, "version": version, "output": args.output, "report": r, "seconds": seconds }))?;
    } else {
        out.line(format!(
            "{}: wrote version {version:?} ({}, {}) in {seconds:.2} s",
            args.output.display(),
            plural(r.files, "file"),
            bytes(r.bytes)
        ))?;
    }
    Ok(Outcome::Ok)
}
