//! `bstack strata`: the tiered artifact store from the command line.
//!
//! Every verb opens the store that `--config` describes (or the store served
//! at `--remote`), does its work and closes it, so what it wrote is durable
//! when it exits. Without either flag the store is a memory tier over a disk
//! tier in `./.strata` (see [`DEFAULT_CONFIG`]).

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bstack_plan::{CachePlan, Contract};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use stratacache::config::{Config, TierConfig, TierKind};
use stratacache::{Access, ArtifactKey, ExecReport, Meta, OpStatus, StorageEngine, Tier};

use crate::Outcome;
use crate::output::{Output, bytes, duration_ns, key_value_table, plural, table};

/// The store used when neither `--config` nor `--remote` is given.
pub const DEFAULT_CONFIG: &str = "\
tiers:
  - name: cpu
    kind: memory
    capacity: 256MiB
    promote: true
  - name: ssd
    kind: disk
    path: .strata
";

#[derive(Subcommand, Debug)]
pub enum StrataCommand {
    /// Store a file (or standard input) under a key.
    Put(PutArgs),
    /// Write an object's bytes to a file or standard output.
    Get(GetArgs),
    /// Counters of every tier, or where one key is stored and its metadata.
    Stat(StatArgs),
    /// List stored keys with their metadata.
    Ls(LsArgs),
    /// Delete a key from every tier.
    Rm(RmArgs),
    /// Execute a bcache CachePlan on the store: copies between tiers on
    /// parallel streams, per-operation lateness and failures, bandwidth.
    Exec(ExecArgs),
    /// Serve the store to other processes (tensor-parallel ranks, workers)
    /// over TCP or a Unix socket; clients use `kind: remote` tiers or
    /// `--remote ADDR`.
    Serve(ServeArgs),
    /// Measure the tiers (same as `bstack bench strata`).
    Bench(crate::bench_strata::StrataBenchArgs),
    /// Print the configuration keys with their defaults, or a configuration
    /// with every default filled in.
    Config(ConfigArgs),
}

/// Which store to open.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Store configuration (YAML; `bstack strata config --docs` lists the
    /// keys). Default: a 256 MiB memory tier over a disk tier in ./.strata.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Use the store served at ADDR (`bstack strata serve`) instead:
    /// HOST:PORT or unix:///PATH.
    #[arg(long, value_name = "ADDR", conflicts_with = "config")]
    remote: Option<String>,
}

impl StoreArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> Result<Config> {
        if let Some(addr) = &self.remote {
            let mut tier = TierConfig::new(TierKind::Remote);
            tier.addr = Some(addr.clone());
            return Ok(Config {
                tiers: vec![tier],
                ..Config::default()
            });
        }
        match &self.config {
            Some(path) => Config::load(path).with_context(|| format!("loading {}", path.display())),
            None => Ok(Config::from_yaml(
                DEFAULT_CONFIG,
                "the default configuration",
            )?),
        }
    }

    fn open(&self) -> Result<(Config, StorageEngine)> {
        let config = self.config()?;
        let engine = config.open().context("opening the store")?;
        Ok((config, engine))
    }
}

/// Where a put or get goes.
#[derive(Args, Debug)]
struct AccessArgs {
    /// Only this tier (by name).
    #[arg(long, value_name = "NAME", conflicts_with = "prefer")]
    tier: Option<String>,
    /// This tier first, then the chain.
    #[arg(long, value_name = "NAME")]
    prefer: Option<String>,
}

impl AccessArgs {
    fn access(&self, engine: &StorageEngine) -> Result<Access> {
        Ok(match (&self.tier, &self.prefer) {
            (Some(t), _) => Access::Exact(engine.tier_index(t)?),
            (None, Some(t)) => Access::Prefer(engine.tier_index(t)?),
            (None, None) => Access::Chain,
        })
    }
}

