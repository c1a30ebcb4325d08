//! The demo's KV stage: bcache plans KV-cache movement for the trace's
//! first requests on two nodes, stratacache executes each node's share on
//! real bytes, and what was executed goes back to the planner before the
//! next window.
//!
//! **Placement by prefix cohort.** The datajax stage's WaveSpec lists the
//! trace's shared prompt prefixes (cohorts). A request goes to the node of
//! the deepest of its cohorts (of at least two blocks) that already has
//! one; a request whose cohorts are all new starts them on the least
//! loaded node, and they stay there. So the requests that share a prefix,
//! such as the turns of one conversation, find its pages already in that
//! node's CPU tier. A one-block prefix (a system prompt every request shares) is
//! not worth concentrating load for: replicating one block per node is
//! cheap. Requests without a cohort go to the least loaded node. The same
//! windows are also planned with round-robin placement, for comparison.
//!
//! **One window.** Requests arriving in the window ask for the blocks their
//! node's CPU tier does not hold yet (the rest are cache hits); their pages
//! wait on the node's SSD tier. Runs the previous window deferred are asked
//! for again, due at once. The planner's `CachePlan` is split into one share
//! per node (`CachePlan::for_node`); each node's store reads its share from
//! its file, seeds the source pages on its disk tier, executes the copies
//! into its memory tier, and writes an execution report. The demo reads the
//! reports back: every moved page is checked byte for byte, the page hits
//! feed the planner's heat, and the pages now resident shape the next
//! window. Files, per window `w`, under `kv/wNNN/`: the planner's input and
//! report, the cluster plan, and each node's share and execution report.
//!
//! **Accounting.** Per window, the bytes the admitted requests need
//! (distinct pages, plus gap pages read on purpose to merge runs) equal
//! the bytes planned plus the bytes deferred or dropped; the bytes executed
//! equal the bytes planned. The stage fails if either does not hold, if an
//! operation fails, or if deferred work is still pending after
//! [`MAX_DRAIN_WINDOWS`] windows without arrivals.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use bcache::model::{Node, Request, ResidentPage, Tier, TierState, WindowInput};
use bcache::planner::Report;
use bcache::trace::Trace;
use bstack_plan::{CachePlan, Document, Format, WaveSpec};
use serde::Serialize;
use stratacache::config::{ByteSize, Config, TierConfig, TierKind};
use stratacache::{Access, ExecReport, OpStatus, StorageEngine};

use crate::plan::read_back;

/// The KV pool the requests read; the stores key pages by it.
const POOL: &str = "kv";
/// Nodes of the demo cluster.
const NODES: [&str; 2] = ["node0", "node1"];
/// Bytes of one KV page (one block of one layer): small enough that the
/// stage moves a few hundred MiB at most.
pub const PAGE_BYTES: u64 = 32 << 10;
/// Trace time the stage covers, from the first arrival.
const SPAN_NS: u64 = 120_000_000_000;
/// At most this many requests, whatever the span holds.
const MAX_REQUESTS: usize = 400;
/// Time from a request's arrival to when its pages must be in CPU memory.
const TTFT_BUDGET_NS: u64 = 2_000_000_000;
/// Windows without arrivals planned after the last one, to drain deferred
/// work, before the stage gives up.
pub const MAX_DRAIN_WINDOWS: u64 = 16;
/// SSD-tier capacity per node.
const SSD_BYTES: u64 = 8 << 30;
/// Bandwidth of CPU-memory reads the planner assumes.
const CPU_BW: u64 = 20_000_000_000;

/// The simulated cluster's sizes and speeds.
#[derive(Debug, Clone, Copy)]
pub struct Cluster {
    /// Length of one planning window on the trace's clock, ns.
    pub window_ns: u64,
    /// CPU-tier capacity per node, as the planner sees it and as the
    /// store has it.
    pub cpu_bytes: u64,
    /// Bandwidth of SSD reads the planner assumes, bytes per second.
    pub ssd_bw: u64,
}

impl Cluster {
    /// The demo's: 10 s windows, 1 GiB of CPU memory per node, 2 GB/s SSDs.
    pub const DEFAULT: Cluster = Cluster {
        window_ns: 10_000_000_000,
        cpu_bytes: 1 << 30,
        ssd_bw: 2_000_000_000,
    };
}

