//! After order: prefix clusters and routing hints.
//!
//! Requests whose prompts are nearly the same (a shared system prompt, a
//! template with a few words swapped) need the same KV pages, but they share
//! them only on the node that holds them. This stage groups the window's
//! requests into prefix clusters and, for every cluster of two or more,
//! names the node that already holds most of the cluster's pages: a router
//! that sends such requests there reads their prefix from cache instead of
//! moving or recomputing it. The plan does not change; the hints go into
//! [`Report::route_hints`].
//!
//! Two families of clusters, numbered apart so that their ids never meet:
//!
//! - requests that carry prompt `tokens` are clustered with banded MinHash
//!   LSH ([`lsh::cluster`], settings from `lsh_bands`, `lsh_rows`,
//!   `lsh_shingle`); their clusters take the first ids;
//! - requests without tokens carry only block ids, content hashes as in the
//!   traces: equal ids are the same block, so their first `prefix_depth` ids
//!   group them exactly ([`lsh::prefix_clusters`]); their ids follow.
//!
//! A request with tokens and one without are never in one cluster: a token
//! similarity and a hash equality do not compare.
//!
//! Cost: one hash per request for the exact groups; MinHash signatures only
//! for the requests that carry tokens; the cluster's pages and the resident
//! lists are read only when some tier lists resident pages and some cluster
//! has two requests or more.

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use super::order::{Derived, PARALLEL_FROM};
use super::{Context, Report, RouteHint};
use crate::lsh;

/// Fills [`Report::route_hints`], unless the stage is off.
pub(crate) fn hints(cx: &Context<'_>, reqs: &[Derived], report: &mut Report) {
    // Positions go into the report as u32, like `credit_deferred`'s. With
    // one node there is nowhere else to send a request.
    if !cx.config.route_hints
        || cx.input.nodes.len() < 2
        || reqs.len() < 2
        || u32::try_from(reqs.len()).is_err()
    {
        return;
    }
    let (ids, count) = cluster_ids(cx, reqs);
    let Some(groups) = Groups::new(reqs, &ids, count) else {
        return;
    };
    let resident = resident_counts(cx, reqs, &groups);

    // Requests per node of the group at hand: a counter per node, reset
    // through the list of nodes touched, so a group costs its size.
    let mut serving = vec![0u32; cx.input.nodes.len()];
    let mut touched: Vec<u32> = Vec::new();
    let mut hints = Vec::with_capacity(groups.len());
    for k in 0..groups.len() {
        touched.clear();
        for &n in groups.nodes(k) {
            let slot = &mut serving[n as usize];
            if *slot == 0 {
                touched.push(n);
            }
            *slot += 1;
        }
        // Most requests served, then the lowest index.
        let busiest = touched
            .iter()
            .copied()
            .max_by(|&a, &b| {
                serving[a as usize]
                    .cmp(&serving[b as usize])
                    .then(b.cmp(&a))
            })
            .map_or((0, 0), |n| (n, 0u64));
        let serves = |n: u32| serving.get(n as usize).copied().unwrap_or(0);
        let (node, resident_pages) = resident
            .get(k)
            .into_iter()
            .flatten()
            .copied()
            .max_by(|&(na, ca), &(nb, cb)| {
                ca.cmp(&cb)
                    .then(serves(na).cmp(&serves(nb)))
                    .then(nb.cmp(&na))
            })
            .unwrap_or(busiest);
        hints.push(RouteHint {
            cluster: groups.ids[k],
            requests: groups.members(k).to_vec(),
            node: cx.node_name(node as usize),
            resident_pages,
            nodes_now: touched.len() as u32,
        });
        for &n in &touched {
            serving[n as usize] = 0;
        }
    }
    hints.sort_unstable_by_key(|h| (std::cmp::Reverse(h.requests.len()), h.cluster));
    report.route_hints = hints;
}

