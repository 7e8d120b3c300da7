//! Adapter discovery and device creation, turning wgpu errors into `flashattn_core::Error`,
//! waiting for and reading back device work, and the subgroup probe.

use crate::WgpuBackend;
use flashattn_core::{Error, Result};
use std::sync::{Arc, Mutex};

pub const NAME: &str = "wgpu";

pub fn backend_err(msg: impl ToString) -> Error {
    Error::backend(NAME, msg)
}

pub fn unsupported(reason: impl Into<String>) -> Error {
    Error::unsupported(NAME, reason)
}

#[cfg(not(target_arch = "wasm32"))]
/// Rank of a device type: discrete first, then integrated, virtual, CPU, other.
fn device_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// The features we use where the adapter has them.
pub fn wanted_features(adapter: &wgpu::Features) -> wgpu::Features {
    let wanted =
        wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
    *adapter & wanted
}

/// Mesa's implicit Vulkan layer `VK_LAYER_MESA_device_select` connects to the Wayland display
/// whenever an instance enables `VK_KHR_wayland_surface` (wgpu enables every surface extension
/// the loader offers); on a headless machine libwayland then prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` for each instance. We
/// pick adapters ourselves, so where that would happen (Linux, no usable XDG_RUNTIME_DIR) we
/// disable the layer through its own switch, `NODEVICE_SELECT=1` (the `disable_environment`
/// of its manifest, honoured by every Vulkan loader), unless the user set it. Set once, before
/// the first instance; Rust's environment accesses are serialised, a C library reading the
/// environment on another thread at that moment is not.
fn quiet_device_select_layer() {
    #[cfg(target_os = "linux")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            const SWITCH: &str = "NODEVICE_SELECT";
            let runtime_dir_ok = std::env::var_os("XDG_RUNTIME_DIR")
                .is_some_and(|d| !d.is_empty() && std::path::Path::new(&d).is_dir());
            if !runtime_dir_ok && std::env::var_os(SWITCH).is_none() {
                std::env::set_var(SWITCH, "1");
            }
        });
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    quiet_device_select_layer();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// Picks the best adapter: discrete, then integrated, then CPU (e.g. lavapipe). GL is asked
/// only when Vulkan/Metal/DX12 have none (probing EGL is slow and noisy on headless machines).
pub async fn pick_adapter() -> Result<wgpu::Adapter> {
    #[cfg(not(target_arch = "wasm32"))]
    for backends in [wgpu::Backends::PRIMARY, wgpu::Backends::all()] {
        let mut adapters = instance(backends).enumerate_adapters(backends).await;
        adapters.sort_by_key(|a| {
            let info = a.get_info();
            // Among equals, prefer Vulkan/Metal/DX12 over GL.
            let gl = u32::from(info.backend == wgpu::Backend::Gl);
            (device_rank(info.device_type), gl)
        });
        if let Some(best) = adapters.into_iter().next() {
            return Ok(best);
        }
    }
    instance(wgpu::Backends::all())
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            // We want the adapter's real limits.
            apply_limit_buckets: false,
        })
        .await
        .map_err(|e| Error::Unavailable {
            backend: NAME,
            reason: format!("no Vulkan/Metal/DX12/GL/WebGPU adapter found ({e})"),
        })
}

/// Opens a device on `adapter` with the adapter's own limits (not the WebGPU defaults) and the
/// optional features it has.
pub async fn open_device(adapter: &wgpu::Adapter) -> Result<(wgpu::Device, wgpu::Queue)> {
    let features = wanted_features(&adapter.features());
    adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("flashattn"),
            required_features: features,
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        })
        .await
        .map_err(|e| Error::Unavailable {
            backend: NAME,
            reason: format!(
                "adapter {} could not open a device: {e}",
                adapter.get_info().name
            ),
        })
}

/// Errors that escaped every error scope (e.g. raised on another thread), kept until the next
/// operation checks them.
#[derive(Clone, Default)]
pub struct ErrorSink(Arc<Mutex<Vec<String>>>);