/// How requests are placed on nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// By the WaveSpec's prefix cohorts.
    Cohorts,
    /// Request `i` on node `i mod nodes`.
    RoundRobin,
}

/// Places requests on nodes.
struct Router {
    placement: Placement,
    /// Cohort of at least two blocks: (depth, id of its last block).
    cohorts: HashSet<(u32, u64)>,
    /// Distinct cohort depths, deepest first.
    depths: Vec<u32>,
    /// Node chosen for each cohort seen so far.
    home: HashMap<(u32, u64), usize>,
    /// Blocks placed on each node so far.
    load: Vec<u64>,
    placed: u64,
    /// Requests placed by a cohort.
    by_cohort: u64,
}

impl Router {
    fn new(placement: Placement, spec: &WaveSpec) -> Router {
        let cohorts: HashSet<(u32, u64)> = spec
            .cohorts
            .iter()
            .filter(|c| c.depth >= 2)
            .map(|c| (c.depth, c.block))
            .collect();
        let mut depths: Vec<u32> = cohorts.iter().map(|c| c.0).collect();
        depths.sort_unstable_by(|a, b| b.cmp(a));
        depths.dedup();
        Router {
            placement,
            cohorts,
            depths,
            home: HashMap::new(),
            load: vec![0; NODES.len()],
            placed: 0,
            by_cohort: 0,
        }
    }

    /// The node for a request with `blocks`.
    fn place(&mut self, blocks: &[u64]) -> usize {
        let least_loaded = |load: &[u64]| {
            (0..load.len())
                .min_by_key(|&n| (load[n], n))
                .unwrap_or_default()
        };
        let node = match self.placement {
            Placement::RoundRobin => (self.placed % NODES.len() as u64) as usize,
            Placement::Cohorts => {
                // Every cohort the request belongs to, deepest first.
                let cohorts: Vec<(u32, u64)> = self
                    .depths
                    .iter()
                    .filter_map(|&d| {
                        let block = *blocks.get(d as usize - 1)?;
                        self.cohorts.contains(&(d, block)).then_some((d, block))
                    })
                    .collect();
                // The longest prefix already placed decides; a request
                // whose prefixes are all new starts them on the least
                // loaded node.
                let node = cohorts
                    .iter()
                    .find_map(|c| self.home.get(c).copied())
                    .unwrap_or_else(|| least_loaded(&self.load));
                for c in &cohorts {
                    self.home.entry(*c).or_insert(node);
                }
                if !cohorts.is_empty() {
                    self.by_cohort += 1;
                }
                node
            }
        };
        self.placed += 1;
        self.load[node] += blocks.len() as u64;
        node
    }
}

/// One window's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowFigures {
    /// Window index.
    pub window: u64,
    /// Requests that arrived in it.
    pub arrivals: u64,
    /// Runs carried over from the previous window's deferrals.
    pub carried_runs: u64,
    /// Blocks the arrivals read (each block once per request).
    pub blocks: u64,
    /// Of those, blocks already in their node's CPU tier.
    pub hit_blocks: u64,
    /// Distinct bytes the admitted requests need.
    pub unique_bytes: u64,
    /// Bytes read on purpose between runs, to merge them.
    pub gap_bytes: u64,
    /// Bytes in the plan's operations.
    pub planned_bytes: u64,
    /// Bytes deferred to the next window.
    pub deferred_bytes: u64,
    /// Bytes dropped for good.
    pub dropped_bytes: u64,
    /// Operations in the plan.
    pub ops: u64,
    /// Bytes the stores copied (0 when only planned).
    pub executed_bytes: u64,
    /// Pages checked byte for byte after the copies.
    pub verified_pages: u64,
    /// Pages the stores evicted from CPU memory, as the plan said.
    pub evicted_pages: u64,
}

/// A whole run of the stage under one placement.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunFigures {
    /// `cohorts` or `round-robin`.
    pub placement: &'static str,
    /// Requests placed.
    pub requests: u64,
    /// Requests placed by a cohort.
    pub placed_by_cohort: u64,
    /// Blocks placed per node.
    pub node_blocks: Vec<u64>,
    /// Per window.
    pub windows: Vec<WindowFigures>,
    /// Sums over the windows; its `window` is the number of windows.
    pub total: WindowFigures,
}

