//! `bstack bench bwrt`: the wave runtime through its C ABI.
//!
//! - `bwrt.round_trip`: submit an empty wave, the worker signals its
//!   semaphore, the wait returns; median and p99 of single round trips.
//!   Baseline: a ping-pong between two threads over one atomic, the floor
//!   for any hand-off from one core to another.
//! - `bwrt.ring_throughput`: two threads submit empty waves as fast as the
//!   ring takes them; waves per second until the last has completed.
//! - `bwrt.gemm_f32_1024`: C = A · B, 1024 x 1024 x 1024 in f32, cut into
//!   one row panel per worker; GFLOP/s against numpy's matmul in the same
//!   run (when numpy is installed), once with a tile covering the panel
//!   and once with the default 64 x 64 x 256 tile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use bwrt::DType;
use serde_json::json;

use crate::bench::{Figure, emit, middle, python_baseline};
use crate::bwrt_abi::{
    Api, B, Matrix, RuntimeSettings, Wave, cores, max_relative_error, random_matrix,
};
use crate::output::Output;

/// Settings of a CPU runtime with the window always open.
fn settings(workers: u32, ring_depth: u32, tile: (u32, u32, u32)) -> RuntimeSettings {
    RuntimeSettings {
        workers,
        ring_depth,
        dtype: DType::F32,
        tile,
        swap_window: (0, u64::MAX),
        backend: bwrt::ffi::BWRT_BACKEND_CPU,
        device: 0,
    }
}

pub fn measure(runs: usize, scale: f64, out: &Output) -> Result<()> {
    let api = Api::negotiate()?;
    round_trip(&api, runs, scale, out)?;
    ring_throughput(&api, runs, scale, out)?;
    gemm(&api, runs, out)?;
    Ok(())
}

/// The p-th percentile of sorted `times`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn round_trip(api: &Api, runs: usize, scale: f64, out: &Output) -> Result<()> {
    let n = ((20_000.0 * scale) as usize).max(100) * runs.max(1);
    let rt = api.runtime(&settings(1, 1024, (64, 64, 256)))?;
    let sem = api.semaphore(0)?;
    let mut times = Vec::with_capacity(n);
    // Warm-up: wake the worker, fault in the ring.
    for v in 1..=1000u64 {
        rt.submit_empty(Some((&sem, v)), true)?;
        sem.wait(v, u64::MAX)?;
    }
    for i in 0..n as u64 {
        let v = 1001 + i;
        let start = Instant::now();
        rt.submit_empty(Some((&sem, v)), true)?;
        sem.wait(v, u64::MAX)?;
        times.push(start.elapsed());
    }
    times.sort_unstable();
    let median = middle(times.clone());
    let p99 = percentile(&times, 0.99);
    let baseline = ping_pong(n);
    emit(
        out,
        runs,
        Figure::new("bwrt.round_trip", n, 0, median)
            .against("atomic_ping_pong", baseline)
            .with(json!({
                "median_us": median.as_secs_f64() * 1e6,
                "p99_us": p99.as_secs_f64() * 1e6,
                "baseline_us": baseline.as_secs_f64() * 1e6,
                "target_us": 2.0,
                "workers": 1,
                "path": "C ABI: bwrt_submit_wave (0x0x0) -> worker -> semaphore -> bwrt_semaphore_wait",
            })),
    )?;
    Ok(())
}

