//! Decode against a KV cache on the GPU (FlashAttention's `flash_attn_with_kvcache`): which
//! kernels run a decode spec, the plan of one call (parameters, launches, host tables,
//! workspace sizes), the small device buffers beside the caches, the launches, and the
//! host-slice entry point. The caller's device pointers enter through `decode_device.rs` (with
//! the cache lengths on the device only: `decode_tables.rs`), the handle that keeps caches on
//! the GPU between steps is `kv_cache.rs`.
//!
//! One call is up to three launches on the backend's stream: the append (new rows into the cache,
//! k and q rotated), the split-KV attention (the keys of each (batch, KV head) in chunks across
//! CTAs, the query heads of a KV head packed into one tile), and the combine of the chunks'
//! partial (out, LSE). Everything that can fail is checked before the first launch, so a
//! refused call leaves the caches as they were.

use crate::compile::BACKEND;
use crate::decode_tiles::{decode_head_dim, decode_tiles, num_splits, tile_rows};
pub(crate) use crate::decode_workspace::Workspace;
use crate::device::DevBuf;
use crate::forward::arg;
use crate::params::{DecodeParams, KernelParams};
use crate::tiles::{grid_x, Launch};
use crate::variants::{KernelKind, Tiles, Variant, DECODE_APPEND_ENTRY, DECODE_COMBINE_ENTRY};
use crate::CudaBackend;
use flashattn_core::{
    validate_decode_inputs, AttentionSpec, CacheLayout, CheckedSpec, DType, DecodeInputs, Error,
    KvCache, Output, Result, Tensor, TensorMut, TensorRef,
};

fn unsupported(reason: impl Into<String>) -> Error {
    Error::unsupported(BACKEND, reason)
}

/// The decode family `kind` (`DecodeMma` or `DecodeSimt`) for `spec` on a GPU of
/// `compute_capability` whose blocks may use `smem_optin` bytes, or why not.
pub fn select_decode(
    spec: &CheckedSpec<'_>,
    compute_capability: (i32, i32),
    smem_optin: usize,
    kind: KernelKind,
) -> std::result::Result<Variant, String> {
    if spec.kv_cache.is_none() {
        return Err("a decode call needs the KV cache's arguments".into());
    }
    let (major, minor) = compute_capability;
    if major < 8 {
        return Err(format!(
            "the decode kernels need sm_80 or newer (cp.async), this GPU is sm_{major}{minor}"
        ));
    }
    match (kind, spec.dtype) {
        (_, DType::Fp8E4m3) => return Err("fp8e4m3 caches are not implemented".into()),
        (KernelKind::DecodeMma, DType::F32) => {
            return Err(
                "the mma.sync decode kernel takes bf16 or f16; f32 runs on CUDA cores".into(),
            )
        }
        _ => {}
    }
    let bucket = decode_head_dim(spec.head_dim, spec.head_dim_v).ok_or_else(|| {
        format!(
            "the decode kernels take head dims up to 256, not {}/{}",
            spec.head_dim, spec.head_dim_v
        )
    })?;
    let tiles = decode_tiles(kind, spec.dtype, bucket, smem_optin)?;
    Ok(Variant::decode(kind, spec.dtype, bucket, tiles))
}

/// One launch of the append kernel: batch entries `b0 .. b0 + batches` (and the rotated q).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendLaunch {
    pub b0: usize,
    pub batches: usize,
    pub rotate_q: bool,
    pub launch: Launch,
}

/// Host tables a call uploads beside the caches (empty: not needed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodeTables {
    pub seqlens: Vec<i32>,
    pub block_table: Vec<i32>,
    pub batch_idx: Vec<i32>,
    /// cos / sin rows of the positions this call rotates, `[batch, rot_span, dim / 2]`.
    pub rot_cos: Vec<f32>,
    pub rot_sin: Vec<f32>,
    pub alibi: Vec<f32>,
}

/// Everything of one decode call but the device pointers.
#[derive(Clone, Debug)]
pub struct DecodePlan {
    pub variant: Variant,
    /// The kernels' parameters, pointers 0 (`DecodePointers::fill` sets them).
    pub params: DecodeParams,
    /// In order; two entries that write the same cache row get a launch each, in batch order.
    pub appends: Vec<AppendLaunch>,
    pub split: Launch,
    /// The split kernel's entry point in `variant.entry_points()`.
    pub split_entry: usize,
    /// With more than one chunk per (batch, KV head).
    pub combine: Option<Launch>,
    pub tables: DecodeTables,
    /// Workspace elements: rotated q (elements of the dtype), partial out and LSE (f32).
    pub q_rot: usize,
    pub part_out: usize,
    pub part_lse: usize,
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| unsupported(format!("{what} = {v} exceeds int32")))
}