impl RunFigures {
    /// Share of the blocks requested that were already in CPU memory.
    pub fn hit_rate(&self) -> f64 {
        self.total.hit_blocks as f64 / self.total.blocks.max(1) as f64
    }
}

/// What the stage did.
#[derive(Debug, Serialize)]
pub struct KvOutcome {
    /// The run with cohort placement, executed by the stores.
    pub executed: RunFigures,
    /// The same windows with round-robin placement, planned only.
    pub round_robin: RunFigures,
    /// Bytes of one copy of every distinct block the requests read: what
    /// one node holding everything would move, the least any placement can.
    pub floor_bytes: u64,
    /// Page hits from the stores fed to the planner.
    pub hits_fed_back: u64,
    /// Execution wall time summed over windows and nodes, ns.
    pub exec_ns: u64,
    /// Where the files are.
    pub dir: PathBuf,
    /// Contract files written (cluster plans and node shares).
    pub plans: Vec<PathBuf>,
}

/// A node's store: a memory tier (`cpu`) over a disk tier (`ssd`).
struct NodeStore {
    name: &'static str,
    engine: StorageEngine,
    options: stratacache::ExecOptions,
}

impl NodeStore {
    fn open(dir: &Path, name: &'static str, cluster: &Cluster) -> Result<NodeStore> {
        let mut memory = TierConfig::new(TierKind::Memory);
        memory.name = Some("cpu".into());
        memory.capacity = Some(ByteSize(cluster.cpu_bytes));
        // One lock shard: a sharded tier splits its capacity per shard, and
        // a shard filling before the whole would drop pages on its own,
        // while the planner sees (and evicts against) the whole capacity.
        memory.shards = Some(1);
        let mut disk = TierConfig::new(TierKind::Disk);
        disk.name = Some("ssd".into());
        disk.path = Some(dir.join(name).join("ssd"));
        disk.capacity = Some(ByteSize(SSD_BYTES));
        let mut config = Config {
            tiers: vec![memory, disk],
            ..Config::default()
        };
        config.exec.node = name.into();
        config.exec.streams = 2;
        let engine = config
            .open()
            .with_context(|| format!("opening {name}'s store"))?;
        Ok(NodeStore {
            name,
            engine,
            options: config.exec,
        })
    }
}

/// Runs the stage on [`Cluster::DEFAULT`]: reads the trace and the
/// WaveSpec, writes under `dir`.
pub fn kv_stage(dir: &Path, trace: &Path, wave_spec: &Path) -> Result<KvOutcome> {
    kv_stage_on(dir, trace, wave_spec, &Cluster::DEFAULT)
}

/// [`kv_stage`] on `cluster`.
pub fn kv_stage_on(
    dir: &Path,
    trace: &Path,
    wave_spec: &Path,
    cluster: &Cluster,
) -> Result<KvOutcome> {
    ensure!(
        cluster.window_ns > 0,
        "the planning window must be longer than 0 ns"
    );
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = crate::bwrt_cmd::read_wave_spec(wave_spec)?;
    let mut trace = Trace::read(trace, false)?;
    let start = trace.requests.first().map_or(0, |r| r.arrival_ns);
    trace
        .requests
        .retain(|r| r.arrival_ns.saturating_sub(start) < SPAN_NS);
    trace.requests.truncate(MAX_REQUESTS);
    ensure!(
        !trace.requests.is_empty(),
        "the trace has no requests for the KV stage"
    );

    let stores: Vec<NodeStore> = NODES
        .iter()
        .map(|n| NodeStore::open(dir, n, cluster))
        .collect::<Result<_>>()?;
    let mut outcome = KvOutcome {
        executed: RunFigures::default(),
        round_robin: RunFigures::default(),
        floor_bytes: trace.block_stats().0 as u64 * PAGE_BYTES,
        hits_fed_back: 0,
        exec_ns: 0,
        dir: dir.to_owned(),
        plans: Vec::new(),
    };
    let executed = run(
        &trace,
        start,
        Router::new(Placement::Cohorts, &spec),
        Some((&stores, dir)),
        cluster,
        &mut outcome,
    );
    for s in &stores {
        s.engine
            .close()
            .with_context(|| format!("closing {}'s store", s.name))?;
    }
    outcome.executed = executed?;
    outcome.round_robin = run(
        &trace,
        start,
        Router::new(Placement::RoundRobin, &spec),
        None,
        cluster,
        &mut outcome,
    )?;
    Ok(outcome)
}

