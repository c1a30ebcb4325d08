//! Eager aggregation: an aggregate over an inner join, pre-aggregated on
//! the side its values read, gives the rows of the direct plan and of the
//! same query in DataFusion SQL, with nulls, duplicate and unmatched keys
//! and empty inputs; and it is used only where it is exact.

use std::collections::HashMap;
use std::sync::Arc;

use datajax::datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datajax::{
    Agg, Backend, Engine, Frame, JoinHow, Schema, Table, col, count, count_distinct, count_rows,
    lit, max, mean, min, sum,
};

use crate::common::{sorted_rows, src};

/// Orders: user (a null, and one user the dimension lacks), amount (a
/// null; halves, so float sums are exact in any order), qty, day.
fn orders() -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "user",
            Arc::new(Int64Array::from(vec![
                Some(1),
                Some(2),
                Some(1),
                Some(3),
                None,
                Some(2),
                Some(9),
                Some(1),
                Some(4),
            ])) as ArrayRef,
        ),
        (
            "amount",
            Arc::new(Float64Array::from(vec![
                Some(10.5),
                Some(3.0),
                None,
                Some(7.25),
                Some(1.0),
                Some(4.5),
                Some(2.0),
                Some(0.5),
                None,
            ])) as ArrayRef,
        ),
        (
            "qty",
            Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 6, 7, 8, 9])) as ArrayRef,
        ),
        (
            "day",
            Arc::new(StringArray::from(vec![
                "mon", "mon", "tue", "tue", "mon", "wed", "mon", "mon", "tue",
            ])) as ArrayRef,
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Customers: user 2 twice (so its orders count twice, as in any inner
/// join), user 5 without orders, user 4 whose only order has no amount.
fn customers() -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "user",
            Arc::new(Int64Array::from(vec![1, 2, 2, 3, 4, 5])) as ArrayRef,
        ),
        (
            "country",
            Arc::new(StringArray::from(vec!["fr", "de", "us", "fr", "jp", "de"])) as ArrayRef,
        ),
        (
            "qty",
            Arc::new(Int64Array::from(vec![100, 200, 300, 400, 500, 600])) as ArrayRef,
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn input(name: &str, b: &RecordBatch) -> Frame {
    Frame::input(
        name,
        Schema::from_arrow(&b.schema(), name).unwrap_or_else(|e| panic!("{e}")),
    )
}

/// Runs `f` with eager aggregation on and off, and `sql`, over `o` and `c`
/// (as `orders` and `customers`); all three must give the same rows.
/// Returns the eager run's logical plan.
fn agree(o: RecordBatch, c: RecordBatch, f: impl Fn(Frame, Frame) -> Frame, sql: &str) -> String {
    let ir = f(input("orders", &o), input("customers", &c))
        .to_ir()
        .unwrap_or_else(|e| panic!("{e}"));
    let bound = HashMap::from([
        ("orders".to_owned(), src(o.clone())),
        ("customers".to_owned(), src(c.clone())),
    ]);
    let engine = |eager: bool| {
        Engine::with_partitions(3)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_eager_aggregation(eager)
    };
    let (on, off) = (engine(true), engine(false));
    let run = |e: &Engine| {
        e.run(&ir, &bound)
            .unwrap_or_else(|err| panic!("{err}\n{}", ir.pretty()))
    };
    let (eager_rows, direct_rows) = (sorted_rows(&run(&on)), sorted_rows(&run(&off)));
    for (name, b) in [("orders", o), ("customers", c)] {
        off.register(name, &src(b))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let df = off
        .block_on(off.session().sql(sql))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = off
        .block_on(df.collect())
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let sql_rows = sorted_rows(&Table { schema, batches });
    assert_eq!(direct_rows, sql_rows, "direct plan vs SQL: {sql}");
    assert_eq!(eager_rows, direct_rows, "eager vs direct plan: {sql}");
    on.explain(&ir, &bound)
        .unwrap_or_else(|e| panic!("{e}"))
        .logical
}

/// Each shape on the fixtures and on empty orders.
fn agree_all(f: impl Fn(Frame, Frame) -> Frame + Copy, sql: &str) -> String {
    agree(orders().slice(0, 0), customers(), f, sql);
    agree(orders(), customers().slice(0, 0), f, sql);
    agree(orders(), customers(), f, sql)
}

fn all_aggs() -> Vec<Agg> {
    vec![
        sum("amount").alias("revenue"),
        mean("amount").alias("avg_amount"),
        min("amount").alias("lo"),
        max("qty_x").alias("hi"),
        count("amount").alias("priced"),
        count_rows().alias("orders"),
    ]
}

const ALL_SQL: &str = "SUM(o.amount) AS revenue, AVG(o.amount) AS avg_amount, MIN(o.amount) AS lo, \
     MAX(o.qty) AS hi, COUNT(o.amount) AS priced, COUNT(*) AS orders";

#[test]
fn dimension_keys_match_the_direct_plan_and_sql() {
    let plan = agree_all(
        |o, c| {
            o.filter(col("qty").ne(lit(3)))
                .with_column("amount", col("amount") * lit(2.0))
                .join(&c, ["user"], JoinHow::Inner)
                .group_by(["country"])
                .agg(all_aggs())
        },
        &format!(
            "SELECT c.country, {} FROM (SELECT user, amount * 2.0 AS amount, qty FROM orders WHERE qty <> 3) o \
             JOIN customers c ON o.user = c.user GROUP BY c.country",
            ALL_SQL
        ),
    );
    assert!(plan.contains("__eager_"), "no pre-aggregation in:\n{plan}");
}

#[test]
fn fact_side_keys_and_the_shared_key_join_the_pre_aggregation() {
    // `day` comes from the aggregated side, `user` is the join key.
    agree_all(
        |o, c| {
            o.join(&c, ["user"], JoinHow::Inner)
                .group_by(["country", "day", "user"])
                .agg(all_aggs())
        },
        &format!(
            "SELECT c.country, o.day, o.user, {ALL_SQL} FROM orders o JOIN customers c ON o.user = c.user \
             GROUP BY c.country, o.day, o.user"
        ),
    );
    // No keys: one row for the whole join.
    agree_all(
        |o, c| {
            o.join(&c, ["user"], JoinHow::Inner)
                .group_by(Vec::<String>::new())
                .agg(all_aggs())
        },
        &format!("SELECT {ALL_SQL} FROM orders o JOIN customers c ON o.user = c.user"),
    );
}

#[test]
fn the_aggregated_side_may_be_the_right_one() {
    let plan = agree_all(
        |o, c| {
            c.join(&o, ["user"], JoinHow::Inner)
                .group_by(["country"])
                .agg([
                    sum("amount").alias("revenue"),
                    mean("qty_y").alias("avg_qty"),
                    count_rows().alias("orders"),
                ])
        },
        "SELECT c.country, SUM(o.amount) AS revenue, AVG(o.qty) AS avg_qty, COUNT(*) AS orders \
         FROM customers c JOIN orders o ON c.user = o.user GROUP BY c.country",
    );
    assert!(plan.contains("__eager_"), "no pre-aggregation in:\n{plan}");
}

#[test]
fn it_is_not_used_where_it_would_not_be_exact() {
    type Shape = fn(Frame, Frame) -> Frame;
    let cases: [(&str, Shape, &str); 3] = [
        (
            "count_distinct does not decompose",
            |o, c| {
                o.join(&c, ["user"], JoinHow::Inner)
                    .group_by(["country"])
                    .agg([count_distinct("day").alias("days")])
            },
            "SELECT c.country, COUNT(DISTINCT o.day) AS days FROM orders o JOIN customers c \
             ON o.user = c.user GROUP BY c.country",
        ),
        (
            "values from both sides",
            |o, c| {
                o.join(&c, ["user"], JoinHow::Inner)
                    .group_by(["country"])
                    .agg([sum("qty_x").alias("a"), sum("qty_y").alias("b")])
            },
            "SELECT c.country, SUM(o.qty) AS a, SUM(c.qty) AS b FROM orders o JOIN customers c \
             ON o.user = c.user GROUP BY c.country",
        ),
        (
            "an outer join keeps rows a pre-aggregation could not count",
            |o, c| {
                o.join(&c, ["user"], JoinHow::Right)
                    .group_by(["country"])
                    .agg([count_rows().alias("n"), sum("amount").alias("s")])
            },
            "SELECT c.country, COUNT(*) AS n, SUM(o.amount) AS s FROM orders o RIGHT JOIN customers c \
             ON o.user = c.user GROUP BY c.country",
        ),
    ];
    for (why, shape, sql) in cases {
        let plan = agree_all(shape, sql);
        assert!(
            !plan.contains("__eager_"),
            "{why}, yet pre-aggregated:\n{plan}"
        );
    }
}
