//! `bstack bench hotweights-cluster`: a whole cluster rollout (coordinator,
//! one source, four workers) on an emulated network, against one raw TCP
//! copy of the same bytes over the same link, measured in the same run.
//!
//! # The network
//!
//! On one machine, loopback is as fast as memory: the two or three cores,
//! not the network, would set the speed. So each worker runs in its own
//! network namespace (`hwb{pid}w{i}`) behind a veth pair whose two
//! directions are both shaped with `tc qdisc ... tbf` to 1 Gbit/s
//! (`BSTACK_BENCH_LINK_MBIT=500` sets another rate, in Mbit/s): the host side limits traffic into the namespace, the
//! namespace side traffic out of it. The broadcast chain
//! source -> w0 -> w1 -> w2 -> w3 then pipelines as on real links: each
//! worker receives on its link and forwards on the other direction of the
//! same link. Worker `i` has address `10.231.B+i.2/30` and its host side
//! `10.231.B+i.1` (B from the bench's pid, so that two benches do not
//! clash); the host forwards between them and each namespace routes
//! through its host side, so workers reach each other and the coordinator.
//! Forwarding is turned on for the bench's host-side links only
//! (`net.ipv4.conf.LINK.forwarding=1`, what `net.ipv4.ip_forward=1` turns on
//! for every link): nothing global changes, so nothing has to be restored,
//! and two runs side by side cannot switch it off under each other. Every
//! namespace and link the bench created is removed at the end, also on
//! error. Where namespaces cannot be created (not root, no `ip`), the bench
//! says so on stderr and runs everything on loopback; the figure's
//! `network` is then `loopback` rather than `netns-tbf-1gbit`.
//!
//! # The figure
//!
//! `hotweights_cluster.rollout`: the median, over `--runs` rollouts, of the
//! total time of `bstack --json hw rollout` (submit to every worker flipped);
//! `bytes` are the plan's staged bytes. At `--scale 1` the checkpoint is
//! 2 GiB and each version rewrites whole layers totalling about 10 % of its
//! bytes; run `r` rolls version `r` out to version `r + 1`. The baseline,
//! `raw_tcp_one_receiver`, is the median time of one plain TCP copy of the
//! same number of bytes from the host to a receiver in worker 0's namespace,
//! over the same shaped link, until the receiver has read them all. Extras:
//! `transfer_seconds` (submit to every precommit), `flip_ms` (the last
//! precommit seen to the last worker flipped), `max_pause_ms` (the longest
//! engine pause of any worker), `per_worker_bytes` (of the last run), and
//! `broadcast_seconds` with `broadcast_ratio`: the source's own time to
//! send the bytes down the whole chain (from its log), and that time over
//! the baseline's. The rest of `transfer_seconds` is the workers' staging
//! of the received buckets into their stores, and the votes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bstack_plan::{Contract, Format};
use hotweights::synth::SynthModel;
use serde_json::{Value, json};

use crate::bench::{Figure, emit, middle};
use crate::output::Output;

