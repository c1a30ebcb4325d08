//! The one way this crate takes a mutex.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking over a lock poisoned by a panic elsewhere: every
/// update this crate makes under a lock completes before anything that can
/// panic, so the data behind a poisoned lock is still consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
