//! `bstack strata`: objects through a configured store across processes,
//! bad configurations and keys, plan execution, and one served store used
//! by several client processes at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::common::Sandbox;

const CONFIG: &str = "\
tiers:
  - name: cpu
    kind: memory
    capacity: 64MiB
    mode: write_back
    promote: true
  - name: ssd
    kind: disk
    path: store
    capacity: 1GiB
exec:
  streams: 2
";

fn sandbox() -> Sandbox {
    let sandbox = Sandbox::empty();
    std::fs::write(sandbox.path("strata.yaml"), CONFIG).unwrap();
    sandbox
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
}

#[test]
fn objects_outlive_the_process_that_stored_them() {
    let s = sandbox();
    let data = bytes(300_000, 7);
    std::fs::write(s.path("blob"), &data).unwrap();
    let key = "kv/llama/bf16/tp2.r1/00aa/layer3";
    s.run(&[
        "strata",
        "put",
        key,
        "blob",
        "--dtype",
        "bf16",
        "--shape",
        "2,150000",
        "--config",
        "strata.yaml",
    ])
    .code(0)
    .stdout_has("stored kv/llama/bf16/tp2.r1/00aa/layer3");
    // A new process: the write-back memory tier is gone, the disk tier
    // has every byte (close flushed it).
    s.run(&[
        "strata",
        "get",
        key,
        "-o",
        "back",
        "--config",
        "strata.yaml",
    ])
    .code(0)
    .stdout_has("from tier ssd");
    assert_eq!(std::fs::read(s.path("back")).unwrap(), data);

    let stat = s.run(&["--json", "strata", "stat", key, "--config", "strata.yaml"]);
    stat.code(0);
    let tiers = stat.json()["tiers"].as_array().unwrap().clone();
    assert_eq!(tiers[1]["present"], Value::Bool(true), "{stat}");
    assert_eq!(tiers[1]["meta"]["dtype"], "bf16");
    assert_eq!(tiers[1]["meta"]["shape"], serde_json::json!([2, 150000]));

    s.run(&["strata", "ls", "--config", "strata.yaml"])
        .code(0)
        .stdout_has(key)
        .stdout_has("1 object");
    s.run(&["strata", "rm", key, "--config", "strata.yaml"])
        .code(0)
        .stdout_has("deleted");
    let run = s.run(&["strata", "get", key, "--config", "strata.yaml"]);
    run.code(2);
    assert!(run.error_line().contains("not found"), "{run}");
}

#[test]
fn bad_configurations_and_keys_are_named() {
    let s = Sandbox::empty();
    std::fs::write(
        s.path("a.yaml"),
        "tiers:\n  - kind: memory\n    colour: red\n",
    )
    .unwrap();
    let run = s.run(&["strata", "stat", "--config", "a.yaml"]);
    run.code(2);
    assert!(run.error_line().contains("tiers[0]"), "{run}");
    assert!(run.error_line().contains("colour"), "{run}");

    std::fs::write(
        s.path("b.yaml"),
        "tiers:\n  - kind: disk\n    path: d\n    url: redis://x\n",
    )
    .unwrap();
    let run = s.run(&["strata", "stat", "--config", "b.yaml"]);
    run.code(2);
    assert!(
        run.error_line()
            .contains("tiers[0].url: not a key of a disk tier"),
        "{run}"
    );

    std::fs::write(
        s.path("c.yaml"),
        "tiers:\n  - kind: memory\n    capacity: 4 parsecs\n",
    )
    .unwrap();
    let run = s.run(&["strata", "stat", "--config", "c.yaml"]);
    run.code(2);
    assert!(run.error_line().contains("unknown unit"), "{run}");

    let run = s.run(&["strata", "get", "blob/x", "--config", "a.yaml"]);
    run.code(2);
    assert!(run.error_line().contains("unknown kind \"blob\""), "{run}");

    s.run(&["strata", "config", "--docs"])
        .code(0)
        .stdout_has("`tiers[].mode`")
        .stdout_has("`flush.retry_max_ms`");
}

const PLAN: &str = r#"{
  "kind": "cache_plan", "schema_version": 1, "plan_id": "p0",
  "window": {"index": 0, "start_ns": 0, "end_ns": 60000000000},
  "ops": [
    {"kind": "STORAGE2H", "src": "tier://node0/ssd", "dst": "tier://node0/cpu", "length": 262144,
     "src_offset": 0, "dst_offset": 0, "priority": 2,
     "kv_refs": [{"tensor": "kv", "page": 10, "layer": 0, "count": 4}]},
    {"kind": "STORAGE2H", "src": "tier://node0/ssd", "dst": "tier://node0/gpu", "length": 65536,
     "src_offset": 262144, "dst_offset": 0,
     "kv_refs": [{"tensor": "kv", "page": 14, "layer": 0, "count": 1}]}
  ]
}"#;

