//! Generators of valid contract values, for property tests.
//!
//! Every value produced here must pass `validate()`; the `defects` module
//! then breaks them one way at a time. Values are built so that the rules hold
//! by construction: chunks tile their entry, destinations do not overlap,
//! windows end after they start, bucket pieces cover each chunk once.

use std::collections::{BTreeSet, HashMap};

use bstack_plan::dtype::{DTYPES, tensor_bytes};
use bstack_plan::{
    Bucket, BucketItem, CachePlan, Chunk, ClusterShape, FileEntry, HashAlgorithm, IoExtent,
    KvPageRef, PlanWindow, PrefixCohort, PrefixDepth, ReuseBucket, SCHEMA_VERSION, SwapPlan,
    SwapWindow, TensorEntry, TileCoord, TransferKind, TransferOp, WaveSpec, WeightManifest,
};
use proptest::prelude::*;
use proptest::sample::select;

/// A 64-digit lowercase hex hash derived from `seed`.
fn hash(seed: u128) -> String {
    format!("{seed:064x}")
}

/// Any valid address, in all five forms, in canonical spelling.
pub fn address() -> impl Strategy<Value = String> {
    let host = "[a-z]([a-z0-9-]{0,6}[a-z0-9])?(\\.[a-z]([a-z0-9-]{0,6}[a-z0-9])?){0,2}";
    prop_oneof![
        "(/[a-z0-9_-][a-z0-9_.-]{0,9}){1,4}".prop_map(|p| format!("file://{p}")),
        (
            "[a-z0-9_-][a-z0-9._-]{0,7}",
            select(vec!["gpu", "cpu", "dax", "ssd", "remote"]),
            prop::option::of(0u32..16)
        )
            .prop_map(|(node, tier, i)| format!(
                "tier://{node}/{tier}{}",
                i.map(|i| i.to_string()).unwrap_or_default()
            )),
        (
            "[a-z][a-z0-9]{0,6}",
            prop::option::of("[a-z0-9_.:-]{1,12}(/[a-z0-9_.:-]{1,8})?")
        )
            .prop_map(|(d, r)| match r {
                Some(r) => format!("device://{d}/{r}"),
                None => format!("device://{d}"),
            }),
        "[a-z0-9/_.:-]{1,20}".prop_map(|k| format!("strata://{k}")),
        (host, 1u16..).prop_map(|(h, p)| format!("tcp://{h}:{p}")),
        (any::<[u8; 4]>(), 1u16..)
            .prop_map(|(ip, p)| format!("tcp://{}:{p}", std::net::Ipv4Addr::from(ip))),
        (any::<[u16; 8]>(), 1u16..)
            .prop_map(|(ip, p)| format!("tcp://[{}]:{p}", std::net::Ipv6Addr::from(ip))),
    ]
}

fn chunks(length: u64, chunk_bytes: u64, seed: u128) -> Vec<Chunk> {
    (0..length.div_ceil(chunk_bytes))
        .map(|i| Chunk {
            index: i as u32,
            offset: i * chunk_bytes,
            length: chunk_bytes.min(length - i * chunk_bytes),
            hash: hash(seed.wrapping_mul(1_000_003).wrapping_add(u128::from(i))),
        })
        .collect()
}

/// A valid manifest: unique names and paths, tensors laid out without
/// overlap in up to three files, every entry chunked and hashed.
pub fn manifest() -> impl Strategy<Value = WeightManifest> {
    let tensor = (
        select(DTYPES.to_vec()),
        prop::collection::vec(1u64..24, 0..3),
        0usize..3,
        any::<u64>(),
    );
    (
        "[a-z][a-z0-9-]{0,12}",
        "v[0-9]{1,3}",
        select(vec![64u64, 256, 1024]),
        select(vec![HashAlgorithm::Blake3, HashAlgorithm::Sha256]),
        0i64..2_000_000_000_000,
        prop::collection::vec(tensor, 0..6),
        prop::collection::vec((0u64..3000, any::<u64>()), 0..3),
    )
        .prop_map(
            |(model_id, version, chunk_bytes, algorithm, created, tensors, files)| {
                let mut next_offset = [0u64; 3];
                let tensors = tensors
                    .into_iter()
                    .enumerate()
                    .map(|(i, (dtype, shape, file, seed))| {
                        let length = tensor_bytes(dtype, &shape).unwrap_or(0);
                        let offset = next_offset[file];
                        next_offset[file] += length;
                        TensorEntry {
                            name: format!("layers.{i}.w"),
                            dtype: dtype.into(),
                            shape,
                            file: format!("model-{file}.safetensors"),
                            offset,
                            length,
                            chunks: chunks(length, chunk_bytes, u128::from(seed)),
                        }
                    })
                    .collect();
                let files = files
                    .into_iter()
                    .enumerate()
                    .map(|(i, (length, seed))| FileEntry {
                        path: format!("extra/file{i}.json"),
                        offset: 0,
                        length,
                        hash: if seed % 2 == 0 {
                            String::new()
                        } else {
                            hash(u128::from(seed))
                        },
                        chunks: chunks(length, chunk_bytes, u128::from(seed) << 1),
                    })
                    .collect();
                WeightManifest {
                    schema_version: SCHEMA_VERSION,
                    model_id,
                    version,
                    files,
                    hash_algorithm: algorithm as i32,
                    created_unix_ms: created,
                    chunk_bytes,
                    tensors,
                }
            },
        )
}

