//! The mmap tier: objects survive a reopen and a killed process, freed space
//! is reused, eviction never takes a pinned object and never starts when it
//! cannot succeed, damage is caught, a region has one opener.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use proptest::prelude::*;
use stratacache::{ArtifactKey, CustomKey, Error, Meta, MmapOptions, MmapTier, Tier};

fn key(i: u64) -> ArtifactKey {
    ArtifactKey::Custom(CustomKey {
        namespace: "test".into(),
        name: format!("k{i}"),
    })
}

/// Bytes that name their key and version, so a mix-up shows.
fn payload(i: u64, version: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i.wrapping_mul(31) ^ version.wrapping_mul(131) ^ (j as u64 * 7)) as u8)
        .collect()
}

/// A region of `blocks` 4096-byte blocks: the 128-byte region header, then
/// the blocks. `BLOCK_PAYLOAD` bytes under key `k0`..`k9` fill one block
/// exactly (40 header + 12 key + 32 metadata + 4000 = 4084, padded to 4096).
const BLOCK_PAYLOAD: usize = 4000;

fn region(blocks: u64) -> MmapOptions {
    MmapOptions {
        size_bytes: 128 + blocks * 4096,
        ..MmapOptions::default()
    }
}

fn open(path: &Path, options: MmapOptions) -> MmapTier {
    MmapTier::open(path, options).unwrap()
}

fn bytes_of(tier: &MmapTier, k: u64) -> Option<Vec<u8>> {
    tier.get(&key(k)).unwrap().map(|o| o.bytes.to_vec())
}

#[test]
fn objects_round_trip_replace_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    let tier = open(&path, region(16));
    assert_eq!(tier.name(), "mmap");
    assert!(tier.can_pin());
    let meta = Meta {
        dtype: "bf16".into(),
        shape: vec![2, 3],
        ..Meta::default()
    };
    tier.put(&key(1), meta.clone(), &payload(1, 0, 100))
        .unwrap();
    let got = tier.get(&key(1)).unwrap().unwrap();
    assert_eq!(&*got.bytes, payload(1, 0, 100).as_slice());
    assert_eq!(got.meta.length, 100);
    assert_eq!(got.meta.shape, vec![2, 3]);
    assert_eq!(got.meta.checksum, stratacache::checksum(&got.bytes));
    assert!(tier.contains(&key(1)).unwrap());
    assert!(tier.get(&key(2)).unwrap().is_none());
    tier.put(&key(1), meta, &payload(1, 1, 50)).unwrap();
    assert_eq!(&*got.bytes, payload(1, 0, 100).as_slice(), "a copy");
    assert_eq!(bytes_of(&tier, 1).unwrap(), payload(1, 1, 50));
    tier.put(&key(2), Meta::default(), &[]).unwrap();
    assert_eq!(bytes_of(&tier, 2).unwrap(), Vec::<u8>::new());
    let stats = tier.stats();
    assert_eq!((stats.objects, stats.bytes), (2, 50));
    assert_eq!((stats.hits, stats.misses), (3, 1));
    let mut listed: Vec<_> = tier.list().unwrap().into_iter().map(|e| e.0).collect();
    listed.sort();
    assert_eq!(listed, vec![key(1), key(2)]);
    assert!(tier.delete(&key(1)).unwrap());
    assert!(!tier.delete(&key(1)).unwrap());
    assert!(tier.delete(&key(2)).unwrap());
    assert_eq!(tier.stats().bytes, 0);
    // Everything merged back into one free block.
    let data = tier.region_len() - 128;
    assert_eq!(tier.free_bytes(), (data, data));
    tier.flush().unwrap();
}

