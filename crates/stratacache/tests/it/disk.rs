//! The disk tier: round trips, restarts with and without a snapshot,
//! corruption and torn tails, capacity (compaction, eviction, pins), threads,
//! and a process killed with SIGKILL in the middle of writing.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use stratacache::record::{HEADER_LEN, Header, Kind};
use stratacache::{ArtifactKey, CustomKey, DiskOptions, DiskTier, Error, Meta, Tier, checksum};

fn key(i: u64) -> ArtifactKey {
    ArtifactKey::Custom(CustomKey {
        namespace: "test".into(),
        name: format!("k{i}"),
    })
}

/// splitmix64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bytes that name their key (and a version), so a mix-up shows.
fn payload(i: u64, len: usize) -> Vec<u8> {
    versioned(i, 0, len)
}

fn versioned(i: u64, version: u64, len: usize) -> Vec<u8> {
    let seed = mix(i ^ (version << 32));
    let mut v = vec![0u8; len];
    for (j, c) in v.chunks_mut(8).enumerate() {
        let x = mix(seed ^ j as u64).to_le_bytes();
        c.copy_from_slice(&x[..c.len()]);
    }
    v
}

fn opts(capacity_bytes: u64, segment_bytes: u64) -> DiskOptions {
    DiskOptions {
        capacity_bytes,
        segment_bytes,
        ..DiskOptions::default()
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("seg-") && name.ends_with(".log")
        })
        .collect();
    out.sort();
    out
}

fn files_bytes(dir: &Path) -> u64 {
    segments(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

/// Every record of a segment file: (offset, header, key bytes).
fn records(path: &Path) -> Vec<(u64, Header, Vec<u8>)> {
    let bytes = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(h) = Header::parse(&bytes[at..]) {
        let key = bytes[at + HEADER_LEN..at + HEADER_LEN + h.key_len as usize].to_vec();
        out.push((at as u64, h, key));
        at += h.total_len() as usize;
    }
    out
}

/// The file and payload offset of the newest object record of `k`.
fn payload_location(dir: &Path, k: &ArtifactKey) -> (PathBuf, u64, u64) {
    let encoded = k.encode().unwrap();
    let mut found = None;
    for path in segments(dir) {
        for (at, h, key) in records(&path) {
            if key == encoded && h.kind == Kind::Object {
                found = Some((path.clone(), at + h.payload_offset(), h.payload_len));
            }
        }
    }
    found.unwrap()
}

/// What a process crash leaves: the files as they are now (every
/// returned write is in them), with no snapshot written at exit. The tier
/// itself is then dropped; `dir` becomes the copy.
fn crash(tier: DiskTier, dir: &mut tempfile::TempDir) {
    let copy = copy_dir(dir.path());
    drop(tier);
    *dir = copy;
}

fn assert_intact(tier: &DiskTier, i: u64, len: usize) {
    let got = tier
        .get(&key(i))
        .unwrap()
        .unwrap_or_else(|| panic!("k{i} missing"));
    assert_eq!(got.bytes.len(), len, "k{i}");
    assert!(*got.bytes == *payload(i, len), "k{i} has other bytes");
}

#[test]
fn objects_round_trip_with_their_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path().join("new/sub"), DiskOptions::default()).unwrap();
    assert_eq!(tier.name(), "disk");
    assert!(tier.can_pin());
    let meta = Meta {
        dtype: "bf16".into(),
        shape: vec![2, 3, 4],
        codec: "raw".into(),
        length: 999,
        created_ns: 42,
        checksum: 7,
    };
    tier.put(&key(1), meta.clone(), &payload(1, 5000)).unwrap();
    let got = tier.get(&key(1)).unwrap().unwrap();
    assert!(*got.bytes == *payload(1, 5000));
    // Length and checksum are the tier's; the rest is the caller's.
    assert_eq!(
        got.meta,
        Meta {
            length: 5000,
            checksum: checksum(&payload(1, 5000)),
            ..meta.clone()
        }
    );
    tier.put(&key(2), Meta::default(), &[]).unwrap();
    assert_eq!(tier.get(&key(2)).unwrap().unwrap().bytes.len(), 0);
    assert!(tier.get(&key(3)).unwrap().is_none());
    tier.put(&key(1), meta, &payload(9, 10)).unwrap();
    assert!(*tier.get(&key(1)).unwrap().unwrap().bytes == *payload(9, 10));
    let stats = tier.stats();
    assert_eq!((stats.objects, stats.bytes), (2, 10));
    assert_eq!((stats.hits, stats.misses), (3, 1));
    let mut listed: Vec<String> = tier
        .list()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, ["custom/test/k1", "custom/test/k2"]);
    assert!(tier.contains(&key(1)).unwrap());
    assert!(tier.delete(&key(1)).unwrap());
    assert!(!tier.delete(&key(1)).unwrap());
    assert!(!tier.contains(&key(1)).unwrap());
    assert_eq!(tier.stats().bytes, 0);
}

