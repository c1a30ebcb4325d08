//! The Redis tier, against a real `redis-server` started per test: round
//! trips, batches, two clients, corruption, a full server, unreachable
//! servers, broken connections, threads, and passwords kept out of errors.

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use redis::ConnectionLike;

use stratacache::{ArtifactKey, CustomKey, Error, Meta, RedisOptions, RedisTier, Tier, checksum};

/// A `redis-server` on a free loopback port, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    listener.local_addr().expect("the bound address").port()
}

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::with(&[])
    }

    /// A server with extra arguments, e.g. `["--maxmemory", "4mb"]`.
    fn with(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server not found: install it (apt-get install redis-server); .ci/run does this"
            ),
            Err(e) => panic!("starting redis-server: {e}"),
        };
        let mut server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if server.ping() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("redis-server on port {port} exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING within 10 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        // Any reply will do, NOAUTH included: the server is up.
        client
            .get_connection_with_timeout(Duration::from_millis(200))
            .and_then(|mut c| c.req_command(&redis::cmd("PING")))
            .is_ok()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A plain connection, to reach around the tier.
    fn raw(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn tier(&self) -> RedisTier {
        RedisTier::connect(&self.url(), RedisOptions::default()).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key(i: u64) -> ArtifactKey {
    ArtifactKey::Custom(CustomKey {
        namespace: "test".into(),
        name: format!("k{i}"),
    })
}

/// Bytes that name their key and version, so a mix-up shows.
fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
}

fn redis_name(k: &ArtifactKey) -> Vec<u8> {
    let mut name = b"strata:".to_vec();
    for b in k.digest().unwrap() {
        name.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    name
}

#[test]
fn objects_round_trip_with_metadata_and_are_deleted() {
    let server = RedisServer::start();
    let tier = server.tier();
    assert_eq!(tier.name(), "redis");
    let meta = Meta {
        dtype: "bf16".into(),
        shape: vec![2, 3],
        codec: "raw".into(),
        created_ns: 42,
        ..Meta::default()
    };
    assert!(tier.get(&key(1)).unwrap().is_none());
    assert!(!tier.contains(&key(1)).unwrap());
    tier.put(&key(1), meta.clone(), &payload(1, 1000)).unwrap();
    let got = tier.get(&key(1)).unwrap().unwrap();
    assert_eq!(&*got.bytes, payload(1, 1000).as_slice());
    assert_eq!(
        got.meta,
        Meta {
            length: 1000,
            checksum: checksum(&payload(1, 1000)),
            ..meta.clone()
        }
    );
    assert!(tier.contains(&key(1)).unwrap());
    // Stored under the prefix and the key's digest, as one value.
    let mut raw = server.raw();
    let n: i64 = redis::cmd("EXISTS")
        .arg(redis_name(&key(1)))
        .query(&mut raw)
        .unwrap();
    assert_eq!(n, 1);
    // Replacing, and an empty payload.
    tier.put(&key(1), meta.clone(), b"").unwrap();
    assert_eq!(tier.get(&key(1)).unwrap().unwrap().bytes.len(), 0);
    tier.put(&key(2), meta, &payload(2, 10)).unwrap();
    let stats = tier.stats();
    assert_eq!((stats.objects, stats.bytes), (2, 10));
    assert_eq!((stats.hits, stats.misses, stats.capacity_bytes), (2, 1, 0));
    assert!(tier.delete(&key(1)).unwrap());
    assert!(!tier.delete(&key(1)).unwrap());
    assert!(!tier.contains(&key(1)).unwrap());
    assert!(tier.get(&key(1)).unwrap().is_none());
    assert_eq!(tier.stats().objects, 1);
}

#[test]
fn list_walks_every_object_and_skips_foreign_values() {
    let server = RedisServer::start();
    let tier = server.tier();
    let mut expected = HashSet::new();
    for i in 0..1500 {
        let meta = Meta {
            shape: vec![i],
            ..Meta::default()
        };
        let k = key(i);
        expected.insert((k.clone(), i));
        tier.put(&k, meta, &payload(i, 8)).unwrap();
    }
    // A key with a head longer than the first fetch of a listing.
    let long = ArtifactKey::Custom(CustomKey {
        namespace: "long".into(),
        name: "n".repeat(6000),
    });
    tier.put(&long, Meta::default(), b"x").unwrap();
    // Values that are not records of the tier, and a name outside it.
    let mut raw = server.raw();
    let _: () = redis::cmd("SET")
        .arg("strata:junk")
        .arg("hello")
        .query(&mut raw)
        .unwrap();
    let _: () = redis::cmd("LPUSH")
        .arg("strata:list")
        .arg("a")
        .query(&mut raw)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("other:x")
        .arg("hello")
        .query(&mut raw)
        .unwrap();
    let listed = tier.list().unwrap();
    assert_eq!(listed.len(), 1501);
    let mut got = HashSet::new();
    for (k, meta) in listed {
        if k == long {
            assert_eq!(meta.length, 1);
            continue;
        }
        assert_eq!(meta.length, 8);
        assert!(got.insert((k, meta.shape[0])));
    }
    assert_eq!(got, expected);
    let stats = tier.stats();
    assert_eq!((stats.objects, stats.bytes), (1501, 1500 * 8 + 1));
}

#[test]
fn batches_are_pipelined_and_fail_item_by_item() {
    let server = RedisServer::start();
    let tier = server.tier();
    let payloads: Vec<Vec<u8>> = (0..600).map(|i| payload(i, 100 + i as usize)).collect();
    let items: Vec<(ArtifactKey, Meta, &[u8])> = (0..600)
        .map(|i| (key(i), Meta::default(), payloads[i as usize].as_slice()))
        .collect();
    for r in tier.put_many(&items) {
        r.unwrap();
    }
    // Misses, hits and a key that cannot be encoded, in order.
    let bad = ArtifactKey::Custom(CustomKey {
        namespace: "n".repeat(70_000),
        name: String::new(),
    });
    let mut keys: Vec<ArtifactKey> = (0..700).map(key).collect();
    keys.insert(3, bad.clone());
    let got = tier.get_many(&keys);
    assert_eq!(got.len(), 701);
    assert!(matches!(got[3], Err(Error::Key { .. })));
    for (k, r) in keys.iter().zip(&got) {
        if *k == bad {
            continue;
        }
        let ArtifactKey::Custom(c) = k else { panic!() };
        let i: u64 = c.name[1..].parse().unwrap();
        match r.as_ref().unwrap() {
            Some(o) => {
                assert!(i < 600);
                assert_eq!(&*o.bytes, payload(i, 100 + i as usize).as_slice());
            }
            None => assert!(i >= 600),
        }
    }
    let stats = tier.stats();
    assert_eq!((stats.hits, stats.misses), (600, 100));
    let mixed = tier.put_many(&[
        (key(1), Meta::default(), b"one"),
        (bad, Meta::default(), b"bad"),
        (key(2), Meta::default(), b"two"),
    ]);
    assert!(mixed[0].is_ok() && mixed[2].is_ok());
    assert!(matches!(mixed[1], Err(Error::Key { .. })));
    assert_eq!(&*tier.get(&key(2)).unwrap().unwrap().bytes, b"two");
    assert!(tier.get_many(&[]).is_empty());
    assert!(tier.put_many(&[]).is_empty());
}

#[test]
fn two_clients_see_each_others_writes() {
    let server = RedisServer::start();
    let (a, b) = (server.tier(), server.tier());
    a.put(&key(1), Meta::default(), b"from a").unwrap();
    assert_eq!(&*b.get(&key(1)).unwrap().unwrap().bytes, b"from a");
    b.put(&key(1), Meta::default(), b"from b").unwrap();
    assert_eq!(&*a.get(&key(1)).unwrap().unwrap().bytes, b"from b");
    assert!(b.delete(&key(1)).unwrap());
    assert!(a.get(&key(1)).unwrap().is_none());
    // Another prefix is another store on the same server.
    let c = RedisTier::connect(
        &server.url(),
        RedisOptions {
            prefix: "other:".into(),
            ..RedisOptions::default()
        },
    )
    .unwrap();
    a.put(&key(2), Meta::default(), b"a").unwrap();
    assert!(c.get(&key(2)).unwrap().is_none());
    assert!(c.list().unwrap().is_empty());
}

fn assert_corrupt(r: stratacache::Result<Option<stratacache::Object>>, what: &str) -> String {
    match r {
        Err(Error::Corrupt { key, reason, .. }) => {
            assert_eq!(key, key_text(), "{what}");
            reason
        }
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    }
}

fn key_text() -> String {
    key(1).to_string()
}

#[test]
fn a_damaged_or_foreign_value_is_corrupt_then_a_miss() {
    let server = RedisServer::start();
    let tier = server.tier();
    let mut raw = server.raw();
    let name = redis_name(&key(1));
    let len = 500usize;
    // One flipped byte anywhere: header, key, metadata or payload.
    for offset in [0usize, 30, 45, 60, 300] {
        tier.put(&key(1), Meta::default(), &payload(1, len))
            .unwrap();
        let value: Vec<u8> = redis::cmd("GET").arg(&name).query(&mut raw).unwrap();
        let offset = offset.min(value.len() - 1);
        let _: i64 = redis::cmd("SETRANGE")
            .arg(&name)
            .arg(offset)
            .arg(&[value[offset] ^ 0x40][..])
            .query(&mut raw)
            .unwrap();
        let reason = assert_corrupt(tier.get(&key(1)), &format!("byte {offset}"));
        assert!(reason.contains("dropped"), "{reason}");
        assert!(tier.get(&key(1)).unwrap().is_none(), "byte {offset}");
    }
    // A truncated value.
    tier.put(&key(1), Meta::default(), &payload(1, len))
        .unwrap();
    let value: Vec<u8> = redis::cmd("GET").arg(&name).query(&mut raw).unwrap();
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg(&value[..value.len() - 1])
        .query(&mut raw)
        .unwrap();
    assert_corrupt(tier.get(&key(1)), "truncated");
    assert!(tier.get(&key(1)).unwrap().is_none());
    // A foreign value under the prefix, in a batch too.
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg("hello")
        .query(&mut raw)
        .unwrap();
    let mut batch = tier.get_many(&[key(1), key(2)]);
    assert!(batch.pop().unwrap().unwrap().is_none());
    assert_corrupt(batch.pop().unwrap(), "foreign");
    assert!(tier.get(&key(1)).unwrap().is_none());
    // A value of another type.
    let _: i64 = redis::cmd("LPUSH")
        .arg(&name)
        .arg("x")
        .query(&mut raw)
        .unwrap();
    assert_corrupt(tier.get(&key(1)), "a list");
    assert!(tier.get(&key(1)).unwrap().is_none());
    // A sound record of another key, copied under this key's name (what a
    // digest collision would look like): checksums pass, the key does not.
    tier.put(&key(2), Meta::default(), b"two").unwrap();
    let other: Vec<u8> = redis::cmd("GET")
        .arg(redis_name(&key(2)))
        .query(&mut raw)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg(&other)
        .query(&mut raw)
        .unwrap();
    let reason = assert_corrupt(tier.get(&key(1)), "another key");
    assert!(reason.contains("another key"), "{reason}");
    assert!(tier.get(&key(1)).unwrap().is_none());
    assert_eq!(&*tier.get(&key(2)).unwrap().unwrap().bytes, b"two");
}

#[test]
fn a_full_server_refuses_writes_with_full() {
    let server = RedisServer::with(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]);
    let tier = server.tier();
    let big = vec![7u8; 100_000];
    let mut stored = Vec::new();
    let full = (0..200).find_map(|i| match tier.put(&key(i), Meta::default(), &big) {
        Ok(()) => {
            stored.push(i);
            None
        }
        Err(e) => Some((i, e)),
    });
    let Some((i, err)) = full else {
        panic!("200 puts of 100 kB fit in 3 MB")
    };
    assert!(err.is_full(), "{err}");
    assert!(err.to_string().contains("OOM"), "{err}");
    assert!(err.to_string().contains(&key(i).to_string()), "{err}");
    // Nothing stored for the refused key; what was stored reads back.
    assert!(tier.get(&key(i)).unwrap().is_none());
    assert_eq!(
        tier.get(&key(stored[0])).unwrap().unwrap().bytes.len(),
        100_000
    );
    let many = tier.put_many(&[
        (key(1000), Meta::default(), &big[..]),
        (key(1001), Meta::default(), &big[..]),
    ]);
    assert!(
        many.iter().all(|r| matches!(r, Err(Error::Full { .. }))),
        "{many:?}"
    );
    // Deleting makes room again.
    for i in &stored {
        assert!(tier.delete(&key(*i)).unwrap());
    }
    tier.put(&key(i), Meta::default(), &big).unwrap();
}

#[test]
fn an_object_above_the_configured_capacity_is_refused() {
    let server = RedisServer::start();
    let tier = RedisTier::connect(
        &server.url(),
        RedisOptions {
            capacity_bytes: 100,
            ..RedisOptions::default()
        },
    )
    .unwrap();
    assert_eq!(tier.stats().capacity_bytes, 100);
    tier.put(&key(1), Meta::default(), &[0; 100]).unwrap();
    assert!(
        tier.put(&key(2), Meta::default(), &[0; 101])
            .unwrap_err()
            .is_full()
    );
    assert!(!tier.contains(&key(2)).unwrap());
}

#[test]
fn an_unreachable_server_fails_at_once_without_the_password() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let start = Instant::now();
    let err = RedisTier::connect(&url, RedisOptions::default()).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(err, Error::Remote { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    let secret = format!("redis://:s3cretpass@127.0.0.1:{port}/");
    let err = RedisTier::connect(&secret, RedisOptions::default()).unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains("s3cretpass"), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    }
    // A bad URL and bad options are configuration errors.
    assert!(matches!(
        RedisTier::connect("http://x", RedisOptions::default()),
        Err(Error::Config { .. })
    ));
    let empty = RedisOptions {
        prefix: String::new(),
        ..RedisOptions::default()
    };
    assert!(matches!(
        RedisTier::connect(&url, empty),
        Err(Error::Config { .. })
    ));
}

#[test]
fn a_wrong_password_is_refused_and_never_shown() {
    let server = RedisServer::with(&["--requirepass", "rightpass"]);
    let wrong = format!("redis://:wrongpass@127.0.0.1:{}/", server.port);
    let err = RedisTier::connect(&wrong, RedisOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err:?}");
    assert!(!err.to_string().contains("wrongpass"), "{err}");
    let right = format!("redis://:rightpass@127.0.0.1:{}/", server.port);
    let tier = RedisTier::connect(&right, RedisOptions::default()).unwrap();
    assert!(!format!("{tier:?} {}", tier.url()).contains("rightpass"));
    tier.put(&key(1), Meta::default(), b"x").unwrap();
    assert!(tier.contains(&key(1)).unwrap());
}

#[test]
fn a_killed_connection_is_replaced_and_a_dead_server_reported() {
    let mut server = RedisServer::start();
    let tier = server.tier();
    tier.put(&key(1), Meta::default(), b"one").unwrap();
    // The server drops every client: the pooled connection is dead, and
    // the next call retries once on a fresh one.
    let mut raw = server.raw();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut raw)
        .unwrap();
    assert_eq!(&*tier.get(&key(1)).unwrap().unwrap().bytes, b"one");
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut raw)
        .unwrap();
    let got = tier.get_many(&[key(1), key(2)]);
    assert!(got[0].as_ref().unwrap().is_some() && got[1].as_ref().unwrap().is_none());
    // With the server gone, calls fail with Remote, not hang or panic.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let start = Instant::now();
    let err = tier.get(&key(1)).unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err:?}");
    assert!(err.to_string().contains(&key(1).to_string()), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(tier.put(&key(1), Meta::default(), b"x").is_err());
    assert!(tier.put_many(&[(key(1), Meta::default(), b"x")])[0].is_err());
    assert!(tier.list().is_err());
    assert_eq!(tier.stats().objects, 0);
}

