//! `Backend::bench` for `Pass::Backward`: the forward runs once (out and LSE stay on the
//! device), then CUDA events time each backward call (pre-processing, main kernel, dq pass)
//! on device-resident inputs; extra memory is what the backward allocates beyond its inputs
//! and gradients (delta, the f32 dq accumulator, side tables).

use super::{backward_plan, BwdBuffers};
use crate::bench::BenchCall;
use crate::compile::BACKEND;
use crate::device::DevBuf;
use crate::forward::{Buffers, DevTensor};
use crate::CudaBackend;
use flashattn_core::{random_tensor, Algorithm, BenchMeasure, Error, Result};
use rand::SeedableRng;

impl CudaBackend {
    pub(crate) fn bench_backward(&self, call: BenchCall<'_>) -> Result<BenchMeasure> {
        let (c, algo, plan) = (&call.c, call.algo, call.plan);
        if algo != Algorithm::Flash {
            // A naive backward (materialised P and dS) would only restate the forward's naive
            // peer's memory cost (the score matrix, twice); not built on CUDA.
            return Err(Error::unsupported(
                BACKEND,
                format!(
                    "the {algo:?} backward is not implemented on CUDA (only the flash backward)"
                ),
            ));
        }
        let spec = &c.spec.clone().return_lse(true);
        let checked = spec.validate()?;
        let forward = self.choose(&checked)?;
        let variant = self.choose_backward(&checked)?;
        let bwd = backward_plan(&checked, &variant)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed ^ 0x5eed);
        let dout = random_tensor(&mut rng, spec.dtype, checked.sizes.out);
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let fwd = Buffers::random(&checked, plan.seed)?;
        self.launch_flash(&checked, &forward, &fwd)?;
        self.gpu.synchronize()?;
        let sizes = &checked.sizes;
        let zeroed = |n: usize| DevBuf::zeroed(n * spec.dtype.size_bytes()).map(DevTensor::Ours);
        let grads = [
            DevBuf::from_bytes(dout.as_ref().as_bytes()).map(DevTensor::Ours)?,
            zeroed(sizes.q)?,
            zeroed(sizes.k)?,
            zeroed(sizes.v)?,
        ];
        let bufs = BwdBuffers::new(&checked, &bwd, fwd, grads)?;
        let run = |this: &Self| this.launch_backward(&checked, &variant, &bwd, &bufs);
        let times_ms = self.time_runs(plan, &run, call.progress)?;
        Ok(BenchMeasure {
            times_ms,
            extra_bytes: Some(bufs.extra_bytes()),
        })
    }
}
