//! The tier chain and the storage engine: write-through and write-back,
//! promotion, dirty objects that are never dropped under eviction storms
//! and failing flushes, and consistency under concurrent writers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use stratacache::{
    Access, ArtifactKey, CustomKey, Error, FlushPolicy, Link, LinkMode, MemoryTier, Meta, Object,
    StorageEngine, Tier, TierChain, TierStats,
};

fn key(i: u64) -> ArtifactKey {
    ArtifactKey::Custom(CustomKey {
        namespace: "chain".into(),
        name: format!("k{i}"),
    })
}

fn payload(i: u64, version: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 16);
    v.extend_from_slice(&i.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend((0..len).map(|j| (i as usize * 131 + version as usize * 7 + j) as u8));
    v
}

/// A memory tier whose writes fail on demand: the failure injection of
/// these tests (a real tier, with a switch in front of its `put`).
struct Flaky {
    inner: MemoryTier,
    fail: AtomicBool,
    /// Microseconds each `get` takes: widens race windows.
    delay_us: std::sync::atomic::AtomicU64,
}

impl Flaky {
    fn new(capacity: u64) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner: MemoryTier::new(capacity, 1),
            fail: AtomicBool::new(false),
            delay_us: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

impl Tier for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn get(&self, key: &ArtifactKey) -> stratacache::Result<Option<Object>> {
        let us = self.delay_us.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
        self.inner.get(key)
    }
    fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> stratacache::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Io {
                tier: "flaky".into(),
                op: "writing",
                path: key.to_string(),
                source: std::io::Error::other("injected failure"),
            });
        }
        self.inner.put(key, meta, bytes)
    }
    fn contains(&self, key: &ArtifactKey) -> stratacache::Result<bool> {
        self.inner.contains(key)
    }
    fn delete(&self, key: &ArtifactKey) -> stratacache::Result<bool> {
        self.inner.delete(key)
    }
    fn stats(&self) -> TierStats {
        self.inner.stats()
    }
    fn list(&self) -> stratacache::Result<Vec<(ArtifactKey, Meta)>> {
        self.inner.list()
    }
}

fn fast_policy() -> FlushPolicy {
    FlushPolicy {
        retry_initial: Duration::from_millis(1),
        retry_max: Duration::from_millis(20),
        idle_poll: Duration::from_millis(5),
        ..FlushPolicy::default()
    }
}

fn link(tier: Arc<dyn Tier>, mode: LinkMode, promote: bool) -> Link {
    Link {
        tier,
        mode,
        promote,
    }
}