/// One run over the windows. With `stores`, each window's plan is written
/// under the directory, executed, checked and fed back; without, the plan's
/// copies are taken as done.
fn run(
    trace: &Trace,
    start: u64,
    mut router: Router,
    stores: Option<(&[NodeStore], &Path)>,
    cluster: &Cluster,
    outcome: &mut KvOutcome,
) -> Result<RunFigures> {
    let window_ns = cluster.window_ns;
    let mut config = bcache::config::Config::default().planner;
    // The stores hold pages as objects, not as one byte range: reading
    // the unrequested pages between two runs would read nothing useful.
    config.max_gap_pages = 0;
    let mut planner = bcache::Planner::new(config);
    let mut resident: Vec<HashSet<u64>> = vec![HashSet::new(); NODES.len()];
    let mut carry: Vec<bcache::planner::Unplanned> = Vec::new();
    let mut figures = RunFigures {
        placement: match router.placement {
            Placement::Cohorts => "cohorts",
            Placement::RoundRobin => "round-robin",
        },
        ..RunFigures::default()
    };
    let mut next = 0usize;
    let mut window = 0u64;
    while next < trace.requests.len() || !carry.is_empty() {
        let last_arrival_window = trace
            .requests
            .last()
            .map_or(0, |r| (r.arrival_ns - start) / window_ns);
        if window > last_arrival_window + MAX_DRAIN_WINDOWS {
            let left: u64 = carry.iter().map(|u| u.bytes).sum();
            bail!(
                "{left} bytes were still deferred {MAX_DRAIN_WINDOWS} windows after the last arrival"
            );
        }
        let now = window * window_ns;
        let mut w = WindowFigures {
            window,
            carried_runs: carry.len() as u64,
            ..WindowFigures::default()
        };
        let mut requests = Vec::new();
        while let Some(r) = trace.requests.get(next) {
            let arrival = r.arrival_ns - start;
            if arrival >= now + window_ns {
                break;
            }
            let node = router.place(&r.blocks);
            let mut seen = HashSet::new();
            let distinct: Vec<u64> = r
                .blocks
                .iter()
                .copied()
                .filter(|b| seen.insert(*b))
                .collect();
            let missing: Vec<u64> = distinct
                .iter()
                .copied()
                .filter(|b| !resident[node].contains(b))
                .collect();
            w.arrivals += 1;
            w.blocks += distinct.len() as u64;
            w.hit_blocks += (distinct.len() - missing.len()) as u64;
            if !missing.is_empty() {
                requests.push(request(format!("r{next}"), node, missing, arrival));
            }
            next += 1;
        }
        for (i, u) in carry.drain(..).enumerate() {
            let node = NODES
                .iter()
                .position(|n| **n == *u.node)
                .with_context(|| format!("a deferred run names an unknown node {}", u.node))?;
            let pages = (u.page..u.page + u.count.max(1)).collect();
            requests.push(request(format!("carry{window}-{i}"), node, pages, now));
        }
        let input = WindowInput {
            window_index: window,
            now_ns: now,
            window_ns,
            nodes: NODES
                .iter()
                .enumerate()
                .map(|(n, name)| node_state(name, &resident[n], cluster))
                .collect(),
            tenants: Vec::new(),
            layer_latency_ns: Vec::new(),
            requests,
        };
        let (plan, report) = planner.plan(&input)?;
        account(&mut w, &plan, &report)?;
        carry = report
            .unplanned
            .iter()
            .filter(|u| !u.reason.is_drop())
            .cloned()
            .collect();

        match stores {
            Some((stores, dir)) => {
                let here = dir.join(format!("w{window:03}"));
                std::fs::create_dir_all(&here)
                    .with_context(|| format!("creating {}", here.display()))?;
                write_json(&here.join("input.json"), &input)?;
                write_json(&here.join("report.json"), &report)?;
                let doc = Document::CachePlan(plan.clone());
                let plan_path = here.join("cache_plan.json");
                doc.write(&plan_path, Format::Json)?;
                read_back(&plan_path, &doc)?;
                outcome.plans.push(plan_path);
                for (n, store) in stores.iter().enumerate() {
                    let share_path = here.join(format!("{}.cache_plan.json", store.name));
                    Document::CachePlan(plan.for_node(store.name))
                        .write(&share_path, Format::Json)?;
                    outcome.plans.push(share_path.clone());
                    let done = execute(store, &share_path, &here, &mut w, &mut resident[n])?;
                    outcome.exec_ns += done.elapsed_ns;
                    let hits: Vec<(u32, u64, f64)> = done
                        .hits
                        .iter()
                        .map(|h| (h.layer, h.page, h.hits))
                        .collect();
                    outcome.hits_fed_back += hits.len() as u64;
                    planner.observe_hits(&hits, now);
                }
                ensure!(
                    w.executed_bytes == w.planned_bytes,
                    "window {window}: the stores copied {} bytes of the {} planned",
                    w.executed_bytes,
                    w.planned_bytes
                );
            }
            None => {
                for (n, name) in NODES.iter().enumerate() {
                    settle(&mut resident[n], &plan.for_node(name));
                }
            }
        }
        add(&mut figures.total, &w);
        figures.windows.push(w);
        window += 1;
    }
    figures.requests = router.placed;
    figures.placed_by_cohort = router.by_cohort;
    figures.node_blocks = router.load;
    Ok(figures)
}

