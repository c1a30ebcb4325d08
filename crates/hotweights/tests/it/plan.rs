//! `delta`, `plan` and `verify` on generated sharded checkpoints: the delta
//! is exactly the edit, plans move only changed chunks to the ranks that
//! need them, and `verify` catches every kind of tampering with a path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bstack_plan::{BucketItem, Message, Problem, SwapPlan, Validate, WeightManifest};
use hotweights::delta::{self, Delta, EntryRef};
use hotweights::pack::align_up;
use hotweights::plan::{self, PlanOptions, Planned, TpGroups, auto_bucket_bytes};
use hotweights::source::DirSource;
use hotweights::synth::{Dtype, SynthModel};
use hotweights::{HotweightsError, VerifyOptions, verify};

use crate::fixtures;

/// 16 KiB chunks: the model's projections have 1 to 8 chunks each.
pub const CHUNK: u64 = 16 * 1024;
const ALIGN: u64 = 256;
const SHARDS: usize = 3;

/// A small decoder: 39 tensors, about 1.3 MiB.
pub fn base_model() -> SynthModel {
    SynthModel::decoder(4, 128, 512, 1)
}

/// Two published versions of one model, on disk.
pub struct Versions {
    _dir: tempfile::TempDir,
    pub prev_dir: PathBuf,
    pub next_dir: PathBuf,
    pub prev_model: SynthModel,
    pub next_model: SynthModel,
    pub prev: WeightManifest,
    pub next: WeightManifest,
}

/// v1 is the base model; v2 is it after `edit`.
pub fn versions(edit: impl FnOnce(&mut SynthModel)) -> Versions {
    let dir = tempfile::tempdir().unwrap();
    let (prev_dir, next_dir) = (dir.path().join("v1"), dir.path().join("v2"));
    let prev_model = base_model();
    let mut next_model = prev_model.clone();
    edit(&mut next_model);
    let prev = fixtures::write_and_publish(&prev_model, &prev_dir, SHARDS, "v1", CHUNK);
    let next = fixtures::write_and_publish(&next_model, &next_dir, SHARDS, "v2", CHUNK);
    Versions {
        _dir: dir,
        prev_dir,
        next_dir,
        prev_model,
        next_model,
        prev,
        next,
    }
}

/// An optimizer step on every tensor: every chunk of the projections
/// changes, the checkpoint's files do not.
pub fn nudged() -> Versions {
    versions(|m| {
        m.nudge(0.01, 7);
    })
}

pub fn options() -> PlanOptions {
    PlanOptions {
        bucket_bytes: 64 * 1024,
        align: ALIGN,
        ..PlanOptions::default()
    }
}

fn options_with_source(dir: &Path) -> PlanOptions {
    PlanOptions {
        source: Some(dir.to_owned()),
        ..options()
    }
}

pub fn create(v: &Versions, options: &PlanOptions) -> Planned {
    plan::create(&v.prev, v.next.clone(), options).unwrap_or_else(|e| panic!("{e}"))
}

/// The (tensor, chunk) keys whose bytes differ between the two models,
/// computed from the tensors' bytes, independently of any manifest.
fn differing_chunks(prev: &SynthModel, next: &SynthModel) -> BTreeSet<(String, u32)> {
    let mut out = BTreeSet::new();
    for t in &next.tensors {
        let old = prev.tensors.iter().find(|o| o.name == t.name);
        for (i, window) in t.data.chunks(CHUNK as usize).enumerate() {
            let same = old.is_some_and(|o| {
                o.dtype == t.dtype
                    && o.shape == t.shape
                    && o.data
                        .get(i * CHUNK as usize..i * CHUNK as usize + window.len())
                        == Some(window)
            });
            if !same {
                out.insert((t.name.clone(), i as u32));
            }
        }
    }
    out
}

/// The tensor chunks a delta moves, by name.
fn moved_tensor_chunks(d: &Delta, next: &WeightManifest) -> BTreeSet<(String, u32)> {
    d.changed
        .iter()
        .filter_map(|c| match c.entry {
            EntryRef::Tensor(i) => Some((next.tensors[i].name.clone(), c.chunk)),
            EntryRef::File(_) => None,
        })
        .collect()
}

/// The (is_file, name, chunk) keys staged by a plan's buckets.
fn staged(plan: &SwapPlan) -> BTreeSet<(bool, String, u32)> {
    plan.buckets
        .iter()
        .flat_map(|b| &b.items)
        .map(|i| (i.is_file, i.name.clone(), i.chunk))
        .collect()
}

fn verify_all(plan: &SwapPlan, v: &Versions) -> Vec<Problem> {
    verify(
        plan,
        &VerifyOptions {
            prev: Some(&v.prev),
            next: Some(&v.next),
            world_size: Some(4),
            align: Some(ALIGN),
            bucket_limit: Some(options().bucket_bytes),
            ..VerifyOptions::default()
        },
    )
}

