//! Tracing checks columns and types before any data is read, and says what
//! is wrong: the operation, the column, the types, the nearest name.

use datajax::{
    DType, Frame, JoinHow, JoinSpec, Schema, col, count_rows, desc, lag, lit, sum, when,
};

fn events() -> Frame {
    Frame::input(
        "events",
        Schema::of(&[
            ("user", DType::Utf8),
            ("ts", DType::Int64),
            ("v", DType::Int64),
            ("tag", DType::Utf8),
        ])
        .unwrap_or_else(|e| panic!("{e}")),
    )
}

fn error(f: &Frame) -> String {
    match f.schema() {
        Ok(s) => panic!("expected a tracing error, got schema {s}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_unknown_column_names_the_operation_and_the_nearest_column() {
    let e = error(&events().filter(col("usr").eq(lit("a"))));
    assert!(e.starts_with("filter:"), "{e}");
    assert!(e.contains("unknown column \"usr\""), "{e}");
    assert!(e.contains("did you mean \"user\""), "{e}");
    assert!(e.contains("columns: user, ts, v, tag"), "{e}");
    // Nothing near: no suggestion.
    let e = error(&events().select(["price"]));
    assert!(
        e.starts_with("select:") && !e.contains("did you mean"),
        "{e}"
    );
}

#[test]
fn a_type_mismatch_names_the_columns_and_their_types() {
    let e = error(&events().filter(col("v").gt(col("tag"))));
    assert!(
        e.contains("cannot compare") && e.contains("v is int64") && e.contains("tag is utf8"),
        "{e}"
    );
    let e = error(&events().with_column("x", col("tag") + lit(1)));
    assert!(
        e.starts_with("with_column:") && e.contains("arithmetic needs numbers"),
        "{e}"
    );
    let e = error(&events().filter(col("v")));
    assert!(e.contains("predicate v is int64, not bool"), "{e}");
    let e = error(&events().group_by(["user"]).agg([sum("tag")]));
    assert!(
        e.starts_with("group_by.agg:") && e.contains("sum needs numbers"),
        "{e}"
    );
    let e = error(&events().with_column("n", col("v").length()));
    assert!(e.contains("v is int64, not utf8"), "{e}");
    let e =
        error(&events().with_column("c", when(col("v").gt(lit(1)), lit("big")).otherwise(lit(0))));
    assert!(e.contains("case otherwise"), "{e}");
}

#[test]
fn join_errors_name_the_side_and_the_key_types() {
    let other = Frame::input(
        "o",
        Schema::of(&[("user", DType::Int64), ("w", DType::Int64)])
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let e = error(&events().join(&other, ["user"], JoinHow::Inner));
    assert!(
        e.contains("key user is utf8 on the left but user is int64 on the right"),
        "{e}"
    );
    let e = error(&events().join_with(&other, JoinSpec::on_columns(["user"], ["usr"])));
    assert!(
        e.starts_with("join (right):") && e.contains("did you mean \"user\""),
        "{e}"
    );
    // Suffixes that collide with an existing column.
    let o2 = Frame::input(
        "o2",
        Schema::of(&[
            ("user", DType::Utf8),
            ("v", DType::Int64),
            ("v_x", DType::Int64),
        ])
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let e = error(&events().join(&o2, ["user"], JoinHow::Left));
    assert!(e.contains("v_x") && e.contains("suffixes"), "{e}");
}

#[test]
fn the_first_error_survives_the_rest_of_the_pipeline() {
    let f = events()
        .filter(col("nope").gt(lit(1)))
        .group_by(["user"])
        .agg([count_rows()])
        .sort([desc("count")]);
    let e = error(&f);
    assert!(e.starts_with("filter:") && e.contains("nope"), "{e}");
    assert!(f.to_ir().is_err());
}

#[test]
fn window_and_sort_keys_are_checked() {
    let e = error(&events().window([lag("v", 0).over(["user"]).order_by(["ts"])]));
    assert!(e.contains("offset must be >= 1"), "{e}");
    let e = error(&events().sort(["tss"]));
    assert!(
        e.starts_with("sort:") && e.contains("did you mean \"ts\""),
        "{e}"
    );
    let e = error(&events().select([col("v").alias("x"), col("ts").alias("x")]));
    assert!(e.contains("\"x\" would appear twice"), "{e}");
}

#[test]
fn schemas_carry_through_every_operation() {
    let f = events()
        .with_column("big", col("v").gt(lit(5)))
        .with_column("ratio", col("v") / lit(2))
        .rename("tag", "label")
        .cast("ts", DType::Float64);
    let s = f.schema().unwrap_or_else(|e| panic!("{e}"));
    let types: Vec<(String, DType)> = s.fields.iter().map(|f| (f.name.clone(), f.dtype)).collect();
    assert_eq!(
        types,
        [
            ("user".to_owned(), DType::Utf8),
            ("ts".to_owned(), DType::Float64),
            ("v".to_owned(), DType::Int64),
            ("label".to_owned(), DType::Utf8),
            ("big".to_owned(), DType::Bool),
            ("ratio".to_owned(), DType::Float64),
        ]
    );
}
