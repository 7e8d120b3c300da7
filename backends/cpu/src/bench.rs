//! `Backend::bench` for the CPU: wall-clock time per run and measured extra heap bytes.

use crate::CpuBackend;
use flashattn_core::{
    alloc_meter, random_inputs, random_tensor, Algorithm, AttentionSpec, Backend, BackwardInputs,
    BenchMeasure, BenchPlan, BenchRun, Error, ForwardInputs, Pass, Result,
};
use rand::SeedableRng;
use std::time::Instant;

pub(crate) fn bench(backend: &CpuBackend, run: BenchRun<'_>) -> Result<BenchMeasure> {
    let (algo, plan, progress) = (run.algo, run.plan, run.progress);
    plan.runs()?;
    // The random inputs are contiguous buffers: a strided spec is timed in that layout.
    let spec = &run.spec.contiguous();
    let b = Bench {
        backend,
        spec,
        algo,
        plan,
    };
    match plan.pass {
        // Decode has its own peers (the copy of the bytes a step reads: decode_bench.rs).
        Pass::Decode => b.decode(progress),
        _ if algo == Algorithm::Copy => Err(Error::unsupported(
            "cpu",
            "the copy peer times decode steps only",
        )),
        Pass::Forward => b.forward(progress),
        _ => b.backward(progress),
    }
}

/// One benchmark: an algorithm (flash, naive, or decode's copy) of one pass.
#[derive(Clone, Copy)]
pub(crate) struct Bench<'a> {
    pub backend: &'a CpuBackend,
    pub spec: &'a AttentionSpec,
    pub algo: Algorithm,
    pub plan: &'a BenchPlan,
}

impl Bench<'_> {
    fn forward(&self, progress: &mut dyn FnMut()) -> Result<BenchMeasure> {
        let (backend, spec) = (self.backend, self.spec);
        backend.supports(spec)?;
        let c = spec.validate()?;
        let (q, k, v) = random_inputs(spec, self.plan.seed);
        let inputs = ForwardInputs::of(&q, &k, &v);
        // Output and LSE are results, not extra memory.
        let lse_bytes = if spec.return_lse { c.sizes.lse * 4 } else { 0 };
        let out_bytes = (c.sizes.out * spec.dtype.output().size_bytes() + lse_bytes) as u64;
        time_runs(self.plan, out_bytes, progress, || {
            if self.algo == Algorithm::Naive {
                backend.naive_forward(spec, inputs)
            } else {
                backend.forward(spec, inputs)
            }
            .map(drop)
        })
    }

    /// Times the backward alone: inputs, dout and the forward's out and LSE are made first
    /// and stay resident; dq, dk and dv are results, not extra memory.
    fn backward(&self, progress: &mut dyn FnMut()) -> Result<BenchMeasure> {
        let backend = self.backend;
        backend.supports_backward(self.spec)?;
        let spec = &self.spec.clone().return_lse(true);
        let c = spec.validate()?;
        let (q, k, v) = random_inputs(spec, self.plan.seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.plan.seed ^ 0x5eed);
        let dout = random_tensor(&mut rng, spec.dtype.output(), c.sizes.out);
        let fwd = backend.forward(spec, ForwardInputs::of(&q, &k, &v))?;
        let lse = fwd
            .lse
            .ok_or_else(|| Error::backend("cpu", "the forward gave no LSE"))?;
        let inputs = BackwardInputs::of((&q, &k, &v), &fwd.out, &lse, &dout);
        let grad_bytes = ((c.sizes.q + c.sizes.k + c.sizes.v) * spec.dtype.size_bytes()) as u64;
        time_runs(self.plan, grad_bytes, progress, || {
            if self.algo == Algorithm::Naive {
                backend.naive_backward(spec, inputs)
            } else {
                backend.backward(spec, inputs)
            }
            .map(drop)
        })
    }
}

/// Runs `run` for every run of `plan`; times and measures the peak extra heap (beyond
/// `result_bytes`) of the runs after the warm-up. What a run returns is dropped untimed.
pub(crate) fn time_runs<T>(
    plan: &BenchPlan,
    result_bytes: u64,
    progress: &mut dyn FnMut(),
    mut run: impl FnMut() -> Result<T>,
) -> Result<BenchMeasure> {
    let mut measure = BenchMeasure::default();
    for i in 0..plan.runs()? {
        let baseline = alloc_meter::start();
        let t0 = Instant::now();
        let result = run()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let extra = alloc_meter::peak_above(baseline).map(|b| b.saturating_sub(result_bytes));
        drop(result);
        if i >= plan.warmup {
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
