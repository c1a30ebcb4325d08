//! Real safetensors checkpoints, written by the safetensors crate itself:
//! single-file and sharded with an index, plus other files.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// One tensor to write.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// `len` bytes derived from `seed`.
pub fn bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A tensor whose bytes are derived from its name.
pub fn tensor(name: &str, dtype: Dtype, shape: &[usize]) -> Tensor {
    let elements: usize = shape.iter().product();
    let len = elements * dtype.bitsize() / 8;
    Tensor {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data: bytes(name, len),
    }
}

/// Writes one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A small model's tensors: embedding, two layers, head; BF16 and F32.
pub fn model_tensors() -> Vec<Tensor> {
    let mut t = vec![tensor("model.embed_tokens.weight", Dtype::BF16, &[256, 64])];
    for layer in 0..2 {
        for (part, shape) in [
            ("self_attn.qkv_proj", [192, 64]),
            ("mlp.up_proj", [128, 64]),
        ] {
            t.push(tensor(
                &format!("model.layers.{layer}.{part}.weight"),
                Dtype::BF16,
                &shape,
            ));
        }
        t.push(tensor(
            &format!("model.layers.{layer}.input_layernorm.weight"),
            Dtype::F32,
            &[64],
        ));
    }
    t.push(tensor("lm_head.weight", Dtype::BF16, &[256, 64]));
    t
}

/// Writes config.json and tokenizer.json, the non-tensor files.
pub fn write_other_files(dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        br#"{"model_type": "llama", "hidden_size": 64}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), bytes("tokenizer", 3000)).unwrap();
}

/// A single-file checkpoint: model.safetensors plus other files.
pub fn single(dir: &Path, tensors: &[Tensor]) {
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors);
    write_other_files(dir);
}

/// A sharded checkpoint: `shards` files and model.safetensors.index.json.
pub fn sharded(dir: &Path, tensors: &[Tensor], shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut weight_map = BTreeMap::new();
    for s in 0..shards {
        let name = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let part: Vec<Tensor> = tensors.iter().skip(s).step_by(shards).cloned().collect();
        for t in &part {
            weight_map.insert(t.name.clone(), name.clone());
        }
        write_safetensors(&dir.join(&name), &part);
    }
    let total: usize = tensors.iter().map(|t| t.data.len()).sum();
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(
        dir.join(hotweights::INDEX_FILE),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    write_other_files(dir);
}

/// Writes a safetensors file with a hand-made header over `data_len` bytes of data.
pub fn raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(bytes("raw", data_len));
    std::fs::write(path, out).unwrap();
}

/// The model id generated checkpoints are published under (by default a
/// manifest takes its directory's name, which differs between versions).
pub const MODEL_ID: &str = "synth";

/// Writes `model` to `dir` in `shards` shards and publishes it as `version`
/// of [`MODEL_ID`] with `chunk_bytes`-byte chunks.
pub fn write_and_publish(
    model: &hotweights::synth::SynthModel,
    dir: &Path,
    shards: usize,
    version: &str,
    chunk_bytes: u64,
) -> bstack_plan::WeightManifest {
    model.write(dir, shards).unwrap();
    publish_as(dir, version, chunk_bytes)
}

/// Publishes `dir` as `version` of [`MODEL_ID`].
pub fn publish_as(dir: &Path, version: &str, chunk_bytes: u64) -> bstack_plan::WeightManifest {
    let options = hotweights::PublishOptions {
        model_id: Some(MODEL_ID.into()),
        chunk_bytes,
        ..hotweights::PublishOptions::new(version)
    };
    hotweights::publish(dir, &options, &|_| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// Every file under `dir`, by path relative to it, with its bytes.
pub fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Asserts that two directories hold the same files with the same bytes.
pub fn assert_same_tree(actual: &Path, expected: &Path) {
    let (a, e) = (read_tree(actual), read_tree(expected));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        e.keys().collect::<Vec<_>>(),
        "{} and {} hold different files",
        actual.display(),
        expected.display()
    );
    for (name, bytes) in &e {
        assert!(
            a[name] == *bytes,
            "{name} differs between {} and {}",
            actual.display(),
            expected.display()
        );
    }
    assert!(!e.is_empty());
}
