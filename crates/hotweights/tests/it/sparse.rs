//! `sparse`: XOR+zstd deltas of weight chunks: round trips at every change
//! density, the size a typical RL step encodes to, and corrupt deltas.

use std::time::Instant;

use bstack_plan::HashAlgorithm;
use hotweights::sparse::{self, DEFAULT_LEVEL, HEADER_BYTES};
use hotweights::{HotweightsError, hash_hex};
use proptest::prelude::*;

/// xorshift64*: a deterministic generator, enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Never zero, which is xorshift's one fixed point.
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// True with probability `ppm` per million.
    fn chance(&mut self, ppm: u64) -> bool {
        self.next() % 1_000_000 < ppm
    }
}

/// `len` bytes of bf16 weights like a trained layer's: small values of both
/// signs (|x| < ~0.06), little-endian. An odd `len` ends in half an element.
fn bf16_weights(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        let r = rng.next();
        let sign = (r >> 63) as u16;
        // Exponents 117..=122: magnitudes from 2^-10 to 2^-5.
        let exponent = 117 + (r >> 32) as u16 % 6;
        let mantissa = r as u16 & 0x7f;
        let bits = (sign << 15) | (exponent << 7) | mantissa;
        out.extend_from_slice(&bits.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// How the changed elements change.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// An optimizer step: one of the low 3 mantissa bits flips.
    Nudge,
    /// A new value altogether.
    Replace,
}

/// A copy of `old` in which each bf16 element (the odd last byte counting as
/// one) changes with probability `ppm` per million.
fn step(rng: &mut Rng, old: &[u8], ppm: u64, change: Change) -> Vec<u8> {
    let mut new = old.to_vec();
    for element in new.chunks_mut(2) {
        if !rng.chance(ppm) {
            continue;
        }
        let r = rng.next();
        match change {
            Change::Nudge => element[0] ^= 1 << (r % 3),
            Change::Replace => {
                // Never the same value: a change must change something.
                for (i, byte) in element.iter_mut().enumerate() {
                    *byte ^= (r >> (8 * i)) as u8 | u8::from(i == 0);
                }
            }
        }
    }
    new
}

fn blake3(bytes: &[u8]) -> String {
    hash_hex(HashAlgorithm::Blake3, bytes).unwrap()
}

fn delta_error<T: std::fmt::Debug>(result: hotweights::Result<T>) -> String {
    match result {
        Err(HotweightsError::Delta(message)) => message,
        other => panic!("expected a Delta error, got {other:?}"),
    }
}

/// Change densities, per million elements: 0, 0.1 %, 1 %, 10 %, 50 %, 100 %.
const DENSITIES_PPM: [u64; 6] = [0, 1_000, 10_000, 100_000, 500_000, 1_000_000];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn encode_then_decode_verified_rebuilds_the_new_chunk(
        len in prop_oneof![0usize..64, 0usize..=256 * 1024],
        density in 0..DENSITIES_PPM.len(),
        nudge in any::<bool>(),
        // Sometimes the new chunk has another length (a reshaped tensor).
        cut in prop_oneof![4 => Just(0usize), 1 => 1usize..100],
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let old = bf16_weights(&mut rng, len);
        let change = if nudge { Change::Nudge } else { Change::Replace };
        let mut new = step(&mut rng, &old, DENSITIES_PPM[density], change);
        new.truncate(len.saturating_sub(cut));

        let encoded = sparse::encode(&old, &new).unwrap();
        // A sparse step of a chunk of a few KiB always pays.
        if cut == 0 && len >= 4096 && DENSITIES_PPM[density] <= 10_000 {
            prop_assert!(encoded.is_some());
        }
        match encoded {
            Some(delta) => {
                prop_assert_eq!(old.len(), new.len());
                prop_assert!(delta.len() < new.len());
                prop_assert_eq!(&delta[..4], b"HWD1");
                let rebuilt = sparse::decode_verified(
                    &old, &delta, HashAlgorithm::Blake3, &blake3(&new),
                ).unwrap();
                prop_assert!(rebuilt == new);
                let sha = hash_hex(HashAlgorithm::Sha256, &new).unwrap();
                let rebuilt =
                    sparse::decode_verified(&old, &delta, HashAlgorithm::Sha256, &sha).unwrap();
                prop_assert!(rebuilt == new);
                prop_assert_eq!(
                    sparse::wire_bytes(&old, &new).unwrap(),
                    delta.len() as u64
                );
            }
            None => {
                // Either the lengths differ, or the delta would not be smaller.
                if old.len() == new.len() {
                    let xor: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
                    let frame = zstd::bulk::compress(&xor, DEFAULT_LEVEL).unwrap();
                    prop_assert!(HEADER_BYTES + frame.len() >= new.len());
                }
                prop_assert_eq!(sparse::wire_bytes(&old, &new).unwrap(), new.len() as u64);
            }
        }
    }
}

