//! Benchmarks on device-resident random inputs, timed with timestamp queries where the adapter
//! has them (else host time around submit + wait). Extra memory is measured: the bytes of the
//! device buffers a run allocates beyond its inputs and outputs.

use crate::backward::{DeviceBackwardInputs, DeviceGrads};
use crate::bindings::BufferSlice;
use crate::decode::DeviceDecodeInputs;
use crate::device::{backend_err, now_ms, read_mapped, sync, unsupported};
use crate::dispatch::Scratch;
use crate::forward::{DeviceInputs, DeviceOutputs};
use crate::WgpuBackend;
use flashattn_core::{
    decode_bytes, random_inputs, random_tensor, Algorithm, AttentionSpec, BenchMeasure, BenchPlan,
    CheckedSpec, Pass, Result, Tensor,
};
use rand::SeedableRng;

/// How the last benchmark was timed (for reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOptions {
    DeviceTimer,
    HostTimer,
}

/// A forward's dedicated device buffers.
struct ForwardBuffers {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
    lse: Option<wgpu::Buffer>,
}

impl ForwardBuffers {
    fn inputs(&self) -> DeviceInputs<'_> {
        DeviceInputs {
            q: (&self.q).into(),
            k: (&self.k).into(),
            v: (&self.v).into(),
        }
    }

    fn outputs(&self) -> DeviceOutputs<'_> {
        DeviceOutputs {
            out: (&self.out).into(),
            lse: self.lse.as_ref().map(BufferSlice::from),
        }
    }
}

/// One benchmark's arguments past the spec: the algorithm, the plan, the total number of
/// runs (warm-up included) and the callback made after each.
struct Runs<'a> {
    algo: Algorithm,
    plan: &'a BenchPlan,
    runs: usize,
    progress: &'a mut dyn FnMut(),
}

/// The timestamp query set of the timed pass, and the buffers its two stamps go through.
struct Timer {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
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

    /// Times `algo` for `plan.pass` on random inputs resident on the device.
    pub async fn bench_async(
        &self,
        spec: &AttentionSpec,
        algo: Algorithm,
        plan: &BenchPlan,
        progress: &mut dyn FnMut(),
    ) -> Result<BenchMeasure> {
        let runs = plan.runs()?;
        // The benchmark makes its own contiguous inputs (a strided spec's buffers are the
        // caller's), as on the cpu backend.
        let spec = &spec.contiguous();
        let c = spec.validate()?;
        match plan.pass {
            Pass::Decode => self.supports_decode_checked(&c)?,
            _ => self.supports_checked(&c)?,
        }
        if algo == Algorithm::Copy && plan.pass != Pass::Decode {
            return Err(unsupported(
                "the copy peer is decode's (its memory-bound limit)",
            ));
        }
        self.ready().await?;
        let r = Runs {
            algo,
            plan,
            runs,
            progress,
        };
        match plan.pass {
            Pass::Forward => self.bench_forward(&c, r).await,
            Pass::Backward => self.bench_backward(&c, r).await,
            Pass::Decode => self.bench_decode(&c, r).await,
        }
    }

    async fn bench_forward(&self, c: &CheckedSpec<'_>, r: Runs<'_>) -> Result<BenchMeasure> {
        let f = self.forward_buffers_of(c, r.plan.seed);
        let (inputs, outputs) = (f.inputs(), f.outputs());
        let algo = r.algo;
        self.time_runs(r, |enc, timer| match algo {
            Algorithm::Naive => self.encode_naive(c, inputs, outputs, enc, timer),
            _ => self.encode_forward(c, inputs, outputs, enc, timer),
        })
        .await
    }

    /// The backward on random q, k, v, dout, with out and LSE from one forward pass first.
    async fn bench_backward(&self, c: &CheckedSpec<'_>, r: Runs<'_>) -> Result<BenchMeasure> {
        self.supports_backward_checked(c)?;
        let fwd_spec = c.spec.clone().return_lse(true);
        let fwd = fwd_spec.validate()?;
        let f = self.forward_buffers_of(&fwd, r.plan.seed);
        self.submit(|enc| self.encode_forward(&fwd, f.inputs(), f.outputs(), enc, None))
            .await?;
        sync(&self.device, &self.queue).await?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(r.plan.seed ^ 0xd0);
        let dout = self.device_tensor(&random_tensor(&mut rng, c.dtype, c.sizes.out));
        let es = c.dtype.size_bytes() as u64;
        let [dq, dk, dv] =
            [c.sizes.q, c.sizes.k, c.sizes.v].map(|n| self.device_zeros(n as u64 * es));
        let lse = f
            .lse
            .as_ref()
            .ok_or_else(|| backend_err("the forward of a backward bench has no LSE buffer"))?;
        let inputs = DeviceBackwardInputs {
            q: (&f.q).into(),
            k: (&f.k).into(),
            v: (&f.v).into(),
            out: (&f.out).into(),
            lse: lse.into(),
            dout: (&dout).into(),
        };
        let grads = DeviceGrads {
            dq: (&dq).into(),
            dk: (&dk).into(),
            dv: (&dv).into(),
        };
        let algo = r.algo;
        self.time_runs(r, |enc, timer| match algo {
            Algorithm::Naive => self.encode_naive_backward(c, inputs, grads, enc, timer),
            _ => self.encode_backward(c, inputs, grads, enc, timer),
        })
        .await
    }

