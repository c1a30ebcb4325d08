//! Lowering: IR -> DataFusion `LogicalPlan`.
//!
//! Each IR node becomes a few `LogicalPlanBuilder` steps; DataFusion's
//! optimiser then merges projections, pushes filters down and picks join
//! algorithms. Two choices keep the lowering simple and exact:
//!
//! - Columns are referenced by bare name ([`Column::from_name`]), which is
//!   unambiguous because every IR schema has unique names. A join aliases
//!   its two sides `l` and `r` and projects to the IR's output names, so the
//!   plan after each node again has unique, unqualified names.
//! - The plan ends with a projection that casts any column whose engine
//!   type differs from the IR's (a Parquet string read as `Utf8View`, say),
//!   so results always have exactly the traced schema.
//!
//! Inputs are supplied as ready plans (scans of bound tables; see
//! [`crate::engine`]); the lowering itself touches no data.

use std::collections::HashMap;

use datafusion::common::{Column, ScalarValue};
use datafusion::functions::expr_fn as f;
use datafusion::functions_aggregate::expr_fn as agg;
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::functions_window::expr_fn as win;
use datafusion::logical_expr::expr::WindowFunction;
use datafusion::logical_expr::{
    Expr as DfExpr, ExprFunctionExt, JoinType, LogicalPlan, LogicalPlanBuilder, Operator,
    Partitioning, SortExpr, WindowFrame, WindowFrameBound, WindowFrameUnits, binary_expr, cast,
    lit as df_lit,
};

use crate::error::{DatajaxError, Result};
use crate::expr::{AggFunc, BinOp, Expr, Scalar, SortKey, StrFunc, WindowFunc};
use crate::ir::{Ir, JoinColumn, JoinHow, Op, Sharding, join_columns};
use crate::types::{DType, Schema};

/// A column by bare name.
pub fn column(name: &str) -> DfExpr {
    DfExpr::Column(Column::from_name(name))
}

/// The DataFusion literal of `s`.
pub fn scalar(s: &Scalar) -> ScalarValue {
    match s {
        Scalar::Null => ScalarValue::Null,
        Scalar::Bool(v) => ScalarValue::Boolean(Some(*v)),
        Scalar::Int64(v) => ScalarValue::Int64(Some(*v)),
        Scalar::UInt64(v) => ScalarValue::UInt64(Some(*v)),
        Scalar::Float64(v) => ScalarValue::Float64(Some(*v)),
        Scalar::Utf8(v) => ScalarValue::Utf8(Some(v.clone())),
        Scalar::Date32(v) => ScalarValue::Date32(Some(*v)),
        Scalar::TimestampUs(v) => ScalarValue::TimestampMicrosecond(Some(*v), None),
    }
}

