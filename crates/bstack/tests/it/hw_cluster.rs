//! A hotweights cluster as real processes on loopback: `hw coord serve`,
//! `hw serve-source`, `hw worker` and `hw rollout`, with faults injected
//! the way they happen: processes killed with SIGKILL mid-transfer, a
//! coordinator restarted, a Redis leader killed, a corrupted piece, a wrong
//! token, a worker that joins late. Every test asserts the end state: each
//! worker's store is on one version, the same for all, nothing half-applied.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bstack_plan::{Contract, Format};
use hotweights::source::DirSource;
use hotweights::synth::SynthModel;
use hotweights::{PlanOptions, PublishOptions, Store};
use serde_json::Value;

use crate::common::{COMMAND_LIMIT, Sandbox, wait_within};

/// How long a process may take to start.
const PATIENCE: Duration = Duration::from_secs(30);
/// The token every cluster in these tests uses.
const TOKEN: &str = "s3cret-token-0123456789";

/// A running `bstack` process, killed when dropped.
struct Proc {
    name: String,
    child: Child,
    /// The address from its first line (`... on ADDR`).
    addr: String,
    /// Its metrics address, if it printed one.
    metrics: Option<String>,
    stderr: PathBuf,
}

impl Proc {
    /// Starts `bstack ARGS` in the sandbox and waits for its address line
    /// (and its metrics line when `metrics`).
    #[track_caller]
    fn start(sandbox: &Sandbox, name: &str, args: &[&str], metrics: bool) -> Proc {
        let stderr = sandbox.path(&format!("{name}.stderr"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&stderr)
            .unwrap_or_else(|e| panic!("creating {name}.stderr: {e}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_bstack"))
            .args(args)
            .current_dir(sandbox.path("."))
            .env_remove("BSTACK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let Some(stdout) = child.stdout.take() else {
            panic!("{name}: stdout not piped")
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let next = || {
            rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
                let log = std::fs::read_to_string(&stderr).unwrap_or_default();
                panic!("{name} printed no address within {PATIENCE:?}; stderr:\n{log}")
            })
        };
        let first = next();
        let addr = first
            .rsplit(" on ")
            .next()
            .unwrap_or_else(|| panic!("{name}: unexpected first line {first:?}"))
            .to_owned();
        let metrics = metrics.then(|| {
            let line = next();
            line.trim_start_matches("metrics on http://")
                .trim_end_matches("/metrics")
                .to_owned()
        });
        Proc {
            name: name.to_owned(),
            child,
            addr,
            metrics,
            stderr,
        }
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it printed on stderr.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its metrics text.
    #[track_caller]
    fn metrics(&self) -> String {
        let Some(addr) = &self.metrics else {
            panic!("{} serves no metrics", self.name)
        };
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("metrics {addr}: {e}"));
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap_or_else(|e| panic!("metrics {addr}: {e}"));
        let mut text = String::new();
        s.read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("metrics {addr}: {e}"));
        text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows every process's side of the story.
        if std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}", self.name, self.log());
        }
    }
}

/// A sample's value in a metrics text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

