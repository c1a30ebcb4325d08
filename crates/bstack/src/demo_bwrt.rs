//! The demo's bwrt stage: the WaveSpec that the datajax stage exported from
//! the serving trace drives a runtime through the C ABI, and the SwapPlan
//! that the hotweights stage rolled out says when the weights may change.
//!
//! The runtime takes the spec's tile and dtype, and the swap window of the
//! SwapPlan (which the hotweights stage took from the same spec; the stage
//! fails if the two disagree, since then the runtime and the rollout would
//! not mean the same waves). Version 1 of
//! the weights serves the waves before the window; version 2 is offered at
//! wave 0 (refused: outside the window), queued, and lands exactly when the
//! window opens; once the window has closed a third swap is refused. Every
//! step is checked: the products against a naive reference (so the waves
//! before the window really used version 1 and the ones after it version
//! 2), and the counters against the waves and swaps the stage made.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use bstack_plan::SwapPlan;
use bwrt::Status;
use bwrt::ffi::BwrtCounters;
use serde_json::json;

use crate::bwrt_abi::{
    AbiRuntime, Api, B, Matrix, RuntimeSettings, Swap, Wave, max_relative_error, random_matrix,
    tolerance,
};
use crate::bwrt_cmd::{counters_json, read_wave_spec};

/// At most this many waves run, whatever the spec's `num_waves`.
const MAX_WAVES: u64 = 2000;
/// Waves in flight at once (each has its own output matrix).
const BATCH: usize = 64;

/// Runs waves `[from, to)` with B from `b`; returns the first wave's output.
fn run_range(
    rt: &AbiRuntime,
    a: &Matrix,
    b: B<'_>,
    outs: &mut [Matrix],
    from: u64,
    to: u64,
) -> Result<Option<Matrix>> {
    let mut first = None;
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(outs.len());
        let mut waves: Vec<Wave<'_>> = outs[..n].iter_mut().map(|c| Wave { a, b, c }).collect();
        rt.run_waves(&mut waves)
            .with_context(|| format!("running waves {at}..{}", at + n as u64))?;
        if first.is_none() {
            first = outs.first().cloned();
        }
        at += n as u64;
    }
    Ok(first)
}

