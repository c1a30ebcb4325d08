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
