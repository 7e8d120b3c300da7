//! Decode against a KV cache (FlashAttention's `flash_attn_with_kvcache`) on the device:
//! shaders/decode_append.wgsl writes the new k / v rows into the cache in place (k rotated),
//! then the flash kernel's DECODE variant attends: the query heads of one KV head packed into
//! one workgroup (each cache row is staged once per group), keys found through the block
//! table, split over workgroups (split-KV) and bounded per dispatch, the partial (O, LSE)
//! merged by the combine kernel.
//!
//! Everything that can fail on the host (validation, support, sizes) happens before anything
//! is recorded, so a refused call leaves the caches exactly as they were.

use crate::bindings::{BufferSlice, LayoutKind};
use crate::device::{backend_err, unsupported};
use crate::dispatch::{check_apart, check_buffer, grid_2d, record_pass, Dispatch, Scratch};
use crate::forward::{check_forward_buffers, forward_geometry, DeviceInputs, DeviceOutputs, Pass};
use crate::params::{
    table_words, Params, FLAG_CACHE, FLAG_ROTARY_INTERLEAVED, FLAG_ROTARY_Q_POSITIONAL,
};
use crate::plan::{token_chunks, Plan};
use crate::shaders::{Kernel, Variant};
use crate::strided::{Input, View};
use crate::WgpuBackend;
use flashattn_core::{
    validate_decode_inputs, AttentionSpec, CacheLayout, CheckedSpec, DType, DecodeInputs, Error,
    KvCache, Output, Result, TensorMut,
};
use std::collections::HashSet;

/// Device buffers of one decode step (`BufferUsages::STORAGE`, on this backend's device, in
/// the spec's dtype): q, the caches (appended to in place), and the new rows when
/// `seqlen_new > 0`.
#[derive(Clone, Copy)]
pub struct DeviceDecodeInputs<'a> {
    pub q: BufferSlice<'a>,
    pub k_cache: BufferSlice<'a>,
    pub v_cache: BufferSlice<'a>,
    pub k_new: Option<BufferSlice<'a>>,
    pub v_new: Option<BufferSlice<'a>>,
}

impl DeviceDecodeInputs<'_> {
    /// What the attention reads: q, and the caches as k and v.
    fn attention_inputs(&self) -> DeviceInputs<'_> {
        DeviceInputs {
            q: self.q,
            k: self.k_cache,
            v: self.v_cache,
        }
    }
}

/// The cache arguments of one call as the kernels read them: `Params` fields and the words
/// appended to the `tables` binding (block table, seqlens, rotary cos and sin).
pub(crate) struct CacheArgs {
    params: Params,
    pub words: Vec<u32>,
}

impl CacheArgs {
    /// Only what this call reads goes up: each sequence's used pages (the table's stride is
    /// the most any sequence uses) and the rotary rows from its seqlen on.
    pub fn new(c: &CheckedSpec<'_>, cache: &KvCache) -> CacheArgs {
        let base = table_words(c).len() as u32;
        let batch = c.batch;
        let mut p = Params {
            flags: FLAG_CACHE,
            seqlen_new: cache.seqlen_new as u32,
            ..Params::default()
        };
        let mut words = Vec::new();
        match &cache.layout {
            CacheLayout::Contiguous { seqlen_cache, .. } => {
                (p.page_size, p.max_blocks) = (*seqlen_cache as u32, 1);
                let slot = |b: usize| cache.batch_idx.as_ref().map_or(b as i32, |idx| idx[b]);
                words.extend((0..batch).map(|b| slot(b) as u32));
            }
            CacheLayout::Paged {
                page_size,
                block_table,
                max_blocks,
                ..
            } => {
                let used = (0..batch)
                    .map(|b| cache.keys(b).div_ceil(*page_size))
                    .max()
                    .unwrap_or(0)
                    .max(1);
                (p.page_size, p.max_blocks) = (*page_size as u32, used as u32);
                for b in 0..batch {
                    let row = &block_table[b * max_blocks..][..used.min(*max_blocks)];
                    words.extend(row.iter().map(|&x| x as u32));
                    words.extend(std::iter::repeat_n(0, used - row.len()));
                }
            }
        }
        p.tab_pages = base;
        p.tab_seqlens = base + words.len() as u32;
        words.extend(cache.seqlens.iter().map(|&l| l as u32));
        p.tab_cos = base + words.len() as u32;
        if let Some(rot) = &cache.rotary {
            let positional = c.causal || c.window != (-1, -1);
            let span = cache
                .seqlen_new
                .max(if positional { c.seqlen_q } else { 1 });
            let half = rot.dim / 2;
            (p.rotary_dim, p.rotary_span) = (rot.dim as u32, span as u32);
            if rot.interleaved {
                p.flags |= FLAG_ROTARY_INTERLEAVED;
            }
            if positional {
                p.flags |= FLAG_ROTARY_Q_POSITIONAL;
            }
            for table in [&rot.cos, &rot.sin] {
                for &len in &cache.seqlens {
                    let rows = &table[len as usize * half..][..span * half];
                    words.extend(rows.iter().map(|x| x.to_bits()));
                }
            }
        }
        CacheArgs { params: p, words }
    }

