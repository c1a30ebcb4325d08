//! `validate()` rejects each kind of defect, at the right path.
//!
//! Each property takes a valid generated value, breaks it in one specific
//! way, and requires a problem at the path of the broken field.

use bstack_plan::{Problem, TransferKind, Validate};
use proptest::prelude::*;

use crate::strategies;

/// Fails unless some problem is at `path` and mentions `needle`.
fn expect(problems: &[Problem], path: &str, needle: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        problems
            .iter()
            .any(|p| p.path == path && p.message.contains(needle)),
        "expected a problem at {path} mentioning {needle:?}, got {problems:#?}"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn zero_length_op(mut plan in strategies::cache_plan(), pick in any::<prop::sample::Index>()) {
        prop_assume!(!plan.ops.is_empty());
        let i = pick.index(plan.ops.len());
        plan.ops[i].length = 0;
        expect(&plan.problems(), &format!("ops[{i}].length"), "must be > 0")?;
    }

    #[test]
    fn overlapping_destinations(mut plan in strategies::cache_plan(), pick in any::<prop::sample::Index>(), shift in 0u64..64) {
        prop_assume!(!plan.ops.is_empty());
        let i = pick.index(plan.ops.len());
        let mut copy = plan.ops[i].clone();
        copy.dst_offset += shift.min(copy.length - 1);
        plan.ops.push(copy);
        let n = plan.ops.len() - 1;
        let problems = plan.problems();
        prop_assert!(
            problems.iter().any(|p| (p.path == format!("ops[{n}]") || p.path == format!("ops[{i}]")) && p.message.contains("also writes")),
            "{problems:#?}"
        );
    }

    #[test]
    fn window_ends_before_it_starts(mut plan in strategies::cache_plan(), back in 1u64..1000) {
        let w = plan.window.as_mut().unwrap();
        w.start_ns = w.end_ns + back;
        expect(&plan.problems(), "window.end_ns", "before start_ns")?;
    }

    #[test]
    fn swap_window_deadline_before_start(mut w in strategies::swap_window(), back in 1u64..1000) {
        w.t_start_ns += 2000;
        w.t_deadline_ns = w.t_start_ns - back;
        expect(&w.problems(), "t_deadline_ns", "before t_start_ns")?;
    }

    #[test]
    fn unknown_transfer_kind(mut plan in strategies::cache_plan(), pick in any::<prop::sample::Index>(), kind in 7i32..) {
        prop_assume!(!plan.ops.is_empty());
        let i = pick.index(plan.ops.len());
        plan.ops[i].kind = kind;
        expect(&plan.problems(), &format!("ops[{i}].kind"), "unknown transfer kind")?;
        plan.ops[i].kind = TransferKind::KindUnspecified as i32;
        expect(&plan.problems(), &format!("ops[{i}].kind"), "must be set")?;
    }

    #[test]
    fn bad_address(mut plan in strategies::cache_plan(), pick in any::<prop::sample::Index>(), junk in "[a-z ]{0,8}") {
        prop_assume!(!plan.ops.is_empty());
        let i = pick.index(plan.ops.len());
        plan.ops[i].src = junk;
        expect(&plan.problems(), &format!("ops[{i}].src"), "")?;
    }

    #[test]
    fn duplicate_tensor_names(mut m in strategies::manifest(), pick in any::<prop::sample::Index>()) {
        prop_assume!(!m.tensors.is_empty());
        let i = pick.index(m.tensors.len());
        let mut copy = m.tensors[i].clone();
        copy.file = "other.safetensors".into();
        m.tensors.push(copy);
        let n = m.tensors.len() - 1;
        expect(&m.problems(), &format!("tensors[{n}].name"), &format!("duplicate of tensors[{i}]"))?;
    }

    #[test]
    fn duplicate_page_in_evict(mut plan in strategies::cache_plan()) {
        prop_assume!(!plan.evict.is_empty());
        plan.evict.push(plan.evict[0].clone());
        let n = plan.evict.len() - 1;
        expect(&plan.problems(), &format!("evict[{n}]"), "duplicate of evict[0]")?;
    }

    #[test]
    fn chunks_that_do_not_tile(mut m in strategies::manifest(), pick in any::<prop::sample::Index>(), gap in 1u64..16) {
        let multi: Vec<usize> = (0..m.tensors.len()).filter(|&i| m.tensors[i].chunks.len() >= 2).collect();
        prop_assume!(!multi.is_empty());
        let i = multi[pick.index(multi.len())];
        m.tensors[i].chunks[1].offset += gap;
        expect(&m.problems(), &format!("tensors[{i}].chunks[1].offset"), "tile")?;
    }

    #[test]
    fn length_disagrees_with_shape(mut m in strategies::manifest(), pick in any::<prop::sample::Index>()) {
        prop_assume!(!m.tensors.is_empty());
        let i = pick.index(m.tensors.len());
        // Tripling the element count changes the byte count even for packed 4-bit types.
        m.tensors[i].shape.push(3);
        expect(&m.problems(), &format!("tensors[{i}].length"), "takes")?;
    }

    #[test]
    fn tampered_swap_plan(mut plan in strategies::swap_plan(), extra in 1u64..100) {
        plan.window.as_mut().unwrap().wave_end += extra;
        expect(&plan.problems(), "digest", "does not match")?;
        plan.digest.clear();
        expect(&plan.problems(), "digest", "missing")?;
    }

    #[test]
    fn bucket_item_past_capacity(mut plan in strategies::swap_plan()) {
        prop_assume!(plan.buckets.first().is_some_and(|b| !b.items.is_empty()));
        let b = &mut plan.buckets[0];
        b.items[0].bucket_offset = b.capacity;
        plan.seal();
        expect(&plan.problems(), "buckets[0].items[0]", "past the bucket's capacity")?;
    }

    #[test]
    fn partly_staged_chunk(mut plan in strategies::swap_plan()) {
        prop_assume!(plan.buckets.first().is_some_and(|b| b.items.first().is_some_and(|i| i.length >= 2)));
        plan.buckets[0].items[0].length -= 1;
        plan.seal();
        let problems = plan.problems();
        prop_assert!(problems.iter().any(|p| p.path == "buckets" && p.message.contains("only partly")), "{problems:#?}");
    }

    #[test]
    fn swap_range_reversed(mut w in strategies::wave_spec(), back in 1u64..10) {
        w.swap_end = w.swap_begin;
        w.swap_begin += back;
        expect(&w.problems(), "swap_end", "before swap_begin")?;
    }

    #[test]
    fn pack_order_not_a_permutation(mut w in strategies::wave_spec()) {
        prop_assume!(!w.pack_order.is_empty());
        let n = w.pack_order.len();
        w.pack_order.push(0);
        expect(&w.problems(), &format!("pack_order[{n}]"), "")?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn page_ranges_that_overlap(mut plan in strategies::cache_plan(), extra in 2u64..8) {
        prop_assume!(!plan.evict.is_empty());
        let mut wider = plan.evict[0].clone();
        wider.count = wider.count.max(1) + extra;
        plan.evict.push(wider);
        let n = plan.evict.len() - 1;
        expect(&plan.problems(), &format!("evict[{n}]"), "overlap evict[0]")?;
    }

    #[test]
    fn admitted_page_that_is_also_evicted(mut plan in strategies::cache_plan()) {
        prop_assume!(!plan.evict.is_empty());
        let mut page = plan.evict[0].clone();
        page.count = 1;
        plan.admit.push(page);
        let n = plan.admit.len() - 1;
        expect(&plan.problems(), &format!("admit[{n}]"), "also evicted by evict[0]")?;
    }

    #[test]
    fn changed_chunk_left_out_of_the_buckets(mut plan in strategies::swap_plan()) {
        prop_assume!(!plan.buckets.is_empty());
        plan.buckets.clear();
        plan.seal();
        expect(&plan.problems(), "buckets", "new or changed but in no bucket")?;
    }

    #[test]
    fn file_entries_that_overlap(mut m in strategies::manifest()) {
        prop_assume!(m.files.first().is_some_and(|f| f.length > 0));
        // The same file at a disjoint offset is fine ...
        let mut next = m.files[0].clone();
        next.offset += next.length;
        m.files.push(next);
        prop_assert!(!m.problems().iter().any(|p| p.path.starts_with("files")), "{:#?}", m.problems());
        // ... the same bytes twice are not.
        m.files.push(m.files[0].clone());
        let n = m.files.len() - 1;
        expect(&m.problems(), &format!("files[{n}]"), "also files[0]")?;
    }

    #[test]
    fn chunks_without_a_chunk_size(mut m in strategies::manifest()) {
        prop_assume!(m.tensors.iter().any(|t| !t.chunks.is_empty()) || m.files.iter().any(|f| !f.chunks.is_empty()));
        m.chunk_bytes = 0;
        let problems = m.problems();
        prop_assert!(problems.iter().any(|p| p.message.contains("chunk_bytes is 0")), "{problems:#?}");
    }

    #[test]
    fn page_location_inside_an_op(mut plan in strategies::cache_plan()) {
        prop_assume!(plan.ops.first().is_some_and(|op| !op.kv_refs.is_empty()));
        plan.ops[0].kv_refs[0].location = "tier://n0/cpu".into();
        expect(&plan.problems(), "ops[0].kv_refs[0].location", "must be empty")?;
    }
}

#[test]
fn overlapping_pieces_do_not_hide_a_gap() {
    let mut plan = bstack_plan::example::swap_plan();
    // Two pieces over the first half of a 4 KiB chunk: the second half is missing.
    let first = plan.buckets[0].items[0].clone();
    plan.buckets[0].items[0].length = 2048;
    plan.buckets[0].items.push(bstack_plan::BucketItem {
        length: 2048,
        bucket_offset: 8192 - 2048,
        ..first
    });
    plan.buckets[0].items.remove(1);
    plan.seal();
    let text: Vec<String> = plan.problems().iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|p| p.contains("already in another bucket item")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|p| p.contains("only partly in the buckets (2048 of 4096 bytes)")),
        "{text:#?}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut plan = bstack_plan::example::cache_plan();
    plan.plan_id.clear();
    plan.ops[0].length = 0;
    plan.ops[1].dst = "nowhere".into();
    plan.window = None;
    let text: Vec<String> = plan.problems().iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "plan_id: must not be empty",
            "ops[0].length: must be > 0",
            "ops[1].dst: no scheme; expected one of file:///abs/path, tier://NODE/TIER, \
             device://DEVICE[/RESOURCE], strata://KEY or tcp://HOST:PORT",
            "window: missing",
        ]
    );
}

