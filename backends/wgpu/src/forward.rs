//! The forward pass: encoding the flash (and combine) dispatches for device-resident buffers,
//! and the host API on top of it.

use crate::context::{backend_err, scoped, unsupported};
use crate::gpu::{self, Params, Range};
use crate::plan::{plan, Geometry, Plan};
use crate::shaders::{Kernel, Variant};
use crate::tiles::Tiles;
use crate::WgpuBackend;
use flashattn_core::{
    validate_inputs, Algorithm, AttentionSpec, Output, Result, Tensor, TensorRef,
};

/// Device-resident inputs in the spec's layout and dtype (bf16 as raw 16-bit words, f16 as
/// IEEE half), created with `BufferUsages::STORAGE` on this backend's device.
#[derive(Clone, Copy)]
pub struct DeviceInputs<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
}

/// Device-resident outputs: `out` in the spec's output dtype, `lse` (f32) when the spec asks
/// for it. Sizes are rounded up to a multiple of 4 bytes.
#[derive(Clone, Copy)]
pub struct DeviceOutputs<'a> {
    pub out: &'a wgpu::Buffer,
    pub lse: Option<&'a wgpu::Buffer>,
}

/// Scratch buffers of one encoded forward, given back to the pool once the work is submitted.
pub(crate) struct Scratch {
    pub buffers: Vec<wgpu::Buffer>,
}

impl Scratch {
    /// Bytes of device memory the scratch buffers hold (measured allocation sizes).
    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(|b| b.size()).sum()
    }
}

/// Target number of workgroups in flight: below it, split-KV spreads the keys.
const TARGET_WORKGROUPS: u64 = 256;
const MAX_SPLITS: u64 = 32;

impl WgpuBackend {
    /// Host API: uploads q, k, v, runs the forward pass and reads out (and LSE) back.
    pub async fn forward_async(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        self.run_host(spec, Algorithm::Flash, q, k, v).await
    }

    /// Host API for naive attention (materialised scores): the benchmark's peer, exposed so
    /// that its results can be checked too.
    pub async fn naive_forward_async(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        self.run_host(spec, Algorithm::Naive, q, k, v).await
    }

    async fn run_host(
        &self,
        spec: &AttentionSpec,
        algo: Algorithm,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        validate_inputs(spec, &q, &k, &v)?;
        self.check_supported(spec)?;
        self.probe_subgroups().await?;
        self.errors.check()?;
        let out_bytes =
            spec.out_elems().unwrap_or(0) as u64 * spec.dtype.output().size_bytes() as u64;
        let lse_bytes = if spec.return_lse {
            spec.lse_elems().unwrap_or(0) as u64 * 4
        } else {
            0
        };
        let storage = wgpu::BufferUsages::STORAGE;
        let (qb, kb, vb) = (self.upload(q)?, self.upload(k)?, self.upload(v)?);
        // COPY_DST: cleared / filled when varlen leaves tokens uncovered.
        let io = storage | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let out = self.pool.take(&self.device, out_bytes, io);
        let lse = spec
            .return_lse
            .then(|| self.pool.take(&self.device, lse_bytes, io));
        let read_len = out_bytes.next_multiple_of(4) + lse_bytes;
        let read = self.pool.take(
            &self.device,
            read_len,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        // Varlen tokens past cu_seqlens_q[batch] belong to no sequence: out 0, LSE -inf (the
        // kernels never visit them, and pooled buffers hold old data).
        let uncovered = spec
            .varlen
            .as_ref()
            .is_some_and(|v| v.cu_seqlens_q.last().map_or(0, |&x| x as usize) < spec.seqlen_q);
        if uncovered {
            if let Some(lse) = &lse {
                let ninf = vec![f32::NEG_INFINITY; spec.lse_elems().unwrap_or(0)];
                self.queue.write_buffer(lse, 0, bytemuck::cast_slice(&ninf));
            }
        }
        let scratch = scoped(&self.device, || {
            let mut enc = self.device.create_command_encoder(&Default::default());
            if uncovered {
                enc.clear_buffer(&out, 0, None);
            }
            let inputs = DeviceInputs {
                q: &qb,
                k: &kb,
                v: &vb,
            };
            let outputs = DeviceOutputs {
                out: &out,
                lse: lse.as_ref(),
            };
            let scratch = match algo {
                Algorithm::Flash => self.encode_forward(spec, inputs, outputs, &mut enc, None)?,
                Algorithm::Naive => self.encode_naive(spec, inputs, outputs, &mut enc, None)?,
                Algorithm::Copy => return Err(unsupported("the copy peer is a benchmark only")),
            };
            enc.copy_buffer_to_buffer(&out, 0, &read, 0, out_bytes.next_multiple_of(4));
            if let Some(lse) = &lse {
                enc.copy_buffer_to_buffer(lse, 0, &read, out_bytes.next_multiple_of(4), lse_bytes);
            }
            self.queue.submit([enc.finish()]);
            Ok(scratch)
        })
        .await?;
        let bytes = gpu::read_mapped(&self.device, &read, read_len).await;
        for b in scratch
            .buffers
            .into_iter()
            .chain([qb, kb, vb, out, read])
            .chain(lse)
        {
            self.pool.give(b);
        }
        let bytes = bytes?;
        self.errors.check()?;
        let out_t = Tensor::from_bytes(spec.dtype.output(), &bytes[..out_bytes as usize]);
        let lse = spec.return_lse.then(|| {
            let start = out_bytes.next_multiple_of(4) as usize;
            bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[start..start + lse_bytes as usize])
        });
        Ok(Output { out: out_t?, lse })
    }

