//! The disk tier: append-only segment files and an index that survives a
//! restart and recovers after a crash.
//!
//! # Design
//!
//! Objects are appended, as [records](crate::record), to the *active*
//! segment file of a directory; when it reaches the segment size a new one
//! is started and the old one is *sealed* (never written again). An object
//! replaced or deleted leaves its old record behind as dead bytes, reclaimed
//! later. In memory, an index maps each key's canonical encoding to where
//! its newest record lies (segment, offset, length), its [`Meta`], its
//! sequence number and its pin count.
//!
//! ```text
//! dir/
//!   seg-000001.log     sealed: records, append order
//!   seg-000002.log     sealed
//!   seg-000003.log     active: writes append here
//!   index.snap         the index as of the last flush
//!   LOCK               flock'ed while a tier has the directory open
//! ```
//!
//! - **Writes** serialise on one append lock (there is one append point):
//!   the record (header, key and metadata in one buffer, the payload
//!   straight from the caller's slice) goes to the file in one vectored
//!   write, then the index is updated. A `put` computes the payload's
//!   checksum itself (overwriting `meta.length` and `meta.checksum`).
//! - **Reads** copy the record's location and an `Arc` of its file out of
//!   the index under a short lock, then `pread` the payload straight into
//!   the buffer returned to the caller (no lock held during the read, no
//!   second copy) and verify its checksum. A mismatch is
//!   [`Error::Corrupt`]; the key is dropped and a later read is a miss.
//!   Because a reader holds its own `Arc` of the file, a segment deleted
//!   meanwhile (compaction, eviction) stays readable through the open
//!   descriptor.
//!
//! # Capacity, compaction and eviction
//!
//! The bytes of all segment files (live, dead and tombstones) are bounded
//! by `capacity_bytes`. A segment is at most a quarter of the capacity (so
//! reclaiming one never throws away more than a quarter of the tier), and
//! one record larger than that gets a segment of its own. When a write
//! would go over the capacity:
//!
//! 1. if rewriting the sealed segments that are less than half live frees
//!    enough, those are *compacted*, emptiest first: their live records are
//!    copied forward to the active segment and the file is deleted;
//! 2. otherwise whole segments are *reclaimed*, oldest first (the active
//!    one last, after sealing it): their pinned records are copied forward,
//!    the others are evicted (counted in [`TierStats::evictions`]), and the
//!    file is deleted.
//!
//! Before touching anything the tier checks that evicting every unpinned
//! object would make room; if not (everything is pinned, or the object is
//! larger than the capacity) the write fails with [`Error::Full`] and
//! nothing changes. While a segment's records are copied forward the files
//! can exceed the capacity by those bytes, until the old file is deleted.
//!
//! Pins are held in memory only: they protect dirty objects of a
//! write-back cache above, which does not outlive the process either, so a
//! reopened tier starts with no pins.
//!
//! # The index snapshot
//!
//! [`Tier::flush`] (and dropping the tier) writes the index to
//! `index.snap`, little-endian binary, read back in one read:
//!
//! ```text
//! 8      magic "SCDIDX01"
//! 8      next sequence number
//! 8      next segment id
//! 4      segment count S, then S times:
//!          8 segment id, 8 bytes of it the snapshot covers
//! 4      tombstone count T, then T times:
//!          8 segment id, 8 offset, 8 record length
//! 8      entry count E, then E times:
//!          8 segment id, 8 offset, 8 record length, 8 sequence number,
//!          4 key length K, 4 metadata length M, K key, M metadata
//! 8      XXH3-64 of everything above
//! ```
//!
//! It is written to `index.snap.tmp`, fsynced and renamed over the old one,
//! so a crash leaves either the old snapshot or the new one. Tombstones are
//! listed because compaction must know where they are (see below).
//!
//! # Recovery
//!
//! Opening a tier loads the snapshot if its checksum holds and every
//! segment it covers is at least as long as it says; otherwise the index is
//! rebuilt from nothing by scanning every segment. Then each segment is
//! scanned from where the snapshot's coverage ends (from the start for a
//! segment it does not know): objects and tombstones are applied by
//! sequence number (the larger wins), so records written after the last
//! snapshot are found. A record whose header is bad, whose head checksum
//! fails or which runs past the end of the file marks where the segment's
//! valid data ends: the file is truncated there, so a record torn by a
//! crash is discarded whole. The payload of every scanned record is
//! verified too; a record whose payload fails (written but not completely
//! on the medium) is never indexed, and it counts as a deletion of its key
//! so that an older version cannot come back in its place. Stray temporary
//! files are removed.
//!
//! Compaction and reclaiming copy records forward byte for byte, sequence
//! number included, so the order of writes survives any rewriting. Only
//! live records are copied, so a key's newest record always lies after its
//! older ones in append order (segment id, then offset). A tombstone is
//! therefore needed only while an older segment exists: compaction copies it
//! forward, and it is dropped with the oldest segment.
//!
//! # Durability
//!
//! - A `put` or `delete` that returned has handed its bytes to the kernel
//!   (they are in the page cache): they survive the process crashing or
//!   being killed, and are found by the recovery scan on the next open.
//! - They survive a power loss or kernel crash only once [`Tier::flush`]
//!   has returned (it fsyncs every segment written since the last flush,
//!   the directory, and the snapshot), or at once with
//!   [`DiskOptions::sync_on_put`], which fsyncs each write before returning
//!   (slower: one device flush per write).
//! - Reclaiming never weakens what a flush made durable: a segment whose
//!   records were copied forward is deleted only after the copies are
//!   fsynced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::record::{self, Cursor, HEADER_LEN, Header, Kind};
use crate::sync::lock;
use crate::tier::{Meta, Object, Tier, TierStats, checksum, pread_shared};
use crate::{ArtifactKey, Error, Result};