#[test]
fn synced_writes_round_trip_and_survive_a_crash() {
    let mut dir = tempfile::tempdir().unwrap();
    let o = || DiskOptions {
        sync_on_put: true,
        ..opts(1 << 20, 4 << 10)
    };
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    for i in 0..10 {
        tier.put(&key(i), Meta::default(), &payload(i, 1000))
            .unwrap();
    }
    assert!(tier.delete(&key(0)).unwrap());
    crash(tier, &mut dir);
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    assert!(!tier.contains(&key(0)).unwrap());
    for i in 1..10 {
        assert_intact(&tier, i, 1000);
    }
}

#[test]
fn a_restart_keeps_every_object() {
    let dir = tempfile::tempdir().unwrap();
    let lens: Vec<usize> = (0..300).map(|i| (mix(i) % 3000) as usize).collect();
    {
        let tier = DiskTier::open(dir.path(), opts(1 << 30, 16 << 10)).unwrap();
        for (i, &len) in lens.iter().enumerate() {
            let meta = Meta {
                dtype: format!("t{i}"),
                ..Meta::default()
            };
            tier.put(&key(i as u64), meta, &payload(i as u64, len))
                .unwrap();
        }
    }
    assert!(segments(dir.path()).len() > 5, "several segments");
    assert!(dir.path().join("index.snap").exists());
    let tier = DiskTier::open(dir.path(), opts(1 << 30, 16 << 10)).unwrap();
    assert_eq!(tier.stats().objects, 300);
    for (i, &len) in lens.iter().enumerate() {
        assert_intact(&tier, i as u64, len);
        let meta = tier.get(&key(i as u64)).unwrap().unwrap().meta;
        assert_eq!(meta.dtype, format!("t{i}"));
    }
    // And it goes on appending after a restart.
    tier.put(&key(1000), Meta::default(), &payload(1000, 77))
        .unwrap();
    drop(tier);
    let tier = DiskTier::open(dir.path(), opts(1 << 30, 16 << 10)).unwrap();
    assert_eq!(tier.stats().objects, 301);
    assert_intact(&tier, 1000, 77);
}

