//! The `CachePlan` executor: bcache plans, stratacache moves the bytes.
//!
//! A [`bstack_plan::CachePlan`] lists copies between tiers
//! (`tier://node0/ssd` to `tier://node0/cpu`, each carrying KV pages), and
//! pages to admit into and evict from tiers. [`execute`] carries it out on a
//! [`StorageEngine`]:
//!
//! 1. **Addresses to tiers.** A plan names tiers by kind (`gpu`, `cpu`,
//!    `dax`, `ssd`, `remote`, optionally numbered); [`ExecOptions::tier_map`]
//!    maps each to one of the engine's tiers (by default a tier whose name
//!    is the kind's). An address that maps to nothing, or names another node
//!    than [`ExecOptions::node`], fails its operation with the reason; a
//!    `file://`, `device://` or `tcp://` address is not the store's to move
//!    and fails likewise.
//! 2. **Pages to keys.** Each page of a [`bstack_plan::KvPageRef`] is one
//!    object, keyed by [`KeySpace::page_key`] (model, KV dtype, tensor
//!    parallelism and rank from the options; the pool, layer and page from
//!    the plan). An operation's `length` is split evenly over its pages.
//! 3. **Order and streams.** Operations run on `streams` threads, best
//!    first: higher `priority`, then earlier `deadline_ns`, then plan order.
//!    An operation with `stream_hint` N > 0 runs on stream (N - 1) mod
//!    `streams`, so the planner's per-layer streams stay ordered; the others
//!    go to whichever stream is free.
//! 4. **Time.** The plan's clock starts at `window.start_ns` when execution
//!    starts; an operation that finishes after its deadline is *late*, by how
//!    much is reported. Late operations still complete: the bytes are still
//!    wanted.
//! 5. **Evict, copy, admit, evict.** Pages in `evict` are removed from
//!    their `location` tier only (a dirty page is flushed below first, never
//!    dropped). Those the plan neither copies nor admits go before the
//!    copies: that is the room the copies need. After the copies, pages
//!    listed in `admit` are copied into their `location` tier from the
//!    highest other tier that holds them, and then the remaining evictions
//!    (moves: a page copied out of a tier and dropped from it) run.
//!
//! The [`ExecReport`] gives, per operation, what happened (done, late by how
//! much, or failed and why), the bytes and the bandwidth achieved, and
//! [`ExecReport::hits`]: one hit per page served from its source tier, in
//! the `(layer, page, hits)` shape of the bcache planner's `Report` call
//! (`Planner::observe_hits`), so the planner learns from what was executed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use bstack_plan::{Address, CachePlan, KvPageRef, TransferOp, Validate};
use serde::{Deserialize, Serialize};

use crate::engine::{Access, StorageEngine};
use crate::key::{ArtifactKey, KvChunkKey, Layers};
use crate::sync::lock;
use crate::{Error, Result};

/// How KV pages of a plan become store keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeySpace {
    /// Model name.
    pub model: String,
    /// KV element type.
    pub kv_dtype: String,
    /// Tensor-parallel size.
    pub tp_size: u32,
    /// This executor's tensor-parallel rank.
    pub rank: u32,
}

impl Default for KeySpace {
    fn default() -> KeySpace {
        KeySpace {
            model: "default".into(),
            kv_dtype: "bf16".into(),
            tp_size: 1,
            rank: 0,
        }
    }
}

impl KeySpace {
    /// The key of page `page` of layer `layer` in KV pool `tensor`. The
    /// pool joins the model name (`model/pool`), so two pools never share
    /// a key; the page id is the chunk's prefix hash, big-endian.
    pub fn page_key(&self, tensor: &str, layer: u32, page: u64) -> ArtifactKey {
        ArtifactKey::KvChunk(KvChunkKey {
            model: if tensor.is_empty() {
                self.model.clone()
            } else {
                format!("{}/{tensor}", self.model)
            },
            adapter: None,
            kv_dtype: self.kv_dtype.clone(),
            tp_size: self.tp_size,
            rank: self.rank,
            prefix_hash: page.to_be_bytes().to_vec(),
            layers: Layers::One(layer),
        })
    }

