//! The planner as a gRPC service: `bstack bcache serve`.
//!
//! A serving engine that keeps its KV cache in several tiers talks to one
//! service per engine (or per coordinated group of engines). Every planning
//! window, typically every 10 to 50 ms, it:
//!
//! 1. calls **`Plan`** with a [`proto::WindowInput`]: its nodes and tiers
//!    (capacity, free bytes, link bandwidth, resident pages), its tenants and
//!    their byte budgets, the per-layer compute latency and the pending
//!    requests with the pages they need and their deadlines. The answer is a
//!    [`proto::PlanResponse`]: the window's [`bstack_plan::CachePlan`] (the
//!    copies to issue, and the pages to prefetch, evict and admit) plus a
//!    [`proto::PlanSummary`] of what was planned, deferred and dropped, and
//!    why. The engine executes the plan and asks again next window; deferred
//!    work is simply part of the next window's requests;
//! 2. optionally calls **`Report`** with [`proto::Counters`], the page hits
//!    it observed since its last report. They feed the planner's decayed
//!    page heat, by which admission (write-through to an intermediate tier)
//!    and eviction rank pages.
//!
//! The service holds one [`Planner`], so heat and tenant token buckets carry
//! over from window to window exactly as they do in `bstack bcache plan
//! --state`. Calls are served one at a time on the planner (planning runs on
//! the blocking thread pool, so it never stalls the network threads).
//!
//! Inputs are checked like the JSON inputs of `bstack bcache plan`
//! ([`WindowInput::check`]); an invalid one is answered with
//! `INVALID_ARGUMENT` and a message that names the field, e.g.
//! `requests[0].node: unknown node "n9"; the input lists "node0"`.
//!
//! With a metrics address, [`serve`] also answers `GET /metrics` with the
//! OpenMetrics text of these series:
//!
//! | series | kind | meaning |
//! |---|---|---|
//! | `bcache_windows_planned_total` | counter | windows planned |
//! | `bcache_bytes_planned_total` | counter | bytes in issued operations |
//! | `bcache_bytes_deferred_total` | counter | bytes deferred to a later window |
//! | `bcache_bytes_dropped_total` | counter | bytes dropped for good |
//! | `bcache_reports_total` | counter | `Report` calls accepted |
//! | `bcache_planning_seconds` | histogram | wall time of one `Plan`'s planning, 10 µs to 1 s buckets |
//!
//! [`Client`] is the other side, as used by `bstack bcache plan --remote`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bstack_plan::{CachePlan, Validate};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};

use crate::config::PlannerConfig;
use crate::error::{Error, Result};
use crate::model::{Node, Request, ResidentPage, Tenant, Tier, TierState, WindowInput};
use crate::planner::{Planner, Reason, Report, RouteHint, TenantUse, Unplanned};

/// Types and gRPC stubs generated from `proto/bstack/bcache/v1/planner.proto`.
///
/// `bstack.plan.v1` messages (the `CachePlan`) are the [`bstack_plan`]
/// crate's own types.
#[allow(
    unused_qualifications,
    reason = "tonic's generated stubs spell out every path"
)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/bstack.bcache.v1.rs"));
}

/// Upper bounds of the `bcache_planning_seconds` buckets: 10 µs to 1 s, three
/// per decade.
pub const PLANNING_BUCKETS: [f64; 16] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0,
];

/// The `Content-Type` of the metrics endpoint.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The service's Prometheus metrics. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    windows: Counter,
    bytes_planned: Counter,
    bytes_deferred: Counter,
    bytes_dropped: Counter,
    reports: Counter,
    planning_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("windows", &self.windows.get())
            .field("reports", &self.reports.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Every series at zero, registered under its name (see the module
    /// documentation).
    pub fn new() -> Metrics {
        let windows = Counter::default();
        let bytes_planned = Counter::default();
        let bytes_deferred = Counter::default();
        let bytes_dropped = Counter::default();
        let reports = Counter::default();
        let planning_seconds = Histogram::new(PLANNING_BUCKETS);
        let mut registry = Registry::default();
        // The text encoder appends `_total` to counters.
        registry.register("bcache_windows_planned", "Windows planned", windows.clone());
        registry.register(
            "bcache_bytes_planned",
            "Bytes in issued operations, merged gaps included",
            bytes_planned.clone(),
        );
        registry.register(
            "bcache_bytes_deferred",
            "Bytes deferred to a later window",
            bytes_deferred.clone(),
        );
        registry.register(
            "bcache_bytes_dropped",
            "Bytes dropped for good",
            bytes_dropped.clone(),
        );
        registry.register("bcache_reports", "Hit reports accepted", reports.clone());
        registry.register(
            "bcache_planning_seconds",
            "Wall time of planning one window, seconds",
            planning_seconds.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            windows,
            bytes_planned,
            bytes_deferred,
            bytes_dropped,
            reports,
            planning_seconds,
        }
    }

    /// Counts one planned window.
    pub fn record_plan(&self, report: &Report) {
        self.windows.inc();
        self.bytes_planned.inc_by(report.planned_bytes);
        self.bytes_deferred.inc_by(report.deferred_bytes);
        self.bytes_dropped.inc_by(report.dropped_bytes);
        self.planning_seconds
            .observe(report.planning_ns as f64 / 1e9);
    }

    /// Counts one accepted hit report.
    pub fn record_report(&self) {
        self.reports.inc();
    }

    /// The OpenMetrics text exposition of every series, `# EOF` included.
    pub fn encode(&self) -> Result<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).map_err(|e| {
            Error::Service {
                context: "encoding metrics".into(),
                message: e.to_string(),
            }
        })?;
        Ok(text)
    }
}

