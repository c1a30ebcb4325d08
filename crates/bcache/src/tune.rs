//! The tuner: a parallel sweep of knobs on a trace, ranked by an objective.
//!
//! Each point of the grid is a full configuration; the `bcache` policy is
//! simulated with it at `tune.capacity_scale`, points in parallel over the
//! cores. The objective (lower is better) is
//!
//! ```text
//! ttft_weight * TTFT p90 (s) + late_weight * late fraction + drop_weight * dropped fraction
//! ```
//!
//! where the late fraction is the share of cached bytes that reached the GPU
//! after their request had started, and the dropped fraction the share of
//! demanded bytes the planner dropped. Dropping work therefore costs, where
//! the previous tuner rewarded it.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::sim::{self, PolicyKind, PolicyResult};
use crate::trace::Trace;

/// One axis of the grid: a dotted key and the values to try, in their
/// command-line text form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    /// Dotted key, e.g. `planner.heat_half_life_ms`.
    pub key: String,
    /// Values to try.
    pub values: Vec<String>,
}

impl Axis {
    /// Parses `key=v1,v2,...`.
    pub fn parse(text: &str) -> Result<Axis> {
        let (key, values) = text.split_once('=').ok_or_else(|| Error::Config {
            origin: "--grid".into(),
            message: format!("{text:?} is not KEY=V1,V2,...; e.g. planner.window_ms=10,20"),
        })?;
        let values: Vec<String> = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect();
        if values.is_empty() {
            return Err(Error::Config {
                origin: "--grid".into(),
                message: format!("{key}: no values to try"),
            });
        }
        Ok(Axis {
            key: key.trim().to_owned(),
            values,
        })
    }
}

/// The grid used when none is given: the knobs that matter most for the
/// simulated policy.
pub fn default_grid() -> Vec<Axis> {
    let axis = |key: &str, values: &[&str]| Axis {
        key: key.into(),
        values: values.iter().map(|v| (*v).to_owned()).collect(),
    };
    vec![
        axis("planner.window_ms", &["10", "20", "50"]),
        axis("planner.heat_half_life_ms", &["10000", "60000", "600000"]),
        axis("sim.ssd_admit_after_hits", &["0", "1"]),
        axis("sim.prefetch_lookahead", &["4", "16"]),
    ]
}

/// One evaluated point of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The value of each axis, in grid order.
    pub values: Vec<String>,
    /// Objective; lower is better.
    pub objective: f64,
    /// TTFT p90, ms.
    pub ttft_p90_ms: f64,
    /// Hit rate (any tier).
    pub hit_rate: f64,
    /// Late fraction.
    pub late_fraction: f64,
    /// Dropped fraction.
    pub dropped_fraction: f64,
}

/// The result of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneReport {
    /// The axes, in the order of each point's values.
    pub axes: Vec<Axis>,
    /// Points, best first.
    pub points: Vec<Point>,
    /// The best configuration, complete.
    pub best: Config,
}

/// The objective of one simulated result under `config.tune`.
pub fn objective(config: &Config, r: &PolicyResult, block_bytes: u64) -> (f64, f64, f64) {
    let cached = (r.cpu_hits + r.ssd_hits).saturating_mul(block_bytes);
    let demand = r.blocks.saturating_mul(block_bytes);
    let late = if cached == 0 {
        0.0
    } else {
        r.late_bytes as f64 / cached as f64
    };
    let dropped = if demand == 0 {
        0.0
    } else {
        r.dropped_bytes as f64 / demand as f64
    };
    let t = &config.tune;
    (
        t.objective_ttft_weight * r.ttft_p90_ms / 1e3
            + t.objective_late_weight * late
            + t.objective_drop_weight * dropped,
        late,
        dropped,
    )
}

/// Runs the sweep. `progress` is called after each point with (done, total).
pub fn tune(
    trace: &Trace,
    base: &Config,
    axes: &[Axis],
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<TuneReport> {
    let mut configs = vec![(Vec::<String>::new(), base.to_value())];
    for axis in axes {
        let mut next = Vec::with_capacity(configs.len() * axis.values.len());
        for (values, tree) in &configs {
            for v in &axis.values {
                let mut tree = tree.clone();
                Config::set(&mut tree, &axis.key, v)?;
                let mut values = values.clone();
                values.push(v.clone());
                next.push((values, tree));
            }
        }
        configs = next;
    }
    let configs: Vec<(Vec<String>, Config)> = configs
        .into_iter()
        .map(|(values, tree): (Vec<String>, Value)| {
            let origin = format!("--grid point {}", values.join(","));
            Config::from_value(tree, &origin).map(|c| (values, c))
        })
        .collect::<Result<_>>()?;
    let total = configs.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let block_bytes = base.sim.block_bytes();
    let mut points: Vec<(Point, Config)> = configs
        .into_par_iter()
        .map(|(values, config)| {
            let results = sim::run(
                trace,
                &config,
                &[PolicyKind::Bcache],
                &[config.tune.capacity_scale],
            )?;
            let r = results
                .first()
                .ok_or_else(|| Error::Sim("the simulation returned no result".into()))?;
            let (objective, late, dropped) = objective(&config, r, block_bytes);
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(n, total);
            Ok((
                Point {
                    values,
                    objective,
                    ttft_p90_ms: r.ttft_p90_ms,
                    hit_rate: r.hit_rate,
                    late_fraction: late,
                    dropped_fraction: dropped,
                },
                config,
            ))
        })
        .collect::<Result<_>>()?;
    points.sort_by(|a, b| {
        a.0.objective
            .total_cmp(&b.0.objective)
            .then_with(|| a.0.values.cmp(&b.0.values))
    });
    let best = points
        .first()
        .map(|(_, c)| c.clone())
        .ok_or_else(|| Error::Sim("the grid is empty".into()))?;
    Ok(TuneReport {
        axes: axes.to_vec(),
        points: points.into_iter().map(|(p, _)| p).collect(),
        best,
    })
}
