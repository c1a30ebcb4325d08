//! The planner's stages, each on inputs built to show it.

use std::collections::{BTreeSet, HashMap};

use bcache::config::PlannerConfig;
use bcache::model::{Node, Request, ResidentPage, Tenant, Tier, TierState, WindowInput};
use bcache::planner::{Planner, Reason, TokenBucket};
use bstack_plan::{CachePlan, Validate};
use proptest::prelude::*;

const PAGE: u64 = 64 * 1024;
const GB: u64 = 1_000_000_000;

fn tier(tier: Tier, capacity: u64, free: u64, bw: u64) -> TierState {
    TierState {
        tier,
        capacity_bytes: capacity,
        free_bytes: free,
        bandwidth_bytes_per_s: bw,
        resident: Vec::new(),
    }
}

fn node(name: &str) -> Node {
    Node {
        name: name.into(),
        tiers: vec![
            tier(Tier::Gpu, 1 << 40, 1 << 40, 100 * GB),
            tier(Tier::Cpu, 1 << 41, 1 << 41, 25 * GB),
            tier(Tier::Ssd, 1 << 42, 1 << 42, 6 * GB),
        ],
    }
}

fn request(id: &str, pages: Vec<u64>, deadline_ms: u64) -> Request {
    Request {
        id: id.into(),
        node: "node0".into(),
        tenant: "default".into(),
        pages,
        layers: [0, 1],
        src: Tier::Cpu,
        dst: Tier::Gpu,
        deadline_ns: deadline_ms * 1_000_000,
        page_bytes: PAGE,
        est_fill_ns: 0,
        tensor: "kv".into(),
        tokens: Vec::new(),
    }
}

fn input(requests: Vec<Request>) -> WindowInput {
    WindowInput {
        window_index: 0,
        now_ns: 0,
        window_ns: 0,
        nodes: vec![node("node0")],
        tenants: Vec::new(),
        layer_latency_ns: Vec::new(),
        requests,
    }
}

/// Demanded pages per op, as (dst, src, layer, page).
fn planned_pages(plan: &CachePlan) -> Vec<(String, String, u32, u64)> {
    let mut out = Vec::new();
    for op in &plan.ops {
        for r in &op.kv_refs {
            for p in r.page..r.page + r.count.max(1) {
                out.push((op.dst.clone(), op.src.clone(), r.layer, p));
            }
        }
    }
    out
}

fn no_caps() -> PlannerConfig {
    PlannerConfig {
        caps: false,
        min_io_bytes: 0,
        ..PlannerConfig::default()
    }
}

