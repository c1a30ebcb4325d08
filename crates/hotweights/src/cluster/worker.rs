//! The worker: receives, stages, votes and flips, beside a serving engine.
//!
//! `bstack hotweights worker --coord ADDR --store DIR --rank R --listen ADDR`
//! registers with the coordinator (its data-plane address is `--listen`),
//! heartbeats, and reconciles with every message of its `watch` stream:
//!
//! - **A rollout begins that names it:** it fetches the plan, checks its
//!   digest, and runs a [`Receiver`] on its listening socket. Every piece is
//!   verified (BLAKE3) as it arrives and forwarded down the chain; the
//!   worker reports its progress every 200 ms. With every bucket in, it
//!   stages the version in its [`Store`] (every chunk checked against the
//!   manifest's hash; nothing visible unless all of it is) and precommits
//!   with the plan's digest. Any failure is reported (`ReportProgress` with
//!   a reason), and the coordinator excludes it or aborts, per the plan.
//! - **The rollout commits:** it pauses the engine ([`Hook`]), makes the new
//!   version current (one atomic rename), resumes, and reports the pause and
//!   the time of the flip in its next heartbeat, sent at once.
//! - **The rollout aborts, or it is excluded:** it stops receiving and
//!   discards what it staged (versions applied but never committed).
//! - **The cluster runs a version it does not** (it joined late, or was
//!   excluded from a rollout that went on): it asks a source holding that
//!   version for a catch-up transfer (see [`super::source`]) and switches.
//!
//! A worker restarted at any point starts over from what its store holds:
//! staging is all-or-nothing, so there is never a half-applied version.

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bstack_plan::{SwapPlan, WeightManifest};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::Notify;

use super::client::{CoordClient, CoordTarget};
use super::hook::Hook;
use super::metrics::{Endpoint, WorkerMetrics};
use super::now_unix_ns;
use super::proto::{self, Role};
use super::session::{Beat, join, next_status};
use super::source::{CATCH_UP_MAGIC, read_frame, write_frame};
use crate::dataplane::{AbortHandle, ReceiveReport, Receiver, ReceiverOptions};
use crate::error::{HotweightsError, Result};
use crate::source::{ChunkLoc, ChunkSource};
use crate::store::{ApplySource, PreparedCommit, Store};
use crate::wire::{Decoder, OwnedChunk};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where its coordinators are.
    pub target: CoordTarget,
    /// Its id: the consumer name plans use.
    pub id: String,
    /// Its versioned store.
    pub store: PathBuf,
    /// Data-plane address to listen on.
    pub listen: SocketAddr,
    /// The data-plane address others reach it at, when not `listen` (see
    /// [`super::advertised`]).
    pub advertise: Option<SocketAddr>,
    /// Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// Pause and resume around the flip.
    pub hook: Option<Hook>,
    /// Data-plane receiver options.
    pub receiver: ReceiverOptions,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A rollout the worker takes part in.
#[derive(Debug)]
struct Job {
    plan_id: String,
    to_version: String,
    abort: AbortHandle,
    /// Set when the version is staged and precommitted.
    staged: Arc<AtomicBool>,
    /// Set when the job ended (failed or discarded) without a flip.
    ended: Arc<AtomicBool>,
    /// Bytes received and verified so far.
    bytes: Arc<AtomicU64>,
}

