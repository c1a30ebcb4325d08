//! `bstack bench datajax`: a 10-million-row feature pipeline against pandas
//! running the same pipeline on the same rows in the same run, the cost of
//! tracing and lowering a 20-operation program, a `djit` cache hit, and
//! WaveSpec export from the shared trace.
//!
//! Both sides build the same rows from the same formulas (no file I/O on
//! either side), so the comparison is of the engines alone. pandas runs
//! through `python3` when it is installed; otherwise the figure says so and
//! has no baseline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use datajax::datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datajax::{
    DType, Engine, Frame, JoinHow, Schema, Source, col, count_rows, desc, djit, lit, mean, sum,
};
use serde_json::json;

use crate::bench::{Figure, emit, median, middle, python_baseline};
use crate::output::Output;

/// Users in the dimension table.
const USERS: i64 = 100_000;
/// Countries the users live in.
const COUNTRIES: [&str; 8] = ["de", "fr", "us", "jp", "br", "in", "gb", "es"];

/// Rows per batch of the fact table.
const BATCH: usize = 1 << 17;

/// The fact table: row i has user i*7919 % USERS, amount (i*31 % 1000) / 10,
/// channel i % 5.
fn facts(rows: usize) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    let mut start = 0usize;
    while start < rows {
        let end = (start + BATCH).min(rows);
        let idx = start as i64..end as i64;
        out.push(RecordBatch::try_from_iter([
            (
                "user",
                Arc::new(Int64Array::from_iter_values(
                    idx.clone().map(|i| i * 7919 % USERS),
                )) as ArrayRef,
            ),
            (
                "amount",
                Arc::new(Float64Array::from_iter_values(
                    idx.clone().map(|i| (i * 31 % 1000) as f64 / 10.0),
                )) as ArrayRef,
            ),
            (
                "channel",
                Arc::new(Int64Array::from_iter_values(idx.map(|i| i % 5))) as ArrayRef,
            ),
        ])?);
        start = end;
    }
    Ok(out)
}

/// The dimension table: user u lives in COUNTRIES[u % 8], tier u % 3.
fn users() -> Result<RecordBatch> {
    Ok(RecordBatch::try_from_iter([
        (
            "user",
            Arc::new(Int64Array::from_iter_values(0..USERS)) as ArrayRef,
        ),
        (
            "country",
            Arc::new(StringArray::from_iter_values(
                (0..USERS).map(|u| COUNTRIES[(u % 8) as usize]),
            )) as ArrayRef,
        ),
        (
            "tier",
            Arc::new(Int64Array::from_iter_values((0..USERS).map(|u| u % 3))) as ArrayRef,
        ),
    ])?)
}

/// The pipeline: filter, with_column, join with the dimension table,
/// group_by with three aggregations.
fn pipeline(facts: Frame, users: Frame) -> Frame {
    facts
        .filter(col("amount").gt(lit(10.0)).and(col("channel").ne(lit(4))))
        .with_column("net", col("amount") * lit(0.8))
        .join(&users, ["user"], JoinHow::Inner)
        .group_by(["country", "tier"])
        .agg([
            sum("net").alias("revenue"),
            mean("amount").alias("avg_amount"),
            count_rows().alias("orders"),
        ])
}

/// The same pipeline in pandas, printing its median seconds over `runs`.
const PANDAS: &str = r#"
import sys, time
import numpy as np, pandas as pd
rows, runs, users = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
i = np.arange(rows, dtype=np.int64)
facts = pd.DataFrame({"user": i * 7919 % users, "amount": (i * 31 % 1000) / 10.0, "channel": i % 5})
u = np.arange(users, dtype=np.int64)
countries = np.array(["de", "fr", "us", "jp", "br", "in", "gb", "es"])
dim = pd.DataFrame({"user": u, "country": countries[u % 8], "tier": u % 3})
def run():
    f = facts[(facts.amount > 10.0) & (facts.channel != 4)].copy()
    f["net"] = f.amount * 0.8
    j = f.merge(dim, on="user", how="inner")
    g = j.groupby(["country", "tier"]).agg(revenue=("net", "sum"), avg_amount=("amount", "mean"), orders=("net", "size")).reset_index()
    return len(g)
run()
times = []
for _ in range(runs):
    t = time.perf_counter(); n = run(); times.append(time.perf_counter() - t)
