//! Column expressions, aggregations, window functions and sort keys: the
//! vocabulary of traced programs.
//!
//! Expressions are plain values (`col("x").gt(lit(1))`), built without any
//! data and typed against a [`Schema`] when an operation records them
//! ([`Expr::dtype`]), so a wrong column or type fails while tracing with the
//! operation, the column and the types in the message.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DatajaxError, Result};
use crate::types::{DType, Schema};

/// A literal value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Scalar {
    /// `NULL` of no particular type.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int64(i64),
    /// An unsigned integer.
    UInt64(u64),
    /// A float.
    Float64(f64),
    /// A string.
    Utf8(String),
    /// A date, in days since the Unix epoch.
    Date32(i32),
    /// A timestamp, in microseconds since the Unix epoch.
    TimestampUs(i64),
}

impl Scalar {
    /// Its type.
    pub fn dtype(&self) -> DType {
        match self {
            Scalar::Null => DType::Null,
            Scalar::Bool(_) => DType::Bool,
            Scalar::Int64(_) => DType::Int64,
            Scalar::UInt64(_) => DType::UInt64,
            Scalar::Float64(_) => DType::Float64,
            Scalar::Utf8(_) => DType::Utf8,
            Scalar::Date32(_) => DType::Date32,
            Scalar::TimestampUs(_) => DType::TimestampUs,
        }
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Null => f.write_str("NULL"),
            Scalar::Bool(v) => write!(f, "{v}"),
            Scalar::Int64(v) => write!(f, "{v}"),
            Scalar::UInt64(v) => write!(f, "{v}"),
            Scalar::Float64(v) => write!(f, "{v}"),
            Scalar::Utf8(v) => write!(f, "{v:?}"),
            Scalar::Date32(v) => write!(f, "date({v})"),
            Scalar::TimestampUs(v) => write!(f, "timestamp_us({v})"),
        }
    }
}

macro_rules! scalar_from {
    ($($t:ty => $v:ident as $c:ty),* $(,)?) => {$(
        impl From<$t> for Scalar {
            fn from(v: $t) -> Scalar {
                Scalar::$v(<$c>::from(v))
            }
        }
    )*};
}
scalar_from!(
    bool => Bool as bool,
    i8 => Int64 as i64, i16 => Int64 as i64, i32 => Int64 as i64, i64 => Int64 as i64,
    u8 => UInt64 as u64, u16 => UInt64 as u64, u32 => UInt64 as u64, u64 => UInt64 as u64,
    f32 => Float64 as f64, f64 => Float64 as f64,
    String => Utf8 as String, &str => Utf8 as String,
);

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (always a float result).
    Div,
    /// `%`
    Mod,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// Logical and.
    And,
    /// Logical or.
    Or,
    /// The greater of the two (`greatest`).
    Max,
    /// The lesser of the two (`least`).
    Min,
}

impl BinOp {
    /// The symbol or name used in messages and `explain`.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Mod => "%",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "and",
            BinOp::Or => "or",
            BinOp::Max => "max",
            BinOp::Min => "min",
        }
    }

    fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
        )
    }
}

/// A string function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrFunc {
    /// Whether the string contains the argument.
    Contains,
    /// Whether the string starts with the argument.
    StartsWith,
    /// Whether the string ends with the argument.
    EndsWith,
    /// Lower case.
    Lower,
    /// Upper case.
    Upper,
    /// Length in characters.
    Length,
}

/// The unit a timestamp is truncated to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncUnit {
    /// Whole seconds.
    Second,
    /// Whole minutes.
    Minute,
    /// Whole hours.
    Hour,
    /// Midnight.
    Day,
    /// Monday midnight.
    Week,
    /// The first of the month.
    Month,
    /// The first of the year.
    Year,
}

impl TruncUnit {
    /// The name DataFusion's `date_trunc` takes.
    pub fn name(self) -> &'static str {
        match self {
            TruncUnit::Second => "second",
            TruncUnit::Minute => "minute",
            TruncUnit::Hour => "hour",
            TruncUnit::Day => "day",
            TruncUnit::Week => "week",
            TruncUnit::Month => "month",
            TruncUnit::Year => "year",
        }
    }
}

/// One `when ... then ...` arm of a [`Expr::Case`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenThen {
    /// The condition (boolean).
    pub when: Expr,
    /// The value where it holds.
    pub then: Expr,
}

