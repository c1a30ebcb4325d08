//! Integration tests of hotweights: one test binary, one module per concern.

// Fixture helpers fail the test on any setup error; clippy's test allowance
// covers only #[test] functions, not these helpers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod coordinator;
mod coordstate;
mod dataplane;
mod fixtures;
mod pack;
mod plan;
mod publish;
mod rollout;
mod sparse;
mod store;
mod wire;
