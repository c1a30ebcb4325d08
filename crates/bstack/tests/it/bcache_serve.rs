//! `bstack bcache serve` and `bstack bcache plan --remote`: a real service
//! process on free ports, real client processes, and the metrics endpoint
//! read over a plain TCP stream.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::Sandbox;

/// How long the service may take to start or stop.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running `bstack bcache serve`, killed when dropped so that a failing
/// test does not leak it.
struct Server {
    child: Child,
    /// The gRPC address, from `listening on ADDR`.
    grpc: String,
    /// The metrics address, from `metrics on http://ADDR/metrics`.
    metrics: String,
    /// Where the service's stderr goes, for messages.
    stderr: std::path::PathBuf,
}

impl Server {
    /// Starts the service on free ports and waits for the addresses it prints.
    #[track_caller]
    fn start(sandbox: &Sandbox) -> Server {
        let stderr = sandbox.path("serve.stderr");
        let log = File::create(&stderr).unwrap_or_else(|e| panic!("creating serve.stderr: {e}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_bstack"))
            .args([
                "bcache",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .current_dir(sandbox.path("."))
            .env_remove("BSTACK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting bstack bcache serve: {e}"));
        let Some(stdout) = child.stdout.take() else {
            panic!("the service's stdout is not piped")
        };
        // Lines arrive on a thread, so that a service that never prints
        // fails the test instead of hanging it.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            grpc: String::new(),
            metrics: String::new(),
            stderr,
        };
        let next_line = |what: &str| {
            rx.recv_timeout(PATIENCE)
                .unwrap_or_else(|e| panic!("no {what} line from the service ({e}){}", server.log()))
        };
        let line = next_line("`listening on`");
        let grpc = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let line = next_line("`metrics on`");
        let metrics = line
            .strip_prefix("metrics on http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .to_owned();
        assert!(
            !grpc.ends_with(":0"),
            "the bound port should be printed: {grpc}"
        );
        assert!(
            !metrics.ends_with(":0"),
            "the bound port should be printed: {metrics}"
        );
        server.grpc = grpc;
        server.metrics = metrics;
        server
    }

    /// The service's stderr so far, for assertion messages.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("\n----- service stderr -----\n{text}\n--------------------------")
    }

