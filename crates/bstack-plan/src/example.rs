//! Small, valid example values of every contract.
//!
//! `bstack demo` writes these, the documentation shows them, and tests use
//! them as known-good starting points. The manifests describe a tiny
//! generated checkpoint whose tensor bytes are derived from their names, so
//! the chunk hashes are real hashes of real bytes and the swap plan carries
//! the true delta between two versions.

use crate::{
    Bucket, BucketItem, CachePlan, Chunk, ClusterShape, FileEntry, HashAlgorithm, IoExtent,
    KvPageRef, PlanWindow, PrefixCohort, PrefixDepth, ReuseBucket, SCHEMA_VERSION, SwapPlan,
    SwapWindow, TensorEntry, TileCoord, TransferKind, TransferOp, WaveSpec, WeightManifest,
};
use crate::{Contract, Document, dtype::tensor_bytes};

/// Chunk size of the example manifests.
pub const CHUNK_BYTES: u64 = 4096;
/// Capacity of the example swap plan's buckets.
pub const BUCKET_BYTES: u64 = 8192;
/// Where the example checkpoint versions live (`{CHECKPOINT_ROOT}/{version}/...`).
pub const CHECKPOINT_ROOT: &str = "/var/lib/bstack/demo-tiny";

/// One example of every contract, in [`crate::ContractKind::ALL`] order.
pub fn all() -> Vec<Document> {
    vec![
        weight_manifest("v2").into_document(),
        cache_plan().into_document(),
        swap_window().into_document(),
        swap_plan().into_document(),
        wave_spec().into_document(),
    ]
}

/// The tensors of each example version: name, dtype, shape.
fn tensors(version: &str) -> Vec<(&'static str, &'static str, Vec<u64>)> {
    let mut t = vec![
        ("embed.weight", "BF16", vec![64, 32]),
        ("layers.0.attn.qkv.weight", "BF16", vec![96, 32]),
        ("layers.0.mlp.up.weight", "F32", vec![128, 32]),
    ];
    if version == "v1" {
        t.push(("lm_head.weight", "BF16", vec![64, 32]));
    } else {
        t.push(("layers.0.mlp.gate.weight", "BF16", vec![64, 32]));
    }
    t.sort();
    t
}

/// Bytes of a tensor in a version: a BLAKE3 stream keyed by the name, so every
/// version shares them, except that `v2` rewrites the second 4 KiB chunk of
/// `layers.0.mlp.up.weight`, a partial change of one tensor.
pub fn tensor_data(version: &str, name: &str, length: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
    blake3::Hasher::new()
        .update(name.as_bytes())
        .finalize_xof()
        .fill(&mut data);
    if version != "v1" && name == "layers.0.mlp.up.weight" {
        let chunk = CHUNK_BYTES as usize;
        let end = data.len().min(2 * chunk);
        if let Some(second) = data.get_mut(chunk..end) {
            blake3::Hasher::new()
                .update(b"v2")
                .finalize_xof()
                .fill(second);
        }
    }
    data
}

fn chunks_of(data: &[u8]) -> Vec<Chunk> {
    data.chunks(CHUNK_BYTES as usize)
        .enumerate()
        .map(|(i, bytes)| Chunk {
            index: i as u32,
            offset: i as u64 * CHUNK_BYTES,
            length: bytes.len() as u64,
            hash: blake3::hash(bytes).to_hex().to_string(),
        })
        .collect()
}

/// The manifest of example version `version` (`v1` or `v2`).
pub fn weight_manifest(version: &str) -> WeightManifest {
    // Tensor data follows an 8-byte length and a header, as in safetensors.
    let mut offset = 8 + 256;
    let tensors = tensors(version)
        .into_iter()
        .map(|(name, dtype, shape)| {
            let length = tensor_bytes(dtype, &shape).unwrap_or(0);
            let entry = TensorEntry {
                name: name.into(),
                dtype: dtype.into(),
                shape,
                file: "model.safetensors".into(),
                offset,
                length,
                chunks: chunks_of(&tensor_data(version, name, length)),
            };
            offset += length;
            entry
        })
        .collect();
    let config = format!("{{\"model_type\": \"demo-tiny\", \"version\": \"{version}\"}}\n");
    WeightManifest {
        schema_version: SCHEMA_VERSION,
        model_id: "demo-tiny".into(),
        version: version.into(),
        files: vec![FileEntry {
            path: "config.json".into(),
            offset: 0,
            length: config.len() as u64,
            hash: blake3::hash(config.as_bytes()).to_hex().to_string(),
            chunks: chunks_of(config.as_bytes()),
        }],
        hash_algorithm: HashAlgorithm::Blake3 as i32,
        created_unix_ms: 0,
        chunk_bytes: CHUNK_BYTES,
        tensors,
    }
}

