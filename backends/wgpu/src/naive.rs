//! Naive attention (the benchmark's peer): scores materialised as [batch, heads, sq, sk] f32
//! in device memory, then softmax, then P V (shaders/naive.wgsl).

use crate::context::unsupported;
use crate::forward::{grid_2d, DeviceInputs, DeviceOutputs, Scratch};
use crate::gpu::{self, Range};
use crate::plan::Plan;
use crate::shaders::{Kernel, Variant};
use crate::WgpuBackend;
use flashattn_core::{AttentionSpec, Result};

impl WgpuBackend {
    /// Records naive attention into `enc` (dense specs only, whole tensors bound).
    pub(crate) fn encode_naive(
        &self,
        spec: &AttentionSpec,
        inputs: DeviceInputs<'_>,
        outputs: DeviceOutputs<'_>,
        enc: &mut wgpu::CommandEncoder,
        timer: Option<&wgpu::QuerySet>,
    ) -> Result<Scratch> {
        if spec.is_varlen() {
            return Err(unsupported(
                "naive attention here takes dense (not varlen) specs",
            ));
        }
        let rows = (spec.batch * spec.heads_q) as u64 * spec.seqlen_q as u64;
        let sk = spec.seqlen_k as u64;
        let score_bytes = rows * sk * 4;
        let max_buffer = self.limits.max_buffer_size;
        let max_binding = self.binding_limit;
        if score_bytes > max_buffer || score_bytes > u64::from(u32::MAX) {
            return Err(unsupported(format!(
                "naive attention needs a {score_bytes}-byte score buffer ([{}, {}, {}, {}] f32); \
                 the device's largest buffer is {max_buffer} bytes",
                spec.batch, spec.heads_q, spec.seqlen_q, spec.seqlen_k
            )));
        }
        // Score rows per dispatch group: the binding limit, at aligned offsets.
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment).max(4) / 4;
        let row_align = align / gcd(sk, align);
        let per_group = (max_binding.saturating_sub(4) / (sk * 4)) / row_align * row_align;
        if per_group == 0 {
            return Err(unsupported(format!(
                "naive attention: {row_align} score rows exceed the storage binding limit of {max_binding} bytes"
            )));
        }
        let groups: Vec<(u64, u64)> = (0..rows.div_ceil(per_group))
            .map(|g| (g * per_group, ((g + 1) * per_group).min(rows)))
            .collect();
        if groups.len() > 1 && spec.head_dim_v % 2 == 1 {
            return Err(unsupported(
                "naive attention with a score matrix beyond one binding needs an even head_dim_v",
            ));
        }
        let es = spec.dtype.size_bytes() as u64;
        let q_bytes = spec.q_elems().unwrap_or(0) as u64 * es;
        let k_bytes = spec.k_elems().unwrap_or(0) as u64 * es;
        let v_bytes = spec.v_elems().unwrap_or(0) as u64 * es;
        let o_bytes = spec.out_elems().unwrap_or(0) as u64 * es;
        for (name, b) in [
            ("q", q_bytes),
            ("k", k_bytes),
            ("v", v_bytes),
            ("out", o_bytes),
        ] {
            if b > max_binding {
                return Err(unsupported(format!(
                    "naive attention binds whole tensors: {name} ({b} bytes) exceeds the storage binding limit of {max_binding} bytes"
                )));
            }
        }
        let scores = self
            .pool
            .take(&self.device, score_bytes, wgpu::BufferUsages::STORAGE);
        let plan = Plan {
            chunks: Vec::new(),
            splits: 1,
            partial: false,
            total_splits: 1,
            max_rows: 0,
        };
        let base = self.base_params_for(spec, &plan);
        let stride = gpu::params_stride(&self.limits);
        let uniform = self.pool.take(
            &self.device,
            stride * groups.len() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let mut ubytes = vec![0u8; (stride * groups.len() as u64) as usize];
        for (g, &(r0, r1)) in groups.iter().enumerate() {
            let mut p = base;
            p.q_tok0 = r0 as u32;
            p.q_tok1 = r1 as u32;
            let at = g * stride as usize;
            ubytes[at..at + std::mem::size_of::<gpu::Params>()]
                .copy_from_slice(bytemuck::bytes_of(&p));
        }
        self.queue.write_buffer(&uniform, 0, &ubytes);
        let tables = self.tables_for(spec);
        let lse_range = match outputs.lse {
            Some(l) if spec.return_lse => Range::words(l, 0, rows * 4)?,
            _ => Range::whole(&self.dummy_lse),
        };
        let bind = |g: usize, r0: u64, r1: u64| -> Result<wgpu::BindGroup> {
            let u = Range {
                buffer: &uniform,
                offset: g as u64 * stride,
                size: std::mem::size_of::<gpu::Params>() as u64,
            };
            Ok(gpu::bind_group(
                self,
                [
                    u,
                    Range::words(inputs.q, 0, q_bytes)?,
                    Range::words(inputs.k, 0, k_bytes)?,
                    Range::words(inputs.v, 0, v_bytes)?,
                    Range::words(outputs.out, 0, o_bytes)?,
                    Range::whole(&tables),
                    lse_range,
                    Range::words(&scores, r0 * sk * 4, (r1 - r0) * sk * 4)?,
                ],
            ))
        };
        let bind_groups = groups
            .iter()
            .enumerate()
            .map(|(g, &(r0, r1))| bind(g, r0, r1))
            .collect::<Result<Vec<_>>>()?;
        let pipe = |kernel| {
            self.pipeline(Variant {
                kernel,
                dtype: spec.dtype,
            })
        };
        let (p_scores, p_softmax, p_pv) = (
            pipe(Kernel::NaiveScores)?,
            pipe(Kernel::NaiveSoftmax)?,
            pipe(Kernel::NaivePv)?,
        );
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        let gx = sk.div_ceil(16);
        let pairs = (spec.out_elems().unwrap_or(0) as u64).div_ceil(2);
        let (px, py) = grid_2d(pairs.div_ceil(64), dims)?;
        if gx > dims {
            return Err(unsupported(
                "naive attention grid exceeds the adapter's workgroup limits",
            ));
        }
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("flashattn naive"),
                timestamp_writes: timer.map(|qs| wgpu::ComputePassTimestampWrites {
                    query_set: qs,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            for (group, &(r0, r1)) in bind_groups.iter().zip(&groups) {
                let n = r1 - r0;
                // The scores kernel folds z into rows past 65535 * 16 (see naive.wgsl).
                let gy = n.div_ceil(16).min(65535);
                let gz = n.div_ceil(16 * 65535);
                let (sx, sy) = grid_2d(n, dims)?;
                pass.set_bind_group(0, group, &[]);
                pass.set_pipeline(&p_scores);
                pass.dispatch_workgroups(gx as u32, gy as u32, gz as u32);
                pass.set_pipeline(&p_softmax);
                pass.dispatch_workgroups(sx, sy, 1);
                pass.set_pipeline(&p_pv);
                pass.dispatch_workgroups(px, py, 1);
            }
        }
        Ok(Scratch {
            buffers: vec![scores, uniform, tables],
        })
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
