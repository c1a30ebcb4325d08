//! Eager aggregation: an aggregate over an inner join is computed partly
//! before the join, when that gives the same answer.
//!
//! The typical feature pipeline joins a large fact table with a small
//! dimension table and groups by the dimension's attributes:
//!
//! ```text
//! facts.join(users, on = user).group_by([country, tier]).agg([sum(net), mean(amount), count()])
//! ```
//!
//! Lowered as written, the join emits one row per fact row with the
//! dimension's columns (often strings) copied into it, and the aggregate
//! hashes those copies: most of the time goes into moving and comparing
//! strings. Grouping the fact side by its join key first (one row per
//! user, with partial sums and counts) shrinks what the join and the final
//! aggregate see from one row per fact to one row per key:
//!
//! ```text
//! facts.group_by([user]).agg([s = sum(net), s2 = sum(amount), c2 = count(amount), n = count()])
//!      .join(users, on = user)
//!      .group_by([country, tier]).agg([sum(s), sum(s2) / sum(c2), sum(n)])
//! ```
//!
//! Why it is exact: every joined row pairs a fact row `f` with a dimension
//! row `d` where `f.key = d.key`. The final groups partition those pairs;
//! for one `d`, its pairs are exactly the fact rows of key `d.key`, which
//! is one pre-aggregated row. So a sum over the pairs is the sum of the
//! partial sums, a count the sum of partial counts, a min the min of the
//! partial mins, and a mean the sum of partial sums over the sum of
//! partial counts. Duplicate dimension keys repeat a pre-aggregated row
//! exactly as often as they would repeat each fact row.
//!
//! When it applies ([`lower_eager`] returns `None` otherwise, and the
//! aggregate is lowered as written):
//! - the join is inner and has keys;
//! - every aggregation is sum, mean, min, max or count (count_distinct,
//!   first and last do not decompose);
//! - every aggregated value reads one side only (the "fact" side; the left
//!   one when they read no column). Group keys may come from either side:
//!   fact-side keys join the pre-aggregation's grouping.
//!
//! Float sums add in a different order, so they can differ from the
//! direct plan in the last bits, as they already do between runs with
//! several partitions. [`crate::Engine::with_eager_aggregation`] turns the
//! rewrite off.

use datafusion::common::Column;
use datafusion::functions::expr_fn as f;
use datafusion::functions_aggregate::expr_fn as agg;
use datafusion::logical_expr::{
    Expr as DfExpr, JoinType, LogicalPlan, LogicalPlanBuilder, binary_expr, cast, lit as df_lit,
};

use crate::error::Result;
use crate::expr::{Agg, AggFunc};
use crate::ir::{JoinColumn, JoinHow, join_columns};
use crate::lower::{column, expr};
use crate::types::{DType, Schema};

/// The join under an aggregate: its spec and both inputs.
pub(crate) struct JoinUnder<'a> {
    /// How rows match.
    pub how: JoinHow,
    /// Left key columns.
    pub left_on: &'a [String],
    /// Right key columns.
    pub right_on: &'a [String],
    /// Suffixes for colliding names.
    pub suffixes: &'a [String; 2],
    /// The inputs' schemas, left then right.
    pub schemas: [&'a Schema; 2],
    /// The inputs' plans, left then right.
    pub plans: [LogicalPlan; 2],
}

/// Qualifiers of the pre-aggregated fact side and the other side.
const FACT: &str = "f";
const DIM: &str = "d";

/// The name of pre-aggregated column `slot` of aggregation `i`.
fn partial(i: usize, slot: &str) -> String {
    format!("__eager_{i}_{slot}")
}

