//! The IR: a typed DAG of relational operations, with a versioned JSON form.
//!
//! Tracing builds the DAG in memory ([`Node`]s shared through `Arc`, so a
//! frame used twice is one node); [`Ir`] is its flat, serialisable form:
//! inputs with their schemas, nodes in topological order (each naming its
//! inputs by id and carrying its output schema), and the output node.
//!
//! [`infer`] is the single source of typing rules: tracing calls it to
//! record a node, and [`Ir::from_json`] calls it again on every node of a
//! file and rejects one whose stored schema disagrees, so an edited or
//! stale IR fails on load with the node and the difference, never halfway
//! through a run.
//!
//! ```json
//! {"ir_version": 1,
//!  "inputs": [{"name": "events", "schema": [{"name": "k", "dtype": "utf8", "nullable": true}, ...]}],
//!  "nodes": [{"id": 0, "inputs": [], "op": {"kind": "input", "name": "events"}, "schema": [...]},
//!            {"id": 1, "inputs": [0], "op": {"kind": "filter", "predicate": {...}}, "schema": [...]}],
//!  "output": 1}
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{DatajaxError, Result};
use crate::expr::{Agg, Expr, Scalar, SortKey, WindowExpr};
use crate::types::{DType, Field, Schema};

/// The IR format version this build writes and reads.
pub const IR_VERSION: u32 = 1;

/// How a join matches rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinHow {
    /// Rows with a match on both sides.
    Inner,
    /// Every left row, with its matches or nulls.
    Left,
    /// Every right row, with its matches or nulls.
    Right,
    /// Every row of both sides.
    Full,
}

impl JoinHow {
    /// Its IR name.
    pub fn name(self) -> &'static str {
        match self {
            JoinHow::Inner => "inner",
            JoinHow::Left => "left",
            JoinHow::Right => "right",
            JoinHow::Full => "full",
        }
    }
}

/// How a frame's rows are spread over partitions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Sharding {
    /// Hash-partitioned on these columns: all rows of one key in one partition.
    ByKey {
        /// The key columns.
        columns: Vec<String>,
    },
    /// Every partition sees the whole frame.
    Replicated,
}

impl std::fmt::Display for Sharding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sharding::ByKey { columns } => write!(f, "by_key({})", columns.join(", ")),
            Sharding::Replicated => f.write_str("replicated"),
        }
    }
}

/// A renaming `from -> to`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    /// The existing name.
    pub from: String,
    /// The new name.
    pub to: String,
}

/// A scan carry's initial value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarryInit {
    /// The carry (and output column) name.
    pub name: String,
    /// Its value before the first row.
    pub value: Scalar,
}

/// A scan carry's update: its value after a row, from its value before
/// (`Expr::Carry`) and the row's columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarryUpdate {
    /// The carry.
    pub name: String,
    /// The new value.
    pub expr: Expr,
}

