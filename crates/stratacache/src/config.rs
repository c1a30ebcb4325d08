//! One YAML file configures a store: its tiers, their links, the flusher
//! and the plan executor.
//!
//! ```yaml
//! tiers:                   # fastest first
//!   - name: cpu
//!     kind: memory
//!     capacity: 4GiB
//!     mode: write_back     # dirty here, flushed to the next tier
//!   - name: ssd
//!     kind: disk
//!     path: /var/lib/strata
//!     capacity: 200GiB
//!     promote: false
//! flush:
//!   retry_max_ms: 5000
//! exec:
//!   streams: 4
//!   tier_map: { gpu: cpu }
//! ```
//!
//! Every key but a tier's `kind` (and the `path`, `url` or `addr` its kind
//! needs) is optional; [`KEYS`] lists each with its default and meaning (the
//! README's table and `bstack strata config --docs` print it). An unknown
//! key, or a key that does not apply to the tier's kind, is an error naming
//! it (`tiers[1].url: not a key of a disk tier`). Sizes are bytes, as a
//! number or with a unit: `512MiB`, `4GiB`, `1.5TB`. Relative paths are
//! relative to the configuration file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chain::{FlushPolicy, Link, LinkMode, TierChain};
use crate::disk::{DiskOptions, DiskTier};
use crate::engine::StorageEngine;
use crate::exec::ExecOptions;
use crate::memory::MemoryTier;
use crate::mmap::{MmapOptions, MmapTier};
use crate::redis::{RedisOptions, RedisTier};
use crate::remote::{RemoteOptions, RemoteTier};
use crate::tier::Tier;
use crate::{Error, Result};

/// A configuration key, its default and what it does.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Dotted key; `tiers[].x` for a key of each tier.
    pub key: &'static str,
    /// The default, as YAML.
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

/// Every configuration key, in file order.
pub const KEYS: &[Key] = &[
    Key {
        key: "tiers",
        default: "one memory tier",
        doc: "The tiers, fastest first (at least one).",
    },
    Key {
        key: "tiers[].kind",
        default: "(required)",
        doc: "memory, mmap, disk, redis or remote (a `bstack strata serve` store).",
    },
    Key {
        key: "tiers[].name",
        default: "the kind",
        doc: "Name used by `--tier`, `exact` / `prefer` access and the executor's tier_map; unique.",
    },
    Key {
        key: "tiers[].mode",
        default: "write_through",
        doc: "How writes reach the next tier: write_through (before put returns) or write_back (dirty and pinned here, flushed later; needs a tier that can pin: memory, mmap, disk).",
    },
    Key {
        key: "tiers[].promote",
        default: "false",
        doc: "Copy hits found in lower tiers into this one.",
    },
    Key {
        key: "tiers[].capacity",
        default: "memory 1GiB, disk 10GiB, redis 0",
        doc: "Bytes of payload the tier may hold (memory, disk); for redis only reported (0: bounded by the server's maxmemory).",
    },
    Key {
        key: "tiers[].shards",
        default: "16",
        doc: "memory: lock shards; an object must fit one shard's share of the capacity.",
    },
    Key {
        key: "tiers[].path",
        default: "(required for mmap, disk)",
        doc: "mmap: the region file or /dev/dax device; disk: the directory of segment files.",
    },
    Key {
        key: "tiers[].size",
        default: "1GiB",
        doc: "mmap: region size (0: the device's or existing file's size).",
    },
    Key {
        key: "tiers[].segment_size",
        default: "64MiB",
        doc: "disk: bytes per segment file before a new one starts.",
    },
    Key {
        key: "tiers[].sync_on_put",
        default: "false",
        doc: "disk: fsync every put; mmap: msync every commit in order. Durable against power loss at once (otherwise at flush), at the cost of a device flush per put.",
    },
    Key {
        key: "tiers[].repair",
        default: "false",
        doc: "mmap: on a damaged block, free everything from it to the end of the region and open (otherwise opening fails, naming the offset).",
    },
    Key {
        key: "tiers[].url",
        default: "(required for redis)",
        doc: "redis: server URL, redis://[:password@]host:port[/db].",
    },
    Key {
        key: "tiers[].prefix",
        default: "strata:",
        doc: "redis: prefix of every key the tier writes.",
    },
    Key {
        key: "tiers[].addr",
        default: "(required for remote)",
        doc: "remote: the store server, host:port or unix:///path.",
    },
    Key {
        key: "tiers[].connections",
        default: "4",
        doc: "redis, remote: connections kept open.",
    },
    Key {
        key: "tiers[].timeout_ms",
        default: "redis 5000, remote 10000",
        doc: "redis, remote: I/O timeout per call, ms.",
    },
    Key {
        key: "flush.threads",
        default: "1",
        doc: "Flusher threads (when a tier is write_back).",
    },
    Key {
        key: "flush.retry_initial_ms",
        default: "10",
        doc: "Wait before retrying a failed flush, ms; doubles per failure.",
    },
    Key {
        key: "flush.retry_max_ms",
        default: "5000",
        doc: "Longest wait between retries of a failed flush, ms.",
    },
    Key {
        key: "flush.idle_poll_ms",
        default: "50",
        doc: "How often an idle flusher looks for retries that came due, ms.",
    },
    Key {
        key: "exec.streams",
        default: "4",
        doc: "Parallel copy streams of the plan executor.",
    },
    Key {
        key: "exec.node",
        default: "\"\"",
        doc: "The node whose tiers this store holds; plan operations on other nodes fail. Empty: any.",
    },
    Key {
        key: "exec.tier_map",
        default: "{}",
        doc: "Plan tier (gpu, cpu, dax, ssd, remote, numbered: gpu1) to store tier name; unmapped plan tiers use the store tier of the same name.",
    },
    Key {
        key: "exec.keys.model",
        default: "default",
        doc: "Model name in the keys of plan pages.",
    },
    Key {
        key: "exec.keys.kv_dtype",
        default: "bf16",
        doc: "KV dtype in the keys of plan pages.",
    },
    Key {
        key: "exec.keys.tp_size",
        default: "1",
        doc: "Tensor-parallel size in the keys of plan pages.",
    },
    Key {
        key: "exec.keys.rank",
        default: "0",
        doc: "Tensor-parallel rank in the keys of plan pages.",
    },
];

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The tiers, fastest first.
    pub tiers: Vec<TierConfig>,
    /// The flusher.
    pub flush: FlushConfig,
    /// The plan executor.
    pub exec: ExecOptions,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            tiers: vec![TierConfig::new(TierKind::Memory)],
            flush: FlushConfig::default(),
            exec: ExecOptions::default(),
        }
    }
}