/// The eager plan of `group_by(keys).agg(aggs)` over `join`, or `None`
/// where the rewrite does not apply (see the module documentation).
/// `out` is the aggregate's IR schema.
pub(crate) fn lower_eager(
    keys: &[String],
    aggs: &[Agg],
    out: &Schema,
    join: JoinUnder<'_>,
) -> Result<Option<LogicalPlan>> {
    if join.how != JoinHow::Inner || join.left_on.is_empty() {
        return Ok(None);
    }
    // The partial columns' names must not shadow an output's. (Aggregations
    // that do not decompose are refused where each is lowered, below.)
    let reserved = |n: &str| n.starts_with("__eager_");
    if keys.iter().any(|k| reserved(k)) || aggs.iter().any(|a| reserved(&a.name)) {
        return Ok(None);
    }
    let names = join_columns(
        join.left_on,
        join.right_on,
        join.suffixes,
        join.schemas[0],
        join.schemas[1],
    );
    let source = |name: &str| names.iter().find(|(n, _)| n == name).map(|(_, s)| s);
    // The side every aggregated value reads (0 left, 1 right).
    let mut fact: Option<usize> = None;
    for a in aggs {
        for c in a.expr.iter().flat_map(|e| e.columns()) {
            let side = match source(&c) {
                Some(JoinColumn::Left(_)) => 0,
                Some(JoinColumn::Right(_)) => 1,
                Some(JoinColumn::SharedKey { .. }) => continue,
                None => return Ok(None),
            };
            if fact.is_some_and(|s| s != side) {
                return Ok(None);
            }
            fact = Some(side);
        }
    }
    let fact = fact.unwrap_or(0);
    let [mut fact_plan, mut dim_plan] = join.plans;
    let (mut fact_on, mut dim_on) = (join.left_on, join.right_on);
    if fact == 1 {
        std::mem::swap(&mut fact_plan, &mut dim_plan);
        std::mem::swap(&mut fact_on, &mut dim_on);
    }
    // A join output name -> the fact side's column it comes from, if any.
    let fact_column = |name: &str| -> Option<String> {
        match source(name)? {
            JoinColumn::Left(c) if fact == 0 => Some(c.clone()),
            JoinColumn::Right(c) if fact == 1 => Some(c.clone()),
            JoinColumn::SharedKey { left, right } => {
                Some(if fact == 0 { left } else { right }.clone())
            }
            _ => None,
        }
    };

    // The pre-aggregation groups by the fact side's join keys and by its
    // columns the final grouping uses.
    let mut pre_keys: Vec<String> = fact_on.to_vec();
    let mut final_keys: Vec<DfExpr> = Vec::with_capacity(keys.len());
    for k in keys {
        let t = out.require("group_by", k)?.dtype.to_arrow();
        let e = match fact_column(k) {
            Some(c) => {
                if !pre_keys.contains(&c) {
                    pre_keys.push(c.clone());
                }
                DfExpr::Column(Column::new(Some(FACT), c))
            }
            None => match source(k) {
                Some(JoinColumn::Left(c) | JoinColumn::Right(c)) => {
                    DfExpr::Column(Column::new(Some(DIM), c.clone()))
                }
                _ => return Ok(None),
            },
        };
        final_keys.push(cast(e, t).alias(k));
    }

    let fact_schema = join.schemas[fact];
    let mut pre_aggs = Vec::new();
    let mut final_aggs = Vec::new();
    let mut outputs: Vec<DfExpr> = keys.iter().map(|k| column(k)).collect();
    let slot = |i: usize, s: &str| DfExpr::Column(Column::new(Some(FACT), partial(i, s)));
    for (i, a) in aggs.iter().enumerate() {
        let arg = match &a.expr {
            Some(e) => {
                let on_fact = e.map_columns(&|n| fact_column(n).unwrap_or_else(|| n.to_owned()));
                expr(&on_fact, fact_schema)?
            }
            None => df_lit(1i64),
        };
        let total = partial(i, "total");
        match a.func {
            AggFunc::Sum | AggFunc::Min | AggFunc::Max | AggFunc::Count => {
                // The partial aggregate, and how partials combine.
                type Fold = fn(DfExpr) -> DfExpr;
                let (pre, combine): (Fold, Fold) = match a.func {
                    AggFunc::Sum => (agg::sum, agg::sum),
                    AggFunc::Min => (agg::min, agg::min),
                    AggFunc::Max => (agg::max, agg::max),
                    _ => (agg::count, agg::sum),
                };
                pre_aggs.push(pre(arg).alias(partial(i, "v")));
                final_aggs.push(combine(slot(i, "v")).alias(&total));
                let value = if a.func == AggFunc::Count {
                    // Without group keys an empty join still gives one
                    // row, where a count is 0 but a sum of no counts is null.
                    f::coalesce(vec![column(&total), df_lit(0i64)])
                } else {
                    column(&total)
                };
                outputs.push(value.alias(&a.name));
            }
            AggFunc::Mean => {
                let float = DType::Float64.to_arrow();
                pre_aggs.push(agg::sum(cast(arg.clone(), float.clone())).alias(partial(i, "s")));
                pre_aggs.push(agg::count(arg).alias(partial(i, "c")));
                let (s, c) = (partial(i, "sum"), partial(i, "count"));
                final_aggs.push(agg::sum(slot(i, "s")).alias(&s));
                final_aggs.push(agg::sum(slot(i, "c")).alias(&c));
                // A group whose values are all null has count 0: its mean
                // is null, as the direct plan's.
                let denominator = cast(f::nullif(column(&c), df_lit(0i64)), float);
                outputs.push(
                    binary_expr(
                        column(&s),
                        datafusion::logical_expr::Operator::Divide,
                        denominator,
                    )
                    .alias(&a.name),
                );
            }
            AggFunc::CountDistinct | AggFunc::First | AggFunc::Last => return Ok(None),
        }
    }

    let pre = LogicalPlanBuilder::from(fact_plan)
        .aggregate(pre_keys.iter().map(|c| column(c)), pre_aggs)?
        .alias(FACT)?
        .build()?;
    let dim = LogicalPlanBuilder::from(dim_plan).alias(DIM)?.build()?;
    let fk: Vec<Column> = fact_on.iter().map(|c| Column::new(Some(FACT), c)).collect();
    let dk: Vec<Column> = dim_on.iter().map(|c| Column::new(Some(DIM), c)).collect();
    // The fact side stays on the side it was on, so the engine's choice of
    // build side sees the same shape as the program.
    let joined = if fact == 0 {
        LogicalPlanBuilder::from(pre).join(dim, JoinType::Inner, (fk, dk), None)?
    } else {
        LogicalPlanBuilder::from(dim).join(pre, JoinType::Inner, (dk, fk), None)?
    };
    Ok(Some(
        joined
            .aggregate(final_keys, final_aggs)?
            .project(outputs)?
            .build()?,
    ))
}