/// Asserts that `problems` are all at `path`, and that one says `says`.
#[track_caller]
fn assert_problems_at(problems: &[Problem], path: &str, says: &str) {
    assert!(!problems.is_empty(), "no problem found; expected {path}");
    assert!(
        problems.iter().all(|p| p.path == path),
        "expected problems at {path} only: {problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.message.contains(says)),
        "no problem at {path} says {says:?}: {problems:#?}"
    );
}

#[test]
fn delta_classes_are_exactly_the_edits() {
    let layer1 = |n: &str| n.starts_with("model.layers.1.");
    let v = versions(|m| {
        assert!(m.nudge_where(0.01, 3, layer1) > 0);
        assert!(m.rewrite("lm_head.weight", 99));
        m.add("model.layers.4.extra.weight", Dtype::BF16, &[64, 128], 5);
        assert!(m.remove("model.layers.3.mlp.down_proj.weight"));
    });
    let d = delta::compute(&v.prev, &v.next);

    // Nine tensors of layer 1 nudged, the head rewritten.
    let changed: BTreeSet<String> = v
        .next_model
        .tensors
        .iter()
        .filter(|t| {
            v.prev_model
                .tensors
                .iter()
                .any(|o| o.name == t.name && o.data != t.data)
        })
        .map(|t| t.name.clone())
        .collect();
    let mut expected: BTreeSet<String> = v
        .next_model
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| layer1(n))
        .collect();
    expected.insert("lm_head.weight".into());
    assert_eq!(changed, expected, "the edit changed what it meant to");
    assert_eq!(expected.len(), 10);

    let changed_bytes: u64 = v
        .next_model
        .tensors
        .iter()
        .filter(|t| expected.contains(&t.name))
        .map(|t| t.data.len() as u64)
        .sum();
    assert_eq!(d.tensors.changed.count, 10);
    assert_eq!(d.tensors.changed.bytes, changed_bytes);
    assert_eq!(d.tensors.added.count, 1);
    assert_eq!(d.tensors.added.bytes, 64 * 128 * 2);
    assert_eq!(d.tensors.removed.count, 1);
    assert_eq!(d.tensors.removed.bytes, 128 * 256 * 2);
    assert_eq!(d.tensors.unchanged.count, 39 - 10 - 1);
    assert_eq!(
        d.removed_tensors,
        vec!["model.layers.3.mlp.down_proj.weight".to_owned()]
    );
    // Tensors that only moved inside their shard (after the removed one)
    // are unchanged.
    let moved = v.next.tensors.iter().filter(|t| {
        v.prev
            .tensors
            .iter()
            .any(|o| o.name == t.name && o.offset != t.offset && o.chunks == t.chunks)
    });
    assert!(moved.count() > 0);

    // The chunks that move are exactly those whose bytes differ.
    assert_eq!(
        moved_tensor_chunks(&d, &v.next),
        differing_chunks(&v.prev_model, &v.next_model)
    );
    // config.json lists 39 tensors before and after: unchanged. The index
    // changed (a tensor left, one came).
    let file_changes: BTreeSet<&str> = d
        .changed
        .iter()
        .filter_map(|c| match c.entry {
            EntryRef::File(i) => Some(v.next.files[i].path.as_str()),
            EntryRef::Tensor(_) => None,
        })
        .collect();
    assert!(file_changes.contains(hotweights::INDEX_FILE));
    assert!(!file_changes.contains("config.json"));
    let files = &d.files;
    assert_eq!(
        files.added.count + files.changed.count + files.unchanged.count,
        v.next.files.len() as u64
    );
    assert_eq!(d.chunks_changed, d.changed.len() as u64);
    assert_eq!(
        d.bytes_changed,
        d.changed.iter().map(|c| c.length).sum::<u64>()
    );
    // Added chunks have no base; nudged ones do.
    for c in &d.changed {
        if let EntryRef::Tensor(i) = c.entry {
            let name = &v.next.tensors[i].name;
            assert_eq!(c.has_base, name != "model.layers.4.extra.weight", "{name}");
        }
    }
    // Nothing differs from itself.
    let same = delta::compute(&v.next, &v.next);
    assert_eq!(same.chunks_changed, 0);
    assert_eq!(same.tensors.unchanged.count, v.next.tensors.len() as u64);
}