    /// Device-resident API: records and submits the forward pass on buffers that already live
    /// on this backend's device (see [`WgpuBackend::from_device`]). Nothing is read back;
    /// the caller's later submissions on the same queue see the results.
    pub async fn forward_buffers(
        &self,
        spec: &AttentionSpec,
        inputs: DeviceInputs<'_>,
        outputs: DeviceOutputs<'_>,
    ) -> Result<()> {
        self.check_supported(spec)?;
        self.probe_subgroups().await?;
        self.errors.check()?;
        let scratch = scoped(&self.device, || {
            let mut enc = self.device.create_command_encoder(&Default::default());
            let scratch = self.encode_forward(spec, inputs, outputs, &mut enc, None)?;
            self.queue.submit([enc.finish()]);
            Ok(scratch)
        })
        .await?;
        for b in scratch.buffers {
            self.pool.give(b);
        }
        self.errors.check()
    }

    fn upload(&self, t: TensorRef<'_>) -> Result<wgpu::Buffer> {
        let bytes = t.as_bytes();
        let buf = self.pool.take(
            &self.device,
            bytes.len() as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(&buf, 0, &bytes[..whole]);
        }
        if whole < bytes.len() {
            // Writes are whole words: pad the tail.
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.queue.write_buffer(&buf, whole as u64, &tail);
        }
        Ok(buf)
    }

    fn max_q_len(spec: &AttentionSpec) -> u64 {
        (0..spec.batch)
            .map(|b| spec.seq(b).q_len as u64)
            .max()
            .unwrap_or(0)
    }

    fn max_k_len(spec: &AttentionSpec) -> u64 {
        (0..spec.batch)
            .map(|b| spec.seq(b).k_len as u64)
            .max()
            .unwrap_or(0)
    }

    /// The tiles for `spec` on this adapter.
    pub(crate) fn tiles_for(&self, spec: &AttentionSpec) -> Tiles {
        let tiles = Tiles::choose(
            spec.head_dim as u32,
            spec.head_dim_v as u32,
            Self::max_q_len(spec).min(u64::from(u32::MAX)) as u32,
            self.limits
                .max_compute_invocations_per_workgroup
                .min(self.limits.max_compute_workgroup_size_x),
            self.limits.max_compute_workgroup_storage_size,
            self.subgroup_size(),
        );
        self.tile_override.map_or(tiles, |o| {
            o.apply(tiles, self.limits.max_compute_workgroup_storage_size)
        })
    }

