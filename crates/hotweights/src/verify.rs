//! Verifying a swap plan before anyone executes it.
//!
//! [`verify`] runs every check a receiver or an operator would want before
//! trusting a plan, and returns all problems at once, each with its path:
//!
//! - the contract checks of [`bstack_plan::Validate`]: structure, items
//!   inside their bucket and not overlapping, every new or changed chunk of
//!   the `to` manifest staged, each byte of it exactly once, and the digest;
//! - no unchanged chunk staged (it would move for nothing);
//! - alignment of every item, and no bucket over the size limit when one is
//!   given;
//! - the transfer ops: each writes inside a bucket, only bytes that an item
//!   holds, from the file and offset where the `to` manifest puts that
//!   item, and together they fill every item;
//! - the manifests, when given: the plan's `from` and `to` are exactly them;
//! - consumers: ranks present (with `require_consumers`), inside the world,
//!   not repeated; and, with a TP-group map, every rank that consumes a
//!   tensor receives every bucket holding a piece of it.

use std::collections::{BTreeMap, BTreeSet};

use bstack_plan::{Problem, SwapPlan, Validate, WeightManifest};

use crate::delta;
use crate::plan::{TpGroups, parse_bucket_address};
use crate::source::EntryIndex;

/// What to check a plan against.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions<'a> {
    /// The manifest the plan must start from.
    pub prev: Option<&'a WeightManifest>,
    /// The manifest the plan must end at.
    pub next: Option<&'a WeightManifest>,
    /// Ranks are `0..world_size`.
    pub world_size: Option<u32>,
    /// Which ranks consume which tensors.
    pub groups: Option<&'a TpGroups>,
    /// Every bucket must name its consumer ranks.
    pub require_consumers: bool,
    /// Alignment every item must keep; `None` skips the check.
    pub align: Option<u64>,
    /// Largest allowed bucket capacity; `None` skips the check.
    pub bucket_limit: Option<u64>,
}

/// Every problem of `plan`, with its path. Empty means the plan is sound.
pub fn verify(plan: &SwapPlan, options: &VerifyOptions<'_>) -> Vec<Problem> {
    let mut out = plan.problems();
    let mut report = |path: String, message: String| out.push(Problem { path, message });

    if let (Some(expected), Some(actual)) = (options.prev, plan.from.as_ref()) {
        if has_entries(actual) {
            compare_manifest("from", expected, actual, &mut report);
        } else {
            compare_identity(expected, actual, &mut report);
        }
    }
    if let (Some(expected), Some(actual)) = (options.next, plan.to.as_ref()) {
        compare_manifest("to", expected, actual, &mut report);
    }
    // The full previous manifest: given, or carried by the plan.
    let prev = options
        .prev
        .or(plan.from.as_ref().filter(|m| has_entries(m)));
    if let (Some(prev), Some(to)) = (prev, plan.to.as_ref()) {
        check_nothing_unchanged_staged(plan, prev, to, &mut report);
        if !plan.from.as_ref().is_some_and(has_entries) {
            // validate() could not check this without the entries.
            for p in plan.unstaged_changes(prev) {
                report(p.path, p.message);
            }
        }
    }
    for (b, bucket) in plan.buckets.iter().enumerate() {
        if let Some(limit) = options.bucket_limit.filter(|&l| bucket.capacity > l) {
            report(
                format!("buckets[{b}].capacity"),
                format!("is {}, over the limit of {limit} bytes", bucket.capacity),
            );
        }
        if let Some(align) = options.align.filter(|&a| a > 0) {
            for (i, item) in bucket.items.iter().enumerate() {
                if item.bucket_offset % align != 0 {
                    report(
                        format!("buckets[{b}].items[{i}].bucket_offset"),
                        format!("is {}, not a multiple of {align}", item.bucket_offset),
                    );
                }
            }
        }
    }
    if let Some(to) = plan.to.as_ref() {
        check_ops(plan, to, &mut report);
    }
    check_consumers(plan, options, &mut report);
    out
}

fn has_entries(m: &WeightManifest) -> bool {
    !m.tensors.is_empty() || !m.files.is_empty()
}

/// A `from` given by identity: the fields it has must be the manifest's.
fn compare_identity(
    expected: &WeightManifest,
    actual: &WeightManifest,
    report: &mut impl FnMut(String, String),
) {
    let pairs = [
        (
            "model_id",
            actual.model_id.clone(),
            expected.model_id.clone(),
        ),
        ("version", actual.version.clone(), expected.version.clone()),
        (
            "hash_algorithm",
            actual.hash_algorithm.to_string(),
            expected.hash_algorithm.to_string(),
        ),
        (
            "chunk_bytes",
            actual.chunk_bytes.to_string(),
            expected.chunk_bytes.to_string(),
        ),
    ];
    for (name, a, b) in pairs {
        if a != b {
            report(
                format!("from.{name}"),
                format!("is {a:?}, the manifest given says {b:?}"),
            );
        }
    }
}

