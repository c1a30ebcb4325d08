//! The CachePlan executor on real bytes: copies between tiers in priority
//! order on several streams, lateness, failures with reasons, admission and
//! eviction, and hits in the planner's shape.

use std::sync::Arc;

use bstack_plan::{CachePlan, KvPageRef, PlanWindow, TransferKind, TransferOp};
use stratacache::{
    Access, ExecOptions, FlushPolicy, KeySpace, Link, LinkMode, MemoryTier, Meta, OpStatus,
    StorageEngine, TierChain, execute,
};

const PAGE: u64 = 4096;

fn engine() -> StorageEngine {
    engine_with_cpu(64 << 20, 4)
}

/// An engine whose `cpu` tier holds `capacity` bytes in `shards` shards.
fn engine_with_cpu(capacity: u64, shards: usize) -> StorageEngine {
    let cpu = Arc::new(MemoryTier::new(capacity, shards));
    let ssd = Arc::new(MemoryTier::new(64 << 20, 4));
    let chain = TierChain::new(
        vec![
            Link {
                tier: cpu,
                mode: LinkMode::WriteThrough,
                promote: false,
            },
            Link {
                tier: ssd,
                mode: LinkMode::WriteThrough,
                promote: false,
            },
        ],
        FlushPolicy::default(),
    )
    .unwrap();
    StorageEngine::new(chain, vec!["cpu".into(), "ssd".into()]).unwrap()
}

fn page_bytes(layer: u32, page: u64) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u32 ^ layer.wrapping_mul(17) ^ (page as u32).wrapping_mul(101)) as u8)
        .collect()
}

/// Stores pages `pages` of `layer` in tier `tier`.
fn seed(
    engine: &StorageEngine,
    keys: &KeySpace,
    tier: &str,
    layer: u32,
    pages: std::ops::Range<u64>,
) {
    let t = engine.tier_index(tier).unwrap();
    for p in pages {
        engine
            .store(
                &keys.page_key("kv", layer, p),
                Meta::default(),
                &page_bytes(layer, p),
                Access::Exact(t),
            )
            .unwrap();
    }
}

fn op(layer: u32, first: u64, count: u64, priority: i32, deadline_ns: u64) -> TransferOp {
    TransferOp {
        kind: TransferKind::Storage2h as i32,
        src: "tier://node0/ssd".into(),
        dst: "tier://node0/cpu".into(),
        length: count * PAGE,
        // Distinct byte ranges per page, as a planner lays them out.
        src_offset: (u64::from(layer) * 1_000_000 + first) * PAGE,
        dst_offset: (u64::from(layer) * 1_000_000 + first) * PAGE,
        kv_refs: vec![KvPageRef {
            tensor: "kv".into(),
            page: first,
            layer,
            count,
            ..KvPageRef::default()
        }],
        priority,
        deadline_ns,
        ..TransferOp::default()
    }
}

fn plan(ops: Vec<TransferOp>) -> CachePlan {
    CachePlan {
        schema_version: bstack_plan::SCHEMA_VERSION,
        plan_id: "test".into(),
        ops,
        window: Some(PlanWindow {
            index: 0,
            start_ns: 1_000,
            end_ns: 1_000 + 60_000_000_000,
        }),
        ..CachePlan::default()
    }
}

#[test]
fn a_plan_moves_every_page_with_its_bytes_and_reports_hits() {
    let engine = engine();
    let options = ExecOptions::default();
    seed(&engine, &options.keys, "ssd", 0, 0..32);
    seed(&engine, &options.keys, "ssd", 1, 0..32);
    let ops: Vec<_> = (0..8)
        .map(|i| op(i % 2, (i / 2) as u64 * 8, 8, 0, 1_000 + 60_000_000_000))
        .collect();
    let report = execute(&engine, &plan(ops), &options).unwrap();
    assert_eq!(report.failed_ops, 0, "{:?}", report.ops);
    assert_eq!(report.planned_bytes, 64 * PAGE);
    assert_eq!(report.done_bytes, 64 * PAGE);
    assert!(report.bandwidth_bps > 0.0);
    assert_eq!(report.hits.len(), 64);
    assert!(report.hits.iter().all(|h| h.hits == 1.0));
    let cpu = engine.tier_index("cpu").unwrap();
    for layer in 0..2 {
        for p in 0..32 {
            let got = engine
                .load(&options.keys.page_key("kv", layer, p), Access::Exact(cpu))
                .unwrap();
            assert_eq!(&*got.object.bytes, page_bytes(layer, p).as_slice());
        }
    }
}

