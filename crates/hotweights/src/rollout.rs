//! The rollout state machine of a cluster weight update.
//!
//! A coordinator drives every consumer (serving replica, RL inference
//! worker) of a [`bstack_plan::SwapPlan`] to the new version together, or
//! none of them. This module is that decision, and nothing else: no
//! network, no storage. It is a value ([`Rollout`]) that the coordinator
//! keeps in its state store and changes only through the calls below, each
//! of which either moves the rollout or says why it cannot.
//!
//! ```text
//!             begin           every consumer           commit
//! Submitted ---------> Transferring ---------> Precommitted ---------> Committed
//!     |                     |      precommitted       |
//!     +---------------------+-------------------------+--- abort, deadline, lost consumer
//!                                                      v
//!                                                   Aborted
//! ```
//!
//! - **Commit needs every consumer.** A consumer precommits only with the
//!   digest of the plan it verified and staged; `commit` is refused until
//!   every consumer still in the rollout has done so. The seed this
//!   replaces committed without quorum.
//! - **A lost consumer** (its lease expired, its process died) aborts the
//!   rollout, or, when the rollout allows it ([`LostPolicy::Exclude`]), is
//!   excluded and the rest carry on; excluding the last one aborts.
//! - **A deadline** passed before commit aborts ([`Rollout::check_deadline`]).
//! - **Every call is idempotent.** Repeating a call that took effect
//!   answers [`Change::Unchanged`] and changes nothing, so a coordinator or
//!   a worker that retries after a lost reply is always safe. A call that
//!   cannot apply ([`HotweightsError::Rollout`]) changes nothing either.
//! - **Terminal states are final.** Nothing moves a committed or aborted
//!   rollout; a committed one cannot be aborted.
//!
//! Every change yields an [`Event`], in the order a `watch` stream sends
//! them; [`Rollout::events`] keeps them all but progress, so a late watcher
//! can be sent the whole story. Progress reports come every fraction of a
//! second from every consumer: kept, they would grow the saved rollout
//! without bound, and the latest figure is in each consumer's state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{HotweightsError, Result};

/// What a rollout does about a consumer it lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostPolicy {
    /// Abort the whole rollout: every consumer stays on the old version.
    Abort,
    /// Go on without it; it catches up later.
    Exclude,
}

/// What is rolled out, to whom, and by when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// The plan's id, which names the rollout.
    pub plan_id: String,
    /// The sealed plan's digest (`blake3:...`): what consumers precommit to.
    pub plan_digest: String,
    /// The version being replaced.
    pub from_version: String,
    /// The version being installed.
    pub to_version: String,
    /// The consumers (worker ids), each of which must precommit.
    pub consumers: Vec<String>,
    /// Commit deadline, ns on the coordinator's clock; 0 for none.
    pub deadline_ns: u64,
    /// What a lost consumer does to the rollout.
    pub on_lost: LostPolicy,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted; no consumer has been told to start.
    Submitted,
    /// Consumers are receiving and staging.
    Transferring,
    /// Every consumer still in has precommitted; waiting for commit.
    Precommitted,
    /// Every consumer switches to the new version.
    Committed,
    /// Every consumer stays on (or goes back to) the old version.
    Aborted,
}

impl Phase {
    /// Whether nothing can change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Committed | Phase::Aborted)
    }
}

/// One consumer's part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ConsumerState {
    /// Not heard from in this rollout yet.
    Pending,
    /// Receiving; bytes staged so far.
    Transferring {
        /// Bytes received and verified.
        bytes: u64,
    },
    /// Staged and verified everything, against the plan's digest.
    Precommitted,
    /// Left out; catches up later.
    Excluded {
        /// Why.
        reason: String,
    },
}

/// A change of a rollout, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// The rollout was accepted.
    Submitted,
    /// Consumers may start receiving.
    Began,
    /// A consumer staged more bytes.
    Progress {
        /// The consumer.
        consumer: String,
        /// Bytes staged so far.
        bytes: u64,
    },
    /// A consumer precommitted.
    Precommitted {
        /// The consumer.
        consumer: String,
    },
    /// A consumer was excluded.
    Excluded {
        /// The consumer.
        consumer: String,
        /// Why.
        reason: String,
    },
    /// Every consumer still in has precommitted.
    Ready,
    /// Switch to the new version.
    Committed,
    /// Stay on the old version.
    Aborted {
        /// Why.
        reason: String,
    },
}

