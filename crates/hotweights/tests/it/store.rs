//! `Store`: import, apply, commit, rollback, gc and export end to end on
//! generated multi-shard checkpoints, and every refusal that keeps a store
//! consistent.

use std::collections::BTreeSet;
use std::path::Path;

use bstack_plan::{SwapPlan, WeightManifest};
use hotweights::plan::{self, PlanOptions};
use hotweights::source::DirSource;
use hotweights::store::ApplyReport;
use hotweights::synth::Dtype;
use hotweights::{ApplySource, HotweightsError, Store};

use crate::fixtures;
use crate::plan::{CHUNK, Versions, create, nudged, options, versions};

/// v2: an optimizer step on every tensor, a rewritten head, a tensor added
/// and one removed.
fn edited() -> Versions {
    versions(|m| {
        m.nudge(0.002, 21);
        m.rewrite("lm_head.weight", 8);
        m.add("model.layers.4.extra.weight", Dtype::BF16, &[64, 128], 5);
        m.remove("model.layers.3.mlp.down_proj.weight");
    })
}

fn with_source(v: &Versions) -> PlanOptions {
    PlanOptions {
        source: Some(v.next_dir.clone()),
        ..options()
    }
}

/// The distinct chunk hashes of a manifest: what its chunk files are.
fn hashes(m: &WeightManifest) -> BTreeSet<String> {
    m.tensors
        .iter()
        .flat_map(|t| &t.chunks)
        .chain(m.files.iter().flat_map(|f| &f.chunks))
        .map(|c| c.hash.clone())
        .collect()
}

