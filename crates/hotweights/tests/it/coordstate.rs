//! The coordinator's state: a redb file that survives restarts, and Redis
//! with a leader lease that lets only the leader write, tested against a
//! real `redis-server` on a free loopback port.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hotweights::coordstate::{CoordState, LeaderLease, RedbState, RedisState, StateStore};
use hotweights::rollout::{LostPolicy, Phase, Rollout, RolloutSpec};

fn rollout() -> Rollout {
    let mut r = Rollout::submit(RolloutSpec {
        plan_id: "p1".into(),
        plan_digest: "blake3:ab".into(),
        from_version: "v1".into(),
        to_version: "v2".into(),
        consumers: vec!["w0".into(), "w1".into()],
        deadline_ns: 0,
        on_lost: LostPolicy::Abort,
    })
    .unwrap();
    r.begin().unwrap();
    r.precommit("w0", "blake3:ab").unwrap();
    r
}

fn state() -> CoordState {
    let mut s = CoordState {
        current_version: Some("v1".into()),
        active: Some("p1".into()),
        ..CoordState::default()
    };
    s.rollouts.insert("p1".into(), rollout());
    s
}

#[test]
fn a_restarted_coordinator_resumes_its_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coord.redb");
    {
        let mut store = RedbState::open(&path).unwrap();
        assert_eq!(store.load().unwrap(), None, "a new store is empty");
        let mut s = state();
        store.save(&mut s).unwrap();
        assert_eq!(s.revision, 1);
        // One process at a time.
        let err = RedbState::open(&path).unwrap_err().to_string();
        assert!(err.contains("coord.redb"), "{err}");
    }
    let mut store = RedbState::open(&path).unwrap();
    let mut s = store.load().unwrap().expect("the saved state");
    assert_eq!(s.revision, 1);
    let r = s.rollouts.get_mut("p1").unwrap();
    assert_eq!(r.phase(), Phase::Transferring);
    assert_eq!(r.waiting_for(), vec!["w1"]);
    r.precommit("w1", "blake3:ab").unwrap();
    r.commit().unwrap();
    s.current_version = Some("v2".into());
    s.active = None;
    store.save(&mut s).unwrap();
    drop(store);
    let loaded = RedbState::open(&path).unwrap().load().unwrap().unwrap();
    assert_eq!(loaded, s);
    assert_eq!(loaded.rollouts["p1"].phase(), Phase::Committed);
}

/// A private `redis-server`, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server not found ({e}): install it (apt-get install redis-server); .ci/run does this")
            });
        let redis = Redis { child, port };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn only_the_leader_writes_and_a_standby_takes_over() {
    let redis = Redis::start();
    let ttl = Duration::from_millis(400);
    let lease = |id: &str| LeaderLease::new(&redis.url(), "cluster", id, ttl).unwrap();
    let mut a = RedisState::new(lease("coord-a"));
    let mut b = RedisState::new(lease("coord-b"));
    assert!(a.lease().try_acquire().unwrap());
    assert!(a.lease().try_acquire().unwrap(), "acquiring again keeps it");
    assert!(!b.lease().try_acquire().unwrap());
    assert_eq!(b.lease().holder().unwrap().as_deref(), Some("coord-a"));

    let mut s = state();
    a.save(&mut s).unwrap();
    let mut from_b = s.clone();
    let err = b.save(&mut from_b).unwrap_err().to_string();
    assert!(err.contains("does not hold the leader lease"), "{err}");
    assert_eq!(
        b.load().unwrap().unwrap(),
        s,
        "a refused save wrote nothing"
    );

    // The leader stops renewing (paused, or dead): the standby takes over
    // once the lease expires, and resumes from the saved state.
    let start = Instant::now();
    while !b.lease().try_acquire().unwrap() {
        assert!(start.elapsed() < ttl * 4, "the standby never took over");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        start.elapsed() >= ttl / 2,
        "taken over before the lease could expire"
    );
    let mut resumed = b.load().unwrap().unwrap();
    assert_eq!(resumed.rollouts["p1"].waiting_for(), vec!["w1"]);
    b.save(&mut resumed).unwrap();
    // The old leader comes back: it has lost its lease and cannot write.
    assert!(!a.lease().renew().unwrap());
    let err = a.save(&mut s).unwrap_err().to_string();
    assert!(err.contains("another coordinator leads now"), "{err}");
    assert_eq!(a.load().unwrap().unwrap().revision, resumed.revision);

    // Handing over on purpose is immediate.
    assert!(b.lease().release().unwrap());
    assert!(a.lease().try_acquire().unwrap());
}

#[test]
fn a_password_never_shows_in_errors() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    let lease = LeaderLease::new(&url, "cluster", "c", Duration::from_secs(1)).unwrap();
    let err = lease.try_acquire().unwrap_err().to_string();
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("127.0.0.1"), "{err}");
}