/// The request-log statistics of a wave spec (cohorts, prefix histogram,
/// reuse distances, block shape), each rule broken on its own.
mod wave_spec_statistics {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn cohort_of_no_blocks(mut w in strategies::wave_spec(), pick in any::<prop::sample::Index>()) {
            prop_assume!(!w.cohorts.is_empty());
            let i = pick.index(w.cohorts.len());
            w.cohorts[i].depth = 0;
            w.cohorts[i].bytes = 0;
            expect(&w.problems(), &format!("cohorts[{i}].depth"), "must be >= 1")?;
        }

        #[test]
        fn cohort_of_one_request(mut w in strategies::wave_spec(), pick in any::<prop::sample::Index>(), requests in 0u64..2) {
            prop_assume!(!w.cohorts.is_empty());
            let i = pick.index(w.cohorts.len());
            w.cohorts[i].requests = requests;
            expect(&w.problems(), &format!("cohorts[{i}].requests"), "must be >= 2")?;
        }

        #[test]
        fn cohort_that_ends_before_it_starts(mut w in strategies::wave_spec(), pick in any::<prop::sample::Index>(), back in 1u64..1000) {
            prop_assume!(!w.cohorts.is_empty());
            let i = pick.index(w.cohorts.len());
            let c = &mut w.cohorts[i];
            c.first_ms = c.first_ms.max(back);
            c.last_ms = c.first_ms - back;
            expect(&w.problems(), &format!("cohorts[{i}].last_ms"), "before first_ms")?;
        }