    /// Every page key of a page reference, in page order.
    pub fn ref_keys(&self, r: &KvPageRef) -> impl Iterator<Item = (u32, u64, ArtifactKey)> + '_ {
        let (tensor, layer, first) = (r.tensor.clone(), r.layer, r.page);
        (0..r.count.max(1)).map(move |i| {
            let page = first.saturating_add(i);
            (layer, page, self.page_key(&tensor, layer, page))
        })
    }
}

/// How to execute plans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecOptions {
    /// Parallel copy streams (threads), at least 1.
    pub streams: usize,
    /// Plan tier (`cpu`, `ssd`, `gpu1`...) to engine tier name. A plan tier
    /// missing here maps to the engine tier of the same name, if any.
    pub tier_map: BTreeMap<String, String>,
    /// The node this store serves; operations on other nodes fail. Empty:
    /// any node.
    pub node: String,
    /// How pages become keys.
    pub keys: KeySpace,
}

impl Default for ExecOptions {
    fn default() -> ExecOptions {
        ExecOptions {
            streams: 4,
            tier_map: BTreeMap::new(),
            node: String::new(),
            keys: KeySpace::default(),
        }
    }
}

/// What became of one operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum OpStatus {
    /// Done by its deadline (or it had none).
    Done,
    /// Done after its deadline.
    Late {
        /// How late, ns.
        by_ns: u64,
    },
    /// Not done.
    Failed {
        /// Why, naming the address, tier or pages at fault.
        reason: String,
    },
}

/// One operation's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpReport {
    /// Position in the plan's `ops`.
    pub index: usize,
    /// Source address, as in the plan.
    pub src: String,
    /// Destination address, as in the plan.
    pub dst: String,
    /// Pages carried.
    pub pages: u64,
    /// Bytes the plan asked for.
    pub planned_bytes: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Stream that ran it.
    pub stream: usize,
    /// Start, ns after execution began.
    pub started_ns: u64,
    /// End, ns after execution began.
    pub finished_ns: u64,
    /// Bytes per second over the operation's own time.
    pub bandwidth_bps: f64,
    /// Outcome.
    #[serde(flatten)]
    pub status: OpStatus,
}

/// Hits on one page, in the shape of the bcache planner's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageHit {
    /// Layer.
    pub layer: u32,
    /// Page id.
    pub page: u64,
    /// Reads served from the cache.
    pub hits: f64,
}

/// What executing one plan did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecReport {
    /// The plan's id.
    pub plan_id: String,
    /// Streams used.
    pub streams: usize,
    /// Per operation, in plan order.
    pub ops: Vec<OpReport>,
    /// Bytes in the plan's operations.
    pub planned_bytes: u64,
    /// Bytes copied.
    pub done_bytes: u64,
    /// Bytes of operations that failed.
    pub failed_bytes: u64,
    /// Operations done late.
    pub late_ops: u64,
    /// Operations that failed.
    pub failed_ops: u64,
    /// The largest lateness, ns.
    pub max_late_ns: u64,
    /// Wall time of the whole execution, ns.
    pub elapsed_ns: u64,
    /// Bytes copied per second of wall time.
    pub bandwidth_bps: f64,
    /// Pages admitted into their `location` tier.
    pub admitted_pages: u64,
    /// Pages evicted from their `location` tier.
    pub evicted_pages: u64,
    /// Admissions and evictions that failed, with reasons.
    pub page_failures: Vec<String>,
    /// Pages served from their source tier, for the planner's heat.
    pub hits: Vec<PageHit>,
}

/// Executes `plan` on `engine`. Fails only when the plan does not
/// validate or the options are unusable; everything that goes wrong with
/// one operation is reported in it.
pub fn execute(
    engine: &StorageEngine,
    plan: &CachePlan,
    options: &ExecOptions,
) -> Result<ExecReport> {
    execute_with(engine, plan, options, &|_| {})
}

