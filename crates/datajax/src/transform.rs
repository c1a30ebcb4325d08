//! The transformations: [`djit`], [`vmap`] and [`pjit`] ([`crate::scan`] is
//! in its own module).
//!
//! - `djit(f)` traces `f` once per input schema and caches the IR, as JAX
//!   retraces only on new shapes; a call binds data and runs the cached
//!   program.
//! - `vmap(f, axis)` turns a function written for one group into one plan
//!   over every group, by rewriting each traced operation with its batching
//!   rule (an aggregation gains the axis as a key, a window gains it as a
//!   partition, a limit becomes a per-group row-number filter, ...): no loop
//!   over groups, and the engine sees one query.
//! - `pjit(f, in_shardings, out_sharding)` hash-partitions inputs as
//!   declared, runs the partitions in parallel, enforces the output
//!   sharding (resharding only when the program does not already preserve
//!   it), and checks the result partitions against it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};

use crate::engine::{Backend, Engine, Explain, Source, Table};
use crate::error::{DatajaxError, Result};
use crate::expr::{Expr, SortKey, WindowExpr, asc, col, lit, row_number};
use crate::frame::Frame;
use crate::ir::{Ir, JoinHow, Op, Sharding};
use crate::types::Schema;

type Program = dyn Fn(&[Frame]) -> Frame + Send + Sync;

/// A function traced once per input schema. See the module documentation.
pub struct Jit {
    f: Arc<Program>,
    arity: usize,
    cache: Mutex<HashMap<Vec<Schema>, Arc<Ir>>>,
    traces: AtomicUsize,
    engine: OnceLock<Arc<Engine>>,
}

impl std::fmt::Debug for Jit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jit")
            .field("arity", &self.arity)
            .field("traces", &self.traces())
            .finish()
    }
}

/// Jit-compiles a one-input program:
///
/// ```
/// use datajax::{djit, col, lit, sum};
/// let f = djit(|df| df.filter(col("x").gt(lit(1))).group_by(["k"]).agg([sum("v")]));
/// # let _ = f;
/// ```
pub fn djit<F>(f: F) -> Jit
where
    F: Fn(Frame) -> Frame + Send + Sync + 'static,
{
    Jit::new(1, move |xs: &[Frame]| f(xs[0].clone()))
}

/// Jit-compiles a program of `arity` inputs (named `x0`, `x1`, ...).
pub fn djit_n<F>(arity: usize, f: F) -> Jit
where
    F: Fn(&[Frame]) -> Frame + Send + Sync + 'static,
{
    Jit::new(arity, f)
}

/// The input name of argument `i` of a jitted function.
pub fn arg_name(i: usize) -> String {
    format!("x{i}")
}

impl Jit {
    fn new<F>(arity: usize, f: F) -> Jit
    where
        F: Fn(&[Frame]) -> Frame + Send + Sync + 'static,
    {
        Jit {
            f: Arc::new(f),
            arity,
            cache: Mutex::new(HashMap::new()),
            traces: AtomicUsize::new(0),
            engine: OnceLock::new(),
        }
    }

    /// Runs on `engine` instead of a default one (made on first call).
    pub fn with_engine(self, engine: Arc<Engine>) -> Jit {
        let _ = self.engine.set(engine);
        self
    }