        #[test]
        fn cohort_bytes_not_its_blocks(mut w in strategies::wave_spec(), pick in any::<prop::sample::Index>(), off in 1u64..1 << 20) {
            prop_assume!(!w.cohorts.is_empty() && w.block_bytes > 0);
            let i = pick.index(w.cohorts.len());
            let c = &mut w.cohorts[i];
            let expected = u64::from(c.depth) * w.block_bytes;
            c.bytes = expected.wrapping_add(off);
            let bytes = c.bytes;
            let both = format!("{bytes} is not depth {} x block_bytes {} = {expected}", c.depth, w.block_bytes);
            expect(&w.problems(), &format!("cohorts[{i}].bytes"), &both)?;
        }

        #[test]
        fn histogram_depth_zero(mut w in strategies::wave_spec()) {
            prop_assume!(!w.prefix_histogram.is_empty());
            w.prefix_histogram[0].depth = 0;
            expect(&w.problems(), "prefix_histogram[0].depth", "must be >= 1")?;
        }

        #[test]
        fn histogram_depths_that_do_not_increase(mut w in strategies::wave_spec(), pick in any::<prop::sample::Index>()) {
            prop_assume!(!w.prefix_histogram.is_empty());
            let i = pick.index(w.prefix_histogram.len());
            let mut again = w.prefix_histogram[i];
            again.requests = w.prefix_histogram.last().map_or(0, |d| d.requests);
            w.prefix_histogram.push(again);
            let n = w.prefix_histogram.len() - 1;
            expect(&w.problems(), &format!("prefix_histogram[{n}].depth"), "strictly increase")?;
        }

