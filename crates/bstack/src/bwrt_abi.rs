//! bwrt through its C ABI, behind a safe Rust interface.
//!
//! bstack links bwrt as a crate, but `bstack bwrt`, the demo's bwrt stage
//! and `bstack bench bwrt` call the negotiated C function table
//! (`bwrt_get_api(BWRT_ABI_VERSION)`) exactly as a C or Python program does:
//! every struct carries its `struct_size`, every call returns a status, and
//! failures are read back with `bwrt_last_error`. What they show and measure
//! is therefore the seam users call, not a Rust shortcut around it.
//!
//! This is the one module of bstack with `unsafe` code. Its safe interface
//! keeps the ABI's one lifetime rule (a wave's tensors stay valid until its
//! semaphore reaches its value) by construction: [`AbiRuntime::run_waves`]
//! borrows every tensor for the whole call and waits for every wave it
//! submitted before it returns, and [`AbiRuntime::submit_empty`] submits
//! waves with no memory at all.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_void};
use std::ptr;

use bwrt::Status;
use bwrt::ffi::{
    BWRT_ABI_VERSION, BWRT_DEVICE_CPU, BWRT_SWAP_QUEUE, BWRT_SWAP_QUEUED, BWRT_WAVE_B_FROM_WEIGHTS,
    BWRT_WAVE_BLOCK_WHEN_FULL, BwrtApi, BwrtCaps, BwrtCounters, BwrtDevice, BwrtRuntime,
    BwrtRuntimeConfig, BwrtSemaphore, BwrtTensor, BwrtWaveDesc,
};
use bwrt::{Buffer, DType};

/// A call through the C ABI that returned a status other than OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbiError {
    /// The status the call returned.
    pub status: Status,
    /// `bwrt_last_error`'s message for it.
    pub message: String,
}

impl std::fmt::Display for AbiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.message, self.status)
    }
}

impl std::error::Error for AbiError {}

/// What a call through the ABI gives back.
pub type AbiResult<T> = Result<T, AbiError>;

/// The negotiated function table.
#[derive(Clone, Copy)]
pub struct Api {
    table: &'static BwrtApi,
}

impl Api {
    /// Negotiates `BWRT_ABI_VERSION` with the linked library.
    pub fn negotiate() -> AbiResult<Api> {
        let table = bwrt::ffi::bwrt_get_api(BWRT_ABI_VERSION);
        // SAFETY: bwrt_get_api returns NULL or a pointer to a static,
        // immutable table.
        match unsafe { table.as_ref() } {
            Some(table) => Ok(Api { table }),
            None => Err(AbiError {
                status: Status::UnsupportedVersion,
                message: format!("bwrt does not serve ABI version {BWRT_ABI_VERSION}"),
            }),
        }
    }

