//! Messages written in the earlier `bw.stack` wire format still decode.
//!
//! `tests/fixtures/seed/cache_plan.bin` and `swap_plan.bin` are a `bw.stack`
//! CachePlan and SwapPlan encoded by hand by `make_fixtures.py` (no protobuf
//! library, nothing from this crate), following that format's tag numbers.
//! These tests prove that:
//!
//! - our types decode them with every field in place: the `bw.stack` tags
//!   keep their number and wire type in `plan.proto` (FileChunk -> FileEntry,
//!   `sha256` -> `hash`), and fields added since read as their defaults;
//! - the absent `schema_version` of a top-level contract reads as 1, while
//!   nested messages (the manifests and window inside a SwapPlan) keep 0;
//! - with field 15 left absent, our encoder writes the fixtures back byte for
//!   byte (same tags, wire types and field order);
//! - the decoded values re-encode to protobuf and convert to our JSON form and
//!   back without loss.
//!
//! The expected values repeat those in `make_fixtures.py`; change both together.

use bstack_plan::{
    CachePlan, Contract, FileEntry, HashAlgorithm, KvPageRef, Message, SCHEMA_VERSION, SwapPlan,
    SwapWindow, TransferKind, TransferOp, WeightManifest,
};

const CACHE_PLAN_BIN: &[u8] = include_bytes!("../fixtures/seed/cache_plan.bin");
const SWAP_PLAN_BIN: &[u8] = include_bytes!("../fixtures/seed/swap_plan.bin");

/// KV page size of the earlier runner, in bytes.
const PAGE: u64 = 65536;

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";
const SHARD1_LEN: u64 = 4_976_698_672;
const SHARD2_LEN: u64 = 1_168_138_808;

/// A `bw.stack` KvPageRef: no `location`, no `count`.
fn kv(page: u64, layer: u32) -> KvPageRef {
    KvPageRef {
        tensor: "kv".into(),
        page,
        head: 0,
        layer,
        location: String::new(),
        count: 0,
    }
}

/// A `bw.stack` FileChunk, read as a FileEntry without chunks.
fn file(path: &str, length: u64, sha256: &str) -> FileEntry {
    FileEntry {
        path: path.into(),
        offset: 0,
        length,
        hash: sha256.into(),
        chunks: vec![],
    }
}

/// A `bw.stack` WeightManifest, nested, so its `schema_version` stays 0.
fn manifest(version: &str, files: Vec<FileEntry>) -> WeightManifest {
    WeightManifest {
        schema_version: 0,
        model_id: "llama-tiny".into(),
        version: version.into(),
        files,
        hash_algorithm: HashAlgorithm::Unspecified as i32,
        created_unix_ms: 0,
        chunk_bytes: 0,
        tensors: vec![],
    }
}

fn expected_cache_plan() -> CachePlan {
    CachePlan {
        schema_version: 1,
        plan_id: "window-7".into(),
        ops: vec![
            TransferOp {
                kind: TransferKind::H2d as i32,
                src: "tier://node0/cpu".into(),
                dst: "tier://node0/gpu".into(),
                length: 2 * PAGE,
                src_offset: 12 * PAGE,
                dst_offset: 3 * PAGE,
                kv_refs: vec![kv(12, 3), kv(13, 3)],
                note: "prefetch layer 3 pages 12-13".into(),
                deadline_ns: 0,
                priority: 0,
                stream_hint: 0,
            },
            TransferOp {
                kind: TransferKind::D2h as i32,
                src: "tier://node0/gpu".into(),
                dst: "tier://node0/cpu".into(),
                length: 2 * PAGE,
                src_offset: 40 * PAGE,
                dst_offset: 200 * PAGE,
                kv_refs: vec![kv(40, 5), kv(41, 5)],
                note: "offload layer 5 pages 40-41".into(),
                deadline_ns: 0,
                priority: 0,
                stream_hint: 0,
            },
        ],
        prefetch: vec![kv(14, 3)],
        evict: vec![kv(7, 1), kv(300, 1)],
        admit: vec![],
        window: None,
    }
}

