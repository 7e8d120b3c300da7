//! Naive attention, the benchmarks' peers: the forward materialises the scores
//! [batch, heads, sq, sk] in f32, then softmax, then P V (shaders/naive.wgsl); the backward
//! materialises P and dS (shaders/naive_bwd.wgsl).

use crate::backward::{DeviceBackwardInputs, DeviceGrads};
use crate::bindings::{BufferSlice, LayoutKind};
use crate::device::unsupported;
use crate::dispatch::{grid_2d, record_pass, Dispatch, Scratch};
use crate::forward::{DeviceInputs, DeviceOutputs};
use crate::params::Params;
use crate::plan::token_chunks;
use crate::shaders::{Kernel, NaiveBwdStep, Variant};
use crate::WgpuBackend;
use flashattn_core::{CheckedSpec, DType, Result};

/// The naive kernels walk a whole row (or column) of the score matrix in one invocation: at
/// most this many keys (or query rows), a quarter of llvmpipe's loop-iteration cap (see
/// `plan::MAX_KEYS_PER_WORKGROUP`).
pub(crate) const NAIVE_MAX_WALK: usize = 16384;

impl WgpuBackend {
    /// Checks what every naive kernel assumes: a dense spec, whole tensors within one binding,
    /// rows and columns of at most `NAIVE_MAX_WALK`.
    pub(crate) fn naive_supported(&self, c: &CheckedSpec<'_>, walked: usize) -> Result<()> {
        if c.is_varlen() {
            return Err(unsupported(
                "naive attention here takes dense (not varlen) specs",
            ));
        }
        if let Some(i) = crate::strided::Input::ALL
            .into_iter()
            .find(|&i| crate::strided::View::of(c, i).is_strided())
        {
            return Err(unsupported(format!(
                "naive attention (the benchmarks' peer) reads contiguous inputs only, and {} is strided ({:?}); the flash kernels read strided inputs",
                i.name(),
                c.strides
            )));
        }
        if walked > NAIVE_MAX_WALK {
            return Err(unsupported(format!(
                "naive attention walks {walked} keys or rows in one invocation, more than its {NAIVE_MAX_WALK}"
            )));
        }
        let es = c.dtype.size_bytes() as u64;
        let s = &c.sizes;
        for (name, n) in [("q", s.q), ("k", s.k), ("v", s.v), ("out", s.out)] {
            let b = n as u64 * es;
            if b > self.binding_limit {
                return Err(unsupported(format!(
                    "naive attention binds whole tensors: {name} ({b} bytes) exceeds the storage binding limit of {} bytes",
                    self.binding_limit
                )));
            }
        }
        Ok(())
    }

    /// Records naive attention into `enc` (dense specs only, whole tensors bound).
    pub(crate) fn encode_naive(
        &self,
        c: &CheckedSpec<'_>,
        inputs: DeviceInputs<'_>,
        outputs: DeviceOutputs<'_>,
        enc: &mut wgpu::CommandEncoder,
        timer: Option<&wgpu::QuerySet>,
    ) -> Result<Scratch> {
        self.naive_supported(c, c.seqlen_k)?;
        let rows = (c.batch * c.heads_q) as u64 * c.seqlen_q as u64;
        let sk = c.seqlen_k as u64;
        let score_bytes = rows * sk * 4;
        let max_buffer = self.limits.max_buffer_size;
        if score_bytes > max_buffer || score_bytes > u64::from(u32::MAX) {
            return Err(unsupported(format!(
                "naive attention needs a {score_bytes}-byte score buffer ([{}, {}, {}, {}] f32); \
                 the device's largest buffer is {max_buffer} bytes",
                c.batch, c.heads_q, c.seqlen_q, c.seqlen_k
            )));
        }
        // Score rows per dispatch group: the binding limit, at aligned offsets.
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment);
        let groups = token_chunks(rows, &[sk * 4], 0, self.binding_limit, align, "score")?;
        if groups.len() > 1 && c.head_dim_v % 2 == 1 {
            return Err(unsupported(
                "naive attention with a score matrix beyond one binding needs an even head_dim_v",
            ));
        }
        let es = c.dtype.size_bytes() as u64;
        let (q_bytes, k_bytes) = (c.sizes.q as u64 * es, c.sizes.k as u64 * es);
        let (v_bytes, o_bytes) = (c.sizes.v as u64 * es, c.sizes.out as u64 * es);
        let scores = self
            .buffers
            .take(&self.device, score_bytes, wgpu::BufferUsages::STORAGE);
        let base = Params::base(c);
        let params: Vec<Params> = groups.iter().map(|&g| base.bound(g, (0, 0))).collect();
        let uniforms = self.uniforms(&params);
        let tables = self.tables(c, &[]);
        let lse = match outputs.lse {
            Some(l) if c.return_lse => BufferSlice::words(l, 0, rows * 4)?,
            _ => BufferSlice::whole(&self.dummy),
        };
        let pipe = |kernel| {
            self.pipeline(Variant {
                kernel,
                dtype: c.dtype,
            })
        };
        let (p_scores, p_softmax, p_pv) = (
            pipe(Kernel::NaiveScores)?,
            pipe(Kernel::NaiveSoftmax)?,
            pipe(Kernel::NaivePv)?,
        );
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);

        let pairs = (c.sizes.out as u64).div_ceil(2);
        let pv_grid = grid_2d(pairs.div_ceil(64), dims)?;
        if sk.div_ceil(16) > dims {
            return Err(unsupported(
                "naive attention grid exceeds the adapter's workgroup limits",
            ));
        }
        let mut dispatches = Vec::new();
        for (g, &(r0, r1)) in groups.iter().enumerate() {
            let bindings = [
                uniforms.range(g),
                BufferSlice::words(inputs.q, 0, q_bytes)?,
                BufferSlice::words(inputs.k, 0, k_bytes)?,
                BufferSlice::words(inputs.v, 0, v_bytes)?,
                BufferSlice::words(outputs.out, 0, o_bytes)?,
                BufferSlice::whole(&tables),
                lse,
                BufferSlice::tokens(&scores, (r0, r1), sk * 4)?,
            ];
            let group = self.bind_group(LayoutKind::Forward, &bindings)?;
            let n = r1 - r0;
            for (pipeline, grid) in [
                (&p_scores, score_grid(sk, n)),
                (&p_softmax, grid_2d(n, dims)?),
                (&p_pv, pv_grid),
            ] {
                dispatches.push(Dispatch {
                    pipeline: pipeline.clone(),
                    group: group.clone(),
                    grid,
                });
            }
        }
        record_pass(enc, "flashattn naive", timer, &dispatches);
        Ok(Scratch {
            buffers: vec![scores, uniforms.buffer, tables],
        })
    }
}

