//! Helpers of core's integration tests.

use flashattn_core::{reference_attention, AttentionSpec, ReferenceOutput, TensorRef};

/// The f64 reference forward of f32 q, k, v.
pub fn reference_f32(spec: &AttentionSpec, q: &[f32], k: &[f32], v: &[f32]) -> ReferenceOutput {
    let (q, k, v) = (TensorRef::F32(q), TensorRef::F32(k), TensorRef::F32(v));
    reference_attention(spec, q, k, v).unwrap()
}
