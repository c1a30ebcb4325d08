//! The coordinator as a gRPC service: `bstack hotweights coord serve`.
//!
//! [`CoordService`] puts the [`Coordinator`] core behind the `Coordinator`
//! service of `cluster.proto`. Every call runs on the blocking pool (a save
//! is an fsync or a Redis round trip) under one lock, so calls are applied
//! one at a time, each saved before it is answered.
//!
//! # Background work
//!
//! - Every tenth of a lease, expired worker leases are dropped and reported
//!   to the active rollout ([`Coordinator::expire`]), which also aborts a
//!   rollout whose deadline passed.
//! - With Redis state, a leader renews its lease every third of its time to
//!   live and steps down (answering `UNAVAILABLE`) the moment it cannot; a
//!   standby tries to take the lease as often, and when it does, loads the
//!   state the old leader saved and carries on from there. Workers fail over
//!   by themselves (they are given every coordinator's address).
//!
//! # Watch
//!
//! A `Watch` stream first sends the whole [`proto::StatusReply`], then
//! every event of the active rollout from its first (so a late joiner sees
//! `began`), then each new event as it is saved. A standby ends the stream
//! with `UNAVAILABLE`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bstack_plan::{SwapPlan, WeightManifest};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::metrics::{ConsumerLabel, CoordMetrics, Endpoint};
use super::proto::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use super::proto::{self, Role};
use super::{Token, now_unix_ns};
use crate::coordinator::{Coordinator, CoordinatorOptions};
use crate::coordstate::{LeaderLease, RedbState, RedisState, StateStore};
use crate::error::{HotweightsError, Result};
use crate::rollout::{Change, ConsumerState, Event, LostPolicy, Phase, Rollout};

/// Where the coordinator keeps its state.
#[derive(Debug, Clone)]
pub enum StateSpec {
    /// An embedded redb file (one coordinator).
    Redb(PathBuf),
    /// Redis, shared by a leader and its standbys.
    Redis {
        /// `redis://[:password@]host:port[/db]`.
        url: String,
        /// Names the coordinator group (several groups may share a server).
        name: String,
        /// How long the leader lease lives unless renewed.
        lease_ttl: Duration,
    },
}

impl StateSpec {
    /// `redis://...` is Redis; anything else a redb file path.
    pub fn parse(text: &str, name: &str, lease_ttl: Duration) -> StateSpec {
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            StateSpec::Redis {
                url: text.to_owned(),
                name: name.to_owned(),
                lease_ttl,
            }
        } else {
            StateSpec::Redb(text.into())
        }
    }
}

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Prometheus endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Where the state lives.
    pub state: StateSpec,
    /// The bearer token every call must carry; `None` for none.
    pub token: Option<Token>,
    /// A worker not heard from for this long is lost.
    pub worker_lease: Duration,
    /// This coordinator's id (in the leader lease and in `Status`).
    pub id: String,
    /// Serve over TLS with this certificate; `None` for plaintext.
    pub tls: Option<ServerTls>,
}

/// The coordinator's TLS certificate chain and private key (PEM). `Debug`
/// shows the file names only.
#[derive(Clone)]
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert_file)
            .field("key", &self.key_file)
            .finish()
    }
}

/// Whether `pem` holds a PEM block whose label ends with `label`.
fn has_pem(pem: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(pem).lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|r| r.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    })
}

impl ServerTls {
    /// Reads the certificate chain and its private key from PEM files;
    /// errors name the file at fault.
    pub fn from_files(cert_file: &Path, key_file: &Path) -> Result<ServerTls> {
        let read = |what: &str, p: &Path| {
            std::fs::read(p).map_err(|e| {
                HotweightsError::Option(format!("reading the TLS {what} {}: {e}", p.display()))
            })
        };
        let cert = read("certificate", cert_file)?;
        let key = read("private key", key_file)?;
        if !has_pem(&cert, "CERTIFICATE") {
            return Err(HotweightsError::Option(format!(
                "TLS certificate {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
                cert_file.display()
            )));
        }
        if !has_pem(&key, "PRIVATE KEY") {
            return Err(HotweightsError::Option(format!(
                "TLS private key {}: no PEM private key (-----BEGIN ... PRIVATE KEY-----) in it",
                key_file.display()
            )));
        }
        let tls = ServerTls {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            cert,
            key,
        };
        // Parse now, so that a bad pair fails before anything listens.
        tls.apply(Server::builder())?;
        Ok(tls)
    }

