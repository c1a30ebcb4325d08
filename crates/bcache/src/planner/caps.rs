//! Stage 6: caps, and the stream hints of the overlap stage.
//!
//! Per node, a tier's link moves at most `bandwidth x window` bytes out of
//! it in one window, and a tier takes at most its free bytes (plus what the
//! eviction stage may free: its resident pages that are not pinned). Reads
//! are taken least slack first, then most popular; a read that does not fit
//! whole is cut at the page where the budget ends, and the rest is deferred
//! to the next window with the reason. A read larger than the destination
//! tier's whole capacity can never happen and is dropped, with the reason.

use rustc_hash::FxHashMap;

use super::union::{Op, bytes, defer};
use super::{Context, GroupKey, Reason, Report};
use crate::model::Tier;

/// An operation that fits, with its executor stream.
#[derive(Debug, Clone)]
pub(crate) struct Issued {
    pub op: Op,
    /// Stream hint: 0 lets the executor choose.
    pub stream: u32,
}

pub(crate) fn apply(cx: &Context<'_>, mut ops: Vec<Op>, report: &mut Report) -> Vec<Issued> {
    if cx.config.edf {
        // Earliest deadline, then most popular, then position: (group,
        // start) is unique, so the unstable sort is deterministic.
        ops.sort_unstable_by_key(|op| {
            (
                op.run.deadline,
                std::cmp::Reverse(total_order(op.popularity)),
                op.run.group,
                op.run.start,
            )
        });
    }
    let mut link: FxHashMap<(usize, Tier), u64> = FxHashMap::default();
    let mut space: FxHashMap<(usize, Tier), u64> = FxHashMap::default();
    let mut issued = Vec::with_capacity(ops.len());
    for op in ops {
        let key = GroupKey::unpack(op.run.group);
        let node = key.node as usize;
        let page = bytes(cx, op.run.group, 0, 1).max(1);
        let capacity = cx.tier(node, key.dst).map_or(0, |t| t.capacity_bytes);
        if page > capacity {
            defer(cx, &op, Reason::ExceedsCapacity, report);
            continue;
        }
        if !cx.config.caps {
            issued.push(op);
            continue;
        }
        let link_left = link.entry((node, key.src)).or_insert_with(|| {
            let bw = u128::from(cx.bandwidth(node, key.src));
            (bw * u128::from(cx.window_ns) / 1_000_000_000).min(u128::from(u64::MAX)) as u64
        });
        let space_left = space.entry((node, key.dst)).or_insert_with(|| {
            cx.tier(node, key.dst).map_or(0, |t| {
                let evictable: u64 = if cx.config.eviction {
                    t.resident
                        .iter()
                        .filter(|p| !p.pinned)
                        .map(|p| p.bytes)
                        .sum()
                } else {
                    0
                };
                t.free_bytes.saturating_add(evictable)
            })
        });
        let pages = op.run.end - op.run.start;
        let fit = (*link_left).min(*space_left) / page;
        if fit >= pages {
            let b = pages * page;
            *link_left -= b;
            *space_left -= b;
            issued.push(op);
            continue;
        }
        let reason = if *link_left < *space_left {
            Reason::Bandwidth
        } else {
            Reason::Space
        };
        let cut = op.run.start + fit;
        let (head, tail) = cut_at(&op, cut);
        if let Some(head) = head {
            let b = bytes(cx, head.run.group, head.run.start, head.run.end);
            *link_left -= b;
            *space_left -= b;
            issued.push(head);
        }
        if let Some(tail) = tail {
            defer(cx, &tail, reason, report);
        }
    }
    let depth = depths(cx, &issued, report);
    issued
        .into_iter()
        .map(|op| {
            let layer = GroupKey::unpack(op.run.group).layer;
            let stream = match depth.get(layer as usize) {
                Some(&d) if cx.config.overlap => 1 + layer % d.max(1),
                _ => 0,
            };
            Issued { op, stream }
        })
        .collect()
}

/// A key that orders floats as [`f64::total_cmp`] does.
fn total_order(x: f64) -> i64 {
    let bits = x.to_bits() as i64;
    bits ^ ((((bits >> 63) as u64) >> 1) as i64)
}

/// Splits an operation at page `cut`: the part before (trimmed to its
/// demanded pages) and the part from `cut` on.
fn cut_at(op: &Op, cut: u64) -> (Option<Op>, Option<Op>) {
    let part = |lo: u64, hi: u64| {
        let refs: Vec<(u64, u64)> = op
            .refs
            .iter()
            .filter(|&&(s, e)| s < hi && e > lo)
            .map(|&(s, e)| (s.max(lo), e.min(hi)))
            .collect();
        let (first, last) = (refs.first()?.0, refs.last()?.1);
        let mut p = op.clone();
        p.run.start = first;
        p.run.end = last;
        p.refs = refs;
        Some(p)
    };
    (part(op.run.start, cut), part(cut, op.run.end))
}

/// Overlap stage: the prefetch depth of each layer, in layers ahead of
/// compute: how long this window's copies for the layer take, divided by the
/// layer's compute latency, between 1 and `max_prefetch_depth`.
fn depths(cx: &Context<'_>, issued: &[Op], report: &mut Report) -> Vec<u32> {
    if !cx.config.overlap {
        return Vec::new();
    }
    let mut copy_ns: Vec<u64> = Vec::new();
    for op in issued {
        let key = GroupKey::unpack(op.run.group);
        let layer = key.layer as usize;
        if layer >= copy_ns.len() {
            if layer > 1 << 16 {
                continue;
            }
            copy_ns.resize(layer + 1, 0);
        }
        let b = bytes(cx, op.run.group, op.run.start, op.run.end);
        copy_ns[layer] = copy_ns[layer].saturating_add(cx.copy_ns(key.node as usize, key.src, b));
    }
    let depth: Vec<u32> = copy_ns
        .iter()
        .enumerate()
        .map(|(layer, &ns)| {
            let lat = cx.layer_latency(layer as u32);
            (ns.div_ceil(lat) as u32).clamp(1, cx.config.max_prefetch_depth)
        })
        .collect();
    report.prefetch_depth = depth.clone();
    depth
}
