//! WaveSpec export: cohorts, histogram, reuse distances and extents on a
//! trace whose answers are known, and on a slice of the real trace.

use std::io::Write;
use std::path::PathBuf;

use bstack_plan::Validate;
use datajax::wavespec::{ExportOptions, Request, export, read_trace, reuse_histogram};

use crate::common::engine;

fn req(ts: u64, ids: &[u64]) -> Request {
    Request {
        timestamp: ts,
        input_length: ids.len() as u64 * 512,
        output_length: 10,
        hash_ids: ids.to_vec(),
    }
}

#[test]
fn a_small_trace_gives_the_answers_worked_out_by_hand() {
    // Requests 1 and 2 share [0, 1]; request 3 shares [0] only; 4 is alone.
    let trace = vec![
        req(0, &[0, 1, 2]),
        req(1500, &[0, 1, 3]),
        req(2500, &[0, 4]),
        req(5200, &[5, 6]),
    ];
    let options = ExportOptions {
        block_bytes: 1000,
        wave_ms: 1000,
        ..Default::default()
    };
    let (spec, report) = export(&engine(), &trace, &options).unwrap_or_else(|e| panic!("{e}"));
    assert!(spec.problems().is_empty(), "{:?}", spec.problems());
    // Maximal cohorts: [0,1] (2 requests) and [0] (3 requests).
    let mut cohorts: Vec<(u64, u32, u64, u64)> = spec
        .cohorts
        .iter()
        .map(|c| (c.block, c.depth, c.requests, c.bytes))
        .collect();
    cohorts.sort_unstable();
    assert_eq!(cohorts, [(0, 1, 3, 1000), (1, 2, 2, 2000)]);
    let c0 = spec
        .cohorts
        .iter()
        .find(|c| c.block == 0)
        .map(|c| (c.first_ms, c.last_ms));
    assert_eq!(c0, Some((0, 2500)));
    // Depth 1: two requests found block 0 seen before; depth 2: one.
    let hist: Vec<(u32, u64, u64)> = spec
        .prefix_histogram
        .iter()
        .map(|d| (d.depth, d.requests, d.prefixes))
        .collect();
    assert_eq!(hist, [(1, 2, 2), (2, 1, 3), (3, 0, 2)]);
    // References 0 1 2 | 0 1 3 | 0 4 | 5 6: reuses of 0 (distance 2: {1,2}),
    // 1 (distance 2: {2, 0}), 0 (distance 2: {1, 3}).
    assert_eq!(report.references, 10);
    assert_eq!(report.reused_references, 3);
    assert_eq!(spec.cold_references, 7);
    let buckets: Vec<(u64, u64)> = spec
        .reuse_distances
        .iter()
        .map(|b| (b.max_distance, b.count))
        .collect();
    assert_eq!(buckets, [(0, 0), (1, 0), (3, 3)]);
    // Blocks 0..=6 all used: one extent.
    let extents: Vec<(u64, u64)> = spec
        .io_extents
        .iter()
        .map(|e| (e.first_page, e.last_page))
        .collect();
    assert_eq!(extents, [(0, 6)]);
    // Waves of 1 s over 5.2 s: 6 waves, the first empty one is wave 3.
    assert_eq!(spec.num_waves, 6);
    assert_eq!((spec.swap_begin, spec.swap_end), (3, 4));
    assert_eq!(report.swap_window_requests, 0);
}

#[test]
fn reuse_distances_are_lru_stack_distances() {
    // a b c a: a's reuse sees {b, c} = 2; then b: {c, a} = 2; b again: 0.
    let (buckets, cold, median) = reuse_histogram(&[1, 2, 3, 1, 2, 2]);
    assert_eq!(cold, 3);
    assert_eq!(median, 2);
    let b: Vec<(u64, u64)> = buckets.iter().map(|b| (b.max_distance, b.count)).collect();
    assert_eq!(b, [(0, 1), (1, 0), (3, 2)]);
}

#[test]
fn bad_lines_are_named_with_their_line_and_field() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("t.jsonl");
    let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
    writeln!(
        f,
        r#"{{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}}"#
    )
    .unwrap_or_default();
    writeln!(
        f,
        r#"{{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": ["x"]}}"#
    )
    .unwrap_or_default();
    drop(f);
    let e = read_trace(&path, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("t.jsonl line 2") && e.contains("hash_ids"),
        "{e}"
    );
}

#[test]
fn the_shared_trace_exports_a_valid_spec_with_real_locality() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/traces/conversation_trace.jsonl");
    if !path.exists() {
        eprintln!("skipped: {} is absent", path.display());
        return;
    }
    let trace = read_trace(&path, Some(2000)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(trace.len(), 2000);
    let (spec, report) =
        export(&engine(), &trace, &ExportOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(spec.problems().is_empty(), "{:?}", spec.problems());
    assert!(
        report.reused_references > 0 && report.cohorts_found > 10,
        "{report:?}"
    );
    assert!(spec.cohorts.len() <= 64);
    // Block ids are kept, not hashed: far fewer extents than blocks.
    assert!(report.extents * 4 < report.distinct_blocks, "{report:?}");
    let total: u64 = spec.reuse_distances.iter().map(|b| b.count).sum();
    assert_eq!(total, report.reused_references);
}
