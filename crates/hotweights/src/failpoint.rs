//! Crash injection: abort the process at a named step.
//!
//! A store must stay consistent whatever instant the process dies at. The
//! tests prove it by running the CLI as a child process with
//! `BSTACK_FAILPOINT=NAME` (or `NAME@N` for the N-th time the step is
//! reached), which makes [`hit`] abort the process there, as a crash or a
//! `kill -9` would: no destructor runs, no buffer is flushed. The tests then
//! open the store and check it.
//!
//! The points are always compiled in: a build with them switched off would
//! not be the build that the tests prove. When the variable is unset, [`hit`]
//! costs one load of a cached value.
//!
//! | name | where |
//! |---|---|
//! | `apply.chunk` | after each new chunk is stored |
//! | `apply.before-manifest` | every chunk stored, the version not yet visible |
//! | `apply.after-manifest` | the version visible, the apply journal not yet removed |
//! | `commit.before-rename` | the new state written to its temporary file |
//! | `commit.after-rename` | the new state in place, its directory not yet synced |
//! | `rollback.before-rename`, `rollback.after-rename` | as for commit |
//! | `apply.before-rename`, `apply.after-rename` | recording the version last applied |
//! | `gc.before-rename`, `gc.after-rename` | the shorter history and the retired versions |
//! | `gc-retired.before-rename`, `gc-retired.after-rename` | retired manifests deleted |
//! | `gc.chunk` | after each chunk deleted |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms a failpoint.
pub const ENV: &str = "BSTACK_FAILPOINT";

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn armed() -> Option<&'static (String, u64)> {
    ARMED
        .get_or_init(|| {
            let value = std::env::var(ENV).ok()?;
            match value.split_once('@') {
                Some((name, n)) => Some((name.to_owned(), n.parse().ok()?)),
                None => Some((value, 1)),
            }
        })
        .as_ref()
}

/// Aborts the process if the failpoint `name` is armed and this is the
/// N-th time it is reached.
pub fn hit(name: &str) {
    if let Some((armed, at)) = armed()
        && armed == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *at
    {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}
