//! `bstack hotweights` (alias `hw`) rollouts through the real binary: plan,
//! verify-plan, apply, commit, rollback, status, gc and export on generated
//! sharded checkpoints; bad input; crashes injected with `BSTACK_FAILPOINT`
//! at every step that changes a store; and a store whose writes fail
//! (`ulimit -f`, so writes get EFBIG as on a full disk).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use hotweights::synth::{Dtype, SynthModel};
use serde_json::{Value, json};

use crate::common::{Run, Sandbox};

/// Checkpoint directories of the two versions.
const V1: &str = "ck/v1";
const V2: &str = "ck/v2";
/// The store every test fills.
const STORE: &str = "S";
/// The tensor that v2 drops.
const REMOVED: &str = "model.layers.0.post_attention_layernorm.weight";
/// SIGABRT, what a failpoint dies of.
const SIGABRT: i32 = 6;

/// A sandbox with two versions of a small decoder (about 5 MiB each, two
/// shards), their manifests `v1.json` and `v2.json` (1 MiB chunks, model id
/// `synth`) and `plan.json`, the plan from v1 to v2 with transfer ops from
/// [`V2`], in 1 MiB buckets.
///
/// v2 is a realistic step: an optimizer nudge of one layer's MLP (sparse
/// changes), a rewritten head (two whole chunks), a removed norm (which
/// moves a tensor from the second shard to the first) and an added tensor.
fn rollout() -> Sandbox {
    let sandbox = Sandbox::empty();
    let v1 = SynthModel::decoder(2, 256, 3072, 1);
    let mut v2 = v1.clone();
    assert!(v2.nudge_where(0.001, 7, |n| n.starts_with("model.layers.1.mlp.")) > 0);
    assert!(v2.rewrite("lm_head.weight", 9));
    assert!(v2.remove(REMOVED));
    v2.add("model.extra.weight", Dtype::BF16, &[256, 256], 3);
    for (model, dir) in [(&v1, V1), (&v2, V2)] {
        model
            .write(&sandbox.path(dir), 2)
            .unwrap_or_else(|e| panic!("writing {dir}: {e}"));
    }
    for (version, dir) in [("v1", V1), ("v2", V2)] {
        let out = format!("{version}.json");
        hw(
            &sandbox,
            &[
                "publish",
                "--checkpoint",
                dir,
                "--version",
                version,
                "--model-id",
                "synth",
                "--chunk-mib",
                "1",
                "-o",
                &out,
            ],
        )
        .code(0);
    }
    hw(
        &sandbox,
        &[
            "plan",
            "--prev",
            "v1.json",
            "--next",
            "v2.json",
            "--source",
            V2,
            "--bucket-mib",
            "1",
            "-o",
            "plan.json",
        ],
    )
    .code(0);
    sandbox
}

/// Runs `bstack hw ARGS`.
fn hw(sandbox: &Sandbox, args: &[&str]) -> Run {
    let mut all = vec!["hw"];
    all.extend_from_slice(args);
    sandbox.run(&all)
}

/// Runs `bstack --json hw ARGS`, asserts success and returns its JSON.
#[track_caller]
fn hw_json(sandbox: &Sandbox, args: &[&str]) -> Value {
    let mut all = vec!["--json", "hw"];
    all.extend_from_slice(args);
    let run = sandbox.run(&all);
    run.code(0).quiet_stderr();
    run.json()
}

/// Imports v1 into [`STORE`] and makes it current.
#[track_caller]
fn store_at_v1(sandbox: &Sandbox) {
    let out = hw_json(
        sandbox,
        &[
            "apply",
            "--store",
            STORE,
            "--manifest",
            "v1.json",
            "--source",
            V1,
        ],
    );
    assert_eq!(
        out["report"]["chunks_written"],
        json!(chunk_hashes(sandbox, &["v1.json"]).len()),
        "{out}"
    );
    hw(sandbox, &["commit", "--store", STORE, "--version", "v1"]).code(0);
}

/// [`store_at_v1`], then v2 applied by the plan (not committed).
#[track_caller]
fn store_with_v2_applied(sandbox: &Sandbox) {
    store_at_v1(sandbox);
    hw(sandbox, &["apply", "--store", STORE, "--plan", "plan.json"]).code(0);
}

/// [`store_with_v2_applied`], then v2 committed: current v2, history [v1].
#[track_caller]
fn store_at_v2(sandbox: &Sandbox) {
    store_with_v2_applied(sandbox);
    hw(sandbox, &["commit", "--store", STORE]).code(0);
    let s = status(sandbox);
    assert_eq!(
        (&s["current"], &s["history"]),
        (&json!("v2"), &json!(["v1"]))
    );
}

/// `hw status --store S --json`: must succeed whatever state the store is in.
#[track_caller]
fn status(sandbox: &Sandbox) -> Value {
    hw_json(sandbox, &["status", "--store", STORE])["status"].clone()
}