/// Whether two batch entries write the same cache row in this call. With `bounds` (the
/// lengths are upper bounds, the real ones on the device) whether they may, for any lengths
/// within the bounds: a page two sequences share among those they may write (a contiguous
/// cache appends to distinct slots, which validation checks).
fn appends_collide(cache: &KvCache, batch: usize, bounds: bool) -> bool {
    if bounds {
        let CacheLayout::Paged {
            page_size,
            block_table,
            max_blocks,
            ..
        } = &cache.layout
        else {
            return false;
        };
        let mut pages: Vec<i32> = (0..batch)
            .flat_map(|b| {
                let used = cache.keys(b).div_ceil(*page_size);
                block_table[b * max_blocks..b * max_blocks + used]
                    .iter()
                    .copied()
            })
            .collect();
        pages.sort_unstable();
        return pages.windows(2).any(|w| w[0] == w[1]);
    }
    let mut rows: Vec<usize> = (0..batch)
        .flat_map(|b| {
            let used = cache.seqlens[b] as usize;
            (used..used + cache.seqlen_new).map(move |pos| cache.row(b, pos))
        })
        .collect();
    rows.sort_unstable();
    rows.windows(2).any(|w| w[0] == w[1])
}

/// The host tables of a call (lengths, block table or batch_idx, ALiBi slopes, and the cos /
/// sin rows of the positions it rotates), setting the cache's fields of `p`. With `bounds`
/// the cos / sin rows are the tables' first rows, up to the last the bounds can reach,
/// indexed by position (the real lengths are on the device only).
fn cache_tables(
    spec: &CheckedSpec<'_>,
    cache: &KvCache,
    p: &mut DecodeParams,
    bounds: bool,
) -> Result<DecodeTables> {
    let mut tables = DecodeTables {
        seqlens: cache.seqlens.clone(),
        alibi: spec
            .alibi
            .as_ref()
            .map_or_else(Vec::new, |a| a.slopes.clone()),
        ..Default::default()
    };
    match &cache.layout {
        CacheLayout::Contiguous { seqlen_cache, .. } => {
            p.seqlen_cache = to_i32("seqlen_cache", *seqlen_cache)?;
            tables.batch_idx = cache.batch_idx.clone().unwrap_or_default();
        }
        CacheLayout::Paged {
            page_size,
            block_table,
            max_blocks,
            ..
        } => {
            p.page_size = to_i32("page_size", *page_size)?;
            p.max_blocks = to_i32("max_blocks", *max_blocks)?;
            tables.block_table = block_table.clone();
        }
    }
    if let Some(rot) = &cache.rotary {
        // Compact tables: the positions seqlens[b] .. + span of each entry.
        let half = rot.dim / 2;
        let span = cache.seqlen_new.max(if p.positional_q != 0 {
            spec.seqlen_q
        } else {
            1
        });
        if bounds {
            let rows = (0..spec.batch)
                .map(|b| cache.seqlens[b] as usize + span)
                .max();
            let n = rows.unwrap_or(0) * half;
            tables.rot_cos = rot.cos[..n].to_vec();
            tables.rot_sin = rot.sin[..n].to_vec();
        }
        for b in (0..spec.batch).filter(|_| !bounds) {
            let first = cache.seqlens[b] as usize * half;
            tables
                .rot_cos
                .extend_from_slice(&rot.cos[first..first + span * half]);
            tables
                .rot_sin
                .extend_from_slice(&rot.sin[first..first + span * half]);
        }
        p.rot_dim = to_i32("rotary.dim", rot.dim)?;
        p.rot_interleaved = rot.interleaved as i32;
        p.rot_span = if bounds {
            0
        } else {
            to_i32("rotary positions", span)?
        };
    }
    Ok(tables)
}

