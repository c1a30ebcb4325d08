//! Shared helpers: run the built `bstack` binary in a temporary directory and
//! capture what it did, so that every failed assertion prints the command,
//! its exit code, stdout and stderr; plus the example and broken-plan fixtures.

use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

/// The directory, inside a sandbox, that [`Sandbox::with_examples`] fills.
pub const EXAMPLES: &str = "examples";

/// The shared serving trace, for tests that run on real requests.
pub fn shared_trace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/traces/conversation_trace.jsonl")
}

/// Every contract, by the name used in file names and JSON `kind`, in the
/// order `plan examples` writes them.
pub const KINDS: [&str; 5] = [
    "weight_manifest",
    "cache_plan",
    "swap_window",
    "swap_plan",
    "wave_spec",
];

/// The longest any one command of the suite may run. A command still
/// running then is killed and its test fails with what it printed, so that
/// a hang shows up as a failure with its evidence, never as a suite that
/// runs until the CI limit.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(240);

/// Runs `command` to completion with stdout and stderr captured, as
/// [`Command::output`] does, but kills it after `limit` and panics with
/// everything it printed (`what` names it).
#[track_caller]
pub fn output_within(command: &mut Command, limit: Duration, what: &str) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    wait_within(child, limit, what)
}

/// Waits for `child` (with piped stdout and stderr) as
/// [`Child::wait_with_output`] does, but kills it after `limit` and panics
/// with everything it printed.
#[track_caller]
pub fn wait_within(mut child: Child, limit: Duration, what: &str) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let until = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{what} still ran after {limit:?} and was killed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// What one run of the binary did.
pub struct Run {
    /// The arguments, joined, for messages.
    pub command: String,
    /// Exit code; `None` if the process was killed by a signal.
    pub code: Option<i32>,
    /// Everything printed on stdout.
    pub stdout: String,
    /// Everything printed on stderr.
    pub stderr: String,
}

impl fmt::Display for Run {
    /// The whole run, for assertion messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "\n$ bstack {}\nexit code: {:?}\n----- stdout -----\n{}\n----- stderr -----\n{}\n------------------",
            self.command, self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    /// Asserts the exit code; returns `self` for chaining.
    #[track_caller]
    pub fn code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit code{self}");
        self
    }

    /// Asserts that nothing was printed on stderr.
    #[track_caller]
    pub fn quiet_stderr(&self) -> &Self {
        assert!(self.stderr.is_empty(), "expected empty stderr{self}");
        self
    }

    /// Asserts that nothing was printed on stdout.
    #[track_caller]
    pub fn quiet_stdout(&self) -> &Self {
        assert!(self.stdout.is_empty(), "expected empty stdout{self}");
        self
    }

    /// Asserts that stdout contains `needle`.
    #[track_caller]
    pub fn stdout_has(&self, needle: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}{self}"
        );
        self
    }

    /// The lines of stdout.
    pub fn stdout_lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// The lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    /// Asserts that stderr is exactly one line, `error: ` and a cause, and
    /// returns the cause.
    #[track_caller]
    pub fn error_line(&self) -> &str {
        let lines = self.stderr_lines();
        assert_eq!(lines.len(), 1, "expected one line on stderr{self}");
        lines[0]
            .strip_prefix("error: ")
            .unwrap_or_else(|| panic!("stderr does not start with `error: `{self}"))
    }

    /// Asserts that every stdout line is a JSON object, and returns them.
    #[track_caller]
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout_lines()
            .into_iter()
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("stdout line {line:?} is not JSON: {e}{self}"));
                assert!(value.is_object(), "{line:?} is not a JSON object{self}");
                value
            })
            .collect()
    }

    /// Asserts that stdout is one JSON object on one line, and returns it.
    #[track_caller]
    pub fn json(&self) -> Value {
        let mut lines = self.json_lines();
        assert_eq!(lines.len(), 1, "expected one JSON line on stdout{self}");
        lines.remove(0)
    }
}

