//! `scan`: a fold with explicit carries over ordered rows, and its lowering.
//!
//! As in JAX, the step is a function from the carry (before a row) and the
//! row to the carry after it; tracing calls it once with symbolic carries
//! ([`Carry::get`] gives an [`Expr::Carry`]), so the step is recorded as
//! expressions, and every run starts from `init`: no state is kept between
//! calls. Each row of the output carries the values after that row (JAX's
//! `ys`); [`Scan::run`] also gives the final carry per partition.
//!
//! Lowering picks the fastest exact form:
//!
//! - **window**: when every update is `carry + e`, `max(carry, e)`,
//!   `min(carry, e)`, or `e` alone, with `e` free of carries, the scan is a
//!   running sum / max / min (or a plain column) over the order, which
//!   DataFusion evaluates vectorised and in parallel across partitions. A
//!   null `e` makes a running sum null from there on, exactly as the
//!   sequential fold does.
//! - **sequential**: anything else (a carry that reads another carry, a
//!   product, a conditional reset) runs as a window function that folds the
//!   ordered partition row by row with a small interpreter of the step's
//!   expressions ([`eval`]).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::datatypes::{Field as ArrowField, FieldRef};
use datafusion::common::ScalarValue;
use datafusion::functions_aggregate::{min_max, sum::sum_udaf};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{
    Expr as DfExpr, ExprFunctionExt, LogicalPlan, LogicalPlanBuilder, PartitionEvaluator,
    Signature, Volatility, WindowUDF, WindowUDFImpl, cast, lit as df_lit,
};

use crate::error::{DatajaxError, Result};
use crate::expr::{BinOp, Expr, Scalar, SortKey, StrFunc, col, row_number};
use crate::frame::Frame;
use crate::ir::{CarryInit, CarryUpdate, Op, carry_types};
use crate::lower::{aggregate_window, column, scalar};
use crate::types::{DType, Schema};

/// The symbolic carry a scan step receives.
#[derive(Debug, Clone)]
pub struct Carry {
    names: Vec<String>,
}

impl Carry {
    /// The value of carry `name` before the current row.
    pub fn get(&self, name: &str) -> Expr {
        Expr::Carry { name: name.into() }
    }

    /// The carries' names.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

type Step = Arc<dyn Fn(&Carry) -> Vec<(String, Expr)> + Send + Sync>;

/// A traced fold; see the module documentation and [`scan`].
#[derive(Clone)]
pub struct Scan {
    step: Step,
    init: Vec<CarryInit>,
    order_by: Vec<SortKey>,
    partition_by: Vec<String>,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("init", &self.init)
            .field("order_by", &self.order_by)
            .field("partition_by", &self.partition_by)
            .finish()
    }
}

/// A fold of `step` over rows in `order_by` order, starting from `init`:
///
/// ```
/// use datajax::{Frame, Schema, DType, scan, col, Scalar};
///
/// let f = Frame::input("t", Schema::of(&[("ts", DType::Int64), ("x", DType::Int64)]).unwrap());
/// let running = scan(|c| vec![("total".into(), c.get("total") + col("x"))],
///                    [("total", Scalar::Int64(0))], ["ts"]);
/// let ys = running.apply(&f);
/// assert_eq!(ys.schema().unwrap().names(), ["ts", "x", "total"]);
/// ```
pub fn scan<F, I, N, K, S>(step: F, init: I, order_by: K) -> Scan
where
    F: Fn(&Carry) -> Vec<(String, Expr)> + Send + Sync + 'static,
    I: IntoIterator<Item = (N, Scalar)>,
    N: Into<String>,
    K: IntoIterator<Item = S>,
    S: Into<SortKey>,
{
    Scan {
        step: Arc::new(step),
        init: init
            .into_iter()
            .map(|(n, v)| CarryInit {
                name: n.into(),
                value: v,
            })
            .collect(),
        order_by: order_by.into_iter().map(Into::into).collect(),
        partition_by: Vec::new(),
    }
}