#[test]
fn higher_priority_runs_first_on_one_stream() {
    let engine = engine();
    let options = ExecOptions {
        streams: 1,
        ..ExecOptions::default()
    };
    seed(&engine, &options.keys, "ssd", 0, 0..4);
    let ops = vec![
        op(0, 0, 1, 1, 0),
        op(0, 1, 1, 9, 0),
        op(0, 2, 1, 5, 0),
        op(0, 3, 1, 5, 7_000),
    ];
    let report = execute(&engine, &plan(ops), &options).unwrap();
    let mut by_start = report.ops.clone();
    by_start.sort_by_key(|o| o.started_ns);
    let order: Vec<usize> = by_start.iter().map(|o| o.index).collect();
    // Priority 9, then the two 5s (the one with a deadline first), then 1.
    assert_eq!(order, vec![1, 3, 2, 0]);
}

#[test]
fn failures_and_lateness_are_reported_per_operation() {
    let engine = engine();
    let options = ExecOptions {
        streams: 2,
        ..ExecOptions::default()
    };
    seed(&engine, &options.keys, "ssd", 0, 0..4);
    seed(&engine, &options.keys, "ssd", 1, 0..4);
    let mut to_gpu = op(0, 0, 1, 0, 0);
    to_gpu.dst = "tier://node0/gpu".into();
    let mut to_file = op(0, 0, 1, 0, 0);
    to_file.dst = "file:///tmp/x".into();
    seed(&engine, &options.keys, "ssd", 2, 0..1);
    let ops = vec![
        op(0, 0, 4, 0, 1_001), // due 1 ns after the start: late
        op(1, 2, 4, 0, 0),     // pages 4 and 5 were never stored
        to_gpu,
        to_file,
        op(2, 0, 1, 0, 400), // due 600 ns before the window began
    ];
    let report = execute(&engine, &plan(ops), &options).unwrap();
    assert!(
        matches!(report.ops[0].status, OpStatus::Late { by_ns } if by_ns > 0),
        "{:?}",
        report.ops[0]
    );
    assert!(
        matches!(report.ops[4].status, OpStatus::Late { by_ns } if by_ns >= 600),
        "lateness counts from the deadline, not the window: {:?}",
        report.ops[4]
    );
    assert_eq!(report.late_ops, 2);
    let reason = |i: usize| match &report.ops[i].status {
        OpStatus::Failed { reason } => reason.clone(),
        other => panic!("op {i} should fail, got {other:?}"),
    };
    assert!(
        reason(1).contains("2 of 4 pages not in tier://node0/ssd (pages 4, 5)"),
        "{}",
        reason(1)
    );
    assert!(
        reason(2).contains("no store tier for plan tier \"gpu\""),
        "{}",
        reason(2)
    );
    assert!(reason(3).contains("not one of its tiers"), "{}", reason(3));
    assert_eq!(report.failed_ops, 3);
    // The two pages of op 1 that were there moved, and count.
    assert_eq!(report.ops[1].bytes, 2 * PAGE);
    assert_eq!(report.done_bytes, 7 * PAGE);
    assert_eq!(report.failed_bytes, 2 * PAGE + 2 * PAGE);
    assert!(report.hits.iter().any(|h| (h.layer, h.page) == (1, 3)));
    assert!(!report.hits.iter().any(|h| (h.layer, h.page) == (1, 4)));
}

