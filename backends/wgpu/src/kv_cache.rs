//! `WgpuKvCache`: a KV cache in buffers on the backend's device that a serving loop keeps
//! between decode steps. core's `CacheState` keeps the lengths and hands out pages; a step
//! builds its spec from the state, uploads only q and the new rows (and the call's small
//! tables), appends and attends on the device, and commits only on success, so a refused
//! step leaves the cache exactly as it was.

use crate::bindings::BufferSlice;
use crate::decode::DeviceDecodeInputs;
use crate::device::{read_mapped, scoped, unsupported};
use crate::strided::{Input, View};
use crate::WgpuBackend;
use flashattn_core::{
    validate_decode_step, AttentionSpec, CacheBuffers, CacheConfig, CacheState, DType,
    KvCacheHandle, Output, Result, StepInputs, Tensor,
};

/// A KV cache owned by the wgpu backend: k `[rows, heads_kv, head_dim]`, v `[.., head_dim_v]`
/// (bf16 as raw 16-bit words, f16 as IEEE half), zeroed at creation.
pub struct WgpuKvCache<'a> {
    backend: &'a WgpuBackend,
    state: CacheState,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
}

impl<'a> WgpuKvCache<'a> {
    /// Validates `config` and allocates the buffers (each must fit in one storage binding).
    pub fn new(backend: &'a WgpuBackend, config: CacheConfig) -> Result<Self> {
        let state = CacheState::new(config)?;
        let c = state.config();
        match c.dtype {
            DType::F32 | DType::Bf16 => {}
            DType::F16 if backend.has_f16() => {}
            other => {
                return Err(unsupported(format!(
                    "a {other} KV cache does not run on adapter {}",
                    backend.info.name
                )))
            }
        }
        let rows = state.buffer_rows() as u64 * c.heads_kv as u64;
        let es = c.dtype.size_bytes() as u64;
        let bytes = [c.head_dim, c.head_dim_v].map(|d| (rows * d as u64 * es).next_multiple_of(4));
        if let Some(&b) = bytes.iter().find(|&&b| b > backend.binding_limit) {
            return Err(unsupported(format!(
                "a KV cache buffer of {b} bytes exceeds the storage binding limit of {} bytes",
                backend.binding_limit
            )));
        }
        let buffer = |size: u64| {
            backend.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("flashattn kv cache"),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let (k, v) = pollster::block_on(scoped(&backend.device, || {
            Ok((buffer(bytes[0]), buffer(bytes[1])))
        }))?;
        Ok(WgpuKvCache {
            backend,
            state,
            k,
            v,
        })
    }

    /// The k and v cache buffers (`[buffer_rows, heads_kv, d]`), for kernels of the caller's
    /// on the same device; the rows of sequence `b` are where `state().spec(..)`'s
    /// `KvCache::row` puts them.
    pub fn buffers(&self) -> (&wgpu::Buffer, &wgpu::Buffer) {
        (&self.k, &self.v)
    }
}

impl CacheBuffers for WgpuKvCache<'_> {
    fn cache_state_mut(&mut self) -> &mut CacheState {
        &mut self.state
    }

    fn run_step(&mut self, spec: &AttentionSpec, io: StepInputs<'_>) -> Result<Option<Output>> {
        let c = validate_decode_step(spec, &io.q, io.k_new.as_ref(), io.v_new.as_ref())?;
        let be = self.backend;
        be.supports_decode_checked(&c)?;
        pollster::block_on(be.ready())?;
        let qb = be.upload_view(io.q, &View::of(&c, Input::Q));
        let new_bufs = [io.k_new, io.v_new].map(|t| t.map(|t| be.upload(t)));
        let inputs = DeviceDecodeInputs {
            q: (&qb).into(),
            k_cache: (&self.k).into(),
            v_cache: (&self.v).into(),
            k_new: new_bufs[0].as_ref().map(BufferSlice::from),
            v_new: new_bufs[1].as_ref().map(BufferSlice::from),
        };
        let result = if io.attend {
            pollster::block_on(be.run_host_step(&c, inputs, 0, |_, _| {})).map(|(out, _)| Some(out))
        } else {
            pollster::block_on(async {
                be.submit(|enc| be.encode_decode(&c, inputs, None, enc, None))
                    .await?;
                be.errors.check()
            })
            .map(|()| None)
        };
        for b in std::iter::once(qb).chain(new_bufs.into_iter().flatten()) {
            be.buffers.give(b);
        }
        result
    }

    fn backend_name(&self) -> &'static str {
        "wgpu"
    }
}

impl KvCacheHandle for WgpuKvCache<'_> {
    fn read(&self) -> Result<(Tensor, Tensor)> {
        let be = self.backend;
        let c = self.state.config();
        let rows = self.state.buffer_rows() * c.heads_kv;
        let es = c.dtype.size_bytes() as u64;
        let (kb, vb) = (
            rows as u64 * c.head_dim as u64 * es,
            rows as u64 * c.head_dim_v as u64 * es,
        );
        let v_at = kb.next_multiple_of(4);
        let total = v_at + vb.next_multiple_of(4);
        let read = be.read_buffer(total);
        let bytes = pollster::block_on(async {
            be.submit(|enc| {
                enc.copy_buffer_to_buffer(&self.k, 0, &read, 0, v_at);
                enc.copy_buffer_to_buffer(&self.v, 0, &read, v_at, total - v_at);
                Ok(Default::default())
            })
            .await?;
            read_mapped(&be.device, &read, total).await
        });
        be.buffers.give(read);
        let bytes = bytes?;
        Ok((
            Tensor::from_bytes(c.dtype, &bytes[..kb as usize])?,
            Tensor::from_bytes(c.dtype, &bytes[v_at as usize..][..vb as usize])?,
        ))
    }

    fn state(&self) -> &CacheState {
        &self.state
    }
}
