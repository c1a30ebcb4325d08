//! The source: the process that holds the next version and sends it.
//!
//! `bstack hotweights serve-source --checkpoint DIR` publishes the
//! checkpoint's manifest at start, registers with the coordinator as a
//! source holding that version, and watches. When a rollout to its version
//! begins, it reads the plan's buckets from the checkpoint (only the changed
//! chunks, through the plan's transfer ops) and broadcasts them down the
//! chain of consumers still receiving, in the rollout's consumer order
//! ([`crate::dataplane::broadcast`]). A receiver the chain had to route
//! around is reported to the coordinator as failed, which excludes it or
//! aborts the rollout per the plan's policy. A source restarted mid-transfer
//! broadcasts again under the same transfer id; receivers resume from their
//! last verified piece.
//!
//! # Catch-up
//!
//! A worker that missed a rollout (it joined late, or was excluded) asks the
//! source directly, on the source's catch-up address:
//!
//! | Message | Direction | Layout |
//! |---|---|---|
//! | request | worker to source | magic `HWCU` (4), `u16` length + the worker's data-plane address, `u64` length + the protobuf `WeightManifest` of the version it runs (length 0: none) |
//! | answer | source to worker | status `u8` (0 ok, 1 refused), `u64` length + the protobuf `SwapPlan` (ok) or a UTF-8 reason (refused) |
//!
//! The source plans the delta from the worker's version to its own (every
//! chunk, when the worker has none), answers with the sealed plan, and then
//! broadcasts its buckets to a chain of that one worker. The worker verifies,
//! stages and switches as in a rollout; no vote is needed, because the
//! cluster already committed that version.

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bstack_plan::{SwapPlan, WeightManifest};
use prometheus_client::registry::Registry;
use prost::Message;

use super::client::{CoordClient, CoordTarget};
use super::metrics::{Endpoint, SourceMetrics};
use super::proto::{self, Role};
use super::session::{join, next_status};
use super::transfer_id;
use crate::dataplane::{BroadcastOptions, BroadcastReport, Payload, broadcast};
use crate::error::{HotweightsError, Result};
use crate::plan::PlanOptions;
use crate::wire::Encoder;

/// Magic of a catch-up request.
pub const CATCH_UP_MAGIC: [u8; 4] = *b"HWCU";
/// Largest catch-up request or answer accepted.
const MAX_FRAME: u64 = 1 << 30;

/// How a source runs.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Where its coordinators are.
    pub target: CoordTarget,
    /// Its id.
    pub id: String,
    /// The next version's checkpoint directory.
    pub checkpoint: PathBuf,
    /// That checkpoint's manifest.
    pub manifest: WeightManifest,
    /// The previous version's manifest and checkpoint directory, if held:
    /// changed chunks whose old bytes it holds go as sparse deltas when
    /// that is smaller ([`crate::wire`]).
    pub prev: Option<(WeightManifest, PathBuf)>,
    /// Catch-up address to listen on.
    pub listen: SocketAddr,
    /// The catch-up address workers reach it at, when not `listen` (see
    /// [`super::advertised`]).
    pub advertise: Option<SocketAddr>,
    /// Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// Data-plane options (window, timeouts); the transfer id is set per plan.
    pub broadcast: BroadcastOptions,
    /// Piece size.
    pub piece_bytes: usize,
    /// Most bytes per second to send; `None` for as fast as the links go.
    pub max_rate: Option<u64>,
}

/// Whether two manifests hold the same bytes: the same entries with the same
/// chunk hashes (labels and timestamps may differ).
pub fn same_content(a: &WeightManifest, b: &WeightManifest) -> bool {
    let hashes = |m: &WeightManifest| {
        let mut v: Vec<(String, Vec<String>)> = m
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.chunks.iter().map(|c| c.hash.clone()).collect(),
                )
            })
            .chain(m.files.iter().map(|f| {
                (
                    f.path.clone(),
                    f.chunks.iter().map(|c| c.hash.clone()).collect(),
                )
            }))
            .collect();
        v.sort();
        v
    };
    a.hash_algorithm == b.hash_algorithm && a.chunk_bytes == b.chunk_bytes && hashes(a) == hashes(b)
}

