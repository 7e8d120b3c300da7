//! flashattn-core: the problem description (`AttentionSpec`), errors, host tensors, the
//! `Backend` trait and the f64 reference implementation that every backend is tested against.

pub mod alloc_meter;
mod backend;
mod dtype;
mod error;
pub mod fp8;
mod inputs;
mod reference;
mod spec;
mod tensor;
pub mod testing;

pub use backend::{Algorithm, Backend, BenchMeasure, BenchPlan};
pub use dtype::DType;
pub use error::{Error, Result};
pub use inputs::{lse_max_error, random_inputs, rel_l2_error, validate_inputs};
pub use reference::{reference_attention, ReferenceOutput};
pub use spec::{Alibi, AttentionSpec, Fp8Descale, SeqBounds, Varlen, MAX_HEAD_DIM};
pub use tensor::{Output, Tensor, TensorRef};
