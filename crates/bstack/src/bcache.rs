//! `bstack bcache`: the KV-cache planner, its simulator and its tuner.
//!
//! Every configuration key is also a flag (`--window-ms 10`), built from the
//! library's knob table, so flags, YAML keys and the README table agree.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use bcache::WindowInput;
use bcache::config::{Config, KNOBS};
use bcache::planner::{Planner, PlannerState, Report};
use bcache::sim::{PolicyResult, SimReport};
use bcache::trace::Trace;
use bcache::tune::{Axis, TuneReport};
use bstack_plan::{CachePlan, Document, Format};
use clap::{ArgMatches, Args, FromArgMatches, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::Outcome;
use crate::output::{Output, bytes, key_value_table, table};

#[derive(Subcommand, Debug)]
pub enum BcacheCommand {
    /// Plan one window from a JSON window input (nodes, tiers, tenants,
    /// pending requests) and print the plan's summary; -o writes the
    /// CachePlan (.json or .pb). With --state, heat and tenant buckets carry
    /// over between calls.
    Plan(PlanArgs),

    /// Replay a trace (Mooncake JSONL, or window inputs one per line) under
    /// the lru, fifo, belady and bcache policies at several cache sizes;
    /// prints hit rates, bytes per link, TTFT and GPU stall per policy and
    /// writes sim.json, sim.csv and SVG charts to the output folder.
    Sim(SimArgs),

    /// Sweep planner and simulator knobs on a trace in parallel, rank the
    /// points by an objective that penalises TTFT, late and dropped demand,
    /// and write the best configuration as YAML and the sweep as CSV.
    Tune(TuneArgs),

    /// Print the effective configuration as YAML (defaults, then --config,
    /// then flags), or with --docs the table of every key.
    Config(ConfigArgs),

    /// Serve the planner over gRPC (bstack.bcache.v1.Planner: Plan once per
    /// window, Report page hits) until Ctrl-C or SIGTERM, with Prometheus
    /// metrics at http://ADDR/metrics when --metrics is given. Prints
    /// `listening on ADDR` once bound; heat and tenant buckets carry over
    /// between calls.
    Serve(crate::bcache_serve::ServeArgs),
}

/// One flag per configuration key, from [`KNOBS`].
#[derive(Debug, Default)]
pub struct Knobs {
    values: Vec<(&'static str, String)>,
}

impl FromArgMatches for Knobs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let values = KNOBS
            .iter()
            .filter_map(|k| m.get_one::<String>(k.flag).map(|v| (k.key, v.clone())))
            .collect();
        Ok(Knobs { values })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Knobs::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for Knobs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        KNOBS.iter().fold(cmd, |cmd, k| {
            cmd.arg(
                clap::Arg::new(k.flag)
                    .long(k.flag)
                    .value_name("VALUE")
                    .help(k.doc)
                    .help_heading("Configuration (each overrides its key in --config)"),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Knobs::augment_args(cmd)
    }
}

/// `--config FILE` plus every knob flag.
#[derive(Args, Debug)]
pub struct ConfigSource {
    /// YAML configuration file (sections planner, sim, tune); every key is
    /// optional, unknown keys are errors. See `bstack bcache config --docs`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    knobs: Knobs,
}

impl ConfigSource {
    /// Defaults, then the file, then the flags.
    pub fn load(&self) -> Result<Config> {
        let base = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if self.knobs.values.is_empty() {
            return Ok(base);
        }
        let mut tree = base.to_value();
        for (key, value) in &self.knobs.values {
            Config::set(&mut tree, key, value)?;
        }
        Ok(Config::from_value(tree, "flags")?)
    }
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The window input, JSON (see the bcache crate's `model` docs).
    #[arg(long, value_name = "WINDOW.json")]
    input: PathBuf,
    /// Planner state to resume from and save back (created if absent).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Write the CachePlan here (.json, or .pb for protobuf).
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Also print every deferred and dropped item and every route hint.
    #[arg(long)]
    all: bool,
    /// Plan on the service at ADDR (`bstack bcache serve`) instead of here:
    /// the service checks the input and plans with its own configuration
    /// and state, so --config and the knob flags do not apply.
    #[arg(long, value_name = "ADDR", conflicts_with = "state")]
    remote: Option<String>,
    #[command(flatten)]
    config: ConfigSource,
}

/// Where the shared trace lives relative to the repository root.
pub const SHARED_TRACE: &str = "../shared/data/traces/conversation_trace.jsonl";

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Trace file: Mooncake JSONL (timestamp, input_length, output_length,
    /// hash_ids) or window inputs, one per line.
    #[arg(long, value_name = "FILE", default_value = SHARED_TRACE)]
    trace: PathBuf,
    /// Leave out malformed trace lines (and count them) instead of stopping
    /// at the first one.
    #[arg(long)]
    skip_bad: bool,
    /// Folder for sim.json, sim.csv, hit_rate_vs_capacity.svg, ttft_cdf.svg.
    #[arg(short, long, value_name = "DIR", default_value = "out/bcache-sim")]
    output: PathBuf,
    #[command(flatten)]
    config: ConfigSource,
}

#[derive(Args, Debug)]
pub struct TuneArgs {
    /// Trace file, as for `sim`.
    #[arg(long, value_name = "FILE", default_value = SHARED_TRACE)]
    trace: PathBuf,
    /// Leave out malformed trace lines.
    #[arg(long)]
    skip_bad: bool,
    /// An axis of the grid, KEY=V1,V2,... (repeatable), e.g.
    /// --grid planner.window_ms=10,20. Without any, a built-in grid of
    /// window length, heat half-life, admission threshold and lookahead.
    #[arg(long, value_name = "KEY=V1,V2")]
    grid: Vec<String>,
    /// Folder for best.yaml and sweep.csv.
    #[arg(short, long, value_name = "DIR", default_value = "out/bcache-tune")]
    output: PathBuf,
    /// Rows of the sweep to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    #[command(flatten)]
    config: ConfigSource,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Print the table of every key, its flag, default and meaning (Markdown).
    #[arg(long)]
    docs: bool,
    #[command(flatten)]
    config: ConfigSource,
}

pub fn run(cmd: BcacheCommand, out: &Output, quiet: bool) -> Result<Outcome> {
    match cmd {
        BcacheCommand::Plan(args) => plan(args, out),
        BcacheCommand::Sim(args) => sim(args, out, quiet),
        BcacheCommand::Tune(args) => tune(args, out, quiet),
        BcacheCommand::Serve(args) => crate::bcache_serve::serve(args, out),
        BcacheCommand::Config(args) => {
            if args.docs {
                out.line(Config::docs_table().trim_end())?;
            } else {
                out.line(args.config.load()?.to_yaml().trim_end())?;
            }
            Ok(Outcome::Ok)
        }
    }
}

fn plan(args: PlanArgs, out: &Output) -> Result<Outcome> {
    let origin = args.input.display().to_string();
    let text =
        std::fs::read_to_string(&args.input).map_err(|e| bcache::Error::io(&args.input, e))?;
    // A remote planner checks the input itself and says what is wrong.
    let window = WindowInput::from_json_unchecked(&text, &origin)?;
    let (cache_plan, report, planner) = match &args.remote {
        Some(remote) => {
            let (cache_plan, report) = crate::bcache_serve::plan_remote(remote, &window)?;
            (cache_plan, report, None)
        }
        None => {
            window.check(&origin)?;
            let (cache_plan, report, planner) = plan_local(&args, &window)?;
            (cache_plan, report, Some(planner))
        }
    };
    let doc = Document::CachePlan(cache_plan);
    let problems = doc.problems();
    if !problems.is_empty() {
        anyhow::bail!(
            "the planner produced an invalid plan (a bug): {}",
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if let Some(path) = &args.output {
        doc.write(path, Format::detect(path, b"{"))?;
    }
    if let (Some(path), Some(planner)) = (&args.state, &planner) {
        let text = serde_json::to_vec(&planner.state())?;
        bstack_plan::write_atomic(path, &text)?;
    }
    let Document::CachePlan(cache_plan) = doc else {
        unreachable!("built above")
    };
    if out.json {
        out.json_line(&json!({"plan": serde_json::to_value(&cache_plan)?, "report": report}))?;
        return Ok(Outcome::Ok);
    }
    print_report(out, &report, &window, args.all)?;
    let mut t = table(
        &[
            "#",
            "kind",
            "src",
            "dst",
            "bytes",
            "pages",
            "deadline ms",
            "note",
        ],
        &[0, 4, 5, 6],
    );
    for (i, op) in cache_plan.ops.iter().take(20).enumerate() {
        t.add_row(vec![
            i.to_string(),
            bstack_plan::TransferKind::try_from(op.kind)
                .map(|k| k.as_str_name().to_owned())
                .unwrap_or_default(),
            op.src.clone(),
            op.dst.clone(),
            bytes(op.length),
            op.kv_refs
                .iter()
                .map(|r| r.count.max(1))
                .sum::<u64>()
                .to_string(),
            format!("{:.3}", op.deadline_ns as f64 / 1e6),
            op.note.clone(),
        ]);
    }
    if !cache_plan.ops.is_empty() {
        out.line(t)?;
        if cache_plan.ops.len() > 20 {
            out.line(format!(
                "... and {} more operations",
                cache_plan.ops.len() - 20
            ))?;
        }
    }
    if let Some(path) = &args.output {
        out.line(format!("wrote {}", path.display()))?;
    }
    Ok(Outcome::Ok)
}

/// Plans the window here, resuming from and returning the planner of --state.
fn plan_local(args: &PlanArgs, input: &WindowInput) -> Result<(CachePlan, Report, Planner)> {
    let config = args.config.load()?;
    let state = match &args.state {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading planner state {}", path.display()))?;
            serde_json::from_str::<PlannerState>(&text).with_context(|| {
                format!(
                    "{}: not a planner state file (delete it to start afresh)",
                    path.display()
                )
            })?
        }
        _ => PlannerState::default(),
    };
    let mut planner = Planner::with_state(config.planner, state);
    let (cache_plan, report) = planner.plan(input)?;
    Ok((cache_plan, report, planner))
}

fn print_report(out: &Output, r: &Report, window: &WindowInput, all: bool) -> Result<()> {
    let mut t = key_value_table();
    t.add_row(vec!["window".into(), r.window_index.to_string()]);
    t.add_row(vec![
        "requests".into(),
        format!("{} ({} late)", r.requests, r.late_requests.len()),
    ]);
    t.add_row(vec!["demand".into(), bytes(r.demand_bytes)]);
    t.add_row(vec!["distinct after dedup".into(), bytes(r.unique_bytes)]);
    t.add_row(vec![
        "planned".into(),
        format!(
            "{} in {} ops ({} of merged gaps)",
            bytes(r.planned_bytes),
            r.ops,
            bytes(r.gap_bytes)
        ),
    ]);
    t.add_row(vec!["deferred".into(), bytes(r.deferred_bytes)]);
    t.add_row(vec!["dropped".into(), bytes(r.dropped_bytes)]);
    t.add_row(vec!["evicted".into(), bytes(r.evicted_bytes)]);
    t.add_row(vec!["written through".into(), bytes(r.admitted_bytes)]);
    if !r.prefetch_depth.is_empty() {
        t.add_row(vec![
            "prefetch depth per layer".into(),
            r.prefetch_depth
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    t.add_row(vec![
        "planning time".into(),
        format!("{:.3} ms", r.planning_ns as f64 / 1e6),
    ]);
    out.line(t)?;
    if !r.tenants.is_empty() {
        let mut t = table(
            &["tenant", "demand", "admitted", "deferred", "tokens left"],
            &[1, 2, 3, 4],
        );
        for u in &r.tenants {
            t.add_row(vec![
                u.tenant.clone(),
                bytes(u.demand_bytes),
                bytes(u.admitted_bytes),
                bytes(u.deferred_bytes),
                format!("{:.0}", u.tokens_left),
            ]);
        }
        out.line(t)?;
    }
    if !r.credit_deferred.is_empty() {
        let shown = if all {
            r.credit_deferred.len()
        } else {
            r.credit_deferred.len().min(10)
        };
        let names: Vec<String> = r.credit_deferred[..shown]
            .iter()
            .map(|&i| {
                window
                    .requests
                    .get(i as usize)
                    .map_or_else(|| format!("requests[{i}]"), |r| r.id.clone())
            })
            .collect();
        let more = r.credit_deferred.len() - shown;
        out.line(format!(
            "deferred for tenant credit: {}{}",
            names.join(", "),
            if more > 0 {
                format!(" ... and {more} more (--all lists them)")
            } else {
                String::new()
            }
        ))?;
    }
    if !r.unplanned.is_empty() {
        let shown = if all {
            r.unplanned.len()
        } else {
            r.unplanned.len().min(10)
        };
        let mut t = table(&["pages", "node", "link", "bytes", "reason"], &[3]);
        for u in &r.unplanned[..shown] {
            let verdict = if u.reason.is_drop() {
                "dropped"
            } else {
                "deferred"
            };
            t.add_row(vec![
                format!("layer {} pages {}..{}", u.layer, u.page, u.page + u.count),
                u.node.to_string(),
                format!("{}->{}", u.src, u.dst),
                bytes(u.bytes),
                format!("{verdict}: {}", u.reason.describe()),
            ]);
        }
        out.line(t)?;
        if shown < r.unplanned.len() {
            out.line(format!(
                "... and {} more (--all lists them)",
                r.unplanned.len() - shown
            ))?;
        }
    }
    if !r.route_hints.is_empty() {
        let shown = if all {
            r.route_hints.len()
        } else {
            r.route_hints.len().min(10)
        };
        out.line("route hints (prefix clusters of 2 or more requests):")?;
        let mut t = table(
            &[
                "cluster",
                "requests",
                "first request",
                "suggested node",
                "resident pages",
                "nodes now",
            ],
            &[0, 1, 4, 5],
        );
        for h in &r.route_hints[..shown] {
            let first = h.requests.first().map_or_else(String::new, |&i| {
                window
                    .requests
                    .get(i as usize)
                    .map_or_else(|| format!("requests[{i}]"), |r| r.id.clone())
            });
            t.add_row(vec![
                h.cluster.to_string(),
                h.requests.len().to_string(),
                first,
                h.node.to_string(),
                h.resident_pages.to_string(),
                h.nodes_now.to_string(),
            ]);
        }
        out.line(t)?;
        if shown < r.route_hints.len() {
            out.line(format!(
                "... and {} more (--all lists them)",
                r.route_hints.len() - shown
            ))?;
        }
    }
    Ok(())
}

fn read_trace(path: &Path, skip_bad: bool, config: &Config) -> Result<Trace> {
    let mut trace = Trace::read(path, skip_bad).with_context(|| {
        if path == Path::new(SHARED_TRACE) {
            "reading the shared trace; pass --trace FILE to use another".to_owned()
        } else {
            format!("reading trace {}", path.display())
        }
    })?;
    trace.truncate_to(config.sim.duration_s);
    if trace.skipped > 0 {
        tracing::warn!(
            "{}: left out {} malformed lines",
            path.display(),
            trace.skipped
        );
    }
    Ok(trace)
}

fn spinner(what: &str, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn sim(args: SimArgs, out: &Output, quiet: bool) -> Result<Outcome> {
    let config = args.config.load()?;
    let trace = read_trace(&args.trace, args.skip_bad, &config)?;
    let bar = spinner(
        &format!(
            "replaying {} requests under {} policies at {} cache sizes",
            trace.requests.len(),
            config.sim.policies.len(),
            config.sim.capacity_scales.len()
        ),
        quiet,
    );
    let report = bcache::sim::simulate(&trace, &config)?;
    bar.finish_and_clear();
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let files = write_sim_outputs(&args.output, &report)?;
    if out.json {
        let mut value = serde_json::to_value(&report)?;
        value["skipped_lines"] = json!(trace.skipped);
        value["files"] = json!(files);
        out.json_line(&value)?;
        return Ok(Outcome::Ok);
    }
    out.line(format!(
        "{} requests, {} distinct blocks of {}, {} block references; simulated in {:.2} s",
        report.requests,
        report.distinct_blocks,
        bytes(report.block_bytes),
        report.block_refs,
        report.wall_s
    ))?;
    out.line(sim_table(&report.results))?;
    for f in files {
        out.line(format!("wrote {f}"))?;
    }
    Ok(Outcome::Ok)
}

/// The comparison table: one row per (cache size, policy).
pub fn sim_table(results: &[PolicyResult]) -> comfy_table::Table {
    let mut t = table(
        &[
            "GPU GiB",
            "policy",
            "hit rate",
            "GPU hits",
            "TTFT p50 ms",
            "TTFT p90 ms",
            "TTFT p99 ms",
            "stall s",
            "H2D",
            "SSD read",
            "prefetch on time",
        ],
        &[0, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    );
    for r in results {
        t.add_row(vec![
            format!("{:.1}", r.gpu_gib),
            r.policy.name().to_owned(),
            format!("{:.1} %", r.hit_rate * 100.0),
            format!("{:.1} %", r.gpu_hit_rate * 100.0),
            format!("{:.0}", r.ttft_p50_ms),
            format!("{:.0}", r.ttft_p90_ms),
            format!("{:.0}", r.ttft_p99_ms),
            format!("{:.1}", r.stall_s),
            bytes(r.h2d_bytes),
            bytes(r.ssd_read_bytes),
            r.prefetch_timeliness
                .map_or("-".into(), |t| format!("{:.1} %", t * 100.0)),
        ]);
    }
    t
}

fn write_sim_outputs(dir: &Path, report: &SimReport) -> Result<Vec<String>> {
    use bcache::chart::{LineChart, Series, cdf_points, write_line_chart};
    let json_path = dir.join("sim.json");
    bstack_plan::write_atomic(&json_path, &serde_json::to_vec_pretty(report)?)?;
    let csv_path = dir.join("sim.csv");
    let mut csv = String::from(
        "capacity_scale,gpu_gib,policy,requests,blocks,hit_rate,gpu_hit_rate,gpu_hits,cpu_hits,ssd_hits,recomputed,\
h2d_bytes,d2h_bytes,ssd_read_bytes,ssd_write_bytes,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,ttft_mean_ms,stall_s,\
prefetched_bytes,timely_bytes,late_bytes,deferred_bytes,dropped_bytes,windows,plan_p50_us,plan_p99_us\n",
    );
    for r in &report.results {
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
        csv.push_str(&format!(
            "{},{},{},{},{},{:.6},{:.6},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},{},{},{}\n",
            r.capacity_scale, r.gpu_gib, r.policy.name(), r.requests, r.blocks, r.hit_rate, r.gpu_hit_rate,
            r.gpu_hits, r.cpu_hits, r.ssd_hits, r.recomputed, r.h2d_bytes, r.d2h_bytes, r.ssd_read_bytes,
            r.ssd_write_bytes, r.ttft_p50_ms, r.ttft_p90_ms, r.ttft_p99_ms, r.ttft_mean_ms, r.stall_s,
            r.prefetched_bytes, r.timely_bytes, r.late_bytes, r.deferred_bytes, r.dropped_bytes, r.windows,
            opt(r.plan_p50_us), opt(r.plan_p99_us),
        ));
    }
    bstack_plan::write_atomic(&csv_path, csv.as_bytes())?;
    let mut files = vec![
        json_path.display().to_string(),
        csv_path.display().to_string(),
    ];

    let mut policies: Vec<_> = report.results.iter().map(|r| r.policy).collect();
    policies.dedup();
    policies.sort_by_key(|p| p.name());
    policies.dedup();
    let scales: Vec<f64> = {
        let mut s: Vec<f64> = report.results.iter().map(|r| r.gpu_gib).collect();
        s.sort_by(f64::total_cmp);
        s.dedup();
        s
    };
    if scales.len() > 1 {
        let series: Vec<Series> = policies
            .iter()
            .map(|&p| Series {
                name: p.name().to_owned(),
                points: report
                    .results
                    .iter()
                    .filter(|r| r.policy == p)
                    .map(|r| (r.gpu_gib, r.hit_rate * 100.0))
                    .collect(),
            })
            .collect();
        let path = dir.join("hit_rate_vs_capacity.svg");
        write_line_chart(
            &path,
            &LineChart {
                title: "KV block hit rate (any tier) vs GPU cache size",
                x_label: "GPU cache per node, GiB (CPU and SSD scaled alike)",
                y_label: "hit rate, %",
                log_x: true,
                y_range: Some((0.0, 100.0)),
            },
            &series,
        )?;
        files.push(path.display().to_string());
    }
    // The TTFT CDF at the largest cache size... and the smallest, where
    // policies differ most: use the middle scale when there are three.
    let at = scales[scales.len() / 2];
    let series: Vec<Series> = report
        .results
        .iter()
        .filter(|r| r.gpu_gib == at)
        .map(|r| Series {
            name: r.policy.name().to_owned(),
            points: cdf_points(&r.ttft_ms.iter().map(|v| v / 1e3).collect::<Vec<_>>(), 400),
        })
        .collect();
    let path = dir.join("ttft_cdf.svg");
    let title = format!("TTFT CDF at {at:.1} GiB of GPU cache per node");
    write_line_chart(
        &path,
        &LineChart {
            title: &title,
            x_label: "time to first token, s",
            y_label: "fraction of requests",
            log_x: true,
            y_range: Some((0.0, 1.0)),
        },
        &series,
    )?;
    files.push(path.display().to_string());
    Ok(files)
}

fn tune(args: TuneArgs, out: &Output, quiet: bool) -> Result<Outcome> {
    let config = args.config.load()?;
    let trace = read_trace(&args.trace, args.skip_bad, &config)?;
    let axes: Vec<Axis> = if args.grid.is_empty() {
        bcache::tune::default_grid()
    } else {
        args.grid
            .iter()
            .map(|g| Axis::parse(g))
            .collect::<Result<_, _>>()?
    };
    let total: usize = axes.iter().map(|a| a.values.len()).product();
    let bar = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) =
            ProgressStyle::with_template("tuning [{bar:40}] {pos}/{len} points, {eta} left")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    };
    let report = bcache::tune::tune(&trace, &config, &axes, &|done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let best = args.output.join("best.yaml");
    bstack_plan::write_atomic(&best, report.best.to_yaml().as_bytes())?;
    let csv = args.output.join("sweep.csv");
    bstack_plan::write_atomic(&csv, sweep_csv(&report).as_bytes())?;
    if out.json {
        out.json_line(&json!({
            "axes": report.axes,
            "points": report.points,
            "best": report.best,
            "files": [best.display().to_string(), csv.display().to_string()],
        }))?;
        return Ok(Outcome::Ok);
    }
    let mut header: Vec<&str> = vec!["rank"];
    header.extend(report.axes.iter().map(|a| a.key.as_str()));
    header.extend(["objective", "TTFT p90 ms", "hit rate", "late", "dropped"]);
    let n = report.axes.len();
    let numeric: Vec<usize> = (0..header.len()).filter(|&i| i == 0 || i > n).collect();
    let mut t = table(&header, &numeric);
    for (i, p) in report.points.iter().take(args.top).enumerate() {
        let mut row = vec![(i + 1).to_string()];
        row.extend(p.values.iter().cloned());
        row.extend([
            format!("{:.4}", p.objective),
            format!("{:.0}", p.ttft_p90_ms),
            format!("{:.1} %", p.hit_rate * 100.0),
            format!("{:.2} %", p.late_fraction * 100.0),
            format!("{:.2} %", p.dropped_fraction * 100.0),
        ]);
        t.add_row(row);
    }
    out.line(t)?;
    out.line(format!("wrote {} and {}", best.display(), csv.display()))?;
    Ok(Outcome::Ok)
}

fn sweep_csv(report: &TuneReport) -> String {
    let mut csv = report
        .axes
        .iter()
        .map(|a| a.key.clone())
        .chain(
            [
                "objective",
                "ttft_p90_ms",
                "hit_rate",
                "late_fraction",
                "dropped_fraction",
            ]
            .map(String::from),
        )
        .collect::<Vec<_>>()
        .join(",");
    csv.push('\n');
    for p in &report.points {
        let mut row = p.values.clone();
        row.extend([
            format!("{:.6}", p.objective),
            format!("{:.3}", p.ttft_p90_ms),
            format!("{:.6}", p.hit_rate),
            format!("{:.6}", p.late_fraction),
            format!("{:.6}", p.dropped_fraction),
        ]);
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    csv
}
