//! `Backend::bench`: device-resident timings of the flash kernel or naive attention. Where
//! both tensor-core kernels can run a problem (Hopper wgmma and mma.sync on sm_90a), it times
//! both and remembers the faster for `choose`: the runtime's autotune benches a copy of each
//! problem, so its later calls run the kernel measured fastest.

use crate::compile::BACKEND;
use crate::device::{DevBuf, Timer};
use crate::forward::Buffers;
use crate::naive::scores_bytes;
use crate::variants::{KernelKind, Variant};
use crate::CudaBackend;
use flashattn_core::{Algorithm, BenchMeasure, BenchPlan, CheckedSpec, DType, Error, Pass, Result};

/// Problems smaller than this (about 1 ms of work at 1 TFLOP/s) do not decide the kernel choice.
const MIN_DECIDING_FLOPS: f64 = 1e9;

/// One `Backend::bench` call, its spec checked: each pass's bench takes it.
pub(crate) struct BenchCall<'a> {
    pub c: CheckedSpec<'a>,
    pub algo: Algorithm,
    pub plan: &'a BenchPlan,
    pub progress: &'a mut dyn FnMut(),
}

impl CudaBackend {
    /// Times `algo` on random inputs uploaded once; CUDA events around each run.
    pub(crate) fn bench_forward(&self, call: BenchCall<'_>) -> Result<BenchMeasure> {
        let (checked, algo, plan) = (&call.c, call.algo, call.plan);
        let progress = call.progress;
        if plan.pass != Pass::Forward {
            return Err(Error::unsupported(
                BACKEND,
                format!("the {} pass is not implemented yet", plan.pass.name()),
            ));
        }
        // The tensor-core kernels that compete for this problem; one unless both can run it.
        let mut contenders: Vec<Variant> = match self.forced {
            Some(_) => vec![self.choose(checked)?],
            None => self
                .candidates(checked)?
                .into_iter()
                .filter(|v| matches!(v.kind, KernelKind::Hopper | KernelKind::Mma))
                .collect(),
        };
        if contenders.is_empty() {
            contenders.push(self.choose(checked)?);
        }
        let scores = match algo {
            Algorithm::Naive if checked.dtype == DType::Fp8E4m3 => {
                return Err(Error::unsupported(
                    BACKEND,
                    "the naive kernel takes f32, f16 or bf16, not fp8e4m3",
                ))
            }
            Algorithm::Naive => {
                contenders.truncate(1);
                Some(scores_bytes(checked)?)
            }
            Algorithm::Flash => None,
            Algorithm::Copy => {
                return Err(Error::unsupported(
                    BACKEND,
                    "the copy peer is not implemented yet",
                ))
            }
        };
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::random(checked, plan.seed)?;
        let scores = match scores {
            Some(n) => Some(DevBuf::alloc(n)?),
            None => None,
        };
        let mut best: Option<(f64, KernelKind, BenchMeasure)> = None;
        for (i, variant) in contenders.iter().enumerate() {
            let run = |this: &Self| match &scores {
                Some(s) => this.launch_naive(checked, &bufs, s),
                None => this.launch_flash(checked, variant, &bufs),
            };
            // The caller counts plan.runs() calls of `progress`: the first contender's.
            let mut quiet = || {};
            let progress: &mut dyn FnMut() = if i == 0 { &mut *progress } else { &mut quiet };
            let times_ms = self.time_runs(plan, &run, progress)?;
            let extra = bufs.extra_bytes() + scores.as_ref().map_or(0, |s| s.bytes as u64);
            let m = BenchMeasure {
                times_ms,
                extra_bytes: Some(extra),
            };
            let median = m.median_ms().unwrap_or(f64::INFINITY);
            if best.as_ref().is_none_or(|b| median < b.0) {
                best = Some((median, variant.kind, m));
            }
        }
        let (_, kind, measure) =
            best.ok_or_else(|| Error::backend(BACKEND, "no kernel was timed"))?;
        // Small problems time launch overhead more than the kernels: they decide nothing.
        if contenders.len() > 1 && checked.flops() >= MIN_DECIDING_FLOPS {
            self.record_choice(checked, kind);
        }
        Ok(measure)
    }

    /// Warm-up runs, then one CUDA-event timing per timed run, in milliseconds.
    pub(crate) fn time_runs(
        &self,
        plan: &BenchPlan,
        run: &dyn Fn(&Self) -> Result<()>,
        progress: &mut dyn FnMut(),
    ) -> Result<Vec<f64>> {
        for _ in 0..plan.warmup {
            run(self)?;
            self.gpu.synchronize()?;
            progress();
        }
        let timer = Timer::new(&self.gpu)?;
        let mut times_ms = Vec::with_capacity(plan.iters);
        for _ in 0..plan.iters {
            timer.start()?;
            run(self)?;
            times_ms.push(timer.stop_ms()?);
            progress();
        }
        self.gpu.synchronize()?;
        Ok(times_ms)
    }
}