#[test]
fn identical_chunks_of_every_size_from_64_bytes_encode() {
    let mut rng = Rng::new(1);
    for len in [64, 65, 1000, 4096, 1 << 20] {
        let old = bf16_weights(&mut rng, len);
        let delta = sparse::encode(&old, &old).unwrap().unwrap();
        assert!(delta.len() < 64, "{len}: {}", delta.len());
        assert_eq!(sparse::decode(&old, &delta).unwrap(), old);
    }
}

#[test]
fn fully_replaced_chunk_is_not_worth_a_delta() {
    let mut rng = Rng::new(2);
    let old = bf16_weights(&mut rng, 1 << 16);
    let new: Vec<u8> = (0..1 << 16).map(|_| rng.next() as u8).collect();
    assert_eq!(sparse::encode(&old, &new).unwrap(), None);
    assert_eq!(sparse::wire_bytes(&old, &new).unwrap(), 1 << 16);
}

const FOUR_MIB: usize = 4 << 20;

/// The figure the format exists for: a 4 MiB bf16 chunk after an RL step
/// that nudged 1 % of its elements encodes to at most 5 % of its size.
#[test]
fn four_mib_chunk_with_one_percent_nudged_encodes_under_five_percent() {
    let mut rng = Rng::new(42);
    let old = bf16_weights(&mut rng, FOUR_MIB);
    let new = step(&mut rng, &old, 10_000, Change::Nudge);
    assert_ne!(old, new);

    let start = Instant::now();
    let delta = sparse::encode(&old, &new).unwrap().unwrap();
    let encode_time = start.elapsed();
    let expected = blake3(&new);
    let start = Instant::now();
    let rebuilt = sparse::decode(&old, &delta).unwrap();
    let decode_time = start.elapsed();
    assert!(rebuilt == new);
    assert!(sparse::decode_verified(&old, &delta, HashAlgorithm::Blake3, &expected).is_ok());

    println!(
        "4 MiB bf16, 1 % nudged, level {DEFAULT_LEVEL}: {} bytes ({:.2} %), \
         encode {encode_time:?}, decode {decode_time:?}",
        delta.len(),
        100.0 * delta.len() as f64 / FOUR_MIB as f64
    );
    assert!(
        delta.len() <= FOUR_MIB / 20,
        "{} bytes is more than 5 % of 4 MiB",
        delta.len()
    );
}

/// Sizes and speeds across zstd levels and densities, to choose
/// `DEFAULT_LEVEL`. Slow in a debug build: run with
/// `cargo test --release -p hotweights --test it level_sweep -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn level_sweep() {
    const ROUNDS: u32 = 5;
    let mut rng = Rng::new(7);
    let old = bf16_weights(&mut rng, FOUR_MIB);
    for ppm in [1_000, 10_000, 20_000, 100_000] {
        let new = step(&mut rng, &old, ppm, Change::Nudge);
        for level in [-5, -1, 1, 2, 3, 5, 9] {
            let start = Instant::now();
            let mut delta = None;
            for _ in 0..ROUNDS {
                delta = sparse::encode_with_level(&old, &new, level).unwrap();
            }
            let encode_time = start.elapsed() / ROUNDS;
            let delta = delta.unwrap();
            let start = Instant::now();
            for _ in 0..ROUNDS {
                assert_eq!(sparse::decode(&old, &delta).unwrap().len(), FOUR_MIB);
            }
            let decode_time = start.elapsed() / ROUNDS;
            println!(
                "{:>5.1} % changed, level {level:>2}: {:>8} bytes ({:>5.2} %), \
                 encode {:>7.2} ms ({:>6.0} MB/s), decode {:>6.2} ms",
                ppm as f64 / 10_000.0,
                delta.len(),
                100.0 * delta.len() as f64 / FOUR_MIB as f64,
                encode_time.as_secs_f64() * 1e3,
                FOUR_MIB as f64 / encode_time.as_secs_f64() / 1e6,
                decode_time.as_secs_f64() * 1e3,
            );
        }
    }
}

