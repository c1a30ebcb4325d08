//! The planner: one call plans one window.
//!
//! [`Planner::plan`] takes a [`WindowInput`] and returns a
//! [`bstack_plan::CachePlan`] plus a [`Report`]. The stages run in this order;
//! each one is a function of this module, documented where it is defined, and
//! each can be switched off in [`PlannerConfig`] to measure what it is worth:
//!
//! 1. **order** ([`order`]): slack = deadline - now - estimated copy time -
//!    estimated fill time; requests are taken least slack first (earliest
//!    deadline first). Requests already late are flagged, and still planned.
//!    **Route hints** (`route.rs`) follow: near-duplicate prompts (MinHash LSH
//!    on their tokens) or equal page prefixes form clusters, and each
//!    cluster of two or more gets the node holding most of its pages
//!    ([`Report::route_hints`]); advice only, the plan does not use it.
//! 2. **credits** ([`credits`]): each tenant has a token bucket (rate, burst,
//!    carried over between windows). A request is admitted when its bytes fit
//!    the tokens left, or when the bucket is full (so a request larger than
//!    the burst is not starved: the bucket goes into debt). Otherwise it is
//!    deferred, with the reason.
//! 3. **dedup and coalescing** ([`union`]): the admitted requests' pages become
//!    runs keyed by (node, source tier, destination tier, pool, layer); runs
//!    are sorted and merged with a running maximum, so no page is read twice
//!    however the intervals nest. `fanout` counts the requests a run serves.
//!    Runs separated by at most `max_gap_pages` are read as one when reading
//!    the gap costs less than a separate operation; runs above `max_io_bytes`
//!    are split; runs below `min_io_bytes` wait one window to be batched
//!    unless they are due within two windows. Nothing is silently dropped.
//! 4. **heat and score** ([`crate::heat`]): every demanded page gets one hit
//!    per request; popularity = alpha * heat + beta * tenant weight breaks
//!    ties between equal deadlines and ranks admission and eviction.
//! 5. **overlap**: with per-layer compute latency, layer `l`'s pages are
//!    needed only when compute reaches layer `l`, so each layer's deadline is
//!    the request's plus the latency of the layers before it; the prefetch
//!    depth per layer (how many layers ahead a copy must start) is
//!    copy time / layer latency, reported and used as the stream hint.
//! 6. **caps** ([`caps`]): per node and tier, the link's bandwidth times the
//!    window and the destination's free space (plus what eviction can free)
//!    bound what is issued; an operation is cut at the page where the budget
//!    ends and the rest deferred to the next window, with the reason.
//! 7. **admission**: pages fetched from a slow tier through an intermediate
//!    one (SSD to GPU through CPU) are also written to the intermediate tier
//!    once their heat reaches `admit_after_hits` (selective write-through).
//! 8. **eviction** ([`evict`]): per node and tier, when use with this window's
//!    fetches exceeds the high watermark, the coldest and cheapest pages are
//!    evicted down to the low watermark; never a pinned page, nor one this
//!    plan reads or admits.

mod caps;
mod credits;
mod evict;
mod order;
mod route;
mod union;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bstack_plan::{CachePlan, KvPageRef, PlanWindow, SCHEMA_VERSION, TransferOp};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

pub use credits::TokenBucket;

use crate::config::PlannerConfig;
use crate::heat::Heat;
use crate::model::{Tier, WindowInput};

/// Why work was not planned in this window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The tenant's token bucket had too few bytes left; deferred.
    TenantCredit,
    /// The source tier's link had no bandwidth left this window; deferred.
    Bandwidth,
    /// The destination tier had no free space left, even after eviction; deferred.
    Space,
    /// Smaller than `min_io_bytes` and not due soon: waits to be batched; deferred.
    SmallIo,
    /// Larger than the destination tier's whole capacity: can never be
    /// planned; dropped.
    ExceedsCapacity,
}

impl Reason {
    /// Whether the work is dropped for good (otherwise it is deferred to a
    /// later window).
    pub fn is_drop(self) -> bool {
        matches!(self, Reason::ExceedsCapacity)
    }

