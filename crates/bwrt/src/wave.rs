//! GEMM waves: `C = A · B`, tiled by the wave spec's `(bm, bn, bk)`.
//!
//! A wave multiplies `A [m x k]` by `B [k x n]` into `C [m x n]`. The output
//! is cut into `bm x bn` tiles, visited row by row; each tile accumulates
//! `ceil(k / bk)` products of a `bm x bk` panel of A and a `bk x bn` panel of
//! B, each computed by the `gemm` crate's SIMD kernel (see `kernel.rs`).
//! Edge tiles are simply smaller, so no dimension needs to be a multiple of
//! its tile.
//!
//! Precision: inputs are widened to f32 once per wave and every product is
//! accumulated in f32. `C` is written once, at the end, in its own dtype,
//! which must be A's dtype or F32. A and B must share a dtype.
//!
//! [`check_gemm`] is what submission runs, so a wave that reaches a worker
//! has consistent shapes; it is checked again at run time because a weight
//! slot may have been swapped in between.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel::{View, gemm_f32};
use crate::tensor::Tensor;

/// Tile shape of a wave, from the wave spec's `bm`, `bn`, `bk` (all > 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    /// Tile rows (M).
    pub bm: usize,
    /// Tile columns (N).
    pub bn: usize,
    /// Tile depth (K).
    pub bk: usize,
}

/// The `(m, n, k)` of a consistent GEMM, or the first field that disagrees.
pub fn check_gemm(a: &Tensor, b: &Tensor, c: &Tensor) -> Result<(usize, usize, usize)> {
    if a.dtype != b.dtype {
        return Err(Error::dtype(
            "b.dtype",
            b.dtype,
            format!("must equal a.dtype ({})", a.dtype),
        ));
    }
    if c.dtype != a.dtype && c.dtype != DType::F32 {
        return Err(Error::dtype(
            "c.dtype",
            c.dtype,
            format!("must be a.dtype ({}) or F32", a.dtype),
        ));
    }
    let [m, k] = a.shape;
    let [kb, n] = b.shape;
    if kb != k {
        return Err(Error::shape(
            "b.shape[0]",
            format!("is {kb} but a.shape[1] is {k}"),
        ));
    }
    if c.shape[0] != m {
        return Err(Error::shape(
            "c.shape[0]",
            format!("is {} but a.shape[0] is {m}", c.shape[0]),
        ));
    }
    if c.shape[1] != n {
        return Err(Error::shape(
            "c.shape[1]",
            format!("is {} but b.shape[1] is {n}", c.shape[1]),
        ));
    }
    a.check("a")?;
    b.check("b")?;
    c.check("c")?;
    if c.buffer.same_memory(&a.buffer) || c.buffer.same_memory(&b.buffer) {
        return Err(Error::invalid(
            "c",
            "the output buffer is also an input of the wave",
        ));
    }
    Ok((m, n, k))
}

/// Bytes a wave reads and writes: A and B once, C once.
pub fn wave_bytes(a: &Tensor, b: &Tensor, c: &Tensor) -> u64 {
    [a, b, c]
        .iter()
        .map(|t| (t.elements() * t.dtype.size()) as u64)
        .sum()
}

/// Decodes a tensor view into a row-major f32 vector.
fn widen(t: &Tensor) -> Vec<f32> {
    t.to_f32()
}

/// Runs `C = A · B` tiled by `tile`. Returns the `(m, n, k)` computed.
pub fn run_gemm(tile: Tile, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<(usize, usize, usize)> {
    let (m, n, k) = check_gemm(a, b, c)?;
    if tile.bm == 0 || tile.bn == 0 || tile.bk == 0 {
        return Err(Error::invalid("wave_spec.bm/bn/bk", "tiles must be > 0"));
    }
    let lhs = widen(a);
    let rhs = widen(b);
    let mut acc = vec![0f32; m * n];
    for i0 in (0..m).step_by(tile.bm) {
        let mi = tile.bm.min(m - i0);
        for j0 in (0..n).step_by(tile.bn) {
            let nj = tile.bn.min(n - j0);
            let mut p0 = 0;
            loop {
                let kp = tile.bk.min(k - p0);
                let ok = gemm_f32(
                    mi,
                    nj,
                    kp,
                    &mut acc,
                    View {
                        offset: i0 * n + j0,
                        rs: n,
                        cs: 1,
                    },
                    p0 > 0,
                    &lhs,
                    View {
                        offset: i0 * k + p0,
                        rs: k,
                        cs: 1,
                    },
                    &rhs,
                    View {
                        offset: p0 * n + j0,
                        rs: n,
                        cs: 1,
                    },
                );
                if !ok {
                    return Err(Error::Internal(format!(
                        "tile ({i0}, {j0}, {p0}) does not fit its panels"
                    )));
                }
                p0 += kp;
                if p0 >= k {
                    break;
                }
            }
        }
    }
    let mut guard = c.buffer.write();
    let bytes = guard.bytes_mut();
    for r in 0..m {
        for col in 0..n {
            c.dtype.store(bytes, c.index(r, col), acc[r * n + col]);
        }
    }
    Ok((m, n, k))
}