    /// Split-KV splits: more workgroups when (batch x heads x query blocks) alone is too few.
    /// A CPU adapter (lavapipe) has few cores to fill, so it gets a smaller target.
    fn splits_for(&self, spec: &AttentionSpec, tiles: &Tiles) -> u32 {
        let q_blocks = Self::max_q_len(spec).div_ceil(u64::from(tiles.br));
        let wgs = q_blocks * spec.heads_q as u64 * spec.batch as u64;
        let k_tiles = Self::max_k_len(spec).div_ceil(u64::from(tiles.bc));
        // Only for short queries (decode): one query block, so the partials stay small.
        if q_blocks > 1 || wgs >= TARGET_WORKGROUPS || k_tiles < 8 {
            return 1;
        }
        let max_z = u64::from(self.limits.max_compute_workgroups_per_dimension) / spec.batch as u64;
        let target = if self.info.device_type == wgpu::DeviceType::Cpu {
            TARGET_WORKGROUPS / 8
        } else {
            TARGET_WORKGROUPS
        };
        if wgs >= target {
            return 1;
        }
        target
            .div_ceil(wgs)
            .min(k_tiles / 4)
            .min(MAX_SPLITS)
            .min(max_z)
            .max(1) as u32
    }

    /// Records the forward pass into `enc`. `timer` writes timestamps 0 and 1 at the start and
    /// end of the (single) compute pass.
    pub(crate) fn encode_forward(
        &self,
        spec: &AttentionSpec,
        inputs: DeviceInputs<'_>,
        outputs: DeviceOutputs<'_>,
        enc: &mut wgpu::CommandEncoder,
        timer: Option<&wgpu::QuerySet>,
    ) -> Result<Scratch> {
        let es = spec.dtype.size_bytes() as u64;
        let (hq, hkv) = (spec.heads_q as u64, spec.heads_kv as u64);
        let (d, dv) = (spec.head_dim as u64, spec.head_dim_v as u64);
        let q_tokens = spec.q_tokens().unwrap_or(0) as u64;
        let k_tokens = spec.k_tokens().unwrap_or(0) as u64;
        check_size("q", inputs.q, q_tokens * hq * d * es)?;
        check_size("k", inputs.k, k_tokens * hkv * d * es)?;
        check_size("v", inputs.v, k_tokens * hkv * dv * es)?;
        check_size("out", outputs.out, q_tokens * hq * dv * es)?;
        let lse_bytes = q_tokens * hq * 4;
        match (spec.return_lse, outputs.lse) {
            (true, Some(l)) => check_size("lse", l, lse_bytes)?,
            (true, None) => {
                return Err(backend_err(
                    "the spec asks for LSE but no lse buffer was given",
                ))
            }
            _ => {}
        }

        let tiles = self.tiles_for(spec);
        let splits = self.splits_for(spec, &tiles);
        let geom = Geometry {
            q_row: hq * d * es,
            o_row: hq * dv * es,
            k_row: hkv * d * es,
            v_row: hkv * dv * es,
            q_tokens,
            k_tokens,
            part_row: hq * (dv + 1) * 4,
        };
        // bf16 rows of odd length share words between rows: write through the combine kernel,
        // which owns whole words.
        let odd_bf16 = spec.dtype == flashattn_core::DType::Bf16 && dv % 2 == 1;
        let plan = plan(
            &geom,
            self.binding_limit,
            u64::from(self.limits.min_storage_buffer_offset_alignment),
            splits,
            odd_bf16,
        )?;
        let q_blocks = Self::max_q_len(spec).div_ceil(u64::from(tiles.br));
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        if q_blocks > dims {
            return Err(unsupported(format!(
                "{} query rows need {q_blocks} workgroups in x, more than the adapter's {dims}",
                Self::max_q_len(spec)
            )));
        }

        let mut scratch = Scratch {
            buffers: Vec::new(),
        };
        let tables = self.tables_for(spec);
        let part = if plan.partial {
            let bytes = u64::from(plan.total_splits) * plan.max_rows * geom.part_row;
            let buf = self
                .pool
                .take(&self.device, bytes, wgpu::BufferUsages::STORAGE);
            scratch.buffers.push(buf.clone());
            Some(buf)
        } else {
            None
        };

        let base = self.base_params_for(spec, &plan);
        // One Params per dispatch, at the uniform offset alignment.
        let mut dispatch_params = Vec::new();
        for c in &plan.chunks {
            for (kc, &(k0, k1)) in c.k_chunks.iter().enumerate() {
                let mut p = base;
                p.q_tok0 = c.q0 as u32;
                p.q_tok1 = c.q1 as u32;
                p.k_tok0 = k0 as u32;
                p.k_tok1 = k1 as u32;
                p.split_base = kc as u32 * plan.splits;
                p.part_lse = (u64::from(plan.total_splits) * (c.q1 - c.q0) * hq * dv) as u32;
                dispatch_params.push(p);
            }
            if plan.partial {
                let mut p = base;
                p.q_tok0 = c.q0 as u32;
                p.q_tok1 = c.q1 as u32;
                p.part_lse = (u64::from(plan.total_splits) * (c.q1 - c.q0) * hq * dv) as u32;
                dispatch_params.push(p);
            }
        }
        let stride = gpu::params_stride(&self.limits);
        let uniform = self.pool.take(
            &self.device,
            stride * dispatch_params.len() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let mut ubytes = vec![0u8; (stride * dispatch_params.len() as u64) as usize];
        for (i, p) in dispatch_params.iter().enumerate() {
            let at = i * stride as usize;
            ubytes[at..at + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(p));
        }
        self.queue.write_buffer(&uniform, 0, &ubytes);
        scratch.buffers.push(uniform.clone());

        let flash = self.pipeline(Variant {
            kernel: Kernel::Flash(tiles),
            dtype: spec.dtype,
        })?;
        let combine = if plan.partial {
            Some(self.pipeline(Variant {
                kernel: Kernel::Combine,
                dtype: spec.dtype,
            })?)
        } else {
            None
        };
        let lse_range = match outputs.lse {
            Some(l) if spec.return_lse => Range::words(l, 0, lse_bytes)?,
            _ => Range::whole(&self.dummy_lse),
        };
        let part_range = match &part {
            Some(p) => Range::whole(p),
            None => Range::whole(&self.dummy_part),
        };
        let tables_range = Range::whole(&tables);

        // Bind groups first (they borrow nothing from the pass).
        let mut groups = Vec::new();
        let mut di = 0usize;
        for c in &plan.chunks {
            let q_r = Range::words(inputs.q, c.q0 * geom.q_row, (c.q1 - c.q0) * geom.q_row)?;
            let o_r = Range::words(outputs.out, c.q0 * geom.o_row, (c.q1 - c.q0) * geom.o_row)?;
            for &(k0, k1) in &c.k_chunks {
                let k_r = Range::words(inputs.k, k0 * geom.k_row, (k1 - k0) * geom.k_row)?;
                let v_r = Range::words(inputs.v, k0 * geom.v_row, (k1 - k0) * geom.v_row)?;
                let u = uniform_range(&uniform, di, stride);
                groups.push((
                    false,
                    gpu::bind_group(
                        self,
                        [u, q_r, k_r, v_r, o_r, tables_range, lse_range, part_range],
                    ),
                ));
                di += 1;
            }
            if plan.partial {
                let u = uniform_range(&uniform, di, stride);
                // The combine kernel reads no q/k/v; bind the first words to satisfy the layout.
                fn first(b: &wgpu::Buffer) -> Result<Range<'_>> {
                    Range::words(b, 0, 4)
                }
                groups.push((
                    true,
                    gpu::bind_group(
                        self,
                        [
                            u,
                            first(inputs.q)?,
                            first(inputs.k)?,
                            first(inputs.v)?,
                            o_r,
                            tables_range,
                            lse_range,
                            part_range,
                        ],
                    ),
                ));
                di += 1;
            }
        }

        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("flashattn forward"),
            timestamp_writes: timer.map(|qs| wgpu::ComputePassTimestampWrites {
                query_set: qs,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            }),
        });
        for (is_combine, group) in &groups {
            if *is_combine {
                let Some(combine) = &combine else { continue };
                pass.set_pipeline(combine);
                pass.set_bind_group(0, group, &[]);
                // Rows of the largest chunk; smaller chunks exit early past their end.
                let pairs = (plan.max_rows * hq * dv).div_ceil(2);
                let (x, y) = grid_2d(pairs.div_ceil(64), dims)?;
                pass.dispatch_workgroups(x, y, 1);
            } else {
                pass.set_pipeline(&flash);
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(
                    q_blocks as u32,
                    spec.heads_q as u32,
                    spec.batch as u32 * plan.splits,
                );
            }
        }
        drop(pass);
        scratch.buffers.push(tables);
        Ok(scratch)
    }

    /// The parts of `Params` common to every dispatch.
    pub(crate) fn base_params_for(&self, spec: &AttentionSpec, plan: &Plan) -> Params {
        let log2e = std::f32::consts::LOG2_E;
        let scale = spec.scale_value();
        let mask = spec.mask();
        let (left, right) = (mask.left, mask.right);
        let mut flags = 0;
        if spec.is_varlen() {
            flags |= gpu::FLAG_VARLEN;
        }
        if let Some(a) = &spec.alibi {
            flags |= gpu::FLAG_ALIBI;
            if a.per_batch {
                flags |= gpu::FLAG_ALIBI_PER_BATCH;
            }
        }
        if spec.return_lse {
            flags |= gpu::FLAG_LSE;
        }
        if plan.partial {
            flags |= gpu::FLAG_PARTIAL;
        }
        let to_i32 = |w: Option<u64>| w.map_or(-1, |w| w.min(i32::MAX as u64) as i32);
        Params {
            batch: spec.batch as u32,
            heads_q: spec.heads_q as u32,
            heads_kv: spec.heads_kv as u32,
            group: spec.group_size() as u32,
            seqlen_q: spec.seqlen_q as u32,
            seqlen_k: spec.seqlen_k as u32,
            d: spec.head_dim as u32,
            dv: spec.head_dim_v as u32,
            scale_log2: scale * log2e,
            scale_over_cap: if spec.softcap > 0.0 {
                scale / spec.softcap
            } else {
                0.0
            },
            softcap_log2: spec.softcap * log2e,
            win_left: to_i32(left),
            win_right: to_i32(right),
            flags,
            num_splits: plan.splits,
            split_base: 0,
            total_splits: plan.total_splits,
            q_tok0: 0,
            q_tok1: 0,
            k_tok0: 0,
            k_tok1: 0,
            tab_cu_k: spec.batch as u32 + 1,
            tab_alibi: 2 * (spec.batch as u32 + 1),
            part_lse: 0,
        }
    }

    /// cu_seqlens_q, cu_seqlens_k and the ALiBi slopes, as one small storage buffer.
    pub(crate) fn tables_for(&self, spec: &AttentionSpec) -> wgpu::Buffer {
        let mut words: Vec<u32> = Vec::new();
        match &spec.varlen {
            Some(v) => {
                words.extend(v.cu_seqlens_q.iter().map(|&x| x as u32));
                words.extend(v.cu_seqlens_k.iter().map(|&x| x as u32));
            }
            None => words.extend(std::iter::repeat_n(0, 2 * (spec.batch + 1))),
        }
        if let Some(a) = &spec.alibi {
            words.extend(a.slopes.iter().map(|s| s.to_bits()));
        }
        words.push(0);
        let buf = self.pool.take(
            &self.device,
            words.len() as u64 * 4,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        self.queue
            .write_buffer(&buf, 0, bytemuck::cast_slice(&words));
        buf
    }
}

fn uniform_range(uniform: &wgpu::Buffer, index: usize, stride: u64) -> Range<'_> {
    Range {
        buffer: uniform,
        offset: index as u64 * stride,
        size: std::mem::size_of::<Params>() as u64,
    }
}

/// Splits `n` workgroups over x and y within the per-dimension limit.
pub(crate) fn grid_2d(n: u64, dims: u64) -> Result<(u32, u32)> {
    let n = n.max(1);
    let x = n.min(dims);
    let y = n.div_ceil(x);
    if y > dims {
        return Err(unsupported(format!(
            "{n} workgroups exceed the adapter's {dims} x {dims} grid"
        )));
    }
    Ok((x as u32, y as u32))
}

fn check_size(name: &str, buffer: &wgpu::Buffer, bytes: u64) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(backend_err(format!(
            "{name} buffer lacks BufferUsages::STORAGE"
        )));
    }
    if buffer.size() < bytes.next_multiple_of(4) {
        return Err(backend_err(format!(
            "{name} buffer has {} bytes but the spec needs {} (rounded up to whole words)",
            buffer.size(),
            bytes.next_multiple_of(4)
        )));
    }
    Ok(())
}
