//! One node's replay: its tiers, links, queue and (for `bcache`) planner.

use std::collections::{HashMap, HashSet, VecDeque};

use super::PolicyKind;
use super::pool::{Key, Pool};
use crate::config::Config;
use crate::error::Result;
use crate::model::{Node, Request, Tier, TierState, WindowInput};
use crate::planner::Planner;
use crate::trace::{Trace, TraceRequest};

/// One node's counters; [`super::combine`] adds them up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeResult {
    /// Requests served.
    pub requests: u64,
    /// Blocks needed.
    pub blocks: u64,
    /// Blocks found in GPU memory.
    pub gpu_hits: u64,
    /// Blocks found in host memory.
    pub cpu_hits: u64,
    /// Blocks found on SSD.
    pub ssd_hits: u64,
    /// Blocks recomputed.
    pub recomputed: u64,
    /// Host-to-GPU bytes.
    pub h2d_bytes: u64,
    /// GPU-to-host bytes.
    pub d2h_bytes: u64,
    /// SSD bytes read.
    pub ssd_read_bytes: u64,
    /// SSD bytes written.
    pub ssd_write_bytes: u64,
    /// (trace index, TTFT ns) per request.
    pub ttft_ns: Vec<(usize, u64)>,
    /// GPU stall, ns.
    pub stall_ns: u64,
    /// Bytes prefetched.
    pub prefetched_bytes: u64,
    /// Prefetched bytes that landed before their request started.
    pub timely_bytes: u64,
    /// Prefetched bytes never used.
    pub wasted_prefetch_bytes: u64,
    /// Cached bytes that arrived after their request started.
    pub late_bytes: u64,
    /// Bytes the planner deferred.
    pub deferred_bytes: u64,
    /// Bytes the planner dropped.
    pub dropped_bytes: u64,
    /// Planning latency per window, ns.
    pub plan_ns: Vec<u64>,
}

/// Where a block was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Gpu,
    Cpu,
    Ssd,
}

/// A block staged in GPU memory ahead of its request.
#[derive(Debug, Clone, Copy)]
struct Staged {
    from: Found,
    landing_ns: u64,
}

struct Queued {
    pos: usize,
    arrival: u64,
}

struct Sim<'a> {
    trace: &'a Trace,
    seq: &'a [usize],
    config: &'a Config,
    policy: PolicyKind,
    block_bytes: u64,
    gpu: Pool,
    cpu: Pool,
    ssd: Pool,
    /// Blocks staged for queued requests; pinned in the GPU pool.
    staged: HashMap<u64, Staged>,
    pinned: HashSet<u64>,
    stamp: u64,
    /// Belady: for request position `p`, the next position using each block.
    next_use: Vec<Vec<u64>>,
    planner: Option<Planner>,
    h2d_free: u64,
    ssd_free: u64,
    busy_until: u64,
    window: u64,
    out: NodeResult,
}

/// Replays the requests `seq` (trace indices, by arrival) on one node.
pub(crate) fn simulate(
    trace: &Trace,
    seq: &[usize],
    config: &Config,
    policy: PolicyKind,
    scale: f64,
) -> Result<NodeResult> {
    let block_bytes = config.sim.block_bytes().max(1);
    let blocks = |gib: f64| ((gib * scale * (1u64 << 30) as f64) / block_bytes as f64) as usize;
    let gpu_blocks = blocks(config.sim.gpu_gib).max(1);
    let mut sim = Sim {
        trace,
        seq,
        config,
        policy,
        block_bytes,
        gpu: Pool::new(gpu_blocks),
        cpu: Pool::new(blocks(config.sim.cpu_gib)),
        ssd: Pool::new(blocks(config.sim.ssd_gib)),
        staged: HashMap::new(),
        pinned: HashSet::new(),
        stamp: 0,
        next_use: Vec::new(),
        planner: (policy == PolicyKind::Bcache).then(|| Planner::new(config.planner.clone())),
        h2d_free: 0,
        ssd_free: 0,
        busy_until: 0,
        window: 0,
        out: NodeResult::default(),
    };
    if policy == PolicyKind::Belady {
        sim.next_use = next_uses(trace, seq);
    }
    sim.run()?;
    Ok(sim.out)
}

/// For every position and block, the next position (in `seq`) that uses the
/// block again, or `u64::MAX`.
fn next_uses(trace: &Trace, seq: &[usize]) -> Vec<Vec<u64>> {
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut out = vec![Vec::new(); seq.len()];
    for (p, &i) in seq.iter().enumerate().rev() {
        let blocks = &trace.requests[i].blocks;
        out[p] = blocks
            .iter()
            .map(|b| last.get(b).copied().unwrap_or(u64::MAX))
            .collect();
        for b in blocks {
            last.insert(*b, p as u64);
        }
    }
    out
}

