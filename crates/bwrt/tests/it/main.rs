//! Integration tests of bwrt: the Rust API, and (in `c_abi`) the C ABI as
//! a C program sees it.

// Test helpers outside #[test] functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backend;
mod barrier;
mod c_abi;
mod gemm;
mod header;
mod python;
mod ring;
mod semaphore;
mod swap;
mod util;
