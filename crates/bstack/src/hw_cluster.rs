//! `bstack hotweights coord | worker | serve-source | rollout`: the cluster
//! processes of a weight rollout.
//!
//! The processes live in the library (`hotweights::cluster`); this module
//! parses flags, starts a tokio runtime, prints the bound addresses (tests
//! and scripts wait for them), and turns a rollout's outcome into an exit
//! code.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bstack_plan::{SwapPlan, WeightManifest};
use clap::{Args, Subcommand, ValueEnum};
use hotweights::cluster::client::{ClientTls, CoordClient, CoordTarget};
use hotweights::cluster::coord::{CoordConfig, ServerTls, StateSpec};
use hotweights::cluster::drive::{DriveOptions, DriveReport};
use hotweights::cluster::hook::{Action, Hook};
use hotweights::cluster::source::SourceConfig;
use hotweights::cluster::worker::WorkerConfig;
use hotweights::cluster::{Token, proto};
use hotweights::dataplane::{BroadcastOptions, DEFAULT_PIECE_BYTES, ReceiverOptions};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::Outcome;
use crate::output::{Output, bytes, key_value_table, table};

/// The default gRPC address of a coordinator.
pub const DEFAULT_COORD: &str = "127.0.0.1:7070";

/// Parses `500ms`, `3s`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write e.g. 500ms, 30s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use ms, s, m or h"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Where to find the coordinator, and its token.
#[derive(Args, Debug, Clone)]
pub struct CoordArg {
    /// Coordinator gRPC address(es): HOST:PORT, comma-separated for a leader
    /// and its standbys (calls fail over to the next).
    #[arg(long, value_name = "ADDR[,ADDR...]", default_value = DEFAULT_COORD)]
    coord: String,
    /// File holding the coordinator's bearer token (the one it was started
    /// with).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA bundle to trust: talk TLS (https://) to the coordinator, whose
    /// certificate this CA signed. Without it the control plane is plaintext.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate must carry, when it differs
    /// from the host in --coord (e.g. a certificate for a hostname while
    /// connecting by IP).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_domain: Option<String>,
}

impl CoordArg {
    fn tls(&self) -> Result<Option<ClientTls>> {
        self.tls_ca
            .as_deref()
            .map(|ca| ClientTls::from_file(ca, self.tls_domain.clone()))
            .transpose()
            .map_err(Into::into)
    }

    fn token(&self) -> Result<Option<Token>> {
        self.token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()
            .map_err(Into::into)
    }

    fn target(&self) -> Result<CoordTarget> {
        Ok(CoordTarget {
            addrs: self.coord.clone(),
            token: self.token()?,
            tls: self.tls()?,
        })
    }

    fn client(&self) -> Result<CoordClient> {
        Ok(self.target()?.client()?)
    }
}

/// The coordinator's subcommands.
#[derive(Subcommand, Debug)]
pub enum CoordCommand {
    /// Run a coordinator: the gRPC control plane of rollouts. State in an
    /// embedded redb file (restart-safe), or in Redis for a leader with
    /// standbys. Prints `listening on ADDR` (and `metrics on URL`) once
    /// ready; stops on Ctrl-C or SIGTERM (a Redis leader then hands over).
    Serve(CoordServeArgs),
    /// Show the coordinator's state: current version, rollouts, consumers.
    Status(CoordArg),
    /// List registered workers and sources: versions, leases, last pause.
    Workers(CoordArg),
    /// Record the version the cluster runs before its first rollout, so that
    /// workers that lack it catch up from a source holding it.
    SetCurrent(SetCurrentArgs),
    /// Abort a rollout: every consumer stays on (or goes back to) the old
    /// version.
    Abort(AbortArgs),
}

