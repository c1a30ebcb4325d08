//! Stage 3: dedup and coalescing, a correct interval union.
//!
//! Each admitted request becomes runs of consecutive pages, one per layer,
//! keyed by (node, source tier, destination tier, pool, layer). Sorting the
//! runs by key and first page and sweeping them with a *running maximum* of
//! the last page merges overlapping and nested intervals alike: [0, 10),
//! [2, 3) and [5, 6) become one run [0, 10), never a second read of 5..6.
//! With coalescing on, touching runs ([0, 4) and [4, 8)) merge too, and runs
//! a few pages apart are read as one when the unneeded gap costs less to read
//! than a separate operation costs to issue.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use rayon::prelude::*;

use super::order::Derived;
use super::{Context, GroupKey, Reason, Report, Run, Unplanned};
use crate::model::Request;

/// A merged run and the request runs it covers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Merged {
    pub run: Run,
    /// The request runs merged into it: `Union::members[first..end]`.
    pub members: (u32, u32),
}

/// The interval union of a window: merged runs, and one flat store of the
/// request runs they cover (one allocation, not one per merged run).
#[derive(Debug, Clone, Default)]
pub(crate) struct Union {
    pub merged: Vec<Merged>,
    /// Request runs; only `start`, `end` and `request` are meaningful.
    pub members: Vec<Run>,
}

impl Union {
    /// The request runs merged into `m`.
    pub fn members_of(&self, m: &Merged) -> &[Run] {
        self.members
            .get(m.members.0 as usize..m.members.1 as usize)
            .unwrap_or(&[])
    }
}

/// A merged run with its score.
#[derive(Debug, Clone)]
pub(crate) struct Scored {
    pub run: Run,
    pub popularity: f64,
    pub heat: f64,
}

/// One read to issue: a covering range of pages and the demanded runs in it.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub run: Run,
    /// Demanded `[start, end)` ranges, ascending, inside `run`.
    pub refs: Vec<(u64, u64)>,
    pub popularity: f64,
    pub heat: f64,
}

/// The runs of the requests not `deferred` (by position; empty: none is),
/// cut in parallel.
pub(crate) fn runs(cx: &Context<'_>, reqs: &[Derived], deferred: &[bool]) -> Vec<Run> {
    let parts: Vec<Vec<Run>> = reqs
        .par_chunks(8192)
        .map(|chunk| {
            let mut out = Vec::with_capacity(chunk.len() * 2);
            for r in chunk {
                if !deferred.get(r.index).copied().unwrap_or(false) {
                    push_runs(cx, r, &cx.input.requests[r.index], &mut out);
                }
            }
            out
        })
        .collect();
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for part in parts {
        out.extend(part);
    }
    out
}

/// Appends request `r`'s pages to `out` as runs of consecutive ids, one
/// set per layer; with overlap on, layer `l`'s deadline is the request's
/// plus the compute latency of the layers before `l`.
pub(crate) fn push_runs(cx: &Context<'_>, r: &Derived, req: &Request, out: &mut Vec<Run>) {
    let [first, end] = req.layers;
    let base = cx.latency_before(first);
    for layer in first..end {
        let group = GroupKey {
            node: r.node as u16,
            src: req.src,
            dst: req.dst,
            tensor: r.pool,
            layer,
        }
        .pack();
        let deadline = if cx.config.overlap && layer > first {
            req.deadline_ns
                .saturating_add(cx.latency_before(layer) - base)
        } else {
            req.deadline_ns
        };
        out.extend(consecutive(&req.pages).map(|(start, end)| Run {
            group,
            start,
            end,
            deadline,
            fanout: 1,
            request: r.index as u32,
        }));
    }
}

/// Maximal runs of consecutive ids in `pages`, in the order given.
fn consecutive(pages: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = *pages.get(i)?;
        let mut end = start.saturating_add(1);
        i += 1;
        while pages.get(i) == Some(&end) {
            end += 1;
            i += 1;
        }
        Some((start, end))
    })
}

