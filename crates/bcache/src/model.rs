//! What the planner is told about one window, and how that input is checked.
//!
//! A [`WindowInput`] is a snapshot an engine (or the simulator) takes every
//! planning window: the nodes and their tiers (capacity, free bytes, link
//! bandwidth, optionally the pages each tier holds), the tenants and their
//! byte budgets, the per-layer compute latency, and the pending requests,
//! each with the KV pages it will need and by when.
//!
//! The JSON form is what `bstack bcache plan --input WINDOW.json` reads.
//! Unknown keys are errors, and [`WindowInput::check`] rejects zero sizes,
//! unknown nodes, tiers and tenants with the path of the offending field,
//! so that a typo never turns into a silently empty plan.
//!
//! ```json
//! {
//!   "now_ns": 0,
//!   "nodes": [{"name": "node0", "tiers": [
//!     {"tier": "gpu", "capacity_bytes": 1073741824, "free_bytes": 268435456, "bandwidth_bytes_per_s": 50000000000},
//!     {"tier": "cpu", "capacity_bytes": 8589934592, "free_bytes": 4294967296, "bandwidth_bytes_per_s": 25000000000}]}],
//!   "tenants": [{"name": "a", "rate_bytes_per_s": 20000000000, "burst_bytes": 1073741824}],
//!   "layer_latency_ns": [500000, 500000],
//!   "requests": [{"id": "r1", "node": "node0", "tenant": "a", "pages": [16, 17, 18],
//!     "layers": [0, 2], "src": "cpu", "dst": "gpu", "deadline_ns": 5000000, "page_bytes": 65536}]
//! }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A cache tier, fastest first. The order matters: a transfer from a slower
/// tier to a faster one is a fetch, the other way an offload.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// GPU memory (HBM), where attention reads KV pages.
    #[default]
    Gpu,
    /// Host DRAM (pinned or not).
    Cpu,
    /// CXL or persistent memory mapped as DAX.
    Dax,
    /// Local SSD.
    Ssd,
    /// A remote store reached over the network.
    Remote,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 5] = [Tier::Gpu, Tier::Cpu, Tier::Dax, Tier::Ssd, Tier::Remote];

    /// The name used in configs, addresses and reports.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Dax => "dax",
            Tier::Ssd => "ssd",
            Tier::Remote => "remote",
        }
    }

    /// The tier's position, fastest first; used as a compact key.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The contract's name for a movement from `self` to `dst`.
    pub fn transfer_kind(self, dst: Tier) -> bstack_plan::TransferKind {
        use bstack_plan::TransferKind as K;
        match (self, dst) {
            (Tier::Remote, _) | (_, Tier::Remote) => K::Net,
            (Tier::Gpu, Tier::Gpu) | (Tier::Cpu, Tier::Cpu) => K::P2p,
            (Tier::Gpu, _) => K::D2h,
            (Tier::Cpu, Tier::Gpu) => K::H2d,
            // A storage read, into host or (GPUDirect Storage) device memory.
            (_, Tier::Gpu | Tier::Cpu) => K::Storage2h,
            // A write into storage, from host memory or another storage tier.
            _ => K::H2storage,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Tier, String> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown tier {s:?}; expected gpu, cpu, dax, ssd or remote"))
    }
}

/// One planning window's input. See the module documentation for the JSON form.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowInput {
    /// Sequence number of the window; copied into the plan.
    #[serde(default)]
    pub window_index: u64,
    /// Current time, ns, on the same clock as the deadlines.
    pub now_ns: u64,
    /// Window length, ns; 0 uses the configured `window_ms`.
    #[serde(default)]
    pub window_ns: u64,
    /// The nodes whose tiers the plan may use.
    pub nodes: Vec<Node>,
    /// Tenants with byte budgets; requests of a tenant not listed here are an
    /// error, unless the list is empty (then nobody is limited).
    #[serde(default)]
    pub tenants: Vec<Tenant>,
    /// Compute latency of each model layer, ns: the time the GPU spends on
    /// layer `l` before it needs layer `l + 1`'s pages. Empty: one layer of
    /// the configured `default_layer_latency_us`.
    #[serde(default)]
    pub layer_latency_ns: Vec<u64>,
    /// Pending requests, in any order.
    pub requests: Vec<Request>,
}

/// A node with its tiers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Node name, as in addresses (`tier://NAME/gpu`).
    pub name: String,
    /// The node's tiers; at most one of each kind.
    pub tiers: Vec<TierState>,
}

