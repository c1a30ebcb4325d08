//! The rollout state machine: commit only with every consumer, lost
//! consumers per policy, deadlines, idempotent calls, final end states.

use hotweights::rollout::{Change, ConsumerState, Event, LostPolicy, Phase, Rollout, RolloutSpec};
use proptest::prelude::*;

const DIGEST: &str = "blake3:00ff";

fn spec(consumers: &[&str], on_lost: LostPolicy) -> RolloutSpec {
    RolloutSpec {
        plan_id: "p1".into(),
        plan_digest: DIGEST.into(),
        from_version: "v1".into(),
        to_version: "v2".into(),
        consumers: consumers.iter().map(|c| (*c).to_owned()).collect(),
        deadline_ns: 1_000,
        on_lost,
    }
}

#[test]
fn commit_waits_for_every_consumer_with_the_plans_digest() {
    let mut r = Rollout::submit(spec(&["w0", "w1"], LostPolicy::Abort)).unwrap();
    let err = r.precommit("w0", DIGEST).unwrap_err().to_string();
    assert!(err.contains("before begin"), "{err}");
    r.begin().unwrap();
    assert_eq!(r.begin().unwrap(), Change::Unchanged);
    r.progress("w0", 10).unwrap();
    assert_eq!(
        r.progress("w0", 5).unwrap(),
        Change::Unchanged,
        "an old report"
    );
    let err = r.precommit("w0", "blake3:other").unwrap_err().to_string();
    assert!(err.contains("this rollout's is blake3:00ff"), "{err}");
    r.precommit("w0", DIGEST).unwrap();
    assert_eq!(r.precommit("w0", DIGEST).unwrap(), Change::Unchanged);
    let err = r.commit().unwrap_err().to_string();
    assert!(err.contains("waiting for w1"), "{err}");
    let err = r.precommit("w9", DIGEST).unwrap_err().to_string();
    assert!(err.contains("\"w9\" is not a consumer"), "{err}");
    match r.precommit("w1", DIGEST).unwrap() {
        Change::Changed(events) => assert_eq!(events.last(), Some(&Event::Ready)),
        Change::Unchanged => panic!("w1's precommit changed nothing"),
    }
    assert_eq!(r.phase(), Phase::Precommitted);
    r.commit().unwrap();
    assert_eq!(r.commit().unwrap(), Change::Unchanged);
    assert!(
        r.abort("too late").is_err(),
        "a committed rollout stays committed"
    );
    assert_eq!(r.events().first(), Some(&Event::Submitted));
    assert_eq!(r.events().last(), Some(&Event::Committed));
}

#[test]
fn a_lost_consumer_aborts_or_is_excluded() {
    let mut r = Rollout::submit(spec(&["w0", "w1"], LostPolicy::Abort)).unwrap();
    r.begin().unwrap();
    r.precommit("w0", DIGEST).unwrap();
    r.lost("w1", "lease expired").unwrap();
    assert_eq!(r.phase(), Phase::Aborted);
    assert!(r.commit().is_err());

    let mut r = Rollout::submit(spec(&["w0", "w1", "w2"], LostPolicy::Exclude)).unwrap();
    r.begin().unwrap();
    r.precommit("w0", DIGEST).unwrap();
    r.precommit("w1", DIGEST).unwrap();
    // The last one missing is lost: the others are all in, so it is ready.
    r.lost("w2", "killed").unwrap();
    assert_eq!(r.phase(), Phase::Precommitted);
    assert!(matches!(
        r.consumers()["w2"],
        ConsumerState::Excluded { .. }
    ));
    assert!(
        r.precommit("w2", DIGEST).is_err(),
        "excluded until the next rollout"
    );
    r.commit().unwrap();

    let mut r = Rollout::submit(spec(&["w0"], LostPolicy::Exclude)).unwrap();
    r.begin().unwrap();
    r.lost("w0", "killed").unwrap();
    assert_eq!(r.phase(), Phase::Aborted, "no consumer left");
}

