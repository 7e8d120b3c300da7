//! `Backend::bench` for the CPU: wall-clock time per run and measured extra heap bytes.

use crate::CpuBackend;
use flashattn_core::{
    alloc_meter, random_inputs, random_tensor, Algorithm, AttentionSpec, Backend, BackwardInputs,
    BenchMeasure, BenchPlan, Error, Pass, Result,
};
use rand::SeedableRng;
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
        Pass::Backward => backward(backend, spec, algo, plan.seed, runs, plan.warmup, progress),
        Pass::Decode => Err(Error::unsupported(
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

/// Times the backward alone: inputs, dout and the forward's out and LSE are made first and
/// stay resident; dq, dk and dv are results, not extra memory.
fn backward(
    backend: &CpuBackend,
    spec: &AttentionSpec,
    algo: Algorithm,
    seed: u64,
    runs: usize,
    warmup: usize,
    progress: &mut dyn FnMut(),
) -> Result<BenchMeasure> {
    backend.supports_backward(spec)?;
    let spec = &spec.clone().return_lse(true);
    let c = spec.validate()?;
    let (q, k, v) = random_inputs(spec, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let dout = random_tensor(&mut rng, spec.dtype.output(), c.sizes.out);
    let fwd = backend.forward(spec, q.as_ref(), k.as_ref(), v.as_ref())?;
    let lse = fwd
        .lse
        .ok_or_else(|| Error::backend("cpu", "the forward gave no LSE"))?;
    let inputs = BackwardInputs {
        q: q.as_ref(),
        k: k.as_ref(),
        v: v.as_ref(),
        out: fwd.out.as_ref(),
        lse: &lse,
        dout: dout.as_ref(),
    };
    let grad_bytes = ((c.sizes.q + c.sizes.k + c.sizes.v) * spec.dtype.size_bytes()) as u64;
    time_runs(runs, warmup, grad_bytes, progress, || {
        match algo {
            Algorithm::Naive => backend.naive_backward(spec, inputs),
            _ => backend.backward(spec, inputs),
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
