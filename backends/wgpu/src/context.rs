//! Adapter discovery, device creation, and turning wgpu errors into `flashattn_core::Error`.

use flashattn_core::{Error, Result};
use std::sync::{Arc, Mutex};

pub const NAME: &str = "wgpu";

pub fn backend_err(msg: impl ToString) -> Error {
    Error::backend(NAME, msg)
}

pub fn unsupported(reason: impl Into<String>) -> Error {
    Error::Unsupported {
        backend: NAME,
        reason: reason.into(),
    }
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

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
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