impl ErrorSink {
    pub fn install(&self, device: &wgpu::Device) {
        let sink = self.0.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(describe(&e));
            }
        }));
    }

    /// The first uncaptured error since the last check, as `Error::Backend`.
    pub fn check(&self) -> Result<()> {
        let mut v = self
            .0
            .lock()
            .map_err(|_| backend_err("error sink poisoned"))?;
        let first = v.drain(..).next();
        match first {
            Some(e) => Err(backend_err(e)),
            None => Ok(()),
        }
    }
}

/// The error with its description (wgpu's Display says only "Validation Error").
pub fn describe(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::Validation { description, .. } => {
            format!("wgpu validation error: {description}")
        }
        wgpu::Error::OutOfMemory { .. } => "wgpu out of memory".to_string(),
        other => format!("wgpu error: {other}"),
    }
}

/// Runs `f` inside validation and out-of-memory error scopes; any error becomes `Error::Backend`.
pub async fn scoped<T>(device: &wgpu::Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let result = f();
    let v = validation.pop().await;
    let o = oom.pop().await;
    if let Some(e) = v.or(o) {
        return Err(backend_err(describe(&e)));
    }
    result
}

/// Waits for submitted work on native (on the web the browser drives completion).
pub fn wait(device: &wgpu::Device) -> Result<()> {
    #[cfg(not(target_arch = "wasm32"))]
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| backend_err(format!("device poll failed: {e}")))?;
    #[cfg(target_arch = "wasm32")]
    let _ = device;
    Ok(())
}

/// Maps a MAP_READ buffer (after its copy was submitted) and returns its first `len` bytes.
pub async fn read_mapped(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    len: u64,
) -> Result<Vec<u8>> {
    let (tx, rx) = futures_channel::oneshot::channel();
    buffer.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    wait(device)?;
    rx.await
        .map_err(|_| backend_err("buffer mapping was cancelled"))?
        .map_err(|e| backend_err(format!("buffer mapping failed: {e}")))?;
    let bytes = {
        let view = buffer
            .get_mapped_range(..)
            .map_err(|e| backend_err(format!("mapped range: {e}")))?;
        view[..len as usize].to_vec()
    };
    buffer.unmap();
    Ok(bytes)
}

/// Resolves once all submitted work is done (on native and on the web).
pub async fn sync(device: &wgpu::Device, queue: &wgpu::Queue) -> Result<()> {
    let (tx, rx) = futures_channel::oneshot::channel();
    queue.on_submitted_work_done(move || {
        let _ = tx.send(());
    });
    wait(device)?;
    rx.await
        .map_err(|_| backend_err("device lost while waiting for work"))
}

/// Milliseconds on a host clock (fallback timing where the adapter has no timestamp queries).
pub fn now_ms() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
            * 1e3
    }
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now()
    }
}

/// Runs shaders/subgroup_probe.wgsl and returns the subgroup width the kernels may rely on
/// (0 if the xor-shuffle does not address `local_invocation_index ^ m`).
pub async fn probe_subgroups(backend: &WgpuBackend) -> Result<u32> {
    let device = &backend.device;
    const N: u64 = 128;
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("flashattn subgroup probe"),
        size: N * 8,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let read = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("flashattn subgroup probe read"),
        size: N * 8,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    scoped(device, || {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("flashattn subgroup probe"),
            source: wgpu::ShaderSource::Wgsl(crate::shaders::subgroup_probe_source().into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("flashattn subgroup probe"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: out.as_entire_binding(),
            }],
        });
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        enc.copy_buffer_to_buffer(&out, 0, &read, 0, N * 8);
        backend.queue.submit([enc.finish()]);
        Ok(())
    })
    .await?;
    let bytes = read_mapped(device, &read, N * 8).await?;
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
    let size = words.chunks(2).map(|w| w[1]).min().unwrap_or(0);
    if size < 2 || !size.is_power_of_two() {
        return Ok(0);
    }
    // Every xor distance below the subgroup width (up to 8) must address lid ^ m.
    let needed: u32 = (0..4)
        .map(|b| 1u32 << b)
        .filter(|&m| m < size)
        .fold(0, |a, m| a | m);
    let ok = words.chunks(2).all(|w| w[0] & needed == needed);
    Ok(if ok { size.min(16) } else { 0 })
}
