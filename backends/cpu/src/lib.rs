//! flashattn-cpu: exact attention on CPU threads.
//!
//! `CpuBackend` runs a tiled online-softmax (FlashAttention) forward: threads over
//! (batch, head, query block), register-blocked FMA microkernels for the two block products,
//! chosen at run time for the CPU (AVX-512, AVX2+FMA, or portable code the compiler
//! vectorises), f32 accumulation, and only per-thread tile scratch (the score matrix is never
//! materialised). The backward (FlashAttention-2's loop order: key blocks outer) reuses the
//! same tiles for its five block products and is deterministic for any thread count.
//! f32, f16 and bf16 inputs; fp8 is CUDA-only.

mod backward;
mod backward_f32;
mod backward_io;
mod backward_lowp;
mod bench;
mod block;
mod decode;
mod decode_bench;
mod decode_tiles;
mod device;
mod dq_turns;
mod forward;
mod forward_lowp;
mod io;
mod kv_cache;
mod kv_prefetch;
mod lowp;
#[cfg(target_arch = "x86_64")]
mod lowp_exp;
mod lowp_pack;
mod lowp_reuse;
mod naive;
mod params;
mod simd;
mod split_kv;
mod thread_pool;
mod widen;

pub use device::Isa;
pub use kv_cache::CpuKvCache;

use flashattn_core::{
    validate_backward_inputs, validate_decode_inputs, validate_inputs, AttentionSpec, Backend,
    BackwardInputs, BenchMeasure, BenchRun, CacheConfig, CheckedSpec, DType, DecodeInputs, Error,
    ForwardInputs, Grads, KvCacheHandle, Output, Result, TensorRef,
};
use thread_pool::ThreadPool;

/// The CPU backend. Cheap to share: one thread pool per backend.
pub struct CpuBackend {
    pool: ThreadPool,
    isa: Isa,
}

impl CpuBackend {
    /// A backend with one thread per available core and the fastest instruction set.
    pub fn new() -> Self {
        Self::with_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// A backend with `threads` worker threads (0 is taken as 1).
    pub fn with_threads(threads: usize) -> Self {
        CpuBackend {
            pool: ThreadPool::new(threads.max(1)),
            isa: Isa::detect(),
        }
    }

    /// The same backend forced onto another instruction set (for tests and comparisons);
    /// `Error::Unavailable` if this CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Result<Self> {
        if !isa.available() {
            return Err(Error::Unavailable {
                backend: "cpu",
                reason: format!("this CPU has no {isa}"),
            });
        }
        self.isa = isa;
        Ok(self)
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Naive attention that materialises the full score matrix: the baseline for benchmarks.
    pub fn naive_forward(&self, spec: &AttentionSpec, inputs: ForwardInputs<'_>) -> Result<Output> {
        let ForwardInputs { q, k, v } = inputs;
        let c = self.check(spec, &q, &k, &v)?;
        naive_contiguous(spec)?;
        naive::forward(&self.pool, &c, q, k, v)
    }

    /// Naive backward that materialises the probability matrix: the baseline for benchmarks.
    pub fn naive_backward(
        &self,
        spec: &AttentionSpec,
        inputs: BackwardInputs<'_>,
    ) -> Result<Grads> {
        let c = self.check_backward(spec, &inputs)?;
        naive_contiguous(spec)?;
        naive::backward(&self.pool, &c, inputs)
    }

    /// Validates a backward call once, fp8 refused first.
    fn check_backward<'s>(
        &self,
        spec: &'s AttentionSpec,
        inputs: &BackwardInputs<'_>,
    ) -> Result<CheckedSpec<'s>> {
        if spec.dtype == DType::Fp8E4m3 {
            return Err(fp8_unsupported());
        }
        validate_backward_inputs(spec, inputs)
    }

    /// Validates a forward call once: fp8 refused first, then the spec and the buffers.
    fn check<'s>(
        &self,
        spec: &'s AttentionSpec,
        q: &TensorRef<'_>,
        k: &TensorRef<'_>,
        v: &TensorRef<'_>,
    ) -> Result<CheckedSpec<'s>> {
        if spec.dtype == DType::Fp8E4m3 {
            return Err(fp8_unsupported());
        }
        validate_inputs(spec, q, k, v)
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// The naive baseline reads contiguous inputs only (the benchmarks' layout).
fn naive_contiguous(spec: &AttentionSpec) -> Result<()> {
    if spec.strides.is_contiguous() {
        return Ok(());
    }
    Err(Error::unsupported(
        "cpu",
        "naive attention (the benchmark baseline) reads contiguous inputs only, not strided inputs",
    ))
}

pub(crate) fn fp8_unsupported() -> Error {
    Error::Unsupported {
        backend: "cpu",
        reason: "fp8e4m3 inputs need Hopper tensor cores (CUDA backend); use f32, f16 or bf16"
            .into(),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device(&self) -> String {
        let model = device::cpu_model().unwrap_or_else(|| std::env::consts::ARCH.to_string());
        format!(
            "CPU: {model}, {} threads, {} detected",
            self.threads(),
            Isa::detect()
        ) + &if self.isa != Isa::detect() {
            format!(" (running {})", self.isa)
        } else {
            String::new()
        }
    }

    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        if spec.dtype == DType::Fp8E4m3 {
            return Err(fp8_unsupported());
        }
        spec.validate()?;
        Ok(())
    }

    fn forward(&self, spec: &AttentionSpec, inputs: ForwardInputs<'_>) -> Result<Output> {
        let ForwardInputs { q, k, v } = inputs;
        let c = self.check(spec, &q, &k, &v)?;
        forward::forward(&self.pool, self.isa, &c, q, k, v)
    }

    fn supports_backward(&self, spec: &AttentionSpec) -> Result<()> {
        self.supports(spec)?;
        if spec.kv_cache.is_some() {
            return Err(Error::unsupported(
                "cpu",
                "a spec with a KV cache is a decode step; it has no backward pass",
            ));
        }
        Ok(())
    }

    fn backward(&self, spec: &AttentionSpec, inputs: BackwardInputs<'_>) -> Result<Grads> {
        let c = self.check_backward(spec, &inputs)?;
        backward::backward(&self.pool, self.isa, &c, inputs)
    }

    fn supports_decode(&self, spec: &AttentionSpec) -> Result<()> {
        if spec.kv_cache.is_none() {
            return Err(Error::invalid(
                "kv_cache",
                "none",
                "a decode call needs the KV cache's arguments",
            ));
        }
        self.supports(spec)
    }

    fn decode(&self, spec: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
        self.supports_decode(spec)?;
        let checked = validate_decode_inputs(spec, &inputs)?;
        decode::decode(&self.pool, self.isa, &checked, inputs)
    }

    fn kv_cache(&self, config: CacheConfig) -> Result<Box<dyn KvCacheHandle + '_>> {
        Ok(Box::new(CpuKvCache::new(self, config)?))
    }

    fn bench(&self, run: BenchRun<'_>) -> Result<BenchMeasure> {
        bench::bench(self, run)
    }
}
