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
        let score_bytes = rows * spec.seqlen_k as u64 * 4;
        let max_buffer = self.limits.max_buffer_size;
        let max_binding = self.binding_limit;
        if score_bytes > max_buffer.min(max_binding) {
            return Err(unsupported(format!(
                "naive attention needs a {score_bytes}-byte score buffer ([{}, {}, {}, {}] f32); \
                 the device's largest buffer is {max_buffer} bytes and largest storage binding {max_binding} bytes",
                spec.batch, spec.heads_q, spec.seqlen_q, spec.seqlen_k
            )));
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
        let params = self.base_params_for(spec, &plan);
        let uniform = self.pool.take(
            &self.device,
            std::mem::size_of::<gpu::Params>() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        self.queue
            .write_buffer(&uniform, 0, bytemuck::bytes_of(&params));
        let tables = self.tables_for(spec);
        let lse_range = match outputs.lse {
            Some(l) if spec.return_lse => Range::words(l, 0, rows * 4)?,
            _ => Range::whole(&self.dummy_lse),
        };
        let u = Range {
            buffer: &uniform,
            offset: 0,
            size: std::mem::size_of::<gpu::Params>() as u64,
        };
        let group = gpu::bind_group(
            self,
            [
                u,
                Range::words(inputs.q, 0, q_bytes)?,
                Range::words(inputs.k, 0, k_bytes)?,
                Range::words(inputs.v, 0, v_bytes)?,
                Range::words(outputs.out, 0, o_bytes)?,
                Range::whole(&tables),
                lse_range,
                Range::whole(&scores),
            ],
        );
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
        let gx = (spec.seqlen_k as u64).div_ceil(16);
        let gy = (spec.seqlen_q as u64).div_ceil(16);
        let gz = (spec.batch * spec.heads_q) as u64;
        if gx > dims || gy > dims || gz > dims {
            return Err(unsupported(
                "naive attention grid exceeds the adapter's workgroup limits",
            ));
        }
        let (sx, sy) = grid_2d(rows, dims)?;
        let pairs = (spec.out_elems().unwrap_or(0) as u64).div_ceil(2);
        let (px, py) = grid_2d(pairs.div_ceil(64), dims)?;
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("flashattn naive"),
                timestamp_writes: timer.map(|qs| wgpu::ComputePassTimestampWrites {
                    query_set: qs,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            pass.set_bind_group(0, &group, &[]);
            pass.set_pipeline(&p_scores);
            pass.dispatch_workgroups(gx as u32, gy as u32, gz as u32);
            pass.set_pipeline(&p_softmax);
            pass.dispatch_workgroups(sx, sy, 1);
            pass.set_pipeline(&p_pv);
            pass.dispatch_workgroups(px, py, 1);
        }
        Ok(Scratch {
            buffers: vec![scores, uniform, tables],
        })
    }
}
