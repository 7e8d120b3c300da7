//! The backward pass: not implemented on CUDA yet, so `Backend::supports_backward` and
//! `backward` keep the trait's defaults (`Error::Unsupported` naming this backend).
//!
//! Where it lands (issue 12): an mma.sync kernel after FlashAttention-2's backward (outer loop
//! over key blocks, dq by f32 atomics or a fixed-order pass when `spec.deterministic`), added
//! as `KernelKind`s with their `KernelDef` in variants.rs (their sources, entry points and the
//! SASS they must show; tests/sass.rs then compiles them for every CI arch), tiles and launch
//! arithmetic in tiles.rs, and `CudaBackend::backward_device` beside `forward_device` here.