/// A request of the window for `pages` of node `node`, arriving at
/// `arrival` (ns on the window clock).
fn request(id: String, node: usize, pages: Vec<u64>, arrival: u64) -> Request {
    Request {
        id,
        node: NODES[node].into(),
        tenant: "default".into(),
        pages,
        layers: [0, 1],
        src: Tier::Ssd,
        dst: Tier::Cpu,
        deadline_ns: arrival + TTFT_BUDGET_NS,
        page_bytes: PAGE_BYTES,
        est_fill_ns: 0,
        tensor: POOL.into(),
        tokens: Vec::new(),
    }
}

/// A node as the planner sees it: its CPU tier holding `resident`, its SSD
/// tier holding every page.
fn node_state(name: &str, resident: &HashSet<u64>, cluster: &Cluster) -> Node {
    let used = resident.len() as u64 * PAGE_BYTES;
    let mut pages: Vec<u64> = resident.iter().copied().collect();
    pages.sort_unstable();
    let cap = cluster.cpu_bytes;
    let mut cpu = TierState::new(Tier::Cpu, cap, cap.saturating_sub(used), CPU_BW);
    cpu.resident = pages
        .into_iter()
        .map(|page| ResidentPage {
            page,
            layer: 0,
            bytes: PAGE_BYTES,
            pinned: false,
            tensor: POOL.into(),
        })
        .collect();
    Node {
        name: name.into(),
        tiers: vec![
            cpu,
            TierState::new(Tier::Ssd, SSD_BYTES, SSD_BYTES, cluster.ssd_bw),
        ],
    }
}

/// Fills the planner's figures into `w` and checks the bytes add up.
fn account(w: &mut WindowFigures, plan: &CachePlan, report: &Report) -> Result<()> {
    w.unique_bytes = report.unique_bytes;
    w.gap_bytes = report.gap_bytes;
    w.planned_bytes = report.planned_bytes;
    w.deferred_bytes = report.deferred_bytes;
    w.dropped_bytes = report.dropped_bytes;
    w.ops = report.ops;
    let in_ops: u64 = plan.ops.iter().map(|o| o.length).sum();
    ensure!(
        in_ops == report.planned_bytes,
        "window {}: the plan's operations hold {in_ops} bytes, its report says {}",
        w.window,
        report.planned_bytes
    );
    ensure!(
        w.unique_bytes + w.gap_bytes == w.planned_bytes + w.deferred_bytes + w.dropped_bytes,
        "window {}: needed {} + gaps {} != planned {} + deferred {} + dropped {}",
        w.window,
        w.unique_bytes,
        w.gap_bytes,
        w.planned_bytes,
        w.deferred_bytes,
        w.dropped_bytes
    );
    Ok(())
}

