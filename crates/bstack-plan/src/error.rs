//! The one error type of this crate.

use crate::address::AddressError;

/// Why a contract could not be read, parsed or written.
///
/// Every variant names where the problem is: `origin` is the file path (or
/// `<input>` for in-memory data), and JSON errors add the line, column and the
/// path of the field inside the document (`ops[3].length`).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read or written.
    #[error("{origin}: {source}")]
    Io {
        /// File that failed.
        origin: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// JSON that is not well formed, or does not match the contract.
    #[error("{origin}{}: {path}: {message}", position(*line, *column))]
    Json {
        /// File (or `<input>`).
        origin: String,
        /// Path of the offending field, `.` for the document itself.
        path: String,
        /// 1-based line, 0 if unknown.
        line: usize,
        /// 1-based column, 0 if unknown.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Bytes that do not decode as the expected protobuf message.
    #[error("{origin}: not a valid {kind} protobuf message: {source}")]
    Proto {
        /// File (or `<input>`).
        origin: String,
        /// Contract the bytes were decoded as.
        kind: &'static str,
        /// Decoder error.
        #[source]
        source: prost::DecodeError,
    },
    /// A `schema_version` this build does not understand.
    #[error(
        "{origin}: schema_version: {found} is not supported; this build reads version {supported}"
    )]
    SchemaVersion {
        /// File (or `<input>`).
        origin: String,
        /// Version found in the document (0: absent).
        found: u64,
        /// Version this build reads.
        supported: u32,
    },
    /// The document's `kind` is missing or not a contract name.
    #[error("{origin}: kind: {message}")]
    Kind {
        /// File (or `<input>`).
        origin: String,
        /// What is wrong, with the accepted names.
        message: String,
    },
    /// A document of one contract was given where another was expected.
    #[error("{origin}: holds a {found}, but a {expected} was expected")]
    KindMismatch {
        /// File (or `<input>`).
        origin: String,
        /// Contract found.
        found: &'static str,
        /// Contract expected.
        expected: &'static str,
    },
    /// A protobuf file whose contract can be told neither from its name nor
    /// from the caller.
    #[error(
        "{origin}: protobuf files do not say which contract they hold; pass --kind ({names}) \
         or put the contract name in the file name, e.g. plan.cache_plan.pb"
    )]
    UnknownProtoKind {
        /// File.
        origin: String,
        /// Accepted contract names.
        names: String,
    },
    /// A string that is not a valid address.
    #[error(transparent)]
    Address(#[from] AddressError),
}

/// `:line:column`, or nothing when the position is unknown (0).
fn position(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

/// `Result` with this crate's error.
pub type Result<T, E = PlanError> = std::result::Result<T, E>;
