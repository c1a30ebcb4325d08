//! bcache: the KV-cache I/O planner.
//!
//! When a serving engine's KV cache outgrows GPU memory, pages live in CPU
//! RAM, on SSD or in a remote store, and the GPU stalls while it waits for
//! them. This crate plans, one short window at a time, which pages to move
//! between tiers so that they arrive before they are needed:
//!
//! - [`model`]: what the planner is told about one window (nodes, tiers,
//!   tenants, requests) and how that input is checked;
//! - [`config`]: every knob, with its default, loaded from YAML;
//! - [`planner`]: the stages (heat, order, credits, coalescing, caps,
//!   overlap, admission, eviction) that turn a window into a
//!   [`bstack_plan::CachePlan`] and a report;
//! - [`lsh`]: banded MinHash LSH that groups near-duplicate prompts;
//! - [`trace`]: the Mooncake trace format, read with line-numbered errors;
//! - [`sim`]: a discrete-event replay of a trace under `lru`, `fifo`,
//!   `belady` and `bcache` policies;
//! - [`tune`]: a parallel sweep of planner knobs on a trace;
//! - [`chart`]: the SVG charts the simulator writes;
//! - [`rng`]: the deterministic generator behind seeds and generated inputs.
//!
//! The library never prints; the `bstack` binary does.

pub mod chart;
pub mod config;
pub mod error;
pub mod heat;
pub mod lsh;
pub mod model;
pub mod planner;
pub mod rng;
pub mod service;
pub mod sim;
pub mod trace;
pub mod tune;

pub use config::{Config, PlannerConfig, SimConfig};
pub use error::{Error, Result};
pub use model::{Tier, WindowInput};
pub use planner::{Planner, PlannerState, Report};