/// The kinds of tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierKind {
    /// [`MemoryTier`].
    Memory,
    /// [`MmapTier`].
    Mmap,
    /// [`DiskTier`].
    Disk,
    /// [`RedisTier`].
    Redis,
    /// [`RemoteTier`]: a store served by `bstack strata serve`.
    Remote,
}

impl TierKind {
    /// The kind's name in the file.
    pub fn name(self) -> &'static str {
        match self {
            TierKind::Memory => "memory",
            TierKind::Mmap => "mmap",
            TierKind::Disk => "disk",
            TierKind::Redis => "redis",
            TierKind::Remote => "remote",
        }
    }

    /// The tier-specific keys this kind takes.
    fn keys(self) -> &'static [&'static str] {
        match self {
            TierKind::Memory => &["capacity", "shards"],
            TierKind::Mmap => &["path", "size", "sync_on_put", "repair"],
            TierKind::Disk => &["path", "capacity", "segment_size", "sync_on_put"],
            TierKind::Redis => &["url", "prefix", "connections", "timeout_ms", "capacity"],
            TierKind::Remote => &["addr", "connections", "timeout_ms"],
        }
    }
}

/// One tier. Keys that do not apply to the kind must be absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// The kind.
    pub kind: TierKind,
    /// Name; the kind's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How writes reach the next tier.
    #[serde(default = "write_through")]
    pub mode: LinkMode,
    /// Whether hits below are copied up into this tier.
    #[serde(default)]
    pub promote: bool,
    /// Bytes the tier may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<ByteSize>,
    /// Memory: lock shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
    /// Mmap: region file or device; disk: directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Mmap: region size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Disk: bytes per segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_size: Option<ByteSize>,
    /// Disk: fsync every put.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_on_put: Option<bool>,
    /// Mmap: free a damaged region's tail instead of failing to open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<bool>,
    /// Redis: server URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Redis: key prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Remote: server address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Redis, remote: connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// Redis, remote: I/O timeout, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

fn write_through() -> LinkMode {
    LinkMode::WriteThrough
}

impl TierConfig {
    /// A tier of `kind` with every key at its default.
    pub fn new(kind: TierKind) -> TierConfig {
        TierConfig {
            kind,
            name: None,
            mode: LinkMode::WriteThrough,
            promote: false,
            capacity: None,
            shards: None,
            path: None,
            size: None,
            segment_size: None,
            sync_on_put: None,
            repair: None,
            url: None,
            prefix: None,
            addr: None,
            connections: None,
            timeout_ms: None,
        }
    }

