//! The C ABI: a narrow, versioned seam that any language can call.
//!
//! `include/bwrt.h` is generated from this file by cbindgen (the `header`
//! test keeps it current). The design follows the C ABIs that last:
//!
//! - **Version negotiation** (as ONNX Runtime's `OrtGetApiBase`):
//!   [`bwrt_get_api`]`(BWRT_ABI_VERSION)` returns a pointer to a static
//!   table of function pointers ([`BwrtApi`]), or NULL for a version this
//!   library does not serve. Tables only ever grow at the end, so a caller
//!   built against version N works with any library that serves N. The
//!   functions are also exported under their own names.
//! - **Opaque handles** ([`BwrtRuntime`], [`BwrtSemaphore`],
//!   [`BwrtMBarrier`]) made by `*_create` and released by `*_destroy`.
//! - **Status codes** (as IREE): every function except [`bwrt_get_api`]
//!   returns a [`Status`] (`BwrtStatus`); [`bwrt_last_error`] copies the
//!   message of the calling thread's latest failure. No panic crosses the
//!   boundary: every entry point runs under `catch_unwind` and reports a
//!   panic as `BWRT_STATUS_INTERNAL`.
//! - **Extensible structs**: every struct passed by pointer starts with
//!   `uint32_t struct_size`, set by the caller to `sizeof` the struct it
//!   was built with. A size below the struct's first published size is
//!   `BWRT_STATUS_BAD_STRUCT_SIZE`; a larger one (a newer caller) is fine,
//!   and the library reads or writes only the fields it knows. Structs grow
//!   only at the end: fields a caller's smaller struct lacks take their
//!   documented defaults (read) or are not written (write), so a caller
//!   built against an older header keeps working.
//! - **Tensors as in DLPack** ([`BwrtTensor`]): data pointer, byte offset,
//!   dtype code, `ndim`, shape and strides (in elements, NULL for
//!   row-major) and a device: host memory only, on either backend (the
//!   CUDA backend copies the operands to the GPU and the result back).
//!
//! Memory contract of a wave: A, B and C stay valid, and nobody else
//! writes A or B or touches C, from `bwrt_submit_wave` until the wave's
//! semaphore reaches its value (or fails). Weights given to
//! `bwrt_set_weights` are copied, so the caller may free them on return.
#![allow(unsafe_code)]

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::barrier::MBarrier;
use crate::dtype::DType;
use crate::error::{Error, Status};
use crate::runtime::{
    Backend, OnFull, Operand, Runtime, RuntimeConfig, SwapMode, SwapOutcome, WaveDesc,
};
use crate::semaphore::Semaphore;
use crate::tensor::{Buffer, HostMemory, Tensor};

/// The ABI version this header describes; pass it to `bwrt_get_api`.
pub const BWRT_ABI_VERSION: u32 = 1;

/// `BwrtDevice.device_type` of host memory (DLPack's `kDLCPU`).
pub const BWRT_DEVICE_CPU: i32 = 1;

/// `BwrtWaveDesc.flags`: block until the ring has room instead of
/// returning `BWRT_STATUS_BUSY`.
pub const BWRT_WAVE_BLOCK_WHEN_FULL: u32 = 1;
/// `BwrtWaveDesc.flags`: take B from weight slot `weight_slot` when the
/// wave starts (the `b` argument is then ignored and may be NULL).
pub const BWRT_WAVE_B_FROM_WEIGHTS: u32 = 2;

/// `bwrt_set_weights` flags: before the swap window, queue the swap until
/// the window opens instead of refusing it.
pub const BWRT_SWAP_QUEUE: u32 = 1;
/// `bwrt_set_weights` outcome: the slot holds the new weights now.
pub const BWRT_SWAP_APPLIED: u32 = 0;
/// `bwrt_set_weights` outcome: the swap waits for the window to open.
pub const BWRT_SWAP_QUEUED: u32 = 1;

/// `BwrtCaps.backend`, `BwrtRuntimeConfig.backend`: the CPU backend.
pub const BWRT_BACKEND_CPU: u32 = 0;
/// `BwrtRuntimeConfig.backend`: an NVIDIA GPU through cuBLAS (in builds
/// with the `cuda` feature; see `BwrtCaps.backends`).
pub const BWRT_BACKEND_CUDA: u32 = 1;
/// `BwrtCaps.features`: swaps can be queued until the window opens.
pub const BWRT_FEATURE_SWAP_QUEUE: u32 = 1;
/// `BwrtCaps.features`: submission can block on a full ring.
pub const BWRT_FEATURE_BLOCKING_SUBMIT: u32 = 2;
/// `BwrtCaps.features`: mbarriers for host threads.
pub const BWRT_FEATURE_MBARRIER: u32 = 4;
/// `BwrtCaps.features`: B operands read from weight slots.
pub const BWRT_FEATURE_WEIGHT_SLOTS: u32 = 8;

const MAX_WORKERS: u32 = 1024;
const MAX_RING_DEPTH: u32 = 1 << 20;

/// A runtime: worker threads and their command ring. Opaque.
pub struct BwrtRuntime {
    rt: Runtime,
}

/// A timeline semaphore. Opaque.
pub struct BwrtSemaphore {
    sem: Arc<Semaphore>,
}

/// A phased barrier with an expected arrival count. Opaque.
pub struct BwrtMBarrier {
    mb: MBarrier,
}

/// Where a tensor's memory lives (as DLPack's `DLDevice`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BwrtDevice {
    /// `BWRT_DEVICE_CPU` (the only one supported).
    pub device_type: i32,
    /// Device ordinal; 0 for the CPU.
    pub device_id: i32,
}