/// The append launches of a call (none without new rows): all entries in one, or one per
/// entry in batch order when two write the same cache row; the first also rotates q.
fn append_launches(
    cache: &KvCache,
    (batch, sq): (usize, usize),
    threads: u32,
    bounds: bool,
) -> Result<Vec<AppendLaunch>> {
    if cache.seqlen_new == 0 {
        return Ok(Vec::new());
    }
    let groups: Vec<(usize, usize)> = if appends_collide(cache, batch, bounds) {
        (0..batch).map(|b| (b, 1)).collect()
    } else {
        vec![(0, batch)]
    };
    let mut appends = Vec::new();
    for (k, (b0, batches)) in groups.into_iter().enumerate() {
        let rotate_q = k == 0 && cache.rotary.is_some();
        let ctas = batches * cache.seqlen_new + if rotate_q { batch * sq } else { 0 };
        let launch = Launch {
            grid: (grid_x(ctas, "append CTAs").map_err(unsupported)?, 1, 1),
            block: threads,
            smem: 0,
        };
        appends.push(AppendLaunch {
            b0,
            batches,
            rotate_q,
            launch,
        });
    }
    Ok(appends)
}

/// The plan of `spec` (validated, with a cache) on `variant` (from [`select_decode`]) for a GPU
/// of `sm_count` SMs.
pub fn decode_plan(
    spec: &CheckedSpec<'_>,
    variant: &Variant,
    sm_count: usize,
) -> Result<DecodePlan> {
    plan_of(spec, variant, sm_count, false)
}

/// The plan of `spec` whose cache lengths are upper bounds of the real ones, which the kernels
/// read from the device (`decode_bounds`): the split count is sized for the bounds, and the
/// kernels split each entry's real keys over it (an empty split stores LSE -inf, which the
/// combine weighs 0), so it holds for every real length within the bounds. Its host tables
/// index rotary by position (the whole tables' first rows), not by the real lengths, and
/// entries that may write a shared page append one by one.
pub fn decode_plan_from_bounds(
    spec: &CheckedSpec<'_>,
    variant: &Variant,
    sm_count: usize,
) -> Result<DecodePlan> {
    plan_of(spec, variant, sm_count, true)
}

fn plan_of(
    spec: &CheckedSpec<'_>,
    variant: &Variant,
    sm_count: usize,
    bounds: bool,
) -> Result<DecodePlan> {
    let cache = spec
        .kv_cache
        .as_ref()
        .ok_or_else(|| Error::invalid("kv_cache", "none", "a decode call needs a KV cache"))?;
    let Tiles::Decode(tiles) = variant.tiles else {
        return Err(unsupported(format!(
            "{} is not a decode kernel",
            variant.name()
        )));
    };
    let (batch, hkv, sq) = (spec.batch, spec.heads_kv, spec.seqlen_q);
    let rows = sq * spec.group_size(); // <= batch x heads_q x seqlen_q, which fits
    let (tile_rows, split_entry) = tile_rows(variant.kind, rows);
    let row_blocks = rows.div_ceil(tile_rows);
    let key_blocks = (0..batch)
        .map(|b| {
            flashattn_core::mask::blocks(
                spec.mask.keys_of_rows(0..sq, sq, cache.keys(b)),
                tiles.block_n,
            )
            .len()
        })
        .max()
        .unwrap_or(0);
    let ctas = batch.saturating_mul(hkv).saturating_mul(row_blocks);
    let splits = num_splits(key_blocks, ctas, sm_count);
    let grid = grid_x(ctas.saturating_mul(splits), "decode CTAs").map_err(unsupported)?;
    let smem = tiles.smem_bytes(variant.kind, spec.dtype, variant.head_dim, tile_rows);
    let threads = 128;
    let out_rows = spec.sizes.lse; // batch x seqlen_q x heads_q
    let mut p = DecodeParams {
        attn: KernelParams::new(spec, tile_rows)?,
        seqlen_new: to_i32("seqlen_new", cache.seqlen_new)?,
        num_splits: splits as i32,
        rows: to_i32("packed rows", rows)?,
        row_blocks: to_i32("row blocks", row_blocks)?,
        positional_q: (spec.causal || spec.window != (-1, -1)) as i32,
        ..Default::default()
    };
    let tables = cache_tables(spec, cache, &mut p, bounds)?;
    let q_rot = if cache.rotary.is_some() {
        spec.sizes.q
    } else {
        0
    };
    let appends = append_launches(cache, (batch, sq), threads, bounds)?;
    let combine = (splits > 1)
        .then(|| grid_x(out_rows.div_ceil(4), "combine CTAs"))
        .transpose()
        .map_err(unsupported)?
        .map(|g| Launch {
            grid: (g, 1, 1),
            block: threads,
            smem: 0,
        });
    let (part_out, part_lse) = if splits > 1 {
        (splits * out_rows * spec.head_dim_v, splits * out_rows)
    } else {
        (0, 0)
    };
    Ok(DecodePlan {
        variant: *variant,
        params: p,
        appends,
        split: Launch {
            grid: (grid, 1, 1),
            block: threads,
            smem,
        },
        split_entry,
        combine,
        tables,
        q_rot,
        part_out,
        part_lse,
    })
}

