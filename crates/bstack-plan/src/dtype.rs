//! Element types as safetensors spells them, and their sizes.
//!
//! Manifests record a tensor's dtype and shape next to its byte length;
//! knowing the element size lets `validate()` check that the three agree.

/// Bits per element of a safetensors dtype name, or `None` for a name this
/// build does not know. Sub-byte types (`F4`, `F6_*`) are packed.
pub fn dtype_bits(name: &str) -> Option<u64> {
    Some(match name {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Every dtype name [`dtype_bits`] knows.
pub const DTYPES: &[&str] = &[
    "BOOL",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "I64",
    "U64",
    "F64",
    "C64",
];

/// Bytes taken by a tensor of `dtype` and `shape`, or `None` if the dtype is
/// unknown or the size overflows `u64`.
pub fn tensor_bytes(dtype: &str, shape: &[u64]) -> Option<u64> {
    let bits = dtype_bits(dtype)?;
    let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
    Some(elements.checked_mul(bits)?.div_ceil(8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(tensor_bytes("BF16", &[4096, 4096]), Some(32 << 20));
        assert_eq!(tensor_bytes("F32", &[]), Some(4));
        assert_eq!(tensor_bytes("F4", &[3]), Some(2));
        assert_eq!(tensor_bytes("XX", &[1]), None);
        assert_eq!(tensor_bytes("F64", &[u64::MAX, 2]), None);
        assert!(DTYPES.iter().all(|d| dtype_bits(d).is_some()));
    }
}
