//! Benchmarks on device-resident random inputs, timed with timestamp queries where the adapter
//! has them (else host time around submit + wait).

use crate::context::scoped;
use crate::forward::{DeviceInputs, DeviceOutputs};
use crate::gpu;
use crate::WgpuBackend;
use flashattn_core::{random_inputs, Algorithm, AttentionSpec, BenchMeasure, BenchPlan, Result};

/// How the last benchmark was timed (for reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOptions {
    DeviceTimer,
    HostTimer,
}

impl WgpuBackend {
    /// How [`bench_async`](Self::bench_async) times runs on this adapter.
    pub fn bench_timing(&self) -> BenchOptions {
        if self.has_timestamps() {
            BenchOptions::DeviceTimer
        } else {
            BenchOptions::HostTimer
        }
    }

    /// Times `algo` on random inputs resident on the device. `extra_bytes` is the size of the
    /// device buffers allocated beyond q, k, v, out and LSE (scratch, tables, uniforms).
    pub async fn bench_async(
        &self,
        spec: &AttentionSpec,
        algo: Algorithm,
        plan: &BenchPlan,
        progress: &mut dyn FnMut(),
    ) -> Result<BenchMeasure> {
        self.check_supported(spec)?;
        self.probe_subgroups().await?;
        self.errors.check()?;
        let (q, k, v) = random_inputs(spec, plan.seed);
        let input = |t: &flashattn_core::Tensor, label| {
            let t = t.as_ref();
            let bytes = t.as_bytes();
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: (bytes.len() as u64).next_multiple_of(4).max(4),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let whole = bytes.len() / 4 * 4;
            self.queue.write_buffer(&buf, 0, &bytes[..whole]);
            if whole < bytes.len() {
                let mut tail = [0u8; 4];
                tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
                self.queue.write_buffer(&buf, whole as u64, &tail);
            }
            buf
        };
        let (qb, kb, vb) = (
            input(&q, "bench q"),
            input(&k, "bench k"),
            input(&v, "bench v"),
        );
        drop((q, k, v));
        let out_bytes =
            spec.out_elems().unwrap_or(0) as u64 * spec.dtype.output().size_bytes() as u64;
        let output = |size: u64, label| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size.next_multiple_of(4).max(4),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let out = output(out_bytes, "bench out");
        let lse = spec
            .return_lse
            .then(|| output(spec.lse_elems().unwrap_or(0) as u64 * 4, "bench lse"));

        let timer = self.has_timestamps().then(|| {
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("flashattn timer"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("flashattn timer resolve"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let read = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("flashattn timer read"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            (set, resolve, read)
        });
        let period_ns = f64::from(self.queue.get_timestamp_period());

        let mut measure = BenchMeasure {
            times_ms: Vec::with_capacity(plan.iters),
            extra_bytes: Some(0),
        };
        for run in 0..plan.warmup + plan.iters {
            let inputs = DeviceInputs {
                q: &qb,
                k: &kb,
                v: &vb,
            };
            let outputs = DeviceOutputs {
                out: &out,
                lse: lse.as_ref(),
            };
            let t0 = gpu::now_ms();
            let scratch = scoped(&self.device, || {
                let mut enc = self.device.create_command_encoder(&Default::default());
                let qs = timer.as_ref().map(|(s, _, _)| s);
                let scratch = match algo {
                    Algorithm::Flash => self.encode_forward(spec, inputs, outputs, &mut enc, qs)?,
                    Algorithm::Naive => self.encode_naive(spec, inputs, outputs, &mut enc, qs)?,
                    Algorithm::Copy => {
                        return Err(crate::context::unsupported(
                            "the copy peer is not implemented yet",
                        ))
                    }
                };
                if let Some((set, resolve, read)) = &timer {
                    enc.resolve_query_set(set, 0..2, resolve, 0);
                    enc.copy_buffer_to_buffer(resolve, 0, read, 0, 16);
                }
                self.queue.submit([enc.finish()]);
                Ok(scratch)
            })
            .await?;
            let ms = match &timer {
                Some((_, _, read)) => {
                    let bytes = gpu::read_mapped(&self.device, read, 16).await?;
                    let ts: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
                    ts[1].saturating_sub(ts[0]) as f64 * period_ns / 1e6
                }
                None => {
                    gpu::sync(&self.device, &self.queue).await?;
                    gpu::now_ms() - t0
                }
            };
            let extra = scratch.bytes();
            for b in scratch.buffers {
                self.pool.give(b);
            }
            self.errors.check()?;
            measure.extra_bytes = measure.extra_bytes.map(|e| e.max(extra));
            if run >= plan.warmup {
                measure.times_ms.push(ms);
            }
            progress();
        }
        Ok(measure)
    }
}
