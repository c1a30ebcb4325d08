//! Typed artifact keys and their canonical encoding.
//!
//! The stores this crate replaces built keys by joining strings, and two
//! things went wrong: a KV chunk of tensor-parallel rank 0 and the same
//! chunk of rank 1 got one key (ranks overwrote each other's blocks), and a
//! name containing the separator could spell another key. Here a key is a
//! typed value, [`ArtifactKey`], and every tier stores it under its
//! canonical encoding ([`ArtifactKey::encode`]), which is *injective*: two
//! different keys never encode to the same bytes.
//!
//! # The encoding (format 1)
//!
//! ```text
//! byte 0        format version, 1
//! byte 1        kind: 1 KvChunk, 2 ParamChunk, 3 Custom
//! then the kind's fields in order:
//!   string, bytes   u16 big-endian length, then the bytes (UTF-8 for strings)
//!   optional string 0 (absent) or 1 followed by the string
//!   u32, u64        big-endian
//!   layers          0 (bundle of all layers) or 1 followed by the layer (u32)
//! ```
//!
//! Every field is self-delimiting and the kind comes first, so the encoding
//! is prefix-free: it decodes back to exactly one key, and decoding checks
//! that no byte is left over. [`ArtifactKey::digest`] is the BLAKE3 hash of
//! the encoding, a fixed-size name for file and remote stores.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The format version written as the first byte of every encoding.
pub const FORMAT: u8 = 1;

/// The key of one stored object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKey {
    /// A chunk of KV cache.
    KvChunk(KvChunkKey),
    /// A chunk of a model's parameters.
    ParamChunk(ParamChunkKey),
    /// Anything else, named by the caller.
    Custom(CustomKey),
}

/// Which layers a KV chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layers {
    /// One layer.
    One(u32),
    /// All layers of the chunk, stored together.
    Bundle,
}

/// A chunk of KV cache: the tokens of one prefix block, for one model
/// configuration and one tensor-parallel rank.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KvChunkKey {
    /// Model name.
    pub model: String,
    /// LoRA adapter id, when one is applied: the same tokens give other KV.
    pub adapter: Option<String>,
    /// KV element type, e.g. `bf16`, `fp8_e4m3`.
    pub kv_dtype: String,
    /// Tensor-parallel size.
    pub tp_size: u32,
    /// Tensor-parallel rank, below `tp_size`: each rank holds its heads.
    pub rank: u32,
    /// Chained hash of the chunk's prefix (the hash of its tokens and of
    /// every chunk before it), as the engine computes it.
    pub prefix_hash: Vec<u8>,
    /// The layer, or all of them.
    pub layers: Layers,
}

/// A chunk of a model's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ParamChunkKey {
    /// Model name.
    pub model: String,
    /// Revision (version) of the weights.
    pub revision: String,
    /// Tensor name.
    pub tensor: String,
    /// Chunk index within the tensor.
    pub chunk: u64,
}

/// A caller-named object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CustomKey {
    /// Namespace, so that two applications never meet.
    pub namespace: String,
    /// Name within the namespace.
    pub name: String,
}

const KIND_KV: u8 = 1;
const KIND_PARAM: u8 = 2;
const KIND_CUSTOM: u8 = 3;

