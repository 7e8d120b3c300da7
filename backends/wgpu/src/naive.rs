//! Naive attention, the benchmark's peer: scores materialised as [batch, heads, sq, sk] f32
//! in device memory, then softmax, then P V (shaders/naive.wgsl).

use crate::bindings::{LayoutKind, Range};
use crate::device::unsupported;
use crate::dispatch::{grid_2d, record_pass, Dispatch, Scratch};
use crate::forward::{DeviceInputs, DeviceOutputs};
use crate::params::Params;
use crate::plan::token_chunks;
use crate::shaders::{Kernel, Variant};
use crate::WgpuBackend;
use flashattn_core::{CheckedSpec, Result};

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
        let tables = self.tables(c);
        let lse = match outputs.lse {
            Some(l) if c.return_lse => Range::words(l, 0, rows * 4)?,
            _ => Range::whole(&self.dummy),
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
        let gx = sk.div_ceil(16);
        let pairs = (c.sizes.out as u64).div_ceil(2);
        let pv_grid = grid_2d(pairs.div_ceil(64), dims)?;
        if gx > dims {
            return Err(unsupported(
                "naive attention grid exceeds the adapter's workgroup limits",
            ));
        }
        let mut dispatches = Vec::new();
        for (g, &(r0, r1)) in groups.iter().enumerate() {
            let bindings = [
                uniforms.range(g),
                Range::words(inputs.q, 0, q_bytes)?,
                Range::words(inputs.k, 0, k_bytes)?,
                Range::words(inputs.v, 0, v_bytes)?,
                Range::words(outputs.out, 0, o_bytes)?,
                Range::whole(&tables),
                lse,
                Range::tokens(&scores, (r0, r1), sk * 4)?,
            ];
            let group = self.bind_group(LayoutKind::Forward, &bindings)?;
            let n = r1 - r0;
            // The scores kernel folds z into rows past 65535 * 16 (see naive.wgsl).
            let scores_grid = [
                gx as u32,
                n.div_ceil(16).min(65535) as u32,
                n.div_ceil(16 * 65535) as u32,
            ];
            for (pipeline, grid) in [
                (&p_scores, scores_grid),
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
