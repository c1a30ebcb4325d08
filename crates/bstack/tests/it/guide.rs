//! `docs/guide.md` cannot rot: every `sh` block of it runs here, each
//! `##` section as one `bash -euo pipefail` script in a fresh temporary
//! directory, with the built `bstack` first on `PATH` and the guide's input
//! variables (`REPO`, `TRACE`, `BWRT_LIB_DIR`) set to this checkout.
//! One test per section, so they run in parallel and a failure names its
//! section; a section without a test fails `every_section_has_a_test`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::output_within;

/// The workspace root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The guide's sections: heading and the shell blocks under it, in order.
fn sections() -> Vec<(String, Vec<String>)> {
    let path = repo().join("docs/guide.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        if let Some(b) = block.as_mut() {
            if line.trim_start() == "```" {
                let done = block.take().unwrap_or_default();
                match out.last_mut() {
                    Some((_, blocks)) => blocks.push(done),
                    None => panic!("docs/guide.md: a sh block before the first ## section"),
                }
            } else {
                b.push_str(line);
                b.push('\n');
            }
        } else if let Some(h) = line.strip_prefix("## ") {
            out.push((h.trim().to_owned(), Vec::new()));
        } else if line.trim() == "```sh" {
            block = Some(String::new());
        }
    }
    assert!(block.is_none(), "docs/guide.md: an unclosed sh block");
    out
}

/// The directory holding `libbwrt.a` and `libbwrt.so`: cargo builds them
/// beside this test's dependencies.
fn bwrt_lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    exe.ancestors()
        .skip(1)
        .take(3)
        .find(|d| d.join("libbwrt.a").is_file() && d.join("libbwrt.so").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("libbwrt.a / libbwrt.so not found near {}", exe.display()))
}

/// Runs the section headed `heading` and returns its stdout.
#[track_caller]
fn run_section(heading: &str) -> String {
    let all = sections();
    let Some((_, blocks)) = all.iter().find(|(h, _)| h == heading) else {
        panic!("docs/guide.md has no section {heading:?}");
    };
    assert!(!blocks.is_empty(), "section {heading:?} has no sh block");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bin = Path::new(env!("CARGO_BIN_EXE_bstack"))
        .parent()
        .unwrap_or_else(|| panic!("the binary has no folder"))
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap_or_else(|e| panic!("{e}"));
    let repo = repo().canonicalize().unwrap_or_else(|e| panic!("{e}"));
    let script = format!("set -euo pipefail\n{}", blocks.join("\n"));
    let output = output_within(
        Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir.path())
            .env("PATH", path)
            .env("REPO", &repo)
            .env(
                "TRACE",
                repo.join("../shared/data/traces/conversation_trace.jsonl"),
            )
            .env("BWRT_LIB_DIR", bwrt_lib_dir())
            .env_remove("BSTACK_LOG")
            .stdin(Stdio::null()),
        Duration::from_secs(600),
        &format!("docs/guide.md section {heading:?}"),
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "docs/guide.md section {heading:?} failed ({}):\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The sections the tests below run.
const TESTED: [&str; 6] = [
    "The whole flow in one command",
    "Roll a fine-tune out to your serving store",
    "Roll a fine-tune out to two servers",
    "Replay your serving trace and compare cache policies",
    "Run a traced pipeline on your Parquet files",
    "Call bwrt from C and from Python",
];

#[test]
fn every_section_has_a_test() {
    for (heading, blocks) in sections() {
        if !blocks.is_empty() {
            assert!(
                TESTED.contains(&heading.as_str()),
                "docs/guide.md section {heading:?} has sh blocks but no test in guide.rs"
            );
        }
    }
}

#[test]
fn whole_flow() {
    let out = run_section(TESTED[0]);
    assert!(
        out.contains("out/datajax/wave_spec.json: valid wave_spec"),
        "{out}"
    );
    assert!(
        out.contains("out/kv/w000/node1.cache_plan.json: valid cache_plan"),
        "{out}"
    );
    // The node's share ran on the reader's own store.
    assert!(out.contains("bcache-window-0@node0"), "{out}");
}

#[test]
fn roll_out_a_fine_tune() {
    let out = run_section(TESTED[1]);
    assert!(out.contains("step-1100"), "{out}");
}

#[test]
fn roll_out_to_two_servers() {
    let out = run_section(TESTED[2]);
    assert!(out.contains("to step-1100: committed"), "{out}");
    // Both stores, read after the rollout, run the new version.
    let current = out
        .lines()
        .filter(|l| l.starts_with("current: step-1100; rollback history: step-1000"))
        .count();
    assert_eq!(current, 2, "{out}");
}

#[test]
fn replay_a_trace() {
    run_section(TESTED[3]);
}

#[test]
fn pipeline_on_parquet() {
    let out = run_section(TESTED[4]);
    assert!(out.contains("prompt_tokens"), "{out}");
}

#[test]
fn bwrt_from_c_and_python() {
    let out = run_section(TESTED[5]);
    assert!(out.contains("C = [6.0, 15.0]"), "{out}");
}
