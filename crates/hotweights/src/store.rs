//! A versioned, content-addressed local weight store with atomic swaps.
//!
//! ```text
//! STORE/
//!   chunks/blake3/ab/ab12...ef   one file per chunk, named by its hash
//!   versions/v2.manifest.pb      one WeightManifest per version
//!   state.json                   {"current": "v2", "history": ["v1"]}
//!   journal.json                 present while an apply runs
//!   tmp/                         files being written
//!   lock                         flock'd by the process changing the store
//! ```
//!
//! A version is a manifest that references chunks by hash, so chunks that two
//! versions share are stored once and never copied. The invariants that make
//! the store safe to crash at any instant:
//!
//! - **A chunk file is complete and verified.** [`Store::apply`] hashes every
//!   chunk before it writes it to `tmp/` and renames it into `chunks/`; a
//!   crash leaves at most a stray file in `tmp/`.
//! - **A version is visible only when all its chunks are durable.** Its
//!   manifest is written (atomically) after every chunk and after a
//!   `syncfs`, so a manifest in `versions/` means the whole version is there.
//! - **`current` flips atomically.** [`Store::commit`] and
//!   [`Store::rollback`] write the new `state.json` to a temporary file,
//!   fsync it and rename it over the old one: after a crash, `current` is
//!   either the old or the new version, never a mix. The cost does not
//!   depend on the model's size.
//! - **Only one process changes a store at a time** (an exclusive `flock` on
//!   `lock`, released by the kernel if the process dies).
//!
//! What a crash leaves behind (an apply journal, an unrenamed state file,
//! temporary files, chunks no version references) is reported by
//! [`Store::status`] and removed by [`Store::gc`].
//!
//! Limits: the invariants above hold whatever instant the *process* dies at.
//! After a *power loss*, a chunk file that an interrupted apply renamed into
//! place before its data reached the disk can have the right length and
//! wrong bytes on some filesystems; a later apply reuses chunks it finds by
//! length, so after a power loss run `gc` (or re-import) before applying
//! again. Readers ([`Store::open`]) take no lock: an `export` running while
//! another process's `gc` deletes a version fails with a clear error (every
//! chunk is verified as it is read) rather than exporting wrong bytes.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bstack_plan::{
    Contract, HashAlgorithm, Message, SwapPlan, TransferOp, Validate, WeightManifest,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{HotweightsError, Result};
use crate::failpoint;
use crate::plan::{check_unique_file_paths, parse_bucket_address, transfer_ops};
use crate::source::{ChunkLoc, ChunkSource, EntryIndex, chunk_locs, read_range};

const STATE: &str = "state.json";
const STATE_TMP: &str = "state.json.tmp";
const JOURNAL: &str = "journal.json";
const LOCK: &str = "lock";
const FORMAT: u32 = 1;

/// Which version is live, and where rollback goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Store layout version.
    pub format: u32,
    /// The live version, if any has been committed.
    pub current: Option<String>,
    /// Earlier current versions, most recent first: where rollback goes.
    pub history: Vec<String>,
    /// The version the last successful apply made available.
    pub last_applied: Option<String>,
    /// Versions `gc` dropped from the history whose manifests it has not
    /// yet deleted: recorded with the shorter history in one atomic write,
    /// so a crash in between never leaves them retained for ever.
    #[serde(default)]
    pub retired: Vec<String>,
}

/// A commit written ahead by [`Store::prepare_commit`], made current by
/// [`Store::flip`].
#[derive(Debug)]
#[must_use = "a prepared commit changes nothing until it is flipped"]
pub struct PreparedCommit {
    base: State,
    state: State,
}

/// What an interrupted apply left: the content of `journal.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// The version being applied.
    pub version: String,
    /// The plan being applied (empty for an import).
    pub plan_id: String,
    /// When the apply started, ms since the Unix epoch.
    pub started_unix_ms: u64,
}

/// Where `apply` reads the new chunks' bytes.
#[derive(Debug, Clone, Copy)]
pub enum ApplySource<'a> {
    /// The files the plan's transfer ops name.
    PlanOps,
    /// A directory laid out as the plan's `to` manifest says (the new
    /// checkpoint); the plan's own ops, if any, are ignored.
    Dir(&'a Path),
    /// Bucket bytes already in memory, by bucket id (what a cluster worker
    /// received over the data plane); the plan's ops are ignored. Every
    /// chunk is still verified against its hash before it is stored.
    Buckets(&'a HashMap<u32, Vec<u8>>),
}

/// What an apply or import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// The version made available.
    pub version: String,
    /// Chunks written to the store.
    pub chunks_written: u64,
    /// Bytes written to the store.
    pub bytes_written: u64,
    /// Chunks the store already held (shared with other versions).
    pub chunks_shared: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// True when the version was already in the store, identical.
    pub already_present: bool,
}

/// One version in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// Version label.
    pub version: String,
    /// Model id of its manifest.
    pub model_id: String,
    /// Tensors in it.
    pub tensors: u64,
    /// Chunks it references.
    pub chunks: u64,
    /// Bytes of the checkpoint it describes.
    pub bytes: u64,
    /// `current`, `previous` (in the rollback history) or `available`.
    pub role: &'static str,
}

/// The state of a store, and what interrupted operations left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStatus {
    /// The live version.
    pub current: Option<String>,
    /// Rollback history, most recent first.
    pub history: Vec<String>,
    /// Every version the store holds.
    pub versions: Vec<VersionInfo>,
    /// Chunk files.
    pub chunks: u64,
    /// Bytes in chunk files.
    pub chunk_bytes: u64,
    /// Chunk files no version references (what `gc` would free).
    pub unreferenced_chunks: u64,
    /// Bytes in those files.
    pub unreferenced_bytes: u64,
    /// What interrupted operations left behind, in words; empty when clean.
    pub interrupted: Vec<String>,
}

