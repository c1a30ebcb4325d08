//! The memory tier: LRU within capacity, never evicting pinned or borrowed
//! objects, failing whole when full, safe under threads.

use std::sync::Arc;

use stratacache::{ArtifactKey, CustomKey, MemoryTier, Meta, Tier};

fn key(i: u64) -> ArtifactKey {
    ArtifactKey::Custom(CustomKey {
        namespace: "test".into(),
        name: format!("k{i}"),
    })
}

/// Bytes that name their key, so a mix-up shows.
fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
}

#[test]
fn objects_round_trip_and_replace_and_delete() {
    let tier = MemoryTier::new(1 << 20, 4);
    let meta = Meta {
        dtype: "bf16".into(),
        shape: vec![2, 3],
        ..Meta::default()
    };
    tier.put(&key(1), meta.clone(), &payload(1, 100)).unwrap();
    let got = tier.get(&key(1)).unwrap().unwrap();
    assert_eq!(&*got.bytes, payload(1, 100).as_slice());
    assert_eq!(got.meta.length, 100);
    assert_eq!(got.meta.shape, vec![2, 3]);
    assert!(tier.contains(&key(1)).unwrap());
    assert!(tier.get(&key(2)).unwrap().is_none());
    // Replacing keeps one object; the old bytes stay valid for a holder.
    tier.put(&key(1), meta, &payload(7, 50)).unwrap();
    assert_eq!(&*got.bytes, payload(1, 100).as_slice());
    assert_eq!(
        &*tier.get(&key(1)).unwrap().unwrap().bytes,
        payload(7, 50).as_slice()
    );
    let stats = tier.stats();
    assert_eq!((stats.objects, stats.bytes), (1, 50));
    assert_eq!((stats.hits, stats.misses), (2, 1));
    assert!(tier.delete(&key(1)).unwrap());
    assert!(!tier.delete(&key(1)).unwrap());
    assert_eq!(tier.stats().bytes, 0);
}

#[test]
fn the_least_recently_used_goes_first_and_capacity_holds() {
    let tier = MemoryTier::new(400, 1);
    for i in 0..4 {
        tier.put(&key(i), Meta::default(), &payload(i, 100))
            .unwrap();
    }
    // Touch 0: 1 is now the least recently used.
    drop(tier.get(&key(0)).unwrap());
    tier.put(&key(4), Meta::default(), &payload(4, 100))
        .unwrap();
    assert!(!tier.contains(&key(1)).unwrap());
    for i in [0, 2, 3, 4] {
        assert!(tier.contains(&key(i)).unwrap(), "{i}");
    }
    // A 250-byte object takes the three least recent (2, 3, 0).
    tier.put(&key(5), Meta::default(), &payload(5, 250))
        .unwrap();
    let stats = tier.stats();
    assert!(stats.bytes <= 400, "{stats:?}");
    assert_eq!(stats.evictions, 4);
    assert!(tier.contains(&key(4)).unwrap() && tier.contains(&key(5)).unwrap());
}

#[test]
fn pinned_and_borrowed_objects_are_never_evicted() {
    let tier = MemoryTier::new(300, 1);
    for i in 0..3 {
        tier.put(&key(i), Meta::default(), &payload(i, 100))
            .unwrap();
    }
    assert!(tier.pin(&key(0)).unwrap());
    let borrowed = tier.get(&key(1)).unwrap().unwrap();
    // Only 2 can go.
    tier.put(&key(3), Meta::default(), &payload(3, 100))
        .unwrap();
    assert!(!tier.contains(&key(2)).unwrap());
    // Now nothing can: the put fails and changes nothing.
    let err = tier
        .put(&key(4), Meta::default(), &payload(4, 150))
        .unwrap_err();
    assert!(err.is_full(), "{err}");
    assert!(err.to_string().contains("pinned or borrowed"), "{err}");
    for i in [0, 1, 3] {
        assert!(tier.contains(&key(i)).unwrap(), "{i}");
    }
    assert!(!tier.contains(&key(4)).unwrap());
    // Once released, they can go.
    drop(borrowed);
    tier.put(&key(4), Meta::default(), &payload(4, 150))
        .unwrap();
    assert!(tier.contains(&key(0)).unwrap(), "still pinned");
    assert!(tier.unpin(&key(0)).unwrap());
    tier.put(&key(5), Meta::default(), &payload(5, 300))
        .unwrap();
    assert_eq!(tier.stats().objects, 1);
}

