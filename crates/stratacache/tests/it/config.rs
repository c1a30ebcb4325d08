//! The store configuration: every mistake is named by its key before any
//! tier is opened; relative paths follow the file.

use stratacache::config::{ByteSize, Config};
use stratacache::{Access, ArtifactKey, CustomKey, Meta};

#[track_caller]
fn refused(yaml: &str, says: &[&str]) {
    let err = Config::from_yaml(yaml, "test.yaml")
        .unwrap_err()
        .to_string();
    for s in says {
        assert!(err.contains(s), "{yaml:?}: {err:?} lacks {s:?}");
    }
}

#[test]
fn mistakes_are_named_by_key() {
    refused("tiers: []\n", &["tiers", "at least one"]);
    refused(
        "tiers:\n  - kind: memory\n    colour: red\n",
        &["tiers[0]", "colour"],
    );
    refused("tiers:\n  - kind: tape\n", &["tiers[0].kind", "tape"]);
    refused(
        "tiers:\n  - kind: disk\n    path: d\n    url: redis://x\n",
        &["tiers[0].url: not a key of a disk tier"],
    );
    refused(
        "tiers:\n  - kind: memory\n    capacity: 4 parsecs\n",
        &["unknown unit"],
    );
    refused(
        "tiers:\n  - kind: memory\n    mode: write_back\n",
        &["tiers[0].mode", "last tier"],
    );
    refused(
        "tiers:\n  - {kind: redis, url: 'redis://x', mode: write_back}\n  - {kind: memory}\n",
        &["tiers[0].mode", "cannot pin"],
    );
    refused(
        "tiers:\n  - kind: memory\n    shards: 0\n",
        &["tiers[0].shards"],
    );
    refused(
        "tiers:\n  - kind: memory\n    capacity: 8\n    shards: 16\n",
        &["tiers[0].shards"],
    );
    refused(
        "tiers:\n  - kind: memory\n  - kind: memory\n",
        &["tiers[1].name", "names two tiers"],
    );
    refused("exec:\n  streams: 0\n", &["exec.streams"]);
    refused(
        "exec:\n  keys: {tp_size: 2, rank: 2}\n",
        &["exec.keys.rank"],
    );
    refused(
        "exec:\n  tier_map: {gpu: hbm}\n",
        &["exec.tier_map.gpu", "no tier is called \"hbm\""],
    );
}

#[test]
fn sizes_read_with_or_without_units() {
    for (text, bytes) in [
        ("4096", 4096),
        ("64MiB", 64 << 20),
        ("1.5GB", 1_500_000_000),
        ("2 KiB", 2048),
    ] {
        assert_eq!(text.parse::<ByteSize>().unwrap(), ByteSize(bytes), "{text}");
    }
    assert!("-1GiB".parse::<ByteSize>().is_err());
}

#[test]
fn a_file_opens_a_store_with_paths_relative_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.yaml");
    std::fs::write(
        &file,
        "tiers:\n  - {name: cpu, kind: memory, capacity: 1MiB, mode: write_back}\n  \
         - {name: ssd, kind: disk, path: data}\n",
    )
    .unwrap();
    let config = Config::load(&file).unwrap();
    assert_eq!(
        config.tiers[1].path.as_deref(),
        Some(dir.path().join("data").as_path())
    );
    let engine = config.open().unwrap();
    let key = ArtifactKey::Custom(CustomKey {
        namespace: "t".into(),
        name: "a".into(),
    });
    engine
        .store(&key, Meta::default(), b"x", Access::Chain)
        .unwrap();
    engine.close().unwrap();
    assert!(dir.path().join("data").is_dir());
    // Defaults print back as a configuration that reads the same.
    let again = Config::from_yaml(&config.to_yaml(), "printed").unwrap();
    assert_eq!(again, config);
}