/// The versions a status lists.
fn versions(status: &Value) -> Vec<&str> {
    status["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("no versions list: {status}"))
        .iter()
        .map(|v| v["version"].as_str().unwrap_or_default())
        .collect()
}

/// What a status says interrupted operations left, joined.
fn interrupted(status: &Value) -> String {
    status["interrupted"]
        .as_array()
        .unwrap_or_else(|| panic!("no interrupted list: {status}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Every (is_file, entry, chunk index) of a manifest, with its hash and
/// length.
fn chunk_keys(sandbox: &Sandbox, manifest: &str) -> BTreeMap<(bool, String, u64), (String, u64)> {
    let m = sandbox.read_json(manifest);
    let mut out = BTreeMap::new();
    for (list, is_file, name) in [("tensors", false, "name"), ("files", true, "path")] {
        for entry in m[list].as_array().into_iter().flatten() {
            for c in entry["chunks"].as_array().into_iter().flatten() {
                let key = (
                    is_file,
                    entry[name].as_str().unwrap_or_default().to_owned(),
                    c["index"].as_u64().unwrap_or_default(),
                );
                let value = (
                    c["hash"].as_str().unwrap_or_default().to_owned(),
                    c["length"].as_u64().unwrap_or_default(),
                );
                out.insert(key, value);
            }
        }
    }
    assert!(!out.is_empty(), "{manifest} has no chunks");
    out
}

/// The distinct chunk hashes of some manifests: what a store holding
/// exactly those versions holds.
fn chunk_hashes(sandbox: &Sandbox, manifests: &[&str]) -> BTreeSet<String> {
    manifests
        .iter()
        .flat_map(|m| chunk_keys(sandbox, m).into_values().map(|(hash, _)| hash))
        .collect()
}

/// The chunks of v2 that v1 lacks (new entries, or a different hash), with
/// their lengths: what the plan must stage.
fn changed_chunks(sandbox: &Sandbox) -> Vec<u64> {
    let old = chunk_keys(sandbox, "v1.json");
    chunk_keys(sandbox, "v2.json")
        .into_iter()
        .filter(|(key, (hash, _))| old.get(key).map(|(h, _)| h) != Some(hash))
        .map(|(_, (_, length))| length)
        .collect()
}

/// Every file under `dir`, by relative path, with its bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("listing {}: {e}", d.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("listing {}: {e}", d.display()))
                .path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                out.insert(rel, bytes);
            }
        }
    }
    out
}

/// Asserts that directories `a` and `b` of the sandbox hold the same files
/// with the same bytes.
#[track_caller]
fn assert_same_tree(sandbox: &Sandbox, a: &str, b: &str) {
    let (ta, tb) = (tree(&sandbox.path(a)), tree(&sandbox.path(b)));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{a} and {b} hold different files"
    );
    for (name, bytes) in &ta {
        assert!(
            *bytes == tb[name],
            "{a}/{name} and {b}/{name} differ ({} and {} bytes)",
            bytes.len(),
            tb[name].len()
        );
    }
}

/// Exports `version` (the current one if `None`) to the new directory
/// `out` and asserts that it is byte-identical to `checkpoint`.
#[track_caller]
fn assert_exports(sandbox: &Sandbox, version: Option<&str>, out: &str, checkpoint: &str) {
    let mut args = vec!["export", "--store", STORE, "-o", out];
    if let Some(v) = version {
        args.extend(["--version", v]);
    }
    hw(sandbox, &args)
        .code(0)
        .quiet_stderr()
        .stdout_has("wrote version");
    assert_same_tree(sandbox, out, checkpoint);
}

/// Asserts that the store is clean and holds exactly `retained` (with
/// these manifests): no interrupted operation, no temporary file, and no
/// chunk that none of them references.
#[track_caller]
fn assert_clean(sandbox: &Sandbox, retained: &[&str]) {
    let s = status(sandbox);
    assert_eq!(interrupted(&s), "", "leftovers: {s}");
    assert_eq!(versions(&s), retained, "{s}");
    let manifests: Vec<String> = retained.iter().map(|v| format!("{v}.json")).collect();
    let manifests: Vec<&str> = manifests.iter().map(String::as_str).collect();
    assert_eq!(
        s["chunks"],
        json!(chunk_hashes(sandbox, &manifests).len()),
        "chunks no retained version references are left: {s}"
    );
    for leftover in ["journal.json", "state.json.tmp"] {
        assert!(
            !sandbox.exists(&format!("{STORE}/{leftover}")),
            "{leftover}"
        );
    }
    let tmp = std::fs::read_dir(sandbox.path(&format!("{STORE}/tmp")))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("listing {STORE}/tmp: {e}"));
    assert_eq!(tmp, 0, "files left in {STORE}/tmp");
}

