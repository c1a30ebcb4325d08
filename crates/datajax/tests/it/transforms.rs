//! djit caches per schema and retraces on a new one; vmap is one plan with
//! the same answers as a loop over groups; scan folds with no state between
//! calls, in window or sequential form; pjit shards, runs in parallel and
//! checks its output.

use std::collections::HashMap;
use std::sync::Arc;

use datajax::datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datajax::{
    Backend, Frame, JoinHow, Scalar, Schema, col, count_rows, desc, djit, djit_n, lit, pjit, scan,
    shard, sum, vmap, when,
};

use crate::common::{canonical, engine, events, expect, rows, sorted_rows, src, users};

fn schema_of(b: &RecordBatch) -> Schema {
    Schema::from_arrow(&b.schema(), "t").unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn djit_traces_once_per_schema_and_explains_the_cached_plan() {
    let f = djit(|df| {
        df.filter(col("v").gt(lit(6)))
            .group_by(["user"])
            .agg([sum("v")])
    });
    let out = f
        .call(vec![src(events())])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        sorted_rows(&out),
        expect(r#"[{"user":"a","sum_v":60},{"user":"b","sum_v":7}]"#)
    );
    f.call(vec![src(events())])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.traces(), 1, "same schema: cached");
    // A new schema (v as float) retraces, as JAX retraces on new shapes.
    let floats = RecordBatch::try_from_iter([
        (
            "user",
            Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
        ),
        (
            "v",
            Arc::new(Float64Array::from(vec![7.5, 1.0])) as ArrayRef,
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let out = f
        .call(vec![src(floats.clone())])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows(&out), expect(r#"[{"user":"a","sum_v":7.5}]"#));
    assert_eq!(f.traces(), 2);
    let x = f
        .explain(vec![src(floats)])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.traces(), 2, "explain uses the cache");
    assert!(
        x.ir.contains("sum_v") && x.physical.contains("AggregateExec"),
        "{x}"
    );
    // A tracing error surfaces from call, naming the operation.
    let bad = djit(|df| df.select(["nope"]));
    let e = bad
        .call(vec![src(events())])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.starts_with("select:") && e.contains("nope"), "{e}");
    // Several inputs.
    let j = djit_n(2, |x| {
        x[0].join(&x[1], ["user"], JoinHow::Inner)
            .agg([count_rows()])
    });
    let out = j
        .call(vec![src(events()), src(users())])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows(&out), expect(r#"[{"count":6}]"#));
}

/// The per-group function of the vmap tests: the two largest values, their
/// share of the group's total, numbered.
fn per_user(g: Frame) -> Frame {
    let total = g.agg([sum("v").alias("total")]);
    g.filter(col("v").is_not_null())
        .sort([desc("v")])
        .limit(2)
        .join(&total, Vec::<String>::new(), JoinHow::Inner)
}

#[test]
fn vmap_is_one_plan_with_the_answers_of_a_loop_over_groups() {
    let ev = Frame::input("events", schema_of(&events()));
    // The one-group function, written without the join (vmap joins on the axis).
    let top2 = |g: Frame| {
        g.filter(col("v").is_not_null())
            .sort([desc("v")])
            .limit(2)
            .window([datajax::row_number().order_by([desc("v")]).alias("place")])
            .select(["user", "v", "place"])
    };
    let mapped = vmap(top2, "user")(&ev);
    let ir = mapped.to_ir().unwrap_or_else(|e| panic!("{e}"));
    let e = engine();
    let all = e
        .run(&ir, &HashMap::from([("events".to_owned(), src(events()))]))
        .unwrap_or_else(|e| panic!("{e}"));
    // The same function run on each group separately.
    let mut looped = Vec::new();
    for user in ["a", "b", "c"] {
        let one = Frame::input("events", schema_of(&events())).filter(col("user").eq(lit(user)));
        let f = top2(one);
        let t = e
            .run(
                &f.to_ir().unwrap_or_else(|e| panic!("{e}")),
                &HashMap::from([("events".to_owned(), src(events()))]),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        looped.extend(rows(&t));
    }
    looped.sort_by_key(canonical);
    assert_eq!(sorted_rows(&all), looped);
    assert_eq!(looped.len(), 5, "a: 2, b: 2, c: 1");
    // One plan: one input scan, no per-group copies.
    assert_eq!(
        ir.nodes
            .iter()
            .filter(|n| matches!(n.op, datajax::Op::Input { .. }))
            .count(),
        1
    );
    // An aggregation gains the axis as a key; a join on nothing within a
    // group becomes a join on the axis.
    let shares = vmap(per_user, "user")(&ev).with_column("share", col("v") / col("total"));
    let t = e
        .run(
            &shares.to_ir().unwrap_or_else(|e| panic!("{e}")),
            &HashMap::from([("events".to_owned(), src(events()))]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let mut got: Vec<(String, i64, i64)> = rows(&t)
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap_or("").to_owned(),
                r["v"].as_i64().unwrap_or(0),
                r["total"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("a".into(), 20, 60),
            ("a".into(), 30, 60),
            ("b".into(), 5, 12),
            ("b".into(), 7, 12),
            ("c".into(), 1, 1)
        ]
    );
    // Overwriting the axis is refused.
    let bad = vmap(|g: Frame| g.with_column("user", lit("x")), "user")(&ev);
    let err = bad
        .schema()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("overwrites the axis column"), "{err}");
}

fn series() -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "k",
            Arc::new(StringArray::from(vec!["x", "x", "x", "y", "y", "x"])) as ArrayRef,
        ),
        (
            "t",
            Arc::new(Int64Array::from(vec![3, 1, 2, 1, 2, 4])) as ArrayRef,
        ),
        (
            "x",
            Arc::new(Int64Array::from(vec![
                Some(5),
                Some(2),
                Some(-4),
                Some(10),
                Some(1),
                None,
            ])) as ArrayRef,
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn scan_folds_in_window_form_and_in_sequential_form_alike() {
    let s = Frame::input("s", schema_of(&series()));
    let bound = || HashMap::from([("s".to_owned(), src(series()))]);
    let e = engine();
    // Window form: running sum and max.
    let running = scan(
        |c| {
            vec![
                ("total".into(), c.get("total") + col("x")),
                ("peak".into(), c.get("peak").max_with(col("x"))),
            ]
        },
        [("total", Scalar::Int64(100)), ("peak", Scalar::Int64(0))],
        ["t"],
    )
    .by(["k"]);
    let ys = running.apply(&s);
    let ir = ys.to_ir().unwrap_or_else(|e| panic!("{e}"));
    let first = rows(&e.run(&ir, &bound()).unwrap_or_else(|e| panic!("{e}")));
    let second = rows(&e.run(&ir, &bound()).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(first, second, "every call starts from init");
    let got: Vec<(String, i64, Option<i64>, i64)> = first
        .iter()
        .map(|r| {
            (
                r["k"].as_str().unwrap_or("").to_owned(),
                r["t"].as_i64().unwrap_or(0),
                r["total"].as_i64(),
                r["peak"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    // x: t1=2, t2=-4, t3=5, t4=null; y: t1=10, t2=1. A null poisons the sum.
    assert_eq!(
        got,
        [
            ("x".into(), 1, Some(102), 2),
            ("x".into(), 2, Some(98), 2),
            ("x".into(), 3, Some(103), 5),
            ("x".into(), 4, None, 5),
            ("y".into(), 1, Some(110), 10),
            ("y".into(), 2, Some(111), 10),
        ]
    );
    // The same fold forced through the sequential form (a conditional that
    // a window cannot express, but that here reduces to the same sum).
    let seq = scan(
        |c| {
            vec![
                (
                    "total".into(),
                    when(lit(true), c.get("total") + col("x")).otherwise(c.get("total")),
                ),
                (
                    "peak".into(),
                    when(lit(true), c.get("peak").max_with(col("x"))).otherwise(c.get("peak")),
                ),
            ]
        },
        [("total", Scalar::Int64(100)), ("peak", Scalar::Int64(0))],
        ["t"],
    )
    .by(["k"]);
    let seq_rows = rows(
        &e.run(
            &seq.apply(&s).to_ir().unwrap_or_else(|e| panic!("{e}")),
            &bound(),
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(seq_rows, first, "window and sequential lowering agree");
    // A genuinely sequential fold: a counter that resets when x < 0, and a
    // carry that reads another carry.
    let resets = scan(
        |c| {
            vec![
                (
                    "streak".into(),
                    when(col("x").lt(lit(0)), lit(0)).otherwise(c.get("streak") + lit(1)),
                ),
                (
                    "best".into(),
                    c.get("best").max_with(c.get("streak") + lit(1)),
                ),
            ]
        },
        [("streak", Scalar::Int64(0)), ("best", Scalar::Int64(0))],
        ["t"],
    )
    .by(["k"]);
    let (carry, ys) = resets.run(&s);
    let got: Vec<(i64, i64)> = rows(
        &e.run(&ys.to_ir().unwrap_or_else(|e| panic!("{e}")), &bound())
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .iter()
    .map(|r| {
        (
            r["streak"].as_i64().unwrap_or(-1),
            r["best"].as_i64().unwrap_or(-1),
        )
    })
    .collect();
    // x for k=x by t: 2, -4, 5, null (null < 0 is null: otherwise branch).
    assert_eq!(got, [(1, 1), (0, 2), (1, 2), (2, 2), (1, 1), (2, 2)]);
    let finals = sorted_rows(
        &e.run(&carry.to_ir().unwrap_or_else(|e| panic!("{e}")), &bound())
            .unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(
        finals,
        expect(r#"[{"k":"x","streak":2,"best":2},{"k":"y","streak":2,"best":2}]"#)
    );
    // A scan without an order is refused while tracing.
    let unordered = scan(
        |c| vec![("n".into(), c.get("n") + lit(1))],
        [("n", Scalar::Int64(0))],
        Vec::<datajax::SortKey>::new(),
    )
    .apply(&s);
    let err = unordered
        .schema()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("needs an order"), "{err}");
}

#[test]
fn pjit_shards_inputs_and_checks_the_output_partitions() {
    let e = datajax::Engine::with_partitions(4).unwrap_or_else(|e| panic!("{e}"));
    // A per-user aggregation preserves by_key(user): no reshuffle needed.
    let per_user = pjit(
        |x| x[0].group_by(["user"]).agg([sum("v"), count_rows()]),
        vec![shard::by_key(["user"])],
        shard::by_key(["user"]),
    );
    let out = per_user
        .call(&e, vec![src(events())])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.resharded);
    assert_eq!(out.partitions.len(), 4, "the partitions ran separately");
    assert_eq!(out.num_rows(), 3);
    // Joined with a replicated table, still by user.
    let joined = pjit(
        |x| {
            x[0].join(&x[1], ["user"], JoinHow::Inner)
                .select(["user", "country", "price"])
        },
        vec![shard::by_key(["user"]), shard::replicated()],
        shard::by_key(["user"]),
    );
    let out = joined
        .call(&e, vec![src(events()), src(users())])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.num_rows(), 6);
    // An output sharded on a column the program regroups by needs a reshuffle.
    let by_country = pjit(
        |x| {
            x[0].join(&x[1], ["user"], JoinHow::Inner)
                .group_by(["country", "user"])
                .agg([count_rows()])
        },
        vec![shard::by_key(["user"]), shard::replicated()],
        shard::by_key(["country"]),
    );
    let out = by_country
        .call(&e, vec![src(events()), src(users())])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.resharded);
    datajax::transform::check_sharding(&out.schema, &out.partitions, &shard::by_key(["country"]))
        .unwrap_or_else(|e| panic!("{e}"));
    // The check itself catches a key split across partitions.
    let b = events();
    let split = vec![vec![b.slice(0, 3)], vec![b.slice(3, 4)]];
    let err = datajax::transform::check_sharding(&b.schema(), &split, &shard::by_key(["user"]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("partitions 0 and 1"), "{err}");
    // A declared output key the program does not produce.
    let bad = pjit(
        |x| x[0].select(["ts"]),
        vec![shard::by_key(["user"])],
        shard::by_key(["user"]),
    );
    let err = bad
        .call(&e, vec![src(events())])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with("sharding:") && err.contains("user"),
        "{err}"
    );
}
