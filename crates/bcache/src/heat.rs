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
//! Pages live in blocks of [`BLOCK`] consecutive ids of one layer: requests
//! need runs of consecutive pages, so one table lookup serves a whole block
//! and the values sit together in memory, where a table of single pages
//! would take a cache miss per page.
//!
//! Memory is bounded: when more than `max_pages` pages have heat, the
//! coldest half is forgotten in one pass (amortised O(1) per insert), and
//! blocks left empty are reused. A forgotten page simply starts again from
//! zero, which is what a cold page has anyway.

use rustc_hash::FxHashMap;

/// A page as heat sees it: layer and page id. Heat is global across nodes:
/// popularity is a property of the content, not of where it is cached.
pub type PageKey = (u32, u64);

/// Consecutive pages per block.
pub const BLOCK: usize = 16;

/// Decayed hit counts per page. See the module documentation.
#[derive(Debug, Clone)]
pub struct Heat {
    half_life_ns: f64,
    max_pages: usize,
    /// (layer, page / BLOCK) to its slot in `blocks`.
    index: FxHashMap<PageKey, u32>,
    /// Heat scaled to `base`, per page of each block; 0 is no heat.
    blocks: Vec<[f64; BLOCK]>,
    /// The key of each slot, to find it again when forgetting.
    keys: Vec<PageKey>,
    /// Slots emptied by forgetting, to reuse.
    free: Vec<u32>,
    /// Pages with heat.
    pages: usize,
    /// Reference time of the scale, ns.
    base_ns: u64,
}

/// Rescale once the scale factor passes 2^RESCALE_HALF_LIVES.
const RESCALE_HALF_LIVES: f64 = 256.0;

fn split(page: PageKey) -> (PageKey, usize) {
    (
        (page.0, page.1 / BLOCK as u64),
        (page.1 % BLOCK as u64) as usize,
    )
}