const TIER: &str = "disk";
const SNAPSHOT: &str = "index.snap";
const SNAPSHOT_TMP: &str = "index.snap.tmp";
const LOCK: &str = "LOCK";
/// How long opening waits for another holder of the directory's lock.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);
const SNAP_MAGIC: [u8; 8] = *b"SCDIDX01";
/// Larger key or metadata lengths in a header are garbage, not records:
/// keys are a handful of u16-length fields, metadata a few short strings
/// and a shape.
const MAX_KEY: u32 = 1 << 20;
const MAX_META: u32 = 1 << 24;
/// Reads of a payload go in pieces of this size, each hashed while it is
/// in the CPU's cache.
const READ_PIECE: usize = 256 << 10;

/// How a [`DiskTier`] is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    /// Bytes the segment files may take in all, live and dead records
    /// together. Default 16 GiB.
    pub capacity_bytes: u64,
    /// Size at which the active segment is sealed and a new one started
    /// (capped at a quarter of `capacity_bytes`). Default 64 MiB.
    pub segment_bytes: u64,
    /// Fsync every write before it returns: durable against power loss at
    /// the cost of one device flush per write. Default off: a returned
    /// write survives a process crash, and [`Tier::flush`] makes it survive
    /// a power loss.
    pub sync_on_put: bool,
}

impl Default for DiskOptions {
    fn default() -> DiskOptions {
        DiskOptions {
            capacity_bytes: 16 << 30,
            segment_bytes: 64 << 20,
            sync_on_put: false,
        }
    }
}

/// The disk tier: objects in segment files under one directory. See the
/// module documentation for the format, the capacity rules and what
/// survives a crash.
#[derive(Debug)]
pub struct DiskTier {
    dir: PathBuf,
    capacity: u64,
    segment_bytes: u64,
    sync_on_put: bool,
    /// Holds the directory's exclusive lock while the tier is open.
    _lock: File,
    /// The append point. Every change to the files takes it first, then
    /// (briefly) `state`.
    writer: Mutex<Writer>,
    state: Mutex<State>,
    /// A read dropped a damaged object: the snapshot must forget it too.
    dropped: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Debug)]
struct Writer {
    active: u64,
    file: Arc<File>,
    /// Bytes of the active segment.
    size: u64,
    next_seq: u64,
    next_segment: u64,
    /// Segments written since their last fsync.
    unsynced: BTreeSet<u64>,
    /// Files created or deleted since the directory's last fsync.
    dir_unsynced: bool,
    /// Whether the index changed since the last snapshot.
    dirty: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    segment: u64,
    offset: u64,
    /// The whole record's bytes.
    len: u64,
    seq: u64,
    meta: Meta,
    pins: u32,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    size: u64,
    /// Record bytes of indexed objects here.
    live: u64,
    /// Record bytes of pinned objects here.
    pinned: u64,
    tombs: Vec<Tomb>,
}

#[derive(Debug, Clone, Copy)]
struct Tomb {
    offset: u64,
    len: u64,
}

#[derive(Debug, Default)]
struct State {
    index: HashMap<Box<[u8]>, Entry>,
    segments: BTreeMap<u64, Segment>,
    /// Bytes of all segments.
    total: u64,
    /// Record bytes of pinned objects.
    pinned: u64,
    /// Payload bytes of indexed objects.
    payload: u64,
}

impl State {
    fn insert(&mut self, key: Box<[u8]>, entry: Entry) {
        if let Some(seg) = self.segments.get_mut(&entry.segment) {
            seg.live += entry.len;
            if entry.pins > 0 {
                seg.pinned += entry.len;
            }
        }
        if entry.pins > 0 {
            self.pinned += entry.len;
        }
        self.payload += entry.meta.length;
        if let Some(old) = self.index.insert(key, entry) {
            self.forget(&old);
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let old = self.index.remove(key)?;
        self.forget(&old);
        Some(old)
    }

    fn forget(&mut self, old: &Entry) {
        if let Some(seg) = self.segments.get_mut(&old.segment) {
            seg.live = seg.live.saturating_sub(old.len);
            if old.pins > 0 {
                seg.pinned = seg.pinned.saturating_sub(old.len);
            }
        }
        if old.pins > 0 {
            self.pinned = self.pinned.saturating_sub(old.len);
        }
        self.payload = self.payload.saturating_sub(old.meta.length);
    }

    /// Records `len` bytes appended to `segment`.
    fn grow(&mut self, segment: u64, len: u64) {
        if let Some(seg) = self.segments.get_mut(&segment) {
            seg.size += len;
        }
        self.total += len;
    }

    /// Drops the key if its entry still points at `segment`/`offset` (it
    /// may have been replaced meanwhile).
    fn remove_if_at(&mut self, key: &[u8], segment: u64, offset: u64) -> bool {
        let here = self
            .index
            .get(key)
            .is_some_and(|e| e.segment == segment && e.offset == offset);
        if here {
            self.remove(key);
        }
        here
    }
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        tier: TIER.into(),
        op,
        path: path.display().to_string(),
        source,
    }
}

