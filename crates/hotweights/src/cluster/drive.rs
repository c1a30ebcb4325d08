//! Driving one rollout end to end: `bstack hotweights rollout`.
//!
//! [`rollout`] submits a sealed plan, begins it, follows the coordinator's
//! `watch` stream (calling back with the rollout's status on every change,
//! which the CLI draws as one progress bar per worker), commits as soon as
//! every consumer still in has precommitted, and then waits until every such
//! consumer reports in its heartbeat that it runs the new version. Every
//! step is idempotent: running it again after an interruption picks the
//! rollout up where it is.

use std::time::{Duration, Instant};

use bstack_plan::SwapPlan;
use serde::Serialize;

use super::client::CoordClient;
use super::now_unix_ns;
use super::proto;
use crate::error::{HotweightsError, Result};

/// How to drive a rollout.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Consumers; empty for every registered worker.
    pub consumers: Vec<String>,
    /// Commit deadline from submission.
    pub deadline: Option<Duration>,
    /// `abort` or `exclude`.
    pub on_lost: String,
    /// How long to wait for every consumer to flip after the commit.
    pub flip_timeout: Duration,
}

impl Default for DriveOptions {
    fn default() -> Self {
        DriveOptions {
            consumers: Vec::new(),
            deadline: None,
            on_lost: "abort".into(),
            flip_timeout: Duration::from_secs(30),
        }
    }
}

/// One consumer at the end.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerReport {
    /// Worker id.
    pub id: String,
    /// Its last state in the rollout.
    pub state: String,
    /// Bytes it received.
    pub bytes: u64,
    /// Why it was excluded.
    pub reason: String,
    /// The version it runs, per its last heartbeat.
    pub version: String,
    /// How long its engine was paused for the flip, ns.
    pub pause_ns: u64,
    /// When its flip finished, ns after the last precommit was seen.
    pub flip_after_ready_ns: Option<u64>,
}

/// What a driven rollout did.
#[derive(Debug, Clone, Serialize)]
pub struct DriveReport {
    /// The plan.
    pub plan_id: String,
    /// The version installed.
    pub to_version: String,
    /// `committed` or `aborted`.
    pub phase: String,
    /// Why it aborted.
    pub abort_reason: String,
    /// Bytes each consumer stages.
    pub staged_bytes: u64,
    /// Every consumer.
    pub consumers: Vec<ConsumerReport>,
    /// Submission to every precommit, seconds.
    pub transfer_seconds: f64,
    /// Last precommit seen to the last consumer's flip, seconds.
    pub flip_seconds: Option<f64>,
    /// Submission to the end, seconds.
    pub total_seconds: f64,
    /// True when the rollout committed and every consumer runs the new
    /// version.
    pub all_committed: bool,
}