fn assert_valid(plan: &CachePlan) {
    let problems = plan.problems();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn nested_intervals_are_read_once() {
    // The case that read pages 5..6 twice in the previous planner.
    let mut planner = Planner::new(no_caps());
    let window = input(vec![
        request("a", (0..10).collect(), 10),
        request("b", vec![2], 10),
        request("c", vec![5], 10),
    ]);
    let (plan, report) = planner.plan(&window).unwrap();
    assert_valid(&plan);
    assert_eq!(plan.ops.len(), 1);
    assert_eq!(plan.ops[0].length, 10 * PAGE);
    assert_eq!(report.unique_bytes, 10 * PAGE);
    assert_eq!(report.demand_bytes, 12 * PAGE);
    assert!(
        plan.ops[0].note.contains("3 requests"),
        "{}",
        plan.ops[0].note
    );
}

#[test]
fn without_dedup_shared_pages_are_read_per_request() {
    let mut planner = Planner::new(PlannerConfig {
        dedup: false,
        ..no_caps()
    });
    let (plan, _) = planner
        .plan(&input(vec![
            request("a", vec![1, 2], 10),
            request("b", vec![1, 2], 10),
        ]))
        .unwrap();
    let total: u64 = plan.ops.iter().map(|o| o.length).sum();
    assert_eq!(total, 4 * PAGE);
}

#[test]
fn small_gaps_merge_when_cheaper_and_large_runs_split() {
    let config = PlannerConfig {
        max_gap_pages: 2,
        op_overhead_us: 1000.0,
        ..no_caps()
    };
    // 0..3 and 5..6: a gap of 2 pages, cheap at 25 GB/s against 1 ms per op.
    let window = input(vec![request("a", vec![0, 1, 2, 5], 10)]);
    let (plan, report) = Planner::new(config.clone()).plan(&window).unwrap();
    assert_valid(&plan);
    assert_eq!(plan.ops.len(), 1);
    assert_eq!(plan.ops[0].length, 6 * PAGE);
    assert_eq!(report.gap_bytes, 2 * PAGE);
    let pages: Vec<u64> = planned_pages(&plan).iter().map(|p| p.3).collect();
    assert_eq!(pages, vec![0, 1, 2, 5], "kv_refs list only demanded pages");

    // Expensive gaps stay separate reads.
    let (plan, report) = Planner::new(PlannerConfig {
        op_overhead_us: 0.1,
        ..config.clone()
    })
    .plan(&window)
    .unwrap();
    assert_eq!(plan.ops.len(), 2);
    assert_eq!(report.gap_bytes, 0);

    // Split at 4 pages: each part is trimmed to the pages it needs.
    let (plan, report) = Planner::new(PlannerConfig {
        max_io_bytes: 4 * PAGE,
        ..config
    })
    .plan(&window)
    .unwrap();
    assert_valid(&plan);
    let lengths: Vec<u64> = plan.ops.iter().map(|o| o.length / PAGE).collect();
    assert_eq!(lengths, vec![3, 1]);
    assert_eq!(report.gap_bytes, 0);
}

#[test]
fn small_reads_wait_unless_due_soon() {
    let mut planner = Planner::new(PlannerConfig {
        caps: false,
        min_io_bytes: 4 * PAGE,
        ..PlannerConfig::default()
    });
    let (plan, report) = planner
        .plan(&input(vec![
            request("later", vec![1], 500),
            request("soon", vec![9], 30),
        ]))
        .unwrap();
    let pages: Vec<u64> = planned_pages(&plan).iter().map(|p| p.3).collect();
    assert_eq!(
        pages,
        vec![9],
        "due within two windows: issued though small"
    );
    assert_eq!(report.unplanned.len(), 1);
    assert_eq!(report.unplanned[0].reason, Reason::SmallIo);
    assert_eq!(report.unplanned[0].page, 1);
}

#[test]
fn order_is_least_slack_first_and_late_requests_are_flagged() {
    let mut planner = Planner::new(no_caps());
    let mut window = input(vec![
        request("relaxed", vec![100], 50),
        request("urgent", vec![200], 5),
        request("middle", vec![300], 20),
    ]);
    window.now_ns = 10_000_000;
    let (plan, report) = planner.plan(&window).unwrap();
    let order: Vec<u64> = plan.ops.iter().map(|o| o.kv_refs[0].page).collect();
    assert_eq!(order, vec![200, 300, 100]);
    assert_eq!(report.late_requests, vec!["urgent".to_string()]);
    assert!(plan.ops[0].priority > plan.ops[2].priority);
}

#[test]
fn bandwidth_caps_cut_and_defer_with_a_reason() {
    let mut planner = Planner::new(PlannerConfig {
        min_io_bytes: 0,
        ..PlannerConfig::default()
    });
    let mut window = input(vec![request("big", (0..100).collect(), 10)]);
    // 10 pages' worth of bandwidth per 20 ms window.
    window.nodes[0].tiers[1].bandwidth_bytes_per_s = 10 * PAGE * 50;
    let (plan, report) = planner.plan(&window).unwrap();
    assert_valid(&plan);
    assert_eq!(planned_pages(&plan).len(), 10);
    let deferred: u64 = report
        .unplanned
        .iter()
        .filter(|u| u.reason == Reason::Bandwidth)
        .map(|u| u.count)
        .sum();
    assert_eq!(deferred, 90);
    assert_eq!(report.deferred_bytes, 90 * PAGE);
}

#[test]
fn space_caps_count_what_eviction_can_free() {
    let mut planner = Planner::new(PlannerConfig {
        min_io_bytes: 0,
        ..PlannerConfig::default()
    });
    let mut window = input(vec![request("r", (0..8).collect(), 10)]);
    let gpu = &mut window.nodes[0].tiers[0];
    gpu.capacity_bytes = 10 * PAGE;
    gpu.free_bytes = 2 * PAGE;
    gpu.resident = (1000..1008)
        .map(|p| ResidentPage {
            page: p,
            layer: 0,
            bytes: PAGE,
            pinned: p < 1004,
            tensor: "kv".into(),
        })
        .collect();
    let (plan, report) = planner.plan(&window).unwrap();
    assert_valid(&plan);
    // 2 free + 4 unpinned = 6 pages of room.
    assert_eq!(planned_pages(&plan).len(), 6);
    assert!(report.unplanned.iter().all(|u| u.reason == Reason::Space));
    let evicted: Vec<u64> = plan.evict.iter().map(|e| e.page).collect();
    assert!(
        evicted.iter().all(|p| *p >= 1004),
        "pinned pages are never evicted: {evicted:?}"
    );
    assert_eq!(evicted.len(), 4);
    assert!(plan.evict.iter().all(|e| e.location == "tier://node0/gpu"));
    // Evictions name the resident page's pool, so an executor that keys
    // pages by pool finds them.
    assert!(
        plan.evict.iter().all(|e| e.tensor == "kv"),
        "{:?}",
        plan.evict
    );
}

#[test]
fn eviction_has_hysteresis_between_the_watermarks() {
    let config = PlannerConfig {
        min_io_bytes: 0,
        high_watermark: 0.9,
        low_watermark: 0.5,
        ..PlannerConfig::default()
    };
    let window = |free_pages: u64| {
        let mut w = input(vec![]);
        let gpu = &mut w.nodes[0].tiers[0];
        gpu.capacity_bytes = 100 * PAGE;
        gpu.free_bytes = free_pages * PAGE;
        gpu.resident = (0..100 - free_pages)
            .map(|p| ResidentPage {
                page: p,
                layer: 0,
                bytes: PAGE,
                pinned: false,
                tensor: String::new(),
            })
            .collect();
        w
    };
    let mut planner = Planner::new(config);
    // 85 % used: between the marks, nothing happens.
    let (plan, _) = planner.plan(&window(15)).unwrap();
    assert!(plan.evict.is_empty());
    // 95 % used: back down to 50 %.
    let (plan, report) = planner.plan(&window(5)).unwrap();
    assert_eq!(plan.evict.len(), 45);
    assert_eq!(report.evicted_bytes, 45 * PAGE);
}

#[test]
fn eviction_spares_pages_the_plan_reads_and_takes_the_coldest() {
    let mut planner = Planner::new(PlannerConfig {
        min_io_bytes: 0,
        ..PlannerConfig::default()
    });
    // Make page 7 of the CPU tier hot.
    for i in 0..5 {
        let mut w = input(vec![request("warm", vec![7], 10)]);
        w.now_ns = i;
        planner.plan(&w).unwrap();
    }
    let mut w = input(vec![request("r", vec![1, 2], 10)]);
    w.nodes[0].tiers[1].capacity_bytes = 10 * PAGE;
    w.nodes[0].tiers[1].free_bytes = 0;
    w.nodes[0].tiers[1].resident = (0..10)
        .map(|p| ResidentPage {
            page: p,
            layer: 0,
            bytes: PAGE,
            pinned: false,
            tensor: String::new(),
        })
        .collect();
    let (plan, _) = planner.plan(&w).unwrap();
    assert_valid(&plan);
    let evicted: BTreeSet<u64> = plan.evict.iter().map(|e| e.page).collect();
    assert!(
        !evicted.contains(&1) && !evicted.contains(&2),
        "read by this plan"
    );
    assert!(!evicted.contains(&7), "the hottest page stays: {evicted:?}");
    assert!(!evicted.is_empty());
}

#[test]
fn token_buckets_refill_carry_over_and_cap_at_burst() {
    let mut b = TokenBucket::new(1000.0, 5000.0, 0);
    assert!(b.try_take(4000));
    assert!(!b.try_take(2000), "1000 left");
    b.refill(1_000_000_000);
    assert_eq!(b.tokens, 2000.0, "one second of refill carried over");
    b.refill(100_000_000_000);
    assert_eq!(b.tokens, 5000.0, "never above the burst");
    assert!(
        b.try_take(9000),
        "a full bucket lets an oversize request through"
    );
    assert_eq!(b.tokens, -4000.0);
    assert!(!b.try_take(1));
    b.refill(99_000_000_000);
    assert_eq!(b.tokens, -4000.0, "time going backwards earns nothing");
}

#[test]
fn tenants_are_limited_by_their_buckets_across_windows() {
    let mut planner = Planner::new(no_caps());
    let mk = |now_ms: u64| {
        let mut w = input(
            (0..10)
                .map(|i| {
                    let mut r = request(&format!("t{now_ms}-{i}"), vec![now_ms * 100 + i], 1000);
                    r.tenant = if i % 2 == 0 {
                        "small".into()
                    } else {
                        "big".into()
                    };
                    r
                })
                .collect(),
        );
        w.now_ns = now_ms * 1_000_000;
        w.tenants = vec![
            Tenant {
                name: "small".into(),
                rate_bytes_per_s: PAGE * 100, // one page per 10 ms
                burst_bytes: 2 * PAGE,
                weight: 1.0,
            },
            Tenant {
                name: "big".into(),
                rate_bytes_per_s: PAGE * 1_000_000,
                burst_bytes: 1000 * PAGE,
                weight: 1.0,
            },
        ];
        w
    };
    let w0 = mk(0);
    let (_, r1) = planner.plan(&w0).unwrap();
    let small = r1.tenants.iter().find(|t| t.tenant == "small").unwrap();
    assert_eq!(small.admitted_bytes, 2 * PAGE, "the burst");
    assert_eq!(small.deferred_bytes, 3 * PAGE);
    let big = r1.tenants.iter().find(|t| t.tenant == "big").unwrap();
    assert_eq!(big.deferred_bytes, 0);
    assert_eq!(r1.credit_deferred.len(), 3);
    for &i in &r1.credit_deferred {
        assert_eq!(w0.requests[i as usize].tenant, "small");
    }
    // 20 ms later, two pages' worth has refilled.
    let (_, r2) = planner.plan(&mk(20)).unwrap();
    let small = r2.tenants.iter().find(|t| t.tenant == "small").unwrap();
    assert_eq!(small.admitted_bytes, 2 * PAGE);
    // State survives a save and restore.
    let state = planner.state();
    let restored = Planner::with_state(PlannerConfig::default(), state.clone());
    assert_eq!(restored.state(), state);
}

#[test]
fn hot_pages_from_ssd_are_written_through_to_cpu() {
    let mut planner = Planner::new(PlannerConfig {
        admit_after_hits: 3.0,
        ..no_caps()
    });
    let mut last = None;
    for i in 0..4 {
        let mut r = request("r", vec![42, 43], 100);
        r.src = Tier::Ssd;
        let mut w = input(vec![r]);
        w.now_ns = i;
        last = Some(planner.plan(&w).unwrap());
    }
    let (plan, report) = last.unwrap();
    assert_valid(&plan);
    assert_eq!(plan.admit.len(), 1);
    assert_eq!(plan.admit[0].location, "tier://node0/cpu");
    assert_eq!(plan.admit[0].count, 2);
    assert_eq!(report.admitted_bytes, 2 * PAGE);
    assert!(planner.heat(0, 42, 4) >= 3.0);
}

#[test]
fn layer_overlap_staggers_deadlines_and_sets_depth() {
    let mut planner = Planner::new(no_caps());
    let mut r = request("r", (0..64).collect(), 10);
    r.layers = [0, 4];
    let mut w = input(vec![r]);
    w.layer_latency_ns = vec![100_000; 4];
    let (plan, report) = planner.plan(&w).unwrap();
    assert_valid(&plan);
    let mut by_layer: HashMap<u32, u64> = HashMap::new();
    for op in &plan.ops {
        by_layer.insert(op.kv_refs[0].layer, op.deadline_ns);
    }
    assert_eq!(by_layer[&1] - by_layer[&0], 100_000);
    assert_eq!(by_layer[&3] - by_layer[&0], 300_000);
    // 64 pages x 64 KiB at 25 GB/s = 168 µs per layer against 100 µs of compute.
    assert_eq!(report.prefetch_depth, vec![2, 2, 2, 2]);
    assert!(plan.ops.iter().all(|o| o.stream_hint >= 1));
}

#[test]
fn bad_input_names_the_field() {
    let base = serde_json::json!({
        "now_ns": 0,
        "nodes": [{"name": "node0", "tiers": [
            {"tier": "gpu", "capacity_bytes": 100, "free_bytes": 100, "bandwidth_bytes_per_s": 10},
            {"tier": "cpu", "capacity_bytes": 100, "free_bytes": 100, "bandwidth_bytes_per_s": 10}]}],
        "requests": [{"id": "r", "node": "node0", "pages": [1], "src": "cpu", "dst": "gpu",
                      "deadline_ns": 5, "page_bytes": 4}]
    });
    assert!(WindowInput::from_json(&base.to_string(), "w.json").is_ok());
    let cases: [(&str, serde_json::Value, &str); 6] = [
        ("node", "node9".into(), "requests[0].node"),
        ("src", "tape".into(), "requests[0].src"),
        ("dst", "ssd".into(), "requests[0].dst"),
        ("page_bytes", 0.into(), "requests[0].page_bytes"),
        ("pages", serde_json::json!([]), "requests[0].pages"),
        ("bogus", 1.into(), "bogus"),
    ];
    for (key, value, field) in cases {
        let mut v = base.clone();
        v["requests"][0][key] = value;
        let err = WindowInput::from_json(&v.to_string(), "w.json")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("w.json"), "{err}");
        assert!(err.contains(field), "{key}: {err}");
    }
    let mut w = input(vec![request("r", vec![1], 1)]);
    w.tenants = vec![Tenant {
        name: "a".into(),
        rate_bytes_per_s: 1,
        burst_bytes: 1,
        weight: 1.0,
    }];
    let err = w.check("w").unwrap_err().to_string();
    assert!(
        err.contains("requests[0].tenant") && err.contains("\"default\""),
        "{err}"
    );
    let mut w = input(vec![request("r", vec![1], 1)]);
    w.nodes[0].tiers[0].free_bytes = w.nodes[0].tiers[0].capacity_bytes + 1;
    assert!(w.check("w").unwrap_err().to_string().contains("free_bytes"));
}

