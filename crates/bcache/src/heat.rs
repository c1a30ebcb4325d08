//! Decayed per-page hit counts that persist across windows, in bounded memory.
//!
//! A page's heat is its number of hits, each hit decaying with a configured
//! half-life: a page hit 8 times one half-life ago and once now has heat 5.
//! Heat orders pages for popularity, admission and eviction, so only its
//! order and rough size matter.
//!
//! Decaying every entry every window would cost O(pages) per window. Instead
//! each entry stores `heat x 2^((t - base) / half_life)`, its heat scaled up
//! to a common reference. All entries decay at the same rate, so this number
//! orders pages by their heat *now* without ever being touched again; adding
//! a hit adds `2^((t - base) / half_life)`, and the heat at time `t` is the
//! stored value times `2^(-(t - base) / half_life)`: one `exp2` per call,
//! none per page. When the scale grows large (after hundreds of half-lives)
//! the reference `base` moves forward and every entry is rescaled once.
//!
//! Memory is bounded: when the map grows past `max_pages`, the coldest half
//! is forgotten in one pass (amortised O(1) per insert). A forgotten page
//! simply starts again from zero, which is what a cold page has anyway.

use rustc_hash::FxHashMap;

/// A page as heat sees it: layer and page id. Heat is global across nodes:
/// popularity is a property of the content, not of where it is cached.
pub type PageKey = (u32, u64);

/// Decayed hit counts per page. See the module documentation.
#[derive(Debug, Clone)]
pub struct Heat {
    half_life_ns: f64,
    max_pages: usize,
    /// Heat scaled to `base`, per page.
    map: FxHashMap<PageKey, f64>,
    /// Reference time of the scale, ns.
    base_ns: u64,
}

/// Rescale once the scale factor passes 2^RESCALE_HALF_LIVES.
const RESCALE_HALF_LIVES: f64 = 256.0;

impl Heat {
    /// Empty heat with the given half-life and bound on remembered pages.
    pub fn new(half_life_ns: f64, max_pages: usize) -> Heat {
        Heat {
            half_life_ns: half_life_ns.max(1.0),
            max_pages: max_pages.max(1),
            map: FxHashMap::default(),
            base_ns: 0,
        }
    }

    /// `(t - base) / half_life`, negative before the base.
    fn epochs(&self, now_ns: u64) -> f64 {
        (now_ns as f64 - self.base_ns as f64) / self.half_life_ns
    }

    /// The weight of one hit at `now_ns` on the stored scale, rescaling
    /// first when it grows too large.
    pub fn hit_weight(&mut self, now_ns: u64) -> f64 {
        let e = self.epochs(now_ns);
        if e > RESCALE_HALF_LIVES {
            let factor = (-e).exp2();
            for v in self.map.values_mut() {
                *v *= factor;
            }
            self.base_ns = now_ns;
            return 1.0;
        }
        e.exp2()
    }

    /// Adds `hits` hits to `page` at time `now_ns`.
    pub fn add(&mut self, page: PageKey, hits: f64, now_ns: u64) {
        let w = self.hit_weight(now_ns);
        self.add_weighted(page, hits * w);
    }

    /// Adds `weighted` (hits times [`Heat::hit_weight`]) to `page` and
    /// returns its stored value: the form for adding many pages at one time.
    pub fn add_weighted(&mut self, page: PageKey, weighted: f64) -> f64 {
        if weighted.is_nan() || weighted <= 0.0 {
            return self.map.get(&page).copied().unwrap_or(0.0);
        }
        let slot = self.map.entry(page).or_insert(0.0);
        *slot += weighted;
        let value = *slot;
        if self.map.len() > self.max_pages {
            self.forget_coldest_half();
        }
        value
    }

    /// Makes room for `pages` more pages (up to the bound) in one step, so a
    /// window that brings many new pages does not grow the table by doubling.
    pub fn reserve(&mut self, pages: usize) {
        let room = self.max_pages.saturating_sub(self.map.len());
        self.map.reserve(pages.min(room));
    }

    /// The factor turning stored values into heat at `now_ns`.
    pub fn scale(&self, now_ns: u64) -> f64 {
        (-self.epochs(now_ns)).exp2()
    }

    /// Heat of `page` at time `now_ns`; 0 for a page never seen or forgotten.
    pub fn get(&self, page: PageKey, now_ns: u64) -> f64 {
        self.map.get(&page).map_or(0.0, |v| v * self.scale(now_ns))
    }

    /// Heat of `page` given the factor from [`Heat::scale`].
    pub fn get_scaled(&self, page: PageKey, scale: f64) -> f64 {
        self.map.get(&page).map_or(0.0, |v| v * scale)
    }

    /// A rank that never changes with time: `log2(heat) + t / half_life`,
    /// the same at any `t`, rescales included. Pages compare by rank as they
    /// compare by heat at any one time. `-inf` for a page never seen or
    /// forgotten.
    pub fn rank(&self, page: PageKey) -> f64 {
        match self.map.get(&page) {
            Some(v) if *v > 0.0 => v.log2() + self.base_ns as f64 / self.half_life_ns,
            _ => f64::NEG_INFINITY,
        }
    }

    /// Every remembered page with its heat at `now_ns`, sorted, for saving.
    pub fn entries(&self, now_ns: u64) -> Vec<(u32, u64, f64)> {
        let scale = self.scale(now_ns);
        let mut out: Vec<(u32, u64, f64)> = self
            .map
            .iter()
            .map(|(&(l, p), &v)| (l, p, v * scale))
            .collect();
        out.sort_by_key(|e| (e.0, e.1));
        out
    }

    /// Restores pages saved by [`Heat::entries`] at `now_ns` (values that
    /// are not finite and positive are skipped).
    pub fn restore(&mut self, entries: &[(u32, u64, f64)], now_ns: u64) {
        self.base_ns = now_ns;
        for &(l, p, v) in entries {
            if v.is_finite() && v > 0.0 {
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
