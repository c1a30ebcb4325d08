//! Fixtures: small in-memory tables and their rows as JSON for comparison.

use std::sync::Arc;

use datajax::datafusion;
use datajax::datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datajax::{Engine, Source, Table};
use serde_json::Value;

/// An engine with a few partitions, so plans really run in parallel.
pub fn engine() -> Engine {
    Engine::with_partitions(3).unwrap_or_else(|e| panic!("{e}"))
}

/// `events`: user, ts, v (with a null), price, tag.
pub fn events() -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "user",
            Arc::new(StringArray::from(vec!["a", "a", "b", "b", "b", "c", "a"])) as ArrayRef,
        ),
        (
            "ts",
            Arc::new(Int64Array::from(vec![1, 2, 1, 2, 3, 1, 3])) as ArrayRef,
        ),
        (
            "v",
            Arc::new(Int64Array::from(vec![
                Some(10),
                Some(20),
                Some(5),
                None,
                Some(7),
                Some(1),
                Some(30),
            ])) as ArrayRef,
        ),
        (
            "price",
            Arc::new(Float64Array::from(vec![1.5, 2.5, 1.0, 4.0, 0.5, 9.0, 3.0])) as ArrayRef,
        ),
        (
            "tag",
            Arc::new(StringArray::from(vec![
                Some("Promo"),
                Some("base"),
                None,
                Some("promo-x"),
                Some("BASE"),
                Some("base"),
                Some("promo"),
            ])) as ArrayRef,
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `users`: user, country (one user without events, one event user missing).
pub fn users() -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "user",
            Arc::new(StringArray::from(vec!["a", "b", "d"])) as ArrayRef,
        ),
        (
            "country",
            Arc::new(StringArray::from(vec!["fr", "de", "us"])) as ArrayRef,
        ),
        (
            "v",
            Arc::new(Int64Array::from(vec![100, 200, 300])) as ArrayRef,
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A source of one batch.
pub fn src(b: RecordBatch) -> Source {
    Source::Batches(vec![b])
}

/// The rows as JSON objects (nulls omitted, as Arrow's JSON writer does).
pub fn rows(t: &Table) -> Vec<Value> {
    let mut w = datafusion::arrow::json::ArrayWriter::new(Vec::new());
    for b in &t.batches {
        w.write(b).unwrap_or_else(|e| panic!("{e}"));
    }
    w.finish().unwrap_or_else(|e| panic!("{e}"));
    let buf = w.into_inner();
    if buf.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice(&buf).unwrap_or_else(|e| panic!("{e}"))
}

/// A row's text with its keys sorted, so that sorting rows does not depend
/// on column order.
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{k:?}:{}", canonical(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        v => v.to_string(),
    }
}

/// [`rows`], sorted, for order-free comparisons.
pub fn sorted_rows(t: &Table) -> Vec<Value> {
    let mut r = rows(t);
    r.sort_by_key(canonical);
    r
}

/// Parses JSON rows written inline.
pub fn expect(text: &str) -> Vec<Value> {
    let mut v: Vec<Value> = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    v.sort_by_key(canonical);
    v
}