    /// Sets the cache fields of one dispatch's params.
    pub fn apply(&self, p: &mut Params) {
        let a = &self.params;
        p.flags |= a.flags;
        p.seqlen_new = a.seqlen_new;
        p.page_size = a.page_size;
        p.max_blocks = a.max_blocks;
        p.tab_pages = a.tab_pages;
        p.tab_seqlens = a.tab_seqlens;
        p.tab_cos = a.tab_cos;
        p.rotary_dim = a.rotary_dim;
        p.rotary_span = a.rotary_span;
    }
}

/// The batch ranges of the append dispatches: one for all, or one per sequence where two
/// sequences write the same cache row (pages shared), so that the later one wins as in the
/// reference.
fn append_ranges(c: &CheckedSpec<'_>, cache: &KvCache) -> Vec<(u32, u32)> {
    let mut rows = HashSet::new();
    let shared = (0..c.batch).any(|b| {
        let used = cache.seqlens[b] as usize;
        (0..cache.seqlen_new).any(|t| !rows.insert(cache.row(b, used + t)))
    });
    if shared {
        (0..c.batch as u32).map(|b| (b, b + 1)).collect()
    } else {
        vec![(0, c.batch as u32)]
    }
}

impl WgpuBackend {
    /// Why this backend cannot run the decode step `spec`, if it cannot.
    pub fn check_decode_supported(&self, spec: &AttentionSpec) -> Result<()> {
        self.supports_decode_checked(&spec.validate()?)
    }

    pub(crate) fn supports_decode_checked(&self, c: &CheckedSpec<'_>) -> Result<()> {
        if c.kv_cache.is_none() {
            return Err(Error::invalid(
                "kv_cache",
                "none",
                "a decode call needs the KV cache's arguments",
            ));
        }
        self.supports_shape(c)?;
        let es = c.dtype.size_bytes() as u64;
        for (name, n) in [("k cache", c.sizes.k), ("v cache", c.sizes.v)] {
            let bytes = n as u64 * es;
            if bytes > self.binding_limit {
                return Err(unsupported(format!(
                    "the {name} ({bytes} bytes) exceeds the storage binding limit of {} bytes: decode binds the whole cache",
                    self.binding_limit
                )));
            }
        }
        let dims = self.limits.max_compute_workgroups_per_dimension as usize;
        if c.heads_kv > dims {
            return Err(unsupported(format!(
                "heads_kv = {} exceeds the adapter's {dims} workgroups per dimension",
                c.heads_kv
            )));
        }
        Ok(())
    }

