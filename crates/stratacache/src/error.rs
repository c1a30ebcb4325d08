//! The one error type of the crate.

/// Everything that can go wrong in stratacache. Every variant says what is
/// at fault (the key, the field, the byte offset), so a message alone tells
/// the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key cannot be encoded: a field is too long for the encoding.
    #[error("key field {field}: {message}")]
    Key {
        /// The field, e.g. `model`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Bytes are not a key's canonical encoding.
    #[error("not an encoded key: at byte {offset}: {message}")]
    Decode {
        /// Where decoding stopped.
        offset: usize,
        /// What was expected there.
        message: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