/// Writes after the last snapshot (the process died without flushing) are
/// found by the recovery scan; without a snapshot, or with a damaged one,
/// the index is rebuilt from the segments alone.
#[test]
fn writes_past_the_last_snapshot_are_recovered() {
    let mut dir = tempfile::tempdir().unwrap();
    let o = || opts(1 << 30, 8 << 10);
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    for i in 0..40 {
        tier.put(&key(i), Meta::default(), &payload(i, 500))
            .unwrap();
    }
    tier.flush().unwrap();
    for i in 40..80 {
        tier.put(&key(i), Meta::default(), &payload(i, 700))
            .unwrap();
    }
    for i in 0..10 {
        tier.put(&key(i), Meta::default(), &payload(i, 300))
            .unwrap();
    }
    for i in 10..20 {
        assert!(tier.delete(&key(i)).unwrap());
    }
    // A crash: no snapshot is written.
    crash(tier, &mut dir);
    let check = |tier: &DiskTier| {
        assert_eq!(tier.stats().objects, 70);
        for i in 0..80 {
            match i {
                0..10 => assert_intact(tier, i, 300),
                10..20 => assert!(tier.get(&key(i)).unwrap().is_none(), "k{i} came back"),
                20..40 => assert_intact(tier, i, 500),
                _ => assert_intact(tier, i, 700),
            }
        }
    };
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    check(&tier);
    drop(tier);
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    check(&tier);
    drop(tier);
    // A damaged snapshot is not trusted.
    let snap = dir.path().join("index.snap");
    let mut bytes = fs::read(&snap).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    fs::write(&snap, &bytes).unwrap();
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    check(&tier);
    crash(tier, &mut dir);
    fs::remove_file(dir.path().join("index.snap")).unwrap();
    // A stray temporary file of an interrupted snapshot is removed.
    fs::write(dir.path().join("index.snap.tmp"), b"half").unwrap();
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    check(&tier);
    assert!(!dir.path().join("index.snap.tmp").exists());
}

#[test]
fn a_delete_survives_a_restart() {
    let mut dir = tempfile::tempdir().unwrap();
    let o = || opts(1 << 30, 4 << 10);
    {
        let tier = DiskTier::open(dir.path(), o()).unwrap();
        for i in 0..20 {
            tier.put(&key(i), Meta::default(), &payload(i, 400))
                .unwrap();
        }
        tier.flush().unwrap();
        assert!(tier.delete(&key(3)).unwrap());
        // Dropped cleanly: the snapshot knows.
    }
    {
        let tier = DiskTier::open(dir.path(), o()).unwrap();
        assert!(!tier.contains(&key(3)).unwrap());
        assert!(tier.delete(&key(4)).unwrap());
        // Crashed: the tombstone alone must keep k4 deleted.
        crash(tier, &mut dir);
    }
    fs::remove_file(dir.path().join("index.snap")).unwrap();
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    assert!(!tier.contains(&key(3)).unwrap());
    assert!(!tier.contains(&key(4)).unwrap());
    assert_eq!(tier.stats().objects, 18);
    assert_intact(&tier, 5, 400);
}

