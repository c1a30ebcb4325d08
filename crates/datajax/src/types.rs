//! The type system of traced programs: column types, fields and schemas.
//!
//! A traced program never sees data, only [`Schema`]s, so every operation
//! can check its columns and types while it is being recorded. The types are
//! a deliberately small, engine-neutral subset of Arrow's, spelled in the IR
//! JSON as plain strings (`"int64"`, `"utf8"`, `"timestamp_us"`), so an IR
//! file reads without knowing Arrow. [`DType::to_arrow`] and
//! [`DType::from_arrow`] convert at the engine seam.

use std::fmt;

use datafusion::arrow::datatypes::{
    DataType, Field as ArrowField, Schema as ArrowSchema, TimeUnit,
};
use serde::{Deserialize, Serialize};

use crate::error::{DatajaxError, Result};

/// A column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// The type of a bare `NULL` literal; it unifies with every type.
    Null,
    /// `true` / `false`.
    Bool,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 16-bit integer.
    Int16,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// Unsigned 8-bit integer.
    UInt8,
    /// Unsigned 16-bit integer.
    UInt16,
    /// Unsigned 32-bit integer.
    UInt32,
    /// Unsigned 64-bit integer.
    UInt64,
    /// 32-bit float.
    Float32,
    /// 64-bit float.
    Float64,
    /// UTF-8 string.
    Utf8,
    /// Days since the Unix epoch.
    Date32,
    /// Seconds since the Unix epoch, no time zone.
    TimestampS,
    /// Milliseconds since the Unix epoch, no time zone.
    TimestampMs,
    /// Microseconds since the Unix epoch, no time zone.
    TimestampUs,
    /// Nanoseconds since the Unix epoch, no time zone.
    TimestampNs,
    /// A list of 64-bit integers (for example a request's prefix block ids).
    ListInt64,
}

impl DType {
    /// Whether arithmetic applies.
    pub fn is_numeric(self) -> bool {
        self.is_integer() || self.is_float()
    }

