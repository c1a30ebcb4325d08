//! `bstack plan validate`: every problem of an invalid file with its path
//! (exit 1), one-line causes for files that cannot be read (exit 2), `--kind`
//! for protobuf files, several files at once, and the `--json` form.

use serde_json::json;

use crate::common::{BROKEN, EXAMPLES, KINDS, Sandbox, check_problem, write_broken_plan};

#[test]
fn broken_plan_lists_every_problem_with_its_path() {
    let sandbox = Sandbox::with_examples();
    let expected = write_broken_plan(&sandbox);
    let run = sandbox.run(&["plan", "validate", BROKEN]);
    run.code(1).quiet_stderr();

    let lines = run.stdout_lines();
    assert_eq!(
        lines.len(),
        expected.len() + 1,
        "one line per problem and a count{run}"
    );
    for (line, want) in lines.iter().zip(&expected) {
        let rest = line
            .strip_prefix(&format!("{BROKEN}: "))
            .unwrap_or_else(|| panic!("{line:?} does not start with the file name{run}"));
        let (path, message) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("{line:?} is not `FILE: PATH: message`{run}"));
        check_problem(&run, (path, message), want);
    }
    assert_eq!(
        lines[expected.len()],
        format!("{BROKEN}: {} problems in this cache_plan", expected.len()),
        "count line{run}"
    );
}

#[test]
fn broken_plan_as_json_is_one_object_with_every_problem() {
    let sandbox = Sandbox::with_examples();
    let expected = write_broken_plan(&sandbox);
    let run = sandbox.run(&["--json", "plan", "validate", BROKEN]);
    run.code(1).quiet_stderr();

    let report = run.json();
    assert_eq!(report["file"], BROKEN, "{run}");
    assert_eq!(report["kind"], "cache_plan", "{run}");
    assert_eq!(report["valid"], false, "{run}");
    let problems = report["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("`problems` is not a list{run}"));
    assert_eq!(problems.len(), expected.len(), "{run}");
    for (problem, want) in problems.iter().zip(&expected) {
        let fields = problem
            .as_object()
            .unwrap_or_else(|| panic!("{problem} is not an object{run}"));
        let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["message", "path"], "{run}");
        let text = |key: &str| {
            problem[key]
                .as_str()
                .unwrap_or_else(|| panic!("{problem}: {key} is not a string{run}"))
                .to_owned()
        };
        check_problem(&run, (&text("path"), &text("message")), want);
    }
}

#[test]
fn a_valid_and_an_invalid_file_exit_1_and_report_both() {
    let sandbox = Sandbox::with_examples();
    let expected = write_broken_plan(&sandbox);
    let good = format!("{EXAMPLES}/cache_plan.json");
    let run = sandbox.run(&["plan", "validate", &good, BROKEN]);
    run.code(1).quiet_stderr();
    let lines = run.stdout_lines();
    assert_eq!(lines[0], format!("{good}: valid cache_plan"), "{run}");
    assert_eq!(lines.len(), 1 + expected.len() + 1, "{run}");
    assert!(
        lines[1..].iter().all(|l| l.starts_with("bad.json: ")),
        "{run}"
    );
}

#[test]
fn missing_file_is_one_error_line_naming_it() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["plan", "validate", "nope.json"]);
    run.code(2).quiet_stdout();
    let cause = run.error_line();
    assert!(cause.starts_with("nope.json: "), "{run}");
    assert!(cause.contains("No such file"), "{run}");
}

#[test]
fn truncated_protobuf_is_unreadable() {
    let sandbox = Sandbox::with_examples();
    let bytes = sandbox.read(&format!("{EXAMPLES}/cache_plan.pb"));
    // Byte 100 falls inside ops[0] (bytes 15..124 of the example plan), so the
    // cut leaves a length-delimited field short: a decode error, not a
    // shorter plan.
    assert!(
        bytes.len() > 124,
        "example cache_plan.pb is {} bytes",
        bytes.len()
    );
    sandbox.write("cut.cache_plan.pb", &bytes[..100]);
    let run = sandbox.run(&["plan", "validate", "cut.cache_plan.pb"]);
    run.code(2).quiet_stdout();
    let cause = run.error_line();
    assert!(
        cause.starts_with("cut.cache_plan.pb: not a valid cache_plan protobuf message"),
        "{run}"
    );
}

#[test]
fn unsupported_schema_version_is_unreadable() {
    let sandbox = Sandbox::with_examples();
    let mut plan = sandbox.read_json(&format!("{EXAMPLES}/cache_plan.json"));
    plan["schema_version"] = json!(2);
    sandbox.write_json("v2.json", &plan);
    let run = sandbox.run(&["plan", "validate", "v2.json"]);
    run.code(2).quiet_stdout();
    assert_eq!(
        run.error_line(),
        "v2.json: schema_version: 2 is not supported; this build reads version 1",
        "{run}"
    );
}

