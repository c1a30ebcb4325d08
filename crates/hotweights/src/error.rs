//! The one error type of this crate.

use std::path::PathBuf;

/// Why a hotweights operation failed. Every variant names the file, and where
/// it applies the tensor, so the user knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum HotweightsError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A safetensors file whose header is malformed or inconsistent.
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the tensor where the format allows).
        message: String,
    },
    /// A sharded checkpoint's index file that is malformed or disagrees with
    /// the shards.
    #[error("{}: {message}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor name found in two files of one checkpoint.
    #[error("tensor {name:?} is in both {first} and {second}")]
    DuplicateTensor {
        /// Tensor name.
        name: String,
        /// First file holding it.
        first: String,
        /// Second file holding it.
        second: String,
    },
    /// Inputs that do not belong together: manifests of different models,
    /// a plan that disagrees with its manifests.
    #[error("{0}")]
    Mismatch(String),
    /// Bytes that do not match the hash or length a manifest gives them.
    #[error("verification failed: {0}")]
    Verify(String),
    /// A store that is not in the state an operation needs (a version it
    /// lacks, a chunk it lacks, a lock another process holds).
    #[error("{}: {message}", path.display())]
    Store {
        /// The store directory.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// A sparse delta that cannot be decoded, or that does not rebuild the
    /// chunk it claims to.
    #[error("sparse delta: {0}")]
    Delta(String),
    /// A contract file that cannot be read, decoded or written.
    #[error(transparent)]
    Plan(#[from] bstack_plan::PlanError),
    /// An option out of range.
    #[error("{0}")]
    Option(String),
    /// A rollout call that cannot apply in the rollout's state (nothing
    /// changed): names the rollout, its phase and what is missing.
    #[error("rollout {0}")]
    Rollout(String),
    /// A data-plane transfer step that failed at a peer: a connection, a
    /// handshake, a piece (the message names it).
    #[error("{peer}: {message}")]
    Transfer {
        /// The peer's address (or the local receiver's).
        peer: String,
        /// What went wrong.
        message: String,
    },
}

impl HotweightsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HotweightsError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with this crate's error.
pub type Result<T, E = HotweightsError> = std::result::Result<T, E>;