    /// Words for tables.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::TenantCredit => "tenant over its byte budget",
            Reason::Bandwidth => "link bandwidth of this window used up",
            Reason::Space => "no free space in the destination tier",
            Reason::SmallIo => "below min_io_bytes, waiting to batch",
            Reason::ExceedsCapacity => "larger than the destination tier",
        }
    }
}

/// A run of pages that this window did not plan (caps, batching, drops).
/// Whole requests deferred by tenant credit are listed apart, in
/// [`Report::credit_deferred`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unplanned {
    /// Why.
    pub reason: Reason,
    /// Node. Shared with the window's other runs on the node: a window can
    /// defer thousands of runs.
    pub node: Arc<str>,
    /// Source tier.
    pub src: Tier,
    /// Destination tier.
    pub dst: Tier,
    /// KV pool.
    pub tensor: Arc<str>,
    /// Layer.
    pub layer: u32,
    /// First page.
    pub page: u64,
    /// Pages.
    pub count: u64,
    /// Bytes not moved.
    pub bytes: u64,
}

/// One tenant's use of this window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantUse {
    /// Tenant.
    pub tenant: String,
    /// Bytes its requests asked for.
    pub demand_bytes: u64,
    /// Bytes admitted by its bucket.
    pub admitted_bytes: u64,
    /// Bytes deferred for lack of tokens.
    pub deferred_bytes: u64,
    /// Tokens left after this window (negative: in debt).
    pub tokens_left: f64,
}

/// What one window's planning did, for people and for the simulator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Window sequence number.
    pub window_index: u64,
    /// Requests in the input.
    pub requests: u64,
    /// Requests already past their deadline (still planned, first).
    pub late_requests: Vec<String>,
    /// Bytes the requests asked for, counting shared pages once per request.
    pub demand_bytes: u64,
    /// Distinct bytes among the admitted requests' pages.
    pub unique_bytes: u64,
    /// Bytes in issued operations, gaps read on purpose included.
    pub planned_bytes: u64,
    /// Unneeded bytes read to merge nearby runs.
    pub gap_bytes: u64,
    /// Operations issued.
    pub ops: u64,
    /// Bytes deferred to a later window.
    pub deferred_bytes: u64,
    /// Bytes dropped for good.
    pub dropped_bytes: u64,
    /// Deferred and dropped runs of pages, with reasons.
    pub unplanned: Vec<Unplanned>,
    /// Requests deferred whole because their tenant's bucket was short
    /// ([`Reason::TenantCredit`]), as positions in the input's `requests`,
    /// in planning order. Positions, not ids: a window can defer a million.
    pub credit_deferred: Vec<u32>,
    /// Per-tenant use.
    pub tenants: Vec<TenantUse>,
    /// Prefetch depth per layer (layers ahead of compute), when overlap is on.
    pub prefetch_depth: Vec<u32>,
    /// Bytes the plan evicts.
    pub evicted_bytes: u64,
    /// Bytes the plan writes through (admission).
    pub admitted_bytes: u64,
    /// Wall time of the planning call, ns.
    pub planning_ns: u64,
    /// One routing hint per prefix cluster of two or more requests, largest
    /// cluster first (ties by cluster id); empty when the `route_hints`
    /// stage is off.
    #[serde(default)]
    pub route_hints: Vec<RouteHint>,
}

/// A prefix cluster of the window (requests with nearly the same prompt, or
/// the same first pages) and the node a router should send such requests
/// to: the one that already holds most of the cluster's pages, so that they
/// are read from cache instead of moved or recomputed. The plan does not
/// depend on it; it is advice for whoever places requests on nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHint {
    /// Cluster id, unique within the window: clusters of requests with
    /// prompt tokens (MinHash LSH) are numbered first, then the exact
    /// page-prefix groups of requests without tokens.
    pub cluster: u32,
    /// The cluster's requests, as positions in the input's `requests`,
    /// ascending.
    pub requests: Vec<u32>,
    /// The suggested node: the one holding the most of the cluster's
    /// distinct pages in any tier (ties: the one serving most of the
    /// cluster's requests, then the first listed); when none holds any, the
    /// one serving most of its requests.
    pub node: Arc<str>,
    /// Distinct page ids of the cluster (any layer) resident on `node`, in
    /// any of its tiers.
    pub resident_pages: u64,
    /// Distinct nodes the cluster's requests are on now: above 1, routing
    /// them together would share their pages.
    pub nodes_now: u32,
}

