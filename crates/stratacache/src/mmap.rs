//! The mmap tier: objects in a fixed-size mapped region of a file or of a
//! DAX device (`/dev/dax0.0`, CXL or persistent memory).
//!
//! # Design
//!
//! The region is mapped shared and read and written with plain memory
//! copies: no system call per object, and on a DAX device no page cache in
//! between. An allocator hands out space inside the region, frees it on
//! delete and reuses it; when no free extent is large enough, the least
//! recently used objects are evicted one at a time until one is, pinned
//! objects never. Before evicting anything, `put` checks that evicting every
//! unpinned object would leave a large enough contiguous extent; when it
//! would not (pinned objects in the way, or an object larger than the
//! region) it fails with [`Error::Full`] having evicted nothing. A `get`
//! returns a copy of the payload, checked against its checksum: the
//! block's space is reused once the object goes, so unlike the memory tier
//! there is no borrowed object to spare from eviction.
//!
//! The region describes itself: there is no index file. It is a small
//! header, then a sequence of blocks that tile the rest of the region, each
//! beginning with a [`record`] header. Opening a region walks
//! the blocks from the start and rebuilds the in-memory index (key to block,
//! metadata, pins, recency) and the free-extent map from what it finds.
//!
//! # Region format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       8     magic "STRATAMM"
//! 8       4     format version, 1 (u32, little-endian, as every integer here)
//! 12      4     block alignment, 64
//! 16      8     region size in bytes (a multiple of 64)
//! 24      8     XXH3-64 of bytes 0..24
//! 32      32    reserved, zero
//! 64      64    commit slot (below)
//! 128     ...   blocks, each starting at a multiple of 64, to the region's end
//! ```
//!
//! A block is one of:
//!
//! - an *object*: a record header of kind `Object`, the key's encoding, the
//!   metadata, the payload, then padding to the next multiple of 64. The
//!   block's length is the record's `total_len` rounded up to 64.
//! - *free space*: a record header of kind `Free` with no key and no
//!   metadata, whose `payload_len` is the block's length less the 40 header
//!   bytes. The bytes after the header are garbage (old objects).
//!
//! # Invariants
//!
//! - Blocks tile the region: a walk from offset 128, stepping by each
//!   block's length, lands exactly on the region's end.
//! - Two free blocks are never neighbours once an operation completes (the
//!   free map holds maximal extents), so a freed block merges with both
//!   neighbours.
//! - Only a block's header says what the block is. Payloads, keys and free
//!   space are never read as headers, so an object that happens to contain
//!   region bytes cannot confuse a walk.
//!
//! # The crash story
//!
//! Every change of a block is prepared in space no walk reads and then made
//! by writing one 40-byte header, the *commit point*:
//!
//! - **put** into a free block of length `L` at `o`: the key, metadata and
//!   payload go after `o + 40`; if the block is split, the remainder's free
//!   header goes to `o + n`. All of this lies inside the free block, which a
//!   walk skips whole. Then the object's header is written at `o`.
//! - **replace**: the new object is put elsewhere first, then the old block
//!   is freed. A crash in between leaves two objects with the key; opening
//!   keeps the one with the larger sequence number and frees the other.
//! - **delete / evict**: one free header, written at the lowest offset of
//!   the block merged with its free neighbours. Before it, the walk sees
//!   free, object, free; after it, one free block. Both tile the region.
//!
//! A 40-byte header is written by several stores, so a process killed in
//! the middle would leave a header that is neither the old nor the new one.
//! The *commit slot* closes that gap: before a header is written, the
//! offset and the new header go into the slot with their own checksum;
//! after, the slot is zeroed. Opening a region whose slot checks writes its
//! header again (the data behind it was complete before the slot was
//! written) and so always finds the block either before or after the
//! change. A slot torn while being written fails its checksum and is
//! ignored; the header it was for was not touched yet.
//!
//! That covers a process killed at any instruction: what it wrote is in the
//! mapping, so in the page cache or on the DAX device. A power loss loses
//! what the hardware had not persisted, in any order. [`MmapTier::flush`]
//! (msync) makes everything so far durable. Between flushes, with
//! [`MmapOptions::sync_writes`] off, a power loss can leave a region whose
//! walk fails: opening reports [`Error::Corrupt`] naming the offset, and
//! [`MmapOptions::repair`] opens it anyway. With `sync_writes` on, every
//! commit is ordered by msync (data, then slot, then header), so the region
//! survives a power loss at any point, at the cost of three msyncs a put.
//! On a device DAX mapping msync may not write back CPU caches; there,
//! power-loss durability needs a platform whose caches are persistent
//! (eADR): this tier issues no cache-line flushes of its own.
//!
//! A payload damaged in place (a flipped bit, a write from outside) is
//! caught by its checksum on `get`: the call fails with
//! [`Error::Corrupt`], the block is freed, and the next `get` is a miss.
//!
//! # Limits
//!
//! - One process maps a region at a time. The tier takes an exclusive
//!   advisory lock (`flock`) on the file and a second opener, in this
//!   process or another, fails (after half a second: a lock can linger
//!   for a moment in a child being spawned) with a message naming the
//!   path. The lock is
//!   advisory: a program that ignores it and writes the file breaks the
//!   region, and one that truncates it makes the mapping fault.
//! - Pins live in memory: they are not kept across a reopen.
//! - One mutex guards the index, the allocator and the copies in and out of
//!   the mapping. Copying under the lock keeps a block from being reused
//!   while it is read; a `get` of a large object holds up other calls for
//!   the length of one memory copy.
//! - A region's size is fixed when it is formatted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering, compiler_fence};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use memmap2::MmapMut;

