//! Every knob of the planner, the simulator and the tuner, with its default.
//!
//! One YAML file holds them all, in three sections:
//!
//! ```yaml
//! planner:
//!   window_ms: 20
//!   alpha: 1.0
//! sim:
//!   nodes: 2
//! tune:
//!   objective_ttft_weight: 1.0
//! ```
//!
//! Every key is optional; a missing key takes its default, and an unknown key
//! is an error that names it. [`KNOBS`] lists each key with its default, its
//! command-line flag and what it does: the CLI builds one flag per knob from
//! it, and the README's configuration table is printed from it
//! (`bstack bcache config --docs`), so the three cannot drift apart.
//! Precedence: defaults, then the YAML file, then flags.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::lsh::LshConfig;

/// The whole configuration: planner, simulator and tuner sections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How one window is planned.
    pub planner: PlannerConfig,
    /// The simulated cluster and workload.
    pub sim: SimConfig,
    /// The tuner's objective and sweep.
    pub tune: TuneConfig,
}

/// Knobs of the planner. Each stage can be switched off for ablation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlannerConfig {
    /// Length of one planning window, ms.
    pub window_ms: f64,
    /// Stage switch: keep decayed per-page heat across windows.
    pub heat: bool,
    /// Half-life of page heat, ms.
    pub heat_half_life_ms: f64,
    /// Most pages whose heat is remembered; the coldest are forgotten first.
    pub heat_max_pages: usize,
    /// Weight of heat in popularity.
    pub alpha: f64,
    /// Weight of the tenant's weight in popularity.
    pub beta: f64,
    /// Stage switch: order by least slack (earliest deadline first). Off:
    /// input order.
    pub edf: bool,
    /// Stage switch: fetch a page needed by several requests once.
    pub dedup: bool,
    /// Stage switch: charge tenants' token buckets; work over budget is deferred.
    pub credits: bool,
    /// Stage switch: merge adjacent pages into runs and runs into larger reads.
    pub coalesce: bool,
    /// Runs separated by at most this many unneeded pages are read as one,
    /// when reading the gap costs less than a separate operation.
    pub max_gap_pages: u64,
    /// Fixed cost of one operation, µs: what a merged gap must beat.
    pub op_overhead_us: f64,
    /// Reads below this many bytes wait for more demand to batch with,
    /// unless their deadline falls within the next two windows.
    pub min_io_bytes: u64,
    /// Reads above this many bytes are split.
    pub max_io_bytes: u64,
    /// Stage switch: respect per-node, per-tier bandwidth and free space;
    /// what does not fit is deferred to the next window.
    pub caps: bool,
    /// Stage switch: layer-aware deadlines and prefetch depth.
    pub overlap: bool,
    /// Deepest prefetch (in layers ahead of compute) the overlap stage asks for.
    pub max_prefetch_depth: u32,
    /// Compute latency of a layer when the input gives none, µs.
    pub default_layer_latency_us: f64,
    /// Stage switch: selective write-through of hot pages into the tier
    /// between source and destination.
    pub admission: bool,
    /// Hits after which a page fetched from a slow tier is also written to
    /// the intermediate tier.
    pub admit_after_hits: f64,
    /// Stage switch: evict cold pages when a tier fills.
    pub eviction: bool,
    /// Eviction starts when a tier's use (with this window's fetches) goes
    /// above this fraction of its capacity...
    pub high_watermark: f64,
    /// ...and stops when use is back at this fraction.
    pub low_watermark: f64,
    /// Stage switch: group the window's requests into prefix clusters and
    /// report, per cluster of two or more, the node that already holds most
    /// of its pages (routing hints; the plan itself is unchanged). Off by
    /// default: it costs about a quarter of a window's planning time, worth
    /// paying when a router reads the hints.
    pub route_hints: bool,
    /// LSH bands for clustering requests that carry prompt tokens: prompts
    /// are candidates when any band matches (more bands: fewer missed pairs).
    pub lsh_bands: usize,
    /// MinHash values per LSH band: a band matches when all of them do
    /// (more rows: fewer false pairs).
    pub lsh_rows: usize,
    /// Tokens per shingle of the MinHash signature.
    pub lsh_shingle: usize,
    /// Leading page ids that decide the cluster of a request without prompt
    /// tokens: requests whose first this many pages are equal share one.
    pub prefix_depth: usize,
}

