//! `bstack bcache serve`: the KV-cache planner as a gRPC service, and the
//! client side of `bstack bcache plan --remote ADDR`.
//!
//! The service itself lives in the library (`bcache::service`); this module
//! parses the flags, starts a small tokio runtime (the rest of the binary is
//! synchronous) and prints.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bcache::WindowInput;
use bcache::planner::Report;
use bcache::service::Client;
use bstack_plan::CachePlan;
use clap::Args;
use serde_json::json;

use crate::Outcome;
use crate::bcache::ConfigSource;
use crate::output::Output;

/// The default address of the planner service.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50061";

/// Arguments of `bstack bcache serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to serve the gRPC planner on; port 0 picks a free port. The
    /// bound address is printed as `listening on ADDR`.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Also serve Prometheus metrics (OpenMetrics text) at
    /// http://ADDR/metrics; printed as `metrics on http://ADDR/metrics`.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    config: ConfigSource,
}

/// Runs the service until Ctrl-C or SIGTERM.
pub fn serve(args: ServeArgs, out: &Output) -> Result<Outcome> {
    let config = args.config.load()?;
    let runtime = runtime()?;
    runtime.block_on(bcache::service::serve(
        config.planner,
        args.listen,
        args.metrics,
        |grpc, metrics| {
            // Tests and scripts wait for this line; a closed stdout must not
            // stop the service.
            if let Err(e) = announce(out, grpc, metrics) {
                tracing::warn!("printing the bound addresses: {e}");
            }
        },
    ))?;
    tracing::info!("planner service stopped");
    Ok(Outcome::Ok)
}

/// Prints the bound addresses, one line each (one JSON object with
/// `--json`); every line is flushed at once.
fn announce(out: &Output, grpc: SocketAddr, metrics: Option<SocketAddr>) -> std::io::Result<()> {
    let metrics_url = metrics.map(|addr| format!("http://{addr}/metrics"));
    if out.json {
        return out.json_line(&json!({"listening": grpc.to_string(), "metrics": metrics_url}));
    }
    out.line(format!("listening on {grpc}"))?;
    if let Some(url) = metrics_url {
        out.line(format!("metrics on {url}"))?;
    }
    std::io::stdout().flush()
}

/// Plans the window in the JSON file `input` on the service at `addr`. The
/// input is only parsed here: the service checks it, so an invalid one fails
/// with the service's message, which names the field.
pub fn plan_remote(addr: &str, window: &WindowInput) -> Result<(CachePlan, Report)> {
    let runtime = runtime()?;
    let planned = runtime.block_on(async {
        let mut client = Client::connect(addr).await?;
        client.plan(window).await
    })?;
    Ok(planned)
}

/// A small multi-threaded runtime for one command.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}
