//! flashattn-core: the problem description (`AttentionSpec`), errors, host tensors, the
//! `Backend` trait, the mask and score-mod vocabulary every backend shares, and the f64
//! reference implementation that every backend is tested against.

pub mod alloc_meter;
mod backend;
mod cache_dir;
mod cache_state;
mod checked;
mod dtype;
mod error;
pub mod fp8;
mod inputs;
mod kv_cache;
pub mod mask;
mod reference;
pub mod score;
mod spec;
mod strides;
mod tensor;
pub mod testing;

pub use backend::{
    Algorithm, Backend, BackwardInputs, BenchMeasure, BenchPlan, BenchRun, DecodeInputs,
    ForwardInputs, Pass,
};
pub use cache_dir::cache_dir;
pub use cache_state::{
    CacheBuffers, CacheConfig, CacheState, DecodeStep, KvCacheHandle, StepInputs,
};
pub use checked::{CheckedSpec, Sizes};
pub use dtype::DType;
pub use error::{Error, Result};
pub use inputs::{
    lse_max_error, random_inputs, random_tensor, rel_l2_error, validate_backward_inputs,
    validate_decode_inputs, validate_decode_step, validate_inputs,
};
pub use kv_cache::{decode_bytes, CacheLayout, KvCache, Rotary};
pub use mask::Mask;
pub use reference::{
    reference_attention, reference_backward, reference_decode, ReferenceDecode, ReferenceGrads,
    ReferenceOutput,
};
pub use score::ScoreMod;
pub use spec::{Alibi, AttentionSpec, Fp8Descale, SeqBounds, Varlen, MAX_HEAD_DIM};
pub use strides::{InputStrides, Strides};
pub use tensor::{Grads, Output, Tensor, TensorMut, TensorRef};