/// A tensor, described as DLPack does.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BwrtTensor {
    /// `sizeof(BwrtTensor)` as the caller knows it.
    pub struct_size: u32,
    /// A `BwrtDtype` code.
    pub dtype: u32,
    /// First byte of the allocation (may be NULL for a tensor of 0 elements).
    pub data: *mut c_void,
    /// Bytes from `data` to element `[0, 0]`; a multiple of the element size.
    pub byte_offset: u64,
    /// Number of dimensions: 2.
    pub ndim: i32,
    /// Where the memory is: `{BWRT_DEVICE_CPU, 0}`.
    pub device: BwrtDevice,
    /// `ndim` sizes, each >= 0.
    pub shape: *const i64,
    /// `ndim` strides in elements, each >= 0; NULL for row-major.
    pub strides: *const i64,
}

/// How to build a runtime (`bwrt_runtime_create`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BwrtRuntimeConfig {
    /// `sizeof(BwrtRuntimeConfig)` as the caller knows it.
    pub struct_size: u32,
    /// Worker threads, 1 to 1024.
    pub workers: u32,
    /// Command ring slots, 1 to 1048576.
    pub ring_depth: u32,
    /// The WaveSpec's operand dtype (a `BwrtDtype` code).
    pub dtype: u32,
    /// The WaveSpec's tile rows (M), > 0.
    pub bm: u32,
    /// The WaveSpec's tile columns (N), > 0.
    pub bn: u32,
    /// The WaveSpec's tile depth (K), > 0.
    pub bk: u32,
    /// Reserved; must be 0.
    pub flags: u32,
    /// First wave index at which weights may be swapped (inclusive).
    pub swap_begin: u64,
    /// First wave index after the swap window (exclusive); >= swap_begin.
    pub swap_end: u64,
    /// `BWRT_BACKEND_*`; absent from callers built before it (48-byte
    /// structs): `BWRT_BACKEND_CPU`. A library older than this field
    /// ignores it and runs on the CPU: before asking for another backend,
    /// check that `bwrt_get_caps` filled `backends` (its `struct_size` came
    /// back >= 40) and that the backend's bit is set.
    pub backend: u32,
    /// Device ordinal for `BWRT_BACKEND_CUDA`; ignored by the CPU backend.
    pub device: u32,
}

/// `sizeof(BwrtRuntimeConfig)` in ABI version 1 as first published, before
/// `backend` and `device`: the smallest size accepted.
const RUNTIME_CONFIG_V1_SIZE: usize = 48;

/// How to submit a wave (`bwrt_submit_wave`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BwrtWaveDesc {
    /// `sizeof(BwrtWaveDesc)` as the caller knows it.
    pub struct_size: u32,
    /// `BWRT_WAVE_*` bits.
    pub flags: u32,
    /// Weight slot of B, with `BWRT_WAVE_B_FROM_WEIGHTS`.
    pub weight_slot: u32,
    /// Reserved; must be 0.
    pub reserved: u32,
}

/// Counters of a runtime (`bwrt_sample`); see the Rust `Counters`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BwrtCounters {
    /// In: `sizeof(BwrtCounters)` as the caller knows it. Out: bytes filled.
    pub struct_size: u32,
    /// Reserved; 0.
    pub reserved: u32,
    /// Waves accepted onto the ring.
    pub waves_submitted: u64,
    /// Waves finished successfully: the current wave index.
    pub waves_completed: u64,
    /// Waves that failed while running.
    pub waves_failed: u64,
    /// Waves on the ring, not yet taken by a worker.
    pub ring_occupancy: u64,
    /// Capacity of the ring.
    pub ring_depth: u64,
    /// Waves running now.
    pub active_ops: u64,
    /// Bytes of A, B and C of completed waves.
    pub bytes: u64,
    /// Floating-point operations of completed waves (2·m·n·k each).
    pub flops: u64,
    /// Time workers spent running waves, ns.
    pub busy_ns: u64,
    /// Weight swaps refused outside the swap window.
    pub swap_window_violations: u64,
    /// Weight swaps applied.
    pub swaps_applied: u64,
    /// Weight swaps queued, not yet applied.
    pub swaps_pending: u64,
}

/// What this library can do (`bwrt_get_caps`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BwrtCaps {
    /// In: `sizeof(BwrtCaps)` as the caller knows it. Out: bytes filled.
    pub struct_size: u32,
    /// Highest ABI version served.
    pub abi_version: u32,
    /// `BWRT_BACKEND_*`.
    pub backend: u32,
    /// Bit `1 << code` set for each supported `BwrtDtype`.
    pub dtype_mask: u32,
    /// Most worker threads.
    pub max_workers: u32,
    /// Largest command ring.
    pub max_ring_depth: u32,
    /// Largest tile side (bm, bn, bk).
    pub max_tile: u32,
    /// `BWRT_FEATURE_*` bits.
    pub features: u32,
    /// Bit `1 << BWRT_BACKEND_*` for each backend in this build (not
    /// filled for callers built before it: 32-byte structs).
    pub backends: u32,
    /// CUDA devices this process can run waves on: 0 without the CUDA
    /// backend, the driver, cuBLAS or a device. In builds with the CUDA
    /// backend, counting them initialises the CUDA driver in this process
    /// (as any CUDA call does, a process forked afterwards cannot use CUDA).
    pub cuda_devices: u32,
}

/// `sizeof(BwrtCaps)` in ABI version 1 as first published, before
/// `backends` and `cuda_devices`: the smallest size accepted.
const CAPS_V1_SIZE: usize = 32;

