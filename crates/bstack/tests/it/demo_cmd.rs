//! `bstack demo`: writes the ten contract files (every contract as JSON and
//! protobuf), byte-identical to the library's examples, that `plan validate`
//! accepts; its `--json` summary; and an output path it cannot create.

use bstack_plan::{Format, example};

use crate::common::{DEMO, KINDS, Sandbox};

/// The ten file names the demo writes, sorted.
fn demo_file_names() -> Vec<String> {
    let mut names: Vec<String> = KINDS
        .iter()
        .flat_map(|k| [format!("{k}.json"), format!("{k}.pb")])
        .collect();
    names.sort();
    names
}

#[test]
fn writes_ten_files_that_validate() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["demo", "--out", DEMO]);
    run.code(0).quiet_stderr();
    assert!(
        run.stdout.contains(&format!("wrote 10 files to {DEMO}")),
        "{run}"
    );
    for kind in KINDS {
        run.stdout_has(kind);
    }

    let mut names: Vec<String> = std::fs::read_dir(sandbox.path(DEMO))
        .unwrap_or_else(|e| panic!("listing {DEMO}: {e}{run}"))
        .map(|entry| entry.unwrap_or_else(|e| panic!("listing {DEMO}: {e}")))
        .filter(|entry| entry.path().is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, demo_file_names(), "{run}");

    let paths: Vec<String> = names.iter().map(|n| format!("{DEMO}/{n}")).collect();
    let mut args = vec!["plan", "validate"];
    args.extend(paths.iter().map(String::as_str));
    let run = sandbox.run(&args);
    run.code(0).quiet_stderr();
    let lines = run.stdout_lines();
    assert_eq!(lines.len(), 10, "{run}");
    for (line, path) in lines.iter().zip(&paths) {
        let kind = path
            .rsplit('/')
            .next()
            .and_then(|name| name.split('.').next())
            .unwrap_or_default();
        assert_eq!(*line, format!("{path}: valid {kind}"), "{run}");
    }
}

/// The cluster stage rolls the next version out through a coordinator, a
/// source and two worker processes: both workers end on v2, each received
/// the plan's bytes, and each reports the pause of its flip.
#[test]
fn cluster_stage_rolls_out_to_two_worker_processes() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["--json", "demo", "--out", DEMO]);
    run.code(0).quiet_stderr();
    let report = &run.json()["cluster"]["report"];
    assert_eq!(report["phase"], "committed", "{run}");
    assert_eq!(report["all_committed"], true, "{run}");
    let staged = report["staged_bytes"].as_u64().unwrap_or(0);
    assert!(staged > 0, "{run}");
    let consumers = report["consumers"].as_array().cloned().unwrap_or_default();
    assert_eq!(consumers.len(), 2, "{run}");
    for c in &consumers {
        assert_eq!(c["version"], "v2", "{run}");
        assert_eq!(c["bytes"].as_u64(), Some(staged), "{run}");
        assert!(c["pause_ns"].as_u64().unwrap_or(0) > 0, "{run}");
    }
    for rank in ["rank0", "rank1"] {
        let store = format!("{DEMO}/hotweights/cluster/{rank}");
        let status = sandbox.run(&["--json", "hw", "status", "--store", &store]);
        status.code(0);
        assert_eq!(status.json()["status"]["current"], "v2", "{status}");
    }
}