/// One random request: first page, pages, layer, from SSD, deadline in ms.
type ArbRequest = (u64, u64, u32, bool, u64);

/// A random window: requests with nested, overlapping and disjoint page
/// intervals over two layers and two links.
fn arb_window() -> impl Strategy<Value = (Vec<ArbRequest>, u64)> {
    (
        prop::collection::vec(
            (0u64..200, 1u64..40, 0u32..2, any::<bool>(), 1u64..100),
            1..40,
        ),
        1u64..400,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_demanded_page_is_planned_once_or_accounted_for((reqs, bw_pages) in arb_window()) {
        let mut planner = Planner::new(PlannerConfig { min_io_bytes: 0, ..PlannerConfig::default() });
        let mut w = input(reqs.iter().enumerate().map(|(i, &(start, len, layer, ssd, deadline))| {
            let mut r = request(&format!("r{i}"), (start..start + len).collect(), deadline);
            r.layers = [layer, layer + 1];
            if ssd { r.src = Tier::Ssd; }
            r
        }).collect());
        // Bandwidth for bw_pages pages per window on each link.
        for t in &mut w.nodes[0].tiers { t.bandwidth_bytes_per_s = bw_pages * PAGE * 50; }
        let (plan, report) = planner.plan(&w).unwrap();
        prop_assert!(plan.problems().is_empty(), "{:?}", plan.problems());
        // No page reaches its destination twice, whatever source it came from.
        let planned: Vec<(String, u32, u64)> =
            planned_pages(&plan).into_iter().map(|(dst, _, l, p)| (dst, l, p)).collect();
        let distinct: BTreeSet<_> = planned.iter().cloned().collect();
        prop_assert_eq!(distinct.len(), planned.len(), "a page read twice");
        let gpu = "tier://node0/gpu".to_string();
        let mut demanded = BTreeSet::new();
        for &(start, len, layer, _, _) in &reqs {
            for p in start..start + len {
                demanded.insert((gpu.clone(), layer, p));
            }
        }
        let mut unplanned = BTreeSet::new();
        prop_assert!(report.credit_deferred.is_empty(), "no tenants, no credit");
        for u in &report.unplanned {
            prop_assert!(u.count > 0);
            for p in u.page..u.page + u.count {
                unplanned.insert((format!("tier://node0/{}", u.dst), u.layer, p));
            }
        }
        for page in &demanded {
            prop_assert!(distinct.contains(page) || unplanned.contains(page), "{:?} lost", page);
        }
        for page in &distinct {
            prop_assert!(demanded.contains(page), "{:?} planned but not demanded", page);
        }
        let planned_bytes: u64 = plan.ops.iter().map(|o| o.length).sum();
        prop_assert!(planned_bytes <= bw_pages * PAGE * 2, "caps exceeded over two links");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The planner charges only tenants that fall short one by one; the
    /// result must be the plain rule: every request in least-slack order,
    /// admitted when it fits the tokens left or the bucket is full.
    #[test]
    fn credits_match_charging_every_request_in_order(
        reqs in prop::collection::vec((0usize..3, 1u64..20, 1u64..50), 1..60),
        bursts in prop::collection::vec(0u64..80, 3),
    ) {
        let mut planner = Planner::new(no_caps());
        let mut w = input(reqs.iter().enumerate().map(|(i, &(t, len, deadline))| {
            let mut r = request(&format!("r{i}"), (0..len).collect(), deadline);
            r.tenant = format!("t{t}");
            r
        }).collect());
        // Copies take no time, so slack is the deadline and the order is
        // (deadline, position).
        for t in &mut w.nodes[0].tiers { t.bandwidth_bytes_per_s = u64::MAX / 2; }
        w.tenants = bursts.iter().enumerate().map(|(t, &b)| Tenant {
            name: format!("t{t}"),
            rate_bytes_per_s: 0,
            burst_bytes: b * PAGE,
            weight: 1.0,
        }).collect();
        let (_, report) = planner.plan(&w).unwrap();
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by_key(|&i| (reqs[i].2, i));
        let mut buckets: Vec<TokenBucket> = bursts
            .iter()
            .map(|&b| TokenBucket::new(0.0, (b * PAGE) as f64, 0))
            .collect();
        let mut deferred = Vec::new();
        let mut admitted = [0u64; 3];
        for i in order {
            let (t, len, _) = reqs[i];
            if buckets[t].try_take(len * PAGE) {
                admitted[t] += len * PAGE;
            } else {
                deferred.push(i as u32);
            }
        }
        prop_assert_eq!(&report.credit_deferred, &deferred);
        for (t, b) in buckets.iter().enumerate() {
            let used = report.tenants.iter().find(|u| u.tenant == format!("t{t}")).unwrap();
            prop_assert_eq!(used.admitted_bytes, admitted[t]);
            prop_assert_eq!(used.tokens_left, b.tokens);
        }
    }
}

#[test]
fn heat_decays_by_half_lives_and_ranks_survive_rescaling() {
    use bcache::heat::Heat;
    let hl = 1_000_000; // 1 ms
    let mut heat = Heat::new(hl as f64, 1 << 10);
    heat.add((0, 1), 8.0, 0);
    heat.add((0, 2), 1.0, 3 * hl);
    assert!(
        (heat.get((0, 1), 3 * hl) - 1.0).abs() < 1e-9,
        "8 hits, three half-lives ago"
    );
    assert!((heat.get((0, 2), 3 * hl) - 1.0).abs() < 1e-9);
    let (r1, r2) = (heat.rank((0, 1)), heat.rank((0, 2)));
    assert!((r1 - r2).abs() < 1e-9, "equal heat, equal rank");
    // Far enough ahead to rescale the stored values: ranks do not move.
    heat.add((0, 3), 1.0, 1000 * hl);
    assert!((heat.rank((0, 1)) - r1).abs() < 1e-6);
    assert!(heat.rank((0, 3)) > r1);
    assert!((heat.get((0, 3), 1001 * hl) - 0.5).abs() < 1e-9);
    assert_eq!(heat.rank((9, 9)), f64::NEG_INFINITY);
    // Bounded: the coldest half goes when the map is full.
    let mut small = Heat::new(hl as f64, 100);
    for p in 0..1000 {
        small.add((0, p), 1.0 + p as f64, 0);
    }
    assert!(small.len() <= 100);
    assert!(small.get((0, 999), 0) > 0.0, "the hottest stays");
    assert_eq!(small.get((0, 0), 0), 0.0, "the coldest went");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Heat kept in blocks of pages behaves as one number per page: runs
    /// and single adds agree with a plain map, saving and restoring keeps
    /// every page, and the bound holds.
    #[test]
    fn heat_blocks_behave_as_one_number_per_page(
        adds in prop::collection::vec((0u32..3, 0u64..200, 1usize..40, 0.0f64..4.0), 1..60),
    ) {
        use bcache::heat::Heat;
        let mut heat = Heat::new(1e9, 1 << 20);
        let mut plain: HashMap<(u32, u64), f64> = HashMap::new();
        for &(layer, start, len, w) in &adds {
            let mut seen = Vec::new();
            heat.add_run(layer, start, (0..len).map(|i| w * (i % 3) as f64), |v| seen.push(v));
            prop_assert_eq!(seen.len(), len);
            for (i, v) in seen.into_iter().enumerate() {
                let add = w * (i % 3) as f64;
                let e = plain.entry((layer, start + i as u64)).or_insert(0.0);
                if add > 0.0 {
                    *e += add;
                }
                prop_assert!((v - *e).abs() < 1e-9);
            }
        }
        let nonzero = plain.values().filter(|v| **v > 0.0).count();
        prop_assert_eq!(heat.len(), nonzero);
        for (&(l, p), &v) in &plain {
            prop_assert!((heat.get((l, p), 0) - v).abs() < 1e-9);
        }
        let saved = heat.entries(0);
        prop_assert_eq!(saved.len(), nonzero);
        let mut back = Heat::new(1e9, 1 << 20);
        back.restore(&saved, 0);
        prop_assert_eq!(back.entries(0), saved);
        // A bound below the pages held forgets down to it, and never grows
        // blocks beyond what it holds.
        let mut bounded = Heat::new(1e9, 8);
        bounded.restore(&heat.entries(0), 0);
        prop_assert!(bounded.len() <= 8);
    }
}

// ----- route hints -----

/// The defaults with the route-hints stage on (it is off by default).
fn hints_on() -> PlannerConfig {
    PlannerConfig {
        route_hints: true,
        ..PlannerConfig::default()
    }
}

/// splitmix64 steps for test prompts.
fn tokens_from(seed: &mut u64, len: usize) -> Vec<u32> {
    (0..len)
        .map(|_| (bcache::rng::splitmix64(seed) % 50_000) as u32)
        .collect()
}

/// Three nodes; 50 requests whose 512-token prompts are one base with 5
/// tokens changed each, spread over the nodes, reading the base's pages
/// 1000..1008 and 8 pages of their own; then 10 unrelated prompts with
/// pages of their own. The base's pages are resident on node2, the node
/// that serves the fewest of the 50 (so the busiest node would be a wrong
/// answer): all 8 in its CPU tier, the first 4 also in its GPU tier and for
/// a second layer (a page counts once).
fn near_duplicate_window() -> WindowInput {
    let mut seed = 7;
    let base = tokens_from(&mut seed, 512);
    let mut requests = Vec::new();
    for i in 0..50u64 {
        let mut tokens = base.clone();
        for _ in 0..5 {
            let at = (bcache::rng::splitmix64(&mut seed) % 512) as usize;
            tokens[at] = 60_000 + (bcache::rng::splitmix64(&mut seed) % 1000) as u32;
        }
        let mut pages: Vec<u64> = (1000..1008).collect();
        pages.extend(10_000 + i * 8..10_008 + i * 8);
        let mut r = request(&format!("dup{i}"), pages, 50);
        r.node = format!("node{}", i % 3);
        r.tokens = tokens;
        requests.push(r);
    }
    for j in 0..10u64 {
        let mut r = request(
            &format!("other{j}"),
            (20_000 + j * 8..20_008 + j * 8).collect(),
            50,
        );
        r.node = format!("node{}", j % 3);
        r.tokens = tokens_from(&mut seed, 512);
        requests.push(r);
    }
    let resident = |pages: std::ops::Range<u64>, layer: u32| {
        pages.map(move |page| ResidentPage {
            page,
            layer,
            bytes: PAGE,
            pinned: false,
            tensor: String::new(),
        })
    };
    let mut node2 = node("node2");
    node2.tiers[1].resident = resident(1000..1008, 0).collect();
    node2.tiers[0].resident = resident(1000..1004, 0)
        .chain(resident(1000..1004, 1))
        .collect();
    // node0 holds pages of the unrelated prompts only.
    let mut node0 = node("node0");
    node0.tiers[1].resident = resident(20_000..20_016, 0).collect();
    WindowInput {
        nodes: vec![node0, node("node1"), node2],
        ..input(requests)
    }
}

#[test]
fn near_duplicate_prompts_form_one_cluster_routed_to_their_pages() {
    let window = near_duplicate_window();
    window.check("test").unwrap();
    let (plan, report) = Planner::new(hints_on()).plan(&window).unwrap();
    assert_valid(&plan);
    assert_eq!(report.route_hints.len(), 1, "{:?}", report.route_hints);
    let hint = &report.route_hints[0];
    assert_eq!(hint.requests, (0..50).collect::<Vec<u32>>());
    assert_eq!(&*hint.node, "node2");
    assert_eq!(hint.resident_pages, 8);
    assert_eq!(hint.nodes_now, 3);

    // Without resident pages anywhere, the node serving most of the
    // cluster's requests (node0 and node1 serve 17 each: the first wins).
    let mut bare = window.clone();
    for n in &mut bare.nodes {
        for t in &mut n.tiers {
            t.resident.clear();
        }
    }
    let (_, report) = Planner::new(hints_on()).plan(&bare).unwrap();
    assert_eq!(report.route_hints.len(), 1);
    assert_eq!(&*report.route_hints[0].node, "node0");
    assert_eq!(report.route_hints[0].resident_pages, 0);
}

#[test]
fn requests_without_tokens_group_by_their_first_pages_exactly() {
    let mut tokened = request("t0", vec![1, 2, 3, 4, 5], 50);
    tokened.tokens = (0..64).collect();
    let mut tokened_too = tokened.clone();
    tokened_too.id = "t1".into();
    let mut window = input(vec![
        request("a", vec![1, 2, 3, 4, 5], 50),
        request("b", vec![1, 2, 3, 4, 9], 50),
        request("c", vec![1, 2, 3, 7, 5], 50),
        request("d", vec![8, 2, 3, 4, 5], 50),
        request("e", vec![1, 2, 3, 4], 50),
        // Same pages as `a`, but clustered by tokens: another family.
        tokened,
        tokened_too,
    ]);
    // One node: nowhere else to send anything, so no hints.
    let (_, report) = Planner::new(hints_on()).plan(&window).unwrap();
    assert!(report.route_hints.is_empty(), "{:?}", report.route_hints);
    window.nodes.push(node("node1"));
    let (_, report) = Planner::new(hints_on()).plan(&window).unwrap();
    let groups: Vec<(u32, Vec<u32>)> = report
        .route_hints
        .iter()
        .map(|h| (h.cluster, h.requests.clone()))
        .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!(groups[0].1, vec![0, 1, 4], "{groups:?}");
    assert_eq!(groups[1].1, vec![5, 6], "{groups:?}");
    assert_ne!(groups[0].0, groups[1].0, "families share no id");
    for h in &report.route_hints {
        assert_eq!((&*h.node, h.nodes_now, h.resident_pages), ("node0", 1, 0));
    }

    // Three pages deep, `c` joins.
    let (_, report) = Planner::new(PlannerConfig {
        prefix_depth: 3,
        ..hints_on()
    })
    .plan(&window)
    .unwrap();
    assert_eq!(report.route_hints[0].requests, vec![0, 1, 2, 4]);

    // All first pages different: no cluster of requests without tokens.
    let mut window = input(
        (0..5)
            .map(|i| request(&format!("r{i}"), vec![i, 100], 50))
            .collect(),
    );
    window.nodes.push(node("node1"));
    let (_, report) = Planner::new(hints_on()).plan(&window).unwrap();
    assert!(report.route_hints.is_empty(), "{:?}", report.route_hints);
}

#[test]
fn route_hints_off_gives_none_and_never_change_the_plan() {
    let window = near_duplicate_window();
    let (on_plan, on) = Planner::new(hints_on()).plan(&window).unwrap();
    let (off_plan, off) = Planner::new(PlannerConfig {
        route_hints: false,
        ..PlannerConfig::default()
    })
    .plan(&window)
    .unwrap();
    assert!(!on.route_hints.is_empty());
    assert!(off.route_hints.is_empty(), "{:?}", off.route_hints);
    assert_eq!(on_plan, off_plan);
}
