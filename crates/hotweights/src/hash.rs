//! Chunk hashing, in the algorithm a manifest names.

use bstack_plan::HashAlgorithm;
use sha2::Digest;

/// The lowercase hex digest of `bytes` under `algorithm`, as manifests store
/// it. `None` for an algorithm that names no function (unspecified or
/// unknown).
pub fn hash_hex(algorithm: HashAlgorithm, bytes: &[u8]) -> Option<String> {
    match algorithm {
        HashAlgorithm::Blake3 => Some(blake3::hash(bytes).to_hex().to_string()),
        HashAlgorithm::Sha256 => Some(format!("{:x}", sha2::Sha256::digest(bytes))),
        HashAlgorithm::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        // Published test vectors for the empty input.
        assert_eq!(
            hash_hex(HashAlgorithm::Sha256, b"").unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hash_hex(HashAlgorithm::Blake3, b"").unwrap(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(hash_hex(HashAlgorithm::Unspecified, b""), None);
    }
}