    /// Host API: uploads q, the caches and the new rows, appends and attends, and writes the
    /// appended caches back into `inputs` (only on success).
    pub async fn decode_async(
        &self,
        spec: &AttentionSpec,
        mut inputs: DecodeInputs<'_>,
    ) -> Result<Output> {
        let c = validate_decode_inputs(spec, &inputs)?;
        self.supports_decode_checked(&c)?;
        self.ready().await?;
        let cache_usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let kc = self.upload_as(inputs.k_cache.as_ref(), cache_usage);
        let vc = self.upload_as(inputs.v_cache.as_ref(), cache_usage);
        let qb = self.upload_view(inputs.q, &View::of(&c, Input::Q));
        let new = [inputs.k_new, inputs.v_new].map(|t| t.map(|t| self.upload(t)));
        let es = c.dtype.size_bytes() as u64;
        let (k_bytes, v_bytes) = (c.sizes.k as u64 * es, c.sizes.v as u64 * es);
        let device = DeviceDecodeInputs {
            q: (&qb).into(),
            k_cache: (&kc).into(),
            v_cache: (&vc).into(),
            k_new: new[0].as_ref().map(BufferSlice::from),
            v_new: new[1].as_ref().map(BufferSlice::from),
        };
        let (k_at, v_at) = (0, k_bytes.next_multiple_of(4));
        let out_at = v_at + v_bytes.next_multiple_of(4);
        let result = self
            .run_host_step(&c, device, out_at, |enc, read| {
                enc.copy_buffer_to_buffer(&kc, 0, read, k_at, v_at);
                enc.copy_buffer_to_buffer(&vc, 0, read, v_at, out_at - v_at);
            })
            .await;
        for b in [qb, kc, vc].into_iter().chain(new.into_iter().flatten()) {
            self.buffers.give(b);
        }
        let (output, bytes) = result?;
        write_bytes(
            &mut inputs.k_cache,
            &bytes[k_at as usize..][..k_bytes as usize],
        );
        write_bytes(
            &mut inputs.v_cache,
            &bytes[v_at as usize..][..v_bytes as usize],
        );
        Ok(output)
    }