/// Executes one node's share from its file, writes the report next to it,
/// reads it back, checks every copied page and records what is now resident.
fn execute(
    store: &NodeStore,
    share_path: &Path,
    dir: &Path,
    w: &mut WindowFigures,
    resident: &mut HashSet<u64>,
) -> Result<ExecReport> {
    let share = crate::strata::read_plan(share_path)?;
    crate::strata::fill_sources(&store.engine, &share, &store.options)?;
    store.engine.flush()?;
    let report = stratacache::execute(&store.engine, &share, &store.options)
        .with_context(|| format!("executing {}", share_path.display()))?;
    let report_path = dir.join(format!("{}.exec_report.json", store.name));
    write_json(&report_path, &report)?;
    let text = std::fs::read_to_string(&report_path)
        .with_context(|| format!("reading {}", report_path.display()))?;
    let report: ExecReport = serde_json::from_str(&text)
        .with_context(|| format!("reading {}", report_path.display()))?;
    if report.failed_ops > 0 {
        let why = report.ops.iter().find_map(|o| match &o.status {
            OpStatus::Failed { reason } => Some(reason.clone()),
            _ => None,
        });
        bail!(
            "{}: {} operations failed, the first because {}",
            report_path.display(),
            report.failed_ops,
            why.unwrap_or_default()
        );
    }
    let cpu = store.engine.tier_index("cpu")?;
    for op in &share.ops {
        let pages: u64 = op.kv_refs.iter().map(|r| r.count.max(1)).sum();
        let page_bytes = (op.length / pages.max(1)) as usize;
        for r in &op.kv_refs {
            for (layer, page, key) in store.options.keys.ref_keys(r) {
                let got = store.engine.load(&key, Access::Exact(cpu))?;
                if *got.object.bytes != *crate::strata::page_pattern(layer, page, page_bytes) {
                    bail!(
                        "{}: page {page} of layer {layer} arrived with the wrong bytes",
                        store.name
                    );
                }
                w.verified_pages += 1;
            }
        }
    }
    // The planner evicts only pages it was told are resident, so the store
    // must find every one: a miss means the two views of the tier differ.
    let planned_evictions: u64 = share.evict.iter().map(|r| r.count.max(1)).sum();
    ensure!(
        report.evicted_pages == planned_evictions && report.page_failures.is_empty(),
        "{}: the store evicted {} of the {planned_evictions} pages the plan evicts{}",
        report_path.display(),
        report.evicted_pages,
        report
            .page_failures
            .first()
            .map(|f| format!(" ({f})"))
            .unwrap_or_default()
    );
    settle(resident, &share);
    w.evicted_pages += report.evicted_pages;
    w.executed_bytes += report.done_bytes;
    Ok(report)
}

/// A node's CPU-tier pages after its share ran: the copies arrive, the
/// evictions leave.
fn settle(resident: &mut HashSet<u64>, share: &CachePlan) {
    for r in share.ops.iter().flat_map(|o| &o.kv_refs) {
        resident.extend(r.page..r.page + r.count.max(1));
    }
    for r in share.evict.iter().filter(|r| r.location.ends_with("/cpu")) {
        for page in r.page..r.page + r.count.max(1) {
            resident.remove(&page);
        }
    }
}

/// Adds a window's figures into the running total.
fn add(total: &mut WindowFigures, w: &WindowFigures) {
    total.window = w.window + 1;
    total.arrivals += w.arrivals;
    total.carried_runs += w.carried_runs;
    total.blocks += w.blocks;
    total.hit_blocks += w.hit_blocks;
    total.unique_bytes += w.unique_bytes;
    total.gap_bytes += w.gap_bytes;
    total.planned_bytes += w.planned_bytes;
    total.deferred_bytes += w.deferred_bytes;
    total.dropped_bytes += w.dropped_bytes;
    total.ops += w.ops;
    total.executed_bytes += w.executed_bytes;
    total.verified_pages += w.verified_pages;
    total.evicted_pages += w.evicted_pages;
}

