//! `bstack bench`: the `plan` benches at a tiny scale print one JSON figure
//! per line with its baseline; unknown components and bad `--runs` or
//! `--scale` values are usage errors (exit 2); the cluster bench rolls a
//! tiny checkpoint out to four workers (in network namespaces as root, on
//! loopback otherwise).

use crate::common::Sandbox;

#[test]
fn plan_prints_one_json_figure_per_bench() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["bench", "plan", "--runs", "1", "--scale", "0.002"]);
    run.code(0).quiet_stderr();
    let figures = run.json_lines();

    let mut names = Vec::new();
    for figure in &figures {
        for key in [
            "bench",
            "n",
            "median_ms",
            "baseline",
            "baseline_ms",
            "ratio",
        ] {
            assert!(figure.get(key).is_some(), "{figure} lacks {key:?}{run}");
        }
        let name = figure["bench"]
            .as_str()
            .unwrap_or_else(|| panic!("{figure}: bench is not a string{run}"));
        names.push(name.to_owned());
        assert_eq!(figure["runs"], 1, "{run}");
        assert_eq!(figure["baseline"], "memcpy", "{run}");
        // 0.002 of the reference 20,000 tensors and 100,000 ops.
        let n = if name.starts_with("plan.manifest.") {
            40
        } else {
            200
        };
        assert_eq!(figure["n"], n, "{name}{run}");
        let number = |key: &str| {
            figure[key]
                .as_f64()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .unwrap_or_else(|| panic!("{name}: {key} is not a finite number >= 0{run}"))
        };
        let (median, baseline, ratio) =
            (number("median_ms"), number("baseline_ms"), number("ratio"));
        let expected = median / baseline.max(1e-9);
        assert!(
            (ratio - expected).abs() <= 1e-6 * expected.max(1.0),
            "{name}: ratio {ratio} is not median_ms / baseline_ms = {expected}{run}"
        );
    }

    let mut want = Vec::new();
    for contract in ["manifest", "cache_plan"] {
        for step in [
            "proto_encode",
            "proto_decode",
            "json_write",
            "json_read",
            "validate",
        ] {
            want.push(format!("plan.{contract}.{step}"));
        }
    }
    assert_eq!(names, want, "{run}");
    assert!(names.iter().any(|n| n == "plan.manifest.proto_decode"));
    assert!(names.iter().any(|n| n == "plan.cache_plan.json_read"));
}

/// The bwrt bench prints its three figures with their baselines: the
/// round trip against an atomic ping-pong, the ring's waves per second,
/// and GEMM GFLOP/s of a product checked against a naive reference.
#[test]
fn bwrt_bench_prints_round_trip_ring_and_gemm_figures() {
    let run = Sandbox::empty().run(&["bench", "bwrt", "--runs", "1", "--scale", "0.01"]);
    run.code(0);
    let figures = run.json_lines();
    let names: Vec<&str> = figures.iter().filter_map(|f| f["bench"].as_str()).collect();
    assert_eq!(
        names,
        [
            "bwrt.round_trip",
            "bwrt.ring_throughput",
            "bwrt.gemm_f32_1024",
            "bwrt.gemm_f32_1024_default_tile"
        ],
        "{run}"
    );
    assert_eq!(figures[0]["baseline"], "atomic_ping_pong", "{run}");
    assert!(
        figures[0]["median_us"].as_f64().unwrap_or(0.0) > 0.0,
        "{run}"
    );
    assert!(
        figures[1]["waves_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{run}"
    );
    for gemm in &figures[2..] {
        assert!(gemm["gflops"].as_f64().unwrap_or(0.0) > 0.0, "{run}");
        assert!(
            gemm["max_relative_error"].as_f64().unwrap_or(1.0) < 1e-4,
            "{run}"
        );
    }
}

#[test]
fn unknown_component_is_exit_2() {
    let run = Sandbox::empty().run(&["bench", "nosuch"]);
    run.code(2).quiet_stdout();
    assert_eq!(
        run.error_line(),
        "no benchmarks for \"nosuch\"; available: plan, hotweights, bcache, strata, datajax, bwrt, hotweights-cluster",
        "{run}"
    );
}

#[test]
fn runs_out_of_range_is_exit_2() {
    for runs in ["0", "1001", "18446744073709551615"] {
        let run = Sandbox::empty().run(&["bench", "plan", "--runs", runs]);
        run.code(2).quiet_stdout();
        assert_eq!(run.error_line(), "--runs must be 1 to 1000", "{run}");
    }
}

#[test]
fn scale_out_of_range_is_exit_2() {
    for scale in [
        "--scale=0",
        "--scale=-1",
        "--scale=NaN",
        "--scale=inf",
        "--scale=1e15",
    ] {
        let run = Sandbox::empty().run(&["bench", "plan", "--runs", "1", scale]);
        run.code(2).quiet_stdout();
        assert_eq!(
            run.error_line(),
            "--scale must be above 0 and at most 100",
            "{run}"
        );
    }
}

#[test]
fn hotweights_figures_come_with_their_limits() {
    let run = Sandbox::empty().run(&["bench", "hotweights", "--runs", "1", "--scale", "0.002"]);
    run.code(0);
    let figures = run.json_lines();
    let names: Vec<&str> = figures.iter().filter_map(|f| f["bench"].as_str()).collect();
    assert_eq!(
        names,
        [
            "hotweights.plan_10pct",
            "hotweights.plan_all",
            "hotweights.read_files",
            "hotweights.hash_in_memory",
            "hotweights.publish",
            "hotweights.commit_flip_1g",
            "hotweights.commit_flip_8g",
            "hotweights.sparse_delta_1pct",
        ],
        "{run}"
    );
    let by_name = |name: &str| &figures[names.iter().position(|n| *n == name).unwrap()];

    // Planning is pure computation: no baseline, but its memory and sizes.
    for (name, share) in [("hotweights.plan_10pct", 10), ("hotweights.plan_all", 1)] {
        let f = by_name(name);
        assert!(f["baseline"].is_null() && f["ratio"].is_null(), "{f}{run}");
        assert_eq!(f["n"], 2000, "{f}{run}");
        assert_eq!(f["chunks_changed"], 2000 / share, "{f}{run}");
        assert!(f["peak_rss_mib"].as_f64() > Some(0.0), "{f}{run}");
    }

    let ms = |name: &str| by_name(name)["median_ms"].as_f64().unwrap_or(f64::NAN);
    let publish = by_name("hotweights.publish");
    let limit = Some(ms("hotweights.read_files").max(ms("hotweights.hash_in_memory")));
    assert_eq!(publish["baseline_ms"].as_f64(), limit, "{run}");
    assert_eq!(
        publish["bytes"],
        by_name("hotweights.read_files")["bytes"],
        "{run}"
    );
    assert!(publish["bytes"].as_u64() > Some(1 << 20), "{run}");

    for name in ["hotweights.commit_flip_1g", "hotweights.commit_flip_8g"] {
        let f = by_name(name);
        assert_eq!(
            f["baseline"], "write + fsync + rename + fsync(dir)",
            "{f}{run}"
        );
        assert!(f["store_model_bytes"].as_u64() >= Some(8 << 20), "{f}{run}");
    }

    let sparse = by_name("hotweights.sparse_delta_1pct");
    let (full, delta) = (
        sparse["full_bytes"].as_u64().unwrap(),
        sparse["delta_bytes"].as_u64().unwrap(),
    );
    assert!(delta > 0 && delta < full, "{sparse}{run}");
}

#[test]
fn strata_figures_come_with_their_limits() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["bench", "strata", "--runs", "1", "--scale", "0.02"]);
    run.code(0);
    let figures = run.json_lines();
    let names: Vec<&str> = figures
        .iter()
        .map(|f| f["bench"].as_str().unwrap_or_default())
        .collect();
    for expected in [
        "strata.memory.put_get_16mib",
        "strata.memory.get_4kib_2threads",
        "strata.mmap.put_get_1mib",
        "strata.disk.put_seq",
        "strata.disk.get_seq",
        "strata.disk.reopen",
        "strata.remote.put_get_16mib",
        "strata.exec",
    ] {
        assert!(names.contains(&expected), "no {expected} in {names:?}{run}");
    }
    for f in &figures {
        let name = f["bench"].as_str().unwrap_or_default();
        assert!(f["median_ms"].as_f64().is_some_and(|v| v > 0.0), "{f}");
        let limitless = name.ends_with("reopen") || name.ends_with("get_4kib_2threads");
        assert_eq!(f["baseline"].is_null(), limitless, "{name}: {f}");
    }
}