/// A cache plan for one 20 ms window of one node: two KV copies up to the
/// GPU, one read from SSD, and the matching prefetch, eviction and admission.
pub fn cache_plan() -> CachePlan {
    const PAGE: u64 = 64 * 1024;
    let page = |page, layer, location: &str| KvPageRef {
        tensor: "kv".into(),
        page,
        head: 0,
        layer,
        location: location.into(),
        count: 1,
    };
    let run = |first, count, layer| KvPageRef {
        count,
        ..page(first, layer, "")
    };
    CachePlan {
        schema_version: SCHEMA_VERSION,
        plan_id: "demo-window-0".into(),
        window: Some(PlanWindow {
            index: 0,
            start_ns: 0,
            end_ns: 20_000_000,
        }),
        ops: vec![
            TransferOp {
                kind: TransferKind::H2d as i32,
                src: "tier://node0/cpu".into(),
                dst: "tier://node0/gpu0".into(),
                length: 4 * PAGE,
                src_offset: 16 * PAGE,
                dst_offset: 0,
                kv_refs: vec![run(16, 4, 0)],
                note: "request r1, prefix pages 16-19, layer 0".into(),
                deadline_ns: 5_000_000,
                priority: 2,
                stream_hint: 1,
            },
            TransferOp {
                kind: TransferKind::H2d as i32,
                src: "tier://node0/cpu".into(),
                dst: "tier://node0/gpu0".into(),
                length: 2 * PAGE,
                src_offset: 40 * PAGE,
                dst_offset: 4 * PAGE,
                kv_refs: vec![run(40, 2, 0)],
                note: "request r2, pages 40-41, layer 0".into(),
                deadline_ns: 8_000_000,
                priority: 1,
                stream_hint: 1,
            },
            TransferOp {
                kind: TransferKind::Storage2h as i32,
                src: "tier://node0/ssd".into(),
                dst: "tier://node0/cpu".into(),
                length: 8 * PAGE,
                src_offset: 128 * PAGE,
                dst_offset: 64 * PAGE,
                kv_refs: vec![run(128, 8, 1)],
                note: "prefetch for request r3, layer 1".into(),
                deadline_ns: 18_000_000,
                priority: 0,
                stream_hint: 0,
            },
        ],
        prefetch: vec![page(128, 1, "tier://node0/cpu")],
        evict: vec![
            page(7, 0, "tier://node0/gpu0"),
            page(9, 0, "tier://node0/gpu0"),
        ],
        admit: vec![page(16, 0, "tier://node0/gpu0")],
    }
}

/// A swap window: from t = 1 s, deadline 6 s, waves [8, 12).
pub fn swap_window() -> SwapWindow {
    SwapWindow {
        schema_version: SCHEMA_VERSION,
        t_start_ns: 1_000_000_000,
        t_deadline_ns: 6_000_000_000,
        wave_begin: 8,
        wave_end: 12,
    }
}

/// The swap plan from example `v1` to `v2`: the chunks whose hash changed or
/// that are new (of tensors and of other files), packed in order into 8 KiB
/// buckets (split where a chunk does not fit), each piece read from the new
/// checkpoint into its bucket.
pub fn swap_plan() -> SwapPlan {
    /// A chunked entry of a manifest: is it a file, its name, the file that
    /// holds it, where it starts there, its chunks.
    type Entry<'a> = (bool, &'a str, &'a str, u64, &'a [Chunk]);
    fn entries(m: &WeightManifest) -> Vec<Entry<'_>> {
        let tensors = m.tensors.iter().map(|t| {
            (
                false,
                t.name.as_str(),
                t.file.as_str(),
                t.offset,
                t.chunks.as_slice(),
            )
        });
        let files = m.files.iter().map(|f| {
            (
                true,
                f.path.as_str(),
                f.path.as_str(),
                f.offset,
                f.chunks.as_slice(),
            )
        });
        tensors.chain(files).collect()
    }

    let (from, to) = (weight_manifest("v1"), weight_manifest("v2"));
    let old: std::collections::HashMap<(bool, &str, u32), &str> = entries(&from)
        .into_iter()
        .flat_map(|(is_file, name, _, _, chunks)| {
            chunks
                .iter()
                .map(move |c| ((is_file, name, c.index), c.hash.as_str()))
        })
        .collect();
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut ops = Vec::new();
    let mut fill = BUCKET_BYTES;
    for (is_file, name, file, base, chunks) in entries(&to) {
        let changed = chunks
            .iter()
            .filter(|c| old.get(&(is_file, name, c.index)) != Some(&c.hash.as_str()));
        for c in changed {
            let mut done = 0;
            while done < c.length {
                if fill == BUCKET_BYTES {
                    buckets.push(Bucket {
                        id: buckets.len() as u32,
                        capacity: BUCKET_BYTES,
                        items: Vec::new(),
                        consumer_ranks: vec![0, 1],
                    });
                    fill = 0;
                }
                let Some(bucket) = buckets.last_mut() else {
                    break;
                };
                let length = (c.length - done).min(BUCKET_BYTES - fill);
                bucket.items.push(BucketItem {
                    name: name.into(),
                    chunk: c.index,
                    chunk_offset: done,
                    length,
                    bucket_offset: fill,
                    is_file,
                });
                ops.push(TransferOp {
                    kind: TransferKind::Storage2h as i32,
                    src: format!("file://{CHECKPOINT_ROOT}/v2/{file}"),
                    dst: format!("device://gpu0/bucket{}", bucket.id),
                    length,
                    src_offset: base + c.offset + done,
                    dst_offset: fill,
                    note: format!("{name} chunk {}", c.index),
                    ..Default::default()
                });
                fill += length;
                done += length;
            }
        }
    }
    let mut plan = SwapPlan {
        schema_version: SCHEMA_VERSION,
        plan_id: "demo-tiny-v1-to-v2".into(),
        from: Some(from),
        to: Some(to),
        ops,
        window: Some(swap_window()),
        buckets,
        digest: String::new(),
    };
    plan.seal();
    plan
}

