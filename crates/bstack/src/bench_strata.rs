//! `bstack bench strata`: every tier against the physical limit under it,
//! measured in the same run.
//!
//! | figure | baseline |
//! |---|---|
//! | `strata.memory.put_get_16mib`: put then get a 16 MiB object, four keys in turn | `memcpy` of 16 MiB into four buffers in turn |
//! | `strata.memory.get_4kib_2threads`: gets of 4 KiB objects from 2 threads | none (reported as gets/s) |
//! | `strata.mmap.put_get_1mib`: put then get 1 MiB in a mapped region | `memcpy` of 2 MiB (the bytes in and out) |
//! | `strata.disk.put_seq` / `get_seq`: 16 MiB objects written then read in order | `raw_file_write` / `raw_file_read` of the same bytes |
//! | `strata.disk.reopen`: opening a disk tier of 100,000 objects | none |
//! | `strata.remote.put_get_16mib`: a served store over loopback TCP | `raw_tcp` round trip of the same bytes |
//! | `strata.redis.put_get_4mib` (when `redis-server` is installed) | `raw_redis` SET + GET of the same bytes |
//! | `strata.exec`: a 64-operation plan from the disk tier into memory on 4 streams | `strata.disk.get_seq` of the same bytes |
//!
//! Disk figures run through the page cache, for the raw baseline as for the
//! tier (both writes end with an fsync): they measure the software, not the
//! device.

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use stratacache::disk::{DiskOptions, DiskTier};
use stratacache::mmap::{MmapOptions, MmapTier};
use stratacache::remote::{RemoteOptions, RemoteTier};
use stratacache::server::{Listener, ServeOptions, Server};
use stratacache::{ArtifactKey, CustomKey, MemoryTier, Meta, Tier};

use crate::Outcome;
use crate::bench::{Figure, emit, median, memcpy_baseline, middle};
use crate::output::Output;

/// Arguments of `bstack strata bench`.
#[derive(Args, Debug)]
pub struct StrataBenchArgs {
    /// Timed runs per figure, after one warm-up run.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Scale of the data, 1.0 = the reference (256 MiB through the disk
    /// tier, 100,000 objects reopened).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

/// `bstack strata bench`.
pub fn run(args: StrataBenchArgs, out: &Output) -> Result<Outcome> {
    if !(1..=1000).contains(&args.runs) {
        bail!("--runs must be 1 to 1000");
    }
    if !(args.scale > 0.0 && args.scale <= 100.0) {
        bail!("--scale must be above 0 and at most 100");
    }
    measure(args.runs, args.scale, out)?;
    Ok(Outcome::Ok)
}

fn key(i: usize) -> ArtifactKey {
    ArtifactKey::Custom(CustomKey {
        namespace: "bench".into(),
        name: format!("object-{i}"),
    })
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Every strata figure.
pub fn measure(runs: usize, scale: f64, out: &Output) -> Result<()> {
    memory(runs, scale, out)?;
    mmap(runs, out)?;
    disk(runs, scale, out)?;
    remote(runs, out)?;
    redis(runs, out)?;
    exec(runs, scale, out)?;
    Ok(())
}

fn memory(runs: usize, scale: f64, out: &Output) -> Result<()> {
    // Four objects in turn, and a baseline copying into four buffers in
    // turn: 80 MiB in play on both sides, more than any cache, so both
    // measure memory bandwidth rather than one side fitting in L3.
    let len = 16 << 20;
    let tier = MemoryTier::new(256 << 20, 1);
    let payload = data(len, 1);
    let mut turn = 0;
    let put_get = median(runs * 4, || {
        let k = key(turn % 4);
        turn += 1;
        let r = tier.put(&k, Meta::default(), black_box(&payload));
        let got = tier.get(&k);
        black_box((r.is_ok(), got.ok().flatten().map(|o| o.bytes.len())));
    });
    let mut buffers = vec![vec![0u8; len]; 4];
    let mut turn = 0;
    let memcpy = median(runs * 4, || {
        let dst = &mut buffers[turn % 4];
        turn += 1;
        dst.copy_from_slice(black_box(&payload));
        black_box(dst);
    });
    emit(
        out,
        runs,
        Figure::new("strata.memory.put_get_16mib", 1, len, put_get)
            .against("memcpy into 4 buffers in turn", memcpy),
    )?;

    // 4 KiB objects: 65,536 of them (256 MiB), read by two threads.
    let n = ((65_536.0 * scale) as usize).clamp(1024, 1 << 20);
    let tier = Arc::new(MemoryTier::new((n as u64) * 4096 * 2, 64));
    let small = data(4096, 2);
    let keys: Vec<ArtifactKey> = (0..n).map(key).collect();
    for k in &keys {
        tier.put(k, Meta::default(), &small)?;
    }
    let keys = Arc::new(keys);
    let per_thread = ((500_000.0 * scale) as usize).max(10_000);
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let (tier, keys) = (tier.clone(), keys.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_u64 + t;
                    let mut found = 0usize;
                    for _ in 0..per_thread {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let k = &keys[(x % keys.len() as u64) as usize];
                        if let Ok(Some(o)) = tier.get(k) {
                            found += o.bytes.len();
                        }
                    }
                    black_box(found)
                })
            })
            .collect();
        for t in threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a bench thread panicked"))?;
        }
        times.push(start.elapsed());
    }
    let time = middle(times);
    let gets = 2 * per_thread;
    emit(
        out,
        runs,
        Figure::new("strata.memory.get_4kib_2threads", gets, gets * 4096, time).with(json!({
            "gets_per_s": gets as f64 / time.as_secs_f64(),
            "threads": 2,
        })),
    )?;
    Ok(())
}