        #[test]
        fn histogram_requests_that_grow_with_depth(mut w in strategies::wave_spec(), more in 1u64..1000) {
            prop_assume!(w.prefix_histogram.last().is_some_and(|d| d.depth < u32::MAX && d.requests < u64::MAX - 1000));
            let last = w.prefix_histogram[w.prefix_histogram.len() - 1];
            w.prefix_histogram.push(bstack_plan::PrefixDepth {
                depth: last.depth + 1,
                requests: last.requests + more,
                prefixes: last.prefixes,
            });
            let n = w.prefix_histogram.len() - 1;
            expect(&w.problems(), &format!("prefix_histogram[{n}].requests"), "cannot be reused by more requests")?;
        }

        #[test]
        fn reuse_bounds_that_do_not_increase(mut w in strategies::wave_spec(), pick in any::<prop::sample::Index>()) {
            prop_assume!(!w.reuse_distances.is_empty());
            let i = pick.index(w.reuse_distances.len());
            let again = w.reuse_distances[i];
            w.reuse_distances.push(again);
            let n = w.reuse_distances.len() - 1;
            expect(&w.problems(), &format!("reuse_distances[{n}].max_distance"), "strictly increase")?;
        }

        #[test]
        fn block_bytes_without_block_tokens(mut w in strategies::wave_spec(), bytes in 1u64..1 << 40) {
            w.block_bytes = bytes;
            w.block_tokens = 0;
            expect(&w.problems(), "block_tokens", "must be > 0 when block_bytes is set")?;
        }

        #[test]
        fn block_tokens_without_block_bytes(mut w in strategies::wave_spec(), tokens in 1u32..4096) {
            w.block_bytes = 0;
            w.block_tokens = tokens;
            expect(&w.problems(), "block_bytes", "must be > 0 when block_tokens is set")?;
        }
    }

    #[test]
    fn every_statistics_problem_is_reported_at_once() {
        let mut w = bstack_plan::example::wave_spec();
        w.block_tokens = 0;
        w.cohorts[0].depth = 0;
        w.cohorts[1].requests = 1;
        w.cohorts[1].bytes = 5;
        w.cohorts[2].last_ms = 0;
        w.prefix_histogram[1].depth = 1;
        w.prefix_histogram[2].requests = 500;
        w.reuse_distances[3].max_distance = 4_096;
        let text: Vec<String> = w.problems().iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "block_tokens: must be > 0 when block_bytes is set (67108864)",
                "cohorts[0].depth: must be >= 1",
                "cohorts[0].bytes: 805306368 is not depth 0 x block_bytes 67108864 = 0",
                "cohorts[1].requests: must be >= 2",
                "cohorts[1].bytes: 5 is not depth 4 x block_bytes 67108864 = 268435456",
                "cohorts[2].last_ms: 0 is before first_ms 140002",
                "prefix_histogram[1].depth: 1 is not above prefix_histogram[0].depth 1: \
                 depths strictly increase",
                "prefix_histogram[2].requests: 500 is more than prefix_histogram[1].requests \
                 141: a deeper prefix cannot be reused by more requests",
                "reuse_distances[3].max_distance: 4096 is not above \
                 reuse_distances[2].max_distance 4096: bounds strictly increase",
            ]
        );
    }

    #[test]
    fn the_example_statistics_are_consistent() {
        let w = bstack_plan::example::wave_spec();
        assert_eq!(w.problems(), vec![]);
        assert_eq!(w.block_bytes, 2 * 32 * 8 * 128 * 2 * 512);
        assert_eq!(w.block_tokens, 512);
        assert!(!w.cohorts.is_empty() && !w.prefix_histogram.is_empty());
        assert_eq!(
            w.reuse_distances.last().map(|b| b.max_distance),
            Some(u64::MAX)
        );
    }
}
