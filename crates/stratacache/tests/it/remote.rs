//! The store server and the remote tier: every call over TCP and a Unix
//! socket, errors crossing the wire as their own variants, batches in one
//! round trip, protocol violations closing only their connection, and
//! several processes (tensor-parallel ranks) sharing one store.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use stratacache::remote::{MAGIC, PROTOCOL_VERSION, op, status};
use stratacache::{
    ArtifactKey, CustomKey, DiskOptions, DiskTier, Error, FlushPolicy, KvChunkKey, Layers, Link,
    LinkMode, Listener, MemoryTier, Meta, Object, RemoteOptions, RemoteTier, ServeOptions, Server,
    StorageEngine, Tier, TierChain, TierStats, checksum,
};

fn key(name: &str) -> ArtifactKey {
    ArtifactKey::Custom(CustomKey {
        namespace: "remote-test".into(),
        name: name.into(),
    })
}

/// Bytes that name their seed, so a mix-up shows.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

fn serve(store: Arc<dyn Tier>, addr: &str, options: ServeOptions) -> Server {
    Server::start(Listener::bind(addr).unwrap(), store, options).unwrap()
}

fn client(server: &Server) -> RemoteTier {
    RemoteTier::connect(server.local_addr(), RemoteOptions::default()).unwrap()
}

/// Every call of the trait against a served memory tier.
fn exercise(tier: &RemoteTier) {
    assert_eq!(tier.name(), "remote");
    assert_eq!(tier.served_name(), "memory");
    assert!(tier.can_pin());
    let meta = Meta {
        dtype: "bf16".into(),
        shape: vec![2, 8, 128],
        codec: "raw".into(),
        created_ns: 1234,
        ..Meta::default()
    };
    let small = payload(1, 1000);
    tier.put(&key("a"), meta.clone(), &small).unwrap();
    let got = tier.get(&key("a")).unwrap().unwrap();
    assert_eq!(&*got.bytes, small.as_slice());
    assert_eq!(
        got.meta,
        Meta {
            length: 1000,
            checksum: checksum(&small),
            ..meta.clone()
        }
    );
    assert!(tier.get(&key("missing")).unwrap().is_none());
    assert!(tier.contains(&key("a")).unwrap());
    assert!(!tier.contains(&key("missing")).unwrap());

    // 16 MiB moves whole.
    let big = payload(2, 16 << 20);
    tier.put(&key("big"), Meta::default(), &big).unwrap();
    let got = tier.get(&key("big")).unwrap().unwrap();
    assert!(got.bytes[..] == big[..], "16 MiB payload differs");
    drop(got);

    let mut listed = tier.list().unwrap();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].0, key("a"));
    assert_eq!(listed[0].1.shape, vec![2, 8, 128]);
    assert_eq!(listed[1].0, key("big"));
    assert_eq!(listed[1].1.length, 16 << 20);

    let stats = tier.stats();
    assert_eq!(stats.objects, 2);
    assert_eq!(stats.bytes, 1000 + (16 << 20));
    assert_eq!(stats.capacity_bytes, 64 << 20);
    assert_eq!((stats.hits, stats.misses), (2, 1));

    assert!(tier.pin(&key("a")).unwrap());
    assert!(!tier.pin(&key("missing")).unwrap());
    assert!(tier.unpin(&key("a")).unwrap());
    tier.flush().unwrap();

    assert!(tier.delete(&key("a")).unwrap());
    assert!(!tier.delete(&key("a")).unwrap());
    assert!(tier.get(&key("a")).unwrap().is_none());
}

#[test]
fn every_call_round_trips_over_tcp() {
    let server = serve(
        Arc::new(MemoryTier::new(64 << 20, 1)),
        "127.0.0.1:0",
        ServeOptions::default(),
    );
    assert!(server.local_addr().starts_with("tcp://127.0.0.1:"));
    let tier = client(&server);
    exercise(&tier);
    let stats = server.stats();
    assert!(stats.requests >= 15, "{stats:?}");
    assert!(
        stats.bytes_in > 16 << 20 && stats.bytes_out > 16 << 20,
        "{stats:?}"
    );
    assert_eq!((stats.errors, stats.error_replies), (0, 0), "{stats:?}");
    // Shutdown closes the open connections and returns.
    let t = Instant::now();
    server.shutdown().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    let err = tier.get(&key("a")).unwrap_err().to_string();
    assert!(err.contains("remote tcp://127.0.0.1:"), "{err}");
}

