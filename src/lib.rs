//! flashattn: fast, memory-efficient, exact attention (FlashAttention) for Rust.
//!
//! One API over several backends: a CPU backend that is always there, portable WGSL kernels
//! through wgpu (feature `wgpu`), and a CUDA FlashAttention-3 path for Hopper (feature `cuda`).
//! [`Runtime`] discovers what this machine offers and picks the fastest backend per problem.
//!
//! ```
//! use flashattn::{AttentionSpec, TensorRef};
//! let spec = AttentionSpec::new(1, 2, 16, 16, 8).causal(true).return_lse(true);
//! let q = vec![0.1f32; 1 * 16 * 2 * 8];
//! let out = flashattn::attention(&spec, TensorRef::F32(&q), TensorRef::F32(&q), TensorRef::F32(&q)).unwrap();
//! assert_eq!(out.out.len(), q.len());
//! ```

mod autotune;
mod discovery;
mod runtime;

pub use flashattn_core::*;
pub use runtime::{BackendStatus, Runtime, Selection};

pub use flashattn_cpu as cpu;
#[cfg(feature = "cuda")]
pub use flashattn_cuda as cuda;
#[cfg(feature = "wgpu")]
pub use flashattn_wgpu as wgpu;

/// Runs attention on host slices with the backend the process-wide runtime picks.
pub fn attention(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<Output> {
    let runtime = Runtime::global();
    let selection = runtime.select(spec)?;
    selection.backend.forward(spec, q, k, v)
}