    /// Turns a status into a result, reading the thread's last error.
    fn check(&self, status: Status) -> AbiResult<()> {
        if status == Status::Ok {
            return Ok(());
        }
        let mut buf = [0 as c_char; 1024];
        // SAFETY: `buf` is writable for its length; the call NUL-terminates
        // it and returns the status of the failed call it describes.
        unsafe { (self.table.last_error)(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: last_error wrote a NUL-terminated string into `buf`.
        let message = unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Err(AbiError { status, message })
    }

    /// The library's capabilities (`bwrt_get_caps`).
    pub fn caps(&self) -> AbiResult<BwrtCaps> {
        let mut caps = BwrtCaps {
            struct_size: size_of::<BwrtCaps>() as u32,
            ..BwrtCaps::default()
        };
        // SAFETY: `caps` is a writable BwrtCaps with its struct_size set.
        self.check(unsafe { (self.table.get_caps)(&mut caps) })?;
        Ok(caps)
    }

    /// Creates a runtime (`bwrt_runtime_create`).
    pub fn runtime(&self, settings: &RuntimeSettings) -> AbiResult<AbiRuntime> {
        let config = BwrtRuntimeConfig {
            struct_size: size_of::<BwrtRuntimeConfig>() as u32,
            workers: settings.workers,
            ring_depth: settings.ring_depth,
            dtype: settings.dtype as u32,
            bm: settings.tile.0,
            bn: settings.tile.1,
            bk: settings.tile.2,
            flags: 0,
            swap_begin: settings.swap_window.0,
            swap_end: settings.swap_window.1,
            backend: settings.backend,
            device: settings.device,
        };
        let mut handle = ptr::null_mut();
        // SAFETY: `config` is a valid struct; `handle` is writable.
        self.check(unsafe { (self.table.runtime_create)(&config, &mut handle) })?;
        Ok(AbiRuntime { api: *self, handle })
    }

    /// Creates a timeline semaphore starting at `initial`.
    pub fn semaphore(&self, initial: u64) -> AbiResult<AbiSemaphore> {
        let mut handle = ptr::null_mut();
        // SAFETY: `handle` is writable.
        self.check(unsafe { (self.table.semaphore_create)(initial, &mut handle) })?;
        Ok(AbiSemaphore { api: *self, handle })
    }
}

/// The fields of `BwrtRuntimeConfig`, as a Rust caller gives them.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Worker threads.
    pub workers: u32,
    /// Command ring slots.
    pub ring_depth: u32,
    /// The WaveSpec's operand dtype.
    pub dtype: DType,
    /// The WaveSpec's `(bm, bn, bk)`.
    pub tile: (u32, u32, u32),
    /// The WaveSpec's `[swap_begin, swap_end)`.
    pub swap_window: (u64, u64),
    /// `BWRT_BACKEND_*`: where the waves run.
    pub backend: u32,
    /// Device ordinal, for the CUDA backend.
    pub device: u32,
}

impl RuntimeSettings {
    /// The settings of a WaveSpec, with `workers` workers, a 1024-slot ring
    /// and the CPU backend.
    pub fn from_wave_spec(spec: &bwrt::WaveSpec, workers: u32) -> AbiResult<Self> {
        let dtype = DType::from_plan(&spec.dtype, "wave_spec.dtype").map_err(|e| AbiError {
            status: e.status(),
            message: e.to_string(),
        })?;
        Ok(RuntimeSettings {
            workers,
            ring_depth: 1024,
            dtype,
            tile: (spec.bm, spec.bn, spec.bk),
            swap_window: (spec.swap_begin, spec.swap_end),
            backend: bwrt::ffi::BWRT_BACKEND_CPU,
            device: 0,
        })
    }
}

/// Worker threads to use by default: the core count (at most bwrt's 1024).
pub fn cores() -> u32 {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(1024) as u32)
}

/// A row-major host matrix in one of bwrt's dtypes, owned by the caller.
#[derive(Debug, Clone)]
pub struct Matrix {
    dtype: DType,
    shape: [i64; 2],
    bytes: Vec<u8>,
}

impl Matrix {
    /// `rows x cols` values (row-major) encoded as `dtype`.
    pub fn from_f32(values: &[f32], dtype: DType, rows: usize, cols: usize) -> Matrix {
        debug_assert_eq!(values.len(), rows * cols);
        Matrix {
            dtype,
            shape: [rows as i64, cols as i64],
            bytes: Buffer::from_f32(values, dtype).to_bytes(),
        }
    }

    /// A zeroed `rows x cols` matrix.
    pub fn zeros(dtype: DType, rows: usize, cols: usize) -> Matrix {
        Matrix {
            dtype,
            shape: [rows as i64, cols as i64],
            bytes: vec![0; rows * cols * dtype.size()],
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.shape[0] as usize
    }

    /// The elements decoded to f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        Buffer::from_bytes(self.bytes.clone()).to_f32(self.dtype)
    }

    /// The DLPack-style descriptor of this matrix. It points into `self`,
    /// so it is only handed to the library while `self` is borrowed.
    fn descriptor(&self) -> BwrtTensor {
        BwrtTensor {
            struct_size: size_of::<BwrtTensor>() as u32,
            dtype: self.dtype as u32,
            data: self.bytes.as_ptr().cast_mut().cast::<c_void>(),
            byte_offset: 0,
            ndim: 2,
            device: BwrtDevice {
                device_type: BWRT_DEVICE_CPU,
                device_id: 0,
            },
            shape: self.shape.as_ptr(),
            strides: ptr::null(),
        }
    }
}

/// The B operand of a wave.
#[derive(Debug, Clone, Copy)]
pub enum B<'a> {
    /// A matrix given with the wave.
    Matrix(&'a Matrix),
    /// The weights in this slot when the wave starts.
    Weights(u32),
}

