//! `CpuKvCache`: a KV cache in host memory that a serving loop keeps between decode steps.
//! core's `CacheState` keeps the lengths and hands out pages; a step builds its spec from
//! the state, runs the CPU decode on the owned buffers, and commits only on success, so a
//! refused step leaves the cache exactly as it was.

use crate::CpuBackend;
use flashattn_core::{
    validate_decode_inputs, Backend, CacheConfig, CacheState, DType, DecodeInputs, DecodeStep,
    Error, KvCacheHandle, Output, Result, Tensor, TensorRef,
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

    /// Runs `step` appending `k_new` / `v_new`; `attend` false only writes the rows.
    fn step(
        &mut self,
        step: &DecodeStep,
        q: TensorRef<'_>,
        k_new: Option<TensorRef<'_>>,
        v_new: Option<TensorRef<'_>>,
        attend: bool,
    ) -> Result<Option<Output>> {
        let new = self.state.seqlen_new(k_new.as_ref(), v_new.as_ref())?;
        let spec = self.state.spec(step, new)?;
        let inputs = DecodeInputs {
            q,
            k_cache: self.k.as_mut(),
            v_cache: self.v.as_mut(),
            k_new,
            v_new,
        };
        let out = if attend {
            Some(self.backend.decode(&spec, inputs)?)
        } else {
            let c = validate_decode_inputs(&spec, &inputs)?;
            let cache = spec
                .kv_cache
                .as_ref()
                .ok_or_else(|| Error::backend("cpu", "the cache state built no cache spec"))?;
            let DecodeInputs {
                mut k_cache,
                mut v_cache,
                ..
            } = inputs;
            if let (Some(kn), Some(vn)) = (k_new, v_new) {
                crate::decode::append(&c, cache, &mut k_cache, &mut v_cache, kn, vn);
            }
            None
        };
        self.state.commit(new);
        Ok(out)
    }
}

impl KvCacheHandle for CpuKvCache<'_> {
    fn state(&self) -> &CacheState {
        &self.state
    }

    fn decode(
        &mut self,
        step: &DecodeStep,
        q: TensorRef<'_>,
        k_new: Option<TensorRef<'_>>,
        v_new: Option<TensorRef<'_>>,
    ) -> Result<Output> {
        self.step(step, q, k_new, v_new, true)?
            .ok_or_else(|| Error::backend("cpu", "decode produced no output"))
    }

    fn append(&mut self, k_new: TensorRef<'_>, v_new: TensorRef<'_>) -> Result<()> {
        // q is a placeholder of the right size.
        let (step, n) = self.state.append_step();
        let c = self.state.config();
        let q = zeros(c.dtype, n)?;
        self.step(&step, q.as_ref(), Some(k_new), Some(v_new), false)
            .map(|_| ())
    }

    fn reset(&mut self, seq: usize) -> Result<()> {
        self.state.reset(seq)
    }

    fn read(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.k.clone(), self.v.clone()))
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