impl Heat {
    /// Empty heat with the given half-life and bound on remembered pages.
    pub fn new(half_life_ns: f64, max_pages: usize) -> Heat {
        Heat {
            half_life_ns: half_life_ns.max(1.0),
            max_pages: max_pages.max(1),
            index: FxHashMap::default(),
            blocks: Vec::new(),
            keys: Vec::new(),
            free: Vec::new(),
            pages: 0,
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
            for v in self.blocks.iter_mut().flatten() {
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
        let mut sum = 0.0;
        self.add_run(page.0, page.1, std::iter::once(weighted), |v| sum = v);
        sum
    }

    /// Adds the weighted hits `weights` (hits times [`Heat::hit_weight`]) to
    /// pages `start, start + 1, ...` of `layer`, calling `stored` with each
    /// page's stored value after the addition, in page order. One table
    /// lookup per block, not per page.
    pub fn add_run(
        &mut self,
        layer: u32,
        start: u64,
        weights: impl IntoIterator<Item = f64>,
        mut stored: impl FnMut(f64),
    ) {
        let mut slot: Option<(u64, usize)> = None;
        for (i, weighted) in weights.into_iter().enumerate() {
            let page = start.saturating_add(i as u64);
            let ((_, block), at) = split((layer, page));
            let add = !weighted.is_nan() && weighted > 0.0;
            let current = match slot {
                Some((b, s)) if b == block => Some(s),
                _ => {
                    let found = if add {
                        Some(self.slot_for((layer, block)))
                    } else {
                        self.index.get(&(layer, block)).map(|&s| s as usize)
                    };
                    slot = found.map(|s| (block, s));
                    found
                }
            };
            let Some(s) = current else {
                stored(0.0);
                continue;
            };
            let value = &mut self.blocks[s][at];
            if add {
                if *value == 0.0 {
                    self.pages += 1;
                }
                *value += weighted;
            }
            stored(*value);
            if self.pages > self.max_pages {
                self.forget_coldest_half();
                // Forgetting may have emptied and freed the block.
                slot = None;
            }
        }
    }

    /// The slot of a block, made empty when new.
    fn slot_for(&mut self, key: PageKey) -> usize {
        if let Some(&s) = self.index.get(&key) {
            return s as usize;
        }
        let s = match self.free.pop() {
            Some(s) => {
                self.keys[s as usize] = key;
                s
            }
            None => {
                self.blocks.push([0.0; BLOCK]);
                self.keys.push(key);
                (self.blocks.len() - 1) as u32
            }
        };
        self.index.insert(key, s);
        s as usize
    }

    fn stored(&self, page: PageKey) -> Option<f64> {
        let (key, at) = split(page);
        let s = *self.index.get(&key)?;
        let v = self.blocks[s as usize][at];
        (v > 0.0).then_some(v)
    }

    /// Makes room for blocks holding `pages` more pages (up to the bound)
    /// in one step, so a window that brings many new pages does not grow the
    /// table by doubling.
    pub fn reserve(&mut self, pages: usize) {
        let room = self.max_pages.saturating_sub(self.pages) / BLOCK;
        let more = (pages / BLOCK).min(room).saturating_sub(self.free.len());
        self.index.reserve(more);
        self.blocks.reserve(more);
        self.keys.reserve(more);
    }

    /// The factor turning stored values into heat at `now_ns`.
    pub fn scale(&self, now_ns: u64) -> f64 {
        (-self.epochs(now_ns)).exp2()
    }

    /// Heat of `page` at time `now_ns`; 0 for a page never seen or forgotten.
    pub fn get(&self, page: PageKey, now_ns: u64) -> f64 {
        self.get_scaled(page, self.scale(now_ns))
    }

    /// Heat of `page` given the factor from [`Heat::scale`].
    pub fn get_scaled(&self, page: PageKey, scale: f64) -> f64 {
        self.stored(page).map_or(0.0, |v| v * scale)
    }

    /// A rank that never changes with time: `log2(heat) + t / half_life`,
    /// the same at any `t`, rescales included. Pages compare by rank as they
    /// compare by heat at any one time. `-inf` for a page never seen or
    /// forgotten.
    pub fn rank(&self, page: PageKey) -> f64 {
        match self.stored(page) {
            Some(v) => v.log2() + self.base_ns as f64 / self.half_life_ns,
            None => f64::NEG_INFINITY,
        }
    }

    /// Every remembered page with its heat at `now_ns`, sorted, for saving.
    pub fn entries(&self, now_ns: u64) -> Vec<(u32, u64, f64)> {
        let scale = self.scale(now_ns);
        let mut out = Vec::with_capacity(self.pages);
        for (&(layer, block), &s) in &self.index {
            for (at, &v) in self.blocks[s as usize].iter().enumerate() {
                if v > 0.0 {
                    out.push((layer, block * BLOCK as u64 + at as u64, v * scale));
                }
            }
        }
        out.sort_by_key(|e| (e.0, e.1));
        out
    }

    /// Restores pages saved by [`Heat::entries`] at `now_ns` (values that
    /// are not finite and positive are skipped).
    pub fn restore(&mut self, entries: &[(u32, u64, f64)], now_ns: u64) {
        self.base_ns = now_ns;
        for &(l, p, v) in entries {
            if v.is_finite() && v > 0.0 {
                let s = self.slot_for(split((l, p)).0);
                let value = &mut self.blocks[s][split((l, p)).1];
                if *value == 0.0 {
                    self.pages += 1;
                }
                *value = v;
            }
        }
        // Each pass forgets at least the median page.
        while self.pages > self.max_pages {
            self.forget_coldest_half();
        }
    }

    /// Number of pages remembered.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Whether no page is remembered.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    fn forget_coldest_half(&mut self) {
        let mut values: Vec<f64> = Vec::with_capacity(self.pages);
        for &s in self.index.values() {
            values.extend(self.blocks[s as usize].iter().filter(|v| **v > 0.0));
        }
        if values.is_empty() {
            return;
        }
        let mid = values.len() / 2;
        values.select_nth_unstable_by(mid, f64::total_cmp);
        let threshold = values[mid];
        let mut pages = 0;
        let mut emptied = Vec::new();
        for (&key, &s) in &self.index {
            let block = &mut self.blocks[s as usize];
            for v in block.iter_mut() {
                if *v <= threshold {
                    *v = 0.0;
                } else {
                    pages += 1;
                }
            }
            if block.iter().all(|v| *v == 0.0) {
                emptied.push((key, s));
            }
        }
        for (key, s) in emptied {
            self.index.remove(&key);
            self.free.push(s);
        }
        self.pages = pages;
    }
}
