//! Decode against a KV cache: not implemented on CUDA yet, so `Backend::supports_decode`,
//! `decode` and `kv_cache` keep the trait's defaults (`Error::Unsupported` naming this backend).
//!
//! Where it lands (issue 12): a split-KV decode kernel with the query heads of one KV head
//! packed into a tile, in-place append and rotary, paged KV, and a combine kernel; each a
//! `KernelKind` with its `KernelDef` in variants.rs, tiles and launch arithmetic in tiles.rs,
//! and a device-resident cache handle (`Backend::kv_cache`) here.