#[test]
fn every_call_round_trips_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strata.sock");
    let addr = format!("unix://{}", path.display());
    let server = serve(
        Arc::new(MemoryTier::new(64 << 20, 1)),
        &addr,
        ServeOptions::default(),
    );
    assert_eq!(server.local_addr(), addr);
    let tier = client(&server);
    exercise(&tier);
    server.shutdown().unwrap();
    assert!(!path.exists(), "the socket file is removed on shutdown");
}

#[test]
fn a_restarted_server_is_reconnected_and_a_stale_socket_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("s").display());
    let server = serve(
        Arc::new(MemoryTier::new(1 << 20, 1)),
        &addr,
        ServeOptions::default(),
    );
    let tier = client(&server);
    tier.put(&key("x"), Meta::default(), b"one").unwrap();
    // Binding the same path while it serves fails.
    assert!(Listener::bind(&addr).is_err());
    server.shutdown().unwrap();
    // A stale socket file (its server gone without cleanup) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    drop(stale);
    let server = serve(
        Arc::new(MemoryTier::new(1 << 20, 1)),
        &addr,
        ServeOptions::default(),
    );
    // The pooled connection is dead. A delete is not retried, so the
    // connection is checked before use and a fresh one opened.
    assert!(!tier.delete(&key("x")).unwrap());
    tier.put(&key("x"), Meta::default(), b"two").unwrap();
    server.shutdown().unwrap();
    let server = serve(
        Arc::new(MemoryTier::new(1 << 20, 1)),
        &addr,
        ServeOptions::default(),
    );
    // A read fails on the dead connection and is retried on a fresh one.
    assert!(tier.get(&key("x")).unwrap().is_none());
    tier.put(&key("x"), Meta::default(), b"three").unwrap();
    assert_eq!(&*tier.get(&key("x")).unwrap().unwrap().bytes, b"three");
    drop(server);
}

/// A tier whose every call fails the way a persistent tier's can, to see
/// each error cross the wire as its own variant.
struct Failing;

impl Tier for Failing {
    fn name(&self) -> &str {
        "disk"
    }
    fn get(&self, key: &ArtifactKey) -> stratacache::Result<Option<Object>> {
        Err(Error::Corrupt {
            tier: "disk".into(),
            key: key.to_string(),
            reason: "payload checksum 1 does not match the stored 2".into(),
        })
    }
    fn put(&self, _: &ArtifactKey, _: Meta, _: &[u8]) -> stratacache::Result<()> {
        Err(Error::Io {
            tier: "disk".into(),
            op: "writing",
            path: "/data/seg-7".into(),
            source: std::io::Error::other("no space left"),
        })
    }
    fn contains(&self, _: &ArtifactKey) -> stratacache::Result<bool> {
        Err(Error::Closed {
            what: "disk tier".into(),
        })
    }
    fn delete(&self, _: &ArtifactKey) -> stratacache::Result<bool> {
        Ok(false)
    }
    fn stats(&self) -> TierStats {
        TierStats::default()
    }
    fn list(&self) -> stratacache::Result<Vec<(ArtifactKey, Meta)>> {
        Ok(Vec::new())
    }
}