impl Scan {
    /// An independent fold per value of `columns`.
    pub fn by<I, S>(mut self, columns: I) -> Scan
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.partition_by = columns.into_iter().map(Into::into).collect();
        self
    }

    /// Traces the step once and records the scan: the output has every
    /// input column plus each carry's value after the row.
    pub fn apply(&self, frame: &Frame) -> Frame {
        let carry = Carry {
            names: self.init.iter().map(|c| c.name.clone()).collect(),
        };
        let updates = (self.step)(&carry)
            .into_iter()
            .map(|(name, expr)| CarryUpdate { name, expr })
            .collect();
        frame.push(
            Op::Scan {
                init: self.init.clone(),
                updates,
                order_by: self.order_by.clone(),
                partition_by: self.partition_by.clone(),
            },
            &[],
        )
    }

    /// `(final carry, ys)`: the carries after the last row of each
    /// partition (with the partition columns), and [`Scan::apply`]'s output.
    pub fn run(&self, frame: &Frame) -> (Frame, Frame) {
        let ys = self.apply(frame);
        let last = row_number()
            .over(self.partition_by.clone())
            .order_by(self.order_by.iter().map(|k| SortKey {
                descending: !k.descending,
                nulls_first: !k.nulls_first,
                ..k.clone()
            }))
            .alias("__scan_last");
        let mut keep: Vec<Expr> = self.partition_by.iter().map(|c| col(c.as_str())).collect();
        keep.extend(self.init.iter().map(|c| col(c.name.as_str())));
        let carry = ys
            .window([last])
            .filter(col("__scan_last").eq(crate::expr::lit(1u64)))
            .select(keep);
        (carry, ys)
    }
}

/// How one carry lowers to a window function.
enum Form {
    Sum(Expr),
    Max(Expr),
    Min(Expr),
    Plain(Expr),
}

