//! Decayed per-page hit counts that persist across windows, in bounded memory.
//!
//! A page's heat is its number of hits, each hit decaying with a configured
//! half-life: a page hit 8 times one half-life ago and once now has heat 5.
//! Heat orders pages for popularity, admission and eviction, so only its
//! order and rough size matter.
//!
//! Decaying every entry every window would cost O(pages) per window. Instead
//! each entry stores `log2(heat) + t / half_life` at the time of its last
//! update. All entries decay at the same rate, so this number orders pages by
//! their heat *now* without ever being touched again, and the heat at time `t`
//! is `2^(stored - t / half_life)`.
//!
//! Memory is bounded: when the map grows past `max_pages`, the coldest half
//! is forgotten in one pass (amortised O(1) per insert). A forgotten page
//! simply starts again from zero, which is what a cold page has anyway.

use std::collections::HashMap;

/// A page as heat sees it: layer and page id. Heat is global across nodes:
/// popularity is a property of the content, not of where it is cached.
pub type PageKey = (u32, u64);

/// Decayed hit counts per page. See the module documentation.
#[derive(Debug, Clone)]
pub struct Heat {
    half_life_ns: f64,
    max_pages: usize,
    /// `log2(heat) + t / half_life`, per page.
    map: HashMap<PageKey, f64>,
}

impl Heat {
    /// Empty heat with the given half-life and bound on remembered pages.
    pub fn new(half_life_ns: f64, max_pages: usize) -> Heat {
        Heat {
            half_life_ns: half_life_ns.max(1.0),
            max_pages: max_pages.max(1),
            map: HashMap::new(),
        }
    }

    fn epoch(&self, now_ns: u64) -> f64 {
        now_ns as f64 / self.half_life_ns
    }

    /// Adds `hits` hits to `page` at time `now_ns`.
    pub fn add(&mut self, page: PageKey, hits: f64, now_ns: u64) {
        if hits <= 0.0 {
            return;
        }
        let epoch = self.epoch(now_ns);
        let slot = self.map.entry(page).or_insert(f64::NEG_INFINITY);
        let current = (*slot - epoch).exp2();
        *slot = (current + hits).log2() + epoch;
        if self.map.len() > self.max_pages {
            self.forget_coldest_half();
        }
    }

    /// Heat of `page` at time `now_ns`; 0 for a page never seen or forgotten.
    pub fn get(&self, page: PageKey, now_ns: u64) -> f64 {
        self.map
            .get(&page)
            .map_or(0.0, |v| (v - self.epoch(now_ns)).exp2())
    }

    /// A time-invariant rank: pages compare by rank as they compare by heat
    /// at any one time. `-inf` for a page never seen or forgotten.
    pub fn rank(&self, page: PageKey) -> f64 {
        self.map.get(&page).copied().unwrap_or(f64::NEG_INFINITY)
    }

    /// Every remembered page with its rank, sorted, for saving.
    pub fn entries(&self) -> Vec<(u32, u64, f64)> {
        let mut out: Vec<(u32, u64, f64)> =
            self.map.iter().map(|(&(l, p), &v)| (l, p, v)).collect();
        out.sort_by_key(|e| (e.0, e.1));
        out
    }

    /// Restores pages saved by [`Heat::entries`] (ranks that are not finite
    /// are skipped).
    pub fn restore(&mut self, entries: &[(u32, u64, f64)]) {
        for &(l, p, v) in entries {
            if v.is_finite() {
                self.map.insert((l, p), v);
            }
        }
        if self.map.len() > self.max_pages {
            self.forget_coldest_half();
        }
    }

    /// Number of pages remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no page is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn forget_coldest_half(&mut self) {
        let mut values: Vec<f64> = self.map.values().copied().collect();
        let mid = values.len() / 2;
        values.select_nth_unstable_by(mid, f64::total_cmp);
        let threshold = values[mid];
        self.map.retain(|_, v| *v > threshold);
    }
}