#[test]
fn a_reopened_region_keeps_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    {
        let tier = open(&path, region(16));
        for i in 0..8 {
            tier.put(
                &key(i),
                Meta::default(),
                &payload(i, 0, 100 * i as usize + 1),
            )
            .unwrap();
        }
        tier.put(&key(3), Meta::default(), &payload(3, 9, 777))
            .unwrap();
        tier.delete(&key(5)).unwrap();
    }
    // Size 0: the region's own.
    let tier = open(&path, MmapOptions::default());
    assert_eq!(tier.region_len(), 128 + 16 * 4096);
    for i in 0..8 {
        let want = match i {
            3 => Some(payload(3, 9, 777)),
            5 => None,
            _ => Some(payload(i, 0, 100 * i as usize + 1)),
        };
        assert_eq!(bytes_of(&tier, i), want, "key {i}");
    }
    // New sequence numbers follow the old: a replacement after reopen wins
    // over the old copy on the next reopen.
    tier.put(&key(3), Meta::default(), &payload(3, 10, 5))
        .unwrap();
    drop(tier);
    let tier = open(&path, MmapOptions::default());
    assert_eq!(bytes_of(&tier, 3), Some(payload(3, 10, 5)));
    drop(tier);
    // A region's size is fixed.
    let err = MmapTier::open(&path, region(32)).unwrap_err().to_string();
    assert!(
        err.contains("size_bytes") && err.contains("region"),
        "{err}"
    );
    // Without create, a missing file is an error naming it.
    let missing = dir.path().join("missing");
    let err = MmapTier::open(
        &missing,
        MmapOptions {
            create: false,
            ..region(4)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn ordered_writes_keep_the_same_contents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    let synced = MmapOptions {
        sync_writes: true,
        ..region(8)
    };
    {
        let tier = open(&path, synced.clone());
        fill(&tier, 0..8);
        tier.delete(&key(3)).unwrap();
        tier.put(&key(8), Meta::default(), &payload(8, 0, 100))
            .unwrap();
        tier.flush().unwrap();
    }
    let tier = open(&path, synced);
    assert_eq!(tier.stats().objects, 8);
    assert_eq!(bytes_of(&tier, 8), Some(payload(8, 0, 100)));
    assert_eq!(bytes_of(&tier, 7), Some(payload(7, 0, BLOCK_PAYLOAD)));
    assert!(bytes_of(&tier, 3).is_none());
}

#[test]
fn a_file_that_is_not_a_region_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    std::fs::write(&path, vec![7u8; 100_000]).unwrap();
    let err = MmapTier::open(&path, region(4)).unwrap_err().to_string();
    assert!(err.contains("not a stratacache mmap region"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 100_000]);
    // Shorter than a region header, still not ours.
    std::fs::write(&path, b"hello").unwrap();
    let err = MmapTier::open(&path, region(4)).unwrap_err().to_string();
    assert!(err.contains("not a stratacache mmap region"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    // A new file needs a size.
    let new = dir.path().join("new");
    let err = MmapTier::open(&new, MmapOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("size_bytes") && err.contains("new"), "{err}");
    assert!(!new.exists());
    // An all-zero file is formatted at its own size.
    std::fs::write(&new, vec![0u8; 128 + 4 * 4096 + 10]).unwrap();
    let tier = open(&new, MmapOptions::default());
    assert_eq!(tier.region_len(), 128 + 4 * 4096);
}

#[test]
fn a_second_opener_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    let tier = open(&path, region(4));
    let err = MmapTier::open(&path, region(4)).unwrap_err().to_string();
    assert!(
        err.contains("already open") && err.contains(&path.display().to_string()),
        "{err}"
    );
    drop(tier);
    open(&path, region(4));
}

fn fill(tier: &MmapTier, keys: std::ops::Range<u64>) {
    for i in keys {
        tier.put(&key(i), Meta::default(), &payload(i, 0, BLOCK_PAYLOAD))
            .unwrap();
    }
}

#[test]
fn deleted_space_is_reused_without_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(&dir.path().join("region"), region(10));
    fill(&tier, 0..10);
    assert_eq!(tier.free_bytes(), (0, 0), "ten blocks fill the region");
    for i in [1, 4, 5, 8] {
        assert!(tier.delete(&key(i)).unwrap());
    }
    // 4 and 5 merged into one 8192-byte block.
    assert_eq!(tier.free_bytes(), (4 * 4096, 2 * 4096));
    let big = payload(45, 0, 2 * 4096 - 100);
    tier.put(&key(45), Meta::default(), &big).unwrap();
    tier.put(&key(1), Meta::default(), &payload(1, 1, BLOCK_PAYLOAD))
        .unwrap();
    tier.put(&key(8), Meta::default(), &payload(8, 1, BLOCK_PAYLOAD))
        .unwrap();
    assert_eq!(tier.stats().evictions, 0);
    assert_eq!(tier.free_bytes().0, 0);
    for i in [0, 2, 3, 6, 7, 9] {
        assert_eq!(
            bytes_of(&tier, i),
            Some(payload(i, 0, BLOCK_PAYLOAD)),
            "{i}"
        );
    }
    assert_eq!(bytes_of(&tier, 45), Some(big));
    assert_eq!(bytes_of(&tier, 8), Some(payload(8, 1, BLOCK_PAYLOAD)));
}