/// The interval union per group (with dedup on), or the runs as they are.
pub(crate) fn merge(cx: &Context<'_>, mut runs: Vec<Run>, report: &mut Report) -> Union {
    if !cx.config.dedup {
        report.unique_bytes = runs
            .iter()
            .map(|r| bytes(cx, r.group, r.start, r.end))
            .sum();
        let merged = runs
            .iter()
            .enumerate()
            .map(|(i, &run)| Merged {
                run,
                members: (i as u32, i as u32 + 1),
            })
            .collect();
        return Union {
            merged,
            members: runs,
        };
    }
    // Ties on (group, start) may come out in any order: what the sweep
    // computes from them (maximum end, minimum deadline, the first request
    // by deadline) does not depend on it.
    let key = |r: &Run| (u128::from(r.group) << 64) | u128::from(r.start);
    if runs.len() < super::order::PARALLEL_FROM {
        runs.sort_unstable_by_key(key);
    } else {
        runs.par_sort_unstable_by_key(key);
    }
    let touching = cx.config.coalesce;
    let mut merged: Vec<Merged> = Vec::new();
    let mut i = 0;
    while i < runs.len() {
        let mut run = runs[i];
        let mut j = i + 1;
        while j < runs.len() {
            let next = runs[j];
            let joins = next.group == run.group
                && (next.start < run.end || (touching && next.start == run.end));
            if !joins {
                break;
            }
            // The first request by (deadline, request) names the run.
            if ordered_before(&next, &run) {
                run.request = next.request;
            }
            run.end = run.end.max(next.end);
            run.deadline = run.deadline.min(next.deadline);
            run.fanout = run.fanout.saturating_add(1);
            j += 1;
        }
        merged.push(Merged {
            run,
            members: (i as u32, j as u32),
        });
        i = j;
    }
    let union = one_source_per_page(Union {
        merged,
        members: runs,
    });
    report.unique_bytes = union
        .merged
        .iter()
        .map(|m| bytes(cx, m.run.group, m.run.start, m.run.end))
        .sum();
    union
}

/// A page demanded from two source tiers (a CPU copy and an SSD copy) is
/// read once, from the faster: runs from slower sources lose the pages a
/// faster source already provides for the same destination, pool and layer.
fn one_source_per_page(union: Union) -> Union {
    const SRC: u64 = 7 << 45;
    let dst_key = |m: &Merged| m.run.group & !SRC;
    let mut sources: FxHashMap<u64, u64> = FxHashMap::default();
    let conflict = union.merged.iter().any(|m| {
        let src = m.run.group & SRC;
        *sources.entry(dst_key(m)).or_insert(src) != src
    });
    if !conflict {
        return union;
    }
    let merged = &union.merged;
    let mut order: Vec<usize> = (0..merged.len()).collect();
    order.sort_by_key(|&i| {
        (
            dst_key(&merged[i]),
            merged[i].run.group & SRC,
            merged[i].run.start,
        )
    });
    let mut out = Union::default();
    let mut claimed: BTreeMap<u64, u64> = BTreeMap::new();
    let mut current = None;
    for i in order {
        let m = &merged[i];
        if current != Some(dst_key(m)) {
            current = Some(dst_key(m));
            claimed.clear();
        }
        let mut pieces = vec![(m.run.start, m.run.end)];
        let overlapping: Vec<(u64, u64)> = claimed
            .range(..m.run.end)
            .filter(|(_, e)| **e > m.run.start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (cs, ce) in overlapping {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    [(s, e.min(cs)), (s.max(ce), e)]
                        .into_iter()
                        .filter(|(a, b)| a < b)
                })
                .collect();
        }
        for (s, e) in pieces {
            claimed.insert(s, e);
            let first = out.members.len() as u32;
            out.members.extend(
                union
                    .members_of(m)
                    .iter()
                    .filter(|r| r.start < e && r.end > s)
                    .map(|r| Run {
                        start: r.start.max(s),
                        end: r.end.min(e),
                        ..*r
                    }),
            );
            let end = out.members.len() as u32;
            out.merged.push(Merged {
                run: Run {
                    start: s,
                    end: e,
                    fanout: end - first,
                    ..m.run
                },
                members: (first, end),
            });
        }
    }
    out.merged.sort_by_key(|m| (m.run.group, m.run.start));
    out
}

fn ordered_before(a: &Run, b: &Run) -> bool {
    (a.deadline, a.request) < (b.deadline, b.request)
}

/// Bytes of pages `[start, end)` of a group's pool.
pub(crate) fn bytes(cx: &Context<'_>, group: u64, start: u64, end: u64) -> u64 {
    let pool = GroupKey::unpack(group).tensor as usize;
    (end - start).saturating_mul(cx.page_bytes.get(pool).copied().unwrap_or(0))
}