/// One relational operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// A named input of the program.
    Input {
        /// The name data is bound to at run time.
        name: String,
    },
    /// These expressions, in order, as the only columns.
    Select {
        /// The outputs (named by [`Expr::output_name`]).
        exprs: Vec<Expr>,
    },
    /// The rows where the predicate holds.
    Filter {
        /// A boolean expression.
        predicate: Expr,
    },
    /// A column added, or replaced in place.
    WithColumn {
        /// Its name.
        name: String,
        /// Its value.
        expr: Expr,
    },
    /// Columns renamed.
    Rename {
        /// The renamings.
        mapping: Vec<Rename>,
    },
    /// Two frames joined on equal keys.
    Join {
        /// How rows match.
        how: JoinHow,
        /// Key columns of the left input.
        left_on: Vec<String>,
        /// Key columns of the right input, pairwise with `left_on`.
        right_on: Vec<String>,
        /// Appended to non-key columns whose names appear on both sides.
        suffixes: [String; 2],
    },
    /// One row per distinct key, with aggregations.
    Aggregate {
        /// The grouping columns (none: one row for the whole frame).
        keys: Vec<String>,
        /// The aggregations.
        aggs: Vec<Agg>,
    },
    /// Rows ordered.
    Sort {
        /// The keys, most significant first.
        keys: Vec<SortKey>,
    },
    /// At most `n` rows after skipping `offset`.
    Limit {
        /// Row count.
        n: u64,
        /// Rows skipped first.
        #[serde(default)]
        offset: u64,
    },
    /// Duplicate rows removed.
    Distinct,
    /// The rows of both inputs (columns matched by name).
    Union,
    /// Window functions added as columns.
    Window {
        /// The window expressions.
        exprs: Vec<WindowExpr>,
    },
    /// Rows redistributed over partitions.
    Repartition {
        /// The target sharding.
        sharding: Sharding,
    },
    /// A fold with explicit carries over ordered rows; each row gets the
    /// carries' values after it.
    Scan {
        /// Carries and their initial values.
        init: Vec<CarryInit>,
        /// How each carry changes with a row.
        updates: Vec<CarryUpdate>,
        /// Row order.
        order_by: Vec<SortKey>,
        /// Independent scans per partition key (none: one scan).
        #[serde(default)]
        partition_by: Vec<String>,
    },
}

