//! Every operation against answers worked out by hand on small tables.

use std::collections::HashMap;

use datajax::datafusion::arrow::array::{
    ArrayRef, Date32Array, RecordBatch, TimestampMicrosecondArray,
};
use datajax::{
    Backend, DType, Frame, JoinHow, JoinSpec, Scalar, Source, Table, TruncUnit, asc, col, count,
    count_distinct, count_rows, cum_sum, desc, first, lag, last, lead, lit, max, mean, min, null,
    rank, row_number, sum, when,
};
use std::sync::Arc;

use crate::common::{engine, events, expect, rows, sorted_rows, src, users};

fn input(name: &str, b: &RecordBatch) -> Frame {
    let s = datajax::Schema::from_arrow(&b.schema(), name).unwrap_or_else(|e| panic!("{e}"));
    Frame::input(name, s)
}

fn run(f: &Frame, inputs: &[(&str, RecordBatch)]) -> Table {
    let ir = f.to_ir().unwrap_or_else(|e| panic!("{e}"));
    let bound: HashMap<String, Source> = inputs
        .iter()
        .map(|(n, b)| ((*n).to_owned(), src(b.clone())))
        .collect();
    engine()
        .run(&ir, &bound)
        .unwrap_or_else(|e| panic!("{e}\n{}", ir.pretty()))
}

fn ev() -> Frame {
    input("events", &events())
}

fn on_events(f: &Frame) -> Table {
    run(f, &[("events", events())])
}

#[test]
fn filter_select_and_with_column() {
    let f = ev()
        .filter(col("v").gt(lit(6)))
        .with_column("double", col("v") * lit(2))
        .select([
            col("user"),
            col("double"),
            (col("price") / lit(2)).alias("half"),
        ]);
    assert_eq!(
        sorted_rows(&on_events(&f)),
        expect(
            r#"[{"user":"a","double":20,"half":0.75},{"user":"a","double":40,"half":1.25},
                   {"user":"b","double":14,"half":0.25},{"user":"a","double":60,"half":1.5}]"#
        )
    );
}

#[test]
fn group_by_with_every_aggregation() {
    let f = ev().group_by(["user"]).agg([
        sum("v"),
        mean("v"),
        min("ts"),
        max("price"),
        count("v"),
        count_rows(),
        count_distinct("tag"),
        first("v").order_by(["ts"]),
        last("v").order_by(["ts"]),
    ]);
    assert_eq!(
        f.schema().unwrap_or_else(|e| panic!("{e}")).names(),
        [
            "user",
            "sum_v",
            "mean_v",
            "min_ts",
            "max_price",
            "count_v",
            "count",
            "count_distinct_tag",
            "first_v",
            "last_v"
        ]
    );
    assert_eq!(
        sorted_rows(&on_events(&f)),
        expect(
            r#"[{"user":"a","sum_v":60,"mean_v":20.0,"min_ts":1,"max_price":3.0,"count_v":3,"count":3,"count_distinct_tag":3,"first_v":10,"last_v":30},
                {"user":"b","sum_v":12,"mean_v":6.0,"min_ts":1,"max_price":4.0,"count_v":2,"count":3,"count_distinct_tag":2,"first_v":5,"last_v":7},
                {"user":"c","sum_v":1,"mean_v":1.0,"min_ts":1,"max_price":9.0,"count_v":1,"count":1,"count_distinct_tag":1,"first_v":1,"last_v":1}]"#
        )
    );
}

#[test]
fn several_keys_and_a_whole_frame_aggregation() {
    let f = ev()
        .with_column("late", col("ts").ge(lit(2)))
        .group_by(["user", "late"])
        .agg([count_rows().alias("n")]);
    assert_eq!(
        sorted_rows(&on_events(&f)),
        expect(
            r#"[{"user":"a","late":false,"n":1},{"user":"a","late":true,"n":2},{"user":"b","late":false,"n":1},
                   {"user":"b","late":true,"n":2},{"user":"c","late":false,"n":1}]"#
        )
    );
    let all = ev().agg([sum("v").alias("total"), count_rows()]);
    assert_eq!(
        rows(&on_events(&all)),
        expect(r#"[{"total":73,"count":7}]"#)
    );
}

