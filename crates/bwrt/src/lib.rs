//! bwrt: BStack's wave runtime.
//!
//! Planners (the hotweights swap plans, datajax's `WaveSpec` export) need a
//! thin, stable seam under any engine: submit a unit of work (a *wave*),
//! wait for it, read counters back, and be sure that weights only change
//! inside an agreed *swap window*. bwrt is that seam, with a CPU backend:
//!
//! - a [`Runtime`], a bounded lock-free command ring feeding worker threads
//!   ([`runtime`] explains the ring, the wave index and the swap window);
//! - timeline semaphores ([`Semaphore`]) that waves signal when they finish;
//! - GEMM waves `C = A · B`, tiled by the [`WaveSpec`](bstack_plan::WaveSpec)'s
//!   `(bm, bn, bk)`, on f32, f16 and bf16 inputs with f32 accumulation
//!   ([`wave`]);
//! - weight swaps ([`Runtime::set_weights`]) that only land inside
//!   `[swap_begin, swap_end)`;
//! - counters ([`Runtime::sample`]);
//! - phased barriers for host threads ([`Barrier`], [`MBarrier`]);
//! - the same, as a versioned C ABI ([`ffi`], `include/bwrt.h`);
//! - with the `cuda` feature, a second backend that runs the waves on an
//!   NVIDIA GPU through cuBLAS ([`Backend::Cuda`]).
//!
//! ```
//! use std::sync::Arc;
//! use bwrt::{DType, Runtime, RuntimeConfig, Semaphore, Tensor, WaveDesc};
//!
//! let rt = Runtime::new(RuntimeConfig::default())?;
//! let a = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], DType::F32, 2, 2)?;
//! let b = Tensor::from_f32(&[1.0, 0.0, 0.0, 1.0], DType::F32, 2, 2)?;
//! let c = Tensor::zeros(DType::F32, 2, 2);
//! let done = Arc::new(Semaphore::new(0));
//! rt.submit_wave(&WaveDesc::default(), a, b, c.clone(), Some((done.clone(), 1)))?;
//! done.wait(1, u64::MAX)?;
//! assert_eq!(c.to_f32(), [1.0, 2.0, 3.0, 4.0]);
//! # Ok::<(), bwrt::Error>(())
//! ```

pub mod barrier;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dtype;
pub mod error;
pub mod ffi;
mod kernel;
pub mod runtime;
pub mod semaphore;
pub mod tensor;
pub mod wave;

pub use barrier::{Barrier, MBarrier};
pub use bstack_plan::WaveSpec;
pub use dtype::DType;
pub use error::{Error, Result, Status};
pub use runtime::{
    Backend, Counters, OnFull, Operand, Runtime, RuntimeConfig, SwapMode, SwapOutcome, WaveDesc,
    default_wave_spec,
};
pub use semaphore::Semaphore;
pub use tensor::{Buffer, HostMemory, Tensor};
pub use wave::Tile;
