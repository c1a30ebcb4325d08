//! `bstack plan examples`: the ten example files (every contract as JSON
//! and protobuf), byte-identical to the library's examples, that `plan
//! validate` accepts; its `--json` summary; an output path it cannot create.

use bstack_plan::{Format, example};

use crate::common::{EXAMPLES, KINDS, Sandbox};

/// The ten file names `plan examples` writes, sorted.
fn example_file_names() -> Vec<String> {
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
    let run = sandbox.run(&["plan", "examples", "-o", EXAMPLES]);
    run.code(0).quiet_stderr();
    assert!(
        run.stdout
            .contains(&format!("wrote 10 files to {EXAMPLES}")),
        "{run}"
    );
    for kind in KINDS {
        run.stdout_has(kind);
    }

    let mut names: Vec<String> = std::fs::read_dir(sandbox.path(EXAMPLES))
        .unwrap_or_else(|e| panic!("listing {EXAMPLES}: {e}{run}"))
        .map(|entry| entry.unwrap_or_else(|e| panic!("listing {EXAMPLES}: {e}")))
        .filter(|entry| entry.path().is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, example_file_names(), "{run}");

    let paths: Vec<String> = names.iter().map(|n| format!("{EXAMPLES}/{n}")).collect();
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

#[test]
fn files_are_the_library_examples() {
    let sandbox = Sandbox::with_examples();
    for doc in example::all() {
        let kind = doc.kind().name();
        assert!(
            sandbox.read(&format!("{EXAMPLES}/{kind}.json")) == doc.encode(Format::Json),
            "{kind}.json is not the example's JSON"
        );
        assert!(
            sandbox.read(&format!("{EXAMPLES}/{kind}.pb")) == doc.encode(Format::Proto),
            "{kind}.pb is not the example's protobuf"
        );
    }
}

#[test]
fn json_summary_lists_five_contracts() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["--json", "plan", "examples", "--output", EXAMPLES]);
    run.code(0).quiet_stderr();
    let summary = run.json();
    assert_eq!(summary["out"], EXAMPLES, "{run}");
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
            let file = format!("{EXAMPLES}/{kind}.{ext}");
            assert_eq!(entry[form]["file"], file, "{run}");
            assert_eq!(
                entry[form]["bytes"],
                sandbox.read(&file).len(),
                "{file}: size{run}"
            );
        }
    }
}

#[test]
fn creates_nested_directories_and_replaces_files() {
    let sandbox = Sandbox::empty();
    sandbox.run(&["plan", "examples", "-o", "a/b/c"]).code(0);
    sandbox.write("a/b/c/swap_plan.pb", "stale");
    sandbox.run(&["plan", "examples", "-o", "a/b/c"]).code(0);
    assert!(sandbox.read("a/b/c/swap_plan.pb") != b"stale".to_vec());
}

#[test]
fn output_path_that_is_a_file_is_one_error_line() {
    let sandbox = Sandbox::empty();
    sandbox.write("afile", "not a directory");
    let run = sandbox.run(&["plan", "examples", "-o", "afile"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().starts_with("creating afile: "), "{run}");
}
