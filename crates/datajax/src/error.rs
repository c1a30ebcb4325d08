//! The one error type of the crate.

use thiserror::Error;

/// Everything that can go wrong while tracing, lowering or running a program.
#[derive(Debug, Error)]
pub enum DatajaxError {
    /// An operation was recorded against columns or types it cannot apply
    /// to. Raised while tracing, before any data is read.
    #[error("{op}: {message}")]
    Trace {
        /// The operation (`filter`, `join`, `group_by.agg`, ...).
        op: String,
        /// What is wrong, naming the columns and types.
        message: String,
    },
    /// An IR document that does not read, with where it went wrong.
    #[error("{origin}: {message}")]
    Ir {
        /// The file (or `<string>`).
        origin: String,
        /// What is wrong, with the JSON path or line.
        message: String,
    },
    /// An input that is missing, unreadable, or does not match the IR.
    #[error("{0}")]
    Input(String),
    /// A declared sharding that the program or the data contradicts.
    #[error("sharding: {0}")]
    Sharding(String),
    /// The engine failed while planning or executing.
    #[error("engine: {0}")]
    Engine(String),
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl DatajaxError {
    /// A tracing error for `op`.
    pub fn trace(op: &str, message: impl Into<String>) -> DatajaxError {
        DatajaxError::Trace {
            op: op.to_owned(),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> DatajaxError {
        DatajaxError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl From<datafusion::error::DataFusionError> for DatajaxError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        DatajaxError::Engine(e.to_string())
    }
}

impl From<datafusion::arrow::error::ArrowError> for DatajaxError {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        DatajaxError::Engine(e.to_string())
    }
}

/// `Result` with [`DatajaxError`].
pub type Result<T, E = DatajaxError> = std::result::Result<T, E>;
