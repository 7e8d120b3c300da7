//! flashattn-wgpu: FlashAttention in portable WGSL through wgpu (Vulkan, Metal, DX12, GL, and
//! WebGPU in the browser).
//!
//! - [`WgpuBackend::new`] / [`WgpuBackend::new_async`] pick the best adapter (discrete, then
//!   integrated, then CPU such as lavapipe) and open a device with the adapter's real limits.
//! - [`WgpuBackend::from_device`] runs on a caller's device and queue;
//!   [`WgpuBackend::forward_buffers`] then works on the caller's `wgpu::Buffer`s without a host
//!   round trip.
//! - [`WgpuBackend::forward_async`] / [`Backend::forward`] are the host API;
//!   [`WgpuBackend::backward_async`] / [`Backend::backward`] and
//!   [`WgpuBackend::backward_buffers`] the backward pass (deterministic: no atomics).
//! - [`WgpuBackend::decode_async`] / [`Backend::decode`] decode against host caches;
//!   [`WgpuKvCache`] (from [`Backend::kv_cache`]) keeps the cache on the device between steps,
//!   [`WgpuBackend::decode_buffers`] runs a step on the caller's buffers.
//!
//! Kernels live in `shaders/` (plain .wgsl files); see `shaders/README.md`. Files: `device.rs`
//! (adapter, device, errors), `forward.rs`, `backward.rs`, `naive.rs` (the benchmark's peers),
//! `bench.rs`,
//! `params.rs` (the kernels' uniform), `tiles.rs`, `plan.rs` (binding chunks and key slices),
//! `bindings.rs`, `shaders.rs`, `buffer_pool.rs`, `decode.rs` (decode against a KV cache),
//! `kv_cache.rs` (the device-resident cache handle), `strided.rs` (how strided inputs are
//! addressed and bound).

mod backward;
mod bench;
mod bindings;
mod buffer_pool;
mod decode;
mod device;
mod dispatch;
mod forward;
#[cfg(not(target_arch = "wasm32"))]
mod kv_cache;
mod naive;
mod params;
mod plan;
mod shaders;
mod strided;
mod tiles;

pub use backward::{DeviceBackwardInputs, DeviceGrads};
pub use bench::BenchOptions;
pub use bindings::BufferSlice;
pub use decode::DeviceDecodeInputs;
pub use forward::{DeviceInputs, DeviceOutputs};
#[cfg(not(target_arch = "wasm32"))]
pub use kv_cache::WgpuKvCache;
pub use wgpu;

use device::{unsupported, ErrorSink, NAME};
use flashattn_core::{AttentionSpec, CheckedSpec, DType, Error, Result};
#[cfg(not(target_arch = "wasm32"))]
use flashattn_core::{
    BackwardInputs, CacheConfig, DecodeInputs, ForwardInputs, Grads, KvCacheHandle, Output,
};
use shaders::Variant;
use std::collections::HashMap;
use std::sync::Mutex;

/// Positions (token indices within a sequence) are i32 in the kernels, with room for the
/// window arithmetic of mask.wgsl; token counts are u32.
const MAX_POSITIONS: usize = 1 << 30;

/// The wgpu backend: one device and queue, compiled pipelines, and pooled buffers.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    /// Verified subgroup width; `None` until probed, `Some(0)` without usable subgroups.
    subgroup_size: Mutex<Option<u32>>,
    /// Largest storage binding we use (the device's limit, or smaller for tests).
    binding_limit: u64,
    layouts: bindings::Layouts,
    pipelines: Mutex<HashMap<Variant, wgpu::ComputePipeline>>,
    tile_override: Option<tiles::TileOverride>,
    buffers: buffer_pool::BufferPool,
    /// Bound where a binding is unused (LSE not requested, no partials).
    dummy: wgpu::Buffer,
    errors: ErrorSink,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("device", &self.device_description())
            .finish()
    }
}

