//! Typed errors, and the status code each one maps to at the C ABI.
//!
//! Every fallible call in the crate returns [`Error`]. Each variant names the
//! field or argument at fault, so a message such as
//! `bad shape: a.shape[1] is 3 but b.shape[0] is 4` can be acted on without
//! reading the source. [`Error::status`] gives the [`Status`] code the C ABI
//! returns for it; the message itself is what `bwrt_last_error` hands back.

use crate::dtype::DType;

/// Result of a bwrt call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a bwrt call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An argument is out of its documented range (`field` names it).
    #[error("invalid argument: {field}: {message}")]
    InvalidArgument {
        /// The argument or field at fault, e.g. `config.workers`.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor's element type is not supported for this use.
    #[error("bad dtype: {field}: {message}")]
    BadDtype {
        /// The tensor at fault, e.g. `b.dtype`.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Tensor shapes or strides disagree with each other or with their memory.
    #[error("bad shape: {field}: {message}")]
    BadShape {
        /// The tensor field at fault, e.g. `a.shape[1]`.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The wave spec given to the runtime does not validate.
    #[error("invalid wave spec: {0}")]
    InvalidWaveSpec(String),
    /// The command ring is full and the caller asked not to block.
    #[error("busy: the command ring is full ({depth} waves)")]
    Busy {
        /// Capacity of the ring.
        depth: usize,
    },
    /// A wait ended before the awaited value or phase was reached.
    #[error("timeout: {what} not reached within {timeout_ns} ns")]
    Timeout {
        /// What was awaited, e.g. `semaphore value 3`.
        what: String,
        /// The timeout, in ns (0 for a poll).
        timeout_ns: u64,
    },
    /// A weight swap was asked for outside the swap window.
    #[error(
        "outside swap window: wave index {wave_index} is not in [{swap_begin}, {swap_end}){hint}"
    )]
    OutsideSwapWindow {
        /// The current wave index (waves completed so far).
        wave_index: u64,
        /// First wave index of the window (inclusive).
        swap_begin: u64,
        /// First wave index after the window (exclusive).
        swap_end: u64,
        /// Extra explanation (empty or starting with `; `).
        hint: String,
    },
    /// A semaphore was signalled with a value lower than its current one.
    #[error("semaphore value may not decrease: {current} -> {requested}")]
    NonMonotonicSignal {
        /// The semaphore's value.
        current: u64,
        /// The value asked for.
        requested: u64,
    },
    /// A wave failed while it ran; its semaphore carries the message.
    #[error("wave failed: {0}")]
    WaveFailed(String),
    /// The runtime is shutting down.
    #[error("the runtime is shutting down")]
    ShutDown,
    /// The backend or device asked for is not in this build or on this
    /// machine (the message says which, and what to do).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The GPU driver or cuBLAS reported an error while a runtime was built
    /// or a wave ran.
    #[error("device error: {0}")]
    Device(String),
    /// An internal invariant broke (a bug: please report it).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The C ABI status code for this error.
    pub fn status(&self) -> Status {
        match self {
            Error::InvalidArgument { .. } | Error::InvalidWaveSpec(_) => Status::InvalidArgument,
            Error::NonMonotonicSignal { .. } => Status::InvalidArgument,
            Error::BadDtype { .. } => Status::BadDtype,
            Error::BadShape { .. } => Status::BadShape,
            Error::Busy { .. } => Status::Busy,
            Error::Timeout { .. } => Status::Timeout,
            Error::OutsideSwapWindow { .. } => Status::OutsideSwapWindow,
            Error::WaveFailed(_) => Status::WaveFailed,
            Error::Unavailable(_) => Status::Unavailable,
            Error::Device(_) => Status::DeviceError,
            Error::ShutDown | Error::Internal(_) => Status::Internal,
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn shape(field: &'static str, message: impl Into<String>) -> Self {
        Error::BadShape {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn dtype(field: &'static str, got: DType, message: impl Into<String>) -> Self {
        Error::BadDtype {
            field,
            message: format!("{got}: {}", message.into()),
        }
    }
}

/// Status code returned by every C ABI function.
///
/// Values are stable: new codes are only ever appended.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// An argument is out of range (see `bwrt_last_error` for which).
    InvalidArgument = 1,
    /// A required pointer or handle is NULL.
    NullPointer = 2,
    /// A struct's `struct_size` is smaller than the smallest known version.
    BadStructSize = 3,
    /// The requested ABI version is not supported by this library.
    UnsupportedVersion = 4,
    /// A tensor's dtype is unknown or not supported for the operation.
    BadDtype = 5,
    /// Tensor shapes or strides disagree.
    BadShape = 6,
    /// The command ring is full and the caller asked not to block.
    Busy = 7,
    /// A wait timed out (0 ns: the value was not reached yet).
    Timeout = 8,
    /// A weight swap was refused: the wave index is outside the swap window.
    OutsideSwapWindow = 9,
    /// A wave failed while running; the semaphore it signals is failed.
    WaveFailed = 10,
    /// A bug or a panic inside the library; the message says more.
    Internal = 11,
    /// The backend or device asked for is not in this build or on this
    /// machine.
    Unavailable = 12,
    /// The GPU driver or cuBLAS failed.
    DeviceError = 13,
}
