//! Stage 1: slack and order.
//!
//! Slack is the time a request can still wait: its deadline, minus now,
//! minus the estimated copy time of its bytes over the source tier's link,
//! minus the engine's estimated fill time. Least slack goes first (earliest
//! deadline first, corrected for size), the order that minimises lateness on
//! one link. A request with negative slack is already late: it is flagged in
//! the report and planned first, never dropped.

use std::collections::HashMap;

use rayon::prelude::*;

use super::{Context, MAX_POOLS, Report};

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

/// Name lookup that stays fast for the few names a window has: a linear
/// scan below 16 names (no hashing), a hash map above.
struct Names<'a> {
    names: Vec<&'a str>,
    map: Option<HashMap<&'a str, usize>>,
}

impl<'a> Names<'a> {
    fn new(names: impl Iterator<Item = &'a str>) -> Names<'a> {
        let names: Vec<&str> = names.collect();
        let map = (names.len() > 16).then(|| {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (*n, i))
                .collect::<HashMap<_, _>>()
        });
        Names { names, map }
    }

    fn get(&self, name: &str) -> Option<usize> {
        match &self.map {
            Some(map) => map.get(name).copied(),
            None => self.names.iter().position(|n| *n == name),
        }
    }
}

pub(crate) fn derive(cx: &Context<'_>) -> crate::Result<Vec<Derived>> {
    let nodes = Names::new(cx.input.nodes.iter().map(|n| n.name.as_str()));
    let tenants = Names::new(cx.input.tenants.iter().map(|t| t.name.as_str()));
    let pools = Names::new(cx.pools.iter().copied());
    let one = |(index, req): (usize, &crate::model::Request)| {
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
        let pool = pools.get(&req.tensor).unwrap_or(0).min(MAX_POOLS - 1);
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
            pool: pool as u16,
            bytes,
            slack,
            tenant_weight: tenant.map_or(1.0, |t| cx.input.tenants[t].weight),
        })
    };
    // Below a few tens of thousands of requests, waking the thread pool
    // costs more than it saves.
    if cx.input.requests.len() < PARALLEL_FROM {
        cx.input.requests.iter().enumerate().map(one).collect()
    } else {
        cx.input
            .requests
            .par_iter()
            .with_min_len(4096)
            .enumerate()
            .map(one)
            .collect()
    }
}

/// Inputs at least this large are processed in parallel.
pub(crate) const PARALLEL_FROM: usize = 32_768;

/// Positions into `reqs`, least slack first when EDF is on, input order
/// otherwise. Fills the report's demand and late list.
pub(crate) fn order(cx: &Context<'_>, reqs: &[Derived], report: &mut Report) -> Vec<u32> {
    report.demand_bytes = reqs.iter().map(|r| r.bytes).sum();
    report.late_requests = reqs
        .iter()
        .filter(|r| r.slack < 0)
        .map(|r| cx.input.requests[r.index].id.clone())
        .collect();
    if !cx.config.edf {
        return (0..reqs.len() as u32).collect();
    }
    // Sorting the keys themselves, not indices into `reqs`, keeps the sort
    // in cache.
    let mut keyed: Vec<(i64, u32)> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.slack, i as u32))
        .collect();
    if keyed.len() < PARALLEL_FROM {
        keyed.sort_unstable();
    } else {
        keyed.par_sort_unstable();
    }
    keyed.into_iter().map(|(_, i)| i).collect()
}
