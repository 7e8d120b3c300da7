//! `Backend::bench` for decode steps (`Pass::Decode`): random caches, q and new rows are
//! uploaded once; each timed run is one whole step (append, split, combine) on the resident
//! caches. The spec is fixed, so every run writes the same rows (the cache never overflows).
//! `Algorithm::Copy` times a device-to-device copy of as many bytes of K and of V as the step
//! reads (`decode_bytes`), on the same device and stream: the memory-bandwidth limit beside it.

use crate::bench::BenchCall;
use crate::compile::BACKEND;
use crate::decode::{DecodeBuffers, Workspace};
use crate::device::{drv_err, DevBuf};
use crate::CudaBackend;
use cudarc::driver::result as drv;
use flashattn_core::{
    decode_bytes, random_inputs, Algorithm, AttentionSpec, BenchMeasure, Error, Result,
};

impl CudaBackend {
    pub(crate) fn bench_decode(&self, call: BenchCall<'_>) -> Result<BenchMeasure> {
        let (c, algo, plan) = (&call.c, call.algo, call.plan);
        let spec = c.spec;
        if algo == Algorithm::Naive {
            return Err(Error::unsupported(
                BACKEND,
                "decode has no naive peer; compare with --algo copy (the bandwidth limit)",
            ));
        }
        let dplan = self.plan_decode(c)?;
        let (q, kc, vc) = random_inputs(spec, plan.seed);
        // New rows [batch, new, heads_kv, d / dv]: the k and v of a problem of that shape.
        let new = spec.kv_cache.as_ref().map_or(0, |k| k.seqlen_new);
        let rows = AttentionSpec::new(spec.batch, spec.heads_kv, new, new, spec.head_dim)
            .head_dim_v(spec.head_dim_v)
            .dtype(spec.dtype);
        let (_, k_new, v_new) = random_inputs(&rows, plan.seed ^ 0xdec0de);
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let new = (c.sizes.k_new > 0).then(|| [k_new.as_ref(), v_new.as_ref()]);
        let bufs = DecodeBuffers::upload(c, [q.as_ref(), kc.as_ref(), vc.as_ref()], new)?;
        let (kb, vb) = (&bufs.k_cache, &bufs.v_cache);
        let mut ws = Workspace::default();
        let ptrs = ws.prepare(&dplan, bufs.pointers())?;
        let (times_ms, extra) = match algo {
            Algorithm::Copy => {
                // K's share of the bytes the step reads, then V's, each from its cache.
                let total = decode_bytes(spec) as usize;
                let k_bytes = total / (spec.head_dim + spec.head_dim_v) * spec.head_dim;
                let (k_bytes, v_bytes) = (k_bytes.min(kb.bytes), (total - k_bytes).min(vb.bytes));
                let dst = DevBuf::alloc(k_bytes + v_bytes)?;
                let stream = self.gpu.stream();
                let run = |_: &Self| {
                    // SAFETY: both ranges lie inside their buffers; the backend's stream (where
                    // the timer's events go) orders them.
                    unsafe {
                        drv::memcpy_dtod_async(dst.ptr, kb.ptr, k_bytes, stream).and_then(|_| {
                            drv::memcpy_dtod_async(
                                dst.ptr + k_bytes as u64,
                                vb.ptr,
                                v_bytes,
                                stream,
                            )
                        })
                    }
                    .map_err(drv_err("cuMemcpyDtoDAsync"))
                };
                (self.time_runs(plan, &run, call.progress)?, dst.bytes as u64)
            }
            _ => {
                let run = |this: &Self| this.launch_decode(&dplan, &ptrs, true);
                (self.time_runs(plan, &run, call.progress)?, ws.bytes())
            }
        };
        Ok(BenchMeasure {
            times_ms,
            extra_bytes: Some(extra),
        })
    }
}
