//! Sparse deltas: shipping `zstd(old XOR new)` instead of a changed chunk.
//!
//! Between two RL steps an optimizer moves most bf16 weights by less than
//! one unit in the last place, so ~98-99 % of elements come out
//! bit-identical, and the ones that do change mostly differ in their low
//! mantissa bits. A manifest chunk whose hash changed is therefore usually
//! *almost* the chunk the receiver already holds. XOR-ing the two gives a
//! buffer that is zero everywhere except the few changed bytes, and zstd
//! squeezes long runs of zeros to almost nothing: a 4 MiB chunk with 1 % of
//! its elements nudged encodes to about 1.3 % of its size (see the figures on
//! [`DEFAULT_LEVEL`]).
//!
//! # When it pays
//!
//! Only when the receiver holds the *old* bytes of the same chunk (same
//! tensor, same offset, same length) and few elements changed. A reshaped
//! tensor cannot be XOR-ed, and a chunk rewritten wholesale (a fresh
//! initialisation, a 100 % update) XORs to noise that zstd cannot shrink.
//! [`encode`] decides for the caller: it returns `None` in both cases, and
//! whenever the encoding would not be smaller than `new` itself, so a planner
//! can simply call it and ship the delta when it gets one.
//!
//! ```
//! use bstack_plan::HashAlgorithm;
//! use hotweights::{hash_hex, sparse};
//!
//! let old = vec![7u8; 1 << 16];
//! let mut new = old.clone();
//! new[1000] ^= 1; // one low mantissa bit moved
//!
//! let delta = sparse::encode(&old, &new)?.expect("a one-byte change pays");
//! assert!(delta.len() < 100);
//!
//! let expected = hash_hex(HashAlgorithm::Blake3, &new).unwrap();
//! let rebuilt = sparse::decode_verified(&old, &delta, HashAlgorithm::Blake3, &expected)?;
//! assert_eq!(rebuilt, new);
//! # Ok::<(), hotweights::HotweightsError>(())
//! ```
//!
//! # Wire format
//!
//! One encoded chunk is self-describing:
//!
//! | bytes    | content                                                   |
//! |----------|-----------------------------------------------------------|
//! | 0..4     | magic `HWD1` ([`MAGIC`])                                  |
//! | 4..12    | chunk length in bytes, u64 little-endian                  |
//! | 12..     | exactly one zstd frame of `old XOR new` (that many bytes) |
//!
//! # What the receiver checks
//!
//! [`decode`] rejects, with [`HotweightsError::Delta`], a delta that is too
//! short for its header, has the wrong magic, states a length other than the
//! old chunk's, carries anything after its one zstd frame, or whose frame
//! does not decompress to exactly the stated length. Decompression is
//! bounded by the old chunk's length, so a hostile or corrupt delta can never
//! make the receiver allocate more than the chunk it already holds.
//!
//! A well-formed delta applied to the wrong old chunk (or a frame corrupted
//! in a way zstd does not notice) still rebuilds *some* bytes of the right
//! length. That is why the receiver should use [`decode_verified`], which
//! hashes the result and accepts it only if it matches the new chunk's hash
//! from the manifest, exactly as if the chunk had been shipped whole.

use bstack_plan::HashAlgorithm;

use crate::{HotweightsError, Result, hash_hex};

/// The four bytes every encoded chunk starts with.
pub const MAGIC: [u8; 4] = *b"HWD1";

/// Length of the header before the zstd frame: the magic and the u64 length.
pub const HEADER_BYTES: usize = MAGIC.len() + 8;

/// The zstd level [`encode`] uses: 1.
///
/// Measured on a 4 MiB bf16 chunk (release build, one core; the ignored
/// `level_sweep` integration test prints the table), the XOR buffer is so
/// sparse that the higher levels find little more to squeeze:
///
/// | changed | level -1       | level 1            | level 3            | level 9            |
/// |---------|----------------|--------------------|--------------------|--------------------|
/// | 0.1 %   | 0.23 %, 0.9 ms | **0.15 %, 1.0 ms** | 0.20 %, 1.3 ms     | 0.15 %, 6.3 ms     |
/// | 1 %     | 1.69 %, 2.1 ms | **1.32 %, 2.2 ms** | 1.35 %, 2.6 ms     | 1.20 %, 19 ms      |
/// | 10 %    | 10.9 %, 8.4 ms | **8.74 %, 8.0 ms** | 8.74 %, 8.6 ms     | 7.67 %, 46 ms      |
///
/// (encoded size as a share of the chunk, encode time). Level 1 is as small
/// as zstd's default level 3, or smaller, and 15-25 % faster; the negative
/// levels are no faster here (the zero runs are cheap at any level) but
/// 25-60 % larger; level 9 saves under 10 % more at 3-8 times the time, which
/// a link of a few GB/s does not repay. Decoding takes 0.4-3.5 ms whatever
/// the level.
pub const DEFAULT_LEVEL: i32 = 1;