/// A sandbox with two versions of a small model (`ck/v1`, `ck/v2`: the head
/// rewritten, 4 MiB, and one layer's MLP nudged), their manifests, the plan `plan.json` (1 MiB buckets)
/// and the token file `tok`. Returns the sandbox and the plan's bucket
/// bytes.
fn fixture() -> (Sandbox, u64) {
    let sandbox = Sandbox::empty();
    let mut model = SynthModel::decoder(2, 512, 4096, 1);
    model
        .write(&sandbox.path("ck/v1"), 2)
        .unwrap_or_else(|e| panic!("v1: {e}"));
    assert!(model.rewrite("lm_head.weight", 7));
    // An optimizer-like nudge: sparse deltas pay for these chunks.
    assert!(model.nudge_where(0.01, 3, |n| n.starts_with("model.layers.0.mlp.")) > 0);
    model
        .write(&sandbox.path("ck/v2"), 2)
        .unwrap_or_else(|e| panic!("v2: {e}"));
    let options = |v: &str| PublishOptions {
        model_id: Some("synth".into()),
        chunk_bytes: 1 << 20,
        ..PublishOptions::new(v)
    };
    let m1 = hotweights::publish(&sandbox.path("ck/v1"), &options("v1"), &|_| {})
        .unwrap_or_else(|e| panic!("publish v1: {e}"));
    let m2 = hotweights::publish(&sandbox.path("ck/v2"), &options("v2"), &|_| {})
        .unwrap_or_else(|e| panic!("publish v2: {e}"));
    m1.write(&sandbox.path("v1.json"), Format::Json)
        .unwrap_or_else(|e| panic!("{e}"));
    m2.write(&sandbox.path("v2.json"), Format::Json)
        .unwrap_or_else(|e| panic!("{e}"));
    let planned = hotweights::plan::create(
        &m1,
        m2,
        &PlanOptions {
            bucket_bytes: 1 << 20,
            source: Some(sandbox.path("ck/v2")),
            ..PlanOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("plan: {e}"));
    planned
        .plan
        .write(&sandbox.path("plan.json"), Format::Json)
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(sandbox.path("tok"), format!("{TOKEN}\n")).unwrap_or_else(|e| panic!("{e}"));
    let staged = planned.plan.staged_bytes();
    (sandbox, staged)
}

/// A store named `name` in the sandbox holding v1, current.
fn store_on_v1(sandbox: &Sandbox, name: &str) {
    let manifest = bstack_plan::WeightManifest::from_json(
        &std::fs::read_to_string(sandbox.path("v1.json")).unwrap_or_else(|e| panic!("{e}")),
        "v1.json",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut store =
        Store::open_or_create(&sandbox.path(name)).unwrap_or_else(|e| panic!("store {name}: {e}"));
    store
        .import(&manifest, &DirSource::new(sandbox.path("ck/v1")), &|_| {})
        .unwrap_or_else(|e| panic!("import: {e}"));
    store.commit("v1").unwrap_or_else(|e| panic!("commit: {e}"));
}

/// The current version of a store, from its state file.
fn current(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["current"].as_str().map(str::to_owned)
}

/// Whether a store holds (applied or current) `version`.
fn holds(dir: &Path, version: &str) -> bool {
    dir.join("versions")
        .join(format!("{version}.manifest.pb"))
        .exists()
}

/// Polls `f` every 50 ms until it is true, or fails after `limit`.
#[track_caller]
fn wait_for(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    wait_or_show(what, limit, f, &[]);
}

/// [`wait_for`], showing the processes' logs when it times out.
#[track_caller]
fn wait_or_show(what: &str, limit: Duration, mut f: impl FnMut() -> bool, procs: &[&Proc]) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() >= limit {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("--- {} ---\n{}", p.name, p.log()))
                .collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a coordinator on a free port with the token and metrics.
fn coordinator(sandbox: &Sandbox, name: &str, state: &str, listen: &str) -> Proc {
    coordinator_with(sandbox, name, state, listen, &[])
}

/// [`coordinator`] with `extra` arguments.
fn coordinator_with(
    sandbox: &Sandbox,
    name: &str,
    state: &str,
    listen: &str,
    extra: &[&str],
) -> Proc {
    let mut args = vec![
        "hw",
        "coord",
        "serve",
        "--listen",
        listen,
        "--state",
        state,
        "--token-file",
        "tok",
        "--metrics",
        "127.0.0.1:0",
        "--lease",
        "2s",
        "--leader-ttl",
        "1500ms",
        "--id",
        name,
    ];
    args.extend_from_slice(extra);
    Proc::start(sandbox, name, &args, true)
}

/// Starts a source of `ck/v2`, paced to `rate` bytes/s when given.
fn source(sandbox: &Sandbox, coord: &str, rate: Option<u64>, extra: &[&str]) -> Proc {
    let rate = rate.map(|r| r.to_string());
    let mut args = vec![
        "hw",
        "serve-source",
        "--coord",
        coord,
        "--token-file",
        "tok",
        "--checkpoint",
        "ck/v2",
        "--manifest",
        "v2.json",
        "--piece-mib",
        "1",
        "--window",
        "4",
        "--metrics",
        "127.0.0.1:0",
    ];
    if let Some(r) = &rate {
        args.extend(["--max-rate", r.as_str()]);
    }
    args.extend_from_slice(extra);
    Proc::start(sandbox, "source", &args, true)
}

/// Starts worker `rank` on store `S{rank}`.
fn worker(sandbox: &Sandbox, coord: &str, rank: u32, extra: &[&str]) -> Proc {
    let (r, store) = (rank.to_string(), format!("S{rank}"));
    let mut args = vec![
        "hw",
        "worker",
        "--coord",
        coord,
        "--token-file",
        "tok",
        "--store",
        &store,
        "--rank",
        &r,
        "--metrics",
        "127.0.0.1:0",
        "--idle-timeout",
        "2s",
    ];
    args.extend_from_slice(extra);
    Proc::start(sandbox, &format!("rank{rank}"), &args, true)
}

/// Waits until the coordinator lists `n` processes.
fn wait_registered(sandbox: &Sandbox, coord: &str, n: usize) {
    wait_registered_with(sandbox, coord, n, &[]);
}

/// [`wait_registered`], `coord workers` getting `extra` arguments.
fn wait_registered_with(sandbox: &Sandbox, coord: &str, n: usize, extra: &[&str]) {
    wait_for("registrations", PATIENCE, || {
        let mut args = vec![
            "--json",
            "hw",
            "coord",
            "workers",
            "--coord",
            coord,
            "--token-file",
            "tok",
        ];
        args.extend_from_slice(extra);
        let run = sandbox.run(&args);
        run.code == Some(0)
            && run.json()["workers"]
                .as_array()
                .is_some_and(|w| w.len() >= n)
    });
}

/// `bstack --json hw coord status`.
fn status(sandbox: &Sandbox, coord: &str) -> Value {
    status_with(sandbox, coord, &[])
}

/// [`status`] with `extra` arguments.
fn status_with(sandbox: &Sandbox, coord: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "--json",
        "hw",
        "coord",
        "status",
        "--coord",
        coord,
        "--token-file",
        "tok",
    ];
    args.extend_from_slice(extra);
    let run = sandbox.run(&args);
    run.code(0);
    run.json()
}

/// Starts `bstack --json hw rollout` in the background.
fn start_rollout(sandbox: &Sandbox, coord: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_bstack"))
        .args([
            "--json",
            "hw",
            "rollout",
            "--coord",
            coord,
            "--token-file",
            "tok",
            "--plan",
            "plan.json",
        ])
        .args(extra)
        .current_dir(sandbox.path("."))
        .env_remove("BSTACK_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the rollout: {e}"))
}

