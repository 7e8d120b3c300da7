//! flashattn: fast, memory-efficient, exact attention (FlashAttention) for Rust.
//!
//! One API over several backends: a CPU backend that is always there, portable WGSL kernels
//! through wgpu (feature `wgpu`), and a CUDA FlashAttention-3 path for Hopper (feature `cuda`).
//! [`Runtime`] discovers what this machine offers and picks the fastest backend per problem
//! and pass (forward, backward, decode).
//!
//! ```
//! use flashattn::{AttentionSpec, TensorRef};
//! let spec = AttentionSpec::new(1, 2, 16, 16, 8).causal(true).return_lse(true);
//! let q = vec![0.1f32; 1 * 16 * 2 * 8];
//! let out = flashattn::attention(&spec, TensorRef::F32(&q), TensorRef::F32(&q), TensorRef::F32(&q)).unwrap();
//! assert_eq!(out.out.len(), q.len());
//! ```

mod autotune;
mod canary;
mod canary_problem;
mod canary_twin;
mod discovery;
mod packed;
mod rotary;
mod runtime;
mod settings;
mod store;

pub use flashattn_core::*;
pub use packed::{kv_packed, kv_packed_views, qkv_packed, qkv_packed_views};
pub use rotary::rotary_tables;
pub use runtime::{BackendStatus, Opener, Runtime, Selection};
pub use settings::Settings;

pub use flashattn_cpu as cpu;
#[cfg(feature = "cuda")]
pub use flashattn_cuda as cuda;
#[cfg(feature = "wgpu")]
pub use flashattn_wgpu as wgpu;

/// Runs attention on host slices with the backend the process-wide runtime picks. Inputs
/// are contiguous in the spec's layout, or strided views (`spec.strides`, see
/// [`InputStrides`]: transposed `[b, h, s, d]` tensors, packed buffers) read without a copy
/// by the backends that take them (the CPU today).
pub fn attention(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
) -> Result<Output> {
    let selection = Runtime::global().select(spec)?;
    selection.backend.forward(spec, ForwardInputs { q, k, v })
}

/// The gradients dq, dk, dv of a loss whose gradient with respect to the forward's output is
/// `dout`, given the forward's inputs, output and LSE (run the forward with `return_lse`).
/// Runs on the backend the process-wide runtime picks for the backward pass.
pub fn attention_backward(
    spec: &AttentionSpec,
    q: TensorRef<'_>,
    k: TensorRef<'_>,
    v: TensorRef<'_>,
    out: TensorRef<'_>,
    lse: &[f32],
    dout: TensorRef<'_>,
) -> Result<Grads> {
    let selection = Runtime::global().select_for(spec, Pass::Backward)?;
    let inputs = BackwardInputs {
        q,
        k,
        v,
        out,
        lse,
        dout,
    };
    selection.backend.backward(spec, inputs)
}

/// One decode step against host KV caches (`spec.kv_cache` holds the cache's arguments):
/// appends the new rows in place, then attends. Runs on the backend the process-wide runtime
/// picks for decode; a serving loop that keeps its cache on a device uses
/// [`Runtime::kv_cache`] instead.
pub fn decode(spec: &AttentionSpec, inputs: DecodeInputs<'_>) -> Result<Output> {
    let selection = Runtime::global().select_for(spec, Pass::Decode)?;
    selection.backend.decode(spec, inputs)
}
