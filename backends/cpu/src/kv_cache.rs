//! `CpuKvCache`: a KV cache in host memory that a serving loop keeps between decode steps.
//! core's `CacheState` keeps the lengths and hands out pages; a step builds its spec from
//! the state, runs the CPU decode on the owned buffers, and commits only on success, so a
//! refused step leaves the cache exactly as it was.

use crate::CpuBackend;
use flashattn_core::{
    validate_decode_inputs, AttentionSpec, Backend, CacheBuffers, CacheConfig, CacheState, DType,
    DecodeInputs, Error, KvCacheHandle, Output, Result, StepInputs, Tensor,
};
use half::{bf16, f16};

/// A KV cache owned by the CPU backend: k `[rows, heads_kv, head_dim]`, v `[.., head_dim_v]`.
pub struct CpuKvCache<'a> {
    backend: &'a CpuBackend,
    state: CacheState,
    k: Tensor,
    v: Tensor,
}

impl<'a> CpuKvCache<'a> {
    /// Validates `config` and allocates zeroed buffers (an error, not an abort, when the
    /// memory cannot be had).
    pub fn new(backend: &'a CpuBackend, config: CacheConfig) -> Result<Self> {
        if config.dtype == DType::Fp8E4m3 {
            return Err(crate::fp8_unsupported());
        }
        let state = CacheState::new(config)?;
        let c = state.config();
        let rows = state.buffer_rows();
        let k = zeros(c.dtype, rows * c.heads_kv * c.head_dim)?;
        let v = zeros(c.dtype, rows * c.heads_kv * c.head_dim_v)?;
        Ok(CpuKvCache {
            backend,
            state,
            k,
            v,
        })
    }
}

impl CacheBuffers for CpuKvCache<'_> {
    fn cache_state_mut(&mut self) -> &mut CacheState {
        &mut self.state
    }

    fn run_step(&mut self, spec: &AttentionSpec, io: StepInputs<'_>) -> Result<Option<Output>> {
        let inputs = DecodeInputs {
            q: io.q,
            k_cache: self.k.as_mut(),
            v_cache: self.v.as_mut(),
            k_new: io.k_new,
            v_new: io.v_new,
        };
        if io.attend {
            return self.backend.decode(spec, inputs).map(Some);
        }
        let c = validate_decode_inputs(spec, &inputs)?;
        let cache = spec
            .kv_cache
            .as_ref()
            .ok_or_else(|| Error::backend("cpu", "the cache state built no cache spec"))?;
        let DecodeInputs {
            mut k_cache,
            mut v_cache,
            ..
        } = inputs;
        if let (Some(kn), Some(vn)) = (io.k_new, io.v_new) {
            crate::decode::append(&c, cache, &mut k_cache, &mut v_cache, kn, vn);
        }
        Ok(None)
    }

    fn backend_name(&self) -> &'static str {
        "cpu"
    }
}

impl KvCacheHandle for CpuKvCache<'_> {
    fn read(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.k.clone(), self.v.clone()))
    }

    fn state(&self) -> &CacheState {
        &self.state
    }
}

/// `n` zeros of `dtype`, or an error when the allocation fails.
fn zeros(dtype: DType, n: usize) -> Result<Tensor> {
    fn vec<T: Clone>(n: usize, zero: T) -> Result<Vec<T>> {
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| {
            Error::argument(
                "cache.capacity",
                format!("{n} elements"),
                "the KV cache does not fit in memory",
            )
        })?;
        v.resize(n, zero);
        Ok(v)
    }
    Ok(match dtype {
        DType::F32 => Tensor::F32(vec(n, 0.0)?),
        DType::F16 => Tensor::F16(vec(n, f16::ZERO)?),
        DType::Bf16 => Tensor::Bf16(vec(n, bf16::ZERO)?),
        DType::Fp8E4m3 => return Err(crate::fp8_unsupported()),
    })
}
