//! `CudaBackend::decode_device`: one decode step on device memory the caller owns (caches,
//! q, new rows, out, LSE and the cache's int32 tables), for apps that keep their KV cache in
//! their own CUDA allocations. `decode_device_with_tables` also leaves the cache lengths on
//! the device only (the spec holds bounds), reads ALiBi slopes and rotary tables and its
//! scratch from the caller's memory (`decode_tables.rs`), and then returns without waiting.

use crate::decode::{decode_plan_from_bounds, DecodePlan, DecodePointers, Workspace};
use crate::decode_tables::DecodeDeviceTables;
use crate::decode_workspace::{scratch_in, scratch_layout};
use crate::CudaBackend;
use flashattn_core::{AttentionSpec, CacheLayout, Error, KvCache, Result};

/// Device pointers (`CUdeviceptr`) of a decode call's tensors, owned by the caller, in the
/// primary context of the backend's device: q, the caches and the new rows in the spec's dtype, out in its output
/// dtype, lse f32 (exactly when `return_lse`), and the cache's int32 tables. The tables must
/// hold the same values as the spec's `kv_cache` (the host copies validate the call and size
/// the split; the kernels read the device copies), except the lengths for
/// `decode_device_with_tables`, where the spec's are bounds.
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

impl DeviceDecode {
    /// Refuses, by name, a pointer `spec` needs that is missing, one it has no use for, or a
    /// null or misaligned one.
    fn check(&self, spec: &AttentionSpec, cache: &KvCache) -> Result<()> {
        let t = self;
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
        Ok(())
    }

    /// The call's pointers; the rest come from tables or a workspace.
    fn pointers(&self) -> DecodePointers {
        DecodePointers {
            q: self.q,
            k_cache: self.k_cache,
            v_cache: self.v_cache,
            k_new: self.k_new.unwrap_or(0),
            v_new: self.v_new.unwrap_or(0),
            out: self.out,
            lse: self.lse.unwrap_or(0),
            seqlens: self.seqlens,
            block_table: self.block_table.unwrap_or(0),
            batch_idx: self.batch_idx.unwrap_or(0),
            ..Default::default()
        }
    }
}

fn cache_of(spec: &AttentionSpec) -> Result<&KvCache> {
    spec.kv_cache
        .as_ref()
        .ok_or_else(|| Error::invalid("kv_cache", "none", "a decode call needs a KV cache"))
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
        t.check(spec, cache_of(spec)?)?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let mut ws = Workspace::default();
        let ptrs = ws.prepare(&plan, t.pointers())?;
        self.launch_decode(&plan, &ptrs, true)?;
        self.gpu.synchronize()
    }

    /// The plan of a decode spec whose cache lengths are bounds (`decode_bounds`).
    fn plan_from_bounds(&self, spec: &AttentionSpec) -> Result<DecodePlan> {
        let c = spec.validate()?;
        let plan = decode_plan_from_bounds(&c, &self.decode_variant(&c)?, self.gpu.info.sm_count)?;
        self.fits(plan)
    }

    /// Bytes of the scratch a [`decode_device_with_tables`](Self::decode_device_with_tables)
    /// call of `spec` (its cache lengths bounds) needs in `DecodeDeviceTables::workspace`
    /// (0: none). It depends on the bounds only through the split count, so the size for the
    /// longest bound serves every shorter one of the same shapes.
    pub fn decode_workspace_bytes(&self, spec: &AttentionSpec) -> Result<usize> {
        Ok(scratch_layout(&self.plan_from_bounds(spec)?).1)
    }

    /// [`decode_device`](Self::decode_device) where the cache lengths live on the device only:
    /// `spec.kv_cache.seqlens` are upper bounds of `t.seqlens` entry by entry (`decode_bounds`
    /// from the longest, FlashAttention's `max_seqlen_k`), which size the split-KV launch; the
    /// kernels read the real lengths (0 included: out 0, LSE -inf). ALiBi slopes and rotary
    /// cos / sin come from `tables` where given, else from the spec (uploaded: the rotary rows
    /// up to the longest bound). When every table is given and the scratch fits `tables.workspace`
    /// (or the call needs none), it allocates nothing: it queues the launches on the backend's
    /// stream and returns, like any CUDA op. Otherwise it waits for them before freeing its own.
    ///
    /// # Safety
    /// As for `decode_device` (the block table and batch_idx equal the spec's), and: each
    /// device length at most its bound, each table of `len` elements, and every pointer,
    /// workspace included, valid and used by nothing else until the stream has passed this call
    /// (an event recorded after it, or a synchronisation). Calls on one stream may share a
    /// workspace.
    pub unsafe fn decode_device_with_tables(
        &self,
        spec: &AttentionSpec,
        t: &DeviceDecode,
        tables: &DecodeDeviceTables,
    ) -> Result<()> {
        let plan = self.plan_from_bounds(spec)?;
        let scratch = scratch_layout(&plan).1;
        tables.check(spec, scratch)?;
        t.check(spec, cache_of(spec)?)?;
        let mut base = t.pointers();
        base.alibi = tables.alibi_slopes.map_or(0, |x| x.ptr);
        base.rot_cos = tables.rotary_cos.map_or(0, |x| x.ptr);
        base.rot_sin = tables.rotary_sin.map_or(0, |x| x.ptr);
        if let Some(w) = tables.workspace {
            base = scratch_in(&plan, w.ptr, base);
        }
        let own_scratch = scratch > 0 && tables.workspace.is_none();
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        if own_scratch || !tables.complete(spec) {
            let mut ws = Workspace::default();
            let ptrs = ws.prepare(&plan, base)?;
            self.launch_decode(&plan, &ptrs, true)?;
            return self.gpu.synchronize();
        }
        // Nothing uploaded: the launches need not wait for the legacy default stream either.
        let _unordered = self.gpu.unordered();
        self.launch_decode(&plan, &base, true)
    }
}