fn mmap(runs: usize, out: &Output) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = MmapTier::open(
        dir.path().join("region"),
        MmapOptions {
            size_bytes: 64 << 20,
            ..MmapOptions::default()
        },
    )?;
    let len = 1 << 20;
    let payload = data(len, 3);
    let k = key(0);
    let put_get = median(runs, || {
        let r = tier.put(&k, Meta::default(), black_box(&payload));
        let got = tier.get(&k);
        black_box((r.is_ok(), got.ok().flatten().map(|o| o.bytes.len())));
    });
    emit(
        out,
        runs,
        Figure::new("strata.mmap.put_get_1mib", 1, len, put_get)
            .against("memcpy of 2 MiB", memcpy_baseline(runs, 2 * len)),
    )?;
    Ok(())
}

fn disk(runs: usize, scale: f64, out: &Output) -> Result<()> {
    let len = 16 << 20;
    let count = ((16.0 * scale) as usize).max(2);
    let total = len * count;
    let payloads: Vec<Vec<u8>> = (0..count).map(|i| data(len, i as u8)).collect();
    let dir = tempfile::tempdir()?;

    // Writes alternate between the raw file and the tier, each run into
    // new files (the tier reclaims its oldest segments, the raw run
    // replaces its file), so both meet the file system in the same state.
    let store = dir.path().join("tier");
    let options = DiskOptions {
        capacity_bytes: (total as u64) * 2,
        ..DiskOptions::default()
    };
    let tier = DiskTier::open(&store, options.clone())?;
    let (mut raw_writes, mut puts) = (Vec::new(), Vec::new());
    for run in 0..runs + 2 {
        let path = dir.path().join(format!("raw-{run}"));
        let start = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        for p in &payloads {
            f.write_all(p)?;
        }
        f.sync_all()?;
        drop(f);
        raw_writes.push(start.elapsed());
        if run > 0 {
            std::fs::remove_file(dir.path().join(format!("raw-{}", run - 1)))?;
        }
        let start = Instant::now();
        for (i, p) in payloads.iter().enumerate() {
            tier.put(&key(i), Meta::default(), p)?;
        }
        tier.flush()?;
        puts.push(start.elapsed());
    }
    // The first two runs fill the tier; the figures are its steady state.
    let raw_write = middle(raw_writes.split_off(2));
    let put = middle(puts.split_off(2));

    let raw_path = dir.path().join(format!("raw-{}", runs + 1));
    let mut buf = vec![0u8; len];
    let raw_read = median(runs, || {
        if let Ok(mut f) = std::fs::File::open(&raw_path) {
            for _ in 0..count {
                if f.read_exact(&mut buf).is_err() {
                    break;
                }
                black_box(&buf);
            }
        }
    });
    // The same read into a new buffer per object, as a get must return
    // one: the part of the gap that is the allocation's page faults.
    let raw_read_fresh = median(runs, || {
        if let Ok(mut f) = std::fs::File::open(&raw_path) {
            for _ in 0..count {
                let mut fresh = vec![0u8; len];
                if f.read_exact(&mut fresh).is_err() {
                    break;
                }
                black_box(&fresh);
            }
        }
    });
    let get = median(runs, || {
        for i in 0..count {
            black_box(tier.get(&key(i)).ok().flatten().map(|o| o.bytes.len()));
        }
    });
    for (i, p) in payloads.iter().enumerate() {
        let got = tier.get(&key(i))?.context("a disk object went missing")?;
        if *got.bytes != **p {
            bail!("the disk tier returned other bytes for object {i}");
        }
    }
    drop(tier);
    emit(
        out,
        runs,
        Figure::new("strata.disk.put_seq", count, total, put)
            .against("raw_file_write", raw_write)
            .with(json!({"durable": "both end with an fsync"})),
    )?;
    emit(
        out,
        runs,
        Figure::new("strata.disk.get_seq", count, total, get)
            .against("raw_file_read", raw_read)
            .with(json!({
                "raw_file_read_fresh_buffers_ms": raw_read_fresh.as_secs_f64() * 1e3,
                "ratio_to_fresh_buffers": get.as_secs_f64() / raw_read_fresh.as_secs_f64().max(1e-12),
            })),
    )?;

    // Reopening: 100,000 small objects, written once, opened `runs` times.
    let objects = ((100_000.0 * scale.min(1.0)) as usize).max(1000);
    let reopen_dir = dir.path().join("reopen");
    {
        let tier = DiskTier::open(&reopen_dir, DiskOptions::default())?;
        let small = data(256, 9);
        for i in 0..objects {
            tier.put(&key(i), Meta::default(), &small)?;
        }
        tier.flush()?;
    }
    let mut held = 0;
    let reopen = median(runs, || {
        if let Ok(t) = DiskTier::open(&reopen_dir, DiskOptions::default()) {
            held = t.stats().objects;
        }
    });
    if held != objects as u64 {
        bail!("the reopened disk tier holds {held} objects, {objects} were written");
    }
    emit(
        out,
        runs,
        Figure::new("strata.disk.reopen", objects, 0, reopen).with(json!({"objects": held})),
    )?;
    Ok(())
}