/// The DataFusion expression of `e`, typed against `schema`.
pub fn expr(e: &Expr, schema: &Schema) -> Result<DfExpr> {
    let x = |e: &Expr| expr(e, schema);
    Ok(match e {
        Expr::Col { name } => column(name),
        Expr::Lit { value } => df_lit(scalar(value)),
        Expr::Carry { name } => {
            return Err(DatajaxError::trace(
                "lower",
                format!("carry {name:?} used outside a scan step"),
            ));
        }
        Expr::Binary { op, left, right } => {
            let (l, r) = (x(left)?, x(right)?);
            match op {
                BinOp::Add => binary_expr(l, Operator::Plus, r),
                BinOp::Sub => binary_expr(l, Operator::Minus, r),
                BinOp::Mul => binary_expr(l, Operator::Multiply, r),
                BinOp::Div => binary_expr(
                    cast(l, DType::Float64.to_arrow()),
                    Operator::Divide,
                    cast(r, DType::Float64.to_arrow()),
                ),
                BinOp::Mod => binary_expr(l, Operator::Modulo, r),
                BinOp::Eq => binary_expr(l, Operator::Eq, r),
                BinOp::Ne => binary_expr(l, Operator::NotEq, r),
                BinOp::Lt => binary_expr(l, Operator::Lt, r),
                BinOp::Le => binary_expr(l, Operator::LtEq, r),
                BinOp::Gt => binary_expr(l, Operator::Gt, r),
                BinOp::Ge => binary_expr(l, Operator::GtEq, r),
                BinOp::And => binary_expr(l, Operator::And, r),
                BinOp::Or => binary_expr(l, Operator::Or, r),
                BinOp::Max => f::greatest(vec![l, r]),
                BinOp::Min => f::least(vec![l, r]),
            }
        }
        Expr::Not { expr } => DfExpr::Not(Box::new(x(expr)?)),
        Expr::Neg { expr } => DfExpr::Negative(Box::new(x(expr)?)),
        Expr::IsNull { expr } => x(expr)?.is_null(),
        Expr::IsNotNull { expr } => x(expr)?.is_not_null(),
        Expr::FillNull { expr, value } => {
            let t = e.dtype(schema, "fill_null")?.to_arrow();
            f::coalesce(vec![cast(x(expr)?, t.clone()), cast(x(value)?, t)])
        }
        Expr::Cast { expr, to } => cast(x(expr)?, to.to_arrow()),
        Expr::Case { arms, otherwise } => {
            let t = e.dtype(schema, "case")?.to_arrow();
            let mut it = arms.iter();
            let Some(first) = it.next() else {
                return Err(DatajaxError::trace("case", "a case needs at least one arm"));
            };
            let mut b =
                datafusion::logical_expr::when(x(&first.when)?, cast(x(&first.then)?, t.clone()));
            for a in it {
                b = b.when(x(&a.when)?, cast(x(&a.then)?, t.clone()));
            }
            match otherwise {
                Some(o) => b.otherwise(cast(x(o)?, t))?,
                None => b.end()?,
            }
        }
        Expr::Str { func, expr, arg } => {
            let s = x(expr)?;
            let a = || df_lit(arg.clone().unwrap_or_default());
            match func {
                StrFunc::Contains => f::contains(s, a()),
                StrFunc::StartsWith => f::starts_with(s, a()),
                StrFunc::EndsWith => f::ends_with(s, a()),
                StrFunc::Lower => f::lower(s),
                StrFunc::Upper => f::upper(s),
                StrFunc::Length => cast(f::character_length(s), DType::Int32.to_arrow()),
            }
        }
        Expr::DateTrunc { unit, expr: inner } => {
            let t = e.dtype(schema, "dt_trunc")?;
            f::date_trunc(df_lit(unit.name()), cast(x(inner)?, t.to_arrow()))
        }
        Expr::Alias { expr, name } => x(expr)?.alias(name),
    })
}

fn sort_expr(k: &SortKey) -> SortExpr {
    column(&k.column).sort(!k.descending, k.nulls_first)
}

/// `e` as a window over the given partitions and order, rows from the
/// partition's start to the current row.
fn running(e: DfExpr, partition_by: &[String], order_by: &[SortKey]) -> Result<DfExpr> {
    Ok(
        e.partition_by(partition_by.iter().map(|c| column(c)).collect())
            .order_by(order_by.iter().map(sort_expr).collect())
            .window_frame(WindowFrame::new_bounds(
                WindowFrameUnits::Rows,
                WindowFrameBound::Preceding(ScalarValue::UInt64(None)),
                WindowFrameBound::CurrentRow,
            ))
            .build()?,
    )
}

/// An aggregate UDF applied as a window function.
pub(crate) fn aggregate_window(
    udaf: std::sync::Arc<datafusion::logical_expr::AggregateUDF>,
    arg: DfExpr,
    partition_by: &[String],
    order_by: &[SortKey],
) -> Result<DfExpr> {
    running(
        DfExpr::WindowFunction(Box::new(WindowFunction::new(udaf, vec![arg]))),
        partition_by,
        order_by,
    )
}

