//! Contract documents: any contract, in either form, in memory or in a file.
//!
//! A [`Document`] is one top-level contract value. It reads from and writes to
//! JSON (self-describing: the `kind` key says which contract) and protobuf
//! (compact, but not self-describing: the caller, or the file name, says which
//! contract). Files are replaced atomically, so a failed write leaves the
//! previous file intact.

use std::fmt;
use std::io::Write;
use std::path::Path;

use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{PlanError, Result};
use crate::json;
use crate::validate::{Problem, Validate};
use crate::{CachePlan, SCHEMA_VERSION, SwapPlan, SwapWindow, WaveSpec, WeightManifest};

/// Which contract a document holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContractKind {
    /// [`WeightManifest`].
    WeightManifest,
    /// [`CachePlan`].
    CachePlan,
    /// [`SwapWindow`].
    SwapWindow,
    /// [`SwapPlan`].
    SwapPlan,
    /// [`WaveSpec`].
    WaveSpec,
}

impl ContractKind {
    /// Every contract kind.
    pub const ALL: [ContractKind; 5] = [
        ContractKind::WeightManifest,
        ContractKind::CachePlan,
        ContractKind::SwapWindow,
        ContractKind::SwapPlan,
        ContractKind::WaveSpec,
    ];

    /// The name used as JSON `kind` and in file names (`cache_plan`).
    pub fn name(self) -> &'static str {
        match self {
            ContractKind::WeightManifest => "weight_manifest",
            ContractKind::CachePlan => "cache_plan",
            ContractKind::SwapWindow => "swap_window",
            ContractKind::SwapPlan => "swap_plan",
            ContractKind::WaveSpec => "wave_spec",
        }
    }

    /// Parses a kind name; `-` and `_` are interchangeable (`cache-plan`).
    pub fn from_name(name: &str) -> Option<ContractKind> {
        let name = name.replace('-', "_");
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind named in a file name (`plan.cache_plan.pb`, `v2-manifest.bin`), if any.
    pub fn from_file_name(path: &Path) -> Option<ContractKind> {
        let name = path
            .file_name()?
            .to_string_lossy()
            .to_lowercase()
            .replace('-', "_");
        Self::ALL
            .into_iter()
            .find(|k| name.contains(k.name()))
            .or_else(|| {
                name.contains("manifest")
                    .then_some(ContractKind::WeightManifest)
            })
    }

    /// All names, for messages.
    pub fn names() -> String {
        Self::ALL.map(ContractKind::name).join(", ")
    }
}

impl fmt::Display for ContractKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The two encodings of a contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Pretty JSON with `kind` and `schema_version`.
    Json,
    /// Protobuf binary.
    Proto,
}

impl Format {
    /// Tells the format of a file from its extension (`.json`; `.pb`,
    /// `.binpb`, `.bin`), or else from its content: JSON if it is UTF-8 text
    /// whose first non-blank character is `{`, protobuf otherwise (a protobuf
    /// message may well start with bytes that look like blanks and a brace).
    pub fn detect(path: &Path, bytes: &[u8]) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Format::Json,
            Some("pb" | "binpb" | "bin") => Format::Proto,
            _ => match std::str::from_utf8(bytes) {
                Ok(text)
                    if text
                        .trim_start_matches('\u{feff}')
                        .trim_start()
                        .starts_with('{') =>
                {
                    Format::Json
                }
                _ => Format::Proto,
            },
        }
    }
}

