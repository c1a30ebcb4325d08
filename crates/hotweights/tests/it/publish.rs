//! `publish`: manifests of real safetensors checkpoints.

use bstack_plan::{HashAlgorithm, Validate};
use hotweights::{HotweightsError, PublishOptions, hash_hex, publish};
use safetensors::Dtype;

use crate::fixtures::{self, Tensor};

fn options(chunk_bytes: u64) -> PublishOptions {
    PublishOptions {
        chunk_bytes,
        ..PublishOptions::new("v1")
    }
}

fn publish_dir(dir: &std::path::Path, chunk_bytes: u64) -> bstack_plan::WeightManifest {
    publish(dir, &options(chunk_bytes), &|_| {}).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn single_file_checkpoint_becomes_a_valid_chunked_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = fixtures::model_tensors();
    fixtures::single(dir.path(), &tensors);
    let m = publish_dir(dir.path(), 8192);

    assert_eq!(m.problems(), vec![]);
    assert_eq!(m.tensors.len(), tensors.len());
    assert_eq!(m.chunk_bytes, 8192);
    let mut names: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
    let sorted = {
        let mut s = names.clone();
        s.sort();
        s
    };
    assert_eq!(names, sorted, "tensors are sorted by name");
    names.dedup();

    // Each tensor's chunks hash exactly its bytes, read independently here.
    let file = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    for t in &tensors {
        let entry = m.tensors.iter().find(|e| e.name == t.name).unwrap();
        assert_eq!(entry.file, "model.safetensors");
        assert_eq!(entry.dtype, format!("{:?}", t.dtype));
        assert_eq!(
            entry.shape,
            t.shape.iter().map(|&d| d as u64).collect::<Vec<_>>()
        );
        let start = entry.offset as usize;
        assert_eq!(
            &file[start..start + entry.length as usize],
            &t.data[..],
            "{}",
            t.name
        );
        assert_eq!(entry.chunks.len(), t.data.len().div_ceil(8192));
        for c in &entry.chunks {
            let bytes = &t.data[c.offset as usize..(c.offset + c.length) as usize];
            assert_eq!(c.hash, hash_hex(HashAlgorithm::Blake3, bytes).unwrap());
        }
    }
}

#[test]
fn entries_tile_every_file() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::single(dir.path(), &fixtures::model_tensors());
    let m = publish_dir(dir.path(), 4096);
    for name in ["model.safetensors", "config.json", "tokenizer.json"] {
        let len = std::fs::metadata(dir.path().join(name)).unwrap().len();
        let mut spans: Vec<(u64, u64)> = m
            .tensors
            .iter()
            .filter(|t| t.file == name)
            .map(|t| (t.offset, t.length))
            .chain(
                m.files
                    .iter()
                    .filter(|f| f.path == name)
                    .map(|f| (f.offset, f.length)),
            )
            .collect();
        spans.sort();
        let mut at = 0;
        for (offset, length) in spans {
            assert_eq!(offset, at, "{name}: entries leave no gap");
            at += length;
        }
        assert_eq!(at, len, "{name}: entries cover the whole file");
    }
    // The safetensors header is an entry of its own, at offset 0.
    let header = m
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap();
    assert_eq!(header.offset, 0);
}

#[test]
fn sharded_checkpoint_with_index() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = fixtures::model_tensors();
    fixtures::sharded(dir.path(), &tensors, 3);
    let m = publish_dir(dir.path(), 1 << 20);
    assert_eq!(m.problems(), vec![]);
    assert_eq!(m.tensors.len(), tensors.len());
    let shards: std::collections::BTreeSet<&str> =
        m.tensors.iter().map(|t| t.file.as_str()).collect();
    assert_eq!(shards.len(), 3);
    assert!(m.files.iter().any(|f| f.path == hotweights::INDEX_FILE));
}

#[test]
fn the_same_directory_gives_a_byte_identical_manifest() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::sharded(dir.path(), &fixtures::model_tensors(), 2);
    let a = bstack_plan::Contract::to_json(&publish_dir(dir.path(), 4096));
    let b = bstack_plan::Contract::to_json(&publish_dir(dir.path(), 4096));
    assert_eq!(a, b);
}

#[test]
fn a_partial_change_changes_only_its_chunk() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let tensors = fixtures::model_tensors();
    fixtures::single(a.path(), &tensors);
    let mut changed = tensors.clone();
    let head = changed
        .iter_mut()
        .find(|t| t.name == "lm_head.weight")
        .unwrap();
    head.data[5000] ^= 1; // inside chunk 1 of 4 KiB chunks
    fixtures::single(b.path(), &changed);
    let (ma, mb) = (publish_dir(a.path(), 4096), publish_dir(b.path(), 4096));
    let mut differing = Vec::new();
    for (x, y) in ma.tensors.iter().zip(&mb.tensors) {
        for (cx, cy) in x.chunks.iter().zip(&y.chunks) {
            if cx.hash != cy.hash {
                differing.push((x.name.clone(), cx.index));
            }
        }
    }
    assert_eq!(differing, vec![("lm_head.weight".to_owned(), 1)]);
}