/// The naive backward's score matrix: one region per (sequence, kv head) of `region` bytes at
/// aligned `stride`s, `score_bytes` in all, and the statistics.
struct NaiveBackwardShape {
    region: u64,
    stride: u64,
    score_bytes: u64,
    stats_bytes: u64,
}

/// What the naive backward binds for one (sequence, kv head): its uniform and score region.
struct NaiveGroup {
    params: Params,
    offset: u64,
}

impl WgpuBackend {
    /// Records the naive backward into `enc`: P and then dS materialised as f32 score matrices
    /// ([batch, heads_q, seqlen_q, seqlen_k], one region per (sequence, kv head)), the
    /// gradients as plain products with them (shaders/naive_bwd.wgsl). The benchmark's peer.
    pub(crate) fn encode_naive_backward(
        &self,
        c: &CheckedSpec<'_>,
        inputs: DeviceBackwardInputs<'_>,
        grads: DeviceGrads<'_>,
        enc: &mut wgpu::CommandEncoder,
        timer: Option<&wgpu::QuerySet>,
    ) -> Result<Scratch> {
        let (sq, sk) = (c.seqlen_q as u64, c.seqlen_k as u64);
        let group_rows = c.group_size() as u64 * sq;
        let NaiveBackwardShape {
            region,
            stride,
            score_bytes,
            stats_bytes,
        } = self.naive_backward_shape(c)?;
        let groups = (c.batch * c.heads_kv) as u64;
        let storage = wgpu::BufferUsages::STORAGE;
        let scores = self.buffers.take(&self.device, score_bytes, storage);
        let stats = self.buffers.take(&self.device, stats_bytes, storage);
        let base = Params::base(c);
        let all_q = (0, c.sizes.q_tokens as u64);
        let mut params = vec![base.bound(all_q, (0, 0))];
        let plan: Vec<NaiveGroup> = (0..groups)
            .map(|g| {
                let (b, kh) = (g / c.heads_kv as u64, g % c.heads_kv as u64);
                let row0 = (b * c.heads_q as u64 + kh * c.group_size() as u64) * sq;
                NaiveGroup {
                    params: base.bound((row0, row0 + group_rows), (0, 0)),
                    offset: g * stride,
                }
            })
            .collect();
        params.extend(plan.iter().map(|g| g.params));
        let uniforms = self.uniforms(&params);
        let tables = self.tables(c, &[]);
        let scratch = Scratch {
            buffers: vec![
                scores.clone(),
                stats.clone(),
                uniforms.buffer.clone(),
                tables.clone(),
            ],
        };
        let mut dispatches = vec![self.naive_stats_dispatch(c, inputs, &stats, &uniforms)?];
        let es = c.dtype.size_bytes() as u64;
        fn whole(b: BufferSlice<'_>, n: usize, es: u64) -> Result<BufferSlice<'_>> {
            BufferSlice::words(b, 0, n as u64 * es)
        }
        let s = &c.sizes;
        for (i, g) in plan.iter().enumerate() {
            let bind = |grad: BufferSlice<'_>, n: usize| {
                let bindings = [
                    uniforms.range(i + 1),
                    whole(inputs.q, s.q, es)?,
                    whole(inputs.k, s.k, es)?,
                    whole(inputs.v, s.v, es)?,
                    whole(inputs.dout, s.out, es)?,
                    BufferSlice::whole(&tables),
                    BufferSlice::words(&stats, 0, stats_bytes)?,
                    BufferSlice::words(&scores, g.offset, region)?,
                    whole(grad, n, es)?,
                ];
                self.bind_group(LayoutKind::NaiveBwd, &bindings)
            };
            let (to_dq, to_dk, to_dv) = (
                bind(grads.dq, s.q)?,
                bind(grads.dk, s.k)?,
                bind(grads.dv, s.v)?,
            );
            for step in NaiveBwdStep::ALL {
                let (group, grid) = match step {
                    NaiveBwdStep::Probs | NaiveBwdStep::DScores => {
                        (&to_dv, score_grid(sk, group_rows))
                    }
                    NaiveBwdStep::GradV => (&to_dv, self.pair_grid(sk, c.head_dim_v)?),
                    NaiveBwdStep::GradQ => (&to_dq, self.pair_grid(group_rows, c.head_dim)?),
                    NaiveBwdStep::GradK => (&to_dk, self.pair_grid(sk, c.head_dim)?),
                };
                dispatches.push(Dispatch {
                    pipeline: self.pipeline(Variant {
                        kernel: Kernel::NaiveBwd(step),
                        dtype: c.dtype,
                    })?,
                    group: group.clone(),
                    grid,
                });
            }
        }
        record_pass(enc, "flashattn naive backward", timer, &dispatches);
        Ok(scratch)
    }