/// One GEMM wave `c = a · b` for [`AbiRuntime::run_waves`].
#[derive(Debug)]
pub struct Wave<'a> {
    /// The left operand.
    pub a: &'a Matrix,
    /// The right operand.
    pub b: B<'a>,
    /// The output, written by the wave.
    pub c: &'a mut Matrix,
}

/// What became of a weight swap that the library accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// The slot holds the new weights now.
    Applied,
    /// The swap waits for the window to open.
    Queued,
}

/// A runtime handle; destroyed (after draining its ring) on drop.
pub struct AbiRuntime {
    api: Api,
    handle: *mut BwrtRuntime,
}

// SAFETY: bwrt documents every runtime function but destroy as callable
// from any thread at once; destroy happens in Drop, with `&mut self`.
unsafe impl Send for AbiRuntime {}
// SAFETY: as above.
unsafe impl Sync for AbiRuntime {}

/// A 0 x 0 matrix with no memory: a wave over it touches nothing, so it may
/// be in flight for as long as it likes.
const EMPTY_SHAPE: [i64; 2] = [0, 0];

fn empty_descriptor() -> BwrtTensor {
    BwrtTensor {
        struct_size: size_of::<BwrtTensor>() as u32,
        dtype: DType::F32 as u32,
        data: ptr::null_mut(),
        byte_offset: 0,
        ndim: 2,
        device: BwrtDevice {
            device_type: BWRT_DEVICE_CPU,
            device_id: 0,
        },
        shape: EMPTY_SHAPE.as_ptr(),
        strides: ptr::null(),
    }
}

impl AbiRuntime {
    fn desc(flags: u32, weight_slot: u32) -> BwrtWaveDesc {
        BwrtWaveDesc {
            struct_size: size_of::<BwrtWaveDesc>() as u32,
            flags,
            weight_slot,
            reserved: 0,
        }
    }

    /// Submits an empty (0 x 0 x 0) wave that raises `signal` to `value`
    /// when it finishes; with `block`, waits for ring space instead of
    /// failing with BUSY. The wave has no memory, so nothing has to outlive
    /// it: this is what the latency and ring benchmarks submit.
    pub fn submit_empty(&self, signal: Option<(&AbiSemaphore, u64)>, block: bool) -> AbiResult<()> {
        let t = empty_descriptor();
        let desc = Self::desc(if block { BWRT_WAVE_BLOCK_WHEN_FULL } else { 0 }, 0);
        let (sem, value) = signal.map_or((ptr::null(), 0), |(s, v)| (s.handle.cast_const(), v));
        // SAFETY: the runtime and semaphore handles are live (owned by
        // `self` and the borrowed AbiSemaphore); every descriptor is valid
        // for the call and describes no memory.
        self.api.check(unsafe {
            (self.api.table.submit_wave)(self.handle, &desc, &t, &t, &t, sem, value)
        })
    }

