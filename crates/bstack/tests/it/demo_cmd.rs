//! `bstack demo`: the composed flow. Each stage reads the files the stages
//! before it wrote; every contract file validates; the figures add up
//! (bytes planned = executed + deferred, the rollout committed on both
//! workers, the weight swap applied inside the window only); a generated
//! trace stands in when the shared one is absent.

use serde_json::Value;

use crate::common::{Sandbox, shared_trace};

const OUT: &str = "out";

/// `value` as a u64, or a panic naming `what`.
#[track_caller]
fn num(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
}

/// Every contract file under `dir` by name (`*.KIND.json`, `KIND.json`),
/// relative to the sandbox.
fn contract_files(sandbox: &Sandbox, dir: &str) -> Vec<String> {
    const KINDS: [&str; 5] = [
        "weight_manifest",
        "cache_plan",
        "swap_window",
        "swap_plan",
        "wave_spec",
    ];
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(sandbox.path(&d)).unwrap_or_else(|e| panic!("{d}: {e}"));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("{d}: {e}"));
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = format!("{d}/{name}");
            if entry.path().is_dir() {
                stack.push(rel);
            } else if KINDS
                .iter()
                .any(|k| name == format!("{k}.json") || name.ends_with(&format!(".{k}.json")))
            {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// The sum of the op lengths of a cache plan file.
fn op_bytes(sandbox: &Sandbox, file: &str) -> u64 {
    let plan = sandbox.read_json(file);
    plan["ops"]
        .as_array()
        .map(|ops| ops.iter().map(|o| num(&o["length"], "an op length")).sum())
        .unwrap_or(0)
}

/// The whole flow on 400 requests of the shared trace.
#[test]
fn composed_flow_on_a_slice_of_the_shared_trace() {
    let trace = shared_trace();
    if !trace.exists() {
        eprintln!("skipped: {} is absent", trace.display());
        return;
    }
    let sandbox = Sandbox::empty();
    let trace_arg = trace.display().to_string();
    let run = sandbox.run(&[
        "--json",
        "demo",
        "-o",
        OUT,
        "--trace",
        &trace_arg,
        "--requests",
        "400",
    ]);
    run.code(0).quiet_stderr();
    let j = run.json();
    assert_eq!(j["trace"]["generated"], false, "{run}");
    assert_eq!(j["trace"]["requests"], 400, "{run}");
    assert_eq!(
        sandbox
            .read("out/trace.jsonl")
            .iter()
            .filter(|b| **b == b'\n')
            .count(),
        400
    );

    // Every contract file on disk is one the demo validated, and the CLI
    // agrees that each is valid.
    let files = contract_files(&sandbox, OUT);
    let mut listed: Vec<String> = j["contracts"]
        .as_array()
        .unwrap_or_else(|| panic!("`contracts` is not a list{run}"))
        .iter()
        .map(|f| f.as_str().unwrap_or_default().to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, files, "{run}");
    let mut args = vec!["plan", "validate"];
    args.extend(files.iter().map(String::as_str));
    let check = sandbox.run(&args);
    check.code(0);
    assert_eq!(check.stdout_lines().len(), files.len(), "{check}");

    // bcache placed requests by the WaveSpec's cohorts; moving every
    // distinct block once is the floor, round-robin placement moves more.
    let kv = &j["kv"];
    let executed = &kv["executed"];
    assert!(
        num(&executed["placed_by_cohort"], "placed_by_cohort") > 0,
        "{run}"
    );
    // Planned bytes, not needed ones: a deferred run is needed again in a
    // later window, but moved once.
    let moved = num(&executed["total"]["planned_bytes"], "planned bytes");
    let round_robin = num(
        &kv["round_robin"]["total"]["planned_bytes"],
        "round-robin bytes",
    );
    let floor = num(&kv["floor_bytes"], "floor bytes");
    assert!(floor <= moved && moved < round_robin, "{run}");

    // Per window: what the requests need = planned + deferred + dropped,
    // and the stores copied exactly what was planned; the node shares add
    // up to the cluster plan, each store reported on its share.
    let windows = executed["windows"].as_array().cloned().unwrap_or_default();
    assert!(windows.len() >= 2, "{run}");
    for w in &windows {
        let f = |k: &str| num(&w[k], k);
        assert_eq!(
            f("unique_bytes") + f("gap_bytes"),
            f("planned_bytes") + f("deferred_bytes") + f("dropped_bytes"),
            "window {w}"
        );
        assert_eq!(f("executed_bytes"), f("planned_bytes"), "window {w}");
        let dir = format!("{OUT}/kv/w{:03}", f("window"));
        let shares: u64 = ["node0", "node1"]
            .iter()
            .map(|n| {
                let report = sandbox.read_json(&format!("{dir}/{n}.exec_report.json"));
                let share = op_bytes(&sandbox, &format!("{dir}/{n}.cache_plan.json"));
                assert_eq!(num(&report["done_bytes"], "done_bytes"), share, "{dir}/{n}");
                assert_eq!(report["failed_ops"], 0, "{dir}/{n}");
                share
            })
            .sum();
        assert_eq!(
            shares,
            op_bytes(&sandbox, &format!("{dir}/cache_plan.json")),
            "{dir}"
        );
        assert_eq!(shares, f("planned_bytes"), "{dir}");
    }
    let total = &executed["total"];
    let pages = num(&total["verified_pages"], "verified pages");
    assert!(pages > 0, "{run}");
    assert_eq!(kv["hits_fed_back"], pages, "{run}");

    // hotweights planned with the WaveSpec's window; both workers committed.
    let spec = sandbox.read_json("out/datajax/wave_spec.json");
    let plan = sandbox.read_json("out/hotweights/v1-v2.swap_plan.json");
    let (begin, end) = (
        num(&spec["swap_begin"], "swap_begin"),
        num(&spec["swap_end"], "swap_end"),
    );
    assert_eq!(plan["window"]["wave_begin"], begin, "{run}");
    assert_eq!(plan["window"]["wave_end"], end, "{run}");
    let hw = &j["hotweights"];
    assert_eq!(hw["export_identical"], true, "{run}");
    assert_eq!(hw["current"], "v1", "{run}");
    let report = &j["cluster"]["report"];
    assert_eq!(report["all_committed"], true, "{run}");
    let staged = num(&report["staged_bytes"], "staged bytes");
    let consumers = report["consumers"].as_array().cloned().unwrap_or_default();
    assert_eq!(consumers.len(), 2, "{run}");
    for c in &consumers {
        assert_eq!(c["bytes"].as_u64(), Some(staged), "{run}");
    }
    for rank in ["rank0", "rank1"] {
        let store = format!("{OUT}/hotweights/cluster/{rank}");
        let status = sandbox.run(&["--json", "hw", "status", "--store", &store]);
        status.code(0);
        assert_eq!(status.json()["status"]["current"], "v2", "{status}");
    }

    // bwrt ran the spec's waves with the plan's window: one swap, applied
    // inside it; the offers outside it refused and counted.
    let bwrt = &j["bwrt"];
    assert_eq!(
        bwrt["swap_window"],
        serde_json::json!([begin, end]),
        "{run}"
    );
    let waves = num(&bwrt["waves"], "waves");
    let counters = &bwrt["counters"];
    assert_eq!(counters["waves_completed"], waves, "{run}");
    assert_eq!(counters["waves_failed"], 0, "{run}");
    assert_eq!(counters["swaps_applied"], 1, "{run}");
    let refused = bwrt["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter(|s| s["result"].to_string().contains("refused"))
                .count()
        })
        .unwrap_or(0);
    assert!(refused >= 1, "{run}");
    assert_eq!(counters["swap_window_violations"], refused, "{run}");

    let stages: Vec<&str> = j["stages"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["stage"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        stages,
        [
            "trace",
            "datajax",
            "bcache",
            "stratacache",
            "bcache replay",
            "hotweights",
            "rollout",
            "bwrt",
            "validate"
        ],
        "{run}"
    );
}

/// Without the shared trace (the sandbox has no `../shared`), the demo
/// generates one and says so in its table; a second run replaces the first.
#[test]
fn generates_a_trace_when_the_shared_one_is_absent_and_reruns() {
    let sandbox = Sandbox::empty();
    assert!(
        !sandbox
            .path("../shared/data/traces/conversation_trace.jsonl")
            .exists()
    );
    for _ in 0..2 {
        let run = sandbox.run(&["demo", "--output", "a/b", "--requests", "200"]);
        run.code(0).quiet_stderr();
        run.stdout_has("a generated trace of 200 requests")
            .stdout_has("all valid");
        for stage in [
            "datajax",
            "bcache",
            "stratacache",
            "hotweights",
            "rollout",
            "bwrt",
        ] {
            run.stdout_has(stage);
        }
    }
    assert!(sandbox.exists("a/b/datajax/wave_spec.json"));
    assert!(sandbox.exists("a/b/kv/w000/cache_plan.json"));
}

#[test]
fn a_trace_that_is_missing_is_an_error_naming_it() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["demo", "--trace", "nope.jsonl"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("nope.jsonl"), "{run}");
}

#[test]
fn output_path_that_is_a_file_is_one_error_line() {
    let sandbox = Sandbox::empty();
    sandbox.write("afile", "not a directory");
    let run = sandbox.run(&["demo", "--out", "afile"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().starts_with("creating afile: "), "{run}");
}