/// Waits for a background rollout; returns its exit code and report.
#[track_caller]
fn finish(child: Child) -> (Option<i32>, Value, String) {
    let out = wait_within(child, COMMAND_LIMIT, "the rollout");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        out.status.code(),
        report,
        format!("stdout:\n{stdout}\nstderr:\n{stderr}"),
    )
}

/// Bytes a worker has received and verified so far, from its metrics.
fn received(worker: &Proc) -> f64 {
    sample(&worker.metrics(), "hotweights_worker_bytes_staged_total")
}

#[test]
fn a_rollout_commits_on_every_worker_with_the_hook_and_metrics() {
    let (sandbox, staged) = fixture();
    store_on_v1(&sandbox, "S0");
    store_on_v1(&sandbox, "S1");
    let coord = coordinator(&sandbox, "coord", "c.redb", "127.0.0.1:0");
    let src = source(
        &sandbox,
        &coord.addr,
        None,
        &["--prev-checkpoint", "ck/v1", "--prev-manifest", "v1.json"],
    );
    let w0 = worker(
        &sandbox,
        &coord.addr,
        0,
        &[
            "--pause",
            "echo pause $HOTWEIGHTS_VERSION >> hook.log",
            "--resume",
            "echo resume $HOTWEIGHTS_VERSION >> hook.log",
        ],
    );
    let w1 = worker(&sandbox, &coord.addr, 1, &[]);
    wait_registered(&sandbox, &coord.addr, 3);

    let (code, report, text) = finish(start_rollout(&sandbox, &coord.addr, &["--deadline", "60s"]));
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(report["phase"], "committed", "{text}");
    assert_eq!(report["all_committed"], true, "{text}");
    assert_eq!(report["staged_bytes"].as_u64(), Some(staged));
    for c in report["consumers"].as_array().unwrap_or(&Vec::new()) {
        assert_eq!(c["version"], "v2", "{text}");
        assert_eq!(c["bytes"].as_u64(), Some(staged), "{text}");
        assert!(c["pause_ns"].as_u64().unwrap_or(0) > 0, "{text}");
    }
    for s in ["S0", "S1"] {
        assert_eq!(current(&sandbox.path(s)).as_deref(), Some("v2"), "{s}");
    }
    let hook = std::fs::read_to_string(sandbox.path("hook.log")).unwrap_or_default();
    assert_eq!(hook, "pause v2\nresume v2\n");

    // The same rollout again: idempotent, still committed.
    let again = sandbox.run(&[
        "--json",
        "hw",
        "rollout",
        "--coord",
        &coord.addr,
        "--token-file",
        "tok",
        "--plan",
        "plan.json",
    ]);
    again.code(0);

    let wire = sample(&src.metrics(), "hotweights_source_bytes_sent_total");
    let m = coord.metrics();
    assert_eq!(sample(&m, "hotweights_coord_commits_total"), 1.0);
    assert_eq!(sample(&m, "hotweights_coord_precommits_total"), 2.0);
    assert_eq!(sample(&m, "hotweights_coord_rollout_phase"), 4.0);
    assert_eq!(
        sample(&m, "hotweights_coord_workers_alive"),
        3.0,
        "{m}\n{}",
        coord.log()
    );
    for w in [&w0, &w1] {
        let m = w.metrics();
        assert_eq!(
            sample(&m, "hotweights_worker_bytes_staged_total"),
            staged as f64
        );
        assert!(sample(&m, "hotweights_worker_bytes_received_total") >= wire);
        assert_eq!(sample(&m, "hotweights_worker_pause_seconds_count"), 1.0);
        assert!(m.contains("hotweights_worker_rollouts_total{outcome=\"committed\"} 1"));
    }
    // Every series the Grafana dashboard plots is one these processes serve.
    let served = format!(
        "{}{}{}{}",
        coord.metrics(),
        src.metrics(),
        w0.metrics(),
        w1.metrics()
    );
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/hotweights-cluster.json"),
    )
    .unwrap_or_else(|e| panic!("reading the dashboard: {e}"));
    let mut names: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("hotweights_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        assert!(
            served.contains(&format!("\n{name}")),
            "the dashboard plots {name}, which no process serves"
        );
    }
    // Sparse records for the nudged layer: fewer bytes on the wire than
    // staged, and rank0, first in the chain, forwarded all of them.
    let m = src.metrics();
    let wire = sample(&m, "hotweights_source_bytes_sent_total");
    assert_eq!(
        sample(&m, "hotweights_source_staged_bytes_total"),
        staged as f64
    );
    assert!(
        wire < staged as f64,
        "{wire} wire bytes for {staged} staged"
    );
    assert_eq!(
        sample(&w0.metrics(), "hotweights_worker_bytes_forwarded_total"),
        wire
    );
}