#[test]
fn plans_execute_on_real_bytes_and_failures_are_reported() {
    let s = sandbox();
    std::fs::write(s.path("plan.json"), PLAN).unwrap();
    let run = s.run(&[
        "--json",
        "strata",
        "exec",
        "plan.json",
        "--fill-sources",
        "--config",
        "strata.yaml",
        "-o",
        "report.json",
    ]);
    // The second operation names a tier the store does not have: exit 1,
    // and the report says why.
    run.code(1);
    let report = run.json();
    assert_eq!(report["done_bytes"], 262144, "{run}");
    assert_eq!(report["failed_ops"], 1);
    assert_eq!(report["ops"][0]["status"], "done", "{run}");
    assert!(
        report["ops"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("no store tier for plan tier \"gpu\""),
        "{run}"
    );
    assert_eq!(report["hits"].as_array().unwrap().len(), 4);
    let saved: Value =
        serde_json::from_slice(&std::fs::read(s.path("report.json")).unwrap()).unwrap();
    assert_eq!(saved["plan_id"], "p0");

    // Mapped, the same plan runs whole.
    let mapped = format!("{CONFIG}  tier_map: {{ gpu: cpu }}\n");
    std::fs::write(s.path("mapped.yaml"), mapped).unwrap();
    let run = s.run(&[
        "strata",
        "exec",
        "plan.json",
        "--fill-sources",
        "--config",
        "mapped.yaml",
    ]);
    run.code(0)
        .stdout_has("2 on 2 streams: 2 done, 0 late, 0 failed");
}

/// A running `bstack strata serve`, killed when dropped.
struct Served {
    child: Child,
    addr: String,
    metrics: String,
}

impl Served {
    fn start(s: &Sandbox) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bstack"))
            .args([
                "strata",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(["--config", "strata.yaml"])
            .current_dir(s.path("."))
            .env_remove("BSTACK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("a line from the server")
        };
        let addr = next()
            .strip_prefix("listening on ")
            .expect("listening on")
            .to_owned();
        let metrics = next()
            .strip_prefix("metrics on http://")
            .and_then(|m| m.strip_suffix("/metrics"))
            .expect("metrics on")
            .to_owned();
        Served {
            child,
            addr,
            metrics,
        }
    }

    fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(&self.metrics).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn one_served_store_is_shared_by_many_processes() {
    let s = sandbox();
    let mut served = Served::start(&s);
    // Four "ranks" in four processes at once, each storing its own shard.
    for r in 0..4u8 {
        std::fs::write(
            s.path(&format!("shard{r}")),
            bytes(100_000 + usize::from(r), r),
        )
        .unwrap();
    }
    let key = |r: u8| format!("kv/m/bf16/tp4.r{r}/0badcafe/layer0");
    let puts: Vec<Child> = (0..4u8)
        .map(|r| {
            Command::new(env!("CARGO_BIN_EXE_bstack"))
                .args([
                    "strata",
                    "put",
                    &key(r),
                    &format!("shard{r}"),
                    "--remote",
                    &served.addr,
                ])
                .current_dir(s.path("."))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut p in puts {
        assert!(p.wait().unwrap().success());
    }
    // Every rank reads every other rank's shard, again from 4 processes.
    let gets: Vec<(u8, Child)> = (0..4u8)
        .map(|r| {
            let child = Command::new(env!("CARGO_BIN_EXE_bstack"))
                .args(["strata", "get", &key((r + 1) % 4), "--remote", &served.addr])
                .current_dir(s.path("."))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            ((r + 1) % 4, child)
        })
        .collect();
    for (r, child) in gets {
        let out = crate::common::wait_within(child, crate::common::COMMAND_LIMIT, "strata get");
        assert!(out.status.success());
        assert_eq!(
            out.stdout,
            bytes(100_000 + usize::from(r), r),
            "rank {r}'s shard"
        );
    }
    let metrics = served.metrics();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    assert!(value("strata_requests_total") >= 8.0, "{metrics}");
    assert!(
        value("strata_connections_accepted_total") >= 8.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("strata_tier_objects{tier=\"ssd\"}"),
        "{metrics}"
    );

    // SIGTERM: the server closes the store, flushing what is dirty.
    let pid = served.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(served.child.wait().unwrap().success());
    for r in 0..4u8 {
        let run = s.run(&[
            "strata",
            "get",
            &key(r),
            "--tier",
            "ssd",
            "-o",
            "out",
            "--config",
            "strata.yaml",
        ]);
        run.code(0);
        assert_eq!(
            std::fs::read(s.path("out")).unwrap(),
            bytes(100_000 + usize::from(r), r)
        );
    }
}
