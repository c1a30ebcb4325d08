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
    /// A tier has no room for an object, even after evicting all it may.
    #[error("{tier} tier: cannot store {key}: {message}")]
    Full {
        /// The tier.
        tier: String,
        /// The object's key, as text.
        key: String,
        /// Why: sizes, and what could not be evicted.
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

impl Error {
    /// Whether the error is a tier out of room (the caller may try another
    /// tier), as opposed to bad input.
    pub fn is_full(&self) -> bool {
        matches!(self, Error::Full { .. })
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
