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