#[derive(Args, Debug)]
pub struct PutArgs {
    /// Key: custom/NAMESPACE/NAME, param/MODEL@REVISION/TENSOR#CHUNK or
    /// kv/MODEL[@ADAPTER]/DTYPE/tpN.rR/PREFIX_HASH_HEX/layerN.
    key: String,
    /// File to store; `-` or absent for standard input.
    file: Option<PathBuf>,
    /// Element type recorded in the metadata, e.g. bf16.
    #[arg(long, default_value = "")]
    dtype: String,
    /// Shape recorded in the metadata, comma-separated: 2,4096.
    #[arg(long, value_delimiter = ',')]
    shape: Vec<u64>,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// Key (see `bstack strata put --help`).
    key: String,
    /// Write the bytes here instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    access: AccessArgs,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct StatArgs {
    /// A key to locate; without one, every tier's counters.
    key: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only keys in this tier.
    #[arg(long, value_name = "NAME")]
    tier: Option<String>,
    /// Only keys whose text starts with this.
    #[arg(long, value_name = "TEXT", default_value = "")]
    prefix: String,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Key (see `bstack strata put --help`).
    key: String,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The CachePlan (JSON or protobuf, as `bstack bcache plan` writes it).
    plan: PathBuf,
    /// Parallel copy streams (default: the configuration's exec.streams).
    #[arg(long)]
    streams: Option<usize>,
    /// Before executing, store generated bytes for every source page the
    /// store lacks (to try a plan on an empty store).
    #[arg(long)]
    fill_sources: bool,
    /// Write the full report (every operation, the page hits for the
    /// planner) as JSON here.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to serve on: HOST:PORT (port 0 picks a free one) or
    /// unix:///PATH. Printed as `listening on ADDR` once ready.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50071")]
    listen: String,
    /// Also serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Print the keys as a Markdown table (key, default, meaning).
    #[arg(long)]
    docs: bool,
    #[command(flatten)]
    store: StoreArgs,
}

pub fn run(cmd: StrataCommand, out: &Output, quiet: bool) -> Result<Outcome> {
    match cmd {
        StrataCommand::Put(a) => put(a, out),
        StrataCommand::Get(a) => get(a, out),
        StrataCommand::Stat(a) => stat(a, out),
        StrataCommand::Ls(a) => ls(a, out),
        StrataCommand::Rm(a) => rm(a, out),
        StrataCommand::Exec(a) => exec(a, out, quiet),
        StrataCommand::Serve(a) => crate::strata_serve::serve(a.listen, a.metrics, &a.store, out),
        StrataCommand::Bench(a) => crate::bench_strata::run(a, out),
        StrataCommand::Config(a) => config(a, out),
    }
}

fn parse_key(text: &str) -> Result<ArtifactKey> {
    text.parse::<ArtifactKey>()
        .with_context(|| format!("key {text:?}"))
}

/// Closes the engine, so that everything written is durable before exit.
fn close(engine: StorageEngine) -> Result<()> {
    engine
        .close()
        .context("closing the store (dirty objects could not be flushed)")
}