    /// Runs `waves`: submits them in order (blocking when the ring is
    /// full), each with its own semaphore, then waits for every one that
    /// was submitted. Returns the first failure (of a submission or of a
    /// wave) after all of them have ended, so no wave is in flight when
    /// this returns and the borrowed matrices are free again.
    pub fn run_waves(&self, waves: &mut [Wave<'_>]) -> AbiResult<()> {
        let mut sems = Vec::with_capacity(waves.len());
        let mut first_error = None;
        for wave in waves.iter_mut() {
            let sem = match self.api.semaphore(0) {
                Ok(s) => s,
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            };
            let a = wave.a.descriptor();
            let c = wave.c.descriptor();
            let (b, flags, slot) = match wave.b {
                B::Matrix(m) => (m.descriptor(), BWRT_WAVE_BLOCK_WHEN_FULL, 0),
                B::Weights(slot) => (
                    empty_descriptor(),
                    BWRT_WAVE_BLOCK_WHEN_FULL | BWRT_WAVE_B_FROM_WEIGHTS,
                    slot,
                ),
            };
            let desc = Self::desc(flags, slot);
            // SAFETY: the handles are live; the descriptors point into
            // matrices borrowed for this whole call (`c` mutably, so nobody
            // else reads it while the wave writes), and the wait below
            // keeps the call from returning before the wave ends.
            let status = unsafe {
                (self.api.table.submit_wave)(self.handle, &desc, &a, &b, &c, sem.handle, 1)
            };
            match self.api.check(status) {
                Ok(()) => sems.push(sem),
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
        }
        for sem in &sems {
            // Waits until the wave has ended, successfully or not.
            if let Err(e) = sem.wait(1, u64::MAX) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Copies `weights` into weight `slot` if the wave index is inside the
    /// swap window; before it, with `queue`, the swap waits for the window.
    pub fn set_weights(&self, slot: u32, weights: &Matrix, queue: bool) -> AbiResult<Swap> {
        let t = weights.descriptor();
        let mut outcome = 0u32;
        // SAFETY: the handle is live; the descriptor points into `weights`,
        // which the library copies before it returns.
        self.api.check(unsafe {
            (self.api.table.set_weights)(
                self.handle,
                slot,
                &t,
                if queue { BWRT_SWAP_QUEUE } else { 0 },
                &mut outcome,
            )
        })?;
        Ok(if outcome == BWRT_SWAP_QUEUED {
            Swap::Queued
        } else {
            Swap::Applied
        })
    }

    /// The runtime's counters (`bwrt_sample`).
    pub fn sample(&self) -> AbiResult<BwrtCounters> {
        let mut c = BwrtCounters {
            struct_size: size_of::<BwrtCounters>() as u32,
            ..BwrtCounters::default()
        };
        // SAFETY: the handle is live; `c` is writable with struct_size set.
        self.api
            .check(unsafe { (self.api.table.sample)(self.handle, &mut c) })?;
        Ok(c)
    }
}

impl Drop for AbiRuntime {
    fn drop(&mut self) {
        // SAFETY: the handle came from runtime_create and is not used again.
        let _ = unsafe { (self.api.table.runtime_destroy)(self.handle) };
    }
}

/// A timeline semaphore handle; destroyed on drop (a wave that still holds
/// it keeps its own reference inside the library).
pub struct AbiSemaphore {
    api: Api,
    handle: *mut BwrtSemaphore,
}

// SAFETY: bwrt documents every semaphore function but destroy as callable
// from any thread at once; destroy happens in Drop, with `&mut self`.
unsafe impl Send for AbiSemaphore {}
// SAFETY: as above.
unsafe impl Sync for AbiSemaphore {}

impl AbiSemaphore {
    /// Waits until the value reaches `value` (`timeout_ns`: 0 polls,
    /// `u64::MAX` waits forever).
    pub fn wait(&self, value: u64, timeout_ns: u64) -> AbiResult<()> {
        // SAFETY: the handle is live.
        self.api
            .check(unsafe { (self.api.table.semaphore_wait)(self.handle, value, timeout_ns) })
    }
}

impl Drop for AbiSemaphore {
    fn drop(&mut self) {
        // SAFETY: the handle came from semaphore_create and is not used again.
        let _ = unsafe { (self.api.table.semaphore_destroy)(self.handle) };
    }
}

/// A deterministic pseudo-random matrix with values in [-1, 1).
pub fn random_matrix(dtype: DType, rows: usize, cols: usize, seed: u64) -> Matrix {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| {
            // xorshift64*: cheap, and good enough for test operands.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            r as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Matrix::from_f32(&values, dtype, rows, cols)
}

/// The largest [`max_relative_error`] a correct wave has with outputs in
/// `dtype`: accumulation is in f32, so the output's rounding dominates.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
    }
}

/// The largest difference between `c` and a naive f64 reference `a · b`,
/// relative to the largest reference magnitude (at least 1).
pub fn max_relative_error(a: &Matrix, b: &Matrix, c: &Matrix) -> f64 {
    let (m, k, n) = (
        a.shape[0] as usize,
        a.shape[1] as usize,
        b.shape[1] as usize,
    );
    let (av, bv, cv) = (a.to_f32(), b.to_f32(), c.to_f32());
    let mut worst = 0f64;
    let mut scale = 1f64;
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|p| f64::from(av[i * k + p]) * f64::from(bv[p * n + j]))
                .sum();
            scale = scale.max(want.abs());
            worst = worst.max((want - f64::from(cv[i * n + j])).abs());
        }
    }
    worst / scale
}
