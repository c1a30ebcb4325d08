//! Integration tests of the `bstack` binary: each test runs the built
//! executable in a temporary directory and checks its exit code, stdout and
//! stderr. One test binary, one module per command.

mod bcache_cmd;
mod bcache_serve;
mod bench_cmd;
mod bwrt_cmd;
mod cli;
mod common;
mod datajax_cmd;
mod demo_cmd;
mod guide;
mod hotweights_cmd;
mod hw_cluster;
mod hw_partition;
mod hw_rollout_cmd;
mod plan_convert;
mod plan_examples;
mod plan_show;
mod plan_validate;
mod strata_cmd;