/// A column expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Expr {
    /// A column of the input.
    Col {
        /// Its name.
        name: String,
    },
    /// A literal.
    Lit {
        /// The value.
        value: Scalar,
    },
    /// `left op right`.
    Binary {
        /// The operator.
        op: BinOp,
        /// Left operand.
        left: Box<Expr>,
        /// Right operand.
        right: Box<Expr>,
    },
    /// Logical not.
    Not {
        /// The operand.
        expr: Box<Expr>,
    },
    /// Arithmetic negation.
    Neg {
        /// The operand.
        expr: Box<Expr>,
    },
    /// Whether the value is null.
    IsNull {
        /// The operand.
        expr: Box<Expr>,
    },
    /// Whether the value is not null.
    IsNotNull {
        /// The operand.
        expr: Box<Expr>,
    },
    /// The value, or `value` where it is null.
    FillNull {
        /// The operand.
        expr: Box<Expr>,
        /// The replacement.
        value: Box<Expr>,
    },
    /// A type conversion.
    Cast {
        /// The operand.
        expr: Box<Expr>,
        /// The target type.
        to: DType,
    },
    /// The first arm whose condition holds, else `otherwise` (else null).
    Case {
        /// The arms, in order.
        arms: Vec<WhenThen>,
        /// The value when no arm holds.
        otherwise: Option<Box<Expr>>,
    },
    /// A string function.
    Str {
        /// The function.
        func: StrFunc,
        /// The string.
        expr: Box<Expr>,
        /// The argument of `contains` / `starts_with` / `ends_with`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        arg: Option<String>,
    },
    /// A timestamp or date truncated to a unit.
    DateTrunc {
        /// The unit.
        unit: TruncUnit,
        /// The timestamp.
        expr: Box<Expr>,
    },
    /// A named output.
    Alias {
        /// The value.
        expr: Box<Expr>,
        /// The output column name.
        name: String,
    },
    /// The value of a `scan` carry before the current row; only inside a
    /// scan's step (see [`crate::transform::scan`]).
    Carry {
        /// The carry's name.
        name: String,
    },
}

/// A column of the input.
pub fn col(name: impl Into<String>) -> Expr {
    Expr::Col { name: name.into() }
}

/// A literal: `lit(1)`, `lit(2.5)`, `lit("text")`, `lit(true)`.
pub fn lit(value: impl Into<Scalar>) -> Expr {
    Expr::Lit {
        value: value.into(),
    }
}

/// A typed null literal.
pub fn null(dtype: DType) -> Expr {
    Expr::Lit {
        value: Scalar::Null,
    }
    .cast(dtype)
}

/// `CASE WHEN cond THEN value`; continue with [`Case::when`] and finish with
/// [`Case::otherwise`] or [`Case::end`].
pub fn when(cond: Expr, then: Expr) -> Case {
    Case {
        arms: vec![WhenThen { when: cond, then }],
    }
}

/// A `case` under construction.
#[derive(Debug, Clone)]
pub struct Case {
    arms: Vec<WhenThen>,
}

impl Case {
    /// Another arm.
    pub fn when(mut self, cond: Expr, then: Expr) -> Case {
        self.arms.push(WhenThen { when: cond, then });
        self
    }

    /// The value when no arm holds.
    pub fn otherwise(self, value: Expr) -> Expr {
        Expr::Case {
            arms: self.arms,
            otherwise: Some(Box::new(value)),
        }
    }

    /// Null when no arm holds.
    pub fn end(self) -> Expr {
        Expr::Case {
            arms: self.arms,
            otherwise: None,
        }
    }
}

impl From<&str> for Expr {
    /// A column: `select(["a", "b"])`. Use [`lit`] for a string literal.
    fn from(name: &str) -> Expr {
        col(name)
    }
}

impl From<String> for Expr {
    fn from(name: String) -> Expr {
        col(name)
    }
}

macro_rules! binary_methods {
    ($($(#[$doc:meta])* $name:ident => $op:ident),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(self, other: impl Into<Expr>) -> Expr {
            self.binary(BinOp::$op, other.into())
        }
    )*};
}

impl Expr {
    fn binary(self, op: BinOp, other: Expr) -> Expr {
        Expr::Binary {
            op,
            left: Box::new(self),
            right: Box::new(other),
        }
    }