#[test]
fn a_corrupted_object_is_reported_then_a_miss_never_its_bytes() {
    let mut dir = tempfile::tempdir().unwrap();
    let o = || opts(1 << 30, 1 << 20);
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    for i in 0..10 {
        tier.put(&key(i), Meta::default(), &payload(i, 2000))
            .unwrap();
    }
    let (path, at, len) = payload_location(dir.path(), &key(3));
    assert_eq!(len, 2000);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at + 1234).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at + 1234).unwrap();
    let misses = tier.stats().misses;
    match tier.get(&key(3)) {
        Err(e @ Error::Corrupt { .. }) => {
            assert!(e.to_string().contains("custom/test/k3"), "{e}");
            assert!(e.to_string().contains("disk"), "{e}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(tier.get(&key(3)).unwrap().is_none());
    assert!(!tier.contains(&key(3)).unwrap());
    assert!(tier.stats().misses > misses);
    assert_intact(&tier, 2, 2000);
    assert_intact(&tier, 4, 2000);
    drop(tier);
    // Nor does a restart bring it back, with the snapshot or by a scan.
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    assert!(tier.get(&key(3)).unwrap().is_none());
    crash(tier, &mut dir);
    fs::remove_file(dir.path().join("index.snap")).unwrap();
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    assert!(tier.get(&key(3)).unwrap().is_none());
    assert_eq!(tier.stats().objects, 9);
    for i in (0..10).filter(|&i| i != 3) {
        assert_intact(&tier, i, 2000);
    }
}

#[test]
fn a_torn_tail_loses_only_its_record() {
    for garbage in [false, true] {
        let mut dir = tempfile::tempdir().unwrap();
        let o = || opts(1 << 30, 1 << 20);
        let tier = DiskTier::open(dir.path(), o()).unwrap();
        for i in 0..6 {
            tier.put(&key(i), Meta::default(), &payload(i, 1500))
                .unwrap();
        }
        tier.flush().unwrap();
        for i in 6..10 {
            tier.put(&key(i), Meta::default(), &payload(i, 1500))
                .unwrap();
        }
        crash(tier, &mut dir);
        let seg = segments(dir.path()).pop().unwrap();
        let whole = fs::metadata(&seg).unwrap().len();
        let last = records(&seg).last().unwrap().0;
        if garbage {
            let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
            f.write_all(b"SCR1 this is not a record, it is what a crash left")
                .unwrap();
        } else {
            // Cut the last record in its payload.
            OpenOptions::new()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(last + 700)
                .unwrap();
        }
        let tier = DiskTier::open(dir.path(), o()).unwrap();
        let expect = if garbage { 10 } else { 9 };
        assert_eq!(tier.stats().objects, expect, "garbage {garbage}");
        for i in 0..expect {
            assert_intact(&tier, i, 1500);
        }
        assert!(garbage || tier.get(&key(9)).unwrap().is_none());
        // The file ends at the last whole record.
        let len = fs::metadata(&seg).unwrap().len();
        assert_eq!(len, if garbage { whole } else { last });
        // Appending goes on after it.
        tier.put(&key(50), Meta::default(), &payload(50, 100))
            .unwrap();
        drop(tier);
        let tier = DiskTier::open(dir.path(), o()).unwrap();
        assert_eq!(tier.stats().objects, expect + 1);
        assert_intact(&tier, 50, 100);
    }
}

#[test]
fn a_full_tier_evicts_but_never_a_pinned_object() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 32 << 10;
    let tier = DiskTier::open(dir.path(), opts(capacity, 1 << 20)).unwrap();
    for i in 0..4 {
        tier.put(&key(i), Meta::default(), &payload(i, 1000))
            .unwrap();
        assert!(tier.pin(&key(i)).unwrap());
    }
    assert!(!tier.pin(&key(99)).unwrap());
    for i in 4..200 {
        tier.put(&key(i), Meta::default(), &payload(i, 1000))
            .unwrap();
        assert!(tier.disk_bytes() <= capacity, "{}", tier.disk_bytes());
        assert!(files_bytes(dir.path()) <= capacity);
    }
    let stats = tier.stats();
    assert!(stats.evictions > 100, "{stats:?}");
    assert_eq!(
        stats.objects + stats.evictions,
        200,
        "every object is held or counted as evicted"
    );
    for i in 0..4 {
        assert_intact(&tier, i, 1000);
    }
    assert_intact(&tier, 199, 1000);
    // Unpinned, they can go.
    for i in 0..4 {
        assert!(tier.unpin(&key(i)).unwrap());
    }
    for i in 200..260 {
        tier.put(&key(i), Meta::default(), &payload(i, 1000))
            .unwrap();
    }
    assert!((0..4).all(|i| !tier.contains(&key(i)).unwrap()));
    drop(tier);
    let tier = DiskTier::open(dir.path(), opts(capacity, 1 << 20)).unwrap();
    assert_intact(&tier, 259, 1000);
    assert!(files_bytes(dir.path()) <= capacity);
}

#[test]
fn a_tier_with_everything_pinned_is_full_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 16 << 10;
    let tier = DiskTier::open(dir.path(), opts(capacity, 1 << 20)).unwrap();
    let mut i = 0;
    let err = loop {
        match tier.put(&key(i), Meta::default(), &payload(i, 1000)) {
            Ok(()) => assert!(tier.pin(&key(i)).unwrap()),
            Err(e) => break e,
        }
        i += 1;
    };
    assert!(err.is_full(), "{err}");
    assert!(err.to_string().contains(&format!("k{i}")), "{err}");
    assert!(err.to_string().contains("pinned"), "{err}");
    let (before, bytes) = (tier.stats(), files_bytes(dir.path()));
    assert!(
        tier.put(&key(i), Meta::default(), &payload(i, 1000))
            .is_err()
    );
    let err = tier
        .put(&key(1000), Meta::default(), &payload(1, 20_000))
        .unwrap_err();
    assert!(err.is_full() && err.to_string().contains("k1000"), "{err}");
    assert_eq!(tier.stats().objects, before.objects);
    assert_eq!(tier.stats().evictions, 0);
    assert_eq!(files_bytes(dir.path()), bytes);
    assert!(!tier.contains(&key(i)).unwrap());
    for j in 0..i {
        assert_intact(&tier, j, 1000);
    }
    // One unpinned object makes room for one more.
    assert!(tier.unpin(&key(0)).unwrap());
    tier.put(&key(i), Meta::default(), &payload(i, 1000))
        .unwrap();
    assert!(!tier.contains(&key(0)).unwrap());
    assert_intact(&tier, 1, 1000);
    assert_intact(&tier, i, 1000);
}

