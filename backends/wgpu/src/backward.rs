//! The backward pass: FlashAttention-2's recomputation from the forward's LSE, in four steps
//! recorded in one compute pass, deterministic by construction (no atomics, a fixed order):
//! row statistics (shaders/bwd_prep.wgsl), dQ over query blocks (bwd_dq.wgsl), dK/dV over key
//! blocks walking the query rows that see them (bwd_dkdv.wgsl), and for f16/bf16 the cast of
//! the f32 accumulators (bwd_cast.wgsl). The host and device-resident APIs.

use crate::bindings::{BufferSlice, HeldSlice, LayoutKind};
use crate::device::{backend_err, read_mapped, unsupported};
use crate::dispatch::{check_apart, check_buffer, grid_2d, record_pass, Dispatch, Scratch};
use crate::params::{Params, FLAG_FIRST};
use crate::plan::{
    backward_plan, slicing, BackwardGeometry, BackwardPlan, Slicing, MAX_BACKWARD_WALK,
};
use crate::shaders::{Kernel, Variant};
use crate::strided::views;
use crate::tiles::Tiles;
use crate::WgpuBackend;
use flashattn_core::{
    validate_backward_inputs, Algorithm, AttentionSpec, BackwardInputs, CheckedSpec, DType, Grads,
    Result, Tensor,
};

/// Device-resident inputs of a backward pass in the spec's layouts and dtypes (out and dout in
/// the output dtype, lse f32 in the forward's layout), with `BufferUsages::STORAGE`.
#[derive(Clone, Copy)]
pub struct DeviceBackwardInputs<'a> {
    pub q: BufferSlice<'a>,
    pub k: BufferSlice<'a>,
    pub v: BufferSlice<'a>,
    pub out: BufferSlice<'a>,
    pub lse: BufferSlice<'a>,
    pub dout: BufferSlice<'a>,
}

/// Device-resident gradients: dq like q, dk like k, dv like v (`BufferUsages::STORAGE`; for
/// f32 varlen specs that leave tokens outside every sequence, `COPY_DST` too: those get zeros).
#[derive(Clone, Copy)]
pub struct DeviceGrads<'a> {
    pub dq: BufferSlice<'a>,
    pub dk: BufferSlice<'a>,
    pub dv: BufferSlice<'a>,
}

/// Bytes per token of the backward's buffers.
struct Rows {
    q: u64,
    o: u64,
    k: u64,
    v: u64,
    stats: u64,
    dq_acc: u64,
    dk_acc: u64,
    dv_acc: u64,
}

impl Rows {
    fn of(c: &CheckedSpec<'_>) -> Rows {
        let es = c.dtype.size_bytes() as u64;
        let (hq, hkv) = (c.heads_q as u64, c.heads_kv as u64);
        let (d, dv) = (c.head_dim as u64, c.head_dim_v as u64);
        Rows {
            q: hq * d * es,
            o: hq * dv * es,
            k: hkv * d * es,
            v: hkv * dv * es,
            stats: hq * 8,
            dq_acc: hq * d * 4,
            dk_acc: hkv * d * 4,
            dv_acc: hkv * dv * 4,
        }
    }
}

/// Where the gradients accumulate in f32: the gradient tensors themselves for f32, else
/// scratch accumulators cast at the end. And the row statistics.
struct Accumulators {
    stats: wgpu::Buffer,
    dq: HeldSlice,
    dk: HeldSlice,
    dv: HeldSlice,
    cast: bool,
}

/// One backward dispatch: which kernel, its params and token ranges.
#[derive(Clone, Copy)]
enum Step {
    Prep,
    Dq,
    Dkdv,
    /// Cast accumulator 0 (dq), 1 (dk) or 2 (dv).
    Cast(usize),
}

struct Work {
    step: Step,
    params: Params,
    q: (u64, u64),
    k: (u64, u64),
}

impl WgpuBackend {
    /// Why this backend cannot run the backward pass of `spec`, if it cannot.
    pub fn check_backward_supported(&self, spec: &AttentionSpec) -> Result<()> {
        self.supports_backward_checked(&spec.validate()?)
    }

    pub(crate) fn supports_backward_checked(&self, c: &CheckedSpec<'_>) -> Result<()> {
        self.supports_checked(c)?;
        // The statistics kernel binds the forward's LSE whole.
        let lse_bytes = c.sizes.lse as u64 * 4;
        if lse_bytes > self.binding_limit {
            return Err(unsupported(format!(
                "the LSE ({lse_bytes} bytes) exceeds the storage binding limit of {} bytes",
                self.binding_limit
            )));
        }
        Ok(())
    }