/// `coord serve`.
#[derive(Args, Debug)]
pub struct CoordServeArgs {
    /// gRPC address; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_COORD)]
    listen: SocketAddr,
    /// State: a redb file path (created if absent), or redis://HOST:PORT for
    /// a leader and standbys sharing one Redis.
    #[arg(
        long,
        value_name = "PATH|redis://...",
        default_value = "hotweights-coord.redb"
    )]
    state: String,
    /// Bearer token file; every call must carry the token. Without it, any
    /// client on the network may drive rollouts.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve TLS with this PEM certificate (chain); needs --tls-key. Clients
    /// then pass the CA bundle that signed it with --tls-ca. Recommended
    /// with --token-file, so the token never crosses the network in clear.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// A worker not heard from for this long is lost (heartbeats come every
    /// third of it).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    lease: Duration,
    /// Redis state: how long the leader lease lives unless renewed; a standby
    /// takes over within it.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    leader_ttl: Duration,
    /// Redis state: names the coordinator group.
    #[arg(long, default_value = "default")]
    group: String,
    /// This coordinator's id (defaults to host-pid).
    #[arg(long)]
    id: Option<String>,
}

/// `coord set-current`.
#[derive(Args, Debug)]
pub struct SetCurrentArgs {
    #[command(flatten)]
    coord: CoordArg,
    /// The manifest of the version the cluster runs.
    #[arg(long)]
    manifest: PathBuf,
}

/// `coord abort`.
#[derive(Args, Debug)]
pub struct AbortArgs {
    #[command(flatten)]
    coord: CoordArg,
    /// The rollout's plan id.
    #[arg(long)]
    plan_id: String,
    /// Why (recorded in the rollout's events).
    #[arg(long, default_value = "aborted by an operator")]
    reason: String,
}

/// `worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    coord: CoordArg,
    /// The worker's versioned store (created if absent).
    #[arg(long)]
    store: PathBuf,
    /// The worker's rank; its id is `rank<R>` unless --id is given.
    #[arg(long)]
    rank: u32,
    /// Its id, the consumer name plans use.
    #[arg(long)]
    id: Option<String>,
    /// Data-plane address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The data-plane address the source and the other workers reach this
    /// worker at, when not --listen (required with --listen 0.0.0.0:PORT;
    /// port 0 means the port bound).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Pause the serving engine before a flip: a shell command (run with
    /// HOTWEIGHTS_VERSION set) or an http:// URL to POST the version to.
    #[arg(long, value_name = "CMD|URL", requires = "resume")]
    pause: Option<String>,
    /// Resume the engine after the flip (as --pause).
    #[arg(long, value_name = "CMD|URL", requires = "pause")]
    resume: Option<String>,
    /// Limit on each hook call.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    hook_timeout: Duration,
    /// How long to wait for a lost upstream to come back mid-transfer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    idle_timeout: Duration,
}

/// `serve-source`.
#[derive(Args, Debug)]
pub struct SourceArgs {
    #[command(flatten)]
    coord: CoordArg,
    /// The next version's checkpoint directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Its manifest (as `publish` wrote it); published now when absent.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Version label when publishing here.
    #[arg(long, default_value = "next")]
    version: String,
    /// Model id when publishing here.
    #[arg(long)]
    model_id: Option<String>,
    /// Chunk size in MiB when publishing here (must match the plan's).
    #[arg(long, default_value_t = 4)]
    chunk_mib: u64,
    /// The previous version's checkpoint directory: with it (and
    /// --prev-manifest), changed chunks go as sparse deltas, zstd(old XOR
    /// new), wherever that is smaller than the chunk.
    #[arg(long, requires = "prev_manifest")]
    prev_checkpoint: Option<PathBuf>,
    /// The previous version's manifest.
    #[arg(long, requires = "prev_checkpoint")]
    prev_manifest: Option<PathBuf>,
    /// Address for catch-up requests from workers that missed a rollout.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The catch-up address workers reach this source at, when not
    /// --listen (required with --listen 0.0.0.0:PORT).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Its id.
    #[arg(long, default_value = "source")]
    id: String,
    /// Piece size on the wire, MiB.
    #[arg(long, default_value_t = (DEFAULT_PIECE_BYTES >> 20) as u64)]
    piece_mib: u64,
    /// Pieces in flight per link.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Most bytes per second to send (e.g. to leave room for serving
    /// traffic); unlimited by default.
    #[arg(long, value_name = "BYTES")]
    max_rate: Option<u64>,
    /// Test hook: corrupt the first transmission of this piece.
    #[arg(long, hide = true)]
    corrupt_seq: Option<u64>,
}

