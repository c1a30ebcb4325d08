//! Integration tests of the plan contracts.
