//! The execution backend: binds inputs, lowers, explains and runs on
//! DataFusion.
//!
//! [`Backend`] is the seam between the IR and an engine: anything that can
//! turn an [`Ir`] plus bound inputs into record batches. [`Engine`] is the
//! local one (an in-process DataFusion `SessionContext` on its own tokio
//! runtime, so the API stays synchronous). A distributed engine (Ballista
//! runs the same `LogicalPlan`s) would be a second implementation; nothing
//! above this module would change.
//!
//! Inputs are [`Source`]s: Parquet, CSV, Arrow IPC and JSON-lines files
//! (by extension), or record batches already in memory. A bound input must
//! have every column its program was traced with, of the same type or one
//! that widens to it; extra columns are ignored.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::file_format::options::ArrowReadOptions;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder, cast};
use datafusion::physical_plan::displayable;
use datafusion::prelude::{
    CsvReadOptions, DataFrame, JsonReadOptions, ParquetReadOptions, SessionConfig,
};

use crate::error::{DatajaxError, Result};
use crate::ir::Ir;
use crate::lower::{LowerOptions, column, lower};
use crate::types::Schema;

/// Where an input's rows come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A Parquet file (or directory of files).
    Parquet(PathBuf),
    /// A CSV file with a header row.
    Csv(PathBuf),
    /// An Arrow IPC file.
    Ipc(PathBuf),
    /// Newline-delimited JSON.
    Json(PathBuf),
    /// Record batches in memory (all with one schema).
    Batches(Vec<RecordBatch>),
}

impl Source {
    /// The source for `path`, by its extension: `.parquet`/`.pq`, `.csv`,
    /// `.arrow`/`.ipc`/`.feather`, `.json`/`.jsonl`/`.ndjson`.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Source> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let p = path.to_path_buf();
        Ok(match ext.as_str() {
            "parquet" | "pq" => Source::Parquet(p),
            "csv" => Source::Csv(p),
            "arrow" | "ipc" | "feather" => Source::Ipc(p),
            "json" | "jsonl" | "ndjson" => Source::Json(p),
            _ => {
                return Err(DatajaxError::Input(format!(
                    "{}: unknown file type {ext:?}; use .parquet, .csv, .arrow (IPC) or .jsonl",
                    path.display()
                )));
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::Parquet(p) | Source::Csv(p) | Source::Ipc(p) | Source::Json(p) => {
                p.display().to_string()
            }
            Source::Batches(_) => "<record batches>".into(),
        }
    }
}

/// Results: record batches with their schema.
#[derive(Debug, Clone)]
pub struct Table {
    /// The schema.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
}

impl Table {
    /// Row count.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// One batch with every row (empty batch for no rows).
    pub fn concat(&self) -> Result<RecordBatch> {
        Ok(datafusion::arrow::compute::concat_batches(
            &self.schema,
            &self.batches,
        )?)
    }

    /// An aligned text table.
    pub fn pretty(&self) -> Result<String> {
        Ok(pretty_format_batches(&self.batches)?.to_string())
    }

    /// Writes the rows to `path`, in the format its extension names (as
    /// [`Source::from_path`]); the file appears whole or not at all.
    pub fn write(&self, path: &Path) -> Result<()> {
        let source = Source::from_path(path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| DatajaxError::io(&dir, e))?;
        let file = tmp.reopen().map_err(|e| DatajaxError::io(tmp.path(), e))?;
        match source {
            Source::Parquet(_) => {
                let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
                    file,
                    self.schema.clone(),
                    None,
                )
                .map_err(|e| DatajaxError::Engine(e.to_string()))?;
                for b in &self.batches {
                    w.write(b)
                        .map_err(|e| DatajaxError::Engine(e.to_string()))?;
                }
                w.close().map_err(|e| DatajaxError::Engine(e.to_string()))?;
            }
            Source::Csv(_) => {
                let mut w = datafusion::arrow::csv::Writer::new(file);
                for b in &self.batches {
                    w.write(b)?;
                }
            }
            Source::Ipc(_) => {
                let mut w =
                    datafusion::arrow::ipc::writer::FileWriter::try_new(file, &self.schema)?;
                for b in &self.batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            Source::Json(_) => {
                let mut w = datafusion::arrow::json::LineDelimitedWriter::new(file);
                for b in &self.batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            Source::Batches(_) => {}
        }
        tmp.persist(path)
            .map_err(|e| DatajaxError::io(path, e.error))?;
        Ok(())
    }
}

/// The three views of a program that `explain` prints.
#[derive(Debug, Clone)]
pub struct Explain {
    /// The IR listing.
    pub ir: String,
    /// The lowered logical plan, before optimisation.
    pub logical: String,
    /// The optimised logical plan.
    pub optimized: String,
    /// The physical plan DataFusion would execute.
    pub physical: String,
}

impl std::fmt::Display for Explain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "== IR ==\n{}\n== logical plan ==\n{}\n\n== optimized logical plan ==\n{}\n\n== physical plan ==\n{}",
            self.ir, self.logical, self.optimized, self.physical
        )
    }
}