struct Shared {
    config: WorkerConfig,
    store: Mutex<Store>,
    listener: TcpListener,
    beat: Arc<Mutex<Beat>>,
    poke: Arc<Notify>,
    metrics: WorkerMetrics,
    job: Mutex<Option<Job>>,
    /// A commit written ahead, for the version staged last.
    prepared: Mutex<Option<(String, PreparedCommit)>>,
    catching_up: AtomicBool,
    flipping: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Receives the buckets of `plan` on `listener` into memory, verifying and
    /// forwarding; returns the buckets and the receiver's report.
    fn receive(
        &self,
        plan: &SwapPlan,
        abort: &AbortHandle,
        bytes: &AtomicU64,
    ) -> Result<(HashMap<u32, Vec<u8>>, ReceiveReport)> {
        let from = self.held_from_manifest(plan);
        let old = |loc: &ChunkLoc<'_>| lock(&self.store).read_chunk(loc);
        let metrics = &self.metrics;
        let mut decoder = Decoder::new(plan, from.as_ref())?;
        let mut started: HashMap<u32, Instant> = HashMap::new();
        let l = self
            .listener
            .try_clone()
            .map_err(|e| HotweightsError::Transfer {
                peer: "data-plane listener".into(),
                message: e.to_string(),
            })?;
        let receiver = Receiver::from_listener(l)
            .with_options(self.config.receiver.clone())
            .with_abort(abort.clone());
        // Whole chunks go to the store while the rest still arrives, on
        // their own thread, so the apply after the transfer finds them
        // written and synced. A chunk that fails here is only logged: the
        // apply stores it again from the bucket, and checks it.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(OwnedChunk, Vec<u8>)>(8);
        let report = std::thread::scope(|scope| {
            scope.spawn(move || {
                for (chunk, data) in rx {
                    let stored = lock(&self.store).stage_chunk(&chunk.loc(), &data);
                    if let Err(e) = stored {
                        eprintln!("hotweights worker {}: staging ahead: {e}", self.config.id);
                    }
                }
            });
            let tx = tx;
            let report = receiver.run(|piece| {
                let first = *started.entry(piece.bucket).or_insert_with(Instant::now);
                let done = decoder.feed(piece.bucket, piece.offset, &piece.bytes, &old)?;
                for ready in decoder.take_ready(piece.bucket) {
                    // The writer gone means only that nothing is staged ahead.
                    let _ = tx.send(ready);
                }
                if decoder.is_complete(piece.bucket) {
                    metrics
                        .bucket_seconds
                        .observe(first.elapsed().as_secs_f64());
                }
                bytes.fetch_add(done, Ordering::Relaxed);
                metrics.bytes_staged.inc_by(done);
                Ok(())
            });
            // The writer finishes what it was given, then the scope ends.
            drop(tx);
            report
        })?;
        let buckets = decoder.finish()?;
        metrics.bytes_received.inc_by(report.bytes_received);
        metrics.hash_failures.inc_by(report.hash_failures);
        metrics.retries.inc_by(report.retries + report.resumes);
        metrics.bytes_forwarded.inc_by(report.bytes_forwarded);
        metrics
            .transfer_seconds
            .observe(report.duration.as_secs_f64());
        if report.duration.as_secs_f64() > 0.0 {
            metrics
                .throughput
                .set(report.bytes as f64 / report.duration.as_secs_f64());
        }
        Ok((buckets, report))
    }

    fn current(&self) -> String {
        lock(&self.store)
            .state()
            .current
            .clone()
            .unwrap_or_default()
    }

    /// This worker's manifest of the plan's `from` version, if it holds it.
    fn held_from_manifest(&self, plan: &SwapPlan) -> Option<WeightManifest> {
        let from = plan.from.as_ref()?;
        lock(&self.store).manifest(&from.version).ok()
    }

    /// Drops versions applied but never committed.
    fn discard_staging(&self) {
        *lock(&self.prepared) = None;
        let mut store = lock(&self.store);
        if let Err(e) = store.gc(None, true) {
            eprintln!("hotweights worker: discarding staged versions: {e}");
        }
    }

    /// Writes the commit of `version` ahead (see [`Store::prepare_commit`]),
    /// so that the flip itself is one rename.
    fn prepare(&self, version: &str) -> Result<()> {
        let prepared = lock(&self.store).prepare_commit(version)?;
        *lock(&self.prepared) = prepared.map(|p| (version.to_owned(), p));
        Ok(())
    }