    /// The tier's name: `name`, or the kind's.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.kind.name())
    }

    /// The tier-specific keys that are set.
    fn set_keys(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut mark = |on: bool, k| {
            if on {
                out.push(k)
            }
        };
        mark(self.capacity.is_some(), "capacity");
        mark(self.shards.is_some(), "shards");
        mark(self.path.is_some(), "path");
        mark(self.size.is_some(), "size");
        mark(self.segment_size.is_some(), "segment_size");
        mark(self.sync_on_put.is_some(), "sync_on_put");
        mark(self.repair.is_some(), "repair");
        mark(self.url.is_some(), "url");
        mark(self.prefix.is_some(), "prefix");
        mark(self.addr.is_some(), "addr");
        mark(self.connections.is_some(), "connections");
        mark(self.timeout_ms.is_some(), "timeout_ms");
        out
    }

    /// Opens the tier this entry describes (`i` is its position, for
    /// error messages).
    pub fn open(&self, i: usize) -> Result<Arc<dyn Tier>> {
        let field = |k: &str| format!("tiers[{i}].{k}");
        let required = |k: &'static str, v: Option<&str>| -> Result<String> {
            v.map(str::to_owned).ok_or_else(|| Error::Config {
                field: field(k),
                message: format!("a {} tier needs `{k}`", self.kind.name()),
            })
        };
        let timeout = |default_ms| Duration::from_millis(self.timeout_ms.unwrap_or(default_ms));
        Ok(match self.kind {
            TierKind::Memory => {
                let shards = self.shards.unwrap_or(16);
                if shards == 0 {
                    return Err(Error::Config {
                        field: field("shards"),
                        message: "must be at least 1".into(),
                    });
                }
                Arc::new(MemoryTier::new(
                    self.capacity.map_or(1 << 30, |c| c.0),
                    shards,
                ))
            }
            TierKind::Mmap => {
                let path = self.path.clone().ok_or_else(|| Error::Config {
                    field: field("path"),
                    message: "an mmap tier needs `path` (a file or /dev/dax device)".into(),
                })?;
                Arc::new(MmapTier::open(
                    path,
                    MmapOptions {
                        size_bytes: self.size.map_or(1 << 30, |s| s.0),
                        sync_writes: self.sync_on_put.unwrap_or(false),
                        repair: self.repair.unwrap_or(false),
                        ..MmapOptions::default()
                    },
                )?)
            }
            TierKind::Disk => {
                let path = self.path.clone().ok_or_else(|| Error::Config {
                    field: field("path"),
                    message: "a disk tier needs `path` (a directory)".into(),
                })?;
                let defaults = DiskOptions::default();
                Arc::new(DiskTier::open(
                    path,
                    DiskOptions {
                        capacity_bytes: self.capacity.map_or(10 << 30, |c| c.0),
                        segment_bytes: self.segment_size.map_or(defaults.segment_bytes, |s| s.0),
                        sync_on_put: self.sync_on_put.unwrap_or(defaults.sync_on_put),
                    },
                )?)
            }
            TierKind::Redis => {
                let url = required("url", self.url.as_deref())?;
                let defaults = RedisOptions::default();
                Arc::new(RedisTier::connect(
                    &url,
                    RedisOptions {
                        prefix: self.prefix.clone().unwrap_or(defaults.prefix),
                        connections: self.connections.unwrap_or(defaults.connections),
                        timeout: timeout(5000),
                        capacity_bytes: self.capacity.map_or(0, |c| c.0),
                    },
                )?)
            }
            TierKind::Remote => {
                let addr = required("addr", self.addr.as_deref())?;
                let defaults = RemoteOptions::default();
                Arc::new(RemoteTier::connect(
                    &addr,
                    RemoteOptions {
                        connections: self.connections.unwrap_or(defaults.connections),
                        timeout: timeout(10_000),
                        ..defaults
                    },
                )?)
            }
        })
    }
}

/// The flusher's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Flusher threads.
    pub threads: usize,
    /// First retry wait, ms.
    pub retry_initial_ms: u64,
    /// Longest retry wait, ms.
    pub retry_max_ms: u64,
    /// Idle poll, ms.
    pub idle_poll_ms: u64,
}

impl Default for FlushConfig {
    fn default() -> FlushConfig {
        FlushConfig {
            threads: 1,
            retry_initial_ms: 10,
            retry_max_ms: 5000,
            idle_poll_ms: 50,
        }
    }
}

impl FlushConfig {
    /// As the chain takes it.
    pub fn policy(&self) -> FlushPolicy {
        FlushPolicy {
            threads: self.threads.max(1),
            retry_initial: Duration::from_millis(self.retry_initial_ms.max(1)),
            retry_max: Duration::from_millis(self.retry_max_ms.max(self.retry_initial_ms).max(1)),
            idle_poll: Duration::from_millis(self.idle_poll_ms.max(1)),
        }
    }
}