#[test]
fn unknown_field_names_its_path_and_line() {
    let sandbox = Sandbox::with_examples();
    let mut plan = sandbox.read_json(&format!("{EXAMPLES}/cache_plan.json"));
    plan["ops"][0]["lenght"] = json!(4096);
    let text = sandbox.write_json("typo.json", &plan);
    let line = 1 + text
        .lines()
        .position(|l| l.contains("\"lenght\""))
        .unwrap_or_else(|| panic!("the typo is not in {text}"));

    let run = sandbox.run(&["plan", "validate", "typo.json"]);
    run.code(2).quiet_stdout();
    let cause = run.error_line();
    assert!(
        cause.starts_with(&format!("typo.json:{line}:")),
        "expected line {line}{run}"
    );
    assert!(
        cause.contains(": ops[0].lenght: unknown field `lenght`"),
        "{run}"
    );
    assert!(
        cause.contains("`length`"),
        "should list the known fields{run}"
    );
}

#[test]
fn protobuf_without_kind_in_name_asks_for_kind() {
    let sandbox = Sandbox::with_examples();
    sandbox.write("x.bin", sandbox.read(&format!("{EXAMPLES}/cache_plan.pb")));
    let run = sandbox.run(&["plan", "validate", "x.bin"]);
    run.code(2).quiet_stdout();
    let cause = run.error_line();
    assert!(cause.starts_with("x.bin: "), "{run}");
    assert!(cause.contains("--kind"), "{run}");
    assert!(cause.contains("cache_plan"), "should list the kinds{run}");
}

#[test]
fn protobuf_with_neutral_name_validates_with_kind() {
    let sandbox = Sandbox::with_examples();
    sandbox.write("x.bin", sandbox.read(&format!("{EXAMPLES}/cache_plan.pb")));
    for kind in ["cache-plan", "cache_plan"] {
        let run = sandbox.run(&["plan", "validate", "--kind", kind, "x.bin"]);
        run.code(0).quiet_stderr();
        assert_eq!(run.stdout_lines(), ["x.bin: valid cache_plan"], "{run}");
    }
}

#[test]
fn kind_that_contradicts_the_json_is_unreadable() {
    let sandbox = Sandbox::with_examples();
    let file = format!("{EXAMPLES}/cache_plan.json");
    let run = sandbox.run(&["plan", "validate", "--kind", "swap-plan", &file]);
    run.code(2).quiet_stdout();
    assert_eq!(
        run.error_line(),
        format!("{file}: holds a cache_plan, but a swap_plan was expected"),
        "{run}"
    );
}

#[test]
fn unknown_kind_is_a_usage_error() {
    let sandbox = Sandbox::with_examples();
    let run = sandbox.run(&[
        "plan",
        "validate",
        "--kind",
        "bogus",
        &format!("{EXAMPLES}/cache_plan.pb"),
    ]);
    run.code(2).quiet_stdout();
    let first = run.stderr_lines()[0];
    assert!(first.starts_with("error: "), "{run}");
    assert!(first.contains("bogus"), "{run}");
    assert!(first.contains("weight_manifest"), "should list kinds{run}");
}

#[test]
fn one_missing_and_one_valid_exit_2_and_still_report_the_valid_one() {
    let sandbox = Sandbox::with_examples();
    let good = format!("{EXAMPLES}/cache_plan.json");
    let run = sandbox.run(&["plan", "validate", "nope.json", &good]);
    run.code(2);
    assert_eq!(
        run.stdout_lines(),
        [format!("{good}: valid cache_plan")],
        "{run}"
    );
    let errors = run.stderr_lines();
    assert!(
        errors.iter().all(|l| l.starts_with("error: ")),
        "every stderr line is an error line{run}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.starts_with("error: nope.json: ") && l.contains("No such file")),
        "the missing file is named{run}"
    );
    assert!(
        errors.contains(&"error: 1 of 2 files could not be read"),
        "{run}"
    );
}

#[test]
fn one_missing_and_one_valid_as_json() {
    let sandbox = Sandbox::with_examples();
    let good = format!("{EXAMPLES}/cache_plan.json");
    let run = sandbox.run(&["--json", "plan", "validate", "nope.json", &good]);
    run.code(2);
    let reports = run.json_lines();
    assert_eq!(reports.len(), 2, "{run}");
    assert_eq!(reports[0]["file"], "nope.json", "{run}");
    let error = reports[0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no `error` for the missing file{run}"));
    assert!(error.starts_with("nope.json: "), "{run}");
    assert_eq!(
        reports[1],
        json!({"file": good, "kind": "cache_plan", "valid": true, "problems": []}),
        "{run}"
    );
}

#[test]
fn every_example_file_validates_as_json() {
    let sandbox = Sandbox::with_examples();
    let files: Vec<(&str, String)> = KINDS
        .iter()
        .flat_map(|&k| {
            [
                (k, format!("{EXAMPLES}/{k}.json")),
                (k, format!("{EXAMPLES}/{k}.pb")),
            ]
        })
        .collect();
    let mut args = vec!["--json", "plan", "validate"];
    args.extend(files.iter().map(|(_, f)| f.as_str()));
    let run = sandbox.run(&args);
    run.code(0).quiet_stderr();
    let reports = run.json_lines();
    assert_eq!(reports.len(), files.len(), "{run}");
    for (report, (kind, file)) in reports.iter().zip(&files) {
        assert_eq!(
            *report,
            json!({"file": file, "kind": kind, "valid": true, "problems": []}),
            "{run}"
        );
    }
}