/// Bytes of the KV cache of one 512-token block of a Llama-3-8B-like model in
/// BF16: keys and values, 32 layers, 8 KV heads of 128 dims, 2 bytes each.
pub const KV_BLOCK_BYTES: u64 = 2 * 32 * 8 * 128 * 2 * 512;

/// A wave spec for a 256 x 256 BF16 GEMM in 128 x 128 x 64 tiles, 16 waves,
/// weights swappable in waves [8, 12), with the request-log statistics of a
/// conversation trace in 512-token KV blocks: a system prompt shared by 38
/// requests, two shorter shared prefixes, prefix reuse at depths 1, 4 and 12,
/// and a four-bucket reuse-distance histogram.
pub fn wave_spec() -> WaveSpec {
    WaveSpec {
        schema_version: SCHEMA_VERSION,
        pack_order: vec![0, 1],
        tile_order: vec![
            TileCoord { m: 0, n: 0 },
            TileCoord { m: 0, n: 1 },
            TileCoord { m: 1, n: 1 },
            TileCoord { m: 1, n: 0 },
        ],
        bm: 128,
        bn: 128,
        bk: 64,
        cluster: Some(ClusterShape { x: 2, y: 1 }),
        io_extents: vec![
            IoExtent {
                layer: "layers.0".into(),
                first_page: 16,
                last_page: 19,
            },
            IoExtent {
                layer: "layers.1".into(),
                first_page: 128,
                last_page: 135,
            },
        ],
        swap_begin: 8,
        swap_end: 12,
        stage_depth: 2,
        deadline_ns: 50_000_000,
        num_waves: 16,
        dtype: "BF16".into(),
        wave_budget_ns: 2_000_000,
        cohorts: vec![
            PrefixCohort {
                block: 46,
                depth: 12,
                requests: 38,
                bytes: 12 * KV_BLOCK_BYTES,
                first_ms: 0,
                last_ms: 179_642,
            },
            PrefixCohort {
                block: 1_207,
                depth: 4,
                requests: 9,
                bytes: 4 * KV_BLOCK_BYTES,
                first_ms: 12_118,
                last_ms: 95_870,
            },
            PrefixCohort {
                block: 3_518,
                depth: 2,
                requests: 3,
                bytes: 2 * KV_BLOCK_BYTES,
                first_ms: 140_002,
                last_ms: 141_377,
            },
        ],
        prefix_histogram: vec![
            PrefixDepth {
                depth: 1,
                requests: 212,
                prefixes: 41,
            },
            PrefixDepth {
                depth: 4,
                requests: 141,
                prefixes: 66,
            },
            PrefixDepth {
                depth: 12,
                requests: 37,
                prefixes: 58,
            },
        ],
        reuse_distances: vec![
            ReuseBucket {
                max_distance: 16,
                count: 1_840,
            },
            ReuseBucket {
                max_distance: 256,
                count: 2_215,
            },
            ReuseBucket {
                max_distance: 4_096,
                count: 960,
            },
            ReuseBucket {
                max_distance: u64::MAX,
                count: 311,
            },
        ],
        block_bytes: KV_BLOCK_BYTES,
        block_tokens: 512,
        cold_references: 1_024,
        source: "conversation_trace.jsonl".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_is_valid() {
        for doc in all() {
            assert_eq!(doc.problems(), vec![], "{}", doc.kind());
        }
    }

    #[test]
    fn the_swap_plan_carries_only_the_delta() {
        let plan = swap_plan();
        let moved = plan.staged_bytes();
        // One changed 4 KiB chunk of the up projection, the new 4 KiB gate
        // tensor, and config.json, which names the version.
        let config = plan.to.as_ref().map_or(0, |m| m.files[0].length);
        assert_eq!(moved, 2 * CHUNK_BYTES + config);
    }
}