#[test]
fn threads_read_whole_objects_only() {
    let server = RedisServer::start();
    let tier = Arc::new(
        RedisTier::connect(
            &server.url(),
            RedisOptions {
                connections: 2,
                ..RedisOptions::default()
            },
        )
        .unwrap(),
    );
    // Each write's payload says who wrote it and is checkable whole.
    fn versioned(t: u64, n: u64) -> Vec<u8> {
        let len = 64 + ((t * 7 + n * 13) % 512) as usize;
        let mut v = Vec::with_capacity(len + 16);
        v.extend_from_slice(&t.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
        v.extend(payload(t * 1000 + n, len));
        v
    }
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let tier = Arc::clone(&tier);
            thread::spawn(move || {
                for n in 0..150u64 {
                    let k = key(n % 5);
                    match n % 4 {
                        0 | 1 => tier.put(&k, Meta::default(), &versioned(t, n)).unwrap(),
                        2 => {
                            let batch: Vec<_> = (0..5).map(key).collect();
                            for r in tier.get_many(&batch) {
                                check(r.unwrap());
                            }
                        }
                        _ if n % 20 == 3 => {
                            tier.delete(&k).unwrap();
                        }
                        _ => check(tier.get(&k).unwrap()),
                    }
                }
            })
        })
        .collect();
    fn check(got: Option<stratacache::Object>) {
        let Some(o) = got else { return };
        let b = &o.bytes;
        let t = u64::from_le_bytes(b[0..8].try_into().unwrap());
        let n = u64::from_le_bytes(b[8..16].try_into().unwrap());
        assert!(t < 4 && n < 150, "unknown writer {t}/{n}");
        assert_eq!(&b[..], versioned(t, n).as_slice(), "a torn or mixed object");
        assert_eq!(o.meta.length, b.len() as u64);
    }
    for th in threads {
        th.join().unwrap();
    }
    let stats = tier.stats();
    assert!(stats.hits + stats.misses > 0);
}
