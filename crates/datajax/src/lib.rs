//! datajax: JAX-style transformations for DataFrame programs, traced into a
//! typed, versioned IR and run on Apache DataFusion.
//!
//! A program is a plain Rust function over [`Frame`]s. Tracing it records
//! each operation against Arrow-style schemas, with no data, checking
//! columns and types as it goes (an unknown column is an error naming the
//! operation and the nearest name). The recording is an [`Ir`]: a DAG of
//! typed nodes with a JSON form (`ir_version` 1) that replays to identical
//! results. [`engine::Engine`] lowers it to a DataFusion `LogicalPlan` and
//! runs it over Parquet, CSV, Arrow IPC, JSON lines or in-memory batches;
//! [`substrait`] exports the plan for other engines.
//!
//! ```
//! use datajax::{djit, col, lit, sum, Source};
//! use datafusion::arrow::array::{Int64Array, StringArray};
//! use datafusion::arrow::record_batch::RecordBatch;
//! use std::sync::Arc;
//!
//! let f = djit(|df| df.filter(col("x").gt(lit(1))).group_by(["k"]).agg([sum("x")]));
//! let batch = RecordBatch::try_from_iter([
//!     ("k", Arc::new(StringArray::from(vec!["a", "a", "b"])) as _),
//!     ("x", Arc::new(Int64Array::from(vec![1, 2, 3])) as _),
//! ]).unwrap();
//! let out = f.call(vec![Source::Batches(vec![batch.clone()])]).unwrap();
//! assert_eq!(out.num_rows(), 2);
//! // Same schema: no retrace.
//! f.call(vec![Source::Batches(vec![batch])]).unwrap();
//! assert_eq!(f.traces(), 1);
//! ```
//!
//! The transformations ([`djit`], [`vmap`], [`scan()`], [`pjit`]) are in
//! [`transform`] and [`mod@scan`]; WaveSpec export from serving traces is
//! in [`wavespec`].

pub mod eager;
pub mod engine;
pub mod error;
pub mod expr;
pub mod frame;
pub mod ir;
pub mod lower;
pub mod scan;
pub mod substrait;
pub mod transform;
pub mod types;
pub mod wavespec;

pub use datafusion;
pub use engine::{Backend, Engine, Explain, Source, Table};
pub use error::{DatajaxError, Result};
pub use expr::{
    Agg, AggFunc, BinOp, Expr, Scalar, SortKey, StrFunc, TruncUnit, WindowExpr, asc, col, count,
    count_distinct, count_rows, cum_sum, desc, first, lag, last, lead, lit, max, mean, min, null,
    rank, row_number, sum, when,
};
pub use frame::{Frame, GroupBy, JoinSpec};
pub use ir::{IR_VERSION, Ir, JoinHow, Op, Sharding};
pub use scan::{Carry, Scan, scan};
pub use transform::{Jit, Pjit, Sharded, djit, djit_n, pjit, shard, vmap};
pub use types::{DType, Field, Schema};
