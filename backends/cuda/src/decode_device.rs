//! `CudaBackend::decode_device`: one decode step on device memory the caller owns (caches,
//! q, new rows, out, LSE and the cache's int32 tables), for apps that keep their KV cache in
//! their own CUDA allocations.

use crate::decode::{DecodePointers, Workspace};
use crate::CudaBackend;
use flashattn_core::{AttentionSpec, CacheLayout, Error, Result};

/// Device pointers (`CUdeviceptr`) of a decode call's tensors, owned by the caller, in the
/// primary context of the backend's device: q, the caches and the new rows in the spec's dtype, out in its output
/// dtype, lse f32 (exactly when `return_lse`), and the cache's int32 tables. The tables must
/// hold the same values as the spec's `kv_cache` (the host copies validate the call and size
/// the split; the kernels read the device copies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceDecode {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    /// Exactly when `seqlen_new > 0`.
    pub k_new: Option<u64>,
    pub v_new: Option<u64>,
    pub out: u64,
    pub lse: Option<u64>,
    /// `[batch]` int32.
    pub seqlens: u64,
    /// `[batch, max_blocks]` int32: exactly for a paged cache.
    pub block_table: Option<u64>,
    /// `[batch]` int32: exactly when the spec has `batch_idx`.
    pub batch_idx: Option<u64>,
}

impl CudaBackend {
    /// One decode step on device memory the caller owns: appends the new rows into the caches
    /// in place, then attends; returns when the kernels have finished. Rotary tables and ALiBi
    /// slopes come from the spec (uploaded, only the rows this call rotates).
    ///
    /// # Safety
    /// Each pointer must address its tensor's bytes for `spec` (see [`DeviceDecode`]) and stay
    /// valid for the call; the device tables must equal the spec's; out and lse must not
    /// overlap anything else.
    pub unsafe fn decode_device(&self, spec: &AttentionSpec, t: &DeviceDecode) -> Result<()> {
        let plan = self.plan_decode(&spec.validate()?)?;
        let cache = spec
            .kv_cache
            .as_ref()
            .ok_or_else(|| Error::invalid("kv_cache", "none", "a decode call needs a KV cache"))?;
        let new = cache.seqlen_new > 0;
        let paged = matches!(cache.layout, CacheLayout::Paged { .. });
        let presence = [
            ("k_new", t.k_new, new),
            ("v_new", t.v_new, new),
            ("lse", t.lse, spec.return_lse),
            ("block_table", t.block_table, paged),
            ("batch_idx", t.batch_idx, cache.batch_idx.is_some()),
        ];
        for (name, ptr, wanted) in presence {
            if ptr.is_some() != wanted {
                return Err(Error::argument(
                    name,
                    if ptr.is_some() { "given" } else { "missing" },
                    format!("expected {}", if wanted { "a pointer" } else { "none" }),
                ));
            }
        }
        let aligned = [
            ("q", Some(t.q), 16),
            ("k_cache", Some(t.k_cache), 16),
            ("v_cache", Some(t.v_cache), 16),
            ("k_new", t.k_new, 16),
            ("v_new", t.v_new, 16),
            ("out", Some(t.out), 16),
            ("lse", t.lse, 4),
            ("seqlens", Some(t.seqlens), 4),
            ("block_table", t.block_table, 4),
            ("batch_idx", t.batch_idx, 4),
        ];
        for (name, ptr, align) in aligned {
            if let Some(p) = ptr.filter(|&p| p == 0 || p % align != 0) {
                return Err(Error::argument(
                    name,
                    format!("{p:#x}"),
                    format!("device pointers must be non-null and {align}-byte aligned"),
                ));
            }
        }
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let mut ws = Workspace::default();
        let ptrs = ws.prepare(
            &plan,
            DecodePointers {
                q: t.q,
                k_cache: t.k_cache,
                v_cache: t.v_cache,
                k_new: t.k_new.unwrap_or(0),
                v_new: t.v_new.unwrap_or(0),
                out: t.out,
                lse: t.lse.unwrap_or(0),
                seqlens: t.seqlens,
                block_table: t.block_table.unwrap_or(0),
                batch_idx: t.batch_idx.unwrap_or(0),
                ..Default::default()
            },
        )?;
        self.launch_decode(&plan, &ptrs, true)?;
        self.gpu.synchronize()
    }
}