/// Behaviour shared by the top-level contracts.
pub trait Contract:
    Message + Default + Clone + Serialize + DeserializeOwned + Validate + Sized
{
    /// Which contract this is.
    const KIND: ContractKind;
    /// The value's `schema_version` field.
    fn schema_version(&self) -> u32;
    /// The value's `schema_version` field, to set it.
    fn schema_version_mut(&mut self) -> &mut u32;
    /// Wraps the value in a [`Document`].
    fn into_document(self) -> Document;
    /// Unwraps a document of this kind; `None` for another kind.
    fn from_document(doc: Document) -> Option<Self>;

    /// Decodes protobuf bytes. An absent `schema_version` (0, as in messages of
    /// the earlier `bw.stack` format) reads as version 1.
    fn decode_proto(bytes: &[u8], origin: &str) -> Result<Self> {
        let mut value = Self::decode(bytes).map_err(|source| PlanError::Proto {
            origin: origin.to_owned(),
            kind: Self::KIND.name(),
            source,
        })?;
        let version = value.schema_version_mut();
        match *version {
            0 => *version = SCHEMA_VERSION,
            v if v == SCHEMA_VERSION => {}
            v => {
                return Err(PlanError::SchemaVersion {
                    origin: origin.to_owned(),
                    found: v.into(),
                    supported: SCHEMA_VERSION,
                });
            }
        }
        Ok(value)
    }

    /// Parses the JSON form; the document's `kind` must be this contract.
    fn from_json(text: &str, origin: &str) -> Result<Self> {
        let doc = Document::from_json(text, origin)?;
        let found = doc.kind();
        Self::from_document(doc).ok_or_else(|| PlanError::KindMismatch {
            origin: origin.to_owned(),
            found: found.name(),
            expected: Self::KIND.name(),
        })
    }

    /// The JSON form: pretty, `kind` first, ending in a newline. A value
    /// whose `schema_version` is 0 (unset) is written as the current version,
    /// as protobuf decoding reads it.
    fn to_json(&self) -> String {
        if self.schema_version() == 0 {
            let mut current = self.clone();
            *current.schema_version_mut() = SCHEMA_VERSION;
            return json::write_document(Self::KIND.name(), &current);
        }
        json::write_document(Self::KIND.name(), self)
    }

    /// The encoding in `format`.
    fn encode_as(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => self.to_json().into_bytes(),
            Format::Proto => self.encode_to_vec(),
        }
    }

    /// Writes the value to `path` in `format`, atomically: the file is
    /// either the previous one or the complete new one, never a part.
    fn write(&self, path: &Path, format: Format) -> Result<()> {
        write_atomic(path, &self.encode_as(format))
    }
}

macro_rules! contracts {
    ($($ty:ident),* $(,)?) => {
        /// Any top-level contract value.
        // Documents are few and short-lived; boxing the larger variants
        // would cost every user an indirection and buy nothing.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, PartialEq)]
        pub enum Document {
            $(
                #[doc = concat!("A [`", stringify!($ty), "`].")]
                $ty($ty),
            )*
        }

        $(
            impl Contract for $ty {
                const KIND: ContractKind = ContractKind::$ty;
                                fn schema_version(&self) -> u32 {
                    self.schema_version
                }
                fn schema_version_mut(&mut self) -> &mut u32 {
                    &mut self.schema_version
                }
                fn into_document(self) -> Document {
                    Document::$ty(self)
                }
                fn from_document(doc: Document) -> Option<Self> {
                    match doc {
                        Document::$ty(v) => Some(v),
                        _ => None,
                    }
                }
            }
        )*

        impl Document {
            /// Which contract this is.
            pub fn kind(&self) -> ContractKind {
                match self { $(Document::$ty(_) => ContractKind::$ty,)* }
            }

            /// Every problem found by the contract's `validate()`.
            pub fn problems(&self) -> Vec<Problem> {
                match self { $(Document::$ty(v) => v.problems(),)* }
            }

            /// The protobuf encoding.
            pub fn to_proto(&self) -> Vec<u8> {
                match self { $(Document::$ty(v) => v.encode_to_vec(),)* }
            }

                        /// The JSON form: pretty, `kind` first, ending in a newline.
            pub fn to_json(&self) -> String {
                match self { $(Document::$ty(v) => v.to_json(),)* }
            }

            /// The encoding in `format`.
            pub fn encode(&self, format: Format) -> Vec<u8> {
                match self { $(Document::$ty(v) => v.encode_as(format),)* }
            }

            /// Decodes protobuf bytes holding a `kind` contract.
            pub fn from_proto(kind: ContractKind, bytes: &[u8], origin: &str) -> Result<Document> {
                match kind { $(ContractKind::$ty => $ty::decode_proto(bytes, origin).map(Document::$ty),)* }
            }

            fn parse_json_body(kind: ContractKind, text: &str, origin: &str) -> Result<Document> {
                match kind { $(ContractKind::$ty => json::read_body::<$ty>(text, origin).map(Document::$ty),)* }
            }
        }
    };
}