/// Median round trip of a ping-pong between two threads over one atomic.
fn ping_pong(n: usize) -> Duration {
    let ball = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let (ball, stop) = (Arc::clone(&ball), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut spins = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let v = ball.load(Ordering::Acquire);
                if v % 2 == 1 {
                    ball.store(v + 1, Ordering::Release);
                } else {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(64) {
                        std::thread::yield_now();
                    }
                    std::hint::spin_loop();
                }
            }
        })
    };
    let mut times = Vec::with_capacity(n);
    let mut v = 0u64;
    for _ in 0..n + 1000 {
        let start = Instant::now();
        ball.store(v + 1, Ordering::Release);
        let mut spins = 0u32;
        while ball.load(Ordering::Acquire) != v + 2 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        v += 2;
        times.push(start.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let _ = peer.join();
    middle(times.split_off(1000))
}

fn ring_throughput(api: &Api, runs: usize, scale: f64, out: &Output) -> Result<()> {
    const SUBMITTERS: usize = 2;
    let per_thread = ((500_000.0 * scale) as usize).max(1000);
    let total = (per_thread * SUBMITTERS) as u64;
    let mut best = None;
    let mut all = Vec::new();
    for workers in [1u32, 2] {
        let mut times = Vec::new();
        for run in 0..=runs {
            let rt = api.runtime(&settings(workers, 4096, (64, 64, 256)))?;
            let start = Instant::now();
            std::thread::scope(|s| -> Result<()> {
                let handles: Vec<_> = (0..SUBMITTERS)
                    .map(|_| {
                        s.spawn(|| -> Result<()> {
                            for _ in 0..per_thread {
                                rt.submit_empty(None, true)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for h in handles {
                    h.join()
                        .map_err(|_| anyhow!("a submitting thread panicked"))??;
                }
                Ok(())
            })?;
            loop {
                let c = rt.sample()?;
                if c.waves_completed + c.waves_failed >= total {
                    if c.waves_failed > 0 {
                        return Err(anyhow!("{} empty waves failed", c.waves_failed));
                    }
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            if run > 0 {
                times.push(start.elapsed());
            }
        }
        let t = middle(times);
        let rate = total as f64 / t.as_secs_f64().max(1e-12);
        all.push(json!({"workers": workers, "waves_per_s": rate}));
        if best.is_none_or(|(_, r, _)| rate > r) {
            best = Some((workers, rate, t));
        }
    }
    let (workers, rate, t) = best.ok_or_else(|| anyhow!("no ring measurement"))?;
    emit(
        out,
        runs,
        Figure::new("bwrt.ring_throughput", total as usize, 0, t).with(json!({
            "waves_per_s": rate,
            "submitting_threads": SUBMITTERS,
            "workers": workers,
            "by_workers": all,
            "target_waves_per_s": 1_000_000,
        })),
    )?;
    Ok(())
}

/// numpy's median seconds for a 1024^3 f32 matmul, and its BLAS, or why it
/// could not run.
fn numpy(runs: usize) -> std::result::Result<(Duration, String), String> {
    const NUMPY: &str = r#"
import sys, time
import numpy as np
runs = int(sys.argv[1])
rng = np.random.default_rng(1)
a = rng.standard_normal((1024, 1024), dtype=np.float32)
b = rng.standard_normal((1024, 1024), dtype=np.float32)
a @ b
times = []
for _ in range(runs):
    t = time.perf_counter(); c = a @ b; times.append(time.perf_counter() - t)
times.sort()
try:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
except Exception:
    blas = "?"
print(times[len(times) // 2], np.__version__, blas)
"#;
    let (t, fields) = python_baseline(NUMPY, &[runs.to_string()], "pip install numpy")
        .map_err(|e| format!("numpy: {e}"))?;
    let version = fields.first().map_or("?", String::as_str);
    let blas = fields.get(1).map_or("?", String::as_str);
    Ok((t, format!("numpy {version} ({blas})")))
}

fn gemm(api: &Api, runs: usize, out: &Output) -> Result<()> {
    const N: usize = 1024;
    let workers = cores().min(N as u32);
    let panel = N.div_ceil(workers as usize);
    let b = random_matrix(DType::F32, N, N, 7);
    let panels: Vec<Matrix> = (0..workers as usize)
        .map(|i| {
            let rows = panel.min(N - i * panel);
            random_matrix(DType::F32, rows, N, 100 + i as u64)
        })
        .collect();
    let baseline = numpy(runs.max(3));
    let flops = 2.0 * (N * N * N) as f64;
    for (name, tile) in [
        ("bwrt.gemm_f32_1024", (panel as u32, N as u32, N as u32)),
        ("bwrt.gemm_f32_1024_default_tile", (64, 64, 256)),
    ] {
        let rt = api.runtime(&settings(workers, 64, tile))?;
        let mut outs: Vec<Matrix> = panels
            .iter()
            .map(|p| Matrix::zeros(DType::F32, p.rows(), N))
            .collect();
        let mut times = Vec::new();
        for run in 0..=runs {
            let mut waves: Vec<Wave<'_>> = panels
                .iter()
                .zip(outs.iter_mut())
                .map(|(a, c)| Wave {
                    a,
                    b: B::Matrix(&b),
                    c,
                })
                .collect();
            let start = Instant::now();
            rt.run_waves(&mut waves)?;
            if run > 0 {
                times.push(start.elapsed());
            }
        }
        let t = middle(times);
        // A spot check that the figure is of a correct product: one panel
        // against the naive reference.
        let error = max_relative_error(&panels[0], &b, &outs[0]);
        if error > 1e-4 {
            return Err(anyhow!(
                "{name}: the product differs from the naive reference (max relative error {error:.2e})"
            ));
        }
        let gflops = flops / t.as_secs_f64().max(1e-12) / 1e9;
        let mut figure = Figure::new(name, 1, 3 * N * N * 4, t);
        let mut extra = json!({
            "gflops": gflops, "workers": workers, "waves": workers,
            "tile": [tile.0, tile.1, tile.2], "max_relative_error": error,
        });
        match &baseline {
            Ok((bt, what)) => {
                figure = figure.against("numpy_matmul", *bt);
                extra["numpy"] = json!(what);
                extra["numpy_gflops"] = json!(flops / bt.as_secs_f64().max(1e-12) / 1e9);
                extra["fraction_of_numpy"] = json!(bt.as_secs_f64() / t.as_secs_f64().max(1e-12));
                extra["target_fraction"] = json!(0.8);
            }
            Err(why) => extra["numpy"] = json!(why),
        }
        emit(out, runs, figure.with(extra))?;
    }
    Ok(())
}