/// Gap merging, splitting at `max_io_bytes`, and deferral of small reads
/// that are not due soon.
pub(crate) fn shape(cx: &Context<'_>, scored: Vec<Scored>, report: &mut Report) -> Vec<Op> {
    let mut ops: Vec<Op> = Vec::with_capacity(scored.len());
    for s in scored {
        let run = s.run;
        if let Some(last) = ops.last_mut() {
            let gap = run.start.saturating_sub(last.run.end);
            if cx.config.coalesce
                && last.run.group == run.group
                && run.start >= last.run.end
                && gap <= cx.config.max_gap_pages
                && gap_pays(cx, run.group, gap)
            {
                last.run.end = run.end;
                last.run.deadline = last.run.deadline.min(run.deadline);
                last.run.fanout = last.run.fanout.saturating_add(run.fanout);
                last.refs.push((run.start, run.end));
                last.popularity = last.popularity.max(s.popularity);
                last.heat = last.heat.max(s.heat);
                continue;
            }
        }
        ops.push(Op {
            run,
            refs: vec![(run.start, run.end)],
            popularity: s.popularity,
            heat: s.heat,
        });
    }
    let mut out = Vec::with_capacity(ops.len());
    let soon = cx.now.saturating_add(cx.window_ns.saturating_mul(2));
    for op in ops {
        for part in split(cx, op) {
            let len = bytes(cx, part.run.group, part.run.start, part.run.end);
            report.gap_bytes += len
                - part
                    .refs
                    .iter()
                    .map(|&(s, e)| bytes(cx, part.run.group, s, e))
                    .sum::<u64>();
            if cx.config.coalesce && len < cx.config.min_io_bytes && part.run.deadline > soon {
                defer(cx, &part, Reason::SmallIo, report);
                continue;
            }
            out.push(part);
        }
    }
    out
}

/// Whether reading `gap` unneeded pages is cheaper than issuing one more
/// operation.
fn gap_pays(cx: &Context<'_>, group: u64, gap: u64) -> bool {
    if gap == 0 {
        return true;
    }
    let key = GroupKey::unpack(group);
    let gap_ns = cx.copy_ns(key.node as usize, key.src, bytes(cx, group, 0, gap));
    (gap_ns as f64) < cx.config.op_overhead_us * 1e3
}

/// Cuts an operation into parts of at most `max_io_bytes` (at least one
/// page), each trimmed to the demanded pages it holds.
fn split(cx: &Context<'_>, op: Op) -> Vec<Op> {
    let page = bytes(cx, op.run.group, 0, 1).max(1);
    let max_pages = (cx.config.max_io_bytes / page).max(1);
    if op.run.end - op.run.start <= max_pages {
        return vec![op];
    }
    let mut parts = Vec::new();
    let mut at = op.run.start;
    while at < op.run.end {
        let cut = at.saturating_add(max_pages).min(op.run.end);
        let refs: Vec<(u64, u64)> = op
            .refs
            .iter()
            .filter(|&&(s, e)| s < cut && e > at)
            .map(|&(s, e)| (s.max(at), e.min(cut)))
            .collect();
        if let (Some(first), Some(last)) = (refs.first(), refs.last()) {
            parts.push(Op {
                run: Run {
                    start: first.0,
                    end: last.1,
                    ..op.run
                },
                refs: refs.clone(),
                ..op.clone()
            });
        }
        at = cut;
    }
    parts
}

/// Records an operation's demanded pages as not planned, for `reason`.
pub(crate) fn defer(cx: &Context<'_>, op: &Op, reason: Reason, report: &mut Report) {
    let key = GroupKey::unpack(op.run.group);
    for &(start, end) in &op.refs {
        let b = bytes(cx, op.run.group, start, end);
        if reason.is_drop() {
            report.dropped_bytes += b;
        } else {
            report.deferred_bytes += b;
        }
        report.unplanned.push(Unplanned {
            reason,
            node: cx.node_name(key.node as usize),
            src: key.src,
            dst: key.dst,
            tensor: cx.pool_names[key.tensor as usize].clone(),
            layer: key.layer,
            page: start,
            count: end - start,
            bytes: b,
        });
    }
}
