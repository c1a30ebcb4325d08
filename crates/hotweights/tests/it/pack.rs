//! `pack`: first-fit decreasing bucket packing with alignment and splitting.
//!
//! The properties checked on random inputs are the packer's whole contract:
//! every byte of every piece placed exactly once, buckets within the limit,
//! parts aligned and disjoint, the first-fit invariant (hence at most about
//! twice the optimal bucket count), and determinism.

use std::collections::BTreeMap;

use hotweights::pack::{PackedBucket, Piece, align_up, pack};
use proptest::prelude::*;

/// A packing case: piece lengths, the limit and the alignment.
#[derive(Debug, Clone)]
struct Case {
    lengths: Vec<u64>,
    limit: u64,
    align: u64,
}

/// Random cases: an alignment from 1 to 4 KiB, a limit from one to a few
/// dozen alignment units (not always a multiple of the alignment), and
/// pieces from 0 to 3 limits long, with exact multiples of the (rounded)
/// limit, their neighbours, tiny pieces and empty ones over-represented.
fn cases() -> impl Strategy<Value = Case> {
    (0u32..=12, 1u64..=40, 0u64..4096).prop_flat_map(|(align_log, units, extra)| {
        let align = 1u64 << align_log;
        // At least one alignment unit, sometimes with a ragged remainder.
        let limit = units * align + extra % align;
        let rounded = limit - limit % align;
        let length = prop_oneof![
            1 => Just(0u64),
            4 => 1..3 * rounded,
            2 => (1u64..=3).prop_map(move |k| k * rounded),
            2 => (1u64..=3, prop::bool::ANY).prop_map(move |(k, up)| {
                if up { k * rounded + 1 } else { k * rounded - 1 }
            }),
            2 => 1..=align.min(rounded) * 2,
        ];
        prop::collection::vec(length, 0..60).prop_map(move |lengths| Case {
            lengths,
            limit,
            align,
        })
    })
}

fn pieces(lengths: &[u64]) -> Vec<Piece> {
    lengths
        .iter()
        .enumerate()
        .map(|(id, &length)| Piece { id, length })
        .collect()
}