    binary_methods!(
        /// `self == other`.
        eq => Eq,
        /// `self != other`.
        ne => Ne,
        /// `self < other`.
        lt => Lt,
        /// `self <= other`.
        le => Le,
        /// `self > other`.
        gt => Gt,
        /// `self >= other`.
        ge => Ge,
        /// Logical and.
        and => And,
        /// Logical or.
        or => Or,
        /// The greater of the two.
        max_with => Max,
        /// The lesser of the two.
        min_with => Min,
    );

    /// Logical not.
    #[allow(clippy::should_implement_trait)]
    pub fn not(self) -> Expr {
        Expr::Not {
            expr: Box::new(self),
        }
    }

    /// Whether the value is null.
    pub fn is_null(self) -> Expr {
        Expr::IsNull {
            expr: Box::new(self),
        }
    }

    /// Whether the value is not null.
    pub fn is_not_null(self) -> Expr {
        Expr::IsNotNull {
            expr: Box::new(self),
        }
    }

    /// The value, or `value` where it is null.
    pub fn fill_null(self, value: impl Into<Expr>) -> Expr {
        Expr::FillNull {
            expr: Box::new(self),
            value: Box::new(value.into()),
        }
    }

    /// Converted to `to`.
    pub fn cast(self, to: DType) -> Expr {
        Expr::Cast {
            expr: Box::new(self),
            to,
        }
    }

    /// Named `name` in the output.
    pub fn alias(self, name: impl Into<String>) -> Expr {
        Expr::Alias {
            expr: Box::new(self.unaliased().clone()),
            name: name.into(),
        }
    }

    fn str_fn(self, func: StrFunc, arg: Option<String>) -> Expr {
        Expr::Str {
            func,
            expr: Box::new(self),
            arg,
        }
    }

    /// Whether the string contains `needle`.
    pub fn contains(self, needle: impl Into<String>) -> Expr {
        self.str_fn(StrFunc::Contains, Some(needle.into()))
    }

    /// Whether the string starts with `prefix`.
    pub fn starts_with(self, prefix: impl Into<String>) -> Expr {
        self.str_fn(StrFunc::StartsWith, Some(prefix.into()))
    }

    /// Whether the string ends with `suffix`.
    pub fn ends_with(self, suffix: impl Into<String>) -> Expr {
        self.str_fn(StrFunc::EndsWith, Some(suffix.into()))
    }

    /// Lower case.
    pub fn lower(self) -> Expr {
        self.str_fn(StrFunc::Lower, None)
    }

    /// Upper case.
    pub fn upper(self) -> Expr {
        self.str_fn(StrFunc::Upper, None)
    }

    /// Length in characters.
    pub fn length(self) -> Expr {
        self.str_fn(StrFunc::Length, None)
    }

    /// Truncated to `unit` (a timestamp stays a timestamp).
    pub fn dt_trunc(self, unit: TruncUnit) -> Expr {
        Expr::DateTrunc {
            unit,
            expr: Box::new(self),
        }
    }

    /// The expression without its outermost alias.
    pub fn unaliased(&self) -> &Expr {
        match self {
            Expr::Alias { expr, .. } => expr.unaliased(),
            e => e,
        }
    }

    /// The name of the column this expression produces: its alias, the
    /// column it reads, or its printed form.
    pub fn output_name(&self) -> String {
        match self {
            Expr::Alias { name, .. } | Expr::Col { name } => name.clone(),
            e => e.to_string(),
        }
    }