#[test]
fn a_corrupted_piece_is_rejected_and_sent_again() {
    let (sandbox, _) = fixture();
    store_on_v1(&sandbox, "S0");
    let coord = coordinator(&sandbox, "coord", "c.redb", "127.0.0.1:0");
    let src = source(&sandbox, &coord.addr, None, &["--corrupt-seq", "1"]);
    // The engine's pause and resume as HTTP endpoints.
    let engine = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let url = |path: &str| {
        format!(
            "http://{}/{path}",
            engine
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        )
    };
    let (pause, resume) = (url("pause"), url("resume"));
    let calls = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in engine.incoming().take(2) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            // Headers and body may come in separate segments: read until
            // the body (the version) is in.
            let mut text = String::new();
            let mut buf = [0u8; 4096];
            while !(text.contains("\r\n\r\n") && text.ends_with("v2")) {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            let line = text.lines().next().unwrap_or_default().to_owned();
            let body = text
                .rsplit("\r\n\r\n")
                .next()
                .unwrap_or_default()
                .to_owned();
            seen.push(format!("{line} {body}"));
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
        seen
    });
    let w0 = worker(
        &sandbox,
        &coord.addr,
        0,
        &["--pause", &pause, "--resume", &resume],
    );
    wait_registered(&sandbox, &coord.addr, 2);
    let (code, report, text) = finish(start_rollout(&sandbox, &coord.addr, &[]));
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(report["all_committed"], true, "{text}");
    assert_eq!(current(&sandbox.path("S0")).as_deref(), Some("v2"));
    assert!(sample(&w0.metrics(), "hotweights_worker_hash_failures_total") >= 1.0);
    let seen = calls.join().unwrap_or_default();
    assert_eq!(
        seen,
        vec![
            "POST /pause HTTP/1.1 v2".to_owned(),
            "POST /resume HTTP/1.1 v2".to_owned()
        ]
    );
    assert!(sample(&src.metrics(), "hotweights_source_retries_total") >= 1.0);
}