/// `rollout`.
#[derive(Args, Debug)]
pub struct RolloutArgs {
    #[command(flatten)]
    coord: CoordArg,
    /// The sealed swap plan (JSON or protobuf).
    #[arg(long)]
    plan: PathBuf,
    /// Abort unless every consumer precommitted within this time of the
    /// submission (the coordinator enforces it, so a stuck consumer can
    /// never hold a rollout open). Raise it for checkpoints that take
    /// longer to move.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10m")]
    deadline: Duration,
    /// Consumers (worker ids), comma-separated; default every registered
    /// worker.
    #[arg(long, value_delimiter = ',')]
    consumers: Vec<String>,
    /// What a lost consumer does: abort the rollout, or exclude it (it
    /// catches up later).
    #[arg(long, value_enum, default_value_t = LostArg::Abort)]
    on_lost: LostArg,
}

/// `--on-lost`.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum LostArg {
    /// Abort: every consumer stays on the old version.
    Abort,
    /// Exclude it and go on.
    Exclude,
}

/// A multi-threaded runtime for one command.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Completes on Ctrl-C or SIGTERM; the handlers are installed now.
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Runs a cluster process until Ctrl-C or SIGTERM (the handlers are
/// installed before it binds, so a signal sent as soon as its address is
/// printed already stops it cleanly).
fn serve_until_signal<M, Fut>(make: M) -> Result<Outcome>
where
    M: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()>>>) -> Fut,
    Fut: Future<Output = hotweights::Result<()>>,
{
    let rt = runtime()?;
    rt.block_on(async {
        let signal = shutdown_signal()?;
        make(Box::pin(signal)).await.map_err(anyhow::Error::from)
    })?;
    Ok(Outcome::Ok)
}

fn announce(out: &Output, what: &str, addr: SocketAddr, metrics: Option<SocketAddr>) {
    let metrics_url = metrics.map(|a| format!("http://{a}/metrics"));
    let r = if out.json {
        out.json_line(&json!({ what: addr.to_string(), "metrics": metrics_url }))
    } else {
        out.line(format!("{what} on {addr}"))
            .and_then(|()| match &metrics_url {
                Some(u) => out.line(format!("metrics on {u}")),
                None => Ok(()),
            })
    };
    let _ = r.and_then(|()| std::io::stdout().flush());
}

fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

/// `coord ...`.
pub fn coord(cmd: CoordCommand, out: &Output) -> Result<Outcome> {
    match cmd {
        CoordCommand::Serve(args) => coord_serve(args, out),
        CoordCommand::Status(args) => coord_status(args, out),
        CoordCommand::Workers(args) => coord_workers(args, out),
        CoordCommand::SetCurrent(args) => set_current(args, out),
        CoordCommand::Abort(args) => abort(args, out),
    }
}

fn coord_serve(args: CoordServeArgs, out: &Output) -> Result<Outcome> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::from_files(cert, key)?),
        _ => None,
    };
    let token = args
        .token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()?;
    if token.is_none() {
        eprintln!(
            "hotweights coord: no --token-file: any client that reaches {} can drive rollouts",
            args.listen
        );
    }
    let config = CoordConfig {
        tls,
        listen: args.listen,
        metrics: args.metrics,
        state: StateSpec::parse(&args.state, &args.group, args.leader_ttl),
        token,
        worker_lease: args.lease,
        id: args.id.unwrap_or_else(default_id),
    };
    serve_until_signal(|signal| {
        hotweights::cluster::coord::serve(
            config,
            |addr, metrics| announce(out, "listening", addr, metrics),
            signal,
        )
    })
}