use crate::record::{self, HEADER_LEN, Header, Kind};
use crate::tier::{Meta, Object, Tier, TierStats, checksum, shared_bytes};
use crate::{ArtifactKey, Error, Result};

const TIER: &str = "mmap";

/// Alignment of every block, and the granule of allocation.
pub const ALIGN: u64 = 64;

/// The region format written by this version.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: [u8; 8] = *b"STRATAMM";
const SLOT_OFF: u64 = 64;
const SLOT_LEN: usize = 64;
/// Offset of the first block.
const DATA_START: u64 = 128;
const HEADER_LEN_U64: u64 = HEADER_LEN as u64;

/// How to open an [`MmapTier`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmapOptions {
    /// Region size in bytes, rounded down to a multiple of 64. A regular
    /// file is created or extended to it. 0 means the size of the existing
    /// region, file or device (read from sysfs for a device). Opening an
    /// existing region with another non-zero size fails: a region's size is
    /// fixed. On device DAX the size must be a multiple of the device's
    /// alignment (usually 2 MiB) for the mapping to succeed.
    pub size_bytes: u64,
    /// Create the file if it is missing and format a new region where the
    /// file or device holds none yet (its first 128 bytes are zero, as in a
    /// new file; anything else that is not a region is refused, never
    /// overwritten). When `false`, the path must hold a region already.
    /// Default `true`.
    pub create: bool,
    /// When a walk of the region meets an invalid block header (a region
    /// damaged from outside, or a power loss between flushes without
    /// [`MmapOptions::sync_writes`]), free everything from that block to the
    /// end and open, instead of failing with [`Error::Corrupt`]. The objects
    /// before it are kept. Default `false`.
    pub repair: bool,
    /// Order every commit with msync (data, then commit slot, then header)
    /// so that the region survives a power loss at any point, not just
    /// after [`MmapTier::flush`]. Costs three msyncs a put. Default `false`.
    pub sync_writes: bool,
}

impl Default for MmapOptions {
    fn default() -> MmapOptions {
        MmapOptions {
            size_bytes: 0,
            create: true,
            repair: false,
            sync_writes: false,
        }
    }
}

/// The mmap / DAX tier. See the module documentation.
///
/// ```
/// use stratacache::{ArtifactKey, CustomKey, Meta, MmapOptions, MmapTier, Tier};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("region");
/// let options = MmapOptions { size_bytes: 1 << 20, ..MmapOptions::default() };
/// let key = ArtifactKey::Custom(CustomKey { namespace: "doc".into(), name: "a".into() });
/// {
///     let tier = MmapTier::open(&path, options.clone()).unwrap();
///     tier.put(&key, Meta::default(), b"hello").unwrap();
///     tier.flush().unwrap();
/// }
/// // The region is its own index: a new process finds the object again.
/// let tier = MmapTier::open(&path, options).unwrap();
/// assert_eq!(&*tier.get(&key).unwrap().unwrap().bytes, b"hello");
/// ```
#[derive(Debug)]
pub struct MmapTier {
    path: String,
    region_len: u64,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    /// Held for the flock: it lasts as long as this descriptor.
    _file: File,
}

#[derive(Debug)]
struct Entry {
    off: u64,
    /// Block length (aligned).
    len: u64,
    header: Header,
    meta: Meta,
    pins: u32,
    tick: u64,
}

/// Free extents, by offset and by (length, offset) for best fit.
#[derive(Debug, Default)]
struct FreeMap {
    by_off: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
    total: u64,
}

impl FreeMap {
    fn insert(&mut self, off: u64, len: u64) {
        self.by_off.insert(off, len);
        self.by_len.insert((len, off));
        self.total += len;
    }

    fn remove(&mut self, off: u64) -> Option<u64> {
        let len = self.by_off.remove(&off)?;
        self.by_len.remove(&(len, off));
        self.total -= len;
        Some(len)
    }

    /// The smallest extent of at least `need` bytes (lowest offset among
    /// equals).
    fn best_fit(&self, need: u64) -> Option<(u64, u64)> {
        self.by_len
            .range((need, 0)..)
            .next()
            .map(|&(len, off)| (off, len))
    }

    fn largest(&self) -> u64 {
        self.by_len.last().map_or(0, |&(len, _)| len)
    }
}

#[derive(Debug)]
struct Inner {
    map: MmapMut,
    region_len: u64,
    sync_writes: bool,
    /// An msync that failed after its commit point: the change is in the
    /// mapping but may not be durable. Reported by the next `flush`.
    sync_error: Option<std::io::Error>,
    index: HashMap<Arc<[u8]>, Entry>,
    by_off: BTreeMap<u64, Arc<[u8]>>,
    /// Recency: tick to key, least recent first.
    lru: BTreeMap<u64, Arc<[u8]>>,
    free: FreeMap,
    tick: u64,
    next_seq: u64,
    payload_bytes: u64,
}

/// What a walk found at one offset.
enum Found {
    Free {
        len: u64,
    },
    Object {
        len: u64,
        header: Header,
        key: Arc<[u8]>,
        meta: Meta,
    },
}

fn align_up(n: u64) -> Option<u64> {
    Some(n.checked_add(ALIGN - 1)? / ALIGN * ALIGN)
}