/// Encodes `new` as a sparse delta against `old`, at [`DEFAULT_LEVEL`].
///
/// Returns `Ok(None)` when a delta does not apply or does not pay: the two
/// chunks differ in length, or the encoding (header included) is not smaller
/// than `new.len()`. In that case ship `new` as it is.
///
/// # Errors
///
/// [`HotweightsError::Delta`] only if zstd itself fails, which it does not
/// for any input at a valid level.
pub fn encode(old: &[u8], new: &[u8]) -> Result<Option<Vec<u8>>> {
    encode_with_level(old, new, DEFAULT_LEVEL)
}

/// [`encode`] at an explicit zstd `level` (1 to 22, or negative for the
/// fast levels; 0 means zstd's own default, 3).
///
/// # Errors
///
/// [`HotweightsError::Delta`] if zstd rejects the level or fails.
pub fn encode_with_level(old: &[u8], new: &[u8], level: i32) -> Result<Option<Vec<u8>>> {
    if old.len() != new.len() {
        return Ok(None);
    }
    // A zip of two slices into a collect is a trusted-length loop with no
    // bounds checks, which the compiler vectorises.
    let xor: Vec<u8> = old.iter().zip(new).map(|(a, b)| a ^ b).collect();
    let frame = zstd::bulk::compress(&xor, level)
        .map_err(|e| HotweightsError::Delta(format!("zstd level {level} failed: {e}")))?;
    if HEADER_BYTES.saturating_add(frame.len()) >= new.len() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + frame.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(new.len() as u64).to_le_bytes());
    out.extend_from_slice(&frame);
    Ok(Some(out))
}

/// The number of bytes it takes to ship `new` to a receiver holding `old`:
/// the delta's length when [`encode`] returns one, otherwise `new.len()`.
///
/// # Errors
///
/// As [`encode`].
pub fn wire_bytes(old: &[u8], new: &[u8]) -> Result<u64> {
    Ok(match encode(old, new)? {
        Some(delta) => delta.len() as u64,
        None => new.len() as u64,
    })
}

/// Rebuilds the new chunk from the `old` one and a `delta` made by
/// [`encode`]. Checks the format (see the [module docs](self)) but not the
/// content: prefer [`decode_verified`] on untrusted input.
///
/// Never allocates more than `old.len()` bytes for the result.
///
/// # Errors
///
/// [`HotweightsError::Delta`] if the delta is truncated, has the wrong magic,
/// states a length other than `old.len()`, has bytes after its zstd frame, or
/// its frame is corrupt or does not decompress to exactly `old.len()` bytes.
pub fn decode(old: &[u8], delta: &[u8]) -> Result<Vec<u8>> {
    let frame = check_header(old.len(), delta)?;
    let frame_len = zstd::zstd_safe::find_frame_compressed_size(frame)
        .map_err(|code| corrupt_frame(frame.len(), code))?;
    if frame_len != frame.len() {
        return Err(HotweightsError::Delta(format!(
            "{} bytes after the zstd frame of {frame_len} bytes",
            frame.len().saturating_sub(frame_len)
        )));
    }
    // The frame header states its content size; refuse a disagreeing one
    // before decompressing anything.
    if let Ok(Some(content)) = zstd::zstd_safe::get_frame_content_size(frame)
        && content != old.len() as u64
    {
        return Err(HotweightsError::Delta(format!(
            "zstd frame holds {content} bytes, the chunk has {}",
            old.len()
        )));
    }
    // Capacity is the exact chunk length: a frame that would decompress to
    // more fails instead of growing the buffer.
    let mut out = zstd::bulk::decompress(frame, old.len()).map_err(|e| {
        HotweightsError::Delta(format!(
            "zstd frame does not decompress to {} bytes: {e}",
            old.len()
        ))
    })?;
    if out.len() != old.len() {
        return Err(HotweightsError::Delta(format!(
            "zstd frame decompresses to {} bytes, the chunk has {}",
            out.len(),
            old.len()
        )));
    }
    for (byte, o) in out.iter_mut().zip(old) {
        *byte ^= o;
    }
    Ok(out)
}

