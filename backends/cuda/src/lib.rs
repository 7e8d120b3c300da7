//! flashattn-cuda: flashattn's CUDA backend.
//!
//! * On Hopper (sm_90a), bf16/f16 with head_dim 64/128/256 run a FlashAttention-3-style
//!   kernel (kernels/hopper_fwd.cu): TMA loads into an mbarrier-guarded shared-memory ring,
//!   a producer warpgroup and two consumer warpgroups (setmaxnreg), wgmma for Q K^T and P V,
//!   a persistent grid, causal/window block skipping.
//! * Every other shape and NVIDIA GPU (sm_70+) runs a portable CUDA kernel
//!   (kernels/generic_fwd.cu), f32 included.
//! * Kernels are compiled by NVRTC for the device's exact arch at first use and cached on disk
//!   (see [`cache_root`]); nothing links against CUDA at build time: libcuda and NVRTC are
//!   opened at run time (system CUDA, the pip wheel nvidia-cuda-nvrtc, or
//!   `FLASHATTN_CUDA_PATH` / `FLASHATTN_NVRTC_PATH`).
//!
//! `FLASHATTN_CUDA_KERNEL=generic|hopper` forces a kernel (tests use it to check both).

mod backend;
mod cache;
mod compile;
mod device;
mod loader;
mod params;
mod tensor_map;
mod tiles;
mod variants;

pub use backend::{CudaBackend, DeviceTensors};
pub use cache::cache_root;
pub use compile::{compile, compile_all, nvrtc_version, options as nvrtc_options, Compiled};
pub use device::{probe, DeviceInfo};
pub use tiles::{hopper_tiles, HopperTiles};
pub use variants::{all_variants, arch_for, variants_for_arch, KernelKind, Variant};

/// Whether NVRTC can be loaded; `Err` says where it was looked for. Enough for `compile_all`.
pub fn nvrtc_status() -> Result<(i32, i32), String> {
    nvrtc_version().map_err(|e| e.to_string())
}

/// One line for `flashattn info`: the device, or why the backend is unavailable.
pub fn probe_summary() -> String {
    match probe() {
        Ok(info) => match nvrtc_status() {
            Ok((ma, mi)) => format!("{} , NVRTC {ma}.{mi}", info.describe()),
            Err(e) => format!("{} , but {e}", info.describe()),
        },
        Err(e) => e.to_string(),
    }
}
