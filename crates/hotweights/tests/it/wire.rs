//! `wire`: the records a source sends for a plan's buckets. Round trips at
//! every piece size, with and without the previous checkpoint (sparse
//! records where they pay), against the bucket bytes the plan's transfer
//! ops describe; and every malformed stream a receiver must refuse.

use std::collections::HashMap;
use std::path::Path;

use bstack_plan::{SwapPlan, WeightManifest};
use hotweights::dataplane::Payload;
use hotweights::source::{ChunkLoc, ChunkSource, DirSource};
use hotweights::synth::SynthModel;
use hotweights::wire::{Decoder, Encoder, RAW, SPARSE};
use hotweights::{PlanOptions, PublishOptions};

/// v1 and v2 of a small model: v2 nudges layer 0 (sparse pays) and rewrites
/// the head (it does not). Returns the dir, both manifests and the plan.
fn fixture() -> (tempfile::TempDir, WeightManifest, WeightManifest, SwapPlan) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = SynthModel::decoder(2, 256, 2048, 3);
    model.write(&dir.path().join("v1"), 2).unwrap();
    assert!(model.nudge_where(0.01, 5, |n| n.starts_with("model.layers.0.")) > 0);
    assert!(model.rewrite("lm_head.weight", 9));
    model.write(&dir.path().join("v2"), 2).unwrap();
    let options = |v: &str| PublishOptions {
        model_id: Some("m".into()),
        chunk_bytes: 64 << 10,
        ..PublishOptions::new(v)
    };
    let m1 = hotweights::publish(&dir.path().join("v1"), &options("v1"), &|_| {}).unwrap();
    let m2 = hotweights::publish(&dir.path().join("v2"), &options("v2"), &|_| {}).unwrap();
    let plan = hotweights::plan::create(
        &m1,
        m2.clone(),
        &PlanOptions {
            bucket_bytes: 200 << 10,
            ..PlanOptions::default()
        },
    )
    .unwrap()
    .plan;
    (dir, m1, m2, plan)
}

/// The bucket bytes the plan's transfer ops describe: what a receiver must
/// rebuild.
fn expected(plan: &SwapPlan, v2: &Path) -> HashMap<u32, Vec<u8>> {
    let ops = hotweights::plan::transfer_ops(plan, v2).unwrap();
    let mut out: HashMap<u32, Vec<u8>> = plan
        .buckets
        .iter()
        .map(|b| (b.id, vec![0u8; b.capacity as usize]))
        .collect();
    for op in ops {
        let id = hotweights::plan::parse_bucket_address(&op.dst).unwrap();
        let path = op.src.strip_prefix("file://").unwrap();
        let bytes = std::fs::read(path).unwrap();
        let src = &bytes[op.src_offset as usize..(op.src_offset + op.length) as usize];
        out.get_mut(&id).unwrap()[op.dst_offset as usize..(op.dst_offset + op.length) as usize]
            .copy_from_slice(src);
    }
    out
}

fn decode(
    plan: &SwapPlan,
    from: &WeightManifest,
    old: &Path,
    payloads: &[Payload],
) -> hotweights::Result<HashMap<u32, Vec<u8>>> {
    let mut d = Decoder::new(plan, Some(from))?;
    let source = DirSource::new(old);
    let read = |loc: &ChunkLoc<'_>| source.read_chunk(loc);
    for p in payloads {
        d.feed(p.bucket, p.offset, &p.bytes, &read)?;
    }
    d.finish()
}

#[test]
fn round_trips_at_every_piece_size_with_and_without_the_previous_version() {
    let (dir, m1, _, plan) = fixture();
    let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
    let want = expected(&plan, &v2);
    for piece in [1usize, 7, 4096, 65_536, 1 << 20] {
        for prev in [None, Some((&m1, v1.as_path()))] {
            let mut enc = Encoder::new(&plan, &v2, prev, piece).unwrap();
            let payloads: Vec<Payload> = enc.by_ref().map(Result::unwrap).collect();
            assert!(payloads.iter().all(|p| p.bytes.len() <= piece));
            let got = decode(&plan, &m1, &v1, &payloads).unwrap();
            assert_eq!(got, want, "piece {piece}, prev {}", prev.is_some());
            let wire: usize = payloads.iter().map(|p| p.bytes.len()).sum();
            if prev.is_some() {
                // The nudged layer goes sparse; the rewritten head raw.
                assert!(
                    enc.sparse.0 > 0 && enc.sparse.1 < enc.sparse.0 / 4,
                    "{:?}",
                    enc.sparse
                );
                assert!(enc.raw_bytes > 0);
                assert!((wire as u64) < plan.staged_bytes());
            } else {
                assert_eq!(enc.sparse, (0, 0));
                assert_eq!(enc.raw_bytes, plan.staged_bytes());
            }
        }
    }
}

#[test]
fn a_previous_version_with_another_label_is_not_used() {
    let (dir, m1, _, plan) = fixture();
    let mut other = m1.clone();
    other.version = "v0".into();
    let enc = Encoder::new(
        &plan,
        &dir.path().join("v2"),
        Some((&other, &dir.path().join("v1"))),
        4096,
    )
    .unwrap();
    let n = enc.count();
    assert!(n > 0);
    let mut enc = Encoder::new(
        &plan,
        &dir.path().join("v2"),
        Some((&other, &dir.path().join("v1"))),
        4096,
    )
    .unwrap();
    enc.by_ref().for_each(drop);
    assert_eq!(enc.sparse, (0, 0));
}

#[test]
fn malformed_streams_are_refused() {
    let (dir, m1, _, plan) = fixture();
    let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
    let payloads: Vec<Payload> = Encoder::new(&plan, &v2, Some((&m1, &v1)), 1 << 20)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let first = payloads[0].clone();

    // A piece out of order.
    let mut skipped = first.clone();
    skipped.offset = 5;
    let err = decode(&plan, &m1, &v1, &[skipped]).unwrap_err().to_string();
    assert!(err.contains("wire offset 5, expected 0"), "{err}");

    // A stream cut short.
    let err = decode(&plan, &m1, &v1, &payloads[..payloads.len() - 1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("items"), "{err}");

    // An unknown record kind, and a raw record of the wrong length.
    let mut bad = first.clone();
    bad.bytes[0] = 7;
    let err = decode(&plan, &m1, &v1, &[bad]).unwrap_err().to_string();
    assert!(err.contains("unknown record kind 7"), "{err}");
    let mut short = first.clone();
    short.bytes[0] = RAW;
    short.bytes[1..9].copy_from_slice(&1u64.to_le_bytes());
    let err = decode(&plan, &m1, &v1, &[short]).unwrap_err().to_string();
    assert!(err.contains("raw record of 1 bytes"), "{err}");

    // A sparse record where the receiver holds no old chunk: without a
    // `from` manifest, every sparse record is refused.
    let sparse_piece = payloads
        .iter()
        .find(|p| p.bytes[0] == SPARSE && p.offset == 0);
    if let Some(p) = sparse_piece {
        let mut d = Decoder::new(&plan, None).unwrap();
        let read = |_: &ChunkLoc<'_>| -> hotweights::Result<Vec<u8>> { unreachable!() };
        let err = d
            .feed(p.bucket, 0, &p.bytes, &read)
            .unwrap_err()
            .to_string();
        assert!(err.contains("without an old chunk"), "{err}");
    }

    // A piece of a bucket the plan does not have.
    let mut stray = first;
    stray.bucket = 999;
    let err = decode(&plan, &m1, &v1, &[stray]).unwrap_err().to_string();
    assert!(err.contains("bucket 999"), "{err}");
}