#[test]
fn a_wrong_or_missing_token_changes_nothing_and_is_never_logged() {
    let (sandbox, _) = fixture();
    store_on_v1(&sandbox, "S0");
    let coord = coordinator(&sandbox, "coord", "c.redb", "127.0.0.1:0");
    let w0 = worker(&sandbox, &coord.addr, 0, &[]);
    wait_registered(&sandbox, &coord.addr, 1);
    std::fs::write(sandbox.path("bad"), "not-the-token\n").unwrap_or_else(|e| panic!("{e}"));

    let wrong = sandbox.run(&[
        "hw",
        "rollout",
        "--coord",
        &coord.addr,
        "--token-file",
        "bad",
        "--plan",
        "plan.json",
    ]);
    wrong.code(2);
    assert!(wrong.error_line().contains("Unauthenticated"), "{wrong}");
    let missing = sandbox.run(&[
        "hw",
        "rollout",
        "--coord",
        &coord.addr,
        "--plan",
        "plan.json",
    ]);
    missing.code(2);
    assert!(
        missing.error_line().contains("Unauthenticated"),
        "{missing}"
    );
    let abort = sandbox.run(&[
        "hw",
        "coord",
        "abort",
        "--coord",
        &coord.addr,
        "--plan-id",
        "x",
    ]);
    abort.code(2);

    // The right token, but no source holds v2: refused before anything
    // is submitted, with what to do.
    let nobody = sandbox.run(&[
        "hw",
        "rollout",
        "--coord",
        &coord.addr,
        "--token-file",
        "tok",
        "--plan",
        "plan.json",
    ]);
    nobody.code(2);
    assert!(
        nobody.error_line().contains("no source holding \"v2\""),
        "{nobody}"
    );
    assert!(nobody.error_line().contains("serve-source"), "{nobody}");

    let s = status(&sandbox, &coord.addr);
    assert_eq!(s["rollouts"].as_array().map(Vec::len), Some(0), "{s}");
    assert_eq!(s["revision"], 0, "{s}");
    assert_eq!(
        sample(&coord.metrics(), "hotweights_coord_auth_failures_total"),
        3.0
    );
    for text in [
        coord.log(),
        w0.log(),
        wrong.stderr.clone(),
        wrong.stdout.clone(),
    ] {
        assert!(!text.contains(TOKEN), "the token leaked: {text}");
    }
    assert_eq!(current(&sandbox.path("S0")).as_deref(), Some("v1"));
}

/// A cluster in the middle of a rollout: a coordinator on `listen` (redb
/// state), a source paced to about 8 s of transfer, rank0 and rank1 on v1,
/// and `hw rollout` running with `extra` flags; returned once rank1 has
/// received some of the bytes, not all.
struct MidRollout {
    sandbox: Sandbox,
    staged: u64,
    coord: Proc,
    src: Proc,
    w0: Proc,
    w1: Proc,
    rollout: Child,
}

fn mid_rollout(listen: &str, extra: &[&str]) -> MidRollout {
    let (sandbox, staged) = fixture();
    store_on_v1(&sandbox, "S0");
    store_on_v1(&sandbox, "S1");
    let coord = coordinator(&sandbox, "coord", "c.redb", listen);
    let src = source(&sandbox, &coord.addr, Some(staged / 8), &[]);
    let w0 = worker(&sandbox, &coord.addr, 0, &[]);
    let w1 = worker(&sandbox, &coord.addr, 1, &[]);
    wait_registered(&sandbox, &coord.addr, 3);
    let rollout = start_rollout(&sandbox, &coord.addr, extra);
    wait_or_show(
        "rank1 to receive",
        PATIENCE,
        || received(&w1) > 0.0,
        &[&coord, &src, &w0, &w1],
    );
    assert!(received(&w1) < staged as f64, "rank1 finished too soon");
    MidRollout {
        sandbox,
        staged,
        coord,
        src,
        w0,
        w1,
        rollout,
    }
}