contracts!(WeightManifest, CachePlan, SwapWindow, SwapPlan, WaveSpec);

impl Document {
    /// Parses a JSON document, whose `kind` says which contract it holds and
    /// whose `schema_version` must be one this build reads.
    pub fn from_json(text: &str, origin: &str) -> Result<Document> {
        if !text.trim_start().starts_with('{') {
            return Err(PlanError::Json {
                origin: origin.to_owned(),
                path: ".".to_owned(),
                line: 0,
                column: 0,
                message: "expected a JSON object with \"kind\" and \"schema_version\"".to_owned(),
            });
        }
        let header = json::read_header(text, origin)?;
        let kind_error = |message: String| PlanError::Kind {
            origin: origin.to_owned(),
            message,
        };
        let kind = match header.kind {
            None => {
                return Err(kind_error(format!(
                    "missing; expected one of {}",
                    ContractKind::names()
                )));
            }
            Some(name) => ContractKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    kind_error(format!(
                        "unknown contract {name:?}; expected one of {}",
                        ContractKind::names()
                    ))
                })?,
        };
        match header.schema_version {
            Some(v) if v == u64::from(SCHEMA_VERSION) => {}
            found => {
                return Err(PlanError::SchemaVersion {
                    origin: origin.to_owned(),
                    found: found.unwrap_or(0),
                    supported: SCHEMA_VERSION,
                });
            }
        }
        Self::parse_json_body(kind, text, origin)
    }

    /// Reads a contract file in either format. `kind` is required for a
    /// protobuf file whose name does not contain the contract's name, and if
    /// given for a JSON file, must match its `kind`.
    pub fn read(path: &Path, kind: Option<ContractKind>) -> Result<Document> {
        let origin = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| PlanError::Io {
            origin: origin.clone(),
            source,
        })?;
        Self::from_bytes(
            &bytes,
            Format::detect(path, &bytes),
            kind.or_else(|| ContractKind::from_file_name(path)),
            &origin,
        )
        .and_then(|doc| match kind {
            Some(expected) if doc.kind() != expected => Err(PlanError::KindMismatch {
                origin: origin.clone(),
                found: doc.kind().name(),
                expected: expected.name(),
            }),
            _ => Ok(doc),
        })
    }

    /// Parses bytes in `format`; `kind` is needed for protobuf.
    pub fn from_bytes(
        bytes: &[u8],
        format: Format,
        kind: Option<ContractKind>,
        origin: &str,
    ) -> Result<Document> {
        match format {
            Format::Json => {
                let text = std::str::from_utf8(bytes).map_err(|e| PlanError::Json {
                    origin: origin.to_owned(),
                    path: ".".to_owned(),
                    line: 0,
                    column: 0,
                    message: format!(
                        "not UTF-8 text (byte {}); is this a protobuf file?",
                        e.valid_up_to()
                    ),
                })?;
                Document::from_json(text.trim_start_matches('\u{feff}'), origin)
            }
            Format::Proto => {
                let kind = kind.ok_or_else(|| PlanError::UnknownProtoKind {
                    origin: origin.to_owned(),
                    names: ContractKind::names(),
                })?;
                Document::from_proto(kind, bytes, origin)
            }
        }
    }

    /// Writes the document to `path` in `format`, atomically: the file is
    /// either the previous one or the complete new one, never a part.
    pub fn write(&self, path: &Path, format: Format) -> Result<()> {
        write_atomic(path, &self.encode(format))
    }
}

