//! `CudaKvCache`: a KV cache in device memory that a serving loop keeps between decode steps.
//! core's `CacheState` keeps the lengths and hands out pages. A step moves q, the new rows and
//! a few int32s (the lengths, and the block-table entries that changed) to the device, runs
//! the append / split / combine launches on the resident caches, reads out and LSE back, and
//! commits only on success: everything that can be refused is checked before the first launch.

use crate::compile::BACKEND;
use crate::decode::{DecodePointers, Workspace};
use crate::device::{drv_err, DevBuf};
use crate::CudaBackend;
use cudarc::driver::result as drv;
use flashattn_core::{
    AttentionSpec, CacheBuffers, CacheConfig, CacheLayout, CacheState, DType, DecodeStep, Error,
    KvCacheHandle, Output, Result, StepInputs, Tensor, TensorRef,
};

/// Slots of the per-step buffers in `CudaKvCache::io`.
const Q: usize = 0;
const K_NEW: usize = 1;
const V_NEW: usize = 2;
const OUT: usize = 3;
const LSE: usize = 4;

/// A KV cache on the CUDA device: k `[rows, heads_kv, head_dim]`, v `[.., head_dim_v]`.
pub struct CudaKvCache<'a> {
    backend: &'a CudaBackend,
    state: CacheState,
    k: DevBuf,
    v: DevBuf,
    /// Paged: the block table on the device and the host copy of what it holds.
    table: Option<(DevBuf, Vec<i32>)>,
    /// Tables and scratch of a step, and its q / new rows / out / LSE, reused across steps.
    ws: Workspace,
    io: Workspace,
}

fn dtoh(ptr: u64, bytes: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; bytes];
    if bytes > 0 {
        // SAFETY: the caller passes a buffer of at least `bytes`.
        unsafe { drv::memcpy_dtoh_sync(&mut v, ptr) }.map_err(drv_err("cuMemcpyDtoH"))?;
    }
    Ok(v)
}

impl<'a> CudaKvCache<'a> {
    /// Validates `config`, checks that this GPU runs decode steps of it, and allocates zeroed
    /// caches (an error naming the size when the device memory cannot be had).
    pub fn new(backend: &'a CudaBackend, config: CacheConfig) -> Result<Self> {
        if config.dtype == DType::Fp8E4m3 {
            return Err(Error::unsupported(
                BACKEND,
                "fp8e4m3 KV caches are not implemented",
            ));
        }
        let state = CacheState::new(config)?;
        let probe = state.spec(&DecodeStep::new(state.config().heads_kv), 0)?;
        backend.plan_decode(&probe.validate()?)?;
        let c = state.config();
        let rows = state.buffer_rows();
        let es = c.dtype.size_bytes();
        let _guard = backend.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        backend.gpu.bind()?;
        let k = DevBuf::zeroed(rows * c.heads_kv * c.head_dim * es)?;
        let v = DevBuf::zeroed(rows * c.heads_kv * c.head_dim_v * es)?;
        let table = match &probe.kv_cache.as_ref().map(|k| &k.layout) {
            Some(CacheLayout::Paged { block_table, .. }) => Some((
                DevBuf::from_bytes(bytemuck::cast_slice(block_table))?,
                block_table.clone(),
            )),
            _ => None,
        };
        Ok(CudaKvCache {
            backend,
            state,
            k,
            v,
            table,
            ws: Workspace::default(),
            io: Workspace::default(),
        })
    }

    /// Uploads the block-table entries that differ from what the device holds.
    fn sync_table(&mut self, wanted: &[i32]) -> Result<()> {
        let Some((buf, held)) = &mut self.table else {
            return Ok(());
        };
        let changed = |i: &usize| held[*i] != wanted[*i];
        let (Some(first), Some(last)) = (
            (0..wanted.len()).find(changed),
            (0..wanted.len()).rfind(changed),
        ) else {
            return Ok(());
        };
        let part = &wanted[first..=last];
        // SAFETY: the table holds wanted.len() int32s (its size never changes).
        unsafe { drv::memcpy_htod_sync(buf.ptr + first as u64 * 4, part) }
            .map_err(drv_err("cuMemcpyHtoD"))?;
        held[first..=last].copy_from_slice(part);
        Ok(())
    }
}

