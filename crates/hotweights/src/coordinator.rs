//! The rollout coordinator's core: every decision of the control plane,
//! without the network.
//!
//! A [`Coordinator`] owns the [`CoordState`] (rollouts, the current
//! version), keeps it in a [`StateStore`], and holds the workers' leases.
//! The RPC layer calls it; it answers with the same [`Change`] values the
//! [`Rollout`] state machine gives, so a retried RPC is always safe.
//!
//! - **Persisted before acknowledged.** Every change is made on a copy,
//!   saved, and only then becomes the coordinator's state: a save that
//!   fails leaves the coordinator, and the store, as they were. A
//!   coordinator restarted from its store resumes every rollout.
//! - **Leases.** Workers register and heartbeat; a worker not heard from
//!   for `lease` is lost ([`Coordinator::expire`]), which the active
//!   rollout handles per its [`LostPolicy`]. Leases are soft state: after
//!   a restart, workers register again (and the lease clock starts over,
//!   so a restart never loses a worker on its own).
//! - **One rollout at a time.** A plan is accepted only when sealed (its
//!   digest checks out) and when no other rollout is in progress.
//! - **Current version.** A commit makes the plan's version current; an
//!   abort leaves it.

use std::collections::BTreeMap;
use std::time::Duration;

use bstack_plan::{SwapPlan, Validate, WeightManifest};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::coordstate::{CoordState, StateStore};
use crate::error::{HotweightsError, Result};
use crate::rollout::{Change, Event, LostPolicy, Phase, Rollout, RolloutSpec};

/// How the coordinator treats workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorOptions {
    /// A worker not heard from for this long is lost.
    pub lease: Duration,
}

impl Default for CoordinatorOptions {
    fn default() -> CoordinatorOptions {
        CoordinatorOptions {
            lease: Duration::from_secs(10),
        }
    }
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    /// Where its data plane listens.
    pub addr: String,
    /// When it was last heard from, ns on the coordinator's clock.
    pub last_seen_ns: u64,
}

/// The coordinator's core. See the module documentation.
pub struct Coordinator<S: StateStore> {
    store: S,
    state: CoordState,
    workers: BTreeMap<String, Worker>,
    options: CoordinatorOptions,
}

impl<S: StateStore> std::fmt::Debug for Coordinator<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("store", &self.store.describe())
            .field("state", &self.state)
            .field("workers", &self.workers)
            .finish()
    }
}

impl<S: StateStore> Coordinator<S> {
    /// A coordinator over `store`, resuming what it holds.
    pub fn open(mut store: S, options: CoordinatorOptions) -> Result<Coordinator<S>> {
        let state = store.load()?.unwrap_or_default();
        Ok(Coordinator {
            store,
            state,
            workers: BTreeMap::new(),
            options,
        })
    }

    /// The state now.
    pub fn state(&self) -> &CoordState {
        &self.state
    }

    /// Where the state lives, for messages.
    pub fn describe_store(&self) -> String {
        self.store.describe()
    }

    /// The registered workers.
    pub fn workers(&self) -> &BTreeMap<String, Worker> {
        &self.workers
    }

    /// A rollout by plan id.
    pub fn rollout(&self, plan_id: &str) -> Result<&Rollout> {
        self.state.rollouts.get(plan_id).ok_or_else(|| {
            HotweightsError::Rollout(format!("{plan_id}: no such rollout was submitted"))
        })
    }

    /// The events of a rollout from position `from` on (a watcher resumes
    /// where it stopped; 0 for the whole story).
    pub fn events_since(&self, plan_id: &str, from: usize) -> Result<&[Event]> {
        let events = self.rollout(plan_id)?.events();
        Ok(events.get(from..).unwrap_or(&[]))
    }

    /// Registers (or re-registers) a worker and starts its lease.
    pub fn register(&mut self, worker: &str, addr: &str, now_ns: u64) -> Result<()> {
        if worker.is_empty() {
            return Err(HotweightsError::Option(
                "a worker needs a non-empty id".into(),
            ));
        }
        self.workers.insert(
            worker.to_owned(),
            Worker {
                addr: addr.to_owned(),
                last_seen_ns: now_ns,
            },
        );
        Ok(())
    }

    /// Renews a worker's lease.
    pub fn heartbeat(&mut self, worker: &str, now_ns: u64) -> Result<()> {
        match self.workers.get_mut(worker) {
            Some(w) => {
                w.last_seen_ns = w.last_seen_ns.max(now_ns);
                Ok(())
            }
            None => Err(HotweightsError::Rollout(format!(
                "worker {worker:?} is not registered (a restarted coordinator forgets leases): \
                 register again"
            ))),
        }
    }

