//! The IR: a typed DAG with a versioned JSON form that replays to the same
//! results, and that refuses documents it cannot trust.

use std::collections::HashMap;

use datajax::{
    Backend, DType, Frame, Ir, JoinHow, Schema, Source, col, count_rows, desc, lit, row_number, sum,
};

use crate::common::{engine, events, rows, src, users};

fn pipeline() -> Frame {
    let ev = Frame::input(
        "events",
        Schema::from_arrow(&events().schema(), "events").unwrap_or_else(|e| panic!("{e}")),
    );
    let us = Frame::input(
        "users",
        Schema::from_arrow(&users().schema(), "users").unwrap_or_else(|e| panic!("{e}")),
    );
    let per_user = ev
        .filter(col("v").is_not_null())
        .group_by(["user"])
        .agg([sum("v"), count_rows()]);
    per_user
        .join(&us, ["user"], JoinHow::Left)
        .window([row_number().order_by([desc("sum_v")]).alias("place")])
        .sort(["place"])
}

fn bound() -> HashMap<String, Source> {
    HashMap::from([
        ("events".to_owned(), src(events())),
        ("users".to_owned(), src(users())),
    ])
}

#[test]
fn json_round_trips_and_replays_to_identical_results() {
    let ir = pipeline().to_ir().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ir.ir_version, datajax::IR_VERSION);
    assert_eq!(ir.inputs.len(), 2, "two inputs: a DAG, not a chain");
    let text = ir.to_json();
    let back = Ir::from_json(&text, "p.json").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, ir);
    assert_eq!(back.to_json(), text, "serialisation is stable");
    let e = engine();
    let first = rows(&e.run(&ir, &bound()).unwrap_or_else(|e| panic!("{e}")));
    let again = rows(&e.run(&back, &bound()).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(first, again);
    assert_eq!(first.len(), 3);
    assert_eq!(first[0]["user"], "a");
    assert_eq!(first[0]["country"], "fr");
}

#[test]
fn a_frame_used_twice_is_one_node() {
    let ev = Frame::input(
        "events",
        Schema::of(&[("k", DType::Utf8), ("x", DType::Int64)]).unwrap_or_else(|e| panic!("{e}")),
    );
    let big = ev.filter(col("x").gt(lit(1)));
    let f = big.union(&big);
    let ir = f.to_ir().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ir.nodes.len(), 3, "{}", ir.pretty());
    assert_eq!(ir.nodes[2].inputs, [1, 1]);
}

#[test]
fn documents_that_cannot_be_trusted_are_refused_with_where() {
    let text = pipeline()
        .to_ir()
        .unwrap_or_else(|e| panic!("{e}"))
        .to_json();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));

    let mut v = doc.clone();
    v["ir_version"] = 2.into();
    let e = Ir::from_json(&v.to_string(), "p.json")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with("p.json:") && e.contains("ir_version 2 is not supported"),
        "{e}"
    );

    // A schema edited by hand no longer matches what the node computes.
    let mut v = doc.clone();
    v["nodes"][2]["schema"][1]["dtype"] = "utf8".into();
    let e = Ir::from_json(&v.to_string(), "p.json")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("nodes[2]") && e.contains("differs from the inferred"),
        "{e}"
    );

    // An unknown field names its path.
    let mut v = doc.clone();
    v["nodes"][1]["op"]["predicat"] = true.into();
    let e = Ir::from_json(
        &serde_json::to_string_pretty(&v).unwrap_or_default(),
        "p.json",
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        e.contains("nodes[1].op") && e.contains("predicat") && e.contains("line"),
        "{e}"
    );

    // Inputs that point forward.
    let mut v = doc.clone();
    v["nodes"][1]["inputs"] = serde_json::json!([5]);
    let e = Ir::from_json(&v.to_string(), "p.json")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("does not come before it"), "{e}");

    // A column renamed in a filter: typing runs again on load.
    doc["nodes"][1]["op"]["predicate"]["expr"]["name"] = "vv".into();
    let e = Ir::from_json(&doc.to_string(), "p.json")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("unknown column \"vv\""), "{e}");
}

#[test]
fn bound_data_must_fit_the_traced_schema() {
    let ir = pipeline().to_ir().unwrap_or_else(|e| panic!("{e}"));
    let e = engine();
    // An input left unbound.
    let one = HashMap::from([("events".to_owned(), src(events()))]);
    let err = e
        .run(&ir, &one)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("input \"users\" is not bound") && err.contains("--input users=PATH"),
        "{err}"
    );
    // A column of another type.
    let wrong = HashMap::from([
        ("events".to_owned(), src(users())),
        ("users".to_owned(), src(users())),
    ]);
    let err = e
        .run(&ir, &wrong)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("input \"events\"") && err.contains("unknown column \"ts\""),
        "{err}"
    );
}

#[test]
fn explain_shows_the_ir_and_both_plans() {
    let ir = pipeline().to_ir().unwrap_or_else(|e| panic!("{e}"));
    let x = engine()
        .explain(&ir, &bound())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        x.ir.contains("ir_version 1") && x.ir.contains("join left on user = user"),
        "{}",
        x.ir
    );
    assert!(x.logical.contains("Left Join"), "{}", x.logical);
    assert!(x.optimized.contains("Aggregate"), "{}", x.optimized);
    assert!(
        x.physical.contains("HashJoinExec") || x.physical.contains("Join"),
        "{}",
        x.physical
    );
    assert!(x.to_string().contains("== physical plan =="));
}

/// A pipeline written by hand: only the inputs carry schemas.
pub const HAND_WRITTEN: &str = r#"{
  "ir_version": 1,
  "inputs": [{"name": "events", "schema": [{"name": "user", "dtype": "utf8"}, {"name": "v", "dtype": "int64"}]}],
  "nodes": [
    {"id": 0, "inputs": [], "op": {"kind": "input", "name": "events"}},
    {"id": 1, "inputs": [0], "op": {"kind": "filter", "predicate":
      {"kind": "binary", "op": "gt", "left": {"kind": "col", "name": "v"}, "right": {"kind": "lit", "value": {"type": "int64", "value": 6}}}}},
    {"id": 2, "inputs": [1], "op": {"kind": "aggregate", "keys": ["user"],
      "aggs": [{"func": "sum", "expr": {"kind": "col", "name": "v"}, "name": "total"}]}}
  ],
  "output": 2
}"#;

#[test]
fn a_hand_written_pipeline_needs_schemas_only_for_its_inputs() {
    let ir = Ir::from_json(HAND_WRITTEN, "hand.json").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ir.output_schema().names(), ["user", "total"]);
    let out = engine()
        .run(&ir, &HashMap::from([("events".to_owned(), src(events()))]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        crate::common::sorted_rows(&out),
        crate::common::expect(r#"[{"user":"a","total":60},{"user":"b","total":7}]"#)
    );
    // A mistake in it is named by node.
    let bad = HAND_WRITTEN.replace(r#""name": "v"}, "right""#, r#""name": "w"}, "right""#);
    let e = Ir::from_json(&bad, "hand.json")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with("hand.json: nodes[1] (filter)") && e.contains("unknown column \"w\""),
        "{e}"
    );
}
