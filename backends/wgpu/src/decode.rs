//! Decode against a KV cache: not implemented on this backend yet, so `Backend::decode` keeps
//! the trait's default (`Error::Unsupported` naming the backend). The pieces a decode kernel
//! reuses are the forward's: split-KV slicing (`plan::slicing`), the partial slots and the
//! combine kernel (shaders/combine.wgsl).