/// A temporary working directory in which the binary runs.
pub struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    /// An empty sandbox.
    #[track_caller]
    pub fn empty() -> Sandbox {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("creating a temp dir: {e}"));
        Sandbox { dir }
    }

    /// A sandbox holding the ten example contract files (`plan examples`)
    /// under [`EXAMPLES`].
    #[track_caller]
    pub fn with_examples() -> Sandbox {
        let sandbox = Sandbox::empty();
        sandbox.run(&["plan", "examples", "-o", EXAMPLES]).code(0);
        sandbox
    }

    /// The absolute path of `rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `bstack ARGS` with the sandbox as the working directory, no
    /// stdin, and the log filter left at its default.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Run {
        let output = output_within(
            Command::new(env!("CARGO_BIN_EXE_bstack"))
                .args(args)
                .current_dir(self.dir.path())
                .env_remove("BSTACK_LOG")
                .stdin(Stdio::null()),
            COMMAND_LIMIT,
            &format!("bstack {args:?}"),
        );
        Run {
            command: args.join(" "),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs `bstack ARGS` as [`Sandbox::run`] does, with the extra
    /// environment variables `env`; also returns the signal that killed the
    /// process, if one did.
    #[track_caller]
    pub fn run_env(&self, env: &[(&str, &str)], args: &[&str]) -> (Run, Option<i32>) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bstack"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("BSTACK_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        let output = output_within(&mut command, COMMAND_LIMIT, &format!("bstack {args:?}"));
        let shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let run = Run {
            command: format!("{} (with {})", args.join(" "), shown.join(" ")),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        (
            run,
            std::os::unix::process::ExitStatusExt::signal(&output.status),
        )
    }

    /// Runs `bash -c SCRIPT` in the sandbox, with `$BSTACK` set to the
    /// binary: for limits that only a shell sets (`ulimit`).
    #[track_caller]
    pub fn run_shell(&self, script: &str) -> Run {
        let output = output_within(
            Command::new("bash")
                .args(["-c", script])
                .current_dir(self.dir.path())
                .env_remove("BSTACK_LOG")
                .env("BSTACK", env!("CARGO_BIN_EXE_bstack"))
                .stdin(Stdio::null()),
            COMMAND_LIMIT,
            &format!("bash -c {script:?}"),
        );
        Run {
            command: format!("(bash -c) {script}"),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// The bytes of file `rel`.
    #[track_caller]
    pub fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    /// File `rel`, parsed as JSON.
    #[track_caller]
    pub fn read_json(&self, rel: &str) -> Value {
        serde_json::from_slice(&self.read(rel)).unwrap_or_else(|e| panic!("{rel} is not JSON: {e}"))
    }

    /// Writes `bytes` to file `rel`, creating its directory.
    #[track_caller]
    pub fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) {
        let path = self.path(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {rel}: {e}"));
    }

    /// Writes `value` as pretty JSON to file `rel`; returns the text written.
    #[track_caller]
    pub fn write_json(&self, rel: &str, value: &Value) -> String {
        let text = serde_json::to_string_pretty(value)
            .unwrap_or_else(|e| panic!("serialising {rel}: {e}"));
        self.write(rel, &text);
        text
    }

    /// Whether `rel` exists.
    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).exists()
    }
}

/// The file name of the broken cache plan written by [`write_broken_plan`].
pub const BROKEN: &str = "bad.json";

/// Writes [`BROKEN`]: the example cache plan (the sandbox must hold the examples)
/// with six independent mistakes, and returns the problems `validate` must
/// report, in order, as `(path, message)`; a message of `None` is checked
/// separately by the caller.
#[track_caller]
pub fn write_broken_plan(sandbox: &Sandbox) -> Vec<(&'static str, Option<String>)> {
    let mut plan = sandbox.read_json(&format!("{EXAMPLES}/cache_plan.json"));
    // An op kind no build knows; a source that is no address.
    plan["ops"][0]["kind"] = json!(42);
    plan["ops"][0]["src"] = json!("gpu0");
    // A copy of nothing.
    plan["ops"][1]["length"] = json!(0);
    // ops[2] now writes bytes that ops[0] already writes.
    let dst = plan["ops"][0]["dst"].clone();
    let start = 65_536u64;
    let length = plan["ops"][2]["length"]
        .as_u64()
        .unwrap_or_else(|| panic!("example ops[2].length is not a number: {plan}"));
    plan["ops"][2]["dst"] = dst.clone();
    plan["ops"][2]["dst_offset"] = json!(start);
    // Evicting the same page twice.
    let first_evict = plan["evict"][0].clone();
    plan["evict"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("example evict is not a list"))
        .push(first_evict);
    // A window that ends before it starts.
    plan["window"]["start_ns"] = json!(30_000_000u64);
    plan["window"]["end_ns"] = json!(20_000_000u64);
    sandbox.write_json(BROKEN, &plan);

    let dst = dst
        .as_str()
        .unwrap_or_else(|| panic!("example ops[0].dst is not a string: {plan}"));
    vec![
        ("ops[0].kind", Some("unknown transfer kind 42".to_owned())),
        ("ops[0].src", None),
        ("ops[1].length", Some("must be > 0".to_owned())),
        (
            "ops[2]",
            Some(format!(
                "writes bytes [{start}, {}) of {dst:?}, which ops[0] also writes",
                start + length
            )),
        ),
        ("evict[2]", Some("duplicate of evict[0]".to_owned())),
        (
            "window.end_ns",
            Some("20000000 is before start_ns 30000000".to_owned()),
        ),
    ]
}

/// Checks one reported problem against an expectation of
/// [`write_broken_plan`]; `ops[0].src`'s message must explain what an
/// address looks like.
#[track_caller]
pub fn check_problem(
    run: &Run,
    (path, message): (&str, &str),
    (want_path, want_message): &(&str, Option<String>),
) {
    assert_eq!(path, *want_path, "problem paths differ{run}");
    match want_message {
        Some(want) => assert_eq!(message, want, "problem at {path}{run}"),
        None => assert!(
            message.contains("tier://"),
            "the message for a bad address should show a valid one: {message:?}{run}"
        ),
    }
}