#[test]
fn a_partial_change_moves_only_its_chunks() {
    const NAME: &str = "model.layers.2.mlp.up_proj.weight"; // 64 KiB: 4 chunks
    let v = versions(|m| {
        // Two elements of 32768.
        assert_eq!(m.nudge_where(2.0 / 32768.0, 11, |n| n == NAME), 2);
    });
    let expected = differing_chunks(&v.prev_model, &v.next_model);
    assert!(
        !expected.is_empty() && expected.len() < 4,
        "the nudge should touch some but not all chunks: {expected:?}"
    );
    assert!(expected.iter().all(|(n, _)| n == NAME));

    let planned = create(&v, &options_with_source(&v.next_dir));
    let d = &planned.delta;
    assert_eq!(moved_tensor_chunks(d, &v.next), expected);
    assert_eq!(d.chunks_changed, expected.len() as u64, "no file changed");
    assert_eq!(d.tensors.changed.count, 1);
    assert_eq!(d.bytes_changed, expected.len() as u64 * CHUNK);
    let expected_staged: BTreeSet<(bool, String, u32)> = expected
        .iter()
        .map(|(n, c)| (false, n.clone(), *c))
        .collect();
    assert_eq!(staged(&planned.plan), expected_staged);

    // The ops read exactly those chunks' bytes of the shard.
    let entry = v.next.tensors.iter().find(|t| t.name == NAME).unwrap();
    let mut read: Vec<(u64, u64)> = planned
        .plan
        .ops
        .iter()
        .map(|op| {
            assert!(op.src.ends_with(&format!("/{}", entry.file)), "{}", op.src);
            (op.src_offset, op.length)
        })
        .collect();
    read.sort_unstable();
    let mut want: Vec<(u64, u64)> = expected
        .iter()
        .map(|(_, c)| (entry.offset + u64::from(*c) * CHUNK, CHUNK))
        .collect();
    // Adjacent chunks in one bucket merge into one op.
    want.dedup_by(|b, a| {
        let merge = a.0 + a.1 == b.0;
        if merge {
            a.1 += b.1;
        }
        merge
    });
    assert_eq!(read, want);
    assert_eq!(verify_all(&planned.plan, &v), vec![]);
}

#[test]
fn manifests_of_another_model_need_force() {
    let v = nudged();
    let mut other = v.next.clone();
    other.model_id = "another-model".into();
    let err = plan::create(&v.prev, other.clone(), &options()).unwrap_err();
    assert!(matches!(err, HotweightsError::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("another-model"), "{err}");
    let forced = plan::create(
        &v.prev,
        other,
        &PlanOptions {
            force: true,
            ..options()
        },
    )
    .unwrap();
    assert_eq!(forced.plan.problems(), vec![]);

    // Another chunk size: every chunk would move.
    let rechunked = fixtures::publish_as(&v.next_dir, "v2", CHUNK * 2);
    let err = plan::create(&v.prev, rechunked, &options()).unwrap_err();
    assert!(err.to_string().contains("chunk"), "{err}");
}

/// TP groups: layers 0-1 on ranks 0-1, layers 2-3 on ranks 2-3, every MLP
/// also on rank 3 (a union), the head on all four; the embedding, the final
/// norm and the files match no pattern and go to every rank.
fn tp_groups() -> TpGroups {
    TpGroups::new(vec![
        ("model.layers.[01].*".into(), vec![0, 1]),
        ("model.layers.[23].*".into(), vec![2, 3]),
        ("*.mlp.*".into(), vec![3]),
        ("lm_head.weight".into(), vec![0, 1, 2, 3]),
    ])
    .unwrap()
}

#[test]
fn tp_groups_decide_the_consumers_and_buckets_never_mix_them() {
    let v = nudged();
    let groups = tp_groups();
    let planned = create(
        &v,
        &PlanOptions {
            groups: Some(groups.clone()),
            ..options_with_source(&v.next_dir)
        },
    );
    let plan = &planned.plan;
    let expected_ranks = |item: &BucketItem| -> Vec<u32> {
        if item.is_file {
            return vec![];
        }
        let n = &item.name;
        let mut ranks: BTreeSet<u32> = BTreeSet::new();
        if n.starts_with("model.layers.0.") || n.starts_with("model.layers.1.") {
            ranks.extend([0, 1]);
        }
        if n.starts_with("model.layers.2.") || n.starts_with("model.layers.3.") {
            ranks.extend([2, 3]);
        }
        if n.contains(".mlp.") {
            ranks.insert(3);
        }
        if n == "lm_head.weight" {
            ranks.extend([0, 1, 2, 3]);
        }
        ranks.into_iter().collect()
    };
    let mut sets = BTreeSet::new();
    for bucket in &plan.buckets {
        assert!(!bucket.items.is_empty());
        for item in &bucket.items {
            assert_eq!(
                bucket.consumer_ranks,
                expected_ranks(item),
                "bucket {} holds {} chunk {}",
                bucket.id,
                item.name,
                item.chunk
            );
        }
        sets.insert(bucket.consumer_ranks.clone());
    }
    // {0,1}, {0,1,3}, {2,3}, {0,1,2,3}, and every rank.
    assert_eq!(sets.len(), 5, "{sets:?}");
    assert_eq!(planned.report.consumer_sets, 5);
    let problems = verify(
        plan,
        &VerifyOptions {
            prev: Some(&v.prev),
            next: Some(&v.next),
            world_size: Some(4),
            groups: Some(&groups),
            align: Some(ALIGN),
            bucket_limit: Some(options().bucket_bytes),
            ..VerifyOptions::default()
        },
    );
    assert_eq!(problems, vec![]);

    // The same map from its file form.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tp.json");
    std::fs::write(
        &path,
        r#"{"model.layers.[01].*": [0, 1], "model.layers.[23].*": [2, 3],
            "*.mlp.*": [3], "lm_head.weight": [0, 1, 2, 3]}"#,
    )
    .unwrap();
    let loaded = TpGroups::load(&path).unwrap();
    assert_eq!(loaded.groups(), groups.groups());
    for t in &v.next.tensors {
        assert_eq!(loaded.ranks_for(&t.name), groups.ranks_for(&t.name));
    }
    assert_eq!(groups.ranks_for("model.embed_tokens.weight"), None);
    assert_eq!(
        groups.ranks_for("model.layers.1.mlp.up_proj.weight"),
        Some(BTreeSet::from([0, 1, 3]))
    );
}