impl ArtifactKey {
    /// The canonical encoding (see the module documentation). Fails when a
    /// field is longer than 65,535 bytes or a rank is not below its
    /// tensor-parallel size.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut w = Writer(Vec::with_capacity(64));
        w.0.push(FORMAT);
        match self {
            ArtifactKey::KvChunk(k) => {
                if k.tp_size == 0 || k.rank >= k.tp_size {
                    return Err(Error::Key {
                        field: "rank",
                        message: format!(
                            "rank {} is not below the tensor-parallel size {}",
                            k.rank, k.tp_size
                        ),
                    });
                }
                w.0.push(KIND_KV);
                w.bytes("model", k.model.as_bytes())?;
                match &k.adapter {
                    None => w.0.push(0),
                    Some(a) => {
                        w.0.push(1);
                        w.bytes("adapter", a.as_bytes())?;
                    }
                }
                w.bytes("kv_dtype", k.kv_dtype.as_bytes())?;
                w.0.extend(k.tp_size.to_be_bytes());
                w.0.extend(k.rank.to_be_bytes());
                w.bytes("prefix_hash", &k.prefix_hash)?;
                match k.layers {
                    Layers::Bundle => w.0.push(0),
                    Layers::One(l) => {
                        w.0.push(1);
                        w.0.extend(l.to_be_bytes());
                    }
                }
            }
            ArtifactKey::ParamChunk(k) => {
                w.0.push(KIND_PARAM);
                w.bytes("model", k.model.as_bytes())?;
                w.bytes("revision", k.revision.as_bytes())?;
                w.bytes("tensor", k.tensor.as_bytes())?;
                w.0.extend(k.chunk.to_be_bytes());
            }
            ArtifactKey::Custom(k) => {
                w.0.push(KIND_CUSTOM);
                w.bytes("namespace", k.namespace.as_bytes())?;
                w.bytes("name", k.name.as_bytes())?;
            }
        }
        Ok(w.0)
    }

    /// The key whose canonical encoding `bytes` is; the error gives the
    /// byte offset where the bytes stop being one.
    pub fn decode(bytes: &[u8]) -> Result<ArtifactKey> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8("the format version")?;
        if version != FORMAT {
            return Err(r.fail(format!("format {version}, expected {FORMAT}")));
        }
        let key = match r.u8("the kind")? {
            KIND_KV => {
                let model = r.string("model")?;
                let adapter = match r.u8("the adapter flag")? {
                    0 => None,
                    1 => Some(r.string("adapter")?),
                    other => return Err(r.fail(format!("adapter flag {other}, expected 0 or 1"))),
                };
                let kv_dtype = r.string("kv_dtype")?;
                let tp_size = r.u32("tp_size")?;
                let rank = r.u32("rank")?;
                if tp_size == 0 || rank >= tp_size {
                    return Err(r.fail(format!("rank {rank} not below tp_size {tp_size}")));
                }
                let prefix_hash = r.bytes("prefix_hash")?.to_vec();
                let layers = match r.u8("the layers flag")? {
                    0 => Layers::Bundle,
                    1 => Layers::One(r.u32("layer")?),
                    other => return Err(r.fail(format!("layers flag {other}, expected 0 or 1"))),
                };
                ArtifactKey::KvChunk(KvChunkKey {
                    model,
                    adapter,
                    kv_dtype,
                    tp_size,
                    rank,
                    prefix_hash,
                    layers,
                })
            }
            KIND_PARAM => ArtifactKey::ParamChunk(ParamChunkKey {
                model: r.string("model")?,
                revision: r.string("revision")?,
                tensor: r.string("tensor")?,
                chunk: r.u64("chunk")?,
            }),
            KIND_CUSTOM => ArtifactKey::Custom(CustomKey {
                namespace: r.string("namespace")?,
                name: r.string("name")?,
            }),
            other => return Err(r.fail(format!("kind {other}, expected 1, 2 or 3"))),
        };
        if r.at != bytes.len() {
            return Err(r.fail(format!(
                "{} bytes past the end of the key",
                bytes.len() - r.at
            )));
        }
        Ok(key)
    }

    /// BLAKE3 of the canonical encoding: a fixed-size, collision-resistant
    /// name for stores that need one (file names, remote keys).
    pub fn digest(&self) -> Result<[u8; 32]> {
        Ok(*blake3::hash(&self.encode()?).as_bytes())
    }
}

/// Human-readable and unambiguous for the usual names, but not canonical:
/// a name may contain `/`. Stores use [`ArtifactKey::encode`].
impl fmt::Display for ArtifactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactKey::KvChunk(k) => {
                write!(f, "kv/{}", k.model)?;
                if let Some(a) = &k.adapter {
                    write!(f, "@{a}")?;
                }
                write!(f, "/{}/tp{}.r{}/", k.kv_dtype, k.tp_size, k.rank)?;
                for b in &k.prefix_hash {
                    write!(f, "{b:02x}")?;
                }
                match k.layers {
                    Layers::One(l) => write!(f, "/layer{l}"),
                    Layers::Bundle => write!(f, "/bundle"),
                }
            }
            ArtifactKey::ParamChunk(k) => {
                write!(
                    f,
                    "param/{}@{}/{}#{}",
                    k.model, k.revision, k.tensor, k.chunk
                )
            }
            ArtifactKey::Custom(k) => write!(f, "custom/{}/{}", k.namespace, k.name),
        }
    }
}

/// Parses the text form that [`fmt::Display`] prints, for command lines:
///
/// - `custom/NAMESPACE/NAME` (the name may contain `/`);
/// - `param/MODEL@REVISION/TENSOR#CHUNK`;
/// - `kv/MODEL[@ADAPTER]/KV_DTYPE/tpSIZE.rRANK/PREFIX_HASH_HEX/(layerN|bundle)`
///   (the model may contain `/`).
impl std::str::FromStr for ArtifactKey {
    type Err = Error;