fn unwrap<T>(result: hotweights::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// A store at `dir` holding v1, committed.
fn store_with_v1(dir: &Path, v: &Versions) -> Store {
    let mut store = unwrap(Store::open_or_create(dir));
    let report = unwrap(store.import(&v.prev, &DirSource::new(&v.prev_dir), &|_| {}));
    assert_eq!(report.version, "v1");
    assert_eq!(report.chunks_written, hashes(&v.prev).len() as u64);
    assert!(!report.already_present);
    unwrap(store.commit("v1"));
    store
}

fn apply(store: &mut Store, plan: &SwapPlan, source: ApplySource<'_>) -> ApplyReport {
    unwrap(store.apply(plan, source, &|_| {}))
}

#[test]
fn apply_commit_export_and_rollback_round_trip() {
    let v = edited();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(&dir.path().join("store"), &v);
    assert_eq!(store.state().current.as_deref(), Some("v1"));

    let planned = create(&v, &with_source(&v));
    let report = apply(&mut store, &planned.plan, ApplySource::PlanOps);
    assert_eq!(report.version, "v2");
    assert!(!report.already_present);
    assert_eq!(report.bytes_read, planned.plan.staged_bytes());
    // Unchanged chunks (the tensors nobody touched, config.json) are shared.
    let unchanged = planned.delta.chunks_total - planned.delta.chunks_changed;
    assert!(unchanged > 0);
    assert_eq!(report.chunks_shared, unchanged);
    let new_hashes: BTreeSet<String> = hashes(&v.next)
        .difference(&hashes(&v.prev))
        .cloned()
        .collect();
    assert_eq!(report.chunks_written, new_hashes.len() as u64);
    // Applying does not change what is live.
    assert_eq!(store.state().current.as_deref(), Some("v1"));
    assert_eq!(store.state().last_applied.as_deref(), Some("v2"));
    assert_eq!(unwrap(store.manifest("v2")), v.next);

    unwrap(store.commit("v2"));
    assert_eq!(store.state().current.as_deref(), Some("v2"));
    assert_eq!(store.state().history, vec!["v1".to_owned()]);
    let status = unwrap(store.status());
    assert_eq!(status.interrupted, Vec::<String>::new());
    let roles: Vec<(&str, &str)> = status
        .versions
        .iter()
        .map(|i| (i.version.as_str(), i.role))
        .collect();
    assert_eq!(roles, [("v1", "previous"), ("v2", "current")]);
    // One file per distinct chunk: shared chunks are stored once.
    let all: BTreeSet<String> = hashes(&v.prev).union(&hashes(&v.next)).cloned().collect();
    assert_eq!(status.chunks, all.len() as u64);

    let out = dir.path().join("export-v2");
    let exported = unwrap(store.export("v2", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &v.next_dir);
    assert_eq!(
        exported.files,
        fixtures::read_tree(&v.next_dir).len() as u64
    );

    assert_eq!(unwrap(store.rollback()), "v1");
    assert_eq!(store.state().current.as_deref(), Some("v1"));
    let out = dir.path().join("export-v1");
    unwrap(store.export("v1", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &v.prev_dir);

    // The state survives reopening, read-only and for changes.
    drop(store);
    let reader = unwrap(Store::open(&dir.path().join("store")));
    assert_eq!(reader.state().current.as_deref(), Some("v1"));
    assert_eq!(unwrap(reader.versions()), ["v1", "v2"]);
}

#[test]
fn apply_from_a_directory_when_the_plan_has_no_ops() {
    let v = edited();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(&dir.path().join("store"), &v);
    let planned = create(&v, &options());
    assert!(planned.plan.ops.is_empty());
    let err = store
        .apply(&planned.plan, ApplySource::PlanOps, &|_| {})
        .unwrap_err();
    assert!(err.to_string().contains("no transfer ops"), "{err}");
    assert_eq!(unwrap(store.versions()), ["v1"]);

    let report = apply(&mut store, &planned.plan, ApplySource::Dir(&v.next_dir));
    assert_eq!(report.bytes_read, planned.plan.staged_bytes());
    unwrap(store.commit("v2"));
    let out = dir.path().join("out");
    unwrap(store.export("v2", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &v.next_dir);
}

#[test]
fn chunks_split_across_buckets_are_reassembled() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(&dir.path().join("store"), &v);
    let planned = create(
        &v,
        &PlanOptions {
            bucket_bytes: 5000,
            ..with_source(&v)
        },
    );
    assert!(planned.report.split_chunks > 0);
    let progress = std::sync::atomic::AtomicU64::new(0);
    let report = unwrap(store.apply(&planned.plan, ApplySource::PlanOps, &|n| {
        progress.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }));
    assert_eq!(progress.into_inner(), planned.delta.bytes_changed);
    assert_eq!(report.bytes_read, planned.delta.bytes_changed);
    unwrap(store.commit("v2"));
    let out = dir.path().join("out");
    unwrap(store.export("v2", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &v.next_dir);
}

#[test]
fn the_store_is_a_chunk_source() {
    // The wire report reads old chunks from the store instead of v1's files.
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_v1(&dir.path().join("store"), &v);
    let planned = create(&v, &options());
    let next = DirSource::new(&v.next_dir);
    let from_store = unwrap(plan::wire_report(&planned.plan, &v.prev, &store, &next));
    let from_dir = unwrap(plan::wire_report(
        &planned.plan,
        &v.prev,
        &DirSource::new(&v.prev_dir),
        &next,
    ));
    assert_eq!(from_store, from_dir);
    assert!(from_store.delta_chunks > 0);
}

#[test]
fn apply_without_the_base_version_fails_and_changes_nothing() {
    let v = edited();
    let dir = tempfile::tempdir().unwrap();
    let mut store = unwrap(Store::open_or_create(dir.path()));
    let planned = create(&v, &with_source(&v));
    let err = store
        .apply(&planned.plan, ApplySource::PlanOps, &|_| {})
        .unwrap_err();
    assert!(matches!(err, HotweightsError::Store { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("lacks"), "{text}");
    assert!(text.contains("from version \"v1\""), "{text}");
    // Names the first missing chunk.
    assert!(
        text.contains("(first: chunk 0 of tensor \"")
            || text.contains("(first: chunk 0 of file \""),
        "{text}"
    );
    assert_eq!(unwrap(store.versions()), Vec::<String>::new());
    assert_eq!(store.state().current, None);
    let status = unwrap(store.status());
    assert_eq!(status.chunks, 0);
    assert_eq!(status.interrupted, Vec::<String>::new());
}

/// Flips one byte of the last bucket's first item in the next version's
/// files, so every earlier bucket has been stored when the apply fails.
fn corrupt_last_bucket(v: &Versions, plan: &SwapPlan) {
    let item = &plan.buckets.last().unwrap().items[0];
    assert!(!item.is_file);
    let t = v.next.tensors.iter().find(|t| t.name == item.name).unwrap();
    let chunk = &t.chunks[item.chunk as usize];
    let at = t.offset + chunk.offset + item.chunk_offset + item.length / 2;
    let path = v.next_dir.join(&t.file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn a_corrupt_source_fails_the_apply_and_gc_removes_what_it_stored() {
    let v = edited();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(dir.path(), &v);
    let before = unwrap(store.status());
    let planned = create(&v, &with_source(&v));
    assert!(planned.plan.buckets.len() > 2);
    corrupt_last_bucket(&v, &planned.plan);

    let err = store
        .apply(&planned.plan, ApplySource::PlanOps, &|_| {})
        .unwrap_err();
    assert!(matches!(err, HotweightsError::Verify(_)), "{err}");
    assert!(
        err.to_string().starts_with("verification failed: "),
        "{err}"
    );
    assert!(err.to_string().contains("hashes to"), "{err}");

    assert_eq!(store.state().current.as_deref(), Some("v1"));
    assert_eq!(store.state().last_applied.as_deref(), Some("v1"));
    assert_eq!(unwrap(store.versions()), ["v1"]);
    assert!(store.manifest("v2").is_err());
    let after = unwrap(store.status());
    assert_eq!(after.interrupted, Vec::<String>::new());
    assert!(!dir.path().join("journal.json").exists());
    // The verified chunks of the earlier buckets stay until gc.
    let stored = after.chunks - before.chunks;
    assert!(stored > 0, "the failed apply stored nothing before failing");

    let gc = unwrap(store.gc(None, false));
    assert_eq!(gc.chunks_removed, stored);
    assert_eq!(gc.versions_removed, Vec::<String>::new());
    assert_eq!(unwrap(store.status()).chunks, before.chunks);
    assert_eq!(store.state().current.as_deref(), Some("v1"));
    let out = dir.path().join("out");
    unwrap(store.export("v1", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &v.prev_dir);
}

#[test]
fn a_failed_apply_can_be_rerun_once_the_source_is_right() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(&dir.path().join("store"), &v);
    let planned = create(&v, &with_source(&v));
    let pristine = fixtures::read_tree(&v.next_dir);
    corrupt_last_bucket(&v, &planned.plan);
    assert!(
        store
            .apply(&planned.plan, ApplySource::PlanOps, &|_| {})
            .is_err()
    );
    for (name, bytes) in &pristine {
        std::fs::write(v.next_dir.join(name), bytes).unwrap();
    }
    let report = apply(&mut store, &planned.plan, ApplySource::PlanOps);
    assert!(!report.already_present);
    // The chunks the failed run stored are not written again.
    assert!(report.chunks_written < planned.delta.chunks_changed);
    unwrap(store.commit("v2"));
    let out = dir.path().join("out");
    unwrap(store.export("v2", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &v.next_dir);
}

#[test]
fn applying_twice_is_already_present_and_a_reused_label_is_refused() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(&dir.path().join("store"), &v);
    let planned = create(&v, &with_source(&v));
    let first = apply(&mut store, &planned.plan, ApplySource::PlanOps);
    assert!(!first.already_present);
    let chunks = unwrap(store.status()).chunks;
    let second = apply(&mut store, &planned.plan, ApplySource::PlanOps);
    assert!(second.already_present);
    assert_eq!(second.version, "v2");
    assert_eq!(second.chunks_written, 0);
    assert_eq!(unwrap(store.status()).chunks, chunks);

    // Other weights under the label "v2".
    let other_dir = dir.path().join("other");
    let mut other_model = v.prev_model.clone();
    other_model.nudge(0.01, 1234);
    let other = fixtures::write_and_publish(&other_model, &other_dir, 3, "v2", CHUNK);
    let other_plan = plan::create(
        &v.prev,
        other,
        &PlanOptions {
            source: Some(other_dir.clone()),
            ..options()
        },
    )
    .unwrap()
    .plan;
    let err = store
        .apply(&other_plan, ApplySource::PlanOps, &|_| {})
        .unwrap_err();
    assert!(matches!(err, HotweightsError::Store { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("already holds a different version \"v2\""),
        "{err}"
    );
    assert_eq!(unwrap(store.manifest("v2")), v.next);
    // And an import under a taken label.
    let relabelled = fixtures::publish_as(&other_dir, "v1", CHUNK);
    let err = store
        .import(&relabelled, &DirSource::new(&other_dir), &|_| {})
        .unwrap_err();
    assert!(
        err.to_string().contains("different version \"v1\""),
        "{err}"
    );
    // The identical import is a no-op.
    let again = unwrap(store.import(&v.prev, &DirSource::new(&v.prev_dir), &|_| {}));
    assert!(again.already_present);
}

#[test]
fn one_writer_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let v = nudged();
    let mut writer = store_with_v1(dir.path(), &v);
    let err = Store::open_or_create(dir.path()).unwrap_err();
    assert!(matches!(err, HotweightsError::Store { .. }), "{err}");
    assert!(err.to_string().contains("another process"), "{err}");

    // Readers do not take the lock, and cannot change the store.
    let mut reader = unwrap(Store::open(dir.path()));
    assert_eq!(reader.state().current.as_deref(), Some("v1"));
    let planned = create(&v, &with_source(&v));
    for err in [
        reader
            .apply(&planned.plan, ApplySource::PlanOps, &|_| {})
            .unwrap_err(),
        reader.commit("v1").unwrap_err(),
        reader.rollback().unwrap_err(),
        reader.gc(None, true).unwrap_err(),
    ] {
        assert!(err.to_string().contains("read-only"), "{err}");
    }
    assert_eq!(unwrap(reader.versions()), ["v1"]);

    // The writer still works; once it is gone, another may open.
    apply(&mut writer, &planned.plan, ApplySource::PlanOps);
    drop(writer);
    let mut next = unwrap(Store::open_or_create(dir.path()));
    unwrap(next.commit("v2"));

    // Not a store at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(Store::open(empty.path()).is_err());
}

#[test]
fn gc_keeps_history_as_asked_and_prunes_uncommitted_versions() {
    let v = edited();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(&dir.path().join("store"), &v);
    let planned = create(&v, &with_source(&v));
    apply(&mut store, &planned.plan, ApplySource::PlanOps);
    unwrap(store.commit("v2"));

    // Everything is referenced: nothing to do.
    let gc = unwrap(store.gc(None, false));
    assert_eq!(gc.chunks_removed, 0);
    assert_eq!(gc.versions_removed, Vec::<String>::new());

    let (v1, v2) = (hashes(&v.prev), hashes(&v.next));
    let gc = unwrap(store.gc(Some(0), false));
    assert_eq!(gc.versions_removed, ["v1"]);
    assert_eq!(gc.chunks_removed, v1.difference(&v2).count() as u64);
    assert_eq!(gc.chunks_kept, v2.len() as u64);
    assert!(gc.bytes_freed > 0);
    assert_eq!(unwrap(store.versions()), ["v2"]);
    assert_eq!(store.state().history, Vec::<String>::new());
    assert!(store.manifest("v1").is_err());
    let err = store.rollback().unwrap_err();
    assert!(err.to_string().contains("no previous version"), "{err}");
    let out = dir.path().join("out");
    unwrap(store.export("v2", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &v.next_dir);

    // A version applied but never committed is kept, unless pruned.
    let v3_dir = dir.path().join("v3");
    let mut v3_model = v.next_model.clone();
    v3_model.nudge(0.01, 77);
    let v3 = fixtures::write_and_publish(&v3_model, &v3_dir, 3, "v3", CHUNK);
    let plan3 = plan::create(
        &v.next,
        v3.clone(),
        &PlanOptions {
            source: Some(v3_dir.clone()),
            ..options()
        },
    )
    .unwrap()
    .plan;
    apply(&mut store, &plan3, ApplySource::PlanOps);
    let gc = unwrap(store.gc(None, false));
    assert_eq!(gc.chunks_removed, 0);
    assert_eq!(unwrap(store.versions()), ["v2", "v3"]);
    let gc = unwrap(store.gc(None, true));
    assert_eq!(gc.versions_removed, ["v3"]);
    assert_eq!(
        gc.chunks_removed,
        hashes(&v3).difference(&v2).count() as u64
    );
    assert_eq!(unwrap(store.status()).chunks, v2.len() as u64);
    assert_eq!(store.state().current.as_deref(), Some("v2"));
}

#[test]
fn rollback_needs_history() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let mut store = unwrap(Store::open_or_create(dir.path()));
    assert!(store.rollback().is_err());
    unwrap(store.import(&v.prev, &DirSource::new(&v.prev_dir), &|_| {}));
    assert!(store.rollback().is_err());
    unwrap(store.commit("v1"));
    let err = store.rollback().unwrap_err();
    assert!(matches!(err, HotweightsError::Store { .. }), "{err}");
    assert_eq!(store.state().current.as_deref(), Some("v1"));
    // Committing an unknown version is refused too.
    assert!(store.commit("v9").is_err());
    assert!(store.commit("../v1").is_err());
}

#[test]
fn export_needs_a_new_or_empty_directory_and_verifies_chunks() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_v1(&dir.path().join("store"), &v);

    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let err = store.export("v1", &full, &|_| {}).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    unwrap(store.export("v1", &empty, &|_| {}));
    fixtures::assert_same_tree(&empty, &v.prev_dir);

    assert!(store.export("v7", &dir.path().join("v7"), &|_| {}).is_err());
    assert!(!dir.path().join("v7").exists());

    // A chunk file damaged in the store: the export fails, and leaves no
    // directory behind.
    let t = &v.prev.tensors[0];
    let chunk_path = dir
        .path()
        .join("store/chunks/blake3")
        .join(&t.chunks[0].hash[..2])
        .join(&t.chunks[0].hash);
    let mut bytes = std::fs::read(&chunk_path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&chunk_path, bytes).unwrap();
    let bad = dir.path().join("bad");
    let err = store.export("v1", &bad, &|_| {}).unwrap_err();
    assert!(matches!(err, HotweightsError::Verify(_)), "{err}");
    assert!(!bad.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".export-"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());
}

#[test]
fn chunk_sizes_that_are_not_a_multiple_of_the_alignment_round_trip() {
    // 1000-byte chunks in 256-byte-aligned buckets: every item is followed
    // by padding, so items contiguous in a file are not in their bucket,
    // and the ops must not merge them.
    const ODD: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let (prev_dir, next_dir) = (dir.path().join("v1"), dir.path().join("v2"));
    let prev_model = hotweights::synth::SynthModel::decoder(2, 64, 128, 3);
    let mut next_model = prev_model.clone();
    next_model.nudge(0.05, 4);
    let prev = fixtures::write_and_publish(&prev_model, &prev_dir, 2, "v1", ODD);
    let next = fixtures::write_and_publish(&next_model, &next_dir, 2, "v2", ODD);
    let planned = unwrap(plan::create(
        &prev,
        next.clone(),
        &PlanOptions {
            bucket_bytes: 16 * 1024,
            source: Some(next_dir.clone()),
            ..PlanOptions::default()
        },
    ));
    assert!(planned.report.padding_bytes > 0);
    let problems = hotweights::verify(
        &planned.plan,
        &hotweights::VerifyOptions {
            prev: Some(&prev),
            next: Some(&next),
            align: Some(256),
            bucket_limit: Some(16 * 1024),
            ..hotweights::VerifyOptions::default()
        },
    );
    assert_eq!(problems, vec![]);
    // No op spans an item's padding.
    for op in &planned.plan.ops {
        assert!(op.length <= ODD, "{op:?}");
    }

    let mut store = unwrap(Store::open_or_create(&dir.path().join("store")));
    unwrap(store.import(&prev, &DirSource::new(&prev_dir), &|_| {}));
    apply(&mut store, &planned.plan, ApplySource::PlanOps);
    let out = dir.path().join("out");
    unwrap(store.export("v2", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &next_dir);
}

#[test]
fn zero_blocks_and_repeated_chunks_round_trip() {
    // Zero tensors (a fresh LoRA's B matrix) repeat one chunk many times,
    // and zero blocks inside, at the start and at the end of chunks are
    // stored as holes: the exported bytes must still be exact.
    const ZERO_A: &str = "model.layers.0.mlp.up_proj.weight";
    const ZERO_B: &str = "model.layers.1.mlp.up_proj.weight";
    let zero =
        |m: &mut hotweights::synth::SynthModel, name: &str, range: std::ops::Range<usize>| {
            let t = m.tensors.iter_mut().find(|t| t.name == name).unwrap();
            t.data[range].fill(0);
        };
    let v = versions(|m| {
        m.nudge_where(0.01, 6, |n| n.contains("self_attn"));
        // The next version zeroes a third tensor: its new chunks are ones
        // the store already holds.
        zero(m, "model.layers.2.mlp.up_proj.weight", 0..64 * 1024);
    });
    // The same holes in both versions.
    let dir = tempfile::tempdir().unwrap();
    let mut prev_model = v.prev_model.clone();
    let mut next_model = v.next_model.clone();
    for m in [&mut prev_model, &mut next_model] {
        zero(m, ZERO_A, 0..64 * 1024);
        zero(m, ZERO_B, 0..64 * 1024);
        let embed = "model.embed_tokens.weight";
        zero(m, embed, 4096..8192); // a hole inside chunk 0
        zero(m, embed, 28672..32768); // at the end of chunk 1
        zero(m, embed, 32768..40960); // at the start of chunk 2
    }
    let (prev_dir, next_dir) = (dir.path().join("v1"), dir.path().join("v2"));
    let prev = fixtures::write_and_publish(&prev_model, &prev_dir, 3, "v1", CHUNK);
    let next = fixtures::write_and_publish(&next_model, &next_dir, 3, "v2", CHUNK);
    let a = &prev
        .tensors
        .iter()
        .find(|t| t.name == ZERO_A)
        .unwrap()
        .chunks;
    assert!(
        a.iter().all(|c| c.hash == a[0].hash),
        "one zero chunk, four times"
    );

    let mut store = unwrap(Store::open_or_create(&dir.path().join("store")));
    unwrap(store.import(&prev, &DirSource::new(&prev_dir), &|_| {}));
    unwrap(store.commit("v1"));
    assert_eq!(unwrap(store.status()).chunks, hashes(&prev).len() as u64);
    let planned = unwrap(plan::create(
        &prev,
        next.clone(),
        &PlanOptions {
            source: Some(next_dir.clone()),
            ..options()
        },
    ));
    let report = apply(&mut store, &planned.plan, ApplySource::PlanOps);
    let new: BTreeSet<String> = hashes(&next).difference(&hashes(&prev)).cloned().collect();
    assert_eq!(report.chunks_written, new.len() as u64);
    unwrap(store.commit("v2"));
    for (version, source) in [("v1", &prev_dir), ("v2", &next_dir)] {
        let out = dir.path().join(format!("out-{version}"));
        unwrap(store.export(version, &out, &|_| {}));
        fixtures::assert_same_tree(&out, source);
    }
}

#[test]
fn other_files_empty_nested_added_and_removed_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (prev_dir, next_dir) = (dir.path().join("v1"), dir.path().join("v2"));
    let prev_model = hotweights::synth::SynthModel::decoder(2, 64, 128, 8);
    let mut next_model = prev_model.clone();
    next_model.nudge(0.01, 2);
    prev_model.write(&prev_dir, 2).unwrap();
    next_model.write(&next_dir, 2).unwrap();
    for d in [&prev_dir, &next_dir] {
        std::fs::write(d.join("empty.txt"), b"").unwrap();
        std::fs::create_dir_all(d.join("original/deep")).unwrap();
    }
    std::fs::write(prev_dir.join("original/deep/params.json"), b"{\"dim\": 64}").unwrap();
    std::fs::write(next_dir.join("original/deep/params.json"), b"{\"dim\": 65}").unwrap();
    std::fs::write(prev_dir.join("gone.txt"), fixtures::bytes("gone", 40_000)).unwrap();
    std::fs::write(next_dir.join("new.txt"), fixtures::bytes("new", 40_000)).unwrap();
    let prev = fixtures::publish_as(&prev_dir, "v1", CHUNK);
    let next = fixtures::publish_as(&next_dir, "v2", CHUNK);

    let planned = unwrap(plan::create(
        &prev,
        next.clone(),
        &PlanOptions {
            source: Some(next_dir.clone()),
            ..options()
        },
    ));
    assert_eq!(planned.delta.removed_files, ["gone.txt"]);
    assert_eq!(planned.delta.files.added.count, 1);
    let staged_files: BTreeSet<&str> = planned
        .plan
        .buckets
        .iter()
        .flat_map(|b| &b.items)
        .filter(|i| i.is_file)
        .map(|i| i.name.as_str())
        .collect();
    assert!(staged_files.contains("new.txt"));
    assert!(staged_files.contains("original/deep/params.json"));
    assert!(!staged_files.contains("empty.txt"));

    let mut store = unwrap(Store::open_or_create(&dir.path().join("store")));
    unwrap(store.import(&prev, &DirSource::new(&prev_dir), &|_| {}));
    unwrap(store.commit("v1"));
    apply(&mut store, &planned.plan, ApplySource::PlanOps);
    unwrap(store.commit("v2"));
    let out = dir.path().join("out-v2");
    unwrap(store.export("v2", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &next_dir);
    assert_eq!(unwrap(store.rollback()), "v1");
    let out = dir.path().join("out-v1");
    unwrap(store.export("v1", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &prev_dir);
}

#[test]
fn unsound_and_lying_plans_are_refused() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(dir.path(), &v);
    let planned = create(&v, &with_source(&v));

    // Changed after sealing: the digest gives it away before anything runs.
    let mut unsealed = planned.plan.clone();
    unsealed.ops[0].src_offset += 1;
    let err = store
        .apply(&unsealed, ApplySource::PlanOps, &|_| {})
        .unwrap_err();
    assert!(matches!(err, HotweightsError::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("digest"), "{err}");

    // Resealed, it is sound as a contract but reads the wrong bytes: every
    // chunk is checked against its hash before it is stored.
    let mut lying = unsealed;
    lying.seal();
    let err = store
        .apply(&lying, ApplySource::PlanOps, &|_| {})
        .unwrap_err();
    assert!(matches!(err, HotweightsError::Verify(_)), "{err}");
    assert_eq!(unwrap(store.versions()), ["v1"]);
    assert_eq!(unwrap(store.status()).interrupted, Vec::<String>::new());

    // The honest plan still applies.
    apply(&mut store, &planned.plan, ApplySource::PlanOps);
    assert_eq!(unwrap(store.versions()), ["v1", "v2"]);
}

#[test]
fn crafted_sizes_in_a_plan_are_errors_not_allocations() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(dir.path(), &v);
    let planned = create(&v, &with_source(&v));

    // An op that claims to read an exabyte into a bucket that claims to hold
    // it: the claim is checked against the source file before anything is
    // allocated (this used to abort the process).
    let mut huge = planned.plan.clone();
    huge.buckets[0].capacity = 1 << 60;
    let bucket = plan::bucket_address(huge.buckets[0].id);
    let o = huge.ops.iter().position(|op| op.dst == bucket).unwrap();
    huge.ops[o].length = (1 << 60) - huge.ops[o].dst_offset;
    let ops = std::mem::take(&mut huge.ops);
    huge.ops = ops
        .into_iter()
        .enumerate()
        .filter(|(i, op)| *i == o || op.dst != bucket)
        .map(|(_, op)| op)
        .collect();
    huge.seal();
    let err = store
        .apply(&huge, ApplySource::PlanOps, &|_| {})
        .unwrap_err();
    assert!(matches!(err, HotweightsError::Io { .. }), "{err}");
    assert!(err.to_string().contains("ends before byte"), "{err}");
    assert_eq!(unwrap(store.versions()), ["v1"]);

    // A bucket's capacity alone is never allocated: the plan is sound.
    let mut roomy = planned.plan.clone();
    roomy.buckets[0].capacity = 1 << 60;
    roomy.seal();
    apply(&mut store, &roomy, ApplySource::PlanOps);
    assert_eq!(unwrap(store.versions()), ["v1", "v2"]);
}

#[test]
fn bucket_bytes_that_no_op_writes_are_refused() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with_v1(dir.path(), &v);
    let mut plan = create(&v, &with_source(&v)).plan;
    plan.ops.pop();
    plan.seal();
    let err = store
        .apply(&plan, ApplySource::PlanOps, &|_| {})
        .unwrap_err();
    assert!(matches!(err, HotweightsError::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("no op writes them"), "{err}");
    assert_eq!(unwrap(store.versions()), ["v1"]);
}

#[test]
fn a_version_applied_after_an_interrupted_gc_retired_its_label_is_kept() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    drop(store_with_v1(&root, &v));
    // What a gc that retired "v2", deleted its manifest and died before
    // clearing `retired` leaves behind.
    let path = root.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["retired"] = serde_json::json!(["v2"]);
    std::fs::write(&path, state.to_string()).unwrap();

    let mut store = unwrap(Store::open_or_create(&root));
    let planned = create(&v, &with_source(&v));
    apply(&mut store, &planned.plan, ApplySource::PlanOps);
    assert!(store.state().retired.is_empty());
    // gc keeps versions applied but never committed.
    unwrap(store.gc(None, false));
    assert_eq!(unwrap(store.versions()), ["v1", "v2"]);
    assert_eq!(store.state().last_applied.as_deref(), Some("v2"));
}

#[test]
fn a_file_in_several_entries_imports_and_exports_byte_identical() {
    let v = nudged();
    let dir = tempfile::tempdir().unwrap();
    // config.json as two entries of one file, which a valid manifest may
    // have: each entry's own chunks must be stored, not the last entry's.
    let mut m = v.prev.clone();
    let i = m
        .files
        .iter()
        .position(|f| f.path == "config.json")
        .unwrap();
    let bytes = std::fs::read(v.prev_dir.join("config.json")).unwrap();
    let entry = |offset: usize, end: usize| bstack_plan::FileEntry {
        path: "config.json".into(),
        offset: offset as u64,
        length: (end - offset) as u64,
        hash: String::new(),
        chunks: vec![bstack_plan::Chunk {
            index: 0,
            offset: 0,
            length: (end - offset) as u64,
            hash: hotweights::hash_hex(bstack_plan::HashAlgorithm::Blake3, &bytes[offset..end])
                .unwrap(),
        }],
    };
    let half = bytes.len() / 2;
    m.files[i] = entry(0, half);
    m.files.insert(i + 1, entry(half, bytes.len()));
    bstack_plan::Validate::validate(&m).unwrap();

    let mut store = unwrap(Store::open_or_create(&dir.path().join("store")));
    unwrap(store.import(&m, &DirSource::new(&v.prev_dir), &|_| {}));
    assert_eq!(unwrap(store.status()).unreferenced_chunks, 0);
    let out = dir.path().join("out");
    unwrap(store.export("v1", &out, &|_| {}));
    fixtures::assert_same_tree(&out, &v.prev_dir);
}

/// Temporary files that an atomic replacement left beside the manifests or
/// the state (a crash between its write and its rename) are reported by
/// status and removed by gc; real manifests are untouched.
#[test]
fn stray_temporary_files_are_reported_and_collected() {
    let v = edited();
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let mut store = store_with_v1(&store_dir, &v);
    std::fs::write(store_dir.join("versions/.tmpAbC123"), b"half a manifest").unwrap();
    std::fs::write(store_dir.join(".tmpXyZ789"), b"half a journal").unwrap();
    let status = unwrap(store.status());
    assert!(
        status
            .interrupted
            .iter()
            .any(|l| l.starts_with("2 partly written files")),
        "{:?}",
        status.interrupted
    );
    let report = unwrap(store.gc(None, false));
    assert_eq!(report.leftovers_removed, 2);
    let status = unwrap(store.status());
    assert!(status.interrupted.is_empty(), "{:?}", status.interrupted);
    assert_eq!(unwrap(store.versions()), ["v1"]);
}

#[test]
fn a_prepared_commit_flips_with_one_rename_and_refuses_when_stale() {
    let v = edited();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let mut store = store_with_v1(&root, &v);
    let planned = create(&v, &with_source(&v));
    apply(&mut store, &planned.plan, ApplySource::PlanOps);

    // Prepared but not flipped: nothing changed, on disk either.
    let prepared = unwrap(store.prepare_commit("v2")).expect("v2 is not current");
    assert_eq!(store.state().current.as_deref(), Some("v1"));
    drop(store);
    let mut store = unwrap(Store::open_or_create(&root));
    assert_eq!(store.state().current.as_deref(), Some("v1"));
    // That prepared commit was made against the same state: it still flips.
    unwrap(store.flip(prepared));
    unwrap(store.sync());
    assert_eq!(store.state().current.as_deref(), Some("v2"));
    assert_eq!(store.state().history, vec!["v1".to_owned()]);
    drop(store);
    let mut store = unwrap(Store::open_or_create(&root));
    assert_eq!(store.state().current.as_deref(), Some("v2"));

    // Another change after the prepare: the flip is refused, nothing moves.
    let stale = unwrap(store.prepare_commit("v1")).expect("v1 is not current");
    assert_eq!(unwrap(store.rollback()), "v1");
    let err = store.flip(stale).unwrap_err().to_string();
    assert!(err.contains("stale"), "{err}");
    assert_eq!(store.state().current.as_deref(), Some("v1"));
    // The current version needs no commit.
    assert!(unwrap(store.prepare_commit("v1")).is_none());
}
