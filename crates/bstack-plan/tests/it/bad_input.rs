//! Bad input gets an error that names the place: the file, the line and
//! column, the field path, the contract.

use bstack_plan::{
    CachePlan, Contract, ContractKind, Document, Format, Message, PlanError, SwapWindow, Validate,
    example,
};

fn cache_plan_json() -> String {
    example::cache_plan().to_json()
}

#[test]
fn truncated_protobuf_names_the_contract_and_field() {
    let bytes = example::cache_plan().encode_to_vec();
    let err = CachePlan::decode_proto(&bytes[..bytes.len() - 1], "plan.pb").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PlanError::Proto { .. }), "{err:?}");
    assert!(
        text.starts_with("plan.pb: not a valid cache_plan protobuf message"),
        "{text}"
    );
    assert!(
        text.contains("failed to decode Protobuf message: CachePlan."),
        "{text}"
    );
}

/// Protobuf has no end marker: a cut between two fields decodes to a shorter
/// message. A sealed swap plan's digest catches every such cut, except one
/// that removes only the trailing `schema_version` (tag 15, encoded last),
/// whose absence reads as version 1 and loses nothing.
#[test]
fn every_truncation_of_a_sealed_plan_is_detected() {
    let plan = example::swap_plan();
    let bytes = plan.encode_to_vec();
    assert_eq!(
        &bytes[bytes.len() - 2..],
        [15 << 3, 1],
        "schema_version is encoded last"
    );
    for cut in 0..bytes.len() - 2 {
        if let Ok(partial) = bstack_plan::SwapPlan::decode_proto(&bytes[..cut], "cut") {
            assert!(
                !partial.problems().is_empty(),
                "cut at {cut} decoded to a valid plan"
            );
        }
    }
    let whole = bstack_plan::SwapPlan::decode_proto(&bytes[..bytes.len() - 2], "cut").unwrap();
    assert_eq!(whole, plan);
}

#[test]
fn wrong_schema_version_in_json() {
    let text = cache_plan_json().replace("\"schema_version\": 1", "\"schema_version\": 2");
    let err = Document::from_json(&text, "p.json").unwrap_err();
    assert_eq!(
        err.to_string(),
        "p.json: schema_version: 2 is not supported; this build reads version 1"
    );
    let missing = cache_plan_json().replace("  \"schema_version\": 1,\n", "");
    let err = Document::from_json(&missing, "p.json").unwrap_err();
    assert!(
        err.to_string()
            .contains("schema_version: 0 is not supported"),
        "{err}"
    );
}

#[test]
fn wrong_schema_version_in_protobuf() {
    let mut w = example::swap_window();
    w.schema_version = 9;
    let err = SwapWindow::decode_proto(&w.encode_to_vec(), "w.pb").unwrap_err();
    assert!(
        matches!(err, PlanError::SchemaVersion { found: 9, .. }),
        "{err:?}"
    );
}

#[test]
fn unknown_field_is_named_with_its_path_and_line() {
    let text = cache_plan_json().replacen("\"src_offset\"", "\"src_ofset\"", 2);
    let err = Document::from_json(&text, "p.json").unwrap_err();
    let PlanError::Json {
        path,
        line,
        message,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(path, "ops[0].src_ofset");
    let expected_line = text.lines().position(|l| l.contains("src_ofset")).unwrap() + 1;
    assert_eq!(*line, expected_line);
    assert!(message.contains("unknown field `src_ofset`"), "{message}");
    assert!(
        message.contains("`src_offset`"),
        "the message lists the right names: {message}"
    );
}

#[test]
fn unknown_top_level_field() {
    let text = cache_plan_json().replacen("\"plan_id\"", "\"planid\"", 1);
    let err = Document::from_json(&text, "p.json").unwrap_err();
    let PlanError::Json { path, line, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!((path.as_str(), *line), ("planid", 4), "{err}");
}

#[test]
fn wrong_type_is_named_with_its_path() {
    let text = cache_plan_json().replacen("\"length\": 262144", "\"length\": \"big\"", 1);
    let err = Document::from_json(&text, "p.json").unwrap_err();
    let PlanError::Json { path, message, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(path, "ops[0].length");
    assert!(message.contains("invalid type"), "{message}");
}

#[test]
fn unknown_enum_name_lists_the_names() {
    let text = cache_plan_json().replacen("\"H2D\"", "\"H2X\"", 1);
    let err = Document::from_json(&text, "p.json").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ops[0].kind: unknown crate::TransferKind \"H2X\"")
            || text.contains("ops[0].kind"),
        "{text}"
    );
    assert!(text.contains("STORAGE2H"), "{text}");
}

#[test]
fn missing_or_unknown_kind() {
    let text = cache_plan_json().replacen("  \"kind\": \"cache_plan\",\n", "", 1);
    let err = Document::from_json(&text, "p.json").unwrap_err();
    assert!(
        err.to_string().starts_with("p.json: kind: missing"),
        "{err}"
    );
    let text = cache_plan_json().replacen("\"cache_plan\"", "\"cache_plans\"", 1);
    let err = Document::from_json(&text, "p.json").unwrap_err();
    assert!(
        err.to_string().contains("unknown contract \"cache_plans\""),
        "{err}"
    );
}

#[test]
fn kind_mismatch() {
    let err = SwapWindow::from_json(&cache_plan_json(), "p.json").unwrap_err();
    assert_eq!(
        err.to_string(),
        "p.json: holds a cache_plan, but a swap_window was expected"
    );
}

#[test]
fn malformed_json_has_line_and_column() {
    let err =
        Document::from_json("{\n  \"kind\": \"cache_plan\",\n  oops\n}", "p.json").unwrap_err();
    let PlanError::Json { line, column, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!((line, column), (3, 3));
}

#[test]
fn trailing_data_is_rejected() {
    let text = format!("{}{{}}", cache_plan_json());
    assert!(Document::from_json(&text, "p.json").is_err());
}

#[test]
fn bad_address_is_a_validation_problem_at_its_path() {
    let mut plan = example::cache_plan();
    plan.ops[2].dst = "tier://node0/hbm".into();
    let problems = plan.problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].path, "ops[2].dst");
    assert!(
        problems[0].message.contains("unknown tier \"hbm\""),
        "{}",
        problems[0]
    );
}

