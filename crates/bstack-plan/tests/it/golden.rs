//! Golden files: one JSON fixture per contract, parsed and printed back
//! byte-identically, and valid.
//!
//! The fixtures pin the JSON form: field names, order, enum spelling and
//! layout. A change that alters them fails here; if the change is intended,
//! rewrite the fixtures with `BSTACK_BLESS=1 cargo test -p bstack-plan golden`
//! and review the diff.

use std::path::PathBuf;

use bstack_plan::{ContractKind, Document, example};

fn fixture(kind: ContractKind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/golden/{kind}.json"))
}

#[test]
fn fixtures_print_back_byte_identically() {
    if std::env::var_os("BSTACK_BLESS").is_some() {
        for doc in example::all() {
            std::fs::write(fixture(doc.kind()), doc.to_json()).unwrap();
        }
    }
    for kind in ContractKind::ALL {
        let path = fixture(kind);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let doc = Document::from_json(&text, &path.display().to_string()).unwrap();
        assert_eq!(doc.kind(), kind);
        assert_eq!(doc.problems(), vec![], "{kind}");
        assert_eq!(
            doc.to_json(),
            text,
            "{kind} does not print back identically"
        );
    }
}
