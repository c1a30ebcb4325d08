//! `bstack plan show`: the summary table and its `--json` form, for every
//! contract; figures checked against the library's example values.

use bstack_plan::example;
use serde_json::json;

use crate::common::{BROKEN, EXAMPLES, KINDS, Sandbox, write_broken_plan};

#[test]
fn cache_plan_table_shows_id_and_counts() {
    let sandbox = Sandbox::with_examples();
    let file = format!("{EXAMPLES}/cache_plan.json");
    let run = sandbox.run(&["plan", "show", &file]);
    run.code(0).quiet_stderr();
    let plan = example::cache_plan();
    assert_eq!(
        run.stdout_lines()[0],
        format!("{file} (cache_plan)"),
        "{run}"
    );
    run.stdout_has(&plan.plan_id)
        .stdout_has("ops")
        .stdout_has(&format!("{} (896.0 KiB)", plan.ops.len()))
        .stdout_has("H2D 2 (384.0 KiB), STORAGE2H 1 (512.0 KiB)")
        .stdout_has("problems")
        // The largest operation's note, from the table of operations.
        .stdout_has("prefetch for request r3, layer 1");
}

#[test]
fn cache_plan_json_has_kind_counts_and_no_problems() {
    let sandbox = Sandbox::with_examples();
    let plan = example::cache_plan();
    let bytes: u64 = plan.ops.iter().map(|o| o.length).sum();
    for file in ["cache_plan.json", "cache_plan.pb"] {
        let path = format!("{EXAMPLES}/{file}");
        let run = sandbox.run(&["--json", "plan", "show", &path]);
        run.code(0).quiet_stderr();
        let summary = run.json();
        assert_eq!(summary["file"], path, "{run}");
        assert_eq!(summary["kind"], "cache_plan", "{run}");
        assert_eq!(summary["problems"], 0, "{run}");
        assert_eq!(summary["plan"], plan.plan_id, "{run}");
        assert_eq!(
            summary["ops"],
            json!({"count": plan.ops.len(), "bytes": bytes}),
            "{run}"
        );
        assert_eq!(summary["evict"], plan.evict.len(), "{run}");
        assert_eq!(
            summary["window"],
            json!({"index": 0, "start_ns": 0, "end_ns": 20_000_000}),
            "{run}"
        );
    }
}

#[test]
fn every_contract_shows_in_both_forms() {
    let sandbox = Sandbox::with_examples();
    for kind in KINDS {
        for ext in ["json", "pb"] {
            let path = format!("{EXAMPLES}/{kind}.{ext}");
            let run = sandbox.run(&["--json", "plan", "show", &path]);
            run.code(0).quiet_stderr();
            let summary = run.json();
            assert_eq!(summary["kind"], kind, "{run}");
            assert_eq!(summary["problems"], 0, "{run}");

            let run = sandbox.run(&["plan", "show", &path]);
            run.code(0).quiet_stderr();
            assert_eq!(run.stdout_lines()[0], format!("{path} ({kind})"), "{run}");
        }
    }
}

#[test]
fn manifest_and_swap_plan_figures() {
    let sandbox = Sandbox::with_examples();
    let manifest = example::weight_manifest("v2");
    let run = sandbox.run(&[
        "--json",
        "plan",
        "show",
        &format!("{EXAMPLES}/weight_manifest.json"),
    ]);
    run.code(0);
    let summary = run.json();
    assert_eq!(summary["model"], manifest.model_id, "{run}");
    assert_eq!(summary["version"], "v2", "{run}");
    assert_eq!(summary["hash"], "BLAKE3", "{run}");
    assert_eq!(summary["tensors"]["count"], manifest.tensors.len(), "{run}");

    let plan = example::swap_plan();
    let run = sandbox.run(&[
        "--json",
        "plan",
        "show",
        &format!("{EXAMPLES}/swap_plan.pb"),
    ]);
    run.code(0);
    let summary = run.json();
    assert_eq!(summary["plan"], plan.plan_id, "{run}");
    assert_eq!(summary["digest"], plan.digest, "{run}");
    assert_eq!(summary["buckets"]["count"], plan.buckets.len(), "{run}");

    let run = sandbox.run(&["plan", "show", &format!("{EXAMPLES}/swap_plan.pb")]);
    run.code(0).stdout_has("(matches)");
}