fn free_header(block_len: u64) -> [u8; HEADER_LEN] {
    Header::new(Kind::Free, &[], &[], block_len - HEADER_LEN_U64, 0).to_bytes()
}

fn io_err(op: &'static str, path: &str, source: std::io::Error) -> Error {
    Error::Io {
        tier: TIER.into(),
        op,
        path: path.into(),
        source,
    }
}

fn config_err(path: &str, message: String) -> Error {
    Error::Config {
        field: format!("mmap tier {path}"),
        message,
    }
}

fn corrupt_region(path: &str, reason: String) -> Error {
    Error::Corrupt {
        tier: TIER.into(),
        key: format!("region {path}"),
        reason,
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn region_header(region_len: u64) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(ALIGN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&region_len.to_le_bytes());
    let sum = checksum(&h[0..24]);
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The region size a valid header records, or why it is not valid.
fn parse_region_header(h: &[u8; 64]) -> std::result::Result<u64, String> {
    if checksum(&h[0..24]) != u64_at(h, 24) {
        return Err("region header checksum mismatch".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "region format version {version}; this build reads version {FORMAT_VERSION}"
        ));
    }
    let align = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if u64::from(align) != ALIGN {
        return Err(format!("block alignment {align}, expected {ALIGN}"));
    }
    let len = u64_at(h, 16);
    if !len.is_multiple_of(ALIGN) || len < DATA_START + ALIGN {
        return Err(format!("region size {len} is not a valid region size"));
    }
    Ok(len)
}

/// How long a second opener waits for the lock before it gives up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Takes the region's exclusive flock, waiting up to [`LOCK_WAIT`].
///
/// Why wait at all: a flock belongs to the open file description, and a
/// process that forks (any `Command::spawn` in this process) shares every
/// descriptor with the child until the child's exec closes it. A tier
/// dropped and reopened in that window would find its own old lock still
/// held for a moment.
fn lock_region(file: &File) -> std::io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK && start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The size of a character device, from sysfs (`/sys/dev/char/M:m/size`,
/// which device DAX provides).
fn char_device_size(meta: &std::fs::Metadata) -> Option<u64> {
    let dev = meta.rdev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let text = std::fs::read_to_string(format!("/sys/dev/char/{major}:{minor}/size")).ok()?;
    text.trim().parse().ok()
}

impl MmapTier {
    /// Opens the region at `path` (a regular file or a character device
    /// such as `/dev/dax0.0`), formatting a new one where there is none
    /// and [`MmapOptions::create`] allows, and rebuilds the index by walking
    /// its blocks. Fails with [`Error::Io`] when the file cannot be opened,
    /// sized, locked (it is open elsewhere) or mapped, [`Error::Config`]
    /// when the sizes do not fit or the file holds something else, and
    /// [`Error::Corrupt`] when the walk meets an invalid block (see
    /// [`MmapOptions::repair`]).
    pub fn open(path: impl AsRef<Path>, options: MmapOptions) -> Result<MmapTier> {
        let path_ref = path.as_ref();
        let path = path_ref.display().to_string();
        if options.create && options.size_bytes == 0 && !path_ref.exists() {
            return Err(config_err(
                &path,
                "does not exist and size_bytes is 0; give the region size".into(),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(options.create)
            .truncate(false)
            .open(path_ref)
            .map_err(|e| io_err("opening", &path, e))?;
        lock_region(&file).map_err(|e| {
            io_err(
                "locking (the region is already open in another tier or process)",
                &path,
                e,
            )
        })?;
        let fmeta = file
            .metadata()
            .map_err(|e| io_err("reading metadata of", &path, e))?;
        let is_device = fmeta.file_type().is_char_device();
        if !is_device && !fmeta.is_file() {
            return Err(config_err(
                &path,
                "not a regular file or a character device".into(),
            ));
        }
        let present = if is_device {
            char_device_size(&fmeta).unwrap_or(0)
        } else {
            fmeta.len()
        };

        // The region header and the commit slot; a short file's bytes too,
        // so that they are never formatted over unless all zero.
        let mut first = [0u8; DATA_START as usize];
        let readable = if is_device {
            first.len()
        } else {
            first
                .len()
                .min(usize::try_from(present).unwrap_or(usize::MAX))
        };
        file.read_exact_at(&mut first[..readable], 0)
            .map_err(|e| io_err("reading the region header of", &path, e))?;
        let mut head = [0u8; 64];
        head.copy_from_slice(&first[..64]);
        let fresh = first.iter().all(|&b| b == 0);
        let region_len = if fresh {
            if !options.create {
                return Err(config_err(
                    &path,
                    "holds no region and create is false; open with create: true to format one"
                        .into(),
                ));
            }
            let want = if options.size_bytes == 0 {
                present
            } else {
                options.size_bytes
            };
            if want == 0 {
                return Err(config_err(
                    &path,
                    "size_bytes is 0 and the file or device has no size (or none that can be read); give the region size"
                        .into(),
                ));
            }
            if is_device && present != 0 && want > present {
                return Err(config_err(
                    &path,
                    format!("size_bytes {want} exceeds the device's {present} bytes"),
                ));
            }
            let len = want / ALIGN * ALIGN;
            if len < DATA_START + ALIGN {
                return Err(config_err(
                    &path,
                    format!(
                        "a region needs at least {} bytes, {want} given",
                        DATA_START + ALIGN
                    ),
                ));
            }
            if !is_device && present < len {
                file.set_len(len)
                    .map_err(|e| io_err("extending", &path, e))?;
            }
            len
        } else if head[0..8] == MAGIC {
            let len = parse_region_header(&head).map_err(|r| corrupt_region(&path, r))?;
            if options.size_bytes != 0 && options.size_bytes / ALIGN * ALIGN != len {
                return Err(config_err(
                    &path,
                    format!(
                        "the region is {len} bytes, size_bytes says {}; open with size_bytes 0 or {len}",
                        options.size_bytes
                    ),
                ));
            }
            if !is_device && present < len {
                return Err(corrupt_region(
                    &path,
                    format!("the file is {present} bytes, shorter than its {len}-byte region"),
                ));
            }
            len
        } else {
            return Err(config_err(
                &path,
                "holds data that is not a stratacache mmap region (unknown magic); refusing to overwrite it"
                    .into(),
            ));
        };
        let map_len = usize::try_from(region_len)
            .map_err(|_| config_err(&path, format!("{region_len} bytes cannot be mapped")))?;

        #[allow(unsafe_code)]
        // SAFETY: the mapping is only sound while no one else changes or
        // truncates the file under it. The file is owned by this tier: it
        // holds an exclusive flock for as long as the mapping lives (a
        // second opener, here or in another process, fails), it never
        // truncates the file, and all access goes through `Inner` behind a
        // mutex. Another process ignoring the advisory lock is unsupported,
        // as the module documentation says.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(map_len)
                .map_mut(&file)
                .map_err(|e| io_err("mapping", &path, e))?
        };

        let mut inner = Inner {
            map,
            region_len,
            sync_writes: options.sync_writes,
            sync_error: None,
            index: HashMap::new(),
            by_off: BTreeMap::new(),
            lru: BTreeMap::new(),
            free: FreeMap::default(),
            tick: 0,
            next_seq: 1,
            payload_bytes: 0,
        };
        if fresh {
            inner.format().map_err(|e| io_err("formatting", &path, e))?;
        }
        inner.replay_slot();
        inner.load(&path, options.repair)?;
        Ok(MmapTier {
            path,
            region_len,
            inner: Mutex::new(inner),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            _file: file,
        })
    }

    /// The file or device, as given to [`MmapTier::open`].
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The region's size in bytes, header included.
    pub fn region_len(&self) -> u64 {
        self.region_len
    }

    /// Bytes in free blocks, and the largest free block: an object needs a
    /// block of `40 + key + metadata + payload` bytes rounded up to 64.
    pub fn free_bytes(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.free.total, inner.free.largest())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change to the index follows its region write and nothing in
        // between can panic on input, so a poisoned lock is taken over.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn full(&self, key: &ArtifactKey, message: String) -> Error {
        Error::Full {
            tier: TIER.into(),
            key: key.to_string(),
            message,
        }
    }

    fn pin_by(&self, key: &ArtifactKey, delta: i32) -> Result<bool> {
        let encoded = key.encode()?;
        let mut inner = self.lock();
        match inner.index.get_mut(encoded.as_slice()) {
            Some(e) => {
                e.pins = e.pins.saturating_add_signed(delta);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl Inner {
    fn write(&mut self, off: u64, bytes: &[u8]) {
        let at = off as usize;
        self.map[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Bytes at `off`, or `None` past the region (for the walk, which reads
    /// lengths from the region itself).
    fn bytes(&self, off: u64, len: u64) -> Option<&[u8]> {
        let end = off.checked_add(len)?;
        if end > self.region_len {
            return None;
        }
        self.map.get(off as usize..end as usize)
    }

    /// Orders writes under `sync_writes`. A failure does not stop the
    /// operation (its writes are in the mapping already, and the index
    /// must keep matching the mapping); the next `flush` reports it.
    fn sync_range(&mut self, off: u64, len: u64) {
        if !self.sync_writes {
            return;
        }
        let len = len.min(self.region_len - off);
        if let Err(e) = self.map.flush_range(off as usize, len as usize) {
            self.sync_error.get_or_insert(e);
        }
    }

    /// Writes a block header at `off` through the commit slot, so that a
    /// crash at any point leaves either the old or the new header there.
    fn commit_header(&mut self, off: u64, header: [u8; HEADER_LEN]) {
        let mut slot = [0u8; SLOT_LEN];
        slot[0..8].copy_from_slice(&off.to_le_bytes());
        slot[8..48].copy_from_slice(&header);
        let sum = checksum(&slot[0..48]);
        slot[48..56].copy_from_slice(&sum.to_le_bytes());
        // The order of these writes is the crash story: a killed process
        // has done exactly the stores before some instruction, so the
        // compiler must not move one across another (the CPU may reorder
        // their arrival in memory, but a store executed is never lost to a
        // kill).
        compiler_fence(Ordering::SeqCst);
        self.write(SLOT_OFF, &slot);
        self.sync_range(SLOT_OFF, SLOT_LEN as u64);
        compiler_fence(Ordering::SeqCst);
        self.write(off, &header);
        self.sync_range(off, HEADER_LEN_U64);
        compiler_fence(Ordering::SeqCst);
        // A slot left valid would only rewrite the same header (every
        // header write goes through the slot), so clearing it needs no sync.
        self.write(SLOT_OFF, &[0u8; SLOT_LEN]);
    }

    /// Finishes a header write a crash interrupted (see the module docs).
    fn replay_slot(&mut self) {
        let mut slot = [0u8; SLOT_LEN];
        slot.copy_from_slice(&self.map[SLOT_OFF as usize..SLOT_OFF as usize + SLOT_LEN]);
        if slot == [0u8; SLOT_LEN] {
            return;
        }
        let off = u64_at(&slot, 0);
        let valid = checksum(&slot[0..48]) == u64_at(&slot, 48)
            && off >= DATA_START
            && off.is_multiple_of(ALIGN)
            && off
                .checked_add(HEADER_LEN_U64)
                .is_some_and(|end| end <= self.region_len)
            && Header::parse(&slot[8..48]).is_some();
        if valid {
            let mut header = [0u8; HEADER_LEN];
            header.copy_from_slice(&slot[8..48]);
            self.write(off, &header);
            self.sync_range(off, HEADER_LEN_U64);
        }
        self.write(SLOT_OFF, &[0u8; SLOT_LEN]);
        self.sync_range(SLOT_OFF, SLOT_LEN as u64);
    }

    /// Lays out an empty region: one free block, then the region header
    /// (last: until it is written the first 128 bytes are zero, so a
    /// format cut short is formatted again on the next open).
    fn format(&mut self) -> std::io::Result<()> {
        let len = self.region_len;
        self.write(DATA_START, &free_header(len - DATA_START));
        self.write(SLOT_OFF, &[0u8; SLOT_LEN]);
        self.map.flush_range(0, (DATA_START + ALIGN) as usize)?;
        self.write(0, &region_header(len));
        self.map.flush_range(0, 64)
    }

    /// The block at `off`, checked, or why it is not one.
    fn block_at(&self, off: u64) -> std::result::Result<Found, String> {
        let room = self.region_len - off;
        let head = self
            .bytes(off, HEADER_LEN_U64)
            .ok_or_else(|| format!("{room} bytes left, less than a block header"))?;
        let h = Header::parse(head).ok_or("no block header (bad magic or kind)")?;
        match h.kind {
            Kind::Free => {
                if h.key_len != 0 || h.meta_len != 0 || !h.check(&[], &[]) {
                    return Err("free block header fails its checksum".into());
                }
                let len = h
                    .payload_len
                    .checked_add(HEADER_LEN_U64)
                    .filter(|l| l % ALIGN == 0 && *l <= room)
                    .ok_or_else(|| {
                        format!(
                            "free block of {} bytes does not fit the {room} bytes left",
                            h.payload_len
                        )
                    })?;
                Ok(Found::Free { len })
            }
            Kind::Object => {
                let len = h
                    .payload_offset()
                    .checked_add(h.payload_len)
                    .and_then(align_up)
                    .filter(|l| *l <= room)
                    .ok_or_else(|| {
                        format!(
                            "object of {} payload bytes does not fit the {room} bytes left",
                            h.payload_len
                        )
                    })?;
                let key_off = off + HEADER_LEN_U64;
                let meta_off = key_off + u64::from(h.key_len);
                let key = self
                    .bytes(key_off, u64::from(h.key_len))
                    .ok_or("key past the region end")?;
                let meta_bytes = self
                    .bytes(meta_off, u64::from(h.meta_len))
                    .ok_or("metadata past the region end")?;
                if !h.check(key, meta_bytes) {
                    return Err("head checksum mismatch (header, key or metadata damaged)".into());
                }
                let meta = record::decode_meta(meta_bytes).ok_or("metadata does not decode")?;
                if meta.length != h.payload_len {
                    return Err(format!(
                        "metadata says {} payload bytes, header {}",
                        meta.length, h.payload_len
                    ));
                }
                ArtifactKey::decode(key).map_err(|e| format!("key does not decode: {e}"))?;
                Ok(Found::Object {
                    len,
                    header: h,
                    key: Arc::from(key),
                    meta,
                })
            }
            Kind::Tombstone => Err("a tombstone record has no place in a region".into()),
        }
    }

    /// Walks the region and builds the index and the free map; frees the
    /// older of two objects with one key and merges neighbouring free
    /// blocks (both left by a crash).
    fn load(&mut self, path: &str, repair: bool) -> Result<()> {
        let mut objects: Vec<(Arc<[u8]>, Entry)> = Vec::new();
        let mut free: Vec<(u64, u64)> = Vec::new();
        let mut off = DATA_START;
        while off < self.region_len {
            match self.block_at(off) {
                Ok(Found::Free { len }) => {
                    free.push((off, len));
                    off += len;
                }
                Ok(Found::Object {
                    len,
                    header,
                    key,
                    meta,
                }) => {
                    objects.push((
                        key,
                        Entry {
                            off,
                            len,
                            header,
                            meta,
                            pins: 0,
                            tick: 0,
                        },
                    ));
                    off += len;
                }
                Err(_) if repair => {
                    let len = self.region_len - off;
                    free.push((off, len));
                    // Written now, so the region walks again whether or
                    // not the merge below rewrites it.
                    self.commit_header(off, free_header(len));
                    break;
                }
                Err(reason) => {
                    return Err(corrupt_region(
                        path,
                        format!(
                            "invalid block at offset {off}: {reason}; open with repair: true to free everything from there to the end"
                        ),
                    ));
                }
            }
        }

        // Newest first within a key: the first seen is kept.
        objects.sort_by(|a, b| (&a.0, b.1.header.seq).cmp(&(&b.0, a.1.header.seq)));
        let mut kept: Vec<(Arc<[u8]>, Entry)> = Vec::with_capacity(objects.len());
        for (key, e) in objects {
            self.next_seq = self.next_seq.max(e.header.seq.saturating_add(1));
            if kept.last().is_some_and(|k| k.0 == key) {
                free.push((e.off, e.len));
            } else {
                kept.push((key, e));
            }
        }

        free.sort_unstable();
        let mut runs: Vec<(u64, u64, usize)> = Vec::new();
        for (off, len) in free {
            match runs.last_mut() {
                Some(run) if run.0 + run.1 == off => {
                    run.1 += len;
                    run.2 += 1;
                }
                _ => runs.push((off, len, 1)),
            }
        }
        for (off, len, blocks) in runs {
            if blocks > 1 {
                self.commit_header(off, free_header(len));
            }
            self.free.insert(off, len);
        }

        // Recency starts as write order.
        kept.sort_by_key(|k| k.1.header.seq);
        for (key, mut e) in kept {
            self.tick += 1;
            e.tick = self.tick;
            self.payload_bytes += e.header.payload_len;
            self.by_off.insert(e.off, key.clone());
            self.lru.insert(self.tick, key.clone());
            self.index.insert(key, e);
        }
        Ok(())
    }

    fn touch(&mut self, key: &[u8]) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.index.get_mut(key) {
            if let Some(k) = self.lru.remove(&e.tick) {
                self.lru.insert(tick, k);
            }
            e.tick = tick;
        }
    }

    /// Frees the block at `off`, merged with its free neighbours; one
    /// header write at the merged block's start.
    fn release(&mut self, off: u64, len: u64) {
        let mut start = off;
        let mut total = len;
        if let Some((&p, &plen)) = self.free.by_off.range(..off).next_back()
            && p + plen == off
        {
            start = p;
            total += plen;
        }
        let next = self.free.by_off.get(&(off + len)).copied();
        if let Some(nlen) = next {
            total += nlen;
        }
        self.commit_header(start, free_header(total));
        if start != off {
            self.free.remove(start);
        }
        if next.is_some() {
            self.free.remove(off + len);
        }
        self.free.insert(start, total);
    }

    /// Removes an object from the region and the index.
    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.index.remove(key)?;
        self.release(e.off, e.len);
        self.by_off.remove(&e.off);
        self.lru.remove(&e.tick);
        self.payload_bytes -= e.header.payload_len;
        Some(e)
    }

    /// Whether evicting every unpinned object except the one at `wall`,
    /// and freeing the one at `also` (pinned or not), would leave `need`
    /// contiguous bytes.
    fn could_fit(&self, need: u64, wall: Option<u64>, also: Option<u64>) -> bool {
        let mut run_start = DATA_START;
        for (&off, key) in &self.by_off {
            let Some(e) = self.index.get(key) else {
                continue;
            };
            if (e.pins > 0 && Some(off) != also) || Some(off) == wall {
                if off - run_start >= need {
                    return true;
                }
                run_start = off + e.len;
            }
        }
        self.region_len - run_start >= need
    }

    /// The least recently used object that may be evicted.
    fn victim(&self, keep: Option<u64>) -> Option<Arc<[u8]>> {
        self.lru
            .values()
            .find(|k| {
                self.index
                    .get(*k)
                    .is_some_and(|e| e.pins == 0 && Some(e.off) != keep)
            })
            .cloned()
    }
}

impl Tier for MmapTier {
    fn name(&self) -> &str {
        TIER
    }

    fn get(&self, key: &ArtifactKey) -> Result<Option<Object>> {
        let encoded = key.encode()?;
        let mut inner = self.lock();
        let Some(e) = inner.index.get(encoded.as_slice()) else {
            drop(inner);
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let (off, header, meta) = (e.off, e.header, e.meta.clone());
        // The header, key and metadata are checked again: the index was
        // built from them, but the region may have been written since.
        let head_ok = {
            let key_off = off + HEADER_LEN_U64;
            let meta_off = key_off + u64::from(header.key_len);
            inner.bytes(off, HEADER_LEN_U64) == Some(&header.to_bytes()[..])
                && match (
                    inner.bytes(key_off, u64::from(header.key_len)),
                    inner.bytes(meta_off, u64::from(header.meta_len)),
                ) {
                    (Some(k), Some(m)) => header.check(k, m),
                    _ => false,
                }
        };
        let bytes = if head_ok {
            let at = off + header.payload_offset();
            let src = inner.bytes(at, header.payload_len).unwrap_or_default();
            let copied = shared_bytes(src.len(), |buf| {
                buf.copy_from_slice(src);
                Ok::<(), std::convert::Infallible>(())
            });
            match copied {
                Ok(b) => Some(b),
                Err(never) => match never {},
            }
        } else {
            None
        };
        inner.touch(&encoded);
        drop(inner);

        let verdict = match &bytes {
            None => Err("block header, key or metadata changed in the region".to_string()),
            Some(b) => record::check_payload(&meta, b),
        };
        match verdict {
            Ok(()) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(bytes.map(|bytes| Object { meta, bytes }))
            }
            Err(reason) => {
                let mut inner = self.lock();
                // Only the block that was read: a put may have replaced it
                // since the lock was let go.
                if inner
                    .index
                    .get(encoded.as_slice())
                    .is_some_and(|e| e.off == off && e.header.seq == header.seq)
                {
                    inner.remove(&encoded);
                }
                drop(inner);
                self.misses.fetch_add(1, Ordering::Relaxed);
                Err(Error::Corrupt {
                    tier: TIER.into(),
                    key: key.to_string(),
                    reason: format!("{reason} (block at offset {off} of {})", self.path),
                })
            }
        }
    }

    /// Stores the object, evicting least recently used unpinned objects
    /// while no free block fits it. Before evicting anything it checks that
    /// evicting can make a large enough contiguous block; if not, it fails
    /// with [`Error::Full`] having changed nothing. A replacement is written
    /// beside the old object, which is freed after; only when the old
    /// object's own space is needed is it freed first (a crash in between
    /// then loses the key: a miss, never wrong bytes). A replacement keeps
    /// the old object's pins.
    fn put(&self, key: &ArtifactKey, meta: Meta, bytes: &[u8]) -> Result<()> {
        let encoded = key.encode()?;
        let meta = Meta {
            length: bytes.len() as u64,
            checksum: checksum(bytes),
            ..meta
        };
        let meta_bytes = record::encode_meta(&meta);
        let payload_len = bytes.len() as u64;
        let data_len = self.region_len - DATA_START;
        let need = (HEADER_LEN_U64 + encoded.len() as u64 + meta_bytes.len() as u64)
            .checked_add(payload_len)
            .and_then(align_up)
            .filter(|n| *n <= data_len)
            .ok_or_else(|| {
                self.full(
                    key,
                    format!(
                        "{payload_len} payload bytes do not fit a region of {data_len} bytes for blocks"
                    ),
                )
            })?;

        let mut inner = self.lock();
        let old = inner
            .index
            .get(encoded.as_slice())
            .map(|e| (e.off, e.len, e.pins));
        let mut keep = old.map(|o| o.0);
        let mut pins = old.map_or(0, |o| o.2);
        let mut replace_after = old;
        if inner.free.best_fit(need).is_none() {
            if !inner.could_fit(need, keep, None) {
                if old.is_some() && inner.could_fit(need, None, keep) {
                    // Only the old object's own space can hold the new one.
                    inner.remove(&encoded);
                    keep = None;
                    replace_after = None;
                } else {
                    return Err(self.full(
                        key,
                        format!(
                            "needs a {need}-byte block; the largest free block is {} bytes and evicting every unpinned object would not make one",
                            inner.free.largest()
                        ),
                    ));
                }
            }
            while inner.free.best_fit(need).is_none() {
                let Some(victim) = inner.victim(keep) else {
                    // could_fit said eviction suffices; not reached.
                    return Err(self.full(key, "no object left to evict".into()));
                };
                inner.remove(&victim);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some((o, l)) = inner.free.best_fit(need) else {
            return Err(self.full(key, "no free block after eviction".into()));
        };

        let seq = inner.next_seq;
        inner.next_seq += 1;
        let header = Header::new(Kind::Object, &encoded, &meta_bytes, payload_len, seq);
        let key_off = o + HEADER_LEN_U64;
        let meta_off = key_off + encoded.len() as u64;
        inner.write(key_off, &encoded);
        inner.write(meta_off, &meta_bytes);
        inner.write(header.payload_offset() + o, bytes);
        if l > need {
            inner.write(o + need, &free_header(l - need));
        }
        inner.sync_range(o, (need + HEADER_LEN_U64).min(l));
        inner.commit_header(o, header.to_bytes());

        inner.free.remove(o);
        if l > need {
            inner.free.insert(o + need, l - need);
        }
        let key_arc: Arc<[u8]> = Arc::from(encoded.as_slice());
        if let Some((old_off, old_len, _)) = replace_after {
            // Drop the old entry from the maps, then free its block.
            if let Some(e) = inner.index.remove(encoded.as_slice()) {
                inner.lru.remove(&e.tick);
                inner.payload_bytes -= e.header.payload_len;
                pins = e.pins;
            }
            inner.by_off.remove(&old_off);
            inner.release(old_off, old_len);
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.payload_bytes += payload_len;
        inner.by_off.insert(o, key_arc.clone());
        inner.lru.insert(tick, key_arc.clone());
        inner.index.insert(
            key_arc,
            Entry {
                off: o,
                len: need,
                header,
                meta,
                pins,
                tick,
            },
        );
        Ok(())
    }

    fn contains(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        Ok(self.lock().index.contains_key(encoded.as_slice()))
    }

    fn delete(&self, key: &ArtifactKey) -> Result<bool> {
        let encoded = key.encode()?;
        Ok(self.lock().remove(&encoded).is_some())
    }

    /// `capacity_bytes` is the space for blocks (the region less its
    /// 128-byte header); each object also takes a 40-byte header, its key
    /// and metadata, and padding to 64 bytes.
    fn stats(&self) -> TierStats {
        let inner = self.lock();
        TierStats {
            objects: inner.index.len() as u64,
            bytes: inner.payload_bytes,
            capacity_bytes: self.region_len - DATA_START,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    fn list(&self) -> Result<Vec<(ArtifactKey, Meta)>> {
        let inner = self.lock();
        inner
            .index
            .iter()
            .map(|(k, e)| Ok((ArtifactKey::decode(k)?, e.meta.clone())))
            .collect()
    }

    /// msync of the whole region; also reports an msync that failed during
    /// a write under [`MmapOptions::sync_writes`].
    fn flush(&self) -> Result<()> {
        let mut inner = self.lock();
        if let Some(e) = inner.sync_error.take() {
            return Err(io_err("syncing", &self.path, e));
        }
        inner
            .map
            .flush()
            .map_err(|e| io_err("syncing", &self.path, e))
    }

    fn can_pin(&self) -> bool {
        true
    }

    /// Pins `key`: it is not evicted until as many `unpin`s. Pins are kept
    /// in memory, not in the region: a reopened tier has none.
    fn pin(&self, key: &ArtifactKey) -> Result<bool> {
        self.pin_by(key, 1)
    }

    fn unpin(&self, key: &ArtifactKey) -> Result<bool> {
        self.pin_by(key, -1)
    }
}

impl Drop for MmapTier {
    /// A clean close writes the region back (best effort: there is no one
    /// to tell of a failure; call `flush` first to see it).
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _ = inner.map.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CustomKey;

    fn key(name: &str) -> ArtifactKey {
        ArtifactKey::Custom(CustomKey {
            namespace: "t".into(),
            name: name.into(),
        })
    }

    /// A region with `k` in its first block, then free space.
    fn region_with_one_object(dir: &Path) -> (std::path::PathBuf, u64) {
        let path = dir.join("region");
        let tier = MmapTier::open(
            &path,
            MmapOptions {
                size_bytes: DATA_START + 4 * 4096,
                ..MmapOptions::default()
            },
        )
        .unwrap();
        tier.put(&key("k"), Meta::default(), &[5u8; 3000]).unwrap();
        let len = tier.lock().index.values().next().unwrap().len;
        (path, len)
    }

    /// Writes the slot for `header` at `off` and then only `upto` bytes of
    /// the header, as a process killed inside `commit_header` leaves them.
    fn torn_commit(path: &Path, off: u64, header: [u8; HEADER_LEN], upto: usize) {
        let tier = MmapTier::open(path, MmapOptions::default()).unwrap();
        let mut inner = tier.lock();
        let mut slot = [0u8; SLOT_LEN];
        slot[0..8].copy_from_slice(&off.to_le_bytes());
        slot[8..48].copy_from_slice(&header);
        let sum = checksum(&slot[0..48]);
        slot[48..56].copy_from_slice(&sum.to_le_bytes());
        inner.write(SLOT_OFF, &slot);
        inner.write(off, &header[..upto]);
    }

    #[test]
    fn a_torn_header_is_finished_from_the_commit_slot() {
        for upto in [0, 1, 5, 8, 16, 20, 31, 32, 39, 40] {
            let dir = tempfile::tempdir().unwrap();
            let (path, len) = region_with_one_object(dir.path());
            // Freeing the object merges it with the free tail.
            let total = DATA_START + 4 * 4096 - DATA_START;
            assert!(len < total);
            torn_commit(&path, DATA_START, free_header(total), upto);
            let tier = MmapTier::open(&path, MmapOptions::default())
                .unwrap_or_else(|e| panic!("torn at {upto}: {e}"));
            assert!(!tier.contains(&key("k")).unwrap(), "torn at {upto}");
            assert_eq!(tier.free_bytes(), (total, total), "torn at {upto}");
            assert_eq!(
                tier.lock().map[SLOT_OFF as usize..][..SLOT_LEN],
                [0u8; SLOT_LEN],
                "the slot is cleared"
            );
        }
    }

    #[test]
    fn a_torn_slot_is_ignored_and_the_header_was_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = region_with_one_object(dir.path());
        {
            let tier = MmapTier::open(&path, MmapOptions::default()).unwrap();
            let mut inner = tier.lock();
            let mut slot = [0u8; SLOT_LEN];
            slot[0..8].copy_from_slice(&DATA_START.to_le_bytes());
            slot[8..48].copy_from_slice(&free_header(4 * 4096));
            // The checksum never made it.
            inner.write(SLOT_OFF, &slot[..40]);
        }
        let tier = MmapTier::open(&path, MmapOptions::default()).unwrap();
        assert_eq!(
            &*tier.get(&key("k")).unwrap().unwrap().bytes,
            &[5u8; 3000][..]
        );
    }

    #[test]
    fn without_the_slot_a_torn_header_fails_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = region_with_one_object(dir.path());
        {
            let tier = MmapTier::open(&path, MmapOptions::default()).unwrap();
            tier.lock().write(DATA_START, &free_header(4 * 4096)[..20]);
        }
        let err = MmapTier::open(&path, MmapOptions::default()).unwrap_err();
        assert!(err.to_string().contains("offset 128"), "{err}");
    }

    #[test]
    fn region_headers_round_trip_and_catch_damage() {
        let h = region_header(4096);
        assert_eq!(parse_region_header(&h), Ok(4096));
        for i in 0..32 {
            let mut bad = h;
            bad[i] ^= 1;
            assert!(parse_region_header(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn free_map_finds_the_best_fit() {
        let mut f = FreeMap::default();
        f.insert(128, 640);
        f.insert(1024, 128);
        f.insert(2048, 256);
        assert_eq!(f.best_fit(100), Some((1024, 128)));
        assert_eq!(f.best_fit(200), Some((2048, 256)));
        assert_eq!(f.best_fit(641), None);
        assert_eq!((f.total, f.largest()), (1024, 640));
        assert_eq!(f.remove(1024), Some(128));
        assert_eq!(f.best_fit(100), Some((2048, 256)));
    }
}