/// The store's status, after checking its current version and rollback
/// history.
#[track_caller]
fn assert_current(sandbox: &Sandbox, current: &Value, history: &Value) -> Value {
    let s = status(sandbox);
    assert_eq!((&s["current"], &s["history"]), (current, history), "{s}");
    s
}

/// Runs `bstack hw ARGS` with failpoint `failpoint` armed and asserts that
/// the process died of it (SIGABRT, after saying so).
#[track_caller]
fn crash(sandbox: &Sandbox, failpoint: &str, args: &[&str]) {
    let mut all = vec!["hw"];
    all.extend_from_slice(args);
    let (run, signal) = sandbox.run_env(&[("BSTACK_FAILPOINT", failpoint)], &all);
    assert_eq!(
        run.code, None,
        "the failpoint did not kill the process{run}"
    );
    assert_eq!(signal, Some(SIGABRT), "expected death by SIGABRT{run}");
    let name = failpoint.split('@').next().unwrap_or(failpoint);
    assert!(
        run.stderr.contains(&format!("failpoint {name} reached")),
        "died elsewhere than at {failpoint}{run}"
    );
}

#[test]
fn a_rollout_from_plan_to_gc() {
    let sandbox = rollout();
    let changed = changed_chunks(&sandbox);
    let total = chunk_keys(&sandbox, "v2.json").len();
    assert!(changed.len() >= 5 && changed.len() < total, "{changed:?}");

    // Plan: a summary table, or the same figures as JSON.
    let plan = [
        "plan",
        "--prev",
        "v1.json",
        "--next",
        "v2.json",
        "--source",
        V2,
        "--prev-source",
        V1,
        "--bucket-mib",
        "1",
        "-o",
        "plan.json",
    ];
    hw(&sandbox, &plan)
        .code(0)
        .quiet_stderr()
        .stdout_has("plan.json (synth:v1->v2)")
        .stdout_has(&format!("{} of {total} chunks", changed.len()))
        .stdout_has("wire bytes")
        .stdout_has("with sparse deltas")
        .stdout_has(REMOVED);
    let p = hw_json(&sandbox, &plan);
    let staged: u64 = changed.iter().sum();
    assert_eq!(p["plan"], "plan.json", "{p}");
    assert_eq!(p["delta"]["chunks_changed"], json!(changed.len()), "{p}");
    assert_eq!(p["delta"]["chunks_total"], json!(total), "{p}");
    assert_eq!(p["delta"]["removed_tensors"], json!([REMOVED]), "{p}");
    assert_eq!(p["delta"]["tensors"]["added"]["count"], 1, "{p}");
    assert_eq!(p["buckets"]["staged_bytes"], json!(staged), "{p}");
    assert_eq!(p["buckets"]["bucket_limit"], json!(1 << 20), "{p}");
    assert!(p["buckets"]["buckets"].as_u64() >= Some(3), "{p}");
    assert!(
        p["buckets"]["largest_bucket"].as_u64() <= Some(1 << 20),
        "{p}"
    );
    assert!(p["buckets"]["ops"].as_u64() >= Some(1), "{p}");
    let wire = &p["wire"];
    assert_eq!(wire["full_bytes"], json!(staged), "{p}");
    assert!(wire["delta_bytes"].as_u64() < Some(staged), "{p}");
    // The three nudged MLP chunks go as sparse deltas; the rewritten head
    // and the new tensor cannot.
    assert!(wire["delta_chunks"].as_u64() >= Some(3), "{p}");
    assert!(wire["full_chunks"].as_u64() >= Some(3), "{p}");
    assert_eq!(
        wire["delta_chunks"].as_u64().unwrap_or_default()
            + wire["full_chunks"].as_u64().unwrap_or_default(),
        changed.len() as u64,
        "{p}"
    );

    // Verify: against the right manifests, and the wrong way round.
    hw(
        &sandbox,
        &[
            "verify-plan",
            "plan.json",
            "--manifest-prev",
            "v1.json",
            "--manifest-next",
            "v2.json",
            "--bucket-mib",
            "1",
        ],
    )
    .code(0)
    .quiet_stderr()
    .stdout_has("plan.json: ok");
    let swapped = hw(
        &sandbox,
        &[
            "verify-plan",
            "plan.json",
            "--manifest-prev",
            "v2.json",
            "--manifest-next",
            "v1.json",
        ],
    );
    swapped
        .code(1)
        .stdout_has("plan.json: from.version: is \"v1\", the manifest given says \"v2\"")
        .stdout_has("plan.json: to.version: is \"v2\", the manifest given says \"v1\"");

    // Import v1, commit it, apply the plan: only the changed chunks move.
    store_at_v1(&sandbox);
    let applied = hw_json(
        &sandbox,
        &["apply", "--store", STORE, "--plan", "plan.json"],
    );
    let r = &applied["report"];
    assert_eq!(r["version"], "v2", "{applied}");
    assert_eq!(r["chunks_written"], json!(changed.len()), "{applied}");
    assert_eq!(r["bytes_written"], json!(staged), "{applied}");
    assert_eq!(
        r["chunks_shared"],
        json!(total - changed.len()),
        "{applied}"
    );
    let s = status(&sandbox);
    assert_eq!(s["current"], "v1", "apply must not change current: {s}");
    assert_eq!(versions(&s), ["v1", "v2"], "{s}");

    // Commit defaults to the version last applied.
    hw(&sandbox, &["commit", "--store", STORE])
        .code(0)
        .quiet_stderr()
        .stdout_has("current is now \"v2\" (was \"v1\")");
    assert_exports(&sandbox, None, "out/v2", V2);
    assert_exports(&sandbox, Some("v1"), "out/v1", V1);
    let table = hw(&sandbox, &["status", "--store", STORE]);
    table.code(0).quiet_stderr().stdout_has("current: v2");
    let roles: Vec<(&str, &str)> = table
        .stdout_lines()
        .into_iter()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('┆').map(|c| c.trim_matches(['│', ' '])).collect();
            (cells.len() == 6 && cells[0] != "version").then(|| (cells[0], cells[1]))
        })
        .collect();
    assert_eq!(roles, [("v1", "previous"), ("v2", "current")], "{table}");

    // Rollback, then forward again.
    hw(&sandbox, &["rollback", "--store", STORE])
        .code(0)
        .stdout_has("rolled back to \"v1\" (from \"v2\")");
    let s = assert_current(&sandbox, &json!("v1"), &json!([]));
    assert_eq!(interrupted(&s), "", "{s}");
    assert_exports(&sandbox, None, "out/v1-again", V1);
    hw(&sandbox, &["commit", "--store", STORE, "--version", "v2"]).code(0);

    // gc without history: v1 and the chunks only it used go.
    let only_v1 = chunk_hashes(&sandbox, &["v1.json"])
        .difference(&chunk_hashes(&sandbox, &["v2.json"]))
        .count();
    assert!(only_v1 > 0);
    let g = hw_json(&sandbox, &["gc", "--store", STORE, "--keep", "0"]);
    assert_eq!(g["gc"]["versions_removed"], json!(["v1"]), "{g}");
    assert_eq!(g["gc"]["chunks_removed"], json!(only_v1), "{g}");
    assert_eq!(g["gc"]["leftovers_removed"], 0, "{g}");
    assert_clean(&sandbox, &["v2"]);
    assert_exports(&sandbox, None, "out/v2-after-gc", V2);
    let run = hw(&sandbox, &["rollback", "--store", STORE]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("no previous version"), "{run}");
    // A second gc finds nothing to do.
    let g = hw_json(&sandbox, &["gc", "--store", STORE, "--keep", "0"]);
    assert_eq!(
        (&g["gc"]["chunks_removed"], &g["gc"]["chunks_kept"]),
        (&json!(0), &json!(total)),
        "{g}"
    );
}

