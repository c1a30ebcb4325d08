//! A network partition in the middle of a cluster rollout: coordinator and
//! source on the host, two workers each in its own network namespace behind
//! a veth link. While the (paced) source sends, worker 1's link goes down
//! for about 1.5 s and comes back: longer than the coordinator's 1 s lease,
//! so it may count the worker lost. Under `--on-lost abort` the rollout must
//! end with both workers on v2 (it committed) or both on v1 (it aborted):
//! never one on each. Needs root and `ip netns`; skipped otherwise.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hotweights::synth::SynthModel;
use serde_json::Value;

use crate::common::{Run, Sandbox};

/// Workers in the test.
const WORKERS: usize = 2;

/// Runs a tool; `Err` with its stderr when it fails.
fn tool(name: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {name}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{name} {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One namespace per worker behind a veth shaped to 1 Gbit/s both ways,
/// in 10.232.x.0/30 subnets; removed on drop.
struct Net {
    prefix: String,
    base: u8,
    namespaces: Vec<String>,
}

impl Net {
    /// `None` where namespaces cannot be created (not root, no `ip`).
    fn create() -> Option<Net> {
        let pid = std::process::id();
        let mut net = Net {
            prefix: format!("hwp{pid}"),
            base: ((pid % 60) * 4) as u8,
            namespaces: Vec::new(),
        };
        let first = net.ns(0);
        if tool("ip", &["netns", "add", &first]).is_err() {
            return None;
        }
        net.namespaces.push(first);
        for i in 0..WORKERS {
            if let Err(e) = net.link(i) {
                panic!("setting up worker {i}'s namespace: {e}");
            }
        }
        Some(net)
    }

    fn link(&mut self, i: usize) -> Result<(), String> {
        let ns = self.ns(i);
        if i > 0 {
            tool("ip", &["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
        }
        let (host, inner) = (self.host_link(i), format!("{}n{i}", self.prefix));
        tool(
            "ip",
            &[
                "link", "add", &host, "type", "veth", "peer", "name", &inner, "netns", &ns,
            ],
        )?;
        let host_cidr = format!("{}/30", self.host_addr(i));
        let inner_cidr = format!("{}/30", self.worker_addr(i));
        let gateway = self.host_addr(i).to_string();
        tool("ip", &["addr", "add", &host_cidr, "dev", &host])?;
        tool("ip", &["link", "set", &host, "up"])?;
        // Forwarding on this link only: workers reach each other through
        // the host, and nothing global changes.
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{host}/forwarding"), "1")
            .map_err(|e| format!("enabling forwarding on {host}: {e}"))?;
        tool("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        tool(
            "ip",
            &["-n", &ns, "addr", "add", &inner_cidr, "dev", &inner],
        )?;
        tool("ip", &["-n", &ns, "link", "set", &inner, "up"])?;
        tool(
            "ip",
            &["-n", &ns, "route", "add", "default", "via", &gateway],
        )?;
        let shape = |dev: &str| {
            vec![
                "qdisc".to_owned(),
                "add".into(),
                "dev".into(),
                dev.to_owned(),
                "root".into(),
                "tbf".into(),
                "rate".into(),
                "1gbit".into(),
                "burst".into(),
                "1mb".into(),
                "latency".into(),
                "20ms".into(),
            ]
        };
        let host_shape = shape(&host);
        tool(
            "tc",
            &host_shape.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        let mut inner_shape = vec!["-n".to_owned(), ns.clone()];
        inner_shape.extend(shape(&inner));
        tool(
            "tc",
            &inner_shape.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    fn ns(&self, i: usize) -> String {
        format!("{}w{i}", self.prefix)
    }

    fn host_link(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    fn host_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 232, self.base + i as u8, 1)
    }

    fn worker_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 232, self.base + i as u8, 2)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = tool("ip", &["netns", "del", ns]);
        }
        for i in 0..WORKERS {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_link(i)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Child processes, killed on drop; each one's stderr goes to
/// `LOGS/NAME.log`.
struct Procs {
    logs: PathBuf,
    children: Vec<(String, Child)>,
}

impl Procs {
    fn new(logs: PathBuf) -> Procs {
        std::fs::create_dir_all(&logs).unwrap_or_else(|e| panic!("creating {logs:?}: {e}"));
        Procs {
            logs,
            children: Vec::new(),
        }
    }

    /// What every child printed on stderr, for assertion messages.
    fn logs(&self) -> String {
        let mut text = String::new();
        let mut entries: Vec<_> = std::fs::read_dir(&self.logs)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for path in entries {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            text.push_str(&format!("\n----- {} -----\n{log}", path.display()));
        }
        text
    }

    /// Starts `bstack ARGS` (in namespace `ns`) and returns what follows
    /// `ready` on its first stdout line that starts with it.
    #[track_caller]
    fn spawn(&mut self, name: &str, ns: Option<&str>, args: &[&str], ready: &str) -> String {
        let exe = env!("CARGO_BIN_EXE_bstack");
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, exe]);
                c
            }
            None => Command::new(exe),
        };
        let log_path = self.logs.join(format!("{}.log", name.replace(' ', "-")));
        let log = std::fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let mut child = command
            .args(args)
            .env_remove("BSTACK_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting the {name}: {e}"));
        let stdout = child.stdout.take();
        self.children.push((name.to_owned(), child));
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the {name} did not print {ready:?}{}", self.logs()));
            if let Some(rest) = line.strip_prefix(ready) {
                return rest.trim().to_owned();
            }
        }
    }

    fn kill_all(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
        }
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Runs `bstack ARGS` in the sandbox, asserting exit 0.
#[track_caller]
fn ok(sandbox: &Sandbox, args: &[&str]) -> Run {
    let run = sandbox.run(args);
    run.code(0);
    run
}

/// Two versions of a small decoder (about 5 MiB); v2 rewrites the
/// embedding and the head (about 3 MiB to send).
fn versions(sandbox: &Sandbox) {
    let v1 = SynthModel::decoder(2, 256, 3072, 1);
    let mut v2 = v1.clone();
    assert!(v2.rewrite("lm_head.weight", 9));
    assert!(v2.rewrite("model.embed_tokens.weight", 9));
    for (model, dir, version) in [(&v1, "ck/v1", "v1"), (&v2, "ck/v2", "v2")] {
        model
            .write(&sandbox.path(dir), 2)
            .unwrap_or_else(|e| panic!("writing {dir}: {e}"));
        let out = format!("{version}.json");
        ok(
            sandbox,
            &[
                "hw",
                "publish",
                "--checkpoint",
                dir,
                "--version",
                version,
                "--model-id",
                "synth",
                "--chunk-mib",
                "1",
                "-o",
                &out,
            ],
        );
    }
    let source = sandbox.path("ck/v2").display().to_string();
    ok(
        sandbox,
        &[
            "hw",
            "plan",
            "--prev",
            "v1.json",
            "--next",
            "v2.json",
            "--source",
            &source,
            "--bucket-mib",
            "1",
            "-o",
            "plan.json",
        ],
    );
    for i in 0..WORKERS {
        let store = format!("S{i}");
        ok(
            sandbox,
            &[
                "hw",
                "apply",
                "--manifest",
                "v1.json",
                "--source",
                "ck/v1",
                "--store",
                &store,
            ],
        );
        ok(
            sandbox,
            &["hw", "commit", "--store", &store, "--version", "v1"],
        );
    }
}

/// Waits until the coordinator lists both workers and the source.
fn wait_registered(sandbox: &Sandbox, procs: &Procs, coord: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let run = sandbox.run(&["--json", "hw", "coord", "workers", "--coord", coord]);
        if let Ok(v) = serde_json::from_str::<Value>(run.stdout.trim()) {
            let list = v["workers"].as_array().cloned().unwrap_or_default();
            let workers = list.iter().filter(|w| w["role"] == "worker").count();
            let source = list.iter().any(|w| w["role"] == "source");
            if workers == WORKERS && source {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not register{run}{}",
            procs.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A store's current version.
#[track_caller]
fn current(sandbox: &Sandbox, store: &str) -> String {
    let run = ok(sandbox, &["--json", "hw", "status", "--store", store]);
    run.json()["status"]["current"]
        .as_str()
        .unwrap_or_else(|| panic!("no current version{run}"))
        .to_owned()
}

#[test]
fn partition_mid_transfer_leaves_no_worker_half_way() {
    let started = Instant::now();
    let Some(net) = Net::create() else {
        eprintln!("skipped: needs root and ip netns");
        return;
    };
    let sandbox = Sandbox::empty();
    versions(&sandbox);

    let mut procs = Procs::new(sandbox.path("logs"));
    let state = sandbox.path("coord.redb").display().to_string();
    let listening = procs.spawn(
        "coordinator",
        None,
        &[
            "hw",
            "coord",
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--state",
            &state,
            "--lease",
            "1s",
        ],
        "listening on ",
    );
    let port = listening
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("the coordinator announced {listening:?}: {e}"))
        .port();
    let coord = format!("127.0.0.1:{port}");
    for i in 0..WORKERS {
        let (store, rank) = (sandbox.path(&format!("S{i}")), i.to_string());
        let (store, to_coord) = (
            store.display().to_string(),
            format!("{}:{port}", net.host_addr(i)),
        );
        let listen = format!("{}:0", net.worker_addr(i));
        procs.spawn(
            &format!("worker {i}"),
            Some(&net.ns(i)),
            &[
                "hw", "worker", "--coord", &to_coord, "--store", &store, "--rank", &rank,
                "--listen", &listen,
            ],
            "receiving on ",
        );
    }
    let (ckpt, manifest) = (
        sandbox.path("ck/v2").display().to_string(),
        sandbox.path("v2.json").display().to_string(),
    );
    // About 3 MiB at 1 MB/s: the transfer takes about 3 s.
    procs.spawn(
        "source",
        None,
        &[
            "hw",
            "serve-source",
            "--coord",
            &coord,
            "--checkpoint",
            &ckpt,
            "--manifest",
            &manifest,
            "--piece-mib",
            "1",
            "--max-rate",
            "1000000",
        ],
        "serving on ",
    );
    wait_registered(&sandbox, &procs, &coord);

    let plan = sandbox.path("plan.json").display().to_string();
    let rollout = Command::new(env!("CARGO_BIN_EXE_bstack"))
        .args([
            "--json",
            "hw",
            "rollout",
            "--coord",
            &coord,
            "--plan",
            &plan,
            "--on-lost",
            "abort",
            "--deadline",
            "25s",
        ])
        .env_remove("BSTACK_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the rollout: {e}"));
    std::thread::sleep(Duration::from_millis(1200));
    let link = net.host_link(1);
    tool("ip", &["link", "set", &link, "down"]).unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(1500));
    tool("ip", &["link", "set", &link, "up"]).unwrap_or_else(|e| panic!("{e}"));
    let output = crate::common::wait_within(rollout, crate::common::COMMAND_LIMIT, "the rollout");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the rollout printed no report ({e}): {stdout}{stderr}{}",
            procs.logs()
        )
    });
    procs.kill_all();
    let logs = procs.logs();

    let phase = report["phase"].as_str().unwrap_or_default().to_owned();
    let stores: Vec<String> = (0..WORKERS)
        .map(|i| current(&sandbox, &format!("S{i}")))
        .collect();
    match phase.as_str() {
        "committed" => {
            assert_eq!(output.status.code(), Some(0), "{report}{logs}");
            assert_eq!(stores, ["v2", "v2"], "committed, yet: {report}{logs}");
        }
        "aborted" => {
            assert_eq!(output.status.code(), Some(1), "{report}{logs}");
            assert_eq!(stores, ["v1", "v1"], "aborted, yet: {report}{logs}");
        }
        other => panic!("the rollout ended {other:?}: {report}{stderr}{logs}"),
    }
    drop(net);
    eprintln!(
        "partition test: {phase} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
