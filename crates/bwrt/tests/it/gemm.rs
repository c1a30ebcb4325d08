//! GEMM waves against a naive triple loop.

use std::sync::Arc;

use bwrt::{Buffer, DType, Error, Semaphore, Tensor, WaveDesc};

use crate::util::{Rng, naive, round, runtime, spec};

/// Runs one wave of `m x n x k` on `dtype` inputs with output `out` and
/// returns (result, reference).
pub fn one(
    rt: &bwrt::Runtime,
    rng: &mut Rng,
    (m, n, k): (usize, usize, usize),
    dtype: DType,
    out: DType,
) -> (Vec<f32>, Vec<f32>) {
    let av = rng.values(m * k, dtype);
    let bv = rng.values(k * n, dtype);
    let a = Tensor::from_f32(&av, dtype, m, k).unwrap();
    let b = Tensor::from_f32(&bv, dtype, k, n).unwrap();
    let c = Tensor::zeros(out, m, n);
    let done = Arc::new(Semaphore::new(0));
    rt.submit_wave(
        &WaveDesc::default(),
        a,
        b,
        c.clone(),
        Some((done.clone(), 1)),
    )
    .unwrap();
    done.wait(1, u64::MAX).unwrap();
    let reference = naive(&av, &bv, m, n, k)
        .into_iter()
        .map(|v| round(v, out))
        .collect();
    (c.to_f32(), reference)
}

pub fn assert_close(got: &[f32], want: &[f32], k: usize, out: DType, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    // f32 accumulation over k terms of magnitude <= 1, plus one rounding
    // of the output to its dtype.
    let unit = match out {
        DType::F32 => f32::EPSILON,
        DType::F16 => 1.0 / 1024.0,
        DType::BF16 => 1.0 / 128.0,
    };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * k as f32 + 2.0 * unit * w.abs().max(1.0);
        assert!(
            (g - w).abs() <= tol,
            "{what}: c[{i}] = {g}, want {w} (tol {tol})"
        );
    }
}

#[test]
fn matches_naive_for_shapes_that_are_not_tile_multiples() {
    let rt = runtime(2, 16, spec((8, 16, 4), (0, u64::MAX)));
    let mut rng = Rng::new(7);
    for (m, n, k) in [
        (1, 1, 1),
        (8, 16, 4),
        (9, 17, 5),
        (7, 3, 13),
        (33, 31, 29),
        (64, 1, 100),
        (1, 70, 3),
        (5, 5, 0),
        (0, 4, 4),
    ] {
        let (got, want) = one(&rt, &mut rng, (m, n, k), DType::F32, DType::F32);
        assert_close(&got, &want, k, DType::F32, &format!("f32 {m}x{n}x{k}"));
    }
}

#[test]
fn f16_and_bf16_accumulate_in_f32() {
    let rt = runtime(2, 16, spec((16, 8, 8), (0, u64::MAX)));
    let mut rng = Rng::new(11);
    for dtype in [DType::F16, DType::BF16] {
        for out in [dtype, DType::F32] {
            for (m, n, k) in [(17, 9, 33), (3, 40, 7), (32, 16, 64)] {
                let (got, want) = one(&rt, &mut rng, (m, n, k), dtype, out);
                assert_close(&got, &want, k, out, &format!("{dtype}->{out} {m}x{n}x{k}"));
            }
        }
    }
}

#[test]
fn random_shapes_and_tiles() {
    let mut rng = Rng::new(3);
    for _ in 0..6 {
        let tile = (
            1 + rng.below(20) as u32,
            1 + rng.below(20) as u32,
            1 + rng.below(20) as u32,
        );
        let rt = runtime(1 + rng.below(3) as usize, 8, spec(tile, (0, u64::MAX)));
        for _ in 0..4 {
            let mnk = (
                1 + rng.below(50) as usize,
                1 + rng.below(50) as usize,
                1 + rng.below(50) as usize,
            );
            let (got, want) = one(&rt, &mut rng, mnk, DType::F32, DType::F32);
            assert_close(&got, &want, mnk.2, DType::F32, &format!("{tile:?} {mnk:?}"));
        }
    }
}

#[test]
fn strided_views_transpose_and_offset() {
    strided_wave(&runtime(1, 4, spec((4, 4, 4), (0, u64::MAX))), 5);
}

/// One wave on strided views: A stored transposed after 3 padding
/// elements, C with rows padded to 8 columns (the padding must stay as it
/// was). Shared by every backend's tests.
pub fn strided_wave(rt: &bwrt::Runtime, seed: u64) {
    let (m, n, k) = (6, 5, 7);
    let mut rng = Rng::new(seed);
    let av = rng.values(m * k, DType::F32);
    let bv = rng.values(k * n, DType::F32);
    let mut at = vec![0f32; 3 + m * k];
    for i in 0..m {
        for p in 0..k {
            at[3 + p * m + i] = av[i * k + p];
        }
    }
    let a = Tensor {
        buffer: Buffer::from_f32(&at, DType::F32),
        dtype: DType::F32,
        shape: [m, k],
        strides: [1, m],
        offset: 3,
    };
    let b = Tensor::from_f32(&bv, DType::F32, k, n).unwrap();
    let c = Tensor {
        buffer: Buffer::from_f32(&vec![-9.0; m * 8], DType::F32),
        dtype: DType::F32,
        shape: [m, n],
        strides: [8, 1],
        offset: 0,
    };
    let done = Arc::new(Semaphore::new(0));
    rt.submit_wave(
        &WaveDesc::default(),
        a,
        b,
        c.clone(),
        Some((done.clone(), 1)),
    )
    .unwrap();
    done.wait(1, u64::MAX).unwrap();
    assert_close(
        &c.to_f32(),
        &naive(&av, &bv, m, n, k),
        k,
        DType::F32,
        "strided",
    );
    let all = c.buffer.to_f32(DType::F32);
    for r in 0..m {
        assert_eq!(all[r * 8 + 5..r * 8 + 8], [-9.0; 3], "row {r}'s padding");
    }
}

