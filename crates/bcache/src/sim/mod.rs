//! A discrete-event replay of a request trace under several cache policies.
//!
//! The model, per node (nodes are independent once requests are routed):
//!
//! - **Tiers**: GPU, CPU and (optionally) SSD pools of KV blocks, exclusive:
//!   a block lives in at most one tier. A block evicted from the GPU is
//!   offloaded to the CPU (D2H bytes), one evicted from the CPU is written to
//!   the SSD (SSD write bytes), one evicted from the SSD is gone.
//! - **Prefix rule**: a request can reuse block `k` only if blocks `0..k`
//!   are reusable too (attention over block `k` depends on every token
//!   before it). From the first block found nowhere, the rest of the prompt
//!   is recomputed, cached copies or not.
//! - **Links**: host-to-GPU and SSD-read links are serial resources with a
//!   bandwidth; a transfer waits for the link to be free.
//! - **Compute**: one prefill at a time per node, first come first served;
//!   prefill costs a fixed overhead plus a time per uncached token. Loading
//!   cached layers overlaps compute layer by layer, so a request's service
//!   time is `max(fetch, compute) + min(fetch, compute) / layers`; the GPU
//!   stall is service minus compute. TTFT is finish minus arrival. Decode is
//!   not modelled.
//!
//! The policies differ in what they evict and whether they prefetch:
//!
//! - `lru`: evict the least recently used block (a request's blocks are
//!   touched tail first, so the shared head of a prefix is the most recent,
//!   as vLLM frees blocks);
//! - `fifo`: evict the block cached longest ago;
//! - `belady`: evict the block whose next use is farthest in the future
//!   (deepest first on ties): the offline optimum for the GPU tier's hit
//!   count, given every policy caches every block it uses;
//! - `bcache`: the planner drives it. Every window (`planner.window_ms`) it
//!   plans the queued requests' blocks that sit in CPU or SSD, and the
//!   simulator executes the plan's operations on the links, staging the
//!   blocks in GPU memory (pinned) before the request starts. Eviction ranks
//!   blocks by the planner's decayed heat (the hits the engine reports are
//!   fed back to it), and with `sim.ssd_admit_after_hits` above 0, a block
//!   leaves the CPU for the SSD only when its heat reaches it (selective
//!   write, fewer SSD writes at a cost in hits).
//!
//! Hit rates count where each block was found when its request needed it
//! (for a prefetched block: where the prefetch read it from).

mod node;
mod pool;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Routing};
use crate::error::{Error, Result};
use crate::trace::Trace;

pub use node::NodeResult;

/// A replacement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// First in, first out.
    Fifo,
    /// Belady's offline optimum (knows the future).
    Belady,
    /// Planner-driven prefetch, admission and eviction.
    Bcache,
}

impl PolicyKind {
    /// Parses a policy name.
    pub fn parse(name: &str) -> Option<PolicyKind> {
        match name {
            "lru" => Some(PolicyKind::Lru),
            "fifo" => Some(PolicyKind::Fifo),
            "belady" => Some(PolicyKind::Belady),
            "bcache" => Some(PolicyKind::Bcache),
            _ => None,
        }
    }

    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Fifo => "fifo",
            PolicyKind::Belady => "belady",
            PolicyKind::Bcache => "bcache",
        }
    }
}

