//! `bstack demo`: the stack on built-in examples, end to end through files.
//!
//! Every stage writes its contracts to the output directory in both forms
//! and the next reads them from there, so the demo exercises exactly what a
//! user's pipeline would: files, not in-memory structs.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bstack_plan::{Document, Format, example};
use clap::Args;
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
        out.json_line(&json!({ "out": args.out, "contracts": stages }))?;
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
