//! Checking contracts: every problem found, each with the path of the field.
//!
//! Decoding only guarantees that a message is well formed; a plan can still
//! be wrong in ways that would corrupt data when executed: a zero-length copy,
//! two copies writing the same destination bytes, a window that ends before
//! it starts, chunks that leave a gap in a tensor. [`Validate`] finds all such
//! problems at once, so a user fixes a plan in one round, not one error at a
//! time. A problem reads `ops[3].length: must be > 0`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use crate::address::Address;
use crate::dtype::{DTYPES, dtype_bits, tensor_bytes};
use crate::{
    Bucket, CachePlan, Chunk, FileEntry, HashAlgorithm, KvPageRef, PlanWindow, SCHEMA_VERSION,
    SwapPlan, SwapWindow, TensorEntry, TransferKind, TransferOp, WaveSpec, WeightManifest,
};

/// One thing wrong with a contract value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Where: `ops[3].length`; `.` for the value as a whole.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems of a value that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A contract that can check itself.
pub trait Validate {
    /// Records this value's problems in `c`, at `c`'s current path.
    fn check(&self, c: &mut Checker);

    /// Every problem found, in document order; empty when valid.
    fn problems(&self) -> Vec<Problem> {
        let mut c = Checker::default();
        self.check(&mut c);
        c.problems
    }

    /// `Ok` when valid, otherwise all problems found.
    fn validate(&self) -> Result<(), Problems> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Problems(problems))
        }
    }
}

/// Collects problems while walking a value, keeping track of the path.
#[derive(Debug, Default)]
pub struct Checker {
    path: Vec<Segment>,
    problems: Vec<Problem>,
}

#[derive(Debug, Clone)]
enum Segment {
    Field(&'static str),
    Index(usize),
}

impl Checker {
    /// Runs `f` with `name` appended to the path.
    pub fn field(&mut self, name: &'static str, f: impl FnOnce(&mut Self)) {
        self.path.push(Segment::Field(name));
        f(self);
        self.path.pop();
    }

    /// Runs `f` with `[index]` appended to the path.
    pub fn index(&mut self, index: usize, f: impl FnOnce(&mut Self)) {
        self.path.push(Segment::Index(index));
        f(self);
        self.path.pop();
    }

    /// Checks every element of a list, each at its index under `name`.
    pub fn each<T: Validate>(&mut self, name: &'static str, items: &[T]) {
        self.field(name, |c| {
            for (i, item) in items.iter().enumerate() {
                c.index(i, |c| item.check(c));
            }
        });
    }

    /// Records a problem at the current path.
    pub fn report(&mut self, message: impl Into<String>) {
        self.problems.push(Problem {
            path: self.path_string(),
            message: message.into(),
        });
    }

    /// Records a problem at field `name` of the current path.
    pub fn report_at(&mut self, name: &'static str, message: impl Into<String>) {
        self.field(name, |c| c.report(message));
    }

    /// The current path, as problems print it.
    pub fn path_string(&self) -> String {
        path_string(&self.path)
    }

    /// The problems recorded so far.
    pub fn into_problems(self) -> Vec<Problem> {
        self.problems
    }
}

fn path_string(path: &[Segment]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Segment::Field(name) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(name);
            }
            Segment::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    if out.is_empty() { ".".to_owned() } else { out }
}

/// A half-open byte range of some resource, with the element it belongs to.
struct Span<K> {
    key: K,
    start: u64,
    end: u64,
    at: usize,
}

/// Pairs `(later, earlier)` of element indices whose spans on the same key
/// overlap; each overlapping element is reported once, against the element
/// reaching furthest before it. O(n log n).
fn overlaps<K: Ord>(mut spans: Vec<Span<K>>) -> Vec<(usize, usize, u64, u64)> {
    spans.sort_by(|a, b| (&a.key, a.start, a.at).cmp(&(&b.key, b.start, b.at)));
    let mut found = Vec::new();
    let mut reach: Option<(usize, u64)> = None;
    for (i, span) in spans.iter().enumerate() {
        if i == 0 || spans[i - 1].key != span.key {
            reach = None;
        }
        if span.start == span.end {
            continue;
        }
        match reach {
            Some((holder, end)) if span.start < end => {
                found.push((span.at, holder, span.start, span.end));
                if span.end > end {
                    reach = Some((span.at, span.end));
                }
            }
            _ => reach = Some((span.at, span.end)),
        }
    }
    found.sort_unstable();
    found
}