#[test]
fn a_full_region_evicts_the_least_recently_used_never_a_pinned_one() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(&dir.path().join("region"), region(4));
    fill(&tier, 0..4);
    // 0 is the least recent but pinned; 1 is touched; 2 is next.
    assert!(tier.pin(&key(0)).unwrap());
    bytes_of(&tier, 1).unwrap();
    tier.put(&key(4), Meta::default(), &payload(4, 0, BLOCK_PAYLOAD))
        .unwrap();
    assert_eq!(tier.stats().evictions, 1);
    assert!(!tier.contains(&key(2)).unwrap());
    for i in [0, 1, 3, 4] {
        assert_eq!(
            bytes_of(&tier, i),
            Some(payload(i, 0, BLOCK_PAYLOAD)),
            "{i}"
        );
    }
    // Two blocks' worth: pinned 0 stays, so the two least recent of the
    // others that lie next to each other go.
    let big = payload(5, 0, 8000);
    tier.put(&key(5), Meta::default(), &big).unwrap();
    assert_eq!(bytes_of(&tier, 0), Some(payload(0, 0, BLOCK_PAYLOAD)));
    assert_eq!(bytes_of(&tier, 5), Some(big));
    assert!(tier.stats().bytes <= tier.stats().capacity_bytes);
    // Unpinned, 0 can go too.
    assert!(tier.unpin(&key(0)).unwrap());
    tier.put(&key(6), Meta::default(), &payload(6, 0, 4 * 4096 - 200))
        .unwrap();
    assert_eq!(tier.stats().objects, 1);
    assert!(tier.get(&key(0)).unwrap().is_none());
}

#[test]
fn when_everything_is_pinned_a_put_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(&dir.path().join("region"), region(4));
    fill(&tier, 0..4);
    for i in 0..4 {
        assert!(tier.pin(&key(i)).unwrap());
    }
    let err = tier
        .put(&key(9), Meta::default(), &payload(9, 0, 100))
        .unwrap_err();
    assert!(err.is_full(), "{err}");
    assert!(err.to_string().contains("custom/test/k9"), "{err}");
    let stats = tier.stats();
    assert_eq!((stats.objects, stats.evictions), (4, 0));
    for i in 0..4 {
        assert_eq!(
            bytes_of(&tier, i),
            Some(payload(i, 0, BLOCK_PAYLOAD)),
            "{i}"
        );
    }
    assert!(!tier.contains(&key(9)).unwrap());
}

