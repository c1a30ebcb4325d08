//! The demo's cluster stage: the hotweights stage's next version rolled out
//! to two workers by real processes on loopback.
//!
//! It starts this binary four times (`hw coord serve`, `hw serve-source`,
//! and two `hw worker`s, each with a store holding the previous version),
//! drives the rollout through the coordinator as `bstack hw rollout` does,
//! and reports what each worker received, how long the rollout took and how
//! long each worker's flip paused it. The processes are stopped at the end;
//! their logs stay in `out/hotweights/cluster/`.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bstack_plan::{SwapPlan, WeightManifest};
use hotweights::cluster::client::CoordClient;
use hotweights::cluster::drive::{DriveOptions, rollout};
use hotweights::cluster::{Token, proto};
use hotweights::source::DirSource;
use hotweights::store::Store;
use serde_json::json;

use crate::output::bytes;

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This running binary, to start again as the cluster's processes. On
/// Linux `/proc/self/exe`, which stays valid when the file on disk is
/// replaced (a rebuild) while the demo runs.
pub fn self_exe() -> Result<std::path::PathBuf> {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe.to_owned());
    }
    std::env::current_exe().context("finding the bstack binary")
}

/// Starts `bstack ARGS`, logging stderr to `log`, and waits for the address
/// it prints first (`... on ADDR`).
fn start(name: &'static str, args: &[&str], log: &Path) -> Result<Proc> {
    let exe = self_exe()?;
    let stderr = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Some(Ok(line)) = BufReader::new(stdout).lines().next() {
            let _ = tx.send(line);
        }
    });
    let mut proc = Proc {
        child,
        addr: String::new(),
    };
    let line = rx.recv_timeout(Duration::from_secs(30)).with_context(|| {
        format!(
            "the {name} did not start within 30 s; see {}",
            log.display()
        )
    })?;
    proc.addr = line.rsplit(" on ").next().unwrap_or_default().to_owned();
    Ok(proc)
}

/// Runs the stage in `dir` (the hotweights stage's directory, which holds
/// both checkpoints, their manifests and the plan). Returns its figures in
/// words and the JSON summary.
pub fn cluster_stage(dir: &Path) -> Result<(String, serde_json::Value)> {
    let here = dir.join("cluster");
    std::fs::create_dir_all(&here).with_context(|| format!("creating {}", here.display()))?;
    let v1 = crate::hotweights::read_valid::<WeightManifest>(&dir.join("v1.weight_manifest.json"))?;
    let plan = crate::hotweights::read_valid::<SwapPlan>(&dir.join("v1-v2.swap_plan.json"))?;
    for rank in 0..2 {
        let mut store = Store::open_or_create(&here.join(format!("rank{rank}")))?;
        store.import(&v1, &DirSource::new(dir.join("ckpt-v1")), &|_| {})?;
        store.commit(&v1.version)?;
    }
    // A fresh secret per run: the demo shows the authenticated path.
    let secret = blake3::hash(format!("{:?}{}", Instant::now(), std::process::id()).as_bytes())
        .to_hex()
        .to_string();
    let token_file = here.join("token");
    std::fs::write(&token_file, &secret)?;
    let token = Token::new(&secret)?;
    let path = |p: &Path| p.display().to_string();
    let tok = path(&token_file);

    let coord = start(
        "coordinator",
        &[
            "hw",
            "coord",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state",
            &path(&here.join("coord.redb")),
            "--token-file",
            &tok,
        ],
        &here.join("coordinator.log"),
    )?;
    let source = start(
        "source",
        &[
            "hw",
            "serve-source",
            "--coord",
            &coord.addr,
            "--token-file",
            &tok,
            "--checkpoint",
            &path(&dir.join("ckpt-v2")),
            "--manifest",
            &path(&dir.join("v2.weight_manifest.json")),
            "--prev-checkpoint",
            &path(&dir.join("ckpt-v1")),
            "--prev-manifest",
            &path(&dir.join("v1.weight_manifest.json")),
        ],
        &here.join("source.log"),
    )?;
    let mut workers = Vec::new();
    for rank in 0..2u32 {
        let r = rank.to_string();
        workers.push(start(
            "worker",
            &[
                "hw",
                "worker",
                "--coord",
                &coord.addr,
                "--token-file",
                &tok,
                "--store",
                &path(&here.join(format!("rank{rank}"))),
                "--rank",
                &r,
            ],
            &here.join(format!("rank{rank}.log")),
        )?);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(async {
        let mut client = CoordClient::new(&coord.addr, Some(&token))?;
        let ready = Instant::now();
        loop {
            let n = client
                .call("ListWorkers", |mut s| async move {
                    s.list_workers(proto::ListWorkersRequest {}).await
                })
                .await?
                .workers
                .len();
            if n >= 3 {
                break;
            }
            if ready.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the workers did not register within 30 s; see {}",
                    here.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let options = DriveOptions {
            deadline: Some(Duration::from_secs(60)),
            ..DriveOptions::default()
        };
        Ok(rollout(&mut client, plan, &options, |_| {}).await?)
    })?;
    drop(workers);
    drop(source);
    drop(coord);
    if !report.all_committed {
        bail!(
            "the demo rollout did not commit on both workers ({}{}); logs in {}",
            report.phase,
            if report.abort_reason.is_empty() {
                String::new()
            } else {
                format!(": {}", report.abort_reason)
            },
            here.display()
        );
    }
    // The stores, read now that their workers have stopped, must say the
    // same as the coordinator.
    for rank in 0..2 {
        let store = Store::open(&here.join(format!("rank{rank}")))?;
        let current = store.state().current.clone().unwrap_or_default();
        if current != report.to_version {
            bail!(
                "rank{rank}'s store is on {current:?} after the rollout to {}; logs in {}",
                report.to_version,
                here.display()
            );
        }
    }
    let pauses: Vec<String> = report
        .consumers
        .iter()
        .map(|c| format!("{} {:.2} ms", c.id, c.pause_ns as f64 / 1e6))
        .collect();
    let text = format!(
        "coordinator, source and 2 worker processes on loopback;\n\
         {} to each worker, committed on both ({} current);\n\
         {:.2} s (transfer {:.2} s); engine paused {}",
        bytes(report.staged_bytes),
        report.to_version,
        report.total_seconds,
        report.transfer_seconds,
        pauses.join(", "),
    );
    let summary = json!({
        "processes": ["coordinator", "source", "rank0", "rank1"],
        "logs": here,
        "report": report,
    });
    Ok((text, summary))
}