/// A chain of two tiers: `top` linked by `mode` (promoting or not) over
/// `bottom`.
fn two_tiers(
    top: Arc<dyn Tier>,
    mode: LinkMode,
    promote: bool,
    bottom: Arc<dyn Tier>,
    policy: FlushPolicy,
) -> TierChain {
    TierChain::new(
        vec![
            link(top, mode, promote),
            link(bottom, LinkMode::WriteThrough, false),
        ],
        policy,
    )
    .unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn write_through_stores_in_every_tier_and_promotion_copies_up() {
    let top = Arc::new(MemoryTier::new(1 << 20, 1));
    let bottom = Arc::new(MemoryTier::new(1 << 20, 1));
    let chain = two_tiers(
        top.clone(),
        LinkMode::WriteThrough,
        true,
        bottom.clone(),
        FlushPolicy::default(),
    );
    chain
        .put(&key(1), Meta::default(), &payload(1, 0, 10))
        .unwrap();
    assert!(top.contains(&key(1)).unwrap() && bottom.contains(&key(1)).unwrap());

    bottom
        .put(&key(2), Meta::default(), &payload(2, 0, 10))
        .unwrap();
    match chain.get(&key(2)).unwrap() {
        stratacache::Lookup::Found { object, tier } => {
            assert_eq!(tier, 1);
            assert_eq!(&*object.bytes, payload(2, 0, 10).as_slice());
        }
        other => panic!("expected a hit, got {other:?}"),
    }
    assert!(top.contains(&key(2)).unwrap(), "a hit below is promoted");
    assert_eq!(chain.stats().promotions, 1);
}

#[test]
fn write_back_is_dirty_until_flushed_and_pinned_meanwhile() {
    let top = Arc::new(MemoryTier::new(1 << 20, 1));
    let bottom = Flaky::new(1 << 20);
    bottom.fail.store(true, Ordering::SeqCst);
    let chain = two_tiers(
        top.clone(),
        LinkMode::WriteBack,
        false,
        bottom.clone(),
        fast_policy(),
    );
    for i in 0..10 {
        chain
            .put(&key(i), Meta::default(), &payload(i, 0, 100))
            .unwrap();
    }
    // The flusher keeps failing: every failure is counted and reported, and
    // nothing is lost.
    wait_until("flush failures", || chain.stats().flush_failures >= 20);
    let stats = chain.stats();
    assert_eq!(stats.dirty, 10);
    assert!(
        stats
            .last_flush_error
            .as_deref()
            .is_some_and(|e| e.contains("injected failure")),
        "{stats:?}"
    );
    assert!(chain.flush().is_err(), "flush reports what it could not do");
    for i in 0..10 {
        assert!(top.contains(&key(i)).unwrap());
        assert!(!bottom.contains(&key(i)).unwrap());
    }
    // The store heals: the same flusher (never stopped) writes everything.
    bottom.fail.store(false, Ordering::SeqCst);
    wait_until("the flusher to catch up", || chain.stats().dirty == 0);
    for i in 0..10 {
        let got = bottom.get(&key(i)).unwrap().unwrap();
        assert_eq!(&*got.bytes, payload(i, 0, 100).as_slice());
    }
    assert_eq!(chain.stats().lost, 0);
    chain.flush().unwrap();
}

#[test]
fn a_full_write_back_tier_flushes_or_bypasses_rather_than_drop() {
    // Room for about four objects on top; the flusher is slowed by failing.
    let top = Arc::new(MemoryTier::new(4 * 1100, 1));
    let bottom = Flaky::new(1 << 20);
    bottom.fail.store(true, Ordering::SeqCst);
    let chain = two_tiers(
        top.clone(),
        LinkMode::WriteBack,
        false,
        bottom.clone(),
        FlushPolicy {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(60),
            ..fast_policy()
        },
    );
    let mut ok = Vec::new();
    for i in 0..8 {
        if chain
            .put(&key(i), Meta::default(), &payload(i, 0, 1000))
            .is_ok()
        {
            ok.push(i);
        }
    }
    // With the bottom failing, a put that cannot fit on top fails whole:
    // nothing acknowledged is ever dropped to make room.
    assert!(ok.len() >= 4, "{ok:?}");
    for &i in &ok {
        let got = top
            .get(&key(i))
            .unwrap()
            .expect("acknowledged objects stay");
        assert_eq!(&*got.bytes, payload(i, 0, 1000).as_slice());
    }
    // Once the bottom works, puts under pressure flush the oldest dirty
    // objects themselves.
    bottom.fail.store(false, Ordering::SeqCst);
    for i in 8..16 {
        chain
            .put(&key(i), Meta::default(), &payload(i, 0, 1000))
            .unwrap();
    }
    let stats = chain.stats();
    assert!(stats.pressure_flushes + stats.bypassed > 0, "{stats:?}");
    chain.flush().unwrap();
    for i in ok.iter().copied().chain(8..16) {
        let found = match chain.get(&key(i)).unwrap() {
            stratacache::Lookup::Found { object, .. } => object,
            other => panic!("key {i} lost: {other:?}"),
        };
        assert_eq!(&*found.bytes, payload(i, 0, 1000).as_slice());
    }
    assert_eq!(chain.stats().lost, 0);
}

#[test]
fn chains_refuse_write_back_where_it_could_lose_data() {
    let mem = || Arc::new(MemoryTier::new(1 << 20, 1)) as Arc<dyn Tier>;
    let err = TierChain::new(
        vec![link(mem(), LinkMode::WriteBack, false)],
        FlushPolicy::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tiers[0].mode"), "{err}");
    let err = TierChain::new(
        vec![
            link(Flaky::new(1 << 20), LinkMode::WriteBack, false),
            link(mem(), LinkMode::WriteThrough, false),
        ],
        FlushPolicy::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot pin"), "{err}");
}

#[test]
fn the_engine_addresses_tiers_and_reports_failed_loads() {
    let top = Arc::new(MemoryTier::new(1 << 20, 1));
    let bottom = Arc::new(MemoryTier::new(1 << 20, 1));
    let chain = two_tiers(
        top.clone(),
        LinkMode::WriteThrough,
        false,
        bottom.clone(),
        FlushPolicy::default(),
    );
    let engine = StorageEngine::new(chain, vec!["mem".into(), "cold".into()]).unwrap();
    let cold = engine.tier_index("cold").unwrap();
    engine
        .store(&key(1), Meta::default(), b"only below", Access::Exact(cold))
        .unwrap();
    assert!(!top.contains(&key(1)).unwrap());
    assert_eq!(engine.load(&key(1), Access::Chain).unwrap().tier, cold);
    assert_eq!(
        engine.load(&key(1), Access::Prefer(0)).unwrap().tier,
        cold,
        "prefer falls back to the chain"
    );
    let err = engine.load(&key(1), Access::Exact(0)).unwrap_err();
    assert!(err.is_miss(), "{err}");

    let batch = engine.load_many(&[key(1), key(2), key(1)], Access::Chain);
    assert_eq!(batch.failures.len(), 1);
    assert_eq!(batch.failures[0].index, 1);
    assert_eq!(batch.failures[0].key, key(2));
    assert!(batch.failures[0].error.to_string().contains("not found"));

    let err = engine.tier_index("ssd").unwrap_err();
    assert!(err.to_string().contains("mem, cold"), "{err}");
    engine.close().unwrap();
    assert!(matches!(
        engine.load(&key(1), Access::Chain),
        Err(Error::Closed { .. })
    ));
}

#[test]
fn concurrent_readers_never_put_a_stale_copy_above_a_newer_one() {
    // A small top tier (evictions all the time) over a slow bottom one
    // (wide windows between a reader's miss above and its promotion).
    let top = Arc::new(MemoryTier::new(1000, 1));
    let bottom = Flaky::new(1 << 20);
    bottom.delay_us.store(50, Ordering::Relaxed);
    let chain = Arc::new(two_tiers(
        top.clone(),
        LinkMode::WriteBack,
        true,
        bottom.clone(), // Three flusher threads, each passing by what another took.
        FlushPolicy {
            threads: 3,
            ..fast_policy()
        },
    ));
    // Writers of one key take turns (so the last write is known); readers
    // take no turn, and promote whatever they find below.
    let last: Arc<Vec<std::sync::Mutex<Option<u64>>>> =
        Arc::new((0..12).map(|_| std::sync::Mutex::new(None)).collect());
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let (chain, last) = (chain.clone(), last.clone());
            std::thread::spawn(move || {
                let mut x = t * 7919 + 1;
                for n in 0..1500u64 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let k = (x >> 33) % 12;
                    let version = t * 10_000 + n;
                    match (x >> 20) % 5 {
                        0 | 1 => {
                            let mut turn = last[k as usize].lock().unwrap();
                            chain
                                .put(&key(k), Meta::default(), &payload(k, version, 200))
                                .unwrap();
                            *turn = Some(version);
                        }
                        2 => {
                            let mut turn = last[k as usize].lock().unwrap();
                            chain.delete(&key(k)).unwrap();
                            *turn = None;
                        }
                        _ => {
                            if let stratacache::Lookup::Found { object, .. } =
                                chain.get(&key(k)).unwrap()
                            {
                                let b = &object.bytes;
                                let id = u64::from_le_bytes(b[..8].try_into().unwrap());
                                let version = u64::from_le_bytes(b[8..16].try_into().unwrap());
                                assert_eq!(id, k, "another key's bytes");
                                assert_eq!(&b[..], payload(k, version, 200).as_slice());
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
    chain.flush().unwrap();
    for k in 0..12u64 {
        let got = match chain.get(&key(k)).unwrap() {
            stratacache::Lookup::Found { object, .. } => {
                Some(u64::from_le_bytes(object.bytes[8..16].try_into().unwrap()))
            }
            stratacache::Lookup::Missing { .. } => None,
        };
        assert_eq!(
            got,
            *last[k as usize].lock().unwrap(),
            "key {k}: not the last write"
        );
        if let (Some(a), Some(b)) = (top.get(&key(k)).unwrap(), bottom.get(&key(k)).unwrap()) {
            assert_eq!(a.bytes, b.bytes, "key {k}: the copy on top is stale");
        }
    }
    assert_eq!(chain.stats().lost, 0);
    assert_eq!(chain.stats().dirty, 0);
}

#[derive(Debug, Clone)]
enum Op {
    Put(u64, usize),
    Delete(u64),
    Get(u64),
    Fail(bool),
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..24u64, 1..900usize).prop_map(|(k, n)| Op::Put(k, n)),
        1 => (0..24u64).prop_map(Op::Delete),
        3 => (0..24u64).prop_map(Op::Get),
        1 => any::<bool>().prop_map(Op::Fail),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Write-back under an eviction storm (a top tier with room for a few
    /// objects) and a bottom tier that fails on and off: every key
    /// acknowledged as stored is loadable, with its bytes, until deleted.
    #[test]
    fn acknowledged_objects_survive_eviction_storms_and_failing_flushes(
        ops in proptest::collection::vec(op(), 1..120)
    ) {
        let top = Arc::new(MemoryTier::new(3000, 1));
        let bottom = Flaky::new(1 << 22);
        let chain = two_tiers(top.clone(), LinkMode::WriteBack, true, bottom.clone(), fast_policy());
        // key -> the values it may hold (more than one after a failed put,
        // whose outcome is "old or new").
        let mut model: HashMap<u64, Vec<Option<Vec<u8>>>> = HashMap::new();
        for (n, op) in ops.iter().enumerate() {
            match *op {
                Op::Put(k, len) => {
                    let bytes = payload(k, n as u64, len);
                    let before = model.get(&k).cloned().unwrap_or_else(|| vec![None]);
                    match chain.put(&key(k), Meta::default(), &bytes) {
                        Ok(()) => { model.insert(k, vec![Some(bytes)]); }
                        Err(_) => {
                            let mut may = before;
                            may.push(Some(bytes));
                            model.insert(k, may);
                        }
                    }
                }
                Op::Delete(k) => {
                    chain.delete(&key(k)).unwrap();
                    model.insert(k, vec![None]);
                }
                Op::Get(k) => {
                    let got = match chain.get(&key(k)).unwrap() {
                        stratacache::Lookup::Found { object, .. } => Some(object.bytes.to_vec()),
                        stratacache::Lookup::Missing { reasons } => {
                            prop_assert!(reasons.is_empty(), "{reasons:?}");
                            None
                        }
                    };
                    let may = model.get(&k).cloned().unwrap_or_else(|| vec![None]);
                    prop_assert!(may.contains(&got), "key {k}: got {:?}", got.map(|g| g.len()));
                    model.insert(k, vec![got]);
                }
                Op::Fail(on) => bottom.fail.store(on, Ordering::SeqCst),
                Op::Flush => { let _ = chain.flush(); }
            }
        }
        bottom.fail.store(false, Ordering::SeqCst);
        chain.flush().unwrap();
        for (k, may) in &model {
            let got = match chain.get(&key(*k)).unwrap() {
                stratacache::Lookup::Found { object, .. } => Some(object.bytes.to_vec()),
                stratacache::Lookup::Missing { .. } => None,
            };
            prop_assert!(may.contains(&got), "key {k} at the end");
        }
        prop_assert_eq!(chain.stats().lost, 0);
    }
}

#[test]
fn exact_stores_into_write_back_tiers_are_flushed_and_stray_unpins_refused() {
    let top = Arc::new(MemoryTier::new(4 * 1200, 1));
    let bottom = Flaky::new(1 << 20);
    let chain = two_tiers(
        top.clone(),
        LinkMode::WriteBack,
        false,
        bottom.clone(),
        FlushPolicy {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(60),
            ..fast_policy()
        },
    );
    let engine = StorageEngine::new(chain, vec!["cpu".into(), "ssd".into()]).unwrap();
    // An older copy below must never be read again once a newer one is
    // stored exactly on top.
    bottom
        .put(&key(1), Meta::default(), &payload(1, 0, 1000))
        .unwrap();
    bottom.fail.store(true, Ordering::SeqCst);
    engine
        .store(
            &key(1),
            Meta::default(),
            &payload(1, 1, 1000),
            Access::Exact(0),
        )
        .unwrap();
    engine
        .store(
            &key(2),
            Meta::default(),
            &payload(2, 1, 1000),
            Access::Prefer(0),
        )
        .unwrap();
    assert_eq!(
        engine.chain().stats().dirty,
        2,
        "exact stores are dirty too"
    );
    // A client's unpin without a pin cannot undo the dirty pin.
    assert!(!Tier::unpin(&engine, &key(1)).unwrap());
    assert!(Tier::pin(&engine, &key(2)).unwrap());
    assert!(Tier::unpin(&engine, &key(2)).unwrap());
    assert!(!Tier::unpin(&engine, &key(2)).unwrap());
    // Pressure on top: the dirty objects stay (nothing below works yet).
    for i in 10..20 {
        let _ = engine.store(
            &key(i),
            Meta::default(),
            &payload(i, 0, 1000),
            Access::Chain,
        );
    }
    for k in [1, 2] {
        let got = top
            .get(&key(k))
            .unwrap()
            .expect("a dirty object stays on top");
        assert_eq!(&*got.bytes, payload(k, 1, 1000).as_slice());
    }
    bottom.fail.store(false, Ordering::SeqCst);
    engine.close().unwrap();
    for k in [1, 2] {
        let got = bottom.get(&key(k)).unwrap().unwrap();
        assert_eq!(&*got.bytes, payload(k, 1, 1000).as_slice(), "key {k} below");
    }
}