fn check_schema_version(c: &mut Checker, version: u32) {
    if version > SCHEMA_VERSION {
        c.report_at(
            "schema_version",
            format!("{version} is newer than this build, which reads version {SCHEMA_VERSION}"),
        );
    }
}

/// `end` must not come before `start`.
fn check_order(c: &mut Checker, end_name: &'static str, end: u64, start_name: &str, start: u64) {
    if end < start {
        c.report_at(end_name, format!("{end} is before {start_name} {start}"));
    }
}

/// Checks a message field that must be present.
fn check_required<T: Validate>(c: &mut Checker, name: &'static str, value: Option<&T>) {
    match value {
        Some(v) => c.field(name, |c| v.check(c)),
        None => c.report_at(name, "missing"),
    }
}

fn check_non_empty(c: &mut Checker, name: &'static str, value: &str) {
    if value.is_empty() {
        c.report_at(name, "must not be empty");
    }
}

fn check_address(c: &mut Checker, name: &'static str, value: &str) {
    if let Err(e) = value.parse::<Address>() {
        c.report_at(name, e.reason);
    }
}

/// A path inside a checkpoint directory: relative, `/`-separated, no `..`.
fn check_relative_path(c: &mut Checker, name: &'static str, value: &str) {
    if value.is_empty() {
        c.report_at(name, "must not be empty");
    } else if let Some(ch) = value.chars().find(|ch| ch.is_control()) {
        c.report_at(
            name,
            format!("{value:?} contains the control character {ch:?}"),
        );
    } else if value.starts_with('/') || value.contains('\\') {
        c.report_at(
            name,
            format!("{value:?} must be relative to the checkpoint, with '/'"),
        );
    } else if value
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        c.report_at(
            name,
            format!("{value:?} has an empty, '.' or '..' component"),
        );
    }
}

fn check_hash(c: &mut Checker, name: &'static str, hash: &str, algorithm: i32, required: bool) {
    match HashAlgorithm::try_from(algorithm) {
        Ok(HashAlgorithm::Unspecified) if !hash.is_empty() => {
            c.report_at(name, "is set, but the manifest names no hash_algorithm")
        }
        Ok(HashAlgorithm::Blake3 | HashAlgorithm::Sha256) => {
            if hash.is_empty() {
                if required {
                    c.report_at(name, "missing");
                }
            } else if hash.len() != 64
                || !hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                c.report_at(name, format!("{hash:?} is not 64 lowercase hex digits"));
            }
        }
        // Unknown algorithms are reported once, at the manifest.
        _ => {}
    }
}

fn checked_end(c: &mut Checker, name: &'static str, offset: u64, length: u64) -> u64 {
    offset.checked_add(length).unwrap_or_else(|| {
        c.report_at(name, format!("{offset} + length {length} overflows"));
        u64::MAX
    })
}