    /// Every column it reads, in order of appearance.
    pub fn columns(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |e| {
            if let Expr::Col { name } = e
                && !out.contains(name)
            {
                out.push(name.clone());
            }
        });
        out
    }

    /// Every carry it reads.
    pub fn carries(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |e| {
            if let Expr::Carry { name } = e
                && !out.contains(name)
            {
                out.push(name.clone());
            }
        });
        out
    }

    /// Calls `f` on this node and every node below it.
    pub fn visit(&self, f: &mut impl FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Col { .. } | Expr::Lit { .. } | Expr::Carry { .. } => {}
            Expr::Binary { left, right, .. } => {
                left.visit(f);
                right.visit(f);
            }
            Expr::Not { expr }
            | Expr::Neg { expr }
            | Expr::IsNull { expr }
            | Expr::IsNotNull { expr }
            | Expr::Cast { expr, .. }
            | Expr::Str { expr, .. }
            | Expr::DateTrunc { expr, .. }
            | Expr::Alias { expr, .. } => expr.visit(f),
            Expr::FillNull { expr, value } => {
                expr.visit(f);
                value.visit(f);
            }
            Expr::Case { arms, otherwise } => {
                for a in arms {
                    a.when.visit(f);
                    a.then.visit(f);
                }
                if let Some(o) = otherwise {
                    o.visit(f);
                }
            }
        }
    }

    /// The expression with every column renamed by `rename` (used when a
    /// transformation rewrites a program).
    pub fn map_columns(&self, rename: &impl Fn(&str) -> String) -> Expr {
        let m = |e: &Expr| Box::new(e.map_columns(rename));
        match self {
            Expr::Col { name } => col(rename(name)),
            Expr::Lit { .. } | Expr::Carry { .. } => self.clone(),
            Expr::Binary { op, left, right } => Expr::Binary {
                op: *op,
                left: m(left),
                right: m(right),
            },
            Expr::Not { expr } => Expr::Not { expr: m(expr) },
            Expr::Neg { expr } => Expr::Neg { expr: m(expr) },
            Expr::IsNull { expr } => Expr::IsNull { expr: m(expr) },
            Expr::IsNotNull { expr } => Expr::IsNotNull { expr: m(expr) },
            Expr::FillNull { expr, value } => Expr::FillNull {
                expr: m(expr),
                value: m(value),
            },
            Expr::Cast { expr, to } => Expr::Cast {
                expr: m(expr),
                to: *to,
            },
            Expr::Case { arms, otherwise } => Expr::Case {
                arms: arms
                    .iter()
                    .map(|a| WhenThen {
                        when: a.when.map_columns(rename),
                        then: a.then.map_columns(rename),
                    })
                    .collect(),
                otherwise: otherwise.as_ref().map(|o| m(o)),
            },
            Expr::Str { func, expr, arg } => Expr::Str {
                func: *func,
                expr: m(expr),
                arg: arg.clone(),
            },
            Expr::DateTrunc { unit, expr } => Expr::DateTrunc {
                unit: *unit,
                expr: m(expr),
            },
            Expr::Alias { expr, name } => Expr::Alias {
                expr: m(expr),
                name: name.clone(),
            },
        }
    }

    /// The type of the value against `schema`, or an error for operation
    /// `op` naming the column and types. `carries` gives the types of scan
    /// carries (empty outside a scan).
    pub fn dtype_with(
        &self,
        schema: &Schema,
        carries: &[(String, DType)],
        op: &str,
    ) -> Result<DType> {
        let ty = |e: &Expr| e.dtype_with(schema, carries, op);
        Ok(match self {
            Expr::Col { name } => schema.require(op, name)?.dtype,
            Expr::Lit { value } => value.dtype(),
            Expr::Carry { name } => carries
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .ok_or_else(|| {
                    DatajaxError::trace(
                        op,
                        format!("carry {name:?} is not declared in the scan's init"),
                    )
                })?,
            Expr::Binary { op: b, left, right } => {
                let (l, r) = (ty(left)?, ty(right)?);
                let mismatch = |what: &str| {
                    DatajaxError::trace(
                        op,
                        format!(
                            "{} {} {}: {what} ({} is {l}, {} is {r})",
                            left,
                            b.symbol(),
                            right,
                            left.output_name(),
                            right.output_name()
                        ),
                    )
                };
                match b {
                    BinOp::And | BinOp::Or => {
                        if !matches!(l, DType::Bool | DType::Null)
                            || !matches!(r, DType::Bool | DType::Null)
                        {
                            return Err(mismatch("both sides must be bool"));
                        }
                        DType::Bool
                    }
                    b if b.is_comparison() => {
                        let u = l
                            .unify(r)
                            .ok_or_else(|| mismatch("cannot compare these types"))?;
                        if !matches!(b, BinOp::Eq | BinOp::Ne)
                            && !u.is_orderable()
                            && u != DType::Null
                        {
                            return Err(mismatch("these values have no order"));
                        }
                        DType::Bool
                    }
                    BinOp::Max | BinOp::Min => {
                        let u = l
                            .unify(r)
                            .ok_or_else(|| mismatch("cannot compare these types"))?;
                        if !u.is_orderable() && u != DType::Null {
                            return Err(mismatch("these values have no order"));
                        }
                        u
                    }
                    BinOp::Div => {
                        if !(l.is_numeric() || l == DType::Null)
                            || !(r.is_numeric() || r == DType::Null)
                        {
                            return Err(mismatch("arithmetic needs numbers"));
                        }
                        DType::Float64
                    }
                    _ => {
                        if !(l.is_numeric() || l == DType::Null)
                            || !(r.is_numeric() || r == DType::Null)
                        {
                            return Err(mismatch("arithmetic needs numbers"));
                        }
                        l.unify(r)
                            .ok_or_else(|| mismatch("arithmetic needs numbers"))?
                    }
                }
            }
            Expr::Not { expr } => {
                let t = ty(expr)?;
                if !matches!(t, DType::Bool | DType::Null) {
                    return Err(DatajaxError::trace(
                        op,
                        format!("not {expr}: {} is {t}, not bool", expr.output_name()),
                    ));
                }
                DType::Bool
            }
            Expr::Neg { expr } => {
                let t = ty(expr)?;
                if !t.is_numeric() {
                    return Err(DatajaxError::trace(
                        op,
                        format!("-{expr}: {} is {t}, not a number", expr.output_name()),
                    ));
                }
                t
            }
            Expr::IsNull { expr } | Expr::IsNotNull { expr } => {
                ty(expr)?;
                DType::Bool
            }
            Expr::FillNull { expr, value } => {
                let (t, v) = (ty(expr)?, ty(value)?);
                t.unify(v).ok_or_else(|| {
                    DatajaxError::trace(
                        op,
                        format!(
                            "fill_null: {} is {t}, the fill value {value} is {v}",
                            expr.output_name()
                        ),
                    )
                })?
            }
            Expr::Cast { expr, to } => {
                let from = ty(expr)?;
                let ok = from == *to
                    || from == DType::Null
                    || (from.is_numeric()
                        && (to.is_numeric() || *to == DType::Utf8 || *to == DType::Bool))
                    || (from == DType::Bool && (to.is_numeric() || *to == DType::Utf8))
                    || (from == DType::Utf8 && *to != DType::ListInt64 && *to != DType::Null)
                    || (from.is_temporal()
                        && (to.is_temporal() || *to == DType::Utf8 || to.is_integer()))
                    || (from.is_integer() && to.is_temporal());
                if !ok {
                    return Err(DatajaxError::trace(
                        op,
                        format!(
                            "cast: {} is {from}, which does not convert to {to}",
                            expr.output_name()
                        ),
                    ));
                }
                *to
            }
            Expr::Case { arms, otherwise } => {
                let mut out = DType::Null;
                for (i, a) in arms.iter().enumerate() {
                    let c = ty(&a.when)?;
                    if !matches!(c, DType::Bool | DType::Null) {
                        return Err(DatajaxError::trace(
                            op,
                            format!("case arm {i}: the condition {} is {c}, not bool", a.when),
                        ));
                    }
                    let t = ty(&a.then)?;
                    out = out.unify(t).ok_or_else(|| {
                        DatajaxError::trace(
                            op,
                            format!(
                                "case arm {i}: the value {} is {t}, the arms before are {out}",
                                a.then
                            ),
                        )
                    })?;
                }
                if let Some(o) = otherwise {
                    let t = ty(o)?;
                    out = out.unify(t).ok_or_else(|| {
                        DatajaxError::trace(
                            op,
                            format!("case otherwise: {o} is {t}, the arms are {out}"),
                        )
                    })?;
                }
                out
            }
            Expr::Str { func, expr, .. } => {
                let t = ty(expr)?;
                if !matches!(t, DType::Utf8 | DType::Null) {
                    return Err(DatajaxError::trace(
                        op,
                        format!(
                            "{func:?}: {} is {t}, not utf8; cast it first",
                            expr.output_name()
                        )
                        .to_lowercase(),
                    ));
                }
                match func {
                    StrFunc::Contains | StrFunc::StartsWith | StrFunc::EndsWith => DType::Bool,
                    StrFunc::Lower | StrFunc::Upper => DType::Utf8,
                    StrFunc::Length => DType::Int32,
                }
            }
            Expr::DateTrunc { unit, expr } => {
                let t = ty(expr)?;
                if !t.is_temporal() {
                    return Err(DatajaxError::trace(
                        op,
                        format!(
                            "dt_trunc({}): {} is {t}, not a date or timestamp",
                            unit.name(),
                            expr.output_name()
                        ),
                    ));
                }
                if t == DType::Date32 {
                    DType::TimestampNs
                } else {
                    t
                }
            }
            Expr::Alias { expr, .. } => ty(expr)?,
        })
    }

    /// [`Expr::dtype_with`] outside a scan.
    pub fn dtype(&self, schema: &Schema, op: &str) -> Result<DType> {
        self.dtype_with(schema, &[], op)
    }
}