/// An engine that runs IR programs. See the module documentation.
pub trait Backend {
    /// The engine's name, for reports.
    fn name(&self) -> &str;
    /// Runs `ir` on `inputs` (by input name).
    fn run(&self, ir: &Ir, inputs: &HashMap<String, Source>) -> Result<Table>;
    /// Describes how `ir` would run on `inputs`.
    fn explain(&self, ir: &Ir, inputs: &HashMap<String, Source>) -> Result<Explain>;
}

/// The local DataFusion engine.
pub struct Engine {
    ctx: SessionContext,
    rt: tokio::runtime::Runtime,
    partitions: usize,
    eager_aggregation: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("partitions", &self.partitions)
            .field("eager_aggregation", &self.eager_aggregation)
            .finish()
    }
}

impl Engine {
    /// An engine using every core.
    pub fn new() -> Result<Engine> {
        Engine::with_partitions(std::thread::available_parallelism().map_or(4, usize::from))
    }

    /// An engine that runs plans in `partitions` parallel partitions.
    pub fn with_partitions(partitions: usize) -> Result<Engine> {
        let partitions = partitions.max(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(partitions.min(64))
            .enable_all()
            .build()
            .map_err(|e| DatajaxError::Engine(format!("starting the engine's runtime: {e}")))?;
        let config = SessionConfig::new()
            .with_target_partitions(partitions)
            .with_information_schema(false);
        Ok(Engine {
            ctx: SessionContext::new_with_config(config),
            rt,
            partitions,
            eager_aggregation: true,
        })
    }

    /// The engine with eager aggregation on or off (default on): an
    /// aggregate over an inner join first aggregates the side its values
    /// come from by the join keys. See [`crate::eager`] for when it applies
    /// and why it is exact.
    pub fn with_eager_aggregation(mut self, on: bool) -> Engine {
        self.eager_aggregation = on;
        self
    }

    /// How many partitions plans run in.
    pub fn partitions(&self) -> usize {
        self.partitions
    }

    /// The DataFusion session (for extensions: UDFs, object stores).
    pub fn session(&self) -> &SessionContext {
        &self.ctx
    }

    /// Runs a future on the engine's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn read(&self, source: &Source) -> Result<DataFrame> {
        let path_str = |p: &Path| -> Result<String> {
            if !p.exists() {
                return Err(DatajaxError::Input(format!(
                    "{}: no such file",
                    p.display()
                )));
            }
            Ok(p.display().to_string())
        };
        let ctx = &self.ctx;
        let df = match source {
            Source::Parquet(p) => {
                let s = path_str(p)?;
                self.block_on(ctx.read_parquet(s, ParquetReadOptions::default()))
            }
            Source::Csv(p) => {
                let s = path_str(p)?;
                self.block_on(ctx.read_csv(s, CsvReadOptions::new()))
            }
            Source::Ipc(p) => {
                let s = path_str(p)?;
                self.block_on(ctx.read_arrow(s, ArrowReadOptions::default()))
            }
            Source::Json(p) => {
                let s = path_str(p)?;
                let ext = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or("json")
                    .to_owned();
                self.block_on(ctx.read_json(
                    s,
                    JsonReadOptions::default().file_extension(&format!(".{ext}")),
                ))
            }
            Source::Batches(b) => ctx.read_batches(b.iter().cloned()),
        };
        df.map_err(|e| DatajaxError::Input(format!("{}: {e}", source.describe())))
    }

    /// Registers `source` as table `name` (replacing any table of that
    /// name), so plans and their Substrait form refer to it by name.
    pub fn register(&self, name: &str, source: &Source) -> Result<DataFrame> {
        let ctx = &self.ctx;
        let _ = ctx.deregister_table(name);
        let describe = source.describe();
        let fail =
            |e: datafusion::error::DataFusionError| DatajaxError::Input(format!("{describe}: {e}"));
        let exists = |p: &Path| -> Result<String> {
            if !p.exists() {
                return Err(DatajaxError::Input(format!(
                    "{}: no such file",
                    p.display()
                )));
            }
            Ok(p.display().to_string())
        };
        match source {
            Source::Parquet(p) => {
                let s = exists(p)?;
                self.block_on(ctx.register_parquet(name, &s, ParquetReadOptions::default()))
                    .map_err(fail)?;
            }
            Source::Csv(p) => {
                let s = exists(p)?;
                self.block_on(ctx.register_csv(name, &s, CsvReadOptions::new()))
                    .map_err(fail)?;
            }
            Source::Ipc(p) => {
                let s = exists(p)?;
                self.block_on(ctx.register_arrow(name, &s, ArrowReadOptions::default()))
                    .map_err(fail)?;
            }
            Source::Json(p) => {
                let s = exists(p)?;
                let ext = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or("json")
                    .to_owned();
                self.block_on(ctx.register_json(
                    name,
                    &s,
                    JsonReadOptions::default().file_extension(&format!(".{ext}")),
                ))
                .map_err(fail)?;
            }
            Source::Batches(b) => {
                let schema = b.first().map(|b| b.schema()).ok_or_else(|| {
                    DatajaxError::Input(format!(
                        "input {name:?}: no record batches (give at least one, possibly empty)"
                    ))
                })?;
                let table = datafusion::datasource::MemTable::try_new(schema, vec![b.clone()])
                    .map_err(fail)?;
                ctx.register_table(name, Arc::new(table)).map_err(fail)?;
            }
        }
        self.block_on(ctx.table(name)).map_err(fail)
    }

