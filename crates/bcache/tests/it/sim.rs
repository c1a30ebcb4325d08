//! The simulator: Belady's bound, byte conservation, determinism, traces.

use std::path::Path;

use bcache::config::{Config, Routing};
use bcache::sim::{self, PolicyKind, PolicyResult};
use bcache::trace::{Trace, TraceRequest};
use proptest::prelude::*;

const ALL: [PolicyKind; 4] = [
    PolicyKind::Lru,
    PolicyKind::Fifo,
    PolicyKind::Belady,
    PolicyKind::Bcache,
];

/// A small model: one block is 1 MiB (so capacities are in MiB-sized blocks).
fn small_config(gpu_blocks: u64, cpu_blocks: u64, ssd_blocks: u64) -> Config {
    let mut c = Config::default();
    c.sim.layers = 4;
    c.sim.kv_heads = 1;
    c.sim.head_dim = 128;
    c.sim.dtype_bytes = 2;
    c.sim.block_tokens = 512; // 2*4*1*128*2*512 = 1 MiB
    assert_eq!(c.sim.block_bytes(), 1 << 20);
    let gib = |blocks: u64| blocks as f64 / 1024.0;
    c.sim.gpu_gib = gib(gpu_blocks);
    c.sim.cpu_gib = gib(cpu_blocks);
    c.sim.ssd_gib = gib(ssd_blocks);
    c.sim.nodes = 1;
    c.sim.prefill_us_per_token = 10.0;
    c
}

/// A random trace with chained prefixes: each request extends a random
/// earlier request's prefix (or starts a new one) with fresh blocks.
fn chained_trace(shape: &[(u16, u8, u8)]) -> Trace {
    let mut next_block = 0u64;
    let mut requests: Vec<TraceRequest> = Vec::new();
    for (i, &(parent, keep, fresh)) in shape.iter().enumerate() {
        let mut blocks = Vec::new();
        if !requests.is_empty() && parent % 4 != 0 {
            let p = &requests[parent as usize % requests.len()].blocks;
            blocks.extend_from_slice(&p[..(keep as usize).min(p.len())]);
        }
        for _ in 0..=fresh % 6 {
            blocks.push(next_block);
            next_block += 1;
        }
        requests.push(TraceRequest {
            arrival_ns: i as u64 * 3_000_000,
            input_tokens: blocks.len() as u64 * 512,
            output_tokens: 1,
            blocks,
        });
    }
    Trace {
        requests,
        skipped: 0,
    }
}

fn results(trace: &Trace, config: &Config) -> Vec<PolicyResult> {
    sim::run(trace, config, &ALL, &[1.0]).unwrap()
}

fn get(rs: &[PolicyResult], p: PolicyKind) -> &PolicyResult {
    rs.iter().find(|r| r.policy == p).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// With a GPU tier only, Belady's eviction is optimal: no policy finds
    /// more blocks in the cache. (Optimality needs every request to fit in
    /// the cache: a prompt longer than the cache evicts its own blocks while
    /// it is inserted, which no eviction order can undo.)
    #[test]
    fn belady_hits_at_least_as_often_as_any_policy(
        shape in prop::collection::vec((any::<u16>(), 0u8..12, any::<u8>()), 5..120),
        extra in 0u64..40,
    ) {
        let trace = chained_trace(&shape);
        let longest = trace.requests.iter().map(|r| r.blocks.len() as u64).max().unwrap_or(1);
        let gpu = longest + extra;
        let rs = results(&trace, &small_config(gpu, 0, 0));
        let belady = get(&rs, PolicyKind::Belady).gpu_hits;
        for r in &rs {
            prop_assert!(belady >= r.gpu_hits, "{:?} {} > belady {}", r.policy, r.gpu_hits, belady);
        }
    }

    /// Every block is a hit in one tier or recomputed; the bytes on each
    /// link are exactly what the hits imply.
    #[test]
    fn bytes_are_conserved(
        shape in prop::collection::vec((any::<u16>(), 0u8..12, any::<u8>()), 5..120),
        gpu in 2u64..20, cpu in 0u64..30, ssd in 0u64..60,
    ) {
        let trace = chained_trace(&shape);
        let config = small_config(gpu, cpu, ssd);
        let bb = config.sim.block_bytes();
        let refs: u64 = trace.requests.iter().map(|r| r.blocks.len() as u64).sum();
        for r in results(&trace, &config) {
            prop_assert_eq!(r.blocks, refs);
            prop_assert_eq!(r.gpu_hits + r.cpu_hits + r.ssd_hits + r.recomputed, refs);
            prop_assert_eq!(r.requests, trace.requests.len() as u64);
            if r.policy == PolicyKind::Bcache {
                // Prefetches may read merged gaps and blocks whose prefix
                // broke before their request ran: never less than the hits.
                prop_assert!(r.h2d_bytes >= (r.cpu_hits + r.ssd_hits) * bb);
                prop_assert!(r.ssd_read_bytes >= r.ssd_hits * bb);
                prop_assert!(r.timely_bytes <= r.prefetched_bytes);
            } else {
                prop_assert_eq!(r.h2d_bytes, (r.cpu_hits + r.ssd_hits) * bb);
                prop_assert_eq!(r.ssd_read_bytes, r.ssd_hits * bb);
                prop_assert_eq!(r.prefetched_bytes, 0);
            }
            if cpu == 0 && ssd == 0 {
                prop_assert_eq!(r.cpu_hits + r.ssd_hits, 0);
            }
            prop_assert!(r.ttft_p50_ms <= r.ttft_p90_ms && r.ttft_p90_ms <= r.ttft_p99_ms);
        }
    }
}

