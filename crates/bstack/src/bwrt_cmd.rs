//! `bstack bwrt`: the wave runtime from the command line, through its C ABI.
//!
//! `caps` prints what the linked library serves; `run` builds a runtime
//! from a WaveSpec (its tile, dtype and swap window), runs GEMM waves on
//! pseudo-random operands, checks the first against a naive reference and
//! prints the runtime's counters.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bstack_plan::{ContractKind, Document, Validate};
use bwrt::DType;
use bwrt::ffi::{
    BWRT_BACKEND_CPU, BWRT_BACKEND_CUDA, BWRT_FEATURE_BLOCKING_SUBMIT, BWRT_FEATURE_MBARRIER,
    BWRT_FEATURE_SWAP_QUEUE, BWRT_FEATURE_WEIGHT_SLOTS, BwrtCounters,
};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::Outcome;
use crate::bwrt_abi::{
    Api, B, Matrix, RuntimeSettings, Wave, max_relative_error, random_matrix, tolerance,
};
use crate::output::{Output, duration_ns, key_value_table};

#[derive(Subcommand, Debug)]
pub enum BwrtCommand {
    /// Print the ABI version, backend, dtypes, limits and features the
    /// linked bwrt library serves (`bwrt_get_caps`).
    Caps,
    /// Run GEMM waves C = A · B through the C ABI on a runtime built from a
    /// WaveSpec (tile, dtype, swap window); check the first wave against a
    /// naive reference and print the counters.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The WaveSpec (.json or .pb) whose (bm, bn, bk), dtype and swap
    /// window the runtime uses. Default: 64 x 64 x 256 tiles, F32, the
    /// window always open.
    #[arg(long = "wave", value_name = "WAVESPEC")]
    wave: Option<PathBuf>,
    /// Rows of A and C.
    #[arg(long, default_value_t = 512)]
    m: usize,
    /// Columns of B and C.
    #[arg(long, default_value_t = 512)]
    n: usize,
    /// Columns of A, rows of B.
    #[arg(long, default_value_t = 512)]
    k: usize,
    /// Waves to run (each C = A · B on its own A and C).
    #[arg(long, default_value_t = 4)]
    waves: usize,
    /// Worker threads (default: the core count).
    #[arg(long)]
    workers: Option<u32>,
    /// Skip checking the first wave against a naive reference (the check
    /// costs m·n·k multiply-adds in f64).
    #[arg(long)]
    no_verify: bool,
    /// Where the waves run: the CPU, or an NVIDIA GPU through cuBLAS (needs
    /// a build with `--features cuda`, the CUDA driver and libcublas;
    /// `bwrt caps` says what this build and machine have).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// GPU ordinal, with `--backend cuda`.
    #[arg(long, default_value_t = 0)]
    device: u32,
}

/// `--backend`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BackendArg {
    /// The worker threads' cores.
    Cpu,
    /// An NVIDIA GPU through cuBLAS.
    Cuda,
}

pub fn run(cmd: BwrtCommand, out: &Output) -> Result<Outcome> {
    match cmd {
        BwrtCommand::Caps => caps(out),
        BwrtCommand::Run(a) => run_waves(a, out),
    }
}

