//! The runtime: a bounded lock-free command ring feeding worker threads.
//!
//! ```text
//!  submit_wave ──► [ ArrayQueue: ring_depth slots ] ──► worker 0 ─┐
//!  submit_wave ──►        (lock-free MPMC)          ──► worker 1 ─┼─► C, semaphore.raise_to(value)
//!                                                   ──► worker N ─┘
//! ```
//!
//! Submission checks the wave (shapes, dtypes, bounds) and pushes it on the
//! ring without taking a lock. When the ring is full, [`OnFull::Fail`]
//! returns [`Error::Busy`] at once and [`OnFull::Block`] waits for a slot.
//! An idle worker spins on the ring for [`WORKER_SPIN`] (a kernel wake-up
//! costs more than a small wave), then sleeps on a doorbell; submitters ring
//! it only when a worker sleeps, so a busy ring takes no lock at all.
//!
//! # Waves and swap windows
//!
//! The runtime holds one [`WaveSpec`]: its `(bm, bn, bk)` tile every GEMM
//! wave, and its `[swap_begin, swap_end)` is the swap window. Its `dtype`
//! must be F32, F16 or BF16 (waves carry their own dtypes); `tile_order`,
//! `pack_order`, `stage_depth`, the deadlines and the trace statistics are
//! validated but not used by the CPU backend. The **current
//! wave index** is the number of waves *completed* successfully so far (it
//! starts at 0; failed waves do not advance it). [`Runtime::set_weights`]
//! replaces a weight slot only while the index is inside the window:
//!
//! - inside: the swap is applied at once ([`SwapOutcome::Applied`]);
//! - before the window, with [`SwapMode::Queue`]: the swap is held and
//!   applied at the exact moment the index reaches `swap_begin`
//!   ([`SwapOutcome::Queued`]), before any later wave starts;
//! - otherwise (before it without `Queue`, or after it, or the window is
//!   empty): [`Error::OutsideSwapWindow`], counted as a swap-window violation.
//!
//! The decision and the index change happen under one lock, so for a given
//! sequence of completions the outcome is always the same. A wave whose B
//! operand is a weight slot ([`Operand::Weights`]) reads the slot when a
//! worker starts it.
//!
//! # Semaphores
//!
//! A finished wave raises its semaphore to at least its value (see
//! [`Semaphore`]); a failed wave fails it. With several workers waves may
//! finish out of order: to wait for *all* of waves `1..=n`, give each its
//! own value on one semaphore and use one worker, or wait on each.
//!
//! # Backends
//!
//! [`Backend::Cpu`] (the default) runs each wave on the worker's core with
//! the `gemm` crate, tiled by the wave spec. [`Backend::Cuda`] (cargo
//! feature `cuda`, see `cuda.rs`) gives each worker its own stream and
//! cuBLAS handle on one GPU; the ring, the wave index, the swap window, the
//! semaphores and the counters are the same for both. A runtime asked for a
//! backend this build or machine lacks is not built: [`Error::Unavailable`]
//! says what is missing.
//!
//! Dropping the runtime lets the workers drain the ring, then joins them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bstack_plan::{Validate, WaveSpec};
use crossbeam_queue::ArrayQueue;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::semaphore::Semaphore;
use crate::tensor::Tensor;
use crate::wave::{Tile, check_gemm, run_gemm, wave_bytes};

/// Where waves run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The worker threads' own cores (the `gemm` crate's SIMD kernels).
    #[default]
    Cpu,
    /// An NVIDIA GPU through cuBLAS: device `device` (0-based). Needs the
    /// `cuda` feature, the CUDA driver and libcublas.
    Cuda {
        /// Device ordinal.
        device: u32,
    },
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Cpu => f.write_str("cpu"),
            Backend::Cuda { device } => write!(f, "cuda:{device}"),
        }
    }
}

/// Whether this build has the CUDA backend (the `cuda` feature); the CPU
/// backend is always there.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// CUDA devices this process can see: 0 without the `cuda` feature, the
/// driver or a device.
pub fn cuda_devices() -> u32 {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// How the runtime is built.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Worker threads (1 to 1024).
    pub workers: usize,
    /// Slots in the command ring (1 to 1,048,576).
    pub ring_depth: usize,
    /// Tile shape, swap window and dtype of the waves; it must validate.
    pub wave_spec: WaveSpec,
    /// Where the waves run.
    pub backend: Backend,
}