#[test]
fn full_and_corrupt_keep_their_variants() {
    // Full: a small memory tier.
    let small = Arc::new(MemoryTier::new(1000, 1));
    let server = serve(small.clone(), "127.0.0.1:0", ServeOptions::default());
    let tier = client(&server);
    let addr = server.local_addr().to_string();
    match tier.put(&key("huge"), Meta::default(), &payload(3, 2000)) {
        Err(Error::Full {
            tier: t,
            key: k,
            message,
        }) => {
            assert_eq!(t, format!("remote {addr} memory"));
            assert_eq!(k, "custom/remote-test/huge");
            assert!(message.contains("2000"), "{message}");
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(!tier.contains(&key("huge")).unwrap());

    // Corrupt, found by the client: an object whose stored checksum does
    // not match its bytes is refused, dropped, and then a miss.
    let bytes = payload(4, 100);
    small
        .put(
            &key("bad"),
            Meta {
                checksum: checksum(&bytes) ^ 1,
                ..Meta::default()
            },
            &bytes,
        )
        .unwrap();
    match tier.get(&key("bad")) {
        Err(Error::Corrupt {
            tier: t,
            key: k,
            reason,
        }) => {
            assert_eq!(t, format!("remote {addr}"));
            assert_eq!(k, "custom/remote-test/bad");
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        !small.contains(&key("bad")).unwrap(),
        "dropped on the server"
    );
    assert!(tier.get(&key("bad")).unwrap().is_none());
    // Without a stored checksum, the length alone is checked.
    small.put(&key("plain"), Meta::default(), b"ok").unwrap();
    assert_eq!(&*tier.get(&key("plain")).unwrap().unwrap().bytes, b"ok");
    drop(server);

    // Corrupt and I/O errors of the served tier itself.
    let server = serve(Arc::new(Failing), "127.0.0.1:0", ServeOptions::default());
    let tier = client(&server);
    assert!(!tier.can_pin());
    assert_eq!(tier.served_name(), "disk");
    match tier.get(&key("k")) {
        Err(Error::Corrupt {
            tier: t,
            key: k,
            reason,
        }) => {
            assert!(t.ends_with(" disk"), "{t}");
            assert_eq!(k, "custom/remote-test/k");
            assert_eq!(reason, "payload checksum 1 does not match the stored 2");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    match tier.put(&key("k"), Meta::default(), b"x") {
        Err(Error::Remote { tier: t, message }) => {
            assert_eq!(t, format!("remote {}", server.local_addr()));
            assert!(
                message.contains("/data/seg-7") && message.contains("no space left"),
                "{message}"
            );
        }
        other => panic!("expected Remote, got {other:?}"),
    }
    let err = tier.contains(&key("k")).unwrap_err().to_string();
    assert!(err.contains("disk tier is closed"), "{err}");
    // Every one was an answer: the connection stayed.
    assert_eq!(server.stats().errors, 0);
    assert_eq!(server.stats().connections_accepted, 1);
}

#[test]
fn batches_are_one_round_trip_each() {
    let server = serve(
        Arc::new(MemoryTier::new(4 << 20, 1)),
        "127.0.0.1:0",
        ServeOptions::default(),
    );
    let tier = client(&server);
    let bodies: Vec<Vec<u8>> = (0..10)
        .map(|i| payload(i, 10 + i as usize * 9000))
        .collect();
    let items: Vec<(ArtifactKey, Meta, &[u8])> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| (key(&format!("b{i}")), Meta::default(), b.as_slice()))
        .collect();
    let before = server.stats().requests;
    let results = tier.put_many(&items);
    assert_eq!(server.stats().requests, before + 1);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");

    // One too large for the tier fails alone.
    let huge = payload(99, 5 << 20);
    let mixed = [
        (key("ok"), Meta::default(), &b"fine"[..]),
        (key("huge"), Meta::default(), huge.as_slice()),
    ];
    let results = tier.put_many(&mixed);
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(Error::Full { .. })), "{results:?}");

    let mut keys: Vec<ArtifactKey> = (0..10).map(|i| key(&format!("b{i}"))).collect();
    keys.insert(3, key("absent"));
    let before = server.stats().requests;
    let got = tier.get_many(&keys);
    assert_eq!(server.stats().requests, before + 1);
    assert_eq!(got.len(), 11);
    assert!(got[3].as_ref().unwrap().is_none());
    for (i, b) in bodies.iter().enumerate() {
        let at = if i < 3 { i } else { i + 1 };
        let o = got[at].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(&*o.bytes, b.as_slice(), "item {i}");
        assert_eq!(o.meta.checksum, checksum(b));
    }
    // A key that cannot encode fails alone, locally.
    let bad = ArtifactKey::KvChunk(KvChunkKey {
        model: "m".into(),
        adapter: None,
        kv_dtype: "bf16".into(),
        tp_size: 2,
        rank: 5,
        prefix_hash: vec![1],
        layers: Layers::Bundle,
    });
    let got = tier.get_many(&[bad, key("ok")]);
    assert!(matches!(got[0], Err(Error::Key { .. })));
    assert_eq!(&*got[1].as_ref().unwrap().as_ref().unwrap().bytes, b"fine");
    assert!(tier.get_many(&[]).is_empty());
}

/// A raw connection, for speaking the protocol by hand.
fn raw(server: &Server) -> TcpStream {
    let addr = server.local_addr().trim_start_matches("tcp://");
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn hello(version: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend(version.to_le_bytes());
    h.extend((1u64 << 30).to_le_bytes());
    h
}

/// Reads one frame: its code and body.
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).unwrap();
    let len = u64::from_le_bytes(h[1..].try_into().unwrap());
    assert!(len < 1 << 20);
    let mut body = vec![0; len as usize];
    s.read_exact(&mut body).unwrap();
    (h[0], body)
}

/// The message of an error body (tier, key, message).
fn message(body: &[u8]) -> String {
    let mut at = 0;
    let mut s = String::new();
    for _ in 0..3 {
        let n = u32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
        s = String::from_utf8(body[at + 4..at + 4 + n].to_vec()).unwrap();
        at += 4 + n;
    }
    assert_eq!(at, body.len());
    s
}

fn assert_closed(s: &mut TcpStream) {
    let mut rest = Vec::new();
    // A clean close (0) or a reset both end the connection.
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "{} bytes after the error frame",
        rest.len()
    );
}