fn put(a: PutArgs, out: &Output) -> Result<Outcome> {
    let key = parse_key(&a.key)?;
    let data = match a.file.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
    };
    let (_, engine) = a.store.open()?;
    let access = a.access.access(&engine)?;
    let meta = Meta {
        dtype: a.dtype,
        shape: a.shape,
        created_ns: now_ns(),
        ..Meta::default()
    };
    engine.store(&key, meta, &data, access)?;
    close(engine)?;
    if out.json {
        out.json_line(&json!({"key": key.to_string(), "bytes": data.len()}))?;
    } else {
        out.line(format!("stored {key} ({})", bytes(data.len() as u64)))?;
    }
    Ok(Outcome::Ok)
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut data = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut data)
        .context("reading standard input")?;
    Ok(data)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn get(a: GetArgs, out: &Output) -> Result<Outcome> {
    let key = parse_key(&a.key)?;
    let (_, engine) = a.store.open()?;
    let access = a.access.access(&engine)?;
    let loaded = engine.load(&key, access);
    let names = engine.tier_names().to_vec();
    close(engine)?;
    let loaded = loaded?;
    let bytes_read = loaded.object.bytes.len();
    match &a.output {
        Some(path) => {
            bstack_plan::write_atomic(path, &loaded.object.bytes)
                .with_context(|| format!("writing {}", path.display()))?;
            let tier = names.get(loaded.tier).map_or("?", String::as_str);
            if out.json {
                out.json_line(&json!({
                    "key": key.to_string(), "tier": tier, "bytes": bytes_read,
                    "meta": loaded.object.meta, "output": path,
                }))?;
            } else {
                out.line(format!(
                    "wrote {} of {key} (from tier {tier}) to {}",
                    bytes(bytes_read as u64),
                    path.display()
                ))?;
            }
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&loaded.object.bytes)?;
            stdout.flush()?;
        }
    }
    Ok(Outcome::Ok)
}

fn stat(a: StatArgs, out: &Output) -> Result<Outcome> {
    let (_, engine) = a.store.open()?;
    if let Some(text) = &a.key {
        let key = parse_key(text)?;
        let mut rows = Vec::new();
        for (i, name) in engine.tier_names().iter().enumerate() {
            let found = match engine.load(&key, Access::Exact(i)) {
                Ok(l) => Some(Ok(l.object.meta)),
                Err(e) if e.is_miss() => None,
                Err(e) => Some(Err(e.to_string())),
            };
            rows.push((name.clone(), found));
        }
        close(engine)?;
        if out.json {
            let tiers: Vec<_> = rows
                .iter()
                .map(|(name, f)| match f {
                    None => json!({"tier": name, "present": false}),
                    Some(Ok(meta)) => json!({"tier": name, "present": true, "meta": meta}),
                    Some(Err(e)) => json!({"tier": name, "present": false, "error": e}),
                })
                .collect();
            out.json_line(&json!({"key": key.to_string(), "tiers": tiers}))?;
        } else {
            let mut t = table(
                &["tier", "held", "bytes", "dtype", "shape", "checksum"],
                &[2],
            );
            for (name, f) in &rows {
                match f {
                    None => t.add_row(vec![name.as_str(), "no", "", "", "", ""]),
                    Some(Ok(m)) => t.add_row(vec![
                        name.clone(),
                        "yes".into(),
                        bytes(m.length),
                        m.dtype.clone(),
                        format!("{:?}", m.shape),
                        format!("{:016x}", m.checksum),
                    ]),
                    Some(Err(e)) => t.add_row(vec![name.as_str(), "failed", "", "", "", e]),
                };
            }
            out.line(format!("{key}\n{t}"))?;
        }
        let held = rows.iter().any(|(_, f)| matches!(f, Some(Ok(_))));
        if !held {
            bail!("{key} is not stored in any tier");
        }
        return Ok(Outcome::Ok);
    }
    let stats = engine.stats();
    close(engine)?;
    if out.json {
        out.json_line(&serde_json::to_value(&stats)?)?;
        return Ok(Outcome::Ok);
    }
    let mut t = table(
        &[
            "tier",
            "objects",
            "bytes",
            "capacity",
            "hits",
            "misses",
            "evictions",
        ],
        &[1, 2, 3, 4, 5, 6],
    );
    for (name, s) in &stats.tiers {
        t.add_row(vec![
            name.clone(),
            s.objects.to_string(),
            bytes(s.bytes),
            if s.capacity_bytes == 0 {
                "server-bounded".into()
            } else {
                bytes(s.capacity_bytes)
            },
            s.hits.to_string(),
            s.misses.to_string(),
            s.evictions.to_string(),
        ]);
    }
    out.line(t)?;
    let c = &stats.chain;
    out.line(format!(
        "dirty {}, flushed {}, flush failures {}{}",
        c.dirty,
        c.flushed,
        c.flush_failures,
        c.last_flush_error
            .as_deref()
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    ))?;
    Ok(Outcome::Ok)
}