impl Op {
    /// The operation's name in messages (`filter`, `join`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Select { .. } => "select",
            Op::Filter { .. } => "filter",
            Op::WithColumn { .. } => "with_column",
            Op::Rename { .. } => "rename",
            Op::Join { .. } => "join",
            Op::Aggregate { .. } => "group_by.agg",
            Op::Sort { .. } => "sort",
            Op::Limit { .. } => "limit",
            Op::Distinct => "distinct",
            Op::Union => "union",
            Op::Window { .. } => "window",
            Op::Repartition { .. } => "repartition",
            Op::Scan { .. } => "scan",
        }
    }

    /// How many inputs it takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } => 0,
            Op::Join { .. } | Op::Union => 2,
            _ => 1,
        }
    }

    /// One line for `explain`.
    pub fn describe(&self) -> String {
        let keys = |k: &[SortKey]| {
            k.iter()
                .map(|k| format!("{}{}", k.column, if k.descending { " desc" } else { "" }))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Op::Input { name } => format!("input {name}"),
            Op::Select { exprs } => format!(
                "select {}",
                exprs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Op::Filter { predicate } => format!("filter {predicate}"),
            Op::WithColumn { name, expr } => format!("with_column {name} = {expr}"),
            Op::Rename { mapping } => format!(
                "rename {}",
                mapping
                    .iter()
                    .map(|r| format!("{} -> {}", r.from, r.to))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Op::Join {
                how,
                left_on,
                right_on,
                ..
            } => format!(
                "join {} on {}",
                how.name(),
                left_on
                    .iter()
                    .zip(right_on)
                    .map(|(l, r)| format!("{l} = {r}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Op::Aggregate { keys, aggs } => format!(
                "group_by [{}] agg {}",
                keys.join(", "),
                aggs.iter()
                    .map(|a| format!(
                        "{} = {}({})",
                        a.name,
                        a.func.name(),
                        a.expr.as_ref().map(ToString::to_string).unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Op::Sort { keys: k } => format!("sort {}", keys(k)),
            Op::Limit { n, offset } => format!("limit {n} offset {offset}"),
            Op::Distinct => "distinct".into(),
            Op::Union => "union".into(),
            Op::Window { exprs } => format!(
                "window {}",
                exprs
                    .iter()
                    .map(|w| w.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Op::Repartition { sharding } => format!("repartition {sharding}"),
            Op::Scan {
                init,
                updates,
                order_by,
                partition_by,
            } => format!(
                "scan order by {} partition by [{}] carries {} updates {}",
                keys(order_by),
                partition_by.join(", "),
                init.iter()
                    .map(|c| format!("{} = {}", c.name, c.value))
                    .collect::<Vec<_>>()
                    .join(", "),
                updates
                    .iter()
                    .map(|u| format!("{} <- {}", u.name, u.expr))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The output schema of `op` applied to inputs of `schemas`: the typing
/// rules of every operation. An error names the operation, the columns and
/// the types.
pub fn infer(op: &Op, schemas: &[&Schema]) -> Result<Schema> {
    let name = op.name();
    if schemas.len() != op.arity() {
        return Err(DatajaxError::trace(
            name,
            format!("takes {} inputs, got {}", op.arity(), schemas.len()),
        ));
    }
    match op {
        Op::Input { .. } => Err(DatajaxError::trace(
            name,
            "an input's schema is declared, not inferred",
        )),
        Op::Select { exprs } => {
            let s = schemas[0];
            if exprs.is_empty() {
                return Err(DatajaxError::trace(name, "select at least one column"));
            }
            let mut fields = Vec::with_capacity(exprs.len());
            for e in exprs {
                let dtype = e.dtype(s, name)?;
                fields.push(Field::new(e.output_name(), dtype));
            }
            Schema::new(fields, name)
        }
        Op::Filter { predicate } => {
            let t = predicate.dtype(schemas[0], name)?;
            if !matches!(t, DType::Bool | DType::Null) {
                return Err(DatajaxError::trace(
                    name,
                    format!("the predicate {predicate} is {t}, not bool"),
                ));
            }
            Ok(schemas[0].clone())
        }
        Op::WithColumn { name: col, expr } => {
            let dtype = expr.dtype(schemas[0], name)?;
            let mut fields = schemas[0].fields.clone();
            let f = Field::new(col.clone(), dtype);
            match fields.iter_mut().find(|g| g.name == *col) {
                Some(slot) => *slot = f,
                None => fields.push(f),
            }
            Schema::new(fields, name)
        }
        Op::Rename { mapping } => {
            let mut fields = schemas[0].fields.clone();
            for r in mapping {
                schemas[0].require(name, &r.from)?;
                for f in &mut fields {
                    if f.name == r.from {
                        f.name = r.to.clone();
                    }
                }
            }
            Schema::new(fields, name)
        }
        Op::Join {
            how,
            left_on,
            right_on,
            suffixes,
        } => join_schema(*how, left_on, right_on, suffixes, schemas[0], schemas[1]),
        Op::Aggregate { keys, aggs } => {
            let s = schemas[0];
            let mut fields = Vec::new();
            for k in keys {
                let f = s.require(name, k)?;
                fields.push(f.clone());
            }
            if aggs.is_empty() {
                return Err(DatajaxError::trace(
                    name,
                    "give at least one aggregation (use distinct() for the keys alone)",
                ));
            }
            for a in aggs {
                fields.push(Field::new(a.name.clone(), a.dtype(s, name)?));
            }
            Schema::new(fields, name)
        }
        Op::Sort { keys } => {
            check_sort_keys(name, keys, schemas[0])?;
            Ok(schemas[0].clone())
        }
        Op::Limit { .. } | Op::Distinct => Ok(schemas[0].clone()),
        Op::Union => {
            let (l, r) = (schemas[0], schemas[1]);
            if l.fields.len() != r.fields.len() {
                return Err(DatajaxError::trace(
                    name,
                    format!("the inputs have different columns: {l} and {r}"),
                ));
            }
            let mut fields = Vec::with_capacity(l.fields.len());
            for f in &l.fields {
                let g = r.require(name, &f.name)?;
                let dtype = f.dtype.unify(g.dtype).ok_or_else(|| {
                    DatajaxError::trace(
                        name,
                        format!(
                            "column {} is {} on the left and {} on the right",
                            f.name, f.dtype, g.dtype
                        ),
                    )
                })?;
                fields.push(Field {
                    name: f.name.clone(),
                    dtype,
                    nullable: f.nullable || g.nullable,
                });
            }
            Schema::new(fields, name)
        }
        Op::Window { exprs } => {
            let s = schemas[0];
            let mut fields = s.fields.clone();
            for w in exprs {
                fields.push(Field::new(w.name.clone(), w.dtype(s, name)?));
            }
            Schema::new(fields, name)
        }
        Op::Repartition { sharding } => {
            if let Sharding::ByKey { columns } = sharding {
                if columns.is_empty() {
                    return Err(DatajaxError::trace(
                        name,
                        "by_key needs at least one column",
                    ));
                }
                for c in columns {
                    schemas[0].require(name, c)?;
                }
            }
            Ok(schemas[0].clone())
        }
        Op::Scan {
            init,
            updates,
            order_by,
            partition_by,
        } => {
            let s = schemas[0];
            if order_by.is_empty() {
                return Err(DatajaxError::trace(
                    name,
                    "a scan needs an order (order_by): a fold over unordered rows has no meaning",
                ));
            }
            check_sort_keys(name, order_by, s)?;
            for c in partition_by {
                s.require(name, c)?;
            }
            let carries = carry_types(init, updates, s)?;
            let mut fields = s.fields.clone();
            for (n, t) in carries {
                fields.push(Field::new(n, t));
            }
            Schema::new(fields, name)
        }
    }
}

/// The type of every carry of a scan: the initial value's type unified with
/// its update's. Every carry must have exactly one update.
pub fn carry_types(
    init: &[CarryInit],
    updates: &[CarryUpdate],
    schema: &Schema,
) -> Result<Vec<(String, DType)>> {
    let op = "scan";
    if init.is_empty() {
        return Err(DatajaxError::trace(
            op,
            "a scan needs at least one carry in init",
        ));
    }
    let mut types: Vec<(String, DType)> = init
        .iter()
        .map(|c| (c.name.clone(), c.value.dtype()))
        .collect();
    for c in init {
        if updates.iter().filter(|u| u.name == c.name).count() != 1 {
            return Err(DatajaxError::trace(
                op,
                format!("carry {:?} needs exactly one update from the step", c.name),
            ));
        }
    }
    // Two passes: an update may read carries whose type a later update fixes.
    for _ in 0..2 {
        for u in updates {
            let t = u.expr.dtype_with(schema, &types, op)?;
            let slot = types
                .iter_mut()
                .find(|(n, _)| *n == u.name)
                .ok_or_else(|| {
                    DatajaxError::trace(
                        op,
                        format!("the step updates {:?}, which init does not declare", u.name),
                    )
                })?;
            slot.1 = slot.1.unify(t).ok_or_else(|| {
                DatajaxError::trace(
                    op,
                    format!(
                        "carry {:?} starts as {} but its update {} is {t}",
                        u.name, slot.1, u.expr
                    ),
                )
            })?;
        }
    }
    for (n, t) in &types {
        if *t == DType::Null {
            return Err(DatajaxError::trace(
                op,
                format!("carry {n:?} has no type: give init a typed value"),
            ));
        }
    }
    Ok(types)
}

fn check_sort_keys(op: &str, keys: &[SortKey], s: &Schema) -> Result<()> {
    if keys.is_empty() {
        return Err(DatajaxError::trace(op, "give at least one key"));
    }
    for k in keys {
        let f = s.require(op, &k.column)?;
        if !f.dtype.is_orderable() {
            return Err(DatajaxError::trace(
                op,
                format!("{} is {}, which has no order", k.column, f.dtype),
            ));
        }
    }
    Ok(())
}

/// Where each output column of a join comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinColumn {
    /// A key present under one name on both sides (`on=`): one column.
    SharedKey {
        /// Left column.
        left: String,
        /// Right column.
        right: String,
    },
    /// A column of the left input.
    Left(String),
    /// A column of the right input.
    Right(String),
}

/// The output columns of a join, in order, with their sources: shared keys
/// first (pandas' `on=`), then the other left columns, then the other right
/// columns, suffixed where names collide.
pub fn join_columns(
    left_on: &[String],
    right_on: &[String],
    suffixes: &[String; 2],
    l: &Schema,
    r: &Schema,
) -> Vec<(String, JoinColumn)> {
    let shared: Vec<(String, String)> = left_on
        .iter()
        .zip(right_on)
        .filter(|(a, b)| a == b)
        .map(|(a, b)| (a.clone(), b.clone()))
        .collect();
    let is_shared_l = |n: &str| shared.iter().any(|(a, _)| a == n);
    let is_shared_r = |n: &str| shared.iter().any(|(_, b)| b == n);
    let left_rest: Vec<&str> = l.names().into_iter().filter(|n| !is_shared_l(n)).collect();
    let right_rest: Vec<&str> = r.names().into_iter().filter(|n| !is_shared_r(n)).collect();
    let mut out: Vec<(String, JoinColumn)> = shared
        .iter()
        .map(|(a, b)| {
            (
                a.clone(),
                JoinColumn::SharedKey {
                    left: a.clone(),
                    right: b.clone(),
                },
            )
        })
        .collect();
    for n in &left_rest {
        let name = if right_rest.contains(n) || is_shared_r(n) {
            format!("{n}{}", suffixes[0])
        } else {
            (*n).to_owned()
        };
        out.push((name, JoinColumn::Left((*n).to_owned())));
    }
    for n in &right_rest {
        let name = if left_rest.contains(n) || is_shared_l(n) {
            format!("{n}{}", suffixes[1])
        } else {
            (*n).to_owned()
        };
        out.push((name, JoinColumn::Right((*n).to_owned())));
    }
    out
}

fn join_schema(
    how: JoinHow,
    left_on: &[String],
    right_on: &[String],
    suffixes: &[String; 2],
    l: &Schema,
    r: &Schema,
) -> Result<Schema> {
    let op = "join";
    if left_on.len() != right_on.len() {
        return Err(DatajaxError::trace(
            op,
            format!(
                "give the same number of keys on both sides (left {}, right {})",
                left_on.len(),
                right_on.len()
            ),
        ));
    }
    if left_on.is_empty() && how != JoinHow::Inner {
        return Err(DatajaxError::trace(
            op,
            format!(
                "a join without keys pairs every row with every row (inner); {} needs keys",
                how.name()
            ),
        ));
    }
    for (a, b) in left_on.iter().zip(right_on) {
        let fa = l.require("join (left)", a)?;
        let fb = r.require("join (right)", b)?;
        if fa.dtype.unify(fb.dtype).is_none() {
            return Err(DatajaxError::trace(
                op,
                format!(
                    "key {a} is {} on the left but {b} is {} on the right; cast one side",
                    fa.dtype, fb.dtype
                ),
            ));
        }
    }
    let mut fields = Vec::new();
    for (name, source) in join_columns(left_on, right_on, suffixes, l, r) {
        let (dtype, nullable) = match &source {
            JoinColumn::SharedKey { left, right } => {
                let (a, b) = (l.require(op, left)?, r.require(op, right)?);
                (
                    a.dtype.unify(b.dtype).unwrap_or(a.dtype),
                    a.nullable || b.nullable,
                )
            }
            JoinColumn::Left(n) => {
                let f = l.require(op, n)?;
                (
                    f.dtype,
                    f.nullable || matches!(how, JoinHow::Right | JoinHow::Full),
                )
            }
            JoinColumn::Right(n) => {
                let f = r.require(op, n)?;
                (
                    f.dtype,
                    f.nullable || matches!(how, JoinHow::Left | JoinHow::Full),
                )
            }
        };
        fields.push(Field {
            name,
            dtype,
            nullable,
        });
    }
    Schema::new(fields, op).map_err(|e| match e {
        DatajaxError::Trace { op, message } => DatajaxError::Trace {
            op,
            message: format!("{message} (or choose other suffixes than {suffixes:?})"),
        },
        e => e,
    })
}

/// A node of the traced DAG.
#[derive(Debug)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// Its inputs (shared: a frame used twice is one node).
    pub inputs: Vec<Arc<Node>>,
    /// Its output schema.
    pub schema: Schema,
}

/// A declared input: its name and the schema it was traced with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputDecl {
    /// The name data is bound to.
    pub name: String,
    /// The schema data must have.
    pub schema: Schema,
}

/// One node of the serialised IR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrNode {
    /// Its id: its position in `nodes`.
    pub id: usize,
    /// The ids of its inputs (all smaller than its own).
    pub inputs: Vec<usize>,
    /// The operation.
    pub op: Op,
    /// Its output schema. A hand-written document may leave it out (or
    /// empty): loading infers it.
    #[serde(default, skip_serializing_if = "is_unset")]
    pub schema: Schema,
}

fn is_unset(s: &Schema) -> bool {
    s.fields.is_empty()
}

/// A whole traced program. See the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ir {
    /// The format version ([`IR_VERSION`]).
    pub ir_version: u32,
    /// The inputs, in order of first use.
    pub inputs: Vec<InputDecl>,
    /// The nodes, in topological order.
    pub nodes: Vec<IrNode>,
    /// The id of the output node.
    pub output: usize,
}

impl Ir {
    /// The flat IR of the DAG ending at `root`.
    pub fn from_root(root: &Arc<Node>) -> Result<Ir> {
        let mut ids: HashMap<*const Node, usize> = HashMap::new();
        let mut nodes: Vec<IrNode> = Vec::new();
        let mut inputs: Vec<InputDecl> = Vec::new();
        // Iterative post-order, so deep pipelines cannot overflow the stack.
        let mut stack: Vec<(Arc<Node>, bool)> = vec![(root.clone(), false)];
        while let Some((node, expanded)) = stack.pop() {
            let key = Arc::as_ptr(&node);
            if ids.contains_key(&key) {
                continue;
            }
            if !expanded {
                stack.push((node.clone(), true));
                for i in node.inputs.iter().rev() {
                    if !ids.contains_key(&Arc::as_ptr(i)) {
                        stack.push((i.clone(), false));
                    }
                }
                continue;
            }
            if let Op::Input { name } = &node.op {
                match inputs.iter().find(|d| d.name == *name) {
                    Some(d) if d.schema != node.schema => {
                        return Err(DatajaxError::trace(
                            "input",
                            format!(
                                "input {name:?} is used with two schemas: {} and {}",
                                d.schema, node.schema
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => inputs.push(InputDecl {
                        name: name.clone(),
                        schema: node.schema.clone(),
                    }),
                }
            }
            let id = nodes.len();
            nodes.push(IrNode {
                id,
                inputs: node
                    .inputs
                    .iter()
                    .map(|i| ids.get(&Arc::as_ptr(i)).copied().unwrap_or(usize::MAX))
                    .collect(),
                op: node.op.clone(),
                schema: node.schema.clone(),
            });
            ids.insert(key, id);
        }
        let output = nodes.len().saturating_sub(1);
        let ir = Ir {
            ir_version: IR_VERSION,
            inputs,
            nodes,
            output,
        };
        ir.check("<trace>")?;
        Ok(ir)
    }

    /// The output schema.
    pub fn output_schema(&self) -> &Schema {
        &self.nodes[self.output].schema
    }

    /// The JSON form, pretty-printed.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Reads and checks an IR document; `origin` names it in errors. Every
    /// node's schema is inferred again and compared with the stored one.
    pub fn from_json(text: &str, origin: &str) -> Result<Ir> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let ir: Ir = serde_path_to_error::deserialize(de).map_err(|e| {
            let inner = e.inner();
            DatajaxError::Ir {
                origin: origin.to_owned(),
                message: format!(
                    "line {} column {}: at {}: {}",
                    inner.line(),
                    inner.column(),
                    e.path(),
                    inner
                ),
            }
        })?;
        let mut ir = ir;
        ir.fill_schemas(origin)?;
        ir.check(origin)?;
        Ok(ir)
    }

    /// Infers the schema of every node that has none (a hand-written
    /// document need only declare its inputs' schemas).
    fn fill_schemas(&mut self, origin: &str) -> Result<()> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].schema.fields.is_empty() {
                continue;
            }
            let n = &self.nodes[i];
            let at = format!("nodes[{i}] ({})", n.op.name());
            let bad = |message: String| DatajaxError::Ir {
                origin: origin.to_owned(),
                message,
            };
            let schema = match &n.op {
                Op::Input { name } => self
                    .inputs
                    .iter()
                    .find(|d| d.name == *name)
                    .map(|d| d.schema.clone())
                    .ok_or_else(|| {
                        bad(format!("{at}: input {name:?} is not declared in inputs"))
                    })?,
                op => {
                    if let Some(j) = n.inputs.iter().find(|&&j| j >= i) {
                        return Err(bad(format!(
                            "{at}: input {j} does not come before it (nodes are in topological order)"
                        )));
                    }
                    let schemas: Vec<&Schema> =
                        n.inputs.iter().map(|&j| &self.nodes[j].schema).collect();
                    infer(op, &schemas).map_err(|e| bad(format!("{at}: {e}")))?
                }
            };
            self.nodes[i].schema = schema;
        }
        Ok(())
    }

    /// Reads an IR file.
    pub fn load(path: &std::path::Path) -> Result<Ir> {
        let text = std::fs::read_to_string(path).map_err(|e| DatajaxError::io(path, e))?;
        Ir::from_json(&text, &path.display().to_string())
    }

    /// Checks the structure and every node's typing.
    pub fn check(&self, origin: &str) -> Result<()> {
        let bad = |message: String| DatajaxError::Ir {
            origin: origin.to_owned(),
            message,
        };
        if self.ir_version != IR_VERSION {
            return Err(bad(format!(
                "ir_version {} is not supported; this build reads version {IR_VERSION}",
                self.ir_version
            )));
        }
        if self.nodes.is_empty() {
            return Err(bad("no nodes".into()));
        }
        if self.output >= self.nodes.len() {
            return Err(bad(format!(
                "output {} is not a node id (0..{})",
                self.output,
                self.nodes.len()
            )));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let at = format!("nodes[{i}] ({})", n.op.name());
            if n.id != i {
                return Err(bad(format!(
                    "{at}: id is {}, must be its position {i}",
                    n.id
                )));
            }
            if n.inputs.len() != n.op.arity() {
                return Err(bad(format!(
                    "{at}: takes {} inputs, lists {}",
                    n.op.arity(),
                    n.inputs.len()
                )));
            }
            if let Some(j) = n.inputs.iter().find(|&&j| j >= i) {
                return Err(bad(format!(
                    "{at}: input {j} does not come before it (nodes are in topological order)"
                )));
            }
            let inferred = match &n.op {
                Op::Input { name } => {
                    let d = self
                        .inputs
                        .iter()
                        .find(|d| d.name == *name)
                        .ok_or_else(|| {
                            bad(format!("{at}: input {name:?} is not declared in inputs"))
                        })?;
                    d.schema.clone()
                }
                op => {
                    let schemas: Vec<&Schema> =
                        n.inputs.iter().map(|&j| &self.nodes[j].schema).collect();
                    infer(op, &schemas).map_err(|e| bad(format!("{at}: {e}")))?
                }
            };
            if inferred != n.schema {
                return Err(bad(format!(
                    "{at}: the stored schema {} differs from the inferred {inferred}",
                    n.schema
                )));
            }
        }
        Ok(())
    }

    /// A readable listing: one line per node with its schema.
    pub fn pretty(&self) -> String {
        let mut out = format!("ir_version {}\n", self.ir_version);
        for d in &self.inputs {
            let _ = writeln!(out, "input {}: {}", d.name, d.schema);
        }
        for n in &self.nodes {
            let ins: Vec<String> = n.inputs.iter().map(|i| format!("%{i}")).collect();
            let _ = writeln!(
                out,
                "%{} = {}({}) -> {}",
                n.id,
                n.op.describe(),
                ins.join(", "),
                n.schema
            );
        }
        let _ = writeln!(out, "output %{}", self.output);
        out
    }
}
