//! `bstack datajax`: pipelines from IR JSON and Substrait over files, explain,
//! WaveSpec export, and the errors a user meets.

use datajax::{DType, Frame, Schema, col, count_rows, desc, lit, sum};

use crate::common::Sandbox;

const EVENTS: &str = "user,ts,v,price\na,1,10,1.5\na,2,20,2.5\nb,1,5,1.0\nb,2,,4.0\nb,3,7,0.5\nc,1,1,9.0\na,3,30,3.0\n";

fn pipeline(sandbox: &Sandbox) {
    let ev = Frame::input(
        "events",
        Schema::of(&[
            ("user", DType::Utf8),
            ("ts", DType::Int64),
            ("v", DType::Int64),
            ("price", DType::Float64),
        ])
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let f = ev
        .filter(col("price").lt(lit(5.0)))
        .group_by(["user"])
        .agg([sum("v").alias("total"), count_rows()])
        .sort([desc("total")]);
    sandbox.write("events.csv", EVENTS);
    sandbox.write(
        "p.json",
        f.to_ir().unwrap_or_else(|e| panic!("{e}")).to_json(),
    );
}

#[test]
fn a_pipeline_runs_over_csv_prints_writes_and_explains() {
    let s = Sandbox::empty();
    pipeline(&s);
    let run = s.run(&["datajax", "run", "p.json", "--input", "events=events.csv"]);
    run.code(0)
        .stdout_has("total")
        .stdout_has("| a    | 60    | 3     |");
    let j = s.run(&[
        "--json",
        "datajax",
        "run",
        "p.json",
        "-i",
        "events=events.csv",
    ]);
    j.code(0);
    let v = j.json();
    assert_eq!(v["rows"], 2, "{v}");
    assert_eq!(v["preview"][0]["user"], "a", "{v}");
    assert_eq!(v["preview"][1]["total"], 12, "{v}");
    // To Parquet, then the Parquet file as the input of the same pipeline.
    s.run(&[
        "datajax",
        "run",
        "p.json",
        "-i",
        "events=events.csv",
        "-o",
        "out.parquet",
    ])
    .code(0)
    .stdout_has("wrote out.parquet (2 rows");
    let ex = s.run(&["datajax", "explain", "p.json", "-i", "events=events.csv"]);
    ex.code(0)
        .stdout_has("== IR ==")
        .stdout_has("group_by [user]")
        .stdout_has("== physical plan ==");
    // Substrait: exported, then run as a pipeline of its own.
    s.run(&[
        "datajax",
        "export-substrait",
        "p.json",
        "-i",
        "events=events.csv",
        "-o",
        "p.pb",
    ])
    .code(0);
    let sub = s.run(&[
        "--json",
        "datajax",
        "run",
        "p.pb",
        "-i",
        "events=events.csv",
    ]);
    sub.code(0);
    assert_eq!(sub.json()["preview"], v["preview"], "{sub}");
}

#[test]
fn mistakes_are_one_error_line_that_says_what_to_do() {
    let s = Sandbox::empty();
    pipeline(&s);
    let r = s.run(&["datajax", "run", "p.json"]);
    r.code(2);
    assert!(r.error_line().contains("--input events=PATH"), "{r}");
    let r = s.run(&["datajax", "run", "p.json", "--input", "events.csv"]);
    r.code(2);
    assert!(r.error_line().contains("NAME=PATH"), "{r}");
    s.write("bad.csv", "user,ts,v,price\na,1,x,1.0\n");
    let r = s.run(&["datajax", "run", "p.json", "--input", "events=bad.csv"]);
    r.code(2);
    assert!(
        r.error_line().contains("column v is utf8 in the data"),
        "{r}"
    );
    // A pipeline traced with another column name: the data lacks it.
    let text = String::from_utf8(s.read("p.json")).unwrap_or_default();
    s.write("typo.json", text.replace("\"price\"", "\"prise\""));
    let r = s.run(&[
        "datajax",
        "run",
        "typo.json",
        "--input",
        "events=events.csv",
    ]);
    r.code(2);
    assert!(r.error_line().contains("did you mean \"price\""), "{r}");
    // A pipeline from a newer format.
    s.write(
        "new.json",
        text.replace("\"ir_version\": 1", "\"ir_version\": 9"),
    );
    let r = s.run(&["datajax", "run", "new.json", "--input", "events=events.csv"]);
    r.code(2);
    assert!(
        r.error_line().starts_with("new.json:") && r.error_line().contains("ir_version 9"),
        "{r}"
    );
}

#[test]
fn export_wavespec_writes_a_spec_that_validates() {
    let s = Sandbox::empty();
    let mut trace = String::new();
    for (i, ids) in [[0u64, 1, 2], [0, 1, 3], [0, 4, 5], [6, 7, 8]]
        .iter()
        .enumerate()
    {
        trace.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": 1536, \"output_length\": 10, \"hash_ids\": {:?}}}\n",
            i * 700,
            ids
        ));
    }
    s.write("trace.jsonl", trace);
    let r = s.run(&[
        "datajax",
        "export-wavespec",
        "--trace",
        "trace.jsonl",
        "-o",
        "w.wave_spec.json",
    ]);
    r.code(0).stdout_has("cohorts").stdout_has("swap window");
    s.run(&["plan", "validate", "w.wave_spec.json"]).code(0);
    let spec = s.read_json("w.wave_spec.json");
    assert_eq!(spec["source"], "trace.jsonl", "{spec}");
    assert_eq!(spec["cohorts"].as_array().map(Vec::len), Some(2), "{spec}");
    let j = s.run(&[
        "--json",
        "datajax",
        "export-wavespec",
        "--trace",
        "trace.jsonl",
        "-o",
        "w.pb",
        "--wave-ms",
        "500",
    ]);
    j.code(0);
    assert_eq!(j.json()["requests"], 4);
    assert_eq!(j.json()["distinct_blocks"], 9);
    let bad = s.run(&[
        "datajax",
        "export-wavespec",
        "--trace",
        "missing.jsonl",
        "-o",
        "x.json",
    ]);
    bad.code(2);
    assert!(bad.error_line().contains("missing.jsonl"), "{bad}");
}

#[test]
fn the_wave_load_program_runs_on_the_shared_trace_as_json_lines() {
    let trace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/traces/conversation_trace.jsonl");
    if !trace.exists() {
        eprintln!("skipped: {} is absent", trace.display());
        return;
    }
    let s = Sandbox::empty();
    let program = datajax::wavespec::wave_load_program(60_000).unwrap_or_else(|e| panic!("{e}"));
    s.write("load.json", program.to_json());
    let input = format!("requests={}", trace.display());
    let r = s.run(&[
        "--json",
        "datajax",
        "run",
        "load.json",
        "-i",
        &input,
        "--show",
        "1000",
    ]);
    r.code(0);
    let v = r.json();
    let rows = v["preview"].as_array().cloned().unwrap_or_default();
    // One row per minute of the hour-long trace; every request counted once.
    assert!((55..=61).contains(&rows.len()), "{v}");
    let total: i64 = rows
        .iter()
        .map(|r| r["requests"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(total, 12_031);
}