/// Version 1 of the function table. Entries are only ever appended.
#[repr(C)]
#[derive(Debug)]
pub struct BwrtApi {
    /// `sizeof` this table in the library.
    pub struct_size: u32,
    /// The version served.
    pub abi_version: u32,
    /// See `bwrt_last_error`.
    pub last_error: unsafe extern "C" fn(*mut c_char, usize) -> Status,
    /// See `bwrt_get_caps`.
    pub get_caps: unsafe extern "C" fn(*mut BwrtCaps) -> Status,
    /// See `bwrt_runtime_create`.
    pub runtime_create:
        unsafe extern "C" fn(*const BwrtRuntimeConfig, *mut *mut BwrtRuntime) -> Status,
    /// See `bwrt_runtime_destroy`.
    pub runtime_destroy: unsafe extern "C" fn(*mut BwrtRuntime) -> Status,
    /// See `bwrt_submit_wave`.
    pub submit_wave: unsafe extern "C" fn(
        *const BwrtRuntime,
        *const BwrtWaveDesc,
        *const BwrtTensor,
        *const BwrtTensor,
        *const BwrtTensor,
        *const BwrtSemaphore,
        u64,
    ) -> Status,
    /// See `bwrt_set_weights`.
    pub set_weights:
        unsafe extern "C" fn(*const BwrtRuntime, u32, *const BwrtTensor, u32, *mut u32) -> Status,
    /// See `bwrt_sample`.
    pub sample: unsafe extern "C" fn(*const BwrtRuntime, *mut BwrtCounters) -> Status,
    /// See `bwrt_semaphore_create`.
    pub semaphore_create: unsafe extern "C" fn(u64, *mut *mut BwrtSemaphore) -> Status,
    /// See `bwrt_semaphore_destroy`.
    pub semaphore_destroy: unsafe extern "C" fn(*mut BwrtSemaphore) -> Status,
    /// See `bwrt_semaphore_signal`.
    pub semaphore_signal: unsafe extern "C" fn(*const BwrtSemaphore, u64) -> Status,
    /// See `bwrt_semaphore_wait`.
    pub semaphore_wait: unsafe extern "C" fn(*const BwrtSemaphore, u64, u64) -> Status,
    /// See `bwrt_semaphore_query`.
    pub semaphore_query: unsafe extern "C" fn(*const BwrtSemaphore, *mut u64) -> Status,
    /// See `bwrt_mbarrier_create`.
    pub mbarrier_create: unsafe extern "C" fn(u64, *mut *mut BwrtMBarrier) -> Status,
    /// See `bwrt_mbarrier_destroy`.
    pub mbarrier_destroy: unsafe extern "C" fn(*mut BwrtMBarrier) -> Status,
    /// See `bwrt_mbarrier_arrive`.
    pub mbarrier_arrive: unsafe extern "C" fn(*const BwrtMBarrier, u64, *mut u64) -> Status,
    /// See `bwrt_mbarrier_wait`.
    pub mbarrier_wait: unsafe extern "C" fn(*const BwrtMBarrier, u64, u64) -> Status,
}

static API_V1: BwrtApi = BwrtApi {
    struct_size: size_of::<BwrtApi>() as u32,
    abi_version: 1,
    last_error: bwrt_last_error,
    get_caps: bwrt_get_caps,
    runtime_create: bwrt_runtime_create,
    runtime_destroy: bwrt_runtime_destroy,
    submit_wave: bwrt_submit_wave,
    set_weights: bwrt_set_weights,
    sample: bwrt_sample,
    semaphore_create: bwrt_semaphore_create,
    semaphore_destroy: bwrt_semaphore_destroy,
    semaphore_signal: bwrt_semaphore_signal,
    semaphore_wait: bwrt_semaphore_wait,
    semaphore_query: bwrt_semaphore_query,
    mbarrier_create: bwrt_mbarrier_create,
    mbarrier_destroy: bwrt_mbarrier_destroy,
    mbarrier_arrive: bwrt_mbarrier_arrive,
    mbarrier_wait: bwrt_mbarrier_wait,
};

// ---------------------------------------------------------------------------
// Errors, panics and the last-error slot.

/// A failed call: its status and message.
struct Fail {
    status: Status,
    message: String,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail {
            status: e.status(),
            message: e.to_string(),
        }
    }
}

fn fail(status: Status, message: impl Into<String>) -> Fail {
    Fail {
        status,
        message: message.into(),
    }
}

fn null(name: &str) -> Fail {
    fail(Status::NullPointer, format!("{name} is NULL"))
}

thread_local! {
    static LAST_ERROR: RefCell<(Status, String)> = const { RefCell::new((Status::Ok, String::new())) };
}

fn record(status: Status, message: String) {
    LAST_ERROR.with(|slot| *slot.borrow_mut() = (status, message));
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs one entry point: a failure is recorded for `bwrt_last_error`, a
/// panic is caught and reported as `Internal`.
fn entry(name: &str, f: impl FnOnce() -> Result<(), Fail>) -> Status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Status::Ok,
        Ok(Err(e)) => {
            record(e.status, format!("{name}: {}", e.message));
            e.status
        }
        Err(payload) => {
            let message = format!(
                "{name}: internal error: panic: {}",
                panic_message(&*payload)
            );
            record(Status::Internal, message);
            Status::Internal
        }
    }
}

// ---------------------------------------------------------------------------
// Reading and writing caller structs.