#[test]
fn verify_plan_lists_every_problem_of_a_tampered_plan() {
    let sandbox = rollout();
    sandbox.write(
        "tp.json",
        r#"{"model.layers.*.mlp.*": [0, 1], "lm_head.*": [2]}"#,
    );
    hw(
        &sandbox,
        &[
            "plan",
            "--prev",
            "v1.json",
            "--next",
            "v2.json",
            "--source",
            V2,
            "--bucket-mib",
            "1",
            "--tp-groups",
            "tp.json",
            "--world-size",
            "4",
            "-o",
            "tp-plan.json",
        ],
    )
    .code(0);
    let verify = |plan: &str| {
        hw(
            &sandbox,
            &[
                "verify-plan",
                plan,
                "--world-size",
                "4",
                "--tp-groups",
                "tp.json",
                "--manifest-prev",
                "v1.json",
                "--manifest-next",
                "v2.json",
            ],
        )
    };
    verify("tp-plan.json")
        .code(0)
        .stdout_has("tp-plan.json: ok");
    // Every bucket names its consumers, so the strict check passes too.
    hw(
        &sandbox,
        &[
            "verify-plan",
            "tp-plan.json",
            "--world-size",
            "4",
            "--require-consumers",
        ],
    )
    .code(0);

    // Each bucket goes to the ranks of the TP group of what it holds.
    let mut plan = sandbox.read_json("tp-plan.json");
    let buckets = plan["buckets"]
        .as_array()
        .unwrap_or_else(|| panic!("no buckets: {plan}"));
    for b in buckets {
        for item in b["items"].as_array().into_iter().flatten() {
            let name = item["name"].as_str().unwrap_or_default();
            // With --world-size, buckets for every rank name them all.
            let want = if item["is_file"] == true {
                json!([0, 1, 2, 3])
            } else if name.starts_with("model.layers.") && name.contains(".mlp.") {
                json!([0, 1])
            } else if name.starts_with("lm_head.") {
                json!([2])
            } else {
                json!([0, 1, 2, 3])
            };
            assert_eq!(b["consumer_ranks"], want, "bucket of {name}: {b}");
        }
    }

    // Tamper: an item off its alignment, a rank outside the world.
    let (b, i) = buckets
        .iter()
        .enumerate()
        .find_map(|(b, bucket)| {
            let items = bucket["items"].as_array()?;
            (items.len() > 1).then_some((b, 1))
        })
        .unwrap_or_else(|| panic!("no bucket holds two items: {plan}"));
    let c = buckets
        .iter()
        .position(|bucket| bucket["consumer_ranks"] == json!([0, 1]))
        .unwrap_or_else(|| panic!("no bucket for ranks [0, 1]: {plan}"));
    let offset = plan["buckets"][b]["items"][i]["bucket_offset"]
        .as_u64()
        .unwrap_or_default();
    plan["buckets"][b]["items"][i]["bucket_offset"] = json!(offset + 8);
    plan["buckets"][c]["consumer_ranks"] = json!([0, 7]);
    sandbox.write_json("bad.json", &plan);

    let run = verify("bad.json");
    run.code(1).quiet_stderr();
    let lines = run.stdout_lines();
    let expected = [
        "bad.json: digest: does not match the plan's contents".to_owned(),
        format!(
            "bad.json: buckets[{b}].items[{i}].bucket_offset: is {}, not a multiple of 256",
            offset + 8
        ),
        format!("bad.json: buckets[{c}].consumer_ranks: rank 7 is outside the world of 4 ranks"),
        // Rank 1 consumes the MLP tensors and no longer receives them.
        format!("bad.json: buckets[{c}].items[0]: tensor "),
    ];
    for want in &expected {
        assert!(
            lines.iter().any(|l| l.starts_with(want.as_str())),
            "no line starts with {want:?}{run}"
        );
    }
    let count = lines.len() - 1;
    assert!(count >= expected.len(), "{run}");
    assert_eq!(
        lines.last().copied(),
        Some(format!("bad.json: {count} problems").as_str()),
        "{run}"
    );

    let run = sandbox.run(&[
        "--json",
        "hw",
        "verify-plan",
        "bad.json",
        "--world-size",
        "4",
        "--tp-groups",
        "tp.json",
    ]);
    run.code(1).quiet_stderr();
    let v = run.json();
    assert_eq!(v["ok"], false, "{v}");
    let problems: Vec<(&str, &str)> = v["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems list: {v}"))
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap_or_default(),
                p["message"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(problems.len(), count, "{v}");
    let offset_path = format!("buckets[{b}].items[{i}].bucket_offset");
    let ranks_path = format!("buckets[{c}].consumer_ranks");
    for (path, message) in [
        (
            offset_path.as_str(),
            format!("is {}, not a multiple of 256", offset + 8),
        ),
        (
            ranks_path.as_str(),
            "rank 7 is outside the world of 4 ranks".to_owned(),
        ),
    ] {
        assert!(
            problems.contains(&(path, message.as_str())),
            "{path}: {message} missing from {v}"
        );
    }
    assert!(problems.iter().any(|(p, _)| *p == "digest"), "{v}");
}