/// Chunks must tile `[0, length)` in order, each `chunk_bytes` long but the last.
fn check_chunks(c: &mut Checker, chunks: &[Chunk], length: u64, chunk_bytes: u64, algorithm: i32) {
    let hashed = !matches!(
        HashAlgorithm::try_from(algorithm),
        Ok(HashAlgorithm::Unspecified)
    );
    if chunks.is_empty() {
        if hashed && length > 0 {
            c.report_at(
                "chunks",
                "missing: a hashed manifest chunks every non-empty entry",
            );
        }
        return;
    }
    if chunk_bytes == 0 {
        c.report_at("chunks", "present, but the manifest's chunk_bytes is 0");
    }
    let mut expected_offset = 0u64;
    c.field("chunks", |c| {
        for (i, chunk) in chunks.iter().enumerate() {
            c.index(i, |c| {
                if chunk.index as usize != i {
                    c.report_at("index", format!("is {}, expected {i}", chunk.index));
                }
                if chunk.offset != expected_offset {
                    c.report_at(
                        "offset",
                        format!("is {}, expected {expected_offset}: chunks must tile the entry without gaps or overlaps", chunk.offset),
                    );
                }
                if chunk.length == 0 {
                    c.report_at("length", "must be > 0");
                }
                let last = i + 1 == chunks.len();
                if chunk_bytes > 0 && !last && chunk.length != chunk_bytes {
                    c.report_at(
                        "length",
                        format!("is {}, but every chunk but the last is chunk_bytes = {chunk_bytes}", chunk.length),
                    );
                }
                if chunk_bytes > 0 && last && chunk.length > chunk_bytes {
                    c.report_at("length", format!("is {}, more than chunk_bytes = {chunk_bytes}", chunk.length));
                }
                check_hash(c, "hash", &chunk.hash, algorithm, true);
                expected_offset = chunk.offset.saturating_add(chunk.length);
            });
        }
    });
    if expected_offset != length {
        c.report_at(
            "chunks",
            format!("cover {expected_offset} bytes, but the entry is {length} bytes"),
        );
    }
}

impl Validate for WeightManifest {
    fn check(&self, c: &mut Checker) {
        check_schema_version(c, self.schema_version);
        check_non_empty(c, "model_id", &self.model_id);
        check_non_empty(c, "version", &self.version);
        if HashAlgorithm::try_from(self.hash_algorithm).is_err() {
            c.report_at(
                "hash_algorithm",
                format!("unknown algorithm number {}", self.hash_algorithm),
            );
        }
        let (algorithm, chunk_bytes) = (self.hash_algorithm, self.chunk_bytes);

        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut spans = Vec::with_capacity(self.tensors.len());
        c.field("tensors", |c| {
            for (i, t) in self.tensors.iter().enumerate() {
                c.index(i, |c| {
                    check_tensor(c, t, algorithm, chunk_bytes);
                    if let Some(first) = names.insert(&t.name, i) {
                        c.report_at("name", format!("duplicate of tensors[{first}]"));
                    }
                    let end = checked_end(c, "offset", t.offset, t.length);
                    spans.push(Span {
                        key: t.file.as_str(),
                        start: t.offset,
                        end,
                        at: i,
                    });
                });
            }
        });
        for (later, earlier, start, end) in overlaps(spans) {
            let file = &self.tensors[later].file;
            c.field("tensors", |c| {
                c.index(later, |c| {
                    c.report(format!(
                        "bytes [{start}, {end}) of {file:?} overlap tensors[{earlier}]"
                    ))
                })
            });
        }

        // One file may appear as several entries, at disjoint offsets.
        let mut spans = Vec::with_capacity(self.files.len());
        c.field("files", |c| {
            for (i, f) in self.files.iter().enumerate() {
                c.index(i, |c| {
                    check_file(c, f, algorithm, chunk_bytes);
                    let end = checked_end(c, "offset", f.offset, f.length);
                    spans.push(Span {
                        key: f.path.as_str(),
                        start: f.offset,
                        end,
                        at: i,
                    });
                });
            }
        });
        for (later, earlier, start, end) in overlaps(spans) {
            let f = &self.files[later];
            c.field("files", |c| {
                c.index(later, |c| {
                    c.report(format!(
                        "bytes [{start}, {end}) of {:?} are also files[{earlier}]",
                        f.path
                    ))
                })
            });
        }
    }
}

fn check_tensor(c: &mut Checker, t: &TensorEntry, algorithm: i32, chunk_bytes: u64) {
    check_non_empty(c, "name", &t.name);
    check_relative_path(c, "file", &t.file);
    if dtype_bits(&t.dtype).is_none() {
        c.report_at(
            "dtype",
            format!(
                "unknown dtype {:?}; expected one of {}",
                t.dtype,
                DTYPES.join(", ")
            ),
        );
    } else {
        match tensor_bytes(&t.dtype, &t.shape) {
            Some(bytes) if bytes == t.length => {}
            Some(bytes) => c.report_at(
                "length",
                format!(
                    "is {}, but shape {:?} of {} takes {bytes} bytes",
                    t.length, t.shape, t.dtype
                ),
            ),
            None => c.report_at(
                "shape",
                format!("{:?} overflows a 64-bit byte count", t.shape),
            ),
        }
    }
    check_chunks(c, &t.chunks, t.length, chunk_bytes, algorithm);
}