fn coord_status(args: CoordArg, out: &Output) -> Result<Outcome> {
    let rt = runtime()?;
    let mut client = args.client()?;
    client.retry_for = Duration::from_secs(3);
    let status = rt.block_on(client.call("Status", |mut s| async move {
        s.status(proto::StatusRequest {}).await
    }))?;
    if out.json {
        out.json_line(&status_json(&status))?;
        return Ok(Outcome::Ok);
    }
    let mut t = key_value_table();
    t.add_row(vec!["coordinator", &status.coordinator]);
    t.add_row(vec!["state", &status.state]);
    t.add_row(vec!["revision", &status.revision.to_string()]);
    let current = if status.current_version.is_empty() {
        "(none)".to_owned()
    } else {
        status.current_version.clone()
    };
    t.add_row(vec!["current version", &current]);
    out.line(t)?;
    if status.rollouts.is_empty() {
        out.line("no rollouts")?;
    }
    for r in &status.rollouts {
        let mut line = format!(
            "rollout {} ({} -> {}): {}",
            r.plan_id, r.from_version, r.to_version, r.phase
        );
        if !r.abort_reason.is_empty() {
            line.push_str(&format!(" ({})", r.abort_reason));
        }
        out.line(line)?;
        let mut t = table(&["consumer", "state", "bytes", "reason"], &[2]);
        for c in &r.consumers {
            t.add_row(vec![
                c.id.clone(),
                c.state.clone(),
                bytes(c.bytes),
                c.reason.clone(),
            ]);
        }
        out.line(t)?;
    }
    Ok(Outcome::Ok)
}

fn status_json(s: &proto::StatusReply) -> serde_json::Value {
    let rollout = |r: &proto::RolloutStatus| {
        json!({
            "plan_id": r.plan_id, "digest": r.digest, "from": r.from_version, "to": r.to_version,
            "phase": r.phase, "staged_bytes": r.staged_bytes, "on_lost": r.on_lost,
            "abort_reason": r.abort_reason, "deadline_left_ms": r.deadline_left_ms,
            "consumers": r.consumers.iter().map(|c| json!({
                "id": c.id, "state": c.state, "bytes": c.bytes, "reason": c.reason,
                "data_addr": c.data_addr,
            })).collect::<Vec<_>>(),
        })
    };
    json!({
        "coordinator": s.coordinator,
        "state": s.state,
        "revision": s.revision,
        "current_version": s.current_version,
        "active": s.active.as_ref().map(rollout),
        "rollouts": s.rollouts.iter().map(rollout).collect::<Vec<_>>(),
    })
}

fn coord_workers(args: CoordArg, out: &Output) -> Result<Outcome> {
    let rt = runtime()?;
    let mut client = args.client()?;
    client.retry_for = Duration::from_secs(3);
    let reply = rt.block_on(client.call("ListWorkers", |mut s| async move {
        s.list_workers(proto::ListWorkersRequest {}).await
    }))?;
    let role = |r: i32| match proto::Role::try_from(r) {
        Ok(proto::Role::Worker) => "worker",
        Ok(proto::Role::Source) => "source",
        _ => "?",
    };
    if out.json {
        let v: Vec<_> = reply
            .workers
            .iter()
            .map(|w| {
                json!({
                    "id": w.id, "role": role(w.role), "data_addr": w.data_addr,
                    "metrics_addr": w.metrics_addr, "current_version": w.current_version,
                    "holds_version": w.holds_version, "last_seen_ms_ago": w.last_seen_ms_ago,
                    "last_pause_ns": w.last_pause_ns, "last_flip_unix_ns": w.last_flip_unix_ns,
                })
            })
            .collect();
        out.json_line(&json!({ "workers": v }))?;
        return Ok(Outcome::Ok);
    }
    let mut t = table(
        &[
            "id",
            "role",
            "data address",
            "version",
            "last seen",
            "last pause",
        ],
        &[4, 5],
    );
    for w in &reply.workers {
        let version = if w.role == proto::Role::Source as i32 {
            format!("holds {}", w.holds_version)
        } else {
            w.current_version.clone()
        };
        t.add_row(vec![
            w.id.clone(),
            role(w.role).into(),
            w.data_addr.clone(),
            version,
            format!("{} ms ago", w.last_seen_ms_ago),
            format!("{:.3} ms", w.last_pause_ns as f64 / 1e6),
        ]);
    }
    out.line(t)?;
    Ok(Outcome::Ok)
}