#[test]
fn bad_shapes_and_dtypes_name_the_field() {
    let rt = runtime(1, 4, spec((4, 4, 4), (0, u64::MAX)));
    let d = WaveDesc::default();
    let t = |dt, r, c| Tensor::zeros(dt, r, c);
    let e = rt
        .submit_wave(
            &d,
            t(DType::F32, 2, 3),
            t(DType::F32, 4, 2),
            t(DType::F32, 2, 2),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadShape {
                field: "b.shape[0]",
                ..
            }
        ),
        "{e}"
    );
    let e = rt
        .submit_wave(
            &d,
            t(DType::F32, 2, 3),
            t(DType::F32, 3, 2),
            t(DType::F32, 2, 5),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadShape {
                field: "c.shape[1]",
                ..
            }
        ),
        "{e}"
    );
    let e = rt
        .submit_wave(
            &d,
            t(DType::F32, 2, 3),
            t(DType::F16, 3, 2),
            t(DType::F32, 2, 2),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadDtype {
                field: "b.dtype",
                ..
            }
        ),
        "{e}"
    );
    let e = rt
        .submit_wave(
            &d,
            t(DType::F16, 2, 3),
            t(DType::F16, 3, 2),
            t(DType::BF16, 2, 2),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadDtype {
                field: "c.dtype",
                ..
            }
        ),
        "{e}"
    );
    // A view past the end of its buffer.
    let mut short = t(DType::F32, 2, 3);
    short.strides = [4, 1];
    let e = rt
        .submit_wave(&d, short, t(DType::F32, 3, 2), t(DType::F32, 2, 2), None)
        .unwrap_err();
    assert!(matches!(e, Error::BadShape { field: "a", .. }), "{e}");
    // The output aliasing an input.
    let a = t(DType::F32, 2, 2);
    let e = rt
        .submit_wave(&d, a.clone(), t(DType::F32, 2, 2), a, None)
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { field: "c", .. }),
        "{e}"
    );
    assert_eq!(rt.sample().waves_submitted, 0);
}

#[test]
fn runtime_config_errors_name_the_field() {
    let bad = |workers, ring_depth, wave_spec| {
        bwrt::Runtime::new(bwrt::RuntimeConfig {
            workers,
            ring_depth,
            wave_spec,
            backend: bwrt::Backend::Cpu,
        })
        .unwrap_err()
    };
    let ok = spec((4, 4, 4), (0, 1));
    assert!(matches!(
        bad(0, 4, ok.clone()),
        Error::InvalidArgument {
            field: "config.workers",
            ..
        }
    ));
    assert!(matches!(
        bad(1, 0, ok.clone()),
        Error::InvalidArgument {
            field: "config.ring_depth",
            ..
        }
    ));
    let e = bad(1, 4, spec((0, 4, 4), (0, 1)));
    assert!(e.to_string().contains("bm"), "{e}");
    let e = bad(1, 4, spec((4, 4, 4), (5, 2)));
    assert!(e.to_string().contains("swap_end"), "{e}");
    let e = bad(
        1,
        4,
        bwrt::WaveSpec {
            dtype: "I8".into(),
            ..ok
        },
    );
    assert!(
        matches!(
            e,
            Error::BadDtype {
                field: "wave_spec.dtype",
                ..
            }
        ),
        "{e}"
    );
}

/// Waves lock their buffers in one global order: waves that read each
/// other's outputs, in flight together on two workers, never deadlock,
/// and a wave may take the same buffer as A and B.
#[test]
fn crossing_waves_do_not_deadlock_and_a_may_be_b() {
    let rt = runtime(2, 64, spec((8, 8, 8), (0, u64::MAX)));
    let x = Tensor::from_f32(&[0.5; 64], DType::F32, 8, 8).unwrap();
    let y = Tensor::from_f32(&[0.25; 64], DType::F32, 8, 8).unwrap();
    let done = Arc::new(Semaphore::new(0));
    let waves = 400u64;
    for i in 0..waves {
        let (a, c) = if i % 2 == 0 { (&x, &y) } else { (&y, &x) };
        let w = Tensor::from_f32(&[0.125; 64], DType::F32, 8, 8).unwrap();
        rt.submit_wave(
            &WaveDesc {
                on_full: bwrt::OnFull::Block,
            },
            a.clone(),
            w,
            c.clone(),
            Some((done.clone(), i + 1)),
        )
        .unwrap();
    }
    // Every wave ends (a deadlock would leave the counters short).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while rt.sample().waves_completed < waves {
        assert!(
            std::time::Instant::now() < deadline,
            "waves stopped: {:?}",
            rt.sample()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // A · A with A = B sharing one buffer.
    let a = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], DType::F32, 2, 2).unwrap();
    let c = Tensor::zeros(DType::F32, 2, 2);
    let sq = Arc::new(Semaphore::new(0));
    rt.submit_wave(
        &WaveDesc::default(),
        a.clone(),
        a,
        c.clone(),
        Some((sq.clone(), 1)),
    )
    .unwrap();
    sq.wait(1, u64::MAX).unwrap();
    assert_eq!(c.to_f32(), [7.0, 10.0, 15.0, 22.0]);
}
