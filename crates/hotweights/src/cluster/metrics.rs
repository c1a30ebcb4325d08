//! Prometheus metrics of the coordinator, workers and sources.
//!
//! Every process serves `GET /metrics` (OpenMetrics text) on its
//! `--metrics` address. The series, all prefixed `hotweights_`:
//!
//! | series | process | kind | meaning |
//! |---|---|---|---|
//! | `coord_rollout_phase` | coordinator | gauge | phase of the latest rollout: 0 none, 1 submitted, 2 transferring, 3 precommitted, 4 committed, 5 aborted |
//! | `coord_workers_alive` | coordinator | gauge | workers and sources holding a lease |
//! | `coord_leader` | coordinator | gauge | 1 while this coordinator leads, 0 as a standby |
//! | `coord_precommits_total` | coordinator | counter | precommit votes accepted |
//! | `coord_commits_total` / `coord_aborts_total` | coordinator | counter | rollouts committed / aborted |
//! | `coord_consumers_lost_total` | coordinator | counter | consumers lost (lease expired or failed) |
//! | `coord_auth_failures_total` | coordinator | counter | calls refused for a missing or wrong token |
//! | `coord_staged_bytes` | coordinator | gauge | bytes each consumer reported staged, label `consumer` |
//! | `worker_bytes_received_total` | worker | counter | piece bytes read from upstream, repeats included |
//! | `worker_bytes_forwarded_total` | worker | counter | piece bytes sent downstream |
//! | `worker_bytes_staged_total` | worker | counter | verified bytes delivered to staging |
//! | `worker_hash_failures_total` | worker | counter | pieces that failed their hash on arrival |
//! | `worker_retries_total` | worker | counter | pieces sent downstream again, and upstream resumes |
//! | `worker_transfer_seconds` | worker | histogram | wall time of one whole transfer |
//! | `worker_bucket_seconds` | worker | histogram | time from a bucket's first piece to its last |
//! | `worker_throughput_bytes_per_second` | worker | gauge | bytes per second of the last transfer |
//! | `worker_pause_seconds` | worker | histogram | how long the engine was paused for a flip |
//! | `worker_rollouts_total` | worker | counter | rollouts by outcome, label `outcome` (`committed`, `aborted`, `failed`, `caught_up`) |
//! | `source_bytes_sent_total` | source | counter | piece bytes sent (wire bytes, sparse records included), resends included |
//! | `source_staged_bytes_total` | source | counter | bucket bytes those transfers delivered to each receiver |
//! | `source_retries_total` | source | counter | pieces sent again |
//! | `source_hash_failures_total` | source | counter | NACKs from the first receiver |
//! | `source_transfers_total` | source | counter | broadcasts and catch-ups finished |
//! | `source_transfer_seconds` | source | histogram | wall time of one broadcast |

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::{HotweightsError, Result};

/// The `Content-Type` of a metrics endpoint.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Seconds buckets: 100 µs to 10 min, about three per decade.
const SECONDS: [f64; 20] = [
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0, 600.0,
];

fn seconds() -> Histogram {
    Histogram::new(SECONDS)
}

/// The coordinator's series.
#[derive(Clone, Debug, Default)]
pub struct CoordMetrics {
    /// Phase of the latest rollout (see the table).
    pub rollout_phase: Gauge,
    /// Workers and sources holding a lease.
    pub workers_alive: Gauge,
    /// 1 while leading.
    pub leader: Gauge,
    /// Precommits accepted.
    pub precommits: Counter,
    /// Rollouts committed.
    pub commits: Counter,
    /// Rollouts aborted.
    pub aborts: Counter,
    /// Consumers lost.
    pub lost: Counter,
    /// Calls refused for their token.
    pub auth_failures: Counter,
    /// Bytes staged per consumer.
    pub staged: Family<ConsumerLabel, Gauge>,
}

/// The `consumer` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    /// Worker id.
    pub consumer: String,
}

/// The `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `committed`, `aborted`, `failed` or `caught_up`.
    pub outcome: String,
}

impl CoordMetrics {
    /// Registers every series in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("hotweights_coord");
        r.register(
            "rollout_phase",
            "Phase of the latest rollout (0 none .. 5 aborted)",
            self.rollout_phase.clone(),
        );
        r.register(
            "workers_alive",
            "Workers and sources holding a lease",
            self.workers_alive.clone(),
        );
        r.register(
            "leader",
            "1 while this coordinator leads",
            self.leader.clone(),
        );
        r.register("precommits", "Precommits accepted", self.precommits.clone());
        r.register("commits", "Rollouts committed", self.commits.clone());
        r.register("aborts", "Rollouts aborted", self.aborts.clone());
        r.register("consumers_lost", "Consumers lost", self.lost.clone());
        r.register(
            "auth_failures",
            "Calls refused for a missing or wrong token",
            self.auth_failures.clone(),
        );
        r.register(
            "staged_bytes",
            "Bytes each consumer reported staged",
            self.staged.clone(),
        );
    }
}