/// Device pointers of one call (0: absent). The caches, q, the new rows, out and lse are the
/// caller's or ours; the rest live in a [`Workspace`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DecodePointers {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub k_new: u64,
    pub v_new: u64,
    pub out: u64,
    pub lse: u64,
    pub seqlens: u64,
    pub block_table: u64,
    pub batch_idx: u64,
    pub rot_cos: u64,
    pub rot_sin: u64,
    pub alibi: u64,
    pub q_rot: u64,
    pub part_out: u64,
    pub part_lse: u64,
}

impl DecodePointers {
    /// `plan.params` with these pointers: the split kernel reads the rotated q when there is one.
    pub fn fill(&self, plan: &DecodePlan) -> DecodeParams {
        let mut p = plan.params;
        p.attn.q = if self.q_rot != 0 { self.q_rot } else { self.q };
        p.attn.k = self.k_cache;
        p.attn.v = self.v_cache;
        p.attn.out = self.out;
        p.attn.lse = self.lse;
        p.attn.alibi = self.alibi;
        p.q_in = self.q;
        p.k_new = self.k_new;
        p.v_new = self.v_new;
        p.seqlens = self.seqlens;
        p.block_table = self.block_table;
        p.batch_idx = self.batch_idx;
        p.rot_cos = self.rot_cos;
        p.rot_sin = self.rot_sin;
        p.part_out = self.part_out;
        p.part_lse = self.part_lse;
        p
    }
}

/// Device copies of a call's q, caches and new rows (absent when it has none), and its out and
/// LSE (absent unless asked for): what the host API and the benchmark run on.
pub(crate) struct DecodeBuffers {
    pub q: DevBuf,
    pub k_cache: DevBuf,
    pub v_cache: DevBuf,
    pub new: Option<[DevBuf; 2]>,
    pub out: DevBuf,
    pub lse: Option<DevBuf>,
}

