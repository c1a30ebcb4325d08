//! The command ring: Busy when full, blocking submission, counters.

use std::sync::Arc;

use bwrt::{DType, Error, OnFull, Semaphore, Tensor, WaveDesc};

use crate::util::{runtime, spec};

/// A wave big enough to keep the single worker busy for a while.
fn big() -> (Tensor, Tensor, Tensor) {
    let n = 192;
    (
        Tensor::zeros(DType::F32, n, n),
        Tensor::zeros(DType::F32, n, n),
        Tensor::zeros(DType::F32, n, n),
    )
}

#[test]
fn full_ring_returns_busy_and_block_waits() {
    let rt = runtime(1, 2, spec((8, 8, 8), (0, u64::MAX)));
    let done = Arc::new(Semaphore::new(0));
    let fail = WaveDesc {
        on_full: OnFull::Fail,
    };
    // One wave may be running and two queued; the ring must fill up.
    let mut accepted = 0u64;
    let mut busy = None;
    for _ in 0..64 {
        let (a, b, c) = big();
        match rt.submit_wave(&fail, a, b, c, Some((done.clone(), accepted + 1))) {
            Ok(()) => accepted += 1,
            Err(e) => {
                busy = Some(e);
                break;
            }
        }
    }
    let e = busy.expect("the ring never filled");
    assert_eq!(e, Error::Busy { depth: 2 });
    assert_eq!(e.status(), bwrt::Status::Busy);
    assert!((2..=3).contains(&accepted), "{accepted} accepted");
    // Blocking submission waits for a slot instead.
    let block = WaveDesc {
        on_full: OnFull::Block,
    };
    for _ in 0..4 {
        let (a, b, c) = big();
        rt.submit_wave(&block, a, b, c, Some((done.clone(), accepted + 1)))
            .unwrap();
        accepted += 1;
    }
    done.wait(accepted, u64::MAX).unwrap();
    let s = rt.sample();
    assert_eq!(s.waves_submitted, accepted);
    // Single worker: waves finish in order, so the last value means all.
    while rt.sample().waves_completed < accepted {
        std::thread::yield_now();
    }
    let s2 = rt.sample();
    assert_eq!(s2.waves_completed, accepted);
    assert_eq!(s2.ring_depth, 2);
    assert_eq!(s2.ring_occupancy, 0);
    assert_eq!(s2.active_ops, 0);
    assert_eq!(s2.waves_failed, 0);
    let per_wave_flops = 2 * 192u64 * 192 * 192;
    assert_eq!(s2.flops, per_wave_flops * accepted);
    assert_eq!(s2.bytes, 3 * 192 * 192 * 4 * accepted);
    assert!(s2.busy_ns > 0);
}

#[test]
fn many_threads_submit_and_wait_concurrently() {
    let rt = Arc::new(runtime(3, 8, spec((8, 8, 8), (0, u64::MAX))));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let rt = Arc::clone(&rt);
            std::thread::spawn(move || {
                let block = WaveDesc {
                    on_full: OnFull::Block,
                };
                for i in 0..25u64 {
                    let x = (t * 100 + i) as f32;
                    let a = Tensor::from_f32(&[x, 1.0], DType::F32, 1, 2).unwrap();
                    let b = Tensor::from_f32(&[1.0, 2.0], DType::F32, 2, 1).unwrap();
                    let c = Tensor::zeros(DType::F32, 1, 1);
                    // One semaphore per wave: each wait is for that wave.
                    let done = Arc::new(Semaphore::new(0));
                    rt.submit_wave(&block, a, b, c.clone(), Some((done.clone(), 1)))
                        .unwrap();
                    done.wait(1, u64::MAX).unwrap();
                    assert_eq!(c.to_f32(), [x + 2.0]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = rt.sample();
    assert_eq!(s.waves_submitted, 150);
    assert_eq!(s.waves_completed, 150);
    assert_eq!(s.flops, 150 * 4);
}

#[test]
fn a_failed_wave_fails_its_semaphore_and_is_counted() {
    let rt = runtime(1, 4, spec((4, 4, 4), (0, u64::MAX)));
    let done = Arc::new(Semaphore::new(0));
    // Weight slot 9 is empty when the wave runs.
    rt.submit_wave(
        &WaveDesc::default(),
        Tensor::zeros(DType::F32, 2, 2),
        bwrt::Operand::Weights(9),
        Tensor::zeros(DType::F32, 2, 2),
        Some((done.clone(), 1)),
    )
    .unwrap();
    let e = done.wait(1, u64::MAX).unwrap_err();
    assert!(
        matches!(&e, Error::WaveFailed(m) if m.contains("slot 9")),
        "{e}"
    );
    let s = rt.sample();
    assert_eq!((s.waves_failed, s.waves_completed), (1, 0));
}

#[test]
fn drop_drains_the_ring() {
    let done = Arc::new(Semaphore::new(0));
    {
        let rt = runtime(1, 8, spec((8, 8, 8), (0, u64::MAX)));
        for v in 1..=5 {
            let (a, b, c) = big();
            rt.submit_wave(&WaveDesc::default(), a, b, c, Some((done.clone(), v)))
                .unwrap();
        }
    }
    assert_eq!(done.value(), 5);
}