    /// Checks what the naive backward needs and sizes its buffers.
    fn naive_backward_shape(&self, c: &CheckedSpec<'_>) -> Result<NaiveBackwardShape> {
        let group_rows = c.group_size() as u64 * c.seqlen_q as u64;
        self.naive_supported(c, c.seqlen_k.max(group_rows as usize))?;
        if c.dtype == DType::Bf16 && (c.head_dim % 2 == 1 || c.head_dim_v % 2 == 1) {
            return Err(unsupported(
                "the naive backward writes bf16 gradients in pairs: it needs even head dims",
            ));
        }
        let region = group_rows * c.seqlen_k as u64 * 4;
        let stride =
            region.next_multiple_of(u64::from(self.limits.min_storage_buffer_offset_alignment));
        let score_bytes = stride * (c.batch * c.heads_kv) as u64;
        let stats_bytes = c.sizes.q_tokens as u64 * c.heads_q as u64 * 8;
        if region.max(stats_bytes) > self.binding_limit || score_bytes > self.limits.max_buffer_size
        {
            return Err(unsupported(format!(
                "the naive backward needs a {score_bytes}-byte score buffer bound {region} bytes at a time; \
                 the device's largest buffer is {} bytes, its largest binding {}",
                self.limits.max_buffer_size, self.binding_limit
            )));
        }
        Ok(NaiveBackwardShape {
            region,
            stride,
            score_bytes,
            stats_bytes,
        })
    }

    /// The statistics kernel over every query token (whole tensors bound).
    fn naive_stats_dispatch(
        &self,
        c: &CheckedSpec<'_>,
        inputs: DeviceBackwardInputs<'_>,
        stats: &wgpu::Buffer,
        uniforms: &crate::params::Uniforms,
    ) -> Result<Dispatch> {
        let out_bytes = c.sizes.out as u64 * c.dtype.size_bytes() as u64;
        let bindings = [
            uniforms.range(0),
            BufferSlice::words(inputs.out, 0, out_bytes)?,
            BufferSlice::words(inputs.dout, 0, out_bytes)?,
            BufferSlice::words(inputs.lse, 0, c.sizes.lse as u64 * 4)?,
            BufferSlice::whole(stats),
        ];
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        Ok(Dispatch {
            pipeline: self.pipeline(Variant {
                kernel: Kernel::BwdPrep,
                dtype: c.dtype,
            })?,
            group: self.bind_group(LayoutKind::BwdPrep, &bindings)?,
            grid: grid_2d((c.sizes.lse as u64).div_ceil(64), dims)?,
        })
    }

    /// One invocation per element pair of `rows` rows of `dim` elements.
    fn pair_grid(&self, rows: u64, dim: usize) -> Result<[u32; 3]> {
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        grid_2d((rows * (dim as u64).div_ceil(2)).div_ceil(64), dims)
    }
}

/// One invocation per score entry of `rows` rows of `sk` keys (z folds rows past 65535 * 16).
fn score_grid(sk: u64, rows: u64) -> [u32; 3] {
    [
        sk.div_ceil(16) as u32,
        rows.div_ceil(16).min(65535) as u32,
        rows.div_ceil(16 * 65535) as u32,
    ]
}