#[test]
fn sort_limit_slice_and_distinct() {
    let top = ev()
        .sort([desc("price")])
        .limit(2)
        .select(["user", "price"]);
    assert_eq!(
        rows(&on_events(&top)),
        serde_json::from_str::<Vec<serde_json::Value>>(
            r#"[{"user":"c","price":9.0},{"user":"b","price":4.0}]"#
        )
        .unwrap_or_default()
    );
    let page = ev()
        .sort([asc("user"), asc("ts")])
        .slice(2, 2)
        .select(["user", "ts"]);
    assert_eq!(
        rows(&on_events(&page)),
        serde_json::from_str::<Vec<serde_json::Value>>(
            r#"[{"user":"a","ts":3},{"user":"b","ts":1}]"#
        )
        .unwrap_or_default()
    );
    let users = ev().select(["user"]).distinct();
    assert_eq!(
        sorted_rows(&on_events(&users)),
        expect(r#"[{"user":"a"},{"user":"b"},{"user":"c"}]"#)
    );
    // Nulls last unless asked.
    let nulls = ev()
        .filter(col("user").eq(lit("b")))
        .sort([asc("v")])
        .select(["v"]);
    assert_eq!(rows(&on_events(&nulls)).len(), 3);
    assert_eq!(rows(&on_events(&nulls))[2], serde_json::json!({}));
}

#[test]
fn union_matches_columns_by_name_and_widens_types() {
    let a = ev().select(["user", "v"]);
    let b = input("users", &users()).select([col("v"), col("user")]);
    let f = a.union(&b).group_by(["user"]).agg([count_rows()]);
    assert_eq!(
        sorted_rows(&run(&f, &[("events", events()), ("users", users())])),
        expect(
            r#"[{"user":"a","count":4},{"user":"b","count":4},{"user":"c","count":1},{"user":"d","count":1}]"#
        )
    );
}

#[test]
fn joins_of_every_kind_with_suffixes() {
    let totals = ev().group_by(["user"]).agg([sum("v").alias("v")]);
    let u = input("users", &users());
    let go = |how: JoinHow| {
        let f = totals.join(&u, ["user"], how);
        sorted_rows(&run(&f, &[("events", events()), ("users", users())]))
    };
    assert_eq!(
        go(JoinHow::Inner),
        expect(
            r#"[{"user":"a","v_x":60,"country":"fr","v_y":100},{"user":"b","v_x":12,"country":"de","v_y":200}]"#
        )
    );
    assert_eq!(
        go(JoinHow::Left),
        expect(
            r#"[{"user":"a","v_x":60,"country":"fr","v_y":100},{"user":"b","v_x":12,"country":"de","v_y":200},{"user":"c","v_x":1}]"#
        )
    );
    assert_eq!(
        go(JoinHow::Right),
        expect(
            r#"[{"user":"a","v_x":60,"country":"fr","v_y":100},{"user":"b","v_x":12,"country":"de","v_y":200},{"user":"d","country":"us","v_y":300}]"#
        )
    );
    assert_eq!(
        go(JoinHow::Full),
        expect(
            r#"[{"user":"a","v_x":60,"country":"fr","v_y":100},{"user":"b","v_x":12,"country":"de","v_y":200},{"user":"c","v_x":1},{"user":"d","country":"us","v_y":300}]"#
        )
    );
    // Keys with other names are both kept; custom suffixes.
    let renamed = u.rename("user", "who");
    let f = totals.join_with(
        &renamed,
        JoinSpec::on_columns(["user"], ["who"]).suffixes("_sum", "_base"),
    );
    assert_eq!(
        sorted_rows(&run(&f, &[("events", events()), ("users", users())])),
        expect(
            r#"[{"user":"a","v_sum":60,"who":"a","country":"fr","v_base":100},{"user":"b","v_sum":12,"who":"b","country":"de","v_base":200}]"#
        )
    );
    // Several keys.
    let pairs = ev().select(["user", "ts"]).distinct();
    let f = ev()
        .join(&pairs, ["user", "ts"], JoinHow::Inner)
        .agg([count_rows()]);
    assert_eq!(rows(&on_events(&f)), expect(r#"[{"count":7}]"#));
}

#[test]
fn window_functions_over_partitions() {
    let f = ev().window([
        row_number().over(["user"]).order_by(["ts"]).alias("rn"),
        rank()
            .over(["user"])
            .order_by([desc("price")])
            .alias("price_rank"),
        cum_sum("v")
            .over(["user"])
            .order_by(["ts"])
            .alias("running"),
        lag("v", 1).over(["user"]).order_by(["ts"]).alias("prev"),
        lead("ts", 1)
            .over(["user"])
            .order_by(["ts"])
            .alias("next_ts"),
    ]);
    let got = sorted_rows(&on_events(&f.select([
        "user",
        "ts",
        "rn",
        "price_rank",
        "running",
        "prev",
        "next_ts",
    ])));
    assert_eq!(
        got,
        expect(
            r#"[{"user":"a","ts":1,"rn":1,"price_rank":3,"running":10,"next_ts":2},
                {"user":"a","ts":2,"rn":2,"price_rank":2,"running":30,"prev":10,"next_ts":3},
                {"user":"a","ts":3,"rn":3,"price_rank":1,"running":60,"prev":20},
                {"user":"b","ts":1,"rn":1,"price_rank":2,"running":5,"next_ts":2},
                {"user":"b","ts":2,"rn":2,"price_rank":1,"running":5,"prev":5,"next_ts":3},
                {"user":"b","ts":3,"rn":3,"price_rank":3,"running":12,"next_ts":null},
                {"user":"c","ts":1,"rn":1,"price_rank":1,"running":1}]"#
                .replace(r#","next_ts":null"#, "")
                .as_str()
        )
    );
}

#[test]
fn case_when_nulls_and_strings() {
    let f = ev()
        .with_column(
            "size",
            when(col("v").ge(lit(20)), lit("big"))
                .when(col("v").ge(lit(5)), lit("mid"))
                .otherwise(lit("small")),
        )
        .with_column("missing", col("v").is_null())
        .with_column("v0", col("v").fill_null(lit(0)))
        .with_column("promo", col("tag").lower().starts_with("promo"))
        .with_column("has_as", col("tag").contains("as"))
        .with_column("loud", col("tag").upper())
        .with_column("len", col("tag").length())
        .with_column(
            "not_b",
            col("user")
                .ne(lit("b"))
                .and(col("price").lt(lit(5.0)))
                .or(lit(false)),
        )
        .select([
            "user", "ts", "size", "missing", "v0", "promo", "has_as", "loud", "len", "not_b",
        ]);
    let got = sorted_rows(&on_events(&f));
    assert_eq!(
        got,
        expect(
            r#"[{"user":"a","ts":1,"size":"mid","missing":false,"v0":10,"promo":true,"has_as":false,"loud":"PROMO","len":5,"not_b":true},
                {"user":"a","ts":2,"size":"big","missing":false,"v0":20,"promo":false,"has_as":true,"loud":"BASE","len":4,"not_b":true},
                {"user":"a","ts":3,"size":"big","missing":false,"v0":30,"promo":true,"has_as":false,"loud":"PROMO","len":5,"not_b":true},
                {"user":"b","ts":1,"size":"mid","missing":false,"v0":5,"not_b":false},
                {"user":"b","ts":2,"size":"small","missing":true,"v0":0,"promo":true,"has_as":false,"loud":"PROMO-X","len":7,"not_b":false},
                {"user":"b","ts":3,"size":"mid","missing":false,"v0":7,"promo":false,"has_as":false,"loud":"BASE","len":4,"not_b":false},
                {"user":"c","ts":1,"size":"small","missing":false,"v0":1,"promo":false,"has_as":true,"loud":"BASE","len":4,"not_b":false}]"#
        )
    );
}

#[test]
fn literals_of_every_type_and_date_truncation() {
    // 2026-03-04 05:06:07.000008 UTC and the day after, as µs and days.
    let us = 1_772_600_767_000_008i64;
    let b = RecordBatch::try_from_iter([
        (
            "at",
            Arc::new(TimestampMicrosecondArray::from(vec![
                us,
                us + 86_400_000_000,
            ])) as ArrayRef,
        ),
        (
            "day",
            Arc::new(Date32Array::from(vec![20_516, 20_517])) as ArrayRef,
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let f = input("t", &b)
        .with_column("hour", col("at").dt_trunc(TruncUnit::Hour))
        .with_column("month", col("at").dt_trunc(TruncUnit::Month))
        .with_column(
            "after",
            col("at").gt(datajax::Expr::Lit {
                value: Scalar::TimestampUs(us),
            }),
        )
        .with_column(
            "d_after",
            col("day").ge(datajax::Expr::Lit {
                value: Scalar::Date32(20_517),
            }),
        )
        .with_column("i", lit(7i32))
        .with_column("u", lit(7u64))
        .with_column("f", lit(0.5))
        .with_column("b", lit(true))
        .with_column("s", lit("text"))
        .with_column("n", null(DType::Int64));
    let t = run(&f, &[("t", b)]);
    let got = rows(&t);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["hour"], "2026-03-04T05:00:00");
    assert_eq!(got[0]["month"], "2026-03-01T00:00:00");
    assert_eq!(got[0]["after"], false);
    assert_eq!(got[1]["after"], true);
    assert_eq!(got[0]["d_after"], false);
    assert_eq!(got[1]["d_after"], true);
    assert_eq!(
        (
            got[0]["i"].clone(),
            got[0]["u"].clone(),
            got[0]["f"].clone()
        ),
        (7.into(), 7.into(), 0.5.into())
    );
    assert_eq!(
        (got[0]["b"].clone(), got[0]["s"].clone()),
        (true.into(), "text".into())
    );
    assert!(got[0].get("n").is_none(), "null is omitted: {}", got[0]);
    let schema = f.schema().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        schema.field("hour").map(|f| f.dtype),
        Some(DType::TimestampUs)
    );
    assert_eq!(schema.field("n").map(|f| f.dtype), Some(DType::Int64));
    // Results have exactly the traced schema.
    assert_eq!(
        datajax::Schema::from_arrow(&t.schema, "out")
            .unwrap_or_else(|e| panic!("{e}"))
            .fields
            .len(),
        schema.fields.len()
    );
}