#[test]
fn a_wrong_version_is_refused_clearly() {
    let server = serve(
        Arc::new(MemoryTier::new(1 << 20, 1)),
        "127.0.0.1:0",
        ServeOptions::default(),
    );
    let mut s = raw(&server);
    s.write_all(&hello(PROTOCOL_VERSION + 98)).unwrap();
    let (code, body) = read_frame(&mut s);
    assert_eq!(code, status::UNSUPPORTED);
    let m = message(&body);
    assert_eq!(
        m,
        "protocol version 99 is not supported; this server speaks version 1"
    );
    assert_closed(&mut s);

    // The right version gets OK, the version and the server's limit.
    let mut s = raw(&server);
    s.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    let (code, body) = read_frame(&mut s);
    assert_eq!(code, status::OK);
    assert_eq!(body[..4], PROTOCOL_VERSION.to_le_bytes());
    assert_eq!(body[4..], (4u64 << 30).to_le_bytes());

    // Not a stratacache client at all.
    let mut s = raw(&server);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let (code, body) = read_frame(&mut s);
    assert_eq!(code, status::UNSUPPORTED);
    assert!(message(&body).contains("not a stratacache client"));
    assert_closed(&mut s);

    // A client pointed at something that is not a store server says where.
    let not_a_server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = not_a_server.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut c, _) = not_a_server.accept().unwrap();
        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let err = RemoteTier::connect(&addr, RemoteOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("remote tcp://{addr}")), "{err}");
    t.join().unwrap();
    let err = RemoteTier::connect("127.0.0.1:1", RemoteOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("remote tcp://127.0.0.1:1") && err.contains("connecting"),
        "{err}"
    );
    assert!(RemoteTier::connect("nonsense", RemoteOptions::default()).is_err());
}