/// [`execute`], calling `progress` after each operation (from the stream
/// that ran it).
pub fn execute_with(
    engine: &StorageEngine,
    plan: &CachePlan,
    options: &ExecOptions,
    progress: &(dyn Fn(&OpReport) + Sync),
) -> Result<ExecReport> {
    if let Err(problems) = plan.validate() {
        return Err(Error::Plan {
            plan: plan.plan_id.clone(),
            message: problems.to_string(),
        });
    }
    // More streams than operations (or than any machine runs threads)
    // would only idle.
    let streams = options
        .streams
        .clamp(1, MAX_STREAMS)
        .min(plan.ops.len().max(1));
    let origin = plan.window.as_ref().map_or(0, |w| w.start_ns);
    let resolver = Resolver { engine, options };

    // Best first: priority, then deadline (none = last), then plan order.
    let mut order: Vec<usize> = (0..plan.ops.len()).collect();
    order.sort_by_key(|&i| {
        let op = &plan.ops[i];
        let deadline = if op.deadline_ns == 0 {
            u64::MAX
        } else {
            op.deadline_ns
        };
        (std::cmp::Reverse(op.priority), deadline, i)
    });
    // Position in the best-first order, to pick between two queues.
    let mut rank = vec![0; plan.ops.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    let mut queues = Queues {
        shared: VecDeque::new(),
        pinned: vec![VecDeque::new(); streams],
    };
    for i in order {
        match plan.ops[i].stream_hint {
            0 => queues.shared.push_back(i),
            h => queues.pinned[(h as usize - 1) % streams].push_back(i),
        }
    }
    let queues = Mutex::new(queues);
    // Evictions of pages the plan does not otherwise touch run first: they
    // make the room the copies need, so a tier filled to its capacity is
    // not made to drop pages of its own choosing mid-copy. Evicting a page
    // the plan copies or admits (a move) waits until that is done.
    let touched: std::collections::HashSet<(&str, u32, u64)> = plan
        .ops
        .iter()
        .flat_map(|o| &o.kv_refs)
        .chain(&plan.admit)
        .flat_map(|r| {
            let first = r.page;
            (0..r.count.max(1)).map(move |i| (r.tensor.as_str(), r.layer, first.saturating_add(i)))
        })
        .collect();
    let (early, late): (Vec<&KvPageRef>, Vec<&KvPageRef>) = plan.evict.iter().partition(|r| {
        (0..r.count.max(1))
            .all(|i| !touched.contains(&(r.tensor.as_str(), r.layer, r.page.saturating_add(i))))
    });
    let evict = |refs: &[&KvPageRef]| {
        let mut evicted = 0;
        let mut failures = Vec::new();
        for r in refs {
            match resolver.evict(r) {
                Ok(n) => evicted += n,
                Err(e) => failures.push(format!("evict {}: {e}", describe(r))),
            }
        }
        (evicted, failures)
    };
    let (evicted_early, failures_early) = evict(&early);

    let start = Instant::now();
    let results: Mutex<Vec<Option<Ran>>> = Mutex::new(vec![None; plan.ops.len()]);
    std::thread::scope(|scope| {
        for stream in 0..streams {
            let (queues, results, rank, resolver) = (&queues, &results, &rank, &resolver);
            scope.spawn(move || {
                while let Some(i) = lock(queues).next(stream, rank) {
                    let op = &plan.ops[i];
                    let started = start.elapsed().as_nanos() as u64;
                    let outcome = resolver.run(op);
                    let finished = start.elapsed().as_nanos() as u64;
                    let Moved {
                        bytes,
                        hits,
                        failure,
                    } = outcome;
                    let status = match failure {
                        Some(reason) => OpStatus::Failed { reason },
                        None => {
                            // On the plan's clock, which reads `origin` when
                            // execution starts. A deadline before the window
                            // (a request already late when planned) counts
                            // from where it was, not from the window.
                            let now_on_plan = u128::from(origin) + u128::from(finished);
                            let late = now_on_plan.saturating_sub(u128::from(op.deadline_ns));
                            if op.deadline_ns != 0 && late > 0 {
                                OpStatus::Late {
                                    by_ns: u64::try_from(late).unwrap_or(u64::MAX),
                                }
                            } else {
                                OpStatus::Done
                            }
                        }
                    };
                    let took = finished.saturating_sub(started).max(1);
                    let report = OpReport {
                        index: i,
                        src: op.src.clone(),
                        dst: op.dst.clone(),
                        pages: page_count(op).unwrap_or(u64::MAX),
                        planned_bytes: op.length,
                        bytes,
                        stream,
                        started_ns: started,
                        finished_ns: finished,
                        bandwidth_bps: bytes as f64 / (took as f64 / 1e9),
                        status,
                    };
                    progress(&report);
                    lock(results)[i] = Some((report, hits));
                }
            });
        }
    });
    let elapsed = start.elapsed().as_nanos() as u64;

    let mut report = ExecReport {
        plan_id: plan.plan_id.clone(),
        streams,
        elapsed_ns: elapsed,
        ..ExecReport::default()
    };
    let mut hits: BTreeMap<(u32, u64), f64> = BTreeMap::new();
    let results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (op_report, op_hits) in results.into_iter().flatten() {
        report.planned_bytes += op_report.planned_bytes;
        report.done_bytes += op_report.bytes;
        match op_report.status {
            OpStatus::Done => {}
            OpStatus::Late { by_ns } => {
                report.late_ops += 1;
                report.max_late_ns = report.max_late_ns.max(by_ns);
            }
            OpStatus::Failed { .. } => {
                report.failed_ops += 1;
                report.failed_bytes += op_report.planned_bytes.saturating_sub(op_report.bytes);
            }
        }
        for (layer, page) in op_hits {
            *hits.entry((layer, page)).or_default() += 1.0;
        }
        report.ops.push(op_report);
    }
    report.bandwidth_bps = report.done_bytes as f64 / (elapsed.max(1) as f64 / 1e9);
    report.hits = hits
        .into_iter()
        .map(|((layer, page), hits)| PageHit { layer, page, hits })
        .collect();

    for r in &plan.admit {
        match resolver.admit(r) {
            Ok(n) => report.admitted_pages += n,
            Err(e) => report
                .page_failures
                .push(format!("admit {}: {e}", describe(r))),
        }
    }
    let (evicted_late, failures_late) = evict(&late);
    report.evicted_pages = evicted_early + evicted_late;
    report.page_failures.extend(failures_early);
    report.page_failures.extend(failures_late);
    Ok(report)
}

/// An operation's report and the `(layer, page)`s it served.
type Ran = (OpReport, Vec<(u32, u64)>);

/// Streams at most: more would only idle on any machine this runs on.
const MAX_STREAMS: usize = 1024;

/// Pages one operation may carry (a 64 MiB read of 4 KiB pages is 16,384).
const MAX_PAGES_PER_OP: u64 = 1 << 20;

/// What one operation moved, and why it stopped if it did.
#[derive(Debug, Default)]
struct Moved {
    bytes: u64,
    hits: Vec<(u32, u64)>,
    failure: Option<String>,
}

/// Pages an operation carries; `None` when the counts overflow.
fn page_count(op: &TransferOp) -> Option<u64> {
    op.kv_refs
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r.count.max(1)))
}