/// What one policy did at one cache size, over all nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    /// Policy name.
    pub policy: PolicyKind,
    /// Cache size multiple.
    pub capacity_scale: f64,
    /// GPU cache per node, GiB, at this scale.
    pub gpu_gib: f64,
    /// Requests replayed.
    pub requests: u64,
    /// Blocks the requests needed.
    pub blocks: u64,
    /// Blocks found in GPU memory.
    pub gpu_hits: u64,
    /// Blocks found in host memory.
    pub cpu_hits: u64,
    /// Blocks found on SSD.
    pub ssd_hits: u64,
    /// Blocks recomputed.
    pub recomputed: u64,
    /// Fraction of blocks found in any tier.
    pub hit_rate: f64,
    /// Fraction of blocks found in GPU memory.
    pub gpu_hit_rate: f64,
    /// Host-to-GPU bytes.
    pub h2d_bytes: u64,
    /// GPU-to-host bytes (offloads).
    pub d2h_bytes: u64,
    /// SSD bytes read.
    pub ssd_read_bytes: u64,
    /// SSD bytes written.
    pub ssd_write_bytes: u64,
    /// Time to first token, ms: median.
    pub ttft_p50_ms: f64,
    /// Time to first token, ms: 90th percentile.
    pub ttft_p90_ms: f64,
    /// Time to first token, ms: 99th percentile.
    pub ttft_p99_ms: f64,
    /// Time to first token, ms: mean.
    pub ttft_mean_ms: f64,
    /// Total time GPUs waited for KV bytes, s.
    pub stall_s: f64,
    /// Bytes prefetched ahead of their request.
    pub prefetched_bytes: u64,
    /// Prefetched bytes that arrived before their request started.
    pub timely_bytes: u64,
    /// `timely_bytes / prefetched_bytes`; absent for policies that do not prefetch.
    pub prefetch_timeliness: Option<f64>,
    /// Prefetched bytes never used (their prefix broke before the request ran).
    pub wasted_prefetch_bytes: u64,
    /// Bytes of cached blocks that arrived after their request started.
    pub late_bytes: u64,
    /// Bytes the planner deferred (summed over windows; a byte deferred
    /// twice counts twice).
    pub deferred_bytes: u64,
    /// Bytes the planner dropped.
    pub dropped_bytes: u64,
    /// Windows planned.
    pub windows: u64,
    /// Planning latency per window, µs: median.
    pub plan_p50_us: Option<f64>,
    /// Planning latency per window, µs: 99th percentile.
    pub plan_p99_us: Option<f64>,
    /// Every request's TTFT, ms, in trace order (for CDFs); not serialised.
    #[serde(skip)]
    pub ttft_ms: Vec<f64>,
}

/// Everything one simulation run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// Requests in the trace (after `duration_s`).
    pub requests: u64,
    /// Distinct blocks.
    pub distinct_blocks: u64,
    /// Block references.
    pub block_refs: u64,
    /// Bytes of one block.
    pub block_bytes: u64,
    /// One entry per (capacity scale, policy).
    pub results: Vec<PolicyResult>,
    /// Wall time of the simulation, s.
    pub wall_s: f64,
}

/// Which node serves each request.
pub fn route(trace: &Trace, config: &Config) -> Vec<usize> {
    let nodes = config.sim.nodes.max(1);
    trace
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| match config.sim.routing {
            Routing::RoundRobin => i % nodes,
            Routing::PrefixAffinity => {
                let k = config.sim.affinity_blocks.min(r.blocks.len());
                let mut h = blake3::Hasher::new();
                for b in &r.blocks[..k] {
                    h.update(&b.to_le_bytes());
                }
                let d = h.finalize();
                let mut first = [0u8; 8];
                first.copy_from_slice(&d.as_bytes()[..8]);
                (u64::from_le_bytes(first) % nodes as u64) as usize
            }
        })
        .collect()
}