impl CacheBuffers for CudaKvCache<'_> {
    fn cache_state_mut(&mut self) -> &mut CacheState {
        &mut self.state
    }

    fn run_step(&mut self, spec: &AttentionSpec, io: StepInputs<'_>) -> Result<Option<Output>> {
        // An append moves no q to the device.
        let StepInputs {
            q,
            k_new,
            v_new,
            attend,
        } = io;
        let q = attend.then_some(q);
        let c = spec.validate()?;
        let dtype = c.dtype;
        let given = [
            ("q", q, c.sizes.q),
            ("k_new", k_new, c.sizes.k_new),
            ("v_new", v_new, c.sizes.v_new),
        ];
        for (name, t, n) in given {
            if let Some(t) = t {
                if t.dtype() != dtype {
                    return Err(Error::DTypeMismatch {
                        tensor: name,
                        expected: dtype,
                        actual: t.dtype(),
                    });
                }
                if t.len() != n {
                    return Err(Error::BufferLength {
                        tensor: name,
                        expected: n,
                        actual: t.len(),
                        shape: spec.shape_string(),
                    });
                }
            }
        }
        let plan = self.backend.plan_decode(&c)?;
        let gpu = &self.backend.gpu;
        let _guard = gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        gpu.bind()?;
        self.sync_table(&plan.tables.block_table)?;
        let up = |io: &mut Workspace, slot, t: Option<TensorRef<'_>>| match t {
            Some(t) => io.slot(slot, t.as_bytes().len(), Some(t.as_bytes())),
            None => Ok(0),
        };
        let out_bytes = if attend {
            c.sizes.out * dtype.output().size_bytes()
        } else {
            0
        };
        let lse_floats = if attend && spec.return_lse {
            c.sizes.lse
        } else {
            0
        };
        let base = DecodePointers {
            q: up(&mut self.io, Q, q)?,
            k_cache: self.k.ptr,
            v_cache: self.v.ptr,
            k_new: up(&mut self.io, K_NEW, k_new)?,
            v_new: up(&mut self.io, V_NEW, v_new)?,
            out: self.io.slot(OUT, out_bytes, None)?,
            lse: self.io.slot(LSE, lse_floats * 4, None)?,
            block_table: self.table.as_ref().map_or(0, |t| t.0.ptr),
            ..Default::default()
        };
        let ptrs = self.ws.prepare(&plan, base)?;
        self.backend.launch_decode(&plan, &ptrs, attend)?;
        gpu.synchronize()?;
        let out = if attend {
            let out = Tensor::from_bytes(dtype.output(), &dtoh(ptrs.out, out_bytes)?)?;
            let lse = (lse_floats > 0)
                .then(|| dtoh(ptrs.lse, lse_floats * 4).map(|b| bytemuck::pod_collect_to_vec(&b)))
                .transpose()?;
            Some(Output { out, lse })
        } else {
            None
        };
        Ok(out)
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }
}

impl KvCacheHandle for CudaKvCache<'_> {
    fn read(&self) -> Result<(Tensor, Tensor)> {
        let gpu = &self.backend.gpu;
        let _guard = gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        gpu.bind()?;
        let dtype = self.state.config().dtype;
        Ok((
            Tensor::from_bytes(dtype, &self.k.to_vec()?)?,
            Tensor::from_bytes(dtype, &self.v.to_vec()?)?,
        ))
    }

    fn state(&self) -> &CacheState {
        &self.state
    }
}

impl Drop for CudaKvCache<'_> {
    fn drop(&mut self) {
        // The buffers are freed right after this, in the backend's context.
        let _ = self.backend.gpu.bind();
    }
}