/// What `gc` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Versions whose manifests were removed.
    pub versions_removed: Vec<String>,
    /// Chunk files removed.
    pub chunks_removed: u64,
    /// Bytes freed by them.
    pub bytes_freed: u64,
    /// Temporary files and journals removed.
    pub leftovers_removed: u64,
    /// Chunk files kept.
    pub chunks_kept: u64,
}

/// What `export` wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// An open store. Opening for changes takes the store's lock; see the module
/// documentation for the layout and its invariants.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    state: State,
    /// Held for the life of the value when opened for changes.
    _lock: Option<File>,
}

impl Store {
    /// Opens the store at `root` for changes, creating it if it does not
    /// exist, and takes its lock (an error if another process holds it).
    pub fn open_or_create(root: &Path) -> Result<Store> {
        for dir in ["chunks", "versions", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(|e| HotweightsError::io(&path, e))?;
        }
        let lock = take_lock(root)?;
        let state = read_state(root)?;
        Ok(Store {
            root: root.to_owned(),
            state,
            _lock: Some(lock),
        })
    }

    /// Opens an existing store for reading, without the lock: reads see
    /// either side of any concurrent flip.
    pub fn open(root: &Path) -> Result<Store> {
        if !root.join("versions").is_dir() {
            return Err(store_error(
                root,
                "not a weight store (no versions/ directory); `bstack hw apply --store DIR` creates one",
            ));
        }
        let state = read_state(root)?;
        Ok(Store {
            root: root.to_owned(),
            state,
            _lock: None,
        })
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The manifest of `version`.
    pub fn manifest(&self, version: &str) -> Result<WeightManifest> {
        let path = self.version_path(version)?;
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                store_error(
                    &self.root,
                    format!("has no version {version:?}; `bstack hw status` lists the versions"),
                )
            } else {
                HotweightsError::io(&path, e)
            }
        })?;
        Ok(WeightManifest::decode_proto(
            &bytes,
            &path.display().to_string(),
        )?)
    }

    /// Versions with a manifest in the store, sorted.
    pub fn versions(&self) -> Result<Vec<String>> {
        let dir = self.root.join("versions");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| HotweightsError::io(&dir, e))? {
            let entry = entry.map_err(|e| HotweightsError::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(v) = name.strip_suffix(".manifest.pb") {
                out.push(v.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Makes the plan's `to` version available in the store: every chunk it
    /// stages is read from `source`, assembled from its bucket, verified
    /// against its hash and stored; the chunks it does not stage must
    /// already be in the store. Nothing becomes visible unless everything
    /// succeeded; `current` does not change (see [`Store::commit`]).
    pub fn apply(
        &mut self,
        plan: &SwapPlan,
        source: ApplySource<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<ApplyReport> {
        self.require_lock()?;
        if let Err(problems) = plan.validate() {
            let first: Vec<String> = problems.0.iter().take(3).map(|p| p.to_string()).collect();
            return Err(HotweightsError::Mismatch(format!(
                "the plan is not sound ({} problems; first: {}); `bstack hw verify-plan` lists them all",
                problems.0.len(),
                first.join("; ")
            )));
        }
        let Some(to) = plan.to.as_ref() else {
            return Err(HotweightsError::Mismatch(
                "the plan has no `to` manifest".into(),
            ));
        };
        if let Some(report) = self.already_present(to)? {
            self.settle_present(&to.version)?;
            return Ok(report);
        }
        // Bucket items name file entries by path.
        check_unique_file_paths(to)?;
        let index = EntryIndex::new(to);

        // Chunks the plan does not stage must be here already.
        let staged = plan.staged_chunks();
        let mut missing = Vec::new();
        let mut shared = 0u64;
        for loc in chunk_locs(to) {
            if staged.contains(&(loc.is_file, loc.name, loc.index)) {
                continue;
            }
            if self.has_chunk(&loc) {
                shared += 1;
            } else {
                missing.push(loc.describe());
            }
        }
        if !missing.is_empty() {
            let from = plan
                .from
                .as_ref()
                .map(|m| m.version.as_str())
                .unwrap_or("?");
            return Err(store_error(
                &self.root,
                format!(
                    "lacks {} chunks that the plan expects the receiver to hold from version {from:?} (first: {}); import that version first: bstack hw apply --manifest FROM.json --source DIR --store {}",
                    missing.len(),
                    missing[0],
                    self.root.display()
                ),
            ));
        }

        let ops = match source {
            ApplySource::Buckets(_) => Cow::Owned(Vec::new()),
            ApplySource::Dir(dir) => Cow::Owned(transfer_ops(plan, dir)?),
            ApplySource::PlanOps if plan.ops.is_empty() && !plan.buckets.is_empty() => {
                return Err(HotweightsError::Mismatch(
                    "the plan carries no transfer ops (it was made without --source); pass --source DIR, the directory of the new checkpoint".into(),
                ));
            }
            ApplySource::PlanOps => Cow::Borrowed(plan.ops.as_slice()),
        };
        let journal = Journal {
            version: to.version.clone(),
            plan_id: plan.plan_id.clone(),
            started_unix_ms: now_ms(),
        };
        self.write_journal(&journal)?;
        let received = match source {
            ApplySource::Buckets(map) => Some(map),
            _ => None,
        };
        let result = self.execute_buckets(plan, &ops, received, &index, progress);
        let mut report = match result {
            Ok(r) => r,
            Err(e) => {
                self.abandon_apply();
                return Err(e);
            }
        };
        report.version = to.version.clone();
        report.chunks_shared = shared;
        self.finish_version(to)?;
        Ok(report)
    }

    /// Makes `manifest`'s version available, reading every chunk the store
    /// lacks from `source`: the first version of a model in a store.
    pub fn import(
        &mut self,
        manifest: &WeightManifest,
        source: &dyn ChunkSource,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<ApplyReport> {
        self.require_lock()?;
        if let Err(problems) = manifest.validate() {
            return Err(HotweightsError::Mismatch(format!(
                "the manifest is not valid: {problems}"
            )));
        }
        if let Some(report) = self.already_present(manifest)? {
            self.settle_present(&manifest.version)?;
            return Ok(report);
        }
        let journal = Journal {
            version: manifest.version.clone(),
            plan_id: String::new(),
            started_unix_ms: now_ms(),
        };
        self.write_journal(&journal)?;
        // One job per distinct chunk: identical chunks (zero tensors, tied
        // embeddings) would otherwise be written by two threads at once.
        let mut seen = HashSet::new();
        let mut repeats = 0u64;
        let locs: Vec<ChunkLoc<'_>> = chunk_locs(manifest)
            .filter(|loc| {
                let first = seen.insert((loc.hash, loc.length));
                if !first {
                    repeats += 1;
                    progress(loc.length);
                }
                first
            })
            .collect();
        let written = locs
            .par_iter()
            .map(|loc| -> Result<(u64, u64, u64)> {
                if self.has_chunk(loc) {
                    progress(loc.length);
                    return Ok((0, 0, 1));
                }
                let bytes = source.read_chunk(loc)?;
                let written = self.put_chunk(loc, &bytes)?;
                progress(loc.length);
                Ok((u64::from(written), if written { loc.length } else { 0 }, 0))
            })
            .collect::<Result<Vec<_>>>();
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                self.abandon_apply();
                return Err(e);
            }
        };
        let mut report = ApplyReport {
            version: manifest.version.clone(),
            ..ApplyReport::default()
        };
        report.chunks_shared += repeats;
        for (n, bytes, shared) in written {
            report.chunks_written += n;
            report.bytes_written += bytes;
            report.bytes_read += bytes;
            report.chunks_shared += shared;
        }
        self.finish_version(manifest)?;
        Ok(report)
    }

    /// Makes `version` current, atomically. The previous current version
    /// goes to the front of the rollback history.
    pub fn commit(&mut self, version: &str) -> Result<()> {
        match self.commit_state(version)? {
            Some(next) => self.write_state(next, "commit"),
            None => Ok(()),
        }
    }

    /// The state after a commit of `version`; `None` when it is current.
    fn commit_state(&mut self, version: &str) -> Result<Option<State>> {
        self.require_lock()?;
        let path = self.version_path(version)?;
        if !path.is_file() {
            return Err(store_error(
                &self.root,
                format!("has no version {version:?} to commit; apply it first"),
            ));
        }
        if self.state.current.as_deref() == Some(version) {
            return Ok(None);
        }
        let mut next = self.state.clone();
        next.history.retain(|v| v != version);
        next.retired.retain(|v| v != version);
        if let Some(old) = next.current.take() {
            next.history.insert(0, old);
        }
        next.current = Some(version.to_owned());
        Ok(Some(next))
    }

    /// The slow half of a commit of `version`, done ahead: the new state is
    /// written and synced beside the live one, but nothing changes yet.
    /// [`Store::flip`] then makes it current with one rename, so a serving
    /// engine is paused only for that rename; [`Store::sync`] makes the flip
    /// durable afterwards. A crash in between leaves the old or the new
    /// version current, both whole. `None` when `version` is current.
    pub fn prepare_commit(&mut self, version: &str) -> Result<Option<PreparedCommit>> {
        let Some(next) = self.commit_state(version)? else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec_pretty(&next)
            .map_err(|e| HotweightsError::Option(format!("state: {e}")))?;
        let tmp = self.root.join(STATE_TMP);
        let file = File::create(&tmp).map_err(|e| HotweightsError::io(&tmp, e))?;
        file.write_all_at(&bytes, 0)
            .map_err(|e| HotweightsError::io(&tmp, e))?;
        file.sync_data().map_err(|e| HotweightsError::io(&tmp, e))?;
        Ok(Some(PreparedCommit {
            base: self.state.clone(),
            state: next,
        }))
    }

    /// Makes a prepared commit current: one rename. Fails, changing
    /// nothing, when the state changed since it was prepared.
    pub fn flip(&mut self, prepared: PreparedCommit) -> Result<()> {
        self.require_lock()?;
        let tmp = self.root.join(STATE_TMP);
        let target = self.root.join(STATE);
        if !tmp.is_file() || prepared.base != self.state {
            return Err(store_error(
                &self.root,
                String::from(
                    "the prepared commit is stale (another change came first); prepare it again",
                ),
            ));
        }
        fs::rename(&tmp, &target).map_err(|e| HotweightsError::io(&target, e))?;
        self.state = prepared.state;
        Ok(())
    }

    /// Makes the last flip durable (syncs the store's directory).
    pub fn sync(&self) -> Result<()> {
        sync_dir(&self.root.join(STATE))
    }

    /// Makes the previous version current again, atomically, in O(1).
    /// Returns the version now current.
    pub fn rollback(&mut self) -> Result<String> {
        self.require_lock()?;
        let mut next = self.state.clone();
        if next.history.is_empty() {
            return Err(store_error(
                &self.root,
                "has no previous version to roll back to",
            ));
        }
        let previous = next.history.remove(0);
        next.current = Some(previous.clone());
        self.write_state(next, "rollback")?;
        Ok(previous)
    }

    /// The store's versions, counts, and anything an interrupted operation
    /// left behind.
    pub fn status(&self) -> Result<StoreStatus> {
        let mut versions = Vec::new();
        let mut referenced = HashSet::new();
        for v in self.versions()? {
            let m = self.manifest(&v)?;
            referenced.extend(chunk_locs(&m).map(|loc| self.chunk_path(&loc)));
            let role = if self.state.current.as_deref() == Some(v.as_str()) {
                "current"
            } else if self.state.history.contains(&v) {
                "previous"
            } else {
                "available"
            };
            let (chunks, bytes) = (m.chunk_count(), m.total_bytes());
            versions.push(VersionInfo {
                version: v,
                model_id: m.model_id,
                tensors: m.tensors.len() as u64,
                chunks,
                bytes,
                role,
            });
        }
        let (mut chunks, mut chunk_bytes) = (0, 0);
        let (mut unreferenced_chunks, mut unreferenced_bytes) = (0, 0);
        for (path, len) in self.chunk_files()? {
            chunks += 1;
            chunk_bytes += len;
            if !referenced.contains(&path) {
                unreferenced_chunks += 1;
                unreferenced_bytes += len;
            }
        }
        Ok(StoreStatus {
            current: self.state.current.clone(),
            history: self.state.history.clone(),
            versions,
            chunks,
            chunk_bytes,
            unreferenced_chunks,
            unreferenced_bytes,
            interrupted: self.leftovers()?,
        })
    }

    /// Removes what no retained version needs: chunks no retained manifest
    /// references, leftovers of interrupted operations, and the manifests
    /// of versions not retained. Retained: the current version, the
    /// rollback history (only its `keep_history` most recent entries when
    /// given) and, unless `prune_uncommitted`, the other versions: applied
    /// but never committed, or rolled back from.
    pub fn gc(&mut self, keep_history: Option<usize>, prune_uncommitted: bool) -> Result<GcReport> {
        self.require_lock()?;
        let mut report = GcReport::default();
        let mut state = self.state.clone();
        if let Some(keep) = keep_history {
            let dropped = state.history.split_off(keep.min(state.history.len()));
            state.retired.extend(dropped);
        }
        if prune_uncommitted {
            let committed: Vec<String> = state
                .current
                .iter()
                .chain(&state.history)
                .cloned()
                .collect();
            for v in self.versions()? {
                if !committed.contains(&v) && !state.retired.contains(&v) {
                    state.retired.push(v);
                }
            }
        }
        if state
            .last_applied
            .as_ref()
            .is_some_and(|v| state.retired.contains(v))
        {
            state.last_applied = None;
        }
        if state != self.state {
            self.write_state(state, "gc")?;
        }
        // From here a crash leaves `retired` to the next gc.
        for v in self.state.retired.clone() {
            if self.state.current.as_ref() == Some(&v) || self.state.history.contains(&v) {
                continue; // committed again since it was retired
            }
            let path = self.version_path(&v)?;
            match fs::remove_file(&path) {
                Ok(()) => report.versions_removed.push(v),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(HotweightsError::io(&path, e)),
            }
        }
        if !self.state.retired.is_empty() {
            let mut state = self.state.clone();
            state.retired.clear();
            self.write_state(state, "gc-retired")?;
        }
        let retained = self.versions()?;
        let mut referenced = HashSet::new();
        for v in &retained {
            let m = self.manifest(v)?;
            referenced.extend(chunk_locs(&m).map(|loc| self.chunk_path(&loc)));
        }
        // No apply can be running (we hold the lock): its journal and
        // temporary files are leftovers.
        for name in [JOURNAL, STATE_TMP] {
            let path = self.root.join(name);
            if path.exists() {
                fs::remove_file(&path).map_err(|e| HotweightsError::io(&path, e))?;
                report.leftovers_removed += 1;
            }
        }
        for path in self.stray_files()? {
            fs::remove_file(&path).map_err(|e| HotweightsError::io(&path, e))?;
            report.leftovers_removed += 1;
        }
        for (path, len) in self.chunk_files()? {
            if referenced.contains(&path) {
                report.chunks_kept += 1;
                continue;
            }
            fs::remove_file(&path).map_err(|e| HotweightsError::io(&path, e))?;
            report.chunks_removed += 1;
            report.bytes_freed += len;
            failpoint::hit("gc.chunk");
        }
        Ok(report)
    }

    /// Rebuilds `version`'s checkpoint directory at `out`, every chunk
    /// verified: the files are byte-identical to those it was published
    /// from. `out` must not exist or be an empty directory; it appears only
    /// when complete.
    ///
    /// `progress` is called with each chunk's length as it is written.
    pub fn export(
        &self,
        version: &str,
        out: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<ExportReport> {
        let manifest = self.manifest(version)?;
        if out.exists() {
            let empty = fs::read_dir(out)
                .map_err(|e| HotweightsError::io(out, e))?
                .next()
                .is_none();
            if !empty {
                return Err(HotweightsError::io(
                    out,
                    std::io::Error::other("exists and is not empty; choose a new directory"),
                ));
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::create_dir_all(parent).map_err(|e| HotweightsError::io(parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(".export-")
            .tempdir_in(parent)
            .map_err(|e| HotweightsError::io(parent, e))?;

        let locs: Vec<ChunkLoc<'_>> = chunk_locs(&manifest).collect();
        // File sizes: the furthest byte any entry reaches.
        let mut sizes: BTreeMap<&str, u64> = BTreeMap::new();
        for t in &manifest.tensors {
            let end = sizes.entry(t.file.as_str()).or_default();
            *end = (*end).max(t.offset + t.length);
        }
        for f in &manifest.files {
            let end = sizes.entry(f.path.as_str()).or_default();
            *end = (*end).max(f.offset + f.length);
        }
        let mut files: HashMap<&str, File> = HashMap::new();
        for (&name, &size) in &sizes {
            let path = staging.path().join(name);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|e| HotweightsError::io(dir, e))?;
            }
            let file = File::create(&path).map_err(|e| HotweightsError::io(&path, e))?;
            file.set_len(size)
                .map_err(|e| HotweightsError::io(&path, e))?;
            files.insert(name, file);
        }
        locs.par_iter().try_for_each(|loc| -> Result<()> {
            let bytes = self.read_chunk(loc)?;
            let file = files.get(loc.file).ok_or_else(|| {
                HotweightsError::Mismatch(format!("{} names no file", loc.describe()))
            })?;
            file.write_all_at(&bytes, loc.offset)
                .map_err(|e| HotweightsError::io(staging.path().join(loc.file), e))?;
            progress(loc.length);
            Ok(())
        })?;
        for (name, file) in &files {
            file.sync_all()
                .map_err(|e| HotweightsError::io(staging.path().join(name), e))?;
        }
        let bytes = sizes.values().sum();
        let staged = staging.keep();
        if out.exists() {
            fs::remove_dir(out).map_err(|e| HotweightsError::io(out, e))?;
        }
        fs::rename(&staged, out).map_err(|e| {
            let _ = fs::remove_dir_all(&staged);
            HotweightsError::io(out, e)
        })?;
        Ok(ExportReport {
            files: sizes.len() as u64,
            bytes,
        })
    }

    // ----- internals -----

    fn require_lock(&self) -> Result<()> {
        if self._lock.is_none() {
            return Err(store_error(
                &self.root,
                "opened read-only; open it with Store::open_or_create to change it",
            ));
        }
        Ok(())
    }

    fn version_path(&self, version: &str) -> Result<PathBuf> {
        let ok = !version.is_empty()
            && !version.starts_with('.')
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'));
        if !ok {
            return Err(store_error(
                &self.root,
                format!(
                    "version label {version:?} cannot name a stored version: use letters, digits, '.', '_', '-' or '+', not starting with '.'"
                ),
            ));
        }
        Ok(self
            .root
            .join("versions")
            .join(format!("{version}.manifest.pb")))
    }

    /// `Some` when `m`'s version is already stored: identical (a report of
    /// nothing done), or different (an error).
    fn already_present(&self, m: &WeightManifest) -> Result<Option<ApplyReport>> {
        let path = self.version_path(&m.version)?;
        if !path.is_file() {
            return Ok(None);
        }
        let existing = self.manifest(&m.version)?;
        if existing != *m {
            return Err(store_error(
                &self.root,
                format!(
                    "already holds a different version {:?}; publish the new weights under a new version label",
                    m.version
                ),
            ));
        }
        Ok(Some(ApplyReport {
            version: m.version.clone(),
            already_present: true,
            ..ApplyReport::default()
        }))
    }

    pub(crate) fn chunk_path(&self, loc: &ChunkLoc<'_>) -> PathBuf {
        let algorithm = match loc.algorithm {
            HashAlgorithm::Sha256 => "sha256",
            _ => "blake3",
        };
        let prefix = loc.hash.get(..2).unwrap_or("00");
        self.root
            .join("chunks")
            .join(algorithm)
            .join(prefix)
            .join(loc.hash)
    }

    fn has_chunk(&self, loc: &ChunkLoc<'_>) -> bool {
        fs::metadata(self.chunk_path(loc)).is_ok_and(|m| m.len() == loc.length)
    }

    /// Stores verified chunk bytes: written to `tmp/`, renamed into place.
    /// False when the store already held the chunk (a chunk file exists
    /// only complete and verified, so the bytes given are not needed then).
    fn put_chunk(&self, loc: &ChunkLoc<'_>, bytes: &[u8]) -> Result<bool> {
        self.write_chunk(loc, bytes, false)
    }

    /// Stores one chunk ahead of the apply that will reference it, verified
    /// and synced to disk, so that a receiver writes chunks while the rest
    /// of a version still arrives and the apply's final sync has little
    /// left to do. The chunk belongs to no version until that apply
    /// finishes (a `gc` before then removes it, and the apply writes it
    /// again). False when the store already held it.
    pub fn stage_chunk(&self, loc: &ChunkLoc<'_>, bytes: &[u8]) -> Result<bool> {
        self.require_lock()?;
        self.write_chunk(loc, bytes, true)
    }

    fn write_chunk(&self, loc: &ChunkLoc<'_>, bytes: &[u8], sync: bool) -> Result<bool> {
        let path = self.chunk_path(loc);
        if fs::metadata(&path).is_ok_and(|m| m.len() == loc.length) {
            return Ok(false);
        }
        loc.verify(bytes, Path::new("the source"))?;
        let tmp_dir = self.root.join("tmp");
        let tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(|e| HotweightsError::io(&tmp_dir, e))?;
        write_sparse(tmp.as_file(), bytes).map_err(|e| HotweightsError::io(&path, e))?;
        if sync {
            tmp.as_file()
                .sync_data()
                .map_err(|e| HotweightsError::io(&path, e))?;
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| HotweightsError::io(dir, e))?;
        }
        tmp.persist(&path)
            .map_err(|e| HotweightsError::io(&path, e.error))?;
        failpoint::hit("apply.chunk");
        Ok(true)
    }

    /// Reads each bucket's ops, then stores its complete chunks.
    ///
    /// A bucket is never materialised at its `capacity`: the plan is
    /// untrusted input, and only the bytes its ops read (bounded by the
    /// sizes of the source files) are held. An item is sliced out of the op
    /// that holds it, or gathered from several; bytes that no op writes are
    /// an error.
    fn execute_buckets(
        &self,
        plan: &SwapPlan,
        ops: &[TransferOp],
        received: Option<&HashMap<u32, Vec<u8>>>,
        index: &EntryIndex<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<ApplyReport> {
        let mut by_bucket: HashMap<u32, Vec<&TransferOp>> = HashMap::new();
        for op in ops {
            let id = parse_bucket_address(&op.dst).ok_or_else(|| {
                HotweightsError::Mismatch(format!(
                    "op writes {:?}, not a bucket of the plan",
                    op.dst
                ))
            })?;
            by_bucket.entry(id).or_default().push(op);
        }
        let mut report = ApplyReport::default();
        // Chunks split across buckets: their pieces (chunk offset, bytes)
        // and the bytes received, until all have arrived. validate() has
        // checked that the pieces lie inside their chunk and do not overlap.
        type Pieces = (Vec<(u64, Vec<u8>)>, u64);
        let mut partial: HashMap<(bool, &str, u32), Pieces> = HashMap::new();
        for bucket in &plan.buckets {
            let mut bucket_ops = by_bucket.remove(&bucket.id).unwrap_or_default();
            for op in &bucket_ops {
                if op
                    .dst_offset
                    .checked_add(op.length)
                    .is_none_or(|end| end > bucket.capacity)
                {
                    return Err(HotweightsError::Mismatch(format!(
                        "an op writes past the end of bucket {}",
                        bucket.id
                    )));
                }
            }
            let filled: Vec<(u64, Cow<'_, [u8]>)> = match received {
                Some(map) => {
                    let bytes = map.get(&bucket.id).ok_or_else(|| {
                        HotweightsError::Mismatch(format!(
                            "bucket {} of the plan was not received",
                            bucket.id
                        ))
                    })?;
                    if bytes.len() as u64 != bucket.capacity {
                        return Err(HotweightsError::Mismatch(format!(
                            "bucket {} arrived with {} bytes; the plan says {}",
                            bucket.id,
                            bytes.len(),
                            bucket.capacity
                        )));
                    }
                    report.bytes_read += bytes.len() as u64;
                    vec![(0, Cow::Borrowed(bytes.as_slice()))]
                }
                None => {
                    // validate() has checked that the ops of a bucket do not overlap.
                    bucket_ops.sort_by_key(|op| op.dst_offset);
                    let filled = bucket_ops
                        .par_iter()
                        .map(|op| -> Result<(u64, Cow<'_, [u8]>)> {
                            let path = op.src.strip_prefix("file://").ok_or_else(|| {
                                HotweightsError::Mismatch(format!(
                                    "op reads {:?}; a local apply reads file:// sources only",
                                    op.src
                                ))
                            })?;
                            let bytes = read_range(Path::new(path), op.src_offset, op.length)?;
                            Ok((op.dst_offset, Cow::Owned(bytes)))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    report.bytes_read += bucket_ops.iter().map(|op| op.length).sum::<u64>();
                    filled
                }
            };

            // Whole chunks go straight from the ops' bytes; pieces accumulate.
            let mut whole = Vec::new();
            let mut whole_hashes = HashSet::new();
            for item in &bucket.items {
                let loc = index
                    .chunk(item.is_file, &item.name, item.chunk)
                    .ok_or_else(|| {
                        HotweightsError::Mismatch(format!(
                            "chunk {} of {:?} is not in the `to` manifest",
                            item.chunk, item.name
                        ))
                    })?;
                let piece =
                    bucket_bytes(&filled, item.bucket_offset, item.length).ok_or_else(|| {
                        HotweightsError::Mismatch(format!(
                            "bytes [{}, +{}) of bucket {} hold {} but no op writes them",
                            item.bucket_offset,
                            item.length,
                            bucket.id,
                            loc.describe()
                        ))
                    })?;
                if item.chunk_offset == 0 && item.length == loc.length {
                    if whole_hashes.insert(loc.hash) {
                        whole.push((loc, piece));
                    } else {
                        progress(loc.length); // the same bytes, already going in this bucket
                    }
                    continue;
                }
                let key = (item.is_file, loc.name, item.chunk);
                let entry = partial.entry(key).or_default();
                entry.0.push((item.chunk_offset, piece.into_owned()));
                entry.1 = entry.1.saturating_add(item.length);
                if entry.1 == loc.length
                    && let Some((mut pieces, _)) = partial.remove(&key)
                {
                    pieces.sort_unstable_by_key(|p| p.0);
                    // As long as the bytes received: no crafted length
                    // is ever allocated.
                    let mut bytes = Vec::with_capacity(loc.length as usize);
                    for (_, piece) in pieces {
                        bytes.extend_from_slice(&piece);
                    }
                    if self.put_chunk(&loc, &bytes)? {
                        report.chunks_written += 1;
                        report.bytes_written += loc.length;
                    }
                    progress(loc.length);
                }
            }
            let written = whole
                .par_iter()
                .map(|(loc, bytes)| {
                    let written = self.put_chunk(loc, bytes)?;
                    progress(loc.length);
                    Ok(if written { loc.length } else { 0 })
                })
                .collect::<Result<Vec<u64>>>()?;
            report.chunks_written += written.iter().filter(|&&b| b > 0).count() as u64;
            report.bytes_written += written.iter().sum::<u64>();
        }
        if let Some(((_, name, chunk), _)) = partial.into_iter().next() {
            return Err(HotweightsError::Mismatch(format!(
                "chunk {chunk} of {name:?} is only partly in the buckets"
            )));
        }
        Ok(report)
    }

    /// Makes a version whose chunks are all stored visible: sync, then the
    /// manifest, then the journal goes.
    fn finish_version(&mut self, m: &WeightManifest) -> Result<()> {
        sync_filesystem(&self.root)?;
        failpoint::hit("apply.before-manifest");
        let path = self.version_path(&m.version)?;
        bstack_plan::write_atomic(&path, &m.encode_to_vec())?;
        sync_dir(&path)?;
        failpoint::hit("apply.after-manifest");
        let mut state = self.state.clone();
        state.last_applied = Some(m.version.clone());
        // A gc that retired this label and was interrupted must not delete
        // the version just applied under it.
        state.retired.retain(|v| *v != m.version);
        self.write_state(state, "apply")?;
        let journal = self.root.join(JOURNAL);
        fs::remove_file(&journal).map_err(|e| HotweightsError::io(&journal, e))?;
        Ok(())
    }

    /// An apply of a version that is already stored succeeds at once; it
    /// also finishes what an apply of that version interrupted after its
    /// manifest became visible: the version becomes the last applied (what
    /// `commit` defaults to), leaves the versions an interrupted gc retired,
    /// and its journal goes.
    fn settle_present(&mut self, version: &str) -> Result<()> {
        let mut state = self.state.clone();
        state.last_applied = Some(version.to_owned());
        state.retired.retain(|v| v != version);
        if state != self.state {
            self.write_state(state, "apply")?;
        }
        let journal = self.root.join(JOURNAL);
        let interrupted = fs::read(&journal)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Journal>(&bytes).ok())
            .is_some_and(|j| j.version == version);
        if interrupted {
            fs::remove_file(&journal).map_err(|e| HotweightsError::io(&journal, e))?;
        }
        Ok(())
    }

    fn write_journal(&self, journal: &Journal) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(journal)
            .map_err(|e| HotweightsError::Option(format!("journal: {e}")))?;
        bstack_plan::write_atomic(&self.root.join(JOURNAL), &bytes)?;
        Ok(())
    }

    /// After a failed apply: the verified chunks stay (gc removes them if
    /// no version comes to need them), temporary files and the journal go.
    fn abandon_apply(&self) {
        let _ = fs::remove_file(self.root.join(JOURNAL));
        if let Ok(entries) = fs::read_dir(self.root.join("tmp")) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Replaces `state.json`: temporary file, fsync, rename, fsync of the
    /// directory. `what` names the failpoints.
    fn write_state(&mut self, state: State, what: &str) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&state)
            .map_err(|e| HotweightsError::Option(format!("state: {e}")))?;
        let tmp = self.root.join(STATE_TMP);
        let target = self.root.join(STATE);
        {
            let file = File::create(&tmp).map_err(|e| HotweightsError::io(&tmp, e))?;
            file.write_all_at(&bytes, 0)
                .map_err(|e| HotweightsError::io(&tmp, e))?;
            file.sync_data().map_err(|e| HotweightsError::io(&tmp, e))?;
        }
        failpoint::hit(&format!("{what}.before-rename"));
        fs::rename(&tmp, &target).map_err(|e| HotweightsError::io(&target, e))?;
        failpoint::hit(&format!("{what}.after-rename"));
        sync_dir(&target)?;
        self.state = state;
        Ok(())
    }

    /// Every chunk file with its length.
    fn chunk_files(&self) -> Result<Vec<(PathBuf, u64)>> {
        let mut out = Vec::new();
        let root = self.root.join("chunks");
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(HotweightsError::io(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| HotweightsError::io(&dir, e))?;
                let meta = entry
                    .metadata()
                    .map_err(|e| HotweightsError::io(entry.path(), e))?;
                if meta.is_dir() {
                    stack.push(entry.path());
                } else {
                    out.push((entry.path(), meta.len()));
                }
            }
        }
        Ok(out)
    }

    /// Files an interrupted write left: everything in `tmp/`, and the
    /// temporary files of atomic replacements (`.tmp*`) beside the state and
    /// the manifests.
    fn stray_files(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(|e| HotweightsError::io(&tmp, e))? {
            out.push(entry.map_err(|e| HotweightsError::io(&tmp, e))?.path());
        }
        for dir in [self.root.clone(), self.root.join("versions")] {
            for entry in fs::read_dir(&dir).map_err(|e| HotweightsError::io(&dir, e))? {
                let entry = entry.map_err(|e| HotweightsError::io(&dir, e))?;
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(".tmp") && entry.path().is_file() {
                    out.push(entry.path());
                }
            }
        }
        Ok(out)
    }

    /// What interrupted operations left, in words.
    fn leftovers(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let current = match &self.state.current {
            Some(v) => format!("current is still {v:?}"),
            None => "no version is current".to_owned(),
        };
        let journal = self.root.join(JOURNAL);
        if let Ok(bytes) = fs::read(&journal) {
            match serde_json::from_slice::<Journal>(&bytes) {
                Ok(j) => {
                    let plan = if j.plan_id.is_empty() {
                        String::new()
                    } else {
                        format!(" (plan {:?})", j.plan_id)
                    };
                    // Interrupted after its manifest was written: the
                    // version is whole, and gc would keep its chunks.
                    let visible = self.version_path(&j.version).is_ok_and(|p| p.is_file());
                    out.push(if visible {
                        format!(
                            "an apply of version {:?}{plan} was interrupted after the version became available; {current}; rerun the apply to finish it, or run gc",
                            j.version
                        )
                    } else {
                        format!(
                            "an apply of version {:?}{plan} did not finish; {current}; the chunks it stored are kept: rerun the apply to finish it, or run gc to remove them",
                            j.version
                        )
                    });
                }
                Err(_) => out.push(format!(
                    "an apply did not finish (its journal is unreadable); {current}"
                )),
            }
        }
        if !self.state.retired.is_empty() {
            out.push(format!(
                "a gc was interrupted while removing versions {:?}; run gc again",
                self.state.retired
            ));
        }
        let tmp_state = self.root.join(STATE_TMP);
        if let Ok(bytes) = fs::read(&tmp_state) {
            let target = serde_json::from_slice::<State>(&bytes)
                .ok()
                .and_then(|s| s.current)
                .filter(|v| self.state.current.as_ref() != Some(v));
            out.push(match target {
                Some(v) => format!(
                    "a switch of the current version to {v:?} was interrupted before it took effect; {current}; rerun it"
                ),
                None => format!(
                    "an update of the store's state (by apply or gc) was interrupted before it took effect; {current}; rerun it"
                ),
            });
        }
        let stray = self.stray_files()?.len();
        if stray > 0 {
            out.push(format!(
                "{stray} partly written files (in tmp/, versions/ or the store root; gc removes them)"
            ));
        }
        Ok(out)
    }
}

impl ChunkSource for Store {
    fn read_chunk(&self, loc: &ChunkLoc<'_>) -> Result<Vec<u8>> {
        let path = self.chunk_path(loc);
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                store_error(
                    &self.root,
                    format!("lacks {} ({})", loc.describe(), loc.hash),
                )
            } else {
                HotweightsError::io(&path, e)
            }
        })?;
        loc.verify(&bytes, &path)?;
        Ok(bytes)
    }
}

/// Bytes `[start, start + length)` of a bucket, from the bytes its ops
/// read (`(dst_offset, bytes)`, sorted by offset, not overlapping): a slice
/// of the one op that holds them all, or gathered from consecutive ops.
/// `None` where some of them no op writes.
fn bucket_bytes<'b>(
    filled: &'b [(u64, Cow<'_, [u8]>)],
    start: u64,
    length: u64,
) -> Option<Cow<'b, [u8]>> {
    let end = start.checked_add(length)?;
    let first = filled.partition_point(|(at, bytes)| at + bytes.len() as u64 <= start);
    let (at, bytes) = filled.get(first)?;
    if *at <= start && end <= at + bytes.len() as u64 {
        return Some(Cow::Borrowed(
            &bytes[(start - at) as usize..(end - at) as usize],
        ));
    }
    let mut out = Vec::new();
    let mut next = start;
    for (at, bytes) in &filled[first..] {
        if next == end || *at > next {
            break;
        }
        let stop = end.min(at + bytes.len() as u64);
        if stop <= next {
            continue; // overlapping ops, which validate() refuses
        }
        out.extend_from_slice(&bytes[(next - at) as usize..(stop - at) as usize]);
        next = stop;
    }
    (next == end).then_some(Cow::Owned(out))
}