fn window_expr(w: &crate::expr::WindowExpr, schema: &Schema) -> Result<DfExpr> {
    let parts: Vec<DfExpr> = w.partition_by.iter().map(|c| column(c)).collect();
    let order: Vec<SortExpr> = w.order_by.iter().map(sort_expr).collect();
    let e = match &w.func {
        WindowFunc::RowNumber => win::row_number(),
        WindowFunc::Rank => win::rank(),
        WindowFunc::CumSum { expr: inner } => {
            return aggregate_window(
                sum_udaf(),
                expr(inner, schema)?,
                &w.partition_by,
                &w.order_by,
            );
        }
        WindowFunc::Lag {
            expr: inner,
            offset,
            default,
        } => win::lag(
            expr(inner, schema)?,
            Some(i64::try_from(*offset).unwrap_or(i64::MAX)),
            default.as_ref().map(scalar),
        ),
        WindowFunc::Lead {
            expr: inner,
            offset,
            default,
        } => win::lead(
            expr(inner, schema)?,
            Some(i64::try_from(*offset).unwrap_or(i64::MAX)),
            default.as_ref().map(scalar),
        ),
    };
    Ok(e.partition_by(parts).order_by(order).build()?)
}

fn agg_expr(a: &crate::expr::Agg, schema: &Schema) -> Result<DfExpr> {
    let arg = match &a.expr {
        Some(e) => expr(e, schema)?,
        None => df_lit(1i64),
    };
    Ok(match a.func {
        AggFunc::Sum => agg::sum(arg),
        AggFunc::Mean => agg::avg(arg),
        AggFunc::Min => agg::min(arg),
        AggFunc::Max => agg::max(arg),
        AggFunc::Count => agg::count(arg),
        AggFunc::CountDistinct => agg::count_distinct(arg),
        AggFunc::First => agg::first_value(arg, a.order_by.iter().map(sort_expr).collect()),
        AggFunc::Last => agg::last_value(arg, a.order_by.iter().map(sort_expr).collect()),
    }
    .alias(&a.name))
}

/// Casts each column of `plan` whose engine type differs from `schema`'s.
fn conform(plan: LogicalPlan, schema: &Schema) -> Result<LogicalPlan> {
    let df_schema = plan.schema().clone();
    let mut changed = false;
    let mut exprs = Vec::with_capacity(schema.fields.len());
    for (i, f) in schema.fields.iter().enumerate() {
        let want = f.dtype.to_arrow();
        let (qualifier, have) = df_schema.qualified_field(i);
        let c = DfExpr::Column(Column::new(qualifier.cloned(), have.name()));
        if *have.data_type() != want || have.name() != &f.name {
            changed = true;
            exprs.push(cast(c, want).alias(&f.name));
        } else {
            exprs.push(c);
        }
    }
    if !changed {
        return Ok(plan);
    }
    Ok(LogicalPlanBuilder::from(plan).project(exprs)?.build()?)
}

/// Options of the lowering.
#[derive(Debug, Clone, Copy)]
pub struct LowerOptions {
    /// Partitions a `by_key` repartition hashes into.
    pub partitions: usize,
    /// Whether an aggregate over an inner join pre-aggregates the side its
    /// values come from (see [`crate::eager`]); default on.
    pub eager_aggregation: bool,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions {
            partitions: std::thread::available_parallelism().map_or(4, usize::from),
            eager_aggregation: true,
        }
    }
}

/// The eager plan of aggregate node `n` when its input is a join the
/// rewrite applies to (see [`crate::eager`]).
fn eager_plan(
    keys: &[String],
    aggs: &[crate::expr::Agg],
    n: &crate::ir::IrNode,
    ir: &Ir,
    plans: &[LogicalPlan],
) -> Result<Option<LogicalPlan>> {
    let Some(&j) = n.inputs.first() else {
        return Ok(None);
    };
    let Some(join) = ir.nodes.get(j) else {
        return Ok(None);
    };
    let Op::Join {
        how,
        left_on,
        right_on,
        suffixes,
    } = &join.op
    else {
        return Ok(None);
    };
    let (Some(&l), Some(&r)) = (join.inputs.first(), join.inputs.get(1)) else {
        return Ok(None);
    };
    let (Some(lp), Some(rp), Some(ln), Some(rn)) =
        (plans.get(l), plans.get(r), ir.nodes.get(l), ir.nodes.get(r))
    else {
        return Ok(None);
    };
    crate::eager::lower_eager(
        keys,
        aggs,
        &n.schema,
        crate::eager::JoinUnder {
            how: *how,
            left_on,
            right_on,
            suffixes,
            schemas: [&ln.schema, &rn.schema],
            plans: [lp.clone(), rp.clone()],
        },
    )
}