/// [`decode`], then checks that the rebuilt chunk hashes to `expected_hex`
/// (the new chunk's lowercase hex digest from the manifest) under
/// `algorithm`.
///
/// # Errors
///
/// As [`decode`], and [`HotweightsError::Delta`] if the rebuilt chunk hashes
/// to anything else (the wrong old chunk, or a corrupt delta) or `algorithm`
/// names no hash function.
pub fn decode_verified(
    old: &[u8],
    delta: &[u8],
    algorithm: HashAlgorithm,
    expected_hex: &str,
) -> Result<Vec<u8>> {
    let new = decode(old, delta)?;
    let Some(actual) = hash_hex(algorithm, &new) else {
        return Err(HotweightsError::Delta(format!(
            "cannot verify the rebuilt chunk: hash algorithm {algorithm:?} names no function"
        )));
    };
    if !actual.eq_ignore_ascii_case(expected_hex) {
        return Err(HotweightsError::Delta(format!(
            "delta rebuilds a chunk hashing to {actual}, expected {expected_hex}"
        )));
    }
    Ok(new)
}

/// Checks the magic and the stated length against `chunk_len`; returns the
/// zstd frame after the header.
fn check_header(chunk_len: usize, delta: &[u8]) -> Result<&[u8]> {
    let Some((header, frame)) = delta.split_first_chunk::<HEADER_BYTES>() else {
        return Err(HotweightsError::Delta(format!(
            "{} bytes is shorter than the {HEADER_BYTES}-byte header",
            delta.len()
        )));
    };
    let (magic, length) = header.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(HotweightsError::Delta(format!(
            "magic {} is not {}",
            magic.escape_ascii(),
            MAGIC.escape_ascii()
        )));
    }
    let mut le = [0u8; 8];
    le.copy_from_slice(length);
    let stated = u64::from_le_bytes(le);
    if stated != chunk_len as u64 {
        return Err(HotweightsError::Delta(format!(
            "delta is for a {stated}-byte chunk, the old chunk has {chunk_len} bytes"
        )));
    }
    Ok(frame)
}