macro_rules! operator {
    ($($trait:ident :: $method:ident => $op:ident),* $(,)?) => {$(
        impl std::ops::$trait for Expr {
            type Output = Expr;
            fn $method(self, rhs: Expr) -> Expr {
                self.binary(BinOp::$op, rhs)
            }
        }
    )*};
}
operator!(Add::add => Add, Sub::sub => Sub, Mul::mul => Mul, Div::div => Div, Rem::rem => Mod);

impl std::ops::Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        Expr::Neg {
            expr: Box::new(self),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Col { name } => f.write_str(name),
            Expr::Lit { value } => write!(f, "{value}"),
            Expr::Carry { name } => write!(f, "carry.{name}"),
            Expr::Binary { op, left, right } => match op {
                BinOp::Max | BinOp::Min => write!(f, "{}({left}, {right})", op.symbol()),
                _ => write!(f, "({left} {} {right})", op.symbol()),
            },
            Expr::Not { expr } => write!(f, "not {expr}"),
            Expr::Neg { expr } => write!(f, "-{expr}"),
            Expr::IsNull { expr } => write!(f, "{expr} is null"),
            Expr::IsNotNull { expr } => write!(f, "{expr} is not null"),
            Expr::FillNull { expr, value } => write!(f, "fill_null({expr}, {value})"),
            Expr::Cast { expr, to } => write!(f, "cast({expr} as {to})"),
            Expr::Case { arms, otherwise } => {
                f.write_str("case")?;
                for a in arms {
                    write!(f, " when {} then {}", a.when, a.then)?;
                }
                if let Some(o) = otherwise {
                    write!(f, " else {o}")?;
                }
                f.write_str(" end")
            }
            Expr::Str { func, expr, arg } => {
                let name = serde_json::to_value(func)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                match arg {
                    Some(a) => write!(f, "{name}({expr}, {a:?})"),
                    None => write!(f, "{name}({expr})"),
                }
            }
            Expr::DateTrunc { unit, expr } => write!(f, "dt_trunc({expr}, {})", unit.name()),
            Expr::Alias { expr, name } => write!(f, "{expr} as {name}"),
        }
    }
}

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggFunc {
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Mean,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Number of non-null values (of rows, without a column).
    Count,
    /// Number of distinct non-null values.
    CountDistinct,
    /// The first value (in input order).
    First,
    /// The last value (in input order).
    Last,
}