#[test]
fn eviction_does_not_start_when_it_cannot_make_a_large_enough_block() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(&dir.path().join("region"), region(6));
    fill(&tier, 0..6);
    // Every other block pinned: evicting all the rest leaves 4096-byte
    // holes, never the two contiguous blocks an 8000-byte object needs.
    for i in [0, 2, 4] {
        tier.pin(&key(i)).unwrap();
    }
    let err = tier
        .put(&key(9), Meta::default(), &payload(9, 0, 8000))
        .unwrap_err();
    assert!(err.is_full(), "{err}");
    assert_eq!(tier.stats().evictions, 0);
    assert_eq!(tier.stats().objects, 6);
    // One block's worth can be made.
    tier.put(&key(9), Meta::default(), &payload(9, 0, BLOCK_PAYLOAD))
        .unwrap();
    assert_eq!(tier.stats().evictions, 1);
}

#[test]
fn a_replacement_may_reuse_its_own_space_and_keeps_its_pins() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(&dir.path().join("region"), region(2));
    fill(&tier, 0..2);
    tier.pin(&key(0)).unwrap();
    tier.pin(&key(1)).unwrap();
    // Nothing else may go and there is no room beside it: the old copy of
    // 1 is freed first.
    tier.put(&key(1), Meta::default(), &payload(1, 1, BLOCK_PAYLOAD))
        .unwrap();
    assert_eq!(bytes_of(&tier, 1), Some(payload(1, 1, BLOCK_PAYLOAD)));
    assert_eq!(tier.stats().evictions, 0);
    // Still pinned: a put needing 1's block fails.
    let err = tier
        .put(&key(2), Meta::default(), &payload(2, 0, 100))
        .unwrap_err();
    assert!(err.is_full(), "{err}");
}

#[test]
fn an_object_larger_than_the_region_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tier = open(&dir.path().join("region"), region(4));
    fill(&tier, 0..2);
    let err = tier
        .put(&key(9), Meta::default(), &payload(9, 0, 4 * 4096))
        .unwrap_err();
    assert!(err.is_full(), "{err}");
    assert!(err.to_string().contains("do not fit"), "{err}");
    assert_eq!(tier.stats().objects, 2);
    assert_eq!(tier.stats().evictions, 0);
}

/// Offset of the first occurrence of `needle` in the file.
fn find(path: &Path, needle: &[u8]) -> usize {
    let data = std::fs::read(path).unwrap();
    data.windows(needle.len())
        .position(|w| w == needle)
        .expect("bytes in the file")
}

/// Flips a bit in place (no truncation: the file may be mapped).
fn flip_byte(path: &Path, at: usize) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at as u64).unwrap();
    file.write_all_at(&[b[0] ^ 0x40], at as u64).unwrap();
}

#[test]
fn a_damaged_payload_is_corrupt_once_then_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    let body = payload(1, 0, 3000);
    {
        let tier = open(&path, region(8));
        tier.put(&key(1), Meta::default(), &body).unwrap();
        tier.put(&key(2), Meta::default(), &payload(2, 0, 3000))
            .unwrap();
    }
    flip_byte(&path, find(&path, &body) + 1234);
    let tier = open(&path, MmapOptions::default());
    let err = tier.get(&key(1)).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("custom/test/k1"), "{err}");
    assert!(tier.get(&key(1)).unwrap().is_none());
    assert!(!tier.contains(&key(1)).unwrap());
    assert_eq!(bytes_of(&tier, 2), Some(payload(2, 0, 3000)));
    // The block was freed: its space takes a new object.
    tier.put(&key(3), Meta::default(), &payload(3, 0, 3000))
        .unwrap();
    drop(tier);
    let tier = open(&path, MmapOptions::default());
    assert_eq!(tier.stats().objects, 2);
    assert_eq!(bytes_of(&tier, 3), Some(payload(3, 0, 3000)));
}

#[test]
fn damage_while_open_is_caught_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    let tier = open(&path, region(8));
    let body = payload(1, 0, 3000);
    tier.put(&key(1), Meta::default(), &body).unwrap();
    // The file and the shared mapping are the same pages.
    flip_byte(&path, find(&path, &body) + 10);
    assert!(matches!(
        tier.get(&key(1)).unwrap_err(),
        Error::Corrupt { .. }
    ));
    assert!(tier.get(&key(1)).unwrap().is_none());
}