    /// Host API: uploads the inputs, runs the backward pass and reads dq, dk, dv back.
    pub async fn backward_async(
        &self,
        spec: &AttentionSpec,
        inputs: BackwardInputs<'_>,
    ) -> Result<Grads> {
        self.run_backward(spec, inputs, Algorithm::Flash).await
    }

    /// Host API of the naive backward (materialised P and dS): the benchmark's peer, exposed
    /// so that its results can be checked too.
    pub async fn naive_backward_async(
        &self,
        spec: &AttentionSpec,
        inputs: BackwardInputs<'_>,
    ) -> Result<Grads> {
        self.run_backward(spec, inputs, Algorithm::Naive).await
    }

    async fn run_backward(
        &self,
        spec: &AttentionSpec,
        inputs: BackwardInputs<'_>,
        algo: Algorithm,
    ) -> Result<Grads> {
        let c = validate_backward_inputs(spec, &inputs)?;
        self.supports_backward_checked(&c)?;
        self.ready().await?;
        let views = views(&c);
        let host = [inputs.q, inputs.k, inputs.v, inputs.out, inputs.dout];
        let up: [wgpu::Buffer; 5] = std::array::from_fn(|i| self.upload_view(host[i], &views[i]));
        let lse = self.upload(flashattn_core::TensorRef::F32(inputs.lse));
        let es = c.dtype.size_bytes() as u64;
        let sizes = [c.sizes.q, c.sizes.k, c.sizes.v].map(|n| n as u64 * es);
        let io = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let grads = sizes.map(|n| self.buffers.take(&self.device, n, io));
        let at = [0, sizes[0], sizes[0] + sizes[1]].map(|a: u64| a.next_multiple_of(4));
        let read_len = at[2] + sizes[2].next_multiple_of(4);
        let read = self.read_buffer(read_len);
        let device_inputs = DeviceBackwardInputs {
            q: (&up[0]).into(),
            k: (&up[1]).into(),
            v: (&up[2]).into(),
            out: (&up[3]).into(),
            lse: (&lse).into(),
            dout: (&up[4]).into(),
        };
        let device_grads = DeviceGrads {
            dq: (&grads[0]).into(),
            dk: (&grads[1]).into(),
            dv: (&grads[2]).into(),
        };
        let submitted = self
            .submit(|enc| {
                let scratch = match algo {
                    Algorithm::Naive => {
                        self.encode_naive_backward(&c, device_inputs, device_grads, enc, None)?
                    }
                    _ => self.encode_backward(&c, device_inputs, device_grads, enc, None)?,
                };
                for (g, (&a, &n)) in grads.iter().zip(at.iter().zip(&sizes)) {
                    enc.copy_buffer_to_buffer(g, 0, &read, a, n.next_multiple_of(4));
                }
                Ok(scratch)
            })
            .await;
        let bytes = match submitted {
            Ok(_) => read_mapped(&self.device, &read, read_len).await,
            Err(e) => Err(e),
        };
        for b in up.into_iter().chain(grads).chain([lse, read]) {
            self.buffers.give(b);
        }
        let bytes = bytes?;
        self.errors.check()?;
        let tensor = |i: usize| {
            let a = at[i] as usize;
            Tensor::from_bytes(c.dtype, &bytes[a..a + sizes[i] as usize])
        };
        Ok(Grads {
            dq: tensor(0)?,
            dk: tensor(1)?,
            dv: tensor(2)?,
        })
    }

    /// Device-resident API: records and submits the backward pass on buffers of this
    /// backend's device; the caller's later submissions on the same queue see the gradients.
    pub async fn backward_buffers(
        &self,
        spec: &AttentionSpec,
        inputs: DeviceBackwardInputs<'_>,
        grads: DeviceGrads<'_>,
    ) -> Result<()> {
        let c = spec.validate()?;
        self.supports_backward_checked(&c)?;
        self.ready().await?;
        self.submit(|enc| self.encode_backward(&c, inputs, grads, enc, None))
            .await?;
        self.errors.check()
    }