impl Default for PlannerConfig {
    fn default() -> PlannerConfig {
        PlannerConfig {
            window_ms: 20.0,
            heat: true,
            heat_half_life_ms: 60_000.0,
            heat_max_pages: 1 << 20,
            alpha: 1.0,
            beta: 0.0,
            edf: true,
            dedup: true,
            credits: true,
            coalesce: true,
            max_gap_pages: 2,
            op_overhead_us: 20.0,
            min_io_bytes: 512 * 1024,
            max_io_bytes: 64 << 20,
            caps: true,
            overlap: true,
            max_prefetch_depth: 4,
            default_layer_latency_us: 500.0,
            admission: true,
            admit_after_hits: 2.0,
            eviction: true,
            high_watermark: 0.95,
            low_watermark: 0.85,
            route_hints: false,
            lsh_bands: LshConfig::default().bands,
            lsh_rows: LshConfig::default().rows,
            lsh_shingle: LshConfig::default().shingle,
            prefix_depth: 4,
        }
    }
}

/// The most MinHash values (`lsh_bands * lsh_rows`) a signature may have:
/// each prompt costs `tokens x values` multiply-adds, so a mistyped knob
/// must not turn a window into minutes of hashing.
pub const MAX_LSH_SIGNATURE: usize = 1024;

impl PlannerConfig {
    /// Window length in ns.
    pub fn window_ns(&self) -> u64 {
        ms_to_ns(self.window_ms)
    }

    /// The LSH settings of the routing hints' prompt clustering (the hash
    /// seed is [`LshConfig`]'s default, so clusters are stable across runs).
    pub fn lsh(&self) -> LshConfig {
        LshConfig {
            bands: self.lsh_bands,
            rows: self.lsh_rows,
            shingle: self.lsh_shingle,
            ..LshConfig::default()
        }
    }
}

/// How requests are assigned to nodes in the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// Requests go to nodes in turn.
    RoundRobin,
    /// Requests whose first `affinity_blocks` blocks are equal go to the
    /// same node, so that shared prefixes are cached once.
    PrefixAffinity,
}

/// The simulated cluster, model and workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Serving nodes (one GPU each).
    pub nodes: usize,
    /// `round-robin` or `prefix-affinity`.
    pub routing: Routing,
    /// Leading blocks that decide a request's node under prefix affinity.
    pub affinity_blocks: usize,
    /// Model layers (KV block size and layer overlap).
    pub layers: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// Bytes per KV element (2 for bf16 / fp16, 1 for fp8).
    pub dtype_bytes: u32,
    /// Tokens per KV block (512 in the Mooncake traces).
    pub block_tokens: u32,
    /// GPU memory kept for cached KV blocks, GiB per node.
    pub gpu_gib: f64,
    /// Host memory for KV blocks, GiB per node.
    pub cpu_gib: f64,
    /// SSD space for KV blocks, GiB per node; 0 for no SSD tier.
    pub ssd_gib: f64,
    /// Host-to-GPU bandwidth, GB/s (PCIe 5 x16 is about 50 in theory, 25 in practice).
    pub h2d_gbps: f64,
    /// GPU-to-host bandwidth for offloads, GB/s.
    pub d2h_gbps: f64,
    /// SSD read bandwidth, GB/s.
    pub ssd_read_gbps: f64,
    /// SSD write bandwidth, GB/s.
    pub ssd_write_gbps: f64,
    /// Prefill compute per uncached token, µs.
    pub prefill_us_per_token: f64,
    /// Fixed cost per request (scheduling, sampling the first token), ms.
    pub request_overhead_ms: f64,
    /// Policies to compare: any of `lru`, `fifo`, `belady`, `bcache`.
    pub policies: Vec<String>,
    /// bcache: queued requests (from the head of the queue) whose blocks
    /// each window may prefetch.
    pub prefetch_lookahead: usize,
    /// bcache: heat a block needs to be written from CPU to SSD when
    /// evicted; 0 writes every block.
    pub ssd_admit_after_hits: f64,
    /// bcache: share of the GPU cache that prefetched blocks waiting for
    /// their request may occupy.
    pub prefetch_buffer_fraction: f64,
    /// Cache sizes to sweep, as multiples of the tier capacities above.
    pub capacity_scales: Vec<f64>,
    /// Replay only requests that arrive before this time, s; 0 for all.
    pub duration_s: f64,
    /// Seed for every random choice (synthetic traces); runs with the same
    /// seed and inputs give identical results.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            nodes: 2,
            routing: Routing::PrefixAffinity,
            affinity_blocks: 2,
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2,
            block_tokens: 512,
            gpu_gib: 32.0,
            cpu_gib: 128.0,
            ssd_gib: 1024.0,
            h2d_gbps: 25.0,
            d2h_gbps: 25.0,
            ssd_read_gbps: 6.0,
            ssd_write_gbps: 3.0,
            prefill_us_per_token: 40.0,
            request_overhead_ms: 5.0,
            policies: vec![
                "lru".into(),
                "fifo".into(),
                "belady".into(),
                "bcache".into(),
            ],
            prefetch_lookahead: 16,
            ssd_admit_after_hits: 0.0,
            prefetch_buffer_fraction: 0.5,
            capacity_scales: vec![0.25, 1.0, 4.0],
            duration_s: 0.0,
            seed: 42,
        }
    }
}