/// The `struct_size` the caller declared at `*p`, if `p` is not NULL and it
/// is at least `min`.
///
/// # Safety
/// `p` is NULL or points to a readable struct whose first field is the
/// `u32` struct_size.
unsafe fn declared_size<T>(p: *const T, name: &str, min: usize) -> Result<usize, Fail> {
    if p.is_null() {
        return Err(null(name));
    }
    // SAFETY: `p` is non-NULL and, by the caller's contract, points to a
    // struct whose first field is the `u32` struct_size (T is repr(C) with
    // that first field, so the pointer is aligned for u32).
    let size = unsafe { p.cast::<u32>().read() } as usize;
    if size < min {
        return Err(fail(
            Status::BadStructSize,
            format!("{name}->struct_size is {size}; this library needs at least {min}"),
        ));
    }
    Ok(size)
}

/// Reads the caller's struct `*p`, whose first field is `struct_size`.
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes, laid out
/// as `T` for the first `size_of::<T>()` of them.
unsafe fn read_struct<T: Copy>(p: *const T, name: &str) -> Result<T, Fail> {
    // SAFETY: forwarded contract.
    unsafe { declared_size(p, name, size_of::<T>()) }?;
    // SAFETY: the caller says the struct holds `size` >= size_of::<T>()
    // bytes laid out as T.
    Ok(unsafe { p.read() })
}

/// Reads the caller's struct `*p` of a type that grows at the end: at
/// least `min` bytes (its first published size) must be declared; the
/// fields past the caller's `struct_size` keep `T::default()`.
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes, laid out
/// as `T` for as many of them as `T` has.
unsafe fn read_prefix<T: Copy + Default>(p: *const T, name: &str, min: usize) -> Result<T, Fail> {
    // SAFETY: forwarded contract.
    let size = unsafe { declared_size(p, name, min) }?;
    let mut value = T::default();
    // SAFETY: the caller's struct holds `size` bytes and we copy at most
    // that many, and at most size_of::<T>() into `value`; T is plain data
    // (repr(C) integers), so any bytes are a valid value.
    unsafe {
        std::ptr::copy_nonoverlapping(
            p.cast::<u8>(),
            (&mut value as *mut T).cast::<u8>(),
            size.min(size_of::<T>()),
        );
    }
    Ok(value)
}

/// Writes `value` into the caller's `*p` of a type that grows at the end:
/// at least `min` bytes must be declared; only the caller's `struct_size`
/// bytes (at most `size_of::<T>()`) are written, and `struct_size` is set
/// to the number written.
///
/// # Safety
/// `p` is NULL or points to `struct_size` writable bytes laid out as `T`
/// for as many of them as `T` has; `value`'s first field is a `u32`.
unsafe fn write_prefix<T: Copy>(p: *mut T, name: &str, min: usize, value: T) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let size = unsafe { declared_size(p.cast_const(), name, min) }?;
    let n = size.min(size_of::<T>());
    // SAFETY: `n` bytes fit both `value` and the caller's struct; the
    // struct_size written back is the u32 at the start, which both have.
    unsafe {
        std::ptr::copy_nonoverlapping((&value as *const T).cast::<u8>(), p.cast::<u8>(), n);
        p.cast::<u32>().write(n as u32);
    }
    Ok(())
}

/// Checks the caller's `struct_size` at `*p` and writes `value` there.
///
/// # Safety
/// `p` is NULL or points to a writable `T` whose first field is `struct_size`.
unsafe fn write_struct<T: Copy>(p: *mut T, name: &str, value: T) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    unsafe { declared_size(p.cast_const(), name, size_of::<T>()) }?;
    // SAFETY: the caller's struct holds at least size_of::<T>() writable
    // bytes laid out as T.
    unsafe { p.write(value) };
    Ok(())
}

/// Borrows the object behind a handle.
///
/// # Safety
/// `p` is NULL or a live handle from the matching `*_create`.
unsafe fn handle<'a, T>(p: *const T, name: &str) -> Result<&'a T, Fail> {
    // SAFETY: non-NULL handles come from Box::into_raw in `*_create` and
    // stay valid until `*_destroy`, which the caller must not race.
    unsafe { p.as_ref() }.ok_or_else(|| null(name))
}

/// Stores `value` through an out-pointer.
///
/// # Safety
/// `p` is NULL or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, name: &str, value: T) -> Result<(), Fail> {
    if p.is_null() {
        return Err(null(name));
    }
    // SAFETY: non-NULL, and valid for writes by the caller's contract.
    unsafe { p.write(value) };
    Ok(())
}

// ---------------------------------------------------------------------------
// Tensors over caller memory.

