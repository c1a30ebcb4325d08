//! Swap windows: applied inside, rejected or queued outside.

use std::sync::Arc;

use bwrt::{DType, Error, Operand, Runtime, Semaphore, SwapMode, SwapOutcome, Tensor, WaveDesc};

use crate::util::{runtime, spec};

fn w(x: f32) -> Tensor {
    Tensor::from_f32(&[x], DType::F32, 1, 1).unwrap()
}

/// Runs one 1x1x1 wave `1 · weights[0]` and returns its result.
fn wave(rt: &Runtime) -> Result<f32, Error> {
    let a = w(1.0);
    let c = Tensor::zeros(DType::F32, 1, 1);
    let done = Arc::new(Semaphore::new(0));
    rt.submit_wave(
        &WaveDesc::default(),
        a,
        Operand::Weights(0),
        c.clone(),
        Some((done.clone(), 1)),
    )?;
    done.wait(1, u64::MAX)?;
    Ok(c.to_f32()[0])
}

#[test]
fn swaps_land_only_inside_the_window() {
    // Window [2, 4): swaps allowed once 2 waves have completed and until 4 have.
    let rt = runtime(1, 4, spec((1, 1, 1), (2, 4)));
    let e = rt.set_weights(0, w(1.0), SwapMode::Reject).unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutsideSwapWindow {
                wave_index: 0,
                swap_begin: 2,
                swap_end: 4,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.status(), bwrt::Status::OutsideSwapWindow);
    // Queued before the window; waves fail until it opens (slot empty).
    assert_eq!(
        rt.set_weights(0, w(10.0), SwapMode::Queue).unwrap(),
        SwapOutcome::Queued
    );
    assert_eq!(rt.sample().swaps_pending, 1);
    assert!(wave(&rt).is_err());
    // Failed waves do not advance the wave index.
    assert_eq!(rt.wave_index(), 0);
    // Two waves with their own B move the index to 2.
    for _ in 0..2 {
        let done = Arc::new(Semaphore::new(0));
        rt.submit_wave(
            &WaveDesc::default(),
            w(1.0),
            w(1.0),
            Tensor::zeros(DType::F32, 1, 1),
            Some((done.clone(), 1)),
        )
        .unwrap();
        done.wait(1, u64::MAX).unwrap();
    }
    // Index 2: the queued swap was applied when the window opened.
    assert_eq!(rt.wave_index(), 2);
    assert_eq!(rt.sample().swaps_pending, 0);
    assert_eq!(wave(&rt).unwrap(), 10.0);
    // Index 3: inside, applied at once.
    assert_eq!(
        rt.set_weights(0, w(20.0), SwapMode::Reject).unwrap(),
        SwapOutcome::Applied
    );
    assert_eq!(wave(&rt).unwrap(), 20.0);
    // Index 4: the window has closed; queueing cannot help.
    for mode in [SwapMode::Reject, SwapMode::Queue] {
        let e = rt.set_weights(0, w(30.0), mode).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }
    assert_eq!(wave(&rt).unwrap(), 20.0);
    let s = rt.sample();
    assert_eq!(s.swap_window_violations, 3);
    assert_eq!(s.swaps_applied, 2);
    assert_eq!(s.waves_completed, 5);
    assert_eq!(s.waves_failed, 1);
}

#[test]
fn an_empty_window_refuses_everything() {
    let rt = runtime(1, 4, spec((1, 1, 1), (0, 0)));
    for mode in [SwapMode::Reject, SwapMode::Queue] {
        let e = rt.set_weights(0, w(1.0), mode).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }
}

#[test]
fn the_same_sequence_gives_the_same_outcomes() {
    let run = || {
        let rt = runtime(2, 4, spec((1, 1, 1), (1, 2)));
        let mut outcomes = vec![format!("{:?}", rt.set_weights(0, w(1.0), SwapMode::Queue))];
        for i in 0..3 {
            let done = Arc::new(Semaphore::new(0));
            rt.submit_wave(
                &WaveDesc::default(),
                w(1.0),
                w(2.0),
                Tensor::zeros(DType::F32, 1, 1),
                Some((done.clone(), 1)),
            )
            .unwrap();
            done.wait(1, u64::MAX).unwrap();
            while rt.wave_index() < i + 1 {
                std::thread::yield_now();
            }
            outcomes.push(format!(
                "{:?}",
                rt.set_weights(0, w(i as f32), SwapMode::Reject)
                    .map_err(|e| e.status())
            ));
        }
        outcomes
    };
    let first = run();
    assert_eq!(
        first,
        [
            "Ok(Queued)",
            "Ok(Applied)",
            "Err(OutsideSwapWindow)",
            "Err(OutsideSwapWindow)"
        ]
    );
    for _ in 0..5 {
        assert_eq!(run(), first);
    }
}