#[test]
fn an_object_larger_than_a_shard_is_refused_by_name() {
    let tier = MemoryTier::new(1000, 4);
    let err = tier
        .put(&key(9), Meta::default(), &payload(9, 251))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("custom/test/k9") && err.contains("250"),
        "{err}"
    );
}

#[test]
fn threads_never_see_another_keys_bytes_or_exceed_capacity() {
    let tier = Arc::new(MemoryTier::new(64 * 1024, 8));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let tier = tier.clone();
            std::thread::spawn(move || {
                let mut seed = t + 1;
                for _ in 0..20_000 {
                    let r = next_random(&mut seed);
                    let i = r % 200;
                    let len = 64 + (r >> 8) as usize % 1024;
                    match r % 3 {
                        0 => tier
                            .put(&key(i), Meta::default(), &payload(i, len))
                            .unwrap(),
                        1 => {
                            if let Some(o) = tier.get(&key(i)).unwrap() {
                                let want = payload(i, o.bytes.len());
                                assert_eq!(&*o.bytes, want.as_slice());
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
    let stats = tier.stats();
    assert!(stats.bytes <= stats.capacity_bytes, "{stats:?}");
}

/// splitmix64, for the stress test.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn buffers_are_recycled_and_shared_puts_copy_nothing() {
    let tier = MemoryTier::new(1 << 20, 1);
    tier.put(&key(1), Meta::default(), &payload(1, 4096))
        .unwrap();
    let first = tier.get(&key(1)).unwrap().unwrap();
    let first_ptr = first.bytes.as_ptr();
    drop(first);
    // Replaced: the old buffer is nobody's, so the next put of its size
    // reuses it (same address), with the new bytes.
    tier.put(&key(1), Meta::default(), &payload(2, 4096))
        .unwrap();
    tier.put(&key(3), Meta::default(), &payload(3, 4096))
        .unwrap();
    let third = tier.get(&key(3)).unwrap().unwrap();
    assert_eq!(third.bytes.as_ptr(), first_ptr);
    assert_eq!(&*third.bytes, payload(3, 4096).as_slice());
    assert_eq!(
        &*tier.get(&key(1)).unwrap().unwrap().bytes,
        payload(2, 4096).as_slice()
    );
    // A buffer someone still holds is never recycled.
    let held = tier.get(&key(3)).unwrap().unwrap();
    tier.delete(&key(3)).unwrap();
    tier.put(&key(4), Meta::default(), &payload(4, 4096))
        .unwrap();
    assert_eq!(&*held.bytes, payload(3, 4096).as_slice());

    // A buffer no one else holds is adopted; a shared one is copied (or
    // both holders would count it borrowed and never evict it).
    let unique: Arc<[u8]> = Arc::from(payload(5, 100));
    let at = unique.as_ptr();
    tier.put_shared(&key(5), Meta::default(), unique).unwrap();
    assert_eq!(tier.get(&key(5)).unwrap().unwrap().bytes.as_ptr(), at);
    let shared: Arc<[u8]> = Arc::from(payload(6, 100));
    tier.put_shared(&key(6), Meta::default(), shared.clone())
        .unwrap();
    let got = tier.get(&key(6)).unwrap().unwrap();
    assert!(!Arc::ptr_eq(&got.bytes, &shared));
    assert_eq!(got.bytes, shared);
}
