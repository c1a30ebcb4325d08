//! Stage 1: slack and order.
//!
//! Slack is the time a request can still wait: its deadline, minus now,
//! minus the estimated copy time of its bytes over the source tier's link,
//! minus the engine's estimated fill time. Least slack goes first (earliest
//! deadline first, corrected for size), the order that minimises lateness on
//! one link. A request with negative slack is already late: it is flagged in
//! the report and planned first, never dropped.

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use std::sync::Arc;

use super::{Context, Pools, Report, Run};

/// A request with everything later stages need, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct Derived {
    /// Position in the input.
    pub index: usize,
    /// Node index.
    pub node: usize,
    /// Tenant index in the input's tenant list; `None` when the input lists
    /// no tenants (nobody is limited).
    pub tenant: Option<usize>,
    /// Pool id.
    pub pool: u16,
    /// Bytes the request needs moved (pages x layers x page bytes).
    pub bytes: u64,
    /// Slack, ns (negative: late).
    pub slack: i64,
    /// Tenant weight, for popularity.
    pub tenant_weight: f64,
}

/// Name lookup for the nodes and tenants of a window. A hash map with a
/// fast hasher costs a few nanoseconds per short name, a linear scan with a
/// string comparison per name costs more from four names up.
struct Names<'a> {
    map: FxHashMap<&'a str, usize>,
}

impl<'a> Names<'a> {
    fn new(names: impl Iterator<Item = &'a str>) -> Names<'a> {
        let mut map = FxHashMap::default();
        for (i, name) in names.enumerate() {
            // The first of two equal names wins, as a scan would find it.
            map.entry(name).or_insert(i);
        }
        Names { map }
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.map.get(name).copied()
    }
}

/// Resolves every request ([`Derived`]) and fills the context's pools.
/// Below [`PARALLEL_FROM`] requests it also cuts each request into runs of
/// consecutive pages in the same pass, so that the input's strings and page
/// lists are read once while they are in cache; above, the runs are cut in
/// parallel after credits, for the admitted requests only
/// ([`super::union::runs`]).
pub(crate) fn derive<'a>(cx: &mut Context<'a>) -> crate::Result<(Vec<Derived>, Option<Vec<Run>>)> {
    let requests = &cx.input.requests;
    let window = cx.input.window_index;
    let mut pools = Pools::default();
    let out = {
        let cx: &Context<'a> = cx;
        let nodes = Names::new(cx.input.nodes.iter().map(|n| n.name.as_str()));
        let tenants = Names::new(cx.input.tenants.iter().map(|t| t.name.as_str()));
        let one = |index: usize, req: &crate::model::Request, pool: u16, runs: &mut Vec<Run>| {
            let d = resolve(cx, &nodes, &tenants, index, req, pool)?;
            super::union::push_runs(cx, &d, req, runs);
            Ok(d)
        };
        if requests.len() < PARALLEL_FROM {
            // Below a few tens of thousands of requests, waking the thread
            // pool costs more than it saves.
            let mut reqs = Vec::with_capacity(requests.len());
            let mut runs = Vec::with_capacity(requests.len() * 2);
            for (i, req) in requests.iter().enumerate() {
                let pool = pools.intern(window, i, req)?;
                reqs.push(one(i, req, pool, &mut runs)?);
            }
            (reqs, Some(runs))
        } else {
            let pool_of = requests
                .iter()
                .enumerate()
                .map(|(i, req)| pools.intern(window, i, req))
                .collect::<crate::Result<Vec<u16>>>()?;
            const CHUNK: usize = 8192;
            // A bad request (rare: inputs are checked first) is found again
            // in order, so the error names the first one whichever thread
            // met it.
            let parts: Vec<Option<Vec<Derived>>> = requests
                .par_chunks(CHUNK)
                .enumerate()
                .map(|(c, chunk)| {
                    let mut reqs = Vec::with_capacity(chunk.len());
                    for (k, req) in chunk.iter().enumerate() {
                        let i = c * CHUNK + k;
                        reqs.push(resolve(cx, &nodes, &tenants, i, req, pool_of[i]).ok()?);
                    }
                    Some(reqs)
                })
                .collect();
            if let Some(c) = parts.iter().position(Option::is_none) {
                let mut runs = Vec::new();
                for (i, req) in requests.iter().enumerate() {
                    one(i, req, pool_of[i], &mut runs)?;
                }
                // Resolving is deterministic: the pass above fails first.
                return Err(crate::Error::Input {
                    origin: format!("window {window}"),
                    field: format!("requests[{}]", c * CHUNK),
                    message: "a request in this chunk did not resolve".into(),
                });
            }
            let mut reqs = Vec::with_capacity(requests.len());
            for part in parts.into_iter().flatten() {
                reqs.extend(part);
            }
            (reqs, None)
        }
    };
    cx.pool_names = pools.names.iter().map(|&p| Arc::from(p)).collect();
    cx.pools = pools.names;
    cx.page_bytes = pools.page_bytes;
    Ok(out)
}

