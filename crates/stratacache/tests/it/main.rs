//! stratacache's integration tests: one binary, one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chain;
mod config;
mod disk;
mod exec;
mod key;
mod memory;
mod mmap;
mod redis;
mod remote;
