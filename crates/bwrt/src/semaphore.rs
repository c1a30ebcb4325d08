//! Timeline semaphores: a monotonically increasing `u64` that threads wait on.
//!
//! A timeline semaphore (as in Vulkan and IREE) replaces a pile of one-shot
//! fences with one counter. A wave is submitted with `(semaphore, value)`;
//! when it finishes it raises the semaphore to `value`, and anyone waiting
//! for `value` (or any lower value) wakes up. Because values only grow,
//! "has wave 7 finished?" is just `value() >= 7`, with no per-wave object.
//!
//! Rules:
//! - [`Semaphore::signal`] may not lower the value ([`Error::NonMonotonicSignal`]).
//! - [`Semaphore::wait`] takes a timeout in ns: `0` polls (returns at once),
//!   `u64::MAX` waits forever; running out of time is [`Error::Timeout`],
//!   never a success.
//! - A wave that fails marks its semaphore failed: every current and later
//!   wait returns [`Error::WaveFailed`] with the wave's message.
//!
//! # Waiting cheaply
//!
//! Waking a thread that sleeps in the kernel costs several microseconds,
//! more than a small wave takes. So [`Semaphore::wait`] first spins on an
//! atomic copy of the value for up to [`SPIN`], and only then sleeps on a
//! condition variable. A signal is one atomic `fetch_max`; it takes a lock
//! and wakes anyone only when someone sleeps.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long [`Semaphore::wait`] spins before it sleeps.
pub const SPIN: Duration = Duration::from_micros(50);

/// A timeline semaphore. Share it with `Arc<Semaphore>`.
#[derive(Debug)]
pub struct Semaphore {
    /// The value; only ever raised (`fetch_max`), so signals need no lock.
    value: AtomicU64,
    /// Set (once) when a wave fails the semaphore; the message is in
    /// `failure`.
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Sleepers hold this lock from registering until they wait, and
    /// wakers take it before notifying, so a wake-up cannot fall between a
    /// sleeper's last look at the value and its wait.
    sleep: Mutex<()>,
    changed: Condvar,
    /// Threads asleep (or about to sleep) on `changed`; signals skip the
    /// wake-up when 0.
    sleepers: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Semaphore {
    /// A semaphore whose value starts at `initial`.
    pub fn new(initial: u64) -> Self {
        Semaphore {
            value: AtomicU64::new(initial),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            sleep: Mutex::new(()),
            changed: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        }
    }

    /// Wakes sleeping waiters, if any, after a change to `value` or
    /// `failed`. A waiter counts itself in `sleepers` and then looks at the
    /// value again (both SeqCst, as are the change and this load), so either
    /// it sees the change or this sees it and wakes it.
    fn wake(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            drop(lock(&self.sleep));
            self.changed.notify_all();
        }
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.value.load(Ordering::Acquire)
    }

    /// The failure message, if a wave failed this semaphore.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// Sets the value to `value`; signalling the current value again is
    /// allowed, a lower value is [`Error::NonMonotonicSignal`] (and changes
    /// nothing).
    pub fn signal(&self, value: u64) -> Result<()> {
        let previous = self.value.fetch_max(value, Ordering::SeqCst);
        if value < previous {
            return Err(Error::NonMonotonicSignal {
                current: previous,
                requested: value,
            });
        }
        self.wake();
        Ok(())
    }

    /// Raises the value to at least `value` (what a finishing wave does:
    /// with several workers, waves may finish out of order, and a later
    /// finisher must not lower the value).
    pub(crate) fn raise_to(&self, value: u64) {
        self.value.fetch_max(value, Ordering::SeqCst);
        self.wake();
    }

    /// Marks the semaphore failed; waits return [`Error::WaveFailed`].
    pub fn fail(&self, message: impl Into<String>) {
        {
            let mut failure = lock(&self.failure);
            if failure.is_none() {
                *failure = Some(message.into());
                self.failed.store(true, Ordering::SeqCst);
            }
        }
        self.wake();
    }

    /// Waits until the value is at least `value`.
    ///
    /// `timeout_ns`: `0` polls, `u64::MAX` waits forever, anything else is a
    /// bound in ns. Returns [`Error::Timeout`] when the time runs out and
    /// [`Error::WaveFailed`] if the semaphore is failed.
    pub fn wait(&self, value: u64, timeout_ns: u64) -> Result<()> {
        let deadline = match timeout_ns {
            u64::MAX => None,
            ns => Instant::now().checked_add(Duration::from_nanos(ns)),
        };
        // Fast path: spin on the atomics (a wave usually finishes soon).
        let spin_until = Instant::now() + SPIN.min(Duration::from_nanos(timeout_ns));
        let mut spins = 0u32;
        while timeout_ns > 0 && !self.failed.load(Ordering::Acquire) {
            if self.value.load(Ordering::Acquire) >= value {
                return Ok(());
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                if Instant::now() >= spin_until {
                    break;
                }
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        loop {
            if self.failed.load(Ordering::SeqCst) {
                return Err(Error::WaveFailed(self.failure().unwrap_or_default()));
            }
            let now = self.value.load(Ordering::SeqCst);
            if now >= value {
                return Ok(());
            }
            let left = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => {
                        return Err(Error::Timeout {
                            what: format!("semaphore value {value} (it is {now})"),
                            timeout_ns,
                        });
                    }
                },
            };
            let guard = lock(&self.sleep);
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            let pending =
                self.value.load(Ordering::SeqCst) < value && !self.failed.load(Ordering::SeqCst);
            if pending {
                match left {
                    None => drop(self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())),
                    Some(left) => drop(
                        self.changed
                            .wait_timeout(guard, left)
                            .unwrap_or_else(|e| e.into_inner()),
                    ),
                }
            } else {
                drop(guard);
            }
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