#[test]
fn a_worker_killed_mid_transfer_aborts_the_rollout_and_nobody_switches() {
    let MidRollout {
        sandbox,
        staged: _staged,
        coord,
        src: _src,
        w0: _w0,
        mut w1,
        rollout,
    } = mid_rollout("127.0.0.1:0", &[]);
    w1.kill();
    let (code, report, text) = finish(rollout);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(report["phase"], "aborted", "{text}");
    assert_eq!(report["all_committed"], false, "{text}");
    // Nobody switched; rank0 discarded what it staged.
    for s in ["S0", "S1"] {
        assert_eq!(current(&sandbox.path(s)).as_deref(), Some("v1"), "{s}");
    }
    wait_for("rank0 to discard its staging", PATIENCE, || {
        !holds(&sandbox.path("S0"), "v2")
    });
    let s = status(&sandbox, &coord.addr);
    assert_eq!(s["current_version"], "", "{s}");
}

#[test]
fn an_excluded_worker_catches_up_when_it_comes_back() {
    let MidRollout {
        sandbox,
        staged: _staged,
        coord,
        src: _src,
        w0: _w0,
        mut w1,
        rollout,
    } = mid_rollout("127.0.0.1:0", &["--on-lost", "exclude"]);
    w1.kill();
    let (code, report, text) = finish(rollout);
    // Committed, but not on every consumer: exit 1.
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(report["phase"], "committed", "{text}");
    assert_eq!(current(&sandbox.path("S0")).as_deref(), Some("v2"));
    assert_eq!(current(&sandbox.path("S1")).as_deref(), Some("v1"));
    // Back: it catches up from the source.
    let _w1 = worker(&sandbox, &coord.addr, 1, &[]);
    wait_for("rank1 to catch up", PATIENCE, || {
        current(&sandbox.path("S1")).as_deref() == Some("v2")
    });
}

#[test]
fn a_late_worker_with_an_empty_store_catches_up() {
    let (sandbox, _) = fixture();
    store_on_v1(&sandbox, "S0");
    let coord = coordinator(&sandbox, "coord", "c.redb", "127.0.0.1:0");
    // Listening on every interface, reached at one address.
    let all = ["--listen", "0.0.0.0:0", "--advertise", "127.0.0.1:0"];
    let _src = source(&sandbox, &coord.addr, None, &all);
    let _w0 = worker(&sandbox, &coord.addr, 0, &all);
    wait_registered(&sandbox, &coord.addr, 2);
    let (code, _, text) = finish(start_rollout(&sandbox, &coord.addr, &[]));
    assert_eq!(code, Some(0), "{text}");
    // Every interface without an address to be reached at: refused.
    let unreachable = sandbox.run(&[
        "hw",
        "worker",
        "--coord",
        &coord.addr,
        "--token-file",
        "tok",
        "--store",
        "S6",
        "--rank",
        "6",
        "--listen",
        "0.0.0.0:0",
    ]);
    unreachable.code(2);
    assert!(
        unreachable.error_line().contains("--advertise"),
        "{unreachable}"
    );
    let w5 = worker(&sandbox, &coord.addr, 5, &all);
    wait_for("rank5 to catch up", PATIENCE, || {
        current(&sandbox.path("S5")).as_deref() == Some("v2")
    });
    // The whole version arrived and was verified: export matches ck/v2.
    drop(w5);
    let export = sandbox.run(&[
        "hw",
        "export",
        "--store",
        "S5",
        "--version",
        "v2",
        "-o",
        "out5",
    ]);
    export.code(0);
    for f in std::fs::read_dir(sandbox.path("ck/v2"))
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        let name = f.file_name();
        let a = std::fs::read(f.path()).unwrap_or_default();
        let b = std::fs::read(sandbox.path("out5").join(&name)).unwrap_or_default();
        assert!(a == b, "{name:?} differs after catch-up");
    }
}

