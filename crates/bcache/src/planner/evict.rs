//! Stage 8: eviction, per node and tier, coldest and cheapest first.
//!
//! A tier whose use, counting this window's incoming bytes, goes above the
//! high watermark is brought back to the low watermark; between the two
//! nothing is evicted, so a tier hovering near full does not evict a little
//! every window (hysteresis). Candidates are the tier's resident pages that
//! are not pinned, not read by this plan, and not admitted by it. Among
//! them, the lowest `heat x refetch time` goes first: a cold page that is
//! quick to bring back from the tier below is the cheapest loss.

use std::collections::{HashMap, HashSet};

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
    let mut incoming: HashMap<(usize, Tier), u64> = HashMap::new();
    let mut busy: HashSet<(usize, Tier, u32, u64)> = HashSet::new();
    for op in issued {
        let key = GroupKey::unpack(op.op.run.group);
        let node = key.node as usize;
        *incoming.entry((node, key.dst)).or_default() +=
            bytes(cx, op.op.run.group, op.op.run.start, op.op.run.end);
        for &(s, e) in &op.refs {
            // Pages read out of a tier must stay until the read is done.
            if e - s <= 1 << 16 {
                busy.extend((s..e).map(|p| (node, key.src, key.layer, p)));
            }
        }
    }
    for (node, tier, page, b) in admit {
        *incoming.entry((*node, *tier)).or_default() += b;
        busy.extend(
            (page.page..page.page + page.count.max(1)).map(|p| (*node, *tier, page.layer, p)),
        );
    }
    for (n, node) in cx.input.nodes.iter().enumerate() {
        for state in &node.tiers {
            let cap = state.capacity_bytes as f64;
            let incoming = incoming.get(&(n, state.tier)).copied().unwrap_or(0);
            let used = (state.capacity_bytes - state.free_bytes).saturating_add(incoming) as f64;
            if used <= cx.config.high_watermark * cap {
                continue;
            }
            let target = used - cx.config.low_watermark * cap;
            let below = Tier::ALL
                .into_iter()
                .find(|t| *t > state.tier && cx.tier(n, *t).is_some());
            let mut seen = HashSet::new();
            let mut candidates: Vec<(f64, u64, u32, u64)> = state
                .resident
                .iter()
                .filter(|p| !p.pinned && !busy.contains(&(n, state.tier, p.layer, p.page)))
                .filter(|p| seen.insert((p.layer, p.page)))
                .map(|p| {
                    // Losing a page with no tier below means recomputing it:
                    // price that as a read over a slow link.
                    let refetch = match below {
                        Some(t) => cx.copy_ns(n, t, p.bytes),
                        None => cx.copy_ns(n, state.tier, p.bytes).saturating_mul(100),
                    };
                    let score = (heat.get((p.layer, p.page), cx.now) + 1e-3) * refetch as f64;
                    (score, p.bytes, p.layer, p.page)
                })
                .collect();
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
            let mut freed = 0.0;
            for (_, b, layer, page) in candidates {
                if freed >= target {
                    break;
                }
                freed += b as f64;
                report.evicted_bytes += b;
                out.push(KvPageRef {
                    tensor: String::new(),
                    page,
                    head: 0,
                    layer,
                    location: cx.address(n, state.tier),
                    count: 1,
                });
            }
        }
    }
    out
}
