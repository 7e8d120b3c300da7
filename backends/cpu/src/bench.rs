//! `Backend::bench` for the CPU: wall-clock time per run and measured extra heap bytes.

use crate::CpuBackend;
use flashattn_core::{
    alloc_meter, random_inputs, Algorithm, AttentionSpec, Backend, BenchMeasure, BenchPlan, Error,
    Pass, Result,
};
use std::time::Instant;

pub(crate) fn bench(
    backend: &CpuBackend,
    spec: &AttentionSpec,
    algo: Algorithm,
    plan: &BenchPlan,
    progress: &mut dyn FnMut(),
) -> Result<BenchMeasure> {
    let runs = plan.runs()?;
    if algo == Algorithm::Copy {
        return Err(Error::unsupported(
            "cpu",
            "the copy peer is not implemented yet",
        ));
    }
    match plan.pass {
        Pass::Forward => forward(backend, spec, algo, plan.seed, runs, plan.warmup, progress),
        Pass::Backward | Pass::Decode => Err(Error::unsupported(
            "cpu",
            format!("benchmarks of the {} pass", plan.pass.name()),
        )),
    }
}

fn forward(
    backend: &CpuBackend,
    spec: &AttentionSpec,
    algo: Algorithm,
    seed: u64,
    runs: usize,
    warmup: usize,
    progress: &mut dyn FnMut(),
) -> Result<BenchMeasure> {
    backend.supports(spec)?;
    let c = spec.validate()?;
    let (q, k, v) = random_inputs(spec, seed);
    let (q, k, v) = (q.as_ref(), k.as_ref(), v.as_ref());
    // Output and LSE are results, not extra memory.
    let lse_bytes = if spec.return_lse { c.sizes.lse * 4 } else { 0 };
    let out_bytes = (c.sizes.out * spec.dtype.output().size_bytes() + lse_bytes) as u64;
    time_runs(runs, warmup, out_bytes, progress, || {
        match algo {
            Algorithm::Naive => backend.naive_forward(spec, q, k, v),
            _ => backend.forward(spec, q, k, v),
        }
        .map(drop)
    })
}

/// Runs `run` `runs` times; times and measures the peak extra heap (beyond `result_bytes`)
/// of the runs after the first `warmup`.
fn time_runs(
    runs: usize,
    warmup: usize,
    result_bytes: u64,
    progress: &mut dyn FnMut(),
    mut run: impl FnMut() -> Result<()>,
) -> Result<BenchMeasure> {
    let mut measure = BenchMeasure::default();
    for i in 0..runs {
        let baseline = alloc_meter::start();
        let t0 = Instant::now();
        run()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let extra = alloc_meter::peak_above(baseline).map(|b| b.saturating_sub(result_bytes));
        if i >= warmup {
            measure.times_ms.push(ms);
            measure.extra_bytes = match (measure.extra_bytes, extra) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (_, e) => e,
            };
        }
        progress();
    }
    Ok(measure)
}