#[test]
fn sha256_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![fixtures::tensor("w", Dtype::F32, &[100])];
    fixtures::single(dir.path(), &tensors);
    let options = PublishOptions {
        hash: HashAlgorithm::Sha256,
        ..options(4096)
    };
    let m = publish(dir.path(), &options, &|_| {}).unwrap();
    assert_eq!(m.hash_algorithm, HashAlgorithm::Sha256 as i32);
    let expected = hash_hex(HashAlgorithm::Sha256, &tensors[0].data).unwrap();
    assert_eq!(m.tensors[0].chunks[0].hash, expected);
    assert_eq!(m.problems(), vec![]);
}

#[test]
fn progress_counts_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::single(dir.path(), &fixtures::model_tensors());
    let total: u64 = ["model.safetensors", "config.json", "tokenizer.json"]
        .iter()
        .map(|f| std::fs::metadata(dir.path().join(f)).unwrap().len())
        .sum();
    let seen = std::sync::atomic::AtomicU64::new(0);
    publish(dir.path(), &options(4096), &|n| {
        seen.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(seen.into_inner(), total);
}

fn publish_err(dir: &std::path::Path) -> String {
    publish(dir, &options(4096), &|_| {})
        .unwrap_err()
        .to_string()
}

#[test]
fn corrupt_header_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::raw_safetensors(&dir.path().join("model.safetensors"), "{not json", 0);
    let err = publish_err(dir.path());
    assert!(
        err.contains("model.safetensors: not a valid safetensors file: header:"),
        "{err}"
    );
}

#[test]
fn offsets_beyond_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    fixtures::raw_safetensors(&dir.path().join("model.safetensors"), header, 8);
    let err = publish_err(dir.path());
    assert!(
        err.contains("describes 16 bytes of tensor data, but the file holds 8"),
        "{err}"
    );
}

#[test]
fn overlapping_tensors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    fixtures::raw_safetensors(&dir.path().join("model.safetensors"), header, 24);
    let err = publish_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("`b`"),
        "{err}"
    );
}

#[test]
fn unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"w":{"dtype":"F12","shape":[4],"data_offsets":[0,6]}}"#;
    fixtures::raw_safetensors(&dir.path().join("model.safetensors"), header, 6);
    let err = publish_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("F12"),
        "{err}"
    );
}

#[test]
fn truncated_file_and_impossible_header_length() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"abc").unwrap();
    assert!(publish_err(dir.path()).contains("too short"));
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    assert!(publish_err(dir.path()).contains("does not fit"));
}

#[test]
fn missing_shard_named_in_the_index() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::sharded(dir.path(), &fixtures::model_tensors(), 2);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = publish_err(dir.path());
    assert!(err.contains(hotweights::INDEX_FILE), "{err}");
    assert!(
        err.contains("names shard \"model-00002-of-00002.safetensors\""),
        "{err}"
    );
}

#[test]
fn index_that_disagrees_with_its_shards() {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<Tensor> = fixtures::model_tensors();
    fixtures::sharded(dir.path(), &tensors, 2);
    let index_path = dir.path().join(hotweights::INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors".into();
    index["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let err = publish_err(dir.path());
    assert!(err.contains("which does not hold it"), "{err}");
}

#[test]
fn a_tensor_in_two_shards() {
    let dir = tempfile::tempdir().unwrap();
    let t = vec![fixtures::tensor("w", Dtype::F32, &[8])];
    fixtures::write_safetensors(&dir.path().join("a.safetensors"), &t);
    fixtures::write_safetensors(&dir.path().join("b.safetensors"), &t);
    let err = publish(dir.path(), &options(4096), &|_| {}).unwrap_err();
    assert!(
        matches!(err, HotweightsError::DuplicateTensor { .. }),
        "{err}"
    );
}

#[test]
fn bad_options() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::single(dir.path(), &fixtures::model_tensors());
    assert!(publish(dir.path(), &options(0), &|_| {}).is_err());
    let unhashed = PublishOptions {
        hash: HashAlgorithm::Unspecified,
        ..options(4096)
    };
    assert!(publish(dir.path(), &unhashed, &|_| {}).is_err());
    assert!(
        publish(&dir.path().join("missing"), &options(4096), &|_| {})
            .unwrap_err()
            .to_string()
            .contains("missing")
    );
}

#[test]
fn shape_that_disagrees_with_offsets_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"w":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#;
    fixtures::raw_safetensors(&dir.path().join("model.safetensors"), header, 16);
    let err = publish_err(dir.path());
    assert!(
        err.ends_with(
            "tensor \"w\": shape [5] of F32 takes 20 bytes, but data_offsets [0, 16] hold 16"
        ),
        "{err}"
    );
}
