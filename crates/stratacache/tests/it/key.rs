//! Keys: round trips, no collisions, and clear errors on bad bytes.

use proptest::prelude::*;
use stratacache::{ArtifactKey, CustomKey, Error, KvChunkKey, Layers, ParamChunkKey};

fn small_string() -> impl Strategy<Value = String> {
    // Separators and empty strings included: they must not make two keys
    // meet.
    prop::sample::select(vec!["", "a", "b", "a/b", "a@b", "llama", "/", "é"]).prop_map(String::from)
}

fn arb_key() -> impl Strategy<Value = ArtifactKey> {
    let kv = (
        small_string(),
        prop::option::of(small_string()),
        small_string(),
        1u32..4,
        0u32..4,
        prop::collection::vec(any::<u8>(), 0..3),
        prop::option::of(0u32..3),
    )
        .prop_map(|(model, adapter, kv_dtype, tp, rank, prefix_hash, layer)| {
            ArtifactKey::KvChunk(KvChunkKey {
                model,
                adapter,
                kv_dtype,
                tp_size: tp,
                rank: rank % tp,
                prefix_hash,
                layers: layer.map_or(Layers::Bundle, Layers::One),
            })
        });
    let param = (small_string(), small_string(), small_string(), 0u64..3).prop_map(
        |(model, revision, tensor, chunk)| {
            ArtifactKey::ParamChunk(ParamChunkKey {
                model,
                revision,
                tensor,
                chunk,
            })
        },
    );
    let custom = (small_string(), small_string())
        .prop_map(|(namespace, name)| ArtifactKey::Custom(CustomKey { namespace, name }));
    prop_oneof![kv, param, custom]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn keys_round_trip_through_their_encoding(key in arb_key()) {
        let bytes = key.encode().unwrap();
        prop_assert_eq!(ArtifactKey::decode(&bytes).unwrap(), key.clone());
        prop_assert_eq!(key.digest().unwrap(), *blake3::hash(&bytes).as_bytes());
    }

    /// Injective: different keys, different bytes (and digests), whatever
    /// the kinds, ranks or separators in the names.
    #[test]
    fn different_keys_never_share_an_encoding(a in arb_key(), b in arb_key()) {
        let (ea, eb) = (a.encode().unwrap(), b.encode().unwrap());
        prop_assert_eq!(a == b, ea == eb);
        prop_assert_eq!(a == b, a.digest().unwrap() == b.digest().unwrap());
    }

    /// No encoding is a prefix of another one, so a cut or extended key
    /// never decodes.
    #[test]
    fn cut_or_extended_encodings_do_not_decode(key in arb_key(), cut in 0usize..64, extra in any::<u8>()) {
        let bytes = key.encode().unwrap();
        let cut = cut % bytes.len();
        prop_assert!(ArtifactKey::decode(&bytes[..cut]).is_err());
        let mut longer = bytes.clone();
        longer.push(extra);
        prop_assert!(ArtifactKey::decode(&longer).is_err());
    }
}

fn kv(rank: u32) -> ArtifactKey {
    ArtifactKey::KvChunk(KvChunkKey {
        model: "m".into(),
        adapter: None,
        kv_dtype: "bf16".into(),
        tp_size: 2,
        rank,
        prefix_hash: vec![0xab, 0xcd],
        layers: Layers::One(3),
    })
}

#[test]
fn the_format_is_fixed() {
    // A stored key must decode in every later version: the bytes of this
    // key are part of the format.
    let bytes = kv(1).encode().unwrap();
    assert_eq!(
        bytes,
        [
            1, 1, // format, kind
            0, 1, b'm', // model
            0,    // no adapter
            0, 4, b'b', b'f', b'1', b'6', // kv_dtype
            0, 0, 0, 2, // tp_size
            0, 0, 0, 1, // rank
            0, 2, 0xab, 0xcd, // prefix hash
            1, 0, 0, 0, 3, // layer 3
        ]
    );
    assert_eq!(kv(1).to_string(), "kv/m/bf16/tp2.r1/abcd/layer3");
}

#[test]
fn bad_keys_and_bad_bytes_say_where() {
    let err = kv(2).encode().unwrap_err();
    assert!(matches!(err, Error::Key { field: "rank", .. }), "{err}");
    let long = ArtifactKey::Custom(CustomKey {
        namespace: "x".repeat(70_000),
        name: String::new(),
    });
    let err = long.encode().unwrap_err().to_string();
    assert!(err.contains("namespace") && err.contains("70000"), "{err}");

    let mut bytes = kv(1).encode().unwrap();
    bytes[0] = 9;
    let err = ArtifactKey::decode(&bytes).unwrap_err().to_string();
    assert!(
        err.contains("at byte 1") && err.contains("format 9"),
        "{err}"
    );
    let mut bytes = kv(1).encode().unwrap();
    bytes[1] = 7;
    let err = ArtifactKey::decode(&bytes).unwrap_err().to_string();
    assert!(err.contains("kind 7"), "{err}");
    // Invalid UTF-8 in the model name.
    let mut bytes = kv(1).encode().unwrap();
    bytes[4] = 0xff;
    let err = ArtifactKey::decode(&bytes).unwrap_err().to_string();
    assert!(
        err.contains("at byte 2") && err.contains("model is not UTF-8"),
        "{err}"
    );
    // A rank at or above the TP size is refused on the way in too.
    let mut bytes = kv(1).encode().unwrap();
    bytes[19] = 2;
    let err = ArtifactKey::decode(&bytes).unwrap_err().to_string();
    assert!(err.contains("rank 2 not below tp_size 2"), "{err}");
}

#[test]
fn the_text_form_parses_back() {
    for text in [
        "custom/demo/a/b/c",
        "param/meta-llama/Llama-3@v2/model.layers.0.q_proj.weight#3",
        "kv/meta-llama/Llama-3@lora7/bf16/tp4.r3/00ff12/layer31",
        "kv/m/fp8_e4m3/tp1.r0/ab/bundle",
    ] {
        let key: ArtifactKey = text.parse().unwrap();
        assert_eq!(key.to_string(), text);
    }
    for (bad, says) in [
        ("nokind", "expected custom/"),
        ("blob/x", "unknown kind"),
        ("kv/m/bf16/tp2.r2/00/layer1", "not below"),
        ("kv/m/bf16/tp2.r0/0g/layer1", "hex"),
        ("param/m/t#x", "param/MODEL@REVISION"),
    ] {
        let err = bad.parse::<ArtifactKey>().unwrap_err().to_string();
        assert!(err.contains(says), "{bad}: {err}");
    }
}