    /// `GET /metrics`, over a plain TCP stream; returns the body.
    #[track_caller]
    fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(&self.metrics)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}{}", self.metrics, self.log()));
        stream
            .set_read_timeout(Some(PATIENCE))
            .unwrap_or_else(|e| panic!("setting a read timeout: {e}"));
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.metrics
        )
        .unwrap_or_else(|e| panic!("sending the request: {e}"));
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("reading the metrics: {e}{}", self.log()));
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        body.to_owned()
    }

    /// Sends SIGTERM and waits for the exit code.
    #[track_caller]
    fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap_or_else(|e| panic!("running kill: {e}"));
        assert!(status.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        loop {
            let exited = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for the service: {e}"));
            if let Some(status) = exited {
                return status.code();
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the service did not stop on SIGTERM{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node with gpu and cpu tiers; two requests that share pages 2 and 3.
fn window() -> Value {
    let request = |id: &str, pages: &[u64]| {
        json!({"id": id, "node": "node0", "pages": pages, "src": "cpu", "dst": "gpu",
               "deadline_ns": 5_000_000u64, "page_bytes": 65_536})
    };
    json!({
        "now_ns": 0,
        "nodes": [{"name": "node0", "tiers": [
            {"tier": "gpu", "capacity_bytes": 1u64 << 30, "free_bytes": 1u64 << 28,
             "bandwidth_bytes_per_s": 50_000_000_000u64},
            {"tier": "cpu", "capacity_bytes": 8u64 << 30, "free_bytes": 4u64 << 30,
             "bandwidth_bytes_per_s": 25_000_000_000u64}]}],
        "requests": [request("r1", &[0, 1, 2, 3]), request("r2", &[2, 3, 4, 5])]
    })
}

/// The value of the sample `name` in an OpenMetrics text.
#[track_caller]
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .parse()
        .unwrap_or_else(|e| panic!("sample {name}: {e}\n{text}"))
}

#[test]
fn remote_plan_matches_local_and_is_counted() {
    let sandbox = Sandbox::empty();
    sandbox.write_json("w.json", &window());
    let mut server = Server::start(&sandbox);

    let before = server.metrics();
    assert_eq!(sample(&before, "bcache_windows_planned_total"), 0.0);

    let run = sandbox.run(&[
        "--json",
        "bcache",
        "plan",
        "--input",
        "w.json",
        "--remote",
        &server.grpc,
    ]);
    run.code(0).quiet_stderr();
    let remote = run.json();
    // Shared pages are fetched once: one H2D of pages 0..6.
    let ops = remote["plan"]["ops"].as_array().expect("ops");
    assert_eq!(ops.len(), 1, "{run}");
    assert_eq!(ops[0]["kind"], "H2D", "{run}");
    assert_eq!(ops[0]["src"], "tier://node0/cpu", "{run}");
    assert_eq!(ops[0]["dst"], "tier://node0/gpu", "{run}");
    assert_eq!(ops[0]["length"], 6 * 65_536, "{run}");
    assert_eq!(ops[0]["kv_refs"][0]["count"], 6, "{run}");
    let report = &remote["report"];
    assert_eq!(report["requests"], 2, "{run}");
    assert_eq!(report["demand_bytes"], 8 * 65_536, "{run}");
    assert_eq!(report["unique_bytes"], 6 * 65_536, "{run}");
    assert_eq!(report["planned_bytes"], 6 * 65_536, "{run}");
    assert_eq!(report["ops"], 1, "{run}");
    assert_eq!(report["deferred_bytes"], 0, "{run}");
    assert_eq!(report["dropped_bytes"], 0, "{run}");

    // The service plans exactly what a local run plans.
    let local = sandbox.run(&["--json", "bcache", "plan", "--input", "w.json"]);
    local.code(0);
    assert_eq!(remote["plan"], local.json()["plan"], "{run}{local}");

    // The table form works remotely too.
    let table = sandbox.run(&[
        "bcache",
        "plan",
        "--input",
        "w.json",
        "--remote",
        &server.grpc,
    ]);
    table
        .code(0)
        .quiet_stderr()
        .stdout_has("384.0 KiB in 1 ops")
        .stdout_has("H2D");

    let text = server.metrics();
    assert!(
        text.contains("\nbcache_windows_planned_total 2\n"),
        "two windows planned:\n{text}"
    );
    assert_eq!(sample(&text, "bcache_bytes_planned_total"), 2.0 * 393_216.0);
    assert_eq!(sample(&text, "bcache_bytes_deferred_total"), 0.0);
    assert_eq!(sample(&text, "bcache_bytes_dropped_total"), 0.0);
    assert_eq!(sample(&text, "bcache_reports_total"), 0.0);
    assert_eq!(sample(&text, "bcache_planning_seconds_count"), 2.0);
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    // SIGTERM stops the service gracefully: exit code 0.
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
}

#[test]
fn remote_plan_of_an_invalid_input_names_the_field() {
    let sandbox = Sandbox::empty();
    let mut w = window();
    w["requests"][0]["node"] = json!("nope");
    sandbox.write_json("bad.json", &w);
    let server = Server::start(&sandbox);

    let run = sandbox.run(&[
        "bcache",
        "plan",
        "--input",
        "bad.json",
        "--remote",
        &server.grpc,
    ]);
    run.code(2).quiet_stdout();
    let error = run.error_line();
    // The service checked the input (the client only parses it).
    assert!(error.contains("invalid argument"), "{run}");
    assert!(
        error.contains("requests[0].node: unknown node \"nope\""),
        "{run}"
    );

    let text = server.metrics();
    assert_eq!(sample(&text, "bcache_windows_planned_total"), 0.0, "{text}");
}

#[test]
fn remote_plan_without_a_service_fails_with_the_address() {
    let sandbox = Sandbox::empty();
    sandbox.write_json("w.json", &window());
    // A port that was free a moment ago: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let run = sandbox.run(&["bcache", "plan", "--input", "w.json", "--remote", &addr]);
    run.code(2).quiet_stdout();
    let error = run.error_line();
    assert!(
        error.contains(&format!("planner at http://{addr}")),
        "{run}"
    );
    assert!(error.contains("cannot connect"), "{run}");

    // --remote plans with the service's state, so --state is refused.
    let run = sandbox.run(&[
        "bcache", "plan", "--input", "w.json", "--remote", &addr, "--state", "s.json",
    ]);
    run.code(2);
    assert!(run.stderr.contains("cannot be used with"), "{run}");
}

#[test]
fn serve_on_a_taken_port_fails_with_the_address() {
    let sandbox = Sandbox::empty();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let run = sandbox.run(&["bcache", "serve", "--listen", &addr]);
    run.code(2).quiet_stdout();
    assert!(
        run.error_line()
            .starts_with(&format!("binding {addr} for the planner service: ")),
        "{run}"
    );
}
