//! Backends. The CPU backend is always there; the CUDA backend is in builds
//! with the `cuda` feature and runs where the machine has a device. A
//! backend that is not there is `Unavailable`, saying what is missing; the
//! GPU tests below run on a machine with a device and report themselves
//! skipped elsewhere.

use std::sync::Arc;

use bwrt::{Backend, DType, Error, Operand, Semaphore, Status, SwapMode, Tensor, WaveDesc};

use crate::gemm::{assert_close, one, strided_wave};
use crate::util::{Rng, runtime_on, spec};

#[test]
fn a_backend_that_is_not_there_says_why() {
    // No machine has 4097 GPUs: refused with or without the feature.
    let err = runtime_on(
        Backend::Cuda { device: 4096 },
        1,
        4,
        spec((4, 4, 4), (0, 1)),
    )
    .expect_err("device 4096 does not exist");
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert_eq!(err.status(), Status::Unavailable);
    assert!(err.to_string().contains("CUDA"), "{err}");
    if !cfg!(feature = "cuda") {
        assert!(err.to_string().contains("--features cuda"), "{err}");
        assert_eq!(bwrt::runtime::cuda_devices(), 0);
    }
    // Device 0 is there exactly when the process sees a device.
    match runtime_on(Backend::Cuda { device: 0 }, 1, 4, spec((4, 4, 4), (0, 1))) {
        Ok(rt) => {
            assert!(bwrt::runtime::cuda_devices() > 0);
            assert_eq!(rt.backend(), Backend::Cuda { device: 0 });
        }
        Err(e) => {
            assert_eq!(e.status(), Status::Unavailable, "{e}");
            assert_eq!(bwrt::runtime::cuda_devices(), 0, "{e}");
        }
    }
}

/// A runtime on GPU 0, or `None` (and a line saying why) without one.
fn gpu(workers: usize, tile: (u32, u32, u32), window: (u64, u64)) -> Option<bwrt::Runtime> {
    match runtime_on(Backend::Cuda { device: 0 }, workers, 16, spec(tile, window)) {
        Ok(rt) => Some(rt),
        Err(Error::Unavailable(why)) => {
            eprintln!("skipped: {why}");
            None
        }
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    }
}

#[test]
fn cuda_gemm_matches_naive_on_every_dtype() {
    let Some(rt) = gpu(2, (8, 8, 8), (0, u64::MAX)) else {
        return;
    };
    let mut rng = Rng::new(19);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let outs = if dtype == DType::F32 {
            vec![DType::F32]
        } else {
            vec![dtype, DType::F32]
        };
        for out in outs {
            for (m, n, k) in [
                (1, 1, 1),
                (9, 17, 5),
                (33, 31, 29),
                (64, 1, 100),
                (1, 70, 3),
                (128, 96, 256),
                (5, 5, 0),
                (0, 4, 4),
            ] {
                let (got, want) = one(&rt, &mut rng, (m, n, k), dtype, out);
                assert_close(
                    &got,
                    &want,
                    k,
                    out,
                    &format!("cuda {dtype}->{out} {m}x{n}x{k}"),
                );
            }
        }
    }
    let c = rt.sample();
    assert_eq!(c.waves_failed, 0);
    assert!(c.flops > 0);
}

#[test]
fn cuda_reads_strided_views_and_writes_padded_rows() {
    if let Some(rt) = gpu(1, (4, 4, 4), (0, u64::MAX)) {
        strided_wave(&rt, 23);
    }
}

#[test]
fn cuda_takes_swapped_weights_only_inside_the_window() {
    let Some(rt) = gpu(1, (4, 4, 4), (1, 2)) else {
        return;
    };
    let (m, n, k) = (4, 3, 2);
    let a = Tensor::from_f32(&[1.0; 8], DType::F32, m, k).unwrap();
    let v1 = Tensor::from_f32(&[1.0; 6], DType::F32, k, n).unwrap();
    let v2 = Tensor::from_f32(&[2.0; 6], DType::F32, k, n).unwrap();
    let err = rt.set_weights(0, v2.clone(), SwapMode::Reject).unwrap_err();
    assert_eq!(err.status(), Status::OutsideSwapWindow);
    rt.set_weights(0, v1, SwapMode::Reject).unwrap_err();
    assert_eq!(
        rt.set_weights(0, v2, SwapMode::Queue).unwrap(),
        bwrt::SwapOutcome::Queued
    );
    // Wave 0 runs with B given; the queued swap lands as it completes.
    let done = Arc::new(Semaphore::new(0));
    let b0 = Tensor::from_f32(&[1.0; 6], DType::F32, k, n).unwrap();
    let c0 = Tensor::zeros(DType::F32, m, n);
    rt.submit_wave(
        &WaveDesc::default(),
        a.clone(),
        b0,
        c0.clone(),
        Some((done.clone(), 1)),
    )
    .unwrap();
    done.wait(1, u64::MAX).unwrap();
    assert_eq!(c0.to_f32(), vec![2.0; m * n]);
    let c1 = Tensor::zeros(DType::F32, m, n);
    rt.submit_wave(
        &WaveDesc::default(),
        a,
        Operand::Weights(0),
        c1.clone(),
        Some((done.clone(), 2)),
    )
    .unwrap();
    done.wait(2, u64::MAX).unwrap();
    assert_eq!(
        c1.to_f32(),
        vec![4.0; m * n],
        "wave 1 reads v2 from the slot"
    );
    let c = rt.sample();
    assert_eq!((c.swaps_applied, c.swap_window_violations), (1, 2));
}