/// A cluster id per request (indexed like `reqs`) and the number of ids:
/// the LSH clusters of the requests with tokens first, then the exact
/// prefix groups of the others.
fn cluster_ids(cx: &Context<'_>, reqs: &[Derived]) -> (Vec<u32>, usize) {
    let requests = &cx.input.requests;
    let depth = cx.config.prefix_depth;
    let count = |ids: &[u32]| ids.iter().max().map_or(0, |&m| m as usize + 1);
    let tokens = |i: usize| requests[reqs[i].index].tokens.as_slice();
    let pages = |i: usize| requests[reqs[i].index].pages.as_slice();
    let has_tokens = |d: &Derived| !requests[d.index].tokens.is_empty();
    let any_tokens = if reqs.len() < PARALLEL_FROM {
        reqs.iter().any(has_tokens)
    } else {
        reqs.par_iter().with_min_len(4096).any(has_tokens)
    };
    // The usual window carries no tokens: no signature is built, and the
    // exact grouping's ids are used as they come.
    if !any_tokens {
        let ids = lsh::prefix_clusters_by(reqs.len(), depth, pages);
        let n = count(&ids);
        return (ids, n);
    }
    let (with, without): (Vec<usize>, Vec<usize>) =
        (0..reqs.len()).partition(|&i| !tokens(i).is_empty());
    let mut ids = vec![0u32; reqs.len()];
    let prompts: Vec<&[u32]> = with.iter().map(|&i| tokens(i)).collect();
    let found = lsh::cluster(&prompts, &cx.config.lsh());
    for (&i, &c) in with.iter().zip(&found) {
        ids[i] = c;
    }
    let first = count(&found);
    let mut n = first;
    if !without.is_empty() {
        let found = lsh::prefix_clusters_by(without.len(), depth, |j| pages(without[j]));
        // Both families are dense from 0 and hold at most `reqs.len()`
        // (< 2^32, checked by the caller) ids together, so the sum fits.
        for (&i, &c) in without.iter().zip(&found) {
            ids[i] = first as u32 + c;
        }
        n += count(&found);
    }
    (ids, n)
}

/// The clusters of two requests or more, with their members, in order of
/// cluster id. Members are kept as input positions with their node index,
/// read from `reqs` in one sequential pass, so that later passes never
/// reach back into the requests at random.
struct Groups {
    /// Cluster id of each group.
    ids: Vec<u32>,
    /// Members (positions in the input, ascending), group after group.
    members: Vec<u32>,
    /// The node index of each member, alongside `members`.
    nodes: Vec<u32>,
    /// Where each group's members start in `members`, plus the end.
    starts: Vec<usize>,
    /// The group of each request (indexed like `reqs`); `u32::MAX` for a
    /// request alone in its cluster.
    group_of: Vec<u32>,
}