fn set_current(args: SetCurrentArgs, out: &Output) -> Result<Outcome> {
    let manifest = crate::hotweights::read_valid::<WeightManifest>(&args.manifest)?;
    let rt = runtime()?;
    let mut client = args.coord.client()?;
    client.retry_for = Duration::from_secs(3);
    let version = manifest.version.clone();
    let reply = rt.block_on(client.call("SetCurrentManifest", |mut s| {
        let m = manifest.clone();
        async move { s.set_current_manifest(m).await }
    }))?;
    if out.json {
        out.json_line(&json!({ "current_version": version, "changed": reply.changed }))?;
    } else {
        out.line(format!(
            "the cluster runs {version}{}",
            if reply.changed {
                ""
            } else {
                " (already recorded)"
            }
        ))?;
    }
    Ok(Outcome::Ok)
}

fn abort(args: AbortArgs, out: &Output) -> Result<Outcome> {
    let rt = runtime()?;
    let mut client = args.coord.client()?;
    client.retry_for = Duration::from_secs(3);
    let req = proto::AbortRequest {
        plan_id: args.plan_id.clone(),
        reason: args.reason,
    };
    let reply = rt.block_on(client.call("Abort", |mut s| {
        let r = req.clone();
        async move { s.abort(r).await }
    }))?;
    if out.json {
        out.json_line(&json!({ "plan_id": args.plan_id, "changed": reply.changed }))?;
    } else {
        out.line(format!(
            "rollout {} {}",
            args.plan_id,
            if reply.changed {
                "aborted"
            } else {
                "was already aborted"
            }
        ))?;
    }
    Ok(Outcome::Ok)
}

/// `worker`.
pub fn worker(args: WorkerArgs, out: &Output) -> Result<Outcome> {
    let hook = match (&args.pause, &args.resume) {
        (Some(p), Some(r)) => Some(Hook {
            pause: Action::parse(p),
            resume: Action::parse(r),
            timeout: args.hook_timeout,
        }),
        _ => None,
    };
    let config = WorkerConfig {
        target: args.coord.target()?,
        id: args.id.unwrap_or_else(|| format!("rank{}", args.rank)),
        store: args.store,
        listen: args.listen,
        advertise: args.advertise,
        metrics: args.metrics,
        hook,
        receiver: ReceiverOptions {
            idle_timeout: args.idle_timeout,
            io_timeout: Duration::from_secs(10),
            ..ReceiverOptions::default()
        },
    };
    serve_until_signal(|signal| {
        hotweights::cluster::worker::run(
            config,
            |addr, metrics| announce(out, "receiving", addr, metrics),
            signal,
        )
    })
}

/// `serve-source`.
pub fn serve_source(args: SourceArgs, out: &Output) -> Result<Outcome> {
    let manifest = match &args.manifest {
        Some(p) => crate::hotweights::read_valid::<WeightManifest>(p)?,
        None => {
            let options = hotweights::PublishOptions {
                model_id: args.model_id.clone(),
                chunk_bytes: args.chunk_mib << 20,
                ..hotweights::PublishOptions::new(args.version.clone())
            };
            hotweights::publish(&args.checkpoint, &options, &|_| {})?
        }
    };
    if args.piece_mib == 0 {
        bail!("--piece-mib must be at least 1");
    }
    let prev = match (&args.prev_manifest, &args.prev_checkpoint) {
        (Some(m), Some(dir)) => Some((
            crate::hotweights::read_valid::<WeightManifest>(m)?,
            dir.clone(),
        )),
        _ => None,
    };
    let config = SourceConfig {
        target: args.coord.target()?,
        id: args.id,
        checkpoint: args.checkpoint,
        manifest,
        prev,
        listen: args.listen,
        advertise: args.advertise,
        metrics: args.metrics,
        broadcast: BroadcastOptions {
            window: args.window.max(1),
            io_timeout: Duration::from_secs(5),
            corrupt_seq: args.corrupt_seq,
            ..BroadcastOptions::default()
        },
        piece_bytes: usize::try_from(args.piece_mib << 20).unwrap_or(DEFAULT_PIECE_BYTES),
        max_rate: args.max_rate,
    };
    serve_until_signal(|signal| {
        hotweights::cluster::source::run(
            config,
            |addr, metrics| announce(out, "serving", addr, metrics),
            signal,
        )
    })
}

