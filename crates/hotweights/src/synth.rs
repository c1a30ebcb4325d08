//! Generated safetensors checkpoints, for the demo, benchmarks and tests.
//!
//! A [`SynthModel`] is a list of named tensors shaped like a small decoder
//! (embedding, per-layer attention and MLP projections, norms, head), with
//! pseudo-random bf16/f32 contents derived from a seed. It is written with the
//! `safetensors` crate itself, sharded with a `model.safetensors.index.json`
//! and a `config.json`, so it exercises exactly the paths a real checkpoint
//! does. Its edits model what really happens between two versions:
//!
//! - [`SynthModel::nudge`]: an optimizer step, a small change to a share of
//!   the elements of every tensor (the RL case, where most bytes stay
//!   bit-identical);
//! - [`SynthModel::rewrite`]: a tensor replaced wholesale (a fine-tuned
//!   layer);
//! - [`SynthModel::add`] and [`SynthModel::remove`]: the architecture moved.

use std::path::Path;

pub use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::json;

use crate::checkpoint::INDEX_FILE;
use crate::error::{HotweightsError, Result};

/// One generated tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

/// A generated model: tensors in a fixed order.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthModel {
    /// The tensors; shards take consecutive runs of them.
    pub tensors: Vec<SynthTensor>,
}

impl SynthModel {
    /// A decoder-shaped model with `layers` layers of width `hidden` (bf16
    /// projections, f32 norms) and a vocabulary of `vocab`; contents derived
    /// from `seed`.
    pub fn decoder(layers: usize, hidden: usize, vocab: usize, seed: u64) -> SynthModel {
        let mut tensors = vec![random_tensor(
            "model.embed_tokens.weight",
            Dtype::BF16,
            &[vocab, hidden],
            seed,
        )];
        for l in 0..layers {
            let p = format!("model.layers.{l}");
            for (part, shape) in [
                ("self_attn.q_proj", [hidden, hidden]),
                ("self_attn.k_proj", [hidden / 4, hidden]),
                ("self_attn.v_proj", [hidden / 4, hidden]),
                ("self_attn.o_proj", [hidden, hidden]),
                ("mlp.gate_proj", [hidden * 2, hidden]),
                ("mlp.up_proj", [hidden * 2, hidden]),
                ("mlp.down_proj", [hidden, hidden * 2]),
            ] {
                tensors.push(random_tensor(
                    &format!("{p}.{part}.weight"),
                    Dtype::BF16,
                    &shape,
                    seed,
                ));
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                tensors.push(random_tensor(
                    &format!("{p}.{norm}.weight"),
                    Dtype::F32,
                    &[hidden],
                    seed,
                ));
            }
        }
        tensors.push(random_tensor(
            "model.norm.weight",
            Dtype::F32,
            &[hidden],
            seed,
        ));
        tensors.push(random_tensor(
            "lm_head.weight",
            Dtype::BF16,
            &[vocab, hidden],
            seed,
        ));
        SynthModel { tensors }
    }

    /// Total tensor bytes.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.len() as u64).sum()
    }

    /// An optimizer-like step: in every tensor, about `fraction` of the
    /// elements get their lowest mantissa bits changed. Returns the number
    /// of elements changed.
    pub fn nudge(&mut self, fraction: f64, seed: u64) -> u64 {
        self.nudge_where(fraction, seed, |_| true)
    }

    /// [`SynthModel::nudge`] for the tensors whose name passes `select`.
    pub fn nudge_where(&mut self, fraction: f64, seed: u64, select: impl Fn(&str) -> bool) -> u64 {
        let mut rng = XorShift::new(seed);
        let mut changed = 0;
        for t in self.tensors.iter_mut().filter(|t| select(&t.name)) {
            let width = t.dtype.bitsize() / 8;
            let elements = t.data.len() / width.max(1);
            let count = (elements as f64 * fraction).round() as usize;
            for _ in 0..count {
                let e = (rng.next() % elements as u64) as usize;
                // The lowest byte of a little-endian element holds its
                // lowest mantissa bits: a small relative change.
                t.data[e * width] ^= (rng.next() as u8 & 0x7) | 1;
                changed += 1;
            }
        }
        changed
    }

    /// Replaces the contents of tensor `name` with new random bytes; false
    /// if there is no such tensor.
    pub fn rewrite(&mut self, name: &str, seed: u64) -> bool {
        match self.tensors.iter_mut().find(|t| t.name == name) {
            Some(t) => {
                fill(&mut t.data, &t.name, seed);
                true
            }
            None => false,
        }
    }

    /// Appends a random tensor.
    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], seed: u64) {
        self.tensors.push(random_tensor(name, dtype, shape, seed));
    }

    /// Removes tensor `name`; false if there is no such tensor.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        self.tensors.len() < before
    }

    /// Writes the model to `dir` (created) as `shards` safetensors files
    /// of consecutive tensors, with an index file when `shards` > 1, and a
    /// `config.json`.
    pub fn write(&self, dir: &Path, shards: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| HotweightsError::io(dir, e))?;
        let shards = shards.clamp(1, self.tensors.len().max(1));
        // Exactly `shards` runs: the first `len % shards` take one more
        // tensor, so no shard named "-of-N" is missing.
        let (per, extra) = (self.tensors.len() / shards, self.tensors.len() % shards);
        let mut weight_map = serde_json::Map::new();
        let mut start = 0;
        for s in 0..shards {
            let end = (start + per + usize::from(s < extra)).min(self.tensors.len());
            let group = &self.tensors[start..end];
            start = end;
            let name = if shards == 1 {
                "model.safetensors".to_owned()
            } else {
                format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
            };
            let views = group
                .iter()
                .map(|t| {
                    TensorView::new(t.dtype, t.shape.clone(), &t.data)
                        .map(|v| (t.name.clone(), v))
                        .map_err(|e| HotweightsError::Option(format!("tensor {:?}: {e}", t.name)))
                })
                .collect::<Result<Vec<_>>>()?;
            let path = dir.join(&name);
            safetensors::serialize_to_file(views, None, &path).map_err(|e| {
                HotweightsError::Safetensors {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            for t in group {
                weight_map.insert(t.name.clone(), json!(name));
            }
        }
        if shards > 1 {
            let index = json!({"metadata": {"total_size": self.bytes()}, "weight_map": weight_map});
            write_json(&dir.join(INDEX_FILE), &index)?;
        }
        write_json(
            &dir.join("config.json"),
            &json!({"architectures": ["SynthForCausalLM"], "num_tensors": self.tensors.len(), "torch_dtype": "bfloat16"}),
        )
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| HotweightsError::Option(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| HotweightsError::io(path, e))
}

fn random_tensor(name: &str, dtype: Dtype, shape: &[usize], seed: u64) -> SynthTensor {
    let elements: usize = shape.iter().product();
    let mut data = vec![0u8; elements * dtype.bitsize() / 8];
    fill(&mut data, name, seed);
    SynthTensor {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// Deterministic bytes from (name, seed): BLAKE3's output stream, which is
/// fast enough to fill gigabytes.
fn fill(data: &mut [u8], name: &str, seed: u64) {
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .update(name.as_bytes())
        .finalize_xof()
        .fill(data);
}

/// xorshift64*: a tiny deterministic generator for picking elements.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