impl Groups {
    /// Groups the requests by id (a counting sort: linear, and members stay
    /// in input order); `None` when no cluster has two requests.
    fn new(reqs: &[Derived], ids: &[u32], count: usize) -> Option<Groups> {
        let mut size = vec![0usize; count];
        for &c in ids {
            size[c as usize] += 1;
        }
        // Group slot of each cluster id; single requests get none.
        let mut slot = vec![usize::MAX; count];
        let mut group_ids = Vec::new();
        let mut starts = Vec::new();
        let mut total = 0;
        for (c, &s) in size.iter().enumerate() {
            if s >= 2 {
                slot[c] = group_ids.len();
                group_ids.push(c as u32);
                starts.push(total);
                total += s;
            }
        }
        if group_ids.is_empty() {
            return None;
        }
        starts.push(total);
        let mut fill = starts.clone();
        let mut members = vec![0u32; total];
        let mut nodes = vec![0u32; total];
        let mut group_of = vec![u32::MAX; ids.len()];
        for ((d, &c), group) in reqs.iter().zip(ids).zip(&mut group_of) {
            let k = slot[c as usize];
            if k != usize::MAX {
                // All fit: the caller checked the request count, and nodes
                // are at most `MAX_NODES`.
                members[fill[k]] = d.index as u32;
                nodes[fill[k]] = d.node as u32;
                *group = k as u32;
                fill[k] += 1;
            }
        }
        Some(Groups {
            ids: group_ids,
            members,
            nodes,
            starts,
            group_of,
        })
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// Input positions of group `k`'s requests.
    fn members(&self, k: usize) -> &[u32] {
        &self.members[self.starts[k]..self.starts[k + 1]]
    }

    /// Node indices of group `k`'s requests, alongside [`Groups::members`].
    fn nodes(&self, k: usize) -> &[u32] {
        &self.nodes[self.starts[k]..self.starts[k + 1]]
    }
}

/// For each group, the nodes holding any of its distinct pages resident (in
/// any tier, any layer), each with how many; empty when no tier lists
/// resident pages.
///
/// Each group's distinct pages go into one table, page to the list of its
/// groups (linked through one vector, so a page shared by many groups costs
/// one link each and no allocation); each resident entry then costs one
/// lookup. Nothing is sorted, and the requests are read in input order (in
/// a large window, reading them group by group would miss the cache on
/// every request).
fn resident_counts(cx: &Context<'_>, reqs: &[Derived], groups: &Groups) -> Vec<Vec<(u32, u64)>> {
    const END: u32 = u32::MAX;
    let nodes = &cx.input.nodes;
    let any_resident = nodes
        .iter()
        .any(|n| n.tiers.iter().any(|t| !t.resident.is_empty()));
    if !any_resident {
        return Vec::new();
    }
    let requests = &cx.input.requests;
    let mut heads: FxHashMap<u64, Page> = FxHashMap::default();
    let mut links: Vec<(u32, u32)> = Vec::new();
    let mut listed: FxHashSet<(u64, u32)> = FxHashSet::default();
    for (d, &group) in reqs.iter().zip(&groups.group_of) {
        if group == END {
            continue;
        }
        for &page in &requests[d.index].pages {
            let entry = heads.entry(page).or_insert(Page {
                head: END,
                group: END,
                node: END,
            });
            // The last group that listed the page answers most repeats
            // without the pair set (a request repeating a page, neighbours
            // in one cluster).
            if entry.group == group || !listed.insert((page, group)) {
                continue;
            }
            entry.group = group;
            links.push((group, entry.head));
            // Past 4 billion pairs (hundreds of GB of input) a list is cut
            // short rather than the planner failing.
            entry.head = u32::try_from(links.len() - 1).unwrap_or(END);
        }
    }
    drop(listed);

    let mut counts: Vec<Vec<(u32, u64)>> = vec![Vec::new(); groups.len()];
    let mut per_group = vec![0u64; groups.len()];
    let mut touched: Vec<u32> = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let n = n as u32;
        touched.clear();
        for r in node.tiers.iter().flat_map(|t| &t.resident) {
            let Some(entry) = heads.get_mut(&r.page) else {
                continue;
            };
            // A page held in two tiers, or for several layers, counts once.
            if entry.node == n {
                continue;
            }
            entry.node = n;
            let mut link = entry.head;
            while let Some(&(k, next)) = links.get(link as usize) {
                if per_group[k as usize] == 0 {
                    touched.push(k);
                }
                per_group[k as usize] += 1;
                link = next;
            }
        }
        for &k in &touched {
            counts[k as usize].push((n, per_group[k as usize]));
            per_group[k as usize] = 0;
        }
    }
    counts
}

/// A page of some group, in [`resident_counts`]' table.
struct Page {
    /// First link of the list of the page's groups (`u32::MAX`: none).
    head: u32,
    /// The last group that listed the page (a shortcut: the full record of
    /// which groups list it is the list itself).
    group: u32,
    /// The last node that counted the page.
    node: u32,
}