    /// A decode step on resident caches (every run rewrites the same new rows, so the caches
    /// never overflow), or its copy peer: the bytes of K and V the step reads
    /// (`decode_bytes`), copied once on the device, host-timed (a copy is no compute pass).
    async fn bench_decode(&self, c: &CheckedSpec<'_>, r: Runs<'_>) -> Result<BenchMeasure> {
        match r.algo {
            Algorithm::Naive => return Err(unsupported("decode has no naive peer")),
            Algorithm::Copy => {
                let bytes = decode_bytes(c.spec).max(4);
                let (src, dst) = (self.device_zeros(bytes), self.device_zeros(bytes));
                let mut m = BenchMeasure {
                    times_ms: Vec::new(),
                    extra_bytes: Some(0),
                };
                for run in 0..r.runs {
                    let t0 = now_ms();
                    let mut enc = self.device.create_command_encoder(&Default::default());
                    enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes.next_multiple_of(4));
                    self.queue.submit([enc.finish()]);
                    sync(&self.device, &self.queue).await?;
                    if run >= r.plan.warmup {
                        m.times_ms.push(now_ms() - t0);
                    }
                    (r.progress)();
                }
                return Ok(m);
            }
            Algorithm::Flash => {}
        }
        let (q, k, v) = random_inputs(c.spec, r.plan.seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(r.plan.seed ^ 0xdec0de);
        let kn = random_tensor(&mut rng, c.dtype, c.sizes.k_new);
        let vn = random_tensor(&mut rng, c.dtype, c.sizes.v_new);
        let [qb, kb, vb, knb, vnb] = [&q, &k, &v, &kn, &vn].map(|t| self.device_tensor(t));
        drop((q, k, v, kn, vn));
        let (out, lse) = self.bench_outputs(c);
        let new = c.sizes.k_new > 0;
        let inputs = DeviceDecodeInputs {
            q: (&qb).into(),
            k_cache: (&kb).into(),
            v_cache: (&vb).into(),
            k_new: new.then_some((&knb).into()),
            v_new: new.then_some((&vnb).into()),
        };
        let outputs = DeviceOutputs {
            out: (&out).into(),
            lse: lse.as_ref().map(BufferSlice::from),
        };
        self.time_runs(r, |enc, timer| {
            self.encode_decode(c, inputs, Some(outputs), enc, timer)
        })
        .await
    }

    /// Runs `encode` `r.runs` times (the first `warmup` untimed) and collects the times and
    /// the largest scratch allocation.
    async fn time_runs(
        &self,
        r: Runs<'_>,
        encode: impl Fn(&mut wgpu::CommandEncoder, Option<&wgpu::QuerySet>) -> Result<Scratch>,
    ) -> Result<BenchMeasure> {
        let (runs, warmup) = (r.runs, r.plan.warmup);
        let timer = self.has_timestamps().then(|| self.timer());
        let period_ns = f64::from(self.queue.get_timestamp_period());
        let mut measure = BenchMeasure {
            times_ms: Vec::with_capacity(runs.saturating_sub(warmup)),
            extra_bytes: Some(0),
        };
        for run in 0..runs {
            let t0 = now_ms();
            let extra = self
                .submit(|enc| {
                    let scratch = encode(enc, timer.as_ref().map(|t| &t.set))?;
                    if let Some(t) = &timer {
                        enc.resolve_query_set(&t.set, 0..2, &t.resolve, 0);
                        enc.copy_buffer_to_buffer(&t.resolve, 0, &t.read, 0, 16);
                    }
                    Ok(scratch)
                })
                .await?;
            let ms = match &timer {
                Some(t) => {
                    let bytes = read_mapped(&self.device, &t.read, 16).await?;
                    let ts: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
                    ts[1].saturating_sub(ts[0]) as f64 * period_ns / 1e6
                }
                None => {
                    sync(&self.device, &self.queue).await?;
                    now_ms() - t0
                }
            };
            self.errors.check()?;
            measure.extra_bytes = measure.extra_bytes.map(|e| e.max(extra));
            if run >= warmup {
                measure.times_ms.push(ms);
            }
            (r.progress)();
        }
        Ok(measure)
    }

    fn timer(&self) -> Timer {
        let buffer = |label, usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        Timer {
            set: self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("flashattn timer"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: buffer(
                "flashattn timer resolve",
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ),
            read: buffer(
                "flashattn timer read",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
        }
    }

    /// Random q, k, v of `c` (`seed`) in dedicated buffers, and dedicated out and (when asked
    /// for) LSE buffers.
    fn forward_buffers_of(&self, c: &CheckedSpec<'_>, seed: u64) -> ForwardBuffers {
        let (q, k, v) = random_inputs(c.spec, seed);
        let [q, k, v] = [&q, &k, &v].map(|t| self.device_tensor(t));
        let (out, lse) = self.bench_outputs(c);
        ForwardBuffers { q, k, v, out, lse }
    }

    /// Dedicated out and (when asked for) LSE buffers of `c`.
    fn bench_outputs(&self, c: &CheckedSpec<'_>) -> (wgpu::Buffer, Option<wgpu::Buffer>) {
        let out = self.device_zeros(c.sizes.out as u64 * c.dtype.output().size_bytes() as u64);
        let lse = c
            .return_lse
            .then(|| self.device_zeros(c.sizes.lse as u64 * 4));
        (out, lse)
    }

    /// A dedicated (not pooled) storage buffer holding `t`: the benchmark's inputs.
    pub(crate) fn device_tensor(&self, t: &Tensor) -> wgpu::Buffer {
        let t = t.as_ref();
        let bytes = t.as_bytes();
        let buf = self.device_zeros(bytes.len() as u64);
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4), 0);
        self.queue.write_buffer(&buf, 0, &padded);
        buf
    }

    /// A dedicated storage buffer of `bytes` (at least one word), zeroed.
    pub(crate) fn device_zeros(&self, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("flashattn bench"),
            size: bytes.next_multiple_of(4).max(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }
}
