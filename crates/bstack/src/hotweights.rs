//! `bstack hotweights` (alias `hw`): weight rollouts.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use bstack_plan::{Contract, Format, HashAlgorithm, WeightManifest};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::Outcome;
use crate::output::{Output, bytes, key_value_table};
use crate::plan::FormatArg;

#[derive(Subcommand, Debug)]
pub enum HotweightsCommand {
    /// Hash a checkpoint directory (safetensors, single or sharded with
    /// model.safetensors.index.json, plus config and tokenizer files) into a
    /// manifest of tensors and fixed-size chunks. The same directory always
    /// gives the same manifest.
    Publish(PublishArgs),
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
    path: &std::path::Path,
    total: u64,
    seconds: f64,
    out: &Output,
) -> std::io::Result<()> {
    let tensor_bytes: u64 = m.tensors.iter().map(|t| t.length).sum();
    let chunks: usize = m.tensors.iter().map(|t| t.chunks.len()).sum::<usize>()
        + m.files.iter().map(|f| f.chunks.len()).sum::<usize>();
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