/// Replaces `path` with `bytes` through a temporary file in the same directory.
///
/// The new file gets the permissions of the file it replaces, or those a plain
/// `create` would give (0666 less the umask); temporary files alone would be
/// 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let origin = path.display().to_string();
    let io = |e: std::io::Error| PlanError::Io {
        origin: origin.clone(),
        source: without_temp_path(e),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir).map_err(io)?;
    if let Ok(existing) = std::fs::metadata(path) {
        tmp.as_file()
            .set_permissions(existing.permissions())
            .map_err(io)?;
    }
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// tempfile's errors name the temporary file, which the user never sees:
/// they read "{cause} at path {temporary:?}". Keep the cause only.
fn without_temp_path(e: std::io::Error) -> std::io::Error {
    let text = e.to_string();
    match text.split_once(" at path ") {
        Some((cause, _)) => std::io::Error::new(e.kind(), cause.to_owned()),
        None => e,
    }
}

impl CachePlan {
    /// The share of a cluster-wide plan that the store of `node` executes:
    /// the operations whose destination is a tier of that node (a copy is
    /// carried out where the bytes land, so a remote fetch belongs to the
    /// node that receives it), and the prefetch, evict and admit entries
    /// located on it. The window is kept; the id gains `@node`.
    ///
    /// Splitting by node partitions the plan: every operation whose
    /// destination is a `tier://` address, and every page entry with a
    /// `tier://` location, lands in exactly one node's share.
    pub fn for_node(&self, node: &str) -> CachePlan {
        let here = |address: &str| {
            matches!(address.parse::<crate::Address>(),
                Ok(crate::Address::Tier { node: n, .. }) if n == node)
        };
        let pages = |refs: &[crate::KvPageRef]| -> Vec<crate::KvPageRef> {
            refs.iter().filter(|r| here(&r.location)).cloned().collect()
        };
        CachePlan {
            schema_version: self.schema_version,
            plan_id: format!("{}@{node}", self.plan_id),
            ops: self.ops.iter().filter(|o| here(&o.dst)).cloned().collect(),
            prefetch: pages(&self.prefetch),
            evict: pages(&self.evict),
            admit: pages(&self.admit),
            window: self.window,
        }
    }
}

impl WeightManifest {
    /// Bytes of every entry, tensors and files: the checkpoint's size.
    pub fn total_bytes(&self) -> u64 {
        let tensors = self.tensors.iter().map(|t| t.length);
        let files = self.files.iter().map(|f| f.length);
        tensors.chain(files).fold(0, u64::saturating_add)
    }

    /// Chunks of every entry, tensors and files.
    pub fn chunk_count(&self) -> u64 {
        let tensors = self.tensors.iter().map(|t| t.chunks.len() as u64);
        let files = self.files.iter().map(|f| f.chunks.len() as u64);
        tensors.chain(files).sum()
    }
}

impl SwapPlan {
    /// The digest of this plan: `blake3:` and the hex BLAKE3 of its protobuf
    /// encoding with `digest` empty. Any change to any field changes it.
    pub fn compute_digest(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        self.unsealed_encoding(&mut |piece| {
            // Long-list pieces are megabytes: hash them on all cores. Below
            // 128 KiB, threads cost more than they save.
            if piece.len() >= 128 << 10 {
                hasher.update_rayon(piece);
            } else {
                hasher.update(piece);
            }
        });
        format!("blake3:{}", hasher.finalize().to_hex())
    }