fn ls(a: LsArgs, out: &Output) -> Result<Outcome> {
    let (_, engine) = a.store.open()?;
    let listed = match &a.tier {
        Some(name) => {
            let i = engine.tier_index(name)?;
            engine.tier(i)?.list()
        }
        None => Tier::list(&engine),
    };
    close(engine)?;
    let mut listed: Vec<_> = listed?
        .into_iter()
        .map(|(k, m)| (k.to_string(), m))
        .filter(|(k, _)| k.starts_with(&a.prefix))
        .collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    if out.json {
        for (k, m) in &listed {
            out.json_line(&json!({"key": k, "meta": m}))?;
        }
        return Ok(Outcome::Ok);
    }
    let mut t = table(&["key", "bytes", "dtype", "shape"], &[1]);
    for (k, m) in &listed {
        t.add_row(vec![
            k.clone(),
            bytes(m.length),
            m.dtype.clone(),
            if m.shape.is_empty() {
                String::new()
            } else {
                format!("{:?}", m.shape)
            },
        ]);
    }
    out.line(t)?;
    out.line(plural(listed.len() as u64, "object"))?;
    Ok(Outcome::Ok)
}

fn rm(a: RmArgs, out: &Output) -> Result<Outcome> {
    let key = parse_key(&a.key)?;
    let (_, engine) = a.store.open()?;
    let found = engine.delete(&key);
    close(engine)?;
    let found = found?;
    if out.json {
        out.json_line(&json!({"key": key.to_string(), "deleted": found}))?;
    } else if found {
        out.line(format!("deleted {key}"))?;
    } else {
        out.line(format!("{key} was not stored"))?;
    }
    Ok(Outcome::Ok)
}

fn exec(a: ExecArgs, out: &Output, quiet: bool) -> Result<Outcome> {
    let plan = read_plan(&a.plan)?;
    let (config, engine) = a.store.open()?;
    let mut options = config.exec.clone();
    if let Some(s) = a.streams {
        if s == 0 {
            bail!("--streams must be at least 1");
        }
        options.streams = s;
    }
    if a.fill_sources {
        let filled = fill_sources(&engine, &plan, &options)?;
        tracing::info!("stored {filled} generated source pages");
    }
    let bar = if quiet || out.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(plan.ops.iter().map(|o| o.length).sum());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} executing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    };
    let report =
        stratacache::execute_with(&engine, &plan, &options, &|op| bar.inc(op.planned_bytes));
    bar.finish_and_clear();
    close(engine)?;
    let report = report?;
    if let Some(path) = &a.output {
        bstack_plan::write_atomic(path, &serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if out.json {
        out.json_line(&serde_json::to_value(&report)?)?;
    } else {
        print_report(out, &report)?;
    }
    Ok(
        if report.failed_ops > 0 || !report.page_failures.is_empty() {
            Outcome::Problems
        } else {
            Outcome::Ok
        },
    )
}

/// Reads a CachePlan file, JSON or protobuf.
pub fn read_plan(path: &std::path::Path) -> Result<CachePlan> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let origin = path.display().to_string();
    let text_like = data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    Ok(if text_like {
        CachePlan::from_json(
            std::str::from_utf8(&data).with_context(|| format!("{origin}: not UTF-8"))?,
            &origin,
        )?
    } else {
        CachePlan::decode_proto(&data, &origin)?
    })
}

