//! Integration tests of the `bstack` binary.