/// Drives `plan` through the coordinator. `on_update` sees the rollout's
/// status on every change.
pub async fn rollout(
    client: &mut CoordClient,
    plan: SwapPlan,
    options: &DriveOptions,
    mut on_update: impl FnMut(&proto::RolloutStatus),
) -> Result<DriveReport> {
    let start = Instant::now();
    let plan_id = plan.plan_id.clone();
    // A rollout nobody can send would wait for its deadline: say so now.
    let to = plan
        .to
        .as_ref()
        .map(|m| m.version.clone())
        .unwrap_or_default();
    let registered = client
        .call("ListWorkers", |mut s| async move {
            s.list_workers(proto::ListWorkersRequest {}).await
        })
        .await?
        .workers;
    let known = client
        .call("Status", |mut s| async move {
            s.status(proto::StatusRequest {}).await
        })
        .await?
        .rollouts
        .iter()
        .any(|r| r.plan_id == plan_id);
    if !known
        && !registered
            .iter()
            .any(|w| w.role == proto::Role::Source as i32 && w.holds_version == to)
    {
        return Err(HotweightsError::Rollout(format!(
            "{plan_id}: no source holding {to:?} is registered with the coordinator; start one \
             (bstack hw serve-source --checkpoint DIR --manifest M.json) and run this again"
        )));
    }
    let submit = proto::SubmitPlanRequest {
        plan: Some(plan),
        consumers: options.consumers.clone(),
        deadline_ms: options
            .deadline
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(0),
        on_lost: options.on_lost.clone(),
    };
    client
        .call("SubmitPlan", |mut s| {
            let r = submit.clone();
            async move { s.submit_plan(r).await }
        })
        .await?;
    let pref = proto::PlanRef {
        plan_id: plan_id.clone(),
    };
    client
        .call("Begin", |mut s| {
            let r = pref.clone();
            async move { s.begin(r).await }
        })
        .await?;

    let mut ready_at: Option<(Instant, u64)> = None;
    let last = 'watch: loop {
        let mut stream = client
            .call("Watch", |mut s| async move {
                s.watch(proto::StatusRequest {}).await
            })
            .await?;
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    // Reconnect (perhaps to another coordinator), without
                    // spinning on one that keeps ending the stream.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'watch;
                }
            }
            let status = client
                .call("Status", |mut s| async move {
                    s.status(proto::StatusRequest {}).await
                })
                .await?;
            let Some(r) = status.rollouts.into_iter().find(|r| r.plan_id == plan_id) else {
                return Err(HotweightsError::Rollout(format!(
                    "{plan_id}: the coordinator no longer knows this rollout"
                )));
            };
            on_update(&r);
            match r.phase.as_str() {
                "precommitted" => {
                    if ready_at.is_none() {
                        ready_at = Some((Instant::now(), now_unix_ns()));
                    }
                    let pref = pref.clone();
                    client
                        .call("Commit", |mut s| {
                            let r = pref.clone();
                            async move { s.commit(r).await }
                        })
                        .await?;
                }
                "committed" | "aborted" => break 'watch r,
                _ => {}
            }
        }
    };
    let transfer_seconds = ready_at
        .map(|(t, _)| t.duration_since(start).as_secs_f64())
        .unwrap_or_else(|| start.elapsed().as_secs_f64());
    let mut report = DriveReport {
        plan_id: plan_id.clone(),
        to_version: last.to_version.clone(),
        phase: last.phase.clone(),
        abort_reason: last.abort_reason.clone(),
        staged_bytes: last.staged_bytes,
        consumers: Vec::new(),
        transfer_seconds,
        flip_seconds: None,
        total_seconds: 0.0,
        all_committed: false,
    };
    let in_rollout: Vec<&proto::ConsumerStatus> = last
        .consumers
        .iter()
        .filter(|c| c.state != "excluded")
        .collect();
    let mut workers = Vec::new();
    if last.phase == "committed" {
        let until = Instant::now() + options.flip_timeout;
        loop {
            workers = client
                .call("ListWorkers", |mut s| async move {
                    s.list_workers(proto::ListWorkersRequest {}).await
                })
                .await?
                .workers;
            let flipped = in_rollout.iter().all(|c| {
                workers
                    .iter()
                    .any(|w| w.id == c.id && w.current_version == last.to_version)
            });
            if flipped || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let ready_unix = ready_at.map(|(_, u)| u);
    let mut latest_flip = None;
    for c in &last.consumers {
        let w = workers.iter().find(|w| w.id == c.id);
        let flip_after = match (w, ready_unix) {
            (Some(w), Some(r))
                if w.current_version == last.to_version && w.last_flip_unix_ns > 0 =>
            {
                Some(w.last_flip_unix_ns.saturating_sub(r))
            }
            _ => None,
        };
        if let Some(f) = flip_after {
            latest_flip = Some(latest_flip.map_or(f, |l: u64| l.max(f)));
        }
        report.consumers.push(ConsumerReport {
            id: c.id.clone(),
            state: c.state.clone(),
            bytes: c.bytes,
            reason: c.reason.clone(),
            version: w.map(|w| w.current_version.clone()).unwrap_or_default(),
            pause_ns: w.map(|w| w.last_pause_ns).unwrap_or(0),
            flip_after_ready_ns: flip_after,
        });
    }
    report.flip_seconds = latest_flip.map(|n| n as f64 / 1e9);
    report.all_committed = last.phase == "committed"
        && report
            .consumers
            .iter()
            .all(|c| c.state != "excluded" && c.version == last.to_version);
    report.total_seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