fn caps(out: &Output) -> Result<Outcome> {
    let api = Api::negotiate()?;
    let c = api.caps()?;
    let dtypes: Vec<&str> = DType::ALL
        .iter()
        .filter(|d| c.dtype_mask & (1 << (**d as u32)) != 0)
        .map(|d| d.name())
        .collect();
    let features: Vec<&str> = [
        (BWRT_FEATURE_SWAP_QUEUE, "swap-queue"),
        (BWRT_FEATURE_BLOCKING_SUBMIT, "blocking-submit"),
        (BWRT_FEATURE_MBARRIER, "mbarrier"),
        (BWRT_FEATURE_WEIGHT_SLOTS, "weight-slots"),
    ]
    .iter()
    .filter(|(bit, _)| c.features & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    let backend = if c.backend == BWRT_BACKEND_CPU {
        "cpu".to_owned()
    } else {
        format!("unknown ({})", c.backend)
    };
    let backends: Vec<&str> = [(BWRT_BACKEND_CPU, "cpu"), (BWRT_BACKEND_CUDA, "cuda")]
        .iter()
        .filter(|(code, _)| c.backends & (1 << code) != 0)
        .map(|(_, name)| *name)
        .collect();
    if out.json {
        out.json_line(&json!({
            "abi_version": c.abi_version, "backend": backend, "backends": backends,
            "cuda_devices": c.cuda_devices, "dtypes": dtypes,
            "max_workers": c.max_workers, "max_ring_depth": c.max_ring_depth,
            "max_tile": c.max_tile, "features": features,
        }))?;
    } else {
        let mut t = key_value_table();
        t.add_row(vec!["ABI version".to_owned(), c.abi_version.to_string()]);
        t.add_row(vec!["backend".to_owned(), backend]);
        let cuda = if backends.contains(&"cuda") {
            format!("{} CUDA devices visible", c.cuda_devices)
        } else {
            "this build has no CUDA backend (build with --features cuda)".to_owned()
        };
        t.add_row(vec![
            "backends".to_owned(),
            format!("{}; {cuda}", backends.join(", ")),
        ]);
        t.add_row(vec!["dtypes".to_owned(), dtypes.join(", ")]);
        t.add_row(vec!["max workers".to_owned(), c.max_workers.to_string()]);
        t.add_row(vec![
            "max ring depth".to_owned(),
            c.max_ring_depth.to_string(),
        ]);
        t.add_row(vec!["max tile side".to_owned(), c.max_tile.to_string()]);
        t.add_row(vec!["features".to_owned(), features.join(", ")]);
        out.line(t)?;
    }
    Ok(Outcome::Ok)
}

/// Reads a WaveSpec file and validates it.
pub fn read_wave_spec(path: &std::path::Path) -> Result<bwrt::WaveSpec> {
    match Document::read(path, Some(ContractKind::WaveSpec))? {
        Document::WaveSpec(spec) => {
            if let Err(problems) = spec.validate() {
                bail!("{}: {problems}", path.display());
            }
            Ok(spec)
        }
        other => bail!(
            "{}: holds a {}, not a wave_spec",
            path.display(),
            other.kind()
        ),
    }
}

/// The counters as (label, value) rows, in the order the ABI lists them.
pub fn counter_rows(c: &BwrtCounters) -> Vec<(&'static str, String)> {
    vec![
        ("waves submitted", c.waves_submitted.to_string()),
        ("waves completed", c.waves_completed.to_string()),
        ("waves failed", c.waves_failed.to_string()),
        (
            "ring occupancy",
            format!("{} of {}", c.ring_occupancy, c.ring_depth),
        ),
        ("active ops", c.active_ops.to_string()),
        ("bytes", crate::output::bytes(c.bytes)),
        ("flops", format!("{:.3} GFLOP", c.flops as f64 / 1e9)),
        ("busy", duration_ns(c.busy_ns)),
        (
            "swap-window violations",
            c.swap_window_violations.to_string(),
        ),
        ("swaps applied", c.swaps_applied.to_string()),
        ("swaps pending", c.swaps_pending.to_string()),
    ]
}

/// The counters as JSON.
pub fn counters_json(c: &BwrtCounters) -> serde_json::Value {
    json!({
        "waves_submitted": c.waves_submitted, "waves_completed": c.waves_completed,
        "waves_failed": c.waves_failed, "ring_occupancy": c.ring_occupancy,
        "ring_depth": c.ring_depth, "active_ops": c.active_ops, "bytes": c.bytes,
        "flops": c.flops, "busy_ns": c.busy_ns,
        "swap_window_violations": c.swap_window_violations,
        "swaps_applied": c.swaps_applied, "swaps_pending": c.swaps_pending,
    })
}

fn run_waves(a: RunArgs, out: &Output) -> Result<Outcome> {
    if a.waves == 0 {
        bail!("--waves must be at least 1");
    }
    let spec = match &a.wave {
        Some(path) => read_wave_spec(path)?,
        None => bwrt::default_wave_spec(),
    };
    let workers = a.workers.unwrap_or_else(crate::bwrt_abi::cores);
    let mut settings = RuntimeSettings::from_wave_spec(&spec, workers)?;
    settings.backend = match a.backend {
        BackendArg::Cpu => BWRT_BACKEND_CPU,
        BackendArg::Cuda => BWRT_BACKEND_CUDA,
    };
    settings.device = a.device;
    let api = Api::negotiate()?;
    let rt = api
        .runtime(&settings)
        .context("creating the runtime from the WaveSpec")?;
    let dtype = settings.dtype;
    let b = random_matrix(dtype, a.k, a.n, 1);
    let lhs: Vec<Matrix> = (0..a.waves)
        .map(|i| random_matrix(dtype, a.m, a.k, 100 + i as u64))
        .collect();
    let mut outs: Vec<Matrix> = (0..a.waves)
        .map(|_| Matrix::zeros(dtype, a.m, a.n))
        .collect();
    let mut waves: Vec<Wave<'_>> = lhs
        .iter()
        .zip(outs.iter_mut())
        .map(|(l, c)| Wave {
            a: l,
            b: B::Matrix(&b),
            c,
        })
        .collect();
    let started = Instant::now();
    rt.run_waves(&mut waves).context("running the GEMM waves")?;
    let elapsed = started.elapsed();
    drop(waves);
    let counters = rt.sample()?;
    let error = (!a.no_verify).then(|| max_relative_error(&lhs[0], &b, &outs[0]));
    // f32 accumulation: rounding of the output dtype dominates.
    let tolerance = tolerance(dtype);
    let flops = 2.0 * (a.m * a.n * a.k * a.waves) as f64;
    let gflops = flops / elapsed.as_secs_f64().max(1e-12) / 1e9;
    if out.json {
        out.json_line(&json!({
            "m": a.m, "n": a.n, "k": a.k, "waves": a.waves, "workers": workers,
            "dtype": dtype.name(), "tile": [spec.bm, spec.bn, spec.bk],
            "swap_window": [spec.swap_begin, spec.swap_end],
            "seconds": elapsed.as_secs_f64(), "gflops": gflops,
            "max_relative_error": error, "tolerance": tolerance,
            "counters": counters_json(&counters),
        }))?;
    } else {
        let mut t = key_value_table();
        t.add_row(vec![
            "waves".to_owned(),
            format!(
                "{} x ({} x {} x {}) {dtype}, tile {} x {} x {}, {workers} workers",
                a.waves, a.m, a.n, a.k, spec.bm, spec.bn, spec.bk
            ),
        ]);
        t.add_row(vec![
            "time".to_owned(),
            format!("{:.3} ms, {gflops:.1} GFLOP/s", elapsed.as_secs_f64() * 1e3),
        ]);
        t.add_row(vec![
            "check".to_owned(),
            match error {
                Some(e) => format!(
                    "wave 0 against a naive reference: max relative error {e:.2e} (tolerance {tolerance:.0e})"
                ),
                None => "skipped (--no-verify)".to_owned(),
            },
        ]);
        for (k, v) in counter_rows(&counters) {
            t.add_row(vec![k.to_owned(), v]);
        }
        out.line(t)?;
    }
    if let Some(e) = error
        && e > tolerance
    {
        bail!(
            "wave 0 differs from the naive reference: max relative error {e:.2e} > {tolerance:.0e}"
        );
    }
    Ok(Outcome::Ok)
}