#[test]
fn belady_bounds_lru_and_fifo_gpu_hits_with_lower_tiers_too() {
    for seed in 0..20u16 {
        let shape: Vec<(u16, u8, u8)> = (0..200u16)
            .map(|i| {
                (
                    i.wrapping_mul(7919).wrapping_add(seed * 31),
                    (i % 11) as u8,
                    (i * 13 % 7) as u8,
                )
            })
            .collect();
        let trace = chained_trace(&shape);
        let rs = results(&trace, &small_config(12, 24, 48));
        let belady = get(&rs, PolicyKind::Belady);
        for p in [PolicyKind::Lru, PolicyKind::Fifo] {
            assert!(belady.gpu_hits >= get(&rs, p).gpu_hits, "seed {seed} {p:?}");
        }
    }
}

#[test]
fn a_run_is_deterministic() {
    let shape: Vec<(u16, u8, u8)> = (0..300u16)
        .map(|i| (i * 17, (i % 9) as u8, (i % 5) as u8))
        .collect();
    let trace = chained_trace(&shape);
    let mut config = small_config(10, 40, 100);
    config.sim.nodes = 3;
    let strip = |mut rs: Vec<PolicyResult>| {
        for r in &mut rs {
            r.plan_p50_us = None;
            r.plan_p99_us = None;
        }
        rs
    };
    let a = strip(results(&trace, &config));
    let b = strip(results(&trace, &config));
    assert_eq!(a, b);
}

#[test]
fn bcache_prefetches_queued_requests_and_stalls_less_than_lru() {
    // Requests arrive faster than they are served, each re-reading blocks
    // that an earlier request pushed out to CPU memory.
    let mut requests = Vec::new();
    for i in 0..200u64 {
        let base = (i % 20) * 100;
        requests.push(TraceRequest {
            arrival_ns: i * 5_000_000,
            input_tokens: 8 * 512,
            output_tokens: 1,
            blocks: (base..base + 8).collect(),
        });
    }
    let trace = Trace {
        requests,
        skipped: 0,
    };
    let mut config = small_config(16, 400, 0);
    config.sim.h2d_gbps = 0.5;
    let rs = results(&trace, &config);
    let lru = get(&rs, PolicyKind::Lru);
    let bcache = get(&rs, PolicyKind::Bcache);
    assert!(bcache.prefetched_bytes > 0);
    assert!(bcache.timely_bytes > 0);
    assert!(bcache.prefetch_timeliness.unwrap() > 0.0);
    assert!(bcache.windows > 0 && bcache.plan_p50_us.is_some());
    assert!(
        bcache.stall_s < lru.stall_s,
        "prefetch hides copies behind the queue: {} vs {}",
        bcache.stall_s,
        lru.stall_s
    );
}