    /// Records the backward pass into `enc` (one compute pass; `timer` stamps its start and end).
    pub(crate) fn encode_backward(
        &self,
        c: &CheckedSpec<'_>,
        inputs: DeviceBackwardInputs<'_>,
        grads: DeviceGrads<'_>,
        enc: &mut wgpu::CommandEncoder,
        timer: Option<&wgpu::QuerySet>,
    ) -> Result<Scratch> {
        check_backward_buffers(c, inputs, grads)?;
        let lim = self.tile_limits();
        let (d, dv) = (c.head_dim as u32, c.head_dim_v as u32);
        let max_q = c.sizes.max_q_len.min(u32::MAX as usize) as u32;
        let dq_tiles = Tiles::backward_dq(d, dv, max_q, &lim);
        let kv_tiles = Tiles::backward_dkdv(d, dv, &lim);
        let rows = Rows::of(c);
        let geom = BackwardGeometry {
            q_tokens: c.sizes.q_tokens as u64,
            k_tokens: c.sizes.k_tokens as u64,
            q_rows: vec![rows.q, rows.o, rows.stats, rows.dq_acc],
            k_rows: vec![rows.k, rows.v, rows.dk_acc, rows.dv_acc],
        };
        let virtual_rows = (c.group_size() * c.sizes.max_q_len) as u64;
        let plan = backward_plan(
            &geom,
            self.binding_limit,
            u64::from(self.limits.min_storage_buffer_offset_alignment),
            slicing(
                c.sizes.max_k_len as u64,
                dq_tiles.block_n,
                1,
                MAX_BACKWARD_WALK,
            ),
            slicing(virtual_rows, kv_tiles.block_m, 1, MAX_BACKWARD_WALK),
        )?;
        let mut scratch = Scratch::default();
        let acc = self.accumulators(c, &rows, grads, &mut scratch);
        self.clear_uncovered(c, &rows, &acc, enc)?;
        let work = backward_work(c, &plan, acc.cast);
        let dispatches = self.backward_dispatches(
            c,
            &work,
            (dq_tiles, kv_tiles),
            inputs,
            grads,
            &acc,
            &mut scratch,
        )?;
        record_pass(enc, "flashattn backward", timer, &dispatches);
        Ok(scratch)
    }

    /// The statistics buffer and the f32 accumulators (the gradients themselves for f32).
    fn accumulators(
        &self,
        c: &CheckedSpec<'_>,
        rows: &Rows,
        grads: DeviceGrads<'_>,
        scratch: &mut Scratch,
    ) -> Accumulators {
        let mut take = |bytes: u64, usage| {
            let b = self.buffers.take(&self.device, bytes, usage);
            scratch.keep(&b);
            b
        };
        let storage = wgpu::BufferUsages::STORAGE;
        let (qt, kt) = (c.sizes.q_tokens as u64, c.sizes.k_tokens as u64);
        let stats = take(qt * rows.stats, storage);
        if c.dtype == DType::F32 {
            return Accumulators {
                stats,
                dq: grads.dq.into(),
                dk: grads.dk.into(),
                dv: grads.dv.into(),
                cast: false,
            };
        }
        let acc = storage | wgpu::BufferUsages::COPY_DST;
        Accumulators {
            stats,
            dq: take(qt * rows.dq_acc, acc).into(),
            dk: take(kt * rows.dk_acc, acc).into(),
            dv: take(kt * rows.dv_acc, acc).into(),
            cast: true,
        }
    }

    /// Varlen tokens outside every sequence belong to no block: their gradients are zeros,
    /// cleared in the accumulators before the kernels run.
    fn clear_uncovered(
        &self,
        c: &CheckedSpec<'_>,
        rows: &Rows,
        acc: &Accumulators,
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        let Some(v) = &c.varlen else { return Ok(()) };
        let last = |cu: &[i32]| cu.last().map_or(0, |&x| x as u64);
        let tails = [
            (
                &acc.dq,
                last(&v.cu_seqlens_q),
                c.seqlen_q as u64,
                rows.dq_acc,
            ),
            (
                &acc.dk,
                last(&v.cu_seqlens_k),
                c.seqlen_k as u64,
                rows.dk_acc,
            ),
            (
                &acc.dv,
                last(&v.cu_seqlens_k),
                c.seqlen_k as u64,
                rows.dv_acc,
            ),
        ];
        for (slice, covered, total, row) in tails {
            if covered >= total {
                continue;
            }
            if !slice.buffer.usage().contains(wgpu::BufferUsages::COPY_DST) {
                return Err(backend_err(
                    "varlen tokens outside every sequence get zero gradients: the f32 gradient buffers need BufferUsages::COPY_DST",
                ));
            }
            let at = slice.offset + covered * row;
            enc.clear_buffer(&slice.buffer, at, Some((total - covered) * row));
        }
        Ok(())
    }