#[test]
fn tier_maps_admission_and_eviction() {
    let engine = engine();
    let mut options = ExecOptions::default();
    options.tier_map.insert("gpu".into(), "cpu".into());
    options.node = "node0".into();
    seed(&engine, &options.keys, "ssd", 3, 0..4);
    let mut to_gpu = op(3, 0, 2, 0, 0);
    to_gpu.dst = "tier://node0/gpu".into();
    let mut other_node = op(3, 0, 2, 0, 0);
    other_node.src = "tier://node1/ssd".into();
    let mut p = plan(vec![to_gpu, other_node]);
    p.admit = vec![KvPageRef {
        tensor: "kv".into(),
        page: 2,
        count: 2,
        layer: 3,
        location: "tier://node0/cpu".into(),
        ..KvPageRef::default()
    }];
    p.evict = vec![KvPageRef {
        tensor: "kv".into(),
        page: 0,
        count: 4,
        layer: 3,
        location: "tier://node0/ssd".into(),
        ..KvPageRef::default()
    }];
    let report = execute(&engine, &p, &options).unwrap();
    assert_eq!(report.ops[0].status, OpStatus::Done);
    assert!(
        matches!(&report.ops[1].status, OpStatus::Failed { reason } if reason.contains("node node1"))
    );
    assert_eq!(report.admitted_pages, 2);
    assert_eq!(report.evicted_pages, 4);
    assert!(
        report.page_failures.is_empty(),
        "{:?}",
        report.page_failures
    );
    let (cpu, ssd) = (
        engine.tier_index("cpu").unwrap(),
        engine.tier_index("ssd").unwrap(),
    );
    for page in 0..4 {
        let key = options.keys.page_key("kv", 3, page);
        assert!(
            engine.contains(&key, Access::Exact(cpu)).unwrap(),
            "page {page} in cpu"
        );
        assert!(
            !engine.contains(&key, Access::Exact(ssd)).unwrap(),
            "page {page} evicted"
        );
    }
}

#[test]
fn an_invalid_plan_is_refused_whole() {
    let engine = engine();
    let mut bad = op(0, 0, 1, 0, 0);
    bad.length = 0;
    let err = execute(&engine, &plan(vec![bad]), &ExecOptions::default()).unwrap_err();
    assert!(err.to_string().contains("ops[0].length"), "{err}");
}

/// A full tier: the plan evicts two of its pages to make room for two it
/// copies in. The evictions run first, so the tier never overflows and
/// drops pages of its own choosing (here its least recently used, which
/// the plan wants kept).
#[test]
fn evictions_make_room_before_the_copies() {
    let engine = engine_with_cpu(4 * PAGE, 1);
    let options = ExecOptions {
        node: "node0".into(),
        ..ExecOptions::default()
    };
    // cpu holds pages 0..4 of layer 1 (0 the least recently used); ssd
    // holds pages 4..6, which the plan copies up.
    seed(&engine, &options.keys, "cpu", 1, 0..4);
    seed(&engine, &options.keys, "ssd", 1, 4..6);
    let mut p = plan(vec![op(1, 4, 2, 0, 0)]);
    p.evict = vec![KvPageRef {
        tensor: "kv".into(),
        page: 2,
        count: 2,
        layer: 1,
        location: "tier://node0/cpu".into(),
        ..KvPageRef::default()
    }];
    let report = execute(&engine, &p, &options).unwrap();
    assert_eq!(report.ops[0].status, OpStatus::Done, "{report:?}");
    assert_eq!(report.evicted_pages, 2, "{report:?}");
    let cpu = engine.tier_index("cpu").unwrap();
    let held = |page| {
        engine
            .contains(&options.keys.page_key("kv", 1, page), Access::Exact(cpu))
            .unwrap()
    };
    for page in [0, 1, 4, 5] {
        assert!(held(page), "page {page} should be in cpu");
    }
    for page in [2, 3] {
        assert!(!held(page), "page {page} was evicted");
    }
}