impl AggFunc {
    /// Its IR name.
    pub fn name(self) -> &'static str {
        match self {
            AggFunc::Sum => "sum",
            AggFunc::Mean => "mean",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
            AggFunc::Count => "count",
            AggFunc::CountDistinct => "count_distinct",
            AggFunc::First => "first",
            AggFunc::Last => "last",
        }
    }
}

/// One aggregation of a `group_by(...).agg([...])`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agg {
    /// The function.
    pub func: AggFunc,
    /// What it aggregates; `None` only for `count()` of rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expr: Option<Expr>,
    /// The output column; default `{func}_{column}` (`count` for rows).
    pub name: String,
    /// The order `first` and `last` follow (and the others ignore). Without
    /// one, `first`/`last` take whichever row the engine meets first, which
    /// with parallel partitions is not defined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order_by: Vec<SortKey>,
}

impl Agg {
    fn of(func: AggFunc, column: &str) -> Agg {
        Agg {
            func,
            expr: Some(col(column)),
            name: format!("{}_{column}", func.name()),
            order_by: Vec::new(),
        }
    }

    /// Named `name` in the output.
    pub fn alias(mut self, name: impl Into<String>) -> Agg {
        self.name = name.into();
        self
    }

    /// `first`/`last` in this order.
    pub fn order_by<I, K>(mut self, keys: I) -> Agg
    where
        I: IntoIterator<Item = K>,
        K: Into<SortKey>,
    {
        self.order_by = keys.into_iter().map(Into::into).collect();
        self
    }