    /// Whether it is an integer type.
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            DType::Int8
                | DType::Int16
                | DType::Int32
                | DType::Int64
                | DType::UInt8
                | DType::UInt16
                | DType::UInt32
                | DType::UInt64
        )
    }

    /// Whether it is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::Float32 | DType::Float64)
    }

    /// Whether it is a date or a timestamp.
    pub fn is_temporal(self) -> bool {
        matches!(
            self,
            DType::Date32
                | DType::TimestampS
                | DType::TimestampMs
                | DType::TimestampUs
                | DType::TimestampNs
        )
    }

    /// Whether values of this type can be ordered (compared with `<`).
    pub fn is_orderable(self) -> bool {
        self.is_numeric() || self.is_temporal() || matches!(self, DType::Utf8 | DType::Bool)
    }

    /// The type both `self` and `other` convert to without loss of meaning,
    /// as in a comparison, arithmetic or a union; `None` if they do not mix.
    pub fn unify(self, other: DType) -> Option<DType> {
        use DType::*;
        if self == other {
            return Some(self);
        }
        match (self, other) {
            (Null, t) | (t, Null) => Some(t),
            (a, b) if a.is_float() || b.is_float() => {
                (a.is_numeric() && b.is_numeric()).then_some(Float64)
            }
            (a, b) if a.is_integer() && b.is_integer() => {
                let signed = |t: DType| matches!(t, Int8 | Int16 | Int32 | Int64);
                if signed(a) == signed(b) {
                    Some(if a.width() >= b.width() { a } else { b })
                } else {
                    Some(Int64)
                }
            }
            (a, b) if a.is_temporal() && b.is_temporal() => Some(TimestampNs),
            _ => None,
        }
    }

    /// Byte width of an integer type (1 for the others); for [`DType::unify`].
    fn width(self) -> u8 {
        match self {
            DType::Int16 | DType::UInt16 => 2,
            DType::Int32 | DType::UInt32 | DType::Float32 => 4,
            DType::Int64 | DType::UInt64 | DType::Float64 => 8,
            _ => 1,
        }
    }

    /// The Arrow type.
    pub fn to_arrow(self) -> DataType {
        match self {
            DType::Null => DataType::Null,
            DType::Bool => DataType::Boolean,
            DType::Int8 => DataType::Int8,
            DType::Int16 => DataType::Int16,
            DType::Int32 => DataType::Int32,
            DType::Int64 => DataType::Int64,
            DType::UInt8 => DataType::UInt8,
            DType::UInt16 => DataType::UInt16,
            DType::UInt32 => DataType::UInt32,
            DType::UInt64 => DataType::UInt64,
            DType::Float32 => DataType::Float32,
            DType::Float64 => DataType::Float64,
            DType::Utf8 => DataType::Utf8,
            DType::Date32 => DataType::Date32,
            DType::TimestampS => DataType::Timestamp(TimeUnit::Second, None),
            DType::TimestampMs => DataType::Timestamp(TimeUnit::Millisecond, None),
            DType::TimestampUs => DataType::Timestamp(TimeUnit::Microsecond, None),
            DType::TimestampNs => DataType::Timestamp(TimeUnit::Nanosecond, None),
            DType::ListInt64 => DataType::List(std::sync::Arc::new(ArrowField::new(
                "item",
                DataType::Int64,
                true,
            ))),
        }
    }

    /// The datajax type of an Arrow type; `None` for types datajax does not
    /// trace (the caller names the column).
    pub fn from_arrow(t: &DataType) -> Option<DType> {
        Some(match t {
            DataType::Null => DType::Null,
            DataType::Boolean => DType::Bool,
            DataType::Int8 => DType::Int8,
            DataType::Int16 => DType::Int16,
            DataType::Int32 => DType::Int32,
            DataType::Int64 => DType::Int64,
            DataType::UInt8 => DType::UInt8,
            DataType::UInt16 => DType::UInt16,
            DataType::UInt32 => DType::UInt32,
            DataType::UInt64 => DType::UInt64,
            DataType::Float16 | DataType::Float32 => DType::Float32,
            DataType::Float64 => DType::Float64,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DType::Utf8,
            DataType::Date32 | DataType::Date64 => DType::Date32,
            DataType::Timestamp(TimeUnit::Second, _) => DType::TimestampS,
            DataType::Timestamp(TimeUnit::Millisecond, _) => DType::TimestampMs,
            DataType::Timestamp(TimeUnit::Microsecond, _) => DType::TimestampUs,
            DataType::Timestamp(TimeUnit::Nanosecond, _) => DType::TimestampNs,
            DataType::List(f) | DataType::LargeList(f)
                if DType::from_arrow(f.data_type()).is_some_and(|t| t.is_integer()) =>
            {
                DType::ListInt64
            }
            _ => return None,
        })
    }

    /// The IR spelling (`int64`, `utf8`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Null => "null",
            DType::Bool => "bool",
            DType::Int8 => "int8",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::UInt8 => "uint8",
            DType::UInt16 => "uint16",
            DType::UInt32 => "uint32",
            DType::UInt64 => "uint64",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
            DType::Utf8 => "utf8",
            DType::Date32 => "date32",
            DType::TimestampS => "timestamp_s",
            DType::TimestampMs => "timestamp_ms",
            DType::TimestampUs => "timestamp_us",
            DType::TimestampNs => "timestamp_ns",
            DType::ListInt64 => "list_int64",
        }
    }

    /// Every type, for messages that list them.
    pub const ALL: [DType; 19] = [
        DType::Null,
        DType::Bool,
        DType::Int8,
        DType::Int16,
        DType::Int32,
        DType::Int64,
        DType::UInt8,
        DType::UInt16,
        DType::UInt32,
        DType::UInt64,
        DType::Float32,
        DType::Float64,
        DType::Utf8,
        DType::Date32,
        DType::TimestampS,
        DType::TimestampMs,
        DType::TimestampUs,
        DType::TimestampNs,
        DType::ListInt64,
    ];

    /// The type named `name` (its IR spelling).
    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One column of a schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// Column name.
    pub name: String,
    /// Column type.
    pub dtype: DType,
    /// Whether the column may hold nulls.
    #[serde(default = "yes")]
    pub nullable: bool,
}

fn yes() -> bool {
    true
}

impl Field {
    /// A nullable column.
    pub fn new(name: impl Into<String>, dtype: DType) -> Field {
        Field {
            name: name.into(),
            dtype,
            nullable: true,
        }
    }
}

/// The columns of a frame, in order. Names are unique.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Schema {
    /// The columns.
    pub fields: Vec<Field>,
}

impl Schema {
    /// A schema of `fields`; duplicate names are an error naming `op`.
    pub fn new(fields: Vec<Field>, op: &str) -> Result<Schema> {
        for (i, f) in fields.iter().enumerate() {
            if fields[..i].iter().any(|g| g.name == f.name) {
                return Err(DatajaxError::trace(
                    op,
                    format!(
                        "column {:?} would appear twice in the output; rename one side",
                        f.name
                    ),
                ));
            }
        }
        Ok(Schema { fields })
    }

