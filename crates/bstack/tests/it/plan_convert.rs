//! `bstack plan convert`: JSON -> protobuf -> JSON is byte-identical for every
//! contract, converting does not validate (an invalid plan converts, with a
//! warning, and its problems survive), and unreadable input writes nothing.

use crate::common::{BROKEN, EXAMPLES, KINDS, Sandbox, write_broken_plan};

#[test]
fn cache_plan_round_trips_byte_for_byte() {
    let sandbox = Sandbox::with_examples();
    let original = format!("{EXAMPLES}/cache_plan.json");

    let run = sandbox.run(&[
        "plan",
        "convert",
        &original,
        "--to",
        "proto",
        "-o",
        "X.cache_plan.pb",
    ]);
    run.code(0).quiet_stderr();
    assert!(
        run.stdout
            .starts_with("wrote X.cache_plan.pb (cache_plan, "),
        "{run}"
    );
    assert_eq!(
        sandbox.read("X.cache_plan.pb"),
        sandbox.read(&format!("{EXAMPLES}/cache_plan.pb")),
        "the protobuf written by convert differs from the example's{run}"
    );

    let run = sandbox.run(&[
        "plan",
        "convert",
        "X.cache_plan.pb",
        "--to",
        "json",
        "-o",
        "back.json",
    ]);
    run.code(0).quiet_stderr();
    assert!(
        run.stdout.starts_with("wrote back.json (cache_plan, "),
        "{run}"
    );
    assert!(
        sandbox.read("back.json") == sandbox.read(&original),
        "back.json differs from {original}:\n{}\n---\n{}",
        String::from_utf8_lossy(&sandbox.read("back.json")),
        String::from_utf8_lossy(&sandbox.read(&original)),
    );
}

#[test]
fn every_contract_round_trips_byte_for_byte() {
    let sandbox = Sandbox::with_examples();
    for kind in KINDS {
        let original = format!("{EXAMPLES}/{kind}.json");
        let proto = format!("rt.{kind}.pb");
        let back = format!("rt.{kind}.json");
        sandbox
            .run(&["plan", "convert", &original, "--to", "proto", "-o", &proto])
            .code(0);
        sandbox
            .run(&["plan", "convert", &proto, "--to", "json", "-o", &back])
            .code(0);
        assert!(
            sandbox.read(&back) == sandbox.read(&original),
            "{kind}: JSON -> protobuf -> JSON changed the file"
        );
        assert!(
            sandbox.read(&proto) == sandbox.read(&format!("{EXAMPLES}/{kind}.pb")),
            "{kind}: convert's protobuf differs from the example's"
        );
    }
}

#[test]
fn neutral_protobuf_name_converts_with_kind() {
    let sandbox = Sandbox::with_examples();
    sandbox.write("x.bin", sandbox.read(&format!("{EXAMPLES}/wave_spec.pb")));
    let args = ["plan", "convert", "x.bin", "--to", "json", "-o", "w.json"];
    let run = sandbox.run(&args);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("--kind"), "{run}");
    assert!(
        !sandbox.exists("w.json"),
        "nothing is written on error{run}"
    );

    let mut with_kind = args.to_vec();
    with_kind.extend(["--kind", "wave-spec"]);
    sandbox.run(&with_kind).code(0);
    assert!(sandbox.read("w.json") == sandbox.read(&format!("{EXAMPLES}/wave_spec.json")));
}

#[test]
fn invalid_plan_still_converts_and_keeps_its_problems() {
    let sandbox = Sandbox::with_examples();
    let expected = write_broken_plan(&sandbox);
    let run = sandbox.run(&[
        "plan",
        "convert",
        BROKEN,
        "--to",
        "proto",
        "-o",
        "bad.cache_plan.pb",
    ]);
    run.code(0);
    assert!(run.stdout.starts_with("wrote bad.cache_plan.pb"), "{run}");
    assert!(
        run.stderr.contains(&format!(
            "{BROKEN} has {} problems; `bstack plan validate` lists them",
            expected.len()
        )),
        "convert should warn about the problems{run}"
    );

    // The protobuf holds the same mistakes, kind 42 included.
    let run = sandbox.run(&["plan", "validate", "bad.cache_plan.pb"]);
    run.code(1);
    let paths: Vec<&str> = run
        .stdout_lines()
        .iter()
        .filter_map(|l| l.strip_prefix("bad.cache_plan.pb: "))
        .filter_map(|l| l.split_once(": ").map(|(path, _)| path))
        .collect();
    let want: Vec<&str> = expected.iter().map(|(path, _)| *path).collect();
    assert_eq!(paths, want, "{run}");
    assert!(
        run.stdout
            .contains("bad.cache_plan.pb: ops[0].kind: unknown transfer kind 42"),
        "{run}"
    );

    // And converts back to the same JSON value.
    sandbox
        .run(&[
            "plan",
            "convert",
            "bad.cache_plan.pb",
            "--to",
            "json",
            "-o",
            "bad-back.json",
        ])
        .code(0);
    assert_eq!(
        sandbox.read_json("bad-back.json"),
        sandbox.read_json(BROKEN)
    );
}

#[test]
fn quiet_silences_the_warning() {
    let sandbox = Sandbox::with_examples();
    write_broken_plan(&sandbox);
    let run = sandbox.run(&[
        "-q", "plan", "convert", BROKEN, "--to", "proto", "-o", "q.pb",
    ]);
    run.code(0).quiet_stderr();
    assert!(sandbox.exists("q.pb"), "{run}");
}

#[test]
fn json_output_describes_the_written_file() {
    let sandbox = Sandbox::with_examples();
    let run = sandbox.run(&[
        "--json",
        "plan",
        "convert",
        &format!("{EXAMPLES}/swap_plan.json"),
        "--to",
        "proto",
        "-o",
        "s.pb",
    ]);
    run.code(0).quiet_stderr();
    let report = run.json();
    let size = sandbox.read("s.pb").len();
    assert_eq!(
        report,
        serde_json::json!({"file": "s.pb", "kind": "swap_plan", "format": "proto", "bytes": size}),
        "{run}"
    );
}

#[test]
fn missing_input_writes_nothing() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&[
        "plan",
        "convert",
        "nope.json",
        "--to",
        "proto",
        "-o",
        "z.pb",
    ]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().starts_with("nope.json: "), "{run}");
    assert!(!sandbox.exists("z.pb"), "{run}");
}

#[test]
fn convert_requires_to_and_output() {
    let sandbox = Sandbox::with_examples();
    let file = format!("{EXAMPLES}/cache_plan.json");
    for args in [
        vec!["plan", "convert", &file, "-o", "z.pb"],
        vec!["plan", "convert", &file, "--to", "proto"],
        vec!["plan", "convert", &file, "--to", "yaml", "-o", "z.pb"],
    ] {
        let run = sandbox.run(&args);
        run.code(2).quiet_stdout();
        assert!(run.stderr.starts_with("error: "), "{run}");
        assert!(!sandbox.exists("z.pb"), "{run}");
    }
}