fn ns_for(bytes: u64, gbps: f64) -> u64 {
    (bytes as f64 / gbps).round() as u64
}

/// Order-preserving map of a float onto u64.
fn ordered(v: f64) -> u64 {
    let bits = v.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

impl Sim<'_> {
    fn run(&mut self) -> Result<()> {
        let window_ns = self.config.planner.window_ns().max(1);
        let mut queue: VecDeque<Queued> = VecDeque::new();
        let mut next = 0;
        // The next planning window, when there is demand to plan.
        let mut window_at: Option<u64> = None;
        loop {
            let arrival = self
                .seq
                .get(next)
                .map(|&i| self.trace.requests[i].arrival_ns);
            let start = queue.front().map(|q| q.arrival.max(self.busy_until));
            let t = [arrival, start, window_at].into_iter().flatten().min();
            let Some(t) = t else { break };
            if arrival == Some(t) {
                queue.push_back(Queued {
                    pos: next,
                    arrival: t,
                });
                next += 1;
                if self.planner.is_some() && window_at.is_none() {
                    window_at = Some(t.div_ceil(window_ns) * window_ns);
                }
            } else if start == Some(t) {
                if let Some(q) = queue.pop_front() {
                    self.serve(&q, t);
                }
            } else {
                let more = self.plan_window(t, &queue)?;
                window_at = (more && !queue.is_empty()).then(|| {
                    // Plan again when the link can take more.
                    let free = self.h2d_free.max(t + window_ns);
                    free.div_ceil(window_ns) * window_ns
                });
            }
        }
        Ok(())
    }

    fn key(&mut self, block: u64, pos: usize, k: usize) -> Key {
        match self.policy {
            PolicyKind::Lru | PolicyKind::Fifo => {
                self.stamp += 1;
                (self.stamp, 0)
            }
            PolicyKind::Belady => {
                let next = self.next_use[pos].get(k).copied().unwrap_or(u64::MAX);
                (u64::MAX - next, u64::MAX - k as u64)
            }
            PolicyKind::Bcache => (ordered(self.heat_rank(block)), u64::MAX - k as u64),
        }
    }

    /// The planner's time-invariant heat rank of a block (bcache's key).
    fn heat_rank(&self, block: u64) -> f64 {
        self.planner
            .as_ref()
            .map_or(f64::NEG_INFINITY, |p| p.heat_table().rank((0, block)))
    }

    /// Prefill time of `req` with its first `cached` blocks reused: the
    /// fixed overhead plus the uncached tokens (at least one). A request
    /// without a token count (the window format) is whole blocks.
    fn compute_ns(&self, req: &TraceRequest, cached: u64) -> u64 {
        let sim = &self.config.sim;
        let tokens = if req.input_tokens == 0 {
            req.blocks.len() as u64 * u64::from(sim.block_tokens)
        } else {
            req.input_tokens
        };
        let uncached = tokens
            .saturating_sub(cached * u64::from(sim.block_tokens))
            .max(1);
        (sim.request_overhead_ms * 1e6 + uncached as f64 * sim.prefill_us_per_token * 1e3) as u64
    }

    fn locate(&self, block: u64) -> Option<Found> {
        if let Some(s) = self.staged.get(&block) {
            return Some(s.from);
        }
        if self.gpu.contains(block) {
            Some(Found::Gpu)
        } else if self.cpu.contains(block) {
            Some(Found::Cpu)
        } else if self.ssd.contains(block) {
            Some(Found::Ssd)
        } else {
            None
        }
    }

    /// Serves the request at the head of the queue, starting at `start`.
    fn serve(&mut self, q: &Queued, start: u64) {
        let index = self.seq[q.pos];
        let req = &self.trace.requests[index];
        let sim = &self.config.sim;
        let bb = self.block_bytes;
        let n = req.blocks.len();
        let mut cached = 0;
        let (mut from_cpu, mut from_ssd) = (0u64, 0u64);
        let mut staged_landing = 0u64;
        let mut late = 0u64;
        for &b in &req.blocks {
            let Some(found) = self.locate(b) else { break };
            cached += 1;
            match found {
                Found::Gpu => self.out.gpu_hits += 1,
                Found::Cpu => self.out.cpu_hits += 1,
                Found::Ssd => self.out.ssd_hits += 1,
            }
            if let Some(s) = self.staged.remove(&b) {
                self.pinned.remove(&b);
                staged_landing = staged_landing.max(s.landing_ns);
                if s.landing_ns <= start {
                    self.out.timely_bytes += bb;
                } else {
                    late += bb;
                }
            } else {
                match found {
                    Found::Cpu => from_cpu += 1,
                    Found::Ssd => from_ssd += 1,
                    Found::Gpu => {}
                }
            }
        }
        // Staged blocks past the break are not used.
        for &b in &req.blocks[cached..] {
            if self.staged.remove(&b).is_some() {
                self.pinned.remove(&b);
                self.out.wasted_prefetch_bytes += bb;
            }
        }
        self.out.blocks += n as u64;
        self.out.recomputed += (n - cached) as u64;
        self.out.requests += 1;

        // On-demand fetches of what was not staged.
        let mut fetch_done = start.max(staged_landing);
        if from_ssd > 0 {
            let begin = start.max(self.ssd_free);
            let end = begin + ns_for(from_ssd * bb, sim.ssd_read_gbps);
            self.ssd_free = end;
            self.out.ssd_read_bytes += from_ssd * bb;
            fetch_done = fetch_done.max(end + ns_for(bb, sim.h2d_gbps));
        }
        if from_cpu + from_ssd > 0 {
            let bytes = (from_cpu + from_ssd) * bb;
            let begin = start.max(self.h2d_free);
            let end = (begin + ns_for(bytes, sim.h2d_gbps)).max(fetch_done);
            self.h2d_free = end;
            self.out.h2d_bytes += bytes;
            late += bytes;
            fetch_done = fetch_done.max(end);
        }
        self.out.late_bytes += late;
        let compute = self.compute_ns(req, cached as u64);
        let fetch = fetch_done - start;
        let service = fetch.max(compute) + fetch.min(compute) / u64::from(sim.layers.max(1));
        self.out.stall_ns += service - compute;
        self.busy_until = start + service;
        self.out.ttft_ns.push((index, self.busy_until - q.arrival));

        // Every block of the request is now in GPU memory: promote, touching
        // the tail first so that the shared head is the most recent.
        if let Some(p) = self.planner.as_mut() {
            let hits: Vec<(u32, u64, f64)> = req.blocks.iter().map(|&b| (0, b, 1.0)).collect();
            p.observe_hits(&hits, start);
        }
        for k in (0..n).rev() {
            let b = req.blocks[k];
            self.cpu.remove(b);
            self.ssd.remove(b);
            let key = if self.policy == PolicyKind::Fifo && self.gpu.contains(b) {
                None
            } else {
                Some(self.key(b, q.pos, k))
            };
            if let Some(key) = key {
                self.insert_gpu(b, key);
            }
        }
    }

    fn insert_gpu(&mut self, block: u64, key: Key) {
        if !self.gpu.contains(block) {
            while self.gpu.is_full() {
                match self.gpu.pop_victim(&self.pinned) {
                    Some((v, k)) => self.demote_to_cpu(v, k),
                    None => {
                        // Everything is pinned: the block is not kept here.
                        self.demote_to_cpu(block, key);
                        return;
                    }
                }
            }
        }
        self.gpu.set(block, key);
    }

    /// Offloads a block from GPU to host memory; the block keeps its key:
    /// its recency (LRU), insertion time (FIFO), next use (Belady) or heat
    /// (bcache) does not change by moving down.
    fn demote_to_cpu(&mut self, block: u64, key: Key) {
        self.out.d2h_bytes += self.block_bytes;
        if self.cpu.capacity() == 0 {
            self.demote_to_ssd(block, key);
            return;
        }
        while self.cpu.is_full() {
            match self.cpu.pop_victim(&self.pinned) {
                Some((v, k)) => self.demote_to_ssd(v, k),
                None => return,
            }
        }
        self.cpu.set(block, key);
    }

    /// Writes a block from host memory to SSD, or drops it. With
    /// `sim.ssd_admit_after_hits` > 0, bcache writes only blocks whose heat
    /// reached it (fewer SSD writes, at a cost in hits).
    fn demote_to_ssd(&mut self, block: u64, key: Key) {
        if self.ssd.capacity() == 0 {
            return;
        }
        let gate = self.config.sim.ssd_admit_after_hits;
        if let Some(p) = self.planner.as_ref().filter(|_| gate > 0.0)
            && p.heat_table().get((0, block), self.busy_until) < gate
        {
            return;
        }
        self.out.ssd_write_bytes += self.block_bytes;
        while self.ssd.is_full() {
            if self.ssd.pop_victim(&self.pinned).is_none() {
                return;
            }
        }
        self.ssd.set(block, key);
    }

    /// Plans one window of prefetches for the queued requests and executes
    /// the plan on the links. Says whether demand remains to plan later.
    fn plan_window(&mut self, now: u64, queue: &VecDeque<Queued>) -> Result<bool> {
        let sim = &self.config.sim;
        let bb = self.block_bytes;
        let bytes_per_s = |gbps: f64| (gbps * 1e9) as u64;
        let mut requests = Vec::new();
        let mut est = self.busy_until.max(now);
        for q in queue.iter().take(sim.prefetch_lookahead) {
            let req = &self.trace.requests[self.seq[q.pos]];
            let (mut cpu, mut ssd, mut cached) = (Vec::new(), Vec::new(), 0u64);
            for &b in &req.blocks {
                match self.locate(b) {
                    None => break,
                    Some(found) => {
                        cached += 1;
                        if !self.staged.contains_key(&b) {
                            match found {
                                Found::Cpu => cpu.push(b),
                                Found::Ssd => ssd.push(b),
                                Found::Gpu => {}
                            }
                        }
                    }
                }
            }
            let deadline = est.max(q.arrival);
            est = deadline + self.compute_ns(req, cached);
            for (pages, src) in [(cpu, Tier::Cpu), (ssd, Tier::Ssd)] {
                if !pages.is_empty() {
                    requests.push(Request {
                        id: format!("r{}", self.seq[q.pos]),
                        node: "node".into(),
                        tenant: "default".into(),
                        pages,
                        layers: [0, 1],
                        src,
                        dst: Tier::Gpu,
                        deadline_ns: deadline,
                        page_bytes: bb,
                        est_fill_ns: 0,
                        tensor: String::new(),
                        tokens: Vec::new(),
                    });
                }
            }
        }
        if requests.is_empty() {
            return Ok(false);
        }
        // The GPU space the planner may fill: the staging share of the
        // cache, less what is staged already. Unpinned cached blocks are
        // reclaimable, so they count as free.
        let gpu_cap = self.gpu.capacity() as u64 * bb;
        let budget = ((gpu_cap as f64 * sim.prefetch_buffer_fraction) as u64)
            .saturating_sub(self.pinned.len() as u64 * bb);
        let tier = |tier, capacity: u64, free: u64, gbps: f64| {
            let capacity = capacity.max(1);
            TierState::new(tier, capacity, free.min(capacity), bytes_per_s(gbps).max(1))
        };
        let cpu_cap = self.cpu.capacity() as u64 * bb;
        let ssd_cap = self.ssd.capacity() as u64 * bb;
        let mut tiers = vec![
            tier(Tier::Gpu, gpu_cap, budget, sim.d2h_gbps),
            tier(
                Tier::Cpu,
                cpu_cap,
                cpu_cap.saturating_sub(self.cpu.len() as u64 * bb),
                sim.h2d_gbps,
            ),
        ];
        if ssd_cap > 0 {
            tiers.push(tier(
                Tier::Ssd,
                ssd_cap,
                ssd_cap.saturating_sub(self.ssd.len() as u64 * bb),
                sim.ssd_read_gbps,
            ));
        }
        let input = WindowInput {
            window_index: self.window,
            now_ns: now,
            window_ns: 0,
            nodes: vec![Node {
                name: "node".into(),
                tiers,
            }],
            tenants: Vec::new(),
            layer_latency_ns: Vec::new(),
            requests,
        };
        self.window += 1;
        let Some(planner) = self.planner.as_mut() else {
            return Ok(false);
        };
        let (plan, report) = planner.plan(&input)?;
        self.out.plan_ns.push(report.planning_ns);
        self.out.deferred_bytes += report.deferred_bytes;
        self.out.dropped_bytes += report.dropped_bytes;
        for op in &plan.ops {
            let from_ssd = op.src.ends_with("/ssd");
            let mut at = now;
            if from_ssd {
                let begin = now.max(self.ssd_free);
                at = begin + ns_for(op.length, sim.ssd_read_gbps);
                self.ssd_free = at;
                self.out.ssd_read_bytes += op.length;
            }
            let begin = at.max(self.h2d_free);
            let landing = begin + ns_for(op.length, sim.h2d_gbps);
            self.h2d_free = landing;
            self.out.h2d_bytes += op.length;
            self.out.prefetched_bytes += op.length;
            for r in &op.kv_refs {
                for b in r.page..r.page + r.count.max(1) {
                    self.stage(b, from_ssd, landing);
                }
            }
        }
        Ok(report.deferred_bytes > 0)
    }

    /// Moves a block into GPU memory ahead of its request, pinned until the
    /// request starts.
    fn stage(&mut self, block: u64, from_ssd: bool, landing_ns: u64) {
        let from = if from_ssd { Found::Ssd } else { Found::Cpu };
        let present = match from {
            Found::Ssd => self.ssd.remove(block),
            _ => self.cpu.remove(block),
        };
        if !present {
            // A gap page read to merge two runs: bytes moved, nothing staged.
            return;
        }
        self.insert_gpu(block, (ordered(self.heat_rank(block)), 0));
        if self.gpu.contains(block) {
            self.pinned.insert(block);
            self.staged.insert(block, Staged { from, landing_ns });
        }
    }
}