/// The gRPC `Planner` service: one [`Planner`] shared by every call.
#[derive(Debug, Clone)]
pub struct PlannerService {
    planner: Arc<Mutex<Planner>>,
    metrics: Metrics,
}

impl PlannerService {
    /// A service with a fresh planner that records into `metrics`.
    pub fn new(config: PlannerConfig, metrics: Metrics) -> PlannerService {
        PlannerService {
            planner: Arc::new(Mutex::new(Planner::new(config))),
            metrics,
        }
    }

    /// The service, ready for [`tonic::transport::Server::add_service`].
    pub fn into_server(self) -> proto::planner_server::PlannerServer<PlannerService> {
        proto::planner_server::PlannerServer::new(self)
    }
}

/// Origin named in the errors of an invalid `Plan` input.
const PLAN_ORIGIN: &str = "Plan request";
/// Origin named in the errors of an invalid `Report` input.
const REPORT_ORIGIN: &str = "Report request";

#[tonic::async_trait]
impl proto::planner_server::Planner for PlannerService {
    async fn plan(
        &self,
        request: tonic::Request<proto::WindowInput>,
    ) -> Result<tonic::Response<proto::PlanResponse>, Status> {
        let input = window_from_proto(request.into_inner(), PLAN_ORIGIN).map_err(status)?;
        let mut planner = Arc::clone(&self.planner).lock_owned().await;
        let (plan, report) = tokio::task::spawn_blocking(move || planner.plan(&input))
            .await
            .map_err(|e| Status::internal(format!("planning failed: {e}")))?
            .map_err(status)?;
        let problems = plan.problems();
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(Status::internal(format!(
                "the planner produced an invalid plan (a bug): {}",
                list.join("; ")
            )));
        }
        self.metrics.record_plan(&report);
        Ok(tonic::Response::new(proto::PlanResponse {
            plan: Some(plan),
            summary: Some(proto::PlanSummary::from(&report)),
        }))
    }

    async fn report(
        &self,
        request: tonic::Request<proto::Counters>,
    ) -> Result<tonic::Response<proto::ReportAck>, Status> {
        let counters = request.into_inner();
        let hits = hits_from_proto(&counters, REPORT_ORIGIN).map_err(status)?;
        let mut planner = Arc::clone(&self.planner).lock_owned().await;
        let now_ns = counters.now_ns;
        let ack = tokio::task::spawn_blocking(move || {
            planner.observe_hits(&hits, now_ns);
            proto::ReportAck {
                pages_observed: if planner.config().heat {
                    hits.len() as u64
                } else {
                    0
                },
                windows_planned: planner.windows_planned(),
            }
        })
        .await
        .map_err(|e| Status::internal(format!("recording hits failed: {e}")))?;
        self.metrics.record_report();
        Ok(tonic::Response::new(ack))
    }
}

