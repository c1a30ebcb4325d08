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
//! condition variable; a signal takes the lock and wakes sleepers only
//! when someone sleeps.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Debug)]
struct State {
    value: u64,
    failure: Option<String>,
}

/// How long [`Semaphore::wait`] spins before it sleeps.
pub const SPIN: Duration = Duration::from_micros(50);

/// A timeline semaphore. Share it with `Arc<Semaphore>`.
#[derive(Debug)]
pub struct Semaphore {
    state: Mutex<State>,
    changed: Condvar,
    /// `state.value`, readable without the lock (written under it).
    value: AtomicU64,
    /// Whether `state.failure` is set (written under the lock).
    failed: AtomicBool,
    /// Threads asleep on `changed`; signals skip the wake-up when 0.
    sleepers: AtomicUsize,
}

impl Semaphore {
    /// A semaphore whose value starts at `initial`.
    pub fn new(initial: u64) -> Self {
        Semaphore {
            state: Mutex::new(State {
                value: initial,
                failure: None,
            }),
            changed: Condvar::new(),
            value: AtomicU64::new(initial),
            failed: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
        }
    }

    /// Wakes sleeping waiters, if any. Called after a change made under the
    /// lock: a waiter registers as a sleeper under the same lock before it
    /// checks the value, so it either sees the change or is woken.
    fn wake(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.changed.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.value.load(Ordering::Acquire)
    }

    /// The failure message, if a wave failed this semaphore.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Sets the value to `value`; signalling the current value again is
    /// allowed, a lower value is [`Error::NonMonotonicSignal`].
    pub fn signal(&self, value: u64) -> Result<()> {
        let mut s = self.lock();
        if value < s.value {
            return Err(Error::NonMonotonicSignal {
                current: s.value,
                requested: value,
            });
        }
        s.value = value;
        self.value.store(value, Ordering::SeqCst);
        drop(s);
        self.wake();
        Ok(())
    }

    /// Raises the value to at least `value` (what a finishing wave does:
    /// with several workers, waves may finish out of order, and a later
    /// finisher must not lower the value).
    pub(crate) fn raise_to(&self, value: u64) {
        let mut s = self.lock();
        s.value = s.value.max(value);
        self.value.store(s.value, Ordering::SeqCst);
        drop(s);
        self.wake();
    }

    /// Marks the semaphore failed; waits return [`Error::WaveFailed`].
    pub fn fail(&self, message: impl Into<String>) {
        let mut s = self.lock();
        if s.failure.is_none() {
            s.failure = Some(message.into());
            self.failed.store(true, Ordering::SeqCst);
        }
        drop(s);
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
        let mut s = self.lock();
        loop {
            if let Some(message) = &s.failure {
                return Err(Error::WaveFailed(message.clone()));
            }
            if s.value >= value {
                return Ok(());
            }
            let left = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => {
                        return Err(Error::Timeout {
                            what: format!("semaphore value {value} (it is {})", s.value),
                            timeout_ns,
                        });
                    }
                },
            };
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            s = match left {
                None => self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(left) => {
                    self.changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
