//! Host barriers for threads that feed and drain the runtime.
//!
//! An [`MBarrier`] works like the GPU's `mbarrier`: it has an *expected*
//! arrival count and a *phase* number. Threads [`arrive`](MBarrier::arrive)
//! with a count; the arrival that brings the total to the expected count
//! completes the phase (the phase number goes up by one and the count starts
//! again). `arrive` returns the phase the caller arrived in, and
//! [`wait`](MBarrier::wait) on that phase returns once it has completed.
//! Splitting arrive from wait lets a thread do other work in between.
//!
//! A [`Barrier`] is the common case: `n` threads, each arrives once and
//! waits for the others.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Debug)]
struct State {
    phase: u64,
    arrived: u64,
}

/// A phased barrier with an expected arrival count.
#[derive(Debug)]
pub struct MBarrier {
    expected: u64,
    state: Mutex<State>,
    changed: Condvar,
}

impl MBarrier {
    /// A barrier whose phases complete after `expected` arrivals (> 0).
    pub fn new(expected: u64) -> Result<Self> {
        if expected == 0 {
            return Err(Error::invalid("expected", "must be > 0"));
        }
        Ok(MBarrier {
            expected,
            state: Mutex::new(State {
                phase: 0,
                arrived: 0,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The arrival count that completes a phase.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// The current (not yet completed) phase.
    pub fn phase(&self) -> u64 {
        self.lock().phase
    }

    /// Records `count` arrivals (> 0, and no more than the phase still
    /// needs) and returns the phase they belong to.
    pub fn arrive(&self, count: u64) -> Result<u64> {
        let mut s = self.lock();
        let left = self.expected - s.arrived;
        if count == 0 || count > left {
            return Err(Error::invalid(
                "count",
                format!(
                    "{count} arrivals, but phase {} needs 1 to {left} more",
                    s.phase
                ),
            ));
        }
        let phase = s.phase;
        s.arrived += count;
        if s.arrived == self.expected {
            s.arrived = 0;
            s.phase += 1;
            drop(s);
            self.changed.notify_all();
        }
        Ok(phase)
    }

    /// Waits until `phase` has completed; `timeout_ns` as for semaphores
    /// (`0` polls, `u64::MAX` waits forever).
    pub fn wait(&self, phase: u64, timeout_ns: u64) -> Result<()> {
        let deadline = match timeout_ns {
            u64::MAX => None,
            ns => Instant::now().checked_add(Duration::from_nanos(ns)),
        };
        let mut s = self.lock();
        while s.phase <= phase {
            s = match deadline {
                None => self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Error::Timeout {
                            what: format!("barrier phase {phase} (current phase {})", s.phase),
                            timeout_ns,
                        });
                    }
                    self.changed
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        Ok(())
    }
}

/// A barrier for `n` threads: each calls [`Barrier::wait`] once per phase.
#[derive(Debug)]
pub struct Barrier {
    inner: MBarrier,
}

impl Barrier {
    /// A barrier for `threads` (> 0) threads.
    pub fn new(threads: u64) -> Result<Self> {
        Ok(Barrier {
            inner: MBarrier::new(threads).map_err(|_| Error::invalid("threads", "must be > 0"))?,
        })
    }

    /// Arrives and waits for the others; returns the phase that completed.
    pub fn wait(&self, timeout_ns: u64) -> Result<u64> {
        let phase = self.inner.arrive(1)?;
        self.inner.wait(phase, timeout_ns)?;
        Ok(phase)
    }

    /// The current phase.
    pub fn phase(&self) -> u64 {
        self.inner.phase()
    }
}