/// The shaped rate of every link, Mbit/s, unless [`LINK_ENV`] says otherwise.
const LINK_MBIT: u64 = 1000;
/// The environment variable that sets another link rate, in Mbit/s.
const LINK_ENV: &str = "BSTACK_BENCH_LINK_MBIT";
/// Workers in the emulated cluster.
const WORKERS: usize = 4;
/// The checkpoint size at scale 1.
const CHECKPOINT_BYTES: f64 = (2u64 << 30) as f64;
/// The environment variable that tells the hidden sink helper where to
/// listen.
const SINK_ENV: &str = "BSTACK_BENCH_SINK";
/// How long a child may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The bench.
pub fn measure(runs: usize, scale: f64, out: &Output) -> Result<()> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let mbit = match std::env::var(LINK_ENV) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(m) if (1..=100_000).contains(&m) => m,
            _ => bail!("{LINK_ENV}={text:?}: not a rate from 1 to 100000 Mbit/s"),
        },
        Err(_) => LINK_MBIT,
    };
    // As `tc` spells it.
    let rate = if mbit % 1000 == 0 {
        format!("{}gbit", mbit / 1000)
    } else {
        format!("{mbit}mbit")
    };
    let net = match Net::create(WORKERS, 231, &rate) {
        Ok(net) => Some(net),
        Err(e) => {
            eprintln!(
                "note: cannot emulate the cluster network ({}); running on loopback, where the \
                 cores, not links, set the speed",
                crate::one_line(&e)
            );
            None
        }
    };
    let data = prepare(tmp.path(), runs, scale)?;
    let mut procs = Procs::new(tmp.path().join("logs"))?;
    let result = cluster_runs(&mut procs, net.as_ref(), tmp.path(), &data, runs);
    let result = match result {
        Ok(r) => r,
        Err(e) => bail!("{}{}", crate::one_line(&e), procs.log_tails()),
    };
    let baseline = raw_tcp(&mut procs, net.as_ref(), data.staged_bytes, runs)?;
    drop(procs);

    let last = result.reports.last().cloned().unwrap_or(Value::Null);
    let per_worker: BTreeMap<String, u64> = last["consumers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_owned(),
                c["bytes"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let median_f64 = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let seconds = |key: &str| -> Vec<f64> {
        result
            .reports
            .iter()
            .map(|r| r[key].as_f64().unwrap_or_default())
            .collect()
    };
    let max_pause: Vec<f64> = result
        .reports
        .iter()
        .map(|r| {
            r["consumers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c["pause_ns"].as_f64().unwrap_or_default() / 1e6)
                .fold(0.0, f64::max)
        })
        .collect();
    let broadcast = result
        .broadcasts
        .iter()
        .copied()
        .collect::<Option<Vec<f64>>>()
        .map(median_f64);
    let committed = result
        .reports
        .iter()
        .all(|r| r["all_committed"].as_bool() == Some(true));
    emit(
        out,
        runs,
        Figure::new(
            "hotweights_cluster.rollout",
            WORKERS,
            usize::try_from(data.staged_bytes).unwrap_or(usize::MAX),
            middle(result.totals.clone()),
        )
        .against("raw_tcp_one_receiver", baseline)
        .with(json!({
            "workers": WORKERS,
            "network": if net.is_some() { format!("netns-tbf-{rate}") } else { "loopback".into() },
            "link_rate": if net.is_some() { json!(rate) } else { json!(null) },
            "link_bits_per_s": if net.is_some() { json!(mbit * 1_000_000) } else { json!(null) },
            "checkpoint_bytes": data.checkpoint_bytes,
            "changed_percent": data.changed_percent,
            "all_committed": committed,
            "total_seconds": median_f64(seconds("total_seconds")),
            "transfer_seconds": median_f64(seconds("transfer_seconds")),
            "broadcast_seconds": broadcast,
            "broadcast_ratio": broadcast.map(|b| b / baseline.as_secs_f64().max(1e-9)),
            "flip_ms": median_f64(seconds("flip_seconds")) * 1e3,
            "max_pause_ms": median_f64(max_pause),
            "per_worker_bytes": per_worker,
        })),
    )?;
    drop(net);
    drop(tmp);
    Ok(())
}

/// The hidden helper behind the baseline: listens where [`SINK_ENV`] says,
/// prints `sink on ADDR`, and for every connection reads to EOF and answers
/// with the number of bytes read (8 bytes, little-endian).
pub fn sink() -> Result<()> {
    let at = std::env::var(SINK_ENV).with_context(|| format!("{SINK_ENV} is not set"))?;
    let listener = TcpListener::bind(&at).with_context(|| format!("listening on {at}"))?;
    println!("sink on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 1 << 20];
    for conn in listener.incoming() {
        let mut conn = conn?;
        let mut total = 0u64;
        loop {
            match conn.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
        conn.write_all(&total.to_le_bytes())?;
    }
    Ok(())
}

/// The generated versions.
struct Data {
    /// Manifests `v1.json` .. `v{runs+1}.json`.
    manifests: Vec<PathBuf>,
    /// Checkpoint directories, same order.
    checkpoints: Vec<PathBuf>,
    /// Plans `v{r}` to `v{r+1}`.
    plans: Vec<PathBuf>,
    /// Worker stores, at v1.
    stores: Vec<PathBuf>,
    /// Staged bytes of the first plan (each is about the same).
    staged_bytes: u64,
    checkpoint_bytes: u64,
    changed_percent: f64,
}

/// Writes `runs + 1` versions, their manifests and plans, and imports v1
/// into every worker's store.
fn prepare(dir: &Path, runs: usize, scale: f64) -> Result<Data> {
    let target = (CHECKPOINT_BYTES * scale).max((1u64 << 20) as f64);
    // The width grows with the square root of the size, so that the layer
    // count, and with it the share of bytes in a layer, stays about the same.
    let hidden = (((2048.0 * scale.sqrt()) / 64.0).round() as usize).max(1) * 64;
    let vocab = ((32_000.0 * scale.sqrt()) as usize).max(256);
    let per_layer = (17 * hidden * hidden) as f64;
    let ends = (4 * vocab * hidden) as f64;
    let layers = (((target - ends) / per_layer).round() as usize).max(2);
    // Whole layers rewritten per version: about 10 % of the bytes.
    let changed_layers = ((0.1 * target / per_layer).round() as usize).clamp(1, layers);

    let mut model = SynthModel::decoder(layers, hidden, vocab, 1);
    let options = |v: &str| hotweights::PublishOptions {
        model_id: Some("bench-cluster".into()),
        chunk_bytes: 1 << 20,
        ..hotweights::PublishOptions::new(v)
    };
    let mut data = Data {
        manifests: Vec::new(),
        checkpoints: Vec::new(),
        plans: Vec::new(),
        stores: Vec::new(),
        staged_bytes: 0,
        checkpoint_bytes: model.bytes(),
        changed_percent: 0.0,
    };
    let mut prev: Option<bstack_plan::WeightManifest> = None;
    for v in 1..=runs + 1 {
        let version = format!("v{v}");
        if v > 1 {
            for j in 0..changed_layers {
                let layer = ((v - 2) * changed_layers + j) % layers;
                let prefix = format!("model.layers.{layer}.");
                let names: Vec<String> = model
                    .tensors
                    .iter()
                    .filter(|t| t.name.starts_with(&prefix))
                    .map(|t| t.name.clone())
                    .collect();
                for name in names {
                    model.rewrite(&name, 1000 + v as u64);
                }
            }
        }
        let ckpt = std::path::absolute(dir.join("ckpt").join(&version))?;
        model.write(&ckpt, 4)?;
        let manifest = hotweights::publish(&ckpt, &options(&version), &|_| {})?;
        let manifest_path = dir.join(format!("{version}.json"));
        manifest.write(&manifest_path, Format::Json)?;
        if let Some(p) = &prev {
            let planned = hotweights::plan::create(
                p,
                manifest.clone(),
                &hotweights::PlanOptions {
                    bucket_bytes: 64 << 20,
                    source: Some(ckpt.clone()),
                    ..hotweights::PlanOptions::default()
                },
            )?;
            if data.plans.is_empty() {
                data.staged_bytes = planned.plan.staged_bytes();
                data.changed_percent = planned.delta.changed_percent();
            }
            let plan_path = dir.join(format!("v{}-{version}.plan.json", v - 1));
            planned.plan.write(&plan_path, Format::Json)?;
            data.plans.push(plan_path);
        }
        prev = Some(manifest);
        data.manifests.push(manifest_path);
        data.checkpoints.push(ckpt);
    }
    drop(model);

    let v1 = prev_manifest(&data.manifests[0])?;
    let source = hotweights::source::DirSource::new(&data.checkpoints[0]);
    let stores: Vec<PathBuf> = (0..WORKERS)
        .map(|i| dir.join(format!("store{i}")))
        .collect();
    std::thread::scope(|s| -> Result<()> {
        let jobs: Vec<_> = stores
            .iter()
            .map(|path| {
                let (v1, source) = (&v1, &source);
                s.spawn(move || -> Result<()> {
                    let mut store = hotweights::Store::open_or_create(path)?;
                    store.import(v1, source, &|_| {})?;
                    store.commit("v1")?;
                    Ok(())
                })
            })
            .collect();
        for j in jobs {
            j.join()
                .map_err(|_| anyhow::anyhow!("importing v1 panicked"))??;
        }
        Ok(())
    })?;
    data.stores = stores;
    // Gigabytes of checkpoints and stores were just written: flush them
    // now, so that their writeback does not run under the rollouts (a
    // cluster's checkpoints are on disk long before a rollout).
    let _ = Command::new("sync").stdin(Stdio::null()).status();
    Ok(data)
}

fn prev_manifest(path: &Path) -> Result<bstack_plan::WeightManifest> {
    crate::hotweights::read_valid::<bstack_plan::WeightManifest>(path)
}

/// What the rollouts did.
struct Rollouts {
    totals: Vec<Duration>,
    reports: Vec<Value>,
    /// The source's own time to send the plan's bytes down the chain.
    broadcasts: Vec<Option<f64>>,
}

/// The seconds of the broadcast, from the source's log line
/// `... sent N bytes to K receivers in T s ...`.
fn broadcast_seconds(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains(" receivers in "))?;
    let (_, rest) = line.split_once(" receivers in ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Starts the coordinator and the workers, then per run a source for the
/// next version and a rollout to it.
fn cluster_runs(
    procs: &mut Procs,
    net: Option<&Net>,
    dir: &Path,
    data: &Data,
    runs: usize,
) -> Result<Rollouts> {
    let state = dir.join("coord.redb");
    let listen = if net.is_some() {
        "0.0.0.0:0"
    } else {
        "127.0.0.1:0"
    };
    let state_arg = state.display().to_string();
    let announced = procs.spawn(
        "coord",
        None,
        &[
            "hw", "coord", "serve", "--listen", listen, "--state", &state_arg,
        ],
        "listening on ",
    )?;
    let port = announced
        .parse::<SocketAddr>()
        .with_context(|| format!("the coordinator announced {announced:?}"))?
        .port();
    let coord = format!("127.0.0.1:{port}");
    for (i, store) in data.stores.iter().enumerate() {
        let (coord_i, listen_i, ns) = match net {
            Some(n) => (
                format!("{}:{port}", n.host_addr(i)),
                format!("{}:0", n.worker_addr(i)),
                Some(n.ns(i)),
            ),
            None => (coord.clone(), "127.0.0.1:0".to_owned(), None),
        };
        let store = store.display().to_string();
        let rank = i.to_string();
        procs.spawn(
            &format!("worker{i}"),
            ns.as_deref(),
            &[
                "hw", "worker", "--coord", &coord_i, "--store", &store, "--rank", &rank,
                "--listen", &listen_i,
            ],
            "receiving on ",
        )?;
    }
    let mut rollouts = Rollouts {
        totals: Vec::new(),
        reports: Vec::new(),
        broadcasts: Vec::new(),
    };
    for r in 0..runs {
        let from = format!("v{}", r + 1);
        let to = format!("v{}", r + 2);
        wait_registered(&coord, &from, None)?;
        let name = format!("source{r}");
        let ckpt = data.checkpoints[r + 1].display().to_string();
        let manifest = data.manifests[r + 1].display().to_string();
        procs.spawn(
            &name,
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
                "--id",
                &name,
            ],
            "serving on ",
        )?;
        wait_registered(&coord, &from, Some(&to))?;
        let plan = data.plans[r].display().to_string();
        let started = Instant::now();
        let output = Command::new(crate::demo_cluster::self_exe()?)
            .args([
                "--json",
                "hw",
                "rollout",
                "--coord",
                &coord,
                "--plan",
                &plan,
                "--deadline",
                "600s",
            ])
            .stdin(Stdio::null())
            .output()
            .context("running the rollout")?;
        let wall = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report: Value = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "the rollout printed no report: {}{}",
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?;
        if !output.status.success() || report["all_committed"].as_bool() != Some(true) {
            bail!("rollout {from} to {to} did not commit everywhere: {report}");
        }
        let total = report["total_seconds"]
            .as_f64()
            .map_or(wall, Duration::from_secs_f64);
        rollouts.totals.push(total);
        rollouts.reports.push(report);
        rollouts
            .broadcasts
            .push(broadcast_seconds(&procs.logs.join(format!("{name}.log"))));
        procs.kill(&name);
    }
    Ok(rollouts)
}

/// Waits until the coordinator lists every worker on version `on` and, when
/// `source` is given, a live source holding that version.
fn wait_registered(coord: &str, on: &str, source: Option<&str>) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        let output = Command::new(crate::demo_cluster::self_exe()?)
            .args(["--json", "hw", "coord", "workers", "--coord", coord])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()?;
        last = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if let Ok(v) = serde_json::from_str::<Value>(&last) {
            let list = v["workers"].as_array().cloned().unwrap_or_default();
            let live = |w: &&Value| w["last_seen_ms_ago"].as_u64().is_some_and(|ms| ms < 2000);
            let workers = list
                .iter()
                .filter(live)
                .filter(|w| w["role"] == "worker" && w["current_version"] == on)
                .count();
            let source_ok = source.is_none_or(|s| {
                list.iter()
                    .filter(live)
                    .any(|w| w["role"] == "source" && w["holds_version"] == s)
            });
            if workers == WORKERS && source_ok {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the cluster did not register in time; the coordinator lists: {last}")
}

/// One raw TCP copy of `bytes` from the host to a receiver in worker 0's
/// namespace (or on loopback): the median of `runs` after a warm-up.
fn raw_tcp(procs: &mut Procs, net: Option<&Net>, bytes: u64, runs: usize) -> Result<Duration> {
    let listen = match net {
        Some(n) => format!("{}:0", n.worker_addr(0)),
        None => "127.0.0.1:0".to_owned(),
    };
    let ns = net.map(|n| n.ns(0));
    let at = procs.spawn_env(
        "sink",
        ns.as_deref(),
        &["bench", "hotweights-cluster-sink"],
        &[(SINK_ENV, &listen)],
        "sink on ",
    )?;
    let buf = vec![0x5au8; 4 << 20];
    let mut times = Vec::new();
    for i in 0..=runs {
        let started = Instant::now();
        let mut conn = TcpStream::connect(&at).with_context(|| format!("connecting to {at}"))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            conn.write_all(&buf[..n])?;
            left -= n as u64;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut got = [0u8; 8];
        conn.read_exact(&mut got)?;
        let elapsed = started.elapsed();
        if u64::from_le_bytes(got) != bytes {
            bail!(
                "the raw TCP receiver read {} bytes of {bytes}",
                u64::from_le_bytes(got)
            );
        }
        if i > 0 {
            times.push(elapsed);
        }
    }
    procs.kill("sink");
    Ok(middle(times))
}

/// Runs `ip ARGS` (or another tool), failing with its stderr.
fn run_tool(tool: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !output.status.success() {
        bail!(
            "`{tool} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The emulated network: one namespace per worker behind a shaped veth.
/// Dropping it removes every namespace and link it created.
pub struct Net {
    prefix: String,
    /// Third octet of worker 0's subnet.
    base: u8,
    /// Second octet of every subnet.
    net: u8,
    namespaces: Vec<String>,
    links: Vec<String>,
}

impl Net {
    /// Creates `n` namespaces in `10.{net}.x.0/30` subnets, behind links
    /// shaped to `rate` (as `tc` spells it) both ways.
    pub fn create(n: usize, net: u8, rate: &str) -> Result<Net> {
        let pid = std::process::id();
        let mut this = Net {
            prefix: format!("hwb{pid}"),
            base: ((pid as usize % 60) * 4) as u8,
            net,
            namespaces: Vec::new(),
            links: Vec::new(),
        };
        for i in 0..n {
            let ns = this.ns(i);
            run_tool("ip", &["netns", "add", &ns])?;
            this.namespaces.push(ns.clone());
            let (host, inner) = (this.host_link(i), format!("{}n{i}", this.prefix));
            run_tool(
                "ip",
                &[
                    "link", "add", &host, "type", "veth", "peer", "name", &inner, "netns", &ns,
                ],
            )?;
            this.links.push(host.clone());
            let host_cidr = format!("{}/30", this.host_addr(i));
            let inner_cidr = format!("{}/30", this.worker_addr(i));
            let gateway = this.host_addr(i).to_string();
            run_tool("ip", &["addr", "add", &host_cidr, "dev", &host])?;
            run_tool("ip", &["link", "set", &host, "up"])?;
            // Forwarding on this link only (what `ip_forward` turns on for
            // every interface): nothing global changes, and benches or tests
            // running side by side cannot turn it off under each other.
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{host}/forwarding"), "1")
                .with_context(|| format!("enabling forwarding on {host}"))?;
            run_tool("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run_tool(
                "ip",
                &["-n", &ns, "addr", "add", &inner_cidr, "dev", &inner],
            )?;
            run_tool("ip", &["-n", &ns, "link", "set", &inner, "up"])?;
            run_tool(
                "ip",
                &["-n", &ns, "route", "add", "default", "via", &gateway],
            )?;
            let shape = [
                "qdisc", "add", "dev", "", "root", "tbf", "rate", rate, "burst", "1mb", "latency",
                "20ms",
            ];
            let mut host_shape = shape;
            host_shape[3] = &host;
            run_tool("tc", &host_shape)?;
            let mut inner_shape = shape;
            inner_shape[3] = &inner;
            let mut args = vec!["-n", ns.as_str()];
            args.extend_from_slice(&inner_shape);
            run_tool("tc", &args)?;
        }
        Ok(this)
    }

    /// Worker `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}w{i}", self.prefix)
    }

    /// The host side of worker `i`'s link.
    pub fn host_link(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// The host's address on worker `i`'s link.
    pub fn host_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, self.base + i as u8, 1)
    }

    /// Worker `i`'s address.
    pub fn worker_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, self.base + i as u8, 2)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Removing the namespace removes its veth end, and with it the
            // host end.
            let _ = run_tool("ip", &["netns", "del", ns]);
        }
        for link in &self.links {
            let _ = Command::new("ip")
                .args(["link", "del", link])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The child processes; dropping it kills them all.
struct Procs {
    logs: PathBuf,
    children: Vec<(String, Child)>,
}

impl Procs {
    fn new(logs: PathBuf) -> Result<Procs> {
        std::fs::create_dir_all(&logs)?;
        Ok(Procs {
            logs,
            children: Vec::new(),
        })
    }

    /// Starts `bstack ARGS` (in namespace `ns`, when given), and returns
    /// what follows `ready` on the first stdout line that starts with it.
    fn spawn(
        &mut self,
        name: &str,
        ns: Option<&str>,
        args: &[&str],
        ready: &str,
    ) -> Result<String> {
        self.spawn_env(name, ns, args, &[], ready)
    }

    fn spawn_env(
        &mut self,
        name: &str,
        ns: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
        ready: &str,
    ) -> Result<String> {
        // A real path: `ip netns exec` runs it, and /proc/self/exe there
        // would be `ip`.
        let exe = std::env::current_exe().context("finding the bstack executable")?;
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let stdout = child.stdout.take();
        self.children.push((name.to_owned(), child));
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        // Nobody waits any more: keep draining.
                        continue;
                    }
                }
            });
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(ready) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(_) => bail!(
                    "the {name} did not print {:?} in time{}",
                    ready.trim(),
                    self.log_tails()
                ),
            }
        }
    }

    /// Kills and reaps child `name`.
    fn kill(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines each child printed on stderr, for error messages.
    fn log_tails(&self) -> String {
        let mut text = String::new();
        let Ok(entries) = std::fs::read_dir(&self.logs) else {
            return text;
        };
        for entry in entries.flatten() {
            let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            if lines.is_empty() {
                continue;
            }
            text.push_str(&format!(
                "; {}: {}",
                entry.file_name().to_string_lossy(),
                lines[lines.len().saturating_sub(3)..].join(" / ")
            ));
        }
        text
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // Workers first: nothing then waits on the coordinator or source.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
        }
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
    }
}