#[test]
fn bad_input_is_one_error_line_naming_what_to_fix() {
    let sandbox = rollout();
    let plan = |next: &str, extra: &[&str]| {
        let mut args = vec!["plan", "--prev", "v1.json", "--next", next, "-o", "p.json"];
        args.extend_from_slice(extra);
        hw(&sandbox, &args)
    };
    let expect_error = |run: Run, needles: &[&str]| {
        run.code(2).quiet_stdout();
        let line = run.error_line();
        for needle in needles {
            assert!(line.contains(needle), "the error lacks {needle:?}{run}");
        }
    };

    // A manifest naming one tensor twice.
    let mut dup = sandbox.read_json("v2.json");
    let name = dup["tensors"][1]["name"].clone();
    dup["tensors"][3]["name"] = name;
    sandbox.write_json("dup.json", &dup);
    expect_error(plan("dup.json", &[]), &["dup.json", "tensors[3].name"]);

    // Manifests of two models; --force plans anyway.
    hw(
        &sandbox,
        &[
            "publish",
            "--checkpoint",
            V2,
            "--version",
            "v2",
            "--model-id",
            "other",
            "--chunk-mib",
            "1",
            "-o",
            "other.json",
        ],
    )
    .code(0);
    expect_error(
        plan("other.json", &[]),
        &["v1.json", "other.json", "\"synth\"", "\"other\"", "--force"],
    );
    plan("other.json", &["--force"]).code(0).quiet_stderr();
    assert_eq!(sandbox.read_json("p.json")["to"]["model_id"], "other");

    // --auto sizes buckets from free memory: a quarter of it by default.
    let p = hw_json(
        &sandbox,
        &[
            "plan",
            "--prev",
            "v1.json",
            "--next",
            "v2.json",
            "--auto",
            "--free-mib",
            "8",
            "-o",
            "p.json",
        ],
    );
    assert_eq!(p["buckets"]["bucket_limit"], json!(2 << 20), "{p}");
    let nvidia_smi = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("nvidia-smi").is_file())
    });
    if !nvidia_smi {
        expect_error(plan("v2.json", &["--auto"]), &["nvidia-smi", "--free-mib"]);
    }

    // TP groups that are not an object of lists of ranks.
    sandbox.write("tp.json", "[[0, 1]]");
    expect_error(
        plan("v2.json", &["--tp-groups", "tp.json"]),
        &["tp.json", "expected a JSON object"],
    );
    sandbox.write("tp.json", r#"{"model.layers.*": 3}"#);
    expect_error(
        plan("v2.json", &["--tp-groups", "tp.json"]),
        &["tp.json", "\"model.layers.*\"", "list of ranks"],
    );
    sandbox.write("tp.json", r#"{"model.layers.*": [0, 9]}"#);
    expect_error(
        plan("v2.json", &["--tp-groups", "tp.json", "--world-size", "8"]),
        &["tp.json", "rank 9 is outside the world of 8 ranks"],
    );

    // A plan without transfer ops needs --source to apply; nothing changes
    // until it gets one.
    plan("v2.json", &[]).code(0);
    assert_eq!(sandbox.read_json("p.json")["ops"], json!([]));
    store_at_v1(&sandbox);
    expect_error(
        hw(&sandbox, &["apply", "--store", STORE, "--plan", "p.json"]),
        &["--source"],
    );
    let s = status(&sandbox);
    assert_eq!(versions(&s), ["v1"], "{s}");
    assert_eq!(interrupted(&s), "", "{s}");
    hw(
        &sandbox,
        &[
            "apply", "--store", STORE, "--plan", "p.json", "--source", V2,
        ],
    )
    .code(0)
    .quiet_stderr();
    assert_exports(&sandbox, Some("v2"), "out", V2);

    // A plan whose `from` version the store lacks.
    expect_error(
        hw(
            &sandbox,
            &["apply", "--store", "empty", "--plan", "plan.json"],
        ),
        &["empty", "from version \"v1\"", "--manifest"],
    );
}

/// A crash while v2 is applied to a store at v1, at `failpoint`: the store
/// stays at v1, with v2 whole or absent; rerunning the apply finishes it.
/// `stored`: how many new chunks the crash leaves at least; `None`: all.
fn crash_applying(failpoint: &str, stored: Option<usize>, v2_visible: bool) {
    let sandbox = rollout();
    store_at_v1(&sandbox);
    let v1_chunks = chunk_hashes(&sandbox, &["v1.json"]).len();
    let both_chunks = chunk_hashes(&sandbox, &["v1.json", "v2.json"]).len();
    let apply = ["apply", "--store", STORE, "--plan", "plan.json"];
    crash(&sandbox, failpoint, &apply);

    let s = assert_current(&sandbox, &json!("v1"), &json!([]));
    let expected: &[&str] = if v2_visible { &["v1", "v2"] } else { &["v1"] };
    assert_eq!(versions(&s), expected, "{s}");
    let chunks = s["chunks"].as_u64().unwrap_or_default() as usize;
    let least = stored.map_or(both_chunks, |n| v1_chunks + n);
    assert!(
        chunks >= least && chunks <= both_chunks,
        "{chunks} chunks after the crash: {s}"
    );
    let why = interrupted(&s);
    let what = if v2_visible {
        "an apply of version \"v2\" (plan \"synth:v1->v2\") was interrupted after the version became available"
    } else {
        "an apply of version \"v2\" (plan \"synth:v1->v2\") did not finish"
    };
    assert!(
        why.contains(what) && why.contains("current is still \"v1\""),
        "{s}"
    );
    assert_exports(&sandbox, None, "out/current", V1);
    if v2_visible {
        assert_exports(&sandbox, Some("v2"), "out/v2-visible", V2);
    }

    // Rerunning the apply finishes it; commit then takes its version.
    hw(&sandbox, &apply).code(0).quiet_stderr();
    let s = status(&sandbox);
    assert_eq!(versions(&s), ["v1", "v2"], "{s}");
    assert!(
        !interrupted(&s).contains("an apply of"),
        "the finished apply is still reported: {s}"
    );
    assert_eq!(s["chunks"], json!(both_chunks), "{s}");
    hw(&sandbox, &["commit", "--store", STORE])
        .code(0)
        .stdout_has("current is now \"v2\" (was \"v1\")");
    assert_exports(&sandbox, None, "out/v2", V2);
    hw(&sandbox, &["gc", "--store", STORE]).code(0);
    assert_clean(&sandbox, &["v1", "v2"]);
}

#[test]
fn crash_after_the_first_chunk_of_an_apply() {
    crash_applying("apply.chunk", Some(1), false);
}

#[test]
fn crash_after_the_second_chunk_of_an_apply() {
    crash_applying("apply.chunk@2", Some(2), false);
}

#[test]
fn crash_with_every_chunk_stored_before_the_manifest() {
    crash_applying("apply.before-manifest", None, false);
}

#[test]
fn crash_with_the_manifest_written_before_the_journal_goes() {
    crash_applying("apply.after-manifest", None, true);
}

#[test]
fn crash_in_the_first_import() {
    let sandbox = rollout();
    let import = [
        "apply",
        "--store",
        STORE,
        "--manifest",
        "v1.json",
        "--source",
        V1,
    ];
    crash(&sandbox, "apply.chunk@3", &import);
    let s = status(&sandbox);
    assert_eq!(s["current"], Value::Null, "{s}");
    assert_eq!(versions(&s), Vec::<&str>::new(), "{s}");
    assert!(s["chunks"].as_u64() >= Some(3), "{s}");
    let why = interrupted(&s);
    assert!(
        why.contains("an apply of version \"v1\" did not finish")
            && why.contains("no version is current"),
        "{s}"
    );
    let run = hw(&sandbox, &["export", "--store", STORE, "-o", "out/none"]);
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("no version is current"), "{run}");
    assert!(!sandbox.exists("out/none"));

    hw(&sandbox, &import).code(0).quiet_stderr();
    hw(&sandbox, &["commit", "--store", STORE])
        .code(0)
        .stdout_has("current is now \"v1\" (was none)");
    assert_exports(&sandbox, None, "out/v1", V1);
    hw(&sandbox, &["gc", "--store", STORE]).code(0);
    assert_clean(&sandbox, &["v1"]);
}