    /// Feeds `sink` the protobuf encoding of this plan with `digest` empty
    /// and `schema_version` current, in consecutive pieces.
    ///
    /// A plan for a million-chunk model encodes to a hundred megabytes and
    /// more, so its long lists are encoded in parallel, a window of pieces at
    /// a time into reused buffers: no hundred-megabyte allocation, no page
    /// faults after the first window. The pieces are byte for byte what
    /// `encode_to_vec` would write: prost writes fields in tag order, a
    /// repeated message field is its elements' (key, length, body) one after
    /// another, and the lists split here (`tensors` = 7 of a manifest; `ops`
    /// = 4 and `buckets` = 6 of a plan) are followed only by fields re-encoded
    /// after them. A property test holds this to the plain encoding.
    fn unsealed_encoding(&self, sink: &mut dyn FnMut(&[u8])) {
        use prost::encoding::{self, WireType};

        let mut buffers = Buffers::default();
        let mut head = Vec::new();
        if !self.plan_id.is_empty() {
            encoding::string::encode(1, &self.plan_id, &mut head);
        }
        for (tag, manifest) in [(2, &self.from), (3, &self.to)] {
            let Some(m) = manifest else { continue };
            // Fields 1-6 (files included), `tensors` (7), `schema_version` (15).
            let fields = WeightManifest {
                schema_version: 0,
                model_id: m.model_id.clone(),
                version: m.version.clone(),
                files: m.files.clone(),
                hash_algorithm: m.hash_algorithm,
                created_unix_ms: m.created_unix_ms,
                chunk_bytes: m.chunk_bytes,
                tensors: Vec::new(),
            };
            let fields = fields.encode_to_vec();
            let mut tail = Vec::new();
            if m.schema_version != 0 {
                encoding::uint32::encode(15, &m.schema_version, &mut tail);
            }
            let body = fields.len() + repeated_len(7, &m.tensors) + tail.len();
            encoding::encode_key(tag, WireType::LengthDelimited, &mut head);
            encoding::encode_varint(body as u64, &mut head);
            head.extend_from_slice(&fields);
            sink(&head);
            head.clear();
            buffers.encode(7, &m.tensors, sink);
            sink(&tail);
        }
        buffers.encode(4, &self.ops, sink);
        if let Some(window) = &self.window {
            encoding::message::encode(5, window, &mut head);
        }
        sink(&head);
        head.clear();
        buffers.encode(6, &self.buckets, sink);
        // `digest` (7) is left out; `schema_version` (15) goes last.
        let version = match self.schema_version {
            0 => SCHEMA_VERSION,
            v => v,
        };
        encoding::uint32::encode(15, &version, &mut head);
        sink(&head);
    }

    /// Bytes staged in the buckets: what the rollout moves.
    pub fn staged_bytes(&self) -> u64 {
        self.buckets
            .iter()
            .flat_map(|b| &b.items)
            .fold(0u64, |sum, i| sum.saturating_add(i.length))
    }

    /// Sets `digest` to [`SwapPlan::compute_digest`]. Call after the last change.
    pub fn seal(&mut self) {
        self.digest = self.compute_digest();
    }
}

/// The encoded length of a repeated message field, summed in parallel.
fn repeated_len<M: Message + Sync>(tag: u32, items: &[M]) -> usize {
    use rayon::prelude::*;
    items
        .par_iter()
        .map(|item| prost::encoding::message::encoded_len(tag, item))
        .sum()
}

/// Reused buffers for encoding long repeated fields in parallel.
#[derive(Default)]
struct Buffers(Vec<Vec<u8>>);

impl Buffers {
    /// Elements per piece.
    const RUN: usize = 2048;

    /// Feeds `sink` the encoding of repeated field `tag`, in order.
    fn encode<M: Message + Sync>(&mut self, tag: u32, items: &[M], sink: &mut dyn FnMut(&[u8])) {
        use rayon::prelude::*;
        let window = Self::RUN * 4 * rayon::current_num_threads().max(1);
        for block in items.chunks(window) {
            let runs = block.len().div_ceil(Self::RUN);
            if self.0.len() < runs {
                self.0.resize_with(runs, Vec::new);
            }
            self.0[..runs]
                .par_iter_mut()
                .zip(block.par_chunks(Self::RUN))
                .for_each(|(buffer, run)| {
                    buffer.clear();
                    for item in run {
                        prost::encoding::message::encode(tag, item, buffer);
                    }
                });
            for buffer in &self.0[..runs] {
                sink(buffer);
            }
        }
    }
}