    fn engine(&self) -> Result<&Arc<Engine>> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let e = Arc::new(Engine::new()?);
        Ok(self.engine.get_or_init(|| e))
    }

    /// How many times the function has been traced.
    pub fn traces(&self) -> usize {
        self.traces.load(Ordering::SeqCst)
    }

    /// The IR for inputs of `schemas`: cached, or traced now.
    pub fn lower(&self, schemas: &[Schema]) -> Result<Arc<Ir>> {
        if schemas.len() != self.arity {
            return Err(DatajaxError::Input(format!(
                "the function takes {} inputs, got {}",
                self.arity,
                schemas.len()
            )));
        }
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(ir) = cache.get(schemas) {
            return Ok(ir.clone());
        }
        let frames: Vec<Frame> = schemas
            .iter()
            .enumerate()
            .map(|(i, s)| Frame::input(arg_name(i), s.clone()))
            .collect();
        self.traces.fetch_add(1, Ordering::SeqCst);
        let ir = Arc::new((self.f)(&frames).to_ir()?);
        cache.insert(schemas.to_vec(), ir.clone());
        Ok(ir)
    }

    fn bind(&self, inputs: Vec<Source>) -> Result<(Arc<Ir>, HashMap<String, Source>)> {
        let engine = self.engine()?;
        let schemas: Vec<Schema> = inputs
            .iter()
            .map(|s| engine.schema_of(s))
            .collect::<Result<_>>()?;
        let ir = self.lower(&schemas)?;
        let bound = inputs
            .into_iter()
            .enumerate()
            .map(|(i, s)| (arg_name(i), s))
            .collect();
        Ok((ir, bound))
    }

    /// Runs on `inputs` (one per argument), tracing first if their schemas
    /// are new.
    pub fn call(&self, inputs: Vec<Source>) -> Result<Table> {
        let (ir, bound) = self.bind(inputs)?;
        self.engine()?.run(&ir, &bound)
    }

    /// `explain` of the program for `inputs`: the cached IR, the lowered
    /// and optimised logical plans, and the physical plan.
    pub fn explain(&self, inputs: Vec<Source>) -> Result<Explain> {
        let (ir, bound) = self.bind(inputs)?;
        self.engine()?.explain(&ir, &bound)
    }
}

/// The name of the input a vmapped function is traced against.
const GROUP: &str = "__vmap_group";

/// Applies `f`, written for the rows of one group, to every group of the
/// `axis` column as one plan. See the module documentation.
///
/// ```
/// use datajax::{Frame, Schema, DType, vmap, desc};
/// // The two largest values of each user, as one query.
/// let top2 = vmap(|g: Frame| g.sort([desc("v")]).limit(2), "user");
/// let f = Frame::input("t", Schema::of(&[("user", DType::Utf8), ("v", DType::Int64)]).unwrap());
/// assert!(top2(&f).schema().is_ok());
/// ```
pub fn vmap<F>(f: F, axis: &str) -> impl Fn(&Frame) -> Frame
where
    F: Fn(Frame) -> Frame,
{
    let axis = axis.to_owned();
    move |frame: &Frame| batch(&f, &axis, frame).unwrap_or_else(Frame::from_error)
}

/// `columns` with `axis` in front, unless it is already among them.
fn axis_first(columns: &[String], axis: &str) -> Vec<String> {
    if columns.iter().any(|c| c == axis) {
        return columns.to_vec();
    }
    std::iter::once(axis.to_owned())
        .chain(columns.iter().cloned())
        .collect()
}