#[test]
fn crash_in_a_commit_before_the_rename() {
    let sandbox = rollout();
    store_with_v2_applied(&sandbox);
    crash(
        &sandbox,
        "commit.before-rename",
        &["commit", "--store", STORE],
    );
    let s = assert_current(&sandbox, &json!("v1"), &json!([]));
    assert_eq!(
        interrupted(&s),
        "a switch of the current version to \"v2\" was interrupted before it took effect; current is still \"v1\"; rerun it",
        "{s}"
    );
    assert_exports(&sandbox, None, "out/v1", V1);

    hw(&sandbox, &["commit", "--store", STORE])
        .code(0)
        .stdout_has("current is now \"v2\" (was \"v1\")");
    let s = assert_current(&sandbox, &json!("v2"), &json!(["v1"]));
    assert_eq!(interrupted(&s), "", "{s}");
    assert_exports(&sandbox, None, "out/v2", V2);
    hw(&sandbox, &["gc", "--store", STORE]).code(0);
    assert_clean(&sandbox, &["v1", "v2"]);
}

#[test]
fn crash_in_a_commit_after_the_rename() {
    let sandbox = rollout();
    store_with_v2_applied(&sandbox);
    crash(
        &sandbox,
        "commit.after-rename",
        &["commit", "--store", STORE],
    );
    // The new state is in place: the commit took effect.
    let s = assert_current(&sandbox, &json!("v2"), &json!(["v1"]));
    assert_eq!(interrupted(&s), "", "{s}");
    assert_exports(&sandbox, None, "out/v2", V2);

    // Rerunning it changes nothing.
    hw(&sandbox, &["commit", "--store", STORE]).code(0);
    assert_current(&sandbox, &json!("v2"), &json!(["v1"]));
    hw(&sandbox, &["gc", "--store", STORE]).code(0);
    assert_clean(&sandbox, &["v1", "v2"]);
    hw(&sandbox, &["rollback", "--store", STORE]).code(0);
    assert_exports(&sandbox, None, "out/v1", V1);
}

