//! GEMM waves: `C = A · B`, tiled by the wave spec's `(bm, bn, bk)`.
//!
//! A wave multiplies `A [m x k]` by `B [k x n]` into `C [m x n]`. The output
//! is cut into `bm x bn` tiles, visited row by row; each tile accumulates
//! `ceil(k / bk)` products of a `bm x bk` panel of A and a `bk x bn` panel of
//! B, each computed by the `gemm` crate's SIMD kernel (see `kernel.rs`).
//! Edge tiles are simply smaller, so no dimension needs to be a multiple of
//! its tile.
//!
//! Precision: every product is accumulated in f32. F32 operands are read
//! where they lie and an F32 output is accumulated where it lies; f16 and
//! bf16 inputs are widened to f32 once per wave, and such an output is
//! written once, at the end, in its own dtype (A's dtype or F32). A and B
//! must share a dtype.
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

/// An f32 operand for the kernel: the caller's memory itself when it holds
/// aligned little-endian f32 (no copy), else a row-major decoded copy.
enum Operand<'a> {
    Borrowed(&'a [f32], View),
    Owned(Vec<f32>, View),
}

impl Operand<'_> {
    fn parts(&self) -> (&[f32], View) {
        match self {
            Operand::Borrowed(s, v) => (s, *v),
            Operand::Owned(s, v) => (s, *v),
        }
    }
}

/// The view of `t` as f32 elements of `bytes`, if they can be used in place.
fn in_place(t: &Tensor, bytes: &[u8]) -> Option<(usize, usize, usize)> {
    (t.dtype == DType::F32 && cfg!(target_endian = "little"))
        .then(|| (t.offset, t.strides[0], t.strides[1]))
        .filter(|_| bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok())
}

fn operand<'a>(t: &Tensor, bytes: &'a [u8]) -> Operand<'a> {
    if let (Some((offset, rs, cs)), Ok(values)) = (
        in_place(t, bytes),
        bytemuck::try_cast_slice::<u8, f32>(bytes),
    ) {
        return Operand::Borrowed(values, View { offset, rs, cs });
    }
    Operand::Owned(
        t.decode(bytes),
        View {
            offset: 0,
            rs: t.shape[1],
            cs: 1,
        },
    )
}

/// Runs `C = A · B` tiled by `tile`. Returns the `(m, n, k)` computed.
///
/// F32 operands are read in place and an F32 output is written in place;
/// other dtypes are widened to f32 first and narrowed at the end. The
/// buffers are locked in address order (A and B for reading, C for
/// writing), so waves whose buffers overlap in any pattern cannot deadlock.
pub fn run_gemm(tile: Tile, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<(usize, usize, usize)> {
    let (m, n, k) = check_gemm(a, b, c)?;
    if tile.bm == 0 || tile.bn == 0 || tile.bk == 0 {
        return Err(Error::invalid("wave_spec.bm/bn/bk", "tiles must be > 0"));
    }
    let shared_ab = a.buffer.same_memory(&b.buffer);
    let mut order = [
        (a.buffer.key(), 0u8),
        (b.buffer.key(), 1),
        (c.buffer.key(), 2),
    ];
    order.sort_unstable();
    let (mut ra, mut rb, mut wc) = (None, None, None);
    for (_, which) in order {
        match which {
            0 => ra = Some(a.buffer.read()),
            1 if !shared_ab => rb = Some(b.buffer.read()),
            2 => wc = Some(c.buffer.write()),
            _ => {}
        }
    }
    let (Some(ra), Some(mut wc)) = (ra, wc) else {
        return Err(Error::Internal("a wave's buffers were not locked".into()));
    };
    let a_bytes = ra.bytes();
    let b_bytes = rb.as_ref().map_or(a_bytes, |g| g.bytes());
    let lhs = operand(a, a_bytes);
    let rhs = operand(b, b_bytes);
    let out = wc.bytes_mut();
    if let Some((offset, rs, cs)) = in_place(c, out) {
        let dst = bytemuck::try_cast_slice_mut::<u8, f32>(out)
            .map_err(|e| Error::Internal(format!("output view: {e}")))?;
        tiles(tile, (m, n, k), dst, View { offset, rs, cs }, &lhs, &rhs)?;
    } else {
        let mut acc = vec![0f32; m * n];
        tiles(
            tile,
            (m, n, k),
            &mut acc,
            View {
                offset: 0,
                rs: n,
                cs: 1,
            },
            &lhs,
            &rhs,
        )?;
        c.encode(out, &acc);
    }
    Ok((m, n, k))
}

/// The tile loop: every `bm x bn` tile of `dst` accumulates its `bk`-deep
/// panel products.
fn tiles(
    tile: Tile,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    d: View,
    lhs: &Operand<'_>,
    rhs: &Operand<'_>,
) -> Result<()> {
    let (lhs, l) = lhs.parts();
    let (rhs, r) = rhs.parts();
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
                    dst,
                    View {
                        offset: d.offset + i0 * d.rs + j0 * d.cs,
                        ..d
                    },
                    p0 > 0,
                    lhs,
                    View {
                        offset: l.offset + i0 * l.rs + p0 * l.cs,
                        ..l
                    },
                    rhs,
                    View {
                        offset: r.offset + p0 * r.rs + j0 * r.cs,
                        ..r
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
    Ok(())
}