    /// The output type, checking the input type.
    pub fn dtype(&self, schema: &Schema, op: &str) -> Result<DType> {
        for k in &self.order_by {
            let f = schema.require(op, &k.column)?;
            if !f.dtype.is_orderable() {
                return Err(DatajaxError::trace(
                    op,
                    format!(
                        "order by {}: it is {}, which has no order",
                        k.column, f.dtype
                    ),
                ));
            }
        }
        let Some(e) = &self.expr else {
            return Ok(DType::Int64);
        };
        let t = e.dtype(schema, op)?;
        let bad = |what: &str| {
            DatajaxError::trace(
                op,
                format!(
                    "{}({}): {} is {t}; {what}",
                    self.func.name(),
                    e,
                    e.output_name()
                ),
            )
        };
        Ok(match self.func {
            AggFunc::Sum => {
                if !t.is_numeric() {
                    return Err(bad("sum needs numbers"));
                }
                if t.is_float() {
                    DType::Float64
                } else if matches!(
                    t,
                    DType::UInt8 | DType::UInt16 | DType::UInt32 | DType::UInt64
                ) {
                    DType::UInt64
                } else {
                    DType::Int64
                }
            }
            AggFunc::Mean => {
                if !t.is_numeric() {
                    return Err(bad("mean needs numbers"));
                }
                DType::Float64
            }
            AggFunc::Min | AggFunc::Max => {
                if !t.is_orderable() {
                    return Err(bad("it has no order"));
                }
                t
            }
            AggFunc::Count | AggFunc::CountDistinct => DType::Int64,
            AggFunc::First | AggFunc::Last => t,
        })
    }
}

/// `sum(column)`.
pub fn sum(column: &str) -> Agg {
    Agg::of(AggFunc::Sum, column)
}
/// `mean(column)`.
pub fn mean(column: &str) -> Agg {
    Agg::of(AggFunc::Mean, column)
}
/// `min(column)`.
pub fn min(column: &str) -> Agg {
    Agg::of(AggFunc::Min, column)
}
/// `max(column)`.
pub fn max(column: &str) -> Agg {
    Agg::of(AggFunc::Max, column)
}
/// `count(column)`: non-null values.
pub fn count(column: &str) -> Agg {
    Agg::of(AggFunc::Count, column)
}
/// `count()`: rows.
pub fn count_rows() -> Agg {
    Agg {
        func: AggFunc::Count,
        expr: None,
        name: "count".into(),
        order_by: Vec::new(),
    }
}
/// `count_distinct(column)`.
pub fn count_distinct(column: &str) -> Agg {
    Agg::of(AggFunc::CountDistinct, column)
}
/// `first(column)`.
pub fn first(column: &str) -> Agg {
    Agg::of(AggFunc::First, column)
}
/// `last(column)`.
pub fn last(column: &str) -> Agg {
    Agg::of(AggFunc::Last, column)
}

/// One sort key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SortKey {
    /// The column.
    pub column: String,
    /// Largest first.
    #[serde(default)]
    pub descending: bool,
    /// Nulls before values (default: after).
    #[serde(default)]
    pub nulls_first: bool,
}

/// Ascending on `column`, nulls last.
pub fn asc(column: &str) -> SortKey {
    SortKey {
        column: column.into(),
        descending: false,
        nulls_first: false,
    }
}

/// Descending on `column`, nulls last.
pub fn desc(column: &str) -> SortKey {
    SortKey {
        column: column.into(),
        descending: true,
        nulls_first: false,
    }
}

impl From<&str> for SortKey {
    fn from(c: &str) -> SortKey {
        asc(c)
    }
}

/// A window function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "func", rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowFunc {
    /// 1, 2, 3, ... in order within the partition.
    RowNumber,
    /// Rank with gaps for ties.
    Rank,
    /// Running sum of `expr` up to and including the current row.
    CumSum {
        /// What is summed.
        expr: Expr,
    },
    /// The value `offset` rows before (null, or `default`, before the first).
    Lag {
        /// The value.
        expr: Expr,
        /// How many rows back (>= 1).
        offset: u64,
        /// The value where there is no such row.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<Scalar>,
    },
    /// The value `offset` rows after.
    Lead {
        /// The value.
        expr: Expr,
        /// How many rows ahead (>= 1).
        offset: u64,
        /// The value where there is no such row.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<Scalar>,
    },
}