#[test]
fn crash_in_a_rollback_before_the_rename() {
    let sandbox = rollout();
    store_at_v2(&sandbox);
    crash(
        &sandbox,
        "rollback.before-rename",
        &["rollback", "--store", STORE],
    );
    let s = assert_current(&sandbox, &json!("v2"), &json!(["v1"]));
    assert_eq!(
        interrupted(&s),
        "a switch of the current version to \"v1\" was interrupted before it took effect; current is still \"v2\"; rerun it",
        "{s}"
    );
    assert_exports(&sandbox, None, "out/v2", V2);

    hw(&sandbox, &["rollback", "--store", STORE])
        .code(0)
        .stdout_has("rolled back to \"v1\" (from \"v2\")");
    assert_current(&sandbox, &json!("v1"), &json!([]));
    assert_exports(&sandbox, None, "out/v1", V1);
    hw(&sandbox, &["gc", "--store", STORE]).code(0);
    assert_clean(&sandbox, &["v1", "v2"]);
}

#[test]
fn crash_in_gc_after_the_first_chunk_deleted() {
    let sandbox = rollout();
    store_at_v2(&sandbox);
    let both = chunk_hashes(&sandbox, &["v1.json", "v2.json"]).len();
    let v2_only = chunk_hashes(&sandbox, &["v2.json"]).len();
    let gc = ["gc", "--store", STORE, "--keep", "0"];
    crash(&sandbox, "gc.chunk", &gc);
    // v1 left the history, then its manifest, then one of its chunks.
    let s = assert_current(&sandbox, &json!("v2"), &json!([]));
    assert_eq!(versions(&s), ["v2"], "{s}");
    assert_eq!(s["chunks"], json!(both - 1), "{s}");
    assert_exports(&sandbox, None, "out/v2", V2);

    let g = hw_json(&sandbox, &gc);
    assert_eq!(g["gc"]["chunks_removed"], json!(both - v2_only - 1), "{g}");
    assert_clean(&sandbox, &["v2"]);
    assert_exports(&sandbox, None, "out/v2-after-gc", V2);
}