fn transfer_kind() -> impl Strategy<Value = i32> {
    select(vec![
        TransferKind::H2d,
        TransferKind::D2h,
        TransferKind::P2p,
        TransferKind::Storage2h,
        TransferKind::H2storage,
        TransferKind::Net,
    ])
    .prop_map(|k| k as i32)
}

fn page_ref(with_location: bool) -> impl Strategy<Value = KvPageRef> {
    (
        "[a-z]{0,4}",
        0u64..1 << 40,
        0u32..64,
        0u32..128,
        address(),
        0u64..8,
    )
        .prop_map(
            move |(tensor, page, head, layer, location, count)| KvPageRef {
                tensor,
                page,
                head,
                layer,
                location: if with_location {
                    location
                } else {
                    String::new()
                },
                count,
            },
        )
}

/// Operations with destinations laid out so that none overlap.
pub fn ops() -> impl Strategy<Value = Vec<TransferOp>> {
    let op = (
        transfer_kind(),
        address(),
        select(vec![
            "tier://n0/gpu0",
            "tier://n0/cpu",
            "device://gpu1/buf",
            "strata://out",
        ]),
        1u64..1 << 30,
        0u64..1 << 40,
        prop::collection::vec(page_ref(false), 0..3),
        ".{0,12}",
        any::<u64>(),
        any::<i32>(),
        any::<u32>(),
    );
    prop::collection::vec(op, 0..8).prop_map(|ops| {
        let mut next: HashMap<&str, u64> = HashMap::new();
        ops.into_iter()
            .map(
                |(
                    kind,
                    src,
                    dst,
                    length,
                    src_offset,
                    kv_refs,
                    note,
                    deadline_ns,
                    priority,
                    stream_hint,
                )| {
                    let dst_offset = *next.get(dst).unwrap_or(&0);
                    next.insert(dst, dst_offset + length);
                    // A source equal to the destination would be a copy onto itself.
                    let src = if src == dst {
                        format!("strata://copy-of/{dst}")
                    } else {
                        src
                    };
                    TransferOp {
                        kind,
                        src,
                        dst: dst.into(),
                        length,
                        src_offset,
                        dst_offset,
                        kv_refs,
                        note,
                        deadline_ns,
                        priority,
                        stream_hint,
                    }
                },
            )
            .collect()
    })
}

/// Spreads a page list out so that no two ranges meet: entry `i` starts in
/// its own block of 16 pages from `base`, and `count` stays below 8.
fn spread(mut pages: Vec<KvPageRef>, base: u64) -> Vec<KvPageRef> {
    for (i, p) in pages.iter_mut().enumerate() {
        p.page = base + i as u64 * 16 + p.page % 8;
    }
    pages
}

/// A valid cache plan.
pub fn cache_plan() -> impl Strategy<Value = CachePlan> {
    let pages = || prop::collection::vec(page_ref(true), 0..4);
    (
        "[a-z0-9-]{1,16}",
        ops(),
        pages(),
        pages(),
        pages(),
        any::<u64>(),
        0u64..1 << 62,
        0u64..1 << 40,
    )
        .prop_map(
            |(plan_id, ops, prefetch, evict, admit, index, start_ns, len)| CachePlan {
                schema_version: SCHEMA_VERSION,
                plan_id,
                ops,
                prefetch: spread(prefetch, 0),
                evict: spread(evict, 1 << 40),
                admit: spread(admit, 1 << 41),
                window: Some(PlanWindow {
                    index,
                    start_ns,
                    end_ns: start_ns + len,
                }),
            },
        )
}