/// A plan that names the old version without its entries (as `hw plan`
/// writes them) has no delta to show: it must not call every tensor added.
#[test]
fn swap_plan_with_the_old_version_named_only_shows_no_delta() {
    let sandbox = Sandbox::with_examples();
    let mut plan = sandbox.read_json(&format!("{EXAMPLES}/swap_plan.json"));
    plan["from"]["tensors"] = serde_json::json!([]);
    plan["from"]["files"] = serde_json::json!([]);
    sandbox.write("named.swap_plan.json", plan.to_string());
    let run = sandbox.run(&["--json", "plan", "show", "named.swap_plan.json"]);
    run.code(0);
    let summary = run.json();
    assert!(summary.get("tensors").is_none(), "{run}");
    assert!(summary["delta"].is_null(), "{run}");
    let run = sandbox.run(&["plan", "show", "named.swap_plan.json"]);
    run.code(0).stdout_has("without its entries");
    assert!(!run.stdout.contains(" added"), "{run}");
}

#[test]
fn wave_spec_figures_include_its_prefix_statistics() {
    let sandbox = Sandbox::with_examples();
    let spec = example::wave_spec();
    let deepest = spec.prefix_histogram.last().map(|d| d.depth);
    let run = sandbox.run(&[
        "--json",
        "plan",
        "show",
        &format!("{EXAMPLES}/wave_spec.pb"),
    ]);
    run.code(0);
    let summary = run.json();
    assert_eq!(summary["cohorts"], spec.cohorts.len(), "{run}");
    assert_eq!(
        summary["prefix_histogram"],
        json!({"depths": spec.prefix_histogram.len(), "deepest": deepest}),
        "{run}"
    );

    let run = sandbox.run(&["plan", "show", &format!("{EXAMPLES}/wave_spec.json")]);
    run.code(0)
        .stdout_has("cohorts")
        .stdout_has("3 depths, deepest 12 blocks");
}

#[test]
fn top_limits_the_table_of_operations() {
    let sandbox = Sandbox::with_examples();
    let file = format!("{EXAMPLES}/cache_plan.json");
    let run = sandbox.run(&["plan", "show", "--top", "1", &file]);
    run.code(0).stdout_has("prefetch for request r3, layer 1");
    assert!(
        !run.stdout.contains("request r1"),
        "--top 1 shows only the largest op{run}"
    );
    let run = sandbox.run(&["plan", "show", "--top", "0", &file]);
    run.code(0);
    assert!(!run.stdout.contains("request r"), "--top 0: no table{run}");
}

#[test]
fn invalid_plan_shows_its_problem_count() {
    // `show` summarises; it does not gate on validity (exit 0).
    let sandbox = Sandbox::with_examples();
    let expected = write_broken_plan(&sandbox);
    let run = sandbox.run(&["--json", "plan", "show", BROKEN]);
    run.code(0).quiet_stderr();
    assert_eq!(run.json()["problems"], expected.len(), "{run}");
}

#[test]
fn unreadable_file_is_one_error_line() {
    let sandbox = Sandbox::with_examples();
    let run = sandbox.run(&["plan", "show", "nope.json"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().starts_with("nope.json: "), "{run}");

    sandbox.write("x.bin", sandbox.read(&format!("{EXAMPLES}/cache_plan.pb")));
    let run = sandbox.run(&["plan", "show", "x.bin"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("--kind"), "{run}");
    sandbox
        .run(&["plan", "show", "--kind", "cache-plan", "x.bin"])
        .code(0)
        .stdout_has("demo-window-0");
}

#[test]
fn totals_past_u64_saturate_instead_of_overflowing() {
    // Valid plans can hold figures whose sum does not fit in 64 bits.
    let sandbox = Sandbox::with_examples();
    let mut plan = sandbox.read_json(&format!("{EXAMPLES}/cache_plan.json"));
    for op in plan["ops"].as_array_mut().into_iter().flatten() {
        op["length"] = json!(1u64 << 63);
        op["dst_offset"] = json!(0);
    }
    plan["ops"][1]["dst"] = json!("tier://node1/gpu0");
    plan["ops"][2]["dst"] = json!("tier://node2/cpu");
    // A run of pages that reaches the last page id, on a tier of its own.
    plan["evict"][0]["count"] = json!(u64::MAX - 7);
    plan["evict"][0]["location"] = json!("tier://node9/ssd");
    plan["evict"][1]["count"] = json!(u64::MAX - 20);
    plan["evict"][1]["location"] = json!("tier://node8/ssd");
    sandbox.write_json("huge.json", &plan);
    sandbox.run(&["plan", "validate", "huge.json"]).code(0);
    let run = sandbox.run(&["--json", "plan", "show", "huge.json"]);
    run.code(0).quiet_stderr();
    let summary = run.json();
    assert_eq!(summary["ops"]["bytes"], json!(u64::MAX), "{run}");
    assert_eq!(summary["evict"], json!(u64::MAX), "{run}");
}
