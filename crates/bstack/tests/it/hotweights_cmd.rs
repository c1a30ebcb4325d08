//! `bstack hotweights publish` (alias `hw`): a real safetensors file in, a
//! manifest that validates out; corrupt input is one error line and exit 2.

use serde_json::Value;

use crate::common::{Run, Sandbox};

/// Runs `bstack ALIAS publish --checkpoint ck ARGS...`.
fn publish(sandbox: &Sandbox, alias: &str, args: &[&str]) -> Run {
    let mut all = vec![alias, "publish", "--checkpoint", "ck"];
    all.extend_from_slice(args);
    sandbox.run(&all)
}

/// Writes `ck/model.safetensors` (one F32 tensor of `elements`) and `ck/config.json`.
fn checkpoint(sandbox: &Sandbox, elements: usize) {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{elements}],"data_offsets":[0,{}]}}}}"#,
        elements * 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend((0..elements * 4).map(|i| (i % 251) as u8));
    sandbox.write("ck/model.safetensors", bytes);
    sandbox.write("ck/config.json", br#"{"model_type": "tiny"}"#);
}

#[test]
fn publish_writes_a_manifest_that_validates() {
    let sandbox = Sandbox::empty();
    checkpoint(&sandbox, 600_000); // 2.4 MB: three 1 MiB chunks
    let run = publish(
        &sandbox,
        "hw",
        &["--version", "v1", "--chunk-mib", "1", "-o", "m.json"],
    );
    run.code(0)
        .quiet_stderr()
        .stdout_has("tensors")
        .stdout_has("m.json");
    let m = sandbox.read_json("m.json");
    assert_eq!(m["kind"], "weight_manifest");
    assert_eq!(m["model_id"], "ck");
    assert_eq!(m["tensors"][0]["chunks"].as_array().map(Vec::len), Some(3));
    sandbox
        .run(&["plan", "validate", "m.json"])
        .code(0)
        .stdout_has("valid weight_manifest");
}

#[test]
fn publish_without_output_prints_the_manifest() {
    let sandbox = Sandbox::empty();
    checkpoint(&sandbox, 1000);
    let run = publish(
        &sandbox,
        "hotweights",
        &["--version", "v2", "--model-id", "tiny"],
    );
    run.code(0).quiet_stderr();
    let m: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}{run}"));
    assert_eq!(
        (m["model_id"].as_str(), m["version"].as_str()),
        (Some("tiny"), Some("v2"))
    );
    // Deterministic: the same directory, the same bytes.
    let again = publish(
        &sandbox,
        "hotweights",
        &["--version", "v2", "--model-id", "tiny"],
    );
    assert_eq!(run.stdout, again.stdout);
}

#[test]
fn publish_protobuf_needs_a_file() {
    let sandbox = Sandbox::empty();
    checkpoint(&sandbox, 10);
    let run = publish(&sandbox, "hw", &["--version", "v1", "--format", "proto"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("-o"), "{run}");
    publish(
        &sandbox,
        "hw",
        &[
            "--version",
            "v1",
            "--format",
            "proto",
            "-o",
            "m.weight_manifest.pb",
        ],
    )
    .code(0);
    sandbox
        .run(&["plan", "validate", "m.weight_manifest.pb"])
        .code(0);
}

#[test]
fn corrupt_checkpoint_is_one_error_line() {
    let sandbox = Sandbox::empty();
    checkpoint(&sandbox, 100);
    let mut bytes = sandbox.read("ck/model.safetensors");
    bytes.truncate(bytes.len() - 4);
    sandbox.write("ck/model.safetensors", bytes);
    let run = publish(&sandbox, "hw", &["--version", "v1"]);
    run.code(2).quiet_stdout();
    assert!(
        run.error_line()
            .contains("ck/model.safetensors: not a valid safetensors file"),
        "{run}"
    );
    let run = publish(&sandbox, "hw", &["--version", "v1", "--chunk-mib", "0"]);
    run.code(2);
}
