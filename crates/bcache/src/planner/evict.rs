//! Stage 8: eviction, per node and tier, coldest and cheapest first.
//!
//! A tier whose use, counting this window's incoming bytes, goes above the
//! high watermark is brought back to the low watermark; between the two
//! nothing is evicted, so a tier hovering near full does not evict a little
//! every window (hysteresis). Candidates are the tier's resident pages that
//! are not pinned, not read by this plan, and not admitted by it. Among
//! them, the lowest `heat x refetch time` goes first: a cold page that is
//! quick to bring back from the tier below is the cheapest loss.

use rustc_hash::{FxHashMap, FxHashSet};

use bstack_plan::KvPageRef;

use super::caps::Issued;
use super::union::bytes;
use super::{Context, GroupKey, Report};
use crate::heat::Heat;
use crate::model::Tier;

pub(crate) fn select(
    cx: &Context<'_>,
    heat: &Heat,
    issued: &[Issued],
    admit: &[(usize, Tier, KvPageRef, u64)],
    report: &mut Report,
) -> Vec<KvPageRef> {
    let mut out = Vec::new();
    if !cx.config.eviction {
        return out;
    }
    let mut incoming: FxHashMap<(usize, Tier), u64> = FxHashMap::default();
    for op in issued {
        let key = GroupKey::unpack(op.op.run.group);
        *incoming.entry((key.node as usize, key.dst)).or_default() +=
            bytes(cx, op.op.run.group, op.op.run.start, op.op.run.end);
    }
    for (node, tier, _, b) in admit {
        *incoming.entry((*node, *tier)).or_default() += b;
    }
    // Pages this plan reads out of a tier, or admits into it, must stay:
    // collected only for a tier that needs eviction.
    let busy = |n: usize, tier: Tier| {
        let mut set: FxHashSet<(u32, u64)> = FxHashSet::default();
        for op in issued {
            let key = GroupKey::unpack(op.op.run.group);
            if key.node as usize == n && key.src == tier {
                for &(s, e) in &op.op.refs {
                    set.extend((s..e).map(|p| (key.layer, p)));
                }
            }
        }
        for (node, t, page, _) in admit {
            if *node == n && *t == tier {
                set.extend((page.page..page.page + page.count.max(1)).map(|p| (page.layer, p)));
            }
        }
        set
    };
    for (n, node) in cx.input.nodes.iter().enumerate() {
        for state in &node.tiers {
            let cap = state.capacity_bytes as f64;
            let incoming = incoming.get(&(n, state.tier)).copied().unwrap_or(0);
            let used = state
                .capacity_bytes
                .saturating_sub(state.free_bytes)
                .saturating_add(incoming) as f64;
            if used <= cx.config.high_watermark * cap {
                continue;
            }
            let target = used - cx.config.low_watermark * cap;
            let scale = heat.scale(cx.now);
            let below = Tier::ALL
                .into_iter()
                .find(|t| *t > state.tier && cx.tier(n, *t).is_some());
            let busy = busy(n, state.tier);
            let mut seen = FxHashSet::default();
            let mut candidates: Vec<(f64, u64, &crate::model::ResidentPage)> = state
                .resident
                .iter()
                .filter(|p| !p.pinned && !busy.contains(&(p.layer, p.page)))
                // A page is (pool, layer, id); a page busy in any pool stays,
                // which keeps the rule simple at the cost of rarely evicting less.
                .filter(|p| seen.insert((p.tensor.as_str(), p.layer, p.page)))
                .map(|p| {
                    // Losing a page with no tier below means recomputing it:
                    // price that as a read over a slow link.
                    let refetch = match below {
                        Some(t) => cx.copy_ns(n, t, p.bytes),
                        None => cx.copy_ns(n, state.tier, p.bytes).saturating_mul(100),
                    };
                    let score = (heat.get_scaled((p.layer, p.page), scale) + 1e-3) * refetch as f64;
                    (score, p.bytes, p)
                })
                .collect();
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
            let mut freed = 0.0;
            for (_, b, p) in candidates {
                if freed >= target {
                    break;
                }
                freed += b as f64;
                report.evicted_bytes += b;
                out.push(KvPageRef {
                    tensor: p.tensor.clone(),
                    page: p.page,
                    head: 0,
                    layer: p.layer,
                    location: cx.address(n, state.tier),
                    count: 1,
                });
            }
        }
    }
    out
}