/// Payloads at most `rate` bytes per second (`None`: as they come).
struct Paced<I> {
    inner: I,
    rate: Option<u64>,
    start: Instant,
    sent: u64,
}

impl<I: Iterator<Item = Result<Payload>>> Iterator for Paced<I> {
    type Item = Result<Payload>;
    fn next(&mut self) -> Option<Result<Payload>> {
        let item = self.inner.next()?;
        if let (Some(rate), Ok(p)) = (self.rate.filter(|r| *r > 0), &item) {
            self.sent += p.bytes.len() as u64;
            let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Some(item)
    }
}

/// The wire payloads of `plan` from this source's checkpoints, paced.
fn payloads(
    plan: &SwapPlan,
    config: &SourceConfig,
) -> Result<impl Iterator<Item = Result<Payload>> + use<>> {
    let prev = config.prev.as_ref().map(|(m, p)| (m, p.as_path()));
    let encoder = Encoder::new(plan, &config.checkpoint, prev, config.piece_bytes)?;
    Ok(Paced {
        inner: encoder,
        rate: config.max_rate,
        start: Instant::now(),
        sent: 0,
    })
}

/// Writes one length-prefixed frame.
pub(crate) fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u64).to_le_bytes())?;
    w.write_all(bytes)
}

/// Reads one length-prefixed frame.
pub(crate) fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is larger than the {MAX_FRAME} allowed"),
        ));
    }
    let mut buf = Vec::new();
    r.take(len).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

/// A manifest with no entries, of `like`'s model: what a worker with an
/// empty store holds.
pub fn empty_manifest(like: &WeightManifest) -> WeightManifest {
    let mut m = crate::plan::identity(like);
    m.version = "empty".into();
    m.tensors.clear();
    m.files.clear();
    m
}

/// Serves one catch-up request on `stream`.
fn catch_up(
    stream: TcpStream,
    config: &SourceConfig,
    metrics: &SourceMetrics,
) -> Result<BroadcastReport> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "a worker".into());
    let fail = |m: String| HotweightsError::Transfer {
        peer: peer.clone(),
        message: format!("catch-up: {m}"),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| fail(e.to_string()))?;
    let mut r = BufReader::new(stream.try_clone().map_err(|e| fail(e.to_string()))?);
    let mut w = stream;
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(|e| fail(e.to_string()))?;
    if magic != CATCH_UP_MAGIC {
        return Err(fail("not a catch-up request (wrong magic)".into()));
    }
    let mut alen = [0u8; 2];
    r.read_exact(&mut alen).map_err(|e| fail(e.to_string()))?;
    let mut addr = vec![0u8; usize::from(u16::from_le_bytes(alen))];
    r.read_exact(&mut addr).map_err(|e| fail(e.to_string()))?;
    let addr: SocketAddr = String::from_utf8_lossy(&addr)
        .parse()
        .map_err(|e| fail(format!("bad receiver address: {e}")))?;
    let have = read_frame(&mut r).map_err(|e| fail(e.to_string()))?;
    let have = if have.is_empty() {
        empty_manifest(&config.manifest)
    } else {
        WeightManifest::decode(have.as_slice()).map_err(|e| fail(format!("bad manifest: {e}")))?
    };
    let options = PlanOptions {
        plan_id: Some(format!(
            "catch-up:{}->{}@{addr}",
            have.version, config.manifest.version
        )),
        source: Some(std::path::absolute(&config.checkpoint).map_err(|e| fail(e.to_string()))?),
        ..PlanOptions::default()
    };
    let planned = match crate::plan::create(&have, config.manifest.clone(), &options) {
        Ok(p) => p,
        Err(e) => {
            let _ = w.write_all(&[1]);
            let _ = write_frame(&mut w, e.to_string().as_bytes());
            return Err(fail(e.to_string()));
        }
    };
    let plan = planned.plan;
    w.write_all(&[0]).map_err(|e| fail(e.to_string()))?;
    write_frame(&mut w, &plan.encode_to_vec()).map_err(|e| fail(e.to_string()))?;
    drop(w);
    let options = BroadcastOptions {
        transfer_id: transfer_id(&plan.digest),
        ..config.broadcast.clone()
    };
    let report = broadcast(payloads(&plan, config)?, &[addr], &options)?;
    record(metrics, &report, plan.staged_bytes());
    Ok(report)
}

