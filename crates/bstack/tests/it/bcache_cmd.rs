//! `bstack bcache plan | sim | tune | config` on small inputs written by the
//! tests; bad input exits 2 with a message naming the place.

use crate::common::Sandbox;

/// A Mooncake-format trace: 60 requests in 6 conversations that grow.
fn write_trace(sandbox: &Sandbox, rel: &str) {
    let mut text = String::new();
    for i in 0..60u64 {
        let conv = i % 6;
        let turns = i / 6 + 1;
        let blocks: Vec<String> = std::iter::once(0)
            .chain((0..turns * 2).map(|t| 1 + conv * 1000 + t))
            .map(|b| b.to_string())
            .collect();
        text.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": 10, \"hash_ids\": [{}]}}\n",
            i * 200,
            blocks.len() * 512,
            blocks.join(", ")
        ));
    }
    sandbox.write(rel, text);
}

const SMALL: &[&str] = &[
    "--layers",
    "4",
    "--kv-heads",
    "1",
    "--head-dim",
    "128",
    "--gpu-gib",
    "0.01",
    "--cpu-gib",
    "0.02",
    "--ssd-gib",
    "0.05",
    "--nodes",
    "2",
];

#[test]
fn sim_writes_tables_files_and_charts() {
    let sandbox = Sandbox::empty();
    write_trace(&sandbox, "t.jsonl");
    let mut args = vec!["bcache", "sim", "--trace", "t.jsonl", "-o", "sim"];
    args.extend_from_slice(SMALL);
    let run = sandbox.run(&args);
    run.code(0)
        .stdout_has("60 requests")
        .stdout_has("belady")
        .stdout_has("bcache");
    for f in [
        "sim/sim.json",
        "sim/sim.csv",
        "sim/hit_rate_vs_capacity.svg",
        "sim/ttft_cdf.svg",
    ] {
        assert!(sandbox.path(f).exists(), "{f} missing{run}");
    }
    let svg = String::from_utf8(sandbox.read("sim/hit_rate_vs_capacity.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("belady") && svg.contains("lru"));
    let report = sandbox.read_json("sim/sim.json");
    assert_eq!(report["requests"], 60);
    assert_eq!(
        report["results"].as_array().unwrap().len(),
        12,
        "4 policies x 3 sizes"
    );
    let csv = String::from_utf8(sandbox.read("sim/sim.csv")).unwrap();
    assert_eq!(csv.lines().count(), 13);

    let mut args = vec![
        "--json", "bcache", "sim", "--trace", "t.jsonl", "-o", "sim2",
    ];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--policies", "lru,bcache", "--capacity-scales", "1"]);
    let run = sandbox.run(&args);
    run.code(0);
    let v = run.json();
    assert_eq!(v["results"].as_array().unwrap().len(), 2, "{run}");
}

#[test]
fn bad_trace_lines_stop_the_replay_or_are_skipped() {
    let sandbox = Sandbox::empty();
    write_trace(&sandbox, "t.jsonl");
    let mut text = String::from_utf8(sandbox.read("t.jsonl")).unwrap();
    text.push_str("{\"timestamp\": 1, \"input_length\": 0, \"hash_ids\": [1]}\n");
    sandbox.write("bad.jsonl", text);
    let run = sandbox.run(&["bcache", "sim", "--trace", "bad.jsonl", "-o", "s"]);
    run.code(2);
    assert!(run.error_line().contains("bad.jsonl:61"), "{run}");
    let mut args = vec![
        "bcache",
        "sim",
        "--trace",
        "bad.jsonl",
        "--skip-bad",
        "-o",
        "s",
    ];
    args.extend_from_slice(SMALL);
    sandbox.run(&args).code(0).stdout_has("60 requests");
    let run = sandbox.run(&["bcache", "sim", "--trace", "missing.jsonl"]);
    run.code(2);
    assert!(run.error_line().contains("missing.jsonl"), "{run}");
}

#[test]
fn tune_ranks_a_grid_and_writes_the_best_config() {
    let sandbox = Sandbox::empty();
    write_trace(&sandbox, "t.jsonl");
    let mut args = vec![
        "bcache",
        "tune",
        "--trace",
        "t.jsonl",
        "-o",
        "tune",
        "--grid",
        "planner.window_ms=10,40",
        "--grid",
        "sim.prefetch_lookahead=1,8",
    ];
    args.extend_from_slice(SMALL);
    let run = sandbox.run(&args);
    run.code(0)
        .stdout_has("planner.window_ms")
        .stdout_has("objective");
    let csv = String::from_utf8(sandbox.read("tune/sweep.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "header and 4 points");
    // The best configuration reads back, with the small model kept.
    let best = String::from_utf8(sandbox.read("tune/best.yaml")).unwrap();
    let config = bcache::Config::from_yaml(&best, "best.yaml").unwrap();
    assert_eq!(config.sim.layers, 4);
    assert!([10.0, 40.0].contains(&config.planner.window_ms));
    let run = sandbox.run(&[
        "bcache",
        "tune",
        "--trace",
        "t.jsonl",
        "--grid",
        "planner.nope=1",
    ]);
    run.code(2);
    assert!(run.error_line().contains("planner.nope"), "{run}");
}

#[test]
fn config_prints_effective_yaml_docs_and_rejects_unknown_keys() {
    let sandbox = Sandbox::empty();
    sandbox.write("c.yaml", "planner:\n  window_ms: 5\n");
    let run = sandbox.run(&["bcache", "config", "--config", "c.yaml", "--alpha", "2"]);
    run.code(0)
        .stdout_has("window_ms: 5.0")
        .stdout_has("alpha: 2.0");
    sandbox
        .run(&["bcache", "config", "--docs"])
        .code(0)
        .stdout_has("| `planner.window_ms` | `--window-ms` | `20.0` |");
    sandbox.write("bad.yaml", "planner:\n  windw_ms: 5\n");
    let run = sandbox.run(&["bcache", "config", "--config", "bad.yaml"]);
    run.code(2);
    assert!(
        run.error_line().contains("bad.yaml") && run.error_line().contains("windw_ms"),
        "{run}"
    );
    let run = sandbox.run(&["bcache", "config", "--nodes", "many"]);
    run.code(2);
    assert!(run.error_line().contains("sim.nodes"), "{run}");
}

#[test]
fn plan_writes_a_valid_cache_plan_and_keeps_state() {
    let sandbox = Sandbox::empty();
    sandbox.write(
        "w.json",
        r#"{"now_ns": 0, "nodes": [{"name": "node0", "tiers": [
            {"tier": "gpu", "capacity_bytes": 1073741824, "free_bytes": 1073741824, "bandwidth_bytes_per_s": 50000000000},
            {"tier": "cpu", "capacity_bytes": 8589934592, "free_bytes": 8589934592, "bandwidth_bytes_per_s": 25000000000}]}],
          "tenants": [{"name": "a", "rate_bytes_per_s": 1000000, "burst_bytes": 1000000}],
          "requests": [
            {"id": "r1", "node": "node0", "tenant": "a", "pages": [1, 2, 3], "src": "cpu", "dst": "gpu", "deadline_ns": 5000000, "page_bytes": 65536},
            {"id": "r2", "node": "node0", "tenant": "a", "pages": [2, 3, 4], "src": "cpu", "dst": "gpu", "deadline_ns": 9000000, "page_bytes": 65536},
            {"id": "r3", "node": "node0", "tenant": "a", "pages": [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55], "src": "cpu", "dst": "gpu", "deadline_ns": 90000000, "page_bytes": 65536}]}"#,
    );
    let run = sandbox.run(&[
        "bcache",
        "plan",
        "--input",
        "w.json",
        "--state",
        "s.json",
        "-o",
        "p.json",
        "--min-io-bytes",
        "0",
    ]);
    run.code(0)
        .stdout_has("deferred for tenant credit: r3")
        .stdout_has("wrote p.json");
    sandbox.run(&["plan", "validate", "p.json"]).code(0);
    let plan = sandbox.read_json("p.json");
    assert_eq!(
        plan["ops"][0]["length"],
        4 * 65536,
        "pages 1-4 once, shared 2-3 not twice"
    );
    let state = sandbox.read_json("s.json");
    assert_eq!(state["windows"], 1);
    assert!(!state["heat"].as_array().unwrap().is_empty());
    sandbox.write("s.json", "not json");
    let run = sandbox.run(&["bcache", "plan", "--input", "w.json", "--state", "s.json"]);
    run.code(2);
    assert!(run.error_line().contains("s.json"), "{run}");
}