/// The state of one tier of one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierState {
    /// Which tier.
    pub tier: Tier,
    /// Total bytes the tier can hold for KV pages.
    pub capacity_bytes: u64,
    /// Bytes free now.
    pub free_bytes: u64,
    /// Bandwidth of the link that reads out of this tier, bytes per second.
    /// A fetch from this tier is limited by it.
    pub bandwidth_bytes_per_s: u64,
    /// Pages the tier holds now: the candidates for eviction. May be empty
    /// when the caller does its own eviction.
    #[serde(default)]
    pub resident: Vec<ResidentPage>,
}

impl TierState {
    /// A tier with no resident pages listed.
    pub fn new(
        tier: Tier,
        capacity_bytes: u64,
        free_bytes: u64,
        bandwidth_bytes_per_s: u64,
    ) -> TierState {
        TierState {
            tier,
            capacity_bytes,
            free_bytes,
            bandwidth_bytes_per_s,
            resident: Vec::new(),
        }
    }
}

/// A page held by a tier.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidentPage {
    /// Page (block) id.
    pub page: u64,
    /// Model layer; 0 when pages span all layers.
    #[serde(default)]
    pub layer: u32,
    /// Bytes the page occupies.
    pub bytes: u64,
    /// A pinned page is never evicted (in use by a running request, or held
    /// by the engine for its own reasons).
    #[serde(default)]
    pub pinned: bool,
    /// KV pool or tensor name, as in requests' `tensor`; empty for a single
    /// pool. The plan's evictions carry it, so an executor that keys pages
    /// by pool (stratacache does) finds the page.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tensor: String,
}

/// A tenant and its byte budget: a token bucket that refills at `rate` and
/// holds at most `burst` bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Tenant name, as in requests.
    pub name: String,
    /// Refill rate, bytes per second.
    pub rate_bytes_per_s: u64,
    /// Bucket size, bytes: the most a tenant can use in a burst.
    pub burst_bytes: u64,
    /// Weight in popularity scores (`beta * weight`); default 1.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

fn default_tenant() -> String {
    "default".into()
}

/// A pending request: the KV pages it needs, where they are and where they
/// must be, and by when.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Request id, for reports.
    pub id: String,
    /// Node that serves the request.
    pub node: String,
    /// Tenant charged for the bytes; `default` when omitted.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// KV page (block) ids in the order the request reads them.
    pub pages: Vec<u64>,
    /// Layer range `[first, end)` the pages are needed for; `[0, 1]` when
    /// pages span all layers.
    #[serde(default = "all_layers")]
    pub layers: [u32; 2],
    /// Tier the pages are in now.
    pub src: Tier,
    /// Tier the pages must reach.
    pub dst: Tier,
    /// When the first layer's pages must have arrived, ns.
    pub deadline_ns: u64,
    /// Bytes of one page of one layer.
    pub page_bytes: u64,
    /// Estimated time after arrival before the engine can use the pages
    /// (filling buffers, launching kernels), ns.
    #[serde(default)]
    pub est_fill_ns: u64,
    /// KV pool or tensor name; empty for a single pool.
    #[serde(default)]
    pub tensor: String,
    /// Prompt token ids, when the engine sends them. Used only to cluster
    /// near-duplicate prompts (banded MinHash LSH) for the report's routing
    /// hints; planning never reads them. Without tokens a request is
    /// clustered by its first pages, exactly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<u32>,
}

fn all_layers() -> [u32; 2] {
    [0, 1]
}