fn check_file(c: &mut Checker, f: &FileEntry, algorithm: i32, chunk_bytes: u64) {
    check_relative_path(c, "path", &f.path);
    check_hash(c, "hash", &f.hash, algorithm, false);
    check_chunks(c, &f.chunks, f.length, chunk_bytes, algorithm);
}

impl Validate for KvPageRef {
    fn check(&self, c: &mut Checker) {
        if !self.location.is_empty() {
            check_address(c, "location", &self.location);
        }
        if self.page.checked_add(self.count.max(1) - 1).is_none() {
            c.report_at(
                "count",
                format!(
                    "{} pages from page {} run past the largest page id",
                    self.count, self.page
                ),
            );
        }
    }
}

impl Validate for TransferOp {
    fn check(&self, c: &mut Checker) {
        match TransferKind::try_from(self.kind) {
            Ok(TransferKind::KindUnspecified) => c.report_at("kind", "must be set"),
            Ok(_) => {}
            Err(_) => c.report_at("kind", format!("unknown transfer kind {}", self.kind)),
        }
        check_address(c, "src", &self.src);
        check_address(c, "dst", &self.dst);
        if self.length == 0 {
            c.report_at("length", "must be > 0");
        }
        let src_end = checked_end(c, "src_offset", self.src_offset, self.length);
        let dst_end = checked_end(c, "dst_offset", self.dst_offset, self.length);
        if self.src == self.dst && self.src_offset < dst_end && self.dst_offset < src_end {
            c.report_at(
                "dst_offset",
                "source and destination ranges overlap in the same place",
            );
        }
        c.each("kv_refs", &self.kv_refs);
        c.field("kv_refs", |c| {
            for (i, page) in self.kv_refs.iter().enumerate() {
                if !page.location.is_empty() {
                    c.index(i, |c| {
                        c.report_at(
                            "location",
                            "must be empty inside an op: its dst says where the pages go",
                        )
                    });
                }
            }
        });
    }
}

/// Checks a list of operations, and that no two write the same destination bytes.
fn check_ops(c: &mut Checker, ops: &[TransferOp]) {
    c.each("ops", ops);
    let spans = ops
        .iter()
        .enumerate()
        .map(|(at, op)| Span {
            key: op.dst.as_str(),
            start: op.dst_offset,
            end: op.dst_offset.saturating_add(op.length),
            at,
        })
        .collect();
    for (later, earlier, start, end) in overlaps(spans) {
        let dst = &ops[later].dst;
        c.field("ops", |c| {
            c.index(later, |c| {
                c.report(format!(
                    "writes bytes [{start}, {end}) of {dst:?}, which ops[{earlier}] also writes"
                ))
            })
        });
    }
}

/// The pages of a range, keyed by where they are: (location, tensor, layer, head).
type PageKey<'a> = (&'a str, &'a str, u32, u32);

fn page_span(page: &KvPageRef, at: usize) -> Span<PageKey<'_>> {
    Span {
        key: (
            page.location.as_str(),
            page.tensor.as_str(),
            page.layer,
            page.head,
        ),
        start: page.page,
        end: page.page.saturating_add(page.count.max(1)),
        at,
    }
}