    /// Records one decode step on `inputs`, reads out and LSE back after the `before` bytes
    /// that `copy_before` copies into the read buffer, and returns them with those bytes.
    pub(crate) async fn run_host_step(
        &self,
        c: &CheckedSpec<'_>,
        inputs: DeviceDecodeInputs<'_>,
        before: u64,
        copy_before: impl FnOnce(&mut wgpu::CommandEncoder, &wgpu::Buffer),
    ) -> Result<(Output, Vec<u8>)> {
        let out_bytes = c.sizes.out as u64 * c.dtype.output().size_bytes() as u64;
        let lse_bytes = if c.return_lse {
            c.sizes.lse as u64 * 4
        } else {
            0
        };
        let io = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let out = self.buffers.take(&self.device, out_bytes, io);
        let lse = c
            .return_lse
            .then(|| self.buffers.take(&self.device, lse_bytes, io));
        let lse_at = before + out_bytes.next_multiple_of(4);
        let total = lse_at + lse_bytes;
        let read = self.read_buffer(total);
        let outputs = DeviceOutputs {
            out: (&out).into(),
            lse: lse.as_ref().map(BufferSlice::from),
        };
        let submitted = self
            .submit(|enc| {
                let scratch = self.encode_decode(c, inputs, Some(outputs), enc, None)?;
                copy_before(enc, &read);
                enc.copy_buffer_to_buffer(&out, 0, &read, before, lse_at - before);
                if let Some(lse) = &lse {
                    enc.copy_buffer_to_buffer(lse, 0, &read, lse_at, lse_bytes);
                }
                Ok(scratch)
            })
            .await;
        let bytes = match submitted {
            Ok(_) => crate::device::read_mapped(&self.device, &read, total).await,
            Err(e) => Err(e),
        };
        for b in [out, read].into_iter().chain(lse) {
            self.buffers.give(b);
        }
        let bytes = bytes?;
        self.errors.check()?;
        let at = before as usize;
        let out_t = flashattn_core::Tensor::from_bytes(
            c.dtype.output(),
            &bytes[at..at + out_bytes as usize],
        )?;
        let lse = c.return_lse.then(|| {
            let at = lse_at as usize;
            bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[at..at + lse_bytes as usize])
        });
        Ok((Output { out: out_t, lse }, bytes))
    }

    /// Device-resident API: records and submits one decode step on buffers that live on this
    /// backend's device (the caches are appended to in place). Nothing is read back.
    pub async fn decode_buffers(
        &self,
        spec: &AttentionSpec,
        inputs: DeviceDecodeInputs<'_>,
        outputs: DeviceOutputs<'_>,
    ) -> Result<()> {
        let c = spec.validate()?;
        self.supports_decode_checked(&c)?;
        self.ready().await?;
        self.submit(|enc| self.encode_decode(&c, inputs, Some(outputs), enc, None))
            .await?;
        self.errors.check()
    }

    /// Records the append and, with `outputs`, the attention of one decode step into `enc`
    /// (`timer`: timestamps 0 and 1 around the pass).
    pub(crate) fn encode_decode(
        &self,
        c: &CheckedSpec<'_>,
        inputs: DeviceDecodeInputs<'_>,
        outputs: Option<DeviceOutputs<'_>>,
        enc: &mut wgpu::CommandEncoder,
        timer: Option<&wgpu::QuerySet>,
    ) -> Result<Scratch> {
        let cache = c
            .kv_cache
            .as_ref()
            .ok_or_else(|| backend_err("a decode step without a KV cache"))?;
        let es = c.dtype.size_bytes() as u64;
        if let Some(o) = outputs {
            check_forward_buffers(c, inputs.attention_inputs(), o)?;
        }
        check_buffer("k cache", inputs.k_cache, c.sizes.k as u64 * es)?;
        check_buffer("v cache", inputs.v_cache, c.sizes.v as u64 * es)?;
        let args = CacheArgs::new(c, cache);
        let mut scratch = Scratch::default();
        let tables = self.tables(c, &args.words);
        scratch.keep(&tables);
        let mut dispatches = self.append_dispatches(c, &args, inputs, &tables, &mut scratch)?;
        if let Some(outputs) = outputs {
            let (plan, tiles, grid) = self.decode_plan(c)?;
            let pass = Pass {
                plan: &plan,
                tiles,
                grid,
                tables: &tables,
                cache: Some(&args),
            };
            let qkv = inputs.attention_inputs();
            dispatches.extend(self.forward_dispatches(c, &pass, qkv, outputs, &mut scratch)?);
        }
        record_pass(enc, "flashattn decode", timer, &dispatches);
        Ok(scratch)
    }

    /// The append dispatches (none without new rows).
    fn append_dispatches(
        &self,
        c: &CheckedSpec<'_>,
        args: &CacheArgs,
        inputs: DeviceDecodeInputs<'_>,
        tables: &wgpu::Buffer,
        scratch: &mut Scratch,
    ) -> Result<Vec<Dispatch>> {
        let cache = c.kv_cache.as_ref().map_or(0, |k| k.seqlen_new);
        let (Some(k_new), Some(v_new), true) = (inputs.k_new, inputs.v_new, cache > 0) else {
            return Ok(Vec::new());
        };
        let es = c.dtype.size_bytes() as u64;
        check_buffer("k_new", k_new, c.sizes.k_new as u64 * es)?;
        check_buffer("v_new", v_new, c.sizes.v_new as u64 * es)?;
        // The append reads the new rows and writes the caches.
        check_apart(
            &[("k_new", k_new), ("v_new", v_new)],
            &[("k cache", inputs.k_cache), ("v cache", inputs.v_cache)],
        )?;
        let ranges = append_ranges(
            c,
            c.kv_cache.as_ref().ok_or_else(|| backend_err("no cache"))?,
        );
        let params: Vec<Params> = ranges
            .iter()
            .map(|&(b0, b1)| {
                let mut p = Params::base(c);
                args.apply(&mut p);
                (p.append_b0, p.append_b1) = (b0, b1);
                p
            })
            .collect();
        let uniforms = self.uniforms(&params);
        scratch.keep(&uniforms.buffer);
        let pipeline = self.pipeline(Variant {
            kernel: Kernel::DecodeAppend,
            dtype: c.dtype,
        })?;
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        let mut dispatches = Vec::with_capacity(ranges.len());
        for (i, &(b0, b1)) in ranges.iter().enumerate() {
            let rows = u64::from(b1 - b0) * cache as u64 * c.heads_kv as u64;
            let elems = rows * (c.head_dim + c.head_dim_v) as u64;
            if elems >= u64::from(u32::MAX) {
                return Err(unsupported(format!(
                    "{elems} new k / v elements: the append kernel indexes them in u32"
                )));
            }
            let bindings = [
                uniforms.range(i),
                BufferSlice::words(k_new, 0, c.sizes.k_new as u64 * es)?,
                BufferSlice::words(v_new, 0, c.sizes.v_new as u64 * es)?,
                BufferSlice::words(inputs.k_cache, 0, c.sizes.k as u64 * es)?,
                BufferSlice::words(inputs.v_cache, 0, c.sizes.v as u64 * es)?,
                BufferSlice::whole(tables),
            ];
            dispatches.push(Dispatch {
                pipeline: pipeline.clone(),
                group: self.bind_group(LayoutKind::Append, &bindings)?,
                grid: grid_2d(elems.div_ceil(64), dims)?,
            });
        }
        Ok(dispatches)
    }

    /// Tiles, plan and grid of the attention: blocks of packed rows (the query rows of one
    /// KV head's group) x KV heads x sequences * splits, the whole cache bound, keys sliced.
    fn decode_plan(&self, c: &CheckedSpec<'_>) -> Result<(Plan, crate::tiles::Tiles, [u32; 3])> {
        let packed = c.seqlen_q as u64 * c.group_size() as u64;
        let lim = self.tile_limits();
        let tiles = crate::tiles::Tiles::forward(
            c.head_dim as u32,
            c.head_dim_v as u32,
            packed.min(u64::from(u32::MAX)) as u32,
            &lim,
        );
        let q_blocks = packed.div_ceil(u64::from(tiles.block_m));
        let keys = self.key_slicing(c, &tiles, q_blocks, c.heads_kv as u64);
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        let z = c.batch as u64 * u64::from(keys.splits);
        if q_blocks > dims || z > dims {
            return Err(unsupported(format!(
                "a decode grid of {q_blocks} x {} x {z} workgroups exceeds the adapter's {dims} per dimension",
                c.heads_kv
            )));
        }
        // Packed rows of odd length share words between rows: write through the combine
        // kernel, which owns whole words.
        let odd_bf16 = c.dtype == DType::Bf16 && c.head_dim_v % 2 == 1;
        let partial = odd_bf16 || keys.splits > 1 || keys.passes > 1;
        let geom = forward_geometry(c);
        let part_row = if partial {
            geom.part_row * u64::from(keys.splits)
        } else {
            0
        };
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment);
        let q_chunks = token_chunks(
            geom.q_tokens,
            &[geom.q_row, geom.o_row],
            part_row,
            self.binding_limit,
            align,
            "query (incl. split-KV partials)",
        )?;
        let max_rows = q_chunks.iter().map(|r| r.1 - r.0).max().unwrap_or(0);
        let plan = Plan {
            q_chunks,
            // Keys are cache positions, not bound by token: one range covers them.
            k_chunks: vec![(0, c.sizes.max_k_len as u64)],
            keys,
            partial,
            max_rows,
        };
        let grid = [q_blocks as u32, c.heads_kv as u32, z as u32];
        Ok((plan, tiles, grid))
    }
}

/// Copies raw device bytes into a host tensor of the same dtype.
fn write_bytes(t: &mut TensorMut<'_>, bytes: &[u8]) {
    match t {
        TensorMut::F32(s) => bytemuck::cast_slice_mut(s).copy_from_slice(bytes),
        TensorMut::F16(s) => bytemuck::cast_slice_mut(s).copy_from_slice(bytes),
        TensorMut::Bf16(s) => bytemuck::cast_slice_mut(s).copy_from_slice(bytes),
        TensorMut::Fp8E4m3(s) => s.copy_from_slice(bytes),
    }
}