fn batch<F: Fn(Frame) -> Frame>(f: &F, axis: &str, frame: &Frame) -> Result<Frame> {
    let schema = frame.schema()?;
    schema.require("vmap", axis)?;
    let ir = f(Frame::input(GROUP, schema)).to_ir()?;
    let op_err = |op: &str, m: String| DatajaxError::trace(&format!("vmap({op})"), m);
    let mut frames: Vec<Frame> = Vec::with_capacity(ir.nodes.len());
    let mut batched: Vec<bool> = Vec::with_capacity(ir.nodes.len());
    for n in &ir.nodes {
        let ins: Vec<&Frame> = n.inputs.iter().map(|&i| &frames[i]).collect();
        let bs: Vec<bool> = n.inputs.iter().map(|&i| batched[i]).collect();
        let any = bs.iter().any(|b| *b);
        let (out, b) = match &n.op {
            Op::Input { name } if name == GROUP => (frame.clone(), true),
            Op::Input { name } => (Frame::input(name.clone(), n.schema.clone()), false),
            op if !any => (ins[0].push(op.clone(), &ins[1..]), false),
            Op::Select { exprs } => {
                let mut exprs = exprs.clone();
                if let Some(e) = exprs.iter().find(|e| e.output_name() == axis) {
                    if e.unaliased() != &col(axis) {
                        return Err(op_err(
                            "select",
                            format!("the function redefines the axis column {axis:?} as {e}"),
                        ));
                    }
                } else {
                    exprs.insert(0, col(axis));
                }
                (ins[0].push(Op::Select { exprs }, &[]), true)
            }
            Op::WithColumn { name, .. } if name == axis => {
                return Err(op_err(
                    "with_column",
                    format!("the function overwrites the axis column {axis:?}"),
                ));
            }
            Op::Rename { mapping } if mapping.iter().any(|r| r.from == axis || r.to == axis) => {
                return Err(op_err(
                    "rename",
                    format!("the function renames over the axis column {axis:?}"),
                ));
            }
            Op::Aggregate { keys, aggs } => (
                ins[0].push(
                    Op::Aggregate {
                        keys: axis_first(keys, axis),
                        aggs: aggs.clone(),
                    },
                    &[],
                ),
                true,
            ),
            Op::Sort { keys } => {
                let mut keys = keys.clone();
                keys.insert(0, asc(axis));
                (ins[0].push(Op::Sort { keys }, &[]), true)
            }
            Op::Limit { n: count, offset } => {
                // Per group: number the rows in the order the group had.
                let order: Vec<SortKey> = match &ir.nodes[n.inputs[0]].op {
                    Op::Sort { keys } => keys.clone(),
                    _ => Vec::new(),
                };
                let rn = "__vmap_row";
                let names: Vec<Expr> = n.schema.names().into_iter().map(col).collect();
                let numbered = ins[0].window([row_number().over([axis]).order_by(order).alias(rn)]);
                let kept = numbered
                    .filter(
                        col(rn)
                            .gt(lit(*offset))
                            .and(col(rn).le(lit(offset.saturating_add(*count)))),
                    )
                    .sort([asc(axis), asc(rn)])
                    .select(names);
                (kept, true)
            }
            Op::Window { exprs } => {
                let exprs = exprs
                    .iter()
                    .map(|w| WindowExpr {
                        partition_by: axis_first(&w.partition_by, axis),
                        ..w.clone()
                    })
                    .collect();
                (ins[0].push(Op::Window { exprs }, &[]), true)
            }
            Op::Scan {
                init,
                updates,
                order_by,
                partition_by,
            } => {
                let op = Op::Scan {
                    init: init.clone(),
                    updates: updates.clone(),
                    order_by: order_by.clone(),
                    partition_by: axis_first(partition_by, axis),
                };
                (ins[0].push(op, &[]), true)
            }
            Op::Join {
                how,
                left_on,
                right_on,
                suffixes,
            } => {
                let (mut l, mut r) = (left_on.clone(), right_on.clone());
                match (bs[0], bs[1]) {
                    (true, true) => {
                        if !l.iter().zip(&r).any(|(a, b)| a == axis && b == axis) {
                            l.push(axis.to_owned());
                            r.push(axis.to_owned());
                        }
                    }
                    (true, false) | (false, true) => {
                        let other = if bs[0] { 1 } else { 0 };
                        if ir.nodes[n.inputs[other]].schema.field(axis).is_some() {
                            return Err(op_err(
                                "join",
                                format!(
                                    "the other side of the join also has a column {axis:?}; rename it"
                                ),
                            ));
                        }
                        if !bs[0] && matches!(how, JoinHow::Left | JoinHow::Full)
                            || bs[0] && matches!(how, JoinHow::Right | JoinHow::Full)
                        {
                            return Err(op_err(
                                "join",
                                "an outer join that keeps rows of the side without the axis has no group for them".into(),
                            ));
                        }
                    }
                    (false, false) => {}
                }
                let op = Op::Join {
                    how: *how,
                    left_on: l,
                    right_on: r,
                    suffixes: suffixes.clone(),
                };
                (ins[0].push(op, &ins[1..]), true)
            }
            Op::Union => {
                if bs.iter().any(|b| !b) {
                    return Err(op_err(
                        "union",
                        "both sides of a union must come from the group".into(),
                    ));
                }
                (ins[0].push(Op::Union, &ins[1..]), true)
            }
            op => (ins[0].push(op.clone(), &ins[1..]), true),
        };
        out.schema()?;
        frames.push(out);
        batched.push(b);
    }
    if !batched.get(ir.output).copied().unwrap_or(false) {
        return Err(DatajaxError::trace(
            "vmap",
            "the function's result does not depend on its group; there is nothing to map",
        ));
    }
    frames
        .into_iter()
        .nth(ir.output)
        .ok_or_else(|| DatajaxError::trace("vmap", "no output"))
}