impl DecodeBuffers {
    /// Uploads `[q, k_cache, v_cache]` and the new rows `[k, v]`; zeroed out and LSE for `c`.
    pub fn upload(
        c: &CheckedSpec<'_>,
        [q, k_cache, v_cache]: [TensorRef<'_>; 3],
        new: Option<[TensorRef<'_>; 2]>,
    ) -> Result<DecodeBuffers> {
        let up = |t: TensorRef<'_>| DevBuf::from_bytes(t.as_bytes());
        let new = match new {
            Some([k, v]) => Some([up(k)?, up(v)?]),
            None => None,
        };
        let lse = match c.return_lse {
            true => Some(DevBuf::zeroed(c.sizes.lse * 4)?),
            false => None,
        };
        Ok(DecodeBuffers {
            q: up(q)?,
            k_cache: up(k_cache)?,
            v_cache: up(v_cache)?,
            new,
            out: DevBuf::zeroed(c.sizes.out * c.dtype.output().size_bytes())?,
            lse,
        })
    }

    /// Their pointers (0: absent); the tables and scratch come from a [`Workspace`].
    pub fn pointers(&self) -> DecodePointers {
        let [k_new, v_new] = self.new.as_ref().map_or([0, 0], |n| [n[0].ptr, n[1].ptr]);
        DecodePointers {
            q: self.q.ptr,
            k_cache: self.k_cache.ptr,
            v_cache: self.v_cache.ptr,
            k_new,
            v_new,
            out: self.out.ptr,
            lse: self.lse.as_ref().map_or(0, |b| b.ptr),
            ..Default::default()
        }
    }
}

/// The kernel variant name of a decode plan's split kernel, for the canary.
pub(crate) fn variant_name(plan: &DecodePlan) -> String {
    let entry = plan.variant.entry_points()[plan.split_entry];
    format!(
        "{}/{}",
        plan.variant.name(),
        entry.trim_start_matches("fa_decode_")
    )
}

/// Writes `bytes` over the host tensor `t` (same dtype and length, checked by the caller).
fn write_back(t: &mut TensorMut<'_>, bytes: &[u8]) {
    let dst: &mut [u8] = match t {
        TensorMut::F32(s) => bytemuck::cast_slice_mut(s),
        TensorMut::F16(s) => bytemuck::cast_slice_mut(s),
        TensorMut::Bf16(s) => bytemuck::cast_slice_mut(s),
        TensorMut::Fp8E4m3(s) => s,
    };
    dst.copy_from_slice(bytes);
}

impl CudaBackend {
    /// The decode kernel family for `spec` here: forced generic runs the CUDA-core kernel,
    /// forced hopper or mma the mma.sync one; else mma.sync for f16 / bf16 (the padded 16-row
    /// tile costs about 4 tensor-core instructions per key row, far below what memory
    /// bandwidth leaves per row), CUDA cores for f32 (no tf32: f32 accuracy).
    pub(crate) fn decode_variant(&self, spec: &CheckedSpec<'_>) -> Result<Variant> {
        let kind = match self.forced {
            Some(KernelKind::Generic) => KernelKind::DecodeSimt,
            Some(_) => KernelKind::DecodeMma,
            None if spec.dtype == DType::F32 => KernelKind::DecodeSimt,
            None => KernelKind::DecodeMma,
        };
        let info = &self.gpu.info;
        select_decode(spec, info.compute_capability, info.smem_optin, kind).map_err(unsupported)
    }

    /// The plan of a validated decode spec on this GPU, or why it cannot run.
    pub(crate) fn plan_decode(&self, c: &CheckedSpec<'_>) -> Result<DecodePlan> {
        let variant = self.decode_variant(c)?;
        self.fits(decode_plan(c, &variant, self.gpu.info.sm_count)?)
    }

    /// `plan`, if its shared memory fits this GPU.
    pub(crate) fn fits(&self, plan: DecodePlan) -> Result<DecodePlan> {
        if plan.split.smem > self.gpu.info.smem_optin {
            return Err(unsupported(format!(
                "{} needs {} bytes of shared memory, this GPU allows {}",
                plan.variant.name(),
                plan.split.smem,
                self.gpu.info.smem_optin
            )));
        }
        Ok(plan)
    }

    /// Queues `plan`'s launches on the backend's stream (no synchronisation); `attend` false
    /// queues the append only.
    pub(crate) fn launch_decode(
        &self,
        plan: &DecodePlan,
        ptrs: &DecodePointers,
        attend: bool,
    ) -> Result<()> {
        let v = &plan.variant;
        let base = ptrs.fill(plan);
        for a in &plan.appends {
            let mut p = base;
            p.append_b0 = a.b0 as i32;
            p.append_batches = a.batches as i32;
            p.rotate_q = a.rotate_q as i32;
            let f = self.gpu.function(v, DECODE_APPEND_ENTRY, 0)?;
            self.gpu
                .launch(f, a.launch.grid, a.launch.block, 0, &mut [arg(&mut p)])?;
        }
        if !attend {
            return Ok(());
        }
        let mut p = base;
        let l = plan.split;
        let f = self.gpu.function(v, plan.split_entry, l.smem)?;
        self.gpu
            .launch(f, l.grid, l.block, l.smem, &mut [arg(&mut p)])?;
        if let Some(l) = plan.combine {
            let f = self.gpu.function(v, DECODE_COMBINE_ENTRY, 0)?;
            self.gpu.launch(f, l.grid, l.block, 0, &mut [arg(&mut p)])?;
        }
        Ok(())
    }

    /// One decode step on host slices (`Backend::decode`): uploads the caches and inputs,
    /// runs, reads out, LSE and both caches back.
    pub(crate) fn decode_host(
        &self,
        spec: &AttentionSpec,
        mut inputs: DecodeInputs<'_>,
    ) -> Result<Output> {
        let c = validate_decode_inputs(spec, &inputs)?;
        let plan = self.plan_decode(&c)?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let new = inputs.k_new.zip(inputs.v_new);
        let bufs = DecodeBuffers::upload(
            &c,
            [inputs.q, inputs.k_cache.as_ref(), inputs.v_cache.as_ref()],
            new.map(|(k, v)| [k, v]),
        )?;
        let ptrs = Workspace::default().prepare(&plan, bufs.pointers())?;
        self.launch_decode(&plan, &ptrs, true)?;
        self.gpu.synchronize()?;
        let out = Tensor::from_bytes(spec.dtype.output(), &bufs.out.to_vec()?)?;
        let lse = match &bufs.lse {
            Some(b) => Some(bytemuck::pod_collect_to_vec(&b.to_vec()?)),
            None => None,
        };
        let (kb, vb) = (bufs.k_cache.to_vec()?, bufs.v_cache.to_vec()?);
        write_back(&mut inputs.k_cache, &kb);
        write_back(&mut inputs.v_cache, &vb);
        Ok(Output { out, lse })
    }
}
