//! Timeline semaphore semantics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bwrt::{Error, Semaphore};

#[test]
fn poll_returns_timeout_at_once_and_ok_when_reached() {
    let s = Semaphore::new(2);
    assert_eq!(s.value(), 2);
    s.wait(2, 0).unwrap();
    s.wait(1, 0).unwrap();
    let t = Instant::now();
    let e = s.wait(3, 0).unwrap_err();
    assert!(matches!(e, Error::Timeout { timeout_ns: 0, .. }), "{e}");
    assert_eq!(e.status(), bwrt::Status::Timeout);
    assert!(t.elapsed() < Duration::from_millis(50));
}

#[test]
fn bounded_wait_times_out_after_the_timeout() {
    let s = Semaphore::new(0);
    let t = Instant::now();
    let e = s.wait(1, 20_000_000).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(20));
}

#[test]
fn signal_is_monotonic() {
    let s = Semaphore::new(5);
    s.signal(5).unwrap();
    s.signal(7).unwrap();
    let e = s.signal(6).unwrap_err();
    assert_eq!(
        e,
        Error::NonMonotonicSignal {
            current: 7,
            requested: 6
        }
    );
    assert_eq!(s.value(), 7);
}

#[test]
fn forever_wait_wakes_on_signal_in_order() {
    let s = Arc::new(Semaphore::new(0));
    let waiters: Vec<_> = (1..=4u64)
        .map(|v| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                s.wait(v, u64::MAX).unwrap();
                s.value()
            })
        })
        .collect();
    for v in 1..=4 {
        std::thread::sleep(Duration::from_millis(2));
        s.signal(v).unwrap();
    }
    for (i, w) in waiters.into_iter().enumerate() {
        assert!(w.join().unwrap() > i as u64);
    }
}

#[test]
fn failure_wakes_waiters_with_the_message() {
    let s = Arc::new(Semaphore::new(0));
    let w = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || s.wait(1, u64::MAX))
    };
    std::thread::sleep(Duration::from_millis(5));
    s.fail("boom");
    assert_eq!(w.join().unwrap(), Err(Error::WaveFailed("boom".into())));
}
