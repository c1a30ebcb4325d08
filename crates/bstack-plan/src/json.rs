//! The JSON form of the contracts.
//!
//! A JSON document is one contract object with two extra leading keys:
//! `"kind"` (which contract, e.g. `"cache_plan"`) and `"schema_version"`. Field
//! names are the protobuf names (snake_case); enums are written by name
//! (`"H2D"`); integers are JSON numbers; absent fields read as their protobuf
//! default; unknown fields are errors that name the field and its path.
//!
//! Enum fields are stored as `i32` by prost. An enum number this build does
//! not know is written as a number rather than dropped, so JSON <-> protobuf
//! stays lossless, and `validate()` reports it.
//!
//! Reading takes two passes over the text: the first reads only `kind` and
//! `schema_version` (skipping everything else cheaply), the second parses the
//! contract those name, tracking the path so errors can say `ops[3].length`.

use serde::Serialize;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess};

use crate::error::{PlanError, Result};

/// Defines a serde `with` module that writes a prost enum field by name and
/// reads it from a name or a number.
macro_rules! enum_by_name {
    ($(#[$doc:meta])* $module:ident, $enum:ty, $what:literal) => {$(#[$doc])*
        pub mod $module {
            use serde::{Deserializer, Serializer};

            /// Writes the enum's protobuf name, or the number if it has none.
            pub fn serialize<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
                match <$enum>::try_from(*value) {
                    Ok(known) => s.serialize_str(known.as_str_name()),
                    Err(_) => s.serialize_i32(*value),
                }
            }

            /// Reads a protobuf name or an `i32`.
            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                d.deserialize_any(super::EnumVisitor {
                    what: $what,from_name: |name| <$enum>::from_str_name(name).map(|v| v as i32),
                    names: || {
                        (0..=255).filter_map(|i| <$enum>::try_from(i).ok())
                            .map(|v| v.as_str_name())
                            .collect()
                    },
                })
            }
        }
    };
}

enum_by_name!(
    /// `WeightManifest.hash_algorithm` by name (`"BLAKE3"`).
        hash_algorithm,
    crate::HashAlgorithm,
    "hash algorithm"
);
enum_by_name!(
    /// `TransferOp.kind` by name (`"H2D"`).
        transfer_kind,
    crate::TransferKind,
    "transfer kind"
);
/// Reads an enum field from its name or its number.
struct EnumVisitor {
    what: &'static str,
    from_name: fn(&str) -> Option<i32>,
    names: fn() -> Vec<&'static str>,
}

impl de::Visitor<'_> for EnumVisitor {
    type Value = i32;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a {} name ({})", self.what, (self.names)().join(", "))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<i32, E> {
        (self.from_name)(v).ok_or_else(|| {
            E::custom(format!(
                "unknown {} {v:?}; expected one of {}",
                self.what,
                (self.names)().join(", ")
            ))
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i32, E> {
        i32::try_from(v).map_err(|_| E::custom(format!("{} number {v} is out of range", self.what)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i32, E> {
        i32::try_from(v).map_err(|_| E::custom(format!("{} number {v} is out of range", self.what)))
    }
}

/// The two keys every JSON document starts with.
#[derive(serde::Deserialize)]
pub(crate) struct Header {
    pub kind: Option<String>,
    pub schema_version: Option<u64>,
}

/// Reads the document header, skipping the rest of the document.
pub(crate) fn read_header(text: &str, origin: &str) -> Result<Header> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(origin, e))
}

/// Parses a contract of type `T` from a document whose header was checked,
/// skipping the `kind` key.
pub(crate) fn read_body<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value: WithoutKind<T> =
        serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(origin, e))?;
    de.end().map_err(|e| PlanError::Json {
        origin: origin.to_owned(),
        path: ".".to_owned(),
        line: e.line(),
        column: e.column(),
        message: strip_position(&e),
    })?;
    Ok(value.0)
}

/// Writes `value` as a pretty JSON document led by `"kind": kind`, ending in a newline.
pub(crate) fn write_document<T: Serialize>(kind: &str, value: &T) -> String {
    // Serializing a prost struct cannot fail: every field is a string, an
    // integer, a bool, a vector or an option of those, and enum fields write
    // numbers they do not know as numbers. An empty body is never produced.
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".to_owned());
    let fields = body.strip_prefix("{\n").unwrap_or("}");
    let mut out = String::with_capacity(body.len() + kind.len() + 16);
    out.push_str("{\n  \"kind\": \"");
    out.push_str(kind);
    out.push('"');
    if fields == "}" {
        out.push_str("\n}");
    } else {
        out.push_str(",\n");
        out.push_str(fields);
    }
    out.push('\n');
    out
}

fn json_error(origin: &str, e: serde_path_to_error::Error<serde_json::Error>) -> PlanError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    PlanError::Json {
        origin: origin.to_owned(),
        path,
        line: inner.line(),
        column: inner.column(),
        message: strip_position(&inner),
    }
}

/// serde_json appends " at line L column C" to its messages; the error
/// already carries both, so the message is kept without them.
fn strip_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix)
        .map(str::to_owned)
        .unwrap_or(text)
}

/// A contract deserialized from a map that may also hold a `kind` key.
///
/// The generated structs reject unknown fields, and `kind` is not one of
/// theirs; this wrapper hands them the map with `kind` filtered out, while the
/// underlying streaming deserializer keeps line numbers and paths intact.
struct WithoutKind<T>(T);

impl<'de, T: de::Deserialize<'de>> de::Deserialize<'de> for WithoutKind<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Outer<T>(std::marker::PhantomData<T>);
        impl<'de, T: de::Deserialize<'de>> de::Visitor<'de> for Outer<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(SkipKind(map)))
            }
        }
        d.deserialize_map(Outer(std::marker::PhantomData))
            .map(WithoutKind)
    }
}

/// Map access that drops the `kind` entry.
///
/// The key is read inside the underlying (path-tracking) key deserializer, so
/// an unknown top-level field is reported with its name as the path.
struct SkipKind<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkipKind<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = Some(seed);
        loop {
            match self.0.next_key_seed(KeyFilter(&mut seed))? {
                None => return Ok(None),
                Some(Some(key)) => return Ok(Some(key)),
                // The `kind` entry: its value was checked by the header pass.
                Some(None) => {
                    self.0.next_value::<de::IgnoredAny>()?;
                }
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(seed)
    }
}

/// Reads a key; `None` for `kind`, otherwise the inner seed's value. The
/// seed is only used up when the key is not `kind`.
struct KeyFilter<'a, K>(&'a mut Option<K>);

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for KeyFilter<'_, K> {
    type Value = Option<K::Value>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let key = <String as de::Deserialize>::deserialize(d)?;
        if key == "kind" {
            return Ok(None);
        }
        let seed = self
            .0
            .take()
            .ok_or_else(|| de::Error::custom("map key read twice"))?;
        let key: de::value::StringDeserializer<D::Error> = key.into_deserializer();
        seed.deserialize(key).map(Some)
    }
}