/// Checks a page list: every entry names a location, and no page is listed
/// twice, counting the ranges that `count` makes.
fn check_page_list(c: &mut Checker, name: &'static str, pages: &[KvPageRef]) {
    c.field(name, |c| {
        for (i, page) in pages.iter().enumerate() {
            c.index(i, |c| {
                page.check(c);
                if page.location.is_empty() {
                    c.report_at("location", "must name the tier, e.g. tier://node0/cpu");
                }
            });
        }
    });
    let spans = pages
        .iter()
        .enumerate()
        .map(|(i, p)| page_span(p, i))
        .collect();
    for (later, earlier, start, end) in overlaps(spans) {
        let same = pages[later].page == pages[earlier].page
            && pages[later].count.max(1) == pages[earlier].count.max(1);
        let message = if same {
            format!("duplicate of {name}[{earlier}]")
        } else {
            format!("pages [{start}, {end}) overlap {name}[{earlier}]")
        };
        c.field(name, |c| c.index(later, |c| c.report(message)));
    }
}

impl Validate for PlanWindow {
    fn check(&self, c: &mut Checker) {
        check_order(c, "end_ns", self.end_ns, "start_ns", self.start_ns);
    }
}

impl Validate for CachePlan {
    fn check(&self, c: &mut Checker) {
        check_schema_version(c, self.schema_version);
        check_non_empty(c, "plan_id", &self.plan_id);
        check_ops(c, &self.ops);
        check_page_list(c, "prefetch", &self.prefetch);
        check_page_list(c, "evict", &self.evict);
        check_page_list(c, "admit", &self.admit);
        // A page cannot be both dropped from and admitted into one tier.
        let n = self.evict.len();
        let spans = self
            .evict
            .iter()
            .enumerate()
            .map(|(i, p)| page_span(p, i))
            .chain(
                self.admit
                    .iter()
                    .enumerate()
                    .map(|(i, p)| page_span(p, n + i)),
            )
            .collect();
        for (later, earlier, start, end) in overlaps(spans) {
            let (admit, evict) = match (later >= n, earlier >= n) {
                (true, false) => (later - n, earlier),
                (false, true) => (earlier - n, later),
                _ => continue,
            };
            c.field("admit", |c| {
                c.index(admit, |c| {
                    c.report(format!(
                        "pages [{start}, {end}) are also evicted by evict[{evict}]"
                    ))
                })
            });
        }
        check_required(c, "window", self.window.as_ref());
    }
}

impl Validate for SwapWindow {
    fn check(&self, c: &mut Checker) {
        check_schema_version(c, self.schema_version);
        if self.t_deadline_ns != 0 {
            check_order(
                c,
                "t_deadline_ns",
                self.t_deadline_ns,
                "t_start_ns",
                self.t_start_ns,
            );
        }
        check_order(c, "wave_end", self.wave_end, "wave_begin", self.wave_begin);
    }
}

impl Validate for SwapPlan {
    fn check(&self, c: &mut Checker) {
        check_schema_version(c, self.schema_version);
        check_non_empty(c, "plan_id", &self.plan_id);
        check_required(c, "from", self.from.as_ref());
        check_required(c, "to", self.to.as_ref());
        check_ops(c, &self.ops);
        check_required(c, "window", self.window.as_ref());
        check_buckets(c, &self.buckets, self.from.as_ref(), self.to.as_ref()); // Required: a plan is only executed as sealed, and protobuf cannot
        // tell a plan cut short between two fields from a complete one; the
        // digest (encoded after every other field but schema_version) can.
        if self.digest.is_empty() {
            c.report_at("digest", "missing: seal the finished plan (SwapPlan::seal)");
        } else {
            let expected = self.compute_digest();
            if self.digest != expected {
                c.report_at(
                    "digest",
                    format!("does not match the plan's contents, which hash to {expected}"),
                );
            }
        }
    }
}

/// A chunk of the target manifest: (is_file, name, chunk index).
type ChunkKey<'a> = (bool, &'a str, u32);
/// Bytes [start, end) of a chunk, held by item `.3` of bucket `.2`.
type Piece = (u64, u64, usize, usize);