#[test]
fn a_broken_block_header_fails_open_unless_repairing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    {
        let tier = open(&path, region(8));
        fill(&tier, 0..4);
    }
    // The third block's header (4096-byte blocks from offset 128).
    let at = 128 + 2 * 4096 + 20;
    flip_byte(&path, at);
    let err = MmapTier::open(&path, MmapOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("offset {}", 128 + 2 * 4096)) && err.contains("repair"),
        "{err}"
    );
    let tier = open(
        &path,
        MmapOptions {
            repair: true,
            ..MmapOptions::default()
        },
    );
    assert_eq!(tier.stats().objects, 2);
    for i in 0..2 {
        assert_eq!(bytes_of(&tier, i), Some(payload(i, 0, BLOCK_PAYLOAD)));
    }
    assert_eq!(tier.free_bytes().0, 6 * 4096);
    drop(tier);
    // Repaired for good.
    assert_eq!(open(&path, MmapOptions::default()).stats().objects, 2);
}

#[test]
fn a_crash_between_a_replacement_and_freeing_the_old_copy_keeps_the_new() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    let tier = open(&path, region(4));
    tier.put(&key(1), Meta::default(), &payload(1, 0, BLOCK_PAYLOAD))
        .unwrap();
    tier.flush().unwrap();
    // The old copy's header, at the first block.
    let file = std::fs::File::open(&path).unwrap();
    let mut old_head = [0u8; 40];
    file.read_exact_at(&mut old_head, 128).unwrap();
    tier.put(&key(1), Meta::default(), &payload(1, 1, BLOCK_PAYLOAD))
        .unwrap();
    drop(tier);
    // Undo the freeing of the old copy: the region as a crash right after
    // the new copy's commit leaves it, two objects under one key.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&old_head, 128).unwrap();
    drop(file);
    let tier = open(&path, MmapOptions::default());
    assert_eq!(tier.stats().objects, 1);
    assert_eq!(bytes_of(&tier, 1), Some(payload(1, 1, BLOCK_PAYLOAD)));
    // The old copy's block was freed (and merged with the free tail).
    assert_eq!(tier.free_bytes(), (3 * 4096, 2 * 4096));
    tier.put(&key(1), Meta::default(), &payload(1, 2, BLOCK_PAYLOAD))
        .unwrap();
    drop(tier);
    let tier = open(&path, MmapOptions::default());
    assert_eq!(bytes_of(&tier, 1), Some(payload(1, 2, BLOCK_PAYLOAD)));
}

