//! `bstack bwrt`: capabilities and GEMM waves through the C ABI, from a
//! WaveSpec file, and the errors a user meets.

use crate::common::Sandbox;

/// A WaveSpec with 32 x 16 x 8 tiles in `dtype`, the window [1, 3).
fn spec(dtype: &str) -> String {
    format!(
        r#"{{"kind": "wave_spec", "schema_version": 1, "bm": 32, "bn": 16, "bk": 8,
            "swap_begin": 1, "swap_end": 3, "num_waves": 10, "dtype": "{dtype}"}}"#
    )
}

#[test]
fn caps_lists_the_abi_and_the_dtypes() {
    let s = Sandbox::empty();
    let run = s.run(&["--json", "bwrt", "caps"]);
    run.code(0).quiet_stderr();
    let v = run.json();
    assert_eq!(v["abi_version"], 1, "{run}");
    assert_eq!(v["backend"], "cpu", "{run}");
    assert_eq!(
        v["dtypes"],
        serde_json::json!(["F32", "F16", "BF16"]),
        "{run}"
    );
    s.run(&["bwrt", "caps"]).code(0).stdout_has("swap-queue");
    // This binary is built without bwrt's `cuda` feature.
    assert_eq!(v["backends"], serde_json::json!(["cpu"]), "{run}");
    assert_eq!(v["cuda_devices"], 0, "{run}");
}

/// Asking for the CUDA backend in a build without it is one error line
/// that says how to get it.
#[test]
fn the_cuda_backend_in_a_build_without_it_says_how_to_get_it() {
    let s = Sandbox::empty();
    let run = s.run(&[
        "bwrt",
        "run",
        "--backend",
        "cuda",
        "--m",
        "4",
        "--n",
        "4",
        "--k",
        "4",
    ]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("no CUDA backend"), "{run}");
    assert!(run.error_line().contains("--features cuda"), "{run}");
}

#[test]
fn run_takes_tile_and_dtype_from_the_wavespec_and_checks_the_product() {
    let s = Sandbox::empty();
    for dtype in ["F32", "F16", "BF16"] {
        s.write("w.json", spec(dtype));
        // Sizes that are not multiples of the tile.
        let run = s.run(&[
            "--json",
            "bwrt",
            "run",
            "--wave",
            "w.json",
            "--m",
            "70",
            "--n",
            "33",
            "--k",
            "29",
            "--waves",
            "5",
            "--workers",
            "2",
        ]);
        run.code(0).quiet_stderr();
        let v = run.json();
        assert_eq!(v["dtype"], dtype, "{run}");
        assert_eq!(v["tile"], serde_json::json!([32, 16, 8]), "{run}");
        let err = v["max_relative_error"].as_f64().unwrap_or(f64::MAX);
        assert!(err <= v["tolerance"].as_f64().unwrap_or(0.0), "{run}");
        let c = &v["counters"];
        assert_eq!(c["waves_submitted"], 5, "{run}");
        assert_eq!(c["waves_completed"], 5, "{run}");
        assert_eq!(c["waves_failed"], 0, "{run}");
        assert_eq!(c["flops"], 5 * 2 * 70 * 33 * 29, "{run}");
    }
    // The human form prints the check and the counters.
    s.run(&["bwrt", "run", "--m", "8", "--n", "8", "--k", "8"])
        .code(0)
        .stdout_has("naive reference")
        .stdout_has("waves completed");
}

#[test]
fn bad_wavespecs_and_arguments_are_one_error_line() {
    let s = Sandbox::empty();
    let run = s.run(&["bwrt", "run", "--wave", "missing.json"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("missing.json"), "{run}");

    s.write("w.json", spec("F64"));
    let run = s.run(&["bwrt", "run", "--wave", "w.json"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("F64"), "{run}");

    s.write("w.json", spec("F32").replace("\"bm\": 32", "\"bm\": 0"));
    let run = s.run(&["bwrt", "run", "--wave", "w.json"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("bm"), "{run}");

    let run = s.run(&["bwrt", "run", "--waves", "0"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("--waves"), "{run}");

    // The runtime refuses 0 workers through the ABI, with its own message.
    let run = s.run(&["bwrt", "run", "--workers", "0"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("workers"), "{run}");
}