/// A valid swap window.
pub fn swap_window() -> impl Strategy<Value = SwapWindow> {
    (
        0u64..1 << 62,
        prop::option::of(0u64..1 << 40),
        0u64..1000,
        0u64..100,
    )
        .prop_map(|(start, deadline, wave_begin, waves)| SwapWindow {
            schema_version: SCHEMA_VERSION,
            t_start_ns: start,
            t_deadline_ns: deadline.map(|d| start + d).unwrap_or(0),
            wave_begin,
            wave_end: wave_begin + waves,
        })
}

/// A valid, sealed swap plan. The previous version is the target with some
/// chunks changed (and perhaps one tensor that the target removed); exactly
/// the changed chunks are packed, split across buckets where needed, into
/// buckets of a random capacity.
pub fn swap_plan() -> impl Strategy<Value = SwapPlan> {
    (
        "[a-z0-9-]{1,16}",
        manifest(),
        ops(),
        swap_window(),
        16u64..5000,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(plan_id, to, ops, window, capacity, pick, removed)| {
            let picked = |n: usize, chunk: u32| pick >> ((n * 7 + chunk as usize) % 64) & 1 == 1;
            let mut from = to.clone();
            from.version = format!("{}-prev", to.version);
            let old_entries = from
                .tensors
                .iter_mut()
                .map(|t| &mut t.chunks)
                .chain(from.files.iter_mut().map(|f| &mut f.chunks));
            for (n, chunks) in old_entries.enumerate() {
                for c in chunks.iter_mut().filter(|c| picked(n, c.index)) {
                    let flipped = if c.hash.starts_with('0') { "1" } else { "0" };
                    c.hash.replace_range(0..1, flipped);
                }
            }
            if removed {
                from.tensors.push(TensorEntry {
                    name: "removed.w".into(),
                    dtype: "U8".into(),
                    shape: vec![16],
                    file: "old.safetensors".into(),
                    offset: 0,
                    length: 16,
                    chunks: chunks(16, from.chunk_bytes, 7),
                });
            }

            let mut buckets: Vec<Bucket> = Vec::new();
            let mut fill = capacity;
            let entries = to
                .tensors
                .iter()
                .map(|t| (false, &t.name, &t.chunks))
                .chain(to.files.iter().map(|f| (true, &f.path, &f.chunks)));
            for (n, (is_file, name, chunks)) in entries.enumerate() {
                for c in chunks.iter().filter(|c| picked(n, c.index)) {
                    let mut done = 0;
                    while done < c.length {
                        if fill == capacity {
                            let id = buckets.len() as u32 * 3 + 1;
                            buckets.push(Bucket {
                                id,
                                capacity,
                                items: vec![],
                                consumer_ranks: vec![0, id % 4],
                            });
                            fill = 0;
                        }
                        let length = (c.length - done).min(capacity - fill);
                        if let Some(b) = buckets.last_mut() {
                            b.items.push(BucketItem {
                                name: name.clone(),
                                chunk: c.index,
                                chunk_offset: done,
                                length,
                                bucket_offset: fill,
                                is_file,
                            });
                        }
                        done += length;
                        fill += length;
                    }
                }
            }
            let mut plan = SwapPlan {
                schema_version: SCHEMA_VERSION,
                plan_id,
                from: Some(from),
                to: Some(to),
                ops,
                window: Some(window),
                buckets,
                digest: String::new(),
            };
            plan.seal();
            plan
        })
}

/// The request-log statistics of a wave spec (fields 17-23).
#[derive(Debug, Clone)]
pub struct TraceStatistics {
    cohorts: Vec<PrefixCohort>,
    prefix_histogram: Vec<PrefixDepth>,
    reuse_distances: Vec<ReuseBucket>,
    block_bytes: u64,
    block_tokens: u32,
    cold_references: u64,
    source: String,
}

