//! The command line as a whole: help and version on stdout with exit 0,
//! usage errors on stderr with exit 2, and a failed write to stdout.

use crate::common::{EXAMPLES, Sandbox};

#[test]
fn help_goes_to_stdout() {
    let sandbox = Sandbox::empty();
    let run = sandbox.run(&["--help"]);
    run.code(0).quiet_stderr();
    run.stdout_has("Usage: bstack")
        .stdout_has("plan")
        .stdout_has("demo")
        .stdout_has("bench")
        .stdout_has("--json");

    let run = sandbox.run(&["plan", "validate", "--help"]);
    run.code(0).quiet_stderr();
    run.stdout_has("Usage: bstack plan validate")
        .stdout_has("--kind")
        .stdout_has("Exits 1 if any file has problems");
}

#[test]
fn version_goes_to_stdout() {
    let run = Sandbox::empty().run(&["--version"]);
    run.code(0).quiet_stderr();
    // The revision is the checkout's HEAD (the build script reruns when it
    // moves), or `unknown` outside a git checkout.
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(
        run.stdout.trim_end(),
        format!("bstack {} (git {rev})", env!("CARGO_PKG_VERSION")),
        "{run}"
    );
}

#[test]
fn completions_cover_every_command_and_parse() {
    let sandbox = Sandbox::empty();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let run = sandbox.run(&["completions", shell]);
        run.code(0).quiet_stderr();
        for command in [
            "plan",
            "hotweights",
            "bcache",
            "strata",
            "datajax",
            "bwrt",
            "demo",
        ] {
            run.stdout_has(command);
        }
    }
    // The bash script is valid bash, and completing `bstack da` offers
    // `datajax` (and `demo` does not start with `da`).
    let script = sandbox.run(&["completions", "bash"]).stdout;
    std::fs::write(sandbox.path("bstack.bash"), &script).unwrap_or_else(|e| panic!("{e}"));
    let run = sandbox.run_shell(
        "source ./bstack.bash && COMP_WORDS=(bstack da) COMP_CWORD=1 && _bstack bstack da bstack \
         && printf '%s\\n' \"${COMPREPLY[@]}\"",
    );
    run.code(0);
    assert_eq!(run.stdout.trim(), "datajax", "{run}");
    let run = sandbox.run(&["completions", "tcsh"]);
    run.code(2).quiet_stdout();
    assert!(run.stderr.contains("invalid value 'tcsh'"), "{run}");
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let run = Sandbox::empty().run(&["plan", "bogus"]);
    run.code(2).quiet_stdout();
    assert_eq!(
        run.stderr_lines()[0],
        "error: unrecognized subcommand 'bogus'",
        "{run}"
    );
}

#[test]
fn other_usage_errors_exit_2() {
    let sandbox = Sandbox::with_examples();
    for args in [
        vec![],
        vec!["plan"],
        vec!["plan", "validate"],
        vec!["-q", "-v", "demo", "--out", "x"],
        vec!["plan", "show", "--top", "many", "demo/cache_plan.json"],
        vec!["--nope"],
    ] {
        let run = sandbox.run(&args);
        run.code(2).quiet_stdout();
        assert!(!run.stderr.is_empty(), "{run}");
    }
    assert!(!sandbox.exists("x"), "a usage error runs nothing");
}

/// A failed write to stdout (here a full device) is one `error: ` line and
/// exit 2, not a panic.
#[cfg(target_os = "linux")]
#[test]
fn failed_write_to_stdout_is_one_error_line() {
    let sandbox = Sandbox::with_examples();
    let full =
        std::fs::File::create("/dev/full").unwrap_or_else(|e| panic!("opening /dev/full: {e}"));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bstack"))
        .args(["plan", "show", &format!("{EXAMPLES}/cache_plan.json")])
        .current_dir(sandbox.path("."))
        .stdout(full)
        .output()
        .unwrap_or_else(|e| panic!("running bstack: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "stderr:\n{stderr}");
    assert!(stderr.starts_with("error: "), "stderr:\n{stderr}");
}

/// A reader that goes away (`bstack plan show x | head -1`) ends the command
/// quietly with 0, as other Unix tools do, instead of a panic.
#[test]
fn closed_stdout_pipe_is_a_quiet_exit() {
    let sandbox = Sandbox::with_examples();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bstack"))
        .args(["plan", "validate"])
        .args((0..200).map(|_| format!("{EXAMPLES}/cache_plan.json")))
        .current_dir(sandbox.path("."))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running bstack: {e}"));
    drop(child.stdout.take());
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for bstack: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(stderr, "", "no panic, no error");
}