    /// `server` serving TLS with this identity.
    fn apply(&self, server: Server) -> Result<Server> {
        server
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key)))
            .map_err(|e| {
                HotweightsError::Option(format!(
                    "TLS certificate {} with key {}: {}",
                    self.cert_file.display(),
                    self.key_file.display(),
                    super::client::chain(&e)
                ))
            })
    }
}

/// What the coordinator knows of a registered process beyond its lease.
#[derive(Debug, Clone, Default)]
struct Info {
    role: i32,
    data_addr: String,
    metrics_addr: String,
    current_version: String,
    holds_version: String,
    last_pause_ns: u64,
    last_flip_unix_ns: u64,
}

/// The coordinator core over whichever state store was configured.
type Core = Coordinator<Box<dyn StateStore>>;

struct Inner {
    coord: Option<Core>,
    info: BTreeMap<String, Info>,
    plans: HashMap<String, Arc<SwapPlan>>,
    last_plan: Option<String>,
}

/// The gRPC service. See the module documentation.
#[derive(Clone)]
pub struct CoordService {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    token: Option<Token>,
    metrics: CoordMetrics,
    id: String,
    lease: Duration,
}

impl std::fmt::Debug for CoordService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordService")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The gRPC status of a crate error.
fn status(e: HotweightsError) -> Status {
    match e {
        HotweightsError::Rollout(_) => Status::failed_precondition(e.to_string()),
        HotweightsError::Option(_) | HotweightsError::Plan(_) => {
            Status::invalid_argument(e.to_string())
        }
        HotweightsError::Mismatch(_) | HotweightsError::Verify(_) => {
            Status::invalid_argument(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

/// Name of a phase, as in the proto.
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Submitted => "submitted",
        Phase::Transferring => "transferring",
        Phase::Precommitted => "precommitted",
        Phase::Committed => "committed",
        Phase::Aborted => "aborted",
    }
}

fn phase_gauge(p: Phase) -> i64 {
    match p {
        Phase::Submitted => 1,
        Phase::Transferring => 2,
        Phase::Precommitted => 3,
        Phase::Committed => 4,
        Phase::Aborted => 5,
    }
}

/// An event as the proto carries it.
fn event_proto(plan_id: &str, index: usize, e: &Event, phase: Phase) -> proto::RolloutEvent {
    let mut out = proto::RolloutEvent {
        plan_id: plan_id.to_owned(),
        index: index as u64,
        phase: phase_name(phase).to_owned(),
        ..proto::RolloutEvent::default()
    };
    match e {
        Event::Submitted => out.kind = "submitted".into(),
        Event::Began => out.kind = "began".into(),
        Event::Progress { consumer, bytes } => {
            out.kind = "progress".into();
            out.consumer = consumer.clone();
            out.bytes = *bytes;
        }
        Event::Precommitted { consumer } => {
            out.kind = "precommitted".into();
            out.consumer = consumer.clone();
        }
        Event::Excluded { consumer, reason } => {
            out.kind = "excluded".into();
            out.consumer = consumer.clone();
            out.reason = reason.clone();
        }
        Event::Ready => out.kind = "ready".into(),
        Event::Committed => out.kind = "committed".into(),
        Event::Aborted { reason } => {
            out.kind = "aborted".into();
            out.reason = reason.clone();
        }
    }
    out
}

impl Inner {
    fn coord(&mut self, id: &str) -> std::result::Result<&mut Core, Status> {
        self.coord.as_mut().ok_or_else(|| {
            Status::unavailable(format!(
                "coordinator {id} is a standby: another coordinator holds the leader lease; \
                 try the next address"
            ))
        })
    }

    fn plan(&mut self, id: &str, plan_id: &str) -> std::result::Result<Arc<SwapPlan>, Status> {
        if let Some(p) = self.plans.get(plan_id) {
            return Ok(p.clone());
        }
        let plan = Arc::new(self.coord(id)?.plan(plan_id).map_err(status)?);
        self.plans.insert(plan_id.to_owned(), plan.clone());
        Ok(plan)
    }

    fn rollout_status(&mut self, id: &str, r: &Rollout, now_ns: u64) -> proto::RolloutStatus {
        let spec = r.spec();
        let staged = self
            .plan(id, &spec.plan_id)
            .map(|p| p.staged_bytes())
            .unwrap_or(0);
        let consumers = spec
            .consumers
            .iter()
            .map(|c| {
                let (state, bytes, reason) = match r.consumers().get(c) {
                    Some(ConsumerState::Pending) | None => ("pending", 0, String::new()),
                    Some(ConsumerState::Transferring { bytes }) => {
                        ("transferring", *bytes, String::new())
                    }
                    Some(ConsumerState::Precommitted) => ("precommitted", staged, String::new()),
                    Some(ConsumerState::Excluded { reason }) => ("excluded", 0, reason.clone()),
                };
                proto::ConsumerStatus {
                    id: c.clone(),
                    state: state.into(),
                    bytes,
                    reason,
                    data_addr: self
                        .info
                        .get(c)
                        .map(|i| i.data_addr.clone())
                        .unwrap_or_default(),
                }
            })
            .collect();
        let abort_reason = r
            .events()
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::Aborted { reason } => Some(reason.clone()),
                _ => None,
            })
            .unwrap_or_default();
        proto::RolloutStatus {
            plan_id: spec.plan_id.clone(),
            digest: spec.plan_digest.clone(),
            from_version: spec.from_version.clone(),
            to_version: spec.to_version.clone(),
            phase: phase_name(r.phase()).into(),
            consumers,
            events: r.events().len() as u64,
            staged_bytes: staged,
            on_lost: match spec.on_lost {
                LostPolicy::Abort => "abort".into(),
                LostPolicy::Exclude => "exclude".into(),
            },
            deadline_left_ms: if spec.deadline_ns == 0 || r.phase().is_terminal() {
                0
            } else {
                spec.deadline_ns.saturating_sub(now_ns) / 1_000_000
            },
            abort_reason,
        }
    }

    fn status(&mut self, id: &str) -> std::result::Result<proto::StatusReply, Status> {
        let now = now_unix_ns();
        let coord = self.coord(id)?;
        let state = coord.state().clone();
        let describe = coord.describe_store();
        let mut reply = proto::StatusReply {
            current_version: state.current_version.clone().unwrap_or_default(),
            coordinator: id.to_owned(),
            state: describe,
            revision: state.revision,
            ..proto::StatusReply::default()
        };
        for (plan_id, r) in &state.rollouts {
            let s = self.rollout_status(id, r, now);
            if state.active.as_deref() == Some(plan_id.as_str()) {
                reply.active = Some(s.clone());
            }
            reply.rollouts.push(s);
        }
        Ok(reply)
    }
}

