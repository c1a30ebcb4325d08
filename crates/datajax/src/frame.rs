//! [`Frame`]: the symbolic DataFrame that programs are written against.
//!
//! A `Frame` holds no data. Each method records one operation, checks it
//! against the schema of its input right away, and returns a new `Frame`;
//! nothing runs until the traced program is lowered and executed (see
//! [`crate::transform::djit`]). Methods do not return `Result`, so pipelines
//! chain the way DataFrame code does:
//!
//! ```
//! use datajax::{Frame, Schema, DType, col, lit, sum};
//!
//! let events = Frame::input("events", Schema::of(&[("k", DType::Utf8), ("x", DType::Int64)]).unwrap());
//! let out = events.filter(col("x").gt(lit(1))).group_by(["k"]).agg([sum("x")]);
//! assert_eq!(out.schema().unwrap().names(), ["k", "sum_x"]);
//!
//! // A mistake is kept, not thrown: the first one surfaces when the frame
//! // is used, naming the operation and suggesting the nearest column.
//! let bad = events.filter(col("xx").gt(lit(1)));
//! let e = bad.schema().unwrap_err().to_string();
//! assert!(e.contains("filter") && e.contains("did you mean \"x\""), "{e}");
//! ```

use std::sync::Arc;

use crate::error::{DatajaxError, Result};
use crate::expr::{Agg, Expr, SortKey, WindowExpr};
use crate::ir::{Ir, JoinHow, Node, Op, Rename, Sharding, infer};
use crate::types::{DType, Schema};

/// A symbolic DataFrame. See the module documentation.
#[derive(Debug, Clone)]
pub struct Frame {
    node: std::result::Result<Arc<Node>, Arc<(String, String)>>,
}

/// The keys and suffixes of a join; see [`Frame::join_with`].
#[derive(Debug, Clone)]
pub struct JoinSpec {
    left_on: Vec<String>,
    right_on: Vec<String>,
    how: JoinHow,
    suffixes: [String; 2],
}

impl JoinSpec {
    /// Keys with the same names on both sides.
    pub fn on<I, S>(keys: I) -> JoinSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let keys: Vec<String> = keys.into_iter().map(Into::into).collect();
        JoinSpec {
            left_on: keys.clone(),
            right_on: keys,
            how: JoinHow::Inner,
            suffixes: ["_x".into(), "_y".into()],
        }
    }

    /// Keys with different names: `left_on[i]` matches `right_on[i]`.
    pub fn on_columns<I, J, S, T>(left_on: I, right_on: J) -> JoinSpec
    where
        I: IntoIterator<Item = S>,
        J: IntoIterator<Item = T>,
        S: Into<String>,
        T: Into<String>,
    {
        JoinSpec {
            left_on: left_on.into_iter().map(Into::into).collect(),
            right_on: right_on.into_iter().map(Into::into).collect(),
            how: JoinHow::Inner,
            suffixes: ["_x".into(), "_y".into()],
        }
    }

    /// How rows match (default inner).
    pub fn how(mut self, how: JoinHow) -> JoinSpec {
        self.how = how;
        self
    }

    /// Suffixes for non-key columns present on both sides (default `_x`,
    /// `_y`).
    pub fn suffixes(mut self, left: &str, right: &str) -> JoinSpec {
        self.suffixes = [left.into(), right.into()];
        self
    }
}

/// A frame grouped by keys, waiting for its aggregations.
#[derive(Debug, Clone)]
pub struct GroupBy {
    frame: Frame,
    keys: Vec<String>,
}

impl GroupBy {
    /// One row per distinct key with `aggs` (the keys come first).
    pub fn agg(&self, aggs: impl IntoIterator<Item = Agg>) -> Frame {
        self.frame.push(
            Op::Aggregate {
                keys: self.keys.clone(),
                aggs: aggs.into_iter().collect(),
            },
            &[],
        )
    }
}

impl Frame {
    /// A named input with `schema`; data is bound to the name at run time.
    pub fn input(name: impl Into<String>, schema: Schema) -> Frame {
        Frame {
            node: Ok(Arc::new(Node {
                op: Op::Input { name: name.into() },
                inputs: Vec::new(),
                schema,
            })),
        }
    }

    /// A frame that is only the error `e` (for transformations that fail).
    pub(crate) fn from_error(e: DatajaxError) -> Frame {
        let (op, message) = match e {
            DatajaxError::Trace { op, message } => (op, message),
            e => ("trace".to_owned(), e.to_string()),
        };
        Frame {
            node: Err(Arc::new((op, message))),
        }
    }

    /// The frame's output schema, or the first tracing error.
    pub fn schema(&self) -> Result<Schema> {
        self.node().map(|n| n.schema.clone())
    }

    /// The recorded node, or the first tracing error.
    pub fn node(&self) -> Result<&Arc<Node>> {
        self.node
            .as_ref()
            .map_err(|e| DatajaxError::trace(&e.0, e.1.clone()))
    }