/// Caller memory handed to a wave.
struct Foreign {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the memory belongs to the caller, who promises (see the module
// docs) that it stays valid and untouched by others until the wave's
// semaphore is signalled; within bwrt every access goes through the
// Buffer's RwLock, so workers on other threads never race each other.
unsafe impl Send for Foreign {}
// SAFETY: as for Send; shared access only hands out `&[u8]` under a read
// lock, and `&mut [u8]` only under the write lock.
unsafe impl Sync for Foreign {}

impl HostMemory for Foreign {
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is non-NULL (checked in `tensor`) and the caller
        // keeps `len` bytes from it valid for the life of the wave.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `bytes`; `&mut self` is reached only through the
        // Buffer's write lock, so this is the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// A tensor over caller memory, and the byte range it spans.
struct Described {
    tensor: Tensor,
    start: usize,
    len: usize,
}

/// Reads two `i64`s from `p`.
///
/// # Safety
/// `p` points to at least two readable `i64`.
unsafe fn pair(p: *const i64) -> [i64; 2] {
    // SAFETY: by the function's contract.
    unsafe { [p.read(), p.add(1).read()] }
}

/// Turns a caller's tensor descriptor into a tensor over its memory,
/// checking everything that can be checked.
///
/// # Safety
/// `p` is NULL or a valid `BwrtTensor` whose `shape` (and `strides`, if not
/// NULL) point to `ndim` `int64_t`, and whose `data` spans every element.
unsafe fn tensor(p: *const BwrtTensor, name: &str) -> Result<Described, Fail> {
    // SAFETY: forwarded contract.
    let t = unsafe { read_struct(p, name) }?;
    if t.device.device_type != BWRT_DEVICE_CPU || t.device.device_id != 0 {
        return Err(fail(
            Status::InvalidArgument,
            format!(
                "{name}.device is ({}, {}); only host memory ({BWRT_DEVICE_CPU}, 0) is supported",
                t.device.device_type, t.device.device_id
            ),
        ));
    }
    let dtype = DType::from_code(t.dtype).ok_or_else(|| {
        fail(
            Status::BadDtype,
            format!(
                "{name}.dtype is {}; expected 0 (F32), 1 (F16) or 2 (BF16)",
                t.dtype
            ),
        )
    })?;
    if t.ndim != 2 {
        return Err(fail(
            Status::BadShape,
            format!("{name}.ndim is {}; waves take 2-D tensors", t.ndim),
        ));
    }
    if t.shape.is_null() {
        return Err(null(&format!("{name}.shape")));
    }
    // SAFETY: non-NULL and, with ndim == 2, two entries by contract.
    let shape = unsafe { pair(t.shape) };
    let strides = if t.strides.is_null() {
        [shape[1], 1]
    } else {
        // SAFETY: as for shape.
        unsafe { pair(t.strides) }
    };
    let to_usize = |v: i64, what: &str| {
        usize::try_from(v).map_err(|_| {
            fail(
                Status::BadShape,
                format!("{name}.{what} is {v}; it must be >= 0"),
            )
        })
    };
    let shape = [
        to_usize(shape[0], "shape[0]")?,
        to_usize(shape[1], "shape[1]")?,
    ];
    let strides = [
        to_usize(strides[0], "strides[0]")?,
        to_usize(strides[1], "strides[1]")?,
    ];
    let size = dtype.size() as u64;
    if t.byte_offset % size != 0 {
        return Err(fail(
            Status::BadShape,
            format!(
                "{name}.byte_offset {} is not a multiple of the {dtype} element size {size}",
                t.byte_offset
            ),
        ));
    }
    let offset = usize::try_from(t.byte_offset / size)
        .map_err(|_| fail(Status::BadShape, format!("{name}.byte_offset is too large")))?;
    let len = if shape[0] == 0 || shape[1] == 0 {
        0
    } else {
        (shape[0] - 1)
            .checked_mul(strides[0])
            .zip((shape[1] - 1).checked_mul(strides[1]))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|x| x.checked_add(offset))
            .and_then(|x| x.checked_add(1))
            .and_then(|x| x.checked_mul(dtype.size()))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .ok_or_else(|| {
                fail(
                    Status::BadShape,
                    format!("{name}: shape {shape:?} with strides {strides:?} overflows"),
                )
            })?
    };
    if len > 0 && t.data.is_null() {
        return Err(null(&format!("{name}.data")));
    }
    let buffer = Buffer::from_host(Foreign {
        ptr: t.data.cast::<u8>(),
        len,
    });
    Ok(Described {
        tensor: Tensor {
            buffer,
            dtype,
            shape,
            strides,
            offset,
        },
        start: t.data as usize,
        len,
    })
}

fn overlaps(x: &Described, y: &Described) -> bool {
    x.len > 0 && y.len > 0 && x.start < y.start + y.len && y.start < x.start + x.len
}

// ---------------------------------------------------------------------------
// Entry points.

/// Negotiates the ABI: returns the function table of `version`, or NULL
/// (with `BWRT_STATUS_UNSUPPORTED_VERSION` for `bwrt_last_error`) when this
/// library does not serve it. Pass `BWRT_ABI_VERSION`.
///
/// Thread-safety: callable from any thread at any time; the table is
/// static and immutable.
#[unsafe(no_mangle)]
pub extern "C" fn bwrt_get_api(version: u32) -> *const BwrtApi {
    let found = catch_unwind(|| (version == 1).then_some(&API_V1));
    match found {
        Ok(Some(api)) => api,
        _ => {
            record(
                Status::UnsupportedVersion,
                format!(
                    "bwrt_get_api: ABI version {version} is not supported; this library serves 1 to {BWRT_ABI_VERSION}"
                ),
            );
            std::ptr::null()
        }
    }
}

/// Copies the message of the calling thread's latest failed call into
/// `buf` (at most `len - 1` bytes and a NUL; truncated if longer) and
/// returns that call's status (`BWRT_STATUS_OK` if none failed yet).
/// `buf` may be NULL when `len` is 0, to read just the status. Successful
/// calls leave the message as it was.
///
/// Thread-safety: any thread; each thread has its own message.
///
/// # Safety
/// `buf` is NULL or valid for `len` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_last_error(buf: *mut c_char, len: usize) -> Status {
    let result = catch_unwind(|| {
        LAST_ERROR.with(|slot| {
            let slot = slot.borrow();
            if !buf.is_null() && len > 0 {
                let bytes = slot.1.as_bytes();
                let n = bytes.len().min(len - 1);
                // SAFETY: `buf` holds `len` bytes by contract and
                // `n + 1 <= len`; the source is a live String.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
                    buf.add(n).write(0);
                }
            }
            slot.0
        })
    });
    result.unwrap_or(Status::Internal)
}