impl CoordService {
    /// A service over `coord` (`None` starts it as a standby).
    fn new(
        coord: Option<Core>,
        token: Option<Token>,
        metrics: CoordMetrics,
        id: String,
        lease: Duration,
    ) -> CoordService {
        metrics.leader.set(i64::from(coord.is_some()));
        CoordService {
            inner: Arc::new(Mutex::new(Inner {
                coord,
                info: BTreeMap::new(),
                plans: HashMap::new(),
                last_plan: None,
            })),
            changed: watch::Sender::new(0),
            token,
            metrics,
            id,
            lease,
        }
    }

    fn authorize<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if token.accepts(given) {
            Ok(())
        } else {
            self.metrics.auth_failures.inc();
            Err(Status::unauthenticated(
                "missing or wrong bearer token; nothing was changed",
            ))
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Runs `f` on the blocking pool under the lock.
    async fn blocking<T, F>(&self, f: F) -> std::result::Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Inner, &str) -> std::result::Result<T, Status> + Send + 'static,
    {
        let inner = self.inner.clone();
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&inner), &id))
            .await
            .map_err(|e| Status::internal(format!("coordinator task failed: {e}")))?
    }

    /// Applies a rollout change and answers with its events.
    async fn change<F>(
        &self,
        plan_id: String,
        f: F,
    ) -> std::result::Result<Response<proto::ChangeReply>, Status>
    where
        F: FnOnce(&mut Core) -> Result<Change> + Send + 'static,
    {
        let metrics = self.metrics.clone();
        let pid = plan_id.clone();
        let reply = self
            .blocking(move |inner, id| {
                let coord = inner.coord(id)?;
                let change = f(coord).map_err(status)?;
                let Change::Changed(events) = change else {
                    return Ok(proto::ChangeReply::default());
                };
                let (phase, all) = match coord.rollout(&pid) {
                    Ok(r) => (r.phase(), r.events().len()),
                    Err(_) => (Phase::Submitted, events.len()),
                };
                metrics.rollout_phase.set(phase_gauge(phase));
                // Progress is not kept in the log: it takes the position of
                // the next kept event; the others their own.
                let kept = events
                    .iter()
                    .filter(|e| !matches!(e, Event::Progress { .. }))
                    .count();
                let mut next = all.saturating_sub(kept);
                let mut out = Vec::new();
                for e in &events {
                    let index = if matches!(e, Event::Progress { .. }) {
                        all
                    } else {
                        next += 1;
                        next - 1
                    };
                    match e {
                        Event::Precommitted { .. } => {
                            metrics.precommits.inc();
                        }
                        Event::Committed => {
                            metrics.commits.inc();
                        }
                        Event::Aborted { .. } => {
                            metrics.aborts.inc();
                        }
                        Event::Excluded { .. } => {
                            metrics.lost.inc();
                        }
                        Event::Progress { consumer, bytes } => {
                            metrics
                                .staged
                                .get_or_create(&ConsumerLabel {
                                    consumer: consumer.clone(),
                                })
                                .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
                        }
                        _ => {}
                    }
                    out.push(event_proto(&pid, index, e, phase));
                }
                inner.last_plan = Some(pid);
                Ok(proto::ChangeReply {
                    changed: true,
                    events: out,
                })
            })
            .await?;
        if reply.changed {
            self.bump();
        }
        Ok(Response::new(reply))
    }

    /// One round of lease expiry and deadline checks.
    fn tick(&self) {
        let inner = self.inner.clone();
        let id = self.id.clone();
        let metrics = self.metrics.clone();
        let mut g = lock(&inner);
        let Ok(coord) = g.coord(&id) else {
            return;
        };
        let before = coord.state().revision;
        match coord.expire(now_unix_ns()) {
            Ok(lost) => {
                let alive = coord.workers().len();
                let after = coord.state().revision;
                let phase = coord
                    .state()
                    .active
                    .clone()
                    .and_then(|a| coord.rollout(&a).ok().map(Rollout::phase));
                for w in &lost {
                    g.info.remove(w);
                    eprintln!("hotweights coord: worker {w} lost: its lease expired");
                }
                metrics.workers_alive.set(alive as i64);
                if let Some(p) = phase {
                    metrics.rollout_phase.set(phase_gauge(p));
                }
                if after != before {
                    drop(g);
                    self.bump();
                }
            }
            Err(e) => eprintln!("hotweights coord: lease check failed: {e}"),
        }
    }
}

