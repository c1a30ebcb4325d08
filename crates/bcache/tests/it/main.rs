//! The bcache integration tests: one binary, one module per area.

// Fixture helpers fail the test on any setup error; clippy's test allowance
// covers only #[test] functions, not these helpers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chart;
mod config;
mod lsh;
mod planner;
mod sim;