    /// The datajax schema of a source's data (for tracing against it).
    pub fn schema_of(&self, source: &Source) -> Result<Schema> {
        let df = self.read(source)?;
        Schema::from_arrow(df.schema().as_arrow(), &source.describe())
    }

    /// Plans reading each of `ir`'s inputs from `inputs`, projected and cast
    /// to the declared schema; an error names the input, the column and the
    /// types when the data does not fit.
    pub fn scans(
        &self,
        ir: &Ir,
        inputs: &HashMap<String, Source>,
    ) -> Result<HashMap<String, LogicalPlan>> {
        let mut out = HashMap::new();
        for decl in &ir.inputs {
            let source = inputs.get(&decl.name).ok_or_else(|| {
                let mut names: Vec<&String> = inputs.keys().collect();
                names.sort();
                DatajaxError::Input(format!(
                    "input {:?} is not bound (bound: {names:?}); pass --input {}=PATH",
                    decl.name, decl.name
                ))
            })?;
            let df = self.register(&decl.name, source)?;
            let have = Schema::from_arrow(df.schema().as_arrow(), &source.describe())?;
            let mut exprs = Vec::with_capacity(decl.schema.fields.len());
            for f in &decl.schema.fields {
                let g = have.field(&f.name).ok_or_else(|| {
                    DatajaxError::Input(format!(
                        "input {:?} ({}): {}",
                        decl.name,
                        source.describe(),
                        crate::types::unknown_column(&f.name, &have.names())
                    ))
                })?;
                if g.dtype != f.dtype && g.dtype.unify(f.dtype) != Some(f.dtype) {
                    return Err(DatajaxError::Input(format!(
                        "input {:?} ({}): column {} is {} in the data, but the program was traced with {}",
                        decl.name,
                        source.describe(),
                        f.name,
                        g.dtype,
                        f.dtype
                    )));
                }
                exprs.push(cast(column(&f.name), f.dtype.to_arrow()).alias(&f.name));
            }
            let plan = LogicalPlanBuilder::from(df.into_unoptimized_plan())
                .project(exprs)?
                .build()?;
            out.insert(decl.name.clone(), plan);
        }
        Ok(out)
    }

    /// The logical plan of `ir` over `inputs`.
    pub fn plan(&self, ir: &Ir, inputs: &HashMap<String, Source>) -> Result<LogicalPlan> {
        let scans = self.scans(ir, inputs)?;
        lower(
            ir,
            &scans,
            LowerOptions {
                partitions: self.partitions,
                eager_aggregation: self.eager_aggregation,
            },
        )
    }

    /// Runs a logical plan.
    pub fn run_plan(&self, plan: LogicalPlan) -> Result<Table> {
        let df = self.block_on(self.ctx.execute_logical_plan(plan))?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = self.block_on(df.collect())?;
        Ok(Table { schema, batches })
    }

    /// Runs a logical plan and keeps its output partitions apart.
    pub fn run_partitioned(&self, plan: LogicalPlan) -> Result<(SchemaRef, Vec<Vec<RecordBatch>>)> {
        let df = self.block_on(self.ctx.execute_logical_plan(plan))?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let parts = self.block_on(df.collect_partitioned())?;
        Ok((schema, parts))
    }

    /// The three views of a plan (see [`Explain`]); `ir` is the IR listing.
    pub fn explain_plan(&self, ir: String, plan: LogicalPlan) -> Result<Explain> {
        let logical = plan.display_indent_schema().to_string();
        let state = self.ctx.state();
        let optimized = state.optimize(&plan)?;
        let physical = self.block_on(state.create_physical_plan(&optimized))?;
        Ok(Explain {
            ir,
            logical,
            optimized: optimized.display_indent().to_string(),
            physical: displayable(physical.as_ref()).indent(true).to_string(),
        })
    }
}

impl Backend for Engine {
    fn name(&self) -> &str {
        "datafusion"
    }

    fn run(&self, ir: &Ir, inputs: &HashMap<String, Source>) -> Result<Table> {
        let plan = self.plan(ir, inputs)?;
        self.run_plan(plan)
    }

    fn explain(&self, ir: &Ir, inputs: &HashMap<String, Source>) -> Result<Explain> {
        let plan = self.plan(ir, inputs)?;
        self.explain_plan(ir.pretty(), plan)
    }
}
