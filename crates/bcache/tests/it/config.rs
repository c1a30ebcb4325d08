//! Configuration: defaults, YAML, flags, and the documented key table.

use bcache::config::{Config, KNOBS};
use serde_json::Value;

fn leaf_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(v, &key, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn every_key_is_documented_once_with_a_unique_flag() {
    let mut keys = Vec::new();
    leaf_keys(&Config::default().to_value(), "", &mut keys);
    let documented: Vec<String> = KNOBS.iter().map(|k| k.key.to_owned()).collect();
    let mut a = keys.clone();
    a.sort();
    let mut b = documented.clone();
    b.sort();
    assert_eq!(a, b, "KNOBS must list exactly the configuration's keys");
    let mut flags: Vec<&str> = KNOBS.iter().map(|k| k.flag).collect();
    flags.sort();
    let n = flags.len();
    flags.dedup();
    assert_eq!(flags.len(), n, "flags must be unique");
    let table = Config::docs_table();
    for k in KNOBS {
        assert!(
            table.contains(&format!("`{}`", k.key)),
            "{} missing from docs",
            k.key
        );
    }
}

#[test]
fn yaml_overrides_defaults_and_unknown_keys_are_named() {
    let c = Config::from_yaml("planner:\n  window_ms: 5\nsim:\n  nodes: 3\n", "t.yaml").unwrap();
    assert_eq!(c.planner.window_ms, 5.0);
    assert_eq!(c.sim.nodes, 3);
    assert_eq!(c.planner.alpha, Config::default().planner.alpha);

    let err = Config::from_yaml("planner:\n  windw_ms: 5\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("t.yaml") && err.contains("windw_ms"), "{err}");
    let err = Config::from_yaml("simm: {}\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("simm"), "{err}");
    let err = Config::from_yaml("planner:\n  window_ms: fast\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("planner.window_ms"), "{err}");
    let err = Config::from_yaml("planner:\n  low_watermark: 0.99\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("watermark"), "{err}");
    let err = Config::from_yaml("sim:\n  policies: [lru, mru]\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("mru"), "{err}");
}

#[test]
fn flags_set_scalars_and_lists() {
    let mut tree = Config::default().to_value();
    Config::set(&mut tree, "planner.window_ms", "7.5").unwrap();
    Config::set(&mut tree, "planner.edf", "false").unwrap();
    Config::set(&mut tree, "sim.policies", "lru,bcache").unwrap();
    Config::set(&mut tree, "sim.capacity_scales", "0.5, 2").unwrap();
    Config::set(&mut tree, "sim.routing", "round-robin").unwrap();
    let c = Config::from_value(tree, "flags").unwrap();
    assert_eq!(c.planner.window_ms, 7.5);
    assert!(!c.planner.edf);
    assert_eq!(c.sim.policies, vec!["lru", "bcache"]);
    assert_eq!(c.sim.capacity_scales, vec![0.5, 2.0]);

    let mut tree = Config::default().to_value();
    assert!(Config::set(&mut tree, "planner.nope", "1").is_err());
    Config::set(&mut tree, "sim.nodes", "many").unwrap();
    let err = Config::from_value(tree, "flags").unwrap_err().to_string();
    assert!(err.contains("sim.nodes"), "{err}");
}

#[test]
fn the_yaml_a_config_prints_reads_back_identically() {
    let mut c = Config::default();
    c.planner.alpha = 2.5;
    c.sim.policies = vec!["belady".into()];
    let back = Config::from_yaml(&c.to_yaml(), "printed").unwrap();
    assert_eq!(back, c);
}

#[test]
fn the_readme_table_is_the_docs_table() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    assert!(
        readme.contains(&Config::docs_table()),
        "README.md's configuration table is stale: replace it with the output of \
         `bstack bcache config --docs`"
    );
}

#[test]
fn route_hint_knobs_default_set_and_are_checked_by_key() {
    let c = Config::default();
    assert!(!c.planner.route_hints, "off unless a router asks");
    assert_eq!(c.planner.lsh(), bcache::lsh::LshConfig::default());
    assert_eq!(c.planner.prefix_depth, 4);

    let mut tree = Config::default().to_value();
    Config::set(&mut tree, "planner.route_hints", "true").unwrap();
    Config::set(&mut tree, "planner.lsh_bands", "20").unwrap();
    Config::set(&mut tree, "planner.lsh_rows", "5").unwrap();
    Config::set(&mut tree, "planner.lsh_shingle", "3").unwrap();
    Config::set(&mut tree, "planner.prefix_depth", "2").unwrap();
    let c = Config::from_value(tree, "flags").unwrap();
    assert!(c.planner.route_hints);
    let lsh = c.planner.lsh();
    assert_eq!((lsh.bands, lsh.rows, lsh.shingle), (20, 5, 3));
    assert_eq!(c.planner.prefix_depth, 2);

    for key in ["lsh_bands", "lsh_rows", "lsh_shingle", "prefix_depth"] {
        let err = Config::from_yaml(&format!("planner:\n  {key}: 0\n"), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("planner.{key}: must be > 0")),
            "{err}"
        );
    }
    let err = Config::from_yaml("planner:\n  lsh_bands: 512\n  lsh_rows: 4\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("planner.lsh_bands") && err.contains("1024"),
        "{err}"
    );
    let err = Config::from_yaml(
        &format!("planner:\n  lsh_bands: {}\n  lsh_rows: 4\n", usize::MAX),
        "t.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("planner.lsh_bands") && err.contains("overflows"),
        "{err}"
    );
}