/// The gRPC status of a library error: input errors are the caller's
/// (`INVALID_ARGUMENT`), anything else is the service's (`INTERNAL`).
fn status(e: Error) -> Status {
    match e {
        Error::Input { .. } | Error::Config { .. } => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// Serves the planner on `listen` (and its metrics on `metrics`, when given)
/// until the process receives Ctrl-C (SIGINT) or SIGTERM, then stops
/// accepting connections, finishes the calls in flight and returns.
///
/// Both addresses are bound before anything is served, so port 0 works:
/// `ready` is called once with the bound addresses, before the first call is
/// accepted.
pub async fn serve<F>(
    config: PlannerConfig,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    ready: F,
) -> Result<()>
where
    F: FnOnce(SocketAddr, Option<SocketAddr>),
{
    // Installed before binding, so that a signal sent as soon as the
    // addresses are announced already shuts down gracefully.
    let signal = shutdown_signal()?;
    serve_until(config, listen, metrics, ready, signal).await
}

/// [`serve`], stopping gracefully when `shutdown` completes instead of on a
/// signal.
pub async fn serve_until<F, S>(
    config: PlannerConfig,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    ready: F,
    shutdown: S,
) -> Result<()>
where
    F: FnOnce(SocketAddr, Option<SocketAddr>),
    S: Future<Output = ()>,
{
    let grpc_listener = bind(listen, "the planner service").await?;
    let grpc_addr = local_addr(&grpc_listener, listen)?;
    let metrics_listener = match metrics {
        Some(addr) => {
            let listener = bind(addr, "the metrics endpoint").await?;
            let bound = local_addr(&listener, addr)?;
            Some((listener, bound))
        }
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|(_, addr)| *addr);

    let registry = Metrics::new();
    let service = PlannerService::new(config, registry.clone());
    let stop = watch::Sender::new(false);
    ready(grpc_addr, metrics_addr);

    let grpc = async {
        let result = Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(
                TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                stopped(stop.subscribe()),
            )
            .await
            .map_err(|e| Error::Service {
                context: format!("serving the planner on {grpc_addr}"),
                message: error_chain(&e),
            });
        stop.send_replace(true);
        result
    };
    let http = async {
        let result = match metrics_listener {
            Some((listener, addr)) => axum::serve(listener, metrics_router(registry))
                .with_graceful_shutdown(stopped(stop.subscribe()))
                .await
                .map_err(|e| Error::Service {
                    context: format!("serving metrics on {addr}"),
                    message: e.to_string(),
                }),
            None => Ok(()),
        };
        stop.send_replace(true);
        result
    };
    let signal = async {
        let mut stopped_elsewhere = stop.subscribe();
        tokio::select! {
            () = shutdown => {
                stop.send_replace(true);
            }
            _ = stopped_elsewhere.wait_for(|s| *s) => {}
        }
    };
    let (grpc, http, ()) = tokio::join!(grpc, http, signal);
    grpc.and(http)
}

/// The axum app of the metrics endpoint: `GET /metrics`.
fn metrics_router(metrics: Metrics) -> axum::Router {
    use axum::http::{StatusCode, header};
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(metrics): axum::extract::State<Metrics>| async move {
                    match metrics.encode() {
                        Ok(text) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
                            text,
                        ),
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            e.to_string(),
                        ),
                    }
                },
            ),
        )
        .with_state(metrics)
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Service {
        context: format!("binding {addr} for {what}"),
        message: e.to_string(),
    })
}

fn local_addr(listener: &TcpListener, asked: SocketAddr) -> Result<SocketAddr> {
    listener.local_addr().map_err(|e| Error::Service {
        context: format!("reading the address bound for {asked}"),
        message: e.to_string(),
    })
}

/// Completes once `stop` holds `true` (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Ctrl-C or SIGTERM. The handlers are installed now, the future only waits.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| Error::Service {
            context: format!("installing the {name} handler"),
            message: e.to_string(),
        })
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// A client of the planner service.
#[derive(Debug, Clone)]
pub struct Client {
    inner: proto::planner_client::PlannerClient<Channel>,
    target: String,
}

impl Client {
    /// How long [`Client::connect`] waits for the connection.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// How long one call may take, planning included.
    pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

    /// Connects to the service at `addr`: `HOST:PORT` or an `http://` URL.
    pub async fn connect(addr: &str) -> Result<Client> {
        let target = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let fail = |message: String| Error::Service {
            context: format!("planner at {target}"),
            message,
        };
        let endpoint = Endpoint::from_shared(target.clone())
            .map_err(|e| fail(format!("not a valid address: {}", error_chain(&e))))?
            .connect_timeout(Client::CONNECT_TIMEOUT)
            .timeout(Client::CALL_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| fail(format!("cannot connect: {}", error_chain(&e))))?;
        Ok(Client {
            inner: proto::planner_client::PlannerClient::new(channel),
            target,
        })
    }