#[test]
fn protobuf_needs_a_kind() {
    let bytes = example::cache_plan().encode_to_vec();
    let err = Document::from_bytes(&bytes, Format::Proto, None, "x.pb").unwrap_err();
    assert!(err.to_string().contains("pass --kind"), "{err}");
    assert_eq!(
        ContractKind::from_file_name("out/plan.cache_plan.pb".as_ref()),
        Some(ContractKind::CachePlan)
    );
    assert_eq!(
        ContractKind::from_file_name("v2-manifest.bin".as_ref()),
        Some(ContractKind::WeightManifest)
    );
    assert_eq!(ContractKind::from_file_name("x.pb".as_ref()), None);
}

#[test]
fn failed_write_keeps_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    let doc = example::cache_plan().into_document();
    doc.write(&path, Format::Json).unwrap();
    let before = std::fs::read(&path).unwrap();
    // A directory in the way of the temporary file's rename fails the write.
    let blocked = dir.path().join("blocked.json");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("x"), b"x").unwrap();
    assert!(doc.write(&blocked, Format::Json).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "no temporary file is left behind: {leftovers:?}"
    );
}

#[test]
fn unset_schema_version_round_trips_as_the_current_one() {
    let w = SwapWindow {
        t_start_ns: 1,
        ..Default::default()
    };
    let back = SwapWindow::from_json(&w.to_json(), "w.json").unwrap();
    assert_eq!(back.schema_version, bstack_plan::SCHEMA_VERSION);
    let mut plan = example::swap_plan();
    plan.schema_version = 0;
    plan.seal();
    assert_eq!(plan.problems(), vec![]);
    let decoded = bstack_plan::SwapPlan::decode_proto(&plan.encode_to_vec(), "p.pb").unwrap();
    assert_eq!(
        decoded.problems(),
        vec![],
        "the digest survives the round trip"
    );
}

#[test]
fn protobuf_that_starts_like_json_is_read_as_protobuf() {
    let mut plan = example::cache_plan();
    plan.plan_id = "x".repeat(123); // field 1, length 123: the bytes 0x0A 0x7B, "\n{"
    let bytes = plan.encode_to_vec();
    assert_eq!(&bytes[..2], b"\n{");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("window.cache_plan");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(Document::read(&path, None).unwrap(), plan.into_document());
}

#[test]
fn json_with_a_byte_order_mark_is_read() {
    let text = format!("\u{feff}{}", cache_plan_json());
    let doc = Document::from_bytes(text.as_bytes(), Format::Json, None, "bom.json").unwrap();
    assert_eq!(doc.kind(), ContractKind::CachePlan);
}

#[test]
fn json_that_is_not_an_object() {
    let err = Document::from_json("[\"swap_window\", 1]", "a.json").unwrap_err();
    assert_eq!(
        err.to_string(),
        "a.json: .: expected a JSON object with \"kind\" and \"schema_version\""
    );
}

#[test]
fn dashed_kind_is_only_for_the_command_line() {
    let text = cache_plan_json().replacen("\"cache_plan\"", "\"cache-plan\"", 1);
    assert!(Document::from_json(&text, "p.json").is_err());
    assert_eq!(
        ContractKind::from_name("cache-plan"),
        Some(ContractKind::CachePlan)
    );
}

#[cfg(unix)]
#[test]
fn written_files_have_ordinary_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let doc = example::swap_window().into_document();
    // What a plain create gives under this process's umask.
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let new = dir.path().join("w.json");
    doc.write(&new, Format::Json).unwrap();
    assert_eq!(mode(&new), mode(&plain));
    // Replacing a file keeps its permissions.
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o640)).unwrap();
    doc.write(&new, Format::Proto).unwrap();
    assert_eq!(mode(&new), 0o640);
}

#[test]
fn write_errors_name_the_target_not_the_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("missing/x.pb");
    let err = example::swap_window()
        .into_document()
        .write(&target, Format::Proto)
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with(&target.display().to_string()), "{text}");
    assert_eq!(
        text,
        format!(
            "{}: No such file or directory (os error 2)",
            target.display()
        )
    );
}