#[test]
fn plan_prints_route_hints_for_prefix_clusters() {
    let sandbox = Sandbox::empty();
    let tier = |name: &str, resident: &str| {
        format!(
            r#"{{"tier": "{name}", "capacity_bytes": 8589934592, "free_bytes": 4294967296, "bandwidth_bytes_per_s": 25000000000, "resident": [{resident}]}}"#
        )
    };
    let node = |name: &str, resident: &str| {
        format!(
            r#"{{"name": "{name}", "tiers": [{}, {}]}}"#,
            tier("gpu", ""),
            tier("cpu", resident)
        )
    };
    let held = r#"{"page": 1, "bytes": 65536}, {"page": 2, "bytes": 65536}"#;
    let tokens: Vec<String> = (0..64).map(|t| t.to_string()).collect();
    let tokens = tokens.join(", ");
    let request = |id: &str, node: &str, pages: &str, tokens: &str| {
        format!(
            r#"{{"id": "{id}", "node": "{node}", "pages": [{pages}], "src": "cpu", "dst": "gpu", "deadline_ns": 5000000, "page_bytes": 65536, "tokens": [{tokens}]}}"#
        )
    };
    sandbox.write(
        "w.json",
        format!(
            r#"{{"now_ns": 0, "nodes": [{}, {}], "requests": [{}, {}, {}]}}"#,
            node("a", ""),
            node("b", held),
            request("r1", "a", "1, 2, 3", &tokens),
            request("r2", "a", "1, 2, 4", &tokens),
            request("r3", "b", "9", "7, 7, 7, 7, 7"),
        ),
    );
    let run = sandbox.run(&[
        "bcache",
        "plan",
        "--input",
        "w.json",
        "--route-hints",
        "true",
    ]);
    run.code(0).stdout_has("route hints");
    let row = run
        .stdout_lines()
        .into_iter()
        .find(|l| l.contains("r1"))
        .unwrap_or_else(|| panic!("no hint row for r1{run}"))
        .to_owned();
    let cells: Vec<&str> = row
        .split(['│', '┆', '|'])
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells, ["0", "2", "r1", "b", "2", "1"], "{run}");

    let run = sandbox.run(&[
        "--json",
        "bcache",
        "plan",
        "--input",
        "w.json",
        "--route-hints",
        "true",
    ]);
    let hints = run.code(0).json()["report"]["route_hints"].clone();
    assert_eq!(hints[0]["requests"], serde_json::json!([0, 1]), "{run}");
    assert_eq!(hints[0]["node"], "b", "{run}");

    // Off by default.
    let run = sandbox.run(&["bcache", "plan", "--input", "w.json"]);
    run.code(0);
    assert!(!run.stdout.contains("route hints"), "{run}");
}