impl SimConfig {
    /// Bytes of one KV block: keys and values, every layer, every token.
    pub fn block_bytes(&self) -> u64 {
        2 * u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
            * u64::from(self.block_tokens)
    }
}

/// The tuner's objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuneConfig {
    /// Weight of TTFT p90 (seconds) in the objective (lower is better).
    pub objective_ttft_weight: f64,
    /// Weight of the fraction of demanded bytes deferred past their deadline.
    pub objective_late_weight: f64,
    /// Weight of the fraction of demanded bytes dropped.
    pub objective_drop_weight: f64,
    /// Cache size multiple the tuner simulates at.
    pub capacity_scale: f64,
}

impl Default for TuneConfig {
    fn default() -> TuneConfig {
        TuneConfig {
            objective_ttft_weight: 1.0,
            objective_late_weight: 1.0,
            objective_drop_weight: 10.0,
            capacity_scale: 1.0,
        }
    }
}

/// One documented knob: its key in the YAML file, its flag, and what it does.
#[derive(Debug, Clone, Copy)]
pub struct Knob {
    /// Dotted key: `planner.window_ms`.
    pub key: &'static str,
    /// Long flag without dashes: `window-ms`.
    pub flag: &'static str,
    /// One line on what it does.
    pub doc: &'static str,
}

macro_rules! knobs {
    ($($key:literal, $flag:literal, $doc:literal;)*) => {
        /// Every configuration key, in file order.
        pub const KNOBS: &[Knob] = &[$(Knob { key: $key, flag: $flag, doc: $doc }),*];
    };
}

