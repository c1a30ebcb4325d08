//! The coordinator's core: a sealed plan to committed version, worker
//! leases, one rollout at a time, every change saved before it counts, and
//! a restart that resumes.

use std::time::Duration;

use bstack_plan::{SwapPlan, WeightManifest};
use hotweights::coordinator::{Coordinator, CoordinatorOptions};
use hotweights::coordstate::{CoordState, RedbState, StateStore};
use hotweights::rollout::{Change, LostPolicy, Phase};

fn plan(id: &str) -> SwapPlan {
    let manifest = |v: &str| WeightManifest {
        model_id: "m".into(),
        version: v.into(),
        ..WeightManifest::default()
    };
    let mut p = SwapPlan {
        schema_version: bstack_plan::SCHEMA_VERSION,
        plan_id: id.into(),
        from: Some(manifest("v1")),
        to: Some(manifest("v2")),
        ..SwapPlan::default()
    };
    p.seal();
    p
}

fn workers() -> Vec<String> {
    vec!["w0".into(), "w1".into()]
}

fn options() -> CoordinatorOptions {
    CoordinatorOptions {
        lease: Duration::from_secs(1),
    }
}

#[test]
fn a_rollout_commits_and_a_restart_resumes_one_midway() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coord.redb");
    let p = plan("p1");
    {
        let mut c = Coordinator::open(RedbState::open(&path).unwrap(), options()).unwrap();
        c.submit(&p, workers(), 0, LostPolicy::Abort).unwrap();
        assert_eq!(
            c.submit(&p, workers(), 0, LostPolicy::Abort).unwrap(),
            Change::Unchanged,
            "a retried submit"
        );
        c.begin("p1").unwrap();
        c.precommit("p1", "w0", &p.digest).unwrap();
    }
    // The coordinator restarts: the rollout goes on where it was.
    let mut c = Coordinator::open(RedbState::open(&path).unwrap(), options()).unwrap();
    assert_eq!(c.state().active.as_deref(), Some("p1"));
    assert_eq!(c.rollout("p1").unwrap().waiting_for(), vec!["w1"]);
    assert!(c.commit("p1").is_err(), "w1 has not precommitted");
    c.precommit("p1", "w1", &p.digest).unwrap();
    c.commit("p1").unwrap();
    assert_eq!(c.state().current_version.as_deref(), Some("v2"));
    assert_eq!(c.state().active, None);
    let story = c.events_since("p1", 0).unwrap().len();
    assert!(story >= 6, "the whole story is kept for late watchers");
    assert!(c.events_since("p1", story).unwrap().is_empty());
    drop(c);
    let state = RedbState::open(&path).unwrap().load().unwrap().unwrap();
    assert_eq!(state.rollouts["p1"].phase(), Phase::Committed);
}

#[test]
fn plans_must_be_sealed_and_come_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut c =
        Coordinator::open(RedbState::open(&dir.path().join("c")).unwrap(), options()).unwrap();
    let mut tampered = plan("p1");
    tampered.plan_id = "p1-edited".into();
    let err = c
        .submit(&tampered, workers(), 0, LostPolicy::Abort)
        .unwrap_err()
        .to_string();
    assert!(err.contains("changed after sealing"), "{err}");
    c.submit(&plan("p1"), workers(), 0, LostPolicy::Abort)
        .unwrap();
    let err = c
        .submit(&plan("p2"), workers(), 0, LostPolicy::Abort)
        .unwrap_err()
        .to_string();
    assert!(err.contains("p1 is in progress"), "{err}");
    c.abort("p1", "operator").unwrap();
    c.submit(&plan("p2"), workers(), 0, LostPolicy::Abort)
        .unwrap();
    assert_eq!(c.state().current_version, None, "an abort installs nothing");
}

