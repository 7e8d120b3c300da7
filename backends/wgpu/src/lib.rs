//! flashattn-wgpu: FlashAttention forward in portable WGSL through wgpu (Vulkan, Metal, DX12,
//! GL, and WebGPU in the browser).
//!
//! - [`WgpuBackend::new`] / [`WgpuBackend::new_async`] pick the best adapter (discrete, then
//!   integrated, then CPU such as lavapipe) and open a device with the adapter's real limits.
//! - [`WgpuBackend::from_device`] runs on a caller's device and queue;
//!   [`WgpuBackend::forward_buffers`] then works on the caller's `wgpu::Buffer`s without a host
//!   round trip.
//! - [`WgpuBackend::forward_async`] / [`Backend::forward`] are the host API.
//!
//! Kernels live in `shaders/` (plain .wgsl files); see `shaders/flash_fwd.wgsl`.

mod bench;
mod context;
mod forward;
mod gpu;
mod naive;
mod plan;
mod pool;
mod shaders;
mod tiles;

pub use bench::BenchOptions;
pub use forward::{DeviceInputs, DeviceOutputs};
pub use wgpu;

use context::{backend_err, ErrorSink, NAME};
use flashattn_core::{AttentionSpec, DType, Error, Result};
use shaders::Variant;
use std::collections::HashMap;
use std::sync::Mutex;

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
    layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    pipelines: Mutex<HashMap<Variant, wgpu::ComputePipeline>>,
    tile_override: Option<tiles::TileOverride>,
    pool: pool::Pool,
    /// Bound where a binding is unused (LSE not requested, no partials).
    dummy_lse: wgpu::Buffer,
    dummy_part: wgpu::Buffer,
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
        let adapter = context::pick_adapter().await?;
        let (device, queue) = context::open_device(&adapter).await?;
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
        let layout = gpu::bind_group_layout(&device);
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("flashattn"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let dummy = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            // u32 element indices in the kernels.
            .min(u64::from(u32::MAX) - 3);
        WgpuBackend {
            dummy_lse: dummy("flashattn unused lse"),
            dummy_part: dummy("flashattn unused partials"),
            device,
            queue,
            info,
            limits,
            features,
            subgroup_size: Mutex::new(None),
            binding_limit,
            layout,
            pipeline_layout,
            pipelines: Mutex::new(HashMap::new()),
            tile_override: tiles::TileOverride::from_env(),
            pool: pool::Pool::default(),
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
        spec.validate()?;
        match spec.dtype {
            DType::F32 | DType::Bf16 => {}
            DType::F16 if self.has_f16() => {}
            DType::F16 => {
                return Err(context::unsupported(format!(
                    "f16 needs SHADER_F16, which adapter {} lacks",
                    self.info.name
                )))
            }
            DType::Fp8E4m3 => {
                return Err(context::unsupported(
                    "fp8e4m3 runs on the CUDA backend (Hopper) only",
                ))
            }
        }
        let dims = self.limits.max_compute_workgroups_per_dimension as usize;
        if spec.heads_q > dims {
            return Err(context::unsupported(format!(
                "heads_q = {} exceeds the adapter's {dims} workgroups per dimension",
                spec.heads_q
            )));
        }
        if spec.batch > dims {
            return Err(context::unsupported(format!(
                "batch = {} exceeds the adapter's {dims} workgroups per dimension",
                spec.batch
            )));
        }
        let lse_bytes = spec.lse_elems().unwrap_or(usize::MAX) as u64 * 4;
        if spec.return_lse && lse_bytes > self.binding_limit {
            return Err(context::unsupported(format!(
                "the LSE ({lse_bytes} bytes) exceeds the storage binding limit of {} bytes",
                self.binding_limit
            )));
        }
        Ok(())
    }

    fn pipeline(&self, variant: Variant) -> Result<wgpu::ComputePipeline> {
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| backend_err("pipeline cache poisoned"))?;
        if let Some(p) = cache.get(&variant) {
            return Ok(p.clone());
        }
        let source = variant.source();
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("flashattn"),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("flashattn"),
                layout: Some(&self.pipeline_layout),
                module: &module,
                entry_point: Some(variant.entry_point()),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[],
                    // Every workgroup word is written before it is read.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        cache.insert(variant, pipeline.clone());
        Ok(pipeline)
    }

    /// Finds out once whether the subgroup path is usable (see shaders/subgroup_probe.wgsl).
    async fn probe_subgroups(&self) -> Result<u32> {
        if let Some(s) = self.subgroup_size.lock().ok().and_then(|s| *s) {
            return Ok(s);
        }
        let size = if self.features.contains(wgpu::Features::SUBGROUP) {
            gpu::probe_subgroups(self).await.unwrap_or(0)
        } else {
            0
        };
        if let Ok(mut s) = self.subgroup_size.lock() {
            *s = Some(size);
        }
        Ok(size)
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

    fn forward(
        &self,
        spec: &AttentionSpec,
        q: flashattn_core::TensorRef<'_>,
        k: flashattn_core::TensorRef<'_>,
        v: flashattn_core::TensorRef<'_>,
    ) -> Result<flashattn_core::Output> {
        pollster::block_on(self.forward_async(spec, q, k, v))
    }

    fn bench(
        &self,
        spec: &AttentionSpec,
        algo: flashattn_core::Algorithm,
        plan: &flashattn_core::BenchPlan,
        progress: &mut dyn FnMut(),
    ) -> Result<flashattn_core::BenchMeasure> {
        pollster::block_on(self.bench_async(spec, algo, plan, progress))
    }
}

/// `Error::Unavailable` for callers that want to report a missing adapter uniformly.
pub fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: NAME,
        reason: reason.into(),
    }
}