fn compare_manifest(
    field: &str,
    expected: &WeightManifest,
    actual: &WeightManifest,
    report: &mut impl FnMut(String, String),
) {
    if expected == actual {
        return;
    }
    for (name, a, b) in [
        ("model_id", &actual.model_id, &expected.model_id),
        ("version", &actual.version, &expected.version),
    ] {
        if a != b {
            report(
                format!("{field}.{name}"),
                format!("is {a:?}, the manifest given says {b:?}"),
            );
        }
    }
    let d = delta::compute(expected, actual);
    let differing = d.chunks_changed + d.tensors.removed.count + d.files.removed.count;
    if differing > 0 {
        report(
            field.to_owned(),
            format!(
                "differs from the manifest given: {} chunks differ, {} entries missing",
                d.chunks_changed,
                d.tensors.removed.count + d.files.removed.count
            ),
        );
    } else if actual.model_id == expected.model_id && actual.version == expected.version {
        report(
            field.to_owned(),
            "differs from the manifest given in its metadata (dtype, shape, offsets, hash function or chunk size)".into(),
        );
    }
}

fn check_nothing_unchanged_staged(
    plan: &SwapPlan,
    from: &WeightManifest,
    to: &WeightManifest,
    report: &mut impl FnMut(String, String),
) {
    let (old, new) = (EntryIndex::new(from), EntryIndex::new(to));
    for (b, bucket) in plan.buckets.iter().enumerate() {
        for (i, item) in bucket.items.iter().enumerate() {
            let (Some(o), Some(n)) = (
                old.chunk(item.is_file, &item.name, item.chunk),
                new.chunk(item.is_file, &item.name, item.chunk),
            ) else {
                continue;
            };
            if o.hash == n.hash && o.length == n.length && from.hash_algorithm == to.hash_algorithm
            {
                report(
                    format!("buckets[{b}].items[{i}]"),
                    format!("{} is unchanged but staged", n.describe()),
                );
            }
        }
    }
}