fn describe(r: &KvPageRef) -> String {
    let count = r.count.max(1);
    format!(
        "{}layer {} pages {}..{} at {}",
        if r.tensor.is_empty() {
            String::new()
        } else {
            format!("pool {} ", r.tensor)
        },
        r.layer,
        r.page,
        r.page.saturating_add(count),
        r.location
    )
}

struct Queues {
    shared: VecDeque<usize>,
    pinned: Vec<VecDeque<usize>>,
}

impl Queues {
    /// The better of this stream's next pinned operation and the next
    /// shared one.
    fn next(&mut self, stream: usize, rank: &[usize]) -> Option<usize> {
        let own = self.pinned.get(stream).and_then(|q| q.front()).copied();
        let shared = self.shared.front().copied();
        let r = |i: usize| rank.get(i).copied().unwrap_or(usize::MAX);
        match (own, shared) {
            (Some(a), Some(b)) if r(b) < r(a) => self.shared.pop_front(),
            (Some(_), _) => self.pinned.get_mut(stream).and_then(|q| q.pop_front()),
            (None, Some(_)) => self.shared.pop_front(),
            (None, None) => None,
        }
    }
}

struct Resolver<'a> {
    engine: &'a StorageEngine,
    options: &'a ExecOptions,
}

impl Resolver<'_> {
    /// The engine tier an address names.
    fn tier(&self, address: &str) -> std::result::Result<usize, String> {
        let parsed: Address = address.parse().map_err(|e| format!("{e}"))?;
        let Address::Tier { node, tier } = parsed else {
            return Err(format!(
                "{address}: the store moves bytes between tiers (tier://NODE/TIER); \
                 this address is not one of its tiers"
            ));
        };
        if !self.options.node.is_empty() && node != self.options.node {
            return Err(format!(
                "{address}: node {node} is not this store's node ({})",
                self.options.node
            ));
        }
        let plan_tier = tier.to_string();
        let name = self
            .options
            .tier_map
            .get(&plan_tier)
            .map_or(plan_tier.as_str(), String::as_str);
        self.engine.tier_index(name).map_err(|_| {
            format!(
                "{address}: no store tier for plan tier {plan_tier:?} (the store has {}); \
                 map it with tier_map",
                self.engine.tier_names().join(", ")
            )
        })
    }

    /// Copies an operation's pages. Pages copied before a failure still
    /// count (their bytes moved, their hits happened).
    fn run(&self, op: &TransferOp) -> Moved {
        let mut moved = Moved::default();
        if let Err(reason) = self.copy_pages(op, &mut moved) {
            moved.failure = Some(reason);
        }
        moved
    }

    fn copy_pages(&self, op: &TransferOp, moved: &mut Moved) -> std::result::Result<(), String> {
        let src = self.tier(&op.src)?;
        let dst = self.tier(&op.dst)?;
        if op.kv_refs.is_empty() {
            return Err("the operation carries no KV pages (kv_refs is empty)".into());
        }
        let pages = page_count(op)
            .filter(|&n| n <= MAX_PAGES_PER_OP)
            .ok_or_else(|| format!("more than {MAX_PAGES_PER_OP} pages in one operation"))?;
        if !op.length.is_multiple_of(pages) {
            return Err(format!(
                "length {} is not a whole number of bytes per page over {pages} pages; \
                 a plan that merges runs across unrequested pages (bcache with \
                 max_gap_pages > 0) reads bytes no page of a page store holds: plan \
                 for stratacache with max_gap_pages = 0",
                op.length
            ));
        }
        let page_bytes = op.length / pages;
        let mut missing = Vec::new();
        for r in &op.kv_refs {
            for (layer, page, key) in self.options.keys.ref_keys(r) {
                match self.engine.copy(&key, src, dst) {
                    Ok(Some(n)) if n == page_bytes => {
                        moved.bytes += n;
                        moved.hits.push((layer, page));
                    }
                    Ok(Some(n)) => {
                        return Err(format!(
                            "page {page} of layer {layer} is {n} bytes in {}, the plan says {page_bytes}",
                            op.src
                        ));
                    }
                    Ok(None) => missing.push(page),
                    Err(e) => return Err(format!("page {page} of layer {layer}: {e}")),
                }
            }
        }
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().take(8).map(u64::to_string).collect();
            return Err(format!(
                "{} of {pages} pages not in {} (pages {}{}); recompute them",
                missing.len(),
                op.src,
                shown.join(", "),
                if missing.len() > 8 { ", ..." } else { "" }
            ));
        }
        Ok(())
    }

    fn admit(&self, r: &KvPageRef) -> std::result::Result<u64, String> {
        let to = self.tier(&r.location)?;
        let fail = |layer: u32, page: u64, e: Error| format!("page {page} of layer {layer}: {e}");
        let mut n = 0;
        for (layer, page, key) in self.options.keys.ref_keys(r) {
            if self
                .engine
                .contains(&key, Access::Exact(to))
                .map_err(|e| fail(layer, page, e))?
            {
                n += 1;
                continue;
            }
            // From the highest other tier that holds it: the newest copy.
            let mut from = None;
            for t in (0..self.engine.tier_names().len()).filter(|&t| t != to) {
                if self
                    .engine
                    .contains(&key, Access::Exact(t))
                    .map_err(|e| fail(layer, page, e))?
                {
                    from = Some(t);
                    break;
                }
            }
            let Some(from) = from else {
                return Err(format!("page {page} of layer {layer} is in no other tier"));
            };
            match self.engine.copy(&key, from, to) {
                Ok(Some(_)) => n += 1,
                Ok(None) => return Err(format!("page {page} of layer {layer} vanished")),
                Err(e) => return Err(fail(layer, page, e)),
            }
        }
        Ok(n)
    }

    fn evict(&self, r: &KvPageRef) -> std::result::Result<u64, String> {
        let tier = self.tier(&r.location)?;
        let mut n = 0;
        for (layer, page, key) in self.options.keys.ref_keys(r) {
            match self.engine.evict(tier, &key) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => return Err(format!("page {page} of layer {layer}: {e}")),
            }
        }
        Ok(n)
    }
}