/// Fills `caps` (set `caps->struct_size` first) with the backend, limits,
/// supported dtypes, tile limits and features.
///
/// Thread-safety: any thread.
///
/// # Safety
/// `caps` is NULL or a writable `BwrtCaps` with `struct_size` set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_get_caps(caps: *mut BwrtCaps) -> Status {
    entry("bwrt_get_caps", || {
        let value = BwrtCaps {
            struct_size: size_of::<BwrtCaps>() as u32,
            abi_version: BWRT_ABI_VERSION,
            backend: BWRT_BACKEND_CPU,
            dtype_mask: DType::ALL.iter().map(|d| 1u32 << (*d as u32)).sum(),
            max_workers: MAX_WORKERS,
            max_ring_depth: MAX_RING_DEPTH,
            max_tile: u32::MAX,
            features: BWRT_FEATURE_SWAP_QUEUE
                | BWRT_FEATURE_BLOCKING_SUBMIT
                | BWRT_FEATURE_MBARRIER
                | BWRT_FEATURE_WEIGHT_SLOTS,
            backends: (1 << BWRT_BACKEND_CPU)
                | if crate::runtime::CUDA_BUILT {
                    1 << BWRT_BACKEND_CUDA
                } else {
                    0
                },
            cuda_devices: crate::runtime::cuda_devices(),
        };
        // SAFETY: forwarded contract.
        unsafe { write_prefix(caps, "caps", CAPS_V1_SIZE, value) }
    })
}

/// Creates a runtime from `config` and stores its handle in `*out`.
/// Errors: `NULL_POINTER`, `BAD_STRUCT_SIZE`, `INVALID_ARGUMENT` (workers,
/// ring depth, tile, swap window or flags out of range), `BAD_DTYPE`.
///
/// Thread-safety: any thread.
///
/// # Safety
/// `config` is NULL or a valid `BwrtRuntimeConfig`; `out` is NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_runtime_create(
    config: *const BwrtRuntimeConfig,
    out: *mut *mut BwrtRuntime,
) -> Status {
    entry("bwrt_runtime_create", || {
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: forwarded contract.
        let c = unsafe { read_prefix(config, "config", RUNTIME_CONFIG_V1_SIZE) }?;
        if c.flags != 0 {
            return Err(fail(
                Status::InvalidArgument,
                format!("config.flags is {}; it must be 0", c.flags),
            ));
        }
        let dtype = DType::from_code(c.dtype).ok_or_else(|| {
            fail(
                Status::BadDtype,
                format!("config.dtype is {}; expected 0, 1 or 2", c.dtype),
            )
        })?;
        let wave_spec = bstack_plan::WaveSpec {
            bm: c.bm,
            bn: c.bn,
            bk: c.bk,
            swap_begin: c.swap_begin,
            swap_end: c.swap_end,
            dtype: dtype.name().into(),
            ..crate::runtime::default_wave_spec()
        };
        let backend = match c.backend {
            BWRT_BACKEND_CPU => Backend::Cpu,
            BWRT_BACKEND_CUDA => Backend::Cuda { device: c.device },
            other => {
                return Err(fail(
                    Status::InvalidArgument,
                    format!(
                        "config.backend is {other}; expected {BWRT_BACKEND_CPU} (CPU) or \
                         {BWRT_BACKEND_CUDA} (CUDA)"
                    ),
                ));
            }
        };
        let rt = Runtime::new(RuntimeConfig {
            workers: c.workers as usize,
            ring_depth: c.ring_depth as usize,
            wave_spec,
            backend,
        })?;
        // SAFETY: `out` was checked non-NULL and is writable by contract.
        unsafe { hand_out(out, BwrtRuntime { rt }) };
        Ok(())
    })
}

/// Destroys a runtime: waves still on the ring run to completion (their
/// semaphores are signalled), then the workers are joined. NULL is a no-op
/// returning OK.
///
/// Thread-safety: call once per handle, when no other thread is using it.
///
/// # Safety
/// `rt` is NULL or a live handle from `bwrt_runtime_create`, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_runtime_destroy(rt: *mut BwrtRuntime) -> Status {
    entry("bwrt_runtime_destroy", || {
        // SAFETY: the caller's contract (a live handle or NULL, not used again).
        unsafe { take_back(rt) };
        Ok(())
    })
}