knobs! {
    "planner.window_ms", "window-ms", "Length of one planning window, ms.";
    "planner.heat", "heat", "Stage switch: decayed per-page heat kept across windows.";
    "planner.heat_half_life_ms", "heat-half-life-ms", "Half-life of page heat, ms.";
    "planner.heat_max_pages", "heat-max-pages", "Most pages whose heat is remembered; the coldest are forgotten first.";
    "planner.alpha", "alpha", "Weight of heat in popularity (popularity = alpha * heat + beta * tenant weight).";
    "planner.beta", "beta", "Weight of the tenant weight in popularity.";
    "planner.edf", "edf", "Stage switch: order by least slack (earliest deadline first); off keeps input order.";
    "planner.dedup", "dedup", "Stage switch: a page needed by several requests is fetched once.";
    "planner.credits", "credits", "Stage switch: tenant token buckets; work over budget is deferred.";
    "planner.coalesce", "coalesce", "Stage switch: merge adjacent pages and nearby runs into larger reads.";
    "planner.max_gap_pages", "max-gap-pages", "Runs separated by at most this many unneeded pages are read as one when that is cheaper.";
    "planner.op_overhead_us", "op-overhead-us", "Fixed cost of one operation, µs; a merged gap must cost less.";
    "planner.min_io_bytes", "min-io-bytes", "Reads below this size wait to be batched unless due within two windows.";
    "planner.max_io_bytes", "max-io-bytes", "Reads above this size are split.";
    "planner.caps", "caps", "Stage switch: per-node, per-tier bandwidth and free-space caps; excess is deferred.";
    "planner.overlap", "overlap", "Stage switch: layer-aware deadlines and prefetch depth.";
    "planner.max_prefetch_depth", "max-prefetch-depth", "Deepest prefetch, in layers ahead of compute.";
    "planner.default_layer_latency_us", "default-layer-latency-us", "Layer compute latency when the input gives none, µs.";
    "planner.admission", "admission", "Stage switch: write hot pages through to the intermediate tier.";
    "planner.admit_after_hits", "admit-after-hits", "Heat (decayed hits) after which a page is written through.";
    "planner.eviction", "eviction", "Stage switch: evict the coldest, cheapest pages when a tier fills.";
    "planner.high_watermark", "high-watermark", "Eviction starts above this fraction of a tier's capacity.";
    "planner.low_watermark", "low-watermark", "Eviction stops at this fraction of a tier's capacity.";
    "planner.route_hints", "route-hints", "Stage switch: cluster near-duplicate prompts and report the node holding most of each cluster's pages (for a router; adds about a quarter to planning time).";
    "planner.lsh_bands", "lsh-bands", "LSH bands for prompt clustering; prompts sharing any band cluster (more: fewer misses).";
    "planner.lsh_rows", "lsh-rows", "MinHash values per LSH band; a band matches when all do (more: fewer false pairs).";
    "planner.lsh_shingle", "lsh-shingle", "Tokens per shingle of a prompt's MinHash signature.";
    "planner.prefix_depth", "prefix-depth", "Leading page ids that group requests without prompt tokens, exactly.";
    "sim.nodes", "nodes", "Serving nodes, one GPU each.";
    "sim.routing", "routing", "Request placement: round-robin or prefix-affinity.";
    "sim.affinity_blocks", "affinity-blocks", "Leading blocks that choose the node under prefix affinity.";
    "sim.layers", "layers", "Model layers (KV block size, layer overlap).";
    "sim.kv_heads", "kv-heads", "KV heads per layer.";
    "sim.head_dim", "head-dim", "Dimension of one attention head.";
    "sim.dtype_bytes", "dtype-bytes", "Bytes per KV element: 2 for bf16, 1 for fp8.";
    "sim.block_tokens", "block-tokens", "Tokens per KV block (512 in the Mooncake traces).";
    "sim.gpu_gib", "gpu-gib", "GPU memory for cached KV blocks, GiB per node.";
    "sim.cpu_gib", "cpu-gib", "Host memory for KV blocks, GiB per node.";
    "sim.ssd_gib", "ssd-gib", "SSD space for KV blocks, GiB per node; 0 for none.";
    "sim.h2d_gbps", "h2d-gbps", "Host-to-GPU bandwidth, GB/s.";
    "sim.d2h_gbps", "d2h-gbps", "GPU-to-host bandwidth, GB/s.";
    "sim.ssd_read_gbps", "ssd-read-gbps", "SSD read bandwidth, GB/s.";
    "sim.ssd_write_gbps", "ssd-write-gbps", "SSD write bandwidth, GB/s.";
    "sim.prefill_us_per_token", "prefill-us-per-token", "Prefill compute per uncached token, µs.";
    "sim.request_overhead_ms", "request-overhead-ms", "Fixed cost per request, ms.";
    "sim.policies", "policies", "Policies to compare (comma-separated): lru, fifo, belady, bcache.";
    "sim.prefetch_lookahead", "prefetch-lookahead", "bcache: queued requests whose blocks each window may prefetch.";
    "sim.ssd_admit_after_hits", "ssd-admit-after-hits", "bcache: heat a block needs to be written from CPU to SSD; 0 writes every block.";
    "sim.prefetch_buffer_fraction", "prefetch-buffer-fraction", "bcache: share of the GPU cache that prefetched blocks may occupy.";
    "sim.capacity_scales", "capacity-scales", "Cache sizes to sweep, as multiples of the tier sizes (comma-separated).";
    "sim.duration_s", "duration-s", "Replay requests arriving in the first N seconds; 0 for all.";
    "sim.seed", "seed", "Seed for every random choice; equal seeds give equal results.";
    "tune.objective_ttft_weight", "objective-ttft-weight", "Objective weight of TTFT p90 in seconds.";
    "tune.objective_late_weight", "objective-late-weight", "Objective weight of the fraction of demand that arrived late.";
    "tune.objective_drop_weight", "objective-drop-weight", "Objective weight of the fraction of demand dropped.";
    "tune.capacity_scale", "capacity-scale", "Cache size multiple the tuner simulates at.";
}

