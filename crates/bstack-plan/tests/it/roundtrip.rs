//! Every valid contract survives JSON -> protobuf -> JSON unchanged, and
//! `validate()` accepts every generated valid value.

use bstack_plan::{Contract, Document, Format, Message, Validate};
use proptest::prelude::*;

use crate::strategies;

/// JSON -> value -> protobuf -> value -> JSON gives back the same text, and
/// the value is valid.
fn round_trip<T: Contract + std::fmt::Debug + PartialEq>(value: T) -> Result<(), TestCaseError> {
    prop_assert_eq!(value.problems(), vec![]);
    let json = value.to_json();
    let parsed = T::from_json(&json, "<json>").map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&parsed, &value);
    let proto = parsed.encode_to_vec();
    let decoded =
        T::decode_proto(&proto, "<proto>").map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&decoded, &value);
    prop_assert_eq!(decoded.to_json(), json);
    // The same through the kind-agnostic document API.
    let doc = Document::from_bytes(&proto, Format::Proto, Some(T::KIND), "<doc>")
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(doc.to_json(), value.to_json());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn weight_manifest(v in strategies::manifest()) { round_trip(v)?; }

    #[test]
    fn cache_plan(v in strategies::cache_plan()) { round_trip(v)?; }

    #[test]
    fn swap_window(v in strategies::swap_window()) { round_trip(v)?; }

    #[test]
    fn swap_plan(v in strategies::swap_plan()) { round_trip(v)?; }

    #[test]
    fn wave_spec(v in strategies::wave_spec()) { round_trip(v)?; }

    /// The digest hashes exactly the encoding of the plan with `digest`
    /// empty and `schema_version` current, whatever the plan holds.
    #[test]
    fn swap_plan_digest_hashes_the_unsealed_encoding(
        mut v in strategies::swap_plan(),
        digest in "[a-z0-9:]{0,80}",
        unset_version in any::<bool>(),
    ) {
        if unset_version {
            v.schema_version = 0;
        }
        let mut unsealed = v.clone();
        unsealed.digest.clear();
        unsealed.schema_version = bstack_plan::SCHEMA_VERSION;
        let expected = format!("blake3:{}", blake3::hash(&unsealed.encode_to_vec()).to_hex());
        v.digest = digest;
        prop_assert_eq!(v.compute_digest(), expected);
    }

    #[test]
    fn addresses_print_back_identically(s in strategies::address()) {
        let parsed: bstack_plan::Address = s.parse().map_err(|e: bstack_plan::AddressError| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.to_string(), s);
    }
}

#[test]
fn unknown_enum_numbers_survive_the_round_trip_and_are_reported() {
    let mut plan = bstack_plan::example::cache_plan();
    plan.ops[0].kind = 42;
    let json = plan.to_json();
    assert!(json.contains("\"kind\": 42"), "{json}");
    let back = bstack_plan::CachePlan::from_json(&json, "<json>").unwrap();
    assert_eq!(back, plan);
    let decoded = bstack_plan::CachePlan::decode_proto(&back.encode_to_vec(), "<proto>").unwrap();
    assert_eq!(decoded, plan);
    assert_eq!(
        plan.problems()[0].to_string(),
        "ops[0].kind: unknown transfer kind 42"
    );
}

/// Lists long enough to be encoded in several parallel windows still hash
/// exactly as the plain encoding.
#[test]
fn digest_of_a_plan_with_long_lists_is_the_plain_encodings() {
    let mut plan = bstack_plan::example::swap_plan();
    let to = plan.to.as_mut().expect("the example has a target");
    let template = to.tensors[0].clone();
    for i in 0..50_000 {
        let mut t = template.clone();
        t.name = format!("t{i:06}");
        to.tensors.push(t);
    }
    let bucket = plan.buckets[0].clone();
    let op = plan.ops.first().cloned().unwrap_or_default();
    for i in 0..20_000u32 {
        let mut b = bucket.clone();
        b.id = 1000 + i;
        plan.buckets.push(b);
        plan.ops.push(op.clone());
    }
    plan.digest = "blake3:stale".into();
    let mut unsealed = plan.clone();
    unsealed.digest.clear();
    let expected = format!(
        "blake3:{}",
        blake3::hash(&unsealed.encode_to_vec()).to_hex()
    );
    assert_eq!(plan.compute_digest(), expected);
}