fn record(metrics: &SourceMetrics, report: &BroadcastReport, staged: u64) {
    metrics.bytes_sent.inc_by(report.bytes_sent);
    metrics.staged_bytes.inc_by(staged);
    metrics.retries.inc_by(report.retries);
    metrics.hash_failures.inc_by(report.hash_failures);
    metrics.transfers.inc();
    metrics
        .transfer_seconds
        .observe(report.duration.as_secs_f64());
}

/// Broadcasts one rollout's plan to its consumers still receiving; reports
/// receivers routed around, or aborts the rollout if the source cannot send.
async fn serve_rollout(
    client: &mut CoordClient,
    config: &SourceConfig,
    metrics: &SourceMetrics,
    active: &proto::RolloutStatus,
) -> Result<()> {
    let plan_id = active.plan_id.clone();
    let p = plan_id.clone();
    let plan = client
        .call("GetPlan", |mut s| {
            let p = p.clone();
            async move { s.get_plan(proto::PlanRef { plan_id: p }).await }
        })
        .await?;
    let mut chain = Vec::new();
    let mut by_addr = HashMap::new();
    for c in &active.consumers {
        if !matches!(c.state.as_str(), "pending" | "transferring") {
            continue;
        }
        match c.data_addr.parse::<SocketAddr>() {
            Ok(a) => {
                chain.push(a);
                by_addr.insert(a, c.id.clone());
            }
            Err(_) => eprintln!(
                "hotweights source: consumer {} has no data address (not registered); skipping it",
                c.id
            ),
        }
    }
    let fit = match plan.to.as_ref() {
        Some(to) if same_content(to, &config.manifest) => Ok(()),
        Some(to) => Err(format!(
            "the plan installs {:?}, whose chunks differ from the checkpoint this source holds ({})",
            to.version,
            config.checkpoint.display()
        )),
        None => Err("the plan has no `to` manifest".into()),
    };
    let staged = plan.staged_bytes();
    let outcome = match fit {
        Ok(()) => {
            let cfg = config.clone();
            let digest = plan.digest.clone();
            tokio::task::spawn_blocking(move || -> Result<BroadcastReport> {
                let options = BroadcastOptions {
                    transfer_id: transfer_id(&digest),
                    ..cfg.broadcast.clone()
                };
                broadcast(payloads(&plan, &cfg)?, &chain, &options)
            })
            .await
            .map_err(|e| format!("the broadcast task failed: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()))
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(report) => {
            record(metrics, &report, staged);
            eprintln!(
                "hotweights source: {plan_id}: sent {} wire bytes for {staged} staged bytes to {} receivers in {:.3} s ({} retries, {} excluded)",
                report.bytes,
                report.completed.len(),
                report.duration.as_secs_f64(),
                report.retries,
                report.excluded.len()
            );
            for x in report.excluded {
                let Some(consumer) = by_addr.get(&x.addr).cloned() else {
                    continue;
                };
                let p = plan_id.clone();
                let reason = format!("the data plane routed around it: {}", x.reason);
                client
                    .call("ReportProgress", |mut s| {
                        let req = proto::ProgressRequest {
                            plan_id: p.clone(),
                            consumer: consumer.clone(),
                            bytes: 0,
                            failed: reason.clone(),
                        };
                        async move { s.report_progress(req).await }
                    })
                    .await?;
            }
            Ok(())
        }
        Err(reason) => {
            eprintln!("hotweights source: {plan_id}: cannot send: {reason}; aborting the rollout");
            let p = plan_id.clone();
            client
                .call("Abort", |mut s| {
                    let req = proto::AbortRequest {
                        plan_id: p.clone(),
                        reason: format!("the source cannot send: {reason}"),
                    };
                    async move { s.abort(req).await }
                })
                .await?;
            Ok(())
        }
    }
}

/// Runs a source until `shutdown` completes. `ready` is called with the
/// catch-up and metrics addresses once both are bound.
pub async fn run<F, S>(config: SourceConfig, ready: F, shutdown: S) -> Result<()>
where
    F: FnOnce(SocketAddr, Option<SocketAddr>),
    S: Future<Output = ()>,
{
    let listener = TcpListener::bind(config.listen).map_err(|e| HotweightsError::Transfer {
        peer: config.listen.to_string(),
        message: format!("cannot listen for catch-up requests: {e}"),
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| HotweightsError::Option(format!("reading the bound address: {e}")))?;
    let advertised = super::advertised(bound, config.advertise)?.to_string();
    let metrics = SourceMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let endpoint = Endpoint::bind(config.metrics).await?;
    let metrics_addr = endpoint.as_ref().map(Endpoint::addr);
    ready(bound, metrics_addr);

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(endpoint) = endpoint {
        endpoint.spawn(registry, &mut tasks, "hotweights source");
    }
    {
        let config = config.clone();
        let metrics = metrics.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let config = config.clone();
                let metrics = metrics.clone();
                std::thread::spawn(move || match catch_up(stream, &config, &metrics) {
                    Ok(r) => eprintln!(
                        "hotweights source: catch-up: sent {} bytes in {:.3} s",
                        r.bytes,
                        r.duration.as_secs_f64()
                    ),
                    Err(e) => eprintln!("hotweights source: {e}"),
                });
            }
        });
    }
    let work = async {
        let mut client = config.target.client()?;
        client.retry_for = Duration::from_secs(3600);
        let mut served: std::collections::HashSet<String> = Default::default();
        loop {
            let session =
                source_session(&mut client, &config, &metrics, &advertised, &mut served).await;
            if let Err(e) = session {
                eprintln!("hotweights source: {e}; reconnecting");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        #[allow(unreachable_code)]
        Ok::<(), HotweightsError>(())
    };
    let result = tokio::select! {
        r = work => r,
        () = shutdown => Ok(()),
    };
    tasks.abort_all();
    result
}

/// One connection to the coordinator: register, heartbeat, watch and serve
/// every rollout to this source's version, until the stream breaks.
async fn source_session(
    client: &mut CoordClient,
    config: &SourceConfig,
    metrics: &SourceMetrics,
    advertised: &str,
    served: &mut std::collections::HashSet<String>,
) -> Result<()> {
    let register = proto::RegisterRequest {
        id: config.id.clone(),
        data_addr: advertised.to_owned(),
        role: Role::Source as i32,
        current_version: String::new(),
        metrics_addr: config.metrics.map(|a| a.to_string()).unwrap_or_default(),
        holds_version: config.manifest.version.clone(),
    };
    let (mut stream, heartbeat) = join(client, &config.target, register, None).await?;
    let result = async {
        loop {
            let status = next_status(client, &mut stream).await?;
            let Some(active) = status.active else {
                continue;
            };
            if active.phase != "transferring"
                || active.to_version != config.manifest.version
                || served.contains(&active.plan_id)
            {
                continue;
            }
            served.insert(active.plan_id.clone());
            serve_rollout(client, config, metrics, &active).await?;
        }
    }
    .await;
    heartbeat.abort();
    result
}
