//! The one error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong in bcache. Every variant names the file,
/// line, field or key at fault, so a message alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A configuration file is not valid: unknown key, wrong type, bad value.
    #[error("{origin}: {message}")]
    Config {
        /// The file (or `--set` flag) the value came from.
        origin: String,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A window input is not valid.
    #[error("{origin}: {field}: {message}")]
    Input {
        /// The file or stream the input came from.
        origin: String,
        /// Path of the offending field, e.g. `requests[3].pages`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A trace line could not be parsed.
    #[error("{origin}:{line}: {message}")]
    Trace {
        /// The trace file.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
    /// A simulation could not run with the given settings.
    #[error("simulation: {0}")]
    Sim(String),
    /// A chart could not be drawn.
    #[error("chart {path}: {message}")]
    Chart {
        /// The SVG file being written.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The planner service could not start or serve, or a call to it failed.
    #[error("{context}: {message}")]
    Service {
        /// What was being done: `binding 127.0.0.1:50061`, `planner at
        /// http://127.0.0.1:50061: Plan`.
        context: String,
        /// What went wrong; for a failed call, the status and the service's
        /// message.
        message: String,
    },
}

/// The result type of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