times.sort()
print(times[len(times) // 2], n, pd.__version__)
"#;

/// pandas' median time and version, or why it could not run.
fn pandas(rows: usize, runs: usize) -> std::result::Result<(Duration, String), String> {
    let args = [rows.to_string(), runs.to_string(), USERS.to_string()];
    let (t, fields) = python_baseline(PANDAS, &args, "pip install pandas numpy")
        .map_err(|e| format!("pandas: {e}"))?;
    // Fields: the group count, then pandas' version.
    Ok((t, fields.get(1).cloned().unwrap_or_else(|| "?".into())))
}

/// A 20-operation pipeline over `events`.
fn twenty_ops(f: Frame) -> Frame {
    f.filter(col("v").is_not_null())
        .with_column("a", col("v") * lit(2))
        .with_column("b", col("a") + col("ts"))
        .filter(col("b").gt(lit(0)))
        .rename("tag", "label")
        .with_column("c", col("price") / lit(3))
        .cast("ts", DType::Float64)
        .with_column("d", col("label").lower())
        .filter(col("d").is_not_null())
        .with_column("e", col("c").fill_null(lit(0.0)))
        .select(["user", "ts", "a", "b", "c", "e"])
        .with_column("f", col("a") - col("b"))
        .window([datajax::row_number()
            .over(["user"])
            .order_by(["ts"])
            .alias("rn")])
        .filter(col("rn").le(lit(100u64)))
        .group_by(["user"])
        .agg([sum("a"), mean("c"), count_rows()])
        .with_column("g", col("sum_a") * lit(2))
        .sort([desc("g")])
        .limit(10)
        .select(["user", "g", "count"])
}

pub fn measure(runs: usize, scale: f64, out: &Output) -> Result<()> {
    let rows = ((10_000_000.0 * scale) as usize).max(1000);
    let engine = Engine::new()?;
    let facts_batches = facts(rows)?;
    let users_batch = users()?;
    let schema_of = |b: &RecordBatch, name: &str| Schema::from_arrow(&b.schema(), name);
    let first = facts_batches
        .first()
        .ok_or_else(|| anyhow!("no fact rows"))?;
    let program = pipeline(
        Frame::input("facts", schema_of(first, "facts")?),
        Frame::input("users", schema_of(&users_batch, "users")?),
    )
    .to_ir()?;
    let inputs = HashMap::from([
        ("facts".to_owned(), Source::Batches(facts_batches.clone())),
        (
            "users".to_owned(),
            Source::Batches(vec![users_batch.clone()]),
        ),
    ]);
    let timed = |engine: &Engine| -> Result<(Duration, usize)> {
        let mut groups = 0usize;
        let mut failure = None;
        let t = median(runs, || {
            match datajax::Backend::run(engine, &program, &inputs) {
                Ok(t) => groups = t.num_rows(),
                Err(e) => failure = Some(e),
            }
        });
        match failure {
            Some(e) => Err(e.into()),
            None => Ok((t, groups)),
        }
    };
    let (ours, groups) = timed(&engine)?;
    // The same program lowered as written, to show what eager aggregation
    // (pre-aggregating the facts by user before the join) is worth.
    let (direct, _) = timed(&Engine::new()?.with_eager_aggregation(false))?;
    let mut figure = Figure::new("datajax.feature_pipeline", rows, rows * 24, ours);
    let baseline = pandas(rows, runs);
    let mut extra = json!({"groups": groups, "partitions": engine.partitions(),
                           "direct_plan_ms": direct.as_secs_f64() * 1e3,
                           "pipeline": "filter, with_column, inner join with 100k users, group_by 2 keys with 3 aggregations"});
    match &baseline {
        Ok((t, version)) => {
            figure = figure.against("pandas", *t);
            extra["pandas"] = json!(version);
            extra["speedup_vs_pandas"] = json!(t.as_secs_f64() / ours.as_secs_f64().max(1e-12));
        }
        Err(why) => extra["pandas"] = json!(why),
    }
    emit(out, runs, figure.with(extra))?;

    // Trace + lower a 20-operation program (planning only, no data).
    let ev_schema = Schema::of(&[
        ("user", DType::Utf8),
        ("ts", DType::Int64),
        ("v", DType::Int64),
        ("price", DType::Float64),
        ("tag", DType::Utf8),
    ])?;
    let ev_batch = RecordBatch::new_empty(Arc::new(ev_schema.to_arrow()));
    let ev_inputs = HashMap::from([("events".to_owned(), Source::Batches(vec![ev_batch]))]);
    let mut times = Vec::new();
    let mut ops = 0;
    for _ in 0..runs.max(1) * 20 {
        let start = Instant::now();
        let ir = twenty_ops(Frame::input("events", ev_schema.clone())).to_ir()?;
        let plan = engine.plan(&ir, &ev_inputs)?;
        times.push(start.elapsed());
        ops = ir.nodes.len() - 1;
        std::hint::black_box(plan);
    }
    emit(
        out,
        runs,
        Figure::new("datajax.trace_and_lower", ops, 0, middle(times))
            .with(json!({"operations": ops, "target_ms": 1.0})),
    )?;

    // A djit cache hit: the schema is known, the IR comes from the cache.
    let jitted = djit(twenty_ops);
    jitted.lower(std::slice::from_ref(&ev_schema))?;
    let mut times = Vec::new();
    for _ in 0..runs.max(1) * 1000 {
        let start = Instant::now();
        let ir = jitted.lower(std::slice::from_ref(&ev_schema))?;
        times.push(start.elapsed());
        std::hint::black_box(ir);
    }
    emit(
        out,
        runs,
        Figure::new("datajax.djit_cache_hit", 1, 0, middle(times))
            .with(json!({"traces": jitted.traces(), "target_us": 50.0})),
    )?;

    // WaveSpec export from the whole shared trace.
    let shared = std::path::Path::new(crate::bcache::SHARED_TRACE);
    if shared.exists() {
        let requests = datajax::wavespec::read_trace(shared, None)?;
        let options = datajax::wavespec::ExportOptions::default();
        let mut report = None;
        let mut failure = None;
        let t = median(runs.min(3), || {
            match datajax::wavespec::export(&engine, &requests, &options) {
                Ok((_, r)) => report = Some(r),
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        emit(
            out,
            runs.min(3),
            Figure::new("datajax.export_wavespec", requests.len(), 0, t)
                .with(json!({"report": report})),
        )?;
    }
    Ok(())
}