impl Default for RuntimeConfig {
    /// Two workers, a 1024-slot ring, [`default_wave_spec`], the CPU.
    fn default() -> Self {
        RuntimeConfig {
            workers: 2,
            ring_depth: 1024,
            wave_spec: default_wave_spec(),
            backend: Backend::Cpu,
        }
    }
}

/// A wave spec with 64 x 64 x 256 tiles, F32 and a swap window that is
/// always open (`[0, u64::MAX)`).
pub fn default_wave_spec() -> WaveSpec {
    WaveSpec {
        schema_version: bstack_plan::SCHEMA_VERSION,
        bm: 64,
        bn: 64,
        bk: 256,
        swap_begin: 0,
        swap_end: u64::MAX,
        dtype: "F32".into(),
        ..WaveSpec::default()
    }
}

/// What submission does when the ring is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Return [`Error::Busy`] at once.
    #[default]
    Fail,
    /// Wait until a worker frees a slot.
    Block,
}

/// How a wave is submitted.
#[derive(Debug, Clone, Copy, Default)]
pub struct WaveDesc {
    /// What to do when the ring is full.
    pub on_full: OnFull,
}

/// The B operand of a GEMM wave.
#[derive(Debug, Clone)]
pub enum Operand {
    /// A tensor given with the wave.
    Tensor(Tensor),
    /// The tensor in weight slot `n` when the wave starts (see
    /// [`Runtime::set_weights`]).
    Weights(u32),
}

impl From<Tensor> for Operand {
    fn from(t: Tensor) -> Self {
        Operand::Tensor(t)
    }
}

/// What [`Runtime::set_weights`] does outside the swap window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SwapMode {
    /// Refuse with [`Error::OutsideSwapWindow`].
    #[default]
    Reject,
    /// Before the window: hold the swap until the window opens.
    Queue,
}

/// What became of a [`Runtime::set_weights`] call that succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapOutcome {
    /// The slot holds the new weights now.
    Applied,
    /// The swap waits for the window to open.
    Queued,
}

/// A snapshot of the runtime's counters ([`Runtime::sample`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Waves accepted onto the ring.
    pub waves_submitted: u64,
    /// Waves that finished successfully (the current wave index).
    pub waves_completed: u64,
    /// Waves that failed while running.
    pub waves_failed: u64,
    /// Waves on the ring now, not yet taken by a worker.
    pub ring_occupancy: u64,
    /// Capacity of the ring.
    pub ring_depth: u64,
    /// Waves running on a worker now.
    pub active_ops: u64,
    /// Bytes of A, B and C of completed waves.
    pub bytes: u64,
    /// Floating-point operations of completed waves (2·m·n·k each).
    pub flops: u64,
    /// Time workers spent running waves, ns (summed over workers).
    pub busy_ns: u64,
    /// `set_weights` calls refused outside the swap window.
    pub swap_window_violations: u64,
    /// Swaps applied (at once or when their window opened).
    pub swaps_applied: u64,
    /// Swaps queued and not yet applied.
    pub swaps_pending: u64,
}

struct Command {
    a: Tensor,
    b: Operand,
    c: Tensor,
    signal: Option<(Arc<Semaphore>, u64)>,
}

#[derive(Default)]
struct Stats {
    submitted: AtomicU64,
    failed: AtomicU64,
    active: AtomicU64,
    bytes: AtomicU64,
    flops: AtomicU64,
    busy_ns: AtomicU64,
    violations: AtomicU64,
    swaps_applied: AtomicU64,
}

#[derive(Default)]
struct SwapState {
    /// Waves completed: the current wave index.
    completed: u64,
    weights: HashMap<u32, Tensor>,
    pending: Vec<(u32, Tensor)>,
}

struct Shared {
    ring: ArrayQueue<Command>,
    tile: Tile,
    swap_begin: u64,
    swap_end: u64,
    stats: Stats,
    swap: Mutex<SwapState>,
    doorbell: Mutex<()>,
    work: Condvar,
    space: Condvar,
    space_waiters: AtomicUsize,
    /// Workers asleep on `work`.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
}