/// What a planner remembers between windows, saved by `bstack bcache plan
/// --state FILE` so that successive calls share heat and tenant buckets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerState {
    /// Windows planned so far.
    pub windows: u64,
    /// Time of the last window planned, ns: when `heat` was taken.
    #[serde(default)]
    pub saved_ns: u64,
    /// Heat at `saved_ns`: (layer, page, decayed hits).
    pub heat: Vec<(u32, u64, f64)>,
    /// Tenant buckets by tenant name.
    pub buckets: std::collections::BTreeMap<String, TokenBucket>,
}

/// The planner: configuration plus what persists between windows (heat and
/// tenant buckets).
#[derive(Debug, Clone)]
pub struct Planner {
    config: PlannerConfig,
    heat: Heat,
    buckets: HashMap<String, TokenBucket>,
    windows: u64,
    last_now: u64,
}

/// A run of pages to move, as the stages pass it along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Packed (node, src, dst, tensor, layer); see [`GroupKey`].
    pub group: u64,
    /// First page.
    pub start: u64,
    /// One past the last page.
    pub end: u64,
    /// Earliest deadline among the requests served, ns.
    pub deadline: u64,
    /// Requests served.
    pub fanout: u32,
    /// A request it serves (the first in order), for notes.
    pub request: u32,
}

/// The fields packed into [`Run::group`]: 16 bits of node, 3 + 3 of tiers,
/// 10 of pool, 32 of layer. Sorting by the packed key groups runs by node,
/// then tiers, then pool, then layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupKey {
    pub node: u16,
    pub src: Tier,
    pub dst: Tier,
    pub tensor: u16,
    pub layer: u32,
}

pub(crate) const MAX_NODES: usize = 1 << 16;
pub(crate) const MAX_POOLS: usize = 1 << 10;

impl GroupKey {
    pub fn pack(self) -> u64 {
        (u64::from(self.node) << 48)
            | ((self.src.index() as u64) << 45)
            | ((self.dst.index() as u64) << 42)
            | (u64::from(self.tensor & 0x3ff) << 32)
            | u64::from(self.layer)
    }

    pub fn unpack(key: u64) -> GroupKey {
        GroupKey {
            node: (key >> 48) as u16,
            src: Tier::ALL[((key >> 45) & 7) as usize % Tier::ALL.len()],
            dst: Tier::ALL[((key >> 42) & 7) as usize % Tier::ALL.len()],
            tensor: ((key >> 32) & 0x3ff) as u16,
            layer: key as u32,
        }
    }
}

/// Per-window context the stages share: name tables and tier lookups.
pub(crate) struct Context<'a> {
    pub input: &'a WindowInput,
    pub config: &'a PlannerConfig,
    pub now: u64,
    pub window_ns: u64,
    /// Tier state index per (node, tier).
    pub tiers: Vec<[Option<usize>; Tier::ALL.len()]>,
    /// Copy time per byte out of each (node, tier), ns.
    pub ns_per_byte: Vec<[f64; Tier::ALL.len()]>,
    /// Pool names, indexed by pool id (filled by [`order::derive`]).
    pub pools: Vec<&'a str>,
    /// Pool names as the report shares them.
    pub pool_names: Vec<Arc<str>>,
    /// Node names as the report shares them, made on first use.
    pub node_names: Vec<OnceLock<Arc<str>>>,
    /// Page bytes per pool (filled by [`order::derive`]).
    pub page_bytes: Vec<u64>,
    /// Layer latency, ns.
    pub layer_latency: Vec<u64>,
}