fn segment_name(id: u64) -> String {
    format!("seg-{id:06}.log")
}

fn segment_id(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn open_segment(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(create)
        .open(path)
        .map_err(|e| io_err(if create { "creating" } else { "opening" }, path, e))
}

/// What a recovery scan found at one offset.
struct Scanned {
    kind: Kind,
    key: Vec<u8>,
    meta: Meta,
    seq: u64,
    offset: u64,
    len: u64,
    /// The payload matched its checksum (always true for tombstones).
    intact: bool,
}

/// Reads the records of a segment from `start`; calls `found` for each
/// whole record; returns where the valid records end.
fn scan_segment(
    file: &File,
    start: u64,
    file_len: u64,
    mut found: impl FnMut(Scanned),
) -> io::Result<u64> {
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.seek(SeekFrom::Start(start))?;
    let mut pos = start;
    let mut head = [0u8; HEADER_LEN];
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let left = file_len.saturating_sub(pos);
        if left < HEADER_LEN as u64 {
            return Ok(pos);
        }
        r.read_exact(&mut head)?;
        let Some(h) = Header::parse(&head) else {
            return Ok(pos);
        };
        if h.kind == Kind::Free || h.key_len > MAX_KEY || h.meta_len > MAX_META {
            return Ok(pos);
        }
        let Some(total) = h.payload_offset().checked_add(h.payload_len) else {
            return Ok(pos);
        };
        if total > left {
            return Ok(pos);
        }
        let mut key_meta = vec![0u8; h.key_len as usize + h.meta_len as usize];
        r.read_exact(&mut key_meta)?;
        let (key, meta_bytes) = key_meta.split_at(h.key_len as usize);
        if !h.check(key, meta_bytes) {
            return Ok(pos);
        }
        let (meta, intact) = match h.kind {
            Kind::Object => {
                let Some(meta) = record::decode_meta(meta_bytes) else {
                    return Ok(pos);
                };
                let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                let mut rest = h.payload_len;
                while rest > 0 {
                    let n = rest.min(chunk.len() as u64) as usize;
                    r.read_exact(&mut chunk[..n])?;
                    hasher.update(&chunk[..n]);
                    rest -= n as u64;
                }
                let intact = meta.length == h.payload_len && hasher.digest() == meta.checksum;
                (meta, intact)
            }
            _ => {
                // A tombstone has no payload; skip whatever one says.
                r.seek_relative(i64::try_from(h.payload_len).unwrap_or(i64::MAX))?;
                (Meta::default(), true)
            }
        };
        found(Scanned {
            kind: h.kind,
            key: key.to_vec(),
            meta,
            seq: h.seq,
            offset: pos,
            len: total,
            intact,
        });
        pos += total;
    }
}

/// A loaded index snapshot.
struct Snapshot {
    next_seq: u64,
    next_segment: u64,
    covered: BTreeMap<u64, u64>,
    tombs: Vec<(u64, Tomb)>,
    entries: Vec<(Box<[u8]>, Entry)>,
}

fn decode_snapshot(b: &[u8]) -> Option<Snapshot> {
    let body_len = b.len().checked_sub(8)?;
    let (body, sum) = b.split_at(body_len);
    if checksum(body).to_le_bytes() != sum || body.get(..8)? != SNAP_MAGIC {
        return None;
    }
    let mut c = Cursor::new(body, 8);
    let next_seq = c.u64()?;
    let next_segment = c.u64()?;
    let mut covered = BTreeMap::new();
    for _ in 0..c.u32()? {
        let id = c.u64()?;
        covered.insert(id, c.u64()?);
    }
    let tomb_count = c.u32()? as usize;
    // Counts come from checked bytes, but still never allocate past what
    // the file can hold.
    let mut tombs = Vec::with_capacity(tomb_count.min(body.len() / 24));
    for _ in 0..tomb_count {
        let segment = c.u64()?;
        let offset = c.u64()?;
        let len = c.u64()?;
        tombs.push((segment, Tomb { offset, len }));
    }
    let entry_count = usize::try_from(c.u64()?).ok()?;
    let mut entries = Vec::with_capacity(entry_count.min(body.len() / 40));
    for _ in 0..entry_count {
        let segment = c.u64()?;
        let offset = c.u64()?;
        let len = c.u64()?;
        let seq = c.u64()?;
        let key_len = c.u32()? as usize;
        let meta_len = c.u32()? as usize;
        let key: Box<[u8]> = c.take(key_len)?.into();
        let meta = record::decode_meta(c.take(meta_len)?)?;
        entries.push((
            key,
            Entry {
                segment,
                offset,
                len,
                seq,
                meta,
                pins: 0,
            },
        ));
    }
    (c.position() == body.len()).then_some(Snapshot {
        next_seq,
        next_segment,
        covered,
        tombs,
        entries,
    })
}