/// Checks every property of a packing; returns a description of the first
/// violation.
fn check(case: &Case, buckets: &[PackedBucket]) -> Result<(), String> {
    let limit = case.limit - case.limit % case.align;
    let align = case.align;
    // Parts of each piece, as (piece_offset, length).
    let mut parts: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
    for (b, bucket) in buckets.iter().enumerate() {
        if bucket.used > limit {
            return Err(format!("bucket {b} uses {} > limit {limit}", bucket.used));
        }
        if bucket.used % align != 0 {
            return Err(format!("bucket {b}: used {} is not aligned", bucket.used));
        }
        if bucket.parts.is_empty() {
            return Err(format!("bucket {b} is empty"));
        }
        let mut end = 0;
        for (k, p) in bucket.parts.iter().enumerate() {
            if p.length == 0 {
                return Err(format!("bucket {b} part {k} is empty"));
            }
            if p.bucket_offset % align != 0 {
                return Err(format!(
                    "bucket {b} part {k} at {} is not a multiple of {align}",
                    p.bucket_offset
                ));
            }
            if p.bucket_offset < end {
                return Err(format!(
                    "bucket {b} part {k} at {} overlaps the previous part, which ends at {end}",
                    p.bucket_offset
                ));
            }
            end = p.bucket_offset + p.length;
            if end > bucket.used {
                return Err(format!(
                    "bucket {b} part {k} ends at {end}, past used {}",
                    bucket.used
                ));
            }
            parts
                .entry(p.id)
                .or_default()
                .push((p.piece_offset, p.length));
        }
        if bucket.used != align_up(end, align) {
            return Err(format!(
                "bucket {b}: used {} but its last part ends at {end}",
                bucket.used
            ));
        }
    }

    // Every piece covered exactly once; empty pieces not at all.
    for (id, &length) in case.lengths.iter().enumerate() {
        let mut spans = parts.remove(&id).unwrap_or_default();
        spans.sort_unstable();
        let mut at = 0;
        for (offset, len) in spans {
            if offset != at {
                return Err(format!(
                    "piece {id} ({length} bytes): part at {offset}, expected {at}"
                ));
            }
            at += len;
        }
        if at != length {
            return Err(format!("piece {id}: {at} of {length} bytes placed"));
        }
    }
    if let Some(id) = parts.keys().next() {
        return Err(format!("a part names piece {id}, which does not exist"));
    }

    // First fit: a part went to bucket j only because it did not fit in any
    // earlier bucket, and buckets only fill up, so for every i < j,
    // used_i + length > limit (whole-limit parts trivially satisfy this).
    let mut least_used = u64::MAX;
    for (j, bucket) in buckets.iter().enumerate() {
        if j > 0 {
            for p in &bucket.parts {
                if least_used + p.length <= limit {
                    return Err(format!(
                        "bucket {j} holds a {}-byte part that fits an earlier bucket using {least_used}",
                        p.length
                    ));
                }
            }
        }
        least_used = least_used.min(bucket.used);
    }

    // Hence no two buckets are both at most half full, so the count is at
    // most 2 * (aligned bytes / limit) + 1: within twice the optimum.
    let aligned: u64 = case
        .lengths
        .iter()
        .map(|&l| l / limit * limit + align_up(l % limit, align))
        .sum();
    let bound = 2 * aligned.div_ceil(limit) + 1;
    if buckets.len() as u64 > bound {
        return Err(format!(
            "{} buckets for {aligned} aligned bytes with limit {limit}: more than {bound}",
            buckets.len()
        ));
    }
    if aligned == 0 && !buckets.is_empty() {
        return Err("buckets for nothing".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_byte_placed_once_aligned_and_within_the_limit(case in cases()) {
        let input = pieces(&case.lengths);
        let buckets = pack(&input, case.limit, case.align).unwrap();
        if let Err(e) = check(&case, &buckets) {
            prop_assert!(false, "{e}\n{buckets:#?}");
        }
        // The same input packs the same way.
        prop_assert_eq!(pack(&input, case.limit, case.align).unwrap(), buckets);
    }
}

#[test]
fn the_checker_rejects_a_broken_packing() {
    // The property test is only as good as `check`: it must fail on packings
    // that break each rule.
    let case = Case {
        lengths: vec![300, 100],
        limit: 1024,
        align: 256,
    };
    let good = pack(&pieces(&case.lengths), case.limit, case.align).unwrap();
    check(&case, &good).unwrap();
    assert_eq!(good.len(), 1);

    let mut overlapping = good.clone();
    overlapping[0].parts[1].bucket_offset = 256;
    assert!(check(&case, &overlapping).unwrap_err().contains("overlaps"));

    let mut misaligned = good.clone();
    misaligned[0].parts[1].bucket_offset = 520;
    assert!(
        check(&case, &misaligned)
            .unwrap_err()
            .contains("not a multiple")
    );

    let mut short = good.clone();
    short[0].parts[1].length = 99;
    assert!(check(&case, &short).unwrap_err().contains("99 of 100"));

    // 100 bytes alone in a second bucket although the first has room.
    let mut split = good.clone();
    let part = split[0].parts.pop().unwrap();
    split[0].used = 512;
    split.push(PackedBucket {
        used: 256,
        parts: vec![hotweights::pack::Placement {
            bucket_offset: 0,
            ..part
        }],
    });
    assert!(
        check(&case, &split)
            .unwrap_err()
            .contains("fits an earlier bucket")
    );
}

#[test]
fn exact_multiples_fill_whole_buckets() {
    let buckets = pack(&pieces(&[3072, 1024, 0]), 1024, 256).unwrap();
    assert_eq!(buckets.len(), 4);
    assert!(
        buckets
            .iter()
            .all(|b| b.used == 1024 && b.parts.len() == 1 && b.parts[0].bucket_offset == 0)
    );
    let offsets: Vec<(usize, u64)> = buckets
        .iter()
        .map(|b| (b.parts[0].id, b.parts[0].piece_offset))
        .collect();
    assert_eq!(offsets, [(0, 0), (0, 1024), (0, 2048), (1, 0)]);
}

#[test]
fn a_ragged_limit_rounds_down_to_the_alignment() {
    // 1000 with 256-byte alignment is 768: a 768-byte piece fills a bucket,
    // a 769-byte one needs two.
    let buckets = pack(&pieces(&[768, 769]), 1000, 256).unwrap();
    assert!(buckets.iter().all(|b| b.used <= 768));
    assert_eq!(buckets.len(), 3);
}

#[test]
fn bad_options_are_errors() {
    for (limit, align) in [(1024, 0), (1024, 3), (1024, 384), (100, 256), (0, 1)] {
        let err = pack(&pieces(&[10]), limit, align).unwrap_err();
        assert!(
            matches!(err, hotweights::HotweightsError::Option(_)),
            "{limit}/{align}: {err}"
        );
    }
}

/// 200k pieces, about two per bucket: a packer that scans every open
/// bucket for each piece does 10^10 steps (minutes); the max-tree packs
/// them in milliseconds. Not timed, so it cannot flake; a quadratic
/// regression shows up as a suite that hangs.
#[test]
fn two_hundred_thousand_pieces_pack_without_a_quadratic_scan() {
    const N: usize = 200_000;
    // Lengths 97..=128 all round up to 128: two per 256-byte bucket.
    let lengths: Vec<u64> = (0..N as u64).map(|i| 97 + i % 32).collect();
    let case = Case {
        lengths,
        limit: 256,
        align: 128,
    };
    let buckets = pack(&pieces(&case.lengths), case.limit, case.align).unwrap();
    assert_eq!(buckets.len(), N / 2);
    assert!(buckets.iter().all(|b| b.parts.len() == 2 && b.used == 256));
    // Largest first: the first bucket holds two of the 128-byte pieces.
    assert!(buckets[0].parts.iter().all(|p| p.length == 128));

    // And one piece split into 200k bucket-sized parts plus a tail.
    let huge = pack(&pieces(&[N as u64 * 4096 + 5]), 4096, 256).unwrap();
    assert_eq!(huge.len(), N + 1);
    assert_eq!(huge[N].parts[0].piece_offset, N as u64 * 4096);
    assert_eq!(huge[N].used, 256);
}