/// Hash-partitioned on `columns`.
pub mod shard {
    use crate::ir::Sharding;

    /// All rows of one key in one partition.
    pub fn by_key<I, S>(columns: I) -> Sharding
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Sharding::ByKey {
            columns: columns.into_iter().map(Into::into).collect(),
        }
    }

    /// Every partition sees everything.
    pub fn replicated() -> Sharding {
        Sharding::Replicated
    }
}

/// Results of a [`Pjit`] call: the output partitions as computed.
#[derive(Debug, Clone)]
pub struct Sharded {
    /// The schema.
    pub schema: SchemaRef,
    /// One list of batches per partition.
    pub partitions: Vec<Vec<RecordBatch>>,
    /// The sharding the partitions were checked against.
    pub sharding: Sharding,
    /// Whether the output had to be repartitioned to meet it (the program
    /// did not preserve the input sharding).
    pub resharded: bool,
}

impl Sharded {
    /// Row count.
    pub fn num_rows(&self) -> usize {
        self.partitions
            .iter()
            .flatten()
            .map(RecordBatch::num_rows)
            .sum()
    }

    /// Every row, as one table.
    pub fn to_table(&self) -> Table {
        Table {
            schema: self.schema.clone(),
            batches: self.partitions.iter().flatten().cloned().collect(),
        }
    }
}

/// A program with declared input and output shardings. See the module
/// documentation.
pub struct Pjit {
    f: Arc<Program>,
    in_shardings: Vec<Sharding>,
    out_sharding: Sharding,
}

impl std::fmt::Debug for Pjit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pjit")
            .field("in_shardings", &self.in_shardings)
            .field("out_sharding", &self.out_sharding)
            .finish()
    }
}

/// `f` over inputs sharded as `in_shardings` (one per input), producing
/// `out_sharding`.
pub fn pjit<F>(f: F, in_shardings: Vec<Sharding>, out_sharding: Sharding) -> Pjit
where
    F: Fn(&[Frame]) -> Frame + Send + Sync + 'static,
{
    Pjit {
        f: Arc::new(f),
        in_shardings,
        out_sharding,
    }
}