fn encode_snapshot(state: &State, next_seq: u64, next_segment: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + state.index.len() * 128);
    out.extend_from_slice(&SNAP_MAGIC);
    out.extend_from_slice(&next_seq.to_le_bytes());
    out.extend_from_slice(&next_segment.to_le_bytes());
    out.extend_from_slice(&(state.segments.len() as u32).to_le_bytes());
    for (id, seg) in &state.segments {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&seg.size.to_le_bytes());
    }
    let tombs: usize = state.segments.values().map(|s| s.tombs.len()).sum();
    out.extend_from_slice(&(tombs as u32).to_le_bytes());
    for (id, seg) in &state.segments {
        for t in &seg.tombs {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
            out.extend_from_slice(&t.len.to_le_bytes());
        }
    }
    out.extend_from_slice(&(state.index.len() as u64).to_le_bytes());
    for (key, e) in &state.index {
        let meta = record::encode_meta(&e.meta);
        for v in [e.segment, e.offset, e.len, e.seq] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&meta);
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

impl DiskTier {
    /// Opens the tier stored in `dir` (created if missing), recovering
    /// what a crash left (see the module documentation).
    pub fn open(dir: impl AsRef<Path>, options: DiskOptions) -> Result<DiskTier> {
        let dir = dir.as_ref().to_path_buf();
        if options.segment_bytes == 0 {
            return Err(Error::Config {
                field: "disk.segment_bytes".into(),
                message: "must be above 0".into(),
            });
        }
        fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
        // Two writers would interleave records and overwrite each other's
        // snapshot: one open tier per directory, across processes. The
        // kernel drops the lock with the process, so a crash leaves none.
        let lock_path = dir.join(LOCK);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io_err("opening", &lock_path, e))?;
        // A lock belongs to the open file, and a child process forked
        // between our open and its exec briefly shares that file: a tier
        // that was just closed may still look locked for a moment. Busy
        // means "retry for a short while", not "open elsewhere" at once.
        let started = std::time::Instant::now();
        loop {
            match rustix::fs::flock(
                &lock_file,
                rustix::fs::FlockOperation::NonBlockingLockExclusive,
            ) {
                Ok(()) => break,
                Err(e)
                    if e == rustix::io::Errno::WOULDBLOCK && started.elapsed() < LOCK_PATIENCE =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(io_err(
                        "locking (is the tier open elsewhere?)",
                        &lock_path,
                        e.into(),
                    ));
                }
            }
        }
        let mut ids = BTreeSet::new();
        for item in fs::read_dir(&dir).map_err(|e| io_err("listing", &dir, e))? {
            let item = item.map_err(|e| io_err("listing", &dir, e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                let path = item.path();
                fs::remove_file(&path).map_err(|e| io_err("removing", &path, e))?;
            } else if let Some(id) = segment_id(name) {
                ids.insert(id);
            }
        }

        let mut state = State::default();
        let mut lens = BTreeMap::new();
        for &id in &ids {
            let path = dir.join(segment_name(id));
            let file = open_segment(&path, false)?;
            let len = file
                .metadata()
                .map_err(|e| io_err("reading the length of", &path, e))?
                .len();
            lens.insert(id, len);
            state.segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    size: 0,
                    live: 0,
                    pinned: 0,
                    tombs: Vec::new(),
                },
            );
        }

        let snap_path = dir.join(SNAPSHOT);
        let snapshot = match fs::read(&snap_path) {
            Ok(bytes) => decode_snapshot(&bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("reading", &snap_path, e)),
        };
        // A snapshot covering more of a segment than the file holds does
        // not describe these files: rebuild.
        let snapshot = snapshot.filter(|s| {
            s.covered
                .iter()
                .all(|(id, &len)| lens.get(id).is_none_or(|&have| have >= len))
        });
        let mut dirty = snapshot.is_none();
        let mut next_seq = 1;
        let mut next_segment = ids.last().map_or(1, |&id| id + 1);
        let mut covered = BTreeMap::new();
        if let Some(s) = snapshot {
            next_seq = s.next_seq;
            next_segment = next_segment.max(s.next_segment);
            // Segments deleted after the snapshot take their entries along.
            dirty |= s.covered.keys().any(|id| !ids.contains(id));
            for (id, t) in s.tombs {
                let within = s
                    .covered
                    .get(&id)
                    .is_some_and(|&c| t.offset.saturating_add(t.len) <= c);
                if let (true, Some(seg)) = (within, state.segments.get_mut(&id)) {
                    seg.tombs.push(t);
                }
            }
            for (key, e) in s.entries {
                let within = s
                    .covered
                    .get(&e.segment)
                    .is_some_and(|&c| e.offset.saturating_add(e.len) <= c);
                if within && ids.contains(&e.segment) {
                    next_seq = next_seq.max(e.seq.saturating_add(1));
                    state.index.insert(key, e);
                }
            }
            covered = s.covered;
        }

        // Deletions seen by the scan, by sequence number, so that a record
        // scanned later but written earlier does not come back.
        let mut deleted: HashMap<Vec<u8>, u64> = HashMap::new();
        for &id in &ids {
            let path = dir.join(segment_name(id));
            let start = covered.get(&id).copied().unwrap_or(0);
            let len = lens.get(&id).copied().unwrap_or(0);
            let Some(seg) = state.segments.get_mut(&id) else {
                continue;
            };
            let file = seg.file.clone();
            let mut tombs = Vec::new();
            let index = &mut state.index;
            let end = scan_segment(&file, start, len, |r| {
                dirty = true;
                next_seq = next_seq.max(r.seq.saturating_add(1));
                if r.kind == Kind::Object && r.intact {
                    let stale = index.get(r.key.as_slice()).is_some_and(|e| e.seq > r.seq)
                        || deleted.get(&r.key).is_some_and(|&d| d > r.seq);
                    if !stale {
                        index.insert(
                            r.key.into(),
                            Entry {
                                segment: id,
                                offset: r.offset,
                                len: r.len,
                                seq: r.seq,
                                meta: r.meta,
                                pins: 0,
                            },
                        );
                    }
                } else {
                    if r.kind == Kind::Tombstone {
                        tombs.push(Tomb {
                            offset: r.offset,
                            len: r.len,
                        });
                    }
                    if index.get(r.key.as_slice()).is_some_and(|e| e.seq <= r.seq) {
                        // An equal sequence number is the same write (a
                        // copy): a damaged copy drops it too.
                        index.remove(r.key.as_slice());
                    }
                    let d = deleted.entry(r.key).or_insert(0);
                    *d = (*d).max(r.seq);
                }
            })
            .map_err(|e| io_err("scanning", &path, e))?;
            if let Some(seg) = state.segments.get_mut(&id) {
                seg.tombs.extend(tombs);
                seg.size = end;
            }
            if end < len {
                // The torn tail of a crash (or garbage): cut it off so the
                // next append follows the last whole record.
                file.set_len(end)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io_err("truncating", &path, e))?;
                dirty = true;
            }
        }

        // The totals, from the index as loaded.
        state.total = state.segments.values().map(|s| s.size).sum();
        let entries: Vec<(u64, u64, u64)> = state
            .index
            .values()
            .map(|e| (e.segment, e.len, e.meta.length))
            .collect();
        for (segment, len, payload) in entries {
            if let Some(seg) = state.segments.get_mut(&segment) {
                seg.live += len;
            }
            state.payload += payload;
        }

        let capacity = options.capacity_bytes;
        let segment_bytes = options.segment_bytes.min(capacity / 4).max(1);
        let mut dir_unsynced = false;
        let (active, file, size) = match state.segments.iter().next_back() {
            Some((&id, seg)) if seg.size < segment_bytes => (id, seg.file.clone(), seg.size),
            _ => {
                let id = next_segment;
                next_segment += 1;
                let file = Arc::new(open_segment(&dir.join(segment_name(id)), true)?);
                state.segments.insert(
                    id,
                    Segment {
                        file: file.clone(),
                        size: 0,
                        live: 0,
                        pinned: 0,
                        tombs: Vec::new(),
                    },
                );
                dir_unsynced = true;
                (id, file, 0)
            }
        };
        if options.sync_on_put && dir_unsynced {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("syncing", &dir, e))?;
            dir_unsynced = false;
        }
        Ok(DiskTier {
            _lock: lock_file,
            dir,
            capacity,
            segment_bytes,
            sync_on_put: options.sync_on_put,
            writer: Mutex::new(Writer {
                active,
                file,
                size,
                next_seq,
                next_segment,
                // What an earlier process wrote may still be only in the
                // page cache: the first flush syncs it all (cheap where it
                // is already on the medium).
                unsynced: state.segments.keys().copied().collect(),
                dir_unsynced,
                dirty,
            }),
            state: Mutex::new(state),
            dropped: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        })
    }

    /// The directory the tier lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of all segment files now (live and dead records): what
    /// `capacity_bytes` bounds.
    pub fn disk_bytes(&self) -> u64 {
        lock(&self.state).total
    }

    /// Flushes (see [`Tier::flush`]) and closes the tier, reporting what
    /// dropping it would ignore.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    /// Seals the active segment and starts a new one.
    fn rotate(&self, w: &mut Writer) -> Result<()> {
        let id = w.next_segment;
        let path = self.segment_path(id);
        let file = Arc::new(open_segment(&path, true)?);
        w.next_segment += 1;
        w.active = id;
        w.file = file.clone();
        w.size = 0;
        w.dir_unsynced = true;
        if self.sync_on_put {
            self.sync_dir(w)?;
        }
        lock(&self.state).segments.insert(
            id,
            Segment {
                file,
                size: 0,
                live: 0,
                pinned: 0,
                tombs: Vec::new(),
            },
        );
        Ok(())
    }

    /// Fsyncs the data of every segment written since its last fsync.
    fn sync_segments(&self, w: &mut Writer) -> Result<()> {
        let files: Vec<(u64, Arc<File>)> = {
            let s = lock(&self.state);
            w.unsynced
                .iter()
                .filter_map(|id| s.segments.get(id).map(|seg| (*id, seg.file.clone())))
                .collect()
        };
        for (id, file) in files {
            file.sync_data()
                .map_err(|e| io_err("syncing", &self.segment_path(id), e))?;
        }
        w.unsynced.clear();
        Ok(())
    }

    fn sync_dir(&self, w: &mut Writer) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("syncing", &self.dir, e))?;
        w.dir_unsynced = false;
        Ok(())
    }

    /// Appends one record (given in parts, written with one vectored
    /// write) and says where it went. The caller updates the index.
    fn append(&self, w: &mut Writer, parts: &[&[u8]]) -> Result<(u64, u64)> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if w.size > 0 && w.size + len > self.segment_bytes {
            self.rotate(w)?;
        }
        let offset = w.size;
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        let mut result = Ok(());
        while !bufs.is_empty() {
            match (&*w.file).write_vectored(bufs) {
                Ok(0) => {
                    result = Err(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if self.sync_on_put && result.is_ok() {
            result = w.file.sync_data();
        }
        if let Err(e) = result {
            // Leave no partial record behind: the file is opened for
            // appending, so the next write lands right after the last
            // whole one.
            let _ = w.file.set_len(offset);
            return Err(io_err("appending to", &self.segment_path(w.active), e));
        }
        w.size += len;
        w.unsynced.insert(w.active);
        w.dirty = true;
        Ok((w.active, offset))
    }

    fn full(&self, key: &ArtifactKey, message: String) -> Error {
        Error::Full {
            tier: TIER.into(),
            key: key.to_string(),
            message,
        }
    }

    /// Frees space until `len` more bytes fit, or fails changing nothing.
    fn make_room(&self, w: &mut Writer, len: u64, key: &ArtifactKey) -> Result<()> {
        let (total, pinned) = {
            let s = lock(&self.state);
            (s.total, s.pinned)
        };
        if total + len <= self.capacity {
            return Ok(());
        }
        if len > self.capacity {
            return Err(self.full(
                key,
                format!(
                    "a record of {len} bytes exceeds the capacity ({} bytes)",
                    self.capacity
                ),
            ));
        }
        if pinned + len > self.capacity {
            return Err(self.full(
                key,
                format!(
                    "{len} bytes do not fit: {pinned} of the {} bytes of capacity are pinned",
                    self.capacity
                ),
            ));
        }
        let need = total + len - self.capacity;
        let fits = |tier: &DiskTier| lock(&tier.state).total + len <= tier.capacity;

        // Compaction first, when it frees enough by itself.
        let candidates = {
            let s = lock(&self.state);
            let oldest = s.segments.keys().next().copied();
            let mut c: Vec<(u64, u64)> = s
                .segments
                .iter()
                .filter(|&(&id, seg)| id != w.active && seg.live * 2 < seg.size)
                .map(|(&id, seg)| {
                    let tombs: u64 = if Some(id) == oldest {
                        0
                    } else {
                        seg.tombs.iter().map(|t| t.len).sum()
                    };
                    (id, seg.size.saturating_sub(seg.live + tombs))
                })
                .collect();
            c.sort_by_key(|g| std::cmp::Reverse(g.1));
            c
        };
        if candidates.iter().map(|c| c.1).sum::<u64>() >= need {
            for (id, _) in candidates {
                if fits(self) {
                    break;
                }
                self.reclaim(w, id, true)?;
            }
            if fits(self) {
                return Ok(());
            }
        }

        // Then whole segments, oldest first, the active one last.
        let ids: Vec<u64> = lock(&self.state).segments.keys().copied().collect();
        for id in ids {
            if fits(self) {
                break;
            }
            if id == w.active {
                if w.size == 0 {
                    continue;
                }
                self.rotate(w)?;
            }
            self.reclaim(w, id, false)?;
        }
        if fits(self) {
            Ok(())
        } else {
            Err(self.full(
                key,
                "objects were pinned while room was being made".to_string(),
            ))
        }
    }

    /// Empties the sealed segment `id` and deletes it: live records are
    /// copied forward if pinned (or all of them, when `compact`), the rest
    /// are evicted.
    fn reclaim(&self, w: &mut Writer, id: u64, compact: bool) -> Result<()> {
        let (file, moves, tombs) = {
            let mut s = lock(&self.state);
            let oldest = s.segments.keys().next() == Some(&id);
            let Some(seg) = s.segments.get(&id) else {
                return Ok(());
            };
            let file = seg.file.clone();
            // A tombstone matters while an older segment may still hold
            // what it deleted.
            let tombs = if oldest {
                Vec::new()
            } else {
                seg.tombs.clone()
            };
            let mut moves = Vec::new();
            let mut evict = Vec::new();
            for (key, e) in &s.index {
                if e.segment == id {
                    if compact || e.pins > 0 {
                        moves.push((key.clone(), e.offset, e.len));
                    } else {
                        evict.push(key.clone());
                    }
                }
            }
            for key in evict {
                s.remove(&key);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            (file, moves, tombs)
        };
        let path = self.segment_path(id);
        let copied = !moves.is_empty() || !tombs.is_empty();
        for (key, offset, len) in moves {
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| io_err("reading", &path, e))?;
            if record::decode(&buf).is_err() {
                // Damaged on disk: never copy it forward.
                lock(&self.state).remove_if_at(&key, id, offset);
                continue;
            }
            let (to, at) = self.append(w, &[&buf])?;
            let mut s = lock(&self.state);
            s.grow(to, len);
            if let Some(mut e) = s
                .index
                .get(&key)
                .filter(|e| e.segment == id && e.offset == offset)
                .cloned()
            {
                e.segment = to;
                e.offset = at;
                s.insert(key, e);
            }
        }
        for t in tombs {
            let mut buf = vec![0u8; usize::try_from(t.len).unwrap_or(usize::MAX)];
            file.read_exact_at(&mut buf, t.offset)
                .map_err(|e| io_err("reading", &path, e))?;
            let (to, at) = self.append(w, &[&buf])?;
            let mut s = lock(&self.state);
            s.grow(to, t.len);
            if let Some(seg) = s.segments.get_mut(&to) {
                seg.tombs.push(Tomb {
                    offset: at,
                    len: t.len,
                });
            }
        }
        w.unsynced.remove(&id);
        if copied {
            // The copies must be on the medium before the originals go: a
            // power loss must not take a flushed object with it.
            self.sync_segments(w)?;
        }
        {
            let mut s = lock(&self.state);
            if let Some(seg) = s.segments.remove(&id) {
                s.total -= seg.size;
            }
        }
        w.dir_unsynced = true;
        w.dirty = true;
        fs::remove_file(&path).map_err(|e| io_err("removing", &path, e))
    }

    fn pin_by(&self, key: &ArtifactKey, delta: i32) -> Result<bool> {
        let encoded = key.encode()?;
        let mut s = lock(&self.state);
        let State {
            index,
            segments,
            pinned,
            ..
        } = &mut *s;
        let Some(e) = index.get_mut(encoded.as_slice()) else {
            return Ok(false);
        };
        let was = e.pins > 0;
        e.pins = e.pins.saturating_add_signed(delta);
        let is = e.pins > 0;
        if was != is {
            let seg = segments.get_mut(&e.segment);
            if is {
                *pinned += e.len;
                if let Some(seg) = seg {
                    seg.pinned += e.len;
                }
            } else {
                *pinned = pinned.saturating_sub(e.len);
                if let Some(seg) = seg {
                    seg.pinned = seg.pinned.saturating_sub(e.len);
                }
            }
        }
        Ok(true)
    }

    fn corrupt(&self, key: &ArtifactKey, reason: String) -> Error {
        Error::Corrupt {
            tier: TIER.into(),
            key: key.to_string(),
            reason,
        }
    }
}

impl Tier for DiskTier {
    fn name(&self) -> &str {
        TIER
    }

    fn get(&self, key: &ArtifactKey) -> Result<Option<Object>> {
        let encoded = key.encode()?;
        let found = {
            let s = lock(&self.state);
            s.index.get(encoded.as_slice()).map(|e| {
                let file = s.segments.get(&e.segment).map(|seg| seg.file.clone());
                (e.clone(), file)
            })
        };
        let Some((entry, file)) = found else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let path = self.segment_path(entry.segment);
        let drop_it = |reason: String| {
            if lock(&self.state).remove_if_at(&encoded, entry.segment, entry.offset) {
                self.dropped.store(true, Ordering::Relaxed);
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
            self.corrupt(key, format!("{reason} (in {})", path.display()))
        };
        let Some(file) = file else {
            return Err(drop_it("its segment is gone".into()));
        };
        let Ok(len) = usize::try_from(entry.meta.length) else {
            return Err(drop_it(format!("length {} too large", entry.meta.length)));
        };
        let Some(at) = entry
            .len
            .checked_sub(entry.meta.length)
            .and_then(|head| entry.offset.checked_add(head))
        else {
            return Err(drop_it("its index entry is inconsistent".into()));
        };
        // Hash each piece right after reading it, while it is still in
        // the CPU's cache: checking a large object then costs little more
        // than reading it.
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let read = pread_shared(&file, at, len, READ_PIECE, |piece| hasher.update(piece));
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(drop_it("the record is cut short".into()));
            }
            Err(e) => return Err(io_err("reading", &path, e)),
        };
        let sum = hasher.digest();
        if sum != entry.meta.checksum {
            return Err(drop_it(format!(
                "payload checksum {sum:016x} does not match the stored {:016x}",
                entry.meta.checksum
            )));
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Object {
            meta: entry.meta,
            bytes,
        }))
    }

    fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> Result<()> {
        let encoded = key.encode()?;
        // The checksum and the encoding before locking: they are the slow
        // part that needs no lock.
        let meta = Meta {
            length: bytes.len() as u64,
            checksum: checksum(bytes),
            ..meta
        };
        let meta_bytes = record::encode_meta(&meta);
        let mut head = vec![0u8; HEADER_LEN];
        head.extend_from_slice(&encoded);
        head.extend_from_slice(&meta_bytes);
        let len = head.len() as u64 + bytes.len() as u64;

        let mut w = lock(&self.writer);
        self.make_room(&mut w, len, key)?;
        let seq = w.next_seq;
        w.next_seq += 1;
        let header = Header::new(Kind::Object, &encoded, &meta_bytes, meta.length, seq);
        head[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        let (segment, offset) = self.append(&mut w, &[&head, bytes])?;
        let mut s = lock(&self.state);
        s.grow(segment, len);
        let pins = s.index.get(encoded.as_slice()).map_or(0, |e| e.pins);
        s.insert(
            encoded.into(),
            Entry {
                segment,
                offset,
                len,
                seq,
                meta,
                pins,
            },
        );
        Ok(())
    }

    fn contains(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        Ok(lock(&self.state).index.contains_key(encoded.as_slice()))
    }

    /// Appends a tombstone (so that a restart does not bring the key back)
    /// and drops the key. Fails with [`Error::Full`] only when the few
    /// bytes of the tombstone cannot be found because everything is pinned.
    fn delete(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        let mut w = lock(&self.writer);
        if !lock(&self.state).index.contains_key(encoded.as_slice()) {
            return Ok(false);
        }
        let len = (HEADER_LEN + encoded.len()) as u64;
        self.make_room(&mut w, len, key)?;
        let seq = w.next_seq;
        w.next_seq += 1;
        let header = Header::new(Kind::Tombstone, &encoded, &[], 0, seq);
        let (segment, offset) = self.append(&mut w, &[&header.to_bytes(), &encoded])?;
        let mut s = lock(&self.state);
        s.grow(segment, len);
        if let Some(seg) = s.segments.get_mut(&segment) {
            seg.tombs.push(Tomb { offset, len });
        }
        s.remove(&encoded);
        Ok(true)
    }

    fn stats(&self) -> TierStats {
        let s = lock(&self.state);
        TierStats {
            objects: s.index.len() as u64,
            bytes: s.payload,
            capacity_bytes: self.capacity,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    fn list(&self) -> Result<Vec<(ArtifactKey, Meta)>> {
        let s = lock(&self.state);
        s.index
            .iter()
            .map(|(k, e)| Ok((ArtifactKey::decode(k)?, e.meta.clone())))
            .collect()
    }

    /// Fsyncs every segment written since the last flush and the
    /// directory, then writes the index snapshot (temp file, fsync,
    /// rename, fsync of the directory). After it returns, everything
    /// stored survives a power loss, and the next open reads the snapshot
    /// instead of scanning.
    fn flush(&self) -> Result<()> {
        let mut w = lock(&self.writer);
        self.sync_segments(&mut w)?;
        if self.dropped.swap(false, Ordering::Relaxed) || w.dirty {
            let bytes = encode_snapshot(&lock(&self.state), w.next_seq, w.next_segment);
            let tmp = self.dir.join(SNAPSHOT_TMP);
            let write = || -> io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()
            };
            write().map_err(|e| io_err("writing", &tmp, e))?;
            let snap = self.dir.join(SNAPSHOT);
            fs::rename(&tmp, &snap).map_err(|e| io_err("renaming", &snap, e))?;
            w.dir_unsynced = true;
            w.dirty = false;
        }
        if w.dir_unsynced {
            self.sync_dir(&mut w)?;
        }
        Ok(())
    }

    fn can_pin(&self) -> bool {
        true
    }

    /// Pins `key` (in memory: pins do not survive a restart). A pinned
    /// object is copied forward, never evicted, when its segment is
    /// reclaimed; a `put` replacing it keeps its pins.
    fn pin(&self, key: &ArtifactKey) -> Result<bool> {
        self.pin_by(key, 1)
    }

    fn unpin(&self, key: &ArtifactKey) -> Result<bool> {
        self.pin_by(key, -1)
    }
}

impl Drop for DiskTier {
    /// Flushes, so that the next open loads the snapshot; errors are
    /// ignored here (call [`DiskTier::close`] to see them): the records
    /// themselves are already in the segment files.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_reject_damage() {
        let mut state = State::default();
        // Any open file will do: the snapshot only records its size.
        let file = tempfile::tempfile().unwrap();
        state.segments.insert(
            3,
            Segment {
                file: Arc::new(file),
                size: 500,
                live: 0,
                pinned: 0,
                tombs: vec![Tomb {
                    offset: 100,
                    len: 50,
                }],
            },
        );
        state.index.insert(
            b"key".to_vec().into(),
            Entry {
                segment: 3,
                offset: 0,
                len: 100,
                seq: 9,
                meta: Meta {
                    dtype: "bf16".into(),
                    shape: vec![1, 2],
                    length: 40,
                    checksum: 7,
                    ..Meta::default()
                },
                pins: 2,
            },
        );
        let bytes = encode_snapshot(&state, 10, 4);
        let s = decode_snapshot(&bytes).unwrap();
        assert_eq!((s.next_seq, s.next_segment), (10, 4));
        assert_eq!(s.covered.get(&3), Some(&500));
        assert_eq!(s.tombs.len(), 1);
        assert_eq!(s.entries.len(), 1);
        let (key, e) = &s.entries[0];
        assert_eq!(&**key, b"key");
        assert_eq!(
            (e.segment, e.offset, e.len, e.seq, e.pins),
            (3, 0, 100, 9, 0)
        );
        assert_eq!(e.meta.shape, vec![1, 2]);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(decode_snapshot(&bad).is_none(), "byte {i}");
        }
        assert!(decode_snapshot(&bytes[..bytes.len() - 1]).is_none());
    }
}