#[test]
fn a_worker_whose_lease_runs_out_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbState::open(&dir.path().join("c")).unwrap();
    let mut c = Coordinator::open(store, options()).unwrap();
    let s = 1_000_000_000u64;
    c.register("w0", "127.0.0.1:1", 0).unwrap();
    c.register("w1", "127.0.0.1:2", 0).unwrap();
    c.submit(&plan("p1"), workers(), 0, LostPolicy::Exclude)
        .unwrap();
    c.begin("p1").unwrap();
    c.heartbeat("w0", s / 2).unwrap();
    c.heartbeat("w0", s).unwrap();
    assert!(c.expire(s).unwrap().is_empty(), "within the lease");
    let lost = c.expire(s + s / 10 + 1).unwrap();
    assert_eq!(lost, vec!["w1".to_owned()]);
    assert!(
        c.heartbeat("w1", s * 2).is_err(),
        "a lost worker registers again"
    );
    // Excluded: w0 alone completes the rollout.
    c.precommit("p1", "w0", &plan("p1").digest).unwrap();
    c.commit("p1").unwrap();
    assert_eq!(c.state().current_version.as_deref(), Some("v2"));
}

/// A store whose saves fail on demand: the coordinator must not act on a
/// change it could not save.
struct Unreliable {
    saved: Option<CoordState>,
    fail: bool,
    blobs: std::collections::HashMap<String, Vec<u8>>,
}

impl StateStore for Unreliable {
    fn load(&mut self) -> hotweights::Result<Option<CoordState>> {
        Ok(self.saved.clone())
    }
    fn save(&mut self, state: &mut CoordState) -> hotweights::Result<()> {
        if self.fail {
            return Err(hotweights::HotweightsError::Option("disk full".into()));
        }
        state.revision += 1;
        self.saved = Some(state.clone());
        Ok(())
    }
    fn describe(&self) -> String {
        "unreliable".into()
    }
    fn put_blob(&mut self, name: &str, bytes: &[u8]) -> hotweights::Result<()> {
        if self.fail {
            return Err(hotweights::HotweightsError::Option("disk full".into()));
        }
        self.blobs.insert(name.to_owned(), bytes.to_vec());
        Ok(())
    }
    fn get_blob(&mut self, name: &str) -> hotweights::Result<Option<Vec<u8>>> {
        Ok(self.blobs.get(name).cloned())
    }
}

#[test]
fn a_change_that_cannot_be_saved_does_not_happen() {
    let store = Unreliable {
        saved: None,
        fail: false,
        blobs: Default::default(),
    };
    let mut c = Coordinator::open(store, options()).unwrap();
    let p = plan("p1");
    c.submit(&p, workers(), 0, LostPolicy::Abort).unwrap();
    c.begin("p1").unwrap();
    let before = c.state().clone();
    // Saves fail now: the precommit is refused and nothing moved.
    let mut failing = Coordinator::open(
        Unreliable {
            saved: Some(before.clone()),
            fail: true,
            blobs: Default::default(),
        },
        options(),
    )
    .unwrap();
    let err = failing
        .precommit("p1", "w0", &p.digest)
        .unwrap_err()
        .to_string();
    assert!(err.contains("disk full"), "{err}");
    assert_eq!(failing.state(), &before);
}

/// The state keeps the active rollout and the most recent ended ones: it is
/// written whole on every save, so it must not grow with every rollout.
#[test]
fn only_the_most_recent_ended_rollouts_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbState::open(&dir.path().join("c.redb")).unwrap();
    let mut c = Coordinator::open(store, options()).unwrap();
    let n = hotweights::coordstate::KEEP_ENDED + 6;
    for i in 0..n {
        let id = format!("p{i:03}");
        c.submit(&plan(&id), workers(), 0, LostPolicy::Abort)
            .unwrap();
        c.abort(&id, "next").unwrap();
    }
    c.submit(&plan("last"), workers(), 0, LostPolicy::Abort)
        .unwrap();
    let s = c.state();
    assert_eq!(s.rollouts.len(), hotweights::coordstate::KEEP_ENDED + 1);
    assert!(!s.rollouts.contains_key("p000") && !s.rollouts.contains_key("p005"));
    assert!(s.rollouts.contains_key("p006") && s.rollouts.contains_key("last"));
    assert_eq!(s.active.as_deref(), Some("last"));
    assert_eq!(s.order.len(), s.rollouts.len());
    // And so after a restart.
    drop(c);
    let c = Coordinator::open(
        RedbState::open(&dir.path().join("c.redb")).unwrap(),
        options(),
    )
    .unwrap();
    assert_eq!(
        c.state().rollouts.len(),
        hotweights::coordstate::KEEP_ENDED + 1
    );
}