/// Whether a call changed the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It did; these events happened, in order.
    Changed(Vec<Event>),
    /// It had already taken effect (a retried call): nothing happened.
    Unchanged,
}

/// One rollout: its spec, its phase, every consumer's state and its story.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    spec: RolloutSpec,
    phase: Phase,
    consumers: BTreeMap<String, ConsumerState>,
    events: Vec<Event>,
}

impl Rollout {
    /// A submitted rollout. Fails when the spec names no consumer, one
    /// twice, or has no digest to precommit to.
    pub fn submit(spec: RolloutSpec) -> Result<Rollout> {
        let fail = |m: String| Err(HotweightsError::Rollout(format!("{}: {m}", spec.plan_id)));
        if spec.plan_digest.is_empty() {
            return fail("the plan has no digest: seal it before a rollout".into());
        }
        if spec.consumers.is_empty() {
            return fail("a rollout needs at least one consumer".into());
        }
        let mut consumers = BTreeMap::new();
        for c in &spec.consumers {
            if consumers
                .insert(c.clone(), ConsumerState::Pending)
                .is_some()
            {
                return fail(format!("consumer {c:?} is named twice"));
            }
        }
        Ok(Rollout {
            phase: Phase::Submitted,
            consumers,
            events: vec![Event::Submitted],
            spec,
        })
    }