#[test]
fn a_bad_frame_closes_only_its_connection() {
    let server = serve(
        Arc::new(MemoryTier::new(8 << 20, 1)),
        "127.0.0.1:0",
        ServeOptions {
            max_frame: 1 << 20,
            ..ServeOptions::default()
        },
    );
    let tier = client(&server);
    tier.put(&key("kept"), Meta::default(), b"still here")
        .unwrap();

    let handshaken = || {
        let mut s = raw(&server);
        s.write_all(&hello(PROTOCOL_VERSION)).unwrap();
        assert_eq!(read_frame(&mut s).0, status::OK);
        s
    };
    // A frame claiming 1 TiB: refused from its header.
    let mut s = handshaken();
    let mut frame = vec![op::PUT];
    frame.extend((1u64 << 40).to_le_bytes());
    s.write_all(&frame).unwrap();
    let (code, body) = read_frame(&mut s);
    assert_eq!(code, status::TOO_LARGE);
    assert!(message(&body).contains("exceeds the limit of 1048576 bytes"));
    assert_closed(&mut s);

    // A key length running past its frame.
    let mut s = handshaken();
    let mut frame = vec![op::GET];
    frame.extend(8u64.to_le_bytes());
    frame.extend(u32::MAX.to_le_bytes());
    frame.extend([0; 4]);
    s.write_all(&frame).unwrap();
    let (code, body) = read_frame(&mut s);
    assert_eq!(code, status::BAD_REQUEST);
    assert!(
        message(&body).contains("past the end of its frame"),
        "{}",
        message(&body)
    );
    assert_closed(&mut s);

    // An unknown opcode.
    let mut s = handshaken();
    let mut frame = vec![200];
    frame.extend(0u64.to_le_bytes());
    s.write_all(&frame).unwrap();
    let (code, body) = read_frame(&mut s);
    assert_eq!(code, status::UNSUPPORTED);
    assert!(message(&body).contains("opcode 200"));
    assert_closed(&mut s);

    // A well-framed request whose key does not decode is answered, and
    // the connection stays.
    let mut s = handshaken();
    let mut frame = vec![op::CONTAINS];
    frame.extend(7u64.to_le_bytes());
    frame.extend(3u32.to_le_bytes());
    frame.extend([9, 9, 9]);
    s.write_all(&frame).unwrap();
    let (code, body) = read_frame(&mut s);
    assert_eq!(code, status::BAD_REQUEST);
    assert!(message(&body).contains("not an encoded key"));
    let mut frame = vec![op::NAME];
    frame.extend(0u64.to_le_bytes());
    s.write_all(&frame).unwrap();
    assert_eq!(read_frame(&mut s).0, status::OK);

    // The client's pooled connection never noticed.
    assert_eq!(
        &*tier.get(&key("kept")).unwrap().unwrap().bytes,
        b"still here"
    );
    let stats = server.stats();
    assert_eq!(stats.errors, 3, "{stats:?}");

    // Over the server's limit, the client refuses before sending.
    let err = tier
        .put(&key("big"), Meta::default(), &payload(5, 2 << 20))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Remote { message, .. } if message.contains("exceeds the server's frame limit of 1048576")),
        "{err}"
    );
    // A reply over the client's own limit is refused by the server.
    tier.put(&key("mid"), Meta::default(), &payload(6, 100_000))
        .unwrap();
    let picky = RemoteTier::connect(
        server.local_addr(),
        RemoteOptions {
            max_frame: 64 * 1024,
            ..RemoteOptions::default()
        },
    )
    .unwrap();
    let err = picky.get(&key("mid")).unwrap_err().to_string();
    assert!(
        err.contains("exceeds the client's frame limit of 65536"),
        "{err}"
    );
    assert_eq!(
        &*picky.get(&key("kept")).unwrap().unwrap().bytes,
        b"still here"
    );
}

#[test]
fn slow_and_surplus_clients_are_turned_away() {
    let server = serve(
        Arc::new(MemoryTier::new(1 << 20, 1)),
        "127.0.0.1:0",
        ServeOptions {
            max_connections: 1,
            timeout: Duration::from_millis(200),
            ..ServeOptions::default()
        },
    );
    // A connection that never says hello is dropped after the timeout.
    let mut silent = raw(&server);
    let t = Instant::now();
    assert_closed(&mut silent);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    drop(silent);
    // Give the server a moment to forget the silent one.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.stats().connections_open > 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = client(&server);
    let err = RemoteTier::connect(server.local_addr(), RemoteOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("at its limit of 1 connections"), "{err}");
    // Idle is not slow: the first client's connection outlives the timeout.
    std::thread::sleep(Duration::from_millis(300));
    first.put(&key("a"), Meta::default(), b"a").unwrap();
    assert_eq!(server.stats().connections_accepted, 3);
}

