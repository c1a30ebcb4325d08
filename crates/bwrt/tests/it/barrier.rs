//! Host barriers and mbarriers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bwrt::{Barrier, Error, MBarrier};

#[test]
fn barrier_phases_with_several_threads() {
    let threads = 4u64;
    let barrier = Arc::new(Barrier::new(threads).unwrap());
    let counter = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (barrier, counter) = (Arc::clone(&barrier), Arc::clone(&counter));
            std::thread::spawn(move || {
                for round in 0..5u64 {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let phase = barrier.wait(u64::MAX).unwrap();
                    assert_eq!(phase, 2 * round);
                    // Everyone arrived for this round before anyone left it.
                    assert!(counter.load(Ordering::SeqCst) >= (round + 1) * threads);
                    barrier.wait(u64::MAX).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(barrier.phase(), 10);
}

#[test]
fn mbarrier_counts_arrivals_and_times_out() {
    let mb = Arc::new(MBarrier::new(5).unwrap());
    assert_eq!(mb.arrive(2).unwrap(), 0);
    let e = mb.wait(0, 0).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    // Too many arrivals for what the phase still needs.
    assert!(mb.arrive(4).is_err());
    assert!(mb.arrive(0).is_err());
    let waiter = {
        let mb = Arc::clone(&mb);
        std::thread::spawn(move || mb.wait(0, u64::MAX))
    };
    assert_eq!(mb.arrive(3).unwrap(), 0);
    waiter.join().unwrap().unwrap();
    assert_eq!(mb.phase(), 1);
    mb.wait(0, 0).unwrap();
    assert_eq!(mb.arrive(5).unwrap(), 1);
    assert!(MBarrier::new(0).is_err());
}