/// Submits the GEMM wave `C = A · B` (`a` is m x k, `b` k x n, `c` m x n;
/// A and B of one dtype, C of that dtype or F32; C must not overlap A or
/// B). When it finishes, `signal` is raised to `value` (or failed if the
/// wave fails); `signal` may be NULL. Errors: `NULL_POINTER`,
/// `BAD_STRUCT_SIZE`, `BAD_DTYPE`, `BAD_SHAPE`, `INVALID_ARGUMENT`, `BUSY`
/// (ring full without `BWRT_WAVE_BLOCK_WHEN_FULL`).
///
/// Thread-safety: any number of threads may submit to one runtime at once.
///
/// # Safety
/// Handles are NULL or live; the descriptors are NULL or valid; the tensor
/// memory stays valid until the wave's semaphore is signalled.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_submit_wave(
    rt: *const BwrtRuntime,
    desc: *const BwrtWaveDesc,
    a: *const BwrtTensor,
    b: *const BwrtTensor,
    c: *const BwrtTensor,
    signal: *const BwrtSemaphore,
    value: u64,
) -> Status {
    entry("bwrt_submit_wave", || {
        // SAFETY (all four blocks): forwarded contract.
        let rt = unsafe { handle(rt, "rt") }?;
        // SAFETY: as above.
        let d = unsafe { read_struct(desc, "desc") }?;
        let known = BWRT_WAVE_BLOCK_WHEN_FULL | BWRT_WAVE_B_FROM_WEIGHTS;
        if d.flags & !known != 0 || d.reserved != 0 {
            return Err(fail(
                Status::InvalidArgument,
                format!(
                    "desc.flags {:#x} has unknown bits or desc.reserved is not 0",
                    d.flags
                ),
            ));
        }
        // SAFETY: as above.
        let a = unsafe { tensor(a, "a") }?;
        // SAFETY: as above.
        let c = unsafe { tensor(c, "c") }?;
        if overlaps(&c, &a) {
            return Err(fail(Status::InvalidArgument, "c overlaps a"));
        }
        let b = if d.flags & BWRT_WAVE_B_FROM_WEIGHTS != 0 {
            Operand::Weights(d.weight_slot)
        } else {
            // SAFETY: as above.
            let b = unsafe { tensor(b, "b") }?;
            if overlaps(&c, &b) {
                return Err(fail(Status::InvalidArgument, "c overlaps b"));
            }
            Operand::Tensor(b.tensor)
        };
        let signal = if signal.is_null() {
            None
        } else {
            // SAFETY: as above.
            Some((Arc::clone(&unsafe { handle(signal, "signal") }?.sem), value))
        };
        let on_full = if d.flags & BWRT_WAVE_BLOCK_WHEN_FULL != 0 {
            OnFull::Block
        } else {
            OnFull::Fail
        };
        rt.rt
            .submit_wave(&WaveDesc { on_full }, a.tensor, b, c.tensor, signal)?;
        Ok(())
    })
}

/// Copies `weights` into weight `slot`, subject to the swap window of the
/// runtime: inside `[swap_begin, swap_end)` of the wave index (waves
/// completed) it is applied at once; before the window with
/// `BWRT_SWAP_QUEUE` in `flags` it is queued until the window opens;
/// otherwise the call fails with `BWRT_STATUS_OUTSIDE_SWAP_WINDOW`.
/// `*outcome` (if not NULL) receives `BWRT_SWAP_APPLIED` or
/// `BWRT_SWAP_QUEUED`. The caller may free `weights` on return.
///
/// Thread-safety: any thread; swaps and wave completions are ordered by
/// one lock, so the outcome depends only on the wave index at the call.
///
/// # Safety
/// `rt` is NULL or live; `weights` is NULL or a valid descriptor over
/// readable memory; `outcome` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_set_weights(
    rt: *const BwrtRuntime,
    slot: u32,
    weights: *const BwrtTensor,
    flags: u32,
    outcome: *mut u32,
) -> Status {
    entry("bwrt_set_weights", || {
        // SAFETY: forwarded contract.
        let rt = unsafe { handle(rt, "rt") }?;
        if flags & !BWRT_SWAP_QUEUE != 0 {
            return Err(fail(
                Status::InvalidArgument,
                format!("flags {flags:#x} has unknown bits"),
            ));
        }
        // SAFETY: forwarded contract.
        let w = unsafe { tensor(weights, "weights") }?;
        let owned = w.tensor.to_contiguous();
        drop(w);
        let mode = if flags & BWRT_SWAP_QUEUE != 0 {
            SwapMode::Queue
        } else {
            SwapMode::Reject
        };
        let result = match rt.rt.set_weights(slot, owned, mode)? {
            SwapOutcome::Applied => BWRT_SWAP_APPLIED,
            SwapOutcome::Queued => BWRT_SWAP_QUEUED,
        };
        if !outcome.is_null() {
            // SAFETY: non-NULL and writable by contract.
            unsafe { put(outcome, "outcome", result) }?;
        }
        Ok(())
    })
}

/// Fills `counters` (set `counters->struct_size` first) with a snapshot of
/// the runtime's counters; each is read atomically, the set is not.
///
/// Thread-safety: any thread, concurrently with submissions.
///
/// # Safety
/// `rt` is NULL or live; `counters` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_sample(
    rt: *const BwrtRuntime,
    counters: *mut BwrtCounters,
) -> Status {
    entry("bwrt_sample", || {
        // SAFETY: forwarded contract.
        let rt = unsafe { handle(rt, "rt") }?;
        let s = rt.rt.sample();
        let value = BwrtCounters {
            struct_size: size_of::<BwrtCounters>() as u32,
            reserved: 0,
            waves_submitted: s.waves_submitted,
            waves_completed: s.waves_completed,
            waves_failed: s.waves_failed,
            ring_occupancy: s.ring_occupancy,
            ring_depth: s.ring_depth,
            active_ops: s.active_ops,
            bytes: s.bytes,
            flops: s.flops,
            busy_ns: s.busy_ns,
            swap_window_violations: s.swap_window_violations,
            swaps_applied: s.swaps_applied,
            swaps_pending: s.swaps_pending,
        };
        // SAFETY: forwarded contract.
        unsafe { write_struct(counters, "counters", value) }
    })
}

/// Creates a timeline semaphore with value `initial`.
///
/// Thread-safety: any thread.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_semaphore_create(
    initial: u64,
    out: *mut *mut BwrtSemaphore,
) -> Status {
    entry("bwrt_semaphore_create", || {
        if out.is_null() {
            return Err(null("out"));
        }
        let handle = BwrtSemaphore {
            sem: Arc::new(Semaphore::new(initial)),
        };
        // SAFETY: `out` was checked non-NULL and is writable by contract.
        unsafe { hand_out(out, handle) };
        Ok(())
    })
}