    /// Pauses the engine, makes `version` current, resumes; records the
    /// pause, which spans only the rename that makes the new version
    /// current.
    async fn flip(self: &Arc<Self>, version: &str) -> Result<()> {
        let _one = self.flipping.lock().await;
        if self.current() == version {
            return Ok(());
        }
        let ready = matches!(lock(&self.prepared).as_ref(), Some((v, _)) if v == version);
        if !ready {
            let me = self.clone();
            let v = version.to_owned();
            tokio::task::spawn_blocking(move || me.prepare(&v))
                .await
                .map_err(|e| HotweightsError::Option(format!("the flip task failed: {e}")))??;
        }
        if let Some(h) = &self.config.hook
            && let Err(e) = h.pause.run(version, h.timeout).await
        {
            // The cluster committed: switching anyway keeps it on one
            // version; the engine may serve a moment longer unpaused.
            eprintln!(
                "hotweights worker {}: pause hook failed: {e}; switching anyway",
                self.config.id
            );
        }
        // A rename, on this thread: a hand-off to the blocking pool would
        // cost more than the work.
        let t0 = Instant::now();
        let flipped = match lock(&self.prepared).take() {
            Some((_, prepared)) => {
                let mut store = lock(&self.store);
                // Stale (the store changed since): the whole commit instead.
                store.flip(prepared).or_else(|_| store.commit(version))
            }
            None => lock(&self.store).commit(version),
        };
        let pause = t0.elapsed();
        let flip_unix_ns = now_unix_ns();
        if let Some(h) = &self.config.hook
            && let Err(e) = h.resume.run(version, h.timeout).await
        {
            eprintln!(
                "hotweights worker {}: resume hook failed: {e}",
                self.config.id
            );
        }
        flipped?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || lock(&me.store).sync())
            .await
            .map_err(|e| HotweightsError::Option(format!("the sync task failed: {e}")))??;
        self.metrics.pause_seconds.observe(pause.as_secs_f64());
        {
            let mut b = lock(&self.beat);
            b.current_version = version.to_owned();
            b.last_pause_ns = u64::try_from(pause.as_nanos()).unwrap_or(u64::MAX);
            b.last_flip_unix_ns = flip_unix_ns;
        }
        self.poke.notify_one();
        eprintln!(
            "hotweights worker {}: now on {version} (paused {:.3} ms)",
            self.config.id,
            pause.as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Starts taking part in `active`.
    async fn start_job(
        self: &Arc<Self>,
        client: &mut CoordClient,
        active: &proto::RolloutStatus,
    ) -> Result<()> {
        let p = active.plan_id.clone();
        let plan = client
            .call("GetPlan", |mut s| {
                let p = p.clone();
                async move { s.get_plan(proto::PlanRef { plan_id: p }).await }
            })
            .await?;
        let job = Job {
            plan_id: active.plan_id.clone(),
            to_version: active.to_version.clone(),
            abort: AbortHandle::default(),
            staged: Arc::default(),
            ended: Arc::default(),
            bytes: Arc::default(),
        };
        let staged = job.staged.clone();
        let ended = job.ended.clone();
        let bytes = job.bytes.clone();
        let abort_outer = job.abort.clone();
        *lock(&self.job) = Some(job);
        let me = self.clone();
        let plan_id = active.plan_id.clone();
        let expected = active.digest.clone();
        let vote = expected.clone();
        let id = self.config.id.clone();
        let target = self.config.target.clone();
        tokio::spawn(async move {
            let Ok(mut client) = target.client() else {
                return;
            };
            client.retry_for = Duration::from_secs(60);
            // Progress, every 200 ms, while receiving.
            let progress = {
                let (bytes, ended, staged) = (bytes.clone(), ended.clone(), staged.clone());
                let (plan_id, id, target) = (plan_id.clone(), id.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut c) = target.client() else {
                        return;
                    };
                    let mut last = u64::MAX;
                    while !ended.load(Ordering::SeqCst) && !staged.load(Ordering::SeqCst) {
                        let b = bytes.load(Ordering::Relaxed);
                        if b != last {
                            last = b;
                            let req = proto::ProgressRequest {
                                plan_id: plan_id.clone(),
                                consumer: id.clone(),
                                bytes: b,
                                failed: String::new(),
                            };
                            let _ = c
                                .call("ReportProgress", |mut s| {
                                    let r = req.clone();
                                    async move { s.report_progress(r).await }
                                })
                                .await;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            };
            let m = me.clone();
            let b2 = bytes.clone();
            let abort_inner = abort_outer.clone();
            let outcome = tokio::task::spawn_blocking(move || -> Result<()> {
                if plan.compute_digest() != plan.digest || plan.digest != expected {
                    return Err(HotweightsError::Mismatch(format!(
                        "the plan fetched for {} does not match its digest {expected}",
                        plan.plan_id
                    )));
                }
                let (buckets, report) = m.receive(&plan, &abort_inner, &b2)?;
                if abort_inner.is_aborted() {
                    return Err(HotweightsError::Rollout(format!(
                        "{}: aborted",
                        plan.plan_id
                    )));
                }
                let report_text = format!(
                    "{} bytes in {:.3} s, {} hash failures, {} resumes",
                    report.bytes,
                    report.duration.as_secs_f64(),
                    report.hash_failures,
                    report.resumes
                );
                lock(&m.store).apply(&plan, ApplySource::Buckets(&buckets), &|_| {})?;
                // The flip on commit is then one rename.
                if let Some(to) = plan.to.as_ref() {
                    m.prepare(&to.version)?;
                }
                eprintln!(
                    "hotweights worker {}: staged {} ({report_text})",
                    m.config.id,
                    plan.to.as_ref().map(|t| t.version.as_str()).unwrap_or("?")
                );
                Ok(())
            })
            .await
            .unwrap_or_else(|e| {
                Err(HotweightsError::Option(format!(
                    "the receive task failed: {e}"
                )))
            });
            let result = match outcome {
                Ok(()) => {
                    // The last figure first: what the vote stands for.
                    let done = proto::ProgressRequest {
                        plan_id: plan_id.clone(),
                        consumer: id.clone(),
                        bytes: bytes.load(Ordering::Relaxed),
                        failed: String::new(),
                    };
                    let _ = client
                        .call("ReportProgress", |mut s| {
                            let r = done.clone();
                            async move { s.report_progress(r).await }
                        })
                        .await;
                    let req = proto::PrecommitRequest {
                        plan_id: plan_id.clone(),
                        consumer: id.clone(),
                        digest: vote.clone(),
                    };
                    // Staged before the vote goes out: the commit it makes
                    // possible can arrive before the vote's reply.
                    staged.store(true, Ordering::SeqCst);
                    client
                        .call("Precommit", |mut s| {
                            let r = req.clone();
                            async move { s.precommit(r).await }
                        })
                        .await
                        .map(|_| ())
                }
                Err(e) => Err(e),
            };
            progress.abort();
            if let Err(e) = result {
                ended.store(true, Ordering::SeqCst);
                if !abort_outer.is_aborted() {
                    eprintln!("hotweights worker {id}: {plan_id}: {e}");
                    me.metrics.outcome("failed");
                    let req = proto::ProgressRequest {
                        plan_id: plan_id.clone(),
                        consumer: id.clone(),
                        bytes: bytes.load(Ordering::Relaxed),
                        failed: e.to_string(),
                    };
                    let _ = client
                        .call("ReportProgress", |mut s| {
                            let r = req.clone();
                            async move { s.report_progress(r).await }
                        })
                        .await;
                }
                let m = me.clone();
                let _ = tokio::task::spawn_blocking(move || m.discard_staging()).await;
            }
        });
        Ok(())
    }

    /// Whether the store holds `version` with the content of the cluster's
    /// current manifest.
    async fn holds_current(&self, client: &mut CoordClient, version: &str) -> bool {
        let stored = lock(&self.store).manifest(version).ok();
        let Some(stored) = stored else {
            return false;
        };
        let current = client
            .call("GetCurrentManifest", |mut s| async move {
                s.get_current_manifest(proto::StatusRequest {}).await
            })
            .await;
        current.is_ok_and(|m| m.version == version && super::source::same_content(&m, &stored))
    }

    /// Brings this worker to `version`, which the cluster runs, from a source.
    fn catch_up(&self, source: SocketAddr, version: &str) -> Result<()> {
        let fail = |m: String| HotweightsError::Transfer {
            peer: source.to_string(),
            message: format!("catch-up to {version}: {m}"),
        };
        let have = {
            let store = lock(&self.store);
            match store.state().current.clone() {
                Some(v) => store.manifest(&v)?.encode_to_vec(),
                None => Vec::new(),
            }
        };
        let mut s = TcpStream::connect_timeout(&source, Duration::from_secs(3))
            .map_err(|e| fail(e.to_string()))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| fail(e.to_string()))?;
        let addr = self.config.listen.to_string();
        let mut req = Vec::new();
        req.extend_from_slice(&CATCH_UP_MAGIC);
        req.extend_from_slice(&(addr.len() as u16).to_le_bytes());
        req.extend_from_slice(addr.as_bytes());
        std::io::Write::write_all(&mut s, &req).map_err(|e| fail(e.to_string()))?;
        write_frame(&mut s, &have).map_err(|e| fail(e.to_string()))?;
        let mut ok = [0u8; 1];
        std::io::Read::read_exact(&mut s, &mut ok).map_err(|e| fail(e.to_string()))?;
        let body = read_frame(&mut s).map_err(|e| fail(e.to_string()))?;
        if ok[0] != 0 {
            return Err(fail(format!(
                "the source refused: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let plan = SwapPlan::decode(body.as_slice()).map_err(|e| fail(format!("bad plan: {e}")))?;
        if plan.compute_digest() != plan.digest {
            return Err(fail("the plan does not match its digest".into()));
        }
        if plan.to.as_ref().map(|t| t.version.as_str()) != Some(version) {
            return Err(fail("the source sent a plan to another version".into()));
        }
        let bytes = AtomicU64::new(0);
        let abort = AbortHandle::default();
        let (buckets, _) = self.receive(&plan, &abort, &bytes)?;
        lock(&self.store).apply(&plan, ApplySource::Buckets(&buckets), &|_| {})?;
        Ok(())
    }

    /// Compares the coordinator's state with this worker's and acts.
    async fn reconcile(
        self: &Arc<Self>,
        client: &mut CoordClient,
        status: &proto::StatusReply,
    ) -> Result<()> {
        // The job in hand.
        let job_view = lock(&self.job).as_ref().map(|j| {
            (
                j.plan_id.clone(),
                j.to_version.clone(),
                j.staged.load(Ordering::SeqCst),
                j.ended.load(Ordering::SeqCst),
                j.abort.clone(),
            )
        });
        if let Some((plan_id, to, staged, ended, abort)) = job_view {
            let r = status.rollouts.iter().find(|r| r.plan_id == plan_id);
            let phase = r.map(|r| r.phase.as_str()).unwrap_or("aborted");
            let excluded = r
                .and_then(|r| r.consumers.iter().find(|c| c.id == self.config.id))
                .is_some_and(|c| c.state == "excluded");
            match phase {
                "committed" if staged => {
                    *lock(&self.job) = None;
                    self.flip(&to).await?;
                    self.metrics.outcome("committed");
                }
                "committed" | "aborted" => {
                    abort.abort();
                    *lock(&self.job) = None;
                    if phase == "aborted" && !ended {
                        self.metrics.outcome("aborted");
                        let me = self.clone();
                        let _ = tokio::task::spawn_blocking(move || me.discard_staging()).await;
                    }
                }
                _ if excluded || ended => {
                    abort.abort();
                    *lock(&self.job) = None;
                }
                _ => {}
            }
        }
        if lock(&self.job).is_some() {
            return Ok(());
        }
        // A rollout that names this worker.
        if let Some(active) = &status.active {
            let mine = active
                .consumers
                .iter()
                .find(|c| c.id == self.config.id)
                .map(|c| c.state.as_str());
            if active.phase == "transferring" && matches!(mine, Some("pending" | "transferring")) {
                return self.start_job(client, active).await;
            }
            if matches!(mine, Some("pending" | "transferring" | "precommitted")) {
                return Ok(()); // submitted, not begun yet; or waiting
            }
        }
        // Behind the cluster: catch up.
        let cluster = status.current_version.clone();
        if !cluster.is_empty()
            && cluster != self.current()
            && !self.catching_up.swap(true, Ordering::SeqCst)
        {
            // Staged already (this worker restarted between its vote and
            // the commit): switch without a transfer, if the stored version
            // is the one the cluster committed.
            if self.holds_current(client, &cluster).await {
                let r = self.flip(&cluster).await;
                self.catching_up.store(false, Ordering::SeqCst);
                if r.is_ok() {
                    self.metrics.outcome("committed");
                }
                return r;
            }
            let workers = client
                .call("ListWorkers", |mut s| async move {
                    s.list_workers(proto::ListWorkersRequest {}).await
                })
                .await;
            let source = workers.ok().and_then(|w| {
                w.workers
                    .into_iter()
                    .find(|w| w.role == Role::Source as i32 && w.holds_version == cluster)
                    .and_then(|w| w.data_addr.parse::<SocketAddr>().ok())
            });
            let Some(source) = source else {
                self.catching_up.store(false, Ordering::SeqCst);
                eprintln!(
                    "hotweights worker {}: the cluster runs {cluster}, this worker {:?}; no source holds it to catch up from",
                    self.config.id,
                    self.current()
                );
                return Ok(());
            };
            let me = self.clone();
            tokio::spawn(async move {
                let m = me.clone();
                let v = cluster.clone();
                let r = tokio::task::spawn_blocking(move || m.catch_up(source, &v)).await;
                match r {
                    Ok(Ok(())) => match me.flip(&cluster).await {
                        Ok(()) => me.metrics.outcome("caught_up"),
                        Err(e) => eprintln!("hotweights worker: catch-up flip: {e}"),
                    },
                    Ok(Err(e)) => {
                        eprintln!("hotweights worker {}: {e}", me.config.id);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => eprintln!("hotweights worker: catch-up task: {e}"),
                }
                me.catching_up.store(false, Ordering::SeqCst);
                me.poke.notify_one();
            });
        }
        Ok(())
    }
}

/// Runs a worker until `shutdown` completes. `ready` is called with the
/// data-plane and metrics addresses once both are bound.
pub async fn run<F, S>(config: WorkerConfig, ready: F, shutdown: S) -> Result<()>
where
    F: FnOnce(SocketAddr, Option<SocketAddr>),
    S: Future<Output = ()>,
{
    let store = Store::open_or_create(&config.store)?;
    let listener = TcpListener::bind(config.listen).map_err(|e| HotweightsError::Transfer {
        peer: config.listen.to_string(),
        message: format!("cannot listen for the data plane: {e}"),
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| HotweightsError::Option(format!("reading the bound address: {e}")))?;
    let mut config = config;
    // From here on `listen` is the address others dial.
    config.listen = super::advertised(bound, config.advertise)?;
    let metrics = WorkerMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let endpoint = Endpoint::bind(config.metrics).await?;
    let metrics_addr = endpoint.as_ref().map(Endpoint::addr);
    let current = store.state().current.clone().unwrap_or_default();
    let shared = Arc::new(Shared {
        config: config.clone(),
        store: Mutex::new(store),
        listener,
        beat: Arc::new(Mutex::new(Beat {
            current_version: current,
            ..Beat::default()
        })),
        poke: Arc::new(Notify::new()),
        metrics,
        job: Mutex::new(None),
        prepared: Mutex::new(None),
        catching_up: AtomicBool::new(false),
        flipping: tokio::sync::Mutex::new(()),
    });
    ready(bound, metrics_addr);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(endpoint) = endpoint {
        endpoint.spawn(registry, &mut tasks, "hotweights worker");
    }
    let work = async {
        let mut client = config.target.client()?;
        client.retry_for = Duration::from_secs(3600);
        loop {
            if let Err(e) = session(&shared, &mut client).await {
                eprintln!("hotweights worker {}: {e}; reconnecting", config.id);
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
    if let Some(j) = lock(&shared.job).as_ref() {
        j.abort.abort();
    }
    tasks.abort_all();
    result
}

/// One connection to the coordinator: join, then reconcile with every
/// state the stream brings until it breaks.
async fn session(shared: &Arc<Shared>, client: &mut CoordClient) -> Result<()> {
    let config = &shared.config;
    let register = proto::RegisterRequest {
        id: config.id.clone(),
        data_addr: config.listen.to_string(),
        role: Role::Worker as i32,
        current_version: shared.current(),
        metrics_addr: config.metrics.map(|a| a.to_string()).unwrap_or_default(),
        holds_version: String::new(),
    };
    let beat = Some((shared.beat.clone(), shared.poke.clone()));
    let (mut stream, heartbeat) = join(client, &config.target, register, beat).await?;
    let result = async {
        loop {
            let status = next_status(client, &mut stream).await?;
            shared.reconcile(client, &status).await?;
        }
    }
    .await;
    heartbeat.abort();
    result
}