#[test]
fn routing_keeps_shared_prefixes_together() {
    let trace = chained_trace(&(0..100u16).map(|i| (i, 3, 2)).collect::<Vec<_>>());
    let mut config = small_config(4, 4, 4);
    config.sim.nodes = 4;
    config.sim.routing = Routing::PrefixAffinity;
    config.sim.affinity_blocks = 2;
    let nodes = sim::route(&trace, &config);
    for (i, a) in trace.requests.iter().enumerate() {
        for (j, b) in trace.requests.iter().enumerate() {
            if a.blocks.len() >= 2 && b.blocks.len() >= 2 && a.blocks[..2] == b.blocks[..2] {
                assert_eq!(nodes[i], nodes[j]);
            }
        }
    }
    config.sim.routing = Routing::RoundRobin;
    assert_eq!(&sim::route(&trace, &config)[..5], &[0, 1, 2, 3, 0]);
}

#[test]
fn trace_lines_are_checked_with_their_line_number() {
    let good = r#"{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}"#;
    let text = format!(
        "{good}\n\n{{\"timestamp\": 5, \"input_length\": 0, \"hash_ids\": [1]}}\n{good}\nnot json\n"
    );
    let err = Trace::parse(&text, "t.jsonl", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("t.jsonl:3:") && err.contains("input_length"),
        "{err}"
    );
    assert!(err.contains("--skip-bad"), "{err}");
    let trace = Trace::parse(&text, "t.jsonl", true).unwrap();
    assert_eq!(trace.requests.len(), 2);
    assert_eq!(trace.skipped, 2);
    let err = Trace::parse(
        "{\"timestamp\": -1, \"input_length\": 5, \"hash_ids\": [1]}",
        "t",
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("t:1:"), "{err}");
    let err = Trace::parse(
        "{\"timestamp\": 1, \"input_length\": 5, \"hash_ids\": []}",
        "t",
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hash_ids"), "{err}");
}

#[test]
fn window_inputs_replay_as_a_trace() {
    let line = r#"{"now_ns": 7, "nodes": [{"name": "n", "tiers": [
        {"tier": "gpu", "capacity_bytes": 10, "free_bytes": 10, "bandwidth_bytes_per_s": 1},
        {"tier": "cpu", "capacity_bytes": 10, "free_bytes": 10, "bandwidth_bytes_per_s": 1}]}],
        "requests": [{"id": "a", "node": "n", "pages": [4, 5], "src": "cpu", "dst": "gpu", "deadline_ns": 9, "page_bytes": 1}]}"#
        .replace('\n', " ");
    let trace = Trace::parse(&format!("{line}\n{line}\n"), "w.jsonl", false).unwrap();
    assert_eq!(trace.requests.len(), 2);
    assert_eq!(trace.requests[0].blocks, vec![4, 5]);
    assert_eq!(trace.requests[0].arrival_ns, 7);
    let rs = results(&trace, &small_config(4, 4, 0));
    assert_eq!(
        get(&rs, PolicyKind::Lru).gpu_hits,
        2,
        "the second request hits"
    );
}

#[test]
fn the_shared_trace_replays_under_every_policy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/traces/conversation_trace.jsonl");
    if !path.exists() {
        eprintln!("skipped: {} is absent", path.display());
        return;
    }
    let mut trace = Trace::read(&path, false).unwrap();
    assert_eq!(trace.requests.len(), 12_031);
    let (distinct, refs) = trace.block_stats();
    assert_eq!(distinct, 182_790);
    assert_eq!(
        refs - distinct,
        105_710,
        "repeat references, as the data README says"
    );
    trace.truncate_to(300.0);
    let config = Config::default();
    let rs = results(&trace, &config);
    let belady = get(&rs, PolicyKind::Belady);
    for r in &rs {
        assert!(
            r.hit_rate <= belady.hit_rate + 1e-9
                || r.policy == PolicyKind::Bcache
                || r.hit_rate <= 1.0
        );
        assert!(r.ttft_p50_ms > 0.0);
    }
    // Compulsory misses bound every policy: a block's first use is a miss.
    let (distinct, refs) = trace.block_stats();
    let bound = 1.0 - distinct as f64 / refs as f64;
    for r in &rs {
        assert!(
            r.hit_rate <= bound + 1e-9,
            "{:?} {} > {}",
            r.policy,
            r.hit_rate,
            bound
        );
    }
}