/// A window function over partitions, with its output name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowExpr {
    /// The function.
    pub func: WindowFunc,
    /// Columns that split the rows into independent partitions.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Row order within a partition.
    #[serde(default)]
    pub order_by: Vec<SortKey>,
    /// The output column.
    pub name: String,
}

impl WindowExpr {
    fn new(func: WindowFunc, name: &str) -> WindowExpr {
        WindowExpr {
            func,
            partition_by: Vec::new(),
            order_by: Vec::new(),
            name: name.into(),
        }
    }

    /// Partitioned by `columns`.
    pub fn over<I, S>(mut self, columns: I) -> WindowExpr
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.partition_by = columns.into_iter().map(Into::into).collect();
        self
    }

    /// Ordered by `keys` within each partition.
    pub fn order_by<I, K>(mut self, keys: I) -> WindowExpr
    where
        I: IntoIterator<Item = K>,
        K: Into<SortKey>,
    {
        self.order_by = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Named `name` in the output.
    pub fn alias(mut self, name: impl Into<String>) -> WindowExpr {
        self.name = name.into();
        self
    }

    /// The output type, checking columns and types.
    pub fn dtype(&self, schema: &Schema, op: &str) -> Result<DType> {
        for c in &self.partition_by {
            schema.require(op, c)?;
        }
        for k in &self.order_by {
            let f = schema.require(op, &k.column)?;
            if !f.dtype.is_orderable() {
                return Err(DatajaxError::trace(
                    op,
                    format!(
                        "order by {}: it is {}, which has no order",
                        k.column, f.dtype
                    ),
                ));
            }
        }
        Ok(match &self.func {
            WindowFunc::RowNumber | WindowFunc::Rank => DType::UInt64,
            WindowFunc::CumSum { expr } => {
                let t = expr.dtype(schema, op)?;
                if !t.is_numeric() {
                    return Err(DatajaxError::trace(
                        op,
                        format!(
                            "cum_sum({expr}): {} is {t}, not a number",
                            expr.output_name()
                        ),
                    ));
                }
                if t.is_float() {
                    DType::Float64
                } else {
                    DType::Int64
                }
            }
            WindowFunc::Lag {
                expr,
                offset,
                default,
            }
            | WindowFunc::Lead {
                expr,
                offset,
                default,
            } => {
                if *offset == 0 {
                    return Err(DatajaxError::trace(
                        op,
                        format!("{}: the offset must be >= 1", self.name),
                    ));
                }
                let t = expr.dtype(schema, op)?;
                if let Some(d) = default {
                    t.unify(d.dtype()).ok_or_else(|| {
                        DatajaxError::trace(
                            op,
                            format!(
                                "{}: the default {d} is {}, the value is {t}",
                                self.name,
                                d.dtype()
                            ),
                        )
                    })?
                } else {
                    t
                }
            }
        })
    }
}

/// `row_number()`; chain `.over([...]).order_by([...])`.
pub fn row_number() -> WindowExpr {
    WindowExpr::new(WindowFunc::RowNumber, "row_number")
}

/// `rank()`; chain `.over([...]).order_by([...])`.
pub fn rank() -> WindowExpr {
    WindowExpr::new(WindowFunc::Rank, "rank")
}

/// Running sum of `column`; chain `.over([...]).order_by([...])`.
pub fn cum_sum(column: &str) -> WindowExpr {
    WindowExpr::new(
        WindowFunc::CumSum { expr: col(column) },
        &format!("cum_sum_{column}"),
    )
}

/// `column` from `offset` rows before.
pub fn lag(column: &str, offset: u64) -> WindowExpr {
    WindowExpr::new(
        WindowFunc::Lag {
            expr: col(column),
            offset,
            default: None,
        },
        &format!("lag_{column}"),
    )
}

/// `column` from `offset` rows after.
pub fn lead(column: &str, offset: u64) -> WindowExpr {
    WindowExpr::new(
        WindowFunc::Lead {
            expr: col(column),
            offset,
            default: None,
        },
        &format!("lead_{column}"),
    )
}