#[test]
fn a_coordinator_killed_mid_rollout_resumes_from_its_state() {
    // A fixed port, so that everyone finds the restarted coordinator.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let listen = format!("127.0.0.1:{port}");
    let MidRollout {
        sandbox,
        staged: _staged,
        mut coord,
        src: _src,
        w0: _w0,
        w1: _w1,
        rollout,
    } = mid_rollout(&listen, &[]);
    coord.kill();
    std::thread::sleep(Duration::from_millis(500));
    let _coord = coordinator(&sandbox, "coord2", "c.redb", &listen);
    let (code, report, text) = finish(rollout);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(report["phase"], "committed", "{text}");
    for s in ["S0", "S1"] {
        assert_eq!(current(&sandbox.path(s)).as_deref(), Some("v2"), "{s}");
    }
}

#[test]
fn a_source_killed_mid_transfer_and_restarted_finishes_the_rollout() {
    let MidRollout {
        sandbox,
        staged,
        coord,
        mut src,
        w0: _w0,
        w1: _w1,
        rollout,
    } = mid_rollout("127.0.0.1:0", &["--deadline", "60s"]);
    src.kill();
    // Back within the workers' idle timeout (2 s): they resume from their
    // last verified piece.
    let src = source(&sandbox, &coord.addr, None, &[]);
    let (code, report, text) = finish(rollout);
    assert_eq!(code, Some(0), "{text}\nsource:\n{}", src.log());
    assert_eq!(report["phase"], "committed", "{text}");
    for s in ["S0", "S1"] {
        assert_eq!(current(&sandbox.path(s)).as_deref(), Some("v2"), "{s}");
    }
    // The new source sent only what the workers lacked.
    assert!(
        sample(&src.metrics(), "hotweights_source_bytes_sent_total") < staged as f64,
        "{}",
        src.log()
    );
}

/// A private `redis-server`, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server not found ({e}): install it (apt-get install redis-server); .ci/run does this")
            });
        let r = Redis { child, port };
        wait_for("redis-server", PATIENCE, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        r
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn with_redis_state_a_standby_takes_over_a_rollout_from_a_killed_leader() {
    let (sandbox, staged) = fixture();
    store_on_v1(&sandbox, "S0");
    store_on_v1(&sandbox, "S1");
    let redis = Redis::start();
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let mut a = coordinator(&sandbox, "coordA", &url, "127.0.0.1:0");
    let b = coordinator(&sandbox, "coordB", &url, "127.0.0.1:0");
    assert_eq!(sample(&a.metrics(), "hotweights_coord_leader"), 1.0);
    assert_eq!(sample(&b.metrics(), "hotweights_coord_leader"), 0.0);
    let both = format!("{},{}", a.addr, b.addr);
    let _src = source(&sandbox, &both, Some(staged / 8), &[]);
    let _w0 = worker(&sandbox, &both, 0, &[]);
    let w1 = worker(&sandbox, &both, 1, &[]);
    wait_registered(&sandbox, &both, 3);
    let rollout = start_rollout(&sandbox, &both, &[]);
    wait_for("rank1 to receive", PATIENCE, || received(&w1) > 0.0);
    let killed_at = Instant::now();
    a.kill();
    wait_for("the standby to lead", PATIENCE, || {
        sample(&b.metrics(), "hotweights_coord_leader") == 1.0
    });
    // Within the lease time (1.5 s), a renewal period (0.5 s) and the time
    // to read the metrics on a loaded machine.
    assert!(killed_at.elapsed() < Duration::from_secs(5));
    let (code, report, text) = finish(rollout);
    assert_eq!(code, Some(0), "{text}\ncoordB:\n{}", b.log());
    assert_eq!(report["phase"], "committed", "{text}");
    for s in ["S0", "S1"] {
        assert_eq!(current(&sandbox.path(s)).as_deref(), Some("v2"), "{s}");
    }
}

/// Writes a test CA (`tls/ca.pem`), a server certificate it signed for
/// `localhost` and 127.0.0.1 with its key (`tls/server.pem`,
/// `tls/server.key`), and an unrelated CA (`tls/other-ca.pem`).
fn tls_fixture(sandbox: &Sandbox) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca = |name: &str| {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        (cert.pem(), Issuer::new(params, key))
    };
    let (ca_pem, issuer) = ca("bstack test CA");
    let (other_pem, _) = ca("another CA");
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap_or_else(|e| panic!("{e}"));
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let cert = params
        .signed_by(&key, &issuer)
        .unwrap_or_else(|e| panic!("server certificate: {e}"));
    sandbox.write("tls/ca.pem", ca_pem);
    sandbox.write("tls/other-ca.pem", other_pem);
    sandbox.write("tls/server.pem", cert.pem());
    sandbox.write("tls/server.key", key.serialize_pem());
}

