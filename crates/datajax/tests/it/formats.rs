//! Parquet, CSV, Arrow IPC and JSON lines in and out, and Substrait plans
//! that run to the same results as the IR they came from.

use std::collections::HashMap;

use datajax::{Backend, Frame, Schema, Source, Table, col, count_rows, desc, lit, sum};

use crate::common::{engine, events, rows, sorted_rows, src};

fn program() -> datajax::Ir {
    let ev = Frame::input(
        "events",
        Schema::from_arrow(&events().schema(), "events").unwrap_or_else(|e| panic!("{e}")),
    );
    ev.filter(col("price").lt(lit(5.0)))
        .group_by(["user"])
        .agg([sum("v"), count_rows()])
        .sort([desc("count")])
        .to_ir()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_format_reads_and_writes_to_the_same_results() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let e = engine();
    let ir = program();
    let table = Table {
        schema: events().schema(),
        batches: vec![events()],
    };
    let expected = sorted_rows(
        &e.run(&ir, &HashMap::from([("events".to_owned(), src(events()))]))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(expected.len(), 2, "{expected:?}");
    for ext in ["parquet", "csv", "arrow", "jsonl"] {
        let path = dir.path().join(format!("events.{ext}"));
        table.write(&path).unwrap_or_else(|e| panic!("{ext}: {e}"));
        let source = Source::from_path(&path).unwrap_or_else(|e| panic!("{e}"));
        let got = e
            .run(&ir, &HashMap::from([("events".to_owned(), source)]))
            .unwrap_or_else(|e| panic!("{ext}: {e}"));
        assert_eq!(sorted_rows(&got), expected, "{ext}");
        // Results written in the same format read back equal.
        let out = dir.path().join(format!("out.{ext}"));
        got.write(&out).unwrap_or_else(|e| panic!("{ext}: {e}"));
        let back = e
            .schema_of(&Source::from_path(&out).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.names(), ["user", "sum_v", "count"], "{ext}");
    }
    // Unknown extensions and missing files are named.
    let err = Source::from_path("x.xlsx")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("x.xlsx") && err.contains(".parquet"), "{err}");
    let missing =
        Source::from_path(dir.path().join("nope.parquet")).unwrap_or_else(|e| panic!("{e}"));
    let err = e
        .run(&ir, &HashMap::from([("events".to_owned(), missing)]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("nope.parquet") && err.contains("no such file"),
        "{err}"
    );
    // A failed write leaves no partial file.
    let bad = dir.path().join("no-such-dir/out.parquet");
    assert!(table.write(&bad).is_err());
    assert!(!bad.exists());
}

#[test]
fn substrait_plans_run_to_the_ir_results() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("events.parquet");
    Table {
        schema: events().schema(),
        batches: vec![events()],
    }
    .write(&path)
    .unwrap_or_else(|e| panic!("{e}"));
    let inputs = HashMap::from([("events".to_owned(), Source::Parquet(path))]);
    let e = engine();
    let ir = program();
    let direct = rows(&e.run(&ir, &inputs).unwrap_or_else(|e| panic!("{e}")));
    let bytes = datajax::substrait::export(&e, &ir, &inputs).unwrap_or_else(|e| panic!("{e}"));
    assert!(bytes.len() > 100);
    // A fresh engine, as another process would be.
    let other = engine();
    let via = datajax::substrait::run(&other, &bytes, &inputs, "plan.pb")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows(&via), direct);
    let err = datajax::substrait::run(&other, b"not a plan", &inputs, "junk.pb")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("junk.pb:"), "{err}");
}
