//! Integration tests of the plan contracts: one test binary, one module per
//! concern.

mod bad_input;
mod defects;
mod golden;
mod roundtrip;
mod seed_wire;
mod split;
mod strategies;
