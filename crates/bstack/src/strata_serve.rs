//! `bstack strata serve`: one store shared by many processes.
//!
//! The store server itself (a documented binary protocol over TCP or a Unix
//! socket, a thread per connection) lives in the library
//! (`stratacache::server`); this module opens the configured store, starts
//! the server, optionally serves Prometheus metrics, and on SIGTERM or
//! Ctrl-C stops accepting, closes the store (every dirty object flushed,
//! every tier durable) and exits.
//!
//! Metrics (`GET /metrics`, OpenMetrics text), read from the store and the
//! server at each scrape:
//!
//! | series | kind | meaning |
//! |---|---|---|
//! | `strata_requests_total` | counter | requests answered |
//! | `strata_error_replies_total` | counter | requests answered with an error status |
//! | `strata_connections_accepted_total` | counter | client connections accepted |
//! | `strata_connections_open` | gauge | client connections open now |
//! | `strata_protocol_errors_total` | counter | connections closed for breaking the protocol or failing I/O |
//! | `strata_received_bytes_total` / `strata_sent_bytes_total` | counter | bytes on the wire |
//! | `strata_tier_objects{tier}` / `strata_tier_bytes{tier}` | gauge | objects and payload bytes held per tier |
//! | `strata_tier_capacity_bytes{tier}` | gauge | payload bytes a tier may hold (0: bounded by its server) |
//! | `strata_tier_hits_total{tier}` / `strata_tier_misses_total{tier}` | counter | reads that found / did not find their key |
//! | `strata_tier_evictions_total{tier}` | counter | objects evicted to make room |
//! | `strata_dirty_objects` | gauge | write-back objects waiting for their flush |
//! | `strata_flushed_total` / `strata_flush_failures_total` | counter | flushes done / failed (each failure is retried) |

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use stratacache::server::{Listener, ServeOptions, Server, ServerStats};
use stratacache::{EngineStats, StorageEngine};

use crate::Outcome;
use crate::output::Output;
use crate::strata::StoreArgs;

/// Serves the store until SIGTERM or Ctrl-C.
pub fn serve(
    listen: String,
    metrics: Option<SocketAddr>,
    store: &StoreArgs,
    out: &Output,
) -> Result<Outcome> {
    let config = store.config()?;
    let engine = Arc::new(config.open().context("opening the store")?);
    let listener = Listener::bind(&listen).with_context(|| format!("binding {listen}"))?;
    let server = Server::start(listener, engine.clone(), ServeOptions::default())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime of the metrics endpoint")?;
    let result = runtime.block_on(async {
        let signal = shutdown_signal()?;
        let metrics_addr = match metrics {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the metrics address {addr}"))?;
                let bound = listener.local_addr()?;
                let state = Scrape {
                    engine: engine.clone(),
                    server: server.handle(),
                };
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, router(state)).await {
                        tracing::warn!("metrics endpoint stopped: {e}");
                    }
                });
                Some(bound)
            }
            None => None,
        };
        announce(out, server.local_addr(), metrics_addr)?;
        signal.await;
        anyhow::Ok(())
    });
    tracing::info!("stopping the store server");
    server.shutdown().context("stopping the server")?;
    engine
        .close()
        .context("closing the store (dirty objects could not be flushed)")?;
    result?;
    Ok(Outcome::Ok)
}

fn announce(out: &Output, addr: &str, metrics: Option<SocketAddr>) -> std::io::Result<()> {
    let metrics_url = metrics.map(|a| format!("http://{a}/metrics"));
    if out.json {
        return out.json_line(&json!({"listening": addr, "metrics": metrics_url}));
    }
    out.line(format!("listening on {addr}"))?;
    if let Some(url) = metrics_url {
        out.line(format!("metrics on {url}"))?;
    }
    Ok(())
}

#[derive(Clone)]
struct Scrape {
    engine: Arc<StorageEngine>,
    server: stratacache::server::ServerHandle,
}

fn router(state: Scrape) -> axum::Router {
    use axum::http::{StatusCode, header};
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(s): axum::extract::State<Scrape>| async move {
                    let text = tokio::task::spawn_blocking(move || {
                        encode(&s.engine.stats(), &s.server.stats())
                    })
                    .await;
                    match text {
                        Ok(Ok(text)) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        ),
                        _ => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            "encoding the metrics failed".to_owned(),
                        ),
                    }
                },
            ),
        )
        .with_state(state)
}

/// The OpenMetrics text of the current counters. A registry is built per
/// scrape from the store's own counters, so the values are the store's,
/// never a copy that could drift.
fn encode(stats: &EngineStats, server: &ServerStats) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let gauge = |v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    registry.register(
        "strata_requests",
        "Requests answered",
        counter(server.requests),
    );
    registry.register(
        "strata_error_replies",
        "Requests answered with an error status",
        counter(server.error_replies),
    );
    registry.register(
        "strata_connections_accepted",
        "Client connections accepted",
        counter(server.connections_accepted),
    );
    registry.register(
        "strata_connections_open",
        "Client connections open now",
        gauge(server.connections_open),
    );
    registry.register(
        "strata_protocol_errors",
        "Connections closed for breaking the protocol or failing I/O",
        counter(server.errors),
    );
    registry.register(
        "strata_received_bytes",
        "Bytes received",
        counter(server.bytes_in),
    );
    registry.register("strata_sent_bytes", "Bytes sent", counter(server.bytes_out));

    type Labels = Vec<(String, String)>;
    let objects = Family::<Labels, Gauge>::default();
    let held = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    let hits = Family::<Labels, Counter>::default();
    let misses = Family::<Labels, Counter>::default();
    let evictions = Family::<Labels, Counter>::default();
    for (name, s) in &stats.tiers {
        let l = vec![("tier".to_owned(), name.clone())];
        let set = |f: &Family<Labels, Gauge>, v: u64| {
            f.get_or_create(&l)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&objects, s.objects);
        set(&held, s.bytes);
        set(&capacity, s.capacity_bytes);
        hits.get_or_create(&l).inc_by(s.hits);
        misses.get_or_create(&l).inc_by(s.misses);
        evictions.get_or_create(&l).inc_by(s.evictions);
    }
    registry.register("strata_tier_objects", "Objects held", objects);
    registry.register("strata_tier_bytes", "Payload bytes held", held);
    registry.register(
        "strata_tier_capacity_bytes",
        "Payload bytes the tier may hold (0: bounded by its server)",
        capacity,
    );
    registry.register("strata_tier_hits", "Reads that found their key", hits);
    registry.register(
        "strata_tier_misses",
        "Reads that did not find their key",
        misses,
    );
    registry.register(
        "strata_tier_evictions",
        "Objects evicted to make room",
        evictions,
    );
    registry.register(
        "strata_dirty_objects",
        "Write-back objects waiting for their flush",
        gauge(stats.chain.dirty),
    );
    registry.register(
        "strata_flushed",
        "Dirty objects flushed",
        counter(stats.chain.flushed),
    );
    registry.register(
        "strata_flush_failures",
        "Flush attempts that failed (each is retried)",
        counter(stats.chain.flush_failures),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// SIGTERM or SIGINT.
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
