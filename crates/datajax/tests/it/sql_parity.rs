//! Every operation against the same query in DataFusion SQL, on a table
//! with nulls and on an empty one.

use std::collections::HashMap;

use datajax::datafusion::arrow::record_batch::RecordBatch;
use datajax::{
    Backend, Frame, JoinHow, Schema, Table, TruncUnit, asc, col, count, count_distinct, count_rows,
    cum_sum, desc, lag, lead, lit, max, mean, min, rank, row_number, sum, when,
};

use crate::common::{engine, events, sorted_rows, src, users};

/// Runs `f` on `events`/`users` and `sql` on the same tables registered
/// under the same names, and compares the rows (order-free).
fn parity(events_batch: RecordBatch, f: impl Fn(Frame, Frame) -> Frame, sql: &str) {
    let ev = Frame::input(
        "events",
        Schema::from_arrow(&events_batch.schema(), "events").unwrap_or_else(|e| panic!("{e}")),
    );
    let us = Frame::input(
        "users",
        Schema::from_arrow(&users().schema(), "users").unwrap_or_else(|e| panic!("{e}")),
    );
    let ir = f(ev, us).to_ir().unwrap_or_else(|e| panic!("{e}"));
    let e = engine();
    let bound = HashMap::from([
        ("events".to_owned(), src(events_batch.clone())),
        ("users".to_owned(), src(users())),
    ]);
    let ours = e
        .run(&ir, &bound)
        .unwrap_or_else(|err| panic!("{err}\n{}", ir.pretty()));
    // The same tables, by name, for SQL.
    for (name, b) in [("events", events_batch), ("users", users())] {
        e.register(name, &src(b))
            .unwrap_or_else(|err| panic!("{err}"));
    }
    let df = e
        .block_on(e.session().sql(sql))
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
    let batches = e
        .block_on(df.collect())
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    let theirs = Table { schema, batches };
    assert_eq!(
        sorted_rows(&ours),
        sorted_rows(&theirs),
        "{sql}\n{}",
        ir.pretty()
    );
}

fn both(f: impl Fn(Frame, Frame) -> Frame + Copy, sql: &str) {
    parity(events(), f, sql);
    parity(events().slice(0, 0), f, sql);
}

#[test]
fn projections_filters_and_expressions() {
    both(
        |e, _| e.filter(col("v").gt(lit(6))).select(["user", "v"]),
        "SELECT user, v FROM events WHERE v > 6",
    );
    both(
        |e, _| {
            e.with_column("w", col("v") * lit(2) + col("ts"))
                .select(["user", "w"])
        },
        "SELECT user, v * 2 + ts AS w FROM events",
    );
    both(
        |e, _| {
            e.select([
                (col("price") / col("ts")).alias("r"),
                (col("v") % lit(3)).alias("m"),
                (-col("v")).alias("n"),
            ])
        },
        "SELECT CAST(price AS DOUBLE) / CAST(ts AS DOUBLE) AS r, v % 3 AS m, -v AS n FROM events",
    );
    both(
        |e, _| {
            e.select([
                col("v").is_null().alias("a"),
                col("v").fill_null(lit(-1)).alias("b"),
                col("tag").is_not_null().alias("c"),
            ])
        },
        "SELECT v IS NULL AS a, COALESCE(v, -1) AS b, tag IS NOT NULL AS c FROM events",
    );
    both(
        |e, _| {
            e.select([when(col("v").gt(lit(10)), lit("hi"))
                .when(col("v").gt(lit(1)), lit("mid"))
                .end()
                .alias("band")])
        },
        "SELECT CASE WHEN v > 10 THEN 'hi' WHEN v > 1 THEN 'mid' END AS band FROM events",
    );
    both(
        |e, _| {
            e.select([
                col("tag").lower().alias("l"),
                col("tag").upper().alias("u"),
                col("tag").length().alias("n"),
                col("tag").contains("om").alias("c"),
                col("tag").starts_with("p").alias("s"),
                col("tag").ends_with("e").alias("x"),
            ])
        },
        "SELECT lower(tag) AS l, upper(tag) AS u, CAST(character_length(tag) AS INT) AS n, strpos(tag, 'om') > 0 AS c, \
         starts_with(tag, 'p') AS s, ends_with(tag, 'e') AS x FROM events",
    );
    both(
        |e, _| {
            e.filter(
                col("user")
                    .ne(lit("b"))
                    .and(col("price").lt(lit(3.0)).or(col("v").is_null()))
                    .not(),
            )
            .select(["user", "ts"])
        },
        "SELECT user, ts FROM events WHERE NOT (user <> 'b' AND (price < 3.0 OR v IS NULL))",
    );
    both(
        |e, _| {
            e.with_column(
                "at",
                (col("ts") * lit(3_600_000_000i64)).cast(datajax::DType::TimestampUs),
            )
            .select([col("at").dt_trunc(TruncUnit::Day).alias("d")])
        },
        "SELECT date_trunc('day', to_timestamp_micros(ts * 3600000000)) AS d FROM events",
    );
}