    /// The spec.
    pub fn spec(&self) -> &RolloutSpec {
        &self.spec
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Every consumer's state, by id.
    pub fn consumers(&self) -> &BTreeMap<String, ConsumerState> {
        &self.consumers
    }

    /// Every event so far, oldest first.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Consumers still in that have not precommitted, in id order.
    pub fn waiting_for(&self) -> Vec<&str> {
        self.consumers
            .iter()
            .filter(|(_, s)| {
                !matches!(
                    s,
                    ConsumerState::Precommitted | ConsumerState::Excluded { .. }
                )
            })
            .map(|(c, _)| c.as_str())
            .collect()
    }

    fn refuse<T>(&self, message: String) -> Result<T> {
        Err(HotweightsError::Rollout(format!(
            "{} ({:?}): {message}",
            self.spec.plan_id, self.phase
        )))
    }

    fn record(&mut self, events: Vec<Event>) -> Change {
        self.events.extend(events.iter().cloned());
        Change::Changed(events)
    }

    fn consumer(&self, consumer: &str) -> Result<&ConsumerState> {
        match self.consumers.get(consumer) {
            Some(s) => Ok(s),
            None => self.refuse(format!(
                "{consumer:?} is not a consumer of this rollout; its consumers are {}",
                self.spec.consumers.join(", ")
            )),
        }
    }

    /// Tells consumers to start receiving.
    pub fn begin(&mut self) -> Result<Change> {
        match self.phase {
            Phase::Submitted => {
                self.phase = Phase::Transferring;
                Ok(self.record(vec![Event::Began]))
            }
            Phase::Transferring | Phase::Precommitted | Phase::Committed => Ok(Change::Unchanged),
            Phase::Aborted => self.refuse("an aborted rollout cannot begin".into()),
        }
    }

    /// A consumer reports `bytes` staged so far. Reports of fewer bytes
    /// than already known (reordered or retried) change nothing. The
    /// returned event is not kept in [`Rollout::events`].
    pub fn progress(&mut self, consumer: &str, bytes: u64) -> Result<Change> {
        if self.phase != Phase::Transferring {
            return match self.phase {
                // Late reports after everyone precommitted, or after the
                // end, are harmless.
                Phase::Precommitted | Phase::Committed | Phase::Aborted => Ok(Change::Unchanged),
                _ => self.refuse("progress before begin".into()),
            };
        }
        match self.consumer(consumer)? {
            ConsumerState::Pending => {}
            ConsumerState::Transferring { bytes: known } if bytes > *known => {}
            ConsumerState::Transferring { .. }
            | ConsumerState::Precommitted
            | ConsumerState::Excluded { .. } => return Ok(Change::Unchanged),
        }
        self.consumers
            .insert(consumer.to_owned(), ConsumerState::Transferring { bytes });
        // Not kept in the event log: see the module documentation.
        Ok(Change::Changed(vec![Event::Progress {
            consumer: consumer.to_owned(),
            bytes,
        }]))
    }

    /// A consumer has staged and verified everything, against the plan
    /// whose digest is `digest`. Refused for another plan's digest.
    pub fn precommit(&mut self, consumer: &str, digest: &str) -> Result<Change> {
        let state = self.consumer(consumer)?.clone();
        if digest != self.spec.plan_digest {
            return self.refuse(format!(
                "{consumer:?} precommitted to plan digest {digest}, this rollout's is {}",
                self.spec.plan_digest
            ));
        }
        match (self.phase, state) {
            (_, ConsumerState::Precommitted) => Ok(Change::Unchanged),
            (_, ConsumerState::Excluded { reason }) => self.refuse(format!(
                "{consumer:?} was excluded ({reason}); it catches up after this rollout"
            )),
            (Phase::Transferring, _) => {
                self.consumers
                    .insert(consumer.to_owned(), ConsumerState::Precommitted);
                let mut events = vec![Event::Precommitted {
                    consumer: consumer.to_owned(),
                }];
                events.extend(self.ready_if_all_in());
                Ok(self.record(events))
            }
            (Phase::Submitted, _) => self.refuse("precommit before begin".into()),
            (phase, _) => self.refuse(format!("precommit after the rollout ended ({phase:?})")),
        }
    }

    /// Moves to `Precommitted` when every consumer still in has.
    fn ready_if_all_in(&mut self) -> Option<Event> {
        if self.phase == Phase::Transferring && self.waiting_for().is_empty() {
            self.phase = Phase::Precommitted;
            return Some(Event::Ready);
        }
        None
    }

    /// Switches every consumer to the new version. Refused, naming who is
    /// missing, until every consumer still in has precommitted.
    pub fn commit(&mut self) -> Result<Change> {
        match self.phase {
            Phase::Precommitted => {
                self.phase = Phase::Committed;
                Ok(self.record(vec![Event::Committed]))
            }
            Phase::Committed => Ok(Change::Unchanged),
            Phase::Aborted => self.refuse("an aborted rollout cannot commit".into()),
            Phase::Submitted | Phase::Transferring => self.refuse(format!(
                "not every consumer has precommitted; waiting for {}",
                self.waiting_for().join(", ")
            )),
        }
    }

    /// Abandons the rollout; every consumer stays on the old version.
    /// Refused once committed.
    pub fn abort(&mut self, reason: &str) -> Result<Change> {
        match self.phase {
            Phase::Aborted => Ok(Change::Unchanged),
            Phase::Committed => {
                self.refuse("a committed rollout cannot be aborted; roll back".into())
            }
            _ => {
                self.phase = Phase::Aborted;
                Ok(self.record(vec![Event::Aborted {
                    reason: reason.to_owned(),
                }]))
            }
        }
    }

    /// A consumer was lost (its lease expired). Per the spec's policy the
    /// rollout aborts, or the consumer is excluded (aborting when none is
    /// left). Lost after the end, it changes nothing.
    pub fn lost(&mut self, consumer: &str, reason: &str) -> Result<Change> {
        let state = self.consumer(consumer)?;
        if self.phase.is_terminal() || matches!(state, ConsumerState::Excluded { .. }) {
            return Ok(Change::Unchanged);
        }
        match self.spec.on_lost {
            LostPolicy::Abort => self.abort(&format!("consumer {consumer} lost: {reason}")),
            LostPolicy::Exclude => {
                self.consumers.insert(
                    consumer.to_owned(),
                    ConsumerState::Excluded {
                        reason: reason.to_owned(),
                    },
                );
                let mut events = vec![Event::Excluded {
                    consumer: consumer.to_owned(),
                    reason: reason.to_owned(),
                }];
                let left = self
                    .consumers
                    .values()
                    .filter(|s| !matches!(s, ConsumerState::Excluded { .. }))
                    .count();
                if left == 0 {
                    self.phase = Phase::Aborted;
                    events.push(Event::Aborted {
                        reason: "every consumer was lost".into(),
                    });
                } else {
                    events.extend(self.ready_if_all_in());
                }
                Ok(self.record(events))
            }
        }
    }

    /// Aborts when the deadline has passed at `now_ns` before commit.
    pub fn check_deadline(&mut self, now_ns: u64) -> Result<Change> {
        if self.spec.deadline_ns == 0 || now_ns <= self.spec.deadline_ns || self.phase.is_terminal()
        {
            return Ok(Change::Unchanged);
        }
        let late = now_ns - self.spec.deadline_ns;
        self.abort(&format!(
            "deadline passed {:.3} s ago, waiting for {}",
            late as f64 / 1e9,
            self.waiting_for().join(", ")
        ))
    }
}