impl Config {
    /// Loads a YAML file over the defaults.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// Parses YAML text over the defaults; `origin` names the source in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config> {
        let value = yaml_value(text, origin)?;
        Config::from_value(value, origin)
    }

    /// Builds a configuration from a JSON-like tree (YAML already parsed),
    /// naming the key of any error.
    pub fn from_value(value: Value, origin: &str) -> Result<Config> {
        let value = if value.is_null() {
            Value::Object(Default::default())
        } else {
            value
        };
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            Error::Config {
                origin: origin.to_owned(),
                message: if key == "." {
                    e.inner().to_string()
                } else {
                    format!("{key}: {}", e.inner())
                },
            }
        })?;
        config.check(origin)?;
        Ok(config)
    }

    /// The configuration as a tree, for merging flags into it.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The configuration as YAML, every key present.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }

    /// Sets `key` (dotted, as in [`KNOBS`]) from its command-line text form
    /// in a configuration tree. Lists are comma-separated.
    pub fn set(tree: &mut Value, key: &str, text: &str) -> Result<()> {
        let fail = |message: String| Error::Config {
            origin: format!("--{}", flag_of(key).unwrap_or(key)),
            message,
        };
        let mut slot = &mut *tree;
        for part in key.split('.') {
            slot = slot
                .get_mut(part)
                .ok_or_else(|| fail(format!("unknown key {key:?}")))?;
        }
        let value = match slot {
            Value::Array(_) => Value::Array(
                text.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| scalar(s.trim()))
                    .collect(),
            ),
            Value::String(_) => Value::String(text.to_owned()),
            _ => scalar(text),
        };
        *slot = value;
        Ok(())
    }

    /// Checks value ranges that types alone cannot express.
    pub fn check(&self, origin: &str) -> Result<()> {
        let fail = |key: &str, message: &str| {
            Err(Error::Config {
                origin: origin.to_owned(),
                message: format!("{key}: {message}"),
            })
        };
        let p = &self.planner;
        let positive = [
            ("planner.window_ms", p.window_ms),
            ("planner.heat_half_life_ms", p.heat_half_life_ms),
            (
                "planner.default_layer_latency_us",
                p.default_layer_latency_us,
            ),
            ("sim.h2d_gbps", self.sim.h2d_gbps),
            ("sim.d2h_gbps", self.sim.d2h_gbps),
            ("sim.ssd_read_gbps", self.sim.ssd_read_gbps),
            ("sim.ssd_write_gbps", self.sim.ssd_write_gbps),
            ("sim.gpu_gib", self.sim.gpu_gib),
            ("tune.capacity_scale", self.tune.capacity_scale),
        ];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return fail(key, "must be a number > 0");
            }
        }
        let non_negative = [
            ("planner.alpha", p.alpha),
            ("planner.beta", p.beta),
            ("planner.op_overhead_us", p.op_overhead_us),
            ("planner.admit_after_hits", p.admit_after_hits),
            ("sim.ssd_gib", self.sim.ssd_gib),
            ("sim.cpu_gib", self.sim.cpu_gib),
            ("sim.ssd_admit_after_hits", self.sim.ssd_admit_after_hits),
            ("sim.prefill_us_per_token", self.sim.prefill_us_per_token),
            ("sim.request_overhead_ms", self.sim.request_overhead_ms),
            ("sim.duration_s", self.sim.duration_s),
            (
                "tune.objective_ttft_weight",
                self.tune.objective_ttft_weight,
            ),
            (
                "tune.objective_late_weight",
                self.tune.objective_late_weight,
            ),
            (
                "tune.objective_drop_weight",
                self.tune.objective_drop_weight,
            ),
        ];
        for (key, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return fail(key, "must be a number >= 0");
            }
        }
        if !(0.0 < p.low_watermark
            && p.low_watermark <= p.high_watermark
            && p.high_watermark <= 1.0)
        {
            return fail(
                "planner.low_watermark",
                "watermarks must satisfy 0 < low_watermark <= high_watermark <= 1",
            );
        }
        if p.max_io_bytes == 0 {
            return fail("planner.max_io_bytes", "must be > 0");
        }
        if p.min_io_bytes > p.max_io_bytes {
            return fail(
                "planner.min_io_bytes",
                "must not exceed planner.max_io_bytes",
            );
        }
        if p.heat_max_pages == 0 {
            return fail("planner.heat_max_pages", "must be > 0");
        }
        if p.max_prefetch_depth == 0 {
            return fail("planner.max_prefetch_depth", "must be > 0");
        }
        for (key, v) in [
            ("planner.lsh_bands", p.lsh_bands),
            ("planner.lsh_rows", p.lsh_rows),
            ("planner.lsh_shingle", p.lsh_shingle),
            ("planner.prefix_depth", p.prefix_depth),
        ] {
            if v == 0 {
                return fail(key, "must be > 0");
            }
        }
        let lsh = p.lsh();
        // Zeros are reported above under their own keys; what is left for
        // the LSH's own check is the size of the signature.
        if let Err(e) = lsh.validate() {
            return fail("planner.lsh_bands", &e.to_string());
        }
        if lsh.signature_len() > MAX_LSH_SIGNATURE {
            return fail(
                "planner.lsh_bands",
                &format!(
                    "planner.lsh_bands x planner.lsh_rows is {} x {}; at most {MAX_LSH_SIGNATURE} MinHash values",
                    p.lsh_bands, p.lsh_rows
                ),
            );
        }
        let s = &self.sim;
        for (key, v) in [
            ("sim.nodes", s.nodes as u64),
            ("sim.affinity_blocks", s.affinity_blocks as u64),
            ("sim.layers", u64::from(s.layers)),
            ("sim.kv_heads", u64::from(s.kv_heads)),
            ("sim.head_dim", u64::from(s.head_dim)),
            ("sim.dtype_bytes", u64::from(s.dtype_bytes)),
            ("sim.block_tokens", u64::from(s.block_tokens)),
        ] {
            if v == 0 {
                return fail(key, "must be > 0");
            }
        }
        if s.policies.is_empty() {
            return fail(
                "sim.policies",
                "list at least one of lru, fifo, belady, bcache",
            );
        }
        for name in &s.policies {
            if crate::sim::PolicyKind::parse(name).is_none() {
                return fail(
                    "sim.policies",
                    &format!("unknown policy {name:?}; expected lru, fifo, belady or bcache"),
                );
            }
        }
        if !(s.prefetch_buffer_fraction.is_finite()
            && (0.0..=1.0).contains(&s.prefetch_buffer_fraction))
        {
            return fail("sim.prefetch_buffer_fraction", "must be between 0 and 1");
        }
        if s.capacity_scales.is_empty()
            || s.capacity_scales
                .iter()
                .any(|c| !(c.is_finite() && *c > 0.0))
        {
            return fail("sim.capacity_scales", "list one or more numbers > 0");
        }
        Ok(())
    }

    /// The README table: every key, its flag, its default and what it does.
    pub fn docs_table() -> String {
        let defaults = Config::default().to_value();
        let mut out = String::from("| key | flag | default | meaning |\n|---|---|---|---|\n");
        for knob in KNOBS {
            let mut v = &defaults;
            for part in knob.key.split('.') {
                v = v.get(part).unwrap_or(&Value::Null);
            }
            let default = match v {
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.to_string().trim_matches('"').to_owned())
                    .collect::<Vec<_>>()
                    .join(","),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!(
                "| `{}` | `--{}` | `{}` | {} |\n",
                knob.key, knob.flag, default, knob.doc
            ));
        }
        out
    }
}

/// The flag of a dotted key.
pub fn flag_of(key: &str) -> Option<&'static str> {
    KNOBS.iter().find(|k| k.key == key).map(|k| k.flag)
}

fn yaml_value(text: &str, origin: &str) -> Result<Value> {
    serde_yaml_ng::from_str::<Value>(text).map_err(|e| Error::Config {
        origin: origin.to_owned(),
        message: e.to_string(),
    })
}

/// A flag's text as a JSON scalar: a number or boolean when it reads as one,
/// otherwise a string (serde then says which type the key wants).
fn scalar(text: &str) -> Value {
    serde_json::from_str::<Value>(text)
        .ok()
        .filter(|v| v.is_number() || v.is_boolean())
        .unwrap_or_else(|| Value::String(text.to_owned()))
}

fn ms_to_ns(ms: f64) -> u64 {
    (ms * 1e6).round().max(0.0) as u64
}