/// Buckets: unique ids, items inside their bucket and not overlapping, each
/// piece inside an existing chunk of the target manifest, and every chunk
/// that appears covered exactly once.
fn check_buckets(
    c: &mut Checker,
    buckets: &[Bucket],
    from: Option<&WeightManifest>,
    to: Option<&WeightManifest>,
) {
    // (is_file, name) -> chunk lengths, from the target manifest.
    let chunks: HashMap<(bool, &str), Vec<u64>> = to
        .map(|m| {
            entries(m)
                .map(|(is_file, name, ch)| ((is_file, name), ch.iter().map(|c| c.length).collect()))
                .collect()
        })
        .unwrap_or_default();
    let mut ids: HashMap<u32, usize> = HashMap::new();
    let mut pieces: BTreeMap<ChunkKey<'_>, Vec<Piece>> = BTreeMap::new();

    c.field("buckets", |c| {
        for (b, bucket) in buckets.iter().enumerate() {
            c.index(b, |c| {
                if let Some(first) = ids.insert(bucket.id, b) {
                    c.report_at("id", format!("{} is also the id of buckets[{first}]", bucket.id));
                }
                if bucket.capacity == 0 {
                    c.report_at("capacity", "must be > 0");
                }
                let mut spans = Vec::with_capacity(bucket.items.len());
                c.field("items", |c| {
                    for (i, item) in bucket.items.iter().enumerate() {
                        c.index(i, |c| {
                            check_non_empty(c, "name", &item.name);
                            if item.length == 0 {
                                c.report_at("length", "must be > 0");
                            }
                            let end = checked_end(c, "bucket_offset", item.bucket_offset, item.length);
                            if end > bucket.capacity {
                                c.report(format!(
                                    "ends at byte {end}, past the bucket's capacity {}",
                                    bucket.capacity
                                ));
                            }
                            spans.push(Span { key: (), start: item.bucket_offset, end, at: i });
                            if to.is_none() {
                                return;
                            }
                            let what = if item.is_file { "file" } else { "tensor" };
                            match chunks.get(&(item.is_file, item.name.as_str())) {
                                None => c.report_at(
                                    "name",
                                    format!("{what} {:?} is not in the target manifest", item.name),
                                ),
                                Some(lengths) => match lengths.get(item.chunk as usize) {
                                    None => c.report_at(
                                        "chunk",
                                        format!("{what} {:?} has {} chunks", item.name, lengths.len()),
                                    ),
                                    Some(&len) => {
                                        let piece_end = item.chunk_offset.saturating_add(item.length);
                                        if piece_end > len {
                                            c.report(format!(
                                                "bytes [{}, {piece_end}) are past the end of chunk {} ({len} bytes)",
                                                item.chunk_offset, item.chunk
                                            ));
                                        }
                                        pieces
                                            .entry((item.is_file, item.name.as_str(), item.chunk))
                                            .or_default()
                                            .push((item.chunk_offset, piece_end, b, i));
                                    }
                                },
                            }
                        });
                    }
                });
                for (later, earlier, start, end) in overlaps(spans) {
                    c.field("items", |c| {
                        c.index(later, |c| {
                            c.report(format!("bucket bytes [{start}, {end}) overlap items[{earlier}]"))
                        })
                    });
                }
            });
        }
    });

    let staged: HashSet<ChunkKey<'_>> = pieces.keys().copied().collect();
    for ((is_file, name, chunk), mut parts) in pieces {
        let len = chunks
            .get(&(is_file, name))
            .and_then(|l| l.get(chunk as usize))
            .copied()
            .unwrap_or(0);
        parts.sort_unstable();
        // `reach`: furthest byte covered so far; `covered`: bytes of the union.
        let (mut reach, mut covered) = (0u64, 0u64);
        for &(start, end, b, i) in &parts {
            covered = covered.saturating_add(end.saturating_sub(start.max(reach)));
            if start < reach {
                c.field("buckets", |c| {
                    c.index(b, |c| {
                        c.field("items", |c| {
                            c.index(i, |c| {
                                c.report(format!("bytes [{start}, {end}) of chunk {chunk} of {name:?} are already in another bucket item"))
                            })
                        })
                    })
                });
            }
            reach = reach.max(end);
        }
        if covered < len {
            c.report_at(
                "buckets",
                format!(
                    "chunk {chunk} of {name:?} is only partly in the buckets ({covered} of {len} bytes)"
                ),
            );
        }
    }

    // Every chunk of the target that is new or changed must be staged; a
    // `from` given by identity only (no entries) leaves this to whoever
    // holds the full manifest (SwapPlan::unstaged_changes).
    if let (Some(from), Some(to)) = (from, to)
        && (!from.tensors.is_empty() || !from.files.is_empty())
    {
        check_changes_staged(c, &staged, from, to);
    }
}