type Reply<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl CoordinatorRpc for CoordService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Reply<proto::RegisterReply> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let heartbeat_ms = (self.lease.as_millis() / 3).max(1) as u64;
        let alive = self.metrics.workers_alive.clone();
        let reply = self
            .blocking(move |inner, id| {
                let coord = inner.coord(id)?;
                coord
                    .register(&r.id, &r.data_addr, now_unix_ns())
                    .map_err(status)?;
                alive.set(coord.workers().len() as i64);
                let current = coord.state().current_version.clone().unwrap_or_default();
                let info = inner.info.entry(r.id.clone()).or_default();
                info.role = r.role;
                info.data_addr = r.data_addr;
                info.metrics_addr = r.metrics_addr;
                info.current_version = r.current_version;
                info.holds_version = r.holds_version;
                Ok(proto::RegisterReply {
                    heartbeat_ms,
                    current_version: current,
                })
            })
            .await?;
        self.bump();
        Ok(Response::new(reply))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Reply<proto::HeartbeatReply> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let (known, moved) = self
            .blocking(move |inner, id| {
                let coord = inner.coord(id)?;
                if coord.heartbeat(&r.id, now_unix_ns()).is_err() {
                    return Ok((false, false));
                }
                let info = inner.info.entry(r.id.clone()).or_default();
                let moved = info.current_version != r.current_version
                    || info.last_flip_unix_ns != r.last_flip_unix_ns;
                info.current_version = r.current_version;
                info.last_pause_ns = r.last_pause_ns;
                info.last_flip_unix_ns = r.last_flip_unix_ns;
                Ok((true, moved))
            })
            .await?;
        if moved {
            self.bump();
        }
        Ok(Response::new(proto::HeartbeatReply { known }))
    }

    async fn submit_plan(
        &self,
        request: Request<proto::SubmitPlanRequest>,
    ) -> Reply<proto::ChangeReply> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let Some(plan) = r.plan else {
            return Err(Status::invalid_argument("SubmitPlan needs a plan"));
        };
        let on_lost = match r.on_lost.as_str() {
            "" | "abort" => LostPolicy::Abort,
            "exclude" => LostPolicy::Exclude,
            other => {
                return Err(Status::invalid_argument(format!(
                    "on_lost: {other:?} is neither \"abort\" nor \"exclude\""
                )));
            }
        };
        let deadline_ns = if r.deadline_ms == 0 {
            0
        } else {
            now_unix_ns().saturating_add(r.deadline_ms.saturating_mul(1_000_000))
        };
        let mut consumers = r.consumers;
        if consumers.is_empty() {
            consumers = self
                .blocking(|inner, _| {
                    Ok(inner
                        .info
                        .iter()
                        .filter(|(_, i)| i.role == Role::Worker as i32)
                        .map(|(id, _)| id.clone())
                        .collect::<Vec<_>>())
                })
                .await?;
            if consumers.is_empty() {
                return Err(Status::failed_precondition(
                    "no worker is registered: start the workers first, or name the consumers",
                ));
            }
        }
        let plan_id = plan.plan_id.clone();
        self.change(plan_id, move |c| {
            c.submit(&plan, consumers, deadline_ns, on_lost)
        })
        .await
    }

    async fn get_plan(&self, request: Request<proto::PlanRef>) -> Reply<SwapPlan> {
        self.authorize(&request)?;
        let plan_id = request.into_inner().plan_id;
        let plan = self
            .blocking(move |inner, id| inner.plan(id, &plan_id))
            .await?;
        Ok(Response::new((*plan).clone()))
    }

    async fn begin(&self, request: Request<proto::PlanRef>) -> Reply<proto::ChangeReply> {
        self.authorize(&request)?;
        let plan_id = request.into_inner().plan_id;
        let p = plan_id.clone();
        self.change(plan_id, move |c| c.begin(&p)).await
    }

    async fn report_progress(
        &self,
        request: Request<proto::ProgressRequest>,
    ) -> Reply<proto::ChangeReply> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let plan_id = r.plan_id.clone();
        if r.failed.is_empty() {
            self.change(plan_id, move |c| {
                c.progress(&r.plan_id, &r.consumer, r.bytes)
            })
            .await
        } else {
            eprintln!(
                "hotweights coord: {} failed in {}: {}",
                r.consumer, r.plan_id, r.failed
            );
            self.change(plan_id, move |c| c.fail(&r.plan_id, &r.consumer, &r.failed))
                .await
        }
    }

    async fn precommit(
        &self,
        request: Request<proto::PrecommitRequest>,
    ) -> Reply<proto::ChangeReply> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let plan_id = r.plan_id.clone();
        self.change(plan_id, move |c| {
            c.precommit(&r.plan_id, &r.consumer, &r.digest)
        })
        .await
    }

    async fn commit(&self, request: Request<proto::PlanRef>) -> Reply<proto::ChangeReply> {
        self.authorize(&request)?;
        let plan_id = request.into_inner().plan_id;
        let p = plan_id.clone();
        self.change(plan_id, move |c| c.commit(&p)).await
    }

    async fn abort(&self, request: Request<proto::AbortRequest>) -> Reply<proto::ChangeReply> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let plan_id = r.plan_id.clone();
        let reason = if r.reason.is_empty() {
            "aborted by an operator".to_owned()
        } else {
            r.reason
        };
        self.change(plan_id, move |c| c.abort(&r.plan_id, &reason))
            .await
    }

    async fn status(&self, request: Request<proto::StatusRequest>) -> Reply<proto::StatusReply> {
        self.authorize(&request)?;
        let reply = self.blocking(|inner, id| inner.status(id)).await?;
        Ok(Response::new(reply))
    }

    async fn list_workers(
        &self,
        request: Request<proto::ListWorkersRequest>,
    ) -> Reply<proto::ListWorkersReply> {
        self.authorize(&request)?;
        let reply = self
            .blocking(|inner, id| {
                let now = now_unix_ns();
                let workers = inner.coord(id)?.workers().clone();
                let out = workers
                    .iter()
                    .map(|(wid, w)| {
                        let info = inner.info.get(wid).cloned().unwrap_or_default();
                        proto::WorkerInfo {
                            id: wid.clone(),
                            role: info.role,
                            data_addr: w.addr.clone(),
                            metrics_addr: info.metrics_addr,
                            current_version: info.current_version,
                            holds_version: info.holds_version,
                            last_seen_ms_ago: now.saturating_sub(w.last_seen_ns) / 1_000_000,
                            last_pause_ns: info.last_pause_ns,
                            last_flip_unix_ns: info.last_flip_unix_ns,
                        }
                    })
                    .collect();
                Ok(proto::ListWorkersReply { workers: out })
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn set_current_manifest(
        &self,
        request: Request<WeightManifest>,
    ) -> Reply<proto::ChangeReply> {
        self.authorize(&request)?;
        let m = request.into_inner();
        let changed = self
            .blocking(move |inner, id| {
                let change = inner.coord(id)?.set_current_manifest(&m).map_err(status)?;
                Ok(matches!(change, Change::Changed(_)))
            })
            .await?;
        if changed {
            self.bump();
        }
        Ok(Response::new(proto::ChangeReply {
            changed,
            events: Vec::new(),
        }))
    }

    async fn get_current_manifest(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Reply<WeightManifest> {
        self.authorize(&request)?;
        let m = self
            .blocking(|inner, id| inner.coord(id)?.current_manifest().map_err(status))
            .await?;
        m.map(Response::new).ok_or_else(|| {
            Status::not_found("no current manifest: no rollout committed and none was set")
        })
    }

    type WatchStream = ReceiverStream<std::result::Result<proto::WatchMessage, Status>>;

    async fn watch(&self, request: Request<proto::StatusRequest>) -> Reply<Self::WatchStream> {
        self.authorize(&request)?;
        let (tx, rx) = mpsc::channel(256);
        let mut changed = self.changed.subscribe();
        let inner = self.inner.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            let mut seen: Option<HashMap<String, usize>> = None;
            loop {
                changed.mark_unchanged();
                let batch = {
                    let mut g = lock(&inner);
                    watch_batch(&mut g, &id, &mut seen)
                };
                match batch {
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    Ok(msgs) => {
                        for m in msgs {
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return; },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a watcher has not been sent yet: the whole status first, then
/// events. `seen` holds, per rollout, how many events were sent.
fn watch_batch(
    inner: &mut Inner,
    id: &str,
    seen: &mut Option<HashMap<String, usize>>,
) -> std::result::Result<Vec<proto::WatchMessage>, Status> {
    use proto::watch_message::Kind;
    let mut out = Vec::new();
    let state = inner.coord(id)?.state().clone();
    let seen = match seen {
        Some(s) => s,
        None => {
            out.push(proto::WatchMessage {
                kind: Some(Kind::Status(inner.status(id)?)),
            });
            // Past rollouts are in the status; the active one's story is
            // sent from its start.
            let s = state
                .rollouts
                .iter()
                .filter(|(p, _)| state.active.as_deref() != Some(p.as_str()))
                .map(|(p, r)| (p.clone(), r.events().len()))
                .collect();
            seen.insert(s)
        }
    };
    for (plan_id, r) in &state.rollouts {
        let from = seen.get(plan_id).copied().unwrap_or(0);
        for (i, e) in r.events().iter().enumerate().skip(from) {
            out.push(proto::WatchMessage {
                kind: Some(Kind::Event(event_proto(plan_id, i, e, r.phase()))),
            });
        }
        seen.insert(plan_id.clone(), r.events().len());
    }
    if out.is_empty() {
        // A worker's version changed (heartbeat): say so with a status.
        out.push(proto::WatchMessage {
            kind: Some(Kind::Status(inner.status(id)?)),
        });
    }
    Ok(out)
}

/// Opens the state and, with Redis, takes the lease if it is free.
fn open(config: &CoordConfig) -> Result<(Option<Core>, Option<LeaderLease>)> {
    let options = CoordinatorOptions {
        lease: config.worker_lease,
    };
    match &config.state {
        StateSpec::Redb(path) => {
            let store: Box<dyn StateStore> = Box::new(RedbState::open(path)?);
            Ok((Some(Coordinator::open(store, options)?), None))
        }
        StateSpec::Redis {
            url,
            name,
            lease_ttl,
        } => {
            let lease = LeaderLease::new(url, name, &config.id, *lease_ttl)?;
            let coord = if lease.try_acquire()? {
                let store: Box<dyn StateStore> = Box::new(RedisState::new(lease.clone()));
                Some(Coordinator::open(store, options)?)
            } else {
                None
            };
            Ok((coord, Some(lease)))
        }
    }
}

/// Keeps (or takes) the leader lease; see the module documentation.
async fn lead(service: CoordService, lease: LeaderLease, ttl: Duration, worker_lease: Duration) {
    let period = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        let leading = lock(&service.inner).coord.is_some();
        let l = lease.clone();
        let outcome = if leading {
            tokio::task::spawn_blocking(move || l.renew()).await
        } else {
            tokio::task::spawn_blocking(move || l.try_acquire()).await
        };
        let held = match outcome {
            Ok(Ok(held)) => {
                last_ok = Instant::now();
                held
            }
            Ok(Err(e)) => {
                eprintln!("hotweights coord: leader lease: {e}");
                // Without an answer, a leader keeps leading only as long as
                // its lease certainly lasts.
                leading && last_ok.elapsed() < ttl - period
            }
            Err(_) => leading,
        };
        if leading && !held {
            eprintln!(
                "hotweights coord {}: lost the leader lease; standing by",
                service.id
            );
            let mut g = lock(&service.inner);
            g.coord = None;
            g.plans.clear();
            drop(g);
            service.metrics.leader.set(0);
            service.bump();
        } else if !leading && held {
            let store: Box<dyn StateStore> = Box::new(RedisState::new(lease.clone()));
            let options = CoordinatorOptions {
                lease: worker_lease,
            };
            match tokio::task::spawn_blocking(move || Coordinator::open(store, options)).await {
                Ok(Ok(coord)) => {
                    eprintln!(
                        "hotweights coord {}: took the leader lease; resuming from revision {}",
                        service.id,
                        coord.state().revision
                    );
                    lock(&service.inner).coord = Some(coord);
                    service.metrics.leader.set(1);
                    service.bump();
                }
                Ok(Err(e)) => eprintln!("hotweights coord: loading the state as new leader: {e}"),
                Err(e) => eprintln!("hotweights coord: loading the state as new leader: {e}"),
            }
        }
    }
}

/// Runs a coordinator until `shutdown` completes. `ready` is called with
/// the bound gRPC and metrics addresses before the first call is served.
/// On shutdown a Redis leader releases its lease so a standby takes over
/// at once.
pub async fn serve<F, S>(config: CoordConfig, ready: F, shutdown: S) -> Result<()>
where
    F: FnOnce(SocketAddr, Option<SocketAddr>),
    S: Future<Output = ()>,
{
    // Pings find watchers whose host vanished, so their streams end.
    let builder = Server::builder()
        .http2_keepalive_interval(Some(super::client::KEEPALIVE))
        .http2_keepalive_timeout(Some(super::client::KEEPALIVE));
    let mut server = match &config.tls {
        Some(tls) => tls.apply(builder)?,
        None => builder,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| HotweightsError::Transfer {
            peer: config.listen.to_string(),
            message: format!("cannot listen for the coordinator: {e}"),
        })?;
    let bound = listener
        .local_addr()
        .map_err(|e| HotweightsError::Option(format!("reading the bound address: {e}")))?;
    let endpoint = Endpoint::bind(config.metrics).await?;
    let metrics_addr = endpoint.as_ref().map(Endpoint::addr);

    let cfg = config.clone();
    let (coord, lease) = tokio::task::spawn_blocking(move || open(&cfg))
        .await
        .map_err(|e| HotweightsError::Option(format!("opening the state: {e}")))??;
    let metrics = CoordMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let service = CoordService::new(
        coord,
        config.token.clone(),
        metrics,
        config.id.clone(),
        config.worker_lease,
    );
    if let Some(c) = lock(&service.inner).coord.as_ref() {
        // Leases are soft state: registered workers come back on their own.
        eprintln!(
            "hotweights coord {}: leading; state at revision {}",
            config.id,
            c.state().revision
        );
    } else {
        eprintln!("hotweights coord {}: standing by", config.id);
    }
    ready(bound, metrics_addr);

    let mut tasks = tokio::task::JoinSet::new();
    let ticker = service.clone();
    let tick_every = (config.worker_lease / 10).max(Duration::from_millis(20));
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(tick_every).await;
            let t = ticker.clone();
            let _ = tokio::task::spawn_blocking(move || t.tick()).await;
        }
    });
    if let (Some(lease), StateSpec::Redis { lease_ttl, .. }) = (lease.clone(), &config.state) {
        tasks.spawn(lead(
            service.clone(),
            lease,
            *lease_ttl,
            config.worker_lease,
        ));
    }
    if let Some(endpoint) = endpoint {
        endpoint.spawn(registry, &mut tasks, "hotweights coord");
    }
    let result = server
        .add_service(
            CoordinatorServer::new(service.clone())
                .max_decoding_message_size(1 << 30)
                .max_encoding_message_size(1 << 30),
        )
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| HotweightsError::Transfer {
            peer: bound.to_string(),
            message: format!("serving the coordinator: {}", super::client::chain(&e)),
        });
    tasks.abort_all();
    if let Some(lease) = lease
        && lock(&service.inner).coord.is_some()
    {
        let _ = tokio::task::spawn_blocking(move || lease.release()).await;
    }
    result
}