/// A byte count, written as a number or with a unit (`64MiB`, `1.5GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<ByteSize, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = (t[..split].trim(), t[split..].trim());
        let factor: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "m" | "mb" => 1_000_000,
            "g" | "gb" => 1_000_000_000,
            "t" | "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
                ));
            }
        };
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as 4096, 64MiB or 1.5GB"))?;
        let bytes = value * factor as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Config {
    /// Loads a YAML file; relative tier paths become relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            tier: "config".into(),
            op: "reading",
            path: path.display().to_string(),
            source: e,
        })?;
        let mut config = Config::from_yaml(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        for t in &mut config.tiers {
            if let Some(p) = &t.path
                && p.is_relative()
            {
                t.path = Some(base.join(p));
            }
        }
        Ok(config)
    }

    /// Parses YAML text; `origin` names the source in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config> {
        let value: Value = serde_yaml_ng::from_str(text).map_err(|e| Error::Config {
            field: origin.to_owned(),
            message: e.to_string(),
        })?;
        let value = if value.is_null() {
            Value::Object(Default::default())
        } else {
            value
        };
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            Error::Config {
                field: if path == "." {
                    origin.to_owned()
                } else {
                    format!("{origin}: {path}")
                },
                message: e.inner().to_string(),
            }
        })?;
        config.check(origin)?;
        Ok(config)
    }

    /// Checks what the types alone do not: at least one tier, keys that
    /// fit each tier's kind, unique names, a sane executor.
    pub fn check(&self, origin: &str) -> Result<()> {
        let fail = |field: String, message: String| Error::Config {
            field: format!("{origin}: {field}"),
            message,
        };
        if self.tiers.is_empty() {
            return Err(fail("tiers".into(), "at least one tier is needed".into()));
        }
        for (i, t) in self.tiers.iter().enumerate() {
            for k in t.set_keys() {
                if !t.kind.keys().contains(&k) {
                    return Err(fail(
                        format!("tiers[{i}].{k}"),
                        format!(
                            "not a key of a {} tier (its keys: {})",
                            t.kind.name(),
                            t.kind.keys().join(", ")
                        ),
                    ));
                }
            }
            if t.mode == LinkMode::WriteBack {
                if i + 1 == self.tiers.len() {
                    return Err(fail(
                        format!("tiers[{i}].mode"),
                        "the last tier has no tier below to write back to; use write_through"
                            .into(),
                    ));
                }
                if t.kind == TierKind::Redis {
                    return Err(fail(
                        format!("tiers[{i}].mode"),
                        "a redis tier cannot pin objects, so a dirty object could be evicted \
                         before its flush; use write_through"
                            .into(),
                    ));
                }
            }
            if let Some(shards) = t.shards {
                let capacity = t.capacity.map_or(1 << 30, |c| c.0);
                if shards == 0 || shards > 65_536 || shards as u64 > capacity {
                    return Err(fail(
                        format!("tiers[{i}].shards"),
                        format!(
                            "{shards} shards: must be 1 to 65536 and at most the capacity in \
                             bytes (each shard holds an equal share)"
                        ),
                    ));
                }
            }
            if self.tiers[..i].iter().any(|o| o.name() == t.name()) {
                return Err(fail(
                    format!("tiers[{i}].name"),
                    format!("{:?} names two tiers; give each its own `name`", t.name()),
                ));
            }
        }
        if !(1..=1024).contains(&self.exec.streams) {
            return Err(fail("exec.streams".into(), "must be 1 to 1024".into()));
        }
        let keys = &self.exec.keys;
        if keys.tp_size == 0 || keys.rank >= keys.tp_size {
            return Err(fail(
                "exec.keys.rank".into(),
                format!(
                    "rank {} must be below tp_size {} (and tp_size at least 1)",
                    keys.rank, keys.tp_size
                ),
            ));
        }
        for (plan_tier, name) in &self.exec.tier_map {
            if !self.tiers.iter().any(|t| t.name() == name) {
                return Err(fail(
                    format!("exec.tier_map.{plan_tier}"),
                    format!(
                        "no tier is called {name:?}; the tiers are {}",
                        self.tier_names().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The tiers' names, in order.
    pub fn tier_names(&self) -> Vec<String> {
        self.tiers.iter().map(|t| t.name().to_owned()).collect()
    }

    /// Opens every tier and builds the engine.
    pub fn open(&self) -> Result<StorageEngine> {
        self.check("config")?;
        let mut links = Vec::with_capacity(self.tiers.len());
        for (i, t) in self.tiers.iter().enumerate() {
            links.push(Link {
                tier: t.open(i)?,
                mode: t.mode,
                promote: t.promote,
            });
        }
        let chain = TierChain::new(links, self.flush.policy())?;
        StorageEngine::new(chain, self.tier_names())
    }

    /// The configuration as YAML, defaults included.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }
}

/// The Markdown table of [`KEYS`].
pub fn keys_markdown() -> String {
    let mut out = String::from("| key | default | meaning |\n|---|---|---|\n");
    for k in KEYS {
        out.push_str(&format!("| `{}` | `{}` | {} |\n", k.key, k.default, k.doc));
    }
    out
}