/// Space held by dead records is won back by compaction before anything is
/// evicted, and a compacted tombstone still deletes its key after a crash
/// (an older segment still holds the deleted object).
#[test]
fn compaction_reclaims_dead_bytes_and_keeps_deletions() {
    let mut dir = tempfile::tempdir().unwrap();
    let o = || opts(32 << 10, 8 << 10);
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    // Segment 1: k0..k6, of which k4..k6 will be deleted (still 4/7 live,
    // so never compacted).
    for i in 0..7 {
        tier.put(&key(i), Meta::default(), &payload(i, 1000))
            .unwrap();
    }
    // k7 starts segment 2, where the tombstones go.
    tier.put(&key(7), Meta::default(), &payload(7, 1000))
        .unwrap();
    assert_eq!(segments(dir.path()).len(), 2);
    for i in 4..7 {
        assert!(tier.delete(&key(i)).unwrap());
    }
    // Then one key overwritten until segment 2 is mostly dead bytes.
    let mut v = 0;
    while segments(dir.path()).len() == 2 {
        tier.put(&key(100), Meta::default(), &versioned(100, v, 1000))
            .unwrap();
        v += 1;
    }
    // Then new objects, all live, until the tier must reclaim: segment 2,
    // the only one under half live, is compacted; its tombstones must
    // survive since segment 1 still holds what they deleted.
    let seg2 = dir.path().join("seg-000002.log");
    let mut n = 200;
    while seg2.exists() {
        assert!(n < 240, "segment 2 was never compacted");
        tier.put(&key(n), Meta::default(), &payload(n, 1000))
            .unwrap();
        assert!(files_bytes(dir.path()) <= 32 << 10);
        n += 1;
    }
    assert_eq!(tier.stats().evictions, 0, "compaction sufficed");
    assert!(segments(dir.path())[0].ends_with("seg-000001.log"));
    let v = v - 1;
    let check = |tier: &DiskTier| {
        for i in [0, 1, 2, 3, 7] {
            assert_intact(tier, i, 1000);
        }
        for i in 4..7 {
            assert!(!tier.contains(&key(i)).unwrap(), "k{i} came back");
        }
        let got = tier.get(&key(100)).unwrap().unwrap();
        assert!(*got.bytes == *versioned(100, v, 1000));
        for i in 200..n {
            assert_intact(tier, i, 1000);
        }
    };
    check(&tier);
    // A crash with no snapshot: the scan alone must get it right.
    crash(tier, &mut dir);
    let _ = fs::remove_file(dir.path().join("index.snap"));
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    check(&tier);
    drop(tier);
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    check(&tier);
}

