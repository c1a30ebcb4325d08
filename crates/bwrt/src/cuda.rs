//! The CUDA backend (cargo feature `cuda`): GEMM waves on an NVIDIA GPU
//! through cuBLAS.
//!
//! cudarc loads `libcuda` and `libcublas` when the first CUDA runtime is
//! built, not when the program starts, so a build with this feature runs on
//! machines without CUDA, and asking for the CUDA backend there is
//! [`Error::Unavailable`] naming the missing library (checked before any
//! CUDA call, since a library that fails to load would otherwise panic).
//!
//! Each worker thread owns one stream and one cuBLAS handle on the device.
//! A wave copies A and B, packed row-major, to the device, runs one
//! `cublasGemmEx` (f32 accumulation; F32, F16 or BF16 operands; C in A's
//! dtype or F32, as on the CPU), copies C back and writes it into C's view.
//! The worker waits for its stream before the wave counts as done, so the
//! ring, the wave index, the swap window and the semaphores behave exactly
//! as with the CPU backend. The wave spec's tile is the CPU backend's:
//! cuBLAS picks its own.
//!
//! Row-major `C = A · B` is, read column-major, `Cᵀ = Bᵀ · Aᵀ`: the call
//! passes B first, with `m` and `n` swapped and each operand's row length
//! as its leading dimension, so nothing is transposed in memory.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Buffer, Tensor};
use crate::wave::check_gemm;

/// CUDA devices this process can run waves on; 0 when the driver or
/// cuBLAS is missing (a runtime could not be built) or the driver fails.
pub(crate) fn device_count() -> u32 {
    // SAFETY: these only try to load the libraries by name.
    let present = unsafe {
        cudarc::driver::sys::is_culib_present() && cudarc::cublas::sys::is_culib_present()
    };
    if !present {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| u32::try_from(n).unwrap_or(0))
}

/// One worker's stream and cuBLAS handle on one device. Made on the worker
/// thread that uses it, so the CUDA context it binds is that thread's and
/// never the caller's.
pub(crate) struct Worker {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

impl Worker {
    /// A stream and a cuBLAS handle on device `ordinal`.
    pub(crate) fn new(ordinal: u32) -> Result<Worker> {
        // SAFETY: these only try to load the shared libraries by name.
        let (driver, cublas) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::cublas::sys::is_culib_present(),
            )
        };
        if !driver {
            return Err(Error::Unavailable(
                "the CUDA driver (libcuda.so) is not installed on this machine; \
                 use the CPU backend"
                    .into(),
            ));
        }
        if !cublas {
            return Err(Error::Unavailable(
                "cuBLAS (libcublas.so, from the CUDA toolkit) is not installed on this \
                 machine or not on the library path"
                    .into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::Unavailable(format!("counting CUDA devices: {e}")))?;
        if i64::from(ordinal) >= i64::from(count) {
            return Err(Error::Unavailable(format!(
                "CUDA device {ordinal} was asked for; this machine has {count}"
            )));
        }
        let context = CudaContext::new(ordinal as usize)
            .map_err(|e| Error::Device(format!("opening CUDA device {ordinal}: {e}")))?;
        // SAFETY: every buffer this worker makes is used on its one stream
        // only and freed after the stream is synchronised, so cudarc's
        // cross-stream event tracking has nothing to order (and making the
        // stream would otherwise synchronise the whole context).
        unsafe { context.disable_event_tracking() };
        let stream = context
            .new_stream()
            .map_err(|e| Error::Device(format!("creating a stream on device {ordinal}: {e}")))?;
        let blas = CudaBlas::new(Arc::clone(&stream))
            .map_err(|e| Error::Device(format!("creating a cuBLAS handle: {e}")))?;
        Ok(Worker { stream, blas })
    }

    /// `C = A · B` on the device; the `(m, n, k)` computed.
    pub(crate) fn gemm(&self, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<(usize, usize, usize)> {
        let (m, n, k) = check_gemm(a, b, c)?;
        if m == 0 || n == 0 {
            return Ok((m, n, k));
        }
        if k == 0 {
            write_view(c, &vec![0f32; m * n]);
            return Ok((m, n, k));
        }
        let dims = [("a.shape[0]", m), ("b.shape[1]", n), ("a.shape[1]", k)];
        let mut int = [0i32; 3];
        for (out, (field, value)) in int.iter_mut().zip(dims) {
            *out = i32::try_from(value).map_err(|_| {
                Error::shape(field, format!("{value} exceeds cuBLAS's limit of 2^31 - 1"))
            })?;
        }
        let [mi, ni, ki] = int;
        let device = |e: cudarc::driver::DriverError| Error::Device(e.to_string());
        let a_dev = self.stream.clone_htod(&packed(a)).map_err(device)?;
        let b_dev = self.stream.clone_htod(&packed(b)).map_err(device)?;
        let c_bytes = m
            .checked_mul(n)
            .and_then(|e| e.checked_mul(c.dtype.size()))
            .ok_or_else(|| Error::shape("c.shape", format!("{m} x {n} overflows usize")))?;
        let mut c_dev = self.stream.alloc_zeros::<u8>(c_bytes).map_err(device)?;
        let (alpha, beta) = (1f32, 0f32);
        {
            let (a_ptr, _a_done) = a_dev.device_ptr(&self.stream);
            let (b_ptr, _b_done) = b_dev.device_ptr(&self.stream);
            let (c_ptr, _c_done) = c_dev.device_ptr_mut(&self.stream);
            // SAFETY: the device buffers hold exactly the packed row-major
            // operands (k x n for B, m x k for A, m x n for C, each in its
            // dtype's size), which is what the dimensions and leading
            // dimensions below describe in column-major terms; alpha and
            // beta are f32, as CUBLAS_COMPUTE_32F requires, and live until
            // the call returns (the host pointer mode reads them during it).
            unsafe {
                blas::gemm_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    ni,
                    mi,
                    ki,
                    (&alpha as *const f32).cast::<c_void>(),
                    b_ptr as *const c_void,
                    data_type(b.dtype),
                    ni,
                    a_ptr as *const c_void,
                    data_type(a.dtype),
                    ki,
                    (&beta as *const f32).cast::<c_void>(),
                    c_ptr as *mut c_void,
                    data_type(c.dtype),
                    ni,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| Error::Device(format!("cublasGemmEx ({m} x {n} x {k}): {e}")))?;
        }
        let c_host = self.stream.clone_dtoh(&c_dev).map_err(device)?;
        self.stream.synchronize().map_err(device)?;
        let values = Tensor::row_major(Buffer::from_bytes(c_host), c.dtype, m, n).to_f32();
        write_view(c, &values);
        Ok((m, n, k))
    }
}

/// The cuBLAS element type of a dtype.
fn data_type(dtype: DType) -> blas_sys::cudaDataType {
    match dtype {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// The view's elements, row-major and packed, in its dtype.
fn packed(t: &Tensor) -> Vec<u8> {
    let size = t.dtype.size();
    if t.strides == [t.shape[1], 1] {
        let guard = t.buffer.read();
        let start = t.offset * size;
        if let Some(bytes) = guard.bytes().get(start..start + t.elements() * size) {
            return bytes.to_vec();
        }
    }
    t.to_contiguous().buffer.to_bytes()
}

/// Writes row-major `values` into C's view, in C's dtype.
fn write_view(c: &Tensor, values: &[f32]) {
    let mut guard = c.buffer.write();
    c.encode(guard.bytes_mut(), values);
}