/// Ops must fill exactly the items' bytes, from the right place.
fn check_ops(plan: &SwapPlan, to: &WeightManifest, report: &mut impl FnMut(String, String)) {
    if plan.ops.is_empty() {
        return;
    }
    let index = EntryIndex::new(to);
    let buckets: BTreeMap<u32, usize> = plan
        .buckets
        .iter()
        .enumerate()
        .map(|(i, b)| (b.id, i))
        .collect();
    // Per bucket: the ops writing it, by destination offset.
    let mut writes: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (o, op) in plan.ops.iter().enumerate() {
        let Some(&b) = parse_bucket_address(&op.dst).and_then(|id| buckets.get(&id)) else {
            report(
                format!("ops[{o}].dst"),
                format!("{:?} is not the address of a bucket of this plan", op.dst),
            );
            continue;
        };
        let capacity = plan.buckets[b].capacity;
        if op.dst_offset.saturating_add(op.length) > capacity {
            report(
                format!("ops[{o}]"),
                format!(
                    "writes bytes [{}, {}) of bucket {}, whose capacity is {capacity}",
                    op.dst_offset,
                    op.dst_offset.saturating_add(op.length),
                    plan.buckets[b].id
                ),
            );
        }
        writes.entry(b).or_default().push(o);
    }
    for (b, bucket) in plan.buckets.iter().enumerate() {
        let mut ops = writes.remove(&b).unwrap_or_default();
        ops.sort_by_key(|&o| plan.ops[o].dst_offset);
        // Items by offset; validate() has already reported overlapping ones.
        let mut by_offset: Vec<usize> = (0..bucket.items.len()).collect();
        by_offset.sort_by_key(|&i| bucket.items[i].bucket_offset);
        let item_end = |i: usize| {
            let item = &bucket.items[i];
            item.bucket_offset.saturating_add(item.length)
        };
        // Each op must lie over items, and the source bytes must be the items'.
        for &o in &ops {
            let op = &plan.ops[o];
            let (start, end) = (op.dst_offset, op.dst_offset.saturating_add(op.length));
            let mut covered = 0u64;
            let first = by_offset.partition_point(|&i| item_end(i) <= start);
            for &i in by_offset[first..]
                .iter()
                .take_while(|&&i| bucket.items[i].bucket_offset < end)
            {
                let item = &bucket.items[i];
                let (is, ie) = (item.bucket_offset, item_end(i));
                let (lo, hi) = (start.max(is), end.min(ie));
                if lo >= hi {
                    continue;
                }
                covered += hi - lo;
                let Some((file, offset)) = index.item_location(item) else {
                    continue; // reported by validate()
                };
                // Saturating: the plan is unchecked input, and validate()
                // has already reported offsets that overflow.
                let expected_src = offset.saturating_add(lo - is);
                let actual_src = op.src_offset.saturating_add(lo - start);
                let right_file = op
                    .src
                    .strip_prefix("file://")
                    .is_some_and(|p| p.ends_with(&format!("/{file}")));
                if !right_file || expected_src != actual_src {
                    report(
                        format!("ops[{o}]"),
                        format!(
                            "fills buckets[{b}].items[{i}] from {} at byte {actual_src}, but the `to` manifest puts it in {file:?} at byte {expected_src}",
                            op.src
                        ),
                    );
                }
            }
            if covered < op.length {
                report(
                    format!("ops[{o}]"),
                    format!(
                        "writes {} bytes of bucket {} that no item holds",
                        op.length - covered,
                        bucket.id
                    ),
                );
            }
        }
        let op_end = |o: usize| plan.ops[o].dst_offset.saturating_add(plan.ops[o].length);
        for (i, item) in bucket.items.iter().enumerate() {
            let (is, ie) = (item.bucket_offset, item_end(i));
            // Ops of one bucket do not overlap (validate() checks), so the
            // ones ending after `is` and starting before `ie` are contiguous.
            let first = ops.partition_point(|&o| op_end(o) <= is);
            let filled: u64 = ops[first..]
                .iter()
                .take_while(|&&o| plan.ops[o].dst_offset < ie)
                .map(|&o| {
                    let (lo, hi) = (is.max(plan.ops[o].dst_offset), ie.min(op_end(o)));
                    hi.saturating_sub(lo)
                })
                .sum();
            if filled < item.length {
                report(
                    format!("buckets[{b}].items[{i}]"),
                    format!(
                        "only {filled} of its {} bytes are filled by ops",
                        item.length
                    ),
                );
            }
        }
    }
}

fn check_consumers(
    plan: &SwapPlan,
    options: &VerifyOptions<'_>,
    report: &mut impl FnMut(String, String),
) {
    if let Some(groups) = options.groups {
        for problem in groups.problems(options.world_size) {
            report("tp-groups".into(), problem);
        }
    }
    for (b, bucket) in plan.buckets.iter().enumerate() {
        let path = format!("buckets[{b}].consumer_ranks");
        if bucket.consumer_ranks.is_empty() {
            if options.require_consumers {
                report(
                    path,
                    "empty: name the ranks that consume this bucket".into(),
                );
            }
            continue;
        }
        let mut seen = BTreeSet::new();
        for &r in &bucket.consumer_ranks {
            if !seen.insert(r) {
                report(path.clone(), format!("rank {r} listed twice"));
            }
            if let Some(w) = options.world_size.filter(|&w| r >= w) {
                report(
                    path.clone(),
                    format!("rank {r} is outside the world of {w} ranks"),
                );
            }
        }
        let Some(groups) = options.groups else {
            continue;
        };
        // A bucket that names every rank of a known world reaches everyone.
        let reaches_all = options
            .world_size
            .is_some_and(|w| (0..w).all(|r| seen.contains(&r)));
        if reaches_all {
            continue;
        }
        for (i, item) in bucket.items.iter().enumerate() {
            if item.is_file {
                report(
                    format!("buckets[{b}].items[{i}]"),
                    format!(
                        "file {:?} is needed by every rank, but the bucket goes to ranks {:?} only",
                        item.name, bucket.consumer_ranks
                    ),
                );
                continue;
            }
            let Some(needed) = groups.ranks_for(&item.name) else {
                report(
                    format!("buckets[{b}].items[{i}]"),
                    format!(
                        "tensor {:?} matches no TP group, so every rank needs it, but the bucket goes to ranks {:?} only",
                        item.name, bucket.consumer_ranks
                    ),
                );
                continue;
            };
            let missing: Vec<u32> = needed.difference(&seen).copied().collect();
            if !missing.is_empty() {
                report(
                    format!("buckets[{b}].items[{i}]"),
                    format!(
                        "tensor {:?} is consumed by ranks {missing:?}, which this bucket does not reach",
                        item.name
                    ),
                );
            }
        }
    }
}
