//! `Backend::bench` for the CPU: wall-clock time per run and measured extra heap bytes.

use crate::CpuBackend;
use flashattn_core::{
    alloc_meter, random_inputs, Algorithm, AttentionSpec, Backend, BenchMeasure, BenchPlan, Result,
};
use std::time::Instant;

pub(crate) fn bench(
    backend: &CpuBackend,
    spec: &AttentionSpec,
    algo: Algorithm,
    plan: &BenchPlan,
    progress: &mut dyn FnMut(),
) -> Result<BenchMeasure> {
    backend.supports(spec)?;
    let (q, k, v) = random_inputs(spec, plan.seed);
    let (q, k, v) = (q.as_ref(), k.as_ref(), v.as_ref());
    // Output and LSE are results, not extra memory.
    let out_bytes = spec.out_elems().unwrap_or(0) as u64 * spec.dtype.output().size_bytes() as u64
        + if spec.return_lse {
            spec.lse_elems().unwrap_or(0) as u64 * 4
        } else {
            0
        };
    let mut measure = BenchMeasure::default();
    for run in 0..plan.warmup + plan.iters {
        let baseline = alloc_meter::start();
        let t0 = Instant::now();
        let out = match algo {
            Algorithm::Flash => backend.forward(spec, q, k, v)?,
            Algorithm::Naive => backend.naive_forward(spec, q, k, v)?,
            Algorithm::Copy => {
                return Err(flashattn_core::Error::unsupported(
                    "cpu",
                    "the copy peer is not implemented yet",
                ))
            }
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let extra = alloc_meter::peak_above(baseline).map(|b| b.saturating_sub(out_bytes));
        drop(out);
        if run >= plan.warmup {
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