fn stamped(i: u64, version: u64, len: usize) -> Vec<u8> {
    let mut v = versioned(i, version, len.max(16));
    v[..8].copy_from_slice(&i.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    v
}

fn check_stamped(i: u64, bytes: &[u8]) {
    assert!(bytes.len() >= 16);
    let got_key = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let version = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert_eq!(got_key, i, "another key's bytes");
    assert!(
        *bytes == *stamped(i, version, bytes.len()),
        "k{i}: bytes no thread wrote"
    );
}

#[test]
fn threads_only_ever_see_bytes_written_for_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = || opts(256 << 10, 16 << 10);
    let tier = Arc::new(DiskTier::open(dir.path(), o()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let tier = tier.clone();
            std::thread::spawn(move || {
                let mut seed = t + 1;
                for n in 0..3000u64 {
                    seed = mix(seed);
                    let i = seed % 40;
                    match (seed >> 8) % 4 {
                        0 => {
                            let len = 16 + (seed >> 16) as usize % 4000;
                            tier.put(&key(i), Meta::default(), &stamped(i, t << 32 | n, len))
                                .unwrap();
                        }
                        1 => {
                            tier.delete(&key(i)).unwrap();
                        }
                        _ => {
                            if let Some(o) = tier.get(&key(i)).unwrap() {
                                check_stamped(i, &o.bytes);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(tier.disk_bytes() <= 256 << 10);
    let held: Vec<u64> = (0..40)
        .filter(|&i| tier.contains(&key(i)).unwrap())
        .collect();
    let tier = Arc::into_inner(tier).unwrap();
    drop(tier);
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    for i in 0..40 {
        let got = tier.get(&key(i)).unwrap();
        assert_eq!(got.is_some(), held.contains(&i), "k{i}");
        if let Some(o) = got {
            check_stamped(i, &o.bytes);
        }
    }
}

const CRASH_DIR: &str = "STRATACACHE_DISK_CRASH_DIR";

fn crash_options() -> DiskOptions {
    opts(1 << 30, 1 << 20)
}

/// The child of `a_sigkilled_writer_loses_nothing_it_acknowledged`: puts
/// objects until killed, printing one line per acknowledged put.
#[test]
#[ignore = "run as a child process by a_sigkilled_writer_loses_nothing_it_acknowledged"]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR) else {
        return;
    };
    let tier = DiskTier::open(dir, crash_options()).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let len = (mix(i) % (256 << 10)) as usize;
        tier.put(&key(i), Meta::default(), &payload(i, len))
            .unwrap();
        writeln!(out, "\nACK {i} {len}").unwrap();
        out.flush().unwrap();
        if i == 100 {
            tier.flush().unwrap();
        }
    }
}

#[test]
fn a_sigkilled_writer_loses_nothing_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "disk::crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    for line in lines {
        let line = line.unwrap();
        if let Some((_, rest)) = line.rsplit_once("ACK ") {
            let (i, len) = rest.split_once(' ').unwrap();
            acked.push((i.parse::<u64>().unwrap(), len.parse::<usize>().unwrap()));
            if acked.len() == 300 {
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(acked.len(), 300, "the child stopped early");

    let tier = DiskTier::open(dir.path(), crash_options()).unwrap();
    for &(i, len) in &acked {
        assert_intact(&tier, i, len);
    }
    // Whatever else is there is whole: puts the child finished after the
    // 300th acknowledgement was read, before the kill landed (it keeps
    // writing meanwhile, so how many is a race), and one in flight.
    let listed = tier.list().unwrap();
    for (k, meta) in listed {
        let ArtifactKey::Custom(c) = &k else {
            panic!("{k}")
        };
        let i: u64 = c.name[1..].parse().unwrap();
        let got = tier.get(&k).unwrap().unwrap();
        assert_eq!(got.bytes.len() as u64, meta.length);
        assert!(
            *got.bytes == *payload(i, got.bytes.len()),
            "{k} is not whole"
        );
    }
}

#[test]
fn reopening_twenty_thousand_objects() {
    let mut dir = tempfile::tempdir().unwrap();
    let o = || opts(1 << 30, 4 << 20);
    {
        let tier = DiskTier::open(dir.path(), o()).unwrap();
        for i in 0..20_000 {
            tier.put(&key(i), Meta::default(), &payload(i, 64)).unwrap();
        }
    }
    let t = Instant::now();
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    println!(
        "reopened 20,000 objects from the snapshot in {:?}",
        t.elapsed()
    );
    assert_eq!(tier.stats().objects, 20_000);
    assert_intact(&tier, 12_345, 64);
    crash(tier, &mut dir);
    fs::remove_file(dir.path().join("index.snap")).unwrap();
    let t = Instant::now();
    let tier = DiskTier::open(dir.path(), o()).unwrap();
    println!("rebuilt 20,000 objects by a scan in {:?}", t.elapsed());
    assert_eq!(tier.stats().objects, 20_000);
    assert_intact(&tier, 19_999, 64);
}

#[derive(Debug, Clone)]
enum Op {
    Put(u64, usize),
    Delete(u64),
    Flush,
    /// Drop and reopen.
    Reopen,
    /// Reopen what the files are now, as a process crash leaves them.
    Crash,
    /// The same, with the snapshot lost too: a scan rebuilds everything.
    CrashWithoutSnapshot,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..8, 0usize..3000).prop_map(|(k, len)| Op::Put(k, len)),
        2 => (0u64..8).prop_map(Op::Delete),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => Just(Op::CrashWithoutSnapshot),
    ]
}

/// A copy of the tier's files as they are now.
fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for item in fs::read_dir(from).unwrap() {
        let path = item.unwrap().path();
        fs::copy(&path, to.path().join(path.file_name().unwrap())).unwrap();
    }
    to
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any sequence of puts, deletes, flushes, clean restarts and crashes
    /// leaves exactly what a map would hold.
    #[test]
    fn the_tier_matches_a_map_across_restarts_and_crashes(
        ops in prop::collection::vec(arb_op(), 1..40)
    ) {
        let o = || opts(1 << 30, 4 << 10);
        let mut dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), o()).unwrap();
        let mut model: std::collections::HashMap<u64, Vec<u8>> = Default::default();
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Put(k, len) => {
                    let bytes = versioned(k, n as u64, len);
                    tier.put(&key(k), Meta::default(), &bytes).unwrap();
                    model.insert(k, bytes);
                }
                Op::Delete(k) => {
                    prop_assert_eq!(tier.delete(&key(k)).unwrap(), model.remove(&k).is_some());
                }
                Op::Flush => tier.flush().unwrap(),
                Op::Reopen => {
                    drop(tier);
                    tier = DiskTier::open(dir.path(), o()).unwrap();
                }
                Op::Crash | Op::CrashWithoutSnapshot => {
                    let copy = copy_dir(dir.path());
                    drop(tier);
                    if matches!(op, Op::CrashWithoutSnapshot) {
                        let _ = fs::remove_file(copy.path().join("index.snap"));
                    }
                    dir = copy;
                    tier = DiskTier::open(dir.path(), o()).unwrap();
                }
            }
            for k in 0..8 {
                let got = tier.get(&key(k)).unwrap();
                prop_assert_eq!(got.map(|o| o.bytes.to_vec()), model.get(&k).cloned(), "k{}", k);
            }
        }
        prop_assert_eq!(tier.stats().objects, model.len() as u64);
    }
}

#[test]
fn a_directory_is_open_in_one_tier_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(dir.path(), DiskOptions::default()).unwrap();
    let err = DiskTier::open(dir.path(), DiskOptions::default()).unwrap_err();
    assert!(err.to_string().contains("LOCK"), "{err}");
    drop(tier);
    DiskTier::open(dir.path(), DiskOptions::default()).unwrap();
}