impl WindowInput {
    /// Reads a window input from a JSON file, with the field path of any
    /// parse error.
    pub fn read(path: &Path) -> Result<WindowInput> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let input = WindowInput::from_json(&text, &path.display().to_string())?;
        Ok(input)
    }

    /// Parses a window input from JSON text and checks it; `origin` names
    /// the source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<WindowInput> {
        let input = WindowInput::from_json_unchecked(text, origin)?;
        input.check(origin)?;
        Ok(input)
    }

    /// Parses a window input from JSON text without [`WindowInput::check`]:
    /// for a client that leaves the checking to the planner it sends to.
    pub fn from_json_unchecked(text: &str, origin: &str) -> Result<WindowInput> {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(|e| Error::Input {
            origin: origin.to_owned(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }

    /// Checks what serde cannot: positive sizes, known nodes, tiers and
    /// tenants, consistent free space. Deadlines in the past are allowed:
    /// the planner plans them as late and flags them.
    pub fn check(&self, origin: &str) -> Result<()> {
        let fail = |field: String, message: String| {
            Err(Error::Input {
                origin: origin.to_owned(),
                field,
                message,
            })
        };
        let mut nodes: HashMap<&str, &Node> = HashMap::new();
        for (n, node) in self.nodes.iter().enumerate() {
            if node.name.is_empty() {
                return fail(format!("nodes[{n}].name"), "must not be empty".into());
            }
            if nodes.insert(node.name.as_str(), node).is_some() {
                return fail(
                    format!("nodes[{n}].name"),
                    format!("node {:?} is listed twice", node.name),
                );
            }
            let mut seen = [false; Tier::ALL.len()];
            for (t, tier) in node.tiers.iter().enumerate() {
                let at = format!("nodes[{n}].tiers[{t}]");
                if std::mem::replace(&mut seen[tier.tier.index()], true) {
                    return fail(
                        format!("{at}.tier"),
                        format!(
                            "tier {} is listed twice for node {:?}",
                            tier.tier, node.name
                        ),
                    );
                }
                if tier.capacity_bytes == 0 {
                    return fail(format!("{at}.capacity_bytes"), "must be > 0".into());
                }
                if tier.bandwidth_bytes_per_s == 0 {
                    return fail(format!("{at}.bandwidth_bytes_per_s"), "must be > 0".into());
                }
                if tier.free_bytes > tier.capacity_bytes {
                    return fail(
                        format!("{at}.free_bytes"),
                        format!(
                            "{} free bytes exceed the capacity of {}",
                            tier.free_bytes, tier.capacity_bytes
                        ),
                    );
                }
                for (p, page) in tier.resident.iter().enumerate() {
                    if page.bytes == 0 {
                        return fail(format!("{at}.resident[{p}].bytes"), "must be > 0".into());
                    }
                }
            }
        }
        let mut tenants = HashMap::new();
        for (i, tenant) in self.tenants.iter().enumerate() {
            if tenants.insert(tenant.name.as_str(), i).is_some() {
                return fail(
                    format!("tenants[{i}].name"),
                    format!("tenant {:?} is listed twice", tenant.name),
                );
            }
            if !(tenant.weight.is_finite() && tenant.weight >= 0.0) {
                return fail(
                    format!("tenants[{i}].weight"),
                    "must be a finite number >= 0".into(),
                );
            }
        }
        for (l, lat) in self.layer_latency_ns.iter().enumerate() {
            if *lat == 0 {
                return fail(format!("layer_latency_ns[{l}]"), "must be > 0".into());
            }
        }
        for (r, req) in self.requests.iter().enumerate() {
            let at = format!("requests[{r}]");
            let Some(node) = nodes.get(req.node.as_str()) else {
                return fail(
                    format!("{at}.node"),
                    format!(
                        "unknown node {:?}; the input lists {}",
                        req.node,
                        list(self.nodes.iter().map(|n| n.name.as_str()))
                    ),
                );
            };
            for (field, tier) in [("src", req.src), ("dst", req.dst)] {
                if !node.tiers.iter().any(|t| t.tier == tier) {
                    return fail(
                        format!("{at}.{field}"),
                        format!(
                            "node {:?} has no {} tier; it has {}",
                            req.node,
                            tier,
                            list(node.tiers.iter().map(|t| t.tier.name()))
                        ),
                    );
                }
            }
            if req.src == req.dst {
                return fail(
                    format!("{at}.dst"),
                    format!("equals src ({}): nothing to move", req.src),
                );
            }
            if !self.tenants.is_empty() && !tenants.contains_key(req.tenant.as_str()) {
                return fail(
                    format!("{at}.tenant"),
                    format!(
                        "unknown tenant {:?}; the input lists {}",
                        req.tenant,
                        list(self.tenants.iter().map(|t| t.name.as_str()))
                    ),
                );
            }
            if req.page_bytes == 0 {
                return fail(format!("{at}.page_bytes"), "must be > 0".into());
            }
            if req.pages.is_empty() {
                return fail(format!("{at}.pages"), "must list at least one page".into());
            }
            let [first, end] = req.layers;
            if end <= first {
                return fail(
                    format!("{at}.layers"),
                    format!("[{first}, {end}) is empty; the end is exclusive"),
                );
            }
            if req
                .page_bytes
                .checked_mul(req.pages.len() as u64)
                .and_then(|b| b.checked_mul(u64::from(end - first)))
                .is_none()
            {
                return fail(
                    format!("{at}.page_bytes"),
                    "pages x layers x page_bytes overflows 64 bits".into(),
                );
            }
        }
        Ok(())
    }
}

fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(|n| format!("{n:?}")).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