    /// The IR of everything recorded up to this frame.
    pub fn to_ir(&self) -> Result<Ir> {
        Ir::from_root(self.node()?)
    }

    /// A frame of `op` on `self` and `others`, or the first error.
    pub(crate) fn push(&self, op: Op, others: &[&Frame]) -> Frame {
        let result = (|| {
            let mut inputs = vec![self.node()?.clone()];
            for o in others {
                inputs.push(o.node()?.clone());
            }
            let schemas: Vec<&Schema> = inputs.iter().map(|n| &n.schema).collect();
            let schema = infer(&op, &schemas)?;
            Ok::<_, DatajaxError>(Arc::new(Node { op, inputs, schema }))
        })();
        Frame {
            node: result.map_err(|e| match e {
                DatajaxError::Trace { op, message } => Arc::new((op, message)),
                e => Arc::new(("trace".to_owned(), e.to_string())),
            }),
        }
    }

    /// Only these columns or expressions, in this order.
    pub fn select<I, E>(&self, exprs: I) -> Frame
    where
        I: IntoIterator<Item = E>,
        E: Into<Expr>,
    {
        self.push(
            Op::Select {
                exprs: exprs.into_iter().map(Into::into).collect(),
            },
            &[],
        )
    }

    /// The rows where `predicate` holds (null counts as false).
    pub fn filter(&self, predicate: Expr) -> Frame {
        self.push(Op::Filter { predicate }, &[])
    }

    /// Adds column `name` (or replaces it in place).
    pub fn with_column(&self, name: &str, expr: Expr) -> Frame {
        self.push(
            Op::WithColumn {
                name: name.into(),
                expr,
            },
            &[],
        )
    }

    /// Renames `from` to `to`.
    pub fn rename(&self, from: &str, to: &str) -> Frame {
        self.rename_all([(from, to)])
    }

    /// Several renamings at once.
    pub fn rename_all<'a>(&self, mapping: impl IntoIterator<Item = (&'a str, &'a str)>) -> Frame {
        self.push(
            Op::Rename {
                mapping: mapping
                    .into_iter()
                    .map(|(f, t)| Rename {
                        from: f.into(),
                        to: t.into(),
                    })
                    .collect(),
            },
            &[],
        )
    }

    /// Column `column` converted to `to`, in place.
    pub fn cast(&self, column: &str, to: DType) -> Frame {
        self.with_column(column, crate::expr::col(column).cast(to))
    }

    /// Joined with `other` on same-named `keys`.
    pub fn join<I, S>(&self, other: &Frame, keys: I, how: JoinHow) -> Frame
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.join_with(other, JoinSpec::on(keys).how(how))
    }

    /// Joined with `other` as `spec` says (keys with other names, suffixes).
    pub fn join_with(&self, other: &Frame, spec: JoinSpec) -> Frame {
        self.push(
            Op::Join {
                how: spec.how,
                left_on: spec.left_on,
                right_on: spec.right_on,
                suffixes: spec.suffixes,
            },
            &[other],
        )
    }

    /// Grouped by `keys`; finish with [`GroupBy::agg`].
    pub fn group_by<I, S>(&self, keys: I) -> GroupBy
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        GroupBy {
            frame: self.clone(),
            keys: keys.into_iter().map(Into::into).collect(),
        }
    }

    /// Aggregations over the whole frame: one row.
    pub fn agg(&self, aggs: impl IntoIterator<Item = Agg>) -> Frame {
        self.group_by(Vec::<String>::new()).agg(aggs)
    }

    /// Ordered by `keys` (`"col"`, `asc("col")`, `desc("col")`).
    pub fn sort<I, K>(&self, keys: I) -> Frame
    where
        I: IntoIterator<Item = K>,
        K: Into<SortKey>,
    {
        self.push(
            Op::Sort {
                keys: keys.into_iter().map(Into::into).collect(),
            },
            &[],
        )
    }

    /// The first `n` rows.
    pub fn limit(&self, n: u64) -> Frame {
        self.push(Op::Limit { n, offset: 0 }, &[])
    }

    /// `n` rows after skipping `offset`.
    pub fn slice(&self, offset: u64, n: u64) -> Frame {
        self.push(Op::Limit { n, offset }, &[])
    }

    /// Duplicate rows removed.
    pub fn distinct(&self) -> Frame {
        self.push(Op::Distinct, &[])
    }

    /// The rows of `self` and `other` (columns matched by name).
    pub fn union(&self, other: &Frame) -> Frame {
        self.push(Op::Union, &[other])
    }

    /// Window functions added as columns.
    pub fn window(&self, exprs: impl IntoIterator<Item = WindowExpr>) -> Frame {
        self.push(
            Op::Window {
                exprs: exprs.into_iter().collect(),
            },
            &[],
        )
    }

    /// Redistributed as `sharding` says (see [`crate::transform::pjit`]).
    pub fn repartition(&self, sharding: Sharding) -> Frame {
        self.push(Op::Repartition { sharding }, &[])
    }
}