#[test]
fn hotweights_cluster_rolls_out_to_every_worker() {
    let started = std::time::Instant::now();
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&[
        "bench",
        "hotweights-cluster",
        "--runs",
        "1",
        "--scale",
        "0.01",
    ]);
    run.code(0);
    let figures = run.json_lines();
    assert_eq!(figures.len(), 1, "{run}");
    let f = &figures[0];
    for key in [
        "bench",
        "n",
        "runs",
        "bytes",
        "median_ms",
        "baseline",
        "baseline_ms",
        "ratio",
        "workers",
        "network",
        "transfer_seconds",
        "broadcast_seconds",
        "flip_ms",
        "max_pause_ms",
        "per_worker_bytes",
        "all_committed",
    ] {
        assert!(f.get(key).is_some(), "{f} lacks {key:?}{run}");
    }
    assert_eq!(f["bench"], "hotweights_cluster.rollout", "{run}");
    assert_eq!(f["baseline"], "raw_tcp_one_receiver", "{run}");
    assert_eq!((&f["runs"], &f["workers"]), (&1.into(), &4.into()), "{run}");
    assert_eq!(f["all_committed"], true, "{run}");
    let network = f["network"].as_str().unwrap_or_default();
    assert!(
        network == "loopback" || network == "netns-tbf-1gbit",
        "network {network:?}{run}"
    );
    // About 20 MiB, 10 % of it staged.
    let staged = f["bytes"].as_u64().unwrap_or_default();
    assert!((1 << 20..4 << 20).contains(&staged), "staged {staged}{run}");
    let per_worker = f["per_worker_bytes"]
        .as_object()
        .unwrap_or_else(|| panic!("per_worker_bytes is not an object{run}"));
    assert_eq!(per_worker.len(), 4, "{run}");
    for (id, bytes) in per_worker {
        assert_eq!(bytes.as_u64(), Some(staged), "{id}{run}");
    }
    for key in [
        "median_ms",
        "baseline_ms",
        "ratio",
        "transfer_seconds",
        "broadcast_seconds",
        "flip_ms",
    ] {
        assert!(
            f[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0),
            "{key} is not a positive number{run}"
        );
    }
    assert!(
        f["max_pause_ms"].as_f64().is_some_and(|v| v >= 0.0),
        "{run}"
    );
    if network == "loopback" {
        assert!(run.stderr.contains("loopback"), "no note on stderr{run}");
    }
    eprintln!(
        "cluster bench took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