#[test]
fn tp_group_files_that_are_not_maps_of_ranks_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tp.json");
    for (text, says) in [
        ("[1, 2]", "expected a JSON object"),
        (r#"{"a.*": [0, -1]}"#, "\"a.*\""),
        (r#"{"a.*": 3}"#, "list of ranks"),
        (r#"{"a[": [0]}"#, "a["),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = TpGroups::load(&path).unwrap_err().to_string();
        assert!(err.contains("tp.json"), "{text}: {err}");
        assert!(err.contains(says), "{text}: {err}");
    }
    let err = TpGroups::load(&dir.path().join("missing.json")).unwrap_err();
    assert!(matches!(err, HotweightsError::Io { .. }), "{err}");
    // Problems of the map itself.
    let groups = TpGroups::new(vec![("a".into(), vec![]), ("b".into(), vec![1, 1, 9])]).unwrap();
    let problems = groups.problems(Some(4));
    assert_eq!(problems.len(), 3, "{problems:?}");
}

#[test]
fn a_plan_with_ops_verifies_clean() {
    let v = nudged();
    let planned = create(&v, &options_with_source(&v.next_dir));
    let plan = &planned.plan;
    assert!(planned.report.buckets > 1);
    assert_eq!(planned.report.ops, plan.ops.len() as u64);
    assert_eq!(verify_all(plan, &v), vec![]);
    // Ops fill exactly the staged bytes; nudged projections move whole.
    let op_bytes: u64 = plan.ops.iter().map(|op| op.length).sum();
    assert_eq!(op_bytes, plan.staged_bytes());
    assert_eq!(plan.staged_bytes(), planned.delta.bytes_changed);
    assert_eq!(
        planned.report.padding_bytes,
        planned.report.bucket_bytes - planned.report.staged_bytes
    );
    assert!(plan.buckets.iter().all(|b| b.capacity <= 64 * 1024));
    // Only chunks that differ are staged (the files did not change).
    let expected: BTreeSet<(bool, String, u32)> = differing_chunks(&v.prev_model, &v.next_model)
        .into_iter()
        .map(|(n, c)| (false, n, c))
        .collect();
    assert_eq!(staged(plan), expected);
    // Without a source, the same buckets and no ops.
    let bare = create(&v, &options());
    assert!(bare.plan.ops.is_empty());
    assert_eq!(bare.plan.buckets, plan.buckets);
    assert_eq!(verify_all(&bare.plan, &v), vec![]);
    // ...and `transfer_ops` gives the planned ops.
    assert_eq!(
        plan::transfer_ops(&bare.plan, &v.next_dir).unwrap(),
        plan.ops
    );
}

#[test]
fn plans_are_deterministic() {
    let v = versions(|m| {
        m.nudge(0.001, 5);
        m.rewrite("model.embed_tokens.weight", 3);
    });
    let groups = tp_groups();
    let options = PlanOptions {
        groups: Some(groups),
        ..options_with_source(&v.next_dir)
    };
    let a = create(&v, &options).plan.encode_to_vec();
    let b = create(&v, &options).plan.encode_to_vec();
    assert!(a == b, "two plans of the same inputs differ");
    // And from manifests published again.
    let again = fixtures::publish_as(&v.next_dir, "v2", CHUNK);
    let c = plan::create(&v.prev, again, &options)
        .unwrap()
        .plan
        .encode_to_vec();
    assert!(a == c);
}

#[test]
fn chunks_larger_than_a_bucket_are_split_and_verify() {
    let v = nudged();
    // 5000 rounds down to 4864: a 16 KiB chunk takes three full buckets and
    // a 1792-byte remainder.
    let options = PlanOptions {
        bucket_bytes: 5000,
        ..options_with_source(&v.next_dir)
    };
    let planned = create(&v, &options);
    assert_eq!(planned.report.bucket_limit, 4864);
    assert!(planned.report.split_chunks > 0);
    assert!(planned.plan.buckets.iter().all(|b| b.capacity <= 4864));
    let split = planned
        .plan
        .buckets
        .iter()
        .flat_map(|b| &b.items)
        .filter(|i| i.chunk_offset > 0)
        .count();
    assert!(split > 0);
    let problems = verify(
        &planned.plan,
        &VerifyOptions {
            prev: Some(&v.prev),
            next: Some(&v.next),
            align: Some(ALIGN),
            bucket_limit: Some(5000),
            ..VerifyOptions::default()
        },
    );
    assert_eq!(problems, vec![]);
    assert_eq!(planned.plan.staged_bytes(), planned.delta.bytes_changed);
}

/// A sealed nudged plan with ops, and its versions.
fn sealed() -> (Versions, SwapPlan) {
    let v = nudged();
    let plan = create(&v, &options_with_source(&v.next_dir)).plan;
    assert_eq!(verify_all(&plan, &v), vec![]);
    (v, plan)
}

#[test]
fn an_op_reading_the_wrong_bytes_is_caught() {
    let (v, mut plan) = sealed();
    let o = plan.ops.len() / 2;
    plan.ops[o].src_offset += 2;
    plan.seal();
    let problems = verify_all(&plan, &v);
    assert_problems_at(
        &problems,
        &format!("ops[{o}]"),
        "but the `to` manifest puts it",
    );
}

#[test]
fn an_op_reading_another_file_is_caught() {
    let (v, mut plan) = sealed();
    let o = 0;
    let other = v
        .next
        .files
        .iter()
        .find(|f| !plan.ops[o].src.ends_with(&f.path))
        .unwrap();
    let dir = plan.ops[o].src.rsplit_once('/').unwrap().0.to_owned();
    plan.ops[o].src = format!("{dir}/{}", other.path);
    plan.seal();
    assert_problems_at(&verify_all(&plan, &v), "ops[0]", &other.path);
}

#[test]
fn a_misaligned_item_is_caught() {
    let v = nudged();
    let mut plan = create(&v, &options()).plan;
    let b = 1;
    let i = plan.buckets[b].items.len() - 1;
    plan.buckets[b].items[i].bucket_offset += ALIGN / 2;
    plan.buckets[b].capacity += ALIGN;
    plan.seal();
    let checks = VerifyOptions {
        prev: Some(&v.prev),
        next: Some(&v.next),
        align: Some(ALIGN),
        ..VerifyOptions::default()
    };
    let problems = verify(&plan, &checks);
    assert_problems_at(
        &problems,
        &format!("buckets[{b}].items[{i}].bucket_offset"),
        "not a multiple of 256",
    );
    // Without an alignment to check, the plan is otherwise sound.
    let unaligned = VerifyOptions {
        align: None,
        ..checks
    };
    assert_eq!(verify(&plan, &unaligned), vec![]);
}

#[test]
fn a_staged_unchanged_chunk_is_caught() {
    const NAME: &str = "model.layers.0.self_attn.q_proj.weight";
    let v = versions(|m| {
        m.nudge_where(0.01, 2, |n| n == NAME);
    });
    let mut plan = create(&v, &options()).plan;
    let head = v
        .next
        .tensors
        .iter()
        .find(|t| t.name == "lm_head.weight")
        .unwrap();
    let bucket = &mut plan.buckets[0];
    let i = bucket.items.len();
    bucket.items.push(BucketItem {
        name: head.name.clone(),
        chunk: 1,
        chunk_offset: 0,
        length: head.chunks[1].length,
        bucket_offset: bucket.capacity,
        is_file: false,
    });
    bucket.capacity += align_up(head.chunks[1].length, ALIGN);
    plan.seal();
    let problems = verify(
        &plan,
        &VerifyOptions {
            prev: Some(&v.prev),
            next: Some(&v.next),
            align: Some(ALIGN),
            ..VerifyOptions::default()
        },
    );
    assert_problems_at(
        &problems,
        &format!("buckets[0].items[{i}]"),
        "chunk 1 of tensor \"lm_head.weight\" is unchanged but staged",
    );
}

#[test]
fn a_bucket_over_the_limit_is_caught() {
    let (v, mut plan) = sealed();
    let b = plan.buckets.len() - 1;
    plan.buckets[b].capacity = 64 * 1024 + ALIGN;
    plan.seal();
    assert_problems_at(
        &verify_all(&plan, &v),
        &format!("buckets[{b}].capacity"),
        "over the limit of 65536 bytes",
    );
}

#[test]
fn consumer_ranks_outside_the_world_are_caught() {
    let (v, mut plan) = sealed();
    plan.buckets[0].consumer_ranks = vec![0, 7];
    plan.buckets[1].consumer_ranks = vec![2, 2];
    plan.seal();
    let problems = verify_all(&plan, &v);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert_eq!(problems[0].path, "buckets[0].consumer_ranks");
    assert!(
        problems[0]
            .message
            .contains("rank 7 is outside the world of 4")
    );
    assert_eq!(problems[1].path, "buckets[1].consumer_ranks");
    assert!(problems[1].message.contains("rank 2 listed twice"));
}

#[test]
fn a_bucket_that_misses_a_rank_of_its_group_is_caught() {
    let v = nudged();
    let groups = tp_groups();
    let mut plan = create(
        &v,
        &PlanOptions {
            groups: Some(groups.clone()),
            ..options()
        },
    )
    .plan;
    let b = plan
        .buckets
        .iter()
        .position(|b| b.consumer_ranks == [2, 3])
        .unwrap();
    plan.buckets[b].consumer_ranks = vec![2];
    plan.seal();
    let checks = VerifyOptions {
        prev: Some(&v.prev),
        next: Some(&v.next),
        world_size: Some(4),
        groups: Some(&groups),
        ..VerifyOptions::default()
    };
    let problems = verify(&plan, &checks);
    assert_eq!(problems.len(), plan.buckets[b].items.len());
    for (i, p) in problems.iter().enumerate() {
        assert_eq!(p.path, format!("buckets[{b}].items[{i}]"));
        assert!(
            p.message.contains("is consumed by ranks [3]"),
            "{}",
            p.message
        );
    }
    // A bucket of "every rank" data narrowed to some ranks.
    let mut plan = create(
        &v,
        &PlanOptions {
            groups: Some(groups.clone()),
            ..options()
        },
    )
    .plan;
    let b = plan
        .buckets
        .iter()
        .position(|b| b.consumer_ranks.is_empty())
        .unwrap();
    plan.buckets[b].consumer_ranks = vec![0];
    plan.seal();
    let problems = verify(&plan, &checks);
    assert!(!problems.is_empty());
    assert!(
        problems
            .iter()
            .all(|p| p.path.starts_with(&format!("buckets[{b}].items["))
                && p.message.contains("every rank")),
        "{problems:#?}"
    );
    // And with require_consumers, buckets for every rank must say so.
    let plan = create(&v, &options()).plan;
    let problems = verify(
        &plan,
        &VerifyOptions {
            require_consumers: true,
            ..VerifyOptions::default()
        },
    );
    assert_eq!(problems.len(), plan.buckets.len());
}

#[test]
fn a_plan_from_another_version_is_caught() {
    let (v, plan) = sealed();
    let other = fixtures::publish_as(&v.prev_dir, "v0", CHUNK);
    let problems = verify(
        &plan,
        &VerifyOptions {
            prev: Some(&other),
            ..VerifyOptions::default()
        },
    );
    assert_problems_at(
        &problems,
        "from.version",
        "is \"v1\", the manifest given says \"v0\"",
    );

    // The right label on other bytes (the next version's): the plan's
    // `from` names only the version, but the delta against the manifest
    // given shows every staged chunk as one the receiver already holds.
    let lookalike = fixtures::publish_as(&v.next_dir, "v1", CHUNK);
    let given = VerifyOptions {
        prev: Some(&lookalike),
        ..VerifyOptions::default()
    };
    let problems = verify(&plan, &given);
    let items: usize = plan.buckets.iter().map(|b| b.items.len()).sum();
    assert_eq!(problems.len(), items, "{problems:#?}");
    for p in &problems {
        assert!(
            p.path.starts_with("buckets[") && p.message.ends_with("is unchanged but staged"),
            "{p}"
        );
    }
    // A plan that carries the full `from` manifest is compared entry by
    // entry.
    let mut full = plan.clone();
    full.from = Some(v.prev.clone());
    full.seal();
    assert_eq!(verify_all(&full, &v), vec![]);
    let problems = verify(&full, &given);
    assert!(
        problems
            .iter()
            .any(|p| p.path == "from" && p.message.contains("chunks differ")),
        "{problems:#?}"
    );
    // Another hash function.
    let sha = hotweights::publish(
        &v.prev_dir,
        &hotweights::PublishOptions {
            model_id: Some(fixtures::MODEL_ID.into()),
            chunk_bytes: CHUNK,
            hash: bstack_plan::HashAlgorithm::Sha256,
            ..hotweights::PublishOptions::new("v1")
        },
        &|_| {},
    )
    .unwrap();
    let problems = verify(
        &plan,
        &VerifyOptions {
            prev: Some(&sha),
            ..VerifyOptions::default()
        },
    );
    assert!(
        problems.iter().any(|p| p.path == "from.hash_algorithm"),
        "{problems:#?}"
    );
    // The `to` side too.
    let problems = verify(
        &plan,
        &VerifyOptions {
            next: Some(&v.prev),
            ..VerifyOptions::default()
        },
    );
    assert!(problems.iter().any(|p| p.path == "to"), "{problems:#?}");
    assert!(problems.iter().all(|p| p.path.starts_with("to")));
    // And the wire report refuses a manifest the plan does not start from.
    let err = plan::wire_report(
        &plan,
        &other,
        &DirSource::new(&v.prev_dir),
        &DirSource::new(&v.next_dir),
    )
    .unwrap_err();
    assert!(matches!(err, HotweightsError::Mismatch(_)), "{err}");
}

#[test]
fn a_changed_chunk_left_out_is_caught() {
    let v = nudged();
    let mut plan = create(&v, &options()).plan;
    let b = plan.buckets.len() / 2;
    let item = plan.buckets[b].items.pop().unwrap();
    assert_eq!(item.chunk_offset, 0, "a whole chunk");
    plan.seal();
    // The plan alone cannot tell: its `from` has no entries.
    assert_eq!(plan.problems(), vec![]);
    let problems = verify_all(&plan, &v);
    assert_problems_at(
        &problems,
        "buckets",
        &format!(
            "chunk {} of tensor {:?} is new or changed but in no bucket",
            item.chunk, item.name
        ),
    );
    assert_eq!(problems.len(), 1);
}

#[test]
fn an_unsealed_change_is_caught_by_the_digest() {
    let (v, mut plan) = sealed();
    plan.buckets[0].consumer_ranks = vec![1];
    let problems = verify_all(&plan, &v);
    assert_problems_at(&problems, "digest", "does not match the plan's contents");
    plan.seal();
    assert_eq!(verify_all(&plan, &v), vec![]);
}

#[test]
fn the_wire_report_measures_sparse_deltas() {
    let v = versions(|m| {
        m.nudge(0.002, 9);
        m.add("extra.weight", Dtype::BF16, &[64, 64], 4);
    });
    let planned = create(&v, &options());
    let (prev, next) = (DirSource::new(&v.prev_dir), DirSource::new(&v.next_dir));
    let report = plan::wire_report(&planned.plan, &v.prev, &prev, &next).unwrap();
    assert_eq!(report.full_bytes, planned.delta.bytes_changed);
    assert_eq!(
        report.delta_chunks + report.full_chunks,
        planned.delta.chunks_changed
    );
    assert!(report.delta_chunks > 0);
    // The added tensor has no base; neither do new header chunks.
    assert!(report.full_chunks > 0);
    assert!(
        report.delta_bytes < report.full_bytes / 2,
        "{report:?}: a 0.2 % nudge should encode to a fraction"
    );
    assert!(report.delta_percent() < 50.0);

    // The old chunks read from the wrong directory fail their hashes.
    let err = plan::wire_report(&planned.plan, &v.prev, &next, &next).unwrap_err();
    assert!(matches!(err, HotweightsError::Verify(_)), "{err}");
    // The new chunks read from the old directory: wrong hashes, or (the
    // added tensor) past the end of the old shard.
    let err = plan::wire_report(&planned.plan, &v.prev, &prev, &prev).unwrap_err();
    assert!(
        matches!(err, HotweightsError::Verify(_) | HotweightsError::Io { .. }),
        "{err}"
    );
}

#[test]
fn auto_bucket_size() {
    assert_eq!(auto_bucket_bytes(1000, 0.5, 256).unwrap(), 256);
    assert_eq!(auto_bucket_bytes(0, 0.5, 256).unwrap(), 256);
    assert_eq!(
        auto_bucket_bytes(10 << 30, 0.25, 256).unwrap(),
        (10 << 30) / 4
    );
    assert_eq!(auto_bucket_bytes(4097, 1.0, 4096).unwrap(), 4096);
    for (alpha, align) in [
        (0.0, 256),
        (1.5, 256),
        (f64::NAN, 256),
        (0.5, 0),
        (0.5, 100),
    ] {
        assert!(
            matches!(
                auto_bucket_bytes(1 << 30, alpha, align),
                Err(HotweightsError::Option(_))
            ),
            "{alpha} {align}"
        );
    }
}

/// Whatever the edit (none, a light nudge, a nudge with a rewrite and a
/// removal), the plan stages exactly the delta's chunks, each byte once.
#[test]
fn every_changed_chunk_is_staged_exactly_once() {
    for seed in 0..4u64 {
        let v = versions(|m| {
            m.nudge(0.0005 * seed as f64, seed);
            if seed % 2 == 1 {
                m.rewrite("model.layers.0.mlp.gate_proj.weight", seed);
                m.remove("model.norm.weight");
            }
        });
        let planned = create(&v, &options());
        let mut pieces: BTreeMap<(bool, String, u32), u64> = BTreeMap::new();
        for item in planned.plan.buckets.iter().flat_map(|b| &b.items) {
            *pieces
                .entry((item.is_file, item.name.clone(), item.chunk))
                .or_default() += item.length;
        }
        let expected: BTreeMap<(bool, String, u32), u64> = planned
            .delta
            .changed
            .iter()
            .map(|c| {
                let (is_file, name) = match c.entry {
                    EntryRef::Tensor(i) => (false, v.next.tensors[i].name.clone()),
                    EntryRef::File(i) => (true, v.next.files[i].path.clone()),
                };
                ((is_file, name, c.chunk), c.length)
            })
            .collect();
        assert_eq!(pieces, expected, "seed {seed}");
        assert_eq!(verify_all(&planned.plan, &v), vec![], "seed {seed}");
        if seed == 0 {
            assert!(planned.plan.buckets.is_empty());
        }
    }
}

#[test]
fn delta_does_not_depend_on_the_order_of_entries() {
    let v = versions(|m| {
        m.nudge_where(0.01, 3, |n| n.contains("layers.2"));
        m.add("a.new.weight", Dtype::F32, &[300], 1);
        m.remove("model.layers.0.self_attn.k_proj.weight");
    });
    let sorted = delta::compute(&v.prev, &v.next);
    let (mut prev, mut next) = (v.prev.clone(), v.next.clone());
    prev.tensors.reverse();
    prev.files.reverse();
    next.tensors.rotate_left(5);
    next.files.reverse();
    let shuffled = delta::compute(&prev, &next);
    assert_eq!(shuffled.tensors, sorted.tensors);
    assert_eq!(shuffled.files, sorted.files);
    assert_eq!(shuffled.removed_tensors, sorted.removed_tensors);
    assert_eq!(shuffled.removed_files, sorted.removed_files);
    assert_eq!(shuffled.chunks_changed, sorted.chunks_changed);
    assert_eq!(
        moved_tensor_chunks(&shuffled, &next),
        moved_tensor_chunks(&sorted, &v.next)
    );
    assert_eq!(
        sorted.removed_tensors,
        ["model.layers.0.self_attn.k_proj.weight"]
    );
    assert_eq!(sorted.tensors.added.count, 1);
}

#[test]
fn synth_models_are_written_in_as_many_shards_as_asked() {
    // 12 tensors: every shard count from 1 to 12 (and more, clamped) gives
    // that many files, each named "-of-N" for the N that exist, and the
    // index names exactly them.
    let model = SynthModel::decoder(1, 64, 128, 1);
    assert_eq!(model.tensors.len(), 12);
    for shards in [1, 2, 3, 4, 5, 7, 8, 11, 12, 20] {
        let dir = tempfile::tempdir().unwrap();
        model.write(dir.path(), shards).unwrap();
        let n = shards.min(12);
        let files: BTreeSet<String> = fixtures::read_tree(dir.path())
            .into_keys()
            .filter(|f| f.ends_with(".safetensors"))
            .collect();
        let expected: BTreeSet<String> = if n == 1 {
            BTreeSet::from(["model.safetensors".to_owned()])
        } else {
            (1..=n)
                .map(|s| format!("model-{s:05}-of-{n:05}.safetensors"))
                .collect()
        };
        assert_eq!(files, expected, "{shards} shards");
        let m = fixtures::publish_as(dir.path(), "v1", CHUNK);
        assert_eq!(m.tensors.len(), 12);
        if n > 1 {
            let index: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.path().join(hotweights::INDEX_FILE)).unwrap(),
            )
            .unwrap();
            let named: BTreeSet<String> = index["weight_map"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            assert_eq!(named, expected, "{shards} shards");
        }
    }
}

#[test]
fn offsets_that_overflow_are_problems_not_panics() {
    let (v, mut plan) = sealed();
    // An op starting before its item, reading from the end of the u64 range.
    let o = plan
        .ops
        .iter()
        .position(|op| op.length > plan.buckets[0].items[0].length)
        .unwrap_or(0);
    plan.ops[o].src_offset = u64::MAX - 1;
    plan.seal();
    let problems = verify_all(&plan, &v);
    let at = format!("ops[{o}]");
    assert!(
        problems.iter().all(|p| p.path.starts_with(&at)),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.path == format!("{at}.src_offset") && p.message.contains("overflows")),
        "{problems:#?}"
    );
}