impl Context<'_> {
    pub fn tier(&self, node: usize, tier: Tier) -> Option<&crate::model::TierState> {
        let t = self.tiers.get(node)?[tier.index()]?;
        self.input.nodes[node].tiers.get(t)
    }

    pub fn bandwidth(&self, node: usize, tier: Tier) -> u64 {
        self.tier(node, tier)
            .map_or(1, |t| t.bandwidth_bytes_per_s.max(1))
    }

    /// Copy time of `bytes` out of `tier` of `node`, ns.
    pub fn copy_ns(&self, node: usize, tier: Tier, bytes: u64) -> u64 {
        // A multiplication by a per-link factor made once: a division per
        // request costs more than the rest of its bookkeeping.
        let ns_per_byte = self.ns_per_byte.get(node).map_or(1e9, |n| n[tier.index()]);
        (bytes as f64 * ns_per_byte) as u64
    }

    /// Compute latency of layers before `layer`, ns.
    pub fn latency_before(&self, layer: u32) -> u64 {
        let n = self.layer_latency.len().max(1);
        let layer = layer as usize;
        let whole = self.layer_latency.iter().take(layer.min(n)).sum::<u64>();
        let extra =
            layer.saturating_sub(n) as u64 * self.layer_latency.last().copied().unwrap_or(0);
        whole + extra
    }

    pub fn layer_latency(&self, layer: u32) -> u64 {
        self.layer_latency
            .get(layer as usize)
            .or(self.layer_latency.last())
            .copied()
            .unwrap_or(1)
            .max(1)
    }

    /// The address of `tier` on `node`, as plans name it.
    pub fn address(&self, node: usize, tier: Tier) -> String {
        format!("tier://{}/{}", self.input.nodes[node].name, tier.name())
    }

    /// A node's name, shared.
    pub fn node_name(&self, node: usize) -> Arc<str> {
        self.node_names
            .get(node)
            .map(|cell| {
                cell.get_or_init(|| self.input.nodes[node].name.as_str().into())
                    .clone()
            })
            .unwrap_or_else(|| "".into())
    }
}

impl Planner {
    /// A planner with no history.
    pub fn new(config: PlannerConfig) -> Planner {
        let heat = Heat::new(config.heat_half_life_ms * 1e6, config.heat_max_pages);
        Planner {
            config,
            heat,
            buckets: HashMap::new(),
            windows: 0,
            last_now: 0,
        }
    }

    /// A planner that resumes from saved state.
    pub fn with_state(config: PlannerConfig, state: PlannerState) -> Planner {
        let mut planner = Planner::new(config);
        planner.heat.restore(&state.heat, state.saved_ns);
        planner.last_now = state.saved_ns;
        planner.buckets = state.buckets.into_iter().collect();
        planner.windows = state.windows;
        planner
    }