#[test]
fn threads_share_a_few_connections() {
    let server = serve(
        Arc::new(MemoryTier::new(64 << 20, 8)),
        "127.0.0.1:0",
        ServeOptions::default(),
    );
    let tier = Arc::new(
        RemoteTier::connect(
            server.local_addr(),
            RemoteOptions {
                connections: 2,
                ..RemoteOptions::default()
            },
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let tier = tier.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let k = key(&format!("t{t}-{i}"));
                    let b = payload(t * 1000 + i, 100 + i as usize * 37);
                    tier.put(&k, Meta::default(), &b).unwrap();
                    assert_eq!(&*tier.get(&k).unwrap().unwrap().bytes, b.as_slice());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(tier.stats().objects, 300);
    let stats = server.stats();
    assert!(stats.connections_open <= 6, "{stats:?}");
    assert_eq!(stats.errors, 0);
}

/// One call of the model test.
#[derive(Debug, Clone)]
enum Call {
    Put(u8, Vec<u8>),
    Get(u8),
    Contains(u8),
    Delete(u8),
    PutMany(Vec<(u8, Vec<u8>)>),
    GetMany(Vec<u8>),
}

fn call() -> impl Strategy<Value = Call> {
    let bytes = proptest::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        (0..6u8, bytes.clone()).prop_map(|(k, b)| Call::Put(k, b)),
        (0..6u8).prop_map(Call::Get),
        (0..6u8).prop_map(Call::Contains),
        (0..6u8).prop_map(Call::Delete),
        proptest::collection::vec((0..6u8, bytes), 0..4).prop_map(Call::PutMany),
        proptest::collection::vec(0..6u8, 0..5).prop_map(Call::GetMany),
    ]
}

fn k(i: u8) -> ArtifactKey {
    key(&format!("m{i}"))
}

fn bytes_of(r: stratacache::Result<Option<Object>>) -> Option<Vec<u8>> {
    r.unwrap().map(|o| o.bytes.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A remote tier answers every call as the tier it serves would.
    #[test]
    fn a_remote_tier_behaves_as_the_tier_it_serves(calls in proptest::collection::vec(call(), 1..40)) {
        let server = serve(
            Arc::new(MemoryTier::new(1 << 20, 2)),
            "127.0.0.1:0",
            ServeOptions::default(),
        );
        let remote = client(&server);
        let local = MemoryTier::new(1 << 20, 2);
        for c in calls {
            match c {
                Call::Put(i, b) => {
                    remote.put(&k(i), Meta::default(), &b).unwrap();
                    local.put(&k(i), Meta::default(), &b).unwrap();
                }
                Call::Get(i) => prop_assert_eq!(bytes_of(remote.get(&k(i))), bytes_of(local.get(&k(i)))),
                Call::Contains(i) => prop_assert_eq!(remote.contains(&k(i)).unwrap(), local.contains(&k(i)).unwrap()),
                Call::Delete(i) => prop_assert_eq!(remote.delete(&k(i)).unwrap(), local.delete(&k(i)).unwrap()),
                Call::PutMany(items) => {
                    let items: Vec<(ArtifactKey, Meta, &[u8])> =
                        items.iter().map(|(i, b)| (k(*i), Meta::default(), b.as_slice())).collect();
                    for (r, l) in remote.put_many(&items).into_iter().zip(local.put_many(&items)) {
                        prop_assert_eq!(r.is_ok(), l.is_ok());
                    }
                }
                Call::GetMany(keys) => {
                    let keys: Vec<ArtifactKey> = keys.into_iter().map(k).collect();
                    let r: Vec<_> = remote.get_many(&keys).into_iter().map(bytes_of).collect();
                    let l: Vec<_> = local.get_many(&keys).into_iter().map(bytes_of).collect();
                    prop_assert_eq!(r, l);
                }
            }
        }
        let (rs, ls) = (remote.stats(), local.stats());
        prop_assert_eq!((rs.objects, rs.bytes), (ls.objects, ls.bytes));
        let mut listed: Vec<ArtifactKey> = remote.list().unwrap().into_iter().map(|e| e.0).collect();
        let mut want: Vec<ArtifactKey> = local.list().unwrap().into_iter().map(|e| e.0).collect();
        listed.sort();
        want.sort();
        prop_assert_eq!(listed, want);
    }

    /// Whatever bytes follow a handshake, the server answers with
    /// well-formed frames or closes, and goes on serving others.
    #[test]
    fn any_bytes_after_the_handshake_harm_only_their_connection(
        code in 0..16u8,
        declared in prop_oneof![0..64u64, any::<u64>()],
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let server = serve(
            Arc::new(MemoryTier::new(1 << 20, 1)),
            "127.0.0.1:0",
            ServeOptions { max_frame: 1 << 16, ..ServeOptions::default() },
        );
        let tier = client(&server);
        tier.put(&key("kept"), Meta::default(), b"kept").unwrap();
        let mut s = raw(&server);
        s.write_all(&hello(PROTOCOL_VERSION)).unwrap();
        let mut frame = vec![code];
        frame.extend(declared.to_le_bytes());
        frame.extend(&body);
        // The server may close before reading it all.
        let _ = s.write_all(&frame);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        // Every frame that came back is whole and has a known status.
        let mut at = 0;
        while at < back.len() {
            prop_assert!(back.len() - at >= 9, "a torn frame header");
            prop_assert!(back[at] <= status::TOO_LARGE, "status {}", back[at]);
            let len = u64::from_le_bytes(back[at + 1..at + 9].try_into().unwrap());
            prop_assert!(len <= (back.len() - at - 9) as u64, "a torn frame");
            at += 9 + len as usize;
        }
        prop_assert_eq!(&*tier.get(&key("kept")).unwrap().unwrap().bytes, b"kept");
    }
}

// ---------------------------------------------------------------------------
// Several processes: a store server and three tensor-parallel ranks.

const TP: u32 = 3;
const CHUNKS: u32 = 24;
const ENV_READY: &str = "STRATA_REMOTE_TEST_READY";
const ENV_ADDR: &str = "STRATA_REMOTE_TEST_ADDR";
const ENV_RANK: &str = "STRATA_REMOTE_TEST_RANK";

fn kv_key(rank: u32, chunk: u32) -> ArtifactKey {
    ArtifactKey::KvChunk(KvChunkKey {
        model: "llama-3-8b".into(),
        adapter: None,
        kv_dtype: "bf16".into(),
        tp_size: TP,
        rank,
        prefix_hash: u64::from(chunk).to_be_bytes().to_vec(),
        layers: Layers::One(chunk % 4),
    })
}

/// The bytes rank `rank` stores for `chunk`: distinct per rank, so a rank
/// reading another's key would see it.
fn kv_bytes(rank: u32, chunk: u32) -> Vec<u8> {
    let len = if chunk == 0 {
        1 << 20
    } else {
        512 + chunk as usize * 700
    };
    payload(u64::from(rank) << 32 | u64::from(chunk), len)
}

/// Reads every chunk of `rank` (waiting for it to be written) and checks
/// the exact bytes.
fn check_rank(tier: &RemoteTier, rank: u32, deadline: Instant) {
    let keys: Vec<ArtifactKey> = (0..CHUNKS).map(|c| kv_key(rank, c)).collect();
    let mut left: Vec<u32> = (0..CHUNKS).collect();
    while !left.is_empty() {
        assert!(
            Instant::now() < deadline,
            "rank {rank}: chunks {left:?} never appeared"
        );
        let got = tier.get_many(&keys);
        left.retain(|&c| match &got[c as usize] {
            Ok(Some(o)) => {
                assert!(
                    *o.bytes == *kv_bytes(rank, c),
                    "rank {rank} chunk {c}: wrong bytes"
                );
                assert_eq!(o.meta.dtype, "bf16");
                false
            }
            Ok(None) => true,
            Err(e) => panic!("rank {rank} chunk {c}: {e}"),
        });
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
#[ignore = "a child process of processes_share_one_store"]
fn child_store_server() {
    let Some(ready) = std::env::var_os(ENV_READY) else {
        return;
    };
    // A whole engine: a small write-back memory tier (evictions, flushes
    // and bypasses all the time) over a disk tier.
    let dir = tempfile::tempdir().unwrap();
    let chain = TierChain::new(
        vec![
            Link {
                tier: Arc::new(MemoryTier::new(4 << 20, 2)),
                mode: LinkMode::WriteBack,
                promote: true,
            },
            Link {
                tier: Arc::new(DiskTier::open(dir.path(), DiskOptions::default()).unwrap()),
                mode: LinkMode::WriteThrough,
                promote: false,
            },
        ],
        FlushPolicy::default(),
    )
    .unwrap();
    let engine = StorageEngine::new(chain, vec!["cpu".into(), "ssd".into()]).unwrap();
    let server = serve(Arc::new(engine), "127.0.0.1:0", ServeOptions::default());
    let ready = Path::new(&ready);
    let tmp = ready.with_extension("tmp");
    std::fs::write(&tmp, server.local_addr()).unwrap();
    std::fs::rename(&tmp, ready).unwrap();
    // Until killed; bounded in case the parent died first.
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
#[ignore = "a child process of processes_share_one_store"]
fn child_tp_rank() {
    let (Ok(addr), Ok(rank)) = (std::env::var(ENV_ADDR), std::env::var(ENV_RANK)) else {
        return;
    };
    let rank: u32 = rank.parse().unwrap();
    let tier = RemoteTier::connect(&addr, RemoteOptions::default()).unwrap();
    let meta = Meta {
        dtype: "bf16".into(),
        shape: vec![2, 16, 128],
        ..Meta::default()
    };
    // Half one by one, half in one batch.
    let bodies: Vec<Vec<u8>> = (0..CHUNKS).map(|c| kv_bytes(rank, c)).collect();
    for c in 0..CHUNKS / 2 {
        tier.put(&kv_key(rank, c), meta.clone(), &bodies[c as usize])
            .unwrap();
    }
    let batch: Vec<(ArtifactKey, Meta, &[u8])> = (CHUNKS / 2..CHUNKS)
        .map(|c| (kv_key(rank, c), meta.clone(), bodies[c as usize].as_slice()))
        .collect();
    for r in tier.put_many(&batch) {
        r.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for other in 0..TP {
        check_rank(&tier, other, deadline);
    }
    // Every rank also writes and reads the same few keys: a read returns
    // one whole write, of some rank, never a mix.
    let mut x = u64::from(rank) * 7919 + 1;
    for i in 0..300u32 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let k = key(&format!("shared{}", (x >> 33) % 6));
        if x >> 63 == 0 {
            tier.put(&k, Meta::default(), &shared_bytes(rank, i))
                .unwrap();
        } else if let Some(o) = tier.get(&k).unwrap() {
            let (r, n) = (
                u32::from_le_bytes(o.bytes[..4].try_into().unwrap()),
                u32::from_le_bytes(o.bytes[4..8].try_into().unwrap()),
            );
            assert!(*o.bytes == *shared_bytes(r, n), "a torn or mixed object");
        }
    }
}

/// A shared key's value as rank `rank` writes it the `i`-th time: it names
/// its writer, so a reader can rebuild it and compare.
fn shared_bytes(rank: u32, i: u32) -> Vec<u8> {
    let mut v = rank.to_le_bytes().to_vec();
    v.extend_from_slice(&i.to_le_bytes());
    v.extend(payload(
        u64::from(rank) << 32 | u64::from(i),
        3000 + (i as usize % 7) * 100,
    ));
    v
}

/// Children killed when the test ends, passed or not.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn child(test: &str, env: &[(&str, String)]) -> Child {
    // This very binary: on Linux through /proc, which still names it when
    // a rebuild has replaced the file since the test started.
    let exe = Path::new("/proc/self/exe");
    let exe = if exe.exists() {
        exe.to_path_buf()
    } else {
        std::env::current_exe().unwrap()
    };
    let mut cmd = Command::new(exe);
    cmd.args([
        test,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

#[test]
fn processes_share_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut children = Children(vec![child(
        "remote::child_store_server",
        &[(ENV_READY, ready.display().to_string())],
    )]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&ready) {
            break a;
        }
        if let Ok(Some(st)) = children.0[0].try_wait() {
            panic!("the server child exited: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "the server child never got ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(addr.starts_with("tcp://"), "{addr}");

    for rank in 0..TP {
        children.0.push(child(
            "remote::child_tp_rank",
            &[(ENV_ADDR, addr.clone()), (ENV_RANK, rank.to_string())],
        ));
    }
    // Threads of this process work alongside: their own keys, and every
    // rank's once written.
    let tier = Arc::new(RemoteTier::connect(&addr, RemoteOptions::default()).unwrap());
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let tier = tier.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let k = key(&format!("parent{t}-{i}"));
                    let b = payload(t << 16 | i, 2000 + i as usize);
                    tier.put(&k, Meta::default(), &b).unwrap();
                    assert_eq!(&*tier.get(&k).unwrap().unwrap().bytes, b.as_slice());
                }
                check_rank(&tier, t as u32, deadline);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    for rank in 0..TP {
        let c = &mut children.0[1 + rank as usize];
        let status = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "rank {rank} did not finish in time"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(e) = c.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "rank {rank} failed ({status}):\n{err}");
    }
    for rank in 0..TP {
        check_rank(&tier, rank, deadline);
    }
    // Every rank's chunks, the parent's 80 objects and at most the six
    // shared keys, each listed once however many tiers hold it.
    let listed = tier.list().unwrap().len();
    let base = (TP * CHUNKS) as usize + 80;
    assert!(
        (base..=base + 6).contains(&listed),
        "{listed} objects listed"
    );
    // The server is killed, not asked: the client says so by address.
    let mut server = children.0.remove(0);
    server.kill().unwrap();
    server.wait().unwrap();
    let err = tier.get(&kv_key(0, 0)).unwrap_err().to_string();
    assert!(err.contains(&addr), "{err}");
}