#[test]
fn aggregations_sorts_limits_distinct_union() {
    both(
        |e, _| {
            e.group_by(["user"]).agg([
                sum("v"),
                mean("price"),
                min("v"),
                max("tag"),
                count("v"),
                count_rows(),
                count_distinct("tag"),
            ])
        },
        "SELECT user, sum(v) AS sum_v, avg(price) AS mean_price, min(v) AS min_v, max(tag) AS max_tag, count(v) AS count_v, \
         count(*) AS count, count(DISTINCT tag) AS count_distinct_tag FROM events GROUP BY user",
    );
    both(
        |e, _| e.group_by(["user", "ts"]).agg([sum("price")]),
        "SELECT user, ts, sum(price) AS sum_price FROM events GROUP BY user, ts",
    );
    both(
        |e, _| e.sort([desc("price")]).limit(3).select(["price"]),
        "SELECT price FROM events ORDER BY price DESC LIMIT 3",
    );
    both(
        |e, _| {
            e.sort([asc("v"), desc("ts")])
                .slice(1, 3)
                .select(["v", "ts"])
        },
        "SELECT v, ts FROM events ORDER BY v ASC NULLS LAST, ts DESC LIMIT 3 OFFSET 1",
    );
    both(
        |e, _| e.select(["user"]).distinct(),
        "SELECT DISTINCT user FROM events",
    );
    both(
        |e, u| e.select(["user", "v"]).union(&u.select(["user", "v"])),
        "SELECT user, v FROM events UNION ALL SELECT user, v FROM users",
    );
}

#[test]
fn joins_and_windows() {
    for (how, kw) in [
        (JoinHow::Inner, "INNER"),
        (JoinHow::Left, "LEFT"),
        (JoinHow::Right, "RIGHT"),
        (JoinHow::Full, "FULL"),
    ] {
        let sql = format!(
            "SELECT COALESCE(e.user, u.user) AS user, e.ts, e.v AS v_x, e.price, e.tag, u.country, u.v AS v_y \
             FROM events e {kw} JOIN users u ON e.user = u.user"
        );
        let sql = if matches!(how, JoinHow::Inner | JoinHow::Left) {
            sql.replace("COALESCE(e.user, u.user)", "e.user")
        } else {
            sql
        };
        let sql = if matches!(how, JoinHow::Right) {
            sql.replace("COALESCE(e.user, u.user)", "u.user")
        } else {
            sql
        };
        parity(events(), move |e, u| e.join(&u, ["user"], how), &sql);
        parity(
            events().slice(0, 0),
            move |e, u| e.join(&u, ["user"], how),
            &sql,
        );
    }
    both(
        |e, _| {
            e.window([
                row_number().over(["user"]).order_by(["ts"]).alias("rn"),
                rank().over(["user"]).order_by([desc("price")]).alias("rk"),
                cum_sum("v").over(["user"]).order_by(["ts"]).alias("cs"),
                lag("v", 1).over(["user"]).order_by(["ts"]).alias("lg"),
                lead("v", 2).over(["user"]).order_by(["ts"]).alias("ld"),
            ])
            .select(["user", "ts", "rn", "rk", "cs", "lg", "ld"])
        },
        "SELECT user, ts, row_number() OVER (PARTITION BY user ORDER BY ts) AS rn, \
         rank() OVER (PARTITION BY user ORDER BY price DESC) AS rk, \
         sum(v) OVER (PARTITION BY user ORDER BY ts ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS cs, \
         lag(v, 1) OVER (PARTITION BY user ORDER BY ts) AS lg, lead(v, 2) OVER (PARTITION BY user ORDER BY ts) AS ld FROM events",
    );
}