    fn from_str(text: &str) -> Result<ArtifactKey> {
        let fail = |message: String| Error::Key {
            field: "key",
            message: format!("{text:?}: {message}"),
        };
        let forms = "expected custom/NAMESPACE/NAME, param/MODEL@REVISION/TENSOR#CHUNK or \
                     kv/MODEL[@ADAPTER]/DTYPE/tpN.rR/HEX/layerN";
        let (kind, rest) = text.split_once('/').ok_or_else(|| fail(forms.to_owned()))?;
        match kind {
            "custom" => {
                let (namespace, name) = rest
                    .split_once('/')
                    .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                    .ok_or_else(|| fail("expected custom/NAMESPACE/NAME".into()))?;
                Ok(ArtifactKey::Custom(CustomKey {
                    namespace: namespace.into(),
                    name: name.into(),
                }))
            }
            "param" => {
                let bad = || fail("expected param/MODEL@REVISION/TENSOR#CHUNK".into());
                let (head, chunk) = rest.rsplit_once('#').ok_or_else(bad)?;
                let chunk = chunk.parse().map_err(|_| bad())?;
                let (model, after) = head.split_once('@').ok_or_else(bad)?;
                let (revision, tensor) = after.split_once('/').ok_or_else(bad)?;
                Ok(ArtifactKey::ParamChunk(ParamChunkKey {
                    model: model.into(),
                    revision: revision.into(),
                    tensor: tensor.into(),
                    chunk,
                }))
            }
            "kv" => {
                let bad = |what: &str| {
                    fail(format!(
                        "{what}; expected kv/MODEL[@ADAPTER]/DTYPE/tpN.rR/HEX/layerN"
                    ))
                };
                let mut parts = rest.rsplitn(5, '/');
                let (Some(layers), Some(hash), Some(tp), Some(dtype), Some(model)) = (
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                ) else {
                    return Err(bad("too few parts"));
                };
                let layers = match layers {
                    "bundle" => Layers::Bundle,
                    l => Layers::One(
                        l.strip_prefix("layer")
                            .and_then(|n| n.parse().ok())
                            .ok_or_else(|| bad("the last part must be layerN or bundle"))?,
                    ),
                };
                if hash.len() % 2 != 0 {
                    return Err(bad("the prefix hash must be an even number of hex digits"));
                }
                let prefix_hash = (0..hash.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hash[i..i + 2], 16))
                    .collect::<std::result::Result<Vec<u8>, _>>()
                    .map_err(|_| bad("the prefix hash must be hex"))?;
                let (tp_size, rank) = tp
                    .strip_prefix("tp")
                    .and_then(|t| t.split_once(".r"))
                    .and_then(|(s, r)| Some((s.parse().ok()?, r.parse().ok()?)))
                    .ok_or_else(|| bad("the tensor-parallel part must read tpN.rR"))?;
                let (model, adapter) = match model.split_once('@') {
                    Some((m, a)) => (m, Some(a.to_owned())),
                    None => (model, None),
                };
                let key = ArtifactKey::KvChunk(KvChunkKey {
                    model: model.into(),
                    adapter,
                    kv_dtype: dtype.into(),
                    tp_size,
                    rank,
                    prefix_hash,
                    layers,
                });
                // Rank below size, field lengths: the encoding's checks.
                key.encode()?;
                Ok(key)
            }
            other => Err(fail(format!("unknown kind {other:?}; {forms}"))),
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, field: &'static str, b: &[u8]) -> Result<()> {
        let len = u16::try_from(b.len()).map_err(|_| Error::Key {
            field,
            message: format!("{} bytes; at most {}", b.len(), u16::MAX),
        })?;
        self.0.extend(len.to_be_bytes());
        self.0.extend_from_slice(b);
        Ok(())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn fail(&self, message: String) -> Error {
        Error::Decode {
            offset: self.at,
            message,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let out = &self.bytes[self.at..end];
                self.at = end;
                Ok(out)
            }
            None => Err(self.fail(format!(
                "{what} needs {n} bytes, {} left",
                self.bytes.len() - self.at
            ))),
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.take(2, what)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        self.take(len, what)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let start = self.at;
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::Decode {
            offset: start,
            message: format!("{what} is not UTF-8"),
        })
    }
}