fn window_form(name: &str, e: &Expr) -> Option<Form> {
    let is_self = |x: &Expr| matches!(x, Expr::Carry { name: n } if n == name);
    let free = |x: &Expr| x.carries().is_empty();
    match e.unaliased() {
        e if free(e) => Some(Form::Plain(e.clone())),
        Expr::Binary { op, left, right } => {
            let other = if is_self(left) && free(right) {
                (**right).clone()
            } else if is_self(right) && free(left) {
                (**left).clone()
            } else {
                return None;
            };
            match op {
                BinOp::Add => Some(Form::Sum(other)),
                BinOp::Max => Some(Form::Max(other)),
                BinOp::Min => Some(Form::Min(other)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The plan of a scan node (see the module documentation).
pub(crate) fn lower_scan(
    input: LogicalPlan,
    in_schema: &Schema,
    init: &[CarryInit],
    updates: &[CarryUpdate],
    order_by: &[SortKey],
    partition_by: &[String],
) -> Result<LogicalPlan> {
    let types = carry_types(init, updates, in_schema)?;
    let update = |n: &str| updates.iter().find(|u| u.name == n).map(|u| &u.expr);
    let forms: Option<Vec<Form>> = init
        .iter()
        .map(|c| update(&c.name).and_then(|e| window_form(&c.name, e)))
        .collect();
    let mut out: Vec<DfExpr> = in_schema.names().iter().map(|c| column(c)).collect();
    let mut windows: Vec<(DfExpr, String)> = Vec::new();
    match forms {
        Some(forms) => {
            for ((c, form), (_, t)) in init.iter().zip(forms).zip(&types) {
                let t = t.to_arrow();
                let start = cast(df_lit(scalar(&c.value)), t.clone());
                let ex = |e: &Expr| crate::lower::expr(e, in_schema);
                let w = match &form {
                    Form::Plain(e) => {
                        out.push(cast(ex(e)?, t).alias(&c.name));
                        continue;
                    }
                    Form::Sum(e) => aggregate_window(sum_udaf(), ex(e)?, partition_by, order_by)?,
                    Form::Max(e) => {
                        aggregate_window(min_max::max_udaf(), ex(e)?, partition_by, order_by)?
                    }
                    Form::Min(e) => {
                        aggregate_window(min_max::min_udaf(), ex(e)?, partition_by, order_by)?
                    }
                };
                let wname = w.schema_name().to_string();
                windows.push((w, wname.clone()));
                let running = column(&wname);
                let value = match &form {
                    Form::Sum(e) => {
                        // A null anywhere before poisons the fold, as carry + NULL does.
                        let nulls = aggregate_window(
                            sum_udaf(),
                            datafusion::logical_expr::when(ex(e)?.is_null(), df_lit(1i64))
                                .otherwise(df_lit(0i64))?,
                            partition_by,
                            order_by,
                        )?;
                        let nname = nulls.schema_name().to_string();
                        windows.push((nulls, nname.clone()));
                        datafusion::logical_expr::when(
                            column(&nname).gt(df_lit(0i64)),
                            cast(df_lit(ScalarValue::Null), t.clone()),
                        )
                        .otherwise(start + cast(running, t.clone()))?
                    }
                    Form::Max(_) => datafusion::functions::expr_fn::greatest(vec![
                        start,
                        cast(running, t.clone()),
                    ]),
                    _ => {
                        datafusion::functions::expr_fn::least(vec![start, cast(running, t.clone())])
                    }
                };
                out.push(cast(value, t).alias(&c.name));
            }
        }
        None => {
            let spec = SeqSpec::new(init, updates, &types, in_schema)?;
            let args: Vec<DfExpr> = spec.columns.iter().map(|c| column(c)).collect();
            for (target, c) in init.iter().enumerate() {
                let udwf = WindowUDF::from(SeqScan::new(spec.clone(), target));
                let w = udwf
                    .call(args.clone())
                    .partition_by(partition_by.iter().map(|c| column(c)).collect())
                    .order_by(
                        order_by
                            .iter()
                            .map(|k| column(&k.column).sort(!k.descending, k.nulls_first))
                            .collect(),
                    )
                    .build()?;
                let wname = w.schema_name().to_string();
                windows.push((w, wname.clone()));
                out.push(column(&wname).alias(&c.name));
            }
        }
    }
    let b = if windows.is_empty() {
        LogicalPlanBuilder::from(input)
    } else {
        LogicalPlanBuilder::from(LogicalPlanBuilder::window_plan(
            input,
            windows.into_iter().map(|(w, _)| w),
        )?)
    };
    // Rows come out in scan order, as a fold visits them.
    let mut sort: Vec<datafusion::logical_expr::SortExpr> = partition_by
        .iter()
        .map(|c| column(c).sort(true, false))
        .collect();
    sort.extend(
        order_by
            .iter()
            .map(|k| column(&k.column).sort(!k.descending, k.nulls_first)),
    );
    Ok(b.project(out)?.sort(sort)?.build()?)
}

/// What the sequential fold needs: the step, the carries' types, and the
/// row columns it reads (passed to the window function in this order).
#[derive(Debug, Clone)]
struct SeqSpec {
    init: Vec<CarryInit>,
    updates: Vec<Expr>,
    types: Vec<DType>,
    columns: Vec<String>,
    /// The JSON of the above: the identity of the function for the engine.
    identity: String,
}

impl SeqSpec {
    fn new(
        init: &[CarryInit],
        updates: &[CarryUpdate],
        types: &[(String, DType)],
        schema: &Schema,
    ) -> Result<SeqSpec> {
        let mut columns: Vec<String> = Vec::new();
        let mut ordered = Vec::with_capacity(init.len());
        for c in init {
            let u = updates.iter().find(|u| u.name == c.name).ok_or_else(|| {
                DatajaxError::trace("scan", format!("carry {:?} has no update", c.name))
            })?;
            let mut unsupported = None;
            u.expr.visit(&mut |e| {
                if matches!(e, Expr::DateTrunc { .. }) {
                    unsupported = Some("dt_trunc");
                }
            });
            if let Some(what) = unsupported {
                return Err(DatajaxError::trace(
                    "scan",
                    format!(
                        "{what} inside a sequential scan step is not supported; compute it with with_column before the scan"
                    ),
                ));
            }
            for col in u.expr.columns() {
                schema.require("scan", &col)?;
                if !columns.contains(&col) {
                    columns.push(col);
                }
            }
            ordered.push(u.expr.clone());
        }
        let identity = serde_json::to_string(&(init, &ordered, &columns)).unwrap_or_default();
        Ok(SeqSpec {
            init: init.to_vec(),
            updates: ordered,
            types: types.iter().map(|(_, t)| *t).collect(),
            columns,
            identity,
        })
    }
}

/// The sequential fold as a DataFusion window function that outputs carry
/// `target`.
#[derive(Debug)]
struct SeqScan {
    spec: SeqSpec,
    target: usize,
    name: String,
    signature: Signature,
}

impl SeqScan {
    fn new(spec: SeqSpec, target: usize) -> SeqScan {
        let name = format!(
            "datajax_scan_{}",
            spec.init.get(target).map(|c| c.name.as_str()).unwrap_or("")
        );
        SeqScan {
            spec,
            target,
            name,
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl PartialEq for SeqScan {
    fn eq(&self, other: &Self) -> bool {
        self.spec.identity == other.spec.identity && self.target == other.target
    }
}
impl Eq for SeqScan {}
impl Hash for SeqScan {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.spec.identity.hash(state);
        self.target.hash(state);
    }
}

impl WindowUDFImpl for SeqScan {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(
        &self,
        _args: PartitionEvaluatorArgs,
    ) -> datafusion::error::Result<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(SeqEval {
            spec: self.spec.clone(),
            target: self.target,
        }))
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> datafusion::error::Result<FieldRef> {
        let t = self
            .spec
            .types
            .get(self.target)
            .copied()
            .unwrap_or(DType::Null);
        Ok(Arc::new(ArrowField::new(
            field_args.name(),
            t.to_arrow(),
            true,
        )))
    }
}

#[derive(Debug)]
struct SeqEval {
    spec: SeqSpec,
    target: usize,
}

impl PartitionEvaluator for SeqEval {
    fn evaluate_all(
        &mut self,
        values: &[ArrayRef],
        num_rows: usize,
    ) -> datafusion::error::Result<ArrayRef> {
        let spec = &self.spec;
        let mut carry: Vec<V> = spec.init.iter().map(|c| V::from_scalar(&c.value)).collect();
        let names: Vec<&str> = spec.init.iter().map(|c| c.name.as_str()).collect();
        let mut out = Vec::with_capacity(num_rows);
        let mut row: Vec<V> = vec![V::Null; spec.columns.len()];
        for i in 0..num_rows {
            for (slot, arr) in row.iter_mut().zip(values) {
                *slot = V::from_df(&ScalarValue::try_from_array(arr.as_ref(), i)?);
            }
            let env = Env {
                columns: &spec.columns,
                row: &row,
                carry_names: &names,
                carry: &carry,
            };
            let next: Vec<V> = spec
                .updates
                .iter()
                .map(|u| eval(u, &env))
                .collect::<Result<_>>()
                .map_err(|e| datafusion::error::DataFusionError::Execution(e.to_string()))?;
            carry = next;
            out.push(carry[self.target].to_df(spec.types[self.target]));
        }
        let t = spec.types[self.target].to_arrow();
        if out.is_empty() {
            return Ok(datafusion::arrow::array::new_empty_array(&t));
        }
        let arr = ScalarValue::iter_to_array(out)?;
        Ok(if arr.data_type() == &t {
            arr
        } else {
            datafusion::arrow::compute::cast(&arr, &t)?
        })
    }
}

/// A value of the sequential interpreter.
#[derive(Debug, Clone, PartialEq)]
pub enum V {
    /// Null.
    Null,
    /// Boolean.
    Bool(bool),
    /// Any integer (also dates and timestamps, as their raw counts).
    Int(i128),
    /// Float.
    Float(f64),
    /// String.
    Str(String),
}

impl V {
    fn from_scalar(s: &Scalar) -> V {
        match s {
            Scalar::Null => V::Null,
            Scalar::Bool(b) => V::Bool(*b),
            Scalar::Int64(v) => V::Int(i128::from(*v)),
            Scalar::UInt64(v) => V::Int(i128::from(*v)),
            Scalar::Float64(v) => V::Float(*v),
            Scalar::Utf8(v) => V::Str(v.clone()),
            Scalar::Date32(v) => V::Int(i128::from(*v)),
            Scalar::TimestampUs(v) => V::Int(i128::from(*v)),
        }
    }

    fn from_df(s: &ScalarValue) -> V {
        use ScalarValue as S;
        match s {
            S::Boolean(Some(b)) => V::Bool(*b),
            S::Int8(Some(v)) => V::Int(i128::from(*v)),
            S::Int16(Some(v)) => V::Int(i128::from(*v)),
            S::Int32(Some(v)) => V::Int(i128::from(*v)),
            S::Int64(Some(v)) => V::Int(i128::from(*v)),
            S::UInt8(Some(v)) => V::Int(i128::from(*v)),
            S::UInt16(Some(v)) => V::Int(i128::from(*v)),
            S::UInt32(Some(v)) => V::Int(i128::from(*v)),
            S::UInt64(Some(v)) => V::Int(i128::from(*v)),
            S::Float32(Some(v)) => V::Float(f64::from(*v)),
            S::Float64(Some(v)) => V::Float(*v),
            S::Utf8(Some(v)) | S::LargeUtf8(Some(v)) | S::Utf8View(Some(v)) => V::Str(v.clone()),
            S::Date32(Some(v)) => V::Int(i128::from(*v)),
            S::TimestampSecond(Some(v), _)
            | S::TimestampMillisecond(Some(v), _)
            | S::TimestampMicrosecond(Some(v), _)
            | S::TimestampNanosecond(Some(v), _) => V::Int(i128::from(*v)),
            _ => V::Null,
        }
    }

    fn to_df(&self, t: DType) -> ScalarValue {
        use ScalarValue as S;
        let int = |v: &V| match v {
            V::Int(i) => Some(*i),
            V::Float(f) => Some(*f as i128),
            V::Bool(b) => Some(i128::from(*b)),
            _ => None,
        };
        let float = |v: &V| match v {
            V::Int(i) => Some(*i as f64),
            V::Float(f) => Some(*f),
            _ => None,
        };
        match t {
            DType::Bool => S::Boolean(match self {
                V::Bool(b) => Some(*b),
                _ => None,
            }),
            DType::Int8 => S::Int8(int(self).and_then(|v| i8::try_from(v).ok())),
            DType::Int16 => S::Int16(int(self).and_then(|v| i16::try_from(v).ok())),
            DType::Int32 => S::Int32(int(self).and_then(|v| i32::try_from(v).ok())),
            DType::Int64 => S::Int64(int(self).and_then(|v| i64::try_from(v).ok())),
            DType::UInt8 => S::UInt8(int(self).and_then(|v| u8::try_from(v).ok())),
            DType::UInt16 => S::UInt16(int(self).and_then(|v| u16::try_from(v).ok())),
            DType::UInt32 => S::UInt32(int(self).and_then(|v| u32::try_from(v).ok())),
            DType::UInt64 => S::UInt64(int(self).and_then(|v| u64::try_from(v).ok())),
            DType::Float32 => S::Float32(float(self).map(|v| v as f32)),
            DType::Float64 => S::Float64(float(self)),
            DType::Utf8 => S::Utf8(match self {
                V::Str(s) => Some(s.clone()),
                V::Null => None,
                v => Some(v.text()),
            }),
            DType::Date32 => S::Date32(int(self).and_then(|v| i32::try_from(v).ok())),
            DType::TimestampS => {
                S::TimestampSecond(int(self).and_then(|v| i64::try_from(v).ok()), None)
            }
            DType::TimestampMs => {
                S::TimestampMillisecond(int(self).and_then(|v| i64::try_from(v).ok()), None)
            }
            DType::TimestampUs => {
                S::TimestampMicrosecond(int(self).and_then(|v| i64::try_from(v).ok()), None)
            }
            DType::TimestampNs => {
                S::TimestampNanosecond(int(self).and_then(|v| i64::try_from(v).ok()), None)
            }
            DType::Null | DType::ListInt64 => S::Null,
        }
    }

    fn text(&self) -> String {
        match self {
            V::Null => String::new(),
            V::Bool(b) => b.to_string(),
            V::Int(i) => i.to_string(),
            V::Float(f) => f.to_string(),
            V::Str(s) => s.clone(),
        }
    }
}

/// The names and values visible to one evaluation.
pub struct Env<'a> {
    /// Row column names.
    pub columns: &'a [String],
    /// Row values, pairwise with `columns`.
    pub row: &'a [V],
    /// Carry names.
    pub carry_names: &'a [&'a str],
    /// Carry values before the row.
    pub carry: &'a [V],
}

/// Evaluates a step expression on one row, with SQL null semantics (and
/// `max`/`min` ignoring nulls, as DataFusion's `greatest`/`least` do).
pub fn eval(e: &Expr, env: &Env<'_>) -> Result<V> {
    let ev = |x: &Expr| eval(x, env);
    Ok(match e {
        Expr::Col { name } => env
            .columns
            .iter()
            .position(|c| c == name)
            .map(|i| env.row[i].clone())
            .ok_or_else(|| {
                DatajaxError::trace("scan", format!("column {name:?} is not available"))
            })?,
        Expr::Carry { name } => env
            .carry_names
            .iter()
            .position(|c| c == name)
            .map(|i| env.carry[i].clone())
            .ok_or_else(|| {
                DatajaxError::trace("scan", format!("carry {name:?} is not declared"))
            })?,
        Expr::Lit { value } => V::from_scalar(value),
        Expr::Alias { expr, .. } => ev(expr)?,
        Expr::Binary { op, left, right } => {
            let (l, r) = (ev(left)?, ev(right)?);
            binary(*op, l, r)
        }
        Expr::Not { expr } => match ev(expr)? {
            V::Bool(b) => V::Bool(!b),
            _ => V::Null,
        },
        Expr::Neg { expr } => match ev(expr)? {
            V::Int(i) => V::Int(-i),
            V::Float(f) => V::Float(-f),
            _ => V::Null,
        },
        Expr::IsNull { expr } => V::Bool(ev(expr)? == V::Null),
        Expr::IsNotNull { expr } => V::Bool(ev(expr)? != V::Null),
        Expr::FillNull { expr, value } => match ev(expr)? {
            V::Null => ev(value)?,
            v => v,
        },
        Expr::Cast { expr, to } => {
            let v = ev(expr)?;
            match (v, to) {
                (V::Null, _) => V::Null,
                (V::Str(s), t) if t.is_integer() => {
                    s.trim().parse::<i128>().map(V::Int).unwrap_or(V::Null)
                }
                (V::Str(s), t) if t.is_float() => {
                    s.trim().parse::<f64>().map(V::Float).unwrap_or(V::Null)
                }
                (v, DType::Utf8) => V::Str(v.text()),
                (V::Float(f), t) if t.is_integer() => V::Int(f.trunc() as i128),
                (V::Int(i), t) if t.is_float() => V::Float(i as f64),
                (V::Bool(b), t) if t.is_numeric() => V::Int(i128::from(b)),
                (V::Int(i), DType::Bool) => V::Bool(i != 0),
                (v, _) => v,
            }
        }
        Expr::Case { arms, otherwise } => {
            for a in arms {
                if ev(&a.when)? == V::Bool(true) {
                    return ev(&a.then);
                }
            }
            match otherwise {
                Some(o) => ev(o)?,
                None => V::Null,
            }
        }
        Expr::Str { func, expr, arg } => match ev(expr)? {
            V::Str(s) => {
                let a = arg.clone().unwrap_or_default();
                match func {
                    StrFunc::Contains => V::Bool(s.contains(&a)),
                    StrFunc::StartsWith => V::Bool(s.starts_with(&a)),
                    StrFunc::EndsWith => V::Bool(s.ends_with(&a)),
                    StrFunc::Lower => V::Str(s.to_lowercase()),
                    StrFunc::Upper => V::Str(s.to_uppercase()),
                    StrFunc::Length => V::Int(s.chars().count() as i128),
                }
            }
            _ => V::Null,
        },
        Expr::DateTrunc { .. } => {
            return Err(DatajaxError::trace(
                "scan",
                "dt_trunc is not evaluated inside a scan step",
            ));
        }
    })
}

fn binary(op: BinOp, l: V, r: V) -> V {
    use V::*;
    match op {
        BinOp::And => match (l, r) {
            (Bool(false), _) | (_, Bool(false)) => Bool(false),
            (Bool(true), Bool(true)) => Bool(true),
            _ => Null,
        },
        BinOp::Or => match (l, r) {
            (Bool(true), _) | (_, Bool(true)) => Bool(true),
            (Bool(false), Bool(false)) => Bool(false),
            _ => Null,
        },
        BinOp::Max | BinOp::Min => match (l, r) {
            (Null, v) | (v, Null) => v,
            (a, b) => {
                let ord = compare(&a, &b);
                let take_a = match op {
                    BinOp::Max => ord != Some(std::cmp::Ordering::Less),
                    _ => ord != Some(std::cmp::Ordering::Greater),
                };
                if take_a { a } else { b }
            }
        },
        _ if l == Null || r == Null => Null,
        BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            use std::cmp::Ordering::*;
            match compare(&l, &r) {
                None => Null,
                Some(o) => Bool(match op {
                    BinOp::Eq => o == Equal,
                    BinOp::Ne => o != Equal,
                    BinOp::Lt => o == Less,
                    BinOp::Le => o != Greater,
                    BinOp::Gt => o == Greater,
                    _ => o != Less,
                }),
            }
        }
        BinOp::Div => match (num(&l), num(&r)) {
            (Some(a), Some(b)) if b != 0.0 => Float(a / b),
            _ => Null,
        },
        _ => match (l, r) {
            (Int(a), Int(b)) => match op {
                BinOp::Add => a.checked_add(b).map_or(Null, Int),
                BinOp::Sub => a.checked_sub(b).map_or(Null, Int),
                BinOp::Mul => a.checked_mul(b).map_or(Null, Int),
                _ => a.checked_rem(b).map_or(Null, Int),
            },
            (a, b) => match (num(&a), num(&b)) {
                (Some(a), Some(b)) => Float(match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    _ => a % b,
                }),
                _ => Null,
            },
        },
    }
}

fn num(v: &V) -> Option<f64> {
    match v {
        V::Int(i) => Some(*i as f64),
        V::Float(f) => Some(*f),
        _ => None,
    }
}

fn compare(a: &V, b: &V) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (V::Int(x), V::Int(y)) => Some(x.cmp(y)),
        (V::Str(x), V::Str(y)) => Some(x.cmp(y)),
        (V::Bool(x), V::Bool(y)) => Some(x.cmp(y)),
        _ => num(a)?.partial_cmp(&num(b)?),
    }
}

/// Re-exported for tests of the interpreter against the engine.
pub fn window_lowerable(init: &[CarryInit], updates: &[CarryUpdate]) -> bool {
    init.iter().all(|c| {
        updates
            .iter()
            .find(|u| u.name == c.name)
            .is_some_and(|u| window_form(&c.name, &u.expr).is_some())
    })
}