/// A table of a driven rollout's consumers, one row each; the first
/// column's header is `first`.
pub fn consumers_table(report: &DriveReport, first: &str) -> comfy_table::Table {
    // A consumer's state is its part in the two-phase commit (pending,
    // transferring, precommitted = voted yes, excluded); whether it flipped
    // shows in `version`.
    let mut t = table(
        &[
            first,
            "vote",
            "bytes",
            "version",
            "pause",
            "flip after last vote",
        ],
        &[2, 4, 5],
    );
    let ms = |ns: u64| format!("{:.3} ms", ns as f64 / 1e6);
    for c in &report.consumers {
        t.add_row(vec![
            c.id.clone(),
            if c.reason.is_empty() {
                c.state.clone()
            } else {
                format!("{} ({})", c.state, c.reason)
            },
            bytes(c.bytes),
            c.version.clone(),
            ms(c.pause_ns),
            c.flip_after_ready_ns.map(ms).unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

/// `rollout`.
pub fn rollout(args: RolloutArgs, out: &Output, quiet: bool) -> Result<Outcome> {
    let plan = crate::hotweights::read_valid::<SwapPlan>(&args.plan)?;
    let options = DriveOptions {
        consumers: args.consumers,
        deadline: Some(args.deadline),
        on_lost: match args.on_lost {
            LostArg::Abort => "abort".into(),
            LostArg::Exclude => "exclude".into(),
        },
        ..DriveOptions::default()
    };
    let rt = runtime()?;
    let mut client = args.coord.client()?;
    let bars = MultiProgress::with_draw_target(if quiet || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let style =
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let mut per: HashMap<String, ProgressBar> = HashMap::new();
    let report: DriveReport = rt.block_on(hotweights::cluster::drive::rollout(
        &mut client,
        plan,
        &options,
        |r| {
            for c in &r.consumers {
                let bar = per.entry(c.id.clone()).or_insert_with(|| {
                    let b = bars.add(ProgressBar::new(r.staged_bytes));
                    b.set_style(style.clone());
                    b.set_prefix(c.id.clone());
                    b
                });
                bar.set_position(c.bytes.min(r.staged_bytes));
                bar.set_message(c.state.clone());
            }
        },
    ))?;
    for b in per.values() {
        b.finish_and_clear();
    }
    if out.json {
        out.json_line(&serde_json::to_value(&report)?)?;
    } else {
        let t = consumers_table(&report, "consumer");
        out.line(t)?;
        let mut line = format!(
            "rollout {} to {}: {} in {:.2} s (transfer {:.2} s",
            report.plan_id,
            report.to_version,
            report.phase,
            report.total_seconds,
            report.transfer_seconds
        );
        if let Some(f) = report.flip_seconds {
            line.push_str(&format!(", flip {:.3} ms", f * 1e3));
        }
        line.push(')');
        if !report.abort_reason.is_empty() {
            line.push_str(&format!(": {}", report.abort_reason));
        }
        out.line(line)?;
    }
    Ok(if report.all_committed {
        Outcome::Ok
    } else {
        if !out.json {
            eprintln!(
                "error: not every consumer committed; `bstack hw coord status --coord {}` shows why",
                args.coord.coord
            );
        }
        Outcome::Problems
    })
}