/// Valid request-log statistics: none at all, or any mix of cohorts,
/// histogram and reuse buckets, with or without a known block shape.
pub fn trace_statistics() -> impl Strategy<Value = TraceStatistics> {
    // Both 0 (unknown) or both set; block_bytes stays below 2^31 so that
    // depth * block_bytes fits in u64 for any u32 depth.
    let shape = prop_oneof![
        Just((0u64, 0u32)),
        (1u64..1 << 31, 1u32..=u32::MAX),
        Just((67_108_864u64, 512u32)),
    ];
    shape.prop_flat_map(|(block_bytes, block_tokens)| {
        let cohort = (
            any::<u64>(),
            prop_oneof![1u32..64, 1u32..=u32::MAX],
            2u64..=u64::MAX,
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(move |(block, depth, requests, a, b)| PrefixCohort {
                block,
                depth,
                requests,
                bytes: u64::from(depth) * block_bytes,
                first_ms: a.min(b),
                last_ms: a.max(b),
            });
        let histogram = (1usize..6)
            .prop_flat_map(|n| {
                (
                    prop::collection::btree_set(1u32..=u32::MAX, 0..n),
                    prop::collection::vec(any::<u64>(), n),
                    prop::collection::vec(any::<u64>(), n),
                )
            })
            .prop_map(|(depths, mut requests, prefixes)| {
                requests.sort_unstable_by(|a, b| b.cmp(a));
                depths
                    .into_iter()
                    .zip(requests)
                    .zip(prefixes)
                    .map(|((depth, requests), prefixes)| PrefixDepth {
                        depth,
                        requests,
                        prefixes,
                    })
                    .collect::<Vec<_>>()
            });
        let reuse = (
            prop::collection::btree_set(0u64..1 << 40, 0..5),
            any::<bool>(),
            prop::collection::vec(any::<u64>(), 6),
        )
            .prop_map(|(bounds, open, counts)| {
                let open = open.then_some(u64::MAX);
                bounds
                    .into_iter()
                    .chain(open)
                    .zip(counts)
                    .map(|(max_distance, count)| ReuseBucket {
                        max_distance,
                        count,
                    })
                    .collect::<Vec<_>>()
            });
        (
            prop::collection::vec(cohort, 0..4),
            histogram,
            reuse,
            any::<u64>(),
            prop_oneof![Just(String::new()), "[a-zA-Z0-9_./ \"é-]{1,24}"],
        )
            .prop_map(
                move |(cohorts, prefix_histogram, reuse_distances, cold_references, source)| {
                    TraceStatistics {
                        cohorts,
                        prefix_histogram,
                        reuse_distances,
                        block_bytes,
                        block_tokens,
                        cold_references,
                        source,
                    }
                },
            )
    })
}

/// A valid wave spec.
pub fn wave_spec() -> impl Strategy<Value = WaveSpec> {
    let extent =
        ("layers\\.[0-9]{1,2}", 0u64..1 << 40, 0u64..1000).prop_map(|(layer, first, n)| IoExtent {
            layer,
            first_page: first,
            last_page: first + n,
        });
    (
        (1u32..512, 1u32..512, 1u32..512),
        prop::option::of((1u32..5, 1u32..5)),
        (0u32..6).prop_flat_map(|n| Just((0..n).collect::<Vec<u32>>()).prop_shuffle()),
        prop::collection::btree_set((0u32..8, 0u32..8), 0..10).prop_flat_map(
            |s: BTreeSet<(u32, u32)>| Just(s.into_iter().collect::<Vec<_>>()).prop_shuffle(),
        ),
        prop::collection::vec(extent, 0..4),
        (0u64..100, 0u64..100, 0u64..100, any::<bool>()),
        (0u32..5, any::<u64>(), any::<u64>()),
        select(vec!["", "F32", "BF16", "F16", "F8_E4M3"]),
        trace_statistics(),
    )
        .prop_map(
            |(
                (bm, bn, bk),
                cluster,
                pack_order,
                tiles,
                io_extents,
                (begin, len, extra, bounded),
                (stage_depth, deadline_ns, wave_budget_ns),
                dtype,
                stats,
            )| WaveSpec {
                schema_version: SCHEMA_VERSION,
                pack_order,
                tile_order: tiles.into_iter().map(|(m, n)| TileCoord { m, n }).collect(),
                bm,
                bn,
                bk,
                cluster: cluster.map(|(x, y)| ClusterShape { x, y }),
                io_extents,
                swap_begin: begin,
                swap_end: begin + len,
                stage_depth,
                deadline_ns,
                num_waves: if bounded { begin + len + extra } else { 0 },
                dtype: dtype.into(),
                wave_budget_ns,
                cohorts: stats.cohorts,
                prefix_histogram: stats.prefix_histogram,
                reuse_distances: stats.reuse_distances,
                block_bytes: stats.block_bytes,
                block_tokens: stats.block_tokens,
                cold_references: stats.cold_references,
                source: stats.source,
            },
        )
}