    /// What to save to resume later.
    pub fn state(&self) -> PlannerState {
        PlannerState {
            windows: self.windows,
            saved_ns: self.last_now,
            heat: self.heat.entries(self.last_now),
            buckets: self
                .buckets
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// Heat of a page now, for reports and tests.
    pub fn heat(&self, layer: u32, page: u64, now_ns: u64) -> f64 {
        self.heat.get((layer, page), now_ns)
    }

    /// The heat table, for callers that rank pages the way eviction does.
    pub fn heat_table(&self) -> &Heat {
        &self.heat
    }

    /// Feeds hits the engine observed back into heat (the service's `Report`).
    pub fn observe_hits(&mut self, hits: &[(u32, u64, f64)], now_ns: u64) {
        if !self.config.heat {
            return;
        }
        for &(layer, page, n) in hits {
            self.heat.add((layer, page), n, now_ns);
        }
    }

    /// Windows planned so far.
    pub fn windows_planned(&self) -> u64 {
        self.windows
    }

    /// Plans one window. The input must have passed [`WindowInput::check`];
    /// the few limits it does not cover (node and pool counts, page sizes of
    /// one pool) are errors here.
    pub fn plan(&mut self, input: &WindowInput) -> crate::Result<(CachePlan, Report)> {
        let started = Instant::now();
        let config = self.config.clone();
        let mut cx = context(&config, input)?;
        let mut report = Report {
            window_index: input.window_index,
            requests: input.requests.len() as u64,
            ..Report::default()
        };

        let (reqs, runs) = order::derive(&mut cx)?;
        order::tally(&cx, &reqs, &mut report);
        route::hints(&cx, &reqs, &mut report);
        let deferred = credits::charge(&cx, &reqs, &mut self.buckets, &mut report);
        let runs = match runs {
            Some(mut runs) => {
                if !deferred.is_empty() {
                    runs.retain(|r| !deferred[r.request as usize]);
                }
                runs
            }
            None => union::runs(&cx, &reqs, &deferred),
        };
        let merged = union::merge(&cx, runs, &mut report);
        let scored = self.score(&cx, &reqs, &merged);
        let ops = union::shape(&cx, scored, &mut report);
        let issued = caps::apply(&cx, ops, &mut report);
        let admit = self.admission(&cx, &issued, &mut report);
        let evict = evict::select(&cx, &self.heat, &issued, &admit, &mut report);

        let plan = self.emit(&cx, &reqs, issued, admit, evict, &mut report);
        report.unplanned.sort_by_key(|u| u.reason.is_drop());
        report.planning_ns = started.elapsed().as_nanos() as u64;
        self.windows += 1;
        self.last_now = self.last_now.max(input.now_ns);
        Ok((plan, report))
    }
}

fn context<'a>(config: &'a PlannerConfig, input: &'a WindowInput) -> crate::Result<Context<'a>> {
    let origin = || format!("window {}", input.window_index);
    if input.nodes.len() > MAX_NODES {
        return Err(crate::Error::Input {
            origin: origin(),
            field: "nodes".into(),
            message: format!("at most {MAX_NODES} nodes per window"),
        });
    }
    let mut tiers = vec![[None; Tier::ALL.len()]; input.nodes.len()];
    // A missing tier reads at 1 byte/s, as `bandwidth` says.
    let mut ns_per_byte = vec![[1e9; Tier::ALL.len()]; input.nodes.len()];
    for (n, node) in input.nodes.iter().enumerate() {
        for (t, tier) in node.tiers.iter().enumerate() {
            tiers[n][tier.tier.index()] = Some(t);
            ns_per_byte[n][tier.tier.index()] = 1e9 / tier.bandwidth_bytes_per_s.max(1) as f64;
        }
    }
    let layer_latency = if input.layer_latency_ns.is_empty() {
        vec![(config.default_layer_latency_us * 1e3).max(1.0) as u64]
    } else {
        input.layer_latency_ns.clone()
    };
    let window_ns = if input.window_ns > 0 {
        input.window_ns
    } else {
        config.window_ns().max(1)
    };
    Ok(Context {
        input,
        config,
        now: input.now_ns,
        window_ns,
        tiers,
        ns_per_byte,
        pool_names: Vec::new(),
        node_names: (0..input.nodes.len()).map(|_| OnceLock::new()).collect(),
        pools: Vec::new(),
        page_bytes: Vec::new(),
        layer_latency,
    })
}

/// The window's KV pools (tensor names) in order of first use, each with
/// its page size.
#[derive(Default)]
pub(crate) struct Pools<'a> {
    pub names: Vec<&'a str>,
    pub page_bytes: Vec<u64>,
    ids: FxHashMap<&'a str, u16>,
    last: Option<(&'a str, u16)>,
}

impl<'a> Pools<'a> {
    /// The id of request `r`'s pool, checking that a pool has one page size.
    pub fn intern(
        &mut self,
        window: u64,
        r: usize,
        req: &'a crate::model::Request,
    ) -> crate::Result<u16> {
        let fail = |field: &str, message: String| crate::Error::Input {
            origin: format!("window {window}"),
            field: format!("requests[{r}].{field}"),
            message,
        };
        let name = req.tensor.as_str();
        // Most windows hold one pool: comparing with the previous request's
        // name first skips the map for nearly every request.
        let id = match self.last {
            Some((last, id)) if last == name => id,
            _ => {
                let id = match self.ids.get(name) {
                    Some(&id) => id,
                    None if self.names.len() < MAX_POOLS => {
                        self.names.push(name);
                        self.page_bytes.push(req.page_bytes);
                        let id = (self.names.len() - 1) as u16;
                        self.ids.insert(name, id);
                        id
                    }
                    None => {
                        return Err(fail(
                            "tensor",
                            format!("at most {MAX_POOLS} distinct pools (tensor names) per window"),
                        ));
                    }
                };
                self.last = Some((name, id));
                id
            }
        };
        let expected = self.page_bytes[usize::from(id)];
        if expected != req.page_bytes {
            return Err(fail(
                "page_bytes",
                format!(
                    "{} differs from {expected} given by an earlier request for pool {:?}; one pool has one page size",
                    req.page_bytes, req.tensor
                ),
            ));
        }
        Ok(id)
    }
}

impl Planner {
    /// Stage 4: heat and popularity. Every page of every admitted run gets
    /// one hit per request that needs it (counted exactly with a difference
    /// array over the run's members), then each merged run is scored.
    fn score(
        &mut self,
        cx: &Context<'_>,
        reqs: &[order::Derived],
        union: &union::Union,
    ) -> Vec<union::Scored> {
        let now = cx.now;
        let mut out = Vec::with_capacity(union.merged.len());
        let mut diff: Vec<i64> = Vec::new();
        let weight = self.heat.hit_weight(now);
        let scale = self.heat.scale(now);
        if self.config.heat {
            let pages: u64 = union.merged.iter().map(|m| m.run.end - m.run.start).sum();
            self.heat
                .reserve(usize::try_from(pages).unwrap_or(usize::MAX));
        }
        for m in &union.merged {
            let key = GroupKey::unpack(m.run.group);
            let len = (m.run.end - m.run.start) as usize;
            let members = union.members_of(m);
            let mut heat_sum = 0.0;
            if self.config.heat {
                diff.clear();
                diff.resize(len + 1, 0);
                for member in members {
                    diff[(member.start - m.run.start) as usize] += 1;
                    diff[(member.end - m.run.start) as usize] -= 1;
                }
                let hits = diff.iter().take(len).scan(0i64, |hits, d| {
                    *hits += d;
                    Some(*hits as f64 * weight)
                });
                self.heat
                    .add_run(key.layer, m.run.start, hits, |v| heat_sum += v * scale);
            }
            let heat = if len > 0 { heat_sum / len as f64 } else { 0.0 };
            let weight = members
                .iter()
                .map(|r| reqs[r.request as usize].tenant_weight)
                .fold(0.0, f64::max);
            out.push(union::Scored {
                run: m.run,
                popularity: self.config.alpha * heat + self.config.beta * weight,
                heat,
            });
        }
        out
    }

    /// Stage 7: selective write-through. A run fetched from a tier below an
    /// intermediate one the node has (SSD to GPU, with a CPU tier) is also
    /// written to the intermediate tier when its heat reaches
    /// `admit_after_hits` and the intermediate tier has room.
    fn admission(
        &self,
        cx: &Context<'_>,
        issued: &[caps::Issued],
        report: &mut Report,
    ) -> Vec<(usize, Tier, KvPageRef, u64)> {
        let mut out = Vec::new();
        if !self.config.admission {
            return out;
        }
        let mut room: FxHashMap<(usize, Tier), u64> = FxHashMap::default();
        for op in issued {
            if op.op.heat < self.config.admit_after_hits {
                continue;
            }
            let key = GroupKey::unpack(op.op.run.group);
            let node = key.node as usize;
            let between = Tier::ALL
                .into_iter()
                .find(|t| *t > key.dst && *t < key.src && cx.tier(node, *t).is_some());
            let Some(mid) = between else { continue };
            let free = room
                .entry((node, mid))
                .or_insert_with(|| cx.tier(node, mid).map_or(0, |t| t.free_bytes));
            let page_bytes = cx.page_bytes[key.tensor as usize];
            for &(start, end) in &op.op.refs {
                let bytes = (end - start) * page_bytes;
                if bytes > *free {
                    continue;
                }
                *free -= bytes;
                report.admitted_bytes += bytes;
                out.push((
                    node,
                    mid,
                    KvPageRef {
                        tensor: cx.pools[key.tensor as usize].to_owned(),
                        page: start,
                        head: 0,
                        layer: key.layer,
                        location: cx.address(node, mid),
                        count: end - start,
                    },
                    bytes,
                ));
            }
        }
        out
    }

    fn emit(
        &self,
        cx: &Context<'_>,
        reqs: &[order::Derived],
        issued: Vec<caps::Issued>,
        admit: Vec<(usize, Tier, KvPageRef, u64)>,
        evict: Vec<KvPageRef>,
        report: &mut Report,
    ) -> CachePlan {
        let window_end = cx.now.saturating_add(cx.window_ns);
        // Each destination tier gets one landing area per window, shared by
        // every link into it, so no two operations write the same bytes.
        let mut dst_offset: FxHashMap<(usize, Tier), u64> = FxHashMap::default();
        let mut ops = Vec::with_capacity(issued.len());
        let mut prefetch = Vec::new();
        let n = issued.len();
        for (rank, op) in issued.into_iter().enumerate() {
            let key = GroupKey::unpack(op.op.run.group);
            let node = key.node as usize;
            let page_bytes = cx.page_bytes[key.tensor as usize];
            let length = (op.op.run.end - op.op.run.start) * page_bytes;
            let offset = dst_offset.entry((node, key.dst)).or_insert(0);
            let tensor = cx.pools[key.tensor as usize];
            let kv_refs: Vec<KvPageRef> = op
                .op
                .refs
                .iter()
                .map(|&(start, end)| KvPageRef {
                    tensor: tensor.to_owned(),
                    page: start,
                    head: 0,
                    layer: key.layer,
                    location: String::new(),
                    count: end - start,
                })
                .collect();
            if op.op.run.deadline > window_end {
                prefetch.extend(kv_refs.iter().map(|r| KvPageRef {
                    location: cx.address(node, key.dst),
                    ..r.clone()
                }));
            }
            let first = reqs
                .get(op.op.run.request as usize)
                .map_or("", |r| cx.input.requests[r.index].id.as_str());
            let note = if op.op.run.fanout > 1 {
                format!(
                    "layer {} pages {}..{} for {} requests ({} first)",
                    key.layer, op.op.run.start, op.op.run.end, op.op.run.fanout, first
                )
            } else {
                format!(
                    "layer {} pages {}..{} for {}",
                    key.layer, op.op.run.start, op.op.run.end, first
                )
            };
            ops.push(TransferOp {
                kind: key.src.transfer_kind(key.dst) as i32,
                src: cx.address(node, key.src),
                dst: cx.address(node, key.dst),
                length,
                src_offset: op.op.run.start.saturating_mul(page_bytes),
                dst_offset: *offset,
                kv_refs,
                note,
                deadline_ns: op.op.run.deadline,
                priority: i32::try_from(n - rank).unwrap_or(i32::MAX),
                stream_hint: op.stream,
            });
            *offset = offset.saturating_add(length);
        }
        report.ops = ops.len() as u64;
        report.planned_bytes = ops.iter().map(|o| o.length).sum();
        CachePlan {
            schema_version: SCHEMA_VERSION,
            plan_id: format!("bcache-window-{}", cx.input.window_index),
            ops,
            prefetch,
            evict,
            admit: admit.into_iter().map(|(_, _, page, _)| page).collect(),
            window: Some(PlanWindow {
                index: cx.input.window_index,
                start_ns: cx.now,
                end_ns: window_end,
            }),
        }
    }
}