/// The sharding each node of `ir` is known to have (`None`: unknown, or
/// gathered into one partition).
pub fn propagate(ir: &Ir) -> Vec<Option<Sharding>> {
    let mut out: Vec<Option<Sharding>> = Vec::with_capacity(ir.nodes.len());
    for n in &ir.nodes {
        let input = |i: usize| n.inputs.get(i).and_then(|&j| out[j].clone());
        let keeps = |s: &Sharding, cols_ok: &dyn Fn(&str) -> bool| match s {
            Sharding::ByKey { columns } => columns.iter().all(|c| cols_ok(c)),
            Sharding::Replicated => true,
        };
        let s = match &n.op {
            Op::Input { .. } | Op::Sort { .. } | Op::Limit { .. } | Op::Union => None,
            Op::Repartition { sharding } => Some(sharding.clone()),
            Op::Filter { .. } | Op::Distinct => input(0),
            Op::WithColumn { name, .. } => input(0).filter(|s| keeps(s, &|c| c != name)),
            Op::Select { exprs } => input(0).filter(|s| {
                keeps(s, &|c| {
                    exprs
                        .iter()
                        .any(|e| e.output_name() == c && e.unaliased() == &col(c))
                })
            }),
            Op::Rename { mapping } => input(0).map(|s| match s {
                Sharding::ByKey { columns } => Sharding::ByKey {
                    columns: columns
                        .iter()
                        .map(|c| {
                            mapping
                                .iter()
                                .find(|r| r.from == *c)
                                .map_or_else(|| c.clone(), |r| r.to.clone())
                        })
                        .collect(),
                },
                s => s,
            }),
            Op::Aggregate { keys, .. } => input(0).filter(|s| match s {
                Sharding::ByKey { columns } => columns.iter().all(|c| keys.contains(c)),
                Sharding::Replicated => true,
            }),
            Op::Window { exprs } => input(0).filter(|s| match s {
                Sharding::ByKey { columns } => exprs
                    .iter()
                    .all(|w| columns.iter().all(|c| w.partition_by.contains(c))),
                Sharding::Replicated => true,
            }),
            Op::Scan { partition_by, .. } => input(0).filter(|s| match s {
                Sharding::ByKey { columns } => columns.iter().all(|c| partition_by.contains(c)),
                Sharding::Replicated => true,
            }),
            Op::Join {
                how,
                left_on,
                right_on,
                ..
            } => match (input(0), input(1)) {
                (Some(Sharding::ByKey { columns }), r)
                    if matches!(how, JoinHow::Inner | JoinHow::Left)
                        && columns.iter().all(|c| {
                            left_on.iter().zip(right_on).any(|(a, b)| a == c && a == b)
                        })
                        && (r == Some(Sharding::Replicated)
                            || r == Some(Sharding::ByKey {
                                columns: columns.clone(),
                            })) =>
                {
                    Some(Sharding::ByKey { columns })
                }
                (Some(Sharding::Replicated), Some(Sharding::Replicated)) => {
                    Some(Sharding::Replicated)
                }
                _ => None,
            },
        };
        out.push(s);
    }
    out
}

impl Pjit {
    /// The IR for inputs of `schemas`, with the input repartitions and, if
    /// the program does not preserve it, the output repartition; also
    /// whether that was needed.
    pub fn trace(&self, schemas: &[Schema]) -> Result<(Ir, bool)> {
        if schemas.len() != self.in_shardings.len() {
            return Err(DatajaxError::Sharding(format!(
                "{} inputs but {} in_shardings; give one per input",
                schemas.len(),
                self.in_shardings.len()
            )));
        }
        let frames: Vec<Frame> = schemas
            .iter()
            .zip(&self.in_shardings)
            .enumerate()
            // A replicated input's repartition moves nothing (see the
            // lowering); it is recorded so that propagation knows it.
            .map(|(i, (s, sh))| Frame::input(arg_name(i), s.clone()).repartition(sh.clone()))
            .collect();
        let out = (self.f)(&frames);
        let schema = out.schema()?;
        if let Sharding::ByKey { columns } = &self.out_sharding {
            for c in columns {
                schema
                    .require("pjit out_sharding", c)
                    .map_err(|e| DatajaxError::Sharding(e.to_string()))?;
            }
        }
        let ir = out.to_ir()?;
        let have = propagate(&ir).get(ir.output).cloned().flatten();
        let keeps = match (&have, &self.out_sharding) {
            (_, Sharding::Replicated) => true,
            (Some(h), want) => h == want,
            (None, _) => false,
        };
        if keeps {
            Ok((ir, false))
        } else {
            Ok((out.repartition(self.out_sharding.clone()).to_ir()?, true))
        }
    }

