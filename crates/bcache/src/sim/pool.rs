//! A cache tier's contents, ordered by a policy's key.
//!
//! Every policy is "evict the entry with the smallest key"; they differ only
//! in the key: LRU uses the time of last use, FIFO the time of insertion,
//! Belady the negated time of next use, bcache the planner's eviction score.
//! Pinned entries (prefetched for a queued request) are skipped.

use std::collections::{BTreeSet, HashMap, HashSet};

/// A policy's ordering key: smaller is evicted first.
pub(crate) type Key = (u64, u64);

/// The blocks of one tier, ordered by key.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    capacity: usize,
    keys: HashMap<u64, Key>,
    order: BTreeSet<(Key, u64)>,
}

impl Pool {
    pub fn new(capacity: usize) -> Pool {
        Pool {
            capacity,
            ..Pool::default()
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn contains(&self, block: u64) -> bool {
        self.keys.contains_key(&block)
    }

    pub fn is_full(&self) -> bool {
        self.keys.len() >= self.capacity
    }

    /// Inserts or re-keys a block. The caller makes room first.
    pub fn set(&mut self, block: u64, key: Key) {
        if let Some(old) = self.keys.insert(block, key) {
            self.order.remove(&(old, block));
        }
        self.order.insert((key, block));
    }

    pub fn remove(&mut self, block: u64) -> bool {
        match self.keys.remove(&block) {
            Some(key) => {
                self.order.remove(&(key, block));
                true
            }
            None => false,
        }
    }

    /// Removes and returns the block with the smallest key that is not
    /// pinned, with its key.
    pub fn pop_victim(&mut self, pinned: &HashSet<u64>) -> Option<(u64, Key)> {
        let (key, victim) = self
            .order
            .iter()
            .find(|(_, b)| !pinned.contains(b))
            .copied()?;
        self.remove(victim);
        Some((victim, key))
    }
}