/// The stage. Returns its figures in words and its JSON summary.
pub fn bwrt_stage(wave_spec: &Path, swap_plan: &Path) -> Result<(String, serde_json::Value)> {
    let spec = read_wave_spec(wave_spec)?;
    let plan = crate::hotweights::read_valid::<SwapPlan>(swap_plan)?;
    let window = plan.window.unwrap_or_default();
    ensure!(
        (window.wave_begin, window.wave_end) == (spec.swap_begin, spec.swap_end),
        "{}: the swap window is waves [{}, {}), but {} says [{}, {})",
        swap_plan.display(),
        window.wave_begin,
        window.wave_end,
        wave_spec.display(),
        spec.swap_begin,
        spec.swap_end
    );
    let settings = RuntimeSettings::from_wave_spec(&spec, 2)?;
    let api = Api::negotiate()?;
    let rt = api
        .runtime(&settings)
        .context("creating the bwrt runtime from the WaveSpec")?;
    let dtype = settings.dtype;
    let (begin, end) = (spec.swap_begin, spec.swap_end);
    if begin >= MAX_WAVES {
        bail!(
            "{}: the swap window opens at wave {begin}; the demo runs at most {MAX_WAVES} waves",
            wave_spec.display()
        );
    }
    let total = spec.num_waves.max(end.saturating_add(1)).min(MAX_WAVES);
    // One tile in M and N, two steps in K: small waves, every tile path used.
    let (m, n, k) = (
        (spec.bm as usize).clamp(1, 256),
        (spec.bn as usize).clamp(1, 256),
        (2 * spec.bk as usize).clamp(1, 256),
    );
    let a = random_matrix(dtype, m, k, 11);
    let v1 = random_matrix(dtype, k, n, 1);
    let v2 = random_matrix(dtype, k, n, 2);
    let mut outs: Vec<Matrix> = (0..BATCH).map(|_| Matrix::zeros(dtype, m, n)).collect();
    let tolerance = tolerance(dtype);
    let mut steps: Vec<(String, String)> = Vec::new();
    let mut violations = 0u64;

    // Offer version 2 at wave 0, without queueing.
    match rt.set_weights(0, &v2, false) {
        Ok(Swap::Applied) => steps.push((
            "swap to v2 at wave 0".into(),
            format!("applied at once (the window [{begin}, {end}) is open)"),
        )),
        Ok(Swap::Queued) => bail!("a swap without BWRT_SWAP_QUEUE was queued"),
        Err(e) if e.status == Status::OutsideSwapWindow => {
            violations += 1;
            steps.push((
                "swap to v2 at wave 0".into(),
                format!("refused: {}", e.message),
            ));
            let outcome = rt.set_weights(0, &v2, true)?;
            ensure!(outcome == Swap::Queued, "the queued swap was {outcome:?}");
            steps.push((
                "same swap, BWRT_SWAP_QUEUE".into(),
                format!("queued until wave {begin}"),
            ));
        }
        Err(e) => return Err(e.into()),
    }

    // Waves before the window use version 1, given with each wave.
    let before = run_range(&rt, &a, B::Matrix(&v1), &mut outs, 0, begin.min(total))?;
    if let Some(c) = &before {
        let err = max_relative_error(&a, &v1, c);
        ensure!(
            err <= tolerance,
            "wave 0 does not match A · v1 (error {err:.2e})"
        );
        steps.push((
            format!("waves 0..{begin} (B = v1)"),
            format!("ran; wave 0 matches A · v1 (max relative error {err:.1e})"),
        ));
    }
    let counters = rt.sample()?;
    ensure!(
        counters.swaps_pending == 0,
        "the queued swap is still pending at wave {}",
        counters.waves_completed
    );

    // Inside the window the slot holds version 2.
    let inside = run_range(
        &rt,
        &a,
        B::Weights(0),
        &mut outs,
        begin.min(total),
        end.min(total),
    )?;
    if let Some(c) = &inside {
        let err = max_relative_error(&a, &v2, c);
        ensure!(
            err <= tolerance,
            "wave {begin} does not match A · v2 (error {err:.2e})"
        );
        steps.push((
            format!("waves {begin}..{} (B = slot 0)", end.min(total)),
            format!("ran; wave {begin} matches A · v2: the swap landed as the window opened"),
        ));
    }

    // After the window, swaps are refused and the slot keeps version 2.
    if end < total {
        match rt.set_weights(0, &v1, true) {
            Err(e) if e.status == Status::OutsideSwapWindow => {
                violations += 1;
                steps.push((
                    format!("swap back to v1 at wave {end}"),
                    format!("refused: {}", e.message),
                ));
            }
            Err(e) => return Err(e.into()),
            Ok(outcome) => bail!("a swap after the window was {outcome:?}"),
        }
        let last = run_range(&rt, &a, B::Weights(0), &mut outs, end, total)?;
        if let Some(c) = &last {
            let err = max_relative_error(&a, &v2, c);
            ensure!(
                err <= tolerance,
                "wave {end} does not match A · v2 (error {err:.2e})"
            );
            steps.push((
                format!("waves {end}..{total} (B = slot 0)"),
                "ran; still v2".into(),
            ));
        }
    }

    let c: BwrtCounters = rt.sample()?;
    ensure!(
        c.waves_submitted == total && c.waves_completed == total && c.waves_failed == 0,
        "counters disagree with the {total} waves run: {c:?}"
    );
    ensure!(
        c.swaps_applied == 1 && c.swap_window_violations == violations,
        "counters disagree with the swaps made (1 applied, {violations} refused): {c:?}"
    );
    let offered = if begin == 0 {
        "v2 offered at wave 0, inside the window: applied at once".to_owned()
    } else {
        format!(
            "v2 offered at wave 0: refused, queued, applied at wave {begin};\n\
             waves before it match A · v1, from it on A · v2"
        )
    };
    let after = if end < total {
        format!("swap at wave {end}, after the window: refused")
    } else {
        format!("the window lasts to the last wave ({total})")
    };
    let text = format!(
        "{total} waves of {m} x {n} x {k} {dtype} (tile {} x {} x {}) through the C ABI;\n\
         {offered};\n{after}; counters: {} violations, {} swap applied",
        spec.bm, spec.bn, spec.bk, c.swap_window_violations, c.swaps_applied,
    );
    let summary = json!({
        "wave_spec": wave_spec, "swap_plan": swap_plan, "waves": total, "shape": [m, n, k],
        "dtype": dtype.name(), "swap_window": [begin, end],
        "steps": steps.iter().map(|(s, r)| json!({"step": s, "result": r})).collect::<Vec<_>>(),
        "counters": counters_json(&c),
    });
    Ok((text, summary))
}