fn remote(runs: usize, out: &Output) -> Result<()> {
    let len = 16 << 20;
    let payload = data(len, 5);
    let store: Arc<dyn Tier> = Arc::new(MemoryTier::new(256 << 20, 1));
    let server = Server::start(
        Listener::bind("127.0.0.1:0")?,
        store,
        ServeOptions::default(),
    )?;
    let client = RemoteTier::connect(server.local_addr(), RemoteOptions::default())?;
    let k = key(0);
    let put_get = median(runs, || {
        let r = client.put(&k, Meta::default(), black_box(&payload));
        let got = client.get(&k);
        black_box((r.is_ok(), got.ok().flatten().map(|o| o.bytes.len())));
    });
    let raw = raw_tcp_round_trip(runs, &payload)?;
    server.shutdown()?;
    emit(
        out,
        runs,
        Figure::new("strata.remote.put_get_16mib", 1, 2 * len, put_get).against("raw_tcp", raw),
    )?;
    Ok(())
}

/// The time to send `payload` to a loopback peer and read it back: the
/// floor for a put and a get of the same bytes over TCP.
fn raw_tcp_round_trip(runs: usize, payload: &[u8]) -> Result<Duration> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let len = payload.len();
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; len];
        loop {
            if s.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            s.write_all(&buf)?;
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut back = vec![0u8; len];
    let time = median(runs, || {
        let ok = s.write_all(payload).is_ok() && s.read_exact(&mut back).is_ok();
        black_box(ok);
    });
    drop(s);
    let _ = echo.join();
    Ok(time)
}

