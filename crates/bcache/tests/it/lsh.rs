//! Prefix clustering: banded MinHash LSH on tokens, exact grouping on block
//! hashes.

use std::collections::HashSet;

use bcache::Error;
use bcache::lsh::{
    LshConfig, cluster, collision_probability, jaccard_estimate, prefix_clusters,
    prefix_clusters_by, signature, threshold,
};
use proptest::prelude::*;

/// A splitmix64 generator: small, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A token from a 50 000-token vocabulary.
    fn token(&mut self) -> u32 {
        self.below(50_000) as u32
    }

    fn prompt(&mut self, len: usize) -> Vec<u32> {
        (0..len).map(|_| self.token()).collect()
    }

    /// `base` with `changes` random positions set to random tokens.
    fn near_duplicate(&mut self, base: &[u32], changes: usize) -> Vec<u32> {
        let mut copy = base.to_vec();
        for _ in 0..changes {
            let at = self.below(copy.len());
            copy[at] = self.token();
        }
        copy
    }
}

fn refs(prompts: &[Vec<u32>]) -> Vec<&[u32]> {
    prompts.iter().map(Vec::as_slice).collect()
}

/// The exact Jaccard similarity of two prompts' 4-token shingle sets.
fn true_jaccard(a: &[u32], b: &[u32], k: usize) -> f64 {
    let a: HashSet<&[u32]> = a.windows(k).collect();
    let b: HashSet<&[u32]> = b.windows(k).collect();
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

fn distinct(ids: &[u32]) -> usize {
    ids.iter().collect::<HashSet<_>>().len()
}

/// Ids are dense and numbered in order of first appearance.
fn assert_dense_first_appearance(ids: &[u32]) {
    let mut next = 0;
    for &id in ids {
        assert!(id <= next, "id {id} skips ahead of {next} in {ids:?}");
        if id == next {
            next += 1;
        }
    }
}

#[test]
fn near_duplicates_form_one_cluster() {
    let mut rng = Rng(1);
    let base = rng.prompt(512);
    let prompts: Vec<Vec<u32>> = (0..50).map(|_| rng.near_duplicate(&base, 5)).collect();
    let ids = cluster(&refs(&prompts), &LshConfig::default());
    assert_eq!(ids, vec![0; 50]);
}

#[test]
fn unrelated_prompts_form_one_cluster_each() {
    let mut rng = Rng(2);
    let prompts: Vec<Vec<u32>> = (0..50).map(|_| rng.prompt(512)).collect();
    let ids = cluster(&refs(&prompts), &LshConfig::default());
    assert_eq!(ids, (0..50).collect::<Vec<u32>>());
}

#[test]
fn mixed_groups_and_strangers_are_separated() {
    let mut rng = Rng(3);
    // (group, prompt): group 0..3 are near-duplicates of a base, None are unrelated.
    let mut items: Vec<(Option<usize>, Vec<u32>)> = Vec::new();
    for group in 0..3 {
        let base = rng.prompt(512);
        for _ in 0..20 {
            items.push((Some(group), rng.near_duplicate(&base, 5)));
        }
    }
    for _ in 0..10 {
        items.push((None, rng.prompt(512)));
    }
    // Fisher-Yates, so groups are interleaved.
    for i in (1..items.len()).rev() {
        let j = rng.below(i + 1);
        items.swap(i, j);
    }
    let prompts: Vec<&[u32]> = items.iter().map(|(_, p)| p.as_slice()).collect();
    let ids = cluster(&prompts, &LshConfig::default());

    assert_eq!(distinct(&ids), 3 + 10);
    assert_eq!(ids[0], 0);
    assert_dense_first_appearance(&ids);
    let mut group_ids = Vec::new();
    for group in 0..3 {
        let members: HashSet<u32> = items
            .iter()
            .zip(&ids)
            .filter(|((g, _), _)| *g == Some(group))
            .map(|(_, &id)| id)
            .collect();
        assert_eq!(members.len(), 1, "group {group} split into {members:?}");
        group_ids.extend(members);
    }
    let strangers: Vec<u32> = items
        .iter()
        .zip(&ids)
        .filter(|((g, _), _)| g.is_none())
        .map(|(_, &id)| id)
        .collect();
    assert_eq!(distinct(&strangers), 10);
    assert!(strangers.iter().all(|id| !group_ids.contains(id)));
}

#[test]
fn clustering_is_deterministic_in_parallel() {
    // 300 prompts take the parallel path; the answer must not depend on it.
    let mut rng = Rng(4);
    let bases: Vec<Vec<u32>> = (0..30).map(|_| rng.prompt(256)).collect();
    let prompts: Vec<Vec<u32>> = (0..300)
        .map(|i| rng.near_duplicate(&bases[i % 30], 3))
        .collect();
    let cfg = LshConfig::default();
    let first = cluster(&refs(&prompts), &cfg);
    for _ in 0..3 {
        assert_eq!(cluster(&refs(&prompts), &cfg), first);
    }
    assert_eq!(distinct(&first), 30);
    // Prompt i belongs to base i % 30, which first appears at index i % 30.
    assert!(
        first
            .iter()
            .enumerate()
            .all(|(i, &id)| id == (i % 30) as u32)
    );
    // Small inputs take the sequential path and agree with it.
    assert_eq!(cluster(&refs(&prompts[..40]), &cfg), first[..40]);

    let p = &prompts[0];
    assert_eq!(signature(p, &cfg), signature(p, &cfg));
    let reseeded = LshConfig { seed: 7, ..cfg };
    assert_ne!(signature(p, &cfg), signature(p, &reseeded));
}

#[test]
fn jaccard_estimate_tracks_true_jaccard() {
    let mut rng = Rng(5);
    let base = rng.prompt(512);
    let default = LshConfig::default();
    // 256 values: the standard error is at most 0.031, so 0.1 is over 3 sigma.
    let wide = LshConfig {
        bands: 64,
        rows: 4,
        ..default
    };
    let half: Vec<u32> = base[..256].iter().copied().chain(rng.prompt(256)).collect();
    let cases = [
        (rng.near_duplicate(&base, 5), default),
        (rng.near_duplicate(&base, 5), wide),
        (rng.near_duplicate(&base, 40), wide),
        (half, wide),
        (rng.prompt(512), default),
    ];
    for (other, cfg) in &cases {
        let truth = true_jaccard(&base, other, cfg.shingle);
        let estimate = jaccard_estimate(&signature(&base, cfg), &signature(other, cfg));
        assert!(
            (estimate - truth).abs() < 0.1,
            "estimate {estimate} vs true {truth}"
        );
    }
    assert_eq!(jaccard_estimate(&[], &[1, 2]), 0.0);
    assert_eq!(jaccard_estimate(&[1, 2, 3], &[1, 2, 4]), 2.0 / 3.0);
}

#[test]
fn signature_handles_short_and_empty_prompts() {
    let cfg = LshConfig::default();
    assert_eq!(signature(&[], &cfg).len(), 64);
    assert_eq!(signature(&[1, 2], &cfg), signature(&[1, 2], &cfg));
    assert_ne!(signature(&[1, 2], &cfg), signature(&[1, 2, 3], &cfg));
    assert_ne!(signature(&[], &cfg), signature(&[0], &cfg));
    let ids = cluster(&[&[1, 2], &[], &[1, 2], &[], &[3]], &cfg);
    assert_eq!(ids, vec![0, 1, 0, 1, 2]);
    assert_eq!(cluster(&[], &cfg), Vec::<u32>::new());
}

#[test]
fn collision_probability_is_the_s_curve() {
    let cfg = LshConfig::default();
    assert_eq!(collision_probability(0.0, &cfg), 0.0);
    assert_eq!(collision_probability(1.0, &cfg), 1.0);
    assert!(collision_probability(0.92, &cfg) > 1.0 - 1e-8);
    assert!(collision_probability(0.1, &cfg) < 0.002);
    let mut last = 0.0;
    for i in 0..=100 {
        let p = collision_probability(f64::from(i) / 100.0, &cfg);
        assert!(p >= last);
        last = p;
    }
    let t = threshold(&cfg);
    assert!((t - 0.5).abs() < 1e-12);
    let at = collision_probability(t, &cfg);
    assert!((0.5..0.7).contains(&at), "{at}");
    assert_eq!(collision_probability(f64::NAN, &cfg), 0.0);
    assert_eq!(collision_probability(2.0, &cfg), 1.0);
}

#[test]
fn prefix_clusters_group_by_exact_block_prefix() {
    let requests: Vec<&[u64]> = vec![
        &[1, 2, 3, 4], // 0
        &[1, 2, 3, 9], // same first 3 blocks
        &[1, 2],       // shorter than depth: key is [1, 2]
        &[5, 2, 3],    // differs at block 0
        &[1, 2],       // same short key
        &[],           // empty key
        &[1, 2, 3],    // exactly depth
        &[],
    ];
    assert_eq!(prefix_clusters(&requests, 3), vec![0, 0, 1, 2, 1, 3, 0, 3]);
    // With depth 2 the short lists join the long ones.
    assert_eq!(prefix_clusters(&requests, 2), vec![0, 0, 0, 1, 0, 2, 0, 2]);
    assert_eq!(prefix_clusters(&requests, 0), vec![0; 8]);
    assert_eq!(prefix_clusters(&[], 3), Vec::<u32>::new());
    let deep = prefix_clusters(&requests, 100);
    assert_eq!(deep, vec![0, 1, 2, 3, 2, 4, 5, 4]);
}

#[test]
fn prefix_clusters_in_parallel_equal_the_first_appearance_numbering() {
    // Above the parallel threshold (32 768): keys of 0 to 5 blocks from a
    // small alphabet, so that clusters are many, large, and nested in each
    // other (`[1, 2]` and `[1, 2, 0]` must stay apart).
    let mut rng = Rng(11);
    let lists: Vec<Vec<u64>> = (0..50_000)
        .map(|_| {
            let len = rng.below(6);
            (0..len).map(|_| rng.below(3) as u64).collect()
        })
        .collect();
    let refs: Vec<&[u64]> = lists.iter().map(Vec::as_slice).collect();
    for depth in [0, 1, 3, 5] {
        let mut seen: std::collections::HashMap<&[u64], u32> = Default::default();
        let expected: Vec<u32> = refs
            .iter()
            .map(|l| {
                let next = seen.len() as u32;
                *seen.entry(&l[..depth.min(l.len())]).or_insert(next)
            })
            .collect();
        assert_eq!(prefix_clusters(&refs, depth), expected, "depth {depth}");
        let by = prefix_clusters_by(refs.len(), depth, |i| refs[i]);
        assert_eq!(by, expected, "depth {depth}");
    }
}

#[test]
fn validate_rejects_zero_counts() {
    assert!(LshConfig::default().validate().is_ok());
    for (cfg, key) in [
        (
            LshConfig {
                bands: 0,
                ..LshConfig::default()
            },
            "bands",
        ),
        (
            LshConfig {
                rows: 0,
                ..LshConfig::default()
            },
            "rows",
        ),
        (
            LshConfig {
                shingle: 0,
                ..LshConfig::default()
            },
            "shingle",
        ),
    ] {
        match cfg.validate() {
            Err(Error::Config { origin, message }) => {
                assert_eq!(origin, "lsh");
                assert!(message.contains(key), "{message}");
            }
            other => panic!("{key} = 0 gave {other:?}"),
        }
    }
    let huge = LshConfig {
        bands: usize::MAX,
        rows: 2,
        ..LshConfig::default()
    };
    assert!(matches!(huge.validate(), Err(Error::Config { .. })));
}

#[test]
fn config_reads_from_json_with_defaults() {
    let cfg: LshConfig = serde_json::from_str(r#"{"bands": 20, "rows": 5}"#).unwrap();
    assert_eq!(
        cfg,
        LshConfig {
            bands: 20,
            rows: 5,
            ..LshConfig::default()
        }
    );
    assert!(serde_json::from_str::<LshConfig>(r#"{"band": 20}"#).is_err());
}

proptest! {
    #[test]
    fn cluster_ids_are_dense_and_copies_agree(
        prompts in prop::collection::vec(prop::collection::vec(0u32..20, 0..12), 0..30)
    ) {
        let cfg = LshConfig { shingle: 2, ..LshConfig::default() };
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let ids = cluster(&refs, &cfg);
        prop_assert_eq!(ids.len(), prompts.len());
        assert_dense_first_appearance(&ids);
        for i in 0..prompts.len() {
            for j in 0..i {
                if prompts[i] == prompts[j] {
                    prop_assert_eq!(ids[i], ids[j]);
                }
            }
        }
    }
}