    /// Applies `f` to a copy of the state, saves the copy, and only then
    /// makes it current.
    fn change(&mut self, f: impl FnOnce(&mut CoordState) -> Result<Change>) -> Result<Change> {
        let mut next = self.state.clone();
        let change = f(&mut next)?;
        if change == Change::Unchanged {
            return Ok(change);
        }
        self.store.save(&mut next)?;
        self.state = next;
        Ok(change)
    }

    /// Drops workers whose lease ran out at `now_ns`, reports them lost
    /// to the active rollout, and aborts it if its deadline passed.
    /// Returns the lost workers.
    pub fn expire(&mut self, now_ns: u64) -> Result<Vec<String>> {
        let lease = u64::try_from(self.options.lease.as_nanos()).unwrap_or(u64::MAX);
        let lost: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now_ns.saturating_sub(w.last_seen_ns) > lease)
            .map(|(id, _)| id.clone())
            .collect();
        let active = self.state.active.clone();
        if let Some(plan_id) = active {
            let lost_here = lost.clone();
            self.change(|s| {
                let Some(r) = s.rollouts.get_mut(&plan_id) else {
                    return Ok(Change::Unchanged);
                };
                let mut events = Vec::new();
                for w in &lost_here {
                    if r.consumers().contains_key(w)
                        && let Change::Changed(e) = r.lost(w, "its lease expired")?
                    {
                        events.extend(e);
                    }
                }
                if let Change::Changed(e) = r.check_deadline(now_ns)? {
                    events.extend(e);
                }
                settle(s, &plan_id);
                Ok(if events.is_empty() {
                    Change::Unchanged
                } else {
                    Change::Changed(events)
                })
            })?;
        }
        for w in &lost {
            self.workers.remove(w);
        }
        Ok(lost)
    }

    /// Accepts a sealed plan for `consumers`. Refused when the plan's
    /// digest does not check out, or while another rollout is in progress;
    /// submitting the same plan again changes nothing.
    pub fn submit(
        &mut self,
        plan: &SwapPlan,
        consumers: Vec<String>,
        deadline_ns: u64,
        on_lost: LostPolicy,
    ) -> Result<Change> {
        let digest = plan.compute_digest();
        if plan.digest != digest {
            return Err(HotweightsError::Rollout(format!(
                "{}: the plan's digest is {:?}, its contents hash to {digest}: it was changed \
                 after sealing, or never sealed",
                plan.plan_id, plan.digest
            )));
        }
        if let Some(existing) = self.state.rollouts.get(&plan.plan_id) {
            if existing.spec().plan_digest == digest {
                return Ok(Change::Unchanged);
            }
            return Err(HotweightsError::Rollout(format!(
                "{}: another plan was already submitted under this id",
                plan.plan_id
            )));
        }
        if let Some(active) = &self.state.active {
            return Err(HotweightsError::Rollout(format!(
                "{}: rollout {active} is in progress; commit or abort it first",
                plan.plan_id
            )));
        }
        let version =
            |m: &Option<WeightManifest>| m.as_ref().map(|m| m.version.clone()).unwrap_or_default();
        let rollout = Rollout::submit(RolloutSpec {
            plan_id: plan.plan_id.clone(),
            plan_digest: digest,
            from_version: version(&plan.from),
            to_version: version(&plan.to),
            consumers,
            deadline_ns,
            on_lost,
        })?;
        // The plan first: a saved rollout always has its plan.
        self.store
            .put_blob(&plan_blob(&plan.plan_id), &plan.encode_to_vec())?;
        let plan_id = plan.plan_id.clone();
        self.change(|s| {
            s.rollouts.insert(plan_id.clone(), rollout);
            s.order.retain(|p| *p != plan_id);
            s.order.push(plan_id.clone());
            s.active = Some(plan_id);
            s.prune();
            Ok(Change::Changed(vec![Event::Submitted]))
        })
    }

    fn on_rollout(
        &mut self,
        plan_id: &str,
        f: impl FnOnce(&mut Rollout) -> Result<Change>,
    ) -> Result<Change> {
        self.rollout(plan_id)?;
        let id = plan_id.to_owned();
        self.change(|s| {
            let Some(r) = s.rollouts.get_mut(&id) else {
                return Ok(Change::Unchanged);
            };
            let change = f(r)?;
            settle(s, &id);
            Ok(change)
        })
    }

    /// Tells the consumers to start ([`Rollout::begin`]).
    pub fn begin(&mut self, plan_id: &str) -> Result<Change> {
        self.on_rollout(plan_id, Rollout::begin)
    }

    /// A consumer's progress ([`Rollout::progress`]). Progress is soft
    /// state: it changes the state in memory without a save of its own (the
    /// next saved change carries it), so that a busy rollout does not cost
    /// one fsync per report. A coordinator restarted in between shows the
    /// figures its workers report next.
    pub fn progress(&mut self, plan_id: &str, consumer: &str, bytes: u64) -> Result<Change> {
        self.rollout(plan_id)?;
        match self.state.rollouts.get_mut(plan_id) {
            Some(r) => r.progress(consumer, bytes),
            None => Ok(Change::Unchanged),
        }
    }

    /// A consumer's precommit ([`Rollout::precommit`]).
    pub fn precommit(&mut self, plan_id: &str, consumer: &str, digest: &str) -> Result<Change> {
        self.on_rollout(plan_id, |r| r.precommit(consumer, digest))
    }

    /// Commits ([`Rollout::commit`]); the plan's version becomes current,
    /// and its `to` manifest the current manifest.
    pub fn commit(&mut self, plan_id: &str) -> Result<Change> {
        if self.rollout(plan_id)?.phase() == Phase::Precommitted {
            // Saved before the commit: once committed, the manifest is there.
            let plan = self.plan(plan_id)?;
            if let Some(to) = &plan.to {
                self.store.put_blob(MANIFEST_BLOB, &to.encode_to_vec())?;
            }
        }
        self.on_rollout(plan_id, Rollout::commit)
    }

    /// A submitted plan, as submitted.
    pub fn plan(&mut self, plan_id: &str) -> Result<SwapPlan> {
        self.rollout(plan_id)?;
        let bytes = self.store.get_blob(&plan_blob(plan_id))?.ok_or_else(|| {
            HotweightsError::Rollout(format!(
                "{plan_id}: the plan is missing from {}",
                self.store.describe()
            ))
        })?;
        SwapPlan::decode(bytes.as_slice()).map_err(|e| {
            HotweightsError::Mismatch(format!(
                "{plan_id}: the plan saved in {} does not decode: {e}",
                self.store.describe()
            ))
        })
    }

    /// Records the manifest of the version the cluster runs (before its
    /// first rollout, or after installing a version by other means).
    /// Refused while a rollout is in progress.
    pub fn set_current_manifest(&mut self, manifest: &WeightManifest) -> Result<Change> {
        if let Some(active) = &self.state.active {
            return Err(HotweightsError::Rollout(format!(
                "rollout {active} is in progress; the current version changes only through it"
            )));
        }
        if let Err(problems) = manifest.validate() {
            return Err(HotweightsError::Mismatch(format!(
                "the manifest is not valid: {problems}"
            )));
        }
        let bytes = manifest.encode_to_vec();
        if self.store.get_blob(MANIFEST_BLOB)?.as_deref() == Some(bytes.as_slice())
            && self.state.current_version.as_deref() == Some(manifest.version.as_str())
        {
            return Ok(Change::Unchanged);
        }
        self.store.put_blob(MANIFEST_BLOB, &bytes)?;
        let version = manifest.version.clone();
        self.change(|s| {
            s.current_version = Some(version);
            Ok(Change::Changed(Vec::new()))
        })
    }

    /// The manifest of the current version, if recorded.
    pub fn current_manifest(&mut self) -> Result<Option<WeightManifest>> {
        let Some(bytes) = self.store.get_blob(MANIFEST_BLOB)? else {
            return Ok(None);
        };
        WeightManifest::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| {
                HotweightsError::Mismatch(format!(
                    "the current manifest saved in {} does not decode: {e}",
                    self.store.describe()
                ))
            })
    }

    /// A consumer that says it failed (or that the source could not reach)
    /// is lost ([`Rollout::lost`]): excluded or the rollout aborts, per its
    /// policy.
    pub fn fail(&mut self, plan_id: &str, consumer: &str, reason: &str) -> Result<Change> {
        self.on_rollout(plan_id, |r| r.lost(consumer, reason))
    }

    /// Aborts ([`Rollout::abort`]); the current version stays.
    pub fn abort(&mut self, plan_id: &str, reason: &str) -> Result<Change> {
        self.on_rollout(plan_id, |r| r.abort(reason))
    }
}

/// The blob holding the current version's manifest.
const MANIFEST_BLOB: &str = "current-manifest";

/// The blob holding a submitted plan.
fn plan_blob(plan_id: &str) -> String {
    format!("plan:{plan_id}")
}

/// Keeps `active` and `current_version` in step with the rollout's end.
fn settle(state: &mut CoordState, plan_id: &str) {
    let Some(r) = state.rollouts.get(plan_id) else {
        return;
    };
    match r.phase() {
        Phase::Committed => {
            state.current_version = Some(r.spec().to_version.clone());
            state.active = None;
        }
        Phase::Aborted => state.active = None,
        _ => {}
    }
}