/// Stores deterministic bytes for every source page of `plan` that its
/// source tier lacks; returns how many.
pub fn fill_sources(
    engine: &StorageEngine,
    plan: &CachePlan,
    options: &stratacache::ExecOptions,
) -> Result<u64> {
    let mut filled = 0;
    for op in &plan.ops {
        let Ok(bstack_plan::Address::Tier { tier, .. }) = op.src.parse::<bstack_plan::Address>()
        else {
            continue;
        };
        let plan_tier = tier.to_string();
        let name = options.tier_map.get(&plan_tier).unwrap_or(&plan_tier);
        let Ok(src) = engine.tier_index(name) else {
            continue;
        };
        let pages: u64 = op.kv_refs.iter().map(|r| r.count.max(1)).sum();
        if pages == 0 || op.length % pages != 0 {
            continue;
        }
        let page_bytes = (op.length / pages) as usize;
        for r in &op.kv_refs {
            for (layer, page, key) in options.keys.ref_keys(r) {
                if engine.contains(&key, Access::Exact(src))? {
                    continue;
                }
                let data = page_pattern(layer, page, page_bytes);
                engine.store(&key, Meta::default(), &data, Access::Exact(src))?;
                filled += 1;
            }
        }
    }
    Ok(filled)
}

/// Bytes that depend on the page, so a mix-up between pages shows.
pub fn page_pattern(layer: u32, page: u64, len: usize) -> Vec<u8> {
    let seed = (u64::from(layer) << 40) ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The human form of an execution report: totals, then the slowest,
/// latest and failed operations.
pub fn print_report(out: &Output, r: &ExecReport) -> std::io::Result<()> {
    let mut t = key_value_table();
    t.add_row(vec!["plan".to_owned(), r.plan_id.clone()]);
    t.add_row(vec![
        "operations".to_owned(),
        format!(
            "{} on {}: {} done, {} late, {} failed",
            r.ops.len(),
            plural(r.streams as u64, "stream"),
            r.ops.len() as u64 - r.late_ops - r.failed_ops,
            r.late_ops,
            r.failed_ops
        ),
    ]);
    t.add_row(vec![
        "bytes".to_owned(),
        format!(
            "{} of {} planned ({} failed)",
            bytes(r.done_bytes),
            bytes(r.planned_bytes),
            bytes(r.failed_bytes)
        ),
    ]);
    t.add_row(vec![
        "time".to_owned(),
        format!(
            "{} ({}/s)",
            duration_ns(r.elapsed_ns),
            bytes(r.bandwidth_bps as u64)
        ),
    ]);
    if r.late_ops > 0 {
        t.add_row(vec![
            "latest".to_owned(),
            format!("late by {} at most", duration_ns(r.max_late_ns)),
        ]);
    }
    t.add_row(vec![
        "pages".to_owned(),
        format!(
            "{} admitted, {} evicted, {} hits for the planner",
            r.admitted_pages,
            r.evicted_pages,
            r.hits.len()
        ),
    ]);
    out.line(t)?;
    let problems: Vec<_> = r
        .ops
        .iter()
        .filter(|o| !matches!(o.status, OpStatus::Done))
        .take(10)
        .collect();
    if !problems.is_empty() {
        let mut t = table(&["op", "src", "dst", "bytes", "outcome"], &[0, 3]);
        for o in problems {
            t.add_row(vec![
                o.index.to_string(),
                o.src.clone(),
                o.dst.clone(),
                bytes(o.planned_bytes),
                match &o.status {
                    OpStatus::Done => "done".into(),
                    OpStatus::Late { by_ns } => format!("late by {}", duration_ns(*by_ns)),
                    OpStatus::Failed { reason } => format!("failed: {reason}"),
                },
            ]);
        }
        out.line(t)?;
    }
    for f in r.page_failures.iter().take(10) {
        out.line(format!("page failure: {f}"))?;
    }
    Ok(())
}

fn config(a: ConfigArgs, out: &Output) -> Result<Outcome> {
    if a.docs {
        out.line(stratacache::config::keys_markdown().trim_end())?;
        return Ok(Outcome::Ok);
    }
    let config = a.store.config()?;
    if out.json {
        out.json_line(&serde_json::to_value(&config)?)?;
    } else {
        out.line(config.to_yaml().trim_end())?;
    }
    Ok(Outcome::Ok)
}