#[test]
fn deadlines_abort_unless_committed() {
    let mut r = Rollout::submit(spec(&["w0"], LostPolicy::Abort)).unwrap();
    r.begin().unwrap();
    assert_eq!(r.check_deadline(1_000).unwrap(), Change::Unchanged);
    r.check_deadline(1_001).unwrap();
    assert_eq!(r.phase(), Phase::Aborted);
    match r.events().last() {
        Some(Event::Aborted { reason }) => assert!(reason.contains("waiting for w0"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_specs_are_refused() {
    assert!(Rollout::submit(spec(&[], LostPolicy::Abort)).is_err());
    assert!(Rollout::submit(spec(&["w0", "w0"], LostPolicy::Abort)).is_err());
    let mut unsealed = spec(&["w0"], LostPolicy::Abort);
    unsealed.plan_digest.clear();
    let err = Rollout::submit(unsealed).unwrap_err().to_string();
    assert!(err.contains("seal"), "{err}");
}

#[derive(Debug, Clone)]
enum Call {
    Begin,
    Progress(usize, u64),
    Precommit(usize, bool),
    Commit,
    Abort,
    Lost(usize),
    Tick(u64),
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        Just(Call::Begin),
        (0..4usize, 0..100u64).prop_map(|(c, b)| Call::Progress(c, b)),
        (0..4usize, proptest::bool::weighted(0.9)).prop_map(|(c, ok)| Call::Precommit(c, ok)),
        Just(Call::Commit),
        proptest::bool::weighted(0.1).prop_map(|_| Call::Abort),
        (0..4usize).prop_map(Call::Lost),
        (900..1_100u64).prop_map(Call::Tick),
    ]
}

fn apply(r: &mut Rollout, c: &Call) -> hotweights::Result<Change> {
    let name = |i: usize| format!("w{i}");
    match c {
        Call::Begin => r.begin(),
        Call::Progress(i, b) => r.progress(&name(*i), *b),
        Call::Precommit(i, ok) => r.precommit(&name(*i), if *ok { DIGEST } else { "blake3:x" }),
        Call::Commit => r.commit(),
        Call::Abort => r.abort("asked"),
        Call::Lost(i) => r.lost(&name(*i), "gone"),
        Call::Tick(t) => r.check_deadline(*t),
    }
}

proptest! {
    #[test]
    fn every_call_is_safe_to_retry_and_commits_need_quorum(
        exclude in any::<bool>(),
        calls in proptest::collection::vec(call(), 1..60),
    ) {
        let policy = if exclude { LostPolicy::Exclude } else { LostPolicy::Abort };
        let mut r = Rollout::submit(spec(&["w0", "w1", "w2", "w3"], policy)).unwrap();
        for c in &calls {
            let before = r.clone();
            let first = apply(&mut r, c);
            if first.is_err() || first.as_ref().is_ok_and(|ch| *ch == Change::Unchanged) {
                prop_assert_eq!(&r, &before, "a refused or unchanged call changed the rollout");
            }
            if before.phase().is_terminal() {
                prop_assert_eq!(r.phase(), before.phase(), "an end state moved");
            }
            // The same call again, as a retry after a lost reply.
            let after = r.clone();
            let again = apply(&mut r, c);
            if first.is_ok() {
                prop_assert!(
                    again.as_ref().is_ok_and(|ch| *ch == Change::Unchanged),
                    "{:?} retried gave {:?}", c, again
                );
            }
            prop_assert_eq!(&r, &after, "a retried call changed the rollout");
            if r.phase() == Phase::Committed {
                let all_in = r.consumers().values().all(|s| {
                    matches!(s, ConsumerState::Precommitted | ConsumerState::Excluded { .. })
                });
                let someone = r.consumers().values().any(|s| *s == ConsumerState::Precommitted);
                prop_assert!(all_in && someone, "committed without quorum: {:?}", r.consumers());
            }
        }
    }
}

/// Progress changes the consumer's state but stays out of the event log:
/// a rollout's saved story does not grow with every report.
#[test]
fn progress_is_state_not_story() {
    let mut r = Rollout::submit(spec(&["w0"], LostPolicy::Abort)).unwrap();
    r.begin().unwrap();
    let before = r.events().len();
    for b in 1..=100u64 {
        let change = r.progress("w0", b * 10).unwrap();
        assert!(matches!(change, Change::Changed(ref e) if e.len() == 1));
    }
    assert_eq!(r.events().len(), before);
    assert_eq!(
        r.consumers().get("w0"),
        Some(&ConsumerState::Transferring { bytes: 1000 })
    );
}