/// Destroys a semaphore handle. Waves already submitted with it keep their
/// own reference and still run. NULL is a no-op returning OK.
///
/// Thread-safety: once per handle, when no other thread is using it.
///
/// # Safety
/// `sem` is NULL or a live handle, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_semaphore_destroy(sem: *mut BwrtSemaphore) -> Status {
    entry("bwrt_semaphore_destroy", || {
        // SAFETY: the caller's contract (a live handle or NULL, not used again).
        unsafe { take_back(sem) };
        Ok(())
    })
}

/// Sets the semaphore to `value`; a value lower than the current one is
/// `INVALID_ARGUMENT`.
///
/// Thread-safety: any thread.
///
/// # Safety
/// `sem` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_semaphore_signal(sem: *const BwrtSemaphore, value: u64) -> Status {
    entry("bwrt_semaphore_signal", || {
        // SAFETY: forwarded contract.
        unsafe { handle(sem, "sem") }?.sem.signal(value)?;
        Ok(())
    })
}

/// Waits until the semaphore reaches `value`. `timeout_ns`: 0 polls,
/// `UINT64_MAX` waits forever. Returns `TIMEOUT` when time runs out and
/// `WAVE_FAILED` if a wave failed the semaphore.
///
/// Thread-safety: any number of threads may wait at once.
///
/// # Safety
/// `sem` is NULL or live (and not destroyed during the wait).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_semaphore_wait(
    sem: *const BwrtSemaphore,
    value: u64,
    timeout_ns: u64,
) -> Status {
    entry("bwrt_semaphore_wait", || {
        // SAFETY: forwarded contract.
        unsafe { handle(sem, "sem") }?.sem.wait(value, timeout_ns)?;
        Ok(())
    })
}

/// Stores the semaphore's current value in `*value`.
///
/// Thread-safety: any thread.
///
/// # Safety
/// `sem` is NULL or live; `value` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_semaphore_query(
    sem: *const BwrtSemaphore,
    value: *mut u64,
) -> Status {
    entry("bwrt_semaphore_query", || {
        // SAFETY: forwarded contract.
        let v = unsafe { handle(sem, "sem") }?.sem.value();
        // SAFETY: forwarded contract.
        unsafe { put(value, "value", v) }
    })
}

/// Creates an mbarrier whose phases complete after `expected` (> 0) arrivals.
///
/// Thread-safety: any thread.
///
/// # Safety
/// `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_mbarrier_create(
    expected: u64,
    out: *mut *mut BwrtMBarrier,
) -> Status {
    entry("bwrt_mbarrier_create", || {
        if out.is_null() {
            return Err(null("out"));
        }
        let mb = MBarrier::new(expected)?;
        // SAFETY: `out` was checked non-NULL and is writable by contract.
        unsafe { hand_out(out, BwrtMBarrier { mb }) };
        Ok(())
    })
}

/// Destroys an mbarrier. NULL is a no-op returning OK.
///
/// Thread-safety: once per handle, when no other thread is using it.
///
/// # Safety
/// `mb` is NULL or a live handle, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_mbarrier_destroy(mb: *mut BwrtMBarrier) -> Status {
    entry("bwrt_mbarrier_destroy", || {
        // SAFETY: the caller's contract (a live handle or NULL, not used again).
        unsafe { take_back(mb) };
        Ok(())
    })
}

/// Records `count` arrivals (1 to what the phase still needs) and stores
/// the phase they belong to in `*phase` (if not NULL); the arrival that
/// reaches the expected count completes the phase.
///
/// Thread-safety: any number of threads at once.
///
/// # Safety
/// `mb` is NULL or live; `phase` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_mbarrier_arrive(
    mb: *const BwrtMBarrier,
    count: u64,
    phase: *mut u64,
) -> Status {
    entry("bwrt_mbarrier_arrive", || {
        // SAFETY: forwarded contract.
        let p = unsafe { handle(mb, "mb") }?.mb.arrive(count)?;
        if !phase.is_null() {
            // SAFETY: forwarded contract.
            unsafe { put(phase, "phase", p) }?;
        }
        Ok(())
    })
}

/// Waits until `phase` has completed; `timeout_ns` as for semaphores.
///
/// Thread-safety: any number of threads at once.
///
/// # Safety
/// `mb` is NULL or live (and not destroyed during the wait).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bwrt_mbarrier_wait(
    mb: *const BwrtMBarrier,
    phase: u64,
    timeout_ns: u64,
) -> Status {
    entry("bwrt_mbarrier_wait", || {
        // SAFETY: forwarded contract.
        unsafe { handle(mb, "mb") }?.mb.wait(phase, timeout_ns)?;
        Ok(())
    })
}

/// Moves `value` to the heap and writes its handle to `out`.
///
/// # Safety
/// `out` is non-NULL and valid for a write.
unsafe fn hand_out<T>(out: *mut *mut T, value: T) {
    let handle = Box::into_raw(Box::new(value));
    // SAFETY: guaranteed by the caller.
    unsafe { out.write(handle) };
}

/// Frees a handle made by [`hand_out`]; NULL is a no-op.
///
/// # Safety
/// `handle` is NULL or came from [`hand_out`] and is not used again.
unsafe fn take_back<T>(handle: *mut T) {
    if !handle.is_null() {
        // SAFETY: guaranteed by the caller: from Box::into_raw, freed once.
        drop(unsafe { Box::from_raw(handle) });
    }
}