    /// A schema from `(name, type)` pairs, every column nullable.
    pub fn of(cols: &[(&str, DType)]) -> Result<Schema> {
        Schema::new(
            cols.iter().map(|(n, t)| Field::new(*n, *t)).collect(),
            "schema",
        )
    }

    /// The column named `name`.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The column named `name`, or an error for operation `op` that lists
    /// the columns and suggests the nearest name.
    pub fn require(&self, op: &str, name: &str) -> Result<&Field> {
        self.field(name).ok_or_else(|| {
            let names: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
            DatajaxError::trace(op, unknown_column(name, &names))
        })
    }

    /// Column names in order.
    pub fn names(&self) -> Vec<&str> {
        self.fields.iter().map(|f| f.name.as_str()).collect()
    }

    /// The Arrow schema.
    pub fn to_arrow(&self) -> ArrowSchema {
        ArrowSchema::new(
            self.fields
                .iter()
                .map(|f| ArrowField::new(&f.name, f.dtype.to_arrow(), f.nullable))
                .collect::<Vec<_>>(),
        )
    }

    /// The datajax schema of an Arrow schema; `origin` names it in errors.
    pub fn from_arrow(schema: &ArrowSchema, origin: &str) -> Result<Schema> {
        let mut fields = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            let dtype = DType::from_arrow(f.data_type()).ok_or_else(|| {
                DatajaxError::Input(format!(
                    "{origin}: column {:?} has Arrow type {}, which datajax does not trace; \
                     cast it to one of: {}",
                    f.name(),
                    f.data_type(),
                    DType::ALL.map(DType::name).join(", ")
                ))
            })?;
            fields.push(Field {
                name: f.name().clone(),
                dtype,
                nullable: f.is_nullable(),
            });
        }
        Schema::new(fields, origin)
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cols: Vec<String> = self
            .fields
            .iter()
            .map(|c| format!("{}: {}", c.name, c.dtype))
            .collect();
        write!(f, "[{}]", cols.join(", "))
    }
}

/// "unknown column X; did you mean Y? (columns: ...)".
pub fn unknown_column(name: &str, names: &[&str]) -> String {
    let mut text = format!("unknown column {name:?}");
    if let Some(near) = nearest(name, names) {
        text.push_str(&format!("; did you mean {near:?}?"));
    }
    text.push_str(&format!(" (columns: {})", names.join(", ")));
    text
}

/// The name in `names` nearest to `name` by edit distance, if it is near
/// enough to be a likely typo (at most a third of the name's length, and at
/// least 1 edit; case differences count as half).
pub fn nearest<'a>(name: &str, names: &[&'a str]) -> Option<&'a str> {
    let budget = (name.chars().count() / 3).max(1) * 2;
    names
        .iter()
        .map(|n| (edit_distance(name, n), *n))
        .filter(|(d, _)| *d <= budget)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Levenshtein distance, doubled, with a substitution that differs only in
/// case costing 1 instead of 2.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).map(|j| j * 2).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![(i + 1) * 2; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = if ca == cb {
                0
            } else if ca.eq_ignore_ascii_case(cb) {
                1
            } else {
                2
            };
            cur[j + 1] = (prev[j] + sub).min(prev[j + 1] + 2).min(cur[j] + 2);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_names_are_suggested_and_far_ones_are_not() {
        let names = ["user_id", "tokens", "ts"];
        assert_eq!(nearest("user", &names), None);
        assert_eq!(nearest("usr_id", &names), Some("user_id"));
        assert_eq!(nearest("Tokens", &names), Some("tokens"));
        assert_eq!(nearest("price", &names), None);
    }

    #[test]
    fn types_unify_as_arithmetic_would() {
        assert_eq!(DType::Int32.unify(DType::Int64), Some(DType::Int64));
        assert_eq!(DType::Int32.unify(DType::Float32), Some(DType::Float64));
        assert_eq!(DType::Null.unify(DType::Utf8), Some(DType::Utf8));
        assert_eq!(DType::Utf8.unify(DType::Int64), None);
        for t in DType::ALL {
            assert_eq!(DType::parse(t.name()), Some(t));
            assert_eq!(DType::from_arrow(&t.to_arrow()), Some(t));
        }
    }
}
