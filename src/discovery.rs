//! Which backends this build knows, and constructing each one on this machine.

use flashattn_core::{Backend, Error};
use std::sync::Arc;

/// Every backend name this build knows, in static priority order (fastest kind first).
pub const KNOWN_BACKENDS: &[&str] = &["cuda", "wgpu", "cpu"];

/// Tries to bring up backend `name`; the error says why it is unavailable here.
pub fn open(name: &str) -> Result<Arc<dyn Backend>, Error> {
    log::debug!("flashattn: bringing up backend {name}");
    match name {
        "cpu" => Ok(Arc::new(flashattn_cpu::CpuBackend::new())),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Arc::new(flashattn_wgpu::WgpuBackend::new()?)),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => Err(not_built("wgpu")),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Arc::new(flashattn_cuda::CudaBackend::new()?)),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(not_built("cuda")),
        other => Err(Error::invalid(
            "backend",
            other,
            format!("unknown backend (known: {})", KNOWN_BACKENDS.join(", ")),
        )),
    }
}

#[allow(dead_code)] // used only when a backend feature is off
fn not_built(name: &'static str) -> Error {
    Error::Unavailable {
        backend: name,
        reason: format!("this build of flashattn was compiled without the `{name}` feature"),
    }
}