fn corrupt_frame(len: usize, code: zstd::zstd_safe::ErrorCode) -> HotweightsError {
    HotweightsError::Delta(format!(
        "the {len} bytes after the header are not one complete zstd frame: {}",
        zstd::zstd_safe::get_error_name(code)
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn delta_error(result: Result<Vec<u8>>) -> String {
        match result {
            Err(HotweightsError::Delta(message)) => message,
            other => panic!("expected a Delta error, got {other:?}"),
        }
    }

    fn sample() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut new = old.clone();
        new[17] ^= 0x01;
        new[4000] ^= 0x40;
        let delta = encode(&old, &new).unwrap().unwrap();
        (old, new, delta)
    }

    #[test]
    fn header_is_magic_then_le_length() {
        let (old, new, delta) = sample();
        assert_eq!(&delta[..4], b"HWD1");
        assert_eq!(delta[4..12], 4096u64.to_le_bytes());
        assert_eq!(decode(&old, &delta).unwrap(), new);
    }

    #[test]
    fn identical_chunks_encode_to_a_tiny_delta() {
        let old = vec![0x5au8; 4096];
        let delta = encode(&old, &old).unwrap().unwrap();
        assert!(delta.len() < 32, "{}", delta.len());
        assert_eq!(decode(&old, &delta).unwrap(), old);
    }

    #[test]
    fn no_delta_for_different_lengths_or_empty_or_tiny_chunks() {
        assert_eq!(encode(&[1, 2, 3], &[1, 2]).unwrap(), None);
        assert_eq!(encode(&[], &[]).unwrap(), None);
        assert_eq!(encode(&[1; 8], &[1; 8]).unwrap(), None);
        assert_eq!(wire_bytes(&[1; 8], &[2; 8]).unwrap(), 8);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let (old, _, delta) = sample();
        for len in 0..delta.len() {
            delta_error(decode(&old, &delta[..len]));
        }
    }

    #[test]
    fn short_header_wrong_magic_and_wrong_length_are_rejected() {
        let (old, _, delta) = sample();
        assert!(delta_error(decode(&old, &delta[..11])).contains("header"));

        let mut bad = delta.clone();
        bad[0] = b'X';
        assert!(delta_error(decode(&old, &bad)).contains("magic"));

        let mut bad = delta.clone();
        bad[4..12].copy_from_slice(&4095u64.to_le_bytes());
        assert!(delta_error(decode(&old, &bad)).contains("4095"));

        // A huge stated length is refused before any allocation.
        let mut bad = delta.clone();
        bad[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        delta_error(decode(&old, &bad));

        // The right delta against a shorter old chunk.
        assert!(delta_error(decode(&old[..4095], &delta)).contains("4096"));
    }

    #[test]
    fn trailing_bytes_and_second_frames_are_rejected() {
        let (old, _, delta) = sample();
        let mut bad = delta.clone();
        bad.push(0);
        assert!(delta_error(decode(&old, &bad)).contains("after the zstd frame"));

        let mut bad = delta.clone();
        bad.extend_from_slice(&delta[HEADER_BYTES..]);
        assert!(delta_error(decode(&old, &bad)).contains("after the zstd frame"));
    }

    #[test]
    fn frame_of_the_wrong_content_size_is_rejected() {
        // A valid header for 4096 bytes around a valid frame of 100 bytes.
        let old = vec![0u8; 4096];
        let mut bad = Vec::from(MAGIC);
        bad.extend_from_slice(&4096u64.to_le_bytes());
        bad.extend_from_slice(&zstd::bulk::compress(&[0u8; 100], 1).unwrap());
        assert!(delta_error(decode(&old, &bad)).contains("100"));

        // Same for a frame that holds more than the chunk.
        let mut bad = Vec::from(MAGIC);
        bad.extend_from_slice(&4096u64.to_le_bytes());
        bad.extend_from_slice(&zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap());
        delta_error(decode(&old, &bad));
    }

    #[test]
    fn frame_without_content_size_is_still_bounded() {
        // A streaming frame does not state its content size, so only the
        // bounded decompression stands between it and the allocator.
        let old = vec![0u8; 4096];
        for inner in [100usize, 4096, 1 << 20] {
            let mut frame = Vec::new();
            {
                let mut encoder = zstd::stream::Encoder::new(&mut frame, 1).unwrap();
                encoder.include_contentsize(false).unwrap();
                std::io::Write::write_all(&mut encoder, &vec![0u8; inner]).unwrap();
                encoder.finish().unwrap();
            }
            assert!(matches!(
                zstd::zstd_safe::get_frame_content_size(&frame),
                Ok(None)
            ));
            let mut delta = Vec::from(MAGIC);
            delta.extend_from_slice(&4096u64.to_le_bytes());
            delta.extend_from_slice(&frame);
            let result = decode(&old, &delta);
            if inner == 4096 {
                assert_eq!(result.unwrap(), old);
            } else {
                delta_error(result);
            }
        }
    }

    #[test]
    fn empty_chunk_decodes_from_a_valid_frame() {
        let mut delta = Vec::from(MAGIC);
        delta.extend_from_slice(&0u64.to_le_bytes());
        delta.extend_from_slice(&zstd::bulk::compress(&[], 1).unwrap());
        assert_eq!(decode(&[], &delta).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn verification_rejects_the_wrong_hash_and_unspecified_algorithm() {
        let (old, new, delta) = sample();
        let right = hash_hex(HashAlgorithm::Sha256, &new).unwrap();
        assert_eq!(
            decode_verified(&old, &delta, HashAlgorithm::Sha256, &right).unwrap(),
            new
        );
        let wrong = hash_hex(HashAlgorithm::Sha256, &old).unwrap();
        let message = delta_error(decode_verified(&old, &delta, HashAlgorithm::Sha256, &wrong));
        assert!(
            message.contains(&right) && message.contains(&wrong),
            "{message}"
        );
        delta_error(decode_verified(
            &old,
            &delta,
            HashAlgorithm::Unspecified,
            &right,
        ));
    }
}