    /// The pipelines, uniforms and bind groups of `work`.
    #[allow(clippy::too_many_arguments)]
    fn backward_dispatches(
        &self,
        c: &CheckedSpec<'_>,
        work: &[Work],
        (dq_tiles, kv_tiles): (Tiles, Tiles),
        inputs: DeviceBackwardInputs<'_>,
        grads: DeviceGrads<'_>,
        acc: &Accumulators,
        scratch: &mut Scratch,
    ) -> Result<Vec<Dispatch>> {
        let rows = Rows::of(c);
        let uniforms = self.uniforms(&work.iter().map(|w| w.params).collect::<Vec<_>>());
        scratch.keep(&uniforms.buffer);
        let tables = self.tables(c, &[]);
        scratch.keep(&tables);
        let pipe = |kernel| {
            self.pipeline(Variant {
                kernel,
                dtype: c.dtype,
            })
        };
        let pipes = [
            pipe(Kernel::BwdPrep)?,
            pipe(Kernel::BwdDq(dq_tiles))?,
            pipe(Kernel::BwdDkdv(kv_tiles))?,
            pipe(Kernel::BwdCast)?,
        ];
        let grids = self.backward_grids(c, work, (dq_tiles, kv_tiles))?;
        let lse = BufferSlice::words(inputs.lse, 0, c.sizes.lse as u64 * 4)?;
        let cast_pairs = [
            (&acc.dq, rows.dq_acc, grads.dq, rows.q),
            (&acc.dk, rows.dk_acc, grads.dk, rows.k),
            (&acc.dv, rows.dv_acc, grads.dv, rows.v),
        ];
        let [qv, kv, vv, ov, gv] = views(c);
        let mut dispatches = Vec::with_capacity(work.len());
        for (i, (w, grid)) in work.iter().zip(grids).enumerate() {
            let u = uniforms.range(i);
            let (q, k) = (w.q, w.k);
            let stats = || BufferSlice::tokens(&acc.stats, q, rows.stats);
            let (kind, pipeline, bindings) = match w.step {
                Step::Prep => (
                    LayoutKind::BwdPrep,
                    &pipes[0],
                    vec![
                        u,
                        ov.bind(inputs.out, q)?,
                        gv.bind(inputs.dout, q)?,
                        lse,
                        stats()?,
                    ],
                ),
                Step::Dq | Step::Dkdv => {
                    let mut b = vec![
                        u,
                        qv.bind(inputs.q, q)?,
                        kv.bind(inputs.k, k)?,
                        vv.bind(inputs.v, k)?,
                        gv.bind(inputs.dout, q)?,
                        BufferSlice::whole(&tables),
                        stats()?,
                    ];
                    if let Step::Dq = w.step {
                        b.push(BufferSlice::tokens(&acc.dq, q, rows.dq_acc)?);
                        (LayoutKind::BwdDq, &pipes[1], b)
                    } else {
                        b.push(BufferSlice::tokens(&acc.dk, k, rows.dk_acc)?);
                        b.push(BufferSlice::tokens(&acc.dv, k, rows.dv_acc)?);
                        (LayoutKind::BwdDkdv, &pipes[2], b)
                    }
                }
                Step::Cast(t) => {
                    let (src, src_row, dst, dst_row) = cast_pairs[t];
                    let range = if t == 0 { q } else { k };
                    let b = vec![
                        u,
                        BufferSlice::tokens(src, range, src_row)?,
                        BufferSlice::tokens(dst, range, dst_row)?,
                    ];
                    (LayoutKind::BwdCast, &pipes[3], b)
                }
            };
            dispatches.push(Dispatch {
                pipeline: pipeline.clone(),
                group: self.bind_group(kind, &bindings)?,
                grid,
            });
        }
        Ok(dispatches)
    }

    /// The grid of each dispatch of `work`.
    fn backward_grids(
        &self,
        c: &CheckedSpec<'_>,
        work: &[Work],
        (dq_tiles, kv_tiles): (Tiles, Tiles),
    ) -> Result<Vec<[u32; 3]>> {
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        let q_blocks = (c.sizes.max_q_len as u64).div_ceil(u64::from(dq_tiles.block_m));
        let k_blocks = (c.sizes.max_k_len as u64).div_ceil(u64::from(kv_tiles.block_n));
        if q_blocks.max(k_blocks) > dims {
            return Err(unsupported(format!(
                "{} query rows / {} keys need {q_blocks} / {k_blocks} workgroups in x, more than the adapter's {dims}",
                c.sizes.max_q_len, c.sizes.max_k_len
            )));
        }
        let (b, hq, hkv) = (c.batch as u32, c.heads_q as u32, c.heads_kv as u32);
        work.iter()
            .map(|w| match w.step {
                Step::Prep => {
                    let n = (w.q.1 - w.q.0) * c.heads_q as u64;
                    grid_2d(n.div_ceil(64), dims)
                }
                Step::Dq => Ok([q_blocks as u32, hq, b]),
                Step::Dkdv => Ok([k_blocks as u32, hkv, b]),
                Step::Cast(_) => {
                    let p = &w.params;
                    let n = u64::from(p.q_tok1 - p.q_tok0) * u64::from(p.heads_q * p.d);
                    grid_2d(n.div_ceil(2).div_ceil(64), dims)
                }
            })
            .collect()
    }
}