#[test]
fn over_tls_a_rollout_commits_and_a_client_without_the_ca_changes_nothing() {
    let (sandbox, staged) = fixture();
    tls_fixture(&sandbox);
    store_on_v1(&sandbox, "S0");

    // Half a TLS configuration, or files that are not PEM, fail before
    // anything listens, naming the flag or the file.
    let half = sandbox.run(&["hw", "coord", "serve", "--tls-cert", "tls/server.pem"]);
    half.code(2);
    assert!(half.stderr.contains("--tls-key"), "{half}");
    let swapped = sandbox.run(&[
        "hw",
        "coord",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state",
        "x.redb",
        "--tls-cert",
        "tls/server.key",
        "--tls-key",
        "tls/server.pem",
    ]);
    swapped.code(2);
    assert!(swapped.error_line().contains("tls/server.key"), "{swapped}");
    let no_ca = sandbox.run(&["hw", "coord", "status", "--tls-ca", "tls/missing.pem"]);
    no_ca.code(2);
    assert!(no_ca.error_line().contains("tls/missing.pem"), "{no_ca}");

    let coord = coordinator_with(
        &sandbox,
        "coord",
        "c.redb",
        "127.0.0.1:0",
        &[
            "--tls-cert",
            "tls/server.pem",
            "--tls-key",
            "tls/server.key",
        ],
    );
    let tls = ["--tls-ca", "tls/ca.pem"];
    let _src = source(&sandbox, &coord.addr, None, &tls);
    let w0 = worker(&sandbox, &coord.addr, 0, &tls);
    wait_registered_with(&sandbox, &coord.addr, 2, &tls);

    // Plaintext, and TLS trusting another CA: refused, nothing changes.
    let plain = sandbox.run(&[
        "hw",
        "rollout",
        "--coord",
        &coord.addr,
        "--token-file",
        "tok",
        "--plan",
        "plan.json",
    ]);
    plain.code(2);
    assert!(plain.error_line().contains("--tls-ca"), "{plain}");
    let other = sandbox.run(&[
        "hw",
        "coord",
        "abort",
        "--coord",
        &coord.addr,
        "--token-file",
        "tok",
        "--tls-ca",
        "tls/other-ca.pem",
        "--plan-id",
        "x",
    ]);
    other.code(2);
    assert!(
        other.error_line().to_lowercase().contains("certificate"),
        "{other}"
    );
    let s = status_with(&sandbox, &coord.addr, &tls);
    assert_eq!(s["rollouts"].as_array().map(Vec::len), Some(0), "{s}");
    assert_eq!(s["revision"], 0, "{s}");
    assert_eq!(current(&sandbox.path("S0")).as_deref(), Some("v1"));

    // Over TLS, the name checked being --tls-domain's rather than the IP's.
    let (code, report, text) = finish(start_rollout(
        &sandbox,
        &coord.addr,
        &["--tls-ca", "tls/ca.pem", "--tls-domain", "localhost"],
    ));
    assert_eq!(code, Some(0), "{text}\n{}", coord.log());
    assert_eq!(report["phase"], "committed", "{text}");
    assert_eq!(report["all_committed"], true, "{text}");
    assert_eq!(report["staged_bytes"].as_u64(), Some(staged), "{text}");
    assert_eq!(current(&sandbox.path("S0")).as_deref(), Some("v2"));
    assert_eq!(
        sample(&w0.metrics(), "hotweights_worker_bytes_staged_total"),
        staged as f64
    );
    for text in [coord.log(), w0.log(), plain.stderr.clone()] {
        assert!(!text.contains(TOKEN), "the token leaked: {text}");
    }
}