/// Replays `trace` under every configured policy and capacity scale, in
/// parallel over (scale, policy, node).
pub fn simulate(trace: &Trace, config: &Config) -> Result<SimReport> {
    let started = std::time::Instant::now();
    let policies: Vec<PolicyKind> = config
        .sim
        .policies
        .iter()
        .map(|p| PolicyKind::parse(p).ok_or_else(|| Error::Sim(format!("unknown policy {p:?}"))))
        .collect::<Result<_>>()?;
    let results = run(trace, config, &policies, &config.sim.capacity_scales)?;
    let (distinct, refs) = trace.block_stats();
    Ok(SimReport {
        requests: trace.requests.len() as u64,
        distinct_blocks: distinct as u64,
        block_refs: refs as u64,
        block_bytes: config.sim.block_bytes(),
        results,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// Replays `trace` for each (scale, policy) pair; results in that order.
pub fn run(
    trace: &Trace,
    config: &Config,
    policies: &[PolicyKind],
    scales: &[f64],
) -> Result<Vec<PolicyResult>> {
    if trace.requests.is_empty() {
        return Err(Error::Sim("the trace has no requests".into()));
    }
    let nodes = config.sim.nodes.max(1);
    let routes = route(trace, config);
    let mut sequences = vec![Vec::new(); nodes];
    for (i, &n) in routes.iter().enumerate() {
        sequences[n].push(i);
    }
    let jobs: Vec<(usize, usize, usize)> = (0..scales.len())
        .flat_map(|s| (0..policies.len()).flat_map(move |p| (0..nodes).map(move |n| (s, p, n))))
        .collect();
    let outcomes: Vec<NodeResult> = jobs
        .par_iter()
        .map(|&(s, p, n)| node::simulate(trace, &sequences[n], config, policies[p], scales[s]))
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for (s, &scale) in scales.iter().enumerate() {
        for (p, &policy) in policies.iter().enumerate() {
            let parts: Vec<&NodeResult> = jobs
                .iter()
                .zip(&outcomes)
                .filter(|((js, jp, _), _)| *js == s && *jp == p)
                .map(|(_, r)| r)
                .collect();
            results.push(combine(policy, scale, config, trace, &parts));
        }
    }
    Ok(results)
}

fn combine(
    policy: PolicyKind,
    scale: f64,
    config: &Config,
    trace: &Trace,
    parts: &[&NodeResult],
) -> PolicyResult {
    let sum = |f: fn(&NodeResult) -> u64| parts.iter().map(|r| f(r)).sum::<u64>();
    let blocks = sum(|r| r.blocks);
    let gpu_hits = sum(|r| r.gpu_hits);
    let cpu_hits = sum(|r| r.cpu_hits);
    let ssd_hits = sum(|r| r.ssd_hits);
    let mut ttft_ms = vec![0.0; trace.requests.len()];
    for r in parts {
        for &(i, ns) in &r.ttft_ns {
            ttft_ms[i] = ns as f64 / 1e6;
        }
    }
    let mut sorted = ttft_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mut plan_us: Vec<f64> = parts
        .iter()
        .flat_map(|r| r.plan_ns.iter().map(|&ns| ns as f64 / 1e3))
        .collect();
    plan_us.sort_by(f64::total_cmp);
    let prefetched = sum(|r| r.prefetched_bytes);
    let timely = sum(|r| r.timely_bytes);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    PolicyResult {
        policy,
        capacity_scale: scale,
        gpu_gib: config.sim.gpu_gib * scale,
        requests: sum(|r| r.requests),
        blocks,
        gpu_hits,
        cpu_hits,
        ssd_hits,
        recomputed: sum(|r| r.recomputed),
        hit_rate: ratio(gpu_hits + cpu_hits + ssd_hits, blocks),
        gpu_hit_rate: ratio(gpu_hits, blocks),
        h2d_bytes: sum(|r| r.h2d_bytes),
        d2h_bytes: sum(|r| r.d2h_bytes),
        ssd_read_bytes: sum(|r| r.ssd_read_bytes),
        ssd_write_bytes: sum(|r| r.ssd_write_bytes),
        ttft_p50_ms: percentile(&sorted, 0.50),
        ttft_p90_ms: percentile(&sorted, 0.90),
        ttft_p99_ms: percentile(&sorted, 0.99),
        ttft_mean_ms: if sorted.is_empty() {
            0.0
        } else {
            sorted.iter().sum::<f64>() / sorted.len() as f64
        },
        stall_s: sum(|r| r.stall_ns) as f64 / 1e9,
        prefetched_bytes: prefetched,
        timely_bytes: timely,
        prefetch_timeliness: (policy == PolicyKind::Bcache).then(|| ratio(timely, prefetched)),
        wasted_prefetch_bytes: sum(|r| r.wasted_prefetch_bytes),
        late_bytes: sum(|r| r.late_bytes),
        deferred_bytes: sum(|r| r.deferred_bytes),
        dropped_bytes: sum(|r| r.dropped_bytes),
        windows: plan_us.len() as u64,
        plan_p50_us: (!plan_us.is_empty()).then(|| percentile(&plan_us, 0.50)),
        plan_p99_us: (!plan_us.is_empty()).then(|| percentile(&plan_us, 0.99)),
        ttft_ms,
    }
}

/// The `q` quantile of sorted values (nearest rank); 0 for none.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