/// Writes `bytes` to an empty file, leaving holes where whole 4 KiB blocks
/// are zero: zero-initialised tensors (a fresh LoRA's B matrices, padding)
/// then take no disk space. Random data costs one comparison per block.
fn write_sparse(file: &File, bytes: &[u8]) -> std::io::Result<()> {
    const BLOCK: usize = 4096;
    // Runs of data blocks go out in one write each.
    let mut run_start = None;
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * BLOCK),
            (true, Some(start)) => {
                file.write_all_at(&bytes[start..i * BLOCK], start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        file.write_all_at(&bytes[start..], start as u64)?;
    }
    file.set_len(bytes.len() as u64)
}

fn store_error(root: &Path, message: impl Into<String>) -> HotweightsError {
    HotweightsError::Store {
        path: root.to_owned(),
        message: message.into(),
    }
}

fn take_lock(root: &Path) -> Result<File> {
    let path = root.join(LOCK);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| HotweightsError::io(&path, e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                store_error(
                    root,
                    "another process is changing this store; wait for it to finish",
                )
            } else {
                HotweightsError::io(&path, e.into())
            }
        },
    )?;
    Ok(file)
}

/// The store's state; a store no commit has touched yet has the empty one.
fn read_state(root: &Path) -> Result<State> {
    let path = root.join(STATE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(State {
                format: FORMAT,
                ..State::default()
            });
        }
        Err(e) => return Err(HotweightsError::io(&path, e)),
    };
    let state: State = serde_json::from_slice(&bytes).map_err(|e| {
        store_error(
            root,
            format!("{}:{}:{}: {e}", path.display(), e.line(), e.column()),
        )
    })?;
    if state.format != FORMAT {
        return Err(store_error(
            root,
            format!(
                "has layout version {}, this build reads {FORMAT}",
                state.format
            ),
        ));
    }
    Ok(state)
}

/// Flushes everything written to the store's filesystem: one call instead
/// of an fsync per chunk file.
fn sync_filesystem(root: &Path) -> Result<()> {
    let dir = File::open(root).map_err(|e| HotweightsError::io(root, e))?;
    rustix::fs::syncfs(&dir).map_err(|e| HotweightsError::io(root, e.into()))
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = File::open(dir).map_err(|e| HotweightsError::io(dir, e))?;
    file.sync_all().map_err(|e| HotweightsError::io(dir, e))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