/// Reports every chunk of `to` that `from` lacks or holds with another hash
/// and that `staged` does not hold.
fn check_changes_staged(
    c: &mut Checker,
    staged: &HashSet<ChunkKey<'_>>,
    from: &WeightManifest,
    to: &WeightManifest,
) {
    let old: HashMap<ChunkKey<'_>, &str> = entries(from)
        .flat_map(|(is_file, name, chunks)| {
            chunks
                .iter()
                .map(move |ch| ((is_file, name, ch.index), ch.hash.as_str()))
        })
        .collect();
    for (is_file, name, chunks) in entries(to) {
        for ch in chunks {
            let key = (is_file, name, ch.index);
            if old.get(&key) != Some(&ch.hash.as_str()) && !staged.contains(&key) {
                let what = if is_file { "file" } else { "tensor" };
                c.report_at(
                    "buckets",
                    format!(
                        "chunk {} of {what} {name:?} is new or changed but in no bucket",
                        ch.index
                    ),
                );
            }
        }
    }
}

impl SwapPlan {
    /// The chunks the buckets stage, as (is_file, name, chunk index).
    pub fn staged_chunks(&self) -> HashSet<(bool, &str, u32)> {
        self.buckets
            .iter()
            .flat_map(|b| &b.items)
            .map(|i| (i.is_file, i.name.as_str(), i.chunk))
            .collect()
    }

    /// The check `validate()` makes when `from` carries its entries, against
    /// a full previous manifest given separately: every new or changed chunk
    /// of `to` must be staged.
    pub fn unstaged_changes(&self, prev: &WeightManifest) -> Vec<Problem> {
        let mut c = Checker::default();
        if let Some(to) = &self.to {
            check_changes_staged(&mut c, &self.staged_chunks(), prev, to);
        }
        c.into_problems()
    }
}

/// The chunked entries of a manifest: (is_file, name, chunks).
fn entries(m: &WeightManifest) -> impl Iterator<Item = (bool, &str, &[Chunk])> {
    let tensors = m
        .tensors
        .iter()
        .map(|t| (false, t.name.as_str(), t.chunks.as_slice()));
    let files = m
        .files
        .iter()
        .map(|f| (true, f.path.as_str(), f.chunks.as_slice()));
    tensors.chain(files)
}

impl Validate for WaveSpec {
    fn check(&self, c: &mut Checker) {
        check_schema_version(c, self.schema_version);
        for (name, value) in [("bm", self.bm), ("bn", self.bn), ("bk", self.bk)] {
            if value == 0 {
                c.report_at(name, "must be > 0");
            }
        }
        if let Some(cluster) = &self.cluster {
            c.field("cluster", |c| {
                if cluster.x == 0 {
                    c.report_at("x", "must be >= 1");
                }
                if cluster.y == 0 {
                    c.report_at("y", "must be >= 1");
                }
            });
        }
        let n = self.pack_order.len();
        let mut seen = vec![false; n];
        c.field("pack_order", |c| {
            for (i, &p) in self.pack_order.iter().enumerate() {
                match seen.get_mut(p as usize) {
                    Some(slot) if !*slot => *slot = true,
                    Some(_) => c.index(i, |c| c.report(format!("{p} appears twice"))),
                    None => c.index(i, |c| {
                        c.report(format!(
                            "{p} is out of range: pack_order is a permutation of 0..{n}"
                        ))
                    }),
                }
            }
        });
        let mut tiles: HashMap<(u32, u32), usize> = HashMap::new();
        c.field("tile_order", |c| {
            for (i, t) in self.tile_order.iter().enumerate() {
                if let Some(first) = tiles.insert((t.m, t.n), i) {
                    c.index(i, |c| {
                        c.report(format!(
                            "tile ({}, {}) is also tile_order[{first}]",
                            t.m, t.n
                        ))
                    });
                }
            }
        });
        c.field("io_extents", |c| {
            for (i, e) in self.io_extents.iter().enumerate() {
                c.index(i, |c| {
                    check_non_empty(c, "layer", &e.layer);
                    check_order(c, "last_page", e.last_page, "first_page", e.first_page);
                });
            }
        });
        check_order(c, "swap_end", self.swap_end, "swap_begin", self.swap_begin);
        if self.swap_end >= self.swap_begin && self.num_waves > 0 && self.swap_end > self.num_waves
        {
            c.report_at(
                "swap_end",
                format!("{} is past num_waves {}", self.swap_end, self.num_waves),
            );
        }
        if !self.dtype.is_empty() && dtype_bits(&self.dtype).is_none() {
            c.report_at(
                "dtype",
                format!(
                    "unknown dtype {:?}; expected one of {}",
                    self.dtype,
                    DTYPES.join(", ")
                ),
            );
        }
        check_trace_statistics(c, self);
    }
}