/// A worker's series.
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    /// Piece bytes read from upstream.
    pub bytes_received: Counter,
    /// Piece bytes sent downstream.
    pub bytes_forwarded: Counter,
    /// Verified bytes staged.
    pub bytes_staged: Counter,
    /// Pieces that failed their hash.
    pub hash_failures: Counter,
    /// Resends and resumes.
    pub retries: Counter,
    /// Whole transfers.
    pub transfer_seconds: Histogram,
    /// One bucket, first piece to last.
    pub bucket_seconds: Histogram,
    /// Bytes per second of the last transfer.
    pub throughput: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Engine pauses.
    pub pause_seconds: Histogram,
    /// Rollouts by outcome.
    pub rollouts: Family<OutcomeLabel, Counter>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            bytes_received: Counter::default(),
            bytes_forwarded: Counter::default(),
            bytes_staged: Counter::default(),
            hash_failures: Counter::default(),
            retries: Counter::default(),
            transfer_seconds: seconds(),
            bucket_seconds: seconds(),
            throughput: Gauge::default(),
            pause_seconds: seconds(),
            rollouts: Family::default(),
        }
    }
}

impl WorkerMetrics {
    /// Registers every series in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("hotweights_worker");
        r.register(
            "bytes_received",
            "Piece bytes read from upstream, repeats included",
            self.bytes_received.clone(),
        );
        r.register(
            "bytes_forwarded",
            "Piece bytes sent downstream",
            self.bytes_forwarded.clone(),
        );
        r.register(
            "bytes_staged",
            "Verified bytes delivered to staging",
            self.bytes_staged.clone(),
        );
        r.register(
            "hash_failures",
            "Pieces that failed their hash on arrival",
            self.hash_failures.clone(),
        );
        r.register(
            "retries",
            "Pieces sent downstream again, and upstream resumes",
            self.retries.clone(),
        );
        r.register(
            "transfer_seconds",
            "Wall time of one whole transfer",
            self.transfer_seconds.clone(),
        );
        r.register(
            "bucket_seconds",
            "Time from a bucket's first piece to its last",
            self.bucket_seconds.clone(),
        );
        r.register(
            "throughput_bytes_per_second",
            "Bytes per second of the last transfer",
            self.throughput.clone(),
        );
        r.register(
            "pause_seconds",
            "How long the engine was paused for a flip",
            self.pause_seconds.clone(),
        );
        r.register("rollouts", "Rollouts by outcome", self.rollouts.clone());
    }

    /// Counts one rollout outcome.
    pub fn outcome(&self, outcome: &str) {
        self.rollouts
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}

/// A source's series.
#[derive(Clone, Debug)]
pub struct SourceMetrics {
    /// Piece bytes sent, resends included.
    pub bytes_sent: Counter,
    /// Bucket bytes delivered per receiver.
    pub staged_bytes: Counter,
    /// Pieces sent again.
    pub retries: Counter,
    /// NACKs from the first receiver.
    pub hash_failures: Counter,
    /// Transfers finished.
    pub transfers: Counter,
    /// One broadcast.
    pub transfer_seconds: Histogram,
}

impl Default for SourceMetrics {
    fn default() -> Self {
        SourceMetrics {
            bytes_sent: Counter::default(),
            staged_bytes: Counter::default(),
            retries: Counter::default(),
            hash_failures: Counter::default(),
            transfers: Counter::default(),
            transfer_seconds: seconds(),
        }
    }
}

impl SourceMetrics {
    /// Registers every series in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("hotweights_source");
        r.register(
            "bytes_sent",
            "Piece bytes sent, resends included",
            self.bytes_sent.clone(),
        );
        r.register(
            "staged_bytes",
            "Bucket bytes the transfers delivered to each receiver",
            self.staged_bytes.clone(),
        );
        r.register("retries", "Pieces sent again", self.retries.clone());
        r.register(
            "hash_failures",
            "NACKs from the first receiver",
            self.hash_failures.clone(),
        );
        r.register(
            "transfers",
            "Broadcasts and catch-ups finished",
            self.transfers.clone(),
        );
        r.register(
            "transfer_seconds",
            "Wall time of one broadcast",
            self.transfer_seconds.clone(),
        );
    }
}

/// Encodes a registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> Result<String> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .map_err(|e| HotweightsError::Option(format!("encoding metrics: {e}")))?;
    Ok(text)
}

/// A process's metrics endpoint: bound at start, so that a bad address
/// fails before anything runs, and served once the process is up.
#[derive(Debug)]
pub struct Endpoint {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl Endpoint {
    /// Binds `addr`, if given.
    pub async fn bind(addr: Option<SocketAddr>) -> Result<Option<Endpoint>> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let fail = |e: std::io::Error| HotweightsError::Transfer {
            peer: addr.to_string(),
            message: format!("cannot listen for metrics: {e}"),
        };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        Ok(Some(Endpoint { listener, addr }))
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` from `registry` as one of `tasks`; a failure
    /// is logged under `who`.
    pub fn spawn(
        self,
        registry: Registry,
        tasks: &mut tokio::task::JoinSet<()>,
        who: &'static str,
    ) {
        let registry = Arc::new(registry);
        tasks.spawn(async move {
            if let Err(e) = serve(self.listener, registry).await {
                eprintln!("{who}: {e}");
            }
        });
    }
}

/// Serves `GET /metrics` from `registry` on `listener` until the task is
/// dropped.
async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) -> Result<()> {
    use axum::http::{StatusCode, header};
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(registry): axum::extract::State<Arc<Registry>>| async move {
                    match encode(&registry) {
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
        .with_state(registry);
    axum::serve(listener, app)
        .await
        .map_err(|e| HotweightsError::Option(format!("serving metrics: {e}")))
}