impl WgpuBackend {
    /// Opens the best adapter, blocking. `Error::Unavailable` says what is missing.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<WgpuBackend> {
        pollster::block_on(Self::new_async())
    }

    /// Opens the best adapter (the only constructor that discovers one on the web).
    pub async fn new_async() -> Result<WgpuBackend> {
        let adapter = device::pick_adapter().await?;
        let (device, queue) = device::open_device(&adapter).await?;
        let backend = Self::build(device, queue, adapter.get_info());
        backend.probe_subgroups().await?;
        Ok(backend)
    }

    /// Runs on a device and queue the caller owns (buffers passed to
    /// [`forward_buffers`](Self::forward_buffers) must come from this device). Subgroup
    /// support is probed at the first forward.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> WgpuBackend {
        let info = device.adapter_info();
        Self::build(device, queue, info)
    }

    fn build(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> WgpuBackend {
        let errors = ErrorSink::default();
        errors.install(&device);
        let limits = device.limits();
        let features = device.features();
        let binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            // u32 element indices in the kernels.
            .min(u64::from(u32::MAX) - 3);
        WgpuBackend {
            dummy: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("flashattn unused binding"),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
            layouts: bindings::Layouts::new(&device),
            device,
            queue,
            info,
            limits,
            features,
            subgroup_size: Mutex::new(None),
            binding_limit,
            pipelines: Mutex::new(HashMap::new()),
            tile_override: tiles::TileOverride::from_env(),
            buffers: buffer_pool::BufferPool::default(),
            errors,
        }
    }

    /// Caps the storage binding size this backend uses (at least 256 bytes). Inputs beyond it
    /// are processed in chunks; tests use this to exercise chunking at small sizes.
    pub fn with_max_binding_bytes(mut self, bytes: u64) -> WgpuBackend {
        self.binding_limit = self.binding_limit.min(bytes.max(256));
        self
    }

    /// Disables the subgroup path (to test the workgroup-memory path where subgroups exist).
    pub fn without_subgroups(self) -> WgpuBackend {
        if let Ok(mut s) = self.subgroup_size.lock() {
            *s = Some(0);
        }
        self
    }

    /// The largest storage binding this backend uses, in bytes; larger tensors are chunked.
    pub fn max_binding_bytes(&self) -> u64 {
        self.binding_limit
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    pub fn device_handle(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Whether f16 inputs run here (SHADER_F16).
    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// Whether device timers (timestamp queries) time the benchmarks.
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// The verified subgroup width the kernels use; 0 without the subgroup path.
    pub fn subgroup_size(&self) -> u32 {
        self.subgroup_size.lock().ok().and_then(|s| *s).unwrap_or(0)
    }

    /// "NAME (Vulkan, Cpu, driver ...)".
    pub fn device_description(&self) -> String {
        let i = &self.info;
        let mut s = format!("{} ({:?}, {:?}", i.name, i.backend, i.device_type);
        if !i.driver.is_empty() {
            s.push_str(&format!(", {} {}", i.driver, i.driver_info));
        }
        s.push(')');
        s
    }

    /// Why this backend cannot run `spec`, if it cannot.
    pub fn check_supported(&self, spec: &AttentionSpec) -> Result<()> {
        self.supports_checked(&spec.validate()?)
    }

    /// [`check_supported`](Self::check_supported) on a validated spec.
    fn supports_checked(&self, c: &CheckedSpec<'_>) -> Result<()> {
        if c.kv_cache.is_some() {
            return Err(unsupported(
                "a spec with a KV cache is a decode step: run it through decode",
            ));
        }
        self.supports_shape(c)
    }

    /// What the forward and decode kernels share: dtype, grid and position limits.
    fn supports_shape(&self, c: &CheckedSpec<'_>) -> Result<()> {
        // Strided inputs are bound whole (strided.rs): each must fit in one binding.
        for input in strided::Input::ALL {
            strided::View::of(c, input).check_binding(input, self.binding_limit)?;
        }
        match c.dtype {
            DType::F32 | DType::Bf16 => {}
            DType::F16 if self.has_f16() => {}
            DType::F16 => {
                return Err(unsupported(format!(
                    "f16 needs SHADER_F16, which adapter {} lacks",
                    self.info.name
                )))
            }
            DType::Fp8E4m3 => {
                return Err(unsupported(
                    "fp8e4m3 runs on the CUDA backend (Hopper) only",
                ))
            }
        }
        let dims = self.limits.max_compute_workgroups_per_dimension as usize;
        for (name, n) in [("heads_q", c.heads_q), ("batch", c.batch)] {
            if n > dims {
                return Err(unsupported(format!(
                    "{name} = {n} exceeds the adapter's {dims} workgroups per dimension"
                )));
            }
        }
        let positions = c.seqlen_q.saturating_add(c.seqlen_k);
        if positions >= MAX_POSITIONS || c.sizes.q_tokens.max(c.sizes.k_tokens) >= MAX_POSITIONS {
            return Err(unsupported(format!(
                "seqlen_q + seqlen_k = {positions} tokens: the kernels index positions in i32 and take fewer than {MAX_POSITIONS}"
            )));
        }
        let lse_bytes = c.sizes.lse as u64 * 4;
        if c.return_lse && lse_bytes > self.binding_limit {
            return Err(unsupported(format!(
                "the LSE ({lse_bytes} bytes) exceeds the storage binding limit of {} bytes",
                self.binding_limit
            )));
        }
        Ok(())
    }

    /// Finds out once whether the subgroup path is usable (see shaders/subgroup_probe.wgsl).
    async fn probe_subgroups(&self) -> Result<u32> {
        if let Some(s) = self.subgroup_size.lock().ok().and_then(|s| *s) {
            return Ok(s);
        }
        let size = if self.features.contains(wgpu::Features::SUBGROUP) {
            device::probe_subgroups(self).await.unwrap_or(0)
        } else {
            0
        };
        if let Ok(mut s) = self.subgroup_size.lock() {
            *s = Some(size);
        }
        Ok(size)
    }

    /// Checks that the device has no pending error and subgroups are probed: the start of
    /// every operation.
    async fn ready(&self) -> Result<()> {
        self.probe_subgroups().await?;
        self.errors.check()
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl flashattn_core::Backend for WgpuBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device(&self) -> String {
        self.device_description()
    }

    fn supports(&self, spec: &AttentionSpec) -> Result<()> {
        self.check_supported(spec)
    }

    fn forward(&self, spec: &AttentionSpec, inputs: ForwardInputs<'_>) -> Result<Output> {
        pollster::block_on(self.forward_async(spec, inputs))
    }

    fn supports_backward(&self, spec: &AttentionSpec) -> Result<()> {
        self.check_backward_supported(spec)
    }

    fn backward(&self, spec: &AttentionSpec, inputs: BackwardInputs<'_>) -> Result<Grads> {
        pollster::block_on(self.backward_async(spec, inputs))
    }

    fn supports_decode(&self, spec: &AttentionSpec) -> Result<()> {
        self.check_decode_supported(spec)
    }

    fn decode(&self, spec: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
        pollster::block_on(self.decode_async(spec, inputs))
    }

    fn kv_cache(&self, config: CacheConfig) -> Result<Box<dyn KvCacheHandle + '_>> {
        Ok(Box::new(WgpuKvCache::new(self, config)?))
    }

    fn bench(&self, run: flashattn_core::BenchRun<'_>) -> Result<flashattn_core::BenchMeasure> {
        pollster::block_on(self.bench_async(run.spec, run.algo, run.plan, run.progress))
    }
}

/// `Error::Unavailable` for callers that want to report a missing adapter uniformly.
pub fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: NAME,
        reason: reason.into(),
    }
}