/// The request-log statistics of a wave spec (fields 17-23): cohorts,
/// prefix histogram, reuse distances and the block shape they are counted in.
fn check_trace_statistics(c: &mut Checker, w: &WaveSpec) {
    if w.block_bytes > 0 && w.block_tokens == 0 {
        c.report_at(
            "block_tokens",
            format!("must be > 0 when block_bytes is set ({})", w.block_bytes),
        );
    }
    if w.block_tokens > 0 && w.block_bytes == 0 {
        c.report_at(
            "block_bytes",
            format!("must be > 0 when block_tokens is set ({})", w.block_tokens),
        );
    }
    c.field("cohorts", |c| {
        for (i, cohort) in w.cohorts.iter().enumerate() {
            c.index(i, |c| {
                if cohort.depth == 0 {
                    c.report_at("depth", "must be >= 1");
                }
                if cohort.requests < 2 {
                    c.report_at("requests", "must be >= 2");
                }
                check_order(c, "last_ms", cohort.last_ms, "first_ms", cohort.first_ms);
                if w.block_bytes > 0 {
                    match u64::from(cohort.depth).checked_mul(w.block_bytes) {
                        Some(expected) if expected == cohort.bytes => {}
                        Some(expected) => c.report_at(
                            "bytes",
                            format!(
                                "{} is not depth {} x block_bytes {} = {expected}",
                                cohort.bytes, cohort.depth, w.block_bytes
                            ),
                        ),
                        None => c.report_at(
                            "bytes",
                            format!(
                                "depth {} x block_bytes {} overflows u64",
                                cohort.depth, w.block_bytes
                            ),
                        ),
                    }
                }
            });
        }
    });
    c.field("prefix_histogram", |c| {
        for (i, d) in w.prefix_histogram.iter().enumerate() {
            if d.depth == 0 {
                c.index(i, |c| c.report_at("depth", "must be >= 1"));
            }
        }
        for (i, pair) in w.prefix_histogram.windows(2).enumerate() {
            let [p, d] = pair else { continue };
            c.index(i + 1, |c| {
                if d.depth <= p.depth {
                    let message = format!(
                        "{} is not above prefix_histogram[{i}].depth {}: \
                         depths strictly increase",
                        d.depth, p.depth
                    );
                    c.report_at("depth", message);
                }
                if d.requests > p.requests {
                    let message = format!(
                        "{} is more than prefix_histogram[{i}].requests {}: \
                         a deeper prefix cannot be reused by more requests",
                        d.requests, p.requests
                    );
                    c.report_at("requests", message);
                }
            });
        }
    });
    c.field("reuse_distances", |c| {
        for (i, pair) in w.reuse_distances.windows(2).enumerate() {
            let [before, bucket] = pair else { continue };
            if bucket.max_distance <= before.max_distance {
                let message = format!(
                    "{} is not above reuse_distances[{i}].max_distance {}: \
                     bounds strictly increase",
                    bucket.max_distance, before.max_distance
                );
                c.index(i + 1, |c| c.report_at("max_distance", message));
            }
        }
    });
}