/// A gc that dies after shortening the history but before deleting the
/// dropped version: the next gc still removes it (it was recorded as
/// retired in the same write), and status says a gc was interrupted.
#[test]
fn a_gc_crash_after_its_state_flip_is_finished_by_the_next_gc() {
    let sandbox = rollout();
    store_at_v2(&sandbox);
    let gc = ["gc", "--store", STORE, "--keep", "0"];
    crash(&sandbox, "gc.after-rename", &gc);
    let s = assert_current(&sandbox, &json!("v2"), &json!([]));
    assert!(interrupted(&s).contains("a gc was interrupted"), "{s}");
    assert_exports(&sandbox, None, "out/v2", V2);

    hw_json(&sandbox, &gc);
    assert_clean(&sandbox, &["v2"]);
    assert_exports(&sandbox, None, "out/v2-after-gc", V2);
}

#[test]
fn an_apply_whose_writes_fail_changes_nothing() {
    let sandbox = rollout();
    store_at_v1(&sandbox);
    let v1_chunks = chunk_hashes(&sandbox, &["v1.json"]).len();
    // Files may not grow past 64 KiB: every 1 MiB chunk's write fails with
    // EFBIG, as on a full disk (SIGXFSZ ignored, so the write returns the
    // error instead of killing the process).
    let limited = |args: &str| {
        sandbox.run_shell(&format!(
            "trap '' XFSZ; ulimit -f 64; exec \"$BSTACK\" hw {args}"
        ))
    };
    let run = limited(&format!("apply --store {STORE} --plan plan.json"));
    run.code(2).quiet_stdout();
    let line = run.error_line();
    assert!(
        line.contains(&format!("{STORE}/")) && line.contains("os error 27"),
        "expected EFBIG writing into the store{run}"
    );
    let s = assert_current(&sandbox, &json!("v1"), &json!([]));
    assert_eq!(versions(&s), ["v1"], "{s}");
    assert_eq!(interrupted(&s), "", "{s}");
    assert_exports(&sandbox, None, "out/v1", V1);
    hw(&sandbox, &["gc", "--store", STORE]).code(0);
    assert_clean(&sandbox, &["v1"]);
    assert_eq!(status(&sandbox)["chunks"], json!(v1_chunks));

    // With room again, the same apply succeeds.
    hw(
        &sandbox,
        &["apply", "--store", STORE, "--plan", "plan.json"],
    )
    .code(0)
    .quiet_stderr();
    hw(&sandbox, &["commit", "--store", STORE]).code(0);
    assert_exports(&sandbox, None, "out/v2", V2);
    assert_clean(&sandbox, &["v1", "v2"]);

    // The first import into a new store, likewise.
    let run = limited("apply --store S2 --manifest v1.json --source ck/v1");
    run.code(2).quiet_stdout();
    assert!(run.error_line().contains("os error 27"), "{run}");
    let s = hw_json(&sandbox, &["status", "--store", "S2"])["status"].clone();
    assert_eq!(s["current"], Value::Null, "{s}");
    assert_eq!(versions(&s), Vec::<&str>::new(), "{s}");
    assert_eq!(interrupted(&s), "", "{s}");
    let g = hw_json(&sandbox, &["gc", "--store", "S2"]);
    assert_eq!(g["gc"]["chunks_kept"], 0, "{g}");
    let s = hw_json(&sandbox, &["status", "--store", "S2"])["status"].clone();
    assert_eq!(s["chunks"], 0, "{s}");
}
