//! The one place where the CPU backend calls the `gemm` crate.
//!
//! `gemm::gemm` takes raw pointers and strides, so calling it is `unsafe`.
//! [`gemm_f32`] wraps it in a safe function over slices: it checks that
//! every element the call can touch lies inside its slice, and that the
//! output does not alias the inputs (it is a `&mut`, so it cannot), before
//! the pointers are formed. Everything else in the crate is safe code.
#![allow(unsafe_code)]

/// A strided row-major-or-not matrix inside a slice: element `[r, c]` is at
/// `offset + r * rs + c * cs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

/// Whether a `rows x cols` view fits in a slice of `len` elements.
fn fits(v: View, rows: usize, cols: usize, len: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    (rows - 1)
        .checked_mul(v.rs)
        .zip((cols - 1).checked_mul(v.cs))
        .and_then(|(a, b)| a.checked_add(b))
        .and_then(|x| x.checked_add(v.offset))
        .is_some_and(|last| last < len)
}

/// `dst[m x n] = (accumulate ? dst : 0) + lhs[m x k] * rhs[k x n]`, single
/// threaded (the runtime's workers are the parallelism). Returns `false`
/// without touching anything if a view does not fit its slice or a stride
/// exceeds `isize::MAX`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    d: View,
    accumulate: bool,
    lhs: &[f32],
    l: View,
    rhs: &[f32],
    r: View,
) -> bool {
    if !(fits(d, m, n, dst.len()) && fits(l, m, k, lhs.len()) && fits(r, k, n, rhs.len())) {
        return false;
    }
    let strides = [d.rs, d.cs, l.rs, l.cs, r.rs, r.cs];
    if strides.iter().any(|&s| isize::try_from(s).is_err()) {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[d.offset + i * d.rs + j * d.cs] = 0.0;
                }
            }
        }
        return true;
    }
    // `fits` proved `offset` < len for each view, so the `add`s stay inside
    // their allocations.
    let dst_ptr = dst[d.offset..].as_mut_ptr();
    let lhs_ptr = lhs[l.offset..].as_ptr();
    let rhs_ptr = rhs[r.offset..].as_ptr();
    // SAFETY: `fits` checked that every element `[i, j]` of each view,
    // at `offset + i * rs + j * cs`, is inside its slice, and that no index
    // computation overflows; the strides fit in `isize` (checked above).
    // `dst` is an exclusive borrow, so it aliases neither input. With
    // `read_dst == false` gemm does not read `dst`, so uninitialised-looking
    // contents do not matter (the slice is initialised anyway).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst_ptr,
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs_ptr,
            l.cs as isize,
            l.rs as isize,
            rhs_ptr,
            r.cs as isize,
            r.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    true
}