/// A 16 KiB chunk with 1 % nudged, its delta and the new hash.
fn small_case() -> (Vec<u8>, Vec<u8>, Vec<u8>, String) {
    let mut rng = Rng::new(3);
    let old = bf16_weights(&mut rng, 16 * 1024);
    let new = step(&mut rng, &old, 10_000, Change::Nudge);
    let delta = sparse::encode(&old, &new).unwrap().unwrap();
    let hash = blake3(&new);
    (old, new, delta, hash)
}

#[test]
fn every_flipped_byte_is_caught() {
    let (old, new, delta, hash) = small_case();
    let mut caught_by_hash = 0;
    for i in 0..delta.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = delta.clone();
            bad[i] ^= bit;
            // Whatever decode makes of it, it is never longer than the chunk.
            match sparse::decode(&old, &bad) {
                Ok(bytes) => {
                    assert_eq!(bytes.len(), old.len());
                    if bytes != new {
                        caught_by_hash += 1;
                    }
                }
                Err(HotweightsError::Delta(_)) => {}
                Err(other) => panic!("byte {i}: {other}"),
            }
            // And the verified decode accepts only the true new chunk.
            match sparse::decode_verified(&old, &bad, HashAlgorithm::Blake3, &hash) {
                Ok(bytes) => assert!(bytes == new, "byte {i} bit {bit:#x}"),
                Err(HotweightsError::Delta(_)) => {}
                Err(other) => panic!("byte {i}: {other}"),
            }
        }
    }
    // Most flips in a zstd frame's literals decode to wrong bytes that only
    // the hash catches; that is what `decode_verified` is for.
    assert!(caught_by_hash > 0);
}

#[test]
fn every_truncation_is_rejected() {
    let (old, _, delta, hash) = small_case();
    for len in 0..delta.len() {
        delta_error(sparse::decode(&old, &delta[..len]));
        delta_error(sparse::decode_verified(
            &old,
            &delta[..len],
            HashAlgorithm::Blake3,
            &hash,
        ));
    }
}

#[test]
fn wrong_magic_is_rejected() {
    let (old, _, delta, _) = small_case();
    for i in 0..4 {
        let mut bad = delta.clone();
        bad[i] ^= 0x20;
        assert!(delta_error(sparse::decode(&old, &bad)).contains("magic"));
    }
}

#[test]
fn wrong_stated_length_is_rejected() {
    let (old, _, delta, _) = small_case();
    let len = old.len() as u64;
    for stated in [0, len - 1, len + 1, len * 2, u64::MAX] {
        let mut bad = delta.clone();
        bad[4..12].copy_from_slice(&stated.to_le_bytes());
        let message = delta_error(sparse::decode(&old, &bad));
        assert!(message.contains(&stated.to_string()), "{message}");
    }
}

#[test]
fn wrong_old_chunk_is_caught() {
    let (old, new, delta, hash) = small_case();

    // Another length: the header says so.
    delta_error(sparse::decode(&old[..old.len() - 2], &delta));
    let mut longer = old.clone();
    longer.extend_from_slice(&[0, 0]);
    delta_error(sparse::decode(&longer, &delta));

    // Same length, other bytes: decodes, and only the hash can tell.
    let mut rng = Rng::new(4);
    let other = bf16_weights(&mut rng, old.len());
    let rebuilt = sparse::decode(&other, &delta).unwrap();
    assert!(rebuilt != new);
    let message = delta_error(sparse::decode_verified(
        &other,
        &delta,
        HashAlgorithm::Blake3,
        &hash,
    ));
    assert!(message.contains(&hash), "{message}");
    assert!(message.contains(&blake3(&rebuilt)), "{message}");
}

#[test]
fn trailing_garbage_is_rejected() {
    let (old, _, delta, _) = small_case();
    for tail in [&[0u8][..], b"garbage", &delta[HEADER_BYTES..]] {
        let mut bad = delta.clone();
        bad.extend_from_slice(tail);
        let message = delta_error(sparse::decode(&old, &bad));
        assert!(message.contains("after the zstd frame"), "{message}");
    }
}

#[test]
fn frame_that_inflates_past_the_chunk_is_rejected() {
    // A valid header for a 4 KiB chunk around a small frame of 64 MiB of
    // zeros: the bounded decompression refuses it without inflating it.
    let old = vec![0u8; 4096];
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    assert!(bomb.len() < 64 * 1024);
    let mut bad = Vec::from(*b"HWD1");
    bad.extend_from_slice(&4096u64.to_le_bytes());
    bad.extend_from_slice(&bomb);
    delta_error(sparse::decode(&old, &bad));
}