    /// Runs on `inputs` with `engine`'s partitions and checks every output
    /// partition against the output sharding.
    pub fn call(&self, engine: &Engine, inputs: Vec<Source>) -> Result<Sharded> {
        let schemas: Vec<Schema> = inputs
            .iter()
            .map(|s| engine.schema_of(s))
            .collect::<Result<_>>()?;
        let (ir, resharded) = self.trace(&schemas)?;
        let bound = inputs
            .into_iter()
            .enumerate()
            .map(|(i, s)| (arg_name(i), s))
            .collect();
        let (schema, mut partitions) = engine.run_partitioned(engine.plan(&ir, &bound)?)?;
        if self.out_sharding == Sharding::Replicated {
            // One partition holding every row: what each consumer would see.
            partitions = vec![partitions.into_iter().flatten().collect()];
        }
        if !resharded && check_sharding(&schema, &partitions, &self.out_sharding).is_err() {
            // The engine chose a plan (a broadcast join, say) that does not
            // keep the key together: repartition the output explicitly.
            let again = Ir::from_root(&Arc::new(crate::ir::Node {
                op: Op::Repartition {
                    sharding: self.out_sharding.clone(),
                },
                inputs: vec![rebuild(&ir)?],
                schema: ir.output_schema().clone(),
            }))?;
            let (s, p) = engine.run_partitioned(engine.plan(&again, &bound)?)?;
            return finish(s, p, &self.out_sharding, true);
        }
        finish(schema, partitions, &self.out_sharding, resharded)
    }
}

fn finish(
    schema: SchemaRef,
    partitions: Vec<Vec<RecordBatch>>,
    sharding: &Sharding,
    resharded: bool,
) -> Result<Sharded> {
    check_sharding(&schema, &partitions, sharding)?;
    Ok(Sharded {
        schema,
        partitions,
        sharding: sharding.clone(),
        resharded,
    })
}

/// The in-memory DAG of a flat IR (the inverse of [`Ir::from_root`]).
pub fn rebuild(ir: &Ir) -> Result<Arc<crate::ir::Node>> {
    let mut nodes: Vec<Arc<crate::ir::Node>> = Vec::with_capacity(ir.nodes.len());
    for n in &ir.nodes {
        nodes.push(Arc::new(crate::ir::Node {
            op: n.op.clone(),
            inputs: n.inputs.iter().map(|&i| nodes[i].clone()).collect(),
            schema: n.schema.clone(),
        }));
    }
    nodes
        .into_iter()
        .nth(ir.output)
        .ok_or_else(|| DatajaxError::Engine("the IR has no output node".into()))
}

/// Checks that no key of a `by_key` sharding appears in two partitions.
pub fn check_sharding(
    schema: &SchemaRef,
    partitions: &[Vec<RecordBatch>],
    sharding: &Sharding,
) -> Result<()> {
    let Sharding::ByKey { columns } = sharding else {
        return Ok(());
    };
    let idx: Vec<usize> = columns
        .iter()
        .map(|c| {
            schema
                .index_of(c)
                .map_err(|_| DatajaxError::Sharding(format!("the output has no column {c:?}")))
        })
        .collect::<Result<_>>()?;
    let fields: Vec<SortField> = idx
        .iter()
        .map(|&i| SortField::new(schema.field(i).data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields)?;
    let mut owner: HashMap<Vec<u8>, usize> = HashMap::new();
    for (p, batches) in partitions.iter().enumerate() {
        for b in batches {
            let cols: Vec<_> = idx.iter().map(|&i| b.column(i).clone()).collect();
            let rows = converter.convert_columns(&cols)?;
            for r in rows.iter() {
                let key = r.as_ref().to_vec();
                match owner.get(&key) {
                    Some(&q) if q != p => {
                        return Err(DatajaxError::Sharding(format!(
                            "a key of {sharding} is in partitions {q} and {p}: the output is not sharded as declared"
                        )));
                    }
                    Some(_) => {}
                    None => {
                        owner.insert(key, p);
                    }
                }
            }
        }
    }
    Ok(())
}