/// Writes `value` as pretty JSON, atomically.
fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    bstack_plan::write_atomic(path, &serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bstack_plan::Format;

    /// 40 requests over 20 s, 20 new blocks each after a shared first one,
    /// as a Mooncake trace file; and a WaveSpec without cohorts.
    fn inputs(dir: &Path) -> (PathBuf, PathBuf) {
        let mut text = String::new();
        for i in 0..40u64 {
            let ids: Vec<u64> = std::iter::once(0)
                .chain((0..20).map(|b| 1 + i * 20 + b))
                .collect();
            text.push_str(
                &serde_json::json!({
                    "timestamp": i * 500, "input_length": 21 * 512,
                    "output_length": 10, "hash_ids": ids,
                })
                .to_string(),
            );
            text.push('\n');
        }
        let trace = dir.join("trace.jsonl");
        std::fs::write(&trace, text).unwrap_or_else(|e| panic!("{e}"));
        let mut spec = bstack_plan::example::wave_spec();
        spec.cohorts.clear();
        let spec_path = dir.join("wave_spec.json");
        Document::WaveSpec(spec)
            .write(&spec_path, Format::Json)
            .unwrap_or_else(|e| panic!("{e}"));
        (trace, spec_path)
    }

    /// An SSD link too slow for one window's demand: the planner defers,
    /// the next windows ask for the deferred runs again, and the stores end
    /// up holding every page, each window's bytes adding up.
    #[test]
    fn deferred_runs_carry_over_until_every_page_is_moved() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (trace, spec) = inputs(dir.path());
        // 1 s windows at 0.5 MB/s per node, against about 0.69 MB of new
        // pages a second per node for 20 s: every window defers some, and
        // the backlog drains in the windows after the last arrival.
        let cluster = Cluster {
            window_ns: 1_000_000_000,
            cpu_bytes: 1 << 30,
            ssd_bw: 500_000,
        };
        let out = kv_stage_on(&dir.path().join("kv"), &trace, &spec, &cluster)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let run = &out.executed;
        let deferred: Vec<&WindowFigures> = run
            .windows
            .iter()
            .filter(|w| w.deferred_bytes > 0)
            .collect();
        assert!(
            !deferred.is_empty(),
            "nothing was deferred: {:?}",
            run.windows
        );
        assert!(
            run.windows
                .iter()
                .any(|w| w.carried_runs > 0 && w.arrivals == 0),
            "no drain window after the last arrival: {:?}",
            run.windows
        );
        for w in &run.windows {
            assert_eq!(
                w.unique_bytes + w.gap_bytes,
                w.planned_bytes + w.deferred_bytes + w.dropped_bytes,
                "window {}",
                w.window
            );
            assert_eq!(w.executed_bytes, w.planned_bytes, "window {}", w.window);
        }
        // Every distinct block ended up in its node's CPU tier exactly
        // once: the pages copied are the blocks placed, per node.
        let t = &run.total;
        assert_eq!(t.dropped_bytes, 0);
        assert_eq!(t.executed_bytes, t.verified_pages * PAGE_BYTES);
        // 800 blocks of their own plus the shared block 0 on each node
        // that served a request.
        let nodes_used = run.node_blocks.iter().filter(|b| **b > 0).count() as u64;
        assert_eq!(t.verified_pages, 800 + nodes_used);
        assert_eq!(
            t.unique_bytes - t.deferred_bytes,
            t.executed_bytes,
            "each deferred byte was asked for again and moved once"
        );
    }

    /// CPU tiers of 2 MiB against 13 MiB of pages per node: the planner
    /// evicts, and each store evicts exactly the pages its share names
    /// (the stage fails otherwise), so the copies always have room.
    #[test]
    fn evictions_the_planner_makes_are_the_ones_the_stores_make() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (trace, spec) = inputs(dir.path());
        let cluster = Cluster {
            window_ns: 1_000_000_000,
            cpu_bytes: 2 << 20,
            ssd_bw: 2_000_000_000,
        };
        let out = kv_stage_on(&dir.path().join("kv"), &trace, &spec, &cluster)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let t = &out.executed.total;
        assert!(t.evicted_pages > 0, "{t:?}");
        assert_eq!(t.executed_bytes, t.planned_bytes);
        assert_eq!(t.dropped_bytes, 0);
    }
}