fn redis(runs: usize, out: &Output) -> Result<()> {
    let Some(server) = crate::redis_server::RedisServer::start()? else {
        tracing::warn!("redis-server is not installed: skipping the Redis figures");
        return Ok(());
    };
    let len = 4 << 20;
    let payload = data(len, 7);
    let tier = stratacache::redis::RedisTier::connect(
        &server.url(),
        stratacache::redis::RedisOptions::default(),
    )?;
    let k = key(0);
    let put_get = median(runs, || {
        let r = tier.put(&k, Meta::default(), black_box(&payload));
        let got = tier.get(&k);
        black_box((r.is_ok(), got.ok().flatten().map(|o| o.bytes.len())));
    });
    let raw = server.raw_set_get(runs, &payload)?;
    emit(
        out,
        runs,
        Figure::new("strata.redis.put_get_4mib", 1, 2 * len, put_get).against("raw_redis", raw),
    )?;
    Ok(())
}

fn exec(runs: usize, scale: f64, out: &Output) -> Result<()> {
    use bstack_plan::{CachePlan, KvPageRef, PlanWindow, TransferKind, TransferOp};
    use stratacache::config::{ByteSize, Config, TierConfig, TierKind};
    let dir = tempfile::tempdir()?;
    let mut memory = TierConfig::new(TierKind::Memory);
    memory.name = Some("cpu".into());
    memory.capacity = Some(ByteSize(1 << 30));
    let mut disk = TierConfig::new(TierKind::Disk);
    disk.name = Some("ssd".into());
    disk.path = Some(dir.path().join("ssd"));
    let config = Config {
        tiers: vec![memory, disk],
        ..Config::default()
    };
    let engine = config.open()?;
    let ops = ((64.0 * scale) as u64).max(4);
    let (pages, page_bytes) = (4u64, 1u64 << 20);
    let plan = CachePlan {
        schema_version: bstack_plan::SCHEMA_VERSION,
        plan_id: "bench".into(),
        window: Some(PlanWindow {
            index: 0,
            start_ns: 0,
            end_ns: 1_000_000_000,
        }),
        ops: (0..ops)
            .map(|i| TransferOp {
                kind: TransferKind::Storage2h as i32,
                src: "tier://node0/ssd".into(),
                dst: "tier://node0/cpu".into(),
                length: pages * page_bytes,
                src_offset: i * pages * page_bytes,
                dst_offset: i * pages * page_bytes,
                kv_refs: vec![KvPageRef {
                    tensor: "kv".into(),
                    page: i * pages,
                    count: pages,
                    ..KvPageRef::default()
                }],
                ..TransferOp::default()
            })
            .collect(),
        ..CachePlan::default()
    };
    crate::strata::fill_sources(&engine, &plan, &config.exec)?;
    engine.flush()?;
    let cpu = engine.tier_index("cpu")?;
    let ssd = engine.tier_index("ssd")?;
    let keys: Vec<ArtifactKey> = plan
        .ops
        .iter()
        .flat_map(|o| o.kv_refs.iter())
        .flat_map(|r| {
            config
                .exec
                .keys
                .ref_keys(r)
                .map(|(_, _, k)| k)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut last = None;
    let mut times = Vec::new();
    for _ in 0..=runs {
        // Each run starts with the pages on SSD only.
        for k in &keys {
            engine.tier(cpu)?.delete(k)?;
        }
        let report = stratacache::execute(&engine, &plan, &config.exec)?;
        if report.failed_ops > 0 {
            bail!("the bench plan failed {} operations", report.failed_ops);
        }
        times.push(Duration::from_nanos(report.elapsed_ns));
        last = Some(report);
    }
    times.remove(0);
    let time = middle(times);
    let disk_get = median(runs, || {
        for k in &keys {
            black_box(engine.tier(ssd).ok().map(|t| t.get(k).is_ok()));
        }
    });
    let bytes = (ops * pages * page_bytes) as usize;
    let streams = last.map_or(0, |r| r.streams);
    engine.close()?;
    emit(
        out,
        runs,
        Figure::new("strata.exec", ops as usize, bytes, time)
            .against("strata.disk.get_seq of the same pages", disk_get)
            .with(json!({"streams": streams, "pages": ops * pages, "page_bytes": page_bytes})),
    )?;
    Ok(())
}