fn expected_swap_plan() -> SwapPlan {
    let unchanged = "a1b2c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff00";
    SwapPlan {
        schema_version: 1,
        plan_id: "swap-v1-v2".into(),
        from: Some(manifest(
            "v1",
            vec![
                file(
                    SHARD1,
                    SHARD1_LEN,
                    "3f4b8c2d9e1a7f60b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2",
                ),
                file(SHARD2, SHARD2_LEN, unchanged),
            ],
        )),
        to: Some(manifest(
            "v2",
            vec![
                file(
                    SHARD1,
                    SHARD1_LEN,
                    "9c1e5f7a3b2d4c6e8f0a1b3c5d7e9f02468ace13579bdf0246813579bdf02468",
                ),
                file(SHARD2, SHARD2_LEN, unchanged),
            ],
        )),
        ops: vec![
            TransferOp {
                kind: TransferKind::Storage2h as i32,
                src: format!("file:///ckpt/v2/{SHARD1}"),
                dst: "device://bucket/0".into(),
                length: 16 * PAGE,
                src_offset: 1024 * PAGE,
                dst_offset: 0,
                kv_refs: vec![],
                note: "changed range 1 of 2".into(),
                deadline_ns: 0,
                priority: 0,
                stream_hint: 0,
            },
            TransferOp {
                kind: TransferKind::Storage2h as i32,
                src: format!("file:///ckpt/v2/{SHARD1}"),
                dst: "device://bucket/0".into(),
                length: 8 * PAGE,
                src_offset: 70_000 * PAGE,
                dst_offset: 16 * PAGE,
                kv_refs: vec![],
                note: "changed range 2 of 2".into(),
                deadline_ns: 0,
                priority: 0,
                stream_hint: 0,
            },
        ],
        window: Some(SwapWindow {
            schema_version: 0,
            t_start_ns: 1_700_000_000_000_000_000,
            t_deadline_ns: 1_700_000_005_000_000_000,
            wave_begin: 0,
            wave_end: 0,
        }),
        buckets: vec![],
        digest: String::new(),
    }
}

/// Re-encoding and decoding again, and JSON out and back, change nothing.
fn assert_round_trips<T: Contract + PartialEq + std::fmt::Debug>(
    decoded: &T,
) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = decoded.encode_to_vec();
    assert_eq!(&T::decode_proto(&bytes, "re-encoded")?, decoded);
    assert_eq!(&T::decode(bytes.as_slice())?, decoded);

    let json = decoded.to_json();
    assert_eq!(&T::from_json(&json, "seed json")?, decoded);
    Ok(())
}

#[test]
fn seed_cache_plan_decodes_every_field() {
    let plan = CachePlan::decode_proto(CACHE_PLAN_BIN, "seed").unwrap();
    assert_eq!(plan, expected_cache_plan());
    assert_eq!(plan.schema_version, SCHEMA_VERSION);
    assert_eq!(plan.schema_version, 1);

    let kinds: Vec<TransferKind> = plan.ops.iter().map(TransferOp::kind).collect();
    assert_eq!(kinds, [TransferKind::H2d, TransferKind::D2h]);
}

#[test]
fn seed_swap_plan_decodes_every_field() {
    let plan = SwapPlan::decode_proto(SWAP_PLAN_BIN, "seed").unwrap();
    assert_eq!(plan, expected_swap_plan());
    assert_eq!(plan.schema_version, SCHEMA_VERSION);
    assert_eq!(plan.schema_version, 1);

    let kinds: Vec<TransferKind> = plan.ops.iter().map(TransferOp::kind).collect();
    assert_eq!(kinds, [TransferKind::Storage2h, TransferKind::Storage2h]);
    for manifest in [&plan.from, &plan.to] {
        let manifest = manifest.as_ref().unwrap();
        assert_eq!(manifest.hash_algorithm(), HashAlgorithm::Unspecified);
    }
}

#[test]
fn seed_messages_carry_no_schema_version() {
    // Decoded with plain prost, the fixtures show field 15 absent (0); only
    // `decode_proto` turns that into version 1.
    assert_eq!(CachePlan::decode(CACHE_PLAN_BIN).unwrap().schema_version, 0);
    assert_eq!(SwapPlan::decode(SWAP_PLAN_BIN).unwrap().schema_version, 0);
}

#[test]
fn seed_bytes_are_what_prost_writes() {
    // With field 15 left absent, our encoder writes the fixtures byte for
    // byte: same tags, same wire types, same field order.
    let cache = CachePlan::decode(CACHE_PLAN_BIN).unwrap();
    assert_eq!(cache.encode_to_vec(), CACHE_PLAN_BIN);
    let swap = SwapPlan::decode(SWAP_PLAN_BIN).unwrap();
    assert_eq!(swap.encode_to_vec(), SWAP_PLAN_BIN);
}

#[test]
fn seed_cache_plan_round_trips() {
    assert_round_trips(&CachePlan::decode_proto(CACHE_PLAN_BIN, "seed").unwrap()).unwrap();
}

#[test]
fn seed_swap_plan_round_trips() {
    assert_round_trips(&SwapPlan::decode_proto(SWAP_PLAN_BIN, "seed").unwrap()).unwrap();
}