/// The hotweights stage leaves its manifests and plan (valid contracts), a
/// store whose current version is v1 after the rollback with v2 available,
/// and an export of v2.
#[test]
fn hotweights_stage_publishes_plans_applies_and_rolls_back() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["--json", "demo", "--out", DEMO]);
    run.code(0).quiet_stderr();
    let hw = &run.json()["hotweights"];
    assert_eq!(hw["export_identical"], true, "{run}");
    assert_eq!(hw["current"], "v1", "{run}");
    assert_eq!(hw["delta"]["tensors"]["added"]["count"], 1, "{run}");
    assert_eq!(hw["delta"]["tensors"]["removed"]["count"], 1, "{run}");
    let moved = hw["delta"]["bytes_changed"].as_u64().unwrap();
    let total = hw["delta"]["bytes_total"].as_u64().unwrap();
    assert!(moved > 0 && moved < total / 2, "{run}");
    // Sparse deltas beat whole chunks on the nudged layers.
    assert!(
        hw["wire"]["delta_bytes"].as_u64() < hw["wire"]["full_bytes"].as_u64(),
        "{run}"
    );

    let dir = format!("{DEMO}/hotweights");
    let files = [
        format!("{dir}/v1.weight_manifest.json"),
        format!("{dir}/v2.weight_manifest.json"),
        format!("{dir}/v1-v2.swap_plan.json"),
    ];
    let mut args = vec!["plan", "validate"];
    args.extend(files.iter().map(String::as_str));
    sandbox.run(&args).code(0);

    let store = format!("{dir}/store");
    let status = sandbox.run(&["--json", "hw", "status", "--store", &store]);
    status.code(0);
    let s = &status.json()["status"];
    assert_eq!(s["current"], "v1", "{status}");
    assert_eq!(s["versions"].as_array().map(Vec::len), Some(2), "{status}");
    assert_eq!(
        s["interrupted"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
}

#[test]
fn files_are_the_library_examples() {
    let sandbox = Sandbox::with_demo();
    for doc in example::all() {
        let kind = doc.kind().name();
        assert!(
            sandbox.read(&format!("{DEMO}/{kind}.json")) == doc.encode(Format::Json),
            "{kind}.json is not the example's JSON"
        );
        assert!(
            sandbox.read(&format!("{DEMO}/{kind}.pb")) == doc.encode(Format::Proto),
            "{kind}.pb is not the example's protobuf"
        );
    }
}

#[test]
fn json_summary_lists_five_contracts() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["--json", "demo", "--out", DEMO]);
    run.code(0).quiet_stderr();
    let summary = run.json();
    assert_eq!(summary["out"], DEMO, "{run}");
    let contracts = summary["contracts"]
        .as_array()
        .unwrap_or_else(|| panic!("`contracts` is not a list{run}"));
    assert_eq!(contracts.len(), 5, "{run}");
    for (entry, kind) in contracts.iter().zip(KINDS) {
        assert_eq!(entry["contract"], kind, "{run}");
        assert_eq!(entry["valid"], true, "{run}");
        assert!(
            entry["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{run}"
        );
        for (form, ext) in [("json", "json"), ("proto", "pb")] {
            let file = format!("{DEMO}/{kind}.{ext}");
            assert_eq!(entry[form]["file"], file, "{run}");
            assert_eq!(
                entry[form]["bytes"],
                sandbox.read(&file).len(),
                "{file}: size{run}"
            );
        }
    }
    // The bwrt stage ran the datajax stage's WaveSpec through the C ABI:
    // every wave completed, one swap landed in the window, and the swaps
    // outside it were refused and counted.
    let bwrt = &summary["bwrt"];
    let waves = bwrt["waves"].as_u64().unwrap_or_default();
    assert!(waves > 0, "{run}");
    let counters = &bwrt["counters"];
    assert_eq!(counters["waves_submitted"], waves, "{run}");
    assert_eq!(counters["waves_completed"], waves, "{run}");
    assert_eq!(counters["waves_failed"], 0, "{run}");
    assert_eq!(counters["swaps_applied"], 1, "{run}");
    assert!(
        counters["swap_window_violations"].as_u64().unwrap_or(0) >= 1,
        "{run}"
    );
    let steps = bwrt["steps"].to_string();
    assert!(steps.contains("refused"), "{run}");
}

#[test]
fn creates_nested_output_directories_and_reruns() {
    let sandbox = Sandbox::empty();
    sandbox.run(&["demo", "--out", "a/b/c"]).code(0);
    assert!(sandbox.exists("a/b/c/swap_plan.pb"));
    // A second run over the same directory replaces the files.
    sandbox.run(&["demo", "--out", "a/b/c"]).code(0);
    assert!(sandbox.exists("a/b/c/swap_plan.pb"));
}

#[test]
fn output_path_that_is_a_file_is_one_error_line() {
    let sandbox = Sandbox::empty();
    sandbox.write("afile", "not a directory");
    let run = sandbox.run(&["demo", "--out", "afile"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().starts_with("creating afile: "), "{run}");
}

#[test]
fn strata_stage_executes_the_plan_on_real_bytes() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["--json", "demo", "--out", DEMO]);
    run.code(0);
    let strata = &run.json()["strata"];
    let ops = strata["ops"].as_u64().unwrap_or_default();
    assert!(ops > 4, "the plan should keep four streams busy{run}");
    assert_eq!(strata["failed_ops"], 0, "{run}");
    // Every byte the planner issued was moved, and every moved page was
    // checked against the bytes stored at its source.
    assert_eq!(strata["done_bytes"], strata["planned_bytes"], "{run}");
    let pages = strata["verified_pages"].as_u64().unwrap_or_default();
    assert!(pages > 0, "{run}");
    assert_eq!(strata["hits_fed_back"], pages, "{run}");
    // The plan went through a file that validates.
    let check = sandbox.run(&[
        "plan",
        "validate",
        &format!("{DEMO}/strata/cache_plan.json"),
    ]);
    check.code(0);
}
