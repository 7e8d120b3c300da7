//! `Backend::bench`: device-resident timings of the flash kernel or naive attention.

use crate::compile::BACKEND;
use crate::device::{DevBuf, Timer};
use crate::forward::Buffers;
use crate::naive::scores_bytes;
use crate::CudaBackend;
use flashattn_core::{
    random_inputs, Algorithm, AttentionSpec, BenchMeasure, BenchPlan, Error, Pass, Result,
};

impl CudaBackend {
    /// Times `algo` on random inputs uploaded once; CUDA events around each run.
    pub(crate) fn bench_forward(
        &self,
        spec: &AttentionSpec,
        algo: Algorithm,
        plan: &BenchPlan,
        progress: &mut dyn FnMut(),
    ) -> Result<BenchMeasure> {
        if plan.pass != Pass::Forward {
            return Err(Error::unsupported(
                BACKEND,
                format!("the {} pass is not implemented yet", plan.pass.name()),
            ));
        }
        plan.runs()?;
        let checked = spec.validate()?;
        let variant = self.choose(&checked)?;
        let scores = match algo {
            Algorithm::Naive => Some(scores_bytes(&checked)?),
            Algorithm::Flash => None,
            Algorithm::Copy => {
                return Err(Error::unsupported(
                    BACKEND,
                    "the copy peer is not implemented yet",
                ))
            }
        };
        let (q, k, v) = random_inputs(spec, plan.seed);
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::new(
            &checked,
            q.as_ref().as_bytes(),
            k.as_ref().as_bytes(),
            v.as_ref().as_bytes(),
        )?;
        let scores = match scores {
            Some(n) => Some(DevBuf::alloc(n)?),
            None => None,
        };
        let run = |this: &Self| match &scores {
            Some(s) => this.launch_naive(&checked, &bufs, s),
            None => this.launch_flash(&checked, &variant, &bufs),
        };
        for _ in 0..plan.warmup {
            run(self)?;
            self.gpu.synchronize()?;
            progress();
        }
        let timer = Timer::new()?;
        let mut times_ms = Vec::with_capacity(plan.iters);
        for _ in 0..plan.iters {
            timer.start()?;
            run(self)?;
            times_ms.push(timer.stop_ms()?);
            progress();
        }
        self.gpu.synchronize()?;
        let extra = bufs.extra_bytes() + scores.as_ref().map_or(0, |s| s.bytes as u64);
        Ok(BenchMeasure {
            times_ms,
            extra_bytes: Some(extra),
        })
    }
}