    /// The URL the client talks to.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Plans one window on the service. The input is sent as it is: the
    /// service checks it, and an invalid one fails with the service's
    /// message, which names the field.
    pub async fn plan(&mut self, input: &WindowInput) -> Result<(CachePlan, Report)> {
        let response = self
            .inner
            .plan(proto::WindowInput::from(input))
            .await
            .map_err(|s| self.call_error("Plan", &s))?
            .into_inner();
        let malformed = |message: String| Error::Service {
            context: format!("planner at {}: Plan", self.target),
            message: format!("malformed reply: {message}"),
        };
        let plan = response.plan.ok_or_else(|| malformed("no plan".into()))?;
        let summary = response
            .summary
            .ok_or_else(|| malformed("no summary".into()))?;
        let report = report_from_summary(summary).map_err(malformed)?;
        Ok((plan, report))
    }

    /// Reports page hits `(layer, page, hits)` observed at `now_ns`.
    pub async fn report(
        &mut self,
        hits: &[(u32, u64, f64)],
        now_ns: u64,
    ) -> Result<proto::ReportAck> {
        let counters = proto::Counters {
            now_ns,
            hits: hits
                .iter()
                .map(|&(layer, page, hits)| proto::PageHits { layer, page, hits })
                .collect(),
        };
        let ack = self
            .inner
            .report(counters)
            .await
            .map_err(|s| self.call_error("Report", &s))?
            .into_inner();
        Ok(ack)
    }

    fn call_error(&self, call: &str, status: &Status) -> Error {
        let message = match status.code() {
            Code::InvalidArgument => format!("invalid argument: {}", status.message()),
            Code::Unavailable => format!("unavailable: {}", status_detail(status)),
            code => format!("{code:?}: {}", status_detail(status)),
        };
        Error::Service {
            context: format!("planner at {}: {call}", self.target),
            message,
        }
    }
}

/// A status's message, with the transport error behind it when there is one.
fn status_detail(status: &Status) -> String {
    match std::error::Error::source(status) {
        Some(source) if status.message().is_empty() => error_chain(source),
        Some(source) => format!("{}: {}", status.message(), error_chain(source)),
        None => status.message().to_owned(),
    }
}

/// An error and its sources on one line, leaving out repeats.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

// ----- proto <-> model -----

impl From<Tier> for proto::Tier {
    fn from(tier: Tier) -> proto::Tier {
        match tier {
            Tier::Gpu => proto::Tier::Gpu,
            Tier::Cpu => proto::Tier::Cpu,
            Tier::Dax => proto::Tier::Dax,
            Tier::Ssd => proto::Tier::Ssd,
            Tier::Remote => proto::Tier::Remote,
        }
    }
}

/// The model's tier of a proto enum value, or why there is none.
fn tier_from_proto(value: i32) -> std::result::Result<Tier, String> {
    match proto::Tier::try_from(value) {
        Ok(proto::Tier::Gpu) => Ok(Tier::Gpu),
        Ok(proto::Tier::Cpu) => Ok(Tier::Cpu),
        Ok(proto::Tier::Dax) => Ok(Tier::Dax),
        Ok(proto::Tier::Ssd) => Ok(Tier::Ssd),
        Ok(proto::Tier::Remote) => Ok(Tier::Remote),
        Ok(proto::Tier::Unspecified) => {
            Err("not set; expected TIER_GPU, TIER_CPU, TIER_DAX, TIER_SSD or TIER_REMOTE".into())
        }
        Err(_) => Err(format!(
            "unknown tier {value}; expected TIER_GPU, TIER_CPU, TIER_DAX, TIER_SSD or TIER_REMOTE"
        )),
    }
}