/// The logical plan of `ir`, reading input `name` from `scans[name]`.
pub fn lower(
    ir: &Ir,
    scans: &HashMap<String, LogicalPlan>,
    options: LowerOptions,
) -> Result<LogicalPlan> {
    let mut plans: Vec<LogicalPlan> = Vec::with_capacity(ir.nodes.len());
    for n in &ir.nodes {
        let input = |i: usize| -> Result<LogicalPlan> {
            n.inputs
                .get(i)
                .and_then(|&j| plans.get(j))
                .cloned()
                .ok_or_else(|| DatajaxError::Engine(format!("node {}: missing input {i}", n.id)))
        };
        let in_schema = |i: usize| -> &Schema { &ir.nodes[n.inputs[i]].schema };
        let eager = match &n.op {
            Op::Aggregate { keys, aggs } if options.eager_aggregation => {
                eager_plan(keys, aggs, n, ir, &plans)?
            }
            _ => None,
        };
        let plan = if let Some(p) = eager {
            p
        } else {
            match &n.op {
                Op::Input { name } => {
                    let scan = scans.get(name).cloned().ok_or_else(|| {
                        DatajaxError::Input(format!(
                            "input {name:?} is not bound; pass it (--input {name}=PATH)"
                        ))
                    })?;
                    conform(scan, &n.schema)?
                }
                Op::Select { exprs } => {
                    let s = in_schema(0);
                    let out: Vec<DfExpr> = exprs
                        .iter()
                        .map(|e| Ok(expr(e, s)?.alias(e.output_name())))
                        .collect::<Result<_>>()?;
                    LogicalPlanBuilder::from(input(0)?).project(out)?.build()?
                }
                Op::Filter { predicate } => LogicalPlanBuilder::from(input(0)?)
                    .filter(expr(predicate, in_schema(0))?)?
                    .build()?,
                Op::WithColumn { name, expr: e } => {
                    let s = in_schema(0);
                    let mut out = Vec::with_capacity(n.schema.fields.len());
                    for f in &n.schema.fields {
                        out.push(if f.name == *name {
                            expr(e, s)?.alias(name)
                        } else {
                            column(&f.name)
                        });
                    }
                    LogicalPlanBuilder::from(input(0)?).project(out)?.build()?
                }
                Op::Rename { .. } => {
                    let s = in_schema(0);
                    let out: Vec<DfExpr> = s
                        .fields
                        .iter()
                        .zip(&n.schema.fields)
                        .map(|(from, to)| {
                            let c = column(&from.name);
                            if from.name == to.name {
                                c
                            } else {
                                c.alias(&to.name)
                            }
                        })
                        .collect();
                    LogicalPlanBuilder::from(input(0)?).project(out)?.build()?
                }
                Op::Join {
                    how,
                    left_on,
                    right_on,
                    suffixes,
                } => {
                    let (ls, rs) = (in_schema(0), in_schema(1));
                    let left = LogicalPlanBuilder::from(input(0)?).alias("l")?;
                    let right = LogicalPlanBuilder::from(input(1)?).alias("r")?.build()?;
                    let l = |c: &str| DfExpr::Column(Column::new(Some("l"), c));
                    let r = |c: &str| DfExpr::Column(Column::new(Some("r"), c));
                    let join_type = match how {
                        JoinHow::Inner => JoinType::Inner,
                        JoinHow::Left => JoinType::Left,
                        JoinHow::Right => JoinType::Right,
                        JoinHow::Full => JoinType::Full,
                    };
                    let lk: Vec<Column> =
                        left_on.iter().map(|c| Column::new(Some("l"), c)).collect();
                    let rk: Vec<Column> =
                        right_on.iter().map(|c| Column::new(Some("r"), c)).collect();
                    let joined = if lk.is_empty() {
                        left.cross_join(right)?
                    } else {
                        left.join(right, join_type, (lk, rk), None)?
                    };
                    let mut out = Vec::new();
                    for (name, source) in join_columns(left_on, right_on, suffixes, ls, rs) {
                        let t = n.schema.require("join", &name)?.dtype.to_arrow();
                        let e = match source {
                            JoinColumn::SharedKey { left, right } => match how {
                                JoinHow::Inner | JoinHow::Left => l(&left),
                                JoinHow::Right => r(&right),
                                JoinHow::Full => f::coalesce(vec![
                                    cast(l(&left), t.clone()),
                                    cast(r(&right), t.clone()),
                                ]),
                            },
                            JoinColumn::Left(c) => l(&c),
                            JoinColumn::Right(c) => r(&c),
                        };
                        out.push(cast(e, t).alias(name));
                    }
                    joined.project(out)?.build()?
                }
                Op::Aggregate { keys, aggs } => {
                    let s = in_schema(0);
                    let groups: Vec<DfExpr> = keys.iter().map(|k| column(k)).collect();
                    let aggs: Vec<DfExpr> =
                        aggs.iter().map(|a| agg_expr(a, s)).collect::<Result<_>>()?;
                    let names: Vec<DfExpr> = n.schema.names().iter().map(|c| column(c)).collect();
                    LogicalPlanBuilder::from(input(0)?)
                        .aggregate(groups, aggs)?
                        .project(names)?
                        .build()?
                }
                Op::Sort { keys } => LogicalPlanBuilder::from(input(0)?)
                    .sort(keys.iter().map(sort_expr).collect::<Vec<_>>())?
                    .build()?,
                Op::Limit { n: count, offset } => LogicalPlanBuilder::from(input(0)?)
                    .limit(
                        usize::try_from(*offset).unwrap_or(usize::MAX),
                        Some(usize::try_from(*count).unwrap_or(usize::MAX)),
                    )?
                    .build()?,
                Op::Distinct => LogicalPlanBuilder::from(input(0)?).distinct()?.build()?,
                Op::Union => {
                    let side = |plan: LogicalPlan| -> Result<LogicalPlan> {
                        let out: Vec<DfExpr> = n
                            .schema
                            .fields
                            .iter()
                            .map(|f| cast(column(&f.name), f.dtype.to_arrow()).alias(&f.name))
                            .collect();
                        Ok(LogicalPlanBuilder::from(plan).project(out)?.build()?)
                    };
                    LogicalPlanBuilder::from(side(input(0)?)?)
                        .union(side(input(1)?)?)?
                        .build()?
                }
                Op::Window { exprs } => {
                    let s = in_schema(0);
                    let ws: Vec<DfExpr> = exprs
                        .iter()
                        .map(|w| window_expr(w, s))
                        .collect::<Result<_>>()?;
                    let mut out: Vec<DfExpr> = s.names().iter().map(|c| column(c)).collect();
                    for (w, e) in exprs.iter().zip(&ws) {
                        out.push(column(&e.schema_name().to_string()).alias(&w.name));
                    }
                    // Expressions with different partitions or orders need
                    // window nodes of their own; DataFusion groups them.
                    LogicalPlanBuilder::from(LogicalPlanBuilder::window_plan(input(0)?, ws)?)
                        .project(out)?
                        .build()?
                }
                Op::Repartition { sharding } => match sharding {
                    Sharding::ByKey { columns } => LogicalPlanBuilder::from(input(0)?)
                        .repartition(Partitioning::Hash(
                            columns.iter().map(|c| column(c)).collect(),
                            options.partitions.max(1),
                        ))?
                        .build()?,
                    // Every partition reads the whole frame: nothing moves.
                    Sharding::Replicated => input(0)?,
                },
                Op::Scan {
                    init,
                    updates,
                    order_by,
                    partition_by,
                } => crate::scan::lower_scan(
                    input(0)?,
                    in_schema(0),
                    init,
                    updates,
                    order_by,
                    partition_by,
                )?,
            }
        };
        plans.push(conform(plan, &n.schema)?);
    }
    plans
        .into_iter()
        .nth(ir.output)
        .ok_or_else(|| DatajaxError::Engine("the IR has no output node".into()))
}
