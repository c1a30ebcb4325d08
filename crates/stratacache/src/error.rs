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
    /// An I/O call failed.
    #[error("{tier} tier: {op} {path}: {source}")]
    Io {
        /// The tier.
        tier: String,
        /// What was being done, e.g. `writing`.
        op: &'static str,
        /// The file or device.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// A stored object failed its check (checksum, length, header) and was
    /// not returned. The tier drops it; the caller should treat it as a miss
    /// (and recompute the data).
    #[error("{tier} tier: {key} is corrupt: {reason}")]
    Corrupt {
        /// The tier.
        tier: String,
        /// The object's key, as text.
        key: String,
        /// What did not match.
        reason: String,
    },
    /// A remote tier or store server could not be reached or refused a call.
    #[error("{tier} tier: {message}")]
    Remote {
        /// The tier, with its address.
        tier: String,
        /// What failed.
        message: String,
    },
    /// A configuration value is invalid.
    #[error("config {field}: {message}")]
    Config {
        /// The key, e.g. `tiers[1].capacity`.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The tier or engine was closed.
    #[error("{what} is closed")]
    Closed {
        /// What was closed.
        what: String,
    },
    /// Dirty objects could not be flushed to the tier below; they stay
    /// dirty and the flusher retries them.
    #[error("{failed} dirty object(s) could not be flushed; the first: {first}")]
    Flush {
        /// How many failed.
        failed: usize,
        /// The first failure, with its key.
        first: String,
    },
    /// A load found the key in no tier. `reasons` lists the tiers whose
    /// lookup failed (corrupt object, I/O error); empty when every tier
    /// simply did not hold it.
    #[error("{key}: not found{}", if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join("; ")) })]
    NotFound {
        /// The key, as text.
        key: String,
        /// `tier: error` for each tier that failed.
        reasons: Vec<String>,
    },
    /// A plan given to the executor does not validate.
    #[error("plan {plan:?} is invalid: {message}")]
    Plan {
        /// The plan's id.
        plan: String,
        /// Every problem, with the path of its field.
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

    /// Another error equal to this one, for reporting one failure against
    /// every item of a batch. (`Error` is not `Clone`: an I/O error is not;
    /// the copy keeps its kind and message.)
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Key { field, message } => Error::Key {
                field,
                message: message.clone(),
            },
            Error::Full { tier, key, message } => Error::Full {
                tier: tier.clone(),
                key: key.clone(),
                message: message.clone(),
            },
            Error::Io {
                tier,
                op,
                path,
                source,
            } => Error::Io {
                tier: tier.clone(),
                op,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Corrupt { tier, key, reason } => Error::Corrupt {
                tier: tier.clone(),
                key: key.clone(),
                reason: reason.clone(),
            },
            Error::Remote { tier, message } => Error::Remote {
                tier: tier.clone(),
                message: message.clone(),
            },
            Error::Config { field, message } => Error::Config {
                field: field.clone(),
                message: message.clone(),
            },
            Error::Closed { what } => Error::Closed { what: what.clone() },
            Error::Flush { failed, first } => Error::Flush {
                failed: *failed,
                first: first.clone(),
            },
            Error::NotFound { key, reasons } => Error::NotFound {
                key: key.clone(),
                reasons: reasons.clone(),
            },
            Error::Plan { plan, message } => Error::Plan {
                plan: plan.clone(),
                message: message.clone(),
            },
            Error::Decode { offset, message } => Error::Decode {
                offset: *offset,
                message: message.clone(),
            },
        }
    }

    /// Whether the error is a plain miss (no tier held the key, and none
    /// failed), as opposed to a failure the caller should report.
    pub fn is_miss(&self) -> bool {
        matches!(self, Error::NotFound { reasons, .. } if reasons.is_empty())
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