/// How long an idle worker spins on the ring before it sleeps.
pub const WORKER_SPIN: Duration = Duration::from_micros(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The wave runtime. Every method takes `&self` and is safe to call from
/// any number of threads at once; share it with `Arc<Runtime>`.
pub struct Runtime {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    wave_spec: WaveSpec,
    backend: Backend,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("workers", &self.workers.len())
            .field("ring_depth", &self.shared.ring.capacity())
            .field("tile", &self.shared.tile)
            .finish()
    }
}

impl Runtime {
    /// Starts `config.workers` worker threads over a ring of
    /// `config.ring_depth` slots. Errors name the field at fault.
    pub fn new(config: RuntimeConfig) -> Result<Self> {
        if !(1..=1024).contains(&config.workers) {
            return Err(Error::invalid(
                "config.workers",
                format!("{} is not in 1..=1024", config.workers),
            ));
        }
        if !(1..=1 << 20).contains(&config.ring_depth) {
            return Err(Error::invalid(
                "config.ring_depth",
                format!("{} is not in 1..=1048576", config.ring_depth),
            ));
        }
        let spec = config.wave_spec;
        spec.validate()
            .map_err(|p| Error::InvalidWaveSpec(p.to_string()))?;
        DType::from_plan(&spec.dtype, "wave_spec.dtype")?;
        let tile = Tile {
            bm: spec.bm as usize,
            bn: spec.bn as usize,
            bk: spec.bk as usize,
        };
        let shared = Arc::new(Shared {
            ring: ArrayQueue::new(config.ring_depth),
            tile,
            swap_begin: spec.swap_begin,
            swap_end: spec.swap_end,
            stats: Stats::default(),
            swap: Mutex::new(SwapState::default()),
            doorbell: Mutex::new(()),
            work: Condvar::new(),
            space: Condvar::new(),
            space_waiters: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        });
        let mut rt = Runtime {
            shared: Arc::clone(&shared),
            workers: Vec::with_capacity(config.workers),
            wave_spec: spec,
            backend: config.backend,
        };
        // Each worker makes its engine on its own thread (a GPU context is
        // bound to the thread that makes it, and must not become the
        // caller's) and reports before it takes waves; `new` returns only
        // when every engine is up, so a backend that cannot run fails this
        // call, never a wave. On failure, dropping `rt` stops the rest.
        let (ready, reports) = std::sync::mpsc::channel::<Result<()>>();
        for i in 0..config.workers {
            let s = Arc::clone(&shared);
            let ready = ready.clone();
            let backend = config.backend;
            let handle = std::thread::Builder::new()
                .name(format!("bwrt-worker-{i}"))
                .spawn(move || match Engine::new(backend) {
                    Ok(engine) => {
                        let _ = ready.send(Ok(()));
                        drop(ready);
                        worker(&s, &engine);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                })
                .map_err(|e| Error::Internal(format!("starting worker {i}: {e}")))?;
            rt.workers.push(handle);
        }
        drop(ready);
        for _ in 0..config.workers {
            match reports.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::Internal(
                        "a worker stopped before its engine was ready".into(),
                    ));
                }
            }
        }
        Ok(rt)
    }

    /// The wave spec the runtime was built with.
    pub fn wave_spec(&self) -> &WaveSpec {
        &self.wave_spec
    }

    /// Where the runtime's waves run.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The tile every GEMM wave is cut into.
    pub fn tile(&self) -> Tile {
        self.shared.tile
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The current wave index: waves completed successfully so far.
    pub fn wave_index(&self) -> u64 {
        lock(&self.shared.swap).completed
    }

    /// Submits the GEMM wave `C = A · B`. When it finishes, `signal`'s
    /// semaphore is raised to its value (or failed, if the wave fails).
    ///
    /// Shapes, dtypes and bounds are checked here: `a [m x k]`, `b [k x n]`,
    /// `c [m x n]`, A and B of one dtype, C of that dtype or F32, C sharing
    /// no memory with A or B. A full ring gives [`Error::Busy`] or blocks,
    /// as `desc.on_full` says.
    pub fn submit_wave(
        &self,
        desc: &WaveDesc,
        a: Tensor,
        b: impl Into<Operand>,
        c: Tensor,
        signal: Option<(Arc<Semaphore>, u64)>,
    ) -> Result<()> {
        let b = b.into();
        match &b {
            Operand::Tensor(b) => {
                check_gemm(&a, b, &c)?;
            }
            Operand::Weights(slot) => {
                if let Some(w) = lock(&self.shared.swap).weights.get(slot) {
                    check_gemm(&a, w, &c)?;
                }
            }
        }
        let mut cmd = Command { a, b, c, signal };
        loop {
            if self.shared.shutdown.load(Ordering::Acquire) {
                return Err(Error::ShutDown);
            }
            match self.shared.ring.push(cmd) {
                Ok(()) => break,
                Err(back) => {
                    cmd = back;
                    if desc.on_full == OnFull::Fail {
                        return Err(Error::Busy {
                            depth: self.shared.ring.capacity(),
                        });
                    }
                    self.shared.space_waiters.fetch_add(1, Ordering::AcqRel);
                    let guard = lock(&self.shared.doorbell);
                    if self.shared.ring.is_full() {
                        let _ = self
                            .shared
                            .space
                            .wait_timeout(guard, Duration::from_millis(1));
                    }
                    self.shared.space_waiters.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        self.shared.stats.submitted.fetch_add(1, Ordering::Relaxed);
        // A worker going to sleep counts itself a sleeper, then looks at the
        // ring once more; with both sides fenced, either it sees this wave
        // or this submitter sees it asleep. Taking the doorbell lock orders
        // the notify after its last look, so the wake-up cannot be lost.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            drop(lock(&self.shared.doorbell));
            self.shared.work.notify_one();
        }
        Ok(())
    }

    /// Puts `weights` in weight `slot`, subject to the swap window (see the
    /// module docs). Outside the window: [`Error::OutsideSwapWindow`], or,
    /// before the window with [`SwapMode::Queue`], queued until it opens.
    pub fn set_weights(&self, slot: u32, weights: Tensor, mode: SwapMode) -> Result<SwapOutcome> {
        weights.check("weights")?;
        let s = &self.shared;
        let mut st = lock(&s.swap);
        let index = st.completed;
        let (begin, end) = (s.swap_begin, s.swap_end);
        if begin <= index && index < end {
            st.weights.insert(slot, weights);
            s.stats.swaps_applied.fetch_add(1, Ordering::Relaxed);
            return Ok(SwapOutcome::Applied);
        }
        if mode == SwapMode::Queue && index < begin && begin < end {
            st.pending.push((slot, weights));
            return Ok(SwapOutcome::Queued);
        }
        s.stats.violations.fetch_add(1, Ordering::Relaxed);
        let hint = if begin >= end {
            "; the window is empty".to_string()
        } else if index >= end {
            "; the window has closed".to_string()
        } else {
            "; pass SwapMode::Queue (BWRT_SWAP_QUEUE) to wait for it".to_string()
        };
        Err(Error::OutsideSwapWindow {
            wave_index: index,
            swap_begin: begin,
            swap_end: end,
            hint,
        })
    }

    /// The tensor in weight `slot`, if any.
    pub fn weights(&self, slot: u32) -> Option<Tensor> {
        lock(&self.shared.swap).weights.get(&slot).cloned()
    }

    /// A snapshot of the counters. Each counter is read atomically; the
    /// snapshot as a whole is not (a wave may finish between two reads).
    pub fn sample(&self) -> Counters {
        let s = &self.shared;
        let st = lock(&s.swap);
        let (completed, pending) = (st.completed, st.pending.len() as u64);
        drop(st);
        Counters {
            waves_submitted: s.stats.submitted.load(Ordering::Relaxed),
            waves_completed: completed,
            waves_failed: s.stats.failed.load(Ordering::Relaxed),
            ring_occupancy: s.ring.len() as u64,
            ring_depth: s.ring.capacity() as u64,
            active_ops: s.stats.active.load(Ordering::Relaxed),
            bytes: s.stats.bytes.load(Ordering::Relaxed),
            flops: s.stats.flops.load(Ordering::Relaxed),
            busy_ns: s.stats.busy_ns.load(Ordering::Relaxed),
            swap_window_violations: s.stats.violations.load(Ordering::Relaxed),
            swaps_applied: s.stats.swaps_applied.load(Ordering::Relaxed),
            swaps_pending: pending,
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        drop(lock(&self.shared.doorbell));
        self.shared.work.notify_all();
        self.shared.space.notify_all();
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// What one worker runs its waves on.
enum Engine {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::Worker),
}

impl Engine {
    fn new(backend: Backend) -> Result<Engine> {
        match backend {
            Backend::Cpu => Ok(Engine::Cpu),
            #[cfg(feature = "cuda")]
            Backend::Cuda { device } => Ok(Engine::Cuda(crate::cuda::Worker::new(device)?)),
            #[cfg(not(feature = "cuda"))]
            Backend::Cuda { .. } => Err(Error::Unavailable(
                "this build of bwrt has no CUDA backend; rebuild it with `--features cuda`".into(),
            )),
        }
    }

    /// `C = A · B`; the `(m, n, k)` computed.
    fn gemm(
        &self,
        tile: Tile,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
    ) -> Result<(usize, usize, usize)> {
        match self {
            Engine::Cpu => run_gemm(tile, a, b, c),
            #[cfg(feature = "cuda")]
            Engine::Cuda(worker) => worker.gemm(a, b, c),
        }
    }
}

fn worker(s: &Shared, engine: &Engine) {
    let mut idle_since: Option<Instant> = None;
    let mut spins = 0u32;
    loop {
        if let Some(cmd) = s.ring.pop() {
            idle_since = None;
            if s.space_waiters.load(Ordering::Acquire) > 0 {
                drop(lock(&s.doorbell));
                s.space.notify_all();
            }
            execute(s, engine, cmd);
            continue;
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        if since.elapsed() < WORKER_SPIN {
            std::thread::yield_now();
            continue;
        }
        let guard = lock(&s.doorbell);
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if s.ring.is_empty() && !s.shutdown.load(Ordering::Acquire) {
            let _ = s.work.wait_timeout(guard, Duration::from_millis(50));
        }
        s.sleepers.fetch_sub(1, Ordering::SeqCst);
        idle_since = None;
    }
}

fn execute(s: &Shared, engine: &Engine, cmd: Command) {
    s.stats.active.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let b = match &cmd.b {
        Operand::Tensor(t) => Ok(t.clone()),
        Operand::Weights(slot) => lock(&s.swap)
            .weights
            .get(slot)
            .cloned()
            .ok_or_else(|| Error::invalid("b", format!("weight slot {slot} holds no weights"))),
    };
    let result = b.and_then(|b| {
        let Ok(r) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine
                .gemm(s.tile, &cmd.a, &b, &cmd.c)
                .map(|mnk| (mnk, wave_bytes(&cmd.a, &b, &cmd.c)))
        })) else {
            return Err(Error::Internal("the GEMM kernel panicked".into()));
        };
        r
    });
    let elapsed = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
    s.stats.busy_ns.fetch_add(elapsed, Ordering::Relaxed);
    match result {
        Ok(((m, n, k), bytes)) => {
            s.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
            let flops = 2u64
                .saturating_mul(m as u64)
                .saturating_mul(n as u64)
                .saturating_mul(k as u64);
            s.stats.flops.fetch_add(flops, Ordering::Relaxed);
            let mut st = lock(&s.swap);
            st.completed += 1;
            if st.completed == s.swap_begin && s.swap_begin < s.swap_end {
                let pending = std::mem::take(&mut st.pending);
                s.stats
                    .swaps_applied
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                st.weights.extend(pending);
            }
            drop(st);
            s.stats.active.fetch_sub(1, Ordering::Relaxed);
            if let Some((sem, value)) = cmd.signal {
                sem.raise_to(value);
            }
        }
        Err(e) => {
            s.stats.failed.fetch_add(1, Ordering::Relaxed);
            s.stats.active.fetch_sub(1, Ordering::Relaxed);
            if let Some((sem, _)) = cmd.signal {
                sem.fail(e.to_string());
            }
        }
    }
}