/// Resolves one request's names and computes its bytes and slack.
fn resolve(
    cx: &Context<'_>,
    nodes: &Names<'_>,
    tenants: &Names<'_>,
    index: usize,
    req: &crate::model::Request,
    pool: u16,
) -> crate::Result<Derived> {
    let unknown = |field: &str, message: String| crate::Error::Input {
        origin: format!("window {}", cx.input.window_index),
        field: format!("requests[{index}].{field}"),
        message,
    };
    let node = nodes
        .get(&req.node)
        .ok_or_else(|| unknown("node", format!("unknown node {:?}", req.node)))?;
    let tenant = if cx.input.tenants.is_empty() {
        None
    } else {
        Some(
            tenants
                .get(&req.tenant)
                .ok_or_else(|| unknown("tenant", format!("unknown tenant {:?}", req.tenant)))?,
        )
    };
    if cx.tier(node, req.src).is_none() || cx.tier(node, req.dst).is_none() {
        return Err(unknown(
            "src",
            format!(
                "node {:?} lacks the {} or {} tier",
                req.node, req.src, req.dst
            ),
        ));
    }
    let layers = u64::from(req.layers[1].saturating_sub(req.layers[0]));
    let bytes = (req.pages.len() as u64)
        .saturating_mul(layers)
        .saturating_mul(req.page_bytes);
    let needed = cx
        .now
        .saturating_add(cx.copy_ns(node, req.src, bytes))
        .saturating_add(req.est_fill_ns);
    let slack = if req.deadline_ns >= needed {
        i64::try_from(req.deadline_ns - needed).unwrap_or(i64::MAX)
    } else {
        -i64::try_from(needed - req.deadline_ns).unwrap_or(i64::MAX)
    };
    Ok(Derived {
        index,
        node,
        tenant,
        pool,
        bytes,
        slack,
        tenant_weight: tenant.map_or(1.0, |t| cx.input.tenants[t].weight),
    })
}

/// Inputs at least this large are processed in parallel.
pub(crate) const PARALLEL_FROM: usize = 32_768;

/// Fills the report's demand and its list of late requests.
pub(crate) fn tally(cx: &Context<'_>, reqs: &[Derived], report: &mut Report) {
    report.demand_bytes = reqs.iter().map(|r| r.bytes).sum();
    report.late_requests = reqs
        .iter()
        .filter(|r| r.slack < 0)
        .map(|r| cx.input.requests[r.index].id.clone())
        .collect();
}

/// A request in planning order, with what charging it needs: the charging
/// pass then reads memory in sequence, not at random in `reqs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ordered {
    pub slack: i64,
    pub bytes: u64,
    /// Position in the input.
    pub index: u32,
    /// Tenant index.
    pub tenant: u32,
}

/// The requests of the tenants `pick` selects, least slack first when EDF
/// is on (ties in input order), in input order otherwise.
pub(crate) fn order(
    cx: &Context<'_>,
    reqs: &[Derived],
    pick: impl Fn(usize) -> bool + Sync,
) -> Vec<Ordered> {
    let entry = |r: &Derived| {
        let t = r.tenant.filter(|&t| pick(t))?;
        Some(Ordered {
            slack: r.slack,
            bytes: r.bytes,
            index: r.index as u32,
            tenant: t as u32,
        })
    };
    let mut keyed: Vec<Ordered> = if reqs.len() < PARALLEL_FROM {
        reqs.iter().filter_map(entry).collect()
    } else {
        reqs.par_iter()
            .with_min_len(4096)
            .filter_map(entry)
            .collect()
    };
    if !cx.config.edf {
        return keyed;
    }
    let key = |o: &Ordered| (o.slack, o.index);
    if keyed.len() < PARALLEL_FROM {
        keyed.sort_unstable_by_key(key);
    } else {
        keyed.par_sort_unstable_by_key(key);
    }
    keyed
}