#[test]
fn threads_never_see_another_keys_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let tier = std::sync::Arc::new(open(&dir.path().join("region"), region(16)));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let tier = tier.clone();
            std::thread::spawn(move || {
                let mut seed = t + 1;
                for _ in 0..3000 {
                    let r = next_random(&mut seed);
                    let i = r % 64;
                    let len = (r >> 8) as usize % 6000;
                    match r % 3 {
                        0 => tier
                            .put(&key(i), Meta::default(), &payload(i, 0, len))
                            .unwrap(),
                        1 => {
                            if let Some(o) = tier.get(&key(i)).unwrap() {
                                assert_eq!(*o.bytes, *payload(i, 0, o.bytes.len()));
                            }
                        }
                        _ => {
                            tier.delete(&key(i)).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(tier.stats().evictions > 0, "the region was meant to fill");
}

fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
enum Op {
    Put(u64, u64, usize),
    Delete(u64),
    Get(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..8u64, any::<u64>(), 0..3000usize).prop_map(|(k, v, l)| Op::Put(k, v, l)),
        2 => (0..8u64).prop_map(Op::Delete),
        2 => (0..8u64).prop_map(Op::Get),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Sized so that nothing is ever evicted (at most 9 live blocks of at
    /// most 3136 bytes in 200 KiB leave a gap of over 17 KiB somewhere), so
    /// the tier must match the model exactly, across reopens.
    #[test]
    fn the_tier_matches_a_model_across_reopens(ops in prop::collection::vec(op(), 1..48)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let options = MmapOptions { size_bytes: 200 * 1024, ..MmapOptions::default() };
        let mut tier = open(&path, options.clone());
        let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
        for op in ops {
            match op {
                Op::Put(k, v, l) => {
                    let body = payload(k, v, l);
                    tier.put(&key(k), Meta::default(), &body).unwrap();
                    model.insert(k, body);
                }
                Op::Delete(k) => {
                    prop_assert_eq!(tier.delete(&key(k)).unwrap(), model.remove(&k).is_some());
                }
                Op::Get(k) => {
                    prop_assert_eq!(bytes_of(&tier, k), model.get(&k).cloned());
                }
                Op::Reopen => {
                    drop(tier);
                    tier = open(&path, options.clone());
                }
            }
            prop_assert_eq!(tier.stats().evictions, 0);
        }
        for k in 0..8 {
            prop_assert_eq!(bytes_of(&tier, k), model.get(&k).cloned(), "key {}", k);
        }
        let stats = tier.stats();
        prop_assert_eq!(stats.objects, model.len() as u64);
        prop_assert_eq!(stats.bytes, model.values().map(|b| b.len() as u64).sum::<u64>());
        drop(tier);
        let tier = open(&path, options);
        for k in 0..8 {
            prop_assert_eq!(bytes_of(&tier, k), model.get(&k).cloned(), "key {} after reopen", k);
        }
    }
}

const CRASH_PATH: &str = "STRATACACHE_MMAP_CRASH_PATH";
const CRASH_SEED: &str = "STRATACACHE_MMAP_CRASH_SEED";
const CRASH_KEYS: u64 = 24;
const CRASH_REGION: &str = "STRATACACHE_MMAP_CRASH_REGION";

/// The child of the crash tests: puts,
/// replaces and deletes until killed, announcing each operation before it
/// starts (`@DO`) and after it returns (`@OK`). Does nothing when run by
/// hand.
#[test]
#[ignore = "run as a child process by the crash tests"]
fn crash_child() {
    let (Ok(path), Ok(seed), Ok(size)) = (
        std::env::var(CRASH_PATH),
        std::env::var(CRASH_SEED),
        std::env::var(CRASH_REGION),
    ) else {
        return;
    };
    let mut seed: u64 = seed.parse().unwrap();
    let version_base = seed << 32;
    let tier = open(
        Path::new(&path),
        MmapOptions {
            size_bytes: size.parse().unwrap(),
            ..MmapOptions::default()
        },
    );
    let mut out = std::io::stdout().lock();
    for n in 0u64.. {
        let r = next_random(&mut seed);
        let k = r % CRASH_KEYS;
        let version = version_base + n;
        if r % 10 < 7 {
            // Up to 64 KiB: long copies, so the kill often lands in one.
            let len = (r >> 16) as usize % (64 << 10);
            let body = crash_payload(k, version, len);
            writeln_flush(&mut out, &format!("@DO put {k} {version} {len}"));
            tier.put(&key(k), Meta::default(), &body).unwrap();
        } else {
            writeln_flush(&mut out, &format!("@DO delete {k}"));
            tier.delete(&key(k)).unwrap();
        }
        writeln_flush(&mut out, "@OK");
    }
}

/// A megabyte of random bytes, the same in parent and child: the child's
/// payloads are slices of it, so making one costs a copy and the kill
/// mostly lands inside the tier, not in the test's own loop.
fn pool() -> &'static [u8] {
    static POOL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let mut seed = 42;
        (0..(1 << 17))
            .flat_map(|_| next_random(&mut seed).to_le_bytes())
            .collect()
    })
}

fn crash_payload(k: u64, version: u64, len: usize) -> Vec<u8> {
    let pool = pool();
    let start =
        (k.wrapping_mul(1_000_003) ^ version.wrapping_mul(7919)) as usize % (pool.len() - len);
    pool[start..start + len].to_vec()
}

fn writeln_flush(out: &mut impl std::io::Write, line: &str) {
    // A leading newline: the test harness may have printed part of a line.
    writeln!(out, "\n{line}").unwrap();
    out.flush().unwrap();
}

/// What the model expects of a key: absent, or the payload of a put.
type Value = Option<(u64, usize)>;

fn parse_do(line: &str) -> (u64, Value) {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["@DO", "put", k, v, l] => (
            k.parse().unwrap(),
            Some((v.parse().unwrap(), l.parse().unwrap())),
        ),
        ["@DO", "delete", k] => (k.parse().unwrap(), None),
        _ => panic!("unexpected line from the child: {line:?}"),
    }
}

fn expected(k: u64, v: Value) -> Option<Vec<u8>> {
    v.map(|(version, len)| crash_payload(k, version, len))
}

/// With room for every key (24 of at most 64 KiB, in 16 MiB), nothing is
/// evicted: every acknowledged operation must be found.
#[test]
fn a_killed_writer_loses_nothing_acknowledged() {
    crash_rounds(16 << 20, 16, false);
}

/// In a region a third the size of the data, puts evict all the time: a
/// key may be missing, but what is returned is whole and current.
#[test]
fn a_killed_writer_that_evicts_never_leaves_stale_or_torn_objects() {
    crash_rounds(512 << 10, 8, true);
}

/// Runs the crash child `rounds` times on one region of `size` bytes,
/// killing it at a random point each time, and checks the reopened region
/// against the acknowledged operations.
fn crash_rounds(size: u64, rounds: u64, evicting: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("region");
    let mut model: HashMap<u64, Value> = HashMap::new();
    let mut pause_seed = 7 + size;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["mmap::crash_child", "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CRASH_PATH, &path)
            .env(CRASH_SEED, (round + 1).to_string())
            .env(CRASH_REGION, size.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let target = 100 + round * 10;
        let mut acks = 0u64;
        let mut pending: Option<(u64, Value)> = None;
        let mut killed = false;
        let mut line = String::new();
        loop {
            line.clear();
            let n = lines.read_line(&mut line).unwrap();
            // Only whole lines count: a line cut by the kill was not
            // acknowledged.
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            let text = line.trim();
            if text.starts_with("@DO") {
                assert!(pending.is_none(), "two operations in flight");
                pending = Some(parse_do(text));
            } else if text == "@OK" {
                let (k, v) = pending.take().expect("@OK without @DO");
                model.insert(k, v);
                acks += 1;
                if acks == target && !killed {
                    // Let it run on for a moment of varying length, so
                    // that the kill lands anywhere in its loop.
                    let pause = next_random(&mut pause_seed) % 1500;
                    std::thread::sleep(std::time::Duration::from_micros(pause));
                    child.kill().unwrap();
                    killed = true;
                }
            }
        }
        let status = child.wait().unwrap();
        if !killed {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("the child stopped by itself after {acks} acks ({status}): {err}");
        }

        let tier = open(&path, MmapOptions::default());
        let mut present = 0;
        for k in 0..CRASH_KEYS {
            let got = tier
                .get(&key(k))
                .unwrap_or_else(|e| panic!("round {round}, key {k}: {e}"))
                .map(|o| o.bytes.to_vec());
            let before = model.get(&k).copied().flatten();
            let want = expected(k, before);
            match pending {
                _ if evicting && got.is_none() => {
                    model.insert(k, None);
                }
                Some((pk, after)) if pk == k && got != want => {
                    // The operation in flight happened, whole.
                    assert_eq!(
                        got,
                        expected(k, after),
                        "round {round}, key {k}: neither before nor after the operation in flight"
                    );
                    model.insert(k, after);
                }
                _ => assert_eq!(
                    got, want,
                    "round {round}, key {k}: an acknowledged operation was lost"
                ),
            }
            present += usize::from(got.is_some());
        }
        assert_eq!(tier.stats().objects, present as u64, "round {round}");
    }
}