fn check_backward_buffers(
    c: &CheckedSpec<'_>,
    i: DeviceBackwardInputs<'_>,
    g: DeviceGrads<'_>,
) -> Result<()> {
    let es = c.dtype.size_bytes() as u64;
    let s = &c.sizes;
    let [qv, kv, vv, ov, gv] = views(c);
    for (name, buffer, n, view) in [
        ("q", i.q, s.q, Some(qv)),
        ("k", i.k, s.k, Some(kv)),
        ("v", i.v, s.v, Some(vv)),
        ("out", i.out, s.out, Some(ov)),
        ("dout", i.dout, s.out, Some(gv)),
        ("dq", g.dq, s.q, None),
        ("dk", g.dk, s.k, None),
        ("dv", g.dv, s.v, None),
    ] {
        let bytes = n as u64 * es;
        check_buffer(name, buffer, view.map_or(bytes, |v| v.bytes(bytes)))?;
    }
    check_buffer("lse", i.lse, s.lse as u64 * 4)?;
    let read = [
        ("q", i.q),
        ("k", i.k),
        ("v", i.v),
        ("out", i.out),
        ("lse", i.lse),
        ("dout", i.dout),
    ];
    check_apart(&read, &[("dq", g.dq), ("dk", g.dk), ("dv", g.dv)])
}

/// The dispatches in order: statistics per query chunk; dQ per query chunk, key chunk and pass
/// (the first writes the accumulator); dK/dV per key chunk, query chunk and pass; the casts.
fn backward_work(c: &CheckedSpec<'_>, plan: &BackwardPlan, cast: bool) -> Vec<Work> {
    let base = Params::base(c);
    let mut work = Vec::new();
    for &q in &plan.q_chunks {
        let params = base.bound(q, (0, 0));
        work.push(Work {
            step: Step::Prep,
            params,
            q,
            k: (0, 0),
        });
    }
    for &q in &plan.q_chunks {
        for (ki, &k) in plan.k_chunks.iter().enumerate() {
            push_passes(&mut work, base.bound(q, k), Step::Dq, plan.dq_keys, ki == 0);
        }
    }
    for &k in &plan.k_chunks {
        for (qi, &q) in plan.q_chunks.iter().enumerate() {
            push_passes(
                &mut work,
                base.bound(q, k),
                Step::Dkdv,
                plan.dkdv_rows,
                qi == 0,
            );
        }
    }
    if cast {
        // The cast sees a tensor [tokens, heads_q, d]: dq, then dk and dv with kv heads.
        let dims = [
            (c.heads_q, c.head_dim),
            (c.heads_kv, c.head_dim),
            (c.heads_kv, c.head_dim_v),
        ];
        for (t, (heads, dim)) in dims.into_iter().enumerate() {
            let chunks = if t == 0 {
                &plan.q_chunks
            } else {
                &plan.k_chunks
            };
            for &r in chunks {
                let mut params = base.bound(r, (0, 0));
                (params.heads_q, params.d) = (heads as u32, dim as u32);
                work.push(Work {
                    step: Step::Cast(t),
                    params,
                    q: r,
                    k: r,
                });
            }
        }
    }
    work
}

/// The passes of one (query chunk, key chunk): `first` when the accumulator starts here.
fn push_passes(work: &mut Vec<Work>, bound: Params, step: Step, s: Slicing, first: bool) {
    for pass in 0..s.passes {
        let mut params = bound;
        params.slice_len = s.slice_len;
        params.slice0 = pass;
        if first && pass == 0 {
            params.flags |= FLAG_FIRST;
        }
        let (q, k) = (
            (params.q_tok0.into(), params.q_tok1.into()),
            (params.k_tok0.into(), params.k_tok1.into()),
        );
        work.push(Work { step, params, q, k });
    }
}