impl From<&WindowInput> for proto::WindowInput {
    fn from(w: &WindowInput) -> proto::WindowInput {
        proto::WindowInput {
            window_index: w.window_index,
            now_ns: w.now_ns,
            window_ns: w.window_ns,
            nodes: w
                .nodes
                .iter()
                .map(|n| proto::Node {
                    name: n.name.clone(),
                    tiers: n
                        .tiers
                        .iter()
                        .map(|t| proto::TierState {
                            tier: proto::Tier::from(t.tier).into(),
                            capacity_bytes: t.capacity_bytes,
                            free_bytes: t.free_bytes,
                            bandwidth_bytes_per_s: t.bandwidth_bytes_per_s,
                            resident: t
                                .resident
                                .iter()
                                .map(|p| proto::ResidentPage {
                                    page: p.page,
                                    layer: p.layer,
                                    bytes: p.bytes,
                                    pinned: p.pinned,
                                    tensor: p.tensor.clone(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
            tenants: w
                .tenants
                .iter()
                .map(|t| proto::Tenant {
                    name: t.name.clone(),
                    rate_bytes_per_s: t.rate_bytes_per_s,
                    burst_bytes: t.burst_bytes,
                    weight: Some(t.weight),
                })
                .collect(),
            layer_latency_ns: w.layer_latency_ns.clone(),
            requests: w
                .requests
                .iter()
                .map(|r| proto::Request {
                    id: r.id.clone(),
                    node: r.node.clone(),
                    tenant: r.tenant.clone(),
                    pages: r.pages.clone(),
                    layer_first: r.layers[0],
                    layer_end: r.layers[1],
                    src: proto::Tier::from(r.src).into(),
                    dst: proto::Tier::from(r.dst).into(),
                    deadline_ns: r.deadline_ns,
                    page_bytes: r.page_bytes,
                    est_fill_ns: r.est_fill_ns,
                    tensor: r.tensor.clone(),
                    tokens: r.tokens.clone(),
                })
                .collect(),
        }
    }
}

/// Converts a proto window input into the model and checks it
/// ([`WindowInput::check`]); errors name `origin` and the field, with the
/// same paths as the JSON form (`requests[0].node`).
///
/// Proto3 cannot tell an absent field from a default one, so: an empty
/// tenant is `default`, an absent tenant weight is 1, and a request whose
/// layer fields are both 0 spans all layers (`[0, 1)`).
pub fn window_from_proto(w: proto::WindowInput, origin: &str) -> Result<WindowInput> {
    let input_error = |field: String, message: String| Error::Input {
        origin: origin.to_owned(),
        field,
        message,
    };
    let mut nodes = Vec::with_capacity(w.nodes.len());
    for (n, node) in w.nodes.into_iter().enumerate() {
        let mut tiers = Vec::with_capacity(node.tiers.len());
        for (t, tier) in node.tiers.into_iter().enumerate() {
            tiers.push(TierState {
                tier: tier_from_proto(tier.tier)
                    .map_err(|m| input_error(format!("nodes[{n}].tiers[{t}].tier"), m))?,
                capacity_bytes: tier.capacity_bytes,
                free_bytes: tier.free_bytes,
                bandwidth_bytes_per_s: tier.bandwidth_bytes_per_s,
                resident: tier
                    .resident
                    .into_iter()
                    .map(|p| ResidentPage {
                        page: p.page,
                        layer: p.layer,
                        bytes: p.bytes,
                        pinned: p.pinned,
                        tensor: p.tensor,
                    })
                    .collect(),
            });
        }
        nodes.push(Node {
            name: node.name,
            tiers,
        });
    }
    let tenants = w
        .tenants
        .into_iter()
        .map(|t| Tenant {
            name: t.name,
            rate_bytes_per_s: t.rate_bytes_per_s,
            burst_bytes: t.burst_bytes,
            weight: t.weight.unwrap_or(1.0),
        })
        .collect();
    let mut requests = Vec::with_capacity(w.requests.len());
    for (r, req) in w.requests.into_iter().enumerate() {
        let tier = |value: i32, field: &str| {
            tier_from_proto(value).map_err(|m| input_error(format!("requests[{r}].{field}"), m))
        };
        let layers = match (req.layer_first, req.layer_end) {
            (0, 0) => [0, 1],
            (first, end) => [first, end],
        };
        requests.push(Request {
            src: tier(req.src, "src")?,
            dst: tier(req.dst, "dst")?,
            id: req.id,
            node: req.node,
            tenant: if req.tenant.is_empty() {
                "default".into()
            } else {
                req.tenant
            },
            pages: req.pages,
            layers,
            deadline_ns: req.deadline_ns,
            page_bytes: req.page_bytes,
            est_fill_ns: req.est_fill_ns,
            tensor: req.tensor,
            tokens: req.tokens,
        });
    }
    let input = WindowInput {
        window_index: w.window_index,
        now_ns: w.now_ns,
        window_ns: w.window_ns,
        nodes,
        tenants,
        layer_latency_ns: w.layer_latency_ns,
        requests,
    };
    input.check(origin)?;
    Ok(input)
}

/// The hits of a `Report` call, checked: every count finite and >= 0.
pub fn hits_from_proto(counters: &proto::Counters, origin: &str) -> Result<Vec<(u32, u64, f64)>> {
    counters
        .hits
        .iter()
        .enumerate()
        .map(|(i, h)| {
            if h.hits.is_finite() && h.hits >= 0.0 {
                Ok((h.layer, h.page, h.hits))
            } else {
                Err(Error::Input {
                    origin: origin.to_owned(),
                    field: format!("hits[{i}].hits"),
                    message: format!("{} is not a finite number >= 0", h.hits),
                })
            }
        })
        .collect()
}

/// The name of a reason, as in JSON reports and [`proto::Unplanned::reason`].
fn reason_name(reason: Reason) -> String {
    match serde_json::to_value(reason) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{reason:?}"),
    }
}

impl From<&Report> for proto::PlanSummary {
    fn from(r: &Report) -> proto::PlanSummary {
        proto::PlanSummary {
            window_index: r.window_index,
            requests: r.requests,
            late_request_count: r.late_requests.len() as u64,
            late_request_ids: r.late_requests.clone(),
            demand_bytes: r.demand_bytes,
            unique_bytes: r.unique_bytes,
            planned_bytes: r.planned_bytes,
            gap_bytes: r.gap_bytes,
            ops: r.ops,
            deferred_bytes: r.deferred_bytes,
            dropped_bytes: r.dropped_bytes,
            unplanned: r
                .unplanned
                .iter()
                .map(|u| proto::Unplanned {
                    reason: reason_name(u.reason),
                    description: u.reason.describe().to_owned(),
                    dropped: u.reason.is_drop(),
                    node: u.node.to_string(),
                    src: proto::Tier::from(u.src).into(),
                    dst: proto::Tier::from(u.dst).into(),
                    tensor: u.tensor.to_string(),
                    layer: u.layer,
                    page: u.page,
                    count: u.count,
                    bytes: u.bytes,
                })
                .collect(),
            tenants: r
                .tenants
                .iter()
                .map(|t| proto::TenantUse {
                    tenant: t.tenant.clone(),
                    demand_bytes: t.demand_bytes,
                    admitted_bytes: t.admitted_bytes,
                    deferred_bytes: t.deferred_bytes,
                    tokens_left: t.tokens_left,
                })
                .collect(),
            prefetch_depth: r.prefetch_depth.clone(),
            evicted_bytes: r.evicted_bytes,
            admitted_bytes: r.admitted_bytes,
            planning_ns: r.planning_ns,
            credit_deferred: r.credit_deferred.clone(),
            route_hints: r
                .route_hints
                .iter()
                .map(|h| proto::RouteHint {
                    cluster: h.cluster,
                    requests: h.requests.clone(),
                    node: h.node.to_string(),
                    resident_pages: h.resident_pages,
                    nodes_now: h.nodes_now,
                })
                .collect(),
        }
    }
}

/// The planner's report back from a summary; the error says which item of
/// the summary is malformed.
pub fn report_from_summary(s: proto::PlanSummary) -> std::result::Result<Report, String> {
    let mut unplanned = Vec::with_capacity(s.unplanned.len());
    for (i, u) in s.unplanned.into_iter().enumerate() {
        let reason: Reason = serde_json::from_value(serde_json::Value::String(u.reason.clone()))
            .map_err(|_| format!("unplanned[{i}].reason: unknown reason {:?}", u.reason))?;
        let src = tier_from_proto(u.src).map_err(|m| format!("unplanned[{i}].src: {m}"))?;
        let dst = tier_from_proto(u.dst).map_err(|m| format!("unplanned[{i}].dst: {m}"))?;
        unplanned.push(Unplanned {
            reason,
            node: u.node.into(),
            src,
            dst,
            tensor: u.tensor.into(),
            layer: u.layer,
            page: u.page,
            count: u.count,
            bytes: u.bytes,
        });
    }
    let mut route_hints = Vec::with_capacity(s.route_hints.len());
    for (i, h) in s.route_hints.into_iter().enumerate() {
        if h.node.is_empty() {
            return Err(format!("route_hints[{i}].node: empty; a hint names a node"));
        }
        if h.requests.len() < 2 {
            return Err(format!(
                "route_hints[{i}].requests: {} listed; a cluster has at least 2",
                h.requests.len()
            ));
        }
        if let Some((j, p)) = h
            .requests
            .iter()
            .enumerate()
            .find(|&(_, &p)| u64::from(p) >= s.requests)
        {
            return Err(format!(
                "route_hints[{i}].requests[{j}]: position {p} is past the window's {} requests",
                s.requests
            ));
        }
        route_hints.push(RouteHint {
            cluster: h.cluster,
            requests: h.requests,
            node: h.node.into(),
            resident_pages: h.resident_pages,
            nodes_now: h.nodes_now,
        });
    }
    Ok(Report {
        window_index: s.window_index,
        requests: s.requests,
        late_requests: s.late_request_ids,
        demand_bytes: s.demand_bytes,
        unique_bytes: s.unique_bytes,
        planned_bytes: s.planned_bytes,
        gap_bytes: s.gap_bytes,
        ops: s.ops,
        deferred_bytes: s.deferred_bytes,
        dropped_bytes: s.dropped_bytes,
        unplanned,
        credit_deferred: s.credit_deferred,
        tenants: s
            .tenants
            .into_iter()
            .map(|t| TenantUse {
                tenant: t.tenant,
                demand_bytes: t.demand_bytes,
                admitted_bytes: t.admitted_bytes,
                deferred_bytes: t.deferred_bytes,
                tokens_left: t.tokens_left,
            })
            .collect(),
        prefetch_depth: s.prefetch_depth,
        evicted_bytes: s.evicted_bytes,
        admitted_bytes: s.admitted_bytes,
        planning_ns: s.planning_ns,
        route_hints,
    })
}

/// Parses a window input from JSON without [`WindowInput::check`], for a
/// client that leaves checking to the service; parse errors name the field.
#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tokio::sync::oneshot;

    use super::*;

    /// One node with gpu and cpu tiers, two requests sharing pages 2 and 3.
    fn window() -> WindowInput {
        let request = |id: &str, pages: Vec<u64>| Request {
            id: id.into(),
            node: "node0".into(),
            tenant: "default".into(),
            pages,
            layers: [0, 1],
            src: Tier::Cpu,
            dst: Tier::Gpu,
            deadline_ns: 5_000_000,
            page_bytes: 65_536,
            est_fill_ns: 0,
            tensor: String::new(),
            tokens: Vec::new(),
        };
        let tier = |tier, capacity_bytes: u64, bandwidth_bytes_per_s| TierState {
            tier,
            capacity_bytes,
            free_bytes: capacity_bytes / 2,
            bandwidth_bytes_per_s,
            resident: vec![ResidentPage {
                page: 99,
                layer: 0,
                bytes: 65_536,
                pinned: true,
                tensor: "kv".into(),
            }],
        };
        WindowInput {
            window_index: 3,
            now_ns: 0,
            window_ns: 0,
            nodes: vec![Node {
                name: "node0".into(),
                tiers: vec![
                    tier(Tier::Gpu, 1 << 30, 50_000_000_000),
                    tier(Tier::Cpu, 8 << 30, 25_000_000_000),
                ],
            }],
            tenants: vec![Tenant {
                name: "default".into(),
                rate_bytes_per_s: 1 << 40,
                burst_bytes: 1 << 30,
                weight: 2.0,
            }],
            layer_latency_ns: vec![500_000],
            requests: vec![
                request("r1", vec![0, 1, 2, 3]),
                request("r2", vec![2, 3, 4, 5]),
            ],
        }
    }

    #[test]
    fn window_round_trips_through_proto() {
        let mut w = window();
        w.requests[1].tokens = vec![7, 8, 9];
        let back = window_from_proto(proto::WindowInput::from(&w), "test").unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn proto_defaults_read_like_json_defaults() {
        let mut p = proto::WindowInput::from(&window());
        p.tenants[0].weight = None;
        p.requests[0].tenant.clear();
        p.requests[0].layer_first = 0;
        p.requests[0].layer_end = 0;
        let w = window_from_proto(p, "test").unwrap();
        assert_eq!(w.tenants[0].weight, 1.0);
        assert_eq!(w.requests[0].tenant, "default");
        assert_eq!(w.requests[0].layers, [0, 1]);
    }

    #[test]
    fn invalid_input_names_the_field() {
        let mut p = proto::WindowInput::from(&window());
        p.nodes[0].tiers[1].tier = proto::Tier::Unspecified.into();
        let e = window_from_proto(p, "test").unwrap_err().to_string();
        assert!(
            e.starts_with("test: nodes[0].tiers[1].tier: not set"),
            "{e}"
        );

        let mut p = proto::WindowInput::from(&window());
        p.requests[1].dst = 42;
        let e = window_from_proto(p, "test").unwrap_err().to_string();
        assert!(
            e.starts_with("test: requests[1].dst: unknown tier 42"),
            "{e}"
        );

        let mut p = proto::WindowInput::from(&window());
        p.requests[0].node = "nope".into();
        let e = window_from_proto(p, "test").unwrap_err();
        assert!(
            matches!(&e, Error::Input { field, .. } if field == "requests[0].node"),
            "{e}"
        );
        assert_eq!(status(e).code(), Code::InvalidArgument);

        let counters = proto::Counters {
            now_ns: 0,
            hits: vec![
                proto::PageHits {
                    layer: 0,
                    page: 1,
                    hits: 1.0,
                },
                proto::PageHits {
                    layer: 0,
                    page: 2,
                    hits: f64::NAN,
                },
            ],
        };
        let e = hits_from_proto(&counters, "test").unwrap_err().to_string();
        assert!(e.starts_with("test: hits[1].hits:"), "{e}");
    }

    #[test]
    fn summary_round_trips_the_report() {
        let mut planner = Planner::new(PlannerConfig {
            route_hints: true,
            ..PlannerConfig::default()
        });
        let mut w = window();
        // A request larger than the GPU is dropped, so `unplanned` is not empty.
        w.requests[1].page_bytes = 1 << 30;
        w.requests[1].tensor = "big".into();
        // Equal prompts on a window of two nodes, so that `route_hints` is
        // not empty either.
        let mut second = w.nodes[0].clone();
        second.name = "node1".into();
        w.nodes.push(second);
        for r in &mut w.requests {
            r.tokens = (0..32).collect();
        }
        let (_, report) = planner.plan(&w).unwrap();
        assert!(!report.unplanned.is_empty(), "{report:?}");
        assert_eq!(report.route_hints.len(), 1, "{report:?}");
        assert_eq!(report.route_hints[0].requests, vec![0, 1]);
        let back = report_from_summary(proto::PlanSummary::from(&report)).unwrap();
        assert_eq!(back, report);

        let mut summary = proto::PlanSummary::from(&report);
        summary.unplanned[0].reason = "bored".into();
        let e = report_from_summary(summary).unwrap_err();
        assert_eq!(e, "unplanned[0].reason: unknown reason \"bored\"");

        let mut summary = proto::PlanSummary::from(&report);
        summary.route_hints[0].node.clear();
        let e = report_from_summary(summary).unwrap_err();
        assert!(e.starts_with("route_hints[0].node: "), "{e}");
        let mut summary = proto::PlanSummary::from(&report);
        summary.route_hints[0].requests[1] = 2;
        let e = report_from_summary(summary).unwrap_err();
        assert_eq!(
            e,
            "route_hints[0].requests[1]: position 2 is past the window's 2 requests"
        );
        let mut summary = proto::PlanSummary::from(&report);
        summary.route_hints[0].requests.truncate(1);
        let e = report_from_summary(summary).unwrap_err();
        assert!(e.starts_with("route_hints[0].requests: 1 listed"), "{e}");
    }

    /// `GET path` over a plain TCP stream; the whole response.
    fn http_get(addr: SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_plans_reports_and_metrics_then_stops() {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = tokio::spawn(serve_until(
            PlannerConfig::default(),
            any,
            Some(any),
            move |grpc, metrics| {
                let _ = ready_tx.send((grpc, metrics));
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        let (grpc, metrics) = ready_rx.await.unwrap();
        let metrics = metrics.unwrap();

        let mut client = Client::connect(&grpc.to_string()).await.unwrap();
        let (plan, report) = client.plan(&window()).await.unwrap();
        // Shared pages 2 and 3 are read once: one op of six pages.
        assert_eq!(plan.ops.len(), 1, "{plan:?}");
        assert_eq!(plan.ops[0].length, 6 * 65_536);
        assert_eq!(report.demand_bytes, 8 * 65_536);
        assert_eq!(report.unique_bytes, 6 * 65_536);
        assert_eq!(report.window_index, 3);

        let mut bad = window();
        bad.requests[0].node = "nope".into();
        let e = client.plan(&bad).await.unwrap_err().to_string();
        assert!(
            e.contains("invalid argument: Plan request: requests[0].node: unknown node"),
            "{e}"
        );

        let ack = client
            .report(&[(0, 7, 3.0), (0, 8, 1.0)], 1_000)
            .await
            .unwrap();
        assert_eq!(ack.pages_observed, 2);
        assert_eq!(ack.windows_planned, 1);
        let e = client
            .report(&[(0, 7, -1.0)], 1_000)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("hits[0].hits"), "{e}");

        let text = tokio::task::spawn_blocking(move || http_get(metrics, "/metrics"))
            .await
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains(OPENMETRICS_CONTENT_TYPE), "{text}");
        for line in [
            "bcache_windows_planned_total 1\n",
            "bcache_bytes_planned_total 393216\n",
            "bcache_bytes_deferred_total 0\n",
            "bcache_bytes_dropped_total 0\n",
            "bcache_reports_total 1\n",
            "bcache_planning_seconds_count 1\n",
            "bcache_planning_seconds_bucket{le=\"+Inf\"} 1\n",
            "# EOF\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(
            std::net::TcpStream::connect(grpc).is_err(),
            "still listening"
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = serve_until(PlannerConfig::default(), addr, None, |_, _| {}, async {})
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("binding {addr} for the planner service:")),
            "{e}"
        );
    }
}
