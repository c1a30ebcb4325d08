//! Element types of wave operands.
//!
//! bwrt computes in `f32`: f16 and bf16 inputs are widened to f32 before the
//! multiply and the products are accumulated in f32. The output is written
//! in the dtype of its tensor, which must be the input dtype or F32 (F32
//! keeps the full accumulator; the input dtype rounds once, at the end).

use std::fmt;

use crate::error::{Error, Result};

/// Element type of a tensor. The discriminants are the C ABI's
/// `BwrtDtype` codes and never change.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// IEEE 754 binary16.
    F16 = 1,
    /// bfloat16 (the upper half of an f32).
    BF16 = 2,
}

impl DType {
    /// Every dtype, in code order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The dtype with C ABI code `code`, if any.
    pub fn from_code(code: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| *d as u32 == code)
    }

    /// The dtype of a `WaveSpec.dtype` (safetensors spelling; empty means
    /// F32), or a [`Error::BadDtype`] naming `field`.
    pub fn from_plan(name: &str, field: &'static str) -> Result<DType> {
        match name {
            "" | "F32" => Ok(DType::F32),
            "F16" => Ok(DType::F16),
            "BF16" => Ok(DType::BF16),
            other => Err(Error::BadDtype {
                field,
                message: format!("{other:?} is not supported; expected F32, F16 or BF16"),
            }),
        }
    }

    /// The safetensors spelling (`F32`, `F16`, `BF16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// Reads element `index` of `bytes` (little-endian) as f32.
    pub(crate) fn load(self, bytes: &[u8], index: usize) -> f32 {
        let s = self.size();
        let at = index * s;
        match (self, bytes.get(at..at + s)) {
            (DType::F32, Some(b)) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            (DType::F16, Some(b)) => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            (DType::BF16, Some(b)) => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            (_, None) => f32::NAN,
        }
    }

    /// Decodes the contiguous elements in `bytes` (a whole number of
    /// elements) onto the end of `out`. One pass per dtype, so the compiler
    /// can vectorise it; this is what waves spend on their operands.
    pub(crate) fn load_run(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            DType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
        }
    }

    /// Encodes `values` into the contiguous elements of `bytes` (which
    /// holds `values.len()` elements).
    pub(crate) fn store_run(self, bytes: &mut [u8], values: &[f32]) {
        match self {
            DType::F32 => {
                for (b, v) in bytes.chunks_exact_mut(4).zip(values) {
                    b.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::F16 => {
                for (b, v) in bytes.chunks_exact_mut(2).zip(values) {
                    b.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            DType::BF16 => {
                for (b, v) in bytes.chunks_exact_mut(2).zip(values) {
                    b.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
                }
            }
        }
    }

    /// Writes `value` as element `index` of `bytes` (little-endian, rounded
    /// to nearest even for f16 and bf16). Out-of-range indices are ignored
    /// (callers check bounds first).
    pub(crate) fn store(self, bytes: &mut [u8], index: usize, value: f32) {
        let s = self.size();
        let at = index * s;
        if let Some(b) = bytes.get_mut(at..at + s) {
            match self {
                DType::F32 => b.copy_from_slice(&value.to_le_bytes()),
                DType::F16 => b.copy_from_slice(&half::f16::from_f32(value).to_le_bytes()),
                DType::BF16 => b.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
            }
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
