//! datajax integration tests: tracing and its errors, the IR and its JSON
//! form, every operation against known answers, the transformations, the
//! file formats, Substrait, and WaveSpec export.

mod common;
mod eager;
mod formats;
mod ir;
mod ops;
mod sql_parity;
mod tracing;
mod transforms;
mod wavespec;
